"""ditmesh client SDK: `Client` / `AsyncClient` for the gateway, results and errors."""

from ditmesh.client.aio import AsyncClient
from ditmesh.client.results import (
    DeadlineExceededError,
    DitmeshClientError,
    GenerateResult,
    InvalidArgumentError,
    ModelInfo,
    ModelList,
    Progress,
    ProtocolError,
    RequestCancelledError,
    ResourceExhaustedError,
    Timings,
    UnavailableError,
)
from ditmesh.client.sdk import Client

__all__ = [
    "AsyncClient",
    "Client",
    "DeadlineExceededError",
    "DitmeshClientError",
    "GenerateResult",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelList",
    "Progress",
    "ProtocolError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "Timings",
    "UnavailableError",
]
