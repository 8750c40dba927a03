"""The asyncio client of the ditmesh gateway: `AsyncClient`, with the API of `Client`."""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ditmesh.client.results import (
    GenerateResult,
    ModelList,
    OutputFormat,
    Progress,
    _build_request,
    _map_rpc_error,
    _models,
    _params,
    _StreamAssembler,
    _unary_result,
)
from ditmesh.client.sdk import (
    _HEALTH_REQUEST,
    _SERVING,
    _ClientBase,
    _Deadline,
    _not_ready,
    _probe_pause,
    _probe_timeout,
)
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

# The callback may return an awaitable, which the async client awaits.
AsyncProgressCallback = Callable[[Progress], Any]


class AsyncClient(_ClientBase):
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
            self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
            self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        return self._stub

    async def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        height: int = 0,
        width: int = 0,
        steps: int = 0,
        guidance: float | None = None,
        true_cfg_scale: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        output_format: OutputFormat = "png",
        quality: int = 0,
        model: str = "",
        request_id: str | None = None,
        on_progress: AsyncProgressCallback | None = None,
        timeout: float | None = None,
    ) -> GenerateResult:
        """See `Client.generate`."""
        request = _build_request(**_params(locals()))
        deadline = self._deadline(timeout)
        metadata = (("x-request-id", request.request_id),)
        for attempt in itertools.count():
            assembler = _StreamAssembler(request)
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
                delay = self._retry_delay(err, attempt, assembler.events, deadline)
                if delay is None:
                    raise _map_rpc_error(err) from None
            finally:
                if call is not None:
                    call.cancel()
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def generate_unary(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        height: int = 0,
        width: int = 0,
        steps: int = 0,
        guidance: float | None = None,
        true_cfg_scale: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        output_format: OutputFormat = "png",
        quality: int = 0,
        model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> GenerateResult:
        """See `Client.generate_unary`."""
        request = _build_request(**_params(locals()))
        metadata = (("x-request-id", request.request_id),)
        response = await self._unary("GenerateUnary", request, timeout, metadata)
        return _unary_result(request, response)

    async def list_models(self, *, timeout: float | None = None) -> ModelList:
        return _models(await self._unary("ListModels", gateway_pb2.ListModelsRequest(), timeout))

    async def wait_ready(self, timeout: float | None = 30.0) -> None:
        """See `Client.wait_ready`."""
        deadline, last = _Deadline(timeout), "no answer"
        self._gateway()
        stub = health_pb2_grpc.HealthStub(self._channel)
        while (left := deadline.left()) is None or left > 0:
            try:
                reply = await stub.Check(
                    _HEALTH_REQUEST, timeout=_probe_timeout(left), wait_for_ready=True
                )
                if reply.status == _SERVING:
                    return
                last = f"status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise _map_rpc_error(err) from None
                last = f"{err.code().name}: {err.details()}"
            await asyncio.sleep(_probe_pause(deadline))
        raise _not_ready(timeout, last)

    async def _unary(
        self, method: str, request: Any, timeout: float | None, metadata: Any = ()
    ) -> Any:
        deadline = self._deadline(timeout)
        for attempt in itertools.count():
            try:
                rpc = getattr(self._gateway(), method)
                return await rpc(request, timeout=deadline.remaining(), metadata=metadata)
            except grpc.RpcError as err:
                delay = self._retry_delay(err, attempt, 0, deadline)
                if delay is None:
                    raise _map_rpc_error(err) from None
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")
