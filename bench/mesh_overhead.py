"""What the mesh adds to one request, on one GPU: the request through gateway, encoder,
denoiser and VAE against the denoiser + decode alone (bench/gang_gpu.py, same call).

Starts the three stages on one GPU and a gateway (the code of bench/mesh_throughput.py),
then, one request at a time: the first request after start (PNG), then `--requests` each
in PNG, JPEG and raw. For each it keeps the client's wall time and the gateway's own
breakdown (`GenerateResult.timings.breakdown()`: queue, encode, transfer, denoise,
decode, image encoding, the gateway's own time). Prints `RESULT {json}` per format
and a table; the caller compares `total` with gang_gpu.py's denoise + decode.

`--trace` also starts an OTLP/gRPC receiver here and points the mesh at it with the
sampler `parentbased_always_off`: the timed requests start no trace (their spans are
not recorded), and one last PNG request, sent with a sampled W3C `traceparent`, is
traced through all four services; its spans are printed as a table (start offset and
duration per span, the denoiser's step spans summed) and written to `trace.json`.

    python bench/mesh_overhead.py --model /tmp/flux-mesh --denoiser-flags "--compile --cuda-graphs"
    python bench/mesh_overhead.py --model /tmp/tiny-flux --device cpu --height 64 --width 64 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mesh_throughput import start, stop  # noqa: E402

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


class Receiver:
    """An OTLP/gRPC TraceService that keeps (service, name, trace, span, parent, start, end)."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        spans = self.spans = []

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                for rs in request.resource_spans:
                    attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for sp in ss.spans:
                            spans.append(
                                dict(
                                    service=attrs.get("service.name", ""),
                                    name=sp.name,
                                    trace=sp.trace_id.hex(),
                                    span=sp.span_id.hex(),
                                    parent=sp.parent_span_id.hex(),
                                    start=sp.start_time_unix_nano,
                                    end=sp.end_time_unix_nano,
                                )
                            )
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"


def traced_request(address: str, args) -> str:
    """One PNG request with a sampled traceparent; returns its trace id."""
    import grpc

    from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

    trace_id = os.urandom(16).hex()
    parent = f"00-{trace_id}-{os.urandom(8).hex()}-01"
    req = gateway_pb2.GenerateRequest(
        prompt=args.prompt, height=args.height, width=args.width, steps=args.steps, seed=99
    )
    with grpc.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 256 << 20)]
    ) as ch:
        for _ in gateway_pb2_grpc.GatewayStub(ch).Generate(
            req, timeout=args.request_timeout, metadata=(("traceparent", parent),)
        ):
            pass
    return trace_id


def trace_table(spans: list[dict], trace_id: str) -> list[dict]:
    mine = sorted((s for s in spans if s["trace"] == trace_id), key=lambda s: s["start"])
    if not mine:
        return []
    t0 = mine[0]["start"]
    rows, steps = [], []
    for s in mine:
        if "step" in s["name"].split():
            steps.append(s)
            continue
        rows.append(
            dict(
                service=s["service"],
                span=s["name"],
                start_ms=round((s["start"] - t0) / 1e6, 1),
                ms=round((s["end"] - s["start"]) / 1e6, 1),
            )
        )
    if steps:
        rows.append(
            dict(
                service=steps[0]["service"],
                span=f"{len(steps)} step spans (sum)",
                start_ms=round((steps[0]["start"] - t0) / 1e6, 1),
                ms=round(sum(s["end"] - s["start"] for s in steps) / 1e6, 1),
            )
        )
    return rows


def summarise(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    return {k: round(statistics.median(r[k] for r in rows), 4) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--denoiser-flags", default="")
    ap.add_argument("--encoder-flags", default="", help="e.g. --compile")
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
    ap.add_argument("--trace", action="store_true", help="trace one last request (see above)")
    args = ap.parse_args()
    receiver = None
    if args.trace:
        receiver = Receiver()
        os.environ.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_TRACES_SAMPLER="parentbased_always_off",
            OTEL_BSP_SCHEDULE_DELAY="200",
        )
    layout = [
        (stage, "0", shlex.split(flags))
        for stage, flags in (
            ("encoder", args.encoder_flags),
            ("denoiser", args.denoiser_flags),
            ("vae", ""),
        )
    ]
    procs, address = start(args, layout)
    rows: list[dict] = []
    spans: list[dict] = []
    try:
        with Client(address) as client:
            first = one(client, args, "png", 0)
            rows.append({"format": "png", "which": "first", **first})
            for fmt in args.formats.split(","):
                runs = [one(client, args, fmt, 1 + i) for i in range(args.requests)]
                rows.append({"format": fmt, "which": f"median of {len(runs)}", **summarise(runs)})
        if receiver is not None:
            trace_id = traced_request(address, args)
            time.sleep(2.0)  # the batch processors export every 200 ms
            spans = trace_table(receiver.spans, trace_id)
    finally:
        stop(procs)
    if spans:
        with open(os.path.join(args.out, "trace.json"), "w") as f:
            json.dump(spans, f, indent=1)
        print("| service | span | start ms | ms |")
        print("|---|---|---|---|")
        for r in spans:
            print(f"| {r['service']} | {r['span']} | {r['start_ms']} | {r['ms']} |")
    base = dict(
        system="ditmesh",
        bench="mesh_overhead",
        denoiser_flags=args.denoiser_flags,
        encoder_flags=args.encoder_flags,
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
