"""Runs denoise jobs: the seam between the gRPC leader and the processes that compute.

A gang (several ranks denoising one job together) takes one job at a time, so a
runner serialises jobs. `LocalRunner` is a gang of one process; multi-rank
runners keep the same interface, with the leader handing each job to its workers.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch
from ditmesh.common.models import ModelRef, pick_device, pick_dtype
from ditmesh.denoiser.flux import FluxAdapter
from ditmesh.denoiser.job import DenoiseJob, StepCallback


class Runner(Protocol):
    model: ModelRef

    def run(self, job: DenoiseJob, on_step: StepCallback | None = None) -> torch.Tensor: ...

    def close(self) -> None: ...


def load_adapter(model: ModelRef, device: str = "auto", dtype: str = "auto") -> FluxAdapter:
    dev = pick_device(device)
    return FluxAdapter(model, dev, pick_dtype(dtype, dev))


class LocalRunner:
    """A gang of one: runs jobs in this process, one at a time."""

    def __init__(self, model: ModelRef, device: str = "auto", dtype: str = "auto") -> None:
        self.model = model
        self.adapter = load_adapter(model, device, dtype)
        self._lock = threading.Lock()

    def run(self, job: DenoiseJob, on_step: StepCallback | None = None) -> torch.Tensor:
        with self._lock:
            return self.adapter.run(job, on_step).float().cpu()

    def close(self) -> None:
        pass
