"""Shared fixtures: a tiny Flux model built offline, and real meshes on loopback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("flux", tmp_path_factory.mktemp("models") / "tiny-flux", seed=0))


class InProcessMesh:
    """The four stages as real gRPC servers in this process (faster to start than `up`)."""

    def __init__(self, model: str, denoisers: int = 1) -> None:
        from ditmesh.denoiser.service import serve as serve_denoiser
        from ditmesh.encoder.service import serve as serve_encoder
        from ditmesh.gateway.main import serve as serve_gateway
        from ditmesh.vae.service import serve as serve_vae

        self.encoder = serve_encoder(model)
        self.denoisers = [serve_denoiser(model) for _ in range(denoisers)]
        self.vae = serve_vae(model)
        self.gateway = serve_gateway(
            model,
            encoder=[self.encoder.address],
            denoiser=[d.address for d in self.denoisers],
            vae=[self.vae.address],
        )

    @property
    def address(self) -> str:
        return self.gateway.address

    def stop(self) -> None:
        for s in (self.gateway, self.encoder, *self.denoisers, self.vae):
            s.stop(0)


@pytest.fixture(scope="session")
def inproc_mesh(tiny_flux):
    mesh = InProcessMesh(tiny_flux)
    yield mesh
    mesh.stop()


class UpProcess:
    """`ditmesh up` in a child process, as the README runs it."""

    def __init__(self, model: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ditmesh.cli", "up", "--model", model, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.address = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.match(r"gateway listening on (\S+)", line)
            if m:
                self.address = m.group(1)
                break
        if self.address is None:
            self.proc.kill()
            raise RuntimeError("ditmesh up did not start:\n" + "".join(self.stderr[-50:]))

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="session")
def up_mesh(tiny_flux):
    mesh = UpProcess(tiny_flux)
    yield mesh
    if mesh.proc.poll() is None:
        mesh.stop()
