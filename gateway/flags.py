"""The gateway's command-line flags (`ditmesh serve gateway`, `ditmesh up`) and their settings.

Kept beside the settings they fill, so a new knob is added in one folder; the CLI
only calls `add_gateway_flags` and `settings_from_flags`. Over 350 lines because it is
mostly help text, one argparse call per flag; split, one command's flags would be read
in two places. What the flags mean beyond their help: gateway/settings.py.
"""

from __future__ import annotations

import argparse
import re
import shlex

from ditmesh.gateway.settings import (
    AUTOSCALE_MODES,
    DEFAULT_DRAIN_SECONDS,
    DEFAULT_TIMEOUT_S,
    AutoscaleOptions,
    GatewayConfig,
    GatewaySettings,
    HealthPolicy,
    QueueLimits,
    RetryPolicy,
    StageAutoscale,
    WatchdogPolicy,
)

STAGES = ("encoder", "denoiser", "vae")
# What gateway/discovery.py's ServiceRef.parse takes, checked here without the kubernetes client.
SERVICE_REF = re.compile(r"(?:[^/:\s]+/)?[^/:\s]+:[^/:\s]+")

FLAGS = (
    "max_queue",
    "max_queue_seconds",
    "attempts",
    "default_timeout",
    "watchdog_multiple",
    "watchdog_min_seconds",
    "health_interval",
    "http_port",
    "api_keys_file",
)

# The autoscaler's flags that `ditmesh up` hands on to its gateway (not the Kubernetes ones).
AUTOSCALE_FLAGS = (
    "autoscale",
    "autoscale_period",
    "scale_down_window",
    "ready_timeout",
    "cold_start_wait",
    "gpu_budget",
    "scale_to_zero",
    *(f"{stage}_{knob}" for stage in STAGES for knob in ("replicas_min", "replicas_max")),
    *(f"{stage}_{knob}" for stage in STAGES for knob in ("target_wait", "gpus")),
)


def add_gateway_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gateway: admission, retries, health")
    q, w, h = QueueLimits(), WatchdogPolicy(), HealthPolicy()
    g.add_argument(
        "--max-queue",
        type=int,
        default=q.max_queue,
        help="requests admitted and not yet started, per stage; more are refused at once "
        f"with RESOURCE_EXHAUSTED (default {q.max_queue})",
    )
    g.add_argument(
        "--max-queue-seconds",
        type=float,
        default=q.max_queue_seconds,
        help="estimated seconds of queued work per replica slot, per stage; 0 turns it off "
        f"(default {q.max_queue_seconds:.0f})",
    )
    g.add_argument(
        "--attempts",
        type=int,
        default=RetryPolicy().attempts,
        help="tries of a stage call on replicas that are down or frozen",
    )
    g.add_argument(
        "--default-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="deadline in seconds of a request whose client set none",
    )
    g.add_argument(
        "--watchdog-multiple",
        type=float,
        default=w.multiple,
        help="a replica silent for this many times its expected step (or call) time is "
        "given up on and the request retried elsewhere",
    )
    g.add_argument(
        "--watchdog-min-seconds",
        type=float,
        default=w.min_seconds,
        help="the watchdog never gives up on a replica sooner than this",
    )
    g.add_argument(
        "--health-interval",
        type=float,
        default=h.interval,
        help="seconds between health checks of each stage replica",
    )
    a = p.add_argument_group("gateway: HTTP API and API keys")
    a.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="serve the OpenAI-compatible HTTP API (POST /v1/images/generations, GET "
        "/v1/models, GET /healthz) on this port of the gateway's host; 0 picks a free port "
        "(default: no HTTP API)",
    )
    a.add_argument(
        "--api-keys-file",
        default=None,
        help="file of API keys, one a line (# comments): HTTP calls must send "
        "'Authorization: Bearer KEY', gRPC calls the same in metadata 'authorization' "
        "(default: no keys, every caller let in)",
    )


def add_discovery_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "gateway: replicas from Kubernetes (instead of, or besides, addresses)"
    )
    for stage in STAGES:
        g.add_argument(
            f"--{stage}-service",
            default=None,
            metavar="NAMESPACE/NAME:PORT",
            help=f"the {stage} stage's Service: its ready EndpointSlice endpoints are the "
            "replicas (PORT a number or a port name; NAMESPACE defaults to the gateway's own)",
        )
    g.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig file for discovery and the autoscaler (default: the pod's service "
        "account)",
    )


def add_autoscale_flags(p: argparse.ArgumentParser, *, kubernetes: bool) -> None:
    """The autoscaler's knobs; `kubernetes`: also the workloads to scale and the Lease."""
    g = p.add_argument_group("gateway: the autoscaler (docs/autoscaling.md)")
    a, st = AutoscaleOptions(), StageAutoscale()
    g.add_argument(
        "--autoscale",
        choices=AUTOSCALE_MODES,
        default=a.mode,
        help="off: fixed replicas; dry-run: decide and log only; on: apply (Kubernetes "
        "workloads, or under `ditmesh up` the gateway starts and stops stage processes)",
    )
    g.add_argument(
        "--autoscale-period",
        type=float,
        default=a.decision_period_s,
        help="seconds between decisions (and the window of the p95 queue wait)",
    )
    g.add_argument(
        "--scale-down-window",
        type=float,
        default=a.scale_down_window_s,
        help="seconds fewer replicas must suffice before a scale-down",
    )
    g.add_argument(
        "--ready-timeout",
        type=float,
        default=a.ready_timeout_s,
        help="a replica asked for and not ready after this long no longer blocks decisions",
    )
    g.add_argument(
        "--cold-start-wait",
        type=float,
        default=a.cold_start_wait_s,
        help="seconds a request waits for a stage scaled to zero to start, then "
        "UNAVAILABLE with a retry hint",
    )
    g.add_argument(
        "--gpu-budget",
        type=int,
        default=a.gpu_budget,
        help="GPUs all stages together may hold (0: no budget)",
    )
    g.add_argument(
        "--scale-to-zero",
        action="append",
        choices=STAGES,
        default=None,
        metavar="STAGE",
        help="this stage may go to zero replicas when idle "
        "(repeatable; each of its pools); its --STAGE-replicas-min may then be 0",
    )
    for stage in STAGES:
        g.add_argument(
            f"--{stage}-replicas-min",
            type=int,
            default=st.min_replicas,
            help=f"fewest {stage} replicas (gangs), per pool of the stage",
        )
        g.add_argument(
            f"--{stage}-replicas-max",
            type=int,
            default=st.max_replicas,
            help=f"most {stage} replicas (gangs), per pool of the stage",
        )
        g.add_argument(
            f"--{stage}-target-wait",
            type=float,
            default=st.target_wait_s,
            help=f"objective: p95 seconds a request waits in the {stage} queue",
        )
        g.add_argument(
            f"--{stage}-gpus",
            type=int,
            default=st.gpus_per_replica,
            help=f"GPUs one {stage} replica holds (a whole gang), for the budget",
        )
    if not kubernetes:
        return
    for stage in STAGES:
        g.add_argument(
            f"--{stage}-workload",
            default=None,
            metavar="KIND/NAME",
            help=f"the {stage} stage's Deployment, StatefulSet or LeaderWorkerSet "
            "(e.g. deployment/ditmesh-" + stage + "), scaled through its scale "
            "subresource; it must be labelled as this mesh's stage. Only for a stage with "
            "one pool: with several, use --pool-workload",
        )
    g.add_argument(
        "--pool-workload",
        action="append",
        default=[],
        metavar="LABEL=KIND/NAME",
        help="the workload of one pool of a stage that has several (a gateway serving models "
        "that differ in that stage), by the pool's label STAGE@MODEL (the first model it "
        "serves; a label of no pool is refused, listing the labels), e.g. denoiser@schnell=statefulset/"
        "ditmesh-denoiser-schnell (repeatable); labelled as the mesh's STAGE",
    )
    g.add_argument(
        "--autoscale-namespace",
        default=None,
        help="namespace of the workloads and the Lease (default: the kubeconfig context's, "
        "else the gateway pod's own)",
    )
    g.add_argument(
        "--autoscale-lease",
        default=None,
        metavar="NAME",
        help="a coordination.k8s.io Lease: only its holder among several gateways scales",
    )
    g.add_argument(
        "--local-stage",
        action="append",
        default=[],
        metavar="STAGE=ARGS",
        help="set by `ditmesh up --autoscale on`: the gateway starts and stops "
        "`ditmesh serve STAGE ARGS` processes itself (ARGS shell-quoted)",
    )


def autoscale_from_flags(args: argparse.Namespace) -> AutoscaleOptions:
    local: dict[str, list[str]] = {}
    for item in getattr(args, "local_stage", None) or []:
        stage, sep, rest = item.partition("=")
        if not sep or stage not in STAGES:
            raise ValueError(
                f"--local-stage takes STAGE=ARGS with STAGE one of {STAGES}; got {item!r}"
            )
        local[stage] = shlex.split(rest)
    pools: dict[str, str] = {}
    for item in getattr(args, "pool_workload", None) or []:
        label, sep, workload = item.partition("=")
        if not sep or not label or not workload:
            raise ValueError(f"--pool-workload takes LABEL=KIND/NAME; got {item!r}")
        if label in pools:
            raise ValueError(f"--pool-workload names the pool {label} twice")
        pools[label] = workload
    zero = set(args.scale_to_zero or ())
    stages = {
        stage: StageAutoscale(
            min_replicas=getattr(args, f"{stage}_replicas_min"),
            max_replicas=getattr(args, f"{stage}_replicas_max"),
            target_wait_s=getattr(args, f"{stage}_target_wait"),
            gpus_per_replica=getattr(args, f"{stage}_gpus"),
            scale_to_zero=stage in zero,
            workload=getattr(args, f"{stage}_workload", None),
            local_args=local.get(stage),
        )
        for stage in STAGES
    }
    return AutoscaleOptions(
        mode=args.autoscale,
        stages=stages,
        gpu_budget=args.gpu_budget,
        decision_period_s=args.autoscale_period,
        scale_down_window_s=args.scale_down_window,
        ready_timeout_s=args.ready_timeout,
        cold_start_wait_s=args.cold_start_wait,
        pool_workloads=pools,
        namespace=getattr(args, "autoscale_namespace", None),
        lease=getattr(args, "autoscale_lease", None),
    )


def add_drain_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=DEFAULT_DRAIN_SECONDS,
        help="on SIGTERM / Ctrl-C, how long requests in hand may run on before they are cut "
        f"off (default {DEFAULT_DRAIN_SECONDS:.0f}: above the default request deadline)",
    )


def settings_from_flags(args: argparse.Namespace) -> GatewaySettings:
    for stage in STAGES:
        ref = getattr(args, f"{stage}_service", None)
        if ref is not None and not SERVICE_REF.fullmatch(ref):
            raise ValueError(
                f"--{stage}-service {ref!r}: a service is NAMESPACE/NAME:PORT or NAME:PORT "
                "(PORT a number or a port name)"
            )
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be at least 1; got {args.max_queue}")
    if args.attempts < 1:
        raise ValueError(f"--attempts must be at least 1; got {args.attempts}")
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        raise ValueError(f"--http-port must be between 0 and 65535; got {args.http_port}")
    return GatewaySettings(
        config=GatewayConfig(
            retry=RetryPolicy(attempts=args.attempts),
            watchdog=WatchdogPolicy(
                multiple=args.watchdog_multiple, min_seconds=args.watchdog_min_seconds
            ),
            default_timeout_s=args.default_timeout,
        ),
        queues=QueueLimits(max_queue=args.max_queue, max_queue_seconds=args.max_queue_seconds),
        health=HealthPolicy(interval=args.health_interval),
        drain_seconds=args.drain_seconds,
        services={
            stage: ref
            for stage in STAGES
            if (ref := getattr(args, f"{stage}_service", None)) is not None
        },
        kubeconfig=getattr(args, "kubeconfig", None),
        autoscale=autoscale_from_flags(args) if hasattr(args, "autoscale") else AutoscaleOptions(),
        http_port=args.http_port,
        api_keys_file=args.api_keys_file,
    )


def flags_to_args(args: argparse.Namespace) -> list[str]:
    """The same settings as `serve gateway` flags (for `ditmesh up`, which starts it)."""
    out = []
    for name in (*FLAGS, *AUTOSCALE_FLAGS):
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            out.append(f"--{name.replace('_', '-')}={v}")
    return out
