// Block-scaled fp8 products (kernels/cpu/fp8_gemm.h), the reference the CUDA fp8 products are
// held to: activation quantisation per row and group, the formula evaluated exactly as its
// comment says, closeness to the fp32 product of the same weights, and what a Linear layer
// needs (beta, strides, batch invariance, argument checks).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/cpu/fp8_gemm.h"
#include "kernels/cpu/fp8_group.h"
#include "kernels/cpu/ops.h"
#include "kernels/dtype.h"
#include "kernels/error.h"

namespace mla {
namespace {

std::vector<float> normal(int64_t n, uint64_t seed, float sd = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// A weight as a checkpoint's fp8 block stores it: random values quantised per row and group.
struct Fp8Weight {
  int64_t n, k, group;
  std::vector<uint8_t> q;
  std::vector<float> scale;
  std::vector<float> widened;  // q * scale, the weight's exact value
};

Fp8Weight fp8_weight(int64_t n, int64_t k, int64_t group, uint64_t seed) {
  Fp8Weight w{n, k, group, std::vector<uint8_t>(n * k), {}, std::vector<float>(n * k)};
  const int64_t groups = (k + group - 1) / group;
  w.scale.resize(n * groups);
  const std::vector<float> v = normal(n * k, seed, 0.05f);
  cpu::quantize_rows_fp8(v.data(), n, k, k, group, w.q.data(), w.scale.data());
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < k; ++j)
      w.widened[r * k + j] = fp8e4m3_to_f32(w.q[r * k + j]) * w.scale[r * groups + j / group];
  return w;
}

cpu::Fp8GemmParams params(const std::vector<float>& x, int64_t m, const Fp8Weight& w,
                          std::vector<float>& y) {
  return {.x = x.data(),
          .m = m,
          .k = w.k,
          .ldx = w.k,
          .w = w.q.data(),
          .w_scale = w.scale.data(),
          .n = w.n,
          .group = w.group,
          .y = y.data(),
          .ldy = w.n};
}

TEST(Fp8Quantize, ScalesEachGroupToItsLargestMagnitude) {
  const int64_t k = 300, group = 128;  // groups of 128, 128 and 44
  std::vector<float> x = normal(2 * k, 1);
  for (int64_t j = 128; j < 256; ++j) x[k + j] = 0.0f;  // row 1, group 1: all zero
  std::vector<uint8_t> q(2 * k);
  std::vector<float> s(2 * 3);
  cpu::quantize_rows_fp8(x.data(), 2, k, k, group, q.data(), s.data());
  for (int64_t i = 0; i < 2; ++i) {
    for (int64_t b = 0; b < 3; ++b) {
      float amax = 0;
      for (int64_t j = b * group; j < std::min(k, (b + 1) * group); ++j)
        amax = std::max(amax, std::fabs(x[i * k + j]));
      if (amax == 0) {
        EXPECT_EQ(s[i * 3 + b], 1.0f);
        continue;
      }
      EXPECT_FLOAT_EQ(s[i * 3 + b], amax / cpu::kFp8Max) << i << " " << b;
      for (int64_t j = b * group; j < std::min(k, (b + 1) * group); ++j) {
        const float back = fp8e4m3_to_f32(q[i * k + j]) * s[i * 3 + b];
        // e4m3 keeps 3 mantissa bits: half a step is 2^-4 of the value, or 2^-10 of the scale
        // among the subnormals.
        EXPECT_LE(std::fabs(back - x[i * k + j]),
                  std::max(std::fabs(x[i * k + j]) / 16, s[i * 3 + b] / 1024) * 1.0001f)
            << i << " " << j;
      }
    }
  }
  for (int64_t j = 128; j < 256; ++j) EXPECT_EQ(fp8e4m3_to_f32(q[k + j]), 0.0f);
}

// The product is the header's formula: each group's e4m3 products summed, times both scales.
// Evaluated here in double from the same quantised activations.
TEST(Fp8Gemm, EvaluatesTheBlockScaledFormula) {
  const int64_t m = 5, n = 7, k = 300, group = 128, groups = 3;
  const Fp8Weight w = fp8_weight(n, k, group, 2);
  const std::vector<float> x = normal(m * k, 3);
  std::vector<float> y(m * n, NAN);
  cpu::gemm_fp8_blockscaled(params(x, m, w, y));
  std::vector<uint8_t> qx(m * k);
  std::vector<float> sx(m * groups);
  cpu::quantize_rows_fp8(x.data(), m, k, k, group, qx.data(), sx.data());
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t r = 0; r < n; ++r) {
      double want = 0;
      for (int64_t b = 0; b < groups; ++b) {
        double dot = 0;
        for (int64_t j = b * group; j < std::min(k, (b + 1) * group); ++j)
          dot += double(fp8e4m3_to_f32(qx[i * k + j])) * fp8e4m3_to_f32(w.q[r * k + j]);
        want += dot * sx[i * groups + b] * w.scale[r * groups + b];
      }
      EXPECT_NEAR(y[i * n + r], want, 1e-5 * (std::fabs(want) + 1e-3)) << i << " " << r;
    }
  }
}

// Against the fp32 product of the same (exactly representable) weights, the only error is the
// activations' quantisation: measured 2.6 % relative (L2) on these shapes, held below 3 %.
TEST(Fp8Gemm, IsCloseToTheFp32ProductOfTheSameWeights) {
  const int64_t m = 16, n = 96, k = 512, group = 128;
  const Fp8Weight w = fp8_weight(n, k, group, 4);
  const std::vector<float> x = normal(m * k, 5);
  std::vector<float> y(m * n), ref(m * n);
  cpu::gemm_fp8_blockscaled(params(x, m, w, y));
  cpu::matmul_nt(x.data(), m, k, w.widened.data(), n, ref.data());
  double err = 0, norm = 0;
  for (int64_t i = 0; i < m * n; ++i) {
    err += (y[i] - ref[i]) * (y[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  const double rel = std::sqrt(err / norm);
  RecordProperty("relative_l2_error", std::to_string(rel));
  EXPECT_LT(rel, 0.03);
  EXPECT_GT(rel, 1e-4) << "activations were not quantised";
}

TEST(Fp8Gemm, AddsBetaTimesYAndHonoursStrides) {
  const int64_t m = 3, n = 4, k = 256, group = 128, ldx = k + 5, ldy = n + 3;
  const Fp8Weight w = fp8_weight(n, k, group, 6);
  const std::vector<float> x = normal(m * k, 7);
  std::vector<float> packed(m * n);
  cpu::gemm_fp8_blockscaled(params(x, m, w, packed));

  std::vector<float> xs(m * ldx, NAN), y(m * ldy, 2.0f);
  for (int64_t i = 0; i < m; ++i) std::copy_n(&x[i * k], k, &xs[i * ldx]);
  cpu::Fp8GemmParams p = params(xs, m, w, y);
  p.ldx = ldx;
  p.ldy = ldy;
  p.beta = 0.5f;
  cpu::gemm_fp8_blockscaled(p);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t r = 0; r < n; ++r) EXPECT_FLOAT_EQ(y[i * ldy + r], packed[i * n + r] + 1.0f);
    for (int64_t r = n; r < ldy; ++r) EXPECT_EQ(y[i * ldy + r], 2.0f) << "written past n";
  }
}

// A row's result does not depend on the other rows (the deterministic option relies on it).
TEST(Fp8Gemm, RowsDoNotDependOnTheBatch) {
  const int64_t m = 9, n = 33, k = 384, group = 128;
  const Fp8Weight w = fp8_weight(n, k, group, 8);
  const std::vector<float> x = normal(m * k, 9);
  std::vector<float> all(m * n), one(n);
  cpu::gemm_fp8_blockscaled(params(x, m, w, all));
  for (int64_t i = 0; i < m; ++i) {
    const std::vector<float> row(x.begin() + i * k, x.begin() + (i + 1) * k);
    cpu::gemm_fp8_blockscaled(params(row, 1, w, one));
    for (int64_t r = 0; r < n; ++r) ASSERT_EQ(one[r], all[i * n + r]) << i << " " << r;
  }
}

TEST(Fp8Gemm, RejectsBadSizes) {
  const Fp8Weight w = fp8_weight(4, 128, 128, 10);
  const std::vector<float> x = normal(128, 11);
  std::vector<float> y(4);
  cpu::Fp8GemmParams p = params(x, 1, w, y);
  p.group = 0;
  EXPECT_THROW(cpu::gemm_fp8_blockscaled(p), Error);
  p = params(x, 1, w, y);
  p.ldx = 64;
  EXPECT_THROW(cpu::gemm_fp8_blockscaled(p), Error);
  p = params(x, 1, w, y);
  p.m = -1;
  EXPECT_THROW(cpu::gemm_fp8_blockscaled(p), Error);
}

}  // namespace
}  // namespace mla
