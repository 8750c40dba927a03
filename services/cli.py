"""The `ditmesh` command: the operator commands (make-tiny, serve, up) and the SDK's generate.

Works in a client-only install (`pip install ditmesh`, no torch): building the
parser and `generate` import only the client SDK; every server piece is imported
inside the subcommand that needs it, and those subcommands first check that the
`server` extra is installed, saying so in one line when it is not.

About 560 lines on purpose: every flag of `serve` and `up` (gang, TLS, metrics, video
families in make-tiny) and of fastattn-calibrate is declared here, where an operator
reads them in one place (the gateway's own live in gateway/flags.py); splitting `up`'s
flags out is the next step if it grows again.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys

# What make-tiny, serve and up need beyond the client's install: the `server` extra.
SERVER_MODULES = ("torch", "diffusers", "transformers")
SERVER_COMMANDS = ("make-tiny", "serve", "up", "fastattn-calibrate")
# `ditmesh.tiny.FAMILIES`, spelled out because the parser must build without torch (which
# ditmesh.tiny imports); tests/test_tiny.py keeps the two equal.
TINY_FAMILIES = (
    "flux",
    "sd3",
    "pixart-sigma",
    "pixart-alpha",
    "hunyuandit",
    "cogvideox",
    "cogvideox-2b",
    "latte",
    "mochi",
)


def missing_server_modules() -> list[str]:
    """The server extra's modules this Python cannot import (found, not imported: fast)."""
    return [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        action="append",
        help="diffusers-format folder or hub id (the gateway takes several: repeat it; "
        "the first is the default)",
    )
    p.add_argument(
        "--name",
        action="append",
        default=[],
        help="name clients use for the model (default: folder name); with several --model, "
        "one --name per model in the same order",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16",
    )
    p.add_argument(
        "--warmup",
        choices=["auto", "on", "off"],
        default="auto",
        help="encoder and vae: do one request's work before serving, so the first request "
        "is as fast as the next (auto: on a GPU only)",
    )


def _add_gang_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("denoiser gang (dp x cfg x pipefusion x ulysses x ring processes)")
    g.add_argument("--dp", type=int, default=1, help="data parallel: split the images of a request")
    g.add_argument(
        "--cfg", type=int, default=1, help="2 runs the CFG branches on two halves of the gang"
    )
    g.add_argument(
        "--pipefusion",
        type=int,
        default=1,
        help="PipeFusion stages: the blocks split into stages, the image into patches that "
        "reuse the other patches' keys and values of the step before (Flux, SD3; eager)",
    )
    g.add_argument(
        "--patches", type=int, default=0, help="PipeFusion patches per step (0: one per stage)"
    )
    g.add_argument(
        "--pipefusion-warmup",
        type=int,
        default=1,
        help="PipeFusion: first steps run on the whole image, exact, before patches start "
        "(0: patches from the first, each attending to the patches before it and itself)",
    )
    g.add_argument("--ulysses", type=int, default=1, help="Ulysses sequence parallel degree")
    g.add_argument("--ring", type=int, default=1, help="Ring sequence parallel degree")
    g.add_argument(
        "--ulysses-chunks",
        type=int,
        default=1,
        metavar="C",
        help="Ulysses alone: exchange q and the attention output in C chunks of each rank's "
        "heads, each under another chunk's attention (C divides heads / ulysses)",
    )
    g.add_argument(
        "--ulysses-fp8",
        action="store_true",
        help="Ulysses alone: q, k, v and the attention output cross the all-to-all in FP8 "
        "e4m3 with a scale per token and head (GPU; changes the output a little)",
    )
    g.add_argument(
        "--collective-timeout",
        type=float,
        default=120.0,
        help="seconds a gang collective may wait before the gang is declared broken",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer blocks (the first request of each size compiles); "
        "on the encoder stage (and `up`), also its text encoders, compiled at start",
    )
    g.add_argument(
        "--compile-mode",
        choices=["default", "max-autotune-no-cudagraphs"],
        default="default",
        help="torch.compile mode for --compile (max-autotune-no-cudagraphs: slower start, "
        "Triton GEMMs with fused epilogues where they beat cuBLAS)",
    )
    g.add_argument(
        "--comm-overlap",
        choices=["off", "reorder", "schedule"],
        default="off",
        help="with --compile: let inductor reorder the Ulysses exchange's collectives to "
        "overlap compute (reorder: its reordering passes; schedule: its overlap scheduler). "
        "On 2x H200 schedule saved 1.5%%, reorder nothing; off by default",
    )
    g.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay the transformer forward (collectives included) from CUDA graphs (GPU)",
    )
    g.add_argument(
        "--attention",
        choices=["auto", "cudnn", "flash", "efficient", "math"],
        default="auto",
        help="attention kernel PyTorch tries first on a GPU (auto: its own order)",
    )
    g.add_argument(
        "--fuse-qkv",
        action="store_true",
        help="one projection GEMM for q, k and v (weights shared, no extra memory)",
    )
    g.add_argument(
        "--fp8",
        action="store_true",
        help="the transformer blocks' linear layers in FP8 e4m3 with per-row scales "
        "(an FP8 GPU: Ada sm_89 / Hopper or later; changes the output a little)",
    )
    g.add_argument(
        "--fast-attn",
        default="",
        metavar="PLAN",
        help="DiTFastAttn (Flux; one process or --dp): follow this calibrated plan (a file, or "
        "a model folder holding ditmesh_fastattn.json; see fastattn-calibrate); requests must "
        "use its step count; changes the output a little",
    )
    g.add_argument(
        "--warmup-sizes",
        type=_sizes,
        default=(),
        metavar="HxW,...",
        help="with --compile/--cuda-graphs: sizes to compile and capture at start besides "
        "the model's default, e.g. 1024x1024,768x1344",
    )


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    sizes = []
    for part in filter(None, text.split(",")):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not HEIGHTxWIDTH (e.g. 1024x768)"
            ) from None
        sizes.append((h, w))
    return tuple(sizes)


def _speedups(args: argparse.Namespace):
    from ditmesh.denoiser.speed import Speedups

    return Speedups(
        compile=args.compile,
        compile_mode=args.compile_mode,
        cuda_graphs=args.cuda_graphs,
        attention=args.attention,
        fuse_qkv=args.fuse_qkv,
        fp8=args.fp8,
        comm_overlap=args.comm_overlap,
        warmup_sizes=args.warmup_sizes,
        fast_attn=args.fast_attn,
    )


def _add_vae_gang_args(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument(
        flag,
        type=int,
        default=1,
        metavar="M",
        help="VAE gang: M processes split each decode by height (distvae; one per GPU)",
    )


def _parallel_config(args: argparse.Namespace):
    from ditmesh.denoiser.parallel.mesh import ParallelConfig

    return ParallelConfig(
        dp=args.dp,
        cfg=args.cfg,
        pipefusion=args.pipefusion,
        ulysses=args.ulysses,
        ring=args.ring,
        patches=args.patches,
        pipefusion_warmup=args.pipefusion_warmup,
        ulysses_chunks=args.ulysses_chunks,
        ulysses_fp8=args.ulysses_fp8,
    )


def _check_ulysses_fp8(args: argparse.Namespace) -> None:
    """--ulysses-fp8 on CPU is refused before any process starts (ParallelConfigError)."""
    if args.ulysses_fp8:
        from ditmesh.common.models import pick_device
        from ditmesh.denoiser.parallel.ulysses import check_fp8_exchange

        check_fp8_exchange(pick_device(args.device))


def build_parser() -> argparse.ArgumentParser:
    from ditmesh import __version__
    from ditmesh.client import generate_cmd
    from ditmesh.common.tls import add_serve_tls_flags
    from ditmesh.gateway.flags import (
        add_autoscale_flags,
        add_discovery_flags,
        add_drain_flag,
        add_gateway_flags,
    )

    parser = argparse.ArgumentParser(
        prog="ditmesh", description="Serve Diffusion Transformers as a gRPC mesh."
    )
    parser.add_argument("--version", action="version", version=f"ditmesh {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a small random-weight model folder (no download)")
    p.add_argument(
        "family",
        help=f"model family: {', '.join(TINY_FAMILIES[:-1])} or {TINY_FAMILIES[-1]} "
        "(cogvideox is the 5B layout, cogvideox-2b the 2B one)",
    )
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("serve", help="run one stage's gRPC server")
    p.add_argument("stage", choices=["encoder", "denoiser", "vae", "gateway"])
    _add_model_args(p)
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: no metrics)",
    )
    p.add_argument(
        "--encoder", action="append", default=[], help="gateway: encoder address (repeatable)"
    )
    p.add_argument(
        "--denoiser", action="append", default=[], help="gateway: denoiser address (repeatable)"
    )
    p.add_argument("--vae", action="append", default=[], help="gateway: vae address (repeatable)")
    _add_gang_args(p)
    _add_vae_gang_args(p, "--parallel")
    add_gateway_flags(p)
    add_discovery_flags(p)
    add_autoscale_flags(p, kubernetes=True)
    add_drain_flag(p)
    add_serve_tls_flags(p)

    p = sub.add_parser("up", help="run the whole mesh locally")
    _add_model_args(p)
    p.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="BASE",
        help="serve each process's Prometheus metrics at http://HOST:PORT/metrics: gateway "
        "BASE, encoder BASE+1, denoiser BASE+2, vae BASE+3 (further denoiser replicas BASE+4, "
        "...); stage processes started by --autoscale on get none (0: no metrics)",
    )
    _add_gang_args(p)
    _add_vae_gang_args(p, "--vae-parallel")
    add_gateway_flags(p)
    add_autoscale_flags(p, kubernetes=False)
    add_drain_flag(p)

    p = sub.add_parser(
        "fastattn-calibrate", help="calibrate a DiTFastAttn plan for a Flux model (--fast-attn)"
    )
    p.add_argument("model", help="diffusers-format Flux folder")
    p.add_argument("--prompts", type=int, default=4, help="how many calibration prompts")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--threshold", type=float, required=True, help="relative L1 per layer")
    p.add_argument("--window", type=float, default=0.125, help="band, share of image tokens")
    p.add_argument("--steps", type=int, default=0, help="0: the model's default")
    p.add_argument("--size", type=_sizes, default=(), metavar="HxW", help="default: the model's")
    p.add_argument("--true-cfg", type=float, default=1.0, help="> 1: calibrate with CFG")
    p.add_argument("--out", default=None, help="default: MODEL/ditmesh_fastattn.json")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")

    generate_cmd.add_parser(sub)
    return parser


def _one_model(args: argparse.Namespace, what: str) -> int | None:
    """Stages and `up` serve one model: 2 (after a sentence) when given more."""
    if len(args.model) > 1 or len(args.name) > 1:
        print(
            f"error: {what} serves one model (got {len(args.model)} --model, "
            f"{len(args.name)} --name); only the gateway takes several",
            file=sys.stderr,
        )
        return 2
    args.model = args.model[0]
    args.name = args.name[0] if args.name else None
    return None


def _serve(args: argparse.Namespace) -> int:
    from ditmesh.common.errors import DitmeshError
    from ditmesh.denoiser.parallel.mesh import ParallelConfigError

    if args.drain_seconds < 0:
        print(f"error: --drain-seconds must be >= 0; got {args.drain_seconds}", file=sys.stderr)
        return 2
    if not 0 <= args.metrics_port <= 65535:
        print(f"error: --metrics-port must be 0..65535; got {args.metrics_port}", file=sys.stderr)
        return 2
    if args.stage != "gateway":
        if (err := _one_model(args, f"the {args.stage} stage")) is not None:
            return err
    if args.parallel != 1 and args.stage != "vae":
        print("error: --parallel applies to the vae stage only", file=sys.stderr)
        return 2
    from ditmesh.common.tls import serve_tls_from_flags

    try:  # before anything loads: a wrong certificate path costs no model load
        tls, stage_tls = serve_tls_from_flags(args, args.stage)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.stage == "gateway":
            from ditmesh.gateway.flags import settings_from_flags
            from ditmesh.gateway.main import serve

            try:
                settings = settings_from_flags(args)
                settings.tls, settings.stage_tls = tls, stage_tls
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            missing = [
                s
                for s in ("encoder", "denoiser", "vae")
                if not getattr(args, s)
                and not getattr(args, f"{s}_service")
                and settings.autoscale.stages[s].local_args is None
            ]
            if missing:
                need = ", ".join(f"--{s} or --{s}-service" for s in missing)
                print(f"error: the gateway needs {need}", file=sys.stderr)
                return 2
            running = serve(
                args.model,
                encoder=args.encoder,
                denoiser=args.denoiser,
                vae=args.vae,
                settings=settings,
                name=args.name or None,
                host=args.host,
                port=args.port,
                metrics_port=args.metrics_port,
            )
        else:
            if args.stage == "encoder":
                from ditmesh.encoder.service import serve
            elif args.stage == "denoiser":
                from ditmesh.denoiser.service import serve
            else:
                from ditmesh.vae.service import serve
            from ditmesh.common.server import StageOptions

            options = StageOptions(
                name=args.name,
                host=args.host,
                port=args.port,
                device=args.device,
                dtype=args.dtype,
                drain_seconds=args.drain_seconds,
                metrics_port=args.metrics_port,
                warmup=args.warmup,
                tls=tls,
            )
            gang: dict = {}
            if args.stage == "denoiser":
                if args.fp8:  # refused before any weight loads or process starts
                    from ditmesh.denoiser.fp8 import check as check_fp8

                    check_fp8(args.device, args.dtype)
                gang = dict(
                    parallel=_parallel_config(args),
                    collective_timeout_s=args.collective_timeout,
                    speed=_speedups(args),
                )
                _check_ulysses_fp8(args)
            elif args.stage == "vae":
                gang = dict(parallel=args.parallel, collective_timeout_s=args.collective_timeout)
            elif args.stage == "encoder":
                gang = dict(compile=args.compile)
            running = serve(args.model, options, **gang)
            if running is None:  # a torchrun worker rank: it followed the leader until the end
                return 0
    except (DitmeshError, ParallelConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.stage} listening on {running.address}", flush=True)
    return running.serve_until_signal()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command in SERVER_COMMANDS and (missing := missing_server_modules()):
        print(
            f"error: `ditmesh {args.command}` needs the server packages "
            f"({', '.join(missing)} not installed): pip install 'ditmesh[server]'",
            file=sys.stderr,
        )
        return 2
    if args.command == "make-tiny":
        from ditmesh.tiny import make_tiny

        try:
            path = make_tiny(args.family, args.dir, seed=args.seed)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.family} model to {path}")
        return 0
    if args.command == "serve":
        return _serve(args)
    if args.command == "fastattn-calibrate":
        from ditmesh.denoiser.fastattn_calibrate import run_cli

        return run_cli(args)
    if args.command == "up":
        if (err := _one_model(args, "`ditmesh up`")) is not None:
            return err
        from ditmesh.common.errors import InvalidArgument
        from ditmesh.denoiser.parallel.mesh import ParallelConfigError
        from ditmesh.gateway.flags import flags_to_args
        from ditmesh.local import UpConfig, run_up
        from ditmesh.vae.gang import check_parallel

        if not 0 <= args.metrics_port <= 65532:  # its own and the three stages' ports
            print(
                f"error: --metrics-port must be 0..65532; got {args.metrics_port}", file=sys.stderr
            )
            return 2
        try:
            parallel = _parallel_config(args)
            check_parallel(args.vae_parallel, "--vae-parallel")
            if args.fp8:
                from ditmesh.denoiser.fp8 import check as check_fp8

                check_fp8(args.device, args.dtype)
            _check_ulysses_fp8(args)
            if args.fast_attn:
                from ditmesh.denoiser.fastattn import check_serving

                check_serving(_speedups(args), parallel)
        except (ParallelConfigError, InvalidArgument) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        gang = [
            f"--{d}={getattr(parallel, d)}" for d in ("dp", "cfg", "pipefusion", "ulysses", "ring")
        ] + [f"--patches={parallel.patches}", f"--pipefusion-warmup={parallel.pipefusion_warmup}"]
        gang += [f"--ulysses-chunks={parallel.ulysses_chunks}"]
        gang += ["--ulysses-fp8"] if parallel.ulysses_fp8 else []
        return run_up(
            UpConfig(
                model=args.model,
                host=args.host,
                port=args.port,
                name=args.name,
                device=args.device,
                dtype=args.dtype,
                warmup=args.warmup,
                denoiser_args=[
                    *gang,
                    f"--collective-timeout={args.collective_timeout}",
                    *(["--cuda-graphs"] if args.cuda_graphs else []),
                    *(["--compile"] if args.compile else []),
                    f"--compile-mode={args.compile_mode}",
                    f"--comm-overlap={args.comm_overlap}",
                    *(["--fuse-qkv"] if args.fuse_qkv else []),
                    *(["--fp8"] if args.fp8 else []),
                    *([f"--fast-attn={args.fast_attn}"] if args.fast_attn else []),
                    f"--attention={args.attention}",
                    *(
                        ["--warmup-sizes=" + ",".join(f"{h}x{w}" for h, w in args.warmup_sizes)]
                        if args.warmup_sizes
                        else []
                    ),
                ],
                encoder_args=["--compile"] if args.compile else [],
                vae_args=[
                    f"--parallel={args.vae_parallel}",
                    f"--collective-timeout={args.collective_timeout}",
                ],
                gateway_args=flags_to_args(args),
                drain_seconds=args.drain_seconds,
                autoscale_local=args.autoscale == "on",
                metrics_port=args.metrics_port,
            )
        )
    if args.command == "generate":
        from ditmesh.client import generate_cmd

        return generate_cmd.run(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
