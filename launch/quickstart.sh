#!/usr/bin/env bash
# The main job on the CPU with a tiny random model, on one machine:
#   1. installs what is missing and builds `mlaserve`;
#   2. writes a random DeepSeek-V3-shaped checkpoint;
#   3. starts a coordinator and two tensor-parallel worker groups of two ranks
#      (launch/cluster.sh: one mpirun job per group);
#   4. streams several requests through the client (ids, then text, then a chat), asks the
#      OpenAI-compatible HTTP API for a chat with curl, and prints the cluster status;
#   5. shuts everything down.
#   launch/quickstart.sh            uses ./build and ./.quickstart, configs/tiny-cpu.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh

BUILD_DIR=${BUILD_DIR:-build}
CONFIG=configs/tiny-cpu.yaml
mla_configure_and_build "$BUILD_DIR" "${JOBS:-$(nproc)}" mlaserve
MLASERVE="$BUILD_DIR/launch/mlaserve"
LOGS=.quickstart/logs
mkdir -p "$LOGS"

echo "== writing a tiny random DeepSeek-V3-shaped model to .quickstart/tiny-v3"
"$MLASERVE" --log-level warn make-tiny --preset v3 --out .quickstart/tiny-v3 --seed 7

echo "== offline generation (one process)"
"$MLASERVE" --log-level warn generate --config "$CONFIG" --tp 1 --prompt-ids 11,12,13,14 \
  --max-tokens 16 --ignore-eos

echo "== starting a coordinator and 2 worker groups (tp 2: one 2-rank mpirun job per group);" \
  "logs in $LOGS"
MLASERVE="$MLASERVE" launch/cluster.sh --config "$CONFIG" --groups 2 >"$LOGS/cluster.log" 2>&1 &
cluster=$!
stop() { kill -TERM "$cluster" 2>/dev/null || true; wait "$cluster" 2>/dev/null || true; }
trap stop EXIT

client() { "$MLASERVE" --log-level warn client --address 127.0.0.1:50051 "$@"; }
client --wait-ready 120
echo "== streaming 4 requests at once through the coordinator (greedy and sampled)"
pids=()
client --prompt-ids 11,12,13,14 --max-tokens 24 --ignore-eos >"$LOGS/r1.txt" & pids+=($!)
client --prompt-ids 21,22,23 --max-tokens 24 --ignore-eos --temperature 0.8 --seed 1 >"$LOGS/r2.txt" & pids+=($!)
client --prompt-ids 31,32,33,34,35,36,37,38 --max-tokens 24 --ignore-eos >"$LOGS/r3.txt" & pids+=($!)
client --prompt-ids 41,42 --max-tokens 24 --top-k 20 --temperature 1.0 --seed 2 >"$LOGS/r4.txt" & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
cat "$LOGS"/r[1-4].txt
echo "== one more, streamed to the terminal as tokens arrive"
client --prompt-ids 11,12,13,14 --max-tokens 16 --ignore-eos
echo "== text in, text out (the coordinator's tokenizer; a random model writes noise)"
client --prompt "Hello, world" --max-tokens 16 --ignore-eos
echo "== a chat, rendered with the model's chat template (DeepSeek-V3's)"
client --system "Be brief." --chat "What is MLA?" --max-tokens 16 --ignore-eos
echo "== the same chat through the OpenAI-compatible API: curl -N http://127.0.0.1:8000/v1/chat/completions"
curl -sSN http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{
  "model": "tiny-v3", "stream": true, "max_tokens": 8, "ignore_eos": true,
  "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is MLA?"}]}'
echo "== cluster status"
client --status
echo "== shutting down"
stop
trap - EXIT
echo "quickstart done: offline generation, a 2-group cluster, 8 streamed requests (ids, text, a" \
  "chat over gRPC and over the OpenAI API)."
