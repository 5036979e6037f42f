// The GPU latent cache's row element: bf16 [d_c + d_r], or FlashMLA's packed fp8 row
// (kernels/cpu/fp8_latent.h: d_c e4m3 values, an fp32 scale per 128 of them, d_r bf16 values;
// 656 bytes for d_c 512, d_r 64, against 1,152 in bf16). The store kernel quantises fp8 rows as
// cpu::quantize_latent_fp8 does; the attention kernels dequantise them on read (value * its
// group's scale, rounded to bf16 for the tensor cores); fp8_latent_gather turns pool rows into
// bf16 rows for the decompressed (MHA) form. Launchers take a stream and never synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cpu/fp8_latent.h"

namespace mla::cuda {

enum class LatentElement : int32_t { kBf16, kFp8 };

// Bytes of one pool row of d_c + d_r latent values.
constexpr int64_t latent_row_bytes(LatentElement e, int64_t d_c, int64_t d_r) {
  return e == LatentElement::kFp8 ? cpu::Fp8LatentRow{.d_c = d_c, .d_r = d_r}.bytes()
                                  : 2 * (d_c + d_r);
}

struct Fp8LatentGatherParams {
  const uint8_t* pool;   // [*, row bytes]: packed fp8 rows (d_c a multiple of 4)
  const int32_t* index;  // [rows]: the pool row of each output row (valid)
  __nv_bfloat16* out;    // [rows, out_stride]: the dequantised rows, d_c + d_r values each
  int64_t rows;
  int64_t out_stride;  // elements between output rows, >= d_c + d_r
  int32_t d_c, d_r;
};

// out[i] = bf16(dequantised pool row index[i]), as cpu::dequantize_latent_fp8 then one rounding.
void fp8_latent_gather(const Fp8LatentGatherParams& p, cudaStream_t stream);

}  // namespace mla::cuda
