"""Ring attention: KV blocks travel around the ring; partial results merge by log-sum-exp.

Each rank keeps its queries and attends to one KV block per step while the next
block is already in flight. Tensors are [batch, heads, seq, head_dim].

Padding: the image sequence is padded only at its global tail, so in every block
the real tokens are a prefix of known length and padded keys are cut off, never
attended. Extra keys (the text tokens of joint attention) join the rank's own
block at step 0 only, so every query sees them exactly once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ditmesh.denoiser.parallel.kernels import attention_lse, merge
from ditmesh.denoiser.parallel.mesh import Group


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Group,
    valid_len: Callable[[int], int],
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of local `q` over the union of every ring rank's (k, v) block.

    `valid_len(i)` is how many leading keys of ring rank i's block are real.
    """
    n = group.size
    me = group.rank
    kv = torch.stack([k, v]).contiguous()
    out = lse = None
    for step in range(n):
        pending = None
        if step < n - 1:
            buf = torch.empty_like(kv)
            ops = [
                dist.P2POp(dist.isend, kv, group.global_rank(me + 1), group.pg),
                dist.P2POp(dist.irecv, buf, group.global_rank(me - 1), group.pg),
            ]
            pending = dist.batch_isend_irecv(ops)
        src = (me - step) % n
        keep = valid_len(src)
        bk, bv = kv[0][:, :, :keep], kv[1][:, :, :keep]
        if step == 0 and extra_k is not None:
            bk = torch.cat([extra_k, bk], dim=2)
            bv = torch.cat([extra_v, bv], dim=2)
        if bk.shape[2] > 0:
            o, l_ = attention_lse(q, bk, bv)
            out, lse = merge(out, lse, o, l_)
        if pending is not None:
            for req in pending:
                req.wait()
            kv = buf
    if out is None:  # only padded queries with nothing to attend: their output is dropped
        return torch.zeros_like(q)
    return out.to(q.dtype)
