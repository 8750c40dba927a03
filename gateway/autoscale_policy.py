"""The autoscaler's policy: how many replicas each stage should have, decided together.

Pure and deterministic: no I/O, no clock (the caller passes `now`), no threads. Each
decision period the caller hands over one `StageSnapshot` per stage and gets back one
`Decision` per stage (target replicas, reason, inputs), which it logs and applies through
a backend (`autoscale_backends`); reading the gateway and talking to Kubernetes are theirs.

How a target is set:
- One arrival forecast (Holt: an EWMA level plus an EWMA trend, `forecast_horizon_s`
  ahead) of the mesh's arrivals (the sum over all stage pools) is shared by all stages, so
  their targets move together from the same number instead of three reactive loops
  amplifying one another. Each pool applies its own share of it (an EWMA of its arrivals
  over the EWMA of all): with several models behind one gateway, a model's denoiser pool
  sees only that model's requests, while a shared encoder pool sees them all. Scaling up
  follows the forecast (noise in one period's count does not add replicas); a burst acts
  in the period it appears through the backlog term; a scale-down's N-1 check takes the
  larger of the pool's forecast and the rate it saw now.
- desired = ceil(pool rate x service seconds per request / target utilisation
                 + queued replica-seconds / max(queue-wait objective, cold start)),
  at least one while work waits (cold start), and one more than what is ready while the
  measured p95 wait misses the objective with work still queued. The backlog is divided
  by the cold start when that is longer: a replica asked for now helps only once started,
  and by then the ready ones have drained part of the queue; asking for enough to drain it
  within the objective overshoots each burst and holds the extra GPUs for a whole window.
  The cold start is `cold_start_s` until the policy has measured one (asked-for -> ready
  after its own scale-up), then the latest measurement.
- Up at once. Down only once desired has stayed below the current count for the whole
  `scale_down_window_s`, no asked-for replica is still on its way, and the load spread
  over fewer replicas still meets the objective (utilisation and backlog drain); then to
  the fewest that meet it, never below desired. Idle (no arrivals, nothing queued or in
  flight) counts as desired = the floor, so traffic dropping to zero scales down.
- A replica asked for and not ready within `ready_timeout_s` is not counted as capacity
  and no longer holds back a scale-down.
- Bounds: min/max per stage (min is 0 only with `scale_to_zero`), whole gangs, and a GPU
  budget: when growth does not fit, free GPUs go one gang at a time to the stage with the
  most queued GPU-seconds per replica.

About 450 lines: the settings, their checks and the policy they drive are kept together
so a reader sees every knob beside the rule that uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True)
class StageScaling:
    """One stage's bounds and objective."""

    min_replicas: int = 1
    """Fewest replicas (gangs) kept; must be >= 1 unless `scale_to_zero`."""
    max_replicas: int = 8
    """Most replicas (gangs) asked for."""
    gpus_per_replica: int = 1
    """GPUs one replica holds; a gang is scaled as a whole unit."""
    target_wait_s: float = 5.0
    """Latency objective: the p95 seconds a request may wait in this stage's queue."""
    target_utilisation: float = 0.75
    """Busy fraction per replica aimed at for the forecast rate (headroom for bursts)."""
    scale_to_zero: bool = False
    """May scale to zero replicas when idle (then `min_replicas` may be 0)."""
    cold_start_s: float = 0.0
    """Seconds from asking for a replica to its being ready (model load), assumed until the
    policy has measured one; the backlog is drained over max(this, `target_wait_s`)."""

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or (self.min_replicas == 0 and not self.scale_to_zero):
            raise ValueError(
                f"min_replicas must be >= 1 (or 0 with scale_to_zero), got {self.min_replicas}"
            )
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(
                f"max_replicas {self.max_replicas} is below {max(1, self.min_replicas)} "
                f"(min_replicas {self.min_replicas}, and at least 1)"
            )
        if self.gpus_per_replica < 1:
            raise ValueError(f"gpus_per_replica must be >= 1, got {self.gpus_per_replica}")
        if self.target_wait_s <= 0:
            raise ValueError(f"target_wait_s must be > 0, got {self.target_wait_s}")
        if not 0 < self.target_utilisation <= 1:
            raise ValueError(f"target_utilisation must be in (0, 1], got {self.target_utilisation}")
        if self.cold_start_s < 0:
            raise ValueError(f"cold_start_s must be >= 0, got {self.cold_start_s}")

    @property
    def floor(self) -> int:
        return 0 if self.scale_to_zero else self.min_replicas


@dataclass(kw_only=True, slots=True)
class AutoscaleSettings:
    """The policy's settings for all stages."""

    stages: dict[str, StageScaling] = field(default_factory=dict)
    """Per pool label (a stage's name, or `stage@model` where a stage has several pools);
    pools not named are left alone."""
    gpu_budget: int = 0
    """GPUs all stages together may hold; 0: no budget."""
    decision_period_s: float = 5.0
    """Seconds between decisions."""
    scale_down_window_s: float = 120.0
    """Desired must stay below the current count this long before a scale-down."""
    ready_timeout_s: float = 300.0
    """A replica asked for and not ready after this long no longer blocks decisions."""
    forecast_alpha: float = 0.3
    """EWMA weight of the newest arrival-rate sample in the forecast's level."""
    trend_alpha: float = 0.2
    """EWMA weight of the newest level change in the forecast's trend."""
    forecast_horizon_s: float = 15.0
    """How far ahead the trend is projected (about the time a replica takes to start)."""
    share_window_s: float = 300.0
    """Time constant of each pool's share of the arrivals. Long on purpose: the model mix
    moves slowly while the total can jump; one period's count at one pool is too noisy to
    size it by (a burst at one model shows at once as that pool's backlog)."""

    def __post_init__(self) -> None:
        if self.decision_period_s <= 0 or self.scale_down_window_s < 0 or self.ready_timeout_s <= 0:
            raise ValueError("decision_period_s and ready_timeout_s must be > 0, the window >= 0")
        if not (0 < self.forecast_alpha <= 1 and 0 <= self.trend_alpha <= 1):
            raise ValueError("forecast_alpha must be in (0, 1], trend_alpha in [0, 1]")
        if self.share_window_s < 0:
            raise ValueError(f"share_window_s must be >= 0, got {self.share_window_s}")
        floor_gpus = sum(s.min_replicas * s.gpus_per_replica for s in self.stages.values())
        if self.gpu_budget and floor_gpus > self.gpu_budget:
            raise ValueError(
                f"the stages' minimums need {floor_gpus} GPUs, over the budget of {self.gpu_budget}"
            )


@dataclass(kw_only=True, slots=True, frozen=True)
class StageSnapshot:
    """What one stage looks like at a decision (from the gateway's StagePool and the backend)."""

    stage: str
    queued: int = 0
    """Requests admitted that have not started on this stage."""
    backlog_s: float = 0.0
    """Queued work in one replica's seconds: pending_units x seconds_per_unit (x gpus: GPU-s)."""
    inflight: int = 0
    """Requests running on this stage now."""
    service_s: float = 0.0
    """Measured seconds one replica takes per request (0: not measured yet)."""
    p95_wait_s: float = 0.0
    """Measured p95 queue wait over the last period."""
    arrival_rate: float = 0.0
    """Requests per second that arrived at this stage pool over the last period."""
    replicas: int = 0
    """Replicas asked for (the workload's spec)."""
    ready: int = 0
    """Replicas ready to serve."""

    @property
    def pending(self) -> int:
        """Asked for, not ready."""
        return max(0, self.replicas - self.ready)


@dataclass(kw_only=True, slots=True, frozen=True)
class Decision:
    """One stage's decision, with its inputs, for the log and the backend."""

    stage: str
    now: float
    target: int
    desired: int
    forecast_rate: float
    """This pool's forecast arrivals per second: its share of the mesh's forecast."""
    reason: str
    inputs: StageSnapshot
    gpus_per_replica: int = 1
    share: float = 1.0
    """This pool's share of the mesh's arrivals (smoothed)."""
    cold_start_s: float = 0.0
    """The cold start the backlog term used (configured or measured)."""

    @property
    def changes(self) -> bool:
        return self.target != self.inputs.replicas

    def log_line(self) -> str:
        s = self.inputs
        return (
            f"autoscale {self.stage}: {s.replicas} -> {self.target} (desired {self.desired}; "
            f"{self.reason}) ready={s.ready} pending={s.pending} queued={s.queued} "
            f"backlog={s.backlog_s * self.gpus_per_replica:.1f}gpu-s inflight={s.inflight} "
            f"service={s.service_s:.2f}s p95_wait={s.p95_wait_s:.2f}s "
            f"arrivals={s.arrival_rate:.3f}/s forecast={self.forecast_rate:.3f}/s "
            f"share={self.share:.2f} cold_start={self.cold_start_s:.0f}s"
        )


@dataclass(slots=True)
class ArrivalForecast:
    """Holt's double exponential smoothing of the mesh's arrival rate, shared by all stages."""

    alpha: float
    beta: float
    level: float | None = None
    trend: float = 0.0
    last: float | None = None

    def observe(self, now: float, rate: float) -> None:
        if self.level is None or self.last is None:
            self.level, self.last = rate, now
            return
        dt = now - self.last
        if dt <= 0:
            return
        prev = self.level
        self.level = self.alpha * rate + (1 - self.alpha) * (prev + self.trend * dt)
        self.trend = self.beta * (self.level - prev) / dt + (1 - self.beta) * self.trend
        self.last = now

    def rate(self, ahead_s: float) -> float:
        if self.level is None:
            return 0.0
        return max(0.0, self.level + self.trend * ahead_s)


@dataclass(slots=True)
class ArrivalShares:
    """Each pool's share of the mesh's arrivals: time-weighted EWMAs of the pools' rates
    (a pool first seen starts at its current rate), each over their sum."""

    window_s: float
    smoothed: dict[str, float] = field(default_factory=dict)
    last: float | None = None

    def observe(self, now: float, rates: dict[str, float]) -> None:
        dt = 0.0 if self.last is None else max(0.0, now - self.last)
        w = 1.0 if self.window_s == 0 else 1.0 - math.exp(-dt / self.window_s)
        for name, rate in rates.items():
            prev = self.smoothed.get(name)
            self.smoothed[name] = rate if prev is None else prev + w * (rate - prev)
        self.last = now

    def share(self, name: str, of: dict[str, float]) -> float:
        total = sum(self.smoothed.get(n, 0.0) for n in of)
        return self.smoothed.get(name, 0.0) / total if total else 0.0


@dataclass(slots=True)
class _StageState:
    below_since: float | None = None
    pending_since: float | None = None
    asked_at: float | None = None
    """When this policy last grew the stage (for measuring its cold start)."""
    asked_for: int = 0
    """The target it grew the stage to."""
    cold_start_s: float | None = None
    """The latest measured seconds from asked-for to ready."""


class AutoscalePolicy:
    """Decides every stage's target from one set of snapshots; keeps only its own memory."""

    def __init__(self, settings: AutoscaleSettings) -> None:
        self.settings = settings
        self.forecast = ArrivalForecast(settings.forecast_alpha, settings.trend_alpha)
        self._state = {name: _StageState() for name in settings.stages}
        self.shares = ArrivalShares(settings.share_window_s)

    def decide(self, now: float, snapshots: dict[str, StageSnapshot]) -> list[Decision]:
        cfg = self.settings
        # The mesh's arrivals as stage-pool visits: the sum stays meaningful whichever pools
        # the models share (a request visits one pool per stage), and each pool's share of
        # it is its own traffic, never another model's.
        self.forecast.observe(now, sum(s.arrival_rate for s in snapshots.values()))
        forecast = self.forecast.rate(cfg.forecast_horizon_s)
        rates = {name: s.arrival_rate for name, s in snapshots.items()}
        self.shares.observe(now, rates)
        wants: dict[str, tuple[int, int, str]] = {}
        shares: dict[str, float] = {}
        for name, scaling in cfg.stages.items():
            snap = snapshots.get(name)
            if snap is None:
                continue
            shares[name] = self.shares.share(name, of=rates)
            rate = forecast * shares[name]
            desired = self._desired(name, scaling, snap, rate)
            # Up on the smoothed rate (a burst shows at once as backlog); the N-1 check of a
            # scale-down also takes the rate this pool saw now, whichever is higher.
            target, reason = self._target(now, scaling, snap, desired, max(rate, snap.arrival_rate))
            wants[name] = (desired, target, reason)
        targets = self._fit_budget(snapshots, wants)
        for name, (target, _) in targets.items():
            if target > snapshots[name].replicas:  # timed from here, after the budget's cap
                self._state[name].asked_at, self._state[name].asked_for = now, target
        return [
            Decision(
                stage=name,
                now=now,
                target=targets[name][0],
                desired=desired,
                forecast_rate=forecast * shares[name],
                reason=targets[name][1],
                inputs=snapshots[name],
                gpus_per_replica=cfg.stages[name].gpus_per_replica,
                share=shares[name],
                cold_start_s=self.cold_start(name),
            )
            for name, (desired, _, _) in wants.items()
        ]

    def cold_start(self, stage: str) -> float:
        """The stage's cold start: the latest measured, else the configured one."""
        measured = self._state[stage].cold_start_s
        return self.settings.stages[stage].cold_start_s if measured is None else measured

    # -- one stage ------------------------------------------------------------------------------

    def _desired(self, name: str, sc: StageScaling, s: StageSnapshot, rate: float) -> int:
        if s.arrival_rate == 0 and s.queued == 0 and s.inflight == 0:
            return sc.floor  # idle: this pool's traffic dropped to zero
        if not s.service_s:  # nothing measured: keep what there is, start one if work waits
            need = max(s.replicas, 1 if s.queued or s.inflight else 0)
        else:
            drain_s = max(sc.target_wait_s, self.cold_start(name))
            load = rate * s.service_s / sc.target_utilisation + s.backlog_s / drain_s
            need = math.ceil(load - 1e-9)
            if s.p95_wait_s > sc.target_wait_s and s.queued:
                need = max(need, s.ready + 1)
        if s.queued or s.inflight:
            need = max(need, 1)  # cold start: work waits on a stage at zero
        return min(sc.max_replicas, max(sc.floor, need))

    def _meets(self, sc: StageScaling, s: StageSnapshot, replicas: int, rate: float) -> bool:
        """Whether `replicas` would still meet the objective for this load: utilisation at
        most the target, and the queue wait (backlog drain plus an M/M/1-like wait per
        replica, S x rho / (1 - rho) / replicas) within the objective."""
        if replicas <= 0:
            return rate == 0 and s.queued == 0 and s.inflight == 0
        if s.p95_wait_s > sc.target_wait_s:
            return False  # missing it already
        if not s.service_s:
            return s.queued == 0 and s.inflight <= replicas
        rho = rate * s.service_s / replicas
        if rho > sc.target_utilisation or rho >= 1:
            return False
        wait = (s.backlog_s + s.service_s * rho / (1 - rho)) / replicas
        return wait <= sc.target_wait_s

    def _target(
        self, now: float, sc: StageScaling, s: StageSnapshot, desired: int, rate: float
    ) -> tuple[int, str]:
        st = self._state[s.stage]
        cfg = self.settings
        if s.pending == 0:
            st.pending_since = None
        elif st.pending_since is None:
            st.pending_since = now
        self._measure_cold_start(now, st, s)
        stale = (
            s.pending
            if st.pending_since is not None and (now - st.pending_since >= cfg.ready_timeout_s)
            else 0
        )
        capacity = s.replicas - stale  # what is ready or still on its way in time
        current = min(sc.max_replicas, max(sc.floor, s.replicas))
        if current != s.replicas:
            return current, f"outside the bounds [{sc.floor}, {sc.max_replicas}]"
        if desired > capacity:
            st.below_since = None
            target = min(sc.max_replicas, desired + stale)
            if target > s.replicas:
                st.pending_since = now
                why = (
                    f"{stale} asked-for not ready in {cfg.ready_timeout_s:.0f} s; " if stale else ""
                )
                return target, f"{why}up: desired {desired} > capacity {capacity}"
            return s.replicas, f"at max_replicas {sc.max_replicas}"
        if desired >= s.replicas:
            st.below_since = None
            return s.replicas, "steady"
        if st.below_since is None:
            st.below_since = now
        waited = now - st.below_since
        if waited < cfg.scale_down_window_s:
            return (
                s.replicas,
                f"down held: below for {waited:.0f} of {cfg.scale_down_window_s:.0f} s",
            )
        if s.pending and not stale:
            return s.replicas, "down held: asked-for replicas still starting"
        if not self._meets(sc, s, s.replicas - 1, rate):
            return s.replicas, f"down held: {s.replicas - 1} would miss the objective"
        target = s.replicas - 1
        while target > desired and self._meets(sc, s, target - 1, rate):
            target -= 1
        st.below_since = None  # a further step down waits a whole window again
        return target, f"down: {target} still meet the objective"

    def _measure_cold_start(self, now: float, st: _StageState, s: StageSnapshot) -> None:
        """Asked-for -> ready of this policy's latest scale-up, to a decision period; none
        when the replicas were withdrawn or took longer than `ready_timeout_s`."""
        if st.asked_at is None:
            return
        took = now - st.asked_at
        if s.replicas < st.asked_for or took >= self.settings.ready_timeout_s:
            st.asked_at = None  # not applied (dry run), scaled back, or stuck: not a cold start
        elif s.ready >= st.asked_for:
            st.cold_start_s, st.asked_at = took, None

    # -- all stages -----------------------------------------------------------------------------

    def _fit_budget(
        self, snaps: dict[str, StageSnapshot], wants: dict[str, tuple[int, int, str]]
    ) -> dict[str, tuple[int, str]]:
        """Grows stages only within the GPU budget, one gang at a time, by queued GPU-seconds."""
        out = {name: (target, reason) for name, (_, target, reason) in wants.items()}
        budget = self.settings.gpu_budget
        if not budget:
            return out
        stages = self.settings.stages
        alloc = {
            n: min(t, max(snaps[n].replicas, stages[n].floor)) for n, (_, t, _) in wants.items()
        }
        used = sum(alloc[n] * stages[n].gpus_per_replica for n in alloc)
        want = sum(t * stages[n].gpus_per_replica for n, (_, t, _) in wants.items())
        if want <= budget:
            return out
        while True:
            free = budget - used
            open_ = [
                n
                for n, (_, t, _) in wants.items()
                if alloc[n] < t and stages[n].gpus_per_replica <= free
            ]
            if not open_:
                break
            n = max(
                open_,
                key=lambda m: (
                    snaps[m].backlog_s * stages[m].gpus_per_replica / (alloc[m] + 1),
                    wants[m][1] - alloc[m],
                    m,
                ),
            )
            alloc[n] += 1
            used += stages[n].gpus_per_replica
        for n, (_, t, reason) in wants.items():
            if alloc[n] < t:
                out[n] = (alloc[n], f"{reason}; capped at {alloc[n]} by the GPU budget of {budget}")
        return out
