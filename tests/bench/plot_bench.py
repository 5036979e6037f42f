#!/usr/bin/env python3
"""Plots `mlaserve bench` result files (--result-file; the keys of `vllm bench serve`'s JSON, so
vLLM's result files plot too):

    plot_bench.py OUT_DIR RESULT.json [RESULT.json ...]

writes into OUT_DIR
  - sweep.png     latency against throughput over the runs of a --request-rate sweep, in the
                  order of the offered rate: output tokens/s on x, p50 and p99 TTFT and TPOT
                  on y, one point per run (labelled with its rate);
  - cdf.png       the CDFs of TTFT and TPOT of each run (needs --save-detailed);
  - timeline.png  requests in flight over time, and output tokens/s per worker, of the last
                  run (needs --save-detailed).
Uses matplotlib (Debian's python3-matplotlib) without a display.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rate_label(r):
    rate = r.get("request_rate")
    return "inf" if rate in ("inf", None) or rate == float("inf") else f"{rate:g}/s"


def offered(r):
    rate = r.get("request_rate")
    return float("inf") if rate in ("inf", None) else float(rate)


def sweep(results, out):
    results = sorted(results, key=offered)  # the curve follows the offered load
    x = [r["output_throughput"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            ax.plot(x, [r.get(f"{stat}_{metric}_ms", 0) for r in results], style,
                    label=f"{stat} {title}")
        for xi, r in zip(x, results):
            ax.annotate(rate_label(r), (xi, r.get(f"p99_{metric}_ms", 0)), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(f"{title} against throughput")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{results[0].get('backend', '')} {results[0].get('workload', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sweep.png"), dpi=110)
    plt.close(fig)


def cdf(results, out):
    detailed = [r for r in results if "ttfts" in r]
    if not detailed:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in detailed:
        ttft = sorted(t * 1000 for t, e in zip(r["ttfts"], r["errors"]) if not e)
        tpot = sorted((e2 - t) * 1000 / (n - 1) for t, e2, n, err in
                      zip(r["ttfts"], r["e2els"], r["output_lens"], r["errors"]) if not err and n > 1)
        for ax, values in ((axes[0], ttft), (axes[1], tpot)):
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))],
                        label=rate_label(r))
    for ax, title in ((axes[0], "TTFT"), (axes[1], "TPOT")):
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF")
        ax.grid(alpha=0.3)
        ax.legend(title="request rate")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cdf.png"), dpi=110)
    plt.close(fig)
    return True


def timeline(result, out):
    if "start_times" not in result:
        return False
    events = []
    for start, e2el, err in zip(result["start_times"], result["e2els"], result["errors"]):
        events += [(start, 1), (start + e2el, -1)]
    events.sort()
    t, n, xs, ys = 0.0, 0, [0.0], [0]
    for t, d in events:
        xs.append(t)
        ys.append(n)
        n += d
        xs.append(t)
        ys.append(n)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    axes[0].plot(xs, ys)
    axes[0].set_ylabel("requests in flight")
    axes[0].grid(alpha=0.3)
    tl = result.get("output_tokens_timeline", {})
    bin_s = tl.get("bin_s", 1.0)
    for worker, series in sorted(tl.get("tokens_per_s_by_worker", {}).items()):
        axes[1].step([i * bin_s for i in range(len(series))], series, where="post", label=worker)
    axes[1].set_ylabel("output tokens/s")
    axes[1].set_xlabel("seconds from the start of the run")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{result.get('backend', '')} at {rate_label(result)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "timeline.png"), dpi=110)
    plt.close(fig)
    return True


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    results = []
    for path in sys.argv[2:]:
        with open(path) as f:
            results.append(json.load(f))
    sweep(results, out)
    wrote = ["sweep.png"]
    if cdf(results, out):
        wrote.append("cdf.png")
    if timeline(results[-1], out):
        wrote.append("timeline.png")
    print("wrote " + ", ".join(os.path.join(out, w) for w in wrote))


if __name__ == "__main__":
    main()
