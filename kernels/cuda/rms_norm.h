// RMSNorm on the GPU: y[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w, fp32 accumulation.
// The CPU reference is mla::cpu::rms_norm. Launchers take a stream and never synchronise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda {

struct RmsNormParams {
  const float* x;  // [rows, d]
  const float* w;  // [d]
  float* y;        // [rows, d]; may alias x
  int64_t rows, d;
  float eps;
};

void rms_norm_f32(const RmsNormParams& p, cudaStream_t stream);

}  // namespace mla::cuda
