#include "kernels/cuda/fp8_gemm_lt.h"

#include <cublasLt.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>

#include "kernels/cuda/cuda_check.h"
#include "kernels/error.h"

namespace mla::cuda {
namespace {

// Row-major operands seen column-major, as cuBLAS sees them: the product is D [n, m] = W^T X,
//   A = W: [k, n] with ld k, transposed;  B = X: [k, m] with ld k;  C = D = Y: [n, m] with ld ldy.
// The scale tensors read the same way: the weights' row-major [ceil(n / 128), k / 128] is the
// column-major [k / 128, ceil(n / 128)] of A's 128x128 blocks, the activations' row-major
// [m, k / 128] the column-major [k / 128, m] of B's blocks of 128 along k.
class Plan {
 public:
  explicit Plan(const Fp8GemmParams& p) {
    const cudaDataType_t y_type = p.y_dtype == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF;
    MLA_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t transa = CUBLAS_OP_T, transb = CUBLAS_OP_N;
    const int32_t a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
    const int32_t b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    set(CUBLASLT_MATMUL_DESC_TRANSA, transa);
    set(CUBLASLT_MATMUL_DESC_TRANSB, transb);
    set(CUBLASLT_MATMUL_DESC_A_SCALE_MODE, a_mode);
    set(CUBLASLT_MATMUL_DESC_B_SCALE_MODE, b_mode);
    MLA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&a_, CUDA_R_8F_E4M3, p.k, p.n, p.k));
    MLA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&b_, CUDA_R_8F_E4M3, p.k, p.m, p.k));
    MLA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d_, y_type, p.n, p.m, p.ldy));
  }
  ~Plan() {
    if (d_ != nullptr) cublasLtMatrixLayoutDestroy(d_);
    if (b_ != nullptr) cublasLtMatrixLayoutDestroy(b_);
    if (a_ != nullptr) cublasLtMatrixLayoutDestroy(a_);
    if (desc_ != nullptr) cublasLtMatmulDescDestroy(desc_);
  }
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;

  // The heuristic's first algorithm, or nullopt when it has none for this problem.
  std::optional<cublasLtMatmulAlgo_t> algo(const Blas& blas, const Fp8GemmParams& p,
                                           const float* w_block_scale) {
    set_scales(p, w_block_scale);
    cublasLtMatmulPreference_t pref = nullptr;
    MLA_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const size_t bytes = blas.workspace_bytes();
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &bytes,
                                         sizeof(bytes));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(blas.lt_handle(), desc_, a_, b_, d_,
                                                             d_, pref, 1, &result, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0) return std::nullopt;
    return result.algo;
  }

  void run(const Blas& blas, const Fp8GemmParams& p, const float* w_block_scale,
           const cublasLtMatmulAlgo_t& algo) {
    set_scales(p, w_block_scale);
    const float alpha = 1.0f;
    MLA_CUBLAS_CHECK(cublasLtMatmul(blas.lt_handle(), desc_, &alpha, p.w, a_, p.qx, b_, &p.beta,
                                    p.y, d_, p.y, d_, &algo, blas.workspace(),
                                    blas.workspace_bytes(), blas.stream()));
  }

 private:
  template <typename T>
  void set(cublasLtMatmulDescAttributes_t attribute, const T& value) {
    MLA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_, attribute, &value, sizeof(value)));
  }
  void set_scales(const Fp8GemmParams& p, const float* w_block_scale) {
    set(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, w_block_scale);
    set(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, p.sx);
  }

  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, d_ = nullptr;
};

// What the heuristic said per problem: the descriptors are made once, the algorithm found once.
struct Entry {
  std::unique_ptr<Plan> plan;
  std::optional<cublasLtMatmulAlgo_t> algo;
};
using Key = std::tuple<cublasLtHandle_t, int64_t, int64_t, int64_t, int64_t, DType>;

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

bool fp8_gemm_lt(const Blas& blas, const Fp8GemmParams& p, const float* w_block_scale) {
  // Check shapes
  MLA_REQUIRE(p.m > 0 && p.n > 0 && p.k > 0 && p.ldy >= p.n,
              "fp8_gemm_lt: m {}, n {}, k {}, ldy {} >= n", p.m, p.n, p.k, p.ldy);
  MLA_REQUIRE(p.y_dtype == DType::kF32 || p.y_dtype == DType::kBF16,
              "fp8_gemm_lt: output must be F32 or BF16, not {}", dtype_name(p.y_dtype));
  if (p.k % 128 != 0 || p.n % 16 != 0 || p.ldy % 16 != 0) return false;
  // Check layout
  if (!aligned16(p.qx) || !aligned16(p.w) || !aligned16(p.y)) return false;

  static std::mutex mu;
  static std::map<Key, Entry> entries;
  std::lock_guard lock(mu);
  Entry& e = entries[Key{blas.lt_handle(), p.m, p.n, p.k, p.ldy, p.y_dtype}];
  if (!e.plan) {
    e.plan = std::make_unique<Plan>(p);
    e.algo = e.plan->algo(blas, p, w_block_scale);
  }
  if (!e.algo) return false;
  e.plan->run(blas, p, w_block_scale, *e.algo);
  return true;
}

}  // namespace mla::cuda
