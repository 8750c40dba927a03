"""The wire protocol of the client's side: Generate's event stream and unary answer into results.

`StreamAssembler` consumes the events of one streaming attempt, hands progress
back to the caller and puts chunked images together, checking the order rules of
gateway.proto (offsets contiguous, a last chunk, total_bytes kept, nothing after
Finished); `unary_result` and `model_list` turn the unary answers into the SDK's
types; an item with `num_frames` set is a video (ditmesh.client.video), its bytes
kept as they came and its frames decoded when the caller reads them. No channel,
retry or deadline here: the clients drive the calls.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from PIL import Image

from ditmesh.client.errors import ProtocolError
from ditmesh.client.types import (
    DEFAULT_MIME,
    NAME_BY_FORMAT,
    GenerateResult,
    ModelInfo,
    ModelList,
    PartialImage,
    Progress,
    StageTimings,
    Timings,
)
from ditmesh.client.video import Video
from ditmesh.v1 import gateway_pb2, vae_pb2

__all__ = ["StreamAssembler", "model_list", "unary_result"]


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
    num_frames: int = 0
    """Frames of a video (0: a still image)."""
    fps: int = 0

    def video(self) -> Video:
        name = NAME_BY_FORMAT.get(self.format, "raw")
        return Video(
            data=bytes(self.data),
            format=name,
            mime_type=self.mime_type or DEFAULT_MIME[name],
            width=self.width,
            height=self.height,
            num_frames=self.num_frames,
            fps=self.fps,
        )


def _decode(image: _ImageBytes) -> Image.Image:
    """Builds the PIL image; a raw tensor is [height, width, 3] uint8, row-major."""
    name = NAME_BY_FORMAT.get(image.format, "png")
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


def _whole(im: gateway_pb2.Image) -> _ImageBytes:
    return _ImageBytes(
        index=im.index,
        format=im.format,
        mime_type=im.mime_type,
        width=im.width,
        height=im.height,
        data=bytearray(im.data),
        complete=True,
        num_frames=im.num_frames,
        fps=im.fps,
    )


def _partial_image(part: gateway_pb2.PartialImage) -> PartialImage:
    """A preview, whole in one event (previews are not chunked)."""
    whole = _whole(part.image)
    video = whole.video() if whole.num_frames else None
    fmt = NAME_BY_FORMAT.get(whole.format, "png")
    return PartialImage(
        index=part.partial_image_index,
        image_index=whole.index,
        image=None if video else _decode(whole),
        data=bytes(whole.data),
        format=fmt,
        mime_type=whole.mime_type or DEFAULT_MIME[fmt],
        video=video,
    )


def _make_result(
    request_id: str, items: Sequence[_ImageBytes], finished: gateway_pb2.Finished
) -> GenerateResult:
    videos = [item.video() for item in items if item.num_frames]
    if videos and len(videos) != len(items):
        raise ProtocolError("the gateway sent videos and still images for one request")
    images = [] if videos else list(items)
    formats = [NAME_BY_FORMAT.get(image.format, "png") for image in images]
    return GenerateResult(
        request_id=request_id,
        images=[_decode(image) for image in images],
        raw=[bytes(image.data) for image in images],
        formats=formats,
        mime_types=[im.mime_type or DEFAULT_MIME[f] for im, f in zip(images, formats, strict=True)],
        videos=videos,
        seed=finished.seed,
        timings=Timings(
            encode=finished.encode_seconds,
            denoise=finished.denoise_seconds,
            decode=finished.decode_seconds,
            total=finished.total_seconds,
            stages=tuple(
                StageTimings(
                    stage=s.stage,
                    queue=s.queue_seconds,
                    work=s.work_seconds,
                    transfer=s.transfer_seconds,
                    image_encode=s.image_encode_seconds,
                    attempts=s.attempts,
                    replica=s.replica,
                )
                for s in finished.stages
            ),
            cached_steps=finished.cached_steps,
            steps_total=finished.steps_total,
            attention_computed=finished.attention_computed,
            speedups=tuple(finished.speedups),
        ),
    )


def _check_indices(indices: Sequence[int], expected: int) -> None:
    if sorted(indices) != list(range(expected)):
        missing = sorted(set(range(expected)) - set(indices))
        raise ProtocolError(
            f"the gateway announced {expected} image(s) but sent indices {sorted(indices)}"
            + (f" (missing {missing})" if missing else "")
        )


class StreamAssembler:
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
        if kind == "frames":
            f = event.frames
            return Progress(
                kind="frames",
                stage=f.stage,
                video_index=f.video_index,
                frames_done=f.frames_done,
                frames_total=f.frames_total,
            )
        if kind == "decoded":
            return Progress(kind="decoded", seconds=event.decoded.seconds)
        if kind == "partial_image":
            part = event.partial_image
            return Progress(
                kind="partial_image",
                step=part.step,
                total=part.total,
                partial_image=_partial_image(part),
            )
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
                num_frames=chunk.num_frames,
                fps=chunk.fps,
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


def unary_result(
    request: gateway_pb2.GenerateRequest, response: gateway_pb2.GenerateResponse
) -> GenerateResult:
    expected = response.finished.num_images or max(request.num_images, 1)
    _check_indices([image.index for image in response.images], expected)
    images = [_whole(im) for im in sorted(response.images, key=lambda im: im.index)]
    return _make_result(response.request_id or request.request_id, images, response.finished)


def model_list(response: gateway_pb2.ListModelsResponse) -> ModelList:
    names = [f.name for f in fields(ModelInfo)]
    return ModelList(
        models=[ModelInfo(**{n: getattr(m, n) for n in names}) for m in response.models],
        default_model=response.default_model,
    )
