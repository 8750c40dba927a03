"""Where a request goes: the replica on which it is expected to finish soonest.

Pure and clock-free, so the gateway's stage pools and `bench/autoscale_sim.py` use the
same code. A replica's expected finish for a request is when one of its slots frees
(now, if one is free) plus the request's work at that replica's measured speed. A
faster gang that frees up in a moment beats a slow replica that is free now, so in
one pool a 4-GPU gang takes the work while the queue is short (latency) and 1-GPU
replicas absorb a long one (throughput). Replicas not measured yet run at the pool's
speed; with nothing measured the least loaded free replica is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    """One replica as the router sees it."""

    key: object
    """What the caller uses to find the replica again."""
    frees_in: float
    """Seconds until one of its slots is free: 0 if one is free now."""
    seconds_per_unit: float
    """Its measured service seconds per unit of work; 0 when unknown."""
    load: tuple = ()
    """Tie-break, lower first (e.g. requests in flight, requests served)."""


def expected_finish(c: Candidate, units: float, fallback_seconds_per_unit: float) -> float:
    return c.frees_in + units * (c.seconds_per_unit or fallback_seconds_per_unit)


def route(
    candidates: list[Candidate], units: float, fallback_seconds_per_unit: float = 0.0
) -> Candidate | None:
    """The candidate where `units` of work finishes soonest (None if there is none).

    The caller hands the request over only if the chosen replica is free now
    (`frees_in == 0`); otherwise the request waits for that replica.
    """
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda c: (expected_finish(c, units, fallback_seconds_per_unit), c.frees_in, c.load),
    )
