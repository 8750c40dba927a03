"""PixArt-Sigma and PixArt-alpha under every gang layout equal the single process.

See helpers.ParallelEquivalence. The text masks have padding, as the encoder's do, so the
cross-attention's mask is exercised on split image tokens.
"""

from __future__ import annotations

import pytest
import torch

from ditmesh.denoiser.job import DenoiseJob

from .helpers import ParallelEquivalence, pixart_alpha_with_micro_conditions

pytestmark = pytest.mark.slow  # gloo gangs of 2 and 4 processes


def pixart_jobs(model_dir: str) -> list[DenoiseJob]:
    from diffusers import PixArtTransformer2DModel

    cfg = PixArtTransformer2DModel.load_config(model_dir, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    text_len = 12

    def cond(real: int, prefix: str = "") -> dict[str, torch.Tensor]:
        mask = torch.zeros(1, text_len, dtype=torch.int64)
        mask[:, :real] = 1
        return {
            prefix + "prompt_embeds": torch.randn(
                1, text_len, cfg["caption_channels"], generator=g
            ),
            prefix + "prompt_attention_mask": mask,
        }

    both = {**cond(7), **cond(1, "negative_")}
    common = dict(steps=3, true_cfg_scale=1.0, seed=5)
    return [
        # 64x64: 16 image tokens, divisible by 2 and 4; CFG on; 2 images (dp2 splits them).
        DenoiseJob(
            request_id="a", height=64, width=64, guidance=4.5, num_images=2, cond=both, **common
        ),
        # 48x80: 15 image tokens, divisible by neither 2 nor 4; 3 images split 2 + 1 under dp2.
        DenoiseJob(
            request_id="b", height=48, width=80, guidance=3.0, num_images=3, cond=both, **common
        ),
        # guidance 1: no CFG, cfg2 halves compute the same branch.
        DenoiseJob(
            request_id="c", height=48, width=48, guidance=1.0, num_images=1, cond=cond(5), **common
        ),
    ]


class TestPixArtSigmaParallel(ParallelEquivalence):
    family = "pixart-sigma"

    @classmethod
    def make_jobs(cls, model_dir):
        return pixart_jobs(model_dir)


class TestPixArtAlphaParallel(ParallelEquivalence):
    """Alpha as its 1024-px checkpoint is: with size and aspect-ratio micro-conditions,
    which are per-image inputs and so must follow the images under dp and cfg."""

    family = "pixart-alpha"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory) -> str:
        from ditmesh.tiny import make_tiny

        folder = make_tiny(cls.family, tmp_path_factory.mktemp(cls.family) / "model")
        return str(pixart_alpha_with_micro_conditions(folder))

    @classmethod
    def make_jobs(cls, model_dir):
        return pixart_jobs(model_dir)
