// CUDA latent store (RMSNorm of c, RoPE of k_r, bf16 into the paged pool) against the CPU
// latent construction of DeepseekModel::attention (cpu::rms_norm, cpu::rope_table,
// cpu::rope_rotate), on fresh random kv rows. Several layers, shuffled pages and slots another
// rank stores (-1); every pool element the kernel must not touch keeps its NaN poison.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/latent_store.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

using test::DeviceArray;

struct StoreCase {
  int32_t d_c, d_r, kv_pad, block_size;
  bool interleave;
};

TEST(CudaLatentStore, MatchesCpuLatentRows) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(97531);
  const int32_t num_layers = 3;
  const float eps = 1e-6f, attention_factor = 1.2f;
  const std::vector<int32_t> lengths = {1, 5, 70, 131};
  const StoreCase cases[] = {
      {512, 64, 0, 64, true},     // DeepSeek-V3: 576 values, rope_interleave
      {512, 64, 1536, 4, false},  // kv rows inside a wider [T, 576 + d_q] GEMM output
      {8, 2, 3, 1, true},         // smallest shapes, odd kv stride
      {24, 128, 0, 16, false},    // d_r > d_c
  };
  for (const StoreCase& c : cases) {
    const int32_t width = c.d_c + c.d_r, B = c.block_size;
    const int64_t kv_stride = width + c.kv_pad;
    SCOPED_TRACE("d_c " + std::to_string(c.d_c) + ", d_r " + std::to_string(c.d_r) + ", block " +
                 std::to_string(B) + ", interleave " + std::to_string(c.interleave));
    std::vector<float> w = test::random_normal(c.d_c, rng, 0.1f);
    for (auto& v : w) v += 1.0f;
    const std::vector<float> inv_freq = test::rope_inv_freq(c.d_r);

    // Sequences' pages drawn from a shuffled pool with two pages nobody owns.
    int32_t num_pages = 2;
    for (int32_t len : lengths) num_pages += (len + B - 1) / B;
    std::vector<int32_t> page_ids(num_pages);
    std::iota(page_ids.begin(), page_ids.end(), 0);
    std::shuffle(page_ids.begin(), page_ids.end(), rng);
    std::vector<std::vector<int32_t>> tables(lengths.size());
    size_t next = 0;
    for (size_t s = 0; s < lengths.size(); ++s) {
      for (int32_t j = 0; j < (lengths[s] + B - 1) / B; ++j) tables[s].push_back(page_ids[next++]);
    }
    const int64_t pool_numel = int64_t{num_pages} * num_layers * B * width;
    DeviceArray<__nv_bfloat16> d_pool(pool_numel);  // poison: NaN everywhere
    std::vector<float> want(pool_numel, NAN);
    DeviceArray<float> d_w(w), d_freq(inv_freq);

    // Layer 0 takes a whole prefill, layer 2 the second half of each sequence (a later
    // chunk), layer 1 nothing. Odd pages of every sequence belong to another rank (-1).
    for (int32_t layer : {0, 2}) {
      std::vector<int32_t> positions, pages, offsets;
      for (size_t s = 0; s < lengths.size(); ++s) {
        for (int32_t pos = layer == 0 ? 0 : lengths[s] / 2; pos < lengths[s]; ++pos) {
          const bool mine = (pos / B) % 2 == 0;
          positions.push_back(pos);
          pages.push_back(mine ? tables[s][pos / B] : -1);
          offsets.push_back(pos % B);
        }
      }
      const auto T = static_cast<int64_t>(positions.size());
      const std::vector<float> kv = test::random_normal(T * kv_stride, rng);

      std::vector<float> row(width), cos_sin(c.d_r);
      for (int64_t t = 0; t < T; ++t) {
        if (pages[t] < 0) continue;
        std::copy_n(&kv[t * kv_stride], width, row.begin());
        cpu::rms_norm(row.data(), 1, c.d_c, c.d_c, w.data(), eps, row.data(), c.d_c);
        cpu::rope_table(positions[t], inv_freq.data(), c.d_r, attention_factor, cos_sin.data());
        cpu::rope_rotate(row.data() + c.d_c, c.d_r, cos_sin.data(), c.interleave);
        const int64_t slot = (int64_t{pages[t]} * num_layers + layer) * B + offsets[t];
        std::copy(row.begin(), row.end(), want.begin() + slot * width);
      }

      DeviceArray<float> d_kv(kv);
      DeviceArray<int32_t> d_pos(positions), d_pages(pages), d_offsets(offsets);
      cuda::LatentStoreParams p{};
      p.kv = d_kv.get();
      p.kv_stride = kv_stride;
      p.norm_w = d_w.get();
      p.eps = eps;
      p.positions = d_pos.get();
      p.inv_freq = d_freq.get();
      p.attention_factor = attention_factor;
      p.interleave = c.interleave;
      p.slot_pages = d_pages.get();
      p.slot_offsets = d_offsets.get();
      p.pool = d_pool.get();
      p.layer = layer;
      p.num_layers = num_layers;
      p.block_size = B;
      p.d_c = c.d_c;
      p.d_r = c.d_r;
      p.T = T;
      cuda::latent_store(p, nullptr);
      MLA_CUDA_CHECK(cudaDeviceSynchronize());
    }

    // Tolerance: test::bf16_close (one rounding to bf16 of an fp32 value); slots the kernel
    // must not write still hold the 0xFFFF poison.
    const std::vector<__nv_bfloat16> bits = d_pool.download();
    std::vector<float> got_stored, want_stored;
    int64_t touched = 0;
    for (int64_t i = 0; i < pool_numel; ++i) {
      if (std::isnan(want[i])) {
        if (!test::is_bf16_poison(bits[i]) && touched++ < 5) {
          ADD_FAILURE() << "pool[" << i << "] written: " << __bfloat162float(bits[i]);
        }
        continue;
      }
      got_stored.push_back(__bfloat162float(bits[i]));
      want_stored.push_back(want[i]);
    }
    EXPECT_EQ(touched, 0);
    EXPECT_EQ(test::count_bf16_mismatches(got_stored, want_stored, "stored latent"), 0);
  }
}

}  // namespace
}  // namespace mla
