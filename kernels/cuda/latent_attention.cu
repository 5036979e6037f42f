#include <cmath>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/fp8_latent.cuh"
#include "kernels/cuda/latent_attention.h"

namespace mla::cuda {
namespace {

constexpr int kThreads = 128;

__device__ float block_max_of(float v, float* scratch) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) r = fmaxf(r, scratch[w]);
  __syncthreads();
  return r;
}

__device__ float block_sum_of(float v, float* scratch) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float r = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) r += scratch[w];
  __syncthreads();
  return r;
}

// Value i of a pool row.
template <LatentElement kElement>
__device__ __forceinline__ float row_value(const uint8_t* row, const cpu::Fp8LatentRow& f, int i) {
  if constexpr (kElement == LatentElement::kFp8) {
    return fp8_latent_value(row, f, i);
  } else {
    return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row)[i]);
  }
}

// One block per (token, head): keys in chunks of kThreads, one score per thread, online
// softmax over the chunks, the output accumulated in shared memory.
template <LatentElement kElement>
__global__ void latent_attention_kernel(LatentAttentionParams p) {
  const int t = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const int width = p.d_c + p.d_r;
  __shared__ float q[kMaxLatentWidth];
  __shared__ float acc[kMaxLatentWidth];
  __shared__ float probs[kThreads];
  __shared__ int rows[kThreads];
  __shared__ float scratch[kThreads / 32];
  const __nv_bfloat16* qv = p.q + (int64_t{t} * p.heads + h) * width;
  for (int i = threadIdx.x; i < width; i += kThreads) q[i] = __bfloat162float(qv[i]);
  for (int i = threadIdx.x; i < p.d_c; i += kThreads) acc[i] = 0.0f;
  __syncthreads();
  const int n = p.num_keys[t];
  const int32_t* table = p.block_table + int64_t{p.token_seq[t]} * p.table_stride;
  const cpu::Fp8LatentRow f{.d_c = p.d_c, .d_r = p.d_r};
  const int64_t row_bytes = latent_row_bytes(kElement, p.d_c, p.d_r);
  const int64_t page_stride = int64_t{p.num_layers} * p.block_size * row_bytes;
  const uint8_t* layer_base =
      static_cast<const uint8_t*>(p.pool) + int64_t{p.layer} * p.block_size * row_bytes;
  float m = -INFINITY, l = 0.0f;
  for (int first = 0; first < n; first += kThreads) {
    const int j = first + threadIdx.x;
    float s = -INFINITY;
    if (j < n) {
      const uint8_t* row =
          layer_base + table[j / p.block_size] * page_stride + (j % p.block_size) * row_bytes;
      float dot = 0.0f;
      for (int i = 0; i < width; ++i) dot += q[i] * row_value<kElement>(row, f, i);
      s = dot * p.scale;
      rows[threadIdx.x] = j;
    }
    const float m_new = fmaxf(m, block_max_of(s, scratch));
    const float e = j < n ? expf(s - m_new) : 0.0f;
    probs[threadIdx.x] = e;
    const float correction = expf(m - m_new);  // 0 on the first chunk (m = -inf)
    l = l * correction + block_sum_of(e, scratch);
    m = m_new;
    const int count = min(kThreads, n - first);
    for (int i = threadIdx.x; i < p.d_c; i += kThreads) {
      float a = acc[i] * correction;
      for (int k = 0; k < count; ++k) {
        const int jj = rows[k];
        const uint8_t* row =
            layer_base + table[jj / p.block_size] * page_stride + (jj % p.block_size) * row_bytes;
        a += probs[k] * row_value<kElement>(row, f, i);
      }
      acc[i] = a;
    }
    __syncthreads();
  }
  __nv_bfloat16* out = p.out + (int64_t{t} * p.heads + h) * p.d_c;
  for (int i = threadIdx.x; i < p.d_c; i += kThreads) {
    out[i] = __float2bfloat16(n > 0 ? acc[i] / l : 0.0f);
  }
  if (threadIdx.x == 0) p.lse[int64_t{t} * p.heads + h] = n > 0 ? m + logf(l) : -INFINITY;
}

}  // namespace

void latent_attention(const LatentAttentionParams& p, cudaStream_t stream) {
  // Check shapes
  MLA_CHECK(p.tokens >= 0 && p.heads >= 1, "latent_attention: bad sizes");
  MLA_CHECK(p.d_c >= 1 && p.d_r >= 0 && p.d_c + p.d_r <= kMaxLatentWidth,
            "latent_attention: latent width {} + {} above {}", p.d_c, p.d_r, kMaxLatentWidth);
  MLA_CHECK(p.block_size >= 1 && 0 <= p.layer && p.layer < p.num_layers,
            "latent_attention: bad block size or layer");
  MLA_CHECK(p.element != LatentElement::kFp8 || (p.d_c % 4 == 0 && p.d_r % 2 == 0),
            "latent_attention: fp8 rows need d_c {} a multiple of 4 and d_r {} even", p.d_c, p.d_r);
  if (p.tokens == 0) return;
  const auto grid = static_cast<unsigned>(int64_t{p.tokens} * p.heads);
  if (p.element == LatentElement::kFp8) {
    latent_attention_kernel<LatentElement::kFp8><<<grid, kThreads, 0, stream>>>(p);
  } else {
    latent_attention_kernel<LatentElement::kBf16><<<grid, kThreads, 0, stream>>>(p);
  }
  MLA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mla::cuda
