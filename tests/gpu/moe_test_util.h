// What both routed-expert kernel tests share (test_cuda_moe_experts.cpp, bf16 weights;
// test_cuda_moe_experts_fp8.cpp, fp8 weights): the reference's routing and combine around each
// test's expert MLP, and the comparison of out = out0 + the routed experts' part.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace mla::test {

// Each token's routed part (got - out0) against the reference's (want - out0): every element
// finite and within element_tolerance of the token's routed RMS, and the whole within
// rms_tolerance relative RMS (printed); a token with no local slot left exactly as it was.
inline void expect_routed_close(const std::string& name, int64_t tokens, int64_t d,
                                const std::vector<float>& out0, const std::vector<float>& got,
                                const std::vector<float>& want, double element_tolerance,
                                double rms_tolerance) {
  double err = 0, norm = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    double routed = 0;
    for (int64_t i = 0; i < d; ++i) {
      const double r = want[t * d + i] - out0[t * d + i];
      routed += r * r;
    }
    const double rms = std::sqrt(routed / d);
    for (int64_t i = 0; i < d; ++i) {
      const int64_t j = t * d + i;
      ASSERT_TRUE(std::isfinite(got[j])) << name << ": token " << t << " column " << i;
      if (rms == 0) {
        ASSERT_EQ(got[j], out0[j]) << name << ": token " << t << " column " << i;
        continue;
      }
      ASSERT_LE(std::fabs(got[j] - want[j]), element_tolerance * rms)
          << name << ": token " << t << " column " << i << ", want " << want[j];
      err += (got[j] - want[j]) * (got[j] - want[j]);
    }
    norm += routed;
  }
  const double rel = std::sqrt(err / std::max(norm, 1e-30));
  std::printf("%s: routed part's relative RMS error %.3g\n", name.c_str(), rel);
  EXPECT_LT(rel, rms_tolerance) << name;
}

// out0 plus the routed experts as the kernels define them: each local expert's MLP,
// mlp(e, xs, m, ys), runs on the m input rows of its slots gathered in slot order (xs [m, d])
// into ys [m, d]; each token then adds its local slots' outputs times their routing weights, in
// k order (as the combine does). ids and weights [tokens, top_k], x and out0 [tokens, d].
template <class Mlp>
std::vector<float> routed_reference(const std::vector<int32_t>& ids,
                                    const std::vector<float>& weights, const std::vector<float>& x,
                                    const std::vector<float>& out0, int64_t tokens, int64_t top_k,
                                    int64_t d, int64_t first_expert, int64_t local_experts,
                                    Mlp&& mlp) {
  std::vector<float> y(tokens * top_k * d, 0.0f);  // by slot
  for (int64_t e = 0; e < local_experts; ++e) {
    std::vector<int64_t> slots;
    for (int64_t s = 0; s < tokens * top_k; ++s) {
      if (ids[s] == first_expert + e) slots.push_back(s);
    }
    if (slots.empty()) continue;
    const auto m = static_cast<int64_t>(slots.size());
    std::vector<float> xs(m * d), ys(m * d);
    for (int64_t i = 0; i < m; ++i) {
      std::memcpy(&xs[i * d], &x[(slots[i] / top_k) * d], d * sizeof(float));
    }
    mlp(e, xs, m, ys);
    for (int64_t i = 0; i < m; ++i) std::memcpy(&y[slots[i] * d], &ys[i * d], d * sizeof(float));
  }
  std::vector<float> out = out0;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t s = t * top_k + k;
      if (ids[s] < first_expert || ids[s] >= first_expert + local_experts) continue;
      for (int64_t i = 0; i < d; ++i) out[t * d + i] += weights[s] * y[s * d + i];
    }
  }
  return out;
}

}  // namespace mla::test
