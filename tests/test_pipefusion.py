"""PipeFusion on real gloo gangs: stages and patches against one process (Flux, SD3,
PixArt-Sigma, PixArt-alpha and HunyuanDiT), and schedulers stepped a patch at a time.

- With every step a warm-up step (whole image, in sync) a PipeFusion gang computes exactly
  what the plain single process does.
- With stale keys and values (patches after the first step) the gang equals the same
  patch schedule run on one rank (`sample_pipefusion` without stages): the stages only
  move where each block runs, not what it computes.
- A scheduler's step, multistep solvers' history included, is per token: patches stepped
  alone through their own copies equal the whole image stepped.
Tolerance as the other parallel tests: max |gang - reference| <= 1e-4 * max |reference|
(float32 on CPU).
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from ditmesh.common.errors import InvalidArgument
from ditmesh.common.models import resolve_model
from ditmesh.denoiser.parallel.mesh import (
    ParallelConfig,
    ParallelConfigError,
    RankGroups,
    build_mesh,
    single_process_mesh,
)
from ditmesh.denoiser.parallel.pipefusion import (
    attach_pipefusion,
    check_speed,
    patch_bounds,
    sample_pipefusion,
)
from ditmesh.denoiser.parallel.pipefusion_schedule import (
    PatchSchedulers,
    check_patchable,
    history_of,
)
from ditmesh.denoiser.parallel.pipefusion_skips import StandIn
from ditmesh.denoiser.parallel.sequence import attach
from ditmesh.denoiser.runner import load_adapter
from ditmesh.denoiser.sampler import sample

from .helpers import (
    REL_TOL,
    UpProcess,
    decode_events,
    flux_jobs,
    join_gloo,
    max_diff,
    pixart_alpha_with_micro_conditions,
    pixart_jobs,
    relative_error,
    single,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("flux", tmp_path_factory.mktemp("flux") / "model"))


@pytest.fixture(scope="module")
def jobs(model_dir):
    return flux_jobs(model_dir)


def _no_cfg(jobs):
    return [j for j in jobs if j.true_cfg_scale <= 1.0]


def one_rank(model_dir: str, jobs, **degrees) -> list[torch.Tensor]:
    """The patch schedule of `degrees` on one rank, all blocks here."""
    adapter = load_adapter(resolve_model(model_dir), torch.device("cpu"), "float32")
    base = single_process_mesh()
    mesh = RankGroups(
        config=ParallelConfig(**degrees), rank=0, coords=base.coords, groups=base.groups
    )
    out = [sample_pipefusion(adapter, job, mesh) for job in jobs]
    # Nothing of a request stays behind: the kept keys and values are dropped after it.
    procs = adapter.pipefusion_stage.processors
    assert procs and all(not p.kv for p in procs)
    return out


def _blocks(adapter) -> int:
    """The blocks the adapter's transformer runs (another stage's stand-ins not counted)."""
    t = adapter.transformer
    lists = [getattr(t, name) for name in adapter.pipefusion_plan.block_lists]
    return sum(not isinstance(blk, StandIn) for blocks in lists for blk in blocks)


def _rank_main(rank, world, port, model_dir, jobs, layouts, out_path):
    join_gloo(rank, world, port)
    try:
        out = {}
        for name, (degrees, picked) in layouts.items():
            cfg = ParallelConfig(**degrees)
            model = resolve_model(model_dir)
            adapter = load_adapter(model, torch.device("cpu"), "float32")
            cfg.check_model(heads=adapter.heads, family=model.family.name)
            mesh = build_mesh(cfg, rank, world, timeout=timedelta(seconds=60))
            blocks = _blocks(adapter)
            attached = attach(adapter.transformer, adapter.plan, mesh)
            stage = attach_pipefusion(adapter, mesh, attached.sp if attached else None)
            adapter.pipefusion_stage = stage
            kept = _blocks(adapter)
            # Each stage keeps only its own consecutive blocks.
            assert kept == stage.blocks[1] - stage.blocks[0] < blocks, (kept, blocks)
            out[name] = [sample(adapter, jobs[i], mesh) for i in picked]
        if rank == 0:
            torch.save(out, out_path)
    finally:
        dist.destroy_process_group()


def spawn(model_dir, jobs, world, layouts, tmp_path):
    from ditmesh.denoiser.gang import free_port

    out_path = str(tmp_path / f"pf{world}.pt")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp.spawn(
        _rank_main,
        args=(world, free_port(), model_dir, jobs, layouts, out_path),
        nprocs=world,
        join=True,
    )
    return torch.load(out_path)


def _close(got, want, what):
    assert got.shape == want.shape, what
    err = relative_error(got, want)
    assert err <= REL_TOL, f"{what}: relative error {err:.2e}"


def _all_close(got, want, what, jobs=None):
    """`_close` for each job's latents; `jobs` names them (default: their positions)."""
    names = jobs if jobs is not None else range(len(want))
    for j, g, w in zip(names, got, want, strict=True):
        _close(g, w, f"{what}, job {j}")


def test_a_stage_loads_on_the_host_and_moves_only_what_it_keeps(model_dir):
    """`on_host`: the weights wait on the host until `to_device`, so a PipeFusion stage drops
    the other stages' blocks before anything reaches the device (the gang does this; the
    "meta" device stands in for a GPU here)."""
    model = resolve_model(model_dir)
    adapter = load_adapter(model, torch.device("meta"), "float32", on_host=True)
    t = adapter.transformer
    assert {p.device.type for p in t.parameters()} == {"cpu"}
    assert adapter.device.type == "meta" and adapter.weights_on.type == "cpu"
    t.transformer_blocks = torch.nn.ModuleList([t.transformer_blocks[0]])
    t.single_transformer_blocks = torch.nn.ModuleList()
    adapter.to_device()
    assert {p.device.type for p in t.parameters()} == {"meta"}
    assert adapter.weights_on == adapter.device
    # Without it the weights go straight to the device.
    direct = load_adapter(model, torch.device("meta"), "float32").transformer
    assert {p.device.type for p in direct.parameters()} == {"meta"}


def test_patch_bounds_cover_the_tokens_in_order():
    assert patch_bounds(15, 4) == [(0, 4), (4, 8), (8, 12), (12, 15)]
    assert patch_bounds(5, 2) == [(0, 3), (3, 5)]


@pytest.mark.slow  # seconds of sampling
def test_stale_patches_differ_from_exact_but_stay_close(model_dir, jobs):
    """The staleness is real (else the gang tests below would prove nothing about it)."""
    picked = _no_cfg(jobs)[:1]
    exact = single(model_dir, picked)[0]
    whole = one_rank(model_dir, picked, patches=3, pipefusion_warmup=99)[0]
    stale = one_rank(model_dir, picked, patches=3, pipefusion_warmup=1)[0]
    _close(whole, exact, "whole-image steps on one rank vs plain sampling")
    err = relative_error(stale, exact)
    # 3 steps of a tiny random model: about 1.5e-3 here (the tolerance is loose on purpose:
    # it asserts only that stale keys change the result, and not wildly).
    assert 1e-6 < err < 0.05, err


@pytest.mark.slow  # seconds of sampling
def test_one_patch_a_step_is_exact(model_dir, jobs):
    """One patch is the whole image through the patch path (every kept key and value
    rewritten, the scheduler stepped through the patch's own copy of it): what plain
    sampling computes, with and without CFG."""
    picked = jobs[:3]
    got = one_rank(model_dir, picked, patches=1, pipefusion_warmup=1)
    _all_close(got, single(model_dir, picked), "one patch a step vs plain sampling")


@pytest.mark.slow
def test_two_stages(model_dir, jobs, tmp_path):
    no_cfg = [i for i, j in enumerate(jobs) if j.true_cfg_scale <= 1.0]
    layouts = {
        "pf2-exact": (dict(pipefusion=2, pipefusion_warmup=99), no_cfg),
        "pf2": (dict(pipefusion=2, pipefusion_warmup=1), no_cfg),
        "pf2-p3": (dict(pipefusion=2, patches=3, pipefusion_warmup=2), no_cfg),
    }
    got = spawn(model_dir, jobs, 2, layouts, tmp_path)
    picked = [jobs[i] for i in no_cfg]
    _all_close(
        got["pf2-exact"], single(model_dir, picked), "pf2 with every step whole vs single process"
    )
    for name, kw in (("pf2", dict(patches=2)), ("pf2-p3", dict(patches=3, pipefusion_warmup=2))):
        _all_close(
            got[name], one_rank(model_dir, picked, **kw), f"{name} vs the same patches on one rank"
        )


@pytest.mark.slow
def test_four_stages_and_cfg_and_dp(model_dir, jobs, tmp_path):
    no_cfg = [i for i, j in enumerate(jobs) if j.true_cfg_scale <= 1.0]
    with_cfg = [i for i, j in enumerate(jobs) if j.true_cfg_scale > 1.0]
    layouts = {
        "pf4": (dict(pipefusion=4), no_cfg),
        "cfg2pf2": (dict(cfg=2, pipefusion=2), with_cfg),
        "dp2pf2": (dict(dp=2, pipefusion=2), with_cfg),
        "pf2u2": (dict(pipefusion=2, ulysses=2), list(range(len(jobs)))),
    }
    got = spawn(model_dir, jobs, 4, layouts, tmp_path)
    checks = (
        ("pf4", no_cfg, dict(patches=4)),
        # Both CFG branches on one rank (each with its own keys and values) is the reference
        # for the branches split over the cfg halves and for images split over dp replicas.
        ("cfg2pf2", with_cfg, dict(patches=2)),
        ("dp2pf2", with_cfg, dict(patches=2)),
        # Ulysses inside each stage: every job (odd token counts, padding, CFG).
        ("pf2u2", list(range(len(jobs))), dict(patches=2)),
    )
    for name, picked, kw in checks:
        want = one_rank(model_dir, [jobs[i] for i in picked], **kw)
        _all_close(got[name], want, f"{name} vs the same patches on one rank", picked)


@pytest.mark.slow
def test_cfg_x_pipefusion_x_ulysses_on_eight_ranks(model_dir, jobs, tmp_path):
    """The hybrid of the 8-GPU runs (cfg 2 x pipefusion 2 x ulysses 2), gloo on 8 processes."""
    picked = [0, 1, 2]  # true CFG (two sizes, several images) and no CFG
    got = spawn(
        model_dir, jobs, 8, {"cfg2pf2u2": (dict(cfg=2, pipefusion=2, ulysses=2), picked)}, tmp_path
    )
    want = one_rank(model_dir, [jobs[i] for i in picked], patches=2)
    _all_close(got["cfg2pf2u2"], want, "cfg2 x pf2 x u2 vs the same patches on one rank", picked)


def test_pipefusion_refuses_what_it_cannot_run():
    with pytest.raises(
        ParallelConfigError, match="models only so far; this model is no-such-family"
    ):
        ParallelConfig(pipefusion=2).check_model(heads=4, family="no-such-family")
    for family in ("flux", "sd3", "pixart-sigma", "pixart-alpha", "hunyuandit"):
        ParallelConfig(pipefusion=2).check_model(heads=4, family=family)
    with pytest.raises(ParallelConfigError, match="leave out --compile and --cuda-graphs"):
        check_speed(True, False)
    with pytest.raises(
        ParallelConfigError, match="--pipefusion 5 is more stages than the model's 4"
    ):
        ParallelConfig(pipefusion=5).check_model(heads=4, family="flux", blocks=4)


def test_too_many_stages_fail_before_any_process_starts(model_dir):
    """The leader reads the block count from the model's config, so the gang never starts."""
    from ditmesh.denoiser.gang import GangRunner

    assert resolve_model(model_dir).blocks == 4  # the tiny Flux: 2 double + 2 single
    with pytest.raises(ParallelConfigError, match="more stages than the model's 4 blocks"):
        GangRunner.of(model_dir, ParallelConfig(pipefusion=5), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("sd3", tmp_path_factory.mktemp("sd3") / "model"))


@pytest.mark.slow
def test_sd3_stages_and_ulysses_and_cfg(sd3_dir, tmp_path):
    """SD3: patches are bands of latent rows (token rows); CFG is on in jobs a and b."""
    from .helpers import sd3_jobs

    jobs = sd3_jobs(sd3_dir)
    every = list(range(len(jobs)))
    got = spawn(
        sd3_dir,
        jobs,
        4,
        {
            "pf2u2": (dict(pipefusion=2, ulysses=2), every),
            "cfg2pf2": (dict(cfg=2, pipefusion=2), every),
        },
        tmp_path,
    )
    want = one_rank(sd3_dir, jobs, patches=2)
    for name in ("pf2u2", "cfg2pf2"):
        _all_close(got[name], want, f"SD3 {name} vs the same patches on one rank")


@pytest.mark.slow
def test_sd3_two_stages_whole_and_stale(sd3_dir, tmp_path):
    from .helpers import sd3_jobs

    jobs = sd3_jobs(sd3_dir)
    every = list(range(len(jobs)))
    got = spawn(
        sd3_dir,
        jobs,
        2,
        {
            "pf2-exact": (dict(pipefusion=2, pipefusion_warmup=99), every),
            "pf2-p3": (dict(pipefusion=2, patches=3), every),
        },
        tmp_path,
    )
    _all_close(got["pf2-exact"], single(sd3_dir, jobs), "SD3 pf2 every step whole vs single")
    stale = one_rank(sd3_dir, jobs, patches=3)
    _all_close(got["pf2-p3"], stale, "SD3 pf2 3 patches vs the same patches on one rank")
    assert relative_error(stale[0], single(sd3_dir, jobs[:1])[0]) > 1e-6  # really stale


@pytest.mark.slow
def test_sd35_second_attention(tmp_path_factory, tmp_path):
    """SD3.5-medium layout: each block's image-only `attn2` keeps its own keys and values."""
    from ditmesh.tiny import make_tiny

    from .helpers import sd3_jobs, sd35_medium_style

    model_dir = str(sd35_medium_style(make_tiny("sd3", tmp_path_factory.mktemp("sd35") / "m")))
    jobs = sd3_jobs(model_dir)[:2]
    every = list(range(len(jobs)))
    got = spawn(
        model_dir,
        jobs,
        4,
        {
            "cfg2pf2-exact": (dict(cfg=2, pipefusion=2, pipefusion_warmup=99), every),
            "pf2u2": (dict(pipefusion=2, ulysses=2), every),
        },
        tmp_path,
    )
    _all_close(got["cfg2pf2-exact"], single(model_dir, jobs), "SD3.5 cfg2 x pf2 whole vs single")
    _all_close(got["pf2u2"], one_rank(model_dir, jobs, patches=2), "SD3.5 pf2 x u2 vs one rank")


# ------------------------------------------------------------ Schedulers stepped a patch at a time


def _model_output(x: torch.Tensor, i: int) -> torch.Tensor:
    """A stand-in for the transformer: per token, different at each step."""
    return torch.sin(3 * x + i) + 0.1 * i


# Schedulers the families use (DPM-Solver++ for PixArt, flow-matching Euler for Flux and
# SD3) and other multistep ones, whose history is cut by patch.
PATCH_STEPPED = {
    "dpm++2": ("DPMSolverMultistepScheduler", {}),
    "dpm++3": ("DPMSolverMultistepScheduler", dict(solver_order=3, lower_order_final=False)),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


def _stepped(cls_name: str, config: dict, bands: list[tuple] | None, warm: int = 2):
    """Six steps of `_model_output` on [2, 4, 6, 5] latents: the whole image every step
    (`bands` None), or `warm` whole steps then each band through its own scheduler copy."""
    import diffusers

    s = getattr(diffusers, cls_name)(num_train_timesteps=1000, **config)
    s.set_timesteps(6)
    x = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    copies = None
    for i, t in enumerate(s.timesteps):
        if bands is None or i < warm:
            x = s.step(_model_output(x, i), t, x, return_dict=False)[0]
            continue
        if copies is None:
            copies = PatchSchedulers(s, x, bands)
            assert len(copies) == len(bands)
        for p, rows in enumerate(bands):
            sample = x[rows].clone()
            x[rows] = copies[p].step(_model_output(sample, i), t, sample, return_dict=False)[0]
    return x, copies


@pytest.mark.parametrize("name", PATCH_STEPPED)
def test_patches_stepped_alone_equal_the_whole_image_stepped(name):
    """With the same model outputs, three bands of latent rows, each stepped through its
    own copy of the scheduler (with its rows of the history), give what stepping the
    whole image gives: a step, a multistep solver's included, is per token."""
    cls_name, config = PATCH_STEPPED[name]
    bands = [(slice(None), slice(None), slice(a, z)) for a, z in patch_bounds(6, 3)]
    whole, _ = _stepped(cls_name, config, None)
    patched, copies = _stepped(cls_name, config, bands)
    err = relative_error(patched, whole)
    assert err <= 1e-6, f"{name}: relative error {err:.2e}"
    if name.startswith(("dpm", "unipc", "deis")):
        # The history is real and each copy holds its band's rows of it.
        for p, rows in enumerate(bands):
            kept = history_of(copies[p], whole[rows].shape)
            assert kept and all(h.shape == whole[rows].shape for h in kept)


def test_a_stochastic_scheduler_steps_through_its_patch_copy():
    """DDPM (HunyuanDiT's) keeps no history; one patch (the whole image) through its copy
    is the whole image stepped, the generator's draws included."""
    import diffusers

    def run(patched: bool) -> torch.Tensor:
        s = diffusers.DDPMScheduler(num_train_timesteps=1000)
        s.set_timesteps(4)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        step = PatchSchedulers(s, x, [(slice(None),)])[0] if patched else s
        for i, t in enumerate(s.timesteps):
            x = step.step(_model_output(x, i), t, x, generator=g, return_dict=False)[0]
        return x

    assert torch.equal(run(True), run(False))


def test_schedulers_that_cannot_step_a_patch_alone_are_refused():
    import diffusers

    like = torch.zeros(1, 4, 8, 8)

    def made(cls_name: str, **config):
        s = getattr(diffusers, cls_name)(num_train_timesteps=1000, **config)
        s.set_timesteps(4)
        return s

    s = made("DPMSolverMultistepScheduler", thresholding=True)
    with pytest.raises(InvalidArgument, match="dynamic thresholding takes a quantile over"):
        check_patchable(s, s.timesteps, like)
    s = made("EulerDiscreteScheduler")
    with pytest.raises(InvalidArgument, match="scales that input by its step index"):
        check_patchable(s, s.timesteps, like)
    for ok in ("DPMSolverMultistepScheduler", "DDPMScheduler", "FlowMatchEulerDiscreteScheduler"):
        s = made(ok)
        check_patchable(s, s.timesteps, like)


# ------------------------------------------------------------ PixArt-Sigma and PixArt-alpha

# Stale patches' error grows with the steps: at 6 it is several times the tolerance (3
# steps of the tiny PixArt stay under it), so the stale comparisons below can fail.
PIXART_STEPS = 6


@pytest.fixture(scope="module", params=["pixart-sigma", "pixart-alpha"])
def pixart_dir(request, tmp_path_factory) -> str:
    """Tiny PixArt-Sigma, and PixArt-alpha with its 1024-px micro-conditions."""
    from ditmesh.tiny import make_tiny

    folder = make_tiny(request.param, tmp_path_factory.mktemp(request.param) / "model")
    if request.param == "pixart-alpha":
        folder = pixart_alpha_with_micro_conditions(folder)
    return str(folder)


@pytest.mark.slow  # seconds of sampling
def test_pixart_one_patch_a_step_is_exact_and_stale_patches_are_not(pixart_dir):
    jobs = pixart_jobs(pixart_dir, steps=PIXART_STEPS)
    exact = single(pixart_dir, jobs)
    _all_close(one_rank(pixart_dir, jobs, patches=1), exact, "PixArt one patch vs plain")
    _all_close(
        one_rank(pixart_dir, jobs, patches=3, pipefusion_warmup=99),
        exact,
        "PixArt every step whole on one rank vs plain",
    )
    for j, (got, want) in enumerate(zip(one_rank(pixart_dir, jobs, patches=2), exact, strict=True)):
        err = relative_error(got, want)
        assert REL_TOL < err < 0.05, f"job {j}: stale patches {err:.2e} from exact"


@pytest.mark.slow
def test_pixart_two_stages_whole_and_stale(pixart_dir, tmp_path):
    jobs = pixart_jobs(pixart_dir, steps=PIXART_STEPS)
    every = list(range(len(jobs)))
    got = spawn(
        pixart_dir,
        jobs,
        2,
        {
            "pf2-exact": (dict(pipefusion=2, pipefusion_warmup=99), every),
            "pf2": (dict(pipefusion=2), every),
            "pf2-p3": (dict(pipefusion=2, patches=3, pipefusion_warmup=2), every),
        },
        tmp_path,
    )
    _all_close(got["pf2-exact"], single(pixart_dir, jobs), "PixArt pf2 every step whole vs single")
    for name, kw in (("pf2", dict(patches=2)), ("pf2-p3", dict(patches=3, pipefusion_warmup=2))):
        want = one_rank(pixart_dir, jobs, **kw)
        _all_close(got[name], want, f"PixArt {name} vs the same patches on one rank")


@pytest.mark.slow
def test_pixart_stages_with_cfg_ulysses_and_dp(pixart_dir, tmp_path):
    """cfg2 x pf2 and pf2 x u2, every step whole (against plain sampling) and with stale
    patches (against the same patches on one rank); dp2 x pf2 splits the images."""
    jobs = pixart_jobs(pixart_dir, steps=PIXART_STEPS)
    every = list(range(len(jobs)))
    got = spawn(
        pixart_dir,
        jobs,
        4,
        {
            "cfg2pf2-exact": (dict(cfg=2, pipefusion=2, pipefusion_warmup=99), every),
            "pf2u2-exact": (dict(pipefusion=2, ulysses=2, pipefusion_warmup=99), every),
            "cfg2pf2": (dict(cfg=2, pipefusion=2), every),
            "pf2u2": (dict(pipefusion=2, ulysses=2), every),
            "dp2pf2": (dict(dp=2, pipefusion=2), every),
        },
        tmp_path,
    )
    exact = single(pixart_dir, jobs)
    for name in ("cfg2pf2-exact", "pf2u2-exact"):
        _all_close(got[name], exact, f"PixArt {name} vs single")
    stale = one_rank(pixart_dir, jobs, patches=2)
    for name in ("cfg2pf2", "pf2u2", "dp2pf2"):
        _all_close(got[name], stale, f"PixArt {name} vs the same patches on one rank")


@pytest.mark.slow
def test_pixart_up_with_two_stages_matches_diffusers(tmp_path_factory):
    """`ditmesh up --pipefusion 2` on a tiny PixArt-Sigma, every step whole: the image plain
    diffusers makes (48x80: 3 token rows over 2 stages; CFG with a negative prompt)."""
    import grpc
    from diffusers import PixArtSigmaPipeline

    from ditmesh.tiny import make_tiny
    from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

    folder = str(make_tiny("pixart-sigma", tmp_path_factory.mktemp("pixart-up") / "model"))
    kw = dict(height=48, width=80, steps=3, seed=9)
    mesh = UpProcess(folder, "--pipefusion", "2", "--pipefusion-warmup", "3")
    try:
        with grpc.insecure_channel(mesh.address) as ch:
            req = gateway_pb2.GenerateRequest(
                prompt="a castle", negative_prompt="fog", guidance=4.5, **kw
            )
            events = list(gateway_pb2_grpc.GatewayStub(ch).Generate(req, timeout=240))
        images, kinds = decode_events(events)
    finally:
        assert mesh.stop() == 0
    assert kinds.count("step") == 3 and len(images) == 1
    pipe = PixArtSigmaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        "a castle",
        negative_prompt="fog",
        height=kw["height"],
        width=kw["width"],
        num_inference_steps=kw["steps"],
        guidance_scale=4.5,
        generator=torch.Generator().manual_seed(kw["seed"]),
        use_resolution_binning=False,
        clean_caption=False,
    ).images[0]
    assert max_diff(images[0], np.asarray(ref.convert("RGB"))) <= 1


# ------------------------------------------------------------ HunyuanDiT (v1.2 and v1.1)


@pytest.fixture(scope="module", params=["v1.2", "v1.1"])
def hunyuan_dir(request, tmp_path_factory) -> str:
    """Tiny HunyuanDiT (6 blocks, long skips 0 -> 5 and 1 -> 4), and v1.1 with the image
    meta size and style embedded."""
    from ditmesh.tiny import make_tiny

    from .helpers import hunyuandit_v11_style

    folder = make_tiny("hunyuandit", tmp_path_factory.mktemp(f"hunyuandit-{request.param}") / "m")
    if request.param == "v1.1":
        folder = hunyuandit_v11_style(folder)
    return str(folder)


def test_a_hunyuandit_patch_draws_ddpm_noise_from_the_one_generator():
    """DDPM's per-step noise comes from the request's generator (SeededSteps); the patches'
    copies share it, so patches stepped in order draw what the request's scheduler would
    draw for the same patches in the same order (a copied generator would repeat draws)."""
    import diffusers

    from ditmesh.denoiser.hunyuan import SeededSteps

    def steps(per_patch: bool) -> torch.Tensor:
        s = diffusers.DDPMScheduler(num_train_timesteps=1000)
        s.set_timesteps(4)
        seeded = SeededSteps(s, torch.Generator().manual_seed(3), 2)
        x = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
        bands = [(slice(None), slice(None), slice(a, z)) for a, z in patch_bounds(6, 3)]
        copies = PatchSchedulers(seeded, x, bands) if per_patch else None
        for i, t in enumerate(s.timesteps):
            for p, rows in enumerate(bands):
                step = copies[p] if per_patch else seeded
                sample = x[rows].clone()
                x[rows] = step.step(_model_output(sample, i), t, sample)[0]
        if per_patch:
            assert all(c.generator is seeded.generator for c in copies.copies)
        return x

    assert torch.equal(steps(True), steps(False))


@pytest.mark.slow  # seconds of sampling
def test_hunyuan_one_patch_a_step_is_exact_and_stale_patches_are_not(hunyuan_dir):
    from .test_parallel_hunyuan import hunyuan_jobs

    jobs = hunyuan_jobs(hunyuan_dir)
    exact = single(hunyuan_dir, jobs)
    _all_close(one_rank(hunyuan_dir, jobs, patches=1), exact, "HunyuanDiT one patch vs plain")
    _all_close(
        one_rank(hunyuan_dir, jobs, patches=3, pipefusion_warmup=99),
        exact,
        "HunyuanDiT every step whole on one rank vs plain",
    )
    # Stale keys and values, and DDPM's noise drawn patch by patch (the same draws in
    # another arrangement): not the plain image.
    for j, (got, want) in enumerate(
        zip(one_rank(hunyuan_dir, jobs, patches=2), exact, strict=True)
    ):
        assert relative_error(got, want) > REL_TOL, f"job {j}"


@pytest.mark.slow
def test_hunyuan_two_stages_whole_and_stale(hunyuan_dir, tmp_path):
    """Two stages of three blocks: both long skips cross the boundary with each patch."""
    from .test_parallel_hunyuan import hunyuan_jobs

    jobs = hunyuan_jobs(hunyuan_dir)
    every = list(range(len(jobs)))
    got = spawn(
        hunyuan_dir,
        jobs,
        2,
        {
            "pf2-exact": (dict(pipefusion=2, pipefusion_warmup=99), every),
            "pf2-p3": (dict(pipefusion=2, patches=3), every),
        },
        tmp_path,
    )
    _all_close(got["pf2-exact"], single(hunyuan_dir, jobs), "HunyuanDiT pf2 every step whole")
    want = one_rank(hunyuan_dir, jobs, patches=3)
    _all_close(got["pf2-p3"], want, "HunyuanDiT pf2 3 patches vs the same patches on one rank")


@pytest.mark.slow
def test_hunyuan_stages_with_cfg_ulysses_dp_and_relayed_skips(hunyuan_dir, tmp_path):
    """cfg2 x pf2 and pf2 x u2, every step whole (against plain sampling) and with stale
    patches (against the same patches on one rank); dp2 x pf2 splits the images (DDPM's
    noise for the whole batch); pf4 (blocks 0-1, 2-3, 4, 5) relays skip 0 through two
    stages and skip 1 through one."""
    from .test_parallel_hunyuan import hunyuan_jobs

    jobs = hunyuan_jobs(hunyuan_dir)
    every = list(range(len(jobs)))
    got = spawn(
        hunyuan_dir,
        jobs,
        4,
        {
            "cfg2pf2-exact": (dict(cfg=2, pipefusion=2, pipefusion_warmup=99), every),
            "pf2u2-exact": (dict(pipefusion=2, ulysses=2, pipefusion_warmup=99), every),
            "cfg2pf2": (dict(cfg=2, pipefusion=2), every),
            "pf2u2": (dict(pipefusion=2, ulysses=2), every),
            "dp2pf2": (dict(dp=2, pipefusion=2), every),
            "pf4": (dict(pipefusion=4), every),
        },
        tmp_path,
    )
    exact = single(hunyuan_dir, jobs)
    for name in ("cfg2pf2-exact", "pf2u2-exact"):
        _all_close(got[name], exact, f"HunyuanDiT {name} vs single")
    stale = one_rank(hunyuan_dir, jobs, patches=2)
    for name in ("cfg2pf2", "pf2u2", "dp2pf2"):
        _all_close(got[name], stale, f"HunyuanDiT {name} vs the same patches on one rank")
    want = one_rank(hunyuan_dir, jobs, patches=4)
    _all_close(got["pf4"], want, "HunyuanDiT pf4 vs the same patches on one rank")
