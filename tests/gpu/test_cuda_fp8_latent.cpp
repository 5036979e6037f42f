// The GPU's fp8 latent rows (kernels/cuda/fp8_latent.h): fp8_latent_gather against
// cpu::dequantize_latent_fp8 rounded to bf16 (bit for bit: e4m3 times an fp32 scale is one
// fp32 product on both sides), and a device fp8 LatentCache exporting and importing the packed
// rows exactly as a host fp8 cache does, so fp8 pages migrate between the backends unchanged.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/fp8_latent.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/fp8_latent.h"
#include "kernels/dtype.h"
#include "runtime/latent_cache.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

// n packed rows of random latents (normal, a few groups all zero: scale 1).
std::vector<uint8_t> random_fp8_rows(const cpu::Fp8LatentRow& f, int64_t n, std::mt19937& rng) {
  const int64_t width = f.d_c + f.d_r;
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> values(n * width);
  for (float& v : values) v = normal(rng);
  for (int64_t r = 0; r < n; r += 7)
    std::fill_n(&values[r * width], std::min<int64_t>(f.d_c, 128), 0.0f);
  std::vector<uint8_t> rows(n * f.bytes());
  cpu::quantize_latent_fp8(f, values.data(), n, width, rows.data());
  return rows;
}

TEST(CudaFp8Latent, GatherDequantisesAsTheCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(656);
  for (const auto& [d_c, d_r] : {std::pair{512, 64}, {32, 16}, {200, 8}}) {
    SCOPED_TRACE("d_c " + std::to_string(d_c) + ", d_r " + std::to_string(d_r));
    const cpu::Fp8LatentRow f{.d_c = d_c, .d_r = d_r};
    constexpr int64_t kPoolRows = 300, kOut = 97;
    const std::vector<uint8_t> pool = random_fp8_rows(f, kPoolRows, rng);
    std::vector<int32_t> index(kOut);
    std::uniform_int_distribution<int32_t> pick(0, kPoolRows - 1);
    for (auto& i : index) i = pick(rng);
    const int64_t stride = d_c + d_r + 8;  // a padded output row
    test::DeviceArray<uint8_t> d_pool(pool);
    test::DeviceArray<int32_t> d_index(index);
    test::DeviceArray<uint16_t> d_out(kOut * stride);
    cuda::fp8_latent_gather({.pool = d_pool.get(),
                             .index = d_index.get(),
                             .out = reinterpret_cast<__nv_bfloat16*>(d_out.get()),
                             .rows = kOut,
                             .out_stride = stride,
                             .d_c = d_c,
                             .d_r = d_r},
                            nullptr);
    const std::vector<uint16_t> got = d_out.download();
    std::vector<float> want(d_c + d_r);
    int64_t failures = 0;
    for (int64_t i = 0; i < kOut; ++i) {
      cpu::dequantize_latent_fp8(f, pool.data() + index[i] * f.bytes(), 1, want.data(), d_c + d_r);
      for (int64_t j = 0; j < d_c + d_r; ++j) {
        if (got[i * stride + j] != f32_to_bf16(want[j]) && failures++ < 5) {
          ADD_FAILURE() << "row " << i << " value " << j << ": " << bf16_to_f32(got[i * stride + j])
                        << ", want " << want[j];
        }
      }
      for (int64_t j = d_c + d_r; j < stride; ++j) {
        if (got[i * stride + j] != 0xffff && failures++ < 5) {
          ADD_FAILURE() << "padding of row " << i << " written";
        }
      }
    }
    EXPECT_EQ(failures, 0);
  }
}

// Takes every other free page first, so a sequence's pages are scattered through the pool.
void fragment(LatentCache& cache) {
  BlockTable hold;
  ASSERT_TRUE(cache.reserve(hold, cache.geometry().block_size * 6));
  for (size_t i = 0; i < hold.pages.size(); i += 2) cache.pool().release(hold.pages[i]);
}

TEST(CudaFp8Latent, DeviceCacheMovesThePackedRowsAsTheHostCache) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(1152);
  const CacheGeometry g{.num_layers = 3, .block_size = 16, .kv_lora_rank = 512, .rope_dim = 64};
  const cpu::Fp8LatentRow f{.d_c = 512, .d_r = 64};
  constexpr int32_t kTokens = 75;  // 5 pages, the last one partial
  const std::vector<uint8_t> rows = random_fp8_rows(f, int64_t{g.num_layers} * kTokens, rng);
  Tensor latents = Tensor::empty({g.num_layers, kTokens, f.bytes()}, DType::kU8);
  std::memcpy(latents.raw(), rows.data(), rows.size());
  for (int32_t tp : {1, 2}) {
    for (int32_t rank = 0; rank < tp; ++rank) {
      SCOPED_TRACE("tp " + std::to_string(tp) + ", rank " + std::to_string(rank));
      const ShardPlan plan(tp, rank, 2);
      LatentCache host(g, 24, plan, CacheStorage::kHostFp8);
      LatentCache device(g, 24, plan, CacheStorage::kDeviceFp8);
      EXPECT_EQ(device.row_dtype(), DType::kU8);
      EXPECT_EQ(device.row_width(), 656);
      EXPECT_EQ(device.pool_storage().nbytes(), int64_t{24} * 3 * 16 * 656);
      fragment(device);
      BlockTable ht, dt;
      ASSERT_TRUE(host.reserve(ht, kTokens));
      ASSERT_TRUE(device.reserve(dt, kTokens));
      host.write_range(ht, 0, latents);
      device.write_range(dt, 0, latents);
      for (auto [first, count] : {std::pair{0, kTokens}, {13, 40}, {70, 5}, {16, 1}}) {
        const Tensor want = host.export_range(ht, first, count);
        const Tensor got = device.export_range(dt, first, count);
        ASSERT_EQ(got.dtype(), DType::kU8);
        ASSERT_EQ(got.shape(), want.shape());
        ASSERT_EQ(std::memcmp(got.raw(), want.raw(), want.nbytes()), 0)
            << "tokens [" << first << ", " << first + count << ")";
      }
      // The device's rows imported into a host fp8 cache read back the same.
      LatentCache back(g, 24, plan, CacheStorage::kHostFp8);
      BlockTable bt;
      ASSERT_TRUE(back.import_tokens(bt, device.export_range(dt, 0, kTokens)));
      const Tensor want = host.export_range(ht, 0, kTokens);
      const Tensor got = back.export_range(bt, 0, kTokens);
      ASSERT_EQ(std::memcmp(got.raw(), want.raw(), want.nbytes()), 0);
      LatentCache bf16(g, 24, plan, CacheStorage::kDeviceBf16);
      BlockTable b16;
      ASSERT_TRUE(bf16.reserve(b16, kTokens));
      EXPECT_THROW(bf16.write_range(b16, 0, latents), Error) << "fp8 rows into a bf16 cache";
    }
  }
}

}  // namespace
}  // namespace mla
