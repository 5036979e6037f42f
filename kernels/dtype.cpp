#include "kernels/dtype.h"

#include <array>
#include <bit>
#include <cmath>
#include <cstring>

#include "kernels/error.h"

namespace mla {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kF16:
      return 2;
    case DType::kF8E4M3:
      return 1;
    case DType::kI64:
      return 8;
    case DType::kI32:
      return 4;
    case DType::kU8:
      return 1;
  }
  return 0;
}

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
    case DType::kF8E4M3:
      return "F8_E4M3";
    case DType::kI64:
      return "I64";
    case DType::kI32:
      return "I32";
    case DType::kU8:
      return "U8";
  }
  return "?";
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16, DType::kF8E4M3, DType::kI64, DType::kI32,
                  DType::kU8}) {
    if (dtype_name(t) == name) return t;
  }
  return std::nullopt;
}

float bf16_to_f32(uint16_t v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }

uint16_t f32_to_bf16(float v) {
  uint32_t u = std::bit_cast<uint32_t>(v);
  if (std::isnan(v)) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t v) {
  const uint32_t sign = (v >> 15) & 1, exp = (v >> 10) & 0x1f, mant = v & 0x3ff;
  float r;
  if (exp == 0) {
    r = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    r = mant ? NAN : INFINITY;
  } else {
    r = std::ldexp(static_cast<float>(mant | 0x400), static_cast<int>(exp) - 25);
  }
  return sign ? -r : r;
}

uint16_t f32_to_f16(float v) {
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  float a = std::fabs(v);
  if (std::isnan(v)) return sign | 0x7e00;
  if (a >= 65520.0f) return sign | 0x7c00;
  if (a < std::ldexp(1.0f, -14)) {  // subnormal: units of 2^-24
    return sign | static_cast<uint16_t>(std::nearbyint(a * std::ldexp(1.0f, 24)));
  }
  int e;
  float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  uint32_t mant = static_cast<uint32_t>(std::nearbyint(std::ldexp(m, 11)));  // 11 bits incl. lead
  if (mant == 2048) {
    mant = 1024;
    ++e;
  }
  if (e + 14 >= 31) return sign | 0x7c00;
  return sign | static_cast<uint16_t>(((e + 14) << 10) | (mant & 0x3ff));
}

// e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; 0x7f/0xff are NaN.
float fp8e4m3_to_f32(uint8_t v) {
  const uint32_t sign = v >> 7, exp = (v >> 3) & 0xf, mant = v & 0x7;
  float r;
  if (exp == 0xf && mant == 0x7) {
    r = NAN;
  } else if (exp == 0) {
    r = std::ldexp(static_cast<float>(mant), -9);
  } else {
    r = std::ldexp(static_cast<float>(mant | 0x8), static_cast<int>(exp) - 10);
  }
  return sign ? -r : r;
}

uint8_t f32_to_fp8e4m3(float v) {
  if (std::isnan(v)) return 0x7f;
  const uint8_t sign = std::signbit(v) ? 0x80 : 0;
  const float a = std::fmin(std::fabs(v), 448.0f);
  // The 127 finite non-negative codes are ordered by value: binary-search the first code
  // >= a, then take the nearer of it and its predecessor (ties to the even code).
  uint8_t lo = 0, hi = 0x7e;
  while (lo < hi) {
    const uint8_t mid = static_cast<uint8_t>((lo + hi) / 2);
    if (fp8e4m3_to_f32(mid) < a) {
      lo = static_cast<uint8_t>(mid + 1);
    } else {
      hi = mid;
    }
  }
  uint8_t best = lo;
  if (lo > 0) {
    const float up = fp8e4m3_to_f32(lo) - a, down = a - fp8e4m3_to_f32(lo - 1);
    if (down < up || (down == up && ((lo - 1) & 1) == 0)) best = static_cast<uint8_t>(lo - 1);
  }
  return sign | best;
}

void convert_to_f32(DType src_type, const void* src, size_t n, float* dst) {
  switch (src_type) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::kBF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::kF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::kF8E4M3: {
      static const auto table = [] {
        std::array<float, 256> t{};
        for (int i = 0; i < 256; ++i) t[i] = fp8e4m3_to_f32(static_cast<uint8_t>(i));
        return t;
      }();
      const auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = table[s[i]];
      return;
    }
    default:
      MLA_THROW(kInvalidArgument, "cannot convert {} to F32", dtype_name(src_type));
  }
}

}  // namespace mla
