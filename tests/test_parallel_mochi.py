"""Mochi-1 under every gang layout equals the single process.

See helpers.ParallelEquivalence. The video tokens of all frames are one sequence, split
across the gang with the rotary table; the text tokens are whole on every rank and each
video attends to its own real ones (the mask) exactly once, so the jobs mix prompts of
different real lengths in one batch (cond and uncond) and an all-padding negative prompt
(what `force_zeros_for_empty_prompt` sends).
"""

from __future__ import annotations

import pytest
import torch

from ditmesh.denoiser.job import DenoiseJob

from .helpers import ParallelEquivalence

pytestmark = pytest.mark.slow  # gloo gangs of 2 and 4 processes


def mochi_jobs(model_dir: str) -> list[DenoiseJob]:
    from diffusers import MochiTransformer3DModel

    cfg = MochiTransformer3DModel.load_config(model_dir, subfolder="transformer")
    text_len = 256
    g = torch.Generator().manual_seed(0)

    def cond(real: int, prefix: str = "") -> dict[str, torch.Tensor]:
        mask = torch.zeros(1, text_len, dtype=torch.int64)
        mask[:, :real] = 1
        embeds = torch.randn(1, text_len, cfg["text_embed_dim"], generator=g)
        return {prefix + "prompt_embeds": embeds, prefix + "prompt_attention_mask": mask}

    both = {**cond(7), **cond(3, "negative_")}
    zeroed_negative = {**cond(9), **cond(0, "negative_")}
    common = dict(steps=2, true_cfg_scale=1.0, seed=5)
    return [
        # 13 frames (3 latent) of 48x80: 3 x 15 = 45 video tokens, divisible by neither 2
        # nor 4; CFG; one video.
        DenoiseJob(
            request_id="a",
            height=48,
            width=80,
            num_frames=13,
            guidance=4.5,
            num_images=1,
            cond=both,
            **common,
        ),
        # 7 frames (2 latent) of 32x48: 12 tokens; 3 videos split 2 + 1 under dp2; the
        # negative prompt has no real token.
        DenoiseJob(
            request_id="b",
            height=32,
            width=48,
            num_frames=7,
            guidance=3.0,
            num_images=3,
            cond=zeroed_negative,
            **common,
        ),
        # guidance 1: no CFG, cfg2 halves compute the same branch.
        DenoiseJob(
            request_id="c",
            height=48,
            width=48,
            num_frames=13,
            guidance=1.0,
            num_images=1,
            cond=cond(5),
            **common,
        ),
    ]


class TestMochiParallel(ParallelEquivalence):
    family = "mochi"

    @classmethod
    def make_jobs(cls, model_dir):
        return mochi_jobs(model_dir)
