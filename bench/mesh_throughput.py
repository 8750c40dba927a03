"""Throughput of a whole mesh under load: GPUs split across stages vs whole-pipeline replicas.

Starts the stages as `ditmesh serve` processes, each on the GPUs its spec names
(CUDA_VISIBLE_DEVICES), then a gateway over all of them, then keeps `--concurrency`
requests in flight through the SDK for `--requests` requests (after one warm-up
request per denoiser replica). Reports images per second and request latency
(p50, p95), as `RESULT {json}` and a table line.

A layout is `;`-separated stage specs `STAGE@GPUS[:FLAGS]`, a stage repeated for replicas:

    # 4 GPUs split across stages: encoder, a Ulysses-2 denoiser gang, the VAE
    --layout "encoder@0;denoiser@1,2:--ulysses=2 --compile --cuda-graphs;vae@3"
    # 4 whole-pipeline replicas (each GPU runs encoder, denoiser and VAE)
    --layout replicas:4 --denoiser-flags "--compile --cuda-graphs"

`--device cpu` (GPUS ignored; write `-`) smoke-tests the script with a tiny model:

    python bench/mesh_throughput.py --model /tmp/tiny-flux --device cpu \\
        --layout "encoder@-;denoiser@-:--ulysses=2;vae@-" --height 64 --width 64 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import threading
import time

from ditmesh.client import Client
from ditmesh.local import StageProcess, wait_healthy


def parse_layout(spec: str, denoiser_flags: str) -> list[tuple[str, str, list[str]]]:
    """[(stage, gpus, flags)]; `replicas:N` puts all three stages on each of N GPUs."""
    if spec.startswith("replicas:"):
        n = int(spec.split(":", 1)[1])
        out = []
        for i in range(n):
            out += [("encoder", str(i), []), ("denoiser", str(i), shlex.split(denoiser_flags))]
            out.append(("vae", str(i), []))
        return out
    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        head, _, flags = part.partition(":")
        stage, _, gpus = head.partition("@")
        if stage not in ("encoder", "denoiser", "vae"):
            raise SystemExit(f"unknown stage {stage!r} in {part!r}")
        extra = shlex.split(flags)
        if stage == "denoiser":
            extra = shlex.split(denoiser_flags) + extra
        out.append((stage, gpus, extra))
    for stage in ("encoder", "denoiser", "vae"):
        if not any(s == stage for s, _, _ in out):
            raise SystemExit(f"the layout has no {stage} stage")
    return out


def start(args, layout) -> tuple[list[StageProcess], str]:
    procs: list[StageProcess] = []
    common = ["--model", args.model, "--host", "127.0.0.1", "--port", "0"]
    common += ["--device", "cpu" if args.device == "cpu" else "cuda", "--dtype", args.dtype]
    addrs: dict[str, list[str]] = {"encoder": [], "denoiser": [], "vae": []}
    try:
        started = []
        for stage, gpus, flags in layout:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if args.device != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = gpus
            p = StageProcess(stage, [*common, *flags], env)
            procs.append(p)
            started.append(p)
        for p in started:
            addr = p.wait_listening(args.start_timeout)
            wait_healthy(addr, args.start_timeout)
            addrs[p.stage].append(addr)
        gw_args = list(common)
        for stage, values in addrs.items():
            for a in values:
                gw_args += [f"--{stage}", a]
        gw = StageProcess("gateway", gw_args, {**os.environ, "PYTHONUNBUFFERED": "1"})
        procs.append(gw)
        address = gw.wait_listening(args.start_timeout)
        wait_healthy(address, args.start_timeout)
        return procs, address
    except BaseException:
        stop(procs)
        raise


def stop(procs: list[StageProcess]) -> None:
    for p in reversed(procs):
        p.terminate()
    for p in reversed(procs):
        p.wait(30)


def load(address: str, args, replicas: int) -> dict:
    def one(client: Client, seed: int) -> float:
        t = time.perf_counter()
        client.generate(
            args.prompt,
            height=args.height,
            width=args.width,
            steps=args.steps,
            seed=seed,
            timeout=args.request_timeout,
        )
        return time.perf_counter() - t

    with Client(address) as c:  # warm-up: one request per denoiser replica, together
        threads = [threading.Thread(target=one, args=(c, i)) for i in range(replicas)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    latencies: list[float] = []
    failures: list[str] = []
    todo = list(range(args.requests))
    lock = threading.Lock()

    def worker() -> None:
        with Client(address) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    seed = todo.pop()
                try:
                    lat = one(client, seed)
                except Exception as exc:  # reported, not fatal: throughput counts successes
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    latencies.append(lat)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return dict(
        requests=args.requests,
        ok=len(lat),
        failed=len(failures),
        first_failure=failures[0] if failures else None,
        wall_s=round(wall, 2),
        images_per_s=round(len(lat) / wall, 3),
        p50_s=round(statistics.median(lat), 3) if lat else None,
        p95_s=round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--layout", required=True)
    ap.add_argument("--denoiser-flags", default="", help="added to every denoiser replica")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt", default="a lighthouse on a cliff at dawn")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    layout = parse_layout(args.layout, args.denoiser_flags)
    replicas = sum(1 for s, _, _ in layout if s == "denoiser")
    procs, address = start(args, layout)
    try:
        row = load(address, args, replicas)
    finally:
        stop(procs)
    row = dict(
        system="ditmesh",
        bench="mesh_throughput",
        layout=args.layout,
        denoiser_flags=args.denoiser_flags,
        H=args.height,
        W=args.width,
        steps=args.steps,
        concurrency=args.concurrency,
        **row,
    )
    print("RESULT", json.dumps(row), flush=True)
    with open(os.path.join(args.out, "mesh.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(
        f"| {args.layout} | {args.denoiser_flags or '-'} | {row['images_per_s']} img/s | "
        f"p50 {row['p50_s']} s | p95 {row['p95_s']} s | {row['failed']} failed |"
    )


if __name__ == "__main__":
    main()
