"""The request parameters of Generate: one type, checked once, shared by every caller.

`GenerateParams` holds everything a Generate request carries besides its prompt.
`Client.generate`, `Client.generate_unary`, their `AsyncClient` twins and the
`ditmesh generate` command all build one and turn it into a GenerateRequest with
`request_of`; nothing else in the SDK knows the list of fields.

Why `generate(prompt, params=None, **fields)` and not fourteen named arguments:
the named form had to be copied into four methods (and the CLI) and kept in step
by hand. Here the dataclass is the one signature: `**fields` are checked against
its fields by name (an unknown one is a TypeError, as Python gives for a bad
keyword), so `client.generate("a fox", steps=8, seed=1)` reads as before, while a
caller who reuses settings passes `GenerateParams(...)` once and overrides single
fields per call. What is lost is a type checker's view of `**fields`; the dataclass
keeps it for callers who build one.

The SDK checks only what is plainly wrong whatever the server (negative sizes, a
seed outside 0..2**63-1, text that is not valid Unicode, a malformed request id),
so it fails before a network round trip with the same InvalidArgumentError the
gateway would send; limits a deployment sets (largest size, most steps, known
models) are the gateway's to check.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ditmesh.client.errors import invalid_argument
from ditmesh.client.types import FORMAT_BY_NAME, NAME_BY_FORMAT, OutputFormat
from ditmesh.v1 import gateway_pb2, vae_pb2

__all__ = [
    "MAX_PARTIAL_IMAGES",
    "REQUEST_ID_PATTERN",
    "SEED_MAX",
    "GenerateParams",
    "request_of",
]

SEED_MAX = 2**63 - 1
"""The largest seed the gateway accepts (its seeds are non-negative int64)."""

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""What a caller's request id may be: it travels in metadata and lands in log lines."""

MAX_PARTIAL_IMAGES = 3
"""The most partial images a request may ask for (gateway.proto's `partial_images`)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class GenerateParams:
    """Everything of a Generate request but the prompt; 0 / None mean the model's default."""

    negative_prompt: str = ""
    """What the image should not show; used by true CFG (true_cfg_scale > 1)."""
    height: int = 0
    """Image height in pixels, a multiple of the model's size_multiple (0: model default)."""
    width: int = 0
    """Image width in pixels, a multiple of the model's size_multiple (0: model default)."""
    steps: int = 0
    """Denoising steps (0: model default)."""
    guidance: float | None = None
    """Guidance scale (distilled guidance for Flux, CFG scale for others; None: default)."""
    true_cfg_scale: float | None = None
    """Classifier-free guidance over negative_prompt, used when > 1 (None: off)."""
    seed: int | None = None
    """Seed of the initial noise, 0..2**63-1 (None: the gateway picks one and reports it)."""
    num_images: int = 1
    """Images from the one prompt and seed."""
    output_format: OutputFormat | None = None
    """png, jpeg, webp or raw ([height, width, 3] uint8), or an OutputFormat enum value.
    A video model's: mp4, webp (animated), gif or raw ([frames, height, width, 3]).
    None: the model's kind decides, png for an image model, mp4 for a video model."""
    quality: int = 0
    """JPEG / WebP quality 1-100 (0: the encoder's default)."""
    model: str = ""
    """Model name as ListModels reports it (empty: the mesh's default)."""
    request_id: str | None = None
    """1-128 characters of [A-Za-z0-9._:-]; None: a random one. Retries reuse it."""
    partial_images: int = 0
    """Previews (0-3) before the final image(s), at evenly spaced steps, each handed to
    `generate`'s on_progress as a "partial_image" event; the gateway refuses more than
    steps - 1. Streaming calls only: `generate_unary` has no events to carry them."""
    num_frames: int = 0
    """Video models: frames per video (0: the model's default); the model's rule (e.g.
    4k+1) and limit are the gateway's to check. Image models refuse it."""
    fps: int = 0
    """Video models: frames per second written into the container (0: the model's)."""
    cache_threshold: float = 0.0
    """Step caching, 0 to 1 (0: off, exact): a step skips the transformer's blocks after
    the first when the first block's output changed by less than this, relatively, since
    the last computed step. Faster and approximate; the result's
    `timings.cached_steps` says how many steps were skipped."""

    def __post_init__(self) -> None:
        _check_text("negative_prompt", self.negative_prompt)
        _check_text("model", self.model)
        for name in ("height", "width", "steps", "num_frames", "fps"):
            if _integer(name, getattr(self, name)) < 0:
                raise invalid_argument(
                    f"{name} must be >= 0 (0 means the model's default), got {getattr(self, name)}"
                )
        if not 0 <= _integer("partial_images", self.partial_images) <= MAX_PARTIAL_IMAGES:
            raise invalid_argument(
                f"partial_images must be between 0 and {MAX_PARTIAL_IMAGES}, "
                f"got {self.partial_images}"
            )
        if _integer("num_images", self.num_images) < 1:
            raise invalid_argument(f"num_images must be >= 1, got {self.num_images}")
        if not 0 <= _integer("quality", self.quality) <= 100:
            raise invalid_argument(
                f"quality must be between 0 and 100 (0 means the default), got {self.quality}"
            )
        for name in ("guidance", "true_cfg_scale"):
            scale = getattr(self, name)
            if scale is not None and not math.isfinite(_real(name, scale)):
                raise invalid_argument(f"{name} must be a finite number, got {scale}")
        if self.seed is not None and not 0 <= _integer("seed", self.seed) <= SEED_MAX:
            raise invalid_argument(
                f"seed must be between 0 and 2**63-1, as the gateway requires; got {self.seed}"
            )
        threshold = _real("cache_threshold", self.cache_threshold)
        if not 0.0 <= threshold <= 1.0:
            raise invalid_argument(
                f"cache_threshold must be between 0 and 1 (0: off), got {self.cache_threshold}"
            )
        format_value(self.output_format)
        if self.request_id is not None:
            _check_request_id(self.request_id)

    @classmethod
    def merged(
        cls, params: GenerateParams | None, fields: Mapping[str, Any], *, caller: str = "generate"
    ) -> GenerateParams:
        """`params` (or the defaults) with `fields` replacing single fields, checked once."""
        unknown = sorted(set(fields) - set(FIELD_NAMES))
        if unknown:
            raise TypeError(
                f"{caller}() got an unexpected keyword argument {unknown[0]!r}; "
                f"request fields are {', '.join(FIELD_NAMES)}"
            )
        if params is None:
            return cls(**fields)
        if not isinstance(params, GenerateParams):
            raise TypeError(f"params must be a GenerateParams, got {type(params).__name__}")
        return dataclasses.replace(params, **fields) if fields else params

    def to_request(self, prompt: str) -> gateway_pb2.GenerateRequest:
        """The wire request for `prompt`, with a fresh request id unless one was given."""
        _check_text("prompt", prompt)
        request = gateway_pb2.GenerateRequest(
            request_id=self.request_id or uuid.uuid4().hex,
            model=self.model,
            prompt=prompt,
            negative_prompt=self.negative_prompt,
            height=self.height,
            width=self.width,
            steps=self.steps,
            num_images=self.num_images,
            output_format=format_value(self.output_format),
            quality=self.quality,
            partial_images=self.partial_images,
            num_frames=self.num_frames,
            fps=self.fps,
            cache_threshold=self.cache_threshold,
        )
        # Unset (not 0) leaves the choice to the gateway: guidance 0.0 is a real value.
        for name in ("guidance", "true_cfg_scale", "seed"):
            if getattr(self, name) is not None:
                setattr(request, name, getattr(self, name))
        return request


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(GenerateParams))


def request_of(
    prompt: str,
    params: GenerateParams | None,
    fields: Mapping[str, Any],
    *,
    caller: str,
    streaming: bool = True,
) -> gateway_pb2.GenerateRequest:
    """What every generate method does first: merge, check, build the wire request.
    A unary call (`streaming` False) refuses partial images: its one answer has no
    place for them, and the gateway would decode them for nothing."""
    merged = GenerateParams.merged(params, fields, caller=caller)
    if merged.partial_images and not streaming:
        raise invalid_argument(
            f"partial_images come as progress events of the streaming generate; {caller} "
            "has none (use generate with on_progress)"
        )
    return merged.to_request(prompt)


def format_value(output_format: OutputFormat | None) -> int:
    """Accepts a name ("png", "jpeg", "webp", "raw"; for video "mp4", "gif"), an
    OutputFormat enum value, or None (UNSPECIFIED: the gateway picks by the model)."""
    if output_format is None:
        return vae_pb2.OUTPUT_FORMAT_UNSPECIFIED
    if isinstance(output_format, str):
        value = FORMAT_BY_NAME.get(output_format.lower().lstrip("."))
        if value is not None:
            return value
    elif isinstance(output_format, int) and not isinstance(output_format, bool):
        if output_format in NAME_BY_FORMAT:
            return output_format
    raise invalid_argument(
        f"unknown output_format {output_format!r}; use png, jpeg, webp or raw "
        "(videos: mp4, webp, gif or raw)"
    )


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # int, or anything int-like such as numpy.int64
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_text(name: str, text: Any) -> None:
    """Text must be a str that UTF-8 can carry; a lone surrogate (e.g. from a file read
    with errors="surrogateescape") cannot, and protobuf would raise a bare
    UnicodeEncodeError mid-call."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid_argument(
            f"{name} has a lone surrogate {text[exc.start]!r} at character {exc.start}, "
            "which is not valid Unicode and cannot be sent; fix or drop that character"
        ) from None


def _check_request_id(request_id: Any) -> None:
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be str or None, got {type(request_id).__name__}")
    if REQUEST_ID_PATTERN.fullmatch(request_id) is None:
        shown = request_id if len(request_id) <= 40 else request_id[:40] + "..."
        raise invalid_argument(
            f"request_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-' "
            f"(got {len(request_id)} characters: {shown!r})"
        )
