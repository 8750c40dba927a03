"""Prometheus metrics of one service, served over HTTP on `--metrics-port` (0: off).

Every service (the three stages and the gateway) gets the same RPC metrics from one
server interceptor, so an operator reads them alike whichever process they come from:

- `ditmesh_requests_total{stage,method,code}`: calls ended, by gRPC status code name;
- `ditmesh_request_duration_seconds{stage,method}`: their latency (buckets for work of
  seconds to minutes, 0.05 s to 10 min);
- `ditmesh_requests_in_flight{stage,method}`;
- `ditmesh_busy_seconds_total{stage}`: time with at least one call in hand, so
  `rate(...)` is the fraction of time the stage was busy;
- `ditmesh_images_total{stage}`, `ditmesh_pixels_total{stage}`: images the denoiser
  finished (its request's count and size) and the VAE decoded (its last chunk of each);
  counters, so images and pixels per second come from `rate(...)`;
- on a CUDA device: `ditmesh_gpu_memory_{allocated,reserved,total}_bytes{device}` of the
  devices this process holds memory on, and `ditmesh_gpu_utilization_ratio{device}` where
  NVML's Python binding (`pynvml`) is installed;
- the `process_*` metrics of prometheus-client (CPU seconds, resident memory, open fds).

Health checks and reflection are not counted: they would drown the work in noise.
What it leaves to others: the interceptors that feed `CallRecord` are in
services/common/metrics_rpc.py; the gateway's queues, replicas and autoscaler are read
at scrape time by gateway/metrics.py on this registry; where a server installs the
interceptor and starts the endpoint is services/common/server.py and aio_server.py.
Off (no port) costs nothing: no interceptor, no registry, no thread.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
"""Seconds: a tiny model's stage call takes tens of ms, a large video's decode minutes."""

UNCOUNTED_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
)


class _BusyClock:
    """Seconds during which at least one call was in hand (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls = 0
        self._since = 0.0
        self._total = 0.0

    def enter(self) -> None:
        with self._lock:
            if self._calls == 0:
                self._since = time.monotonic()
            self._calls += 1

    def leave(self) -> None:
        with self._lock:
            self._calls -= 1
            if self._calls == 0:
                self._total += time.monotonic() - self._since

    def seconds(self) -> float:
        with self._lock:
            open_span = time.monotonic() - self._since if self._calls else 0.0
            return self._total + open_span


class _BusyCollector(Collector):
    def __init__(self, stage: str, clock: _BusyClock) -> None:
        self._stage = stage
        self._clock = clock

    def collect(self):
        busy = CounterMetricFamily(
            "ditmesh_busy_seconds",
            "Seconds with at least one call in hand; rate() is the busy fraction",
            labels=["stage"],
        )
        busy.add_metric([self._stage], self._clock.seconds())
        yield busy


class GpuCollector(Collector):
    """Memory (and, with pynvml, utilization) of the CUDA devices this process uses.

    Reads torch only if this process already imported it and initialized CUDA, so a
    CPU stage and the gateway export nothing here. Only devices where this process holds
    memory are read: asking another device would create a CUDA context on it.
    """

    def __init__(self, torch_module=None) -> None:
        self._torch = torch_module
        self._nvml = importlib.util.find_spec("pynvml") is not None

    def collect(self):
        torch = self._torch or sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return
        families = {
            "allocated": GaugeMetricFamily(
                "ditmesh_gpu_memory_allocated_bytes",
                "Bytes held by tensors",
                labels=["device"],
            ),
            "reserved": GaugeMetricFamily(
                "ditmesh_gpu_memory_reserved_bytes",
                "Bytes held by PyTorch's caching allocator",
                labels=["device"],
            ),
            "total": GaugeMetricFamily(
                "ditmesh_gpu_memory_total_bytes", "The device's memory", labels=["device"]
            ),
        }
        busy = GaugeMetricFamily(
            "ditmesh_gpu_utilization_ratio",
            "Fraction of the last sample period a kernel ran (NVML)",
            labels=["device"],
        )
        for i in range(torch.cuda.device_count()):
            reserved = torch.cuda.memory_reserved(i)
            if not reserved:
                continue
            label = [f"cuda:{i}"]
            families["allocated"].add_metric(label, torch.cuda.memory_allocated(i))
            families["reserved"].add_metric(label, reserved)
            families["total"].add_metric(label, torch.cuda.mem_get_info(i)[1])
            if self._nvml:
                busy.add_metric(label, torch.cuda.utilization(i) / 100.0)
        yield from families.values()
        if self._nvml:
            yield busy


def _planned_images(msg) -> tuple[int, int] | None:
    """(images, pixels) that a denoiser request's params ask for; None for other messages."""
    if msg.DESCRIPTOR.full_name != "ditmesh.v1.DenoiseRequest":
        return None
    if msg.WhichOneof("payload") != "params":
        return None
    p = msg.params
    n = max(1, p.num_images)
    return n, n * p.height * p.width


def _decoded_pixels(msg) -> int | None:
    """Pixels of the image whose last chunk `msg` is (the VAE's answer); else None."""
    if msg.DESCRIPTOR.full_name == "ditmesh.v1.ImageChunk" and msg.last:
        return msg.width * msg.height
    return None


class CallRecord:
    """One RPC being measured: its start, and the images it produced."""

    __slots__ = ("metrics", "method", "started", "planned", "images", "pixels")

    def __init__(self, metrics: ServiceMetrics, method: str) -> None:
        self.metrics = metrics
        self.method = method
        self.started = time.monotonic()
        self.planned: tuple[int, int] | None = None
        self.images = 0
        self.pixels = 0
        metrics.in_flight.labels(metrics.stage, method).inc()
        metrics.busy.enter()

    def saw_request(self, msg) -> None:
        planned = _planned_images(msg)
        if planned is not None:
            self.planned = planned

    def saw_response(self, msg) -> None:
        pixels = _decoded_pixels(msg)
        if pixels is not None:
            self.images += 1
            self.pixels += pixels

    def requests(self, requests: Iterator) -> Iterator:
        for msg in requests:
            self.saw_request(msg)
            yield msg

    async def async_requests(self, requests):
        async for msg in requests:
            self.saw_request(msg)
            yield msg

    def end(self, code: str) -> None:
        m = self.metrics
        m.busy.leave()
        m.in_flight.labels(m.stage, self.method).dec()
        m.requests.labels(m.stage, self.method, code).inc()
        m.duration.labels(m.stage, self.method).observe(time.monotonic() - self.started)
        images, pixels = self.images, self.pixels
        if code == "OK" and not images and self.planned is not None:
            images, pixels = self.planned
        if images:
            m.images.labels(m.stage).inc(images)
            m.pixels.labels(m.stage).inc(pixels)


class ServiceMetrics:
    """One service's registry, its RPC metrics, and (once `serve`d) its HTTP endpoint."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        # A registry per server, not the process-wide default: tests run several
        # services in one process, and each must export only its own numbers.
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "ditmesh_requests_total",
            "gRPC calls ended, by status code",
            ["stage", "method", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "ditmesh_request_duration_seconds",
            "Latency of gRPC calls, from the first byte in to the last out",
            ["stage", "method"],
            buckets=BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "ditmesh_requests_in_flight", "gRPC calls in hand", ["stage", "method"], registry=r
        )
        self.images = Counter(
            "ditmesh_images_total", "Images produced (denoised or decoded)", ["stage"], registry=r
        )
        self.pixels = Counter(
            "ditmesh_pixels_total", "Pixels of the images produced", ["stage"], registry=r
        )
        self.busy = _BusyClock()
        r.register(_BusyCollector(stage, self.busy))
        r.register(GpuCollector())
        self.port = 0
        self._http = None

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics endpoint (a daemon thread); returns its port."""
        self._http, _ = start_http_server(port, host, registry=self.registry)
        self.port = self._http.server_address[1]
        log.info("%s: metrics on http://%s:%d/metrics", self.stage, host, self.port)
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def method_of(self, details) -> str | None:
        """The method's short name, or None for a service that is not counted."""
        service, _, method = details.method.lstrip("/").rpartition("/")
        return None if service in UNCOUNTED_SERVICES else method
