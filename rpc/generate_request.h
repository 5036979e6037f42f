// A Generate request on the wire (mlaserve.v1.GenerateRequest) as the engine's Request, and
// the wire checks the coordinator and the workers share. The request itself is checked by
// validate_request (runtime/request_validation.h), which names its fields as the proto does.
#pragma once

#include <string>

#include "mlaserve/v1/mlaserve.pb.h"
#include "runtime/sequence.h"
#include "runtime/tokenizer.h"

namespace mla {

// What Request::prompt is called on the wire, for validate_request's messages.
inline constexpr const char* kPromptField = "prompt_ids";

// The most top_logprobs a request may ask for.
inline constexpr int32_t kMaxTopLogprobs = 20;

// The Request that a GenerateRequest asks for, resume_ids aside: prompt_ids, max_tokens,
// sampling (top_p 0, proto3's unset value, means 1: off), stop_ids, ignore_eos, and
// return_logprobs as return_logits. Throws kInvalidArgument for top_logprobs outside 0 to
// kMaxTopLogprobs or without return_logprobs (the engine does not need them; the services do).
Request to_request(const mlaserve::v1::GenerateRequest& request);

// A text prompt (prompt) or a conversation (messages, through the tokenizer's chat template)
// becomes prompt_ids through `tokenizer` (null: the coordinator has none), and the stop strings
// are checked (at most 16, each 1 to 256 bytes of UTF-8); throws mla::Error naming the field:
// FAILED_PRECONDITION without a tokenizer, INVALID_ARGUMENT for the rest. The coordinator's.
void encode_text(mlaserve::v1::GenerateRequest& r, const Tokenizer* tokenizer,
                 size_t max_prompt_bytes);

// Throws kInvalidArgument ("request_id: ...") unless `id` has at most kMaxRequestIdLength
// characters, all printable ASCII.
void check_request_id(const std::string& id);

}  // namespace mla
