"""SD3 under every gang layout equals the single process (see parallel_harness)."""

from __future__ import annotations

import torch

from ditmesh.denoiser.job import DenoiseJob

from .parallel_harness import ParallelEquivalence


def sd3_jobs(model_dir: str) -> list[DenoiseJob]:
    from diffusers import SD3Transformer2DModel

    cfg = SD3Transformer2DModel.load_config(model_dir, subfolder="transformer")
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

    # SD3 pads CLIP and T5 to a fixed length; lengths here just need to differ from
    # the image's so a mix-up of text and image tokens shows.
    both = {**cond(9), **cond(9, "negative_")}
    common = dict(steps=3, true_cfg_scale=1.0, seed=5)
    return [
        # 64x64: 16 image tokens, divisible by 2 and 4; CFG on; 2 images (dp2 splits them).
        DenoiseJob(
            request_id="a", height=64, width=64, guidance=4.0, num_images=2, cond=both, **common
        ),
        # 48x80: 15 image tokens, divisible by neither 2 nor 4; 3 images split 2 + 1 under dp2.
        DenoiseJob(
            request_id="b", height=48, width=80, guidance=3.0, num_images=3, cond=both, **common
        ),
        # guidance 1: no CFG, cfg2 halves compute the same branch.
        DenoiseJob(
            request_id="c", height=48, width=48, guidance=1.0, num_images=1, cond=cond(6), **common
        ),
    ]


class TestSD3Parallel(ParallelEquivalence):
    family = "sd3"

    @classmethod
    def make_jobs(cls, model_dir):
        return sd3_jobs(model_dir)
