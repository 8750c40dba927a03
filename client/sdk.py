"""Python SDK for the ditmesh gateway: the shared client base and the blocking `Client`.

Both clients (this one and `ditmesh.client.aio.AsyncClient`) speak only the
public contract of protos/ditmesh/v1/gateway.proto, so they work against any
gateway build. They turn every gRPC failure into a `DitmeshClientError`
carrying the status code and the server's sentence (a caller never has to
import grpc to handle errors), reassemble the chunked image stream, and retry
only where a retry cannot duplicate work on the GPUs. Results, errors and the
wire helpers live in `ditmesh.client.results`.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ditmesh.client.results import (
    DeadlineExceededError,
    DitmeshClientError,
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
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

# The results names are re-exported for callers that import them from here.
__all__ = [
    "Client",
    "DitmeshClientError",
    "GenerateResult",
    "MiB",
    "ModelList",
    "OutputFormat",
    "Progress",
    "ProgressCallback",
]

MiB = 1024 * 1024


class _Deadline:
    """One deadline for a whole call, retries and backoff sleeps included."""

    def __init__(self, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        self._timeout = timeout
        self._at = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        return None if self._at is None else self._at - time.monotonic()

    def remaining(self) -> float | None:
        """Seconds left for the next attempt; raises once none are."""
        left = self.left()
        if left is not None and left <= 0:
            raise DeadlineExceededError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the client's deadline of {self._timeout:g} s passed",
            )
        return left


def _not_ready(timeout: float | None, last: str) -> DeadlineExceededError:
    return DeadlineExceededError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"the gateway was not ready within {timeout:g} s ({last})",
    )


def _probe_timeout(left: float | None) -> float:
    """One health probe waits at most a second, so a late server is seen soon."""
    return 1.0 if left is None else min(left, 1.0)


def _probe_pause(deadline: _Deadline) -> float:
    left = deadline.left()
    return 0.1 if left is None else max(0.0, min(0.1, left))


_HEALTH_REQUEST = health_pb2.HealthCheckRequest(service="")
_SERVING = health_pb2.HealthCheckResponse.SERVING


class _ClientBase:
    """Settings and retry policy shared by the sync and async clients."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = 600.0,
        retries: int = 3,
        retry_backoff: float = 0.5,
        max_message_bytes: int = 256 * MiB,
    ) -> None:
        """timeout is the default deadline of every call (None: none); retries counts
        extra attempts after UNAVAILABLE, spaced by retry_backoff * 2**attempt seconds."""
        if retries < 0 or retry_backoff < 0 or max_message_bytes <= 0:
            raise ValueError("retries and retry_backoff must be >= 0, max_message_bytes > 0")
        _Deadline(timeout)  # validates it
        self.address = address
        self.timeout = timeout
        self._retries = retries
        self._retry_backoff = retry_backoff
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # gRPC's default reconnect backoff grows to 120 s; a restarted gateway
            # should be noticed within seconds by wait_ready and by retries.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self._open()

    def _open(self) -> None:
        raise NotImplementedError

    def _deadline(self, timeout: float | None) -> _Deadline:
        return _Deadline(self.timeout if timeout is None else timeout)

    def _retry_delay(
        self, err: grpc.RpcError, attempt: int, events: int, deadline: _Deadline
    ) -> float | None:
        """Seconds to wait before another attempt, or None to give up now.

        Only UNAVAILABLE is retried, and only before the first event: once the
        gateway has accepted the work, a new attempt could run it twice.
        """
        code_fn = getattr(err, "code", None)
        code = code_fn() if callable(code_fn) else None
        if code != grpc.StatusCode.UNAVAILABLE or events or attempt >= self._retries:
            return None
        delay = self._retry_backoff * 2**attempt * random.uniform(0.5, 1.0)  # jitter spreads herds
        left = deadline.left()
        if left is not None and left <= delay:
            return None
        return delay


# ----------------------------------------------------------------------------- sync client

ProgressCallback = Callable[[Progress], Any]


class Client(_ClientBase):
    """Blocking client of one gateway; thread-safe, one channel for all calls."""

    def _open(self) -> None:
        self._channel = grpc.insecure_channel(self.address, options=self._options)
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
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> GenerateResult:
        """Runs one request over the streaming RPC, reporting progress as it arrives."""
        request = _build_request(**_params(locals()))
        deadline = self._deadline(timeout)
        metadata = (("x-request-id", request.request_id),)
        for attempt in itertools.count():
            assembler = _StreamAssembler(request)
            call = None
            try:
                call = self._stub.Generate(request, timeout=deadline.remaining(), metadata=metadata)
                for event in call:
                    progress = assembler.feed(event)
                    if progress is not None and on_progress is not None:
                        on_progress(progress)
                return assembler.finish()
            except grpc.RpcError as err:
                delay = self._retry_delay(err, attempt, assembler.events, deadline)
                if delay is None:
                    raise _map_rpc_error(err) from None
            finally:
                if call is not None:
                    call.cancel()  # no-op once finished; frees the stream on any exit
            time.sleep(delay)
        raise AssertionError("unreachable")

    def generate_unary(
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
        """The same request answered in one message; UNAVAILABLE is retried with the same
        request id, which the gateway uses to deduplicate."""
        request = _build_request(**_params(locals()))
        metadata = (("x-request-id", request.request_id),)
        response = self._unary(self._stub.GenerateUnary, request, timeout, metadata)
        return _unary_result(request, response)

    def list_models(self, *, timeout: float | None = None) -> ModelList:
        response = self._unary(self._stub.ListModels, gateway_pb2.ListModelsRequest(), timeout)
        return _models(response)

    def wait_ready(self, timeout: float | None = 30.0) -> None:
        """Blocks until the gateway's health service says SERVING; raises
        DeadlineExceededError if it does not within `timeout` seconds."""
        deadline, last = _Deadline(timeout), "no answer"
        stub = health_pb2_grpc.HealthStub(self._channel)
        while (left := deadline.left()) is None or left > 0:
            try:
                reply = stub.Check(
                    _HEALTH_REQUEST, timeout=_probe_timeout(left), wait_for_ready=True
                )
                if reply.status == _SERVING:
                    return
                last = f"status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise _map_rpc_error(err) from None
                last = f"{err.code().name}: {err.details()}"
            time.sleep(_probe_pause(deadline))
        raise _not_ready(timeout, last)

    def _unary(self, method: Any, request: Any, timeout: float | None, metadata: Any = ()) -> Any:
        deadline = self._deadline(timeout)
        for attempt in itertools.count():
            try:
                return method(request, timeout=deadline.remaining(), metadata=metadata)
            except grpc.RpcError as err:
                delay = self._retry_delay(err, attempt, 0, deadline)
                if delay is None:
                    raise _map_rpc_error(err) from None
            time.sleep(delay)
        raise AssertionError("unreachable")
