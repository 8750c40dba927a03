"""The whole-image sampling loop shared by every model family.

A family adapter knows its model (noise, latent packing, conditioning, the transformer
call, how CFG combines, the scheduler; see adapter.py); the loop here knows the mesh:
data parallel gives each dp replica a slice of the images (parallel/data.py), CFG
parallel runs the conditional and unconditional branches on the two halves of the mesh
and exchanges their predictions (parallel/cfg.py), sequence parallelism is already
inside the transformer (attached by its plan). PipeFusion has a loop of its own
(parallel/pipefusion.py), which `sample` hands the request to. With a cache threshold
the transformer runs through step_cache.py, which may skip a step's later blocks (the
decision is made over the whole mesh, so every rank takes it alike).
"""

from __future__ import annotations

from functools import partial

import torch

from ditmesh.denoiser.adapter import Adapter, Prepared
from ditmesh.denoiser.job import DenoiseJob, PreviewCallback, StepCallback
from ditmesh.denoiser.parallel.cfg import CfgBranches
from ditmesh.denoiser.parallel.data import ImageShare
from ditmesh.denoiser.parallel.mesh import RankGroups
from ditmesh.denoiser.parallel.pipefusion import sample_pipefusion
from ditmesh.denoiser.step_cache import StepCache, installed

# Adapter and Prepared are adapter.py's; runners import them from here too.
__all__ = ["Adapter", "Prepared", "sample"]


@torch.inference_mode()
def sample(
    adapter: Adapter,
    job: DenoiseJob,
    mesh: RankGroups,
    on_step: StepCallback | None = None,
    on_preview: PreviewCallback | None = None,
) -> torch.Tensor:
    if mesh.config.pipefusion > 1:
        if job.cache_threshold > 0:
            raise ValueError("step caching does not run under PipeFusion (the service refuses it)")
        return sample_pipefusion(adapter, job, mesh, on_step)
    if job.cache_threshold > 0:
        cache = StepCache(adapter.transformer, job.cache_threshold, mesh)
        with installed(cache):
            return _loop(adapter, job, mesh, on_step, on_preview, cache)
    return _loop(adapter, job, mesh, on_step, on_preview, None)


def _loop(
    adapter: Adapter,
    job: DenoiseJob,
    mesh: RankGroups,
    on_step: StepCallback | None,
    on_preview: PreviewCallback | None,
    cache: StepCache | None,
) -> torch.Tensor:
    prep = adapter.prepare(job)
    share = ImageShare.of(job.num_images, mesh["dp"])
    latents = prep.latents[share.images]
    cfg = CfgBranches.for_rank(prep.do_cfg, mesh["cfg"])
    total = len(prep.timesteps)
    if latents.shape[0] > 0:
        for i, t in enumerate(prep.timesteps):
            run = partial(adapter.predict, prep, latents, t, cfg.names, share.images)
            if cache is None:
                preds = run()
            else:
                preds = cache.predict(run)[0]
                job.cached_steps = cache.skipped  # so far: the step event reports it
            noise = cfg.combine(adapter, preds, prep, job)
            latents = prep.scheduler.step(noise, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, total)
            if i + 1 in job.preview_steps:
                # Every rank gathers (a collective); the leader reports. The job, preview
                # steps included, is the same on every rank.
                preview = adapter.finish(prep, share.gather(latents), job)
                if on_preview is not None:
                    on_preview(i + 1, total, preview)
    else:
        # A dp replica with no image of this job still joins every step's cache decision
        # and every preview's gather, in the order the other replicas make them.
        for i in range(total):
            if cache is not None:
                cache.idle_step(latents.device)
                job.cached_steps = cache.skipped
            if i + 1 in job.preview_steps:
                share.gather(latents)
    return adapter.finish(prep, share.gather(latents), job)
