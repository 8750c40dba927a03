"""Peer: bench_xfuser.py with what xfuser 0.7.0's model runner applies for FLUX.1-dev under
--use_fp8_gemms and --cache_method, which its xFuserFluxPipeline path parses and ignores.

Why: bench_xfuser.py drives xFuserFluxPipeline.from_pretrained. On that path
- --use_fp8_gemms converts nothing: xfuser 0.7.0 quantises only in its model-runner path
  (xfuser/model_executor/models/runner_models), where FLUX.1-dev's `fp8_gemm_module_list`
  is `transformer.transformer_blocks` and `transformer.single_transformer_blocks`,
  converted by `xfuser.core.utils.runner_utils.quantize_linear_layers_to_fp8` (torchao's
  Float8DynamicActivationFloat8WeightConfig, per-tensor scales);
- --cache_method applies no cache: the pipeline applies one only from the `cache_args`
  its caller passes to from_pretrained (empty here), which the runner builds from the
  flags (`cache_method`, `num_steps` = the steps, `cache_config`; fbcache and teacache
  are xfuser's in-tree caches, their threshold its default unless --cache_config says).
The runner path needs a hub model name and real text encoders; this keeps the peer
script's random-weight folder and prompt embeddings and does those two things right after
the pipeline loads, before --use_torch_compile's first call traces the forward.

Usage (from the repository root, the shared peers in .peers/ or $PEERS_DIR): as
bench_xfuser.py (torchrun; --use_fp8_gemms needs the torchao wheel), e.g.
    torchrun --nproc_per_node 1 bench/peer_xfuser_runner.py --model DIR --height 1024 \
        --width 1024 --num_inference_steps 28 --ulysses_degree 1 --use_torch_compile \
        --use_fp8_gemms --cache_method fbcache
"""

import argparse
import os
import runpy
import sys

from xfuser import xFuserFluxPipeline

flags = argparse.ArgumentParser(add_help=False)
flags.add_argument("--use_fp8_gemms", action="store_true")
flags.add_argument("--cache_method", default=None)
flags.add_argument("--cache_config", default=None)
flags.add_argument("--num_inference_steps", type=int, default=28)
flags = flags.parse_known_args()[0]
_load = xFuserFluxPipeline.from_pretrained


def _from_pretrained(*args, **kwargs):
    if flags.cache_method:
        kwargs["cache_args"] = dict(
            cache_method=flags.cache_method,
            num_steps=flags.num_inference_steps,
            cache_config=flags.cache_config,
        )
    pipe = _load(*args, **kwargs)
    t = pipe.transformer
    if flags.cache_method:
        kinds = {type(b).__name__ for b in t.transformer_blocks}
        if not any("Cached" in k for k in kinds):
            raise SystemExit(f"--cache_method {flags.cache_method}: no cache installed ({kinds})")
        print(
            f"step cache: {flags.cache_method} installed ({', '.join(sorted(kinds))})", flush=True
        )
    if flags.use_fp8_gemms:
        from xfuser.core.utils.runner_utils import quantize_linear_layers_to_fp8

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        # With a cache installed its wrapper holds both block lists: converted all the same.
        quantize_linear_layers_to_fp8(
            [t.transformer_blocks, t.single_transformer_blocks], device=device
        )
        n = sum(
            type(m.weight).__name__ != "Parameter"
            for m in t.modules()
            if type(m).__name__ == "Linear"
        )
        if n == 0:
            raise SystemExit("--use_fp8_gemms: no Linear of the blocks was converted")
        print(f"fp8: {n} Linear weights converted by xfuser's torchao helper", flush=True)
    return pipe


xFuserFluxPipeline.from_pretrained = _from_pretrained
# The shared peer script, copied into .peers/ (bench/README.md, "Running a session").
sys.argv[0] = os.path.join(os.environ.get("PEERS_DIR", ".peers"), "bench_xfuser.py")
runpy.run_path(sys.argv[0], run_name="__main__")
