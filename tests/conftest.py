"""Shared fixtures: a tiny Flux model built offline, and real meshes on loopback; one torch
thread a process under pytest-xdist."""

from __future__ import annotations

import os

import pytest

# Before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (`make test` runs two workers on the two cores), each worker and every
# process it starts computes on one torch thread: two workers that each spin a thread per
# core wait on each other's threads, which makes them slower than one worker alone.
# OMP_NUM_THREADS is read when torch and each child start, so it is set before the import.
UNDER_XDIST = "PYTEST_XDIST_WORKER" in os.environ
if UNDER_XDIST:
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

from .helpers import InProcessMesh, UpProcess  # noqa: E402

if UNDER_XDIST:
    torch.set_num_threads(1)


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
