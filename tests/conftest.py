"""Shared fixtures: a tiny Flux model built offline, and real meshes on loopback; one torch
thread a process under pytest-xdist."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# Before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (`-n 2 --dist loadfile`: two workers on two cores), each worker and every
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


@contextmanager
def _turn(item) -> Iterator[None]:
    """A readers-writer lock across the xdist workers of one run, on two files: a test marked
    `alone` holds the run lock exclusively, every other test holds it shared. The gate is a
    turnstile: an `alone` test holds it while it waits and runs, so the other worker, which
    takes the gate on its way to every test, cannot keep the run lock shared forever."""
    base = os.path.join(
        tempfile.gettempdir(), f"ditmesh-tests-{item.config.workerinput['testrunuid']}"
    )
    alone = item.get_closest_marker("alone") is not None
    with open(base + ".gate", "a") as gate, open(base + ".run", "a") as run:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(run, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # closing the files releases what is still held


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup, call and teardown of each test (so a module's mesh starting or stopping too)
    under the workers' lock; without xdist, nothing to share."""
    if not UNDER_XDIST:
        return (yield)
    with _turn(item):
        return (yield)


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
