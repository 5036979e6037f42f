// CUDA MoE router against mla::cpu::moe_route on fresh random logits, for the three gate kinds
// at DeepSeek-V3, V2 and V2-Lite shapes, with poisoned outputs; the fused router (moe_route:
// product and gate in one launch) against a double-precision product and moe_route on its own
// logits, replayed from a graph (its counter must come back to zero).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/moe.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/moe_gate.h"
#include "tests/gpu/bf16_test_util.h"

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

TEST(CudaMoeGate, FusedRouteMatchesProductThenGate) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  struct RouteShape {
    GateShape gate;
    int64_t d;
  };
  const std::vector<RouteShape> shapes = {
      {{"V3", cpu::MoeGate::kSigmoidNoauxTc, 256, 8, 4, 8, true, 2.5f}, 7168},
      {{"V2", cpu::MoeGate::kSoftmaxGroupLimited, 160, 8, 3, 6, false, 16.0f}, 5120},
      {{"V2-Lite", cpu::MoeGate::kSoftmaxGreedy, 64, 1, 1, 6, false, 1.0f}, 2048},
      {{"tiny noaux, odd expert count", cpu::MoeGate::kSigmoidNoauxTc, 15, 5, 2, 3, true, 1.0f},
       36},
  };
  std::mt19937 rng(8643);
  cudaStream_t stream;
  MLA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (const RouteShape& rs : shapes) {
    const GateShape& s = rs.gate;
    for (int64_t tokens : {int64_t{1}, int64_t{2}, int64_t{3}, cuda::kMoeRouteMaxTokens}) {
      const std::string name = s.name + ", " + std::to_string(tokens) + " tokens";
      // x like a normed hidden row; the weight scaled so logits span a few units.
      const std::vector<float> x = test::random_normal(tokens * rs.d, rng);
      std::vector<float> weight = test::random_normal(s.experts * rs.d, rng);
      for (float& v : weight) v *= 2.0f / std::sqrt(static_cast<float>(rs.d));
      std::vector<float> bias(s.experts);
      for (float& v : bias) v = 0.1f * test::random_normal(1, rng)[0];
      const bool noaux = s.gate == cpu::MoeGate::kSigmoidNoauxTc;
      test::DeviceArray<float> d_x(x), d_weight(weight), d_bias(bias);
      test::DeviceArray<float> d_logits(tokens * s.experts), d_w(tokens * s.top_k);
      test::DeviceArray<int32_t> d_ids(tokens * s.top_k), d_counter(std::vector<int32_t>{0});
      const cuda::MoeRouteParams p{.x = d_x.get(),
                                   .weight = d_weight.get(),
                                   .d = rs.d,
                                   .logits = d_logits.get(),
                                   .counter = d_counter.get(),
                                   .gate = {nullptr, noaux ? d_bias.get() : nullptr, tokens,
                                            s.experts, s.n_group, s.topk_group, s.top_k, s.gate,
                                            s.renormalize, s.scaling, d_ids.get(), d_w.get()}};
      cuda::moe_route(p, stream);
      MLA_CUDA_CHECK(cudaStreamSynchronize(stream));
      const std::vector<float> logits = d_logits.download();
      const std::vector<int32_t> ids = d_ids.download();
      const std::vector<float> w = d_w.download();
      ASSERT_EQ(d_counter.download()[0], 0) << name << ": the counter was not reset";
      for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t e = 0; e < s.experts; ++e) {
          double want = 0, scale = 0;
          for (int64_t i = 0; i < rs.d; ++i) {
            want += double{x[t * rs.d + i]} * weight[e * rs.d + i];
            scale += std::fabs(double{x[t * rs.d + i]} * weight[e * rs.d + i]);
          }
          ASSERT_NEAR(logits[t * s.experts + e], want, 1e-6 * scale + 1e-7)
              << name << ": logit " << t << ", " << e;
        }
      }
      // The gate on the kernel's own logits, by the CPU reference: the same picks exactly.
      const int64_t slots = tokens * s.top_k;
      std::vector<int32_t> want_ids(slots);
      std::vector<float> want_w(slots);
      cpu::moe_route({logits.data(), noaux ? bias.data() : nullptr, tokens, s.experts, s.n_group,
                      s.topk_group, s.top_k, s.gate, s.renormalize, s.scaling, want_ids.data(),
                      want_w.data()});
      for (int64_t i = 0; i < slots; ++i) {
        ASSERT_EQ(ids[i], want_ids[i]) << name << ", slot " << i;
        EXPECT_NEAR(w[i], want_w[i], 1e-6f * std::fabs(want_w[i])) << name << ", slot " << i;
      }
      // Twice from one graph, outputs poisoned in between: the same bits each time.
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      MLA_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
      cuda::moe_route(p, stream);
      MLA_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
      MLA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
      for (int replay = 0; replay < 2; ++replay) {
        d_logits.poison();
        d_ids.poison();
        d_w.poison();
        MLA_CUDA_CHECK(cudaGraphLaunch(exec, stream));
        MLA_CUDA_CHECK(cudaStreamSynchronize(stream));
        EXPECT_EQ(d_ids.download(), ids) << name << ", replay " << replay;
        EXPECT_EQ(d_w.download(), w) << name << ", replay " << replay;
        EXPECT_EQ(d_logits.download(), logits) << name << ", replay " << replay;
      }
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
    }
  }
  MLA_CUDA_CHECK(cudaStreamDestroy(stream));
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
  // The fused router: the gate's checks, and its own.
  test::DeviceArray<float> x(9 * 64), weight(64 * 64), route_logits(9 * 64);
  test::DeviceArray<int32_t> counter(std::vector<int32_t>{0});
  cuda::MoeRouteParams route{x.get(),
                             weight.get(),
                             64,
                             route_logits.get(),
                             counter.get(),
                             params(64, 1, 1, 6, cpu::MoeGate::kSoftmaxGreedy)};
  route.gate.tokens = cuda::kMoeRouteMaxTokens + 1;
  EXPECT_THROW(cuda::moe_route(route, nullptr), Error);
  route.gate.tokens = 1;
  route.d = 62;  // not a multiple of 4
  EXPECT_THROW(cuda::moe_route(route, nullptr), Error);
  route.d = 64;
  route.gate.top_k = 65;
  EXPECT_THROW(cuda::moe_route(route, nullptr), Error);
}

}  // namespace
}  // namespace mla
