// The one fp8 e4m3 scaling rule every fp8 path of mlaserve shares (the latent cache's rows,
// block-scaled weights, activations quantised before an fp8 product): a group of values x is
// stored as e4m3(x / s) with s = amax(|x|) / 448, so the group's largest value lands on e4m3's
// largest finite value; an all-zero group gets s = 1. Thread-safe, host memory.
#pragma once

#include <cstdint>

namespace mla::cpu {

inline constexpr float kFp8Max = 448.0f;  // largest finite e4m3 value

// q[0, n) <- e4m3(x[j] / s); returns s.
float quantize_group_fp8(const float* x, int64_t n, uint8_t* q);

}  // namespace mla::cpu
