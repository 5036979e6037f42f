#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/fp8_latent.cuh"
#include "kernels/cuda/fp8_latent.h"
#include "kernels/cuda/pdl.cuh"

namespace mla::cuda {
namespace {

constexpr int kGatherThreads = 128;

// One block per output row.
__global__ void fp8_latent_gather_kernel(Fp8LatentGatherParams p) {
  wait_for_prerequisite();  // the rows were stored by the kernels before
  allow_dependent_launch();
  const cpu::Fp8LatentRow f{.d_c = p.d_c, .d_r = p.d_r};
  const uint8_t* row = p.pool + int64_t{p.index[blockIdx.x]} * f.bytes();
  __nv_bfloat16* out = p.out + int64_t{blockIdx.x} * p.out_stride;
  for (int32_t i = threadIdx.x; i < p.d_c + p.d_r; i += kGatherThreads) {
    out[i] = __float2bfloat16(fp8_latent_value(row, f, i));
  }
}

}  // namespace

void fp8_latent_gather(const Fp8LatentGatherParams& p, cudaStream_t stream) {
  // Check shapes
  MLA_CHECK(p.rows >= 0 && p.rows < (int64_t{1} << 31), "fp8_latent_gather: {} rows", p.rows);
  // Rows of d_c % 4 == 0 and even d_r keep every row's fp32 scales 4-byte aligned.
  MLA_CHECK(
      p.d_c > 0 && p.d_c % 4 == 0 && p.d_r >= 0 && p.d_r % 2 == 0 && p.out_stride >= p.d_c + p.d_r,
      "fp8_latent_gather: d_c {} (a multiple of 4), d_r {} (even), out stride {}", p.d_c, p.d_r,
      p.out_stride);
  if (p.rows == 0) return;
  launch_dependent(fp8_latent_gather_kernel, static_cast<unsigned>(p.rows), kGatherThreads, 0,
                   stream, true, p);
}

}  // namespace mla::cuda
