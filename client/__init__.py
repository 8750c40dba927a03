"""ditmesh client SDK: `Client` / `AsyncClient` for the gateway, its parameters, results, errors.

Importing it loads grpc, protobuf, Pillow and the wire contract (`ditmesh.v1`),
never torch or any server module: a client-only install (`pip install ditmesh`)
has nothing else.
"""

from ditmesh.client.aio import AsyncClient
from ditmesh.client.errors import (
    DeadlineExceededError,
    DitmeshClientError,
    InvalidArgumentError,
    NotFoundError,
    ProtocolError,
    RequestCancelledError,
    ResourceExhaustedError,
    TLSError,
    UnavailableError,
)
from ditmesh.client.params import GenerateParams
from ditmesh.client.sdk import Client
from ditmesh.client.tls import ChannelTLS
from ditmesh.client.types import (
    GenerateResult,
    ModelInfo,
    ModelList,
    PartialImage,
    Progress,
    StageTimings,
    Timings,
)
from ditmesh.client.video import Video

__all__ = [
    "AsyncClient",
    "ChannelTLS",
    "Client",
    "DeadlineExceededError",
    "DitmeshClientError",
    "GenerateParams",
    "GenerateResult",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelList",
    "NotFoundError",
    "PartialImage",
    "Progress",
    "ProtocolError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "StageTimings",
    "TLSError",
    "Timings",
    "UnavailableError",
    "Video",
]
