"""A video's uint8 frames to the bytes of its container: MP4, animated WebP or GIF, raw.

Frames may come in pieces as a decoder yields them (`VideoWriter`: RAW's bytes go out
piece by piece, MP4 encodes each frame as it arrives); `encode_video` is the one-call
form for a whole video.

MP4 is H.264 (libx264, yuv420p, what every player takes) through PyAV, whose wheels
bundle FFmpeg and the codec, so nothing is needed on the host. Animated WebP and GIF
go through Pillow. RAW is the frames as they are, [F, H, W, 3] uint8, row-major.

The frame rate is written into each container (MP4: the stream's rate and time base,
one tick a frame; WebP/GIF: each frame's duration in milliseconds, which GIF keeps in
hundredths, so 1000/fps is rounded there). What decodes the frames is the family's
decoder (video_decoder.py); this module knows nothing of models.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from fractions import Fraction

import numpy as np

from ditmesh.common.errors import InvalidArgument
from ditmesh.v1 import vae_pb2

DEFAULT_QUALITY = 90

MIME = {
    vae_pb2.OUTPUT_FORMAT_MP4: "video/mp4",
    vae_pb2.OUTPUT_FORMAT_WEBP: "image/webp",
    vae_pb2.OUTPUT_FORMAT_GIF: "image/gif",
    vae_pb2.OUTPUT_FORMAT_RAW: "application/x-ditmesh-rgb8",
}


def normalise_video_format(fmt: int) -> int:
    """UNSPECIFIED is MP4 for a video; PNG and JPEG hold no video."""
    if fmt == vae_pb2.OUTPUT_FORMAT_UNSPECIFIED:
        return vae_pb2.OUTPUT_FORMAT_MP4
    if fmt not in MIME:
        name = vae_pb2.OutputFormat.Name(fmt) if fmt in vae_pb2.OutputFormat.values() else fmt
        raise InvalidArgument(f"output format {name} holds no video; ask for MP4, WEBP, GIF or RAW")
    return fmt


def crf_of_quality(quality: int) -> int:
    """x264's constant rate factor for a 1-100 quality: 100 -> 0 (lossless), 90 -> 5,
    1 -> 50; x264 takes 0-51, lower is better."""
    return round((100 - quality) * 51 / 100)


class VideoWriter:
    """One video's container, fed its frames piece by piece as they are decoded.

    `add` takes the next frames [f, H, W, 3] uint8 and returns the bytes that may go
    out now: RAW's bytes are the frames' own, so every piece goes out at once
    (`incremental`); MP4 encodes each frame as it comes but its container is whole only
    at `finish` (the index is written last); WebP and GIF hold the frames and encode
    at `finish`. `finish` returns the rest of the bytes; `close` drops a video left
    half-made (a failed decode). The bytes are the same however the frames are split.
    """

    def __init__(self, fmt: int, fps: int, quality: int = 0) -> None:
        if fps < 1:
            raise InvalidArgument(f"fps must be at least 1; got {fps}")
        q = quality or DEFAULT_QUALITY
        if not 1 <= q <= 100:
            raise InvalidArgument(f"quality must be between 1 and 100; got {q}")
        if fmt not in MIME:
            raise InvalidArgument(f"output format {fmt} holds no video")
        self.fmt = fmt
        self.fps = fps
        self.quality = q
        self.frames = 0
        """Frames added so far."""
        self.size: tuple[int, int] | None = None
        """(height, width) of the frames, set by the first piece."""
        self._held: list[np.ndarray] = []
        self._mp4: _Mp4Stream | None = None

    @property
    def incremental(self) -> bool:
        """Whether `add` returns each piece's bytes (RAW) rather than holding them."""
        return self.fmt == vae_pb2.OUTPUT_FORMAT_RAW

    def add(self, frames: np.ndarray) -> bytes:
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"frames must be uint8 [F, H, W, 3]; got {frames.dtype} {frames.shape}"
            )
        size = (frames.shape[1], frames.shape[2])
        if self.size is None:
            self.size = size
        elif size != self.size:
            raise ValueError(
                f"frames of {size[1]}x{size[0]} follow frames of {self.size[1]}x{self.size[0]}"
            )
        self.frames += frames.shape[0]
        if self.fmt == vae_pb2.OUTPUT_FORMAT_RAW:
            return np.ascontiguousarray(frames).tobytes()
        if self.fmt == vae_pb2.OUTPUT_FORMAT_MP4:
            if self._mp4 is None:
                self._mp4 = _Mp4Stream(size, self.fps, crf_of_quality(self.quality))
            self._mp4.add(frames)
        else:
            self._held.append(frames)
        return b""

    def finish(self) -> bytes:
        if self.size is None:
            raise ValueError("a video needs at least one frame")
        if self.fmt == vae_pb2.OUTPUT_FORMAT_RAW:
            return b""
        if self.fmt == vae_pb2.OUTPUT_FORMAT_MP4:
            assert self._mp4 is not None  # made by the first add
            mp4, self._mp4 = self._mp4, None
            return mp4.finish()
        frames, self._held = np.concatenate(self._held), []
        return _encode_animated(frames, self.fmt, self.fps, self.quality)

    def close(self) -> None:
        """Drops what is held; the writer takes no more frames."""
        self._held = []
        if self._mp4 is not None:
            mp4, self._mp4 = self._mp4, None
            mp4.close()


def encode_pieces(pieces: Iterable[np.ndarray], fmt: int, fps: int, quality: int = 0) -> bytes:
    """The container bytes of one video whose frames come as pieces [f, H, W, 3] uint8."""
    writer = VideoWriter(fmt, fps, quality)
    try:
        out = [writer.add(piece) for piece in pieces]
        out.append(writer.finish())
    finally:
        writer.close()
    return b"".join(out)


def encode_video(frames: np.ndarray, fmt: int, fps: int, quality: int = 0) -> bytes:
    """The container bytes of one video's frames [F, H, W, 3] uint8."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3]; got {frames.dtype} {frames.shape}")
    return encode_pieces([frames], fmt, fps, quality)


def encode_mp4(frames: np.ndarray, fps: int, crf: int) -> bytes:
    """H.264 in MP4 of frames [F, H, W, 3] uint8 at x264's constant rate factor `crf`."""
    stream = _Mp4Stream((frames.shape[1], frames.shape[2]), fps, crf)
    try:
        stream.add(frames)
        return stream.finish()
    finally:
        stream.close()


class _Mp4Stream:
    """An MP4 being written through PyAV, a frame at a time, into memory."""

    def __init__(self, size: tuple[int, int], fps: int, crf: int) -> None:
        import av

        height, width = size
        if height % 2 or width % 2:
            # yuv420p halves the chroma planes; sizes are multiples of 16 at the gateway.
            raise InvalidArgument(f"MP4 needs an even width and height; got {width}x{height}")
        self._av = av
        self._buf = io.BytesIO()
        self._container = av.open(self._buf, mode="w", format="mp4")
        stream = self._container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.options = {"crf": str(crf)}
        self._stream = stream
        # The frames' own time base, one tick a frame. Not `stream.time_base`: the muxer
        # changes that when it writes the header, at the first packet out, which comes
        # before the last frame goes in once a video is longer than x264's look-ahead
        # (or at once when lossless); later frames would be stamped with the wrong base.
        self._time_base = Fraction(1, fps)
        self._pts = 0
        self._closed = False

    def add(self, frames: np.ndarray) -> None:
        for pixels in frames:
            frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = self._pts
            frame.time_base = self._time_base
            self._pts += 1
            self._container.mux(self._stream.encode(frame))

    def finish(self) -> bytes:
        self._container.mux(self._stream.encode(None))  # flush the encoder's delayed frames
        self.close()  # writes the index (moov) the player needs
        return self._buf.getvalue()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._container.close()


def _encode_animated(frames: np.ndarray, fmt: int, fps: int, quality: int) -> bytes:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    duration = round(1000 / fps)
    if fmt == vae_pb2.OUTPUT_FORMAT_WEBP:
        kwargs = {"format": "WEBP", "quality": quality}
    else:
        kwargs = {"format": "GIF", "disposal": 1}
    images[0].save(
        buf, save_all=True, append_images=images[1:], duration=duration, loop=0, **kwargs
    )
    return buf.getvalue()
