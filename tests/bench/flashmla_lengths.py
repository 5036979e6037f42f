#!/usr/bin/env python3
"""FlashMLA's dense decode on one given batch of sequence lengths (e.g. the unbalanced batch
4641,45118,1730,1696 at s_q 4 and 16 heads that ThunderMLA's write-up times FlashMLA on), timed
as `mlaserve bench-kernels --lengths` times cuda::mla_decode: pages of 64 scattered over the
pool, d 576 / dv 512, causal (query i of s_q sees L - (s_q - 1 - i) keys), CUDA events around
each call with the scheduler metadata kept across calls (as a model's layers share it), median
of --iters after --warmup, the same byte and FLOP accounting. Writes peer_table.py's FlashMLA
format: the device, copy and GEMM ceilings measured in the same process, and a row per
(heads, s_q) keyed by the lengths. Run from a built FlashMLA tree (tests/bench/peer_flashmla.sh
does):

    PYTHONPATH=FLASHMLA_TREE tests/bench/flashmla_lengths.py OUT.json --lengths 4641,45118,1730,1696 \\
        --heads 16 --sq 4
"""
import argparse
import json
import random

import torch
import flash_mla


def median_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def ceilings(dev, warmup, iters):
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / (median_ms(lambda: dst.copy_(src), warmup, iters) * 1e-3) / 1e9
    del src, dst
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    b = torch.randn_like(a)
    gemm_tflops = 2 * n**3 / (median_ms(lambda: a @ b, warmup, iters) * 1e-3) / 1e12
    return copy_gbs, gemm_tflops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--heads", default="16")
    ap.add_argument("--sq", default="4")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    dev = torch.device("cuda:0")
    torch.manual_seed(0)
    copy_gbs, gemm_tflops = ceilings(dev, args.warmup, args.iters)

    pages = [(n + 63) // 64 for n in lengths]
    ids = list(range(sum(pages)))
    random.Random(1).shuffle(ids)
    table = torch.zeros(len(lengths), max(pages), dtype=torch.int32)
    at = 0
    for i, p in enumerate(pages):
        table[i, :p] = torch.tensor(ids[at:at + p], dtype=torch.int32)
        at += p
    table = table.to(dev)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=dev)
    cache = (torch.randn(sum(pages), 64, 1, 576, device=dev) / 10).to(torch.bfloat16)
    rows = []
    for heads in (int(x) for x in args.heads.split(",")):
        for s_q in (int(x) for x in args.sq.split(",")):
            q = (torch.randn(len(lengths), s_q, heads, 576, device=dev) / 10).to(torch.bfloat16)
            # This FlashMLA's metadata object plans on its first call and is reused after.
            meta, _ = flash_mla.get_mla_metadata()
            ms = median_ms(lambda: flash_mla.flash_mla_with_kvcache(
                q, cache, table, seqlens, 512, meta, None, causal=True), args.warmup, args.iters)
            keys = [max(0, n - (s_q - 1 - i)) for n in lengths for i in range(s_q)]
            moved = sum(lengths) * 576 * 2 + len(lengths) * s_q * heads * (576 * 2 + 512 * 2 + 4)
            flops = 2 * heads * sum(keys) * (576 + 512)
            row = dict(lengths=args.lengths, heads=heads, s_q=s_q, us=ms * 1e3,
                       gbs=moved / (ms * 1e-3) / 1e9, tflops=flops / (ms * 1e-3) / 1e12)
            row["of_copy"], row["of_gemm"] = row["gbs"] / copy_gbs, row["tflops"] / gemm_tflops
            rows.append(row)
            print(f"flashmla lengths {args.lengths} heads {heads} s_q {s_q}: {row['us']:.1f} us",
                  flush=True)
    json.dump(dict(device=torch.cuda.get_device_name(0), copy_gbs=copy_gbs,
                   gemm_tflops=gemm_tflops, rows=rows), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
