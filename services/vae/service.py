"""The VAE stage's gRPC service.

Image models: latents to images (decoder.py, or the gang in gang.py). Video models
(`Family.video`): the family's decoder from video_decoder.py yields each video's frames
in pieces as it decodes them, and each piece goes into the video's container (video.py)
at once: RAW's bytes go back piece by piece, MP4 encodes on a thread of its own while
the next piece is decoded and goes back whole; a progress message after each piece
says how many frames are decoded (when the caller asks, `report_frames`). A video's
first chunk carries its frame count and rate; it goes back before the next video of
the request is decoded. How fast the decoder yields is the decoder's business.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

import grpc

from ditmesh.common import codec, timings
from ditmesh.common.errors import DitmeshError, InvalidArgument, Unavailable
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
from ditmesh.vae.video import VideoWriter, normalise_video_format
from ditmesh.vae.video_gang import VideoVaeGang

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
    offset: int = 0,
    total_bytes: int | None = None,
):
    """One encoded image or video as ordered chunks; the first carries the metadata.

    `data` may be a part of the whole: the bytes from `offset` on of `total_bytes` (a RAW
    video sent piece by piece as it is decoded); the whole by default."""
    mime = VIDEO_MIME[fmt] if num_frames else MIME[fmt]
    start = offset
    total = start + len(data) if total_bytes is None else total_bytes
    while True:
        piece = data[offset - start : offset - start + chunk_bytes]
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
        if offset >= start + len(data):
            return


class VaeService(vae_pb2_grpc.VaeServicer):
    def __init__(self, decoder: Decoder, on_fatal: Callable[[str], None] | None = None) -> None:
        self.decoder = decoder
        self.thread = ModelThread("vae")
        self.on_fatal = on_fatal
        """Called when a gang breaks, to stop the stage for good (RunningServer.fail)."""
        self._encoding = ThreadPoolExecutor(1, thread_name_prefix="vae-encode")
        """Encodes a video's frames into its container while the model thread decodes
        the next ones (PyAV and Pillow let go of the GIL while they encode)."""

    def close(self) -> None:
        self.thread.close()
        self._encoding.shutdown(wait=False)

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
            try:
                yield from self._video(i, latents[i : i + 1], fmt, p)
            except Unavailable:
                if self.decoder.is_broken() and self.on_fatal is not None:
                    self.on_fatal("the VAE gang lost a process or a collective timed out")
                raise

    def _video(self, index: int, latents, fmt: int, p: vae_pb2.DecodeParams):
        """One video, piece by piece as the decoder yields its frames (`iter_decode`, on
        the model thread): RAW's bytes go out with each piece; other containers encode a
        piece on the encoding thread while the model thread decodes the next, and go out
        whole at the end. With `report_frames`, a progress message follows each piece.
        A failure after some frames went out ends the call with an error status: the
        caller never gets the video's `last` chunk, so it cannot take it for whole."""
        total = p.num_frames
        writer = VideoWriter(fmt, p.fps, p.quality)
        pieces = self.thread.run(lambda: iter(self.decoder.iter_decode(latents)))
        done = sent = 0  # frames decoded (the writer may still be encoding some); bytes sent
        encoding: Future | None = None
        try:
            while True:
                with timings.phase("decode"):
                    piece = self.thread.run(next, pieces, None)
                if encoding is not None:
                    encoding.result()  # in order, one piece at a time
                    encoding = None
                if piece is None:
                    break
                if not piece.shape[0]:
                    continue
                done += piece.shape[0]
                if done > total:
                    raise DitmeshError(
                        f"the VAE decoded more than the {total} frames asked for (video {index})"
                    )
                if writer.incremental:
                    with timings.phase("image_encode", **{"ditmesh.image_format": fmt}):
                        data = writer.add(piece)
                    yield from self._video_chunks(index, data, writer, p, sent)
                    sent += len(data)
                else:
                    encoding = self._encoding.submit(
                        contextvars.copy_context().run, _encode_piece, writer, piece, fmt
                    )
                if p.report_frames:
                    yield vae_pb2.ImageChunk(
                        progress=vae_pb2.VideoProgress(
                            video_index=index, frames_done=done, frames_total=total
                        )
                    )
            if done != total:
                raise DitmeshError(
                    f"the VAE decoded {done} of the {total} frames asked for (video {index})"
                )
            if not writer.incremental:  # RAW's last chunk went with its last piece
                with timings.phase("image_encode", **{"ditmesh.image_format": fmt}):
                    data = writer.finish()
                yield from self._video_chunks(index, data, writer, p, sent)
        except DitmeshError:
            raise
        except Exception as exc:
            # Said as a sentence with how far the video got; the traceback stays here.
            log.exception("video %d failed after %d of %d frames", index, done, total)
            raise DitmeshError(
                f"the VAE failed on video {index} after {done} of its {total} frames "
                "were decoded; the video is not sent (the VAE's log has the details)"
            ) from exc
        finally:
            if encoding is not None:
                wait([encoding])  # the writer is not closed under the encoding thread
            writer.close()
            self.thread.run(_close, pieces)  # where the decoder's generator runs

    def _video_chunks(self, index: int, data: bytes, writer: VideoWriter, p, offset: int):
        """A video's bytes from `offset` on: RAW as each piece comes (its total size is
        known from the first piece), another container whole."""
        assert writer.size is not None  # set by the first piece
        height, width = writer.size
        total_bytes = p.num_frames * height * width * 3 if writer.incremental else None
        yield from iter_image_chunks(
            index,
            data,
            writer.fmt,
            width,
            height,
            num_frames=p.num_frames,
            fps=p.fps,
            offset=offset,
            total_bytes=total_bytes,
        )

    def _decode(self, latents, fmt: int, quality: int) -> list[tuple[bytes, int, int]]:
        """On the model thread: each image's encoded bytes, height and width."""
        with timings.phase("decode"):
            images = self.decoder.decode(latents)
        out = []
        for pixels in images:
            with timings.phase("image_encode", **{"ditmesh.image_format": fmt}):
                out.append((encode_image(pixels, fmt, quality), pixels.shape[0], pixels.shape[1]))
        return out


def _encode_piece(writer: VideoWriter, piece, fmt: int) -> bytes:
    """On the encoding thread: one piece of a video into its container. Its time counts
    as image_encode though it overlaps the next piece's decode, so a video's decode and
    image_encode phases may add up to more than the call's work."""
    with timings.phase("image_encode", **{"ditmesh.image_format": fmt}):
        return writer.add(piece)


def _close(pieces: Iterator) -> None:
    """Ends a decoder's generator left part way (a failure, a caller that left)."""
    close = getattr(pieces, "close", None)
    if close is not None:
        close()


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
    decoder: Decoder
    if parallel == 1:
        dev = pick_device(o.device)
        if model.video:
            decoder = load_class(model.family.video_decoder)(model, dev, pick_dtype(o.dtype, dev))
        else:
            decoder = VaeDecoder(model, dev, pick_dtype(o.dtype, dev))
    else:
        launch = GangLaunch(
            world=parallel,
            device=o.device,
            dtype=o.dtype,
            collective_timeout_s=collective_timeout_s,
        )
        # Always a fresh loopback port: MASTER_PORT may belong to a denoiser gang.
        gang = VideoVaeGang if model.video else VaeGang
        decoder = gang(model_source, launch.rendezvous(), name=o.name)
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
    running.on_stop.append(service.close)
    if isinstance(decoder, GangLeader):
        watch_gang(decoder, running)
    return running
