"""Scores sampling layouts and speed-ups with the yardstick against exact one-process sampling.

On the trained shapes model (issue 19; any Flux-family folder works): every held-out
prompt of `ditmesh.shapes.HELD_OUT` (or the first `--prompts`) is encoded by the encoder
stage's own code, denoised by each layout (one process, or a gang of processes as the
denoiser stage runs it) and decoded by the VAE stage's decoder; `ditmesh.eval` scores
each picture against its prompt. The first layout is the reference (exact sampling on
one process, `single` by default): each other layout's row gives its score, its drop in
points against the reference, and the relative L2 error of its latents against the
reference's. Exact layouts must score the same as the reference (their latents differ
by float rounding only); approximate ones (PipeFusion's stale keys and values, later
caching and FP8) show what they cost.

A layout is a base (single, u2, r2, u2r2, u4, cfg2, dp2, pf2, pf4, cfg2pf2, pf2u2), an
optional PipeFusion warm-up (`w2`: two whole-image steps before patches; default 1) and
speed-ups (`+compile`, `+graphs`), e.g. `pf2w2`, `u2+compile`.

    python bench/quality.py --model models/shapes --layouts single,u2,pf2,pf2w2 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import numpy as np
import torch

from ditmesh.common.models import load_class, pick_device, pick_dtype, resolve_model
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.mesh import ParallelConfig
from ditmesh.denoiser.speed import Speedups

BASES = {
    "single": {},
    "u2": dict(ulysses=2),
    "r2": dict(ring=2),
    "u2r2": dict(ulysses=2, ring=2),
    "u4": dict(ulysses=4),
    "cfg2": dict(cfg=2),
    "dp2": dict(dp=2),
    "pf2": dict(pipefusion=2),
    "pf4": dict(pipefusion=4),
    "cfg2pf2": dict(cfg=2, pipefusion=2),
    "pf2u2": dict(pipefusion=2, ulysses=2),
}
OPTIONS = {"compile": dict(compile=True), "graphs": dict(cuda_graphs=True)}
ATTRIBUTES = ("count", "background", "colour", "shape", "size", "position")


def parse_layout(name: str) -> tuple[ParallelConfig, Speedups]:
    """`pf2w2+compile` -> (pipefusion 2 with 2 warm-up steps, compiled)."""
    base, *opts = name.split("+")
    m = re.fullmatch(r"([a-z0-9]+?)(?:w(\d+))?", base)
    if m is None or m.group(1) not in BASES:
        raise SystemExit(f"unknown layout {name!r}; bases: {', '.join(BASES)}")
    dims = dict(BASES[m.group(1)])
    if m.group(2):
        dims["pipefusion_warmup"] = int(m.group(2))
    unknown = [o for o in opts if o not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown speed-up {unknown[0]!r}; known: {', '.join(OPTIONS)}")
    speed: dict = {}
    for o in opts:
        speed.update(OPTIONS[o])
    return ParallelConfig(**dims), Speedups(**speed)


def make_runner(model_dir: str, name: str, device: str, dtype: str):
    from ditmesh.denoiser.gang import GangRunner
    from ditmesh.denoiser.runner import LocalRunner

    parallel, speed = parse_layout(name)
    if parallel.world_size == 1:
        return parallel, LocalRunner(resolve_model(model_dir), device, dtype, speed=speed)
    return parallel, GangRunner.of(model_dir, parallel, device=device, dtype=dtype, speed=speed)


def main() -> None:
    from ditmesh.eval import score, summarise
    from ditmesh.shapes import HELD_OUT
    from ditmesh.vae.decoder import VaeDecoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--layouts", default="single,u2,pf2")
    ap.add_argument("--prompts", type=int, default=len(HELD_OUT), help="the first N held out")
    ap.add_argument("--images", type=int, default=1, help="per prompt (dp layouts split them)")
    ap.add_argument("--steps", type=int, default=0, help="0: the model's default")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--true-cfg", type=float, default=1.0, help="> 1: CFG against ''")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    model = resolve_model(args.model)
    dev = pick_device(args.device)
    dt = pick_dtype(args.dtype, dev)
    prompts = list(HELD_OUT[: args.prompts])
    encoder = load_class(model.family.text_encoder)(model, dev, dt)
    conds = []
    for p in prompts:
        cond = {k: v.cpu() for k, v in encoder.encode(p).items()}
        if args.true_cfg > 1:
            cond.update({"negative_" + k: v.cpu() for k, v in encoder.encode("").items()})
        conds.append(cond)
    del encoder
    decoder = VaeDecoder(model, dev, dt)
    steps = args.steps or model.default_steps

    rows, reference = [], None
    for name in args.layouts.split(","):
        parallel, runner = make_runner(args.model, name, args.device, args.dtype)
        if args.images % parallel.dp:
            raise SystemExit(f"{name}: --images {args.images} does not split over dp {parallel.dp}")
        t0 = time.perf_counter()
        latents, scores = [], []
        for i, (prompt, cond) in enumerate(zip(prompts, conds, strict=True)):
            job = DenoiseJob(
                request_id=f"q{i}",
                height=args.size,
                width=args.size,
                steps=steps,
                guidance=model.default_guidance,
                true_cfg_scale=args.true_cfg,
                seed=1000 + i,
                num_images=args.images,
                cond=cond,
            )
            out = runner.run(job)
            latents.append(out)
            for pixels in decoder.decode(out):
                scores.append(score(pixels, prompt))
        seconds = time.perf_counter() - t0
        runner.close()
        summary = summarise(scores)
        row = dict(layout=name, steps=steps, seconds=round(seconds, 1), **summary)
        if reference is None:
            reference = (summary, latents)
        else:
            ref_summary, ref_latents = reference
            num = sum(float((a - b).norm() ** 2) for a, b in zip(latents, ref_latents, strict=True))
            den = sum(float(b.norm() ** 2) for b in ref_latents)
            row["latent_rel_l2"] = float(np.sqrt(num / den))
            row["drop_points"] = round(100 * (ref_summary["overall"] - summary["overall"]), 2)
        print("RESULT", json.dumps(row), flush=True)
        rows.append(row)
        with open(os.path.join(args.out, "quality.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    head = ["layout", "overall", "all correct", *ATTRIBUTES, "drop (points)", "latent rel L2"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["layout"], f"{r['overall']:.3f}", f"{r['all_correct']:.3f}"]
        cells += [f"{r[a]:.3f}" if a in r else "-" for a in ATTRIBUTES]
        cells += [
            str(r.get("drop_points", "-")),
            f"{r['latent_rel_l2']:.1e}" if "latent_rel_l2" in r else "-",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
