// mla_decode's split-KV attention on bf16 pages, with tiles taken in pairs: each warpgroup
// computes S = Q K^T for a whole 64-key tile of its own (warpgroup 0 tile t0, warpgroup 1 tile
// t1 = t0 + 1) and holds half of O (warpgroup 0 columns 0-255, O_L; warpgroup 1 columns 256-511,
// O_R), so one warpgroup's softmax runs while the other's products keep the tensor cores busy,
// and each product reads Q from shared memory once per 64 keys instead of once per 32. The
// schedule of a pair, with m the running exponent base of each query row (shared by both
// warpgroups), P0 and P1 the tiles' weights and V0 = K0, V1 = K1 (the latent rows):
//   warpgroup 0                               warpgroup 1
//   S0 = Q K0^T                               S1 = Q K1^T
//   m_a = max(m, rowmax S0) (lazily)
//   P0 = exp2(S0 - m_a) -> shared memory  ->  (waits for P0 and m_a)
//   O_L = O_L * 2^(m - m_a) + P0 V0_L         O_R = O_R * 2^(m - m_a) + P0 V0_R
//                                             m_b = max(m_a, rowmax S1) (lazily)
//   (waits for P1 and m_b)                <-  P1 = exp2(S1 - m_b) -> shared memory
//   O_L = O_L * 2^(m_a - m_b) + P1 V1_L       O_R = O_R * 2^(m_a - m_b) + P1 V1_R
// then m = m_b. A warpgroup's own P feeds its product from registers; the other's comes through
// shared memory, written into the KV tile's rotary block (block 8), which only S reads.
//
// Shared memory holds Q and two KV tiles (t0's and t1's), so there is no third stage: each part
// of a tile is reloaded for the next pair as soon as its last reader is done, by that reader,
// and waited for through an mbarrier that completes when the copies land:
//   tile 0, blocks 0-3 (V0_L)     warpgroup 0, after P0 V0_L
//   tile 0, blocks 4-8            warpgroup 1, after P0 V0_R (block 8 then held P0)
//   tile 1, blocks 0-3 and 8      warpgroup 0, after P1 V1_L (block 8 held P1)
//   tile 1, blocks 4-7 (V1_R)     warpgroup 1, after P1 V1_R
// Rescaling is lazy as in mla_decode.cu's kernel: m moves only when a tile's maximum passes it
// by more than kRescaleSlack, so O is rarely multiplied.
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/cp_async.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/mla_decode_common.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace mla::cuda::mla_decode_internal {
namespace {

constexpr int kGroupThreads = 128;  // one warpgroup
// Shared memory: Q, tile 0, tile 1, then four row arrays (m_a, m_b and the two warpgroups' row
// sums) and the four load barriers; +1024 to align the base to the swizzle atom.
constexpr int kStatsOffset = 3 * kTileBytes;
constexpr int kBarrierOffset = kStatsOffset + 4 * kTileRows * 4;
constexpr int kPairedSmemBytes = kBarrierOffset + 4 * 8 + 1024;
constexpr int kRopeBlock = 8;  // column block of a tile that S alone reads; P goes there after S

// The four loads of a pair (see the top of the file), and their barriers' order in shared memory.
enum Load : int { kTile0Left = 0, kTile0Right = 1, kTile1Left = 2, kTile1Right = 3 };
// Named barriers between the warpgroups (0 is __syncthreads'): warpgroup 0 arrives on kP0Ready
// once P0 and m_a are in shared memory, warpgroup 1 on kP1Ready once P1 and m_b are.
enum Signal : int { kP0Ready = 1, kP1Ready = 2 };

__device__ __forceinline__ void signal_arrive(Signal s) {
  asm volatile("bar.arrive %0, 256;\n" ::"r"(static_cast<int>(s)) : "memory");
}
__device__ __forceinline__ void signal_wait(Signal s) {
  asm volatile("bar.sync %0, 256;\n" ::"r"(static_cast<int>(s)) : "memory");
}

// This warpgroup's thread i (0..127) copies chunk i % 8 of rows i / 8 + 16k (k < 4) of column
// blocks [kFirst, kFirst + kCount) of a page's 64 rows at `page` into the tile at `tile`; rows
// past valid_rows become zeros (masked keys then add 0 * 0 to O, never 0 * NaN).
template <int kFirst, int kCount>
__device__ __forceinline__ void load_blocks(uint32_t tile, const uint8_t* page, int valid_rows,
                                            int i) {
  const int r = i / 8, c = i % 8;
  const uint32_t dst = tile + r * 128 + ((c ^ (r & 7)) << 4);
  const int src = r * kRowBytes + c * 16;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const bool ok = r + 16 * k < valid_rows;
#pragma unroll
    for (int cb = kFirst; cb < kFirst + kCount; ++cb) {
      cp_async_16(dst + cb * kColBlockBytes + k * 16 * 128,
                  page + (ok ? src + k * 16 * kRowBytes + cb * 128 : 0), ok);
    }
  }
}

// S (+)= Q K^T over column blocks [kFirst, kFirst + kCount) of the tile at kv (K = 64 per block).
template <int kFirst, int kCount>
__device__ __forceinline__ void issue_s(float (&s)[32], uint32_t q_tile, uint32_t kv,
                                        bool accumulate) {
#pragma unroll
  for (int ks = 4 * kFirst; ks < 4 * (kFirst + kCount); ++ks) {
    const uint32_t off = (ks / 4) * kColBlockBytes + (ks % 4) * 32;
    wgmma_m64n64k16(s, sw128_desc(q_tile + off, 16, 1024), sw128_desc(kv + off, 16, 1024),
                    accumulate || ks > 4 * kFirst);
  }
}

// O += P V over the tile's 64 keys for this warpgroup's 256 columns (column blocks 4 wg .. 4 wg
// + 3 of the tile at kv, read MN-major), P from registers (this warpgroup's own tile).
__device__ __forceinline__ void issue_pv_own(float (&o)[128], const uint32_t (&a)[16], uint32_t kv,
                                             int wg) {
#pragma unroll
  for (int kk = 0; kk < kBlock / 16; ++kk) {
    const uint32_t frag[4] = {a[4 * kk], a[4 * kk + 1], a[4 * kk + 2], a[4 * kk + 3]};
    wgmma_m64n256k16_rs_mn(
        o, frag, sw128_desc(kv + 4 * wg * kColBlockBytes + kk * 16 * 128, kColBlockBytes, 1024));
  }
}

// The same with P from the other warpgroup, in the tile's rotary block.
__device__ __forceinline__ void issue_pv_other(float (&o)[128], uint32_t kv, int wg) {
  const uint32_t p_tile = kv + kRopeBlock * kColBlockBytes;
#pragma unroll
  for (int kk = 0; kk < kBlock / 16; ++kk) {
    wgmma_m64n256k16_mn(
        o, sw128_desc(p_tile + kk * 32, 16, 1024),
        sw128_desc(kv + 4 * wg * kColBlockBytes + kk * 16 * 128, kColBlockBytes, 1024));
  }
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The lazily moved base: m unless the tile's scaled maximum passes it by more than the slack.
__device__ __forceinline__ float next_base(float m, float tile_max) {
  return tile_max > m + kRescaleSlack ? tile_max : m;
}
// 2^(from - to), exactly 1 when the base did not move (also when both are -inf) and when it
// moves up from -inf (O and the sums are still 0 then, so nothing needs scaling).
__device__ __forceinline__ float rebase(float from, float to) {
  return from == to || from == kNegInf ? 1.0f : fast_exp2(from - to);
}

// exp2_rows on a 64-key S, and bf16 copies of the weights in wgmma's A-fragment order in a.
__device__ __forceinline__ void exponentiate(float (&s)[32], uint32_t (&a)[16], float base0,
                                             float base1, float scale_log2, float* sum0,
                                             float* sum1) {
  exp2_rows(s, base0, base1, scale_log2, sum0, sum1);
  // Keys 16 kk .. 16 kk + 15 are values 8 kk .. 8 kk + 7: (row r0, keys 2t, 2t + 1), (row r1,
  // the same keys), (row r0, keys 2t + 8, 2t + 9), (row r1, those) -- the A fragment's order.
#pragma unroll
  for (int i = 0; i < 16; ++i) a[i] = pack_bf16(s[2 * i], s[2 * i + 1]);
}

// Writes P (this thread's values of rows r0 and r0 + 8 of a [64, 64] tile) as bf16 into the
// swizzled 64-column block at p_bytes, K-major like one block of a tile.
__device__ __forceinline__ void store_p(uint8_t* p_bytes, const float (&s)[32], int r0, int g,
                                        int t) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    *reinterpret_cast<__nv_bfloat162*>(p_bytes + r0 * 128 + ((j ^ g) << 4) + 4 * t) =
        __floats2bfloat162_rn(s[4 * j], s[4 * j + 1]);
    *reinterpret_cast<__nv_bfloat162*>(p_bytes + (r0 + 8) * 128 + ((j ^ g) << 4) + 4 * t) =
        __floats2bfloat162_rn(s[4 * j + 2], s[4 * j + 3]);
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_paired_kernel(const MlaDecodeParams p, const Workspace ws) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t pad = ((raw + 1023) & ~1023u) - raw;  // swizzle atoms are 1024-byte aligned
  uint8_t* smem = smem_raw + pad;
  const uint32_t q_tile = raw + pad;
  const uint32_t kv0 = q_tile + kTileBytes, kv1 = q_tile + 2 * kTileBytes;
  uint8_t* p0_bytes = smem + kTileBytes + kRopeBlock * kColBlockBytes;
  uint8_t* p1_bytes = smem + 2 * kTileBytes + kRopeBlock * kColBlockBytes;
  float* base_a = reinterpret_cast<float*>(smem + kStatsOffset);  // [64]: m_a
  float* base_b = base_a + kTileRows;                             // [64]: m_b
  float* row_sum = base_b + kTileRows;                            // [2][64]
  const uint32_t barriers = q_tile + kBarrierOffset;
  auto barrier = [&](Load l) { return barriers + 8 * static_cast<int>(l); };

  const int tid = threadIdx.x;
  // Warp-uniform in the compiler's eyes (a shuffle), so the products in each warpgroup's branch
  // are not serialised as if they might diverge.
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0), i = tid % 128;
  const int lane = tid % 32, g = lane / 4, t = lane % 4;
  const int r0 = 16 * ((tid / 32) % 4) + g, r1 = r0 + 8;

  const int32_t rows = p.s_q * p.heads;
  const int32_t tile_row0 = blockIdx.x * kTileRows;
  const int32_t rg0 = tile_row0 + r0, rg1 = tile_row0 + r1;
  const float scale_log2 = p.scale * kLog2e;
  if (tid == 0) {
    for (int l = 0; l < 4; ++l) mbarrier_init(barriers + 8 * l, kGroupThreads);
  }
  wait_for_prerequisite();  // the plan
  allow_dependent_launch();
  const PartPlan plan = ws.plan[blockIdx.y];

  float s[32];
  float o[128];
  uint32_t a[16];
  uint32_t phase = 0;  // of every load barrier: each completes once a pair

  for (int32_t b = plan.begin_seq, lo = plan.begin_block;
       b < plan.end_seq || (b == plan.end_seq && lo < plan.end_block); ++b, lo = 0) {
    const SeqPiece piece = seq_piece(p, plan, b, rg0, rg1);
    const int32_t max_keys = piece.max_keys, hi = piece.hi, keys0 = piece.keys0,
                  keys1 = piece.keys1, keys_lo = piece.keys_lo;
    const int32_t* pages = piece.pages;

    // Tiles at or past hi belong to another piece (or to no one): they load as zeros and are
    // masked whole. Only table entries that hold keys are read: the rest may be garbage.
    const auto* pool = static_cast<const uint8_t*>(p.pool);
    auto valid_keys = [&](int32_t tile) {
      return tile < hi ? max(0, min(kBlock, max_keys - tile * kBlock)) : 0;
    };
    auto page_rows = [&](int32_t tile) {
      constexpr int64_t kPageLayerBytes = int64_t{kBlock} * kRowBytes;
      return valid_keys(tile) > 0
                 ? pool + (static_cast<int64_t>(pages[tile]) * p.num_layers + p.layer) *
                              kPageLayerBytes
                 : pool;
    };
    // This warpgroup's loads of tiles t0 and t0 + 1 into the two tiles (see the top).
    auto load_left = [&](int32_t t0) {  // warpgroup 0's first load: tile 0's blocks 0-3
      load_blocks<0, 4>(kv0, page_rows(t0), valid_keys(t0), i);
      cp_async_arrive(barrier(kTile0Left));
    };
    auto load_left1 = [&](int32_t t1) {  // warpgroup 0's second: tile 1's blocks 0-3 and 8
      load_blocks<0, 4>(kv1, page_rows(t1), valid_keys(t1), i);
      load_blocks<kRopeBlock, 1>(kv1, page_rows(t1), valid_keys(t1), i);
      cp_async_arrive(barrier(kTile1Left));
    };
    auto load_right = [&](int32_t t0) {  // warpgroup 1's first: tile 0's blocks 4-8
      load_blocks<4, 5>(kv0, page_rows(t0), valid_keys(t0), i);
      cp_async_arrive(barrier(kTile0Right));
    };
    auto load_right1 = [&](int32_t t1) {  // warpgroup 1's second: tile 1's blocks 4-7
      load_blocks<4, 4>(kv1, page_rows(t1), valid_keys(t1), i);
      cp_async_arrive(barrier(kTile1Right));
    };

    __syncthreads();  // the previous piece is done with shared memory (and the barriers made)
    load_tile(q_tile, p.q + (static_cast<int64_t>(b) * rows + tile_row0) * kWidth,
              min(kTileRows, rows - tile_row0));
    cp_async_commit();
    if (wg == 0) {
      load_left(lo);
      load_left1(lo + 1);
    } else {
      load_right(lo);
      load_right1(lo + 1);
    }
    cp_async_wait<0>();  // the query (the pages' copies are not in a committed group)
    fence_async_shared();
    __syncthreads();

    float m0 = kNegInf, m1 = kNegInf, l0 = 0.0f, l1 = 0.0f;
#pragma unroll
    for (int k = 0; k < 128; ++k) o[k] = 0.0f;

    for (int32_t t0 = lo; t0 < hi; t0 += 2) {
      const int32_t t1 = t0 + 1;
      const bool more = t0 + 2 < hi;
      if (wg == 0) {
        // S0 = Q K0^T, blocks 0-3 first (reloaded earliest).
        mbarrier_wait(barrier(kTile0Left), phase);
        fence_async_shared();
        fence_regs(s);
        wgmma_fence();
        issue_s<0, 4>(s, q_tile, kv0, false);
        mbarrier_wait(barrier(kTile0Right), phase);
        fence_async_shared();
        wgmma_fence();
        issue_s<4, 5>(s, q_tile, kv0, true);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(s);

        float mx0, mx1;
        const bool mask = t0 >= hi || (t0 + 1) * kBlock > keys_lo;
        mask_and_max(s, t0 * kBlock + 2 * t, keys0, keys1, mask, &mx0, &mx1);
        const float ma0 = next_base(m0, mx0 * scale_log2);
        const float ma1 = next_base(m1, mx1 * scale_log2);
        float sum0, sum1;
        exponentiate(s, a, ma0, ma1, scale_log2, &sum0, &sum1);
        store_p(p0_bytes, s, r0, g, t);
        if (t == 0) {
          base_a[r0] = ma0;
          base_a[r1] = ma1;
        }
        fence_async_shared();
        signal_arrive(kP0Ready);

        const float f0 = rebase(m0, ma0), f1 = rebase(m1, ma1);
        l0 = l0 * f0 + sum0;
        l1 = l1 * f1 + sum1;
        rescale(o, f0, f1);
        fence_regs(o);
        fence_regs(a);
        wgmma_fence();
        issue_pv_own(o, a, kv0, 0);
        wgmma_commit();

        // While warpgroup 1 works out P1: finish P0 V0_L and reload tile 0's blocks 0-3.
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs(a);
        if (more) load_left(t0 + 2);

        signal_wait(kP1Ready);
        const float mb0 = base_b[r0], mb1 = base_b[r1];
        const float h0 = rebase(ma0, mb0), h1 = rebase(ma1, mb1);
        l0 *= h0;
        l1 *= h1;
        rescale(o, h0, h1);
        fence_regs(o);
        wgmma_fence();
        issue_pv_other(o, kv1, 0);
        wgmma_commit();
        wgmma_wait<0>();  // P1 V1_L: tile 1's blocks 0-3 and P1 are free
        fence_regs(o);
        if (more) load_left1(t0 + 3);
        m0 = mb0;
        m1 = mb1;
      } else {
        // S1 = Q K1^T, blocks 4-7 first.
        mbarrier_wait(barrier(kTile1Right), phase);
        fence_async_shared();
        fence_regs(s);
        wgmma_fence();
        issue_s<4, 4>(s, q_tile, kv1, false);
        mbarrier_wait(barrier(kTile1Left), phase);
        fence_async_shared();
        wgmma_fence();
        issue_s<0, 4>(s, q_tile, kv1, true);
        issue_s<kRopeBlock, 1>(s, q_tile, kv1, true);
        wgmma_commit();

        // O_R += P0 V0_R once warpgroup 0 has P0, on its base m_a.
        signal_wait(kP0Ready);
        const float ma0 = base_a[r0], ma1 = base_a[r1];
        const float f0 = rebase(m0, ma0), f1 = rebase(m1, ma1);
        l0 *= f0;
        l1 *= f1;
        rescale(o, f0, f1);  // no product of this warpgroup writes O now
        fence_regs(o);
        wgmma_fence();
        issue_pv_other(o, kv0, 1);
        wgmma_commit();
        wgmma_wait<1>();  // S1
        fence_regs(s);

        float mx0, mx1;
        const bool mask = t1 >= hi || (t1 + 1) * kBlock > keys_lo;
        mask_and_max(s, t1 * kBlock + 2 * t, t1 < hi ? keys0 : 0, t1 < hi ? keys1 : 0, mask, &mx0,
                     &mx1);
        const float mb0 = next_base(ma0, mx0 * scale_log2);
        const float mb1 = next_base(ma1, mx1 * scale_log2);
        float sum0, sum1;
        exponentiate(s, a, mb0, mb1, scale_log2, &sum0, &sum1);
        store_p(p1_bytes, s, r0, g, t);
        if (t == 0) {
          base_b[r0] = mb0;
          base_b[r1] = mb1;
        }
        fence_async_shared();
        signal_arrive(kP1Ready);

        // P0 V0_R has had the softmax's time: finish it, reload tile 0's blocks 4-8, and only
        // then touch O (a wait inside a branch some warps skip would break wgmma's rules).
        wgmma_wait<0>();
        fence_regs(o);
        if (more) load_right(t0 + 2);
        const float h0 = rebase(ma0, mb0), h1 = rebase(ma1, mb1);
        l0 = l0 * h0 + sum0;
        l1 = l1 * h1 + sum1;
        rescale(o, h0, h1);
        fence_regs(o);
        fence_regs(a);
        wgmma_fence();
        issue_pv_own(o, a, kv1, 1);
        wgmma_commit();
        wgmma_wait<0>();  // P1 V1_R: tile 1's blocks 4-7 are free
        fence_regs(o);
        fence_regs(a);
        if (more) load_right1(t0 + 3);
        m0 = mb0;
        m1 = mb1;
      }
      phase ^= 1;
    }

    store_piece(p, ws, plan, b, m0, m1, l0, l1, o, row_sum);
  }
}

}  // namespace

void launch_mla_decode_paired(const MlaDecodeParams& p, const Workspace& ws, dim3 grid,
                              cudaStream_t stream) {
  MLA_CUDA_CHECK(cudaFuncSetAttribute(
      mla_decode_paired_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kPairedSmemBytes));
  launch_dependent(mla_decode_paired_kernel, grid, kThreads, kPairedSmemBytes, stream, true, p, ws);
}

}  // namespace mla::cuda::mla_decode_internal
