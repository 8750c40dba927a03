"""OpenAI's images API shapes, in and out: a request body as a GenerateRequest, errors in
OpenAI's error shape with their HTTP status, results as OpenAI's response and events.

Pure: no server, no gateway state. The HTTP app (gateway/http_api.py) runs what this
builds through the same path as the gRPC servicer. Shapes follow the openai SDK's own
types (ImagesResponse, ImageGenPartialImageEvent, ImageGenCompletedEvent); ditmesh's
own fields (steps, seed, guidance, ...) come at the top level of the body, where the
SDK's `extra_body` puts them, and results carry a `ditmesh` block (seed, steps, timings).
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass

import grpc

from ditmesh.common.errors import DitmeshError
from ditmesh.v1 import gateway_pb2, vae_pb2

FORMATS = {
    "png": vae_pb2.OUTPUT_FORMAT_PNG,
    "jpeg": vae_pb2.OUTPUT_FORMAT_JPEG,
    "webp": vae_pb2.OUTPUT_FORMAT_WEBP,
}
FORMAT_NAMES = {v: k for k, v in FORMATS.items()}

# OpenAI fields that change nothing here: they are accepted so a client written for
# OpenAI works unchanged (`quality` and `style` pick a model's effort there; `steps` does
# here). Any other unknown field is refused, so a typo never goes unnoticed.
IGNORED = {"quality", "style", "user", "moderation"}
# ditmesh's own fields, with the GenerateRequest field each fills.
OWN = {
    "steps": "steps",
    "seed": "seed",
    "guidance": "guidance",
    "true_cfg_scale": "true_cfg_scale",
    "negative_prompt": "negative_prompt",
    "request_id": "request_id",
    "cache_threshold": "cache_threshold",
}
KNOWN = {
    "model",
    "prompt",
    "n",
    "size",
    "response_format",
    "output_format",
    "output_compression",
    "background",
    "stream",
    "partial_images",
    "timeout",
    *IGNORED,
    *OWN,
}
_SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")
_RETRY_IN = re.compile(r"retry in about (\d+) s")

# gRPC status -> (HTTP status, OpenAI error type, OpenAI error code).
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "invalid_request_error", "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
    grpc.StatusCode.CANCELLED: (499, "invalid_request_error", "cancelled"),
}
# A stage that is down has no measured wait to offer; its queued requests wait this long.
DEFAULT_RETRY_AFTER_S = 5


class OpenAIError(Exception):
    """An error as OpenAI's API sends it: an HTTP status and {"error": {...}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


def bad(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="invalid_value" if param else None)


def from_ditmesh(exc: DitmeshError) -> OpenAIError:
    """A gateway error with the HTTP status OpenAI's clients expect for it."""
    status, kind, code = STATUS.get(exc.code, (500, "server_error", "internal_error"))
    retry_after = None
    if status in (429, 503):
        m = _RETRY_IN.search(str(exc))
        retry_after = int(m.group(1)) if m else DEFAULT_RETRY_AFTER_S
    param = "model" if exc.code == grpc.StatusCode.NOT_FOUND else None
    return OpenAIError(status, str(exc), type=kind, param=param, code=code, retry_after=retry_after)


@dataclass(kw_only=True, slots=True)
class Generation:
    """A checked images/generations body: the gRPC request, and how to answer."""

    request: gateway_pb2.GenerateRequest
    stream: bool
    output_format: str
    timeout: float | None


def _typed(body: dict, name: str, kind: type | tuple[type, ...], what: str):
    value = body.get(name)
    # bool is an int to Python, never to a JSON schema.
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise bad(f"'{name}' must be {what}; got {value!r}", name)
    return value


def parse_generation(body: object) -> Generation:
    """Checks the body's shape and types; values are checked by `plan.make_plan` after."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise bad(
            f"unknown field {unknown[0]!r} (this gateway takes OpenAI's images "
            f"fields and ditmesh's {', '.join(sorted(OWN))})",
            unknown[0],
        )
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise bad("'prompt' is required and must be a string", "prompt")
    req = gateway_pb2.GenerateRequest(prompt=prompt)
    if (model := _typed(body, "model", str, "a string")) is not None:
        req.model = model
    if (n := _typed(body, "n", int, "an integer")) is not None:
        if n < 1:
            raise bad(f"'n' must be at least 1; got {n}", "n")
        req.num_images = n
    size = _typed(body, "size", str, "a string 'WIDTHxHEIGHT' or 'auto'")
    if size is not None and size != "auto":
        m = _SIZE.fullmatch(size)
        if m is None:
            raise bad(
                f"'size' must be 'WIDTHxHEIGHT' (e.g. '1024x768') or 'auto'; got {size!r}", "size"
            )
        req.width, req.height = int(m.group(1)), int(m.group(2))
    response_format = body.get("response_format") or "b64_json"
    if response_format == "url":
        raise bad(
            "response_format 'url' is not supported: this gateway stores no images; "
            "use 'b64_json' (the default)",
            "response_format",
        )
    if response_format != "b64_json":
        raise bad(f"response_format must be 'b64_json'; got {response_format!r}", "response_format")
    output_format = _typed(body, "output_format", str, "'png', 'jpeg' or 'webp'") or "png"
    if output_format not in FORMATS:
        raise bad(
            f"output_format must be 'png', 'jpeg' or 'webp'; got {output_format!r}", "output_format"
        )
    req.output_format = FORMATS[output_format]
    compression = _typed(body, "output_compression", int, "an integer 1-100")
    if compression is not None:
        req.quality = compression  # JPEG / WebP quality; make_plan checks 1-100
    if body.get("background") not in (None, "auto", "opaque"):
        raise bad("only opaque backgrounds are made ('auto' or 'opaque')", "background")
    stream = False if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):
        raise bad(f"'stream' must be true or false; got {stream!r}", "stream")
    partial = _typed(body, "partial_images", int, "an integer 0-3")
    if partial:
        if not stream:
            raise bad("partial_images needs 'stream': true", "partial_images")
        req.partial_images = partial
    for name, kind, what in (
        ("steps", int, "an integer"),
        ("seed", int, "an integer"),
        ("guidance", (int, float), "a number"),
        ("true_cfg_scale", (int, float), "a number"),
        ("negative_prompt", str, "a string"),
        ("request_id", str, "a string"),
        ("cache_threshold", (int, float), "a number 0-1"),
    ):
        value = _typed(body, name, kind, what)
        if value is not None:
            setattr(req, OWN[name], value)
    timeout = _typed(body, "timeout", (int, float), "a number of seconds")
    if timeout is not None and timeout <= 0:
        raise bad(f"'timeout' must be > 0 seconds; got {timeout}", "timeout")
    return Generation(request=req, stream=stream, output_format=output_format, timeout=timeout)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def timings(finished: gateway_pb2.Finished) -> dict[str, float]:
    """Every `*_seconds` field of Finished, named without the suffix."""
    return {
        f.name.removesuffix("_seconds"): round(getattr(finished, f.name), 6)
        for f in finished.DESCRIPTOR.fields
        if f.name.endswith("_seconds")
    }


def stage_timings(finished: gateway_pb2.Finished) -> dict[str, dict]:
    """Each stage's StageTiming (queue, work, transfer, ... seconds; attempts; replica)."""
    return {
        st.stage: {
            f.name.removesuffix("_seconds"): getattr(st, f.name)
            for f in st.DESCRIPTOR.fields
            if f.name != "stage"
        }
        for st in finished.stages
    }


def ditmesh_block(rid: str, model: str, steps: int, finished: gateway_pb2.Finished) -> dict:
    """The result's own block; the approximate speed-ups that ran say so in it, as in the
    SDK's result (step caching: steps skipped of the total; DiTFastAttn: the share of
    full attention computed)."""
    block = {
        "request_id": rid,
        "model": model,
        "seed": finished.seed,
        "steps": steps,
        "timings": timings(finished),
        "stages": stage_timings(finished),
        "speedups": list(finished.speedups),
    }
    if finished.steps_total:
        block["cached_steps"] = finished.cached_steps
        block["steps_total"] = finished.steps_total
    if finished.attention_computed:
        block["attention_computed"] = round(finished.attention_computed, 6)
    return block


def images_response(images: list[gateway_pb2.Image], output_format: str, block: dict) -> dict:
    """OpenAI's ImagesResponse, plus the `ditmesh` block."""
    size = f"{images[0].width}x{images[0].height}" if images else None
    return {
        "created": int(time.time()),
        "data": [{"b64_json": b64(im.data)} for im in images],
        "background": "opaque",
        "output_format": output_format,
        "size": size,
        "ditmesh": block,
    }


def partial_image_event(part: gateway_pb2.PartialImage, output_format: str) -> dict:
    """OpenAI's ImageGenPartialImageEvent; `ditmesh` says which step and image it shows."""
    im = part.image
    return {
        "type": "image_generation.partial_image",
        "b64_json": b64(im.data),
        "background": "opaque",
        "created_at": int(time.time()),
        "output_format": output_format,
        "partial_image_index": part.partial_image_index,
        "quality": "auto",
        "size": f"{im.width}x{im.height}",
        "ditmesh": {"step": part.step, "total": part.total, "index": im.index},
    }


def completed_event(image: gateway_pb2.Image, output_format: str, block: dict) -> dict:
    """OpenAI's ImageGenCompletedEvent (one per image), plus the `ditmesh` block."""
    return {
        "type": "image_generation.completed",
        "b64_json": b64(image.data),
        "background": "opaque",
        "created_at": int(time.time()),
        "output_format": output_format,
        "quality": "auto",
        "size": f"{image.width}x{image.height}",
        "usage": {
            "input_tokens": 0,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": 0,
            "total_tokens": 0,
        },
        "ditmesh": {**block, "index": image.index},
    }
