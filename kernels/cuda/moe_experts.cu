#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernels/cuda/cp_async.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/moe_experts.h"
#include "kernels/cuda/moe_slots.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/row_dots.cuh"
#include "kernels/cuda/vec_io.cuh"

namespace mla::cuda {
namespace {

using bf16 = __nv_bfloat16;

using moe::Plan;

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
static_assert(SmallTiles::BM >= moe::kMinTileRows && LargeTiles::BM >= moe::kMinTileRows);
// Average slots per expert from which the large tiles are used.
constexpr int64_t kLargeTileRows = 32;

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
  int32_t slots;  // grid rows past `slots` are the tokens' shared-expert rows
  int64_t d, inter;
  Plan plan;  // writes slot_pos[s] = s or -1, act[s, :], y[s, :]
  MoeSharedExperts shared;
  float* out;  // the shared rows' results go straight to out [tokens, d]
};

// What one grid row (blockIdx.y) of the two kernels works on: a routed slot's expert, or a
// token's shared experts. `inter` is 0 for a slot routed to another rank's expert.
struct GemvRow {
  int64_t token;
  const bf16* gate_up;  // [2 * inter, d]
  const bf16* down;     // [d, inter]
  bf16* act;            // [inter]
  int64_t inter;
};

// Grid rows past the slots' are the tokens' shared-expert rows.
__device__ __forceinline__ bool gemv_shared_row(const GemvArgs& g) { return blockIdx.y >= g.slots; }

// Reads ids only for a routed slot (so only after wait_for_prerequisite() there).
__device__ __forceinline__ GemvRow gemv_row(const GemvArgs& g) {
  const int64_t s = blockIdx.y;
  if (gemv_shared_row(g)) {
    const int64_t t = s - g.slots;
    return {t, g.shared.gate_up, g.shared.down, g.shared.act + t * g.shared.inter, g.shared.inter};
  }
  GemvRow row{s / g.top_k, nullptr, nullptr, g.plan.act + s * g.inter, 0};
  const int e = g.ids[s] - g.first_expert;
  if (e >= 0 && e < g.local_experts) {
    row.gate_up = g.gate_up + int64_t{e} * 2 * g.inter * g.d;
    row.down = g.down + int64_t{e} * g.d * g.inter;
    row.inter = g.inter;
  }
  return row;
}

// act[j] = bf16(silu(x[t] . gate[j]) * (x[t] . up[j])) for the grid row's MLP (a routed slot
// s = t * top_k + k, or token t's shared experts); each thread group takes one j (its gate row
// and its up row). A shared row starts streaming its weights before it waits for x; a routed
// one must first read its expert id.
__global__ void __launch_bounds__(kGemvThreads) moe_gemv_gate_up_kernel(GemvArgs g) {
  const bool shared = gemv_shared_row(g);
  if (!shared) wait_for_prerequisite();  // ids
  const GemvRow m = gemv_row(g);
  if (!shared && blockIdx.x == 0 && threadIdx.x == 0) {
    g.plan.slot_pos[blockIdx.y] = m.inter > 0 ? static_cast<int32_t>(blockIdx.y) : -1;
  }
  const int lane = threadIdx.x % kGemvGroup, group = threadIdx.x / kGemvGroup;
  const int64_t j0 = int64_t{blockIdx.x} * kGemvGroups;
  if (j0 >= m.inter) {  // the whole block: another rank's expert, or past this row's width
    if (shared) wait_for_prerequisite();
    return;
  }
  const int64_t j = j0 + group;
  const int64_t row = j < m.inter ? j : m.inter - 1;  // past inter: re-read, dropped
  RowDots<bf16, 1, 2, kGemvGroup> dots;
  dots.b[0] = m.gate_up + row * g.d;
  dots.b[1] = m.gate_up + (m.inter + row) * g.d;
  dots.chunks = g.d / 8;
  dots.c0 = lane;
  dots.load();
  if (shared) wait_for_prerequisite();  // x
  allow_dependent_launch();
  float acc[1][2] = {};
  dots.dot(g.x + m.token * g.d, g.d, 1, acc);
  __shared__ float partial[kGemvThreads / 32][2];
  __shared__ float sums[kGemvGroups][2];
  group_sums<kGemvThreads, kGemvGroup>(acc, partial, sums);
  if (lane == 0 && j < m.inter) {
    const float gate = sums[group][0], up = sums[group][1];
    // Same expression as cpu::silu_mul and the tiled kernel's epilogue.
    m.act[j] = __float2bfloat16_rn(gate / (1.0f + expf(-gate)) * up);
  }
}

// y[s, i] = act[s] . down_e[i] for a routed slot, out[t, i] = act . down_shared[i] for a
// token's shared row; each thread group takes two rows i.
__global__ void __launch_bounds__(kGemvThreads) moe_gemv_down_kernel(GemvArgs g) {
  const bool shared = gemv_shared_row(g);
  // A routed row's weights depend on its id, a shared row's do not: it loads them first.
  if (!shared) wait_for_prerequisite();  // act, ids
  const GemvRow m = gemv_row(g);
  if (m.inter == 0) {
    if (shared) wait_for_prerequisite();
    return;
  }
  const int lane = threadIdx.x % kGemvGroup, group = threadIdx.x / kGemvGroup;
  const int64_t row0 = (int64_t{blockIdx.x} * kGemvGroups + group) * 2;
  RowDots<bf16, 1, 2, kGemvGroup> dots;
#pragma unroll
  for (int r = 0; r < 2; ++r) dots.b[r] = m.down + (row0 + r < g.d ? row0 + r : g.d - 1) * m.inter;
  dots.chunks = m.inter / 8;
  dots.c0 = lane;
  dots.load();
  if (shared) wait_for_prerequisite();  // act
  allow_dependent_launch();
  float acc[1][2] = {};
  dots.dot(m.act, m.inter, 1, acc);
  __shared__ float partial[kGemvThreads / 32][2];
  __shared__ float sums[kGemvGroups][2];
  group_sums<kGemvThreads, kGemvGroup>(acc, partial, sums);
  if (lane < 2 && row0 + lane < g.d) {
    float* y = shared ? g.out + m.token * g.d : g.plan.y + int64_t{blockIdx.y} * g.d;
    y[row0 + lane] = sums[group][lane];
  }
}

void launch_gemv(const MoeExpertsParams& p, const Plan& plan, cudaStream_t stream) {
  const auto slots = static_cast<int32_t>(p.tokens * p.top_k);
  const GemvArgs g{p.x,
                   p.ids,
                   p.gate_up,
                   p.down,
                   static_cast<int32_t>(p.top_k),
                   static_cast<int32_t>(p.first_expert),
                   static_cast<int32_t>(p.local_experts),
                   slots,
                   p.d,
                   p.inter,
                   plan,
                   p.shared,
                   p.out};
  const int64_t widest = std::max(p.inter, p.shared.inter);
  const auto rows = static_cast<unsigned>(slots + (p.shared.inter > 0 ? p.tokens : 0));
  launch_dependent(moe_gemv_gate_up_kernel,
                   dim3(static_cast<unsigned>((widest + kGemvGroups - 1) / kGemvGroups), rows),
                   kGemvThreads, 0, stream, true, g);
  launch_dependent(
      moe_gemv_down_kernel,
      dim3(static_cast<unsigned>((p.d + 2 * kGemvGroups - 1) / (2 * kGemvGroups)), rows),
      kGemvThreads, 0, stream, true, g);
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
  const int64_t row_tiles = moe::max_row_tiles(p.tokens * p.top_k, p.local_experts, C::BM);
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

// Dispatch, then the tiled GEMMs.
void launch_tiled(const MoeExpertsParams& p, const Plan& plan, int64_t slots, cudaStream_t stream) {
  const bool large = slots >= kLargeTileRows * p.experts;
  moe::launch_dispatch(p.ids, slots, p.first_expert, p.local_experts,
                       large ? LargeTiles::BM : SmallTiles::BM, plan, stream);

  if (large) {
    launch_gemms<LargeTiles>(p, plan, stream);
  } else {
    launch_gemms<SmallTiles>(p, plan, stream);
  }
}

}  // namespace

size_t moe_experts_workspace_bytes(int64_t max_tokens, int64_t top_k, int64_t local_experts,
                                   int64_t d, int64_t inter) {
  return moe::workspace_bytes(max_tokens, top_k, local_experts, d, inter, 1, false);
}

bool moe_experts_streams(const MoeExpertsParams& p) {
  // One grid row per slot, and per token for the shared experts: at most kMaxGemvSlots rows.
  return p.tokens * p.top_k <= std::min<int64_t>(p.gemv_max_slots, kMaxGemvSlots - p.tokens);
}

void moe_experts(const MoeExpertsParams& p, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream) {
  // Check shapes
  moe::check_shape(p.tokens, p.top_k, p.d, p.inter, 8, p.first_expert, p.local_experts, p.experts);
  const MoeSharedExperts& shared = p.shared;
  MLA_REQUIRE(shared.inter >= 0 && shared.inter % 8 == 0,
              "shared.inter must be a multiple of 8, got {}", shared.inter);
  MLA_REQUIRE(shared.inter == 0 || moe_experts_streams(p),
              "shared experts go with the weight-streaming kernels only ({} slots, at most {})",
              p.tokens * p.top_k, p.gemv_max_slots);
  // Check layout
  MLA_REQUIRE(is_aligned(p.x, 16) && is_aligned(p.gate_up, 16) && is_aligned(p.down, 16) &&
                  is_aligned(p.out, 16),
              "x, gate_up, down and out must be 16-byte aligned");
  MLA_REQUIRE(shared.inter == 0 || (is_aligned(shared.gate_up, 16) && is_aligned(shared.down, 16) &&
                                    is_aligned(shared.act, 16)),
              "the shared experts' gate_up, down and act must be 16-byte aligned");
  if (p.tokens == 0) return;
  const Plan plan = moe::workspace_plan(workspace, workspace_bytes, p.tokens, p.top_k,
                                        p.local_experts, p.d, p.inter, false);
  if (moe_experts_streams(p)) {
    launch_gemv(p, plan, stream);
  } else {
    launch_tiled(p, plan, p.tokens * p.top_k, stream);
  }
  moe::launch_combine(plan, p.weights, p.out, p.tokens, p.top_k, p.d, stream);
}

}  // namespace mla::cuda
