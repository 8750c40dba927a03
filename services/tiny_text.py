"""Text encoders and tokenizers for the tiny models, built offline (no hub).

Tokenizers come from an in-memory vocabulary instead of a download: a byte-level BPE
for CLIP, a unigram vocabulary for T5 (and mT5: the same plus Chinese characters) and a
WordPiece vocabulary for HunyuanDiT's bilingual BERT. All cover every ASCII character,
so arbitrary English prompts encode to real ids rather than `<unk>`, and the bilingual
ones common Chinese characters. The encoders are CLIP, BERT and T5 v1.1 towers of any size (small for tests, real sizes for
`bench/make_mesh_model.py`). `ditmesh.tiny` assembles them into pipelines.
"""

from __future__ import annotations

import json
import pathlib
import string

import torch
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

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

# Frequent Chinese characters and those of picture prompts (HunyuanDiT is bilingual):
# its BERT tokenizer and mT5 know each as a token of its own, as the real ones do. A
# character outside this set is `[UNK]` / `<unk>`, still a valid prompt.
_HANZI = "".join(
    dict.fromkeys(
        "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生"
        "自会那后能对着事其里所去行过家十用发天如然作方成者多日都三小军二无同么经法当起与"
        "好看学进种将还分此心前面又定见只主没公从知全两长高新开正手老色白红黄蓝绿黑紫金银"
        "猫狗鸟马牛羊鱼龙虎花草树林森山水河湖海江风雨雪云天空星月太阳光影夜晚早晨春夏秋冬"
        "城市街道房屋楼桥路车船飞机宇航员骑在画照片油水墨风格中国古代现代未来美丽可爱漂亮"
        "女孩男孩孩子老人脸眼睛头发衣服帽子一只两个桌子椅子窗门灯书杯茶酒菜饭果苹香蕉"
        "坐站走跑跳游听吃喝睡笑哭玩穿戴拿住模糊清晰细节高质量背景"
    )
)


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


def _mt5_pieces() -> list[tuple[str, float]]:
    """T5's pieces and the Chinese characters, each alone or at a word start, as mT5's
    vocabulary (a multilingual T5) has them."""
    pieces = _t5_pieces()
    seen = {p for p, _ in pieces}
    for char in _HANZI:
        for piece, score in (("\u2581" + char, -7.0), (char, -8.0)):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, score))
    return pieces


def t5_tokenizer(model_max_length: int, *, multilingual: bool = False) -> T5Tokenizer:
    """T5 tokenizer from an explicit piece list.

    `extra_ids=0`: the sentinel tokens only matter for span-corruption training.
    Building from `vocab=` (not `vocab_file=`) matters: transformers 5 silently
    yields a 4-piece vocabulary from a vocab file.
    """
    pieces = _mt5_pieces() if multilingual else _t5_pieces()
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def bert_tokenizer(model_max_length: int = 77) -> BertTokenizer:
    """A WordPiece vocabulary laid out like a Chinese BERT's: the specials first
    ([PAD] is 0), then each Chinese character, English words, `##` suffixes and single
    characters, so Chinese and English prompts both tokenize to real ids.

    `tokenize_chinese_chars` cuts Chinese text into characters before WordPiece, as in
    HunyuanDiT's bilingual CLIP-style tokenizer.
    """
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(_HANZI)
    tokens += _WORDS
    tokens += ["##" + s for s in _SUFFIXES]
    lower = string.ascii_lowercase + string.digits
    tokens += [*lower, *string.punctuation, *("##" + c for c in lower)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=model_max_length)


def write_clip_vocab_files(tokenizer: CLIPTokenizer, folder: pathlib.Path) -> None:
    """Add vocab.json and merges.txt beside tokenizer.json, as real CLIP folders have.

    transformers 5 reads only tokenizer.json; these are for readers of the older
    slow-tokenizer layout.
    """
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab(), ensure_ascii=False))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in _clip_merges())]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")


def write_bert_vocab_file(tokenizer: BertTokenizer, folder: pathlib.Path) -> None:
    """Add vocab.txt beside tokenizer.json, as real BERT folders have (one token a line,
    in id order)."""
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    (folder / "vocab.txt").write_text("".join(t + "\n" for t, _ in by_id), encoding="utf-8")


def write_spiece_model(folder: pathlib.Path, *, multilingual: bool = False) -> None:
    """Add a sentencepiece `spiece.model` equal to the unigram vocab, as real T5 folders have.

    Built from the protobuf directly (no training), so it is deterministic and
    gives the same ids as tokenizer.json.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    model = spm_pb.ModelProto()
    pieces = _mt5_pieces() if multilingual else _t5_pieces()
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


def clip_encoder(
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


def bert_encoder(
    tokenizer: BertTokenizer, hidden: int, seed: int, *, layers: int = 2, heads: int = 4
) -> BertModel:
    """A BERT text tower (HunyuanDiT's CLIP-style text encoder is one, 1024 wide), by
    default 2 layers; its last hidden states are what the pipeline uses."""
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        max_position_embeddings=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return BertModel(config).eval()  # with its pooler, as checkpoints have (unused)


def t5_encoder(
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
