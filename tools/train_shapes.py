"""Train ditmesh's small FLUX-architecture model on ditmesh.shapes pictures (issue 19).

    python tools/train_shapes.py --out models/shapes --device cuda --minutes 8.5 --compile
    python tools/train_shapes.py --out /tmp/shapes --device cpu --smoke          # a check
    python tools/train_shapes.py --out models/shapes2 --resume models/shapes --minutes 6

The first line made the committed model (one H200, 8.5 minutes, every held-out attribute
right). With --resume FOLDER the transformer and text towers go on from a written folder
(for a longer run than one call of the lent GPU machine allows): its VAE is kept as it
is (shift and scale included), the pool is rendered afresh from --seed + 1000 (new
pictures), and the card lists both phases.

The VAE's loss weighs the pixels of shapes up (--vae-focus): unweighted, a VAE trained
for 95 s blurred small triangles and squares into blobs, and its round trips of exactly
drawn held-out scenes read only 78% of shapes right, a ceiling the transformer could not
pass (it reached 80% however long it trained). Weighted 11x and trained for 243 s, the
round trips read 100%. The card states this ceiling for every run.

The phases, in order: render a pool of captioned pictures (worker processes, each chunk
seeded from --seed and its index, so the pool is the same whoever renders it); train the
VAE on it (L1 + L2 + a tiny KL); measure its latents (their mean and spread become the
VAE's shift_factor and scaling_factor) and encode the pool once; train the transformer
with its CLIP and T5 towers jointly by rectified flow (x_t = (1 - t) x0 + t noise, predict
noise - x0, t logit-normal shifted as the pipeline samples); write the folder (float16
safetensors); sample the held-out prompts with FluxPipeline from the written folder, score
them with ditmesh.eval and write MODEL_CARD.md and samples.png beside the weights.

With --minutes the phases share the time (the VAE --vae-share of it, a reserve for the
writing and scoring); with --steps / --vae-steps they stop at a step count, and the same
seed on the same device gives the same weights. Pictures are pre-rendered and the latents
kept on the device, so no step waits for data.

Left to others: the model's layout (ditmesh.shapes_model), the pictures (ditmesh.shapes),
the yardstick (ditmesh.eval).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import mmap
import multiprocessing
import os
import pathlib
import random
import shlex
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ditmesh import shapes
from ditmesh import shapes_model as sm

_CHUNK = 256  # pictures per rendering task; each chunk has its own seeded rng


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data


# Filled by the rendering workers in place: anonymous shared memory, which fork shares
# and no /dev/shm size limits, so pictures never travel through a pipe (pickling them
# cost more than drawing them).
_POOL: np.ndarray | None = None


def _render_chunk(task: tuple[int, int, int, int]) -> list[str]:
    seed, index, start, n = task
    images, captions = shapes.batch(random.Random(seed * 1_000_003 + index), n, _POOL.shape[1])
    _POOL[start : start + n] = images
    return captions


def render_pool(seed: int, n: int, size: int, workers: int) -> tuple[torch.Tensor, list[str]]:
    """n training pictures (uint8 [n, size, size, 3]) and captions; the same for any
    number of workers."""
    global _POOL
    _POOL = np.frombuffer(mmap.mmap(-1, n * size * size * 3), np.uint8).reshape(n, size, size, 3)
    tasks = [(seed, i, s, min(_CHUNK, n - s)) for i, s in enumerate(range(0, n, _CHUNK))]
    try:
        if workers > 1:
            # fork: the children only run numpy, and nothing has touched CUDA yet.
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                parts = pool.map(_render_chunk, tasks, chunksize=4)
        else:
            parts = [_render_chunk(t) for t in tasks]
        return torch.from_numpy(_POOL), [c for part in parts for c in part]
    finally:
        _POOL = None


def token_ids(tokenizer, captions: list[str], length: int, device) -> torch.Tensor:
    """Ids as FluxPipeline makes them (padded to `length`), tokenizing each distinct
    caption once."""
    distinct = sorted(set(captions))
    ids = tokenizer(
        distinct, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids
    where = {c: i for i, c in enumerate(distinct)}
    index = torch.tensor([where[c] for c in captions])
    return ids[index].to(device)


# ------------------------------------------------------------------------ helpers


class Budget:
    """When a phase stops: after `steps`, at `deadline` (monotonic seconds), or at
    whichever comes first; `progress` in [0, 1] drives the learning-rate schedule."""

    def __init__(self, steps: int | None, deadline: float | None) -> None:
        if steps is None and deadline is None:
            raise ValueError("a phase needs a step count or a deadline")
        self.steps, self.deadline, self.start = steps, deadline, time.monotonic()

    def progress(self, step: int) -> float:
        parts = []
        if self.steps:
            parts.append(step / self.steps)
        if self.deadline is not None:
            span = max(self.deadline - self.start, 1e-6)
            parts.append((time.monotonic() - self.start) / span)
        return min(max(parts), 1.0)

    def done(self, step: int) -> bool:
        if self.steps is not None and step >= self.steps:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline


def lr_at(base: float, step: int, progress: float, warmup: int) -> float:
    """Linear warm-up, then a cosine down to a tenth."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return base * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _loop(
    name: str,
    step_fn: Callable[[int, float], torch.Tensor],
    budget: Budget,
    *,
    lr: float,
    warmup: int,
    batch: int,
    log_every: int,
    device: torch.device,
) -> dict:
    """Runs `step_fn(step, lr)` until the budget ends; logs loss and pictures/s."""
    step, since, t_last, losses = 0, 0, time.monotonic(), []
    t0 = t_last
    while not budget.done(step):
        losses.append(step_fn(step, lr_at(lr, step, budget.progress(step), warmup)).detach())
        step += 1
        since += 1
        if step % log_every == 0 or budget.done(step):
            loss = torch.stack(losses).mean().item()  # the only host sync per log line
            if not math.isfinite(loss):
                raise RuntimeError(f"{name}: the loss is {loss} by step {step}")
            now = time.monotonic()
            log(
                f"{name} step {step}: loss {loss:.4f}, {since / (now - t_last):.2f} steps/s, "
                f"{since * batch / (now - t_last):.0f} pictures/s"
            )
            since, t_last, losses = 0, now, []
    _sync(device)
    seconds = time.monotonic() - t0
    return {"steps": step, "seconds": seconds, "steps_per_s": step / max(seconds, 1e-9)}


# ---------------------------------------------------------------------------- VAE


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float [-1, 1] [n, 3, H, W] (channels-last memory)."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    return x.contiguous(memory_format=torch.channels_last)


def train_vae(vae, images: torch.Tensor, args, budget: Budget, device) -> dict:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)

    def step_fn(step: int, lr: float) -> torch.Tensor:
        for group in opt.param_groups:
            group["lr"] = lr
        x = _pixels(images[torch.randint(len(images), (args.vae_batch,), device=device)])
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn_like(posterior.mean)
            rec = vae.decode(z).sample.float()
        kl = posterior.kl().mean() / z[0].numel()
        err = (rec - x).abs()
        if args.vae_focus:  # shapes are a few percent of the pixels: weigh them up
            background = x[:, :, :1, :1]  # shapes never touch a corner
            on_shape = ((x - background).abs().amax(1, keepdim=True) > 0.1).float()
            weight = (1 + args.vae_focus * on_shape) / (1 + args.vae_focus * on_shape.mean())
            loss = (weight * (err + err.square())).mean()
        else:
            loss = err.mean() + err.square().mean()
        loss = loss + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    stats = _loop(
        "vae",
        step_fn,
        budget,
        lr=args.vae_lr,
        warmup=args.warmup,
        batch=args.vae_batch,
        log_every=args.log_every,
        device=device,
    )
    vae.eval().requires_grad_(False)
    return stats


@torch.no_grad()
def encode_pool(
    vae, images: torch.Tensor, device, chunk: int = 1024, keep_factors: bool = False
) -> dict:
    """Latent means of every picture, normalized by their own statistics, which become
    the VAE's shift_factor and scaling_factor (or by the VAE's own, `keep_factors`);
    packed into Flux's 2x2 tokens."""
    from diffusers import FluxPipeline

    means = []
    for start in range(0, len(images), chunk):
        with _autocast(device):
            means.append(
                vae.encode(_pixels(images[start : start + chunk])).latent_dist.mean.float()
            )
    latents = torch.cat(means)
    if keep_factors:
        shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    else:
        shift = latents.double().mean().item()
        scale = 1.0 / latents.double().std().item()
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    n, c, h, w = latents.shape
    packed = FluxPipeline._pack_latents((latents - shift) * scale, n, c, h, w)
    recon = F.l1_loss(vae.decode(latents[:256]).sample.float(), _pixels(images[:256]))
    return {
        "latents": packed,
        "shift": shift,
        "scale": scale,
        "l1": recon.item(),
        "hw": (h, w),
        "ceiling": vae_ceiling(vae, device),
    }


@torch.no_grad()
def vae_ceiling(vae, device) -> dict:
    """The yardstick on VAE round trips of the held-out scenes drawn exactly: no sampler
    can score above what the decoder can draw."""
    from ditmesh.eval import evaluate

    rng = random.Random(5)
    drawn = [
        shapes.render(shapes.parse_caption(p), vae.config.sample_size, rng) for p in shapes.HELD_OUT
    ]
    x = _pixels(torch.from_numpy(np.stack(drawn)).to(device))
    with _autocast(device):
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
    pictures = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return evaluate(list(pictures.cpu().numpy()), shapes.HELD_OUT)


# -------------------------------------------------------------------- transformer


def train_flow(pipe, latents: torch.Tensor, captions: list[str], args, budget, device) -> dict:
    """Rectified flow on the transformer, with the CLIP and T5 towers trained along
    (captions are dropped to '' with probability --cond-drop, for CFG)."""
    from diffusers import FluxPipeline

    cfg: sm.ShapesModelConfig = args.model_cfg
    clip, t5, transformer = pipe.text_encoder, pipe.text_encoder_2, pipe.transformer
    clip_len, t5_len = pipe.tokenizer.model_max_length, cfg.t5_tokens
    clip_ids = token_ids(pipe.tokenizer, captions, clip_len, device)
    t5_ids = token_ids(pipe.tokenizer_2, captions, t5_len, device)
    empty_clip = token_ids(pipe.tokenizer, [""], clip_len, device)
    empty_t5 = token_ids(pipe.tokenizer_2, [""], t5_len, device)
    h, w = args.latent_hw
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, torch.float32)
    txt_ids = torch.zeros(t5_len, 3, device=device)
    shift = sm.train_shift(cfg)

    modules = (transformer, clip, t5)
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(
        params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0, fused=fused or None
    )
    ema = [p.detach().clone() for p in params] if args.ema else None
    forward = torch.compile(transformer) if args.compile else transformer
    b = args.batch

    def step_fn(step: int, lr: float) -> torch.Tensor:
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(latents), (b,), device=device)
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        t = torch.sigmoid(torch.randn(b, device=device))
        t = shift * t / (1 + (shift - 1) * t)  # the pipeline's shift at this size
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        drop = (torch.rand(b, device=device) < args.cond_drop)[:, None]
        with _autocast(device):
            pooled = clip(torch.where(drop, empty_clip, clip_ids[idx])).pooler_output
            words = t5(torch.where(drop, empty_t5, t5_ids[idx]))[0]
            guidance = None
            if cfg.guidance_embeds:  # not distilled: random values teach it to ignore them
                guidance = torch.rand(b, device=device) * 10
            pred = forward(
                hidden_states=xt,
                timestep=t,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=words,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        return loss

    stats = _loop(
        "flow",
        step_fn,
        budget,
        lr=args.lr,
        warmup=args.warmup,
        batch=b,
        log_every=args.log_every,
        device=device,
    )
    with torch.no_grad():
        if ema is not None:
            for p, e in zip(params, ema, strict=True):
                p.copy_(e)
    for m in modules:
        m.eval().requires_grad_(False)
    return stats


# ---------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_and_score(folder: pathlib.Path, args, device) -> tuple[dict, np.ndarray]:
    """The held-out prompts sampled from the written folder, as a user of it would, and
    their yardstick scores."""
    from diffusers import FluxPipeline

    from ditmesh.eval import evaluate

    cfg: sm.ShapesModelConfig = args.model_cfg
    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = list(shapes.HELD_OUT[: args.eval_prompts])
    images = []
    for start in range(0, len(prompts), args.eval_batch):
        chunk = prompts[start : start + args.eval_batch]
        generators = [
            torch.Generator().manual_seed(args.seed + start + i) for i in range(len(chunk))
        ]
        out = pipe(
            chunk,
            height=cfg.size,
            width=cfg.size,
            num_inference_steps=args.eval_steps,
            guidance_scale=3.5,
            max_sequence_length=cfg.t5_tokens,
            generator=generators,
            output_type="np",
        ).images
        images.append(np.rint(out * 255).astype(np.uint8))
    pictures = np.concatenate(images)
    return evaluate(list(pictures), prompts), pictures


def contact_sheet(pictures: np.ndarray, columns: int = 10) -> np.ndarray:
    n, h, w, c = pictures.shape
    rows = -(-n // columns)
    sheet = np.full((rows * h, columns * w, c), 255, np.uint8)
    for i, p in enumerate(pictures):
        r, col = divmod(i, columns)
        sheet[r * h : (r + 1) * h, col * w : (col + 1) * w] = p
    return sheet


def model_card(args, report: dict) -> str:
    cfg: sm.ShapesModelConfig = args.model_cfg
    counts = report["params"]
    scores = report["scores"]
    score_rows = "\n".join(
        f"| {k} | {v:g} |" if k == "images" else f"| {k} | {v:.3f} |" for k, v in scores.items()
    )
    size_mb = report["folder_bytes"] / 1e6
    if report["earlier"]:
        vae_line = "kept from the earlier phase (below); reconstruction L1 "
        vae_line += f"{report['vae']['l1']:.4f} on [-1, 1]."
        earlier = "\nResumed from a folder trained before; its card's training section:\n\n"
        earlier += report["earlier"].replace("## Training", "### Earlier phase") + "\n"
    else:
        vae_line = (
            f"{report['vae']['steps']} steps of {args.vae_batch} in "
            f"{report['vae']['seconds']:.0f} s (L1 + L2 + {args.kl_weight:g} KL, AdamW "
            f"{args.vae_lr:g}"
            + (f", shape pixels weighted {1 + args.vae_focus:g}x" if args.vae_focus else "")
            + f"); reconstruction L1 {report['vae']['l1']:.4f} on [-1, 1]."
        )
        earlier = ""
    return f"""# ditmesh shapes: a small FLUX-architecture text-to-image model

Draws one to three circles, squares or triangles in named colours, sizes and places on a
plain background, from captions like

    a small red circle on the left and a large blue square on the right, on a white background

It is ditmesh's own demo and quality yardstick model (issue 19): trained from scratch on
procedural pictures (`ditmesh.shapes`), so it needs no download, and judged on prompts it
never saw (`ditmesh.shapes.HELD_OUT`) by a deterministic detector (`ditmesh.eval`).

## Use

A diffusers `FluxPipeline` folder ({size_mb:.1f} MB, float16 safetensors):

```python
pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
pipe(prompt, height={cfg.size}, width={cfg.size}, num_inference_steps=28,
     max_sequence_length={cfg.t5_tokens}).images[0]
```

`max_sequence_length={cfg.t5_tokens}` matters: the T5 prompt is padded to it in training
(ditmesh reads it from the tokenizer). Trained at {cfg.size}x{cfg.size}. The guidance
embedding is FLUX.1-dev's layout but not distilled (random guidance values in training):
the value is ignored. Real CFG is possible (`negative_prompt=""`, `true_cfg_scale` > 1):
{args.cond_drop:.0%} of training captions were empty; the scores below use none.

## Model

| part | parameters | layout |
| --- | --- | --- |
| transformer (FluxTransformer2DModel) | {counts["transformer"]:,} | {cfg.double_blocks} double + {cfg.single_blocks} single blocks, {cfg.heads} heads x {cfg.head_dim}, rope {sm.rope_axes(cfg.head_dim)} |
| VAE (AutoencoderKL) | {counts["vae"]:,} | 16 latent channels, 8x, widths {cfg.vae_channels}; shift {report["vae"]["shift"]:.4f}, scale {report["vae"]["scale"]:.4f} |
| CLIP text (CLIPTextModel) | {counts["text_encoder"]:,} | {cfg.clip_layers} layers x {cfg.clip_dim}, 77 tokens, pooled |
| T5 encoder (T5EncoderModel) | {counts["text_encoder_2"]:,} | {cfg.t5_layers} layers x {cfg.t5_dim}, {cfg.t5_tokens} tokens |

Tokenizers: CLIP byte-level BPE and T5 unigram built offline, each word of
`ditmesh.shapes.VOCAB` one token. Scheduler: FlowMatchEulerDiscreteScheduler with dynamic
shifting based at {cfg.image_tokens} image tokens (shift e^0.5 at {cfg.size} px).

## Training{" (last phase)" if report["earlier"] else ""}

- Command: `{report["command"]}`
- Device: {report["device"]}; torch {torch.__version__}
- Data: {args.pool:,} pictures rendered from seed {report["pool_seed"]} ({report["render_s"]:.1f} s),
  jittered positions and sizes, held-out captions excluded.
- VAE: {vae_line}
  Its ceiling (the yardstick on round trips of the held-out scenes drawn exactly):
  overall {report["vae"]["ceiling"]["overall"]:.3f}, shape {report["vae"]["ceiling"]["shape"]:.3f}.
- Transformer + text towers: {report["flow"]["steps"]} steps of {args.batch} in
  {report["flow"]["seconds"]:.0f} s ({report["flow"]["steps_per_s"]:.2f} steps/s), rectified flow,
  logit-normal t shifted by e^0.5, AdamW {args.lr:g} with warm-up and cosine, EMA {args.ema:g},
  bf16 autocast on GPU; {args.cond_drop:.0%} captions dropped.
- Total time {report["total_s"]:.0f} s.
{earlier}
## Yardstick

{len(report["prompts"])} held-out prompts, {args.eval_steps} Euler steps, one seed each
(`seed + index`), float32, scored by `ditmesh.eval` (fraction right per attribute):

| attribute | score |
| --- | --- |
{score_rows}

`samples.png`: the held-out prompts in order, ten a row.
"""


def _earlier_training(folder: str) -> str:
    """The training section(s) of a written folder's card, for the resumed card."""
    card = (pathlib.Path(folder) / "MODEL_CARD.md").read_text()
    start, end = card.index("## Training"), card.index("## Yardstick")
    return card[start:end].strip().replace("\n### ", "\n#### ")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to write the model to")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, help="time box for the whole run")
    ap.add_argument("--vae-share", type=float, default=0.5, help="of the training time")
    ap.add_argument(
        "--reserve-s", type=float, default=20.0, help="of --minutes, for writing and scoring"
    )
    ap.add_argument("--resume", help="a folder this script wrote: train its transformer on")
    ap.add_argument("--steps", type=int, help="transformer steps (at most, with --minutes)")
    ap.add_argument("--vae-steps", type=int, help="VAE steps (at most, with --minutes)")
    ap.add_argument("--pool", type=int, default=100_000, help="pictures rendered up front")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--vae-batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument(
        "--vae-focus", type=float, default=10.0, help="extra VAE loss weight on shape pixels"
    )
    ap.add_argument("--kl-weight", type=float, default=1e-6, help="per latent element")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.999, help="0 turns EMA off")
    ap.add_argument("--cond-drop", type=float, default=0.1)
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    ap.add_argument("--log-every", type=int, default=200)
    ap.add_argument("--eval-prompts", type=int, default=len(shapes.HELD_OUT))
    ap.add_argument("--eval-steps", type=int, default=28)
    ap.add_argument("--eval-batch", type=int, default=25)
    ap.add_argument("--smoke", action="store_true", help="a few steps of everything (CPU test)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.pool, args.workers, args.batch, args.vae_batch = 16, 0, 4, 2
        args.steps, args.vae_steps, args.warmup, args.log_every = 3, 2, 0, 1
        args.eval_prompts, args.eval_steps, args.eval_batch = 2, 2, 2
        args.minutes = None
    if args.minutes is None and (
        args.steps is None or (args.vae_steps is None and not args.resume)
    ):
        ap.error("give --minutes, or both --steps and --vae-steps (--steps with --resume)")
    if args.resume and not (pathlib.Path(args.resume) / "MODEL_CARD.md").is_file():
        ap.error(f"--resume {args.resume}: not a folder this script wrote (no MODEL_CARD.md)")
    args.model_cfg = sm.ShapesModelConfig()
    args.command = "python tools/train_shapes.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    return args


def main(argv: list[str] | None = None) -> dict:
    t0 = time.monotonic()
    args = parse_args(argv)
    end = None if args.minutes is None else t0 + args.minutes * 60
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        # cuDNN's attention (torch 2.11, H200) wrote out of bounds on the first steps of
        # the small CLIP/Flux towers (an illegal memory access, or NaN with blocking
        # launches); flash / memory-efficient attention run them correctly.
        torch.backends.cuda.enable_cudnn_sdp(False)
    out = pathlib.Path(args.out)
    cfg: sm.ShapesModelConfig = args.model_cfg

    pool_seed = args.seed + 1000 if args.resume else args.seed
    images_cpu, captions = render_pool(pool_seed, args.pool, cfg.size, args.workers)
    render_s = time.monotonic() - t0
    log(f"rendered {len(images_cpu)} pictures in {render_s:.1f} s ({args.workers} workers)")
    if args.resume:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(args.resume, dtype=torch.float32)
    else:
        pipe = sm.build_pipeline(cfg, args.seed)
    counts = sm.parameter_counts(pipe)
    log(f"parameters: {counts}")
    pipe.vae.to(device, memory_format=torch.channels_last)
    images = images_cpu.to(device)
    del images_cpu

    if args.resume:  # the VAE stays as trained: the transformer learnt its latents
        vae_stats = {"steps": 0, "seconds": 0.0}
        pipe.vae.eval().requires_grad_(False)
    else:
        vae_deadline = None
        if end is not None:
            left = end - args.reserve_s - time.monotonic()
            vae_deadline = time.monotonic() + args.vae_share * left
        vae_stats = train_vae(pipe.vae, images, args, Budget(args.vae_steps, vae_deadline), device)
    t_enc = time.monotonic()
    enc = encode_pool(pipe.vae, images, device, keep_factors=bool(args.resume))
    log(f"encoded {len(images)} pictures in {time.monotonic() - t_enc:.1f} s")
    del images
    vae_stats.update(shift=enc["shift"], scale=enc["scale"], l1=enc["l1"], ceiling=enc["ceiling"])
    log(f"vae: {vae_stats}")
    args.latent_hw = enc["hw"]

    for name in ("transformer", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).to(device)
    flow_deadline = None if end is None else end - args.reserve_s
    flow_stats = train_flow(
        pipe, enc["latents"], captions, args, Budget(args.steps, flow_deadline), device
    )
    log(f"flow: {flow_stats}")

    sm.save_pipeline(pipe.to("cpu"), out, torch.float16)
    scores, pictures = sample_and_score(out, args, device)
    log(f"held-out scores: {scores}")
    from PIL import Image

    Image.fromarray(contact_sheet(pictures)).save(out / "samples.png")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report = {
        "params": counts,
        "vae": vae_stats,
        "flow": flow_stats,
        "scores": scores,
        "prompts": list(shapes.HELD_OUT[: args.eval_prompts]),
        "render_s": render_s,
        "device": f"{device_name} ({os.cpu_count()} CPU cores)",
        "command": args.command,
        "config": dataclasses.asdict(cfg),
        "pool_seed": pool_seed,
        "earlier": _earlier_training(args.resume) if args.resume else None,
    }
    report["folder_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    report["total_s"] = time.monotonic() - t0
    (out / "MODEL_CARD.md").write_text(model_card(args, report))
    log(f"wrote {out} ({report['folder_bytes'] / 1e6:.1f} MB) in {report['total_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
