"""A whole FLUX.1-dev-shaped pipeline folder for the mesh benchmarks: text encoders added.

The peers' random Flux folder (`make_flux.py`) has no text encoders (their benchmarks
pass prompt embeddings). The mesh's encoder stage needs them, so this writes a folder
that links that folder's transformer, VAE and scheduler and adds random-weight text
encoders of the real sizes (CLIP-L text tower: 12 layers, width 768; T5 v1.1 XXL
encoder: 24 layers, width 4096, FFN 10240, 64 heads) with the project's offline
tokenizers (`ditmesh.tiny`: smaller vocabularies than the real ones, the same
sequence lengths, so the encoders do the same work per token).

    python bench/make_mesh_model.py /tmp/flux-full /tmp/flux-mesh          # on a GPU
    python bench/make_mesh_model.py /tmp/tiny /tmp/tiny-mesh --size small   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import torch

from ditmesh import tiny_text

SIZES = {
    # (CLIP width, layers, heads, FFN), (T5 width, layers, heads, d_kv, FFN)
    "full": ((768, 12, 12, 3072), (4096, 24, 64, 64, 10240)),
    "small": ((16, 2, 4, 32), (32, 2, 4, 8, 64)),  # fits make_flux.py tiny
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source", help="a Flux folder with transformer/, vae/, scheduler/")
    ap.add_argument("out")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    args = ap.parse_args()
    t0 = time.time()
    src, out = pathlib.Path(args.source).resolve(), pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for part in ("transformer", "vae", "scheduler"):
        if not (out / part).exists():
            os.symlink(src / part, out / part)
    (clip_w, clip_l, clip_h, clip_ff), (t5_w, t5_l, t5_h, t5_kv, t5_ff) = SIZES[args.size]
    clip_tok, t5_tok = tiny_text.clip_tokenizer(), tiny_text.t5_tokenizer(512)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The project's own tiny-model builders, at the real sizes, built on the GPU if any.
    with torch.device(device):
        clip = tiny_text.clip_encoder(
            clip_tok,
            clip_w,
            with_projection=False,
            seed=0,
            layers=clip_l,
            heads=clip_h,
            ffn=clip_ff,
        ).to(torch.bfloat16)
        t5 = tiny_text.t5_encoder(
            t5_tok, t5_w, 0, layers=t5_l, heads=t5_h, d_kv=t5_kv, d_ff=t5_ff
        ).to(torch.bfloat16)
    clip.save_pretrained(out / "text_encoder")
    t5.save_pretrained(out / "text_encoder_2", max_shard_size="10GB")
    clip_tok.save_pretrained(out / "tokenizer")
    t5_tok.save_pretrained(out / "tokenizer_2")
    tiny_text.write_clip_vocab_files(clip_tok, out / "tokenizer")
    tiny_text.write_spiece_model(out / "tokenizer_2")
    index = json.loads((src / "model_index.json").read_text())
    index.update(
        text_encoder=["transformers", "CLIPTextModel"],
        tokenizer=["transformers", "CLIPTokenizer"],
        text_encoder_2=["transformers", "T5EncoderModel"],
        tokenizer_2=["transformers", "T5Tokenizer"],
    )
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    n = sum(p.numel() for p in t5.parameters()) + sum(p.numel() for p in clip.parameters())
    print(f"wrote {out}: text encoders {n / 1e9:.2f}B params in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
