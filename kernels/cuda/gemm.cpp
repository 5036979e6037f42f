#include "kernels/cuda/gemm.h"

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/skinny_gemm.h"
#include "kernels/error.h"

namespace mla::cuda {
namespace {

// cuBLAS recommends 32 MiB on Hopper; a handle-owned workspace keeps graph capture legal.
constexpr size_t kWorkspaceBytes = size_t{32} << 20;

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kF32:
      return CUDA_R_32F;
    case DType::kF16:
      return CUDA_R_16F;
    default:
      MLA_THROW(kInvalidArgument, "gemm does not take {}", dtype_name(t));
  }
}

// The product in row tiles of kSkinnyMaxRows through skinny_gemm (BlasOptions::batch_invariant).
// A single product's whole tiles go in one launch as a batch of tiles, the rest in another:
// with the thread layout fixed by n and k, a row's sum does not depend on which launch, or how
// many rows, it was in.
void batch_invariant_gemm(const Blas& blas, const GemmParams& p) {
  const bool dependent = blas.options().dependent_launch && p.b_constant;
  auto run = [&](const GemmParams& tile) {
    if (!skinny_gemm_supports(tile)) {
      MLA_THROW(kFailedPrecondition,
                "deterministic: the batch-invariant product kernel does not take {}x{}x{} x{} "
                "(lda {}, ldb {}; k and the leading dimensions must be multiples of 16 bytes)",
                tile.m, tile.n, tile.k, tile.batch, tile.lda, tile.ldb);
    }
    skinny_gemm(tile, blas.stream(), dependent, /*batch_invariant=*/true);
  };
  const int64_t whole = p.m / kSkinnyMaxRows, rest = p.m % kSkinnyMaxRows;
  if (p.batch == 1 && whole > 1 && whole <= 65535) {
    GemmParams tiles = p;
    tiles.m = kSkinnyMaxRows;
    tiles.batch = whole;
    tiles.stride_a = kSkinnyMaxRows * p.lda;
    tiles.stride_b = 0;
    tiles.stride_c = kSkinnyMaxRows * p.ldc;
    run(tiles);
  } else {
    for (int64_t t = 0; t < whole; ++t) {
      GemmParams tile = p;
      tile.m = kSkinnyMaxRows;
      tile.a = static_cast<const char*>(p.a) + t * kSkinnyMaxRows * p.lda * dtype_size(p.ab_type);
      tile.c = static_cast<char*>(p.c) + t * kSkinnyMaxRows * p.ldc * dtype_size(p.c_type);
      run(tile);
    }
  }
  if (rest > 0) {
    GemmParams tail = p;
    tail.m = rest;
    tail.a = static_cast<const char*>(p.a) + whole * kSkinnyMaxRows * p.lda * dtype_size(p.ab_type);
    tail.c = static_cast<char*>(p.c) + whole * kSkinnyMaxRows * p.ldc * dtype_size(p.c_type);
    run(tail);
  }
}

}  // namespace

Blas::Blas(cudaStream_t stream, BlasOptions options) : stream_(stream), options_(options) {
  MLA_CUBLAS_CHECK(cublasCreate(&handle_));
  try {
    MLA_CUBLAS_CHECK(cublasSetStream(handle_, stream));
    MLA_CUBLAS_CHECK(cublasLtCreate(&lt_handle_));
    MLA_CUDA_CHECK(cudaMalloc(&workspace_, kWorkspaceBytes));
    MLA_CUBLAS_CHECK(cublasSetWorkspace(handle_, workspace_, kWorkspaceBytes));
  } catch (...) {
    release();
    throw;
  }
}

Blas::~Blas() { release(); }

void Blas::release() {
  if (handle_ != nullptr) cublasDestroy(handle_);
  if (lt_handle_ != nullptr) cublasLtDestroy(lt_handle_);
  if (workspace_ != nullptr) cudaFree(workspace_);
  handle_ = nullptr;
  lt_handle_ = nullptr;
  workspace_ = nullptr;
}

size_t Blas::workspace_bytes() const { return kWorkspaceBytes; }

namespace {

// Whether gemm() sends p's rows to the small-row kernel (when it supports the shape).
bool small_rows(const BlasOptions& o, const GemmParams& p) {
  return o.small_gemm && !o.batch_invariant && p.m <= kSkinnyPreferredRows;
}

}  // namespace

void gemm(const Blas& blas, const GemmParams& p) {
  // Check shapes
  MLA_REQUIRE(p.m >= 0 && p.n >= 0 && p.k >= 0 && p.batch >= 1, "gemm: bad sizes {}x{}x{} x{}", p.m,
              p.n, p.k, p.batch);
  if (p.m == 0 || p.n == 0) return;
  // Check layout
  MLA_REQUIRE(p.lda >= p.k, "gemm: lda {} < k {}", p.lda, p.k);
  MLA_REQUIRE(p.ldb >= (p.b_nk ? p.k : p.n), "gemm: ldb {} too small", p.ldb);
  MLA_REQUIRE(p.ldc >= p.n, "gemm: ldc {} < n {}", p.ldc, p.n);
  MLA_REQUIRE(p.ab_type == DType::kF32 || p.ab_type == DType::kBF16,
              "gemm: inputs must be F32 or BF16");
  MLA_REQUIRE(p.ab_type == DType::kBF16 || p.c_type == DType::kF32,
              "gemm: fp32 inputs need an fp32 output");
  if (blas.options().batch_invariant) {
    batch_invariant_gemm(blas, p);
    return;
  }
  if (small_rows(blas.options(), p) && skinny_gemm_supports(p)) {
    skinny_gemm(p, blas.stream(), blas.options().dependent_launch && p.b_constant);
    return;
  }
  // Column-major view: C^T [n, m] = op(B)^T [n, k] * A^T [k, m].
  const cublasOperation_t op_b = p.b_nk ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cudaDataType_t ab = cuda_type(p.ab_type), c = cuda_type(p.c_type);
  MLA_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      blas.handle(), op_b, CUBLAS_OP_N, static_cast<int>(p.n), static_cast<int>(p.m),
      static_cast<int>(p.k), &p.alpha, p.b, ab, static_cast<int>(p.ldb), p.stride_b, p.a, ab,
      static_cast<int>(p.lda), p.stride_a, &p.beta, p.c, c, static_cast<int>(p.ldc), p.stride_c,
      static_cast<int>(p.batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void gemm_pair(const Blas& blas, const GemmParams& first, const GemmParams& second) {
  const BlasOptions& o = blas.options();
  if (small_rows(o, first) && small_rows(o, second) && skinny_gemm_pair_supports(first, second)) {
    skinny_gemm_pair(first, second, blas.stream(),
                     o.dependent_launch && first.b_constant && second.b_constant);
    return;
  }
  gemm(blas, first);
  gemm(blas, second);
}

GemmParams linear_params(const void* x, int64_t rows, int64_t in, const void* w, int64_t out,
                         void* y, DType y_type, float beta) {
  GemmParams p{x, w, y, rows, out, in, in, in, out};
  p.c_type = y_type;
  p.beta = beta;
  p.b_constant = true;
  return p;
}

void linear(const Blas& blas, const void* x, int64_t rows, int64_t in, const void* w, int64_t out,
            void* y, DType y_type, float beta) {
  gemm(blas, linear_params(x, rows, in, w, out, y, y_type, beta));
}

}  // namespace mla::cuda
