"""Latte and Mochi-1 against plain diffusers: tiny models, encoders, denoised latents.

Each family's tiny model (`make_tiny`) loads offline with its diffusers pipeline; the
encoder stage's tensors are the pipeline's own (Latte: before `mask_feature`, which the
adapter applies); and the denoiser adapter, fed the encoder's tensors, gives the latents
the pipeline gives with `output_type="latent"` from the same folder, prompt and seed
(float32 CPU): one video and several, with and without CFG, token counts that divide by
neither 2 nor 4, Mochi's frame counts 6k+1. The whole mesh (frames out) is tested in
`TestThroughTheMesh`. Under the gang layouts: test_parallel_latte.py,
test_parallel_mochi.py.
"""

from __future__ import annotations

import pytest
import torch

from ditmesh.common.errors import InvalidArgument
from ditmesh.common.models import load_class, resolve_model
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.mesh import single_process_mesh
from ditmesh.denoiser.runner import load_adapter
from ditmesh.denoiser.sampler import sample

pytestmark = pytest.mark.slow  # each family's pipeline runs several times

PROMPT = "a red cat on a blue sea, detailed"
REL_TOL = 1e-5


class Family:
    """A tiny model of a family with its pipeline, encoder and adapter (loaded once)."""

    def __init__(self, name: str, root) -> None:
        import diffusers

        from ditmesh.tiny import make_tiny

        self.folder = str(make_tiny(name, root / name, seed=0))
        self.model = resolve_model(self.folder)
        cls = getattr(diffusers, self.model.family.pipeline_classes[0])
        self.pipe = cls.from_pretrained(self.folder)
        self.pipe.set_progress_bar_config(disable=True)
        enc_cls = load_class(self.model.family.text_encoder)
        self.encoder = enc_cls(self.model, torch.device("cpu"), torch.float32)
        self.adapter = load_adapter(self.model, "cpu", "float32")

    def job(self, prompt: str, *, negative: str = "", guidance: float, **kw) -> DenoiseJob:
        cond = dict(self.encoder.encode(prompt))
        if guidance > 1:
            cond.update({"negative_" + k: v for k, v in self.encoder.encode(negative).items()})
        return DenoiseJob(request_id="t", guidance=guidance, true_cfg_scale=1.0, cond=cond, **kw)

    def latents(self, job: DenoiseJob) -> torch.Tensor:
        return sample(self.adapter, job, single_process_mesh())


@pytest.fixture(scope="module")
def latte(tmp_path_factory) -> Family:
    return Family("latte", tmp_path_factory.mktemp("video"))


@pytest.fixture(scope="module")
def mochi(tmp_path_factory) -> Family:
    return Family("mochi", tmp_path_factory.mktemp("video"))


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.detach(), want.detach()
    assert got.shape == want.shape
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))
    assert err <= REL_TOL, f"relative error {err:.2e}"


# ------------------------------------------------------------------ tiny models


@pytest.mark.parametrize("name", ["latte", "mochi"])
def test_make_tiny_loads_offline_with_its_tokenizer(name, latte, mochi):
    fam = latte if name == "latte" else mochi
    assert fam.model.family.name == name and fam.model.video
    ids = fam.pipe.tokenizer(PROMPT).input_ids
    assert fam.pipe.tokenizer.unk_token_id not in ids
    assert fam.model.max_prompt_tokens == (120 if name == "latte" else 256)


def test_tiny_latte_has_latte_1_frames_and_mochi_random_rotary(latte, mochi):
    assert latte.pipe.transformer.config.video_length == latte.model.family.default_num_frames
    # Mochi's learned rotary frequencies start at zero in diffusers; the tiny model draws
    # them, so a position put on the wrong token shows.
    assert mochi.pipe.transformer.pos_frequencies.abs().min() > 0


# ------------------------------------------------------------------ encoders


def test_latte_encoder_is_the_pipelines_before_masking(latte):
    out = latte.encoder.encode(PROMPT)
    embeds, _ = latte.pipe.encode_prompt(
        PROMPT, do_classifier_free_guidance=False, clean_caption=False, mask_feature=False
    )
    assert out["prompt_embeds"].shape[1] == 120
    assert_close(out["prompt_embeds"], embeds)
    real = len(latte.pipe.tokenizer(PROMPT.lower()).input_ids)
    assert out["prompt_attention_mask"].sum() == real
    assert out["prompt_attention_mask"][0, :real].all()


def test_mochi_encoder_is_the_pipelines(mochi):
    for prompt in (PROMPT, ""):
        out = mochi.encoder.encode(prompt)
        embeds, mask, _, _ = mochi.pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        assert_close(out["prompt_embeds"], embeds)
        assert torch.equal(out["prompt_attention_mask"].bool(), mask)
        assert out["prompt_embeds"].shape[1] == 256


# ------------------------------------------------------------------ denoised latents

# (height, width, num_frames, videos, guidance): 48x80 is 3x5 = 15 tokens a frame.
LATTE_CASES = [
    (48, 80, 16, 1, 4.0),  # one video: the pipeline cuts both prompts at the prompt's length
    (32, 48, 16, 2, 3.0),  # several: the prompt's padding zeroed, the negative whole
    (48, 48, 16, 1, 1.0),  # no CFG
    (48, 80, 1, 1, 4.0),  # a still image: no temporal positions
]


@pytest.mark.parametrize("height,width,frames,videos,guidance", LATTE_CASES)
def test_latte_latents_equal_the_pipelines(latte, height, width, frames, videos, guidance):
    job = latte.job(
        PROMPT,
        guidance=guidance,
        height=height,
        width=width,
        num_frames=frames,
        steps=3,
        seed=7,
        num_images=videos,
    )
    want = latte.pipe(
        PROMPT,
        height=height,
        width=width,
        video_length=frames,
        num_inference_steps=3,
        guidance_scale=guidance,
        num_images_per_prompt=videos,
        generator=torch.Generator().manual_seed(7),
        clean_caption=False,
        output_type="latent",
    ).frames
    assert_close(latte.latents(job), want)


def test_latte_refuses_other_frame_counts(latte):
    job = latte.job(
        PROMPT, guidance=1.0, height=48, width=48, num_frames=9, steps=1, seed=0, num_images=1
    )
    with pytest.raises(InvalidArgument, match="exactly 16 frames"):
        latte.latents(job)


# 13 frames are 3 latent frames: 45 tokens of 48x80, divisible by neither 2 nor 4.
MOCHI_CASES = [
    (48, 80, 13, 1, 4.5, "blurry"),
    (32, 48, 7, 2, 3.0, ""),
    (48, 48, 19, 1, 1.0, ""),
]


@pytest.mark.parametrize("height,width,frames,videos,guidance,negative", MOCHI_CASES)
def test_mochi_latents_equal_the_pipelines(
    mochi, height, width, frames, videos, guidance, negative
):
    job = mochi.job(
        PROMPT,
        negative=negative,
        guidance=guidance,
        height=height,
        width=width,
        num_frames=frames,
        steps=3,
        seed=7,
        num_images=videos,
    )
    want = mochi.pipe(
        PROMPT,
        negative_prompt=negative or None,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=3,
        guidance_scale=guidance,
        num_videos_per_prompt=videos,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).frames
    assert_close(mochi.latents(job), want)


# ------------------------------------------------------------------ VAE stage decoders


@pytest.mark.parametrize("name", ["latte", "mochi"])
def test_vae_decoder_frames_equal_the_pipelines(name, latte, mochi):
    """The VAE stage's decoder, given the pipeline's latents, gives its uint8 frames."""
    import numpy as np

    fam = latte if name == "latte" else mochi
    decoder = load_class(fam.model.family.video_decoder)(
        fam.model, torch.device("cpu"), torch.float32
    )
    frames = 16 if name == "latte" else 13
    kw = dict(video_length=frames) if name == "latte" else dict(num_frames=frames)
    common = dict(height=48, width=80, num_inference_steps=2, guidance_scale=1.0)
    latents = fam.pipe(
        PROMPT, generator=torch.Generator().manual_seed(3), output_type="latent", **common, **kw
    ).frames
    want = fam.pipe(
        PROMPT, generator=torch.Generator().manual_seed(3), output_type="np", **common, **kw
    ).frames
    decoder.check_latents(latents, 48, 80, frames)
    got = decoder.decode(latents)
    want = np.round(np.asarray(want) * 255).astype(np.int16)
    assert got.shape == (1, frames, 48, 80, 3)
    assert np.abs(got.astype(np.int16) - want).max() <= 1


# ------------------------------------------------------------------ the whole mesh


class TestThroughTheMesh:
    """Each family's video through the four stages (real gRPC in this process) equals its
    pipeline's frames (within 1/255), raw frames out."""

    @pytest.mark.parametrize(
        "name,frames,guidance", [("latte", 16, 4.0), ("mochi", 13, 4.5), ("mochi", 7, 1.0)]
    )
    def test_video_equals_the_pipelines_frames(self, name, frames, guidance, latte, mochi):
        import grpc
        import numpy as np

        from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc, vae_pb2

        from .helpers import InProcessMesh

        fam = latte if name == "latte" else mochi
        mesh = InProcessMesh(fam.folder)
        try:
            with grpc.insecure_channel(mesh.address) as channel:
                resp = gateway_pb2_grpc.GatewayStub(channel).GenerateUnary(
                    gateway_pb2.GenerateRequest(
                        prompt=PROMPT,
                        height=48,
                        width=80,
                        steps=3,
                        guidance=guidance,
                        seed=11,
                        num_frames=frames,
                        output_format=vae_pb2.OUTPUT_FORMAT_RAW,
                    ),
                    timeout=300,
                )
        finally:
            mesh.stop()
        (video,) = resp.images
        assert video.num_frames == frames
        got = np.frombuffer(video.data, np.uint8).reshape(frames, 48, 80, 3)
        if name == "latte":
            kw = dict(video_length=frames, clean_caption=False)
        else:
            kw = dict(num_frames=frames)
        want = fam.pipe(
            PROMPT,
            height=48,
            width=80,
            num_inference_steps=3,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(11),
            output_type="np",
            **kw,
        ).frames[0]
        want = np.round(np.asarray(want) * 255).astype(np.int16)
        assert np.abs(got.astype(np.int16) - want).max() <= 1

    def test_mp4_reads_back_with_the_frames_size_and_fps(self, mochi):
        import io

        import av
        import grpc

        from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc, vae_pb2

        from .helpers import InProcessMesh

        mesh = InProcessMesh(mochi.folder)
        try:
            with grpc.insecure_channel(mesh.address) as channel:
                resp = gateway_pb2_grpc.GatewayStub(channel).GenerateUnary(
                    gateway_pb2.GenerateRequest(
                        prompt=PROMPT,
                        height=48,
                        width=80,
                        steps=2,
                        seed=1,
                        num_frames=13,
                        fps=12,
                        output_format=vae_pb2.OUTPUT_FORMAT_MP4,
                    ),
                    timeout=300,
                )
        finally:
            mesh.stop()
        (video,) = resp.images
        assert (video.num_frames, video.fps, video.mime_type) == (13, 12, "video/mp4")
        with av.open(io.BytesIO(video.data)) as container:
            stream = container.streams.video[0]
            frames = [f for f in container.decode(stream)]
            assert stream.average_rate == 12
        assert len(frames) == 13
        assert (frames[0].height, frames[0].width) == (48, 80)
