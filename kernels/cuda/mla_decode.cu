// Absorbed-MLA decode attention: the planner, the split-KV attention kernel (wgmma, sm_90a)
// and the combine kernel behind mla_decode (see mla_decode.h).
//
// Shared-memory tiles (the query tile and each KV page) are [64 rows, 576 bf16] stored as nine
// 64-column blocks of 64 rows x 128 bytes with the 128-byte swizzle (16-byte chunk c of row r
// at chunk c ^ (r % 8)), the layout wgmma reads without bank conflicts. One layout serves the
// KV page twice: as the K-major B operand of S = Q K^T, and, through its first eight blocks, as
// the MN-major B operand of O += P V, so V costs no second load. With fp8 rows there is one bf16
// tile and, where the second KV stage was, two staging slots of 64 x 528 bytes (a page's e4m3
// values and scales): page j + 1 streams into one slot while page j is dequantised from the
// other into the tile, and page j + 2's copy into that slot starts once both warpgroups' S of
// page j is done, so from then on two pages are in flight (the bf16 kernel has one). The rotary
// values, bf16 already, go straight into the tile's last column block at the same point.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cp_async.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/fp8_latent.cuh"
#include "kernels/cuda/mla_decode.h"
#include "kernels/cuda/mla_decode_common.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace mla::cuda {
namespace {

using namespace mla_decode_internal;

constexpr int kPBytes = kTileRows * kBlock * 2;           // P tile [64, 64] bf16
constexpr int kRowStatBytes = 2 * kTileRows * 4;          // one float per warpgroup and row
constexpr int kFp8StageBytes = kBlock * kFp8LatentBytes;  // a staged fp8 page, 33,792
// Q, two KV stages (fp8: one, then two staging slots), P, the row maxima and row sums; +1024 to
// align the base to the swizzle atom.
template <bool kFp8>
constexpr int kPOffset = kFp8 ? 2 * kTileBytes + 2 * kFp8StageBytes : 3 * kTileBytes;
template <bool kFp8>
constexpr int kSmemBytes = kPOffset<kFp8> + kPBytes + 2 * kRowStatBytes + 1024;
static_assert(kSmemBytes<true> <= kSmemBytes<false>, "the fp8 layout fits where bf16's does");
// Planner cost of one piece of a sequence beyond its KV tiles (query load, pipeline fill,
// writing the output), in tiles: about one tile's load time plus the output write on an H100.
// (FlashMLA's 5 timed the same here within noise.)
constexpr int kPieceOverhead = 2;
// The planner keeps the batch's cost prefix sums in shared memory.
constexpr int32_t kMaxBatch = 50000;
constexpr int kPlanThreads = 1024;
constexpr int kCombineRowsPerBlock = 8;  // one warp per query row
constexpr int kCombineColumnSplit = 4;   // and per quarter of its 512 columns

constexpr size_t round256(size_t n) { return (n + 255) / 256 * 256; }

int32_t row_tiles(int32_t s_q, int32_t heads) { return (s_q * heads + kTileRows - 1) / kTileRows; }

// CTAs of one part (one per row tile) run side by side on the same pages, so the parts times
// the row tiles make about one wave.
int32_t num_parts(int32_t s_q, int32_t heads, int num_sms) {
  return std::max(1, num_sms / row_tiles(s_q, heads));
}

struct WorkspaceLayout {
  size_t plan, split_prefix, lse_part, o_part, total;
};

WorkspaceLayout workspace_layout(int32_t batch, int32_t s_q, int32_t heads, int num_sms) {
  const size_t parts = num_parts(s_q, heads, num_sms);
  const size_t pieces = static_cast<size_t>(batch) + parts;  // each part boundary adds <= 1
  const size_t rows = static_cast<size_t>(s_q) * heads;
  WorkspaceLayout l{};
  l.plan = 0;
  l.split_prefix = l.plan + round256(parts * sizeof(PartPlan));
  l.lse_part = l.split_prefix + round256((batch + 1) * sizeof(int32_t));
  l.o_part = l.lse_part + round256(pieces * rows * sizeof(float));
  l.total = l.o_part + round256(pieces * rows * kDc * sizeof(float));
  return l;
}

// ---------------------------------------------------------------------------------------------
// Planner

__device__ __forceinline__ int32_t seq_tiles(const int32_t* num_keys, int32_t b, int32_t s_q) {
  // A sequence with no keys still gets one (empty) tile: its piece writes out = 0, lse = -inf.
  return max(1, (num_keys[b * s_q + s_q - 1] + kBlock - 1) / kBlock);
}

// Inclusive prefix sum over the block; `total` receives the block's sum. Ends synchronised.
__device__ int32_t block_inclusive_scan(int32_t v, int32_t* warp_sums, int32_t* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int d = 1; d < 32; d *= 2) {
    const int32_t up = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += up;
  }
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x / 32;
    int32_t w = lane < nwarps ? warp_sums[lane] : 0;
    for (int d = 1; d < 32; d *= 2) {
      const int32_t up = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += up;
    }
    if (lane < nwarps) warp_sums[lane] = w;
    if (lane == nwarps - 1) *total = w;
  }
  __syncthreads();
  if (warp > 0) v += warp_sums[warp - 1];
  __syncthreads();
  return v;
}

// Cost of sequence b is its tiles plus kPieceOverhead; the batch's total cost T is cut at
// multiples of Q = ceil(T / parts). A cut at cost x falls in the sequence b with
// cost_prefix[b] <= x < cost_prefix[b + 1], at tile max(0, x - cost_prefix[b] - overhead): cuts
// inside a sequence's overhead move to its start, so every piece holds at least one tile and
// the pieces of a sequence are counted in closed form.
__device__ void cut_position(const int32_t* cost_prefix, int32_t batch, int32_t total, int32_t x,
                             int32_t* seq, int32_t* block) {
  if (x >= total) {
    *seq = batch;
    *block = 0;
    return;
  }
  int32_t lo = 0, hi = batch - 1;  // largest b with cost_prefix[b] <= x
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (cost_prefix[mid] <= x) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  *seq = lo;
  *block = max(0, x - cost_prefix[lo] - kPieceOverhead);
}

__global__ void __launch_bounds__(kPlanThreads)
    mla_decode_plan_kernel(const int32_t* num_keys, int32_t batch, int32_t s_q, int32_t parts,
                           Workspace ws) {
  extern __shared__ int32_t cost_prefix[];  // [batch + 1]: cost of the sequences before b
  __shared__ int32_t warp_sums[32];
  __shared__ int32_t block_total;
  const int tid = threadIdx.x;
  wait_for_prerequisite();  // launched as a dependent: num_keys
  allow_dependent_launch();

  int32_t carry = 0;
  if (tid == 0) cost_prefix[0] = 0;
  for (int32_t base = 0; base < batch; base += blockDim.x) {
    const int32_t b = base + tid;
    const int32_t cost = b < batch ? seq_tiles(num_keys, b, s_q) + kPieceOverhead : 0;
    const int32_t incl = block_inclusive_scan(cost, warp_sums, &block_total);
    if (b < batch) cost_prefix[b + 1] = carry + incl;
    carry += block_total;
    __syncthreads();
  }
  const int32_t total = carry;
  const int32_t per_part = (total + parts - 1) / parts;

  // Pieces of sequence b: one, plus one per cut strictly inside its tiles, i.e. per multiple of
  // per_part in (cost_prefix[b] + overhead, cost_prefix[b + 1] - 1].
  carry = 0;
  if (tid == 0) ws.split_prefix[0] = 0;
  for (int32_t base = 0; base < batch; base += blockDim.x) {
    const int32_t b = base + tid;
    int32_t pieces = 0;
    if (b < batch) {
      pieces =
          1 + (cost_prefix[b + 1] - 1) / per_part - (cost_prefix[b] + kPieceOverhead) / per_part;
    }
    const int32_t incl = block_inclusive_scan(pieces, warp_sums, &block_total);
    if (b < batch) ws.split_prefix[b + 1] = carry + incl;
    carry += block_total;
    __syncthreads();
  }

  for (int32_t part = tid; part < parts; part += blockDim.x) {
    PartPlan plan{};
    const int32_t x0 = part * per_part;
    cut_position(cost_prefix, batch, total, x0, &plan.begin_seq, &plan.begin_block);
    cut_position(cost_prefix, batch, total, min(x0 + per_part, total), &plan.end_seq,
                 &plan.end_block);
    // Cuts inside begin_seq's tiles before and at x0 each started one earlier piece.
    plan.begin_split =
        plan.begin_block > 0 ? part - (cost_prefix[plan.begin_seq] + kPieceOverhead) / per_part : 0;
    ws.plan[part] = plan;
  }
}

// ---------------------------------------------------------------------------------------------
// Split-KV attention

// One CTA per (row tile, part): runs the part's pieces one after another. Per KV tile, each
// warpgroup computes S for its 32 of the 64 keys (all 64 rows); the warpgroups swap row maxima
// through shared memory, write their halves of P (bf16) there, and each then accumulates its
// 256 output columns over all 64 keys. The next page streams in (cp.async) meanwhile.
template <LatentElement kElement>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_split_kernel(const MlaDecodeParams p, const Workspace ws) {
  constexpr bool kFp8 = kElement == LatentElement::kFp8;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t pad = ((raw + 1023) & ~1023u) - raw;  // swizzle atoms are 1024-byte aligned
  uint8_t* smem = smem_raw + pad;
  const uint32_t q_tile = raw + pad;
  const uint32_t kv_tiles = q_tile + kTileBytes;
  const uint32_t staging = q_tile + 2 * kTileBytes;  // fp8: two slots of kFp8StageBytes
  const uint32_t p_tile = q_tile + kPOffset<kFp8>;
  uint8_t* p_bytes = smem + kPOffset<kFp8>;
  float* row_max = reinterpret_cast<float*>(p_bytes + kPBytes);  // [warpgroup][64]
  float* row_sum = row_max + 2 * kTileRows;                      // [warpgroup][64]

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int lane = tid % 32, g = lane / 4, t = lane % 4;
  // wgmma accumulator layout: warp w of a warpgroup holds rows 16w + g and 16w + g + 8; value
  // 4j + e (e < 2) is column 8j + 2t + e of the first row, 4j + 2 + e of the second.
  const int r0 = 16 * ((tid / 32) % 4) + g, r1 = r0 + 8;

  const int32_t rows = p.s_q * p.heads;
  const int32_t tile_row0 = blockIdx.x * kTileRows;
  const int32_t rg0 = tile_row0 + r0, rg1 = tile_row0 + r1;
  const float scale_log2 = p.scale * kLog2e;
  wait_for_prerequisite();  // the plan
  allow_dependent_launch();
  const PartPlan plan = ws.plan[blockIdx.y];

  float s[16];
  float o[128];
#pragma unroll
  for (int i = 0; i < 16; ++i) s[i] = 0.0f;

  for (int32_t b = plan.begin_seq, lo = plan.begin_block;
       b < plan.end_seq || (b == plan.end_seq && lo < plan.end_block); ++b, lo = 0) {
    const SeqPiece piece = seq_piece(p, plan, b, rg0, rg1);
    const int32_t max_keys = piece.max_keys, hi = piece.hi, keys0 = piece.keys0,
                  keys1 = piece.keys1, keys_lo = piece.keys_lo;
    const int32_t* pages = piece.pages;

    // Only entries that hold keys are read: the rest of the table may be garbage.
    const auto* pool = static_cast<const uint8_t*>(p.pool);
    auto valid_keys = [&](int32_t blk) { return max(0, min(kBlock, max_keys - blk * kBlock)); };
    auto page_rows = [&](int32_t blk) {
      constexpr int64_t kPageLayerBytes = int64_t{kBlock} * (kFp8 ? kFp8RowBytes : kRowBytes);
      return valid_keys(blk) > 0
                 ? pool +
                       (static_cast<int64_t>(pages[blk]) * p.num_layers + p.layer) * kPageLayerBytes
                 : pool;
    };
    auto load_kv = [&](int32_t blk, int stage) {  // bf16
      load_tile(kv_tiles + stage * kTileBytes,
                reinterpret_cast<const __nv_bfloat16*>(page_rows(blk)), valid_keys(blk));
    };
    auto load_latent = [&](int32_t blk, int slot) {  // fp8: e4m3 values and scales, staged
      fp8_rows_load<kThreads, kFp8LatentBytes>(staging + slot * kFp8StageBytes, page_rows(blk),
                                               valid_keys(blk));
    };
    auto load_rope = [&](int32_t blk) {  // fp8: the rotary values, into the tile
      fp8_rope_load<kThreads>(kv_tiles, page_rows(blk), valid_keys(blk),
                              [](int r, int c) { return swizzled(r, c); });
    };

    __syncthreads();  // the previous piece is done with shared memory
    load_tile(q_tile, p.q + (static_cast<int64_t>(b) * rows + tile_row0) * kWidth,
              min(kTileRows, rows - tile_row0));
    if constexpr (kFp8) {
      // Groups in flight at the top of tile j: [latent j] [rope j] [latent j + 1], each possibly
      // empty; the top waits for all but the last.
      load_latent(lo, 0);
      load_rope(lo);
      cp_async_commit();
      if (lo + 1 < hi) load_latent(lo + 1, 1);
      cp_async_commit();
    } else {
      load_kv(lo, 0);
      cp_async_commit();
    }

    // Per row: the exponent base m (in units of scale * log2(e) * score; within
    // kRescaleSlack of the running maximum), the partial sum of weights over this warpgroup's
    // keys, and O, all relative to 2^m.
    float m0 = kNegInf, m1 = kNegInf, l0 = 0.0f, l1 = 0.0f;
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.0f;

    // S = Q K^T for keys [32 wg, 32 wg + 32) of the tile at `kv`.
    auto issue_s = [&](uint32_t kv) {
      wgmma_fence();
      fence_regs(s);
#pragma unroll
      for (int ks = 0; ks < kWidth / 16; ++ks) {
        const uint32_t off = (ks / 4) * kColBlockBytes + (ks % 4) * 32;
        wgmma_m64n32k16(s, sw128_desc(q_tile + off, 16, 1024),
                        sw128_desc(kv + wg * 32 * 128 + off, 16, 1024), ks > 0);
      }
      wgmma_commit();
    };
    // O[:, 256 wg + (0..255)] += P V: V is column blocks 4 wg .. 4 wg + 3 of the tile at `kv`,
    // read MN-major (blocks 8192 bytes apart, groups of 8 keys 1024 bytes apart).
    auto issue_pv = [&](uint32_t kv) {
      wgmma_fence();
      fence_regs(o);
#pragma unroll
      for (int kk = 0; kk < kBlock / 16; ++kk) {
        wgmma_m64n256k16_mn(
            o, sw128_desc(p_tile + kk * 32, 16, 1024),
            sw128_desc(kv + 4 * wg * kColBlockBytes + kk * 16 * 128, kColBlockBytes, 1024));
      }
      wgmma_commit();
    };

    for (int32_t blk = lo; blk < hi; ++blk) {
      const int stage = kFp8 ? 0 : (blk - lo) & 1;
      const int slot = (blk - lo) & 1;  // fp8: the staging slot holding page blk
      const uint32_t kv = kv_tiles + stage * kTileBytes;
      if constexpr (kFp8) {
        cp_async_wait<1>();  // page blk's latent and rotary values; page blk + 1 may stream on
      } else {
        cp_async_wait<0>();
      }
      fence_async_shared();
      // Tile blk has landed for every thread, and every warpgroup's wgmma on the other stage
      // (the previous tile) has completed, so the next page may overwrite it.
      __syncthreads();
      if constexpr (kFp8) {
        // The bf16 tile's last reader (P V of tile blk - 1) has completed too.
        fp8_page_dequantize<kThreads, kFp8LatentBytes>(
            smem + 2 * kTileBytes + slot * kFp8StageBytes, smem + kTileBytes,
            [](int r, int c) { return swizzled(r, c); });
        fence_async_shared();
        __syncthreads();  // the tile is whole, and the slot free for page blk + 2
      }
      // S first: the tensor cores start on it while the threads issue the next page's copies
      // (bf16; fp8 issues its copies after the row-maximum exchange below). (Issuing P V of
      // tile blk - 1 next to S instead, to close the remaining gap, measured 10% slower at 128
      // heads: the next page then starts loading too late.)
      issue_s(kv);
      if constexpr (!kFp8) {
        if (blk + 1 < hi) load_kv(blk + 1, stage ^ 1);
        cp_async_commit();
      }
      wgmma_wait<0>();
      fence_regs(s);

      float mx0, mx1;
      mask_and_max(s, blk * kBlock + 32 * wg + 2 * t, keys0, keys1, (blk + 1) * kBlock > keys_lo,
                   &mx0, &mx1);
      if (t == 0) {
        row_max[wg * kTileRows + r0] = mx0;
        row_max[wg * kTileRows + r1] = mx1;
      }
      __syncthreads();
      if constexpr (kFp8) {
        // Both warpgroups' S are done with the tile's rotary block (P V reads only the eight
        // blocks before it), and the dequantisation with this slot.
        if (blk + 1 < hi) load_rope(blk + 1);
        cp_async_commit();
        if (blk + 2 < hi) load_latent(blk + 2, slot);
        cp_async_commit();
      }
      // The exponent base m moves only when the tile's maximum passes it by more than
      // kRescaleSlack (weights then stay <= 2^kRescaleSlack, harmless in fp32 and bf16), so O
      // is rarely rescaled. Both warpgroups decide from the same values, so their O halves
      // and partial sums stay on one base.
      const float tile0 = fmaxf(row_max[r0], row_max[kTileRows + r0]) * scale_log2;
      const float tile1 = fmaxf(row_max[r1], row_max[kTileRows + r1]) * scale_log2;
      float alpha0 = 1.0f, alpha1 = 1.0f;
      if (tile0 > m0 + kRescaleSlack) {
        alpha0 = fast_exp2(m0 - tile0);
        m0 = tile0;
      }
      if (tile1 > m1 + kRescaleSlack) {
        alpha1 = fast_exp2(m1 - tile1);
        m1 = tile1;
      }
      float sum0, sum1;
      exp2_rows(s, m0, m1, scale_log2, &sum0, &sum1);
      l0 = l0 * alpha0 + sum0;
      l1 = l1 * alpha1 + sum1;
      rescale(o, alpha0, alpha1);
      // P [64 rows, 64 keys] bf16, K-major and swizzled like one 64-column block of a tile.
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int chunk = 4 * wg + j;
        *reinterpret_cast<__nv_bfloat162*>(p_bytes + r0 * 128 + ((chunk ^ g) << 4) + 4 * t) =
            __floats2bfloat162_rn(s[4 * j], s[4 * j + 1]);
        *reinterpret_cast<__nv_bfloat162*>(p_bytes + r1 * 128 + ((chunk ^ g) << 4) + 4 * t) =
            __floats2bfloat162_rn(s[4 * j + 2], s[4 * j + 3]);
      }
      fence_async_shared();
      __syncthreads();
      issue_pv(kv);
      wgmma_wait<0>();
      fence_regs(o);
    }

    store_piece(p, ws, plan, b, m0, m1, l0, l1, o, row_sum);
  }
}

// ---------------------------------------------------------------------------------------------
// Combine

// One warp per (sequence, query row, quarter of the 512 columns) of a split sequence:
// out = sum over pieces of exp(lse_piece - lse) * o_piece, lse = ln sum exp(lse_piece).
// Sequences in one piece were written by the split kernel. Quarters give a batch of one long
// sequence enough warps to read its many pieces in parallel.
__global__ void __launch_bounds__(kCombineRowsPerBlock * 32)
    mla_decode_combine_kernel(const MlaDecodeParams p, const Workspace ws) {
  wait_for_prerequisite();   // the pieces
  allow_dependent_launch();  // the next product may load its weights
  const int32_t b = blockIdx.x;
  const int32_t rows = p.s_q * p.heads;
  const int32_t row = blockIdx.y * kCombineRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int col = blockIdx.z * (kDc / kCombineColumnSplit) + 4 * lane;
  const int32_t first = ws.split_prefix[b];
  const int32_t pieces = ws.split_prefix[b + 1] - first;
  if (row >= rows || pieces <= 1) return;

  const float* lse_part = ws.lse_part + static_cast<int64_t>(first) * rows + row;
  float mx = kNegInf;
  for (int32_t i = lane; i < pieces; i += 32) mx = fmaxf(mx, lse_part[int64_t{i} * rows]);
  for (int d = 16; d > 0; d /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, d));
  float sum = 0.0f;
  if (mx != kNegInf) {
    for (int32_t i = lane; i < pieces; i += 32) sum += expf(lse_part[int64_t{i} * rows] - mx);
  }
  for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, d);
  const float lse = mx == kNegInf ? kNegInf : mx + logf(sum);

  float4 acc = {};
  if (lse != kNegInf) {
    const float* o_part = ws.o_part + (static_cast<int64_t>(first) * rows + row) * kDc + col;
    for (int32_t i = 0; i < pieces; ++i) {
      const float w = expf(lse_part[int64_t{i} * rows] - lse);
      const float4 v = *reinterpret_cast<const float4*>(o_part + int64_t{i} * rows * kDc);
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
  }
  __nv_bfloat162* out =
      reinterpret_cast<__nv_bfloat162*>(p.out + (static_cast<int64_t>(b) * rows + row) * kDc + col);
  out[0] = __floats2bfloat162_rn(acc.x, acc.y);
  out[1] = __floats2bfloat162_rn(acc.z, acc.w);
  if (blockIdx.z == 0 && lane == 0) p.lse[static_cast<int64_t>(b) * rows + row] = lse;
}

bool aligned(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

}  // namespace

size_t mla_decode_workspace_bytes(int32_t max_batch, int32_t s_q, int32_t heads, int num_sms) {
  MLA_REQUIRE(max_batch >= 0 && s_q >= 1 && heads >= 1 && num_sms >= 1,
              "mla_decode_workspace_bytes: bad shape (max_batch {}, s_q {}, heads {}, num_sms {})",
              max_batch, s_q, heads, num_sms);
  return workspace_layout(max_batch, s_q, heads, num_sms).total;
}

void mla_decode(const MlaDecodeParams& p, void* workspace, cudaStream_t stream) {
  // Check shapes
  MLA_REQUIRE(p.batch >= 0 && p.batch <= kMaxBatch, "mla_decode: batch {} outside [0, {}]", p.batch,
              kMaxBatch);
  MLA_REQUIRE(p.s_q >= 1 && p.s_q <= 4, "mla_decode: s_q must be in [1, 4], got {}", p.s_q);
  MLA_REQUIRE(p.heads >= 1, "mla_decode: heads {} < 1", p.heads);
  MLA_REQUIRE(p.num_layers >= 1 && p.layer >= 0 && p.layer < p.num_layers,
              "mla_decode: layer {} outside [0, {})", p.layer, p.num_layers);
  MLA_REQUIRE(p.table_stride >= 1, "mla_decode: table_stride {} < 1", p.table_stride);
  MLA_REQUIRE(p.num_sms >= 1, "mla_decode: num_sms {} < 1", p.num_sms);
  MLA_REQUIRE(std::isfinite(p.scale) && p.scale > 0.0f, "mla_decode: scale {} must be > 0",
              p.scale);
  if (p.batch == 0) return;
  // Check layout
  MLA_REQUIRE(p.q && p.pool && p.block_table && p.num_keys && p.out && p.lse && workspace,
              "mla_decode: null pointer");
  MLA_REQUIRE(aligned(p.q, 16) && aligned(p.pool, 16) && aligned(p.out, 16),
              "mla_decode: q, pool and out must be 16-byte aligned");
  MLA_REQUIRE(aligned(workspace, 256), "mla_decode: workspace must be 256-byte aligned");
  MLA_REQUIRE(p.element == LatentElement::kBf16 || p.element == LatentElement::kFp8,
              "mla_decode: unknown pool element {}", static_cast<int>(p.element));
  MLA_REQUIRE(p.kernel == MlaDecodeKernel::kAuto || p.kernel == MlaDecodeKernel::kSplitKeys ||
                  p.kernel == MlaDecodeKernel::kPairedTiles,
              "mla_decode: unknown kernel {}", static_cast<int>(p.kernel));

  const int32_t parts = num_parts(p.s_q, p.heads, p.num_sms);
  const WorkspaceLayout layout = workspace_layout(p.batch, p.s_q, p.heads, p.num_sms);
  char* base = static_cast<char*>(workspace);
  const Workspace ws{reinterpret_cast<PartPlan*>(base + layout.plan),
                     reinterpret_cast<int32_t*>(base + layout.split_prefix),
                     reinterpret_cast<float*>(base + layout.lse_part),
                     reinterpret_cast<float*>(base + layout.o_part)};

  if (!p.reuse_plan) {
    const int plan_smem = (p.batch + 1) * static_cast<int>(sizeof(int32_t));
    MLA_CUDA_CHECK(cudaFuncSetAttribute(mla_decode_plan_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, plan_smem));
    launch_dependent(mla_decode_plan_kernel, 1, kPlanThreads, plan_smem, stream, true, p.num_keys,
                     p.batch, p.s_q, parts, ws);
  }
  const bool fp8 = p.element == LatentElement::kFp8;
  const dim3 grid(row_tiles(p.s_q, p.heads), parts);
  // bf16: paired tiles unless asked otherwise; on an H100 it was never slower than split keys and
  // 1.3-1.5x faster where the tensor cores bound the time (docs/BENCHMARKS.md).
  if (!fp8 && p.kernel != MlaDecodeKernel::kSplitKeys) {
    launch_mla_decode_paired(p, ws, grid, stream);
  } else {
    auto* split = fp8 ? mla_decode_split_kernel<LatentElement::kFp8>
                      : mla_decode_split_kernel<LatentElement::kBf16>;
    const int smem = fp8 ? kSmemBytes<true> : kSmemBytes<false>;
    MLA_CUDA_CHECK(cudaFuncSetAttribute(split, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    launch_dependent(split, grid, kThreads, smem, stream, true, p, ws);
  }
  launch_dependent(
      mla_decode_combine_kernel,
      dim3(p.batch, (p.s_q * p.heads + kCombineRowsPerBlock - 1) / kCombineRowsPerBlock,
           kCombineColumnSplit),
      kCombineRowsPerBlock * 32, 0, stream, true, p, ws);
}

}  // namespace mla::cuda
