#!/usr/bin/env python3
"""Summarises one decode step from an Nsight Compute raw CSV (`ncu --csv --page raw
--print-units base --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum`).

The step is the last one in the file: from the last launch whose kernel name contains
`embedding` (the first kernel of every step) to the end. Prints the step's kernel time, the
DRAM bytes it read and wrote, and the kernels grouped by name with their share of the time
and their bandwidth, against --copy-gbps when given.

  ncu_step_summary.py CSV [--copy-gbps 2998] [--step-ms 3.3] [--top 25]
"""
import argparse
import csv
import re
import sys
from collections import defaultdict


def short(name: str) -> str:
    name = name.replace("<unnamed>::", "").replace("(anonymous namespace)::", "")
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\(.*", "", name)          # drop the argument list
    name = re.sub(r"<.*", "", name)           # and template arguments
    return name.split("::")[-1].strip()[:60]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--copy-gbps", type=float, default=0)
    ap.add_argument("--step-ms", type=float, default=0, help="the step's time with graphs")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    rows = []
    with open(a.csv, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu's own log lines are not CSV
    def num(r, key):  # ncu writes thousands separators
        return float((r.get(key) or "0").replace(",", ""))

    for r in csv.DictReader(lines):
        try:
            t = num(r, "gpu__time_duration.sum")
        except ValueError:
            continue  # the units row
        rows.append((r["Kernel Name"], t, num(r, "dram__bytes_read.sum"),
                     num(r, "dram__bytes_write.sum")))
    starts = [i for i, r in enumerate(rows) if "embedding" in r[0]]
    if not starts:
        print("no embedding kernel found: not a decode-step profile", file=sys.stderr)
        return 1
    step = rows[starts[-1]:]
    total_ns = sum(r[1] for r in step)
    rd = sum(r[2] for r in step)
    wr = sum(r[3] for r in step)
    print(f"kernels in the step: {len(step)}; kernel time {total_ns / 1e6:.3f} ms; "
          f"DRAM read {rd / 1e9:.3f} GB, written {wr / 1e9:.3f} GB; "
          f"read at {rd / total_ns:.1f} GB/s over the kernel time")
    if a.step_ms > 0:
        print(f"step with graphs {a.step_ms:.3f} ms: kernels busy {total_ns / 1e6 / a.step_ms:.1%}"
              f" of it; DRAM read / step time = {rd / (a.step_ms * 1e6):.1f} GB/s"
              + (f" = {rd / (a.step_ms * 1e6) / a.copy_gbps:.1%} of copy" if a.copy_gbps else ""))
    groups = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for name, t, r_, w in step:
        g = groups[short(name)]
        g[0] += 1
        g[1] += t
        g[2] += r_
        g[3] += w
    print(f"{'kernel':60} {'calls':>6} {'ms':>8} {'share':>6} {'GB read':>8} {'GB/s':>7}"
          + (f" {'of copy':>7}" if a.copy_gbps else ""))
    for name, (n, t, r_, w) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:a.top]:
        bw = (r_ + w) / t
        print(f"{name:60} {n:6d} {t / 1e6:8.3f} {t / total_ns:6.1%} {r_ / 1e9:8.4f} {bw:7.1f}"
              + (f" {bw / a.copy_gbps:7.1%}" if a.copy_gbps else ""))
    small = [r for r in step if r[1] < 5000]
    print(f"kernels under 5 us: {len(small)} of {len(step)}, {sum(r[1] for r in small) / 1e6:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
