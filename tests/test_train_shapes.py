"""tools/train_shapes.py and ditmesh.shapes_model: the small Flux model of issue 19.

The smoke run trains a few steps of the VAE and of the transformer with its text towers
on CPU and writes the folder; these tests check that the folder is a Flux model that
diffusers and ditmesh load, that it generates at its size, and that a seed fixes the
weights. Whether training reaches the yardstick's bar is the GPU run's model card.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ditmesh import shapes
from ditmesh import shapes_model as sm

_TOOL = pathlib.Path(__file__).resolve().parent.parent / "tools" / "train_shapes.py"
_WEIGHTS = (
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
)


def _tool():
    spec = importlib.util.spec_from_file_location("train_shapes", _TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # rendering workers find their function by name
    spec.loader.exec_module(module)
    return module


def _smoke(out: pathlib.Path, seed: int = 0) -> dict:
    return _tool().main(["--out", str(out), "--device", "cpu", "--smoke", "--seed", str(seed)])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    out = tmp_path_factory.mktemp("shapes") / "model"
    return out, _smoke(out)


def test_every_caption_word_is_one_token():
    cfg = sm.ShapesModelConfig()
    _, _, t5_tok, _ = sm.build_text(cfg, 0)
    clip_tok = sm.clip_tokenizer(list(shapes.VOCAB))
    for word in shapes.VOCAB:
        assert len(clip_tok.tokenize(word)) == 1, word
        assert len(t5_tok.tokenize(word)) == 1, word
    for text in shapes.HELD_OUT:
        words = len(shapes.tokenize(text))
        assert len(clip_tok(text).input_ids) == words + 2  # start and end
        assert len(t5_tok(text).input_ids) == words + 1  # end
        assert words + 1 <= cfg.t5_tokens
    # Text outside the vocabulary still encodes (byte / character pieces), never fails.
    assert t5_tok.unk_token_id not in t5_tok("a lighthouse on a cliff").input_ids


def test_pool_is_the_same_for_any_number_of_workers():
    tool = _tool()
    alone, captions = tool.render_pool(7, 600, 64, 0)
    shared, captions_2 = tool.render_pool(7, 600, 64, 2)
    assert torch.equal(alone, shared) and captions == captions_2
    assert alone.shape == (600, 64, 64, 3) and len(set(captions)) > 300
    assert not set(captions) & set(shapes.HELD_OUT)


def test_rope_axes_sum_to_the_head_dim():
    assert sm.rope_axes(128) == (16, 56, 56)  # FLUX.1's own
    for head_dim in (32, 48, 64, 96):
        axes = sm.rope_axes(head_dim)
        assert sum(axes) == head_dim and all(a % 2 == 0 for a in axes)


def test_default_model_is_small():
    pipe = sm.build_pipeline(sm.ShapesModelConfig())
    counts = sm.parameter_counts(pipe)
    assert 5e6 <= counts["transformer"] <= 20e6
    assert sum(counts.values()) * 2 <= 20e6  # float16 bytes


@pytest.mark.slow
def test_smoke_folder_loads_in_diffusers_and_generates(smoke_run):
    from diffusers import FluxPipeline

    out, report = smoke_run
    assert report["flow"]["steps"] == 3 and report["vae"]["steps"] == 2
    assert set(report["scores"]) >= {"count", "colour", "shape", "position", "overall"}
    card = (out / "MODEL_CARD.md").read_text()
    assert "--smoke" in card and "| position |" in card
    assert (out / "samples.png").stat().st_size > 0
    weights = 0
    for name in _WEIGHTS:
        with safe_open(out / name, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, name
        weights += (out / name).stat().st_size
    assert weights <= 20e6
    vae = json.loads((out / "vae" / "config.json").read_text())
    # Measured from the trained latents, not the placeholders.
    assert vae["scaling_factor"] != 1.0 and vae["shift_factor"] != 0.0

    pipe = FluxPipeline.from_pretrained(out, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        shapes.HELD_OUT[0],
        height=128,
        width=128,
        num_inference_steps=2,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()


@pytest.mark.slow
def test_smoke_folder_is_a_ditmesh_flux_model(smoke_run):
    from ditmesh.common.models import FLUX, resolve_model

    out, _ = smoke_run
    ref = resolve_model(str(out))
    assert ref.family is FLUX
    assert ref.guidance_embeds and ref.default_steps == 28
    assert (ref.vae_scale_factor, ref.latent_channels) == (8, 16)
    assert ref.max_prompt_tokens == sm.ShapesModelConfig().t5_tokens
    assert (ref.heads, ref.blocks) == (4, 5)


@pytest.mark.slow
def test_same_seed_same_weights(smoke_run, tmp_path):
    out, _ = smoke_run
    again = tmp_path / "again"
    _smoke(again)
    for name in _WEIGHTS:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    assert (out / "vae/config.json").read_text() == (again / "vae/config.json").read_text()
