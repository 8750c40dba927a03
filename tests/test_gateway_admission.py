"""Admission, request ids and queue accounting of the gateway, without stages (unit tests).

The stage pools point at addresses nothing listens on and their health checks are
not started, so every decision here is the gateway's own arithmetic.
"""

from __future__ import annotations

import asyncio

import pytest

from ditmesh.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from ditmesh.common.limits import DEFAULT_LIMITS
from ditmesh.common.models import FLUX, ModelRef
from ditmesh.gateway.core import Gateway
from ditmesh.gateway.plan import make_plan
from ditmesh.gateway.run import Stages
from ditmesh.gateway.settings import GatewayConfig, StageLimits
from ditmesh.gateway.stages import StagePool
from ditmesh.v1 import gateway_pb2

MODEL = ModelRef(
    source="/nowhere",
    name="tiny",
    family=FLUX,
    vae_scale_factor=8,
    latent_channels=16,
    guidance_embeds=True,
    max_prompt_tokens=64,
)


def plan(**kw):
    base = dict(prompt="a cat", height=256, width=256, steps=4, seed=1)
    return make_plan(
        gateway_pb2.GenerateRequest(**{**base, **kw}), {"tiny": MODEL}, "tiny", DEFAULT_LIMITS
    )


def gateway(max_queue: int = 8, **config) -> Gateway:
    def pool(name, slots):
        return StagePool(
            name,
            [f"127.0.0.1:{1 + slots}"],
            StageLimits(slots_per_replica=slots, max_queue=max_queue),
        )

    stages = Stages(encoder=pool("encoder", 4), denoiser=pool("denoiser", 1), vae=pool("vae", 2))
    return Gateway({"tiny": MODEL}, "tiny", {"tiny": stages}, GatewayConfig(**config))


def run(coro):
    return asyncio.run(coro)


def test_defaults_are_the_models():
    p = make_plan(gateway_pb2.GenerateRequest(prompt="x"), {"tiny": MODEL}, "tiny", DEFAULT_LIMITS)
    assert (p.height, p.width, p.steps, p.guidance) == (1024, 1024, 28, 3.5)
    assert len(p.request_id) == 32  # made up when the client gave none


def test_unknown_model_is_not_found_with_the_served_list():
    with pytest.raises(NotFound, match=r"unknown model 'other'; this mesh serves 'tiny'"):
        plan(model="other")


@pytest.mark.parametrize("rid", ["x" * 129, "a b", "a\nb", "a\x00b", "café", "id/1"])
def test_bad_request_ids(rid):
    with pytest.raises(InvalidArgument, match="request id"):
        plan(request_id=rid)


def test_good_request_ids_pass():
    for rid in ("x" * 128, "job-1.2:3_a", "ABC"):
        assert plan(request_id=rid).request_id == rid


def test_metadata_id_is_checked_too():
    with pytest.raises(InvalidArgument, match="request id"):
        make_plan(
            gateway_pb2.GenerateRequest(prompt="x"), {"tiny": MODEL}, "tiny", DEFAULT_LIMITS, "a b"
        )


def test_work_units_scale_with_the_request():
    one = plan()
    assert plan(steps=8).work_units("denoiser") == 2 * one.work_units("denoiser")
    assert plan(num_images=3).work_units("vae") == 3 * one.work_units("vae")
    assert plan(height=512, width=512).work_units("denoiser") == 4 * one.work_units("denoiser")


def test_queued_position_is_the_denoisers_and_places_come_back():
    async def main():
        gw = gateway()
        runs = [gw.admit(plan(request_id=f"r{i}"), deadline=gw.deadline_of(60)) for i in range(3)]
        assert [r.position for r in runs] == [0, 1, 2]
        assert [p.pending for p in gw.stages] == [3, 3, 3]
        for r in runs:
            gw.finish(r, "CANCELLED")
        assert [p.pending for p in gw.stages] == [0, 0, 0]
        assert gw.running == 0

    run(main())


def test_count_bound_refuses_at_once_with_a_hint():
    async def main():
        gw = gateway(max_queue=2)
        gw.admit(plan(request_id="a"), gw.deadline_of(60))
        gw.admit(plan(request_id="b"), gw.deadline_of(60))
        with pytest.raises(ResourceExhausted, match=r"queue is full \(2 waiting\); retry in about"):
            gw.admit(plan(request_id="c"), gw.deadline_of(60))
        assert gw.running == 2  # the refused one holds nothing

    run(main())


def test_a_wait_past_the_deadline_is_refused_with_the_estimate():
    async def main():
        gw = gateway()
        gw.stages.denoiser.seconds_per_unit = 1.0  # as if measured: 1 s per unit of work
        first = gw.admit(plan(request_id="a", steps=40), gw.deadline_of(600))
        with pytest.raises(
            ResourceExhausted, match=r"about \d+ s for this request .* over its deadline of 5 s"
        ):
            gw.admit(plan(request_id="b", steps=40), gw.deadline_of(5))
        ok = gw.admit(plan(request_id="c", steps=40), gw.deadline_of(600))
        gw.finish(first, "OK")
        gw.finish(ok, "OK")

    run(main())


def test_work_bound_refuses_when_the_backlog_is_too_long():
    async def main():
        gw = gateway()
        d = gw.stages.denoiser
        d.limits.max_queue_seconds = 10
        d.seconds_per_unit = 1.0
        big = dict(steps=32, height=512, width=512)  # 8 units: 8 s
        gw.admit(plan(request_id="a", **big), gw.deadline_of(600))
        with pytest.raises(ResourceExhausted, match=r"denoiser queue holds about 16 s of work"):
            gw.admit(plan(request_id="b", **big), gw.deadline_of(600))

    run(main())


def test_ids_are_unique_while_running_and_after_success():
    async def main():
        gw = gateway()
        r = gw.admit(plan(request_id="same"), gw.deadline_of(60))
        with pytest.raises(FailedPrecondition, match="request same is already running"):
            gw.admit(plan(request_id="same"), gw.deadline_of(60))
        gw.finish(r, "OK")
        with pytest.raises(FailedPrecondition, match="request same already ran"):
            gw.admit(plan(request_id="same"), gw.deadline_of(60))
        failed = gw.admit(plan(request_id="again"), gw.deadline_of(60))
        gw.finish(failed, "UNAVAILABLE")
        gw.finish(gw.admit(plan(request_id="again"), gw.deadline_of(60)), "OK")  # may retry

    run(main())


def test_finished_ids_are_forgotten_after_their_time():
    async def main():
        gw = gateway(remember_ids_s=0.0)
        gw.finish(gw.admit(plan(request_id="x"), gw.deadline_of(60)), "OK")
        await asyncio.sleep(0.01)
        gw.finish(gw.admit(plan(request_id="x"), gw.deadline_of(60)), "OK")

    run(main())


def test_a_stage_with_no_healthy_replica_is_refused_at_once():
    async def main():
        gw = gateway()
        r = gw.stages.vae.replicas.replicas[0]
        r.healthy, r.reason = False, "connection refused"
        with pytest.raises(Unavailable, match=r"the vae stage is unavailable: no healthy replica"):
            gw.admit(plan(), gw.deadline_of(60))
        assert not gw.healthy()
        assert [p.pending for p in gw.stages] == [0, 0, 0]

    run(main())


def test_a_waiter_that_is_cancelled_leaves_the_queue():
    async def main():
        gw = gateway()
        d = gw.stages.denoiser
        held = await d.acquire(1.0, timeout=5, exclude=set())
        waiter = asyncio.ensure_future(d.acquire(1.0, timeout=5, exclude=set()))
        await asyncio.sleep(0.01)
        assert d.waiting == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert waiter.cancelled()
        assert d.waiting == 0
        held.release(ok=True)
        assert d.replicas.replicas[0].inflight == 0  # nothing handed to the one who left

    run(main())


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--encoder-service", "bad"], "--encoder-service 'bad': a service is NAMESPACE/NAME:PORT"),
        (
            ["--autoscale", "on", "--denoiser-replicas-min", "5", "--denoiser-replicas-max", "2"],
            "max_replicas 2 is below 5 (min_replicas 5",
        ),
        (["--max-queue", "0"], "--max-queue must be at least 1; got 0"),
    ],
)
def test_bad_gateway_flags_are_one_line_and_exit_2(argv, needle, capsys):
    from ditmesh.cli import main

    base = ["serve", "gateway", "--model", "/nowhere", "--encoder", "h:1", "--denoiser", "h:2"]
    assert main([*base, "--vae", "h:3", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
