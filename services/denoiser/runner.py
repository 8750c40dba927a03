"""Runs denoise jobs: the seam between the gRPC leader and the processes that compute.

A gang (several ranks denoising one job together) takes one job at a time, so a
runner serialises jobs. `LocalRunner` is a gang of one process; multi-rank
runners keep the same interface, with the leader handing each job to its workers.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

import torch

from ditmesh.common.limits import check_size
from ditmesh.common.models import ModelRef, load_class, pick_device, pick_dtype
from ditmesh.denoiser.job import DenoiseJob, PreviewCallback, StepCallback
from ditmesh.denoiser.parallel.mesh import single_process_mesh
from ditmesh.denoiser.sampler import Adapter, sample
from ditmesh.denoiser.speed import EAGER, Speedups, load_on_host
from ditmesh.denoiser.speed import apply as apply_speedups

log = logging.getLogger(__name__)


class Runner(Protocol):
    model: ModelRef

    def run(
        self,
        job: DenoiseJob,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> torch.Tensor: ...

    def is_broken(self) -> bool:
        """Whether the runner failed for good (a gang lost a process): the stage must stop."""
        ...

    def close(self) -> None: ...


def warmup_job(
    adapter: Adapter,
    model: ModelRef,
    *,
    cfg: bool,
    steps: int = 0,
    size: tuple[int, int] | None = None,
    num_images: int = 1,
) -> DenoiseJob:
    """A request at `size` (default: the model's default size) and the default guidance,
    so compiling or capturing happens at start rather than in the first user's request.
    Negative conditioning is always sent: families that guide by default use it; Flux
    only with `cfg` (true CFG). `steps` 0: 2, or with a DiTFastAttn plan its step count
    (other counts run every layer in full, so its window kernels would first compile in
    a user's request)."""
    if not steps:
        steps = adapter.fast_attn.plan.steps if adapter.fast_attn is not None else 2
    cond = adapter.warmup_cond()
    cond.update({"negative_" + k: v.clone() for k, v in cond.items()})
    height, width = size or model.family.default_hw
    return DenoiseJob(
        request_id="warmup",
        height=height,
        width=width,
        steps=steps,
        guidance=model.default_guidance,
        true_cfg_scale=2.0 if cfg else 1.0,
        seed=0,
        num_images=num_images,
        num_frames=model.family.default_num_frames if model.video else 0,
        cond=cond,
    )


def warmup_sizes(model: ModelRef, speed: Speedups) -> list[tuple[int, int]]:
    """The model's default size, then `speed.warmup_sizes`; each checked as a request's is."""
    default = model.family.default_hw
    sizes = [default]
    for h, w in speed.warmup_sizes:
        check_size(model, h, w)
        if (h, w) not in sizes:
            sizes.append((h, w))
    return sizes


def warm_up(run, jobs: list[DenoiseJob]) -> None:
    """Runs the warm-up jobs, saying what it is doing: compiling and capturing can take
    a minute or more per size on a large model, before the stage reports ready."""
    for job in jobs:
        start = time.perf_counter()
        log.info("warming up at %dx%d (compile / CUDA graph capture)...", job.height, job.width)
        run(job)
        log.info("warm at %dx%d in %.1f s", job.height, job.width, time.perf_counter() - start)


def load_adapter(
    model: ModelRef,
    device: str | torch.device = "auto",
    dtype: str = "auto",
    on_host: bool = False,
) -> Adapter:
    """The family's adapter for `device` (dtype "auto" picked for that device).

    `on_host`: the transformer's weights stay on the host until `adapter.to_device()`, so
    a rank that keeps only part of the blocks (PipeFusion) can drop the rest first and
    the GPU never holds the whole model.
    """
    dev = pick_device(device) if isinstance(device, str) else device
    return load_class(model.family.denoiser)(model, dev, pick_dtype(dtype, dev), on_host)


class LocalRunner:
    """A gang of one: runs jobs in this process, one at a time."""

    def __init__(
        self,
        model: ModelRef,
        device: str = "auto",
        dtype: str = "auto",
        speed: Speedups = EAGER,
    ) -> None:
        self.model = model
        sizes = warmup_sizes(model, speed)  # a bad size fails before the model loads
        self.adapter = load_adapter(model, device, dtype, on_host=load_on_host(speed))
        warm = apply_speedups(self.adapter, speed)
        self.mesh = single_process_mesh()
        self._lock = threading.Lock()
        if warm:
            warm_up(self.run, [warmup_job(self.adapter, model, cfg=False, size=s) for s in sizes])

    def run(
        self,
        job: DenoiseJob,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> torch.Tensor:
        with self._lock:
            return sample(self.adapter, job, self.mesh, on_step, on_preview).float().cpu()

    def is_broken(self) -> bool:
        return False  # one process: nothing to lose

    def close(self) -> None:
        pass
