#!/bin/bash
# One GPU call that times ditmesh's denoiser and the peers on the same machine.
# Expects .whl (wheels incl. a `pip wheel .` of ditmesh) and .peers (a copy of
# ../shared/bench/peers) in the repo root; run it from there on the GPU machine:
#
#   SIZES="1024 2048" LAYOUTS="single single+compile+graphs u2+compile+graphs" \
#   PEERS="diffusers xfuser-u2 xfuser-u2-compile" bash bench/gpu_session.sh
#
# LAYOUTS: bench/gang_gpu.py layouts, each run in its own process under LIMIT seconds
#   (`single` first: it is the reference the others are compared with).
# PEERS: diffusers (1 GPU), diffusers-cp-uN, xfuser-pfN (PipeFusion) on N GPUs, and
#   xfuser-uN with any of -compile (--use_torch_compile), -fp8 (--use_fp8_gemms),
#   -fbcache / -teacache (--cache_method), -runner; e.g. xfuser-u1-compile-fbcache-runner.
#   xfuser's FluxPipeline path ignores --use_fp8_gemms and --cache_method; -runner runs
#   bench/peer_xfuser_runner.py, which applies them as xfuser's model runner does
#   (FP8 through torchao: the torchao wheel in .whl/extras, on their path only).
# REPEATS: timed requests per layout (default 2); GANG_ARGS: more bench/gang_gpu.py flags.
# VAE_RANKS / VAE_SIZES: also time the VAE decode gang (bench/vae_gpu.py).
# FLUX=tiny uses a small random Flux (a smoke test of the GPU paths, not a benchmark).
# PROBE=1 first checks that NCCL collectives replay from a CUDA graph; PROFILE=1 adds a
# torch.profiler table per layout. Logs go to one tarball under $OUT (at most 8 files
# come back from a call); ours.jsonl, peers.jsonl and table.md beside it.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  # torchao and cache-dit: on the path of the xfuser -runner peers only (diffusers imports
  # torchao whenever it is installed).
  if ls .whl/extras/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site-extras .whl/extras/*.whl || exit 1
  fi
fi
export PYTHONPATH=/tmp/site
nvidia-smi -L
python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "gpus", torch.cuda.device_count(), "nccl", torch.cuda.nccl.version())'
FLUX=${FLUX:-full}; M=/tmp/flux-$FLUX; S=${S:-28}; LIMIT=${LIMIT:-240}
L_DIR=${L_DIR:-/tmp/logs}; mkdir -p $L_DIR
pack() { cp $L_DIR/*.jsonl $OUT/ 2>/dev/null; tar czf $OUT/logs.tgz -C $L_DIR --exclude='*.pt' . ; }
cleanup() { pkill -9 -f multiprocessing.spawn 2>/dev/null; pkill -9 -f torchrun 2>/dev/null; sleep 2; }
[ -d $M ] || python3 .peers/make_flux.py $M $FLUX 2>&1 | tail -1

if [ "${PROBE:-0}" = 1 ]; then
  for extra in "" --async-op; do
    timeout -k 5 60 torchrun --nproc_per_node 2 bench/nccl_graph_probe.py --mode thread_local \
      --subgroup $extra > $L_DIR/probe$extra.log 2>&1
    echo "probe $extra rc=$?"; grep RESULT $L_DIR/probe$extra.log || tail -30 $L_DIR/probe$extra.log; pack
  done
fi

# Peers print `RESULT {json}`; the label names the variant (xfuser's JSON does not say compiled).
peer() {
  label=$1; shift
  timeout -k 10 ${PEER_LIMIT:-300} "$@" > /tmp/peer.log 2>&1; rc=$?
  cat /tmp/peer.log >> $L_DIR/peers.log
  if grep -q "^RESULT" /tmp/peer.log; then
    grep "^RESULT" /tmp/peer.log | tail -1 | sed "s/^RESULT {/{\"label\": \"$label\", /" >> $L_DIR/peers.jsonl
    tail -1 $L_DIR/peers.jsonl
  else echo "$label rc=$rc"; tail -15 /tmp/peer.log; fi
  cleanup; pack
}

for H in ${SIZES-1024}; do  # SIZES="" runs no denoiser sizes (e.g. the VAE alone)
  for L in ${LAYOUTS:-single}; do
    log=$L_DIR/ours-${L//+/_}-$H.log
    timeout -k 10 $LIMIT python3 bench/gang_gpu.py --model $M --layouts $L --height $H \
      --steps $S --out $L_DIR --repeats ${REPEATS:-2} ${PROFILE:+--profile} ${GANG_ARGS:-} > $log 2>&1
    rc=$?; grep -E "^RESULT|^closed" $log || { echo "$L rc=$rc"; tail -25 $log; }
    cleanup; pack
  done
  X="--model $M --height $H --width $H --num_inference_steps $S"
  for P in ${PEERS:-}; do
    case $P in
      diffusers) peer $P python3 .peers/bench_diffusers.py $M $H $S ;;
      diffusers-cp-u*) n=${P#diffusers-cp-u}
        peer $P torchrun --nproc_per_node $n .peers/bench_diffusers_cp.py $M $H $S $n 1 ;;
      xfuser-pf*) n=${P#xfuser-pf}
        peer $P torchrun --nproc_per_node $n .peers/bench_xfuser.py $X --pipefusion_parallel_degree $n ;;
      xfuser-u*)  # xfuser-uN[-compile][-fp8][-fbcache|-teacache][-runner]
        spec=${P#xfuser-u}; n=${spec%%-*}; flags=""; script=.peers/bench_xfuser.py; path=/tmp/site
        for part in $(echo "${spec#$n}" | tr '-' ' '); do
          case $part in
            compile) flags="$flags --use_torch_compile" ;;
            fp8) flags="$flags --use_fp8_gemms" ;;
            runner) script=bench/peer_xfuser_runner.py; path=/tmp/site-extras:/tmp/site ;;
            fbcache|teacache) flags="$flags --cache_method $part" ;;
            *) echo "unknown xfuser variant $part in $P"; continue 2 ;;
          esac
        done
        peer $P env PYTHONPATH=$path torchrun --nproc_per_node $n $script $X --ulysses_degree $n $flags ;;
      *) echo "unknown peer $P" ;;
    esac
  done
done
# The VAE decode gang (issue 5): VAE_RANKS="1,2,4" VAE_SIZES="1024,2048,4096,6144".
if [ -n "${VAE_RANKS:-}" ]; then
  timeout -k 10 ${VAE_LIMIT:-300} python3 bench/vae_gpu.py --sizes ${VAE_SIZES:-1024,2048,4096} \
    --ranks $VAE_RANKS --repeats 2 --out $L_DIR > $L_DIR/vae.log 2>&1
  echo "vae rc=$?"; grep -E "^\|" $L_DIR/vae.log; cleanup; pack
fi
echo; python3 bench/session_table.py $L_DIR | tee $L_DIR/table.md; cp $L_DIR/table.md $OUT/; pack
