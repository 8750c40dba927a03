"""What a gang's leader does about workers that die: one policy for every gang.

A worker that dies while the gang is idle stops the stage at once (it exits
non-zero and its supervisor restarts the whole gang). One that dies mid-request is
left to fail that request by its collective timeout, unless the request stays stuck
past it: collectives replayed from CUDA graphs have no timeout, and the stuck thread
holds the gang, so then the process exits. The gang itself (gangs.GangLeader) and
the server (server.RunningServer) are others'; this module only reads and signals them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ditmesh.common.gangs import GangLeader
    from ditmesh.common.server import RunningServer

log = logging.getLogger(__name__)

STUCK_GRACE_S = 30.0
"""How long past the collective timeout a request may stay stuck on a dead worker."""


class DeadWorkerWatch:
    """What a gang's watcher does about dead workers, decided from plain facts.

    - dead while idle: fail the server (it exits non-zero; a supervisor restarts it);
    - dead during a request: wait, the request fails by itself when its collective
      times out and answers UNAVAILABLE;
    - dead during a request for longer than the collective timeout plus a grace:
      the request is stuck (collectives replayed from CUDA graphs have no timeout, and
      the stuck thread holds the gang), so the process must exit at once.
    """

    def __init__(self, collective_timeout_s: float, grace_s: float = STUCK_GRACE_S) -> None:
        self.limit = collective_timeout_s + grace_s
        self.dead_since: float | None = None

    def check(self, dead: bool, busy: bool, now: float) -> str:
        """ "ok", "fail" or "exit"."""
        if not dead:
            self.dead_since = None
            return "ok"
        if not busy:
            return "fail"
        if self.dead_since is None:
            self.dead_since = now
        return "exit" if now - self.dead_since > self.limit else "ok"


def exit_process(code: int) -> None:
    """Ends this process at once: a thread stuck in a collective would block a normal exit."""
    logging.shutdown()
    os._exit(code)


def watch_gang(
    gang: GangLeader, server: RunningServer, interval_s: float = 1.0
) -> threading.Thread:
    """Starts a thread that acts on `gang`'s dead workers as `DeadWorkerWatch` decides
    (with the gang's collective timeout), until the server stops or the gang closes."""
    watch = DeadWorkerWatch(gang.launch.collective_timeout_s, STUCK_GRACE_S)

    def loop() -> None:
        while not server.wait_stopping(interval_s):
            if gang.closing:
                return
            dead = gang.dead_workers()
            action = watch.check(bool(dead), gang.busy, time.monotonic())
            if action == "fail":
                gang.mark_broken()
                server.fail(f"{gang.name} process {', '.join(dead)} exited")
                return
            if action == "exit":
                log.error(
                    "%s process %s exited and a request has been stuck on it for over %.0f s; "
                    "exiting now",
                    gang.name,
                    ", ".join(dead),
                    watch.limit,
                )
                exit_process(1)
                return

    thread = threading.Thread(target=loop, daemon=True, name=gang.name.replace(" ", "-") + "-watch")
    thread.start()
    return thread
