"""One stage as the gateway sees it: its replicas, its queue and its admission bound.

A request reserves a place in every stage's queue when it is admitted (so the bound
counts what is coming, not only what waits at the door), and gives each place back
when it starts on that stage or leaves. The bound is by count (`max_queue`) and by
estimated work (`max_queue_seconds` of this stage's measured service time per
slot); what is over it is refused at once with RESOURCE_EXHAUSTED and a retry hint.

Slots (replicas x concurrency each) are handed out in FIFO order to the replica
that is up and least loaded; a waiter that leaves (cancel, deadline) leaves the
queue at once. Service time is learned per unit of work (`RequestPlan.work_units`),
so estimates scale with steps, sizes and image counts.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field

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


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future
    exclude: set[int]
    units: float


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
    ) -> None:
        """`discovered`: replicas come and go through discovery (the list may start empty)."""
        self.name = name
        self.limits = limits or StageLimits()
        self._on_health_change = on_health_change
        self.replicas = ReplicaSet(
            name, addresses, health or HealthPolicy(), self._changed, discovered=discovered
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

    def check_admission(self, units: float) -> None:
        """Raises ResourceExhausted (with a hint) or Unavailable if a request cannot join."""
        if not self.replicas.any_up():
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
        return Reservation(self, units)

    # -- slots ----------------------------------------------------------------------------------

    async def acquire(self, units: float, timeout: float, exclude: set[int]) -> Lease:
        """Waits in FIFO order for a slot on an up replica not in `exclude` (ids)."""
        if not self.replicas.any_up():
            raise Unavailable(
                f"the {self.name} stage is unavailable: no healthy replica ({self.replicas.why_down()})"
            )
        future = asyncio.get_running_loop().create_future()
        waiter = _Waiter(future, exclude, units)
        self._waiters.append(waiter)
        self._dispatch()
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
        elif self._down_timer is None and self._waiters:
            loop = asyncio.get_running_loop()
            self._down_timer = loop.call_later(self.limits.down_wait_seconds, self._fail_waiters)
        if self._on_health_change is not None:
            self._on_health_change()

    def _fail_waiters(self) -> None:
        self._down_timer = None
        if self.replicas.any_up():
            return
        err = Unavailable(
            f"the {self.name} stage is unavailable: no healthy replica ({self.replicas.why_down()})"
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
