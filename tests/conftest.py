"""Shared fixtures: a tiny Flux model built offline, and real meshes on loopback."""

from __future__ import annotations

import os

import pytest

# Before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .helpers import InProcessMesh, UpProcess  # noqa: E402


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("flux", tmp_path_factory.mktemp("models") / "tiny-flux", seed=0))


@pytest.fixture(scope="session")
def inproc_mesh(tiny_flux):
    mesh = InProcessMesh(tiny_flux)
    yield mesh
    mesh.stop()


@pytest.fixture(scope="session")
def up_mesh(tiny_flux):
    mesh = UpProcess(tiny_flux)
    yield mesh
    if mesh.proc.poll() is None:
        mesh.stop()
