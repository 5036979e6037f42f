// Absorption: the exact rewrites of MLA attention (docs/ARCHITECTURE.md section 5) and the cost
// model that picks one per sequence per step.
//
//   naive     : decompress every cached token, k = W_UK c, v = W_UV c, then MHA.
//   factored  : q~ = W_UK^T q_nope, attend over latents, o = W_UV o~, then W_o.
//   premerged : q~ = W_Q' q_in with W_Q'[h] = W_UK[h]^T W_q,nope[h];  out = W_O' o~ with
//               W_O'[h] = W_o[:, h] W_UV[h].  Matrices built once at load time.
//   auto      : per step and sequence, the cheaper of the latent form (factored or premerged
//               weights, whichever costs less, fixed at load) and the decompressed form.
//
// So every layer of every step runs each sequence in one of exactly two forms: latent (attend
// over the cached (c, k_r) with absorbed queries) or decompressed (up-project the cached
// latents to per-head keys and values, then plain attention).
#pragma once

#include <cstdint>
#include <string>

#include "runtime/model_config.h"
#include "runtime/model_weights.h"

namespace mla {

enum class AbsorbMode { kNaive, kFactored, kPremerged, kAuto };

// The form one sequence's attention runs in during one step.
enum class AttnForm { kDecompressed, kLatent };
inline constexpr int kNumAttnForms = 2;

// How a model holds the latent form's projections, fixed at load: W_UK and W_UV as row blocks
// of kv_b (factored), or the merged W_Q' and W_O' (premerged).
enum class LatentWeights { kFactored, kPremerged };

// What the cost model prices: the decompressed form, or the latent form with either weights.
enum class AttnPath { kDecompressed, kLatentFactored, kLatentPremerged };

AbsorbMode absorb_mode_from_string(const std::string& s);  // throws kInvalidArgument
std::string to_string(AbsorbMode m);
std::string to_string(AttnForm f);
std::string to_string(LatentWeights w);

// Per-layer cost of one sequence's attention on each path, in FLOPs plus weight bytes
// times `flops_per_byte` (the machine balance: a byte read costs that many FLOPs of time).
// Counts: projections from the query input and to the output, the up-projection of cached
// latents (decompressed form only), and the score/value products over `context` keys.
struct CostModel {
  // Default 8: roughly a CPU core's fp32 FLOP rate over its share of memory bandwidth.
  // An H100 in bf16 is nearer 300.
  double flops_per_byte = 8.0;
  // Bytes of each weight element as stored on the device that runs the step.
  double weight_bytes_per_element = 4.0;

  double cost(const ModelConfig& c, AttnPath path, int64_t new_tokens, int64_t context) const;
  double flops(const ModelConfig& c, AttnPath path, int64_t new_tokens, int64_t context) const;
  double weight_bytes(const ModelConfig& c, AttnPath path) const;
};

// Decides how a model loaded in `mode` holds its latent-form weights, and picks each
// sequence's form per step. Only forms the backend runs for the model's shapes are picked.
class FormPolicy {
 public:
  // `decompressed_unsupported`: empty when the backend runs the decompressed form for this
  // model's shapes, else why not (auto then always picks the latent form; naive, whose form it
  // is, throws kInvalidArgument with the reason). `fp8_weights_kept`: the linear weights stay
  // fp8 (Fp8Weights::kKeep); auto then holds the factored latent weights, since the premerged
  // matrices would be fp32 products of widened weights (more bytes, and products that no
  // longer quantise their activations as the fp8 model does).
  FormPolicy(const ModelConfig& config, AbsorbMode mode, CostModel cost,
             const std::string& decompressed_unsupported = "", bool fp8_weights_kept = false);

  AbsorbMode mode() const { return mode_; }
  LatentWeights latent_weights() const { return latent_weights_; }
  // Whether the load must build the premerged matrices.
  bool needs_premerged() const { return latent_weights_ == LatentWeights::kPremerged; }
  // The form for a chunk of `new_tokens` tokens whose last one sees `context` keys.
  AttnForm choose(int64_t new_tokens, int64_t context) const;

 private:
  AttnPath latent_path() const;

  ModelConfig config_;
  AbsorbMode mode_;
  CostModel cost_;
  LatentWeights latent_weights_;  // factored or premerged, whichever costs less per token
  bool decompressed_ok_;
};

// The premerged matrices of one layer's attention from its q_b, kv_b and o, for `local_heads`
// heads: W_Q'[h] = W_UK[h]^T W_q,nope[h], the rope rows of q_b, and W_O'[:, h] = W_o[:, h]
// W_UV[h]. fp32 on the host.
void build_premerged(const ModelConfig& c, int64_t local_heads, AttentionWeights& w);

}  // namespace mla
