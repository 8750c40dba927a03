"""`ditmesh up`: the whole mesh as local processes, for trying it and for tests.

Each stage is its own `ditmesh serve` process on a free port (it reports the
port it bound on stdout, so there is no race for ports); the gateway starts
once the three stages are listening and healthy. SIGINT / SIGTERM stop the
gateway first, then the stages, each draining its work.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

LISTENING = re.compile(r"^(\w+) listening on (\S+):(\d+)\s*$")
STAGES = ("encoder", "denoiser", "vae")


@dataclass(kw_only=True, slots=True)
class UpConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 0
    """Gateway port; 0 picks a free one."""
    name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    start_timeout_s: float = 300.0
    stop_timeout_s: float = 30.0
    extra_env: dict[str, str] = field(default_factory=dict)
    denoiser_args: list[str] = field(default_factory=list)
    """Extra `serve denoiser` flags: the gang's degrees."""
    vae_args: list[str] = field(default_factory=list)
    """Extra `serve vae` flags: the VAE gang's size (`--parallel M`)."""


class StageProcess:
    def __init__(self, stage: str, args: list[str], env: dict[str, str]) -> None:
        self.stage = stage
        cmd = [sys.executable, "-m", "ditmesh.cli", "serve", stage, *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
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

    def wait_listening(self, timeout: float) -> str:
        if not self._ready.wait(timeout) or self.address is None:
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

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def wait_healthy(address: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
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
    """The four stages as child processes."""

    def __init__(self, config: UpConfig) -> None:
        self.config = config
        self.procs: list[StageProcess] = []
        self.gateway_address: str | None = None

    def _common_args(self) -> list[str]:
        c = self.config
        args = ["--model", c.model, "--host", c.host, "--device", c.device, "--dtype", c.dtype]
        if c.name:
            args += ["--name", c.name]
        return args

    def _stage_args(self, stage: str) -> list[str]:
        return {"denoiser": self.config.denoiser_args, "vae": self.config.vae_args}.get(stage, [])

    def start(self) -> str:
        c = self.config
        env = {**os.environ, **c.extra_env, "PYTHONUNBUFFERED": "1"}
        try:
            stages = [
                StageProcess(
                    s,
                    [*self._common_args(), "--port", "0", *self._stage_args(s)],
                    env,
                )
                for s in STAGES
            ]
            self.procs.extend(stages)
            addrs = {}
            for p in stages:
                addrs[p.stage] = p.wait_listening(c.start_timeout_s)
                wait_healthy(addrs[p.stage], c.start_timeout_s)
            gw_args = [*self._common_args(), "--port", str(c.port)]
            for s in STAGES:
                gw_args += [f"--{s}", addrs[s]]
            gw = StageProcess("gateway", gw_args, env)
            self.procs.append(gw)
            self.gateway_address = gw.wait_listening(c.start_timeout_s)
            wait_healthy(self.gateway_address, c.start_timeout_s)
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
        """Gateway first (it stops taking requests), then the stages; returns the worst exit code."""
        worst = 0
        gateway = [p for p in self.procs if p.stage == "gateway"]
        stages = [p for p in self.procs if p.stage != "gateway"]
        for group in (gateway, stages):
            for p in group:
                p.terminate()
            for p in group:
                code = p.wait(self.config.stop_timeout_s)
                if code not in (0, -signal.SIGTERM):
                    worst = 1
        self.procs.clear()
        return worst

    def __enter__(self) -> LocalMesh:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_up(config: UpConfig) -> int:
    stop = threading.Event()

    def handler(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    mesh = LocalMesh(config)
    try:
        address = mesh.start()
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
