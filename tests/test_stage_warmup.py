"""Encoder and VAE warm-up at start (`--warmup`): it runs when asked, before the stage
serves (the images a warmed stage makes are checked by every mesh test on a GPU run's
defaults; here the CPU default, off, is what those tests use)."""

from __future__ import annotations

import logging

import pytest
import torch

from ditmesh.common.server import StageOptions
from ditmesh.common.warmup import should_warm


def test_auto_warms_on_gpu_only():
    assert should_warm("auto", torch.device("cuda", 0))
    assert not should_warm("auto", torch.device("cpu"))
    assert should_warm("on", "cpu")
    assert not should_warm("off", "cuda")
    with pytest.raises(ValueError, match="--warmup must be one of auto, on, off"):
        should_warm("yes", "cpu")


@pytest.mark.parametrize("stage", ["encoder", "vae"])
def test_warmup_runs_before_serving(stage, tiny_flux, caplog):
    if stage == "encoder":
        from ditmesh.encoder.service import serve
    else:
        from ditmesh.vae.service import serve
    with caplog.at_level(logging.INFO, logger="ditmesh.common.warmup"):
        running = serve(tiny_flux, StageOptions(warmup="on"))
    try:
        warm = [r for r in caplog.records if r.name == "ditmesh.common.warmup"]
        assert len(warm) == 1 and "warm" in warm[0].getMessage()
    finally:
        running.stop(0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ditmesh.common.warmup"):
        running = serve(tiny_flux, StageOptions(warmup="off"))
    running.stop(0)
    assert not [r for r in caplog.records if r.name == "ditmesh.common.warmup"]
