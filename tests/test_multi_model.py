"""Several models behind one gateway, pooled by what each stage replica serves.

Two tiny Flux models share their text encoders and VAE (the second is a copy of the
first with another transformer, as FLUX.1-schnell shares FLUX.1-dev's), so one encoder
replica and one VAE replica serve both while each has its own denoiser. Every stage is
a real gRPC server in this process; the gateway is given every address of a stage and
sorts the replicas by their `StageInfo.Describe` answer. Images are compared with plain
diffusers.FluxPipeline on each model's folder: float32 on CPU, max abs pixel
difference <= 1/255.
"""

from __future__ import annotations

import shutil

import grpc
import pytest

from ditmesh.gateway.catalog import load_catalog, pools_of
from ditmesh.tiny import make_tiny
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

from .helpers import decode_events, max_diff, reference

TOL = 1  # uint8 levels


@pytest.fixture(scope="module")
def twin(tiny_flux, tmp_path_factory) -> str:
    """tiny_flux's encoders, tokenizers, scheduler and VAE with another transformer."""
    root = tmp_path_factory.mktemp("twin")
    other = make_tiny("flux", root / "other", seed=5)
    twin = root / "tiny-twin"
    shutil.copytree(tiny_flux, twin)
    shutil.rmtree(twin / "transformer")
    shutil.copytree(other / "transformer", twin / "transformer")
    return str(twin)


def test_models_sharing_encoders_and_vae_share_those_pools(tiny_flux, twin):
    catalog = load_catalog([tiny_flux, twin], ["dev", "twin"])
    a, b = (m.fingerprints for m in catalog)
    assert a["encoder"] == b["encoder"] and a["vae"] == b["vae"]
    assert a["denoiser"] != b["denoiser"]
    pools = pools_of(catalog)
    labels = sorted(s.label for s in pools.values())
    assert labels == ["denoiser@dev", "denoiser@twin", "encoder", "vae"]
    assert pools[("encoder", a["encoder"])].models == ("dev", "twin")


def test_catalog_refuses_duplicate_names_and_unmatched_names(tiny_flux, twin):
    from ditmesh.common.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="two models are named 'same'"):
        load_catalog([tiny_flux, twin], ["same", "same"])
    with pytest.raises(InvalidArgument, match="1 --name for 2 --model"):
        load_catalog([tiny_flux, twin], ["one"])


@pytest.fixture(scope="module")
def mesh(tiny_flux, twin):
    from ditmesh.denoiser.service import serve as serve_denoiser
    from ditmesh.encoder.service import serve as serve_encoder
    from ditmesh.gateway.main import serve as serve_gateway
    from ditmesh.vae.service import serve as serve_vae

    encoder = serve_encoder(tiny_flux)
    vae = serve_vae(tiny_flux)
    d_dev = serve_denoiser(tiny_flux)
    d_twin = serve_denoiser(twin)
    servers = [encoder, vae, d_dev, d_twin]
    gw = serve_gateway(
        [tiny_flux, twin],
        name=["dev", "twin"],
        encoder=[encoder.address],
        denoiser=[d_dev.address, d_twin.address],
        vae=[vae.address],
    )
    ch = grpc.insecure_channel(gw.address)
    yield gw, gateway_pb2_grpc.GatewayStub(ch), {"dev": d_dev, "twin": d_twin}
    ch.close()
    gw.stop(0)
    for s in servers:
        s.stop(0)


@pytest.mark.slow
def test_list_models_names_both(mesh):
    _, stub, _ = mesh
    reply = stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
    assert [m.name for m in reply.models] == ["dev", "twin"]
    assert reply.default_model == "dev"


@pytest.mark.slow
def test_each_denoiser_joins_only_its_models_pool(mesh):
    gw, _, denoisers = mesh
    core = gw.gateway
    assert len(core.pools) == 4
    for model, server in denoisers.items():
        pool = core.routes[model].denoiser
        assert [r.address for r in pool.replicas.replicas] == [server.address]
        other = next(d for m, d in denoisers.items() if m != model)
        assert other.address in pool.replicas.foreign
    assert core.routes["dev"].encoder is core.routes["twin"].encoder
    assert core.routes["dev"].vae is core.routes["twin"].vae


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dev", "twin"])
def test_each_model_makes_its_own_image(mesh, tiny_flux, twin, model):
    from diffusers import FluxPipeline

    _, stub, _ = mesh
    folder = {"dev": tiny_flux, "twin": twin}[model]
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    req = gateway_pb2.GenerateRequest(
        model=model, prompt="a red fox", height=64, width=64, steps=3, seed=11
    )
    images, kinds = decode_events(list(stub.Generate(req, timeout=120)))
    assert kinds[-1] == "finished"
    ref = reference(pipe, "a red fox", height=64, width=64, steps=3, seed=11)
    assert max_diff(images[0], ref[0]) <= TOL
    # The other model's image differs (the comparison above can fail).
    other_folder = twin if model == "dev" else tiny_flux
    other = FluxPipeline.from_pretrained(other_folder)
    other.set_progress_bar_config(disable=True)
    assert (
        max_diff(images[0], reference(other, "a red fox", height=64, width=64, steps=3, seed=11)[0])
        > TOL
    )


@pytest.mark.slow
def test_unknown_model_is_not_found_naming_both(mesh):
    _, stub, _ = mesh
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(gateway_pb2.GenerateRequest(model="schnell", prompt="x"), timeout=10))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'schnell'; this mesh serves 'dev', 'twin'" in err.value.details()


@pytest.mark.slow
def test_a_model_without_its_denoiser_is_unavailable_the_other_still_served(tiny_flux, twin):
    """Only dev's denoiser runs: twin's requests get UNAVAILABLE naming what is there,
    dev's requests run, and the gateway reports SERVING (one model is whole)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ditmesh.denoiser.service import serve as serve_denoiser
    from ditmesh.encoder.service import serve as serve_encoder
    from ditmesh.gateway.main import serve as serve_gateway
    from ditmesh.vae.service import serve as serve_vae

    servers = [serve_encoder(tiny_flux), serve_denoiser(tiny_flux), serve_vae(tiny_flux)]
    gw = serve_gateway(
        [tiny_flux, twin],
        name=["dev", "twin"],
        encoder=[servers[0].address],
        denoiser=[servers[1].address],
        vae=[servers[2].address],
    )
    try:
        with grpc.insecure_channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                list(
                    stub.Generate(gateway_pb2.GenerateRequest(model="twin", prompt="x"), timeout=10)
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no replica serves twin" in err.value.details()
            assert servers[1].address in err.value.details()
            req = gateway_pb2.GenerateRequest(model="dev", prompt="x", height=64, width=64, steps=2)
            _, kinds = decode_events(list(stub.Generate(req, timeout=120)))
            assert kinds[-1] == "finished"
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gw.stop(0)
        for s in servers:
            s.stop(0)
