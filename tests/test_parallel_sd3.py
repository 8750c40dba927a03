"""SD3 and SD3.5-style models under every gang layout equal the single process.

See parallel_harness. SD3.5 adds q/k norms and an image-only second attention.
"""

from __future__ import annotations

import pytest
import torch

from ditmesh.denoiser.job import DenoiseJob

from .parallel_harness import ParallelEquivalence
from .tiny_variants import sd35_medium_style


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


class TestSD35Parallel(ParallelEquivalence):
    """SD3.5-medium layout: the plan also swaps the processor of each block's `attn2`.

    Only what SD3.5 adds is checked here, to keep the file short: the 4-process
    layouts (Ulysses, Ring, both, and CFG with Ulysses) on one job with CFG,
    3 images and 15 image tokens. Data parallel is family code SD3 covers above.
    """

    family = "sd3"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory) -> str:
        from ditmesh.tiny import make_tiny

        folder = make_tiny(cls.family, tmp_path_factory.mktemp("sd35") / "model")
        return str(sd35_medium_style(folder))

    @classmethod
    def make_jobs(cls, model_dir):
        return [job for job in sd3_jobs(model_dir) if job.request_id == "b"]

    @pytest.mark.parametrize("world", [4])
    def test_layouts_match_single_process(self, model_dir, jobs, reference, world, tmp_path):
        super().test_layouts_match_single_process(model_dir, jobs, reference, world, tmp_path)
