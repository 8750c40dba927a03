"""What a model is, read from its diffusers-format folder or hub id.

Only JSON configs are read here (model_index.json, the VAE and transformer
configs), so the gateway can validate requests without loading any weights;
each stage then loads just its own components (see the stage packages).

A video family (`Family.video`) plugs in here with its frame defaults and limits
(`default_num_frames`, `max_num_frames`, `frame_multiple`: valid counts are
`frame_multiple * k + 1`, what a VAE that compresses time by that factor decodes back;
the VAE config's `temporal_compression_ratio` overrides it), its default height and
width, and its three stage classes: `text_encoder`, `denoiser` and `video_decoder` (the
VAE stage's, see services/vae/video_decoder.py). The gateway then checks and fills in
`num_frames` and `fps`, the denoiser gets `num_frames` in its job, and the VAE stage
encodes the frames as MP4, animated WebP or GIF, or raw frames (services/vae/video.py).

It runs past 350 lines because every family's table entry is here, in one place the
gateway, the stages and the tests all read; the code around them is short.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ditmesh.common.errors import InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class Family:
    """A model family: the defaults its pipelines use and how latents are laid out."""

    name: str
    pipeline_classes: tuple[str, ...]
    default_size: int
    default_steps: int
    default_guidance: float
    latent_patch: int
    """Pixels per token side = vae scale factor * this (Flux packs 2x2 latents)."""
    text_encoder: str
    """"module:Class" of the encoder stage's text encoder for this family."""
    denoiser: str
    """"module:Class" of the denoiser stage's model adapter for this family."""
    max_prompt_tokens_from: str = "tokenizer_2"
    """Subfolder whose tokenizer bounds the prompt length (the T5 one)."""
    max_sequence_length: int = 512
    """The pipeline's default `max_sequence_length`: prompts are cut there, so it caps
    the tokenizer's own limit (SD3's T5 tokenizer allows 512, StableDiffusion3Pipeline
    encodes 256)."""
    cfg_rule: Literal["true_cfg", "guidance"] = "true_cfg"
    """When the pipeline runs classifier-free guidance. "true_cfg" (Flux): only with a
    negative prompt and true_cfg_scale > 1, since guidance is distilled into the
    model. "guidance" (SD3, PixArt, HunyuanDiT): whenever guidance > 1, against the empty prompt
    when no negative prompt is given."""

    video: bool = False
    """Makes videos: requests take `num_frames` and `fps`; the VAE decodes frames."""
    default_height: int = 0
    """The pipeline's default height when it is not `default_size` (CogVideoX: 480)."""
    default_width: int = 0
    """The pipeline's default width when it is not `default_size` (CogVideoX: 720)."""
    default_num_frames: int = 0
    """Video: the pipeline's default frame count."""
    max_num_frames: int = 0
    """Video: the most frames the model was trained for (its positions cover no more)."""
    frame_multiple: int = 1
    """Video: valid frame counts are `frame_multiple * k + 1` (the VAE's temporal
    compression); a VAE config's `temporal_compression_ratio` overrides it."""
    default_fps: int = 0
    """Video: the frame rate the model's clips are made for."""
    frame_step: int = 0
    """Video: the step between valid frame counts when it is not `frame_multiple`.
    CogVideoX 1.0's VAE returns the count asked for only from an odd number of latent
    frames (1, 3, 5 -> 1, 9, 17 frames; 2 and 4 give 8 and 16), so its counts are 8k+1."""
    min_steps: int = 1
    """The fewest steps the family's schedule is defined for (Mochi's linear-quadratic
    sigmas divide by steps - 1)."""
    exact_frames: bool = False
    """Video: only 1 frame or exactly `max_num_frames` (Latte's temporal positions are a
    fixed table of its `video_length`)."""
    video_decoder: str = ""
    """Video: "module:Class" of the VAE stage's decoder for this family."""

    @property
    def default_hw(self) -> tuple[int, int]:
        """(height, width) the pipeline uses when none is asked for."""
        return (self.default_height or self.default_size, self.default_width or self.default_size)

    def uses_cfg(self, *, guidance: float, true_cfg_scale: float, has_negative: bool) -> bool:
        """Whether a request runs a conditional and an unconditional branch.

        The gateway asks for the negative encoding by this rule and the denoiser
        adapters run CFG by it, so the two cannot disagree.
        """
        if self.cfg_rule == "guidance":
            return guidance > 1.0
        return true_cfg_scale > 1.0 and has_negative


def load_class(path: str):
    """Imports "module:Class" lazily: each family pulls in only its own diffusers classes."""
    import importlib

    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)


FLUX = Family(
    name="flux",
    pipeline_classes=("FluxPipeline",),
    default_size=1024,
    default_steps=28,
    default_guidance=3.5,
    latent_patch=2,
    text_encoder="ditmesh.encoder.flux:FluxTextEncoder",
    denoiser="ditmesh.denoiser.flux:FluxAdapter",
)

SD3 = Family(
    name="sd3",
    pipeline_classes=("StableDiffusion3Pipeline",),
    default_size=1024,
    default_steps=28,
    default_guidance=7.0,
    latent_patch=2,
    text_encoder="ditmesh.encoder.sd3:SD3TextEncoder",
    denoiser="ditmesh.denoiser.sd3:SD3Adapter",
    max_prompt_tokens_from="tokenizer_3",
    max_sequence_length=256,
    cfg_rule="guidance",
)

PIXART_SIGMA = Family(
    name="pixart-sigma",
    pipeline_classes=("PixArtSigmaPipeline",),
    default_size=1024,
    default_steps=20,
    default_guidance=4.5,
    latent_patch=2,
    text_encoder="ditmesh.encoder.pixart:PixArtTextEncoder",
    denoiser="ditmesh.denoiser.pixart:PixArtAdapter",
    max_prompt_tokens_from="tokenizer",
    max_sequence_length=300,
    cfg_rule="guidance",
)

PIXART_ALPHA = Family(
    name="pixart-alpha",
    pipeline_classes=("PixArtAlphaPipeline",),
    default_size=1024,
    default_steps=20,
    default_guidance=4.5,
    latent_patch=2,
    text_encoder="ditmesh.encoder.pixart:PixArtTextEncoder",
    denoiser="ditmesh.denoiser.pixart:PixArtAdapter",
    max_prompt_tokens_from="tokenizer",
    max_sequence_length=120,
    cfg_rule="guidance",
)

# Two text encoders: a bilingual CLIP-style BERT (77 tokens, cut silently as CLIP is)
# and mT5 (256 tokens), which bounds the prompt.
HUNYUAN_DIT = Family(
    name="hunyuandit",
    pipeline_classes=("HunyuanDiTPipeline",),
    default_size=1024,
    default_steps=50,
    default_guidance=5.0,
    latent_patch=2,
    text_encoder="ditmesh.encoder.hunyuan:HunyuanTextEncoder",
    denoiser="ditmesh.denoiser.hunyuan:HunyuanDiTAdapter",
    max_prompt_tokens_from="tokenizer_2",
    max_sequence_length=256,
    cfg_rule="guidance",
)

# CogVideoX 1.0 (2B and 5B; 1.5's temporal patches are not served): T5 padded to 226
# tokens, 49 frames of 480x720 at 8 fps, a VAE that compresses time by 4.
COGVIDEOX = Family(
    name="cogvideox",
    pipeline_classes=("CogVideoXPipeline",),
    default_size=480,
    default_height=480,
    default_width=720,
    default_steps=50,
    default_guidance=6.0,
    latent_patch=2,
    text_encoder="ditmesh.encoder.cogvideox:CogVideoXTextEncoder",
    denoiser="ditmesh.denoiser.cogvideox:CogVideoXAdapter",
    max_prompt_tokens_from="tokenizer",
    max_sequence_length=226,
    cfg_rule="guidance",
    video=True,
    default_num_frames=49,
    max_num_frames=49,
    frame_multiple=4,
    frame_step=8,
    default_fps=8,
    video_decoder="ditmesh.vae.video_decoder:CogVideoXDecoder",
)

# Latte-1: T5 cut at 120 tokens (LattePipeline fixes it) and masked by cutting the
# embeddings at the prompt's length; exactly 16 frames (its temporal positions), 512 px,
# a 2-D VAE (no temporal compression) decoding frame by frame.
LATTE = Family(
    name="latte",
    pipeline_classes=("LattePipeline",),
    default_size=512,
    default_steps=50,
    default_guidance=7.5,
    latent_patch=2,
    text_encoder="ditmesh.encoder.latte:LatteTextEncoder",
    denoiser="ditmesh.denoiser.latte:LatteAdapter",
    max_prompt_tokens_from="tokenizer",
    max_sequence_length=120,
    cfg_rule="guidance",
    video=True,
    default_num_frames=16,
    max_num_frames=16,
    frame_multiple=1,
    default_fps=8,
    exact_frames=True,
    video_decoder="ditmesh.vae.latte_mochi:LatteDecoder",
)

# Mochi-1: T5 (256 tokens) with its mask into joint attention over all frames, 19 frames
# of 480x848 by default (up to 163, 5.4 s at 30 fps), a causal VAE that compresses time by 6.
MOCHI = Family(
    name="mochi",
    pipeline_classes=("MochiPipeline",),
    default_size=480,
    default_height=480,
    default_width=848,
    default_steps=64,
    min_steps=2,
    default_guidance=4.5,
    latent_patch=2,
    text_encoder="ditmesh.encoder.mochi:MochiTextEncoder",
    denoiser="ditmesh.denoiser.mochi:MochiAdapter",
    max_prompt_tokens_from="tokenizer",
    max_sequence_length=256,
    cfg_rule="guidance",
    video=True,
    default_num_frames=19,
    max_num_frames=163,
    frame_multiple=6,
    default_fps=30,
    video_decoder="ditmesh.vae.latte_mochi:MochiDecoder",
)

FAMILIES: dict[str, Family] = {
    f.name: f for f in (FLUX, SD3, PIXART_SIGMA, PIXART_ALPHA, HUNYUAN_DIT, COGVIDEOX, LATTE, MOCHI)
}


def family_of_pipeline(class_name: str) -> Family:
    for fam in FAMILIES.values():
        if class_name in fam.pipeline_classes:
            return fam
    known = sorted(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise InvalidArgument(f"pipeline class {class_name!r} is not supported; supported: {known}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelRef:
    """A model as the mesh knows it: where it is, what it is, its limits."""

    source: str
    """Diffusers-format folder or hub id, as given."""
    name: str
    """Name clients use to ask for it."""
    family: Family
    vae_scale_factor: int
    latent_channels: int
    guidance_embeds: bool
    """Flux dev: guidance is an input of the transformer (distilled), not CFG."""
    max_prompt_tokens: int
    heads: int = 0
    """Attention heads of the transformer (what Ulysses splits)."""
    blocks: int = 0
    """Transformer blocks (Flux: double- and single-stream; what PipeFusion splits)."""
    frame_multiple: int = 0
    """Video: valid frame counts are `frame_multiple * k + 1` (0 for image models)."""

    @property
    def video(self) -> bool:
        return self.family.video

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.family.latent_patch

    @property
    def default_steps(self) -> int:
        # FLUX.1-schnell (no guidance embedding) is distilled for few steps.
        if self.family is FLUX and not self.guidance_embeds:
            return 4
        return self.family.default_steps

    @property
    def default_guidance(self) -> float:
        if self.family is FLUX and not self.guidance_embeds:
            return 0.0
        return self.family.default_guidance


def check_model_name(requested: str, model: ModelRef) -> None:
    """Empty means the served model; anything else must be its name."""
    if requested and requested != model.name:
        raise InvalidArgument(f"unknown model {requested!r}; this mesh serves {model.name!r}")


def default_name(source: str) -> str:
    path = Path(source)
    if path.exists():
        return path.resolve().name
    return source.rstrip("/").split("/")[-1]


def _load_json_config(source: str, subfolder: str | None) -> dict:
    from diffusers import ConfigMixin

    class _Reader(ConfigMixin):
        config_name = "config.json"

    kwargs = {"subfolder": subfolder} if subfolder else {}
    return dict(_Reader.load_config(source, **kwargs))


def resolve_model(source: str, name: str | None = None) -> ModelRef:
    """Reads a model's configs; raises InvalidArgument with a sentence if it is not one."""
    from diffusers import DiffusionPipeline

    try:
        index = dict(DiffusionPipeline.load_config(source))
    except Exception as exc:  # noqa: BLE001 - any loader failure means "not a model here"
        raise InvalidArgument(
            f"{source!r} is not a diffusers-format model folder or a reachable hub id "
            f"(no model_index.json): {exc.__class__.__name__}"
        ) from exc
    family = family_of_pipeline(str(index.get("_class_name", "")))
    vae_cfg = _load_json_config(source, "vae")
    tr_cfg = _load_json_config(source, "transformer")
    block_out = vae_cfg.get("block_out_channels") or [0] * 4
    vae_scale_factor = 2 ** (len(block_out) - 1)
    max_tokens = family.max_sequence_length
    try:
        tok_cfg = _load_tokenizer_config(source, family.max_prompt_tokens_from)
        max_tokens = min(int(tok_cfg.get("model_max_length", max_tokens)), max_tokens)
    except Exception:  # noqa: BLE001 - absent tokenizer config: keep the family limit
        log.debug("no %s config in %s", family.max_prompt_tokens_from, source)
    return ModelRef(
        source=source,
        name=name or default_name(source),
        family=family,
        vae_scale_factor=vae_scale_factor,
        latent_channels=int(vae_cfg.get("latent_channels", 16)),
        # Only Flux's transformer takes guidance as an input; elsewhere it means CFG.
        guidance_embeds=family is FLUX and bool(tr_cfg.get("guidance_embeds", False)),
        max_prompt_tokens=max_tokens,
        heads=int(tr_cfg.get("num_attention_heads", 0)),
        blocks=int(tr_cfg.get("num_layers", 0)) + int(tr_cfg.get("num_single_layers", 0)),
        frame_multiple=(
            int(vae_cfg.get("temporal_compression_ratio", family.frame_multiple))
            if family.video
            else 0
        ),
    )


def _load_tokenizer_config(source: str, subfolder: str) -> dict:
    import json

    path = Path(source) / subfolder / "tokenizer_config.json"
    if path.exists():
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(
        Path(hf_hub_download(source, "tokenizer_config.json", subfolder=subfolder)).read_text()
    )


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs (what the models are trained in), float32 on CPU (exactness)."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if requested not in table:
        raise ValueError(f"--dtype must be one of auto, {', '.join(table)}; got {requested!r}")
    return table[requested]


def offline_default() -> None:
    """Local folders need no hub; don't let a missing network stall loading."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


MAX_FPS = 120


def valid_frame_counts(model: ModelRef) -> Sequence[int]:
    """Every frame count a video model takes: `frame_multiple * k + 1` up to its maximum
    (1 or the maximum for a family with `exact_frames`)."""
    if model.family.exact_frames:
        return (1, model.family.max_num_frames)
    m = model.family.frame_step or model.frame_multiple or 1
    return range(1, model.family.max_num_frames + 1, m)


def check_num_frames(model: ModelRef, n: int) -> None:
    """Refuses a frame count the model cannot make, naming the nearest ones it can."""
    if not model.video:
        if n:
            raise InvalidArgument(
                f"model {model.name!r} makes images; num_frames is for video models (got {n})"
            )
        return
    valid = valid_frame_counts(model)
    if n in valid:
        return
    below = [v for v in valid if v < n][-1:]
    above = [v for v in valid if v > n][:1]
    nearest = " or ".join(str(v) for v in below + above)
    if model.family.exact_frames:
        what = f"1 frame or exactly {model.family.max_num_frames}"
    else:
        step = model.family.frame_step or model.frame_multiple
        what = f"{step}k+1 frames, 1 to {model.family.max_num_frames}"
    raise InvalidArgument(
        f"model {model.name!r} makes videos of {what}; {n} is not one: the nearest are {nearest}"
    )


def check_fps(model: ModelRef, fps: int) -> None:
    if not model.video:
        if fps:
            raise InvalidArgument(
                f"model {model.name!r} makes images; fps is for video models (got {fps})"
            )
        return
    if not 1 <= fps <= MAX_FPS:
        raise InvalidArgument(f"fps must be between 1 and {MAX_FPS}; got {fps}")
