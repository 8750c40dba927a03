"""The gateway's settings: plain, typed values with a docstring per field.

Kept apart from the code that uses them (and free of torch and gRPC imports), so the
CLI can build its flags from these defaults in a client-only install.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ditmesh.common.limits import (
    DEFAULT_DRAIN_SECONDS,
    DEFAULT_LIMITS,
    DEFAULT_TIMEOUT_S,
    Limits,
)

if TYPE_CHECKING:  # names only: the TLS types import grpc
    from ditmesh.client.tls import ChannelTLS
    from ditmesh.common.tls import ServerTLS


@dataclass(kw_only=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    """Tries per stage call when a replica is unavailable or given up on."""
    backoff_s: float = 0.2
    """Pause before the second try; doubled for each further one."""


@dataclass(kw_only=True, slots=True)
class WatchdogPolicy:
    multiple: float = 10.0
    """A call may stay silent for this many times what it should take."""
    min_seconds: float = 10.0
    """...and never less than this (slow first calls, busy hosts)."""

    def limit(self, expected: float) -> float | None:
        """Seconds of silence allowed when `expected` seconds are expected; None: no limit."""
        if expected <= 0:
            return None
        return max(self.min_seconds, self.multiple * expected)


@dataclass(kw_only=True, slots=True)
class GatewayConfig:
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    watchdog: WatchdogPolicy = field(default_factory=WatchdogPolicy)
    default_timeout_s: float = DEFAULT_TIMEOUT_S
    """Deadline of a request whose client set none."""
    limits: Limits = DEFAULT_LIMITS
    remember_ids_s: float = 600.0
    """How long the id of a request that succeeded stays taken."""
    remember_ids: int = 100_000
    """At most this many finished ids are remembered (oldest forgotten first)."""


@dataclass(kw_only=True, slots=True)
class HealthPolicy:
    interval: float = 0.5
    """Seconds between health checks of one replica."""
    timeout: float = 2.0
    """A check that takes longer counts as no answer."""
    frozen_after: int = 3
    """Unanswered checks in a row after which a replica is taken for frozen."""
    penalty_seconds: float = 2.0
    """A replica whose call failed stays down at least this long."""


@dataclass(kw_only=True, slots=True)
class StageLimits:
    slots_per_replica: int = 1
    """Requests one replica (or gang) works on at once."""
    max_queue: int = 64
    """Requests admitted that have not yet started on this stage."""
    max_queue_seconds: float = 600.0
    """Estimated seconds of work queued for this stage, per slot; 0 turns the bound off."""
    down_wait_seconds: float = 5.0
    """How long queued requests wait for a stage with no healthy replica before failing."""


@dataclass(kw_only=True, slots=True)
class QueueLimits:
    """The admission bounds of the three stages (see `StageLimits`)."""

    max_queue: int = 64
    """Requests admitted and not yet started, per stage."""
    max_queue_seconds: float = 600.0
    """Estimated seconds of queued work per slot, per stage; 0 turns it off."""
    encoder_slots: int = 4
    denoiser_slots: int = 1
    vae_slots: int = 2

    def for_stage(self, stage: str) -> StageLimits:
        slots = {"encoder": self.encoder_slots, "denoiser": self.denoiser_slots}.get(
            stage, self.vae_slots
        )
        return StageLimits(
            slots_per_replica=slots,
            max_queue=self.max_queue,
            max_queue_seconds=self.max_queue_seconds,
        )


@dataclass(kw_only=True, slots=True)
class GatewaySettings:
    """Everything `serve` takes beside the model and the stage addresses."""

    config: GatewayConfig = field(default_factory=GatewayConfig)
    queues: QueueLimits = field(default_factory=QueueLimits)
    health: HealthPolicy = field(default_factory=HealthPolicy)
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    services: dict[str, str] = field(default_factory=dict)
    """Stage -> its Kubernetes Service, `NAMESPACE/NAME:PORT`: the stage's replicas are the
    ready endpoints of its EndpointSlices (besides any addresses given)."""
    kubeconfig: str | None = None
    """Kubeconfig file for discovery; None: the pod's service account."""
    watch_seconds: int = 30
    """How long one EndpointSlice watch request stays open before it is renewed (a stopping
    gateway's watcher ends within this plus a few seconds)."""
    autoscale: AutoscaleOptions = field(default_factory=lambda: AutoscaleOptions())
    """The autoscaler (off by default)."""
    http_port: int | None = None
    """Port of the OpenAI-compatible HTTP API (gateway/http_api.py), on the gRPC host; 0: a
    free port; None: no HTTP API."""
    api_keys_file: str | None = None
    """File of API keys, one a line (gateway/auth.py): every HTTP and gRPC call must carry
    one; None: no keys checked."""
    tls: ServerTLS | None = None
    """Serve gRPC and the HTTP API with TLS (`--tls-cert/--tls-key/--tls-ca`); None: plaintext."""
    stage_tls: ChannelTLS | None = None
    """Connect to the stages with TLS, health checks included (`--stage-tls-*`); None:
    plaintext."""


AUTOSCALE_MODES = ("off", "dry-run", "on")
# How a workload's kind is written in a flag -> its Kubernetes kind.
WORKLOAD_KINDS = {
    "deployment": "Deployment",
    "statefulset": "StatefulSet",
    "leaderworkerset": "LeaderWorkerSet",
}


def workload_kind(text: str) -> tuple[str, str]:
    """(Kubernetes kind, name) of `deployment/NAME`, `statefulset/NAME` or
    `leaderworkerset/NAME`; ValueError otherwise."""
    kind, sep, name = text.partition("/")
    if not sep or not name or "/" in name or kind.lower() not in WORKLOAD_KINDS:
        raise ValueError(
            f"a workload is KIND/NAME with KIND one of {', '.join(WORKLOAD_KINDS)}; got {text!r}"
        )
    return WORKLOAD_KINDS[kind.lower()], name


@dataclass(kw_only=True, slots=True)
class StageAutoscale:
    """One stage's autoscaling bounds and objective (the policy's `StageScaling`), and where
    its replicas come from when the gateway scales them. When the stage has several pools
    (models that differ in it), the bounds, objective, GPUs and scale-to-zero apply to each
    pool on its own; the workloads are then per pool (`AutoscaleOptions.pool_workloads`)."""

    min_replicas: int = 1
    """Fewest replicas (gangs) kept; 0 allowed only with `scale_to_zero`."""
    max_replicas: int = 8
    """Most replicas (gangs) asked for."""
    target_wait_s: float = 5.0
    """Latency objective: p95 seconds a request may wait in this stage's queue."""
    gpus_per_replica: int = 1
    """GPUs one replica (a whole gang) holds, for the GPU budget."""
    scale_to_zero: bool = False
    """May go to zero replicas when idle; requests then wait up to `cold_start_wait_s`."""
    workload: str | None = None
    """The Kubernetes object to scale, `KIND/NAME` (deployment/, statefulset/,
    leaderworkerset/), when the stage has one pool; None: not scaled through Kubernetes
    (or per pool, through `AutoscaleOptions.pool_workloads`)."""
    local_args: list[str] | None = None
    """`ditmesh serve STAGE` arguments: the gateway itself starts and stops this stage's
    processes (`ditmesh up --autoscale on`, which serves one model: one pool per stage);
    None: it does not."""


@dataclass(kw_only=True, slots=True)
class AutoscaleOptions:
    """`--autoscale off|dry-run|on` and the autoscaler's knobs (gateway/autoscale_gateway.py)."""

    mode: str = "off"
    """off: no autoscaler; dry-run: decides and logs, changes nothing; on: applies."""
    stages: dict[str, StageAutoscale] = field(default_factory=dict)
    """Per stage name, for each of the stage's pools; a stage not named keeps the replicas
    it has."""
    gpu_budget: int = 0
    """GPUs all stages together may hold; 0: no budget."""
    decision_period_s: float = 5.0
    """Seconds between decisions (also the window of the measured p95 queue wait)."""
    scale_down_window_s: float = 120.0
    """How long fewer replicas must suffice before a scale-down."""
    ready_timeout_s: float = 300.0
    """A replica asked for and not ready after this long no longer blocks decisions."""
    cold_start_wait_s: float = 300.0
    """How long a request waits for a stage scaled to zero to start before UNAVAILABLE."""
    pool_workloads: dict[str, str] = field(default_factory=dict)
    """Pool label -> the Kubernetes object that holds that pool's replicas, `KIND/NAME`. A
    stage with several pools (a gateway serving models that differ in that stage: labels
    `stage@model`) is scaled pool by pool, each through its own workload, with its stage's
    bounds and objective; its `StageAutoscale.workload` is then refused at start."""
    namespace: str | None = None
    """Namespace of the workloads and the Lease; None: the kubeconfig context's, else the
    gateway pod's own."""
    lease: str | None = None
    """Name of a coordination.k8s.io Lease: only its holder among the gateways scales."""

    def __post_init__(self) -> None:
        if self.mode not in AUTOSCALE_MODES:
            raise ValueError(
                f"--autoscale must be one of {', '.join(AUTOSCALE_MODES)}, got {self.mode!r}"
            )
        if self.cold_start_wait_s <= 0:
            raise ValueError(f"cold_start_wait_s must be > 0, got {self.cold_start_wait_s}")
        if self.active:  # the policy's own checks, at start rather than at the first decision
            from ditmesh.gateway.autoscale_policy import StageScaling

            for a in self.stages.values():
                StageScaling(
                    min_replicas=a.min_replicas,
                    max_replicas=a.max_replicas,
                    gpus_per_replica=a.gpus_per_replica,
                    target_wait_s=a.target_wait_s,
                    scale_to_zero=a.scale_to_zero,
                )
        stage_workloads = [a.workload for a in self.stages.values() if a.workload]
        for text in [*stage_workloads, *self.pool_workloads.values()]:
            workload_kind(text)  # refused with the flags, not at the first decision
        k8s = [s for s, a in self.stages.items() if a.workload] + list(self.pool_workloads)
        local = [s for s, a in self.stages.items() if a.local_args is not None]
        if k8s and local:
            raise ValueError(
                f"stages scaled through Kubernetes ({', '.join(k8s)}) and as local processes "
                f"({', '.join(local)}) cannot be mixed"
            )

    @property
    def active(self) -> bool:
        return self.mode != "off"

    @property
    def local(self) -> bool:
        """The gateway starts the stages' processes itself."""
        return any(a.local_args is not None for a in self.stages.values())
