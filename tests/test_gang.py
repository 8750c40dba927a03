"""The denoiser gang behind the real mesh, and what happens when a gang process dies."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch

from ditmesh.common import codec
from ditmesh.v1 import denoiser_pb2, denoiser_pb2_grpc, gateway_pb2, gateway_pb2_grpc

from .conftest import UpProcess
from .test_mesh import decode_events, max_diff, reference


@pytest.fixture(scope="module")
def pipe(tiny_flux):
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(tiny_flux)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("gang", [["--ulysses", "2"], ["--cfg", "2"]], ids=["u2", "cfg2"])
def test_mesh_with_a_two_process_gang_matches_diffusers(tiny_flux, pipe, gang):
    mesh = UpProcess(tiny_flux, *gang)
    try:
        with grpc.insecure_channel(mesh.address) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            # 48x80: 15 image tokens, not divisible by 2; true CFG so cfg2 splits real work.
            req = gateway_pb2.GenerateRequest(
                prompt="a castle",
                negative_prompt="fog",
                true_cfg_scale=2.0,
                height=48,
                width=80,
                steps=3,
                seed=9,
                num_images=2,
            )
            images, kinds = decode_events(list(stub.Generate(req, timeout=120)))
        assert kinds.count("step") == 3
        ref = reference(
            pipe,
            "a castle",
            height=48,
            width=80,
            steps=3,
            seed=9,
            negative_prompt="fog",
            true_cfg_scale=2.0,
            num_images_per_prompt=2,
        )
        for got, want in zip(images, ref, strict=True):
            assert max_diff(got, want) <= 1
    finally:
        assert mesh.stop() == 0


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


def _denoise_request(height=64, width=64):
    cond = {"prompt_embeds": torch.randn(1, 5, 32), "pooled_prompt_embeds": torch.randn(1, 32)}
    yield denoiser_pb2.DenoiseRequest(
        params=denoiser_pb2.DenoiseParams(
            request_id="r", height=height, width=width, steps=2, guidance=3.5, seed=1, num_images=1
        )
    )
    for c in codec.iter_tensor_chunks(cond):
        yield denoiser_pb2.DenoiseRequest(chunk=c)
    yield denoiser_pb2.DenoiseRequest(done=codec.done_message(cond))


def test_a_dead_worker_makes_the_leader_answer_unavailable_and_exit(tiny_flux):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ditmesh.client.cli",
            "serve",
            "denoiser",
            "--model",
            tiny_flux,
            "--ring",
            "2",
            "--collective-timeout",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        m = re.match(r"denoiser listening on (\S+)", line)
        assert m, line
        with grpc.insecure_channel(m.group(1)) as ch:
            stub = denoiser_pb2_grpc.DenoiserStub(ch)
            assert any(
                r.WhichOneof("payload") == "done"
                for r in stub.Denoise(_denoise_request(), timeout=60)
            )
            workers = [
                p
                for p in _children(proc.pid)
                if "resource_tracker" not in open(f"/proc/{p}/cmdline").read()
            ]
            assert len(workers) == 1
            import os

            os.kill(workers[0], signal.SIGKILL)
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Denoise(_denoise_request(), timeout=60))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "gang" in info.value.details()
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
