"""The gang's device mesh: degrees, rank layout, and every process group.

Degrees multiply to the world size: ``dp x cfg x pipefusion x ulysses x ring = N``.
Ranks are laid out in that order with ring the fastest-varying coordinate::

    rank = (((dp_i * cfg + cfg_i) * pipefusion + pf_i) * ulysses + u_i) * ring + r_i

Worked example, N = 8 with dp=1, cfg=2, pipefusion=1, ulysses=2, ring=2:

    rank  cfg_i u_i r_i   ulysses group   ring group   sp group (u x r)   cfg group
      0     0    0   0      {0, 2}          {0, 1}       {0, 1, 2, 3}      {0, 4}
      1     0    0   1      {1, 3}          {0, 1}       {0, 1, 2, 3}      {1, 5}
      2     0    1   0      {0, 2}          {2, 3}       {0, 1, 2, 3}      {2, 6}
      3     0    1   1      {1, 3}          {2, 3}       {0, 1, 2, 3}      {3, 7}
      4..7  the same with cfg_i = 1 (the unconditional branch)

Within an sp group the image tokens are split into ulysses*ring shards; rank
(u_i, r_i) holds shard ``r_i * ulysses + u_i``, so the shards a Ulysses group
gathers are contiguous and form ring block ``r_i``.

With PipeFusion, e.g. N = 8 as cfg=2, pipefusion=2, ulysses=2: ranks 0, 1 are stage 0
of the conditional branch (a Ulysses pair), 2, 3 its stage 1; the pipefusion groups are
{0, 2} and {1, 3} (a stage's rank and the next stage's rank with the same Ulysses
coordinate), and ranks 4..7 repeat this for the unconditional branch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

DIMS = ("dp", "cfg", "pipefusion", "ulysses", "ring")

# Families whose adapter has a PipeFusion plan (parallel/pipefusion_stage.py); the leader
# checks this before any process starts.
PIPEFUSION_FAMILIES = ("flux", "sd3", "pixart-sigma", "pixart-alpha", "hunyuandit")


def split_counts(n: int, parts: int) -> list[int]:
    """`n` things over `parts` (images over dp replicas, text tokens over ranks, tokens
    over patches): as even as possible, the first parts taking one more."""
    base, rest = divmod(n, parts)
    return [base + (1 if i < rest else 0) for i in range(parts)]


class ParallelConfigError(ValueError):
    """A layout that cannot run; the message names the degree and the rule."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelConfig:
    """Degrees of each parallel strategy; their product is the gang's world size."""

    dp: int = 1
    """Data parallel: the images of a request are split across dp replicas."""
    cfg: int = 1
    """CFG parallel: 2 runs the conditional and unconditional branches on two halves."""
    pipefusion: int = 1
    """PipeFusion stages: the transformer's blocks split into this many consecutive stages,
    the image into patches that flow through them (see parallel/pipefusion.py)."""
    ulysses: int = 1
    """Ulysses sequence parallel: all-to-all between sequence and heads."""
    ring: int = 1
    """Ring sequence parallel: KV blocks passed around the ring, merged by log-sum-exp."""
    patches: int = 0
    """PipeFusion: image patches per step (0: as many as stages)."""
    pipefusion_warmup: int = 1
    """PipeFusion: first steps run on the whole image, in sync, before patches use stale
    keys and values (0: patches from the first step, which attend only to the rows
    computed so far; see parallel/pipefusion.py)."""
    ulysses_chunks: int = 1
    """Ulysses alone: each rank's heads in this many chunks, so the exchange of one chunk
    runs under the attention of another (parallel/usp.py, ChunkedHeadExchange). A layout
    of the exchange rather than a speed-up of the blocks: it is checked against the
    model's heads with --ulysses, and the sequence plan reads it from the mesh. 1: one
    exchange each for q, k, v and the output (the plain path)."""
    ulysses_fp8: bool = False
    """Ulysses alone: q, k, v and the attention output cross the all-to-all in FP8 e4m3
    with one scale per (token, head), dequantised on arrival (parallel/ulysses.py).
    Approximate: changes the output a little."""

    def __post_init__(self) -> None:
        for name in DIMS:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ParallelConfigError(f"--{name} must be a positive integer; got {v!r}")
        if self.cfg not in (1, 2):
            raise ParallelConfigError(
                f"--cfg must be 1 or 2 (conditional and unconditional branch); got {self.cfg}"
            )
        if not isinstance(self.patches, int) or self.patches < 0:
            raise ParallelConfigError(
                f"--patches must be 0 (as many as stages) or a positive integer; got {self.patches!r}"
            )
        if not isinstance(self.pipefusion_warmup, int) or self.pipefusion_warmup < 0:
            raise ParallelConfigError(
                "--pipefusion-warmup must be 0 or more (whole-image steps before the "
                f"patches); got {self.pipefusion_warmup!r}"
            )
        self._check_exchange()
        if self.pipefusion > 1 and self.ring > 1:
            raise ParallelConfigError(
                "--pipefusion does not combine with --ring yet; use --ulysses with it "
                "(it composes with --ulysses, --cfg and --dp)"
            )

    def _check_exchange(self) -> None:
        """--ulysses-chunks and --ulysses-fp8 act on the exchange of Ulysses alone: with ring
        the heads travel once before the ring's own exchange, and PipeFusion has its own."""
        c = self.ulysses_chunks
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ParallelConfigError(f"--ulysses-chunks must be a positive integer; got {c!r}")
        on = [f for f, v in (("--ulysses-chunks", c > 1), ("--ulysses-fp8", self.ulysses_fp8)) if v]
        for flag in on:
            if self.ulysses == 1:
                raise ParallelConfigError(f"{flag} needs --ulysses > 1 (there is no exchange)")
            if self.ring > 1 or self.pipefusion > 1:
                raise ParallelConfigError(
                    f"{flag} applies to Ulysses alone; not with --ring or --pipefusion (their "
                    "exchanges are their own)"
                )

    @property
    def num_patches(self) -> int:
        """Image patches per PipeFusion step."""
        return self.patches or self.pipefusion

    @property
    def world_size(self) -> int:
        return self.dp * self.cfg * self.pipefusion * self.ulysses * self.ring

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    def describe(self) -> str:
        extra = [f"chunks{self.ulysses_chunks}"] * (self.ulysses_chunks > 1)
        extra += ["fp8 exchange"] * self.ulysses_fp8
        return (
            " x ".join(f"{n}{getattr(self, n)}" for n in DIMS if getattr(self, n) > 1) or "single"
        ) + "".join(f" ({e})" for e in extra)

    def check_world(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise ParallelConfigError(
                f"dp x cfg x pipefusion x ulysses x ring = {self.dp} x {self.cfg} x "
                f"{self.pipefusion} x {self.ulysses} x {self.ring} = {self.world_size}, "
                f"but the gang has {world_size} processes"
            )

    def check_model(self, *, heads: int, family: str = "flux", blocks: int = 0) -> None:
        """Rules that depend on the model: heads must split evenly across Ulysses ranks;
        PipeFusion runs the PIPEFUSION_FAMILIES only, at most one stage per block
        (`blocks` 0: not known here, checked when the stages are attached)."""
        if self.pipefusion > 1 and family not in PIPEFUSION_FAMILIES:
            raise ParallelConfigError(
                f"--pipefusion supports {', '.join(PIPEFUSION_FAMILIES)} models only so far; "
                f"this model is {family}"
            )
        if blocks and self.pipefusion > blocks:
            raise ParallelConfigError(
                f"--pipefusion {self.pipefusion} is more stages than the model's {blocks} blocks"
            )
        if heads % self.ulysses:
            raise ParallelConfigError(
                f"--ulysses {self.ulysses} does not divide the model's {heads} attention heads "
                f"(heads % ulysses must be 0)"
            )
        if (heads // self.ulysses) % self.ulysses_chunks:
            raise ParallelConfigError(
                f"--ulysses-chunks {self.ulysses_chunks} does not divide the "
                f"{heads // self.ulysses} heads each of the {self.ulysses} Ulysses ranks holds "
                f"({heads} heads / {self.ulysses})"
            )

    def coords(self, rank: int) -> dict[str, int]:
        out = {}
        for name in reversed(DIMS):
            d = getattr(self, name)
            out[name] = rank % d
            rank //= d
        return {n: out[n] for n in DIMS}

    def rank_of(self, **coords: int) -> int:
        r = 0
        for name in DIMS:
            r = r * getattr(self, name) + coords.get(name, 0)
        return r

    def groups_along(self, *dims: str) -> list[list[int]]:
        """Rank lists of every group whose members differ only in `dims`."""
        others = [n for n in DIMS if n not in dims]
        groups = []
        for fixed in itertools.product(*(range(getattr(self, n)) for n in others)):
            base = dict(zip(others, fixed, strict=True))
            members = []
            for varying in itertools.product(*(range(getattr(self, n)) for n in dims)):
                members.append(self.rank_of(**base, **dict(zip(dims, varying, strict=True))))
            groups.append(sorted(members))
        return groups


@dataclass(kw_only=True, slots=True)
class Group:
    """One process group as this rank sees it."""

    pg: object | None
    ranks: list[int]
    rank: int
    """This process's index within the group."""

    @property
    def size(self) -> int:
        return len(self.ranks)

    def global_rank(self, index: int) -> int:
        return self.ranks[index % self.size]


@dataclass(kw_only=True, slots=True)
class RankGroups:
    """Every group this rank belongs to. Runtime handles only; built once per gang."""

    config: ParallelConfig
    rank: int
    coords: dict[str, int]
    groups: dict[str, Group] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Group:
        return self.groups[name]

    @property
    def sp_shard(self) -> int:
        return self.coords["ring"] * self.config.ulysses + self.coords["ulysses"]


# Group names and the mesh dims each spans.
GROUP_DIMS: dict[str, tuple[str, ...]] = {
    "dp": ("dp",),
    "cfg": ("cfg",),
    "pipefusion": ("pipefusion",),
    # The same ranks again: PipeFusion's latents go back from the last stage to the first
    # on their own communicator. On one NCCL communicator a rank's sends and receives
    # queue on one stream, so the first stage's next send would wait behind its receive
    # of latents the last stage sends only after receiving that very send.
    "pipefusion_back": ("pipefusion",),
    "ulysses": ("ulysses",),
    "ring": ("ring",),
    "sp": ("ulysses", "ring"),
}


def build_mesh(
    config: ParallelConfig, rank: int, world_size: int, timeout: timedelta | None = None
) -> RankGroups:
    """Creates every group; all ranks must call this in the same order (new_group is collective)."""
    config.check_world(world_size)
    mesh = RankGroups(config=config, rank=rank, coords=config.coords(rank))
    for name, dims in GROUP_DIMS.items():
        for ranks in config.groups_along(*dims):
            if len(ranks) == 1:
                pg = None
            elif world_size == 1:
                pg = None
            else:
                kwargs = {"timeout": timeout} if timeout is not None else {}
                pg = dist.new_group(ranks, **kwargs)
            if rank in ranks:
                mesh.groups[name] = Group(pg=pg, ranks=ranks, rank=ranks.index(rank))
    return mesh


def single_process_mesh() -> RankGroups:
    cfg = ParallelConfig()
    return RankGroups(
        config=cfg,
        rank=0,
        coords=cfg.coords(0),
        groups={name: Group(pg=None, ranks=[0], rank=0) for name in GROUP_DIMS},
    )
