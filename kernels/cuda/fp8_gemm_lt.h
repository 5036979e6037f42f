// Prefill-sized products with kept fp8 weights through cuBLASLt's block-scaled fp8 GEMM (Hopper:
// the weights' 128x128 block scales, CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, and the
// activations' scale per row and 128 columns, VEC128_32F): tensor cores, each weight tile read
// once per output tile, where cuda::fp8_gemm streams the weights once per 16 rows. The same
// numerics as kernels/cpu/fp8_gemm.h (the reference) up to the order of the fp32 sums; unlike
// fp8_gemm a row's result may depend on how many rows come with it, so the deterministic option
// keeps to fp8_gemm. Enqueues on blas.stream() and never synchronises.
#pragma once

#include <cstdint>

#include "kernels/cuda/fp8_gemm.h"
#include "kernels/cuda/gemm.h"

namespace mla::cuda {

// Enqueues p.y <- the product of fp8_gemm's parameters (p.w_scale is not read: the weights'
// scales come as w_block_scale [ceil(n / 128), k / 128], a 128x128 block's scale) and returns
// true; returns false, enqueuing nothing, when cuBLASLt
// has no algorithm for this shape and these types on the current device (the answer is kept
// per shape), or when k is not a multiple of 128, n not a multiple of 16, or a pointer not
// 16-byte aligned: the caller then runs fp8_gemm. Throws kInternal when cuBLASLt fails a call.
bool fp8_gemm_lt(const Blas& blas, const Fp8GemmParams& p, const float* w_block_scale);

}  // namespace mla::cuda
