#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gather_rows.h"
#include "kernels/cuda/pdl.cuh"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;

template <typename Word>
__global__ void gather_rows_kernel(GatherRowsParams p) {
  wait_for_prerequisite();  // launched as a dependent: the kernels before have finished
  allow_dependent_launch();
  const int64_t row = blockIdx.x;
  const auto* src =
      reinterpret_cast<const Word*>(static_cast<const char*>(p.in) + p.index[row] * p.in_stride);
  auto* dst = reinterpret_cast<Word*>(static_cast<char*>(p.out) + row * p.out_stride);
  const int64_t words = p.row_bytes / static_cast<int64_t>(sizeof(Word));
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) dst[i] = src[i];
}

template <typename Word>
__global__ void scatter_rows_kernel(ScatterRowsParams p) {
  wait_for_prerequisite();
  allow_dependent_launch();
  const int64_t row = blockIdx.x;
  const auto* src =
      reinterpret_cast<const Word*>(static_cast<const char*>(p.in) + row * p.in_stride);
  auto* dst = reinterpret_cast<Word*>(static_cast<char*>(p.out) + p.index[row] * p.out_stride);
  const int64_t words = p.row_bytes / static_cast<int64_t>(sizeof(Word));
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) dst[i] = src[i];
}

bool aligned16(const void* ptr, int64_t stride) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && stride % 16 == 0;
}

// Rows of 16-byte words when every row start allows it, else bytes.
template <typename Params>
bool wide_rows(const Params& p) {
  return p.row_bytes % 16 == 0 && aligned16(p.in, p.in_stride) && aligned16(p.out, p.out_stride);
}

}  // namespace

void gather_rows(const GatherRowsParams& p, cudaStream_t stream) {
  // Check shapes
  MLA_CHECK(p.rows >= 0 && p.row_bytes >= 0, "gather_rows: bad sizes");
  MLA_CHECK(p.in_stride >= p.row_bytes && p.out_stride >= p.row_bytes,
            "gather_rows: strides smaller than a row");
  if (p.rows == 0 || p.row_bytes == 0) return;
  const auto grid = static_cast<unsigned>(p.rows);
  if (wide_rows(p)) {
    launch_dependent(gather_rows_kernel<uint4>, grid, kThreads, 0, stream, true, p);
  } else {
    launch_dependent(gather_rows_kernel<char>, grid, kThreads, 0, stream, true, p);
  }
}

void scatter_rows(const ScatterRowsParams& p, cudaStream_t stream) {
  // Check shapes
  MLA_CHECK(p.rows >= 0 && p.row_bytes >= 0, "scatter_rows: bad sizes");
  MLA_CHECK(p.in_stride >= p.row_bytes && p.out_stride >= p.row_bytes,
            "scatter_rows: strides smaller than a row");
  if (p.rows == 0 || p.row_bytes == 0) return;
  const auto grid = static_cast<unsigned>(p.rows);
  if (wide_rows(p)) {
    launch_dependent(scatter_rows_kernel<uint4>, grid, kThreads, 0, stream, true, p);
  } else {
    launch_dependent(scatter_rows_kernel<char>, grid, kThreads, 0, stream, true, p);
  }
}

}  // namespace mla::cuda
