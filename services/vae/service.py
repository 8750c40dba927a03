"""The VAE stage's gRPC service.

Image models: latents to images (decoder.py, or the gang in gang.py). Video models
(`Family.video`): the family's decoder from video_decoder.py, then each video's frames
to its container (video.py); a video goes back as soon as it is encoded, before the next
one of the request is decoded, with its frame count and rate on its first chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from ditmesh.common import codec, timings
from ditmesh.common.errors import InvalidArgument, Unavailable
from ditmesh.common.gang_watch import watch_gang
from ditmesh.common.gangs import GangLaunch, GangLeader
from ditmesh.common.models import (
    check_model_name,
    load_class,
    pick_device,
    pick_dtype,
    resolve_model,
)
from ditmesh.common.server import RunningServer, StageOptions, start_server
from ditmesh.common.stage_info import stage_info
from ditmesh.common.warmup import ModelThread, should_warm, warm_vae
from ditmesh.v1 import vae_pb2, vae_pb2_grpc
from ditmesh.vae.decoder import MIME, Decoder, VaeDecoder, encode_image, normalise_format
from ditmesh.vae.gang import VaeGang, check_parallel
from ditmesh.vae.video import MIME as VIDEO_MIME
from ditmesh.vae.video import encode_video, normalise_video_format

log = logging.getLogger(__name__)


def iter_image_chunks(
    index: int,
    data: bytes,
    fmt: int,
    width: int,
    height: int,
    chunk_bytes: int = codec.CHUNK_BYTES,
    *,
    num_frames: int = 0,
    fps: int = 0,
):
    """One encoded image or video as ordered chunks; the first carries the metadata."""
    mime = VIDEO_MIME[fmt] if num_frames else MIME[fmt]
    total = len(data)
    offset = 0
    while True:
        piece = data[offset : offset + chunk_bytes]
        last = offset + len(piece) >= total
        first = offset == 0
        yield vae_pb2.ImageChunk(
            index=index,
            format=fmt,
            mime_type=mime if first else "",
            width=width if first else 0,
            height=height if first else 0,
            offset=offset,
            data=piece,
            last=last,
            total_bytes=total,
            num_frames=num_frames if first else 0,
            fps=fps if first else 0,
        )
        offset += len(piece)
        if last:
            return


class VaeService(vae_pb2_grpc.VaeServicer):
    def __init__(self, decoder: Decoder, on_fatal: Callable[[str], None] | None = None) -> None:
        self.decoder = decoder
        self.thread = ModelThread("vae")
        self.on_fatal = on_fatal
        """Called when a gang breaks, to stop the stage for good (RunningServer.fail)."""

    def Decode(self, request_iterator, context: grpc.ServicerContext):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "params":
            raise InvalidArgument("a Decode stream must start with DecodeParams")
        p = first.params
        check_model_name(p.model, self.decoder.model)
        video = getattr(self.decoder, "video", False)
        fmt = (
            normalise_video_format(p.output_format) if video else normalise_format(p.output_format)
        )
        assembler = codec.TensorAssembler()
        done = None
        for msg in request_iterator:
            kind = msg.WhichOneof("payload")
            if kind == "chunk":
                assembler.add(msg.chunk)
            elif kind == "done":
                done = msg.done
                break
            else:
                raise InvalidArgument("DecodeParams may come only once, first")
        if done is None:
            raise InvalidArgument("the Decode stream ended before its TensorsDone message")
        tensors = assembler.finish(done)
        if "latents" not in tensors:
            raise InvalidArgument("no 'latents' tensor was sent")
        latents = tensors["latents"]
        if video:
            self.decoder.check_latents(latents, p.height, p.width, p.num_frames)
            yield from self._videos(latents, fmt, p)
            return
        self.decoder.check_latents(latents, p.height, p.width)
        try:
            encoded = self.thread.run(self._decode, latents, fmt, p.quality)
        except Unavailable:
            if self.decoder.is_broken() and self.on_fatal is not None:
                self.on_fatal("the VAE gang lost a process or a collective timed out")
            raise
        for i, (data, height, width) in enumerate(encoded):
            yield from iter_image_chunks(i, data, fmt, width, height)

    def _videos(self, latents, fmt: int, p: vae_pb2.DecodeParams):
        """Each video of the request decoded, encoded and sent before the next is decoded."""
        for i in range(latents.shape[0]):
            data, frames, height, width = self.thread.run(
                self._decode_video, latents[i : i + 1], fmt, p.fps, p.quality
            )
            yield from iter_image_chunks(i, data, fmt, width, height, num_frames=frames, fps=p.fps)

    def _decode_video(self, latents, fmt: int, fps: int, quality: int):
        """On the model thread: one video's container bytes, frames, height and width."""
        with timings.phase("decode"):
            frames = self.decoder.decode(latents)[0]
        with timings.phase("image_encode", **{"ditmesh.image_format": fmt}):
            data = encode_video(frames, fmt, fps, quality)
        return data, frames.shape[0], frames.shape[1], frames.shape[2]

    def _decode(self, latents, fmt: int, quality: int) -> list[tuple[bytes, int, int]]:
        """On the model thread: each image's encoded bytes, height and width."""
        with timings.phase("decode"):
            images = self.decoder.decode(latents)
        out = []
        for pixels in images:
            with timings.phase("image_encode", **{"ditmesh.image_format": fmt}):
                out.append((encode_image(pixels, fmt, quality), pixels.shape[0], pixels.shape[1]))
        return out


def serve(
    model_source: str,
    options: StageOptions | None = None,
    *,
    parallel: int = 1,
    collective_timeout_s: float = 120.0,
) -> RunningServer:
    """Starts the VAE stage; with `parallel` > 1 this process leads a gang of that many."""
    o = options or StageOptions()
    check_parallel(parallel)
    model = resolve_model(model_source, o.name)
    if model.video:
        if parallel != 1:
            raise ValueError(
                f"model {model.name!r} makes videos; the video VAE gang is not built yet, "
                "so the VAE stage of a video model runs on one process (--parallel 1)"
            )
        dev = pick_device(o.device)
        decoder: Decoder = load_class(model.family.video_decoder)(
            model, dev, pick_dtype(o.dtype, dev)
        )
    elif parallel == 1:
        dev = pick_device(o.device)
        decoder = VaeDecoder(model, dev, pick_dtype(o.dtype, dev))
    else:
        launch = GangLaunch(
            world=parallel,
            device=o.device,
            dtype=o.dtype,
            collective_timeout_s=collective_timeout_s,
        )
        # Always a fresh loopback port: MASTER_PORT may belong to a denoiser gang.
        decoder = VaeGang(model_source, launch.rendezvous(), name=o.name)
    holder: dict[str, RunningServer] = {}
    service = VaeService(decoder, on_fatal=lambda why: holder["server"].fail(why))
    try:
        # A video model's warm-up decodes a short clip (common/warmup.py).
        if should_warm(o.warmup, pick_device(o.device)):
            warm_vae(service, decoder.model)
        running = start_server(
            o.server_config("vae"),
            [
                (vae_pb2_grpc.add_VaeServicer_to_server, service, "ditmesh.v1.Vae"),
                stage_info("vae", decoder.model, parallel),
            ],
        )
    except BaseException:
        decoder.close()
        raise
    holder["server"] = running
    running.on_stop.append(decoder.close)
    running.on_stop.append(service.thread.close)
    if isinstance(decoder, GangLeader):
        watch_gang(decoder, running)
    return running
