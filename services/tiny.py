"""Tiny random-weight diffusers pipelines, built offline, for tests and the demo.

The mesh is developed on machines that cannot reach a model hub, yet the encoder,
denoiser and VAE stages must be exercised against the real diffusers pipeline
classes. So each family here copies the *structure* of its real checkpoint
(component classes, channel layout, text lengths, scheduler and VAE factors) at a
size that builds, runs and saves in about a second and a few MB.

Tokenizers and text encoders are built offline in `ditmesh.tiny_text`; CogVideoX's
pipelines in `ditmesh.tiny_video` ("cogvideox" is the 5B layout, "cogvideox-2b" the
2B one).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanDiT2DModel,
    HunyuanDiTPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import BertTokenizer, CLIPTokenizer, T5Tokenizer

from ditmesh import tiny_latte_mochi, tiny_video
from ditmesh.tiny_text import (
    bert_encoder,
    bert_tokenizer,
    clip_encoder,
    clip_tokenizer,
    t5_encoder,
    t5_tokenizer,
    write_bert_vocab_file,
    write_clip_vocab_files,
    write_spiece_model,
)

FAMILIES = (
    "flux",
    "sd3",
    "pixart-sigma",
    "pixart-alpha",
    "hunyuandit",
    "cogvideox",
    "cogvideox-2b",
    "latte",
    "mochi",
)

# --------------------------------------------------------------------------- VAE


def _vae(
    latent_channels: int, scaling: float, shift: float | None, *, quant_conv: bool, seed: int
) -> AutoencoderKL:
    """Four resolution levels, as every real one has, so the VAE scale factor is 8."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        sample_size=128,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    ).eval()


# ---------------------------------------------------------------------- families

_HEADS = 4  # divisible by 2 and 4, for sequence-parallel splits of the heads
_HEAD_DIM = 16
_INNER = _HEADS * _HEAD_DIM


def _flux(seed: int) -> DiffusionPipeline:
    """FLUX.1-dev layout: guidance embedding, CLIP pooled vector + T5 sequence."""
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer(512)
    clip = clip_encoder(clip_tok, 32, with_projection=False, seed=seed)
    t5 = t5_encoder(t5_tok, 32, seed)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=t5.config.d_model,
        # FluxPipeline pools with CLIPTextModel.pooler_output, i.e. the hidden size.
        pooled_projection_dim=clip.config.hidden_size,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to the head dim, as (16, 56, 56) does for 128
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    vae = _vae(16, 0.3611, 0.1159, quant_conv=False, seed=seed)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def _sd3(seed: int) -> DiffusionPipeline:
    """SD3-medium layout: CLIP-L + CLIP-G pooled and concatenated, padded to T5's width.

    The two CLIPs get different widths (32, 48) so mixing them up fails loudly,
    and T5 is wider than their sum (96 > 80), as 4096 is wider than 768 + 1280.
    """
    clip_tok, clip_tok_2, t5_tok = clip_tokenizer(), clip_tokenizer(), t5_tokenizer(512)
    clip_l = clip_encoder(clip_tok, 32, with_projection=True, seed=seed)
    clip_g = clip_encoder(clip_tok_2, 48, with_projection=True, seed=seed)
    t5 = t5_encoder(t5_tok, 96, seed)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=t5.config.d_model,
        caption_projection_dim=_INNER,
        pooled_projection_dim=clip_l.config.projection_dim + clip_g.config.projection_dim,
        out_channels=16,
        # 1.5x the sample size, as 192 is for 128; allows images up to 768 px.
        pos_embed_max_size=48,
    ).eval()
    vae = _vae(16, 1.5305, 0.0609, quant_conv=False, seed=seed)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=clip_tok,
        text_encoder_2=clip_g,
        tokenizer_2=clip_tok_2,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


def _pixart_scheduler() -> DPMSolverMultistepScheduler:
    """The scheduler config both PixArt checkpoints ship (the DPM-Solver++ defaults)."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        solver_order=2,
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        timestep_spacing="linspace",
        steps_offset=0,
    )


def _pixart(
    seed: int, *, max_length: int, vae_scaling: float, pipeline_cls: type[DiffusionPipeline]
) -> DiffusionPipeline:
    """PixArt XL/2 layout: T5 cross-attention, adaLN-single, learned sigma (8 out channels).

    sample_size 32 is one of the sizes the pipelines have an aspect-ratio bin
    table for, so a call with default arguments works (256 px). The real
    1024-px alpha model uses micro-conditions, but the pipelines only send them
    when sample_size is 128, so here they stay off like diffusers' own default.
    """
    t5_tok = t5_tokenizer(max_length)
    t5 = t5_encoder(t5_tok, 32, seed)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=_INNER,
        attention_bias=True,
        sample_size=32,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=t5.config.d_model,
        use_additional_conditions=False,
    ).eval()
    vae = _vae(4, vae_scaling, None, quant_conv=True, seed=seed)
    return pipeline_cls(
        tokenizer=t5_tok,
        text_encoder=t5,
        vae=vae,
        transformer=transformer,
        scheduler=_pixart_scheduler(),
    )


def _hunyuandit(seed: int) -> DiffusionPipeline:
    """HunyuanDiT v1.2 layout: a bilingual BERT (77 tokens) and mT5 (256 tokens) for text,
    a DiT of even depth whose second half takes long skips from the first, rotary
    positions, learned sigma, DDPM with v-prediction, the SDXL VAE.

    Six blocks: two long skips (blocks 0 and 1 feed 5 and 4), so their order matters, as
    in the 40-block model. The text lengths are the real ones: the pipeline pads to 77
    and 256 and the transformer's learned padding is that long. v1.2 embeds neither the
    image size nor the style (`use_style_cond_and_image_meta_size=False`; v1.1 does).
    """
    bert_tok, mt5_tok = bert_tokenizer(77), t5_tokenizer(256, multilingual=True)
    bert = bert_encoder(bert_tok, 32, seed)
    mt5 = t5_encoder(mt5_tok, 48, seed)
    torch.manual_seed(seed)
    transformer = HunyuanDiT2DModel(
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        in_channels=4,
        patch_size=2,
        activation_fn="gelu-approximate",
        sample_size=32,
        hidden_size=_INNER,
        num_layers=6,
        mlp_ratio=4.0,
        learn_sigma=True,
        cross_attention_dim=bert.config.hidden_size,
        cross_attention_dim_t5=mt5.config.d_model,
        pooled_projection_dim=32,
        text_len=77,
        text_len_t5=256,
        use_style_cond_and_image_meta_size=False,
    ).eval()
    # The scheduler HunyuanDiT-v1.2-Diffusers ships: stochastic DDPM, v-prediction.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.018,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction",
        steps_offset=1,
        timestep_spacing="leading",
        variance_type="fixed_small",
    )
    return HunyuanDiTPipeline(
        vae=_vae(4, 0.13025, None, quant_conv=True, seed=seed),
        text_encoder=bert,
        tokenizer=bert_tok,
        transformer=transformer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=mt5,
        tokenizer_2=mt5_tok,
    )


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "flux": _flux,
    "sd3": _sd3,
    # Sigma: SDXL VAE, 300 tokens. Alpha: SD 1.x VAE, 120 tokens.
    "pixart-sigma": lambda seed: _pixart(
        seed, max_length=300, vae_scaling=0.13025, pipeline_cls=PixArtSigmaPipeline
    ),
    "pixart-alpha": lambda seed: _pixart(
        seed, max_length=120, vae_scaling=0.18215, pipeline_cls=PixArtAlphaPipeline
    ),
    "hunyuandit": _hunyuandit,
    "cogvideox": lambda seed: tiny_video.cogvideox(seed, five_b=True),
    "cogvideox-2b": lambda seed: tiny_video.cogvideox(seed, five_b=False),
    "latte": tiny_latte_mochi.latte,
    "mochi": tiny_latte_mochi.mochi,
}


def make_tiny(family: str, out_dir: str | os.PathLike[str], *, seed: int = 0) -> pathlib.Path:
    """Write a tiny pipeline of `family` to `out_dir` and return the folder.

    The folder loads with the family's plain diffusers pipeline class and no
    network. The same seed gives byte-identical weights, so tests on different
    processes or machines see the same model.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown model family {family!r}; known families: {', '.join(FAMILIES)}")
    out = pathlib.Path(out_dir)
    pipe = _BUILDERS[family](seed)
    pipe.save_pretrained(out)
    for name, component in pipe.components.items():
        if isinstance(component, CLIPTokenizer):
            write_clip_vocab_files(component, out / name)
        elif isinstance(component, T5Tokenizer):
            write_spiece_model(out / name, multilingual=family == "hunyuandit")
        elif isinstance(component, BertTokenizer):
            write_bert_vocab_file(component, out / name)
    return out
