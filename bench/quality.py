"""Scores sampling layouts and speed-ups with the yardstick against exact one-process sampling.

On the trained shapes model (issue 19; any Flux-family folder works): every held-out
prompt of `ditmesh.shapes.HELD_OUT` (or the first `--prompts`) is encoded by the encoder
stage's own code, denoised by each layout (one process, or a gang of processes as the
denoiser stage runs it) and decoded by the VAE stage's decoder; `ditmesh.eval` scores
each picture against its prompt. The first layout is the reference (exact sampling on
one process, `single` by default): each other layout's row gives its score, its drop in
points against the reference, and the relative L2 error of its latents against the
reference's. Exact layouts must score the same as the reference (their latents differ
by float rounding only); approximate ones (PipeFusion's stale keys and values, step
caching, FP8) show what they cost.

A layout is a base (single, u2, r2, u2r2, u4, cfg2, dp2, pf2, pf4, cfg2pf2, pf2u2), an
optional PipeFusion warm-up (`w0`: patches from the first step; `w2`: two whole-image
steps before patches; default 1) and speed-ups: `+compile`, `+graphs`, `+fp8` (FP8 GEMMs
in the blocks; on CPU the emulation, DITMESH_FP8_CPU=1 is set for it) and `+cacheT`
(step caching at threshold T, e.g. `+cache0.1`: the row's `skipped` is the fraction of
steps whose later blocks were skipped), e.g. `pf2w0`, `u2+compile`, `single+cache0.2`.

    python bench/quality.py --model models/shapes --layouts single,u2,pf2,pf2w0 --device cpu \
        --threads 1

CFG parallel splits the two CFG branches; without CFG both halves compute the same
branch, so score cfg2 with `--true-cfg 2` (every layout of that run, the reference too,
then samples with CFG against the empty prompt).

`tests/test_shapes_quality.py` loads this file for its pieces (`parse_layout`,
`make_runner`, `encode`, `run_layout`, `compare`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass

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
OPTIONS = {"compile": dict(compile=True), "graphs": dict(cuda_graphs=True), "fp8": dict(fp8=True)}
ATTRIBUTES = ("count", "background", "colour", "shape", "size", "position")


@dataclass(frozen=True)
class Layout:
    """A row of the table: where the steps run, with which speed-ups."""

    name: str
    parallel: ParallelConfig
    speed: Speedups
    cache_threshold: float = 0.0
    """Step caching's threshold on every request (0: off)."""


def parse_layout(name: str) -> Layout:
    """`pf2w0+compile` -> pipefusion 2 with no warm-up step, compiled; `single+cache0.1`."""
    base, *opts = name.split("+")
    m = re.fullmatch(r"([a-z0-9]+?)(?:w(\d+))?", base)
    if m is None or m.group(1) not in BASES:
        raise SystemExit(f"unknown layout {name!r}; bases: {', '.join(BASES)}")
    dims = dict(BASES[m.group(1)])
    if m.group(2):
        dims["pipefusion_warmup"] = int(m.group(2))
    speed: dict = {}
    cache = 0.0
    for o in opts:
        if (c := re.fullmatch(r"cache(\d*\.?\d+)", o)) is not None:
            cache = float(c.group(1))
        elif o in OPTIONS:
            speed.update(OPTIONS[o])
        else:
            raise SystemExit(f"unknown speed-up {o!r}; known: {', '.join(OPTIONS)}, cacheT")
    return Layout(name, ParallelConfig(**dims), Speedups(**speed), cache)


def make_runner(model_dir: str, layout: Layout, device: str, dtype: str):
    """A LocalRunner for one process, else a GangRunner (spawned workers, as the stage)."""
    from ditmesh.denoiser.fp8 import CPU_ENV
    from ditmesh.denoiser.gang import GangRunner
    from ditmesh.denoiser.runner import LocalRunner

    if layout.speed.fp8 and pick_device(device).type == "cpu":
        os.environ[CPU_ENV] = "1"  # the emulation: the bench measures quality, not speed
    if layout.parallel.world_size == 1:
        return LocalRunner(resolve_model(model_dir), device, dtype, speed=layout.speed)
    return GangRunner.of(model_dir, layout.parallel, device=device, dtype=dtype, speed=layout.speed)


def encode(model, device, dtype, prompts, true_cfg: float = 1.0) -> list[dict]:
    """Each prompt's conditioning as the encoder stage makes it (CPU tensors); with
    true CFG > 1 also the empty prompt's, as the negative."""
    encoder = load_class(model.family.text_encoder)(model, device, dtype)
    conds = []
    for p in prompts:
        cond = {k: v.cpu() for k, v in encoder.encode(p).items()}
        if true_cfg > 1:
            cond.update({"negative_" + k: v.cpu() for k, v in encoder.encode("").items()})
        conds.append(cond)
    return conds


def run_layout(
    runner, layout: Layout, model, conds, *, steps, size=128, true_cfg=1.0, images=1, seeds=None
) -> tuple[list[torch.Tensor], float]:
    """Each prompt's latents through `runner` (prompt i with `seeds[i]`, by default
    1000 + i: held-out prompt i's seed), and the fraction of steps step caching skipped."""
    seeds = seeds or [1000 + i for i in range(len(conds))]
    if images % layout.parallel.dp:
        raise SystemExit(f"{layout.name}: --images {images} does not split over dp")
    latents, skipped = [], 0
    for i, cond in enumerate(conds):
        job = DenoiseJob(
            request_id=f"q{i}",
            height=size,
            width=size,
            steps=steps,
            guidance=model.default_guidance,
            true_cfg_scale=true_cfg,
            seed=seeds[i],
            num_images=images,
            cond=cond,
            cache_threshold=layout.cache_threshold,
        )
        latents.append(runner.run(job))
        skipped += job.cached_steps
    return latents, skipped / (steps * len(conds))


def score_latents(decoder, latents, prompts) -> dict[str, float]:
    """The yardstick's summary of the decoded pictures (each latents' images, its prompt)."""
    from ditmesh.eval import score, summarise

    scores = []
    for out, prompt in zip(latents, prompts, strict=True):
        for pixels in decoder.decode(out):
            scores.append(score(pixels, prompt))
    return summarise(scores)


def compare(summary, latents, ref_summary, ref_latents) -> dict[str, float]:
    """Drop in points of `overall` and the latents' relative L2 error, against the reference."""
    num = sum(float((a - b).norm() ** 2) for a, b in zip(latents, ref_latents, strict=True))
    den = sum(float(b.norm() ** 2) for b in ref_latents)
    return dict(
        latent_rel_l2=float(np.sqrt(num / den)),
        drop_points=round(100 * (ref_summary["overall"] - summary["overall"]), 2),
    )


def main() -> None:
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
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of each process (0: torch's default); gang workers inherit it. "
        "On a shared CPU 1 is far faster: busy threads waiting on each other",
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)  # before any work: a run is minutes long
    if args.threads:
        # The environment for the gang's workers (spawned interpreters read it at start).
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)

    model = resolve_model(args.model)
    dev = pick_device(args.device)
    dt = pick_dtype(args.dtype, dev)
    prompts = list(HELD_OUT[: args.prompts])
    conds = encode(model, dev, dt, prompts, args.true_cfg)
    decoder = VaeDecoder(model, dev, dt)
    steps = args.steps or model.default_steps
    layouts = [parse_layout(n) for n in args.layouts.split(",")]

    rows, reference = [], None
    for layout in layouts:
        runner = make_runner(args.model, layout, args.device, args.dtype)
        t0 = time.perf_counter()
        latents, skipped = run_layout(
            runner,
            layout,
            model,
            conds,
            steps=steps,
            size=args.size,
            true_cfg=args.true_cfg,
            images=args.images,
        )
        summary = score_latents(decoder, latents, prompts)
        seconds = time.perf_counter() - t0
        runner.close()
        row = dict(
            layout=layout.name,
            steps=steps,
            true_cfg=args.true_cfg,
            seconds=round(seconds, 1),
            skipped=round(skipped, 3),
            **summary,
        )
        if reference is None:
            reference = (summary, latents)
        else:
            row.update(compare(summary, latents, *reference))
        print("RESULT", json.dumps(row), flush=True)
        rows.append(row)
        with open(os.path.join(args.out, "quality.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    head = ["layout", "overall", "all correct", *ATTRIBUTES, "drop (points)", "latent rel L2"]
    head.append("skipped steps")
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["layout"], f"{r['overall']:.3f}", f"{r['all_correct']:.3f}"]
        cells += [f"{r[a]:.3f}" if a in r else "-" for a in ATTRIBUTES]
        cells += [
            str(r.get("drop_points", "-")),
            f"{r['latent_rel_l2']:.1e}" if "latent_rel_l2" in r else "-",
            f"{r['skipped']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
