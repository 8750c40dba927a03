import pytest
import torch

from ditmesh.common import codec
from ditmesh.common.errors import InvalidArgument, ResourceExhausted


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool]
)
def test_roundtrip_dtypes(dtype):
    t = (torch.randn(3, 5, 7) * 10).to(dtype)
    back = codec.from_proto(codec.to_proto(t))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_scalar_and_empty():
    for t in (torch.tensor(3.5), torch.empty(0, 4)):
        back = codec.from_proto(codec.to_proto(t))
        assert back.shape == t.shape and torch.equal(back, t)


def test_large_tensor_is_chunked_and_rebuilt():
    t = torch.randn(3, 1024, 1024)  # 12 MiB
    chunks = list(codec.iter_chunks("x", t))
    assert len(chunks) == 4
    assert all(len(c.data) <= codec.CHUNK_BYTES for c in chunks)
    assert [c.last for c in chunks] == [False, False, False, True]
    asm = codec.TensorAssembler()
    for c in chunks:
        asm.add(c)
    out = asm.finish(codec.done_message({"x": t}))
    assert torch.equal(out["x"], t)


def _chunks(t, size=1000):
    return list(codec.iter_chunks("x", t, chunk_bytes=size))


def test_reordered_chunk_is_refused():
    chunks = _chunks(torch.randn(1000))
    asm = codec.TensorAssembler()
    asm.add(chunks[0])
    with pytest.raises(InvalidArgument, match="offset"):
        asm.add(chunks[2])


def test_lost_last_chunk_is_refused():
    chunks = _chunks(torch.randn(1000))
    asm = codec.TensorAssembler()
    for c in chunks[:-1]:
        asm.add(c)
    with pytest.raises(InvalidArgument, match="not completed"):
        asm.finish()


def test_announced_but_missing_tensor_is_refused():
    asm = codec.TensorAssembler()
    for c in _chunks(torch.randn(10)):
        asm.add(c)
    with pytest.raises(InvalidArgument, match="not received"):
        asm.finish(codec.done_message({"x": None, "y": None}))


def test_duplicate_tensor_is_refused():
    asm = codec.TensorAssembler()
    for c in _chunks(torch.randn(10)):
        asm.add(c)
    with pytest.raises(InvalidArgument, match="twice"):
        asm.add(_chunks(torch.randn(10))[0])


def test_size_limit():
    asm = codec.TensorAssembler(max_total_bytes=100)
    with pytest.raises(ResourceExhausted):
        asm.add(_chunks(torch.randn(1000))[0])


def test_wrong_byte_count_is_refused():
    msg = codec.to_proto(torch.randn(4))
    msg.shape[:] = [5]
    with pytest.raises(InvalidArgument, match="need"):
        codec.from_proto(msg)


def test_unknown_dtype():
    msg = codec.to_proto(torch.randn(4))
    msg.dtype = "complex512"
    with pytest.raises(InvalidArgument, match="unknown tensor dtype"):
        codec.from_proto(msg)
