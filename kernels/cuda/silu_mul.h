// SwiGLU activation on the GPU: out[r, i] = silu(gate_up[r, i]) * gate_up[r, width + i],
// computed in fp32 whatever the storage types. The CPU reference is mla::cpu::silu_mul.
// Launchers take a stream and never synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda {

// fp32 gate/up (a GEMM's fp32 output), bf16 result for the down projection.
struct SiluMulBf16Params {
  const float* gate_up;  // [rows, 2 * width]: the gate half, then the up half of each row
  __nv_bfloat16* out;    // [rows, width]; must not alias gate_up
  int64_t rows, width;
};

// Takes the 16-byte load path when width is a multiple of 4 and both pointers are aligned to 4
// elements.
void silu_mul_bf16(const SiluMulBf16Params& p, cudaStream_t stream);

}  // namespace mla::cuda
