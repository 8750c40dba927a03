"""The denoiser stage's gRPC service (served by the gang's leader rank)."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

import grpc

from ditmesh.common import codec
from ditmesh.common.errors import Cancelled
from ditmesh.common.limits import (
    check_guidance,
    check_num_images,
    check_seed,
    check_size,
    check_steps,
)
from ditmesh.common.models import check_model_name, resolve_model
from ditmesh.common.server import ServerConfig, start_server
from ditmesh.denoiser.gang import GangRunner, run_torchrun_worker
from ditmesh.denoiser.job import DenoiseJob
from ditmesh.denoiser.parallel.mesh import ParallelConfig
from ditmesh.denoiser.runner import LocalRunner, Runner
from ditmesh.denoiser.speed import EAGER, Speedups
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
    )


class DenoiserService(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, runner: Runner, on_fatal=None) -> None:
        self.runner = runner
        self.on_fatal = on_fatal

    def Denoise(self, request_iterator, context: grpc.ServicerContext):
        job = read_job(request_iterator, self.runner)
        events: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        context.add_callback(cancelled.set)

        def on_step(step: int, total: int) -> None:
            if cancelled.is_set():
                raise Cancelled(f"request {job.request_id} was cancelled at step {step}")
            events.put(
                denoiser_pb2.DenoiseResponse(step=denoiser_pb2.DenoiseStep(step=step, total=total))
            )

        result: dict = {}

        def work() -> None:
            try:
                result["latents"] = self.runner.run(job, on_step)
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
            if (
                getattr(self.runner, "broken", None) is not None
                and self.runner.broken.is_set()
                and self.on_fatal
            ):
                self.on_fatal("the gang lost a process or a collective timed out")
            raise result["error"]
        tensors = {"latents": result["latents"]}
        for chunk in codec.iter_tensor_chunks(tensors):
            yield denoiser_pb2.DenoiseResponse(chunk=chunk)
        yield denoiser_pb2.DenoiseResponse(done=codec.done_message(tensors))


STUCK_GRACE_S = 30.0
"""How long past the collective timeout a request may stay stuck on a dead worker."""


class DeadWorkerWatch:
    """What the gang watcher does about dead workers, decided from plain facts.

    - dead while idle: fail the server (it exits non-zero; a supervisor restarts it);
    - dead during a request: wait, the request fails by itself when its collective
      times out and answers UNAVAILABLE;
    - dead during a request for longer than the collective timeout plus a grace:
      the request is stuck (collectives replayed from CUDA graphs have no timeout, and
      the stuck thread holds the gang), so the process must exit at once.
    """

    def __init__(self, collective_timeout_s: float, grace_s: float = STUCK_GRACE_S) -> None:
        self.limit = collective_timeout_s + grace_s
        self.dead_since: float | None = None

    def check(self, dead: bool, busy: bool, now: float) -> str:
        """ "ok", "fail" or "exit"."""
        if not dead:
            self.dead_since = None
            return "ok"
        if not busy:
            return "fail"
        if self.dead_since is None:
            self.dead_since = now
        return "exit" if now - self.dead_since > self.limit else "ok"


def _watch_gang(runner: GangRunner, running, collective_timeout_s: float) -> None:
    """Acts on dead gang workers as `DeadWorkerWatch` decides."""
    watch = DeadWorkerWatch(collective_timeout_s)
    while not running._stopped.wait(1.0):
        dead = runner.dead_workers()
        action = watch.check(bool(dead), runner.busy, time.monotonic())
        if action == "fail":
            runner.broken.set()
            running.fail(f"gang process {', '.join(dead)} exited")
            return
        if action == "exit":
            log.error(
                "gang process %s exited and a request has been stuck on it for over %.0f s; "
                "exiting now",
                ", ".join(dead),
                watch.limit,
            )
            logging.shutdown()
            os._exit(1)


def serve(
    model_source: str,
    *,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    parallel: ParallelConfig | None = None,
    collective_timeout_s: float = 120.0,
    speed: Speedups = EAGER,
):
    """Starts the denoiser; with more than one process, rank 0 spawns the gang and serves.

    Under torchrun (WORLD_SIZE > 1), ranks other than 0 follow the leader and return None.
    """
    parallel = parallel or ParallelConfig()
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if world_env > 1:
        parallel.check_world(world_env)
        if int(os.environ.get("RANK", "0")) != 0:
            run_torchrun_worker(
                model_source,
                parallel,
                name=name,
                device=device,
                dtype=dtype,
                collective_timeout_s=collective_timeout_s,
                speed=speed,
            )
            return None
    if parallel.world_size == 1:
        model = resolve_model(model_source, name)
        runner: Runner = LocalRunner(model, device, dtype, speed=speed)
    else:
        runner = GangRunner(
            model_source,
            parallel,
            name=name,
            device=device,
            dtype=dtype,
            collective_timeout_s=collective_timeout_s,
            speed=speed,
        )
    holder: dict = {}
    service = DenoiserService(runner, on_fatal=lambda why: holder["server"].fail(why))
    running = start_server(
        ServerConfig(stage="denoiser", host=host, port=port),
        [(denoiser_pb2_grpc.add_DenoiserServicer_to_server, service, "ditmesh.v1.Denoiser")],
    )
    holder["server"] = running
    running.on_stop.append(runner.close)
    if isinstance(runner, GangRunner):
        threading.Thread(
            target=_watch_gang,
            args=(runner, running, collective_timeout_s),
            daemon=True,
            name="gang-watch",
        ).start()
    return running
