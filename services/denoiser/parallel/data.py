"""Data parallel: the images of a request split over the dp replicas, gathered at the end.

Both sampling loops (sampler.sample and PipeFusion's) take their replica's share here and
gather every replica's latents back here; the mesh (parallel/mesh.py) says which
replicas there are, the loops what they do with their images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ditmesh.denoiser.parallel.mesh import Group, split_counts


def all_gather(x: torch.Tensor, group: Group) -> list[torch.Tensor]:
    """Every group member's `x` (all the same shape), in group order."""
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
    parts = all_gather(latents, group)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


@dataclass(frozen=True, slots=True)
class ImageShare:
    """This dp replica's images of a request: `images` indexes the request's batch."""

    counts: list[int]
    """Images of every replica (the first replicas take one more)."""
    images: slice
    group: Group

    @classmethod
    def of(cls, num_images: int, dp: Group) -> ImageShare:
        counts = split_counts(num_images, dp.size)
        begin = sum(counts[: dp.rank])
        return cls(counts=counts, images=slice(begin, begin + counts[dp.rank]), group=dp)

    def gather(self, latents: torch.Tensor) -> torch.Tensor:
        """Every replica's latents, in image order, on every replica."""
        return gather_images(latents, self.counts, self.group)
