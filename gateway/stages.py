"""One stage as the gateway sees it: its replicas, its queue and its admission bound.

A request reserves a place in every stage's queue when it is admitted (so the bound
counts what is coming, not only what waits at the door), and gives each place back
when it starts on that stage or leaves. The bound is by count (`max_queue`) and by
estimated work (`max_queue_seconds` of this stage's measured service time per
slot); what is over it is refused at once with RESOURCE_EXHAUSTED and a retry hint.

Slots (replicas x concurrency each) are handed out in FIFO order to the replica
where the request finishes soonest (gateway/routing.py); a waiter that leaves (cancel,
deadline) leaves the queue at once. Service time is learned per unit of work
(`RequestPlan.work_units`), so estimates scale with steps, sizes and image counts.

What the autoscaler reads (gateway/autoscale_read.py turns it into a snapshot):
`admitted` (a running count of requests that took a place here), each request's queue
wait (acquire to slot) in a sliding window (`p95_wait`), and `inflight`. Warm-up work
never reaches these numbers: the stages warm up before they answer SERVING.

Scale-to-zero: with `cold_start_wait_s` set (an active autoscaler may start this stage
from zero), a stage with no replica at all admits requests and holds them in its queue
up to that long while a replica starts; past it they get UNAVAILABLE with a retry hint.
Replicas that exist but are all down are a fault, held only `down_wait_seconds`.

It runs a little past 350 lines: admission, the FIFO hand-out of slots and the health
timers share one pool's state, and splitting them would put that state in two places.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from dataclasses import dataclass, field

from ditmesh.client.tls import ChannelTLS
from ditmesh.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from ditmesh.gateway.replicas import Replica, ReplicaSet
from ditmesh.gateway.routing import Candidate, route
from ditmesh.gateway.settings import HealthPolicy, StageLimits

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Lease:
    """A slot on one replica, held for one call."""

    pool: StagePool
    replica: Replica
    units: float
    started: float = field(default_factory=time.monotonic)
    released: bool = False

    def release(self, ok: bool) -> None:
        self.pool._release(self, ok)


class Reservation:
    """A request's place in a stage's queue, from admission until it starts there."""

    def __init__(self, pool: StagePool, units: float) -> None:
        self.pool = pool
        self.units = units
        self.held = True
        pool.pending += 1
        pool.pending_units += units

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.pool.pending -= 1
            self.pool.pending_units -= self.units


@dataclass(frozen=True, kw_only=True)
class Serves:
    """What the replicas of one pool hold: one stage's components, shared by `models`."""

    stage: str
    fingerprint: str
    models: tuple[str, ...]
    others: frozenset[str] = frozenset()
    """Fingerprints of the same stage that other pools of the gateway serve."""

    @property
    def label(self) -> str:
        return self.stage if not self.others else f"{self.stage}@{self.models[0]}"


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future
    exclude: set[int]
    units: float
    since: float
    """When it began to wait (monotonic), for the queue-wait percentiles."""


class StagePool:
    def __init__(
        self,
        name: str,
        addresses: list[str],
        limits: StageLimits | None = None,
        health: HealthPolicy | None = None,
        on_health_change=None,
        *,
        discovered: bool = False,
        serves: Serves | None = None,
        tls: ChannelTLS | None = None,
    ) -> None:
        """`discovered`: replicas come and go through discovery (the list may start empty).
        `serves`: what a replica must hold to join this pool (None: any replica of the stage).
        `tls`: connect to the replicas with TLS (None: plaintext)."""
        self.name = name
        self.serves = serves
        self.label = serves.label if serves is not None else name
        """The pool's name in logs, metrics and the autoscaler: the stage's name when the
        stage has one pool, else `stage@model` (the first model it serves)."""
        self.limits = limits or StageLimits()
        self._on_health_change = on_health_change
        self.replicas = ReplicaSet(
            name,
            addresses,
            health or HealthPolicy(),
            self._changed,
            discovered=discovered,
            fingerprint=serves.fingerprint if serves is not None else None,
            model=serves.models[0] if serves is not None else "",
            others=serves.others if serves is not None else frozenset(),
            tls=tls,
        )
        self.pending = 0
        self.pending_units = 0.0
        self.seconds_per_unit = 0.0
        """Measured service seconds per unit of work (EMA); 0 until the first call ends."""
        self.request_seconds = 0.0
        """Measured service seconds of one request (EMA), for retry hints."""
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._leases: set[Lease] = set()
        self._speed: dict[int, float] = {}
        """Measured seconds per unit of work of each replica (by id), for routing."""
        self._down_timer: asyncio.TimerHandle | None = None
        self.admitted = 0
        """Requests that took a place in this stage's queue (a running count, for rates)."""
        self._waits: collections.deque[tuple[float, float]] = collections.deque()
        """(when, seconds) of each request's wait from acquire to a slot, for `p95_wait`."""
        self.wait_window_s = 60.0
        """How far back `p95_wait` looks (the autoscaler sets its decision period)."""
        self.cold_start_wait_s: float | None = None
        """Set while an autoscaler may start this stage from zero replicas (see above)."""

    # -- admission ------------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        return self.limits.slots_per_replica * max(1, len(self.replicas.up()))

    def backlog_seconds(self) -> float:
        """Estimated seconds of work ahead of a newly admitted request, per slot."""
        spu = self.seconds_per_unit
        if not spu:
            return 0.0
        now = time.monotonic()
        running = sum(max(0.0, lease.units * spu - (now - lease.started)) for lease in self._leases)
        return (self.pending_units * spu + running) / self.slots

    def expected_seconds(self, units: float) -> float:
        return units * self.seconds_per_unit

    def retry_hint(self) -> str:
        per = self.request_seconds or 5.0
        return f"retry in about {max(1, round(per / self.slots))} s"

    def scaled_to_zero(self) -> bool:
        """No replica at all (none known, or all leaving) and an autoscaler may start one."""
        return self.cold_start_wait_s is not None and all(
            r.draining for r in self.replicas.replicas
        )

    def can_take_work(self) -> bool:
        """A replica is up, or one will be started for the work (scale-to-zero)."""
        return self.replicas.any_up() or self.scaled_to_zero()

    @property
    def inflight(self) -> int:
        return len(self._leases)

    def p95_wait(self, now: float | None = None) -> float:
        """The 95th percentile of the queue waits that ended within `wait_window_s`,
        counting those still waiting by how long they have waited so far."""
        now = time.monotonic() if now is None else now
        while self._waits and self._waits[0][0] < now - self.wait_window_s:
            self._waits.popleft()
        waits = [w for _, w in self._waits]
        waits += [now - w.since for w in self._waiters if not w.future.done()]
        if not waits:
            return 0.0
        waits.sort()
        return waits[min(len(waits) - 1, math.ceil(0.95 * len(waits)) - 1)]

    def check_admission(self, units: float) -> None:
        """Raises ResourceExhausted (with a hint) or Unavailable if a request cannot join."""
        if not self.can_take_work():
            raise Unavailable(
                f"the {self.name} stage is unavailable: no healthy replica ({self.replicas.why_down()})"
            )
        lim = self.limits
        if self.pending >= lim.max_queue:
            raise ResourceExhausted(
                f"the {self.name} queue is full ({self.pending} waiting); {self.retry_hint()}"
            )
        if lim.max_queue_seconds and self.seconds_per_unit:
            backlog = self.backlog_seconds() + self.expected_seconds(units) / self.slots
            if backlog > lim.max_queue_seconds:
                raise ResourceExhausted(
                    f"the {self.name} queue holds about {backlog:.0f} s of work, over its limit "
                    f"of {lim.max_queue_seconds:.0f} s; {self.retry_hint()}"
                )

    def reserve(self, units: float) -> Reservation:
        self.admitted += 1
        return Reservation(self, units)

    # -- slots ----------------------------------------------------------------------------------

    async def acquire(self, units: float, timeout: float, exclude: set[int]) -> Lease:
        """Waits in FIFO order for a slot on an up replica not in `exclude` (ids)."""
        if not self.can_take_work():
            raise Unavailable(
                f"the {self.name} stage is unavailable: no healthy replica ({self.replicas.why_down()})"
            )
        future = asyncio.get_running_loop().create_future()
        waiter = _Waiter(future, exclude, units, time.monotonic())
        self._waiters.append(waiter)
        self._dispatch()
        self._arm_down_timer()
        try:
            lease = await asyncio.wait_for(asyncio.shield(future), timeout)
        except BaseException as exc:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release(ok=False)
            future.cancel()
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(
                    f"the deadline passed while waiting for the {self.name} stage"
                ) from None
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        lease.units = units
        lease.started = time.monotonic()
        self._waits.append((lease.started, lease.started - waiter.since))
        return lease

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _candidate(self, replica: Replica, now: float, claimed: float) -> Candidate:
        """`claimed`: seconds of work that requests ahead in the queue wait to run there."""
        if replica.inflight < self.limits.slots_per_replica:
            frees_in = 0.0
        else:
            spu = self._speed.get(id(replica), self.seconds_per_unit)
            frees_in = (
                min(
                    (
                        max(0.0, lease.units * spu - (now - lease.started))
                        for lease in self._leases
                        if lease.replica is replica
                    ),
                    default=0.0,
                )
                + claimed
            )
        return Candidate(
            key=replica,
            frees_in=frees_in,
            seconds_per_unit=self._speed.get(id(replica), 0.0),
            load=(replica.inflight, replica.served),
        )

    def _dispatch(self) -> None:
        cap = self.limits.slots_per_replica
        now = time.monotonic()
        claims: dict[int, float] = {}
        for waiter in list(self._waiters):
            if waiter.future.done():
                self._waiters.remove(waiter)
                continue
            up = self.replicas.up()
            if not any(r.inflight < cap for r in up):
                return
            # A retry avoids the replica that just failed, unless it is the only one up.
            allowed = [r for r in up if id(r) not in waiter.exclude] or up
            candidates = [self._candidate(r, now, claims.get(id(r), 0.0)) for r in allowed]
            best = route(candidates, waiter.units, self.seconds_per_unit)
            if best is None:
                continue
            if best.frees_in > 0:
                # It finishes soonest on a busy replica: it waits for that one, and the
                # requests behind it count its work there.
                spu = best.seconds_per_unit or self.seconds_per_unit
                claims[id(best.key)] = claims.get(id(best.key), 0.0) + waiter.units * spu / cap
                continue
            replica = best.key
            replica.inflight += 1
            lease = Lease(self, replica, units=waiter.units)
            self._leases.add(lease)
            waiter.future.set_result(lease)
            self._waiters.remove(waiter)

    def _release(self, lease: Lease, ok: bool) -> None:
        if lease.released:
            return
        lease.released = True
        self._leases.discard(lease)
        lease.replica.inflight -= 1
        if ok:
            lease.replica.served += 1
            took = time.monotonic() - lease.started
            self.request_seconds = _ema(self.request_seconds, took)
            if lease.units > 0:
                self.seconds_per_unit = _ema(self.seconds_per_unit, took / lease.units)
                key = id(lease.replica)
                self._speed[key] = _ema(self._speed.get(key, 0.0), took / lease.units)
        self._dispatch()

    # -- health ---------------------------------------------------------------------------------

    def _changed(self) -> None:
        self._dispatch()
        if self.replicas.any_up():
            if self._down_timer is not None:
                self._down_timer.cancel()
                self._down_timer = None
        else:
            self._arm_down_timer()
        if self._on_health_change is not None:
            self._on_health_change()

    def _arm_down_timer(self) -> None:
        """Waiters on a stage with nothing up fail after the down wait, or after the cold-start
        wait when the stage is scaled to zero and a replica is being started."""
        if self._down_timer is not None or not self._waiters or self.replicas.any_up():
            return
        wait = self.cold_start_wait_s if self.scaled_to_zero() else self.limits.down_wait_seconds
        loop = asyncio.get_running_loop()
        self._down_timer = loop.call_later(wait, self._fail_waiters)

    def _fail_waiters(self) -> None:
        self._down_timer = None
        if self.replicas.any_up():
            return
        if self.scaled_to_zero():
            err = Unavailable(
                f"the {self.name} stage is scaled to zero and no replica started within "
                f"{self.cold_start_wait_s:.0f} s; {self.retry_hint()}"
            )
        else:
            err = Unavailable(
                f"the {self.name} stage is unavailable: no healthy replica "
                f"({self.replicas.why_down()}); {self.retry_hint()}"
            )
        for waiter in list(self._waiters):
            if not waiter.future.done():
                waiter.future.set_exception(err)
        self._waiters.clear()

    def start(self) -> None:
        self.replicas.start()

    async def close(self) -> None:
        await self.replicas.close()


def _ema(old: float, new: float) -> float:
    return new if not old else 0.8 * old + 0.2 * new


def unavailable(stage: str, detail: str) -> Unavailable:
    return Unavailable(f"the {stage} stage is unavailable: {detail}")
