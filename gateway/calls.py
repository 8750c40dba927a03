"""One call on one replica of each stage: encode, denoise, decode.

Each function speaks one stage's protocol and nothing more (a stage's progress, steps
or a video's decoded frames, comes out as it arrives): retries, queues and
events for the client are the request run's business (`ditmesh.gateway.run`).
Every tensor answer is read by the codec's one stream reader. A call can be given
up on while it runs (`Attempt.abandon`): by the health checks when its replica
freezes, or by the progress watchdog when the replica stays silent for longer than
a stated multiple of the time it should take; it then ends in `ReplicaGaveUp`,
which the run treats like UNAVAILABLE (retry elsewhere, replica marked down).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import torch

from ditmesh.common import codec, timings, tracing
from ditmesh.common.errors import DitmeshError
from ditmesh.common.server import REQUEST_ID_KEY
from ditmesh.gateway.plan import RequestPlan
from ditmesh.gateway.replicas import Replica
from ditmesh.gateway.settings import WatchdogPolicy
from ditmesh.gateway.timings import CallTime
from ditmesh.v1 import (
    denoiser_pb2,
    denoiser_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
)


@dataclass(slots=True)
class Done:
    """The value a stage call ends with, after any progress it reported."""

    value: object


@dataclass(slots=True)
class StepDone:
    step: int
    total: int
    cached_steps: int = 0
    """Step caching: steps the denoiser skipped so far in this call."""
    attention_computed: float = 0.0
    """DiTFastAttn: the share of full attention computed so far (0: no plan served)."""
    speedups: tuple[str, ...] = ()
    """The speed-ups the denoiser runs this request with."""


@dataclass(slots=True)
class FramesDone:
    """The VAE stage's progress on one video: frames decoded so far of its total."""

    video_index: int
    frames_done: int
    frames_total: int


@dataclass(slots=True)
class Preview:
    """The denoiser's latents after `step`, to decode into partial images."""

    step: int
    total: int
    latents: torch.Tensor


class ReplicaGaveUp(Exception):
    """The gateway stopped waiting for a replica (frozen or silent); retry elsewhere."""


class Attempt:
    """One call on one replica, registered with the replica while it runs.

    It also times the call (`time`: its seconds here and what the stage reported in
    its trailing metadata, for gateway/timings.py) and, when tracing is on, is the
    call's CLIENT span, whose context the call carries to the stage.
    """

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.call = None
        self.abandoned: str | None = None
        self.time = CallTime()
        self._started = 0.0
        self._span: tracing.ClientSpan | None = None

    def abandon(self, reason: str) -> None:
        if self.abandoned is None:
            self.abandoned = reason
            if self.call is not None:
                self.call.cancel()

    def metadata(self, plan: RequestPlan, method: str) -> list[tuple[str, str]]:
        """What the call sends besides its messages; made just before it starts, so the
        call's time and span start here."""
        self._span = tracing.client_span(method, self.replica.address, plan.request_id)
        self._started = time.perf_counter()
        span = self._span.metadata if self._span is not None else []
        return [(REQUEST_ID_KEY, plan.request_id), *span]

    def __enter__(self) -> Attempt:
        self.replica.calls.add(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.replica.calls.discard(self)
        if self._span is not None:
            self._span.end(exc)

    async def read(self, limit: float | None):
        """The call's next message (grpc.aio.EOF at the end), given up on after `limit` s."""
        try:
            if limit is None:
                msg = await self.call.read()
            else:
                msg = await asyncio.wait_for(self.call.read(), limit)
        except TimeoutError:
            self.abandon(f"sent nothing for {limit:.1f} s (progress watchdog)")
            raise ReplicaGaveUp(f"{self.replica.address} {self.abandoned}") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.abandoned is not None and task is not None and not task.cancelling():
                raise ReplicaGaveUp(f"{self.replica.address}: {self.abandoned}") from None
            raise
        if msg is grpc.aio.EOF:
            self.time.seconds = time.perf_counter() - self._started
            self.time.reported = timings.parse(await self.call.trailing_metadata())
        return msg


def _model_on(replica, plan: RequestPlan) -> str:
    """The name the replica knows the plan's model by: a replica shared by several models
    (same components, gateway/catalog.py) was started under one of their names."""
    return replica.model or plan.model.name


async def encode(
    plan: RequestPlan, attempt: Attempt, timeout: float, limit: float | None
) -> dict[str, torch.Tensor]:
    stub = encoder_pb2_grpc.EncoderStub(attempt.replica.channel)
    req = encoder_pb2.EncodeRequest(
        request_id=plan.request_id,
        model=_model_on(attempt.replica, plan),
        prompt=plan.prompt,
        negative_prompt=plan.negative_prompt,
        encode_negative=plan.encode_negative,
    )
    attempt.call = stub.Encode(
        req, timeout=timeout, metadata=attempt.metadata(plan, "/ditmesh.v1.Encoder/Encode")
    )
    stream = codec.TensorStream("the encoder stage's answer")
    while (msg := await attempt.read(limit)) is not grpc.aio.EOF:
        if stream.feed(msg) is not None:
            raise DitmeshError("the encoder stage sent an unknown message")
    return _tensors(stream)


class StepWatch:
    """How long a denoiser may stay silent: a multiple of its slowest step so far."""

    def __init__(self, policy: WatchdogPolicy, expected_first: float) -> None:
        self.policy = policy
        self._limit = policy.limit(expected_first)
        self._last = time.monotonic()
        self._slowest = 0.0

    def limit(self) -> float | None:
        return self._limit

    def tick(self) -> None:
        now = time.monotonic()
        self._slowest = max(self._slowest, now - self._last)
        self._last = now
        self._limit = self.policy.limit(self._slowest)


async def denoise(
    plan: RequestPlan,
    cond: dict[str, torch.Tensor],
    attempt: Attempt,
    timeout: float,
    watch: StepWatch,
) -> AsyncIterator[StepDone | Done]:
    """Yields a StepDone per step (and a Preview after each of the plan's preview steps),
    then Done(latents)."""
    params = denoiser_pb2.DenoiseParams(
        request_id=plan.request_id,
        model=_model_on(attempt.replica, plan),
        height=plan.height,
        width=plan.width,
        steps=plan.steps,
        guidance=plan.guidance,
        true_cfg_scale=plan.true_cfg_scale,
        seed=plan.seed,
        num_images=plan.num_images,
        preview_steps=plan.preview_steps,
        num_frames=plan.num_frames,
        cache_threshold=plan.cache_threshold,
    )
    stub = denoiser_pb2_grpc.DenoiserStub(attempt.replica.channel)
    requests = codec.params_and_tensors_stream(denoiser_pb2.DenoiseRequest, params, cond)
    attempt.call = stub.Denoise(
        requests, timeout=timeout, metadata=attempt.metadata(plan, "/ditmesh.v1.Denoiser/Denoise")
    )
    stream = codec.TensorStream("the denoiser stage's answer")
    while (msg := await attempt.read(watch.limit())) is not grpc.aio.EOF:
        kind = stream.feed(msg)
        if kind == "step":
            watch.tick()
            yield StepDone(
                msg.step.step,
                msg.step.total,
                msg.step.cached_steps,
                msg.step.attention_computed,
                tuple(msg.step.speedups),
            )
        elif kind == "preview":
            p = msg.preview
            yield Preview(p.step, p.total, codec.from_proto(p.latents))
        elif kind is not None:
            raise DitmeshError(f"the denoiser stage sent an unknown message ({kind})")
    latents = _tensors(stream).get("latents")
    if latents is None:
        raise DitmeshError("the denoiser stage answered without latents")
    yield Done(latents)


async def decode(
    plan: RequestPlan,
    latents: torch.Tensor,
    attempt: Attempt,
    timeout: float,
    limit: float | None,
    *,
    report_frames: bool = False,
) -> AsyncIterator[FramesDone | Done]:
    """Yields a FramesDone as the VAE decodes each piece of a video (when
    `report_frames`, for a video model), then Done(the images' chunks)."""
    params = vae_pb2.DecodeParams(
        request_id=plan.request_id,
        model=_model_on(attempt.replica, plan),
        height=plan.height,
        width=plan.width,
        output_format=plan.output_format,
        quality=plan.quality,
        num_frames=plan.num_frames,
        fps=plan.fps,
        report_frames=report_frames and plan.num_frames > 0,
    )
    stub = vae_pb2_grpc.VaeStub(attempt.replica.channel)
    requests = codec.params_and_tensors_stream(vae_pb2.DecodeRequest, params, {"latents": latents})
    attempt.call = stub.Decode(
        requests, timeout=timeout, metadata=attempt.metadata(plan, "/ditmesh.v1.Vae/Decode")
    )
    # Images are held until the stage answers whole, so a retry cannot send the client
    # a second copy of an image, and a video that fails half-way is never sent.
    chunks = []
    while (msg := await attempt.read(limit)) is not grpc.aio.EOF:
        if msg.HasField("progress"):
            p = msg.progress
            yield FramesDone(p.video_index, p.frames_done, p.frames_total)
        else:
            chunks.append(msg)
    _check_whole(chunks, plan.num_images)
    yield Done(chunks)


def _check_whole(chunks: list[vae_pb2.ImageChunk], num_images: int) -> None:
    """Every image of the answer ended with its last chunk and has all its bytes."""
    finished = {c.index for c in chunks if c.last}
    if finished != set(range(num_images)):
        raise DitmeshError(f"the vae stage returned images {sorted(finished)} of {num_images}")
    sizes: dict[int, int] = {}
    for c in chunks:
        sizes[c.index] = sizes.get(c.index, 0) + len(c.data)
    for c in chunks:
        if c.total_bytes and sizes[c.index] != c.total_bytes:
            raise DitmeshError(
                f"the vae stage sent {sizes[c.index]} bytes of image {c.index}, "
                f"announced {c.total_bytes}"
            )


def _tensors(stream: codec.TensorStream) -> dict[str, torch.Tensor]:
    try:
        return stream.tensors()
    except codec.StreamEndedEarly as exc:
        raise DitmeshError(str(exc)) from None
