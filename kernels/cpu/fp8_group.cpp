#include "kernels/cpu/fp8_group.h"

#include <algorithm>
#include <cmath>

#include "kernels/dtype.h"

namespace mla::cpu {

float quantize_group_fp8(const float* x, int64_t n, uint8_t* q) {
  float amax = 0;
  for (int64_t j = 0; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float scale = amax > 0 ? amax / kFp8Max : 1.0f;
  for (int64_t j = 0; j < n; ++j) q[j] = f32_to_fp8e4m3(x[j] / scale);
  return scale;
}

}  // namespace mla::cpu
