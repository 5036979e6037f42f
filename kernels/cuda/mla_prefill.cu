#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/fp8_latent.cuh"
#include "kernels/cuda/mla_prefill.h"
#include "kernels/cuda/mma_sm80.cuh"

namespace mla::cuda {
namespace {

// One CTA computes a 64-row M tile of (token, head) pairs of one sequence against 64-key KV
// tiles (one cache page each), flash-attention style: S = Q K^T over all 576 columns, online
// softmax in fp32, O += P V with V the first 512 columns of the same tile. Eight warps: warp
// w owns rows 16 * (w % 4) .. + 16; for S it takes keys 32 * (w / 4) .. + 32 and for O the
// value columns 256 * (w / 4) .. + 256, so the two warps of a row group swap row maxima and
// their halves of P through shared memory.
constexpr int kDim = 576;   // latent row: c (512) then k_r (64)
constexpr int kDimV = 512;  // value columns
constexpr int kRows = 64;   // M tile
constexpr int kKeys = 64;   // KV tile = one cache page
constexpr int kThreads = 256;
constexpr int kChunks = kDim / 8;  // 16-byte chunks per row
constexpr int kChunksV = kDimV / 8;
constexpr int kMaxSplits = 32;

constexpr int kTileBytes = kRows * kDim * 2;  // a Q tile or a KV tile
constexpr int kQOffset = 0;
constexpr int kKvOffset = kTileBytes;  // two KV buffers (double buffering)
constexpr int kPOffset = 3 * kTileBytes;
constexpr int kMaxOffset = kPOffset + kRows * kKeys * 2;
constexpr int kSumOffset = kMaxOffset + 2 * kRows * 4;
constexpr int kSmemBytes = kSumOffset + 2 * kRows * 4;
static_assert(kRows * kDimV * 2 <= kTileBytes, "output staging reuses KV buffer 0");
// fp8 rows: each page lands as it is in KV buffer 1 and is dequantised into buffer 0.
static_assert(kKeys * kFp8RowBytes <= kTileBytes, "an fp8 page is staged in KV buffer 1");

using namespace mma;

// How the grid covers tokens x heads: a tile holds tokens_per_tile whole tokens of
// heads_per_tile heads each; splits > 1 divides every tile's keys among that many CTAs.
struct TileShape {
  int32_t heads_per_tile, tokens_per_tile, head_tiles, token_tiles, splits;
};

// Barrier for the two warps (64 threads) of row group `group`; id 0 is __syncthreads'.
__device__ __forceinline__ void pair_barrier(int group) {
  asm volatile("bar.sync %0, 64;\n" ::"r"(group + 1) : "memory");
}

// Rows of 576 values are 72 chunks of 16 bytes; chunk c of row r sits at c ^ (r % 8), so the
// 8 rows an ldmatrix reads at one logical chunk fall in 8 different bank groups.
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk) {
  return row * (kDim * 2) + ((chunk ^ (row & 7)) << 4);
}

template <LatentElement kElement>
__global__ void __launch_bounds__(kThreads, 1)
    mla_prefill_kernel(MlaPrefillParams p, TileShape g, float* part_o, float* part_lse) {
  constexpr bool kFp8 = kElement == LatentElement::kFp8;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t s_q = smem_addr(smem + kQOffset);
  const uint32_t s_kv = smem_addr(smem + kKvOffset);
  const uint32_t s_p = smem_addr(smem + kPOffset);
  float* s_max = reinterpret_cast<float*>(smem + kMaxOffset);  // [2][kRows]
  float* s_sum = reinterpret_cast<float*>(smem + kSumOffset);  // [2][kRows]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int group = warp % 4, half = warp / 4;
  int block = blockIdx.x;
  const int split = block % g.splits;
  block /= g.splits;
  const int head_tile = block % g.head_tiles;
  // Later tokens of a chunk usually see more keys: start them first.
  const int token_tile = g.token_tiles - 1 - block / g.head_tiles;
  const int t_begin = token_tile * g.tokens_per_tile;
  const int t_end = min(p.tokens, t_begin + g.tokens_per_tile);
  const int h_begin = head_tile * g.heads_per_tile;
  const int h_count = min(p.heads - h_begin, g.heads_per_tile);

  // Tile row r is token t_begin + r / heads_per_tile, head h_begin + r % heads_per_tile; rows
  // outside the batch are zero and never written.
  const auto row_token = [&](int r) {
    const int t = t_begin + r / g.heads_per_tile;
    return r < g.heads_per_tile * g.tokens_per_tile && t < t_end && r % g.heads_per_tile < h_count
               ? t
               : -1;
  };
  for (int i = tid; i < kRows * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const int t = row_token(r);
    const int64_t offset =
        t < 0 ? 0 : (int64_t{t} * p.heads + h_begin + r % g.heads_per_tile) * kDim + c * 8;
    cp_async_16(s_q + tile_offset(r, c), p.q + offset, t >= 0);
  }
  cp_async_commit();

  // Per-lane ldmatrix offsets. Every row an ldmatrix lane addresses is congruent to lane % 8
  // mod 8, so within each aligned group of 8 chunks the swizzle is a fixed permutation: index
  // j is the logical chunk mod 8 / 2 (fragments take chunk pairs), the group adds 128 bytes.
  uint32_t q_frag[4], k_frag[4], v_frag[4], p_frag[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    q_frag[j] = tile_offset(group * 16 + lane % 16, 2 * j + lane / 16);
    k_frag[j] = tile_offset(half * 32 + lane % 8 + (lane / 16) * 8, 2 * j + (lane / 8) % 2);
    v_frag[j] = tile_offset(lane % 8 + ((lane / 8) % 2) * 8, half * 32 + 2 * j + lane / 16);
    p_frag[j] = (group * 16 + lane % 16) * (kKeys * 2) + (((2 * j + lane / 16) ^ (lane % 8)) << 4);
  }

  // This thread's two accumulator rows.
  const int rows[2] = {group * 16 + lane / 4, group * 16 + lane / 4 + 8};
  const int tokens[2] = {row_token(rows[0]), row_token(rows[1])};
  const float scale_log2 = p.scale * kLog2e;
  const int64_t rows_total = int64_t{p.tokens} * p.heads;

  // The tile's tokens may belong to several sequences: one pass per run of equal token_seq.
  for (int seg_begin = t_begin; seg_begin < t_end;) {
    const int seq = p.token_seq[seg_begin];
    int seg_end = seg_begin + 1;
    int max_keys = max(p.num_keys[seg_begin], 0);
    while (seg_end < t_end && p.token_seq[seg_end] == seq) {
      max_keys = max(max_keys, p.num_keys[seg_end]);
      ++seg_end;
    }
    const auto in_segment = [&](int t) { return t >= seg_begin && t < seg_end; };
    int n_keys[2];
    for (int i = 0; i < 2; ++i) n_keys[i] = in_segment(tokens[i]) ? p.num_keys[tokens[i]] : 0;

    const int tiles = (max_keys + kKeys - 1) / kKeys;
    const int per_split = (tiles + g.splits - 1) / g.splits;
    const int kt_begin = min(tiles, split * per_split);
    const int kt_end = min(tiles, kt_begin + per_split);
    const int32_t* pages = p.block_table + int64_t{seq} * p.table_stride;

    // Keys at or past max_keys are zero-filled, never read: the rest of the last page may be
    // unwritten (NaN), and 0 * NaN would leak through P V.
    const auto load_kv = [&](int kt, int buf) {
      constexpr int64_t kPageLayerBytes = int64_t{kKeys} * (kFp8 ? kFp8RowBytes : kDim * 2);
      const auto* pool = static_cast<const uint8_t*>(p.pool);
      const uint8_t* page = pool + (int64_t{pages[kt]} * p.num_layers + p.layer) * kPageLayerBytes;
      if constexpr (kFp8) {
        fp8_rows_load<kThreads, kFp8RowBytes>(s_kv + kTileBytes, page,
                                              min(kKeys, max_keys - kt * kKeys));
      } else {
        const auto* base = reinterpret_cast<const __nv_bfloat16*>(page);
        const uint32_t dst = s_kv + buf * kTileBytes;
        for (int i = tid; i < kKeys * kChunks; i += kThreads) {
          const int r = i / kChunks, c = i % kChunks;
          const bool valid = kt * kKeys + r < max_keys;
          cp_async_16(dst + tile_offset(r, c), base + (valid ? r * kDim + c * 8 : 0), valid);
        }
      }
      cp_async_commit();
    };

    float o[32][4];
#pragma unroll
    for (int n = 0; n < 32; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

    __syncthreads();  // the previous segment is done with the KV buffers
    if (kt_begin < kt_end) load_kv(kt_begin, 0);
    for (int kt = kt_begin; kt < kt_end; ++kt) {
      cp_async_wait<0>();
      __syncthreads();  // tile kt (and Q) visible; every warp is done with tile kt - 1
      const int buf = kFp8 ? 0 : (kt - kt_begin) & 1;
      if constexpr (kFp8) {
        fp8_page_dequantize<kThreads, kFp8RowBytes>(smem + kKvOffset + kTileBytes, smem + kKvOffset,
                                                    [](int r, int c) { return tile_offset(r, c); });
        __syncthreads();  // the tile is whole, and the staging buffer free for the next page
      }
      if (kt + 1 < kt_end) load_kv(kt + 1, buf ^ 1);
      const uint32_t s_k = s_kv + buf * kTileBytes;

      // S = Q K^T for this warp's 16 rows x 32 keys.
      float s[4][4];
#pragma unroll
      for (int n = 0; n < 4; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      for (int kk8 = 0; kk8 < kChunks; kk8 += 8) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t a[4];
          ldsm_x4(s_q + q_frag[j] + kk8 * 16, a);
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            uint32_t b[4];
            ldsm_x4(s_k + k_frag[j] + np * 16 * (kDim * 2) + kk8 * 16, b);
            mma_bf16(s[2 * np], a, b[0], b[1]);
            mma_bf16(s[2 * np + 1], a, b[2], b[3]);
          }
        }
      }

      // Online softmax in the log2 domain; masked scores are -inf.
      float tile_max[2] = {-INFINITY, -INFINITY};
      const int key0 = kt * kKeys + half * 32 + (lane % 4) * 2;
#pragma unroll
      for (int n = 0; n < 4; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + n * 8 + e % 2;
          s[n][e] = key < n_keys[e / 2] ? s[n][e] * scale_log2 : -INFINITY;
          tile_max[e / 2] = fmaxf(tile_max[e / 2], s[n][e]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffff, tile_max[i], 1));
        tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffff, tile_max[i], 2));
        if (lane % 4 == 0) s_max[half * kRows + rows[i]] = tile_max[i];
      }
      pair_barrier(group);
      float ref[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float m_new = fmaxf(m[i], fmaxf(tile_max[i], s_max[(1 - half) * kRows + rows[i]]));
        // A row with no visible key so far keeps m = -inf; exponents against 0 give p = 0.
        ref[i] = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = exp2_approx(m[i] - ref[i]);
        m[i] = m_new;
        l[i] *= alpha;
#pragma unroll
        for (int n = 0; n < 32; ++n) {
          o[n][2 * i] *= alpha;
          o[n][2 * i + 1] *= alpha;
        }
      }
#pragma unroll
      for (int n = 0; n < 4; ++n) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float p0 = exp2_approx(s[n][2 * i] - ref[i]);
          const float p1 = exp2_approx(s[n][2 * i + 1] - ref[i]);
          l[i] += p0 + p1;
          const int chunk = half * 4 + n;
          *reinterpret_cast<__nv_bfloat162*>(smem + kPOffset + rows[i] * (kKeys * 2) +
                                             ((chunk ^ (lane / 4)) << 4) + (lane % 4) * 4) =
              __floats2bfloat162_rn(p0, p1);
        }
      }
      pair_barrier(group);

      // O += P V for this warp's 16 rows x 256 value columns, over all 64 keys.
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4(s_p + p_frag[kk], a);
#pragma unroll
        for (int np = 0; np < 16; ++np) {
          uint32_t b[4];
          ldsm_x4_trans(s_k + v_frag[np % 4] + kk * 16 * (kDim * 2) + (np / 4) * 128, b);
          mma_bf16(o[2 * np], a, b[0], b[1]);
          mma_bf16(o[2 * np + 1], a, b[2], b[3]);
        }
      }
    }

    // Each warp summed its own 32 keys of every tile; the row total adds the partner's.
    float inv_l[2], lse[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[i] += __shfl_xor_sync(0xffffffff, l[i], 1);
      l[i] += __shfl_xor_sync(0xffffffff, l[i], 2);
      if (lane % 4 == 0) s_sum[half * kRows + rows[i]] = l[i];
    }
    pair_barrier(group);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float total = l[i] + s_sum[(1 - half) * kRows + rows[i]];
      inv_l[i] = total > 0.0f ? 1.0f / total : 0.0f;
      lse[i] = total > 0.0f ? (m[i] + __log2f(total)) * kLn2 : -INFINITY;
    }

    if (g.splits == 1) {
      // Stage the bf16 tile in KV buffer 0 so global stores are whole 16-byte chunks.
      __syncthreads();  // every warp is done reading the KV buffers
      unsigned char* s_o = smem + kKvOffset;
#pragma unroll
      for (int n = 0; n < 32; ++n) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int chunk = half * 32 + n;
          *reinterpret_cast<__nv_bfloat162*>(s_o + rows[i] * (kDimV * 2) +
                                             ((chunk ^ (lane / 4)) << 4) + (lane % 4) * 4) =
              __floats2bfloat162_rn(o[n][2 * i] * inv_l[i], o[n][2 * i + 1] * inv_l[i]);
        }
      }
      if (half == 0 && lane % 4 == 0) {
        for (int i = 0; i < 2; ++i) {
          if (in_segment(tokens[i])) {
            p.lse[int64_t{tokens[i]} * p.heads + h_begin + rows[i] % g.heads_per_tile] = lse[i];
          }
        }
      }
      __syncthreads();
      for (int i = tid; i < kRows * kChunksV; i += kThreads) {
        const int r = i / kChunksV, c = i % kChunksV;
        const int t = row_token(r);
        if (!in_segment(t)) continue;
        const int64_t row = int64_t{t} * p.heads + h_begin + r % g.heads_per_tile;
        *reinterpret_cast<uint4*>(p.out + row * kDimV + c * 8) =
            *reinterpret_cast<const uint4*>(s_o + r * (kDimV * 2) + ((c ^ (r & 7)) << 4));
      }
    } else {
      // Split-KV partial, normalised by its own sum; a split without keys for a row writes
      // only lse = -inf, which tells the combine step not to read its values.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (!in_segment(tokens[i])) continue;
        const int64_t row = split * rows_total + int64_t{tokens[i]} * p.heads + h_begin +
                            rows[i] % g.heads_per_tile;
        if (half == 0 && lane % 4 == 0) part_lse[row] = lse[i];
        if (inv_l[i] == 0.0f) continue;
        float* dst = part_o + row * kDimV + half * 256 + (lane % 4) * 2;
#pragma unroll
        for (int n = 0; n < 32; ++n) {
          *reinterpret_cast<float2*>(dst + n * 8) =
              make_float2(o[n][2 * i] * inv_l[i], o[n][2 * i + 1] * inv_l[i]);
        }
      }
    }
    seg_begin = seg_end;
  }
  cp_async_wait<0>();  // a CTA that never needed its Q tile still must not exit mid-copy
}

// Merges the splits of one (token, head) row by their LSE, in split order (deterministic).
constexpr int kCombineThreads = kDimV / 4;

__global__ void __launch_bounds__(kCombineThreads)
    mla_prefill_combine_kernel(MlaPrefillParams p, int splits, const float* part_o,
                               const float* part_lse) {
  const int64_t row = blockIdx.x;
  const int64_t rows_total = int64_t{p.tokens} * p.heads;
  float max_lse = -INFINITY;
  for (int s = 0; s < splits; ++s) max_lse = fmaxf(max_lse, part_lse[s * rows_total + row]);
  float sum = 0.0f;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (max_lse != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float lse = part_lse[s * rows_total + row];
      if (lse == -INFINITY) continue;
      const float w = expf(lse - max_lse);
      const float4 v =
          reinterpret_cast<const float4*>(part_o + (s * rows_total + row) * kDimV)[threadIdx.x];
      sum += w;
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
  }
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(p.out + row * kDimV) + 2 * threadIdx.x;
  dst[0] = __floats2bfloat162_rn(acc.x * inv, acc.y * inv);
  dst[1] = __floats2bfloat162_rn(acc.z * inv, acc.w * inv);
  if (threadIdx.x == 0) p.lse[row] = sum > 0.0f ? max_lse + logf(sum) : -INFINITY;
}

int sm_count() {
  int device = 0, sms = 0;
  MLA_CUDA_CHECK(cudaGetDevice(&device));
  MLA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Splitting the keys only pays when the tiles alone leave SMs idle (one CTA fits an SM). The
// per-CTA key count is on the device, so the split count minimises waves per unit of work,
// ceil(ctas * s / sms) / s, plus 1% per split for the extra Q loads and the combine pass, with
// at most two waves of CTAs (bounding the workspace).
TileShape tile_shape(int32_t tokens, int32_t heads, int sms) {
  TileShape g{};
  g.head_tiles = (heads + kRows - 1) / kRows;
  g.heads_per_tile = (heads + g.head_tiles - 1) / g.head_tiles;
  g.tokens_per_tile = kRows / g.heads_per_tile;
  g.token_tiles = (tokens + g.tokens_per_tile - 1) / g.tokens_per_tile;
  const int64_t ctas = int64_t{g.token_tiles} * g.head_tiles;
  g.splits = 1;
  if (ctas < sms) {
    double best = 1.01;
    for (int s = 2; s <= kMaxSplits && ctas * s <= 2 * int64_t{sms}; ++s) {
      const double cost = static_cast<double>((ctas * s + sms - 1) / sms) / s + 0.01 * s;
      if (cost < best) {
        best = cost;
        g.splits = s;
      }
    }
  }
  return g;
}

size_t workspace_bytes(int32_t tokens, int32_t heads, const TileShape& g) {
  if (g.splits == 1) return 0;
  return static_cast<size_t>(g.splits) * tokens * heads * (kDimV + 1) * sizeof(float);
}

}  // namespace

size_t mla_prefill_workspace_size(int32_t tokens, int32_t heads) {
  if (tokens <= 0 || heads <= 0) return 0;
  return workspace_bytes(tokens, heads, tile_shape(tokens, heads, sm_count()));
}

void mla_prefill(const MlaPrefillParams& p, void* workspace, cudaStream_t stream) {
  // Check shapes
  MLA_REQUIRE(p.tokens >= 0, "mla_prefill: tokens {} < 0", p.tokens);
  MLA_REQUIRE(p.heads >= 1, "mla_prefill: heads {} < 1", p.heads);
  if (p.tokens == 0) return;
  MLA_REQUIRE(p.num_layers >= 1 && p.layer >= 0 && p.layer < p.num_layers,
              "mla_prefill: layer {} outside [0, {})", p.layer, p.num_layers);
  MLA_REQUIRE(p.table_stride >= 0, "mla_prefill: table_stride {} < 0", p.table_stride);
  MLA_REQUIRE(std::isfinite(p.scale), "mla_prefill: scale {} not finite", p.scale);
  // Check pointers and layout
  MLA_REQUIRE(p.q && p.pool && p.block_table && p.token_seq && p.num_keys && p.out && p.lse,
              "mla_prefill: null pointer");
  for (const void* ptr : {static_cast<const void*>(p.q), static_cast<const void*>(p.pool),
                          static_cast<const void*>(p.out)}) {
    MLA_REQUIRE(reinterpret_cast<uintptr_t>(ptr) % 16 == 0,
                "mla_prefill: q, pool and out must be 16-byte aligned");
  }
  // Check workspace
  TileShape g = tile_shape(p.tokens, p.heads, sm_count());
  if (p.single_split) g.splits = 1;
  const int64_t grid = int64_t{g.token_tiles} * g.head_tiles * g.splits;
  MLA_REQUIRE(grid < (int64_t{1} << 31), "mla_prefill: {} tokens x {} heads exceed one grid",
              p.tokens, p.heads);
  float* part_o = nullptr;
  float* part_lse = nullptr;
  if (g.splits > 1) {
    MLA_REQUIRE(workspace && reinterpret_cast<uintptr_t>(workspace) % 16 == 0,
                "mla_prefill: needs {} bytes of 16-byte aligned workspace",
                workspace_bytes(p.tokens, p.heads, g));
    part_o = static_cast<float*>(workspace);
    part_lse = part_o + int64_t{g.splits} * p.tokens * p.heads * kDimV;
  }

  auto* kernel = p.element == LatentElement::kFp8 ? mla_prefill_kernel<LatentElement::kFp8>
                                                  : mla_prefill_kernel<LatentElement::kBf16>;
  MLA_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  kernel<<<static_cast<unsigned>(grid), kThreads, kSmemBytes, stream>>>(p, g, part_o, part_lse);
  MLA_CUDA_CHECK(cudaGetLastError());
  if (g.splits > 1) {
    mla_prefill_combine_kernel<<<static_cast<unsigned>(int64_t{p.tokens} * p.heads),
                                 kCombineThreads, 0, stream>>>(p, g.splits, part_o, part_lse);
    MLA_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace mla::cuda
