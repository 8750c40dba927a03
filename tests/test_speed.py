"""Speedups (services/denoiser/speed.py) on CPU, their CLI flags and the gang's teardown.

Float32 on CPU throughout. Tolerances (relative error: max |got - eager| / max |eager|):
fused q/k/v <= 1e-5 (the same products, one GEMM instead of three); another SDPA
kernel <= 1e-4; a Ulysses gang <= REL_TOL (1e-4, as for every parallel layout);
`cuda_graphs` on CPU changes nothing, so its result is bit-identical.
"""

from __future__ import annotations

import pickle
import threading
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend

from ditmesh.common.errors import InvalidArgument
from ditmesh.common.gangs import leave_process_group
from ditmesh.common.models import resolve_model
from ditmesh.denoiser.graphs import GraphedForward
from ditmesh.denoiser.parallel.mesh import single_process_mesh
from ditmesh.denoiser.runner import LocalRunner, load_adapter, warmup_sizes
from ditmesh.denoiser.sampler import sample
from ditmesh.denoiser.speed import (
    ATTENTION_CHOICES,
    EAGER,
    Speedups,
    WithAttentionKernel,
    apply,
    fuse_qkv,
    release,
)

from .helpers import REL_TOL, flux_jobs, relative_error, spawn_layouts

FUSED_TOL = 1e-5
KERNEL_TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the gang ranks use: the tiny model gains nothing from more,
    and two OpenMP threads on a busy 2-core machine run ~50x slower (spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_flux):
    return resolve_model(tiny_flux)


@pytest.fixture(scope="module")
def job(tiny_flux):
    # 48x80: 15 image tokens (uneven under ulysses=2), true CFG; one image to keep it fast.
    return replace(flux_jobs(tiny_flux)[1], num_images=1)


@pytest.fixture(scope="module")
def eager(model, job):
    return LocalRunner(model, device="cpu", dtype="float32").run(job)


def _flux_attentions(transformer) -> list[torch.nn.Module]:
    from diffusers.models.transformers.transformer_flux import FluxAttention

    return [m for m in transformer.modules() if isinstance(m, FluxAttention)]


def _storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the parameters (views counted once)."""
    storages = {}
    for p in module.parameters():
        s = p.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _assert_views_of(module, fused_name: str, parts: tuple[str, ...], before: dict) -> None:
    fused = getattr(module, fused_name)
    for attr in ("weight", "bias"):
        whole = getattr(fused, attr)
        if whole is None:
            continue
        assert torch.equal(whole, torch.cat([before[(p, attr)] for p in parts]))
        offset = whole.storage_offset()
        for name in parts:
            part = getattr(getattr(module, name), attr)
            shared = part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
            assert shared, f"{name}.{attr} is a copy, not a view of {fused_name}.{attr}"
            assert part.storage_offset() == offset, (name, attr)
            assert torch.equal(part, before[(name, attr)]), (name, attr)
            offset += part.numel()


def test_fuse_qkv_makes_the_projections_views_of_the_fused_weight(model):
    transformer = load_adapter(model, torch.device("cpu"), "float32").transformer
    attentions = _flux_attentions(transformer)
    cfg = transformer.config
    assert len(attentions) == cfg.num_layers + cfg.num_single_layers > 0
    names = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    before = {
        (id(m), n, attr): getattr(getattr(m, n), attr).detach().clone()
        for m in attentions
        for n in names
        if hasattr(m, n)
        for attr in ("weight", "bias")
        if getattr(getattr(m, n), attr) is not None
    }
    bytes_before = _storage_bytes(transformer)

    assert fuse_qkv(transformer) == len(attentions)

    double_stream = 0
    for m in attentions:
        assert m.fused_projections is True
        mine = {(n, a): t for (i, n, a), t in before.items() if i == id(m)}
        _assert_views_of(m, "to_qkv", ("to_q", "to_k", "to_v"), mine)
        if hasattr(m, "add_q_proj"):
            _assert_views_of(m, "to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"), mine)
            double_stream += 1
    assert double_stream == cfg.num_layers  # the text stream's projections were fused too
    # The fused layers replace q/k/v rather than add to them: no second copy is held.
    assert _storage_bytes(transformer) == bytes_before

    assert fuse_qkv(transformer) == 0  # already fused: nothing to do, nothing changes
    assert _storage_bytes(transformer) == bytes_before


def test_fused_qkv_runner_matches_eager(model, job, eager):
    runner = LocalRunner(model, device="cpu", dtype="float32", speed=Speedups(fuse_qkv=True))
    assert all(m.fused_projections for m in _flux_attentions(runner.adapter.transformer))
    got = runner.run(job)
    assert got.shape == eager.shape
    assert relative_error(got, eager) <= FUSED_TOL


@pytest.mark.parametrize(
    "kernel, backend",
    [
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("math", SDPBackend.MATH),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ],
)
def test_attention_kernel_choice_matches_eager(model, job, eager, kernel, backend):
    runner = LocalRunner(model, device="cpu", dtype="float32", speed=Speedups(attention=kernel))
    forward = runner.adapter.forward
    assert isinstance(forward, WithAttentionKernel)
    assert forward.fn is runner.adapter.transformer
    # The chosen kernel first, every other one kept as a fallback.
    assert forward.backends[0] == backend
    assert len(set(forward.backends)) == 4

    seen = []
    inner = forward.fn

    def probe(*args, **kwargs):
        seen.append(torch._C._get_sdp_priority_order())
        return inner(*args, **kwargs)

    forward.fn = probe
    outside = torch._C._get_sdp_priority_order()
    got = runner.run(job)
    assert seen, "the transformer was not called through WithAttentionKernel"
    assert all(order[:4] == [int(b) for b in forward.backends] for order in seen)
    assert torch._C._get_sdp_priority_order() == outside  # restored after each call
    assert relative_error(got, eager) <= KERNEL_TOL


def test_speedups_values():
    with pytest.raises(ValueError) as exc:
        Speedups(attention="fastest")
    for choice in ATTENTION_CHOICES:
        assert choice in str(exc.value)
    assert "fastest" in str(exc.value)

    assert Speedups().describe() == "eager"
    assert EAGER == Speedups()
    assert Speedups(attention="auto").describe() == "eager"
    everything = Speedups(compile=True, cuda_graphs=True, attention="cudnn", fuse_qkv=True)
    assert everything.describe().split(", ") == [
        "compile",
        "cuda_graphs",
        "fuse_qkv",
        "attention=cudnn",
    ]
    assert Speedups(fuse_qkv=True, attention="math").describe() == "fuse_qkv, attention=math"

    # Plain values: they cross to gang ranks and torchrun workers.
    assert pickle.loads(pickle.dumps(everything)) == everything
    with pytest.raises(AttributeError):
        everything.compile = False  # type: ignore[misc]


def test_cuda_graphs_is_a_no_op_on_cpu(model, job, eager):
    adapter = load_adapter(model, torch.device("cpu"), "float32")
    # Nothing compiles or captures, so no warm-up request is asked for.
    assert apply(adapter, Speedups(cuda_graphs=True, fuse_qkv=True)) is False
    assert not isinstance(adapter.forward, GraphedForward)  # graphs are GPU only
    assert adapter.forward is adapter.transformer
    release(adapter)  # nothing captured: nothing to release, and no error
    got = sample(adapter, job, single_process_mesh()).float()
    assert torch.equal(got, eager)  # the very same computation as eager


@pytest.mark.slow
def test_fused_qkv_and_math_kernel_in_a_ulysses_gang_match_the_single_process(
    tiny_flux, job, eager, tmp_path
):
    speed = Speedups(fuse_qkv=True, attention="math")
    got = spawn_layouts(tiny_flux, [job], 2, tmp_path, layouts={"u2": dict(ulysses=2)}, speed=speed)
    assert set(got) == {"u2"}
    assert got["u2"][0].shape == eager.shape
    err = relative_error(got["u2"][0], eager)
    assert err <= REL_TOL, f"u2 with {speed.describe()}: relative error {err:.2e}"


@pytest.mark.alone  # bounds a wall time
def test_leave_process_group_without_a_group_is_true():
    assert not dist.is_initialized()
    start = time.monotonic()
    assert leave_process_group(timeout=5.0) is True
    assert time.monotonic() - start < 1.0


@pytest.mark.alone  # bounds a wall time
def test_leave_process_group_gives_up_on_a_blocked_teardown(monkeypatch):
    entered, unblock = threading.Event(), threading.Event()

    def blocked_destroy(*args, **kwargs):
        entered.set()
        unblock.wait(10)  # as NCCL's teardown with captured collectives alive

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", blocked_destroy)
    timeout = 0.5
    start = time.monotonic()
    try:
        assert leave_process_group(timeout=timeout) is False
        elapsed = time.monotonic() - start
        assert entered.is_set()
        assert timeout <= elapsed < timeout + 1.0
        closers = [t for t in threading.enumerate() if t.name == "leave-process-group"]
        assert closers and all(t.daemon for t in closers)  # cannot keep the process alive
    finally:
        unblock.set()
    for t in closers:
        t.join(5)


def test_leave_process_group_ignores_a_failing_teardown(monkeypatch):
    def broken_destroy(*args, **kwargs):
        raise RuntimeError("connection reset by peer")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", broken_destroy)
    assert leave_process_group(timeout=5.0) is True


SPEED_FLAGS = ["--compile", "--cuda-graphs", "--attention", "cudnn", "--fuse-qkv"]


def test_cli_flags_make_speedups():
    from ditmesh.cli import _speedups, build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "denoiser", "--model", "X", *SPEED_FLAGS])
    assert _speedups(args) == Speedups(
        compile=True, cuda_graphs=True, attention="cudnn", fuse_qkv=True
    )
    args = parser.parse_args(["serve", "denoiser", "--model", "X"])
    assert _speedups(args) == EAGER
    args = parser.parse_args(["up", "--model", "X", "--fuse-qkv", "--attention", "math"])
    assert _speedups(args) == Speedups(fuse_qkv=True, attention="math")


def test_cli_attention_choices(capsys):
    from ditmesh.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["serve", "denoiser", "--model", "X", "--attention", "foo"])
    assert exc.value.code == 2
    assert "invalid choice: 'foo'" in capsys.readouterr().err
    for choice in ATTENTION_CHOICES:  # every kernel Speedups takes, the CLI takes
        assert parser.parse_args(["serve", "denoiser", "--model", "X", "--attention", choice])


def test_up_passes_the_speed_flags_to_its_denoiser(monkeypatch):
    import ditmesh.local
    from ditmesh.cli import _speedups, build_parser, main

    configs = []
    monkeypatch.setattr(ditmesh.local, "run_up", lambda cfg: configs.append(cfg) or 0)
    assert main(["up", "--model", "X", *SPEED_FLAGS]) == 0
    (cfg,) = configs
    args = build_parser().parse_args(["serve", "denoiser", "--model", "X", *cfg.denoiser_args])
    assert _speedups(args) == Speedups(
        compile=True, cuda_graphs=True, attention="cudnn", fuse_qkv=True
    )


def test_warmup_sizes_are_the_default_then_the_asked_ones_checked_like_requests(model):
    default = (model.family.default_size, model.family.default_size)
    assert warmup_sizes(model, EAGER) == [default]
    speed = Speedups(compile=True, warmup_sizes=((512, 768), default, (512, 768)))
    assert warmup_sizes(model, speed) == [default, (512, 768)]  # once each, default first
    with pytest.raises(InvalidArgument, match="multiple of"):
        warmup_sizes(model, Speedups(compile=True, warmup_sizes=((500, 512),)))


def test_cli_warmup_sizes():
    from ditmesh.cli import _speedups, build_parser

    args = build_parser().parse_args(
        ["serve", "denoiser", "--model", "m", "--compile", "--warmup-sizes", "512x768,1024x1024"]
    )
    assert _speedups(args).warmup_sizes == ((512, 768), (1024, 1024))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "denoiser", "--model", "m", "--warmup-sizes", "big"])


def test_compile_mode_is_checked_and_described():
    with pytest.raises(ValueError, match="max-autotune-no-cudagraphs"):
        Speedups(compile=True, compile_mode="reduce-overhead")  # its own CUDA graphs
    speed = Speedups(compile=True, compile_mode="max-autotune-no-cudagraphs", cuda_graphs=True)
    assert speed.describe() == "compile=max-autotune-no-cudagraphs, cuda_graphs"


def test_comm_overlap_is_checked_described_and_passed_by_up(monkeypatch):
    import ditmesh.local
    from ditmesh.cli import _speedups, build_parser, main

    with pytest.raises(ValueError, match="off, reorder, schedule"):
        Speedups(compile=True, comm_overlap="sometimes")
    assert Speedups(compile=True, comm_overlap="reorder").describe() == (
        "compile, comm_overlap=reorder"
    )
    args = build_parser().parse_args(
        ["serve", "denoiser", "--model", "X", "--compile", "--comm-overlap", "reorder"]
    )
    assert _speedups(args) == Speedups(compile=True, comm_overlap="reorder")
    configs = []
    monkeypatch.setattr(ditmesh.local, "run_up", lambda cfg: configs.append(cfg) or 0)
    assert main(["up", "--model", "X", "--compile", "--comm-overlap", "schedule"]) == 0
    assert "--comm-overlap=schedule" in configs[0].denoiser_args


def test_comm_overlap_this_torch_cannot_do_is_refused_before_the_gang_starts(
    monkeypatch, tiny_flux
):
    import importlib.util
    import sys
    import types

    import torch._inductor

    from ditmesh.common.errors import InvalidArgument
    from ditmesh.denoiser.gang import GangRunner
    from ditmesh.denoiser.parallel.mesh import ParallelConfig
    from ditmesh.denoiser.speed import check_comm_overlap

    check_comm_overlap("reorder")  # this torch has the passes
    # An inductor config without the overlap scheduler (an older torch).
    older = types.SimpleNamespace()
    monkeypatch.setattr(torch._inductor, "config", older)
    monkeypatch.setitem(sys.modules, "torch._inductor.config", older)
    with pytest.raises(InvalidArgument, match="no overlap scheduler"):
        check_comm_overlap("schedule")
    with pytest.raises(InvalidArgument, match="no overlap scheduler"):
        GangRunner.of(
            tiny_flux,
            ParallelConfig(ulysses=2),
            device="cpu",
            dtype="float32",
            speed=Speedups(compile=True, comm_overlap="schedule"),
        )
    monkeypatch.undo()
    if importlib.util.find_spec("triton") is None:
        with pytest.raises(InvalidArgument, match="needs triton"):
            check_comm_overlap("schedule")


def test_warm_up_runs_each_job_and_says_so(model, caplog):
    from ditmesh.denoiser.runner import warm_up, warmup_job

    adapter = load_adapter(model, torch.device("cpu"), "float32")
    jobs = [warmup_job(adapter, model, cfg=False, size=s) for s in ((64, 64), (64, 128))]
    ran = []
    with caplog.at_level("INFO", logger="ditmesh.denoiser.runner"):
        warm_up(ran.append, jobs)
    assert ran == jobs
    text = caplog.text
    assert "warming up at 64x64" in text and "warm at 64x128 in" in text


@pytest.mark.parametrize(
    "family,expected",
    [
        ("flux", lambda t: len(t.transformer_blocks) + len(t.single_transformer_blocks)),
        ("hunyuandit", lambda t: len(t.blocks)),
        ("cogvideox", lambda t: len(t.transformer_blocks)),
        ("mochi", lambda t: len(t.transformer_blocks)),
    ],
)
def test_compile_blocks_finds_every_familys_blocks(family, expected, tmp_path):
    """--compile compiles each repeated block; HunyuanDiT names its list `blocks`, and a
    model with none found is refused rather than silently left eager."""
    from ditmesh.denoiser.speed import compile_blocks
    from ditmesh.tiny import make_tiny

    adapter = load_adapter(resolve_model(str(make_tiny(family, tmp_path / family))), "cpu")
    transformer = adapter.transformer
    assert compile_blocks(transformer) == expected(transformer) > 0
    with pytest.raises(ValueError, match="no transformer blocks"):
        compile_blocks(torch.nn.Linear(2, 2))
