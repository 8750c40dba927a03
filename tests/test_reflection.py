"""gRPC server reflection (issue 15): every service lists what it serves, and a client
with no generated stubs calls the gateway's Generate from the descriptors it is sent.

The messages here are built in a fresh descriptor pool fed only by the server's
reflection answers (google.protobuf's message_factory), as grpcurl or Postman would.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image

pytestmark = pytest.mark.slow  # a whole mesh in this process

COMMON = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


class Reflected:
    """What a client learns from one server's reflection service alone."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.db = ProtoReflectionDescriptorDatabase(self.channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)

    def services(self) -> set[str]:
        return set(self.db.get_services())

    def method(self, service: str, name: str):
        """(callable, request class, method descriptor), all from reflection."""
        method = self.pool.FindServiceByName(service).methods_by_name[name]
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        kind = "unary_stream" if method.server_streaming else "unary_unary"
        call = getattr(self.channel, kind)(
            f"/{service}/{name}",
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )
        return call, request, method

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def reflected():
    opened: list[Reflected] = []

    def open_(address: str) -> Reflected:
        opened.append(Reflected(address))
        return opened[-1]

    yield open_
    for r in opened:
        r.close()


def test_every_service_lists_what_it_serves(inproc_mesh, reflected):
    assert reflected(inproc_mesh.address).services() == {"ditmesh.v1.Gateway", *COMMON}
    stages = {
        "ditmesh.v1.Encoder": inproc_mesh.encoder,
        "ditmesh.v1.Denoiser": inproc_mesh.denoisers[0],
        "ditmesh.v1.Vae": inproc_mesh.vae,
    }
    for service, server in stages.items():
        assert reflected(server.address).services() == {
            service,
            "ditmesh.v1.StageInfo",
            *COMMON,
        }, service


def test_a_stage_describes_itself_through_reflection(inproc_mesh, reflected):
    r = reflected(inproc_mesh.vae.address)
    describe, request, _ = r.method("ditmesh.v1.StageInfo", "Describe")
    answer = describe(request(), timeout=30)
    assert answer.stage == "vae"
    assert answer.fingerprint


def test_generate_from_reflected_descriptors_alone(inproc_mesh, reflected):
    from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

    r = reflected(inproc_mesh.address)
    generate, request_class, method = r.method("ditmesh.v1.Gateway", "Generate")
    assert method.server_streaming and not method.client_streaming
    # Built from the reflection answer, not the generated module.
    assert request_class is not gateway_pb2.GenerateRequest
    assert request_class.DESCRIPTOR.file.pool is r.pool

    fields = dict(prompt="a blue square", height=64, width=64, steps=2, seed=11)
    events = list(generate(request_class(**fields), timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "finished", kinds
    assert kinds.count("step") == 2 and "decoded" in kinds, kinds
    chunks = [e.image for e in events if e.WhichOneof("event") == "image"]
    assert chunks and chunks[-1].last
    data = b"".join(c.data for c in chunks)
    got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert got.shape == (64, 64, 3)
    assert events[-1].finished.seed == 11

    # The same request through the generated stubs gives the same picture.
    with grpc.insecure_channel(inproc_mesh.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        want = stub.GenerateUnary(gateway_pb2.GenerateRequest(**fields), timeout=120)
    expected = np.asarray(Image.open(io.BytesIO(want.images[0].data)).convert("RGB"))
    assert np.array_equal(got, expected)
