#!/bin/bash
# One GPU call: optional NCCL-in-CUDA-graph probe, our layouts (each in its own process,
# under a time limit), optionally the peers; all on the same machine. Expects .whl (wheels
# incl. ditmesh) and .peers (copy of ../shared/bench/peers) in the repo root.
#   LAYOUTS="single u2+graphs"  H=1024  S=28  PROBE=1  PEERS="diffusers xfuser-u2"  PROFILE=1
# Logs and JSON lines under $OUT; a table at the end.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi -L
python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "gpus", torch.cuda.device_count(), "nccl", torch.cuda.nccl.version())'
M=/tmp/flux-random; H=${H:-1024}; S=${S:-28}; LIMIT=${LIMIT:-240}
# At most 8 files come back from $OUT: logs go to $L_DIR and travel as one tarball.
L_DIR=/tmp/logs; mkdir -p $L_DIR
pack() { cp $L_DIR/*.jsonl $OUT/ 2>/dev/null; tar czf $OUT/logs.tgz -C $L_DIR --exclude='*.pt' . ; }
[ -d $M ] || python3 .peers/make_flux.py $M full 2>&1 | tail -1
GRAPHS_OK=1
if [ "${PROBE:-0}" = 1 ]; then
  for mode in thread_local; do
    timeout -k 5 60 torchrun --nproc_per_node 2 bench/nccl_graph_probe.py --mode $mode --subgroup \
      > $L_DIR/probe-$mode.log 2>&1
    echo "probe $mode rc=$?"; grep RESULT $L_DIR/probe-$mode.log || { tail -30 $L_DIR/probe-$mode.log; GRAPHS_OK=0; }; pack
  done
fi
cleanup() { pkill -9 -f multiprocessing.spawn 2>/dev/null; pkill -9 -f torchrun 2>/dev/null; sleep 2; }
for L in ${LAYOUTS:-single}; do
  case "$L" in u*graphs*|r*graphs*|cfg*graphs*|dp*graphs*) [ $GRAPHS_OK = 1 ] || { echo "skip $L (probe failed)"; continue; } ;; esac
  timeout -k 10 $LIMIT python3 bench/gang_gpu.py --model $M --layouts $L --height $H --steps $S \
    --out $L_DIR ${PROFILE:+--profile} > $L_DIR/ours-${L//+/_}-$H.log 2>&1
  rc=$?; grep -E "^RESULT|^closed" $L_DIR/ours-${L//+/_}-$H.log || { echo "$L rc=$rc"; tail -25 $L_DIR/ours-${L//+/_}-$H.log; }
  cleanup; pack
done
# Peers print `RESULT {json}`; the label names the variant (xfuser's JSON does not say compiled).
run() {
  label=$1; shift
  timeout -k 10 ${PEER_LIMIT:-300} "$@" > /tmp/peer.log 2>&1; rc=$?
  cat /tmp/peer.log >> $L_DIR/peers-$H.log
  if grep -q "^RESULT" /tmp/peer.log; then
    grep "^RESULT" /tmp/peer.log | tail -1 | sed "s/^RESULT {/{\"label\": \"$label\", /" >> $L_DIR/peers.jsonl
    tail -1 $L_DIR/peers.jsonl
  else echo "$label rc=$rc"; tail -15 /tmp/peer.log; fi
  cleanup; pack
}
X="--model $M --height $H --width $H --num_inference_steps $S"
for P in ${PEERS:-}; do
  case $P in
    diffusers) run $P python3 .peers/bench_diffusers.py $M $H $S ;;
    diffusers-cp-u2) run $P torchrun --nproc_per_node 2 .peers/bench_diffusers_cp.py $M $H $S 2 1 ;;
    xfuser-u2) run $P torchrun --nproc_per_node 2 .peers/bench_xfuser.py $X --ulysses_degree 2 ;;
    xfuser-u2-compile) run $P torchrun --nproc_per_node 2 .peers/bench_xfuser.py $X --ulysses_degree 2 --use_torch_compile ;;
    xfuser-1-compile) run $P torchrun --nproc_per_node 1 .peers/bench_xfuser.py $X --use_torch_compile ;;
  esac
done
echo; python3 bench/session_table.py $L_DIR | tee $L_DIR/table.md; pack
