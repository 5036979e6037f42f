// Matrix products through cuBLAS for the CUDA backend, row-major like the rest of mlaserve:
//   C[m, n] = alpha * A[m, k] * op(B) + beta * C,   op(B) = B^T for B stored [n, k] (weights
// are [out, in]) or B for B stored [k, n]; optionally batched with element strides.
// Inputs bf16 (or fp32 for the router), fp32 accumulation, output fp32 or bf16.
// The CPU reference is mla::cpu::gemm.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/error.h"

// Throws kInternal naming the call and cuBLAS's message when a cuBLAS call fails.
#define MLA_CUBLAS_CHECK(expr)                                                \
  do {                                                                        \
    cublasStatus_t mla_st_ = (expr);                                          \
    if (mla_st_ != CUBLAS_STATUS_SUCCESS) {                                   \
      MLA_THROW(kInternal, "{}:{}: {} failed: {}", __FILE__, __LINE__, #expr, \
                cublasGetStatusString(mla_st_));                              \
    }                                                                         \
  } while (0)

namespace mla::cuda {

// How gemm() runs products with few rows (decode at small batch).
struct BlasOptions {
  // Products skinny_gemm supports with at most kSkinnyPreferredRows rows go through it rather
  // than cuBLAS. Default: true.
  bool small_gemm = true;
  // Those of them whose B is constant (GemmParams::b_constant: weights) launch as programmatic
  // dependents of the previous kernel, loading weights while it finishes. Default: true.
  bool dependent_launch = true;
  // Every row of every product comes out the same whatever the number of rows (the model's
  // deterministic option): all products go through skinny_gemm, whose per-row reduction
  // order does not depend on m, in tiles of kSkinnyMaxRows rows with its thread layout fixed by
  // n and k alone. Weights are read once per tile (prefill pays for it), and a product
  // skinny_gemm does not support throws kFailedPrecondition naming it. Default: false.
  bool batch_invariant = false;
};

// A cuBLAS handle (and a cuBLASLt one, for fp8_gemm_lt.h) bound to one stream, with its own
// workspace so products can be captured in CUDA graphs. Not thread-safe: one stream, one thread.
class Blas {
 public:
  explicit Blas(cudaStream_t stream, BlasOptions options = {});
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;

  cublasHandle_t handle() const { return handle_; }
  cublasLtHandle_t lt_handle() const { return lt_handle_; }
  cudaStream_t stream() const { return stream_; }
  // The workspace both handles use (their calls are ordered on the one stream).
  void* workspace() const { return workspace_; }
  size_t workspace_bytes() const;
  const BlasOptions& options() const { return options_; }
  void set_options(const BlasOptions& options) { options_ = options; }

 private:
  void release();

  cublasHandle_t handle_ = nullptr;
  cublasLtHandle_t lt_handle_ = nullptr;
  cudaStream_t stream_;
  void* workspace_ = nullptr;
  BlasOptions options_;
};

struct GemmParams {
  const void* a;  // [m, k] with row stride lda (elements)
  const void* b;  // [n, k] with row stride ldb if b_nk, else [k, n]
  void* c;        // [m, n] with row stride ldc
  int64_t m, n, k;
  int64_t lda, ldb, ldc;
  bool b_nk = true;              // B stored [n, k]: a weight [out, in]
  DType ab_type = DType::kBF16;  // A and B: kBF16 or kF32
  DType c_type = DType::kF32;    // kF32 or kBF16
  float alpha = 1.0f, beta = 0.0f;
  int64_t batch = 1;                                 // products with the strides below
  int64_t stride_a = 0, stride_b = 0, stride_c = 0;  // elements between batch members
  // B is not written by any kernel still in flight on the stream (a weight): the small-row
  // path may start reading it before the previous kernel ends (BlasOptions).
  bool b_constant = false;
};

// Enqueues the product on blas.stream(). Throws kInvalidArgument for bad shapes or strides.
void gemm(const Blas& blas, const GemmParams& p);

// gemm(first) and gemm(second), as one small-row launch (skinny_gemm_pair) when both have at
// most kSkinnyPreferredRows rows, BlasOptions::small_gemm holds and batch_invariant does not,
// and they qualify as a pair (same A; see skinny_gemm_pair_supports).
void gemm_pair(const Blas& blas, const GemmParams& first, const GemmParams& second);

// The GemmParams of y[rows, out] = x[rows, in] * w[out, in]^T (+ beta * y), w a constant
// weight: the common weight product, as linear() runs it.
GemmParams linear_params(const void* x, int64_t rows, int64_t in, const void* w, int64_t out,
                         void* y, DType y_type, float beta = 0.0f);

// gemm(linear_params(...)).
void linear(const Blas& blas, const void* x, int64_t rows, int64_t in, const void* w, int64_t out,
            void* y, DType y_type, float beta = 0.0f);

}  // namespace mla::cuda
