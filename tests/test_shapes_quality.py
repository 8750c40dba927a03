"""The yardstick on the trained shapes model (models/shapes, issue 19), on CPU.

A handful of held-out prompts at a small step count, scored by `ditmesh.eval` through
bench/quality.py's own pieces (encoder stage, denoiser runner, VAE decoder):

- the model sampled exactly on one process scores at least FLOOR, and the same model
  with its transformer's weights shuffled or zeroed falls far below it (so the floor
  tells a working model from a broken one);
- a gloo gang of an exact layout (u2, the denoiser's own GangRunner) scores what one
  process scores, its latents equal up to float rounding;
- PipeFusion with one warm-up step (a pf2 gang) and with none (the same two-patch
  schedule on one process, which test_pipefusion_warmup0.py shows a gang computes
  exactly) stays within its stated drop;
- the approximate speed-ups of issue 20 stay within theirs: FP8 GEMMs (the CPU
  emulation), step caching at the threshold docs/shapes.md proposes (which must also
  skip steps), the two together (docs/performance.md's fastest row), and DiTFastAttn
  with a plan calibrated on training captions (which must also save attention).

The model gets every attribute right at these settings, so each approximate method's
drop is 0 today; a drop bound alone would let its latents drift far before one
attribute flips, so each also pins its latents' relative L2 error against exact
sampling (about 3x what was measured: float differences across CPUs and torch versions
stay well inside, a broken method does not). The 50-prompt, 28-step figures are in
docs/shapes.md (bench/results-2026-11-29-shapes-quality/).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

from .helpers import one_cpu_thread

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "shapes"
PROMPTS = tuple(range(0, 50, 8))
"""Held-out prompts 0, 8, .., 48 (each with its bench seed, 1000 + index): one, two and
three shapes, 74 attribute checks (one check is 1.35 points)."""
SEEDS = [1000 + i for i in PROMPTS]
STEPS = 12
"""Measured: one process scores 1.000 here as at 28 steps (the model's default)."""

FLOOR = 0.90
"""One process, exact: measured 1.000. Shuffled weights: 0.338, zeroed: 0.324."""
EXACT_REL_L2 = 1e-4
"""An exact gang layout's latents against one process: float rounding only (u2: 2e-7)."""
PF_DROP = 5.0
"""PipeFusion, two patches: measured drop 0.0 points with one warm-up step and with none."""
PF_REL_L2 = 0.06
"""Measured 0.016 with one warm-up step, 0.022 with none."""
FP8_DROP = 5.0
"""FP8 GEMMs (CPU emulation, per-row scales): measured drop 0.0 points."""
FP8_REL_L2 = 0.075
"""Measured 0.024."""
CACHE_THRESHOLD = 0.1
"""The threshold docs/shapes.md proposes for a drop of at most 2 points (28 steps)."""
CACHE_DROP = 5.0
"""Step caching at CACHE_THRESHOLD: measured drop 0.0 points, 18% of the steps skipped."""
CACHE_REL_L2 = 0.02
"""Measured 0.0055."""
COMBINED_DROP = 5.0
"""FP8 and step caching at CACHE_THRESHOLD together: measured drop 0.0 points."""
COMBINED_REL_L2 = 0.075
"""Measured 0.025 (14% of the steps skipped at 12 steps)."""
FA_THRESHOLD = 0.1
"""DiTFastAttn's calibration threshold, the plan docs/performance.md times."""
FA_DROP = 5.0
"""DiTFastAttn at FA_THRESHOLD: measured drop 0.0 points."""
FA_REL_L2 = 0.1
"""Measured 0.033, with 0.83 of the attention computed (a 2-caption plan at 12 steps)."""


def _load_bench():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread a process, the gang's workers too (they read OMP_NUM_THREADS at
    start): on a shared 2-core machine two threads a process wait on each other and the
    test takes minutes instead of seconds."""
    with one_cpu_thread():
        yield


@pytest.fixture(scope="module")
def setup(one_thread):
    """The bench module, the model, the prompts' conditioning, the VAE decoder, and the
    one-process reference (summary, latents)."""
    from ditmesh.common.models import resolve_model
    from ditmesh.shapes import HELD_OUT
    from ditmesh.vae.decoder import VaeDecoder

    assert (MODEL / "model_index.json").is_file(), (
        f"{MODEL} is the committed shapes model (issue 19); train it with tools/train_shapes.py"
    )
    bench = _load_bench()
    model = resolve_model(str(MODEL))
    cpu = torch.device("cpu")
    prompts = [HELD_OUT[i] for i in PROMPTS]
    conds = bench.encode(model, cpu, torch.float32, prompts)
    decoder = VaeDecoder(model, cpu, torch.float32)
    ctx = dict(bench=bench, model=model, prompts=prompts, conds=conds, decoder=decoder)
    ctx["reference"] = _score(ctx, "single")[:2]
    return ctx


def _score(ctx, name: str, runner=None):
    """(summary, latents, skipped fraction) of layout `name` on the prompts."""
    bench = ctx["bench"]
    layout = bench.parse_layout(name)
    own = runner is None
    runner = runner or bench.make_runner(str(MODEL), layout, "cpu", "float32")
    try:
        latents, skipped = bench.run_layout(
            runner, layout, ctx["model"], ctx["conds"], steps=STEPS, seeds=SEEDS
        )
    finally:
        if own:
            runner.close()
    return bench.score_latents(ctx["decoder"], latents, ctx["prompts"]), latents, skipped


def _job(model, i: int, cond: dict, seed: int):
    """The job bench/quality.py's run_layout makes for prompt i (128x128, STEPS steps)."""
    from ditmesh.denoiser.job import DenoiseJob

    return DenoiseJob(
        request_id=f"q{i}",
        height=128,
        width=128,
        steps=STEPS,
        guidance=model.default_guidance,
        true_cfg_scale=1.0,
        seed=seed,
        num_images=1,
        cond=cond,
    )


def _against_exact(ctx, summary, latents) -> dict[str, float]:
    return ctx["bench"].compare(summary, latents, *ctx["reference"])


def test_the_model_scores_above_the_floor(setup):
    summary, _ = setup["reference"]
    assert summary["overall"] >= FLOOR, summary


@pytest.mark.parametrize("damage", ["shuffled", "zeroed"])
def test_a_broken_model_falls_below_the_floor(setup, damage):
    """The same model with its transformer's weights shuffled within each tensor (same
    values, no structure) or zeroed: what a bad checkpoint or a bad load would draw."""
    from ditmesh.common.models import resolve_model
    from ditmesh.denoiser.runner import LocalRunner

    runner = LocalRunner(resolve_model(str(MODEL)), "cpu", "float32")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in runner.adapter.transformer.parameters():
            if damage == "zeroed":
                p.zero_()
            else:
                p.copy_(p.flatten()[torch.randperm(p.numel(), generator=g)].view_as(p))
    summary, _, _ = _score(setup, "single", runner)
    assert summary["overall"] < FLOOR, summary


def test_fp8_drop_is_bounded(setup):
    summary, latents, _ = _score(setup, "single+fp8")
    got = _against_exact(setup, summary, latents)
    assert got["drop_points"] <= FP8_DROP, got
    assert 0 < got["latent_rel_l2"] <= FP8_REL_L2, got


def test_step_caching_skips_steps_within_its_drop(setup):
    summary, latents, skipped = _score(setup, f"single+cache{CACHE_THRESHOLD}")
    got = _against_exact(setup, summary, latents)
    assert skipped > 0, "step caching skipped no step at the proposed threshold"
    assert got["drop_points"] <= CACHE_DROP, got
    assert got["latent_rel_l2"] <= CACHE_REL_L2, got


def test_fp8_with_step_caching_drop_is_bounded(setup):
    summary, latents, skipped = _score(setup, f"single+fp8+cache{CACHE_THRESHOLD}")
    got = _against_exact(setup, summary, latents)
    assert skipped > 0, "step caching skipped no step under FP8"
    assert got["drop_points"] <= COMBINED_DROP, got
    assert 0 < got["latent_rel_l2"] <= COMBINED_REL_L2, got


def test_fastattn_drop_is_bounded(setup):
    """A plan calibrated on two training captions (never the held-out prompts), as
    tools/fastattn_quality.py and `ditmesh fastattn-calibrate` make it."""
    import random

    from ditmesh.denoiser import fastattn
    from ditmesh.denoiser.fastattn_calibrate import calibrate
    from ditmesh.denoiser.parallel.mesh import single_process_mesh
    from ditmesh.denoiser.runner import load_adapter
    from ditmesh.denoiser.sampler import sample
    from ditmesh.shapes import caption, training_scene

    model, cpu = setup["model"], torch.device("cpu")
    rng = random.Random(12345)
    captions = [caption(training_scene(rng)) for _ in range(2)]
    cal_conds = setup["bench"].encode(model, cpu, torch.float32, captions)

    adapter = load_adapter(model, cpu, "float32")
    cal_jobs = [_job(model, i, c, 500 + i) for i, c in enumerate(cal_conds)]
    plan = calibrate(adapter, cal_jobs, FA_THRESHOLD)
    state = fastattn.FastAttnState(plan)
    fastattn.install(adapter, state)
    latents, computed = [], []
    try:
        for i, cond in enumerate(setup["conds"]):
            latents.append(sample(adapter, _job(model, i, cond, SEEDS[i]), single_process_mesh()))
            computed.append(state.fraction())
    finally:
        fastattn.uninstall(adapter)
    summary = setup["bench"].score_latents(setup["decoder"], latents, setup["prompts"])
    got = _against_exact(setup, summary, latents)
    assert max(computed) < 1.0, f"the plan computed all attention: {computed}"
    assert got["drop_points"] <= FA_DROP, got
    assert 0 < got["latent_rel_l2"] <= FA_REL_L2, got


def test_pipefusion_without_warmup_drop_is_bounded(setup):
    """Two patches, no whole-image step, on one process (the gang's computation)."""
    from ditmesh.denoiser.parallel.mesh import ParallelConfig, RankGroups, single_process_mesh
    from ditmesh.denoiser.parallel.pipefusion import sample_pipefusion
    from ditmesh.denoiser.runner import load_adapter

    model = setup["model"]
    adapter = load_adapter(model, torch.device("cpu"), "float32")
    one = single_process_mesh()
    config = ParallelConfig(patches=2, pipefusion_warmup=0)
    mesh = RankGroups(config=config, rank=0, coords=one.coords, groups=one.groups)
    latents = []
    for i, cond in enumerate(setup["conds"]):
        latents.append(sample_pipefusion(adapter, _job(model, i, cond, SEEDS[i]), mesh))
    summary = setup["bench"].score_latents(setup["decoder"], latents, setup["prompts"])
    got = _against_exact(setup, summary, latents)
    assert got["drop_points"] <= PF_DROP, got
    assert EXACT_REL_L2 < got["latent_rel_l2"] <= PF_REL_L2, got  # stale, not exact


@pytest.mark.slow  # a 2-process gang
def test_an_exact_gang_scores_as_one_process(setup):
    got = _against_exact(setup, *_score(setup, "u2")[:2])
    assert got["drop_points"] == 0, got
    assert got["latent_rel_l2"] <= EXACT_REL_L2, got


@pytest.mark.slow  # a 2-process gang
def test_pipefusion_gang_drop_is_bounded(setup):
    """pf2 with one warm-up step: stages on two processes, stale keys and values."""
    got = _against_exact(setup, *_score(setup, "pf2")[:2])
    assert got["drop_points"] <= PF_DROP, got
    assert EXACT_REL_L2 < got["latent_rel_l2"] <= PF_REL_L2, got  # stale, not exact
