#!/usr/bin/env bash
# A step profile of one rank of a tensor-parallel group larger than this machine, for a model
# shape with more layers than one GPU holds (issue 16's DeepSeek-V3 study in TP8 groups on one
# GPU): for each layer count in LAYERS, a random checkpoint of the shape holding only the routed
# experts rank 0 loads (`make-tiny --for-emulated-tp TP`), then `mlaserve profile --tp TP
# --emulate` (rank 0's compute measured; the collectives it counts priced by the link model),
# per cache layout; then tests/bench/profile_layers.py extends the two profiles of each layout
# to TARGET_LAYERS (TARGET_MOE of them MoE). Writes OUT_DIR/profile_sequence.json and
# OUT_DIR/profile_replicate.json (the inputs of tests/bench/cluster_study.sh and its
# PROFILE_REPLICATE), the measured profiles and logs beside them, and prints a line per profile.
#   tests/bench/emulated_profile.sh OUT_DIR
# env: MLASERVE (default build/launch/mlaserve, or mlaserve on PATH), PRESET (v3-full), TP (8),
#      LAYERS (two counts, each at least the shape's dense layers: 4,8), TARGET_LAYERS (61),
#      TARGET_MOE (58), DTYPE (BF16), LINK_BUSBW_GBPS and LINK_LATENCY_US (required: the
#      links' bus bandwidth and a call's latency; say where they come from), SHARDS
#      (sequence,replicate), WORKER_FLAGS (e.g. "--device cuda"), PROFILE_FLAGS (the grid;
#      default --prefill 64,256,1024,2048 --batch 1,8,32,64 --context 512,2048,8192),
#      NUM_PAGES (cache pages of the rank, 4096).
set -euo pipefail
out=${1:?usage: tests/bench/emulated_profile.sh OUT_DIR}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
mlaserve=${MLASERVE:-build/launch/mlaserve}
[ -x "$mlaserve" ] || mlaserve=$(command -v mlaserve)
tp=${TP:-8}
layers=${LAYERS:-4,8}
busbw=${LINK_BUSBW_GBPS:?set LINK_BUSBW_GBPS (the links bus bandwidth, GB/s)}
latency=${LINK_LATENCY_US:?set LINK_LATENCY_US (a collective call latency, us)}
grid=${PROFILE_FLAGS:---prefill 64,256,1024,2048 --batch 1,8,32,64 --context 512,2048,8192}
shards=$(echo "${SHARDS:-sequence,replicate}" | tr , ' ')
IFS=, read -r short long <<<"$layers"
[ -n "${long:-}" ] || { echo "emulated_profile: LAYERS needs two counts, e.g. 4,8" >&2; exit 2; }

for l in $short $long; do
  model=$out/model_l$l
  echo "== ${PRESET:-v3-full}, $l layers, routed experts of rank 0 of $tp ($model)"
  start=$SECONDS
  "$mlaserve" --log-level warn make-tiny --preset "${PRESET:-v3-full}" --layers "$l" \
    --dtype "${DTYPE:-BF16}" --for-emulated-tp "$tp" --out "$model" --seed 5
  echo "   written in $((SECONDS - start)) s ($(du -sh "$model" | cut -f1))"
  for s in $shards; do
    start=$SECONDS
    # shellcheck disable=SC2086  # the grid and worker flags are lists of flags
    "$mlaserve" --log-level warn profile --model "$model" --tp "$tp" --kv-shard "$s" --emulate \
      --link-busbw-gbps "$busbw" --link-latency-us "$latency" \
      --num-pages "${NUM_PAGES:-4096}" $grid ${WORKER_FLAGS:-} \
      --out "$out/profile_${s}_l$l.json" >"$out/profile_${s}_l$l.log" 2>&1 ||
      { echo "emulated_profile: profile failed: $(tail -5 "$out/profile_${s}_l$l.log")" >&2; exit 1; }
    echo "   $s: $(tail -1 "$out/profile_${s}_l$l.log") ($((SECONDS - start)) s)"
  done
  rm -rf "$model"  # tens of GB at full size
done
for s in $shards; do
  python3 "$here/profile_layers.py" "$out/profile_${s}_l$short.json" "$out/profile_${s}_l$long.json" \
    --layers "${TARGET_LAYERS:-61}" --moe-layers "${TARGET_MOE:-58}" --out "$out/profile_$s.json"
done
