"""What the blocking and the asyncio clients share: settings, deadline, retry policy, readiness.

`ClientBase` holds a client's settings, channel options and TLS (client/tls.py), and
opens its channel, plaintext or TLS; `Deadline` is one
deadline for a whole call, retries and back-off pauses included; `RetryPolicy`
says whether and when a failed attempt is tried again; `ReadyWait` is the state
of one `wait_ready`. The clients (`ditmesh.client.sdk`, `ditmesh.client.aio`)
only drive the calls, each with its own kind of channel and sleep.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from ditmesh.client.errors import (
    DeadlineExceededError,
    invalid_argument,
    map_rpc_error,
    status_code,
)
from ditmesh.client.tls import (
    ChannelTLS,
    channel_tls,
    handshake_failed,
    open_aio_channel,
    open_channel,
)

__all__ = ["HEALTH_REQUEST", "MiB", "ClientBase", "Deadline", "ReadyWait", "RetryPolicy"]

MiB = 1024 * 1024

HEALTH_REQUEST = health_pb2.HealthCheckRequest(service="")
_SERVING = health_pb2.HealthCheckResponse.SERVING


class Deadline:
    """One deadline for a whole call, retries and backoff sleeps included."""

    def __init__(self, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        self.timeout = timeout
        self._at = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        return None if self._at is None else self._at - time.monotonic()

    def remaining(self) -> float | None:
        """Seconds left for the next attempt; raises once none are."""
        left = self.left()
        if left is not None and left <= 0:
            raise DeadlineExceededError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the client's deadline of {self.timeout:g} s passed",
            )
        return left


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """When a failed attempt is tried again: UNAVAILABLE only, and only before the first event.

    Once the gateway has sent an event it has accepted the work, and a new attempt
    could run it twice on the GPUs; every other status means the request itself
    (or the mesh's verdict on it) would not change by trying again.
    """

    retries: int = 3
    """Extra attempts after the first."""
    backoff: float = 0.5
    """Seconds before the first retry; doubles per attempt, times a jitter in [0.5, 1]."""

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0:
            raise ValueError("retries and retry_backoff must be >= 0")

    def delay(
        self, err: grpc.RpcError, attempt: int, events: int, deadline: Deadline
    ) -> float | None:
        """Seconds to wait before another attempt, or None to give up now."""
        if status_code(err) != grpc.StatusCode.UNAVAILABLE or events or attempt >= self.retries:
            return None
        if handshake_failed(err.details() or ""):
            return None  # a certificate the caller does not trust stays untrusted
        delay = self.backoff * 2**attempt * random.uniform(0.5, 1.0)  # jitter spreads herds
        left = deadline.left()
        if left is not None and left <= delay:
            return None
        return delay


class ClientBase:
    """Settings shared by `Client` and `AsyncClient`; subclasses open their channel."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = 600.0,
        retries: int = 3,
        retry_backoff: float = 0.5,
        max_message_bytes: int = 256 * MiB,
        tls: bool | str | ChannelTLS | None = None,
    ) -> None:
        """timeout is the default deadline of every call (None: none); retries counts
        extra attempts after UNAVAILABLE, spaced by retry_backoff * 2**attempt seconds.
        tls: None or False plaintext; True TLS trusting the system's roots; a path TLS
        trusting that CA file; a `ChannelTLS` for a client certificate (mutual TLS) or a
        server name. Files are checked here: a bad one is an InvalidArgumentError."""
        if max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be > 0")
        Deadline(timeout)  # validates it
        try:
            self.tls = channel_tls(tls)
        except ValueError as exc:
            raise invalid_argument(str(exc)) from None
        self.address = address
        self.timeout = timeout
        self.retry = RetryPolicy(retries=retries, backoff=retry_backoff)
        self.channel_options: list[tuple[str, Any]] = [
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

    def open_channel(self) -> grpc.Channel:
        """A blocking channel to the gateway, with TLS when the client has it."""
        return open_channel(self.address, self.channel_options, self.tls)

    def open_aio_channel(self) -> grpc.aio.Channel:
        """An asyncio channel to the gateway, with TLS when the client has it."""
        return open_aio_channel(self.address, self.channel_options, self.tls)

    def deadline(self, timeout: float | None) -> Deadline:
        """The deadline of one call: its own timeout, else the client's default."""
        return Deadline(self.timeout if timeout is None else timeout)


class ReadyWait:
    """One `wait_ready`: probe the health service until SERVING or the deadline.

    Each probe waits at most a second, so a server that comes up late is seen soon;
    the last answer goes into the error, so a timeout says what the gateway said.
    """

    def __init__(self, timeout: float | None) -> None:
        self._deadline = Deadline(timeout)
        self._last = "no answer"

    def probe_timeout(self) -> float | None:
        """Seconds the next probe may take, or None when the time is up."""
        left = self._deadline.left()
        if left is None:
            return 1.0
        return min(left, 1.0) if left > 0 else None

    def serving(self, reply: health_pb2.HealthCheckResponse) -> bool:
        if reply.status == _SERVING:
            return True
        self._last = f"status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        return False

    def failed(self, err: grpc.RpcError) -> None:
        """Notes a failed probe; a gateway without a health service raises at once."""
        if status_code(err) == grpc.StatusCode.UNIMPLEMENTED:
            raise map_rpc_error(err) from None
        self._last = str(map_rpc_error(err))  # a failed TLS handshake explained

    def pause(self) -> float:
        left = self._deadline.left()
        return 0.1 if left is None else max(0.0, min(0.1, left))

    def expired(self) -> DeadlineExceededError:
        return DeadlineExceededError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the gateway was not ready within {self._deadline.timeout:g} s ({self._last})",
        )
