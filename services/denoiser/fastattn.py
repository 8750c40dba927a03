"""DiTFastAttn for Flux: a calibrated plan says, per sampling step and attention layer, how
much of that layer's attention to compute; `install` makes the transformer follow it.

The methods, cheapest first (one per step and layer in the plan):
- `step` (SHARE-STEP): the layer's output at the previous step, reused; nothing computed.
- `window` (WINDOW+RESIDUAL): window attention plus the residual r = full - window that the
  layer stored at the last step it ran in full. In the window, an image token attends to
  the image tokens within +-w of it in sequence (raster) order and to every text token;
  a text token attends to every token (text rows and columns are always whole: the text
  is short and steers the whole picture). w = round(window * image_tokens / 2), `window`
  being the plan's band width as a fraction of the image tokens.
- `cfg` (SHARE-CFG): with CFG, the first branch's call computes in full and the second
  reuses its output (and its stored residual); without CFG in the request it is `full`.
- `full`: ordinary attention (diffusers' own processor, so an all-full plan is exact
  sampling bit for bit). A full step also computes the window when a later `window`
  step needs the residual, and keeps the output when the next step shares it.

Step 0 must be `full` or `cfg` (nothing is stored yet). The output of a layer is its
attention module's output (Flux's double blocks: image and text streams after their
output projections; single blocks: the joint attention output).

How a request is followed: the first attention layer counts the transformer's calls
(Flux calls it once per CFG branch: call c is step c // branches, branch c % branches),
and `adapter.prepare` is wrapped to reset the state per request. A request whose step
count differs from the plan's runs all `full` (warm-up jobs); the service refuses such a
request with INVALID_ARGUMENT first, so a client never gets that silently.

Kernels: window attention with an explicit boolean mask through SDPA off the GPU, and on
a GPU torch's flex_attention with a block mask that skips the blocks outside the band;
both masks are built once per (text, image, w) size. The decision is made in Python
outside the compiled graphs (`torch.compiler.disable`), so with `--compile` each block's
graph breaks around its attention, and the two kernels (full: the layer's own processor;
window) are compiled on their own instead.

What this leaves to others: the plan and the checks that refuse it (fastattn_plan.py,
called by the CLI and the service before weights load; the steps check per request in
service.py), calibration (fastattn_calibrate.py), reporting (`FastAttnState.fraction`,
read by the service with each step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ditmesh.common.errors import InvalidArgument
from ditmesh.denoiser.fastattn_plan import (
    FAMILY_TRANSFORMERS,
    METHODS,
    PLAN_FILE,
    FastAttnPlan,
    attention_layers,
    check_layout,
    check_serving,
)

__all__ = [
    "METHODS",
    "PLAN_FILE",
    "FastAttnPlan",
    "FastAttnState",
    "attention_layers",
    "check_layout",
    "check_serving",
    "install",
    "load_and_install",
    "uninstall",
    "window_attention",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------ window attention


@dataclass
class WindowMasks:
    """Masks of the window, one per (text, image tokens, w, device), built once."""

    cache: dict = field(default_factory=dict)

    def half_width(self, window: float, image: int) -> int:
        return max(1, round(window * image / 2))

    def dense(self, text: int, image: int, w: int, device) -> torch.Tensor:
        key = ("dense", text, image, w, str(device))
        if key not in self.cache:
            idx = torch.arange(text + image, device=device)
            band = (idx[:, None] - idx[None, :]).abs() <= w
            self.cache[key] = (band | (idx[:, None] < text) | (idx[None, :] < text))[None, None]
        return self.cache[key]

    def block(self, text: int, image: int, w: int, device):
        key = ("block", text, image, w, str(device))
        if key not in self.cache:
            from torch.nn.attention.flex_attention import create_block_mask

            def in_window(b, h, q, kv):
                return ((q - kv).abs() <= w) | (q < text) | (kv < text)

            n = text + image
            self.cache[key] = create_block_mask(in_window, None, None, n, n, device=device)
        return self.cache[key]

    @staticmethod
    def density(text: int, image: int, w: int) -> float:
        """Share of the full score matrix the window computes: the text rows and columns
        whole, and the band among the image tokens."""
        n = text + image
        band = sum(min(image - 1, i + w) - max(0, i - w) + 1 for i in range(image))
        return (n * n - image * image + band) / (n * n)


_flex = None


def _flex_attention(q, k, v, block_mask):
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        # Compiled once: eager flex_attention is an unfused reference implementation.
        _flex = torch.compile(flex_attention, dynamic=False)
    return _flex(q, k, v, block_mask=block_mask)


def window_attention(attn, hidden_states, encoder_hidden_states, rotary, mask):
    """Flux's attention (projections, q/k norms, rope, output projections: diffusers' own
    helpers and modules) with the window's `mask` (WindowMasks: a boolean tensor for SDPA,
    or a flex_attention block mask) in place of full attention."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
    if rotary is not None:
        q = apply_rotary_emb(q, rotary, sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if isinstance(mask, torch.Tensor):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention

        out = flex_attention(q, k, v, block_mask=mask)
    else:
        out = _flex_attention(q, k, v, mask)
    out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
    if encoder_hidden_states is None:
        return out
    t = encoder_hidden_states.shape[1]
    enc, img = out[:, :t], out[:, t:]
    img = attn.to_out[1](attn.to_out[0](img.contiguous()))
    return img, attn.to_add_out(enc.contiguous())


def _full_attention(inner, attn, hidden_states, encoder_hidden_states, mask, rotary):
    return inner(attn, hidden_states, encoder_hidden_states, mask, rotary)


def _map(fn, *outs):
    """`fn` over a layer output: a tensor, or Flux double blocks' (image, text) pair."""
    if isinstance(outs[0], tuple):
        return tuple(fn(*parts) for parts in zip(*outs, strict=True))
    return fn(*outs)


# ------------------------------------------------------------ following a plan


def _needs(plan: FastAttnPlan) -> tuple[list[list[bool]], list[list[bool]]]:
    """Per step and layer: whether a computing step must keep the residual (a `window`
    comes before the next computing step) and whether to keep the output (the next step
    shares it)."""
    steps, layers = plan.steps, len(plan.layers)
    residual = [[False] * layers for _ in range(steps)]
    output = [[False] * layers for _ in range(steps)]
    for layer in range(layers):
        for s in range(steps):
            output[s][layer] = s + 1 < steps and plan.methods[s + 1][layer] == "step"
            for later in range(s + 1, steps):
                m = plan.methods[later][layer]
                if m in ("full", "cfg"):
                    break
                if m == "window":
                    residual[s][layer] = True
                    break
    return residual, output


class FastAttnState:
    """One transformer's plan and what its layers keep between the calls of one request."""

    def __init__(self, plan: FastAttnPlan, compile: bool = False) -> None:
        self.plan = plan
        self.masks = WindowMasks()
        self.full_kernel = _full_attention
        self.window_kernel = window_attention
        if compile:
            # The processors run outside the blocks' graphs (the method changes per call);
            # compiled here, each kernel keeps rope, norms and the window's flex_attention
            # fused. Eager full attention is the layer's own processor, exactly.
            self.full_kernel = torch.compile(_full_attention, dynamic=False)
            self.window_kernel = torch.compile(window_attention, dynamic=False)
        self.needs_residual, self.needs_output = _needs(plan)
        self.begin_request(steps=plan.steps, branches=1, text=0)

    def begin_request(self, *, steps: int, branches: int, text: int) -> None:
        self.active = steps == self.plan.steps
        if not self.active:
            # The service refuses such requests; this is a warm-up (or a direct caller).
            log.info("fast attention: %d steps, plan has %d: all full", steps, self.plan.steps)
        self.branches, self.text = branches, text
        self.call = -1
        self.outputs: dict = {}
        self.residuals: dict = {}
        self.shared: dict = {}
        self.computed = 0.0
        self.calls = 0

    def fraction(self) -> float:
        """Attention computed so far in this request, as a share of running every layer
        in full (a full step that also computes the window for its residual counts both)."""
        return self.computed / self.calls if self.calls else 1.0

    def window(self, attn, hs, ehs, rotary):
        """The window's output for this call, its cost counted."""
        image = hs.shape[1] - (0 if ehs is not None else self.text)
        w = self.masks.half_width(self.plan.window, image)
        key = ("density", self.text, image, w)
        if key not in self.masks.cache:
            self.masks.cache[key] = self.masks.density(self.text, image, w)
        self.computed += self.masks.cache[key]
        if hs.device.type == "cuda":
            mask = self.masks.block(self.text, image, w, hs.device)
        else:
            mask = self.masks.dense(self.text, image, w, hs.device)
        return self.window_kernel(attn, hs, ehs, rotary, mask)

    def where(self, layer: int) -> tuple[str, int, int]:
        """This call's method, step and branch."""
        step, branch = divmod(self.call, self.branches)
        if step >= self.plan.steps:
            raise RuntimeError(
                f"fast attention: call {self.call} is past the plan's {self.plan.steps} steps "
                "(the transformer ran more often per step than the request's CFG branches)"
            )
        method = self.plan.methods[step][layer]
        if method == "cfg" and self.branches == 1:
            method = "full"
        return method, step, branch

    def run(self, layer: int, attn, inner, hs, ehs, mask, rotary):
        if layer == 0:
            self.call += 1
        self.calls += 1

        def full():
            return self.full_kernel(inner, attn, hs, ehs, mask, rotary)

        def window():
            if mask is not None:
                raise ValueError("fast attention's window does not take an attention mask")
            return self.window(attn, hs, ehs, rotary)

        if not self.active:
            self.computed += 1
            return full()
        method, step, branch = self.where(layer)
        key = (layer, branch)
        if method == "step":
            out = self.outputs[key]
        elif method == "cfg" and branch == 1:
            out = self.shared.pop(layer)
            if self.needs_residual[step][layer]:
                self.residuals[key] = self.residuals[(layer, 0)]
        elif method == "window":
            out = _map(torch.add, window(), self.residuals[key])
        else:
            out = full()
            self.computed += 1
            if self.needs_residual[step][layer]:
                self.residuals[key] = _map(torch.sub, out, window())
            if method == "cfg":
                self.shared[layer] = out
        if self.needs_output[step][layer]:
            self.outputs[key] = out
        return out


class FastAttnProcessor:
    """Stands in for a layer's processor: asks the state which method this call runs.

    Outside the compiled graphs on purpose: the method changes from call to call."""

    def __init__(self, state, layer: int, inner) -> None:
        self.state, self.layer, self.inner = state, layer, inner

    @torch.compiler.disable
    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        return self.state.run(
            self.layer,
            attn,
            self.inner,
            hidden_states,
            encoder_hidden_states,
            attention_mask,
            image_rotary_emb,
        )


def install(adapter, state) -> None:
    """Puts `state` (a FastAttnState, or calibration's) behind every attention layer of the
    adapter's transformer and resets it at each request's `prepare`."""
    transformer = adapter.transformer
    kind = type(transformer).__name__
    if kind not in FAMILY_TRANSFORMERS:
        raise InvalidArgument(
            f"--fast-attn runs on {', '.join(FAMILY_TRANSFORMERS)} (Flux) only; this model's "
            f"transformer is {kind}"
        )
    layers = attention_layers(transformer)
    state.plan.check_layers(layers)
    for i, name in enumerate(layers):
        module = transformer.get_submodule(name)
        inner = module.processor
        if type(inner).__name__ != "FluxAttnProcessor":
            raise InvalidArgument(
                f"--fast-attn: {name} runs {type(inner).__name__}, not diffusers' "
                "FluxAttnProcessor (a parallel plan attached already?)"
            )
        module.processor = FastAttnProcessor(state, i, inner)
    prepare = adapter.prepare

    def prepare_and_begin(job):
        prep = prepare(job)
        text = prep.branches["cond"]["encoder_hidden_states"].shape[1]
        state.begin_request(steps=job.steps, branches=2 if prep.do_cfg else 1, text=text)
        return prep

    adapter.prepare = prepare_and_begin
    adapter.fast_attn = state


def uninstall(adapter) -> None:
    """Gives the layers their own processors back (calibration, tests)."""
    for module in adapter.transformer.modules():
        if isinstance(getattr(module, "processor", None), FastAttnProcessor):
            module.processor = module.processor.inner
    adapter.__dict__.pop("prepare", None)
    adapter.__dict__.pop("fast_attn", None)


def load_and_install(adapter, path: str, compile: bool = False) -> FastAttnState:
    """speed.apply's entry: the plan at `path` followed by the adapter's transformer
    (`compile`: its attention kernels compiled, as --compile compiles the blocks)."""
    state = FastAttnState(FastAttnPlan.load(path), compile=compile)
    install(adapter, state)
    p = state.plan
    counts = ", ".join(f"{m} {p.count(m)}" for m in METHODS)
    log.info(
        "fast attention: plan %s (%d steps x %d layers: %s)", path, p.steps, len(p.layers), counts
    )
    return state
