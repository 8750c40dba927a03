"""Peer: xDiT (xfuser 0.7.0) FluxPipeline as ../shared/bench/peers/bench_xfuser.py runs it
(same random-weight folder, prompt embeddings, warm-up and timing), with two things that
script leaves to xfuser's defaults made explicit and reported in its RESULT line:

- `--pipeline_dtype` (default bf16): `engine_config.runtime_config.dtype`, which xfuser's
  PipeFusion patch buffers and skip buffers take (xfuser's default is float16, while the
  model runs in bf16). The RESULT says which dtype the buffers had.
- `--use_fp8_comms` (xfuser's flag): on the FluxPipeline path nothing calibrates the
  per-layer FP8 scales (xfuser's model runner does that), so this does it the runner's
  way (`setup_fp8_comms`, one throwaway 3-step request) and counts the quantised
  all-to-alls of the last timed request (`fp8_all_to_alls`). xfuser 0.7.0 quantises only
  with a pre-quantising attention backend (AITER FP8, ROCm) and not for joint attention
  (Flux): on an NVIDIA GPU expect 0, i.e. the row is plain Ulysses, and it says so.

Usage (torchrun, from the repo root with .peers/ copied from ../shared/bench/peers):
    torchrun --nproc_per_node 4 bench/peer_xfuser.py --model DIR --height 1024 \
        --width 1024 --num_inference_steps 28 --pipefusion_parallel_degree 4
    torchrun --nproc_per_node 4 bench/peer_xfuser.py ... --ulysses_degree 4 \
        --use_torch_compile --use_fp8_comms
"""

import argparse
import json
import time

import torch
from xfuser import xFuserArgs, xFuserFluxPipeline
from xfuser.config import FlexibleArgumentParser
from xfuser.core.distributed import get_runtime_state, get_world_group

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

ours = argparse.ArgumentParser(add_help=False)
ours.add_argument("--pipeline_dtype", choices=sorted(DTYPES), default="bf16")
mine, rest = ours.parse_known_args()
parser = xFuserArgs.add_cli_args(FlexibleArgumentParser(description="peer bench"))
args = parser.parse_args(rest)
engine_config, input_config = xFuserArgs.from_cli_args(args).create_config()
engine_config.runtime_config.dtype = DTYPES[mine.pipeline_dtype]
rank = get_world_group().local_rank
device = f"cuda:{rank}"
pipe = xFuserFluxPipeline.from_pretrained(
    engine_config.model_config.model,
    engine_config=engine_config,
    torch_dtype=torch.bfloat16,
    text_encoder=None,
    tokenizer=None,
    text_encoder_2=None,
    tokenizer_2=None,
).to(device)
cfg = pipe.transformer.config
g = torch.Generator(device="cpu").manual_seed(0)
pe = torch.randn(1, 512, cfg.joint_attention_dim, generator=g).to(device, torch.bfloat16)
pp = torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, torch.bfloat16)


def call(steps: int) -> None:
    pipe(
        prompt_embeds=pe,
        pooled_prompt_embeds=pp,
        height=input_config.height,
        width=input_config.width,
        num_inference_steps=steps,
        guidance_scale=3.5,
        output_type="pil",
        max_sequence_length=512,
        generator=torch.Generator(device="cpu").manual_seed(1),
    )


def run(steps: int) -> float:
    torch.cuda.synchronize()
    torch.distributed.barrier()
    t = time.perf_counter()
    call(steps)
    torch.cuda.synchronize()
    torch.distributed.barrier()
    return time.perf_counter() - t


fp8_calls = [0]
fp8 = get_runtime_state().fp8_comms
if fp8 is not None:
    import xfuser.model_executor.layers.usp as xusp
    from xfuser.core.distributed.attention_backend import SUPPORTS_PRE_QUANTIZATION_BACKENDS

    backend = get_runtime_state().attention_backend
    if backend not in SUPPORTS_PRE_QUANTIZATION_BACKENDS:
        # Its calibration would raise after a throwaway request: say why at once.
        names = ", ".join(b.name for b in SUPPORTS_PRE_QUANTIZATION_BACKENDS)
        raise SystemExit(
            f"--use_fp8_comms: xfuser 0.7.0 quantises the Ulysses all-to-all only under a "
            f"pre-quantising attention backend ({names}); this run's is {backend.name}, so "
            "it would time plain Ulysses (and its USP refuses FP8 for joint attention, Flux's)"
        )
    from xfuser.core.distributed.fp8_comms import setup_fp8_comms

    quantised = xusp.fp8_comms_input_all_to_all

    def counted(*a, **k):
        fp8_calls[0] += 1
        return quantised(*a, **k)

    xusp.fp8_comms_input_all_to_all = counted  # usp.py calls it by this module-level name
    setup_fp8_comms(fp8, pipe, {}, run_pipe_fn=lambda _args: call(3))

buffers = get_runtime_state().runtime_config.dtype
run(3)
times = []
for _ in range(2):
    fp8_calls[0] = 0
    times.append(run(input_config.num_inference_steps))
pc = engine_config.parallel_config
if get_world_group().rank == 0:
    row = dict(
        system="xfuser-0.7.0",
        gpus=get_world_group().world_size,
        H=input_config.height,
        steps=input_config.num_inference_steps,
        sec=min(times),
        **{k: v for k, v in vars(pc).items() if k.endswith("degree") and isinstance(v, int)},
        pipeline_dtype=str(buffers).removeprefix("torch."),
        compiled=bool(engine_config.runtime_config.use_torch_compile),
        peak_gib=torch.cuda.max_memory_allocated() / 2**30,
    )
    if fp8 is not None:
        row["fp8_all_to_alls"] = fp8_calls[0]
        row["attention_backend"] = str(get_runtime_state().attention_backend)
    print("RESULT", json.dumps(row), flush=True)
torch.distributed.destroy_process_group()
