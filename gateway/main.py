"""Starts the gateway: its stage pools, its state, and the asyncio gRPC server."""

from __future__ import annotations

from dataclasses import dataclass, field

from ditmesh.common.aio_server import AsyncServer
from ditmesh.common.models import resolve_model
from ditmesh.common.server import ServerConfig
from ditmesh.gateway.core import Gateway, GatewayConfig
from ditmesh.gateway.replicas import HealthPolicy
from ditmesh.gateway.run import Stages
from ditmesh.gateway.service import GatewayService
from ditmesh.gateway.stages import StageLimits, StagePool
from ditmesh.v1 import gateway_pb2_grpc

# Requests are prompts and numbers; anything near this size is a mistake.
MAX_REQUEST_BYTES = 4 * 1024 * 1024

DEFAULT_DRAIN_SECONDS = 660.0
"""Above the default request deadline (600 s), so a drain never cuts work off."""


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


class GatewayServer(AsyncServer):
    """The running gateway: its server handle plus its state (`gateway`), for tools and tests."""

    gateway: Gateway


@dataclass(kw_only=True, slots=True)
class GatewaySettings:
    """Everything `serve` takes beside the model and the stage addresses."""

    config: GatewayConfig = field(default_factory=GatewayConfig)
    queues: QueueLimits = field(default_factory=QueueLimits)
    health: HealthPolicy = field(default_factory=HealthPolicy)
    drain_seconds: float = DEFAULT_DRAIN_SECONDS


def serve(
    model_source: str,
    *,
    encoder: list[str],
    denoiser: list[str],
    vae: list[str],
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    settings: GatewaySettings | None = None,
) -> GatewayServer:
    """Starts the gateway and returns its running server (`address`, `stop`, ...)."""
    s = settings or GatewaySettings()
    model = resolve_model(model_source, name)
    server = GatewayServer(
        ServerConfig(
            stage="gateway",
            host=host,
            port=port,
            max_receive_bytes=MAX_REQUEST_BYTES,
            grace_seconds=s.drain_seconds,
        )
    )

    def on_health_change() -> None:
        server.loop.create_task(server.set_serving(gateway.healthy()))

    def pool(stage: str, addresses: list[str]) -> StagePool:
        return StagePool(stage, addresses, s.queues.for_stage(stage), s.health, on_health_change)

    async def build() -> Gateway:
        stages = Stages(
            encoder=pool("encoder", encoder),
            denoiser=pool("denoiser", denoiser),
            vae=pool("vae", vae),
        )
        for p in stages:
            p.start()
        return Gateway({model.name: model}, model.name, stages, s.config)

    gateway = server.gateway = server.run(build())

    async def close() -> None:
        for p in gateway.stages:
            await p.close()

    server.on_stop.append(close)
    server.start(
        [
            (
                gateway_pb2_grpc.add_GatewayServicer_to_server,
                GatewayService(gateway),
                "ditmesh.v1.Gateway",
            )
        ]
    )
    return server
