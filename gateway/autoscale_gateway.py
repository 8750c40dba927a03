"""The autoscaler inside the gateway: what it reads from the stage pools, what it drives.

- `LoadReader` turns each StagePool into the policy's `StageSnapshot`: queued requests and
  their work in one replica's seconds, requests in flight, measured seconds per request,
  the p95 queue wait of the last decision period, and arrivals per second since the last
  read (from the pool's running count of admitted requests).
- `start_autoscaler` builds the backend for `--autoscale` (Kubernetes workloads, the
  gateway's own local stage processes, or the pools' own counts for a dry run without
  workloads), marks the pools that may scale to zero, and runs `Autoscaler.run` on the
  gateway's loop; `AutoscalerHandle.stop` ends it, stops local processes it started and
  hands back the Lease it holds. With Kubernetes workloads the namespace is
  `--autoscale-namespace`, else the kubeconfig context's, else the pod's own.

The autoscaler decides per pool, under the pool's label: the stage's name when the stage
has one pool, else `stage@model` (a gateway serving FLUX.1-dev and FLUX.1-schnell has one
encoder pool, one VAE pool, and `denoiser@dev` and `denoiser@schnell`). The options are
per stage and apply to each of its pools (`policy_settings`); a workload names one pool
(`pool_workloads`): `--STAGE-workload` for a stage with one pool, `--pool-workload
LABEL=KIND/NAME` for each pool of a stage with several. Anything that does not fit the
pools is refused at start with `InvalidArgument`, one line naming the labels, before any
decision. Local autoscaling (`ditmesh up --autoscale on`) serves one model, so one pool per
stage: its labels are the stage names.

Why the gateway process owns the local processes (`ditmesh up --autoscale on`): the
decisions need the pools' measurements, and a started process must join the pool it
feeds (`ReplicaSet.add`) and leave it before it is stopped (`remove`); in one process that
is a call, across `up` and the gateway it would be a new protocol. `up` then starts only
the gateway, which starts each stage's minimum at its first decision.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ditmesh.common.errors import InvalidArgument
from ditmesh.gateway.autoscale_backends import (
    KubernetesBackend,
    LocalProcessBackend,
    ScaleBackend,
    Workload,
)
from ditmesh.gateway.autoscale_loop import Autoscaler, LeaseElector, backend_for
from ditmesh.gateway.autoscale_policy import (
    AutoscalePolicy,
    AutoscaleSettings,
    StageScaling,
    StageSnapshot,
)
from ditmesh.gateway.settings import AutoscaleOptions, StageAutoscale, workload_kind
from ditmesh.gateway.stages import StagePool

log = logging.getLogger(__name__)


def parse_workload(text: str, stage: str | None = None) -> Workload:
    """`deployment/NAME`, `statefulset/NAME` or `leaderworkerset/NAME`; `stage`: the stage
    its label must name (None: the name it is scaled under)."""
    kind, name = workload_kind(text)
    return Workload(kind=kind, name=name, stage=stage)


def _pools_by_stage(stage_of: Mapping[str, str]) -> dict[str, list[str]]:
    by_stage: dict[str, list[str]] = {}
    for label, stage in stage_of.items():
        by_stage.setdefault(stage, []).append(label)
    return by_stage


def _labels(stage_of: Mapping[str, str], labels: Iterable[str] | None = None) -> str:
    """`labels` (default: all) in pipeline order, for a message."""
    order = {stage: i for i, stage in enumerate(("encoder", "denoiser", "vae"))}
    return ", ".join(
        sorted(stage_of if labels is None else labels, key=lambda x: (order[stage_of[x]], x))
    )


def pool_workloads(opts: AutoscaleOptions, stage_of: Mapping[str, str]) -> dict[str, Workload]:
    """Pool label -> the workload holding its replicas, from `stage_of` (every pool's label
    -> its stage): a stage's `--STAGE-workload` when the stage has one pool, and each
    `--pool-workload LABEL=KIND/NAME`. Refuses, naming the labels, a stage workload for a
    stage with several pools (which pool would it be?), a pool workload for no pool of this
    gateway, and a pool given two workloads."""
    unknown = [label for label in opts.pool_workloads if label not in stage_of]
    if unknown:
        raise InvalidArgument(
            f"--pool-workload names no pool of this gateway: {', '.join(unknown)}; "
            f"its pools are {_labels(stage_of)}"
        )
    by_stage = _pools_by_stage(stage_of)
    out: dict[str, Workload] = {}
    for stage, a in opts.stages.items():
        labels = by_stage.get(stage, [])
        if not a.workload or not labels:
            continue
        if len(labels) > 1:
            raise InvalidArgument(
                f"--{stage}-workload: the {stage} stage has {len(labels)} pools "
                f"({', '.join(labels)}); give each its own with --pool-workload LABEL=KIND/NAME"
            )
        if labels[0] in opts.pool_workloads:
            raise InvalidArgument(
                f"the {labels[0]} pool has two workloads: --{stage}-workload and "
                f"--pool-workload {labels[0]}=...; give one"
            )
        out[labels[0]] = parse_workload(a.workload, stage)
    for label, text in opts.pool_workloads.items():
        out[label] = parse_workload(text, stage_of[label])
    return out


class LoadReader:
    """Snapshots of the pools for the policy; call it on the loop that owns the pools."""

    def __init__(self, pools: Iterable[StagePool], clock: Callable[[], float] = time.monotonic):
        self.pools = {p.label: p for p in pools}
        self.clock = clock
        now = clock()
        self._last = {name: (now, p.admitted) for name, p in self.pools.items()}

    def __call__(self) -> dict[str, StageSnapshot]:
        now = self.clock()
        out = {}
        for name, pool in self.pools.items():
            then, count = self._last[name]
            self._last[name] = (now, pool.admitted)
            rate = (pool.admitted - count) / (now - then) if now > then else 0.0
            out[name] = StageSnapshot(
                stage=name,
                queued=pool.pending,
                backlog_s=pool.pending_units * pool.seconds_per_unit,
                inflight=pool.inflight,
                service_s=pool.request_seconds,
                p95_wait_s=pool.p95_wait(),  # on the pool's own (monotonic) clock
                arrival_rate=rate,
            )
        return out


def pool_counts(pools: dict[str, StagePool]) -> Callable[[str], tuple[int, int]]:
    """(replicas known and not leaving, replicas up) of a stage, for a dry run."""

    def counts(stage: str) -> tuple[int, int]:
        reps = pools[stage].replicas
        return sum(1 for r in list(reps.replicas) if not r.draining), len(reps.up())

    return counts


def _scaling(a: StageAutoscale) -> StageScaling:
    return StageScaling(
        min_replicas=a.min_replicas,
        max_replicas=a.max_replicas,
        gpus_per_replica=a.gpus_per_replica,
        target_wait_s=a.target_wait_s,
        scale_to_zero=a.scale_to_zero,
    )


def policy_settings(opts: AutoscaleOptions, pools: Mapping[str, str]) -> AutoscaleSettings:
    """The policy's settings for the pools to scale, `pools` mapping each label to its
    stage: each pool gets its stage's bounds, objective, GPUs and scale-to-zero (a pool of
    a stage without options is left alone). The GPU budget covers all pools together."""
    return AutoscaleSettings(
        stages={
            label: _scaling(opts.stages[stage])
            for label, stage in pools.items()
            if stage in opts.stages
        },
        gpu_budget=opts.gpu_budget,
        decision_period_s=opts.decision_period_s,
        scale_down_window_s=opts.scale_down_window_s,
        ready_timeout_s=opts.ready_timeout_s,
    )


class AutoscalerHandle:
    """The running autoscaler of a gateway: `autoscaler.desired` for export, `stop()`."""

    def __init__(self, autoscaler: Autoscaler, task: asyncio.Task, stop_event: asyncio.Event):
        self.autoscaler = autoscaler
        self._task = task
        self._stop = stop_event

    @property
    def desired(self) -> dict[str, int]:
        return self.autoscaler.desired

    async def stop(self) -> None:
        self._stop.set()
        await self._task
        backend = self.autoscaler.backend
        if isinstance(backend, LocalProcessBackend):
            await asyncio.to_thread(backend.stop_all)
        leader = self.autoscaler.leader
        if isinstance(leader, LeaseElector) and leader.leading:
            from kubernetes.client import ApiException  # only with a Lease: the k8s extra
            from urllib3.exceptions import HTTPError

            try:
                await asyncio.to_thread(leader.release)
            except (ApiException, HTTPError) as exc:
                # The gateway stops either way; the Lease then lapses after its duration.
                log.warning("autoscale: could not release the lease %s: %s", leader.name, exc)


def _local_backend(
    opts: AutoscaleOptions, pools: dict[str, StagePool], loop: asyncio.AbstractEventLoop
) -> LocalProcessBackend:
    def on_loop(fn: Callable[..., Any], *args: Any) -> None:
        # Waits until the pool has changed: a replica leaving the pool must be out of it
        # before its process is told to stop, or new work could still be sent to it.
        async def call() -> None:
            fn(*args)

        asyncio.run_coroutine_threadsafe(call(), loop).result()

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    local_args = {s: a.local_args for s, a in opts.stages.items() if a.local_args is not None}
    return LocalProcessBackend(
        spawn=LocalProcessBackend.serve_spawner(
            lambda stage: [*local_args[stage], "--port", "0"], env
        ),
        on_added=lambda stage, address: on_loop(pools[stage].replicas.add, address),
        on_removed=lambda stage, address: on_loop(pools[stage].replicas.remove, address),
        start_timeout_s=opts.ready_timeout_s,
    )


def _kubernetes(opts: AutoscaleOptions, kubeconfig: str | None) -> tuple[Any, str]:
    """The API client and the namespace: `--autoscale-namespace`, else the kubeconfig's
    current context's (as kubectl does), else the pod's own."""
    from ditmesh.gateway.discovery import api_client, own_namespace

    namespace = opts.namespace
    if namespace is None and kubeconfig:
        from kubernetes import config

        _, context = config.list_kube_config_contexts(config_file=kubeconfig)
        namespace = (context or {}).get("context", {}).get("namespace")
    return api_client(kubeconfig), namespace or own_namespace()


def lease_identity() -> str:
    """POD_NAME (the downward API), else host and process: two gateways on one host
    outside Kubernetes must not both think they hold the Lease."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{os.getpid()}"


def autoscale_plan(
    opts: AutoscaleOptions, stage_of: Mapping[str, str]
) -> tuple[dict[str, Workload], AutoscaleSettings]:
    """The workloads and the policy's settings per pool label, from `stage_of` (every
    pool's label -> its stage), or InvalidArgument with one line on what does not fit the
    pools. Pure: a caller may check the flags with it before it starts anything."""
    workloads = pool_workloads(opts, stage_of)
    if opts.local:
        several = [x for ls in _pools_by_stage(stage_of).values() if len(ls) > 1 for x in ls]
        if several:
            raise InvalidArgument(
                "local autoscaling serves one model, one pool per stage; this gateway has "
                f"pools {_labels(stage_of, several)}"
            )
        scaled = {s: s for s, a in opts.stages.items() if a.local_args is not None}
    elif workloads:
        scaled = {label: stage_of[label] for label in workloads}
    elif opts.mode == "on":
        raise InvalidArgument(
            "--autoscale on needs workloads to scale (--STAGE-workload, --pool-workload) or "
            "`ditmesh up`'s local stages; --autoscale dry-run decides on the pools' own counts"
        )
    else:
        scaled = stage_of  # dry-run on the pools' own counts
    try:
        return workloads, policy_settings(opts, scaled)
    except ValueError as exc:  # a budget below the pools' minimums: a flag to fix
        raise InvalidArgument(f"autoscale: {exc}") from None


def start_autoscaler(
    opts: AutoscaleOptions, pools: Iterable[StagePool], kubeconfig: str | None = None
) -> AutoscalerHandle | None:
    """Starts the autoscaler on the running loop (None when `--autoscale off`); refuses
    what does not fit the pools (`autoscale_plan`) before it starts anything."""
    if not opts.active:
        return None
    by_name = {p.label: p for p in pools}
    workloads, settings = autoscale_plan(opts, {label: p.name for label, p in by_name.items()})
    loop = asyncio.get_running_loop()
    real: ScaleBackend | None = None
    leader = None
    if opts.local:
        real = _local_backend(opts, by_name, loop)
    elif workloads:
        api, namespace = _kubernetes(opts, kubeconfig)
        real = KubernetesBackend(api, namespace, workloads, identity=lease_identity())
        if opts.lease:
            # Renewed every period: a period near the duration would let it lapse between.
            duration = max(15, math.ceil(3 * opts.decision_period_s))
            leader = LeaseElector(api, namespace, opts.lease, lease_identity(), duration)
    backend = backend_for(opts.mode, real, pool_counts(by_name))
    for name in settings.stages:
        pool = by_name[name]
        pool.wait_window_s = settings.decision_period_s
        if opts.mode == "on" and settings.stages[name].scale_to_zero:
            pool.cold_start_wait_s = opts.cold_start_wait_s
    autoscaler = Autoscaler(
        AutoscalePolicy(settings), backend, LoadReader(by_name.values()), leader=leader
    )
    stop = asyncio.Event()
    task = loop.create_task(autoscaler.run(stop), name="autoscaler")
    log.info(
        "autoscale %s: pools %s, every %.1f s",
        opts.mode,
        ", ".join(settings.stages),
        settings.decision_period_s,
    )
    return AutoscalerHandle(autoscaler, task, stop)
