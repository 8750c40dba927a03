"""Times the denoiser gang on GPUs and checks it against the single-GPU result.

A layout is a base (single, u2, r2, u4, u2r2, r4, cfg2, dp2, pf2, pf4, cfg2pf2, pf2u2) with
optional speedups (PipeFusion runs eager only so far):
`+compile`, `+autotune` (compile in max-autotune-no-cudagraphs mode), `+graphs` (CUDA
graphs), `+fuse` (fused q/k/v), `+cudnn` / `+flash` (attention kernel first tried),
`+reorder` / `+schedule` (with compile: inductor's compute/communication overlap),
`+fp8` (the blocks' GEMMs in FP8, services/denoiser/fp8.py), e.g. `u2+compile+graphs`.
Issue 21's Ulysses exchange options (ParallelConfig fields; `exchange_option`): `+chunksC`
(--ulysses-chunks C: q and the attention output cross in C chunks of each rank's heads,
each under another chunk's attention), `+fp8comm` (--ulysses-fp8: the exchange in FP8,
approximate; on CPU with DITMESH_FP8_CPU=1), e.g. `u4+compile+graphs+chunks2+fp8comm`.

Issue 20's approximate speed-ups (refused with `+graphs`, as the service refuses them):
- `+cacheT` (e.g. `+cache0.1`): step caching at threshold T, decided by the probe. On
  random weights the probe never says skip, so this row shows the probe's cost alone.
- `+skipI_J_K`: step caching with steps I, J, K (0-based) forced to skip whatever the
  probe says (step_cache.FORCE_ENV, bench only); the probe and the replay still run.
- `+shapescacheT`: the skip pattern that step caching at threshold T makes on the trained
  shapes model (`--shapes`, float32 on `--shapes-device`, 128 px, the first
  `--shapes-prompts` held-out prompts with bench/quality.py's seeds), forced as `+skip`
  does: the real-size model timed under the same skipped steps. The pattern forced is one
  whose count of skipped steps is the median over the prompts (the most common such
  pattern); the row says which, and the mean fraction. Measured once per (T, steps),
  kept in `--out`.
- `+shapesfaT`: DiTFastAttn with the plan calibrated on the shapes model at threshold T
  (tools/fastattn_quality.py's recipe: 4 training captions, CPU, float32, 128 px, window
  0.125) and mapped onto this model: each double block's attention takes the method of
  the shapes double block at the same relative depth, each single block likewise, step
  by step (same step count, same window fraction of the image tokens). Kept in `--out`.
- `+fastattn`: DiTFastAttn with the plan file `--fast-attn-plan` (for this model).
Each row then also says how many steps were skipped and the share of attention computed.

For each layout: start a gang (GangRunner: NCCL, one process per GPU) on a
diffusers-format Flux folder, run one warm-up request, then time whole denoise
requests (job broadcast, the 28-step loop, gather of the latents to the host), then,
unless `--no-decode`, the VAE decode of those latents to uint8 pixels on GPU 0 (what the
VAE stage does for a request; the peer scripts also time their VAE decode and PIL
conversion). `sec` is the whole; `denoise_sec` and `decode_sec` its parts.
Conditioning is random tensors of the real shapes (T5 512 x 4096, CLIP pooled
768), like the peer scripts. Prints `RESULT {json}` per layout and a table.

    python bench/gang_gpu.py --model DIR --layouts single,u2,r2 --height 1024 --steps 28
    python bench/gang_gpu.py --model DIR --layouts single,single+compile+fp8+shapescache0.1
    OMP_NUM_THREADS=1 python bench/gang_gpu.py --model TINY --device cpu --dtype float32 \
        --height 64 --layouts single,single+shapesfa0.1    # a smoke run of the options

The warm-up request is 3 steps (with the row's cache threshold and forced steps); with a
DiTFastAttn plan it is a whole request (a plan runs only at its own step count), so no
compile of its kernels lands in a timed one.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch

from ditmesh.common.models import resolve_model
from ditmesh.denoiser import step_cache
from ditmesh.denoiser.gang import GangRunner
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.mesh import ParallelConfig, ParallelConfigError
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
    "fp8": dict(fp8=True),
}
NUMBER = r"(\d*\.?\d+)"
FORCED_THRESHOLD = 1.0
"""The threshold a forced pattern runs with: any value > 0 turns the cache on; the forced
steps, not the threshold, decide."""


@dataclass
class Layout:
    """One row: where it runs, its speed-ups and what each request asks for."""

    name: str
    parallel: ParallelConfig
    speed: dict
    """Speedups' fields (fast_attn filled in by `resolve` where a plan is to be made)."""
    cache_threshold: float = 0.0
    skip: tuple[int, ...] | None = None
    """Steps forced to skip (step_cache.FORCE_ENV); None: the probe decides."""
    shapes_cache: float | None = None
    shapes_fastattn: float | None = None
    fastattn_file: bool = False
    notes: dict = field(default_factory=dict)
    """What the row reports about where its pattern or plan came from."""


def exchange_option(opt: str) -> dict | None:
    """Issue 21's options of the Ulysses exchange as ParallelConfig fields (`+chunksC`,
    `+fp8comm`), or None where `opt` is not one of them. Checked against the base layout
    (Ulysses alone) at once; against the model's heads when the gang starts."""
    if m := re.fullmatch(r"chunks(\d+)", opt):
        return dict(ulysses_chunks=int(m.group(1)))
    if opt == "fp8comm":
        return dict(ulysses_fp8=True)
    return None


def parse_layout(name: str) -> Layout:
    """`u2+compile+graphs` -> ulysses 2, compile and CUDA graphs; `single+compile+skip3_5`."""
    base, *opts = name.split("+")
    if base not in LAYOUTS:
        raise SystemExit(f"{name}: unknown base {base!r}; one of {', '.join(LAYOUTS)}")
    layout = Layout(name, ParallelConfig(**LAYOUTS[base]), {})
    caches = 0
    for opt in opts:
        if opt in OPTIONS:
            layout.speed.update(OPTIONS[opt])
        elif m := re.fullmatch("cache" + NUMBER, opt):
            layout.cache_threshold, caches = float(m.group(1)), caches + 1
        elif m := re.fullmatch(r"skip(\d+(?:_\d+)*)", opt):
            layout.skip = tuple(sorted({int(x) for x in m.group(1).split("_")}))
            layout.cache_threshold, caches = FORCED_THRESHOLD, caches + 1
        elif m := re.fullmatch("shapescache" + NUMBER, opt):
            layout.shapes_cache, caches = float(m.group(1)), caches + 1
        elif m := re.fullmatch("shapesfa" + NUMBER, opt):
            layout.shapes_fastattn = float(m.group(1))
        elif opt == "fastattn":
            layout.fastattn_file = True
        elif (exchange := exchange_option(opt)) is not None:
            try:
                layout.parallel = dataclasses.replace(layout.parallel, **exchange)
            except ParallelConfigError as exc:
                raise SystemExit(f"{name}: {exc}") from None
        else:
            raise SystemExit(
                f"{name}: unknown option {opt!r}; known: {', '.join(OPTIONS)}, cacheT, "
                "skipI_J, shapescacheT, shapesfaT, fastattn, chunksC, fp8comm"
            )
    cached = caches > 0
    fast = layout.shapes_fastattn is not None or layout.fastattn_file
    if caches > 1:
        raise SystemExit(f"{name}: one of cacheT, skip..., shapescacheT at most")
    if cached and layout.speed.get("cuda_graphs"):
        raise SystemExit(
            f"{name}: step caching is refused with +graphs (a captured forward cannot skip "
            "blocks); time it with +compile alone"
        )
    if fast and layout.speed.get("cuda_graphs"):
        raise SystemExit(f"{name}: DiTFastAttn is refused with +graphs; use +compile alone")
    if fast and cached:
        raise SystemExit(
            f"{name}: DiTFastAttn and step caching do not compose (the service refuses step "
            "caching on a --fast-attn denoiser: both count the transformer's calls per step)"
        )
    if fast and (layout.shapes_fastattn is not None) == layout.fastattn_file:
        raise SystemExit(f"{name}: shapesfaT or fastattn, not both")
    if layout.parallel.pipefusion > 1 and cached:
        raise SystemExit(f"{name}: step caching does not run under PipeFusion")
    return layout


# ------------------------------------------------------------ from the trained shapes model


def _shapes_jobs(model, device, prompts: list[str], seeds: list[int], steps: int, threshold):
    """DenoiseJobs for `prompts` on the shapes model, encoded by the encoder stage's code
    in float32, at 128 px (its training size), as bench/quality.py runs them."""
    from ditmesh.common.models import load_class

    encoder = load_class(model.family.text_encoder)(model, torch.device(device), torch.float32)
    return [
        DenoiseJob(
            request_id=f"shapes-{i}",
            height=128,
            width=128,
            steps=steps,
            guidance=model.default_guidance,
            true_cfg_scale=1.0,
            seed=seed,
            num_images=1,
            cond={k: v.cpu() for k, v in encoder.encode(p).items()},
            cache_threshold=threshold,
        )
        for i, (p, seed) in enumerate(zip(prompts, seeds, strict=True))
    ]


@contextlib.contextmanager
def one_thread():
    """The tiny shapes model on a CPU: one thread (many only wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pick_pattern(patterns: list[list[bool]]) -> list[bool]:
    """A pattern whose count of skipped steps is the median over the prompts (the upper
    median), the most common such pattern (ties: the first seen)."""
    counts = sorted(sum(p) for p in patterns)
    median = counts[len(counts) // 2]
    same = [tuple(p) for p in patterns if sum(p) == median]
    return list(collections.Counter(same).most_common(1)[0][0])


def shapes_skip_pattern(shapes_dir, device, threshold: float, steps: int, prompts: int, out: str):
    """(forced steps, notes): the skip pattern of step caching at `threshold` on the shapes
    model's held-out prompts (bench/quality.py's seeds 1000 + i); cached in `out`."""
    path = os.path.join(out, f"shapes-skips-{threshold}-{steps}.json")
    if os.path.exists(path):
        with open(path) as f:
            found = json.load(f)
        return tuple(found["skip"]), found["notes"]
    from ditmesh.shapes import HELD_OUT

    model = resolve_model(shapes_dir)
    held_out = list(HELD_OUT[:prompts])
    t = time.perf_counter()
    seeds = [1000 + i for i in range(len(held_out))]
    with one_thread() if device == "cpu" else contextlib.nullcontext():
        jobs = _shapes_jobs(model, device, held_out, seeds, steps, threshold)
        runner = LocalRunner(model, device, "float32")
        patterns = []
        for job in jobs:
            seen: list[int] = []
            # The loop sets job.cached_steps (skipped so far) before each step's callback.
            runner.run(job, on_step=lambda i, n, job=job, seen=seen: seen.append(job.cached_steps))
            patterns.append([b > a for a, b in zip([0, *seen], seen, strict=False)])
    pattern = pick_pattern(patterns)
    skip = tuple(i for i, skipped in enumerate(pattern) if skipped)
    counts = [sum(p) for p in patterns]
    notes = dict(
        skip_source=f"{shapes_dir} at threshold {threshold}, {len(patterns)} held-out prompts "
        f"({device}, float32)",
        shapes_skipped_mean=round(sum(counts) / (len(counts) * steps), 4),
        shapes_skipped_min_max=[min(counts), max(counts)],
        shapes_measure_s=round(time.perf_counter() - t, 1),
    )
    with open(path, "w") as f:
        json.dump(dict(skip=skip, notes=notes, patterns=patterns), f)
    return skip, notes


def map_plan(plan, config: dict):
    """The shapes model's DiTFastAttn plan mapped onto a Flux transformer of `config`: per
    step, each block list's attention layers take the method of the source layer at the
    same relative depth in the same list (double blocks from double, single from single)."""
    from ditmesh.denoiser.fastattn_plan import FastAttnPlan

    sizes = {
        "transformer_blocks": config["num_layers"],
        "single_transformer_blocks": config["num_single_layers"],
    }
    source: dict[str, list[int]] = {name: [] for name in sizes}
    for i, layer in enumerate(plan.layers):
        source[layer.split(".")[0]].append(i)
    if any(not source[name] for name in sizes if sizes[name]):
        raise SystemExit(f"the source plan lacks a block list: {sorted(source)}")
    layers, picks = [], []
    for name, n in sizes.items():
        src = source[name]
        for j in range(n):
            layers.append(f"{name}.{j}.attn")
            picks.append(src[math.floor(j * len(src) / n)])
    methods = [[row[k] for k in picks] for row in plan.methods]
    return FastAttnPlan(
        steps=plan.steps,
        layers=layers,
        window=plan.window,
        methods=methods,
        threshold=plan.threshold,
        prompts=plan.prompts,
        model=f"{plan.model} mapped by bench/gang_gpu.py",
    )


def shapes_fastattn_plan(shapes_dir, threshold: float, steps: int, model_dir, out: str):
    """(plan path for `model_dir`, notes): calibrated on the shapes model as
    tools/fastattn_quality.py calibrates (CPU, float32: the plan its yardstick rows
    score; seconds on one thread), then mapped; both plans kept in `out`."""
    import random

    from diffusers import FluxTransformer2DModel

    from ditmesh.denoiser.fastattn import METHODS
    from ditmesh.denoiser.fastattn_calibrate import calibrate
    from ditmesh.denoiser.fastattn_plan import FastAttnPlan
    from ditmesh.denoiser.runner import load_adapter
    from ditmesh.shapes import caption, training_scene

    src_path = os.path.join(out, f"fastattn-shapes-{threshold}-{steps}.json")
    config = FluxTransformer2DModel.load_config(model_dir, subfolder="transformer")
    path = os.path.join(
        out,
        f"fastattn-{config['num_layers']}x{config['num_single_layers']}-{threshold}-{steps}.json",
    )
    t = time.perf_counter()
    if os.path.exists(src_path):
        plan = FastAttnPlan.load(src_path)
    else:
        model = resolve_model(shapes_dir)
        rng = random.Random(12345)
        prompts = [caption(training_scene(rng)) for _ in range(4)]
        with one_thread():
            jobs = _shapes_jobs(model, "cpu", prompts, [500 + i for i in range(4)], steps, 0.0)
            adapter = load_adapter(model, torch.device("cpu"), "float32")
            plan = calibrate(adapter, jobs, threshold, 0.125, prompts)
        plan.save(src_path)
    mapped = map_plan(plan, config)
    mapped.save(path)
    share = {m: round(mapped.count(m) / (mapped.steps * len(mapped.layers)), 3) for m in METHODS}
    notes = dict(
        fastattn_source=f"{shapes_dir} calibrated at threshold {threshold} (cpu, float32), "
        "mapped by depth",
        fastattn_shapes_methods={m: plan.count(m) for m in METHODS},
        fastattn_methods_share=share,
        fastattn_prepare_s=round(time.perf_counter() - t, 1),
    )
    return path, notes


def shapes_device(args) -> str:
    """Where the shapes model's skip patterns are measured (float32): the bench's device
    unless --shapes-device. On a GPU 50 prompts take seconds, on one CPU thread about a
    minute; the decisions are the CPU's (bench/quality.py) unless a probe's relative
    change lands within float32 rounding of the threshold."""
    return args.shapes_device or args.device


def resolve(layout: Layout, args) -> Speedups:
    """Measures what a layout takes from the shapes model; the Speedups it runs with."""
    if layout.shapes_cache is not None:
        layout.skip, notes = shapes_skip_pattern(
            args.shapes,
            shapes_device(args),
            layout.shapes_cache,
            args.steps,
            args.shapes_prompts,
            args.out,
        )
        layout.notes.update(notes)
        layout.cache_threshold = FORCED_THRESHOLD
        if not layout.skip:
            raise SystemExit(f"{layout.name}: the shapes model skipped no step at this threshold")
    if layout.skip is not None and layout.skip[-1] >= args.steps:
        raise SystemExit(f"{layout.name}: step {layout.skip[-1]} is past the {args.steps} steps")
    if layout.shapes_fastattn is not None:
        path, notes = shapes_fastattn_plan(
            args.shapes,
            layout.shapes_fastattn,
            args.steps,
            args.model,
            args.out,
        )
        layout.speed["fast_attn"] = path
        layout.notes.update(notes)
    elif layout.fastattn_file:
        if not args.fast_attn_plan:
            raise SystemExit(f"{layout.name}: +fastattn needs --fast-attn-plan")
        layout.speed["fast_attn"] = args.fast_attn_plan
    # Set before the runner starts: gang workers inherit it; a layout without it unsets it.
    os.environ.pop(step_cache.FORCE_ENV, None)
    if layout.skip is not None:
        os.environ[step_cache.FORCE_ENV] = ",".join(str(i) for i in layout.skip)
    if layout.speed.get("fp8") and args.device == "cpu":
        from ditmesh.denoiser.fp8 import CPU_ENV

        os.environ[CPU_ENV] = "1"  # the emulation: a smoke run of the options on CPU
    return Speedups(**layout.speed)


def _union(intervals) -> list[list[float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def nccl_alone_s(kernels) -> float:
    """Seconds in which an NCCL kernel ran on this GPU and no other kernel did (issue 21):
    the part of the exchange compute did not hide, where `nccl_s` counts NCCL kernels
    whole, hidden or not. Profiler events, times in microseconds."""

    def spans(want_nccl: bool):
        return _union(
            (e.time_range.start, e.time_range.end)
            for e in kernels
            if ("nccl" in e.name.lower()) == want_nccl
        )

    other, alone, j = spans(False), 0.0, 0
    for start, end in spans(True):
        alone += end - start
        while j < len(other) and other[j][1] <= start:
            j += 1
        k = j
        while k < len(other) and other[k][0] < end:
            alone -= min(end, other[k][1]) - max(start, other[k][0])
            k += 1
    return alone / 1e6


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
    alone = nccl_alone_s(kernels)
    with open(path, "w") as f:
        f.write(
            f"wall {wall:.3f} s, GPU span {span:.3f} s, kernel time {busy:.3f} s (nccl {nccl:.3f} s"
            f", of which {alone:.3f} s with no other kernel running)\n"
        )
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    return dict(
        profile_wall_s=round(wall, 3),
        gpu_span_s=round(span, 3),
        kernel_s=round(busy, 3),
        nccl_s=round(nccl, 3),
        nccl_alone_s=round(alone, 3),
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
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the options only")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shapes", default="models/shapes", help="the trained model (+shapes...)")
    ap.add_argument(
        "--shapes-prompts", type=int, default=50, help="held-out prompts (+shapescache)"
    )
    ap.add_argument("--fast-attn-plan", default="", help="a DiTFastAttn plan (+fastattn)")
    ap.add_argument("--shapes-device", default="", help="skip patterns; default: --device")
    args = ap.parse_args()
    layouts = [parse_layout(name) for name in args.layouts.split(",")]  # all checked first
    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    vae = None
    if args.decode:
        from ditmesh.vae.decoder import VaeDecoder

        vae_device = torch.device("cuda", 0) if cuda else torch.device(args.device)
        vae = VaeDecoder(resolve_model(args.model), vae_device, dtype)

    results = []
    ref_path = os.path.join(args.out, f"single-{args.height}.pt")
    for layout in layouts:
        name, parallel = layout.name, layout.parallel
        speed = resolve(layout, args)
        true_cfg = 2.0 if parallel.cfg == 2 else 1.0
        job = make_job(args.model, args.height, args.steps, true_cfg, num_images=parallel.dp)
        job.cache_threshold = layout.cache_threshold
        warm = make_job(args.model, args.height, 3, true_cfg, num_images=parallel.dp)
        warm.cache_threshold = layout.cache_threshold
        if speed.fast_attn:
            # A plan runs only at its own step count (others run all full): warm the
            # window kernel too, so no compile lands in a timed request.
            warm = make_job(args.model, args.height, args.steps, true_cfg, num_images=parallel.dp)
        t0 = time.perf_counter()
        if parallel.world_size == 1:
            runner = LocalRunner(resolve_model(args.model), args.device, args.dtype, speed=speed)
        else:
            runner = GangRunner.of(
                args.model, parallel, device=args.device, dtype=args.dtype, speed=speed
            )
        load_s = time.perf_counter() - t0
        latents = runner.run(warm)
        if vae is not None:
            vae.decode(latents)
        times, parts = [], []
        for _ in range(args.repeats):
            sync()
            t = time.perf_counter()
            latents = runner.run(job)
            t_denoise = time.perf_counter() - t
            if vae is not None:
                vae.decode(latents)  # returns host uint8 pixels: synchronised
            times.append(time.perf_counter() - t)
            parts.append((t_denoise, times[-1] - t_denoise))
        best = min(range(len(times)), key=times.__getitem__)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
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
            peak_gib_rank0=round(peak, 1) if peak is not None else None,
            true_cfg=true_cfg,
            speed=speed.describe(),
            card=torch.cuda.get_device_name() if cuda else args.device,
        )
        row.update(approximations(layout, job, runner))
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
        if cuda:
            torch.cuda.empty_cache()
    os.environ.pop(step_cache.FORCE_ENV, None)
    print("\n| layout | GPUs | seconds | rel L2 vs 1 GPU |")
    print("|---|---|---|---|")
    for r in results:
        print(
            f"| {r['layout']} | {r['gpus']} | {r['sec']:.2f} | {r.get('rel_l2_vs_single', '-')} |"
        )


def approximations(layout: Layout, job: DenoiseJob, runner) -> dict:
    """What the row's approximate speed-ups did in its last request."""
    row: dict = dict(layout.notes)
    if layout.cache_threshold > 0:
        row["cache_threshold"] = None if layout.skip is not None else layout.cache_threshold
        row["forced_skips"] = list(layout.skip) if layout.skip is not None else None
        row["skipped_steps"] = job.cached_steps
    adapter = getattr(runner, "adapter", None) or runner.member.adapter
    state = getattr(adapter, "fast_attn", None)
    if state is not None:
        row["attention_computed"] = round(state.fraction(), 4)
    return row


if __name__ == "__main__":
    main()
