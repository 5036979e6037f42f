#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/vec_io.cuh"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;

// One block per token; Vec = 4 values per access (16 bytes of fp32 out, 8 or 16 bytes in).
template <int Vec, typename Params>
__global__ void embedding_kernel(Params p) {
  wait_for_prerequisite();  // launched as a dependent: the kernels before have finished
  allow_dependent_launch();
  const int64_t t = blockIdx.x;
  const int64_t id = p.ids[t];
  float* out = p.out + t * p.d;
  if (id < 0 || id >= p.vocab) {
    float poison[Vec];
#pragma unroll
    for (int k = 0; k < Vec; ++k) poison[k] = NAN;
    for (int64_t i = threadIdx.x * Vec; i < p.d; i += kThreads * Vec) {
      store_floats<Vec>(out + i, poison);
    }
    return;
  }
  const auto* row = p.table + id * p.d;
  for (int64_t i = threadIdx.x * Vec; i < p.d; i += kThreads * Vec) {
    float v[Vec];
    load_floats<Vec>(row + i, v);
    store_floats<Vec>(out + i, v);
  }
}

template <typename Params>
void launch(const Params& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.d == 0) return;
  MLA_CHECK(p.tokens < (int64_t{1} << 31), "{} tokens exceed one grid", p.tokens);
  const auto blocks = static_cast<unsigned>(p.tokens);
  if (p.d % 4 == 0 && is_aligned(p.table, 4 * sizeof(*p.table)) && is_aligned(p.out, 16)) {
    launch_dependent(embedding_kernel<4, Params>, blocks, kThreads, 0, stream, true, p);
  } else {
    launch_dependent(embedding_kernel<1, Params>, blocks, kThreads, 0, stream, true, p);
  }
}

}  // namespace

void embedding_bf16(const EmbeddingBf16Params& p, cudaStream_t stream) { launch(p, stream); }

}  // namespace mla::cuda
