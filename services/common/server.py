"""gRPC server scaffolding shared by every stage.

- One interceptor maps domain errors to status codes; any other exception is
  logged here with its traceback and reaches the client as INTERNAL with a
  sentence and the request id, never the traceback.
- grpc.health.v1 on every server; NOT_SERVING while draining.
- SIGTERM / SIGINT: stop accepting, let in-flight work finish (grace), exit.
- gRPC server reflection on every server (grpcurl and the like list and call the API
  without the protos); Prometheus metrics when a metrics port is set
  (services/common/metrics.py).
- TLS, mutual or not, when `tls` is set (services/common/tls.py); plaintext otherwise.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ditmesh.common import tracing
from ditmesh.common.codec import MAX_MESSAGE_BYTES
from ditmesh.common.errors import DitmeshError
from ditmesh.common.limits import DEFAULT_DRAIN_SECONDS
from ditmesh.common.metrics import ServiceMetrics
from ditmesh.common.metrics_rpc import MetricsInterceptor
from ditmesh.common.timings import WorkClock
from ditmesh.common.tls import ServerTLS, bind, label

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"

FAIL_GRACE_S = 2.0
"""How long a server that failed for good lets its calls in flight end."""

# The gateway pings its stages to notice a silent peer; allow it (gRPC's default
# answers frequent pings with GOAWAY).
KEEPALIVE_SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def channel_options(
    max_message_bytes: int = MAX_MESSAGE_BYTES, max_receive_bytes: int | None = None
) -> list[tuple[str, int]]:
    """Message limits to set on both ends (gRPC's default receive limit is 4 MiB)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_receive_bytes or max_message_bytes),
    ]


def request_id_of(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return str(value)
    return ""


def _abort(context: grpc.ServicerContext, stage: str, exc: BaseException) -> None:
    if isinstance(exc, DitmeshError):
        context.abort(exc.code, str(exc))
    rid = request_id_of(context)
    if not context.is_active():
        # The client left (cancelled, or its deadline passed): what failed after that is
        # the consequence of its leaving, not a fault of this stage.
        log.info("%s: request %s ended by its client (%s)", stage, rid or "-", type(exc).__name__)
        context.abort(grpc.StatusCode.CANCELLED, "the client left")
    log.exception("internal error in the %s stage (request %s)", stage, rid or "-")
    context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error in the {stage} stage (request {rid or '-'}); its log has the details",
    )


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns exceptions raised by servicer methods into status codes (see module doc)."""

    def __init__(self, stage: str) -> None:
        self._stage = stage

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        stage = self._stage

        def wrap_unary(fn):
            def inner(request, context):
                try:
                    return fn(request, context)
                except Exception as exc:  # noqa: BLE001 - mapped, logged, never swallowed
                    if _aborted(context, exc):
                        raise
                    _abort(context, stage, exc)

            return inner

        def wrap_stream(fn):
            def inner(request, context):
                try:
                    yield from fn(request, context)
                except Exception as exc:  # noqa: BLE001
                    if _aborted(context, exc):
                        raise
                    _abort(context, stage, exc)

            return inner

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                wrap_stream(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _aborted(context: grpc.ServicerContext, exc: BaseException) -> bool:
    # context.abort() sets the status, then raises a bare Exception: let that one pass.
    return type(exc) is Exception and context.code() is not None


def wait_for_stop_signal(stopped: Callable[[], bool]) -> None:
    """Blocks until SIGTERM or SIGINT arrives, or `stopped()` (the server stopped itself).

    The handler takes no lock: it runs in the main thread between two bytecodes, maybe
    while that thread holds a lock the handler would need (setting a threading.Event
    from here deadlocked now and then: the Event's own lock, held by the `wait` it
    interrupted). A list append and a sleeping poll cannot."""
    asked: list[int] = []

    def handler(signum, frame):  # noqa: ARG001
        asked.append(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not asked:
        if stopped():
            return
        time.sleep(0.1)


@dataclass(kw_only=True, slots=True)
class ServerConfig:
    """Where and how a stage listens."""

    stage: str
    """Name used in logs and error sentences: encoder, denoiser, vae, gateway."""
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port; the bound one is on `RunningServer.port`."""
    max_workers: int = 16
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_receive_bytes: int | None = None
    """Receive limit when it differs from the send limit (the gateway takes only small requests)."""
    grace_seconds: float = DEFAULT_DRAIN_SECONDS
    """How long in-flight requests may run on after a stop is asked for."""
    metrics_port: int = 0
    """Port of the Prometheus /metrics endpoint, on `host`; 0: no metrics at all."""
    tls: ServerTLS | None = None
    """Serve TLS (mutual when it names a client CA); None: plaintext."""


@dataclass(kw_only=True, slots=True)
class StageOptions:
    """What every stage's `serve` takes the same way (the common `ditmesh serve` flags)."""

    name: str | None = None
    """Name clients use for the model (default: the folder's name)."""
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port; the bound one is on `RunningServer.port`."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto (bfloat16 on a GPU, float32 on a CPU), float32, bfloat16 or float16."""
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    """How long work in hand may run on after a stop is asked for."""
    metrics_port: int = 0
    """Port of the Prometheus /metrics endpoint; 0: no metrics."""
    warmup: str = "auto"
    """Encoder and VAE: run one request's work before serving (auto: on a GPU only;
    services/common/warmup.py)."""
    tls: ServerTLS | None = None
    """Serve TLS (`--tls-cert`, `--tls-key`, `--tls-ca`); None: plaintext."""

    def server_config(self, stage: str) -> ServerConfig:
        return ServerConfig(
            stage=stage,
            host=self.host,
            port=self.port,
            grace_seconds=self.drain_seconds,
            metrics_port=self.metrics_port,
            tls=self.tls,
        )


@dataclass(slots=True)
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int
    config: ServerConfig
    services: list[str] = field(default_factory=list)
    metrics: ServiceMetrics | None = None
    """Its Prometheus metrics, when a metrics port was set."""
    exit_code: int = 0
    """Non-zero once the stage failed for good (e.g. a gang lost a process)."""
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    """Cleanups run after the server has drained (e.g. stopping a gang's workers)."""
    _stopped: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def stopping(self) -> bool:
        """Whether a stop was asked for (by a signal, `stop` or `fail`); it may still be draining."""
        return self._stopped.is_set()

    def wait_stopping(self, timeout: float | None = None) -> bool:
        """Waits at most `timeout` seconds (None: for good) for a stop; True once stopping.

        For helpers that live as long as the server (a gang's watcher): they loop on it.
        """
        return self._stopped.wait(timeout)

    def stop(self, grace: float | None = None) -> None:
        """Marks the server NOT_SERVING, then drains in-flight work for `grace` seconds."""
        if self.stopping:
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        grace = self.config.grace_seconds if grace is None else grace
        self.server.stop(grace).wait()
        for fn in self.on_stop:
            try:
                fn()
            except Exception:  # noqa: BLE001 - one failed cleanup must not skip the others
                log.exception("%s: cleanup failed", self.config.stage)
        self._done.set()

    def fail(self, reason: str) -> None:
        """Stops serving for good and makes the process exit non-zero."""
        log.error("%s: %s; stopping", self.config.stage, reason)
        self.exit_code = 1
        # A short grace, not none: the request whose failure this is (a gang that lost a
        # process) must still send its own status and sentence before the server cancels
        # what is left; new requests are refused at once either way.
        threading.Thread(target=self.stop, args=(FAIL_GRACE_S,), daemon=True).start()

    def wait(self) -> None:
        self.server.wait_for_termination()

    def serve_until_signal(self) -> int:
        """Blocks until SIGTERM/SIGINT (or a failure), stops gracefully; returns the exit code."""
        wait_for_stop_signal(lambda: bool(self.stopping))
        log.info("%s: stopping (grace %.0fs)", self.config.stage, self.config.grace_seconds)
        self.stop()
        self._done.wait(self.config.grace_seconds + 60)
        return self.exit_code


def start_server(
    config: ServerConfig,
    register: Iterable[tuple[Callable[[object, grpc.Server], None], object, str]],
) -> RunningServer:
    """Starts a server with the given servicers and a health service, all SERVING.

    `register` holds (add_XServicer_to_server, servicer, full service name) triples.
    """
    metrics = ServiceMetrics(config.stage) if config.metrics_port else None
    # Metrics first: it sees the status the error interceptor turned an exception into.
    measure = [MetricsInterceptor(metrics)] if metrics is not None else []
    # Tracing outermost, so its span is current in all the others; none when it is off.
    # The work clock (services/common/timings.py) sends each call's work in its trailers.
    traced = tracing.server_interceptors(config.stage)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix=config.stage),
        interceptors=[*traced, *measure, WorkClock(), ErrorInterceptor(config.stage)],
        options=[
            *channel_options(config.max_message_bytes, config.max_receive_bytes),
            *KEEPALIVE_SERVER_OPTIONS,
        ],
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = []
    for add, servicer, name in register:
        add(servicer, server)
        names.append(name)
    add_reflection(server, names)
    port = bind(server, f"{config.host}:{config.port}", config.tls)
    if port == 0:
        raise OSError(f"{config.stage}: could not bind {config.host}:{config.port}")
    if metrics is not None:
        metrics.serve(config.host, config.metrics_port)  # before start: a bad port fails alone
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s listening on %s:%d%s", config.stage, config.host, port, label(config.tls))
    running = RunningServer(
        server=server, health=health_servicer, port=port, config=config, services=names
    )
    if metrics is not None:
        running.metrics = metrics
        running.on_stop.append(metrics.stop)
    if traced:
        running.on_stop.append(tracing.shutdown)
    return running


def add_reflection(server: grpc.Server | grpc.aio.Server, names: list[str]) -> None:
    """Server reflection listing `names`, health and reflection itself."""
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
