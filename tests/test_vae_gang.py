"""The VAE gang (distvae over gloo, real processes) against the single-process decode.

Tolerances, float32 on CPU: the float images in [0, 1] (before uint8 rounding, so
the value range is 1) may differ by FLOAT_TOL = 1e-4; the uint8 images by 1 level.
distvae's group norm sums its statistics in another order, which is all the
difference there should be (about 1e-5 is typical).

One start of M processes per gang size runs every family and case (starting
processes, not decoding, is what costs time; they fork from a forkserver that has
imported torch and diffusers once). The cases include a non-square latent, band
splits that do not divide evenly, one latent row per rank, and latents shorter than
the gang, which the leader decodes alone with the plain decoder.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from ditmesh.common import codec
from ditmesh.common.gangs import GangLaunch, free_port
from ditmesh.common.models import ModelRef, resolve_model
from ditmesh.common.server import StageOptions
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc, vae_pb2, vae_pb2_grpc
from ditmesh.vae.decoder import VaeDecoder, to_uint8
from ditmesh.vae.gang import VaeGangSpec, VaeMember, init_gang, split_fits

from .helpers import UpProcess, decode_events, max_diff, reference

PRELOAD = [
    "tests.test_vae_gang",
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.image_processor",
    "distvae.vae.parallel",
    "distvae.modules.adapters.vae.decoder_adapters",
]
FLOAT_TOL = 1e-4
UINT8_TOL = 1

FAMILIES = ("flux", "sd3", "pixart-sigma")
# (images, latent rows, latent columns). 12x20 is the non-square one; 5 rows split 3+2
# over 2 ranks and 2+1+1+1 over 4; 4 rows give 4 ranks one row each; 3 rows are too
# short for 4 ranks and 1 row too short for 2, so the leader decodes those alone.
CASES = [(1, 8, 8), (1, 12, 20), (2, 5, 7), (1, 4, 6), (1, 3, 10), (1, 1, 4)]


def make_latents(channels: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, channels, h, w, generator=g) for n, h, w in CASES]


def _rank_main(
    rank: int, world: int, port: int, models: dict[str, ModelRef], out_path: str
) -> None:
    launch = GangLaunch(
        world=world, master_port=port, device="cpu", dtype="float32", collective_timeout_s=60
    )
    spec = VaeGangSpec(model=next(iter(models.values())), launch=launch)
    device = init_gang(spec, rank)
    try:
        results: dict[str, dict] = {}
        for family, model in models.items():
            member = VaeMember(model, device, "float32")
            if rank == 0:
                latents = make_latents(member.model.latent_channels)
                t0 = time.perf_counter()
                images = [member.lead_decode(z) for z in latents]
                ptrs = [
                    {p.data_ptr() for p in m.parameters()}
                    for m in (member.local.vae, member.sharded)
                ]
                results[family] = {
                    "images": images,
                    "solo": member.solo_decodes,
                    "shares_weights": ptrs[0] == ptrs[1],
                    "seconds": time.perf_counter() - t0,
                }
                member.broadcast(None)
            else:
                member.follow()
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", autouse=True)
def _preloaded_forkserver() -> None:
    """Ranks fork from a server that imported torch and diffusers once, not each on its own.

    Importing them is most of a rank's start-up on a small CPU machine; the gang's own
    spawn start is covered by the end-to-end test below.
    """
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)


@pytest.fixture(scope="module")
def models(tiny_flux, tmp_path_factory) -> dict[str, ModelRef]:
    from ditmesh.tiny import make_tiny

    base = tmp_path_factory.mktemp("vae-gang")
    out = {"flux": resolve_model(tiny_flux)}
    for family in FAMILIES[1:]:
        out[family] = resolve_model(str(make_tiny(family, base / family)))
    return out


@pytest.fixture(scope="module")
def single(models) -> dict[str, list[np.ndarray]]:
    out = {}
    for family, model in models.items():
        dec = VaeDecoder(model, torch.device("cpu"), torch.float32)
        out[family] = [dec.decode_float(z) for z in make_latents(dec.model.latent_channels)]
    return out


def test_the_split_rule():
    assert split_fits(2, 2) and split_fits(4, 4) and split_fits(5, 4)
    assert not split_fits(1, 2) and not split_fits(3, 4)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_gang_decode_matches_single_process(models, single, world, tmp_path):
    out_path = str(tmp_path / f"vae-world{world}.pt")
    tmp.start_processes(
        _rank_main,
        args=(world, free_port(), models, out_path),
        nprocs=world,
        join=True,
        start_method="forkserver",
    )
    results = torch.load(out_path, weights_only=False)
    assert set(results) == set(FAMILIES)
    report = []
    for family in FAMILIES:
        got_all, want_all = results[family]["images"], single[family]
        # Every case whose rows fit went through the gang; the others through the leader alone.
        # The sharded copy holds no weights of its own.
        assert results[family]["shares_weights"], family
        assert results[family]["solo"] == sum(not split_fits(h, world) for _, h, _ in CASES)
        worst = 0.0
        for (n, h, w), got, want in zip(CASES, got_all, want_all, strict=True):
            assert got.shape == want.shape == (n, 8 * h, 8 * w, 3), (family, h, w)
            err = float(np.abs(got - want).max())
            assert err <= FLOAT_TOL, f"{family} M={world} latent {h}x{w}: max abs {err:.2e}"
            assert max_diff(to_uint8(got), to_uint8(want)) <= UINT8_TOL, (family, h, w)
            worst = max(worst, err)
        report.append(f"{family}: max abs {worst:.2e}, {results[family]['seconds']:.2f} s")
    print(f"\nVAE gang M={world}: " + "; ".join(report))


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pipe(tiny_flux):
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(tiny_flux)
    p.set_progress_bar_config(disable=True)
    return p


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _decode_request(latents: torch.Tensor, height: int, width: int):
    params = vae_pb2.DecodeParams(
        request_id="dead", height=height, width=width, output_format=vae_pb2.OUTPUT_FORMAT_RAW
    )
    return codec.params_and_tensors_stream(vae_pb2.DecodeRequest, params, {"latents": latents})


@pytest.mark.slow
def test_up_with_a_vae_gang_matches_diffusers_then_a_dead_worker_stops_it(tiny_flux, pipe):
    mesh = UpProcess(tiny_flux, "--vae-parallel", "2")
    try:
        with grpc.insecure_channel(mesh.address) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            req = gateway_pb2.GenerateRequest(
                prompt="a red fox in the snow", height=64, width=96, steps=3, seed=7
            )
            images, kinds = decode_events(list(stub.Generate(req, timeout=120)))
        assert kinds[-1] == "finished"
        ref = reference(pipe, "a red fox in the snow", height=64, width=96, steps=3, seed=7)
        assert len(images) == 1 and images[0].shape == (64, 96, 3)
        assert max_diff(images[0], ref[0]) <= UINT8_TOL

        # The VAE stage logs its address; its one child that is not multiprocessing's
        # resource tracker is the gang's worker.
        log = "".join(mesh.stderr)
        vae_address = re.search(r"vae listening on (\S+:\d+)", log).group(1)
        (vae_pid,) = [p for p in _children(mesh.proc.pid) if " serve vae " in _cmdline(p)]
        workers = [p for p in _children(vae_pid) if "resource_tracker" not in _cmdline(p)]
        assert len(workers) == 1
        import os

        os.kill(workers[0], signal.SIGKILL)
        time.sleep(0.3)
        with grpc.insecure_channel(vae_address) as ch:
            with pytest.raises(grpc.RpcError) as info:
                list(
                    vae_pb2_grpc.VaeStub(ch).Decode(
                        _decode_request(torch.randn(1, 16, 8, 8), 64, 64), timeout=60
                    )
                )
        # From the gang ("the VAE gang lost ...") or, if its watcher was quicker, from a
        # server already shutting down: UNAVAILABLE either way, never an image.
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # The stage exits non-zero, and `up` stops the mesh and exits non-zero with it.
        assert mesh.proc.wait(timeout=60) != 0
        assert "the vae stage exited with code 1" in "".join(mesh.stderr)
    finally:
        if mesh.proc.poll() is None:
            mesh.stop()


@pytest.mark.slow
def test_the_vae_stage_exits_when_a_request_is_stuck_on_a_dead_worker(tiny_flux, monkeypatch):
    """The denoiser's policy, now the VAE stage's too (one watcher, common/gang_watch.py).

    Collectives that never time out (CUDA graphs) cannot be made on CPU, so the gang is a
    leader of fake processes whose decode blocks after its worker "dies"; the stage's own
    watcher must end the process (here: record the exit and unblock the request).
    """
    from ditmesh.common import gang_watch
    from ditmesh.common.gangs import GangLeader
    from ditmesh.vae import service as vae_service

    from .helpers import FakeMember, FakeWorkers

    monkeypatch.setattr(dist, "barrier", lambda group=None: None)
    monkeypatch.setattr(gang_watch, "STUCK_GRACE_S", 0.0)
    release = threading.Event()
    exits: list[int] = []

    def exit_process(code: int) -> None:
        exits.append(code)
        release.set()

    monkeypatch.setattr(gang_watch, "exit_process", exit_process)

    class StuckGang(GangLeader):
        def __init__(self, model_source: str, launch, *, name=None) -> None:
            super().__init__("VAE gang", launch, FakeWorkers(), FakeMember)
            self.model = resolve_model(model_source, name)

        def check_latents(self, latents, height, width) -> None:
            pass

        def decode(self, latents):
            def stuck():
                self.workers.dead_names.append("vae-rank1")
                release.wait(60)
                return np.zeros((1, 64, 64, 3), np.uint8)

            return self.exclusive(stuck, "unused", lambda exc: True)

        def close(self) -> None:
            pass  # no processes to stop

    monkeypatch.setattr(vae_service, "VaeGang", StuckGang)
    running = vae_service.serve(
        tiny_flux, StageOptions(device="cpu"), parallel=2, collective_timeout_s=0.5
    )
    try:
        with grpc.insecure_channel(running.address) as ch:
            stub = vae_pb2_grpc.VaeStub(ch)
            list(stub.Decode(_decode_request(torch.randn(1, 16, 8, 8), 64, 64), timeout=60))
        assert exits == [1]
    finally:
        running.stop(0)
