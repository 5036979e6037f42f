#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/moe_gate.h"
#include "kernels/cuda/pdl.cuh"

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

__global__ void __launch_bounds__(kWarps * 32) moe_gate_kernel(MoeGateParams p) {
  wait_for_prerequisite();  // launched as a dependent: the kernels before have finished
  allow_dependent_launch();
  __shared__ float s_scores[kWarps][kMoeGateMaxExperts];
  __shared__ float s_choice[kWarps][kMoeGateMaxExperts];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = int64_t{blockIdx.x} * kWarps + warp;
  if (t >= p.tokens) return;  // whole warps only: no block-wide barrier follows
  const int E = static_cast<int>(p.experts);
  const float* lg = p.logits + t * p.experts;
  float* scores = s_scores[warp];
  float* choice = s_choice[warp];
  const bool noaux = p.gate == cpu::MoeGate::kSigmoidNoauxTc;

  if (noaux) {
    for (int e = lane; e < E; e += 32) {
      const float s = 1.0f / (1.0f + exp_as_cpu(-lg[e]));
      scores[e] = s;
      choice[e] = s + p.bias[e];
    }
  } else {
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, lg[e]);
    for (int offset = 16; offset > 0; offset /= 2) {
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, offset));
    }
    for (int e = lane; e < E; e += 32) scores[e] = exp_as_cpu(lg[e] - mx);
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

}  // namespace

void moe_gate(const MoeGateParams& p, cudaStream_t stream) {
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
  if (p.tokens == 0) return;

  const auto blocks = static_cast<unsigned>((p.tokens + kWarps - 1) / kWarps);
  launch_dependent(moe_gate_kernel, blocks, kWarps * 32, 0, stream, true, p);
}

}  // namespace mla::cuda
