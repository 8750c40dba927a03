"""Times the denoiser gang on GPUs and checks it against the single-GPU result.

A layout is a base (single, u2, r2, u4, u2r2, r4, cfg2, dp2, pf2, pf4, cfg2pf2, pf2u2) with
optional speedups (PipeFusion runs eager only so far):
`+compile`, `+autotune` (compile in max-autotune-no-cudagraphs mode), `+graphs` (CUDA
graphs), `+fuse` (fused q/k/v), `+cudnn` / `+flash` (attention kernel first tried),
`+reorder` / `+schedule` (with compile: inductor's compute/communication overlap),
e.g. `u2+compile+graphs`.

For each layout: start a gang (GangRunner: NCCL, one process per GPU) on a
diffusers-format Flux folder, run one warm-up request, then time whole denoise
requests (job broadcast, the 28-step loop, gather of the latents to the host), then,
unless `--no-decode`, the VAE decode of those latents to uint8 pixels on GPU 0 (what the
VAE stage does for a request; the peer scripts also time their VAE decode and PIL
conversion). `sec` is the whole; `denoise_sec` and `decode_sec` its parts.
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
from ditmesh.denoiser.speed import Speedups

LAYOUTS = {
    "single": {},
    "u2": dict(ulysses=2),
    "r2": dict(ring=2),
    "u4": dict(ulysses=4),
    "u2r2": dict(ulysses=2, ring=2),
    "r4": dict(ring=4),
    "cfg2": dict(cfg=2),
    "dp2": dict(dp=2),
    "pf2": dict(pipefusion=2),
    "pf4": dict(pipefusion=4),
    "cfg2pf2": dict(cfg=2, pipefusion=2),
    "pf2u2": dict(pipefusion=2, ulysses=2),
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


OPTIONS = {
    "compile": dict(compile=True),
    "autotune": dict(compile=True, compile_mode="max-autotune-no-cudagraphs"),
    "graphs": dict(cuda_graphs=True),
    "fuse": dict(fuse_qkv=True),
    "cudnn": dict(attention="cudnn"),
    "flash": dict(attention="flash"),
    "reorder": dict(comm_overlap="reorder"),
    "schedule": dict(comm_overlap="schedule"),
}


def parse_layout(name: str) -> tuple[ParallelConfig, Speedups]:
    """`u2+compile+graphs` -> (ulysses 2, compile and CUDA graphs)."""
    base, *opts = name.split("+")
    speed: dict = {}
    for opt in opts:
        speed.update(OPTIONS[opt])
    return ParallelConfig(**LAYOUTS[base]), Speedups(**speed)


def profile(runner, job: DenoiseJob, path: str) -> dict:
    """One request under torch.profiler (rank 0): kernel table and how busy the GPU was."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        runner.run(job)
        wall = time.perf_counter() - t
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e6
    nccl = sum(e.device_time for e in kernels if "nccl" in e.name.lower()) / 1e6
    # From the first kernel's start to the last one's end: wall - span is host time before
    # and after the GPU work (prepare, copy back); span - busy is the GPU waiting inside.
    span = 0.0
    if kernels:
        span = (
            max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
        ) / 1e6
    with open(path, "w") as f:
        f.write(
            f"wall {wall:.3f} s, GPU span {span:.3f} s, kernel time {busy:.3f} s (nccl {nccl:.3f} s)\n"
        )
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    return dict(
        profile_wall_s=round(wall, 3),
        gpu_span_s=round(span, 3),
        kernel_s=round(busy, 3),
        nccl_s=round(nccl, 3),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--layouts", default="single,u2")
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also profile one 4-step request")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument(
        "--no-decode", dest="decode", action="store_false", help="time the denoiser alone"
    )
    args = ap.parse_args()

    vae = None
    if args.decode:
        from ditmesh.vae.decoder import VaeDecoder

        vae = VaeDecoder(resolve_model(args.model), torch.device("cuda", 0), torch.bfloat16)

    results = []
    ref_path = os.path.join(args.out, f"single-{args.height}.pt")
    for name in args.layouts.split(","):
        parallel, speed = parse_layout(name)
        true_cfg = 2.0 if parallel.cfg == 2 else 1.0
        job = make_job(args.model, args.height, args.steps, true_cfg, num_images=parallel.dp)
        warm = make_job(args.model, args.height, 3, true_cfg, num_images=parallel.dp)
        t0 = time.perf_counter()
        if parallel.world_size == 1:
            runner = LocalRunner(resolve_model(args.model), "cuda", "bfloat16", speed=speed)
        else:
            runner = GangRunner.of(
                args.model, parallel, device="cuda", dtype="bfloat16", speed=speed
            )
        load_s = time.perf_counter() - t0
        latents = runner.run(warm)
        if vae is not None:
            vae.decode(latents)
        times, parts = [], []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            latents = runner.run(job)
            t_denoise = time.perf_counter() - t
            if vae is not None:
                vae.decode(latents)  # returns host uint8 pixels: synchronised
            times.append(time.perf_counter() - t)
            parts.append((t_denoise, times[-1] - t_denoise))
        best = min(range(len(times)), key=times.__getitem__)
        peak = torch.cuda.max_memory_allocated() / 2**30
        row = dict(
            system="ditmesh",
            layout=name,
            gpus=parallel.world_size,
            H=args.height,
            steps=args.steps,
            sec=times[best],
            denoise_sec=round(parts[best][0], 3),
            decode_sec=round(parts[best][1], 3) if vae is not None else None,
            all_sec=[round(x, 3) for x in times],
            load_s=round(load_s, 1),
            peak_gib_rank0=round(peak, 1),
            true_cfg=true_cfg,
            speed=speed.describe(),
            card=torch.cuda.get_device_name(),
        )
        if args.profile:
            short = make_job(args.model, args.height, 4, true_cfg, num_images=parallel.dp)
            safe = name.replace("+", "_")
            row.update(profile(runner, short, os.path.join(args.out, f"profile-{safe}.txt")))
        if name == "single" and true_cfg == 1.0:
            torch.save(latents, ref_path)
        elif os.path.exists(ref_path) and true_cfg == 1.0:
            reference = torch.load(ref_path)[:1]
            got = latents[:1]
            row["rel_l2_vs_single"] = float((got - reference).norm() / reference.norm())
            row["max_abs_vs_single"] = float((got - reference).abs().max())
        print("RESULT", json.dumps(row), flush=True)
        results.append(row)
        with open(os.path.join(args.out, "ours.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        t = time.perf_counter()
        runner.close()
        print(f"closed in {time.perf_counter() - t:.1f} s", flush=True)
        del runner
        torch.cuda.empty_cache()
    print("\n| layout | GPUs | seconds | rel L2 vs 1 GPU |")
    print("|---|---|---|---|")
    for r in results:
        print(
            f"| {r['layout']} | {r['gpus']} | {r['sec']:.2f} | {r.get('rel_l2_vs_single', '-')} |"
        )


if __name__ == "__main__":
    main()
