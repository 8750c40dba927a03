"""Peers for the family benchmarks: plain diffusers, or xDiT (PyPI xfuser) under torchrun,
on the folders bench/make_family_model.py writes (HunyuanDiT-v1.2, CogVideoX-5B, Mochi-1).

Measured as bench/family_gpu.py measures ditmesh: random prompt embeddings of the real
shapes (masks all ones), the pipeline's default guidance (CFG batched), one 3-step warm-up
call, then the best of `--repeats` whole calls (denoise, VAE decode, PIL images or frames),
peak GPU memory of the timed calls. xfuser 0.7.0 ships pipelines for HunyuanDiT and
CogVideoX, none for Mochi-1.

    python bench/peer_family.py --system diffusers --family cogvideox --model /tmp/cog \
        --height 480 --width 720 --frames 49 --steps 10
    torchrun --nproc_per_node 1 bench/peer_family.py --system xfuser --family hunyuandit \
        --model /tmp/hy --height 1024 --width 1024 --steps 50 [--compile]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# Per family: the diffusers pipeline class, the xfuser class (None: xfuser has none),
# default guidance, and the conditioning shapes: (name, (tokens, width) or None for masks).
FAMILIES = {
    "hunyuandit": ("HunyuanDiTPipeline", "xFuserHunyuanDiTPipeline", 5.0),
    "cogvideox": ("CogVideoXPipeline", "xFuserCogVideoXPipeline", 6.0),
    "mochi": ("MochiPipeline", None, 4.5),
}


def conditioning(family: str, transformer, device, dtype) -> dict[str, torch.Tensor]:
    """Random prompt embeddings (and all-ones masks) of the real shapes, prompt and negative."""
    c = transformer.config
    if family == "hunyuandit":
        shapes = {
            "prompt_embeds": (c.text_len, c.cross_attention_dim),
            "prompt_embeds_2": (c.text_len_t5, c.cross_attention_dim_t5),
        }
        masks = {"prompt_attention_mask": c.text_len, "prompt_attention_mask_2": c.text_len_t5}
    elif family == "cogvideox":
        shapes, masks = {"prompt_embeds": (c.max_text_seq_length, c.text_embed_dim)}, {}
    else:
        shapes = {"prompt_embeds": (c.max_sequence_length, c.text_embed_dim)}
        masks = {"prompt_attention_mask": c.max_sequence_length}
    g = torch.Generator().manual_seed(0)
    out = {}
    for prefix in ("", "negative_"):
        for name, shape in shapes.items():
            out[prefix + name] = torch.randn(1, *shape, generator=g).to(device, dtype)
        for name, n in masks.items():
            out[prefix + name] = torch.ones(1, n, dtype=torch.int64, device=device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", choices=("diffusers", "xfuser"), required=True)
    ap.add_argument("--family", choices=sorted(FAMILIES), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--height", type=int, required=True)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--frames", type=int, default=0)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="xfuser: --use_torch_compile")
    args = ap.parse_args()

    pipe_cls, xfuser_cls, guidance = FAMILIES[args.family]
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if args.system == "diffusers":
        import diffusers

        device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: smoke tests
        pipe = getattr(diffusers, pipe_cls).from_pretrained(args.model, torch_dtype=dtype)
        pipe = pipe.to(device)
        version = f"diffusers-{diffusers.__version__}"
        barrier = lambda: None  # noqa: E731
    else:
        import xfuser
        from xfuser import xFuserArgs
        from xfuser.core.distributed import get_world_group

        if xfuser_cls is None:
            raise SystemExit(f"xfuser has no pipeline for {args.family}")
        xargs = xFuserArgs(
            model=args.model,
            height=args.height,
            width=args.width,
            num_frames=args.frames or 1,
            num_inference_steps=args.steps,
            use_torch_compile=args.compile,
        )
        engine_config, _ = xargs.create_config()
        engine_config.runtime_config.dtype = dtype
        device = f"cuda:{get_world_group().local_rank}"
        pipe = (
            getattr(xfuser, xfuser_cls)
            .from_pretrained(args.model, engine_config=engine_config, torch_dtype=dtype)
            .to(device)
        )
        version = f"xfuser-{getattr(xfuser, '__version__', '0.7.0')}"
        # xfuser wraps the scheduler (`.module`), which also hides its class from the
        # pipeline's own isinstance checks.
        scheduler = getattr(pipe.scheduler, "module", pipe.scheduler)
        if type(scheduler).__name__ == "CogVideoXDPMScheduler":
            # The 5B's DPM scheduler fails under xfuser 0.7.0 (its wrapper hides the class, so
            # the loop steps it DDIM-style: step() without timestep_back); the DDIM one the
            # 2B ships does the same work per step, so it stands in for the timing.
            from diffusers import CogVideoXDDIMScheduler

            ddim = CogVideoXDDIMScheduler.from_config(scheduler.config)
            getattr(pipe, "module", pipe).scheduler = ddim  # the pipeline xfuser wraps
            pipe.scheduler = ddim
            version += "(ddim)"
        barrier = torch.distributed.barrier
    cond = conditioning(args.family, pipe.transformer, device, dtype)
    size = dict(height=args.height, width=args.width)
    if args.frames:
        size["num_frames"] = args.frames

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def call(steps: int) -> float:
        sync()
        barrier()
        t = time.perf_counter()
        pipe(
            **cond,
            **size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="pil",
            generator=torch.Generator(device="cpu").manual_seed(1),
        )
        sync()
        barrier()
        return time.perf_counter() - t

    t0 = time.perf_counter()
    call(3)
    warm_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [call(args.steps) for _ in range(args.repeats)]
    if args.system == "diffusers" or torch.distributed.get_rank() == 0:
        row = dict(
            system=version + ("+compile" if args.compile else ""),
            family=args.family,
            H=args.height,
            W=args.width,
            frames=args.frames or None,
            steps=args.steps,
            guidance=guidance,
            sec=round(min(times), 3),
            all_sec=[round(t, 3) for t in times],
            warmup_s=round(warm_s, 1),
            peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
            card=torch.cuda.get_device_name() if cuda else "cpu",
        )
        print("RESULT", json.dumps(row), flush=True)
    if args.system == "xfuser":
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
