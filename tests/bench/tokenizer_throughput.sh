#!/usr/bin/env bash
# Tokenizer speed, mlaserve against Hugging Face `tokenizers` on the same lines of text, one
# line at a time on one thread each (encode MB/s of UTF-8 in, decode tokens/s), best of 5.
#   tests/bench/tokenizer_throughput.sh TOKENIZER_DIR [LINES]
#     e.g. tests/bench/tokenizer_throughput.sh tests/data/tokenizers/v3 20000
# The text: the tokenizer test corpus's strings (tests/data/tokenizers/v3/cases.json: many
# scripts, emoji, code, whitespace, digits), repeated to LINES lines. Needs python3 with
# `tokenizers` (pip install tokenizers) and MLASERVE (default build/launch/mlaserve).
set -euo pipefail
dir=$1
lines=${2:-20000}
mlaserve=${MLASERVE:-build/launch/mlaserve}
text=$(mktemp)
trap 'rm -f "$text"' EXIT
python3 - "$dir" "$lines" "$text" <<'PY'
import json, sys
cases = json.load(open(sys.argv[1] + "/cases.json", encoding="utf-8"))["cases"]
strings = [c["text"].replace("\n", " ").replace("\r", " ") for c in cases if c["text"]]
with open(sys.argv[3], "w", encoding="utf-8") as f:
    for i in range(int(sys.argv[2])):
        f.write(strings[i % len(strings)] + "\n")
PY
"$mlaserve" --log-level warn bench-tokenizer --model "$dir" --text "$text"
TOKENIZERS_PARALLELISM=false python3 - "$dir" "$text" <<'PY'
import sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1] + "/tokenizer.json")
lines = open(sys.argv[2], encoding="utf-8").read().split("\n")[:-1]
nbytes = sum(len(l.encode("utf-8")) for l in lines)
best_e = best_d = 1e30
for p in range(6):
    t0 = time.perf_counter()
    ids = [tok.encode(l, add_special_tokens=False).ids for l in lines]
    t1 = time.perf_counter()
    for i in ids:
        tok.decode(i, skip_special_tokens=False)
    t2 = time.perf_counter()
    if p:
        best_e, best_d = min(best_e, t1 - t0), min(best_d, t2 - t1)
n = sum(len(i) for i in ids)
print(f"tokenizers {__import__('tokenizers').__version__}: {len(lines)} lines, {nbytes} bytes, "
      f"{n} tokens: encode {nbytes / best_e / 1e6:.2f} MB/s, decode {n / best_d:.0f} tokens/s "
      f"(best of 5)")
PY
