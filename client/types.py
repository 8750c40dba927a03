"""What a ditmesh SDK call returns: progress events, results, the model list, format names.

Plain dataclasses with no channel and no protobuf in them, so a caller can keep,
compare and pickle them. Turning wire messages into them is `ditmesh.client.wire`'s
job; checking what a caller asks for is `ditmesh.client.params`'; a video model's
output is a `Video` (ditmesh.client.video).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from ditmesh.client.video import Video
from ditmesh.v1 import vae_pb2

__all__ = [
    "DEFAULT_MIME",
    "FORMAT_BY_NAME",
    "FORMAT_BY_SUFFIX",
    "NAME_BY_FORMAT",
    "GenerateResult",
    "ModelInfo",
    "ModelList",
    "OutputFormat",
    "PartialImage",
    "Progress",
    "ProgressCallback",
    "StageTimings",
    "Timings",
    "Video",
]

OutputFormat = Literal["png", "jpeg", "jpg", "webp", "raw", "mp4", "gif"] | int

# Lower-case names a caller may pass as output_format, and the reverse mapping. Images:
# png, jpeg, webp, raw; videos: mp4, webp (animated), gif, raw (the gateway knows which
# the model makes and refuses the others).
FORMAT_BY_NAME: dict[str, int] = {
    "png": vae_pb2.OUTPUT_FORMAT_PNG,
    "jpeg": vae_pb2.OUTPUT_FORMAT_JPEG,
    "jpg": vae_pb2.OUTPUT_FORMAT_JPEG,
    "webp": vae_pb2.OUTPUT_FORMAT_WEBP,
    "raw": vae_pb2.OUTPUT_FORMAT_RAW,
    "mp4": vae_pb2.OUTPUT_FORMAT_MP4,
    "gif": vae_pb2.OUTPUT_FORMAT_GIF,
}
NAME_BY_FORMAT: dict[int, str] = {
    vae_pb2.OUTPUT_FORMAT_UNSPECIFIED: "png",  # the proto says unspecified means PNG
    vae_pb2.OUTPUT_FORMAT_PNG: "png",
    vae_pb2.OUTPUT_FORMAT_JPEG: "jpeg",
    vae_pb2.OUTPUT_FORMAT_WEBP: "webp",
    vae_pb2.OUTPUT_FORMAT_RAW: "raw",
    vae_pb2.OUTPUT_FORMAT_MP4: "mp4",
    vae_pb2.OUTPUT_FORMAT_GIF: "gif",
}
DEFAULT_MIME = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "raw": "application/octet-stream",
    "mp4": "video/mp4",
    "gif": "image/gif",
}
# File suffixes `GenerateResult.save` (and `ditmesh generate -o`) understand; any other
# suffix gets the bytes as received.
FORMAT_BY_SUFFIX = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".webp": "webp",
    ".raw": "raw",
    ".mp4": "mp4",
    ".gif": "gif",
}
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF"}


def write_image(path: Path, data: bytes, fmt: str, image: Image.Image) -> None:
    """Writes `data` (an image in format `fmt`) to `path`: as received when the suffix
    names that format (or none known), else converted to the suffix's format."""
    wanted = FORMAT_BY_SUFFIX.get(path.suffix.lower(), fmt)
    if wanted == fmt:
        path.write_bytes(data)
    elif wanted == "raw":
        path.write_bytes(image.convert("RGB").tobytes())
    elif wanted == "mp4":
        raise ValueError(f"{path} names an MP4, which holds a video; this is a still image")
    else:
        image.convert("RGB").save(path, format=_PIL_FORMAT[wanted])


@dataclass(kw_only=True, slots=True, frozen=True)
class PartialImage:
    """A preview of a request (`partial_images`): its latents after a step, decoded like
    the final image and in its format. A video model's preview is a whole video, in
    `video`, and `image` is None."""

    index: int
    """0-based, in the order the previews came (OpenAI's partial_image_index)."""
    image_index: int
    """Which of the request's images (or videos) it previews (0 unless num_images > 1)."""
    image: Image.Image | None
    data: bytes
    """The bytes `image` (or `video`) was decoded from, as received."""
    format: str
    """png, jpeg, webp or raw; for a video mp4, webp, gif or raw."""
    mime_type: str
    video: Video | None = None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes it as `GenerateResult.save` writes an image (or video); returns the path."""
        target = Path(path)
        if self.video is not None:
            return self.video.save(target)
        assert self.image is not None  # one of the two is always set (client/wire.py)
        write_image(target, self.data, self.format, self.image)
        return target


@dataclass(kw_only=True, slots=True, frozen=True)
class Progress:
    """One progress event of a streaming Generate call.

    kind is "queued" (position set), "encoded" or "decoded" (seconds set), "step"
    (step is 1-based, total the number of denoising steps), "frames" (a video model:
    stage "vae", video_index, and frames_done of frames_total decoded so far, growing
    to frames_total; they come between the last step and "decoded"), or
    "partial_image" (step and total set, and partial_image: the preview after that
    step; one event per image of the request, sent only when the request asked for
    partial_images).
    """

    kind: Literal["queued", "encoded", "step", "frames", "decoded", "partial_image"]
    step: int = 0
    total: int = 0
    position: int = 0
    seconds: float = 0.0
    partial_image: PartialImage | None = None
    stage: str = ""
    """The stage that reports a "frames" event: "vae"."""
    video_index: int = 0
    frames_done: int = 0
    frames_total: int = 0


# What on_progress may be; the async client also awaits what it returns, if awaitable.
ProgressCallback = Callable[[Progress], Any]


@dataclass(kw_only=True, slots=True, frozen=True)
class StageTimings:
    """One stage of a request: queue + work + transfer is its share of the total."""

    stage: str
    """encoder, denoiser or vae."""
    queue: float
    """Waiting in the gateway's queue for a replica (over every attempt)."""
    work: float
    """The stage's own work, as it measured it (the VAE's image encoding included)."""
    transfer: float
    """The rest of the call, as the gateway saw it: bytes on the wire, (de)serialisation."""
    image_encode: float = 0.0
    """Of `work`, turning pixels into PNG / JPEG / WebP (vae only)."""
    attempts: int = 1
    replica: str = ""
    """The replica that answered (host:port)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Timings:
    """Seconds of one request, as the gateway measured them.

    `encode`, `denoise` and `decode` are each stage's wall time at the gateway (its
    queue and transfers included); `stages` splits each into queue, work and transfer,
    and `breakdown()` gives the whole request as parts that add up to `total`.
    """

    encode: float
    denoise: float
    decode: float
    total: float
    stages: tuple[StageTimings, ...] = ()
    """Per stage, in the order encoder, denoiser, vae (empty from an older gateway)."""
    cached_steps: int = 0
    """Step caching (`cache_threshold`): denoising steps whose transformer blocks after the
    first were skipped, of `steps_total`; 0 of 0 when the request asked for no caching."""
    steps_total: int = 0
    attention_computed: float = 0.0
    """DiTFastAttn (a denoiser serving `--fast-attn`): the attention the denoiser computed,
    as a share of full attention at every layer and step; 0.0 when it served no plan."""
    speedups: tuple[str, ...] = ()
    """The speed-ups the request ran with, as the denoiser reported them: compile,
    cuda-graphs, fp8, fast-attn (its service's) and step-cache (the request's); empty
    for exact eager sampling (or from an older gateway)."""

    def stage(self, name: str) -> StageTimings | None:
        return next((s for s in self.stages if s.stage == name), None)

    @property
    def queue(self) -> float:
        """Seconds waiting in the gateway's stage queues."""
        return sum(s.queue for s in self.stages)

    @property
    def transfer(self) -> float:
        """Seconds moving tensors and images between the gateway and the stages."""
        return sum(s.transfer for s in self.stages)

    @property
    def image_encode(self) -> float:
        """Seconds turning pixels into the image format asked for."""
        return sum(s.image_encode for s in self.stages)

    def _work(self, name: str) -> float:
        s = self.stage(name)
        return 0.0 if s is None else s.work - s.image_encode

    def breakdown(self) -> dict[str, float]:
        """queue, encode, transfer, denoise, decode, image_encode and other (the gateway's
        own time between stages), which add up to total; then total itself."""
        parts = {
            "queue": self.queue,
            "encode": self._work("encoder"),
            "transfer": self.transfer,
            "denoise": self._work("denoiser"),
            "decode": self._work("vae"),
            "image_encode": self.image_encode,
        }
        parts["other"] = max(0.0, self.total - sum(parts.values()))
        parts["total"] = self.total
        return parts


@dataclass(kw_only=True, slots=True)
class GenerateResult:
    """The images of one request; `raw[i]` holds the bytes `images[i]` was decoded from.

    A video model's request has its videos in `videos` (bytes, frames, fps: see `Video`)
    and no images: `images`, `raw`, `formats` and `mime_types` are then empty.
    """

    request_id: str
    images: list[Image.Image]
    raw: list[bytes]
    formats: list[str]
    mime_types: list[str]
    seed: int
    timings: Timings
    videos: list[Video] = field(default_factory=list)

    @property
    def video(self) -> Video | None:
        """The first video (the only one unless num_images > 1); None for images."""
        return self.videos[0] if self.videos else None

    def save(self, path: str | os.PathLike[str]) -> list[Path]:
        """Writes the images (or videos); several get `-{i}` before the suffix. Returns
        the paths.

        When the suffix matches the received format (or is unknown) the bytes are
        written as received, so nothing is re-encoded; otherwise the image is
        converted (e.g. a raw tensor saved as out.png becomes a PNG; a video's
        conversions are `Video.save`'s).
        """
        target = Path(path)
        count = len(self.videos) or len(self.raw)
        if count == 1:
            paths = [target]
        else:
            paths = [target.with_name(f"{target.stem}-{i}{target.suffix}") for i in range(count)]
        if self.videos:
            return [video.save(out) for out, video in zip(paths, self.videos, strict=True)]
        for out, data, fmt, image in zip(paths, self.raw, self.formats, self.images, strict=True):
            write_image(out, data, fmt, image)
        return paths


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelInfo:
    """A model the mesh serves, with the defaults the gateway applies."""

    name: str
    family: str
    default_height: int
    default_width: int
    default_steps: int
    default_guidance: float
    size_multiple: int
    max_prompt_tokens: int
    default_num_frames: int = 0
    """Video models: frames per video unless a request says (0 for image models)."""
    max_num_frames: int = 0
    frame_multiple: int = 0
    """Video models: valid frame counts are frame_multiple * k + 1, up to max_num_frames."""
    default_fps: int = 0


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelList:
    """The answer of ListModels: every model and the one used when none is named."""

    models: list[ModelInfo]
    default_model: str
