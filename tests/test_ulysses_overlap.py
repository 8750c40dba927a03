"""--ulysses-chunks (the exchange hidden under the attention) and --ulysses-fp8 (the
exchange in FP8) on gloo gangs, against the single process.

Chunks reorder the exchange only: every chunk count gives the single process's latents
within the exact layouts' tolerance (helpers.REL_TOL). The FP8 exchange is approximate
(e4m3 keeps 3 mantissa bits: each value within 1/16 of itself, one scale per token and
head); on the tiny Flux its latents stay within FP8_TOL of the single process's, and
differ from it by more than the exact tolerance, so it really ran in FP8.

The model here is the tiny Flux with 8 heads of 16 (make_tiny's has 4), so that 4
Ulysses ranks hold 2 heads each and 2 ranks hold 4: chunk counts 2 and 4 both run.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel import ulysses as U
from ditmesh.denoiser.parallel.mesh import ParallelConfig, ParallelConfigError
from ditmesh.denoiser.speed import Speedups

from .helpers import REL_TOL, flux_jobs, relative_error, single, spawn_layouts

FP8_TOL = 0.01
"""Max |fp8 exchange - single| / max |single| on the tiny Flux, 3 steps (measured: ~1e-3)."""

HEADS = 8


@pytest.fixture(scope="module")
def flux8(tiny_flux, tmp_path_factory) -> str:
    """The tiny Flux with an 8-head transformer (same inner width per head, new weights)."""
    from diffusers import FluxTransformer2DModel

    folder = tmp_path_factory.mktemp("flux8") / "model"
    shutil.copytree(tiny_flux, folder)
    config = dict(FluxTransformer2DModel.load_config(str(folder), subfolder="transformer"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["num_attention_heads"] = HEADS
    torch.manual_seed(3)
    transformer = FluxTransformer2DModel(**config).eval()
    shutil.rmtree(folder / "transformer")
    transformer.save_pretrained(folder / "transformer")
    return str(folder)


@pytest.fixture(scope="module")
def jobs(flux8) -> list[DenoiseJob]:
    # Job 0: 16 image tokens, 8 text tokens split evenly; job 1: 15 image tokens (padded),
    # 7 text tokens split unevenly (uneven exchange splits); job 2: one text token, held
    # whole on every rank (each rank places its heads of it in front of what it receives).
    base = flux_jobs(flux8)
    whole_text = DenoiseJob(
        request_id="t1",
        height=48,
        width=80,
        steps=2,
        guidance=3.5,
        seed=7,
        true_cfg_scale=1.0,
        num_images=1,
        cond={
            "prompt_embeds": base[0].cond["prompt_embeds"][:, :1],
            "pooled_prompt_embeds": base[0].cond["pooled_prompt_embeds"],
        },
    )
    return [base[0], base[1], whole_text]


@pytest.fixture(scope="module")
def reference(flux8, jobs):
    return single(flux8, jobs)


def _check_exact(results, reference, layouts):
    for layout in layouts:
        for i, (got, want) in enumerate(zip(results[layout], reference, strict=True)):
            err = relative_error(got, want)
            assert err <= REL_TOL, f"{layout} job {i}: relative error {err:.2e}"


# ------------------------------------------------------------ refusals (no processes)


@pytest.mark.parametrize(
    "degrees, words",
    [
        (dict(ulysses_chunks=2), "needs --ulysses > 1"),
        (dict(ulysses_fp8=True), "needs --ulysses > 1"),
        (dict(ulysses=2, ring=2, ulysses_chunks=2), "Ulysses alone"),
        (dict(ulysses=2, ring=2, ulysses_fp8=True), "Ulysses alone"),
        (dict(ulysses=2, pipefusion=2, ulysses_chunks=2), "Ulysses alone"),
        (dict(ulysses=2, ulysses_chunks=0), "positive integer"),
    ],
)
def test_layouts_the_options_do_not_apply_to_are_refused(degrees, words):
    with pytest.raises(ParallelConfigError, match=words):
        ParallelConfig(**degrees)


def test_chunks_that_do_not_divide_a_ranks_heads_are_refused():
    ParallelConfig(ulysses=4, ulysses_chunks=6).check_model(heads=24)  # 6 heads a rank
    with pytest.raises(ParallelConfigError, match="does not divide the 6 heads"):
        ParallelConfig(ulysses=4, ulysses_chunks=4).check_model(heads=24)
    with pytest.raises(ParallelConfigError, match="does not divide the 1 heads"):
        ParallelConfig(ulysses=4, ulysses_chunks=2).check_model(heads=4)


def test_fp8_exchange_is_refused_on_cpu_without_the_test_variable(monkeypatch):
    monkeypatch.delenv(U.CPU_ENV, raising=False)
    with pytest.raises(ValueError, match=U.CPU_ENV):
        U.check_fp8_exchange(torch.device("cpu"))
    monkeypatch.setenv(U.CPU_ENV, "1")
    U.check_fp8_exchange(torch.device("cpu"))


@pytest.mark.parametrize(
    "argv, sentence",
    [
        (["--ulysses-chunks", "2"], "--ulysses-chunks needs --ulysses > 1"),
        (["--ulysses", "2", "--ring", "2", "--ulysses-fp8"], "applies to Ulysses alone"),
        (["--ulysses", "2", "--ulysses-fp8", "--device", "cpu"], "--ulysses-fp8 is for GPU"),
    ],
)
@pytest.mark.parametrize("command", ["up", "serve"])
def test_the_cli_refuses_in_one_line(capsys, monkeypatch, argv, sentence, command):
    from ditmesh.cli import main

    monkeypatch.delenv(U.CPU_ENV, raising=False)
    head = ["up"] if command == "up" else ["serve", "denoiser"]
    assert main([*head, "--model", "/nonexistent", *argv]) == 2
    assert sentence in capsys.readouterr().err


def test_the_config_describes_the_options():
    assert ParallelConfig(ulysses=4, ulysses_chunks=2, ulysses_fp8=True).describe() == (
        "ulysses4 (chunks2) (fp8 exchange)"
    )
    assert ParallelConfig(ulysses=4).describe() == "ulysses4"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_wire_format_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 2, 3, 16, generator=g) * torch.logspace(-3, 3, 16)).to(dtype)
    x[0, 0, 0] = 0  # an all-zero row: its scale must not divide by zero
    packed = U.pack_fp8(x)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 2, 3, 16 + U.SCALE_BYTES)
    back = U.unpack_fp8(packed, dtype)
    assert back.dtype == dtype and torch.equal(back[0, 0, 0], x[0, 0, 0])
    amax = x.float().abs().amax(-1, keepdim=True)
    err = (back.float() - x.float()).abs()
    # e4m3: within 1/16 of each value (normal range), or of 2^-9 * scale (subnormal),
    # plus the rounding of `dtype` on the way back.
    bound = x.float().abs() / 16 + amax / 448 * 2**-9 + x.float().abs() * 2**-7
    assert (err <= bound).all()
    assert not torch.equal(back, x)  # really quantised


def test_scale_bytes_do_not_depend_on_the_stride_of_the_size_one_dim():
    # The compiler may lay a [..., 1] amax out with any stride on its last dim (seen on
    # an H200: 55296), and a dtype view of such a dim is refused; the bytes must be the
    # float32's either way.
    scales = torch.tensor([1.5, -2.0, 3.25e-5], dtype=torch.float32)
    odd = torch.empty_strided((3, 1), (1, 55296)).copy_(scales.view(3, 1))
    assert odd.stride() == (1, 55296)
    out = U.scale_bytes(odd)
    assert out.shape == (3, 4) and out.dtype == torch.uint8
    assert torch.equal(out.view(torch.float32).view(3), scales)


# ------------------------------------------------------------ gangs (slow)


@pytest.mark.slow
def test_chunked_and_fp8_exchanges_on_two_ranks(flux8, jobs, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(U.CPU_ENV, "1")  # inherited by the spawned ranks
    layouts = {
        "u2": dict(ulysses=2),
        "u2c2": dict(ulysses=2, ulysses_chunks=2),
        "u2c4": dict(ulysses=2, ulysses_chunks=4),
        "u2fp8": dict(ulysses=2, ulysses_fp8=True),
        "u2c2fp8": dict(ulysses=2, ulysses_chunks=2, ulysses_fp8=True),
    }
    results = spawn_layouts(flux8, jobs, 2, tmp_path, layouts=layouts)
    _check_exact(results, reference, ("u2", "u2c2", "u2c4"))
    for layout in ("u2fp8", "u2c2fp8"):
        for i, (got, want) in enumerate(zip(results[layout], reference, strict=True)):
            err = relative_error(got, want)
            assert err <= FP8_TOL, f"{layout} job {i}: relative error {err:.2e}"
        worst = max(relative_error(g, w) for g, w in zip(results[layout], reference, strict=True))
        assert worst > REL_TOL, f"{layout}: as exact as float32, so not in FP8"


@pytest.mark.slow
def test_chunked_exchange_on_four_ranks(flux8, jobs, reference, tmp_path):
    layouts = {
        "u4c2": dict(ulysses=4, ulysses_chunks=2),
        "cfg2u2c4": dict(cfg=2, ulysses=2, ulysses_chunks=4),
    }
    results = spawn_layouts(flux8, jobs, 4, tmp_path, layouts=layouts)
    _check_exact(results, reference, layouts)


@pytest.mark.slow
def test_chunked_and_fp8_exchanges_compile_into_the_blocks(
    flux8, jobs, reference, tmp_path, monkeypatch
):
    # Under --compile the chunks' collectives are traced into the blocks' graphs like
    # HeadExchange's (functional collectives, no graph break), waits at first use; the
    # FP8 packing (bit casts between float32, e4m3 and bytes) is traced with them.
    monkeypatch.setenv(U.CPU_ENV, "1")
    results = spawn_layouts(
        flux8,
        jobs[:2],
        2,
        tmp_path,
        layouts={
            "u2c2": dict(ulysses=2, ulysses_chunks=2),
            "u2c2fp8": dict(ulysses=2, ulysses_chunks=2, ulysses_fp8=True),
        },
        speed=Speedups(compile=True),
    )
    _check_exact(results, reference[:2], ("u2c2",))
    for got, want in zip(results["u2c2fp8"], reference[:2], strict=True):
        assert relative_error(got, want) <= FP8_TOL
    breaks = torch.load(tmp_path / "world2.pt.graph_breaks")
    assert breaks == {"graph_break": {}, "unimplemented": {}}, breaks


# ------------------------------------------------------------ bench/gang_gpu.py's layouts


def _gang_gpu():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gang_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gang_gpu_exchange", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_bench_layouts_parse_and_refuse():
    gang = _gang_gpu()
    layout = gang.parse_layout("u4+compile+graphs+chunks2+fp8comm")
    assert (layout.parallel.ulysses, layout.parallel.ulysses_chunks) == (4, 2)
    assert layout.parallel.ulysses_fp8
    assert layout.speed == dict(compile=True, cuda_graphs=True)
    assert gang.parse_layout("u2+chunks3").parallel.ulysses_chunks == 3
    for name, words in [
        ("single+chunks2", "needs --ulysses > 1"),
        ("u2r2+compile+fp8comm", "Ulysses alone"),
        ("pf2u2+chunks2", "Ulysses alone"),
        ("u2+chunks", "unknown option"),
    ]:
        with pytest.raises(SystemExit, match=words):
            gang.parse_layout(name)


@pytest.mark.slow
def test_the_bench_runs_the_layouts_on_cpu(tiny_flux, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    layouts = "single,u2,u2+chunks2,u2+fp8comm"
    cmd = [sys.executable, str(root / "bench" / "gang_gpu.py"), "--model", str(tiny_flux)]
    cmd += ["--device", "cpu", "--dtype", "float32", "--height", "64", "--steps", "4"]
    cmd += ["--repeats", "1", "--no-decode", "--out", str(tmp_path), "--layouts", layouts]
    env = dict(os.environ, OMP_NUM_THREADS="1", **{U.CPU_ENV: "1"})
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900, env=env)
    rows = [json.loads(x) for x in (tmp_path / "ours.jsonl").read_text().splitlines()]
    assert [r["layout"] for r in rows] == layouts.split(",")
    assert rows[1]["rel_l2_vs_single"] <= REL_TOL and rows[2]["rel_l2_vs_single"] <= REL_TOL
    assert REL_TOL < rows[3]["rel_l2_vs_single"] <= FP8_TOL


def test_the_profile_counts_nccl_time_no_compute_hid():
    from types import SimpleNamespace

    def kernel(name, start, end):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))

    kernels = [
        kernel("ncclDevKernel_SendRecv", 0, 100),  # 0-10 alone, 10-60 under gemm, 60-100 alone
        kernel("gemm", 10, 40),
        kernel("flash_fwd", 30, 60),
        kernel("ncclDevKernel_SendRecv", 90, 130),  # overlaps the first: 100-130 alone
        kernel("ncclKernel_AllGather", 200, 250),  # 200-220 alone, 220-250 under elementwise
        kernel("elementwise", 220, 300),
        kernel("gemm", 400, 500),  # no NCCL here
    ]
    assert _gang_gpu().nccl_alone_s(kernels) == pytest.approx((10 + 40 + 30 + 20) / 1e6)
    assert _gang_gpu().nccl_alone_s([kernel("gemm", 0, 5)]) == 0


def test_a_gang_refuses_chunks_its_model_cannot_split_before_starting(tiny_flux):
    from ditmesh.denoiser.gang import GangRunner

    # make_tiny's Flux: 4 heads, 2 a rank under Ulysses 2.
    with pytest.raises(ParallelConfigError, match="does not divide the 2 heads"):
        GangRunner.of(tiny_flux, ParallelConfig(ulysses=2, ulysses_chunks=4), device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "pixart-sigma"])
def test_other_families_take_the_chunked_exchange(family, tmp_path, monkeypatch):
    # SD3: joint attention through JointParallelProcessor (image tokens first); PixArt:
    # self-attention with no text in the exchange (and cross-attention left local).
    from ditmesh.tiny import make_tiny

    from .helpers import pixart_jobs, sd3_jobs

    monkeypatch.setenv(U.CPU_ENV, "1")
    model = str(make_tiny(family, tmp_path / "model"))
    jobs = (sd3_jobs if family == "sd3" else pixart_jobs)(model)[:2]
    reference = single(model, jobs)
    layouts = {
        "u2c2": dict(ulysses=2, ulysses_chunks=2),
        "u2c2fp8": dict(ulysses=2, ulysses_chunks=2, ulysses_fp8=True),
    }
    results = spawn_layouts(model, jobs, 2, tmp_path, layouts=layouts)
    _check_exact(results, reference, ("u2c2",))
    for got, want in zip(results["u2c2fp8"], reference, strict=True):
        assert relative_error(got, want) <= FP8_TOL
