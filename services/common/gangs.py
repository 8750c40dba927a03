"""Small pieces every process gang (the denoiser's, the VAE's) needs the same way.

They live here rather than in one stage so the VAE stage does not import the
denoiser (its sampler, mesh and adapters) just to pick a port.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch

from ditmesh.common.models import pick_device

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
