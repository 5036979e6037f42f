// CUDA matrix products against the CPU reference (mla::cpu::gemm), on fresh random inputs
// with poisoned outputs: the small-row kernel (skinny_gemm) and cuBLAS through gemm() on the
// shapes the decode step runs (DeepSeek-V2-Lite and V3 projections, per-head W_UK^T and W_UV,
// the fp32 router) and on odd ones; programmatic dependent launches directly, in a CUDA graph,
// and after a kernel that writes A; two products of one A in one launch (skinny_gemm_pair).
#include <cuda_bf16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/silu_mul.h"
#include "kernels/cuda/skinny_gemm.h"
#include "kernels/error.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

using test::DeviceArray;

struct Case {
  std::string name;
  int64_t m, n, k;
  bool b_nk = true;
  int64_t batch = 1;
  DType ab = DType::kBF16, c = DType::kF32;
  float beta = 0.0f;
  // Leading dimensions and batch strides; 0 means packed.
  int64_t lda = 0, ldb = 0, ldc = 0, stride_a = 0, stride_b = 0, stride_c = 0;
};

// Fills in packed leading dimensions and strides.
Case packed(Case c) {
  if (c.lda == 0) c.lda = c.k;
  if (c.ldb == 0) c.ldb = c.b_nk ? c.k : c.n;
  if (c.ldc == 0) c.ldc = c.n;
  if (c.batch > 1) {
    if (c.stride_a == 0) c.stride_a = c.m * c.lda;
    if (c.stride_b == 0) c.stride_b = (c.b_nk ? c.n : c.k) * c.ldb;
    if (c.stride_c == 0) c.stride_c = c.m * c.ldc;
  }
  return c;
}

std::vector<Case> cases() {
  std::vector<Case> out;
  for (int64_t m : {1, 2, 3, 5, 8}) {
    const std::string s = "m" + std::to_string(m);
    // DeepSeek-V2-Lite: kv_a (2048 -> 576), q_proj (-> 16 x 192, bf16 out), o_proj, the
    // shared experts' down (2816 -> 2048, accumulating into C), and the fp32 router.
    out.push_back({s + " kv_a", m, 576, 2048});
    out.push_back({s + " q_proj", m, 3072, 2048, true, 1, DType::kBF16, DType::kBF16});
    out.push_back({s + " o_proj", m, 2048, 2048});
    out.push_back({s + " shared_down", m, 2048, 2816, true, 1, DType::kBF16, DType::kF32, 1.0f});
    out.push_back({s + " router", m, 64, 2048, true, 1, DType::kF32, DType::kF32});
    // Per head, as the model lays them out in kv_b and the [T, H, ...] activations:
    // W_UV[h] o~ (B [128, 512] rows of kv_b) and W_UK[h]^T q_nope (B [128, 512] read [k, n]).
    Case uv{s + " w_uv x16", m, 128, 512, true, 16, DType::kBF16, DType::kBF16};
    uv.lda = 16 * 512, uv.stride_a = 512, uv.ldb = 512, uv.stride_b = 256 * 512;
    uv.ldc = 16 * 128, uv.stride_c = 128;
    out.push_back(uv);
    Case uk{s + " w_uk^T x16", m, 512, 128, false, 16, DType::kBF16, DType::kBF16};
    uk.lda = 16 * 192, uk.stride_a = 192, uk.ldb = 512, uk.stride_b = 256 * 512;
    uk.ldc = 16 * 576, uk.stride_c = 576;
    out.push_back(uk);
    // Odd sizes: rows that do not fill a thread group, k of one 16-byte chunk, n not a multiple
    // of the block's columns, fp32 [k, n].
    out.push_back({s + " odd_nk", m, 37, 40});
    out.push_back({s + " narrow_k", m, 1000, 8, true, 1, DType::kBF16, DType::kBF16});
    out.push_back({s + " odd_kn", m, 136, 77, false, 3, DType::kBF16, DType::kF32, 0.5f});
    out.push_back({s + " f32_kn", m, 20, 300, false, 1, DType::kF32, DType::kF32});
  }
  out.push_back({"m4 wide_n", 4, 102400, 64});
  return out;
}

struct Data {
  Case c;
  std::vector<float> a, b, c0;  // inputs as the device holds them (bf16-rounded where bf16)
  std::vector<float> want, bound;
};

int64_t span(int64_t batch, int64_t stride, int64_t rows, int64_t ld, int64_t cols) {
  return (batch - 1) * stride + (rows - 1) * ld + cols;
}

// want = A op(B) + beta C0; bound = |A| op(|B|) + |beta C0|: the scale of the rounding.
void reference(Data& d) {
  const Case& c = d.c;
  d.want = d.c0;
  d.bound = d.c0;
  std::vector<float> abs_a(d.a.size()), abs_b(d.b.size());
  for (size_t i = 0; i < d.a.size(); ++i) abs_a[i] = std::abs(d.a[i]);
  for (size_t i = 0; i < d.b.size(); ++i) abs_b[i] = std::abs(d.b[i]);
  for (float& v : d.bound) v = std::abs(v);
  for (int64_t z = 0; z < c.batch; ++z) {
    cpu::gemm(c.b_nk, c.m, c.n, c.k, d.a.data() + z * c.stride_a, c.lda,
              d.b.data() + z * c.stride_b, c.ldb, d.want.data() + z * c.stride_c, c.ldc, c.beta);
    cpu::gemm(c.b_nk, c.m, c.n, c.k, abs_a.data() + z * c.stride_a, c.lda,
              abs_b.data() + z * c.stride_b, c.ldb, d.bound.data() + z * c.stride_c, c.ldc,
              std::abs(c.beta));
  }
}

Data make_data(const Case& c, std::mt19937& rng) {
  Data d;
  d.c = c;
  auto rounded = [&](std::vector<float> v) {
    return c.ab == DType::kBF16 ? test::bf16_rounded(v) : v;
  };
  d.a = rounded(test::random_normal(span(c.batch, c.stride_a, c.m, c.lda, c.k), rng));
  d.b = rounded(test::random_normal(
      span(c.batch, c.stride_b, c.b_nk ? c.n : c.k, c.ldb, c.b_nk ? c.k : c.n), rng));
  d.c0 = test::random_normal(span(c.batch, c.stride_c, c.m, c.ldc, c.n), rng);
  if (c.c == DType::kBF16) d.c0 = test::bf16_rounded(d.c0);
  reference(d);
  return d;
}

// Device copies of a Data's inputs; C starts as C0 when beta != 0, else poisoned.
struct DeviceData {
  DeviceArray<__nv_bfloat16> a16, b16, c16;
  DeviceArray<float> a32, b32, c32;
  explicit DeviceData(const Data& d)
      : a16(test::to_bf16(d.a)),
        b16(test::to_bf16(d.b)),
        c16(static_cast<int64_t>(d.c0.size())),
        a32(d.a),
        b32(d.b),
        c32(static_cast<int64_t>(d.c0.size())) {
    if (d.c.beta != 0.0f) {
      c16.upload(test::to_bf16(d.c0));
      c32.upload(d.c0);
    }
  }
  cuda::GemmParams params(const Case& c) const {
    const bool bf16 = c.ab == DType::kBF16;
    cuda::GemmParams p{};
    p.a = bf16 ? static_cast<const void*>(a16.get()) : a32.get();
    p.b = bf16 ? static_cast<const void*>(b16.get()) : b32.get();
    p.c = c.c == DType::kBF16 ? static_cast<void*>(c16.get()) : c32.get();
    p.m = c.m, p.n = c.n, p.k = c.k, p.lda = c.lda, p.ldb = c.ldb, p.ldc = c.ldc;
    p.b_nk = c.b_nk;
    p.ab_type = c.ab;
    p.c_type = c.c;
    p.beta = c.beta;
    p.batch = c.batch;
    p.stride_a = c.stride_a, p.stride_b = c.stride_b, p.stride_c = c.stride_c;
    p.b_constant = true;
    return p;
  }
  std::vector<float> result(const Case& c) const {
    return c.c == DType::kBF16 ? test::to_float(c16.download()) : c32.download();
  }
};

// Every output element of C (inside its batch's [m, n]) against the reference: fp32 results
// within reassociation error of the fp32 reference (relative to |A| op(|B|)), bf16 results one
// bf16 rounding away. With beta 0, C started poisoned (NaN), and every element that is not an
// output (the gaps of ldc > n, the rows between batch members) must still be NaN: no stray
// writes.
void expect_matches(const Data& d, const std::vector<float>& got, const std::string& what) {
  const Case& c = d.c;
  std::vector<bool> output(got.size(), false);
  int64_t bad = 0;
  for (int64_t z = 0; z < c.batch; ++z) {
    for (int64_t i = 0; i < c.m; ++i) {
      for (int64_t j = 0; j < c.n; ++j) {
        const int64_t at = z * c.stride_c + i * c.ldc + j;
        output[at] = true;
        const float want = d.want[at];
        const float tol = (c.c == DType::kBF16 ? test::kBf16Rel * std::abs(want) : 0.0f) +
                          2e-6f * std::sqrt(static_cast<float>(c.k)) * d.bound[at] + 1e-6f;
        if (!(std::abs(got[at] - want) <= tol) && bad++ < 5) {
          ADD_FAILURE() << what << ": C[" << z << ", " << i << ", " << j << "] = " << got[at]
                        << ", want " << want << " (tolerance " << tol << ")";
        }
      }
    }
  }
  EXPECT_EQ(bad, 0) << what;
  if (c.beta != 0.0f) return;
  int64_t stray = 0;
  for (size_t at = 0; at < got.size(); ++at) {
    if (!output[at] && !std::isnan(got[at]) && stray++ < 5) {
      ADD_FAILURE() << what << ": element " << at << " of C is not an output but was written";
    }
  }
  EXPECT_EQ(stray, 0) << what;
}

TEST(CudaGemm, SkinnyMatchesCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(2024);
  for (const Case& raw : cases()) {
    const Case c = packed(raw);
    const Data d = make_data(c, rng);
    DeviceData dev(d);
    const cuda::GemmParams p = dev.params(c);
    ASSERT_TRUE(cuda::skinny_gemm_supports(p)) << c.name;
    cuda::skinny_gemm(p, nullptr);
    expect_matches(d, dev.result(c), c.name + " (skinny)");
  }
}

TEST(CudaGemm, CublasMatchesCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(2025);
  cudaStream_t stream;
  MLA_CUDA_CHECK(cudaStreamCreate(&stream));
  {
    cuda::Blas blas(stream, {.small_gemm = false});
    for (const Case& raw : cases()) {
      const Case c = packed(raw);
      const Data d = make_data(c, rng);
      DeviceData dev(d);
      cuda::gemm(blas, dev.params(c));
      expect_matches(d, dev.result(c), c.name + " (cuBLAS)");
    }
  }
  MLA_CUDA_CHECK(cudaStreamDestroy(stream));
}

// BlasOptions::batch_invariant (the deterministic option): each row of a product comes out
// bit for bit as it does when that row is the product's only one, for row counts that are
// whole tiles of 8, tiles and a rest, and less than a tile (single products: tiles batched
// into one launch; per-head batched products: tile by tile), and within the reference's
// tolerance.
TEST(CudaGemm, BatchInvariantRowsDoNotDependOnTheRowCount) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(2026);
  cudaStream_t stream;
  MLA_CUDA_CHECK(cudaStreamCreate(&stream));
  {
    cuda::Blas blas(stream, {.batch_invariant = true});
    for (const int64_t m : {64, 37, 3}) {
      for (const Case& raw : cases()) {
        if (raw.m != 1) continue;
        Case c = raw;
        c.m = m;
        c.name = "m" + std::to_string(m) + raw.name.substr(2);
        c = packed(c);
        const Data d = make_data(c, rng);
        DeviceData dev(d);
        cuda::gemm(blas, dev.params(c));
        const std::vector<float> all = dev.result(c);
        expect_matches(d, all, c.name + " (batch-invariant)");
        const size_t a_size = dtype_size(c.ab), c_size = dtype_size(c.c);
        for (const int64_t i : {int64_t{0}, int64_t{7}, int64_t{8}, m - 1}) {
          if (i >= m) continue;
          DeviceData alone(d);  // C as it started
          cuda::GemmParams one = alone.params(c);
          one.m = 1;
          one.a = static_cast<const char*>(one.a) + i * c.lda * a_size;
          one.c = static_cast<char*>(one.c) + i * c.ldc * c_size;
          cuda::gemm(blas, one);
          const std::vector<float> row = alone.result(c);
          for (int64_t z = 0; z < c.batch; ++z) {
            const int64_t at = z * c.stride_c + i * c.ldc;
            ASSERT_EQ(0, std::memcmp(&row[at], &all[at], c.n * sizeof(float)))
                << c.name << ": row " << i << " of product " << z << " differs from the row alone";
          }
        }
      }
    }
  }
  MLA_CUDA_CHECK(cudaStreamDestroy(stream));
}

// Dependent launches through gemm() (the model's path): straight after a kernel that writes
// A, and captured in a graph. A missing wait would read A's poison.
TEST(CudaGemm, DependentLaunchWaitsForThePreviousKernel) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(2026);
  for (int64_t m : {1, 2}) {
    for (bool b_nk : {true, false}) {
      // A = silu(gate) * up, written by silu_mul on the same stream just before the product.
      const int64_t k = 2048, n = 1024;
      const std::vector<float> gate_up = test::random_normal(m * 2 * k, rng);
      DeviceArray<float> d_gate_up(gate_up);
      const Case c = packed({"m" + std::to_string(m) + (b_nk ? " nk" : " kn"), m, n, k, b_nk});
      Data d = make_data(c, rng);
      for (bool graph : {false, true}) {
        DeviceData dev(d);
        dev.a16.poison();
        const cuda::GemmParams p = dev.params(c);
        cudaStream_t stream;
        MLA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        {
          cuda::Blas blas(stream, {.small_gemm = true, .dependent_launch = true});
          auto launch = [&] {
            cuda::silu_mul_bf16({d_gate_up.get(), dev.a16.get(), m, k}, stream);
            cuda::gemm(blas, p);
          };
          if (graph) {
            test::run_in_graph_on(stream, launch);
          } else {
            launch();
          }
          MLA_CUDA_CHECK(cudaStreamSynchronize(stream));
        }
        MLA_CUDA_CHECK(cudaStreamDestroy(stream));
        // The reference takes A as silu_mul left it.
        Data ref = d;
        ref.a = test::to_float(dev.a16.download());
        for (float v : ref.a) ASSERT_FALSE(std::isnan(v)) << "silu_mul did not write A";
        reference(ref);
        expect_matches(ref, dev.result(c), c.name + (graph ? " in a graph" : " on a stream"));
      }
    }
  }
}

TEST(CudaGemm, UnsupportedProductsFallBackToCublas) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(2027);
  // k not a whole number of 16-byte chunks, a row stride off the 16-byte grid, and m too large.
  std::vector<Case> odd = {
      {"k 36 (not whole chunks)", 2, 64, 36}, {"m 9", 9, 64, 64}, {"kn n 20", 3, 20, 64, false}};
  Case lda{"lda 68", 2, 64, 64};
  lda.lda = 68;
  odd.push_back(lda);
  cudaStream_t stream;
  MLA_CUDA_CHECK(cudaStreamCreate(&stream));
  {
    cuda::Blas blas(stream);
    for (const Case& raw : odd) {
      const Case c = packed(raw);
      const Data d = make_data(c, rng);
      DeviceData dev(d);
      const cuda::GemmParams p = dev.params(c);
      EXPECT_FALSE(cuda::skinny_gemm_supports(p)) << c.name;
      EXPECT_THROW(cuda::skinny_gemm(p, stream), Error) << c.name;
      cuda::gemm(blas, p);
      expect_matches(d, dev.result(c), c.name + " (fallback)");
    }
  }
  MLA_CUDA_CHECK(cudaStreamDestroy(stream));
}

// Two products of the same A in one launch, each against the CPU reference: the decode step's
// pairs (V2-Lite's kv_a with q_proj, V3's q_a with kv_a), two bf16 outputs with odd n, and an
// fp32 output first (the launcher puts it second); directly, and through gemm_pair in a graph
// (one dependent launch at 1 and 2 rows; two cuBLAS products at 5 and 8, gemm()'s choice).
TEST(CudaGemm, PairOfProductsMatchesCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(2028);
  struct PairCase {
    std::string name;
    int64_t k, n0, n1;
    DType c0, c1;
  };
  const std::vector<PairCase> pairs = {
      {"v2-lite kv_a + q_proj", 2048, 576, 3072, DType::kF32, DType::kBF16},
      {"v3 q_a + kv_a", 7168, 1536, 576, DType::kF32, DType::kF32},
      {"bf16 + bf16, odd n", 64, 37, 101, DType::kBF16, DType::kBF16},
      {"bf16 + fp32", 256, 24, 40, DType::kBF16, DType::kF32},
  };
  cudaStream_t stream;
  MLA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (const PairCase& pc : pairs) {
    for (int64_t m : {1, 2, 5, 8}) {
      const std::string name = pc.name + " m" + std::to_string(m);
      const Case c0 = packed({name + " first", m, pc.n0, pc.k, true, 1, DType::kBF16, pc.c0});
      const Case c1 = packed({name + " second", m, pc.n1, pc.k, true, 1, DType::kBF16, pc.c1});
      const Data d0 = make_data(c0, rng);
      Data d1 = make_data(c1, rng);
      d1.a = d0.a;  // one A
      reference(d1);
      for (bool through_gemm : {false, true}) {
        DeviceData dev0(d0), dev1(d1);
        const cuda::GemmParams p0 = dev0.params(c0);
        cuda::GemmParams p1 = dev1.params(c1);
        EXPECT_FALSE(cuda::skinny_gemm_pair_supports(p0, p1)) << name << ": two A pointers";
        p1.a = p0.a;
        ASSERT_TRUE(cuda::skinny_gemm_pair_supports(p0, p1)) << name;
        if (through_gemm) {
          cuda::Blas blas(stream, {.small_gemm = true, .dependent_launch = true});
          test::run_in_graph_on(stream, [&] { cuda::gemm_pair(blas, p0, p1); });
        } else {
          cuda::skinny_gemm_pair(p0, p1, stream);
        }
        MLA_CUDA_CHECK(cudaStreamSynchronize(stream));
        const std::string how = through_gemm ? " (gemm_pair, graph)" : " (skinny_gemm_pair)";
        expect_matches(d0, dev0.result(c0), c0.name + how);
        expect_matches(d1, dev1.result(c1), c1.name + how);
      }
    }
  }
  MLA_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST(CudaGemm, DependentLaunchNeedsConstantB) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  DeviceArray<__nv_bfloat16> a(64), b(64 * 64);
  DeviceArray<float> c(64);
  cuda::GemmParams p{a.get(), b.get(), c.get(), 1, 64, 64, 64, 64, 64};
  EXPECT_THROW(cuda::skinny_gemm(p, nullptr, /*dependent=*/true), Error);
  p.b_constant = true;
  cuda::skinny_gemm(p, nullptr, /*dependent=*/true);
  MLA_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace mla
