"""Attaching sequence parallelism to a diffusers transformer from outside.

A model declares a `SequencePlan`: which forward inputs or submodule outputs
carry the image tokens (split there), which submodule's output is gathered,
and which attention modules get the parallel processor. `attach` applies it with
hooks; no block of the model is copied or edited.

Image sequences that do not divide by the sp degree are padded at the global
tail; `SequenceShards` tells the attention how many tokens are real, so padded
keys are never attended and padded outputs are dropped at the gather.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ditmesh.denoiser.parallel.mesh import RankGroups, split_counts
from ditmesh.denoiser.parallel.usp import SequenceParallel, SequenceShards


@dataclass(frozen=True, kw_only=True)
class SequencePlan:
    split_inputs: dict[str, int] = field(default_factory=dict)
    """Forward keyword argument -> its sequence dim (Flux: hidden_states, img_ids)."""
    split_outputs: dict[str, int] = field(default_factory=dict)
    """Submodule name -> sequence dim of its output (SD3/PixArt: pos_embed)."""
    gather_output: tuple[str, int] = ("proj_out", 1)
    """Submodule whose output is gathered back to the whole sequence, and the dim."""
    text_len_input: tuple[str, int] | None = None
    """Forward keyword argument whose dim gives the text length (for blocks that concatenate)."""
    split_text_inputs: dict[str, int] = field(default_factory=dict)
    """Forward keyword argument -> sequence dim, for text tokens (Flux: encoder_hidden_states,
    txt_ids). Split too under Ulysses alone when the text length divides by the degree, so
    no rank computes the text stream's projections and MLPs for every text token."""
    processors: dict[str, Callable[[SequenceParallel, torch.nn.Module], object]] = field(
        default_factory=dict
    )
    """Attention module name pattern (fnmatch) -> factory of its parallel processor."""


def shard(x: torch.Tensor, dim: int, sp: SequenceParallel) -> torch.Tensor:
    """This rank's slice along `dim`, padding the global tail with zeros."""
    total = x.shape[dim]
    n = sp.sp.size
    local = -(-total // n)
    s = sp.shards
    if s.total and (s.total != total or s.local != local):
        raise ValueError(f"inconsistent sequence split: {total} tokens here, {s.total} elsewhere")
    s.total, s.local = total, local
    pad = local * n - total
    if pad:
        widths = [0, 0] * (x.dim() - dim - 1) + [0, pad]
        x = F.pad(x, widths)
    return x.narrow(dim, sp.shard_index * local, local)


def gather(x: torch.Tensor, dim: int, sp: SequenceParallel, order: list[int]) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(sp.sp.size)]
    dist.all_gather(parts, x.contiguous(), group=sp.sp.pg)
    # Group rank j holds shard order[j]; put shards back in sequence order.
    by_shard = [None] * len(parts)
    for j, part in enumerate(parts):
        by_shard[order[j]] = part
    return torch.cat(by_shard, dim=dim).narrow(dim, 0, sp.shards.total)


@dataclass
class Attached:
    """Handles of an attached plan (to detach in tests)."""

    sp: SequenceParallel
    handles: list = field(default_factory=list)
    old_processors: dict = field(default_factory=dict)

    def detach(self, model: torch.nn.Module) -> None:
        for h in self.handles:
            h.remove()
        modules = dict(model.named_modules())
        for name, proc in self.old_processors.items():
            modules[name].set_processor(proc)


def attach(model: torch.nn.Module, plan: SequencePlan, mesh: RankGroups) -> Attached | None:
    """Applies `plan` for the mesh's sp group; a no-op when sp == 1."""
    cfg = mesh.config
    if cfg.sp == 1:
        return None
    sp = SequenceParallel(
        ulysses=mesh["ulysses"],
        ring=mesh["ring"],
        sp=mesh["sp"],
        shard_index=mesh.sp_shard,
        shards=SequenceShards(),
        chunks=cfg.ulysses_chunks,
        fp8=cfg.ulysses_fp8,
    )
    order = [
        cfg.coords(r)["ring"] * cfg.ulysses + cfg.coords(r)["ulysses"] for r in mesh["sp"].ranks
    ]
    attached = Attached(sp=sp)
    modules = dict(model.named_modules())

    def pre_forward(module, args, kwargs):
        sp.shards.total = sp.shards.local = 0
        sp.shards.text_sharded = False
        sp.shards.text_counts = ()
        if plan.text_len_input is not None:
            name, dim = plan.text_len_input
            text_len = kwargs[name].shape[dim]
            sp.shards.text_len = text_len
            if plan.split_text_inputs and sp.can_shard_text(text_len):
                counts = split_counts(text_len, sp.sp.size)
                start = sum(counts[: sp.shard_index])
                for name, dim in plan.split_text_inputs.items():
                    if kwargs.get(name) is None:
                        raise ValueError(f"sequence parallel needs the {name!r} keyword argument")
                    kwargs[name] = kwargs[name].narrow(dim, start, counts[sp.shard_index])
                sp.shards.text_sharded = True
                sp.shards.text_counts = tuple(counts)
                sp.shards.text_len = counts[sp.shard_index]
        for name, dim in plan.split_inputs.items():
            if kwargs.get(name) is None:
                raise ValueError(f"sequence parallel needs the {name!r} keyword argument")
            kwargs[name] = shard(kwargs[name], dim, sp)
        return args, kwargs

    if plan.split_inputs or plan.text_len_input:
        attached.handles.append(model.register_forward_pre_hook(pre_forward, with_kwargs=True))
    else:
        attached.handles.append(
            model.register_forward_pre_hook(lambda m, a: setattr(sp.shards, "total", 0) or None)
        )

    for name, dim in plan.split_outputs.items():
        attached.handles.append(
            modules[name].register_forward_hook(lambda m, a, out, dim=dim: shard(out, dim, sp))
        )
    gname, gdim = plan.gather_output
    attached.handles.append(
        modules[gname].register_forward_hook(lambda m, a, out: gather(out, gdim, sp, order))
    )

    matched = 0
    for pattern, factory in plan.processors.items():
        for name, module in modules.items():
            if fnmatch.fnmatchcase(name, pattern):
                attached.old_processors[name] = module.processor
                module.set_processor(factory(sp, module))
                matched += 1
    if plan.processors and not matched:
        raise ValueError(
            "the sequence plan matched no attention module; it does not fit this model"
        )
    return attached
