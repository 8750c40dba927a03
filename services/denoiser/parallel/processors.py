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

    Projections go through `attend` (the exchange of each overlaps the next projection,
    norm and rotary embedding). The separate q/k/v projections are used even if fused
    ones exist: their weights are the same numbers, see speed.fuse_qkv.
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

        img_layers = ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k), (attn.to_v, None))
        text_layers = ()
        if double:
            text_layers = (
                (attn.add_q_proj, attn.norm_added_q),
                (attn.add_k_proj, attn.norm_added_k),
                (attn.add_v_proj, None),
            )

        def project(i: int):
            """(image part [B, L, H, D], text part [B, T, H, D]) of q (0), k (1) or v (2)."""
            x = _projection(attn, hidden_states, *img_layers[i])
            if not double:
                if i < 2:
                    x = rotate(x, 0, None)
                return x[:, text_len:], x[:, :text_len]
            t = _projection(attn, encoder_hidden_states, *text_layers[i])
            if i < 2:
                # The rotary table covers the text positions, then this rank's image ones.
                x, t = rotate(x, text_len, None), rotate(t, 0, text_len)
            return x, t

        b, seq = hidden_states.shape[0], hidden_states.shape[1] - (0 if double else text_len)
        out = attend(self.sp, (b, seq, attn.heads, d), text_len, hidden_states, project)
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


def _projection(attn, x: torch.Tensor, layer, norm) -> torch.Tensor:
    """One of q, k, v of `x` as [B, S, H, D], with its norm (if any) applied.

    diffusers' norms act on the last dim, so [B, S, H, D] works as [B, H, S, D] does.
    """
    t = layer(x)
    t = t.view(x.shape[0], -1, attn.heads, t.shape[-1] // attn.heads)
    return t if norm is None else norm(t)


def attend(sp: SequenceParallel, shape, text_len: int, like: torch.Tensor, project):
    """Joint attention output [B, T+L, H, D] (text first) of what `project(i)` gives:
    (image part, text part or None) of q (0), k (1) or v (2).

    Under Ulysses alone v, then k, then q are projected and each starts its exchange at
    once, so the exchange of one overlaps the projection of the next.
    """
    ex = sp.head_exchange(shape, text_len, like)
    if ex is not None:
        for i in (2, 1, 0):
            ex.send(i, *project(i))
        return ex.attend()
    parts = [project(i) for i in range(3)]
    text = None if text_len == 0 else tuple(p[1] for p in parts)
    return sp.attention_joint(*(p[0] for p in parts), text)


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
        img_layers = ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k), (attn.to_v, None))
        text_layers = (
            (attn.add_q_proj, attn.norm_added_q),
            (attn.add_k_proj, attn.norm_added_k),
            (attn.add_v_proj, None),
        )
        has_text = encoder_hidden_states is not None
        text_len = encoder_hidden_states.shape[1] if has_text else 0

        def project(i: int):
            img = _projection(attn, hidden_states, *img_layers[i])
            if not has_text:
                return img, None
            return img, _projection(attn, encoder_hidden_states, *text_layers[i])

        shape = (*hidden_states.shape[:2], attn.heads, attn.to_q.out_features // attn.heads)
        out = attend(self.sp, shape, text_len, hidden_states, project)
        out = out.flatten(2, 3).to(hidden_states.dtype)
        img_out = attn.to_out[1](attn.to_out[0](out[:, text_len:]))
        if not has_text:
            return img_out
        text_out = out[:, :text_len]
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
        layers = ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k), (attn.to_v, None))

        def project(i: int):
            return _projection(attn, hidden_states, *layers[i]), None

        shape = (*hidden_states.shape[:2], attn.heads, attn.to_q.out_features // attn.heads)
        out = attend(self.sp, shape, 0, hidden_states, project)
        out = out.flatten(2, 3).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out))
