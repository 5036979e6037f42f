#include <cstdint>
#include <type_traits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/embedding.h"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;

// One block per token. Vec = 4 moves 16 bytes per load and store.
template <int Vec>
__global__ void embedding_kernel(EmbeddingParams p) {
  using V = std::conditional_t<Vec == 4, float4, float>;
  const int64_t t = blockIdx.x;
  const int64_t id = p.ids[t];
  V* out = reinterpret_cast<V*>(p.out + t * p.d);
  const int64_t n = p.d / Vec;
  if (id < 0 || id >= p.vocab) {
    const float nan = __int_as_float(0x7fffffff);
    V poison;
    if constexpr (Vec == 4) {
      poison = make_float4(nan, nan, nan, nan);
    } else {
      poison = nan;
    }
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = poison;
    return;
  }
  const V* row = reinterpret_cast<const V*>(p.table + id * p.d);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = row[i];
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

void embedding_f32(const EmbeddingParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.d == 0) return;
  MLA_CHECK(p.tokens < (int64_t{1} << 31), "{} tokens exceed one grid", p.tokens);
  const auto blocks = static_cast<unsigned>(p.tokens);
  if (p.d % 4 == 0 && aligned16(p.table) && aligned16(p.out)) {
    embedding_kernel<4><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    embedding_kernel<1><<<blocks, kThreads, 0, stream>>>(p);
  }
  MLA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mla::cuda
