#include "runtime/model_weights.h"

#include <cstring>

#include "kernels/dtype.h"
#include "kernels/error.h"

namespace mla {

LinearWeight::LinearWeight(Tensor e4m3, Tensor scales, int64_t columns_per_scale)
    : w(std::move(e4m3)), scale(std::move(scales)), group(columns_per_scale) {
  MLA_CHECK(w.dtype() == DType::kF8E4M3 && w.ndim() == 2 && scale.dtype() == DType::kF32 &&
                group > 0 && scale.ndim() == 2 && scale.dim(0) == w.dim(0) &&
                scale.dim(1) == (w.dim(1) + group - 1) / group,
            "fp8 weight {} with scales {} in groups of {}", shape_str(w.shape()),
            shape_str(scale.shape()), group);
}

const Tensor& LinearWeight::f32_weight() const {
  MLA_CHECK(!fp8(), "an fp8 weight {} read as fp32", shape_str(w.shape()));
  return w;
}

Tensor LinearWeight::widened() const {
  if (!fp8()) return w;
  const int64_t rows = out(), cols = in(), groups = scale.dim(1);
  Tensor out_t = Tensor::empty({rows, cols});
  const uint8_t* q = w.data<uint8_t>();
  const float* s = scale.f32();
  float* y = out_t.f32();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      y[r * cols + j] = fp8e4m3_to_f32(q[r * cols + j]) * s[r * groups + j / group];
    }
  }
  return out_t;
}

size_t LinearWeight::nbytes() const { return w.nbytes() + (fp8() ? scale.nbytes() : 0); }

namespace {
Tensor stack_rows(const Tensor& a, const Tensor& b) {
  Tensor out = Tensor::empty({a.dim(0) + b.dim(0), a.dim(1)}, a.dtype());
  std::memcpy(out.raw(), a.raw(), a.nbytes());
  std::memcpy(static_cast<char*>(out.raw()) + a.nbytes(), b.raw(), b.nbytes());
  return out;
}
}  // namespace

LinearWeight LinearWeight::concat_rows(const LinearWeight& a, const LinearWeight& b) {
  MLA_CHECK(a.in() == b.in() && a.fp8() == b.fp8() && a.group == b.group,
            "concatenating weights {} and {} of different kinds", shape_str(a.w.shape()),
            shape_str(b.w.shape()));
  if (!a.fp8()) return LinearWeight(stack_rows(a.w, b.w));
  return LinearWeight(stack_rows(a.w, b.w), stack_rows(a.scale, b.scale), a.group);
}

namespace {
size_t bytes(const Tensor& t) { return t.defined() ? t.nbytes() : 0; }
size_t bytes(const LinearWeight& w) { return w.defined() ? w.nbytes() : 0; }
size_t bytes(const MlpWeights& m) { return bytes(m.gate_up) + bytes(m.down); }
}  // namespace

size_t ModelWeights::nbytes() const {
  size_t n = bytes(embed) + bytes(final_norm) + (lm_head.raw() == embed.raw() ? 0 : bytes(lm_head));
  for (const LayerWeights& l : layers) {
    const AttentionWeights& a = l.attn;
    n += bytes(l.input_norm) + bytes(l.post_attn_norm) + bytes(a.q_a) + bytes(a.q_a_norm) +
         bytes(a.q_b) + bytes(a.kv_a) + bytes(a.kv_a_norm) + bytes(a.kv_b) + bytes(a.o) +
         bytes(a.q_absorbed) + bytes(a.q_rope) + bytes(a.o_absorbed) + bytes(l.mlp) +
         bytes(l.moe.gate) + bytes(l.moe.correction_bias) + bytes(l.moe.shared);
    for (const MlpWeights& e : l.moe.experts) n += bytes(e);
  }
  return n;
}

}  // namespace mla
