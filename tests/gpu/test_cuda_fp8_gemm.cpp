// The CUDA fp8 products (kernels/cuda/fp8_gemm.h) against their CPU reference
// (kernels/cpu/fp8_gemm.h): the activations' quantisation bit for bit, the product to fp32
// summation order, on DeepSeek-V3's product shapes and odd ones, fp32 and bf16 in and out, with
// every output the kernels must not write left poisoned.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/fp8_gemm.h"
#include "kernels/cpu/fp8_group.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/fp8_gemm.h"
#include "kernels/cuda/fp8_gemm_lt.h"
#include "kernels/cuda/gemm.h"
#include "kernels/dtype.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

using test::DeviceArray;

struct Case {
  int64_t m, n, k;
};

// DeepSeek-V3's decode products (q_a, kv_a, q_b, o at TP8, an expert's gate_up and down) at 1
// to 8 rows, a prefill tile and a ragged one, and small odd widths: every tile height (1, 2, 4,
// 8, 16 rows) and both kernels (k split over a block's warps for products under 32 weight rows
// an SM, e.g. n 576 or 1536 on an H100; a warp per 4 rows for the wide ones, n 7168).
const Case kCases[] = {{1, 1536, 7168}, {4, 576, 7168},   {1, 3072, 1536}, {2, 7168, 2048},
                       {4, 4096, 7168}, {16, 7168, 2048}, {37, 200, 512},  {3, 5, 128},
                       {6, 4096, 1536}, {8, 7168, 2048},  {1, 7168, 2048}};

TEST(CudaFp8Gemm, QuantisesAndMultipliesAsTheCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(8080);
  for (const Case& c : kCases) {
    for (const bool bf16 : {false, true}) {
      SCOPED_TRACE("m " + std::to_string(c.m) + " n " + std::to_string(c.n) + " k " +
                   std::to_string(c.k) + (bf16 ? " bf16" : " fp32"));
      const int64_t groups = c.k / 128;
      // Weights as a checkpoint stores them: e4m3 with a scale per row and 128 columns.
      const std::vector<float> wf = test::random_normal(c.n * c.k, rng, 0.05f);
      std::vector<uint8_t> w(c.n * c.k);
      std::vector<float> ws(c.n * groups);
      cpu::quantize_rows_fp8(wf.data(), c.n, c.k, c.k, 128, w.data(), ws.data());
      // Activations; as bf16 the reference sees the same values widened.
      std::vector<float> x = test::random_normal(c.m * c.k, rng);
      std::vector<uint16_t> xb(x.size());
      for (size_t i = 0; i < x.size(); ++i) {
        xb[i] = f32_to_bf16(x[i]);
        if (bf16) x[i] = bf16_to_f32(xb[i]);
      }
      std::vector<float> want(c.m * c.n, 0.5f);
      std::vector<float> y0(c.m * c.n, 0.5f);
      cpu::gemm_fp8_blockscaled({.x = x.data(),
                                 .m = c.m,
                                 .k = c.k,
                                 .ldx = c.k,
                                 .w = w.data(),
                                 .w_scale = ws.data(),
                                 .n = c.n,
                                 .group = 128,
                                 .y = want.data(),
                                 .ldy = c.n,
                                 .beta = 2.0f});
      std::vector<uint8_t> want_q(c.m * c.k);
      std::vector<float> want_s(c.m * groups);
      cpu::quantize_rows_fp8(x.data(), c.m, c.k, c.k, 128, want_q.data(), want_s.data());

      DeviceArray<float> d_xf(x);
      DeviceArray<uint16_t> d_xb(xb);
      DeviceArray<uint8_t> d_w(w), d_q(c.m * c.k);
      DeviceArray<float> d_ws(ws), d_s(c.m * groups), d_y(y0);
      cuda::fp8_quantize_rows({.x = bf16 ? static_cast<const void*>(d_xb.get()) : d_xf.get(),
                               .x_dtype = bf16 ? DType::kBF16 : DType::kF32,
                               .m = c.m,
                               .k = c.k,
                               .ldx = c.k,
                               .q = d_q.get(),
                               .scale = d_s.get()},
                              nullptr);
      EXPECT_EQ(d_q.download(), want_q);
      EXPECT_EQ(d_s.download(), want_s);
      cuda::fp8_gemm({.qx = d_q.get(),
                      .sx = d_s.get(),
                      .m = c.m,
                      .k = c.k,
                      .w = d_w.get(),
                      .w_scale = d_ws.get(),
                      .n = c.n,
                      .y = d_y.get(),
                      .y_dtype = DType::kF32,
                      .ldy = c.n,
                      .beta = 2.0f},
                     nullptr);
      // The kernel scales each 16-value chunk's sum, the reference each 128-value group's, and
      // they add the groups in different orders: errors of fp32 rounding over k terms, measured
      // against the outputs' typical size (an output near zero keeps the absolute error of its
      // sums: 1.6e-4 of a 1e-2 floor seen at k 7168 on an H100).
      const std::vector<float> got = d_y.download();
      double rms = 0;
      for (const float v : want) rms += double(v) * v;
      rms = std::sqrt(rms / static_cast<double>(want.size()));
      double worst = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_TRUE(std::isfinite(got[i])) << i;
        worst = std::max(worst, std::fabs(got[i] - want[i]) / (std::fabs(want[i]) + rms));
      }
      EXPECT_LT(worst, 1e-5);
    }
  }
}

// A bf16 output with a row stride: the rounded product in its columns, nothing past n.
TEST(CudaFp8Gemm, Bf16OutputWithARowStride) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(8181);
  const int64_t m = 3, n = 70, k = 256, ldy = 80, groups = 2;
  const std::vector<float> wf = test::random_normal(n * k, rng, 0.05f);
  std::vector<uint8_t> w(n * k), q(m * k);
  std::vector<float> ws(n * groups), s(m * groups);
  cpu::quantize_rows_fp8(wf.data(), n, k, k, 128, w.data(), ws.data());
  const std::vector<float> x = test::random_normal(m * k, rng);
  cpu::quantize_rows_fp8(x.data(), m, k, k, 128, q.data(), s.data());
  std::vector<float> want(m * n);
  cpu::gemm_fp8_blockscaled({.x = x.data(),
                             .m = m,
                             .k = k,
                             .ldx = k,
                             .w = w.data(),
                             .w_scale = ws.data(),
                             .n = n,
                             .group = 128,
                             .y = want.data(),
                             .ldy = n});
  DeviceArray<uint8_t> d_w(w), d_q(q);
  DeviceArray<float> d_ws(ws), d_s(s);
  DeviceArray<uint16_t> d_y(m * ldy);
  cuda::fp8_gemm({.qx = d_q.get(),
                  .sx = d_s.get(),
                  .m = m,
                  .k = k,
                  .w = d_w.get(),
                  .w_scale = d_ws.get(),
                  .n = n,
                  .y = d_y.get(),
                  .y_dtype = DType::kBF16,
                  .ldy = ldy},
                 nullptr);
  const std::vector<uint16_t> got = d_y.download();
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t r = 0; r < n; ++r) {
      EXPECT_NEAR(bf16_to_f32(got[i * ldy + r]), want[i * n + r],
                  std::fabs(want[i * n + r]) / 128 + 1e-3)
          << i << " " << r;
    }
    for (int64_t r = n; r < ldy; ++r) EXPECT_EQ(got[i * ldy + r], 0xFFFF) << "written past n";
  }
}

// A row's product does not depend on how many rows came with it: the first m rows of a 37-row
// product, run alone for every tile height, give the same bits (what the deterministic option
// and batch-invariant decoding rest on), for a narrow product (k split over a block's warps)
// and a wide one.
TEST(CudaFp8Gemm, ARowsResultDoesNotDependOnTheOtherRows) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(8282);
  for (const Case& c : {Case{37, 576, 7168}, Case{37, 7168, 2048}}) {
    const int64_t groups = c.k / 128;
    const std::vector<float> wf = test::random_normal(c.n * c.k, rng, 0.05f);
    std::vector<uint8_t> w(c.n * c.k), q(c.m * c.k);
    std::vector<float> ws(c.n * groups), sx(c.m * groups);
    cpu::quantize_rows_fp8(wf.data(), c.n, c.k, c.k, 128, w.data(), ws.data());
    const std::vector<float> x = test::random_normal(c.m * c.k, rng);
    cpu::quantize_rows_fp8(x.data(), c.m, c.k, c.k, 128, q.data(), sx.data());
    DeviceArray<uint8_t> d_w(w), d_q(q);
    DeviceArray<float> d_ws(ws), d_sx(sx);
    auto run = [&](int64_t m) {
      DeviceArray<float> y(m * c.n);
      cuda::fp8_gemm({.qx = d_q.get(),
                      .sx = d_sx.get(),
                      .m = m,
                      .k = c.k,
                      .w = d_w.get(),
                      .w_scale = d_ws.get(),
                      .n = c.n,
                      .y = y.get(),
                      .y_dtype = DType::kF32,
                      .ldy = c.n},
                     nullptr);
      return y.download();
    };
    const std::vector<float> all = run(c.m);
    for (const int64_t m : {1, 2, 3, 5, 8, 16}) {
      const std::vector<float> part = run(m);
      EXPECT_EQ(0, std::memcmp(part.data(), all.data(), part.size() * sizeof(float)))
          << "n " << c.n << ": the first " << m << " rows alone differ from the same rows among "
          << c.m;
    }
  }
}

// Weights as a checkpoint stores them, one scale per 128x128 block: e4m3 values, the block
// scales [ceil(n / 128), k / 128] and the same scales repeated down each block's rows
// [n, k / 128] (what the reference and fp8_gemm take).
struct BlockWeights {
  std::vector<uint8_t> values;
  std::vector<float> blocks, rows;
};

BlockWeights quantize_blocks(const std::vector<float>& w, int64_t n, int64_t k) {
  const int64_t nb = (n + 127) / 128, kb = k / 128;
  BlockWeights out{std::vector<uint8_t>(n * k), std::vector<float>(nb * kb),
                   std::vector<float>(n * kb)};
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t g = 0; g < kb; ++g) {
      float amax = 0;
      for (int64_t r = b * 128; r < std::min(n, (b + 1) * 128); ++r)
        for (int64_t j = g * 128; j < (g + 1) * 128; ++j)
          amax = std::max(amax, std::fabs(w[r * k + j]));
      const float scale = amax > 0 ? amax / cpu::kFp8Max : 1.0f;
      out.blocks[b * kb + g] = scale;
      for (int64_t r = b * 128; r < std::min(n, (b + 1) * 128); ++r) {
        out.rows[r * kb + g] = scale;
        for (int64_t j = g * 128; j < (g + 1) * 128; ++j)
          out.values[r * k + j] = f32_to_fp8e4m3(w[r * k + j] / scale);
      }
    }
  }
  return out;
}

// cuBLASLt's block-scaled fp8 product on prefill-sized products (V3's q_a, kv_a, o at TP8 and
// an expert's down, 64-512 rows, fp32 and bf16 out, beta 0 and 1) against the CPU reference,
// to fp32 rounding over k terms; it must have an algorithm for every one of them on Hopper.
TEST(CudaFp8GemmLt, PrefillProductsMatchTheCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(8383);
  cudaStream_t stream;
  MLA_CUDA_CHECK(cudaStreamCreate(&stream));
  {
    const cuda::Blas blas(stream);
    const Case cases[] = {{64, 1536, 7168}, {512, 576, 7168}, {200, 7168, 2048}, {96, 4096, 512}};
    for (const Case& c : cases) {
      for (const bool bf16_out : {false, true}) {
        SCOPED_TRACE("m " + std::to_string(c.m) + " n " + std::to_string(c.n) + " k " +
                     std::to_string(c.k) + (bf16_out ? " bf16 out" : " fp32 out"));
        const int64_t groups = c.k / 128;
        const BlockWeights w =
            quantize_blocks(test::random_normal(c.n * c.k, rng, 0.05f), c.n, c.k);
        const std::vector<float> x = test::random_normal(c.m * c.k, rng);
        std::vector<uint8_t> q(c.m * c.k);
        std::vector<float> sx(c.m * groups);
        cpu::quantize_rows_fp8(x.data(), c.m, c.k, c.k, 128, q.data(), sx.data());
        const float beta = bf16_out ? 0.0f : 1.0f;
        std::vector<float> want(c.m * c.n, 0.25f);
        cpu::gemm_fp8_blockscaled({.x = x.data(),
                                   .m = c.m,
                                   .k = c.k,
                                   .ldx = c.k,
                                   .w = w.values.data(),
                                   .w_scale = w.rows.data(),
                                   .n = c.n,
                                   .group = 128,
                                   .y = want.data(),
                                   .ldy = c.n,
                                   .beta = beta});
        DeviceArray<uint8_t> d_w(w.values), d_q(q);
        DeviceArray<float> d_blocks(w.blocks), d_sx(sx);
        std::vector<float> got(c.m * c.n);
        const cuda::Fp8GemmParams p{.qx = d_q.get(),
                                    .sx = d_sx.get(),
                                    .m = c.m,
                                    .k = c.k,
                                    .w = d_w.get(),
                                    .w_scale = nullptr,  // the block scales instead
                                    .n = c.n,
                                    .y = nullptr,
                                    .y_dtype = bf16_out ? DType::kBF16 : DType::kF32,
                                    .ldy = c.n,
                                    .beta = beta};
        if (bf16_out) {
          DeviceArray<uint16_t> d_y(c.m * c.n);
          cuda::Fp8GemmParams pb = p;
          pb.y = d_y.get();
          ASSERT_TRUE(cuda::fp8_gemm_lt(blas, pb, d_blocks.get())) << "no cuBLASLt algorithm";
          const std::vector<uint16_t> bits = d_y.download();
          for (size_t i = 0; i < bits.size(); ++i) got[i] = bf16_to_f32(bits[i]);
        } else {
          DeviceArray<float> d_y(std::vector<float>(c.m * c.n, 0.25f));
          cuda::Fp8GemmParams pf = p;
          pf.y = d_y.get();
          ASSERT_TRUE(cuda::fp8_gemm_lt(blas, pf, d_blocks.get())) << "no cuBLASLt algorithm";
          got = d_y.download();
        }
        double rms = 0;
        for (const float v : want) rms += double(v) * v;
        rms = std::sqrt(rms / static_cast<double>(want.size()));
        // fp32 sums in another order (1e-5 of the outputs' size); a bf16 output adds its
        // rounding (2^-9 of the value).
        const double tolerance = bf16_out ? 4e-3 : 1e-5;
        double worst = 0;
        for (size_t i = 0; i < got.size(); ++i) {
          ASSERT_TRUE(std::isfinite(got[i])) << i;
          worst = std::max(worst, std::fabs(got[i] - want[i]) / (std::fabs(want[i]) + rms));
        }
        std::printf("fp8_gemm_lt m %lld n %lld k %lld %s: worst %.3g\n",
                    static_cast<long long>(c.m), static_cast<long long>(c.n),
                    static_cast<long long>(c.k), bf16_out ? "bf16" : "fp32", worst);
        EXPECT_LT(worst, tolerance);
      }
    }
  }
  MLA_CUDA_CHECK(cudaStreamDestroy(stream));
}

// Shapes it cannot take are declined, not run: the caller falls back to fp8_gemm.
TEST(CudaFp8GemmLt, DeclinesShapesItCannotTake) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const cuda::Blas blas(nullptr);
  DeviceArray<uint8_t> w(64 * 256), q(32 * 256);
  DeviceArray<float> s(32 * 2), blocks(2), y(32 * 70);
  cuda::Fp8GemmParams p{.qx = q.get(),
                        .sx = s.get(),
                        .m = 32,
                        .k = 256,
                        .w = w.get(),
                        .w_scale = nullptr,
                        .n = 70,  // not a multiple of 16
                        .y = y.get(),
                        .y_dtype = DType::kF32,
                        .ldy = 70};
  EXPECT_FALSE(cuda::fp8_gemm_lt(blas, p, blocks.get()));
  p.n = 64;
  p.ldy = 64;
  p.k = 200;  // not a multiple of 128
  EXPECT_FALSE(cuda::fp8_gemm_lt(blas, p, blocks.get()));
}

}  // namespace
}  // namespace mla
