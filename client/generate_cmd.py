"""`ditmesh generate`: one request to a gateway from the command line.

Progress goes to stderr and the results (paths, seed, seconds; with `--verbose`, where the
time went, stage by stage) to stdout, so
`ditmesh generate ... | tail -1` and shell scripts see only the answer. Errors
are one `error: CODE: sentence` line and an exit status (2 for a bad request,
an unknown model included, 1 otherwise), never a traceback: the user can act on the sentence, not the stack.
The flags are `GenerateParams`' fields (same names, dashes for underscores;
`--format` for output_format), checked by `GenerateParams` like any SDK call, so
a flag's value is refused with the sentence the SDK and the gateway use.
With `--partial-images N` each preview is written as it arrives, next to the output
or in `--partial-dir`, named after the output (`out-partial-0.png`, ...), and its path
goes to stderr with the progress.
A video model writes a video: `-o clip.mp4 --num-frames 49 --fps 8` (the suffix picks
MP4, animated WebP, GIF or raw frames; without `-o`, a request with `--num-frames` or
`--fps` writes out.mp4).
`--tls` (the system's CAs) or `--tls-ca PEM` connect with TLS; `--tls-cert/--tls-key` add a
client certificate for a gateway that requires one (client/tls.py).
`--cache-threshold T` asks for step caching; `--verbose` then says how many steps skipped.
Needs only the client's dependencies: it runs in a client-only install.
A little over 350 lines: the parser's flags are most of it, one block each, kept together.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import grpc

from ditmesh.client.errors import DitmeshClientError, InvalidArgumentError, NotFoundError
from ditmesh.client.params import FIELD_NAMES, GenerateParams
from ditmesh.client.sdk import Client
from ditmesh.client.tls import add_channel_tls_flags, channel_tls_from_flags
from ditmesh.client.types import (
    FORMAT_BY_SUFFIX,
    GenerateResult,
    PartialImage,
    Progress,
    Timings,
)

DEFAULT_GATEWAY = "127.0.0.1:50051"
GATEWAY_ENV = "DITMESH_GATEWAY"
_FORMATS = ("png", "jpeg", "webp", "raw", "mp4", "gif")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds `generate` to an argparse subparsers object (ditmesh.cli owns the top level)."""
    parser = subparsers.add_parser(
        "generate",
        help="generate image(s) or video(s) from a prompt through a gateway",
        description="Send one prompt to a ditmesh gateway and write the image(s) or video(s).",
    )
    parser.add_argument("prompt", help="the text prompt")
    parser.add_argument(
        "--gateway",
        default=None,
        help=f"gateway address HOST:PORT (default: ${GATEWAY_ENV} or {DEFAULT_GATEWAY})",
    )
    # One flag per GenerateParams field; its dest is the field's name (see run()).
    parser.add_argument("--negative-prompt", default="", help="what the image should not show")
    parser.add_argument("--height", type=int, default=0, help="pixels (default: model's)")
    parser.add_argument("--width", type=int, default=0, help="pixels (default: model's)")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps (default: model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale")
    parser.add_argument(
        "--true-cfg-scale",
        type=float,
        default=None,
        help="classifier-free guidance over --negative-prompt (used when > 1)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed, 0 to 2**63-1 (default: random)"
    )
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument(
        "--format",
        dest="output_format",
        choices=_FORMATS,
        default=None,
        help="image format (png, jpeg, webp, raw) or video format (mp4, webp, gif, raw) "
        "(default: from the output's suffix, else the model's: png, or mp4 for a video)",
    )
    parser.add_argument(
        "--quality", type=int, default=0, help="JPEG/WebP quality 1-100 (0: default)"
    )
    parser.add_argument("--model", default="", help="model name (default: the mesh's default)")
    parser.add_argument(
        "--request-id",
        default=None,
        help="1-128 characters of [A-Za-z0-9._:-] for the logs (default: random)",
    )
    parser.add_argument(
        "--num-frames",
        type=int,
        default=0,
        metavar="N",
        help="video models: frames per video (default: the model's)",
    )
    parser.add_argument(
        "--fps",
        type=int,
        default=0,
        help="video models: frames per second of the video (default: the model's)",
    )
    parser.add_argument(
        "--cache-threshold",
        type=float,
        default=0.0,
        metavar="T",
        help="step caching, 0-1: skip a step's later transformer blocks when the first "
        "block's output changed by less than T since the last computed step; faster, "
        "approximate (default 0: off, exact)",
    )
    parser.add_argument(
        "--partial-images",
        type=int,
        default=0,
        metavar="N",
        help="previews (0-3) at evenly spaced steps, each written as it arrives "
        "(needs more steps than N)",
    )
    parser.add_argument(
        "--partial-dir",
        default=None,
        metavar="DIR",
        help="folder for the previews, made if missing (default: the output's folder); "
        "named after the output: out-partial-0.png, out-partial-1.png, ...",
    )
    parser.add_argument(
        "--timeout", type=_positive_float, default=600.0, help="seconds (default: 600)"
    )
    parser.add_argument(
        "--verbose",
        dest="show_timings",
        action="store_true",
        help="also print where the time went: queue, encode, transfer, denoise, decode, "
        "image encoding, per stage",
    )
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help="output path; several images get -0, -1, ... before the suffix; a video's "
        "suffix is .mp4, .webp, .gif or .raw (default: out.png, or out.mp4 with "
        "--num-frames or --fps)",
    )
    tls = parser.add_argument_group("TLS (default: plaintext)")
    tls.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's CAs"
    )
    add_channel_tls_flags(tls, "", "the gateway")
    return parser


class PartialWriteError(Exception):
    """A preview could not be written (raised through the SDK's call, which it cancels)."""


class PartialWriter:
    """Writes each preview as it arrives, named after the output: for `-o out.png`,
    DIR/out-partial-K.png (DIR/out-partial-K-I.png with several images)."""

    def __init__(self, output: Path, folder: Path | None, num_images: int) -> None:
        self._folder = output.parent if folder is None else folder
        self._stem, self._suffix = output.stem, output.suffix
        self._several = num_images > 1

    def __call__(self, part: PartialImage) -> Path:
        name = f"{self._stem}-partial-{part.index}"
        if self._several:
            name += f"-{part.image_index}"
        path = self._folder / f"{name}{self._suffix}"
        try:
            self._folder.mkdir(parents=True, exist_ok=True)
            return part.save(path)
        except OSError as exc:
            raise PartialWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc


class _ProgressReporter:
    """Draws a one-line bar from step events on a terminal, then "decoding frames k/F" from
    a video's frame events on a line of its own; other events become one line each.

    Off a terminal (a log file) the bar's carriage returns are noise, so the steps
    become one line and each frame event a line. Drawn by hand: the client-only install
    carries no progress library.
    Partial images go to `partials` (a `PartialWriter`), their paths to the stream.
    """

    _WIDTH = 30

    def __init__(self, stream: TextIO, partials: PartialWriter | None = None) -> None:
        self._stream = stream
        self._partials = partials
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._steps_seen = False
        self._bar_drawn = False
        self._bar_kind = ""

    def __call__(self, progress: Progress) -> None:
        if progress.kind == "step":
            if not self._steps_seen and not self._tty:
                self._line(f"denoising {progress.total} steps")
            self._steps_seen = True
            if self._tty:
                self._draw(progress.step, progress.total)
        elif progress.kind == "frames":
            text = f"decoding frames {progress.frames_done}/{progress.frames_total}"
            if progress.video_index:
                text += f" (video {progress.video_index + 1})"
            if self._tty:
                self._redraw("frames", text)
            else:
                self._line(text)
        elif progress.kind == "queued":
            self._line(f"queued at position {progress.position}")
        elif progress.kind == "encoded":
            self._line(f"prompt encoded in {progress.seconds:.2f} s")
        elif progress.kind == "decoded":
            self._line(f"decoded in {progress.seconds:.2f} s")
        elif progress.kind == "partial_image" and progress.partial_image is not None:
            if self._partials is None:
                return  # not asked for by this command: nothing to write
            path = self._partials(progress.partial_image)
            self._line(f"partial image at step {progress.step}/{progress.total}: {path}")

    def _draw(self, step: int, total: int) -> None:
        done = self._WIDTH * step // total if total > 0 else 0
        bar = "#" * done + "." * (self._WIDTH - done)
        self._redraw("steps", f"denoising [{bar}] {step}/{total or '?'} steps")

    def _redraw(self, kind: str, text: str) -> None:
        """Draws `text` over the bar line of the same kind; another kind starts a new line."""
        if self._bar_kind != kind:
            self.close()
        self._stream.write(f"\r{text}")
        self._stream.flush()
        self._bar_drawn = True
        self._bar_kind = kind

    def _line(self, text: str) -> None:
        self.close()
        print(text, file=self._stream, flush=True)

    def close(self) -> None:
        """Ends the bar's line, so what follows starts on a line of its own."""
        if self._bar_drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._bar_drawn = False
        self._bar_kind = ""


def _output_path(args: argparse.Namespace) -> str:
    """The -o path, else out.png, or out.mp4 when the flags ask for a video."""
    if args.output is not None:
        return args.output
    return "out.mp4" if args.num_frames or args.fps else "out.png"


def _output_format(args: argparse.Namespace) -> str | None:
    """--format, else the output's suffix, else None: the model's (png, or mp4 for video)."""
    if args.output_format:
        return args.output_format
    return FORMAT_BY_SUFFIX.get(Path(_output_path(args)).suffix.lower())


def params_of(args: argparse.Namespace) -> GenerateParams:
    """The request parameters the flags ask for; raises InvalidArgumentError if wrong."""
    fields = {name: getattr(args, name) for name in FIELD_NAMES}
    fields["output_format"] = _output_format(args)
    return GenerateParams(**fields)


def _fail(code: str, sentence: str) -> None:
    print(f"error: {code}: {sentence}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Executes `generate`; returns the process exit status."""
    gateway = args.gateway or os.environ.get(GATEWAY_ENV) or DEFAULT_GATEWAY
    output = _output_path(args)
    if args.partial_dir is not None and not args.partial_images:
        print("error: --partial-dir needs --partial-images N", file=sys.stderr)
        return 2
    partials = None
    if args.partial_images:
        folder = None if args.partial_dir is None else Path(args.partial_dir)
        partials = PartialWriter(Path(output), folder, args.num_images)
    reporter = _ProgressReporter(sys.stderr, partials)
    try:
        params = params_of(args)  # before connecting: a bad flag costs no round trip
        tls = channel_tls_from_flags(args, "", tls=args.tls)
        with Client(gateway, timeout=args.timeout, tls=tls) as client:
            result: GenerateResult = client.generate(args.prompt, params, on_progress=reporter)
    except DitmeshClientError as exc:  # InvalidArgumentError from the SDK's checks included
        reporter.close()
        _fail(exc.code.name, exc.details)
        return 2 if isinstance(exc, InvalidArgumentError | NotFoundError) else 1
    except ValueError as exc:  # a TLS flag's file (checked before connecting)
        reporter.close()
        _fail(grpc.StatusCode.INVALID_ARGUMENT.name, str(exc))
        return 2
    except KeyboardInterrupt:
        reporter.close()
        _fail(grpc.StatusCode.CANCELLED.name, "interrupted")
        return 130
    except PartialWriteError as exc:  # the SDK cancelled the request on its way out
        reporter.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    reporter.close()
    try:
        paths = result.save(output)
    except OSError as exc:
        print(f"error: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except (ValueError, ImportError) as exc:  # a conversion the suffix asks for, not done
        print(f"error: cannot write {output}: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    for video in result.videos:
        print(f"video: {video.num_frames} frames at {video.fps} fps, {video.format}")
    print(f"seed: {result.seed}")
    print(f"total_seconds: {result.timings.total:.3f}")
    if getattr(args, "show_timings", False):
        print_timings(result.timings, sys.stdout)
    return 0


_PART_NAMES = {"image_encode": "image encoding"}


def print_timings(timings: Timings, out: TextIO) -> None:
    """The request's seconds as parts that add up to the total, then each stage's split."""
    parts = timings.breakdown()
    print(
        "timings: " + ", ".join(f"{_PART_NAMES.get(k, k)} {v:.3f} s" for k, v in parts.items()),
        file=out,
    )
    if timings.speedups:
        print(f"speed-ups: {', '.join(timings.speedups)}", file=out)
    if timings.steps_total:
        print(
            f"step caching: {timings.cached_steps} of {timings.steps_total} steps skipped", file=out
        )
    if timings.attention_computed:
        print(
            f"fast attention: {timings.attention_computed:.1%} of full attention computed", file=out
        )
    for s in timings.stages:
        encoding = f" (image encoding {s.image_encode:.3f} s)" if s.image_encode else ""
        retried = f", {s.attempts} attempts" if s.attempts > 1 else ""
        print(
            f"  {s.stage:<9} queue {s.queue:.3f} s, work {s.work:.3f} s{encoding}, "
            f"transfer {s.transfer:.3f} s (on {s.replica or '?'}{retried})",
            file=out,
        )
