"""Video latents to frames: the VAE stage's decoders for video families (issue 18).

A video family names its decoder in `Family.video_decoder`; the VAE service builds it in
place of the image `VaeDecoder` and then encodes each video's frames (services/vae/video.py).
A decoder takes the denoiser's latents as the pipeline holds them before its own
`decode_latents` (for CogVideoX [N, latent frames, C, h, w], scaling not yet undone) and
returns uint8 frames [N, frames, H, W, 3], rounded as diffusers' `numpy_to_pil` rounds,
so the frames equal the pipeline's. How a family plugs in: subclass `VideoDecoder`, load
the VAE in `__init__`, and write `latent_shape` (what a request's latents must look like),
`decode_float` (the pipeline's own decode and `postprocess_video`), `vae_input` and, where
the decode is batched, `iter_pixels` (below).

Streaming: `iter_decode` yields one video's frames piece by piece as the VAE decodes them
(CogVideoX: each latent frame batch of its conv-cached loop). A decoder therefore also
says how it decodes in three steps that the video VAE gang (video_gang.py) reuses with a
sharded copy of the VAE: `vae_input` (latents as the VAE takes them), `iter_pixels` (the
VAE's output piece by piece, given the VAE to run) and `postprocess`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ditmesh.common.errors import InvalidArgument
from ditmesh.common.models import ModelRef
from ditmesh.vae.decoder import to_uint8


class VideoDecoder:
    """What every video decoder shares: the checks and the uint8 rounding."""

    video = True

    def __init__(self, model: ModelRef, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers.video_processor import VideoProcessor

        self.model = model
        self.device = device
        self.dtype = dtype
        self.processor = VideoProcessor(vae_scale_factor=model.vae_scale_factor)

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        """The shape of one video's latents (no batch dim) for a request of this size."""
        raise NotImplementedError

    def check_latents(
        self, latents: torch.Tensor, height: int, width: int, num_frames: int = 0
    ) -> None:
        if num_frames < 1:
            raise InvalidArgument(
                f"model {self.model.name!r} makes videos: DecodeParams.num_frames must be set"
            )
        expect = self.latent_shape(height, width, num_frames)
        if latents.dim() != len(expect) + 1 or tuple(latents.shape[1:]) != expect:
            raise InvalidArgument(
                f"latents of shape {list(latents.shape)} do not fit {num_frames} frames of "
                f"{height}x{width} (expected [N, {', '.join(map(str, expect))}])"
            )

    def decode_float(self, latents: torch.Tensor) -> np.ndarray:
        """Float frames [N, F, H, W, 3] in [0, 1], as the pipeline's output_type="np"."""
        raise NotImplementedError

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 frames [N, F, H, W, 3]."""
        return to_uint8(self.decode_float(latents))

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """One video's latents [1, ...] as the VAE takes them: [1, C, F, h, w], scaled."""
        raise NotImplementedError

    def iter_pixels(self, vae: torch.nn.Module, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """`vae`'s output for `z` (from `vae_input`) in order, [1, 3, f, H, W] in [-1, 1]
        per piece. `vae` is this decoder's VAE or the gang's sharded copy of it. This
        base decodes in one piece; a family whose decode is batched yields each batch."""
        yield vae.decode(z, return_dict=False)[0]

    def postprocess(self, pixels: torch.Tensor) -> np.ndarray:
        """One piece of `iter_pixels` as float frames [f, H, W, 3] in [0, 1]."""
        return self.processor.postprocess_video(pixels, output_type="np")[0]

    @torch.inference_mode()
    def iter_float(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """`iter_decode` before its uint8 rounding."""
        for pixels in self.iter_pixels(self.vae, self.vae_input(latents)):
            yield self.postprocess(pixels)

    def iter_decode(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """One video's uint8 frames [f, H, W, 3], in order, as they are decoded: `latents`
        is one video ([1, ...]) and the pieces concatenated are `decode(latents)[0]`, so
        the service can send each piece on while the next is decoded."""
        for piece in self.iter_float(latents):
            yield to_uint8(piece)

    def is_broken(self) -> bool:
        return False  # one process: nothing to lose

    def close(self) -> None:
        pass


class CogVideoXDecoder(VideoDecoder):
    """AutoencoderKLCogVideoX: 3D causal convolutions, time compressed 4x (13 latent frames
    give 49). The latents are [N, F, C, h, w]; `CogVideoXPipeline.decode_latents` moves
    channels in front of frames and divides by the scaling factor, then the VAE decodes."""

    def __init__(self, model: ModelRef, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import AutoencoderKLCogVideoX

        super().__init__(model, device, dtype)
        self.vae = AutoencoderKLCogVideoX.from_pretrained(
            model.source, subfolder="vae", dtype=dtype
        ).to(device)
        self.vae.eval()
        self.scaling = float(self.vae.config.scaling_factor)

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        vsf = self.model.vae_scale_factor
        frames = (num_frames - 1) // self.model.frame_multiple + 1
        return (frames, self.model.latent_channels, height // vsf, width // vsf)

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.to(self.device, self.dtype).permute(0, 2, 1, 3, 4) / self.scaling

    @torch.inference_mode()
    def decode_float(self, latents: torch.Tensor) -> np.ndarray:
        frames = self.vae.decode(self.vae_input(latents)).sample
        return self.processor.postprocess_video(frames, output_type="np")

    def iter_pixels(self, vae: torch.nn.Module, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """AutoencoderKLCogVideoX._decode's loop, one latent frame batch (with the previous
        batch's conv cache) per piece: the same calls, so the pieces joined are its output."""
        cache = None
        for start, end in frame_batches(z.shape[2], vae.num_latent_frames_batch_size):
            zi = z[:, :, start:end]
            if vae.post_quant_conv is not None:
                zi = vae.post_quant_conv(zi)
            pixels, cache = vae.decoder(zi, conv_cache=cache)
            yield pixels


def frame_batches(frames: int, batch: int) -> list[tuple[int, int]]:
    """The latent frame ranges AutoencoderKLCogVideoX._decode decodes one after another:
    `batch` frames each, the remainder (frames % batch) added to the first."""
    extra = frames % batch
    return [
        (batch * i + (0 if i == 0 else extra), batch * (i + 1) + extra)
        for i in range(max(frames // batch, 1))
    ]
