// CUDA embedding lookup against a host row copy, on fresh random tables and ids with a
// poisoned output; and the documented NaN rows for out-of-range ids.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/embedding.h"

namespace mla {
namespace {

// Runs the kernel on `ids`; `poison` is the byte every output float starts as.
std::vector<float> run_embedding(const std::vector<float>& table, const std::vector<int32_t>& ids,
                                 int64_t vocab, int64_t d, int poison) {
  const auto tokens = static_cast<int64_t>(ids.size());
  std::vector<float> got(tokens * d);
  float *d_table, *d_out;
  int32_t* d_ids;
  MLA_CUDA_CHECK(cudaMalloc(&d_table, table.size() * 4));
  MLA_CUDA_CHECK(cudaMalloc(&d_ids, ids.size() * 4));
  MLA_CUDA_CHECK(cudaMalloc(&d_out, got.size() * 4));
  MLA_CUDA_CHECK(cudaMemcpy(d_table, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  MLA_CUDA_CHECK(cudaMemcpy(d_ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
  MLA_CUDA_CHECK(cudaMemset(d_out, poison, got.size() * 4));
  cuda::embedding_f32({d_table, d_ids, d_out, tokens, vocab, d}, nullptr);
  MLA_CUDA_CHECK(cudaDeviceSynchronize());
  MLA_CUDA_CHECK(cudaMemcpy(got.data(), d_out, got.size() * 4, cudaMemcpyDeviceToHost));
  cudaFree(d_table);
  cudaFree(d_ids);
  cudaFree(d_out);
  return got;
}

TEST(CudaEmbedding, MatchesRowCopy) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(99);
  std::normal_distribution<float> dist;
  const int64_t vocab = 1000;
  // 7 takes the scalar path; 16 and 7168 (DeepSeek-V3's hidden size) the 16-byte one.
  for (int64_t d : {7, 16, 7168}) {
    std::vector<float> table(vocab * d);
    for (auto& v : table) v = dist(rng);
    std::uniform_int_distribution<int32_t> pick(0, vocab - 1);
    std::vector<int32_t> ids(37);
    for (auto& id : ids) id = pick(rng);
    ids[1] = ids[0];  // repeated ids are legal
    ids.back() = vocab - 1;
    const auto got = run_embedding(table, ids, vocab, d, 0xff);  // poison: NaN everywhere
    // A copy: the tolerance is zero, bit for bit.
    for (size_t t = 0; t < ids.size(); ++t) {
      ASSERT_EQ(std::memcmp(&got[t * d], &table[ids[t] * d], d * 4), 0)
          << "token " << t << " (id " << ids[t] << "), d = " << d;
    }
  }
}

TEST(CudaEmbedding, OutOfRangeIdsGiveNanRows) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t vocab = 10, d = 16;
  std::vector<float> table(vocab * d, 1.0f);
  const std::vector<int32_t> ids = {3, -1, static_cast<int32_t>(vocab), 9};
  const auto got = run_embedding(table, ids, vocab, d, 0);  // zero start: NaN must be written
  for (size_t t = 0; t < ids.size(); ++t) {
    const bool valid = ids[t] >= 0 && ids[t] < vocab;
    for (int64_t i = 0; i < d; ++i) {
      if (valid) {
        ASSERT_EQ(got[t * d + i], 1.0f) << "token " << t;
      } else {
        ASSERT_TRUE(std::isnan(got[t * d + i])) << "token " << t << " (id " << ids[t] << ")";
      }
    }
  }
}

}  // namespace
}  // namespace mla
