"""Where the encoder stage's time goes for one prompt, and what compiling the text
encoders would save; then how fast the VAE stage's PNG encoder is by thread count.

    python bench/encoder_profile.py --model /tmp/flux-mesh     # on a GPU

Prints `RESULT {json}` lines: per part (tokenize, CLIP, T5, to CPU bytes) the median of
`--repeats` calls after two warm-ups, eager and with the T5 encoder compiled; and PNG
encoding of a 1024x1024 image of noise and of a smooth one at 1, 8 and 16 threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from ditmesh.common import codec
from ditmesh.common.models import resolve_model


def timed(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--prompt", default="a lighthouse on a cliff at dawn")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.cuda.synchronize = lambda: None
    from ditmesh.encoder.flux import FluxTextEncoder

    model = resolve_model(args.model)
    enc = FluxTextEncoder(model, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    pipe = enc.pipe
    n = enc.max_tokens

    def tok():
        pipe.tokenizer(
            args.prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        pipe.tokenizer_2(
            args.prompt, padding="max_length", max_length=n, truncation=True, return_tensors="pt"
        )

    ids1 = pipe.tokenizer(
        args.prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids.to(dev)
    ids2 = pipe.tokenizer_2(
        args.prompt, padding="max_length", max_length=n, truncation=True, return_tensors="pt"
    ).input_ids.to(dev)

    @torch.inference_mode()
    def clip():
        pipe.text_encoder(ids1, output_hidden_states=False)

    @torch.inference_mode()
    def t5():
        pipe.text_encoder_2(ids2, output_hidden_states=False)

    @torch.inference_mode()
    def whole():
        return enc.encode(args.prompt)

    tensors = whole()

    def to_bytes():
        list(codec.iter_tensor_chunks(tensors))

    row = dict(
        bench="encoder_profile",
        tokenize_ms=timed(tok, args.repeats) * 1e3,
        clip_ms=timed(clip, args.repeats) * 1e3,
        t5_ms=timed(t5, args.repeats) * 1e3,
        to_bytes_ms=timed(to_bytes, args.repeats) * 1e3,
        encode_ms=timed(whole, args.repeats) * 1e3,
        count_tokens_ms=timed(lambda: enc.count_tokens(args.prompt), args.repeats) * 1e3,
    )
    print(
        "RESULT",
        json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}),
        flush=True,
    )
    for mode in ("default", "reduce-overhead"):
        try:
            t0 = time.perf_counter()
            pipe.text_encoder_2 = torch.compile(
                pipe.text_encoder_2, mode=None if mode == "default" else mode, fullgraph=False
            )
            t5c = timed(t5, args.repeats) * 1e3
            wc = timed(whole, args.repeats) * 1e3
            print(
                "RESULT",
                json.dumps(
                    dict(
                        bench="encoder_profile",
                        t5_compile=mode,
                        t5_ms=round(t5c, 2),
                        encode_ms=round(wc, 2),
                        compile_s=round(time.perf_counter() - t0, 1),
                    )
                ),
                flush=True,
            )
        except Exception as exc:  # noqa: BLE001 - a probe: report and go on
            print(
                "RESULT",
                json.dumps(
                    dict(
                        bench="encoder_profile",
                        t5_compile=mode,
                        error=f"{type(exc).__name__}: {exc}"[:300],
                    )
                ),
                flush=True,
            )
        pipe.text_encoder_2 = getattr(pipe.text_encoder_2, "_orig_mod", pipe.text_encoder_2)

    from ditmesh.vae import png

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    y, x = np.mgrid[0:1024, 0:1024]
    smooth = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    from concurrent.futures import ThreadPoolExecutor

    for threads in (1, 8, 16):
        png._pool = ThreadPoolExecutor(threads)
        png._workers = lambda t=threads: t  # noqa: B023 - the probe sets the pool size
        for name, img in (("noise", noise), ("smooth", smooth)):
            ms = timed(lambda i=img: png.encode_png(i), 5) * 1e3
            print(
                "RESULT",
                json.dumps(dict(bench="png", threads=threads, image=name, ms=round(ms, 1))),
                flush=True,
            )
    import io

    from PIL import Image

    for name, img in (("noise", noise), ("smooth", smooth)):
        ms = timed(lambda i=img: Image.fromarray(i).save(io.BytesIO(), format="PNG"), 3) * 1e3
        print(
            "RESULT",
            json.dumps(dict(bench="png", threads="pillow-default", image=name, ms=round(ms, 1))),
            flush=True,
        )


if __name__ == "__main__":
    main()
