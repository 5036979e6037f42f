#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernels/cuda/cp_async.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/moe_experts.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/row_dots.cuh"

namespace mla::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr size_t kAlign = 256;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kDispatchThreads = 1024;
constexpr int kDispatchWarps = kDispatchThreads / 32;
constexpr int kCombineThreads = 256;
constexpr int kPerLane = kMoeMaxLocalExperts / 32;  // experts per lane in the dispatch scans

// A block tile of the grouped GEMMs: BM gathered rows x BN weight rows, BK deep per pipeline
// stage, WARPS_M x WARPS_N warps each owning a (BM / WARPS_M) x (BN / WARPS_N) sub-tile.
template <int BM_, int BN_, int BK_, int WARPS_M, int WARPS_N, int STAGES_>
struct Tiles {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, STAGES = STAGES_;
  static constexpr int kWarpsM = WARPS_M;
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;  // m16n8k16 MMAs per warp per k step
  // Row pitch in halves: 16 bytes of padding put the 8 rows an ldmatrix reads on distinct
  // banks.
  static constexpr int kPitch = BK + 8;
  static constexpr int kStageHalves = (BM + BN) * kPitch;
  static constexpr int kSmemBytes = STAGES * kStageHalves * 2;
  static constexpr int kChunksPerRow = BK / 8;  // 16-byte cp.async chunks
  static constexpr int kAIters = BM * kChunksPerRow / kThreads;
  static constexpr int kBIters = BN * kChunksPerRow / kThreads;
  static_assert(WM % 16 == 0 && WN % 16 == 0 && BK % 16 == 0 && BN % 2 == 0);
  static_assert(BM * kChunksPerRow % kThreads == 0 && BN * kChunksPerRow % kThreads == 0);
  static_assert(kThreads % kChunksPerRow == 0);  // a thread's chunks share one k offset
};
// Decode: a few rows per expert, bound by reading the weights. The block is as short as an
// MMA and keeps four 16 KiB weight stages in flight (two blocks, 128 KiB per SM), enough to
// stream at full bandwidth even when few experts are active and only some SMs have work.
using SmallTiles = Tiles<16, 64, 128, 1, 4, 5>;
// Prefill: many rows per expert; a 64 x 128 tile reuses each weight tile over 64 rows.
using LargeTiles = Tiles<64, 128, 32, 2, 4, 4>;
constexpr int kMinTileRows = SmallTiles::BM;
// Average slots per expert from which the large tiles are used.
constexpr int64_t kLargeTileRows = 32;

// Upper bound on the row tiles of `slots` slots over `experts` experts, bm rows per tile:
// sum ceil(c_e / bm) <= slots / bm + (experts with a slot).
int64_t max_row_tiles(int64_t slots, int64_t experts, int64_t bm) {
  return std::min(slots, slots / bm + std::min(slots, experts));
}

// Byte offsets of the workspace's parts.
struct Layout {
  size_t offsets, num_tiles, tile_expert, tile_row, sorted_slot, slot_pos, act, y, bytes;
};

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

Layout make_layout(int64_t tokens, int64_t top_k, int64_t local_experts, int64_t d, int64_t inter) {
  const auto slots = static_cast<size_t>(tokens * top_k);
  const auto tiles =
      static_cast<size_t>(max_row_tiles(tokens * top_k, local_experts, kMinTileRows));
  Layout l{};
  size_t at = 0;
  const auto take = [&at](size_t bytes) {
    const size_t offset = at;
    at += align_up(bytes);
    return offset;
  };
  l.offsets = take((local_experts + 1) * sizeof(int32_t));
  l.num_tiles = take(sizeof(int32_t));
  l.tile_expert = take(tiles * sizeof(int32_t));
  l.tile_row = take(tiles * sizeof(int32_t));
  l.sorted_slot = take(slots * sizeof(int32_t));
  l.slot_pos = take(slots * sizeof(int32_t));
  l.act = take(slots * inter * sizeof(bf16));
  l.y = take(slots * d * sizeof(float));
  l.bytes = at;
  return l;
}

// The workspace's parts as typed pointers.
struct Plan {
  int32_t* offsets;      // [local_experts + 1] first sorted position of each local expert
  int32_t* num_tiles;    // [1] row tiles in use
  int32_t* tile_expert;  // [max tiles] local expert of each row tile
  int32_t* tile_row;     // [max tiles] first sorted position of each row tile
  int32_t* sorted_slot;  // [slots] slot (t * top_k + k) at each sorted position
  int32_t* slot_pos;     // [slots] sorted position of each slot; -1 where not local
  bf16* act;             // [slots, inter] SiLU(gate) * up, by sorted position
  float* y;              // [slots, d] expert outputs, by sorted position
};

// ---------------------------------------------------------------------------------------------
// 1. Dispatch

struct DispatchArgs {
  const int32_t* ids;  // [slots]
  int32_t slots, first_expert, local_experts, tile_rows;
  Plan plan;
};

__device__ __forceinline__ int local_expert(const DispatchArgs& a, int32_t slot) {
  const int e = a.ids[slot] - a.first_expert;
  return e >= 0 && e < a.local_experts ? e : -1;
}

// One block. Positions within an expert follow slot order: each chunk of kDispatchThreads
// slots ranks its slots per expert within each warp (__match_any_sync), then across warps.
__global__ void __launch_bounds__(kDispatchThreads) moe_dispatch_kernel(DispatchArgs a) {
  __shared__ int32_t count[kMoeMaxLocalExperts];
  __shared__ int32_t cursor[kMoeMaxLocalExperts];  // positions already taken, per expert
  __shared__ int32_t offset[kMoeMaxLocalExperts + 1];
  __shared__ int32_t tile_offset[kMoeMaxLocalExperts + 1];
  __shared__ int32_t warp_base[kDispatchWarps][kMoeMaxLocalExperts];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int E = a.local_experts;

  for (int e = tid; e < E; e += kDispatchThreads) count[e] = cursor[e] = 0;
  __syncthreads();
  for (int32_t s = tid; s < a.slots; s += kDispatchThreads) {
    const int e = local_expert(a, s);
    if (e >= 0) atomicAdd(&count[e], 1);
  }
  __syncthreads();

  // Exclusive scans of rows and of row tiles over the experts: one warp, kPerLane experts
  // per lane.
  if (warp == 0) {
    int rows[kPerLane], tiles[kPerLane], row_sum = 0, tile_sum = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane * kPerLane + j;
      rows[j] = e < E ? count[e] : 0;
      tiles[j] = (rows[j] + a.tile_rows - 1) / a.tile_rows;
      row_sum += rows[j];
      tile_sum += tiles[j];
    }
    int row_incl = row_sum, tile_incl = tile_sum;
    for (int step = 1; step < 32; step *= 2) {
      const int r = __shfl_up_sync(kFull, row_incl, step);
      const int t = __shfl_up_sync(kFull, tile_incl, step);
      if (lane >= step) {
        row_incl += r;
        tile_incl += t;
      }
    }
    int row_at = row_incl - row_sum, tile_at = tile_incl - tile_sum;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane * kPerLane + j;
      if (e < E) {
        offset[e] = row_at;
        tile_offset[e] = tile_at;
      }
      row_at += rows[j];
      tile_at += tiles[j];
    }
    if (lane == 31) {
      offset[E] = row_incl;
      tile_offset[E] = tile_incl;
    }
  }
  __syncthreads();

  for (int e = tid; e <= E; e += kDispatchThreads) a.plan.offsets[e] = offset[e];
  if (tid == 0) *a.plan.num_tiles = tile_offset[E];
  for (int e = warp; e < E; e += kDispatchWarps) {
    const int first = tile_offset[e], n = tile_offset[e + 1] - first;
    for (int j = lane; j < n; j += 32) {
      a.plan.tile_expert[first + j] = e;
      a.plan.tile_row[first + j] = offset[e] + j * a.tile_rows;
    }
  }

  for (int32_t base = 0; base < a.slots; base += kDispatchThreads) {
    const int32_t s = base + tid;
    const int e = s < a.slots ? local_expert(a, s) : -1;
    const unsigned peers = __match_any_sync(kFull, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    for (int i = tid; i < kDispatchWarps * E; i += kDispatchThreads) warp_base[i / E][i % E] = 0;
    __syncthreads();
    if (e >= 0 && rank == 0) warp_base[warp][e] = __popc(peers);
    __syncthreads();
    for (int x = tid; x < E; x += kDispatchThreads) {
      int run = cursor[x];
      for (int w = 0; w < kDispatchWarps; ++w) {
        const int c = warp_base[w][x];
        warp_base[w][x] = run;
        run += c;
      }
      cursor[x] = run;
    }
    __syncthreads();
    if (s < a.slots) {
      if (e >= 0) {
        const int pos = offset[e] + warp_base[warp][e] + rank;
        a.plan.sorted_slot[pos] = s;
        a.plan.slot_pos[s] = pos;
      } else {
        a.plan.slot_pos[s] = -1;
      }
    }
    __syncthreads();  // the next chunk clears warp_base
  }
}

// ---------------------------------------------------------------------------------------------
// 2, 3. Grouped GEMMs

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* smem) {
  const uint32_t addr = smem_addr(smem);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a b: a 16x16 row-major, b 16x8 column-major (8 weight rows of 16), c 16x8 fp32.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

enum class Stage { kGateUp, kDown };

struct GemmArgs {
  // kGateUp: x [tokens, d], gathered through sorted_slot; kDown: act [slots, inter].
  const bf16* a;
  const int32_t* sorted_slot;
  int32_t top_k;
  // kGateUp: gate_up [local_experts, 2 * inter, d]; kDown: down [local_experts, d, inter].
  const bf16* w;
  int64_t n, k;  // weight rows and depth of one expert: (2 * inter, d) or (d, inter)
  int64_t inter;
  int32_t col_blocks;  // ceil(n / BN)
  Plan plan;
};

// Persistent blocks walk the (row tile, column block) pairs in use. kGateUp interleaves the
// expert's gate and up rows in the block tile (gate row i, then up row i), so each thread's
// accumulator pairs (c0, c1) and (c2, c3) hold gate and up of one activation: SiLU fuses
// into the epilogue with no exchange between threads.
template <class C, Stage S>
__global__ void __launch_bounds__(C::kThreads) moe_gemm_kernel(GemmArgs g) {
  extern __shared__ uint4 smem_raw[];
  bf16* smem = reinterpret_cast<bf16*>(smem_raw);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp % C::kWarpsM, warp_n = warp / C::kWarpsM;
  const int64_t items = int64_t{*g.plan.num_tiles} * g.col_blocks;
  const int ktiles = static_cast<int>((g.k + C::BK - 1) / C::BK);

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int tile = static_cast<int>(item / g.col_blocks);
    const int col_block = static_cast<int>(item % g.col_blocks);
    const int expert = g.plan.tile_expert[tile];
    const int row0 = g.plan.tile_row[tile];
    const int rows = min(C::BM, g.plan.offsets[expert + 1] - row0);
    const bf16* w = g.w + int64_t{expert} * g.n * g.k;

    // Where this thread's cp.async chunks come from; fixed over the k loop.
    const int chunk_k = (tid % C::kChunksPerRow) * 8;
    const bf16* a_src[C::kAIters];
    bool a_valid[C::kAIters];
#pragma unroll
    for (int i = 0; i < C::kAIters; ++i) {
      const int r = (tid + i * C::kThreads) / C::kChunksPerRow;
      a_valid[i] = r < rows;
      a_src[i] = g.a;
      if (a_valid[i]) {
        const int64_t pos = row0 + r;
        a_src[i] = S == Stage::kGateUp ? g.a + int64_t{g.sorted_slot[pos] / g.top_k} * g.k
                                       : g.a + pos * g.k;
      }
    }
    const bf16* b_src[C::kBIters];
    bool b_valid[C::kBIters];
#pragma unroll
    for (int i = 0; i < C::kBIters; ++i) {
      const int j = (tid + i * C::kThreads) / C::kChunksPerRow;
      int64_t row;
      if constexpr (S == Stage::kGateUp) {
        const int64_t act = int64_t{col_block} * (C::BN / 2) + j / 2;
        b_valid[i] = act < g.inter;
        row = j % 2 == 0 ? act : g.inter + act;
      } else {
        row = int64_t{col_block} * C::BN + j;
        b_valid[i] = row < g.n;
      }
      b_src[i] = b_valid[i] ? w + row * g.k : w;
    }

    const auto load_stage = [&](int stage, int ktile) {
      bf16* sa = smem + stage * C::kStageHalves;
      bf16* sb = sa + C::BM * C::kPitch;
      const int64_t k = int64_t{ktile} * C::BK + chunk_k;
      const bool k_valid = k < g.k;  // k is a multiple of 8: chunks are all in or all out
#pragma unroll
      for (int i = 0; i < C::kAIters; ++i) {
        const int r = (tid + i * C::kThreads) / C::kChunksPerRow;
        const bool valid = a_valid[i] && k_valid;
        cp_async_16(smem_addr(sa + r * C::kPitch + chunk_k), valid ? a_src[i] + k : g.a, valid);
      }
#pragma unroll
      for (int i = 0; i < C::kBIters; ++i) {
        const int j = (tid + i * C::kThreads) / C::kChunksPerRow;
        const bool valid = b_valid[i] && k_valid;
        cp_async_16(smem_addr(sb + j * C::kPitch + chunk_k), valid ? b_src[i] + k : w, valid);
      }
    };

    float acc[C::MI][C::NI][4];
#pragma unroll
    for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.0f;

#pragma unroll
    for (int s = 0; s < C::STAGES - 1; ++s) {
      if (s < ktiles) load_stage(s, s);
      cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
      cp_async_wait<C::STAGES - 2>();
      __syncthreads();  // stage kt landed for every thread; stage kt - 1 is free to refill
      const int next = kt + C::STAGES - 1;
      if (next < ktiles) load_stage(next % C::STAGES, next);
      cp_async_commit();

      const bf16* sa = smem + (kt % C::STAGES) * C::kStageHalves;
      const bf16* sb = sa + C::BM * C::kPitch;
#pragma unroll
      for (int kk = 0; kk < C::BK; kk += 16) {
        uint32_t af[C::MI][4], bfr[C::NI][2];
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi) {
          const int r = warp_m * C::WM + mi * 16 + lane % 16;
          ldmatrix_x4(af[mi], sa + r * C::kPitch + kk + (lane / 16) * 8);
        }
#pragma unroll
        for (int nj = 0; nj < C::NI / 2; ++nj) {
          // Matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
          const int n = warp_n * C::WN + nj * 16 + lane % 8 + (lane / 16) * 8;
          uint32_t r[4];
          ldmatrix_x4(r, sb + n * C::kPitch + kk + ((lane / 8) % 2) * 8);
          bfr[2 * nj][0] = r[0];
          bfr[2 * nj][1] = r[1];
          bfr[2 * nj + 1][0] = r[2];
          bfr[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < C::NI; ++ni) mma_bf16(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
      }
    }
    cp_async_wait<0>();

    // Accumulator q of (mi, ni): row r0 (+ 8 for q >= 2), column c0 (+ 1 for odd q).
#pragma unroll
    for (int mi = 0; mi < C::MI; ++mi) {
#pragma unroll
      for (int ni = 0; ni < C::NI; ++ni) {
        const int c0 = warp_n * C::WN + ni * 8 + (lane % 4) * 2;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = warp_m * C::WM + mi * 16 + lane / 4 + half * 8;
          if (r >= rows) continue;
          const int64_t pos = row0 + r;
          const float lo = acc[mi][ni][2 * half], hi = acc[mi][ni][2 * half + 1];
          if constexpr (S == Stage::kGateUp) {
            const int64_t i = int64_t{col_block} * (C::BN / 2) + c0 / 2;
            if (i < g.inter) {
              // lo: gate, hi: up. Same expression as cpu::silu_mul.
              g.plan.act[pos * g.inter + i] = __float2bfloat16_rn(lo / (1.0f + expf(-lo)) * hi);
            }
          } else {
            const int64_t col = int64_t{col_block} * C::BN + c0;
            if (col < g.n) {  // n is even: col + 1 is in range too
              *reinterpret_cast<float2*>(g.plan.y + pos * g.n + col) = make_float2(lo, hi);
            }
          }
        }
      }
    }
    __syncthreads();  // the next item's prologue overwrites stages still being read
  }
}

// ---------------------------------------------------------------------------------------------
// 1-3 with few slots: every slot's expert rows streamed once, GEMV-style, y by slot

constexpr int kGemvThreads = 256;
constexpr int kGemvGroup = 32;  // threads per pair of weight rows
constexpr int kGemvGroups = kGemvThreads / kGemvGroup;
constexpr int64_t kMaxGemvSlots = 65535;  // one grid row per slot

struct GemvArgs {
  const bf16* x;
  const int32_t* ids;
  const bf16* gate_up;
  const bf16* down;
  int32_t top_k, first_expert, local_experts;
  int64_t d, inter;
  Plan plan;  // writes slot_pos[s] = s or -1, act[s, :], y[s, :]
};

// The local expert of slot blockIdx.y, or -1; the kernel that wrote ids has finished.
__device__ __forceinline__ int gemv_expert(const GemvArgs& g) {
  const int e = g.ids[blockIdx.y] - g.first_expert;
  return e >= 0 && e < g.local_experts ? e : -1;
}

// act[s, j] = bf16(silu(x[t] . gate_e[j]) * (x[t] . up_e[j])), slot s = t * top_k + k; each
// thread group takes one j (its gate row and its up row).
__global__ void __launch_bounds__(kGemvThreads) moe_gemv_gate_up_kernel(GemvArgs g) {
  wait_for_prerequisite();  // ids and x
  allow_dependent_launch();
  const int64_t s = blockIdx.y;
  const int e = gemv_expert(g);
  if (blockIdx.x == 0 && threadIdx.x == 0)
    g.plan.slot_pos[s] = e >= 0 ? static_cast<int32_t>(s) : -1;
  if (e < 0) return;  // the whole block
  const int lane = threadIdx.x % kGemvGroup, group = threadIdx.x / kGemvGroup;
  const int64_t j = int64_t{blockIdx.x} * kGemvGroups + group;
  const int64_t row = j < g.inter ? j : g.inter - 1;  // past inter: re-read, dropped
  const bf16* w = g.gate_up + int64_t{e} * 2 * g.inter * g.d;
  RowDots<bf16, 1, 2, kGemvGroup> dots;
  dots.b[0] = w + row * g.d;
  dots.b[1] = w + (g.inter + row) * g.d;
  dots.chunks = g.d / 8;
  dots.c0 = lane;
  dots.load();
  float acc[1][2] = {};
  dots.dot(g.x + (s / g.top_k) * g.d, g.d, 1, acc);
  __shared__ float partial[kGemvThreads / 32][2];
  __shared__ float sums[kGemvGroups][2];
  group_sums<kGemvThreads, kGemvGroup>(acc, partial, sums);
  if (lane == 0 && j < g.inter) {
    const float gate = sums[group][0], up = sums[group][1];
    // Same expression as cpu::silu_mul and the tiled kernel's epilogue.
    g.plan.act[s * g.inter + j] = __float2bfloat16_rn(gate / (1.0f + expf(-gate)) * up);
  }
}

// y[s, i] = act[s] . down_e[i]; each thread group takes two rows i.
__global__ void __launch_bounds__(kGemvThreads) moe_gemv_down_kernel(GemvArgs g) {
  wait_for_prerequisite();  // act
  allow_dependent_launch();
  const int e = gemv_expert(g);
  if (e < 0) return;
  const int64_t s = blockIdx.y;
  const int lane = threadIdx.x % kGemvGroup, group = threadIdx.x / kGemvGroup;
  const int64_t row0 = (int64_t{blockIdx.x} * kGemvGroups + group) * 2;
  const bf16* w = g.down + int64_t{e} * g.d * g.inter;
  RowDots<bf16, 1, 2, kGemvGroup> dots;
#pragma unroll
  for (int r = 0; r < 2; ++r) dots.b[r] = w + (row0 + r < g.d ? row0 + r : g.d - 1) * g.inter;
  dots.chunks = g.inter / 8;
  dots.c0 = lane;
  dots.load();
  float acc[1][2] = {};
  dots.dot(g.plan.act + s * g.inter, g.inter, 1, acc);
  __shared__ float partial[kGemvThreads / 32][2];
  __shared__ float sums[kGemvGroups][2];
  group_sums<kGemvThreads, kGemvGroup>(acc, partial, sums);
  if (lane < 2 && row0 + lane < g.d) g.plan.y[s * g.d + row0 + lane] = sums[group][lane];
}

void launch_gemv(const MoeExpertsParams& p, const Plan& plan, cudaStream_t stream) {
  const GemvArgs g{p.x,
                   p.ids,
                   p.gate_up,
                   p.down,
                   static_cast<int32_t>(p.top_k),
                   static_cast<int32_t>(p.first_expert),
                   static_cast<int32_t>(p.local_experts),
                   p.d,
                   p.inter,
                   plan};
  const auto slots = static_cast<unsigned>(p.tokens * p.top_k);
  launch_dependent(moe_gemv_gate_up_kernel,
                   dim3(static_cast<unsigned>((p.inter + kGemvGroups - 1) / kGemvGroups), slots),
                   kGemvThreads, 0, stream, true, g);
  launch_dependent(
      moe_gemv_down_kernel,
      dim3(static_cast<unsigned>((p.d + 2 * kGemvGroups - 1) / (2 * kGemvGroups)), slots),
      kGemvThreads, 0, stream, true, g);
}

// ---------------------------------------------------------------------------------------------
// 4. Combine

struct CombineArgs {
  const int32_t* slot_pos;  // [tokens, top_k]
  const float* weights;     // [tokens, top_k]
  const float* y;           // [slots, d]
  float* out;               // [tokens, d]
  int32_t top_k;
  int64_t d;
};

// One block per token; float4 columns (d is a multiple of 8).
__global__ void __launch_bounds__(kCombineThreads) moe_combine_kernel(CombineArgs c) {
  wait_for_prerequisite();  // launched as a dependent: the kernels before have finished
  allow_dependent_launch();
  __shared__ int32_t pos[kMoeMaxTopK];
  __shared__ float weight[kMoeMaxTopK];
  __shared__ int32_t used;
  const int64_t t = blockIdx.x;
  if (threadIdx.x == 0) {
    int n = 0;
    for (int k = 0; k < c.top_k; ++k) {
      const int32_t p = c.slot_pos[t * c.top_k + k];
      if (p >= 0) {
        pos[n] = p;
        weight[n] = c.weights[t * c.top_k + k];
        ++n;
      }
    }
    used = n;
  }
  __syncthreads();
  if (used == 0) return;
  float4* out = reinterpret_cast<float4*>(c.out + t * c.d);
  for (int64_t i = threadIdx.x; i < c.d / 4; i += kCombineThreads) {
    float4 acc = out[i];
    for (int k = 0; k < used; ++k) {
      const float4 y = reinterpret_cast<const float4*>(c.y + int64_t{pos[k]} * c.d)[i];
      const float w = weight[k];
      acc.x += w * y.x;
      acc.y += w * y.y;
      acc.z += w * y.z;
      acc.w += w * y.w;
    }
    out[i] = acc;
  }
}

// ---------------------------------------------------------------------------------------------
// Launch

// Persistent launch: as many blocks as fit on the device at once, at most one per
// (row tile, column block) pair that can exist.
template <class C, Stage S>
void launch_gemm(const GemmArgs& g, int64_t row_tiles, cudaStream_t stream) {
  const auto kernel = moe_gemm_kernel<C, S>;
  MLA_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
  int device = 0, sms = 0, per_sm = 0;
  MLA_CUDA_CHECK(cudaGetDevice(&device));
  MLA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  MLA_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, C::kThreads, C::kSmemBytes));
  MLA_CHECK(per_sm >= 1, "a {}-byte MoE GEMM block does not fit on an SM", C::kSmemBytes);
  const auto blocks =
      static_cast<unsigned>(std::min(row_tiles * g.col_blocks, int64_t{sms} * per_sm));
  kernel<<<blocks, C::kThreads, C::kSmemBytes, stream>>>(g);
  MLA_CUDA_CHECK(cudaGetLastError());
}

template <class C>
void launch_gemms(const MoeExpertsParams& p, const Plan& plan, cudaStream_t stream) {
  const int64_t row_tiles = max_row_tiles(p.tokens * p.top_k, p.local_experts, C::BM);
  GemmArgs g{};
  g.sorted_slot = plan.sorted_slot;
  g.top_k = static_cast<int32_t>(p.top_k);
  g.inter = p.inter;
  g.plan = plan;

  g.a = p.x;
  g.w = p.gate_up;
  g.n = 2 * p.inter;
  g.k = p.d;
  g.col_blocks = static_cast<int32_t>((g.n + C::BN - 1) / C::BN);
  launch_gemm<C, Stage::kGateUp>(g, row_tiles, stream);

  g.a = plan.act;
  g.w = p.down;
  g.n = p.d;
  g.k = p.inter;
  g.col_blocks = static_cast<int32_t>((g.n + C::BN - 1) / C::BN);
  launch_gemm<C, Stage::kDown>(g, row_tiles, stream);
}

bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Dispatch, then the tiled GEMMs.
void launch_tiled(const MoeExpertsParams& p, const Plan& plan, int64_t slots, cudaStream_t stream) {
  const bool large = slots >= kLargeTileRows * p.experts;
  const DispatchArgs dispatch{p.ids,
                              static_cast<int32_t>(slots),
                              static_cast<int32_t>(p.first_expert),
                              static_cast<int32_t>(p.local_experts),
                              large ? LargeTiles::BM : SmallTiles::BM,
                              plan};
  moe_dispatch_kernel<<<1, kDispatchThreads, 0, stream>>>(dispatch);
  MLA_CUDA_CHECK(cudaGetLastError());

  if (large) {
    launch_gemms<LargeTiles>(p, plan, stream);
  } else {
    launch_gemms<SmallTiles>(p, plan, stream);
  }
}

}  // namespace

size_t moe_experts_workspace_bytes(int64_t max_tokens, int64_t top_k, int64_t local_experts,
                                   int64_t d, int64_t inter) {
  MLA_REQUIRE(max_tokens >= 0 && top_k >= 1 && local_experts >= 1 && d >= 1 && inter >= 1,
              "bad MoE workspace shape: {} tokens, top_k {}, {} experts, d {}, inter {}",
              max_tokens, top_k, local_experts, d, inter);
  return make_layout(max_tokens, top_k, local_experts, d, inter).bytes;
}

void moe_experts(const MoeExpertsParams& p, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream) {
  // Check shapes
  MLA_REQUIRE(p.tokens >= 0, "tokens must be >= 0, got {}", p.tokens);
  MLA_REQUIRE(1 <= p.top_k && p.top_k <= kMoeMaxTopK, "top_k must be in [1, {}], got {}",
              kMoeMaxTopK, p.top_k);
  // Slot indices are int32, with headroom for the dispatch's chunked loop.
  MLA_REQUIRE(p.tokens * p.top_k <= int64_t{1} << 30, "{} tokens x top_k {}: too many slots",
              p.tokens, p.top_k);
  MLA_REQUIRE(p.d >= 8 && p.d % 8 == 0, "d must be a positive multiple of 8, got {}", p.d);
  MLA_REQUIRE(p.inter >= 8 && p.inter % 8 == 0, "inter must be a positive multiple of 8, got {}",
              p.inter);
  MLA_REQUIRE(1 <= p.local_experts && p.local_experts <= kMoeMaxLocalExperts,
              "local_experts must be in [1, {}], got {}", kMoeMaxLocalExperts, p.local_experts);
  MLA_REQUIRE(p.first_expert >= 0 && p.first_expert + p.local_experts <= p.experts &&
                  p.experts <= INT32_MAX,
              "local experts [{}, {}) outside the model's {} routed experts", p.first_expert,
              p.first_expert + p.local_experts, p.experts);
  // Check layout
  MLA_REQUIRE(
      aligned(p.x, 16) && aligned(p.gate_up, 16) && aligned(p.down, 16) && aligned(p.out, 16),
      "x, gate_up, down and out must be 16-byte aligned");
  if (p.tokens == 0) return;
  // Check workspace
  const Layout l = make_layout(p.tokens, p.top_k, p.local_experts, p.d, p.inter);
  MLA_REQUIRE(workspace != nullptr && workspace_bytes >= l.bytes,
              "MoE experts on {} tokens need {} workspace bytes, got {}", p.tokens, l.bytes,
              workspace_bytes);
  MLA_REQUIRE(aligned(workspace, kAlign), "the MoE workspace must be {}-byte aligned", kAlign);

  auto* ws = static_cast<char*>(workspace);
  const Plan plan{reinterpret_cast<int32_t*>(ws + l.offsets),
                  reinterpret_cast<int32_t*>(ws + l.num_tiles),
                  reinterpret_cast<int32_t*>(ws + l.tile_expert),
                  reinterpret_cast<int32_t*>(ws + l.tile_row),
                  reinterpret_cast<int32_t*>(ws + l.sorted_slot),
                  reinterpret_cast<int32_t*>(ws + l.slot_pos),
                  reinterpret_cast<bf16*>(ws + l.act),
                  reinterpret_cast<float*>(ws + l.y)};
  const int64_t slots = p.tokens * p.top_k;
  if (slots <= std::min<int64_t>(p.gemv_max_slots, kMaxGemvSlots)) {
    launch_gemv(p, plan, stream);
  } else {
    launch_tiled(p, plan, slots, stream);
  }
  const CombineArgs combine{
      plan.slot_pos, p.weights, plan.y, p.out, static_cast<int32_t>(p.top_k), p.d};
  launch_dependent(moe_combine_kernel, static_cast<unsigned>(p.tokens), kCombineThreads, 0, stream,
                   true, combine);
}

}  // namespace mla::cuda
