"""One denoising request as the gang's ranks see it: plain values and CPU tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(kw_only=True, slots=True)
class DenoiseJob:
    request_id: str
    height: int
    width: int
    steps: int
    guidance: float
    true_cfg_scale: float
    seed: int
    num_images: int
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    """Conditioning from the encoder, by name (prompt_embeds, negative_prompt_embeds, ...)."""
    preview_steps: tuple[int, ...] = ()
    """Steps (1-based) after which the latents so far are handed to the preview callback."""
    num_frames: int = 0
    """Video models: frames of each video in pixel space; 0 for image models."""
    cache_threshold: float = 0.0
    """Step caching (step_cache.py): skip a step's blocks after the first when the first
    block's residual changed by less than this, relatively; 0 (the default): off."""
    cached_steps: int = 0
    """Set by the loop after each step: steps so far whose later blocks were skipped (0
    without step caching); the service reports it with each step."""


# Called after each step with (step, total), 1-based; may raise to cancel the job.
StepCallback = Callable[[int, int], None]

# Called on the leader with (step, total, latents) after each of the job's preview steps;
# the latents are whole (every rank's images) and shaped as the final ones.
PreviewCallback = Callable[[int, int, torch.Tensor], None]
