"""Partial images through the SDK and `ditmesh generate`, against the in-process mesh of a
tiny Flux: each preview reaches on_progress as a "partial_image" event (a PIL image with
its step) between its step and the end, and the CLI writes each as it arrives.

What the gateway and the denoiser do for previews (which steps, the VAE's decode, the
result left unchanged at the pixel level) is tests/test_http_api.py's.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from ditmesh.client import (
    AsyncClient,
    Client,
    GenerateParams,
    InvalidArgumentError,
    PartialImage,
    Progress,
)

PROMPT = "a blue square"
BASE = dict(height=64, width=64, steps=4, seed=3)


@pytest.fixture(scope="module")
def client(inproc_mesh):
    with Client(inproc_mesh.address, timeout=120) as c:
        c.wait_ready(60)
        yield c


def _partials(events: list[Progress]) -> list[Progress]:
    return [e for e in events if e.kind == "partial_image"]


@pytest.mark.slow  # an in-process mesh
def test_each_preview_is_a_progress_event_with_its_step(client):
    events: list[Progress] = []
    result = client.generate(PROMPT, **BASE, partial_images=3, on_progress=events.append)
    parts = _partials(events)
    assert [(p.step, p.total) for p in parts] == [(1, 4), (2, 4), (3, 4)]
    kinds = [e.kind for e in events]
    for p in parts:
        assert isinstance(p.partial_image, PartialImage)
        # After its own step's event and before the decode of the final image.
        assert events.index(p) > events.index(Progress(kind="step", step=p.step, total=4))
        assert events.index(p) < kinds.index("decoded")
    assert [p.partial_image.index for p in parts] == [0, 1, 2]
    for p in parts:
        part = p.partial_image
        assert part.image_index == 0 and part.format == "png"
        assert part.mime_type == "image/png"
        assert part.image.size == (64, 64)
        with Image.open(io.BytesIO(part.data)) as again:
            assert np.array_equal(np.asarray(again.convert("RGB")), np.asarray(part.image))
    # The last preview is a step short of the image, not the image itself.
    assert not np.array_equal(
        np.asarray(parts[-1].partial_image.image.convert("RGB")),
        np.asarray(result.images[0].convert("RGB")),
    )
    # Asking for previews leaves the result as it is without them.
    plain = client.generate(PROMPT, **BASE)
    assert plain.raw == result.raw


@pytest.mark.slow
def test_several_images_each_get_their_preview(client):
    events: list[Progress] = []
    client.generate(
        PROMPT,
        **BASE,
        num_images=2,
        partial_images=1,
        output_format="raw",
        on_progress=events.append,
    )
    parts = [p.partial_image for p in _partials(events)]
    assert sorted(p.image_index for p in parts) == [0, 1]
    assert {p.index for p in parts} == {0}
    for p in parts:
        assert p.format == "raw" and len(p.data) == 64 * 64 * 3 and p.image.size == (64, 64)


@pytest.mark.slow
def test_the_async_client_awaits_its_callback_with_each_preview(inproc_mesh):
    seen: list[Progress] = []

    async def on_progress(progress: Progress) -> None:
        await asyncio.sleep(0)
        seen.append(progress)

    async def go():
        async with AsyncClient(inproc_mesh.address, timeout=120) as c:
            params = GenerateParams(**BASE, partial_images=2)
            return await c.generate(PROMPT, params, on_progress=on_progress)

    result = asyncio.run(go())
    assert len(result.images) == 1
    assert [(p.step, p.partial_image.index) for p in _partials(seen)] == [(1, 0), (2, 1)]


@pytest.mark.slow
def test_more_previews_than_steps_allow_is_the_gateways_invalid_argument(client):
    with pytest.raises(InvalidArgumentError, match="need at least 4 steps"):
        client.generate(PROMPT, height=64, width=64, steps=3, partial_images=3)


def test_partial_images_are_checked_before_the_network():
    with pytest.raises(InvalidArgumentError, match="between 0 and 3"):
        GenerateParams(partial_images=4)
    with pytest.raises(InvalidArgumentError, match="between 0 and 3"):
        GenerateParams(partial_images=-1)
    with pytest.raises(TypeError, match="partial_images must be an integer"):
        GenerateParams(partial_images=True)
    assert GenerateParams(partial_images=2).to_request("p").partial_images == 2
    # A unary call has no events to carry previews: refused before any round trip
    # (nothing listens on this address).
    with Client("127.0.0.1:9", timeout=5) as c, pytest.raises(InvalidArgumentError, match="unary"):
        c.generate_unary(PROMPT, partial_images=1)

    async def unary():
        async with AsyncClient("127.0.0.1:9", timeout=5) as c:
            await c.generate_unary(PROMPT, GenerateParams(partial_images=1))

    with pytest.raises(InvalidArgumentError, match="unary"):
        asyncio.run(unary())


def test_a_preview_saved_under_another_suffix_is_converted(tmp_path):
    image = Image.new("RGB", (16, 16), (200, 10, 10))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    part = PartialImage(
        index=0, image_index=0, image=image, data=buf.getvalue(), format="png", mime_type=""
    )
    assert part.save(tmp_path / "a.png").read_bytes() == buf.getvalue()
    with Image.open(part.save(tmp_path / "a.jpg")) as jpeg:
        assert jpeg.format == "JPEG" and jpeg.size == (16, 16)


def _cli(address: str, *argv: str) -> int:
    from ditmesh.cli import main

    return main(["generate", "--gateway", address, *argv])


@pytest.mark.slow
def test_cli_writes_each_preview_as_it_arrives(inproc_mesh, tmp_path, capsys):
    out = tmp_path / "out.png"
    previews = tmp_path / "previews" / "new"
    argv = [PROMPT, "--height", "64", "--width", "64", "--steps", "3", "--seed", "1"]
    code = _cli(
        inproc_mesh.address,
        *argv,
        *("--partial-images", "2", "--partial-dir", str(previews), "-o", str(out)),
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    written = [previews / "out-partial-0.png", previews / "out-partial-1.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.size == (64, 64)
    lines = captured.err.splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("partial image at step")]
    assert [lines[i] for i in said] == [
        f"partial image at step 1/3: {written[0]}",
        f"partial image at step 2/3: {written[1]}",
    ]
    # Written as they came: before the final image was decoded.
    decoded = next(i for i, line in enumerate(lines) if line.startswith("decoded in"))
    assert max(said) < decoded
    assert captured.out.splitlines()[0] == str(out) and out.exists()
    # With no --partial-dir they go next to the output.
    code = _cli(inproc_mesh.address, *argv, "--partial-images", "1", "-o", str(out))
    assert code == 0
    assert (tmp_path / "out-partial-0.png").exists()


def test_cli_partial_dir_alone_is_refused(capsys):
    assert _cli("127.0.0.1:9", PROMPT, "--partial-dir", "x") == 2
    assert capsys.readouterr().err.strip() == "error: --partial-dir needs --partial-images N"


@pytest.mark.slow
def test_cli_says_when_a_preview_cannot_be_written(inproc_mesh, tmp_path, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    out = tmp_path / "out.png"
    code = _cli(
        inproc_mesh.address,
        *(PROMPT, "--height", "64", "--width", "64", "--steps", "2"),
        *("--partial-images", "1", "--partial-dir", str(blocked), "-o", str(out)),
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"error: cannot write {blocked / 'out-partial-0.png'}: ")
    )
    assert "Traceback" not in err and not out.exists()


def test_the_unary_call_refuses_partial_images_at_the_gateway(inproc_mesh):
    """Asked of the gateway directly (the SDK refuses before sending): one reply has no
    place for previews, so the gateway says so instead of decoding and dropping them."""
    import grpc

    from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc

    with grpc.insecure_channel(inproc_mesh.address) as ch:
        req = gateway_pb2.GenerateRequest(
            prompt="a fox", height=64, width=64, steps=4, partial_images=1
        )
        with pytest.raises(grpc.RpcError) as err:
            gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "partial_images needs the streaming Generate call" in err.value.details()
