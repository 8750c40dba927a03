"""The denoiser gang behind the real mesh, and what happens when a gang process dies."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

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


@pytest.mark.parametrize(
    "gang",
    [["--ulysses", "2"], ["--cfg", "2"], ["--pipefusion", "2", "--pipefusion-warmup", "3"]],
    ids=["u2", "cfg2", "pf2-exact"],
)
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


def _denoise_request(height=64, width=64, steps=2):
    cond = {"prompt_embeds": torch.randn(1, 5, 32), "pooled_prompt_embeds": torch.randn(1, 32)}
    params = denoiser_pb2.DenoiseParams(
        request_id="r", height=height, width=width, steps=steps, guidance=3.5, seed=1, num_images=1
    )
    return codec.params_and_tensors_stream(denoiser_pb2.DenoiseRequest, params, cond)


class GangProcess:
    """`ditmesh serve denoiser --ring 2` as a child process, and its one worker."""

    def __init__(self, model: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ditmesh.cli",
                "serve",
                "denoiser",
                "--model",
                model,
                "--ring",
                "2",
                "--collective-timeout",
                "20",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()
        m = re.match(r"denoiser listening on (\S+)", line)
        assert m, line
        self.address = m.group(1)
        self.workers = [
            p
            for p in _children(self.proc.pid)
            if "resource_tracker" not in open(f"/proc/{p}/cmdline").read()
        ]
        assert len(self.workers) == 1

    def kill_worker(self) -> None:
        os.kill(self.workers[0], signal.SIGKILL)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def test_a_worker_dying_mid_request_fails_it_with_unavailable_and_the_leader_exits(tiny_flux):
    gang = GangProcess(tiny_flux)
    try:
        with grpc.insecure_channel(gang.address) as ch:
            stub = denoiser_pb2_grpc.DenoiserStub(ch)
            assert any(
                r.WhichOneof("payload") == "done"
                for r in stub.Denoise(_denoise_request(), timeout=60)
            )
            stream = stub.Denoise(_denoise_request(128, 128, steps=400), timeout=120)
            with pytest.raises(grpc.RpcError) as info:
                for r in stream:
                    if r.WhichOneof("payload") == "step" and r.step.step == 2:
                        gang.kill_worker()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "gang" in info.value.details()
        assert gang.proc.wait(timeout=60) != 0
    finally:
        gang.close()


def test_a_worker_dying_while_idle_stops_the_leader(tiny_flux):
    gang = GangProcess(tiny_flux)
    try:
        gang.kill_worker()
        assert gang.proc.wait(timeout=60) != 0  # no request needed to notice
        with grpc.insecure_channel(gang.address) as ch:
            with pytest.raises(grpc.RpcError) as info:
                list(denoiser_pb2_grpc.DenoiserStub(ch).Denoise(_denoise_request(), timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gang.close()


def test_a_gang_started_by_torchrun_serves_the_single_process_result(tiny_flux):
    from ditmesh.denoiser.job import DenoiseJob

    from .parallel_harness import REL_TOL, relative_error, single

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.Popen(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "-m",
            "ditmesh.cli",
            "serve",
            "denoiser",
            "--model",
            tiny_flux,
            "--ulysses",
            "2",
            "--collective-timeout",
            "30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        address = None
        for line in proc.stdout:
            m = re.match(r"denoiser listening on (\S+)", line)
            if m:
                address = m.group(1)
                break
        assert address, "the torchrun gang did not start"
        torch.manual_seed(3)
        cond = {"prompt_embeds": torch.randn(1, 5, 32), "pooled_prompt_embeds": torch.randn(1, 32)}
        params = denoiser_pb2.DenoiseParams(
            request_id="t", height=48, width=80, steps=2, guidance=3.5, seed=4, num_images=1
        )
        asm = codec.TensorAssembler()
        with grpc.insecure_channel(address) as ch:
            for r in denoiser_pb2_grpc.DenoiserStub(ch).Denoise(
                codec.params_and_tensors_stream(denoiser_pb2.DenoiseRequest, params, cond),
                timeout=60,
            ):
                if r.WhichOneof("payload") == "chunk":
                    asm.add(r.chunk)
        got = asm.finish()["latents"]
        job = DenoiseJob(
            request_id="t",
            height=48,
            width=80,
            steps=2,
            guidance=3.5,
            true_cfg_scale=1.0,
            seed=4,
            num_images=1,
            cond=cond,
        )
        want = single(tiny_flux, [job])[0]
        assert relative_error(got, want) <= REL_TOL
        # torchrun itself reports a SIGTERM as a failure; what matters is that all stop.
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
