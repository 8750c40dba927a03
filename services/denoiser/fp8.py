"""FP8 (e4m3) GEMMs for the Linear layers inside the transformer's repeated blocks.

`convert_blocks` swaps every eligible `nn.Linear` in the blocks for an `Fp8Linear`: its
weight quantised once to e4m3 with one scale per output row, its input quantised on
every call with one scale per row (token) computed from that row's absolute maximum,
and the product taken by `torch._scaled_mm` (cuBLASLt's FP8 GEMM on a GPU), the result
in the activations' dtype. The embedders, the norms (AdaLN's modulation projections
too: they set every scale and gate), the final projection and anything else outside
the blocks stay in bf16.

Why `torch._scaled_mm` and not torchao's float8 config: torchao 0.18 (the wheel current
with torch 2.13) installs here, but its `Float8DynamicActivationFloat8WeightConfig` asserts
an FP8 GPU when it quantises, so neither the conversion nor any gang layout composed with
it could be tested on CPU; `_scaled_mm` is the same PyTorch-maintained GEMM torchao calls,
runs per-row on CPU as well (an emulation, slower than float32 there), and is a plain op
inductor lowers, so under `--compile` the activation's amax, divide and cast are traced
into the block's graph and fused into the neighbouring kernels (the issue measured that
unfused they eat most of the gain).

Per-row activation scales keep the gang layouts with one process: a Ulysses or Ring rank
holds whole tokens, a CFG or DP rank whole batch rows, so each row is quantised with the
same scale wherever it is (up to float summation order, which can move a value across an
e4m3 rounding boundary: one code, tests/test_fp8.py). A PipeFusion rank converts the
blocks it holds.

Granularity: per-row on sm_90 and later (and CPU); per-tensor on sm_89 (Ada), where
PyTorch's row-wise `_scaled_mm` is not promised. Per-tensor activation scales depend on
which tokens a rank holds, so there the gang layouts are close to one process, not equal.

What this leaves to others: when to convert (speed.apply, after q/k/v fusion and before
torch.compile; the runners load the weights on the host when --fp8 is on, and apply
converts each block on its way to the device), refusing before weights load (the CLI and
the gang call `check`).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from ditmesh.common.errors import InvalidArgument

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
CPU_ENV = "DITMESH_FP8_CPU"
"""Set to 1 to allow --fp8 on CPU: an emulation for tests (gloo gangs), never faster."""
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")
"""Where the families keep their repeated blocks (HunyuanDiT: `blocks`)."""
GRANULARITIES = ("row", "tensor")


def check(device: torch.device | str, dtype: torch.dtype | str) -> str:
    """Raises InvalidArgument where --fp8 cannot run; returns the scale granularity.

    `device` and `dtype` as the CLI takes them ("auto", "cuda:1", "bfloat16") or resolved.
    """
    from ditmesh.common.models import pick_device, pick_dtype

    dev = pick_device(device) if isinstance(device, str) else device
    if dev.type == "cpu":
        if os.environ.get(CPU_ENV) != "1":
            raise InvalidArgument(
                f"--fp8 needs an FP8 GPU (Ada/Hopper or later); on CPU it is an emulation "
                f"for tests only (set {CPU_ENV}=1)"
            )
        log.warning(
            "--fp8 on CPU: emulated FP8 GEMMs (%s=1), for tests; slower than float32", CPU_ENV
        )
        return "row"
    if dev.type != "cuda":
        raise InvalidArgument(f"--fp8 needs an FP8 GPU (Ada/Hopper or later); not {dev.type}")
    major, minor = torch.cuda.get_device_capability(dev)
    if (major, minor) < (8, 9):
        raise InvalidArgument(
            f"--fp8 needs an FP8 GPU (Ada/Hopper or later); this one is sm_{major}{minor}"
        )
    if (dt := pick_dtype(dtype, dev) if isinstance(dtype, str) else dtype) != torch.bfloat16:
        # Row-wise _scaled_mm writes bf16 only; one dtype keeps both granularities alike.
        raise InvalidArgument(f"--fp8 runs with bfloat16 activations (--dtype bfloat16); not {dt}")
    return "row" if major >= 9 else "tensor"


def quantize(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (2-D) as e4m3 and its float32 scales (x ~ q * scale): one per row, or one."""
    xf = x.float()
    if granularity == "row":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        amax = xf.abs().amax()
    # An all-zero row would divide by zero; its scale is then tiny and its codes zero.
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


class Fp8Linear(nn.Module):
    """A Linear whose GEMM runs in FP8: weight quantised once, input on every call."""

    def __init__(self, linear: nn.Linear, granularity: str) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"fp8 granularity must be one of {GRANULARITIES}, not {granularity!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.granularity = granularity
        with torch.no_grad():
            q, scale = quantize(linear.weight.detach(), granularity)
        self.register_buffer("weight_fp8", q.contiguous())
        # _scaled_mm takes the second operand's scales as a (1, N) row.
        self.register_buffer("weight_scale", scale.reshape(1, -1) if scale.dim() else scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q, scale = quantize(x.reshape(-1, self.in_features), self.granularity)
        # The bias is added after, not passed in: row-wise _scaled_mm's bias support varies
        # by PyTorch version, and under compile the add fuses into the GEMM's epilogue.
        y = torch._scaled_mm(
            q, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=x.dtype
        )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, e4m3, {self.granularity}-wise scales"
        )


def eligible(name: str, linear: nn.Linear) -> bool:
    """Converted: a block's Linear outside its norms, with dims the FP8 GEMM takes
    (multiples of 16, cuBLASLt's rule)."""
    in_norm = any(part.startswith("norm") for part in name.split("."))
    return not in_norm and linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def convert_blocks(
    transformer: nn.Module, granularity: str, device: torch.device | None = None
) -> int:
    """Replaces the eligible Linears of every repeated block by `Fp8Linear`; returns how many.

    The bf16 weights go (a q/k/v fused by --fuse-qkv gets its own FP8 copy of each view,
    a few percent of the blocks' weights). `device`: each block moves there just before
    its conversion, so a transformer loaded on the host reaches the GPU with at most one
    block in bf16 there at a time (the GPU never holds the whole bf16 model)."""
    converted = 0
    for list_name in BLOCK_LISTS:
        for block in getattr(transformer, list_name, ()):
            if device is not None:
                block.to(device)
            for name, module in list(block.named_modules()):
                if type(module) is nn.Linear and eligible(name, module):
                    parent_name, _, child = name.rpartition(".")
                    parent = block.get_submodule(parent_name) if parent_name else block
                    setattr(parent, child, Fp8Linear(module, granularity))
                    converted += 1
    if not converted:
        raise ValueError("--fp8 found no Linear layers in this model's transformer blocks")
    return converted
