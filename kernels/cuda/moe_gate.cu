#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/moe_gate.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/row_dots.cuh"
#include "kernels/error.h"

namespace mla::cuda {
namespace {

constexpr int kWarps = 4;  // tokens per block
constexpr int kPerLane = kMoeGateMaxExperts / 32;
constexpr int64_t kMaxTopK = 32;  // one chosen expert per lane
constexpr unsigned kFull = 0xffffffffu;

// The CPU reference calls glibc's expf, which rounds correctly in all but rare cases; CUDA's
// expf may be 2 ulp off. Through double the scores come out bit-identical almost always, so
// near-ties between experts resolve the same way on both sides.
__device__ __forceinline__ float exp_as_cpu(float x) {
  return static_cast<float>(exp(static_cast<double>(x)));
}

struct Pick {
  float value;
  int32_t index;  // -1: no candidate
};

// Larger value first, then lower index: a total order, so every lane agrees on the winner.
__device__ __forceinline__ Pick better(Pick a, Pick b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

__device__ __forceinline__ Pick warp_best(Pick p) {
  for (int offset = 16; offset > 0; offset /= 2) {
    p = better(
        p, Pick{__shfl_xor_sync(kFull, p.value, offset), __shfl_xor_sync(kFull, p.index, offset)});
  }
  return p;
}

// Token t's top-k experts and weights, by one warp; scores and choice are the warp's shared
// arrays of kMoeGateMaxExperts. Logits are read past L1: moe_route's blocks on other SMs have
// just written them.
__device__ void gate_token(const MoeGateParams& p, int64_t t, float* scores, float* choice) {
  const int lane = threadIdx.x % 32;
  const int E = static_cast<int>(p.experts);
  const float* lg = p.logits + t * p.experts;
  const bool noaux = p.gate == cpu::MoeGate::kSigmoidNoauxTc;

  if (noaux) {
    for (int e = lane; e < E; e += 32) {
      const float s = 1.0f / (1.0f + exp_as_cpu(-__ldcg(lg + e)));
      scores[e] = s;
      choice[e] = s + p.bias[e];
    }
  } else {
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, __ldcg(lg + e));
    for (int offset = 16; offset > 0; offset /= 2) {
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, offset));
    }
    for (int e = lane; e < E; e += 32) scores[e] = exp_as_cpu(__ldcg(lg + e) - mx);
    __syncwarp();
    // One lane sums in index order, as the CPU does, so the sum rounds identically.
    float sum = 0.0f;
    if (lane == 0) {
      for (int e = 0; e < E; ++e) sum += scores[e];
    }
    const float inv = 1.0f / __shfl_sync(kFull, sum, 0);
    for (int e = lane; e < E; e += 32) {
      const float s = scores[e] * inv;
      scores[e] = s;
      choice[e] = s;
    }
  }
  __syncwarp();

  if (p.gate != cpu::MoeGate::kSoftmaxGreedy) {
    const int groups = static_cast<int>(p.n_group), group_size = E / groups;
    Pick mine{0.0f, -1};
    if (lane < groups) {
      const float* c = choice + lane * group_size;
      if (noaux) {
        float top0 = -INFINITY, top1 = -INFINITY;
        for (int i = 0; i < group_size; ++i) {
          const float v = c[i];
          if (v > top0) {
            top1 = top0;
            top0 = v;
          } else if (v > top1) {
            top1 = v;
          }
        }
        mine = {top0 + top1, lane};
      } else {
        float m = c[0];
        for (int i = 1; i < group_size; ++i) m = fmaxf(m, c[i]);
        mine = {m, lane};
      }
    }
    unsigned keep = 0;
    for (int64_t g = 0; g < p.topk_group; ++g) {
      const Pick best = warp_best((keep >> lane) & 1u ? Pick{0.0f, -1} : mine);
      keep |= 1u << best.index;
    }
    const float masked = noaux ? -INFINITY : 0.0f;  // the CPU's mask values
    for (int e = lane; e < E; e += 32) {
      if (!((keep >> (e / group_size)) & 1u)) choice[e] = masked;
    }
    __syncwarp();
  }

  float candidate[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int e = lane + 32 * j;
    candidate[j] = e < E ? choice[e] : 0.0f;
  }
  unsigned taken = 0;
  int32_t my_id = -1;  // lane k holds the k-th chosen expert
  for (int k = 0; k < p.top_k; ++k) {
    Pick local{0.0f, -1};
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane + 32 * j;
      if (e < E && !((taken >> j) & 1u)) local = better(local, Pick{candidate[j], e});
    }
    const Pick best = warp_best(local);
    if (best.index % 32 == lane) taken |= 1u << (best.index / 32);
    if (lane == k) my_id = best.index;
  }

  const float my_score = lane < p.top_k ? scores[my_id] : 0.0f;
  float denom = 0.0f;  // summed in k order by every lane, as the CPU does
  for (int k = 0; k < p.top_k; ++k) denom += __shfl_sync(kFull, my_score, k);
  if (lane < p.top_k) {
    float weight = my_score;
    if (p.renormalize) weight /= denom + 1e-20f;
    p.ids[t * p.top_k + lane] = my_id;
    p.weights[t * p.top_k + lane] = weight * p.scaling;
  }
}

__global__ void __launch_bounds__(kWarps * 32) moe_gate_kernel(MoeGateParams p) {
  wait_for_prerequisite();  // launched as a dependent: the kernels before have finished
  allow_dependent_launch();
  __shared__ float s_scores[kWarps][kMoeGateMaxExperts];
  __shared__ float s_choice[kWarps][kMoeGateMaxExperts];
  const int warp = threadIdx.x / 32;
  const int64_t t = int64_t{blockIdx.x} * kWarps + warp;
  if (t >= p.tokens) return;  // whole warps only: no block-wide barrier follows
  gate_token(p, t, s_scores[warp], s_choice[warp]);
}

// moe_route: blocks of kRouteThreads, each G-thread group taking two experts' weight rows
// (RowDots, as skinny_gemm), every token's logits against them; the last block to finish then
// gates the tokens, one warp each.
constexpr int kRouteThreads = 256;
constexpr int kRouteWarps = kRouteThreads / 32;
static_assert(kMoeRouteMaxTokens <= kRouteWarps, "a warp per token in the last block");

struct RouteArgs {
  const float* x;
  const float* weight;
  int64_t d;
  float* logits;  // written here, then read by the last block as gate.logits
  int32_t* counter;
  MoeGateParams gate;
};

template <int MT, int G>
__global__ void __launch_bounds__(kRouteThreads) moe_route_kernel(RouteArgs a) {
  constexpr int R = 2, kGroups = kRouteThreads / G;
  const MoeGateParams& p = a.gate;
  const int lane = threadIdx.x % G, group = threadIdx.x / G;
  const int64_t e0 = (int64_t{blockIdx.x} * kGroups + group) * R;
  RowDots<float, MT, R, G> dots;
#pragma unroll
  for (int r = 0; r < R; ++r) {  // experts past the last re-read it; their sums are dropped
    dots.b[r] = a.weight + (e0 + r < p.experts ? e0 + r : p.experts - 1) * a.d;
  }
  dots.chunks = a.d / 4;
  dots.c0 = lane;
  dots.load();  // the weight only: before waiting for the kernel that wrote x
  wait_for_prerequisite();
  allow_dependent_launch();
  float acc[MT][R] = {};
  dots.dot(a.x, a.d, p.tokens, acc);
  __shared__ float partial[kRouteWarps][MT * R];
  __shared__ float sums[kGroups][MT * R];
  group_sums<kRouteThreads, G>(acc, partial, sums);
  if (lane < MT * R) {
    const int i = lane / R, r = lane % R;
    if (i < p.tokens && e0 + r < p.experts) {
      a.logits[i * p.experts + e0 + r] = sums[group][lane];
    }
  }
  // Publish this block's logits, then count it; the block that counts last sees every block's.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  // atomicInc wraps to 0 on the last block's increment: the counter is ready for the next
  // launch (graph replays too) without a store of its own.
  if (threadIdx.x == 0) {
    const unsigned n = gridDim.x - 1;
    last = atomicInc(reinterpret_cast<unsigned*>(a.counter), n) == n;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  __shared__ float s_scores[kRouteWarps][kMoeGateMaxExperts];
  __shared__ float s_choice[kRouteWarps][kMoeGateMaxExperts];
  const int warp = threadIdx.x / 32;
  if (warp < p.tokens) gate_token(p, warp, s_scores[warp], s_choice[warp]);
}

template <int MT>
void launch_route(const RouteArgs& a, cudaStream_t stream) {
  const int64_t pairs = (a.gate.experts + 1) / 2, chunks = a.d / 4;
  const int g = row_dots_group_width(pairs, chunks, kRouteThreads);
  const auto blocks = static_cast<unsigned>((pairs + kRouteThreads / g - 1) / (kRouteThreads / g));
  switch (g) {
    case 32:
      launch_dependent(moe_route_kernel<MT, 32>, blocks, kRouteThreads, 0, stream, true, a);
      break;
    case 64:
      launch_dependent(moe_route_kernel<MT, 64>, blocks, kRouteThreads, 0, stream, true, a);
      break;
    case 128:
      launch_dependent(moe_route_kernel<MT, 128>, blocks, kRouteThreads, 0, stream, true, a);
      break;
    default:
      launch_dependent(moe_route_kernel<MT, 256>, blocks, kRouteThreads, 0, stream, true, a);
      break;
  }
}

void check_gate(const MoeGateParams& p) {
  // Check shapes
  MLA_REQUIRE(p.tokens >= 0, "tokens must be >= 0, got {}", p.tokens);
  MLA_REQUIRE(1 <= p.experts && p.experts <= kMoeGateMaxExperts,
              "experts must be in [1, {}], got {}", kMoeGateMaxExperts, p.experts);
  MLA_REQUIRE(1 <= p.top_k && p.top_k <= p.experts && p.top_k <= kMaxTopK,
              "top_k must be in [1, min({}, {})], got {}", p.experts, kMaxTopK, p.top_k);
  // Check groups
  if (p.gate != cpu::MoeGate::kSoftmaxGreedy) {
    MLA_REQUIRE(1 <= p.n_group && p.n_group <= kMoeGateMaxGroups && p.experts % p.n_group == 0,
                "n_group must divide {} experts and be at most {}, got {}", p.experts,
                kMoeGateMaxGroups, p.n_group);
    MLA_REQUIRE(1 <= p.topk_group && p.topk_group <= p.n_group,
                "topk_group must be in [1, {}], got {}", p.n_group, p.topk_group);
    // Otherwise masked experts would be chosen, in an order the CPU leaves unspecified.
    MLA_REQUIRE(p.top_k <= p.topk_group * (p.experts / p.n_group),
                "top_k {} exceeds the {} experts of the kept groups", p.top_k,
                p.topk_group * (p.experts / p.n_group));
  }
  if (p.gate == cpu::MoeGate::kSigmoidNoauxTc) {
    MLA_REQUIRE(p.bias != nullptr, "noaux_tc routing needs the correction bias");
    MLA_REQUIRE(p.experts / p.n_group >= 2,
                "noaux_tc scores groups by their top two experts, but groups have {}",
                p.experts / p.n_group);
  }
}

}  // namespace

void moe_gate(const MoeGateParams& p, cudaStream_t stream) {
  check_gate(p);
  if (p.tokens == 0) return;

  const auto blocks = static_cast<unsigned>((p.tokens + kWarps - 1) / kWarps);
  launch_dependent(moe_gate_kernel, blocks, kWarps * 32, 0, stream, true, p);
}

void moe_route(const MoeRouteParams& p, cudaStream_t stream) {
  // Check shapes
  MoeGateParams gate = p.gate;
  gate.logits = p.logits;
  check_gate(gate);
  MLA_REQUIRE(gate.tokens <= kMoeRouteMaxTokens, "moe_route takes at most {} tokens, got {}",
              kMoeRouteMaxTokens, gate.tokens);
  MLA_REQUIRE(p.d >= 4 && p.d % 4 == 0, "d must be a positive multiple of 4, got {}", p.d);
  // Check layout
  MLA_REQUIRE(is_aligned(p.x, 16) && is_aligned(p.weight, 16),
              "moe_route: x and weight must be 16-byte aligned");
  MLA_REQUIRE(p.logits != nullptr && p.counter != nullptr, "moe_route needs logits and a counter");
  if (gate.tokens == 0) return;
  const RouteArgs a{p.x, p.weight, p.d, p.logits, p.counter, gate};
  if (gate.tokens <= 1) {
    launch_route<1>(a, stream);
  } else if (gate.tokens <= 2) {
    launch_route<2>(a, stream);
  } else if (gate.tokens <= 4) {
    launch_route<4>(a, stream);
  } else {
    launch_route<8>(a, stream);
  }
}

}  // namespace mla::cuda
