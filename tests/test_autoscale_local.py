"""End to end: `ditmesh up --autoscale on`, where the gateway starts and stops its stages.

A bounded burst of requests makes the denoiser pool grow from one process to two, and
it shrinks back once the burst is over; every request completes exactly once (one
`finished` event, one access-log line) with the image a lone request with the same seed
makes after the burst, on one replica again (the same bytes). The lone request comes
after, not before: with a half-second decision period one request is a rate of 2/s, which
may rightly add a replica by itself. Decision period and windows are short here (flags)
so that it fits in well under a minute and a half on a shared two-core machine.
"""

from __future__ import annotations

import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

from .helpers import UpProcess

pytestmark = pytest.mark.slow

FLAGS = (
    "--autoscale=on",
    "--autoscale-period=0.5",
    "--scale-down-window=2",
    "--ready-timeout=60",
    "--denoiser-replicas-max=2",
    "--denoiser-target-wait=0.2",
    "--encoder-replicas-max=1",
    "--vae-replicas-max=1",
    "--drain-seconds=5",
    # A busy shared CPU (a new process loading while others serve) may stall a step for
    # seconds; that is not what this test is about.
    "--watchdog-min-seconds=120",
)
GROWN = re.compile(r"autoscale local: denoiser 1 -> 2")
SHRUNK = re.compile(r"autoscale local: denoiser 2 -> 1")
JOINED = re.compile(r"denoiser replica (\S+) is healthy")


def generate(stub, rid: str) -> tuple[bytes, int]:
    req = gateway_pb2.GenerateRequest(
        prompt="a red fox in the snow",
        height=64,
        width=64,
        steps=8,
        seed=11,
        guidance=3.5,
        request_id=rid,
    )
    data, finished = b"", 0
    for e in stub.Generate(req, timeout=120):
        kind = e.WhichOneof("event")
        if kind == "image":
            data += e.image.data
        finished += kind == "finished"
    return data, finished


def wait_for(pattern: re.Pattern, lines: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(pattern.search(line) for line in list(lines)):
            return True
        time.sleep(0.2)
    return False


def test_a_burst_grows_the_denoiser_pool_and_it_shrinks_back(tiny_flux):
    mesh = UpProcess(tiny_flux, *FLAGS)
    try:
        ch = grpc.insecure_channel(mesh.address)
        stub = gateway_pb2_grpc.GatewayStub(ch)
        assert not any(GROWN.search(line) for line in mesh.stderr)  # it starts with one
        ids = [f"burst-{i}-{uuid.uuid4().hex[:6]}" for i in range(16)]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda rid: generate(stub, rid), ids))
        assert wait_for(GROWN, mesh.stderr, 10), "the denoiser was not scaled up"
        # The second process joins the pool (healthy) and later leaves it.
        assert wait_for(SHRUNK, mesh.stderr, 40), "the denoiser did not shrink back"
        joined = {m.group(1) for line in mesh.stderr if (m := JOINED.search(line))}
        assert len(joined) >= 2, joined
        want, finished = generate(stub, "reference")
        assert want and finished == 1
        for rid, (data, done) in zip(ids, results, strict=True):
            assert done == 1, rid
            assert data == want, f"{rid}: not the reference image"
        log = "".join(mesh.stderr)
        for rid in ["reference", *ids]:
            assert log.count(f"request={rid} ") == 1, rid
        ch.close()
    finally:
        code = mesh.stop()
    assert code == 0, "".join(mesh.stderr[-40:])
