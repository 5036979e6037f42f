// CUDA MoE router against mla::cpu::moe_route on fresh random logits, for the three gate kinds
// at DeepSeek-V3, V2 and V2-Lite shapes, with poisoned outputs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/moe.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/moe_gate.h"

namespace mla {
namespace {

struct GateShape {
  std::string name;
  cpu::MoeGate gate;
  int64_t experts, n_group, topk_group, top_k;
  bool renormalize;
  float scaling;
};

TEST(CudaMoeGate, MatchesCpuMoeRoute) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const std::vector<GateShape> shapes = {
      {"V3", cpu::MoeGate::kSigmoidNoauxTc, 256, 8, 4, 8, true, 2.5f},
      {"V3 unnormalised", cpu::MoeGate::kSigmoidNoauxTc, 256, 8, 4, 8, false, 2.5f},
      {"V2", cpu::MoeGate::kSoftmaxGroupLimited, 160, 8, 3, 6, false, 16.0f},
      {"V2-Lite", cpu::MoeGate::kSoftmaxGreedy, 64, 1, 1, 6, false, 1.0f},
      {"V2-Lite renormalised", cpu::MoeGate::kSoftmaxGreedy, 64, 1, 1, 6, true, 1.0f},
      // Fewer experts than a warp's lanes and groups of two.
      {"tiny noaux", cpu::MoeGate::kSigmoidNoauxTc, 12, 6, 2, 3, true, 1.0f},
  };
  std::mt19937 rng(8642);
  for (const GateShape& s : shapes) {
    for (int64_t tokens : {1, 7, 256}) {
      // Router logits of a trained model span a few units; 3 makes softmax peaky too.
      std::normal_distribution<float> logit_dist(
          0.0f, s.gate == cpu::MoeGate::kSigmoidNoauxTc ? 1.0f : 3.0f);
      std::normal_distribution<float> bias_dist(0.0f, 0.1f);
      std::vector<float> logits(tokens * s.experts), bias;
      for (auto& v : logits) v = logit_dist(rng);
      if (s.gate == cpu::MoeGate::kSigmoidNoauxTc) {
        bias.resize(s.experts);
        for (auto& v : bias) v = bias_dist(rng);
      }
      const int64_t slots = tokens * s.top_k;
      std::vector<int32_t> want_ids(slots), got_ids(slots);
      std::vector<float> want_w(slots), got_w(slots);
      cpu::moe_route({logits.data(), bias.empty() ? nullptr : bias.data(), tokens, s.experts,
                      s.n_group, s.topk_group, s.top_k, s.gate, s.renormalize, s.scaling,
                      want_ids.data(), want_w.data()});

      float *d_logits, *d_bias = nullptr, *d_w;
      int32_t* d_ids;
      MLA_CUDA_CHECK(cudaMalloc(&d_logits, logits.size() * sizeof(float)));
      MLA_CUDA_CHECK(cudaMalloc(&d_w, slots * sizeof(float)));
      MLA_CUDA_CHECK(cudaMalloc(&d_ids, slots * sizeof(int32_t)));
      MLA_CUDA_CHECK(cudaMemcpy(d_logits, logits.data(), logits.size() * sizeof(float),
                                cudaMemcpyHostToDevice));
      if (!bias.empty()) {
        MLA_CUDA_CHECK(cudaMalloc(&d_bias, bias.size() * sizeof(float)));
        MLA_CUDA_CHECK(
            cudaMemcpy(d_bias, bias.data(), bias.size() * sizeof(float), cudaMemcpyHostToDevice));
      }
      MLA_CUDA_CHECK(cudaMemset(d_w, 0xff, slots * sizeof(float)));      // poison: NaN
      MLA_CUDA_CHECK(cudaMemset(d_ids, 0xff, slots * sizeof(int32_t)));  // poison: -1
      cuda::moe_gate({d_logits, d_bias, tokens, s.experts, s.n_group, s.topk_group, s.top_k, s.gate,
                      s.renormalize, s.scaling, d_ids, d_w},
                     nullptr);
      MLA_CUDA_CHECK(cudaDeviceSynchronize());
      MLA_CUDA_CHECK(
          cudaMemcpy(got_ids.data(), d_ids, slots * sizeof(int32_t), cudaMemcpyDeviceToHost));
      MLA_CUDA_CHECK(cudaMemcpy(got_w.data(), d_w, slots * sizeof(float), cudaMemcpyDeviceToHost));
      cudaFree(d_logits);
      cudaFree(d_bias);
      cudaFree(d_w);
      cudaFree(d_ids);

      for (int64_t i = 0; i < slots; ++i) {
        ASSERT_EQ(got_ids[i], want_ids[i]) << s.name << ", tokens = " << tokens << ", token "
                                           << i / s.top_k << " slot " << i % s.top_k;
        // Same fp32 operations in the same order; exp goes through double on the GPU to
        // round like glibc's expf, which it does in all but rare cases, where one score
        // (and through the softmax sum every score) moves by an ulp or two.
        EXPECT_NEAR(got_w[i], want_w[i], 1e-6f * std::fabs(want_w[i]))
            << s.name << ", tokens = " << tokens << ", slot " << i;
      }
    }
  }
}

TEST(CudaMoeGate, RejectsBadShapes) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  int32_t* ids = nullptr;
  float* w = nullptr;
  const float* logits = nullptr;
  auto params = [&](int64_t experts, int64_t n_group, int64_t topk_group, int64_t top_k,
                    cpu::MoeGate gate) {
    return cuda::MoeGateParams{logits, nullptr, 1,     experts, n_group, topk_group,
                               top_k,  gate,    false, 1.0f,    ids,     w};
  };
  EXPECT_THROW(cuda::moe_gate(params(257, 1, 1, 8, cpu::MoeGate::kSoftmaxGreedy), nullptr), Error);
  EXPECT_THROW(cuda::moe_gate(params(64, 1, 1, 65, cpu::MoeGate::kSoftmaxGreedy), nullptr), Error);
  EXPECT_THROW(cuda::moe_gate(params(160, 7, 3, 6, cpu::MoeGate::kSoftmaxGroupLimited), nullptr),
               Error);
  EXPECT_THROW(cuda::moe_gate(params(16, 8, 1, 3, cpu::MoeGate::kSoftmaxGroupLimited), nullptr),
               Error);  // 3 experts from one kept group of 2
  EXPECT_THROW(cuda::moe_gate(params(256, 8, 4, 8, cpu::MoeGate::kSigmoidNoauxTc), nullptr),
               Error);  // no bias
}

}  // namespace
}  // namespace mla
