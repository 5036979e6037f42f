// CUDA SwiGLU against the CPU reference, on fresh random inputs with a poisoned output.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/silu_mul.h"

namespace mla {
namespace {

TEST(CudaSiluMul, MatchesCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(4321);
  std::normal_distribution<float> dist(0.0f, 3.0f);  // wide enough to saturate the sigmoid
  // 7 takes the scalar path; the multiples of 4 the 16-byte one (2048: DeepSeek-V3's expert
  // width, 18432: its dense MLP width).
  for (int64_t width : {7, 16, 2048, 18432}) {
    const int64_t rows = 37;
    std::vector<float> gate_up(rows * 2 * width), ref(rows * width), got(rows * width);
    for (auto& v : gate_up) v = dist(rng);
    cpu::silu_mul(gate_up.data(), rows, width, ref.data());

    float *d_in, *d_out;
    MLA_CUDA_CHECK(cudaMalloc(&d_in, gate_up.size() * 4));
    MLA_CUDA_CHECK(cudaMalloc(&d_out, got.size() * 4));
    MLA_CUDA_CHECK(cudaMemcpy(d_in, gate_up.data(), gate_up.size() * 4, cudaMemcpyHostToDevice));
    MLA_CUDA_CHECK(cudaMemset(d_out, 0xff, got.size() * 4));  // poison: NaN everywhere
    cuda::silu_mul_f32({d_in, d_out, rows, width}, nullptr);
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    MLA_CUDA_CHECK(cudaMemcpy(got.data(), d_out, got.size() * 4, cudaMemcpyDeviceToHost));
    cudaFree(d_in);
    cudaFree(d_out);

    double err = 0, norm = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_FALSE(std::isnan(got[i])) << "unwritten output at " << i;
      err += (got[i] - ref[i]) * (got[i] - ref[i]);
      norm += ref[i] * ref[i];
    }
    // fp32 on both sides; expf differs from std::exp by a few ulp at most.
    EXPECT_LT(std::sqrt(err / norm), 1e-5) << "width = " << width;
  }
}

}  // namespace
}  // namespace mla
