"""A tiny CogVideoX video through the whole mesh, asked for with the SDK (issue 18).

The four stages run as real gRPC servers in this process (helpers.InProcessMesh) on the
tiny 5B-layout model; the SDK's `Client` asks for the video. Raw frames equal
`CogVideoXPipeline`'s from the same folder, prompt and seed (float32 CPU, within 1/255
per frame); the MP4 decodes back with PyAV to the frame count, size and rate asked for;
progress events come as for images; and the gateway refuses what the model cannot make
(a frame count, with the nearest valid ones; a still-image format; an fps) before any
stage works. Latte and Mochi-1 go through the mesh in test_video_families.py.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from ditmesh.client import Client, InvalidArgumentError

from .helpers import InProcessMesh

pytestmark = pytest.mark.slow  # a whole mesh, and the pipeline besides

PROMPT = "a red ball bouncing on a wooden floor"
# 9 frames are 3 latent frames of 6x8 latents (3x4 tokens each): small, and an odd latent
# count, which CogVideoX 1.0's VAE decodes to 4k+1 frames.
HEIGHT, WIDTH, FRAMES, STEPS, SEED = 48, 64, 9, 2, 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("cogvideox", tmp_path_factory.mktemp("cog") / "model", seed=0))


@pytest.fixture(scope="module")
def client(folder) -> Iterator[Client]:
    mesh = InProcessMesh(folder)
    try:
        with Client(mesh.address, timeout=300) as c:
            yield c
    finally:
        mesh.stop()


def test_raw_frames_equal_the_pipelines(folder, client):
    from diffusers import CogVideoXPipeline

    kinds: list[str] = []
    result = client.generate(
        PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        steps=STEPS,
        guidance=6.0,
        seed=SEED,
        output_format="raw",
        on_progress=lambda p: kinds.append(p.kind),
    )
    # The VAE's frame progress comes between the last step and decoded.
    assert [k for k in kinds if k != "frames"][-STEPS - 1 :] == ["step"] * STEPS + ["decoded"]
    assert kinds[-2] == "frames"
    assert "encoded" in kinds and result.images == []
    video = result.video
    assert (video.num_frames, video.width, video.height, video.format) == (
        FRAMES,
        WIDTH,
        HEIGHT,
        "raw",
    )
    got = np.stack([np.asarray(frame) for frame in video.frames])

    pipe = CogVideoXPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(
        PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
    ).frames[0]
    want = np.round(np.asarray(want) * 255).astype(np.int16)
    assert got.shape == want.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert np.abs(got.astype(np.int16) - want).max() <= 1


def test_mp4_decodes_back_to_the_frames_size_and_fps(client, tmp_path):
    import av

    result = client.generate(
        PROMPT, height=HEIGHT, width=WIDTH, num_frames=FRAMES, fps=12, steps=1, seed=1
    )
    video = result.video  # MP4 is a video model's default format
    assert (video.format, video.mime_type, video.fps, video.num_frames) == (
        "mp4",
        "video/mp4",
        12,
        FRAMES,
    )
    with av.open(io.BytesIO(video.data)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert stream.average_rate == 12 and stream.codec_context.name == "h264"
    assert len(frames) == FRAMES
    assert (frames[0].width, frames[0].height) == (WIDTH, HEIGHT)
    assert len(video.frames) == FRAMES  # the SDK's own decode agrees
    path = result.save(tmp_path / "clip.mp4")[0]
    assert path.read_bytes() == video.data


def test_the_gateway_refuses_what_the_model_cannot_make(client):
    with pytest.raises(InvalidArgumentError) as info:
        client.generate(PROMPT, num_frames=50)
    assert info.value.details.endswith("50 is not one: the nearest are 49")
    with pytest.raises(InvalidArgumentError, match=r"11 is not one: the nearest are 9 or \d+"):
        client.generate(PROMPT, num_frames=11, height=HEIGHT, width=WIDTH)
    with pytest.raises(InvalidArgumentError, match="makes videos: ask for MP4"):
        client.generate(PROMPT, output_format="png")
    with pytest.raises(InvalidArgumentError, match="fps"):
        client.generate(PROMPT, fps=1000)


@pytest.mark.parametrize("name", ["cogvideox", "mochi"])
def test_the_vae_warms_up_on_a_short_clip(name, folder, tmp_path, caplog):
    """warm_vae on a video model decodes and MP4-encodes the shortest clip of more than
    one frame at the family's default size, through the stage's own servicer. (The
    family's default size is made small here: 480x720 on a CPU takes half a minute.)"""
    import dataclasses
    import logging

    from ditmesh.common.models import load_class, resolve_model
    from ditmesh.common.warmup import warm_vae, warmup_num_frames
    from ditmesh.tiny import make_tiny
    from ditmesh.vae.service import VaeService

    source = folder if name == "cogvideox" else str(make_tiny(name, tmp_path / name, seed=0))
    model = resolve_model(source)
    small = dataclasses.replace(model.family, default_height=HEIGHT, default_width=WIDTH)
    model = dataclasses.replace(model, family=small)
    decoder = load_class(model.family.video_decoder)(model, torch.device("cpu"), torch.float32)
    service = VaeService(decoder)
    frames = warmup_num_frames(model)
    assert frames > 1
    with caplog.at_level(logging.INFO, logger="ditmesh.common.warmup"):
        warm_vae(service, model)
    (record,) = [r for r in caplog.records if r.name == "ditmesh.common.warmup"]
    assert f"VAE warm at {HEIGHT}x{WIDTH}, {frames} frames" in record.getMessage()
    service.thread.close()
