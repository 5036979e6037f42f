#include "runtime/request_validation.h"

#include "kernels/error.h"

namespace mla {

ModelLimits ModelLimits::of(const ModelConfig& config) {
  return {.vocab_size = config.vocab_size, .max_context = config.max_position_embeddings};
}

void validate_request(const Request& r, std::string_view prompt_field) {
  MLA_REQUIRE(!r.prompt.empty(), "{}: must not be empty", prompt_field);
  MLA_REQUIRE(r.max_tokens >= 1, "max_tokens: must be >= 1, got {}", r.max_tokens);
  r.sampling.validate();
}

void validate_request(const Request& r, const ModelLimits& model, std::string_view prompt_field) {
  validate_request(r, prompt_field);
  check_token_ids(r.prompt, prompt_field, model.vocab_size);
  check_token_ids(r.stop_ids, "stop_ids", model.vocab_size);
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_tokens;
  MLA_REQUIRE(total <= model.max_context,
              "max_tokens: {} ({} tokens) + max_tokens ({}) = {} exceeds the model's context of {}",
              prompt_field, r.prompt.size(), r.max_tokens, total, model.max_context);
  r.sampling.validate(model.vocab_size);
}

void check_token_ids(std::span<const int32_t> ids, std::string_view field, int64_t vocab_size) {
  for (size_t i = 0; i < ids.size(); ++i) {
    MLA_REQUIRE(ids[i] >= 0 && ids[i] < vocab_size, "{}[{}]: {} is outside the vocabulary [0, {})",
                field, i, ids[i], vocab_size);
  }
}

}  // namespace mla
