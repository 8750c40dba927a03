"""Request limits every stage checks the same way, with sentences a user can act on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ditmesh.common.errors import InvalidArgument

if TYPE_CHECKING:
    from ditmesh.common.models import ModelRef


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    max_steps: int = 500
    """More steps than this is almost surely a mistake (models use 4-50)."""
    max_side: int = 4096
    """Pixels per side."""
    min_side_tokens: int = 1
    """Smallest side in tokens (size multiple)."""
    max_images: int = 8
    max_guidance: float = 100.0


DEFAULT_LIMITS = Limits()

DEFAULT_TIMEOUT_S = 600.0
"""Deadline of a request whose client set none."""
DEFAULT_DRAIN_SECONDS = 660.0
"""How long a server stopping lets its work in hand run on: above the default deadline,
so a drain never cuts a request off."""


def check_size(model: ModelRef, height: int, width: int, limits: Limits = DEFAULT_LIMITS) -> None:
    m = model.size_multiple
    for what, v in (("height", height), ("width", width)):
        if v <= 0:
            raise InvalidArgument(f"{what} must be positive; got {v}")
        if v % m:
            lo, hi = (v // m) * m, (v // m + 1) * m
            near = f"{lo} or {hi}" if lo else f"{hi}"
            raise InvalidArgument(
                f"{what} {v} is not a multiple of {m}, as model {model.name!r} needs; try {near}"
            )
        if v < m * limits.min_side_tokens:
            raise InvalidArgument(f"{what} must be at least {m * limits.min_side_tokens}; got {v}")
        if v > limits.max_side:
            raise InvalidArgument(f"{what} {v} is over the limit of {limits.max_side} pixels")


def check_steps(steps: int, limits: Limits = DEFAULT_LIMITS) -> None:
    if steps <= 0:
        raise InvalidArgument(f"steps must be at least 1; got {steps}")
    if steps > limits.max_steps:
        raise InvalidArgument(f"steps {steps} is over the limit of {limits.max_steps}")


def check_num_images(n: int, limits: Limits = DEFAULT_LIMITS) -> None:
    if n < 1 or n > limits.max_images:
        raise InvalidArgument(f"num_images must be between 1 and {limits.max_images}; got {n}")


def check_guidance(value: float, what: str, limits: Limits = DEFAULT_LIMITS) -> None:
    if not math.isfinite(value) or value < 0 or value > limits.max_guidance:
        raise InvalidArgument(f"{what} must be between 0 and {limits.max_guidance}; got {value}")


def check_seed(seed: int) -> None:
    if seed < 0 or seed >= 2**63:
        raise InvalidArgument(f"seed must be between 0 and 2**63-1; got {seed}")
