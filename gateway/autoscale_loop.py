"""The autoscaler's loop: read, decide, apply, log; and who among the gateways may do it.

`Autoscaler.step()` reads one load snapshot per stage (a callable the gateway supplies,
from its StagePools), fills in the replica counts from the backend, asks the policy,
logs one line per decision with its inputs, and applies the changes through the backend.
Its "stages" are the gateway's pools, by label: a stage's name, or `stage@model` for each
pool of a stage that serves several models (gateway/autoscale_gateway.py); each is decided
and applied on its own.
`Autoscaler.run()` does that every `decision_period_s` on an asyncio loop (the blocking
backend calls go to a thread). `backend_for(mode, ...)` maps `--autoscale off|dry-run|on`.

A stage whose workload cannot be read or scaled (`StageNotScalable`: not labelled as
ours, not found) is logged every period and left out of that decision; the other stages
are decided as usual. Any other failure (the API server gone) fails the whole period,
which is logged and tried again at the next.

`LeaseElector` keeps a `coordination.k8s.io/v1` Lease so that only one of several gateway
replicas scales. It reads, then patches: the API server's optimistic concurrency
(resourceVersion) is what makes two racing takeovers safe on a real cluster; kmock does
not check resourceVersion, so that race is untested here. It logs when it starts or stops
leading, and `release()` (at the gateway's stop) hands the Lease back at once instead of
leaving the others to wait out its duration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

from ditmesh.gateway.autoscale_backends import (
    API_TIMEOUT_S,
    DryRunBackend,
    NoopBackend,
    ScaleBackend,
    StageNotScalable,
)
from ditmesh.gateway.autoscale_policy import AutoscalePolicy, Decision, StageSnapshot

log = logging.getLogger(__name__)

MODES = ("off", "dry-run", "on")


def backend_for(
    mode: str, real: ScaleBackend | None, counts: Callable[[str], tuple[int, int]]
) -> ScaleBackend:
    """off: a no-op; dry-run: reads `real` (or `counts`), logs; on: `real` itself."""
    if mode == "off":
        return NoopBackend(counts)
    if mode == "dry-run":
        return DryRunBackend(real if real is not None else NoopBackend(counts))
    if mode == "on":
        if real is None:
            raise ValueError("--autoscale on needs a backend (Kubernetes or local processes)")
        return real
    raise ValueError(f"--autoscale must be one of {', '.join(MODES)}, got {mode!r}")


class Autoscaler:
    def __init__(
        self,
        policy: AutoscalePolicy,
        backend: ScaleBackend,
        read: Callable[[], dict[str, StageSnapshot]],
        clock: Callable[[], float] = time.monotonic,
        leader: Callable[[], bool] | None = None,
    ) -> None:
        self.policy = policy
        self.backend = backend
        self.read = read
        self.clock = clock
        self.leader = leader
        self.last: list[Decision] = []
        self.desired: dict[str, int] = {}
        """The replicas the autoscaler wants per stage now (after bounds, hysteresis and the
        GPU budget), also in dry-run: for export, so KEDA or an HPA can act on them."""
        self.scale_events: dict[tuple[str, str], int] = {}
        """(pool, "up" | "down") -> decisions whose target differs from the last one (the
        first from the replicas there were), dry-run included: a running count, for export."""

    def step(self, read: dict[str, StageSnapshot] | None = None) -> list[Decision]:
        """One decision period; blocking (backend calls). `read`: the snapshots, when the
        caller took them already (on the thread that owns the pools)."""
        if self.leader is not None and not self.leader():
            log.debug("autoscale: not the leader; no decision")
            return []
        snaps = {}
        for name, snap in (self.read() if read is None else read).items():
            if name not in self.policy.settings.stages:
                continue
            try:
                replicas, ready = self.backend.current(name)
            except StageNotScalable as exc:
                log.warning("autoscale %s: left out of this decision: %s", name, exc)
                continue
            snaps[name] = dataclasses.replace(snap, replicas=replicas, ready=ready)
        decisions = self.policy.decide(self.clock(), snaps)
        for d in decisions:
            before = self.desired.get(d.stage, d.inputs.replicas)
            if d.target != before:
                key = (d.stage, "up" if d.target > before else "down")
                self.scale_events[key] = self.scale_events.get(key, 0) + 1
            self.desired[d.stage] = d.target
            log.info("%s", d.log_line())
            if d.changes:
                try:
                    self.backend.scale(d.stage, d.target, d.reason)
                except StageNotScalable as exc:  # relabelled or deleted since it was read
                    log.warning("autoscale %s: not applied: %s", d.stage, exc)
        self.last = decisions
        return decisions

    async def run(self, stop: asyncio.Event) -> None:
        period = self.policy.settings.decision_period_s
        while not stop.is_set():
            # Read on the loop (the pools are the loop's), decide and apply in a thread.
            try:
                await asyncio.to_thread(self.step, self.read())
            except Exception:  # noqa: BLE001 - an API outage must not end autoscaling: the
                # error is logged whole every period, and the next period tries again.
                log.exception("autoscale: this decision failed; trying again next period")
            try:
                await asyncio.wait_for(stop.wait(), period)
            except TimeoutError:
                pass


class LeaseElector:
    """Holds a Lease named `name` as `identity`; `__call__` renews it and says if we lead."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        name: str,
        identity: str,
        duration_s: int = 15,
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        from kubernetes import client

        self._client = client
        self.api = client.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration_s = duration_s
        self.clock = clock or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self.leading: bool | None = None
        """What the last call found (None: not asked yet); a change is logged."""

    def __call__(self) -> bool:
        leading, holder = self._elect()
        if leading != self.leading:
            if not leading:
                log.info(
                    "autoscale: %s does not hold the lease %s (held by %s); no decisions",
                    self.identity,
                    self.name,
                    holder,
                )
            elif self.leading is not None:  # taking it logged its own line
                log.info("autoscale: %s leads again (lease %s)", self.identity, self.name)
            self.leading = leading
        return leading

    def _elect(self) -> tuple[bool, str | None]:
        """(whether we lead now, the holder's identity)."""
        c = self._client
        now = self.clock()
        try:
            lease = self.api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=API_TIMEOUT_S
            )
        except c.ApiException as exc:
            if exc.status != 404:
                raise
            body = c.V1Lease(
                metadata=c.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=self._spec(now, acquired=now, transitions=0),
            )
            self.api.create_namespaced_lease(self.namespace, body, _request_timeout=API_TIMEOUT_S)
            log.info("autoscale: %s took the lease %s (new)", self.identity, self.name)
            return True, self.identity
        spec = lease.spec
        renewed = spec.renew_time or spec.acquire_time
        # No holder: released by a gateway that stopped; free at once.
        free = not spec.holder_identity or (
            renewed is None or (now - renewed).total_seconds() > (spec.lease_duration_seconds or 0)
        )
        if spec.holder_identity != self.identity and not free:
            return False, spec.holder_identity
        if spec.holder_identity == self.identity:
            new = self._spec(
                now, acquired=spec.acquire_time or now, transitions=spec.lease_transitions or 0
            )
        else:
            log.info(
                "autoscale: %s takes the lease %s from %s",
                self.identity,
                self.name,
                spec.holder_identity or "nobody (released)",
            )
            new = self._spec(now, acquired=now, transitions=(spec.lease_transitions or 0) + 1)
        self._patch(lease, self.api.api_client.sanitize_for_serialization(new))
        return True, self.identity

    def release(self) -> None:
        """Hands the Lease back if we hold it, so another gateway leads at its next period."""
        lease = self.api.read_namespaced_lease(
            self.name, self.namespace, _request_timeout=API_TIMEOUT_S
        )
        if lease.spec.holder_identity != self.identity:
            return
        self._patch(lease, {"holderIdentity": None})  # merge patch: null removes it
        self.leading = False
        log.info("autoscale: %s released the lease %s", self.identity, self.name)

    def _patch(self, lease: Any, spec: dict[str, Any]) -> None:
        patch = {"metadata": {"resourceVersion": lease.metadata.resource_version}, "spec": spec}
        self.api.patch_namespaced_lease(
            self.name, self.namespace, patch, _request_timeout=API_TIMEOUT_S
        )

    def _spec(self, now: datetime.datetime, acquired: datetime.datetime, transitions: int) -> Any:
        return self._client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=self.duration_s,
            acquire_time=acquired,
            renew_time=now,
            lease_transitions=transitions,
        )
