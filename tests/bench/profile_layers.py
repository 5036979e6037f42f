#!/usr/bin/env python3
"""A profile of a model shape at more layers than one GPU holds, from two profiles of it.

  tests/bench/profile_layers.py SHORT.json LONG.json --layers N --moe-layers M [--out OUT.json]

SHORT and LONG are `mlaserve profile` results of the same shape, grid and group (tp, cache
layout, emulation, link model, device) at two layer counts, e.g. 4 and 8 layers of DeepSeek-V3
(3 dense layers, then MoE: 1 and 5 MoE layers). Every layer LONG adds must be of one kind (all
MoE, or all dense), and so must the layers the target adds beyond LONG: M is checked against
that. Each sample's step time, and where recorded its collectives (bytes, calls, modelled ms),
is extended along the line through the two measurements:
    t(N) = t(LONG) + (N - L_long) * (t(LONG) - t(SHORT)) / (L_long - L_short).
A per-layer time below zero (noise) is an error naming the sample. The result is a profile
`mlaserve simulate` reads (its fit is recomputed there), marked "extrapolated" with its sources.
"""
import argparse
import json
import sys

GROUP_KEYS = ("model_family", "device", "tp", "kv_shard", "block_size", "emulated", "link")
SAMPLE_KEYS = ("prefill_tokens", "decode_seqs", "context_tokens", "prefill_pairs")


def fail(msg):
    sys.exit(f"profile_layers: {msg}")


def load(path):
    try:
        with open(path) as f:
            p = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path}: {e}")
    for key in ("samples", "num_layers", "moe_layers"):
        if key not in p:
            fail(f"{path} has no \"{key}\" (written by an older `mlaserve profile`?)")
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("short")
    ap.add_argument("long")
    ap.add_argument("--layers", type=int, required=True, help="layers of the target")
    ap.add_argument("--moe-layers", type=int, required=True, help="MoE layers of the target")
    ap.add_argument("--out", help="where the profile goes (default: stdout)")
    a = ap.parse_args()
    s, l = load(a.short), load(a.long)
    for key in GROUP_KEYS:
        if s.get(key) != l.get(key):
            fail(f"the two profiles differ in {key}: {s.get(key)!r} vs {l.get(key)!r}")
    added = l["num_layers"] - s["num_layers"]
    if added <= 0:
        fail(f"LONG must have more layers than SHORT ({l['num_layers']} vs {s['num_layers']})")
    added_moe = l["moe_layers"] - s["moe_layers"]
    if added_moe not in (0, added):
        fail(f"the {added} layers LONG adds mix dense and MoE ({added_moe} MoE)")
    if a.layers < l["num_layers"]:
        fail(f"--layers {a.layers} is below LONG's {l['num_layers']}")
    want_moe = l["moe_layers"] + (a.layers - l["num_layers"]) * added_moe // added
    if a.moe_layers != want_moe:
        kind = "MoE" if added_moe else "dense"
        fail(f"--moe-layers {a.moe_layers}: the layers added are {kind}, so the target has "
             f"{want_moe} MoE layers")
    k = (a.layers - l["num_layers"]) / added

    def key(x):
        return tuple(x.get(f, 0) for f in SAMPLE_KEYS)

    short = {key(x): x for x in s["samples"]}
    samples = []
    for x in l["samples"]:
        y = short.get(key(x))
        if y is None:
            fail(f"SHORT has no sample {dict(zip(SAMPLE_KEYS, key(x)))}: profile both on one grid")
        per_layer = x["step_ms"] - y["step_ms"]
        if per_layer < 0:
            fail(f"sample {dict(zip(SAMPLE_KEYS, key(x)))} is faster with more layers "
                 f"({y['step_ms']:.4f} -> {x['step_ms']:.4f} ms): profile again with more repeats")
        out = dict(x)
        out["step_ms"] = x["step_ms"] + k * per_layer
        if "collectives_ms" in x:
            out["collectives_ms"] = x["collectives_ms"] + k * (x["collectives_ms"] - y["collectives_ms"])
        if "collectives" in x:
            out["collectives"] = {}
            for op, c in x["collectives"].items():
                b = y.get("collectives", {}).get(op, {"bytes": 0, "calls": 0})
                out["collectives"][op] = {f: round(c[f] + k * (c[f] - b[f])) for f in ("bytes", "calls")}
        samples.append(out)
    if len(samples) != len(s["samples"]):
        fail("SHORT has samples LONG lacks: profile both on one grid")
    result = {key_: l[key_] for key_ in l if key_ not in ("samples", "fit")}
    result["num_layers"] = a.layers
    result["moe_layers"] = a.moe_layers
    if "latent_bytes_per_token" in l:
        result["latent_bytes_per_token"] = l["latent_bytes_per_token"] // l["num_layers"] * a.layers
    result["extrapolated"] = {"from": [a.short, a.long],
                              "layers": [s["num_layers"], l["num_layers"]]}
    result["samples"] = samples
    text = json.dumps(result, indent=2) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    print(f"profile_layers: {len(samples)} samples extrapolated from {s['num_layers']} and "
          f"{l['num_layers']} to {a.layers} layers ({a.moe_layers} MoE)", file=sys.stderr)


if __name__ == "__main__":
    main()
