"""The denoiser gang behind the real mesh, what happens when a gang process dies, and
the pieces both gangs share (torchrun's environment, the launch, the job broadcast)."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys

import grpc
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from ditmesh.common import codec
from ditmesh.common.gangs import (
    GangLaunch,
    TorchrunEnv,
    broadcast_tensor_dict,
    free_port,
    torchrun_env,
)
from ditmesh.v1 import denoiser_pb2, denoiser_pb2_grpc, gateway_pb2, gateway_pb2_grpc

from .helpers import UpProcess, decode_events, max_diff, reference


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
@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_gang_started_by_torchrun_serves_the_single_process_result(tiny_flux):
    from ditmesh.denoiser.job import DenoiseJob

    from .helpers import REL_TOL, relative_error, single

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


# ------------------------------------------------------- the pieces both gangs share

TORCHRUN = {
    "RANK": "3",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "4",
    "MASTER_ADDR": "10.0.0.2",
    "MASTER_PORT": "29500",
}


def test_torchrun_s_environment_is_read_into_plain_values():
    env = torchrun_env(TORCHRUN)
    assert env == TorchrunEnv(
        rank=3, local_rank=1, world_size=4, master_addr="10.0.0.2", master_port=29500
    )
    assert env.active
    alone = torchrun_env({})
    assert alone == TorchrunEnv() and not alone.active


def test_a_launch_meets_at_torchrun_s_rendezvous_else_on_a_loopback_port():
    launch = GangLaunch(world=4, device="cpu", collective_timeout_s=30)
    under = launch.rendezvous(torchrun_env(TORCHRUN))
    assert (under.master_addr, under.master_port, under.torchrun) == ("10.0.0.2", 29500, True)
    assert pickle.loads(pickle.dumps(under)) == under  # plain values: it crosses processes
    alone = launch.rendezvous()
    assert (alone.master_addr, alone.torchrun) == ("127.0.0.1", False) and alone.master_port > 0
    # MASTER_ADDR / MASTER_PORT without torchrun: a fixed meeting point, reached by tcp://.
    fixed = launch.rendezvous(torchrun_env({"MASTER_ADDR": "10.0.0.3", "MASTER_PORT": "29501"}))
    assert (fixed.master_addr, fixed.master_port, fixed.torchrun) == ("10.0.0.3", 29501, False)
    assert under.timeout.total_seconds() == 30


def test_the_denoiser_spec_takes_its_world_from_the_layout(tiny_flux):
    from ditmesh.denoiser.gang import GangSpec
    from ditmesh.denoiser.parallel.mesh import ParallelConfig

    spec = GangSpec.of(
        tiny_flux, ParallelConfig(ulysses=2, ring=2), device="cpu", env=torchrun_env(TORCHRUN)
    )
    assert spec.launch.world == 4 and spec.launch.torchrun and spec.launch.device == "cpu"


def _broadcast_rank(rank: int, port: int, out_dir: str) -> None:
    GangLaunch(world=2, device="cpu", master_port=port).join(rank, rank)
    try:
        control = dist.new_group(backend="gloo")
        header = {"request_id": "r", "steps": 3, "guidance": 3.5}
        tensors = {
            "x": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),  # not contiguous
            "mask": torch.tensor([True, False, True]),
            "half": torch.full((1, 4), 0.5, dtype=torch.bfloat16),
            "empty": torch.zeros(0, 5, dtype=torch.int64),
        }
        got = broadcast_tensor_dict((header, tensors) if rank == 0 else None, group=control)
        stop = broadcast_tensor_dict(None, group=control)
        torch.save({"sent": (header, tensors), "got": got, "stop": stop}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_broadcast_tensor_dict_round_trip_on_two_processes(tmp_path):
    tmp.spawn(_broadcast_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"{rank}.pt")
        (header, tensors), (got_header, got) = out["sent"], out["got"]
        assert got_header == header, rank
        assert list(got) == list(tensors), rank  # same names, same order
        for name, want in tensors.items():
            assert got[name].dtype == want.dtype and got[name].shape == want.shape, (rank, name)
            assert torch.equal(got[name], want), (rank, name)
        assert out["stop"] is None, rank
