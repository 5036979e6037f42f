// Request (what a caller asks for) and Sequence (the engine's running state of one request).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/latent_cache.h"
#include "runtime/sampler.h"

namespace mla {

using RequestId = uint64_t;

struct Request {
  std::vector<int32_t> prompt;    // token ids; must be non-empty and inside the vocabulary
  int32_t max_tokens = 16;        // tokens to generate at most. Default: 16.
  SamplingParams sampling;        // Default: greedy.
  std::vector<int32_t> stop_ids;  // generation stops after any of these. Default: none.
  bool ignore_eos = false;        // don't stop at the model's eos ids. Default: false.
  bool return_logits = false;     // keep each step's logits (tests, parity). Default: false.
};

enum class FinishReason { kNone, kStop, kLength, kCancelled };
const char* to_string(FinishReason r);

enum class SeqStatus { kWaiting, kRunning, kFinished };

// The state of one request inside an engine. `tokens` holds the prompt followed by every
// generated token; `num_computed` tokens have their latents in the cache. Preemption
// releases the pages and resets num_computed to 0 (the tokens are recomputed later).
struct Sequence {
  RequestId id = 0;
  Request request;
  std::vector<int32_t> tokens;
  int32_t prompt_len = 0;
  int32_t num_computed = 0;
  BlockTable table;
  SeqStatus status = SeqStatus::kWaiting;
  FinishReason finish = FinishReason::kNone;
  int32_t num_preemptions = 0;

  int32_t num_generated() const { return static_cast<int32_t>(tokens.size()) - prompt_len; }
  int32_t num_pending() const { return static_cast<int32_t>(tokens.size()) - num_computed; }
};

}  // namespace mla
