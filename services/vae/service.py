"""The VAE stage's gRPC service."""

from __future__ import annotations

import logging

import grpc

from ditmesh.common import codec
from ditmesh.common.errors import InvalidArgument
from ditmesh.common.models import check_model_name, pick_device, pick_dtype, resolve_model
from ditmesh.common.server import ServerConfig, start_server
from ditmesh.v1 import vae_pb2, vae_pb2_grpc
from ditmesh.vae.decoder import MIME, VaeDecoder, encode_image, normalise_format

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
    def __init__(self, decoder: VaeDecoder) -> None:
        self.decoder = decoder

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
        images = self.decoder.decode(latents)
        for i, pixels in enumerate(images):
            data = encode_image(pixels, fmt, p.quality)
            yield from iter_image_chunks(i, data, fmt, pixels.shape[1], pixels.shape[0])


def serve(
    model_source: str,
    *,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    device: str = "auto",
    dtype: str = "auto",
):
    model = resolve_model(model_source, name)
    dev = pick_device(device)
    decoder = VaeDecoder(model, dev, pick_dtype(dtype, dev))
    return start_server(
        ServerConfig(stage="vae", host=host, port=port),
        [(vae_pb2_grpc.add_VaeServicer_to_server, VaeService(decoder), "ditmesh.v1.Vae")],
    )
