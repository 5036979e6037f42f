// The fp8 latent cache (`cache.dtype: fp8`): the packed row's layout and rounding
// (kernels/cpu/fp8_latent.h, the reference the CUDA backend will be held to), a LatentCache
// that stores, reads, exports and imports such rows unchanged, and the CPU model on it against
// transformers' golden logits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <random>
#include <vector>

#include "kernels/cpu/fp8_latent.h"
#include "kernels/dtype.h"
#include "runtime/deepseek_model.h"
#include "runtime/engine.h"
#include "runtime/latent_cache.h"
#include "tests/support/golden.h"
#include "tests/support/golden_run.h"

namespace mla {
namespace {

std::vector<float> random_rows(int64_t n, int64_t width, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n * width);
  for (auto& v : x) v = normal(rng);
  return x;
}

TEST(Fp8LatentRow, IsFlashMlasLayoutForDeepSeek) {
  const cpu::Fp8LatentRow f{.d_c = 512, .d_r = 64};
  EXPECT_EQ(f.groups(), 4);
  EXPECT_EQ(f.scales_offset(), 512);
  EXPECT_EQ(f.rope_offset(), 528);
  EXPECT_EQ(f.bytes(), 656);
  // A d_c that is not a multiple of 128 gets one scale for its last, shorter group.
  EXPECT_EQ((cpu::Fp8LatentRow{.d_c = 200, .d_r = 16}.bytes()), 200 + 8 + 32);
}

// Each group's largest magnitude comes back to float rounding (as 448 x its scale), every latent
// value within e4m3's rounding (half a step: 2^-4 of the value, or 2^-10 of the scale among the
// subnormals), every rotary value within bf16's (2^-9 of the value); an all-zero group reads
// back as zeros.
TEST(Fp8LatentRow, RoundTripsWithinTheFormatsRounding) {
  const cpu::Fp8LatentRow f{.d_c = 300, .d_r = 64};
  const int64_t width = f.d_c + f.d_r, n = 37;
  std::vector<float> x = random_rows(n, width, 3);
  for (int64_t j = 128; j < 256; ++j) x[5 * width + j] = 0.0f;  // row 5, group 1: all zero
  std::vector<uint8_t> packed(n * f.bytes(), 0xff);
  cpu::quantize_latent_fp8(f, x.data(), n, width, packed.data());
  std::vector<float> y(n * width, NAN);
  cpu::dequantize_latent_fp8(f, packed.data(), n, y.data(), width);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t g = 0; g < f.groups(); ++g) {
      const int64_t begin = g * 128, end = std::min<int64_t>(f.d_c, begin + 128);
      float amax = 0, scale = 0;
      for (int64_t j = begin; j < end; ++j) amax = std::max(amax, std::fabs(x[i * width + j]));
      std::memcpy(&scale, &packed[i * f.bytes() + f.scales_offset() + 4 * g], 4);
      EXPECT_EQ(scale, amax > 0 ? amax / 448.0f : 1.0f) << "row " << i << " group " << g;
      for (int64_t j = begin; j < end; ++j) {
        const float v = x[i * width + j], got = y[i * width + j];
        EXPECT_LE(std::fabs(got - v), std::max(std::fabs(v) / 16, scale / 1024) * 1.0001f)
            << "row " << i << " value " << j;
        if (std::fabs(v) == amax && amax > 0) {
          EXPECT_NEAR(std::fabs(got), amax, amax * 1e-6);
        }
      }
    }
    for (int64_t j = f.d_c; j < width; ++j) {
      const float v = x[i * width + j];
      EXPECT_LE(std::fabs(y[i * width + j] - v), std::fabs(v) / 256) << "row " << i;
      EXPECT_EQ(y[i * width + j], bf16_to_f32(f32_to_bf16(v)));
    }
  }
  for (int64_t j = 128; j < 256; ++j) EXPECT_EQ(y[5 * width + j], 0.0f);
}

// A page of the tiny shape: d_c 32, d_r 16 -> 32 + 4 + 32 = 68 bytes a row.
constexpr CacheGeometry kGeometry{
    .num_layers = 2, .block_size = 4, .kv_lora_rank = 32, .rope_dim = 16};

TEST(Fp8Cache, StoresPackedRowsAndMovesThemUnchanged) {
  LatentCache cache(kGeometry, 8, ShardPlan(1, 0, 1), CacheStorage::kHostFp8);
  EXPECT_EQ(cache.row_dtype(), DType::kU8);
  EXPECT_EQ(cache.row_width(), 68);
  EXPECT_EQ(cache.pool_storage().nbytes(), size_t{8} * 2 * 4 * 68);
  BlockTable table;
  ASSERT_TRUE(cache.reserve(table, 10));
  const int64_t width = kGeometry.width();
  const std::vector<float> x = random_rows(2 * 10, width, 9);
  for (int32_t layer = 0; layer < 2; ++layer)
    for (int32_t pos = 0; pos < 10; ++pos)
      cache.store_latent(table, layer, pos, &x[(layer * 10 + pos) * width]);
  // Read back as the reference dequantises.
  const cpu::Fp8LatentRow f{.d_c = 32, .d_r = 16};
  std::vector<uint8_t> packed(f.bytes());
  std::vector<float> want(width), got(width), page(4 * width);
  for (int32_t layer = 0; layer < 2; ++layer) {
    for (int32_t pos = 0; pos < 10; ++pos) {
      cpu::quantize_latent_fp8(f, &x[(layer * 10 + pos) * width], 1, width, packed.data());
      cpu::dequantize_latent_fp8(f, packed.data(), 1, want.data(), width);
      cache.load_latent(table, layer, pos, got.data());
      EXPECT_EQ(got, want) << "layer " << layer << " token " << pos;
      cache.read_page_block(table.pages[pos / 4], layer, page.data());
      EXPECT_TRUE(std::equal(want.begin(), want.end(), page.begin() + (pos % 4) * width));
    }
  }
  // Export, import elsewhere, export again: the same bytes (migration moves fp8 rows as they
  // are); latents of another element type are refused.
  const Tensor exported = cache.export_tokens(table, 10);
  ASSERT_EQ(exported.shape(), (Shape{2, 10, 68}));
  ASSERT_EQ(exported.dtype(), DType::kU8);
  LatentCache other(CacheGeometry{2, 8, 32, 16}, 4, ShardPlan(1, 0, 1), CacheStorage::kHostFp8);
  BlockTable moved;
  ASSERT_TRUE(other.import_tokens(moved, exported));
  const Tensor again = other.export_tokens(moved, 10);
  EXPECT_EQ(std::memcmp(again.raw(), exported.raw(), exported.nbytes()), 0);
  LatentCache f32(kGeometry, 4);
  BlockTable wide;
  ASSERT_TRUE(f32.reserve(wide, 10));
  EXPECT_EQ(test::code_of([&] { f32.write_range(wide, 0, exported); }),
            ErrorCode::kInvalidArgument);
  // fp32 views of fp8 rows do not exist.
  EXPECT_EQ(test::code_of([&] { cache.row(table, 0, 0); }), ErrorCode::kInternal);
}

TEST(Fp8Cache, DtypeNamesParse) {
  EXPECT_EQ(cache_dtype_from_string("fp8", "cache.dtype"), CacheDType::kFp8);
  EXPECT_EQ(cache_dtype_from_string("auto", "cache.dtype"), CacheDType::kAuto);
  std::string message;
  EXPECT_EQ(test::code_of([] { cache_dtype_from_string("int4", "cache.dtype"); }, &message),
            ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("cache.dtype"), std::string::npos) << message;
}

// The CPU model on an fp8 cache against transformers (which keeps fp32 K/V), compared as
// test::closeness does: the logits' relative error stays within kMedianTolerance at the median
// step and kWorstTolerance at the worst (e4m3 keeps 3 mantissa bits: a latent value is off by
// up to 2^-4 of itself, and the tiny models' logits follow; a step whose logits are small
// relative to their change shows more). What each model measured is printed
// (docs/BENCHMARKS.md quotes it).
constexpr double kMedianTolerance = 0.05, kWorstTolerance = 0.25;

TEST(Fp8Cache, ModelStaysCloseToTransformers) {
  for (const std::string name : {"v3", "v2_lite", "v3_mla", "v3_fp8"}) {
    const test::Golden& g = test::golden(name);
    ModelOptions options;
    options.show_progress = false;
    options.cache_dtype = CacheDType::kFp8;
    const test::CpuGoldenRun run = test::run_cpu_golden(name, options, g);
    ASSERT_EQ(run.storage, CacheStorage::kHostFp8);
    const test::Closeness c = test::closeness(run.outputs, g, run.vocab);
    std::cout << name << ": fp8 cache, " << c << "\n";
    EXPECT_LT(c.median, kMedianTolerance) << name;
    EXPECT_LT(c.worst, kWorstTolerance) << name;
    EXPECT_GT(c.median, 1e-4) << name << ": the cache was not quantised";
  }
}

}  // namespace
}  // namespace mla
