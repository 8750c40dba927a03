#!/usr/bin/env bash
# Issue 19's training runs on the lent GPU machine (nvidia-h200-x2): two trainings side by
# side, one per GPU, each its own variant; each folder comes back as a tar split under the
# device tool's 16 MiB per-file limit, with its log. The committed model is variant b of
#   MINUTES=8.5 A_ARGS="--compile --vae-share 0.5 --vae-focus 0" \
#   B_ARGS="--compile --vae-share 0.5 --vae-focus 10" bash tools/train_shapes_gpu.sh
# (those are the defaults now; a: the VAE loss unweighted, for comparison). Resuming:
#   A_ARGS="--compile --lr 3e-4 --resume models/shapes" B_ARGS=... bash tools/train_shapes_gpu.sh
#   MINUTES  time box per training (default 8.3, inside one 600 s call)
# Needs the diffusers wheel (and importlib_metadata) in .whl7/, carried.
set -u
MINUTES=${MINUTES:-8.3}
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl7/*.whl || exit 1
# the package from this checkout, without building it: ditmesh is the services/ folder
mkdir -p /tmp/pp && ln -sfn "$PWD/services" /tmp/pp/ditmesh
export PYTHONPATH=/tmp/site:/tmp/pp
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
train() {  # name gpu extra-args...
    local name=$1 gpu=$2; shift 2
    CUDA_VISIBLE_DEVICES=$gpu python3 tools/train_shapes.py --out /tmp/shapes_$name \
        --device cuda --minutes "$MINUTES" --workers 14 "$@" >"$OUT/train_$name.log" 2>&1
    echo "$name exit $?" >>"$OUT/train_$name.log"
}
# shellcheck disable=SC2086  # the variants are word lists
train a 0 ${A_ARGS:-} &
# shellcheck disable=SC2086
train b 1 ${B_ARGS:---compile} &
wait
for name in a b; do
    if [ -f /tmp/shapes_$name/MODEL_CARD.md ]; then
        tar -C /tmp -cf - shapes_$name | split -b 15m - "$OUT/shapes_$name.tar."
    fi
    grep -E "held-out|wrote|exit|flow step|Error" "$OUT/train_$name.log" | tail -6
done
ls -la "$OUT"
