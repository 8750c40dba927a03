"""Starts the gateway: its stage pools, its state, the asyncio gRPC server, and (with
`--autoscale dry-run|on`) the autoscaler on the same loop (gateway/autoscale_gateway.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from ditmesh.common.aio_server import AsyncServer
from ditmesh.common.server import ServerConfig
from ditmesh.gateway.auth import load_keys
from ditmesh.gateway.catalog import STAGES, load_catalog, pools_of
from ditmesh.gateway.core import Gateway
from ditmesh.gateway.metrics import watch_gateway
from ditmesh.gateway.run import Stages
from ditmesh.gateway.service import GatewayService
from ditmesh.gateway.settings import GatewaySettings
from ditmesh.gateway.stages import Serves, StagePool
from ditmesh.v1 import gateway_pb2_grpc

# Requests are prompts and numbers; anything near this size is a mistake.
MAX_REQUEST_BYTES = 4 * 1024 * 1024


class GatewayServer(AsyncServer):
    """The running gateway: its server handle plus its state (`gateway`), for tools and tests."""

    gateway: Gateway | None = None
    autoscaler = None
    """The running `AutoscalerHandle` (its `desired` replicas per stage), or None when off."""
    http_api = None
    """The running OpenAI-compatible HTTP API (`url`, `port`), or None when off."""


def serve(
    model_source: str | Sequence[str],
    *,
    encoder: list[str],
    denoiser: list[str],
    vae: list[str],
    name: str | Sequence[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    metrics_port: int = 0,
    settings: GatewaySettings | None = None,
) -> GatewayServer:
    """Starts the gateway and returns its running server (`address`, `stop`, ...).

    `model_source`: one model or several (the first is the default); `name`: their names,
    in the same order. Every address of a stage is offered to each of that stage's pools;
    a replica joins the pool whose components it serves (gateway/catalog.py)."""
    s = settings or GatewaySettings()
    keys = load_keys(s.api_keys_file)  # a bad key file fails before anything starts
    sources = [model_source] if isinstance(model_source, str) else list(model_source)
    names = [name] if isinstance(name, str) else list(name or [])
    catalog = load_catalog(sources, names)
    addresses = {"encoder": encoder, "denoiser": denoiser, "vae": vae}
    if s.autoscale.active:
        # Its refusals (a workload that fits no pool, ...) before anything starts.
        from ditmesh.gateway.autoscale_gateway import autoscale_plan

        autoscale_plan(s.autoscale, {p.label: p.stage for p in pools_of(catalog).values()})
    server = GatewayServer(
        ServerConfig(
            stage="gateway",
            host=host,
            port=port,
            max_receive_bytes=MAX_REQUEST_BYTES,
            grace_seconds=s.drain_seconds,
            metrics_port=metrics_port,
            tls=s.tls,
        )
    )

    def on_health_change() -> None:
        if server.gateway is not None:  # None while the pools are being built
            server.loop.create_task(server.set_serving(server.gateway.healthy()))

    def pool(serves: Serves) -> StagePool:
        stage = serves.stage
        return StagePool(
            stage,
            list(addresses[stage]),
            s.queues.for_stage(stage),
            s.health,
            on_health_change,
            # Discovered, or started by the gateway's own autoscaler: the list may be empty.
            discovered=stage in s.services or s.autoscale.local,
            serves=serves,
            tls=s.stage_tls,
        )

    watchers: list = []

    async def build() -> Gateway:
        pools = {key: pool(serves) for key, serves in pools_of(catalog).items()}
        routes = {
            m.name: Stages(**{stage: pools[(stage, m.fingerprints[stage])] for stage in STAGES})
            for m in catalog
        }
        for p in pools.values():
            p.start()
        if s.services:
            # Imported only here: the kubernetes client is needed only with discovery.
            from ditmesh.gateway.discovery import ServiceRef, watch_stage

            for p in pools.values():
                if p.name in s.services:
                    ref = ServiceRef.parse(s.services[p.name])
                    watchers.append(
                        watch_stage(p, ref, kubeconfig=s.kubeconfig, watch_seconds=s.watch_seconds)
                    )
        if s.autoscale.active:
            from ditmesh.gateway.autoscale_gateway import start_autoscaler

            server.autoscaler = start_autoscaler(
                s.autoscale, pools.values(), kubeconfig=s.kubeconfig
            )
        return Gateway({m.name: m.ref for m in catalog}, catalog[0].name, routes, s.config)

    gateway = server.gateway = server.run(build())
    watch_gateway(server)  # Prometheus metrics of its queues and requests (with metrics_port)

    async def close() -> None:
        if server.autoscaler is not None:
            await server.autoscaler.stop()  # before the pools: local stages leave them first
        for w in watchers:
            w.stop()
        for p in gateway.pools:
            await p.close()

    async def settle() -> None:
        # Replicas are down until described (a replica of another model must never get
        # work); the static ones answer within a health timeout, so wait that long for
        # them rather than refuse the first requests.
        end = time.monotonic() + s.health.timeout + 1.0
        while not gateway.settled() and time.monotonic() < end:
            await asyncio.sleep(0.01)

    server.on_stop.append(close)
    server.start(
        [
            (
                gateway_pb2_grpc.add_GatewayServicer_to_server,
                GatewayService(gateway, keys),
                "ditmesh.v1.Gateway",
            )
        ]
    )
    server.run(settle())
    # The server starts SERVING; a gateway whose stages are still to be found (discovery)
    # or started (local autoscaling) is not, until they are up (static replicas count as up).
    server.run(server.set_serving(gateway.healthy()))
    if s.http_port is not None:
        from ditmesh.gateway.http_api import start_http_api  # FastAPI only when asked for

        server.http_api = start_http_api(server, keys, s.http_port, s.drain_seconds)
    return server
