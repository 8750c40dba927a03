"""The asyncio client of the ditmesh gateway: `AsyncClient`, with the API of `Client`.

It shares everything but the driving of calls with the blocking client: the
parameters (`ditmesh.client.params`), the stream assembly (`wire`), the
deadline, retry policy and readiness probe (`base`) and the errors (`errors`).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from ditmesh.client.base import HEALTH_REQUEST, ClientBase, ReadyWait
from ditmesh.client.errors import map_rpc_error
from ditmesh.client.params import GenerateParams, request_of
from ditmesh.client.types import GenerateResult, ModelList, ProgressCallback
from ditmesh.client.wire import StreamAssembler, model_list, unary_result
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

__all__ = ["AsyncClient"]


class AsyncClient(ClientBase):
    """asyncio client with the API of `Client`; on_progress may be sync or async.

    The channel is made on first use so the client can be built outside the
    event loop that later drives it.
    """

    def _open(self) -> None:
        self._channel: grpc.aio.Channel | None = None
        self._stub: gateway_pb2_grpc.GatewayStub | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()

    def _gateway(self) -> gateway_pb2_grpc.GatewayStub:
        if self._stub is None:
            self._channel = self.open_aio_channel()
            self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        return self._stub

    async def generate(
        self,
        prompt: str,
        params: GenerateParams | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        **fields: Any,
    ) -> GenerateResult:
        """See `Client.generate`; an on_progress that returns an awaitable is awaited."""
        request = request_of(prompt, params, fields, caller="generate")
        deadline = self.deadline(timeout)
        metadata = (("x-request-id", request.request_id),)
        for attempt in itertools.count():
            assembler = StreamAssembler(request)
            call = None
            try:
                call = self._gateway().Generate(
                    request, timeout=deadline.remaining(), metadata=metadata
                )
                async for event in call:
                    progress = assembler.feed(event)
                    if progress is not None and on_progress is not None:
                        outcome = on_progress(progress)
                        if inspect.isawaitable(outcome):
                            await outcome
                return assembler.finish()
            except grpc.RpcError as err:
                delay = self.retry.delay(err, attempt, assembler.events, deadline)
                if delay is None:
                    raise map_rpc_error(err) from None
            finally:
                if call is not None:
                    call.cancel()
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def generate_unary(
        self,
        prompt: str,
        params: GenerateParams | None = None,
        *,
        timeout: float | None = None,
        **fields: Any,
    ) -> GenerateResult:
        """See `Client.generate_unary`."""
        request = request_of(prompt, params, fields, caller="generate_unary", streaming=False)
        metadata = (("x-request-id", request.request_id),)
        response = await self._unary("GenerateUnary", request, timeout, metadata)
        return unary_result(request, response)

    async def list_models(self, *, timeout: float | None = None) -> ModelList:
        return model_list(await self._unary("ListModels", gateway_pb2.ListModelsRequest(), timeout))

    async def wait_ready(self, timeout: float | None = 30.0) -> None:
        """See `Client.wait_ready`."""
        wait = ReadyWait(timeout)
        self._gateway()
        stub = health_pb2_grpc.HealthStub(self._channel)
        while (probe := wait.probe_timeout()) is not None:
            try:
                reply = await stub.Check(HEALTH_REQUEST, timeout=probe, wait_for_ready=True)
                if wait.serving(reply):
                    return
            except grpc.RpcError as err:
                wait.failed(err)
            await asyncio.sleep(wait.pause())
        raise wait.expired()

    async def _unary(
        self, method: str, request: Any, timeout: float | None, metadata: Any = ()
    ) -> Any:
        deadline = self.deadline(timeout)
        for attempt in itertools.count():
            try:
                rpc = getattr(self._gateway(), method)
                return await rpc(request, timeout=deadline.remaining(), metadata=metadata)
            except grpc.RpcError as err:
                delay = self.retry.delay(err, attempt, 0, deadline)
                if delay is None:
                    raise map_rpc_error(err) from None
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")
