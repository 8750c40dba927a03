"""The OpenAI-compatible HTTP API, API keys and partial images, driven by the official
`openai` package against gateways on real tiny stages (the in-process mesh's).

The HTTP gateways here share the in-process mesh's encoder, denoiser and VAE: an image
asked for over HTTP must equal, pixel for pixel, the one gRPC gives for the same seed.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import logging
import urllib.error
import urllib.request

import grpc
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from ditmesh.common.errors import ResourceExhausted, Unavailable
from ditmesh.gateway.auth import ApiKeys, Unauthenticated
from ditmesh.gateway.flags import add_drain_flag, add_gateway_flags, settings_from_flags
from ditmesh.gateway.main import serve
from ditmesh.gateway.openai_shapes import OpenAIError, from_ditmesh, parse_generation
from ditmesh.gateway.previews import preview_steps
from ditmesh.gateway.settings import GatewaySettings
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

from .helpers import decode_events, request, wait_for

KEY = "sk-test-0123456789"


class _Reply:
    def __init__(self, status: int, headers, body: bytes) -> None:
        self.status_code, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def _http(method: str, url: str, *, content: bytes | None = None, json_body=None) -> _Reply:
    """A plain HTTP call (stdlib), for what the openai SDK does not send."""
    data = json.dumps(json_body).encode() if json_body is not None else content
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return _Reply(r.status, r.headers, r.read())
    except urllib.error.HTTPError as err:
        return _Reply(err.code, err.headers, err.read())


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _gateway(tiny_flux, mesh, **settings):
    return serve(
        tiny_flux,
        encoder=[mesh.encoder.address],
        denoiser=[d.address for d in mesh.denoisers],
        vae=[mesh.vae.address],
        settings=GatewaySettings(http_port=0, **settings),
    )


@pytest.fixture(scope="module")
def http_gateway(tiny_flux, inproc_mesh):
    gw = _gateway(tiny_flux, inproc_mesh)
    yield gw
    gw.stop(0)


@pytest.fixture(scope="module")
def keyed_gateway(tiny_flux, inproc_mesh, tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# the test's key\n\n{KEY}\nsk-other\n")
    gw = _gateway(tiny_flux, inproc_mesh, api_keys_file=str(path))
    yield gw
    gw.stop(0)


def _client(gw, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.http_api.url}/v1", api_key=key, max_retries=0)


def _grpc_image(address: str, metadata=(), **kw) -> np.ndarray:
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        images, _ = decode_events(list(stub.Generate(request(**kw), metadata=metadata)))
    return images[0]


# ------------------------------------------------------------ images/generations


def test_generate_equals_grpc_result(http_gateway):
    got = _client(http_gateway).images.generate(
        prompt="a red fox", size="64x64", extra_body={"steps": 2, "seed": 7}
    )
    assert len(got.data) == 1
    pixels = _pixels(base64.b64decode(got.data[0].b64_json))
    want = _grpc_image(http_gateway.address, steps=2, seed=7)
    assert pixels.shape == (64, 64, 3)
    assert np.array_equal(pixels, want)
    block = got.model_extra["ditmesh"]
    assert block["seed"] == 7 and block["steps"] == 2
    assert {"encode", "denoise", "decode", "total"} <= set(block["timings"])
    assert set(block["stages"]) <= {"encoder", "denoiser", "vae"}
    assert got.size == "64x64" and got.output_format == "png"


def test_step_caching_over_http(http_gateway):
    """cache_threshold travels in the body like the SDK's field, and the result's block
    says how many steps were skipped; a threshold out of range is a 400 naming it."""
    client = _client(http_gateway)
    got = client.images.generate(
        prompt="a red fox",
        size="64x64",
        extra_body={"steps": 4, "seed": 7, "cache_threshold": 1.0},
    )
    block = got.model_extra["ditmesh"]
    assert block["steps_total"] == 4 and 1 <= block["cached_steps"] <= 3
    assert block["speedups"] == ["step-cache"]
    exact = client.images.generate(prompt="a red fox", size="64x64", extra_body={"steps": 4})
    assert "cached_steps" not in exact.model_extra["ditmesh"]
    for bad_value in (1.5, "0.1"):
        with pytest.raises(openai.BadRequestError, match="cache_threshold"):
            client.images.generate(
                prompt="a red fox", extra_body={"steps": 4, "cache_threshold": bad_value}
            )


def test_n_images_and_jpeg(http_gateway):
    got = _client(http_gateway).images.generate(
        prompt="a blue square",
        size="64x64",
        n=2,
        output_format="jpeg",
        extra_body={"steps": 2, "seed": 3},
    )
    assert len(got.data) == 2
    for image in got.data:
        data = base64.b64decode(image.b64_json)
        assert data[:3] == b"\xff\xd8\xff"  # JPEG
        assert _pixels(data).shape == (64, 64, 3)


def test_stream_gives_partial_images_then_the_completed_one(http_gateway):
    stream = _client(http_gateway).images.generate(
        prompt="a red fox",
        size="64x64",
        stream=True,
        partial_images=2,
        extra_body={"steps": 4, "seed": 7},
    )
    events = list(stream)
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = _pixels(base64.b64decode(events[2].b64_json))
    assert np.array_equal(final, _grpc_image(http_gateway.address, steps=4, seed=7))
    for e in events[:2]:
        preview = _pixels(base64.b64decode(e.b64_json))
        assert preview.shape == (64, 64, 3)
        assert not np.array_equal(preview, final)  # the latents of a step before the last
    assert [e.model_extra["ditmesh"]["step"] for e in events[:2]] == [1, 2]


def test_grpc_generate_offers_the_same_previews(http_gateway):
    with grpc.insecure_channel(http_gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        events = list(stub.Generate(request(steps=4, seed=7, partial_images=2)))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("partial_image") == 2
    assert kinds.index("partial_image") > kinds.index("encoded")
    assert max(i for i, k in enumerate(kinds) if k == "partial_image") < kinds.index("decoded")
    parts = [e.partial_image for e in events if e.WhichOneof("event") == "partial_image"]
    assert [(p.partial_image_index, p.step, p.total) for p in parts] == [(0, 1, 4), (1, 2, 4)]
    assert _pixels(parts[0].image.data).shape == (64, 64, 3)


def test_a_client_that_leaves_frees_its_request(http_gateway, caplog):
    url = http_gateway.http_api.url
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"prompt": "a fox", "size": "64x64", "steps": 500, "request_id": "gone-1"})
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    with caplog.at_level(logging.INFO, logger="ditmesh.access"):
        conn.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
        wait_for(lambda: http_gateway.gateway.running == 1, 10)
        conn.close()
        wait_for(lambda: http_gateway.gateway.running == 0, 10)
    (line,) = [r.getMessage() for r in caplog.records if "request=gone-1 " in r.getMessage()]
    assert "status=CANCELLED" in line


def test_models_and_healthz(http_gateway, tiny_flux):
    models = _client(http_gateway).models.list()
    assert [m.id for m in models.data] == list(http_gateway.gateway.models)
    r = _http("GET", f"{http_gateway.http_api.url}/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


# ------------------------------------------------------------ errors in OpenAI's shape


def _error_of(exc_info) -> dict:
    body = exc_info.value.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"response_format": "url"}, "response_format"),
        ({"size": "big"}, "size"),
        ({"size": "63x64"}, None),  # not a multiple of the model's factor: make_plan says so
        ({"n": 0}, "n"),
        ({"extra_body": {"steps": "many"}}, "steps"),
        ({"extra_body": {"stepz": 3}}, "stepz"),
        ({"extra_body": {"partial_images": 1}}, "partial_images"),  # without stream
        ({"background": "transparent"}, "background"),
    ],
)
def test_bad_input_gets_an_openai_shaped_400(http_gateway, kw, param):
    with pytest.raises(openai.BadRequestError) as exc_info:
        _client(http_gateway).images.generate(prompt="a red fox", **kw)
    assert exc_info.value.status_code == 400
    err = _error_of(exc_info)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["message"]


def test_url_refused_clearly(http_gateway):
    with pytest.raises(openai.BadRequestError) as exc_info:
        _client(http_gateway).images.generate(prompt="a fox", response_format="url")
    assert "b64_json" in _error_of(exc_info)["message"]


def test_unknown_model_is_404(http_gateway):
    with pytest.raises(openai.NotFoundError) as exc_info:
        _client(http_gateway).images.generate(prompt="a fox", model="no-such-model")
    err = _error_of(exc_info)
    assert err["param"] == "model" and "no-such-model" in err["message"]


def test_not_json_too_large_and_unknown_path(http_gateway):
    url = http_gateway.http_api.url
    r = _http("POST", f"{url}/v1/images/generations", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # Refused on the declared length, before the body is read (so none is sent here).
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/images/generations")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2 * 1024 * 1024))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "bytes" in json.loads(r.read())["error"]["message"]
    conn.close()
    r = _http("GET", f"{url}/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_stage_down_is_503_with_retry_after(tiny_flux):
    # No stage answers: admission refuses at once with UNAVAILABLE.
    gw = serve(
        tiny_flux,
        encoder=["127.0.0.1:9"],
        denoiser=["127.0.0.1:9"],
        vae=["127.0.0.1:9"],
        settings=GatewaySettings(http_port=0),
    )
    try:
        r = _http("POST", f"{gw.http_api.url}/v1/images/generations", json_body={"prompt": "a fox"})
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "server_error"
        assert _http("GET", f"{gw.http_api.url}/healthz").status_code == 503
    finally:
        gw.stop(0)


def test_status_mapping_429_and_503():
    busy = from_ditmesh(ResourceExhausted("the denoiser queue is full; retry in about 12 s"))
    assert (busy.status, busy.retry_after, busy.type) == (429, 12, "rate_limit_error")
    down = from_ditmesh(Unavailable("the vae stage is unavailable: no healthy replica"))
    assert down.status == 503 and down.retry_after >= 1
    assert down.headers() == {"Retry-After": str(down.retry_after)}
    assert from_ditmesh(Unauthenticated("no key")).status == 401


# ------------------------------------------------------------ API keys


def test_wrong_key_is_401_on_http_and_unauthenticated_on_grpc(keyed_gateway):
    with pytest.raises(openai.AuthenticationError) as exc_info:
        _client(keyed_gateway, "sk-wrong").images.generate(prompt="a fox", size="64x64")
    assert exc_info.value.status_code == 401
    assert _error_of(exc_info)["code"] == "invalid_api_key"
    r = _http("GET", f"{keyed_gateway.http_api.url}/v1/models")  # no key at all
    assert r.status_code == 401
    with grpc.insecure_channel(keyed_gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for metadata in ((), (("authorization", "Bearer sk-wrong"),)):
            with pytest.raises(grpc.RpcError) as rpc:
                list(stub.Generate(request(), metadata=metadata))
            assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as rpc:
                stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=metadata)
            assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_right_key_is_let_in_on_both(keyed_gateway):
    got = _client(keyed_gateway, KEY).images.generate(
        prompt="a red fox", size="64x64", extra_body={"steps": 2, "seed": 7}
    )
    pixels = _pixels(base64.b64decode(got.data[0].b64_json))
    want = _grpc_image(keyed_gateway.address, (("authorization", f"Bearer {KEY}"),), seed=7)
    assert np.array_equal(pixels, want)
    # Probes carry no key: health stays open.
    assert _http("GET", f"{keyed_gateway.http_api.url}/healthz").status_code == 200


def test_no_key_file_means_no_auth(http_gateway):
    r = _http("GET", f"{http_gateway.http_api.url}/v1/models")  # no Authorization header
    assert r.status_code == 200
    with grpc.insecure_channel(http_gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        assert stub.ListModels(gateway_pb2.ListModelsRequest()).models


def test_key_file_checks(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys.from_file(empty)
    with pytest.raises(ValueError, match="api-keys-file"):
        ApiKeys.from_file(tmp_path / "missing")
    keys = ApiKeys(["k1"])
    keys.check("Bearer k1")
    keys.check("bearer  k1 ")
    for bad in (None, "", "k1", "Basic k1", "Bearer k2", "Bearer "):
        with pytest.raises(Unauthenticated):
            keys.check(bad)


# ------------------------------------------------------------ pure parts: flags, shapes, steps


def test_flags_fill_the_settings(tmp_path):
    p = argparse.ArgumentParser()
    add_gateway_flags(p)
    add_drain_flag(p)
    s = settings_from_flags(p.parse_args([]))
    assert s.http_port is None and s.api_keys_file is None
    s = settings_from_flags(p.parse_args(["--http-port", "8000", "--api-keys-file", "k.txt"]))
    assert s.http_port == 8000 and s.api_keys_file == "k.txt"
    with pytest.raises(ValueError, match="--http-port"):
        settings_from_flags(p.parse_args(["--http-port", "70000"]))


def test_parse_generation_maps_fields():
    g = parse_generation(
        {
            "prompt": "p",
            "model": "m",
            "n": 2,
            "size": "96x64",
            "output_format": "webp",
            "output_compression": 80,
            "stream": True,
            "partial_images": 3,
            "steps": 5,
            "seed": 0,
            "guidance": 4,
            "negative_prompt": "blur",
            "cache_threshold": 0.25,
            "quality": "hd",  # OpenAI's, accepted and ignored
        }
    )
    r = g.request
    assert (r.prompt, r.model, r.num_images, r.width, r.height) == ("p", "m", 2, 96, 64)
    assert (r.quality, r.partial_images, r.steps, r.seed) == (80, 3, 5, 0)
    assert r.HasField("seed") and r.guidance == 4.0 and r.negative_prompt == "blur"
    assert r.cache_threshold == 0.25
    assert g.stream and g.output_format == "webp"
    assert not parse_generation({"prompt": "p", "size": "auto"}).request.width
    for body in ([], {"n": 1}, {"prompt": 3}, {"prompt": "p", "n": True}):
        with pytest.raises(OpenAIError):
            parse_generation(body)


def test_preview_steps_are_spaced_before_the_last():
    assert preview_steps(0, 28) == ()
    assert preview_steps(2, 4) == (1, 2)
    assert preview_steps(3, 4) == (1, 2, 3)
    assert preview_steps(2, 28) == (9, 18)
    for k, steps in ((4, 28), (-1, 28), (2, 2)):
        with pytest.raises(Exception, match="partial"):
            preview_steps(k, steps)


# ------------------------------------------------------------ ditmesh up, as a user runs it


@pytest.mark.slow
def test_up_serves_http_with_previews_from_a_data_parallel_gang(tiny_flux, tmp_path):
    """`ditmesh up --http-port` hands the flag to its gateway; with --dp 2 and one image,
    the gang's second replica has no image yet joins every preview's gather."""
    from .helpers import UpProcess, free_port

    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    port = free_port()
    mesh = UpProcess(tiny_flux, "--dp", "2", "--http-port", str(port), "--api-keys-file", str(keys))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        events = list(
            client.images.generate(
                prompt="a red fox",
                size="64x64",
                stream=True,
                partial_images=3,
                extra_body={"steps": 4, "seed": 7},
            )
        )
        assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + [
            "image_generation.completed"
        ]
        final = _pixels(base64.b64decode(events[-1].b64_json))
        metadata = (("authorization", f"Bearer {KEY}"),)
        assert np.array_equal(final, _grpc_image(mesh.address, metadata, steps=4, seed=7))
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong", max_retries=0
            ).models.list()
    finally:
        assert mesh.stop() == 0


# ------------------------------------------------------------ the denoiser's side of previews


def test_previews_leave_the_result_alone_and_are_shaped_like_it(tiny_flux):
    import dataclasses

    from ditmesh.common.models import resolve_model
    from ditmesh.denoiser.runner import LocalRunner

    from .helpers import flux_jobs

    runner = LocalRunner(resolve_model(tiny_flux), "cpu", "float32")
    job = flux_jobs(tiny_flux)[0]
    plain = runner.run(job)
    seen = []
    with_previews = runner.run(
        dataclasses.replace(job, preview_steps=(1, 2)),
        on_preview=lambda step, total, latents: seen.append((step, total, latents.shape)),
    )
    assert torch.equal(plain, with_previews)
    assert [(s, t) for s, t, _ in seen] == [(1, job.steps), (2, job.steps)]
    assert all(shape == plain.shape for _, _, shape in seen)


def test_the_denoiser_checks_preview_steps():
    from ditmesh.common.errors import InvalidArgument
    from ditmesh.denoiser.gang import GangRunner
    from ditmesh.denoiser.parallel.mesh import ParallelConfig
    from ditmesh.denoiser.service import check_preview_steps

    local = object()
    check_preview_steps((), 4, local)
    check_preview_steps((1, 3), 4, local)
    for steps in ((0,), (4,), (2, 1), (1, 1)):
        with pytest.raises(InvalidArgument, match="preview steps"):
            check_preview_steps(steps, 4, local)
    gang = GangRunner.__new__(GangRunner)  # only its layout is read
    gang.parallel = ParallelConfig(pipefusion=2)
    with pytest.raises(InvalidArgument, match="PipeFusion"):
        check_preview_steps((1,), 4, gang)
