"""The start-up warm-up request has the shapes real requests have, for every family."""

from __future__ import annotations

import pytest
import torch

from ditmesh.common.models import resolve_model
from ditmesh.denoiser.parallel.mesh import single_process_mesh
from ditmesh.denoiser.runner import load_adapter, warmup_job
from ditmesh.denoiser.sampler import sample
from ditmesh.tiny import make_tiny


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart-sigma"])
def test_warmup_job_has_the_encoder_shapes(family, tmp_path):
    model = resolve_model(str(make_tiny(family, tmp_path / family)))
    adapter = load_adapter(model, torch.device("cpu"), "float32")
    job = warmup_job(adapter, model, cfg=True, steps=1)
    assert job.height == model.family.default_size
    job.height = job.width = 64  # the conditioning shapes are what is checked; keep it fast
    enc_names = {
        "flux": {"prompt_embeds", "pooled_prompt_embeds"},
        "sd3": {"prompt_embeds", "pooled_prompt_embeds"},
        "pixart-sigma": {"prompt_embeds", "prompt_attention_mask"},
    }[family]
    assert set(job.cond) == enc_names | {"negative_" + n for n in enc_names}
    assert job.cond["prompt_embeds"].shape[1] >= model.max_prompt_tokens
    out = sample(adapter, job, single_process_mesh())
    assert out.shape == (1, model.latent_channels, 8, 8)
    assert torch.isfinite(out).all()
