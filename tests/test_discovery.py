"""A stage's replicas found in Kubernetes EndpointSlices (gateway/discovery.py) and the
ReplicaSet membership changes they drive (gateway/replicas.py).

The Kubernetes API here is kmock's KubernetesEmulator (the closest faithful one that
runs on these machines; no cluster can), served over HTTP from its own thread and event
loop and driven by the real `kubernetes` client, both by the test (creating, patching,
deleting slices) and by the watcher (list, then watch streams: kmock serves those).
Every endpoint is a real grpc.health.v1 server on loopback.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import kmock
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from kubernetes import client

from ditmesh.gateway.discovery import EndpointSliceWatcher, ServiceRef, endpoints_of
from ditmesh.gateway.replicas import ReplicaSet
from ditmesh.gateway.settings import HealthPolicy
from ditmesh.gateway.stages import StageLimits, StagePool

FAST = HealthPolicy(interval=0.05, timeout=0.5, penalty_seconds=0.2)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NS, SERVICE = "mesh", "encoder"


# -- helpers ------------------------------------------------------------------------------------


class HealthServer:
    """A real gRPC server on loopback that answers grpc.health.v1 and nothing else."""

    def __init__(self, status=SERVING) -> None:
        self.status = status

    async def start(self) -> HealthServer:
        self.health = HealthServicer()
        await self.health.set("", self.status)
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        await self.server.start()
        return self

    async def set(self, status) -> None:
        await self.health.set("", status)

    async def stop(self) -> None:
        await self.server.stop(0)


def discovered_pool(**limits) -> StagePool:
    """A stage pool whose replicas come from discovery only (none at start)."""
    pool = StagePool("encoder", ["unused:1"], StageLimits(**limits), FAST)
    # StagePool builds a static ReplicaSet; a discovered one may start empty.
    pool.replicas = ReplicaSet("encoder", [], FAST, pool._changed, discovered=True)
    return pool


async def until(predicate, timeout: float = 10.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


def addresses(pool: StagePool) -> set[str]:
    return {r.address for r in pool.replicas.replicas}


def up(pool: StagePool) -> set[str]:
    return {r.address for r in pool.replicas.up()}


# -- ReplicaSet membership, no Kubernetes -------------------------------------------------------


def test_a_static_replica_set_still_needs_an_address():
    with pytest.raises(ValueError, match="at least one address"):
        ReplicaSet("vae", [], FAST, lambda: None)


def test_an_added_replica_works_only_after_a_serving_check():
    async def main():
        server = await HealthServer(NOT_SERVING).start()
        changes = []
        rs = ReplicaSet("encoder", [], FAST, lambda: changes.append(1), discovered=True)
        assert not rs.any_up() and rs.why_down() == "no replica known"
        rs.add(server.address)  # before start: known, not up
        assert changes and not rs.any_up()
        assert rs.get(server.address).reason == "not checked yet"
        rs.start()
        await asyncio.sleep(0.3)  # several checks, all NOT_SERVING
        assert not rs.any_up()
        await server.set(SERVING)
        await until(rs.any_up, what="the replica up")
        n = len(changes)
        rs.add(server.address)  # present already: nothing happens
        assert len(rs.replicas) == 1 and len(changes) == n
        rs.drain("10.0.0.9:1")  # unknown: nothing happens
        rs.remove("10.0.0.9:1")
        assert len(changes) == n
        await rs.close()
        await server.stop()

    asyncio.run(main())


def test_a_drained_replica_gets_no_new_work_and_finishes_what_it_holds():
    async def main():
        a, b = await HealthServer().start(), await HealthServer().start()
        pool = discovered_pool(slots_per_replica=2)
        pool.start()
        pool.replicas.add(a.address)
        pool.replicas.add(b.address)
        await until(lambda: up(pool) == {a.address, b.address})
        held = await pool.acquire(1.0, timeout=5, exclude=set())
        assert held.replica.address == a.address
        pool.replicas.drain(a.address)
        assert pool.replicas.get(a.address).describe().endswith("(draining)")
        assert up(pool) == {b.address}
        for _ in range(3):  # a's second slot would be free with 2 slots: it stays unused
            lease = await pool.acquire(1.0, timeout=5, exclude=set())
            assert lease.replica.address == b.address
            lease.release(ok=True)
        held.release(ok=True)  # the call in flight on the draining replica completes
        assert pool.replicas.get(a.address).served == 1
        assert pool.replicas.get(a.address).inflight == 0
        # A draining replica that is ready again (same address) is back at work.
        pool.replicas.add(a.address)
        assert up(pool) == {a.address, b.address}
        await pool.close()
        await a.stop()
        await b.stop()

    asyncio.run(main())


def test_a_removed_replica_closes_its_channel_once_its_calls_are_done():
    async def main():
        a = await HealthServer().start()
        pool = discovered_pool()
        pool.start()
        pool.replicas.add(a.address)
        await until(lambda: up(pool) == {a.address})
        held = await pool.acquire(1.0, timeout=5, exclude=set())
        replica = held.replica
        pool.replicas.remove(a.address)
        assert addresses(pool) == set() and not pool.replicas.any_up()
        await asyncio.sleep(0.3)
        # Its call in flight still has a working channel.
        stub = health_pb2_grpc.HealthStub(replica.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert reply.status == SERVING
        held.release(ok=True)
        await until(lambda: not pool.replicas._retiring, what="the channel closed")
        with pytest.raises(Exception, match="[Cc]lose"):
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        await pool.close()
        await a.stop()

    asyncio.run(main())


# -- EndpointSlice to addresses ------------------------------------------------------------------


def eps(name, endpoints, port=5000, port_name="grpc", service=SERVICE) -> dict:
    """An EndpointSlice as the API serves it; `endpoints`: (ip, ready, terminating) tuples."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": term},
            }
            for ip, ready, term in endpoints
        ],
    }


def as_model(body: dict) -> client.V1EndpointSlice:
    return client.ApiClient().deserialize(json.dumps(body), "V1EndpointSlice", None)


def test_endpoint_conditions_map_to_ready_or_not():
    body = eps(
        "s",
        [("10.0.0.1", True, False), ("10.0.0.2", False, False), ("10.0.0.3", False, True)],
    )
    body["endpoints"].append({"addresses": ["10.0.0.4"], "conditions": {}})  # unknown: ready
    # Published not-ready addresses stay ready while terminating: not ready here.
    body["endpoints"].append(
        {"addresses": ["10.0.0.5"], "conditions": {"ready": True, "terminating": True}}
    )
    body["endpoints"].append({"addresses": [], "conditions": {"ready": True}})
    assert endpoints_of(as_model(body), "grpc") == {
        "10.0.0.1:5000": True,
        "10.0.0.2:5000": False,
        "10.0.0.3:5000": False,
        "10.0.0.4:5000": True,
        "10.0.0.5:5000": False,
    }
    assert endpoints_of(as_model(body), 7000)["10.0.0.1:7000"] is True
    assert endpoints_of(as_model(body), "http") == {}  # no such port in the slice
    v6 = eps("s6", [("fd00::1", True, False)])
    assert endpoints_of(as_model(v6), "grpc") == {"[fd00::1]:5000": True}


def test_a_service_ref_parses():
    assert ServiceRef.parse("mesh/encoder:grpc") == ServiceRef("mesh", "encoder", "grpc")
    assert ServiceRef.parse("mesh/vae:5003") == ServiceRef("mesh", "vae", 5003)
    assert ServiceRef.parse("vae:5003").name == "vae"
    with pytest.raises(ValueError, match="NAMESPACE/NAME:PORT"):
        ServiceRef.parse("mesh/vae")


# -- against the Kubernetes API emulator ---------------------------------------------------------


class Emulator:
    """kmock's KubernetesEmulator on HTTP, in its own thread and event loop. `stop` and
    `start` again take the API server away and bring it back on the same port, with
    the objects it held (as an API server restarting over the same etcd)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port: int | None = None
        self._call(self._open())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _open(self) -> None:
        self.handler = kmock.KubernetesEmulator()
        await self.handler.__aenter__()
        self.handler.resources["discovery.k8s.io/v1/endpointslices"] = kmock.ResourceInfo(
            kind="EndpointSlice", namespaced=True
        )

    async def _serve(self) -> None:
        self.server = kmock.Server(self.handler, port=self.port)
        await self.server.__aenter__()
        self.port = self.server.port

    async def _halt(self) -> None:
        await self.server.__aexit__(None, None, None)

    def start(self) -> Emulator:
        self._call(self._serve())
        return self

    def stop(self) -> None:
        self._call(self._halt())

    def close(self) -> None:
        if self.handler.servers:
            self.stop()
        self._call(self.handler.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def api(self) -> client.ApiClient:
        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{self.port}"
        return client.ApiClient(cfg)


@pytest.fixture
def emulator():
    emu = Emulator().start()
    try:
        yield emu
    finally:
        emu.close()


@pytest.mark.slow
def test_endpoint_slices_change_the_live_pool(emulator):
    k8s = client.DiscoveryV1Api(emulator.api())

    async def put(body):
        await asyncio.to_thread(k8s.create_namespaced_endpoint_slice, NS, body)

    async def patch(name, body):
        await asyncio.to_thread(k8s.patch_namespaced_endpoint_slice, name, NS, body)

    async def main():
        a, b, c = [await HealthServer().start() for _ in range(3)]
        late = await HealthServer(NOT_SERVING).start()
        pool = discovered_pool()
        pool.start()
        watcher = EndpointSliceWatcher(
            "encoder", NS, SERVICE, "grpc", pool.replicas, emulator.api(), watch_seconds=1
        )
        watcher.start()
        try:
            # Ready: joins, and works once its health check answers SERVING.
            await put(eps("enc-a", [("127.0.0.1", True, False)], port=a.port))
            await until(lambda: up(pool) == {a.address}, what="a up")
            # Ready but not yet SERVING: in the pool, never given work.
            await put(eps("enc-late", [("127.0.0.1", True, False)], port=late.port))
            await until(lambda: late.address in addresses(pool), what="late known")
            # Not ready: never joins; another Service's slice is not ours.
            await put(eps("enc-c", [("127.0.0.1", False, False)], port=c.port))
            await put(eps("vae-x", [("127.0.0.1", True, False)], port=b.port, service="vae"))
            await asyncio.sleep(0.5)
            assert addresses(pool) == {a.address, late.address}
            for _ in range(4):
                lease = await pool.acquire(1.0, timeout=5, exclude=set())
                assert lease.replica.address == a.address
                lease.release(ok=True)
            await late.set(SERVING)
            await until(lambda: up(pool) == {a.address, late.address}, what="late up")

            # Terminating: no new lease, the one it holds completes.
            held = [await pool.acquire(1.0, timeout=5, exclude=set()) for _ in range(2)]
            on_a = next(x for x in held if x.replica.address == a.address)
            await patch("enc-a", eps("enc-a", [("127.0.0.1", False, True)], port=a.port))
            await until(lambda: pool.replicas.get(a.address).draining, what="a draining")
            nxt = asyncio.ensure_future(pool.acquire(1.0, timeout=5, exclude=set()))
            on_a.release(ok=True)
            await asyncio.sleep(0.2)
            assert not nxt.done()  # a's slot is free, but a is draining
            for x in held:
                x.release(ok=True)
            assert (await nxt).replica.address == late.address
            (await nxt).release(ok=True)
            assert pool.replicas.get(a.address).served >= 5

            # Deleted: leaves the pool.
            await asyncio.to_thread(k8s.delete_namespaced_endpoint_slice, "enc-a", NS)
            await until(lambda: a.address not in addresses(pool), what="a removed")

            # The API server goes away: the watcher lives on, the pool keeps its replicas.
            await asyncio.to_thread(emulator.stop)
            await until(lambda: watcher.lost, timeout=20, what="the API lost")
            for _ in range(3):
                lease = await pool.acquire(1.0, timeout=5, exclude=set())
                assert lease.replica.address == late.address
                lease.release(ok=True)
            assert addresses(pool) == {late.address}

            # It comes back: changes flow again.
            await asyncio.to_thread(emulator.start)
            await put(eps("enc-b", [("127.0.0.1", True, False)], port=b.port))
            await until(lambda: up(pool) == {late.address, b.address}, timeout=30, what="b up")
            assert not watcher.lost
            await patch("enc-late", eps("enc-late", [("127.0.0.1", False, True)], port=late.port))
            await until(lambda: up(pool) == {b.address}, what="late draining (watched)")
        finally:
            watcher.stop()
            await pool.close()
            for s in (a, b, c, late):
                await s.stop()
        assert await asyncio.to_thread(watcher.join, 15)

    asyncio.run(main())


@pytest.mark.slow
def test_an_expired_watch_lists_again_without_a_warning(emulator, caplog):
    # The first watch is answered 410 Gone, as an API server answers a resourceVersion
    # it no longer has: the watcher lists again at once, and is not "lost".
    gone = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired"}
    emulator.handler[kmock.action.WATCH][:1] << 410 << {**gone, "code": 410}
    k8s = client.DiscoveryV1Api(emulator.api())

    async def main():
        a = await HealthServer().start()
        pool = discovered_pool()
        pool.start()
        watcher = EndpointSliceWatcher(
            "encoder", NS, SERVICE, "grpc", pool.replicas, emulator.api(), watch_seconds=1
        )
        watcher.start()
        try:
            await asyncio.sleep(0.5)
            body = eps("enc-a", [("127.0.0.1", True, False)], port=a.port)
            await asyncio.to_thread(k8s.create_namespaced_endpoint_slice, NS, body)
            await until(lambda: up(pool) == {a.address}, what="a up")
        finally:
            watcher.stop()
            await pool.close()
            await a.stop()
        assert not watcher.lost
        assert len(emulator.handler[kmock.action.LIST]) >= 2  # the first, and after 410

    with caplog.at_level("INFO", logger="ditmesh.gateway.discovery"):
        asyncio.run(main())
    assert "watch expired" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# -- the gateway, its stages found through the API ----------------------------------------------


@pytest.mark.slow
def test_a_gateway_finds_its_stages_in_endpoint_slices(emulator, tiny_flux, tmp_path):
    """`serve gateway --X-service NS/NAME:PORT`: no addresses given, an image comes back."""
    from ditmesh.denoiser.service import serve as serve_denoiser
    from ditmesh.encoder.service import serve as serve_encoder
    from ditmesh.gateway.main import serve as serve_gateway
    from ditmesh.gateway.settings import GatewaySettings
    from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc
    from ditmesh.vae.service import serve as serve_vae

    stages = {"encoder": serve_encoder(tiny_flux), "denoiser": serve_denoiser(tiny_flux)}
    stages["vae"] = serve_vae(tiny_flux)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "e", "cluster": {"server": f"http://127.0.0.1:{emulator.port}"}}
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "e", "context": {"cluster": "e", "user": "u"}}],
                "current-context": "e",
            }
        )
    )
    k8s = client.DiscoveryV1Api(emulator.api())
    for stage, running in stages.items():
        body = eps(f"{stage}-1", [("127.0.0.1", True, False)], port=running.port, service=stage)
        k8s.create_namespaced_endpoint_slice(NS, body)
    gateway = serve_gateway(
        tiny_flux,
        encoder=[],
        denoiser=[],
        vae=[],
        settings=GatewaySettings(
            services={s: f"{NS}/{s}:grpc" for s in stages},
            kubeconfig=str(kubeconfig),
            watch_seconds=1,
        ),
    )
    try:
        with grpc.insecure_channel(gateway.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            end = time.monotonic() + 20
            while health.Check(health_pb2.HealthCheckRequest(), timeout=2).status != SERVING:
                assert time.monotonic() < end, "the gateway never found its stages"
                time.sleep(0.05)
            reply = gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(
                gateway_pb2.GenerateRequest(prompt="a cat", height=64, width=64, steps=2, seed=1),
                timeout=60,
            )
        assert reply.images[0].data.startswith(b"\x89PNG")
    finally:
        gateway.stop(0)
        for running in stages.values():
            running.stop(0)
