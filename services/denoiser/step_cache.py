"""Step caching (First-Block Cache style): a step runs the transformer's first block, and
when that block's residual has barely changed since the last computed step, the other
blocks are skipped and what they added last time is added instead.

The probe: r1 = (first block's image-stream output) - (its input). With r1_prev the r1 of
the last computed step, rel = sum|r1 - r1_prev| / sum|r1_prev|, summed over the whole
request: every image, both CFG branches, every real (unpadded) image token. A step is
skipped when rel < threshold. The first step is always computed, and so is any step
after `MAX_SKIPS_IN_A_ROW` skipped ones (each skip reuses residuals of an older step).

Every rank makes the same decision: the two sums are all-reduced over the sp, cfg and dp
groups (the ranks holding parts of the tokens, branches and images), so a gang decides as
one process would, up to the order of float summation (sums are float64).

How a step runs, given that Flux calls the transformer once per CFG branch and the
decision needs both branches' r1 before either branch may skip:
- a *probe* pass runs the whole forward with only the first block computed, whose output
  gets each stream's cached residual added (the other blocks pass their inputs through),
  so its predictions are the skipped step's; the sums are gathered on the way;
- if the step is skipped, those predictions are the step's; otherwise a *replay* pass runs
  the forward again, the first block handing back its probe output (not recomputed) and
  every other block computing, the last one storing the new residuals;
- the first step (and a step after too many skips) runs one *full* pass directly.
A computed step costs the embeddings and the output layer twice, a skipped one the
embeddings, the first block and the output layer.

Wrapping the transformer's block lists (for the duration of one request) keeps the
model's own forward; blocks compiled by speed.compile_blocks stay compiled inside the
wrappers. Left to others: the loop (sampler.py) calls `StepCache.predict` per step;
the service refuses what cannot run (`refusal`): PipeFusion (its patches see stale
activations of other steps, which the probe cannot account for), CUDA graphs (a captured
forward cannot branch per step), families without a `CachePlan`.

For benchmarks only: `FORCE_ENV` (an environment variable the service never sets) names
the steps to skip, so a random-weight model (whose probe never says "skip") can be timed
under a skip pattern measured on a trained one. The decision path is unchanged (every
probe, sum and all-reduce still runs; only the comparison with the threshold is replaced),
so the timing includes what a real decision costs. The service refuses every cached
request while it is set (`refusal`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ditmesh.denoiser.parallel.mesh import RankGroups

MAX_SKIPS_IN_A_ROW = 3
"""After this many skipped steps in a row the next step is computed."""

FORCE_ENV = "DITMESH_BENCH_FORCE_SKIPS"
"""Bench only: comma-separated steps (0-based) to skip whatever the probe says; the other
steps are computed. Step 0 and a step after MAX_SKIPS_IN_A_ROW skips cannot be forced."""


def forced_skips() -> frozenset[int] | None:
    """The steps FORCE_ENV names (None: unset or empty, the probe decides); a pattern the
    cache could not follow exactly is refused here rather than silently changed."""
    text = os.environ.get(FORCE_ENV, "").strip()
    if not text:
        return None
    try:
        steps = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise ValueError(f"{FORCE_ENV}={text!r}: expected comma-separated step numbers") from None
    if steps[0] < 1:
        raise ValueError(
            f"{FORCE_ENV}: step {steps[0]} cannot be skipped (step 0 is always computed)"
        )
    run = 1
    for a, b in zip(steps, steps[1:], strict=False):
        run = run + 1 if b == a + 1 else 1
        if run > MAX_SKIPS_IN_A_ROW:
            raise ValueError(
                f"{FORCE_ENV}: step {b} would be skip {run} in a row; the cache computes the step "
                f"after {MAX_SKIPS_IN_A_ROW}"
            )
    return frozenset(steps)


@dataclass(frozen=True, kw_only=True)
class CachePlan:
    """Where a family's blocks are and what they pass on."""

    block_lists: tuple[str, ...]
    """The transformer's block lists, in the order the forward runs them."""
    streams: tuple[str, ...]
    """The block inputs (keyword names) in the order a block returns them; the last is
    the image stream, the one the probe compares."""
    tuple_out: bool = True
    """Whether a block returns a tuple of its streams (else the one tensor)."""


# Flux: double-stream blocks, then single-stream ones; both take and return both streams.
FLUX = CachePlan(
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    streams=("encoder_hidden_states", "hidden_states"),
)
# SD3's joint blocks return (text, image); its last block returns None for the text.
SD3 = CachePlan(
    block_lists=("transformer_blocks",), streams=("encoder_hidden_states", "hidden_states")
)
# PixArt's blocks take the image tokens (first positional argument) and return them.
PIXART = CachePlan(block_lists=("transformer_blocks",), streams=("hidden_states",), tuple_out=False)

PLANS: dict[str, CachePlan] = {
    "FluxTransformer2DModel": FLUX,
    "SD3Transformer2DModel": SD3,
    "PixArtTransformer2DModel": PIXART,
}


def plan_for(transformer: nn.Module) -> CachePlan | None:
    return PLANS.get(type(transformer).__name__)


def refusal(adapter, pipefusion: int) -> str | None:
    """Why a request with step caching cannot run on this adapter and layout; None if it can."""
    from ditmesh.denoiser.graphs import GraphedForward

    if os.environ.get(FORCE_ENV, "").strip():
        return (
            f"{FORCE_ENV} is set in this denoiser's environment: forced skip patterns are for "
            "benchmarks only, never for serving (unset it)"
        )
    if pipefusion > 1:
        return (
            "step caching is not available under PipeFusion (its patches reuse other steps' "
            "activations, which the first-block probe cannot account for)"
        )
    if isinstance(adapter.forward, GraphedForward):
        return "step caching cannot run with --cuda-graphs (a captured forward cannot skip blocks)"
    if plan_for(adapter.transformer) is None:
        names = ", ".join(sorted(PLANS))
        return f"step caching supports the transformers {names}, not {type(adapter.transformer).__name__}"
    return None


def _sequence_parallel(transformer: nn.Module):
    """The SequenceParallel the plan's attention processors share (None: no sp)."""
    from ditmesh.denoiser.parallel.usp import SequenceParallel

    for module in transformer.modules():
        sp = getattr(getattr(module, "processor", None), "sp", None)
        if isinstance(sp, SequenceParallel):
            return sp
    return None


class StepCache:
    """One request's cache: the decision state and what the wrapped blocks keep."""

    def __init__(self, transformer: nn.Module, threshold: float, mesh: RankGroups) -> None:
        plan = plan_for(transformer)
        if plan is None:
            raise ValueError(f"no step-cache plan for {type(transformer).__name__}")
        self.transformer = transformer
        self.plan = plan
        self.threshold = threshold
        self.force = forced_skips()
        """Bench only (FORCE_ENV): the steps skipped whatever the probe says; None: off."""
        self.mesh = mesh
        self.sp = _sequence_parallel(transformer) if mesh.config.sp > 1 else None
        if mesh.config.sp > 1 and self.sp is None:
            # Without it the padding tokens would count, and the ranks' decisions could
            # differ from one process's.
            raise ValueError("step caching under sp > 1 found no sequence-parallel processor")
        self.mode = "full"
        self.call = 0  # first-block calls so far in this pass (one per transformer call)
        self.r1_prev: dict[int, torch.Tensor] = {}
        self.r1_probe: dict[int, torch.Tensor] = {}
        self.first_out: dict[int, tuple] = {}
        self.residual: dict[int, tuple] = {}
        self.start: tuple = ()  # the first block's output in this call (residuals start here)
        self.sums: list[torch.Tensor] = []
        self.in_a_row = 0
        self.skipped = 0
        self.computed = 0
        self.pattern: list[bool] = []
        """Per step: True where it was skipped."""
        self.rels: list[float] = []
        """The probe's rel at each step that was decided (not forced to compute)."""

    # ---- the loop's side

    def predict(self, run: Callable[[], list[torch.Tensor]]) -> tuple[list[torch.Tensor], bool]:
        """One step's predictions from `run` (the adapter's predict); and whether it skipped."""
        if self._must_compute():
            return self._compute(run, "full"), False
        preds = self._pass(run, "probe")
        if self._decide(torch.stack(self.sums).sum(0)):
            return preds, True
        return self._pass(run, "replay"), False  # counted as computed by _decide

    def idle_step(self, device: torch.device) -> None:
        """A step on a rank with no image (dp): joins the decision with nothing to add."""
        if self._must_compute():
            self._count(False)
        else:
            self._decide(torch.zeros(2, dtype=torch.float64, device=device))

    def _must_compute(self) -> bool:
        return not self.pattern or self.in_a_row >= MAX_SKIPS_IN_A_ROW

    def _compute(self, run, mode: str) -> list[torch.Tensor]:
        preds = self._pass(run, mode)
        self._count(False)
        return preds

    def _pass(self, run, mode: str) -> list[torch.Tensor]:
        self.mode, self.call, self.sums = mode, 0, []
        return run()

    def _decide(self, total: torch.Tensor) -> bool:
        for name in ("sp", "cfg", "dp"):
            group = self.mesh[name]
            if group.pg is not None:
                dist.all_reduce(total, group=group.pg)
        num, den = total.tolist()
        rel = num / den if den > 0 else float("inf")
        self.rels.append(rel)
        skip = rel < self.threshold if self.force is None else len(self.pattern) in self.force
        self._count(skip)
        return skip

    def _count(self, skip: bool) -> None:
        self.pattern.append(skip)
        if skip:
            self.skipped += 1
            self.in_a_row += 1
        else:
            self.computed += 1
            self.in_a_row = 0

    # ---- the blocks' side

    def streams_of(self, args: tuple, kwargs: dict) -> tuple:
        names = self.plan.streams
        if not self.plan.tuple_out and args:
            return (args[0],)  # PixArt passes hidden_states positionally
        return tuple(kwargs.get(n) for n in names)

    def as_output(self, streams: tuple):
        return tuple(streams) if self.plan.tuple_out else streams[0]

    def _real_tokens(self, r: torch.Tensor) -> torch.Tensor:
        """Drops the padding at the tail of the sequence (sp), which one process has not."""
        if self.sp is None or not self.sp.shards.total:
            return r
        s = self.sp.shards
        real = max(0, min(s.local, s.total - self.sp.shard_index * s.local))
        return r[:, :real]

    def first_block(self, block: nn.Module, args: tuple, kwargs: dict):
        k = self.call
        self.call += 1
        if self.mode == "replay":
            self.r1_prev[k] = self.r1_probe.pop(k)
            out = self.first_out.pop(k)
            self.start = out
            return self.as_output(out)
        inputs = self.streams_of(args, kwargs)
        result = block(*args, **kwargs)
        out = tuple(result) if self.plan.tuple_out else (result,)
        r1 = self._real_tokens(out[-1] - inputs[-1])
        if self.mode == "full":
            self.r1_prev[k] = r1
            self.start = out
            return result
        prev = self.r1_prev[k]
        self.sums.append(
            torch.stack(
                [
                    (r1 - prev).abs().sum(dtype=torch.float64),
                    prev.abs().sum(dtype=torch.float64),
                ]
            )
        )
        self.r1_probe[k] = r1
        self.first_out[k] = out
        cached = tuple(
            o if r is None or o is None else o + r
            for o, r in zip(out, self.residual[k], strict=True)
        )
        return self.as_output(cached)

    def later_block(self, block: nn.Module, last: bool, args: tuple, kwargs: dict):
        if self.mode == "probe":
            return self.as_output(self.streams_of(args, kwargs))
        result = block(*args, **kwargs)
        if last:
            out = tuple(result) if self.plan.tuple_out else (result,)
            self.residual[self.call - 1] = tuple(
                None if o is None or s is None else o - s
                for o, s in zip(out, self.start, strict=True)
            )
        return result


class _First(nn.Module):
    def __init__(self, block: nn.Module, cache: StepCache) -> None:
        super().__init__()
        self.block = block
        self.cache = cache

    def forward(self, *args, **kwargs):
        return self.cache.first_block(self.block, args, kwargs)


class _Later(nn.Module):
    def __init__(self, block: nn.Module, cache: StepCache, last: bool) -> None:
        super().__init__()
        self.block = block
        self.cache = cache
        self.last = last

    def forward(self, *args, **kwargs):
        return self.cache.later_block(self.block, self.last, args, kwargs)


@contextmanager
def installed(cache: StepCache) -> Iterator[StepCache]:
    """The transformer's blocks wrapped for `cache` while the request runs, then restored."""
    transformer = cache.transformer
    lists = [getattr(transformer, name) for name in cache.plan.block_lists]
    originals = [list(blocks) for blocks in lists]
    count = sum(len(b) for b in originals)
    if count < 2:
        raise ValueError("step caching needs at least two transformer blocks")
    seen = 0
    try:
        for blocks, blocks_before in zip(lists, originals, strict=True):
            for i, block in enumerate(blocks_before):
                if seen == 0:
                    blocks[i] = _First(block, cache)
                else:
                    blocks[i] = _Later(block, cache, last=seen == count - 1)
                seen += 1
        yield cache
    finally:
        for blocks, blocks_before in zip(lists, originals, strict=True):
            for i, block in enumerate(blocks_before):
                blocks[i] = block
