// CUDA rotary embedding against cpu::rope_table + cpu::rope_rotate, on fresh random inputs:
// the rotary tail of strided [T, H, d_n + d_r] rows is rotated in place, and everything
// outside the tails must come back bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/rope.h"

namespace mla {
namespace {

struct RopeCase {
  int64_t heads, d_n, d_r;
};

TEST(CudaRope, MatchesCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(2024);
  std::normal_distribution<float> dist;
  // DeepSeek's query shape (d_r = 64 behind d_n), and a small one with heads = 1 as for the
  // latent [T, d_c + d_r].
  for (const RopeCase& c : {RopeCase{5, 32, 64}, RopeCase{1, 48, 16}}) {
    for (bool interleave : {false, true}) {
      const int64_t tokens = 37, width = c.d_n + c.d_r, d = c.d_r;
      std::vector<float> x(tokens * c.heads * width), inv_freq(d / 2);
      for (auto& v : x) v = dist(rng);
      for (int64_t j = 0; j < d / 2; ++j) {
        inv_freq[j] = 1.0f / std::pow(10000.0f, static_cast<float>(2 * j) / d);
      }
      // Positions up to DeepSeek-V3's 163840-token context exercise large angles.
      std::uniform_int_distribution<int32_t> pick(0, 163839);
      std::vector<int32_t> positions(tokens);
      for (auto& pos : positions) pos = pick(rng);
      positions[0] = 0;
      const float attention_factor = 1.2f;

      std::vector<float> ref = x, cos_sin(d);
      for (int64_t t = 0; t < tokens; ++t) {
        cpu::rope_table(positions[t], inv_freq.data(), d, attention_factor, cos_sin.data());
        for (int64_t h = 0; h < c.heads; ++h) {
          cpu::rope_rotate(&ref[(t * c.heads + h) * width + c.d_n], d, cos_sin.data(), interleave);
        }
      }

      float *dx, *d_freq;
      int32_t* d_pos;
      MLA_CUDA_CHECK(cudaMalloc(&dx, x.size() * 4));
      MLA_CUDA_CHECK(cudaMalloc(&d_freq, inv_freq.size() * 4));
      MLA_CUDA_CHECK(cudaMalloc(&d_pos, positions.size() * 4));
      MLA_CUDA_CHECK(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
      MLA_CUDA_CHECK(
          cudaMemcpy(d_freq, inv_freq.data(), inv_freq.size() * 4, cudaMemcpyHostToDevice));
      MLA_CUDA_CHECK(
          cudaMemcpy(d_pos, positions.data(), positions.size() * 4, cudaMemcpyHostToDevice));
      cuda::RopeParams p{};
      p.x = dx + c.d_n;
      p.positions = d_pos;
      p.inv_freq = d_freq;
      p.tokens = tokens;
      p.heads = c.heads;
      p.d = d;
      p.token_stride = c.heads * width;
      p.head_stride = width;
      p.attention_factor = attention_factor;
      p.interleave = interleave;
      cuda::rope_f32(p, nullptr);
      MLA_CUDA_CHECK(cudaDeviceSynchronize());
      std::vector<float> got(x.size());
      MLA_CUDA_CHECK(cudaMemcpy(got.data(), dx, got.size() * 4, cudaMemcpyDeviceToHost));
      cudaFree(dx);
      cudaFree(d_freq);
      cudaFree(d_pos);

      double err = 0, norm = 0;
      for (int64_t r = 0; r < tokens * c.heads; ++r) {
        const float* g = &got[r * width];
        const float* e = &ref[r * width];
        ASSERT_EQ(std::memcmp(g, e, c.d_n * 4), 0) << "row " << r << ": d_n part changed";
        for (int64_t i = c.d_n; i < width; ++i) {
          ASSERT_FALSE(std::isnan(g[i])) << "NaN at row " << r << ", " << i;
          err += (g[i] - e[i]) * (g[i] - e[i]);
          norm += e[i] * e[i];
        }
      }
      // fp32 on both sides; sincosf differs from std::cos/std::sin by a couple of ulp.
      EXPECT_LT(std::sqrt(err / norm), 1e-5)
          << "heads = " << c.heads << ", d = " << d << ", interleave = " << interleave;
    }
  }
}

}  // namespace
}  // namespace mla
