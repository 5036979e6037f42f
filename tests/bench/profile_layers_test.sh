#!/usr/bin/env bash
# tests/bench/profile_layers.py on two small profiles (4 and 8 layers of a shape with 3 dense
# layers): the step times and collectives extended along the line through them, and each
# inconsistency refused with a message naming it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work" <<'PY'
import json, os, sys
w = sys.argv[1]
def profile(layers, moe, ms_decode, ms_prefill, bytes_per_layer):
    coll = lambda n: {"all_reduce": {"bytes": bytes_per_layer * n, "calls": 2 * n}}
    return {"model_family": "deepseek_v3", "device": "cuda", "tp": 8, "kv_shard": "sequence",
            "block_size": 64, "emulated": True, "link": {"busbw_gbps": 300.0, "latency_us": 20.0},
            "num_layers": layers, "moe_layers": moe, "latent_bytes_per_token": 1152 * layers,
            "samples": [
                {"prefill_tokens": 64, "decode_seqs": 0, "context_tokens": 0, "prefill_pairs": 2048,
                 "step_ms": ms_prefill, "collectives": coll(layers), "collectives_ms": 0.04 * layers},
                {"prefill_tokens": 0, "decode_seqs": 4, "context_tokens": 4000, "prefill_pairs": 0,
                 "step_ms": ms_decode, "collectives": coll(layers), "collectives_ms": 0.04 * layers}],
            "fit": {"stale": True}}
json.dump(profile(4, 1, 2.0, 3.0, 1000), open(os.path.join(w, "l4.json"), "w"))
json.dump(profile(8, 5, 4.0, 7.0, 1000), open(os.path.join(w, "l8.json"), "w"))
bad = profile(8, 5, 1.0, 7.0, 1000)
json.dump(bad, open(os.path.join(w, "faster.json"), "w"))
other = profile(8, 5, 4.0, 7.0, 1000); other["tp"] = 4
json.dump(other, open(os.path.join(w, "tp4.json"), "w"))
mixed = profile(8, 4, 4.0, 7.0, 1000)
json.dump(mixed, open(os.path.join(w, "mixed.json"), "w"))
PY
python3 "$here/profile_layers.py" "$work/l4.json" "$work/l8.json" --layers 61 --moe-layers 58 \
  --out "$work/l61.json"
python3 - "$work/l61.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
assert p["num_layers"] == 61 and p["moe_layers"] == 58 and "fit" not in p, p
assert p["extrapolated"]["layers"] == [4, 8] and p["latent_bytes_per_token"] == 1152 * 61
prefill, decode = p["samples"]
# 0.5 ms (decode) and 1 ms (prefill) per layer: 8 layers' time + 53 more.
assert abs(decode["step_ms"] - (4.0 + 53 * 0.5)) < 1e-9, decode
assert abs(prefill["step_ms"] - (7.0 + 53 * 1.0)) < 1e-9, prefill
assert decode["collectives"]["all_reduce"] == {"bytes": 61000, "calls": 122}, decode
assert abs(decode["collectives_ms"] - 0.04 * 61) < 1e-9, decode
PY
expect_refusal() {  # expect_refusal TEXT ARGS...
  local text=$1
  shift
  if python3 "$here/profile_layers.py" "$@" >"$work/out" 2>&1 || ! grep -qF -- "$text" "$work/out"; then
    echo "FAIL: expected a refusal naming '$text': $(cat "$work/out")"
    exit 1
  fi
}
expect_refusal "faster with more layers" "$work/l4.json" "$work/faster.json" --layers 61 --moe-layers 58
expect_refusal "differ in tp" "$work/l4.json" "$work/tp4.json" --layers 61 --moe-layers 58
expect_refusal "mix dense and MoE" "$work/l4.json" "$work/mixed.json" --layers 61 --moe-layers 57
expect_refusal "the target has 58 MoE layers" "$work/l4.json" "$work/l8.json" --layers 61 --moe-layers 61
expect_refusal "below LONG's 8" "$work/l4.json" "$work/l8.json" --layers 6 --moe-layers 3
echo "profile_layers: ok"
