"""The denoiser gang watcher's decisions about dead workers (service.DeadWorkerWatch).

The end-to-end cases (a worker dying while idle or mid-request) run real gangs in
test_gang.py; the stuck-request case needs collectives without a timeout (replayed
from CUDA graphs, GPU only), so its decision is checked here from plain facts.
"""

from ditmesh.denoiser.service import DeadWorkerWatch


def test_dead_worker_while_idle_fails_the_server():
    assert DeadWorkerWatch(10.0).check(dead=True, busy=False, now=0.0) == "fail"


def test_dead_worker_during_a_request_waits_for_the_collective_timeout_then_exits():
    watch = DeadWorkerWatch(10.0, grace_s=5.0)
    assert watch.check(dead=False, busy=True, now=0.0) == "ok"
    assert watch.check(dead=True, busy=True, now=1.0) == "ok"  # first seen dead
    assert watch.check(dead=True, busy=True, now=15.9) == "ok"  # 14.9 s <= 10 + 5
    assert watch.check(dead=True, busy=True, now=16.1) == "exit"  # stuck past the limit


def test_a_request_that_fails_by_itself_leads_to_fail_not_exit():
    watch = DeadWorkerWatch(10.0, grace_s=5.0)
    assert watch.check(dead=True, busy=True, now=0.0) == "ok"
    # The request timed out and answered UNAVAILABLE: the gang is idle now.
    assert watch.check(dead=True, busy=False, now=11.0) == "fail"


def test_the_stuck_clock_starts_when_the_worker_is_first_seen_dead():
    watch = DeadWorkerWatch(10.0, grace_s=5.0)
    assert watch.check(dead=True, busy=True, now=100.0) == "ok"
    assert watch.check(dead=False, busy=True, now=101.0) == "ok"  # (cannot revive; resets)
    assert watch.check(dead=True, busy=True, now=200.0) == "ok"
    assert watch.check(dead=True, busy=True, now=214.0) == "ok"
    assert watch.check(dead=True, busy=True, now=215.5) == "exit"
