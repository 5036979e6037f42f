#!/usr/bin/env bash
# tests/bench/peer_table.py on two small result files in the formats of FlashMLA's
# bench_dense_decode.py and `mlaserve bench-kernels --json`: rows joined on (context, heads,
# s_q) with the right ratio, and a configuration missing from one run is an error.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work" <<'PY'
import json, os, sys
w = sys.argv[1]
rows, results = [], []
for ctx in (4096, 8192):
    for h in (16, 128):
        us = 100.0 * h / 16 * ctx / 4096
        rows.append(dict(context=ctx, heads=h, s_q=1, us=us, of_copy=0.9))
        results.append(dict(bench="mla_decode", config=dict(batch=128, context=ctx, heads=h, s_q=1),
                            time_us=us * (0.5 if h == 16 else 1.25), of_copy=0.8))
results.append(dict(bench="small_gemm", config=dict(rows=1), time_us=1.0, of_copy=0.5))
# A given batch of lengths joins on its lengths; fp8-cache rows are not FlashMLA's peers.
rows.append(dict(lengths="4641,45118,1730,1696", heads=16, s_q=4, us=52.0, of_copy=0.5))
results.append(dict(bench="mla_decode", time_us=65.0, of_copy=0.4,
                    config=dict(batch=4, lengths="4641,45118,1730,1696", heads=16, s_q=4)))
results.append(dict(bench="mla_decode", time_us=1.0, of_copy=0.1,
                    config=dict(batch=128, context=4096, heads=16, s_q=1, cache="fp8")))
json.dump(dict(device="GPU A", copy_gbs=4100, gemm_tflops=780, rows=rows),
          open(os.path.join(w, "flashmla.json"), "w"))
ours = dict(device=dict(name="GPU A"), results=results,
            ceilings=dict(copy_gbps=4150, gemm_bf16_tflops_8192=790))
json.dump(ours, open(os.path.join(w, "mlaserve.json"), "w"))
ours["results"] = results[1:]
json.dump(ours, open(os.path.join(w, "short.json"), "w"))
# Two kernels asked for (--decode-kernel split,paired): a table each; paired lacks one row.
both = []
for kernel, f in (("split", 1.0), ("paired", 0.5)):
    for r in results:
        if r["bench"] == "mla_decode" and "cache" not in r["config"]:
            if kernel == "paired" and r["config"].get("heads") == 128 and r["config"].get("context") == 8192:
                continue
            both.append(dict(r, time_us=r["time_us"] * f, config=dict(r["config"], kernel=kernel)))
ours["results"] = both
json.dump(ours, open(os.path.join(w, "kernels.json"), "w"))
PY
table=$(python3 "$here/peer_table.py" "$work/flashmla.json" "$work/mlaserve.json")
echo "$table"
grep -qF "| 4096 | 16 | 1 | 100.0 | 0.90 | 50.0 | 0.80 | 0.50 |" <<<"$table"
grep -qF "| 8192 | 128 | 1 | 1600.0 | 0.90 | 2000.0 | 0.80 | 1.25 |" <<<"$table"
grep -qF "| 4641,45118,1730,1696 | 16 | 4 | 52.0 | 0.50 | 65.0 | 0.40 | 1.25 |" <<<"$table"
grep -qF "mlaserve / FlashMLA: 0.50 to 1.25 over 5 configurations; at or below 1 in 2" <<<"$table"
if python3 "$here/peer_table.py" "$work/flashmla.json" "$work/short.json" >/dev/null 2>&1; then
  echo "a configuration missing from one run was not an error" >&2
  exit 1
fi
table=$(python3 "$here/peer_table.py" "$work/flashmla.json" "$work/kernels.json" 2>&1) && {
  echo "a configuration missing from one kernel's run was not an error" >&2
  exit 1
}
echo "$table"
grep -qF "mlaserve kernel: paired" <<<"$table"
grep -qF "| 4096 | 128 | 1 | 800.0 | 0.90 | 500.0 | 0.80 | 0.62 |" <<<"$table"
grep -qF "| 4096 | 128 | 1 | 800.0 | 0.90 | 1000.0 | 0.80 | 1.25 |" <<<"$table"
grep -qF "mlaserve / FlashMLA: 0.25 to 0.62 over 4 configurations; at or below 1 in 4" <<<"$table"
grep -qF "configurations in only one run: [(8192, 128, 1)]" <<<"$table"
# An earlier build's results as a further labelled file: a table of its own.
table=$(python3 "$here/peer_table.py" "$work/flashmla.json" "$work/mlaserve.json" \
  base="$work/mlaserve.json")
grep -qF "build: base" <<<"$table"
[ "$(grep -cF "| 4096 | 16 | 1 | 100.0 | 0.90 | 50.0 | 0.80 | 0.50 |" <<<"$table")" = 2 ]
echo "peer_table: ok"
