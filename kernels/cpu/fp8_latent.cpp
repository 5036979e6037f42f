#include "kernels/cpu/fp8_latent.h"

#include <algorithm>
#include <cstring>

#include "kernels/cpu/fp8_group.h"
#include "kernels/dtype.h"

namespace mla::cpu {

void quantize_latent_fp8(const Fp8LatentRow& f, const float* rows, int64_t n, int64_t row_stride,
                         uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float* x = rows + i * row_stride;
    uint8_t* row = out + i * f.bytes();
    for (int64_t g = 0; g < f.groups(); ++g) {
      const int64_t begin = g * Fp8LatentRow::kGroup;
      const int64_t end = std::min(f.d_c, begin + Fp8LatentRow::kGroup);
      const float scale = quantize_group_fp8(x + begin, end - begin, row + begin);
      std::memcpy(row + f.scales_offset() + 4 * g, &scale, sizeof(float));
    }
    for (int64_t j = 0; j < f.d_r; ++j) {
      const uint16_t v = f32_to_bf16(x[f.d_c + j]);
      std::memcpy(row + f.rope_offset() + 2 * j, &v, sizeof(v));
    }
  }
}

void dequantize_latent_fp8(const Fp8LatentRow& f, const uint8_t* in, int64_t n, float* out,
                           int64_t out_stride) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* row = in + i * f.bytes();
    float* y = out + i * out_stride;
    for (int64_t g = 0; g < f.groups(); ++g) {
      float scale;
      std::memcpy(&scale, row + f.scales_offset() + 4 * g, sizeof(float));
      const int64_t end = std::min(f.d_c, (g + 1) * Fp8LatentRow::kGroup);
      for (int64_t j = g * Fp8LatentRow::kGroup; j < end; ++j)
        y[j] = fp8e4m3_to_f32(row[j]) * scale;
    }
    for (int64_t j = 0; j < f.d_r; ++j) {
      uint16_t v;
      std::memcpy(&v, row + f.rope_offset() + 2 * j, sizeof(v));
      y[f.d_c + j] = bf16_to_f32(v);
    }
  }
}

}  // namespace mla::cpu
