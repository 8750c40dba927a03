"""The autoscaler's view of the gateway and its flags, without stages (unit tests).

What a snapshot holds (arrivals, queued work, p95 queue wait), scale-to-zero admission
(wait while a replica starts, then UNAVAILABLE with a retry hint), the flags, and the
options of a gateway whose stage has several pools (one per model that differs in it):
each pool gets its stage's options, and a workload is per pool.
"""

from __future__ import annotations

import argparse
import asyncio

import pytest

from ditmesh.common.errors import InvalidArgument, Unavailable
from ditmesh.gateway.autoscale_backends import Workload
from ditmesh.gateway.autoscale_gateway import (
    LoadReader,
    parse_workload,
    policy_settings,
    pool_workloads,
    start_autoscaler,
)
from ditmesh.gateway.flags import (
    add_autoscale_flags,
    add_discovery_flags,
    add_drain_flag,
    add_gateway_flags,
    flags_to_args,
    settings_from_flags,
)
from ditmesh.gateway.settings import StageLimits
from ditmesh.gateway.stages import Serves, StagePool


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_snapshot_counts_arrivals_queue_and_waits():
    async def main():
        pool = StagePool("denoiser", ["127.0.0.1:1"], StageLimits(slots_per_replica=1))
        clock = Clock()
        read = LoadReader([pool], clock)
        places = [pool.reserve(2.0) for _ in range(3)]
        pool.seconds_per_unit = 0.5
        pool.request_seconds = 1.0
        clock.now += 2.0
        snap = read()["denoiser"]
        assert snap.arrival_rate == pytest.approx(1.5)  # 3 admitted in 2 s
        assert (snap.queued, snap.backlog_s, snap.service_s) == (3, pytest.approx(3.0), 1.0)
        lease = await pool.acquire(2.0, 5.0, set())
        places[0].give_back()
        waiting = asyncio.create_task(pool.acquire(2.0, 5.0, set()))
        await asyncio.sleep(0.05)
        clock.now += 1.0
        snap = read()["denoiser"]
        assert snap.arrival_rate == 0.0 and snap.inflight == 1 and snap.queued == 2
        assert snap.p95_wait_s >= 0.04  # the one still waiting counts by its wait so far
        lease.release(ok=True)
        (await waiting).release(ok=True)
        await pool.close()

    asyncio.run(main())


def test_p95_wait_is_over_the_window():
    async def main():
        pool = StagePool("vae", ["127.0.0.1:1"], StageLimits(slots_per_replica=1))
        pool.wait_window_s = 10.0
        pool._waits.extend([(0.0, 50.0), (95.0, 1.0), (96.0, 2.0), (97.0, 3.0)])
        assert pool.p95_wait(100.0) == 3.0  # the 50 s wait is older than the window
        assert pool.p95_wait(200.0) == 0.0
        await pool.close()

    asyncio.run(main())


def cold_pool(wait: float | None) -> StagePool:
    pool = StagePool(
        "denoiser", [], StageLimits(slots_per_replica=1, down_wait_seconds=0.05), discovered=True
    )
    pool.cold_start_wait_s = wait
    return pool


def test_scaled_to_zero_admits_and_waits_for_a_replica_then_unavailable_with_a_hint():
    async def main():
        pool = cold_pool(0.3)
        assert pool.scaled_to_zero() and pool.can_take_work()
        pool.check_admission(1.0)  # no NOT_FOUND, no refusal: it waits for a cold start
        task = asyncio.create_task(pool.acquire(1.0, 10.0, set()))
        await asyncio.sleep(0.1)
        assert not task.done()  # still waiting past the (shorter) down wait
        with pytest.raises(Unavailable, match=r"scaled to zero .* retry in about \d+ s"):
            await task
        await pool.close()

    asyncio.run(main())


def test_scaled_to_zero_serves_once_a_replica_is_up():
    async def main():
        pool = cold_pool(5.0)
        task = asyncio.create_task(pool.acquire(1.0, 10.0, set()))
        await asyncio.sleep(0.05)
        pool.replicas.add("127.0.0.1:1")  # the started replica joins; its first check passes
        replica = pool.replicas.get("127.0.0.1:1")
        replica.healthy = True
        pool._changed()
        lease = await asyncio.wait_for(task, 1.0)
        assert lease.replica is replica
        lease.release(ok=True)
        await pool.close()

    asyncio.run(main())


def test_without_an_active_autoscaler_an_empty_stage_refuses_at_once():
    async def main():
        pool = cold_pool(None)
        assert not pool.can_take_work()
        with pytest.raises(Unavailable, match="no healthy replica"):
            pool.check_admission(1.0)
        await pool.close()

    asyncio.run(main())


def parser(kubernetes: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_gateway_flags(p)
    add_discovery_flags(p)
    add_autoscale_flags(p, kubernetes=kubernetes)
    add_drain_flag(p)
    return p


def test_flags_fill_the_autoscaler_settings():
    args = parser().parse_args(
        [
            "--autoscale=on",
            "--autoscale-period=2",
            "--gpu-budget=16",
            "--denoiser-replicas-min=0",
            "--denoiser-replicas-max=4",
            "--denoiser-gpus=4",
            "--denoiser-target-wait=3",
            "--scale-to-zero=denoiser",
            "--denoiser-workload=statefulset/ditmesh-denoiser",
        ]
    )
    a = settings_from_flags(args).autoscale
    d = a.stages["denoiser"]
    assert (a.mode, a.decision_period_s, a.gpu_budget) == ("on", 2.0, 16)
    assert (d.min_replicas, d.max_replicas, d.gpus_per_replica, d.target_wait_s) == (0, 4, 4, 3.0)
    assert d.scale_to_zero and not a.stages["vae"].scale_to_zero
    assert parse_workload(d.workload).kind == "StatefulSet"
    policy = policy_settings(a, {"denoiser": "denoiser"})
    assert list(policy.stages) == ["denoiser"] and policy.stages["denoiser"].floor == 0


def test_bad_autoscale_flags_are_refused_at_start():
    with pytest.raises(ValueError, match="min_replicas"):
        settings_from_flags(parser().parse_args(["--autoscale=on", "--vae-replicas-min=0"]))
    with pytest.raises(ValueError, match="KIND/NAME"):
        parse_workload("pod/x")


def test_up_hands_the_autoscale_flags_to_its_gateway():
    up = parser(kubernetes=False).parse_args(
        ["--autoscale=on", "--scale-to-zero=vae", "--denoiser-replicas-max=3"]
    )
    forwarded = flags_to_args(up)
    gw = settings_from_flags(parser().parse_args(forwarded)).autoscale
    assert gw.mode == "on" and gw.stages["vae"].scale_to_zero
    assert gw.stages["denoiser"].max_replicas == 3
    local = parser().parse_args([*forwarded, "--local-stage=denoiser=--model 'a b' --dp=1"])
    stage = settings_from_flags(local).autoscale.stages["denoiser"]
    assert stage.local_args == ["--model", "a b", "--dp=1"]


def test_dry_run_decides_on_the_pools_own_counts_and_exports_desired():
    from ditmesh.gateway.autoscale_loop import DryRunBackend

    async def main():
        pools = [StagePool(s, ["127.0.0.1:1"]) for s in ("encoder", "denoiser", "vae")]
        args = parser().parse_args(["--autoscale=dry-run", "--autoscale-period=0.05"])
        handle = start_autoscaler(settings_from_flags(args).autoscale, pools)
        for pool in pools:
            pool.reserve(1.0)
        await asyncio.sleep(0.3)
        assert set(handle.desired) == {"encoder", "denoiser", "vae"}
        assert isinstance(handle.autoscaler.backend, DryRunBackend)
        assert all(p.cold_start_wait_s is None for p in pools)  # dry-run starts nothing
        await handle.stop()
        for pool in pools:
            await pool.close()

    asyncio.run(main())


# -- a gateway serving two models that share the encoder and VAE: four pools -------------

# Pool label -> its stage, as the gateway builds them (gateway/catalog.py).
TWO_MODELS = {
    "encoder": "encoder",
    "denoiser@dev": "denoiser",
    "denoiser@schnell": "denoiser",
    "vae": "vae",
}
POOL_WORKLOADS = (
    "--pool-workload=denoiser@dev=statefulset/den-dev",
    "--pool-workload=denoiser@schnell=deployment/den-schnell",
)


def options(*flags: str):
    return settings_from_flags(parser().parse_args(["--autoscale=on", *flags])).autoscale


def test_each_pool_of_a_stage_gets_the_stages_options_and_its_own_workload():
    a = options(
        "--denoiser-replicas-min=0",
        "--denoiser-replicas-max=4",
        "--denoiser-gpus=2",
        "--denoiser-target-wait=3",
        "--scale-to-zero=denoiser",
        "--vae-workload=deployment/vae",
        *POOL_WORKLOADS,
    )
    assert a.pool_workloads == {
        "denoiser@dev": "statefulset/den-dev",
        "denoiser@schnell": "deployment/den-schnell",
    }
    assert pool_workloads(a, TWO_MODELS) == {
        "vae": Workload(kind="Deployment", name="vae", stage="vae"),
        # Labelled as the stage, not as the pool: the backend checks ditmesh.io/stage=denoiser.
        "denoiser@dev": Workload(kind="StatefulSet", name="den-dev", stage="denoiser"),
        "denoiser@schnell": Workload(kind="Deployment", name="den-schnell", stage="denoiser"),
    }
    policy = policy_settings(a, TWO_MODELS)
    assert list(policy.stages) == list(TWO_MODELS)
    for label in ("denoiser@dev", "denoiser@schnell"):
        d = policy.stages[label]
        assert (d.floor, d.max_replicas, d.gpus_per_replica, d.target_wait_s) == (0, 4, 2, 3.0)
        assert d.scale_to_zero
    assert not policy.stages["vae"].scale_to_zero and policy.stages["encoder"].floor == 1


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_workloads_that_do_not_fit_the_pools_are_refused_naming_the_labels():
    # A stage workload for a stage with two pools: which one would it be?
    with pytest.raises(InvalidArgument) as err:
        pool_workloads(options("--denoiser-workload=deployment/den"), TWO_MODELS)
    assert one_line(err) == (
        "--denoiser-workload: the denoiser stage has 2 pools (denoiser@dev, denoiser@schnell); "
        "give each its own with --pool-workload LABEL=KIND/NAME"
    )
    # A pool of no model this gateway serves.
    with pytest.raises(InvalidArgument) as err:
        pool_workloads(options("--pool-workload=denoiser@pro=deployment/den"), TWO_MODELS)
    assert one_line(err) == (
        "--pool-workload names no pool of this gateway: denoiser@pro; its pools are encoder, "
        "denoiser@dev, denoiser@schnell, vae"
    )
    # One pool, two workloads.
    with pytest.raises(InvalidArgument, match="the vae pool has two workloads"):
        pool_workloads(
            options("--vae-workload=deployment/a", "--pool-workload=vae=deployment/b"), TWO_MODELS
        )
    # With one pool per stage, the stage workload is that pool's (and a pool label is too).
    single = {s: s for s in ("encoder", "denoiser", "vae")}
    assert pool_workloads(options("--denoiser-workload=deployment/den"), single) == {
        "denoiser": Workload(kind="Deployment", name="den", stage="denoiser")
    }


def test_bad_pool_workload_flags_are_refused_with_the_flags():
    with pytest.raises(ValueError, match="LABEL=KIND/NAME"):
        options("--pool-workload=denoiser@dev")
    with pytest.raises(ValueError, match="KIND one of deployment"):
        options("--pool-workload=denoiser@dev=pod/x")
    with pytest.raises(ValueError, match="names the pool denoiser@dev twice"):
        options(POOL_WORKLOADS[0], POOL_WORKLOADS[0])
    with pytest.raises(ValueError, match=r"Kubernetes \(denoiser@dev\) and as local"):
        options(POOL_WORKLOADS[0], "--local-stage=vae=--model m")


def two_model_pools() -> list[StagePool]:
    def serves(stage: str, models: tuple[str, ...], fp: str, others=frozenset()) -> Serves:
        return Serves(stage=stage, fingerprint=fp, models=models, others=frozenset(others))

    return [
        StagePool("encoder", ["127.0.0.1:1"], serves=serves("encoder", ("dev", "schnell"), "e")),
        StagePool("denoiser", ["127.0.0.1:1"], serves=serves("denoiser", ("dev",), "d", {"s"})),
        StagePool("denoiser", ["127.0.0.1:1"], serves=serves("denoiser", ("schnell",), "s", {"d"})),
        StagePool("vae", ["127.0.0.1:1"], serves=serves("vae", ("dev", "schnell"), "v")),
    ]


def test_every_pool_of_a_two_model_gateway_is_decided_on_its_own():
    async def main():
        pools = two_model_pools()
        assert [p.label for p in pools] == list(TWO_MODELS)
        a = options("--autoscale-period=0.05", "--denoiser-replicas-max=3")
        a.mode = "dry-run"  # on the pools' own counts: no workloads
        handle = start_autoscaler(a, pools)
        for _ in range(6):
            pools[2].reserve(4.0)  # load on schnell's denoiser alone
        pools[2].seconds_per_unit = pools[2].request_seconds = 2.0
        await asyncio.sleep(0.4)
        assert set(handle.desired) == set(TWO_MODELS)
        assert handle.desired["denoiser@schnell"] == 3 and handle.desired["denoiser@dev"] == 1
        # One scale-up decided (repeating it in later periods is not another event).
        assert handle.autoscaler.scale_events == {("denoiser@schnell", "up"): 1}
        await handle.stop()
        for pool in pools:
            await pool.close()

    asyncio.run(main())


def test_start_refuses_what_does_not_fit_the_pools_before_anything_runs():
    async def refused(a, pools=None) -> str:
        pools = pools or two_model_pools()
        with pytest.raises(InvalidArgument) as err:
            start_autoscaler(a, pools)
        assert all(p.wait_window_s != a.decision_period_s for p in pools)  # nothing set up
        for pool in pools:
            await pool.close()
        return one_line(err)

    async def main():
        assert "the denoiser stage has 2 pools" in await refused(
            options("--denoiser-workload=deployment/den")
        )
        assert "its pools are encoder, denoiser@dev" in await refused(
            options("--pool-workload=denoiser@x=deployment/den")
        )
        # `ditmesh up --autoscale on` serves one model: several pools are a mistake.
        assert "local autoscaling serves one model" in await refused(
            options("--local-stage=denoiser=--model m")
        )
        assert "--autoscale on needs workloads to scale" in await refused(options())
        # The budget covers every pool: 1 + 2 + 2 + 1 GPUs at the minimums, over 5.
        budget = options("--gpu-budget=5", "--denoiser-gpus=2")
        budget.mode = "dry-run"
        assert "need 6 GPUs, over the budget of 5" in await refused(budget)

    asyncio.run(main())
