// A paged latent cache of random rows for the MLA attention kernels' tests, poisoned where no
// kernel may read: a pool of three layers with the tested layer in the middle, each sequence's
// pages scattered over the pool, every other layer, every unused page and every row past a
// sequence's keys NaN (bf16) or 0xff (fp8: NaN codes, NaN scales and NaN rotary values), and
// block-table entries past each sequence's pages out of range. The fp32 copy holds what a kernel
// reads: the rows rounded to bf16 (fp8 ones dequantised first).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/fp8_latent.h"
#include "kernels/cuda/fp8_latent.h"
#include "kernels/cuda/mla_decode.h"
#include "kernels/dtype.h"

namespace mla::test {

inline constexpr int32_t kBlock = cuda::kMlaDecodeBlockSize;
inline constexpr int32_t kDc = cuda::kMlaDecodeLatentDim;
inline constexpr int32_t kDr = cuda::kMlaDecodeRopeDim;
inline constexpr int32_t kWidth = kDc + kDr;
inline constexpr uint16_t kBf16NaN = 0x7fc0;
inline constexpr int32_t kOutOfRangePage = 1 << 30;

// The paged latent cache of a batch, on the host and the device. lengths[b] is the number of
// keys of sequence b (its last query's num_keys).
struct Cache {
  static constexpr int32_t kNumLayers = 3, kLayer = 1;
  std::vector<int32_t> lengths;
  int32_t num_pages = 0, table_stride = 0;
  cuda::LatentElement element = cuda::LatentElement::kBf16;
  std::vector<uint8_t> pool;          // [num_pages, kNumLayers, 64, row bytes]
  std::vector<int32_t> block_table;   // [batch, table_stride]
  std::vector<std::vector<float>> c;  // per sequence [pages * 64, 576]: layer kLayer as fp32

  int32_t batch() const { return static_cast<int32_t>(lengths.size()); }
};

inline int32_t pages_of(int32_t keys) { return (keys + kBlock - 1) / kBlock; }

inline Cache make_cache(const std::vector<int32_t>& lengths, std::mt19937& rng,
                        cuda::LatentElement element = cuda::LatentElement::kBf16) {
  Cache cache;
  cache.lengths = lengths;
  cache.element = element;
  const bool fp8 = element == cuda::LatentElement::kFp8;
  const cpu::Fp8LatentRow f{.d_c = kDc, .d_r = kDr};
  const int64_t row_bytes = cuda::latent_row_bytes(element, kDc, kDr);
  int32_t used = 0, max_pages = 0;
  for (int32_t len : lengths) {
    used += pages_of(len);
    max_pages = std::max(max_pages, pages_of(len));
  }
  cache.num_pages = used + 3;          // three pages no sequence owns
  cache.table_stride = max_pages + 2;  // room for garbage entries past every sequence
  std::vector<int32_t> ids(cache.num_pages);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);

  const int64_t page_bytes = int64_t{Cache::kNumLayers} * kBlock * row_bytes;
  cache.pool.resize(cache.num_pages * page_bytes);
  if (fp8) {
    std::fill(cache.pool.begin(), cache.pool.end(), uint8_t{0xff});
  } else {
    for (size_t i = 0; i < cache.pool.size(); i += 2) std::memcpy(&cache.pool[i], &kBf16NaN, 2);
  }
  cache.block_table.assign(int64_t{cache.batch()} * cache.table_stride, kOutOfRangePage);
  cache.c.resize(cache.batch());
  std::normal_distribution<float> normal;
  int32_t next = 0;
  for (int32_t b = 0; b < cache.batch(); ++b) {
    const int32_t pages = pages_of(lengths[b]);
    cache.c[b].assign(int64_t{pages} * kBlock * kWidth, std::numeric_limits<float>::quiet_NaN());
    for (int32_t k = 0; k < pages; ++k) {
      const int32_t page = ids[next++];
      cache.block_table[int64_t{b} * cache.table_stride + k] = page;
      uint8_t* rows =
          cache.pool.data() + page * page_bytes + int64_t{Cache::kLayer} * kBlock * row_bytes;
      for (int32_t r = 0; r < kBlock && k * kBlock + r < lengths[b]; ++r) {
        float* ref = cache.c[b].data() + (int64_t{k} * kBlock + r) * kWidth;
        for (int32_t i = 0; i < kWidth; ++i) ref[i] = normal(rng);
        if (fp8) {
          // What the kernel reads: the dequantised row, rounded to bf16.
          cpu::quantize_latent_fp8(f, ref, 1, kWidth, rows + r * row_bytes);
          cpu::dequantize_latent_fp8(f, rows + r * row_bytes, 1, ref, kWidth);
        }
        for (int32_t i = 0; i < kWidth; ++i) {
          const uint16_t v = f32_to_bf16(ref[i]);
          if (!fp8) std::memcpy(rows + r * row_bytes + 2 * i, &v, 2);
          ref[i] = bf16_to_f32(v);
        }
      }
    }
  }
  return cache;
}

// Overwrites key k of sequence b (a bf16 pool) with `values` (kWidth of them), in the pool and in
// its fp32 copy (rounded to bf16, as stored).
inline void set_row(Cache& cache, int32_t b, int32_t k, const float* values) {
  const int64_t row_bytes = cuda::latent_row_bytes(cache.element, kDc, kDr);
  const int32_t page = cache.block_table[int64_t{b} * cache.table_stride + k / kBlock];
  uint8_t* row =
      cache.pool.data() +
      ((int64_t{page} * Cache::kNumLayers + Cache::kLayer) * kBlock + k % kBlock) * row_bytes;
  float* ref = cache.c[b].data() + int64_t{k} * kWidth;
  for (int32_t i = 0; i < kWidth; ++i) {
    const uint16_t v = f32_to_bf16(values[i]);
    std::memcpy(row + 2 * i, &v, 2);
    ref[i] = bf16_to_f32(v);
  }
}

}  // namespace mla::test
