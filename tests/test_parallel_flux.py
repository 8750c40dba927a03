"""Flux under every gang layout equals the single process (see parallel_harness)."""

from __future__ import annotations

import torch

from ditmesh.common.models import resolve_model
from ditmesh.denoiser.job import DenoiseJob

from .parallel_harness import ParallelEquivalence


def flux_jobs(model_dir: str) -> list[DenoiseJob]:
    from diffusers import FluxTransformer2DModel

    cfg = FluxTransformer2DModel.load_config(model_dir, subfolder="transformer")
    resolve_model(model_dir)
    g = torch.Generator().manual_seed(0)

    def cond(text_len: int, prefix: str = "") -> dict[str, torch.Tensor]:
        return {
            prefix + "prompt_embeds": torch.randn(
                1, text_len, cfg["joint_attention_dim"], generator=g
            ),
            prefix + "pooled_prompt_embeds": torch.randn(
                1, cfg["pooled_projection_dim"], generator=g
            ),
        }

    both = {**cond(7), **cond(7, "negative_")}
    common = dict(steps=3, guidance=3.5, seed=5)
    return [
        # 64x64: 16 image tokens, divisible by 2 and 4; true CFG on; 2 images (dp2 splits them).
        # 8 text tokens: Ulysses alone splits them across the ranks too (7 and 5 below: not).
        DenoiseJob(
            request_id="a",
            height=64,
            width=64,
            true_cfg_scale=2.0,
            num_images=2,
            cond={**cond(8), **cond(8, "negative_")},
            **common,
        ),
        # 48x80: 15 image tokens, divisible by neither 2 nor 4; 3 images split 2 + 1 under dp2.
        DenoiseJob(
            request_id="b",
            height=48,
            width=80,
            true_cfg_scale=1.5,
            num_images=3,
            cond=both,
            **common,
        ),
        # No CFG: cfg2 halves compute the same branch.
        DenoiseJob(
            request_id="c",
            height=48,
            width=48,
            true_cfg_scale=1.0,
            num_images=1,
            cond=cond(5),
            **common,
        ),
        # 16x80: 5 image tokens. At 4 ranks each holds 2, and the padding (3) runs over more
        # than the last rank's shard; 8 text tokens, split across the ranks under Ulysses.
        DenoiseJob(
            request_id="d",
            height=16,
            width=80,
            true_cfg_scale=1.0,
            num_images=1,
            cond=cond(8),
            **common,
        ),
    ]


class TestFluxParallel(ParallelEquivalence):
    family = "flux"

    @classmethod
    def make_jobs(cls, model_dir):
        return flux_jobs(model_dir)
