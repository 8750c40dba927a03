"""PipeFusion: the transformer's blocks split into stages, the image into patches; the loop.

Each of P ranks (one PipeFusion group) keeps a consecutive run of the blocks
(pipefusion_stage.py). A step's image tokens are cut into M patches
(pipefusion_patches.py); patch p goes through stage 0, then stage 1 while stage 0 starts
patch p+1, and so on, so all stages are busy once the pipeline is full. Attention in a
patch needs the keys and values of the whole image: the patch's own are fresh, the
others' are the ones each attention module kept from the last time it saw them
(pipefusion_attention.py). Neighbouring steps of a diffusion sampler change the
activations little, which is what makes these stale keys and values good enough.

- The first `pipefusion_warmup` steps run the whole image as one unit (in sync, exact),
  which also fills every module's keys and values.
- With no warm-up (`pipefusion_warmup` 0) the first step is already in patches and no
  keys or values are kept yet. Patch p of that step attends to the text and to the fresh
  keys and values of patches 0..p (this step's, the only ones that exist); the rows of
  later patches are left out of its attention (never zeros attended to). From the second
  step on every patch sees the whole image, stale or fresh, as with a warm-up. So the
  first step is causal by patch: cheaper than a whole-image step, and less exact.
- The text tokens of a joint attention (Flux's T5 stream, SD3's context) travel with
  patch 0; the other patches attend to the text keys and values that patch 0 left this
  step. A cross-attention's text (PixArt's) is an input of every patch, as the timestep is.
- The last stage steps the scheduler per patch (a step updates each token on its own;
  each patch has its own copy of the scheduler, with its rows of a multistep solver's
  history, see pipefusion_schedule.py) and sends the patch's new latents back to stage 0
  for the next step; at the end it broadcasts the final latents to its group.
- With P = 1 this is the same computation on one rank (patches one after another), which
  is what the tests compare a gang with.

Under Ulysses each stage is a Ulysses group: the sequence plan splits each patch's rows
across it, attention exchanges them for heads, and the kept keys and values hold the
rank's heads of every row. The text tokens stay whole on every rank.

This module is the loop alone: CFG branches and the data-parallel share come from cfg.py
and data.py as in the whole-image loop (sampler.py), the transformer call is the family
adapter's `predict`, the family's choices its PipeFusionPlan.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ditmesh.denoiser.parallel.cfg import CfgBranches
from ditmesh.denoiser.parallel.data import ImageShare
from ditmesh.denoiser.parallel.mesh import Group, RankGroups
from ditmesh.denoiser.parallel.pipefusion_patches import patch_bounds
from ditmesh.denoiser.parallel.pipefusion_schedule import PatchSchedulers, check_patchable
from ditmesh.denoiser.parallel.pipefusion_stage import (
    Stage,
    StageDone,
    attach_pipefusion,
    check_speed,
    local_stage,
    plan_of,
)

# The gang and the tests import these from here.
__all__ = ["attach_pipefusion", "check_speed", "patch_bounds", "sample_pipefusion"]


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


@torch.inference_mode()
def sample_pipefusion(adapter, job, mesh: RankGroups, on_step=None, stage: Stage | None = None):
    """The sampling loop of one PipeFusion stage. Returns the whole latents on
    every rank of the group, finished like `sampler.sample`.

    `stage` None takes the adapter's (attached by the gang), else runs all blocks on this
    rank with `mesh.config`'s patches: the single-process form of the same computation.
    """
    prep = adapter.prepare(job)
    check_patchable(prep.scheduler, prep.timesteps, prep.latents)
    stage = stage or adapter.pipefusion_stage or local_stage(adapter)
    share = ImageShare.of(job.num_images, mesh["dp"])
    run = _PatchPipeline(adapter, job, prep, mesh, stage, share.images)
    try:
        if run.latents.shape[0] > 0:
            run.all_steps(on_step)
    finally:
        stage.forget()  # the kept keys and values are this request's only
    return adapter.finish(prep, share.gather(run.latents), job)


class _PatchPipeline:
    """One request on one stage: the steps, the units (whole image or patches) of a step,
    and the latents that travel between the stages."""

    def __init__(self, adapter, job, prep, mesh: RankGroups, stage: Stage, images: slice):
        self.adapter, self.job, self.prep, self.stage = adapter, job, prep, stage
        self.latents = prep.latents[images].clone()
        self.cfg = CfgBranches.for_rank(prep.do_cfg, mesh["cfg"])
        self.warmup = mesh.config.pipefusion_warmup
        self.patches = plan_of(adapter).patches(adapter, prep, images, self.latents)
        self.tokens = stage.ctx.image_total = self.patches.tokens
        self.patch_units = self.patches.units(mesh.config.num_patches)
        self.relay = stage.group.size > 1
        # Sends stay in flight for a step: each step waits for the sends of the one before.
        self.sent: list[list[_Send]] = [[], []]
        # Stage 0 receives the last stage's new latents of step i-1, unit by unit, as step
        # i needs their rows: `incoming` are those units, `have` how many rows arrived.
        self.incoming: list[tuple[int, int]] = []
        self.have = self.tokens
        # Made at the first patch step (see _schedulers).
        self.patch_schedulers: PatchSchedulers | None = None

    def all_steps(self, on_step) -> None:
        timesteps = self.prep.timesteps
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            self._step(i < self.warmup, t, send_back=self.relay and i < total - 1)
            if on_step is not None:
                on_step(i + 1, total)
        for works in self.sent:
            for work in works:
                work.wait()
        group = self.stage.group
        if group.size > 1:
            dist.broadcast(self.latents, group.global_rank(group.size - 1), group=group.pg)

    def _step(self, full: bool, t, send_back: bool) -> None:
        units = [(0, self.tokens)] if full else self.patch_units
        schedulers = self._schedulers(full, units)
        now: list[_Send] = []
        ctx = self.stage.ctx
        for p, (a, z) in enumerate(units):
            ctx.full, ctx.start, ctx.stop = full, a, z
            if self.stage.first and self.relay:
                self._receive_rows(z)
            preds = [self._predict(name, t, a, z, p == 0, now) for name in self.cfg.names]
            if self.stage.last:
                self._update(preds, schedulers[p], t, a, z, now if send_back else None)
        if self.stage.first and self.relay:
            self.incoming, self.have = list(units), 0
        for work in self.sent.pop(0):
            work.wait()
        self.sent.append(now)

    def _schedulers(self, full: bool, units: list[tuple[int, int]]):
        """The request's scheduler for whole-image steps; for patch steps one copy a patch
        with its rows of the history, taken at the first patch step, so each copy steps
        once a step and its step index is that of the step (a scheduler's `step` moves
        its index on). Only the last stage steps, so only it makes them."""
        if full:
            return [self.prep.scheduler]
        if self.patch_schedulers is None and self.stage.last:
            indices = [self.patches.index(a, z) for a, z in units]
            self.patch_schedulers = PatchSchedulers(self.prep.scheduler, self.latents, indices)
        return self.patch_schedulers

    def _receive_rows(self, z: int) -> None:
        """Stage 0: waits for the last stage's new latents up to token `z`."""
        while self.have < z:
            a, z_in = self.incoming.pop(0)
            rows = self.patches.index(a, z_in)
            self.latents[rows] = _recv(self.latents[rows].shape, self.latents, -1, self.stage.back)
            self.have = z_in

    def _predict(self, branch: str, t, a: int, z: int, with_text: bool, now: list):
        """The prediction of tokens a:z in `branch` (last stage), or None where this stage
        sends its blocks' outputs on to the next."""
        ctx = self.stage.ctx
        ctx.branch = branch
        ctx.text_total = self.prep.branches[branch]["encoder_hidden_states"].shape[1]
        ctx.text_len = ctx.text_total if with_text else 0
        try:
            return self.patches.predict(self.latents, t, branch, a, z, with_text)
        except StageDone as done:
            group = self.stage.group
            # In the plan's `carried` order, the order the next stage receives them in.
            for x in done.outputs:
                if x.shape[1]:
                    now.append(_Send(x, group.rank + 1, group))
            return None

    def _update(self, preds, scheduler, t, a: int, z: int, now: list | None) -> None:
        """Last stage: the scheduler's step on tokens a:z; `now` gets the send of their new
        latents back to stage 0 (None: no next step, or no other stage)."""
        noise = self.cfg.combine(self.adapter, preds, self.prep, self.job)
        rows = self.patches.index(a, z)
        # A copy of the rows: a scheduler may keep the sample it was given (UniPC's
        # last_sample), and these rows of `latents` are written over just below.
        sample = self.latents[rows].clone()
        self.latents[rows] = scheduler.step(noise, t, sample, return_dict=False)[0]
        if now is not None:
            # A copy: these rows of `latents` change again next step.
            now.append(_Send(self.latents[rows].clone(), 0, self.stage.back))
