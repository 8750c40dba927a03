"""Ulysses sequence parallelism: all-to-all between the sequence and the heads.

Before attention each rank holds a slice of the sequence with all heads; one
all-to-all gives it the whole (group's) sequence for a slice of the heads, so
attention itself is local. A second all-to-all restores the sequence split.
Tensors are [batch, seq, heads, head_dim].
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from ditmesh.denoiser.parallel.mesh import Group


def seq_to_heads(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[B, L, H, D] sequence-sharded -> [B, u*L, H/u, D] head-sharded."""
    u = group.size
    if u == 1:
        return x
    b, seq, h, d = x.shape
    send = x.reshape(b, seq, u, h // u, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = exchange(send, group)
    # recv[j] is rank j's sequence slice of this rank's heads.
    return recv.permute(1, 0, 2, 3, 4).reshape(b, u * seq, h // u, d)


def heads_to_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[B, u*L, H/u, D] head-sharded -> [B, L, H, D] sequence-sharded."""
    u = group.size
    if u == 1:
        return x
    b, seq, h, d = x.shape
    send = x.reshape(b, u, seq // u, h, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = exchange(send, group)
    # recv[j] holds head slice j of this rank's sequence slice.
    return recv.permute(1, 2, 0, 3, 4).reshape(b, seq // u, u * h, d)


def head_slice(x: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's heads of a tensor every rank holds whole (the text tokens)."""
    if group.size == 1:
        return x
    h = x.shape[2] // group.size
    return x[:, :, group.rank * h : (group.rank + 1) * h]


def gather_heads(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[B, T, H/u, D] -> [B, T, H, D]: every rank's head slice, in rank order."""
    if group.size == 1:
        return x
    b, t, h, d = x.shape
    parts = gather_dim0(x, group).view(group.size, b, t, h, d)
    return parts.permute(1, 2, 0, 3, 4).reshape(b, t, group.size * h, d)


def exchange(
    send: torch.Tensor,
    group: Group,
    out: torch.Tensor | None = None,
    async_op: bool = False,
    output_splits: list[int] | None = None,
    input_splits: list[int] | None = None,
):
    """all_to_all_single over dim 0: equal chunks, or the given split sizes (rows of dim 0
    per peer); `out` (contiguous) receives in place.

    Returns the received tensor, or with `async_op` (eager only) the work to wait on
    before `out` is read. Under torch.compile the functional collective is used instead
    (it returns the tensor; the wait lands before its first use), so the exchange is
    part of the compiled graph rather than a graph break.
    """
    if input_splits is not None and output_splits is None:
        raise ValueError("uneven input splits need the output splits too")
    if output_splits is not None and input_splits is None:
        # The functional collective wants both: this side is even.
        input_splits = [send.shape[0] // group.size] * group.size
    if torch.compiler.is_compiling():
        return funcol.all_to_all_single(send, output_splits, input_splits, group.pg)
    if out is None:
        rows = send.shape[0] if output_splits is None else sum(output_splits)
        out = send.new_empty((rows, *send.shape[1:]))
    work = dist.all_to_all_single(
        out,
        send,
        output_split_sizes=output_splits,
        input_split_sizes=input_splits,
        group=group.pg,
        async_op=async_op,
    )
    return work if async_op else out


def gather_dim0(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[N, ...] on every rank -> [size * N, ...], rank order (traceable like `exchange`)."""
    x = x.contiguous()
    if torch.compiler.is_compiling():
        return funcol.all_gather_tensor(x, 0, group.pg)
    out = x.new_empty((group.size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=group.pg)
    return out
