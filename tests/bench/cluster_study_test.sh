#!/usr/bin/env bash
# tests/bench/cluster_study.sh end to end on a CPU profile of the make-tiny model, small: two
# sizes, every deployment, a table row each with numbers that add up (not a study: the
# profile is a 2-core VM's).
#   tests/bench/cluster_study_test.sh MLASERVE
set -euo pipefail
mlaserve=$1
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$mlaserve" --log-level warn make-tiny --preset v3 --out "$work/tiny" --seed 7
OPENBLAS_NUM_THREADS=1 "$mlaserve" --log-level warn profile --model "$work/tiny" \
  --prefill 16,64,256 --batch 1,4,16 --context 64,256 --repeats 2 --out "$work/profile.json" \
  >"$work/profile.log" 2>&1 || { cat "$work/profile.log"; exit 1; }
table=$(MLASERVE=$mlaserve GROUPS_LIST=1,4 RATE_PER_GROUP=20 PROMPTS_PER_GROUP=40 PREFIXES=4 \
  PREFIX_LEN=64 INPUT_LEN=uniform:16-48 OUTPUT_LEN=uniform:8-24 NUM_PAGES=256 \
  PROFILE_REPLICATE="$work/profile.json" "$here/cluster_study.sh" "$work/profile.json" "$work/out")
echo "$table"
python3 - "$work/out" <<'PY'
import json, os, sys
out = sys.argv[1]
names = ("base", "cache-aware", "rebalance", "disaggregated", "failure", "replicated")
for g in (1, 4):
    for name in names:
        path = os.path.join(out, f"{name}.g{g}.json")
        if g == 1 and name == "disaggregated":
            assert not os.path.exists(path), "one group cannot be split"
            continue
        r = json.load(open(path))
        assert r["total_output_tokens"] > 0 and r["output_throughput"] > 0, (name, g)
        expect = 40 * g
        if name == "failure" and g == 1:
            assert r["completed"] < expect, (name, g, r["completed"])  # its only group died
        else:
            assert r["completed"] == expect, (name, g, r["completed"], expect)
print("cluster_study: ok")
PY
rows=$(grep -c '^| [14] |' <<<"$table")
[ "$rows" = 11 ] || { echo "expected 11 rows (6 deployments at 4 groups, 5 at 1), got $rows" >&2; exit 1; }
