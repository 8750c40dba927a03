"""A video's frames stream back as they are decoded, with progress (issue 18).

The VAE stage takes a video's frames piece by piece from its decoder's `iter_decode`:
RAW's bytes go out with each piece, MP4 is encoded as the pieces come and goes out
whole, and a progress message follows each piece when the caller asks
(`DecodeParams.report_frames`). The gateway turns those into `frames` events, which the
SDK hands to on_progress. Here: the piecewise encoder (`VideoWriter`) gives the same
bytes however the frames are split; the VAE stage alone over gRPC (the order of chunks
and progress, nothing new for a caller that does not ask, MP4 encoded off the model
thread, a failure half-way ends in an error status without the video's last chunk);
and the tiny CogVideoX through a mesh of real gRPC servers on loopback, whose VAE
decoder yields 2 frames at a time (the real one yields the whole video at once).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

from ditmesh.client import Client, DitmeshClientError
from ditmesh.common import codec
from ditmesh.v1 import gateway_pb2, gateway_pb2_grpc, vae_pb2, vae_pb2_grpc
from ditmesh.vae.service import iter_image_chunks
from ditmesh.vae.video import VideoWriter, encode_pieces, encode_video

PROMPT = "a red ball bouncing on a wooden floor"
# 9 frames are 3 latent frames of 6x8 latents: what test_video_mesh.py runs too.
HEIGHT, WIDTH, FRAMES, FPS = 48, 64, 9, 12
RAW, MP4 = vae_pb2.OUTPUT_FORMAT_RAW, vae_pb2.OUTPUT_FORMAT_MP4


def clip(frames: int = 7, height: int = 16, width: int = 24) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((frames, height, width, 3)) * 255).astype(np.uint8)


def split(frames: np.ndarray, size: int) -> list[np.ndarray]:
    return [frames[i : i + size] for i in range(0, len(frames), size)]


# ----------------------------------------------------------------------------- the encoder


@pytest.mark.parametrize(
    "fmt",
    [RAW, MP4, vae_pb2.OUTPUT_FORMAT_WEBP, vae_pb2.OUTPUT_FORMAT_GIF],
    ids=["raw", "mp4", "webp", "gif"],
)
def test_pieces_of_1_3_or_all_frames_give_the_same_container(fmt):
    frames = clip()
    whole = encode_video(frames, fmt, 8)
    for size in (1, 3, len(frames)):
        assert encode_pieces(split(frames, size), fmt, 8) == whole, size


def test_mp4_of_pieces_decodes_back_to_the_frames_size_and_fps():
    import av

    frames = np.zeros((9, 32, 48, 3), np.uint8)  # far apart in colour, flat: H.264 keeps them
    for i in range(9):
        frames[i, ..., i % 3] = 40 + 20 * i
    data = encode_pieces(split(frames, 2), MP4, FPS)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        got = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.average_rate == FPS
    assert len(got) == 9 and got[0].shape == (32, 48, 3)
    for got_frame, want in zip(got, frames, strict=True):
        assert np.abs(got_frame.astype(int) - want).mean() < 12


def test_raw_goes_out_with_each_piece_other_containers_at_the_end():
    frames = clip()
    raw = VideoWriter(RAW, 8)
    assert raw.incremental
    assert [raw.add(p) for p in split(frames, 3)] == [p.tobytes() for p in split(frames, 3)]
    assert raw.finish() == b"" and raw.frames == 7 and raw.size == (16, 24)
    mp4 = VideoWriter(MP4, 8)
    assert not mp4.incremental
    assert [mp4.add(p) for p in split(frames, 3)] == [b"", b"", b""]
    assert mp4.finish() == encode_video(frames, MP4, 8)


def test_the_writer_refuses_what_it_cannot_write():
    from ditmesh.common.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="fps"):
        VideoWriter(MP4, 0)
    with pytest.raises(InvalidArgument, match="quality"):
        VideoWriter(MP4, 8, quality=101)
    writer = VideoWriter(MP4, 8)
    writer.add(clip(2))
    with pytest.raises(ValueError, match="frames of 24x8 follow frames of 24x16"):
        writer.add(clip(2, height=8))
    writer.close()  # a video dropped half-way
    with pytest.raises(ValueError, match="at least one frame"):
        VideoWriter(vae_pb2.OUTPUT_FORMAT_GIF, 8).finish()
    with pytest.raises(ValueError, match="uint8"):
        VideoWriter(RAW, 8).add(clip().astype(np.float32))


def test_chunks_of_a_part_run_on_from_its_offset():
    first = list(iter_image_chunks(0, b"abcde", RAW, 4, 2, 2, num_frames=3, total_bytes=9))
    rest = list(iter_image_chunks(0, b"fghi", RAW, 4, 2, 2, num_frames=3, offset=5, total_bytes=9))
    chunks = first + rest
    assert [c.offset for c in chunks] == [0, 2, 4, 5, 7]
    assert b"".join(c.data for c in chunks) == b"abcdefghi"
    assert [c.last for c in chunks] == [False] * 4 + [True]
    assert {c.total_bytes for c in chunks} == {9}
    assert (chunks[0].num_frames, chunks[0].width, chunks[1].num_frames) == (3, 4, 0)


def test_the_gateway_takes_no_video_short_of_its_announced_bytes():
    from ditmesh.common.errors import DitmeshError
    from ditmesh.gateway.calls import _check_whole

    chunks = list(iter_image_chunks(0, b"abcdefghi", RAW, 4, 2, 4, num_frames=3))
    _check_whole(chunks, 1)
    with pytest.raises(DitmeshError, match="returned images \\[\\] of 1"):
        _check_whole(chunks[:-1], 1)
    with pytest.raises(DitmeshError, match="sent 5 bytes of image 0, announced 9"):
        _check_whole([chunks[0], chunks[-1]], 1)


# ----------------------------------------------------------------------------- the VAE stage


class Broke(RuntimeError):
    pass


def piecewise(cls):
    """The family's decoder, yielding `piece` frames at a time (None: the whole video, as
    the base does) and raising after `fail_after` pieces when that is set."""

    class Piecewise(cls):
        piece: int | None = 2
        fail_after: int | None = None
        threads: list[str] = []

        def iter_decode(self, latents) -> Iterator[np.ndarray]:
            self.threads.append(threading.current_thread().name)
            frames = self.decode(latents)[0]
            size = self.piece or len(frames)
            for n, start in enumerate(range(0, len(frames), size)):
                if n == self.fail_after:
                    raise Broke("the test's decoder broke")
                yield frames[start : start + size]

    return Piecewise


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    from ditmesh.tiny import make_tiny

    return str(make_tiny("cogvideox", tmp_path_factory.mktemp("cog") / "model", seed=0))


@pytest.fixture(scope="module")
def decoder(folder):
    from ditmesh.common.models import load_class, resolve_model

    model = resolve_model(folder)
    cls = piecewise(load_class(model.family.video_decoder))
    return cls(model, torch.device("cpu"), torch.float32)


@pytest.fixture
def pieces(decoder):
    """The decoder set back to 2 frames a piece, no failure, after each test."""
    yield decoder
    decoder.piece, decoder.fail_after = 2, None


@pytest.fixture(scope="module")
def vae(decoder):
    from ditmesh.common.server import StageOptions, start_server
    from ditmesh.common.stage_info import stage_info
    from ditmesh.vae.service import VaeService

    service = VaeService(decoder)
    running = start_server(
        StageOptions().server_config("vae"),
        [
            (vae_pb2_grpc.add_VaeServicer_to_server, service, "ditmesh.v1.Vae"),
            stage_info("vae", decoder.model, 1),
        ],
    )
    running.on_stop.append(service.close)
    yield running
    running.stop(0)


def latents_of(decoder, seed: int = 0) -> torch.Tensor:
    shape = decoder.latent_shape(HEIGHT, WIDTH, FRAMES)
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed))


def decode_call(vae, latents, fmt: int, report_frames: bool = True):
    params = vae_pb2.DecodeParams(
        height=HEIGHT,
        width=WIDTH,
        output_format=fmt,
        num_frames=FRAMES,
        fps=FPS,
        report_frames=report_frames,
    )
    requests = codec.params_and_tensors_stream(vae_pb2.DecodeRequest, params, {"latents": latents})
    with grpc.insecure_channel(vae.address) as channel:
        return list(vae_pb2_grpc.VaeStub(channel).Decode(requests, timeout=120))


def test_raw_goes_out_piece_by_piece_each_followed_by_its_progress(vae, pieces):
    latents = latents_of(pieces)
    answer = decode_call(vae, latents, RAW)
    frame_bytes = HEIGHT * WIDTH * 3
    order = []
    for msg in answer:
        if msg.HasField("progress"):
            p = msg.progress
            assert (p.video_index, p.frames_total) == (0, FRAMES)
            order.append(("progress", p.frames_done))
        else:
            order.append(("bytes", (msg.offset + len(msg.data)) // frame_bytes))
    # Each piece's bytes, then its progress: 2, 4, 6, 8 and the 9th frame.
    assert order == [item for k in (2, 4, 6, 8, 9) for item in (("bytes", k), ("progress", k))]
    chunks = [m for m in answer if not m.HasField("progress")]
    assert [c.last for c in chunks] == [False] * 4 + [True]
    assert (chunks[0].num_frames, chunks[0].fps, chunks[0].width) == (FRAMES, FPS, WIDTH)
    assert {c.total_bytes for c in chunks} == {FRAMES * frame_bytes}
    whole = pieces.decode(latents)[0]
    assert b"".join(c.data for c in chunks) == whole.tobytes()


def test_a_caller_that_does_not_ask_gets_no_progress(vae, pieces):
    answer = decode_call(vae, latents_of(pieces), RAW, report_frames=False)
    assert answer and not any(m.HasField("progress") for m in answer)


def test_mp4_is_encoded_off_the_model_thread_and_sent_whole(vae, pieces, monkeypatch):
    import av

    from ditmesh.vae import service

    encoded_on: list[str] = []
    encode_piece = service._encode_piece

    def spy(writer, piece, fmt):
        encoded_on.append(threading.current_thread().name)
        return encode_piece(writer, piece, fmt)

    monkeypatch.setattr(service, "_encode_piece", spy)
    pieces.threads.clear()
    answer = decode_call(vae, latents_of(pieces), MP4)
    kinds = ["progress" if m.HasField("progress") else "chunk" for m in answer]
    assert kinds == ["progress"] * 5 + ["chunk"]  # the container is whole only at the end
    assert [m.progress.frames_done for m in answer[:5]] == [2, 4, 6, 8, 9]
    assert len(encoded_on) == 5 and all(n.startswith("vae-encode") for n in encoded_on)
    assert pieces.threads and all(n.startswith("vae") for n in pieces.threads)
    assert not any(n.startswith("vae-encode") for n in pieces.threads)
    with av.open(io.BytesIO(answer[-1].data)) as container:
        assert len(list(container.decode(video=0))) == FRAMES


@pytest.mark.parametrize("fmt", [RAW, MP4], ids=["raw", "mp4"])
def test_a_decoder_failing_half_way_ends_in_an_error_not_a_short_video(vae, pieces, fmt):
    pieces.fail_after = 2  # after 4 frames
    params = vae_pb2.DecodeParams(
        height=HEIGHT, width=WIDTH, output_format=fmt, num_frames=FRAMES, fps=FPS
    )
    params.report_frames = True
    requests = codec.params_and_tensors_stream(
        vae_pb2.DecodeRequest, params, {"latents": latents_of(pieces)}
    )
    got = []
    with grpc.insecure_channel(vae.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            for msg in vae_pb2_grpc.VaeStub(channel).Decode(requests, timeout=120):
                got.append(msg)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "failed on video 0 after 4 of its 9 frames were decoded" in info.value.details()
    assert [m.progress.frames_done for m in got if m.HasField("progress")] == [2, 4]
    chunks = [m for m in got if not m.HasField("progress")]
    assert not any(c.last for c in chunks)
    assert len(chunks) == (2 if fmt == RAW else 0)  # RAW's first 4 frames went out


# ----------------------------------------------------------------------------- the mesh


@pytest.fixture(scope="module")
def mesh(folder, vae):
    from ditmesh.denoiser.service import serve as serve_denoiser
    from ditmesh.encoder.service import serve as serve_encoder
    from ditmesh.gateway.main import serve as serve_gateway

    encoder = serve_encoder(folder)
    denoiser = serve_denoiser(folder)
    gateway = serve_gateway(
        folder, encoder=[encoder.address], denoiser=[denoiser.address], vae=[vae.address]
    )
    yield gateway
    for server in (gateway, encoder, denoiser):
        server.stop(0)


def generate_events(mesh, **kw) -> list[gateway_pb2.GenerateEvent]:
    req = gateway_pb2.GenerateRequest(
        prompt=PROMPT, height=HEIGHT, width=WIDTH, num_frames=FRAMES, fps=FPS, steps=1, seed=3
    )
    for key, value in kw.items():
        setattr(req, key, value)
    with grpc.insecure_channel(mesh.address) as channel:
        return list(gateway_pb2_grpc.GatewayStub(channel).Generate(req, timeout=300))


@pytest.mark.slow
def test_frame_events_grow_to_num_frames_before_the_video(mesh, pieces):
    events = generate_events(mesh, output_format=RAW)
    kinds = [e.WhichOneof("event") for e in events]
    frames = [e.frames for e in events if e.HasField("frames")]
    assert [(f.stage, f.video_index, f.frames_total) for f in frames] == [("vae", 0, FRAMES)] * 5
    assert [f.frames_done for f in frames] == [2, 4, 6, 8, 9]
    last_frames = max(i for i, k in enumerate(kinds) if k == "frames")
    assert kinds.index("step") < kinds.index("frames")
    assert last_frames < kinds.index("decoded") < kinds.index("image")
    assert kinds[-1] == "finished"
    chunks = [e.image for e in events if e.HasField("image")]
    assert chunks[-1].last and b"".join(c.data for c in chunks)


@pytest.mark.slow
def test_raw_frames_streamed_equal_the_frames_decoded_whole(mesh, pieces):
    def raw(piece):
        pieces.piece = piece
        events = generate_events(mesh, output_format=RAW)
        done = [e.frames.frames_done for e in events if e.HasField("frames")]
        return b"".join(e.image.data for e in events if e.HasField("image")), done

    streamed, done_streamed = raw(2)
    whole, done_whole = raw(None)
    assert (done_streamed, done_whole) == ([2, 4, 6, 8, 9], [9])
    assert len(streamed) == FRAMES * HEIGHT * WIDTH * 3 and streamed == whole
    # The unary call leaves the frame progress out and answers the same video.
    pieces.piece = 2
    req = gateway_pb2.GenerateRequest(
        prompt=PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        fps=FPS,
        steps=1,
        seed=3,
        output_format=RAW,
    )
    with grpc.insecure_channel(mesh.address) as channel:
        answer = gateway_pb2_grpc.GatewayStub(channel).GenerateUnary(req, timeout=300)
    assert [(im.num_frames, im.data == streamed) for im in answer.images] == [(FRAMES, True)]


@pytest.mark.slow
def test_sdk_reports_frames_and_the_mp4_decodes_back(mesh, pieces, tmp_path):
    import av

    seen = []
    with Client(mesh.address, timeout=300) as client:
        result = client.generate(
            PROMPT,
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            fps=FPS,
            steps=1,
            seed=3,
            on_progress=seen.append,
        )
    frames = [p for p in seen if p.kind == "frames"]
    assert [(p.stage, p.frames_done, p.frames_total) for p in frames] == [
        ("vae", k, FRAMES) for k in (2, 4, 6, 8, 9)
    ]
    assert [p.kind for p in seen][-6:] == ["frames"] * 5 + ["decoded"]
    video = result.video
    assert (video.format, video.num_frames, video.fps) == ("mp4", FRAMES, FPS)
    with av.open(io.BytesIO(video.data)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        assert stream.average_rate == FPS
    assert len(decoded) == FRAMES
    assert (decoded[0].width, decoded[0].height) == (WIDTH, HEIGHT)


@pytest.mark.slow
def test_a_failure_half_way_reaches_the_client_as_an_error(mesh, pieces):
    pieces.fail_after = 1
    seen = []
    with Client(mesh.address, timeout=300, retries=0) as client:
        with pytest.raises(DitmeshClientError) as info:
            client.generate(
                PROMPT,
                height=HEIGHT,
                width=WIDTH,
                num_frames=FRAMES,
                steps=1,
                output_format="raw",
                on_progress=seen.append,
            )
    assert info.value.code == grpc.StatusCode.INTERNAL
    assert "after 2 of its 9 frames were decoded" in info.value.details
    assert [p.frames_done for p in seen if p.kind == "frames"] == [2]
    assert "decoded" not in [p.kind for p in seen]
