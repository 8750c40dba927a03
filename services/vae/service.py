"""The VAE stage's gRPC service."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc

from ditmesh.common import codec
from ditmesh.common.errors import InvalidArgument, Unavailable
from ditmesh.common.models import check_model_name, pick_device, pick_dtype, resolve_model
from ditmesh.common.server import RunningServer, ServerConfig, start_server
from ditmesh.v1 import vae_pb2, vae_pb2_grpc
from ditmesh.vae.decoder import MIME, VaeDecoder, encode_image, normalise_format
from ditmesh.vae.gang import VaeGang, check_parallel

log = logging.getLogger(__name__)


def iter_image_chunks(
    index: int, data: bytes, fmt: int, width: int, height: int, chunk_bytes: int = codec.CHUNK_BYTES
):
    total = len(data)
    offset = 0
    while True:
        piece = data[offset : offset + chunk_bytes]
        last = offset + len(piece) >= total
        first = offset == 0
        yield vae_pb2.ImageChunk(
            index=index,
            format=fmt,
            mime_type=MIME[fmt] if first else "",
            width=width if first else 0,
            height=height if first else 0,
            offset=offset,
            data=piece,
            last=last,
            total_bytes=total,
        )
        offset += len(piece)
        if last:
            return


class VaeService(vae_pb2_grpc.VaeServicer):
    def __init__(
        self, decoder: VaeDecoder | VaeGang, on_fatal: Callable[[str], None] | None = None
    ) -> None:
        self.decoder = decoder
        self.on_fatal = on_fatal
        """Called when a gang breaks, to stop the stage for good (RunningServer.fail)."""

    def Decode(self, request_iterator, context: grpc.ServicerContext):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "params":
            raise InvalidArgument("a Decode stream must start with DecodeParams")
        p = first.params
        check_model_name(p.model, self.decoder.model)
        fmt = normalise_format(p.output_format)
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
        self.decoder.check_latents(latents, p.height, p.width)
        try:
            images = self.decoder.decode(latents)
        except Unavailable:
            broken = getattr(self.decoder, "broken", None)
            if broken is not None and broken.is_set() and self.on_fatal is not None:
                self.on_fatal("the VAE gang lost a process or a collective timed out")
            raise
        for i, pixels in enumerate(images):
            data = encode_image(pixels, fmt, p.quality)
            yield from iter_image_chunks(i, data, fmt, pixels.shape[1], pixels.shape[0])


def _watch_gang(gang: VaeGang, running: RunningServer) -> None:
    """Fails the server when a worker dies while the gang is idle (as the denoiser's watch)."""
    while not running._stopped.wait(1.0):
        if gang.closing.is_set():
            return
        dead = gang.dead_workers()
        if dead:
            gang.broken.set()
            running.fail(f"VAE gang process {', '.join(dead)} exited")
            return


def serve(
    model_source: str,
    *,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    parallel: int = 1,
    collective_timeout_s: float = 120.0,
) -> RunningServer:
    """Starts the VAE stage; with `parallel` > 1 this process leads a gang of that many."""
    check_parallel(parallel)
    model = resolve_model(model_source, name)
    if parallel == 1:
        dev = pick_device(device)
        decoder: VaeDecoder | VaeGang = VaeDecoder(model, dev, pick_dtype(dtype, dev))
    else:
        decoder = VaeGang(
            model_source,
            parallel,
            name=name,
            device=device,
            dtype=dtype,
            collective_timeout_s=collective_timeout_s,
        )
    holder: dict[str, RunningServer] = {}
    service = VaeService(decoder, on_fatal=lambda why: holder["server"].fail(why))
    try:
        running = start_server(
            ServerConfig(stage="vae", host=host, port=port),
            [(vae_pb2_grpc.add_VaeServicer_to_server, service, "ditmesh.v1.Vae")],
        )
    except BaseException:
        if isinstance(decoder, VaeGang):
            decoder.close()
        raise
    holder["server"] = running
    if isinstance(decoder, VaeGang):
        running.on_stop.append(decoder.close)
        threading.Thread(
            target=_watch_gang, args=(decoder, running), daemon=True, name="vae-gang-watch"
        ).start()
    return running
