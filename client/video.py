"""A video in the SDK's results: the bytes as received, its frames as PIL images, `save`.

A video model's output reaches the client like an image (chunks, then one whole item)
whose bytes are a container, MP4 (H.264), animated WebP or GIF, or raw frames
([num_frames, height, width, 3] uint8, row-major), with `num_frames` and `fps` on its
first chunk. `Video` keeps those bytes and decodes the frames only when `frames` is
first read: raw, WebP and GIF through Pillow, a base dependency; MP4 through PyAV, which
a client-only install does not carry, so reading an MP4's frames there fails with a
sentence that says what to install (or to ask for another format). Saving converts
only where Pillow can (WebP, GIF, raw); an MP4 comes from the gateway, which encodes it.
Turning wire messages into a `Video` is `ditmesh.client.wire`'s job.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageSequence

from ditmesh.client.errors import ProtocolError

__all__ = ["VIDEO_SUFFIXES", "Video"]

VIDEO_SUFFIXES = {".mp4": "mp4", ".webp": "webp", ".gif": "gif", ".raw": "raw"}
"""File suffixes `Video.save` writes, and the format each names."""
_PIL_FORMAT = {"webp": "WEBP", "gif": "GIF"}


@dataclass(kw_only=True, slots=True)
class Video:
    """One video of a request, as the gateway sent it."""

    data: bytes
    """The container's bytes (or the raw frames) as received."""
    format: str
    """mp4, webp (animated), gif or raw."""
    mime_type: str
    width: int
    height: int
    num_frames: int
    fps: int
    """The frame rate written into the container (and the one to play raw frames at)."""
    _frames: list[Image.Image] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def frames(self) -> list[Image.Image]:
        """The `num_frames` frames as RGB images, decoded on first use and kept."""
        if self._frames is None:
            frames = _decode_frames(self)
            if len(frames) != self.num_frames:
                raise ProtocolError(
                    f"the {self.format} video decodes to {len(frames)} frames; "
                    f"the gateway announced {self.num_frames}"
                )
            self._frames = frames
        return self._frames

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the video to `path` and returns it: as received when the suffix names
        its format (or is not a video suffix), else converted. Conversions are to .webp
        and .gif (Pillow) and to .raw (the frames' bytes); an .mp4 must come as MP4."""
        target = Path(path)
        wanted = VIDEO_SUFFIXES.get(target.suffix.lower(), self.format)
        if wanted == self.format:
            target.write_bytes(self.data)
        elif wanted == "raw":
            target.write_bytes(b"".join(frame.tobytes() for frame in self.frames))
        elif wanted == "mp4":
            raise ValueError(
                f"the video came as {self.format}, and this client does not encode MP4: "
                f"save it as .{self.format}, or ask the gateway for output_format='mp4'"
            )
        else:
            first, *rest = self.frames
            first.save(
                target,
                format=_PIL_FORMAT[wanted],
                save_all=True,
                append_images=rest,
                duration=round(1000 / self.fps),
                loop=0,
            )
        return target


def _decode_frames(video: Video) -> list[Image.Image]:
    if video.format == "raw":
        return _raw_frames(video)
    if video.format == "mp4":
        return _mp4_frames(video.data)
    if video.format in _PIL_FORMAT:
        return _animated_frames(video)
    raise ProtocolError(f"a video in format {video.format!r}, which this client cannot read")


def _raw_frames(video: Video) -> list[Image.Image]:
    size = video.width * video.height * 3
    if size <= 0 or len(video.data) != size * video.num_frames:
        raise ProtocolError(
            f"raw video has {len(video.data)} bytes, not "
            f"{video.num_frames}x{video.height}x{video.width}x3"
        )
    return [
        Image.frombytes("RGB", (video.width, video.height), video.data[i * size : (i + 1) * size])
        for i in range(video.num_frames)
    ]


def _mp4_frames(data: bytes) -> list[Image.Image]:
    try:
        import av
    except ImportError:
        raise ImportError(
            "decoding an MP4's frames needs PyAV, which a client-only install leaves out: "
            "pip install av (or ask for output_format='raw', 'webp' or 'gif'); "
            "the MP4's bytes are in Video.data either way"
        ) from None
    try:
        with av.open(io.BytesIO(data)) as container:
            return [frame.to_image() for frame in container.decode(video=0)]
    except av.FFmpegError as exc:
        raise ProtocolError(f"the MP4 video cannot be decoded: {exc}") from None


def _animated_frames(video: Video) -> list[Image.Image]:
    """Frames of an animated WebP or GIF. Their encoders fold a frame equal to the one
    before into that one's duration, so a frame shown k frame-times counts k times."""
    try:
        with Image.open(io.BytesIO(video.data)) as im:
            shown = [
                (frame.convert("RGB"), frame.info.get("duration", 0))
                for frame in ImageSequence.Iterator(im)
            ]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ProtocolError(f"the {video.format} video cannot be decoded: {exc}") from None
    if len(shown) == video.num_frames or video.num_frames <= 0:
        return [frame for frame, _ in shown]
    # One frame-time as written (GIF rounds it to 10 ms), from the whole length.
    tick = sum(duration for _, duration in shown) / video.num_frames
    if tick <= 0:
        return [frame for frame, _ in shown]
    return [frame for frame, duration in shown for _ in range(round(duration / tick))]
