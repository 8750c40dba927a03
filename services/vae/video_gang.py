"""The video VAE gang: M processes that decode one video together, split by height (issue 18).

Why: a video VAE decode (CogVideoX at 720x480x49, Mochi-1 at 848x480x163) is what runs out
of GPU memory, not the transformer. Each rank here holds 1/M of the rows of every
activation, and the ranks together give the single-process frames (<= 1e-5 in float32).

Shape: the image gang's (gang.py, and the life cycle in services/common/gangs.py): rank 0,
the leader, serves gRPC and spawns ranks 1..M-1; each rank loads the family's VideoDecoder
and a sharded copy of its VAE that shares the weights. Per video the leader scales the
latents (`VideoDecoder.vae_input`), broadcasts them on the gloo control group, and every
rank runs the family's own decode (`VideoDecoder.iter_pixels`) on the sharded copy:

- CogVideoX and Mochi-1 (3-D causal VAEs): each rank takes its band of latent rows
  (patch3d.row_bands) and the copy made by patch3d.shard_causal_vae (distvae's halo-
  exchanging convolutions and gang-wide group norms patched into diffusers' blocks: its
  docstring says what distvae covers and what is added). After each piece (CogVideoX: each
  latent frame batch of its conv-cached loop) the bands are gathered on the leader alone.
- Latte (the 2-D SD VAE, frames in the batch): distvae's own `parallelize_decoder`
  (gang.parallel_copy), which splits after the mid block and gathers on every rank.

The leader post-processes each piece and yields it (`iter_decode`), so frames can stream
on while the next piece is decoded. Latents with fewer rows than ranks are decoded by the
leader alone with the plain VAE, as in the image gang. A dead worker or a timed-out
collective fails the request with UNAVAILABLE and breaks the gang for good (GangLeader).
What the service does with the frames (containers, chunks) is service.py's and video.py's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from ditmesh.common.errors import FailedPrecondition, InvalidArgument
from ditmesh.common.gangs import (
    IDLE_TIMEOUT,
    GangLaunch,
    GangLeader,
    WorkerProcesses,
    broadcast_tensor_dict,
    follow_leader,
    leave_process_group,
)
from ditmesh.common.models import ModelRef, load_class, pick_dtype, resolve_model
from ditmesh.vae.decoder import to_uint8
from ditmesh.vae.gang import VaeGangSpec, check_parallel, init_gang, parallel_copy, split_fits
from ditmesh.vae.patch3d import gather_rows, row_bands, shard_causal_vae
from ditmesh.vae.video_decoder import VideoDecoder

log = logging.getLogger(__name__)


def sharded_vae(decoder: VideoDecoder) -> tuple[torch.nn.Module, bool]:
    """The sharded copy of `decoder.vae` over the default group, and whether it takes a band
    of rows (the 3-D VAEs) rather than the whole latents (distvae's 2-D decoder)."""
    from diffusers import AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLMochi

    vae = decoder.vae
    if isinstance(vae, AutoencoderKLCogVideoX | AutoencoderKLMochi):
        return shard_causal_vae(vae), True
    if isinstance(vae, AutoencoderKL):
        return parallel_copy(vae), False
    raise FailedPrecondition(
        f"the video VAE gang does not know how to split {type(vae).__name__} across processes"
    )


class VideoVaeMember:
    """One rank's video decoder (plain and sharded) and control group.

    Every rank builds one, in the same order (creating the control group is a collective).
    """

    def __init__(self, model: ModelRef, device: torch.device, dtype: str) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = device
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.model = model
        self.local: VideoDecoder = load_class(model.family.video_decoder)(
            model, device, pick_dtype(dtype, device)
        )
        self.sharded, self.by_rows = sharded_vae(self.local)
        self.solo_decodes = 0
        """Videos the leader decoded alone because they were too short to split (logs, tests)."""
        self.band_rows: list[int] = []
        """This rank's latent rows in each video it decoded by rows (tests: the split happened)."""

    def broadcast(self, z: torch.Tensor | None) -> torch.Tensor | None:
        """Leader: sends one video's VAE input (None = stop). Workers: pass None, get it."""
        got = broadcast_tensor_dict(None if z is None else (None, {"z": z}), group=self.control)
        return None if got is None else got[1]["z"]

    @torch.inference_mode()
    def pieces(self, z: torch.Tensor) -> Iterator[torch.Tensor | None]:
        """All ranks together: the whole video's pixels piece by piece on the leader (None on
        the workers, for the 3-D VAEs whose bands are gathered on the leader only)."""
        z = z.to(self.device)
        if not self.by_rows:
            yield from self.local.iter_pixels(self.sharded, z)
            return
        bands = row_bands(z.shape[-2], self.world)
        start, rows = bands[self.rank]
        self.band_rows.append(rows)
        for band in self.local.iter_pixels(self.sharded, z[..., start : start + rows, :]):
            scale = band.shape[-2] // rows  # pixel rows per latent row, the same on every rank
            yield gather_rows(band, [n * scale for _, n in bands])

    def lead_iter(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """Leader: one video's float frames [f, H, W, 3] in [0, 1], piece by piece."""
        z = self.local.vae_input(latents)
        rows = z.shape[-2]
        if not split_fits(rows, self.world):
            log.info(
                "%d latent rows cannot be split over %d ranks; decoding alone", rows, self.world
            )
            self.solo_decodes += 1
            yield from self.local.iter_float(latents)
            return
        self.broadcast(z)
        for pixels in self.pieces(z):
            yield self.local.postprocess(pixels)

    def follow(self) -> None:
        """Worker: decodes what the leader sends until it says stop."""
        while (z := self.broadcast(None)) is not None:
            for _ in self.pieces(z):
                pass

    def leave(self) -> bool:
        return leave_process_group()


def join_video_gang(spec: VaeGangSpec, rank: int) -> VideoVaeMember:
    """Joins the gang as `rank` and builds that rank's member."""
    return VideoVaeMember(spec.model, init_gang(spec, rank), spec.launch.dtype)


def video_worker_main(spec: VaeGangSpec, rank: int) -> None:
    """Entry point of ranks 1..M-1 (spawned by the leader)."""
    follow_leader(lambda: join_video_gang(spec, rank), rank, "video-vae-rank")


class VideoVaeGang(GangLeader):
    """The leader's side, with a VideoDecoder's interface for the VAE service: `video`,
    `model`, `latent_shape`, `check_latents`, `decode`, `decode_float`, `iter_decode`,
    `is_broken`, `close`. One video is decoded at a time (the ranks follow one stream)."""

    video = True
    member: VideoVaeMember

    def __init__(self, model_source: str, launch: GangLaunch, *, name: str | None = None) -> None:
        """Starts `launch.world` processes; `launch` should have a fresh loopback rendezvous
        (`launch.rendezvous()`): MASTER_PORT may belong to a denoiser gang."""
        check_parallel(launch.world)
        if launch.world < 2:
            raise InvalidArgument("a VAE gang needs 2 or more processes; use the family's decoder")
        if dist.is_initialized():
            raise FailedPrecondition(
                "a VAE gang needs a process of its own: torch.distributed is already set up here"
            )
        spec = VaeGangSpec(model=resolve_model(model_source, name), launch=launch)
        if not spec.model.video:
            raise InvalidArgument(f"model {spec.model.name!r} makes images; use VaeGang")
        self.world = launch.world
        self._video = threading.Lock()
        """Held for a whole video: its pieces are separate `exclusive` calls."""
        workers = WorkerProcesses(video_worker_main, lambda r: (spec, r), launch.world, "vae")
        super().__init__("video VAE gang", launch, workers, lambda: join_video_gang(spec, 0))
        self.model: ModelRef = self.member.model
        log.info("video VAE gang ready: %d processes (%s)", launch.world, self.member.device)

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        return self.member.local.latent_shape(height, width, num_frames)

    def check_latents(
        self, latents: torch.Tensor, height: int, width: int, num_frames: int = 0
    ) -> None:
        self.member.local.check_latents(latents, height, width, num_frames)

    def iter_float(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """One video's ([1, ...]) float frames [f, H, W, 3] in [0, 1], piece by piece.

        Each piece is one `exclusive` step, so a process lost between pieces fails the next
        one with UNAVAILABLE. A consumer that stops early still has the rest decoded (and
        dropped): the workers are in the middle of the same video and must finish it.
        """
        with self._video:
            pieces = self.member.lead_iter(latents)
            done = False
            try:
                while (piece := self._step(pieces)) is not None:
                    yield piece
                done = True
            finally:
                if not done and not self.is_broken():
                    while self._step(pieces) is not None:
                        pass

    def _step(self, pieces: Iterator[np.ndarray]) -> np.ndarray | None:
        return self.exclusive(
            lambda: next(pieces, None),
            failed="the video VAE gang failed (a process died or a collective timed out)",
            # Any failure mid-video leaves the ranks out of step, so the gang is done for.
            fatal=lambda exc: True,
        )

    def iter_decode(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """One video's uint8 frames [f, H, W, 3] as they are decoded (VideoDecoder's)."""
        # Closed here, not whenever it is collected: closing finishes the video on every rank.
        with contextlib.closing(self.iter_float(latents)) as pieces:
            for piece in pieces:
                yield to_uint8(piece)

    def decode_float(self, latents: torch.Tensor) -> np.ndarray:
        """Float frames [N, F, H, W, 3] in [0, 1], the videos one after another."""
        return np.stack(
            [np.concatenate(list(self.iter_float(latents[i : i + 1]))) for i in range(len(latents))]
        )

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 frames [N, F, H, W, 3]."""
        return to_uint8(self.decode_float(latents))

    def close(self) -> None:
        """GangLeader.close, once the video being decoded (if any) is done: its workers are
        inside its collectives, not waiting for the stop message. A video that does not
        finish within the collective timeout is not waited for (its collectives fail)."""
        waited = self._video.acquire(timeout=self.launch.collective_timeout_s)
        try:
            super().close()
        finally:
            if waited:
                self._video.release()


__all__ = ["VideoVaeGang", "VideoVaeMember", "sharded_vae", "video_worker_main"]
