"""OpenTelemetry tracing for every ditmesh process: one trace per request across the mesh.

Configured the standard way, by environment: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns it on and says where spans go (OTLP over
gRPC), `OTEL_SERVICE_NAME` names the process (default `ditmesh-<stage>`),
`OTEL_TRACES_SAMPLER` / `_ARG` sample, `OTEL_BSP_*` tune the batching. With no
endpoint (or `OTEL_SDK_DISABLED=true`) tracing is off and costs nothing: the SDK is
not even imported, no interceptor is installed, and the helpers below hand out
shared no-op objects.

What is traced, and where:
- a stage's thread-pool server: opentelemetry-instrumentation-grpc's own server
  interceptor (`server_interceptors`); it reads W3C `traceparent` from the metadata,
  so a stage's span is the child of the gateway's client span;
- the gateway's asyncio server: `AioServerSpans`, a small interceptor of ours, because
  the package's asyncio interceptor iterates a streaming handler with `async for`, and
  the gateway's `Generate` writes its stream with `context.write` (a coroutine, not an
  async generator), which that interceptor cannot wrap;
- the gateway's calls to its stages: `client_span` (used by gateway/calls.py), rather
  than the package's channel interceptors, so each attempt is one span that ends with
  the call, carries the request id, and the health checks on the same channels are
  never traced;
- inside a stage: `span` for a phase (the VAE's decode and image encoding, the gang's
  job broadcast), `LoopTrace` for the denoising loop and a child span per step.

Every span carries the request id as `ditmesh.request_id`. Flushing on exit is the
server's business (`shutdown`, which `start_server` / `AsyncServer` register).

It runs past 350 lines on purpose: every place the mesh touches OpenTelemetry is here,
so "off" is decided in one module and nothing else imports the SDK.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import grpc

log = logging.getLogger(__name__)

REQUEST_ID_ATTR = "ditmesh.request_id"
"""The span attribute holding the request id (the gateway's, sent as x-request-id)."""

# Calls that are not requests: health probes, the gateway asking a replica what it holds,
# and tool queries would bury the traces of work.
_UNTRACED_SERVICES = ("/grpc.health.v1.Health/", "/ditmesh.v1.StageInfo/", "/grpc.reflection.")

_lock = threading.Lock()
_provider: Any = None
_tracer: Any = None


def configured() -> bool:
    """Whether the environment asks for traces (an OTLP endpoint, and the SDK not disabled)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def enabled() -> bool:
    """Whether this process exports spans (after `setup` found an endpoint)."""
    return _tracer is not None


def setup(stage: str) -> bool:
    """Starts exporting spans if the environment says so; True when on. Idempotent: the
    first server of a process names it (`ditmesh-<stage>` unless OTEL_SERVICE_NAME)."""
    global _provider, _tracer
    if not configured():
        return False
    with _lock:
        if _tracer is not None:
            return True
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself;
        # only a default is given here. The sampler comes from OTEL_TRACES_SAMPLER.
        attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": f"ditmesh-{stage}"}
        provider = TracerProvider(resource=Resource.create(attrs))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        _provider = provider
        _tracer = trace.get_tracer("ditmesh")
        log.info("tracing on: spans of %s go to OTLP", provider.resource.attributes["service.name"])
        return True


def shutdown() -> None:
    """Sends the spans still buffered (a stopping server calls it once it has drained)."""
    if _provider is not None:
        _provider.force_flush(5_000)


def _traced(method: str) -> bool:
    return not method.startswith(_UNTRACED_SERVICES)


# -- servers ------------------------------------------------------------------------------------


def server_interceptors(stage: str) -> list[grpc.ServerInterceptor]:
    """For a thread-pool server: the instrumentation package's interceptor, or none when off."""
    if not setup(stage):
        return []
    from opentelemetry.instrumentation.grpc import server_interceptor

    return [server_interceptor(filter_=lambda details: _traced(details.method))]


def aio_server_interceptors(stage: str) -> list[grpc.aio.ServerInterceptor]:
    """For the gateway's asyncio server: `AioServerSpans`, or none when off."""
    return [AioServerSpans()] if setup(stage) else []


def _rpc_attributes(method: str) -> dict[str, Any]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _request_id(metadata, request) -> str:
    rid = getattr(request, "request_id", "")
    if rid:
        return rid
    return next((str(v) for k, v in metadata if k == "x-request-id"), "")


class AioServerSpans(grpc.aio.ServerInterceptor):
    """A SERVER span per call, child of the caller's `traceparent` (see the module doc)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not _traced(details.method):
            return handler
        method = details.method
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        fn = (
            handler.unary_unary
            or handler.stream_unary
            or handler.unary_stream
            or handler.stream_stream
        )
        streamed_in = handler.request_streaming
        if inspect.isasyncgenfunction(fn):

            async def behaviour(request, context):
                with _server_span(method, None if streamed_in else request, context) as span:
                    try:
                        async for item in fn(request, context):
                            yield item
                    finally:
                        _end_status(span, context)

        else:

            async def behaviour(request, context):
                with _server_span(method, None if streamed_in else request, context) as span:
                    try:
                        return await fn(request, context)
                    finally:
                        _end_status(span, context)

        return make(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@contextlib.contextmanager
def _server_span(method: str, request, context) -> Iterator[Any]:
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    metadata = tuple(context.invocation_metadata() or ())
    attrs = _rpc_attributes(method)
    rid = _request_id(metadata, request)
    if rid:
        attrs[REQUEST_ID_ATTR] = rid
    parent = extract({k: v for k, v in metadata if isinstance(v, str)})
    with _tracer.start_as_current_span(
        method.lstrip("/"),
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes=attrs,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def _end_status(span, context) -> None:
    """The call's gRPC status on its span (context.code() is None when it ended OK)."""
    from opentelemetry.trace import Status, StatusCode

    code = context.code()
    code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
        span.set_status(Status(StatusCode.ERROR, context.details() or code.name))


@contextlib.contextmanager
def _http_span(name: str, request_id: str, headers: Mapping[str, str]) -> Iterator[None]:
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    attrs = {REQUEST_ID_ATTR: request_id} if request_id else {}
    with _tracer.start_as_current_span(
        name, context=extract(dict(headers)), kind=trace.SpanKind.SERVER, attributes=attrs
    ):
        yield


def request_span(
    name: str, request_id: str, headers: Mapping[str, str]
) -> contextlib.AbstractContextManager:
    """A SERVER span for a request that does not come through a gRPC server (the gateway's
    HTTP API), child of the caller's `traceparent` header if any; nothing when off.
    Entered around the request's run, it makes the stage calls' spans its children."""
    if _tracer is None:
        return contextlib.nullcontext()
    return _http_span(name, request_id, headers)


def tag_request(context: grpc.ServicerContext) -> None:
    """Puts the call's request id (x-request-id) on the current span (a stage's server
    span), when tracing."""
    if _tracer is not None:
        from opentelemetry import trace

        rid = _request_id(tuple(context.invocation_metadata() or ()), None)
        if rid:
            trace.get_current_span().set_attribute(REQUEST_ID_ATTR, rid)


# -- the gateway's calls ------------------------------------------------------------------------


class ClientSpan:
    """One call from the gateway to a stage replica: a CLIENT span and its `traceparent`."""

    def __init__(self, method: str, address: str, request_id: str) -> None:
        from opentelemetry import trace
        from opentelemetry.propagate import inject

        host, _, port = address.rpartition(":")
        attrs = {
            **_rpc_attributes(method),
            "server.address": host,
            "server.port": int(port) if port.isdigit() else 0,
            REQUEST_ID_ATTR: request_id,
        }
        self.span = _tracer.start_span(
            method.lstrip("/"), kind=trace.SpanKind.CLIENT, attributes=attrs
        )
        carrier: dict[str, str] = {}
        inject(carrier, context=trace.set_span_in_context(self.span))
        self.metadata = list(carrier.items())
        """What the call sends so that the stage's span is this one's child."""

    def end(self, error: BaseException | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        if isinstance(error, grpc.aio.AioRpcError):
            self.span.set_attribute("rpc.grpc.status_code", error.code().value[0])
            if error.code() != grpc.StatusCode.CANCELLED:
                self.span.set_status(Status(StatusCode.ERROR, error.details() or ""))
        elif error is not None:
            self.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        else:
            self.span.set_attribute("rpc.grpc.status_code", 0)
        self.span.end()


def client_span(method: str, address: str, request_id: str) -> ClientSpan | None:
    """A span for one call to `address` (`method` as /package.Service/Method); None when off."""
    return ClientSpan(method, address, request_id) if _tracer is not None else None


# -- inside a stage -----------------------------------------------------------------------------


@contextlib.contextmanager
def _live_span(name: str, attributes: Mapping[str, Any]) -> Iterator[Any]:
    with _tracer.start_as_current_span(name, attributes=dict(attributes)) as span:
        yield span


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager:
    """A child span of the current one around a phase of a stage's work; nothing when off."""
    if _tracer is None:
        return contextlib.nullcontext()
    return _live_span(name, attributes)


class LoopTrace:
    """The denoising loop of one request: a span, and a child span per step.

    Made in the RPC's thread (so the loop's span is the child of the call's); the loop
    runs in another thread, which enters `running()` so that what it traces (the gang's
    job broadcast) lands under the loop too. Steps are timed from the end of the step
    before, on the host: with a GPU they show when each step was issued.
    """

    def __init__(self, name: str, attributes: Mapping[str, Any]) -> None:
        from opentelemetry import trace

        self._trace = trace
        self.span = _tracer.start_span(name, attributes=dict(attributes))
        self._context = trace.set_span_in_context(self.span)
        self._last = time.time_ns()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        from opentelemetry import context

        token = context.attach(self._context)
        self._last = time.time_ns()
        try:
            yield
        except BaseException as exc:
            self.span.record_exception(exc)
            self.span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(exc)))
            raise
        finally:
            context.detach(token)
            self.span.end()

    def step(self, step: int, total: int) -> None:
        now = time.time_ns()
        s = _tracer.start_span(
            "denoise step",
            context=self._context,
            start_time=self._last,
            attributes={"ditmesh.step": step, "ditmesh.steps": total},
        )
        s.end(end_time=now)
        self._last = now


class _NoLoopTrace:
    """What `loop_trace` hands out when tracing is off: every method does nothing."""

    def running(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def step(self, step: int, total: int) -> None:
        pass


NO_LOOP_TRACE = _NoLoopTrace()


def loop_trace(name: str, **attributes: Any) -> LoopTrace | _NoLoopTrace:
    """A `LoopTrace` under the current span, or the shared no-op one when off."""
    return LoopTrace(name, attributes) if _tracer is not None else NO_LOOP_TRACE
