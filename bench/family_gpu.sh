#!/bin/bash
# One family on one GPU: ditmesh (eager, compiled) against diffusers and xfuser in the same
# call (docs/performance.md). Carry .whl (the wheels, ditmesh's own built from `git archive
# HEAD`, xfuser 0.7.0, yunchang, distvae); run from the repo root on the GPU machine:
#   FAMILY=hunyuandit bash bench/family_gpu.sh     # HunyuanDiT-v1.2, 1024x1024, 50 steps
#   FAMILY=cogvideox bash bench/family_gpu.sh      # CogVideoX-5B, 49 x 480x720, STEPS (10)
#   FAMILY=mochi bash bench/family_gpu.sh          # Mochi-1, 19 x 480x848, STEPS (8)
# SYSTEMS picks and orders the runs (default: all that exist for the family).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site
L=${OUT:-/tmp/out}; mkdir -p $L
case $FAMILY in
  hunyuandit) M=hunyuandit-v1.2; SIZE="--height 1024 --width 1024"; STEPS=${STEPS:-50}
              ALL="diffusers xfuser xfuser+compile ditmesh" ;;
  cogvideox)  M=cogvideox-5b; SIZE="--height 480 --width 720 --frames 49"; STEPS=${STEPS:-10}
              ALL="diffusers xfuser xfuser+compile ditmesh" ;;
  mochi)      M=mochi; SIZE="--height 480 --width 848 --frames 19"; STEPS=${STEPS:-8}
              ALL="diffusers ditmesh" ;;
esac
echo "== setup $(date +%T)"
[ -f /tmp/site/.done ] || { python3 -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.done; } || exit 1
nvidia-smi -L
[ -f /tmp/$M/model_index.json ] || python3 bench/make_family_model.py $M /tmp/$M 2>&1 | tail -1
ARGS="--model /tmp/$M $SIZE --steps $STEPS --repeats ${REPEATS:-1}"
for s in ${SYSTEMS:-$ALL}; do
  echo "== $s $(date +%T)"
  case $s in
    diffusers) timeout -k 10 ${T:-300} python3 bench/peer_family.py --system diffusers \
                 --family $FAMILY $ARGS > $L/${s/+/-}.log 2>&1 ;;
    xfuser) timeout -k 10 ${T:-300} torchrun --nproc_per_node 1 bench/peer_family.py \
              --system xfuser --family $FAMILY $ARGS > $L/${s/+/-}.log 2>&1 ;;
    xfuser+compile) timeout -k 10 ${T:-300} torchrun --nproc_per_node 1 bench/peer_family.py \
              --system xfuser --compile --family $FAMILY $ARGS > $L/${s/+/-}.log 2>&1 ;;
    ditmesh) timeout -k 10 ${T:-420} python3 bench/family_gpu.py $ARGS \
               --layouts ${LAYOUTS:-single,single+compile} --out $L > $L/${s/+/-}.log 2>&1 ;;
  esac
  grep RESULT $L/${s/+/-}.log || tail -15 $L/${s/+/-}.log
done
echo "== table $(date +%T)"
grep -h RESULT $L/*.log | python3 bench/family_table.py | tee $L/table.md
echo "== done $(date +%T)"
