"""`--compile`: the transformer's blocks under torch.compile give the eager result.

Slow (inductor compiles the blocks on CPU: about a minute on 2 cores), so one job
and one layout; tolerance as for the parallel layouts (relative <= 1e-4, float32).
"""

from __future__ import annotations

import pytest
import torch

from ditmesh.common.models import resolve_model
from ditmesh.denoiser.parallel.mesh import single_process_mesh
from ditmesh.denoiser.runner import load_adapter
from ditmesh.denoiser.sampler import sample
from ditmesh.denoiser.speed import Speedups, compile_blocks

from .helpers import REL_TOL, flux_jobs, relative_error, single, spawn_layouts

pytestmark = pytest.mark.slow


def test_compiled_blocks_match_eager_in_one_process(tiny_flux):
    job = flux_jobs(tiny_flux)[1]  # 15 image tokens, CFG, 3 images
    adapter = load_adapter(resolve_model(tiny_flux), torch.device("cpu"), "float32")
    eager = sample(adapter, job, single_process_mesh())
    compile_blocks(adapter.transformer)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = sample(adapter, job, single_process_mesh())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0  # compile really ran
    assert relative_error(compiled, eager) <= REL_TOL
    # A second request of the same shape reuses what was compiled: nothing recompiles.
    again = sample(adapter, job, single_process_mesh())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(again, compiled)


def test_compiled_blocks_in_a_ring_gang_match_the_single_process(tiny_flux, tmp_path):
    jobs = flux_jobs(tiny_flux)[1:2]
    want = single(tiny_flux, jobs)
    got = spawn_layouts(
        tiny_flux, jobs, 2, tmp_path, layouts={"r2": dict(ring=2)}, speed=Speedups(compile=True)
    )
    assert relative_error(got["r2"][0], want[0]) <= REL_TOL


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


@pytest.mark.parametrize(
    "overlap",
    [
        "off",
        "reorder",
        pytest.param(
            "schedule",
            # Its cost model reads the GPU's memory bandwidth through triton (a GPU install).
            marks=pytest.mark.skipif(not _has_triton(), reason="needs triton"),
        ),
    ],
)
def test_compiled_blocks_with_the_ulysses_exchange_inside_match_the_single_process(
    tiny_flux, tmp_path, overlap
):
    # Under --compile the Ulysses exchange is traced (functional collectives) into the
    # blocks' graphs rather than run eagerly between them; job 0's 8 text tokens travel
    # in the exchange (split across ranks), job 1's 7 stay whole on each rank.
    # --comm-overlap lets inductor reorder those collectives: the numbers must not change.
    jobs = flux_jobs(tiny_flux)[0:2]
    want = single(tiny_flux, jobs)
    got = spawn_layouts(
        tiny_flux,
        jobs,
        2,
        tmp_path,
        layouts={"u2": dict(ulysses=2)},
        speed=Speedups(compile=True, comm_overlap=overlap),
    )
    for g, w in zip(got["u2"], want, strict=True):
        assert relative_error(g, w) <= REL_TOL
    # Nothing fell back to eager: a graph break in the exchange would still give the right
    # numbers, only slower.
    breaks = torch.load(tmp_path / "world2.pt.graph_breaks")
    assert breaks == {"graph_break": {}, "unimplemented": {}}, breaks
