"""Per-stage queues and replica routing.

Each stage has a FIFO queue with a bounded number of waiters and a number of
slots (replicas x concurrency each). A request takes a slot on the least-loaded
replica that has not just failed; UNAVAILABLE marks that replica down for a
moment so the retry goes elsewhere.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import grpc

from ditmesh.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from ditmesh.common.server import channel_options


@dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.Channel
    inflight: int = 0
    down_until: float = 0.0
    served: int = 0

    def is_up(self, now: float) -> bool:
        return now >= self.down_until


@dataclass
class Lease:
    stage: StagePool
    replica: Replica
    started: float = field(default_factory=time.monotonic)

    def release(self, ok: bool = True) -> None:
        self.stage._release(self, ok)


class StagePool:
    def __init__(
        self,
        name: str,
        addresses: list[str],
        *,
        slots_per_replica: int = 1,
        max_waiting: int = 64,
        down_seconds: float = 2.0,
    ) -> None:
        if not addresses:
            raise ValueError(f"the {name} stage needs at least one address")
        self.name = name
        self.replicas = [
            Replica(a, grpc.insecure_channel(a, options=channel_options())) for a in addresses
        ]
        self.slots_per_replica = slots_per_replica
        self.max_waiting = max_waiting
        self.down_seconds = down_seconds
        self._cond = threading.Condition()
        self._waiting: collections.deque[int] = collections.deque()
        self._tickets = itertools.count()
        self._service_ema = 0.0

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def _free_replica(self, exclude: set[int]) -> Replica | None:
        now = time.monotonic()
        candidates = [
            r for r in self.replicas if r.inflight < self.slots_per_replica and id(r) not in exclude
        ]
        up = [r for r in candidates if r.is_up(now)]
        pool = up or candidates
        if not pool:
            return None
        return min(pool, key=lambda r: (r.inflight, r.served))

    def retry_hint(self) -> str:
        per = self._service_ema or 5.0
        slots = max(1, self.slots_per_replica * len(self.replicas))
        return f"retry in about {max(1, round(per * (len(self._waiting) + 1) / slots))} s"

    def acquire(self, deadline: float | None, exclude: set[int] | None = None) -> Lease:
        """Waits in FIFO order for a slot; `deadline` is time.monotonic() based."""
        exclude = exclude or set()
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                raise ResourceExhausted(
                    f"the {self.name} queue is full ({len(self._waiting)} waiting); {self.retry_hint()}"
                )
            ticket = next(self._tickets)
            self._waiting.append(ticket)
            try:
                while True:
                    if self._waiting[0] == ticket:
                        replica = self._free_replica(exclude)
                        if replica is not None:
                            replica.inflight += 1
                            return Lease(self, replica)
                    timeout = None if deadline is None else deadline - time.monotonic()
                    if timeout is not None and timeout <= 0:
                        raise DeadlineExceeded(
                            f"the deadline passed while waiting for the {self.name} stage"
                        )
                    self._cond.wait(timeout=min(timeout, 1.0) if timeout is not None else 1.0)
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()

    def position_of_next(self) -> int:
        with self._cond:
            return len(self._waiting)

    def _release(self, lease: Lease, ok: bool) -> None:
        with self._cond:
            lease.replica.inflight -= 1
            if ok:
                lease.replica.served += 1
                took = time.monotonic() - lease.started
                self._service_ema = (
                    took if not self._service_ema else 0.8 * self._service_ema + 0.2 * took
                )
            self._cond.notify_all()

    def mark_down(self, replica: Replica) -> None:
        with self._cond:
            replica.down_until = time.monotonic() + self.down_seconds

    def close(self) -> None:
        for r in self.replicas:
            r.channel.close()


def unavailable(stage: str, detail: str) -> Unavailable:
    return Unavailable(f"the {stage} stage is unavailable: {detail}")
