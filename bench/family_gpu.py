"""Times ditmesh's denoiser and VAE decode for any family on one GPU (eager, compiled).

What bench/peer_family.py times for diffusers and xfuser, measured the same way for
ditmesh: a whole request is the denoising loop (LocalRunner: the stage's own code, CFG
batched as the pipelines do) then the VAE decode to uint8 pixels or frames on the host
(the VAE stage's decoder, video families' included). Conditioning is random tensors of
the shapes the encoder stage sends (masks all ones), at the model's default guidance.
One warm-up request (3 steps) comes first; `sec` is the best of `--repeats`. Prints
`RESULT {json}` per layout, with peak GPU memory.

    python bench/family_gpu.py --model /tmp/cog --height 480 --width 720 --frames 49 \
        --steps 10 --layouts single,single+compile
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ditmesh.common.models import load_class, resolve_model
from ditmesh.denoiser.runner import LocalRunner, warmup_job
from ditmesh.denoiser.speed import Speedups

OPTIONS = {"compile": dict(compile=True), "graphs": dict(cuda_graphs=True)}


def random_cond(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Seeded random tensors in place of the warm-up's zeros; masks (integers) stay."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, t in sorted(cond.items()):
        out[name] = t if not t.is_floating_point() else torch.randn(t.shape, generator=g)
    return out


def make_job(runner: LocalRunner, args, steps: int):
    """A request at the benchmark's size: the warm-up job's shapes, random conditioning."""
    model = runner.model
    j = warmup_job(runner.adapter, model, cfg=False, size=(args.height, args.width))
    j.cond = random_cond(j.cond)
    j.steps, j.seed, j.request_id = steps, 1, "bench"
    if model.video:
        j.num_frames = args.frames or model.family.default_num_frames
    return j


def request(runner: LocalRunner, decoder, args, steps: int) -> tuple[float, float]:
    """Seconds of the denoising loop and of the decode to host uint8 pixels or frames."""
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    latents = runner.run(make_job(runner, args, steps))  # on the host: synchronised
    mid = time.perf_counter()
    decoder.decode(latents)  # uint8 pixels on the host: synchronised
    return mid - t, time.perf_counter() - mid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--height", type=int, required=True)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--frames", type=int, default=0, help="video families: frames per video")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--layouts", default="single,single+compile")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    model = resolve_model(args.model)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = dev.type == "cuda"
    if model.video:
        decoder = load_class(model.family.video_decoder)(model, dev, dtype)
    else:
        from ditmesh.vae.decoder import VaeDecoder

        decoder = VaeDecoder(model, dev, dtype)

    for name in args.layouts.split(","):
        base, *opts = name.split("+")
        if base != "single":
            raise SystemExit(f"layout {base!r}: this benchmark runs one process")
        speed = Speedups(**{k: v for o in opts for k, v in OPTIONS[o].items()})
        t0 = time.perf_counter()
        runner = LocalRunner(model, args.device, args.dtype, speed=speed)
        load_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        request(runner, decoder, args, 3)
        warm_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runs = [request(runner, decoder, args, args.steps) for _ in range(args.repeats)]
        denoise, decode = min(runs, key=sum)
        row = dict(
            system="ditmesh",
            layout=name,
            model=model.name,
            H=args.height,
            W=args.width,
            frames=args.frames or None,
            steps=args.steps,
            guidance=model.default_guidance,
            sec=round(denoise + decode, 3),
            denoise_sec=round(denoise, 3),
            decode_sec=round(decode, 3),
            all_sec=[round(a + b, 3) for a, b in runs],
            load_s=round(load_s, 1),
            warmup_s=round(warm_s, 1),
            peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
            card=torch.cuda.get_device_name() if cuda else "cpu",
        )
        print("RESULT", json.dumps(row), flush=True)
        with open(os.path.join(args.out, "ours.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        runner.close()
        del runner
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
