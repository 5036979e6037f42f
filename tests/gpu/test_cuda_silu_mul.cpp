// CUDA SwiGLU (fp32 in, bf16 out: the model's) against the CPU reference, on fresh random
// inputs with a poisoned output.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/silu_mul.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

using test::DeviceArray;

constexpr int64_t kRows[] = {1, 3, 257};
// 7 takes the scalar path; the rest the vector path (2048: DeepSeek-V3's expert width, 18432:
// its dense MLP width).
constexpr int64_t kWidths[] = {7, 12, 64, 2048, 18432};

// Gate and up values wide enough to saturate the sigmoid.
std::vector<float> random_gate_up(int64_t rows, int64_t width, std::mt19937& rng) {
  return test::random_normal(rows * 2 * width, rng, 3.0f);
}

TEST(CudaSiluMul, Bf16OutputMatchesCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(4322);
  for (int64_t rows : kRows) {
    for (int64_t width : kWidths) {
      const std::vector<float> gate_up = random_gate_up(rows, width, rng);
      std::vector<float> ref(rows * width);
      cpu::silu_mul(gate_up.data(), rows, width, ref.data());

      DeviceArray<float> d_in(gate_up);
      DeviceArray<__nv_bfloat16> d_out(rows * width);  // poison: NaN everywhere
      cuda::silu_mul_bf16({d_in.get(), d_out.get(), rows, width}, nullptr);
      // Tolerance: test::bf16_close (fp32 math, one rounding to bf16).
      EXPECT_EQ(test::count_bf16_mismatches(
                    test::to_float(d_out.download()), ref,
                    "rows " + std::to_string(rows) + ", width " + std::to_string(width) + ": out"),
                0);
    }
  }
}

}  // namespace
}  // namespace mla
