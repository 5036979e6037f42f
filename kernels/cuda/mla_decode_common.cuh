// What the two split-KV attention kernels behind mla_decode share (mla_decode.cu's, which
// splits each KV tile's keys between its warpgroups, and mla_decode_paired.cu's, which gives
// each warpgroup a tile of its own): the tile geometry, the plan and workspace the planner
// leaves, the swizzled tile layout, what a CTA reads of a sequence, the masking, exponentials
// and rescaling of the online softmax, and how a CTA writes a finished piece. Include from the
// mla_decode .cu files only.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/cp_async.cuh"
#include "kernels/cuda/mla_decode.h"

namespace mla::cuda::mla_decode_internal {

constexpr int kDc = kMlaDecodeLatentDim;                         // 512
constexpr int kWidth = kMlaDecodeLatentDim + kMlaDecodeRopeDim;  // 576 values per latent row
constexpr int kBlock = kMlaDecodeBlockSize;                      // keys per page = per KV tile
constexpr int kTileRows = 64;  // query rows (s_q x heads of one sequence) per CTA: wgmma's M
constexpr int kThreads = 256;  // two warpgroups: each owns 256 of the 512 output columns
constexpr int kRowBytes = kWidth * 2;
constexpr int kChunksPerRow = kRowBytes / 16;           // 72 16-byte chunks
constexpr int kTileChunks = kTileRows * kChunksPerRow;  // 4608
constexpr int kColBlockBytes = 64 * 128;                // one swizzled 64-column block
constexpr int kTileBytes = kTileRows * kRowBytes;       // 9 blocks, 73728
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -INFINITY;
constexpr float kRescaleSlack = 8.0f;  // log2 units: weights up to 256 before O is rescaled

// One part of the batch's KV work: tiles [begin_block, ...) of sequence begin_seq up to (not
// including) tile end_block of sequence end_seq, in (sequence, tile) order. begin_split is the
// index, among its sequence's pieces, of the first piece.
struct PartPlan {
  int32_t begin_seq, begin_block, end_seq, end_block, begin_split;
  int32_t padding[3];  // 32 bytes per part
};

struct Workspace {
  PartPlan* plan;         // [parts]
  int32_t* split_prefix;  // [batch + 1]: pieces of the sequences before b
  float* lse_part;        // [batch + parts, rows]: the pieces' LSE (split sequences only)
  float* o_part;          // [batch + parts, rows, 512]: the pieces' normalised outputs
};

// Byte offset of 16-byte chunk c (0..71) of row r in a swizzled [64, 576] tile.
__device__ __forceinline__ uint32_t swizzled(int r, int c) {
  return (c >> 3) * kColBlockBytes + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Copies rows [0, valid_rows) of a [64, 576] tile whose rows lie 1152 bytes apart from `src`
// into the swizzled tile at `dst`. Rows past valid_rows become zeros rather than stale data:
// masked keys then add 0 * 0 to O, never 0 * NaN. `src` must be a valid address even when no
// row is: a masked copy reads 0 bytes from it. (The mask picks the offset, not the pointer: a
// choice of pointers made the compiler rebuild every chunk's 64-bit address each page, ~140
// instructions more per page in the bf16 kernel's critical path.)
__device__ __forceinline__ void load_tile(uint32_t dst, const __nv_bfloat16* src, int valid_rows) {
  const char* base = reinterpret_cast<const char*>(src);
#pragma unroll
  for (int k = 0; k < kTileChunks / kThreads; ++k) {
    const int i = threadIdx.x + k * kThreads;
    const int r = i / kChunksPerRow, c = i % kChunksPerRow;
    const bool ok = r < valid_rows;
    cp_async_16(dst + swizzled(r, c), base + (ok ? r * kRowBytes + c * 16 : 0), ok);
  }
}

// s <- exp2(s * scale_log2 - base) on rows r0 and r1 of a thread's accumulator of S (bases in
// units of scale * log2(e) * score), and the rows' sums of this thread's values. A row without
// a visible key yet keeps base -inf; its weights, exp2(-inf - 0), are 0.
template <int N>
__device__ __forceinline__ void exp2_rows(float (&s)[N], float base0, float base1, float scale_log2,
                                          float* sum0, float* sum1) {
  const float b0 = base0 == kNegInf ? 0.0f : base0;
  const float b1 = base1 == kNegInf ? 0.0f : base1;
  float x = 0.0f, y = 0.0f;
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[4 * j + e] = fast_exp2(fmaf(s[4 * j + e], scale_log2, -b0));
      s[4 * j + 2 + e] = fast_exp2(fmaf(s[4 * j + 2 + e], scale_log2, -b1));
      x += s[4 * j + e];
      y += s[4 * j + 2 + e];
    }
  }
  *sum0 = x;
  *sum1 = y;
}

// O *= f0 on row r0's values, f1 on row r1's (a warpgroup's 64 x 256 accumulator); skipped when
// no row of the warp moves.
__device__ __forceinline__ void rescale(float (&o)[128], float f0, float f1) {
  if (__any_sync(0xffffffffu, f0 != 1.0f || f1 != 1.0f)) {
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      o[4 * j] *= f0;
      o[4 * j + 1] *= f0;
      o[4 * j + 2] *= f1;
      o[4 * j + 3] *= f1;
    }
  }
}

// What a CTA needs to know of sequence b in its part: its keys, the end of this piece's tiles
// (plan.end_block in the part's last sequence, else the sequence's last tile; a sequence with no
// keys still gets one, empty, tile), the keys its rows rg0 and rg1 (of the CTA's 64) see (0 for
// rows past s_q * heads), the first query's (num_keys is non-decreasing in the query index, so
// a tile wholly below it needs no mask), and its page table.
struct SeqPiece {
  int32_t max_keys, hi, keys0, keys1, keys_lo;
  const int32_t* pages;
};

__device__ __forceinline__ SeqPiece seq_piece(const MlaDecodeParams& p, const PartPlan& plan,
                                              int32_t b, int32_t rg0, int32_t rg1) {
  const int32_t rows = p.s_q * p.heads;
  const int32_t* nk = p.num_keys + b * p.s_q;
  SeqPiece s;
  s.max_keys = nk[p.s_q - 1];
  s.hi = b == plan.end_seq ? plan.end_block : max(1, (s.max_keys + kBlock - 1) / kBlock);
  s.keys0 = rg0 < rows ? nk[rg0 / p.heads] : 0;
  s.keys1 = rg1 < rows ? nk[rg1 / p.heads] : 0;
  s.keys_lo = nk[0];
  s.pages = p.block_table + static_cast<int64_t>(b) * p.table_stride;
  return s;
}

// Masks the keys >= lim0 of row r0 and >= lim1 of row r1 to -inf (when `mask`; a tile whose
// keys are all visible skips it) in a thread's accumulator of S (N / 4 groups of 8 keys, the
// first of this thread's at key0) and returns the two rows' maxima over the quad, of the raw
// scores (scale > 0, so the largest raw score is the largest scaled one).
template <int N>
__device__ __forceinline__ void mask_and_max(float (&s)[N], int32_t key0, int32_t lim0,
                                             int32_t lim1, bool mask, float* mx0, float* mx1) {
  float a = kNegInf, b = kNegInf;
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int32_t key = key0 + 8 * j + e;
      if (mask) {
        if (key >= lim0) s[4 * j + e] = kNegInf;
        if (key >= lim1) s[4 * j + 2 + e] = kNegInf;
      }
      a = fmaxf(a, s[4 * j + e]);
      b = fmaxf(b, s[4 * j + 2 + e]);
    }
  }
  a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 1));
  a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 2));
  b = fmaxf(b, __shfl_xor_sync(0xffffffffu, b, 1));
  b = fmaxf(b, __shfl_xor_sync(0xffffffffu, b, 2));
  *mx0 = a;
  *mx1 = b;
}

// Writes one finished piece of sequence b (query rows [64 blockIdx.x, +64) of it): this thread's
// rows r0 and r1 (of the accumulator layout) over its warpgroup's 256 columns of o, relative to
// 2^m0 and 2^m1, where l0 and l1 are this thread's partial row sums (this warpgroup's share of the
// keys; the quad and the two warpgroups are summed here through row_sum, [2][64] floats of
// shared memory). A sequence in one piece goes to p.out and p.lse, a piece of a split one to
// the workspace for the combine kernel. Synchronises the CTA.
__device__ __forceinline__ void store_piece(const MlaDecodeParams& p, const Workspace& ws,
                                            const PartPlan& plan, int32_t b, float m0, float m1,
                                            float l0, float l1, const float (&o)[128],
                                            float* row_sum) {
  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int lane = tid % 32, g = lane / 4, t = lane % 4;
  const int r0 = 16 * ((tid / 32) % 4) + g, r1 = r0 + 8;
  const int32_t rows = p.s_q * p.heads;
  const int32_t rg0 = blockIdx.x * kTileRows + r0, rg1 = rg0 + 8;
  // Row sums over all keys of the piece: this thread's quad, then both warpgroups.
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  if (t == 0) {
    row_sum[wg * kTileRows + r0] = l0;
    row_sum[wg * kTileRows + r1] = l1;
  }
  __syncthreads();
  const float sum0 = row_sum[r0] + row_sum[kTileRows + r0];
  const float sum1 = row_sum[r1] + row_sum[kTileRows + r1];
  const float inv0 = sum0 > 0.0f ? 1.0f / sum0 : 0.0f;
  const float inv1 = sum1 > 0.0f ? 1.0f / sum1 : 0.0f;
  const float lse0 = sum0 > 0.0f ? (m0 + log2f(sum0)) * kLn2 : kNegInf;
  const float lse1 = sum1 > 0.0f ? (m1 + log2f(sum1)) * kLn2 : kNegInf;

  // A sequence in one piece is final here; the pieces of split ones go to the combine kernel.
  const int32_t first_piece = ws.split_prefix[b];
  const bool whole = ws.split_prefix[b + 1] - first_piece == 1;
  const int64_t out_row =
      whole
          ? static_cast<int64_t>(b) * rows
          : static_cast<int64_t>(first_piece + (b == plan.begin_seq ? plan.begin_split : 0)) * rows;
  const int col0 = 256 * wg + 2 * t;
  if (whole) {
    __nv_bfloat16* out0 = p.out + (out_row + rg0) * kDc + col0;
    __nv_bfloat16* out1 = p.out + (out_row + rg1) * kDc + col0;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      if (rg0 < rows) {
        *reinterpret_cast<__nv_bfloat162*>(out0 + 8 * j) =
            __floats2bfloat162_rn(o[4 * j] * inv0, o[4 * j + 1] * inv0);
      }
      if (rg1 < rows) {
        *reinterpret_cast<__nv_bfloat162*>(out1 + 8 * j) =
            __floats2bfloat162_rn(o[4 * j + 2] * inv1, o[4 * j + 3] * inv1);
      }
    }
  } else {
    float* out0 = ws.o_part + (out_row + rg0) * kDc + col0;
    float* out1 = ws.o_part + (out_row + rg1) * kDc + col0;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      if (rg0 < rows) {
        *reinterpret_cast<float2*>(out0 + 8 * j) =
            make_float2(o[4 * j] * inv0, o[4 * j + 1] * inv0);
      }
      if (rg1 < rows) {
        *reinterpret_cast<float2*>(out1 + 8 * j) =
            make_float2(o[4 * j + 2] * inv1, o[4 * j + 3] * inv1);
      }
    }
  }
  if (wg == 0 && t == 0) {
    float* lse = whole ? p.lse : ws.lse_part;
    if (rg0 < rows) lse[out_row + rg0] = lse0;
    if (rg1 < rows) lse[out_row + rg1] = lse1;
  }
}

// Runs mla_decode_paired.cu's split-KV kernel (bf16 pages) over the plan in ws, one CTA per
// (64-row tile, part) of `grid`, as a dependent launch on `stream`.
void launch_mla_decode_paired(const MlaDecodeParams& p, const Workspace& ws, dim3 grid,
                              cudaStream_t stream);

}  // namespace mla::cuda::mla_decode_internal
