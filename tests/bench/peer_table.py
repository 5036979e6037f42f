#!/usr/bin/env python3
"""The ratio table of tests/bench/peer_flashmla.sh: FlashMLA's dense decode (its
bench_dense_decode.py JSON, or flashmla_lengths.py's) against `mlaserve bench-kernels --benches
mla_decode --json`, joined on (context, heads, s_q), where a batch of given lengths stands in for
the context. Prints a markdown table per mlaserve kernel in the results (config.kernel, from
`--decode-kernel split,paired`; "auto" where absent), each followed by the range of its ratios,
then both runs' ceilings; exits 1 when a configuration of either run is missing from the other.
Further mlaserve result files, given as LABEL=PATH (e.g. base=base.json: an earlier build timed
in the same call), get tables of their own, headed by their label.

    tests/bench/peer_table.py FLASHMLA_JSON MLASERVE_JSON [LABEL=MLASERVE_JSON ...]
"""
import json
import sys


def main(flashmla_path, mlaserve_path, *more):
    peer = json.load(open(flashmla_path))
    ours = json.load(open(mlaserve_path))
    def batch(r):  # a mean context, or the lengths of a given batch
        return r["context"] if "context" in r else r["lengths"]

    theirs = {(batch(r), r["heads"], r["s_q"]): r for r in peer["rows"]}
    mine = {}  # (label, kernel) -> {key: result}
    runs = [("", ours)] + [(m.split("=", 1)[0], json.load(open(m.split("=", 1)[1]))) for m in more]
    for label, run in runs:
        for r in run["results"]:
            if r["bench"] != "mla_decode" or r["config"].get("cache", "bf16") != "bf16":
                continue
            c = r["config"]
            key = (label, c.get("kernel", "auto"))
            mine.setdefault(key, {})[(batch(c), c["heads"], c["s_q"])] = r
    # Mean contexts (numbers) first, then given batches (their lengths, strings).
    order = lambda key: (isinstance(key[0], str), key)  # noqa: E731
    print(f"device: FlashMLA run on {peer['device']}, mlaserve run on {ours['device']['name']}")
    missing = set()
    for (label, kernel), results in sorted(mine.items()):
        missing |= set(theirs) ^ set(results)
        print()
        heading = ", ".join(([f"build: {label}"] if label else []) +
                            ([f"mlaserve kernel: {kernel}"] if kernel != "auto" else []))
        if heading:
            print(heading)
            print()
        print("| context (or lengths) | heads | s_q | FlashMLA us | of copy | mlaserve us | of copy | "
              "mlaserve / FlashMLA |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        ratios = []
        for key in sorted(set(theirs) & set(results), key=order):
            t, m = theirs[key], results[key]
            ratio = m["time_us"] / t["us"]
            ratios.append(ratio)
            print(f"| {key[0]} | {key[1]} | {key[2]} | {t['us']:.1f} | {t['of_copy']:.2f} | "
                  f"{m['time_us']:.1f} | {m['of_copy']:.2f} | {ratio:.2f} |")
        if ratios:
            print()
            print(f"mlaserve / FlashMLA: {min(ratios):.2f} to {max(ratios):.2f} over "
                  f"{len(ratios)} configurations; at or below 1 in {sum(r <= 1 for r in ratios)}")
    if not mine:
        missing = set(theirs)
    print()
    c = ours["ceilings"]
    print(f"ceilings: FlashMLA's run copy {peer['copy_gbs']:.0f} GB/s, GEMM "
          f"{peer['gemm_tflops']:.0f} TFLOP/s; mlaserve's run copy {c['copy_gbps']:.0f} GB/s, "
          f"GEMM {c['gemm_bf16_tflops_8192']:.0f} TFLOP/s")
    if missing:
        print(f"configurations in only one run: {sorted(missing, key=order)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3 or any("=" not in a for a in sys.argv[3:]):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))
