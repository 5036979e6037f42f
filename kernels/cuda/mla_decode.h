// Absorbed-MLA decode attention over the paged latent cache, on the GPU (sm_90a): for query
// token i of sequence b and head h,
//   s_j = scale * (q[b,i,h,0:512] . c_j + q[b,i,h,512:576] . kr_j)   for keys j < num_keys[b,i]
//   out[b,i,h] = sum_j softmax(s)_j c_j (512 values),  lse[b,i,h] = ln sum_j exp(s_j)
// where key j of sequence b is row j % 64 of page block_table[b][j / 64] (c = its first 512
// values, kr = the last 64). Equals mla::cpu::latent_attention up to bf16 rounding. The pool
// rows are bf16 or packed fp8 (kernels/cuda/fp8_latent.h): an fp8 page's e4m3 values and scales
// are staged in shared memory (two pages in flight) and dequantised there into the bf16 tile
// the tensor cores read, its rotary values copied into the tile as they are, so an fp8 cache
// moves 656 bytes a key instead of 1,152.
//
// Three kernels on one stream, like FlashMLA's decode: a planner reads num_keys on the device
// and cuts the batch's total KV work into equal parts, one per group of SMs (so one long
// sequence and many short ones both fill the GPU); the split-KV kernel runs each part with
// tensor cores (wgmma), every 64-row tile of a sequence's (s_q x heads) query rows sharing each
// KV page it loads (on bf16 pages by default the paired-tile kernel, see MlaDecodeKernel); a
// combine kernel merges the parts of sequences that were split, by LSE.
// Grid sizes depend only on batch, s_q, heads and num_sms, so the launch can be captured in a
// CUDA graph and replayed with new num_keys and block tables. Results are deterministic (no
// atomics): the same inputs give bit-identical outputs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/fp8_latent.h"

namespace mla::cuda {

inline constexpr int32_t kMlaDecodeBlockSize = 64;   // tokens per cache page
inline constexpr int32_t kMlaDecodeLatentDim = 512;  // d_c (kv_lora_rank)
inline constexpr int32_t kMlaDecodeRopeDim = 64;     // d_r (qk_rope_head_dim)

// The split-KV kernel for bf16 pages. kSplitKeys: both warpgroups take every KV tile, each
// computing S for half its keys, then the softmax together and each its half of O. kPairedTiles:
// each warpgroup computes S for a tile of its own (tiles go in pairs) and its half of O from
// both, one warpgroup's softmax overlapping the other's products. fp8 pages always run
// kSplitKeys.
enum class MlaDecodeKernel : int32_t { kAuto, kSplitKeys, kPairedTiles };

struct MlaDecodeParams {
  // [batch, s_q, heads, 576]: absorbed query (512) then rotary part (64), contiguous
  const __nv_bfloat16* q;
  // [num_pages, num_layers, 64, row bytes]: the paged latent cache, all layers; rows of
  // `layer` in page p start at byte ((p * num_layers + layer) * 64) * row bytes (1,152 for bf16
  // rows, 656 for fp8).
  const void* pool;
  LatentElement element;
  int32_t layer, num_layers;
  // [batch, table_stride]: page ids of each sequence in key order; entries past the pages that
  // hold the sequence's keys are garbage (may be out of range) and are never read.
  const int32_t* block_table;
  int32_t table_stride;
  // [batch, s_q]: keys query i of sequence b attends (its first num_keys rows, in order: key j
  // is row j % 64 of page block_table[b][j / 64]); may be 0, then out = 0 and lse = -inf for
  // that query; non-decreasing in i.
  const int32_t* num_keys;
  // s_q in [1, 4] (decode, and up to three speculated tokens a step); heads any value >= 1
  // (e.g. 1, 8, 16, 32, 64, 128)
  int32_t batch, s_q, heads;
  float scale;         // softmax scale applied to the dot products; > 0
  __nv_bfloat16* out;  // [batch, s_q, heads, 512]
  float* lse;          // [batch, s_q, heads]: natural log of the sum of exp(scaled scores)
  // The SMs to spread the work over: the value given to mla_decode_workspace_bytes (usually
  // the device's multiprocessor count).
  int32_t num_sms;
  // true: skip the planner and use the plan already in `workspace`, left there by an earlier
  // call with the same batch, s_q, heads, num_sms and num_keys contents whose workspace has not
  // been touched since (e.g. the previous layer of the same decode step: every layer shares
  // one plan). Saves one kernel (about 5 us on an H100) per layer after the first.
  bool reuse_plan;
  // kAuto (the default): kPairedTiles on bf16 pages (on an H100 as fast or faster at every
  // batch-128 shape timed, up to 1.5x where the tensor cores bound the time).
  MlaDecodeKernel kernel;
};

// Bytes of device workspace mla_decode needs for any batch <= max_batch with these s_q, heads
// and num_sms (the split plan and the fp32 partial outputs of split sequences):
//   parts = max(1, num_sms / ceil(s_q * heads / 64)),  rows = s_q * heads
//   32 * parts + 4 * (max_batch + 1) + (max_batch + parts) * rows * (512 + 1) * 4 bytes,
//   each of the four sections rounded up to 256 bytes. max_batch <= 50000.
size_t mla_decode_workspace_bytes(int32_t max_batch, int32_t s_q, int32_t heads, int num_sms);

// Computes out and lse for every query of the batch. `workspace` (device memory, 256-byte
// aligned, mla_decode_workspace_bytes(batch, s_q, heads, num_sms) bytes or more) is scratch
// owned by this call until the stream reaches its end. q, pool and out must be 16-byte
// aligned. Never synchronises; graph-capturable.
void mla_decode(const MlaDecodeParams& p, void* workspace, cudaStream_t stream);

}  // namespace mla::cuda
