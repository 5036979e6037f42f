// Greedy sampling on the GPU: for each row of logits, the index of its maximum, the lowest
// index winning ties. Equals, row by row, mla::sample_token with temperature 0. Launchers
// take a stream and never synchronise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda {

struct ArgmaxParams {
  const float* logits;  // [rows, vocab]; free of NaN, as mla::sample_token requires
  int32_t* out;         // [rows]
  int64_t rows, vocab;  // vocab in [1, INT32_MAX]
};

// One block per row.
void argmax_f32(const ArgmaxParams& p, cudaStream_t stream);

}  // namespace mla::cuda
