"""Parallel attention processors: the models' own projections, the gang's attention.

Each follows the processor diffusers installs for that attention (same
projections, norms and rotary embedding, from diffusers' own helpers) and hands
the attention itself to `SequenceParallel`. Text tokens are passed separately so
they are attended exactly once.
"""

from __future__ import annotations

import torch

from ditmesh.denoiser.parallel.usp import SequenceParallel


class FluxParallelProcessor:
    """For FluxAttention in both double-stream (text passed in) and single-stream
    (text concatenated in front of the image tokens) blocks.

    Under Ulysses alone, v, then k, then q are computed and each starts its exchange at
    once, so the exchange of one overlaps the projection, norm and rotary embedding of
    the next. (The separate q/k/v projections are used even if fused ones exist: their
    weights are the same numbers, see speed.fuse_qkv.)
    """

    def __init__(self, sp: SequenceParallel, attn: torch.nn.Module) -> None:
        self.sp = sp

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
            raise ValueError("attention masks are not supported under sequence parallelism")
        d = attn.head_dim
        double = encoder_hidden_states is not None
        # Single-stream blocks carry the text tokens in front of the image tokens.
        text_len = encoder_hidden_states.shape[1] if double else self.sp.shards.text_len

        def rotate(x, start, stop):
            if image_rotary_emb is None:
                return x
            freqs = tuple(f[start:stop] for f in image_rotary_emb)
            return apply_rotary_emb(x, freqs, sequence_dim=1)

        img_layers = {
            0: (attn.to_q, attn.norm_q),
            1: (attn.to_k, attn.norm_k),
            2: (attn.to_v, None),
        }
        text_layers = {}
        if double:
            text_layers = {
                0: (attn.add_q_proj, attn.norm_added_q),
                1: (attn.add_k_proj, attn.norm_added_k),
                2: (attn.add_v_proj, None),
            }

        def project(i: int):
            """(image part [B, L, H, D], text part [B, T, H, D]) of q (0), k (1) or v (2)."""
            layer, norm = img_layers[i]
            x = layer(hidden_states).unflatten(-1, (-1, d))
            if norm is not None:
                x = norm(x)
            if not double:
                if i < 2:
                    x = rotate(x, 0, None)
                return x[:, text_len:], x[:, :text_len]
            layer, norm = text_layers[i]
            t = layer(encoder_hidden_states).unflatten(-1, (-1, d))
            if norm is not None:
                t = norm(t)
            if i < 2:
                # The rotary table covers the text positions, then this rank's image ones.
                x, t = rotate(x, text_len, None), rotate(t, 0, text_len)
            return x, t

        b, seq = hidden_states.shape[0], hidden_states.shape[1] - (0 if double else text_len)
        ex = self.sp.head_exchange((b, seq, attn.heads, d), text_len, hidden_states)
        if ex is not None:
            for i in (2, 1, 0):
                ex.send(i, *project(i))
            out = ex.attend()
        else:
            parts = [project(i) for i in range(3)]
            out = self.sp.attention_joint(*(p[0] for p in parts), tuple(p[1] for p in parts))
        out = out.flatten(2, 3).to(hidden_states.dtype)
        if double:
            img_part = attn.to_out[1](attn.to_out[0](out[:, text_len:]))
            return img_part, attn.to_add_out(out[:, :text_len])
        return out


def _check_plain(attn) -> None:
    for flag in ("spatial_norm", "group_norm"):
        if getattr(attn, flag, None) is not None:
            raise ValueError(f"attention with {flag} is not supported under sequence parallelism")
    if (
        getattr(attn, "residual_connection", False)
        or getattr(attn, "rescale_output_factor", 1.0) != 1.0
    ):
        raise ValueError(
            "attention with a residual or rescaled output is not supported under sequence parallelism"
        )


def _projected(attn, x: torch.Tensor, to_q, to_k, to_v, norm_q, norm_k):
    """q, k, v of `x` as [B, S, H, D], with the module's q/k norms applied.

    diffusers' norms act on the last dim, so [B, S, H, D] works as [B, H, S, D] does.
    """
    b, heads = x.shape[0], attn.heads

    def split(t):
        return t.view(b, -1, heads, t.shape[-1] // heads)

    q, k, v = split(to_q(x)), split(to_k(x)), split(to_v(x))
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


def _no_extras(args: tuple, kwargs: dict) -> None:
    # Extra attention inputs (IP-adapter images, ...) would be silently dropped: refuse.
    extra = [k for k, v in kwargs.items() if v is not None] + (["positional"] if args else [])
    if extra:
        raise ValueError(f"attention inputs {extra} are not supported under sequence parallelism")


class JointParallelProcessor:
    """For SD3's joint attention (image tokens first, context tokens after)."""

    def __init__(self, sp: SequenceParallel, attn: torch.nn.Module) -> None:
        _check_plain(attn)
        self.sp = sp

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs
    ):
        if attention_mask is not None:
            raise ValueError("attention masks are not supported under sequence parallelism")
        _no_extras(args, kwargs)
        q, k, v = _projected(
            attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k
        )
        text = None
        if encoder_hidden_states is not None:
            text = _projected(
                attn,
                encoder_hidden_states,
                attn.add_q_proj,
                attn.add_k_proj,
                attn.add_v_proj,
                attn.norm_added_q,
                attn.norm_added_k,
            )
        img_out, text_out = self.sp.attention(q, k, v, text)
        img_out = img_out.flatten(2, 3).to(q.dtype)
        img_out = attn.to_out[1](attn.to_out[0](img_out))
        if encoder_hidden_states is None:
            return img_out
        text_out = text_out.flatten(2, 3).to(q.dtype)
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return img_out, text_out


class SelfParallelProcessor:
    """For plain image self-attention (PixArt attn1, SD3.5 attn2): no text tokens."""

    def __init__(self, sp: SequenceParallel, attn: torch.nn.Module) -> None:
        _check_plain(attn)
        self.sp = sp

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs
    ):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SelfParallelProcessor is for self-attention without a mask")
        _no_extras(args, kwargs)
        q, k, v = _projected(
            attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k
        )
        out, _ = self.sp.attention(q, k, v, None)
        out = out.flatten(2, 3).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))
