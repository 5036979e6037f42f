#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/moe_experts.h"
#include "kernels/cuda/moe_slots.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/vec_io.cuh"
#include "kernels/cuda/workspace_layout.h"
#include "kernels/error.h"

namespace mla::cuda::moe {
namespace {

using bf16 = __nv_bfloat16;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kDispatchThreads = 1024;
constexpr int kDispatchWarps = kDispatchThreads / 32;
constexpr int kCombineThreads = 256;
constexpr int kPerLane = kMoeMaxLocalExperts / 32;  // experts per lane in the dispatch scans

}  // namespace

int64_t max_row_tiles(int64_t slots, int64_t experts, int64_t bm) {
  return std::min(slots, slots / bm + std::min(slots, experts));
}

Layout make_layout(int64_t tokens, int64_t top_k, int64_t local_experts, int64_t d, int64_t inter,
                   bool fp8) {
  const auto slots = static_cast<size_t>(tokens * top_k);
  const auto tiles =
      static_cast<size_t>(max_row_tiles(tokens * top_k, local_experts, kMinTileRows));
  Layout l{};
  WorkspaceLayout parts;
  l.offsets = parts.take((local_experts + 1) * sizeof(int32_t));
  l.num_tiles = parts.take(sizeof(int32_t));
  l.tile_expert = parts.take(tiles * sizeof(int32_t));
  l.tile_row = parts.take(tiles * sizeof(int32_t));
  l.sorted_slot = parts.take(slots * sizeof(int32_t));
  l.slot_pos = parts.take(slots * sizeof(int32_t));
  l.act = parts.take(slots * inter * sizeof(bf16));
  l.y = parts.take(slots * d * sizeof(float));
  if (fp8) {
    l.qx = parts.take(tokens * d);
    l.sx = parts.take(tokens * (d / 128) * sizeof(float));
    l.qact = parts.take(slots * inter);
    l.sact = parts.take(slots * (inter / 128) * sizeof(float));
  }
  l.bytes = parts.bytes();
  return l;
}

size_t workspace_bytes(int64_t max_tokens, int64_t top_k, int64_t local_experts, int64_t d,
                       int64_t inter, int64_t min_width, bool fp8) {
  MLA_REQUIRE(
      max_tokens >= 0 && top_k >= 1 && local_experts >= 1 && d >= min_width && inter >= min_width,
      "bad MoE workspace shape: {} tokens, top_k {}, {} experts, d {}, inter {}", max_tokens, top_k,
      local_experts, d, inter);
  return make_layout(max_tokens, top_k, local_experts, d, inter, fp8).bytes;
}

Plan workspace_plan(void* workspace, size_t workspace_bytes, int64_t tokens, int64_t top_k,
                    int64_t local_experts, int64_t d, int64_t inter, bool fp8) {
  const Layout l = make_layout(tokens, top_k, local_experts, d, inter, fp8);
  MLA_REQUIRE(workspace != nullptr && workspace_bytes >= l.bytes,
              "MoE experts on {} tokens need {} workspace bytes, got {}", tokens, l.bytes,
              workspace_bytes);
  MLA_REQUIRE(is_aligned(workspace, kAlign), "the MoE workspace must be {}-byte aligned", kAlign);
  auto* ws = static_cast<char*>(workspace);
  Plan plan{reinterpret_cast<int32_t*>(ws + l.offsets),
            reinterpret_cast<int32_t*>(ws + l.num_tiles),
            reinterpret_cast<int32_t*>(ws + l.tile_expert),
            reinterpret_cast<int32_t*>(ws + l.tile_row),
            reinterpret_cast<int32_t*>(ws + l.sorted_slot),
            reinterpret_cast<int32_t*>(ws + l.slot_pos),
            reinterpret_cast<bf16*>(ws + l.act),
            reinterpret_cast<float*>(ws + l.y)};
  if (l.qx != 0) {
    plan.qx = reinterpret_cast<uint8_t*>(ws + l.qx);
    plan.sx = reinterpret_cast<float*>(ws + l.sx);
    plan.qact = reinterpret_cast<uint8_t*>(ws + l.qact);
    plan.sact = reinterpret_cast<float*>(ws + l.sact);
  }
  return plan;
}

void check_shape(int64_t tokens, int64_t top_k, int64_t d, int64_t inter, int64_t multiple,
                 int64_t first_expert, int64_t local_experts, int64_t experts) {
  MLA_REQUIRE(tokens >= 0, "tokens must be >= 0, got {}", tokens);
  MLA_REQUIRE(1 <= top_k && top_k <= kMoeMaxTopK, "top_k must be in [1, {}], got {}", kMoeMaxTopK,
              top_k);
  // Slot indices are int32, with headroom for the dispatch's chunked loop.
  MLA_REQUIRE(tokens * top_k <= int64_t{1} << 30, "{} tokens x top_k {}: too many slots", tokens,
              top_k);
  MLA_REQUIRE(d >= multiple && d % multiple == 0, "d must be a positive multiple of {}, got {}",
              multiple, d);
  MLA_REQUIRE(inter >= multiple && inter % multiple == 0,
              "inter must be a positive multiple of {}, got {}", multiple, inter);
  MLA_REQUIRE(1 <= local_experts && local_experts <= kMoeMaxLocalExperts,
              "local_experts must be in [1, {}], got {}", kMoeMaxLocalExperts, local_experts);
  MLA_REQUIRE(first_expert >= 0 && first_expert + local_experts <= experts && experts <= INT32_MAX,
              "local experts [{}, {}) outside the model's {} routed experts", first_expert,
              first_expert + local_experts, experts);
}

namespace {

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

}  // namespace

void launch_dispatch(const int32_t* ids, int64_t slots, int64_t first_expert, int64_t local_experts,
                     int tile_rows, const Plan& plan, cudaStream_t stream) {
  MLA_CHECK(tile_rows >= kMinTileRows, "row tiles of {} rows: fewer than the layout's {}",
            tile_rows, kMinTileRows);
  const DispatchArgs dispatch{ids,
                              static_cast<int32_t>(slots),
                              static_cast<int32_t>(first_expert),
                              static_cast<int32_t>(local_experts),
                              tile_rows,
                              plan};
  moe_dispatch_kernel<<<1, kDispatchThreads, 0, stream>>>(dispatch);
  MLA_CUDA_CHECK(cudaGetLastError());
}

void launch_combine(const Plan& plan, const float* weights, float* out, int64_t tokens,
                    int64_t top_k, int64_t d, cudaStream_t stream) {
  const CombineArgs combine{plan.slot_pos, weights, plan.y, out, static_cast<int32_t>(top_k), d};
  launch_dependent(moe_combine_kernel, static_cast<unsigned>(tokens), kCombineThreads, 0, stream,
                   true, combine);
}

}  // namespace mla::cuda::moe
