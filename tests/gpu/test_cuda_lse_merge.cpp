// CUDA LSE merge of tensor-parallel partial attention outputs against cpu::lse_merge (the CPU
// model's merge), on fresh random partials with -inf parts (whose
// NaN-filled data must never be read), all--inf rows, large lse values, and a poisoned output.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/lse_merge.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

using test::DeviceArray;

struct MergeCase {
  int P;
  int64_t rows, d;
  bool with_lse;
};

TEST(CudaLseMerge, MatchesCpuMerge) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(5150);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  const MergeCase cases[] = {
      {2, 257, 512, true},    // TP2, a prefill chunk of T * H rows, d_c = 512
      {8, 3, 512, true},      // TP8
      {1, 1, 64, true},       // one part: a copy
      {4, 257, 2048, false},  // no output lse
      {3, 3, 7168, true},     // wide rows
      {3, 37, 7, true},       // d not a multiple of 8: scalar path
  };
  for (const MergeCase& c : cases) {
    SCOPED_TRACE("P " + std::to_string(c.P) + ", rows " + std::to_string(c.rows) + ", d " +
                 std::to_string(c.d));
    std::vector<float> parts = test::bf16_rounded(test::random_normal(c.P * c.rows * c.d, rng));
    std::vector<float> lse(c.P * c.rows);
    for (auto& v : lse) v = dist(rng);
    for (int64_t t = 0; t < c.rows; ++t) {
      if (t % 7 == 2) {
        for (int r = 0; r < c.P; ++r) lse[r * c.rows + t] = -INFINITY;  // no rank has keys
      } else if (t % 5 == 1 && c.P > 1) {
        lse[(t % c.P) * c.rows + t] = -INFINITY;  // one rank without keys, garbage data
        std::fill_n(&parts[((t % c.P) * c.rows + t) * c.d], c.d, NAN);
      } else if (t % 5 == 3) {
        for (int r = 0; r < c.P; ++r) lse[r * c.rows + t] += 90.0f;  // exp(lse) overflows fp32
      }
    }
    std::vector<float> want(c.rows * c.d), want_lse(c.rows);
    cpu::lse_merge({parts.data(), lse.data(), c.P, c.rows, c.d, want.data(), want_lse.data()});

    DeviceArray<__nv_bfloat16> d_parts(test::to_bf16(parts)), d_out(c.rows * c.d);
    DeviceArray<float> d_lse(lse), d_out_lse(c.rows);
    cuda::lse_merge({d_parts.get(), d_lse.get(), c.P, c.rows, c.d, d_out.get(),
                     c.with_lse ? d_out_lse.get() : nullptr},
                    nullptr);
    const std::vector<float> got = test::to_float(d_out.download());
    const std::vector<float> got_lse = d_out_lse.download();

    // Tolerance: test::bf16_close (fp32 merge, one rounding to bf16). The merged rows of
    // all--inf rows must be exact zeros.
    EXPECT_EQ(test::count_bf16_mismatches(got, want, "out"), 0);
    for (int64_t t = 0; t < c.rows; ++t) {
      if (!c.with_lse) {
        ASSERT_TRUE(std::isnan(got_lse[t])) << "out_lse written though null";
      } else if (want_lse[t] == -INFINITY) {
        ASSERT_EQ(got_lse[t], -INFINITY) << "row " << t;
        for (int64_t i = 0; i < c.d; ++i) ASSERT_EQ(got[t * c.d + i], 0.0f) << "row " << t;
      } else {
        // fp32 on both sides; expf/logf against libm differ by an ulp or two.
        EXPECT_NEAR(got_lse[t], want_lse[t], 1e-5f * (1.0f + std::abs(want_lse[t]))) << "row " << t;
      }
    }
  }
}

}  // namespace
}  // namespace mla
