#include "runtime/absorption.h"

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
    case AttnForm::kLatentFactored:
      return "latent-factored";
    case AttnForm::kLatentPremerged:
      return "latent-premerged";
  }
  return "?";
}

double CostModel::flops(const ModelConfig& c, AttnForm form, int64_t new_tokens,
                        int64_t context) const {
  const double n = static_cast<double>(new_tokens), L = static_cast<double>(context);
  const double H = c.num_heads, dc = c.kv_lora_rank, dr = c.qk_rope_head_dim,
               dn = c.qk_nope_head_dim, dv = c.v_head_dim, D = c.hidden_size, qin = c.q_in_dim();
  // Keys seen, summed over the chunk's causal rows (each row sees at most `context`).
  const double pairs = n * L - n * (n - 1) / 2;
  switch (form) {
    case AttnForm::kDecompressed:
      return 2 * n * qin * H * (dn + dr)       // query projection
             + 2 * L * dc * H * (dn + dv)      // up-project every cached latent
             + 2 * pairs * H * (dn + dr + dv)  // scores and values
             + 2 * n * H * dv * D;             // W_o
    case AttnForm::kLatentFactored:
      return 2 * n * qin * H * (dn + dr)       // query projection
             + 2 * n * H * dn * dc             // absorb W_UK into the query
             + 2 * pairs * H * (dc + dr + dc)  // scores and values over latents
             + 2 * n * H * dc * dv             // W_UV
             + 2 * n * H * dv * D;             // W_o
    case AttnForm::kLatentPremerged:
      return 2 * n * qin * H * (dc + dr)       // W_Q' and the rope rows
             + 2 * pairs * H * (dc + dr + dc)  // scores and values over latents
             + 2 * n * H * dc * D;             // W_O'
  }
  return 0;
}

double CostModel::weight_bytes(const ModelConfig& c, AttnForm form) const {
  const double H = c.num_heads, dc = c.kv_lora_rank, dr = c.qk_rope_head_dim,
               dn = c.qk_nope_head_dim, dv = c.v_head_dim, D = c.hidden_size, qin = c.q_in_dim();
  double elements = 0;
  switch (form) {
    case AttnForm::kDecompressed:
    case AttnForm::kLatentFactored:
      elements = qin * H * (dn + dr) + H * (dn + dv) * dc + D * H * dv;
      break;
    case AttnForm::kLatentPremerged:
      elements = qin * H * (dc + dr) + D * H * dc;
      break;
  }
  return elements * weight_bytes_per_element;
}

double CostModel::cost(const ModelConfig& c, AttnForm form, int64_t new_tokens,
                       int64_t context) const {
  return flops(c, form, new_tokens, context) + flops_per_byte * weight_bytes(c, form);
}

FormPolicy::FormPolicy(const ModelConfig& config, AbsorbMode mode, CostModel cost)
    : config_(config), mode_(mode), cost_(cost) {
  // Premerged beats factored (or not) independently of context: both read the same latents.
  const bool premerged_cheaper = cost_.cost(config, AttnForm::kLatentPremerged, 1, 1) <
                                 cost_.cost(config, AttnForm::kLatentFactored, 1, 1);
  latent_form_ = mode == AbsorbMode::kPremerged || (mode == AbsorbMode::kAuto && premerged_cheaper)
                     ? AttnForm::kLatentPremerged
                     : AttnForm::kLatentFactored;
  has_premerged_ = latent_form_ == AttnForm::kLatentPremerged;
}

AttnForm FormPolicy::choose(int64_t new_tokens, int64_t context) const {
  switch (mode_) {
    case AbsorbMode::kNaive:
      return AttnForm::kDecompressed;
    case AbsorbMode::kFactored:
      return AttnForm::kLatentFactored;
    case AbsorbMode::kPremerged:
      return AttnForm::kLatentPremerged;
    case AbsorbMode::kAuto:
      break;
  }
  const double latent = cost_.cost(config_, latent_form_, new_tokens, context);
  const double decompressed = cost_.cost(config_, AttnForm::kDecompressed, new_tokens, context);
  return decompressed < latent ? AttnForm::kDecompressed : latent_form_;
}

}  // namespace mla
