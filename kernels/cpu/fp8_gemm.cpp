#include "kernels/cpu/fp8_gemm.h"

#include <algorithm>
#include <array>
#include <vector>

#include "kernels/cpu/fp8_group.h"
#include "kernels/dtype.h"
#include "kernels/error.h"

namespace mla::cpu {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

const std::array<float, 256>& fp8_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int v = 0; v < 256; ++v) t[v] = fp8e4m3_to_f32(static_cast<uint8_t>(v));
    return t;
  }();
  return table;
}

}  // namespace

void quantize_rows_fp8(const float* x, int64_t m, int64_t k, int64_t ldx, int64_t group, uint8_t* q,
                       float* scales) {
  const int64_t groups = ceil_div(k, group);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t b = 0; b < groups; ++b) {
      const int64_t begin = b * group, end = std::min(k, begin + group);
      scales[i * groups + b] =
          quantize_group_fp8(x + i * ldx + begin, end - begin, q + i * k + begin);
    }
  }
}

void gemm_fp8_blockscaled(const Fp8GemmParams& p) {
  // Check sizes
  MLA_REQUIRE(p.m >= 0 && p.n >= 0 && p.k > 0 && p.group > 0,
              "fp8 gemm: m {}, n {}, k {}, group {} must be m, n >= 0 and k, group > 0", p.m, p.n,
              p.k, p.group);
  MLA_REQUIRE(p.ldx >= p.k && p.ldy >= p.n, "fp8 gemm: strides ldx {} < k {} or ldy {} < n {}",
              p.ldx, p.k, p.ldy, p.n);
  if (p.m == 0 || p.n == 0) return;

  const int64_t groups = ceil_div(p.k, p.group);
  std::vector<uint8_t> qx(p.m * p.k);
  std::vector<float> sx(p.m * groups);
  quantize_rows_fp8(p.x, p.m, p.k, p.ldx, p.group, qx.data(), sx.data());
  // The e4m3 values widen exactly; an e4m3 x e4m3 product is exact in fp32.
  const auto& value = fp8_values();
  std::vector<float> xs(p.m * p.k), wr(p.k);
  for (int64_t j = 0; j < p.m * p.k; ++j) xs[j] = value[qx[j]];
  for (int64_t r = 0; r < p.n; ++r) {
    const uint8_t* w = p.w + r * p.k;
    for (int64_t j = 0; j < p.k; ++j) wr[j] = value[w[j]];
    const float* sw = p.w_scale + r * groups;
    for (int64_t i = 0; i < p.m; ++i) {
      const float* xi = xs.data() + i * p.k;
      float acc = 0;
      for (int64_t b = 0; b < groups; ++b) {
        const int64_t begin = b * p.group, end = std::min(p.k, begin + p.group);
        float dot = 0;
        for (int64_t j = begin; j < end; ++j) dot += xi[j] * wr[j];
        acc += dot * (sx[i * groups + b] * sw[b]);
      }
      float& y = p.y[i * p.ldy + r];
      y = p.beta == 0.0f ? acc : acc + p.beta * y;
    }
  }
}

}  // namespace mla::cpu
