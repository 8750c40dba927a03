"""The run of one admitted request: encoder -> denoiser -> vae, with retries and events.

A stage call that fails with UNAVAILABLE, or whose replica is given up on (frozen,
silent past the watchdog), is retried on another replica (or the same one after a
pause) up to `attempts` times; the client sees one result or one error, never two,
because images are only sent once the VAE answered whole. A request that leaves
(the client cancels, its deadline passes) leaves its queues at once: every wait here
is a coroutine that its cancellation ends, and every `finally` gives its place back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from ditmesh.common.errors import DeadlineExceeded, from_rpc_error
from ditmesh.gateway import calls, previews
from ditmesh.gateway.plan import RequestPlan
from ditmesh.gateway.settings import RetryPolicy
from ditmesh.gateway.stages import Reservation, StagePool, unavailable
from ditmesh.gateway.timings import RequestTimings
from ditmesh.v1 import gateway_pb2

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class Stages:
    encoder: StagePool
    denoiser: StagePool
    vae: StagePool

    def __iter__(self):
        return iter((self.encoder, self.denoiser, self.vae))


class RequestRun:
    """One admitted request: its places in the stage queues and the run through them."""

    def __init__(
        self,
        plan: RequestPlan,
        stages: Stages,
        deadline: float,
        retry: RetryPolicy,
        watchdog: calls.WatchdogPolicy,
    ) -> None:
        self.plan = plan
        self.stages = stages
        self.deadline = deadline
        self.retry = retry
        self.watchdog = watchdog
        self.position = stages.denoiser.pending
        """Requests ahead of this one that still need the denoiser (its real wait)."""
        self.places: dict[str, Reservation] = {
            p.name: p.reserve(plan.work_units(p.name)) for p in stages
        }
        self.timings: dict[str, float] = {}
        self.breakdown = RequestTimings()
        """Where the time went, per stage, for the Finished event (gateway/timings.py)."""
        self.started = time.monotonic()
        self.cached_steps = 0
        self.attention_computed = 0.0
        self.speedups: tuple[str, ...] = ()
        """Step caching: steps the denoiser skipped (its last step event's count)."""

    def leave(self) -> None:
        """Gives back every queue place still held (idempotent)."""
        for place in self.places.values():
            place.give_back()

    def _event(self, **kw) -> gateway_pb2.GenerateEvent:
        return gateway_pb2.GenerateEvent(request_id=self.plan.request_id, **kw)

    async def events(self) -> AsyncIterator[gateway_pb2.GenerateEvent]:
        plan = self.plan
        t0 = time.monotonic()
        yield self._event(queued=gateway_pb2.Queued(position=self.position))
        async for item in self._on_stage(self.stages.encoder, self._encode):
            cond = item.value
        t1 = time.monotonic()
        yield self._event(encoded=gateway_pb2.Encoded(seconds=t1 - t0))
        previewed: set[int] = set()
        async for item in self._on_stage(self.stages.denoiser, self._denoise_with(cond)):
            if isinstance(item, calls.Done):
                latents = item.value
            elif isinstance(item, calls.Preview):
                async for event in self._partial_images(item, previewed):
                    yield event
            else:
                yield item
        t2 = time.monotonic()
        async for item in self._on_stage(self.stages.vae, self._decode_with(latents, frames=True)):
            if isinstance(item, calls.Done):
                chunks = item.value
            else:
                yield item
        t3 = time.monotonic()
        yield self._event(decoded=gateway_pb2.Decoded(seconds=t3 - t2))
        for chunk in chunks:
            yield self._event(image=chunk)
        self.timings = {"encode": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2, "total": t3 - t0}
        yield self._event(
            finished=gateway_pb2.Finished(
                seed=plan.seed,
                num_images=plan.num_images,
                encode_seconds=t1 - t0,
                denoise_seconds=t2 - t1,
                decode_seconds=t3 - t2,
                total_seconds=t3 - t0,
                stages=self.breakdown.stages(),
                cached_steps=self.cached_steps,
                steps_total=plan.steps if plan.cache_threshold > 0 else 0,
                attention_computed=self.attention_computed,
                speedups=self.speedups,
            )
        )

    async def _partial_images(
        self, preview: calls.Preview, previewed: set[int]
    ) -> AsyncIterator[gateway_pb2.GenerateEvent]:
        """Decodes a preview on the VAE stage (while the denoiser goes on: its stream
        buffers). A denoiser retried on another replica previews the same steps again:
        each step is sent once."""
        if preview.step in previewed:
            return
        index = len(previewed)
        previewed.add(preview.step)
        async for item in self._on_stage(self.stages.vae, self._decode_with(preview.latents)):
            chunks = item.value
        for image in previews.whole_images(chunks):
            part = gateway_pb2.PartialImage(
                partial_image_index=index, step=preview.step, total=preview.total, image=image
            )
            yield self._event(partial_image=part)

    # -- one stage, with retries ----------------------------------------------------------------

    async def _on_stage(self, pool: StagePool, call: Callable) -> AsyncIterator:
        """Runs async generator `call(attempt, timeout)` on a replica; retries elsewhere."""
        units = self.plan.work_units(pool.name)
        exclude: set[int] = set()
        last = "no replica answered"
        queued = 0.0
        for n in range(self.retry.attempts):
            timeout = self.deadline - time.monotonic()
            if timeout <= 0:
                raise DeadlineExceeded(f"the deadline passed before the {pool.name} stage started")
            asked = time.monotonic()
            lease = await pool.acquire(units, timeout, exclude)
            queued += time.monotonic() - asked
            self.places[pool.name].give_back()
            ok = False
            try:
                with calls.Attempt(lease.replica) as attempt:
                    async for item in call(attempt, self.deadline - time.monotonic()):
                        yield item
                ok = True
                self.breakdown.answered(
                    pool.name, lease.replica.address, attempt.time, queued, n + 1
                )
                return
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise from_rpc_error(err, pool.name) from None
                last = err.details() or "connection failed"
            except calls.ReplicaGaveUp as exc:
                last = str(exc)
            finally:
                lease.release(ok)
            log.warning(
                "request %s: %s replica %s failed (attempt %d of %d): %s",
                self.plan.request_id,
                pool.name,
                lease.replica.address,
                n + 1,
                self.retry.attempts,
                last,
            )
            pool.replicas.mark_failed(lease.replica, last)
            exclude.add(id(lease.replica))
            await asyncio.sleep(self.retry.backoff_s * (2**n))
        raise unavailable(pool.name, last)

    def _limit(self, pool: StagePool) -> float | None:
        return self.watchdog.limit(pool.expected_seconds(self.plan.work_units(pool.name)))

    async def _encode(self, attempt: calls.Attempt, timeout: float) -> AsyncIterator:
        yield calls.Done(
            await calls.encode(self.plan, attempt, timeout, self._limit(self.stages.encoder))
        )

    def _denoise_with(self, cond) -> Callable:
        async def run(attempt: calls.Attempt, timeout: float) -> AsyncIterator:
            pool = self.stages.denoiser
            per_step = pool.expected_seconds(self.plan.work_units(pool.name)) / self.plan.steps
            watch = calls.StepWatch(self.watchdog, per_step)
            async for item in calls.denoise(self.plan, cond, attempt, timeout, watch):
                if isinstance(item, calls.StepDone):
                    self.cached_steps = item.cached_steps
                    self.attention_computed = item.attention_computed
                    self.speedups = item.speedups
                    step = gateway_pb2.Step(step=item.step, total=item.total)
                    yield self._event(step=step)
                else:
                    yield item

        return run

    def _decode_with(self, latents, frames: bool = False) -> Callable:
        """Decodes on the VAE stage; with `frames` (the final video, not a preview) each
        video's frame progress becomes a `frames` event. A retry on another replica
        decodes from the start again: a count already sent is not sent twice, so the
        client sees frames_done grow."""
        reported: dict[int, int] = {}

        async def run(attempt: calls.Attempt, timeout: float) -> AsyncIterator:
            limit = self._limit(self.stages.vae)
            async for item in calls.decode(
                self.plan, latents, attempt, timeout, limit, report_frames=frames
            ):
                if isinstance(item, calls.FramesDone):
                    if item.frames_done <= reported.get(item.video_index, 0):
                        continue
                    reported[item.video_index] = item.frames_done
                    progress = gateway_pb2.FrameProgress(
                        stage="vae",
                        video_index=item.video_index,
                        frames_done=item.frames_done,
                        frames_total=item.frames_total,
                    )
                    yield self._event(frames=progress)
                else:
                    yield item

        return run
