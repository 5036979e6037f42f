// FP8 latent rows (the cache's `dtype: fp8`), in FlashMLA's layout. One token's latent in one
// layer, c (d_c values) and k_r (d_r values), is stored as
//   [d_c e4m3 bytes][G fp32 scales][d_r bf16 values],   G = ceil(d_c / 128),
// 656 bytes for DeepSeek's d_c 512, d_r 64 (1,152 in bf16, 2,304 in fp32). Group g of c (values
// [128 g, 128 g + 128)) is stored as e4m3(c / s_g) with s_g = amax_g / 448 (1 where the group
// is all zeros) and read back as e4m3 * s_g; k_r, which the rotary product needs exact to more
// bits, stays bf16 (round to nearest even). These are the reference of the CUDA backend's
// quantise-on-store and dequantise-on-read; thread-safe, host memory.
#pragma once

#include <cstdint>

namespace mla::cpu {

struct Fp8LatentRow {
  static constexpr int64_t kGroup = 128;  // latent values per scale
  int64_t d_c = 0;                        // kv_lora_rank
  int64_t d_r = 0;                        // qk_rope_head_dim

  // constexpr: the CUDA kernels that read and write these rows use it too.
  constexpr int64_t groups() const { return (d_c + kGroup - 1) / kGroup; }
  constexpr int64_t scales_offset() const { return d_c; }               // bytes into the row
  constexpr int64_t rope_offset() const { return d_c + 4 * groups(); }  // bytes into the row
  constexpr int64_t bytes() const { return rope_offset() + 2 * d_r; }
};

// out[n, f.bytes()] <- rows [n, d_c + d_r] (row i at rows + i * row_stride floats).
void quantize_latent_fp8(const Fp8LatentRow& f, const float* rows, int64_t n, int64_t row_stride,
                         uint8_t* out);
// out [n, d_c + d_r] (row i at out + i * out_stride floats) <- in[n, f.bytes()].
void dequantize_latent_fp8(const Fp8LatentRow& f, const uint8_t* in, int64_t n, float* out,
                           int64_t out_stride);

}  // namespace mla::cpu
