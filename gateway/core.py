"""The gateway's state: models, stages, admission, request ids, its own health.

Admission is explicit and immediate: a request is refused at once (never left to
expire in a hidden queue) when any stage it needs has no healthy replica
(UNAVAILABLE; a stage scaled to zero by an active autoscaler admits and waits for a
replica instead: gateway/stages.py), when a stage's queue is over its bound (RESOURCE_EXHAUSTED with a
retry hint), or when the estimated wait already exceeds the request's deadline
(RESOURCE_EXHAUSTED with that estimate). Request ids are unique while a request
runs and for a while after it succeeded, so a retried id is never run twice.
"""

from __future__ import annotations

import collections
import logging
import time

from ditmesh.common.errors import FailedPrecondition, ResourceExhausted
from ditmesh.common.models import ModelRef
from ditmesh.gateway.metrics import observe_finish
from ditmesh.gateway.plan import RequestPlan
from ditmesh.gateway.run import RequestRun, Stages
from ditmesh.gateway.settings import GatewayConfig
from ditmesh.gateway.stages import StagePool

log = logging.getLogger(__name__)
access_log = logging.getLogger("ditmesh.access")


class Gateway:
    def __init__(
        self,
        models: dict[str, ModelRef],
        default_model: str,
        routes: dict[str, Stages],
        config: GatewayConfig,
    ) -> None:
        """`routes`: each model's three stage pools (models may share pools)."""
        self.models = models
        self.default_model = default_model
        self.routes = routes
        self.config = config
        pools: dict[int, StagePool] = {}
        for stages in routes.values():
            for pool in stages:
                pools.setdefault(id(pool), pool)
        self.pools: list[StagePool] = list(pools.values())
        """Every stage pool once, whichever models share it."""
        self._running: set[str] = set()
        self._finished: collections.OrderedDict[str, float] = collections.OrderedDict()

    @property
    def running(self) -> int:
        """Requests admitted and not yet finished."""
        return len(self._running)

    @property
    def stages(self) -> Stages:
        """The default model's pools."""
        return self.routes[self.default_model]

    def healthy(self) -> bool:
        """Some model can be served whole. A stage scaled to zero by the autoscaler counts:
        it admits and starts a replica."""
        return any(all(pool.can_take_work() for pool in stages) for stages in self.routes.values())

    def settled(self) -> bool:
        """Every replica known has been described and checked once (or set aside)."""
        return all(pool.replicas.settled() for pool in self.pools)

    def deadline_of(self, time_remaining: float | None) -> float:
        budget = self.config.default_timeout_s if time_remaining is None else time_remaining
        return time.monotonic() + min(budget, 24 * 3600.0)

    def admit(self, plan: RequestPlan, deadline: float) -> RequestRun:
        """Takes the request's places in every stage queue, or refuses it at once."""
        rid = plan.request_id
        self._check_id(rid)
        stages = self.routes[plan.model.name]
        wait = 0.0
        service = 0.0
        for pool in stages:
            units = plan.work_units(pool.name)
            pool.check_admission(units)
            wait = max(wait, pool.backlog_seconds())
            service += pool.expected_seconds(units)
        left = deadline - time.monotonic()
        if wait + service > left:
            raise ResourceExhausted(
                f"the mesh would take about {wait + service:.0f} s for this request "
                f"({wait:.0f} s of it waiting), over its deadline of {left:.0f} s; "
                f"{stages.denoiser.retry_hint()} or give it a longer deadline"
            )
        self._running.add(rid)
        return RequestRun(plan, stages, deadline, self.config.retry, self.config.watchdog)

    def _check_id(self, rid: str) -> None:
        if rid in self._running:
            raise FailedPrecondition(f"request {rid} is already running")
        now = time.monotonic()
        while self._finished:
            oldest, at = next(iter(self._finished.items()))
            if (
                now - at <= self.config.remember_ids_s
                and len(self._finished) <= self.config.remember_ids
            ):
                break
            self._finished.popitem(last=False)
        if rid in self._finished:
            ago = now - self._finished[rid]
            raise FailedPrecondition(
                f"request {rid} already ran {ago:.0f} s ago; send a new request id to run it again"
            )

    def finish(self, run: RequestRun, status: str) -> None:
        """Frees the request's places and id; logs its access line."""
        run.leave()
        rid = run.plan.request_id
        self._running.discard(rid)
        if status == "OK":
            self._finished[rid] = time.monotonic()
        p = run.plan
        t = run.timings
        observe_finish(self, run, status, time.monotonic() - run.started)
        access_log.info(
            "request=%s model=%s size=%dx%d steps=%d images=%d status=%s total=%.3fs "
            "encode=%.3fs denoise=%.3fs decode=%.3fs",
            rid,
            p.model.name,
            p.width,
            p.height,
            p.steps,
            p.num_images,
            status,
            time.monotonic() - run.started,
            t.get("encode", 0.0),
            t.get("denoise", 0.0),
            t.get("decode", 0.0),
        )
