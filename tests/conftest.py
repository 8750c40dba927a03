"""Shared fixtures: a tiny Flux model built offline, and real meshes on loopback."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> str:
    from ditmesh.common.tiny import make_tiny

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
