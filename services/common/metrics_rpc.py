"""The gRPC side of a service's metrics: server interceptors that time every call.

One for the thread-pool server of the stages (services/common/server.py), one for the
asyncio server of the gateway (aio_server.py); both record through `CallRecord`
(services/common/metrics.py, which says what is exported). Installed only when a
metrics port is set: with metrics off a server has no interceptor here at all.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable

import grpc

from ditmesh.common.metrics import CallRecord, ServiceMetrics


def _code_name(code) -> str:
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    # grpc.aio reports the code as its integer value.
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)


def _rewrap(handler, wrap_unary: Callable, wrap_stream: Callable):
    """The handler with its behaviour wrapped (unary or streaming response)."""
    for kind, factory, wrap in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, wrap_unary),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, wrap_unary),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, wrap_stream),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, wrap_stream),
    ):
        fn = getattr(handler, kind)
        if fn is not None:
            return factory(
                wrap(fn, kind.startswith("stream")),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class MetricsInterceptor(grpc.ServerInterceptor):
    """Measures every call of a thread-pool server (put it first: it sees final codes)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = self._metrics.method_of(handler_call_details)
        if handler is None or method is None:
            return handler
        metrics = self._metrics

        def begin(request, context, streamed: bool):
            call = CallRecord(metrics, method)
            if streamed:
                request = call.requests(request)
            else:
                call.saw_request(request)
            return call, request

        def wrap_unary(fn, streamed):
            def inner(request, context):
                call, request = begin(request, context, streamed)
                code = "UNKNOWN"
                try:
                    response = fn(request, context)
                    code = _code_name(context.code())
                    return response
                except BaseException:
                    code = _code_name(context.code() or grpc.StatusCode.UNKNOWN)
                    raise
                finally:
                    call.end(code)

            return inner

        def wrap_stream(fn, streamed):
            def inner(request, context):
                call, request = begin(request, context, streamed)
                code = "UNKNOWN"
                try:
                    for item in fn(request, context):
                        call.saw_response(item)
                        yield item
                    code = _code_name(context.code())
                except GeneratorExit:
                    code = "CANCELLED"  # the client left mid-stream
                    raise
                except BaseException:
                    code = _code_name(context.code() or grpc.StatusCode.UNKNOWN)
                    raise
                finally:
                    call.end(code)

            return inner

        return _rewrap(handler, wrap_unary, wrap_stream)


class AsyncMetricsInterceptor(grpc.aio.ServerInterceptor):
    """The same measures for a grpc.aio server (the gateway)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = self._metrics.method_of(handler_call_details)
        if handler is None or method is None:
            return handler
        metrics = self._metrics

        def begin(request, streamed: bool):
            call = CallRecord(metrics, method)
            if streamed:
                request = call.async_requests(request)
            else:
                call.saw_request(request)
            return call, request

        def ended(context, exc: BaseException | None) -> str:
            if isinstance(exc, asyncio.CancelledError):
                return "CANCELLED"
            code = context.code()
            if code is None and exc is not None:
                return "UNKNOWN"
            return _code_name(code)

        def wrap_coroutine(fn, streamed):
            # A unary answer, or a stream written with context.write (the gateway's Generate).
            async def inner(request, context):
                call, request = begin(request, streamed)
                exc = None
                try:
                    return await fn(request, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    call.end(ended(context, exc))

            return inner

        def wrap_stream(fn, streamed):
            if not inspect.isasyncgenfunction(fn):
                return wrap_coroutine(fn, streamed)

            async def inner(request, context):
                call, request = begin(request, streamed)
                exc = None
                try:
                    async for item in fn(request, context):
                        call.saw_response(item)
                        yield item
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    call.end(ended(context, exc))

            return inner

        return _rewrap(handler, wrap_coroutine, wrap_stream)
