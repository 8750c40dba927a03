"""The small FLUX-architecture model of issue 19, built untrained: ditmesh's own
text-to-image model of `ditmesh.shapes` pictures.

Every component is the class a real FLUX.1 folder holds (CLIP and T5 text towers,
`FluxTransformer2DModel`, a 16-channel `AutoencoderKL` with 8x downsampling,
`FlowMatchEulerDiscreteScheduler` with dynamic shifting), so `FluxPipeline.from_pretrained`
and every ditmesh stage load the trained folder like any Flux model. Only the sizes are
small, and the tokenizers are built offline over `ditmesh.shapes.VOCAB` so that every
caption word (and the comma) is one token in both of them.

Left to others: training and the numbers it fills in (tools/train_shapes.py writes the
VAE's `scaling_factor` / `shift_factor` from its latents), the pictures (ditmesh.shapes),
generic tiny text towers (ditmesh.tiny_text, reused here).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import string
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ditmesh import shapes
from ditmesh.tiny_text import clip_encoder, t5_encoder


@dataclass(kw_only=True, slots=True, frozen=True)
class ShapesModelConfig:
    """Sizes of the model; the defaults are the committed model's (~7.8M transformer
    parameters, under 20 MB in float16 with the VAE and text towers)."""

    size: int = 128
    """Pixels per side the model is trained at (16x16 latents, 64 image tokens)."""
    heads: int = 4
    """Attention heads; 4 lets Ulysses split them 2 or 4 ways."""
    head_dim: int = 64
    double_blocks: int = 2
    """Double-stream (text and image apart) blocks, `num_layers` in the config."""
    single_blocks: int = 3
    """Single-stream blocks, `num_single_layers`."""
    guidance_embeds: bool = True
    """FLUX.1-dev's layout, so ditmesh's defaults are dev's (28 steps). Not distilled: the
    trainer feeds random guidance values, so the model learns to ignore them; real CFG
    (a negative prompt with true_cfg_scale > 1) works because captions are dropped at
    training time."""
    t5_dim: int = 96
    t5_layers: int = 2
    t5_tokens: int = 32
    """The T5 tokenizer's `model_max_length` (ditmesh pads prompts to it, as the trainer
    does); the longest caption is 28 words plus the end token."""
    clip_dim: int = 64
    clip_layers: int = 2
    vae_channels: tuple[int, ...] = (32, 64, 64, 64)
    """`block_out_channels` of the VAE: four levels, so 8x downsampling like Flux's."""

    def __post_init__(self) -> None:
        if self.head_dim % 8:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 8 (rotary axes)")
        if len(self.vae_channels) != 4:
            raise ValueError(f"vae_channels needs four levels (8x), not {self.vae_channels}")
        if self.size % 16:
            raise ValueError(f"size {self.size} must be a multiple of 16 (8x VAE, 2x2 packing)")

    @property
    def image_tokens(self) -> int:
        return (self.size // 16) ** 2


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary axes (index, row, column) summing to the head dim, each even, shaped like
    Flux's (16, 56, 56) for 128."""
    side = (head_dim - head_dim // 8) // 2
    side -= side % 2
    return (head_dim - 2 * side, side, side)


# --------------------------------------------------------------------- tokenizers


def _bytes_vocab() -> dict[str, int]:
    vocab: dict[str, int] = {}
    for char in bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
    for char in bytes_to_unicode().values():
        vocab.setdefault(char + "</w>", len(vocab))
    return vocab


def _clip_from(vocab: dict[str, int], merges: list[tuple[str, str]]) -> CLIPTokenizer:
    full = dict(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        full[special] = len(full)  # last, so end-of-text is the largest id, as in CLIP
    return CLIPTokenizer(vocab=full, merges=merges, model_max_length=77)


def clip_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make each word one token: for each word in turn, whatever pieces
    the merges so far leave are joined left to right. Later merges rank lower, so they
    never break a word made earlier."""
    vocab, merges = _bytes_vocab(), []
    for word in words:
        tok = _clip_from(vocab, merges)
        pieces = tok.tokenize(word)
        left = pieces[0]
        for right in pieces[1:]:
            merges.append((left, right))
            left += right
            vocab.setdefault(left, len(vocab))
    return merges


def clip_tokenizer(words: list[str]) -> CLIPTokenizer:
    """CLIP's byte-level BPE layout (bytes, bytes + `</w>`, merges, specials) whose merges
    spell `words`; any other text still encodes, byte by byte."""
    vocab, merges = _bytes_vocab(), clip_merges(words)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tok = _clip_from(vocab, merges)
    for word in words:
        if len(tok.tokenize(word)) != 1:
            raise AssertionError(f"CLIP tokenizer splits {word!r}: {tok.tokenize(word)}")
    return tok


def t5_pieces(words: list[str]) -> list[tuple[str, float]]:
    """Unigram pieces in T5's id order (pad 0, eos 1, unk 2): whole words score best,
    then single characters, so words are one piece and any ASCII text still encodes."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    chars = string.ascii_letters + string.digits + string.punctuation
    entries = [("\u2581" + w, -4.0) for w in words] + [(w, -5.0) for w in words if not w.isalnum()]
    entries += [("\u2581" + c, -7.0) for c in chars] + [(c, -10.0) for c in chars]
    seen = {p for p, _ in pieces}
    for piece, score in entries:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))
    return pieces


def t5_tokenizer(words: list[str], max_length: int) -> T5Tokenizer:
    tok = T5Tokenizer(vocab=t5_pieces(words), extra_ids=0, model_max_length=max_length)
    for word in words:
        if len(tok.tokenize(word)) != 1:
            raise AssertionError(f"T5 tokenizer splits {word!r}: {tok.tokenize(word)}")
    return tok


def _write_spiece_model(folder: pathlib.Path, pieces: list[tuple[str, float]]) -> None:
    """A sentencepiece `spiece.model` equal to the unigram vocabulary, as real T5 folders
    have beside tokenizer.json (built from the protobuf, no training: deterministic)."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    model = spm_pb.ModelProto()
    trainer = model.trainer_spec
    trainer.model_type = spm_pb.TrainerSpec.UNIGRAM
    trainer.vocab_size = len(pieces)
    trainer.pad_id, trainer.eos_id, trainer.unk_id, trainer.bos_id = 0, 1, 2, -1
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = True
    normalizer.escape_whitespaces = True
    kind = spm_pb.ModelProto.SentencePiece
    kinds = {0: kind.CONTROL, 1: kind.CONTROL, 2: kind.UNKNOWN}
    for index, (text, score) in enumerate(pieces):
        entry = model.pieces.add()
        entry.piece, entry.score = text, score
        entry.type = kinds.get(index, kind.NORMAL)
    (folder / "spiece.model").write_bytes(model.SerializeToString())


# ---------------------------------------------------------------------- components


def build_vae(cfg: ShapesModelConfig, seed: int) -> AutoencoderKL:
    """Flux's VAE layout (16 latent channels, no quant convs), small widths. The scaling
    and shift factors are placeholders until the trainer measures its latents."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        norm_num_groups=min(32, math.gcd(*cfg.vae_channels)),
        latent_channels=16,
        sample_size=cfg.size,
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_text(
    cfg: ShapesModelConfig, seed: int
) -> tuple[CLIPTokenizer, CLIPTextModel, T5Tokenizer, T5EncoderModel]:
    words = list(shapes.VOCAB)
    clip_tok, t5_tok = clip_tokenizer(words), t5_tokenizer(words, cfg.t5_tokens)
    clip = clip_encoder(
        clip_tok, cfg.clip_dim, with_projection=False, seed=seed, layers=cfg.clip_layers
    )
    t5 = t5_encoder(t5_tok, cfg.t5_dim, seed + 1, layers=cfg.t5_layers)
    return clip_tok, clip, t5_tok, t5


def build_transformer(
    cfg: ShapesModelConfig, *, joint_dim: int, pooled_dim: int, seed: int
) -> FluxTransformer2DModel:
    torch.manual_seed(seed + 2)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=cfg.double_blocks,
        num_single_layers=cfg.single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=joint_dim,
        pooled_projection_dim=pooled_dim,  # FluxPipeline pools with CLIP's pooler_output
        guidance_embeds=cfg.guidance_embeds,
        axes_dims_rope=rope_axes(cfg.head_dim),
    )


def build_scheduler(cfg: ShapesModelConfig) -> FlowMatchEulerDiscreteScheduler:
    """Flux's dynamic shifting, re-based on this model's sequence: mu = base_shift
    (shift e^0.5 = 1.65) at the trained size, rising to max_shift at 4x the side."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=cfg.image_tokens,
        max_image_seq_len=cfg.image_tokens * 16,
    )


def train_shift(cfg: ShapesModelConfig) -> float:
    """The timestep shift the pipeline samples with at the trained size (e^mu)."""
    return math.exp(0.5)


def build_pipeline(cfg: ShapesModelConfig, seed: int = 0) -> FluxPipeline:
    """The untrained model, every component seeded from `seed`."""
    clip_tok, clip, t5_tok, t5 = build_text(cfg, seed)
    transformer = build_transformer(
        cfg, joint_dim=t5.config.d_model, pooled_dim=clip.config.hidden_size, seed=seed
    )
    return FluxPipeline(
        scheduler=build_scheduler(cfg),
        vae=build_vae(cfg, seed + 3),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def save_pipeline(
    pipe: FluxPipeline, out: str | os.PathLike[str], dtype: torch.dtype = torch.float16
) -> pathlib.Path:
    """Write the folder in `dtype` safetensors, with the files real CLIP and T5 tokenizer
    folders carry beside tokenizer.json (vocab.json + merges.txt, spiece.model)."""
    out = pathlib.Path(out)
    pipe.to(dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    words = list(shapes.VOCAB)
    (out / "tokenizer" / "vocab.json").write_text(json.dumps(pipe.tokenizer.get_vocab()))
    merges = ["#version: 0.2", *(f"{a} {b}" for a, b in clip_merges(words))]
    (out / "tokenizer" / "merges.txt").write_text("\n".join(merges) + "\n")
    _write_spiece_model(out / "tokenizer_2", t5_pieces(words))
    return out


def parameter_counts(pipe: FluxPipeline) -> dict[str, int]:
    names = ("transformer", "vae", "text_encoder", "text_encoder_2")
    return {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in names}
