// SwiGLU activation on the GPU: out[r, i] = silu(gate_up[r, i]) * gate_up[r, width + i].
// The CPU reference is mla::cpu::silu_mul. Launchers take a stream and never synchronise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda {

struct SiluMulParams {
  const float* gate_up;  // [rows, 2 * width]: the gate half, then the up half of each row
  float* out;            // [rows, width]; must not alias gate_up
  int64_t rows, width;
};

// Takes the 16-byte path when width is a multiple of 4 and both pointers are 16-byte aligned.
void silu_mul_f32(const SiluMulParams& p, cudaStream_t stream);

}  // namespace mla::cuda
