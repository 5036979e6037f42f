// Residual add fused with RMSNorm on the GPU, producing the bf16 activations that feed the
// GEMMs: x += delta (optional, written back), then y = w * (x * rsqrt(mean(x^2) + eps)) in
// fp32, rounded once to bf16. The norm equals mla::cpu::rms_norm. Serves the input and
// post-attention norms (delta = the previous sub-layer's output), the final norm, and the
// q-LoRA norm (no delta, x rows strided). Launchers take a stream and never synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda {

struct AddRmsNormParams {
  float* x;            // [rows, d] (row stride x_stride): the residual; in/out when delta is set
  const float* delta;  // [rows, d] (row stride x_stride) or null: added to x first
  const float* w;      // [d]
  __nv_bfloat16* y;    // [rows, d] (row stride y_stride): normalised, bf16
  float* y32;          // [rows, d] (row stride y_stride) or null: the same values in fp32
  int64_t rows, d;
  int64_t x_stride;  // floats between rows of x and delta, >= d
  int64_t y_stride;  // elements between rows of y and y32, >= d
  float eps;
};

// One block per row. y and y32 must not overlap x or delta, except that y32 may be x itself
// when y_stride == x_stride (the norm then replaces the residual). Takes the 16-byte path when
// d and both strides are multiples of 4 and every pointer is aligned to 4 elements.
void add_rms_norm(const AddRmsNormParams& p, cudaStream_t stream);

}  // namespace mla::cuda
