// Rotary position embedding on the GPU, in place, for vectors laid out [tokens, heads, *]
// with arbitrary strides (e.g. the d_r tail of [T, H, d_n + d_r] queries, or of the
// [T, d_c + d_r] latent with heads = 1). Equals, vector by vector, mla::cpu::rope_table
// for the token's position followed by mla::cpu::rope_rotate. Launchers take a stream and
// never synchronise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda {

struct RopeParams {
  float* x;                  // vector (t, h): d floats at x + t * token_stride + h * head_stride
  const int32_t* positions;  // [tokens]
  const float* inv_freq;     // [d / 2]
  int64_t tokens, heads, d;  // d even, d <= cpu::kMaxRopeDim
  int64_t token_stride, head_stride;  // in floats; vectors must not overlap
  float attention_factor;             // scales cos and sin (YaRN's mscale)
  // true: pairs (2j, 2j+1) rotate and are written de-interleaved to (j, j + d/2);
  // false: pairs (j, j + d/2) rotate in place.
  bool interleave;
};

void rope_f32(const RopeParams& p, cudaStream_t stream);

}  // namespace mla::cuda
