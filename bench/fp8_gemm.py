"""bf16 vs FP8 GEMMs at FLUX.1-dev's shapes: is --fp8's Linear worth it, eager and compiled?

For each (K -> N) of a FLUX.1-dev block at 1024² (4608 image tokens; 3072 -> 3072 / 9216 /
12288 / 21504 in the double and single blocks, 12288 / 15360 -> 3072 back), times:

  bf16        F.linear in bf16 (cuBLAS), the baseline;
  fp8 gemm    torch._scaled_mm alone on activations quantised beforehand (the ceiling);
  fp8 eager   ditmesh's Fp8Linear, the activation's amax, divide and cast as separate ops;
  fp8 comp    the same Fp8Linear under torch.compile (quantisation fused), as --fp8 --compile
              runs inside a compiled block;
  bf16 comp   F.linear + bias under torch.compile, the fair baseline for "fp8 comp".

and prints TFLOP/s (2*M*K*N / time), the speed-up over bf16, and FP8's relative L2 error
against bf16 on random inputs. CUDA events, a warm-up, the median of --iters runs.

    .venv/bin/python bench/fp8_gemm.py                    # an FP8 GPU (sm_89+)
    .venv/bin/python bench/fp8_gemm.py --json out.json    # also the rows as JSON
    DITMESH_FP8_CPU=1 .venv/bin/python bench/fp8_gemm.py --device cpu --tokens 64 --iters 2
                                                          # a smoke run of the script only

Refuses to run on CPU unless asked (its numbers there mean nothing). What it leaves out:
the attention, norms and collectives around the GEMMs (whole-request timings are
bench/family_gpu.py's), and torchao (not used by ditmesh, see services/denoiser/fp8.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditmesh.common.errors import InvalidArgument
from ditmesh.denoiser import fp8

FLUX_DEV_SHAPES = (
    (3072, 3072),
    (3072, 9216),
    (3072, 12288),
    (3072, 21504),
    (12288, 3072),
    (15360, 3072),
)
"""(in_features, out_features) of FLUX.1-dev's block Linears."""
FLUX_DEV_TOKENS = 4608  # 1024² image: (1024 / 16)² tokens


def timer(device: torch.device, fn, iters: int) -> float:
    """Median seconds of one call of `fn` (after two warm-up calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_shape(device, dtype, granularity, tokens, k, n, iters) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(k, n, device=device, dtype=dtype)
    x = torch.randn(tokens, k, device=device, dtype=dtype)
    layer = fp8.Fp8Linear(linear, granularity)
    q, scale = fp8.quantize(x, granularity)
    w_t, w_scale = layer.weight_fp8.t(), layer.weight_scale

    def gemm():
        return torch._scaled_mm(q, w_t, scale_a=scale, scale_b=w_scale, out_dtype=dtype)

    compiled_fp8 = torch.compile(layer, fullgraph=True, dynamic=False)
    compiled_bf16 = torch.compile(linear, fullgraph=True, dynamic=False)
    with torch.no_grad():
        ref = linear(x)
        rel = float((layer(x).float() - ref.float()).norm() / ref.float().norm())
        runs = {
            "bf16": timer(device, lambda: F.linear(x, linear.weight, linear.bias), iters),
            "fp8 gemm": timer(device, gemm, iters),
            "fp8 eager": timer(device, lambda: layer(x), iters),
            "fp8 comp": timer(device, lambda: compiled_fp8(x), iters),
            "bf16 comp": timer(device, lambda: compiled_bf16(x), iters),
        }
    flops = 2 * tokens * k * n
    return {
        "tokens": tokens,
        "k": k,
        "n": n,
        "granularity": granularity,
        "rel_l2": rel,
        "seconds": runs,
        "tflops": {name: flops / s / 1e12 for name, s in runs.items()},
    }


def table(rows: list[dict]) -> str:
    names = list(rows[0]["seconds"])
    head = f"{'M x K -> N':>22} " + " ".join(f"{n:>10}" for n in names)
    head += "  fp8comp/bf16comp  fp8eager/bf16  rel_l2"
    lines = [head, "TFLOP/s"]
    for r in rows:
        t = r["tflops"]
        lines.append(
            f"{r['tokens']:>6} x {r['k']:>5} -> {r['n']:>5} "
            + " ".join(f"{t[n]:>10.1f}" for n in names)
            + f"  {t['fp8 comp'] / t['bf16 comp']:>15.2f}x {t['fp8 eager'] / t['bf16']:>13.2f}x"
            + f"  {r['rel_l2']:.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
    p.add_argument("--tokens", type=int, default=FLUX_DEV_TOKENS, help="M, the GEMMs' rows")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (a CPU smoke run: --device cpu)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        granularity = fp8.check(device, dtype)
    except InvalidArgument as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        print(
            f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {granularity}-wise"
        )
    rows = [
        bench_shape(device, dtype, granularity, args.tokens, k, n, args.iters)
        for k, n in FLUX_DEV_SHAPES
    ]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
