// CUDA latent store (RMSNorm of c, RoPE of k_r, bf16 into the paged pool) against the CPU
// latent construction of DeepseekModel::attention (cpu::rms_norm, cpu::rope_table,
// cpu::rope_rotate), on fresh random kv rows. Several layers, shuffled pages and slots another
// rank stores (-1); every pool element the kernel must not touch keeps its NaN poison. The fp8
// pool's rows are checked against cpu::quantize_latent_fp8 of the reference rows: scales to
// fp32 rounding, e4m3 codes equal or one step apart (the GPU's rsqrtf against the CPU's
// 1 / sqrt may tip a rounding), rotary values as bf16.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/fp8_latent.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/latent_store.h"
#include "kernels/dtype.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

using test::DeviceArray;

struct StoreCase {
  int32_t d_c, d_r, kv_pad, block_size;
  bool interleave;
};

// Compares the fp8 pool `bytes` with the reference rows `want` (fp32, NaN where the kernel must
// not write).
void expect_fp8_rows(const std::vector<uint8_t>& bytes, const std::vector<float>& want, int32_t d_c,
                     int32_t d_r) {
  const cpu::Fp8LatentRow f{.d_c = d_c, .d_r = d_r};
  const int64_t width = d_c + d_r, rows = static_cast<int64_t>(want.size()) / width;
  std::vector<uint8_t> ref(f.bytes());
  int64_t touched = 0, codes = 0, off_by_one = 0, failures = 0;
  std::vector<float> got_rope, want_rope;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* got = bytes.data() + r * f.bytes();
    if (std::isnan(want[r * width])) {
      const bool poison = std::all_of(got, got + f.bytes(), [](uint8_t b) { return b == 0xff; });
      if (!poison && touched++ < 5) ADD_FAILURE() << "row " << r << " written";
      continue;
    }
    cpu::quantize_latent_fp8(f, &want[r * width], 1, width, ref.data());
    for (int64_t g = 0; g < f.groups(); ++g) {
      float a, b;
      std::memcpy(&a, got + f.scales_offset() + 4 * g, 4);
      std::memcpy(&b, ref.data() + f.scales_offset() + 4 * g, 4);
      if (!(std::abs(a - b) <= 1e-5f * b) && failures++ < 5) {
        ADD_FAILURE() << "row " << r << " scale " << g << ": " << a << ", want " << b;
      }
    }
    for (int64_t i = 0; i < d_c; ++i, ++codes) {
      const int diff = std::abs(int{got[i]} - int{ref[i]});
      off_by_one += diff == 1;
      if (diff > 1 && failures++ < 5) {
        ADD_FAILURE() << "row " << r << " code " << i << ": " << int{got[i]} << ", want "
                      << int{ref[i]};
      }
    }
    for (int64_t j = 0; j < d_r; ++j) {
      uint16_t v;
      std::memcpy(&v, got + f.rope_offset() + 2 * j, 2);
      got_rope.push_back(bf16_to_f32(v));
      want_rope.push_back(want[r * width + d_c + j]);
    }
  }
  EXPECT_EQ(touched, 0);
  EXPECT_EQ(failures, 0);
  EXPECT_LE(off_by_one, codes / 100) << off_by_one << " of " << codes << " codes one step off";
  EXPECT_EQ(test::count_bf16_mismatches(got_rope, want_rope, "stored k_rope"), 0);
}

void check_store(cuda::LatentElement element) {
  const bool fp8 = element == cuda::LatentElement::kFp8;
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
    const int64_t pool_bytes =
        int64_t{num_pages} * num_layers * B * cuda::latent_row_bytes(element, c.d_c, c.d_r);
    DeviceArray<uint8_t> d_pool(pool_bytes);  // poison: 0xff everywhere (NaN as bf16 and fp8)
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
      std::vector<float> kv = test::random_normal(T * kv_stride, rng);
      // Some tokens' c all zero: it normalises to zeros, an fp8 group of scale 1.
      for (int64_t t = 0; t < T; t += 17) std::fill_n(&kv[t * kv_stride], c.d_c, 0.0f);

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
      p.element = element;
      p.layer = layer;
      p.num_layers = num_layers;
      p.block_size = B;
      p.d_c = c.d_c;
      p.d_r = c.d_r;
      p.T = T;
      cuda::latent_store(p, nullptr);
      MLA_CUDA_CHECK(cudaDeviceSynchronize());
    }

    if (fp8) {
      expect_fp8_rows(d_pool.download(), want, c.d_c, c.d_r);
      continue;
    }
    // Tolerance: test::bf16_close (one rounding to bf16 of an fp32 value); slots the kernel
    // must not write still hold the 0xFFFF poison.
    std::vector<__nv_bfloat16> bits(pool_numel);
    const std::vector<uint8_t> bytes = d_pool.download();
    std::memcpy(bits.data(), bytes.data(), bytes.size());
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

TEST(CudaLatentStore, MatchesCpuLatentRows) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_store(cuda::LatentElement::kBf16);
}

TEST(CudaLatentStore, Fp8RowsMatchTheCpuQuantisation) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_store(cuda::LatentElement::kFp8);
}

}  // namespace
}  // namespace mla
