// OpenAiApi: the coordinator's OpenAI-compatible HTTP API, on an HttpServer
// (rpc/http_server.h): POST /v1/completions, POST /v1/chat/completions (whole, or streamed as
// server-sent events ending with `data: [DONE]`), GET /v1/models and /v1/models/{id}.
//
// Each request becomes one Generate call on the coordinator's own gRPC service, through its
// in-process channel: routing, admission, failover and migration are exactly gRPC's. The text
// goes through the coordinator's tokenizer: a chat is rendered with its chat_template
// (runtime/chat_template.h) and encoded here, so that the prompt's length is known (the default
// max_tokens of a chat is what the context leaves); the generated text comes back from the
// coordinator (return_text), stop strings matched there across tokens.
//
// Fields: model (must be the served name), messages / prompt (a string, one string in a list,
// or token ids), max_tokens and max_completion_tokens (completions default to 16, chats to
// what the context leaves), temperature, top_p, top_k, seed, stop (a string or up to 16),
// n (1 only), stream, stream_options.include_usage, logprobs (chat: true/false; completions:
// how many alternatives, 0 to 5), top_logprobs (chat: 0 to 20 alternatives per token; the
// log-probabilities are of the raw logits, temperature 1), ignore_eos; presence_penalty,
// frequency_penalty and logit_bias only at their neutral values; user is ignored. Anything
// else of a known name with an unsupported value is a 400 naming it; unknown fields are
// ignored, as OpenAI clients send fields servers may not know.
//
// Errors are OpenAI's error object ({"error": {"message", "type", "param", "code"}}) with the
// HTTP status: 400 for a bad field (naming it: malformed JSON, wrong types, unknown roles,
// empty messages, prompts over the context, invalid UTF-8), 401 without the API key when one is
// configured, 404 for an unknown model or route, 405 for a wrong method, 413 for a body over
// the limit, 429 when admission refuses, 503 when no worker is alive. An error after a stream
// has begun is sent as an SSE event with the error object, then [DONE]. A client that
// disconnects cancels its request (the worker frees its pages at once).
//
// Thread safety: handle() is called by the HttpServer's threads; everything is safe
// concurrently. Lifetime: call shutdown() (new requests get 503, open ones are cancelled) and
// wait_idle() before the coordinator's gRPC server shuts down.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "mlaserve/v1/mlaserve.grpc.pb.h"
#include "rpc/http_server.h"
#include "runtime/request_validation.h"
#include "runtime/tokenizer.h"

namespace mla {

struct OpenAiOptions {
  std::string model_name;  // the id clients name in `model` (GET /v1/models lists it)
  std::string api_key;     // when not empty, requests need "Authorization: Bearer <key>"
};

class OpenAiApi {
 public:
  // `channel` reaches the Coordinator service; `limits` tells the live model's context (none
  // while no worker is alive).
  OpenAiApi(OpenAiOptions options, std::shared_ptr<grpc::Channel> channel,
            std::shared_ptr<const Tokenizer> tokenizer,
            std::function<std::optional<ModelLimits>()> limits);
  ~OpenAiApi();

  // The HttpHandler.
  void handle(HttpRequest request, std::shared_ptr<HttpExchange> exchange);

  // New requests answer 503; open ones are cancelled. Idempotent.
  void shutdown();
  // Waits until no call is open or `timeout` passes; true when none is.
  bool wait_idle(std::chrono::milliseconds timeout);
  // Calls open now.
  size_t open_calls() const;

  struct Shared;  // what the calls share (the stub, the tokenizer, the count of open calls)

 private:
  std::shared_ptr<Shared> shared_;
};

}  // namespace mla
