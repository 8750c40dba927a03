"""Warm-up of the encoder and VAE stages: one request's work before the stage says SERVING.

On a GPU the first call of a freshly loaded model pays for lazy CUDA work (kernel loads,
cuBLAS/cuDNN handles and algorithm choice, allocator growth): measured on one H200 with
Flux, the first request after start spent 1.33 s encoding and 0.89 s decoding against
0.08 s and 0.13 s for the second. The denoiser warms up already (it compiles and captures
at start: services/denoiser/runner.py); this does the same for the other two stages, so
the first user's request is no slower than the second. `auto` warms up on a GPU only: on
a CPU the first call costs nothing extra worth a start-up delay.

A video model's VAE warms up on a short clip (the fewest frames above one the model
takes) at the family's default size, MP4-encoded, so the 3-D decoder's kernels and the
H.264 encoder are loaded; a full-length clip would only add start-up time. What the
stage does with the request is its servicer's; this module only builds the request.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from ditmesh.common.models import ModelRef, valid_frame_counts

log = logging.getLogger(__name__)
T = TypeVar("T")

WARMUP_MODES = ("auto", "on", "off")


def should_warm(mode: str, device: torch.device | str) -> bool:
    if mode not in WARMUP_MODES:
        raise ValueError(f"--warmup must be one of {', '.join(WARMUP_MODES)}; got {mode!r}")
    if mode == "auto":
        return torch.device(device).type == "cuda"
    return mode == "on"


class ModelThread:
    """The one thread that runs a stage's model calls (and the warm-up before them).

    CUDA libraries keep state per thread (cuBLAS handles and workspaces, among others),
    and a gRPC server hands each call to whichever of its pool threads is free: on one
    H200 the first request after start still encoded in 107 ms against 34 ms for the
    next, though the stage had warmed up, on its main thread. Calls run here with the
    caller's context (the call's timing clock and trace span), one at a time, which is
    how the GPU would run them anyway.
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        return self._pool.submit(contextvars.copy_context().run, fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def warm_encoder(service) -> None:
    """Runs a request through the encoder's servicer: checks, both prompts, serialization."""
    from ditmesh.v1 import encoder_pb2

    start = time.perf_counter()
    req = encoder_pb2.EncodeRequest(prompt="a warm-up prompt", encode_negative=True)
    list(service.Encode(req, None))
    log.info("encoder warm in %.2f s", time.perf_counter() - start)


def warm_vae(service, model: ModelRef) -> None:
    """Runs a request through the VAE's servicer: zero latents at the family's default
    size, decoded and PNG-encoded; for a video model a short clip, MP4-encoded."""
    from ditmesh.common import codec
    from ditmesh.v1 import vae_pb2

    start = time.perf_counter()
    if model.video:
        height, width = model.family.default_hw
        frames = warmup_num_frames(model)
        # The decoder knows its family's latent layout (frames first or channels first).
        latents = torch.zeros(1, *service.decoder.latent_shape(height, width, frames))
        params = vae_pb2.DecodeParams(
            height=height,
            width=width,
            output_format=vae_pb2.OUTPUT_FORMAT_MP4,
            num_frames=frames,
            fps=model.family.default_fps,
        )
    else:
        height = width = model.family.default_size
        scale = model.vae_scale_factor
        latents = torch.zeros(1, model.latent_channels, height // scale, width // scale)
        params = vae_pb2.DecodeParams(
            height=height, width=width, output_format=vae_pb2.OUTPUT_FORMAT_PNG
        )
    requests = codec.params_and_tensors_stream(vae_pb2.DecodeRequest, params, {"latents": latents})
    list(service.Decode(iter(requests), None))
    clip = f", {params.num_frames} frames" if model.video else ""
    log.info("VAE warm at %dx%d%s in %.2f s", height, width, clip, time.perf_counter() - start)


def warmup_num_frames(model: ModelRef) -> int:
    """The shortest clip a video model takes with more than one frame (a single frame
    would skip the temporal layers a real request runs)."""
    valid = valid_frame_counts(model)
    return next((n for n in valid if n > 1), valid[0])
