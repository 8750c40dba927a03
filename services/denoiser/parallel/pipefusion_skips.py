"""PipeFusion's long skips: block outputs that a later block takes, across stage boundaries.

HunyuanDiT's forward keeps a stack of its first half's block outputs and hands each to a
block of the second half (a U-Net-like long skip); whether a block's output is pushed, and
whether a block pops one, follows the block's index in the model's block list. A family
declares the pairs in its PipeFusionPlan's `long_skips` (producer block -> the block that
takes its output, global indices); this module makes them hold when the two blocks run on
different stages:

- A later stage's block list keeps every earlier block's place with a `StandIn` (no
  weights), so the forward's indices stay global and its stack keeps its depth.
- The skips that cross into a stage (produced before it, taken in it or after it) arrive
  with the patch, after the plan's carried activations, in producer order; a stand-in
  returns its block's output as received, which the forward pushes as the real block's.
- The skips that cross out of a stage (produced in it or before it, taken after it) go
  on with the patch: those it received and those its own blocks made (kept by a hook).

A skip is a block output, so its rows are those of the carried image tokens (the patch's,
this rank's Ulysses shard of them). Receiving and sending are the stage's hooks
(pipefusion_stage.py) and the loop's sends (pipefusion.py); which pairs a model has is the
family's adapter (hunyuan.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SkipRelay:
    """The long skips that one stage receives and sends on, and this pass's values."""

    takes: tuple[int, ...]
    """Producer blocks (before this stage) whose outputs arrive with the patch, in order."""
    gives: tuple[int, ...]
    """Producer blocks (up to this stage's last) whose outputs go on with it, in order."""
    received: dict[int, torch.Tensor] = field(default_factory=dict)
    """This pass's outputs of the `takes` blocks."""
    made: dict[int, torch.Tensor] = field(default_factory=dict)
    """This pass's outputs of this stage's own blocks that are in `gives`."""

    @classmethod
    def of(cls, pairs: dict[int, int], lo: int, hi: int) -> SkipRelay:
        """The relay of the stage that runs blocks lo..hi-1, for the model's `pairs`."""
        for producer, consumer in pairs.items():
            if not producer < consumer:
                raise ValueError(f"a long skip goes forward: block {producer} -> {consumer}")
        return cls(
            takes=tuple(sorted(j for j, c in pairs.items() if j < lo <= c)),
            gives=tuple(sorted(j for j, c in pairs.items() if j < hi <= c)),
        )

    def outgoing(self) -> tuple[torch.Tensor, ...]:
        """The `gives` skips of this pass, in order (sent after the carried activations)."""
        return tuple(self.received[j] if j in self.received else self.made[j] for j in self.gives)

    def keep_made(self, blocks: dict[int, torch.nn.Module]) -> list:
        """Hooks that keep the outputs of this stage's blocks (`blocks`: global index ->
        block) that a later stage takes; their handles."""
        handles = []
        for j in self.gives:
            if j in blocks:

                def keep(module, args, output, j=j):
                    self.made[j] = output

                handles.append(blocks[j].register_forward_hook(keep))
        return handles

    def clear(self) -> None:
        self.received.clear()
        self.made.clear()


class StandIn(torch.nn.Module):
    """An earlier stage's block in a later stage's block list: it returns that block's
    output as received with the patch (a skip this stage needs), else its input as it came
    (pushed or popped only by other stand-ins: the stage's first block takes the carried
    activations, not what the stand-ins pass on)."""

    def __init__(self, index: int, relay: SkipRelay) -> None:
        super().__init__()
        self.index, self.relay = index, relay

    def forward(self, hidden_states, *args, **kwargs):
        return self.relay.received.get(self.index, hidden_states)

    def extra_repr(self) -> str:
        return f"block {self.index} (another stage's)"
