"""Small pieces every process gang (the denoiser's, the VAE's) needs the same way.

They live here rather than in one stage so the VAE stage does not import the
denoiser (its sampler, mesh and adapters) just to pick a port.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
import threading
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from ditmesh.common.models import pick_device

log = logging.getLogger(__name__)

IDLE_TIMEOUT = timedelta(days=365)
"""Timeout of a gang's control group: workers wait there for the next job, which may be days."""


def free_port() -> int:
    """A loopback port nothing listens on now, for a gang's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device of one rank: `cuda` without an index means one GPU per local rank."""
    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


class WorkerProcesses:
    """Ranks 1..world-1 of a gang, started by its leader.

    Spawned, not forked: a forked child cannot use CUDA that its parent initialised.
    Daemonic, so they end with a leader that exits normally; a leader killed outright
    closes their sockets, which fails their next collective.
    """

    def __init__(
        self, target: Callable, args_of_rank: Callable[[int], tuple], world: int, prefix: str
    ) -> None:
        ctx = mp.get_context("spawn")
        self.procs: list = []
        for rank in range(1, world):
            p = ctx.Process(
                target=target, args=args_of_rank(rank), daemon=True, name=f"{prefix}-rank{rank}"
            )
            p.start()
            self.procs.append(p)

    def dead(self) -> list[str]:
        return [p.name for p in self.procs if not p.is_alive()]

    def join(self, timeout: float = 30.0) -> None:
        for p in self.procs:
            p.join(timeout=timeout)

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def shut_down(self, tell_stop: Callable[[], None] | None, leave: Callable[[], object]) -> None:
        """Stops the gang: `tell_stop` (None for a broken gang) asks the workers to stop;
        then this process leaves the process group at the same time as they do (NCCL's
        teardown waits for every rank) and reaps them. Workers that could not be told
        are killed first, then the group is left."""
        stopped = False
        if tell_stop is not None:
            try:
                tell_stop()
                stopped = True
            except Exception:  # noqa: BLE001 - stopping anyway
                log.warning("could not tell the gang's workers to stop")
        if stopped:
            leave()
            self.join()
        self.kill()
        if not stopped:
            leave()


def leave_process_group(timeout: float = 20.0) -> bool:
    """Leaves the default group if any, waiting at most `timeout` seconds; True if it closed.

    A broken group may fail to close, which is fine here. NCCL's communicator teardown
    can also block for good once collectives were captured in CUDA graphs (seen with
    torch 2.11 / NCCL 2.28), so the group is closed on a helper thread and a process
    that could not close it says so and moves on; it is exiting anyway.
    """
    if not dist.is_initialized():
        return True

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass

    closer = threading.Thread(target=destroy, daemon=True, name="leave-process-group")
    closer.start()
    closer.join(timeout)
    if closer.is_alive():
        log.warning("the process group did not close within %.0f s; leaving it open", timeout)
        return False
    return True
