// CUDA bf16 rotary embedding against cpu::rope_table + cpu::rope_rotate on the bf16 values, on
// fresh random inputs: in place on the rotary tail of [T, H, d_n + d_r] queries, and out of
// place from there into the rotary slot of the absorbed-query buffer [T, H, d_c + d_r].
// Everything outside the rotated vectors must come back bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/rope_bf16.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

using test::DeviceArray;

struct RopeCase {
  int64_t tokens, heads, d_n, d_r;
};

// Launches with src vectors at offset d_n of [T, H, d_n + d_r] rows and dst vectors at offset
// dst_offset of [T, H, dst_width] rows.
void run(const RopeCase& c, const __nv_bfloat16* src, __nv_bfloat16* dst, int64_t dst_width,
         int64_t dst_offset, const int32_t* positions, const float* inv_freq, bool interleave) {
  const int64_t src_width = c.d_n + c.d_r;
  cuda::RopeBf16Params p{};
  p.src = src + c.d_n;
  p.dst = dst + dst_offset;
  p.positions = positions;
  p.inv_freq = inv_freq;
  p.tokens = c.tokens;
  p.heads = c.heads;
  p.d = c.d_r;
  p.src_token_stride = c.heads * src_width;
  p.src_head_stride = src_width;
  p.dst_token_stride = c.heads * dst_width;
  p.dst_head_stride = dst_width;
  p.attention_factor = 1.2f;
  p.interleave = interleave;
  cuda::rope_bf16(p, nullptr);
}

TEST(CudaRopeBf16, MatchesCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(1122);
  const RopeCase cases[] = {
      {1, 128, 128, 64},  // DeepSeek-V3 decode: 128 heads, 192-dim queries
      {3, 16, 128, 64},   // 16 local heads (DeepSeek-V3 under TP8)
      {257, 5, 32, 64},   // a prefill chunk
      {3, 1, 6, 2},       // smallest rotary dim
      {3, 2, 0, 128},     // rotary part alone
  };
  const int64_t d_c = 512;  // absorbed-query rows: [d_c latent ; d_r rotary]
  for (const RopeCase& c : cases) {
    for (bool interleave : {false, true}) {
      SCOPED_TRACE("tokens " + std::to_string(c.tokens) + ", heads " + std::to_string(c.heads) +
                   ", d_r " + std::to_string(c.d_r) + ", interleave " + std::to_string(interleave));
      const int64_t width = c.d_n + c.d_r, vectors = c.tokens * c.heads;
      const std::vector<float> q = test::random_normal(vectors * width, rng);
      const std::vector<__nv_bfloat16> q_bits = test::to_bf16(q);
      const std::vector<float> inv_freq = test::rope_inv_freq(c.d_r);
      // Positions up to DeepSeek-V3's 163840-token context exercise large angles.
      std::uniform_int_distribution<int32_t> pick(0, 163839);
      std::vector<int32_t> positions(c.tokens);
      for (auto& pos : positions) pos = pick(rng);
      positions[0] = 0;

      // Reference on the bf16 values the kernel reads: [vectors, d_r].
      std::vector<float> want(vectors * c.d_r), cos_sin(c.d_r);
      const std::vector<float> q_in = test::to_float(q_bits);
      for (int64_t v = 0; v < vectors; ++v) {
        std::copy_n(&q_in[v * width + c.d_n], c.d_r, &want[v * c.d_r]);
        cpu::rope_table(positions[v / c.heads], inv_freq.data(), c.d_r, 1.2f, cos_sin.data());
        cpu::rope_rotate(&want[v * c.d_r], c.d_r, cos_sin.data(), interleave);
      }

      DeviceArray<__nv_bfloat16> d_q(q_bits), d_abs(vectors * (d_c + c.d_r));  // abs: NaN
      DeviceArray<float> d_freq(inv_freq);
      DeviceArray<int32_t> d_pos(positions);
      // Out of place first (q still unrotated), then in place.
      run(c, d_q.get(), d_abs.get(), d_c + c.d_r, d_c, d_pos.get(), d_freq.get(), interleave);
      const std::vector<__nv_bfloat16> q_after_copy = d_q.download();
      run(c, d_q.get(), d_q.get(), width, c.d_n, d_pos.get(), d_freq.get(), interleave);
      const std::vector<__nv_bfloat16> abs_bits = d_abs.download(), q_got = d_q.download();

      ASSERT_EQ(std::memcmp(q_after_copy.data(), q_bits.data(), q_bits.size() * 2), 0)
          << "out-of-place rope changed its source";
      std::vector<float> got_in_place, got_copy;
      for (int64_t v = 0; v < vectors; ++v) {
        for (int64_t i = 0; i < c.d_n; ++i) {
          ASSERT_EQ(std::memcmp(&q_got[v * width + i], &q_bits[v * width + i], 2), 0)
              << "d_n part changed, vector " << v;
        }
        for (int64_t i = 0; i < d_c; ++i) {
          ASSERT_TRUE(test::is_bf16_poison(abs_bits[v * (d_c + c.d_r) + i]))
              << "latent part of the absorbed query written, vector " << v;
        }
        for (int64_t i = 0; i < c.d_r; ++i) {
          got_in_place.push_back(__bfloat162float(q_got[v * width + c.d_n + i]));
          got_copy.push_back(__bfloat162float(abs_bits[v * (d_c + c.d_r) + d_c + i]));
        }
      }
      // Tolerance: test::bf16_close; fp32 math, one rounding to bf16.
      EXPECT_EQ(test::count_bf16_mismatches(got_in_place, want, "in place"), 0);
      EXPECT_EQ(test::count_bf16_mismatches(got_copy, want, "out of place"), 0);
    }
  }
}

}  // namespace
}  // namespace mla
