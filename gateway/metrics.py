"""The gateway's own Prometheus metrics, on the registry of its server (`--metrics-port`).

Read at scrape time from the gateway's state, with no hook in the code that changes it
(`GatewayCollector`, one row per stage pool; `stage` is encoder, denoiser or vae,
`pool` the pool's label, `stage@model` where a stage has several pools):
- `ditmesh_gateway_queued_requests`: requests admitted that still need that pool;
- `ditmesh_gateway_queued_work_seconds`: their estimated work per slot (the backlog
  admission compares with its bound);
- `ditmesh_gateway_in_flight_requests`: calls running on its replicas;
- `ditmesh_gateway_admitted_requests_total`: requests that took a place in its queue;
- `ditmesh_gateway_replicas`, `ditmesh_gateway_healthy_replicas`: known, and up;
- `ditmesh_gateway_running_requests`: requests admitted and not finished (all pools);
- `ditmesh_autoscaler_desired_replicas{pool}`: the autoscaler's last decision per pool,
  while it runs (absent with `--autoscale off` and before its first decision);
  `ditmesh_autoscaler_scale_events_total{pool,direction}`: decisions that changed a pool's
  target (up or down) from the last one, dry-run included.
The state belongs to the gateway's event loop, so the collector reads it there.

Observed as each request ends (`observe_finish`, called once from `Gateway.finish`):
- `ditmesh_gateway_requests_total{model,code}`: requests that ran, by how they ended;
- `ditmesh_gateway_request_duration_seconds{model,code}`: admission to the end;
- `ditmesh_gateway_stage_duration_seconds{model,phase}`: each phase the request's run
  timed (encode, denoise, decode, and whatever else `RequestRun.timings` records);
- `ditmesh_gateway_queue_wait_seconds{model,stage}`: its wait for a slot at each stage
  it reached (over every attempt; gateway/timings.py).
Requests refused before they run (bad input, queue full) are counted, by code, in the
RPC metrics every service has (`ditmesh_requests_total{stage="gateway"}`,
services/common/metrics.py).
"""

from __future__ import annotations

import weakref

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ditmesh.common.metrics import BUCKETS

SCRAPE_TIMEOUT_S = 5.0
"""How long a scrape waits for the gateway's loop (busy, or stopping)."""

_POOL_GAUGES = {
    "queued_requests": "Requests admitted that still need this pool",
    "queued_work_seconds": "Estimated seconds of queued work per slot",
    "in_flight_requests": "Calls running on this pool's replicas",
    "replicas": "Replicas known",
    "healthy_replicas": "Replicas up (healthy, not draining, not penalised)",
}


def _snapshot(server) -> dict:
    """The numbers to export, read on the gateway's loop (where its state changes)."""
    gateway = server.gateway
    pools = []
    for pool in gateway.pools:
        pools.append(
            (
                pool.name,
                pool.label,
                {
                    "queued_requests": pool.pending,
                    "queued_work_seconds": pool.backlog_seconds(),
                    "in_flight_requests": pool.inflight,
                    "replicas": len(pool.replicas.replicas),
                    "healthy_replicas": len(pool.replicas.up()),
                },
                pool.admitted,
            )
        )
    scaler = server.autoscaler
    desired = dict(scaler.desired) if scaler is not None else {}
    events = dict(getattr(scaler.autoscaler, "scale_events", {})) if scaler is not None else {}
    return {"pools": pools, "running": gateway.running, "desired": desired, "events": events}


class GatewayCollector(Collector):
    """Exports the gateway's queues, replicas and autoscaler (see the module doc)."""

    def __init__(self, server) -> None:
        self._server = server

    def collect(self):
        async def read() -> dict:
            return _snapshot(self._server)

        snap = self._server.run(read(), timeout=SCRAPE_TIMEOUT_S)
        gauges = {
            key: GaugeMetricFamily(f"ditmesh_gateway_{key}", text, labels=["stage", "pool"])
            for key, text in _POOL_GAUGES.items()
        }
        admitted = CounterMetricFamily(
            "ditmesh_gateway_admitted_requests",
            "Requests that took a place in this pool's queue",
            labels=["stage", "pool"],
        )
        for stage, label, values, count in snap["pools"]:
            for key, value in values.items():
                gauges[key].add_metric([stage, label], value)
            admitted.add_metric([stage, label], count)
        yield from gauges.values()
        yield admitted
        yield GaugeMetricFamily(
            "ditmesh_gateway_running_requests",
            "Requests admitted and not yet finished",
            value=snap["running"],
        )
        if snap["desired"]:
            desired = GaugeMetricFamily(
                "ditmesh_autoscaler_desired_replicas",
                "Replicas the autoscaler last decided on",
                labels=["pool"],
            )
            for pool, count in sorted(snap["desired"].items()):
                desired.add_metric([pool], count)
            yield desired
        if snap.get("events"):
            events = CounterMetricFamily(
                "ditmesh_autoscaler_scale_events",
                "Decisions that changed a pool's target from the last one (also in dry-run)",
                labels=["pool", "direction"],
            )
            for (pool, direction), count in sorted(snap["events"].items()):
                events.add_metric([pool, direction], count)
            yield events


class RequestMetrics:
    """What is observed as each request ends (see the module doc)."""

    def __init__(self, registry) -> None:
        self.requests = Counter(
            "ditmesh_gateway_requests_total",
            "Requests that ran, by how they ended",
            ["model", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "ditmesh_gateway_request_duration_seconds",
            "Seconds from admission to the end of a request",
            ["model", "code"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.phases = Histogram(
            "ditmesh_gateway_stage_duration_seconds",
            "Seconds of each phase of a request that ran to the end",
            ["model", "phase"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "ditmesh_gateway_queue_wait_seconds",
            "Seconds a request waited for a slot at a stage (every attempt together)",
            ["model", "stage"],
            buckets=(0.0, *BUCKETS),
            registry=registry,
        )

    def observe(self, run, status: str, seconds: float) -> None:
        model = run.plan.model.name
        # The status is a code name, maybe followed by why ("CANCELLED by the client").
        code = status.split(" ", 1)[0]
        self.requests.labels(model, code).inc()
        self.duration.labels(model, code).observe(seconds)
        for phase, value in run.timings.items():
            if phase != "total":
                self.phases.labels(model, phase).observe(value)
        for stage in run.breakdown.stages():
            self.queue_wait.labels(model, stage.stage).observe(stage.queue_seconds)


_BY_GATEWAY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def watch_gateway(server) -> None:
    """Adds the gateway's metrics to its server's registry (nothing when metrics are off).

    Call once `server.gateway` exists and before the server starts serving.
    """
    if server.metrics is None:
        return
    registry = server.metrics.registry
    registry.register(GatewayCollector(server))
    _BY_GATEWAY[server.gateway] = RequestMetrics(registry)


def observe_finish(gateway, run, status: str, seconds: float) -> None:
    """Records one request that ended (a no-op for a gateway without metrics)."""
    metrics = _BY_GATEWAY.get(gateway)
    if metrics is not None:
        metrics.observe(run, status, seconds)
