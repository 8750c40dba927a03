"""The denoiser stage's gRPC service (served by the gang's leader rank).

Besides a step event per step and the final latents, it sends the latents so far after
each step the request names in `preview_steps` (the gateway has them decoded into
partial images by the VAE stage; nothing here decodes).
"""

from __future__ import annotations

import logging
import queue
import threading

import grpc
import torch

from ditmesh.common import codec, tracing
from ditmesh.common.errors import Cancelled, InvalidArgument
from ditmesh.common.gang_watch import watch_gang
from ditmesh.common.gangs import GangLeader, torchrun_env
from ditmesh.common.limits import (
    check_guidance,
    check_num_images,
    check_seed,
    check_size,
    check_steps,
)
from ditmesh.common.models import check_model_name, check_num_frames, resolve_model
from ditmesh.common.server import RunningServer, StageOptions, start_server
from ditmesh.common.stage_info import stage_info
from ditmesh.common.tracing import REQUEST_ID_ATTR
from ditmesh.denoiser.gang import GangRunner, GangSpec, run_torchrun_worker
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.mesh import ParallelConfig
from ditmesh.denoiser.runner import LocalRunner, Runner
from ditmesh.denoiser.speed import EAGER, Speedups
from ditmesh.denoiser.step_cache import refusal as step_cache_refusal
from ditmesh.v1 import denoiser_pb2, denoiser_pb2_grpc

log = logging.getLogger(__name__)

_END = object()


def read_job(request_iterator, runner: Runner) -> DenoiseJob:
    """Reads params, then conditioning chunks, then done; validates everything."""
    p, cond = codec.read_params_and_tensors(request_iterator, "DenoiseParams", "Denoise")
    model = runner.model
    check_model_name(p.model, model)
    check_size(model, p.height, p.width)
    check_steps(p.steps)
    check_num_images(p.num_images)
    check_guidance(p.guidance, "guidance")
    check_guidance(p.true_cfg_scale, "true_cfg_scale")
    check_seed(p.seed)
    check_num_frames(model, p.num_frames)
    preview_steps = tuple(p.preview_steps)
    check_preview_steps(preview_steps, p.steps, runner)
    check_cache_threshold(p.cache_threshold, runner)
    if (fast := fast_attn(runner)) is not None:
        fast.plan.check_steps(p.steps)
    return DenoiseJob(
        request_id=p.request_id,
        height=p.height,
        width=p.width,
        steps=p.steps,
        guidance=p.guidance,
        true_cfg_scale=p.true_cfg_scale,
        seed=p.seed,
        num_images=p.num_images,
        cond=cond,
        preview_steps=preview_steps,
        num_frames=p.num_frames,
        cache_threshold=p.cache_threshold,
    )


def check_cache_threshold(threshold: float, runner: Runner) -> None:
    """0 to 1, and a layout, family and speed-ups step caching runs with (refused here, on
    the leader, before any rank sees the job)."""
    if not 0.0 <= threshold <= 1.0:
        raise InvalidArgument(f"cache_threshold must be between 0 and 1; got {threshold}")
    if threshold == 0.0:
        return
    if fast_attn(runner) is not None:
        # Both would count transformer calls per step differently (probe and replay passes).
        raise InvalidArgument("step caching cannot run on a denoiser serving --fast-attn")
    pipefusion = runner.parallel.pipefusion if isinstance(runner, GangRunner) else 1
    why = step_cache_refusal(leader_adapter(runner), pipefusion)
    if why is not None:
        raise InvalidArgument(why)


def leader_adapter(runner: Runner):
    """The adapter in this process: the runner's, or the gang leader's own rank's."""
    return runner.member.adapter if isinstance(runner, GangRunner) else runner.adapter


def fast_attn(runner: Runner):
    """The DiTFastAttn state this denoiser serves with (fastattn.py); None: off."""
    return getattr(leader_adapter(runner), "fast_attn", None)


def check_preview_steps(steps: tuple[int, ...], total: int, runner: Runner) -> None:
    """Ascending steps before the last (the last is the image itself)."""
    if not steps:
        return
    if list(steps) != sorted(set(steps)) or steps[0] < 1 or steps[-1] >= total:
        raise InvalidArgument(
            f"preview steps must ascend, each between 1 and {total - 1} (the last step is the "
            f"image itself); got {list(steps)}"
        )
    if isinstance(runner, GangRunner) and runner.parallel.pipefusion > 1:
        # PipeFusion's latents are stale patch by patch until the last step: no whole
        # picture exists in between to preview.
        raise InvalidArgument("partial images are not available from a PipeFusion gang")


class DenoiserService(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, runner: Runner, on_fatal=None, speed: Speedups = EAGER) -> None:
        self.runner = runner
        self.on_fatal = on_fatal
        self.speedups = speed.reported()
        if isinstance(runner, GangRunner) and runner.parallel.ulysses_fp8:
            self.speedups.append("ulysses-fp8")  # the exchange in FP8 changes the pixels

    def Denoise(self, request_iterator, context: grpc.ServicerContext):
        job = read_job(request_iterator, self.runner)
        events: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        context.add_callback(cancelled.set)

        # The loop's span and a child per step, under this call's span (no-op when off).
        loop = tracing.loop_trace(
            "denoise",
            **{
                "gen_ai.request.model": self.runner.model.name,
                REQUEST_ID_ATTR: job.request_id,
                "ditmesh.steps": job.steps,
                "ditmesh.height": job.height,
                "ditmesh.width": job.width,
                "ditmesh.num_images": job.num_images,
            },
        )

        fast = fast_attn(self.runner)
        speedups = self.speedups + (["step-cache"] if job.cache_threshold > 0 else [])

        def on_step(step: int, total: int) -> None:
            if cancelled.is_set():
                raise Cancelled(f"request {job.request_id} was cancelled at step {step}")
            loop.step(step, total)
            events.put(
                denoiser_pb2.DenoiseResponse(
                    step=denoiser_pb2.DenoiseStep(
                        step=step,
                        total=total,
                        cached_steps=job.cached_steps,
                        attention_computed=0.0 if fast is None else fast.fraction(),
                        speedups=speedups,
                    )
                )
            )

        def on_preview(step: int, total: int, latents) -> None:
            # float16 halves what travels; a preview needs no more precision.
            tensor = codec.to_proto(latents.to(torch.float16).cpu())
            preview = denoiser_pb2.DenoisePreview(step=step, total=total, latents=tensor)
            events.put(denoiser_pb2.DenoiseResponse(preview=preview))

        result: dict = {}

        def work() -> None:
            try:
                with loop.running():
                    result["latents"] = self.runner.run(job, on_step, on_preview)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the RPC thread below
                result["error"] = exc
            finally:
                events.put(_END)

        threading.Thread(target=work, name=f"denoise-{job.request_id}", daemon=True).start()
        while True:
            item = events.get()
            if item is _END:
                break
            yield item
        if "error" in result:
            if self.runner.is_broken() and self.on_fatal:
                self.on_fatal("the gang lost a process or a collective timed out")
            raise result["error"]
        tensors = {"latents": result["latents"]}
        for chunk in codec.iter_tensor_chunks(tensors):
            yield denoiser_pb2.DenoiseResponse(chunk=chunk)
        yield denoiser_pb2.DenoiseResponse(done=codec.done_message(tensors))


def serve(
    model_source: str,
    options: StageOptions | None = None,
    *,
    parallel: ParallelConfig | None = None,
    collective_timeout_s: float = 120.0,
    speed: Speedups = EAGER,
) -> RunningServer | None:
    """Starts the denoiser; with more than one process, rank 0 spawns the gang and serves.

    Under torchrun (WORLD_SIZE > 1), ranks other than 0 follow the leader and return None.
    """
    o = options or StageOptions()
    parallel = parallel or ParallelConfig()
    env = torchrun_env()
    if env.active:
        parallel.check_world(env.world_size)
    if speed.fast_attn:  # refused before any weight loads or process starts
        from ditmesh.denoiser.fastattn import check_serving

        check_serving(speed, parallel)
    if parallel.world_size == 1:
        model = resolve_model(model_source, o.name)
        runner: Runner = LocalRunner(model, o.device, o.dtype, speed=speed)
    else:
        spec = GangSpec.of(
            model_source,
            parallel,
            name=o.name,
            device=o.device,
            dtype=o.dtype,
            collective_timeout_s=collective_timeout_s,
            speed=speed,
            env=env,
        )
        if env.active and env.rank != 0:
            run_torchrun_worker(spec, env)
            return None
        runner = GangRunner(spec, env)
    holder: dict = {}
    service = DenoiserService(runner, on_fatal=lambda why: holder["server"].fail(why), speed=speed)
    running = start_server(
        o.server_config("denoiser"),
        [
            (denoiser_pb2_grpc.add_DenoiserServicer_to_server, service, "ditmesh.v1.Denoiser"),
            stage_info("denoiser", runner.model, parallel.world_size),
        ],
    )
    holder["server"] = running
    running.on_stop.append(runner.close)
    if isinstance(runner, GangLeader):
        watch_gang(runner, running)
    return running
