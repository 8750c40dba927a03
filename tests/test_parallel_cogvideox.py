"""CogVideoX (5B and 2B layouts) under every gang layout equals the single process.

See helpers.ParallelEquivalence. The 5B layout cuts its 3D rotary table to each rank's
video tokens and steps the DPM scheduler, which draws noise from the request's generator
at every step (so a dp rank must step its videos with the noise the whole batch would
get); the 2B layout adds sinusoidal positions before the split and steps DDIM.
"""

from __future__ import annotations

import pytest
import torch

from ditmesh.denoiser.job import DenoiseJob

from .helpers import ParallelEquivalence

pytestmark = pytest.mark.slow  # gloo gangs of 2 and 4 processes


def cogvideox_jobs(model_dir: str) -> list[DenoiseJob]:
    from diffusers import CogVideoXTransformer3DModel

    cfg = CogVideoXTransformer3DModel.load_config(model_dir, subfolder="transformer")
    g = torch.Generator().manual_seed(0)

    def cond(prefix: str = "") -> dict[str, torch.Tensor]:
        shape = (1, cfg["max_text_seq_length"], cfg["text_embed_dim"])
        return {prefix + "prompt_embeds": torch.randn(*shape, generator=g)}

    both = {**cond(), **cond("negative_")}
    common = dict(steps=3, true_cfg_scale=1.0, seed=5)
    return [
        # 9 frames (3 latent) of 48x48: 3 x 3 x 3 = 27 video tokens, divisible by neither
        # 2 nor 4; CFG on; 2 videos (dp2 splits them).
        DenoiseJob(
            request_id="a",
            height=48,
            width=48,
            num_frames=9,
            guidance=6.0,
            num_images=2,
            cond=both,
            **common,
        ),
        # 5 frames (2 latent) of 64x32: 2 x 4 x 2 = 16 tokens; 3 videos split 2 + 1 under dp2.
        DenoiseJob(
            request_id="b",
            height=64,
            width=32,
            num_frames=5,
            guidance=3.0,
            num_images=3,
            cond=both,
            **common,
        ),
        # guidance 1: no CFG, cfg2 halves compute the same branch; one frame.
        DenoiseJob(
            request_id="c",
            height=32,
            width=48,
            num_frames=1,
            guidance=1.0,
            num_images=1,
            cond=cond(),
            **common,
        ),
    ]


class TestCogVideoX5BParallel(ParallelEquivalence):
    """Rotary positions, DPM scheduler."""

    family = "cogvideox"

    @classmethod
    def make_jobs(cls, model_dir):
        return cogvideox_jobs(model_dir)


class TestCogVideoX2BParallel(ParallelEquivalence):
    """Sinusoidal positions, DDIM scheduler."""

    family = "cogvideox-2b"

    @classmethod
    def make_jobs(cls, model_dir):
        return cogvideox_jobs(model_dir)


def test_pipefusion_is_refused_up_front():
    """Not offered for CogVideoX (xDiT has none for it either): no PipeFusion plan."""
    from ditmesh.common.models import COGVIDEOX
    from ditmesh.denoiser.cogvideox import CogVideoXAdapter

    assert COGVIDEOX.denoiser.endswith(":CogVideoXAdapter")
    assert CogVideoXAdapter.pipefusion_plan is None
