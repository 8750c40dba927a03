"""Latte under every gang layout equals the single process.

See helpers.ParallelEquivalence. Sequence parallelism splits each frame's tokens, so the
spatial self-attention is the gang's while the temporal blocks (attention across the 16
frames of one token position) stay local; their timestep rows are cut to the positions
a rank holds. The prompt is cut at its length as the pipeline's `mask_feature` does (one
video) or its padding zeroed (several), so both text shapes meet split tokens.
"""

from __future__ import annotations

import pytest
import torch

from ditmesh.denoiser.job import DenoiseJob

from .helpers import ParallelEquivalence

pytestmark = pytest.mark.slow  # gloo gangs of 2 and 4 processes


def latte_jobs(model_dir: str) -> list[DenoiseJob]:
    from diffusers import LatteTransformer3DModel

    cfg = LatteTransformer3DModel.load_config(model_dir, subfolder="transformer")
    frames, text_len = cfg["video_length"], 120
    g = torch.Generator().manual_seed(0)

    def cond(real: int, prefix: str = "") -> dict[str, torch.Tensor]:
        mask = torch.zeros(1, text_len, dtype=torch.int64)
        mask[:, :real] = 1
        embeds = torch.randn(1, text_len, cfg["caption_channels"], generator=g)
        return {prefix + "prompt_embeds": embeds, prefix + "prompt_attention_mask": mask}

    both = {**cond(7), **cond(1, "negative_")}
    common = dict(steps=2, true_cfg_scale=1.0, seed=5, num_frames=frames)
    return [
        # 48x80: 15 tokens a frame, divisible by neither 2 nor 4; CFG; one video.
        DenoiseJob(
            request_id="a", height=48, width=80, guidance=4.5, num_images=1, cond=both, **common
        ),
        # 32x48: 6 tokens a frame (4 ranks: 2, 2, 2, 0); 3 videos split 2 + 1 under dp2.
        DenoiseJob(
            request_id="b", height=32, width=48, guidance=3.0, num_images=3, cond=both, **common
        ),
        # guidance 1: no CFG, cfg2 halves compute the same branch.
        DenoiseJob(
            request_id="c", height=48, width=48, guidance=1.0, num_images=1, cond=cond(5), **common
        ),
    ]


class TestLatteParallel(ParallelEquivalence):
    family = "latte"

    @classmethod
    def make_jobs(cls, model_dir):
        return latte_jobs(model_dir)
