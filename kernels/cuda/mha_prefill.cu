#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/mha_prefill.h"
#include "kernels/cuda/mma_sm80.cuh"

namespace mla::cuda {
namespace {

// One CTA computes 64 * kM queries of one sequence and one head against 64-key tiles, flash-
// attention style: S = Q K^T, online softmax in fp32, O += P V, with P kept in registers.
// Four warps own 16 * kM query rows each (kM = 2 reuses every K and V fragment for two row
// tiles, halving shared-memory traffic per FLOP, where the registers allow it). One K and one
// V buffer, loaded with cp.async in turns (V of tile j while S of tile j runs, K of tile j + 1
// while P V runs), keep shared memory small enough for two CTAs per SM. Key tiles wholly above
// the causal diagonal are never visited.
constexpr int kKeys = 64;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

using namespace mma;

// Shared-memory tiles have rows of kPitch elements (a multiple of 64, so whole groups of 8
// 16-byte chunks); chunk c of row r sits at c ^ (r % 8), so the 8 rows an ldmatrix reads at
// one logical chunk fall in 8 different bank groups.
template <int kPitch>
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk) {
  static_assert(kPitch % 64 == 0, "swizzle works on groups of 8 chunks");
  return row * (kPitch * 2) + ((chunk ^ (row & 7)) << 4);
}

template <int kDqk, int kDv, int kM>
constexpr int smem_bytes() {
  return (16 * kM * kWarps * kDqk + kKeys * kDqk + kKeys * kDv) * 2;
}

// kDqk, kDv: compile-time bounds on d_nope + d_rope and d_v (the shared-memory pitches and
// the accumulator size); the actual dims are run-time multiples of 16 up to them. kM: 16-row
// tiles per warp.
template <int kDqk, int kDv, int kM>
__global__ void __launch_bounds__(kThreads, 2) mha_prefill_kernel(MhaPrefillParams p) {
  static_assert(kDv <= kDqk, "the output tile is staged in the Q tile");
  constexpr int kRows = 16 * kM * kWarps;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t s_q = smem_addr(smem);
  const uint32_t s_k = s_q + kRows * kDqk * 2;
  const uint32_t s_v = s_k + kKeys * kDqk * 2;

  // The last query blocks see the most keys: start them first.
  const int m_start = (gridDim.x - 1 - blockIdx.x) * kRows;
  const int h = blockIdx.y, seq = blockIdx.z;
  const int q0 = p.cu_q[seq], nq = p.cu_q[seq + 1] - q0;
  if (m_start >= nq) return;
  const int k0 = p.cu_k[seq], nk = p.cu_k[seq + 1] - k0;
  const int offset = nk - nq;  // query i sees keys [0, offset + i]
  const int key_end = offset + min(m_start + kRows, nq);
  const int tiles = (max(key_end, 0) + kKeys - 1) / kKeys;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int qk_chunks = (p.d_nope + p.d_rope) / 8, nope_chunks = p.d_nope / 8;
  const int v_chunks = p.d_v / 8;

  // Loads: 8 threads per row (128 contiguous bytes per row and instruction), rows
  // tid / 8 + 16 i. Rows past the block's queries or keys are zero-filled, never read.
  const int ld_row = tid / 8, ld_chunk = tid % 8;
#pragma unroll
  for (int i = 0; i < kRows / 16; ++i) {
    const int r = ld_row + 16 * i;
    const bool valid = m_start + r < nq;
    const __nv_bfloat16* src =
        valid ? p.q + int64_t{q0 + m_start + r} * p.q_token_stride + int64_t{h} * p.q_head_stride
              : p.q;
    for (int c = ld_chunk; c < qk_chunks; c += 8) {
      cp_async_16(s_q + tile_offset<kDqk>(r, c), valid ? src + c * 8 : p.q, valid);
    }
  }
  cp_async_commit();
  const auto load_k = [&](int kt) {
#pragma unroll
    for (int i = 0; i < kKeys / 16; ++i) {
      const int r = ld_row + 16 * i;
      const bool valid = kt * kKeys + r < key_end;
      const int64_t j = k0 + kt * kKeys + r;
      for (int c = ld_chunk; c < qk_chunks; c += 8) {
        const __nv_bfloat16* src = p.k_nope;
        if (valid) {
          src = c < nope_chunks ? p.k_nope + j * p.kn_token_stride + h * p.kn_head_stride + c * 8
                                : p.k_rope + j * p.kr_token_stride + h * p.kr_head_stride +
                                      (c - nope_chunks) * 8;
        }
        cp_async_16(s_k + tile_offset<kDqk>(r, c), src, valid);
      }
    }
    cp_async_commit();
  };
  const auto load_v = [&](int kt) {
#pragma unroll
    for (int i = 0; i < kKeys / 16; ++i) {
      const int r = ld_row + 16 * i;
      const bool valid = kt * kKeys + r < key_end;
      const int64_t j = k0 + kt * kKeys + r;
      for (int c = ld_chunk; c < v_chunks; c += 8) {
        cp_async_16(s_v + tile_offset<kDv>(r, c),
                    valid ? p.v + j * p.v_token_stride + h * p.v_head_stride + c * 8 : p.v, valid);
      }
    }
    cp_async_commit();
  };

  // Per-lane ldmatrix offsets. Every row an ldmatrix lane addresses is congruent to lane % 8
  // mod 8, so within each aligned group of 8 chunks the swizzle is a fixed permutation: index
  // j is the logical chunk mod 8 / 2 (fragments take chunk pairs), the group adds 128 bytes.
  // Row tile mt of the warp is 16 rows (16 * kDqk * 2 bytes) further down.
  uint32_t q_frag[4], k_frag[4], v_frag[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    q_frag[j] = tile_offset<kDqk>(warp * 16 * kM + lane % 16, 2 * j + lane / 16);
    k_frag[j] = tile_offset<kDqk>(lane % 8 + (lane / 16) * 8, 2 * j + (lane / 8) % 2);
    v_frag[j] = tile_offset<kDv>(lane % 8 + ((lane / 8) % 2) * 8, 2 * j + lane / 16);
  }

  // This thread's rows are queries row0 + 16 mt + 8 i (within the sequence).
  const int row0 = m_start + warp * 16 * kM + lane / 4;
  const float scale_log2 = p.scale * kLog2e;
  float o[kM][kDv / 8][4];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int n = 0; n < kDv / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
  }
  float m[kM][2], l[kM][2];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.0f;
  }

  if (tiles > 0) load_k(0);
  for (int kt = 0; kt < tiles; ++kt) {
    cp_async_wait<0>();
    __syncthreads();  // K of tile kt (and Q) visible; every warp is done with V of tile kt - 1
    load_v(kt);

    // S = Q K^T for this warp's 16 kM rows x 64 keys.
    float s[kM][8][4];
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
      for (int n = 0; n < 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
    }
    for (int c8 = 0; c8 < qk_chunks; c8 += 8) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (c8 + 2 * j >= qk_chunks) break;
        uint32_t a[kM][4];
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
          ldsm_x4(s_q + q_frag[j] + mt * 16 * (kDqk * 2) + c8 * 16, a[mt]);
        }
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t b[4];
          ldsm_x4(s_k + k_frag[j] + np * 16 * (kDqk * 2) + c8 * 16, b);
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
            mma_bf16(s[mt][2 * np], a[mt], b[0], b[1]);
            mma_bf16(s[mt][2 * np + 1], a[mt], b[2], b[3]);
          }
        }
      }
    }

    // Causal mask, only on tiles that reach past this warp's first row's last key.
    const bool needs_mask = kt * kKeys + kKeys - 1 > offset + m_start + warp * 16 * kM;
    const int key0 = kt * kKeys + (lane % 4) * 2;
    uint32_t pa[kM][4][4];  // P as A fragments: k-step kk covers keys 16 kk .. + 16
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][n][e] *= scale_log2;
          if (needs_mask && key0 + n * 8 + e % 2 > offset + row0 + 16 * mt + (e / 2) * 8) {
            s[mt][n][e] = -INFINITY;
          }
        }
      }

      // Online softmax in the log2 domain.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          tile_max = fmaxf(tile_max, fmaxf(s[mt][n][2 * i], s[mt][n][2 * i + 1]));
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 2));
        const float m_new = fmaxf(m[mt][i], tile_max);
        // A row with no visible key so far keeps m = -inf; exponents against 0 give p = 0.
        const float ref = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = exp2_approx(m[mt][i] - ref);
        m[mt][i] = m_new;
        l[mt][i] *= alpha;
#pragma unroll
        for (int n = 0; n < kDv / 8; ++n) {
          o[mt][n][2 * i] *= alpha;
          o[mt][n][2 * i + 1] *= alpha;
        }
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          const float p0 = exp2_approx(s[mt][n][2 * i] - ref);
          const float p1 = exp2_approx(s[mt][n][2 * i + 1] - ref);
          l[mt][i] += p0 + p1;
          // Accumulator n (keys 8 n ..) is the low (n even) or high half of k-step n / 2;
          // row i = 1 is the A fragment's second register of each half.
          pa[mt][n / 2][(n % 2) * 2 + i] = pack_bf16(p0, p1);
        }
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V of tile kt visible; every warp is done with K of tile kt
    if (kt + 1 < tiles) load_k(kt + 1);

      // O += P V for this warp's 16 kM rows x d_v.
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kDv / 16; ++np) {
        if (np * 2 >= v_chunks) break;
        uint32_t b[4];
        ldsm_x4_trans(s_v + v_frag[np % 4] + kk * 16 * (kDv * 2) + (np / 4) * 128, b);
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
          mma_bf16(o[mt][2 * np], pa[mt][kk], b[0], b[1]);
          mma_bf16(o[mt][2 * np + 1], pa[mt][kk], b[2], b[3]);
        }
      }
    }
  }

  // Stage the warp's output rows in its own rows of the Q tile (no other warp reads them) so
  // global stores are whole 16-byte chunks.
  cp_async_wait<0>();
  __syncwarp();
  unsigned char* s_out = smem;
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float sum = l[mt][i];
      sum += __shfl_xor_sync(0xffffffff, sum, 1);
      sum += __shfl_xor_sync(0xffffffff, sum, 2);
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      const int row = row0 + 16 * mt + 8 * i;
      if (p.lse && lane % 4 == 0 && row < nq) {
        p.lse[int64_t{q0 + row} * p.heads + h] =
            sum > 0.0f ? (m[mt][i] + __log2f(sum)) * kLn2 : -INFINITY;
      }
      const int r = row - m_start;
#pragma unroll
      for (int n = 0; n < kDv / 8; ++n) {
        if (n >= v_chunks) break;
        *reinterpret_cast<__nv_bfloat162*>(s_out + tile_offset<kDqk>(r, n) + (lane % 4) * 4) =
            __floats2bfloat162_rn(o[mt][n][2 * i] * inv, o[mt][n][2 * i + 1] * inv);
      }
    }
  }
  __syncwarp();
  for (int i = lane; i < 16 * kM * v_chunks; i += 32) {
    const int r = warp * 16 * kM + i / v_chunks, c = i % v_chunks;
    if (m_start + r >= nq) continue;
    *reinterpret_cast<uint4*>(p.out + (int64_t{q0 + m_start + r} * p.heads + h) * p.d_v + c * 8) =
        *reinterpret_cast<const uint4*>(s_out + tile_offset<kDqk>(r, c));
  }
}

template <int kDqk, int kDv, int kM>
void launch(const MhaPrefillParams& p, cudaStream_t stream) {
  constexpr int bytes = smem_bytes<kDqk, kDv, kM>();
  constexpr int rows = 16 * kM * kWarps;
  MLA_CUDA_CHECK(cudaFuncSetAttribute(mha_prefill_kernel<kDqk, kDv, kM>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const dim3 grid((p.max_q + rows - 1) / rows, p.heads, p.num_seqs);
  mha_prefill_kernel<kDqk, kDv, kM><<<grid, kThreads, bytes, stream>>>(p);
  MLA_CUDA_CHECK(cudaGetLastError());
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

std::string mha_prefill_unsupported(int32_t d_nope, int32_t d_rope, int32_t d_v) {
  const int32_t d_qk = d_nope + d_rope;
  if (d_nope < 0 || d_rope < 0 || d_nope % 16 != 0 || d_rope % 16 != 0 || d_qk < 16 || d_qk > 256) {
    return fmt::format("d_nope {} and d_rope {} must be multiples of 16 summing to [16, 256]",
                       d_nope, d_rope);
  }
  if (d_v < 16 || d_v > 256 || d_v % 16 != 0) {
    return fmt::format("d_v {} not a multiple of 16 in [16, 256]", d_v);
  }
  return "";
}

void mha_prefill(const MhaPrefillParams& p, cudaStream_t stream) {
  // Check shapes
  MLA_REQUIRE(p.num_seqs >= 0 && p.max_q >= 0, "mha_prefill: num_seqs {} or max_q {} < 0",
              p.num_seqs, p.max_q);
  if (p.num_seqs == 0 || p.max_q == 0) return;
  MLA_REQUIRE(p.heads >= 1 && p.heads <= 65535, "mha_prefill: heads {} outside [1, 65535]",
              p.heads);
  MLA_REQUIRE(p.num_seqs <= 65535, "mha_prefill: {} sequences exceed one grid", p.num_seqs);
  const std::string unsupported = mha_prefill_unsupported(p.d_nope, p.d_rope, p.d_v);
  MLA_REQUIRE(unsupported.empty(), "mha_prefill: {}", unsupported);
  const int d_qk = p.d_nope + p.d_rope;
  MLA_REQUIRE(std::isfinite(p.scale), "mha_prefill: scale {} not finite", p.scale);
  // Check pointers and layout
  MLA_REQUIRE(p.q && p.k_nope && p.v && p.cu_q && p.cu_k && p.out && (p.k_rope || p.d_rope == 0),
              "mha_prefill: null pointer");
  MLA_REQUIRE(aligned16(p.q) && aligned16(p.k_nope) && aligned16(p.k_rope) && aligned16(p.v) &&
                  aligned16(p.out),
              "mha_prefill: q, k_nope, k_rope, v and out must be 16-byte aligned");
  for (int64_t stride : {p.q_token_stride, p.q_head_stride, p.kn_token_stride, p.kn_head_stride,
                         p.kr_token_stride, p.kr_head_stride, p.v_token_stride, p.v_head_stride}) {
    MLA_REQUIRE(stride % 8 == 0, "mha_prefill: stride {} not a multiple of 8 elements", stride);
  }

  // The smallest tile that holds the dims. d_v = 256 keeps 16 rows per warp: 32 would need 256
  // accumulator registers per thread for O alone.
  if (d_qk <= 64 && p.d_v <= 64) {
    launch<64, 64, 2>(p, stream);
  } else if (d_qk <= 128 && p.d_v <= 128) {
    launch<128, 128, 2>(p, stream);
  } else if (d_qk <= 192 && p.d_v <= 128) {
    launch<192, 128, 2>(p, stream);
  } else if (p.d_v <= 128) {
    launch<256, 128, 2>(p, stream);
  } else {
    launch<256, 256, 1>(p, stream);
  }
}

}  // namespace mla::cuda
