"""The autoscaler's policy on synthetic snapshots: bounds, hysteresis, bursts, zero, budget."""

from __future__ import annotations

import dataclasses
import random

import pytest

from ditmesh.gateway.autoscale_policy import (
    AutoscalePolicy,
    AutoscaleSettings,
    StageScaling,
    StageSnapshot,
)

PERIOD = 5.0
WINDOW = 60.0


def settings(**stages: StageScaling) -> AutoscaleSettings:
    return AutoscaleSettings(
        stages=stages or {"denoiser": StageScaling(min_replicas=1, max_replicas=10)},
        decision_period_s=PERIOD,
        scale_down_window_s=WINDOW,
        ready_timeout_s=120.0,
    )


class Mesh:
    """Applies the policy's targets and makes every replica ready at once (unless told)."""

    def __init__(self, policy: AutoscalePolicy, replicas: dict[str, int]) -> None:
        self.policy = policy
        self.replicas = dict(replicas)
        self.now = 0.0
        self.history: list[dict[str, int]] = []

    def step(self, **load: StageSnapshot) -> dict[str, int]:
        self.now += PERIOD
        snaps = {
            name: dataclasses.replace(s, replicas=self.replicas[name], ready=self.replicas[name])
            for name, s in load.items()
        }
        for d in self.policy.decide(self.now, snaps):
            assert d.reason and d.inputs is snaps[d.stage]
            self.replicas[d.stage] = d.target
        self.history.append(dict(self.replicas))
        return self.replicas


def load(
    rate: float, service: float = 2.0, queued: int = 0, stage: str = "denoiser"
) -> StageSnapshot:
    return StageSnapshot(
        stage=stage,
        arrival_rate=rate,
        service_s=service,
        queued=queued,
        backlog_s=queued * service,
        inflight=min(1, round(rate * service)),
    )


def test_settings_are_checked():
    with pytest.raises(ValueError, match="min_replicas"):
        StageScaling(min_replicas=0)
    with pytest.raises(ValueError, match="max_replicas"):
        StageScaling(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="budget"):
        AutoscaleSettings(
            stages={"d": StageScaling(min_replicas=2, gpus_per_replica=4)}, gpu_budget=4
        )


def test_bounds_min_and_max():
    mesh = Mesh(
        AutoscalePolicy(settings(denoiser=StageScaling(min_replicas=2, max_replicas=4))),
        {"denoiser": 2},
    )
    assert mesh.step(denoiser=load(rate=100.0))["denoiser"] == 4  # huge load: capped at max
    for _ in range(100):
        mesh.step(denoiser=load(rate=0.0))
    assert mesh.replicas["denoiser"] == 2  # no load: never below min
    mesh.replicas["denoiser"] = 7  # someone set it out of bounds by hand
    assert mesh.step(denoiser=load(rate=0.0))["denoiser"] == 4


def test_steady_noisy_load_does_not_flap():
    rng = random.Random(7)
    mesh = Mesh(AutoscalePolicy(settings()), {"denoiser": 1})
    # 1.1 requests/s x 2 s each = 2.2 busy replicas: 3 at 75 % utilisation; +-15 % noise.
    for _ in range(400):
        mesh.step(denoiser=load(rate=1.1 * rng.uniform(0.85, 1.15), queued=rng.choice([0, 0, 1])))
    counts = [h["denoiser"] for h in mesh.history[20:]]
    changes = sum(1 for a, b in zip(counts, counts[1:], strict=False) if a != b)
    assert changes <= 2, counts
    assert min(counts) >= 3


def test_scale_up_within_one_period_of_a_burst():
    mesh = Mesh(AutoscalePolicy(settings()), {"denoiser": 1})
    for _ in range(10):
        mesh.step(denoiser=load(rate=0.2))
    assert mesh.replicas["denoiser"] == 1
    # A burst: 20 requests queued (40 s of work), objective 5 s: 8 drain it in time.
    assert mesh.step(denoiser=load(rate=2.0, queued=20))["denoiser"] >= 8


def test_scale_down_only_after_the_window_and_if_n_minus_1_meets_the_objective():
    policy = AutoscalePolicy(settings())
    mesh = Mesh(policy, {"denoiser": 1})
    mesh.step(denoiser=load(rate=2.0, queued=10))
    high = mesh.replicas["denoiser"]
    assert high >= 6
    # Load falls to 0.5/s (2 replicas at 75 %): nothing moves for a whole window.
    steps_held = 0
    while mesh.step(denoiser=load(rate=0.5))["denoiser"] == high:
        steps_held += 1
    assert steps_held * PERIOD >= WINDOW - PERIOD
    assert mesh.replicas["denoiser"] == 2


def test_n_minus_1_check_holds_a_scale_down_that_desired_allows():
    policy = AutoscalePolicy(settings(denoiser=StageScaling(target_wait_s=2.0)))
    # 0.3/s x 2 s = 0.6 busy: one replica is enough by utilisation (desired 1), but its
    # queue wait (2 x 0.6 / 0.4 = 3 s) would miss the 2 s objective: 2 stay.
    snap = StageSnapshot(
        stage="denoiser", arrival_rate=0.3, service_s=2.0, inflight=1, replicas=2, ready=2
    )
    decisions = [policy.decide(t, {"denoiser": snap})[0] for t in range(0, 200, 5)]
    assert decisions[-1].desired == 1
    assert all(d.target == 2 for d in decisions)
    assert "would miss the objective" in decisions[-1].reason
    # The same load with a looser objective goes down to 1 once the window has passed.
    loose = AutoscalePolicy(settings(denoiser=StageScaling(target_wait_s=5.0)))
    decisions = [loose.decide(t, {"denoiser": snap})[0] for t in range(0, 200, 5)]
    assert [d.target for d in decisions if d.now < WINDOW] == [2] * int(WINDOW / PERIOD)
    first_down = next(d for d in decisions if d.target != 2)
    assert first_down.target == 1 and first_down.now >= WINDOW


def test_traffic_dropping_to_zero_scales_down():
    mesh = Mesh(AutoscalePolicy(settings()), {"denoiser": 1})
    for _ in range(5):
        mesh.step(denoiser=load(rate=2.0))
    assert mesh.replicas["denoiser"] >= 6
    for _ in range(int(WINDOW / PERIOD) + 2):
        mesh.step(denoiser=load(rate=0.0))
    assert mesh.replicas["denoiser"] == 1


def test_scale_to_zero_and_cold_start():
    stages = {"vae": StageScaling(min_replicas=0, max_replicas=4, scale_to_zero=True)}
    mesh = Mesh(AutoscalePolicy(settings(**stages)), {"vae": 2})
    for _ in range(int(WINDOW / PERIOD) + 2):
        mesh.step(vae=load(rate=0.0, stage="vae"))
    assert mesh.replicas["vae"] == 0
    # Work arrives for a stage at zero, whose service time is not known yet: it starts one.
    cold = StageSnapshot(stage="vae", queued=1, arrival_rate=0.1)
    assert mesh.step(vae=cold)["vae"] == 1


def test_without_scale_to_zero_a_stage_keeps_one():
    mesh = Mesh(AutoscalePolicy(settings()), {"denoiser": 3})
    for _ in range(100):
        mesh.step(denoiser=load(rate=0.0))
    assert mesh.replicas["denoiser"] == 1


def test_a_replica_not_ready_in_time_stops_blocking():
    policy = AutoscalePolicy(settings())
    # 4 asked for, 2 ready; demand has fallen to 1.
    snap = StageSnapshot(stage="denoiser", arrival_rate=0.1, service_s=2.0, replicas=4, ready=2)
    held = [policy.decide(t, {"denoiser": snap})[0] for t in range(0, 115, 5)]
    assert all(d.target == 4 for d in held)  # the two starting ones hold the scale-down back
    assert "still starting" in held[-1].reason
    late = policy.decide(125.0, {"denoiser": snap})[0]
    assert late.target < 4  # past ready_timeout they no longer do


def test_a_replica_not_ready_in_time_is_not_counted_as_capacity():
    policy = AutoscalePolicy(settings())
    # Demand of 3 replicas; 3 asked for but one is stuck (no node for it).
    snap = StageSnapshot(stage="denoiser", arrival_rate=1.0, service_s=2.0, replicas=3, ready=2)
    assert policy.decide(0.0, {"denoiser": snap})[0].target == 3
    d = policy.decide(125.0, {"denoiser": snap})[0]
    assert d.target == 4 and "not ready" in d.reason


def test_gpu_budget_whole_gangs_shared_by_backlog():
    stages = {
        "encoder": StageScaling(min_replicas=1, max_replicas=8, gpus_per_replica=1),
        "denoiser": StageScaling(min_replicas=1, max_replicas=8, gpus_per_replica=4),
        "vae": StageScaling(min_replicas=1, max_replicas=8, gpus_per_replica=2),
    }
    cfg = settings(**stages)
    cfg.gpu_budget = 16
    policy = AutoscalePolicy(cfg)
    snaps = {
        "encoder": StageSnapshot(
            stage="encoder",
            arrival_rate=2.0,
            service_s=0.1,
            queued=2,
            backlog_s=0.2,
            replicas=1,
            ready=1,
        ),
        "denoiser": StageSnapshot(
            stage="denoiser",
            arrival_rate=2.0,
            service_s=4.0,
            queued=40,
            backlog_s=160.0,
            replicas=1,
            ready=1,
        ),
        "vae": StageSnapshot(
            stage="vae",
            arrival_rate=2.0,
            service_s=1.0,
            queued=10,
            backlog_s=10.0,
            replicas=1,
            ready=1,
        ),
    }
    decisions = {d.stage: d for d in policy.decide(0.0, snaps)}
    targets = {n: d.target for n, d in decisions.items()}
    gpus = sum(targets[n] * stages[n].gpus_per_replica for n in targets)
    assert gpus <= 16
    short = [n for n, d in decisions.items() if d.target < d.desired]
    assert short and all("GPU budget" in decisions[n].reason for n in short)
    # What is left could not hold another whole gang of any stage still short of desired.
    assert 16 - gpus < min(stages[n].gpus_per_replica for n in short)
    assert targets["denoiser"] >= 2  # the most queued GPU-seconds got gangs
    assert all(targets[n] >= 1 for n in targets)


def test_each_pool_is_sized_for_its_own_share_of_one_forecast():
    # Two models behind one gateway share the encoder; each has its own denoiser pool.
    # 1 request/s: 60 % FLUX.1-dev (4 s each), 40 % schnell (0.6 s each).
    stages = {
        "encoder": StageScaling(max_replicas=10),
        "denoiser-dev": StageScaling(max_replicas=10),
        "denoiser-schnell": StageScaling(max_replicas=10),
    }
    policy = AutoscalePolicy(settings(**stages))
    mesh = Mesh(policy, {name: 1 for name in stages})
    for _ in range(60):
        mesh.step(
            **{
                "encoder": load(rate=1.0, service=0.1, stage="encoder"),
                "denoiser-dev": load(rate=0.6, service=4.0, stage="denoiser-dev"),
                "denoiser-schnell": load(rate=0.4, service=0.6, stage="denoiser-schnell"),
            }
        )
    # dev: 0.6/s x 4 s / 75 % = 3.2 -> 4 (sized for all arrivals it would be 1.0 x 4 / 0.75: 6).
    assert mesh.replicas == {"encoder": 1, "denoiser-dev": 4, "denoiser-schnell": 1}
    snaps = {
        "encoder": load(rate=1.0, service=0.1, stage="encoder"),
        "denoiser-dev": load(rate=0.6, service=4.0, stage="denoiser-dev"),
        "denoiser-schnell": load(rate=0.4, service=0.6, stage="denoiser-schnell"),
    }
    decisions = {d.stage: d for d in policy.decide(mesh.now + PERIOD, snaps)}
    assert decisions["denoiser-dev"].share == pytest.approx(0.3)  # of 2 pool visits/s
    assert decisions["denoiser-dev"].forecast_rate == pytest.approx(0.6)
    # One forecast for all: every pool's is its share of the same mesh figure.
    mesh_rates = {d.forecast_rate / d.share for d in decisions.values()}
    assert max(mesh_rates) == pytest.approx(min(mesh_rates))
    assert "share=0.30" in decisions["denoiser-dev"].log_line()


def test_a_pools_share_is_not_thrown_by_one_quiet_period():
    stages = {"encoder": StageScaling(max_replicas=10), "denoiser": StageScaling(max_replicas=10)}
    policy = AutoscalePolicy(settings(**stages))
    for t in range(0, 600, 5):
        policy.decide(float(t), {"encoder": load(1.0, 0.1, stage="encoder"), "denoiser": load(1.0)})
    # One period in which no request happened to reach the denoiser: the mix has not moved.
    quiet = StageSnapshot(stage="denoiser", service_s=2.0, inflight=1)
    d = {
        x.stage: x
        for x in policy.decide(
            600.0, {"encoder": load(1.0, 0.1, stage="encoder"), "denoiser": quiet}
        )
    }
    assert d["denoiser"].share > 0.48 and d["denoiser"].desired >= 3


def test_backlog_is_drained_over_the_cold_start_when_that_is_longer():
    burst = StageSnapshot(
        stage="denoiser",
        arrival_rate=0.2,
        service_s=2.0,
        queued=20,
        backlog_s=40.0,
        inflight=1,
        replicas=1,
        ready=1,
    )
    # Objective 5 s, no cold start: 40 s of backlog wants 8 more replicas at once.
    fast = AutoscalePolicy(settings(denoiser=StageScaling(max_replicas=10, target_wait_s=5.0)))
    assert fast.decide(0.0, {"denoiser": burst})[0].target >= 9
    # A replica takes 60 s to start: by then one ready replica has drained 60 s of work, so
    # the backlog asks for 40 / 60 of a replica, not 40 / 5 (0.2 x 2 / 0.75 + 0.67 = 1.2 -> 2).
    slow = StageScaling(max_replicas=10, target_wait_s=5.0, cold_start_s=60.0)
    d = AutoscalePolicy(settings(denoiser=slow)).decide(0.0, {"denoiser": burst})[0]
    assert d.target == 2 and d.cold_start_s == 60.0 and "cold_start=60s" in d.log_line()
    with pytest.raises(ValueError, match="cold_start_s"):
        StageScaling(cold_start_s=-1.0)


def test_cold_start_is_measured_from_the_policys_own_scale_up():
    policy = AutoscalePolicy(settings(denoiser=StageScaling(max_replicas=20, target_wait_s=5.0)))

    def snap(replicas: int, ready: int, queued: int = 20) -> dict[str, StageSnapshot]:
        return {
            "denoiser": StageSnapshot(
                stage="denoiser",
                arrival_rate=0.2,
                service_s=2.0,
                queued=queued,
                backlog_s=2.0 * queued,
                inflight=1,
                replicas=replicas,
                ready=ready,
            )
        }

    up = policy.decide(0.0, snap(1, 1))[0]
    assert up.target >= 9 and up.cold_start_s == 0.0  # nothing measured, none configured
    for t in range(5, 60, 5):  # asked for at 0, still starting
        assert policy.decide(float(t), snap(up.target, 1, queued=0))[0].cold_start_s == 0.0
    assert policy.decide(60.0, snap(up.target, up.target, queued=0))[0].cold_start_s == 60.0
    # The next burst's backlog is drained over the 60 s measured, not the 5 s objective.
    assert policy.decide(65.0, snap(up.target, up.target))[0].desired == 2
    # A scale-up that is never applied (a dry run) measures nothing.
    dry = AutoscalePolicy(settings(denoiser=StageScaling(max_replicas=20, cold_start_s=30.0)))
    for t in range(0, 200, 5):
        assert dry.decide(float(t), snap(1, 1))[0].cold_start_s == 30.0


def test_every_decision_logs_its_inputs():
    policy = AutoscalePolicy(settings())
    d = policy.decide(0.0, {"denoiser": load(rate=1.0, queued=2)})[0]
    line = d.log_line()
    for word in ("denoiser", "desired", "queued=2", "backlog=", "p95_wait=", "forecast="):
        assert word in line


# -- the loop and the local backend, with stand-ins for processes ---------------------------


class FakeProcess:
    """Stands in for ditmesh.local.StageProcess: listens at once on a made-up address."""

    count = 0

    def __init__(self, stage: str) -> None:
        FakeProcess.count += 1
        self.stage = stage
        self.address = f"127.0.0.1:{50000 + FakeProcess.count}"
        self.terminated = False

    def wait_listening(self, timeout: float) -> str:
        return self.address

    def terminate(self) -> None:
        self.terminated = True

    def wait(self, timeout: float) -> int:
        return 0


def test_local_process_backend_starts_and_stops_and_reports_addresses():
    from ditmesh.gateway.autoscale_backends import LocalProcessBackend

    pool: dict[str, set[str]] = {"denoiser": set()}
    backend = LocalProcessBackend(
        spawn=FakeProcess,
        on_added=lambda stage, addr: pool[stage].add(addr),
        on_removed=lambda stage, addr: pool[stage].discard(addr),
        wait_healthy=lambda addr, timeout: None,
    )
    backend.scale("denoiser", 3, "up")
    for t in backend.threads:
        t.join(5)
    assert backend.current("denoiser") == (3, 3)
    assert pool["denoiser"] == {p.address for p in backend.procs["denoiser"]}
    first = backend.procs["denoiser"][0]
    backend.scale("denoiser", 1, "down")
    for t in backend.threads:
        t.join(5)
    assert backend.current("denoiser") == (1, 1)
    assert pool["denoiser"] == {first.address}  # the oldest stays
    backend.stop_all()
    assert pool["denoiser"] == set() and first.terminated


def test_autoscaler_run_decides_every_period_and_stops():
    import asyncio

    from ditmesh.gateway.autoscale_loop import Autoscaler, backend_for

    scaled: list[tuple[str, int]] = []
    counts = {"denoiser": 1}

    class Backend:
        def current(self, stage):
            return counts[stage], counts[stage]

        def scale(self, stage, replicas, reason):
            scaled.append((stage, replicas))
            counts[stage] = replicas

    cfg = settings()
    cfg.decision_period_s = 0.01
    auto = Autoscaler(
        AutoscalePolicy(cfg), Backend(), lambda: {"denoiser": load(rate=1.0, queued=5)}
    )

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(auto.run(stop))
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert scaled and scaled[0][1] > 1
    assert len(scaled) == 1  # one scale-up, then steady
    assert auto.last and auto.last[0].inputs.replicas == counts["denoiser"]
    with pytest.raises(ValueError, match="needs a backend"):
        backend_for("on", None, counts=lambda s: (0, 0))
    with pytest.raises(ValueError, match="must be one of"):
        backend_for("sometimes", None, counts=lambda s: (0, 0))
    assert backend_for("off", None, counts=lambda s: (2, 1)).current("vae") == (2, 1)
