"""`ditmesh generate`: one request to a gateway from the command line.

Progress goes to stderr and the results (paths, seed, seconds) to stdout, so
`ditmesh generate ... | tail -1` and shell scripts see only the answer. Errors
are one `error: CODE: sentence` line and an exit status (2 for a bad request,
1 otherwise), never a traceback: the user can act on the sentence, not the stack.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import grpc
from tqdm import tqdm

from ditmesh.client.sdk import Client, DitmeshClientError, GenerateResult, Progress

DEFAULT_GATEWAY = "127.0.0.1:50051"
GATEWAY_ENV = "DITMESH_GATEWAY"
_FORMATS = ("png", "jpeg", "webp", "raw")
_FORMAT_BY_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".raw": "raw"}


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _quality(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100, got {value}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds `generate` to an argparse subparsers object (cli.py owns the top level)."""
    parser = subparsers.add_parser(
        "generate",
        help="generate image(s) from a prompt through a gateway",
        description="Send one prompt to a ditmesh gateway and write the image(s).",
    )
    parser.add_argument("prompt", help="the text prompt")
    parser.add_argument(
        "--gateway",
        default=None,
        help=f"gateway address HOST:PORT (default: ${GATEWAY_ENV} or {DEFAULT_GATEWAY})",
    )
    parser.add_argument("--negative-prompt", default="", help="what the image should not show")
    parser.add_argument(
        "--height", type=_non_negative_int, default=0, help="pixels (default: model's)"
    )
    parser.add_argument(
        "--width", type=_non_negative_int, default=0, help="pixels (default: model's)"
    )
    parser.add_argument(
        "--steps", type=_non_negative_int, default=0, help="denoising steps (default: model's)"
    )
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale")
    parser.add_argument(
        "--true-cfg-scale",
        type=float,
        default=None,
        help="classifier-free guidance over --negative-prompt (used when > 1)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random)")
    parser.add_argument("--num-images", type=_positive_int, default=1)
    parser.add_argument(
        "--format",
        choices=_FORMATS,
        default=None,
        help="image format (default: from the output's suffix, else png)",
    )
    parser.add_argument(
        "--quality", type=_quality, default=0, help="JPEG/WebP quality 1-100 (0: default)"
    )
    parser.add_argument("--model", default="", help="model name (default: the mesh's default)")
    parser.add_argument(
        "--timeout", type=_positive_float, default=600.0, help="seconds (default: 600)"
    )
    parser.add_argument(
        "-o",
        "--output",
        default="out.png",
        help="output path; several images get -0, -1, ... before the suffix (default: out.png)",
    )
    return parser


class _ProgressReporter:
    """Feeds a tqdm bar from step events; other events become one line each.

    The bar is drawn only on a terminal: in a log file its carriage returns are noise.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._bar: tqdm | None = None

    def __call__(self, progress: Progress) -> None:
        if progress.kind == "step":
            if self._bar is None:
                self._bar = tqdm(
                    total=progress.total or None,
                    file=self._stream,
                    unit="step",
                    desc="denoising",
                    disable=not self._tty,
                )
                if not self._tty:
                    self._line(f"denoising {progress.total} steps")
            self._bar.update(max(0, progress.step - self._bar.n))
        elif progress.kind == "queued":
            self._line(f"queued at position {progress.position}")
        elif progress.kind == "encoded":
            self._line(f"prompt encoded in {progress.seconds:.2f} s")
        elif progress.kind == "decoded":
            self._line(f"decoded in {progress.seconds:.2f} s")

    def _line(self, text: str) -> None:
        tqdm.write(text, file=self._stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _output_format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    return _FORMAT_BY_SUFFIX.get(Path(args.output).suffix.lower(), "png")


def _fail(code: str, sentence: str) -> None:
    print(f"error: {code}: {sentence}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Executes `generate`; returns the process exit status."""
    gateway = args.gateway or os.environ.get(GATEWAY_ENV) or DEFAULT_GATEWAY
    reporter = _ProgressReporter(sys.stderr)
    try:
        with Client(gateway, timeout=args.timeout) as client:
            result: GenerateResult = client.generate(
                args.prompt,
                negative_prompt=args.negative_prompt,
                height=args.height,
                width=args.width,
                steps=args.steps,
                guidance=args.guidance,
                true_cfg_scale=args.true_cfg_scale,
                seed=args.seed,
                num_images=args.num_images,
                output_format=_output_format(args),
                quality=args.quality,
                model=args.model,
                on_progress=reporter,
            )
    except DitmeshClientError as exc:
        reporter.close()
        _fail(exc.code.name, exc.details)
        return 2 if exc.code == grpc.StatusCode.INVALID_ARGUMENT else 1
    except ValueError as exc:  # the SDK's own argument checks (e.g. a seed over 64 bits)
        reporter.close()
        _fail(grpc.StatusCode.INVALID_ARGUMENT.name, str(exc))
        return 2
    except KeyboardInterrupt:
        reporter.close()
        _fail(grpc.StatusCode.CANCELLED.name, "interrupted")
        return 130
    reporter.close()
    try:
        paths = result.save(args.output)
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    print(f"seed: {result.seed}")
    print(f"total_seconds: {result.timings.total:.3f}")
    return 0
