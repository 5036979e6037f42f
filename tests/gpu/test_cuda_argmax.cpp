// CUDA greedy sampling against mla::sample_token with temperature 0, on fresh random logits
// with planted ties and constant rows, and a poisoned output.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "kernels/cuda/argmax.h"
#include "kernels/cuda/cuda_check.h"
#include "runtime/sampler.h"

namespace mla {
namespace {

TEST(CudaArgmax, MatchesGreedySampleToken) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(2468);
  std::normal_distribution<float> dist(0.0f, 4.0f);
  // 129280: DeepSeek-V3's vocabulary; 256: fewer elements than threads in a block.
  for (int64_t vocab : {int64_t{129280}, int64_t{256}}) {
    const int64_t rows = 33;
    std::uniform_int_distribution<int64_t> index(0, vocab - 1);
    std::vector<float> logits(rows * vocab);
    for (auto& v : logits) v = dist(rng);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = logits.data() + r * vocab;
      if (r % 4 == 1) {
        // Planted ties of the maximum at random places, so tied copies land in different
        // threads and warps; the lowest index must win.
        const float top = 100.0f + static_cast<float>(r);
        for (int k = 0; k < 3; ++k) row[index(rng)] = top;
      } else if (r % 4 == 2) {
        // Ties at the two ends of the row and one in the middle.
        row[vocab - 1] = row[vocab / 2] = row[1] = 1000.0f;
      } else if (r % 4 == 3) {
        for (int64_t i = 0; i < vocab; ++i) row[i] = r % 8 == 3 ? 0.25f : -7.0f;  // all equal
      }
    }

    float* d_logits;
    int32_t* d_out;
    MLA_CUDA_CHECK(cudaMalloc(&d_logits, logits.size() * sizeof(float)));
    MLA_CUDA_CHECK(cudaMalloc(&d_out, rows * sizeof(int32_t)));
    MLA_CUDA_CHECK(
        cudaMemcpy(d_logits, logits.data(), logits.size() * sizeof(float), cudaMemcpyHostToDevice));
    MLA_CUDA_CHECK(cudaMemset(d_out, 0xff, rows * sizeof(int32_t)));  // poison: -1 everywhere
    cuda::argmax_f32({d_logits, d_out, rows, vocab}, nullptr);
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<int32_t> got(rows);
    MLA_CUDA_CHECK(cudaMemcpy(got.data(), d_out, rows * sizeof(int32_t), cudaMemcpyDeviceToHost));
    cudaFree(d_logits);
    cudaFree(d_out);

    for (int64_t r = 0; r < rows; ++r) {
      const int32_t want = sample_token(logits.data() + r * vocab, vocab, SamplingParams{}, 0);
      EXPECT_EQ(got[r], want) << "vocab = " << vocab << ", row " << r;
    }
  }
}

}  // namespace
}  // namespace mla
