"""The gang watcher's decisions about dead workers (common.gang_watch.DeadWorkerWatch),
and the leader's life cycle both gangs share (common.gangs.GangLeader).

The end-to-end cases (a worker dying while idle or mid-request) run real gangs in
test_gang.py; the stuck-request case needs collectives without a timeout (replayed
from CUDA graphs, GPU only), so its decision is checked here from plain facts, and
the watcher's acting on it with a leader of fake processes.
"""

import threading
import time

import pytest
import torch.distributed as dist

from ditmesh.common import gang_watch
from ditmesh.common.errors import Cancelled, Unavailable
from ditmesh.common.gang_watch import DeadWorkerWatch, watch_gang
from ditmesh.common.gangs import GangLaunch, GangLeader

from .helpers import FakeMember, FakeWorkers


def test_dead_worker_while_idle_fails_the_server():
    assert DeadWorkerWatch(10.0).check(dead=True, busy=False, now=0.0) == "fail"


def test_dead_worker_during_a_request_waits_for_the_collective_timeout_then_exits():
    watch = DeadWorkerWatch(10.0, grace_s=5.0)
    assert watch.check(dead=False, busy=True, now=0.0) == "ok"
    assert watch.check(dead=True, busy=True, now=1.0) == "ok"  # first seen dead
    assert watch.check(dead=True, busy=True, now=15.9) == "ok"  # 14.9 s <= 10 + 5
    assert watch.check(dead=True, busy=True, now=16.1) == "exit"  # stuck past the limit


def test_a_request_that_fails_by_itself_leads_to_fail_not_exit():
    watch = DeadWorkerWatch(10.0, grace_s=5.0)
    assert watch.check(dead=True, busy=True, now=0.0) == "ok"
    # The request timed out and answered UNAVAILABLE: the gang is idle now.
    assert watch.check(dead=True, busy=False, now=11.0) == "fail"


def test_the_stuck_clock_starts_when_the_worker_is_first_seen_dead():
    watch = DeadWorkerWatch(10.0, grace_s=5.0)
    assert watch.check(dead=True, busy=True, now=100.0) == "ok"
    assert watch.check(dead=False, busy=True, now=101.0) == "ok"  # (cannot revive; resets)
    assert watch.check(dead=True, busy=True, now=200.0) == "ok"
    assert watch.check(dead=True, busy=True, now=214.0) == "ok"
    assert watch.check(dead=True, busy=True, now=215.5) == "exit"


# ------------------------------------------- the shared watcher and leader, with fakes
# A leader of fake processes: what the watcher and the leader decide needs no process
# group, so these run in milliseconds. Real gangs run in test_gang.py / test_vae_gang.py.


class FakeServer:
    """RunningServer's stop signal and fail()."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.failed: list[str] = []

    def wait_stopping(self, timeout: float | None = None) -> bool:
        return self.stopping.wait(timeout)

    def fail(self, reason: str) -> None:
        self.failed.append(reason)
        self.stopping.set()


@pytest.fixture
def no_barrier(monkeypatch):
    """The leader meets its (fake) workers at once."""
    monkeypatch.setattr(dist, "barrier", lambda group=None: None)


def fake_leader(name: str = "VAE gang", timeout_s: float = 0.2) -> GangLeader:
    launch = GangLaunch(world=2, device="cpu", collective_timeout_s=timeout_s)
    return GangLeader(name, launch, FakeWorkers(), FakeMember)


def test_both_gangs_are_one_leader_with_one_watcher():
    from ditmesh.denoiser.gang import GangRunner
    from ditmesh.vae.gang import VaeGang

    assert issubclass(GangRunner, GangLeader) and issubclass(VaeGang, GangLeader)


def test_the_watcher_fails_the_server_when_a_worker_dies_while_idle(no_barrier):
    gang, server = fake_leader(), FakeServer()
    gang.workers.dead_names.append("vae-rank1")
    watch_gang(gang, server, interval_s=0.01).join(5)
    assert server.failed == ["VAE gang process vae-rank1 exited"]
    assert gang.is_broken()


def test_the_watcher_exits_when_a_request_is_stuck_on_a_dead_worker(no_barrier, monkeypatch):
    monkeypatch.setattr(gang_watch, "STUCK_GRACE_S", 0.0)
    exits: list[int] = []
    monkeypatch.setattr(gang_watch, "exit_process", exits.append)
    gang, server = fake_leader(timeout_s=0.2), FakeServer()
    release = threading.Event()
    request = threading.Thread(
        target=gang.exclusive, args=(release.wait, "stuck", lambda exc: True), daemon=True
    )
    request.start()
    while not gang.busy:
        time.sleep(0.01)
    gang.workers.dead_names.append("vae-rank1")
    start = time.monotonic()
    watch_gang(gang, server, interval_s=0.01).join(5)
    assert exits == [1] and server.failed == []
    assert time.monotonic() - start >= 0.2  # it waited for the collective timeout first
    release.set()
    request.join(5)


def test_workers_that_exit_because_the_gang_closes_are_not_deaths(no_barrier):
    gang, server = fake_leader(), FakeServer()
    gang.mark_broken()  # so close() kills the workers instead of messaging them
    gang.close()
    gang.workers.dead_names.append("vae-rank1")
    watch_gang(gang, server, interval_s=0.01).join(5)
    assert server.failed == []


def test_the_watcher_ends_with_the_server(no_barrier):
    gang, server = fake_leader(), FakeServer()
    thread = watch_gang(gang, server, interval_s=0.01)
    server.stopping.set()
    thread.join(5)
    assert not thread.is_alive() and server.failed == []


def test_a_gang_failure_breaks_the_leader_for_good(no_barrier):
    gang = fake_leader("denoiser gang")

    def collective_timed_out():
        raise RuntimeError("gloo: timed out")

    with pytest.raises(Unavailable, match="failed on request r"):
        gang.exclusive(collective_timed_out, "failed on request r", lambda exc: True)
    assert gang.is_broken()
    with pytest.raises(Unavailable, match="the denoiser gang has lost a process"):
        gang.exclusive(lambda: 1, "unused", lambda exc: True)


def test_an_error_that_is_not_the_gang_s_passes_through(no_barrier):
    gang = fake_leader("denoiser gang")

    def cancelled():
        raise Cancelled("request r was cancelled at step 2")

    with pytest.raises(Cancelled):
        gang.exclusive(cancelled, "unused", lambda exc: isinstance(exc, RuntimeError))
    assert not gang.is_broken()
    assert gang.exclusive(lambda: 7, "unused", lambda exc: True) == 7
    # Once a worker is dead, any error is the gang's.
    gang.workers.dead_names.append("gang-rank1")
    with pytest.raises(Unavailable, match="the denoiser gang lost gang-rank1"):
        gang.exclusive(lambda: 7, "unused", lambda exc: False)
    assert gang.is_broken()
