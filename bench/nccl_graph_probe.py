"""Can a CUDA graph capture and replay torch.distributed NCCL collectives here?

Run under torchrun with 2+ GPUs. Each variant captures matmul -> all_to_all_single ->
matmul -> all_gather (the shapes a Flux Ulysses layer moves), replays it, and compares
with the eager result. A hang is reported by faulthandler after --timeout seconds.

    torchrun --nproc_per_node 2 bench/nccl_graph_probe.py --mode global
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist


def layer(x: torch.Tensor, w: torch.Tensor, group, async_op: bool = False) -> torch.Tensor:
    y = x @ w
    recv = torch.empty_like(y)
    work = dist.all_to_all_single(recv, y, group=group, async_op=async_op)
    if async_op:
        other = x @ w  # computed while the exchange runs
        work.wait()
        recv = recv + other - other
    z = recv @ w
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, z, group=group)
    return torch.cat(parts).sum(0, keepdim=True) + z


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="global", choices=["global", "thread_local", "relaxed"])
    ap.add_argument("--subgroup", action="store_true", help="collectives on a new_group")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--async-op", action="store_true", help="exchange with async_op + wait")
    ap.add_argument("--timeout", type=float, default=45)
    args = ap.parse_args()
    faulthandler.dump_traceback_later(args.timeout, exit=True)

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    group = dist.new_group(list(range(dist.get_world_size()))) if args.subgroup else None
    g = torch.Generator(device="cuda").manual_seed(rank)
    tokens = 2304 * dist.get_world_size()
    x = torch.randn(tokens, 3072, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(3072, 3072, device="cuda", dtype=torch.bfloat16, generator=g) / 64

    def forward(inp):
        for _ in range(args.layers):
            inp = layer(inp, w, group, args.async_op)
        return inp

    eager = forward(x)
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    t0 = time.perf_counter()
    with torch.cuda.graph(graph, capture_error_mode=args.mode):
        out = forward(static)
    captured_s = time.perf_counter() - t0
    dist.barrier()
    graph.replay()
    torch.cuda.synchronize()
    diff = float((out - eager).abs().max())
    # Replays vs eager, 20 each.
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    replay_ms = (time.perf_counter() - t0) / 20 * 1e3
    t0 = time.perf_counter()
    for _ in range(20):
        forward(x)
    torch.cuda.synchronize()
    eager_ms = (time.perf_counter() - t0) / 20 * 1e3
    # NCCL's teardown blocks while a graph holding its kernels is alive: drop it first.
    del graph, out
    gc.collect()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dist.destroy_process_group()
    destroy_s = time.perf_counter() - t0
    faulthandler.cancel_dump_traceback_later()
    if rank == 0:
        print(
            "RESULT",
            json.dumps(
                dict(
                    probe="nccl_graph",
                    mode=args.mode,
                    subgroup=args.subgroup,
                    async_op=args.async_op,
                    ok=diff == 0.0,
                    max_abs_diff=diff,
                    capture_s=round(captured_s, 3),
                    replay_ms=round(replay_ms, 3),
                    eager_ms=round(eager_ms, 3),
                    destroy_s=round(destroy_s, 3),
                    torch=torch.__version__,
                    nccl=".".join(map(str, torch.cuda.nccl.version())),
                )
            ),
            flush=True,
        )
    sys.exit(0)


if __name__ == "__main__":
    main()
