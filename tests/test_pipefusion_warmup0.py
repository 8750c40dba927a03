"""PipeFusion with no warm-up step (`pipefusion_warmup` 0): the first step is in patches.

The rule (parallel/pipefusion.py): no keys or values are kept before the first step, so
patch p of that step attends to the text and to patches 0..p, fresh, and never to the
rows of patches not computed yet; from the second step on it is PipeFusion as with a
warm-up. Checked here:

- the kept keys and values a first-step patch attends to are exactly the rows computed
  so far, and a patch out of token order is refused;
- on one rank: one patch a step is the whole image (exact, nothing left out), more
  patches run, stay finite, differ from one warm-up step and stay within a stated bound
  of exact sampling;
- on gloo gangs (the denoiser's own GangRunner: stages on separate processes, the
  warm-up count crossing to the workers in the gang's spec) pf2, pf4, cfg2pf2 and pf2u2
  with no warm-up equal the same patch schedule on one rank, for Flux (token patches)
  and SD3 (row bands), like the warm-up-1 tests of test_pipefusion.py.
Gang tolerance as the other parallel tests: REL_TOL of the reference's max (float32, CPU).
"""

from __future__ import annotations

import pytest
import torch

from ditmesh.common.models import resolve_model
from ditmesh.denoiser.parallel.mesh import (
    ParallelConfig,
    ParallelConfigError,
    RankGroups,
    single_process_mesh,
)
from ditmesh.denoiser.parallel.pipefusion import sample_pipefusion
from ditmesh.denoiser.parallel.pipefusion_attention import PatchContext, StaleSelfProcessor
from ditmesh.denoiser.runner import load_adapter

from .helpers import REL_TOL, flux_jobs, one_cpu_thread, relative_error, sd3_jobs, single

# First-step staleness on the tiny random Flux, 3 steps, 3 patches: about 6e-3 of the
# latents' max (one warm-up step: about 3e-3). The bound says "close, not wild".
NO_WARMUP_BOUND = 0.03


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread a process, the gangs' workers too (they read OMP_NUM_THREADS at
    start): 4 processes of 2 threads on 2 shared cores mostly wait on each other."""
    with one_cpu_thread():
        yield


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("flux", tmp_path_factory.mktemp("flux") / "model"))


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("sd3", tmp_path_factory.mktemp("sd3") / "model"))


def one_rank(model_dir: str, jobs, **degrees) -> list[torch.Tensor]:
    """The patch schedule of `degrees` on one rank, all blocks here."""
    adapter = load_adapter(resolve_model(model_dir), torch.device("cpu"), "float32")
    base = single_process_mesh()
    mesh = RankGroups(
        config=ParallelConfig(**degrees), rank=0, coords=base.coords, groups=base.groups
    )
    out = [sample_pipefusion(adapter, job, mesh) for job in jobs]
    assert all(not p.kv for p in adapter.pipefusion_stage.processors)  # dropped after
    return out


def gang(model_dir: str, jobs, **degrees) -> list[torch.Tensor]:
    """The jobs through a real gang of the layout (spawned workers, gloo on CPU)."""
    from ditmesh.denoiser.gang import GangRunner

    runner = GangRunner.of(model_dir, ParallelConfig(**degrees), device="cpu", dtype="float32")
    try:
        return [runner.run(job) for job in jobs]
    finally:
        runner.close()


def _all_close(got, want, what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, (what, i)
        err = relative_error(g, w)
        assert err <= REL_TOL, f"{what}, job {i}: relative error {err:.2e}"


def test_no_warmup_is_a_layout_and_negative_is_refused():
    assert ParallelConfig(pipefusion=2, pipefusion_warmup=0).pipefusion_warmup == 0
    with pytest.raises(ParallelConfigError, match=r"--pipefusion-warmup must be 0 or more"):
        ParallelConfig(pipefusion=2, pipefusion_warmup=-1)


def test_first_step_patches_attend_only_to_rows_computed_so_far():
    """Self-attention over 6 image rows in patches 0:2, 2:4, 4:6 with nothing kept: each
    attends to the rows up to its own end (a causal-by-patch step), then the second step
    to all 6; the result of a patch equals attention over exactly those rows."""
    torch.manual_seed(0)
    ctx = PatchContext(full=False, image_total=6)
    proc = StaleSelfProcessor(ctx)
    k = torch.randn(1, 6, 2, 4)
    v = torch.randn(1, 6, 2, 4)
    for step in range(2):
        for a, z in ((0, 2), (2, 4), (4, 6)):
            ctx.start, ctx.stop = a, z
            keys, values = proc._remember(k[:, a:z] + step, v[:, a:z] + step, 0)
            seen = z if step == 0 else 6
            assert keys.shape[1] == values.shape[1] == seen, (step, a, z)
            # Every row it attends to was written this step or the one before, never zeros.
            fresh = torch.cat([k[:, :z] + step, k[:, z:seen] + (step - 1)], dim=1)
            assert torch.equal(keys, fresh)
    # Rows out of order (a later patch first) are refused, not attended to as zeros.
    proc.kv.clear()
    ctx.start, ctx.stop = 2, 4
    with pytest.raises(RuntimeError, match="before rows 0:2 were ever computed"):
        proc._remember(k[:, 2:4], v[:, 2:4], 0)


@pytest.mark.slow  # seconds of sampling
def test_no_warmup_runs_differs_and_stays_close(flux_dir):
    jobs = flux_jobs(flux_dir)
    exact = single(flux_dir, jobs)
    # One patch is the whole image: nothing is ever left out, so it is exact.
    _all_close(one_rank(flux_dir, jobs, patches=1, pipefusion_warmup=0), exact, "w0 p1 vs exact")
    w1 = one_rank(flux_dir, jobs, patches=3, pipefusion_warmup=1)
    w0 = one_rank(flux_dir, jobs, patches=3, pipefusion_warmup=0)
    for i, (a, b, e) in enumerate(zip(w0, w1, exact, strict=True)):
        assert torch.isfinite(a).all(), i
        assert relative_error(a, b) > 1e-6, f"job {i}: no warm-up made no difference"
        err = relative_error(a, e)
        assert err < NO_WARMUP_BOUND, f"job {i}: {err:.2e} from exact"


@pytest.mark.slow  # a 2-process gang
def test_two_stages_without_warmup(flux_dir, sd3_dir):
    jobs = [j for j in flux_jobs(flux_dir) if j.true_cfg_scale <= 1.0]
    got = gang(flux_dir, jobs, pipefusion=2, pipefusion_warmup=0)
    _all_close(got, one_rank(flux_dir, jobs, patches=2, pipefusion_warmup=0), "Flux pf2w0")
    jobs = sd3_jobs(sd3_dir)
    got = gang(sd3_dir, jobs, pipefusion=2, patches=3, pipefusion_warmup=0)
    _all_close(got, one_rank(sd3_dir, jobs, patches=3, pipefusion_warmup=0), "SD3 pf2 p3 w0")


@pytest.mark.slow  # 4-process gangs
@pytest.mark.parametrize(
    "degrees",
    [dict(pipefusion=4), dict(cfg=2, pipefusion=2), dict(pipefusion=2, ulysses=2)],
    ids=["pf4", "cfg2pf2", "pf2u2"],
)
def test_four_ranks_without_warmup(flux_dir, degrees):
    # Every job: CFG on and off (cfg2 splits the branches), odd token counts (Ulysses
    # pads), 5 image tokens over 4 patches.
    jobs = flux_jobs(flux_dir)
    got = gang(flux_dir, jobs, **degrees, pipefusion_warmup=0)
    want = one_rank(
        flux_dir, jobs, patches=ParallelConfig(**degrees).num_patches, pipefusion_warmup=0
    )
    _all_close(got, want, f"{degrees} w0 vs the same patches on one rank")
