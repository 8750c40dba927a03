"""Step caching (services/denoiser/step_cache.py): exact when off, skips when the probe says
so, the same decisions and latents under every 2- and 4-rank gloo layout as in one process, and
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


@pytest.mark.parametrize("family", ["sd3", "pixart-sigma"])
def test_other_families_whose_blocks_fit(family, tmp_path, monkeypatch):
    from ditmesh.tiny import make_tiny

    from .helpers import pixart_jobs, sd3_jobs

    model_dir = str(make_tiny(family, tmp_path / "model"))
    make = sd3_jobs if family == "sd3" else pixart_jobs
    jobs = {
        t: [dataclasses.replace(j, steps=STEPS, cache_threshold=t) for j in make(model_dir)]
        for t in (0.0, 1e-9, 1.0)
    }
    rec = Recorder(monkeypatch)
    exact, never, most = (run_single(model_dir, jobs[t]) for t in (0.0, 1e-9, 1.0))
    for a, b in zip(never, exact, strict=True):
        assert torch.equal(a, b)
    for job, a, b in zip(jobs[1.0], most, exact, strict=True):
        assert job.cached_steps > 0
        assert torch.isfinite(a).all() and not torch.equal(a, b)
        assert relative_error(a, b) <= SKIP_BOUND
    assert len(rec.caches) == 2 * len(jobs[1.0])


@pytest.mark.slow  # inductor compiles the blocks on CPU
def test_compiled_blocks_cache_as_eager_ones_do(tiny_flux_dir, monkeypatch):
    from ditmesh.denoiser.speed import compile_blocks

    job = cached_jobs(tiny_flux_dir, THRESHOLD)[0]
    rec = Recorder(monkeypatch)
    adapter = load_adapter(resolve_model(tiny_flux_dir), torch.device("cpu"), "float32")
    eager = sample(adapter, dataclasses.replace(job), single_process_mesh())
    compile_blocks(adapter.transformer)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = sample(adapter, dataclasses.replace(job), single_process_mesh())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compile really ran
    assert rec.caches[0].pattern == rec.caches[1].pattern
    assert any(rec.caches[1].pattern)
    assert relative_error(compiled, eager) <= REL_TOL


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
@pytest.mark.parametrize("world", [2, 4])
def test_gloo_layouts_make_the_single_process_decisions(
    tiny_flux_dir, monkeypatch, tmp_path, world
):
    from ditmesh.denoiser.gang import free_port

    rec = Recorder(monkeypatch)
    jobs = cached_jobs(tiny_flux_dir, THRESHOLD)
    want = run_single(tiny_flux_dir, [dataclasses.replace(j) for j in jobs])
    want_patterns = [c.pattern for c in rec.caches]
    assert any(any(p) for p in want_patterns)
    out_path = str(tmp_path / f"world{world}.pt")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp.spawn(
        _rank_main,
        args=(world, free_port(), tiny_flux_dir, jobs, out_path),
        nprocs=world,
        join=True,
    )
    results = torch.load(out_path)
    assert set(results) == set(LAYOUTS[world])
    for layout, (latents, patterns) in results.items():
        assert patterns == want_patterns, layout
        for i, (got, ref) in enumerate(zip(latents, want, strict=True)):
            err = relative_error(got, ref)
            assert err <= REL_TOL, f"{layout} job {i}: relative error {err:.2e}"


# ------------------------------------------------------------ through a real mesh (in process)

MESH_REQUEST = dict(height=64, width=64, steps=STEPS, seed=3, output_format="raw")


@pytest.fixture(scope="module")
def client(inproc_mesh):
    from ditmesh.client import Client

    with Client(inproc_mesh.address, timeout=120) as c:
        c.wait_ready(60)
        yield c


@pytest.mark.slow
@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_the_gateway_refuses_a_threshold_outside_0_to_1(inproc_mesh, threshold):
    import grpc

    from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

    with grpc.insecure_channel(inproc_mesh.address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        req = gateway_pb2.GenerateRequest(prompt="a cat", steps=2, cache_threshold=threshold)
        with pytest.raises(grpc.RpcError) as err:
            stub.GenerateUnary(req, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cache_threshold" in err.value.details()


def test_speedups_name_what_the_service_runs():
    from ditmesh.denoiser.speed import EAGER, Speedups

    assert EAGER.reported() == []
    every = Speedups(compile=True, cuda_graphs=True, fp8=True, attention="flash")
    assert every.reported() == ["compile", "cuda-graphs", "fp8"]  # a kernel choice is exact
    assert Speedups(compile=True, fast_attn="plan.json").reported() == ["compile", "fast-attn"]


def test_the_sdk_and_cli_read_the_speedups_from_finished():
    import io

    from ditmesh.client import generate_cmd
    from ditmesh.client.wire import _make_result
    from ditmesh.v1 import gateway_pb2

    finished = gateway_pb2.Finished(seed=1, speedups=["compile", "fp8", "step-cache"])
    timings = _make_result("rid", [], finished).timings
    assert timings.speedups == ("compile", "fp8", "step-cache")
    out = io.StringIO()
    generate_cmd.print_timings(timings, out)
    assert "speed-ups: compile, fp8, step-cache" in out.getvalue()
    out = io.StringIO()
    generate_cmd.print_timings(_make_result("rid", [], gateway_pb2.Finished()).timings, out)
    assert "speed-ups" not in out.getvalue()


def test_the_sdk_refuses_a_threshold_outside_0_to_1():
    from ditmesh.client import GenerateParams, InvalidArgumentError

    for bad in (-0.5, 2.0):
        with pytest.raises(InvalidArgumentError, match="cache_threshold"):
            GenerateParams(cache_threshold=bad)


def test_the_denoiser_refuses_what_cannot_cache():
    from ditmesh.common.errors import InvalidArgument
    from ditmesh.denoiser.service import check_cache_threshold

    class Runner:
        class adapter:  # noqa: N801 - stands in for an adapter object
            forward = None
            transformer = torch.nn.Linear(1, 1)

    check_cache_threshold(0.0, Runner())
    with pytest.raises(InvalidArgument, match="between 0 and 1"):
        check_cache_threshold(1.01, Runner())
    with pytest.raises(InvalidArgument, match="supports the transformers"):
        check_cache_threshold(0.5, Runner())


@pytest.mark.slow
def test_the_threshold_reaches_the_denoiser_through_the_mesh(client):
    exact = client.generate("a red circle", **MESH_REQUEST)
    cached = client.generate("a red circle", **MESH_REQUEST, cache_threshold=1.0)
    again = client.generate("a red circle", **MESH_REQUEST)
    assert exact.raw == again.raw  # the model is left unwrapped after a cached request
    assert exact.raw != cached.raw  # skipped steps change the image a little


@pytest.mark.slow
def test_the_denoiser_reports_skipped_steps_with_each_step(inproc_mesh, tiny_flux):
    import grpc

    from ditmesh.common import codec
    from ditmesh.v1 import denoiser_pb2, denoiser_pb2_grpc

    job = cached_jobs(tiny_flux, 1.0)[2]  # no CFG, one image
    params = denoiser_pb2.DenoiseParams(
        request_id="cache-report",
        model=resolve_model(tiny_flux).name,
        height=job.height,
        width=job.width,
        steps=STEPS,
        guidance=job.guidance,
        true_cfg_scale=job.true_cfg_scale,
        seed=job.seed,
        num_images=1,
        cache_threshold=1.0,
    )
    with grpc.insecure_channel(inproc_mesh.denoisers[0].address) as ch:
        stub = denoiser_pb2_grpc.DenoiserStub(ch)
        requests = codec.params_and_tensors_stream(denoiser_pb2.DenoiseRequest, params, job.cond)
        steps = [m.step for m in stub.Denoise(requests, timeout=60) if m.HasField("step")]
    assert [s.step for s in steps] == list(range(1, STEPS + 1))
    counts = [s.cached_steps for s in steps]
    assert counts[0] == 0 and counts[-1] > 0
    assert all(b - a in (0, 1) for a, b in zip(counts, counts[1:], strict=False))


@pytest.mark.slow
def test_the_sdk_result_says_how_many_steps_were_skipped(client):
    result = client.generate("a red circle", **MESH_REQUEST, cache_threshold=1.0)
    assert result.timings.steps_total == STEPS
    assert 0 < result.timings.cached_steps < STEPS
    assert result.timings.speedups == ("step-cache",)  # the mesh's denoiser runs eager
    exact = client.generate("a red circle", **MESH_REQUEST)
    assert exact.timings.speedups == () and exact.timings.steps_total == 0
    exact = client.generate("a red circle", **MESH_REQUEST)
    assert exact.timings.cached_steps == 0


@pytest.mark.slow
def test_the_cli_verbose_prints_the_skipped_steps(inproc_mesh, tmp_path, capsys):
    from ditmesh.cli import main

    argv = ["a red circle", "--height", "64", "--width", "64", "--steps", str(STEPS)]
    out = str(tmp_path / "out.png")
    code = main(
        [
            "generate",
            "--gateway",
            inproc_mesh.address,
            *argv,
            "--cache-threshold",
            "1",
            "--verbose",
            "-o",
            out,
        ]
    )
    assert code == 0
    assert f"of {STEPS} steps skipped" in capsys.readouterr().out
