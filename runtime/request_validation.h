// Request validation: the one set of checks every entry point makes on a request (the
// engine, the worker service, the coordinator), with one message style: the field's name as
// the caller spelt it, a colon, what is wrong ("prompt_ids[3]: 900 is outside the vocabulary
// [0, 512)", "sampling.top_p: must be in (0, 1], got 1.5"). Every check throws
// kInvalidArgument. Stateless; thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "runtime/model_config.h"
#include "runtime/sequence.h"

namespace mla {

// What a request is checked against: the model that runs it.
struct ModelLimits {
  int64_t vocab_size = 0;
  int64_t max_context = 0;  // prompt + max_tokens at most, in tokens

  static ModelLimits of(const ModelConfig& config);
};

// The checks that need no model: the prompt is not empty, max_tokens >= 1, the sampling
// values are in range (SamplingParams::validate()). `prompt_field` names Request::prompt
// in messages (the gRPC API calls it prompt_ids).
void validate_request(const Request& request, std::string_view prompt_field = "prompt");

// All checks: the above, then every prompt and stop id inside the model's vocabulary,
// prompt + max_tokens within its context, and top_k within the vocabulary.
void validate_request(const Request& request, const ModelLimits& model,
                      std::string_view prompt_field = "prompt");

// Throws for the first id outside [0, vocab_size), naming it as `field`[index].
void check_token_ids(std::span<const int32_t> ids, std::string_view field, int64_t vocab_size);

}  // namespace mla
