// Error checking for CUDA runtime and cuBLAS calls: failures throw mla::Error naming the
// call, the file and the line.
#pragma once

#include <cuda_runtime.h>

#include "kernels/error.h"

#define MLA_CUDA_CHECK(expr)                                                  \
  do {                                                                        \
    cudaError_t mla_err_ = (expr);                                            \
    if (mla_err_ != cudaSuccess) {                                            \
      MLA_THROW(kInternal, "{}:{}: {} failed: {}", __FILE__, __LINE__, #expr, \
                cudaGetErrorString(mla_err_));                                \
    }                                                                         \
  } while (0)

namespace mla::cuda {

// Number of usable CUDA devices; 0 when there is no GPU or no driver (never throws).
int device_count();

}  // namespace mla::cuda
