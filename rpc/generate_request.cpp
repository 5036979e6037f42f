#include "rpc/generate_request.h"

#include <algorithm>

#include "kernels/error.h"
#include "rpc/request_limits.h"
#include "runtime/utf8.h"

namespace mla {

Request to_request(const mlaserve::v1::GenerateRequest& r) {
  MLA_REQUIRE(r.top_logprobs() >= 0 && r.top_logprobs() <= kMaxTopLogprobs,
              "top_logprobs: must be 0 to {}, got {}", kMaxTopLogprobs, r.top_logprobs());
  MLA_REQUIRE(r.top_logprobs() == 0 || r.return_logprobs(), "top_logprobs: needs return_logprobs");
  Request out;
  out.prompt.assign(r.prompt_ids().begin(), r.prompt_ids().end());
  out.max_tokens = r.max_tokens();
  out.sampling.temperature = r.sampling().temperature();
  out.sampling.top_k = r.sampling().top_k();
  out.sampling.top_p = r.sampling().top_p() == 0 ? 1.0f : r.sampling().top_p();
  out.sampling.seed = r.sampling().seed();
  out.stop_ids.assign(r.stop_ids().begin(), r.stop_ids().end());
  out.ignore_eos = r.ignore_eos();
  out.return_logits = r.return_logprobs();
  return out;
}

void check_request_id(const std::string& id) {
  MLA_REQUIRE(id.size() <= kMaxRequestIdLength, "request_id: {} characters (limit {})", id.size(),
              kMaxRequestIdLength);
  MLA_REQUIRE(std::all_of(id.begin(), id.end(), [](char c) { return c >= 0x20 && c < 0x7f; }),
              "request_id: only printable ASCII characters are allowed");
}

namespace {
constexpr int kMaxStopStrings = 16;
constexpr size_t kMaxStopBytes = 256;
}  // namespace

void encode_text(mlaserve::v1::GenerateRequest& r, const Tokenizer* tokenizer,
                 size_t max_prompt_bytes) {
  const bool chat = r.messages_size() > 0;
  if (r.prompt().empty() && !chat && r.stop_size() == 0 && !r.return_text()) return;
  if (tokenizer == nullptr) {
    MLA_THROW(kFailedPrecondition,
              "{}: this coordinator has no tokenizer (set coordinator.tokenizer to the model "
              "directory); send prompt_ids",
              chat                  ? "messages"
              : !r.prompt().empty() ? "prompt"
              : r.stop_size() > 0   ? "stop"
                                    : "return_text");
  }
  MLA_REQUIRE(r.stop_size() <= kMaxStopStrings, "stop: {} strings (limit {})", r.stop_size(),
              kMaxStopStrings);
  for (int i = 0; i < r.stop_size(); ++i) {
    MLA_REQUIRE(!r.stop(i).empty() && r.stop(i).size() <= kMaxStopBytes,
                "stop[{}]: must be 1 to {} bytes, got {}", i, kMaxStopBytes, r.stop(i).size());
    MLA_REQUIRE(utf8::first_invalid(r.stop(i)) == std::string::npos, "stop[{}]: not UTF-8", i);
  }
  if (r.prompt().empty() && !chat) return;
  MLA_REQUIRE(r.prompt_ids_size() == 0 && (r.prompt().empty() || !chat),
              "{}: give one of prompt, prompt_ids and messages", chat ? "messages" : "prompt");
  std::vector<int32_t> ids;
  if (chat) {
    nlohmann::ordered_json messages = nlohmann::ordered_json::array();
    size_t bytes = 0;
    for (int i = 0; i < r.messages_size(); ++i) {
      const mlaserve::v1::ChatMessage& m = r.messages(i);
      MLA_REQUIRE(utf8::first_invalid(m.content()) == std::string::npos,
                  "messages[{}].content: not UTF-8", i);
      bytes += m.content().size();
      messages.push_back({{"role", m.role()}, {"content", m.content()}});
    }
    MLA_REQUIRE(bytes <= max_prompt_bytes, "messages: {} bytes of content (limit {})", bytes,
                max_prompt_bytes);
    ids = tokenizer->encode_chat(messages);
  } else {
    MLA_REQUIRE(r.prompt().size() <= max_prompt_bytes, "prompt: {} bytes (limit {})",
                r.prompt().size(), max_prompt_bytes);
    try {
      ids = tokenizer->encode(r.prompt());
    } catch (const Error& e) {
      MLA_THROW(kInvalidArgument, "prompt: {}", e.what());
    }
  }
  r.mutable_prompt_ids()->Assign(ids.begin(), ids.end());
}

}  // namespace mla
