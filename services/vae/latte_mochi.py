"""The VAE stage's decoders for Latte and Mochi-1 (see video_decoder.py for what a video
decoder is and how the service uses it).

Latte's VAE is the 2-D image VAE: `LattePipeline.decode_latents` puts frames into the
batch, undoes the scaling and decodes `LATTE_DECODE_CHUNK` frames per call, so the decode
here does the same, and `iter_decode` yields each call's frames. Mochi's is the causal 3-D
`AutoencoderKLMochi` (8x space, 6x time), which `MochiPipeline` decodes in one call (its
frame-wise decoding stays off), after denormalizing the latents with the VAE config's
per-channel mean and std; its `iter_decode` is one piece. Both then post-process as the pipelines do
(`postprocess_video`, output_type "np").
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ditmesh.common.models import ModelRef
from ditmesh.vae.video_decoder import VideoDecoder

# MochiPipeline's fixed temporal compression (its VAE config does not state it).
MOCHI_TEMPORAL_COMPRESSION = 6

LATTE_DECODE_CHUNK = 14
"""Frames per VAE call, `LattePipeline.decode_latents`' default `decode_chunk_size`."""


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

    def _frames(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, C, F, h, w] -> the frames as the pipeline hands them to the VAE, [N*F, C, h, w]."""
        z = latents.to(self.device, self.dtype).permute(0, 2, 1, 3, 4).flatten(0, 1)
        return 1 / self.scaling * z

    def _decode_chunks(self, vae: torch.nn.Module, frames: torch.Tensor) -> Iterator[torch.Tensor]:
        for chunk in frames.split(LATTE_DECODE_CHUNK):
            yield vae.decode(chunk).sample

    @torch.inference_mode()
    def decode_float(self, latents: torch.Tensor) -> np.ndarray:
        n, _, frames = latents.shape[:3]
        images = torch.cat(list(self._decode_chunks(self.vae, self._frames(latents))))
        video = images.unflatten(0, (n, frames)).permute(0, 2, 1, 3, 4).float()
        return self.processor.postprocess_video(video, output_type="np")

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """[1, C, F, h, w], scaled (frames go into the batch in `iter_pixels`)."""
        return self._frames(latents).unflatten(0, (1, -1)).permute(0, 2, 1, 3, 4)

    def iter_pixels(self, vae: torch.nn.Module, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """The pipeline's chunks of frames, each one VAE call (`vae` may be distvae's copy)."""
        for images in self._decode_chunks(vae, z[0].transpose(0, 1).contiguous()):
            yield images.transpose(0, 1).unsqueeze(0).float()


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

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, self.dtype)
        if self.mean is None:
            return z / self.scaling
        return z * self.std.to(z) / self.scaling + self.mean.to(z)

    @torch.inference_mode()
    def decode_float(self, latents: torch.Tensor) -> np.ndarray:
        video = self.vae.decode(self.vae_input(latents), return_dict=False)[0]
        return self.processor.postprocess_video(video, output_type="np")
