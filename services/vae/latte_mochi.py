"""The VAE stage's decoders for Latte and Mochi-1 (see video_decoder.py for what a video
decoder is and how the service uses it).

Latte's VAE is the 2-D image VAE: `LattePipeline.decode_latents` puts frames into the
batch, undoes the scaling and decodes each frame on its own, so the decode here does the
same (all frames of a video in one call). Mochi's is the causal 3-D `AutoencoderKLMochi`
(8x space, 6x time); `MochiPipeline` denormalizes the latents with the VAE config's
per-channel mean and std before decoding. Both then post-process as the pipelines do
(`postprocess_video`, output_type "np").
"""

from __future__ import annotations

import numpy as np
import torch

from ditmesh.common.models import ModelRef
from ditmesh.vae.video_decoder import VideoDecoder

# MochiPipeline's fixed temporal compression (its VAE config does not state it).
MOCHI_TEMPORAL_COMPRESSION = 6


class LatteDecoder(VideoDecoder):
    """AutoencoderKL frame by frame; latents [N, C, F, h, w] (channels before frames)."""

    def __init__(self, model: ModelRef, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import AutoencoderKL

        super().__init__(model, device, dtype)
        self.vae = AutoencoderKL.from_pretrained(model.source, subfolder="vae", dtype=dtype)
        self.vae.to(device).eval()
        self.scaling = float(self.vae.config.scaling_factor)

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        vsf = self.model.vae_scale_factor
        return (self.model.latent_channels, num_frames, height // vsf, width // vsf)

    @torch.inference_mode()
    def decode_float(self, latents: torch.Tensor) -> np.ndarray:
        n, _, frames = latents.shape[:3]
        z = latents.to(self.device, self.dtype).permute(0, 2, 1, 3, 4).flatten(0, 1)
        images = self.vae.decode(z / self.scaling).sample
        video = images.unflatten(0, (n, frames)).permute(0, 2, 1, 3, 4).float()
        return self.processor.postprocess_video(video, output_type="np")


class MochiDecoder(VideoDecoder):
    """AutoencoderKLMochi; latents [N, 12, (F-1)/6+1, h, w], normalized."""

    def __init__(self, model: ModelRef, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import AutoencoderKLMochi

        super().__init__(model, device, dtype)
        self.vae = AutoencoderKLMochi.from_pretrained(model.source, subfolder="vae", dtype=dtype)
        self.vae.to(device).eval()
        cfg = self.vae.config
        self.scaling = float(cfg.scaling_factor)
        self.mean = self.std = None
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            shape = (1, len(cfg.latents_mean), 1, 1, 1)
            self.mean = torch.tensor(cfg.latents_mean).view(shape)
            self.std = torch.tensor(cfg.latents_std).view(shape)

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        vsf = self.model.vae_scale_factor
        frames = (num_frames - 1) // MOCHI_TEMPORAL_COMPRESSION + 1
        return (self.model.latent_channels, frames, height // vsf, width // vsf)

    @torch.inference_mode()
    def decode_float(self, latents: torch.Tensor) -> np.ndarray:
        z = latents.to(self.device, self.dtype)
        if self.mean is not None:
            mean, std = self.mean.to(z), self.std.to(z)
            z = z * std / self.scaling + mean
        else:
            z = z / self.scaling
        video = self.vae.decode(z, return_dict=False)[0]
        return self.processor.postprocess_video(video, output_type="np")
