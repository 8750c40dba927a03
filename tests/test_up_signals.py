"""`ditmesh up` stops as the README says: Ctrl-C and SIGTERM drain, a second one kills.

Each test runs `up` as a real child in its own session, so that a signal sent to
its process group is what a terminal's Ctrl-C is: before the stages had sessions
of their own, that signal reached them together with the gateway, and a request
the gateway still held failed at the VAE (UNAVAILABLE) or was lost in the queue.
Requests are 256x256 with 100 steps on the tiny Flux: about 3 s each on CPU. The
stages run one torch thread each (OMP_NUM_THREADS=1): on 2 busy cores, threads that
spin waiting for each other make a step many times slower.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from ditmesh.client import Client, DitmeshClientError

pytestmark = pytest.mark.slow

SIZE, STEPS = 256, 100


class Up:
    """`ditmesh up --model M` in its own session, its stderr kept for failure messages."""

    def __init__(self, model: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ditmesh.cli", "up", "--model", model],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._keep_stderr, daemon=True)
        self._reader.start()
        self.address = None
        for line in self.proc.stdout:
            m = re.match(r"gateway listening on (\S+)", line)
            if m:
                self.address = m.group(1)
                break
        if self.address is None:
            self.proc.kill()
            raise RuntimeError("ditmesh up did not start:\n" + self.log())
        self.children = descendants(self.proc.pid)
        assert len(self.children) >= 4, self.children  # three stages and the gateway

    def _keep_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def log(self) -> str:
        return "".join(self.stderr[-60:])

    def ctrl_c(self) -> None:
        """SIGINT to the whole process group, as the terminal sends it."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"up did not exit in {timeout} s:\n{self.log()}") from None
        self._reader.join(5)  # its last lines, read once its stderr closes
        return code

    def kill_all(self) -> None:
        for pid in [self.proc.pid, *self.children]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    kids = [int(p) for p in out.stdout.split()]
    return kids + [d for k in kids for d in descendants(k)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except FileNotFoundError:
        return False


class Request(threading.Thread):
    """One generate call in a thread; `started` is set on its first event of `kind`."""

    def __init__(self, address: str, seed: int, wait_for: str, steps: int = STEPS) -> None:
        super().__init__(daemon=True)
        self.address, self.seed, self.wait_for, self.steps = address, seed, wait_for, steps
        self.started = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        def progress(p) -> None:
            if p.kind == self.wait_for:
                self.started.set()

        try:
            with Client(self.address, timeout=120, retries=0) as client:
                self.result = client.generate(
                    "a red circle",
                    height=SIZE,
                    width=SIZE,
                    steps=self.steps,
                    seed=self.seed,
                    on_progress=progress,
                )
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.error = exc
        finally:
            self.started.set()


@pytest.fixture
def up(tiny_flux):
    mesh = Up(tiny_flux)
    yield mesh
    mesh.kill_all()
    mesh.proc.wait(10)


def in_flight_and_queued(up: Up) -> tuple[Request, Request]:
    running = Request(up.address, seed=1, wait_for="step")
    assert running.started.wait(60), up.log()
    queued = Request(up.address, seed=2, wait_for="queued")  # waits for the one denoiser
    assert queued.started.wait(30), up.log()
    assert running.result is None and running.error is None  # still denoising
    return running, queued


def assert_finished_with_image(req: Request, up: Up) -> None:
    req.join(90)
    assert req.error is None, f"{req.error!r}\n{up.log()}"
    assert req.result is not None and len(req.result.images) == 1
    assert req.result.images[0].size == (SIZE, SIZE)


def test_ctrl_c_drains_the_request_in_flight_and_the_queued_one(up):
    running, queued = in_flight_and_queued(up)
    up.ctrl_c()
    assert_finished_with_image(running, up)
    assert_finished_with_image(queued, up)
    assert up.wait(60) == 0, up.log()
    assert not [p for p in up.children if alive(p)]


def test_sigterm_drains_the_request_in_flight_and_the_queued_one(up):
    running, queued = in_flight_and_queued(up)
    up.proc.send_signal(signal.SIGTERM)  # as a process manager sends it: to `up` alone
    assert_finished_with_image(running, up)
    assert_finished_with_image(queued, up)
    assert up.wait(60) == 0, up.log()
    assert not [p for p in up.children if alive(p)]


@pytest.mark.alone  # bounds how long the stop takes
def test_second_ctrl_c_stops_everything_at_once(up):
    running = Request(up.address, seed=3, wait_for="step", steps=500)  # the most it takes
    assert running.started.wait(60), up.log()
    assert running.result is None and running.error is None  # denoising
    up.ctrl_c()
    time.sleep(1.0)
    assert up.proc.poll() is None  # draining: the gateway still holds the request
    up.ctrl_c()
    t = time.monotonic()
    code = up.wait(10)
    assert time.monotonic() - t < 5, up.log()
    assert code != 0
    assert "killing every process" in up.log()
    running.join(10)
    assert isinstance(running.error, DitmeshClientError)
    deadline = time.monotonic() + 5
    while [p for p in up.children if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in up.children if alive(p)]


def test_children_stop_when_up_is_killed(up):
    os.kill(up.proc.pid, signal.SIGKILL)  # no chance to stop anything itself
    up.proc.wait(10)
    # Each child gets SIGTERM from the kernel and, idle, stops within seconds.
    deadline = time.monotonic() + 30
    while [p for p in up.children if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in up.children if alive(p)]
