"""The gateway: public API, validation, and the encoder -> denoiser -> vae run of a request.

Each request moves through one queue per stage, so stages work on different
requests at once (the VAE of one overlaps the denoising of the next). A stage
call that fails with UNAVAILABLE is retried on another replica (or the same one
after a pause); the client sees one result or one error, never two.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from ditmesh.common import codec
from ditmesh.common.errors import (
    Cancelled,
    DeadlineExceeded,
    DitmeshError,
    FailedPrecondition,
    InvalidArgument,
    from_rpc_error,
)
from ditmesh.common.limits import (
    DEFAULT_LIMITS,
    Limits,
    check_guidance,
    check_num_images,
    check_seed,
    check_size,
    check_steps,
)
from ditmesh.common.models import Family, ModelRef, check_model_name
from ditmesh.common.server import REQUEST_ID_KEY, request_id_of
from ditmesh.gateway.stages import StagePool, unavailable
from ditmesh.v1 import (
    denoiser_pb2,
    denoiser_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
)

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 20_000
DEFAULT_TIMEOUT_S = 600.0


@dataclass(kw_only=True, slots=True)
class GatewayConfig:
    attempts: int = 3
    """Tries per stage call when a replica answers UNAVAILABLE."""
    retry_backoff_s: float = 0.2
    default_timeout_s: float = DEFAULT_TIMEOUT_S
    """Deadline of a request whose client set none."""
    limits: Limits = DEFAULT_LIMITS


@dataclass(kw_only=True, slots=True)
class Plan:
    """A validated request with every default filled in."""

    request_id: str
    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance: float
    true_cfg_scale: float
    seed: int
    num_images: int
    output_format: int
    quality: int
    family: Family
    """Whose CFG rule decides whether the negative prompt is encoded."""

    @property
    def encode_negative(self) -> bool:
        # SD3/PixArt guide against the empty prompt when none is given, so the
        # negative branch is needed even then; Flux only with a negative prompt.
        return self.family.uses_cfg(
            guidance=self.guidance,
            true_cfg_scale=self.true_cfg_scale,
            has_negative=bool(self.negative_prompt),
        )


class _Call:
    """The stage call in progress, so a client cancel can cancel it downstream."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._call = None
        self.cancelled = False

    def set(self, call) -> None:
        with self._lock:
            self._call = call
            if self.cancelled:
                call.cancel()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._call is not None:
                self._call.cancel()


class GatewayService(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        model: ModelRef,
        encoder: StagePool,
        denoiser: StagePool,
        vae: StagePool,
        config: GatewayConfig | None = None,
    ) -> None:
        self.model = model
        self.encoder = encoder
        self.denoiser = denoiser
        self.vae = vae
        self.config = config or GatewayConfig()
        self._active: set[str] = set()
        self._active_lock = threading.Lock()

    # -- validation ---------------------------------------------------------------------------

    def plan(self, req: gateway_pb2.GenerateRequest, context: grpc.ServicerContext) -> Plan:
        m = self.model
        lim = self.config.limits
        check_model_name(req.model, m)
        if not req.prompt.strip():
            raise InvalidArgument("the prompt is empty")
        for what, text in (("prompt", req.prompt), ("negative prompt", req.negative_prompt)):
            if len(text) > MAX_PROMPT_CHARS:
                raise InvalidArgument(
                    f"the {what} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}"
                )
        height = req.height or m.family.default_size
        width = req.width or m.family.default_size
        check_size(m, height, width, lim)
        steps = req.steps or m.default_steps
        check_steps(steps, lim)
        guidance = req.guidance if req.HasField("guidance") else m.default_guidance
        check_guidance(guidance, "guidance", lim)
        true_cfg = req.true_cfg_scale if req.HasField("true_cfg_scale") else 1.0
        check_guidance(true_cfg, "true_cfg_scale", lim)
        seed = req.seed if req.HasField("seed") else random.randrange(2**31)
        check_seed(seed)
        n = req.num_images or 1
        check_num_images(n, lim)
        if req.output_format not in vae_pb2.OutputFormat.values():
            raise InvalidArgument(f"unknown output format {req.output_format}")
        if req.quality and not 1 <= req.quality <= 100:
            raise InvalidArgument(f"quality must be between 1 and 100; got {req.quality}")
        rid = req.request_id or request_id_of(context) or uuid.uuid4().hex
        return Plan(
            request_id=rid,
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            height=height,
            width=width,
            steps=steps,
            guidance=guidance,
            true_cfg_scale=true_cfg,
            seed=seed,
            num_images=n,
            output_format=req.output_format or vae_pb2.OUTPUT_FORMAT_PNG,
            quality=req.quality,
            family=m.family,
        )

    # -- stage calls with retries ---------------------------------------------------------------

    def _with_retries(
        self, pool: StagePool, deadline: float, call: _Call, fn: Callable
    ) -> Iterator:
        """Runs generator `fn(replica, timeout)` on a replica; retries UNAVAILABLE elsewhere."""
        exclude: set[int] = set()
        last_detail = "no replica answered"
        for attempt in range(self.config.attempts):
            if call.cancelled:
                raise Cancelled("the request was cancelled")
            if len(exclude) >= len(pool.replicas):
                exclude.clear()
            lease = pool.acquire(deadline, exclude)
            ok = False
            try:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise DeadlineExceeded(
                        f"the deadline passed before the {pool.name} stage started"
                    )
                result = yield from fn(lease.replica, timeout)
                ok = True
                return result
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.CANCELLED and call.cancelled:
                    raise Cancelled("the request was cancelled") from None
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise from_rpc_error(err, pool.name) from None
                last_detail = err.details() or "connection failed"
                log.warning(
                    "%s replica %s unavailable (attempt %d): %s",
                    pool.name,
                    lease.replica.address,
                    attempt + 1,
                    last_detail,
                )
                pool.mark_down(lease.replica)
                exclude.add(id(lease.replica))
            finally:
                lease.release(ok)
            time.sleep(self.config.retry_backoff_s * (2**attempt))
        raise unavailable(pool.name, last_detail)

    def _encode(self, plan: Plan, deadline: float, call: _Call):
        def fn(replica, timeout):
            stub = encoder_pb2_grpc.EncoderStub(replica.channel)
            req = encoder_pb2.EncodeRequest(
                request_id=plan.request_id,
                model=self.model.name,
                prompt=plan.prompt,
                negative_prompt=plan.negative_prompt,
                encode_negative=plan.encode_negative,
            )
            stream = stub.Encode(req, timeout=timeout, metadata=[(REQUEST_ID_KEY, plan.request_id)])
            call.set(stream)
            asm = codec.TensorAssembler()
            done = None
            for msg in stream:
                if msg.WhichOneof("payload") == "chunk":
                    asm.add(msg.chunk)
                else:
                    done = msg.done
            if done is None:
                raise DitmeshError("the encoder stage ended its answer early")
            return asm.finish(done)
            yield  # pragma: no cover - makes this a generator for _with_retries

        return (yield from self._with_retries(self.encoder, deadline, call, fn))

    def _denoise(self, plan: Plan, cond: dict, deadline: float, call: _Call):
        params = denoiser_pb2.DenoiseParams(
            request_id=plan.request_id,
            model=self.model.name,
            height=plan.height,
            width=plan.width,
            steps=plan.steps,
            guidance=plan.guidance,
            true_cfg_scale=plan.true_cfg_scale,
            seed=plan.seed,
            num_images=plan.num_images,
        )

        def requests():
            return codec.params_and_tensors_stream(denoiser_pb2.DenoiseRequest, params, cond)

        def fn(replica, timeout):
            stub = denoiser_pb2_grpc.DenoiserStub(replica.channel)
            stream = stub.Denoise(
                requests(), timeout=timeout, metadata=[(REQUEST_ID_KEY, plan.request_id)]
            )
            call.set(stream)
            asm = codec.TensorAssembler()
            done = None
            for msg in stream:
                kind = msg.WhichOneof("payload")
                if kind == "step":
                    yield gateway_pb2.GenerateEvent(
                        request_id=plan.request_id,
                        step=gateway_pb2.Step(step=msg.step.step, total=msg.step.total),
                    )
                elif kind == "chunk":
                    asm.add(msg.chunk)
                else:
                    done = msg.done
            if done is None:
                raise DitmeshError("the denoiser stage ended its answer early")
            return asm.finish(done)["latents"]

        return (yield from self._with_retries(self.denoiser, deadline, call, fn))

    def _decode(self, plan: Plan, latents, deadline: float, call: _Call):
        tensors = {"latents": latents}

        params = vae_pb2.DecodeParams(
            request_id=plan.request_id,
            model=self.model.name,
            height=plan.height,
            width=plan.width,
            output_format=plan.output_format,
            quality=plan.quality,
        )

        def requests():
            return codec.params_and_tensors_stream(vae_pb2.DecodeRequest, params, tensors)

        def fn(replica, timeout):
            stub = vae_pb2_grpc.VaeStub(replica.channel)
            stream = stub.Decode(
                requests(), timeout=timeout, metadata=[(REQUEST_ID_KEY, plan.request_id)]
            )
            call.set(stream)
            # Images are held until the stage answers whole, so a retry cannot send
            # the client a second copy of an image.
            chunks = list(stream)
            finished = {c.index for c in chunks if c.last}
            if finished != set(range(plan.num_images)):
                raise DitmeshError(
                    f"the vae stage returned images {sorted(finished)} of {plan.num_images}"
                )
            return chunks
            yield  # pragma: no cover

        return (yield from self._with_retries(self.vae, deadline, call, fn))

    # -- the request --------------------------------------------------------------------------

    def run(self, plan: Plan, context: grpc.ServicerContext) -> Iterator[gateway_pb2.GenerateEvent]:
        remaining = context.time_remaining()
        budget = self.config.default_timeout_s if remaining is None else min(remaining, 24 * 3600.0)
        deadline = time.monotonic() + budget
        call = _Call()
        context.add_callback(call.cancel)
        rid = plan.request_id

        def event(**kw) -> gateway_pb2.GenerateEvent:
            return gateway_pb2.GenerateEvent(request_id=rid, **kw)

        t0 = time.monotonic()
        yield event(queued=gateway_pb2.Queued(position=self.encoder.position_of_next()))
        cond = yield from self._encode(plan, deadline, call)
        t1 = time.monotonic()
        yield event(encoded=gateway_pb2.Encoded(seconds=t1 - t0))
        latents = yield from self._denoise(plan, cond, deadline, call)
        t2 = time.monotonic()
        chunks = yield from self._decode(plan, latents, deadline, call)
        t3 = time.monotonic()
        yield event(decoded=gateway_pb2.Decoded(seconds=t3 - t2))
        for chunk in chunks:
            yield event(image=chunk)
        yield event(
            finished=gateway_pb2.Finished(
                seed=plan.seed,
                num_images=plan.num_images,
                encode_seconds=t1 - t0,
                denoise_seconds=t2 - t1,
                decode_seconds=t3 - t2,
                total_seconds=t3 - t0,
            )
        )

    def _admit(self, plan: Plan) -> None:
        with self._active_lock:
            if plan.request_id in self._active:
                raise FailedPrecondition(f"request {plan.request_id} is already running")
            self._active.add(plan.request_id)

    def _leave(self, plan: Plan) -> None:
        with self._active_lock:
            self._active.discard(plan.request_id)

    def Generate(self, request, context):
        plan = self.plan(request, context)
        self._admit(plan)
        try:
            yield from self.run(plan, context)
        finally:
            self._leave(plan)

    def GenerateUnary(self, request, context):
        plan = self.plan(request, context)
        self._admit(plan)
        try:
            images: dict[int, gateway_pb2.Image] = {}
            finished = None
            for ev in self.run(plan, context):
                kind = ev.WhichOneof("event")
                if kind == "image":
                    c = ev.image
                    img = images.get(c.index)
                    if img is None:
                        img = images[c.index] = gateway_pb2.Image(
                            index=c.index,
                            format=c.format,
                            mime_type=c.mime_type,
                            width=c.width,
                            height=c.height,
                        )
                    img.data += c.data
                elif kind == "finished":
                    finished = ev.finished
            return gateway_pb2.GenerateResponse(
                request_id=plan.request_id,
                images=[images[i] for i in sorted(images)],
                finished=finished,
            )
        finally:
            self._leave(plan)

    def ListModels(self, request, context):
        m = self.model
        return gateway_pb2.ListModelsResponse(
            models=[
                gateway_pb2.ModelInfo(
                    name=m.name,
                    family=m.family.name,
                    default_height=m.family.default_size,
                    default_width=m.family.default_size,
                    default_steps=m.default_steps,
                    default_guidance=m.default_guidance,
                    size_multiple=m.size_multiple,
                    max_prompt_tokens=m.max_prompt_tokens,
                )
            ],
            default_model=m.name,
        )
