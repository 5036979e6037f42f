#!/usr/bin/env python3
"""Compare two directories of named intermediates layer by layer.

Usage:
  python3 tests/parity/compare_intermediates.py DIR_A DIR_B [--rtol 2e-2]

DIR_A and DIR_B hold .npy files named L{layer:02}.{name}.npy (per layer) or {name}.npy (model
level), as `mlaserve generate --dump-tensors` and hf_intermediates.py write them. DIR_B is
the reference: for every tensor present in both, in forward order (layer by layer, each in
the order the model computes them, model-level tensors last), prints the shape, the largest
absolute difference and rel err = ||a - b|| / ||b|| (Frobenius norms), then the first tensor
whose rel err exceeds --rtol: where the two computations part. Exit status 1 if any tensor
exceeds it, differs in shape, holds NaN or infinity, or if the directories share no tensor.

The default rtol, 2e-2, suits a bf16 backend (mlaserve on CUDA) against fp32 (transformers or
mlaserve on the CPU); fp32 against fp32 agrees to about 1e-5. Needs numpy only.
"""

import argparse
import math
import os
import re
import sys

import numpy as np

# Forward order within a layer; names not listed here sort after these, alphabetically.
ORDER = ("attn_norm", "q_nope", "q_rope", "q_absorbed", "latent", "k_rope", "attn_out",
         "ffn_norm", "ffn_out", "layer_out", "final_norm", "logits")
FILE = re.compile(r"^(?:L(\d+)\.)?([a-z0-9_]+)\.npy$")


def scan(d):
    """{(layer, name): path}; layer -1 for model-level tensors."""
    if not os.path.isdir(d):
        sys.exit(f"compare_intermediates: {d} is not a directory")
    found = {}
    for f in os.listdir(d):
        m = FILE.match(f)
        if m:
            found[(int(m.group(1)) if m.group(1) else -1, m.group(2))] = os.path.join(d, f)
    return found


def sort_key(key):
    layer, name = key
    rank = ORDER.index(name) if name in ORDER else len(ORDER)
    return (layer < 0, layer, rank, name)  # model-level tensors after every layer


def label(key):
    layer, name = key
    return ("-" if layer < 0 else str(layer)), name


def compare(a, b):
    """(max abs diff, rel err, problem or None) of a against the reference b."""
    if a.shape != b.shape:
        return math.nan, math.nan, f"shape {a.shape} vs {b.shape}"
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    for which, x in (("A", a64), ("B", b64)):
        if not np.isfinite(x).all():
            return math.nan, math.nan, f"{which} holds NaN or infinity"
    diff = a64 - b64
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    num, den = float(np.linalg.norm(diff)), float(np.linalg.norm(b64))
    rel = num / den if den > 0 else (0.0 if num == 0 else math.inf)
    return max_abs, rel, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir_a", help="the dump under test")
    ap.add_argument("dir_b", help="the reference dump")
    ap.add_argument("--rtol", type=float, default=2e-2,
                    help="largest rel err ||a-b||/||b|| allowed (default 2e-2: bf16 vs fp32)")
    args = ap.parse_args()

    a_files, b_files = scan(args.dir_a), scan(args.dir_b)
    common = sorted(set(a_files) & set(b_files), key=sort_key)
    if not common:
        sys.exit(f"compare_intermediates: {args.dir_a} ({len(a_files)} tensors) and "
                 f"{args.dir_b} ({len(b_files)} tensors) share no tensor name")

    print(f"A = {args.dir_a}\nB = {args.dir_b} (reference)\n")
    print(f"{'layer':>5}  {'name':<12} {'shape':<18} {'max abs diff':>12} {'rel err':>10}")
    first_bad, n_bad = None, 0
    for key in common:
        a, b = np.load(a_files[key]), np.load(b_files[key])
        max_abs, rel, problem = compare(a, b)
        bad = problem is not None or not rel <= args.rtol
        layer, name = label(key)
        shape = "x".join(map(str, b.shape)) or "scalar"
        cells = problem if problem else f"{max_abs:12.4g} {rel:10.3e}"
        print(f"{layer:>5}  {name:<12} {shape:<18} {cells}{'  <-- exceeds' if bad else ''}")
        if bad:
            n_bad += 1
            if first_bad is None:
                first_bad = (key, problem or f"rel err {rel:.3e} > rtol {args.rtol:g}")

    only_a = sorted(set(a_files) - set(b_files), key=sort_key)
    only_b = sorted(set(b_files) - set(a_files), key=sort_key)
    for which, keys in (("A", only_a), ("B", only_b)):
        if keys:
            names = sorted({k[1] for k in keys}, key=lambda n: sort_key((0, n)))
            print(f"\nonly in {which} (not compared): {len(keys)} tensors: {', '.join(names)}")

    print()
    if first_bad:
        (layer, name), why = first_bad
        where = f"layer {layer}" if layer >= 0 else "model level"
        print(f"FAIL: {n_bad} of {len(common)} tensors exceed; first: {name} at {where}: {why}")
        sys.exit(1)
    print(f"OK: {len(common)} tensors within rtol {args.rtol:g}")


if __name__ == "__main__":
    main()
