// Row gather on the GPU: out[i] = in[index[i]] for rows of `row_bytes` bytes (any dtype).
// Used to pick the rows whose logits a step wants. Launchers take a stream and never
// synchronise.
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

}  // namespace mla::cuda
