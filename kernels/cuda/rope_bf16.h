// Rotary position embedding on bf16 vectors laid out [tokens, heads, *] with arbitrary strides,
// in place or out of place: e.g. the query's rotary part in place, or copied rotated from the
// query [T, H, d_n + d_r] into the absorbed-query buffer [T, H, d_c + d_r] at offset d_c.
// Vector by vector it equals mla::cpu::rope_table for the token's position followed by
// mla::cpu::rope_rotate, computed in fp32 and rounded once to bf16. Launchers take a stream and
// never synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda {

struct RopeBf16Params {
  const __nv_bfloat16* src;  // vector (t, h) at src + t * src_token_stride + h * src_head_stride
  __nv_bfloat16* dst;        // vector (t, h) at dst + t * dst_token_stride + h * dst_head_stride
  const int32_t* positions;  // [tokens]
  const float* inv_freq;     // [d / 2]
  int64_t tokens, heads, d;  // d even, d <= cpu::kMaxRopeDim
  int64_t src_token_stride, src_head_stride;  // in elements
  int64_t dst_token_stride, dst_head_stride;  // in elements
  float attention_factor;                     // scales cos and sin (YaRN's mscale)
  // true: pairs (2j, 2j+1) rotate and are written de-interleaved to (j, j + d/2);
  // false: pairs (j, j + d/2) rotate in place.
  bool interleave;
};

// In place when dst == src with equal strides; otherwise no destination vector may overlap a
// source vector or another destination vector.
void rope_bf16(const RopeBf16Params& p, cudaStream_t stream);

}  // namespace mla::cuda
