"""The denoiser gang: N processes that denoise one request together.

Rank 0 (the leader) serves gRPC; it spawns ranks 1..N-1 itself (or they are
started by torchrun). For every request the leader broadcasts the job on a
gloo control group, then all ranks run the same sampling loop on their part of
the mesh. Compute collectives have a timeout, so a dead worker makes the
leader's request fail (UNAVAILABLE) and the leader exit non-zero instead of
hanging. The control group waits for the next job without a practical timeout.

What this gang shares with the VAE's (the launch, torchrun's environment, the
leader's lock and broken state, the job broadcast, the dead-worker watcher) is in
services/common/gangs.py and gang_watch.py; this module holds the model, the mesh
and the job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from ditmesh.common import tracing
from ditmesh.common.gangs import (
    IDLE_TIMEOUT,
    GangLaunch,
    GangLeader,
    TorchrunEnv,
    WorkerProcesses,
    broadcast_tensor_dict,
    follow_leader,
    free_port,  # noqa: F401 - re-exported for the tests' spawned gangs
    leave_process_group,
    torchrun_env,
)
from ditmesh.common.models import ModelRef, resolve_model
from ditmesh.denoiser.fp8 import check as check_fp8
from ditmesh.denoiser.job import DenoiseJob, PreviewCallback, StepCallback
from ditmesh.denoiser.parallel.mesh import (
    ParallelConfig,
    RankGroups,
    build_mesh,
)
from ditmesh.denoiser.parallel.pipefusion import attach_pipefusion
from ditmesh.denoiser.parallel.pipefusion import check_speed as check_pipefusion_speed
from ditmesh.denoiser.parallel.sequence import attach
from ditmesh.denoiser.parallel.ulysses import check_fp8_exchange
from ditmesh.denoiser.runner import load_adapter, warm_up, warmup_job, warmup_sizes
from ditmesh.denoiser.sampler import sample
from ditmesh.denoiser.speed import EAGER, Speedups, check_comm_overlap, load_on_host
from ditmesh.denoiser.speed import apply as apply_speedups
from ditmesh.denoiser.speed import release as release_speedups

log = logging.getLogger(__name__)

_JOB_FIELDS = tuple(f.name for f in fields(DenoiseJob) if f.name != "cond")


@dataclass(frozen=True, kw_only=True, slots=True)
class GangSpec:
    """Everything a rank needs to join the gang; plain values, so it crosses processes."""

    model_source: str
    model_name: str | None = None
    parallel: ParallelConfig
    launch: GangLaunch
    """Rendezvous, device, dtype and collective timeout; its world is `parallel.world_size`."""
    speed: Speedups = EAGER

    @classmethod
    def of(
        cls,
        model_source: str,
        parallel: ParallelConfig,
        *,
        name: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        collective_timeout_s: float = 120.0,
        speed: Speedups = EAGER,
        env: TorchrunEnv | None = None,
    ) -> GangSpec:
        """The spec of a gang for this process: torchrun's rendezvous under torchrun, else
        MASTER_ADDR/MASTER_PORT when set, else a fresh loopback port (`env`: read if None)."""
        launch = GangLaunch(
            world=parallel.world_size,
            device=device,
            dtype=dtype,
            collective_timeout_s=collective_timeout_s,
        )
        return cls(
            model_source=model_source,
            model_name=name,
            parallel=parallel,
            launch=launch.rendezvous(env or torchrun_env()),
            speed=speed,
        )


class GangMember:
    """One rank's model, mesh and control group."""

    def __init__(self, spec: GangSpec, rank: int, local_rank: int) -> None:
        self.spec = spec
        self.rank = rank
        self.device = spec.launch.join(rank, local_rank)
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.model: ModelRef = resolve_model(spec.model_source, spec.model_name)
        # A PipeFusion stage keeps a part of the blocks: it loads on the host and drops the
        # others before its weights go to the device, which never holds the whole model.
        staged = spec.parallel.pipefusion > 1
        on_host = staged or load_on_host(spec.speed)  # --fp8: converted on the way over
        self.adapter = load_adapter(self.model, self.device, spec.launch.dtype, on_host=on_host)
        spec.parallel.check_model(heads=self.adapter.heads, family=self.model.family.name)
        self.mesh: RankGroups = build_mesh(
            spec.parallel, rank, spec.launch.world, timeout=spec.launch.timeout
        )
        self.attached = attach(self.adapter.transformer, self.adapter.plan, self.mesh)
        self.adapter.pipefusion_stage = attach_pipefusion(
            self.adapter, self.mesh, self.attached.sp if self.attached else None
        )
        self.warm = apply_speedups(self.adapter, spec.speed)  # moves the weights over

    def broadcast_job(self, job: DenoiseJob | None) -> DenoiseJob | None:
        """Leader: sends `job` (None = stop). Workers: pass None, get the job."""
        message = None
        if self.rank == 0 and job is not None:
            message = ({k: getattr(job, k) for k in _JOB_FIELDS}, job.cond)
        got = broadcast_tensor_dict(message, group=self.control)
        return None if got is None else DenoiseJob(**got[0], cond=got[1])

    def run(
        self,
        job: DenoiseJob,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> torch.Tensor:
        return sample(self.adapter, job, self.mesh, on_step, on_preview)

    def follow(self) -> None:
        """Worker: runs the leader's jobs until it says stop."""
        while (job := self.broadcast_job(None)) is not None:
            try:
                self.run(job)
            except Exception:
                log.error("rank %d failed on request %s", self.rank, job.request_id)
                raise

    def leave(self) -> bool:
        """Drops CUDA graphs, then the process group; False if the group would not close."""
        release_speedups(self.adapter)
        return leave_process_group()


def worker_main(spec: GangSpec, rank: int, local_rank: int | None = None) -> None:
    """Entry point of ranks 1..N-1 (spawned by the leader, or started by torchrun)."""
    local = rank if local_rank is None else local_rank
    follow_leader(lambda: GangMember(spec, rank, local), rank, "rank")


def _is_gang_failure(exc: Exception) -> bool:
    # What a lost rank or a timed-out collective raises; a cancel or bad input is not one.
    return isinstance(exc, (RuntimeError, dist.DistBackendError))


class GangRunner(GangLeader):
    """The leader's side of a gang: the Runner the gRPC service calls."""

    member: GangMember

    def __init__(self, spec: GangSpec, env: TorchrunEnv | None = None) -> None:
        """Starts a gang of `spec.parallel.world_size` processes."""
        self._start(spec, env or torchrun_env())

    @classmethod
    def of(cls, model_source: str, parallel: ParallelConfig, **kw) -> GangRunner:
        """Starts a gang from `GangSpec.of`'s arguments (tools and tests)."""
        return cls(GangSpec.of(model_source, parallel, **kw))

    def _start(self, spec: GangSpec, env: TorchrunEnv) -> None:
        parallel, speed = spec.parallel, spec.speed
        # Checked before any process starts, so a bad layout or size is one clear error.
        model = resolve_model(spec.model_source, spec.model_name)
        parallel.check_model(heads=model.heads, family=model.family.name, blocks=model.blocks)
        if parallel.pipefusion > 1:
            check_pipefusion_speed(speed.compile, speed.cuda_graphs)
        if speed.compile and speed.comm_overlap != "off":
            check_comm_overlap(speed.comm_overlap)
        if speed.fp8:  # each rank converts its own blocks; refused here before any starts
            check_fp8(spec.launch.device, spec.launch.dtype)
        if parallel.ulysses_fp8:
            check_fp8_exchange(spec.launch.device)
        sizes = warmup_sizes(model, speed)
        self.parallel = parallel
        world = parallel.world_size
        # Under torchrun the other ranks are torchrun's; it watches them.
        workers = WorkerProcesses(
            worker_main, lambda r: (spec, r), 1 if spec.launch.torchrun else world, "gang"
        )
        super().__init__(
            "denoiser gang", spec.launch, workers, lambda: GangMember(spec, 0, env.local_rank)
        )
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

    def run(
        self,
        job: DenoiseJob,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> torch.Tensor:
        def work() -> torch.Tensor:
            # The leader waits here until every rank has taken the job (a collective).
            with tracing.span(
                "gang job broadcast", **{"ditmesh.world_size": self.parallel.world_size}
            ):
                self.member.broadcast_job(job)
            return self.member.run(job, on_step, on_preview).float().cpu()

        return self.exclusive(
            work,
            failed=f"the denoiser gang failed on request {job.request_id} (a process died or a "
            f"collective timed out)",
            fatal=_is_gang_failure,
        )


def run_torchrun_worker(spec: GangSpec, env: TorchrunEnv) -> None:
    """Ranks > 0 under torchrun: join the gang and follow the leader (with the same
    speedups, so every rank issues the same collectives)."""
    worker_main(spec, env.rank, env.local_rank)


__all__ = [
    "GangMember",
    "GangRunner",
    "GangSpec",
    "ParallelConfig",
    "free_port",
    "run_torchrun_worker",
    "worker_main",
]
