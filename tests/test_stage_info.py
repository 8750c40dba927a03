"""Every stage says what it serves: model, family, and a fingerprint of what it loaded."""

from __future__ import annotations

import shutil

import grpc
import pytest
from safetensors.torch import load_file, save_file

from ditmesh.common.models import resolve_model
from ditmesh.common.stage_info import components_of, describe, fingerprint
from ditmesh.v1 import stage_pb2, stage_pb2_grpc


def test_components_per_stage(tiny_flux):
    assert components_of(tiny_flux, "encoder") == [
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
    ]
    assert components_of(tiny_flux, "denoiser") == ["transformer", "scheduler"]
    assert components_of(tiny_flux, "vae") == ["vae"]


def test_a_sibling_model_shares_what_it_shares_and_only_that(tiny_flux, tmp_path):
    """Like FLUX.1-dev and a fine-tune of it: same encoders and VAE, other transformer weights."""
    sibling = tmp_path / "sibling"
    shutil.copytree(tiny_flux, sibling)
    weights = next((sibling / "transformer").glob("*.safetensors"))
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    a, b = resolve_model(tiny_flux), resolve_model(str(sibling))
    for stage in ("encoder", "vae"):
        assert describe(stage, a).fingerprint == describe(stage, b).fingerprint
    assert describe("denoiser", a).fingerprint != describe("denoiser", b).fingerprint
    assert fingerprint(tiny_flux, ["vae"]) != fingerprint(tiny_flux, ["transformer"])


@pytest.mark.slow
def test_every_stage_server_answers_describe(inproc_mesh, tiny_flux):
    model = resolve_model(tiny_flux)
    for stage, server in (
        ("encoder", inproc_mesh.encoder),
        ("denoiser", inproc_mesh.denoisers[0]),
        ("vae", inproc_mesh.vae),
    ):
        with grpc.insecure_channel(server.address) as ch:
            got = stage_pb2_grpc.StageInfoStub(ch).Describe(stage_pb2.DescribeRequest(), timeout=10)
        assert got.stage == stage and got.model == model.name and got.family == "flux"
        assert got.processes == 1
        assert got.fingerprint == describe(stage, model).fingerprint
