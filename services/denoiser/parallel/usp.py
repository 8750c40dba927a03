"""USP: Ulysses and Ring composed, with joint text+image attention.

Image tokens are split across the sp group (ulysses x ring); text tokens are
whole on every rank and attended exactly once: under Ulysses each rank takes
its heads of them, under Ring they join the rank's own KV block at step 0.
Tensors are [batch, seq, heads, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditmesh.denoiser.parallel import ulysses as U
from ditmesh.denoiser.parallel.kernels import attention
from ditmesh.denoiser.parallel.mesh import Group
from ditmesh.denoiser.parallel.ring import ring_attention


@dataclass(kw_only=True, slots=True)
class SequenceShards:
    """How the image sequence of the current forward is split (set by the plan's hooks)."""

    total: int = 0
    """Real image tokens in the whole sequence."""
    local: int = 0
    """Tokens per shard (padded): total <= local * sp."""
    text_len: int = 0
    """Text tokens in front of the image tokens (single-stream Flux blocks)."""


@dataclass(kw_only=True, slots=True)
class SequenceParallel:
    ulysses: Group
    ring: Group
    sp: Group
    shard_index: int
    shards: SequenceShards

    def block_valid(self, block: int) -> int:
        """Real tokens in ring block `block` (u consecutive shards)."""
        size = self.ulysses.size * self.shards.local
        return max(0, min(size, self.shards.total - block * size))

    # Collectives stay outside compiled graphs: the blocks around attention are
    # compiled (--compile), the gang's exchange runs eagerly between them.
    @torch.compiler.disable
    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (image output [B, L, H, D], text output [B, T, H, D] or None)."""
        ug, rg = self.ulysses, self.ring
        if ug.size > 1:
            stacked = U.seq_to_heads(torch.cat([q, k, v], dim=0), ug)
            q, k, v = stacked.chunk(3, dim=0)
            if text is not None:
                text = tuple(U.head_slice(t, ug) for t in text)
        t_len = 0 if text is None else text[0].shape[1]
        if text is not None:
            q = torch.cat([text[0], q], dim=1)
        # Kernels take [B, H, S, D].
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        th = None if text is None else (text[1].transpose(1, 2), text[2].transpose(1, 2))
        if rg.size == 1:
            keep = self.block_valid(rg.rank)
            kh, vh = kh[:, :, :keep], vh[:, :, :keep]
            if th is not None:
                kh = torch.cat([th[0], kh], dim=2)
                vh = torch.cat([th[1], vh], dim=2)
            out = attention(qh, kh, vh)
        else:
            out = ring_attention(
                qh,
                kh,
                vh,
                group=rg,
                valid_len=self.block_valid,
                extra_k=None if th is None else th[0],
                extra_v=None if th is None else th[1],
            )
        out = out.transpose(1, 2)
        text_out, img_out = out[:, :t_len], out[:, t_len:]
        if ug.size > 1:
            img_out = U.heads_to_seq(img_out.contiguous(), ug)
            if text is not None:
                text_out = U.gather_heads(text_out, ug)
        return img_out, (text_out if text is not None else None)
