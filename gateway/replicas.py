"""The replicas of a stage and what the gateway knows of their health.

Every replica is checked actively (grpc.health.v1 Check every `interval`), so a
dead, draining or frozen replica is known before a request is spent on it:
- refused connection (dead): down at once;
- NOT_SERVING (draining, or its gang broke): down at once, its calls left to finish;
- no answer within `timeout`, `frozen_after` times in a row (e.g. SIGSTOPped): down,
  and its calls in flight are cancelled so their requests can be retried elsewhere;
- SERVING again: up within one interval (channels reconnect with a back-off capped
  at one second, not gRPC's default of two minutes).
A call that fails with UNAVAILABLE, or that the progress watchdog gives up on,
marks its replica down for at least `penalty_seconds` whatever the checks say.

The set changes while the gateway runs (gateway/discovery.py drives it from Kubernetes
EndpointSlices): `add` brings a replica in, down until its first check answers SERVING
(only the static list given at start is trusted before any check); `drain` keeps new
work off a terminating one and lets its calls finish; `remove` drops it and closes its
channel once its calls are done. Who calls them, and when, is left to the caller.

What a replica serves: a set that expects a `fingerprint` (gateway/main.py computes it
from the model, the stage computes it from what it loaded: services/common/stage_info.py)
asks each replica `StageInfo.Describe` before its first health check. A replica of
another stage, or of another model's components, is set aside (`foreign`): it gets no
work and no more checks here (the pool of the model it serves takes it). Until a
replica has been described it is down ("not described yet"), static ones included.

With `tls` (`--stage-tls-*`) calls and health checks share one TLS channel; a check
failed in the handshake says why in words (ditmesh.client.tls.explain).

A little over 350 lines on purpose: a replica's life here (joining, being described,
checked, drained, removed) is one story, read whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ditmesh.client.tls import ChannelTLS, explain, open_aio_channel
from ditmesh.common.server import channel_options
from ditmesh.gateway.settings import HealthPolicy
from ditmesh.v1 import stage_pb2, stage_pb2_grpc

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING

# Reconnect quickly once a stage is back, and notice a silent peer on an idle link.
STAGE_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
    # Pings on a link with calls in flight: a peer that stops answering them (a frozen
    # or partitioned host) fails its calls within about 15 s even between health checks.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(eq=False)
class Replica:
    """One address of a stage (a single process, or the leader of a gang)."""

    stage: str
    address: str
    channel: grpc.aio.Channel
    inflight: int = 0
    served: int = 0
    healthy: bool = True
    """Optimistic until the first check answers: a fresh gateway serves at once."""
    draining: bool = False
    """Leaving (terminating, or no longer ready): no new work, its calls in flight finish."""
    reason: str = ""
    """Why the replica is down, for error sentences and logs."""
    down_until: float = 0.0
    unanswered: int = 0
    model: str = ""
    """The model name the replica describes itself with (it checks requests against it)."""
    described: bool = False
    """Its StageInfo answered with what this set expects (always True without a fingerprint)."""
    checked: bool = False
    """A first check (describe or health) has answered, whatever it said."""
    calls: set = field(default_factory=set)
    """Attempts in flight on this replica (objects with `abandon(reason)`), given up on if
    the replica is found frozen."""

    def is_up(self, now: float | None = None) -> bool:
        return self.healthy and not self.draining and (now or time.monotonic()) >= self.down_until

    def describe(self) -> str:
        reason = "draining" if self.draining else self.reason or "down"
        return f"{self.address} ({reason})"


class ReplicaSet:
    """The replicas of one stage, with a health task for each."""

    def __init__(
        self,
        stage: str,
        addresses: list[str],
        policy: HealthPolicy,
        on_change: Callable[[], None],
        *,
        discovered: bool = False,
        fingerprint: str | None = None,
        model: str = "",
        others: frozenset[str] = frozenset(),
        tls: ChannelTLS | None = None,
    ) -> None:
        """`discovered`: replicas come from discovery, so the set may start (and become) empty.
        `fingerprint`: what a replica must serve to join (None: anything); `model` names it
        in messages; `others`: fingerprints of this stage that other pools of the gateway
        take (a replica serving one of those is set aside quietly); `tls`: None, plaintext."""
        if not addresses and not discovered:
            raise ValueError(f"the {stage} stage needs at least one address")
        self.stage = stage
        self.policy = policy
        self.fingerprint = fingerprint
        self.model = model
        self.others = others
        self.tls = tls
        self.foreign: dict[str, str] = {}
        """Address -> what it serves instead, for replicas set aside (see the module doc)."""
        self._on_change = on_change
        self.replicas = [self._replica(a) for a in addresses]
        if fingerprint is not None:
            for r in self.replicas:
                r.healthy = False
                r.reason = "not described yet"
        self._tasks: dict[Replica, asyncio.Task] = {}
        self._retiring: dict[Replica, asyncio.Task] = {}
        self._started = False

    def _replica(self, address: str) -> Replica:
        channel = open_aio_channel(address, [*channel_options(), *STAGE_CHANNEL_OPTIONS], self.tls)
        return Replica(
            stage=self.stage, address=address, channel=channel, described=self.fingerprint is None
        )

    def start(self) -> None:
        self._started = True
        for r in self.replicas:
            self._check(r)

    def _check(self, replica: Replica) -> None:
        self._tasks[replica] = asyncio.create_task(
            self._watch(replica), name=f"health-{replica.address}"
        )

    def get(self, address: str) -> Replica | None:
        return next((r for r in self.replicas if r.address == address), None)

    # -- membership (discovery) ------------------------------------------------------------------

    def add(self, address: str) -> None:
        """A replica joins; it gets work once a health check answers SERVING.

        Present already: nothing changes, unless it was draining (a pod that is ready
        again, or a reused address), which returns it to work as its checks say."""
        if address in self.foreign:
            return
        replica = self.get(address)
        if replica is not None:
            if replica.draining:
                replica.draining = False
                log.info("%s replica %s is back from draining", self.stage, address)
                self._on_change()
            return
        replica = self._replica(address)
        replica.healthy = False
        replica.reason = "not checked yet"
        self.replicas.append(replica)
        log.info("%s replica %s joins (up once a health check answers)", self.stage, address)
        if self._started:
            self._check(replica)
        self._on_change()

    def drain(self, address: str) -> None:
        """The replica gets no new work; its calls in flight finish. Unknown: nothing."""
        replica = self.get(address)
        if replica is None or replica.draining:
            return
        replica.draining = True
        log.info(
            "%s replica %s is draining (%d calls in flight)", self.stage, address, replica.inflight
        )
        self._on_change()

    def remove(self, address: str) -> None:
        """The replica leaves: no new work, no more checks, its channel closes once its
        calls in flight are done. Unknown: nothing."""
        self.foreign.pop(address, None)
        replica = self.get(address)
        if replica is None:
            return
        self.replicas.remove(replica)
        replica.draining = True
        task = self._tasks.pop(replica, None)
        if task is not None:
            task.cancel()
        log.info("%s replica %s leaves (%d calls in flight)", self.stage, address, replica.inflight)
        self._retiring[replica] = asyncio.create_task(
            self._retire(replica, task), name=f"retire-{address}"
        )
        self._on_change()

    async def _retire(self, replica: Replica, health: asyncio.Task | None) -> None:
        if health is not None:
            await _finish(health)
        # The count of calls in flight is kept by the stage pool's leases, which have no
        # hook here; looking at it once per health interval is soon enough to free a channel.
        while replica.inflight > 0:
            await asyncio.sleep(self.policy.interval)
        await replica.channel.close()
        del self._retiring[replica]

    def up(self) -> list[Replica]:
        now = time.monotonic()
        return [r for r in self.replicas if r.is_up(now)]

    def any_up(self) -> bool:
        return bool(self.up())

    def why_down(self) -> str:
        if not self.replicas:
            if self.foreign:
                aside = "; ".join(f"{a} serves {what}" for a, what in self.foreign.items())
                return f"no replica serves {self.model or 'this model'} ({aside})"
            return "no replica known"
        return "; ".join(r.describe() for r in self.replicas if not r.is_up())

    def settled(self) -> bool:
        """Every replica known has answered a first check (or been set aside)."""
        return all(r.checked for r in self.replicas)

    async def _describe(self, replica: Replica) -> bool:
        """Asks the replica what it serves; True once it may join (False: set aside).
        Raises the RPC error of a replica that does not answer."""
        stub = stage_pb2_grpc.StageInfoStub(replica.channel)
        try:
            d = await stub.Describe(stage_pb2.DescribeRequest(), timeout=self.policy.timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            self._set_aside(replica, "no ditmesh.v1.StageInfo (not a ditmesh stage)", warn=True)
            return False
        if d.stage != self.stage:
            self._set_aside(replica, f"the {d.stage} stage, not {self.stage}", warn=True)
            return False
        if d.fingerprint != self.fingerprint:
            self._set_aside(
                replica,
                f"model {d.model!r} (components {d.fingerprint}, not {self.fingerprint})",
                warn=d.fingerprint not in self.others,
            )
            return False
        replica.described = True
        replica.model = d.model
        log.info(
            "%s replica %s serves %s (components %s, %d processes)",
            self.stage,
            replica.address,
            d.model,
            d.fingerprint,
            d.processes,
        )
        return True

    def _set_aside(self, replica: Replica, what: str, *, warn: bool) -> None:
        self.foreign[replica.address] = what
        if replica in self.replicas:
            self.replicas.remove(replica)
        self._tasks.pop(replica, None)
        (log.warning if warn else log.debug)(
            "%s replica %s serves %s: it gets no work for %s",
            self.stage,
            replica.address,
            what,
            self.model or "this pool",
        )
        self._retiring[replica] = asyncio.create_task(
            self._retire(replica, None), name=f"retire-{replica.address}"
        )
        self._on_change()

    def mark_failed(self, replica: Replica, reason: str) -> None:
        """A call on the replica failed: keep new work off it for the penalty time."""
        replica.down_until = time.monotonic() + self.policy.penalty_seconds
        replica.reason = reason
        log.warning("%s replica %s is down: %s", self.stage, replica.address, reason)
        self._on_change()
        asyncio.get_running_loop().call_later(self.policy.penalty_seconds, self._on_change)

    def _set(self, replica: Replica, healthy: bool, reason: str = "") -> None:
        if healthy == replica.healthy:
            if not healthy:
                replica.reason = reason
            return
        replica.healthy = healthy
        replica.reason = reason
        if healthy:
            log.info("%s replica %s is healthy", self.stage, replica.address)
        else:
            log.warning("%s replica %s is down: %s", self.stage, replica.address, reason)
        self._on_change()

    async def _watch(self, replica: Replica) -> None:
        stub = health_pb2_grpc.HealthStub(replica.channel)
        req = health_pb2.HealthCheckRequest(service="")
        p = self.policy
        while True:
            try:
                if not replica.described and not await self._describe(replica):
                    return  # set aside: another pool (or none) takes it
                reply = await stub.Check(req, timeout=p.timeout)
                replica.unanswered = 0
                if reply.status == SERVING:
                    self._set(replica, True)
                else:
                    self._set(replica, False, "not serving")
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    replica.unanswered += 1
                    if replica.unanswered >= p.frozen_after:
                        self._set(
                            replica, False, f"no answer to {replica.unanswered} health checks"
                        )
                        for attempt in list(replica.calls):
                            attempt.abandon(f"{self.stage} replica {replica.address} froze")
                else:
                    replica.unanswered = 0
                    self._set(replica, False, self._why(err))
            replica.checked = True
            await asyncio.sleep(p.interval)

    def _why(self, err: grpc.aio.AioRpcError) -> str:
        details = err.details() or err.code().name.lower()
        why = explain(details, self.tls or False, f"the {self.stage} replica")
        return f"{why} (gRPC: {details})" if why else details

    async def close(self) -> None:
        tasks = [*self._tasks.values(), *self._retiring.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            await _finish(t)
        for r in [*self.replicas, *self._retiring]:
            await r.channel.close()
        self._tasks.clear()
        self._retiring.clear()


async def _finish(task: asyncio.Task) -> None:
    """Waits for a cancelled task; an error it raised (a bug) still comes out."""
    try:
        await task
    except asyncio.CancelledError:
        pass
