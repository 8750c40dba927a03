"""What the mesh adds to one request, on one GPU: the request through gateway, encoder,
denoiser and VAE against the denoiser + decode alone (bench/gang_gpu.py, same call).

Starts the three stages on one GPU and a gateway (the code of bench/mesh_throughput.py),
then, one request at a time: the first request after start (PNG), then `--requests` each
in PNG, JPEG and raw. For each it keeps the client's wall time and the gateway's own
breakdown (`GenerateResult.timings.breakdown()`: queue, encode, transfer, denoise,
decode, image encoding, the gateway's own time). Prints `RESULT {json}` per format
and a table; the caller compares `total` with gang_gpu.py's denoise + decode.

    python bench/mesh_overhead.py --model /tmp/flux-mesh --denoiser-flags "--compile --cuda-graphs"
    python bench/mesh_overhead.py --model /tmp/tiny-flux --device cpu --height 64 --width 64 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mesh_throughput import parse_layout, start, stop  # noqa: E402

from ditmesh.client import Client  # noqa: E402


def one(client: Client, args, fmt: str, seed: int) -> dict:
    t = time.perf_counter()
    result = client.generate(
        args.prompt,
        height=args.height,
        width=args.width,
        steps=args.steps,
        seed=seed,
        output_format=fmt,
        timeout=args.request_timeout,
    )
    wall = time.perf_counter() - t
    parts = result.timings.breakdown()
    return {"client_s": wall, **{k: v for k, v in parts.items()}}


def summarise(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    return {k: round(statistics.median(r[k] for r in rows), 4) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--denoiser-flags", default="")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--formats", default="png,jpeg,raw")
    ap.add_argument("--prompt", default="a lighthouse on a cliff at dawn")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    layout = parse_layout("replicas:1", args.denoiser_flags)
    procs, address = start(args, layout)
    rows: list[dict] = []
    try:
        with Client(address) as client:
            first = one(client, args, "png", 0)
            rows.append({"format": "png", "which": "first", **first})
            for fmt in args.formats.split(","):
                runs = [one(client, args, fmt, 1 + i) for i in range(args.requests)]
                rows.append({"format": fmt, "which": f"median of {len(runs)}", **summarise(runs)})
    finally:
        stop(procs)
    base = dict(
        system="ditmesh",
        bench="mesh_overhead",
        denoiser_flags=args.denoiser_flags,
        H=args.height,
        W=args.width,
        steps=args.steps,
    )
    with open(os.path.join(args.out, "mesh_overhead.jsonl"), "a") as f:
        for r in rows:
            row = {**base, **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}}
            print("RESULT", json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
    cols = [k for k in rows[0] if k not in ("format", "which")]
    print("| format | request | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['format']} | {r['which']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
