#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cp_async.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/mla_decode.h"
#include "kernels/cuda/mla_decode_fused.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/rope_math.cuh"
#include "kernels/cuda/vec_io.cuh"
#include "kernels/error.h"

namespace mla::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kDc = kMlaDecodeLatentDim, kDr = kMlaDecodeRopeDim, kWidth = kDc + kDr;
constexpr int kDn = kMlaDecodeFusedNopeDim, kDv = kMlaDecodeFusedValueDim;
constexpr int kTile = kMlaDecodeBlockSize;   // keys a pass: one page
constexpr int kRowChunks = kWidth * 2 / 16;  // 16-byte pieces of a cache row
static_assert(kTile == 64, "mla_decode_fused_pages counts pages of 64 keys");
static_assert(kDc == 2 * kThreads, "each thread owns two columns of q~ and o~");
static_assert(kDr / 2 <= 32, "the first warp rotates q_rope");
constexpr float kLog2e = 1.4426950408889634f;

// Shared memory: W_UK[h] (staged before the kernel waits for its inputs; W_UV[h] behind the
// block's last page), one page of rows, q~ and q_rope in fp32 (later the merged o~), this page's
// scores (then softmax weights), q_nope.
struct Smem {
  bf16 w[kDn * kDc];  // W_UK[h], then W_UV[h] (kDv == kDn rows)
  bf16 rows[kTile * kWidth];
  float q[kWidth];
  float scores[kTile];
  float q_nope[kDn];
  float tile_max;
  int last;
};
static_assert(kDv == kDn, "W_UV[h] takes W_UK[h]'s place in shared memory");

// Workspace: partial o~ [slots, kDc] and LSE [slots] (log2 units) for slot (t * heads + h) *
// splits + split, then the counters [kMlaDecodeFusedMaxTokens * heads].
int32_t partial_slots(int32_t heads, int num_sms) {
  return std::max(num_sms, kMlaDecodeFusedMaxTokens * heads);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float round_bf16(float v) {
  return __bfloat162float(__float2bfloat16(v));
}

// A head's [kDn, kDc] weight block into shared memory, as one cp.async group.
__device__ __forceinline__ void stage_weights(bf16* dst, const bf16* src, int tid) {
  for (int c = tid; c < kDn * kDc / 8; c += kThreads)
    cp_async_16(smem_addr(dst + c * 8), src + c * 8, true);
  cp_async_commit();
}

__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_fused_kernel(MlaDecodeFusedParams p, float* parts, float* part_lse,
                            int32_t* counters, int32_t splits) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int split = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const bf16* w_uk = p.kv_b + int64_t{h} * (kDn + kDv) * kDc;
  const bf16* w_uv = w_uk + kDn * kDc;

  // This block's pages. The metadata was uploaded before the step's first kernel, so it is
  // read before the wait; so are the weights, and the first page's rows but the sequence's
  // newest key (latent_store writes that one earlier in the step; older rows were written by
  // earlier steps). A block without pages (short contexts leave many) stages nothing and skips
  // the query: it only counts itself, and stages W_UV if it turns out to be the one that merges.
  const int32_t keys = p.num_keys[t];
  const int32_t pages = (keys + kTile - 1) / kTile;
  const MlaDecodeFusedPages range = mla_decode_fused_pages(keys, splits, split);
  const int32_t first = range.first, last = range.last;
  const bool attends = first < last;
  const int64_t row_bytes = int64_t{kWidth} * 2;
  // Rows [from, to) of the block's page page_index into sm.rows, as one cp.async group.
  auto load_rows = [&](int32_t page_index, int32_t from, int32_t to) {
    const int64_t page = p.block_table[int64_t{t} * p.table_stride + page_index];
    const auto* src =
        static_cast<const uint8_t*>(p.pool) + ((page * p.num_layers + p.layer) * kTile) * row_bytes;
    for (int c = from * kRowChunks + tid; c < to * kRowChunks; c += kThreads) {
      cp_async_16(smem_addr(sm.rows + (c / kRowChunks) * kWidth + (c % kRowChunks) * 8),
                  src + (c / kRowChunks) * row_bytes + (c % kRowChunks) * 16, true);
    }
    cp_async_commit();
  };
  int32_t preloaded = 0;  // rows of the first page loaded before the wait
  if (attends) {
    stage_weights(sm.w, w_uk, tid);
    const int32_t rows = min(kTile, keys - first * kTile);
    preloaded = first == pages - 1 ? rows - 1 : rows;
    load_rows(first, 0, preloaded);
  }
  wait_for_prerequisite();
  allow_dependent_launch();

  if (attends) {
    const bf16* q = p.q + (int64_t{t} * p.heads + h) * (kDn + kDr);
    if (tid < kDn) sm.q_nope[tid] = __bfloat162float(q[tid]);
    if (tid < kDr / 2) {
      const float2 r =
          rope::rotate_pair(q + kDn, tid, kDr / 2, p.interleave,
                            rope::cos_sin(p.positions[t], p.inv_freq[tid], p.attention_factor));
      sm.q[kDc + tid] = round_bf16(r.x);
      sm.q[kDc + tid + kDr / 2] = round_bf16(r.y);
    }
    cp_async_wait<0>();  // W_UK, and the first page's rows loaded so far
    __syncthreads();
    // q~ columns 2 tid and 2 tid + 1.
    float a0 = 0.0f, a1 = 0.0f;
#pragma unroll 8
    for (int i = 0; i < kDn; ++i) {
      const float2 w =
          __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sm.w + i * kDc + 2 * tid));
      a0 = fmaf(sm.q_nope[i], w.x, a0);
      a1 = fmaf(sm.q_nope[i], w.y, a1);
    }
    sm.q[2 * tid] = round_bf16(a0);
    sm.q[2 * tid + 1] = round_bf16(a1);
  }

  const float scale_log2 = p.scale * kLog2e;
  float m = -INFINITY, l = 0.0f, o0 = 0.0f, o1 = 0.0f;  // columns 2 tid and 2 tid + 1
  for (int32_t page_index = first; page_index < last; ++page_index) {
    const int32_t rows = min(kTile, keys - page_index * kTile);
    __syncthreads();  // q~ is made (W_UK read), the previous page's rows and weights are read
    load_rows(page_index, page_index == first ? preloaded : 0, rows);
    if (page_index == last - 1) {
      // W_UV[h] streams in behind the last page, in case this block merges.
      stage_weights(sm.w, w_uv, tid);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    // Scores, a warp per key, two keys at a time: lanes take interleaved pairs of the row.
    for (int k = warp; k < rows; k += 2 * kWarps) {
      const bool second = k + kWarps < rows;
      const bf16* row0 = sm.rows + k * kWidth;
      const bf16* row1 = sm.rows + (second ? k + kWarps : k) * kWidth;
      float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
      for (int i = 0; i < kWidth / 2 / 32; ++i) {
        const int d = 2 * (lane + 32 * i);
        const float2 q2 = *reinterpret_cast<const float2*>(sm.q + d);
        const float2 c0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(row0 + d));
        const float2 c1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(row1 + d));
        s0 = fmaf(q2.x, c0.x, fmaf(q2.y, c0.y, s0));
        s1 = fmaf(q2.x, c1.x, fmaf(q2.y, c1.y, s1));
      }
      s0 = warp_sum(s0);
      s1 = warp_sum(s1);
      if (lane == 0) {
        sm.scores[k] = s0 * scale_log2;
        if (second) sm.scores[k + kWarps] = s1 * scale_log2;
      }
    }
    __syncthreads();
    if (warp == 0) {
      float v = fmaxf(lane < rows ? sm.scores[lane] : -INFINITY,
                      lane + 32 < rows ? sm.scores[lane + 32] : -INFINITY);
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
      }
      if (lane == 0) sm.tile_max = v;
    }
    __syncthreads();
    const float m_new = fmaxf(m, sm.tile_max);
    if (tid < rows) sm.scores[tid] = exp2f(sm.scores[tid] - m_new);
    __syncthreads();
    const float correction = exp2f(m - m_new);  // 0 on the first page (m = -inf)
    l *= correction;
    o0 *= correction;
    o1 *= correction;
    for (int k = 0; k < rows; ++k) {
      const float pk = sm.scores[k];
      const float2 c = __bfloat1622float2(
          *reinterpret_cast<const __nv_bfloat162*>(sm.rows + k * kWidth + 2 * tid));
      l += pk;
      o0 = fmaf(pk, c.x, o0);
      o1 = fmaf(pk, c.y, o1);
    }
    m = m_new;
  }

  // This split's part, normalised, and its LSE (-inf for no keys).
  const int64_t th = int64_t{t} * p.heads + h;
  const int64_t slot = th * splits + split;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  *reinterpret_cast<float2*>(parts + slot * kDc + 2 * tid) = make_float2(o0 * inv, o1 * inv);
  if (tid == 0) part_lse[slot] = l > 0.0f ? m + log2f(l) : -INFINITY;
  __syncthreads();
  if (tid == 0) {
    // The block's writes (ordered before this thread's by the barrier) before the count; the
    // other splits' parts, written before their counts, before what this block reads next.
    __threadfence();
    sm.last = atomicAdd(counters + th, 1) == splits - 1;
    __threadfence();
  }
  __syncthreads();
  if (!sm.last) {
    cp_async_wait<0>();  // no copy into shared memory outlives the block
    return;
  }

  // The last block: merge the splits in order, then out = W_UV[h] bf16(o~).
  if (!attends) stage_weights(sm.w, w_uv, tid);
  float lse_max = -INFINITY;
  for (int s = 0; s < splits; ++s) lse_max = fmaxf(lse_max, __ldcg(part_lse + th * splits + s));
  float sum = 0.0f, v0 = 0.0f, v1 = 0.0f;
  if (lse_max != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float w = exp2f(__ldcg(part_lse + th * splits + s) - lse_max);
      const float2 part =
          __ldcg(reinterpret_cast<const float2*>(parts + (th * splits + s) * kDc + 2 * tid));
      sum += w;
      v0 = fmaf(w, part.x, v0);
      v1 = fmaf(w, part.y, v1);
    }
  }
  const float norm = sum > 0.0f ? 1.0f / sum : 0.0f;
  sm.q[2 * tid] = round_bf16(v0 * norm);
  sm.q[2 * tid + 1] = round_bf16(v1 * norm);
  if (tid == 0) counters[th] = 0;  // for the next launch
  cp_async_wait<0>();              // W_UV[h]
  __syncthreads();
  // A warp per output row; lanes take 8 values 32 apart.
  for (int r = warp; r < kDv; r += kWarps) {
    const bf16* row = sm.w + r * kDc;
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kDc / 8 / 32; ++i) {
      const int d = 8 * (lane + 32 * i);
      float w[8];
      load_floats<8>(row + d, w);
      const float4 oa = *reinterpret_cast<const float4*>(sm.q + d);
      const float4 ob = *reinterpret_cast<const float4*>(sm.q + d + 4);
      s = fmaf(w[0], oa.x, fmaf(w[1], oa.y, fmaf(w[2], oa.z, fmaf(w[3], oa.w, s))));
      s = fmaf(w[4], ob.x, fmaf(w[5], ob.y, fmaf(w[6], ob.z, fmaf(w[7], ob.w, s))));
    }
    s = warp_sum(s);
    if (lane == 0) p.out[th * kDv + r] = __float2bfloat16(s);
  }
}

}  // namespace

bool mla_decode_fused_supports(int64_t d_c, int64_t d_r, int64_t d_n, int64_t d_v,
                               int64_t block_size) {
  return d_c == kDc && d_r == kDr && d_n == kDn && d_v == kDv && block_size == kTile;
}

int32_t mla_decode_fused_splits(int32_t T, int32_t heads, int32_t max_keys, int num_sms) {
  const int32_t max_pages = std::max(1, (max_keys + kTile - 1) / kTile);
  return std::clamp(num_sms / std::max(1, T * heads), 1, max_pages);
}

bool mla_decode_fused_fits(int32_t T, int32_t heads, int32_t max_keys, int num_sms) {
  if (T < 1 || T > kMlaDecodeFusedMaxTokens || heads < 1 || max_keys < 0 ||
      max_keys > kMlaDecodeFusedMaxKeys || 2 * T * heads > num_sms) {
    return false;
  }
  const int32_t max_pages = (max_keys + kTile - 1) / kTile;
  const int32_t splits = mla_decode_fused_splits(T, heads, max_keys, num_sms);
  return (max_pages + splits - 1) / splits <= kMlaDecodeFusedMaxPagesPerBlock;
}

size_t mla_decode_fused_workspace_bytes(int32_t heads, int num_sms) {
  const auto slots = static_cast<size_t>(partial_slots(heads, num_sms));
  return slots * (kDc + 1) * sizeof(float) +
         size_t{kMlaDecodeFusedMaxTokens} * heads * sizeof(int32_t);
}

void mla_decode_fused(const MlaDecodeFusedParams& p, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream) {
  // Check shapes
  MLA_REQUIRE(mla_decode_fused_fits(p.T, p.heads, p.max_keys, p.num_sms),
              "mla_decode_fused: T {}, heads {}, max_keys {} on {} SMs outside what it is "
              "built for (mla_decode_fused_fits)",
              p.T, p.heads, p.max_keys, p.num_sms);
  MLA_REQUIRE(p.layer >= 0 && p.layer < p.num_layers && p.table_stride >= 0,
              "mla_decode_fused: layer {} of {}, table stride {}", p.layer, p.num_layers,
              p.table_stride);
  MLA_REQUIRE(workspace_bytes >= mla_decode_fused_workspace_bytes(p.heads, p.num_sms),
              "mla_decode_fused: workspace of {} bytes, {} needed for {} heads on {} SMs",
              workspace_bytes, mla_decode_fused_workspace_bytes(p.heads, p.num_sms), p.heads,
              p.num_sms);
  // Check layout
  MLA_REQUIRE(is_aligned(p.q, 4) && is_aligned(p.kv_b, 16) && is_aligned(p.pool, 16) &&
                  is_aligned(workspace, 16),
              "mla_decode_fused: q, kv_b, pool or workspace misaligned");

  const int32_t splits = mla_decode_fused_splits(p.T, p.heads, p.max_keys, p.num_sms);
  const int32_t slots = partial_slots(p.heads, p.num_sms);
  auto* parts = static_cast<float*>(workspace);
  float* part_lse = parts + int64_t{slots} * kDc;
  auto* counters = reinterpret_cast<int32_t*>(part_lse + slots);
  constexpr int kSmem = sizeof(Smem);
  MLA_CUDA_CHECK(cudaFuncSetAttribute(mla_decode_fused_kernel,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  launch_dependent(mla_decode_fused_kernel, dim3(splits, p.heads, p.T), dim3(kThreads), kSmem,
                   stream, true, p, parts, part_lse, counters, splits);
}

}  // namespace mla::cuda
