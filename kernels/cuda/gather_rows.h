// Row gather and scatter on the GPU, for rows of `row_bytes` bytes (any dtype):
//   gather:  out[i] = in[index[i]]   (the rows whose logits a step wants; a latent cache's rows
//                                     of one sequence, packed for a migration)
//   scatter: out[index[i]] = in[i]   (packed rows written into a latent cache's pages)
// Launchers take a stream and never synchronise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda {

struct GatherRowsParams {
  const void* in;        // [*, in_stride bytes]
  const int32_t* index;  // [rows]: row of `in` for each output row (must be valid)
  void* out;             // [rows, out_stride bytes]; must not alias in
  int64_t rows, row_bytes, in_stride, out_stride;  // strides in bytes
};

void gather_rows(const GatherRowsParams& p, cudaStream_t stream);

struct ScatterRowsParams {
  const void* in;        // [rows, in_stride bytes]
  const int32_t* index;  // [rows]: row of `out` for each input row (valid and distinct)
  void* out;             // [*, out_stride bytes]; must not alias in
  int64_t rows, row_bytes, in_stride, out_stride;  // strides in bytes
};

void scatter_rows(const ScatterRowsParams& p, cudaStream_t stream);

}  // namespace mla::cuda
