"""The client SDK and `ditmesh generate` against the REAL mesh (`ditmesh up`).

test_client_sdk.py checks the client's side of the contract against a scripted
peer; here the peer is the whole mesh on a tiny random-weight Flux, and every
image must be the one plain diffusers.FluxPipeline makes from the same folder,
prompt and seed (float32 on CPU, max abs pixel difference <= 1/255).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditmesh.client import (
    AsyncClient,
    Client,
    GenerateResult,
    InvalidArgumentError,
    NotFoundError,
    Progress,
)

pytestmark = pytest.mark.slow  # every test runs against `ditmesh up`

TOL = 1  # uint8 levels, i.e. 1/255

# One request most tests share; 64x96 so height and width cannot be swapped unnoticed.
BASE = dict(height=64, width=96, steps=3, seed=7, guidance=3.5)
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def client(up_mesh):
    with Client(up_mesh.address, timeout=120) as c:
        c.wait_ready(timeout=60)
        yield c


@pytest.fixture(scope="module")
def pipe(tiny_flux):
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(tiny_flux)
    p.set_progress_bar_config(disable=True)
    return p


def reference(pipe, prompt, *, height, width, steps, seed, guidance=3.5, **kw) -> list[np.ndarray]:
    out = pipe(
        prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    return [np.asarray(im.convert("RGB")) for im in out.images]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def streamed(client) -> tuple[GenerateResult, list[Progress]]:
    """The shared request through Client.generate, with the progress it reported."""
    events: list[Progress] = []
    result = client.generate(PROMPT, **BASE, on_progress=events.append)
    return result, events


def test_generate_matches_diffusers_and_reports_progress(streamed, pipe, tmp_path):
    result, events = streamed
    assert len(result.images) == 1
    image = result.images[0]
    assert isinstance(image, Image.Image)
    assert image.size == (BASE["width"], BASE["height"])
    ref = reference(pipe, PROMPT, **BASE)
    assert max_diff(pixels(image), ref[0]) <= TOL

    n = BASE["steps"]
    assert [e.kind for e in events] == ["queued", "encoded", *["step"] * n, "decoded"]
    assert [(e.step, e.total) for e in events if e.kind == "step"] == [
        (i, n) for i in range(1, n + 1)
    ]
    assert result.seed == BASE["seed"]
    assert result.formats == ["png"] and result.mime_types == ["image/png"]
    assert result.timings.total > 0

    paths = result.save(tmp_path / "x.png")
    assert paths == [tmp_path / "x.png"]
    with Image.open(paths[0]) as saved:
        assert saved.format == "PNG"
        assert max_diff(pixels(saved), pixels(image)) == 0


def test_two_raw_images_match_diffusers(client, pipe):
    kw = dict(height=64, width=64, steps=2, seed=3, guidance=2.0)
    result = client.generate("a lighthouse", **kw, num_images=2, output_format="raw")
    assert len(result.images) == 2
    assert result.formats == ["raw", "raw"]
    ref = reference(pipe, "a lighthouse", **kw, num_images_per_prompt=2)
    for got, want in zip(result.images, ref, strict=True):
        assert got.size == (64, 64)
        assert max_diff(pixels(got), want) <= TOL
    assert max_diff(pixels(result.images[0]), pixels(result.images[1])) > TOL


def test_generate_unary_gives_the_same_pixels(client, streamed):
    result = client.generate_unary(PROMPT, **BASE)
    assert result.seed == BASE["seed"]
    assert len(result.images) == 1
    assert max_diff(pixels(result.images[0]), pixels(streamed[0].images[0])) == 0


def test_async_client_gives_the_same_pixels(up_mesh, streamed):
    events: list[Progress] = []

    async def main() -> GenerateResult:
        async with AsyncClient(up_mesh.address, timeout=120) as ac:
            await ac.wait_ready(timeout=30)
            return await ac.generate(PROMPT, **BASE, on_progress=events.append)

    result = asyncio.run(main())
    assert result.seed == BASE["seed"]
    assert max_diff(pixels(result.images[0]), pixels(streamed[0].images[0])) == 0
    assert [e.kind for e in events][-1] == "decoded"


def test_size_not_a_multiple_of_16_is_invalid_argument(client):
    with pytest.raises(InvalidArgumentError) as info:
        client.generate("a prompt", height=65, width=64, steps=2, seed=1)
    assert "multiple of 16" in info.value.details
    assert info.value.code.name == "INVALID_ARGUMENT"


def test_unknown_model_is_not_found(client):
    # The gateway answers NOT_FOUND for a model it does not serve (it was INVALID_ARGUMENT).
    with pytest.raises(NotFoundError) as info:
        client.generate("a prompt", height=64, width=64, steps=2, seed=1, model="nope")
    assert "nope" in info.value.details
    assert info.value.code.name == "NOT_FOUND"


def test_list_models_and_wait_ready(client, tiny_flux):
    client.wait_ready(timeout=5)
    models = client.list_models()
    names = [m.name for m in models.models]
    assert models.default_model in names
    assert Path(tiny_flux).name in names
    info = models.models[names.index(models.default_model)]
    assert info.family == "flux"
    assert info.size_multiple == 16
    assert info.default_height > 0 and info.default_width > 0 and info.default_steps > 0


def _cli(addr: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ditmesh.cli", "generate", "--gateway", addr, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_generate_writes_the_image(up_mesh, tmp_path):
    out = tmp_path / "out.png"
    proc = _cli(
        up_mesh.address,
        *("a prompt", "--height", "64", "--width", "64", "--steps", "2", "--seed", "1"),
        *("-o", str(out)),
    )
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    with Image.open(out) as image:
        assert image.size == (64, 64)
    assert "seed: 1" in proc.stdout
    assert str(out) in proc.stdout


def test_cli_bad_size_exits_2_without_traceback(up_mesh, tmp_path):
    out = tmp_path / "out.png"
    proc = _cli(
        up_mesh.address,
        *("a prompt", "--height", "65", "--width", "64", "--steps", "2", "--seed", "1"),
        *("-o", str(out)),
    )
    assert proc.returncode == 2, proc.stderr
    assert "INVALID_ARGUMENT" in proc.stderr
    assert "multiple of 16" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_unknown_model_exits_2_without_traceback(up_mesh, tmp_path):
    out = tmp_path / "out.png"
    proc = _cli(up_mesh.address, "a prompt", "--model", "nope", "-o", str(out))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: NOT_FOUND: unknown model 'nope'")
    assert "Traceback" not in proc.stderr and not out.exists()


def test_sdk_checks_reach_the_cli_before_the_mesh(up_mesh, tmp_path):
    proc = _cli(up_mesh.address, "a prompt", "--seed", "-1", "-o", str(tmp_path / "x.png"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "error: INVALID_ARGUMENT: seed must be between 0 and 2**63-1, "
        "as the gateway requires; got -1"
    )
