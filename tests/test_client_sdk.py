"""The client SDK and `ditmesh generate` against a scripted gateway on loopback.

These tests check the CLIENT's side of gateway.proto: chunk reassembly, raw
images, progress order, the retry rule, error mapping, deadlines and protocol
violations. The peer is `ScriptedGateway`, which replays fixed event sequences;
the real gateway's end-to-end tests live with the gateway, not here.

Every test that takes the `client` (or `connect`) fixture runs twice: against
`Client`, and against `AsyncClient` driven through `BlockingAsyncClient`, so each
SDK assertion holds for both clients.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import io
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from ditmesh.client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    DitmeshClientError,
    GenerateParams,
    InvalidArgumentError,
    NotFoundError,
    Progress,
    RequestCancelledError,
    ResourceExhaustedError,
    UnavailableError,
    generate_cmd,
)
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc, vae_pb2

SC = grpc.StatusCode


@dataclass(frozen=True)
class Abort:
    """Script step: end the RPC with this status."""

    code: grpc.StatusCode
    details: str


@dataclass(frozen=True)
class Pause:
    """Script step: hold the stream open (until the client goes away)."""

    seconds: float


class ScriptedGateway(gateway_pb2_grpc.GatewayServicer):
    """A scripted protocol peer, not a gateway: it runs no model and checks nothing.

    Attempt n of Generate (or GenerateUnary) plays script n, the last script
    repeating; every request and its metadata are recorded for assertions.
    The real gateway's end-to-end tests live elsewhere (the gateway's own tests).
    """

    def __init__(self) -> None:
        self.streams: list[list[object]] = []
        self.unary: list[object] = []
        self.requests: list[gateway_pb2.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.address = ""

    def _record(self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext) -> int:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        return len(self.requests) - 1

    def Generate(self, request, context):  # noqa: N802 (gRPC's method name)
        attempt = self._record(request, context)
        for step in self.streams[min(attempt, len(self.streams) - 1)]:
            if isinstance(step, Abort):
                context.abort(step.code, step.details)
            elif isinstance(step, Pause):
                end = time.monotonic() + step.seconds
                while context.is_active() and time.monotonic() < end:
                    time.sleep(0.01)
            else:
                yield step

    def GenerateUnary(self, request, context):  # noqa: N802
        attempt = self._record(request, context)
        step = self.unary[min(attempt, len(self.unary) - 1)]
        if isinstance(step, Abort):
            context.abort(step.code, step.details)
        return step

    def ListModels(self, request, context):  # noqa: N802
        return gateway_pb2.ListModelsResponse(
            models=[
                gateway_pb2.ModelInfo(
                    name="tiny-flux",
                    family="flux",
                    default_height=64,
                    default_width=64,
                    default_steps=4,
                    default_guidance=3.5,
                    size_multiple=16,
                    max_prompt_tokens=77,
                )
            ],
            default_model="tiny-flux",
        )


@pytest.fixture
def peer() -> Iterator[ScriptedGateway]:
    gateway = ScriptedGateway()
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    gateway_pb2_grpc.add_GatewayServicer_to_server(gateway, server)
    gateway.health = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(gateway.health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    gateway.address = f"127.0.0.1:{port}"
    yield gateway
    server.stop(0)


class BlockingAsyncClient:
    """An AsyncClient behind Client's blocking API: each coroutine method runs to the end
    on one event loop of its own, so the channel (bound to that loop) lives across calls."""

    def __init__(self, address: str, **settings: object) -> None:
        self._client = AsyncClient(address, **settings)
        self._loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> object:
        method = getattr(self._client, name)
        if not inspect.iscoroutinefunction(method):
            return method
        return lambda *args, **kwargs: self._loop.run_until_complete(method(*args, **kwargs))

    def __enter__(self) -> BlockingAsyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._client.close())
            self._loop.close()


@pytest.fixture(params=["Client", "AsyncClient"])
def connect(request) -> Iterator[Callable[..., Client]]:
    """Makes clients of the kind under test (closed at the end of the test)."""
    made: list[Client | BlockingAsyncClient] = []

    def connect(address: str, **settings: object) -> Client:
        kind = Client if request.param == "Client" else BlockingAsyncClient
        made.append(kind(address, **settings))
        return made[-1]

    yield connect
    for c in made:
        c.close()


@pytest.fixture
def client(peer: ScriptedGateway, connect) -> Client:
    return connect(peer.address, timeout=5.0, retry_backoff=0.01)


# ----------------------------------------------------------------------------- scripts


def encoded(color: tuple[int, int, int], fmt: str, size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def chunks(
    index: int, data: bytes, pieces: int, fmt: int = vae_pb2.OUTPUT_FORMAT_PNG, mime: str = ""
) -> list[gateway_pb2.GenerateEvent]:
    """The image split into `pieces` ImageChunk events, the first one with the metadata."""
    step = -(-len(data) // pieces)
    events = []
    for offset in range(0, len(data), step):
        chunk = vae_pb2.ImageChunk(
            index=index,
            offset=offset,
            data=data[offset : offset + step],
            last=offset + step >= len(data),
            total_bytes=len(data),
        )
        if offset == 0:
            chunk.format, chunk.mime_type, chunk.width, chunk.height = fmt, mime, 8, 6
        events.append(gateway_pb2.GenerateEvent(request_id="rid", image=chunk))
    return events


def finished(num_images: int = 1, seed: int = 7) -> gateway_pb2.GenerateEvent:
    return gateway_pb2.GenerateEvent(
        request_id="rid",
        finished=gateway_pb2.Finished(
            seed=seed,
            num_images=num_images,
            encode_seconds=0.1,
            denoise_seconds=0.2,
            decode_seconds=0.3,
            total_seconds=0.6,
        ),
    )


def progress_events(steps: int = 2) -> list[gateway_pb2.GenerateEvent]:
    ev = gateway_pb2.GenerateEvent
    return [
        ev(queued=gateway_pb2.Queued(position=3)),
        ev(encoded=gateway_pb2.Encoded(seconds=0.1)),
        *[ev(step=gateway_pb2.Step(step=i, total=steps)) for i in range(1, steps + 1)],
        ev(decoded=gateway_pb2.Decoded(seconds=0.3)),
    ]


PNG = encoded((255, 0, 0), "PNG")
OK_SCRIPT = [*progress_events(), *chunks(0, PNG, 1), finished()]


# ----------------------------------------------------------------------------- both clients


def test_reassembles_interleaved_chunks_and_reports_progress_in_order(peer, client):
    jpeg = encoded((0, 0, 255), "JPEG")
    first, second = chunks(0, PNG, 3), chunks(1, jpeg, 2, vae_pb2.OUTPUT_FORMAT_JPEG, "image/jpeg")
    interleaved = [first[0], second[0], first[1], second[1], first[2]]
    peer.streams = [[*progress_events(), *interleaved, finished(num_images=2, seed=42)]]
    seen: list[Progress] = []

    result = client.generate("a red fox", steps=2, num_images=2, on_progress=seen.append)

    assert result.raw == [PNG, jpeg]
    assert result.formats == ["png", "jpeg"]
    assert result.mime_types == ["image/png", "image/jpeg"]
    assert [im.size for im in result.images] == [(8, 6), (8, 6)]
    assert result.images[0].convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert result.seed == 42 and result.timings.total == pytest.approx(0.6)
    assert result.request_id == "rid"  # the gateway's echo wins
    assert seen == [
        Progress(kind="queued", position=3),
        Progress(kind="encoded", seconds=0.1),
        Progress(kind="step", step=1, total=2),
        Progress(kind="step", step=2, total=2),
        Progress(kind="decoded", seconds=0.3),
    ]
    sent = peer.requests[0]
    assert sent.prompt == "a red fox" and sent.steps == 2 and sent.num_images == 2
    assert not sent.HasField("seed") and not sent.HasField("guidance")
    assert len(sent.request_id) == 32 and peer.metadata[0]["x-request-id"] == sent.request_id


def test_request_fields_reach_the_wire(peer, client):
    peer.streams = [OK_SCRIPT]
    client.generate(
        "p",
        negative_prompt="blur",
        height=64,
        width=32,
        guidance=0.0,
        true_cfg_scale=4.0,
        seed=2**63 - 1,
        output_format="webp",
        quality=80,
        model="tiny-flux",
        request_id="my-id",
    )
    sent = peer.requests[0]
    assert (sent.negative_prompt, sent.height, sent.width, sent.quality) == ("blur", 64, 32, 80)
    assert sent.HasField("guidance") and sent.guidance == 0.0 and sent.true_cfg_scale == 4.0
    assert sent.seed == 2**63 - 1 and sent.model == "tiny-flux"
    assert sent.output_format == vae_pb2.OUTPUT_FORMAT_WEBP
    assert sent.request_id == "my-id" and peer.metadata[0]["x-request-id"] == "my-id"


def test_raw_format_becomes_an_rgb_image_and_saves(peer, client, tmp_path: Path):
    pixels = bytes(range(8 * 6 * 3))
    peer.streams = [[*chunks(0, pixels, 4, vae_pb2.OUTPUT_FORMAT_RAW), finished()]]
    result = client.generate("p", output_format="raw")
    image = result.images[0]
    assert image.mode == "RGB" and image.size == (8, 6)
    assert image.getpixel((1, 0)) == (3, 4, 5)  # row-major [height, width, 3]
    assert image.getpixel((0, 1)) == tuple(range(24, 27))
    assert result.raw == [pixels] and result.formats == ["raw"]
    [png_path] = result.save(tmp_path / "x.png")
    assert Image.open(png_path).convert("RGB").tobytes() == pixels
    [raw_path] = result.save(tmp_path / "x.raw")
    assert raw_path.read_bytes() == pixels


def test_save_numbers_several_images(peer, client, tmp_path: Path):
    other = encoded((0, 255, 0), "PNG")
    peer.streams = [[*chunks(0, PNG, 2), *chunks(1, other, 2), finished(2)]]
    paths = client.generate("p", num_images=2).save(tmp_path / "img.png")
    assert paths == [tmp_path / "img-0.png", tmp_path / "img-1.png"]
    assert [p.read_bytes() for p in paths] == [PNG, other]


def test_retries_unavailable_before_the_first_event_with_the_same_id(peer, client):
    down = [Abort(SC.UNAVAILABLE, "the gateway is draining")]
    peer.streams = [down, down, OK_SCRIPT]
    result = client.generate("p")
    assert result.raw == [PNG] and len(peer.requests) == 3
    assert len({r.request_id for r in peer.requests}) == 1
    assert {m["x-request-id"] for m in peer.metadata} == {peer.requests[0].request_id}


def test_no_retry_once_an_event_arrived(peer, client):
    peer.streams = [[*progress_events()[:1], Abort(SC.UNAVAILABLE, "the encoder went away")]]
    with pytest.raises(UnavailableError, match="the encoder went away"):
        client.generate("p")
    assert len(peer.requests) == 1


def test_gives_up_after_the_configured_retries(peer, connect):
    peer.streams = [[Abort(SC.UNAVAILABLE, "down")]]
    with connect(peer.address, retries=2, retry_backoff=0.01) as c, pytest.raises(UnavailableError):
        c.generate("p")
    assert len(peer.requests) == 3


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (SC.INVALID_ARGUMENT, InvalidArgumentError),
        (SC.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (SC.CANCELLED, RequestCancelledError),
        (SC.DEADLINE_EXCEEDED, DeadlineExceededError),
        (SC.NOT_FOUND, NotFoundError),
        (SC.PERMISSION_DENIED, DitmeshClientError),
        (SC.INTERNAL, DitmeshClientError),
    ],
)
def test_status_codes_map_to_errors_with_the_servers_sentence(peer, client, code, error):
    sentence = "height 65 is not a multiple of 16"
    peer.streams = [[Abort(code, sentence)]]
    with pytest.raises(error) as info:
        client.generate("p")
    assert type(info.value) is error and info.value.code == code
    assert info.value.details == sentence
    assert sentence in str(info.value) and code.name in str(info.value)
    assert info.value.__cause__ is None and len(peer.requests) == 1


@pytest.mark.alone  # bounds the wall time of a deadline
def test_client_deadline_raises_deadline_exceeded(peer, client):
    peer.streams = [[*progress_events()[:1], Pause(3.0)]]
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        client.generate("p", timeout=0.3)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("script", "match"),
    [
        ([*chunks(0, PNG, 2)], "without a Finished"),
        ([*chunks(0, PNG, 1), finished(num_images=2)], r"missing \[1\]"),
        ([*chunks(0, PNG, 3)[::2], finished()], "offset"),
        ([*chunks(0, PNG, 2)[:1], finished()], "last chunk"),
        ([*chunks(0, PNG[:40], 1), finished()], "not a valid png"),
        ([finished(), *chunks(0, PNG, 1)], "after Finished"),
    ],
    ids=["no-finished", "missing-image", "gap", "truncated", "corrupt", "late-chunk"],
)
def test_protocol_violations_raise(peer, client, script, match):
    peer.streams = [script]
    with pytest.raises(DitmeshClientError, match=match):
        client.generate("p")


def test_total_bytes_mismatch_raises(peer, client):
    [event] = chunks(0, PNG, 1)
    event.image.total_bytes = len(PNG) + 10
    peer.streams = [[event, finished()]]
    with pytest.raises(DitmeshClientError, match="announced"):
        client.generate("p")


def test_bad_arguments_fail_before_the_network(peer, client):
    with pytest.raises(ValueError, match="output_format"):
        client.generate("p", output_format="bmp")
    with pytest.raises(ValueError, match="num_images"):
        client.generate("p", num_images=0)
    assert peer.requests == []


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_lone_surrogate_is_an_invalid_argument_with_a_sentence(peer, client, field):
    text = "a fox \ud800 in snow"  # e.g. bytes read with errors="surrogateescape"
    kwargs = {"negative_prompt": text} if field == "negative_prompt" else {}
    for call in (client.generate, client.generate_unary):
        with pytest.raises(InvalidArgumentError) as info:
            call(text if field == "prompt" else "p", **kwargs)
        assert info.value.code == SC.INVALID_ARGUMENT
        assert f"{field} has a lone surrogate '\\ud800' at character 6" in info.value.details
        assert not isinstance(info.value, UnicodeError) and info.value.__cause__ is None
    assert peer.requests == []


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63, 2**64])
def test_seeds_the_gateway_refuses_are_refused_before_sending(peer, client, seed):
    with pytest.raises(InvalidArgumentError, match=r"seed must be between 0 and 2\*\*63-1"):
        client.generate("p", seed=seed)
    with pytest.raises(InvalidArgumentError, match=str(seed)):
        client.generate_unary("p", seed=seed)
    assert peer.requests == []


def test_seed_bounds_reach_the_wire(peer, client):
    peer.streams = [OK_SCRIPT]
    for seed in (0, 2**63 - 1):
        client.generate("p", seed=seed)
    assert [r.seed for r in peer.requests] == [0, 2**63 - 1]


@pytest.mark.parametrize("request_id", ["", "a b", "x" * 129, "caf\u00e9", "id/1", "a\nb"])
def test_a_malformed_request_id_is_refused_with_the_rule(peer, client, request_id):
    with pytest.raises(InvalidArgumentError) as info:
        client.generate("p", request_id=request_id)
    assert "1-128 characters of letters, digits, '.', '_', ':' or '-'" in info.value.details
    assert f"got {len(request_id)} characters" in info.value.details
    assert peer.requests == []


def test_well_formed_request_ids_reach_the_wire(peer, client):
    peer.streams = [OK_SCRIPT]
    for request_id in ("a.b_c:d-9", "x" * 128, "Z"):
        client.generate("p", request_id=request_id)
    assert [r.request_id for r in peer.requests] == ["a.b_c:d-9", "x" * 128, "Z"]
    assert [m["x-request-id"] for m in peer.metadata] == ["a.b_c:d-9", "x" * 128, "Z"]


def test_params_object_with_fields_over_it(peer, client):
    peer.streams = [OK_SCRIPT]
    peer.unary = [
        gateway_pb2.GenerateResponse(
            images=[gateway_pb2.Image(index=0, data=PNG)], finished=finished().finished
        )
    ]
    settings = GenerateParams(height=64, width=32, steps=3, seed=5, output_format="jpeg")
    client.generate("p", settings)
    client.generate("p", settings, seed=6, steps=4)
    client.generate_unary("q", params=settings, width=48)
    first, second, third = peer.requests
    assert (first.height, first.width, first.steps, first.seed) == (64, 32, 3, 5)
    assert first.output_format == vae_pb2.OUTPUT_FORMAT_JPEG
    assert (second.height, second.steps, second.seed) == (64, 4, 6)
    assert (third.prompt, third.width, third.seed) == ("q", 48, 5)
    assert settings.seed == 5  # the caller's object is left as it was


def test_an_unknown_field_is_a_type_error_naming_it(peer, client):
    with pytest.raises(TypeError, match="unexpected keyword argument 'stpes'.*steps"):
        client.generate("p", stpes=4)
    with pytest.raises(TypeError, match="generate_unary.*'on_progress'"):
        client.generate_unary("p", on_progress=print)
    with pytest.raises(TypeError, match="steps must be an integer"):
        client.generate("p", steps=2.5)
    with pytest.raises(TypeError, match="prompt must be str"):
        client.generate(b"p")
    assert peer.requests == []


def test_params_are_checked_when_made():
    with pytest.raises(InvalidArgumentError, match="height must be >= 0"):
        GenerateParams(height=-16)
    with pytest.raises(InvalidArgumentError, match="quality must be between 0 and 100"):
        GenerateParams(quality=101)
    with pytest.raises(InvalidArgumentError, match="guidance must be a finite number"):
        GenerateParams(guidance=float("inf"))
    with pytest.raises(InvalidArgumentError, match="seed must be between"):
        GenerateParams(seed=-5)
    with pytest.raises(InvalidArgumentError, match="request_id must be 1-128"):
        GenerateParams(request_id="x" * 200)
    with pytest.raises(TypeError, match="steps must be an integer"):
        GenerateParams(steps=True)


def test_generate_unary_retries_and_decodes(peer, client):
    response = gateway_pb2.GenerateResponse(
        request_id="rid",
        images=[
            gateway_pb2.Image(index=1, format=vae_pb2.OUTPUT_FORMAT_PNG, data=PNG),
            gateway_pb2.Image(index=0, format=vae_pb2.OUTPUT_FORMAT_PNG, data=PNG),
        ],
        finished=finished(2, seed=9).finished,
    )
    peer.unary = [Abort(SC.UNAVAILABLE, "down"), response]
    result = client.generate_unary("p", num_images=2)
    assert result.raw == [PNG, PNG] and result.seed == 9 and len(peer.requests) == 2
    assert peer.requests[0].request_id == peer.requests[1].request_id


def test_list_models(client):
    listing = client.list_models()
    assert listing.default_model == "tiny-flux"
    [model] = listing.models
    assert (model.name, model.default_steps, model.size_multiple) == ("tiny-flux", 4, 16)


def test_wait_ready_follows_the_health_service(peer, client):
    client.wait_ready(timeout=2.0)
    peer.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(DeadlineExceededError, match="NOT_SERVING"):
        client.wait_ready(timeout=0.3)


# ----------------------------------------------------------------------------- async client


def test_async_client_basics(peer):
    async def scenario() -> None:
        seen: list[str] = []

        async def on_progress(progress: Progress) -> None:
            seen.append(progress.kind)

        async with AsyncClient(peer.address, timeout=5.0, retry_backoff=0.01) as c:
            peer.streams = [[Abort(SC.UNAVAILABLE, "down")], OK_SCRIPT]
            result = await c.generate("p", on_progress=on_progress)
            assert result.raw == [PNG] and result.seed == 7 and len(peer.requests) == 2
            assert seen == ["queued", "encoded", "step", "step", "decoded"]

            plain: list[Progress] = []
            await c.generate("p", on_progress=plain.append)
            assert len(plain) == 5

            peer.streams = [[*progress_events()[:1], Abort(SC.UNAVAILABLE, "stage lost")]]
            peer.requests.clear()
            with pytest.raises(UnavailableError, match="stage lost"):
                await c.generate("p")
            assert len(peer.requests) == 1

            peer.streams = [[Abort(SC.INVALID_ARGUMENT, "steps must be <= 50")]]
            with pytest.raises(InvalidArgumentError) as info:
                await c.generate("p")
            assert info.value.details == "steps must be <= 50"

            peer.streams = [[Pause(3.0)]]
            with pytest.raises(DeadlineExceededError):
                await c.generate("p", timeout=0.3)

            peer.unary = [
                gateway_pb2.GenerateResponse(
                    images=[gateway_pb2.Image(index=0, data=PNG)], finished=finished().finished
                )
            ]
            assert (await c.generate_unary("p")).raw == [PNG]
            assert (await c.list_models()).default_model == "tiny-flux"
            await c.wait_ready(timeout=2.0)

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- CLI


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ditmesh")
    generate_cmd.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["generate", *argv])


def test_cli_writes_the_image_and_reports_seed(peer, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DITMESH_GATEWAY", peer.address)
    peer.streams = [OK_SCRIPT]
    out = tmp_path / "cat.png"
    assert generate_cmd.run(cli_args("a cat", "--steps", "2", "--seed", "1", "-o", str(out))) == 0
    assert out.read_bytes() == PNG
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "seed: 7" in stdout and "total_seconds: 0.600" in stdout
    sent = peer.requests[0]
    assert sent.steps == 2 and sent.seed == 1 and sent.output_format == vae_pb2.OUTPUT_FORMAT_PNG


def test_cli_takes_the_format_from_the_suffix(peer, tmp_path, capsys):
    peer.streams = [OK_SCRIPT]
    args = cli_args("--gateway", peer.address, "p", "-o", str(tmp_path / "x.webp"))
    assert generate_cmd.run(args) == 0
    assert peer.requests[0].output_format == vae_pb2.OUTPUT_FORMAT_WEBP


def test_cli_has_a_flag_for_every_request_field(peer, tmp_path):
    peer.streams = [OK_SCRIPT]
    flags = {
        "--negative-prompt": "blur",
        "--height": "64",
        "--width": "32",
        "--steps": "3",
        "--guidance": "0",
        "--true-cfg-scale": "4",
        "--seed": "9",
        "--num-images": "1",
        "--format": "webp",
        "--quality": "80",
        "--model": "tiny-flux",
        "--request-id": "cli-1",
    }
    args = cli_args("p", "--gateway", peer.address, "-o", str(tmp_path / "x.png"))
    assert {f.name for f in dataclasses.fields(GenerateParams)} <= set(vars(args))
    argv = [part for flag, value in flags.items() for part in (flag, value)]
    args = cli_args("p", "--gateway", peer.address, "-o", str(tmp_path / "x.png"), *argv)
    assert generate_cmd.run(args) == 0
    sent = peer.requests[0]
    assert (sent.negative_prompt, sent.height, sent.width, sent.steps) == ("blur", 64, 32, 3)
    assert sent.HasField("guidance") and sent.guidance == 0.0 and sent.true_cfg_scale == 4.0
    assert (sent.seed, sent.num_images, sent.quality, sent.model) == (9, 1, 80, "tiny-flux")
    assert sent.output_format == vae_pb2.OUTPUT_FORMAT_WEBP and sent.request_id == "cli-1"


@pytest.mark.parametrize(
    ("argv", "sentence"),
    [
        (["--seed", "-1"], "seed must be between 0 and 2**63-1"),
        (["--height", "-16"], "height must be >= 0"),
        (["--num-images", "0"], "num_images must be >= 1"),
        (["--request-id", "has space"], "request_id must be 1-128 characters"),
        (["--quality", "101"], "quality must be between 0 and 100"),
    ],
)
def test_cli_refuses_bad_flags_before_sending(peer, tmp_path, capsys, argv, sentence):
    args = cli_args("--gateway", peer.address, "p", "-o", str(tmp_path / "x.png"), *argv)
    assert generate_cmd.run(args) == 2
    captured = capsys.readouterr()
    [line] = captured.err.strip().splitlines()
    assert line.startswith("error: INVALID_ARGUMENT: ") and sentence in line
    assert "Traceback" not in captured.err + captured.out and peer.requests == []


def test_cli_draws_a_bar_on_a_terminal_and_lines_elsewhere():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    events = [
        Progress(kind="queued", position=2),
        Progress(kind="step", step=1, total=2),
        Progress(kind="step", step=2, total=2),
        Progress(kind="decoded", seconds=0.25),
    ]
    for stream in (Terminal(), io.StringIO()):
        reporter = generate_cmd._ProgressReporter(stream)
        for event in events:
            reporter(event)
        reporter.close()
        text = stream.getvalue()
        assert text.startswith("queued at position 2\n") and text.endswith("decoded in 0.25 s\n")
        if isinstance(stream, Terminal):
            assert "\rdenoising [" in text and "] 2/2 steps\n" in text
        else:
            assert "\r" not in text and "denoising 2 steps\n" in text


@pytest.mark.parametrize(
    ("code", "status"), [(SC.INVALID_ARGUMENT, 2), (SC.NOT_FOUND, 2), (SC.RESOURCE_EXHAUSTED, 1)]
)
def test_cli_reports_errors_without_a_traceback(peer, tmp_path, capsys, code, status):
    peer.streams = [[Abort(code, "prompt is longer than 77 tokens")]]
    args = cli_args("--gateway", peer.address, "p", "-o", str(tmp_path / "x.png"))
    assert generate_cmd.run(args) == status
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: {code.name}: prompt is longer than 77 tokens"
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "x.png").exists()
