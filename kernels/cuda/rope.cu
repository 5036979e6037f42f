#include "kernels/cuda/rope.h"
#include "kernels/cuda/rope_math.cuh"

namespace mla::cuda {

void rope_f32(const RopeParams& p, cudaStream_t stream) {
  rope::launch(rope::Vectors<float, float>{p.x, p.x, p.positions, p.inv_freq, p.tokens, p.heads,
                                           p.d, p.token_stride, p.head_stride, p.token_stride,
                                           p.head_stride, p.attention_factor, p.interleave},
               stream);
}

}  // namespace mla::cuda
