"""Local attention kernels, chosen by device and dtype.

Two entry points, both on [batch, heads, seq, head_dim] tensors with the default
1/sqrt(head_dim) scale:
- `attention(q, k, v)`: output only (PyTorch SDPA; it picks flash / cuDNN /
  efficient kernels on GPU by itself).
- `attention_lse(q, k, v)`: output and log-sum-exp [batch, heads, seq] in float32,
  what ring attention needs to merge partial results. flash-attn when installed
  (GPU, fp16/bf16), else PyTorch's flash / efficient ops, else the CPU flash op.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


@functools.cache
def _flash_attn_func():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_func

    return flash_attn_func


def attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)[
            :2
        ]
        return out, lse.float()
    if q.dtype in (torch.float16, torch.bfloat16):
        fa = _flash_attn_func()
        if fa is not None:
            # flash-attn takes [batch, seq, heads, dim].
            out, lse, _ = fa(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_attn_probs=True
            )
            return out.transpose(1, 2), lse.float()
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[
            :2
        ]
        return out, lse.float()
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, False
    )[:2]
    return out, lse[..., : q.shape[2]].float()


def merge(
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combines two attention results over disjoint key sets (kept in float32)."""
    block_out = block_out.float()
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - new_lse).unsqueeze(-1) + block_out * torch.exp(
        block_lse - new_lse
    ).unsqueeze(-1)
    return out, new_lse
