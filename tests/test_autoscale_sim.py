"""bench/autoscale_sim.py on a tiny trace: its bookkeeping holds, and it drives the real code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from ditmesh.gateway import autoscale_policy, routing

_PATH = Path(__file__).resolve().parent.parent / "bench" / "autoscale_sim.py"


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("autoscale_sim", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["autoscale_sim"] = mod  # dataclasses look their module up here
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("autoscale_sim", None)


@pytest.fixture(scope="module")
def result(sim):
    # Half an hour, night (zero arrivals) at both ends: idle stretches the autoscalers can use.
    spec = sim.TraceSpec(hours=0.5, peak_rate=0.4, bursts=1, seed=7)
    return sim.simulate(spec, sim.SimSettings())


def test_uses_the_gateways_policy_and_router(sim):
    assert sim.AutoscalePolicy is autoscale_policy.AutoscalePolicy
    assert sim.StageSnapshot is autoscale_policy.StageSnapshot
    assert sim.route is routing.route


def test_trace_is_deterministic_and_has_idle_stretches(sim):
    spec = sim.TraceSpec(hours=0.5, peak_rate=0.4, bursts=1, seed=7)
    a, _ = sim.make_trace(spec)
    b, _ = sim.make_trace(spec)
    assert [(r.t, r.model, r.size) for r in a] == [(r.t, r.model, r.size) for r in b]
    assert len(a) > 50
    assert {r.model for r in a} == {"dev", "schnell"} and {r.size for r in a} == {1024, 2048}
    assert a[0].t > 60 and a[-1].t < 0.5 * 3600 - 60  # nothing arrives near either end


def test_every_request_completes_exactly_once(result):
    n = len(result["trace"])
    for key in result:
        if key in ("trace", "bursts"):
            continue
        sim, trace, summary = result[key]
        assert len(trace) == n
        assert all(r.done_count == 1 and r.done >= r.t for r in trace), key
        assert sorted(r.rid for r in sim.completed) == list(range(n)), key
        assert summary["completed"] == n


def test_latency_is_never_below_the_bare_service_time(result):
    for key in ("static", "hpa", "ditmesh"):
        for r in result[key][1]:
            assert r.done - r.t >= r.bare_s - 1e-9


def test_autoscaling_holds_fewer_gpu_hours_than_static_with_idle_periods(result):
    static = result["static"][2]["gpu_h"]
    assert result["static"][2]["events"] == 0
    for key in ("hpa", "ditmesh"):
        assert result[key][2]["gpu_h"] <= static, key
        assert result[key][2]["events"] > 0, key


def test_no_negative_queue_or_backlog(result):
    for key in ("static", "hpa", "ditmesh"):
        for row in result[key][0].samples:
            assert all(v >= 0 for v in row.values())
    decisions = result["ditmesh"][0].decisions
    assert decisions
    for d in decisions:
        s = d.inputs
        assert s.queued >= 0 and s.backlog_s >= 0 and s.inflight >= 0 and s.p95_wait_s >= 0
        assert 0 <= s.ready <= s.replicas and d.target >= 1
