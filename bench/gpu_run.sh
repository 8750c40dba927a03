#!/bin/bash
# One GPU call: the denoiser gang (eager and CUDA-graphed), the VAE gang, and the peers,
# on the same machine. Expects .whl (wheels incl. ditmesh) and .peers (copy of
# ../shared/bench/peers) in the repo root. Logs and JSON under $OUT.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi -L; python3 -c 'import torch, diffusers; print(torch.__version__, diffusers.__version__, torch.cuda.device_count())'
M=/tmp/flux-random; H=${H:-1024}; S=${S:-28}
python3 .peers/make_flux.py $M full 2>&1 | tail -1
python3 bench/gang_gpu.py --model $M --layouts ${LAYOUTS:-single,single+compile,u2,u2+compile,r2+compile} \
  --height $H --steps $S --out $OUT 2>&1 | tee $OUT/ours.log | grep -E "RESULT|Error|error|\|"
timeout 200 python3 bench/vae_gpu.py --sizes ${VAE_SIZES:-1024,2048,4096} --ranks 1,2 --repeats 2 --out $OUT 2>&1 \
  | tee $OUT/vae.log | grep -E "RESULT|Error|error|\|"
run() { timeout 300 "$@" 2>&1 | tee -a $OUT/peers.log | grep -E "^RESULT|Error" | tail -2; }
run python3 .peers/bench_diffusers.py $M $H $S
X="--model $M --height $H --width $H --num_inference_steps $S"
run torchrun --nproc_per_node 2 .peers/bench_xfuser.py $X --ulysses_degree 2
