"""The encoder stage's gRPC service."""

from __future__ import annotations

import logging

import grpc

from ditmesh.common import codec
from ditmesh.common.errors import InvalidArgument
from ditmesh.common.models import (
    ModelRef,
    check_model_name,
    load_class,
    pick_device,
    pick_dtype,
    resolve_model,
)
from ditmesh.common.server import ServerConfig, start_server
from ditmesh.v1 import encoder_pb2, encoder_pb2_grpc

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 20_000


def load_text_encoder(model: ModelRef, device: str = "auto", dtype: str = "auto"):
    dev = pick_device(device)
    return load_class(model.family.text_encoder)(model, dev, pick_dtype(dtype, dev))


class EncoderService(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, encoder) -> None:
        self.encoder = encoder

    def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.ServicerContext):
        check_model_name(request.model, self.encoder.model)
        texts = {"": request.prompt}
        if request.encode_negative:
            texts["negative_"] = request.negative_prompt
        for prefix, text in texts.items():
            what = "negative prompt" if prefix else "prompt"
            if prefix == "" and not text.strip():
                raise InvalidArgument("the prompt is empty")
            if len(text) > MAX_PROMPT_CHARS:
                raise InvalidArgument(
                    f"the {what} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}"
                )
            self.encoder.check_prompt(text, what)
        tensors = {}
        for prefix, text in texts.items():
            for name, t in self.encoder.encode(text).items():
                tensors[prefix + name] = t
        for chunk in codec.iter_tensor_chunks(tensors):
            yield encoder_pb2.EncodeResponse(chunk=chunk)
        yield encoder_pb2.EncodeResponse(done=codec.done_message(tensors))


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
    encoder = load_text_encoder(model, device, dtype)
    return start_server(
        ServerConfig(stage="encoder", host=host, port=port),
        [
            (
                encoder_pb2_grpc.add_EncoderServicer_to_server,
                EncoderService(encoder),
                "ditmesh.v1.Encoder",
            )
        ],
    )
