#!/usr/bin/env bash
# The GPU checks and measurements the open issues wait for, as steps of one script, so a GPU
# session spends its device time running them rather than typing them. Run from the repository
# root on the GPU host, with the bundle made here and carried:
#   launch/bundle.sh bundle build/tests/mla_gpu_tests build/launch/mlaserve   (here)
#   tests/gpu/session_checks.sh STEP...                                      (on the host)
# Steps (each under its own time limit, logs in $OUT/STEP.log, a line per step in the table
# printed last; a failed step does not stop the others):
#   decode      mla_decode's tests (both bf16 kernels, fp8 pages) and the model parity suites, whose
#               real-dimension golden models run the default decode kernel: the first check after
#               a decode-kernel change
#   gpu_new     the GPU tests written without a GPU: batch-invariant GEMM, deterministic parity
#               and batch invariance, gather/scatter rows, the device cache's export and import,
#               migration and MLA prefill (issue 14); the fp8 weight products (issue 17)
#   gpu_all     every gpu-labelled test
#   det_cost    V2-Lite shape (4 layers, bf16): decode tokens/s at batch 1, 8 and 32, with and
#               without --deterministic (issue 14: what batch invariance costs on the GPU)
#   migration   V3 shape (3 layers, bf16): live migration at contexts 1k-32k, both groups on the
#               GPU as two processes (gRPC) and as one mpirun job (MPI) (issue 14)
#   prefix      prefix caching on one GPU group, off and on (issue 18)
#   prefix_routing  prefix caching with two groups sharing the GPU under eviction pressure (32
#               system prompts, 160 pages a group), routing round-robin, least-loaded and
#               cache-aware compared (issue 18; ROUTINGS: the policies, default all three)
#   simulate    profile on the GPU and simulate against measured serving at four rates, two
#               groups sharing the GPU (issue 16's GPU validation: simulated as sharing one
#               device, calibrated by simulate1's run when it ran first); simulate1: one group
#   fp8         the fp8 product tests and the seeded-request determinism test (rerun after their
#               fixes), then `bench-kernels --benches fp8_gemm`: V3's decode products with fp8
#               weights kept against the bf16 small-row kernel (issue 17 item 4)
#   fp8_model   the CUDA model with fp8 weights kept: its GPU tests (fp8 experts, parity with
#               golden_fp8act, bytes held), then DeepSeek-V3's shape (4 layers, rank 0 of TP8
#               emulated, an fp8 checkpoint) profiled with fp8_weights widen and keep: step times
#               and weight bytes side by side (issue 17 item 4)
#   fp8_cache   the fp8 latent cache on the GPU (issue 17 item 5): its kernel and model tests (and
#               mla_decode's speculative steps, s_q 3 and 4, on bf16 and fp8 pages), then
#               mla_decode on bf16 and fp8 pages side by side (bench-kernels --cache bf16,fp8),
#               and whole V2-Lite-shaped decode steps (4 layers) on each cache (bench-decode)
#   fusion      the batch-1 decode step's fused kernels (issue 17 item 3): the tests of the kernels
#               and of the model they change, then V2-Lite-shaped decode steps (4 layers) at batch
#               1, 2 and 4 with this bundle's mlaserve and, where base/bundle/bin/mlaserve is
#               an earlier build (a tar of bundle/bin/mlaserve unpacked into base/; it runs on
#               this bundle's libraries), with that one in the same run; a kernel-by-kernel
#               profile of base and this
#   fusion_full the same decode steps on the whole V2-Lite shape (27 layers), batch 1 and 2
#   variants    decode-step variants of issue 17 item 3 (the fused attention kernel, the L2 weight
#               prefetch): their tests, then V2L4 decode steps at batch 1, 2 and 4 under each
#               variant's flags (VARIANTS; the whole V2-Lite shape too with VARIANTS_FULL=1)
#   peer        FlashMLA's dense decode beside mlaserve's (issue 17), from FLASHMLA_SRC; with
#               base/bundle/bin/mlaserve (as for fusion) that build's decode kernel too
#   study       tests/bench/cluster_study.sh on the GPU profile the simulate step took (its
#               model's shape, TP1 groups: a first cluster study on measured GPU steps)
#   v3tp8       DeepSeek-V3's shape, one rank of a TP8 group emulated on this GPU, 4 and 8
#               layers extended to 61, both cache layouts (tests/bench/emulated_profile.sh;
#               links: 361 GB/s bus bandwidth, an 8xH100 all-reduce of 1 GiB measured on the
#               lending workplace's machines, and 15 us a call, assumed): the profiles issue 16's
#               V3 study simulates, in $OUT/v3tp8/profile_{sequence,replicate}.json
# env: OUT (default /tmp/mla_out), FLASHMLA_SRC (for peer: the tree, or a .tgz holding it),
#      BUDGET_S (default 570: the whole run's seconds; a step's limit is cut to what is left,
#      less 20 s for packing, so the table and the logs come back inside a device call's limit).
# Only a few files come back from a device host, so everything under $OUT is packed into
# $OUT/session.tgz at the end (the table is also in $OUT/table.md).
set -uo pipefail
out=${OUT:-/tmp/mla_out}
budget=${BUDGET_S:-570}
mkdir -p "$out"
export out
[ -f bundle/env.sh ] && source bundle/env.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
declare -a table

# run STEP SECONDS COMMAND...: the command's output in $OUT/STEP.log; its status and the lines
# it marks with "RESULT " go into the table.
run() {
  local step=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS - 20))
  if [ "$left" -lt 30 ]; then
    table+=("| $step | SKIPPED: ${left} s of BUDGET_S left | |")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $step (at most ${limit} s; log $out/$step.log)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$step.log" 2>&1
  local rc=$?
  local status="ok"
  [ $rc -ne 0 ] && status="FAILED (exit $rc)"
  [ $rc -eq 124 ] && status="TIMED OUT"
  tail -15 "$out/$step.log"
  table+=("| $step | $status | $((SECONDS - start)) s |")
  while IFS= read -r line; do table+=("|   | ${line#RESULT } | |"); done \
    < <(grep '^RESULT ' "$out/$step.log" | head -80)
}

v2l4() { [ -d /tmp/v2l4 ] || mlaserve make-tiny --preset v2-lite-full --layers 4 --dtype BF16 --out /tmp/v2l4; }
v3l3() { [ -d /tmp/v3l3 ] || mlaserve make-tiny --preset v3-full --layers 3 --dtype BF16 --out /tmp/v3l3; }

det_cost() {
  set -o pipefail
  v2l4 || return 1
  local rc=0
  for det in "" --deterministic; do
    mlaserve generate --device cuda --model /tmp/v2l4 --prompt-len 512 --max-tokens 64 \
      --batch 1,8,32 --ignore-eos $det 2>&1 |
      sed "s/^\(.*tokens\/s.*\)$/RESULT ${det:-default} \1/" || rc=1
  done
  return $rc
}

migration() {
  v3l3 || return 1
  RUNS=2 MAX_TOKENS=512 OUT=$out/migration_grpc tests/bench/migration.sh /tmp/v3l3 \
    1024,4096,16384,32768 --device cuda --num-pages 1200 || return 1
  LAYOUT=one-job PORT=57400 RUNS=2 MAX_TOKENS=512 OUT=$out/migration_mpi \
    tests/bench/migration.sh /tmp/v3l3 1024,4096,16384,32768 --device cuda --num-pages 1200
}

fp8_model() {
  set -o pipefail
  tests/gpu/device_run.sh fp8_model_tests \
    '*MoeExpertsFp8*:*CudaFp8Weights*:*CudaModelParity*v3_fp8*:CudaMoeExperts*' ||
    return 1
  local m=/tmp/v3f8
  [ -d $m ] || mlaserve --log-level warn make-tiny --preset v3-full --layers 4 --dtype F8_E4M3 \
    --for-emulated-tp 8 --out $m --seed 5 || return 1
  for w in widen keep; do
    mlaserve --log-level info profile --model $m --tp 8 --emulate --link-busbw-gbps 361 \
      --link-latency-us 15 --device cuda --fp8-weights $w --num-pages 2048 --prefill 512 \
      --batch 1,8,32 --context 1024,2048 --out "$out/fp8_model_$w.json" >"$out/fp8_model_$w.log" 2>&1 ||
      { tail -20 "$out/fp8_model_$w.log"; return 1; }
    echo "RESULT $w: $(grep -o '[0-9.]* GiB of weights on the GPU' "$out/fp8_model_$w.log")"
    python3 - "$out/fp8_model_$w.json" "$w" <<'PY'
import json, sys
for s in json.load(open(sys.argv[1]))["samples"]:
    print(f"RESULT {sys.argv[2]} prefill {s['prefill_tokens']} decode {s['decode_seqs']} "
          f"context {s['context_tokens']}: step {s['step_ms']:.3f} ms "
          f"(collectives {s['collectives_ms']:.3f})")
PY
  done
}

fp8_cache() {
  set -o pipefail
  local rc=0
  tests/gpu/device_run.sh fp8_cache_tests \
    '*Fp8Latent*:*Fp8Cache*:CudaLatentStore*:CudaMlaDecode.*Mixed*:CudaMlaDecode.*Fp8*:'\
'CudaMlaDecode.Speculative*:CudaMlaPrefill.*Mixed*' ||
    rc=1
  mlaserve bench-kernels --benches mla_decode --cache bf16,fp8 --json "$out/fp8_cache_decode.json" |
    sed 's/^\(| mla_decode.*\)$/RESULT \1/' || rc=1
  # Where the fp8 decode kernel's time goes (16 heads, context 4,096): one launch of the split-KV
  # kernel on each element (bf16 pages run the paired-tile one) under Nsight Compute, in
  # $out/fp8_cache_ncu.txt.
  local ncu
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null |
    head -1)
  for c in ${ncu:+bf16 fp8}; do
    "$ncu" --clock-control none --kernel-name regex:"mla_decode_(split|paired)" --launch-skip 2 \
      --launch-count 1 --section SpeedOfLight --section WarpStateStats \
      --section MemoryWorkloadAnalysis mlaserve bench-kernels --benches mla_decode --cache $c \
      --contexts 4096 --heads 16 --sq 1 --iters 3 --warmup 1 >>"$out/fp8_cache_ncu.txt" 2>&1 ||
      echo "ncu on the $c kernel failed (see fp8_cache_ncu.txt)"
  done
  v2l4 || return 1
  # A long run on both caches: a 4,096-token random prompt, 256 greedy tokens, the latent form.
  for c in auto fp8; do
    mlaserve --log-level warn generate --device cuda --model /tmp/v2l4 --cache-dtype $c \
      --absorb factored --prompt-len 4096 --max-tokens 256 --ignore-eos --seed 11 \
      >"$out/fp8_cache_long_$c.log" 2>&1 || rc=1
  done
  python3 - "$out/fp8_cache_long_auto.log" "$out/fp8_cache_long_fp8.log" <<'PY' || rc=1
import re, sys
toks = [re.search(r"request \d+ \(\w+\): ([\d,]+)", open(f).read()).group(1).split(",")
        for f in sys.argv[1:]]
same = next((i for i, (a, b) in enumerate(zip(*toks)) if a != b), min(map(len, toks)))
print(f"RESULT long run (4,096-token prompt, 256 greedy tokens): fp8 cache follows bf16's "
      f"first {same} tokens; {sum(a == b for a, b in zip(*toks))} of {len(toks[0])} equal")
PY
  for c in auto fp8; do
    mlaserve bench-decode --device cuda --model /tmp/v2l4 --cache-dtype $c --num-pages 9000 \
      --context 4096 --batch 1,32,128 2>&1 |
      sed "s/^\( *\(context\|[0-9][0-9]*\) .*\)$/RESULT cache $c \1/" || rc=1
  done
  return $rc
}

# bench_rows BIN MODEL BATCHES STEPS TAG [FLAG...]: bench-decode's rows at context 512, as RESULT
# lines tagged TAG.
bench_rows() {
  local bin=$1 model=$2 batches=$3 steps=$4 tag=$5
  shift 5
  "$bin" --log-level warn bench-decode --device cuda --model "$model" --num-pages 2000 \
    --context 512 --batch "$batches" --steps "$steps" --warmup 5 "$@" 2>&1 |
    sed "s/^\( *\(context\|[0-9][0-9]*\) .*\)$/RESULT $tag \1/"
}

# bench-decode with each build (base: an earlier mlaserve, when given; this) on MODEL at
# BATCHES, RESULT lines tagged with the build.
decode_builds() {
  local model=$1 batches=$2 steps=$3 rc=0
  for b in ${BASE_MLASERVE:+base} this; do
    local bin=mlaserve
    [ "$b" = base ] && bin=$BASE_MLASERVE
    bench_rows "$bin" "$model" "$batches" "$steps" $b || rc=1
  done
  return $rc
}

fusion() {
  set -o pipefail
  local rc=0
  tests/gpu/device_run.sh fusion_tests \
    'CudaMoeExperts*:CudaMoeGate*:*CudaModel*:CudaRope*:CudaGemm*' || rc=1
  v2l4 || return 1
  decode_builds /tmp/v2l4 1,2,4 50 || rc=1
  for b in ${BASE_MLASERVE:+base} this; do
    local bin=mlaserve
    [ "$b" = base ] && bin=$BASE_MLASERVE
    # Kernel by kernel (Nsight Compute, one uncaptured batch-1 step), in $out/fusion_ncu_$b.
    OUT=$out/fusion_ncu_$b MODEL=/tmp/v2l4 MLASERVE=$bin tests/gpu/profile_step.sh 1 512 \
      >"$out/fusion_ncu_$b.log" 2>&1 || rc=1
    sed -n '/kernels in the step/,$p' "$out/fusion_ncu_$b.log" | sed "s/^/RESULT $b ncu /" |
      head -25
  done
  return $rc
}

# Decode-step variants of issue 17 item 3 side by side: the tests of the fused attention kernel
# and of the L2 prefetch, then decode steps at batch 1, 2 and 4 with each variant's flags in
# turn (VARIANTS, ';'-separated; default: none, --fused-attention, --prefetch-weights, both), on
# V2L4 and, with VARIANTS_FULL=1, on the whole V2-Lite shape; then an Nsight Compute profile of
# a V2L4 step at batch 1 with the fused attention and without.
variants() {
  set -o pipefail
  local rc=0
  tests/gpu/device_run.sh variants_tests \
    'CudaMlaDecodeFused*:CudaModelFusedAttention*:CudaL2Prefetch*:CudaModelPrefetch*' || rc=1
  v2l4 || return 1
  local m=/tmp/mla_models/v2lite
  local -a flags
  IFS=';' read -ra flags <<<"${VARIANTS:-default;--fused-attention;--prefetch-weights;--fused-attention --prefetch-weights}"
  for model in /tmp/v2l4 ${VARIANTS_FULL:+$m}; do
    if [ "$model" = $m ] && [ ! -f $m/config.json ]; then
      mlaserve --log-level warn make-tiny --preset v2-lite-full --dtype BF16 --out $m || return 1
    fi
    for f in "${flags[@]}"; do
      local args=$f
      [ "$f" = default ] && args=""
      # shellcheck disable=SC2086
      bench_rows mlaserve $model 1,2,4 50 "$(basename $model) $f" $args || rc=1
    done
  done
  # Kernel by kernel (Nsight Compute, one uncaptured V2L4 step at batch 1) with the fused
  # attention and without, in $out/variants_ncu_*.
  for f in default --fused-attention; do
    local args=$f tag=${f#--}
    [ "$f" = default ] && args=""
    OUT=$out/variants_ncu_$tag MODEL=/tmp/v2l4 STEP_FLAGS=$args tests/gpu/profile_step.sh 1 512 \
      >"$out/variants_ncu_$tag.log" 2>&1 || rc=1
    sed -n '/kernels in the step/,$p' "$out/variants_ncu_$tag.log" | sed "s/^/RESULT $tag ncu /" |
      head -25
  done
  return $rc
}

# The whole DeepSeek-V2-Lite shape (27 layers, bf16): the batch-1 step of issue 17 item 3.
fusion_full() {
  set -o pipefail
  local m=/tmp/mla_models/v2lite
  [ -f $m/config.json ] ||
    mlaserve --log-level warn make-tiny --preset v2-lite-full --dtype BF16 --out $m || return 1
  decode_builds $m 1,2 30
}

export -f v2l4 v3l3 det_cost migration fp8_model fp8_cache bench_rows decode_builds fusion fusion_full variants
steps="decode gpu_new gpu_all det_cost migration prefix prefix_routing simulate simulate1 fp8 fp8_model fp8_cache fusion fusion_full variants peer study v3tp8"
for step in "$@"; do
  [[ " $steps " == *" $step "* ]] || { echo "unknown step '$step' (steps: $steps)" >&2; exit 2; }
done

for step in "$@"; do
  case $step in
    decode)
      run decode 300 tests/gpu/device_run.sh decode_tests 'CudaMlaDecode*:CudaModelParity*' ;;
    gpu_new)
      run gpu_new 420 tests/gpu/device_run.sh gpu_new_tests \
        '*Gemm*:*Determinis*:*GatherRows*:*LatentCache*:*igrat*:*MlaPrefill*' ;;
    gpu_all) run gpu_all 580 tests/gpu/device_run.sh gpu_all_tests '*' ;;
    det_cost) run det_cost 300 bash -c det_cost ;;
    fp8_model) run fp8_model 480 bash -c fp8_model ;;
    fp8_cache) run fp8_cache 480 bash -c fp8_cache ;;
    fusion)
      [ -x base/bundle/bin/mlaserve ] && export BASE_MLASERVE=$PWD/base/bundle/bin/mlaserve
      run fusion 480 bash -c fusion ;;
    variants) run variants 480 bash -c variants ;;
    fusion_full)
      [ -x base/bundle/bin/mlaserve ] && export BASE_MLASERVE=$PWD/base/bundle/bin/mlaserve
      run fusion_full 580 bash -c fusion_full ;;
    migration) run migration 540 bash -c migration ;;
    prefix)
      run prefix 400 env PRESET=v2-lite-full MAKE_TINY_FLAGS="--layers 4 --dtype BF16" \
        WORKER_FLAGS="--device cuda" MLASERVE="$(command -v mlaserve)" NUM_PAGES=2048 \
        tests/bench/prefix_caching.sh "$out/prefix" ;;
    prefix_routing)
      run prefix_routing 480 bash -c 'set -o pipefail
        v2l4 || exit 1
        for r in ${ROUTINGS:-round-robin least-loaded cache-aware}; do
          env MODEL=/tmp/v2l4 NUM_GROUPS=2 WORKER_FLAGS="--device cuda" \
            MLASERVE="$(command -v mlaserve)" ROUTING=$r PREFIXES=32 NUM_PAGES=160 PROMPTS=400 \
            tests/bench/prefix_caching.sh "$out/prefix_$r" | sed "s/^| o/RESULT $r &/" || exit 1
        done' ;;
    simulate | simulate1)
      # Two groups time-slice the one GPU: simulated as sharing a device, and calibrated by the
      # one-group run when it ran first (its traces are not stretched by the sharing).
      calibration=()
      if [ "$step" = simulate ] && [ -f "$out/simulate1/calibration.env" ]; then
        read -ra calibration <"$out/simulate1/calibration.env"
      fi
      run "$step" 580 env PRESET=v2-lite-full MAKE_TINY_FLAGS="--layers 4 --dtype BF16" \
        WORKER_FLAGS="--device cuda" MLASERVE="$(command -v mlaserve)" "${calibration[@]}" \
        NUM_GROUPS=$([ "$step" = simulate1 ] && echo 1 || echo 2) \
        GROUPS_PER_DEVICE=$([ "$step" = simulate1 ] && echo 1 || echo 2) \
        INPUT_LEN=lognormal:512,0.6 OUTPUT_LEN=lognormal:128,0.5 RATES=4,8,16,32 PROMPTS=200 \
        CONCURRENCY=128 tests/bench/simulate_validation.sh "$out/$step" ;;
    study)
      if [ ! -f "$out/simulate/profile.json" ]; then
        table+=("| study | FAILED: run the simulate step first (it takes the profile) | |")
        continue
      fi
      run study 580 env MLASERVE="$(command -v mlaserve)" GROUPS_LIST=2,16,128 \
        tests/bench/cluster_study.sh "$out/simulate/profile.json" "$out/study" ;;
    v3tp8)
      run v3tp8 580 env MLASERVE="$(command -v mlaserve)" WORKER_FLAGS="--device cuda" \
        LINK_BUSBW_GBPS=361 LINK_LATENCY_US=15 NUM_PAGES=16384 \
        tests/bench/emulated_profile.sh "$out/v3tp8" ;;
    fp8)
      run fp8 240 bash -c "set -o pipefail
        tests/gpu/device_run.sh fp8_tests 'CudaFp8Gemm*:CudaDeterminism*' &&
        mlaserve bench-kernels --benches fp8_gemm --fp8-rows 1,2,4,8,512 --json $out/fp8_gemm.json |
        sed 's/^\(| fp8_gemm.*\)$/RESULT \1/'" ;;
    peer)
      src=${FLASHMLA_SRC:-}
      if [ -z "$src" ]; then
        table+=("| peer | FAILED: FLASHMLA_SRC (the source tree, or a .tgz holding it) not set | |")
        continue
      fi
      if [[ $src == *.tgz || $src == *.tar.gz ]]; then
        mkdir -p /tmp/flashmla_src && tar xzf "$src" -C /tmp/flashmla_src &&
          src=$(dirname "$(find /tmp/flashmla_src -name setup_dense.py | head -1)")
      fi
      [ -x base/bundle/bin/mlaserve ] && export BASE_MLASERVE=$PWD/base/bundle/bin/mlaserve
      run peer 580 env MLASERVE="$(command -v mlaserve)" tests/bench/peer_flashmla.sh \
        "$src" "$out/peer" ;;
  esac
done

echo
echo "| step | result | time |"
echo "|---|---|---|"
printf '%s\n' "${table[@]}"

# Pack the logs and results: a device host returns only a few files.
printf '%s\n' "| step | result | time |" "|---|---|---|" "${table[@]}" >"$out/table.md"
tar czf /tmp/session.tgz --exclude=./peer/flashmla --exclude="./v3tp8/model_l*" \
  --exclude="*.safetensors" -C "$out" . && find "$out" -mindepth 1 -delete &&
  mv /tmp/session.tgz "$out/" && printf '%s\n' "| step | result | time |" "|---|---|---|" \
  "${table[@]}" >"$out/table.md"
