"""The Kubernetes backend and the leader Lease against kmock's KubernetesEmulator.

kmock is an in-memory Kubernetes API (aiohttp) that installs from PyPI; no cluster can run
on these machines. The real `kubernetes` client talks to it over HTTP. What kmock does not
emulate: a `scale` subresource is stored by merging the patch into the object itself (as
the API server's effect on spec.replicas), and resourceVersion preconditions are not
checked, so two gateways racing for the Lease is not tested here.
"""

from __future__ import annotations

import asyncio
import datetime
import threading

import pytest

kmock = pytest.importorskip("kmock")
client = pytest.importorskip("kubernetes.client")

from ditmesh.gateway.autoscale_backends import (  # noqa: E402
    KubernetesBackend,
    NotOurWorkload,
    Workload,
)
from ditmesh.gateway.autoscale_loop import Autoscaler, LeaseElector, backend_for  # noqa: E402
from ditmesh.gateway.autoscale_policy import (  # noqa: E402
    AutoscalePolicy,
    AutoscaleSettings,
    StageScaling,
    StageSnapshot,
)

NS = "serving"
pytestmark = pytest.mark.slow  # starts an HTTP server (about 2 s in all)


@pytest.fixture(scope="module")
def emulator():
    """kmock's emulator on its own event loop in a thread; yields (emulator, ApiClient)."""
    emu = kmock.KubernetesEmulator()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict = {}

    async def serve():
        box["stop"] = asyncio.Event()
        async with emu, kmock.Server(emu) as server:
            box["url"] = str(server.url).rstrip("/")
            ready.set()
            await box["stop"].wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "kmock did not start"
    cfg = client.Configuration()
    cfg.host = box["url"]
    api = client.ApiClient(cfg)
    yield emu, api
    api.close()
    loop.call_soon_threadsafe(box["stop"].set)
    thread.join(10)


def labels(stage: str | None) -> dict[str, str]:
    if stage is None:
        return {"app": "someone-else"}
    return {"app.kubernetes.io/part-of": "ditmesh", "ditmesh.io/stage": stage}


def workload(kind: str, name: str, stage: str | None, replicas: int = 1) -> dict:
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1" if kind == "LeaderWorkerSet" else "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": NS, "labels": labels(stage)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"x": name}},
            "template": {
                "metadata": {"labels": {"x": name}},
                "spec": {"containers": [{"name": "c", "image": "ditmesh"}]},
            },
        },
        "status": {"replicas": replicas, "readyReplicas": replicas},
    }


def create(api, kind: str, name: str, stage: str | None, replicas: int = 1) -> None:
    body = workload(kind, name, stage, replicas)
    if kind == "Deployment":
        client.AppsV1Api(api).create_namespaced_deployment(NS, body)
    elif kind == "StatefulSet":
        client.AppsV1Api(api).create_namespaced_stateful_set(NS, body)
    else:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            "leaderworkerset.x-k8s.io", "v1", NS, "leaderworkersets", body
        )


def spec_replicas(api, kind: str, name: str) -> int:
    apps = client.AppsV1Api(api)
    if kind == "Deployment":
        return apps.read_namespaced_deployment(name, NS).spec.replicas
    if kind == "StatefulSet":
        return apps.read_namespaced_stateful_set(name, NS).spec.replicas
    obj = client.CustomObjectsApi(api).get_namespaced_custom_object(
        "leaderworkerset.x-k8s.io", "v1", NS, "leaderworkersets", name
    )
    return obj["spec"]["replicas"]


def events_for(api, name: str) -> list:
    items = client.CoreV1Api(api).list_namespaced_event(NS).items
    return [e for e in items if e.involved_object.name == name]


@pytest.mark.parametrize(
    ("kind", "name", "stage"),
    [
        ("Deployment", "enc", "encoder"),
        ("StatefulSet", "den", "denoiser"),
        ("LeaderWorkerSet", "den-lws", "denoiser"),
    ],
)
def test_scale_changes_the_right_workload_and_records_an_event(emulator, kind, name, stage):
    _, api = emulator
    create(api, kind, name, stage, replicas=1)
    create(api, kind, f"{name}-other", "vae", replicas=1)
    backend = KubernetesBackend(api, NS, {stage: Workload(kind=kind, name=name)})
    assert backend.current(stage) == (1, 1)
    backend.scale(stage, 3, "up: desired 3 > capacity 1")
    assert spec_replicas(api, kind, name) == 3
    assert spec_replicas(api, kind, f"{name}-other") == 1  # its neighbour is untouched
    assert backend.current(stage)[0] == 3
    (event,) = events_for(api, name)
    assert event.reason == "ScaledUp" and event.involved_object.kind == kind
    assert "1 -> 3" in event.message and "desired 3" in event.message


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "LeaderWorkerSet"])
def test_an_unlabelled_or_other_stage_object_is_never_touched(emulator, kind):
    _, api = emulator
    create(api, kind, f"foreign-{kind.lower()}", None, replicas=2)
    create(api, kind, f"vae-{kind.lower()}", "vae", replicas=2)
    backend = KubernetesBackend(
        api,
        NS,
        {
            "encoder": Workload(kind=kind, name=f"foreign-{kind.lower()}"),
            "denoiser": Workload(kind=kind, name=f"vae-{kind.lower()}"),  # labelled vae
        },
    )
    for stage, name in (("encoder", "foreign"), ("denoiser", "vae")):
        with pytest.raises(NotOurWorkload, match="does not touch it"):
            backend.scale(stage, 5, "up")
        with pytest.raises(NotOurWorkload):
            backend.current(stage)
        assert spec_replicas(api, kind, f"{name}-{kind.lower()}") == 2
        assert events_for(api, f"{name}-{kind.lower()}") == []


def test_autoscaler_loop_scales_a_deployment_and_dry_run_does_not(emulator):
    _, api = emulator
    create(api, "Deployment", "loop-den", "denoiser", replicas=1)
    real = KubernetesBackend(api, NS, {"denoiser": Workload(kind="Deployment", name="loop-den")})
    settings = AutoscaleSettings(stages={"denoiser": StageScaling(max_replicas=6)})
    load = StageSnapshot(
        stage="denoiser", queued=10, backlog_s=20.0, service_s=2.0, arrival_rate=1.0
    )

    dry = backend_for("dry-run", real, counts=lambda s: (0, 0))
    (d,) = Autoscaler(AutoscalePolicy(settings), dry, lambda: {"denoiser": load}).step()
    assert d.target > 1 and d.inputs.replicas == 1 and d.inputs.ready == 1
    assert dry.would == [("denoiser", d.target, d.reason)]
    assert spec_replicas(api, "Deployment", "loop-den") == 1

    (d,) = Autoscaler(
        AutoscalePolicy(settings), backend_for("on", real, None), lambda: {"denoiser": load}
    ).step()
    assert spec_replicas(api, "Deployment", "loop-den") == d.target > 1


def test_only_the_lease_holder_leads(emulator):
    _, api = emulator
    t = [datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.timezone.utc)]
    a = LeaseElector(api, NS, "ditmesh-autoscaler", "gateway-a", duration_s=15, clock=lambda: t[0])
    b = LeaseElector(api, NS, "ditmesh-autoscaler", "gateway-b", duration_s=15, clock=lambda: t[0])
    assert a() is True  # creates the lease
    assert b() is False
    t[0] += datetime.timedelta(seconds=10)
    assert a() is True  # renews
    t[0] += datetime.timedelta(seconds=10)
    assert b() is False  # a renewed 10 s ago: still held
    t[0] += datetime.timedelta(seconds=20)  # a stopped renewing: expired
    assert b() is True
    assert a() is False
    lease = client.CoordinationV1Api(api).read_namespaced_lease("ditmesh-autoscaler", NS)
    assert lease.spec.holder_identity == "gateway-b" and lease.spec.lease_transitions == 1

    # A gateway that does not lead makes no decision and scales nothing.
    scaled = []

    class Recorder:
        def current(self, stage):
            return (1, 1)

        def scale(self, stage, replicas, reason):
            scaled.append(stage)

    settings = AutoscaleSettings(stages={"denoiser": StageScaling()})
    load = {"denoiser": StageSnapshot(stage="denoiser", queued=9, backlog_s=90.0, service_s=2.0)}
    assert Autoscaler(AutoscalePolicy(settings), Recorder(), lambda: load, leader=a).step() == []
    assert scaled == []
