"""What every process gang (the denoiser's, the VAE's) does the same way.

A gang is N processes that serve one request at a time together: rank 0, the leader,
serves gRPC; ranks 1..N-1 follow it. Here: torchrun's environment read once
(`torchrun_env`), what a rank needs to join (`GangLaunch`), the leader's "header, then
tensors" message (`broadcast_tensor_dict`, None meaning stop), the workers' side
(`WorkerProcesses`, `follow_leader`) and the leader's life cycle (`GangLeader`). Each
gang's own module keeps its model, its job and its collectives; what a leader does
about dead workers is gang_watch.py's. It lives in common so the VAE stage does not
import the denoiser to run a gang.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from ditmesh.common.errors import Unavailable
from ditmesh.common.models import pick_device

log = logging.getLogger(__name__)
T = TypeVar("T")

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


@dataclass(frozen=True, slots=True)
class TorchrunEnv:
    """torchrun's view of this process (one rank per process, with its rendezvous)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def active(self) -> bool:
        """Whether torchrun started this process as one rank of several."""
        return self.world_size > 1


def torchrun_env(environ: Mapping[str, str] = os.environ) -> TorchrunEnv:
    """Reads RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (unset: one process)."""
    port = environ.get("MASTER_PORT")
    return TorchrunEnv(
        rank=int(environ.get("RANK", "0")),
        local_rank=int(environ.get("LOCAL_RANK", "0")),
        world_size=int(environ.get("WORLD_SIZE", "1")),
        master_addr=environ.get("MASTER_ADDR") or None,
        master_port=int(port) if port else None,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class GangLaunch:
    """Everything a rank needs to join its gang; plain values, so it crosses processes."""

    world: int
    """Processes in the gang, the leader included."""
    device: str = "auto"
    """`cuda` without an index: one GPU per local rank."""
    dtype: str = "auto"
    collective_timeout_s: float = 120.0
    """Timeout of compute collectives: a dead rank fails a request instead of hanging it."""
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    """0 until `rendezvous` picks the meeting point."""
    torchrun: bool = False
    """The ranks meet through torchrun's store (env://), not a tcp:// address."""

    @property
    def timeout(self) -> timedelta:
        """The collective timeout, as process groups take it."""
        return timedelta(seconds=self.collective_timeout_s)

    def rendezvous(self, env: TorchrunEnv | None = None) -> GangLaunch:
        """This launch with its meeting point fixed: torchrun's when `env` is active, else
        MASTER_ADDR/MASTER_PORT when set, else a fresh loopback port (`env` None: always)."""
        env = env or TorchrunEnv()
        return replace(
            self,
            master_addr=env.master_addr or "127.0.0.1",
            master_port=env.master_port or free_port(),
            torchrun=env.active,
        )

    def join(self, rank: int, local_rank: int) -> torch.device:
        """Joins the default process group (NCCL on GPU, gloo on CPU); returns this rank's device."""
        device = rank_device(self.device, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            # N ranks on one CPU would otherwise each start a thread per core and wait on
            # each other (3-40x slower on two cores with two ranks).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            # Under torchrun its agent already serves the rendezvous store at MASTER_PORT.
            init_method="env://"
            if self.torchrun
            else f"tcp://{self.master_addr}:{self.master_port}",
            rank=rank,
            world_size=self.world,
            timeout=self.timeout,
        )
        return device


_DTYPES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
"""torch dtypes by their printed name ("torch.float32"), to rebuild a header's tensors."""

TensorMessage = tuple[Any, dict[str, torch.Tensor]]
"""A header of plain values and named tensors, as `broadcast_tensor_dict` sends it."""


def broadcast_tensor_dict(
    message: TensorMessage | None, *, group: dist.ProcessGroup, src: int = 0
) -> TensorMessage | None:
    """Rank `src` sends `message` (None: stop); the others pass None and get it.

    The header and each tensor's name, shape and dtype go first as one object, then
    the tensors one by one as raw tensors (CPU, so `group` is the gloo control group):
    nothing large is pickled. Every rank returns (header, tensors), or None for stop.
    """
    sending = dist.get_rank() == src
    box: list = [None]
    if sending and message is not None:
        header, tensors = message
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        box = [(header, [(k, tuple(v.shape), str(v.dtype)) for k, v in tensors.items()])]
    dist.broadcast_object_list(box, src=src, group=group)
    if box[0] is None:
        return None
    header, layout = box[0]
    out = {}
    for name, shape, dtype in layout:
        t = tensors[name] if sending else torch.empty(shape, dtype=_DTYPES[dtype])
        dist.broadcast(t, src=src, group=group)
        out[name] = t
    return header, out


class GangMember(Protocol):
    """One rank's part of a gang, in an initialised process group."""

    control: dist.ProcessGroup
    """The gloo group the leader's messages travel on (timeout IDLE_TIMEOUT)."""

    def follow(self) -> None:
        """Worker: does what the leader sends until it says stop."""

    def leave(self) -> bool:
        """Leaves the process group; False if it would not close."""


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


def follow_leader(join: Callable[[], GangMember], rank: int, label: str) -> None:
    """A worker's whole life: join (`join` builds the member), follow, leave."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {label}{rank} %(levelname)s %(name)s: %(message)s",
    )
    member = join()
    dist.barrier(group=member.control)
    try:
        member.follow()
    except Exception:
        log.exception("%s%d failed", label, rank)
        raise
    if not member.leave():
        os._exit(0)  # the teardown is stuck; the work is done, so exit without it


class GangLeader:
    """Rank 0's side of a gang: starts the workers, runs one request at a time, stops.

    A gang that lost a process, or failed mid-collective, is out of step for good: it is
    marked broken, answers UNAVAILABLE from then on, and its service stops (on a failed
    request, or through gang_watch.watch_gang). Subclasses hold the model and say what a
    request is; `name` ("denoiser gang") is the subject of their error sentences.
    """

    member: GangMember

    def __init__(
        self,
        name: str,
        launch: GangLaunch,
        workers: WorkerProcesses,
        join: Callable[[], GangMember],
    ) -> None:
        """`workers` are ranks 1..N-1 (none under torchrun); `join` builds rank 0's member."""
        self.name = name
        self.launch = launch
        self._broken = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self.workers = workers
        try:
            self.member = join()
            dist.barrier(group=self.member.control)
        except BaseException:
            self.workers.kill()
            leave_process_group()
            raise

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def closing(self) -> bool:
        """Set when close() starts, so workers exiting on request are not taken for deaths."""
        return self._closing.is_set()

    def is_broken(self) -> bool:
        """Whether the gang lost a process or failed mid-collective; it never recovers."""
        return self._broken.is_set()

    def mark_broken(self) -> None:
        self._broken.set()

    def dead_workers(self) -> list[str]:
        return self.workers.dead()

    def exclusive(
        self, work: Callable[[], T], failed: str, fatal: Callable[[Exception], bool]
    ) -> T:
        """Runs one request's `work` with the gang to itself.

        An exception that `fatal` says left the ranks out of step (or any exception once a
        worker is dead) breaks the gang and becomes UNAVAILABLE with the sentence `failed`;
        others (a bad request, a cancel) pass through.
        """
        with self._lock:
            if self.is_broken():
                raise Unavailable(f"the {self.name} has lost a process and is shutting down")
            dead = self.dead_workers()
            if dead:
                self.mark_broken()
                raise Unavailable(f"the {self.name} lost {', '.join(dead)}")
            try:
                return work()
            except Exception as exc:
                if fatal(exc) or self.dead_workers():
                    self.mark_broken()
                    log.exception("%s", failed)
                    raise Unavailable(failed) from exc
                raise

    def close(self) -> None:
        """Tells the workers to stop (unless broken: then they are killed), leaves the
        process group at the same time as they do (NCCL's teardown waits for every
        rank), and reaps them."""
        self._closing.set()
        with self._lock:
            stopped = False
            if not self.is_broken():
                try:
                    broadcast_tensor_dict(None, group=self.member.control)
                    stopped = True
                except Exception:  # noqa: BLE001 - stopping anyway
                    log.warning("could not tell the %s's workers to stop", self.name)
            if stopped:
                self.member.leave()
                self.workers.join()
            self.workers.kill()
            if not stopped:
                self.member.leave()


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
