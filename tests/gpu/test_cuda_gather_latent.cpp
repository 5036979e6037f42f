// CUDA gather of sequences' cached latent rows against a host walk of the same page tables:
// a bit-for-bit copy. Only the gathered layer of the sequences' pages holds data (everything
// else in the pool is NaN), table entries past each sequence's pages are out of range, and
// output rows past the last key must keep their poison.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/gather_latent.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

using test::DeviceArray;

TEST(CudaGatherLatent, CopiesPagedRowsInKeyOrder) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(31337);
  const int32_t num_layers = 3, layer = 1, spare_rows = 5;
  // A 0-key sequence, a single key, page-sized and one-past-page-sized lengths.
  const std::vector<int32_t> lengths = {0, 1, 5, 64, 65, 131, 257};
  // 576: DeepSeek's width on the 16-byte path; 18: not a multiple of 8, scalar path.
  for (int32_t width : {576, 18}) {
    for (int32_t B : {1, 16, 64}) {
      SCOPED_TRACE("width " + std::to_string(width) + ", block " + std::to_string(B));
      const auto num_seqs = static_cast<int32_t>(lengths.size());
      int32_t num_pages = 2, max_pages = 0;  // two pages nobody owns
      for (int32_t len : lengths) {
        num_pages += (len + B - 1) / B;
        max_pages = std::max(max_pages, (len + B - 1) / B);
      }
      const int32_t table_stride = max_pages + 1;
      std::vector<int32_t> page_ids(num_pages);
      std::iota(page_ids.begin(), page_ids.end(), 0);
      std::shuffle(page_ids.begin(), page_ids.end(), rng);
      std::vector<int32_t> table(int64_t{num_seqs} * table_stride, 1 << 30);  // past the end
      std::vector<int32_t> cu_keys(num_seqs + 1, 0);
      size_t next = 0;
      for (int32_t s = 0; s < num_seqs; ++s) {
        for (int32_t j = 0; j < (lengths[s] + B - 1) / B; ++j) {
          table[s * table_stride + j] = page_ids[next++];
        }
        cu_keys[s + 1] = cu_keys[s] + lengths[s];
      }
      const int64_t keys = cu_keys.back(), total_keys = keys + spare_rows;

      // Only the gathered layer's rows of owned pages hold data; the rest stays NaN.
      const int64_t pool_numel = int64_t{num_pages} * num_layers * B * width;
      std::vector<__nv_bfloat16> pool(pool_numel, __float2bfloat16(NAN));
      std::vector<__nv_bfloat16> want(keys * width);
      for (int32_t s = 0; s < num_seqs; ++s) {
        for (int32_t j = 0; j < lengths[s]; ++j) {
          const int64_t page = table[s * table_stride + j / B];
          const int64_t slot = (page * num_layers + layer) * B + j % B;
          const std::vector<__nv_bfloat16> row = test::to_bf16(test::random_normal(width, rng));
          std::copy(row.begin(), row.end(), pool.begin() + slot * width);
          std::copy(row.begin(), row.end(), want.begin() + (cu_keys[s] + j) * width);
        }
      }

      DeviceArray<__nv_bfloat16> d_pool(pool), d_out(total_keys * width);  // out: NaN
      DeviceArray<int32_t> d_table(table), d_cu(cu_keys);
      cuda::gather_latent({d_pool.get(), layer, num_layers, B, width, d_table.get(), table_stride,
                           d_cu.get(), num_seqs, total_keys, d_out.get()},
                          nullptr);
      const std::vector<__nv_bfloat16> got = d_out.download();

      // A copy: the tolerance is zero, bit for bit.
      for (int64_t k = 0; k < keys; ++k) {
        ASSERT_EQ(std::memcmp(&got[k * width], &want[k * width], width * 2), 0) << "row " << k;
      }
      for (int64_t i = keys * width; i < total_keys * width; ++i) {
        ASSERT_TRUE(test::is_bf16_poison(got[i])) << "row " << i / width << " past the keys";
      }
    }
  }
}

}  // namespace
}  // namespace mla
