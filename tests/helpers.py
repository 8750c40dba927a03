"""Helpers the test modules share: one module, so no test imports another test's helpers.

- Parallel equivalence (`ParallelEquivalence`, `spawn_layouts`, ...): spawns gloo gangs of
  2 and 4 processes; each runs every layout of its size over the same jobs, and rank 0's
  latents are compared with the single-process latents. Tolerance: max |parallel - single|
  <= 1e-4 * max |single| (float32 on CPU). A family's test is a subclass naming the family
  and its jobs.
- Tiny-model variants that `make_tiny` does not build, for code paths real checkpoints take.
- Meshes: `InProcessMesh` (the four stages as servers in this process), `UpProcess`
  (`ditmesh up` in a child), `ProcessMesh` (each stage a `ditmesh serve` child, the gateway
  here, so a stage can be killed, frozen or restarted and the gateway's queues inspected).
- Images: the plain-diffusers `reference`, `decode_events`, `max_diff`; `flux_jobs`.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import grpc
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from ditmesh.common.models import resolve_model
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.mesh import ParallelConfig, build_mesh, single_process_mesh
from ditmesh.denoiser.parallel.sequence import attach
from ditmesh.denoiser.runner import load_adapter
from ditmesh.denoiser.sampler import sample
from ditmesh.denoiser.speed import EAGER, Speedups
from ditmesh.denoiser.speed import apply as apply_speedups
from ditmesh.gateway.main import serve
from ditmesh.gateway.settings import GatewaySettings
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc, vae_pb2

# ------------------------------------------------------------ Parallel equivalence, reusable per model family.

REL_TOL = 1e-4

LAYOUTS = {
    2: {"u2": dict(ulysses=2), "r2": dict(ring=2), "cfg2": dict(cfg=2), "dp2": dict(dp=2)},
    4: {
        "u2r2": dict(ulysses=2, ring=2),
        "u4": dict(ulysses=4),
        "r4": dict(ring=4),
        "cfg2u2": dict(cfg=2, ulysses=2),
    },
}


def run_layouts(
    model_dir: str, jobs: list[DenoiseJob], layouts: dict[str, dict], speed: Speedups = EAGER
) -> dict[str, list[torch.Tensor]]:
    """Runs every layout in this (already initialised) process group; rank 0 gets results."""
    model = resolve_model(model_dir)
    adapter = load_adapter(model, torch.device("cpu"), "float32")
    apply_speedups(adapter, speed)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, degrees in layouts.items():
        cfg = ParallelConfig(**degrees)
        cfg.check_model(heads=adapter.heads)
        mesh = build_mesh(cfg, rank, world, timeout=timedelta(seconds=60))
        attached = attach(adapter.transformer, adapter.plan, mesh)
        try:
            out[name] = [sample(adapter, job, mesh) for job in jobs]
        finally:
            if attached is not None:
                attached.detach(adapter.transformer)
    return out


def join_gloo(rank: int, world: int, port: int) -> None:
    """A spawned test rank: one thread, gloo on loopback."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )


def _rank_main(
    rank: int,
    world: int,
    port: int,
    model_dir: str,
    jobs,
    layouts,
    out_path: str,
    speed: Speedups = EAGER,
) -> None:
    join_gloo(rank, world, port)
    try:
        results = run_layouts(model_dir, jobs, layouts, speed)
        if rank == 0:
            torch.save(results, out_path)
            if speed.compile:  # what fell out of the compiled graphs, for the compile tests
                counters = torch._dynamo.utils.counters
                breaks = {k: dict(counters[k]) for k in ("graph_break", "unimplemented")}
                torch.save(breaks, out_path + ".graph_breaks")
    finally:
        dist.destroy_process_group()


def spawn_layouts(
    model_dir: str,
    jobs: list[DenoiseJob],
    world: int,
    tmp_path,
    layouts: dict[str, dict] | None = None,
    speed: Speedups = EAGER,
) -> dict[str, list[torch.Tensor]]:
    from ditmesh.denoiser.gang import free_port

    out_path = str(tmp_path / f"world{world}.pt")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp.spawn(
        _rank_main,
        args=(world, free_port(), model_dir, jobs, layouts or LAYOUTS[world], out_path, speed),
        nprocs=world,
        join=True,
    )
    return torch.load(out_path)


def single(model_dir: str, jobs: list[DenoiseJob]) -> list[torch.Tensor]:
    model = resolve_model(model_dir)
    adapter = load_adapter(model, torch.device("cpu"), "float32")
    return [sample(adapter, job, single_process_mesh()) for job in jobs]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


class ParallelEquivalence:
    """Subclass with `family` set and `make_jobs(model_dir)` returning the jobs to compare.

    The jobs must include a resolution whose image token count divides neither 2 nor 4,
    and CFG (so cfg2 layouts split real work) and more than one image (for dp2).
    """

    family: str = ""

    @classmethod
    def make_jobs(cls, model_dir: str) -> list[DenoiseJob]:
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory) -> str:
        from ditmesh.tiny import make_tiny

        return str(make_tiny(cls.family, tmp_path_factory.mktemp(cls.family) / "model"))

    @pytest.fixture(scope="class")
    @classmethod
    def jobs(cls, model_dir):
        return cls.make_jobs(model_dir)

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls, model_dir, jobs):
        return single(model_dir, jobs)

    @pytest.mark.parametrize("world", [2, 4])
    def test_layouts_match_single_process(self, model_dir, jobs, reference, world, tmp_path):
        results = spawn_layouts(model_dir, jobs, world, tmp_path)
        assert set(results) == set(LAYOUTS[world])
        for layout, latents in results.items():
            for i, (got, want) in enumerate(zip(latents, reference, strict=True)):
                assert got.shape == want.shape, (layout, i)
                err = relative_error(got, want)
                assert err <= REL_TOL, f"{self.family} {layout} job {i}: relative error {err:.2e}"


# ------------------------------------------------------------ Tiny-model variants that `make_tiny` does not build, for code paths real checkpoints take.


def pixart_alpha_with_micro_conditions(
    folder: str | pathlib.Path, *, seed: int = 1
) -> pathlib.Path:
    """Rewrites a tiny PixArt-alpha's transformer the way the 1024-px alpha checkpoint is:
    it embeds the image size and aspect ratio (micro-conditions).

    PixArtAlphaPipeline sends them only when `sample_size` is 128, and the
    transformer splits its width in thirds for them, so both are set here
    (4 heads of 24 = 96 wide; the head count stays divisible by 2 and 4).
    """
    from diffusers import PixArtTransformer2DModel

    folder = pathlib.Path(folder)
    cfg = dict(PixArtTransformer2DModel.load_config(folder, subfolder="transformer"))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.update(
        sample_size=128,
        use_additional_conditions=True,
        attention_head_dim=24,
        cross_attention_dim=cfg["num_attention_heads"] * 24,
    )
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(**cfg).eval()
    assert transformer.use_additional_conditions
    transformer.save_pretrained(folder / "transformer")
    return folder


def sd35_medium_style(folder: str | pathlib.Path, *, seed: int = 1) -> pathlib.Path:
    """Rewrites a tiny SD3's transformer the way SD3.5-medium is: RMS q/k norms and a
    second, image-only attention (`attn2`) in the first block.

    The last block stays a plain one, so both block kinds are exercised.
    """
    from diffusers import SD3Transformer2DModel

    folder = pathlib.Path(folder)
    cfg = dict(SD3Transformer2DModel.load_config(folder, subfolder="transformer"))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.update(dual_attention_layers=(0,), qk_norm="rms_norm")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**cfg).eval()
    assert transformer.transformer_blocks[0].attn2 is not None
    transformer.save_pretrained(folder / "transformer")
    return folder


def hunyuandit_v11_style(folder: str | pathlib.Path, *, seed: int = 1) -> pathlib.Path:
    """Rewrites a tiny HunyuanDiT's transformer the way v1.0/v1.1 are: it embeds the
    image meta size (original, target, crop) and the style (v1.2, make_tiny's, not)."""
    from diffusers import HunyuanDiT2DModel

    folder = pathlib.Path(folder)
    cfg = dict(HunyuanDiT2DModel.load_config(folder, subfolder="transformer"))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.update(use_style_cond_and_image_meta_size=True)
    torch.manual_seed(seed)
    HunyuanDiT2DModel(**cfg).eval().save_pretrained(folder / "transformer")
    return folder


# ------------------------------------------------------------ Meshes on loopback: in this process, or `ditmesh up` as a user runs it


class InProcessMesh:
    """The four stages as real gRPC servers in this process (faster to start than `up`)."""

    def __init__(self, model: str, denoisers: int = 1) -> None:
        from ditmesh.denoiser.service import serve as serve_denoiser
        from ditmesh.encoder.service import serve as serve_encoder
        from ditmesh.gateway.main import serve as serve_gateway
        from ditmesh.vae.service import serve as serve_vae

        self.encoder = serve_encoder(model)
        self.denoisers = [serve_denoiser(model) for _ in range(denoisers)]
        self.vae = serve_vae(model)
        self.gateway = serve_gateway(
            model,
            encoder=[self.encoder.address],
            denoiser=[d.address for d in self.denoisers],
            vae=[self.vae.address],
        )

    @property
    def address(self) -> str:
        return self.gateway.address

    def stop(self) -> None:
        for s in (self.gateway, self.encoder, *self.denoisers, self.vae):
            s.stop(0)


class UpProcess:
    """`ditmesh up` in a child process, as the README runs it.

    Its stages run one torch thread each unless OMP_NUM_THREADS is set already: five or
    more processes on two shared cores, each spinning threads that wait for each other,
    make a step several times slower (a burst of 16 small requests: 18 s against 2.5 s)."""

    def __init__(self, model: str, *extra: str) -> None:
        env = {**os.environ}
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ditmesh.cli", "up", "--model", model, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.address = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.match(r"gateway listening on (\S+)", line)
            if m:
                self.address = m.group(1)
                break
        if self.address is None:
            self.proc.kill()
            raise RuntimeError("ditmesh up did not start:\n" + "".join(self.stderr[-50:]))

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


# ------------------------------------------------------------ Images: the plain-diffusers reference and the mesh's events decoded


def reference(pipe, prompt, *, height, width, steps, seed, guidance=3.5, **kw) -> list[np.ndarray]:
    out = pipe(
        prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    return [np.asarray(im.convert("RGB")) for im in out.images]


def decode_events(events) -> tuple[list[np.ndarray], list[str]]:
    kinds = [e.WhichOneof("event") for e in events]
    data: dict[int, bytes] = {}
    meta: dict[int, gateway_pb2.GenerateEvent] = {}
    for e in events:
        if e.WhichOneof("event") == "image":
            data[e.image.index] = data.get(e.image.index, b"") + e.image.data
            if e.image.offset == 0:
                meta[e.image.index] = e.image
    images = []
    for i in sorted(data):
        if meta[i].format == vae_pb2.OUTPUT_FORMAT_RAW:
            images.append(
                np.frombuffer(data[i], np.uint8).reshape(meta[i].height, meta[i].width, 3)
            )
        else:
            images.append(np.asarray(Image.open(io.BytesIO(data[i])).convert("RGB")))
    return images, kinds


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# ------------------------------------------------------------ Flux jobs every parallel test runs


def flux_jobs(model_dir: str) -> list[DenoiseJob]:
    from diffusers import FluxTransformer2DModel

    cfg = FluxTransformer2DModel.load_config(model_dir, subfolder="transformer")
    resolve_model(model_dir)
    g = torch.Generator().manual_seed(0)

    def cond(text_len: int, prefix: str = "") -> dict[str, torch.Tensor]:
        return {
            prefix + "prompt_embeds": torch.randn(
                1, text_len, cfg["joint_attention_dim"], generator=g
            ),
            prefix + "pooled_prompt_embeds": torch.randn(
                1, cfg["pooled_projection_dim"], generator=g
            ),
        }

    both = {**cond(7), **cond(7, "negative_")}
    common = dict(steps=3, guidance=3.5, seed=5)
    return [
        # 64x64: 16 image tokens, divisible by 2 and 4; true CFG on; 2 images (dp2 splits them).
        # 8 text tokens: Ulysses alone splits them across the ranks too (7 and 5 below: not).
        DenoiseJob(
            request_id="a",
            height=64,
            width=64,
            true_cfg_scale=2.0,
            num_images=2,
            cond={**cond(8), **cond(8, "negative_")},
            **common,
        ),
        # 48x80: 15 image tokens, divisible by neither 2 nor 4; 3 images split 2 + 1 under dp2.
        DenoiseJob(
            request_id="b",
            height=48,
            width=80,
            true_cfg_scale=1.5,
            num_images=3,
            cond=both,
            **common,
        ),
        # No CFG: cfg2 halves compute the same branch.
        DenoiseJob(
            request_id="c",
            height=48,
            width=48,
            true_cfg_scale=1.0,
            num_images=1,
            cond=cond(5),
            **common,
        ),
        # 16x80: 5 image tokens. At 4 ranks each holds 2, and the padding (3) runs over more
        # than the last rank's shard; 8 text tokens, split across the ranks under Ulysses.
        DenoiseJob(
            request_id="d",
            height=16,
            width=80,
            true_cfg_scale=1.0,
            num_images=1,
            cond=cond(8),
            **common,
        ),
    ]


# ------------------------------------------------------------ Stages as `ditmesh serve` processes, the gateway in this process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stage:
    """`ditmesh serve STAGE` as a child process; its stderr goes to a file.

    `wait=False` returns once the process is started; `wait_listening()` then waits for
    its address, so several stages load their models at once (ProcessMesh)."""

    def __init__(self, stage: str, model: str, log_dir, port: int = 0, wait: bool = True) -> None:
        self.stage = stage
        self.log_path = log_dir / f"{stage}-{port or 'any'}-{time.monotonic_ns()}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "ditmesh.cli", "serve", stage, "--model", model]
        cmd += ["--port", str(port)]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env
        )
        if wait:
            self.wait_listening()

    def wait_listening(self) -> None:
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"{self.stage} did not start:\n{self.log_path.read_text()[-3000:]}")
        self.address = line.split()[-1]
        self.port = int(self.address.rsplit(":", 1)[1])

    def log_text(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(30)
        self._log.close()


def health(address: str, timeout: float = 1.0) -> int:
    with grpc.insecure_channel(address) as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            .status
        )


def wait_for(pred, timeout: float, step: float = 0.05) -> float:
    """Seconds until `pred()` held; fails the test after `timeout`."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.monotonic() - t0


def request(**kw) -> gateway_pb2.GenerateRequest:
    base = dict(prompt="a red fox", height=64, width=64, steps=2, seed=7)
    return gateway_pb2.GenerateRequest(**{**base, **kw})


class ProcessMesh:
    def __init__(self, model: str, log_dir, *, denoisers: int = 1, **settings) -> None:
        # All stages start at once: on two cores their imports and model loads overlap
        # with each other's waits, a few seconds less per mesh than one after another.
        self.encoder = Stage("encoder", model, log_dir, wait=False)
        self.denoisers = [Stage("denoiser", model, log_dir, wait=False) for _ in range(denoisers)]
        self.vae = Stage("vae", model, log_dir, wait=False)
        try:
            for s in self.stages():
                s.wait_listening()
        except BaseException:
            for s in self.stages():
                s.stop()
            raise
        self.gateway = serve(
            model,
            encoder=[self.encoder.address],
            denoiser=[d.address for d in self.denoisers],
            vae=[self.vae.address],
            settings=GatewaySettings(**settings),
        )
        self.channel = grpc.insecure_channel(self.gateway.address)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    @property
    def core(self):
        return self.gateway.gateway

    def stages(self) -> list[Stage]:
        return [self.encoder, *self.denoisers, self.vae]

    def stop(self) -> None:
        self.channel.close()
        self.gateway.stop(0)
        for s in self.stages():
            s.stop()


def sd3_jobs(model_dir: str) -> list[DenoiseJob]:
    from diffusers import SD3Transformer2DModel

    cfg = SD3Transformer2DModel.load_config(model_dir, subfolder="transformer")
    g = torch.Generator().manual_seed(0)

    def cond(text_len: int, prefix: str = "") -> dict[str, torch.Tensor]:
        return {
            prefix + "prompt_embeds": torch.randn(
                1, text_len, cfg["joint_attention_dim"], generator=g
            ),
            prefix + "pooled_prompt_embeds": torch.randn(
                1, cfg["pooled_projection_dim"], generator=g
            ),
        }

    # SD3 pads CLIP and T5 to a fixed length; lengths here just need to differ from
    # the image's so a mix-up of text and image tokens shows.
    both = {**cond(9), **cond(9, "negative_")}
    common = dict(steps=3, true_cfg_scale=1.0, seed=5)
    return [
        # 64x64: 16 image tokens, divisible by 2 and 4; CFG on; 2 images (dp2 splits them).
        DenoiseJob(
            request_id="a", height=64, width=64, guidance=4.0, num_images=2, cond=both, **common
        ),
        # 48x80: 15 image tokens, divisible by neither 2 nor 4; 3 images split 2 + 1 under dp2.
        DenoiseJob(
            request_id="b", height=48, width=80, guidance=3.0, num_images=3, cond=both, **common
        ),
        # guidance 1: no CFG, cfg2 halves compute the same branch.
        DenoiseJob(
            request_id="c", height=48, width=48, guidance=1.0, num_images=1, cond=cond(6), **common
        ),
    ]


def pixart_jobs(model_dir: str, steps: int = 3) -> list[DenoiseJob]:
    """PixArt's jobs (Sigma and alpha): text masks with padding, as the encoder sends.
    PipeFusion's tests take more steps, so that stale patches move the result well past
    the tolerance (their errors grow with the steps)."""
    from diffusers import PixArtTransformer2DModel

    cfg = PixArtTransformer2DModel.load_config(model_dir, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    text_len = 12

    def cond(real: int, prefix: str = "") -> dict[str, torch.Tensor]:
        mask = torch.zeros(1, text_len, dtype=torch.int64)
        mask[:, :real] = 1
        return {
            prefix + "prompt_embeds": torch.randn(
                1, text_len, cfg["caption_channels"], generator=g
            ),
            prefix + "prompt_attention_mask": mask,
        }

    both = {**cond(7), **cond(1, "negative_")}
    common = dict(steps=steps, true_cfg_scale=1.0, seed=5)
    return [
        # 64x64: 16 image tokens, divisible by 2 and 4; CFG on; 2 images (dp2 splits them).
        DenoiseJob(
            request_id="a", height=64, width=64, guidance=4.5, num_images=2, cond=both, **common
        ),
        # 48x80: 15 image tokens, divisible by neither 2 nor 4; 3 images split 2 + 1 under dp2.
        DenoiseJob(
            request_id="b", height=48, width=80, guidance=3.0, num_images=3, cond=both, **common
        ),
        # guidance 1: no CFG, cfg2 halves compute the same branch.
        DenoiseJob(
            request_id="c", height=48, width=48, guidance=1.0, num_images=1, cond=cond(5), **common
        ),
    ]


# ------------------------------------------------------------ Stand-ins for a gang's worker processes (what the watcher sees of them)


class FakeWorkers:
    """WorkerProcesses' interface; `dead_names` says which have exited."""

    def __init__(self) -> None:
        self.dead_names: list[str] = []

    def dead(self) -> list[str]:
        return list(self.dead_names)

    def join(self, timeout: float = 30.0) -> None:
        pass

    def kill(self) -> None:
        pass


class FakeMember:
    """GangMember's interface with no process group."""

    control = None

    def follow(self) -> None:
        pass

    def leave(self) -> bool:
        return True


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """One torch thread in this process and (through OMP_NUM_THREADS, read at start) in
    the processes it starts; both restored after."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if env is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = env
