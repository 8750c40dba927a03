"""The blocking client of the ditmesh gateway: `Client`.

Both clients (this one and `ditmesh.client.aio.AsyncClient`) speak only the
public contract of protos/ditmesh/v1/gateway.proto, so they work against any
gateway build. They turn every gRPC failure into a `DitmeshClientError`
carrying the status code and the server's sentence, reassemble the chunked
image stream, and retry only where a retry cannot duplicate work on the GPUs.
This module only drives calls; the parameters (`params`), the stream assembly
(`wire`), the retry policy and deadline (`base`) and the errors (`errors`) are
shared with the asyncio client.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from ditmesh.client.base import HEALTH_REQUEST, ClientBase, MiB, ReadyWait
from ditmesh.client.errors import DitmeshClientError, map_rpc_error
from ditmesh.client.params import GenerateParams, request_of
from ditmesh.client.types import (
    GenerateResult,
    ModelList,
    OutputFormat,
    Progress,
    ProgressCallback,
)
from ditmesh.client.wire import StreamAssembler, model_list, unary_result
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

# Names re-exported for callers that import them from here.
__all__ = [
    "Client",
    "DitmeshClientError",
    "GenerateParams",
    "GenerateResult",
    "MiB",
    "ModelList",
    "OutputFormat",
    "Progress",
    "ProgressCallback",
]


class Client(ClientBase):
    """Blocking client of one gateway; thread-safe, one channel for all calls."""

    def _open(self) -> None:
        self._channel = self.open_channel()
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(
        self,
        prompt: str,
        params: GenerateParams | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        **fields: Any,
    ) -> GenerateResult:
        """Runs one request over the streaming RPC, reporting progress as it arrives.

        `fields` are `GenerateParams` fields (height=, steps=, seed=, ...), applied
        over `params`; timeout (seconds) covers the whole call, retries included.
        """
        request = request_of(prompt, params, fields, caller="generate")
        deadline = self.deadline(timeout)
        metadata = (("x-request-id", request.request_id),)
        for attempt in itertools.count():
            assembler = StreamAssembler(request)
            call = None
            try:
                call = self._stub.Generate(request, timeout=deadline.remaining(), metadata=metadata)
                for event in call:
                    progress = assembler.feed(event)
                    if progress is not None and on_progress is not None:
                        on_progress(progress)
                return assembler.finish()
            except grpc.RpcError as err:
                delay = self.retry.delay(err, attempt, assembler.events, deadline)
                if delay is None:
                    raise map_rpc_error(err) from None
            finally:
                if call is not None:
                    call.cancel()  # no-op once finished; frees the stream on any exit
            time.sleep(delay)
        raise AssertionError("unreachable")

    def generate_unary(
        self,
        prompt: str,
        params: GenerateParams | None = None,
        *,
        timeout: float | None = None,
        **fields: Any,
    ) -> GenerateResult:
        """The same request answered in one message; UNAVAILABLE is retried with the same
        request id, which the gateway uses to deduplicate."""
        request = request_of(prompt, params, fields, caller="generate_unary", streaming=False)
        metadata = (("x-request-id", request.request_id),)
        response = self._unary(self._stub.GenerateUnary, request, timeout, metadata)
        return unary_result(request, response)

    def list_models(self, *, timeout: float | None = None) -> ModelList:
        response = self._unary(self._stub.ListModels, gateway_pb2.ListModelsRequest(), timeout)
        return model_list(response)

    def wait_ready(self, timeout: float | None = 30.0) -> None:
        """Blocks until the gateway's health service says SERVING; raises
        DeadlineExceededError if it does not within `timeout` seconds."""
        wait = ReadyWait(timeout)
        stub = health_pb2_grpc.HealthStub(self._channel)
        while (probe := wait.probe_timeout()) is not None:
            try:
                if wait.serving(stub.Check(HEALTH_REQUEST, timeout=probe, wait_for_ready=True)):
                    return
            except grpc.RpcError as err:
                wait.failed(err)
            time.sleep(wait.pause())
        raise wait.expired()

    def _unary(self, method: Any, request: Any, timeout: float | None, metadata: Any = ()) -> Any:
        deadline = self.deadline(timeout)
        for attempt in itertools.count():
            try:
                return method(request, timeout=deadline.remaining(), metadata=metadata)
            except grpc.RpcError as err:
                delay = self.retry.delay(err, attempt, 0, deadline)
                if delay is None:
                    raise map_rpc_error(err) from None
            time.sleep(delay)
        raise AssertionError("unreachable")
