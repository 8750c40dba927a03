"""Ulysses sequence parallelism: all-to-all between the sequence and the heads.

Before attention each rank holds a slice of the sequence with all heads; one
all-to-all gives it the whole (group's) sequence for a slice of the heads, so
attention itself is local. A second all-to-all restores the sequence split.
Tensors are [batch, seq, heads, head_dim].

Also the FP8 wire format of `--ulysses-fp8` (`Transfer`): each row of head_dim values
travels as e4m3 bytes followed by its float32 scale, one collective per tensor. How the
exchanges of one attention are ordered is usp.py's (HeadExchange, ChunkedHeadExchange).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from ditmesh.denoiser.parallel.mesh import Group, ParallelConfigError


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


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
"""The largest finite e4m3 value: a row's absolute maximum maps onto it."""
SCALE_BYTES = 4
CPU_ENV = "DITMESH_FP8_CPU"
"""Set to 1 to allow --ulysses-fp8 on CPU (gloo gangs in tests); fp8.py's variable too."""


def check_fp8_exchange(device: torch.device | str) -> None:
    """Refuses the FP8 exchange on CPU unless CPU_ENV is set: there it is an emulation for
    tests, never faster. Any CUDA GPU casts to e4m3 (no FP8 GEMM is involved)."""
    if torch.device(device).type == "cpu" and os.environ.get(CPU_ENV) != "1":
        raise ParallelConfigError(
            f"--ulysses-fp8 is for GPU gangs (NCCL); on CPU it is an emulation for tests "
            f"only (set {CPU_ENV}=1)"
        )


def pack_fp8(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D + 4] uint8: each row's values in e4m3 after dividing by its
    scale (absolute maximum / 448), then the scale's float32 bytes. One buffer, so one
    collective carries both."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    values = (x.float() / scale).to(FP8).view(torch.uint8)
    return torch.cat([values, scale_bytes(scale)], dim=-1)


def scale_bytes(scale: torch.Tensor) -> torch.Tensor:
    """[..., 1] float32 -> [..., SCALE_BYTES] uint8. Flattened first: the compiler may give
    the size-1 last dim any stride, and a dtype view needs it to be 1."""
    return scale.reshape(-1).view(torch.uint8).view(*scale.shape[:-1], SCALE_BYTES)


def unpack_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `pack_fp8`: [..., D + 4] uint8 -> [..., D] in `dtype`."""
    d = x.shape[-1] - SCALE_BYTES
    scale = x[..., d:].contiguous().view(torch.float32)
    return (x[..., :d].contiguous().view(FP8).float() * scale).to(dtype)


class Transfer:
    """One all-to-all in flight (`exchange` with `async_op` where eager; the functional
    collective under torch.compile), optionally in the FP8 wire format; `result()` waits
    and gives the received tensor in the sender's dtype."""

    def __init__(
        self,
        send: torch.Tensor,
        group: Group,
        *,
        fp8: bool = False,
        output_splits: list[int] | None = None,
        input_splits: list[int] | None = None,
    ) -> None:
        self.dtype = send.dtype
        self.fp8 = fp8
        payload = pack_fp8(send) if fp8 else send
        self.work = None
        if torch.compiler.is_compiling():
            self.received = exchange(
                payload, group, output_splits=output_splits, input_splits=input_splits
            )
            return
        rows = payload.shape[0] if output_splits is None else sum(output_splits)
        self.received = payload.new_empty((rows, *payload.shape[1:]))
        self.work = exchange(
            payload,
            group,
            out=self.received,
            async_op=True,
            output_splits=output_splits,
            input_splits=input_splits,
        )

    def result(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return unpack_fp8(self.received, self.dtype) if self.fp8 else self.received
