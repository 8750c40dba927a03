"""Starts the gateway server."""

from __future__ import annotations

from ditmesh.common.models import resolve_model
from ditmesh.common.server import RunningServer, ServerConfig, start_server
from ditmesh.gateway.service import GatewayConfig, GatewayService
from ditmesh.gateway.stages import StagePool
from ditmesh.v1 import gateway_pb2_grpc

# Requests are prompts and numbers; anything near this size is a mistake.
MAX_REQUEST_BYTES = 4 * 1024 * 1024


def serve(
    model_source: str,
    *,
    encoder: list[str],
    denoiser: list[str],
    vae: list[str],
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    config: GatewayConfig | None = None,
    max_waiting: int = 64,
) -> RunningServer:
    model = resolve_model(model_source, name)
    pools = (
        StagePool("encoder", encoder, slots_per_replica=4, max_waiting=max_waiting),
        StagePool("denoiser", denoiser, slots_per_replica=1, max_waiting=max_waiting),
        StagePool("vae", vae, slots_per_replica=2, max_waiting=max_waiting),
    )
    service = GatewayService(model, *pools, config=config)
    running = start_server(
        ServerConfig(
            stage="gateway",
            host=host,
            port=port,
            max_receive_bytes=MAX_REQUEST_BYTES,
            max_workers=64,
        ),
        [(gateway_pb2_grpc.add_GatewayServicer_to_server, service, "ditmesh.v1.Gateway")],
    )
    return running
