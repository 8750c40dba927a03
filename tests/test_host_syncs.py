"""The sampling loop never reads a tensor's value on the host.

On a GPU, `.item()`, `bool(t)`, `float(t)`, `.tolist()`, `.cpu()` and friends wait for
every kernel queued before them, so one such call per step would stall the GPU between
steps (and break the queueing ahead that CUDA graphs rely on). On CPU the same calls are
visible: they are counted here from the first transformer call to the end of the loop,
for every family in one process and for Flux on each rank of ulysses, ring and CFG gangs
(gloo). The count must be zero.
"""

from __future__ import annotations

import collections
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from ditmesh.common.models import resolve_model
from ditmesh.denoiser.parallel.mesh import ParallelConfig, build_mesh, single_process_mesh
from ditmesh.denoiser.parallel.sequence import attach
from ditmesh.denoiser.runner import load_adapter, warmup_job
from ditmesh.denoiser.sampler import sample
from ditmesh.tiny import make_tiny

READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


class HostReads:
    """Counts the listed Tensor methods while `active`, with where they were called."""

    def __init__(self, monkeypatch=None) -> None:
        self.active = False
        self.calls: collections.Counter = collections.Counter()
        for name in READS:
            orig = getattr(torch.Tensor, name)
            if monkeypatch is None:  # a spawned rank: patched for its short life
                setattr(torch.Tensor, name, self._wrap(name, orig))
            else:
                monkeypatch.setattr(torch.Tensor, name, self._wrap(name, orig))

    def _wrap(self, name, orig):
        def counted(tensor, *args, **kwargs):
            if self.active:
                frame = traceback.extract_stack(limit=3)[0]
                self.calls[f"{name} at {frame.filename}:{frame.lineno}"] += 1
            return orig(tensor, *args, **kwargs)

        return counted


def watch_loop(adapter, reads: HostReads) -> None:
    """Counting starts with the first prediction and stops when the loop hands over."""
    predict, finish = adapter.predict, adapter.finish

    def first_predict(*args, **kwargs):
        reads.active = True
        return predict(*args, **kwargs)

    def stop_then_finish(*args, **kwargs):
        reads.active = False
        return finish(*args, **kwargs)

    adapter.predict, adapter.finish = first_predict, stop_then_finish


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart-sigma"])
def test_the_loop_reads_no_tensor_on_the_host(family, tmp_path, monkeypatch):
    model = resolve_model(str(make_tiny(family, tmp_path / family)))
    adapter = load_adapter(model, torch.device("cpu"), "float32")
    job = warmup_job(adapter, model, cfg=True, steps=3, size=(64, 64))
    reads = HostReads(monkeypatch)
    watch_loop(adapter, reads)
    sample(adapter, job, single_process_mesh())
    assert not reads.active  # the loop ran to the end
    assert sum(reads.calls.values()) == 0, dict(reads.calls)


def test_a_host_read_in_the_loop_is_caught(tiny_flux, monkeypatch):
    model = resolve_model(tiny_flux)
    adapter = load_adapter(model, torch.device("cpu"), "float32")
    job = warmup_job(adapter, model, cfg=False, steps=2, size=(64, 64))
    reads = HostReads(monkeypatch)
    predict = adapter.predict

    def predict_with_a_read(prep, latents, t, *args, **kwargs):
        float(t)  # what a per-step sync looks like
        return predict(prep, latents, t, *args, **kwargs)

    adapter.predict = predict_with_a_read
    watch_loop(adapter, reads)
    sample(adapter, job, single_process_mesh())
    assert sum(reads.calls.values()) >= 2  # once a step


def _gang_rank(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["DITMESH_FP8_CPU"] = "1"  # the u2fp8 layout's exchange, emulated
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=120),
    )
    try:
        model = resolve_model(model_dir)
        adapter = load_adapter(model, torch.device("cpu"), "float32")
        job = warmup_job(adapter, model, cfg=True, steps=2, size=(64, 64))
        reads = HostReads()
        found = {}
        for name, degrees in GANG_LAYOUTS.items():
            mesh = build_mesh(ParallelConfig(**degrees), rank, 2, timeout=timedelta(seconds=60))
            attached = attach(adapter.transformer, adapter.plan, mesh)
            predict, finish = adapter.predict, adapter.finish
            watch_loop(adapter, reads)
            try:
                sample(adapter, job, mesh)
            finally:
                adapter.predict, adapter.finish = predict, finish
                if attached is not None:
                    attached.detach(adapter.transformer)
            found[name] = dict(reads.calls)
            reads.calls.clear()
        torch.save(found, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


GANG_LAYOUTS = {
    "u2": dict(ulysses=2),
    "r2": dict(ring=2),
    "cfg2": dict(cfg=2),
    "u2c2": dict(ulysses=2, ulysses_chunks=2),
    "u2fp8": dict(ulysses=2, ulysses_fp8=True),  # DITMESH_FP8_CPU=1 in the ranks
}


@pytest.mark.slow
def test_gang_ranks_read_no_tensor_on_the_host_in_the_loop(tiny_flux, tmp_path):
    from ditmesh.common.gangs import free_port

    tmp.spawn(_gang_rank, args=(free_port(), tiny_flux, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        found = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(found) == set(GANG_LAYOUTS)
        for name, calls in found.items():
            assert not calls, f"rank {rank}, {name}: {calls}"
