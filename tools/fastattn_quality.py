"""DiTFastAttn on the trained shapes model: calibrate a plan at each threshold on training
captions (never the held-out ones), sample the held-out prompts exactly and under each
plan, and score every picture with the yardstick (ditmesh.eval).

Each row: the threshold, the methods the plan chose (counts over steps x layers), the
attention computed (share of full attention, averaged over the prompts), the yardstick's
overall score and its drop in points against exact sampling, and the latents' relative
L2 error against exact sampling.

    python tools/fastattn_quality.py --model models/shapes --thresholds 0.05,0.1,0.2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random

import numpy as np
import torch

from ditmesh.common.models import load_class, pick_device, pick_dtype, resolve_model
from ditmesh.denoiser import fastattn
from ditmesh.denoiser.fastattn_calibrate import calibrate
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.mesh import single_process_mesh
from ditmesh.denoiser.runner import load_adapter
from ditmesh.denoiser.sampler import sample


def main() -> None:
    from ditmesh.eval import score, summarise
    from ditmesh.shapes import HELD_OUT, caption, training_scene
    from ditmesh.vae.decoder import VaeDecoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--thresholds", default="0.05,0.1,0.2")
    ap.add_argument("--window", type=float, default=0.125)
    ap.add_argument("--calibration-prompts", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=len(HELD_OUT), help="the first N held out")
    ap.add_argument("--steps", type=int, default=0, help="0: the model's default")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--true-cfg", type=float, default=1.0, help="> 1: CFG against ''")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--save-plans", default="", help="folder to write each plan to")
    args = ap.parse_args()

    if args.save_plans:
        os.makedirs(args.save_plans, exist_ok=True)  # before any work: a run is minutes long
    model = resolve_model(args.model)
    dev = pick_device(args.device)
    dt = pick_dtype(args.dtype, dev)
    steps = args.steps or model.default_steps
    rng = random.Random(12345)
    calibration = [caption(training_scene(rng)) for _ in range(args.calibration_prompts)]
    held_out = list(HELD_OUT[: args.prompts])
    encoder = load_class(model.family.text_encoder)(model, dev, dt)

    def job(i: int, prompt: str, seed: int) -> DenoiseJob:
        cond = {k: v.cpu() for k, v in encoder.encode(prompt).items()}
        if args.true_cfg > 1:
            cond.update({"negative_" + k: v.cpu() for k, v in encoder.encode("").items()})
        return DenoiseJob(
            request_id=f"fa{i}",
            height=args.size,
            width=args.size,
            steps=steps,
            guidance=model.default_guidance,
            true_cfg_scale=args.true_cfg,
            seed=seed,
            num_images=1,
            cond=cond,
        )

    cal_jobs = [job(i, p, 500 + i) for i, p in enumerate(calibration)]
    jobs = [job(i, p, 1000 + i) for i, p in enumerate(held_out)]  # bench/quality.py's seeds
    decoder = VaeDecoder(model, dev, dt)
    adapter = load_adapter(model, dev, args.dtype)

    def run(plan) -> tuple[dict, list[torch.Tensor], float]:
        state = None
        if plan is not None:
            state = fastattn.FastAttnState(plan)
            fastattn.install(adapter, state)
        latents, scores, fractions = [], [], []
        try:
            for j, prompt in zip(jobs, held_out, strict=True):
                out = sample(adapter, dataclasses.replace(j), single_process_mesh()).float().cpu()
                latents.append(out)
                fractions.append(1.0 if state is None else state.fraction())
                scores.extend(score(pixels, prompt) for pixels in decoder.decode(out))
        finally:
            if plan is not None:
                fastattn.uninstall(adapter)
        return summarise(scores), latents, float(np.mean(fractions))

    exact_summary, exact, _ = run(None)
    rows = [dict(threshold="exact", overall=exact_summary["overall"], attention=1.0)]
    print("RESULT", json.dumps(rows[0]), flush=True)
    for t in (float(x) for x in args.thresholds.split(",")):
        plan = calibrate(adapter, cal_jobs, t, args.window, calibration)
        if args.save_plans:
            plan.save(f"{args.save_plans}/fastattn_{t}.json")
        summary, latents, attention = run(plan)
        num = sum(float((a - b).norm() ** 2) for a, b in zip(latents, exact, strict=True))
        den = sum(float(b.norm() ** 2) for b in exact)
        row = dict(
            threshold=t,
            methods={m: plan.count(m) for m in fastattn.METHODS},
            attention=round(attention, 3),
            overall=summary["overall"],
            all_correct=summary["all_correct"],
            drop_points=round(100 * (exact_summary["overall"] - summary["overall"]), 2),
            latent_rel_l2=float(np.sqrt(num / den)),
        )
        print("RESULT", json.dumps(row), flush=True)
        rows.append(row)
    print(
        "\n| threshold | methods (step/window/cfg/full) | attention computed | overall | drop (points) | latent rel L2 |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        methods = (
            "/".join(str(r["methods"][m]) for m in fastattn.METHODS) if "methods" in r else "-"
        )
        drop = r.get("drop_points", "-")
        err = f"{r['latent_rel_l2']:.1e}" if "latent_rel_l2" in r else "-"
        print(
            f"| {r['threshold']} | {methods} | {r['attention']:.3f} | {r['overall']:.3f} | {drop} | {err} |"
        )


if __name__ == "__main__":
    main()
