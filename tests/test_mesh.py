"""End to end: `ditmesh up` as a user runs it, and the images it makes.

The mesh's image must be the image plain diffusers.FluxPipeline makes from the
same folder, prompt and seed: float32 on CPU, max abs pixel difference <= 1/255.
"""

from __future__ import annotations

import io
import os
import subprocess

import grpc
import numpy as np
import pytest
from PIL import Image

from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc, vae_pb2

from .helpers import UpProcess, decode_events, max_diff, reference

pytestmark = pytest.mark.slow  # every test runs against `ditmesh up`

TOL = 1  # uint8 levels, i.e. 1/255


@pytest.fixture(scope="module")
def stub(up_mesh):
    ch = grpc.insecure_channel(
        up_mesh.address, options=[("grpc.max_receive_message_length", 256 << 20)]
    )
    yield gateway_pb2_grpc.GatewayStub(ch)
    ch.close()


@pytest.fixture(scope="module")
def pipe(tiny_flux):
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(tiny_flux)
    p.set_progress_bar_config(disable=True)
    return p


def test_image_matches_plain_diffusers(stub, pipe):
    req = gateway_pb2.GenerateRequest(
        prompt="a red fox in the snow", height=64, width=96, steps=4, seed=7, guidance=3.5
    )
    events = list(stub.Generate(req, timeout=120))
    images, kinds = decode_events(events)
    assert kinds[0] == "queued" and kinds[1] == "encoded" and kinds[-1] == "finished"
    steps = [(e.step.step, e.step.total) for e in events if e.WhichOneof("event") == "step"]
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert events[-1].finished.seed == 7
    ref = reference(pipe, "a red fox in the snow", height=64, width=96, steps=4, seed=7)
    assert len(images) == 1
    assert images[0].shape == (64, 96, 3)
    assert max_diff(images[0], ref[0]) <= TOL
    # A different seed gives a different image (the comparison above can fail).
    other = reference(pipe, "a red fox in the snow", height=64, width=96, steps=4, seed=8)
    assert max_diff(images[0], other[0]) > TOL


def test_several_images_and_true_cfg_match(stub, pipe):
    req = gateway_pb2.GenerateRequest(
        prompt="a lighthouse",
        negative_prompt="blurry",
        true_cfg_scale=2.0,
        height=80,
        width=64,
        steps=3,
        seed=3,
        guidance=2.0,
        num_images=2,
    )
    images, _ = decode_events(list(stub.Generate(req, timeout=120)))
    ref = reference(
        pipe,
        "a lighthouse",
        height=80,
        width=64,
        steps=3,
        seed=3,
        guidance=2.0,
        negative_prompt="blurry",
        true_cfg_scale=2.0,
        num_images_per_prompt=2,
    )
    assert len(images) == 2
    for got, want in zip(images, ref, strict=True):
        assert max_diff(got, want) <= TOL
    assert max_diff(images[0], images[1]) > TOL


@pytest.mark.parametrize(
    "fmt, pil_format",
    [
        (vae_pb2.OUTPUT_FORMAT_RAW, None),
        (vae_pb2.OUTPUT_FORMAT_PNG, None),
        (vae_pb2.OUTPUT_FORMAT_JPEG, "JPEG"),
        (vae_pb2.OUTPUT_FORMAT_WEBP, "WEBP"),
    ],
)
def test_output_formats(stub, fmt, pil_format):
    base = dict(prompt="a boat", height=64, width=64, steps=2, seed=11)
    raw = stub.GenerateUnary(
        gateway_pb2.GenerateRequest(**base, output_format=vae_pb2.OUTPUT_FORMAT_RAW), timeout=120
    )
    resp = stub.GenerateUnary(
        gateway_pb2.GenerateRequest(**base, output_format=fmt, quality=95), timeout=120
    )
    img = resp.images[0]
    assert img.format == fmt and img.width == 64 and img.height == 64
    want = np.frombuffer(raw.images[0].data, np.uint8).reshape(64, 64, 3)
    if fmt == vae_pb2.OUTPUT_FORMAT_RAW:
        got = np.frombuffer(img.data, np.uint8).reshape(64, 64, 3)
    else:
        got = np.asarray(Image.open(io.BytesIO(img.data)).convert("RGB"))
        assert img.mime_type == {2: "image/jpeg", 3: "image/webp", 1: "image/png"}[fmt]
    if pil_format is not None:
        # Lossy: the pixels are those of the raw image encoded at the asked quality.
        buf = io.BytesIO()
        Image.fromarray(want).save(buf, format=pil_format, quality=95)
        want = np.asarray(Image.open(buf).convert("RGB"))
    assert max_diff(got, want) == 0


def test_list_models(stub, tiny_flux):
    resp = stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
    assert resp.default_model == os.path.basename(tiny_flux)
    info = resp.models[0]
    assert info.family == "flux" and info.size_multiple == 16 and info.max_prompt_tokens == 512


def test_sigterm_stops_every_stage(tiny_flux):
    mesh = UpProcess(tiny_flux)
    children = subprocess.run(
        ["pgrep", "-P", str(mesh.proc.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert len(children) == 4
    assert mesh.stop() == 0
    for pid in children:
        assert (
            not os.path.exists(f"/proc/{pid}")
            or "zombie" in open(f"/proc/{pid}/status").read().lower()
        )
