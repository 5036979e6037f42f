// CUDA row gather/scatter (kernels/cuda/gather_rows.h) against a host loop, on both the
// 16-byte and the byte path, with every output byte the kernel must not write left poisoned;
// and a device LatentCache's export/import (one gather or scatter over the sequence's rows)
// against the host cache holding the same values, on shuffled pages, whole and sharded. The
// fp8 cache's rows (kernels/cuda/fp8_latent.h): fp8_latent_gather against
// cpu::dequantize_latent_fp8 rounded to bf16 (bit for bit: e4m3 times an fp32 scale is one fp32
// product on both sides), and a device fp8 cache exporting and importing the packed rows exactly
// as a host fp8 cache does, so fp8 pages migrate between the backends unchanged.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/fp8_latent.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/fp8_latent.h"
#include "kernels/cuda/gather_rows.h"
#include "kernels/dtype.h"
#include "runtime/latent_cache.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

using test::DeviceArray;

struct RowsCase {
  int64_t row_bytes, stride;  // both strides; 16-byte words when both are multiples of 16
};

std::vector<uint8_t> random_bytes(size_t n, std::mt19937& rng) {
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng() & 0x7F);  // never the 0xFF poison
  return v;
}

TEST(CudaGatherRows, GatherAndScatterMatchAHostLoop) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(4242);
  const RowsCase cases[] = {{1152, 1152}, {1152, 1184}, {6, 10}, {4608, 4608}};
  constexpr int64_t kPoolRows = 97, kRows = 40;
  for (const RowsCase& c : cases) {
    SCOPED_TRACE("row_bytes " + std::to_string(c.row_bytes) + ", stride " +
                 std::to_string(c.stride));
    std::vector<int32_t> index(kPoolRows);
    std::iota(index.begin(), index.end(), 0);
    std::shuffle(index.begin(), index.end(), rng);
    index.resize(kRows);  // distinct rows, as scatter needs
    DeviceArray<int32_t> d_index(index);
    const std::vector<uint8_t> pool = random_bytes(kPoolRows * c.stride, rng);
    const std::vector<uint8_t> packed = random_bytes(kRows * c.stride, rng);

    DeviceArray<uint8_t> d_pool(pool), d_out(kRows * c.stride);
    cuda::gather_rows({.in = d_pool.get(),
                       .index = d_index.get(),
                       .out = d_out.get(),
                       .rows = kRows,
                       .row_bytes = c.row_bytes,
                       .in_stride = c.stride,
                       .out_stride = c.stride},
                      nullptr);
    const std::vector<uint8_t> gathered = d_out.download();
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t b = 0; b < c.stride; ++b) {
        const uint8_t want = b < c.row_bytes ? pool[index[r] * c.stride + b] : 0xFF;
        ASSERT_EQ(gathered[r * c.stride + b], want) << "gather row " << r << " byte " << b;
      }
    }

    DeviceArray<uint8_t> d_packed(packed), d_target(kPoolRows * c.stride);
    cuda::scatter_rows({.in = d_packed.get(),
                        .index = d_index.get(),
                        .out = d_target.get(),
                        .rows = kRows,
                        .row_bytes = c.row_bytes,
                        .in_stride = c.stride,
                        .out_stride = c.stride},
                       nullptr);
    std::vector<uint8_t> want(kPoolRows * c.stride, 0xFF);
    for (int64_t r = 0; r < kRows; ++r) {
      std::memcpy(&want[index[r] * c.stride], &packed[r * c.stride], c.row_bytes);
    }
    ASSERT_EQ(d_target.download(), want) << "scatter wrote outside its rows or missed some";
  }
}

// fp32 values that bf16 holds exactly, so the host and device caches hold the same numbers.
Tensor random_bf16_exact_latents(int64_t layers, int64_t tokens, int64_t width, std::mt19937& rng) {
  std::normal_distribution<float> dist;
  Tensor t = Tensor::empty({layers, tokens, width});
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = bf16_to_f32(f32_to_bf16(dist(rng)));
  return t;
}

Tensor as_bf16(const Tensor& f32) {
  Tensor out = Tensor::empty(f32.shape(), DType::kBF16);
  for (int64_t i = 0; i < f32.numel(); ++i) out.data<uint16_t>()[i] = f32_to_bf16(f32.f32()[i]);
  return out;
}

// Takes every other free page first, so a sequence's pages are scattered through the pool.
void fragment(LatentCache& cache) {
  BlockTable hold;
  ASSERT_TRUE(cache.reserve(hold, cache.geometry().block_size * 6));
  for (size_t i = 0; i < hold.pages.size(); i += 2) cache.pool().release(hold.pages[i]);
}

TEST(CudaLatentCache, DeviceExportAndImportMatchTheHostCache) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(777);
  const CacheGeometry g{.num_layers = 3, .block_size = 16, .kv_lora_rank = 512, .rope_dim = 64};
  constexpr int32_t kTokens = 75;  // 5 pages, the last one partial
  const Tensor latents = random_bf16_exact_latents(g.num_layers, kTokens, g.width(), rng);
  for (int32_t tp : {1, 2}) {
    for (int32_t rank = 0; rank < tp; ++rank) {
      SCOPED_TRACE("tp " + std::to_string(tp) + ", rank " + std::to_string(rank));
      const ShardPlan plan(tp, rank, 2);
      LatentCache host(g, 24, plan), device(g, 24, plan, CacheStorage::kDeviceBf16);
      EXPECT_EQ(device.row_dtype(), DType::kBF16);
      fragment(device);
      BlockTable ht, dt;
      ASSERT_TRUE(host.reserve(ht, kTokens));
      ASSERT_TRUE(device.reserve(dt, kTokens));
      host.write_range(ht, 0, latents);
      device.write_range(dt, 0, as_bf16(latents));
      // Whole, a range across pages, a packed range and a single token.
      for (auto [first, count] : {std::pair{0, kTokens}, {13, 40}, {70, 5}, {16, 1}}) {
        const Tensor want = as_bf16(host.export_range(ht, first, count));
        const Tensor got = device.export_range(dt, first, count);
        ASSERT_EQ(got.dtype(), DType::kBF16);
        ASSERT_EQ(got.shape(), want.shape());
        ASSERT_EQ(std::memcmp(got.raw(), want.raw(), want.nbytes()), 0)
            << "tokens [" << first << ", " << first + count << ")";
        const Tensor packed_want = as_bf16(host.export_stored(ht, first, count));
        const Tensor packed = device.export_stored(dt, first, count);
        ASSERT_EQ(packed.shape(), packed_want.shape());
        ASSERT_EQ(std::memcmp(packed.raw(), packed_want.raw(), packed_want.nbytes()), 0);
      }
      // A staged import into another device cache gives back the same rows.
      LatentCache target(g, 24, plan, CacheStorage::kDeviceBf16);
      fragment(target);
      BlockTable tt;
      ASSERT_TRUE(target.reserve(tt, kTokens));
      target.write_range(tt, 0, device.export_range(dt, 0, 30));
      target.write_range(tt, 30, device.export_range(dt, 30, kTokens - 30));
      const Tensor back = target.export_range(tt, 0, kTokens);
      const Tensor want = device.export_range(dt, 0, kTokens);
      ASSERT_EQ(std::memcmp(back.raw(), want.raw(), want.nbytes()), 0);
      EXPECT_THROW(target.write_range(tt, 0, latents), Error) << "fp32 rows into a bf16 cache";
    }
  }
}

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
