"""HunyuanDiT under every gang layout equals the single process.

See helpers.ParallelEquivalence. The text masks have padding, as the encoder's do, so
the learned text padding is exercised; the jobs draw DDPM's per-step noise, so a dp
rank must step its images with the noise the whole batch would get. The v1.1 layout
also embeds the image meta size and the style, per-image inputs that must follow the
images under dp and cfg.
"""

from __future__ import annotations

import pytest
import torch

from ditmesh.denoiser.job import DenoiseJob

from .helpers import ParallelEquivalence, hunyuandit_v11_style

pytestmark = pytest.mark.slow  # gloo gangs of 2 and 4 processes


def hunyuan_jobs(model_dir: str) -> list[DenoiseJob]:
    from diffusers import HunyuanDiT2DModel

    cfg = HunyuanDiT2DModel.load_config(model_dir, subfolder="transformer")
    g = torch.Generator().manual_seed(0)

    def cond(real: int, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {}
        for suffix, length, width in (
            ("", cfg["text_len"], cfg["cross_attention_dim"]),
            ("_2", cfg["text_len_t5"], cfg["cross_attention_dim_t5"]),
        ):
            mask = torch.zeros(1, length, dtype=torch.int64)
            mask[:, :real] = 1
            out[prefix + "prompt_embeds" + suffix] = torch.randn(1, length, width, generator=g)
            out[prefix + "prompt_attention_mask" + suffix] = mask
        return out

    both = {**cond(7), **cond(1, "negative_")}
    common = dict(steps=3, true_cfg_scale=1.0, seed=5)
    return [
        # 64x64: 16 image tokens, divisible by 2 and 4; CFG on; 2 images (dp2 splits them).
        DenoiseJob(
            request_id="a", height=64, width=64, guidance=5.0, num_images=2, cond=both, **common
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


class TestHunyuanDiTParallel(ParallelEquivalence):
    family = "hunyuandit"

    @classmethod
    def make_jobs(cls, model_dir):
        return hunyuan_jobs(model_dir)


class TestHunyuanDiTv11Parallel(ParallelEquivalence):
    """v1.1 embeds the meta size and style per image."""

    family = "hunyuandit"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory) -> str:
        from ditmesh.tiny import make_tiny

        folder = make_tiny(cls.family, tmp_path_factory.mktemp("hunyuandit-v11") / "model")
        return str(hunyuandit_v11_style(folder))

    @classmethod
    def make_jobs(cls, model_dir):
        return hunyuan_jobs(model_dir)


def test_pipefusion_is_refused_up_front():
    """Not yet: the long skips would have to travel with the patch between stages."""
    from ditmesh.denoiser.parallel.mesh import ParallelConfig, ParallelConfigError

    with pytest.raises(ParallelConfigError, match="--pipefusion.*hunyuandit"):
        ParallelConfig(pipefusion=2).check_model(heads=4, family="hunyuandit")
    ParallelConfig(ulysses=2, ring=2).check_model(heads=4, family="hunyuandit")
