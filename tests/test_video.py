"""The video path's parts (issue 18): the gateway's frame rules, the VAE stage's CogVideoX
decoder against CogVideoXPipeline's own decode, and the containers read back with PyAV
and Pillow. (The mesh end to end needs the gateway's plumbing of num_frames; see the
report of helper V1.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from ditmesh.common.errors import InvalidArgument
from ditmesh.common.limits import DEFAULT_LIMITS
from ditmesh.common.models import resolve_model
from ditmesh.v1 import gateway_pb2, vae_pb2


@pytest.fixture(scope="module")
def cog_dir(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("cogvideox", tmp_path_factory.mktemp("cog") / "model"))


def _plan(model_dir, **kw):
    from ditmesh.gateway.plan import make_plan

    m = resolve_model(model_dir)
    req = gateway_pb2.GenerateRequest(prompt="a red ball", **kw)
    return make_plan(req, {m.name: m}, m.name, DEFAULT_LIMITS)


def test_plan_fills_in_video_defaults(cog_dir):
    p = _plan(cog_dir)
    assert (p.height, p.width, p.num_frames, p.fps) == (480, 720, 49, 8)
    assert p.output_format == vae_pb2.OUTPUT_FORMAT_MP4
    # 13 latent frames of 30x45 tokens, both CFG branches, 50 steps.
    assert p.work_units("denoiser") == pytest.approx(50 * 2 * 13 * 30 * 45 / 4096)


def test_plan_refuses_frame_counts_with_the_nearest_valid(cog_dir):
    # 8k+1: CogVideoX 1.0's VAE gives 8 frames from 2 latent frames, not 5 (models.py).
    with pytest.raises(InvalidArgument, match="8k\\+1 frames.*the nearest are 9 or 17"):
        _plan(cog_dir, num_frames=11)
    with pytest.raises(InvalidArgument, match="the nearest are 9 or 17"):
        _plan(cog_dir, num_frames=13)
    with pytest.raises(InvalidArgument, match="the nearest are 49$"):
        _plan(cog_dir, num_frames=50)
    with pytest.raises(InvalidArgument, match="not PNG|OUTPUT_FORMAT_PNG"):
        _plan(cog_dir, output_format=vae_pb2.OUTPUT_FORMAT_PNG)
    with pytest.raises(InvalidArgument, match="fps"):
        _plan(cog_dir, fps=1000)
    assert _plan(cog_dir, num_frames=17, fps=24).num_frames == 17


def test_image_models_refuse_video_fields(tmp_path):
    from ditmesh.tiny import make_tiny

    folder = make_tiny("pixart-sigma", tmp_path / "pixart")
    with pytest.raises(InvalidArgument, match="num_frames is for video models"):
        _plan(folder, num_frames=9)
    with pytest.raises(InvalidArgument, match="for video models"):
        _plan(folder, output_format=vae_pb2.OUTPUT_FORMAT_MP4)
    assert _plan(folder).num_frames == 0


def test_decoder_frames_equal_the_pipelines(cog_dir):
    from diffusers import CogVideoXPipeline

    from ditmesh.vae.video_decoder import CogVideoXDecoder

    m = resolve_model(cog_dir)
    dec = CogVideoXDecoder(m, torch.device("cpu"), torch.float32)
    latents = torch.randn(2, 3, 16, 6, 8, generator=torch.Generator().manual_seed(0))
    dec.check_latents(latents, 48, 64, 9)
    with pytest.raises(InvalidArgument, match="do not fit"):
        dec.check_latents(latents, 48, 64, 13)
    got = dec.decode(latents)
    pipe = CogVideoXPipeline.from_pretrained(cog_dir)
    with torch.inference_mode():
        want = pipe.video_processor.postprocess_video(
            pipe.decode_latents(latents), output_type="np"
        )
    assert got.shape == (2, 9, 48, 64, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(np.float64) / 255 - want).max() <= 1 / 255


def test_containers_read_back():
    import av
    from PIL import Image

    from ditmesh.vae.video import encode_video

    frames = (np.random.default_rng(0).random((9, 48, 64, 3)) * 255).astype(np.uint8)
    mp4 = encode_video(frames, vae_pb2.OUTPUT_FORMAT_MP4, 8)
    with av.open(io.BytesIO(mp4)) as c:
        stream = c.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        assert stream.average_rate == 8 and stream.codec_context.name == "h264"
    assert len(decoded) == 9 and decoded[0].shape == (48, 64, 3)
    for fmt, name in ((vae_pb2.OUTPUT_FORMAT_WEBP, "WEBP"), (vae_pb2.OUTPUT_FORMAT_GIF, "GIF")):
        im = Image.open(io.BytesIO(encode_video(frames, fmt, 8)))
        assert (im.format, im.n_frames, im.size) == (name, 9, (64, 48))
    raw = encode_video(frames, vae_pb2.OUTPUT_FORMAT_RAW, 8)
    assert np.array_equal(np.frombuffer(raw, np.uint8).reshape(frames.shape), frames)


@pytest.mark.parametrize(("frames", "quality"), [(49, 90), (60, 90), (5, 100)])
def test_mp4_longer_than_the_encoders_look_ahead_or_lossless(frames, quality):
    """Packets leave x264 before the last frame goes in once a clip is longer than its
    look-ahead (CogVideoX's default 49 frames), or at once when lossless: the muxer then
    writes its header and changes the stream's time base, which the next frames were
    stamped with (the muxer refused them: "non monotonically increasing dts")."""
    import av

    from ditmesh.vae.video import encode_video

    pixels = (np.random.default_rng(0).random((frames, 16, 32, 3)) * 255).astype(np.uint8)
    mp4 = encode_video(pixels, vae_pb2.OUTPUT_FORMAT_MP4, 8, quality)
    with av.open(io.BytesIO(mp4)) as c:
        stream = c.streams.video[0]
        decoded = list(c.decode(stream))
        assert stream.average_rate == 8
    assert len(decoded) == frames
    assert [f.time for f in decoded] == pytest.approx([i / 8 for i in range(frames)])


def test_latte_takes_one_frame_or_its_whole_length(tmp_path):
    """Latte's temporal positions are a fixed table: the gateway refuses other counts
    (before, they passed the gateway and were refused by the denoiser)."""
    from ditmesh.tiny import make_tiny

    latte = str(make_tiny("latte", tmp_path / "latte"))
    with pytest.raises(
        InvalidArgument, match=r"1 frame or exactly 16; 8 is not one: the nearest are 1 or 16"
    ):
        _plan(latte, num_frames=8)
    assert _plan(latte, num_frames=1).num_frames == 1
    assert _plan(latte, num_frames=16).num_frames == 16


def test_warmup_job_of_a_video_model_has_its_frames(cog_dir):
    """The GPU warm-up (compile, CUDA graphs) runs a video model's default clip."""
    from ditmesh.denoiser.runner import load_adapter, warmup_job

    model = resolve_model(cog_dir)
    adapter = load_adapter(model, torch.device("cpu"), "float32")
    job = warmup_job(adapter, model, cfg=False)
    assert (job.height, job.width, job.num_frames) == (480, 720, 49)


def test_mochi_refuses_one_step_at_the_gateway_and_in_the_adapter(tmp_path):
    """Mochi's linear-quadratic sigmas divide by steps - 1: one step was an internal error
    in the denoiser; the gateway refuses it, and so does the adapter on its own."""
    from ditmesh.denoiser.runner import load_adapter, warmup_job
    from ditmesh.tiny import make_tiny

    folder = str(make_tiny("mochi", tmp_path / "mochi"))
    with pytest.raises(InvalidArgument, match="needs at least 2 steps; got 1"):
        _plan(folder, steps=1, num_frames=7, height=32, width=48)
    assert _plan(folder, steps=2, num_frames=7, height=32, width=48).steps == 2
    model = resolve_model(folder)
    adapter = load_adapter(model, "cpu", "float32")
    job = warmup_job(adapter, model, cfg=False, steps=1, size=(32, 48))
    with pytest.raises(InvalidArgument, match="needs at least 2 steps"):
        adapter.prepare(job)
