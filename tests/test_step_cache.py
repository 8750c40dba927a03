"""Step caching (services/denoiser/step_cache.py): exact when off, skips when the probe says
so, the same decisions and latents under every 2-rank gloo layout as in one process, and
the threshold checked at the gateway and reported to the SDK and CLI."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from ditmesh.common.models import resolve_model
from ditmesh.denoiser import step_cache
from ditmesh.denoiser.parallel.mesh import ParallelConfig, build_mesh, single_process_mesh
from ditmesh.denoiser.parallel.sequence import attach
from ditmesh.denoiser.runner import load_adapter
from ditmesh.denoiser.sampler import sample

from .helpers import LAYOUTS, REL_TOL, flux_jobs, join_gloo, relative_error

STEPS = 8
# On the tiny random Flux the probe's rel lies between 0.33 and 0.5 at every step: 0.4
# skips some steps and computes others. The tests check no rel is within MARGIN of it
# (else float summation order could flip a decision between layouts).
THRESHOLD = 0.4
MARGIN = 1e-3
# Skipping changes the result a little: on this model at most this much (max abs error
# over max abs value), measured 0.7% with 7 of 10 steps skipped.
SKIP_BOUND = 0.05


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("flux", tmp_path_factory.mktemp("flux") / "model"))


def cached_jobs(model_dir: str, threshold: float) -> list:
    return [
        dataclasses.replace(j, steps=STEPS, cache_threshold=threshold) for j in flux_jobs(model_dir)
    ]


class Recorder:
    """Keeps each request's StepCache (its skip pattern and rels) for the assertions."""

    def __init__(self, monkeypatch=None) -> None:
        self.caches: list[step_cache.StepCache] = []
        original = step_cache.StepCache.__init__
        recorder = self

        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            recorder.caches.append(self)

        if monkeypatch is not None:
            monkeypatch.setattr(step_cache.StepCache, "__init__", init)
        else:
            step_cache.StepCache.__init__ = init


def run_single(model_dir: str, jobs) -> list[torch.Tensor]:
    adapter = load_adapter(resolve_model(model_dir), torch.device("cpu"), "float32")
    return [sample(adapter, job, single_process_mesh()) for job in jobs]


@pytest.fixture(scope="module")
def exact(tiny_flux_dir):
    return run_single(tiny_flux_dir, cached_jobs(tiny_flux_dir, 0.0))


def test_threshold_zero_is_exact_sampling_bit_for_bit(tiny_flux_dir, exact, monkeypatch):
    rec = Recorder(monkeypatch)
    jobs = cached_jobs(tiny_flux_dir, 0.0)
    got = run_single(tiny_flux_dir, jobs)
    assert not rec.caches  # off: the transformer is not even wrapped
    for a, b in zip(got, exact, strict=True):
        assert torch.equal(a, b)
    assert all(j.cached_steps == 0 for j in jobs)


def test_a_threshold_that_never_skips_is_exact_too(tiny_flux_dir, exact, monkeypatch):
    # Probe then replay (the first block's output handed back, not recomputed) gives the
    # very numbers of a plain step.
    rec = Recorder(monkeypatch)
    jobs = cached_jobs(tiny_flux_dir, 1e-9)
    got = run_single(tiny_flux_dir, jobs)
    assert len(rec.caches) == len(jobs)
    assert [(c.skipped, c.computed) for c in rec.caches] == [(0, STEPS)] * len(jobs)
    for a, b in zip(got, exact, strict=True):
        assert torch.equal(a, b)


def test_a_large_threshold_skips_and_stays_close(tiny_flux_dir, exact, monkeypatch):
    rec = Recorder(monkeypatch)
    jobs = cached_jobs(tiny_flux_dir, 1.0)
    got = run_single(tiny_flux_dir, jobs)
    for job, cache, a, b in zip(jobs, rec.caches, got, exact, strict=True):
        # First step computed; at most MAX_SKIPS_IN_A_ROW skips, then one computed.
        assert cache.pattern[0] is False
        assert job.cached_steps == cache.skipped > 0
        run = 0
        for skipped in cache.pattern:
            run = run + 1 if skipped else 0
            assert run <= step_cache.MAX_SKIPS_IN_A_ROW
        assert torch.isfinite(a).all()
        assert not torch.equal(a, b)
        assert relative_error(a, b) <= SKIP_BOUND


def test_mixed_threshold_skips_some_steps_not_all(tiny_flux_dir, monkeypatch):
    rec = Recorder(monkeypatch)
    run_single(tiny_flux_dir, cached_jobs(tiny_flux_dir, THRESHOLD))
    patterns = [c.pattern for c in rec.caches]
    assert any(any(p) for p in patterns), patterns
    assert any(not s for p in patterns for s in p[1:]), patterns
    for c in rec.caches:
        assert all(abs(r - THRESHOLD) > MARGIN for r in c.rels), c.rels


def test_refusals():
    class Adapter:
        forward = None
        transformer = torch.nn.Linear(1, 1)

    assert "PipeFusion" in step_cache.refusal(Adapter(), pipefusion=2)
    assert "supports the transformers" in step_cache.refusal(Adapter(), pipefusion=1)


# ------------------------------------------------------------ the same decisions on gloo gangs


def _rank_main(rank: int, world: int, port: int, model_dir: str, jobs, out_path: str) -> None:
    join_gloo(rank, world, port)
    rec = Recorder()
    try:
        adapter = load_adapter(resolve_model(model_dir), torch.device("cpu"), "float32")
        out = {}
        for name, degrees in LAYOUTS[world].items():
            mesh = build_mesh(ParallelConfig(**degrees), rank, world)
            attached = attach(adapter.transformer, adapter.plan, mesh)
            try:
                latents, patterns = [], []
                for job in jobs:
                    job = dataclasses.replace(job)
                    latents.append(sample(adapter, job, mesh))
                    assert job.cached_steps == rec.caches[-1].skipped
                    patterns.append(rec.caches[-1].pattern)
                out[name] = (latents, patterns)
            finally:
                if attached is not None:
                    attached.detach(adapter.transformer)
        if rank == 0:
            torch.save(out, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_layouts_make_the_single_process_decisions(tiny_flux_dir, monkeypatch, tmp_path):
    from ditmesh.denoiser.gang import free_port

    rec = Recorder(monkeypatch)
    jobs = cached_jobs(tiny_flux_dir, THRESHOLD)
    want = run_single(tiny_flux_dir, [dataclasses.replace(j) for j in jobs])
    want_patterns = [c.pattern for c in rec.caches]
    assert any(any(p) for p in want_patterns)
    out_path = str(tmp_path / "world2.pt")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp.spawn(_rank_main, args=(2, free_port(), tiny_flux_dir, jobs, out_path), nprocs=2, join=True)
    results = torch.load(out_path)
    assert set(results) == {"u2", "r2", "cfg2", "dp2"}
    for layout, (latents, patterns) in results.items():
        assert patterns == want_patterns, layout
        for i, (got, ref) in enumerate(zip(latents, want, strict=True)):
            err = relative_error(got, ref)
            assert err <= REL_TOL, f"{layout} job {i}: relative error {err:.2e}"
