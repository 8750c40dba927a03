"""Domain errors of every stage and their gRPC status codes.

Core logic raises these; the one servicer wrapper in `ditmesh.common.server`
turns them into a status code and a sentence. Anything else that escapes is an
INTERNAL error whose detail stays in the server log, never on the wire.
"""

from __future__ import annotations

import grpc


class DitmeshError(Exception):
    """Base of the errors a client may see; the message is a sentence for a person."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(DitmeshError):
    """The request itself is wrong (size, steps, prompt, model)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DitmeshError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(DitmeshError):
    """A queue is full or a size limit is hit; the message says when to retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(DitmeshError):
    """A stage is down or draining; the caller may retry elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(DitmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(DitmeshError):
    code = grpc.StatusCode.CANCELLED


class FailedPrecondition(DitmeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        FailedPrecondition,
    )
}


def from_rpc_error(err: grpc.RpcError, stage: str) -> DitmeshError:
    """Turns a downstream stage's RpcError into the domain error to pass upstream.

    Keeps the code (so INVALID_ARGUMENT from the encoder reaches the client as
    INVALID_ARGUMENT) and names the stage in the sentence.
    """
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"the {stage} stage is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"the deadline passed while the {stage} stage was working")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(f"the {stage} stage: {details}")
    cls = _BY_CODE.get(code)
    if cls is None:
        return DitmeshError(f"the {stage} stage failed: {details}")
    return cls(details)
