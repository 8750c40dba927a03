"""What makes the transformer fast on a GPU, applied the same way on every rank.

`Speedups` is plain values so it crosses processes (gang ranks, torchrun workers);
`apply` changes an adapter in a fixed order:

1. fused q/k/v projections (one GEMM instead of three, weights shared, no copy);
1b. FP8 GEMMs for the blocks' Linears (fp8.py), before compile so the activations'
   quantisation is traced into the compiled graphs and fused;
1c. DiTFastAttn (fastattn.py): the attention layers follow a calibrated plan (the
   decision stays outside the compiled graphs);
2. torch.compile of the repeated blocks (fused norms, rope, MLP epilogues); the
   Ulysses exchange is traced into their graphs (functional collectives), ring
   attention's point-to-point exchange stays eager between them;
3. the attention kernel priority (cuDNN or flash attention first);
4. CUDA graphs: the whole transformer forward, collectives included, captured per
   input signature and replayed, which removes the host's launch overhead.

Every rank of a gang must apply the same `Speedups`: capture runs the forward
(and so its collectives) a different number of times than eager calls do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.nn as nn

from ditmesh.common.errors import InvalidArgument

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "cudnn", "flash", "efficient", "math")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
"""torch.compile modes; those that make CUDA graphs of their own are left out (the
whole forward is captured by --cuda-graphs, collectives included)."""


COMM_OVERLAP = ("off", "reorder", "schedule")


@dataclass(frozen=True, kw_only=True, slots=True)
class Speedups:
    compile: bool = False
    compile_mode: str = "default"
    """torch.compile mode; max-autotune-no-cudagraphs also times Triton GEMMs with fused
    epilogues against cuBLAS (minutes more at start)."""
    cuda_graphs: bool = False
    attention: str = "auto"
    """SDPA kernel tried first: auto (PyTorch's own order), cudnn, flash, efficient, math."""
    fuse_qkv: bool = False
    fp8: bool = False
    """The blocks' Linear layers in FP8 e4m3 (dynamic per-row activation scales), see fp8.py;
    needs an FP8 GPU (sm_89+), refused elsewhere (CPU: a test-only emulation)."""
    comm_overlap: str = "off"
    """With compile: let inductor move the Ulysses exchange's collectives and waits to
    overlap compute. off; reorder (its reordering passes: collectives raised, waits sunk,
    peak memory kept); schedule (its overlap scheduler on the ATen graph). Not yet
    measured on a GPU, so off by default."""
    warmup_sizes: tuple[tuple[int, int], ...] = ()
    """(height, width) warmed up at start besides the model's default size."""
    fast_attn: str = ""
    """A DiTFastAttn plan (fastattn.py; a file, or a model folder holding one); "" off."""

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(
                f"attention kernel must be one of {', '.join(ATTENTION_CHOICES)}, not {self.attention!r}"
            )
        if self.comm_overlap not in COMM_OVERLAP:
            raise ValueError(
                f"comm overlap must be one of {', '.join(COMM_OVERLAP)}, not {self.comm_overlap!r}"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile mode must be one of {', '.join(COMPILE_MODES)}, not {self.compile_mode!r}"
            )

        if self.fast_attn and self.cuda_graphs:
            raise InvalidArgument(
                "--fast-attn cannot run with --cuda-graphs (its method changes step by step, "
                "a captured forward cannot)"
            )

    def reported(self) -> list[str]:
        """The names a request's result gives for the speed-ups of this service that can
        change its pixels or its speed (DenoiseStep.speedups)."""
        names = {"compile": "compile", "cuda_graphs": "cuda-graphs", "fp8": "fp8"}
        on = [name for attr, name in names.items() if getattr(self, attr)]
        return on + (["fast-attn"] if self.fast_attn else [])

    def describe(self) -> str:
        on = [n for n in ("compile", "cuda_graphs", "fuse_qkv", "fp8") if getattr(self, n)]
        if self.compile and self.compile_mode != "default":
            on[0] = f"compile={self.compile_mode}"
        if self.attention != "auto":
            on.append(f"attention={self.attention}")
        if self.comm_overlap != "off":
            on.append(f"comm_overlap={self.comm_overlap}")
        if self.fast_attn:
            on.append("fast_attn")
        return ", ".join(on) or "eager"


EAGER = Speedups()
"""No speedups: PyTorch eager, its own attention kernel order."""


def fuse_qkv(transformer: nn.Module) -> int:
    """Fuses q/k/v (and the text stream's) projections of every attention that supports it.

    diffusers' fuse_projections copies the weights into a new layer and keeps the old
    ones; here the old layers are made views of the fused weight, so memory is unchanged
    and code reading `to_q` (the sequence-parallel processors) sees the same numbers.
    """
    fused = 0
    for module in transformer.modules():
        if not getattr(module, "_supports_qkv_fusion", False) or not hasattr(
            module, "fuse_projections"
        ):
            continue
        if getattr(module, "fused_projections", False) or not hasattr(module, "to_q"):
            continue
        module.fuse_projections()
        _share(module, "to_qkv", ("to_q", "to_k", "to_v"))
        _share(module, "to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))
        fused += 1
    return fused


def _share(module: nn.Module, fused_name: str, parts: tuple[str, ...]) -> None:
    fused = getattr(module, fused_name, None)
    if fused is None:
        return
    start = 0
    for name in parts:
        layer = getattr(module, name)
        n = layer.weight.shape[0]
        layer.weight = nn.Parameter(fused.weight[start : start + n], requires_grad=False)
        if layer.bias is not None and fused.bias is not None:
            layer.bias = nn.Parameter(fused.bias[start : start + n], requires_grad=False)
        start += n
    fused.weight.requires_grad_(False)
    if fused.bias is not None:
        fused.bias.requires_grad_(False)


def compile_blocks(transformer: nn.Module, mode: str = "default") -> int:
    """torch.compile of each repeated block; one block's graph serves all of them.

    Each request size is one more compiled graph (shapes are static); the recompile
    limit is raised so a server seeing many sizes keeps compiling instead of quietly
    falling back to eager after the default 8.
    """
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
            break
    compiled = 0
    # HunyuanDiT names its list `blocks`; the others `transformer_blocks` (Flux: and
    # `single_transformer_blocks`).
    for name in ("transformer_blocks", "single_transformer_blocks", "blocks"):
        for block in getattr(transformer, name, ()):
            block.compile(fullgraph=False, dynamic=False, mode=None if mode == "default" else mode)
            compiled += 1
    if not compiled:
        raise ValueError("--compile found no transformer blocks to compile in this model")
    return compiled


REORDER_PASSES = (
    "reorder_communication_preserving_peak_memory",
    "sink_waits_iterative",
    "reorder_communication_preserving_peak_memory",
)


def check_comm_overlap(how: str) -> None:
    """Raises InvalidArgument where this torch cannot do `how` (checked before a gang's
    processes start, so a bad flag is one line, not a compile error at warm-up)."""
    import importlib.util

    import torch._inductor.comms as comms
    import torch._inductor.config as ic

    if how == "reorder" and not any(hasattr(comms, p) for p in REORDER_PASSES):
        raise InvalidArgument("--comm-overlap reorder: this torch's inductor has no such passes")
    if how == "schedule":
        opts = getattr(ic, "aten_distributed_optimizations", None)
        if opts is None or not hasattr(opts, "enable_overlap_scheduling"):
            raise InvalidArgument(
                "--comm-overlap schedule: this torch's inductor has no overlap scheduler"
            )
        if importlib.util.find_spec("triton") is None:
            # Its cost model reads the GPU's memory bandwidth through triton.
            raise InvalidArgument("--comm-overlap schedule needs triton (a GPU install of torch)")


def set_comm_overlap(how: str) -> None:
    """Inductor settings (process-wide) under which compiled collectives overlap compute;
    refuses (check_comm_overlap) rather than silently compiling without them."""
    import torch._inductor.comms as comms
    import torch._inductor.config as ic

    check_comm_overlap(how)
    if how == "reorder":
        ic.reorder_for_compute_comm_overlap = True
        ic.reorder_for_compute_comm_overlap_passes = [
            p for p in REORDER_PASSES if hasattr(comms, p)
        ]
    elif how == "schedule":
        ic.aten_distributed_optimizations.enable_overlap_scheduling = True


def _backends(choice: str) -> list:
    from torch.nn.attention import SDPBackend

    order = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    first = order.pop(choice)
    # The rest stay as fallbacks (other devices, dtypes or shapes the first cannot take).
    return [first, *order.values()]


class WithAttentionKernel:
    """Calls `fn` with an SDPA kernel priority in force (also while compiling/capturing)."""

    def __init__(self, fn, choice: str) -> None:
        self.fn = fn
        self.backends = _backends(choice)

    def __call__(self, *args, **kwargs):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.backends, set_priority=True):
            return self.fn(*args, **kwargs)


def load_on_host(speed: Speedups) -> bool:
    """Whether the transformer should load on the host and reach the device in `apply`:
    with --fp8 its blocks go over converted, one at a time, so the device's peak is the FP8
    model's rather than the bf16 one's."""
    return speed.fp8


def apply(adapter, speed: Speedups) -> bool:
    """Applies `speed` to the adapter's transformer and its `forward` callable, moving the
    weights to the device first if they are still on the host (`load_on_host`).

    Returns whether a warm-up request is worth running at start: something compiles
    or captures on first use (CUDA graphs are GPU-only and skipped elsewhere).
    """
    transformer = adapter.transformer
    warm = False
    if speed.fuse_qkv:
        n = fuse_qkv(transformer)
        if n:
            log.info("fused q/k/v projections of %d attention modules", n)
        else:
            log.warning("--fuse-qkv: this model has no attention diffusers can fuse; unchanged")
    if speed.fp8:
        from ditmesh.denoiser import fp8

        granularity = fp8.check(adapter.device, adapter.dtype)
        # Weights still on the host (loaded there for --fp8, see load_on_host): each block
        # goes to the device as it is converted, the rest after.
        n = fp8.convert_blocks(transformer, granularity, device=adapter.device)
        log.info("fp8: %d Linear layers of the blocks in e4m3 (%s-wise scales)", n, granularity)
    adapter.to_device()
    if speed.fast_attn:
        from ditmesh.denoiser.fastattn import load_and_install

        load_and_install(adapter, speed.fast_attn, compile=speed.compile)
    if speed.compile:
        if speed.comm_overlap != "off":
            set_comm_overlap(speed.comm_overlap)
        compile_blocks(transformer, speed.compile_mode)
        warm = True
    if speed.attention != "auto":
        adapter.forward = WithAttentionKernel(adapter.forward, speed.attention)
    if speed.cuda_graphs and adapter.device.type == "cuda":
        from ditmesh.denoiser.graphs import GraphedForward

        adapter.forward = GraphedForward(adapter.forward)
        warm = True
    return warm


def release(adapter) -> None:
    """Drops captured CUDA graphs (before the process group is destroyed)."""
    release_graphs = getattr(adapter.forward, "release", None)
    if release_graphs is not None:
        release_graphs()
