// Absorption: the exact rewrites of MLA attention (docs/ARCHITECTURE.md section 5) and the cost
// model that picks one per sequence per step.
//
//   naive     : decompress every cached token, k = W_UK c, v = W_UV c, then MHA.
//   factored  : q~ = W_UK^T q_nope, attend over latents, o = W_UV o~, then W_o.
//   premerged : q~ = W_Q' q_in with W_Q'[h] = W_UK[h]^T W_q,nope[h];  out = W_O' o~ with
//               W_O'[h] = W_o[:, h] W_UV[h].  Matrices built once at load time.
//   auto      : per step and sequence, the cheapest of the forms whose weights are loaded.
#pragma once

#include <cstdint>
#include <string>

#include "runtime/model_config.h"

namespace mla {

enum class AbsorbMode { kNaive, kFactored, kPremerged, kAuto };

// The form one sequence's attention runs in during one step.
enum class AttnForm { kDecompressed, kLatentFactored, kLatentPremerged };
inline constexpr int kNumAttnForms = 3;

AbsorbMode absorb_mode_from_string(const std::string& s);  // throws kInvalidArgument
std::string to_string(AbsorbMode m);
std::string to_string(AttnForm f);

// Per-layer cost of one sequence's attention in each form, in FLOPs plus weight bytes
// times `flops_per_byte` (the machine balance: a byte read costs that many FLOPs of time).
// Counts: projections from the query input and to the output, the up-projection of cached
// latents (decompressed form only), and the score/value products over `context` keys.
struct CostModel {
  // Default 8: roughly a CPU core's fp32 FLOP rate over its share of memory bandwidth.
  // An H100 in bf16 is nearer 300.
  double flops_per_byte = 8.0;
  // Bytes of each weight element as stored on the device that runs the step.
  double weight_bytes_per_element = 4.0;

  double cost(const ModelConfig& c, AttnForm form, int64_t new_tokens, int64_t context) const;
  double flops(const ModelConfig& c, AttnForm form, int64_t new_tokens, int64_t context) const;
  double weight_bytes(const ModelConfig& c, AttnForm form) const;
};

// Decides which forms a model loaded in `mode` keeps weights for, and picks per step.
class FormPolicy {
 public:
  FormPolicy(const ModelConfig& config, AbsorbMode mode, CostModel cost);

  AbsorbMode mode() const { return mode_; }
  // Whether the load must build the premerged matrices / keep W_UK-W_UV views / kv_b.
  bool needs_premerged() const { return has_premerged_; }
  // The form for a chunk of `new_tokens` tokens whose last one sees `context` keys.
  AttnForm choose(int64_t new_tokens, int64_t context) const;

 private:
  ModelConfig config_;
  AbsorbMode mode_;
  CostModel cost_;
  AttnForm latent_form_;  // factored or premerged, whichever costs less per token
  bool has_premerged_;
};

}  // namespace mla
