"""The sampling loop shared by every model family, and where CFG and data parallel act.

A family adapter knows its model (noise, latent packing, conditioning, the
transformer call, how CFG combines, the scheduler); the loop here knows the
mesh: data parallel gives each dp replica a slice of the images, CFG parallel
runs the conditional and unconditional branches on the two halves of the mesh
and exchanges their predictions, sequence parallelism is already inside the
transformer (attached by its plan).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ditmesh.denoiser.job import DenoiseJob, StepCallback
from ditmesh.denoiser.parallel.mesh import Group, RankGroups, split_counts


@dataclass(kw_only=True)
class Prepared:
    """A request made ready for the loop, identical on every rank."""

    latents: torch.Tensor
    """Initial noise for all images of the request, in the transformer's layout."""
    timesteps: torch.Tensor
    scheduler: Any
    do_cfg: bool
    branches: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Transformer inputs of each branch ("cond", "uncond"), batch = all images."""
    extra: dict[str, Any] = field(default_factory=dict)


class Adapter(Protocol):
    transformer: torch.nn.Module

    def prepare(self, job: DenoiseJob) -> Prepared: ...

    def predict(
        self,
        prep: Prepared,
        latents: torch.Tensor,
        t: torch.Tensor,
        branches: list[str],
        images: slice,
    ) -> list[torch.Tensor]: ...

    def combine(
        self, cond: torch.Tensor, uncond: torch.Tensor | None, prep: Prepared, job: DenoiseJob
    ) -> torch.Tensor: ...

    def finish(self, prep: Prepared, latents: torch.Tensor, job: DenoiseJob) -> torch.Tensor: ...


def _all_gather(x: torch.Tensor, group: Group) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x.contiguous(), group=group.pg)
    return parts


def gather_images(latents: torch.Tensor, counts: list[int], group: Group) -> torch.Tensor:
    """Each dp replica's images, padded to the largest share for all_gather, then trimmed."""
    if group.size == 1:
        return latents
    most = max(counts)
    if latents.shape[0] < most:
        pad = latents.new_zeros((most - latents.shape[0], *latents.shape[1:]))
        latents = torch.cat([latents, pad])
    parts = _all_gather(latents, group)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


@torch.inference_mode()
def sample(
    adapter: Adapter, job: DenoiseJob, mesh: RankGroups, on_step: StepCallback | None = None
) -> torch.Tensor:
    if mesh.config.pipefusion > 1:
        from ditmesh.denoiser.parallel.pipefusion import sample_pipefusion

        return sample_pipefusion(adapter, job, mesh, on_step)
    prep = adapter.prepare(job)
    dp = mesh["dp"]
    counts = split_counts(job.num_images, dp.size)
    start = sum(counts[: dp.rank])
    images = slice(start, start + counts[dp.rank])
    latents = prep.latents[images]
    cfg = mesh["cfg"]
    total = len(prep.timesteps)
    if latents.shape[0] > 0:
        for i, t in enumerate(prep.timesteps):
            if prep.do_cfg and cfg.size == 2:
                mine = adapter.predict(prep, latents, t, [("cond", "uncond")[cfg.rank]], images)[0]
                cond, uncond = _all_gather(mine, cfg)
            elif prep.do_cfg:
                cond, uncond = adapter.predict(prep, latents, t, ["cond", "uncond"], images)
            else:
                # Without CFG both halves of a cfg mesh compute the same branch.
                cond, uncond = adapter.predict(prep, latents, t, ["cond"], images)[0], None
            noise = adapter.combine(cond, uncond, prep, job)
            latents = prep.scheduler.step(noise, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, total)
    latents = gather_images(latents, counts, dp)
    return adapter.finish(prep, latents, job)
