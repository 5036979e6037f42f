#include <cstdint>

#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/fp8_latent.cuh"
#include "kernels/cuda/latent_store.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/rope_math.cuh"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;

// One block per token: the block normalises c; threads [0, d_r / 2) each rotate one pair of
// k_r. The source is fp32 and the destination the pool, so the rotation needs no barrier. An
// fp8 row keeps the normalised c in shared memory (d_c floats) and quantises it a group of 128
// per warp.
template <LatentElement kElement>
__global__ void latent_store_kernel(LatentStoreParams p) {
  extern __shared__ float normed[];  // [d_c], fp8 rows only
  wait_for_prerequisite();           // launched as a dependent: the kernels before have finished
  allow_dependent_launch();
  const int64_t t = blockIdx.x;
  const int32_t page = p.slot_pages[t];
  if (page < 0) return;  // the whole block leaves, so block_sum's barrier stays uniform
  const float* c = p.kv + t * p.kv_stride;
  const int64_t slot = (int64_t{page} * p.num_layers + p.layer) * p.block_size + p.slot_offsets[t];
  constexpr bool kFp8 = kElement == LatentElement::kFp8;
  const cpu::Fp8LatentRow f{.d_c = p.d_c, .d_r = p.d_r};
  uint8_t* row = static_cast<uint8_t*>(p.pool) + slot * latent_row_bytes(kElement, p.d_c, p.d_r);
  __nv_bfloat16* rope =
      reinterpret_cast<__nv_bfloat16*>(row + (kFp8 ? f.rope_offset() : 2 * p.d_c));

  float sum = 0.0f;
  for (int i = threadIdx.x; i < p.d_c; i += kThreads) sum += c[i] * c[i];
  const float inv = rsqrtf(block_sum<kThreads>(sum) / static_cast<float>(p.d_c) + p.eps);
  for (int i = threadIdx.x; i < p.d_c; i += kThreads) {
    const float v = p.norm_w[i] * (c[i] * inv);  // as cpu::rms_norm
    if constexpr (kFp8) {
      normed[i] = v;
    } else {
      reinterpret_cast<__nv_bfloat16*>(row)[i] = from_float<__nv_bfloat16>(v);
    }
  }

  const int half = p.d_r / 2;
  const int j = threadIdx.x;
  if (j < half) {
    const float2 r =
        rope::rotate_pair(c + p.d_c, j, half, p.interleave,
                          rope::cos_sin(p.positions[t], p.inv_freq[j], p.attention_factor));
    rope[j] = from_float<__nv_bfloat16>(r.x);
    rope[j + half] = from_float<__nv_bfloat16>(r.y);
  }
  if constexpr (kFp8) {
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    auto* scales = reinterpret_cast<float*>(row + f.scales_offset());
    for (int g = warp; g < f.groups(); g += kThreads / 32) {
      const int begin = g * static_cast<int>(f.kGroup);
      fp8_latent_quantize_group(normed + begin, min(static_cast<int>(f.kGroup), p.d_c - begin),
                                row + begin, scales + g, lane);
    }
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
  const auto grid = static_cast<unsigned>(p.T);
  if (p.element == LatentElement::kFp8) {
    // The normalised c sits in shared memory: at most the 48 KiB a launch has without opting in.
    MLA_CHECK(p.d_c % 4 == 0 && p.d_c <= 12288,
              "latent_store: fp8 rows need d_c {} a multiple of 4, at most 12288", p.d_c);
    const int smem = p.d_c * static_cast<int>(sizeof(float));
    launch_dependent(latent_store_kernel<LatentElement::kFp8>, grid, kThreads, smem, stream, true,
                     p);
  } else {
    launch_dependent(latent_store_kernel<LatentElement::kBf16>, grid, kThreads, 0, stream, true, p);
  }
}

}  // namespace mla::cuda
