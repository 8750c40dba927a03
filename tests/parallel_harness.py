"""Parallel equivalence, reusable per model family.

`ParallelEquivalence` spawns gloo gangs of 2 and 4 processes; each runs every
layout of its size over the same jobs, and rank 0's latents are compared with
the single-process latents. Tolerance: max |parallel - single| <= 1e-4 * max |single|
(float32 on CPU). A family's test is a subclass naming the family and its jobs.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from ditmesh.common.models import resolve_model
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.mesh import ParallelConfig, build_mesh, single_process_mesh
from ditmesh.denoiser.parallel.sequence import attach
from ditmesh.denoiser.runner import load_adapter
from ditmesh.denoiser.sampler import sample
from ditmesh.denoiser.speed import EAGER, Speedups
from ditmesh.denoiser.speed import apply as apply_speedups

REL_TOL = 1e-4

LAYOUTS = {
    2: {"u2": dict(ulysses=2), "r2": dict(ring=2), "cfg2": dict(cfg=2), "dp2": dict(dp=2)},
    4: {
        "u2r2": dict(ulysses=2, ring=2),
        "u4": dict(ulysses=4),
        "r4": dict(ring=4),
        "cfg2u2": dict(cfg=2, ulysses=2),
    },
}


def run_layouts(
    model_dir: str, jobs: list[DenoiseJob], layouts: dict[str, dict], speed: Speedups = EAGER
) -> dict[str, list[torch.Tensor]]:
    """Runs every layout in this (already initialised) process group; rank 0 gets results."""
    model = resolve_model(model_dir)
    adapter = load_adapter(model, torch.device("cpu"), "float32")
    apply_speedups(adapter, speed)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, degrees in layouts.items():
        cfg = ParallelConfig(**degrees)
        cfg.check_model(heads=adapter.heads)
        mesh = build_mesh(cfg, rank, world, timeout=timedelta(seconds=60))
        attached = attach(adapter.transformer, adapter.plan, mesh)
        try:
            out[name] = [sample(adapter, job, mesh) for job in jobs]
        finally:
            if attached is not None:
                attached.detach(adapter.transformer)
    return out


def join_gloo(rank: int, world: int, port: int) -> None:
    """A spawned test rank: one thread, gloo on loopback."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )


def _rank_main(
    rank: int,
    world: int,
    port: int,
    model_dir: str,
    jobs,
    layouts,
    out_path: str,
    speed: Speedups = EAGER,
) -> None:
    join_gloo(rank, world, port)
    try:
        results = run_layouts(model_dir, jobs, layouts, speed)
        if rank == 0:
            torch.save(results, out_path)
            if speed.compile:  # what fell out of the compiled graphs, for the compile tests
                counters = torch._dynamo.utils.counters
                breaks = {k: dict(counters[k]) for k in ("graph_break", "unimplemented")}
                torch.save(breaks, out_path + ".graph_breaks")
    finally:
        dist.destroy_process_group()


def spawn_layouts(
    model_dir: str,
    jobs: list[DenoiseJob],
    world: int,
    tmp_path,
    layouts: dict[str, dict] | None = None,
    speed: Speedups = EAGER,
) -> dict[str, list[torch.Tensor]]:
    from ditmesh.denoiser.gang import free_port

    out_path = str(tmp_path / f"world{world}.pt")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp.spawn(
        _rank_main,
        args=(world, free_port(), model_dir, jobs, layouts or LAYOUTS[world], out_path, speed),
        nprocs=world,
        join=True,
    )
    return torch.load(out_path)


def single(model_dir: str, jobs: list[DenoiseJob]) -> list[torch.Tensor]:
    model = resolve_model(model_dir)
    adapter = load_adapter(model, torch.device("cpu"), "float32")
    return [sample(adapter, job, single_process_mesh()) for job in jobs]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


class ParallelEquivalence:
    """Subclass with `family` set and `make_jobs(model_dir)` returning the jobs to compare.

    The jobs must include a resolution whose image token count divides neither 2 nor 4,
    and CFG (so cfg2 layouts split real work) and more than one image (for dp2).
    """

    family: str = ""

    @classmethod
    def make_jobs(cls, model_dir: str) -> list[DenoiseJob]:
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory) -> str:
        from ditmesh.tiny import make_tiny

        return str(make_tiny(cls.family, tmp_path_factory.mktemp(cls.family) / "model"))

    @pytest.fixture(scope="class")
    @classmethod
    def jobs(cls, model_dir):
        return cls.make_jobs(model_dir)

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls, model_dir, jobs):
        return single(model_dir, jobs)

    @pytest.mark.parametrize("world", [2, 4])
    def test_layouts_match_single_process(self, model_dir, jobs, reference, world, tmp_path):
        results = spawn_layouts(model_dir, jobs, world, tmp_path)
        assert set(results) == set(LAYOUTS[world])
        for layout, latents in results.items():
            for i, (got, want) in enumerate(zip(latents, reference, strict=True)):
                assert got.shape == want.shape, (layout, i)
                err = relative_error(got, want)
                assert err <= REL_TOL, f"{self.family} {layout} job {i}: relative error {err:.2e}"
