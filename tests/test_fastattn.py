"""DiTFastAttn (services/denoiser/fastattn*.py): an all-full plan is exact sampling, each
method runs on the tiny Flux close to exact, calibration at threshold 0 picks full
everywhere, plans round-trip and refuse what they do not fit, the denoiser serves a plan
and reports the attention it computed, and the layouts that cannot run one are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ditmesh.common.errors import InvalidArgument
from ditmesh.common.models import resolve_model
from ditmesh.denoiser import fastattn
from ditmesh.denoiser.fastattn import FastAttnPlan, FastAttnState
from ditmesh.denoiser.fastattn_calibrate import calibrate
from ditmesh.denoiser.parallel.mesh import ParallelConfig, single_process_mesh
from ditmesh.denoiser.runner import load_adapter
from ditmesh.denoiser.sampler import sample
from ditmesh.denoiser.speed import Speedups

from .helpers import flux_jobs

STEPS = 6
# Each hand-made plan below, and calibration at CALIBRATED, stays this close to exact on
# the tiny random Flux (max abs error over max abs value); measured at most 1.6% with
# every step after the first shared (`step` everywhere), 0.3% at threshold 0.2.
BOUND = 0.05
CALIBRATED = 0.2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("flux", tmp_path_factory.mktemp("fa") / "tiny-flux", seed=0))


@pytest.fixture(scope="module")
def adapter(model_dir):
    return load_adapter(resolve_model(model_dir), torch.device("cpu"), "float32")


@pytest.fixture(scope="module")
def jobs(model_dir):
    return [dataclasses.replace(j, steps=STEPS) for j in flux_jobs(model_dir)]


@pytest.fixture(scope="module")
def exact(adapter, jobs):
    return [sample(adapter, j, single_process_mesh()) for j in jobs]


def layers(adapter) -> tuple[str, ...]:
    return fastattn.attention_layers(adapter.transformer)


def run_plan(adapter, jobs, plan: FastAttnPlan) -> tuple[list[torch.Tensor], list[float]]:
    state = FastAttnState(plan)
    fastattn.install(adapter, state)
    try:
        out, fractions = [], []
        for job in jobs:
            out.append(sample(adapter, dataclasses.replace(job), single_process_mesh()))
            fractions.append(state.fraction())
        return out, fractions
    finally:
        fastattn.uninstall(adapter)


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def window_density(job, window: float) -> float:
    masks = fastattn.WindowMasks()
    text, image = job.cond["prompt_embeds"].shape[1], (job.height // 16) * (job.width // 16)
    return masks.density(text, image, masks.half_width(window, image))


def plan_with(adapter, later: str, first: str = "full") -> FastAttnPlan:
    n = len(layers(adapter))
    methods = [[first] * n] + [[later] * n for _ in range(STEPS - 1)]
    return FastAttnPlan(steps=STEPS, layers=layers(adapter), window=0.25, methods=methods)


# ------------------------------------------------------------ sampling with a plan


def test_an_all_full_plan_is_exact_sampling_bit_for_bit(adapter, jobs, exact):
    out, fractions = run_plan(adapter, jobs, FastAttnPlan.all_full(STEPS, layers(adapter)))
    for a, b in zip(out, exact, strict=True):
        assert torch.equal(a, b)
    assert fractions == [1.0] * len(jobs)


@pytest.mark.parametrize(
    ("first", "later"),
    [("full", "window"), ("full", "step"), ("cfg", "cfg"), ("full", "cfg")],
)
def test_each_method_runs_close_to_exact(adapter, jobs, exact, first, later):
    out, fractions = run_plan(adapter, jobs, plan_with(adapter, later, first))
    for a, b, job, f in zip(out, exact, jobs, fractions, strict=True):
        assert torch.isfinite(a).all()
        err = rel_max(a, b)
        assert err <= BOUND, (later, job.request_id, err)
        cfg = job.true_cfg_scale > 1
        if later == "cfg" and not cfg:
            assert err == 0.0 and f == 1.0  # without CFG in the request, cfg is full
        elif later == "window":
            # Step 0 runs full and the window (for the residual), the others the window.
            d = window_density(job, 0.25)
            assert err > 0.0 and f == pytest.approx((1 + STEPS * d) / STEPS)
        else:
            cost = {"full": 1.0, "cfg": 0.5, "step": 0.0}
            expected = (cost[first] + (STEPS - 1) * cost[later]) / STEPS
            assert err > 0.0 and f == pytest.approx(expected)


def test_window_mixed_with_full_keeps_residuals_per_branch(adapter, jobs, exact):
    n = len(layers(adapter))
    rows = ["full", "window", "window", "full", "step", "window"]
    methods = [[rows[s] if i % 2 else "full" for i in range(n)] for s in range(STEPS)]
    plan = FastAttnPlan(steps=STEPS, layers=layers(adapter), window=0.25, methods=methods)
    out, fractions = run_plan(adapter, jobs, plan)
    for a, b, f in zip(out, exact, fractions, strict=True):
        assert torch.isfinite(a).all() and 0.0 < rel_max(a, b) <= BOUND
        # Half the layers always full; on these few tokens the window is most of the
        # scores (so the residual's extra window can make it more than 1).
        assert f > 0.5


def test_a_request_with_other_steps_runs_full(adapter, jobs, exact):
    plan = plan_with(adapter, "step")
    other = [dataclasses.replace(jobs[2], steps=STEPS - 2)]
    out, fractions = run_plan(adapter, other, plan)
    reference = sample(adapter, dataclasses.replace(other[0]), single_process_mesh())
    assert torch.equal(out[0], reference) and fractions == [1.0]


def test_the_window_masks_are_built_once_per_size():
    masks = fastattn.WindowMasks()
    a = masks.dense(3, 10, 2, "cpu")
    assert masks.dense(3, 10, 2, "cpu") is a
    m = a[0, 0]
    assert m[:3].all() and m[:, :3].all()  # text rows and columns whole
    assert m[5, 7] and not m[5, 8]  # image band: |i - j| <= 2
    assert masks.density(3, 10, 2) == pytest.approx(float(m.float().mean()))


@pytest.mark.slow
def test_the_gpu_kernel_flex_attention_with_the_block_mask_is_the_window():
    """The GPU path (compiled flex_attention, called from the processor's eager region)
    computes what the CPU path's boolean mask does; run here on CPU (inductor's flex)."""
    import torch.nn.functional as F

    masks = fastattn.WindowMasks()
    text, image, w = 8, 200, 20
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, text + image, 64, generator=g) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=masks.dense(text, image, w, "cpu"))

    @torch.compiler.disable
    def as_the_processor_calls_it():
        block = masks.block(text, image, w, torch.device("cpu"))
        return fastattn._flex_attention(q, k, v, block)

    assert torch.allclose(as_the_processor_calls_it(), dense, atol=1e-5)
    assert masks.block(text, image, w, torch.device("cpu")) is masks.block(
        text, image, w, torch.device("cpu")
    )


# ------------------------------------------------------------ calibration


def test_calibration_at_threshold_zero_picks_full_everywhere(adapter, jobs):
    plan = calibrate(adapter, jobs[:2], 0.0, 0.25)
    assert plan.count("full") == STEPS * len(layers(adapter))
    assert plan.threshold == 0.0 and plan.layers == layers(adapter)


def test_a_calibrated_plan_saves_attention_and_stays_close(adapter, jobs, exact):
    plan = calibrate(adapter, jobs[:2], CALIBRATED, 0.25, prompts=("a", "b"))
    assert plan.count("full") < STEPS * len(layers(adapter))
    assert all(m in ("full", "cfg") for m in plan.methods[0])
    out, fractions = run_plan(adapter, jobs, plan)
    for a, b, f in zip(out, exact, fractions, strict=True):
        assert torch.isfinite(a).all() and rel_max(a, b) <= BOUND and f < 1.0


def test_the_cli_calibrates_and_saves_next_to_the_model(model_dir):
    from ditmesh.cli import main

    argv = ["fastattn-calibrate", model_dir, "--threshold", "0.2", "--prompts", "2"]
    assert main([*argv, "--steps", "4", "--size", "64x64", "--window", "0.25"]) == 0
    plan = FastAttnPlan.load(model_dir)  # a folder: its ditmesh_fastattn.json
    assert plan.steps == 4 and plan.threshold == 0.2 and plan.window == 0.25
    assert len(plan.prompts) == 2 and plan.model == resolve_model(model_dir).name


# ------------------------------------------------------------ the plan file


def test_a_plan_round_trips_through_json(adapter, tmp_path):
    plan = plan_with(adapter, "window")
    plan.prompts, plan.threshold = ("a red circle",), 0.1
    path = str(tmp_path / "plan.json")
    plan.save(path)
    assert FastAttnPlan.load(path) == plan
    assert json.loads(open(path).read())["methods"][1][0] == "window"


def test_plans_that_do_not_fit_are_refused(adapter, tmp_path):
    plan = plan_with(adapter, "step")
    with pytest.raises(InvalidArgument, match="calibrated for 6 steps; the request asks for 4"):
        plan.check_steps(4)
    with pytest.raises(InvalidArgument, match="belongs to another model"):
        plan.check_layers(layers(adapter)[:-1])
    n = len(layers(adapter))
    with pytest.raises(ValueError, match="step 0 must compute every layer"):
        FastAttnPlan(steps=1, layers=layers(adapter), window=0.2, methods=[["step"] * n])
    with pytest.raises(ValueError, match="unknown method 'half'"):
        FastAttnPlan(steps=1, layers=layers(adapter), window=0.2, methods=[["half"] * n])
    with pytest.raises(ValueError, match="rows of methods for 2 steps"):
        FastAttnPlan(steps=2, layers=layers(adapter), window=0.2, methods=[["full"] * n])
    with pytest.raises(InvalidArgument, match="cannot read the plan"):
        FastAttnPlan.load(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"steps": 1}')
    with pytest.raises(InvalidArgument, match="not a valid plan"):
        FastAttnPlan.load(str(tmp_path / "bad.json"))


def test_a_plan_for_another_model_is_refused_at_install(adapter, tmp_path):
    other = FastAttnPlan.all_full(STEPS, ("blocks.0.attn",))
    with pytest.raises(InvalidArgument, match="belongs to another model"):
        fastattn.install(adapter, FastAttnState(other))
    assert "fast_attn" not in adapter.__dict__


def test_other_families_are_refused_with_a_clear_message(tmp_path):
    from ditmesh.tiny import make_tiny

    sd3 = load_adapter(resolve_model(str(make_tiny("sd3", tmp_path / "sd3"))), "cpu", "float32")
    plan = FastAttnPlan.all_full(STEPS, fastattn.attention_layers(sd3.transformer))
    with pytest.raises(InvalidArgument, match="Flux.*only; this model's transformer is SD3"):
        fastattn.install(sd3, FastAttnState(plan))


# ------------------------------------------------------------ layouts and speed-ups


@pytest.mark.parametrize(
    ("degrees", "named"),
    [
        (dict(ulysses=2), "--ulysses 2"),
        (dict(ring=2), "--ring 2"),
        (dict(pipefusion=2), "--pipefusion 2"),
        (dict(cfg=2), "--cfg 2"),
    ],
)
def test_layouts_other_than_one_process_and_dp_are_refused(degrees, named):
    with pytest.raises(InvalidArgument, match=f"one process or data parallel.*{named}"):
        fastattn.check_layout(ParallelConfig(**degrees))
    fastattn.check_layout(ParallelConfig(dp=2))  # data parallel runs it


def test_the_denoiser_refuses_a_layout_before_anything_loads(tmp_path):
    from ditmesh.denoiser.service import serve

    with pytest.raises(InvalidArgument, match="--ulysses 2"):
        serve(
            "/nonexistent",
            parallel=ParallelConfig(ulysses=2),
            speed=Speedups(fast_attn=str(tmp_path / "plan.json")),
        )


def test_cuda_graphs_are_refused():
    with pytest.raises(InvalidArgument, match="--cuda-graphs"):
        Speedups(fast_attn="plan.json", cuda_graphs=True)


def test_the_cli_refuses_a_layout_in_one_line(capsys, tmp_path):
    from ditmesh.cli import main

    code = main(["up", "--model", "/nonexistent", "--fast-attn", "p.json", "--ring", "2"])
    assert code == 2
    assert "--fast-attn runs on one process or data parallel" in capsys.readouterr().err


def test_compiled_blocks_follow_a_plan_as_eager_ones_do(model_dir, jobs, tmp_path):
    from ditmesh.denoiser.speed import apply

    eager_adapter = load_adapter(resolve_model(model_dir), torch.device("cpu"), "float32")
    plan = plan_with(eager_adapter, "window")
    job = [jobs[2]]
    eager, _ = run_plan(eager_adapter, job, plan)
    path = str(tmp_path / "plan.json")
    plan.save(path)
    compiled_adapter = load_adapter(resolve_model(model_dir), torch.device("cpu"), "float32")
    apply(compiled_adapter, Speedups(compile=True, fast_attn=path))
    compiled = sample(compiled_adapter, dataclasses.replace(job[0]), single_process_mesh())
    assert rel_max(compiled, eager[0]) < 1e-4
    assert compiled_adapter.fast_attn.fraction() < 1.0


def test_the_warm_up_runs_the_plans_step_count(model_dir, tmp_path):
    """Other step counts run every layer in full: a 2-step warm-up would leave the
    window's compiled kernel to the first user's request."""
    from ditmesh.denoiser.runner import warmup_job

    model = resolve_model(model_dir)
    fresh = load_adapter(model, torch.device("cpu"), "float32")
    assert warmup_job(fresh, model, cfg=False).steps == 2
    path = str(tmp_path / "plan.json")
    plan_with(fresh, "window").save(path)
    state = fastattn.load_and_install(fresh, path)
    job = warmup_job(fresh, model, cfg=False)
    assert job.steps == STEPS
    sample(fresh, job, single_process_mesh())
    assert state.fraction() < 1.0  # the plan ran, window kernel and all
    assert warmup_job(fresh, model, cfg=False, steps=3).steps == 3  # asked for: kept


# ------------------------------------------------------------ served: one process, dp2, a mesh


def step_plan_file(adapter, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("plan") / "plan.json")
    plan_with(adapter, "step").save(path)
    return path


@pytest.mark.slow
def test_a_dp2_gang_follows_the_plan_as_one_process_does(
    model_dir, adapter, jobs, tmp_path_factory
):
    from ditmesh.denoiser.gang import GangRunner
    from ditmesh.denoiser.runner import LocalRunner

    speed = Speedups(fast_attn=step_plan_file(adapter, tmp_path_factory))
    model = resolve_model(model_dir)
    one = LocalRunner(model, "cpu", "float32", speed=speed)
    expected = [one.run(dataclasses.replace(j)) for j in jobs[:2]]  # 2 and 3 images
    gang = GangRunner.of(
        model_dir, ParallelConfig(dp=2), device="cpu", dtype="float32", speed=speed
    )
    try:
        got = [gang.run(dataclasses.replace(j)) for j in jobs[:2]]
    finally:
        gang.close()
    for a, b in zip(got, expected, strict=True):
        # Each replica's batch is part of the images: float rounding only.
        assert rel_max(a, b) < 1e-5


@pytest.fixture(scope="module")
def fast_mesh(model_dir, adapter, tmp_path_factory):
    from ditmesh.denoiser.service import serve as serve_denoiser
    from ditmesh.encoder.service import serve as serve_encoder
    from ditmesh.gateway.main import serve as serve_gateway
    from ditmesh.vae.service import serve as serve_vae

    speed = Speedups(fast_attn=step_plan_file(adapter, tmp_path_factory))
    servers = [
        serve_encoder(model_dir),
        serve_denoiser(model_dir, speed=speed),
        serve_vae(model_dir),
    ]
    gateway = serve_gateway(
        model_dir,
        encoder=[servers[0].address],
        denoiser=[servers[1].address],
        vae=[servers[2].address],
    )
    yield gateway, servers[1]
    for s in (gateway, *servers):
        s.stop(0)


def denoise_steps(model_dir, denoiser, job, **params):
    import grpc

    from ditmesh.common import codec
    from ditmesh.v1 import denoiser_pb2, denoiser_pb2_grpc

    p = denoiser_pb2.DenoiseParams(
        request_id="fast",
        model=resolve_model(model_dir).name,
        height=job.height,
        width=job.width,
        steps=job.steps,
        guidance=job.guidance,
        true_cfg_scale=job.true_cfg_scale,
        seed=job.seed,
        num_images=job.num_images,
        **params,
    )
    with grpc.insecure_channel(denoiser.address) as ch:
        stub = denoiser_pb2_grpc.DenoiserStub(ch)
        requests = codec.params_and_tensors_stream(denoiser_pb2.DenoiseRequest, p, job.cond)
        return [m.step for m in stub.Denoise(requests, timeout=60) if m.HasField("step")]


@pytest.mark.slow
def test_the_denoiser_reports_the_attention_it_computed(model_dir, jobs, fast_mesh):
    steps = denoise_steps(model_dir, fast_mesh[1], jobs[2])
    # The plan: step 0 full, then every layer shares the step before.
    assert [s.attention_computed for s in steps] == pytest.approx([1 / k for k in range(1, 7)])


@pytest.mark.slow
def test_the_denoiser_refuses_other_steps_and_step_caching(model_dir, jobs, fast_mesh):
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        denoise_steps(model_dir, fast_mesh[1], dataclasses.replace(jobs[2], steps=4))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "calibrated for 6 steps" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        denoise_steps(model_dir, fast_mesh[1], jobs[2], cache_threshold=0.5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "step caching cannot run on a denoiser serving --fast-attn" in err.value.details()


@pytest.mark.slow
def test_the_sdk_result_says_fast_attention_ran(fast_mesh):
    from ditmesh.client import Client

    with Client(fast_mesh[0].address, timeout=120) as c:
        result = c.generate("a red circle", height=64, width=64, steps=STEPS, output_format="raw")
    assert result.timings.attention_computed == pytest.approx(1 / STEPS)
    assert result.timings.speedups == ("fast-attn",)


@pytest.mark.slow
def test_the_cli_verbose_prints_the_attention_share(fast_mesh, tmp_path, capsys):
    from ditmesh.cli import main

    argv = ["generate", "--gateway", fast_mesh[0].address, "a red circle", "--steps", str(STEPS)]
    code = main(
        [*argv, "--height", "64", "--width", "64", "--verbose", "-o", str(tmp_path / "o.png")]
    )
    assert code == 0
    assert "fast attention: 16.7% of full attention computed" in capsys.readouterr().out


def test_the_sdk_reads_the_share_from_finished_and_verbose_prints_it():
    import io

    from ditmesh.client import generate_cmd
    from ditmesh.client.wire import _make_result
    from ditmesh.v1 import gateway_pb2

    finished = gateway_pb2.Finished(seed=1, num_images=0, attention_computed=0.25)
    timings = _make_result("rid", [], finished).timings
    assert timings.attention_computed == 0.25
    out = io.StringIO()
    generate_cmd.print_timings(timings, out)
    assert "fast attention: 25.0% of full attention computed" in out.getvalue()
    out = io.StringIO()
    generate_cmd.print_timings(_make_result("rid", [], gateway_pb2.Finished()).timings, out)
    assert "fast attention" not in out.getvalue()  # 0: no plan served
