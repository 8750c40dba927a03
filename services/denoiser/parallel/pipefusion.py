"""PipeFusion: the transformer's blocks split into stages, the image into patches.

Each of P ranks (one PipeFusion group) keeps a consecutive run of the blocks and drops the
rest. A step's image tokens are cut into M patches of consecutive rows; patch p goes
through stage 0, then stage 1 while stage 0 starts patch p+1, and so on, so all stages are
busy once the pipeline is full. Attention in a patch needs the keys and values of the
whole image: the patch's own are fresh, the others' are the ones each attention module kept
from the last time it saw them (this step for earlier patches, the previous step for later
ones). Neighbouring steps of a diffusion sampler change the activations little, which is
what makes these stale keys and values good enough.

- The first `pipefusion_warmup` steps run the whole image as one unit (in sync, exact),
  which also fills every module's keys and values.
- The text tokens (Flux's T5 stream, SD3's context) travel with patch 0; the other
  patches attend to the text keys and values that patch 0 left this step.
- Flux's latents are tokens already; SD3 patchifies inside the model, so its patches are
  bands of whole token rows, cut out after `pos_embed` and put back before `proj_out`.
- The last stage steps the scheduler per patch (flow-matching Euler updates each token
  on its own) and sends the patch's new latents back to stage 0 for the next step; at the
  end it broadcasts the final latents to its group.
- With P = 1 this is the same computation on one rank (patches one after another), which
  is what the tests compare a gang with.

Under Ulysses each stage is a Ulysses group: the sequence plan splits each patch's rows
across it, attention exchanges them for heads, and the kept keys and values hold the
rank's heads of every row. The text tokens stay whole on every rank.

Attached from outside like the sequence plan: the stage's blocks are kept in the model's
own ModuleLists, hooks swap in the activations received from the previous stage and stop
the forward after the stage's last block; attention gets `StaleKVProcessor` (Flux) or
`StaleJointProcessor` (SD3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ditmesh.common.errors import InvalidArgument
from ditmesh.denoiser.parallel import ulysses as U
from ditmesh.denoiser.parallel.mesh import (
    Group,
    ParallelConfigError,
    RankGroups,
    split_counts,
)
from ditmesh.denoiser.parallel.processors import _projection
from ditmesh.denoiser.parallel.usp import SequenceParallel

log = logging.getLogger(__name__)


def _is_flux(model: torch.nn.Module) -> bool:
    """Flux has single-stream blocks besides its double-stream ones; SD3 joint blocks only."""
    return hasattr(model, "single_transformer_blocks")


def block_lists(model: torch.nn.Module) -> tuple[str, ...]:
    """The model's block lists, in the order its forward runs them (Flux: double then
    single-stream blocks; SD3: joint blocks)."""
    if _is_flux(model):
        return ("transformer_blocks", "single_transformer_blocks")
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None or not hasattr(model, "pos_embed") or not hasattr(model, "proj_out"):
        raise ParallelConfigError("--pipefusion supports Flux and SD3 transformers only")
    return ("transformer_blocks",)


def _install(model: torch.nn.Module, blocks: list, stage: Stage, sp=None) -> None:
    """StaleKV processors on `blocks`; for SD3 also the hooks that cut the patch's tokens out
    of `pos_embed` (whose positions need the whole latent image) and put the prediction's
    rows back into a whole-image token sequence before `proj_out`'s unpatchify."""
    ctx = stage.ctx
    sd3 = not _is_flux(model)
    for blk in blocks:
        stage.processors.append((StaleJointProcessor if sd3 else StaleKVProcessor)(ctx, sp))
        blk.attn.set_processor(stage.processors[-1])
        if getattr(blk, "attn2", None) is not None:  # SD3.5: image-only self-attention
            stage.processors.append(StaleSelfProcessor(ctx, sp))
            blk.attn2.set_processor(stage.processors[-1])
    if not sd3:
        return

    def cut(module, args, out):
        return out[:, ctx.start : ctx.stop]

    def place(module, args, out):
        whole = out.new_zeros((out.shape[0], ctx.image_total, out.shape[2]))
        whole[:, ctx.start : ctx.stop] = out
        return whole

    # Before the sequence plan's own hooks: cut first, then shard; gather, then place.
    stage.handles.append(model.pos_embed.register_forward_hook(cut, prepend=True))
    stage.handles.append(model.proj_out.register_forward_hook(place))


def patch_bounds(tokens: int, patches: int) -> list[tuple[int, int]]:
    """Consecutive token ranges, as even as possible, the first patches taking one more."""
    bounds, start = [], 0
    for count in split_counts(tokens, patches):
        bounds.append((start, start + count))
        start += count
    return bounds


def stage_blocks(total: int, stages: int) -> list[tuple[int, int]]:
    """Which of the model's `total` blocks (double then single, in order) each stage runs."""
    return patch_bounds(total, stages)


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
        ctx = self.ctx
        ug = self.ulysses
        local = q.shape[1] - text_len
        if ug is not None:
            # This rank's image rows -> the patch's rows (padding dropped) for this rank's
            # heads; the text (whole on every rank) -> its heads.
            real = self.sp.shards.total
            img = U.seq_to_heads(torch.cat([x[:, text_len:] for x in (q, k, v)]), ug)
            img = img[:, :real].chunk(3)
            q, k, v = (
                torch.cat([U.head_slice(x[:, :text_len], ug), i], dim=1)
                for x, i in zip((q, k, v), img, strict=True)
            )
        if ctx.full:
            self.kv[ctx.branch] = keys, values = k, v
        else:
            if ctx.branch not in self.kv:
                raise RuntimeError("PipeFusion patch before a whole-image step")
            keys, values = self.kv[ctx.branch]
            t = ctx.text_total if self.text else 0
            if text_len:
                keys[:, :t] = k[:, :text_len]
                values[:, :t] = v[:, :text_len]
            keys[:, t + ctx.start : t + ctx.stop] = k[:, text_len:]
            values[:, t + ctx.start : t + ctx.stop] = v[:, text_len:]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        ).transpose(1, 2)
        if ug is not None:
            text_out = U.gather_heads(out[:, :text_len].contiguous(), ug)
            img_out = out[:, text_len:]
            pad = local * ug.size - img_out.shape[1]
            if pad:
                img_out = F.pad(img_out, (0, 0, 0, 0, 0, pad))
            out = torch.cat([text_out, U.heads_to_seq(img_out.contiguous(), ug)], dim=1)
        return out.flatten(2, 3).to(q.dtype)


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
    """SD3.5's second attention (image tokens only) over kept keys and values."""

    text = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        if attention_mask is not None or encoder_hidden_states is not None:
            raise ValueError("PipeFusion's SD3.5 second attention takes image tokens only")
        q = _projection(attn, hidden_states, attn.to_q, attn.norm_q)
        k = _projection(attn, hidden_states, attn.to_k, attn.norm_k)
        v = _projection(attn, hidden_states, attn.to_v, None)
        return attn.to_out[1](attn.to_out[0](self.attend(q, k, v, 0)))


class StageDone(Exception):
    """Raised by the hook after a non-last stage's last block: carries its outputs."""

    def __init__(self, encoder_hidden_states: torch.Tensor, hidden_states: torch.Tensor) -> None:
        super().__init__("stage done")
        self.encoder_hidden_states = encoder_hidden_states
        self.hidden_states = hidden_states


@dataclass
class Stage:
    """This rank's part of a PipeFusion gang, attached to the transformer."""

    ctx: PatchContext
    group: Group
    back: Group
    """The same ranks on a second communicator: latents from the last stage to the first."""
    first: bool
    last: bool
    blocks: tuple[int, int]
    handles: list = field(default_factory=list)
    processors: list = field(default_factory=list)

    def forget(self) -> None:
        """Drops every kept key and value (after a request: a few GB for Flux at 1024²)."""
        for proc in self.processors:
            proc.kv.clear()


def attach_pipefusion(
    model: torch.nn.Module, mesh: RankGroups, sp: SequenceParallel | None = None
) -> Stage | None:
    """Keeps this stage's blocks, hooks its ends, installs StaleKVProcessor; None if P = 1.

    `sp`: the sequence plan's handle when Ulysses splits each patch further (attach the
    plan first); the text tokens then stay whole on every rank.
    """
    group = mesh["pipefusion"]
    if mesh.config.pipefusion == 1:
        return None
    names = block_lists(model)
    lists = [getattr(model, name) for name in names]
    everything = [(name, blk) for name, lst in zip(names, lists, strict=True) for blk in lst]
    if group.size > len(everything):
        raise ParallelConfigError(
            f"--pipefusion {group.size} is more stages than the model's {len(everything)} blocks"
        )
    lo, hi = stage_blocks(len(everything), group.size)[group.rank]
    mine = everything[lo:hi]
    for name in names:
        setattr(model, name, torch.nn.ModuleList([blk for n, blk in mine if n == name]))
    ctx = PatchContext()
    stage = Stage(
        ctx=ctx,
        group=group,
        back=mesh["pipefusion_back"],
        first=group.rank == 0,
        last=group.rank == group.size - 1,
        blocks=(lo, hi),
    )
    first_block, last_block = mine[0][1], mine[-1][1]
    if not stage.first:

        def take_inbound(module, args, kwargs):
            # The previous stage's activations have the shapes this rank's own embedding
            # of the (placeholder) inputs has: same rows, same split.
            for name in ("hidden_states", "encoder_hidden_states"):
                like = kwargs[name]
                if like.shape[1]:
                    got = torch.empty_like(like)
                    dist.recv(got, group.global_rank(group.rank - 1), group=group.pg)
                    kwargs[name] = got
            return args, kwargs

        stage.handles.append(first_block.register_forward_pre_hook(take_inbound, with_kwargs=True))
    if not stage.last:

        def stop(module, args, output):
            raise StageDone(*output)

        stage.handles.append(last_block.register_forward_hook(stop))
    if sp is not None:
        sp.text_whole = True
    _install(model, [blk for _, blk in mine], stage, sp)
    log.info(
        "PipeFusion stage %d of %d: blocks %d-%d of %d, %d patches, %d whole-image step(s)",
        group.rank + 1,
        group.size,
        lo,
        hi - 1,
        len(everything),
        mesh.config.num_patches,
        mesh.config.pipefusion_warmup,
    )
    # The other stages' blocks go with these lists. The gang loads them on the host
    # (load_adapter's on_host), so there is no GPU cache to give back here.
    del lists, everything
    return stage


def check_speed(compile: bool, cuda_graphs: bool) -> None:
    if compile or cuda_graphs:
        raise ParallelConfigError(
            "--pipefusion runs eager so far: leave out --compile and --cuda-graphs"
        )


class _Send:
    """An isend and the tensor it reads (kept alive until the send is done). The caller
    passes a tensor nothing writes to afterwards (a copy where the source changes)."""

    def __init__(self, t: torch.Tensor, dst: int, group: Group) -> None:
        self.tensor = t.contiguous()
        self.work = dist.isend(self.tensor, group.global_rank(dst), group=group.pg)

    def wait(self) -> None:
        self.work.wait()


def _recv(shape, like: torch.Tensor, src: int, group: Group) -> torch.Tensor:
    t = torch.empty(shape, dtype=like.dtype, device=like.device)
    dist.recv(t, group.global_rank(src), group=group.pg)
    return t


def _patch_step(scheduler, noise, t, sample, last_patch: bool) -> torch.Tensor:
    """The scheduler's step on some of the tokens; the step counter moves on after the last.

    Only schedulers whose step treats every token on its own (flow-matching Euler, as Flux
    uses) can be stepped a patch at a time.
    """
    index = scheduler._step_index
    out = scheduler.step(noise, t, sample, return_dict=False)[0]
    if not last_patch:
        scheduler._step_index = index
    return out


PATCH_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


@torch.inference_mode()
def sample_pipefusion(adapter, job, mesh: RankGroups, on_step=None, stage: Stage | None = None):
    """The sampling loop of one PipeFusion stage (Flux, SD3). Returns the whole latents on
    every rank of the group, finished like `sampler.sample`.

    `stage` None runs all blocks on this rank with `mesh.config`'s patches: the
    single-process form of the same computation.
    """
    from ditmesh.denoiser.sampler import gather_images

    cfgp = mesh.config
    prep = adapter.prepare(job)
    scheduler = prep.scheduler
    if type(scheduler).__name__ not in PATCH_SCHEDULERS:
        raise InvalidArgument(
            f"PipeFusion steps the scheduler a patch at a time; {type(scheduler).__name__} "
            "cannot be"
        )
    cfg = mesh["cfg"]
    if stage is None:
        stage = getattr(adapter, "pipefusion_stage", None)
    if stage is None:
        stage = _local_stage(adapter)
    ctx, group = stage.ctx, stage.group
    dp = mesh["dp"]
    counts = split_counts(job.num_images, dp.size)
    begin = sum(counts[: dp.rank])
    images = slice(begin, begin + counts[dp.rank])
    latents = prep.latents[images].clone()
    n = latents.shape[0]
    # The branches this rank runs: CFG parallel gives each half one.
    if prep.do_cfg and cfg.size == 2:
        branches = [("cond", "uncond")[cfg.rank]]
    elif prep.do_cfg:
        branches = ["cond", "uncond"]
    else:
        branches = ["cond"]
    fam = (_FluxPatches if _is_flux(adapter.transformer) else _SD3Patches)(
        adapter, prep, images, latents
    )
    tokens = ctx.image_total = fam.tokens
    patches = fam.units(cfgp.num_patches)
    # Sends stay in flight for a step: each step waits for the sends of the one before.
    sent: list[list] = [[], []]
    # Stage 0 receives the last stage's new latents of step i-1, unit by unit, as step i
    # needs their rows: `incoming` are those units, `have` how many rows arrived.
    incoming: list[tuple[int, int]] = []
    have = tokens
    total = len(prep.timesteps)
    relay = group.size > 1
    try:
        if n > 0:
            for i, t in enumerate(prep.timesteps):
                full = i < cfgp.pipefusion_warmup
                units = [(0, tokens)] if full else patches
                now: list = []
                for p, (a, z) in enumerate(units):
                    with_text = p == 0
                    ctx.full, ctx.start, ctx.stop = full, a, z
                    rows = fam.index(a, z)
                    if stage.first and relay:
                        while have < z:
                            ea, ez = incoming.pop(0)
                            got = fam.index(ea, ez)
                            latents[got] = _recv(latents[got].shape, latents, -1, stage.back)
                            have = ez
                    preds = {}
                    for name in branches:
                        ctx.branch = name
                        ctx.text_total = prep.branches[name]["encoder_hidden_states"].shape[1]
                        ctx.text_len = ctx.text_total if with_text else 0
                        try:
                            preds[name] = fam.call(latents, t, name, a, z, with_text)
                        except StageDone as done:
                            for x in (done.hidden_states, done.encoder_hidden_states):
                                if x.shape[1]:
                                    now.append(_Send(x, group.rank + 1, group))
                    if not stage.last:
                        continue
                    # Last stage: the prediction for these rows, then the scheduler's step on them.
                    if prep.do_cfg and cfg.size == 2:
                        mine = preds[branches[0]].contiguous()
                        both = [torch.empty_like(mine) for _ in range(2)]
                        dist.all_gather(both, mine, group=cfg.pg)
                        out = adapter.combine(both[0], both[1], prep, job)
                    elif prep.do_cfg:
                        out = adapter.combine(preds["cond"], preds["uncond"], prep, job)
                    else:
                        out = preds["cond"]
                    last_unit = p == len(units) - 1
                    latents[rows] = _patch_step(scheduler, out, t, latents[rows], last_unit)
                    if relay and i < total - 1:
                        # A copy: these rows of `latents` change again next step.
                        now.append(_Send(latents[rows].clone(), 0, stage.back))
                if stage.first and relay:
                    incoming, have = list(units), 0
                for work in sent.pop(0):
                    work.wait()
                sent.append(now)
                if on_step is not None:
                    on_step(i + 1, total)
            for works in sent:
                for work in works:
                    work.wait()
            if group.size > 1:
                dist.broadcast(latents, group.global_rank(group.size - 1), group=group.pg)
    finally:
        stage.forget()  # the kept keys and values are this request's only
    latents = gather_images(latents, counts, dp)
    return adapter.finish(prep, latents, job)


class _FluxPatches:
    """Flux: latents are packed tokens [B, N, 64]; a patch is any run of tokens."""

    def __init__(self, adapter, prep, images: slice, latents: torch.Tensor) -> None:
        self.adapter, self.prep, self.images = adapter, prep, images
        self.tokens = latents.shape[1]
        guidance = prep.extra["guidance"]
        self.guidance = None if guidance is None else guidance[images]

    def units(self, patches: int) -> list[tuple[int, int]]:
        return patch_bounds(self.tokens, min(patches, self.tokens))

    def index(self, a: int, z: int) -> tuple:
        return (slice(None), slice(a, z))

    def call(self, latents, t, branch: str, a: int, z: int, with_text: bool) -> torch.Tensor:
        b = self.prep.branches[branch]
        text, txt_ids = b["encoder_hidden_states"][self.images], b["txt_ids"]
        n = latents.shape[0]
        return self.adapter.forward(
            hidden_states=latents[:, a:z],
            timestep=t.expand(n).to(latents.dtype) / 1000,
            guidance=self.guidance,
            pooled_projections=b["pooled_projections"][self.images],
            encoder_hidden_states=text if with_text else text[:, :0],
            txt_ids=txt_ids if with_text else txt_ids[:0],
            img_ids=self.prep.extra["img_ids"][a:z],
            return_dict=False,
        )[0]


class _SD3Patches:
    """SD3: latents are [B, C, H, W], patchified in the model; a patch is whole rows of
    tokens, so it is a band of latent rows. The model sees the whole latent image (the
    positions of `pos_embed` need it); hooks cut the band's tokens out and put them back."""

    def __init__(self, adapter, prep, images: slice, latents: torch.Tensor) -> None:
        self.adapter, self.prep, self.images = adapter, prep, images
        self.p = adapter.transformer.config.patch_size
        self.rows, self.cols = latents.shape[2] // self.p, latents.shape[3] // self.p
        self.tokens = self.rows * self.cols

    def units(self, patches: int) -> list[tuple[int, int]]:
        bands = patch_bounds(self.rows, min(patches, self.rows))
        return [(r0 * self.cols, r1 * self.cols) for r0, r1 in bands]

    def index(self, a: int, z: int) -> tuple:
        r0, r1 = a // self.cols, z // self.cols
        return (slice(None), slice(None), slice(r0 * self.p, r1 * self.p))

    def call(self, latents, t, branch: str, a: int, z: int, with_text: bool) -> torch.Tensor:
        b = self.prep.branches[branch]
        text = b["encoder_hidden_states"][self.images]
        out = self.adapter.forward(
            hidden_states=latents,
            timestep=t.expand(latents.shape[0]),
            encoder_hidden_states=text if with_text else text[:, :0],
            pooled_projections=b["pooled_projections"][self.images],
            return_dict=False,
        )[0]
        return out[self.index(a, z)]


def _local_stage(adapter) -> Stage:
    """All blocks on this one rank, with StaleKVProcessor: PipeFusion's patches without stages."""
    from ditmesh.denoiser.parallel.mesh import single_process_mesh

    model = adapter.transformer
    one = single_process_mesh()
    stage = Stage(
        ctx=PatchContext(),
        group=one["pipefusion"],
        back=one["pipefusion_back"],
        first=True,
        last=True,
        blocks=(0, 0),
    )
    _install(model, [blk for name in block_lists(model) for blk in getattr(model, name)], stage)
    adapter.pipefusion_stage = stage
    return stage
