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
  const double H = c.num_heads, dc = c.kv_lora_rank, dr = c.qk_rope_head_dim,
               dn = c.qk_nope_head_dim, dv = c.v_head_dim, D = c.hidden_size, qin = c.q_in_dim();
  // Keys seen, summed over the chunk's causal rows (each row sees at most `context`).
  const double pairs = n * L - n * (n - 1) / 2;
  switch (path) {
    case AttnPath::kDecompressed:
      return 2 * n * qin * H * (dn + dr)       // query projection
             + 2 * L * dc * H * (dn + dv)      // up-project every cached latent
             + 2 * pairs * H * (dn + dr + dv)  // scores and values
             + 2 * n * H * dv * D;             // W_o
    case AttnPath::kLatentFactored:
      return 2 * n * qin * H * (dn + dr)       // query projection
             + 2 * n * H * dn * dc             // absorb W_UK into the query
             + 2 * pairs * H * (dc + dr + dc)  // scores and values over latents
             + 2 * n * H * dc * dv             // W_UV
             + 2 * n * H * dv * D;             // W_o
    case AttnPath::kLatentPremerged:
      return 2 * n * qin * H * (dc + dr)       // W_Q' and the rope rows
             + 2 * pairs * H * (dc + dr + dc)  // scores and values over latents
             + 2 * n * H * dc * D;             // W_O'
  }
  return 0;
}

double CostModel::weight_bytes(const ModelConfig& c, AttnPath path) const {
  const double H = c.num_heads, dc = c.kv_lora_rank, dr = c.qk_rope_head_dim,
               dn = c.qk_nope_head_dim, dv = c.v_head_dim, D = c.hidden_size, qin = c.q_in_dim();
  double elements = 0;
  switch (path) {
    case AttnPath::kDecompressed:
    case AttnPath::kLatentFactored:
      elements = qin * H * (dn + dr) + H * (dn + dv) * dc + D * H * dv;
      break;
    case AttnPath::kLatentPremerged:
      elements = qin * H * (dc + dr) + D * H * dc;
      break;
  }
  return elements * weight_bytes_per_element;
}

double CostModel::cost(const ModelConfig& c, AttnPath path, int64_t new_tokens,
                       int64_t context) const {
  return flops(c, path, new_tokens, context) + flops_per_byte * weight_bytes(c, path);
}

FormPolicy::FormPolicy(const ModelConfig& config, AbsorbMode mode, CostModel cost,
                       const std::string& decompressed_unsupported)
    : config_(config),
      mode_(mode),
      cost_(cost),
      decompressed_ok_(decompressed_unsupported.empty()) {
  MLA_REQUIRE(mode != AbsorbMode::kNaive || decompressed_ok_,
              "absorption naive runs the decompressed form, which this backend cannot run for "
              "this model: {}; use factored, premerged or auto",
              decompressed_unsupported);
  // Premerged beats factored (or not) independently of context: both read the same latents.
  const bool premerged_cheaper = cost_.cost(config, AttnPath::kLatentPremerged, 1, 1) <
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
  const int64_t H = local_heads, dc = c.kv_lora_rank, dn = c.qk_nope_head_dim,
                dr = c.qk_rope_head_dim, dv = c.v_head_dim, D = c.hidden_size, qin = c.q_in_dim(),
                dqk = c.qk_head_dim();
  w.q_absorbed = Tensor::empty({H * dc, qin});
  w.q_rope = Tensor::empty({H * dr, qin});
  w.o_absorbed = Tensor::empty({D, H * dc});
  std::vector<float> uk_t(dc * dn);
  for (int64_t h = 0; h < H; ++h) {
    const float* w_uk = w.kv_b.f32() + h * (dn + dv) * dc;  // [d_n, d_c]
    const float* w_uv = w_uk + dn * dc;                     // [d_v, d_c]
    const float* q_nope = w.q_b.f32() + h * dqk * qin;      // [d_n, q_in]
    // W_Q'[h] [d_c, q_in] = W_UK[h]^T [d_c, d_n] * W_q,nope[h] [d_n, q_in]
    for (int64_t i = 0; i < dn; ++i)
      for (int64_t j = 0; j < dc; ++j) uk_t[j * dn + i] = w_uk[i * dc + j];
    cpu::matmul_nn(uk_t.data(), dc, dn, q_nope, qin, w.q_absorbed.f32() + h * dc * qin);
    std::memcpy(w.q_rope.f32() + h * dr * qin, q_nope + dn * qin, dr * qin * sizeof(float));
    // W_O'[:, h] [D, d_c] = W_o[:, h] [D, d_v] * W_UV[h] [d_v, d_c]
    cpu::gemm(false, D, dc, dv, w.o.f32() + h * dv, H * dv, w_uv, dc, w.o_absorbed.f32() + h * dc,
              H * dc);
  }
}

}  // namespace mla
