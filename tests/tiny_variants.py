"""Tiny-model variants that `make_tiny` does not build, for code paths real checkpoints take."""

from __future__ import annotations

import pathlib

import torch


def pixart_alpha_with_micro_conditions(
    folder: str | pathlib.Path, *, seed: int = 1
) -> pathlib.Path:
    """Rewrites a tiny PixArt-alpha's transformer the way the 1024-px alpha checkpoint is:
    it embeds the image size and aspect ratio (micro-conditions).

    PixArtAlphaPipeline sends them only when `sample_size` is 128, and the
    transformer splits its width in thirds for them, so both are set here
    (4 heads of 24 = 96 wide; the head count stays divisible by 2 and 4).
    """
    from diffusers import PixArtTransformer2DModel

    folder = pathlib.Path(folder)
    cfg = dict(PixArtTransformer2DModel.load_config(folder, subfolder="transformer"))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.update(
        sample_size=128,
        use_additional_conditions=True,
        attention_head_dim=24,
        cross_attention_dim=cfg["num_attention_heads"] * 24,
    )
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(**cfg).eval()
    assert transformer.use_additional_conditions
    transformer.save_pretrained(folder / "transformer")
    return folder


def sd35_medium_style(folder: str | pathlib.Path, *, seed: int = 1) -> pathlib.Path:
    """Rewrites a tiny SD3's transformer the way SD3.5-medium is: RMS q/k norms and a
    second, image-only attention (`attn2`) in the first block.

    The last block stays a plain one, so both block kinds are exercised.
    """
    from diffusers import SD3Transformer2DModel

    folder = pathlib.Path(folder)
    cfg = dict(SD3Transformer2DModel.load_config(folder, subfolder="transformer"))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.update(dual_attention_layers=(0,), qk_norm="rms_norm")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**cfg).eval()
    assert transformer.transformer_blocks[0].attn2 is not None
    transformer.save_pretrained(folder / "transformer")
    return folder
