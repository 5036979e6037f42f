// Element types and scalar conversions between them.
//
// Storage types follow the safetensors names. Compute on the CPU is always fp32; the
// conversions here are exact for widening (bf16/f16/fp8 -> f32) and round to nearest
// even for narrowing (f32 -> bf16/f16/fp8 e4m3, saturating at +-448 for fp8).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace mla {

enum class DType : uint8_t { kF32, kBF16, kF16, kF8E4M3, kI64, kI32, kU8 };

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);  // safetensors spelling: "F32", "BF16", "F8_E4M3", ...
std::optional<DType> dtype_from_name(std::string_view name);

float bf16_to_f32(uint16_t v);
uint16_t f32_to_bf16(float v);
float f16_to_f32(uint16_t v);
uint16_t f32_to_f16(float v);
float fp8e4m3_to_f32(uint8_t v);
uint8_t f32_to_fp8e4m3(float v);

// Converts n elements of type `src_type` at `src` into fp32 at `dst`.
void convert_to_f32(DType src_type, const void* src, size_t n, float* dst);

}  // namespace mla
