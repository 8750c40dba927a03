"""The encoder stage's gRPC service: prompt checks, then the family's text encoder.

The family modules (flux.py, sd3.py, pixart.py, hunyuan.py) only load and run their encoders;
what every family checks the same way (empty prompt, length in characters and in
tokens) is done here, once.
"""

from __future__ import annotations

import logging
import re
from typing import Protocol

import grpc
import torch

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
from ditmesh.common.server import RunningServer, StageOptions, start_server
from ditmesh.common.stage_info import stage_info
from ditmesh.common.warmup import ModelThread, should_warm, warm_encoder
from ditmesh.v1 import encoder_pb2, encoder_pb2_grpc

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 20_000


class TextEncoder(Protocol):
    """What a family's text encoder offers the service."""

    model: ModelRef
    max_tokens: int
    pipe: object

    def count_tokens(self, prompt: str) -> int: ...

    def encode(self, prompt: str) -> dict[str, torch.Tensor]: ...


def check_prompt(encoder: TextEncoder, text: str, what: str) -> None:
    """Refuses an empty prompt and one over the character or token limit, with a sentence."""
    if what == "prompt" and not text.strip():
        raise InvalidArgument("the prompt is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidArgument(
            f"the {what} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}"
        )
    n = encoder.count_tokens(text)
    if n > encoder.max_tokens:
        raise InvalidArgument(
            f"the {what} is {n} tokens long; model {encoder.model.name!r} takes at most "
            f"{encoder.max_tokens}"
        )


_TRUNCATED = re.compile(r"^(The following part of your input was truncated[^:]*):\s*(.*)$", re.S)


class ShortTruncationWarning(logging.Filter):
    """diffusers logs the whole cut-off part of a prompt; keep the sentence, drop the text.

    A prompt may be long and private; its length is what an operator needs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        m = _TRUNCATED.match(str(record.msg))
        if m:
            record.msg = f"{m.group(1)} ({len(m.group(2))} characters cut)"
            record.args = ()
        return True


def load_text_encoder(model: ModelRef, device: str = "auto", dtype: str = "auto") -> TextEncoder:
    dev = pick_device(device)
    encoder = load_class(model.family.text_encoder)(model, dev, pick_dtype(dtype, dev))
    logging.getLogger(type(encoder.pipe).__module__).addFilter(ShortTruncationWarning())
    return encoder


class EncoderService(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.thread = ModelThread("encoder")

    def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.ServicerContext):
        check_model_name(request.model, self.encoder.model)
        texts = {"": request.prompt}
        if request.encode_negative:
            texts["negative_"] = request.negative_prompt
        for prefix, text in texts.items():
            check_prompt(self.encoder, text, "negative prompt" if prefix else "prompt")
        chunks, done = self.thread.run(self._encode, texts)
        for chunk in chunks:
            yield encoder_pb2.EncodeResponse(chunk=chunk)
        yield encoder_pb2.EncodeResponse(done=done)

    def _encode(self, texts: dict[str, str]) -> tuple[list, object]:
        """On the model thread: the tensors, and their bytes (the copy off the GPU)."""
        tensors = {}
        for prefix, text in texts.items():
            for name, t in self.encoder.encode(text).items():
                tensors[prefix + name] = t
        return list(codec.iter_tensor_chunks(tensors)), codec.done_message(tensors)


def compile_text_encoders(encoder: TextEncoder) -> list[str]:
    """torch.compile each text encoder of the pipeline; returns their names.

    Prompts are always padded to the family's length (77 for CLIP, 256-512 for T5), so
    every call has the shapes of the first and nothing recompiles. On one H200 this took
    the T5-XXL encoder of Flux from 24 ms to 13 ms a prompt (bench/encoder_profile.py).
    """
    names = []
    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(encoder.pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            setattr(encoder.pipe, attr, torch.compile(module))
            names.append(attr)
    return names


def serve(
    model_source: str, options: StageOptions | None = None, *, compile: bool = False
) -> RunningServer:
    """Starts the encoder stage; `compile`: compile the text encoders (then warm up at
    start whatever `--warmup` says, so the first request does not pay for compiling)."""
    o = options or StageOptions()
    model = resolve_model(model_source, o.name)
    encoder = load_text_encoder(model, o.device, o.dtype)
    if compile:
        log.info(
            "compiling %s (at the warm-up, before serving)",
            ", ".join(compile_text_encoders(encoder)),
        )
    service = EncoderService(encoder)
    if compile or should_warm(o.warmup, pick_device(o.device)):
        warm_encoder(service)
    running = start_server(
        o.server_config("encoder"),
        [
            (
                encoder_pb2_grpc.add_EncoderServicer_to_server,
                service,
                "ditmesh.v1.Encoder",
            ),
            stage_info("encoder", model),
        ],
    )
    running.on_stop.append(service.thread.close)
    return running
