// ForwardBatch: the tokens one step runs through the model, and BatchLayout, what both backends
// derive from it before running it (validation, rows, forms), written once.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "parallel/communicator.h"
#include "runtime/absorption.h"
#include "runtime/latent_cache.h"
#include "runtime/model_config.h"

namespace mla {

// One sequence's slice of a step: `num_tokens` new tokens at positions
// [start, start + num_tokens), whose pages `table` already holds.
struct ForwardSeq {
  const BlockTable* table = nullptr;
  int32_t start = 0;
  int32_t num_tokens = 0;
  bool want_logits = false;  // return logits of the last new token
};

struct ForwardBatch {
  std::vector<int32_t> tokens;  // the new tokens of every sequence, concatenated in order
  std::vector<ForwardSeq> seqs;
};

// Work done by forward passes, for reports and for tests that check what ran.
struct WorkCounter {
  int64_t weight_flops = 0;        // products with weight matrices (projections, MLP, head)
  int64_t cache_upproj_flops = 0;  // up-projection of cached latents (decompressed form only)
  int64_t attention_flops = 0;     // score and value products over keys
  std::array<int64_t, kNumAttnForms> form_chunks{};  // sequence-steps per attention form
  CommStats comm;                                    // collectives issued by the forward passes
  void reset() { *this = WorkCounter{}; }
  void add(const WorkCounter& other);
  int64_t chunks(AttnForm form) const { return form_chunks[static_cast<int>(form)]; }
};

// A batch checked against the model and laid out in token rows: sequence i's tokens are rows
// [seq_begin[i], seq_begin[i] + num_tokens) and run in forms[i].
struct BatchLayout {
  int64_t num_tokens = 0;          // T
  int64_t num_logits = 0;          // sequences wanting logits
  std::vector<int64_t> seq_begin;  // [S]
  std::vector<AttnForm> forms;     // [S]
  bool any_latent = false, any_decompressed = false;
  bool all_single_token = true;  // every sequence runs one token (decode)

  // Checks the batch (throws kInternal naming the first broken invariant: an empty sequence,
  // pages that do not hold the step, token rows that do not add up, a token outside the
  // vocabulary), picks each sequence's form and counts them in `counter`.
  static BatchLayout of(const ForwardBatch& batch, const ModelConfig& config,
                        const FormPolicy& forms, WorkCounter& counter);
  // Whether every sequence runs one token in the latent form (the CUDA-graph path).
  bool pure_decode() const { return all_single_token && !any_decompressed && !forms.empty(); }
};

}  // namespace mla
