"""HunyuanDiT, CogVideoX, Latte and Mochi-1 through `ditmesh up` itself, as a user starts them.

test_families.py, test_video_mesh.py and test_video_families.py check these families with
the four stages as servers in the test's own process; here each model runs in one
`ditmesh up` child (helpers.UpProcess), so the CLI's flags, the stages' own processes and
their model loading are on the path too. Each model's mesh is a class-scoped fixture of
its test class: it stops before the next model's starts, so one mesh (about 1.8 GB of
processes) is resident at a time, not four. The SDK's `Client` asks; the answer must
equal the plain diffusers pipeline's from the same folder, prompt and seed (float32 CPU,
within 1/255 per pixel). Sizes and step counts are the smallest that still exercise CFG,
a non-square size, a Chinese prompt, each video family's frame rule (CogVideoX 8k+1,
Latte 1 or 16, Mochi 6k+1) and an MP4 read back with PyAV.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from ditmesh.client import Client

from .helpers import UpProcess, max_diff

pytestmark = pytest.mark.slow  # a `ditmesh up` per model, and the pipeline besides

TOL = 1  # uint8 levels, i.e. 1/255


def start_up(folder: str) -> UpProcess:
    """`ditmesh up` on the CPU, one torch thread per stage: on two busy cores, stage
    threads that spin waiting for each other make a step many times slower."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv("HF_HUB_OFFLINE", "1")
        return UpProcess(folder, "--device", "cpu", "--dtype", "float32")


def serve(folder: str) -> Iterator[Client]:
    up = start_up(folder)
    try:
        with Client(up.address, timeout=300) as client:
            client.wait_ready(timeout=120)
            yield client
    finally:
        assert up.stop() == 0, "".join(up.stderr[-50:])


# ------------------------------------------------------------ HunyuanDiT: English and Chinese prompts

# Every character is in the tiny tokenizers' vocabularies (as in test_families.py).
INK_PAINTING = "水墨画风格的山水, 红色的太阳"


@pytest.fixture(scope="module")
def hunyuan_folder(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("hunyuandit", tmp_path_factory.mktemp("hunyuan") / "model", seed=0))


@pytest.fixture(scope="class")
def hunyuan(hunyuan_folder) -> Iterator[Client]:
    yield from serve(hunyuan_folder)


@pytest.fixture(scope="module")
def hunyuan_pipe(hunyuan_folder):
    from diffusers import HunyuanDiTPipeline

    pipe = HunyuanDiTPipeline.from_pretrained(hunyuan_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hunyuan_reference(pipe, prompt, *, negative_prompt, height, width, steps, seed, guidance):
    out = pipe(
        prompt,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        use_resolution_binning=False,  # the mesh makes the size asked for
    )
    return np.asarray(out.images[0].convert("RGB"))


class TestHunyuanDiT:
    """HunyuanDiT behind one `ditmesh up`."""

    @pytest.mark.parametrize(
        "prompt, negative, height, width, guidance",
        [
            ("a red cat on a table", "", 64, 64, 1.0),  # English, no CFG, square
            (INK_PAINTING, "模糊的照片", 48, 80, 4.0),  # Chinese, CFG with a Chinese negative
        ],
        ids=["english", "chinese-cfg-non-square"],
    )
    def test_hunyuandit_image_equals_the_pipelines(
        self, hunyuan, hunyuan_pipe, prompt, negative, height, width, guidance
    ):
        kw = dict(height=height, width=width, steps=2, seed=5, guidance=guidance)
        result = hunyuan.generate(prompt, negative_prompt=negative, output_format="raw", **kw)
        got = np.asarray(result.images[0].convert("RGB"))
        assert got.shape == (height, width, 3)
        want = hunyuan_reference(hunyuan_pipe, prompt, negative_prompt=negative, **kw)
        assert max_diff(got, want) <= TOL
        # The comparison can fail: one character less of the prompt is another image.
        other = hunyuan_reference(hunyuan_pipe, prompt[:-1], negative_prompt=negative, **kw)
        assert max_diff(got, other) > TOL


# ------------------------------------------------------------ CogVideoX: raw frames and MP4

VIDEO_PROMPT = "a red ball bouncing on a wooden floor"
# 9 frames are 3 latent frames of 6x8 latents: small, and the odd latent count that
# CogVideoX 1.0's VAE decodes back to the frame count asked for (as in test_video_mesh.py).
HEIGHT, WIDTH, FRAMES = 48, 64, 9


@pytest.fixture(scope="module")
def cog_folder(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("cogvideox", tmp_path_factory.mktemp("cog") / "model", seed=0))


@pytest.fixture(scope="class")
def cog(cog_folder) -> Iterator[Client]:
    yield from serve(cog_folder)


class TestCogVideoX:
    """CogVideoX behind one `ditmesh up`."""

    def test_cogvideox_raw_frames_equal_the_pipelines(self, cog_folder, cog):
        from diffusers import CogVideoXPipeline

        steps, seed, guidance = 2, 5, 6.0
        result = cog.generate(
            VIDEO_PROMPT,
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            steps=steps,
            guidance=guidance,
            seed=seed,
            output_format="raw",
        )
        video = result.video
        assert (video.num_frames, video.width, video.height, video.format) == (
            FRAMES,
            WIDTH,
            HEIGHT,
            "raw",
        )
        got = np.stack([np.asarray(frame) for frame in video.frames]).astype(np.int16)

        pipe = CogVideoXPipeline.from_pretrained(cog_folder)
        pipe.set_progress_bar_config(disable=True)
        want = pipe(
            VIDEO_PROMPT,
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).frames[0]
        want = np.round(np.asarray(want) * 255).astype(np.int16)
        assert got.shape == want.shape == (FRAMES, HEIGHT, WIDTH, 3)
        per_frame = np.abs(got - want).reshape(FRAMES, -1).max(axis=1)
        assert per_frame.max() <= TOL, per_frame

    def test_cogvideox_mp4_decodes_back_to_the_frames_size_and_fps(self, cog):
        import av

        result = cog.generate(
            VIDEO_PROMPT, height=HEIGHT, width=WIDTH, num_frames=FRAMES, fps=12, steps=1, seed=1
        )
        video = result.video  # MP4 is a video model's default format
        assert (video.format, video.fps, video.num_frames) == ("mp4", 12, FRAMES)
        with av.open(io.BytesIO(video.data)) as container:
            stream = container.streams.video[0]
            frames = list(container.decode(stream))
            assert stream.average_rate == 12
        assert len(frames) == FRAMES
        assert {(f.width, f.height) for f in frames} == {(WIDTH, HEIGHT)}


# ------------------------------------------------------------ Latte and Mochi-1: raw frames and MP4

# 32x48 is 4x6 latents, 2x3 tokens a frame: the smallest non-square size of both families.
SMALL_H, SMALL_W = 32, 48


def video_frames(result, frames: int, height: int, width: int) -> np.ndarray:
    video = result.video
    assert (video.num_frames, video.width, video.height, video.format) == (
        frames,
        width,
        height,
        "raw",
    )
    return np.stack([np.asarray(frame) for frame in video.frames]).astype(np.int16)


def assert_frames_equal(got: np.ndarray, want, frames: int, height: int, width: int) -> None:
    want = np.round(np.asarray(want) * 255).astype(np.int16)
    assert got.shape == want.shape == (frames, height, width, 3)
    per_frame = np.abs(got - want).reshape(frames, -1).max(axis=1)
    assert per_frame.max() <= TOL, per_frame


@pytest.fixture(scope="module")
def latte_folder(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("latte", tmp_path_factory.mktemp("latte") / "model", seed=0))


@pytest.fixture(scope="class")
def latte(latte_folder) -> Iterator[Client]:
    yield from serve(latte_folder)


class TestLatte:
    """Latte behind one `ditmesh up`."""

    @pytest.mark.parametrize(
        "frames, guidance",
        [(16, 4.0), (1, 1.0)],  # Latte-1's whole clip with CFG; a still image, no CFG
        ids=["16-frames-cfg", "1-frame"],
    )
    def test_latte_raw_frames_equal_the_pipelines(self, latte_folder, latte, frames, guidance):
        from diffusers import LattePipeline

        steps, seed = 2, 5
        result = latte.generate(
            VIDEO_PROMPT,
            height=SMALL_H,
            width=SMALL_W,
            num_frames=frames,
            steps=steps,
            guidance=guidance,
            seed=seed,
            output_format="raw",
        )
        got = video_frames(result, frames, SMALL_H, SMALL_W)

        pipe = LattePipeline.from_pretrained(latte_folder)
        pipe.set_progress_bar_config(disable=True)
        want = pipe(
            VIDEO_PROMPT,
            height=SMALL_H,
            width=SMALL_W,
            video_length=frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            clean_caption=False,
            output_type="np",
        ).frames[0]
        assert_frames_equal(got, want, frames, SMALL_H, SMALL_W)


@pytest.fixture(scope="module")
def mochi_folder(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("mochi", tmp_path_factory.mktemp("mochi") / "model", seed=0))


@pytest.fixture(scope="class")
def mochi(mochi_folder) -> Iterator[Client]:
    yield from serve(mochi_folder)


class TestMochi:
    """Mochi-1 behind one `ditmesh up`."""

    def test_mochi_raw_frames_equal_the_pipelines(self, mochi_folder, mochi):
        from diffusers import MochiPipeline

        # 7 frames (6k+1) are 2 latent frames; CFG with a negative prompt.
        frames, steps, seed, guidance, negative = 7, 2, 5, 4.5, "blurry"
        result = mochi.generate(
            VIDEO_PROMPT,
            negative_prompt=negative,
            height=SMALL_H,
            width=SMALL_W,
            num_frames=frames,
            steps=steps,
            guidance=guidance,
            seed=seed,
            output_format="raw",
        )
        got = video_frames(result, frames, SMALL_H, SMALL_W)

        pipe = MochiPipeline.from_pretrained(mochi_folder)
        pipe.set_progress_bar_config(disable=True)
        want = pipe(
            VIDEO_PROMPT,
            negative_prompt=negative,
            height=SMALL_H,
            width=SMALL_W,
            num_frames=frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).frames[0]
        assert_frames_equal(got, want, frames, SMALL_H, SMALL_W)

    def test_mochi_mp4_decodes_back_to_the_frames_size_and_fps(self, mochi):
        import av

        # 2 steps: Mochi's linear-quadratic schedule divides by zero at 1 (the pipeline's too).
        frames = 7
        result = mochi.generate(
            VIDEO_PROMPT, height=SMALL_H, width=SMALL_W, num_frames=frames, fps=10, steps=2, seed=1
        )
        video = result.video  # MP4 is a video model's default format
        assert (video.format, video.fps, video.num_frames) == ("mp4", 10, frames)
        with av.open(io.BytesIO(video.data)) as container:
            stream = container.streams.video[0]
            decoded = list(container.decode(stream))
            assert stream.average_rate == 10
        assert len(decoded) == frames
        assert {(f.width, f.height) for f in decoded} == {(SMALL_W, SMALL_H)}
