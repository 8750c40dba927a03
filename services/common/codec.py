"""Tensors on the wire: dtype + shape + raw bytes, split into ordered chunks.

A message over 4 MiB is refused by gRPC's default limits and slows protobuf down
sharply (64 MiB messages move at a third of the rate of 4 MiB ones on loopback),
so every tensor travels as chunks of at most CHUNK_BYTES. Never pickled: the
receiver rebuilds the tensor from its declared dtype and shape only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from ditmesh.common.errors import InvalidArgument, ResourceExhausted
from ditmesh.v1 import tensor_pb2

CHUNK_BYTES = 4 * 1024 * 1024 - 64 * 1024  # leaves room for the message's other fields
# gRPC message limit set on both ends of every internal channel.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Largest tensor a receiver accepts (a 4096x4096 RGB float32 image is 192 MiB).
MAX_TENSOR_BYTES = 2 * 1024 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise InvalidArgument(f"tensors of dtype {dtype} cannot be sent") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise InvalidArgument(f"unknown tensor dtype {name!r}") from None


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian memory of a tensor, moved to the CPU."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    return t.view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(
    data: bytes | bytearray, dtype: torch.dtype, shape: Iterable[int]
) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != numel * itemsize:
        raise InvalidArgument(
            f"tensor data is {len(data)} bytes but dtype {_NAMES.get(dtype, dtype)} and shape "
            f"{list(shape)} need {numel * itemsize}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # A bytearray the caller hands over (the assembler's, complete) is used as it is: one
    # copy of a request's conditioning fewer; read-only bytes are copied to be writable.
    buf = data if isinstance(data, bytearray) else bytearray(data)
    flat = torch.frombuffer(buf, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def to_proto(t: torch.Tensor) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype_name(t.dtype), shape=list(t.shape), data=tensor_bytes(t))


def from_proto(msg: tensor_pb2.Tensor) -> torch.Tensor:
    return tensor_from_bytes(msg.data, dtype_from_name(msg.dtype), msg.shape)


def iter_chunks(
    name: str, t: torch.Tensor, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tensor_pb2.TensorChunk]:
    """Splits one tensor into ordered chunks; the first carries dtype and shape."""
    data = tensor_bytes(t)
    total = len(data)
    dtype = dtype_name(t.dtype)
    shape = list(t.shape)
    offset = 0
    first = True
    while True:
        piece = data[offset : offset + chunk_bytes]
        last = offset + len(piece) >= total
        yield tensor_pb2.TensorChunk(
            name=name,
            dtype=dtype if first else "",
            shape=shape if first else [],
            total_bytes=total,
            offset=offset,
            data=piece,
            last=last,
        )
        first = False
        offset += len(piece)
        if last:
            return


def iter_tensor_chunks(
    tensors: Mapping[str, torch.Tensor], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tensor_pb2.TensorChunk]:
    for name, t in tensors.items():
        yield from iter_chunks(name, t, chunk_bytes)


def done_message(tensors: Mapping[str, torch.Tensor]) -> tensor_pb2.TensorsDone:
    return tensor_pb2.TensorsDone(names=list(tensors))


class TensorAssembler:
    """Rebuilds named tensors from a chunk stream, checking order and sizes.

    A lost, duplicated or reordered chunk is an error, never a silently wrong tensor.
    """

    def __init__(self, max_total_bytes: int = MAX_TENSOR_BYTES) -> None:
        self._max_total = max_total_bytes
        self._received = 0
        self._open: dict[str, tuple[torch.dtype, list[int], int, bytearray]] = {}
        self._done: dict[str, torch.Tensor] = {}

    def add(self, chunk: tensor_pb2.TensorChunk) -> None:
        name = chunk.name
        if not name:
            raise InvalidArgument("a tensor chunk has no name")
        if name in self._done:
            raise InvalidArgument(f"tensor {name!r} was sent twice")
        if name not in self._open:
            if chunk.offset != 0:
                raise InvalidArgument(f"tensor {name!r} starts at offset {chunk.offset}, not 0")
            if chunk.total_bytes < 0 or chunk.total_bytes > self._max_total - self._received:
                raise ResourceExhausted(
                    f"tensor {name!r} of {chunk.total_bytes} bytes is over the limit of "
                    f"{self._max_total} bytes per request"
                )
            self._received += chunk.total_bytes
            dtype = dtype_from_name(chunk.dtype)
            self._open[name] = (dtype, list(chunk.shape), chunk.total_bytes, bytearray())
        dtype, shape, total, buf = self._open[name]
        if chunk.offset != len(buf):
            raise InvalidArgument(
                f"tensor {name!r}: chunk at offset {chunk.offset}, expected {len(buf)}"
            )
        if len(buf) + len(chunk.data) > total:
            raise InvalidArgument(f"tensor {name!r}: more bytes than the declared {total}")
        buf.extend(chunk.data)
        if chunk.last:
            if len(buf) != total:
                raise InvalidArgument(f"tensor {name!r}: ended at {len(buf)} of {total} bytes")
            self._done[name] = tensor_from_bytes(buf, dtype, shape)
            del self._open[name]

    def finish(self, done: tensor_pb2.TensorsDone | None = None) -> dict[str, torch.Tensor]:
        if self._open:
            raise InvalidArgument(f"tensors not completed: {sorted(self._open)}")
        if done is not None:
            missing = set(done.names) - set(self._done)
            if missing:
                raise InvalidArgument(f"tensors announced but not received: {sorted(missing)}")
        return dict(self._done)


class TensorStream:
    """Reads the tensor part of a stream whose messages have a oneof `payload`.

    `feed` takes every message: chunks and the closing `done` are consumed here, any
    other payload kind is returned for the caller (a denoiser's step events, a
    request's params). The one reader of every tensor-carrying stream, on both ends.
    """

    def __init__(self, what: str, max_total_bytes: int = MAX_TENSOR_BYTES) -> None:
        self.what = what
        self._assembler = TensorAssembler(max_total_bytes)
        self._done: tensor_pb2.TensorsDone | None = None

    @property
    def finished(self) -> bool:
        return self._done is not None

    def feed(self, msg) -> str | None:
        """Consumes a chunk or done message (returns None); returns any other payload kind."""
        kind = msg.WhichOneof("payload")
        if self._done is not None:
            raise InvalidArgument(f"{self.what} sent {kind or 'a message'} after its TensorsDone")
        if kind == "chunk":
            self._assembler.add(msg.chunk)
            return None
        if kind == "done":
            self._done = msg.done
            return None
        return kind

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors, once the done message came; an error naming the stream otherwise."""
        if self._done is None:
            raise StreamEndedEarly(f"{self.what} ended before its TensorsDone message")
        return self._assembler.finish(self._done)


class StreamEndedEarly(InvalidArgument):
    """A tensor stream closed before its done message."""


def read_params_and_tensors(request_iterator, params_name: str, rpc: str):
    """Reads the stream shape every tensor-carrying RPC uses: params, chunks, done.

    Messages have a oneof `payload` of {params, chunk, done}. Returns (params, tensors).
    """
    first = next(request_iterator, None)
    if first is None or first.WhichOneof("payload") != "params":
        raise InvalidArgument(f"a {rpc} stream must start with {params_name}")
    stream = TensorStream(f"the {rpc} stream")
    for msg in request_iterator:
        if stream.feed(msg) is not None:
            raise InvalidArgument(f"{params_name} may come only once, first")
        if stream.finished:
            break
    return first.params, stream.tensors()


def params_and_tensors_stream(message_cls, params, tensors: Mapping[str, torch.Tensor]):
    """Writes that stream shape: one params message, the tensors' chunks, then done."""
    yield message_cls(params=params)
    for chunk in iter_tensor_chunks(tensors):
        yield message_cls(chunk=chunk)
    yield message_cls(done=done_message(tensors))
