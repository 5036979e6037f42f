// CUDA RMSNorm against the CPU reference, on fresh random inputs with a poisoned output.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/rms_norm.h"

namespace mla {
namespace {

TEST(CudaRmsNorm, MatchesCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(1234);
  std::normal_distribution<float> dist;
  for (int64_t d : {16, 512, 7168}) {
    const int64_t rows = 37;
    std::vector<float> x(rows * d), w(d), ref(rows * d), got(rows * d);
    for (auto& v : x) v = dist(rng);
    for (auto& v : w) v = 1.0f + 0.1f * dist(rng);
    cpu::rms_norm(x.data(), rows, d, d, w.data(), 1e-6f, ref.data(), d);

    float *dx, *dw, *dy;
    MLA_CUDA_CHECK(cudaMalloc(&dx, x.size() * 4));
    MLA_CUDA_CHECK(cudaMalloc(&dw, w.size() * 4));
    MLA_CUDA_CHECK(cudaMalloc(&dy, x.size() * 4));
    MLA_CUDA_CHECK(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    MLA_CUDA_CHECK(cudaMemcpy(dw, w.data(), w.size() * 4, cudaMemcpyHostToDevice));
    MLA_CUDA_CHECK(cudaMemset(dy, 0xff, x.size() * 4));  // poison: NaN everywhere
    cuda::rms_norm_f32({dx, dw, dy, rows, d, 1e-6f}, nullptr);
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    MLA_CUDA_CHECK(cudaMemcpy(got.data(), dy, got.size() * 4, cudaMemcpyDeviceToHost));
    cudaFree(dx);
    cudaFree(dw);
    cudaFree(dy);

    double err = 0, norm = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_FALSE(std::isnan(got[i])) << "unwritten output at " << i;
      err += (got[i] - ref[i]) * (got[i] - ref[i]);
      norm += ref[i] * ref[i];
    }
    EXPECT_LT(std::sqrt(err / norm), 1e-5) << "d = " << d;  // fp32 on both sides
  }
}

}  // namespace
}  // namespace mla
