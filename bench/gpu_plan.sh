#!/bin/bash
# A GPU plan longer than one call's limit: its phases (each a gpu_session.sh run) go on
# detached on the warm machine, and short calls wait for them and bring the logs back.
#
#   PHASES="vae4 pf" bash bench/gpu_plan.sh start 540   # starts the plan, waits 540 s
#   bash bench/gpu_plan.sh poll 580    # waits up to 580 s more (returns early when done)
#
# Each call prints the RESULT lines so far and leaves in $OUT: plan.log, ours.jsonl,
# peers.jsonl, vae.jsonl, table.md and logs.tgz. One machine, so every figure of a plan
# compares with the others (the peers run in the same plan).
set -u
P=/tmp/plan; L=/tmp/logs

# Phases (PHASES="vae4 pf" picks some; the default is what no session has run yet on
# 4 GPUs: pf p4096 mesh, about 25 minutes in all):
#   p1024    ours at 1, 2, 4 GPUs and the peers, 1024x1024 (with profiles)
#   vae      the VAE decode at M = 1, 2, 4 up to 8192x8192
#   vae4     the VAE decode at M = 4 (all sizes), then M = 2 at 8192 (what `vae` ran out of)
#   p2048    one GPU (the reference), four GPUs and the 4-GPU peers, 2048x2048
#   pf       PipeFusion (eager) at 2 and 4 stages and PipeFusion x Ulysses, 1024x1024
#   p4096    four GPUs and xfuser's compiled Ulysses-4, 4096x4096 (no 1-GPU reference)
#   autotune compile with max-autotune (1 and 4 GPUs, 1024x1024)
#   overlap  --comm-overlap reorder / schedule against plain compile + graphs (2 and 4 GPUs)
#   mesh     whole-mesh throughput on 4 GPUs (text encoders added to the random Flux):
#            stages split across the GPUs vs 4 whole-pipeline replicas vs one u4 gang
#   speed1024 issue 20 on ONE GPU at 1024x1024 (see the phase below), ~17 min (estimate)
#   speed2048 issue 20 at 2048x2048, one timed request a row, xfuser compiled, ~9 min
#   speed2048x what speed2048 leaves out (caching at CACHE_B, compile alone, diffusers)
#   speed    speed1024 then speed2048 (on a 1-GPU machine)
#   fp8prof  compile+graphs with and without --fp8 at 1024x1024, profiled, ~4 min
#   ulysses4 issue 21 on 4 GPUs: the Ulysses exchange in chunks / in FP8, u2r2 compiled,
#            xfuser's PipeFusion 4 (bf16 buffers) and --use_fp8_comms peers, ~17 min
#   ulysses2g the same on a 2-GPU machine, ~9 min
#   fp8comm2g the FP8 exchange alone on 2 GPUs with xfuser's --use_fp8_comms, ~6 min
# and for a 2-GPU machine:
#   pf2g     PipeFusion-2 (eager) against one GPU and xfuser's PipeFusion-2, 1024x1024
#   vae2g    the VAE decode at M = 1, 2 from 4096 to 8192 (the largest size each M reaches)
#   overlap2g --comm-overlap reorder / schedule against plain compile + graphs, 2 GPUs
#   mesh2g   whole-mesh throughput on 2 GPUs: 2 whole-pipeline replicas vs two denoisers
#            sharing one encoder and one VAE vs one u2 gang
phase() {
  case $1 in
    p1024)
      SIZES=1024 PROFILE=1 \
        LAYOUTS="single single+compile+graphs u2+compile+graphs u4+compile+graphs" \
        PEERS="diffusers xfuser-u1-compile xfuser-u2-compile xfuser-u4 xfuser-u4-compile" \
        bash bench/gpu_session.sh
      # If the compiled 4-GPU layout failed, at least time it eager with graphs.
      grep -q '"layout": "u4+compile+graphs"' $L/ours.jsonl ||
        SIZES=1024 LAYOUTS="u4+graphs" PEERS="" bash bench/gpu_session.sh ;;
    vae)
      SIZES="" VAE_RANKS=1,2,4 VAE_SIZES=1024,2048,4096,6144,8192 VAE_LIMIT=300 \
        bash bench/gpu_session.sh ;;
    vae4)
      SIZES="" VAE_RANKS=4 VAE_SIZES=1024,2048,4096,6144,8192 VAE_LIMIT=300 \
        bash bench/gpu_session.sh
      SIZES="" VAE_RANKS=2 VAE_SIZES=8192 VAE_LIMIT=200 bash bench/gpu_session.sh ;;
    p2048)
      SIZES=2048 LIMIT=300 LAYOUTS="single u4+compile+graphs" \
        PEERS="xfuser-u4 xfuser-u4-compile diffusers-cp-u4" PEER_LIMIT=300 \
        bash bench/gpu_session.sh ;;
    pf)
      SIZES=1024 LAYOUTS="single pf2 pf4 cfg2pf2 pf2u2" PEERS="xfuser-pf4" PEER_LIMIT=200 \
        bash bench/gpu_session.sh ;;
    p4096)
      SIZES=4096 LIMIT=400 LAYOUTS="u4+compile+graphs" PEERS="xfuser-u4-compile" \
        PEER_LIMIT=400 bash bench/gpu_session.sh ;;
    overlap)
      SIZES=1024 PROFILE=1 LAYOUTS="u4+compile+graphs u4+compile+graphs+reorder \
        u4+compile+graphs+schedule u2+compile+graphs u2+compile+graphs+reorder" PEERS="" \
        bash bench/gpu_session.sh ;;
    autotune)
      SIZES=1024 LAYOUTS="single+autotune+graphs u4+autotune+graphs" PEERS="" \
        bash bench/gpu_session.sh ;;
    pf2g)
      SIZES=1024 LAYOUTS="single pf2" PEERS="xfuser-pf2" PEER_LIMIT=200 \
        bash bench/gpu_session.sh ;;
    vae2g)
      SIZES="" VAE_RANKS=1,2 VAE_SIZES=4096,6144,8192 VAE_LIMIT=280 \
        bash bench/gpu_session.sh ;;
    overlap2g)
      SIZES=1024 PROFILE=1 LAYOUTS="u2+compile+graphs u2+compile+graphs+reorder \
        u2+compile+graphs+schedule" PEERS="" bash bench/gpu_session.sh ;;
    mesh2g)
      MESH_LAYOUTS="replicas:2|encoder@0;denoiser@0;denoiser@1;vae@1|encoder@0;denoiser@0,1:--ulysses=2;vae@1" \
        MESH_LIMIT=${MESH_LIMIT:-240} phase mesh ;;
    mesh)
      export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
      [ -d /tmp/flux-full ] || python3 .peers/make_flux.py /tmp/flux-full full 2>&1 | tail -1
      [ -d /tmp/flux-mesh ] || python3 bench/make_mesh_model.py /tmp/flux-full /tmp/flux-mesh
      IFS='|' read -ra layouts <<< "${MESH_LAYOUTS:-encoder@0;denoiser@1,2:--ulysses=2;vae@3|replicas:4|encoder@0;denoiser@0,1,2,3:--ulysses=4;vae@0}"
      for layout in "${layouts[@]}"; do
        timeout -k 10 ${MESH_LIMIT:-420} python3 bench/mesh_throughput.py --model /tmp/flux-mesh \
          --layout "$layout" --denoiser-flags "--compile --cuda-graphs" --requests 16 \
          --concurrency 8 --out $L > $L/mesh.log.tmp 2>&1
        echo "mesh $layout rc=$?"; grep -E "^RESULT|^\| " $L/mesh.log.tmp || tail -20 $L/mesh.log.tmp
        cat $L/mesh.log.tmp >> $L/mesh.log; pkill -9 -f "ditmesh.cli" 2>/dev/null; sleep 2
      done ;;
    speed1024)
      # Issue 20, one GPU: FP8 GEMMs alone (bench/fp8_gemm.py), then whole requests: eager
      # (the reference of every latent error), compile+graphs, +fp8, the combination fp8 +
      # step caching under the skip pattern the trained shapes model makes at CACHE_A
      # (forced on the random model; compile without graphs, which caching refuses),
      # caching alone, DiTFastAttn with the shapes plan at FA_T mapped onto the model (it
      # does not compose with caching); the peers: xfuser compiled, diffusers, xfuser
      # compiled + fbcache, + FP8 (each applied as xfuser's model runner applies them: its
      # FluxPipeline path ignores both flags, see bench/peer_xfuser_runner.py); last
      # caching at CACHE_B, compile alone (the base of the cached rows) and caching at
      # CACHE_A decided by the probe (on random weights: no step skipped, the probe's
      # cost alone). Rows in order of need: a phase cut short keeps the first.
      export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
      # What the -runner peers import, said up front (their rows fail alone if it breaks).
      PYTHONPATH=/tmp/site-extras:/tmp/site timeout 120 python3 -c "import torchao, xfuser;
print('torchao', torchao.__version__)" > $L/extras.log 2>&1
      echo "peer extras rc=$? $(tail -1 $L/extras.log)"
      timeout -k 10 240 python3 bench/fp8_gemm.py --json $L/fp8_gemm.json > $L/fp8_gemm.log 2>&1
      echo "fp8_gemm rc=$?"; tail -8 $L/fp8_gemm.log
      local a=${CACHE_A:-0.1} b=${CACHE_B:-0.2} f=${FA_T:-0.1}
      SIZES=1024 LIMIT=240 PEER_LIMIT=240 LAYOUTS="single single+compile+graphs \
        single+compile+graphs+fp8 single+compile+fp8+shapescache$a single+compile+shapescache$a \
        single+compile+shapesfa$f" PEERS="xfuser-u1-compile diffusers \
        xfuser-u1-compile-fbcache-runner xfuser-u1-compile-fp8-runner" bash bench/gpu_session.sh
      SIZES=1024 LIMIT=240 LAYOUTS="single+compile+shapescache$b single+compile \
        single+compile+cache$a" PEERS="${SPEED_PEERS:-}" bash bench/gpu_session.sh ;;
    speed2048)
      # The same at 2048x2048 (one timed request a row, the shapes measurements of
      # speed1024 reused when it ran first); the one peer to beat, xfuser compiled.
      local a=${CACHE_A:-0.1} f=${FA_T:-0.1}
      SIZES=2048 LIMIT=300 PEER_LIMIT=300 REPEATS=1 LAYOUTS="single single+compile+graphs \
        single+compile+graphs+fp8 single+compile+fp8+shapescache$a single+compile+shapesfa$f \
        single+compile+shapescache$a" PEERS="xfuser-u1-compile" bash bench/gpu_session.sh ;;
    speed2048x)
      # What speed2048 leaves out: caching at CACHE_B, compile alone, plain diffusers; with
      # compile + graphs again so the peers' ratios at 2048 come from the same call.
      SIZES=2048 LIMIT=300 PEER_LIMIT=300 REPEATS=1 PEERS="diffusers ${SPEED_PEERS:-}" \
        LAYOUTS="single+compile+graphs single+compile+shapescache${CACHE_B:-0.2} single+compile" \
        bash bench/gpu_session.sh ;;
    fp8prof)
      # Where FP8's time goes at 1024x1024: compile+graphs with and without --fp8, each
      # with its torch.profiler table (kernel time by kind: GEMMs, the activations'
      # quantisation, attention, the rest).
      SIZES=1024 PROFILE=1 LIMIT=240 \
        LAYOUTS="single single+compile+graphs single+compile+graphs+fp8" PEERS="" \
        bash bench/gpu_session.sh ;;
    speed) phase speed1024; phase speed2048 ;;
    ulysses4)
      # Issue 21, 4 GPUs, 1024x1024, against u4+compile+graphs (the 1.44 s row), each with a
      # profile: the Ulysses exchange hidden under the attention (+chunksC: Flux's 24 heads
      # are 6 a rank at u4, so 2 or 3 chunks; 12 at u2), the exchange in FP8 (+fp8comm,
      # approximate: see rel_l2_vs_single), both, USP u2r2 compiled, u2 with and without
      # chunks; one GPU eager first (the reference of the latent errors). Peers: xfuser
      # compiled u4, and bench/peer_xfuser.py's PipeFusion 4 with bf16 pipeline buffers.
      # (u2 with chunks and xfuser's --use_fp8_comms, refused on NVIDIA, are on record from
      # the 2-GPU plans.) ~15 min.
      SIZES=1024 PROFILE=1 PEER_LIMIT=240 LAYOUTS="single u4+compile+graphs \
        u4+compile+graphs+chunks2 u4+compile+graphs+chunks3 u4+compile+graphs+fp8comm \
        u4+compile+graphs+chunks2+fp8comm u2r2+compile+graphs u2+compile+graphs" \
        PEERS="xfuser-u4-compile" bash bench/gpu_session.sh
      xpeers 1024 "xfuser-pf4-bf16:4:--pipefusion_parallel_degree 4" ;;
    ulysses2g)
      # The same on a 2-GPU machine (Ulysses 2: 12 heads a rank), ~9 min.
      SIZES=1024 PROFILE=1 PEER_LIMIT=240 LAYOUTS="single u2+compile+graphs \
        u2+compile+graphs+chunks2 u2+compile+graphs+chunks4 u2+compile+graphs+fp8comm \
        u2+compile+graphs+chunks2+fp8comm" PEERS="" bash bench/gpu_session.sh
      xpeers 1024 "xfuser-pf2-bf16:2:--pipefusion_parallel_degree 2" ;;
    fp8comm2g)
      # The FP8 exchange on 2 GPUs against its base in the same call, then xfuser's.
      SIZES=1024 PROFILE=1 PEER_LIMIT=240 LAYOUTS="single u2+compile+graphs \
        u2+compile+graphs+fp8comm" PEERS="" bash bench/gpu_session.sh
      xpeers 1024 "xfuser-u2-compile-fp8comms:2:--ulysses_degree 2 --use_torch_compile --use_fp8_comms" ;;
    *) echo "unknown phase $1" ;;
  esac
}

# bench/peer_xfuser.py rows (issue 21), "label:GPUs:xfuser flags" each, appended to
# peers.jsonl as gpu_session.sh appends its peers' (it runs first and makes the model).
xpeers() {
  local H=$1 spec label n flags rc; shift
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  for spec in "$@"; do
    IFS=: read -r label n flags <<< "$spec"
    PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 timeout -k 10 ${PEER_LIMIT:-300} torchrun \
      --nproc_per_node $n bench/peer_xfuser.py --model /tmp/flux-full --height $H --width $H \
      --num_inference_steps 28 $flags > $L/xpeer.log 2>&1
    rc=$?; cat $L/xpeer.log >> $L/peers.log
    if grep -q "^RESULT" $L/xpeer.log; then
      grep "^RESULT" $L/xpeer.log | tail -1 | sed "s/^RESULT {/{\"label\": \"$label\", /" >> $L/peers.jsonl
      tail -1 $L/peers.jsonl
    else echo "$label rc=$rc"; tail -15 $L/xpeer.log; fi
  done
}

phases() {
  cd $P
  export SKIP_INSTALL=1 L_DIR=$L OUT=$P/out LIMIT=${LIMIT:-240}
  mkdir -p $OUT
  for ph in ${PHASES:-pf p4096 mesh}; do
    echo "== phase $ph"
    phase $ph
  done
  touch $L/plan.done
}

report() {
  grep -hE "^RESULT|^closed|rc=|^\| " $L/plan.log 2>/dev/null | grep -v "^| system\|^|---" | tail -60
  [ -f $L/fp8_gemm.log ] && grep -A7 "^TFLOP/s" $L/fp8_gemm.log
  cp $L/*.jsonl $L/plan.log $OUT/ 2>/dev/null
  cp $L/fp8_gemm.json $OUT/ 2>/dev/null
  python3 $P/bench/session_table.py $L > $OUT/table.md 2>/dev/null
  tar czf $OUT/logs.tgz -C $L --exclude='*.pt' . 2>/dev/null
  [ -f $L/plan.done ] && echo "PLAN DONE" || echo "plan still running"
}

wait_for() {
  local end=$((SECONDS + $1))
  local last=$SECONDS
  while [ $SECONDS -lt $end ] && [ ! -f $L/plan.done ]; do
    sleep 5
    # What is here so far also comes back if this call is cut off.
    if [ $((SECONDS - last)) -ge 60 ]; then cp $L/*.jsonl $L/plan.log $OUT/ 2>/dev/null; last=$SECONDS; fi
  done
}

case ${1:-} in
  start)
    rm -rf $P $L && mkdir -p $P $L
    cp -r bench .peers $P/ || exit 1
    # The trained shapes model: the speed phases measure skip patterns and plans on it.
    mkdir -p $P/models && cp -r models/shapes $P/models/ || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    # Wheels only the xfuser -runner peers import (torchao, cache-dit), kept off the path of
    # every other run (diffusers imports torchao whenever it is installed).
    if ls .whl/extras/*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site-extras .whl/extras/*.whl || exit 1
    fi
    PHASES="${PHASES:-}" CACHE_A="${CACHE_A:-}" CACHE_B="${CACHE_B:-}" FA_T="${FA_T:-}" \
      SPEED_PEERS="${SPEED_PEERS:-}" setsid nohup bash $P/bench/gpu_plan.sh run > $L/plan.log 2>&1 < /dev/null &
    wait_for ${2:-540}
    report
    ;;
  run) phases ;;
  poll)
    wait_for ${2:-540}
    report
    ;;
  *) echo "usage: gpu_plan.sh start|poll SECONDS" ;;
esac
