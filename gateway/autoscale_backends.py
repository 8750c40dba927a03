"""Where the autoscaler's decisions land: Kubernetes workloads, local processes, or a log.

A backend answers `current(stage) -> (replicas asked for, replicas ready)` and applies
`scale(stage, replicas, reason)`, `stage` being the name the autoscaler decides under (a
pool label: `denoiser`, or `denoiser@dev` when the stage has a pool per model). The policy
(`autoscale_policy`) decides; the loop (`autoscale_loop`) reads, decides, applies and
logs. What this module leaves out: which addresses serve a stage in Kubernetes
(EndpointSlice discovery is the gateway's).

- `KubernetesBackend` patches only the `scale` subresource (apps/v1 Deployment or
  StatefulSet; LeaderWorkerSet through the custom-object scale), and only of objects
  labelled as this mesh's stage: anything else is refused with `NotOurWorkload` and left
  as it is; a workload that does not exist is `WorkloadNotFound`. Both are one stage's
  problem (`StageNotScalable`): the loop logs it and decides the other stages. Each
  applied decision is also recorded as an Event on the workload. Every API call has a
  deadline (`API_TIMEOUT_S`): a hung API server must not hang the loop or the gateway's
  stop.
- `LocalProcessBackend` starts and stops `ditmesh serve <stage>` processes and tells the
  gateway which addresses joined or left through callbacks.
- `NoopBackend` (local mode) and `DryRunBackend` (reads a real backend, logs what it would
  do) change nothing.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

PART_OF = ("app.kubernetes.io/part-of", "ditmesh")
STAGE_LABEL = "ditmesh.io/stage"
LWS_GROUP, LWS_VERSION, LWS_PLURAL = "leaderworkerset.x-k8s.io", "v1", "leaderworkersets"
KINDS = ("Deployment", "StatefulSet", "LeaderWorkerSet")
# (connect, read) seconds for each call to the API server; it answers in milliseconds, and
# without a deadline a hung one holds a decision (and the gateway's stop) forever.
API_TIMEOUT_S = (3.0, 5.0)


class ScaleBackend(Protocol):
    def current(self, stage: str) -> tuple[int, int]:
        """(replicas asked for, replicas ready) of a stage."""
        ...

    def scale(self, stage: str, replicas: int, reason: str) -> None:
        """Asks for `replicas` replicas of `stage`; `reason` is recorded with it."""
        ...


class StageNotScalable(Exception):
    """One stage's workload cannot be read or scaled; the other stages are not affected."""


class NotOurWorkload(StageNotScalable, PermissionError):
    """The object named for a stage is not labelled as that stage of this mesh."""


class WorkloadNotFound(StageNotScalable, LookupError):
    """The object named for a stage does not exist (in the backend's namespace)."""


class NoopBackend:
    """Local mode: the stages are what they are; decisions are logged, never applied."""

    def __init__(self, counts: Callable[[str], tuple[int, int]]) -> None:
        self._counts = counts

    def current(self, stage: str) -> tuple[int, int]:
        return self._counts(stage)

    def scale(self, stage: str, replicas: int, reason: str) -> None:
        log.info("autoscale off: %s would go to %d (%s); nothing changed", stage, replicas, reason)


class DryRunBackend:
    """Reads the counts of a real backend and logs what it would ask of it."""

    def __init__(self, inner: ScaleBackend) -> None:
        self.inner = inner
        self.would: list[tuple[str, int, str]] = []

    def current(self, stage: str) -> tuple[int, int]:
        return self.inner.current(stage)

    def scale(self, stage: str, replicas: int, reason: str) -> None:
        self.would.append((stage, replicas, reason))
        log.info("autoscale dry-run: would scale %s to %d (%s)", stage, replicas, reason)


@dataclass(kw_only=True, slots=True, frozen=True)
class Workload:
    """The Kubernetes object that holds one stage pool's replicas."""

    kind: str
    """Deployment, StatefulSet or LeaderWorkerSet."""
    name: str
    """The object's name, in the backend's namespace."""
    stage: str | None = None
    """The stage its `ditmesh.io/stage` label must name; None: the name it is scaled under
    (which is the stage's name when the stage has one pool; a pool `denoiser@dev` sets
    `denoiser`)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"workload kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


class KubernetesBackend:
    """Scales each stage pool's workload through its `scale` subresource; `workloads` is
    keyed by the names the autoscaler decides under (pool labels)."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        workloads: dict[str, Workload],
        identity: str | None = None,
    ) -> None:
        from kubernetes import client  # the k8s extra; only this backend needs it

        self._client = client
        self.namespace = namespace
        self.workloads = workloads
        self.identity = identity
        """The gateway that decides (its Lease identity), named in each Event it records."""
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def _read(self, stage: str) -> tuple[Workload, dict[str, Any]]:
        """The stage's object as a dict, refused unless labelled as this mesh's stage."""
        w = self.workloads[stage]
        ns = self.namespace
        try:
            if w.kind == "LeaderWorkerSet":
                obj = self.custom.get_namespaced_custom_object(
                    LWS_GROUP, LWS_VERSION, ns, LWS_PLURAL, w.name, _request_timeout=API_TIMEOUT_S
                )
            else:
                read = (
                    self.apps.read_namespaced_deployment
                    if w.kind == "Deployment"
                    else self.apps.read_namespaced_stateful_set
                )
                obj = self.apps.api_client.sanitize_for_serialization(
                    read(w.name, ns, _request_timeout=API_TIMEOUT_S)
                )
        except self._client.ApiException as exc:
            if exc.status != 404:
                raise
            raise WorkloadNotFound(
                f"the {stage} stage's {w.kind} {ns}/{w.name} does not exist; "
                f"the autoscaler leaves {stage} as it is"
            ) from None
        labels = (obj.get("metadata") or {}).get("labels") or {}
        expected = w.stage or stage
        if labels.get(PART_OF[0]) != PART_OF[1] or labels.get(STAGE_LABEL) != expected:
            raise NotOurWorkload(
                f"{w.kind} {ns}/{w.name} is not labelled {PART_OF[0]}={PART_OF[1]} and "
                f"{STAGE_LABEL}={expected}; the autoscaler does not touch it"
            )
        return w, obj

    def current(self, stage: str) -> tuple[int, int]:
        _, obj = self._read(stage)
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        return int(spec.get("replicas") or 0), int(status.get("readyReplicas") or 0)

    def scale(self, stage: str, replicas: int, reason: str) -> None:
        w, obj = self._read(stage)  # checked on every call: labels may change
        before = int((obj.get("spec") or {}).get("replicas") or 0)
        body = {"spec": {"replicas": replicas}}
        ns = self.namespace
        t = API_TIMEOUT_S
        if w.kind == "Deployment":
            self.apps.patch_namespaced_deployment_scale(w.name, ns, body, _request_timeout=t)
        elif w.kind == "StatefulSet":
            self.apps.patch_namespaced_stateful_set_scale(w.name, ns, body, _request_timeout=t)
        else:
            self.custom.patch_namespaced_custom_object_scale(
                LWS_GROUP, LWS_VERSION, ns, LWS_PLURAL, w.name, body, _request_timeout=t
            )
        self._event(w, obj, before, replicas, reason)

    def _event(
        self, w: Workload, obj: dict[str, Any], before: int, after: int, reason: str
    ) -> None:
        c = self._client
        now = datetime.datetime.now(datetime.timezone.utc)
        meta = obj.get("metadata") or {}
        api_version = obj.get("apiVersion") or (
            f"{LWS_GROUP}/{LWS_VERSION}" if w.kind == "LeaderWorkerSet" else "apps/v1"
        )
        event = c.CoreV1Event(
            metadata=c.V1ObjectMeta(name=f"{w.name}.{time.time_ns():x}", namespace=self.namespace),
            involved_object=c.V1ObjectReference(
                api_version=api_version,
                kind=w.kind,
                name=w.name,
                namespace=self.namespace,
                uid=meta.get("uid"),
            ),
            reason="ScaledUp" if after > before else "ScaledDown" if after < before else "Scaled",
            message=f"ditmesh autoscaler: {before} -> {after} replicas ({reason})",
            type="Normal",
            source=c.V1EventSource(component="ditmesh-autoscaler", host=self.identity),
            reporting_component="ditmesh-autoscaler",
            reporting_instance=self.identity,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        self.core.create_namespaced_event(self.namespace, event, _request_timeout=API_TIMEOUT_S)


class LocalProcessBackend:
    """Starts and stops local `ditmesh serve <stage>` processes as the autoscaler asks.

    A new process joins through `on_added(stage, address)` once it listens and answers
    SERVING; one scaled away leaves through `on_removed(stage, address)` first (the gateway
    stops sending it work), then gets SIGTERM and drains. `spawn(stage)` builds the process
    (by default a `ditmesh.local.StageProcess` with `args(stage)`); tests pass their own.
    """

    def __init__(
        self,
        spawn: Callable[[str], Any],
        on_added: Callable[[str, str], None],
        on_removed: Callable[[str, str], None],
        start_timeout_s: float = 300.0,
        stop_timeout_s: float = 60.0,
        wait_healthy: Callable[[str, float], None] | None = None,
    ) -> None:
        if wait_healthy is None:
            from ditmesh.local import wait_healthy
        self._wait_healthy = wait_healthy
        self._spawn = spawn
        self._on_added = on_added
        self._on_removed = on_removed
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._lock = threading.Lock()
        self.procs: dict[str, list[Any]] = {}
        self.ready: dict[str, set[int]] = {}
        self.threads: list[threading.Thread] = []

    @staticmethod
    def serve_spawner(
        args: Callable[[str], list[str]], env: dict[str, str]
    ) -> Callable[[str], Any]:
        from ditmesh.local import StageProcess

        # The gateway is many-threaded and starts stages from worker threads: no death
        # signal tied to the starting thread; the gateway stops its stages when it stops.
        return lambda stage: StageProcess(stage, args(stage), env, die_with_parent=False)

    def current(self, stage: str) -> tuple[int, int]:
        with self._lock:
            procs = self.procs.get(stage, [])
            return len(procs), sum(1 for p in procs if id(p) in self.ready.get(stage, set()))

    def scale(self, stage: str, replicas: int, reason: str) -> None:
        with self._lock:
            procs = self.procs.setdefault(stage, [])
            log.info("autoscale local: %s %d -> %d (%s)", stage, len(procs), replicas, reason)
            while len(procs) < replicas:
                proc = self._spawn(stage)
                procs.append(proc)
                self._background(self._join, stage, proc)
            while len(procs) > replicas:
                proc = procs.pop()  # the newest: the longest-running keep their warm caches
                was_ready = id(proc) in self.ready.get(stage, set())
                self.ready.get(stage, set()).discard(id(proc))
                self._background(self._leave, stage, proc, was_ready)

    def _background(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name=f"autoscale-{args[0]}")
        self.threads.append(t)
        t.start()

    def _join(self, stage: str, proc: Any) -> None:
        address = proc.wait_listening(self.start_timeout_s)
        self._wait_healthy(address, self.start_timeout_s)
        with self._lock:
            if proc not in self.procs.get(stage, []):
                return  # scaled away while it started; _leave stops it
            self.ready.setdefault(stage, set()).add(id(proc))
        self._on_added(stage, address)

    def _leave(self, stage: str, proc: Any, was_ready: bool) -> None:
        if was_ready and proc.address is not None:
            self._on_removed(stage, proc.address)
        proc.terminate()
        proc.wait(self.stop_timeout_s)

    def stop_all(self) -> None:
        """Scales every stage it started to zero and waits for the processes to exit."""
        for stage in list(self.procs):
            self.scale(stage, 0, "stopping")
        for t in list(self.threads):
            t.join(self.stop_timeout_s + 5)
