"""Per-stage timings in the result: the gateway's Finished event, the SDK's Timings, and
`ditmesh generate --verbose`.

A stage reports its own work in trailing metadata (services/common/timings.py), the
gateway adds each stage's queue wait and the rest of the call (transfer) and sends them
in `Finished.stages`; the SDK turns them into parts that add up to the total.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from concurrent import futures

import grpc
import pytest

from ditmesh.client import Client, GenerateParams, StageTimings, Timings, generate_cmd
from ditmesh.client.wire import _make_result
from ditmesh.common import timings
from ditmesh.v1 import gateway_pb2

# ----------------------------------------------------------------------------- the stage's clock


def test_work_clock_sends_the_work_and_phases_in_the_trailers():
    """A response-streaming call reports its work (less its waits for request messages)
    and the phases it marked; a phase outside any call only times nothing."""
    with timings.phase("nowhere"):
        pass

    def handler(requests, context):
        n = sum(1 for _ in requests)
        with timings.phase("image_encode"):
            sum(range(200_000))
        yield gateway_pb2.Queued(position=n)

    generic = grpc.method_handlers_generic_handler(
        "t.T",
        {
            "Run": grpc.stream_stream_rpc_method_handler(
                handler,
                request_deserializer=gateway_pb2.Queued.FromString,
                response_serializer=gateway_pb2.Queued.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[timings.WorkClock()])
    server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            run = ch.stream_stream(
                "/t.T/Run",
                request_serializer=gateway_pb2.Queued.SerializeToString,
                response_deserializer=gateway_pb2.Queued.FromString,
            )

            def slow_requests():
                import time

                for i in range(3):
                    time.sleep(0.1)  # the caller is slow: that is not the stage's work
                    yield gateway_pb2.Queued(position=i)

            call = run(slow_requests())
            answers = list(call)
            reported = timings.parse(call.trailing_metadata())
    finally:
        server.stop(0)
    assert answers[0].position == 3
    assert set(reported) == {"work", "image_encode"}
    assert 0 < reported["image_encode"] <= reported["work"] < 0.25


def test_parse_without_a_report_is_empty():
    assert timings.parse((("x-other", "1"),)) == {}
    assert timings.parse(None) == {}


# ----------------------------------------------------------------------------- the SDK


def _finished() -> gateway_pb2.Finished:
    def stage(name, queue, work, transfer, image_encode=0.0):
        return gateway_pb2.StageTiming(
            stage=name,
            queue_seconds=queue,
            work_seconds=work,
            transfer_seconds=transfer,
            image_encode_seconds=image_encode,
            attempts=1,
            replica="127.0.0.1:1",
        )

    return gateway_pb2.Finished(
        seed=7,
        num_images=1,
        encode_seconds=0.2,
        denoise_seconds=1.1,
        decode_seconds=0.45,
        total_seconds=1.8,
        stages=[
            stage("encoder", 0.05, 0.1, 0.05),
            stage("denoiser", 0.1, 0.9, 0.1),
            stage("vae", 0.0, 0.4, 0.05, image_encode=0.25),
        ],
    )


def test_result_timings_add_up_to_the_total():
    result = _make_result("rid", [], _finished())
    t = result.timings
    assert t.stage("vae") == StageTimings(
        stage="vae",
        queue=0.0,
        work=0.4,
        transfer=0.05,
        image_encode=0.25,
        attempts=1,
        replica="127.0.0.1:1",
    )
    parts = t.breakdown()
    assert list(parts) == [
        "queue",
        "encode",
        "transfer",
        "denoise",
        "decode",
        "image_encode",
        "other",
        "total",
    ]
    assert parts["queue"] == pytest.approx(0.15)
    assert parts["encode"] == pytest.approx(0.1)
    assert parts["transfer"] == pytest.approx(0.2)
    assert parts["denoise"] == pytest.approx(0.9)
    assert parts["decode"] == pytest.approx(0.15)  # the VAE's work less its image encoding
    assert parts["image_encode"] == pytest.approx(0.25)
    assert parts["other"] == pytest.approx(0.05)
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(t.total)


def test_an_older_gateway_without_stages_still_gives_timings():
    old = gateway_pb2.Finished(seed=1, num_images=1, total_seconds=1.0, encode_seconds=0.1)
    t = _make_result("rid", [], old).timings
    assert t.stages == () and t.queue == 0 and t.encode == pytest.approx(0.1)
    assert t.breakdown()["other"] == pytest.approx(1.0)


def test_print_timings_names_every_part_and_stage():
    out = io.StringIO()
    generate_cmd.print_timings(_make_result("rid", [], _finished()).timings, out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("timings: queue 0.150 s, encode 0.100 s, transfer 0.200 s")
    assert "denoise 0.900 s, decode 0.150 s, image encoding 0.250 s" in lines[0]
    assert lines[0].endswith("total 1.800 s")
    assert [line.split()[0] for line in lines[1:]] == ["encoder", "denoiser", "vae"]
    assert "image encoding 0.250 s" in lines[3]


# ----------------------------------------------------------------------------- through a mesh


def _check_mesh_timings(t: Timings, fmt_costs: bool) -> None:
    assert [s.stage for s in t.stages] == ["encoder", "denoiser", "vae"]
    walls = {"encoder": t.encode, "denoiser": t.denoise, "vae": t.decode}
    for s in t.stages:
        assert s.work > 0 and s.transfer >= 0 and s.queue >= 0, s
        assert s.attempts == 1 and s.replica.startswith("127.0.0.1:"), s
        # The parts of a stage fit in its wall time at the gateway.
        assert s.queue + s.work + s.transfer <= walls[s.stage] + 1e-3, (s, walls[s.stage])
    vae = t.stage("vae")
    if fmt_costs:
        assert 0 < vae.image_encode < vae.work
    else:
        assert vae.image_encode == 0 or vae.image_encode < vae.work
    parts = t.breakdown()
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(t.total, abs=1e-6)


def test_the_mesh_reports_each_stage(inproc_mesh):
    with Client(inproc_mesh.address, timeout=120) as client:
        result = client.generate("a red fox", GenerateParams(height=64, width=64, steps=2, seed=3))
    _check_mesh_timings(result.timings, fmt_costs=True)


def test_unary_generate_reports_each_stage_too(inproc_mesh):
    with Client(inproc_mesh.address, timeout=120) as client:
        result = client.generate_unary(
            "a blue square",
            GenerateParams(height=64, width=64, steps=2, seed=4, output_format="jpeg"),
        )
    _check_mesh_timings(result.timings, fmt_costs=True)
    assert result.formats == ["jpeg"]


def test_generate_verbose_prints_where_the_time_went(inproc_mesh, tmp_path):
    out = tmp_path / "fox.png"
    proc = subprocess.run(
        [sys.executable, "-m", "ditmesh.cli", "generate", "a red fox", "--verbose"]
        + ["--gateway", inproc_mesh.address, "--steps", "2", "--height", "64", "--width", "64"]
        + ["--seed", "5", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(out) and out.exists()
    summary = next(line for line in lines if line.startswith("timings: "))
    for part in ("queue", "encode", "transfer", "denoise", "decode", "image encoding", "total"):
        assert f"{part} " in summary, summary
    stages = [line.split()[0] for line in lines if line.startswith("  ")]
    assert stages == ["encoder", "denoiser", "vae"]


def test_without_verbose_no_timings_are_printed():
    parser = argparse.ArgumentParser(prog="ditmesh")
    generate_cmd.add_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["generate", "x"]).show_timings is False
    assert parser.parse_args(["generate", "x", "--verbose"]).show_timings is True
