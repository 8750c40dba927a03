"""PipeFusion's stages: which blocks a rank keeps, and what is hooked onto them.

Each of P ranks (one PipeFusion group) keeps a consecutive run of the transformer's
blocks and drops the rest, in the model's own ModuleLists. Hooks swap in the activations
received from the previous stage before the stage's first block and stop the forward
after its last (`StageDone` carries them out to the loop, which sends them on); which of
a block's inputs and outputs are those activations is the plan's `carried`. Every
kept attention gets the stale-KV processor the family's plan names
(pipefusion_attention.py); for a model that patchifies inside (SD3) two more hooks cut
the patch's tokens out after the embedding and put them back before the output layer, and
a third cuts inputs of whole-image rows (HunyuanDiT's rotary table) to the patch's. Long
skips that cross a stage boundary (HunyuanDiT's) travel with the patch after the carried
activations (pipefusion_skips.py).

A family declares what PipeFusion needs as data, a `PipeFusionPlan` on its adapter
(flux.py, sd3.py, pixart.py, hunyuan.py); a family whose adapter has none cannot run PipeFusion. The loop that
drives the stages is pipefusion.py; the rank layout is mesh.py's.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ditmesh.denoiser.parallel.mesh import (
    Group,
    ParallelConfigError,
    RankGroups,
    single_process_mesh,
)
from ditmesh.denoiser.parallel.pipefusion_attention import PatchContext
from ditmesh.denoiser.parallel.pipefusion_patches import patch_bounds
from ditmesh.denoiser.parallel.pipefusion_skips import SkipRelay, StandIn
from ditmesh.denoiser.parallel.usp import SequenceParallel

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PipeFusionPlan:
    """What PipeFusion needs to know of a family's transformer."""

    block_lists: tuple[str, ...]
    """The transformer's block lists, in the order its forward runs them."""
    processors: dict[str, type]
    """A block's attention attribute -> its stale-KV processor class (ctx, sp); a block
    whose attribute is None has no such attention (SD3.0's attn2)."""
    patches: type
    """How a patch is cut from the latents (pipefusion_patches.py)."""
    cut_at: tuple[str, str] | None = None
    """(embedding, output layer) of a model that patchifies inside: the patch's tokens are
    cut out of the first's output and put back into the whole image before the second."""
    carried: tuple[str, ...] = ("encoder_hidden_states", "hidden_states")
    """The activations that go from one stage to the next: a block's outputs, in the order
    it returns them (one name: it returns a tensor), each the next block's input of that
    name. Joint attention (Flux, SD3) carries the text stream too; a block that only reads
    the text (PixArt's cross-attention) carries the image tokens alone, and each stage
    embeds the text itself."""
    cut_inputs: dict[str, int] = field(default_factory=dict)
    """Forward keyword argument -> its token dim, for inputs of one row per image token
    that the blocks read (HunyuanDiT's rotary table): cut to the patch's rows as the
    embedding's output is (needs `cut_at`)."""
    long_skips: Callable[[int], dict[int, int]] | None = None
    """For a forward that hands earlier blocks' outputs to later blocks by their index in
    its one block list (HunyuanDiT): `long_skips(n)` of its n blocks, producer -> the
    block that takes its output (pipefusion_skips.py). None: no such skips."""

    def __post_init__(self) -> None:
        if self.cut_inputs and self.cut_at is None:
            raise ValueError("cut_inputs needs cut_at: a patch's rows are cut after the embedding")
        if self.long_skips is not None and (
            len(self.block_lists) != 1 or "hidden_states" not in self.carried
        ):
            raise ValueError("long skips need one block list that carries hidden_states")


class StageDone(Exception):
    """Raised by the hook after a non-last stage's last block: carries its outputs, in the
    order of the plan's `carried`."""

    def __init__(self, outputs: tuple[torch.Tensor, ...]) -> None:
        super().__init__("stage done")
        self.outputs = outputs


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
    carried: tuple[str, ...] = ()
    """The plan's `carried`: what this stage receives and sends, in this order."""
    skips: SkipRelay | None = None
    """The long skips this stage receives and sends after the carried ones (None: none)."""
    handles: list = field(default_factory=list)
    processors: list = field(default_factory=list)

    def forget(self) -> None:
        """Drops every kept key and value (after a request: a few GB for Flux at 1024²)
        and the last pass's skips."""
        for proc in self.processors:
            proc.kv.clear()
        if self.skips is not None:
            self.skips.clear()


def stage_blocks(total: int, stages: int) -> list[tuple[int, int]]:
    """Which of the model's `total` blocks (all lists, in order) each stage runs."""
    return patch_bounds(total, stages)


def plan_of(adapter) -> PipeFusionPlan:
    """The family's PipeFusion plan; refuses a family that declares none."""
    if adapter.pipefusion_plan is None:
        raise ParallelConfigError(
            f"--pipefusion needs a PipeFusion plan of the model family; "
            f"{type(adapter).__name__} declares none"
        )
    return adapter.pipefusion_plan


def check_speed(compile: bool, cuda_graphs: bool) -> None:
    if compile or cuda_graphs:
        raise ParallelConfigError(
            "--pipefusion runs eager so far: leave out --compile and --cuda-graphs"
        )


def attach_pipefusion(
    adapter, mesh: RankGroups, sp: SequenceParallel | None = None
) -> Stage | None:
    """Keeps this stage's blocks of the adapter's transformer, hooks its ends, installs the
    stale-KV processors; None if P = 1.

    `sp`: the sequence plan's handle when Ulysses splits each patch further (attach the
    plan first); the text tokens then stay whole on every rank.
    """
    group = mesh["pipefusion"]
    if mesh.config.pipefusion == 1:
        return None
    plan, model = plan_of(adapter), adapter.transformer
    lists = [getattr(model, name) for name in plan.block_lists]
    everything = [
        (name, blk) for name, lst in zip(plan.block_lists, lists, strict=True) for blk in lst
    ]
    if group.size > len(everything):
        raise ParallelConfigError(
            f"--pipefusion {group.size} is more stages than the model's {len(everything)} blocks"
        )
    lo, hi = stage_blocks(len(everything), group.size)[group.rank]
    mine = everything[lo:hi]
    relay = None
    if plan.long_skips is None:
        for name in plan.block_lists:
            setattr(model, name, torch.nn.ModuleList([blk for n, blk in mine if n == name]))
    else:
        # The earlier stages' blocks keep their places (stand-ins): the forward pushes and
        # pops the skips by a block's index in the list.
        relay = SkipRelay.of(plan.long_skips(len(everything)), lo, hi)
        kept = [StandIn(j, relay) for j in range(lo)] + [blk for _, blk in mine]
        setattr(model, plan.block_lists[0], torch.nn.ModuleList(kept))
    stage = Stage(
        ctx=PatchContext(),
        group=group,
        back=mesh["pipefusion_back"],
        first=group.rank == 0,
        last=group.rank == group.size - 1,
        blocks=(lo, hi),
        carried=plan.carried,
        skips=relay,
    )
    if relay is not None:
        # Before the last block's stop hook, which sends what these keep.
        stage.handles += relay.keep_made({lo + i: blk for i, (_, blk) in enumerate(mine)})
    first_in_list = getattr(model, mine[0][0])[0]  # a stand-in, or the first block itself
    _hook_stage_ends(stage, first_in_list, mine[0][1], mine[-1][1])
    if sp is not None:
        sp.text_whole = True
    _install(model, plan, [blk for _, blk in mine], stage, sp)
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


def local_stage(adapter) -> Stage:
    """All blocks on this one rank, with the stale-KV processors: PipeFusion's patches
    without stages (what the tests compare a gang with). Kept on the adapter for the
    next request."""
    plan, model = plan_of(adapter), adapter.transformer
    one = single_process_mesh()
    stage = Stage(
        ctx=PatchContext(),
        group=one["pipefusion"],
        back=one["pipefusion_back"],
        first=True,
        last=True,
        blocks=(0, 0),
        carried=plan.carried,
    )
    blocks = [blk for name in plan.block_lists for blk in getattr(model, name)]
    _install(model, plan, blocks, stage)
    adapter.pipefusion_stage = stage
    return stage


def _hook_stage_ends(stage: Stage, first_module, first_block, last_block) -> None:
    """A later stage takes its inputs from the previous stage; an earlier one stops after
    its last block. `first_module`: what the forward runs first of the stage's list (a
    stand-in of an earlier block, which may need a received skip, or `first_block`)."""
    group = stage.group
    if not stage.first:
        params = list(inspect.signature(first_block.forward).parameters)
        inbound: list[torch.Tensor] = []

        def arg(args, kwargs, name: str) -> torch.Tensor:
            # An input may come by name or by position (PixArt's blocks take
            # hidden_states positionally); a stand-in is called as the block is.
            return kwargs[name] if name in kwargs else args[params.index(name)]

        def receive(like: torch.Tensor) -> torch.Tensor:
            # The previous stage's activations have the shapes this rank's own embedding
            # of the (placeholder) inputs has: same rows, same split.
            if not like.shape[1]:
                return like
            # Contiguous, as a receive needs (`like` may be a slice of the patch).
            t = like.new_empty(like.shape)
            dist.recv(t, group.global_rank(group.rank - 1), group=group.pg)
            return t

        def receive_all(module, args, kwargs):
            # In the order the previous stage sends: the carried ones, then the skips.
            inbound[:] = [receive(arg(args, kwargs, name)) for name in stage.carried]
            if stage.skips is not None:
                like = arg(args, kwargs, "hidden_states")  # a skip is a block's output
                stage.skips.received = {j: receive(like) for j in stage.skips.takes}

        def take_inbound(module, args, kwargs):
            args = list(args)
            for name, x in zip(stage.carried, inbound, strict=True):
                if name in kwargs:
                    kwargs[name] = x
                else:
                    args[params.index(name)] = x
            return tuple(args), kwargs

        stage.handles.append(first_module.register_forward_pre_hook(receive_all, with_kwargs=True))
        stage.handles.append(first_block.register_forward_pre_hook(take_inbound, with_kwargs=True))
    if not stage.last:

        def stop(module, args, output):
            outputs = output if isinstance(output, tuple) else (output,)
            if stage.skips is not None:
                outputs += stage.skips.outgoing()
            raise StageDone(outputs)

        stage.handles.append(last_block.register_forward_hook(stop))


def _install(model, plan: PipeFusionPlan, blocks: list, stage: Stage, sp=None) -> None:
    """The plan's stale-KV processors on `blocks`; with `plan.cut_at` also the hooks that
    cut the patch's tokens out of the embedding (whose positions need the whole latent
    image) and put the prediction's rows back into a whole-image token sequence before
    the output layer's unpatchify."""
    ctx = stage.ctx
    for blk in blocks:
        for name, processor in plan.processors.items():
            attn = getattr(blk, name)
            if attn is not None:
                stage.processors.append(processor(ctx, sp))
                attn.set_processor(stage.processors[-1])
    if plan.cut_at is None:
        return
    embed, output = plan.cut_at

    def cut(module, args, out):
        return out[:, ctx.start : ctx.stop]

    def cut_inputs(module, args, kwargs):
        for name, dim in plan.cut_inputs.items():
            if kwargs.get(name) is None:
                raise ValueError(f"PipeFusion needs the {name!r} keyword argument")
            kwargs[name] = kwargs[name].narrow(dim, ctx.start, ctx.stop - ctx.start)
        return args, kwargs

    def place(module, args, out):
        whole = out.new_zeros((out.shape[0], ctx.image_total, out.shape[2]))
        whole[:, ctx.start : ctx.stop] = out
        return whole

    # Before the sequence plan's own hooks: cut first, then shard; gather, then place.
    stage.handles.append(getattr(model, embed).register_forward_hook(cut, prepend=True))
    if plan.cut_inputs:
        stage.handles.append(
            model.register_forward_pre_hook(cut_inputs, with_kwargs=True, prepend=True)
        )
    stage.handles.append(getattr(model, output).register_forward_hook(place))
