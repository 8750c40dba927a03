"""An asyncio gRPC server on its own event-loop thread, for services that hold many streams.

The stages (encoder, denoiser, VAE) do blocking work a request at a time and use the
thread-pool server of `ditmesh.common.server`. The gateway instead holds thousands of
open request streams that mostly wait; a thread each would cap it at the pool size
and starve health checks behind waiting streams. Here every stream is a coroutine.

What it shares with the thread-pool server: the same error policy (domain errors
become a status and a sentence, anything else INTERNAL with the request id and the
traceback only in the log), grpc.health.v1 (NOT_SERVING while draining), graceful
stop on SIGTERM / SIGINT with a drain grace, and the same handle shape
(`address`, `stop(grace)`, `serve_until_signal()`), so callers treat both alike,
server reflection, Prometheus metrics when `metrics_port` is set (`metrics`, whose
registry the gateway adds its own collector to before `start`), and TLS when `tls` is.
A client that leaves (cancel, deadline) is not an error and is not logged as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from ditmesh.common import tracing
from ditmesh.common.errors import DitmeshError
from ditmesh.common.metrics import ServiceMetrics
from ditmesh.common.metrics_rpc import AsyncMetricsInterceptor
from ditmesh.common.server import (
    KEEPALIVE_SERVER_OPTIONS,
    REQUEST_ID_KEY,
    ServerConfig,
    add_reflection,
    channel_options,
    wait_for_stop_signal,
)
from ditmesh.common.tls import bind, label

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return str(value)
    return ""


async def _abort(context: grpc.aio.ServicerContext, stage: str, exc: BaseException) -> None:
    if isinstance(exc, DitmeshError):
        await context.abort(exc.code, str(exc))
    rid = _request_id(context)
    log.error("internal error in the %s stage (request %s)", stage, rid or "-", exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error in the {stage} stage (request {rid or '-'}); its log has the details",
    )


def rpc_errors(stage: str) -> Callable:
    """Decorates an async servicer method (coroutine or async generator) with the error policy."""

    def wrap(fn: Callable) -> Callable:
        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def stream(self, request, context):
                try:
                    async with contextlib.aclosing(fn(self, request, context)) as items:
                        async for item in items:
                            yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped, logged, never swallowed
                    await _abort(context, stage, exc)

            return stream

        @functools.wraps(fn)
        async def unary(self, request, context):
            try:
                return await fn(self, request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001
                await _abort(context, stage, exc)

        return unary

    return wrap


class AsyncServer:
    """A grpc.aio server running on a private event loop in a daemon thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, daemon=True, name=f"{config.stage}-loop"
        )
        self._thread.start()
        self.server: grpc.aio.Server | None = None
        self.health = health_aio.HealthServicer()
        self.port = 0
        self.services: list[str] = []
        self.metrics = ServiceMetrics(config.stage) if config.metrics_port else None
        """Its Prometheus metrics (served from `start`), when a metrics port is set."""
        self.exit_code = 0
        self.on_stop: list[Callable[[], Any]] = []
        """Cleanups run on the loop after the server has drained (coroutine functions allowed)."""
        self._stopping = threading.Event()
        self._done = threading.Event()

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for (as `RunningServer.stopping`)."""
        return self._stopping.is_set()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        """Runs a coroutine on the server's loop from another thread and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, register: Iterable[tuple[Callable, object, str]]) -> AsyncServer:
        """Starts serving the given (add_XServicer_to_server, servicer, name) triples."""
        self.run(self._start(list(register)))
        log.info("%s listening on %s%s", self.config.stage, self.address, label(self.config.tls))
        return self

    async def _start(self, register: list[tuple[Callable, object, str]]) -> None:
        c = self.config
        measure = [AsyncMetricsInterceptor(self.metrics)] if self.metrics is not None else []
        traced = tracing.aio_server_interceptors(c.stage)  # none when tracing is off
        if traced:
            self.on_stop.append(tracing.shutdown)
        self.server = grpc.aio.server(
            interceptors=[*traced, *measure],
            options=[
                *channel_options(c.max_message_bytes, c.max_receive_bytes),
                *KEEPALIVE_SERVER_OPTIONS,
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for add, servicer, name in register:
            add(servicer, self.server)
            self.services.append(name)
        add_reflection(self.server, self.services)
        self.port = bind(self.server, f"{c.host}:{c.port}", c.tls)
        if self.port == 0:
            raise OSError(f"{c.stage}: could not bind {c.host}:{c.port}")
        if self.metrics is not None:
            self.metrics.serve(c.host, c.metrics_port)
            self.on_stop.append(self.metrics.stop)
        await self.server.start()
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        """Health of the server and of each of its services (never SERVING once stopping)."""
        status = SERVING if serving and not self._stopping.is_set() else NOT_SERVING
        for name in ("", *self.services):
            await self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, then lets in-flight requests finish for `grace` seconds."""
        if self._stopping.is_set():
            self._done.wait()
            return
        self._stopping.set()
        grace = self.config.grace_seconds if grace is None else grace
        try:
            self.run(self._stop(grace))
        finally:
            self._done.set()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

    async def _stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        for fn in self.on_stop:
            try:
                result = fn()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - one failed cleanup must not skip the others
                log.exception("%s: cleanup failed", self.config.stage)

    def serve_until_signal(self) -> int:
        """Blocks until SIGTERM/SIGINT, drains for the configured grace; returns the exit code."""
        wait_for_stop_signal(self._stopping.is_set)
        log.info("%s: stopping (drain up to %.0f s)", self.config.stage, self.config.grace_seconds)
        self.stop()
        return self.exit_code
