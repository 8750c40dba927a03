"""The errors a ditmesh SDK call raises, and the one mapping from a gRPC failure to them.

Every failure a caller sees is a `DitmeshClientError` carrying a gRPC status
code and a human sentence, whether the gateway refused the request or the SDK
refused it before sending (`InvalidArgumentError` for both), so a caller never
has to import grpc to handle errors. Which failures are retried is the retry
policy's business (`ditmesh.client.base`), not this module's.
"""

from __future__ import annotations

import grpc

from ditmesh.client.tls import explain, handshake_failed

__all__ = [
    "DeadlineExceededError",
    "DitmeshClientError",
    "InvalidArgumentError",
    "NotFoundError",
    "ProtocolError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "TLSError",
    "UnavailableError",
    "invalid_argument",
    "map_rpc_error",
    "status_code",
]


class DitmeshClientError(Exception):
    """A request failed; `code` is the gRPC status, `details` the server's sentence.

    The message names both, so an uncaught error still tells a person what went
    wrong without a traceback from the server (the wire never carries one).
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{details} [{code.name}]")
        self.code = code
        self.details = details


class InvalidArgumentError(DitmeshClientError, ValueError):
    """The request itself is wrong; retrying it unchanged will fail again.

    Raised for the gateway's INVALID_ARGUMENT and for what the SDK refuses before
    sending; it is also a ValueError, as a bad argument is in plain Python.
    """


class NotFoundError(DitmeshClientError):
    """The request names what the mesh does not serve (an unknown model); as it stands,
    it will fail again: ListModels says what is served."""


class UnavailableError(DitmeshClientError):
    """The gateway or a stage behind it is down or draining; try again later."""


class TLSError(UnavailableError):
    """The TLS handshake with the gateway failed for a reason a retry cannot change (a CA
    that did not sign its certificate, a name it does not carry, a plaintext gateway); the
    sentence says which. An UnavailableError, so code that handles those handles it too."""


class ResourceExhaustedError(DitmeshClientError):
    """A queue is full or a size limit was hit; the sentence says which."""


class DeadlineExceededError(DitmeshClientError):
    """The request's deadline passed (on the client or inside the mesh)."""


class RequestCancelledError(DitmeshClientError):
    """The request was cancelled, by this client or by the server (e.g. on shutdown)."""


class ProtocolError(DitmeshClientError):
    """The gateway's answer broke the wire contract (missing image, bad chunk order)."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.INTERNAL, details)


_ERROR_BY_CODE: dict[grpc.StatusCode, type[DitmeshClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
}


def invalid_argument(sentence: str) -> InvalidArgumentError:
    """The error for a request the SDK refuses before it reaches the network."""
    return InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, sentence)


def status_code(err: grpc.RpcError) -> grpc.StatusCode | None:
    """The status of a failed call; None for an RpcError that carries none."""
    code_fn = getattr(err, "code", None)
    return code_fn() if callable(code_fn) else None


def map_rpc_error(err: grpc.RpcError) -> DitmeshClientError:
    """The one place a grpc.RpcError becomes an SDK error (sync and aio alike)."""
    code = status_code(err) or grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    details = (details_fn() if callable(details_fn) else None) or (
        f"the gateway answered {code.name} without a reason"
    )
    if code == grpc.StatusCode.UNAVAILABLE and (why := explain(details, None, "the gateway")):
        # gRPC's own words (OpenSSL's) stay after the sentence, for whoever debugs it.
        cls = TLSError if handshake_failed(details) else UnavailableError
        return cls(code, f"{why} (gRPC: {details})")
    return _ERROR_BY_CODE.get(code, DitmeshClientError)(code, details)
