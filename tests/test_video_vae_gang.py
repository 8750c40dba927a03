"""The video VAE gang (issue 18) against the single-process decode, and streamed pieces.

Tolerances, float32 on CPU: the float frames in [0, 1] (before uint8 rounding) may differ
by FLOAT_TOL = 1e-5 from the single decode, and the uint8 frames must be equal wherever
that tolerance cannot move the rounding: a reference value within FLOAT_TOL of a rounding
boundary (k + 0.5 levels) may land one level off, as a few values of a thousand-odd near
such a boundary do for Latte (distvae's group norm sums in another order: about 3e-6 off).
The only differences there should be are the orders in which the gang sums statistics.

One start of M processes per gang size runs every family and case (they fork from a
forkserver that imported torch, diffusers and distvae once). The cases: latent rows that
do not divide by M (5 rows: 3+2 over 2 ranks, 2+1+1+1 over 4), one row per rank,
CogVideoX at 9 frames (one latent frame batch) and 13 (two batches, so two pieces),
Latte's 16 frames (two VAE calls of 14 and 2), and latents shorter than the gang, which
the leader decodes alone. The end-to-end test starts a real VideoVaeGang (spawned worker)
for the parts only the leader's class has: batches of videos, a consumer that stops
early, and a dead worker failing the next video with UNAVAILABLE.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from ditmesh.common.errors import Unavailable
from ditmesh.common.gangs import GangLaunch, free_port
from ditmesh.common.models import ModelRef, load_class, resolve_model
from ditmesh.vae.decoder import to_uint8
from ditmesh.vae.gang import VaeGangSpec, init_gang, split_fits
from ditmesh.vae.patch3d import row_bands
from ditmesh.vae.video_decoder import frame_batches
from ditmesh.vae.video_gang import VideoVaeMember

PRELOAD = [
    "tests.test_video_vae_gang",
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.models.autoencoders.autoencoder_kl_cogvideox",
    "diffusers.models.autoencoders.autoencoder_kl_mochi",
    "diffusers.video_processor",
    "distvae.vae.parallel",
    "distvae.modules.adapters.vae.decoder_adapters",
]
FLOAT_TOL = 1e-5

FAMILIES = ("cogvideox-2b", "mochi", "latte")
# (frames, latent rows, latent columns) per family; 3 rows are too short for 4 ranks.
CASES = {
    "cogvideox-2b": [(9, 5, 6), (13, 4, 5), (9, 3, 4)],
    "mochi": [(7, 5, 6), (13, 4, 4), (7, 3, 4)],
    "latte": [(16, 5, 6), (16, 3, 4)],
}
# Pieces `iter_decode` yields per case: CogVideoX one per latent frame batch, Latte one per
# 14 frames (LattePipeline's chunk), Mochi one (MochiPipeline decodes in one call).
PIECES = {"cogvideox-2b": [1, 2, 1], "mochi": [1, 1, 1], "latte": [2, 2]}


def make_latents(decoder, family: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(1, *decoder.latent_shape(8 * h, 8 * w, f), generator=g)
        for f, h, w in CASES[family]
    ]


def assert_uint8_equal(got: np.ndarray, want: np.ndarray, what) -> None:
    """The uint8 frames of `got` equal `want`'s except, by one level, where `want` lies
    within FLOAT_TOL of a rounding boundary (so a difference within tolerance may cross it)."""
    a, b = to_uint8(got), to_uint8(want)
    near = np.abs((want * 255) % 1 - 0.5) <= 255 * FLOAT_TOL
    assert not ((a != b) & ~near).any(), what
    assert int(np.abs(a.astype(np.int16) - b).max()) <= 1, what


def _rank_main(
    rank: int, world: int, port: int, models: dict[str, ModelRef], out_path: str
) -> None:
    launch = GangLaunch(
        world=world, master_port=port, device="cpu", dtype="float32", collective_timeout_s=60
    )
    device = init_gang(VaeGangSpec(model=next(iter(models.values())), launch=launch), rank)
    try:
        results: dict[str, dict] = {}
        for family, model in models.items():
            member = VideoVaeMember(model, device, "float32")
            if rank == 0:
                t0 = time.perf_counter()
                pieces = [list(member.lead_iter(z)) for z in make_latents(member.local, family)]
                weights = [
                    {p.data_ptr() for p in m.parameters()}
                    for m in (member.local.vae, member.sharded)
                ]
                results[family] = {
                    "pieces": pieces,
                    "solo": member.solo_decodes,
                    "band_rows": member.band_rows,
                    "shares_weights": weights[0] == weights[1],
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
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, ModelRef]:
    from ditmesh.tiny import make_tiny

    base = tmp_path_factory.mktemp("video-vae-gang")
    return {f: resolve_model(str(make_tiny(f, base / f))) for f in FAMILIES}


@pytest.fixture(scope="module")
def decoders(models) -> dict:
    return {
        f: load_class(m.family.video_decoder)(m, torch.device("cpu"), torch.float32)
        for f, m in models.items()
    }


@pytest.fixture(scope="module")
def single(decoders) -> dict[str, list[np.ndarray]]:
    """Each case's float frames [F, H, W, 3] from the single-process `decode_float`."""
    return {
        f: [dec.decode_float(z)[0] for z in make_latents(dec, f)] for f, dec in decoders.items()
    }


def test_row_bands_and_frame_batches():
    assert row_bands(5, 2) == [(0, 3), (3, 2)]
    assert row_bands(5, 4) == [(0, 2), (2, 1), (3, 1), (4, 1)]
    assert row_bands(4, 4) == [(0, 1), (1, 1), (2, 1), (3, 1)]
    # AutoencoderKLCogVideoX._decode's batches of 2: the odd frame goes with the first.
    assert frame_batches(1, 2) == [(0, 3)]  # sliced [0:3] of one frame: the frame
    assert frame_batches(3, 2) == [(0, 3)]
    assert frame_batches(4, 2) == [(0, 2), (2, 4)]
    assert frame_batches(13, 2) == [(0, 3)] + [(i, i + 2) for i in range(3, 13, 2)]


@pytest.mark.parametrize("family", FAMILIES)
def test_iter_decode_pieces_equal_decode(family, decoders, single):
    """Streaming changes nothing: the pieces joined are `decode(latents)[0]`, bit for bit."""
    dec = decoders[family]
    for z, want, count in zip(
        make_latents(dec, family), single[family], PIECES[family], strict=True
    ):
        pieces = list(dec.iter_decode(z))
        assert len(pieces) == count, family
        assert np.array_equal(np.concatenate(pieces), dec.decode(z)[0]), family
        assert np.array_equal(np.concatenate(list(dec.iter_float(z))), want), family


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_gang_decode_matches_single_process(models, single, world, tmp_path):
    out_path = str(tmp_path / f"video-vae-world{world}.pt")
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
        got = results[family]
        cases = CASES[family]
        fits = [split_fits(h, world) for _, h, _ in cases]
        assert got["shares_weights"], family  # the sharded copy holds no weights of its own
        assert got["solo"] == fits.count(False), family
        if family != "latte":  # the 3-D VAEs: the leader decoded its own band of rows
            assert got["band_rows"] == [
                row_bands(h, world)[0][1] for (_, h, _), f in zip(cases, fits, strict=True) if f
            ], family
        worst = 0.0
        for (f, h, w), pieces, want, count in zip(
            cases, got["pieces"], single[family], PIECES[family], strict=True
        ):
            assert len(pieces) == count, (family, f, h, w)  # the gang streams as one process
            frames = np.concatenate(pieces)
            assert frames.shape == want.shape, (family, f, h, w)
            err = float(np.abs(frames - want).max())
            assert err <= FLOAT_TOL, f"{family} M={world} {f} frames {h}x{w}: max abs {err:.2e}"
            assert_uint8_equal(frames, want, (family, f, h, w))
            worst = max(worst, err)
        report.append(f"{family}: max abs {worst:.2e}, {got['seconds']:.2f} s")
    print(f"\nvideo VAE gang M={world}: " + "; ".join(report))


@pytest.mark.slow
def test_video_gang_leader_streams_batches_and_fails_on_a_dead_worker(models, decoders):
    """A real VideoVaeGang of 2 (its worker spawned): a batch of two videos, a consumer
    that takes one piece and stops (the rest is decoded anyway, so the next video still
    comes out right), then a killed worker: UNAVAILABLE, and the gang is broken for good."""
    from ditmesh.vae.video_gang import VideoVaeGang

    model = models["cogvideox-2b"]
    dec = decoders["cogvideox-2b"]
    g = torch.Generator().manual_seed(1)
    two = torch.randn(2, *dec.latent_shape(40, 48, 13), generator=g)
    launch = GangLaunch(world=2, device="cpu", dtype="float32", collective_timeout_s=30)
    gang = VideoVaeGang(model.source, launch.rendezvous())
    try:
        assert gang.video and gang.model.name == model.name
        assert gang.latent_shape(40, 48, 13) == dec.latent_shape(40, 48, 13)
        gang.check_latents(two, 40, 48, 13)
        got = gang.decode_float(two)
        want = dec.decode_float(two)
        assert got.shape == want.shape and float(np.abs(got - want).max()) <= FLOAT_TOL

        stream = gang.iter_decode(two[:1])
        first = next(stream)
        assert np.array_equal(first, to_uint8(got[0, : len(first)]))
        stream.close()  # the other piece is decoded and dropped: the ranks stay in step
        pieces = list(gang.iter_decode(two[1:]))
        assert len(pieces) == 2
        assert np.array_equal(np.concatenate(pieces), to_uint8(got[1]))

        (worker,) = gang.workers.procs
        worker.kill()
        worker.join(timeout=10)
        with pytest.raises(Unavailable):
            gang.decode(two[:1])
        assert gang.is_broken()
        with pytest.raises(Unavailable):
            next(gang.iter_decode(two[:1]))
    finally:
        gang.close()


@pytest.mark.slow
def test_the_vae_stage_serves_a_video_through_its_gang(models, decoders):
    """`serve(parallel=2)` on a video model leads a video VAE gang: a 17-frame CogVideoX
    clip (CogVideoX takes 8k+1 frames) asked over gRPC as RAW comes back piece by piece (progress after each latent frame
    batch) and equals the single-process decode, as the gang's frames do above."""
    import grpc

    from ditmesh.common import codec
    from ditmesh.common.server import StageOptions
    from ditmesh.v1 import vae_pb2, vae_pb2_grpc
    from ditmesh.vae.service import serve

    model = models["cogvideox-2b"]
    dec = decoders["cogvideox-2b"]
    latents = torch.randn(1, *dec.latent_shape(40, 48, 17), generator=torch.Generator())
    want = dec.decode_float(latents)[0]
    running = serve(model.source, StageOptions(device="cpu", dtype="float32"), parallel=2)
    try:
        params = vae_pb2.DecodeParams(
            height=40,
            width=48,
            num_frames=17,
            fps=8,
            output_format=vae_pb2.OUTPUT_FORMAT_RAW,
            report_frames=True,
        )
        requests = codec.params_and_tensors_stream(
            vae_pb2.DecodeRequest, params, {"latents": latents}
        )
        with grpc.insecure_channel(running.address) as channel:
            answer = list(vae_pb2_grpc.VaeStub(channel).Decode(requests, timeout=120))
    finally:
        running.stop(0)
    progress = [m.progress.frames_done for m in answer if m.HasField("progress")]
    assert progress[-1] == 17 and len(progress) == 2, progress  # two latent frame batches
    data = b"".join(m.data for m in answer if not m.HasField("progress"))
    frames = np.frombuffer(data, np.uint8).reshape(17, 40, 48, 3)
    near = np.abs((want * 255) % 1 - 0.5) <= 255 * FLOAT_TOL
    ref = to_uint8(want)
    assert not ((frames != ref) & ~near).any()
    assert int(np.abs(frames.astype(np.int16) - ref).max()) <= 1
