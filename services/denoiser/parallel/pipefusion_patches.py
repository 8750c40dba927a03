"""How PipeFusion cuts a step's latents into patches, and runs the transformer on one.

A patch is a run of consecutive image tokens. What that is in the latents depends on
their layout, which the family's PipeFusionPlan names:

- `TokenPatches`: latents that are tokens already (Flux's packed [B, N, 64]); a patch is
  any run of them, and the adapter's `predict(tokens=...)` runs just those.
- `RowBandPatches`: latents [B, C, H, W] that the model patchifies itself (SD3); a patch
  is whole rows of tokens, a band of latent rows. The model sees the whole latent image
  (the positions of `pos_embed` need it); the stage's hooks cut the band's tokens out
  and put them back (pipefusion_stage.py), and the band's rows of the output are kept.

The transformer call itself is the adapter's `predict`, the one the whole-image loop
uses; `text=False` leaves the text tokens out (they travel with patch 0 only).
"""

from __future__ import annotations

import torch

from ditmesh.denoiser.parallel.mesh import split_counts


def patch_bounds(tokens: int, patches: int) -> list[tuple[int, int]]:
    """Consecutive token ranges, as even as possible, the first patches taking one more."""
    bounds, start = [], 0
    for count in split_counts(tokens, patches):
        bounds.append((start, start + count))
        start += count
    return bounds


class TokenPatches:
    """Latents [B, N, C] of tokens: a patch is any run of tokens."""

    def __init__(self, adapter, prep, images: slice, latents: torch.Tensor) -> None:
        self.adapter, self.prep, self.images = adapter, prep, images
        self.tokens = latents.shape[1]

    def units(self, patches: int) -> list[tuple[int, int]]:
        return patch_bounds(self.tokens, min(patches, self.tokens))

    def index(self, a: int, z: int) -> tuple:
        """The latents of tokens a:z."""
        return (slice(None), slice(a, z))

    def predict(self, latents, t, branch: str, a: int, z: int, with_text: bool) -> torch.Tensor:
        return self.adapter.predict(
            self.prep, latents, t, [branch], self.images, tokens=(a, z), text=with_text
        )[0]


class RowBandPatches:
    """Latents [B, C, H, W] patchified in the model: a patch is a band of whole token rows."""

    def __init__(self, adapter, prep, images: slice, latents: torch.Tensor) -> None:
        self.adapter, self.prep, self.images = adapter, prep, images
        self.p = adapter.transformer.config.patch_size
        self.rows, self.cols = latents.shape[2] // self.p, latents.shape[3] // self.p
        self.tokens = self.rows * self.cols

    def units(self, patches: int) -> list[tuple[int, int]]:
        bands = patch_bounds(self.rows, min(patches, self.rows))
        return [(r0 * self.cols, r1 * self.cols) for r0, r1 in bands]

    def index(self, a: int, z: int) -> tuple:
        """The latent rows of tokens a:z (whole token rows)."""
        r0, r1 = a // self.cols, z // self.cols
        return (slice(None), slice(None), slice(r0 * self.p, r1 * self.p))

    def predict(self, latents, t, branch: str, a: int, z: int, with_text: bool) -> torch.Tensor:
        out = self.adapter.predict(self.prep, latents, t, [branch], self.images, text=with_text)
        return out[0][self.index(a, z)]
