"""The gateway under overload: does it refuse what it cannot serve, at once, and stay healthy?

Starts a local mesh (`ditmesh.local.LocalMesh`, the code of `ditmesh up`) of a tiny
random Flux (made with `ditmesh make-tiny flux` unless --model is given), measures
its capacity (requests per second, one request at a time: 1 / the median time of
--capacity-requests requests after a warm-up one, the median as the cores are shared), then
offers open-loop load, Poisson arrivals at `level x capacity` requests per second,
for --duration seconds per level. A request is sent when its arrival comes, whether
or not earlier ones have been answered (asyncio + `ditmesh.client.AsyncClient`, no
client retries). Per level it reports:

- offered: arrivals (and their rate); ok: requests that returned their image;
- refused: RESOURCE_EXHAUSTED, with the time from sending to the refusal (p50/p99):
  a gateway that refuses what it cannot serve does so in milliseconds;
- deadline: DEADLINE_EXCEEDED (--deadline is each request's deadline);
- other: any other error, by status code;
- goodput: ok requests per second, from the level's first arrival until its last
  request settled (so work queued during the level and finished after it counts
  against the time it took);
- latency p50/p99 of the ok requests;
- health: a grpc.health.v1 Check every 100 ms during the level (its own channel),
  p99 and max latency, and how many failed: health must not wait behind work.

Prints a table at the end and writes JSON with --out. Runs on a 2-core CPU in a few
minutes at the defaults; the load generator shares those cores with the mesh, so
compare levels and gateway builds on one machine, not absolute numbers.

    python bench/overload.py --out overload.json 2>mesh.log
    python bench/overload.py --gateway-arg=--max-queue=8 --levels 1,10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ditmesh.client import (
    AsyncClient,
    DeadlineExceededError,
    DitmeshClientError,
    ResourceExhaustedError,
)
from ditmesh.local import LocalMesh, UpConfig

PROMPT = "a red circle on a blue square"
HEALTH_PERIOD_S = 0.1


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class LevelResult:
    level: float
    rate: float
    """Offered arrivals per second."""
    offered: int = 0
    ok: int = 0
    refused: int = 0
    deadline: int = 0
    other: dict[str, int] = field(default_factory=dict)
    span_s: float = 0.0
    """From the first arrival until the last request settled."""
    goodput: float = 0.0
    latency_p50: float | None = None
    latency_p99: float | None = None
    refusal_p50: float | None = None
    refusal_p99: float | None = None
    health_checks: int = 0
    health_failed: int = 0
    health_p99: float | None = None
    health_max: float | None = None
    samples: dict[str, str] = field(default_factory=dict)
    """One error sentence per outcome, to see what the gateway said."""


async def health_probe(address: str, stop: asyncio.Event, out: list[float]) -> int:
    """A Check every HEALTH_PERIOD_S until `stop`; latencies into `out`; returns failures."""
    failed = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        while not stop.is_set():
            t = time.perf_counter()
            try:
                reply = await stub.Check(request, timeout=5.0)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    failed += 1
            except grpc.RpcError:
                failed += 1
            took = time.perf_counter() - t
            out.append(took)
            await asyncio.sleep(max(0.0, HEALTH_PERIOD_S - took))
    return failed


async def run_level(address: str, args, level: float, capacity: float, seed: int) -> LevelResult:
    res = LevelResult(level=level, rate=level * capacity)
    rng = random.Random(seed)
    latencies: list[float] = []
    refusals: list[float] = []
    other: Counter[str] = Counter()

    async def one(client: AsyncClient, i: int) -> None:
        t = time.perf_counter()
        try:
            await client.generate(
                PROMPT,
                height=args.size,
                width=args.size,
                steps=args.steps,
                seed=i,
                output_format="raw",
                timeout=args.deadline,
            )
        except ResourceExhaustedError as exc:
            res.refused += 1
            refusals.append(time.perf_counter() - t)
            res.samples.setdefault("refused", str(exc))
        except DeadlineExceededError as exc:
            res.deadline += 1
            res.samples.setdefault("deadline", str(exc))
        except DitmeshClientError as exc:
            name = exc.code.name
            other[name] += 1
            res.samples.setdefault(name, str(exc))
        else:
            res.ok += 1
            latencies.append(time.perf_counter() - t)

    health: list[float] = []
    stop = asyncio.Event()
    probe = asyncio.create_task(health_probe(address, stop, health))
    async with AsyncClient(address, retries=0, timeout=args.deadline) as client:
        tasks = []
        start = time.perf_counter()
        at = rng.expovariate(res.rate)
        while at < args.duration:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, len(tasks))))
            at += rng.expovariate(res.rate)
        await asyncio.gather(*tasks)
        res.span_s = time.perf_counter() - start
    stop.set()
    res.health_failed = await probe
    res.offered = len(tasks)
    res.other = dict(other)
    res.goodput = res.ok / res.span_s if res.span_s else 0.0
    res.latency_p50, res.latency_p99 = percentile(latencies, 50), percentile(latencies, 99)
    res.refusal_p50, res.refusal_p99 = percentile(refusals, 50), percentile(refusals, 99)
    res.health_checks = len(health)
    res.health_p99, res.health_max = percentile(health, 99), max(health, default=None)
    return res


async def measure_capacity(address: str, args) -> tuple[float, list[float]]:
    """Requests per second one at a time (1 / the median request time), after a warm-up."""
    async with AsyncClient(address, retries=0, timeout=600) as client:
        kw = dict(height=args.size, width=args.size, steps=args.steps, output_format="raw")
        await client.generate(PROMPT, seed=0, **kw)
        took = []
        for i in range(args.capacity_requests):
            t = time.perf_counter()
            await client.generate(PROMPT, seed=1 + i, **kw)
            took.append(time.perf_counter() - t)
    return 1 / percentile(took, 50), took


def fmt(v: float | None, unit: str = "s") -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f}ms" if unit == "s" and v < 1 else f"{v:.2f}{unit}"


def table(results: list[LevelResult]) -> str:
    head = (
        "| level | offered (rate/s) | ok | refused | refusal p50/p99 | deadline | other "
        "| goodput/s | latency p50/p99 | health p99/max (failed) |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in results:
        other = ", ".join(f"{k} {v}" for k, v in sorted(r.other.items())) or "0"
        lines.append(
            f"| {r.level:g}x | {r.offered} ({r.rate:.2f}) | {r.ok} | {r.refused} "
            f"| {fmt(r.refusal_p50)} / {fmt(r.refusal_p99)} | {r.deadline} | {other} "
            f"| {r.goodput:.2f} | {fmt(r.latency_p50)} / {fmt(r.latency_p99)} "
            f"| {fmt(r.health_p99)} / {fmt(r.health_max)} ({r.health_failed}) |"
        )
    return "\n".join(lines)


def make_model(folder: str) -> str:
    path = f"{folder}/tiny-flux"
    cmd = [sys.executable, "-m", "ditmesh.cli", "make-tiny", "flux", path]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="diffusers folder (default: a tiny Flux made for the run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per level")
    ap.add_argument(
        "--levels",
        type=lambda s: [float(v) for v in s.split(",") if v],
        default=[1.0, 2.0, 10.0],
        help="offered load as multiples of the capacity (default 1,2,10)",
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256, help="height and width of every request")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per stage (OMP_NUM_THREADS): on a few busy cores, more threads "
        "spin waiting for each other and steps get many times slower and unsteady",
    )
    ap.add_argument("--deadline", type=float, default=20.0, help="seconds, per request")
    ap.add_argument("--capacity-requests", type=int, default=4)
    ap.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="passed to `serve gateway` (repeatable), e.g. --gateway-arg=--max-queue=8",
    )
    ap.add_argument("--replicas", type=int, default=1, help="denoiser replicas")
    ap.add_argument("--seed", type=int, default=0, help="of the arrival times")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.capacity_requests < 1 or not args.levels or min(args.levels) <= 0:
        ap.error("--capacity-requests must be >= 1 and every level > 0")

    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        model = args.model or make_model(tmp)
        config = UpConfig(
            model=model,
            device=args.device,
            extra_env={"OMP_NUM_THREADS": str(args.threads)},
            gateway_args=args.gateway_arg,
            denoiser_replicas=args.replicas,
        )
        t = time.perf_counter()
        with LocalMesh(config) as mesh:
            address = mesh.gateway_address
            print(f"mesh up in {time.perf_counter() - t:.1f} s at {address}", flush=True)
            capacity, took = asyncio.run(measure_capacity(address, args))
            print(
                f"capacity {capacity:.2f} req/s at {args.size}x{args.size}, {args.steps} steps "
                f"(one at a time: {', '.join(f'{v:.2f}' for v in took)} s)",
                flush=True,
            )
            results = []
            for i, level in enumerate(args.levels):
                r = asyncio.run(run_level(address, args, level, capacity, args.seed + i))
                print(table([r]).splitlines()[-1], flush=True)
                results.append(r)
    print()
    print(
        f"capacity {capacity:.2f} req/s ({args.size}x{args.size}, {args.steps} steps, "
        f"{args.replicas} denoiser); {args.duration:g} s per level; deadline {args.deadline:g} s; "
        f"gateway args: {' '.join(args.gateway_arg) or 'none'}"
    )
    print(table(results))
    if args.out:
        doc = {
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "capacity_rps": capacity,
            "capacity_request_s": took,
            "levels": [asdict(r) for r in results],
        }
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
