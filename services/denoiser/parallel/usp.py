"""USP: Ulysses and Ring composed, with joint text+image attention.

Image tokens are split across the sp group (ulysses x ring); text tokens are
whole on every rank and attended exactly once: under Ulysses each rank takes
its heads of them, under Ring they join the rank's own KV block at step 0.
Tensors are [batch, seq, heads, head_dim].

Longer than most modules (~400 lines) because the two ways one Ulysses attention is
exchanged (`HeadExchange`, and `ChunkedHeadExchange` for --ulysses-chunks and
--ulysses-fp8) share their geometry by inheritance and read best side by side; the
collectives and the FP8 wire format themselves are ulysses.py's.
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
    """Text tokens in front of the image tokens on this rank (single-stream Flux blocks)."""
    text_sharded: bool = False
    """The text tokens are split across the sp group like the image tokens (Ulysses
    alone): they travel in the exchange too."""
    text_counts: tuple[int, ...] = ()
    """Text tokens on each rank of the sp group when split (the first ranks take one
    more where the length does not divide)."""


@dataclass(kw_only=True, slots=True)
class SequenceParallel:
    ulysses: Group
    ring: Group
    sp: Group
    shard_index: int
    shards: SequenceShards
    text_whole: bool = False
    """Keep the text tokens whole on every rank even under Ulysses alone (PipeFusion:
    the text travels with one patch only)."""
    chunks: int = 1
    """Ulysses alone: this rank's heads in this many chunks (ParallelConfig.ulysses_chunks)."""
    fp8: bool = False
    """Ulysses alone: the exchange in FP8 (ParallelConfig.ulysses_fp8)."""

    def can_shard_text(self, text_len: int) -> bool:
        """Whether text tokens can be split like image tokens: under Ulysses alone (ring
        blocks take the text whole) and with at least one text token a rank."""
        return not self.text_whole and self.ring.size == 1 and 1 < self.sp.size <= text_len

    def block_valid(self, block: int) -> int:
        """Real tokens in ring block `block` (u consecutive shards)."""
        size = self.ulysses.size * self.shards.local
        return max(0, min(size, self.shards.total - block * size))

    def attention_joint(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attention output of the text tokens, then this rank's image tokens: [B, T+L, H, D].

        `q, k, v`: this rank's image tokens [B, L, H, D]; `text`: (q, k, v) of the text
        tokens [B, T, H, D], whole on every rank, or None.
        """
        if self.ring.size > 1:
            return self._ring_attention(q, k, v, text)
        ex = self.head_exchange(q.shape, 0 if text is None else text[0].shape[1], q)
        qkv = (q, k, v)
        for i in ex.send_order:
            ex.send(i, qkv[i], None if text is None else text[i])
        return ex.attend()

    def head_exchange(self, shape: tuple[int, ...], t_len: int, like: torch.Tensor):
        """A `HeadExchange` for one attention of image tokens `shape` [B, L, H, D] and
        `t_len` text tokens (a `ChunkedHeadExchange` with chunks or the FP8 exchange), or
        None where the attention is not Ulysses alone (ring > 1)."""
        if self.ring.size > 1:
            return None
        if self.chunks == 1 and not self.fp8:
            return HeadExchange(self, shape, t_len, like)
        return ChunkedHeadExchange(self, shape, t_len, like, chunks=self.chunks, fp8=self.fp8)

    # Ring attention's point-to-point exchange stays eager (outside compiled graphs).
    @torch.compiler.disable
    def _ring_attention(self, q, k, v, text) -> torch.Tensor:
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
        if text is None:
            return img_out
        return torch.cat([text_out, img_out], dim=1)


class HeadExchange:
    """One attention under Ulysses alone, in steps: `send` q, k and v (0, 1, 2), each as
    soon as it is computed and in any order, then `attend`. Each exchange runs while the
    caller computes the next tensor; nothing waits for it before `attend`.

    Traceable by torch.compile (functional collectives there), so under --compile the
    exchange and its layout copies sit inside the block's graph.

    Text tokens either travel with the image tokens (`shards.text_sharded`: each rank
    holds a slice of them, sent as the front of its block, so the received sequence is
    text_0, image_0, text_1, image_1, ...; attention does not depend on key order and the
    outputs go back the same way), or are whole on every rank, and each rank places its
    heads of them in front of the received image rows.

    Eager layout: q, k and v are each received straight into [rows, B, h, D] (one copy on
    the way out, none on the way in); the kernels take the [B, h, S, D] view.
    """

    send_order = (0, 1, 2)
    """The order `SequenceParallel.attention_joint` sends q, k, v in (all computed already)."""
    preallocate = True
    """Eager: receive straight into one [3, rows, B, h, D] buffer."""

    def __init__(
        self, sp: SequenceParallel, shape: tuple[int, ...], t_len: int, like: torch.Tensor
    ) -> None:
        self.sp = sp
        self.u = sp.ulysses.size
        self.b, self.seq, self.heads, self.d = shape
        self.h = self.heads // self.u
        self.t_len = t_len
        """Text tokens given with each of q, k, v on this rank (its slice if sharded)."""
        self.sharded = sp.shards.text_sharded and t_len > 0
        self.block = self.seq + (t_len if self.sharded else 0)
        """Tokens this rank sends each destination (text slice + image shard if sharded)."""
        counts = sp.shards.text_counts if self.sharded else (0,) * self.u
        self.blocks = [self.seq + c for c in counts]
        """Tokens each rank sends, in rank order (uneven where the text split is)."""
        self.splits = None if len(set(self.blocks)) == 1 else self.blocks
        self.local_text = 0 if self.sharded else t_len
        """Text rows placed locally in front of the received rows."""
        self.rows_total = self.local_text + sum(self.blocks)
        self.compiling = torch.compiler.is_compiling()
        self.rows = None
        if not self.compiling and self.preallocate:
            self.rows = like.new_empty((3, self.rows_total, self.b, self.h, self.d))
        self.received: list = [None, None, None]
        self.pending: list = []

    def _to_destinations(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n, H, D] -> [u (destination), n, B, h, D] view (rank j gets head slice j)."""
        return x.unflatten(2, (self.u, self.h)).permute(2, 1, 0, 3, 4)

    def send(self, i: int, x: torch.Tensor, text: torch.Tensor | None = None) -> None:
        """Starts moving `x` [B, L, H, D] (q, k or v by `i`), with `text` [B, T, H, D]."""
        ug, u, h = self.sp.ulysses, self.u, self.h
        if (text is None) != (self.t_len == 0):
            raise ValueError("text tokens must be given for each of q, k, v, or for none")
        if self.sharded:
            # One copy builds the block this rank sends: its text slice, then its image shard.
            send = x.new_empty((u, self.block, self.b, h, self.d))
            send[:, : self.t_len].copy_(self._to_destinations(text))
            send[:, self.t_len :].copy_(self._to_destinations(x))
        else:
            send = self._to_destinations(x).contiguous()
        send = send.view(u * self.block, self.b, h, self.d)
        text_rows = None
        if text is not None and not self.sharded:
            text_rows = U.head_slice(text, ug).transpose(0, 1)  # [T, B, h, D]
        if self.compiling:
            # Joined with the text rows in `attend`: using the result here would wait.
            self.received[i] = (text_rows, U.exchange(send, ug, output_splits=self.splits))
            return
        rows = self.rows[i]
        self.pending.append(
            U.exchange(
                send, ug, out=rows[self.local_text :], async_op=True, output_splits=self.splits
            )
        )
        if text_rows is not None:
            rows[: self.local_text].copy_(text_rows)
        self.received[i] = rows

    def _real_keys(self, kh: torch.Tensor, vh: torch.Tensor):
        """Keys and values without the padded image tokens.

        Padding sits at the global tail of the image sequence, so it is the end of the
        last rank's shard, and of the received rows when the text is local. With the text
        travelling, each rank's block is its text slice then its image shard: where the
        padding fills more than the last shard (tiny images, many ranks), padded rows sit
        between real ones and the real rows are gathered instead.
        """
        pad = self.u * self.seq - self.sp.block_valid(0)
        if not self.sharded or pad <= self.seq:
            keys = self.rows_total - pad
            return kh[:, :, :keys], vh[:, :, :keys]
        real, start = [], 0
        for j, block in enumerate(self.blocks):
            text = block - self.seq
            image = max(0, min(self.seq, self.sp.shards.total - j * self.seq))
            real.append(torch.arange(start, start + text + image, device=kh.device))
            start += block
        index = torch.cat(real)
        return kh.index_select(2, index), vh.index_select(2, index)

    def attend(self) -> torch.Tensor:
        """Attention output of this rank's text tokens, then its image tokens: [B, T+L, H, D]."""
        ug, u, b, h, d = self.sp.ulysses, self.u, self.b, self.h, self.d
        if any(r is None for r in self.received):
            raise ValueError("q, k and v must all be sent before attending")
        for work in self.pending:
            work.wait()
        joined = self.received
        if self.compiling:
            joined = [got if t is None else torch.cat([t, got]) for t, got in joined]
        qh, kh, vh = (x.permute(1, 2, 0, 3) for x in joined)  # [B, h, S, D]
        kh, vh = self._real_keys(kh, vh)
        out = attention(qh, kh, vh).transpose(1, 2)  # [B, S, h, D]
        lt = self.local_text
        # Rows back to the ranks they came from, each rank's block as [B, block, h, D].
        if self.splits is None:
            back = out[:, lt:].unflatten(1, (u, self.block)).transpose(0, 1).contiguous()
            back = back.view(u * b * self.block, h, d)
            back = U.exchange(back, ug)
        else:
            starts = [lt + sum(self.blocks[:j]) for j in range(u)]
            back = torch.cat(
                [
                    out[:, s : s + n].reshape(b * n, h, d)
                    for s, n in zip(starts, self.blocks, strict=True)
                ]
            )
            back = U.exchange(
                back,
                ug,
                output_splits=[b * self.block] * u,
                input_splits=[b * n for n in self.blocks],
            )
        back = back.view(u, b, self.block, h, d)  # source j = head slice j
        parts = [back.permute(1, 2, 0, 3, 4)]  # [B, block, u, h, D]
        if lt:
            text_heads = U.gather_dim0(out[:, :lt], ug).view(u, b, lt, h, d)
            parts.insert(0, text_heads.permute(1, 2, 0, 3, 4))
        return torch.cat(parts, dim=1).reshape(b, self.t_len + self.seq, self.heads, d)


class ChunkedHeadExchange(HeadExchange):
    """A `HeadExchange` whose exchange hides under the attention (--ulysses-chunks C) and/or
    travels in FP8 (--ulysses-fp8; ulysses.Transfer).

    v and k each travel whole as soon as they are projected (under the next projection, as
    in HeadExchange); q travels as C chunks of this rank's heads, one all-to-all each, so
    chunk 0's attention starts once its share of q has arrived and runs while the rest of
    q is in flight, and each chunk's output starts back at once and travels under the next
    chunk's attention. What stays exposed is 1/C of q's exchange and 1/C of the output's,
    where HeadExchange exposes both whole. Each chunk attends over the same heads' queries,
    keys and values as HeadExchange does, so only the kernel's rounding can differ.

    Sending v and k in chunks too would add collectives (each with its own latency) and
    hide nothing more: one communicator runs its collectives in the order issued, so
    chunk 0 of q arrives after all of v and k either way.

    Received tensors are used as the collective returns them (no preallocated rows, so
    the FP8 bytes can be dequantised on arrival); text rows held locally join them by
    concatenation. Eager: asynchronous collectives (CUDA graphs capture them, as they do
    HeadExchange's); under torch.compile: functional collectives, waits at first use.
    """

    send_order = (2, 1, 0)
    preallocate = False

    def __init__(
        self,
        sp: SequenceParallel,
        shape: tuple[int, ...],
        t_len: int,
        like: torch.Tensor,
        *,
        chunks: int,
        fp8: bool,
    ) -> None:
        super().__init__(sp, shape, t_len, like)
        if self.h % chunks:
            raise ValueError(f"{chunks} chunks do not divide the {self.h} heads of a rank")
        if fp8 and not self.compiling:
            U.check_fp8_exchange(like.device)
        self.chunks, self.fp8 = chunks, fp8

    def send(self, i: int, x: torch.Tensor, text: torch.Tensor | None = None) -> None:
        """Starts moving `x` [B, L, H, D] (q, k or v by `i`; q in chunks), with `text`."""
        if (text is None) != (self.t_len == 0):
            raise ValueError("text tokens must be given for each of q, k, v, or for none")
        ug, u, b, d = self.sp.ulysses, self.u, self.b, self.d
        pieces = self.chunks if i == 0 else 1
        hc = self.h // pieces

        def to_destinations(t: torch.Tensor) -> torch.Tensor:
            # [B, n, H, D] -> [piece, destination, n, B, hc, D]: rank j gets heads j*h + ...
            return t.unflatten(2, (u, pieces, hc)).permute(3, 2, 1, 0, 4, 5)

        if self.sharded:
            send = x.new_empty((pieces, u, self.block, b, hc, d))
            send[:, :, : self.t_len].copy_(to_destinations(text))
            send[:, :, self.t_len :].copy_(to_destinations(x))
        else:
            send = to_destinations(x).contiguous()
        text_rows = None
        if text is not None and not self.sharded:
            text_rows = U.head_slice(text, ug).transpose(0, 1)  # [T, B, h, D]
        self.received[i] = [
            (
                None if text_rows is None else text_rows[:, :, p * hc : (p + 1) * hc],
                U.Transfer(
                    send[p].view(u * self.block, b, hc, d),
                    ug,
                    fp8=self.fp8,
                    output_splits=self.splits,
                ),
            )
            for p in range(pieces)
        ]

    @staticmethod
    def _joined(text_rows, transfer) -> torch.Tensor:
        got = transfer.result()  # [rows, B, heads, D]
        return got if text_rows is None else torch.cat([text_rows, got])

    def _send_back(self, out: torch.Tensor):
        """Starts one chunk's output [B, S, hc, D] back to the ranks its rows came from."""
        ug, u, b, lt = self.sp.ulysses, self.u, self.b, self.local_text
        hc, d = out.shape[2], self.d
        if self.splits is None:
            back = out[:, lt:].unflatten(1, (u, self.block)).transpose(0, 1).contiguous()
            return U.Transfer(back.view(u * b * self.block, hc, d), ug, fp8=self.fp8)
        starts = [lt + sum(self.blocks[:j]) for j in range(u)]
        back = torch.cat(
            [
                out[:, s : s + n].reshape(b * n, hc, d)
                for s, n in zip(starts, self.blocks, strict=True)
            ]
        )
        return U.Transfer(
            back,
            ug,
            fp8=self.fp8,
            output_splits=[b * self.block] * u,
            input_splits=[b * n for n in self.blocks],
        )

    def attend(self) -> torch.Tensor:
        """Attention output of this rank's text tokens, then its image tokens: [B, T+L, H, D]."""
        ug, u, b, d, lt = self.sp.ulysses, self.u, self.b, self.d, self.local_text
        if any(r is None for r in self.received):
            raise ValueError("q, k and v must all be sent before attending")
        kh, vh = (self._joined(*self.received[i][0]).permute(1, 2, 0, 3) for i in (1, 2))
        kh, vh = self._real_keys(kh, vh)  # [B, h, S, D]
        backs, text_parts = [], []
        for c, piece in enumerate(self.received[0]):
            qh = self._joined(*piece).permute(1, 2, 0, 3)  # [B, hc, S, D]
            heads = slice(c * qh.shape[1], (c + 1) * qh.shape[1])
            out = attention(qh, kh[:, heads], vh[:, heads]).transpose(1, 2)  # [B, S, hc, D]
            backs.append(self._send_back(out))
            text_parts.append(out[:, :lt])
        # Source j, chunk c holds heads j*h + c*hc ... of this rank's rows: one copy puts
        # them in head order, [B, block, u, C, hc, D].
        img = torch.stack(
            [t.result().view(u, b, self.block, -1, d).permute(1, 2, 0, 3, 4) for t in backs],
            dim=3,
        ).view(b, self.block, self.heads, d)
        if not lt:
            return img
        mine = torch.cat(text_parts, dim=2)  # [B, lt, h, D]: this rank's heads in order
        text_heads = U.gather_dim0(mine, ug).view(u, b, lt, self.h, d)
        text = text_heads.permute(1, 2, 0, 3, 4).reshape(b, lt, self.heads, d)
        return torch.cat([text, img], dim=1)
