// Device helpers shared by the element-wise kernels: fp32 <-> bf16 conversion and packed
// access to N consecutive elements in one memory instruction. Include from .cu files only.
#pragma once

#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>

namespace mla::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);  // round to nearest even, as the host-side upload does
}

// The alignment makes the compiler move N elements with one vector load or store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

// out[0, N) = src[0, N) as floats; src must be aligned to N elements.
template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* src, float* out) {
  const Packed<T, N> packed = *reinterpret_cast<const Packed<T, N>*>(src);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(packed.v[i]);
}

// dst[0, N) = in[0, N) converted to T; dst must be aligned to N elements.
template <int N, typename T>
__device__ __forceinline__ void store_floats(T* dst, const float* in) {
  Packed<T, N> packed;
#pragma unroll
  for (int i = 0; i < N; ++i) packed.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Packed<T, N>*>(dst) = packed;
}

inline bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

}  // namespace mla::cuda
