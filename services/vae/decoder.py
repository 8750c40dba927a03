"""Latents to pixels to encoded images.

Takes the denoiser's unpacked latents (VAE latent space, before scaling), applies
the VAE's scaling and shift factors as the pipelines do, decodes, and
post-processes with diffusers' VaeImageProcessor, so the pixels match the
pipeline's output exactly.
"""

from __future__ import annotations

import io
from typing import Protocol

import numpy as np
import torch

from ditmesh.common.errors import InvalidArgument
from ditmesh.common.models import ModelRef
from ditmesh.v1 import vae_pb2
from ditmesh.vae.png import encode_png

DEFAULT_QUALITY = 90

MIME = {
    vae_pb2.OUTPUT_FORMAT_PNG: "image/png",
    vae_pb2.OUTPUT_FORMAT_JPEG: "image/jpeg",
    vae_pb2.OUTPUT_FORMAT_WEBP: "image/webp",
    vae_pb2.OUTPUT_FORMAT_RAW: "application/x-ditmesh-rgb8",
}
_PIL_FORMAT = {
    vae_pb2.OUTPUT_FORMAT_PNG: "PNG",
    vae_pb2.OUTPUT_FORMAT_JPEG: "JPEG",
    vae_pb2.OUTPUT_FORMAT_WEBP: "WEBP",
}


class Decoder(Protocol):
    """What the VAE service decodes with: one process (VaeDecoder) or a gang (VaeGang)."""

    model: ModelRef

    def check_latents(self, latents: torch.Tensor, height: int, width: int) -> None:
        """Refuses latents that do not fit a height x width image (INVALID_ARGUMENT)."""

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 images [N, H, W, 3]."""
        ...

    def is_broken(self) -> bool:
        """Whether the decoder failed for good (a gang lost a process): the stage must stop."""
        ...

    def close(self) -> None: ...


class VaeDecoder:
    def __init__(self, model: ModelRef, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import AutoencoderKL
        from diffusers.image_processor import VaeImageProcessor

        self.model = model
        self.device = device
        self.dtype = dtype
        self.vae = AutoencoderKL.from_pretrained(model.source, subfolder="vae", dtype=dtype).to(
            device
        )
        self.vae.eval()
        self.processor = VaeImageProcessor(
            vae_scale_factor=model.vae_scale_factor * model.family.latent_patch
        )
        cfg = self.vae.config
        self.scaling = float(cfg.scaling_factor)
        self.shift = float(cfg.shift_factor) if cfg.get("shift_factor") is not None else 0.0

    def check_latents(self, latents: torch.Tensor, height: int, width: int) -> None:
        vsf = self.model.vae_scale_factor
        expect = (self.model.latent_channels, height // vsf, width // vsf)
        if latents.dim() != 4 or tuple(latents.shape[1:]) != expect:
            raise InvalidArgument(
                f"latents of shape {list(latents.shape)} do not fit a {height}x{width} image "
                f"(expected [N, {', '.join(map(str, expect))}])"
            )

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Returns uint8 images [N, H, W, 3]."""
        z = latents.to(self.device, self.dtype) / self.scaling + self.shift
        image = self.vae.decode(z, return_dict=False)[0]
        arr = self.processor.postprocess(image, output_type="np")
        # The same rounding VaeImageProcessor.numpy_to_pil applies.
        return (arr * 255).round().astype("uint8")

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents as the VAE's decoder takes them (scaling and shift undone, as `decode`).

        Separate so the VAE gang can scale once on its leader and send the result to every rank.
        """
        return latents.to(self.device, self.dtype) / self.scaling + self.shift

    @torch.inference_mode()
    def decode_float(self, latents: torch.Tensor) -> np.ndarray:
        """Float images [N, H, W, 3] in [0, 1]: `decode` before its uint8 rounding.

        The VAE gang falls back to this for latents too short to split, and tests compare
        a gang's output with it before rounding hides small differences.
        """
        image = self.vae.decode(self.scale_latents(latents), return_dict=False)[0]
        return self.processor.postprocess(image, output_type="np")

    def is_broken(self) -> bool:
        return False  # one process: nothing to lose

    def close(self) -> None:
        pass


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] to uint8 with the rounding VaeImageProcessor.numpy_to_pil applies."""
    return (arr * 255).round().astype("uint8")


def encode_image(pixels: np.ndarray, fmt: int, quality: int = 0) -> bytes:
    if fmt == vae_pb2.OUTPUT_FORMAT_RAW:
        return np.ascontiguousarray(pixels).tobytes()
    if fmt == vae_pb2.OUTPUT_FORMAT_PNG:
        return encode_png(pixels)  # on several cores: services/vae/png.py says why
    from PIL import Image

    if fmt not in _PIL_FORMAT:
        raise InvalidArgument(f"unknown output format {fmt}")
    q = quality or DEFAULT_QUALITY
    if not 1 <= q <= 100:
        raise InvalidArgument(f"quality must be between 1 and 100; got {q}")
    buf = io.BytesIO()
    kwargs = (
        {"quality": q} if fmt in (vae_pb2.OUTPUT_FORMAT_JPEG, vae_pb2.OUTPUT_FORMAT_WEBP) else {}
    )
    Image.fromarray(pixels).save(buf, format=_PIL_FORMAT[fmt], **kwargs)
    return buf.getvalue()


def normalise_format(fmt: int) -> int:
    if fmt == vae_pb2.OUTPUT_FORMAT_UNSPECIFIED:
        return vae_pb2.OUTPUT_FORMAT_PNG
    if fmt not in MIME:
        raise InvalidArgument(f"unknown output format {fmt}")
    return fmt
