"""Results, errors and wire helpers of the ditmesh client SDK.

Everything here is free of any channel: the errors a call raises (and the one
mapping from a gRPC failure to them), the dataclasses a call returns, building
and checking a GenerateRequest, and reassembling the chunked image stream.
`ditmesh.client.sdk` (blocking) and `ditmesh.client.aio` (asyncio) share it.
"""

from __future__ import annotations

import io
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import grpc
from PIL import Image

from ditmesh.v1 import gateway_pb2, vae_pb2

_INT64_MAX = 2**63 - 1

# Lower-case names a caller may pass as output_format, and the reverse mapping.
_FORMAT_BY_NAME: dict[str, int] = {
    "png": vae_pb2.OUTPUT_FORMAT_PNG,
    "jpeg": vae_pb2.OUTPUT_FORMAT_JPEG,
    "jpg": vae_pb2.OUTPUT_FORMAT_JPEG,
    "webp": vae_pb2.OUTPUT_FORMAT_WEBP,
    "raw": vae_pb2.OUTPUT_FORMAT_RAW,
}
_NAME_BY_FORMAT: dict[int, str] = {
    vae_pb2.OUTPUT_FORMAT_UNSPECIFIED: "png",  # the proto says unspecified means PNG
    vae_pb2.OUTPUT_FORMAT_PNG: "png",
    vae_pb2.OUTPUT_FORMAT_JPEG: "jpeg",
    vae_pb2.OUTPUT_FORMAT_WEBP: "webp",
    vae_pb2.OUTPUT_FORMAT_RAW: "raw",
}
_DEFAULT_MIME = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "raw": "application/octet-stream",
}
# File suffixes `GenerateResult.save` understands; any other suffix gets the bytes as received.
_FORMAT_BY_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".raw": "raw"}
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}

OutputFormat = Literal["png", "jpeg", "jpg", "webp", "raw"] | int


# ----------------------------------------------------------------------------- errors


class DitmeshClientError(Exception):
    """A request failed; `code` is the gRPC status, `details` the server's sentence.

    The message names both, so an uncaught error still tells a person what went
    wrong without a traceback from the server (the wire never carries one).
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{details} [{code.name}]")
        self.code = code
        self.details = details


class InvalidArgumentError(DitmeshClientError):
    """The request itself is wrong; retrying it unchanged will fail again."""


class UnavailableError(DitmeshClientError):
    """The gateway or a stage behind it is down or draining; try again later."""


class ResourceExhaustedError(DitmeshClientError):
    """A queue is full or a size limit was hit; the sentence says which."""


class DeadlineExceededError(DitmeshClientError):
    """The request's deadline passed (on the client or inside the mesh)."""


class RequestCancelledError(DitmeshClientError):
    """The request was cancelled, by this client or by the server (e.g. on shutdown)."""


class ProtocolError(DitmeshClientError):
    """The gateway's answer broke the wire contract (missing image, bad chunk order)."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.INTERNAL, details)


_ERROR_BY_CODE: dict[grpc.StatusCode, type[DitmeshClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
}


def _map_rpc_error(err: grpc.RpcError) -> DitmeshClientError:
    """The one place a grpc.RpcError becomes an SDK error (sync and aio alike)."""
    code_fn = getattr(err, "code", None)
    code = (code_fn() if callable(code_fn) else None) or grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    details = (details_fn() if callable(details_fn) else None) or (
        f"the gateway answered {code.name} without a reason"
    )
    return _ERROR_BY_CODE.get(code, DitmeshClientError)(code, details)


# ----------------------------------------------------------------------------- results


@dataclass(kw_only=True, slots=True, frozen=True)
class Progress:
    """One progress event of a streaming Generate call.

    kind is "queued" (position set), "encoded" or "decoded" (seconds set), or
    "step" (step is 1-based, total the number of denoising steps).
    """

    kind: Literal["queued", "encoded", "step", "decoded"]
    step: int = 0
    total: int = 0
    position: int = 0
    seconds: float = 0.0


@dataclass(kw_only=True, slots=True, frozen=True)
class Timings:
    """Seconds spent in each stage of the mesh, as the gateway measured them."""

    encode: float
    denoise: float
    decode: float
    total: float


@dataclass(kw_only=True, slots=True)
class GenerateResult:
    """The images of one request; `raw[i]` holds the bytes `images[i]` was decoded from."""

    request_id: str
    images: list[Image.Image]
    raw: list[bytes]
    formats: list[str]
    mime_types: list[str]
    seed: int
    timings: Timings

    def save(self, path: str | os.PathLike[str]) -> list[Path]:
        """Writes the images; several get `-{i}` before the suffix. Returns the paths.

        When the suffix matches the received format (or is unknown) the bytes are
        written as received, so nothing is re-encoded; otherwise the image is
        converted (e.g. a raw tensor saved as out.png becomes a PNG).
        """
        target = Path(path)
        if len(self.raw) == 1:
            paths = [target]
        else:
            paths = [
                target.with_name(f"{target.stem}-{i}{target.suffix}") for i in range(len(self.raw))
            ]
        for out, data, fmt, image in zip(paths, self.raw, self.formats, self.images, strict=True):
            wanted = _FORMAT_BY_SUFFIX.get(out.suffix.lower(), fmt)
            if wanted == fmt:
                out.write_bytes(data)
            elif wanted == "raw":
                out.write_bytes(image.convert("RGB").tobytes())
            else:
                image.convert("RGB").save(out, format=_PIL_FORMAT[wanted])
        return paths


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelInfo:
    """A model the mesh serves, with the defaults the gateway applies."""

    name: str
    family: str
    default_height: int
    default_width: int
    default_steps: int
    default_guidance: float
    size_multiple: int
    max_prompt_tokens: int


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelList:
    """The answer of ListModels: every model and the one used when none is named."""

    models: list[ModelInfo]
    default_model: str


# ----------------------------------------------------------------------------- helpers


def _format_value(output_format: OutputFormat) -> int:
    """Accepts a name ("png", "jpeg", "webp", "raw") or an OutputFormat enum value."""
    if isinstance(output_format, str):
        value = _FORMAT_BY_NAME.get(output_format.lower().lstrip("."))
        if value is not None:
            return value
    elif isinstance(output_format, int) and not isinstance(output_format, bool):
        if output_format in _NAME_BY_FORMAT:
            return output_format
    raise ValueError(f"unknown output_format {output_format!r}; use png, jpeg, webp or raw")


def _build_request(
    prompt: str,
    *,
    negative_prompt: str,
    height: int,
    width: int,
    steps: int,
    guidance: float | None,
    true_cfg_scale: float | None,
    seed: int | None,
    num_images: int,
    output_format: OutputFormat,
    quality: int,
    model: str,
    request_id: str | None,
) -> gateway_pb2.GenerateRequest:
    """Checks what is plainly wrong before a network round trip; the server checks the rest."""
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise TypeError("prompt and negative_prompt must be str")
    for name, value in (("height", height), ("width", width), ("steps", steps)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (0 means the model's default), got {value}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 0 <= quality <= 100:
        raise ValueError(f"quality must be between 0 and 100 (0 means the default), got {quality}")
    for name, scale in (("guidance", guidance), ("true_cfg_scale", true_cfg_scale)):
        if scale is not None and not math.isfinite(scale):
            raise ValueError(f"{name} must be a finite number, got {scale}")
    if seed is not None and not -_INT64_MAX - 1 <= seed <= _INT64_MAX:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    if request_id is None:
        request_id = uuid.uuid4().hex
    elif not request_id or not request_id.isascii() or not request_id.isprintable():
        raise ValueError("request_id must be a non-empty printable ASCII string")
    request = gateway_pb2.GenerateRequest(
        request_id=request_id,
        model=model,
        prompt=prompt,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        steps=steps,
        num_images=num_images,
        output_format=_format_value(output_format),
        quality=quality,
    )
    if guidance is not None:
        request.guidance = guidance
    if true_cfg_scale is not None:
        request.true_cfg_scale = true_cfg_scale
    if seed is not None:
        request.seed = seed
    return request


@dataclass(slots=True)
class _ImageBytes:
    """One whole image as it came off the wire, before decoding."""

    index: int
    format: int
    mime_type: str
    width: int
    height: int
    data: bytearray = field(default_factory=bytearray)
    total_bytes: int = 0
    complete: bool = False


def _decode(image: _ImageBytes) -> Image.Image:
    """Builds the PIL image; a raw tensor is [height, width, 3] uint8, row-major."""
    name = _NAME_BY_FORMAT.get(image.format, "png")
    if name == "raw":
        if image.width <= 0 or image.height <= 0:
            raise ProtocolError(f"raw image {image.index} came without its width and height")
        if len(image.data) != image.width * image.height * 3:
            raise ProtocolError(
                f"raw image {image.index} has {len(image.data)} bytes, "
                f"not {image.height}x{image.width}x3"
            )
        return Image.frombytes("RGB", (image.width, image.height), bytes(image.data))
    try:
        decoded = Image.open(io.BytesIO(bytes(image.data)))
        decoded.load()  # surfaces a corrupt image here rather than at first use
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ProtocolError(f"image {image.index} is not a valid {name}: {exc}") from None
    return decoded


def _make_result(
    request_id: str, images: Sequence[_ImageBytes], finished: gateway_pb2.Finished
) -> GenerateResult:
    formats = [_NAME_BY_FORMAT.get(image.format, "png") for image in images]
    return GenerateResult(
        request_id=request_id,
        images=[_decode(image) for image in images],
        raw=[bytes(image.data) for image in images],
        formats=formats,
        mime_types=[
            im.mime_type or _DEFAULT_MIME[f] for im, f in zip(images, formats, strict=True)
        ],
        seed=finished.seed,
        timings=Timings(
            encode=finished.encode_seconds,
            denoise=finished.denoise_seconds,
            decode=finished.decode_seconds,
            total=finished.total_seconds,
        ),
    )


def _check_indices(indices: Sequence[int], expected: int) -> None:
    if sorted(indices) != list(range(expected)):
        missing = sorted(set(range(expected)) - set(indices))
        raise ProtocolError(
            f"the gateway announced {expected} image(s) but sent indices {sorted(indices)}"
            + (f" (missing {missing})" if missing else "")
        )


class _StreamAssembler:
    """Consumes GenerateEvents of one attempt: progress out, chunks into whole images."""

    def __init__(self, request: gateway_pb2.GenerateRequest) -> None:
        self.request_id = request.request_id
        self.events = 0  # a retry is only safe while this is 0
        self._requested = max(request.num_images, 1)
        self._images: dict[int, _ImageBytes] = {}
        self._finished: gateway_pb2.Finished | None = None

    def feed(self, event: gateway_pb2.GenerateEvent) -> Progress | None:
        self.events += 1
        if event.request_id:
            self.request_id = event.request_id
        kind = event.WhichOneof("event")
        if self._finished is not None and kind is not None:
            raise ProtocolError(f"the gateway sent a {kind} event after Finished")
        if kind == "queued":
            return Progress(kind="queued", position=event.queued.position)
        if kind == "encoded":
            return Progress(kind="encoded", seconds=event.encoded.seconds)
        if kind == "step":
            return Progress(kind="step", step=event.step.step, total=event.step.total)
        if kind == "decoded":
            return Progress(kind="decoded", seconds=event.decoded.seconds)
        if kind == "image":
            self._add_chunk(event.image)
        elif kind == "finished":
            self._finished = event.finished
        return None  # an event kind from a newer gateway is ignored

    def _add_chunk(self, chunk: vae_pb2.ImageChunk) -> None:
        image = self._images.get(chunk.index)
        if image is None:
            if chunk.index < 0 or chunk.offset != 0:
                raise ProtocolError(f"image {chunk.index} started at offset {chunk.offset}, not 0")
            image = self._images[chunk.index] = _ImageBytes(
                index=chunk.index,
                format=chunk.format,
                mime_type=chunk.mime_type,
                width=chunk.width,
                height=chunk.height,
            )
        elif image.complete:
            raise ProtocolError(f"image {chunk.index} got a chunk after its last one")
        elif chunk.offset != len(image.data):
            raise ProtocolError(
                f"image {chunk.index}: chunk at offset {chunk.offset}, expected {len(image.data)}"
            )
        if chunk.total_bytes:
            if image.total_bytes and image.total_bytes != chunk.total_bytes:
                raise ProtocolError(f"image {chunk.index} changed its total_bytes mid-stream")
            image.total_bytes = chunk.total_bytes
        image.data += chunk.data
        if image.total_bytes and len(image.data) > image.total_bytes:
            raise ProtocolError(f"image {chunk.index} exceeds its total_bytes")
        image.complete = chunk.last

    def finish(self) -> GenerateResult:
        if self._finished is None:
            raise ProtocolError("the gateway's stream ended without a Finished event")
        expected = self._finished.num_images or self._requested
        _check_indices(list(self._images), expected)
        images = [self._images[i] for i in range(expected)]
        for image in images:
            if not image.complete:
                raise ProtocolError(f"image {image.index} ended without its last chunk")
            if image.total_bytes and len(image.data) != image.total_bytes:
                raise ProtocolError(
                    f"image {image.index} has {len(image.data)} bytes, "
                    f"the gateway announced {image.total_bytes}"
                )
        return _make_result(self.request_id, images, self._finished)


def _unary_result(
    request: gateway_pb2.GenerateRequest, response: gateway_pb2.GenerateResponse
) -> GenerateResult:
    expected = response.finished.num_images or max(request.num_images, 1)
    _check_indices([image.index for image in response.images], expected)
    images = [
        _ImageBytes(
            index=im.index,
            format=im.format,
            mime_type=im.mime_type,
            width=im.width,
            height=im.height,
            data=bytearray(im.data),
            complete=True,
        )
        for im in sorted(response.images, key=lambda im: im.index)
    ]
    return _make_result(response.request_id or request.request_id, images, response.finished)


def _models(response: gateway_pb2.ListModelsResponse) -> ModelList:
    names = [f.name for f in fields(ModelInfo)]
    return ModelList(
        models=[ModelInfo(**{n: getattr(m, n) for n in names}) for m in response.models],
        default_model=response.default_model,
    )


def _params(scope: dict[str, Any]) -> dict[str, Any]:
    """The request fields among a generate method's locals (keeps four signatures in sync)."""
    skip = {"self", "on_progress", "timeout"}
    return {k: v for k, v in scope.items() if k not in skip}
