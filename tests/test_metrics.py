"""Prometheus metrics (issue 15): every service's /metrics on a real mesh of a tiny model,
the names' conventions, metrics off by default, the GPU collector, and a real Prometheus
server scraping the mesh and answering queries on its HTTP API."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ditmesh.common.metrics import BUCKETS, GpuCollector
from ditmesh.common.server import ServerConfig, StageOptions, start_server
from ditmesh.gateway.metrics import GatewayCollector
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

SIZE = 64
STAGES = ("encoder", "denoiser", "vae")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MetricsMesh:
    """The four services in this process, each serving /metrics on its own port."""

    def __init__(self, model: str) -> None:
        from ditmesh.denoiser.service import serve as serve_denoiser
        from ditmesh.encoder.service import serve as serve_encoder
        from ditmesh.gateway.main import serve as serve_gateway
        from ditmesh.vae.service import serve as serve_vae

        def options() -> StageOptions:
            return StageOptions(metrics_port=free_port())

        self.stages = {
            "encoder": serve_encoder(model, options()),
            "denoiser": serve_denoiser(model, options()),
            "vae": serve_vae(model, options()),
        }
        self.gateway = serve_gateway(
            model,
            encoder=[self.stages["encoder"].address],
            denoiser=[self.stages["denoiser"].address],
            vae=[self.stages["vae"].address],
            metrics_port=free_port(),
        )
        self.servers = {**self.stages, "gateway": self.gateway}
        self.channel = grpc.insecure_channel(self.gateway.address)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def metrics_port(self, service: str) -> int:
        return self.servers[service].metrics.port

    def scrape(self, service: str) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted labels): value} of one service's /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port(service)}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def families(self, service: str):
        url = f"http://127.0.0.1:{self.metrics_port(service)}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return list(text_string_to_metric_families(r.read().decode()))

    def generate(self, seed: int = 0, steps: int = 2, **kw) -> gateway_pb2.GenerateResponse:
        fields = dict(prompt="a red circle", height=SIZE, width=SIZE, steps=steps, seed=seed)
        request = gateway_pb2.GenerateRequest(**{**fields, **kw})
        return self.stub.GenerateUnary(request, timeout=120)

    def stop(self) -> None:
        self.channel.close()
        for s in self.servers.values():
            s.stop(0)


@pytest.fixture(scope="module")
def mesh(tiny_flux):
    m = MetricsMesh(tiny_flux)
    yield m
    m.stop()


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.slow  # a whole mesh in this process
def test_each_service_counts_its_work_and_the_gateway_its_queues(mesh):
    before = {s: mesh.scrape(s) for s in mesh.servers}
    for seed in range(2):
        mesh.generate(seed=seed)
    with pytest.raises(grpc.RpcError) as bad:
        mesh.generate(height=SIZE + 1)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = {s: mesh.scrape(s) for s in mesh.servers}

    def delta(service, name, **labels):
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    for stage, method in (("encoder", "Encode"), ("denoiser", "Denoise"), ("vae", "Decode")):
        ok = dict(stage=stage, method=method, code="OK")
        assert delta(stage, "ditmesh_requests_total", **ok) == 2, stage
        hist = dict(stage=stage, method=method)
        assert delta(stage, "ditmesh_request_duration_seconds_count", **hist) == 2, stage
        assert value(after[stage], "ditmesh_requests_in_flight", **hist) == 0
        assert delta(stage, "ditmesh_busy_seconds_total", stage=stage) > 0
        # Health checks (the gateway's, every second) are not counted as work.
        assert not any(dict(k[1]).get("method") == "Check" for k in after[stage])
    for stage in ("denoiser", "vae"):
        assert delta(stage, "ditmesh_images_total", stage=stage) == 2
        assert delta(stage, "ditmesh_pixels_total", stage=stage) == 2 * SIZE * SIZE
    assert value(after["encoder"], "ditmesh_images_total", stage="encoder") == 0

    gw = "gateway"
    assert delta(gw, "ditmesh_requests_total", stage=gw, method="GenerateUnary", code="OK") == 2
    assert (
        delta(
            gw, "ditmesh_requests_total", stage=gw, method="GenerateUnary", code="INVALID_ARGUMENT"
        )
        == 1
    )
    model = mesh.gateway.gateway.default_model
    assert delta(gw, "ditmesh_gateway_requests_total", model=model, code="OK") == 2
    assert delta(gw, "ditmesh_gateway_request_duration_seconds_count", model=model, code="OK") == 2
    for phase in ("encode", "denoise", "decode"):
        labels = dict(model=model, phase=phase)
        assert delta(gw, "ditmesh_gateway_stage_duration_seconds_count", **labels) == 2, phase
        assert delta(gw, "ditmesh_gateway_stage_duration_seconds_sum", **labels) > 0, phase
    for stage in STAGES:
        labels = dict(model=model, stage=stage)
        assert delta(gw, "ditmesh_gateway_queue_wait_seconds_count", **labels) == 2, stage
    for stage in STAGES:
        pool = dict(stage=stage, pool=stage)
        assert value(after[gw], "ditmesh_gateway_replicas", **pool) == 1
        assert value(after[gw], "ditmesh_gateway_healthy_replicas", **pool) == 1
        assert value(after[gw], "ditmesh_gateway_queued_requests", **pool) == 0
        assert value(after[gw], "ditmesh_gateway_in_flight_requests", **pool) == 0
        assert delta(gw, "ditmesh_gateway_admitted_requests_total", **pool) == 2
    assert value(after[gw], "ditmesh_gateway_running_requests") == 0
    # --autoscale off: no decision to export.
    assert not any(name == "ditmesh_autoscaler_desired_replicas" for name, _ in after[gw])


@pytest.mark.slow
def test_names_follow_prometheus_conventions(mesh):
    mesh.generate(seed=7)
    for service in mesh.servers:
        families = mesh.families(service)
        names = {f.name for f in families}
        assert "ditmesh_requests" in names and "process_cpu_seconds" in names, service
        for f in families:
            assert f.name.startswith(("ditmesh_", "process_")), f.name
            if f.type == "counter":
                assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name
            if f.type == "histogram":
                assert f.name.endswith("_seconds"), f.name
                bounds = sorted(
                    float(s.labels["le"]) for s in f.samples if s.name.endswith("_bucket")
                )
                # Queue waits add a bucket for no wait at all.
                extra = {0.0} if f.name == "ditmesh_gateway_queue_wait_seconds" else set()
                assert set(bounds) == {*extra, *BUCKETS, float("inf")}, f.name
                assert BUCKETS[0] == 0.05 and BUCKETS[-1] == 600.0


class _FakePool:
    def __init__(self, name, label, pending, up, known):
        self.name, self.label, self.pending, self.inflight = name, label, pending, 1
        self.admitted = 10 + pending
        self.replicas = SimpleNamespace(replicas=[object()] * known, up=lambda: [object()] * up)

    def backlog_seconds(self):
        return 2.5 * self.pending


def test_gateway_collector_reads_every_pool_and_the_autoscaler():
    pools = [
        _FakePool("encoder", "encoder", 0, 1, 1),
        _FakePool("denoiser", "denoiser@dev", 3, 1, 2),
        _FakePool("denoiser", "denoiser@schnell", 1, 0, 1),
        _FakePool("vae", "vae", 0, 2, 2),
    ]
    server = SimpleNamespace(
        gateway=SimpleNamespace(pools=pools, running=5),
        autoscaler=SimpleNamespace(
            desired={"denoiser@dev": 3, "encoder": 1},
            autoscaler=SimpleNamespace(
                scale_events={("denoiser@dev", "up"): 2, ("denoiser@dev", "down"): 1}
            ),
        ),
        run=lambda coro, timeout=None: asyncio.run(coro),
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in GatewayCollector(server).collect()
        for s in f.samples
    }
    dev = dict(stage="denoiser", pool="denoiser@dev")
    schnell = dict(stage="denoiser", pool="denoiser@schnell")
    assert value(samples, "ditmesh_gateway_queued_requests", **dev) == 3
    assert value(samples, "ditmesh_gateway_queued_work_seconds", **dev) == 7.5
    assert value(samples, "ditmesh_gateway_queued_requests", **schnell) == 1
    assert value(samples, "ditmesh_gateway_replicas", **dev) == 2
    assert value(samples, "ditmesh_gateway_healthy_replicas", **dev) == 1
    assert value(samples, "ditmesh_gateway_healthy_replicas", **schnell) == 0
    assert value(samples, "ditmesh_gateway_in_flight_requests", stage="vae", pool="vae") == 1
    assert value(samples, "ditmesh_gateway_admitted_requests_total", **dev) == 13
    assert value(samples, "ditmesh_gateway_running_requests") == 5
    assert value(samples, "ditmesh_autoscaler_desired_replicas", pool="denoiser@dev") == 3
    assert value(samples, "ditmesh_autoscaler_desired_replicas", pool="encoder") == 1
    events = "ditmesh_autoscaler_scale_events_total"
    assert value(samples, events, pool="denoiser@dev", direction="up") == 2
    assert value(samples, events, pool="denoiser@dev", direction="down") == 1
    assert sum(1 for name, _ in samples if name == "ditmesh_gateway_queued_requests") == 4


def test_metrics_are_off_without_a_port():
    server = start_server(ServerConfig(stage="nothing"), [])
    try:
        assert server.metrics is None
    finally:
        server.stop(0)


@pytest.mark.slow  # a stage process
def test_serve_takes_a_metrics_port(tiny_flux):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditmesh.cli", "serve", "encoder", "--model", tiny_flux]
        + ["--metrics-port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("encoder listening on "), line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'ditmesh_busy_seconds_total{stage="encoder"}' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_a_bad_metrics_port_is_one_line(capsys):
    from ditmesh.cli import main

    assert main(["serve", "encoder", "--model", "unused", "--metrics-port", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --metrics-port must be 0..65535; got -1"


class _FakeCuda:
    """Two devices; this process holds memory on the second only."""

    def is_initialized(self):
        return True

    def device_count(self):
        return 2

    def memory_reserved(self, i):
        return [0, 3 << 30][i]

    def memory_allocated(self, i):
        return [0, 2 << 30][i]

    def mem_get_info(self, i):
        assert i == 1, "a device this process does not use was asked (a new context)"
        return (1 << 30, 80 << 30)

    def utilization(self, i):
        return 40


class _FakeTorch:
    cuda = _FakeCuda()


def test_gpu_collector_reads_only_the_devices_in_use():
    collector = GpuCollector(_FakeTorch())
    collector._nvml = True
    got = {(s.name, s.labels["device"]): s.value for f in collector.collect() for s in f.samples}
    assert got == {
        ("ditmesh_gpu_memory_allocated_bytes", "cuda:1"): 2 << 30,
        ("ditmesh_gpu_memory_reserved_bytes", "cuda:1"): 3 << 30,
        ("ditmesh_gpu_memory_total_bytes", "cuda:1"): 80 << 30,
        ("ditmesh_gpu_utilization_ratio", "cuda:1"): 0.4,
    }


def test_gpu_collector_is_silent_on_cpu():
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("this process uses a GPU")
    assert list(GpuCollector().collect()) == []


# ------------------------------------------------------------ A real Prometheus server


class Prometheus:
    """`prometheus` (the Debian package's binary) as a child process, scraping every 1 s."""

    def __init__(self, binary: str, targets: dict[str, int], tmp_path) -> None:
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
            for job, port in targets.items()
        )
        config = tmp_path / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}"
        )
        self.port = free_port()
        self.log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.log_path = tmp_path / "prometheus.log"
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("prometheus did not start:\n" + self.log_path.read_text())
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, promql: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=10) as r:
            answer = json.load(r)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def wait_for(self, promql: str, ok, timeout: float = 60.0) -> list[dict]:
        """Polls a query until `ok(result)`; fails with the last answer."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if ok(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql}: still {result} after {timeout:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def by(label: str, result: list[dict]) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_mesh_and_answers_queries(mesh, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` binary is not installed (Debian: apt-get install prometheus)")
    targets = {f"ditmesh-{s}": mesh.metrics_port(s) for s in mesh.servers}
    prom = Prometheus(binary, targets, tmp_path)
    try:
        up = prom.wait_for(
            "up", lambda r: len(r) == 4 and all(v == 1 for v in by("job", r).values())
        )
        assert set(by("job", up)) == set(targets)
        before = time.monotonic()
        # A burst larger than the denoiser's slots, so requests queue for it while
        # Prometheus scrapes; each takes long enough (steps) to be seen waiting.
        burst = 8
        with ThreadPoolExecutor(burst) as pool:
            list(pool.map(lambda seed: mesh.generate(seed=seed, steps=30), range(burst)))
        assert time.monotonic() - before > 2, "the burst was over before Prometheus could see it"

        ok = 'ditmesh_gateway_requests_total{job="ditmesh-gateway",code="OK"}'
        prom.wait_for(f"sum({ok})", lambda r: r and float(r[0]["value"][1]) >= burst)
        queued = prom.query(
            'max_over_time(ditmesh_gateway_queued_requests{job="ditmesh-gateway"}[5m])'
        )
        depth = by("stage", queued)
        assert set(depth) == set(STAGES), queued
        assert depth["denoiser"] >= 1, f"no queue seen for the denoiser: {queued}"
        p50 = prom.query(
            "histogram_quantile(0.5, sum by (le) "
            '(increase(ditmesh_gateway_request_duration_seconds_bucket{code="OK"}[5m])))'
        )
        assert p50 and 0 < float(p50[0]["value"][1]) < 600, p50
        phases = prom.query(
            "sum by (phase) (increase(ditmesh_gateway_stage_duration_seconds_count[5m]))"
        )
        assert {"encode", "denoise", "decode"} <= set(by("phase", phases)), phases
        stage_latency = prom.query(
            "sum by (stage) (ditmesh_request_duration_seconds_count"
            '{method=~"Encode|Denoise|Decode"})'
        )
        assert set(by("stage", stage_latency)) == set(STAGES), stage_latency
        images = prom.query('ditmesh_images_total{stage="vae"}')
        assert images and float(images[0]["value"][1]) >= burst, images
    finally:
        prom.stop()
