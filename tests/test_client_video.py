"""The SDK and `ditmesh generate` with a video model's answers (issue 18), against the
scripted gateway of test_client_sdk.py: a video's chunks become `result.video` (bytes as
received, frames as PIL images, fps, num_frames, format), `save` writes or converts it,
requests carry num_frames and fps, previews of a video are videos, the VAE's frame
progress reaches on_progress (kind "frames") and the CLI's progress ("decoding frames
k/F"), and the CLI writes `-o clip.mp4`. The real mesh's videos are tested in test_video_mesh.py.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import grpc
import numpy as np
import pytest
from PIL import Image

from ditmesh.client import (
    Client,
    DitmeshClientError,
    InvalidArgumentError,
    Progress,
    Video,
    generate_cmd,
)
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc, vae_pb2

from . import test_client_sdk as sdk

FRAMES, HEIGHT, WIDTH, FPS = 5, 6, 8, 4


@pytest.fixture
def peer() -> Iterator[sdk.ScriptedGateway]:
    gateway = sdk.ScriptedGateway()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    gateway_pb2_grpc.add_GatewayServicer_to_server(gateway, server)
    gateway.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield gateway
    server.stop(0)


@pytest.fixture(params=["Client", "AsyncClient"])
def client(request, peer) -> Iterator[Client]:
    kind = Client if request.param == "Client" else sdk.BlockingAsyncClient
    c = kind(peer.address, timeout=5.0, retry_backoff=0.01)
    yield c
    c.close()


def pixels(frames: int = FRAMES) -> np.ndarray:
    """Frames far apart in colour, so a lossy codec keeps them apart."""
    out = np.zeros((frames, HEIGHT, WIDTH, 3), np.uint8)
    for i in range(frames):
        out[i, ..., i % 3] = 40 + 40 * i
    return out


def mp4_of(frames: np.ndarray, fps: int = FPS) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def gif_of(frames: np.ndarray, fps: int = FPS) -> bytes:
    buf = io.BytesIO()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(
        buf, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0
    )
    return buf.getvalue()


def video_chunks(
    data: bytes, fmt: int, pieces: int = 3, frames: int = FRAMES, index: int = 0
) -> list[gateway_pb2.GenerateEvent]:
    """The video as ImageChunks; the first one carries the size, frame count and rate."""
    events = sdk.chunks(index, data, pieces, fmt)
    first = events[0].image
    first.width, first.height, first.num_frames, first.fps = WIDTH, HEIGHT, frames, FPS
    return events


def script(data: bytes, fmt: int, frames: int = FRAMES) -> list[object]:
    return [*sdk.progress_events(), *video_chunks(data, fmt, frames=frames), sdk.finished()]


def frame_events(done: list[int], total: int = FRAMES, index: int = 0) -> list[object]:
    """The gateway's `frames` events: the VAE's progress on video `index`."""
    return [
        gateway_pb2.GenerateEvent(
            frames=gateway_pb2.FrameProgress(
                stage="vae", video_index=index, frames_done=k, frames_total=total
            )
        )
        for k in done
    ]


def script_with_frames(data: bytes, fmt: int, done: list[int]) -> list[object]:
    """As the gateway sends a video: steps, the frames decoded, decoded, the chunks."""
    events = sdk.progress_events()
    return [*events[:-1], *frame_events(done), events[-1], *video_chunks(data, fmt), sdk.finished()]


# ----------------------------------------------------------------------------- SDK


def test_raw_video_has_its_frames_fps_and_saves(peer, client, tmp_path):
    want = pixels()
    peer.streams = [script(want.tobytes(), vae_pb2.OUTPUT_FORMAT_RAW)]
    seen: list[str] = []
    result = client.generate(
        "p",
        num_frames=FRAMES,
        fps=FPS,
        output_format="raw",
        on_progress=lambda p: seen.append(p.kind),
    )
    assert seen == ["queued", "encoded", "step", "step", "decoded"]  # as for images
    sent = peer.requests[0]
    assert (sent.num_frames, sent.fps, sent.output_format) == (
        FRAMES,
        FPS,
        vae_pb2.OUTPUT_FORMAT_RAW,
    )
    video = result.video
    assert isinstance(video, Video) and result.videos == [video]
    assert result.images == [] and result.raw == []
    assert (video.format, video.num_frames, video.fps, video.width, video.height) == (
        "raw",
        FRAMES,
        FPS,
        WIDTH,
        HEIGHT,
    )
    assert video.data == want.tobytes()
    assert len(video.frames) == FRAMES
    for frame, pixels_of_frame in zip(video.frames, want, strict=True):
        assert frame.size == (WIDTH, HEIGHT) and frame.mode == "RGB"
        assert np.array_equal(np.asarray(frame), pixels_of_frame)

    assert result.save(tmp_path / "clip.raw") == [tmp_path / "clip.raw"]
    assert (tmp_path / "clip.raw").read_bytes() == want.tobytes()
    video.save(tmp_path / "clip.gif")
    with Image.open(tmp_path / "clip.gif") as gif:
        assert (gif.format, gif.n_frames, gif.size) == ("GIF", FRAMES, (WIDTH, HEIGHT))
    video.save(tmp_path / "clip.webp")
    with Image.open(tmp_path / "clip.webp") as webp:
        assert (webp.format, webp.n_frames) == ("WEBP", FRAMES)
    with pytest.raises(ValueError, match="does not encode MP4"):
        video.save(tmp_path / "clip.mp4")


def test_frame_progress_reaches_on_progress_between_the_steps_and_decoded(peer, client):
    want = pixels()
    peer.streams = [script_with_frames(want.tobytes(), vae_pb2.OUTPUT_FORMAT_RAW, [2, 4, 5])]
    seen: list[Progress] = []
    result = client.generate("p", num_frames=FRAMES, output_format="raw", on_progress=seen.append)
    assert [p.kind for p in seen] == [
        "queued",
        "encoded",
        "step",
        "step",
        *["frames"] * 3,
        "decoded",
    ]
    frames = [p for p in seen if p.kind == "frames"]
    assert [(p.stage, p.video_index, p.frames_done, p.frames_total) for p in frames] == [
        ("vae", 0, 2, FRAMES),
        ("vae", 0, 4, FRAMES),
        ("vae", 0, 5, FRAMES),
    ]
    assert result.video.data == want.tobytes()


def test_mp4_video_decodes_with_pyav_and_saves_as_received(peer, client, tmp_path):
    data = mp4_of(pixels())
    peer.streams = [script(data, vae_pb2.OUTPUT_FORMAT_MP4)]
    video = client.generate("p", output_format="mp4").video
    assert (video.format, video.mime_type, video.data) == ("mp4", "video/mp4", data)
    frames = video.frames
    assert len(frames) == FRAMES and frames[0].size == (WIDTH, HEIGHT)
    # H.264 is lossy: each frame stays near its colour, far from the others'.
    for frame, want in zip(frames, pixels(), strict=True):
        assert np.abs(np.asarray(frame, np.int16) - want).mean() < 12
    assert video.save(tmp_path / "clip.mp4").read_bytes() == data


def test_mp4_frames_without_pyav_say_what_to_install(peer, client, monkeypatch):
    peer.streams = [script(mp4_of(pixels()), vae_pb2.OUTPUT_FORMAT_MP4)]
    video = client.generate("p", output_format="mp4").video
    monkeypatch.setitem(sys.modules, "av", None)  # what a client-only install has
    with pytest.raises(ImportError, match="pip install av"):
        _ = video.frames


def test_a_gif_that_folds_equal_frames_still_has_every_frame(peer, client):
    want = pixels(3)[[0, 0, 0, 1, 2]]  # the encoder folds the first three into one
    data = gif_of(want)
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames < FRAMES  # the premise: fewer frames stored than shown
    peer.streams = [script(data, vae_pb2.OUTPUT_FORMAT_GIF)]
    video = client.generate("p", output_format="gif").video
    assert len(video.frames) == FRAMES
    for frame, pixels_of_frame in zip(video.frames, want, strict=True):
        assert np.array_equal(np.asarray(frame), pixels_of_frame)


def test_a_frame_count_other_than_announced_is_a_protocol_error(peer, client):
    peer.streams = [script(pixels().tobytes(), vae_pb2.OUTPUT_FORMAT_RAW, frames=FRAMES + 1)]
    video = client.generate("p").video
    with pytest.raises(DitmeshClientError, match="raw video has"):
        _ = video.frames


def test_videos_and_stills_in_one_answer_are_a_protocol_error(peer, client):
    raw = pixels().tobytes()
    peer.streams = [
        [
            *video_chunks(raw, vae_pb2.OUTPUT_FORMAT_RAW),
            *sdk.chunks(1, sdk.PNG, 1),
            sdk.finished(num_images=2),
        ]
    ]
    with pytest.raises(DitmeshClientError, match="videos and still images"):
        client.generate("p", num_images=2)


def test_several_videos_save_with_an_index(peer, client, tmp_path):
    raw = pixels().tobytes()
    peer.streams = [
        [
            *video_chunks(raw, vae_pb2.OUTPUT_FORMAT_RAW, index=0),
            *video_chunks(raw[::-1], vae_pb2.OUTPUT_FORMAT_RAW, index=1),
            sdk.finished(num_images=2),
        ]
    ]
    result = client.generate("p", num_images=2)
    assert [v.data for v in result.videos] == [raw, raw[::-1]]
    paths = result.save(tmp_path / "clip.raw")
    assert paths == [tmp_path / "clip-0.raw", tmp_path / "clip-1.raw"]
    assert paths[1].read_bytes() == raw[::-1]


def test_unary_answer_carries_the_video(peer, client):
    raw = pixels().tobytes()
    image = gateway_pb2.Image(
        index=0,
        format=vae_pb2.OUTPUT_FORMAT_RAW,
        width=WIDTH,
        height=HEIGHT,
        data=raw,
        num_frames=FRAMES,
        fps=FPS,
    )
    peer.unary = [gateway_pb2.GenerateResponse(images=[image], finished=sdk.finished().finished)]
    video = client.generate_unary("p", num_frames=FRAMES).video
    assert (video.num_frames, video.fps, len(video.frames)) == (FRAMES, FPS, FRAMES)
    assert peer.requests[0].num_frames == FRAMES


def test_a_video_preview_is_a_video(peer, client):
    raw = pixels().tobytes()
    preview = gateway_pb2.GenerateEvent(
        partial_image=gateway_pb2.PartialImage(
            partial_image_index=0,
            step=1,
            total=2,
            image=gateway_pb2.Image(
                index=0,
                format=vae_pb2.OUTPUT_FORMAT_RAW,
                width=WIDTH,
                height=HEIGHT,
                data=raw,
                num_frames=FRAMES,
                fps=FPS,
            ),
        )
    )
    peer.streams = [[preview, *video_chunks(raw, vae_pb2.OUTPUT_FORMAT_RAW), sdk.finished()]]
    parts = []
    client.generate("p", partial_images=1, on_progress=parts.append)
    (part,) = [p.partial_image for p in parts]
    assert part.image is None and part.video is not None
    assert len(part.video.frames) == FRAMES and part.format == "raw"


def test_video_fields_are_checked_before_the_network(peer, client):
    for field in ("num_frames", "fps"):
        with pytest.raises(InvalidArgumentError, match=f"{field} must be >= 0"):
            client.generate("p", **{field: -1})
    with pytest.raises(TypeError, match="num_frames must be an integer"):
        client.generate("p", num_frames=2.5)
    assert peer.requests == []


def test_a_still_image_cannot_be_saved_as_mp4_but_as_gif(peer, client, tmp_path):
    peer.streams = [sdk.OK_SCRIPT]
    result = client.generate("p")
    with pytest.raises(ValueError, match="MP4"):
        result.save(tmp_path / "x.mp4")
    result.save(tmp_path / "x.gif")
    with Image.open(tmp_path / "x.gif") as gif:
        assert gif.format == "GIF"


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_clip_mp4_with_frames_and_fps(peer, tmp_path, capsys):
    data = mp4_of(pixels())
    peer.streams = [script(data, vae_pb2.OUTPUT_FORMAT_MP4)]
    out = tmp_path / "clip.mp4"
    argv = ("p", "--gateway", peer.address, "-o", str(out), "--num-frames", "5", "--fps", "4")
    assert generate_cmd.run(sdk.cli_args(*argv)) == 0
    sent = peer.requests[0]
    assert (sent.output_format, sent.num_frames, sent.fps) == (vae_pb2.OUTPUT_FORMAT_MP4, 5, 4)
    assert out.read_bytes() == data
    stdout = capsys.readouterr().out
    assert f"{out}\n" in stdout and "video: 5 frames at 4 fps, mp4" in stdout


def test_cli_shows_decoding_frames_in_its_progress(peer, tmp_path, capsys):
    data = mp4_of(pixels())
    peer.streams = [script_with_frames(data, vae_pb2.OUTPUT_FORMAT_MP4, [3, 5])]
    out = tmp_path / "clip.mp4"
    assert generate_cmd.run(sdk.cli_args("p", "--gateway", peer.address, "-o", str(out))) == 0
    err = capsys.readouterr().err
    assert "decoding frames 3/5\ndecoding frames 5/5\ndecoded in" in err
    assert out.read_bytes() == data


def test_cli_draws_frames_on_a_line_of_their_own_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    reporter = generate_cmd._ProgressReporter(stream)
    for event in [
        Progress(kind="step", step=1, total=1),
        Progress(kind="frames", stage="vae", frames_done=4, frames_total=9),
        Progress(kind="frames", stage="vae", frames_done=9, frames_total=9),
        Progress(kind="frames", stage="vae", video_index=1, frames_done=9, frames_total=9),
        Progress(kind="decoded", seconds=0.5),
    ]:
        reporter(event)
    reporter.close()
    text = stream.getvalue()
    # The step bar ends its line; the frame counts overwrite one another on the next.
    assert "] 1/1 steps\n\rdecoding frames 4/9\rdecoding frames 9/9\r" in text
    assert text.endswith("\rdecoding frames 9/9 (video 2)\ndecoded in 0.50 s\n")


def test_cli_writes_out_mp4_when_asked_for_frames_without_o(peer, tmp_path, monkeypatch):
    peer.streams = [script(mp4_of(pixels()), vae_pb2.OUTPUT_FORMAT_MP4)]
    monkeypatch.chdir(tmp_path)
    assert generate_cmd.run(sdk.cli_args("p", "--gateway", peer.address, "--fps", "4")) == 0
    assert peer.requests[0].output_format == vae_pb2.OUTPUT_FORMAT_MP4
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"]


def test_cli_takes_gif_from_the_suffix(peer, tmp_path):
    peer.streams = [script(gif_of(pixels()), vae_pb2.OUTPUT_FORMAT_GIF)]
    out = tmp_path / "clip.gif"
    assert generate_cmd.run(sdk.cli_args("p", "--gateway", peer.address, "-o", str(out))) == 0
    assert peer.requests[0].output_format == vae_pb2.OUTPUT_FORMAT_GIF
    with Image.open(out) as gif:
        assert gif.n_frames == FRAMES


def test_the_default_format_is_left_to_the_model(peer, client):
    """Unset, the gateway picks: PNG for an image model, MP4 for a video model."""
    peer.streams = [sdk.OK_SCRIPT]
    client.generate("p")
    assert peer.requests[0].output_format == vae_pb2.OUTPUT_FORMAT_UNSPECIFIED


def test_cli_without_a_known_suffix_leaves_the_format_to_the_model(peer, tmp_path):
    peer.streams = [script(mp4_of(pixels()), vae_pb2.OUTPUT_FORMAT_MP4)]
    out = tmp_path / "clip"
    assert generate_cmd.run(sdk.cli_args("p", "--gateway", peer.address, "-o", str(out))) == 0
    assert peer.requests[0].output_format == vae_pb2.OUTPUT_FORMAT_UNSPECIFIED
    assert out.read_bytes()[4:8] == b"ftyp"  # the MP4 as received
