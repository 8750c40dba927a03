"""Runs denoise jobs: the seam between the gRPC leader and the processes that compute.

A gang (several ranks denoising one job together) takes one job at a time, so a
runner serialises jobs. `LocalRunner` is a gang of one process; multi-rank
runners keep the same interface, with the leader handing each job to its workers.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch

from ditmesh.common.models import ModelRef, load_class, pick_device, pick_dtype
from ditmesh.denoiser.job import DenoiseJob, StepCallback
from ditmesh.denoiser.parallel.mesh import single_process_mesh
from ditmesh.denoiser.sampler import Adapter, sample
from ditmesh.denoiser.speed import EAGER, Speedups
from ditmesh.denoiser.speed import apply as apply_speedups


class Runner(Protocol):
    model: ModelRef

    def run(self, job: DenoiseJob, on_step: StepCallback | None = None) -> torch.Tensor: ...

    def close(self) -> None: ...


def warmup_job(adapter: Adapter, model: ModelRef, *, cfg: bool, steps: int = 2) -> DenoiseJob:
    """A request at the model's default size and guidance, so compiling or capturing
    happens at start rather than in the first user's request. Negative conditioning is
    always sent: families that guide by default use it; Flux only with `cfg` (true CFG)."""
    cond = adapter.warmup_cond()
    cond.update({"negative_" + k: v.clone() for k, v in cond.items()})
    size = model.family.default_size
    return DenoiseJob(
        request_id="warmup",
        height=size,
        width=size,
        steps=steps,
        guidance=model.default_guidance,
        true_cfg_scale=2.0 if cfg else 1.0,
        seed=0,
        num_images=1,
        cond=cond,
    )


def load_adapter(
    model: ModelRef, device: str | torch.device = "auto", dtype: str = "auto"
) -> Adapter:
    dev = pick_device(device) if isinstance(device, str) else device
    return load_class(model.family.denoiser)(model, dev, pick_dtype(dtype, dev))


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
        self.adapter = load_adapter(model, device, dtype)
        apply_speedups(self.adapter, speed)
        self.mesh = single_process_mesh()
        self._lock = threading.Lock()
        if speed.needs_warmup:
            self.run(warmup_job(self.adapter, model, cfg=False))

    def run(self, job: DenoiseJob, on_step: StepCallback | None = None) -> torch.Tensor:
        with self._lock:
            return sample(self.adapter, job, self.mesh, on_step).float().cpu()

    def close(self) -> None:
        pass
