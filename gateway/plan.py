"""A request checked and completed: every default filled in, every limit applied.

Video models (`Family.video`) take `num_frames` and `fps` too, checked against the
model's frame rule with the nearest valid counts in the error (common/models.py);
their output is MP4 unless asked otherwise (WEBP is then animated; PNG and JPEG are
refused), image models refuse the video formats.

Nothing here waits or talks to a stage; the gateway refuses a bad request with
INVALID_ARGUMENT (NOT_FOUND for an unknown model) before it takes a place in any queue.
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass

from ditmesh.common.errors import InvalidArgument, NotFound
from ditmesh.common.limits import (
    Limits,
    check_guidance,
    check_num_images,
    check_seed,
    check_size,
    check_steps,
)
from ditmesh.common.models import Family, ModelRef, check_fps, check_num_frames
from ditmesh.gateway.previews import preview_steps
from ditmesh.v1 import gateway_pb2, vae_pb2

MAX_PROMPT_CHARS = 20_000
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]+")

VIDEO_FORMATS = (
    vae_pb2.OUTPUT_FORMAT_MP4,
    vae_pb2.OUTPUT_FORMAT_WEBP,
    vae_pb2.OUTPUT_FORMAT_GIF,
    vae_pb2.OUTPUT_FORMAT_RAW,
)
IMAGE_ONLY_FORMATS = (vae_pb2.OUTPUT_FORMAT_PNG, vae_pb2.OUTPUT_FORMAT_JPEG)


def check_request_id(rid: str) -> None:
    """Ids travel in gRPC metadata, logs and traces: short, printable, no spaces."""
    if len(rid) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(
            f"the request id is {len(rid)} characters long; the limit is {MAX_REQUEST_ID_CHARS}"
        )
    if not _REQUEST_ID.fullmatch(rid):
        raise InvalidArgument(
            "the request id may hold only letters, digits and . _ : - "
            f"(got {rid[:40]!r}{'...' if len(rid) > 40 else ''})"
        )


@dataclass(kw_only=True, slots=True)
class RequestPlan:
    """A validated request with every default filled in."""

    request_id: str
    model: ModelRef
    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance: float
    true_cfg_scale: float
    seed: int
    num_images: int
    output_format: int
    quality: int
    preview_steps: tuple[int, ...] = ()
    """Steps after which a partial image is sent (gateway/previews.py)."""
    num_frames: int = 0
    """Video: frames per video; 0 for image models."""
    fps: int = 0
    """Video: frames per second written into the container; 0 for image models."""
    cache_threshold: float = 0.0
    """Step caching's threshold (0 to 1; 0: off), forwarded to the denoiser."""

    @property
    def family(self) -> Family:
        return self.model.family

    @property
    def encode_negative(self) -> bool:
        # SD3/PixArt guide against the empty prompt when none is given, so the
        # negative branch is needed even then; Flux only with a negative prompt.
        return self.family.uses_cfg(
            guidance=self.guidance,
            true_cfg_scale=self.true_cfg_scale,
            has_negative=bool(self.negative_prompt),
        )

    def work_units(self, stage: str) -> float:
        """The request's size in a stage's unit of work, for estimating its service time.

        Encoder: prompts encoded. Denoiser: image-token steps (4096 tokens = one 1024²
        Flux image), both CFG branches counted. VAE: megapixels decoded.
        """
        if stage == "encoder":
            return 2.0 if self.encode_negative else 1.0
        images = float(self.num_images)
        # A video costs its latent frames' tokens in the denoiser and its frames in the VAE.
        if self.num_frames:
            m = self.model.frame_multiple or 1
            latent_frames = (self.num_frames - 1) // m + 1
        else:
            latent_frames = 1
        if stage == "denoiser":
            tokens = (self.height // 16) * (self.width // 16) * latent_frames
            branches = 2.0 if self.encode_negative else 1.0
            return self.steps * images * branches * tokens / 4096.0
        frames = max(self.num_frames, 1)
        return images * frames * self.height * self.width / (1024.0 * 1024.0)


def make_plan(
    req: gateway_pb2.GenerateRequest,
    models: dict[str, ModelRef],
    default_model: str,
    limits: Limits,
    metadata_request_id: str = "",
) -> RequestPlan:
    """Checks a request against the model it names and fills in that model's defaults."""
    name = req.model or default_model
    m = models.get(name)
    if m is None:
        served = ", ".join(repr(n) for n in sorted(models))
        raise NotFound(f"unknown model {req.model!r}; this mesh serves {served}")
    rid = req.request_id or metadata_request_id
    if rid:
        check_request_id(rid)
    else:
        rid = uuid.uuid4().hex
    if not req.prompt.strip():
        raise InvalidArgument("the prompt is empty")
    for what, text in (("prompt", req.prompt), ("negative prompt", req.negative_prompt)):
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidArgument(
                f"the {what} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}"
            )
    default_h, default_w = m.family.default_hw
    height = req.height or default_h
    width = req.width or default_w
    check_size(m, height, width, limits)
    steps = req.steps or m.default_steps
    check_steps(steps, limits)
    if steps < m.family.min_steps:
        raise InvalidArgument(
            f"model {m.name!r} needs at least {m.family.min_steps} steps; got {steps}"
        )
    guidance = req.guidance if req.HasField("guidance") else m.default_guidance
    check_guidance(guidance, "guidance", limits)
    true_cfg = req.true_cfg_scale if req.HasField("true_cfg_scale") else 1.0
    check_guidance(true_cfg, "true_cfg_scale", limits)
    seed = req.seed if req.HasField("seed") else random.randrange(2**31)
    check_seed(seed)
    n = req.num_images or 1
    check_num_images(n, limits)
    if req.output_format not in vae_pb2.OutputFormat.values():
        raise InvalidArgument(f"unknown output format {req.output_format}")
    if req.quality and not 1 <= req.quality <= 100:
        raise InvalidArgument(f"quality must be between 1 and 100; got {req.quality}")
    output_format, num_frames, fps = _video_fields(req, m)
    check_cache_threshold(req.cache_threshold)
    return RequestPlan(
        request_id=rid,
        model=m,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        height=height,
        width=width,
        steps=steps,
        guidance=guidance,
        true_cfg_scale=true_cfg,
        seed=seed,
        num_images=n,
        output_format=output_format,
        quality=req.quality,
        preview_steps=preview_steps(req.partial_images, steps),
        num_frames=num_frames,
        fps=fps,
        cache_threshold=req.cache_threshold,
    )


def check_cache_threshold(threshold: float) -> None:
    """0 (off) to 1; whether the model and the denoiser's layout can cache is the
    denoiser's to say."""
    if not 0.0 <= threshold <= 1.0:
        raise InvalidArgument(f"cache_threshold must be between 0 and 1; got {threshold}")


def _video_fields(req: gateway_pb2.GenerateRequest, m: ModelRef) -> tuple[int, int, int]:
    """(output format, num_frames, fps) with the model's defaults, each checked."""
    fmt = req.output_format
    if not m.video:
        check_num_frames(m, req.num_frames)
        check_fps(m, req.fps)
        if fmt in VIDEO_FORMATS and fmt not in (
            vae_pb2.OUTPUT_FORMAT_WEBP,
            vae_pb2.OUTPUT_FORMAT_RAW,
        ):
            raise InvalidArgument(
                f"output format {vae_pb2.OutputFormat.Name(fmt)} is for video models; "
                f"model {m.name!r} makes images"
            )
        return fmt or vae_pb2.OUTPUT_FORMAT_PNG, 0, 0
    if fmt in IMAGE_ONLY_FORMATS:
        raise InvalidArgument(
            f"model {m.name!r} makes videos: ask for MP4, WEBP (animated), GIF or RAW frames, "
            f"not {vae_pb2.OutputFormat.Name(fmt)}"
        )
    num_frames = req.num_frames or m.family.default_num_frames
    check_num_frames(m, num_frames)
    fps = req.fps or m.family.default_fps
    check_fps(m, fps)
    return fmt or vae_pb2.OUTPUT_FORMAT_MP4, num_frames, fps
