// Device-side reading and writing of the packed fp8 latent row (kernels/cuda/fp8_latent.h):
// one value, a whole row quantised by a block, and the tuned kernels' page staging (cp.async of
// 64 packed rows, or their e4m3 values and scales with the rotary values copied straight into
// the tile, into shared memory, then dequantised into the bf16 tile their tensor cores read).
// Include from .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <cstring>

#include "kernels/cpu/fp8_group.h"
#include "kernels/cuda/cp_async.cuh"
#include "kernels/cuda/fp8_dots.cuh"
#include "kernels/cuda/fp8_latent.h"

namespace mla::cuda {

// Value i (< d_c + d_r) of a packed row, as cpu::dequantize_latent_fp8 reads it.
__device__ __forceinline__ float fp8_latent_value(const uint8_t* row, const cpu::Fp8LatentRow& f,
                                                  int32_t i) {
  if (i < f.d_c) {
    const float scale =
        *reinterpret_cast<const float*>(row + f.scales_offset() + 4 * (i / f.kGroup));
    return fp8x2_to_float2(row[i]).x * scale;
  }
  return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row + f.rope_offset())[i - f.d_c]);
}

// Quantises group g of c (values x[0, n), n <= 128, in shared or global memory) into row, as
// cpu::quantize_group_fp8 does, by one warp: the scale is amax / 448 (1 for an all-zero group).
__device__ __forceinline__ void fp8_latent_quantize_group(const float* x, int n, uint8_t* q,
                                                          float* scale_out, int lane) {
  float amax = 0.0f;
  for (int j = lane; j < n; j += 32) amax = fmaxf(amax, fabsf(x[j]));
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  const float s = amax > 0.0f ? amax / cpu::kFp8Max : 1.0f;
  for (int j = lane; j < n; j += 32) {
    q[j] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(x[j] / s, __NV_SATFINITE, __NV_E4M3));
  }
  if (lane == 0) *scale_out = s;
}

// The tuned kernels' rows: d_c 512, d_r 64.
inline constexpr cpu::Fp8LatentRow kFp8Row576{.d_c = 512, .d_r = 64};
inline constexpr int kFp8RowBytes = static_cast<int>(kFp8Row576.bytes());  // 656
static_assert(kFp8RowBytes % 16 == 0, "packed rows are whole 16-byte chunks");

// The bytes of a packed row before its rotary values: the e4m3 values and their scales (528).
inline constexpr int kFp8LatentBytes = static_cast<int>(kFp8Row576.rope_offset());
static_assert(kFp8LatentBytes % 16 == 0, "the rotary values start on a 16-byte chunk");

// Starts copying the first kBytes of rows [0, valid_rows) of a page (64 packed rows at `src`,
// 656 bytes apart) into the staging area at `dst` (a smem_addr; rows kBytes apart): kBytes
// kFp8RowBytes stages whole rows, kFp8LatentBytes all but the rotary values. Rows past
// valid_rows are zero-filled, so they dequantise to zeros (e4m3 0 times scale 0). `src` must be
// a valid address even when no row is (a masked copy reads 0 bytes from it; the mask picks the
// offset, not the pointer, which keeps the addresses cheap). The caller commits and waits.
template <int kThreads, int kBytes>
__device__ __forceinline__ void fp8_rows_load(uint32_t dst, const uint8_t* src, int valid_rows) {
  static_assert(kBytes % 16 == 0 && kBytes <= kFp8RowBytes);
  constexpr int kChunks = kBytes / 16;
#pragma unroll 1
  for (int i = threadIdx.x; i < 64 * kChunks; i += kThreads) {
    // i >= 0: an unsigned division by the constant needs no sign fix-up. Chunk i - r * kChunks
    // of row r is at r * kFp8RowBytes + (i - r * kChunks) * 16 in the page.
    const int r = static_cast<int>(static_cast<uint32_t>(i) / kChunks);
    const bool ok = r < valid_rows;
    cp_async_16(dst + i * 16, src + (ok ? (i + r * (kFp8RowBytes / 16 - kChunks)) * 16 : 0), ok);
  }
}

// Starts copying the rotary values (bf16 already) of rows [0, valid_rows) of a page straight
// into a bf16 tile of 576-value rows at `tile` (a smem_addr): their chunk k (values
// 512 + 8k ..) of row r to tile + offset(r, 64 + k). Rows past valid_rows are zero-filled; `src`
// as fp8_rows_load's.
template <int kThreads, typename Offset>
__device__ __forceinline__ void fp8_rope_load(uint32_t tile, const uint8_t* src, int valid_rows,
                                              Offset offset) {
  // A fixed count of copies per thread (2 for 256 threads; the loop's bound would otherwise be
  // worked out, and the loop unrolled by 4 with a remainder, on every page).
#pragma unroll
  for (int j = 0; j < (64 * 8 + kThreads - 1) / kThreads; ++j) {
    const int i = static_cast<int>(threadIdx.x) + j * kThreads;
    if (64 * 8 % kThreads != 0 && i >= 64 * 8) break;
    const int r = i / 8, k = i % 8;
    const bool ok = r < valid_rows;
    cp_async_16(tile + offset(r, 64 + k),
                src + (ok ? r * kFp8RowBytes + kFp8LatentBytes + k * 16 : 0), ok);
  }
}

// 16 e4m3 values (a 16-byte chunk) times `scale` as 16 bf16 values (two chunks): each product
// in fp32, rounded once to bf16. The pairs of values are the 16-bit halves of the chunk, which
// the e4m3x2 conversion reads in place (a shift of each word for its upper pair otherwise).
__device__ __forceinline__ void fp8x16_scale_to_bf16(uint4 bits, float scale, uint4 (&out)[2]) {
  __nv_fp8x2_storage_t pairs[8];
  memcpy(pairs, &bits, sizeof(pairs));
  uint32_t packed[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float2 v = fp8x2_to_float2(pairs[j]);
    const __nv_bfloat162 b = __floats2bfloat162_rn(v.x * scale, v.y * scale);
    memcpy(&packed[j], &b, sizeof(b));
  }
  out[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  out[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
}

// Dequantises 64 staged rows (kStagedBytes apart at `staged`, shared, as fp8_rows_load left
// them) into a bf16 tile of 576-value rows: 16-byte chunk c (values 8c .. 8c + 7) of row r goes
// to tile + offset(r, c). Values are e4m3 * scale in fp32, rounded once to bf16; with whole
// rows staged the rotary values are copied too (chunks 64 .. 71), else those are left alone.
// A thread takes two chunks an iteration (16 e4m3 values, one 16-byte read, one scale): the
// loop is the fp8 kernels' bottleneck in instructions, and the index, scale and address work
// is then shared by twice the values. Where the pairs of a row divide the threads (the
// decode kernel's staged latent: 32 pairs, 256 threads), a thread takes the same pair of rows
// r, r + kThreads / kPairs, ..., so its addresses are worked out once and then stepped; offset
// must then step by one amount per kThreads / kPairs rows: offset(r + kThreads / kPairs, c) ==
// offset(r, c) + offset(kThreads / kPairs, 0) - offset(0, 0) (true of the 128-byte swizzle
// for a multiple of 8 rows).
template <int kThreads, int kStagedBytes, typename Offset>
__device__ __forceinline__ void fp8_page_dequantize(const uint8_t* staged, uint8_t* tile,
                                                    Offset offset) {
  constexpr bool kRope = kStagedBytes == kFp8RowBytes;
  constexpr int kPairs = kRope ? 576 / 16 : 512 / 16;  // pairs of bf16 chunks written a row
  if constexpr (!kRope && kThreads % kPairs == 0 && 64 % (kThreads / kPairs) == 0) {
    constexpr int kRowStep = kThreads / kPairs;
    constexpr int kStagedStep = kRowStep * kStagedBytes;
    const int p = static_cast<int>(threadIdx.x % kPairs);
    const int r = static_cast<int>(threadIdx.x / kPairs);
    const uint8_t* values = staged + r * kStagedBytes + 16 * p;
    const uint8_t* const end = values + 64 / kRowStep * kStagedStep;
    const uint8_t* scale = staged + r * kStagedBytes + kFp8Row576.scales_offset() + 4 * (p / 8);
    uint8_t* dst0 = tile + offset(r, 2 * p);
    uint8_t* dst1 = tile + offset(r, 2 * p + 1);
    const int tile_step = offset(kRowStep, 0) - offset(0, 0);  // a constant
    // By two: 24 instructions a page fewer than by one; by eight saves 32 more but makes the
    // page loop 300 longer (same 12 spilled bytes, none in the loop, in every case).
#pragma unroll 2
    for (; values != end;
         values += kStagedStep, scale += kStagedStep, dst0 += tile_step, dst1 += tile_step) {
      const uint4 bits = *reinterpret_cast<const uint4*>(values);  // one 16-byte read
      uint4 out[2];
      fp8x16_scale_to_bf16(bits, *reinterpret_cast<const float*>(scale), out);
      *reinterpret_cast<uint4*>(dst0) = out[0];
      *reinterpret_cast<uint4*>(dst1) = out[1];
    }
  } else {
    // Not unrolled: the attention kernels keep their accumulators live across this loop, and an
    // unrolled one spills them.
#pragma unroll 1
    for (int i = threadIdx.x; i < 64 * kPairs; i += kThreads) {
      const int r = i / kPairs, p = i % kPairs, c = 2 * p;
      const uint8_t* row = staged + r * kStagedBytes;
      uint4 out[2];
      if (p < 32) {
        const uint4 bits = *reinterpret_cast<const uint4*>(row + 16 * p);
        const float s = reinterpret_cast<const float*>(row + kFp8Row576.scales_offset())[p / 8];
        fp8x16_scale_to_bf16(bits, s, out);
      } else {
        const auto* rope = reinterpret_cast<const uint4*>(row + kFp8LatentBytes) + (c - 64);
        out[0] = rope[0];
        out[1] = rope[1];
      }
      *reinterpret_cast<uint4*>(tile + offset(r, c)) = out[0];
      *reinterpret_cast<uint4*>(tile + offset(r, c + 1)) = out[1];
    }
  }
}

}  // namespace mla::cuda
