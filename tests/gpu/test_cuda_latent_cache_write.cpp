// CUDA latent cache writes against mla::LatentCache::row() on the host: the same rows must
// land at the same places of the pool storage, and every other slot must keep its NaN.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/latent_cache_write.h"
#include "runtime/latent_cache.h"

namespace mla {
namespace {

TEST(CudaLatentCacheWrite, MatchesHostLatentCacheRows) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(1357);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const std::vector<int32_t> lengths = {1, 5, 70, 131};
  // 512 + 64 (DeepSeek's 576) takes the 16-byte path; 7 + 2 the scalar one.
  for (auto [kv_lora_rank, rope_dim] : {std::pair{512, 64}, std::pair{7, 2}}) {
    for (int32_t block_size : {1, 4, 64}) {
      const CacheGeometry geometry{3, block_size, kv_lora_rank, rope_dim};
      const int64_t width = geometry.width();
      int32_t num_pages = 2;  // two pages no sequence owns, which must stay NaN
      for (int32_t len : lengths) num_pages += (len + block_size - 1) / block_size;
      LatentCache cache(geometry, num_pages);

      // Reserve a token at a time, round robin, so the sequences' pages interleave.
      std::vector<BlockTable> tables(lengths.size());
      for (int32_t n = 1; n <= lengths.back(); ++n) {
        for (size_t s = 0; s < lengths.size(); ++s) {
          if (n <= lengths[s]) {
            ASSERT_TRUE(cache.reserve(tables[s], n));
          }
        }
      }
      const int32_t page0 = tables[0].pages[0];
      const float* base =
          cache.page_block(page0, 0) - int64_t{page0} * geometry.num_layers * block_size * width;
      const int64_t pool_numel = int64_t{num_pages} * geometry.num_layers * block_size * width;

      float* d_pool;
      MLA_CUDA_CHECK(cudaMalloc(&d_pool, pool_numel * sizeof(float)));
      MLA_CUDA_CHECK(cudaMemset(d_pool, 0xff, pool_numel * sizeof(float)));  // poison: NaN
      std::vector<float> want(pool_numel, std::numeric_limits<float>::quiet_NaN());

      // Layer 0 takes a whole prefill; layer 2 only the second half of each sequence (a later
      // chunk); layer 1 nothing.
      for (int32_t layer : {0, 2}) {
        std::vector<float> rows;
        std::vector<int32_t> pages, offsets;
        for (size_t s = 0; s < lengths.size(); ++s) {
          for (int32_t pos = layer == 0 ? 0 : lengths[s] / 2; pos < lengths[s]; ++pos) {
            pages.push_back(tables[s].pages[pos / block_size]);
            offsets.push_back(pos % block_size);
            float* host_row = cache.row(tables[s], layer, pos);
            for (int64_t i = 0; i < width; ++i) host_row[i] = dist(rng);
            rows.insert(rows.end(), host_row, host_row + width);
            std::copy(host_row, host_row + width, want.begin() + (host_row - base));
          }
        }
        const auto T = static_cast<int64_t>(pages.size());

        float* d_rows;
        int32_t *d_pages, *d_offsets;
        MLA_CUDA_CHECK(cudaMalloc(&d_rows, rows.size() * sizeof(float)));
        MLA_CUDA_CHECK(cudaMalloc(&d_pages, T * sizeof(int32_t)));
        MLA_CUDA_CHECK(cudaMalloc(&d_offsets, T * sizeof(int32_t)));
        MLA_CUDA_CHECK(
            cudaMemcpy(d_rows, rows.data(), rows.size() * sizeof(float), cudaMemcpyHostToDevice));
        MLA_CUDA_CHECK(
            cudaMemcpy(d_pages, pages.data(), T * sizeof(int32_t), cudaMemcpyHostToDevice));
        MLA_CUDA_CHECK(
            cudaMemcpy(d_offsets, offsets.data(), T * sizeof(int32_t), cudaMemcpyHostToDevice));
        cuda::latent_cache_write_f32(
            {d_rows, d_pages, d_offsets, d_pool, layer, geometry.num_layers, block_size, width, T},
            nullptr);
        MLA_CUDA_CHECK(cudaDeviceSynchronize());
        cudaFree(d_rows);
        cudaFree(d_pages);
        cudaFree(d_offsets);
      }

      std::vector<float> got(pool_numel);
      MLA_CUDA_CHECK(
          cudaMemcpy(got.data(), d_pool, pool_numel * sizeof(float), cudaMemcpyDeviceToHost));
      cudaFree(d_pool);
      int64_t mismatches = 0;
      for (int64_t i = 0; i < pool_numel; ++i) {
        const bool same = std::isnan(want[i]) ? std::isnan(got[i]) : got[i] == want[i];
        if (!same && mismatches++ < 5) {
          ADD_FAILURE() << "pool[" << i << "] = " << got[i] << ", want " << want[i] << " (width "
                        << width << ", block_size " << block_size << ")";
        }
      }
      EXPECT_EQ(mismatches, 0) << "width " << width << ", block_size " << block_size;
    }
  }
}

}  // namespace
}  // namespace mla
