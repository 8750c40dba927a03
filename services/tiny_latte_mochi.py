"""Tiny random-weight Latte and Mochi-1 pipelines for `make-tiny latte|mochi` (see tiny.py).

Each copies the structure of its real checkpoint (component classes, text length, VAE
factors, scheduler) at a size that builds and runs on a CPU in seconds. The head count is
4 (Ulysses degrees 2 and 4 divide it), as in the image families. What `make_tiny` does
with the pipeline (saving, offline tokenizer files) is tiny.py's.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLMochi,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    LattePipeline,
    LatteTransformer3DModel,
    MochiPipeline,
    MochiTransformer3DModel,
)

from ditmesh.tiny_text import t5_encoder, t5_tokenizer

_HEADS = 4
_HEAD_DIM = 16

LATTE_FRAMES = 16
"""Frames of the tiny Latte (`video_length`), as the real Latte-1 has. Latte's temporal
position table is that long, so a video has exactly this many frames."""


def latte(seed: int) -> DiffusionPipeline:
    """Latte-1 layout: spatial blocks (self-attention within a frame, cross-attention to
    T5) alternating with temporal blocks (attention across frames, one token position at
    a time), adaLN-single, learned sigma, DDIM, the SD VAE decoding frame by frame.

    LattePipeline cuts the prompt at 120 T5 tokens itself; the tokenizer says so too.
    """
    t5_tok = t5_tokenizer(120)
    t5 = t5_encoder(t5_tok, 32, seed)
    torch.manual_seed(seed)
    inner = _HEADS * _HEAD_DIM
    transformer = LatteTransformer3DModel(
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=inner,
        attention_bias=True,
        sample_size=8,  # 64 px by default, as 64 latents (512 px) in Latte-1
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=t5.config.d_model,
        video_length=LATTE_FRAMES,
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.18215,
    ).eval()
    # Latte-1's scheduler: DDIM over linear betas, epsilon prediction (deterministic at
    # the pipeline's eta 0).
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        prediction_type="epsilon",
    )
    return LattePipeline(
        tokenizer=t5_tok, text_encoder=t5, vae=vae, transformer=transformer, scheduler=scheduler
    )


def mochi(seed: int) -> DiffusionPipeline:
    """Mochi-1 layout: one stream of joint attention over all video tokens of all frames
    and the prompt's T5 tokens (256, masked), 3-D rotary positions, an asymmetric text
    stream (its own width, none after the last block), flow matching on Mochi's
    linear-quadratic sigmas, the causal 3-D VAE (8x spatial, 6x temporal, 12 channels).

    The rotary frequencies are a learned parameter initialised to zero; here they are
    drawn at random, so a position put on the wrong token changes the result.
    """
    t5_tok = t5_tokenizer(256)
    t5 = t5_encoder(t5_tok, 32, seed)
    torch.manual_seed(seed)
    transformer = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        num_layers=2,
        pooled_projection_dim=32,
        in_channels=12,
        qk_norm="rms_norm",
        text_embed_dim=t5.config.d_model,
        time_embed_dim=32,
        activation_fn="swiglu",
        max_sequence_length=256,
    ).eval()
    with torch.no_grad():
        transformer.pos_frequencies.normal_(0.0, 0.5)
    torch.manual_seed(seed)
    vae = AutoencoderKLMochi(
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    ).eval()
    # genmo/mochi-1-preview's scheduler config: the sigmas run backwards (noise at 1000).
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, invert_sigmas=True)
    return MochiPipeline(
        scheduler=scheduler, vae=vae, text_encoder=t5, tokenizer=t5_tok, transformer=transformer
    )
