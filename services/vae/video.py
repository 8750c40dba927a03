"""A video's uint8 frames to the bytes of its container: MP4, animated WebP or GIF, raw.

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


def encode_video(frames: np.ndarray, fmt: int, fps: int, quality: int = 0) -> bytes:
    """The container bytes of one video's frames [F, H, W, 3] uint8."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3]; got {frames.dtype} {frames.shape}")
    if fps < 1:
        raise InvalidArgument(f"fps must be at least 1; got {fps}")
    q = quality or DEFAULT_QUALITY
    if not 1 <= q <= 100:
        raise InvalidArgument(f"quality must be between 1 and 100; got {q}")
    if fmt == vae_pb2.OUTPUT_FORMAT_RAW:
        return np.ascontiguousarray(frames).tobytes()
    if fmt == vae_pb2.OUTPUT_FORMAT_MP4:
        return encode_mp4(frames, fps, crf_of_quality(q))
    if fmt in (vae_pb2.OUTPUT_FORMAT_WEBP, vae_pb2.OUTPUT_FORMAT_GIF):
        return _encode_animated(frames, fmt, fps, q)
    raise InvalidArgument(f"output format {fmt} holds no video")


def encode_mp4(frames: np.ndarray, fps: int, crf: int) -> bytes:
    import av

    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        # yuv420p halves the chroma planes; sizes are multiples of 16 at the gateway.
        raise InvalidArgument(f"MP4 needs an even width and height; got {width}x{height}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.options = {"crf": str(crf)}
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = i
            frame.time_base = stream.time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames
    return buf.getvalue()


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
