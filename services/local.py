"""`ditmesh up`: the whole mesh as local processes, for trying it and for tests.

Each stage is its own `ditmesh serve` process on a free port (it reports the
port it bound on stdout, so there is no race for ports); the gateway starts
once the three stages are listening and healthy.

Stopping, as the README promises (Ctrl-C drains):
- Every child runs in its own session, so the terminal's Ctrl-C reaches
  `ditmesh up` alone. Were the stages in the terminal's process group they
  would drain at the same moment as the gateway, and a request still held by
  the gateway would find its VAE already gone (UNAVAILABLE).
- The first SIGINT / SIGTERM stops the gateway first (it refuses new requests
  and finishes those it holds, which needs the stages), waits for it, then
  stops the stages. Each process may take its drain time plus a margin before
  it is killed.
- A second SIGINT / SIGTERM kills every child's process group at once.
- If `ditmesh up` dies without a word (SIGKILL, OOM), each child gets SIGTERM
  from the kernel (Linux PR_SET_PDEATHSIG, set between fork and exec) and
  drains as if asked to; elsewhere children outlive such a death.

With `autoscale_local` (`ditmesh up --autoscale on`) `up` starts the gateway alone and
hands it each stage's `serve` arguments (`--local-stage STAGE=ARGS`): the gateway's
autoscaler starts and stops the stage processes itself (gateway/autoscale_gateway.py says
why), stops them after its own drain, and is given that much longer to exit.

Metrics (`metrics_port`, `ditmesh up --metrics-port BASE`): each process `up` starts gets
its own `--metrics-port` from one base (`metrics_ports`), so one scrape config names them
all; stage processes the gateway's local autoscaler starts get none (their number varies,
and no port could be promised to them).

What each stage does on SIGTERM (health NOT_SERVING, in-flight work finished
within its grace) is `ditmesh.common.server`'s; the gateway's admission and
its drain are the gateway's.

Over 350 lines on purpose: the life cycle of every child (start in its own session,
health, the drain order, the second Ctrl-C, the death signal) is one story, read whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ditmesh.common.server import ServerConfig

LISTENING = re.compile(r"^(\w+) listening on (\S+):(\d+)\s*$")
STAGES = ("encoder", "denoiser", "vae")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_SIGTERM = int(signal.SIGTERM)  # a plain int for ctypes


class MeshAborted(RuntimeError):
    """A stop was asked for while the mesh was still starting."""


@dataclass(kw_only=True, slots=True)
class UpConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 0
    """Gateway port; 0 picks a free one."""
    name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    warmup: str = "auto"
    """Encoder and VAE warm-up at start (services/common/warmup.py)."""
    start_timeout_s: float = 300.0
    stop_margin_s: float = 15.0
    """Seconds a process may take to exit beyond its drain time before it is killed."""
    drain_seconds: float | None = None
    """Passed to every `serve` process as `--drain-seconds`; None: each drains for its
    own default (`default_drain_seconds`)."""
    extra_env: dict[str, str] = field(default_factory=dict)
    denoiser_args: list[str] = field(default_factory=list)
    """Extra `serve denoiser` flags: the gang's degrees."""
    denoiser_replicas: int = 1
    """Denoiser processes (each a whole gang) behind the one gateway."""
    vae_args: list[str] = field(default_factory=list)
    encoder_args: list[str] = field(default_factory=list)
    """Extra `serve vae` flags: the VAE gang's size (`--parallel M`)."""
    gateway_args: list[str] = field(default_factory=list)
    """Extra `serve gateway` flags (admission limits and the like)."""
    autoscale_local: bool = False
    """The gateway starts and stops the stage processes on its autoscaler's decisions."""
    metrics_port: int = 0
    """Base of the `--metrics-port` of each process (`metrics_ports`); 0: no metrics."""

    def __post_init__(self) -> None:
        if self.stop_margin_s <= 0:
            raise ValueError(f"stop_margin_s must be > 0, got {self.stop_margin_s}")
        if self.denoiser_replicas < 1:
            raise ValueError(f"denoiser_replicas must be >= 1, got {self.denoiser_replicas}")
        if self.drain_seconds is not None and self.drain_seconds < 0:
            raise ValueError(f"drain_seconds must be >= 0, got {self.drain_seconds}")
        if self.drain_seconds is not None and not serve_accepts("--drain-seconds"):
            raise ValueError("drain_seconds is set but `ditmesh serve` has no --drain-seconds")
        if self.metrics_port < 0:
            raise ValueError(f"metrics_port must be 0..65535, got {self.metrics_port}")
        last = max(metrics_ports(self.metrics_port, self.denoiser_replicas).values())
        if self.metrics_port and last > 65535:
            raise ValueError(
                f"metrics_port {self.metrics_port} would give the processes ports up to "
                f"{last}, past 65535"
            )

    def stop_timeout_s(self, stage: str) -> float:
        """Its drain time plus the margin; the drain is the longer of what it is told and its
        own default, as a stage may take --drain-seconds and not act on it."""
        drain = max(self.drain_seconds or 0.0, default_drain_seconds(stage))
        if stage == "gateway" and self.autoscale_local:  # it stops its stages after its drain
            drain += max(self.stop_timeout_s(s) for s in STAGES)
        return drain + self.stop_margin_s


def metrics_ports(base: int, denoiser_replicas: int = 1) -> dict[tuple[str, int], int]:
    """{(stage, replica): port} from `base`: gateway base, encoder +1, denoiser +2, vae +3,
    then the denoiser replicas after the first on +4, +5, ... Fixed offsets, so that an
    operator's scrape config does not change with the replica count."""
    ports = {("gateway", 0): base, ("encoder", 0): base + 1, ("denoiser", 0): base + 2}
    ports[("vae", 0)] = base + 3
    for r in range(1, denoiser_replicas):
        ports[("denoiser", r)] = base + 3 + r
    return ports


def default_drain_seconds(stage: str) -> float:
    """How long `ditmesh serve STAGE` drains when not given --drain-seconds."""
    if stage == "gateway":  # it holds whole requests: its drain outlasts their deadline
        from ditmesh.gateway.settings import DEFAULT_DRAIN_SECONDS

        return DEFAULT_DRAIN_SECONDS
    return ServerConfig(stage=stage).grace_seconds


def serve_accepts(flag: str) -> bool:
    """Whether `ditmesh serve` takes `flag` (with a value)."""
    from ditmesh.cli import build_parser

    _, unknown = build_parser().parse_known_args(["serve", "gateway", "--model", "m", flag, "1"])
    return flag not in unknown


def _die_with_parent(parent: int, prctl) -> None:
    """preexec_fn: runs in the child between fork and exec, so it only calls prctl and kill."""
    prctl(PR_SET_PDEATHSIG, _SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: no signal will come
        os.kill(os.getpid(), _SIGTERM)


def _parent_watch():
    # The death signal follows the *thread* that forks: start stages from a thread
    # that lives as long as the mesh (run_up and the benchmarks use the main one).
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child
    return functools.partial(_die_with_parent, os.getpid(), prctl)


class StageProcess:
    """One `ditmesh serve` child, in its own session (its pid is its process group)."""

    def __init__(
        self, stage: str, args: list[str], env: dict[str, str], *, die_with_parent: bool = True
    ) -> None:
        """`die_with_parent`: the kernel stops the child when the thread that started it
        ends. Only for a single-threaded starter (`up`, the benchmarks): a function run
        between fork and exec in a child of a many-threaded process (the gateway) can
        deadlock, and a worker thread that starts a child may end before it."""
        self.stage = stage
        cmd = [sys.executable, "-m", "ditmesh.cli", "serve", stage, *args]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            bufsize=1,
            start_new_session=True,
            preexec_fn=_parent_watch() if die_with_parent else None,
        )
        self.address: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True, name=f"pump-{stage}").start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = LISTENING.match(line.strip())
            if m and m.group(1) == self.stage and self.address is None:
                self.address = f"{m.group(2)}:{m.group(3)}"
                self._ready.set()
            else:
                sys.stderr.write(f"[{self.stage}] {line}")
        self._ready.set()

    def wait_listening(
        self, timeout: float, abort: threading.Event | SignalFlag | None = None
    ) -> str:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if abort is not None and abort.is_set():
                raise MeshAborted(f"stopped while the {self.stage} stage was starting")
            if time.monotonic() > deadline:
                break
        if self.address is None:
            if self._ready.is_set():  # its stdout closed: it is exiting
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
            code = self.proc.poll()
            why = (
                f"exited with code {code}"
                if code is not None
                else f"did not start in {timeout:.0f} s"
            )
            raise RuntimeError(f"the {self.stage} stage {why}; its log is above")
        return self.address

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the whole process group: the stage and any gang workers it started."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(max(0.0, timeout))
        except subprocess.TimeoutExpired:
            sys.stderr.write(f"the {self.stage} stage did not stop in time; killing it\n")
            self.kill()
            code = self.proc.wait()
        self.kill()  # whatever it started and left behind
        return code


def wait_healthy(
    address: str, timeout: float, abort: threading.Event | SignalFlag | None = None
) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if abort is not None and abort.is_set():
                raise MeshAborted(f"stopped while waiting for {address} to become healthy")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{address} did not become healthy in {timeout:.0f} s")
            time.sleep(0.1)


class LocalMesh:
    """The four stages as child processes; `abort` set by another thread cuts a start short."""

    def __init__(self, config: UpConfig, abort: threading.Event | SignalFlag | None = None) -> None:
        self.config = config
        self.abort = abort
        self.procs: list[StageProcess] = []
        self.gateway_address: str | None = None
        # Known before any child starts: a stop must not be the first to need them.
        self._stop_timeout = {s: config.stop_timeout_s(s) for s in (*STAGES, "gateway")}

    def _common_args(self) -> list[str]:
        c = self.config
        args = ["--model", c.model, "--host", c.host, "--device", c.device, "--dtype", c.dtype]
        args += [f"--warmup={c.warmup}"]
        if c.name:
            args += ["--name", c.name]
        if c.drain_seconds is not None:
            args += [f"--drain-seconds={c.drain_seconds:g}"]
        return args

    def _stage_args(self, stage: str) -> list[str]:
        c = self.config
        return {
            "encoder": c.encoder_args,
            "denoiser": c.denoiser_args,
            "vae": c.vae_args,
            "gateway": c.gateway_args,
        }.get(stage, [])

    def _metrics_args(self, stage: str, replica: int = 0) -> list[str]:
        c = self.config
        if not c.metrics_port:
            return []
        port = metrics_ports(c.metrics_port, c.denoiser_replicas)[(stage, replica)]
        return [f"--metrics-port={port}"]

    def start(self) -> str:
        c = self.config
        env = {**os.environ, **c.extra_env, "PYTHONUNBUFFERED": "1"}
        replicas = {"denoiser": c.denoiser_replicas}
        try:
            # Appended one by one, so a failure (or a kill) midway still sees every child.
            for s in () if c.autoscale_local else STAGES:
                for r in range(replicas.get(s, 1)):
                    args = [*self._common_args(), "--port", "0", *self._metrics_args(s, r)]
                    self.procs.append(StageProcess(s, [*args, *self._stage_args(s)], env))
            gw_args = [*self._common_args(), "--port", str(c.port), *self._metrics_args("gateway")]
            if c.autoscale_local:
                gw_args += [
                    f"--local-stage={s}={shlex.join([*self._common_args(), *self._stage_args(s)])}"
                    for s in STAGES
                ]
            for p in list(self.procs):
                address = p.wait_listening(c.start_timeout_s, self.abort)
                wait_healthy(address, c.start_timeout_s, self.abort)
                gw_args += [f"--{p.stage}", address]
            gw_args += self._stage_args("gateway")
            gw = StageProcess("gateway", gw_args, env)
            self.procs.append(gw)
            self.gateway_address = gw.wait_listening(c.start_timeout_s, self.abort)
            wait_healthy(self.gateway_address, c.start_timeout_s, self.abort)
        except BaseException:
            self.stop()
            raise
        return self.gateway_address

    def dead_stage(self) -> StageProcess | None:
        for p in self.procs:
            if p.proc.poll() is not None:
                return p
        return None

    def stop(self) -> int:
        """Gateway first (it finishes what it holds, on live stages), then the stages;
        returns 1 if any process exited other than cleanly or by SIGTERM, else 0."""
        worst = 0
        gateway = [p for p in self.procs if p.stage == "gateway"]
        stages = [p for p in self.procs if p.stage != "gateway"]
        for group in (gateway, stages):
            for p in group:
                p.terminate()
            started = time.monotonic()
            for p in group:
                code = p.wait(started + self._stop_timeout[p.stage] - time.monotonic())
                if code not in (0, -signal.SIGTERM):
                    worst = 1
        self.procs.clear()
        return worst

    def kill(self) -> None:
        """Every child's process group gets SIGKILL now (safe from a signal handler)."""
        for p in list(self.procs):
            p.kill()

    def __enter__(self) -> LocalMesh:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _say(text: str) -> None:
    # os.write, not print: a signal handler may interrupt a print to the same stream.
    os.write(sys.stderr.fileno(), (text + "\n").encode())


class SignalFlag:
    """What `up`'s signal handler sets: a plain attribute, no lock. A handler runs in the
    main thread between two bytecodes, maybe while that thread holds a lock (a
    threading.Event's own, in the `wait` it interrupted): setting an Event there can
    deadlock. `is_set` is what LocalMesh polls; `wait` sleeps in short steps."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self._set and time.monotonic() < end:
            time.sleep(0.05)
        return self._set


def run_up(config: UpConfig) -> int:
    stop = SignalFlag()
    mesh = LocalMesh(config, abort=stop)
    signals = 0

    def handler(signum, frame):  # noqa: ARG001
        nonlocal signals
        signals += 1
        if signals == 1:
            _say(
                f"{signal.Signals(signum).name}: draining (the gateway finishes the requests it "
                "holds, then the stages stop); signal again to stop at once"
            )
            stop.set()
        elif signals == 2:
            _say(f"{signal.Signals(signum).name} again: killing every process of the mesh now")
            mesh.kill()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    try:
        address = mesh.start()
    except MeshAborted:  # start() has stopped what it started
        _say("stopped before the mesh was up")
        return 1 if signals > 1 else 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"gateway listening on {address}", flush=True)
    code = 0
    while not stop.wait(0.5):
        dead = mesh.dead_stage()
        if dead is not None:
            print(
                f"error: the {dead.stage} stage exited with code {dead.proc.returncode}; stopping",
                file=sys.stderr,
            )
            code = 1
            break
    print("stopping the mesh", file=sys.stderr, flush=True)
    return mesh.stop() or code
