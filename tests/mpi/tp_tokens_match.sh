#!/usr/bin/env bash
# TP-n against TP1 on any checkpoint with the CPU backend: for each n, both kv_shard modes,
# greedy and seeded top-k sampling, the tokens `mpirun -np n mlaserve generate --tp n` prints
# must equal one process's. (TP sums the sharded products in another order, so logits differ
# in the last bits; top-k 8 keeps the sampled distribution's boundaries far apart compared
# with that. With top-p over a random model's near-flat 100k-token distribution they are
# not: seen on the V2-Lite shape, TP4 drew another token at the first step.) Too heavy for CI on full-width shapes (run by hand; commands and
# results in docs/BENCHMARKS.md), e.g.
#   mlaserve make-tiny --preset v2-lite-full --layers 2 --dtype BF16 --out /tmp/v2l2
#   tests/mpi/tp_tokens_match.sh build/launch/mlaserve /tmp/v2l2 4 8
set -uo pipefail
mlaserve=$1 model=$2
shift 2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
export OMPI_MCA_mpi_yield_when_idle=1
gen=("$mlaserve" --log-level warn generate --model "$model" --max-tokens 16 --ignore-eos
  --num-pages 16 --prompt-ids 17,102,99,50,42,77,3,204,123,8,64,31,5,60,9,101)
tokens() { grep -E '^(group 0 )?request 1 ' | sed 's/.*: //'; }
failures=0 checks=0
for sampling in greedy "--temperature 0.8 --top-k 8 --seed 7"; do
  extra=()
  [ "$sampling" != greedy ] && read -ra extra <<<"$sampling"
  want=$("${gen[@]}" "${extra[@]}" 2>&1 | tokens)
  echo "tp1 ($sampling): $want"
  for np in "$@"; do
    for kv in sequence replicate; do
      got=$(mpirun -np "$np" --oversubscribe --bind-to none "${gen[@]}" "${extra[@]}" --tp "$np" \
        --kv-shard "$kv" 2>&1 | tokens)
      checks=$((checks + 1))
      if [ -n "$want" ] && [ "$got" = "$want" ]; then
        echo "tp$np $kv ($sampling): same tokens"
      else
        echo "FAIL: tp$np $kv ($sampling): $got"
        failures=$((failures + 1))
      fi
    done
  done
done
echo "tp_tokens_match: $((checks - failures)) passed, $failures failed"
[ "$failures" -eq 0 ]
