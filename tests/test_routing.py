"""Routing and failure handling of the gateway, against real stage servers on loopback."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ditmesh.common.errors import DeadlineExceeded, ResourceExhausted
from ditmesh.gateway.stages import StageLimits, StagePool
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

from .helpers import InProcessMesh

REQ = dict(prompt="a cat", height=64, width=64, steps=2, seed=1)


def unary(address: str, **kw):
    with grpc.insecure_channel(address) as ch:
        return gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(
            gateway_pb2.GenerateRequest(**{**REQ, **kw}), timeout=60
        )


@pytest.mark.slow
def test_a_down_replica_is_routed_around(tiny_flux):
    mesh = InProcessMesh(tiny_flux, denoisers=2)
    try:
        ok = unary(mesh.address)
        mesh.denoisers[0].stop(0)
        for _ in range(3):  # every request lands, whichever replica it tries first
            again = unary(mesh.address)
            assert again.images[0].data == ok.images[0].data
    finally:
        mesh.stop()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["encoder", "denoiser", "vae"])
def test_a_stage_that_is_down_is_named(tiny_flux, stage):
    mesh = InProcessMesh(tiny_flux)
    try:
        server = {"encoder": mesh.encoder, "denoiser": mesh.denoisers[0], "vae": mesh.vae}[stage]
        server.stop(0)
        with pytest.raises(grpc.RpcError) as info:
            unary(mesh.address)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"the {stage} stage is unavailable" in info.value.details()
    finally:
        mesh.stop()


@pytest.mark.slow
def test_deadline_is_reported(tiny_flux):
    """A mesh of its own: on the shared one, earlier tests' measured speed makes the
    gateway refuse this request at admission instead (checked below, after a measure)."""
    mesh = InProcessMesh(tiny_flux)
    big = gateway_pb2.GenerateRequest(**{**REQ, "steps": 50, "height": 256, "width": 256})
    try:
        with grpc.insecure_channel(mesh.address) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            # Nothing measured yet: admitted, then past its deadline while it runs.
            with pytest.raises(grpc.RpcError) as info:
                stub.GenerateUnary(big, timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # Once a request has been measured, the gateway knows 0.3 s cannot be enough
            # and says so at once, with the estimate.
            stub.GenerateUnary(gateway_pb2.GenerateRequest(**REQ), timeout=60)
            with pytest.raises(grpc.RpcError) as info:
                stub.GenerateUnary(big, timeout=0.3)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "over its deadline" in info.value.details()
    finally:
        mesh.stop()


def test_queue_full_says_when_to_retry():
    async def main():
        pool = StagePool("denoiser", ["127.0.0.1:1"], StageLimits(max_queue=1))
        try:
            held = await pool.acquire(1.0, timeout=1, exclude=set())
            waiter = pool.reserve(1.0)  # admitted, waiting for the denoiser
            with pytest.raises(
                ResourceExhausted,
                match=r"the denoiser queue is full \(1 waiting\); retry in about \d+ s",
            ):
                pool.check_admission(1.0)
            waiter.give_back()
            held.release(ok=True)
            pool.check_admission(1.0)  # room again
        finally:
            await pool.close()

    asyncio.run(main())


def test_waiting_past_the_deadline():
    async def main():
        pool = StagePool("vae", ["127.0.0.1:1"], StageLimits(slots_per_replica=1))
        try:
            held = await pool.acquire(1.0, timeout=1, exclude=set())
            with pytest.raises(DeadlineExceeded, match="waiting for the vae stage"):
                await pool.acquire(1.0, timeout=0.2, exclude=set())
            assert pool.waiting == 0  # the waiter left the queue with its deadline
            held.release(ok=True)
        finally:
            await pool.close()

    asyncio.run(main())


def test_least_loaded_replica_is_chosen():
    async def main():
        pool = StagePool("vae", ["127.0.0.1:1", "127.0.0.1:2"], StageLimits(slots_per_replica=2))
        try:
            a = await pool.acquire(1.0, timeout=1, exclude=set())
            b = await pool.acquire(1.0, timeout=1, exclude=set())
            assert a.replica is not b.replica
            pool.replicas.mark_failed(a.replica, "test")
            a.release(ok=False)
            c = await pool.acquire(1.0, timeout=1, exclude=set())
            assert c.replica is b.replica  # the other one is marked down
        finally:
            await pool.close()

    asyncio.run(main())
