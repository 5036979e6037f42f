#include "runtime/absorption.h"

#include <cstring>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/error.h"

namespace mla {

AbsorbMode absorb_mode_from_string(const std::string& s) {
  if (s == "naive") return AbsorbMode::kNaive;
  if (s == "factored") return AbsorbMode::kFactored;
  if (s == "premerged") return AbsorbMode::kPremerged;
  if (s == "auto") return AbsorbMode::kAuto;
  MLA_THROW(kInvalidArgument, "unknown absorption mode `{}` (naive, factored, premerged, auto)", s);
}

std::string to_string(AbsorbMode m) {
  switch (m) {
    case AbsorbMode::kNaive:
      return "naive";
    case AbsorbMode::kFactored:
      return "factored";
    case AbsorbMode::kPremerged:
      return "premerged";
    case AbsorbMode::kAuto:
      return "auto";
  }
  return "?";
}

std::string to_string(AttnForm f) {
  switch (f) {
    case AttnForm::kDecompressed:
      return "decompressed";
    case AttnForm::kLatent:
      return "latent";
  }
  return "?";
}

std::string to_string(LatentWeights w) {
  return w == LatentWeights::kPremerged ? "premerged" : "factored";
}

double CostModel::flops(const ModelConfig& c, AttnPath path, int64_t new_tokens,
                        int64_t context) const {
  const double n = static_cast<double>(new_tokens), L = static_cast<double>(context);
  const double H = c.num_heads, d_c = c.kv_lora_rank, d_r = c.qk_rope_head_dim,
               d_n = c.qk_nope_head_dim, d_v = c.v_head_dim, D = c.hidden_size, q_in = c.q_in_dim();
  // Keys seen, summed over the chunk's causal rows (each row sees at most `context`).
  const double pairs = n * L - n * (n - 1) / 2;
  switch (path) {
    case AttnPath::kDecompressed:
      return 2 * n * q_in * H * (d_n + d_r)       // query projection
             + 2 * L * d_c * H * (d_n + d_v)      // up-project every cached latent
             + 2 * pairs * H * (d_n + d_r + d_v)  // scores and values
             + 2 * n * H * d_v * D;               // W_o
    case AttnPath::kLatentFactored:
      return 2 * n * q_in * H * (d_n + d_r)       // query projection
             + 2 * n * H * d_n * d_c              // absorb W_UK into the query
             + 2 * pairs * H * (d_c + d_r + d_c)  // scores and values over latents
             + 2 * n * H * d_c * d_v              // W_UV
             + 2 * n * H * d_v * D;               // W_o
    case AttnPath::kLatentPremerged:
      return 2 * n * q_in * H * (d_c + d_r)       // W_Q' and the rope rows
             + 2 * pairs * H * (d_c + d_r + d_c)  // scores and values over latents
             + 2 * n * H * d_c * D;               // W_O'
  }
  return 0;
}

double CostModel::weight_bytes(const ModelConfig& c, AttnPath path) const {
  const double H = c.num_heads, d_c = c.kv_lora_rank, d_r = c.qk_rope_head_dim,
               d_n = c.qk_nope_head_dim, d_v = c.v_head_dim, D = c.hidden_size, q_in = c.q_in_dim();
  double elements = 0;
  switch (path) {
    case AttnPath::kDecompressed:
    case AttnPath::kLatentFactored:
      elements = q_in * H * (d_n + d_r) + H * (d_n + d_v) * d_c + D * H * d_v;
      break;
    case AttnPath::kLatentPremerged:
      elements = q_in * H * (d_c + d_r) + D * H * d_c;
      break;
  }
  return elements * weight_bytes_per_element;
}

double CostModel::cost(const ModelConfig& c, AttnPath path, int64_t new_tokens,
                       int64_t context) const {
  return flops(c, path, new_tokens, context) + flops_per_byte * weight_bytes(c, path);
}

FormPolicy::FormPolicy(const ModelConfig& config, AbsorbMode mode, CostModel cost,
                       const std::string& decompressed_unsupported, bool fp8_weights_kept)
    : config_(config),
      mode_(mode),
      cost_(cost),
      decompressed_ok_(decompressed_unsupported.empty()) {
  MLA_REQUIRE(mode != AbsorbMode::kNaive || decompressed_ok_,
              "absorption naive runs the decompressed form, which this backend cannot run for "
              "this model: {}; use factored, premerged or auto",
              decompressed_unsupported);
  // Premerged beats factored (or not) independently of context: both read the same latents.
  const bool premerged_cheaper =
      !fp8_weights_kept && cost_.cost(config, AttnPath::kLatentPremerged, 1, 1) <
                               cost_.cost(config, AttnPath::kLatentFactored, 1, 1);
  latent_weights_ =
      mode == AbsorbMode::kPremerged || (mode == AbsorbMode::kAuto && premerged_cheaper)
          ? LatentWeights::kPremerged
          : LatentWeights::kFactored;
}

AttnPath FormPolicy::latent_path() const {
  return latent_weights_ == LatentWeights::kPremerged ? AttnPath::kLatentPremerged
                                                      : AttnPath::kLatentFactored;
}

AttnForm FormPolicy::choose(int64_t new_tokens, int64_t context) const {
  switch (mode_) {
    case AbsorbMode::kNaive:
      return AttnForm::kDecompressed;
    case AbsorbMode::kFactored:
    case AbsorbMode::kPremerged:
      return AttnForm::kLatent;
    case AbsorbMode::kAuto:
      break;
  }
  if (!decompressed_ok_) return AttnForm::kLatent;
  const double latent = cost_.cost(config_, latent_path(), new_tokens, context);
  const double decompressed = cost_.cost(config_, AttnPath::kDecompressed, new_tokens, context);
  return decompressed < latent ? AttnForm::kDecompressed : AttnForm::kLatent;
}

void build_premerged(const ModelConfig& c, int64_t local_heads, AttentionWeights& w) {
  const int64_t H_l = local_heads, d_c = c.kv_lora_rank, d_n = c.qk_nope_head_dim,
                d_r = c.qk_rope_head_dim, d_v = c.v_head_dim, D = c.hidden_size,
                q_in = c.q_in_dim(), d_qk = c.qk_head_dim();
  w.q_absorbed = Tensor::empty({H_l * d_c, q_in});
  w.q_rope = Tensor::empty({H_l * d_r, q_in});
  w.o_absorbed = Tensor::empty({D, H_l * d_c});
  std::vector<float> uk_t(d_c * d_n);
  // The merged matrices are fp32 whatever the checkpoint stores (fp8 weights are widened here).
  const Tensor q_b = w.q_b.widened(), o = w.o.widened();
  for (int64_t h = 0; h < H_l; ++h) {
    const float* w_uk = w.kv_b.f32() + h * (d_n + d_v) * d_c;  // [d_n, d_c]
    const float* w_uv = w_uk + d_n * d_c;                      // [d_v, d_c]
    const float* q_nope = q_b.f32() + h * d_qk * q_in;         // [d_n, q_in]
    // W_Q'[h] [d_c, q_in] = W_UK[h]^T [d_c, d_n] * W_q,nope[h] [d_n, q_in]
    for (int64_t i = 0; i < d_n; ++i)
      for (int64_t j = 0; j < d_c; ++j) uk_t[j * d_n + i] = w_uk[i * d_c + j];
    cpu::matmul_nn(uk_t.data(), d_c, d_n, q_nope, q_in, w.q_absorbed.f32() + h * d_c * q_in);
    std::memcpy(w.q_rope.f32() + h * d_r * q_in, q_nope + d_n * q_in, d_r * q_in * sizeof(float));
    // W_O'[:, h] [D, d_c] = W_o[:, h] [D, d_v] * W_UV[h] [d_v, d_c]
    cpu::gemm(false, D, d_c, d_v, o.f32() + h * d_v, H_l * d_v, w_uv, d_c,
              w.o_absorbed.f32() + h * d_c, H_l * d_c);
  }
}

}  // namespace mla
