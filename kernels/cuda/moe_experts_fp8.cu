#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/fp8_dots.cuh"
#include "kernels/cuda/fp8_gemm.h"
#include "kernels/cuda/moe_experts.h"
#include "kernels/cuda/moe_experts_fp8.h"
#include "kernels/cuda/moe_slots.cuh"
#include "kernels/cuda/vec_io.cuh"
#include "kernels/error.h"

namespace mla::cuda {
namespace {

using moe::Plan;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = static_cast<int>(kFp8GemmRowTile);  // activation rows of a row tile
static_assert(kTileRows >= moe::kMinTileRows);
// Weight rows a warp reads: two gate rows and the two up rows of the same activations, or four
// down rows.
constexpr int kRowsPerWarp = 4;
constexpr int64_t kMaxGridRows = 65535;

enum class Stage { kGateUp, kDown };

struct ExpertArgs {
  // kGateUp: qx [tokens, d], gathered through sorted_slot; kDown: qact [slots, inter].
  const uint8_t* a;
  const float* a_scale;
  // kGateUp: gate_up [local_experts, 2 * inter, d]; kDown: down [local_experts, d, inter].
  const uint8_t* w;
  const float* w_scale;
  int64_t n, k;  // one expert's weight rows and depth
  int64_t inter;
  int32_t top_k;
  Plan plan;
};

// Block (x, tile): row tile `tile` of the dispatch (blocks past the tiles in use exit) against
// kWarps * kRowsPerWarp weight rows of its expert. Writes act (kGateUp) or y (kDown) by sorted
// position. MT >= the rows of any tile (an expert has at most `tokens` rows): accumulators for
// rows no tile has would only cost registers.
template <Stage S, int MT>
__global__ void __launch_bounds__(kThreads) expert_kernel(ExpertArgs g) {
  const int tile = static_cast<int>(blockIdx.y);
  if (tile >= *g.plan.num_tiles) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int expert = g.plan.tile_expert[tile];
  const int row0 = g.plan.tile_row[tile];
  const int rows = min(MT, g.plan.offsets[expert + 1] - row0);
  const int64_t groups = g.k / 128;
  const uint8_t* w_e = g.w + int64_t{expert} * g.n * g.k;
  const float* ws_e = g.w_scale + int64_t{expert} * g.n * groups;

  // This warp's weight rows; past the end they re-read the last row, and the results drop.
  const int64_t unit = (int64_t{blockIdx.x} * kWarps + warp) * (S == Stage::kGateUp ? 2 : 4);
  const int64_t limit = S == Stage::kGateUp ? g.inter : g.n;
  if (unit >= limit) return;
  const uint8_t* w[kRowsPerWarp];
  const float* ws[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    int64_t row;
    if constexpr (S == Stage::kGateUp) {
      const int64_t j = min(unit + r % 2, g.inter - 1);
      row = r < 2 ? j : g.inter + j;  // gate j, gate j + 1, up j, up j + 1
    } else {
      row = min(unit + r, g.n - 1);
    }
    w[r] = w_e + row * g.k;
    ws[r] = ws_e + row * groups;
  }
  const uint8_t* x[MT];
  const float* xs[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const int64_t pos = row0 + min(i, rows - 1);
    const int64_t a_row = S == Stage::kGateUp ? g.plan.sorted_slot[pos] / g.top_k : pos;
    x[i] = g.a + a_row * g.k;
    xs[i] = g.a_scale + a_row * groups;
  }
  float acc[MT][kRowsPerWarp];
  fp8_warp_dots<MT, kRowsPerWarp>(w, ws, x, xs, rows, g.k, lane, acc);
  if (lane != 0) return;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    if (i >= rows) break;
    const int64_t pos = row0 + i;
    if constexpr (S == Stage::kGateUp) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float gate = acc[i][c], up = acc[i][2 + c];
        // Same expression as cpu::silu_mul and the bf16 expert kernels.
        if (unit + c < g.inter)
          g.plan.act[pos * g.inter + unit + c] =
              __float2bfloat16_rn(gate / (1.0f + expf(-gate)) * up);
      }
    } else {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (unit + r < g.n) g.plan.y[pos * g.n + unit + r] = acc[i][r];
      }
    }
  }
}

template <Stage S>
void launch_expert(const ExpertArgs& g, int64_t tokens, int64_t row_tiles, cudaStream_t stream) {
  const int64_t per_block = kWarps * (S == Stage::kGateUp ? 2 : kRowsPerWarp);
  const int64_t units = S == Stage::kGateUp ? g.inter : g.n;
  const dim3 grid(static_cast<unsigned>((units + per_block - 1) / per_block),
                  static_cast<unsigned>(row_tiles));
  // Each output row sums the same terms in the same order whatever MT: still batch-invariant.
  if (tokens <= 1) {
    expert_kernel<S, 1><<<grid, kThreads, 0, stream>>>(g);
  } else if (tokens <= 2) {
    expert_kernel<S, 2><<<grid, kThreads, 0, stream>>>(g);
  } else if (tokens <= 4) {
    expert_kernel<S, 4><<<grid, kThreads, 0, stream>>>(g);
  } else if (tokens <= 8) {
    expert_kernel<S, 8><<<grid, kThreads, 0, stream>>>(g);
  } else {
    expert_kernel<S, kTileRows><<<grid, kThreads, 0, stream>>>(g);
  }
  MLA_CUDA_CHECK(cudaGetLastError());
}

// fp8_quantize_rows over `m` rows, in launches of at most kMaxGridRows rows.
void quantize_rows(const __nv_bfloat16* x, int64_t m, int64_t k, uint8_t* q, float* scale,
                   cudaStream_t stream) {
  for (int64_t r0 = 0; r0 < m; r0 += kMaxGridRows) {
    fp8_quantize_rows({.x = x + r0 * k,
                       .x_dtype = DType::kBF16,
                       .m = std::min(kMaxGridRows, m - r0),
                       .k = k,
                       .ldx = k,
                       .q = q + r0 * k,
                       .scale = scale + r0 * (k / 128)},
                      stream);
  }
}

}  // namespace

size_t moe_experts_fp8_workspace_bytes(int64_t max_tokens, int64_t top_k, int64_t local_experts,
                                       int64_t d, int64_t inter) {
  return moe::workspace_bytes(max_tokens, top_k, local_experts, d, inter, 128, true);
}

void moe_experts_fp8(const MoeExpertsFp8Params& p, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream) {
  // Check shapes
  moe::check_shape(p.tokens, p.top_k, p.d, p.inter, 128, p.first_expert, p.local_experts,
                   p.experts);
  const int64_t slots = p.tokens * p.top_k;
  const int64_t row_tiles = moe::max_row_tiles(slots, p.local_experts, kTileRows);
  MLA_REQUIRE(row_tiles <= kMaxGridRows, "fp8 MoE experts: {} slots need more than {} row tiles",
              slots, kMaxGridRows);
  // Check layout
  MLA_REQUIRE(is_aligned(p.x, 16) && is_aligned(p.gate_up, 16) && is_aligned(p.down, 16) &&
                  is_aligned(p.out, 16) && p.gate_up_scale != nullptr && p.down_scale != nullptr,
              "x, gate_up, down and out must be 16-byte aligned, and both scales given");
  if (p.tokens == 0) return;
  const Plan plan = moe::workspace_plan(workspace, workspace_bytes, p.tokens, p.top_k,
                                        p.local_experts, p.d, p.inter, true);

  quantize_rows(p.x, p.tokens, p.d, plan.qx, plan.sx, stream);
  moe::launch_dispatch(p.ids, slots, p.first_expert, p.local_experts, kTileRows, plan, stream);
  ExpertArgs g{};
  g.top_k = static_cast<int32_t>(p.top_k);
  g.inter = p.inter;
  g.plan = plan;

  g.a = plan.qx;
  g.a_scale = plan.sx;
  g.w = p.gate_up;
  g.w_scale = p.gate_up_scale;
  g.n = 2 * p.inter;
  g.k = p.d;
  launch_expert<Stage::kGateUp>(g, p.tokens, row_tiles, stream);

  // Rows past the slots in use hold stale values; nothing reads their quantised copies.
  quantize_rows(plan.act, slots, p.inter, plan.qact, plan.sact, stream);
  g.a = plan.qact;
  g.a_scale = plan.sact;
  g.w = p.down;
  g.w_scale = p.down_scale;
  g.n = p.d;
  g.k = p.inter;
  launch_expert<Stage::kDown>(g, p.tokens, row_tiles, stream);

  moe::launch_combine(plan, p.weights, p.out, p.tokens, p.top_k, p.d, stream);
}

}  // namespace mla::cuda
