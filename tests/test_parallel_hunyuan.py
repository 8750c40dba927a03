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


def test_pipefusion_is_accepted_and_refuses_more_stages_than_blocks():
    """PipeFusion runs HunyuanDiT (tests/test_pipefusion.py: the gangs); the long skips
    travel with the patch between stages."""
    from ditmesh.denoiser.parallel.mesh import ParallelConfig, ParallelConfigError

    ParallelConfig(pipefusion=2).check_model(heads=4, family="hunyuandit", blocks=6)
    ParallelConfig(cfg=2, pipefusion=2, ulysses=2).check_model(heads=4, family="hunyuandit")
    ParallelConfig(ulysses=2, ring=2).check_model(heads=4, family="hunyuandit")
    with pytest.raises(ParallelConfigError, match="--pipefusion 7 is more stages than"):
        ParallelConfig(pipefusion=7).check_model(heads=4, family="hunyuandit", blocks=6)


def test_long_skips_pair_the_halves_and_cross_stages_as_the_forward_pops_them():
    """HunyuanDiT2DModel pushes the outputs of blocks 0..n/2-2 and pops one in each block
    past n/2: block j feeds block n-1-j. A stage receives the skips produced before it
    and taken in it or after, and sends on those taken after it."""
    from ditmesh.denoiser.hunyuan import long_skips
    from ditmesh.denoiser.parallel.pipefusion_skips import SkipRelay

    assert long_skips(6) == {0: 5, 1: 4}
    assert long_skips(40)[0] == 39 and long_skips(40)[18] == 21 and len(long_skips(40)) == 19
    with pytest.raises(ValueError, match="even number of blocks"):
        long_skips(5)
    # Six blocks over four stages: 0-1, 2-3, 4, 5.
    relays = [SkipRelay.of(long_skips(6), lo, hi) for lo, hi in ((0, 2), (2, 4), (4, 5), (5, 6))]
    assert [(r.takes, r.gives) for r in relays] == [
        ((), (0, 1)),
        ((0, 1), (0, 1)),
        ((0, 1), (0,)),
        ((0,), ()),
    ]


def test_long_skips_follow_the_models_own_stack():
    """The pairs are those of diffusers' forward: a block that takes a skip gets the
    output of its pair (checked by recording what the forward passes)."""
    from diffusers import HunyuanDiT2DModel

    from ditmesh.denoiser.hunyuan import long_skips

    torch.manual_seed(0)
    model = HunyuanDiT2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        patch_size=2,
        sample_size=8,
        hidden_size=16,
        num_layers=8,
        cross_attention_dim=16,
        cross_attention_dim_t5=16,
        pooled_projection_dim=16,
        text_len=4,
        text_len_t5=4,
        use_style_cond_and_image_meta_size=False,
    ).eval()
    outputs, took = {}, {}
    for j, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, a, out, j=j: outputs.__setitem__(j, out))
        blk.register_forward_pre_hook(
            lambda m, a, kw, j=j: took.__setitem__(j, kw.get("skip")), with_kwargs=True
        )
    model(
        torch.randn(1, 4, 8, 8),
        torch.tensor([3.0]),
        encoder_hidden_states=torch.randn(1, 4, 16),
        text_embedding_mask=torch.ones(1, 4, dtype=torch.int64),
        encoder_hidden_states_t5=torch.randn(1, 4, 16),
        text_embedding_mask_t5=torch.ones(1, 4, dtype=torch.int64),
        image_meta_size=None,
        style=None,
        image_rotary_emb=None,
    )
    pairs = {c: p for p, c in long_skips(8).items()}
    assert {j for j, s in took.items() if s is not None} == set(pairs)
    for consumer, producer in pairs.items():
        assert took[consumer] is outputs[producer], (producer, consumer)
