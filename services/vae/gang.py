"""The VAE gang: M processes that decode one request's latents together (distvae).

Why: at 2K-4K the VAE decode, not the transformer, is what runs out of GPU memory
and time on one card. distvae's `parallelize_decoder` splits the decoder's
activations by height across a process group (halo exchange for the convolutions,
group norm statistics reduced over the group), so each rank holds 1/M of the big
up-block activations and the ranks together produce the single-process image.

Shape (the same as the denoiser gang's; the shared life cycle is
services/common/gangs.py): rank 0, the leader, serves gRPC and spawns ranks 1..M-1. Every rank loads the VAE and builds
a sharded copy of it. Per request the leader scales the latents, broadcasts them
on a gloo control group (which waits for the next job without a practical
timeout), and all ranks decode; distvae gathers the full image on every rank and
the leader post-processes it. Compute collectives run on the default group (NCCL
on GPU, gloo on CPU) with a timeout, so a dead worker fails the request with
UNAVAILABLE and marks the gang broken; the service then exits non-zero.

Latents too short to split (fewer latent rows than ranks) are decoded by the
leader alone with the plain decoder it keeps beside the sharded one: such images
are tiny (under 8*M pixels high), so one rank is the right tool, and the answer
is the single-process image rather than an error.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass

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
from ditmesh.common.models import ModelRef, pick_dtype, resolve_model
from ditmesh.vae.decoder import VaeDecoder, to_uint8

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class VaeGangSpec:
    """Everything a rank needs to join the gang; plain values, so it crosses processes."""

    model: ModelRef
    """Resolved once by the leader, so workers read no configs (and import no pipelines)."""
    launch: GangLaunch


def check_parallel(m: int, flag: str = "--parallel") -> None:
    """Refuses a gang size that is not a process count, with the flag's name in the sentence."""
    if m < 1:
        raise InvalidArgument(
            f"{flag} is the number of VAE processes and must be 1 or more; got {m}"
        )


def split_fits(latent_height: int, world: int) -> bool:
    """Whether distvae can split latents this tall over `world` ranks.

    Its 2D decoder adapter cuts the latent rows (after the mid block) into one band
    per rank, at least one row each; bands may differ by a row, and a 3x3
    convolution's one-row halo fits in a one-row band. So the rule is rows >= ranks;
    tests/test_vae_gang.py checks heights equal to and just above the rank count.
    """
    return latent_height >= world


def parallel_copy(vae: torch.nn.Module, group: dist.ProcessGroup | None = None) -> torch.nn.Module:
    """A copy of `vae` whose decoder is sharded over `group` (None: the default group).

    A copy because distvae rebuilds the decoder in place and the leader still needs
    the plain one for latents too short to split. The parameters and buffers are
    seeded into deepcopy's memo, so only the module structure is copied and the
    weights exist once in memory.
    """
    try:
        from distvae.vae.parallel import parallelize_decoder
    except ImportError as exc:
        raise FailedPrecondition(
            "a VAE gang needs distvae; install it with `pip install ditmesh[vae]`"
        ) from exc
    shared = {id(t): t for t in itertools.chain(vae.parameters(), vae.buffers())}
    sharded = copy.deepcopy(vae, memo=shared)
    try:
        parallelize_decoder(sharded, group)
    except ValueError as exc:
        raise FailedPrecondition(
            f"this model's VAE cannot be split across processes: {exc}"
        ) from exc
    return sharded


def init_gang(spec: VaeGangSpec, rank: int) -> torch.device:
    """Joins the default process group (NCCL on GPU, gloo on CPU); returns this rank's device."""
    return spec.launch.join(rank, rank)  # on a CPU it also shares the cores out


class VaeMember:
    """One rank's VAE (plain and sharded) and control group, in an initialised process group.

    Every rank builds one, in the same order: creating the control group is itself a
    collective. The sharded decoder uses the default group.
    """

    def __init__(self, model: ModelRef, device: torch.device, dtype: str) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = device
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.model = model
        self.local = VaeDecoder(self.model, device, pick_dtype(dtype, device))
        self.sharded = parallel_copy(self.local.vae)
        self.solo_decodes = 0
        """Requests the leader decoded alone because they were too short to split (logs, tests)."""

    def broadcast(self, z: torch.Tensor | None) -> torch.Tensor | None:
        """Leader: sends scaled latents (None = stop). Workers: pass None, get them (on CPU)."""
        got = broadcast_tensor_dict(None if z is None else (None, {"z": z}), group=self.control)
        return None if got is None else got[1]["z"]

    @torch.inference_mode()
    def decode_sharded(self, z: torch.Tensor) -> torch.Tensor:
        """All ranks together: scaled latents -> the whole image in [-1, 1], on every rank."""
        return self.sharded.decode(z.to(self.device), return_dict=False)[0]

    def lead_decode(self, latents: torch.Tensor) -> np.ndarray:
        """Leader: float images [N, H, W, 3] in [0, 1] for the denoiser's (unscaled) latents.

        Decoded by the whole gang when the split fits, else by the leader alone with the
        plain decoder (the workers are not involved and keep waiting for the next job).
        """
        rows = latents.shape[2]
        if not split_fits(rows, self.world):
            log.info(
                "%d latent rows cannot be split over %d ranks; the leader decodes alone",
                rows,
                self.world,
            )
            self.solo_decodes += 1
            return self.local.decode_float(latents)
        z = self.local.scale_latents(latents)
        self.broadcast(z)
        image = self.decode_sharded(z)
        return self.local.processor.postprocess(image, output_type="np")

    def follow(self) -> None:
        """Worker: decodes what the leader sends until it says stop."""
        while (z := self.broadcast(None)) is not None:
            self.decode_sharded(z)

    def leave(self) -> bool:
        return leave_process_group()


def join_gang(spec: VaeGangSpec, rank: int) -> VaeMember:
    """Joins the gang as `rank` and builds that rank's member."""
    return VaeMember(spec.model, init_gang(spec, rank), spec.launch.dtype)


def worker_main(spec: VaeGangSpec, rank: int) -> None:
    """Entry point of ranks 1..M-1 (spawned by the leader)."""
    follow_leader(lambda: join_gang(spec, rank), rank, "vae-rank")


class VaeGang(GangLeader):
    """The leader's side of the gang, with VaeDecoder's interface for the VAE service.

    `decode(latents)` -> uint8 [N, H, W, 3]; `decode_float` -> float in [0, 1];
    `check_latents` and `model` as VaeDecoder's. Requests are decoded one at a time
    (the ranks follow one stream of jobs).
    """

    member: VaeMember

    def __init__(self, model_source: str, launch: GangLaunch, *, name: str | None = None) -> None:
        """Starts `launch.world` processes; `launch` should have a fresh loopback rendezvous
        (`launch.rendezvous()`): MASTER_PORT may belong to a denoiser gang."""
        check_parallel(launch.world)
        if launch.world < 2:
            raise InvalidArgument("a VAE gang needs 2 or more processes; use VaeDecoder for one")
        if dist.is_initialized():
            raise FailedPrecondition(
                "a VAE gang needs a process of its own: torch.distributed is already set up here"
            )
        # Resolved before any process starts, so a bad folder is one clear error.
        spec = VaeGangSpec(model=resolve_model(model_source, name), launch=launch)
        self.world = launch.world
        workers = WorkerProcesses(worker_main, lambda r: (spec, r), launch.world, "vae")
        super().__init__("VAE gang", launch, workers, lambda: join_gang(spec, 0))
        self.model: ModelRef = self.member.model
        log.info("VAE gang ready: %d processes (%s)", launch.world, self.member.device)

    def check_latents(self, latents: torch.Tensor, height: int, width: int) -> None:
        self.member.local.check_latents(latents, height, width)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Returns uint8 images [N, H, W, 3], as VaeDecoder.decode."""
        return to_uint8(self.decode_float(latents))

    def decode_float(self, latents: torch.Tensor) -> np.ndarray:
        """Float images [N, H, W, 3] in [0, 1], decoded by the whole gang when the split fits."""
        return self.exclusive(
            lambda: self.member.lead_decode(latents),
            failed="the VAE gang failed (a process died or a collective timed out)",
            # Any failure mid-decode leaves the ranks out of step, so the gang is done for.
            fatal=lambda exc: True,
        )


__all__ = [
    "VaeGang",
    "VaeGangSpec",
    "VaeMember",
    "check_parallel",
    "init_gang",
    "parallel_copy",
    "split_fits",
    "worker_main",
]
