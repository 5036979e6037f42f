// The comparison both routed-expert kernel tests make (test_cuda_moe_experts.cpp, bf16 weights;
// test_cuda_moe_experts_fp8.cpp, fp8 weights): out = out0 + the routed experts' part.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
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

}  // namespace mla::test
