"""ditmesh client SDK: `Client` / `AsyncClient` for the gateway, results and errors."""

from ditmesh.client.sdk import (
    AsyncClient,
    Client,
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
