"""Tiny random-weight video pipelines (issue 18), registered by `ditmesh.tiny.make_tiny`.

Each builder copies the structure of its real checkpoint (component classes, latent
channels, text length, VAE factors, the scheduler the checkpoint ships) at a size that
builds and runs in seconds on a CPU; the real `sample_*` sizes stay, so the pipelines'
defaults and positional tables are those of the real models.

A video family adds its builder here (or in a module of its own) and names it in
tiny.py's `_BUILDERS`.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DiffusionPipeline,
)

from ditmesh.tiny_text import t5_encoder, t5_tokenizer

_HEADS = 4  # divisible by 2 and 4, for Ulysses
_HEAD_DIM = 16  # the 3D rotary table splits it 4 (time) + 6 + 6 (rows, columns)


def _cogvideox_vae(scaling: float, seed: int) -> AutoencoderKLCogVideoX:
    """Four levels (8x space), time compressed 4x by the first two, as the real VAE."""
    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(
        block_out_channels=(8, 16, 16, 32),
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=8,
        temporal_compression_ratio=4,
        scaling_factor=scaling,
    ).eval()


def cogvideox(seed: int, *, five_b: bool) -> DiffusionPipeline:
    """CogVideoX 1.0. 2B layout: sinusoidal 3D positions added to the tokens, DDIM.
    5B layout: 3D rotary positions inside the attention, the DPM scheduler (which
    steps with the previous step's prediction). Both: T5 padded to 226 tokens in front
    of the video tokens, v-prediction with zero terminal SNR, 16 latent channels.
    """
    tok = t5_tokenizer(226)
    t5 = t5_encoder(tok, 32, seed)
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        in_channels=16,
        out_channels=16,
        time_embed_dim=32,
        text_embed_dim=t5.config.d_model,
        num_layers=2,
        max_text_seq_length=226,
        use_rotary_positional_embeddings=five_b,
    ).eval()
    # The schedulers' configs as CogVideoX-2b / -5b ship them (they differ in the SNR shift).
    common = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
    )
    if five_b:
        scheduler = CogVideoXDPMScheduler(snr_shift_scale=1.0, **common)
    else:
        scheduler = CogVideoXDDIMScheduler(snr_shift_scale=3.0, **common)
    return CogVideoXPipeline(
        tokenizer=tok,
        text_encoder=t5,
        vae=_cogvideox_vae(0.7 if five_b else 1.15258426, seed),
        transformer=transformer,
        scheduler=scheduler,
    )
