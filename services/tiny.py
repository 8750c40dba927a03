"""Tiny random-weight diffusers pipelines, built offline, for tests and the demo.

The mesh is developed on machines that cannot reach a model hub, yet the encoder,
denoiser and VAE stages must be exercised against the real diffusers pipeline
classes. So each family here copies the *structure* of its real checkpoint
(component classes, channel layout, text lengths, scheduler and VAE factors) at a
size that builds, runs and saves in about a second and a few MB.

Tokenizers are built from an in-memory vocabulary instead of downloaded: a
byte-level BPE for CLIP and a unigram vocabulary for T5. Both cover every ASCII
character, so arbitrary English prompts encode to real ids rather than `<unk>`.
"""

from __future__ import annotations

import json
import os
import pathlib
import string
from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

FAMILIES = ("flux", "sd3", "pixart-sigma", "pixart-alpha")

# Words that get whole-word tokens, so prompts tokenize into a realistic number of
# pieces; everything else falls back to characters.
_WORDS = (
    "a an the of and in on at with by for to from is are this that it its "
    "photo picture painting drawing portrait render image art style "
    "cat dog bird horse man woman person child face eyes hair "
    "red blue green yellow white black orange purple golden "
    "tree forest flower house city street sky sun moon cloud water sea mountain "
    "beautiful small large old new dark light bright detailed high quality"
).split()
_SUFFIXES = ("s", "es", "ed", "ing", "er", "ly", "tion")

# A BPE/unigram model needs every symbol it may emit in its vocabulary.
_T5_CHARS = string.ascii_letters + string.digits + string.punctuation


# --------------------------------------------------------------------- tokenizers


def _clip_merges() -> list[tuple[str, str]]:
    """Left-to-right merges that spell each word, so common words become one token."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in _WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
            left += right
    return merges


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE laid out like CLIP's: bytes, bytes+`</w>`, merges, then specials.

    The specials come last (as in the real 49408-token vocab) so that the
    end-of-text id is the largest id, which older CLIP pooling relies on.
    """
    byte_chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in (*byte_chars, *(c + "</w>" for c in byte_chars)):
        vocab.setdefault(token, len(vocab))
    merges = _clip_merges()
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_pieces() -> list[tuple[str, float]]:
    """Unigram pieces and log-probabilities in T5's id order (pad 0, eos 1, unk 2).

    Whole words score best, then suffixes, then single characters, so the
    Viterbi segmentation prefers words and still covers any ASCII text.
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    add("\u2581", -2.0)
    for word in _WORDS:
        add("\u2581" + word, -4.0)
    for suffix in _SUFFIXES:
        add(suffix, -6.0)
    for char in _T5_CHARS:  # beats "\u2581" + a suffix piece at a word start
        add("\u2581" + char, -7.0)
    for char in _T5_CHARS:
        add(char, -10.0)
    return pieces


def t5_tokenizer(model_max_length: int) -> T5Tokenizer:
    """T5 tokenizer from an explicit piece list.

    `extra_ids=0`: the sentinel tokens only matter for span-corruption training.
    Building from `vocab=` (not `vocab_file=`) matters: transformers 5 silently
    yields a 4-piece vocabulary from a vocab file.
    """
    return T5Tokenizer(vocab=_t5_pieces(), extra_ids=0, model_max_length=model_max_length)


def _write_clip_vocab_files(tokenizer: CLIPTokenizer, folder: pathlib.Path) -> None:
    """Add vocab.json and merges.txt beside tokenizer.json, as real CLIP folders have.

    transformers 5 reads only tokenizer.json; these are for readers of the older
    slow-tokenizer layout.
    """
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab(), ensure_ascii=False))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in _clip_merges())]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")


def _write_spiece_model(folder: pathlib.Path) -> None:
    """Add a sentencepiece `spiece.model` equal to the unigram vocab, as real T5 folders have.

    Built from the protobuf directly (no training), so it is deterministic and
    gives the same ids as tokenizer.json.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    model = spm_pb.ModelProto()
    pieces = _t5_pieces()
    trainer = model.trainer_spec
    trainer.model_type = spm_pb.TrainerSpec.UNIGRAM
    trainer.vocab_size = len(pieces)
    trainer.pad_id, trainer.eos_id, trainer.unk_id, trainer.bos_id = 0, 1, 2, -1
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = True
    normalizer.escape_whitespaces = True
    kinds = {0: spm_pb.ModelProto.SentencePiece.CONTROL, 1: spm_pb.ModelProto.SentencePiece.CONTROL}
    kinds[2] = spm_pb.ModelProto.SentencePiece.UNKNOWN
    for index, (text, score) in enumerate(pieces):
        entry = model.pieces.add()
        entry.piece, entry.score = text, score
        entry.type = kinds.get(index, spm_pb.ModelProto.SentencePiece.NORMAL)
    (folder / "spiece.model").write_bytes(model.SerializeToString())


# ------------------------------------------------------------------ text encoders


def _clip_encoder(
    tokenizer: CLIPTokenizer,
    hidden: int,
    *,
    with_projection: bool,
    seed: int,
    layers: int = 2,
    heads: int = 4,
    ffn: int | None = None,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A CLIP text tower, by default 2 layers so `hidden_states[-2]` (SD3's clip skip)
    exists; `bench/make_mesh_model.py` asks for the real sizes."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=ffn or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden,
        hidden_act="quick_gelu",
        # Pooling picks the first eos position; ids must match the tokenizer.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_cls(config).eval()


def _t5_encoder(
    tokenizer: T5Tokenizer,
    d_model: int,
    seed: int,
    *,
    layers: int = 2,
    heads: int = 4,
    d_kv: int | None = None,
    d_ff: int | None = None,
) -> T5EncoderModel:
    """A T5 v1.1 encoder (gated-GELU FFN, relative positions) like T5-XXL, by default 2
    layers; `bench/make_mesh_model.py` asks for the real sizes."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_kv or d_model // 4,
        d_ff=d_ff or d_model * 2,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


# --------------------------------------------------------------------------- VAE


def _vae(
    latent_channels: int, scaling: float, shift: float | None, *, quant_conv: bool, seed: int
) -> AutoencoderKL:
    """Four resolution levels, as every real one has, so the VAE scale factor is 8."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        sample_size=128,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    ).eval()


# ---------------------------------------------------------------------- families

_HEADS = 4  # divisible by 2 and 4, for sequence-parallel splits of the heads
_HEAD_DIM = 16
_INNER = _HEADS * _HEAD_DIM


def _flux(seed: int) -> DiffusionPipeline:
    """FLUX.1-dev layout: guidance embedding, CLIP pooled vector + T5 sequence."""
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer(512)
    clip = _clip_encoder(clip_tok, 32, with_projection=False, seed=seed)
    t5 = _t5_encoder(t5_tok, 32, seed)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=t5.config.d_model,
        # FluxPipeline pools with CLIPTextModel.pooler_output, i.e. the hidden size.
        pooled_projection_dim=clip.config.hidden_size,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to the head dim, as (16, 56, 56) does for 128
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    vae = _vae(16, 0.3611, 0.1159, quant_conv=False, seed=seed)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def _sd3(seed: int) -> DiffusionPipeline:
    """SD3-medium layout: CLIP-L + CLIP-G pooled and concatenated, padded to T5's width.

    The two CLIPs get different widths (32, 48) so mixing them up fails loudly,
    and T5 is wider than their sum (96 > 80), as 4096 is wider than 768 + 1280.
    """
    clip_tok, clip_tok_2, t5_tok = clip_tokenizer(), clip_tokenizer(), t5_tokenizer(512)
    clip_l = _clip_encoder(clip_tok, 32, with_projection=True, seed=seed)
    clip_g = _clip_encoder(clip_tok_2, 48, with_projection=True, seed=seed)
    t5 = _t5_encoder(t5_tok, 96, seed)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=t5.config.d_model,
        caption_projection_dim=_INNER,
        pooled_projection_dim=clip_l.config.projection_dim + clip_g.config.projection_dim,
        out_channels=16,
        # 1.5x the sample size, as 192 is for 128; allows images up to 768 px.
        pos_embed_max_size=48,
    ).eval()
    vae = _vae(16, 1.5305, 0.0609, quant_conv=False, seed=seed)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=clip_tok,
        text_encoder_2=clip_g,
        tokenizer_2=clip_tok_2,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


def _pixart_scheduler() -> DPMSolverMultistepScheduler:
    """The scheduler config both PixArt checkpoints ship (the DPM-Solver++ defaults)."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        solver_order=2,
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        timestep_spacing="linspace",
        steps_offset=0,
    )


def _pixart(
    seed: int, *, max_length: int, vae_scaling: float, pipeline_cls: type[DiffusionPipeline]
) -> DiffusionPipeline:
    """PixArt XL/2 layout: T5 cross-attention, adaLN-single, learned sigma (8 out channels).

    sample_size 32 is one of the sizes the pipelines have an aspect-ratio bin
    table for, so a call with default arguments works (256 px). The real
    1024-px alpha model uses micro-conditions, but the pipelines only send them
    when sample_size is 128, so here they stay off like diffusers' own default.
    """
    t5_tok = t5_tokenizer(max_length)
    t5 = _t5_encoder(t5_tok, 32, seed)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=_INNER,
        attention_bias=True,
        sample_size=32,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=t5.config.d_model,
        use_additional_conditions=False,
    ).eval()
    vae = _vae(4, vae_scaling, None, quant_conv=True, seed=seed)
    return pipeline_cls(
        tokenizer=t5_tok,
        text_encoder=t5,
        vae=vae,
        transformer=transformer,
        scheduler=_pixart_scheduler(),
    )


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "flux": _flux,
    "sd3": _sd3,
    # Sigma: SDXL VAE, 300 tokens. Alpha: SD 1.x VAE, 120 tokens.
    "pixart-sigma": lambda seed: _pixart(
        seed, max_length=300, vae_scaling=0.13025, pipeline_cls=PixArtSigmaPipeline
    ),
    "pixart-alpha": lambda seed: _pixart(
        seed, max_length=120, vae_scaling=0.18215, pipeline_cls=PixArtAlphaPipeline
    ),
}


def make_tiny(family: str, out_dir: str | os.PathLike[str], *, seed: int = 0) -> pathlib.Path:
    """Write a tiny pipeline of `family` to `out_dir` and return the folder.

    The folder loads with the family's plain diffusers pipeline class and no
    network. The same seed gives byte-identical weights, so tests on different
    processes or machines see the same model.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown model family {family!r}; known families: {', '.join(FAMILIES)}")
    out = pathlib.Path(out_dir)
    pipe = _BUILDERS[family](seed)
    pipe.save_pretrained(out)
    for name, component in pipe.components.items():
        if isinstance(component, CLIPTokenizer):
            _write_clip_vocab_files(component, out / name)
        elif isinstance(component, T5Tokenizer):
            _write_spiece_model(out / name)
    return out
