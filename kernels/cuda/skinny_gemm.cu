#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/row_dots.cuh"
#include "kernels/cuda/skinny_gemm.h"
#include "kernels/cuda/vec_io.cuh"
#include "kernels/error.h"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;
// B stored [n, k] (a weight [out, in]): a group of G threads (32 .. 256) reduces kRowsPerGroup
// rows of B over k, each thread taking every G-th 16-byte chunk of the rows.
constexpr int kRowsPerGroup = 2;
// B stored [k, n]: a block covers kKnColumns 16-byte column chunks of n and splits k into
// kKnSlices interleaved slices, reduced through shared memory.
constexpr int kKnColumns = 16;
constexpr int kKnSlices = kThreads / kKnColumns;

struct Args {
  const void* a;
  const void* b;
  void* c;
  int64_t m, n, k, lda, ldb, ldc, stride_a, stride_b, stride_c;
  float alpha, beta;
};

template <typename OutT>
__device__ __forceinline__ void store_result(const Args& p, OutT* out, float sum) {
  float value = p.alpha * sum;
  if (p.beta != 0.0f) value += p.beta * to_float(*out);  // beta 0 never reads C (may be NaN)
  *out = from_float<OutT>(value);
}

// C[i, row] for the kRowsPerGroup rows of each G-thread group; MT >= m rows of A. The grid's
// first `blocks0` blocks compute p0 (C of type Out0), the rest p1 (Out1): two products of the
// same A in one launch; a lone product passes itself as both.
template <typename T, typename Out0, typename Out1, int MT, int G>
__global__ void __launch_bounds__(kThreads) skinny_nk_kernel(Args p0, Args p1, unsigned blocks0) {
  constexpr int R = kRowsPerGroup;
  constexpr int kGroups = kThreads / G;
  const bool second = blockIdx.x >= blocks0;
  const Args p = second ? p1 : p0;
  const int64_t block = second ? blockIdx.x - blocks0 : blockIdx.x;
  const int lane = threadIdx.x % G, group = threadIdx.x / G;
  const int64_t row0 = (block * kGroups + group) * R;
  RowDots<T, MT, R, G> dots;
#pragma unroll
  for (int r = 0; r < R; ++r) {  // rows past n re-read row n - 1; their sums are dropped
    const int64_t row = row0 + r < p.n ? row0 + r : p.n - 1;
    dots.b[r] = static_cast<const T*>(p.b) + blockIdx.y * p.stride_b + row * p.ldb;
  }
  dots.chunks = p.k / RowDots<T, MT, R, G>::V;
  dots.c0 = lane;
  dots.load();  // weights only: before waiting for the kernel that wrote A
  wait_for_prerequisite();
  allow_dependent_launch();

  float acc[MT][R] = {};
  dots.dot(static_cast<const T*>(p.a) + blockIdx.y * p.stride_a, p.lda, p.m, acc);
  __shared__ float partial[kThreads / 32][MT * R];
  __shared__ float sums[kGroups][MT * R];
  group_sums<kThreads, G>(acc, partial, sums);
  if (lane < MT * R) {
    const int i = lane / R, r = lane % R;
    const int64_t row = row0 + r;
    if (i < p.m && row < p.n) {
      const int64_t at = blockIdx.y * p.stride_c + i * p.ldc + row;
      if (second) {
        store_result(p, static_cast<Out1*>(p.c) + at, sums[group][lane]);
      } else {
        store_result(p, static_cast<Out0*>(p.c) + at, sums[group][lane]);
      }
    }
  }
}

// B stored [k, n]: each thread owns one 16-byte chunk of n and every kKnSlices-th k.
template <typename T, typename OutT, int MT>
__global__ void __launch_bounds__(kThreads) skinny_kn_kernel(Args p) {
  constexpr int V = 16 / sizeof(T);
  const int column = threadIdx.x % kKnColumns, slice = threadIdx.x / kKnColumns;
  const int64_t n0 = (int64_t{blockIdx.x} * kKnColumns + column) * V;
  const bool live = n0 < p.n;
  const T* a = static_cast<const T*>(p.a) + blockIdx.y * p.stride_a;
  const T* b = static_cast<const T*>(p.b) + blockIdx.y * p.stride_b + (live ? n0 : 0);

  uint4 w[kRowDotsUnroll];
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int u = 0; u < kRowDotsUnroll; ++u) {
      const int64_t k = k0 + int64_t{u} * kKnSlices;
      w[u] = live && k < p.k ? load_streaming(b + k * p.ldb) : uint4{};
    }
  };
  int64_t k0 = slice;
  load(k0);  // weights only: before waiting for the kernel that wrote A
  wait_for_prerequisite();
  allow_dependent_launch();

  float acc[MT][V] = {};
  while (k0 < p.k) {
#pragma unroll
    for (int u = 0; u < kRowDotsUnroll; ++u) {
      const int64_t k = k0 + int64_t{u} * kKnSlices;
      if (k >= p.k) break;
      float wf[V];
      unpack16<T>(w[u], wf);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        if (i >= p.m) break;
        const float av = to_float(a[i * p.lda + k]);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[i][v] = fmaf(av, wf[v], acc[i][v]);
      }
    }
    k0 += int64_t{kRowDotsUnroll} * kKnSlices;
    if (k0 < p.k) load(k0);
  }

  // Sum the slices of each column through shared memory, one row of A at a time.
  __shared__ float partial[kKnSlices][kKnColumns * V];
  const int64_t block_n0 = int64_t{blockIdx.x} * kKnColumns * V;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    if (i >= p.m) break;
    __syncthreads();  // the previous row's sums are read
#pragma unroll
    for (int v = 0; v < V; ++v) partial[slice][column * V + v] = acc[i][v];
    __syncthreads();
    if (threadIdx.x < kKnColumns * V && block_n0 + threadIdx.x < p.n) {
      float sum = 0.0f;
#pragma unroll
      for (int s = 0; s < kKnSlices; ++s) sum += partial[s][threadIdx.x];
      store_result(
          p, static_cast<OutT*>(p.c) + blockIdx.y * p.stride_c + i * p.ldc + block_n0 + threadIdx.x,
          sum);
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// p1 (with Out1) follows p0 in the grid when `pair`; otherwise p0 alone (p1 unused).
template <typename T, typename Out0, typename Out1, int MT>
void launch_nk(const Args& p0, const Args& p1, bool pair, int64_t batch, cudaStream_t stream,
               bool dependent, bool batch_invariant) {
  constexpr int64_t V = 16 / sizeof(T);
  const int64_t n = p0.n + (pair ? p1.n : 0);
  const int64_t groups = ceil_div(n, kRowsPerGroup) * (batch_invariant ? 1 : batch);
  const int64_t chunks = p0.k / V;
  const int g = row_dots_group_width(groups, chunks, kThreads);
  const int64_t rows_per_block = int64_t{kRowsPerGroup} * (kThreads / g);
  const int64_t blocks0 = ceil_div(p0.n, rows_per_block);
  const dim3 grid(static_cast<unsigned>(blocks0 + (pair ? ceil_div(p1.n, rows_per_block) : 0)),
                  static_cast<unsigned>(batch));
  const auto b0 = static_cast<unsigned>(blocks0);
  switch (g) {
    case 32:
      launch_dependent(skinny_nk_kernel<T, Out0, Out1, MT, 32>, grid, kThreads, 0, stream,
                       dependent, p0, p1, b0);
      break;
    case 64:
      launch_dependent(skinny_nk_kernel<T, Out0, Out1, MT, 64>, grid, kThreads, 0, stream,
                       dependent, p0, p1, b0);
      break;
    case 128:
      launch_dependent(skinny_nk_kernel<T, Out0, Out1, MT, 128>, grid, kThreads, 0, stream,
                       dependent, p0, p1, b0);
      break;
    default:
      launch_dependent(skinny_nk_kernel<T, Out0, Out1, MT, 256>, grid, kThreads, 0, stream,
                       dependent, p0, p1, b0);
      break;
  }
}

template <typename T, typename OutT, int MT>
void launch_kn(const Args& args, int64_t batch, cudaStream_t stream, bool dependent) {
  constexpr int64_t V = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(ceil_div(args.n, kKnColumns * V)),
                  static_cast<unsigned>(batch));
  launch_dependent(skinny_kn_kernel<T, OutT, MT>, grid, kThreads, 0, stream, dependent, args);
}

template <typename T, typename OutT, int MT>
void launch_rows(const GemmParams& p, const Args& args, cudaStream_t stream, bool dependent,
                 bool batch_invariant) {
  if (p.b_nk) {
    launch_nk<T, OutT, OutT, MT>(args, args, false, p.batch, stream, dependent, batch_invariant);
  } else {
    launch_kn<T, OutT, MT>(args, p.batch, stream, dependent);
  }
}

// One instantiation per power of two of rows; m rounds up to it.
template <typename T, typename OutT>
void launch_typed(const GemmParams& p, const Args& args, cudaStream_t stream, bool dependent,
                  bool batch_invariant) {
  if (p.m <= 1) {
    launch_rows<T, OutT, 1>(p, args, stream, dependent, batch_invariant);
  } else if (p.m <= 2) {
    launch_rows<T, OutT, 2>(p, args, stream, dependent, batch_invariant);
  } else if (p.m <= 4) {
    launch_rows<T, OutT, 4>(p, args, stream, dependent, batch_invariant);
  } else {
    launch_rows<T, OutT, 8>(p, args, stream, dependent, batch_invariant);
  }
}

// The pair's row count picks MT, as for one product.
template <typename Out0, typename Out1>
void launch_pair(const Args& p0, const Args& p1, cudaStream_t stream, bool dependent) {
  using T = __nv_bfloat16;
  if (p0.m <= 1) {
    launch_nk<T, Out0, Out1, 1>(p0, p1, true, 1, stream, dependent, false);
  } else if (p0.m <= 2) {
    launch_nk<T, Out0, Out1, 2>(p0, p1, true, 1, stream, dependent, false);
  } else if (p0.m <= 4) {
    launch_nk<T, Out0, Out1, 4>(p0, p1, true, 1, stream, dependent, false);
  } else {
    launch_nk<T, Out0, Out1, 8>(p0, p1, true, 1, stream, dependent, false);
  }
}

Args args_of(const GemmParams& p) {
  return {p.a,   p.b,   p.c,        p.m,        p.n,        p.k,     p.lda,
          p.ldb, p.ldc, p.stride_a, p.stride_b, p.stride_c, p.alpha, p.beta};
}

}  // namespace

bool skinny_gemm_supports(const GemmParams& p) {
  if (p.m < 1 || p.m > kSkinnyMaxRows || p.n < 1 || p.k < 1 || p.batch < 1 || p.batch > 65535) {
    return false;
  }
  const bool bf16 =
      p.ab_type == DType::kBF16 && (p.c_type == DType::kF32 || p.c_type == DType::kBF16);
  const bool f32 = p.ab_type == DType::kF32 && p.c_type == DType::kF32;
  if (!bf16 && !f32) return false;
  const int64_t v = bf16 ? 8 : 4;  // elements in 16 bytes
  auto whole = [v](int64_t x) { return x % v == 0; };
  if (p.lda < p.k || p.ldb < (p.b_nk ? p.k : p.n) || p.ldc < p.n) return false;
  if (!is_aligned(p.b, 16) || !whole(p.ldb) || !whole(p.stride_b)) return false;
  if (!p.b_nk) return whole(p.n);
  return whole(p.k) && is_aligned(p.a, 16) && whole(p.lda) && whole(p.stride_a);
}

void skinny_gemm(const GemmParams& p, cudaStream_t stream, bool dependent, bool batch_invariant) {
  MLA_REQUIRE(skinny_gemm_supports(p), "skinny_gemm: unsupported product {}x{}x{} x{}", p.m, p.n,
              p.k, p.batch);
  MLA_REQUIRE(!dependent || p.b_constant,
              "skinny_gemm: a dependent launch reads B early, so B must be constant");
  const Args args = args_of(p);
  if (p.ab_type == DType::kF32) {
    launch_typed<float, float>(p, args, stream, dependent, batch_invariant);
  } else if (p.c_type == DType::kF32) {
    launch_typed<__nv_bfloat16, float>(p, args, stream, dependent, batch_invariant);
  } else {
    launch_typed<__nv_bfloat16, __nv_bfloat16>(p, args, stream, dependent, batch_invariant);
  }
}

bool skinny_gemm_pair_supports(const GemmParams& first, const GemmParams& second) {
  const GemmParams* both[] = {&first, &second};
  for (const GemmParams* p : both) {
    if (!skinny_gemm_supports(*p) || p->ab_type != DType::kBF16 || !p->b_nk || p->batch != 1) {
      return false;
    }
  }
  return first.a == second.a && first.m == second.m && first.k == second.k &&
         first.lda == second.lda;
}

void skinny_gemm_pair(const GemmParams& first, const GemmParams& second, cudaStream_t stream,
                      bool dependent) {
  MLA_REQUIRE(skinny_gemm_pair_supports(first, second),
              "skinny_gemm_pair: unsupported products {}x{}x{} and {}x{}x{}", first.m, first.n,
              first.k, second.m, second.n, second.k);
  MLA_REQUIRE(!dependent || (first.b_constant && second.b_constant),
              "skinny_gemm_pair: a dependent launch reads B early, so B must be constant");
  // An fp32 output, if any, goes second: three type pairs instead of four.
  const bool swap = first.c_type == DType::kF32 && second.c_type == DType::kBF16;
  const Args a0 = args_of(swap ? second : first), a1 = args_of(swap ? first : second);
  const DType t0 = swap ? second.c_type : first.c_type, t1 = swap ? first.c_type : second.c_type;
  if (t0 == DType::kBF16 && t1 == DType::kBF16) {
    launch_pair<__nv_bfloat16, __nv_bfloat16>(a0, a1, stream, dependent);
  } else if (t0 == DType::kBF16) {
    launch_pair<__nv_bfloat16, float>(a0, a1, stream, dependent);
  } else {
    launch_pair<float, float>(a0, a1, stream, dependent);
  }
}

}  // namespace mla::cuda
