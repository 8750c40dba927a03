"""The tiny pipelines must behave like real checkpoints for plain diffusers, offline.

Every other test of the mesh stands on these folders, so a tokenizer that maps
prompts to `<unk>` or a config that loads but cannot run would make those tests
pass for the wrong reason.
"""

from __future__ import annotations

import json
import pathlib
import socket
from collections.abc import Iterator

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers
from diffusers import (
    CogVideoXPipeline,
    FluxPipeline,
    HunyuanDiTPipeline,
    LattePipeline,
    MochiPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
)
from safetensors.torch import load_file
from tokenizers.models import BPE

from ditmesh import tiny, tiny_text

PIPELINES = {
    "flux": FluxPipeline,
    "sd3": StableDiffusion3Pipeline,
    "pixart-sigma": PixArtSigmaPipeline,
    "pixart-alpha": PixArtAlphaPipeline,
    "hunyuandit": HunyuanDiTPipeline,
    "cogvideox": CogVideoXPipeline,
    "cogvideox-2b": CogVideoXPipeline,
    "latte": LattePipeline,
    "mochi": MochiPipeline,
}

# The lengths the real checkpoints' tokenizers declare; pipelines read them.
MAX_LENGTHS = {
    ("flux", "tokenizer"): 77,
    ("flux", "tokenizer_2"): 512,
    ("sd3", "tokenizer"): 77,
    ("sd3", "tokenizer_2"): 77,
    ("sd3", "tokenizer_3"): 512,
    ("pixart-sigma", "tokenizer"): 300,
    ("pixart-alpha", "tokenizer"): 120,
    ("hunyuandit", "tokenizer"): 77,
    ("hunyuandit", "tokenizer_2"): 256,
    ("cogvideox", "tokenizer"): 226,
    ("cogvideox-2b", "tokenizer"): 226,
    ("latte", "tokenizer"): 120,
    ("mochi", "tokenizer"): 256,
}

# A short clip per video family, in a frame count the model accepts: the call's
# arguments, the frames that come out, and the pipeline's names for how much its VAE
# compresses space and time, with the time factor of the real checkpoint. CogVideoX 1.0's
# VAE decodes latent frames in pairs after an odd first batch, so only an odd count of
# latent frames (8k+1 frames) comes back as 4k+1 frames: 5 frames would decode to 8.
VIDEOS: dict[str, tuple[dict[str, object], int, str, tuple[str, int] | None]] = {
    "cogvideox": (
        {"num_frames": 9},
        9,
        "vae_scale_factor_spatial",
        ("vae_scale_factor_temporal", 4),
    ),
    "cogvideox-2b": (
        {"num_frames": 9},
        9,
        "vae_scale_factor_spatial",
        ("vae_scale_factor_temporal", 4),
    ),
    # Latte's temporal position table is exactly 16 frames; its 2-D VAE leaves time alone.
    "latte": ({"video_length": 16, "clean_caption": False}, 16, "vae_scale_factor", None),
    "mochi": ({"num_frames": 7}, 7, "vae_spatial_scale_factor", ("vae_temporal_scale_factor", 6)),
}

SENTENCE = "A photo of a red cat sitting on a wooden table at sunset, 4k!"
# HunyuanDiT's tokenizers are bilingual.
CHINESE = "一只红色的猫坐在桌子上, 水墨画风格"


def _refuse_network(*args: object, **kwargs: object) -> None:
    raise OSError("a tiny-model test tried to reach the network")


def _go_offline(mp: pytest.MonkeyPatch) -> None:
    """Offline for real: huggingface_hub reads HF_HUB_OFFLINE once at import, so the
    env var alone would prove nothing; refusing sockets catches any download."""
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setattr(socket.socket, "connect", _refuse_network)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    _go_offline(monkeypatch)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, pathlib.Path]]:
    """Each family built once per module; building is offline too."""
    root = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as mp:
        _go_offline(mp)
        yield {family: tiny.make_tiny(family, root / family, seed=0) for family in tiny.FAMILIES}


def _model_index(folder: pathlib.Path) -> dict[str, list[str | None]]:
    return {
        name: value
        for name, value in json.loads((folder / "model_index.json").read_text()).items()
        if not name.startswith("_")
    }


def _tokenizer_names(folder: pathlib.Path) -> list[str]:
    return [name for name, value in _model_index(folder).items() if name.startswith("tokenizer")]


def test_families_match_builders() -> None:
    assert tuple(PIPELINES) == tiny.FAMILIES


def test_make_tiny_help_names_every_family() -> None:
    from ditmesh import cli

    assert cli.TINY_FAMILIES == tiny.FAMILIES


def test_unknown_family_names_the_known_ones(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError) as info:
        tiny.make_tiny("sdxl", tmp_path)
    assert all(family in str(info.value) for family in tiny.FAMILIES)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_pipeline_runs_after_reload(family: str, folders: dict[str, pathlib.Path]) -> None:
    pipe = PIPELINES[family].from_pretrained(folders[family])
    pipe.set_progress_bar_config(disable=True)
    if family in VIDEOS:
        _video_runs(family, pipe)
        return
    assert pipe.vae_scale_factor == 8
    binned = family.startswith("pixart") or family == "hunyuandit"
    kwargs = {"use_resolution_binning": False} if binned else {}

    def generate() -> np.ndarray:
        return pipe(
            "a photo of a red cat",
            num_inference_steps=2,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **kwargs,
        ).images

    images = generate()
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    np.testing.assert_array_equal(images, generate())


def _video_runs(family: str, pipe: object) -> None:
    """A video family's pipeline makes a short clip, the same one twice."""
    kwargs, frames, spatial, temporal = VIDEOS[family]
    assert getattr(pipe, spatial) == 8
    if temporal is not None:
        assert getattr(pipe, temporal[0]) == temporal[1]

    def generate() -> np.ndarray:
        return np.asarray(
            pipe(
                "a photo of a red cat",
                num_inference_steps=2,
                height=64,
                width=64,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
                **kwargs,
            ).frames
        )

    video = generate()
    assert video.shape == (1, frames, 64, 64, 3)
    assert np.isfinite(video).all()
    np.testing.assert_array_equal(video, generate())


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_same_seed_same_weights(
    family: str, folders: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    again = tiny.make_tiny(family, tmp_path / "again", seed=0)
    files = sorted(p.relative_to(again) for p in again.rglob("*.safetensors"))
    assert pathlib.Path("transformer/diffusion_pytorch_model.safetensors") in files
    for rel in files:
        first, second = load_file(folders[family] / rel), load_file(again / rel)
        assert first.keys() == second.keys(), rel
        for key, tensor in first.items():
            assert torch.equal(tensor, second[key]), f"{rel}:{key}"


def test_other_seed_other_weights(tmp_path: pathlib.Path) -> None:
    rel = "transformer/diffusion_pytorch_model.safetensors"
    first = load_file(tiny.make_tiny("pixart-sigma", tmp_path / "a", seed=0) / rel)
    second = load_file(tiny.make_tiny("pixart-sigma", tmp_path / "b", seed=1) / rel)
    assert any(not torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_folder_is_small(family: str, folders: dict[str, pathlib.Path]) -> None:
    size = sum(p.stat().st_size for p in folders[family].rglob("*") if p.is_file())
    assert size < 10 * 2**20


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_tokenizers_reload_with_built_vocab(family: str, folders: dict[str, pathlib.Path]) -> None:
    folder = folders[family]
    index = _model_index(folder)
    names = _tokenizer_names(folder)
    assert names, "every family has at least one tokenizer"
    built = {
        "CLIPTokenizer": len(tiny_text.clip_tokenizer()),
        "T5Tokenizer": len(tiny_text.t5_tokenizer(8, multilingual=family == "hunyuandit")),
        "BertTokenizer": len(tiny_text.bert_tokenizer()),
    }
    for name in names:
        library, class_name = index[name]
        assert library == "transformers"
        tok = getattr(transformers, class_name).from_pretrained(folder / name)
        assert len(tok) == built[class_name] > 100, name
        assert tok.model_max_length == MAX_LENGTHS[(family, name)]
        encoder_config = folder / name.replace("tokenizer", "text_encoder") / "config.json"
        assert json.loads(encoder_config.read_text())["vocab_size"] == len(tok)

        ids = tok(SENTENCE, add_special_tokens=False).input_ids
        assert len(ids) > 3
        assert tok.unk_token_id not in ids, tok.convert_ids_to_tokens(ids)
        with_specials = tok(SENTENCE).input_ids
        # BERT ends a sequence with [SEP] (it has no eos token).
        end = tok.eos_token_id if class_name != "BertTokenizer" else tok.sep_token_id
        assert end is not None and with_specials[-1] == end


def test_t5_spiece_model_matches_tokenizer_json(folders: dict[str, pathlib.Path]) -> None:
    import sentencepiece

    folder = folders["flux"] / "tokenizer_2"
    tok = transformers.T5Tokenizer.from_pretrained(folder)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    assert processor.get_piece_size() == len(tok)
    assert processor.encode(SENTENCE) == tok(SENTENCE, add_special_tokens=False).input_ids
    assert tok.decode(tok(SENTENCE).input_ids, skip_special_tokens=True) == SENTENCE


def test_clip_vocab_files_match_tokenizer_json(folders: dict[str, pathlib.Path]) -> None:
    folder = folders["flux"] / "tokenizer"
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    from_files = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    assert from_files(SENTENCE).input_ids == tok(SENTENCE).input_ids


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2"])
def test_hunyuandit_tokenizers_take_chinese(name: str, folders: dict[str, pathlib.Path]) -> None:
    folder = folders["hunyuandit"] / name
    index = _model_index(folders["hunyuandit"])
    tok = getattr(transformers, index[name][1]).from_pretrained(folder)
    ids = tok(CHINESE, add_special_tokens=False).input_ids
    # BERT cuts Chinese into characters; mT5's pieces are characters too.
    assert len(ids) >= len(CHINESE.replace(" ", "").replace(",", "")), ids
    assert tok.unk_token_id not in ids, tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids).replace(" ", "") == CHINESE.replace(" ", "")


def test_mt5_spiece_model_matches_tokenizer_json(folders: dict[str, pathlib.Path]) -> None:
    import sentencepiece

    folder = folders["hunyuandit"] / "tokenizer_2"
    tok = transformers.T5Tokenizer.from_pretrained(folder)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    assert processor.get_piece_size() == len(tok)
    for text in (SENTENCE, CHINESE):
        assert processor.encode(text) == tok(text, add_special_tokens=False).input_ids


def test_bert_vocab_file_matches_tokenizer_json(folders: dict[str, pathlib.Path]) -> None:
    folder = folders["hunyuandit"] / "tokenizer"
    tok = transformers.BertTokenizer.from_pretrained(folder)
    lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    from_file = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(lines)})
    for text in (SENTENCE, CHINESE):
        assert from_file(text).input_ids == tok(text).input_ids
