"""The gateway's command-line flags (`ditmesh serve gateway`, `ditmesh up`) and their settings.

Kept beside the settings they fill, so a new knob is added in one folder; the CLI
only calls `add_gateway_flags` and `settings_from_flags`.
"""

from __future__ import annotations

import argparse

from ditmesh.gateway.settings import (
    DEFAULT_DRAIN_SECONDS,
    DEFAULT_TIMEOUT_S,
    GatewayConfig,
    GatewaySettings,
    HealthPolicy,
    QueueLimits,
    RetryPolicy,
    WatchdogPolicy,
)

STAGES = ("encoder", "denoiser", "vae")

FLAGS = (
    "max_queue",
    "max_queue_seconds",
    "attempts",
    "default_timeout",
    "watchdog_multiple",
    "watchdog_min_seconds",
    "health_interval",
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
        help="kubeconfig file for discovery (default: the pod's service account)",
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
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be at least 1; got {args.max_queue}")
    if args.attempts < 1:
        raise ValueError(f"--attempts must be at least 1; got {args.attempts}")
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
    )


def flags_to_args(args: argparse.Namespace) -> list[str]:
    """The same settings as `serve gateway` flags (for `ditmesh up`, which starts it)."""
    return [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in FLAGS]
