"""SD3, PixArt-Sigma, PixArt-alpha and HunyuanDiT through the whole mesh, against plain
diffusers.

Each family's tiny model is served by the four stages in this process (real gRPC
on loopback); every image must be the image the family's diffusers pipeline
makes from the same folder, prompt and seed: float32 on CPU, max abs pixel
difference <= 1/255. The PixArt pipelines run with `use_resolution_binning=False`
(the mesh makes the size asked for) and `clean_caption=False` (as the encoder); so does
HunyuanDiTPipeline with `use_resolution_binning=False`. HunyuanDiT is bilingual: a
Chinese prompt must pass through the gateway, the SDK and the CLI unchanged and give the
pipeline's image.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch

from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc, vae_pb2

from .helpers import InProcessMesh, hunyuandit_v11_style, pixart_alpha_with_micro_conditions

pytestmark = pytest.mark.slow  # every test runs a whole mesh of its family in this process

TOL = 1  # uint8 levels, i.e. 1/255

# Family name -> (make_tiny family, prompt token limit). "pixart-alpha-1024" is alpha
# with the size/aspect micro-conditions of the 1024-px checkpoint; "hunyuandit-v1.1" is
# HunyuanDiT with the image meta size and style embedded (v1.2, make_tiny's, has neither).
CASES = {
    "sd3": ("sd3", 256),
    "pixart-sigma": ("pixart-sigma", 300),
    "pixart-alpha": ("pixart-alpha", 120),
    "pixart-alpha-1024": ("pixart-alpha", 120),
    "hunyuandit": ("hunyuandit", 256),
    "hunyuandit-v1.1": ("hunyuandit", 256),
}

# Chinese prompts (every character in the tiny tokenizers' vocabularies).
ASTRONAUT = "一个宇航员在骑马"
INK_PAINTING = "水墨画风格的山水, 红色的太阳"


class Served:
    def __init__(self, case: str, root) -> None:
        import diffusers

        from ditmesh.common.models import resolve_model
        from ditmesh.tiny import make_tiny

        family, self.max_tokens = CASES[case]
        folder = make_tiny(family, root / case, seed=0)
        if case == "pixart-alpha-1024":
            pixart_alpha_with_micro_conditions(folder)
        if case == "hunyuandit-v1.1":
            hunyuandit_v11_style(folder)
        self.folder = str(folder)
        self.model = resolve_model(self.folder)
        self.pipe = getattr(diffusers, self.model.family.pipeline_classes[0]).from_pretrained(
            self.folder
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.mesh = InProcessMesh(self.folder)
        self.channel = grpc.insecure_channel(self.mesh.address)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def generate(self, **kw) -> list[np.ndarray]:
        req = gateway_pb2.GenerateRequest(output_format=vae_pb2.OUTPUT_FORMAT_RAW, **kw)
        resp = self.stub.GenerateUnary(req, timeout=120)
        return [
            np.frombuffer(im.data, np.uint8).reshape(im.height, im.width, 3) for im in resp.images
        ]

    def reference(
        self, prompt, *, negative_prompt="", height, width, steps, seed, guidance, num_images=1
    ) -> list[np.ndarray]:
        extra = {}
        if self.model.family.name.startswith("pixart"):
            extra = dict(use_resolution_binning=False, clean_caption=False)
        elif self.model.family.name == "hunyuandit":
            extra = dict(use_resolution_binning=False)
        out = self.pipe(
            prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=num_images,
            generator=torch.Generator().manual_seed(seed),
            **extra,
        )
        return [np.asarray(im.convert("RGB")) for im in out.images]

    def stop(self) -> None:
        self.channel.close()
        self.mesh.stop()


@pytest.fixture(scope="module", params=list(CASES))
def served(request, tmp_path_factory):
    s = Served(request.param, tmp_path_factory.mktemp("families"))
    yield s
    s.stop()


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_cfg_with_negative_prompt_matches_diffusers(served):
    kw = dict(height=64, width=64, steps=3, seed=7, guidance=4.5)
    images = served.generate(prompt="a red cat on a table", negative_prompt="blurry", **kw)
    ref = served.reference("a red cat on a table", negative_prompt="blurry", **kw)
    assert len(images) == 1 and images[0].shape == (64, 64, 3)
    assert max_diff(images[0], ref[0]) <= TOL
    # The comparison can fail: the negative prompt and the seed both change the image.
    other = served.reference("a red cat on a table", **kw)
    assert max_diff(images[0], other[0]) > TOL
    other = served.reference("a red cat on a table", negative_prompt="blurry", **{**kw, "seed": 8})
    assert max_diff(images[0], other[0]) > TOL


def test_several_images_non_square_empty_negative_matches_diffusers(served):
    # guidance > 1 without a negative prompt: the pipelines guide against "".
    kw = dict(height=64, width=96, steps=3, seed=3, guidance=5.0, num_images=2)
    images = served.generate(prompt="a small house in a dark forest", **kw)
    ref = served.reference("a small house in a dark forest", **kw)
    assert len(images) == 2 and images[0].shape == (64, 96, 3)
    for got, want in zip(images, ref, strict=True):
        assert max_diff(got, want) <= TOL
    assert max_diff(images[0], images[1]) > TOL


def test_without_guidance_matches_diffusers(served):
    kw = dict(height=48, width=80, steps=2, seed=11, guidance=1.0)
    images = served.generate(prompt="a blue bird", negative_prompt="ignored", **kw)
    ref = served.reference("a blue bird", negative_prompt="ignored", **kw)
    assert max_diff(images[0], ref[0]) <= TOL


def test_model_info(served):
    info = served.stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10).models[0]
    assert info.family == served.model.family.name
    assert info.size_multiple == 16
    assert info.max_prompt_tokens == served.max_tokens


def test_prompt_over_the_token_limit(served):
    # One word is one T5 token, plus the end token: the longest prompt the pipeline
    # encodes whole passes, one word more does not.
    longest = " ".join(["cat"] * (served.max_tokens - 1))
    assert len(served.generate(prompt=longest, height=64, width=64, steps=1)) == 1
    prompt = longest + " cat"
    with pytest.raises(grpc.RpcError) as info:
        served.generate(prompt=prompt, height=64, width=64, steps=1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"takes at most {served.max_tokens}" in info.value.details()
    # ... and so is a negative prompt when CFG needs it.
    with pytest.raises(grpc.RpcError) as info:
        served.generate(prompt="a cat", negative_prompt=prompt, height=64, width=64, steps=1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "negative prompt" in info.value.details()


def bilingual(served) -> None:
    if served.model.family.name != "hunyuandit":
        pytest.skip("this family's tokenizers are English-only")


@pytest.mark.parametrize(
    "prompt, negative, height, width, guidance",
    [
        (ASTRONAUT, "", 64, 64, 5.0),  # CFG against "", square
        (INK_PAINTING, "模糊的照片", 48, 80, 4.0),  # CFG with a Chinese negative, not square
        (ASTRONAUT, "", 80, 48, 1.0),  # no CFG, not square
    ],
)
def test_chinese_prompt_matches_diffusers(served, prompt, negative, height, width, guidance):
    bilingual(served)
    kw = dict(height=height, width=width, steps=3, seed=5, guidance=guidance)
    images = served.generate(prompt=prompt, negative_prompt=negative, **kw)
    ref = served.reference(prompt, negative_prompt=negative, **kw)
    assert images[0].shape == (height, width, 3)
    assert max_diff(images[0], ref[0]) <= TOL
    # The prompt matters: one character less is another image.
    other = served.reference(prompt[:-1], negative_prompt=negative, **kw)
    assert max_diff(images[0], other[0]) > TOL


def test_chinese_prompt_through_the_sdk_and_the_cli(served, tmp_path):
    """Unicode passes through the SDK and the CLI (argv, then gRPC) unchanged."""
    from PIL import Image

    from ditmesh.client import Client

    bilingual(served)
    kw = dict(height=64, width=96, steps=2, seed=9, guidance=5.0)
    ref = served.reference(ASTRONAUT, **kw)[0]
    with Client(served.mesh.address, timeout=120) as client:
        result = client.generate(ASTRONAUT, **kw, output_format="raw")
    assert max_diff(np.asarray(result.images[0].convert("RGB")), ref) <= TOL

    out = tmp_path / "astronaut.png"
    args = ["--height", "64", "--width", "96", "--steps", "2", "--seed", "9"]
    proc = subprocess.run(
        [sys.executable, "-m", "ditmesh.cli", "generate", "--gateway", served.mesh.address]
        + [ASTRONAUT, *args, "--guidance", "5.0", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as image:
        assert max_diff(np.asarray(image.convert("RGB")), ref) <= TOL
