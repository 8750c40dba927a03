"""One OpenTelemetry trace per request across the mesh, and nothing at all when tracing is off.

The four services run as real processes on loopback and export OTLP to a receiver in
this test (opentelemetry-proto's TraceService on a grpc server): one request must give
one trace whose parent links go gateway server span -> gateway client span per stage
-> that stage's server span, with the denoiser's steps as child spans.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from ditmesh.client import Client, GenerateParams

from .helpers import wait_for

STEPS = 3
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind values


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict


def _value(v):
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        got = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(
                            service=resource.get("service.name", ""),
                            name=s.name,
                            kind=s.kind,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                        )
                    )
        with self._lock:
            self.spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)


@pytest.fixture
def receiver():
    rec = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    rec.endpoint = f"http://127.0.0.1:{port}"
    yield rec
    server.stop(0)


class Service:
    """`ditmesh serve ...` as a child process exporting spans; stderr to a file.

    `start_stages` starts the three stages at once (their imports and model loads
    overlap on two cores); `stop_all` signals every service before waiting for any."""

    def __init__(self, args: list[str], env: dict, log_path, wait: bool = True) -> None:
        self.name = args[0]
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ditmesh.cli", "serve", *args, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )
        if wait:
            self.wait_listening()

    def wait_listening(self) -> None:
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n{self.log_path.read_text()[-3000:]}")
        self.address = line.split()[-1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


def start_stages(model: str, env: dict, log_dir, started: list[Service]) -> None:
    """Encoder, denoiser and VAE, appended to `started` as each process starts (so the
    caller's `stop_all` ends them whatever fails), then waited for."""
    for stage in ("encoder", "denoiser", "vae"):
        started.append(Service([stage, "--model", model], env, log_dir / f"{stage}.log", False))
    for s in started:
        s.wait_listening()


def stop_all(started: list[Service]) -> None:
    for s in reversed(started):
        if s.proc.poll() is None:
            s.proc.terminate()
    for s in reversed(started):
        s.stop()


def _traced_env(endpoint: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",  # milliseconds: spans arrive while the test waits
        OTEL_TRACES_SAMPLER="always_on",
    )
    return env


@pytest.mark.slow
def test_one_trace_across_the_four_services(receiver, tiny_flux, tmp_path):
    env = _traced_env(receiver.endpoint)
    started: list[Service] = []
    try:
        start_stages(tiny_flux, env, tmp_path, started)
        enc, den, vae = started
        gateway_args = ["gateway", "--model", tiny_flux, "--encoder", enc.address]
        gateway_args += ["--denoiser", den.address, "--vae", vae.address]
        started.append(Service(gateway_args, env, tmp_path / "gateway.log"))
        gateway = started[-1]

        with Client(gateway.address, timeout=180) as client:
            client.wait_ready(120)
            result = client.generate(
                "a red fox",
                GenerateParams(height=64, width=64, steps=STEPS, seed=1, request_id="trace-me-1"),
            )
        assert result.request_id == "trace-me-1"

        def complete() -> bool:
            spans = receiver.snapshot()
            steps = [s for s in spans if s.name == "denoise step"]
            servers = {s.service for s in spans if s.kind == SERVER}
            return (
                len(steps) >= STEPS
                and len(servers) >= 4
                and any(s.name == "image_encode" for s in spans)
            )

        wait_for(complete, timeout=60, step=0.2)
        time.sleep(0.5)  # anything late (it must not be another trace) arrives too
        spans = receiver.snapshot()
    finally:
        stop_all(started)

    # One trace: every span the mesh sent belongs to the one request.
    assert len({s.trace_id for s in spans}) == 1, sorted({(s.service, s.name) for s in spans})
    by_id = {s.span_id: s for s in spans}

    # The gateway's server span is the root.
    (root,) = [s for s in spans if s.kind == SERVER and s.service == "ditmesh-gateway"]
    assert root.name == "ditmesh.v1.Gateway/Generate" and root.parent_id == ""
    assert root.attributes["rpc.system"] == "grpc"
    assert root.attributes["rpc.service"] == "ditmesh.v1.Gateway"
    assert root.attributes["rpc.method"] == "Generate"
    assert root.attributes["ditmesh.request_id"] == "trace-me-1"
    assert root.attributes["rpc.grpc.status_code"] == 0

    # Each stage's server span is the child of the gateway's client span for that call,
    # which is the child of the gateway's server span.
    expected = {
        "ditmesh-encoder": "ditmesh.v1.Encoder/Encode",
        "ditmesh-denoiser": "ditmesh.v1.Denoiser/Denoise",
        "ditmesh-vae": "ditmesh.v1.Vae/Decode",
    }
    for service, method in expected.items():
        (server,) = [s for s in spans if s.kind == SERVER and s.service == service]
        assert server.name == f"/{method}" or server.name == method, server
        assert server.attributes["rpc.service"] == method.split("/")[0]
        assert server.attributes["ditmesh.request_id"] == "trace-me-1"
        client_span = by_id[server.parent_id]
        assert client_span.kind == CLIENT and client_span.service == "ditmesh-gateway"
        assert client_span.name == method
        assert client_span.attributes["ditmesh.request_id"] == "trace-me-1"
        assert client_span.attributes["server.port"] > 0
        assert client_span.attributes["rpc.grpc.status_code"] == 0
        assert client_span.parent_id == root.span_id

    # The gang's work: the loop under the denoiser's server span, one child span per step.
    (den_server,) = [s for s in spans if s.kind == SERVER and s.service == "ditmesh-denoiser"]
    (loop,) = [s for s in spans if s.name == "denoise"]
    assert loop.parent_id == den_server.span_id
    assert loop.attributes["gen_ai.request.model"] and loop.attributes["ditmesh.steps"] == STEPS
    steps = [s for s in spans if s.name == "denoise step"]
    assert len(steps) == STEPS
    assert all(s.parent_id == loop.span_id for s in steps)
    assert sorted(s.attributes["ditmesh.step"] for s in steps) == list(range(1, STEPS + 1))

    # The VAE's phases: decode and image encoding under its server span.
    (vae_server,) = [s for s in spans if s.kind == SERVER and s.service == "ditmesh-vae"]
    for phase in ("decode", "image_encode"):
        (p,) = [s for s in spans if s.name == phase]
        assert p.service == "ditmesh-vae" and p.parent_id == vae_server.span_id


_OFF_SCRIPT = """
import sys
from ditmesh.common import tracing
from ditmesh.common.server import ServerConfig, start_server
from ditmesh.common.aio_server import AsyncServer

running = start_server(ServerConfig(stage="encoder"), [])
aio = AsyncServer(ServerConfig(stage="gateway")).start([])
kinds = [type(i).__name__ for i in running.server._state.interceptor_pipeline.interceptors]
assert not tracing.enabled()
assert tracing.client_span("/a.B/C", "127.0.0.1:1", "r") is None
assert tracing.loop_trace("denoise") is tracing.NO_LOOP_TRACE
with tracing.request_span("POST /v1/images/generations", "r", {}), tracing.span("phase"):
    pass
loaded = [m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.instrumentation", "opentelemetry.exporter"))]
running.stop(0)
aio.stop(0)
print(kinds, loaded)
"""


def test_tracing_off_installs_nothing():
    """No endpoint: no tracing interceptor on either server, no SDK, exporter or
    instrumentation even imported, and the helpers hand out nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run(
        [sys.executable, "-c", _OFF_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    kinds, loaded = proc.stdout.strip().rsplit("] [", 1)
    assert "OpenTelemetry" not in kinds and "WorkClock" in kinds, kinds
    assert loaded.strip("[]") == "", loaded


def test_configured_follows_the_standard_variables(monkeypatch):
    from ditmesh.common import tracing

    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)
    assert not tracing.configured()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4317")
    assert tracing.configured()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.configured()
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert tracing.configured()


_HTTP_SCRIPT = """
from ditmesh.common import tracing

assert tracing.setup("gateway")
caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
with tracing.request_span("POST /v1/images/generations", "http-1", {"traceparent": caller}):
    call = tracing.client_span("/ditmesh.v1.Encoder/Encode", "127.0.0.1:7001", "http-1")
    call.end(None)
tracing.shutdown()
"""


def test_a_request_outside_grpc_gets_a_server_span_over_its_calls(receiver):
    """What the HTTP API wraps a request in: a SERVER span that continues the caller's
    trace, with the stage calls' spans as its children."""
    env = _traced_env(receiver.endpoint)
    proc = subprocess.run(
        [sys.executable, "-c", _HTTP_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: len(receiver.snapshot()) >= 2, timeout=30)
    spans = {s.kind: s for s in receiver.snapshot()}
    http, call = spans[SERVER], spans[CLIENT]
    assert http.trace_id == call.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert http.parent_id == "b7ad6b7169203331" and call.parent_id == http.span_id
    assert http.attributes["ditmesh.request_id"] == "http-1"
    assert call.attributes["server.port"] == 7001


def _http_url(log_path, timeout: float = 30) -> str:
    """The gateway's HTTP API address, from the line it logs when it listens."""
    found: list[str] = []

    def listening() -> bool:
        found[:] = re.findall(r"gateway HTTP API listening on (\S+)", log_path.read_text())
        return bool(found)

    wait_for(listening, timeout=timeout, step=0.1)
    return found[0]


def _post(url: str, body: dict, headers: dict) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    for k, v in headers.items():
        req.add_header(k, v)
    with urllib.request.urlopen(req, timeout=180) as r:
        assert r.status == 200
        return r.read()


@pytest.mark.slow
def test_an_http_request_is_one_trace_under_its_server_span(receiver, tiny_flux, tmp_path):
    """Through the gateway's HTTP API, a non-streamed request continues its caller's trace
    and a streamed one (with a partial image) starts its own: in each, the HTTP server span
    is the parent of every stage call, and each stage's span is that call's child."""
    env = _traced_env(receiver.endpoint)
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    started: list[Service] = []
    try:
        start_stages(tiny_flux, env, tmp_path, started)
        enc, den, vae = started
        gateway_args = ["gateway", "--model", tiny_flux, "--encoder", enc.address]
        gateway_args += ["--denoiser", den.address, "--vae", vae.address, "--http-port", "0"]
        started.append(Service(gateway_args, env, tmp_path / "gateway.log"))
        url = _http_url(tmp_path / "gateway.log") + "/v1/images/generations"

        body = {"prompt": "a red fox", "size": "64x64", "steps": STEPS, "seed": 1}
        traceparent = f"00-{caller_trace}-{caller_span}-01"
        plain = json.loads(
            _post(url, body, {"traceparent": traceparent, "x-request-id": "http-trace-1"})
        )
        assert len(plain["data"]) == 1
        streamed = _post(
            url, {**body, "stream": True, "partial_images": 1}, {"x-request-id": "http-trace-2"}
        ).decode()
        assert streamed.count("event: image_generation.partial_image") == 1
        assert streamed.count("event: image_generation.completed") == 1

        def complete() -> bool:
            spans = receiver.snapshot()
            return (
                len([s for s in spans if s.name == "denoise step"]) >= 2 * STEPS
                and len([s for s in spans if s.name == "image_encode"]) >= 3
                and len([s for s in spans if s.kind == SERVER]) >= 8
            )

        wait_for(complete, timeout=60, step=0.2)
        time.sleep(0.5)  # anything late (it must not be a third trace) arrives too
        spans = receiver.snapshot()
    finally:
        stop_all(started)

    traces: dict[str, list[Span]] = {}
    for s in spans:
        traces.setdefault(s.trace_id, []).append(s)
    assert len(traces) == 2, sorted({(s.service, s.name) for s in spans})
    assert caller_trace in traces
    (other,) = set(traces) - {caller_trace}
    expected_calls = {
        "ditmesh.v1.Encoder/Encode": 1,
        "ditmesh.v1.Denoiser/Denoise": 1,
        "ditmesh.v1.Vae/Decode": 1,
    }
    for trace_id, rid, parent, calls in (
        (caller_trace, "http-trace-1", caller_span, expected_calls),
        (other, "http-trace-2", "", {**expected_calls, "ditmesh.v1.Vae/Decode": 2}),
    ):
        trace = traces[trace_id]
        by_id = {s.span_id: s for s in trace}
        (root,) = [s for s in trace if s.kind == SERVER and s.service == "ditmesh-gateway"]
        assert root.name == "POST /v1/images/generations" and root.parent_id == parent
        assert root.attributes["ditmesh.request_id"] == rid
        clients = [s for s in trace if s.kind == CLIENT]
        assert {c.name: sum(x.name == c.name for x in clients) for c in clients} == calls
        for c in clients:
            assert c.service == "ditmesh-gateway" and c.parent_id == root.span_id
            assert c.attributes["ditmesh.request_id"] == rid
        stage_servers = [s for s in trace if s.kind == SERVER and s is not root]
        assert len(stage_servers) == len(clients)
        for server in stage_servers:
            assert by_id[server.parent_id].kind == CLIENT, server
            assert server.attributes["ditmesh.request_id"] == rid
        (loop,) = [s for s in trace if s.name == "denoise"]
        assert by_id[loop.parent_id].service == "ditmesh-denoiser"
        assert len([s for s in trace if s.name == "denoise step"]) == STEPS
