"""PipeFusion's attention: each module keeps the keys and values of the whole image.

A patch's own keys and values are fresh; the other patches' are those the module kept
from the last time it saw them (this step for earlier patches, the previous step for
later ones). A whole-image pass (warm-up) replaces them all; without one, the first
step's patches attend only to the rows computed so far (see `_StaleKV._remember`). `PatchContext` says which
pass is running; the loop (pipefusion.py) sets it, the processors and the hooks of
pipefusion_stage.py read it. Which processor goes on which attention is the family's
PipeFusionPlan (flux.py, sd3.py, pixart.py, hunyuan.py). A cross-attention (PixArt's and
HunyuanDiT's attn2) keeps its own processor: its keys and values are the text's, the same
for every patch (HunyuanDiT's queries take the patch's rows of the rotary table, which
the stage's hooks cut).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ditmesh.denoiser.parallel import ulysses as U
from ditmesh.denoiser.parallel.processors import _check_plain, _projection
from ditmesh.denoiser.parallel.usp import SequenceParallel


@dataclass
class PatchContext:
    """What the current forward pass is; shared by the processors of one model."""

    full: bool = True
    """The whole image (warm-up): keys and values are replaced, not patched."""
    text_total: int = 0
    """Text tokens of the request (their rows come first in the kept keys and values)."""
    text_len: int = 0
    """Text tokens in this pass: all of them with patch 0 (or the whole image), else 0."""
    start: int = 0
    stop: int = 0
    """Image token rows of this pass."""
    image_total: int = 0
    """Image tokens of the whole image."""
    branch: str = "cond"
    """CFG branch of this pass: each keeps its own keys and values."""


class _StaleKV:
    """Kept keys and values of one attention module, and attention over them."""

    text = True
    """Whether the kept keys start with the text's (joint attention) or not (self-attention)."""

    def __init__(self, ctx: PatchContext, sp: SequenceParallel | None = None) -> None:
        self.ctx = ctx
        self.ulysses = None if sp is None or sp.ulysses.size == 1 else sp.ulysses
        self.sp = sp
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, q, k, v, text_len: int) -> torch.Tensor:
        """q, k, v [B, text_len + L, H, D] (text first, then this rank's image rows) ->
        attention output of the same rows over all kept keys and values, [B, ., H*D]."""
        local = q.shape[1] - text_len
        if self.ulysses is not None:
            q, k, v = self._to_heads(q, k, v, text_len)
        keys, values = self._remember(k, v, text_len)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        ).transpose(1, 2)
        if self.ulysses is not None:
            out = self._to_rows(out, text_len, local)
        return out.flatten(2, 3).to(q.dtype)

    def _to_heads(self, q, k, v, text_len: int):
        """Ulysses: this rank's image rows -> the patch's rows (padding dropped) for this
        rank's heads; the text (whole on every rank) -> its heads."""
        ug = self.ulysses
        img = U.seq_to_heads(torch.cat([x[:, text_len:] for x in (q, k, v)]), ug)
        img = img[:, : self.sp.shards.total].chunk(3)
        return (
            torch.cat([U.head_slice(x[:, :text_len], ug), i], dim=1)
            for x, i in zip((q, k, v), img, strict=True)
        )

    def _remember(self, k, v, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept keys and values of this pass's branch with this pass's written in
        (a whole-image pass replaces them), cut to the rows that hold any.

        Without a warm-up step (`pipefusion_warmup` 0) the first step's patches find no
        kept keys: the first pass of a branch makes room for the whole image, and until
        every patch has been through once a pass attends to the text and the image rows
        written so far, the patches before it and itself (patches run in token order),
        never to rows not yet computed. `kv[branch]` is (keys, values, image rows seen)."""
        ctx = self.ctx
        if ctx.full:
            self.kv[ctx.branch] = k, v, ctx.image_total
            return k, v
        t = ctx.text_total if self.text else 0
        if ctx.branch not in self.kv:
            if self.text and not text_len:
                raise RuntimeError("PipeFusion's first patch of a request must carry the text")
            rows = (k.shape[0], t + ctx.image_total, *k.shape[2:])
            self.kv[ctx.branch] = k.new_zeros(rows), v.new_zeros(rows), 0
        keys, values, seen = self.kv[ctx.branch]
        if ctx.start > seen:
            raise RuntimeError(
                f"PipeFusion patch at image rows {ctx.start}:{ctx.stop} before rows "
                f"{seen}:{ctx.start} were ever computed (patches run in token order)"
            )
        if text_len:
            keys[:, :t] = k[:, :text_len]
            values[:, :t] = v[:, :text_len]
        keys[:, t + ctx.start : t + ctx.stop] = k[:, text_len:]
        values[:, t + ctx.start : t + ctx.stop] = v[:, text_len:]
        seen = max(seen, ctx.stop)
        self.kv[ctx.branch] = keys, values, seen
        if seen == ctx.image_total:
            return keys, values
        return keys[:, : t + seen], values[:, : t + seen]

    def _to_rows(self, out, text_len: int, local: int) -> torch.Tensor:
        """Ulysses, back: the text's heads gathered, the patch's rows (padded again) to
        this rank's rows of all heads."""
        ug = self.ulysses
        text_out = U.gather_heads(out[:, :text_len].contiguous(), ug)
        img_out = out[:, text_len:]
        pad = local * ug.size - img_out.shape[1]
        if pad:
            img_out = F.pad(img_out, (0, 0, 0, 0, 0, pad))
        return torch.cat([text_out, U.heads_to_seq(img_out.contiguous(), ug)], dim=1)


class StaleKVProcessor(_StaleKV):
    """Flux attention (double- and single-stream blocks) over kept keys and values.

    Same projections, norms and rotary embedding as diffusers' Flux processor; the
    keys and values of this pass are written into the module's kept ones, and the pass's
    queries attend to all of them.
    """

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("attention masks are not supported under PipeFusion")
        double = encoder_hidden_states is not None
        text_len = encoder_hidden_states.shape[1] if double else self.ctx.text_len
        q = _projection(attn, hidden_states, attn.to_q, attn.norm_q)
        k = _projection(attn, hidden_states, attn.to_k, attn.norm_k)
        v = _projection(attn, hidden_states, attn.to_v, None)
        if double:
            e = encoder_hidden_states
            q = torch.cat([_projection(attn, e, attn.add_q_proj, attn.norm_added_q), q], dim=1)
            k = torch.cat([_projection(attn, e, attn.add_k_proj, attn.norm_added_k), k], dim=1)
            v = torch.cat([_projection(attn, e, attn.add_v_proj, None), v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.attend(q, k, v, text_len)
        if double:
            img = attn.to_out[1](attn.to_out[0](out[:, text_len:]))
            return img, attn.to_add_out(out[:, :text_len])
        return out


class StaleJointProcessor(_StaleKV):
    """SD3's joint attention (image tokens, then context tokens) over kept keys and values;
    projections and norms as diffusers' JointAttnProcessor2_0."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        if attention_mask is not None or encoder_hidden_states is None:
            raise ValueError("PipeFusion's SD3 attention takes image and context tokens, no mask")
        e = encoder_hidden_states
        text_len = e.shape[1]
        parts = (
            (attn.to_q, attn.norm_q, attn.add_q_proj, attn.norm_added_q),
            (attn.to_k, attn.norm_k, attn.add_k_proj, attn.norm_added_k),
            (attn.to_v, None, attn.add_v_proj, None),
        )
        q, k, v = (
            torch.cat(
                [_projection(attn, e, add, add_norm), _projection(attn, hidden_states, lin, norm)],
                dim=1,
            )
            for lin, norm, add, add_norm in parts
        )
        out = self.attend(q, k, v, text_len)
        text_out = out[:, :text_len]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return attn.to_out[1](attn.to_out[0](out[:, text_len:])), text_out


class StaleSelfProcessor(_StaleKV):
    """Image self-attention (SD3.5's second attention, PixArt's and HunyuanDiT's attn1)
    over kept keys and values; projections as diffusers' AttnProcessor2_0 for a plain
    attention, and, where the model passes a rotary table (HunyuanDiT, as its
    HunyuanAttnProcessor2_0 does), rotary positions on the normed queries and keys. The
    table's rows are this pass's tokens, so the kept keys carry their own positions."""

    text = False

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        image_rotary_emb=None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None or encoder_hidden_states is not None:
            raise ValueError("PipeFusion's image self-attention takes image tokens only, no mask")
        _check_plain(attn)
        q = _projection(attn, hidden_states, attn.to_q, attn.norm_q)
        k = _projection(attn, hidden_states, attn.to_k, attn.norm_k)
        v = _projection(attn, hidden_states, attn.to_v, None)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        return attn.to_out[1](attn.to_out[0](self.attend(q, k, v, 0)))
