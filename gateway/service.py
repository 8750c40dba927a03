"""The gateway's gRPC servicer: protobuf in, domain calls, protobuf out.

Thin on purpose: checking a request is `plan.make_plan`, admitting it is
`core.Gateway.admit`, running it is `run.RequestRun`; errors become status codes in
one place (`aio_server.rpc_errors`). Health and ListModels never wait behind work:
every request is a coroutine on one event loop, not a thread from a bounded pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc._cython import cygrpc

from ditmesh.common.aio_server import rpc_errors
from ditmesh.common.errors import DitmeshError, InvalidArgument
from ditmesh.gateway.auth import ApiKeys, check_grpc
from ditmesh.gateway.core import Gateway
from ditmesh.gateway.plan import make_plan
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"

# What a write to a server stream raises once the stream is gone (gRPC names no public
# class for it).
WRITE_FAILED = cygrpc.ExecuteBatchError


def _metadata_request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return str(value)
    return ""


class GatewayService(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, gateway: Gateway, keys: ApiKeys | None = None) -> None:
        self.gateway = gateway
        self.keys = keys
        """API keys every call must carry (gateway/auth.py); None: no check."""

    async def _run(self, request, context):
        check_grpc(self.keys, context)
        gw = self.gateway
        plan = make_plan(
            request,
            gw.models,
            gw.default_model,
            gw.config.limits,
            _metadata_request_id(context),
        )
        run = gw.admit(plan, gw.deadline_of(context.time_remaining()))
        status = "INTERNAL"
        try:
            async for event in run.events():
                yield event
            status = "OK"
        except DitmeshError as exc:
            status = exc.code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED by the client"
            raise
        finally:
            gw.finish(run, status)

    @rpc_errors("gateway")
    async def Generate(self, request, context):
        # Written with context.write rather than yielded: a client that leaves between two
        # events fails the write here, where it is known for what it is, instead of inside
        # gRPC's own loop (which logs it as an error).
        async with contextlib.aclosing(self._run(request, context)) as events:
            async for event in events:
                try:
                    await context.write(event)
                except WRITE_FAILED:
                    # The stream is closed under us: the client cancelled, its deadline
                    # passed or its connection dropped (the context's flags lag behind).
                    raise asyncio.CancelledError from None

    @rpc_errors("gateway")
    async def GenerateUnary(self, request, context):
        if request.partial_images:
            # Its one reply has no place for them: refused rather than decoded and dropped.
            raise InvalidArgument(
                "partial_images needs the streaming Generate call; GenerateUnary returns "
                "only the finished images"
            )
        images: dict[int, gateway_pb2.Image] = {}
        finished = None
        rid = ""
        async with contextlib.aclosing(self._run(request, context)) as events:
            async for ev in events:
                rid = ev.request_id
                kind = ev.WhichOneof("event")
                if kind == "image":
                    _add_chunk(images, ev.image)
                elif kind == "finished":
                    finished = ev.finished
        return gateway_pb2.GenerateResponse(
            request_id=rid, images=[images[i] for i in sorted(images)], finished=finished
        )

    @rpc_errors("gateway")
    async def ListModels(self, request, context):
        check_grpc(self.keys, context)
        gw = self.gateway
        return gateway_pb2.ListModelsResponse(
            models=[
                gateway_pb2.ModelInfo(
                    name=m.name,
                    family=m.family.name,
                    default_height=m.family.default_hw[0],
                    default_width=m.family.default_hw[1],
                    default_steps=m.default_steps,
                    default_guidance=m.default_guidance,
                    size_multiple=m.size_multiple,
                    max_prompt_tokens=m.max_prompt_tokens,
                    default_num_frames=m.family.default_num_frames,
                    max_num_frames=m.family.max_num_frames,
                    frame_multiple=m.frame_multiple,
                    default_fps=m.family.default_fps,
                )
                for m in gw.models.values()
            ],
            default_model=gw.default_model,
        )


def _add_chunk(images: dict[int, gateway_pb2.Image], c) -> None:
    img = images.get(c.index)
    if img is None:
        img = images[c.index] = gateway_pb2.Image(
            index=c.index,
            format=c.format,
            mime_type=c.mime_type,
            width=c.width,
            height=c.height,
            num_frames=c.num_frames,
            fps=c.fps,
        )
    img.data += c.data
