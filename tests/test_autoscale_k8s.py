"""The Kubernetes backend, the leader Lease, and a real gateway's `--autoscale on`, all
against kmock's KubernetesEmulator.

kmock is an in-memory Kubernetes API (aiohttp) that installs from PyPI; no cluster can run
on these machines. The real `kubernetes` client talks to it over HTTP: the test's own, and
the gateway's, built from a kubeconfig file that points at the emulator.

The first tests drive `KubernetesBackend`, `Autoscaler` and `LeaseElector` directly. The
last ones run `ditmesh serve gateway --autoscale on --kubeconfig FILE
--denoiser-workload KIND/NAME ...` as a child process, as an operator would, in front of
real tiny stages (servers in this process), put a burst of requests on it and read what
the gateway did to the emulator's objects: the scale subresource patched, an Event on the
workload, a decoy (an unlabelled Deployment named for another stage) never written to,
nothing written under `--autoscale dry-run`, requests served while the API server is gone
or hangs, and with `--autoscale-lease` only the Lease's holder scaling. With two models
that share the encoder and VAE (tests/test_multi_model.py's twin), each denoiser pool has
its own workload (`--pool-workload`) and load on one model scales that model's alone; a
`--denoiser-workload` that cannot say which pool it is refuses to start.

What kmock does not emulate, so what these tests do not show:
- No controllers: a Deployment scaled up gets no new pods (status.readyReplicas stays as
  created), so the autoscaler sees its replicas pending, and the gateway's pools keep the
  static stage addresses they were given (EndpointSlice discovery is tests/test_discovery.py).
- The `scale` subresource is stored by merging the patch into the object itself (the API
  server's effect on spec.replicas); no autoscaling/v1 Scale validation.
- No resourceVersion at all, so no optimistic concurrency: two gateways racing to take
  the same expired Lease at the same instant is not tested here (on a real API server the
  loser's patch fails with 409 Conflict).
- No RBAC: a gateway whose Role may not patch a workload is not tested.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

kmock = pytest.importorskip("kmock")
client = pytest.importorskip("kubernetes.client")

from ditmesh.gateway.autoscale_backends import (  # noqa: E402
    KubernetesBackend,
    NotOurWorkload,
    Workload,
    WorkloadNotFound,
)
from ditmesh.gateway.autoscale_loop import Autoscaler, LeaseElector, backend_for  # noqa: E402
from ditmesh.gateway.autoscale_policy import (  # noqa: E402
    AutoscalePolicy,
    AutoscaleSettings,
    StageScaling,
    StageSnapshot,
)
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402

NS = "serving"
pytestmark = pytest.mark.slow  # HTTP servers, tiny stages and gateway processes (~2 min)


def write_kubeconfig(path, server: str, namespace: str) -> str:
    """A kubeconfig file whose current context is `server`, in `namespace`."""
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: kmock\n"
        f"clusters:\n- name: kmock\n  cluster:\n    server: {server}\n"
        "users:\n- name: test\n  user: {}\n"
        "contexts:\n- name: kmock\n  context:\n    cluster: kmock\n    user: test\n"
        f"    namespace: {namespace}\n"
    )
    return str(path)


class Emulator:
    """kmock's emulator on its own event loop in a thread. Its HTTP server can be stopped
    and started again on the same port (the objects stay), or frozen (connections are
    accepted by the kernel and never answered: a hung API server)."""

    def __init__(self) -> None:
        self.emu = kmock.KubernetesEmulator()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._call(self.emu.__aenter__())
        self.server = None
        self.port: int | None = None
        self._thaw = threading.Event()
        self.start()
        cfg = client.Configuration()
        cfg.host = self.url
        self.api = client.ApiClient(cfg)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = kmock.Server(self.emu, port=self.port)
        self._call(self.server.__aenter__())
        self.port = self.server.port

    def stop(self) -> None:
        self._call(self.server.__aexit__(None, None, None))
        self.server = None

    def freeze(self) -> None:
        self._thaw.clear()
        self.loop.call_soon_threadsafe(self._thaw.wait, 120)

    def thaw(self) -> None:
        self._thaw.set()

    def kubeconfig(self, path, namespace: str = NS) -> str:
        return write_kubeconfig(path, self.url, namespace)

    def close(self) -> None:
        self.thaw()
        self.api.close()
        if self.server is not None:
            self.stop()
        self._call(self.emu.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def emulator():
    """One emulator for the backend's own tests; yields (emulator, ApiClient)."""
    emu = Emulator()
    yield emu.emu, emu.api
    emu.close()


@pytest.fixture
def k8s():
    """A fresh emulator for one gateway test (it may be stopped or frozen)."""
    emu = Emulator()
    yield emu
    emu.close()


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


def all_events(api) -> list:
    try:
        return client.CoreV1Api(api).list_namespaced_event(NS).items
    except client.ApiException as exc:
        if exc.status != 404:  # kmock knows a resource only once an object of it exists
            raise
        return []


def events_for(api, name: str) -> list:
    return [e for e in all_events(api) if e.involved_object.name == name]


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


def test_a_pools_workload_is_checked_against_its_stage_not_its_label(emulator):
    _, api = emulator
    create(api, "Deployment", "pool-den", "denoiser", replicas=1)
    create(api, "Deployment", "pool-vae", "vae", replicas=1)
    backend = KubernetesBackend(
        api,
        NS,
        {
            "denoiser@dev": Workload(kind="Deployment", name="pool-den", stage="denoiser"),
            "denoiser@twin": Workload(kind="Deployment", name="pool-vae", stage="denoiser"),
        },
    )
    backend.scale("denoiser@dev", 2, "up: desired 2 > capacity 1")
    assert spec_replicas(api, "Deployment", "pool-den") == 2
    with pytest.raises(NotOurWorkload, match="ditmesh.io/stage=denoiser; the autoscaler does not"):
        backend.scale("denoiser@twin", 3, "up")
    assert spec_replicas(api, "Deployment", "pool-vae") == 1 and events_for(api, "pool-vae") == []


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


def test_a_stage_that_cannot_be_scaled_is_left_out_and_the_others_are_decided(emulator, caplog):
    _, api = emulator
    create(api, "Deployment", "iso-den", "denoiser", replicas=1)
    create(api, "Deployment", "iso-decoy", None, replicas=2)
    real = KubernetesBackend(
        api,
        NS,
        {
            "encoder": Workload(kind="Deployment", name="iso-missing"),  # not there
            "denoiser": Workload(kind="Deployment", name="iso-den"),
            "vae": Workload(kind="Deployment", name="iso-decoy"),  # not ours
        },
    )
    with pytest.raises(WorkloadNotFound, match="iso-missing does not exist"):
        real.current("encoder")
    stages = {s: StageScaling(max_replicas=6) for s in ("encoder", "denoiser", "vae")}
    settings = AutoscaleSettings(stages=stages)
    load = {
        s: StageSnapshot(stage=s, queued=10, backlog_s=20.0, service_s=2.0, arrival_rate=1.0)
        for s in stages
    }
    with caplog.at_level(logging.WARNING, logger="ditmesh.gateway.autoscale_loop"):
        (d,) = Autoscaler(AutoscalePolicy(settings), real, lambda: load).step()
    assert d.stage == "denoiser" and spec_replicas(api, "Deployment", "iso-den") == d.target > 1
    assert spec_replicas(api, "Deployment", "iso-decoy") == 2 and events_for(api, "iso-decoy") == []
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "autoscale encoder: left out of this decision" in warned
    assert "autoscale vae: left out of this decision" in warned and "does not touch it" in warned


def test_a_released_lease_is_taken_at_once_and_changes_of_leader_are_logged(emulator, caplog):
    _, api = emulator
    t = [datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.timezone.utc)]
    a = LeaseElector(api, NS, "released", "gateway-a", duration_s=600, clock=lambda: t[0])
    b = LeaseElector(api, NS, "released", "gateway-b", duration_s=600, clock=lambda: t[0])
    with caplog.at_level(logging.INFO, logger="ditmesh.gateway.autoscale_loop"):
        assert a() and not b() and not b()
        b.release()  # not the holder: changes nothing
        assert a()
        a.release()
        t[0] += datetime.timedelta(seconds=1)  # long before the 600 s are up
        assert b() and not a()
    lines = [r.getMessage() for r in caplog.records]
    # One line per change, not one per period.
    assert (
        lines.count(
            "autoscale: gateway-b does not hold the lease released (held by gateway-a); no decisions"
        )
        == 1
    )
    assert "autoscale: gateway-a released the lease released" in lines
    assert "autoscale: gateway-b takes the lease released from nobody (released)" in lines
    lease = client.CoordinationV1Api(api).read_namespaced_lease("released", NS)
    assert lease.spec.holder_identity == "gateway-b" and lease.spec.lease_transitions == 1


def test_the_namespace_is_the_flags_else_the_kubeconfig_contexts(tmp_path):
    from ditmesh.gateway.autoscale_gateway import _kubernetes
    from ditmesh.gateway.settings import AutoscaleOptions

    path = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:1", "from-context")
    api, ns = _kubernetes(AutoscaleOptions(), path)
    assert ns == "from-context" and api.configuration.host == "http://127.0.0.1:1"
    api.close()
    api, ns = _kubernetes(AutoscaleOptions(namespace="from-flag"), path)
    assert ns == "from-flag"
    api.close()


# -- a real gateway: `ditmesh serve gateway --autoscale on` against the emulator ------------


@pytest.fixture(scope="module")
def stages(tiny_flux):
    """The three tiny stages as servers in this process; every gateway here shares them."""
    from ditmesh.denoiser.service import serve as serve_denoiser
    from ditmesh.encoder.service import serve as serve_encoder
    from ditmesh.vae.service import serve as serve_vae

    servers = {
        "encoder": serve_encoder(tiny_flux),
        "denoiser": serve_denoiser(tiny_flux),
        "vae": serve_vae(tiny_flux),
    }
    yield tiny_flux, {s: r.address for s, r in servers.items()}
    for r in servers.values():
        r.stop(0)


def gateway_command(stages, *flags: str) -> list[str]:
    """`ditmesh serve gateway` for `stages`: (model or models, stage -> address or addresses)."""
    models, addresses = stages
    cmd = [sys.executable, "-m", "ditmesh.cli", "serve", "gateway"]
    for model in [models] if isinstance(models, str) else models:
        cmd += ["--model", model]
    for stage, address in addresses.items():
        for a in [address] if isinstance(address, str) else address:
            cmd += [f"--{stage}", a]
    return [*cmd, "--drain-seconds=2", *flags]


class GatewayProcess:
    """`ditmesh serve gateway` in a child process; its stderr (the log) collected in lines."""

    def __init__(self, stages, *flags: str, identity: str | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if identity is not None:
            env["POD_NAME"] = identity  # the Lease holder's name, as in a pod
        self.proc = subprocess.Popen(
            gateway_command(stages, *flags),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError("the gateway did not start:\n" + self.log()[-3000:])
        self.address = line.split()[-1]
        self.channel = grpc.insecure_channel(self.address)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(list(self.lines))

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.log()):
                return m
            time.sleep(0.05)
        pytest.fail(f"the gateway never logged {pattern!r}:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 60.0) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def generate(self, rid: str, model: str = "") -> int:
        """One request (to the default model, or `model`); how many `finished` events it got
        (1 when served)."""
        req = gateway_pb2.GenerateRequest(
            prompt="a red fox", height=64, width=64, steps=8, seed=7, request_id=rid, model=model
        )
        return sum(
            e.WhichOneof("event") == "finished" for e in self.stub.Generate(req, timeout=120)
        )

    def burst(self, n: int, threads: int = 4, model: str = "") -> list[int]:
        """`n` requests, `threads` at a time: a queue in front of the one denoiser."""
        ids = [f"burst-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self.generate, ids, [model] * n))


def in_background(fn, *args):
    """Runs `fn(*args)` in a thread; `.result()` gives its value (or raises its error)."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


def until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


# A short period, an objective a queue of three tiny requests misses, no scale-down.
AUTOSCALE = (
    "--autoscale-period=0.3",
    "--scale-down-window=600",
    "--denoiser-target-wait=0.05",
    "--denoiser-replicas-max=4",
)
DECOY = "decoy"  # an unlabelled Deployment that the vae flag names: never to be written


def mesh_objects(api, kind: str) -> None:
    """The denoiser's workload (labelled), and the decoy (not) with 2 replicas."""
    create(api, kind, "ditmesh-denoiser", "denoiser", replicas=1)
    create(api, "Deployment", DECOY, None, replicas=2)


def workload_flags(kind: str) -> tuple[str, ...]:
    return (
        f"--denoiser-workload={kind.lower()}/ditmesh-denoiser",
        f"--vae-workload=deployment/{DECOY}",
    )


def decoy_untouched(api) -> None:
    decoy = client.AppsV1Api(api).read_namespaced_deployment(DECOY, NS)
    assert decoy.spec.replicas == 2 and decoy.metadata.labels == labels(None)
    assert events_for(api, DECOY) == []


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet"])
def test_a_gateway_under_load_scales_its_stage_workload_and_records_it(k8s, stages, tmp_path, kind):
    mesh_objects(k8s.api, kind)
    # No --autoscale-namespace: the kubeconfig context's namespace is the workloads'.
    kubeconfig = k8s.kubeconfig(tmp_path / "kubeconfig")
    gw = GatewayProcess(
        stages, "--autoscale=on", f"--kubeconfig={kubeconfig}", *AUTOSCALE, *workload_flags(kind)
    )
    try:
        gw.wait_log(r"autoscale denoiser: 1 -> 1 \(desired")  # it reads the workload
        assert gw.burst(12) == [1] * 12
        until(lambda: spec_replicas(k8s.api, kind, "ditmesh-denoiser") > 1, 10, "a scale-up")
        up = gw.wait_log(r"autoscale denoiser: 1 -> (\d+) \(desired \d+; up")
        assert spec_replicas(k8s.api, kind, "ditmesh-denoiser") >= int(up.group(1)) > 1
        first = min(events_for(k8s.api, "ditmesh-denoiser"), key=lambda e: e.metadata.name)
        assert first.reason == "ScaledUp" and first.involved_object.kind == kind
        assert f"1 -> {up.group(1)} replicas" in first.message and "desired" in first.message
        assert first.source.component == "ditmesh-autoscaler"
        # The decoy: refused by name in the log, every period, and never written to.
        assert re.search(rf"Deployment {NS}/{DECOY} is not labelled.*does not touch it", gw.log())
        decoy_untouched(k8s.api)
    finally:
        code = gw.stop()
    assert code == 0, gw.log()[-3000:]


def test_dry_run_reads_the_workloads_and_writes_nothing(k8s, stages, tmp_path):
    mesh_objects(k8s.api, "Deployment")
    kubeconfig = k8s.kubeconfig(tmp_path / "kubeconfig")
    gw = GatewayProcess(
        stages,
        "--autoscale=dry-run",
        f"--kubeconfig={kubeconfig}",
        *AUTOSCALE,
        *workload_flags("Deployment"),
    )
    try:
        assert gw.burst(12) == [1] * 12
        gw.wait_log(r"autoscale dry-run: would scale denoiser to [2-4] ")
        assert spec_replicas(k8s.api, "Deployment", "ditmesh-denoiser") == 1
        assert all_events(k8s.api) == []
        decoy_untouched(k8s.api)
    finally:
        code = gw.stop()
    assert code == 0, gw.log()[-3000:]


def test_the_gateway_serves_while_the_api_server_is_gone_and_scales_once_it_is_back(
    k8s, stages, tmp_path
):
    mesh_objects(k8s.api, "Deployment")
    kubeconfig = k8s.kubeconfig(tmp_path / "kubeconfig")
    gw = GatewayProcess(
        stages,
        "--autoscale=on",
        f"--kubeconfig={kubeconfig}",
        *AUTOSCALE,
        *workload_flags("Deployment"),
    )
    try:
        gw.wait_log(r"autoscale denoiser: 1 -> 1 \(desired")
        k8s.stop()
        assert gw.burst(8) == [1] * 8  # served with no API server
        failed = "this decision failed; trying again next period"
        until(lambda: gw.log().count(failed) >= 2, 10, "two failed decisions")
        assert "Max retries exceeded" in gw.log()  # the cause, logged whole
        k8s.start()  # the same port, the same objects
        load = in_background(gw.burst, 16)
        until(
            lambda: spec_replicas(k8s.api, "Deployment", "ditmesh-denoiser") > 1,
            30,
            "a scale-up once the API server is back",
        )
        assert load.result() == [1] * 16
        decoy_untouched(k8s.api)
    finally:
        code = gw.stop()
    assert code == 0, gw.log()[-3000:]


@pytest.mark.alone  # bounds how long the gateway takes to stop
def test_a_hung_api_server_neither_stops_serving_nor_holds_up_the_gateways_exit(
    k8s, stages, tmp_path
):
    mesh_objects(k8s.api, "Deployment")
    kubeconfig = k8s.kubeconfig(tmp_path / "kubeconfig")
    gw = GatewayProcess(
        stages,
        "--autoscale=on",
        f"--kubeconfig={kubeconfig}",
        *AUTOSCALE,
        *workload_flags("Deployment"),
    )
    try:
        gw.wait_log(r"autoscale denoiser: 1 -> 1 \(desired")
        k8s.freeze()  # connections are accepted, never answered
        assert gw.burst(4) == [1] * 4
        gw.wait_log(r"this decision failed; trying again next period", timeout=20)
        assert re.search(r"[Rr]ead timed out", gw.log())
    finally:
        t0 = time.monotonic()
        code = gw.stop(timeout=40)
        took = time.monotonic() - t0
        k8s.thaw()
    assert code == 0, gw.log()[-3000:]
    assert took < 20, f"the gateway took {took:.0f} s to stop behind a hung API server"


def test_with_a_lease_only_its_holder_scales_and_a_stopped_holder_hands_it_over(
    k8s, stages, tmp_path
):
    mesh_objects(k8s.api, "Deployment")
    kubeconfig = k8s.kubeconfig(tmp_path / "kubeconfig", namespace="default")
    flags = (
        "--autoscale=on",
        f"--kubeconfig={kubeconfig}",
        f"--autoscale-namespace={NS}",  # not the kubeconfig's: the flag wins
        "--autoscale-lease=ditmesh-autoscaler",
        *AUTOSCALE,
        *workload_flags("Deployment"),
    )
    leases = client.CoordinationV1Api(k8s.api)
    a = GatewayProcess(stages, *flags, identity="gateway-a")
    b = None
    try:
        a.wait_log(r"gateway-a took the lease ditmesh-autoscaler")
        b = GatewayProcess(stages, *flags, identity="gateway-b")
        b.wait_log(r"gateway-b does not hold the lease ditmesh-autoscaler \(held by gateway-a\)")
        # Load on b alone: a, the holder, sees none and keeps 1; b decides nothing.
        assert b.burst(8) == [1] * 8
        assert spec_replicas(k8s.api, "Deployment", "ditmesh-denoiser") == 1
        assert "autoscale denoiser:" not in b.log()
        assert events_for(k8s.api, "ditmesh-denoiser") == []
        # a stops and hands the lease back; b takes it at its next period and scales.
        load = in_background(b.burst, 24)
        assert a.stop() == 0, a.log()[-3000:]
        assert "gateway-a released the lease ditmesh-autoscaler" in a.log()
        b.wait_log(r"gateway-b takes the lease ditmesh-autoscaler", timeout=10)
        until(
            lambda: spec_replicas(k8s.api, "Deployment", "ditmesh-denoiser") > 1,
            30,
            "b's scale-up",
        )
        assert load.result() == [1] * 24
        lease = leases.read_namespaced_lease("ditmesh-autoscaler", NS)
        assert lease.spec.holder_identity == "gateway-b" and lease.spec.lease_transitions == 1
        # Each Event names the gateway that decided: b, never a.
        scaled = events_for(k8s.api, "ditmesh-denoiser")
        assert scaled and {e.reporting_instance for e in scaled} == {"gateway-b"}
        assert {e.source.host for e in scaled} == {"gateway-b"}
        decoy_untouched(k8s.api)
    finally:
        if a.proc.poll() is None:
            a.stop()
        code = b.stop() if b is not None else 0
    assert code == 0, b.log()[-3000:]


# -- two models behind one gateway: a denoiser pool each, a workload each -----------------


@pytest.fixture(scope="module")
def twin(tiny_flux, tmp_path_factory) -> str:
    """tiny_flux with another transformer (as tests/test_multi_model.py's): the same encoders
    and VAE, so one encoder pool and one VAE pool, and a denoiser pool per model."""
    from ditmesh.tiny import make_tiny

    root = tmp_path_factory.mktemp("twin")
    other = make_tiny("flux", root / "other", seed=5)
    twin = root / "tiny-twin"
    shutil.copytree(tiny_flux, twin)
    shutil.rmtree(twin / "transformer")
    shutil.copytree(other / "transformer", twin / "transformer")
    return str(twin)


@pytest.fixture(scope="module")
def two_models(stages, twin):
    """`stages` plus twin's denoiser: models (dev, twin), every denoiser address for the
    gateway to sort by what each serves."""
    from ditmesh.denoiser.service import serve as serve_denoiser

    model, addresses = stages
    twin_denoiser = serve_denoiser(twin)
    yield (
        [model, twin],
        {**addresses, "denoiser": [addresses["denoiser"], twin_denoiser.address]},
    )
    twin_denoiser.stop(0)


NAMES = ("--name=dev", "--name=twin")


def test_two_models_load_on_one_scales_that_models_denoiser_workload_only(
    k8s, two_models, tmp_path
):
    create(k8s.api, "Deployment", "ditmesh-denoiser-dev", "denoiser", replicas=1)
    create(k8s.api, "StatefulSet", "ditmesh-denoiser-twin", "denoiser", replicas=1)
    kubeconfig = k8s.kubeconfig(tmp_path / "kubeconfig")
    gw = GatewayProcess(
        two_models,
        *NAMES,
        "--autoscale=on",
        f"--kubeconfig={kubeconfig}",
        *AUTOSCALE,  # the denoiser's bounds and objective: each denoiser pool's
        "--pool-workload=denoiser@dev=deployment/ditmesh-denoiser-dev",
        "--pool-workload=denoiser@twin=statefulset/ditmesh-denoiser-twin",
    )
    try:
        gw.wait_log(r"autoscale on: pools denoiser@dev, denoiser@twin,")
        gw.wait_log(r"autoscale denoiser@dev: 1 -> 1 \(desired")  # both workloads are read
        gw.wait_log(r"autoscale denoiser@twin: 1 -> 1 \(desired")
        assert gw.burst(12, model="twin") == [1] * 12
        until(
            lambda: spec_replicas(k8s.api, "StatefulSet", "ditmesh-denoiser-twin") > 1,
            10,
            "twin's scale-up",
        )
        up = gw.wait_log(r"autoscale denoiser@twin: 1 -> (\d+) \(desired \d+; up")
        assert spec_replicas(k8s.api, "StatefulSet", "ditmesh-denoiser-twin") >= int(up.group(1))
        first = min(events_for(k8s.api, "ditmesh-denoiser-twin"), key=lambda e: e.metadata.name)
        assert first.reason == "ScaledUp" and first.involved_object.kind == "StatefulSet"
        # dev had no load: decided every period, never scaled, never written to.
        assert spec_replicas(k8s.api, "Deployment", "ditmesh-denoiser-dev") == 1
        assert events_for(k8s.api, "ditmesh-denoiser-dev") == []
        decided = re.findall(r"autoscale denoiser@dev: 1 -> (\d+)", gw.log())
        assert decided and set(decided) == {"1"}
        assert "left out of this decision" not in gw.log()
    finally:
        code = gw.stop()
    assert code == 0, gw.log()[-3000:]


@pytest.mark.parametrize(
    ("flag", "error"),
    [
        (
            "--denoiser-workload=deployment/ditmesh-denoiser",
            "error: --denoiser-workload: the denoiser stage has 2 pools (denoiser@dev, "
            "denoiser@twin); give each its own with --pool-workload LABEL=KIND/NAME",
        ),
        (
            "--pool-workload=denoiser@schnell=deployment/ditmesh-denoiser",
            "error: --pool-workload names no pool of this gateway: denoiser@schnell; its pools "
            "are encoder, denoiser@dev, denoiser@twin, vae",
        ),
    ],
)
def test_a_workload_that_fits_no_pool_refuses_to_start_in_one_line(two_models, flag, error):
    # Refused before any API call: no kubeconfig, no emulator needed.
    done = subprocess.run(
        gateway_command(two_models, *NAMES, "--autoscale=on", flag),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "listening on" not in done.stdout
    # One line (the pools' own log lines may come after it: they start before the autoscaler).
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [error]
    assert "Traceback" not in done.stderr
