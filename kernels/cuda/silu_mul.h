// SwiGLU activation on the GPU: out[r, i] = silu(gate_up[r, i]) * gate_up[r, width + i],
// computed in fp32 whatever the storage types. The CPU reference is mla::cpu::silu_mul.
// Launchers take a stream and never synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda {

struct SiluMulParams {
  const float* gate_up;  // [rows, 2 * width]: the gate half, then the up half of each row
  float* out;            // [rows, width]; must not alias gate_up
  int64_t rows, width;
};

// fp32 gate/up (a GEMM's fp32 output), bf16 result for the down projection.
struct SiluMulBf16Params {
  const float* gate_up;  // [rows, 2 * width]: the gate half, then the up half of each row
  __nv_bfloat16* out;    // [rows, width]; must not alias gate_up
  int64_t rows, width;
};

// bf16 gate/up (a GEMM's bf16 output), bf16 result.
struct SiluMulBf16InParams {
  const __nv_bfloat16* gate_up;  // [rows, 2 * width]: the gate half, then the up half
  __nv_bfloat16* out;            // [rows, width]; must not alias gate_up
  int64_t rows, width;
};

// Each takes the 16-byte load path when width is a multiple of 16 bytes' worth of input
// elements (4 fp32, 8 bf16) and both pointers are aligned to that many elements.
void silu_mul_f32(const SiluMulParams& p, cudaStream_t stream);
void silu_mul_bf16(const SiluMulBf16Params& p, cudaStream_t stream);
void silu_mul_bf16_in(const SiluMulBf16InParams& p, cudaStream_t stream);

}  // namespace mla::cuda
