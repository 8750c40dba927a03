"""Bad input gets a status code and a sentence from real servers, never a traceback."""

from __future__ import annotations

import os

import grpc
import pytest
import torch

from ditmesh.common import codec
from ditmesh.v1 import denoiser_pb2, denoiser_pb2_grpc, gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.slow  # every test runs against a whole mesh in this process

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def stub(inproc_mesh):
    ch = grpc.insecure_channel(
        inproc_mesh.address, options=[("grpc.max_send_message_length", 128 << 20)]
    )
    yield gateway_pb2_grpc.GatewayStub(ch)
    ch.close()


def call(stub, **kw):
    kw.setdefault("height", 64)
    kw.setdefault("width", 64)
    kw.setdefault("steps", 1)
    with pytest.raises(grpc.RpcError) as info:
        stub.GenerateUnary(gateway_pb2.GenerateRequest(**kw), timeout=60)
    err = info.value
    assert "Traceback" not in err.details()
    return err.code(), err.details()


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(prompt="a cat", height=65), "height 65 is not a multiple of 16"),
        (dict(prompt="a cat", width=100), "try 96 or 112"),
        (dict(prompt="a cat", height=8192), "over the limit"),
        (dict(prompt="a cat", steps=-1), "steps must be at least 1"),
        (dict(prompt="a cat", steps=100000), "steps 100000 is over the limit"),
        (dict(prompt=""), "the prompt is empty"),
        (dict(prompt="   "), "the prompt is empty"),
        (dict(prompt="a cat", num_images=50), "num_images must be between 1 and 8"),
        (dict(prompt="a cat", guidance=float("nan")), "guidance must be between"),
        (dict(prompt="a cat", seed=-5), "seed must be between"),
        (dict(prompt="a cat", output_format=42), "unknown output format"),
        (dict(prompt="a cat", quality=101), "quality must be between 1 and 100"),
        (dict(prompt="x" * 30_000), "characters long"),
    ],
)
def test_invalid_request(stub, kw, needle):
    code, details = call(stub, **kw)
    assert code == INVALID
    assert needle in details


def test_unknown_model_is_not_found_and_names_the_served_ones(stub, tiny_flux):
    code, details = call(stub, prompt="a cat", model="no-such-model")
    assert code == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'no-such-model'" in details
    assert f"this mesh serves '{os.path.basename(tiny_flux)}'" in details


@pytest.mark.parametrize(
    "rid, needle",
    [
        ("x" * 10_000, "the request id is 10000 characters long; the limit is 128"),
        ("a b", "may hold only letters, digits"),
        ("a\nb", "may hold only letters, digits"),
        ("a\x00b", "may hold only letters, digits"),
        ("caf\u00e9", "may hold only letters, digits"),
    ],
)
def test_bad_request_ids_are_refused(stub, rid, needle):
    code, details = call(stub, prompt="a cat", request_id=rid)
    assert code == INVALID
    assert needle in details


def test_bad_request_id_in_metadata_is_refused(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.GenerateUnary(
            gateway_pb2.GenerateRequest(prompt="a cat", height=64, width=64, steps=1),
            metadata=[("x-request-id", "has space")],
            timeout=60,
        )
    assert info.value.code() == INVALID
    assert "may hold only letters, digits" in info.value.details()


def test_prompt_over_the_token_limit(stub):
    # Under the character limit, over the model's 512 T5 tokens: the encoder says so.
    code, details = call(stub, prompt="a red cat " * 600)
    assert code == INVALID
    assert "tokens long" in details and "at most 512" in details


def test_oversized_message(stub):
    code, details = call(stub, prompt="x" * (5 << 20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details


def test_stream_form_reports_the_same(stub):
    with pytest.raises(grpc.RpcError) as info:
        list(
            stub.Generate(
                gateway_pb2.GenerateRequest(prompt="a cat", height=65, width=64), timeout=30
            )
        )
    assert info.value.code() == INVALID


def test_internal_error_is_a_sentence_not_a_traceback(inproc_mesh):
    """Conditioning of the wrong width makes the transformer fail: INTERNAL, with request id."""
    ch = grpc.insecure_channel(inproc_mesh.denoisers[0].address)
    stub = denoiser_pb2_grpc.DenoiserStub(ch)
    bad = {"prompt_embeds": torch.randn(1, 8, 3), "pooled_prompt_embeds": torch.randn(1, 5)}

    def reqs():
        yield denoiser_pb2.DenoiseRequest(
            params=denoiser_pb2.DenoiseParams(
                request_id="r-1", height=64, width=64, steps=1, guidance=3.5, seed=1, num_images=1
            )
        )
        for c in codec.iter_tensor_chunks(bad):
            yield denoiser_pb2.DenoiseRequest(chunk=c)
        yield denoiser_pb2.DenoiseRequest(done=codec.done_message(bad))

    with pytest.raises(grpc.RpcError) as info:
        list(stub.Denoise(reqs(), timeout=30, metadata=[("x-request-id", "r-1")]))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "internal error in the denoiser stage (request r-1)" in info.value.details()
    assert "Traceback" not in info.value.details()
    ch.close()


def test_denoiser_rejects_a_stream_without_params(inproc_mesh):
    ch = grpc.insecure_channel(inproc_mesh.denoisers[0].address)
    stub = denoiser_pb2_grpc.DenoiserStub(ch)
    with pytest.raises(grpc.RpcError) as info:
        list(
            stub.Denoise(
                iter([denoiser_pb2.DenoiseRequest(done=codec.done_message({}))]), timeout=30
            )
        )
    assert info.value.code() == INVALID
    assert "must start with DenoiseParams" in info.value.details()
    ch.close()
