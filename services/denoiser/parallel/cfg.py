"""CFG parallel: which guidance branches a rank runs, and their predictions combined.

Without CFG every rank runs the conditional branch alone (both halves of a cfg mesh
compute the same). With CFG on one rank it runs both; with cfg = 2 each half of the
mesh runs one branch (half 0 the conditional) and the halves exchange their predictions.
How the branches combine is the family adapter's `combine`; the loops (sampler.sample,
PipeFusion's) only ask this module which branches to predict and hand the predictions back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditmesh.denoiser.parallel.data import all_gather
from ditmesh.denoiser.parallel.mesh import Group


@dataclass(frozen=True, slots=True)
class CfgBranches:
    names: list[str]
    """The branches this rank predicts, in this order ("cond", "uncond")."""
    exchange: Group | None
    """The cfg group whose halves swap predictions; None when this rank has them all."""

    @classmethod
    def for_rank(cls, do_cfg: bool, cfg: Group) -> CfgBranches:
        if do_cfg and cfg.size == 2:
            return cls(names=[("cond", "uncond")[cfg.rank]], exchange=cfg)
        return cls(names=["cond", "uncond"] if do_cfg else ["cond"], exchange=None)

    def combine(self, adapter, preds: list[torch.Tensor], prep, job) -> torch.Tensor:
        """The guided prediction from this rank's `preds` (one per name in `names`)."""
        if self.exchange is not None:
            cond, uncond = all_gather(preds[0], self.exchange)
        elif len(preds) == 2:
            cond, uncond = preds
        else:
            cond, uncond = preds[0], None
        return adapter.combine(cond, uncond, prep, job)
