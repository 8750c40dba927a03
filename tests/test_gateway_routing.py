"""Routing by expected completion: the router alone, then a stage pool using it (unit tests).

The pools point at addresses nothing listens on and their health checks are not
started; replica speeds are set as if measured.
"""

from __future__ import annotations

import asyncio

from ditmesh.gateway.routing import Candidate, route
from ditmesh.gateway.settings import StageLimits
from ditmesh.gateway.stages import StagePool


def test_the_soonest_finish_wins_even_on_a_busy_replica():
    gang = Candidate(key="gang", frees_in=1.0, seconds_per_unit=1.0)  # busy 1 s more, 4x faster
    single = Candidate(key="single", frees_in=0.0, seconds_per_unit=4.0)
    assert route([gang, single], units=2.0).key == "gang"  # 1 + 2 < 8
    assert route([gang, single], units=0.2).key == "single"  # 0.8 < 1.2


def test_unknown_speeds_fall_back_to_the_pools_and_then_to_load():
    a = Candidate(key="a", frees_in=0.0, seconds_per_unit=0.0, load=(1, 5))
    b = Candidate(key="b", frees_in=0.0, seconds_per_unit=0.0, load=(0, 9))
    assert route([a, b], units=3.0).key == "b"  # equal finish: the less loaded one
    fast = Candidate(key="fast", frees_in=0.0, seconds_per_unit=0.5)
    assert route([a, fast], units=3.0, fallback_seconds_per_unit=1.0).key == "fast"
    assert route([], units=1.0) is None


def pool(n: int) -> StagePool:
    return StagePool(
        "denoiser", [f"127.0.0.1:{i + 1}" for i in range(n)], StageLimits(slots_per_replica=1)
    )


def test_a_short_queue_waits_for_the_fast_gang_a_long_one_spills_to_the_slow_replica():
    async def main():
        p = pool(2)
        gang, single = p.replicas.replicas
        p._speed = {id(gang): 0.5, id(single): 4.0}  # seconds per unit, as if measured
        p.seconds_per_unit = 1.0
        busy = await p.acquire(1.0, timeout=1, exclude=set())
        assert busy.replica is gang  # both free: the fast one
        # The gang frees in ~0.5 s; a 1-unit request finishes sooner there than on the free
        # single replica (4 s): it waits.
        first = asyncio.ensure_future(p.acquire(1.0, timeout=5, exclude=set()))
        await asyncio.sleep(0.01)
        assert not first.done() and single.inflight == 0
        # Seven more: the gang's queue grows (0.5 s each); a later one finishes sooner on the
        # single replica, which takes it.
        later = [asyncio.ensure_future(p.acquire(1.0, timeout=5, exclude=set())) for _ in range(7)]
        await asyncio.sleep(0.01)
        assert single.inflight == 1
        taken = [f for f in later if f.done()]
        assert len(taken) == 1 and taken[0].result().replica is single
        busy.release(ok=True)
        lease = await first  # the gang freed: the first waiter gets it, in order
        assert lease.replica is gang
        for f in [first, *later]:
            if f.done():
                f.result().release(ok=True)
            else:
                f.cancel()
        await asyncio.gather(*later, return_exceptions=True)
        await p.close()

    asyncio.run(main())


def test_replica_speed_is_learned_from_finished_calls():
    async def main():
        p = pool(1)
        (r,) = p.replicas.replicas
        lease = await p.acquire(2.0, timeout=1, exclude=set())
        await asyncio.sleep(0.05)
        lease.release(ok=True)
        assert 0.02 < p._speed[id(r)] < 0.5  # ~0.05 s over 2 units
        assert p.seconds_per_unit == p._speed[id(r)]
        await p.close()

    asyncio.run(main())
