#include "kernels/cuda/rope_bf16.h"
#include "kernels/cuda/rope_math.cuh"

namespace mla::cuda {

void rope_bf16(const RopeBf16Params& p, cudaStream_t stream) {
  // Check layout
  MLA_CHECK(p.src != p.dst || (p.src_token_stride == p.dst_token_stride &&
                               p.src_head_stride == p.dst_head_stride),
            "in-place rope needs equal source and destination strides");
  using Vectors = rope::Vectors<__nv_bfloat16, __nv_bfloat16>;
  rope::launch(Vectors{p.src, p.dst, p.positions, p.inv_freq, p.tokens, p.heads, p.d,
                       p.src_token_stride, p.src_head_stride, p.dst_token_stride, p.dst_head_stride,
                       p.attention_factor, p.interleave},
               stream);
}

}  // namespace mla::cuda
