"""Times the denoiser gang on GPUs and checks it against the single-GPU result.

For each layout: start a gang (GangRunner: NCCL, one process per GPU) on a
diffusers-format Flux folder, run one warm-up request, then time whole denoise
requests (job broadcast, the 28-step loop, gather of the latents to the host).
Conditioning is random tensors of the real shapes (T5 512 x 4096, CLIP pooled
768), like the peer scripts. Prints `RESULT {json}` per layout and a table.

    python bench/gang_gpu.py --model DIR --layouts single,u2,r2 --height 1024 --steps 28
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ditmesh.common.models import resolve_model
from ditmesh.denoiser.gang import GangRunner
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.mesh import ParallelConfig
from ditmesh.denoiser.runner import LocalRunner

LAYOUTS = {
    "single": {},
    "u2": dict(ulysses=2),
    "r2": dict(ring=2),
    "u4": dict(ulysses=4),
    "u2r2": dict(ulysses=2, ring=2),
    "r4": dict(ring=4),
    "cfg2": dict(cfg=2),
    "dp2": dict(dp=2),
}


def make_job(
    model_dir: str, height: int, steps: int, true_cfg: float = 1.0, num_images: int = 1
) -> DenoiseJob:
    from diffusers import FluxTransformer2DModel

    cfg = FluxTransformer2DModel.load_config(model_dir, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    cond = {
        "prompt_embeds": torch.randn(1, 512, cfg["joint_attention_dim"], generator=g).bfloat16(),
        "pooled_prompt_embeds": torch.randn(
            1, cfg["pooled_projection_dim"], generator=g
        ).bfloat16(),
    }
    if true_cfg > 1:
        cond["negative_prompt_embeds"] = torch.randn(
            1, 512, cfg["joint_attention_dim"], generator=g
        ).bfloat16()
        cond["negative_pooled_prompt_embeds"] = torch.randn(
            1, cfg["pooled_projection_dim"], generator=g
        ).bfloat16()
    return DenoiseJob(
        request_id="bench",
        height=height,
        width=height,
        steps=steps,
        guidance=3.5,
        true_cfg_scale=true_cfg,
        seed=1,
        num_images=num_images,
        cond=cond,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--layouts", default="single,u2")
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    results = []
    reference = None
    for name in args.layouts.split(","):
        base, *opts = name.split("+")
        graphs, compiled = "graphs" in opts, "compile" in opts
        degrees = LAYOUTS[base]
        parallel = ParallelConfig(**degrees)
        true_cfg = 2.0 if parallel.cfg == 2 else 1.0
        job = make_job(args.model, args.height, args.steps, true_cfg, num_images=parallel.dp)
        warm = make_job(args.model, args.height, 3, true_cfg, num_images=parallel.dp)
        t0 = time.perf_counter()
        if parallel.world_size == 1:
            runner = LocalRunner(
                resolve_model(args.model), "cuda", "bfloat16", cuda_graphs=graphs, compile=compiled
            )
        else:
            runner = GangRunner(
                args.model,
                parallel,
                device="cuda",
                dtype="bfloat16",
                cuda_graphs=graphs,
                compile=compiled,
            )
        load_s = time.perf_counter() - t0
        runner.run(warm)
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            latents = runner.run(job)
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / 2**30
        runner.close()
        del runner
        torch.cuda.empty_cache()
        row = dict(
            system="ditmesh",
            layout=name,
            gpus=parallel.world_size,
            H=args.height,
            steps=args.steps,
            sec=min(times),
            load_s=round(load_s, 1),
            peak_gib_rank0=round(peak, 1),
            true_cfg=true_cfg,
        )
        if name == "single":
            reference = latents[:1]
            torch.save(latents, os.path.join(args.out, "single.pt"))
        elif reference is not None and true_cfg == 1.0:
            got = latents[:1]
            row["rel_l2_vs_single"] = float((got - reference).norm() / reference.norm())
            row["max_abs_vs_single"] = float((got - reference).abs().max())
        print("RESULT", json.dumps(row), flush=True)
        results.append(row)
    with open(os.path.join(args.out, "ours.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n| layout | GPUs | seconds | rel L2 vs 1 GPU |")
    print("|---|---|---|---|")
    for r in results:
        print(
            f"| {r['layout']} | {r['gpus']} | {r['sec']:.2f} | {r.get('rel_l2_vs_single', '-')} |"
        )


if __name__ == "__main__":
    main()
