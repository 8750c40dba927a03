"""Times the VAE decode alone and split over 2 and 4 GPUs (distvae, NCCL), at 1K-4K.

Why: the VAE gang exists because the decode at 2K-4K is slow and memory-hungry on
one card; this says how much a gang of M helps, and where each M runs out of memory.

For each gang size M (1, 2, 4; as many as there are GPUs) it spawns M fresh
processes (so memory statistics start clean), builds a real-size Flux VAE on every
rank from one seed (random weights, bf16) or loads `--model DIR`'s vae/, shards the
decoder with `ditmesh.vae.gang.parallel_copy` when M > 1, and for each size decodes
random latents: one warm-up, then `--repeats` timed decodes (barrier, synchronize,
decode, synchronize). Timed is the decode itself; the gang's broadcast of the
latents (a few MB over gloo) and the PNG encoding are not. Reported per (M, size):
the median seconds on rank 0 (distvae gathers the image on every rank, so rank 0
ends last), peak memory per rank (torch.cuda.max_memory_allocated), and the max abs
difference of the smallest size's image from M=1's. Out of memory is reported as
"OOM" and the larger sizes of that M are skipped; a gang that dies (e.g. one rank
ran out of memory inside a collective and the others timed out) is "failed".

Prints `RESULT {json}` per (M, size), then a markdown table.

    python bench/vae_gpu.py                                # sizes 1024,2048,4096
    python bench/vae_gpu.py --model /models/FLUX.1-dev     # the real weights
    python bench/vae_gpu.py --device cpu --sizes 64 --ranks 1,2   # smoke test (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from ditmesh.common.gangs import free_port

FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    latent_channels=16,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
GIB = 2**30


def build_vae(model: str | None, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The same VAE on every rank: loaded from `model`, or built from one seed."""
    from diffusers import AutoencoderKL

    if model:
        return (
            AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype)
            .to(device)
            .eval()
        )
    torch.manual_seed(0)
    # Built in its dtype on its device: no float32 copy on the host, and no cast afterwards.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            vae = AutoencoderKL(**FLUX_VAE)
    finally:
        torch.set_default_dtype(previous)
    return vae.eval()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2)


@torch.inference_mode()
def _time_size(vae, size: int, args, device, dtype, world: int) -> tuple[list[float], torch.Tensor]:
    g = torch.Generator().manual_seed(size)
    z = torch.randn(1, vae.config.latent_channels, size // 8, size // 8, generator=g)
    z = z.to(device, dtype)
    times = []
    image = None
    for i in range(args.warmup + args.repeats):
        if world > 1:
            dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        image = vae.decode(z, return_dict=False)[0]
        _sync(device)
        took = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(took)
        if world == 1 or dist.get_rank() == 0:  # progress: a run cut off still says how far it got
            kind = "warm-up" if i < args.warmup else "timed"
            print(f"M={world} {size}: {kind} decode {took:.2f} s", flush=True)
    return times, image


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    """One rank of a gang of `world`: every size in turn; rank 0 appends rows to a file."""
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dtype = getattr(torch, args.dtype)
    control = None
    if world > 1:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=args.collective_timeout),
        )
        # Outcomes and memory figures travel on gloo, which needs no device and no NCCL state.
        control = dist.new_group(backend="gloo")
    vae = build_vae(args.model, device, dtype)
    if world > 1:
        from ditmesh.vae.gang import parallel_copy

        vae = parallel_copy(vae)
    weights_gib = _peak_gib(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows_path = os.path.join(out_dir, f"rows-M{world}.jsonl")
    oom = False
    for size in args.sizes:
        row: dict = dict(
            ranks=world, size=size, dtype=args.dtype, device=name, weights_gib=weights_gib
        )
        if oom:
            row.update(status="OOM", note="skipped: a smaller size ran out of memory")
        else:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            status, times, image = "ok", [], None
            try:
                times, image = _time_size(vae, size, args, device, dtype, world)
            except Exception as exc:  # noqa: BLE001 - OOM is a result; anything else is re-raised
                if not _is_oom(exc):
                    raise
                status = "OOM"
            peak = _peak_gib(device)
            outcome = (status, peak)
            outcomes = [outcome] * world
            if control is not None:
                dist.all_gather_object(outcomes, outcome, group=control)
            if any(s == "OOM" for s, _ in outcomes):
                status, oom = "OOM", True
            row.update(status=status, peak_gib_per_rank=[p for _, p in outcomes])
            if status == "ok":
                row.update(seconds=round(statistics.median(times), 4), all_seconds=times)
                if rank == 0 and size == min(args.sizes):
                    torch.save(image.float().cpu(), os.path.join(out_dir, f"image-M{world}.pt"))
            del image
        if rank == 0:
            with open(rows_path, "a") as f:
                f.write(json.dumps(row) + "\n")
    if world > 1:
        dist.destroy_process_group()


def run_gang(world: int, args: argparse.Namespace, out_dir: str) -> list[dict]:
    """Spawns one gang of `world` processes; returns its rows (failed rows for sizes it missed)."""
    rows_path = os.path.join(out_dir, f"rows-M{world}.jsonl")
    for stale in (rows_path, os.path.join(out_dir, f"image-M{world}.pt")):
        if os.path.exists(stale):
            os.remove(stale)
    error = None
    try:
        tmp.spawn(_rank_main, args=(world, free_port(), args, out_dir), nprocs=world, join=True)
    except Exception as exc:  # noqa: BLE001 - one gang failing must not lose the others' results
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"
    rows = []
    if os.path.exists(rows_path):
        with open(rows_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    done = {r["size"] for r in rows}
    for size in args.sizes:
        if size not in done:
            rows.append(dict(ranks=world, size=size, status="failed", error=error))
    return rows


def _cell(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    peak = row.get("peak_gib_per_rank") or []
    mem = f", {max(peak):.1f} GiB/rank" if peak and peak[0] is not None else ""
    return f"{row['seconds']:.3f} s{mem}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="diffusers folder with vae/ (default: random)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--sizes", default="1024,2048,4096", help="image sides in pixels")
    ap.add_argument("--ranks", default="1,2,4", help="gang sizes (capped at the GPU count)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--collective-timeout",
        type=float,
        default=120.0,
        help="seconds before a rank stuck in a collective (a peer ran out of memory) gives up",
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    if any(s % 8 for s in args.sizes):
        ap.error("--sizes must be multiples of 8 (the VAE's scale factor)")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    ranks = [int(m) for m in args.ranks.split(",")]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("no GPU here; use --device cpu for the smoke test")
        gpus = torch.cuda.device_count()
        skipped = [m for m in ranks if m > gpus]
        ranks = [m for m in ranks if m <= gpus]
        if skipped:
            print(f"skipping M={skipped}: only {gpus} GPUs", flush=True)
    # No CUDA context here (get_device_name would make one): it would sit on rank 0's GPU.
    # NVLink SHARP multicast is off on the machines this runs on; NCCL must not try it.
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.makedirs(args.out, exist_ok=True)

    results: list[dict] = []
    reference = None
    for world in ranks:
        for row in run_gang(world, args, args.out):
            image_path = os.path.join(args.out, f"image-M{world}.pt")
            if (
                row["size"] == args.sizes[0]
                and row["status"] == "ok"
                and os.path.exists(image_path)
            ):
                image = torch.load(image_path)
                if reference is None and world == 1:
                    reference = image
                elif reference is not None:
                    row["max_abs_vs_M1"] = float((image - reference).abs().max())
            print("RESULT", json.dumps(row), flush=True)
            results.append(row)
    with open(os.path.join(args.out, "vae_gpu.json"), "w") as f:
        json.dump(results, f, indent=1)

    device_name = next((r["device"] for r in results if "device" in r), args.device)
    print(
        f"\nVAE decode, {args.dtype}, {device_name}: median seconds, peak memory of the worst rank"
    )
    print("\n| size | " + " | ".join(f"M={m}" for m in ranks) + " |")
    print("|---|" + "---|" * len(ranks))
    by_key = {(r["ranks"], r["size"]): r for r in results}
    for size in args.sizes:
        cells = [_cell(by_key[(m, size)]) for m in ranks]
        print(f"| {size}x{size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
