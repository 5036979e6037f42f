// CUDA embedding lookup against a host row copy, on fresh random bf16 tables and ids with a
// poisoned output; and the documented NaN rows for out-of-range ids.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/embedding.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

// Runs the kernel for a bf16 `table` on `ids`; `poison` is the byte every output
// float starts as.
template <class T>
std::vector<float> run_embedding(const std::vector<T>& table, const std::vector<int32_t>& ids,
                                 int64_t vocab, int64_t d, int poison) {
  const auto tokens = static_cast<int64_t>(ids.size());
  test::DeviceArray<T> d_table(table);
  test::DeviceArray<int32_t> d_ids(ids);
  test::DeviceArray<float> d_out(tokens * d);
  MLA_CUDA_CHECK(cudaMemset(d_out.get(), poison, d_out.bytes()));
  cuda::embedding_bf16({d_table.get(), d_ids.get(), d_out.get(), tokens, vocab, d}, nullptr);
  return d_out.download();
}

// The table rows as the kernel must return them: fp32, widened exactly from bf16.
std::vector<float> widened(const std::vector<__nv_bfloat16>& table) {
  return test::to_float(table);
}

template <class T>
void check_matches_row_copy(uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t vocab = 1000;
  // 7 takes the scalar path; 16 and 7168 (DeepSeek-V3's hidden size) the vector one.
  for (int64_t d : {7, 16, 7168}) {
    const std::vector<T> table = test::to_bf16(test::random_normal(vocab * d, rng));
    const std::vector<float> rows = widened(table);
    std::uniform_int_distribution<int32_t> pick(0, vocab - 1);
    std::vector<int32_t> ids(37);
    for (auto& id : ids) id = pick(rng);
    ids[1] = ids[0];  // repeated ids are legal
    ids.back() = vocab - 1;
    const auto got = run_embedding(table, ids, vocab, d, 0xff);  // poison: NaN everywhere
    // A copy: the tolerance is zero, bit for bit.
    for (size_t t = 0; t < ids.size(); ++t) {
      ASSERT_EQ(std::memcmp(&got[t * d], &rows[ids[t] * d], d * 4), 0)
          << "token " << t << " (id " << ids[t] << "), d = " << d;
    }
  }
}

template <class T>
void check_out_of_range_rows() {
  const int64_t vocab = 10;
  const std::vector<int32_t> ids = {3, -1, static_cast<int32_t>(vocab), 9};
  for (int64_t d : {7, 16}) {
    const std::vector<T> table(vocab * d, T(1.0f));
    const auto got = run_embedding(table, ids, vocab, d, 0);  // zero start: NaN must be written
    for (size_t t = 0; t < ids.size(); ++t) {
      const bool valid = ids[t] >= 0 && ids[t] < vocab;
      for (int64_t i = 0; i < d; ++i) {
        if (valid) {
          ASSERT_EQ(got[t * d + i], 1.0f) << "token " << t << ", d = " << d;
        } else {
          ASSERT_TRUE(std::isnan(got[t * d + i])) << "token " << t << " (id " << ids[t] << ")";
        }
      }
    }
  }
}

TEST(CudaEmbedding, Bf16TableMatchesWidenedRowCopy) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_matches_row_copy<__nv_bfloat16>(100);
}

TEST(CudaEmbedding, OutOfRangeIdsGiveNanRows) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_out_of_range_rows<__nv_bfloat16>();
}

}  // namespace
}  // namespace mla
