#include "rpc/generate_request.h"

#include <algorithm>

#include "kernels/error.h"
#include "rpc/request_limits.h"

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

}  // namespace mla
