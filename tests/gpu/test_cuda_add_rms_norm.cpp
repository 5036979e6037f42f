// CUDA residual add + RMSNorm (bf16 out) against x + delta and cpu::rms_norm, on fresh random
// inputs with poisoned outputs, strided rows and both the 16-byte and the scalar path.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/add_rms_norm.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

using test::DeviceArray;

struct NormCase {
  int64_t rows, d, x_pad, y_pad;  // strides are d + pad
  bool with_delta, with_y32;
};

std::string describe(const NormCase& c) {
  return "rows " + std::to_string(c.rows) + ", d " + std::to_string(c.d) + ", pads " +
         std::to_string(c.x_pad) + "/" + std::to_string(c.y_pad) + (c.with_delta ? ", delta" : "") +
         (c.with_y32 ? ", y32" : "");
}

TEST(CudaAddRmsNorm, MatchesCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(8642);
  const float eps = 1e-6f;
  const NormCase cases[] = {
      {1, 7168, 0, 0, true, true},      // decode step, DeepSeek-V3's hidden size
      {3, 2048, 0, 0, true, false},     // DeepSeek-V2-Lite's hidden size
      {257, 7168, 0, 0, true, true},    // a prefill chunk
      {257, 64, 0, 0, false, true},     // final norm (no delta)
      {3, 1536, 576, 0, false, false},  // q-LoRA norm: rows of a [T, d_q + 576] GEMM output
      {1, 64, 4, 8, true, true},        // strided rows on the 16-byte path
      {3, 7, 2, 1, true, true},         // odd d and strides: scalar path
      {257, 2048, 1, 0, false, true},   // odd x stride: scalar path
  };
  for (const NormCase& c : cases) {
    SCOPED_TRACE(describe(c));
    const int64_t xs = c.d + c.x_pad, ys = c.d + c.y_pad;
    // The padding of x holds data the kernel must not touch.
    std::vector<float> x = test::random_normal(c.rows * xs, rng);
    std::vector<float> delta = test::random_normal(c.rows * xs, rng, 0.5f);
    std::vector<float> w = test::random_normal(c.d, rng, 0.1f);
    for (auto& v : w) v += 1.0f;

    // Reference: the residual after the add, then the norm of its first d columns per row.
    std::vector<float> x_ref = x;
    if (c.with_delta) {
      for (int64_t r = 0; r < c.rows; ++r) cpu::add_inplace(&x_ref[r * xs], &delta[r * xs], c.d);
    }
    std::vector<float> y_ref(c.rows * ys, NAN);
    cpu::rms_norm(x_ref.data(), c.rows, c.d, xs, w.data(), eps, y_ref.data(), ys);

    DeviceArray<float> d_x(x), d_delta(delta), d_w(w), d_y32(c.rows * ys);
    DeviceArray<__nv_bfloat16> d_y(c.rows * ys);
    cuda::AddRmsNormParams p{};
    p.x = d_x.get();
    p.delta = c.with_delta ? d_delta.get() : nullptr;
    p.w = d_w.get();
    p.y = d_y.get();
    p.y32 = c.with_y32 ? d_y32.get() : nullptr;
    p.rows = c.rows;
    p.d = c.d;
    p.x_stride = xs;
    p.y_stride = ys;
    p.eps = eps;
    cuda::add_rms_norm(p, nullptr);
    const std::vector<float> x_got = d_x.download();
    const std::vector<__nv_bfloat16> y_bits = d_y.download();
    const std::vector<float> y_got = test::to_float(y_bits), y32_got = d_y32.download();

    // The add is one fp32 addition on both sides: bit for bit, padding untouched.
    ASSERT_EQ(std::memcmp(x_got.data(), x_ref.data(), x_ref.size() * sizeof(float)), 0)
        << "residual differs from x + delta";

    std::vector<float> y_want, y_have;
    double err = 0, norm = 0;
    for (int64_t r = 0; r < c.rows; ++r) {
      for (int64_t i = 0; i < ys; ++i) {
        const int64_t k = r * ys + i;
        if (i >= c.d) {
          ASSERT_TRUE(test::is_bf16_poison(y_bits[k])) << "y padding written at " << k;
          ASSERT_TRUE(std::isnan(y32_got[k])) << "y32 padding written at " << k;
          continue;
        }
        y_want.push_back(y_ref[k]);
        y_have.push_back(y_got[k]);
        if (!c.with_y32) continue;
        ASSERT_FALSE(std::isnan(y32_got[k])) << "unwritten y32 at " << k;
        // y is y32 rounded once, so the two outputs agree exactly.
        ASSERT_EQ(__bfloat162float(__float2bfloat16(y32_got[k])), y_got[k]) << "at " << k;
        err += (y32_got[k] - y_ref[k]) * (y32_got[k] - y_ref[k]);
        norm += y_ref[k] * y_ref[k];
      }
    }
    EXPECT_EQ(test::count_bf16_mismatches(y_have, y_want, "y"), 0);
    if (c.with_y32) {
      EXPECT_LT(std::sqrt(err / norm), 1e-5);  // fp32 on both sides
    } else {
      for (float v : y32_got) ASSERT_TRUE(std::isnan(v)) << "y32 written though null";
    }
  }
}

}  // namespace
}  // namespace mla
