#!/bin/bash
# The mesh's own overhead on one GPU (docs/performance.md): gang_gpu.py's denoise + decode
# and mesh_overhead.py's whole request, in one call. Carry .whl (wheels incl. ditmesh's)
# and .peers; run from the repo root on the GPU machine:
#   PHASES="setup peer gang" bash bench/gpu_overhead.sh     # first call
#   PHASES="setup gang mesh" bash bench/gpu_overhead.sh     # second call (setup: only if gone)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site
L=${OUT:-/tmp/out}; mkdir -p $L
for ph in ${PHASES:-setup gang mesh}; do
  echo "== $ph $(date +%T)"
  case $ph in
    setup)
      [ -f /tmp/site/.done ] || { python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.done; } || exit 1
      nvidia-smi -L
      [ -f /tmp/flux-full/model_index.json ] || python3 .peers/make_flux.py /tmp/flux-full full 2>&1 | tail -1
      [ -f /tmp/flux-mesh/model_index.json ] || python3 bench/make_mesh_model.py /tmp/flux-full /tmp/flux-mesh 2>&1 | tail -2 ;;
    peer)
      timeout -k 10 200 python3 .peers/bench_diffusers.py /tmp/flux-full 1024 28 > $L/peer.log 2>&1
      grep RESULT $L/peer.log || tail -20 $L/peer.log ;;
    prof)
      timeout -k 10 300 python3 bench/encoder_profile.py --model /tmp/flux-mesh > $L/prof.log 2>&1
      grep -E "^RESULT" $L/prof.log || tail -30 $L/prof.log ;;
    gang)
      timeout -k 10 200 python3 bench/gang_gpu.py --model /tmp/flux-full --layouts single+compile+graphs \
        --height 1024 --steps 28 --out $L > $L/gang.log 2>&1
      grep -E "^RESULT" $L/gang.log || tail -20 $L/gang.log ;;
    mesh)
      timeout -k 10 330 python3 bench/mesh_overhead.py --model /tmp/flux-mesh --requests ${N:-4} \
        --denoiser-flags "--compile --cuda-graphs" --encoder-flags="${ENC:---compile}" --trace --out $L > $L/mesh.log 2>&1
      grep -E "^RESULT|^\|" $L/mesh.log || tail -40 $L/mesh.log
      pkill -9 -f ditmesh.cli 2>/dev/null ;;
  esac
done
echo "== done $(date +%T)"
