#include <cstdint>

#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/latent_store.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/rope_math.cuh"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;

// One block per token: the block normalises c; threads [0, d_r / 2) each rotate one pair of
// k_r. The source is fp32 and the destination the pool, so the rotation needs no barrier.
__global__ void latent_store_kernel(LatentStoreParams p) {
  wait_for_prerequisite();  // launched as a dependent: the kernels before have finished
  allow_dependent_launch();
  const int64_t t = blockIdx.x;
  const int32_t page = p.slot_pages[t];
  if (page < 0) return;  // the whole block leaves, so block_sum's barrier stays uniform
  const float* c = p.kv + t * p.kv_stride;
  const int64_t slot = (int64_t{page} * p.num_layers + p.layer) * p.block_size + p.slot_offsets[t];
  __nv_bfloat16* row = p.pool + slot * (p.d_c + p.d_r);

  float sum = 0.0f;
  for (int i = threadIdx.x; i < p.d_c; i += kThreads) sum += c[i] * c[i];
  const float inv = rsqrtf(block_sum<kThreads>(sum) / static_cast<float>(p.d_c) + p.eps);
  for (int i = threadIdx.x; i < p.d_c; i += kThreads) {
    row[i] = from_float<__nv_bfloat16>(p.norm_w[i] * (c[i] * inv));  // as cpu::rms_norm
  }

  const int half = p.d_r / 2;
  const int j = threadIdx.x;
  if (j < half) {
    const float2 r =
        rope::rotate_pair(c + p.d_c, j, half, p.interleave,
                          rope::cos_sin(p.positions[t], p.inv_freq[j], p.attention_factor));
    row[p.d_c + j] = from_float<__nv_bfloat16>(r.x);
    row[p.d_c + j + half] = from_float<__nv_bfloat16>(r.y);
  }
}

}  // namespace

void latent_store(const LatentStoreParams& p, cudaStream_t stream) {
  if (p.T == 0) return;
  // Check shapes
  MLA_CHECK(p.d_c > 0 && p.d_r >= 0 && p.d_r % 2 == 0 && p.d_r / 2 <= kThreads,
            "latent_store: d_c {} and d_r {} (even, at most {})", p.d_c, p.d_r, 2 * kThreads);
  MLA_CHECK(p.kv_stride >= p.d_c + p.d_r, "latent_store: kv stride {} under width {}", p.kv_stride,
            p.d_c + p.d_r);
  MLA_CHECK(p.T < (int64_t{1} << 31), "{} tokens exceed one grid", p.T);
  // Check cache geometry
  MLA_CHECK(p.layer >= 0 && p.layer < p.num_layers && p.block_size > 0,
            "latent_store: layer {} of {}, block size {}", p.layer, p.num_layers, p.block_size);
  launch_dependent(latent_store_kernel, static_cast<unsigned>(p.T), kThreads, 0, stream, true, p);
}

}  // namespace mla::cuda
