"""The denoiser gang: N processes that denoise one request together.

Rank 0 (the leader) serves gRPC; it spawns ranks 1..N-1 itself (or they are
started by torchrun). For every request the leader broadcasts the job on a
gloo control group, then all ranks run the same sampling loop on their part of
the mesh. Compute collectives have a timeout, so a dead worker makes the
leader's request fail (UNAVAILABLE) and the leader exit non-zero instead of
hanging. The control group waits for the next job without a practical timeout.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ditmesh.common.errors import Unavailable
from ditmesh.common.gangs import (
    IDLE_TIMEOUT,
    WorkerProcesses,
    free_port,
    leave_process_group,
    rank_device,
)
from ditmesh.common.models import ModelRef, pick_device, resolve_model
from ditmesh.denoiser.job import DenoiseJob, StepCallback
from ditmesh.denoiser.parallel.mesh import (
    ParallelConfig,
    RankGroups,
    build_mesh,
)
from ditmesh.denoiser.parallel.pipefusion import attach_pipefusion
from ditmesh.denoiser.parallel.pipefusion import check_speed as check_pipefusion_speed
from ditmesh.denoiser.parallel.sequence import attach
from ditmesh.denoiser.runner import load_adapter, warm_up, warmup_job, warmup_sizes
from ditmesh.denoiser.sampler import sample
from ditmesh.denoiser.speed import EAGER, Speedups, check_comm_overlap
from ditmesh.denoiser.speed import apply as apply_speedups
from ditmesh.denoiser.speed import release as release_speedups

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class GangSpec:
    """Everything a rank needs to join the gang; plain values, so it crosses processes."""

    model_source: str
    model_name: str | None
    parallel: ParallelConfig
    master_addr: str
    master_port: int
    device: str = "auto"
    dtype: str = "auto"
    collective_timeout_s: float = 120.0
    speed: Speedups = EAGER


class GangMember:
    """One rank's model, mesh and control group."""

    def __init__(self, spec: GangSpec, rank: int, world: int, local_rank: int) -> None:
        self.spec = spec
        self.rank = rank
        self.device = rank_device(spec.device, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=spec.collective_timeout_s)
        if not dist.is_initialized():
            # Under torchrun its agent already serves the rendezvous store at MASTER_PORT.
            under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
            dist.init_process_group(
                backend,
                init_method="env://"
                if under_torchrun
                else f"tcp://{spec.master_addr}:{spec.master_port}",
                rank=rank,
                world_size=world,
                timeout=timeout,
            )
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.model: ModelRef = resolve_model(spec.model_source, spec.model_name)
        # A PipeFusion stage keeps a part of the blocks: it loads on the host and drops the
        # others before its weights go to the device, which never holds the whole model.
        staged = spec.parallel.pipefusion > 1
        self.adapter = load_adapter(self.model, self.device, spec.dtype, on_host=staged)
        spec.parallel.check_model(heads=self.adapter.heads, family=self.model.family.name)
        self.mesh: RankGroups = build_mesh(spec.parallel, rank, world, timeout=timeout)
        self.attached = attach(self.adapter.transformer, self.adapter.plan, self.mesh)
        self.adapter.pipefusion_stage = attach_pipefusion(
            self.adapter.transformer, self.mesh, self.attached.sp if self.attached else None
        )
        self.adapter.to_device()
        self.warm = apply_speedups(self.adapter, spec.speed)

    def broadcast_job(self, job: DenoiseJob | None) -> DenoiseJob | None:
        """Leader: sends `job` (None = stop). Workers: pass None, get the job."""
        if self.rank == 0:
            header = None
            if job is not None:
                fields = asdict(job)
                cond = fields.pop("cond")
                header = {
                    "fields": fields,
                    "cond": [
                        (k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
                        for k, v in cond.items()
                    ],
                }
            box = [header]
        else:
            box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        header = box[0]
        if header is None:
            return None
        cond = {}
        for name, shape, dtype in header["cond"]:
            t = (
                job.cond[name].contiguous()
                if self.rank == 0
                else torch.empty(shape, dtype=getattr(torch, dtype))
            )
            dist.broadcast(t, src=0, group=self.control)
            cond[name] = t
        return DenoiseJob(**header["fields"], cond=cond)

    def run(self, job: DenoiseJob, on_step: StepCallback | None = None) -> torch.Tensor:
        return sample(self.adapter, job, self.mesh, on_step)

    def leave(self) -> bool:
        """Drops CUDA graphs, then the process group; False if the group would not close."""
        release_speedups(self.adapter)
        return leave_process_group()


def worker_main(spec: GangSpec, rank: int, world: int) -> None:
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"
    )
    member = GangMember(spec, rank, world, local_rank=rank)
    dist.barrier(group=member.control)
    while True:
        job = member.broadcast_job(None)
        if job is None:
            break
        try:
            member.run(job)
        except Exception:
            log.exception("rank %d failed on request %s", rank, job.request_id)
            raise
    if not member.leave():
        os._exit(0)  # NCCL teardown is stuck; the work is done, so exit without it


class GangRunner:
    """The leader's side of a gang: the Runner the gRPC service calls."""

    def __init__(
        self,
        model_source: str,
        parallel: ParallelConfig,
        *,
        name: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        collective_timeout_s: float = 120.0,
        speed: Speedups = EAGER,
    ) -> None:
        world = parallel.world_size
        spec = GangSpec(
            model_source=model_source,
            model_name=name,
            parallel=parallel,
            master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(os.environ.get("MASTER_PORT", 0)) or free_port(),
            device=device,
            dtype=dtype,
            collective_timeout_s=collective_timeout_s,
            speed=speed,
        )
        # Checked before any process starts, so a bad layout or size is one clear error.
        model = resolve_model(model_source, name)
        parallel.check_model(heads=model.heads, family=model.family.name, blocks=model.blocks)
        if parallel.pipefusion > 1:
            check_pipefusion_speed(speed.compile, speed.cuda_graphs)
        if speed.compile and speed.comm_overlap != "off":
            check_comm_overlap(speed.comm_overlap)
        sizes = warmup_sizes(model, speed)
        self.parallel = parallel
        self.broken = threading.Event()
        self._lock = threading.Lock()
        external = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
        # Under torchrun the other ranks are torchrun's; it watches them.
        self.workers = WorkerProcesses(
            worker_main, lambda r: (spec, r, world), 1 if external else world, "gang"
        )
        try:
            self.member = GangMember(
                spec, 0, world, local_rank=int(os.environ.get("LOCAL_RANK", 0))
            )
            dist.barrier(group=self.member.control)
        except BaseException:
            self.workers.kill()
            raise
        self.model = self.member.model
        if self.member.warm:
            # Every rank compiles and captures at start, not in the first user's request;
            # one image per dp replica, so each replica sees the batch a request gives it.
            adapter, cfg = self.member.adapter, parallel.cfg == 2
            jobs = [
                warmup_job(adapter, self.model, cfg=cfg, size=size, num_images=parallel.dp)
                for size in sizes
            ]
            warm_up(self.run, jobs)
        log.info(
            "denoiser gang ready: %s on %d processes (%s; %s)",
            parallel.describe(),
            world,
            self.member.device,
            speed.describe(),
        )

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def dead_workers(self) -> list[str]:
        return self.workers.dead()

    def run(self, job: DenoiseJob, on_step: StepCallback | None = None) -> torch.Tensor:
        with self._lock:
            if self.broken.is_set():
                raise Unavailable("the denoiser gang has lost a process and is shutting down")
            dead = self.dead_workers()
            if dead:
                self.broken.set()
                raise Unavailable(f"the denoiser gang lost {', '.join(dead)}")
            try:
                self.member.broadcast_job(job)
                return self.member.run(job, on_step).float().cpu()
            except Exception as exc:
                if isinstance(exc, (RuntimeError, dist.DistBackendError)) or self.dead_workers():
                    self.broken.set()
                    log.exception("the gang failed on request %s", job.request_id)
                    raise Unavailable(
                        f"the denoiser gang failed on request {job.request_id} (a process died or a "
                        f"collective timed out)"
                    ) from exc
                raise

    def close(self) -> None:
        """Stops the workers and leaves the process group together with them (NCCL's
        teardown waits for every rank), then reaps them."""
        with self._lock:
            tell_stop = None if self.broken.is_set() else lambda: self.member.broadcast_job(None)
            self.workers.shut_down(tell_stop, self.member.leave)


def run_torchrun_worker(
    model_source: str,
    parallel: ParallelConfig,
    *,
    name,
    device,
    dtype,
    collective_timeout_s,
    speed: Speedups = EAGER,
) -> None:
    """Ranks > 0 under torchrun: join the gang and follow the leader (with the same
    speedups, so every rank issues the same collectives)."""
    spec = GangSpec(
        model_source=model_source,
        model_name=name,
        parallel=parallel,
        master_addr=os.environ["MASTER_ADDR"],
        master_port=int(os.environ["MASTER_PORT"]),
        device=device,
        dtype=dtype,
        collective_timeout_s=collective_timeout_s,
        speed=speed,
    )
    dist.init_process_group(
        "nccl" if pick_device(device).type == "cuda" else "gloo",
        init_method="env://",
        timeout=timedelta(seconds=collective_timeout_s),
    )
    worker_main(spec, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))


__all__ = ["GangRunner", "GangSpec", "ParallelConfig", "run_torchrun_worker", "worker_main"]
