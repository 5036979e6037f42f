#include "rpc/openai_api.h"

#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>
#include <random>
#include <utility>
#include <vector>

#include "kernels/error.h"
#include "rpc/shared_secret.h"
#include "runtime/utf8.h"

namespace mla {

namespace v1 = mlaserve::v1;
using json = nlohmann::ordered_json;

namespace {

constexpr int kMaxStop = 16;

// A refusal: the HTTP status, OpenAI's error type, the field it names and the message.
struct ApiError {
  int status;
  std::string type;
  std::string param;
  std::string message;
  std::string code;
};

[[noreturn]] void bad(const std::string& param, const std::string& message) {
  throw ApiError{400, "invalid_request_error", param, param + ": " + message, ""};
}

std::string error_json(const ApiError& e) {
  json err = {{"message", e.message},
              {"type", e.type},
              {"param", e.param.empty() ? json(nullptr) : json(e.param)},
              {"code", e.code.empty() ? json(nullptr) : json(e.code)}};
  return json{{"error", err}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

void send_error(HttpExchange& exchange, const ApiError& e) {
  exchange.respond(e.status, "application/json", error_json(e));
}

// gRPC's answer as OpenAI's error: the status, and the field when the message names one
// ("max_tokens: ...").
ApiError from_grpc(const grpc::Status& s) {
  ApiError e{500, "internal_error", "", s.error_message(), ""};
  switch (s.error_code()) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE:
      e.status = 400, e.type = "invalid_request_error";
      break;
    case grpc::StatusCode::NOT_FOUND:
      e.status = 404, e.type = "not_found_error";
      break;
    case grpc::StatusCode::ALREADY_EXISTS:
      e.status = 409, e.type = "invalid_request_error";
      break;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      e.status = 429, e.type = "rate_limit_error";
      break;
    case grpc::StatusCode::UNAVAILABLE:
      e.status = 503, e.type = "service_unavailable";
      break;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      e.status = 504, e.type = "timeout";
      break;
    case grpc::StatusCode::UNAUTHENTICATED:
      e.status = 401, e.type = "authentication_error";
      break;
    case grpc::StatusCode::PERMISSION_DENIED:
      e.status = 403, e.type = "permission_error";
      break;
    default:
      break;
  }
  if (e.status == 400) {
    const std::string& m = s.error_message();
    const size_t colon = m.find(':');
    if (colon != std::string::npos && colon > 0 &&
        m.find_first_not_of("abcdefghijklmnopqrstuvwxyz_[]0123456789.") >= colon) {
      e.param = m.substr(0, colon);
      if (e.param == "prompt_ids") e.param = "prompt";
    }
  }
  return e;
}

// --- reading the body ---

// The body as JSON. Invalid UTF-8 is named by the field that holds it: the body is read with
// each bad sequence replaced by U+FFFD, and the first string that gained one is named.
json parse_body(const std::string& body) {
  const size_t bad_at = utf8::first_invalid(body);
  const std::string& text = bad_at == std::string::npos ? body : utf8::lossy(body);
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw ApiError{400, "invalid_request_error", "",
                   std::string("malformed JSON body: ") + e.what(), ""};
  }
  if (!j.is_object()) {
    throw ApiError{400, "invalid_request_error", "",
                   std::string("the body must be a JSON object, got ") + j.type_name(), ""};
  }
  if (bad_at != std::string::npos) {
    std::function<std::string(const json&, const std::string&)> find =
        [&](const json& v, const std::string& path) -> std::string {
      if (v.is_string()) {
        return v.get_ref<const std::string&>().find(utf8::kReplacement) != std::string::npos ? path
                                                                                             : "";
      }
      if (v.is_array()) {
        for (size_t i = 0; i < v.size(); ++i)
          if (auto p = find(v[i], fmt::format("{}[{}]", path, i)); !p.empty()) return p;
      }
      if (v.is_object()) {
        for (const auto& [k, e] : v.items())
          if (auto p = find(e, path.empty() ? k : path + "." + k); !p.empty()) return p;
      }
      return "";
    };
    const std::string where = find(j, "");
    bad(where.empty() ? "body" : where,
        fmt::format("not valid UTF-8 (byte {} of the body)", bad_at));
  }
  return j;
}

const json* field(const json& obj, const char* name) {
  const auto it = obj.find(name);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

std::optional<int64_t> get_int(const json& obj, const char* name) {
  const json* v = field(obj, name);
  if (v == nullptr) return std::nullopt;
  if (v->is_number_integer()) return v->get<int64_t>();
  if (v->is_number_float() &&
      v->get<double>() == static_cast<double>(static_cast<int64_t>(v->get<double>())))
    return static_cast<int64_t>(v->get<double>());
  bad(name, fmt::format("expected an integer, got {}", v->type_name()));
}

std::optional<double> get_number(const json& obj, const char* name) {
  const json* v = field(obj, name);
  if (v == nullptr) return std::nullopt;
  if (!v->is_number()) bad(name, fmt::format("expected a number, got {}", v->type_name()));
  return v->get<double>();
}

std::optional<bool> get_bool(const json& obj, const char* name) {
  const json* v = field(obj, name);
  if (v == nullptr) return std::nullopt;
  if (!v->is_boolean()) bad(name, fmt::format("expected a boolean, got {}", v->type_name()));
  return v->get<bool>();
}

// --- what a request asks for ---

struct Call;

enum class Api { kCompletions, kChat };

struct Wanted {
  Api api;
  bool stream = false;
  bool include_usage = false;
  bool logprobs = false;
  int32_t top_logprobs = 0;  // alternatives per token, with logprobs
  int32_t prompt_tokens = 0;
  v1::GenerateRequest request;
};

// Fields both APIs share: sampling, stop, n, stream, logprobs, penalties.
void read_common(const json& b, Api api, Wanted& w) {
  v1::GenerateRequest& r = w.request;
  const double temperature = get_number(b, "temperature").value_or(1.0);
  if (temperature < 0 || temperature > 2)
    bad("temperature", fmt::format("must be in [0, 2], got {}", temperature));
  r.mutable_sampling()->set_temperature(static_cast<float>(temperature));
  const double top_p = get_number(b, "top_p").value_or(1.0);
  if (!(top_p > 0 && top_p <= 1)) bad("top_p", fmt::format("must be in (0, 1], got {}", top_p));
  r.mutable_sampling()->set_top_p(static_cast<float>(top_p));
  const int64_t top_k = get_int(b, "top_k").value_or(0);
  if (top_k < -1) bad("top_k", fmt::format("must be -1 or 0 (off) or positive, got {}", top_k));
  r.mutable_sampling()->set_top_k(static_cast<int32_t>(std::max<int64_t>(top_k, 0)));
  if (const auto seed = get_int(b, "seed")) {
    r.mutable_sampling()->set_seed(static_cast<uint64_t>(*seed));
  } else {
    // Without a seed, two equal requests should differ, as OpenAI's do.
    static thread_local std::mt19937_64 rng(std::random_device{}());
    r.mutable_sampling()->set_seed(rng());
  }
  if (const json* stop = field(b, "stop")) {
    std::vector<std::string> stops;
    if (stop->is_string()) {
      stops.push_back(stop->get<std::string>());
    } else if (stop->is_array()) {
      if (stop->size() > kMaxStop)
        bad("stop", fmt::format("at most {} strings, got {}", kMaxStop, stop->size()));
      for (size_t i = 0; i < stop->size(); ++i) {
        if (!(*stop)[i].is_string()) bad(fmt::format("stop[{}]", i), "expected a string");
        stops.push_back((*stop)[i].get<std::string>());
      }
    } else {
      bad("stop", fmt::format("expected a string or a list of strings, got {}", stop->type_name()));
    }
    for (size_t i = 0; i < stops.size(); ++i) {
      if (stops[i].empty())
        bad(stop->is_string() ? "stop" : fmt::format("stop[{}]", i), "must not be empty");
      r.add_stop(stops[i]);
    }
  }
  if (const auto n = get_int(b, "n"); n && *n != 1)
    bad("n", fmt::format("only n = 1 is supported, got {}", *n));
  if (const auto best_of = get_int(b, "best_of"); best_of && *best_of != 1)
    bad("best_of", "only 1 is supported");
  w.stream = get_bool(b, "stream").value_or(false);
  if (const json* so = field(b, "stream_options")) {
    if (!so->is_object())
      bad("stream_options", fmt::format("expected an object, got {}", so->type_name()));
    if (!w.stream) bad("stream_options", "only allowed with stream: true");
    w.include_usage = get_bool(*so, "include_usage").value_or(false);
  }
  if (api == Api::kChat) {
    w.logprobs = get_bool(b, "logprobs").value_or(false);
    if (const auto top = get_int(b, "top_logprobs"); top && *top != 0) {
      if (*top < 0 || *top > 20)
        bad("top_logprobs", fmt::format("must be in [0, 20], got {}", *top));
      if (!w.logprobs) bad("top_logprobs", "needs logprobs: true");
      w.top_logprobs = static_cast<int32_t>(*top);
    }
  } else if (const auto lp = get_int(b, "logprobs")) {
    if (*lp < 0 || *lp > 5) bad("logprobs", fmt::format("must be in [0, 5], got {}", *lp));
    w.logprobs = true;
    w.top_logprobs = static_cast<int32_t>(*lp);
  }
  r.set_return_logprobs(w.logprobs);
  r.set_top_logprobs(w.top_logprobs);
  for (const char* penalty : {"presence_penalty", "frequency_penalty"}) {
    if (const auto p = get_number(b, penalty); p && *p != 0) bad(penalty, "only 0 is supported");
  }
  if (const json* lb = field(b, "logit_bias"); lb && !(lb->is_object() && lb->empty()))
    bad("logit_bias", "not supported");
  if (const json* tools = field(b, "tools"); tools && !(tools->is_array() && tools->empty()))
    bad("tools", "not supported");
  if (const json* rf = field(b, "response_format")) {
    if (!rf->is_object() || rf->value("type", "") != "text")
      bad("response_format", "only {\"type\": \"text\"} is supported");
  }
  r.set_ignore_eos(get_bool(b, "ignore_eos").value_or(false));
  if (const auto echo = get_bool(b, "echo"); echo && *echo) bad("echo", "not supported");
  if (field(b, "suffix") != nullptr) bad("suffix", "not supported");
}

// messages as the chat template takes them: roles checked, developer as system, content as
// one string (text parts joined by newlines, as vLLM does).
json read_messages(const json& b) {
  const json* messages = field(b, "messages");
  if (messages == nullptr) bad("messages", "required");
  if (!messages->is_array())
    bad("messages", fmt::format("expected a list, got {}", messages->type_name()));
  if (messages->empty()) bad("messages", "must not be empty");
  json out = json::array();
  for (size_t i = 0; i < messages->size(); ++i) {
    const json& m = (*messages)[i];
    const std::string at = fmt::format("messages[{}]", i);
    if (!m.is_object()) bad(at, fmt::format("expected an object, got {}", m.type_name()));
    const json* role = field(m, "role");
    if (role == nullptr) bad(at + ".role", "required");
    if (!role->is_string())
      bad(at + ".role", fmt::format("expected a string, got {}", role->type_name()));
    std::string r = role->get<std::string>();
    if (r == "developer") r = "system";
    if (r != "system" && r != "user" && r != "assistant" && r != "tool") {
      bad(at + ".role", fmt::format("unknown role '{}' (system, developer, user, assistant, tool)",
                                    role->get<std::string>()));
    }
    json message = m;
    message["role"] = r;
    const json* content = field(m, "content");
    if (content == nullptr) {
      if (!(r == "assistant" && field(m, "tool_calls") != nullptr))
        bad(at + ".content", "required");
      message["content"] = nullptr;
    } else if (content->is_string()) {
      message["content"] = *content;
    } else if (content->is_array()) {
      std::string text;
      for (size_t j = 0; j < content->size(); ++j) {
        const json& part = (*content)[j];
        const std::string pat = fmt::format("{}.content[{}]", at, j);
        if (!part.is_object()) bad(pat, "expected an object");
        if (part.value("type", "") != "text") bad(pat + ".type", "only text parts are supported");
        const json* t = field(part, "text");
        if (t == nullptr || !t->is_string()) bad(pat + ".text", "expected a string");
        if (j > 0) text += "\n";
        text += t->get<std::string>();
      }
      message["content"] = text;
    } else {
      bad(at + ".content",
          fmt::format("expected a string or a list of parts, got {}", content->type_name()));
    }
    out.push_back(std::move(message));
  }
  return out;
}

std::vector<int32_t> read_prompt(const json& b, const Tokenizer& tok) {
  const json* prompt = field(b, "prompt");
  if (prompt == nullptr) bad("prompt", "required");
  auto ids_of = [](const json& list, const std::string& at) {
    std::vector<int32_t> ids;
    for (size_t i = 0; i < list.size(); ++i) {
      if (!list[i].is_number_integer()) bad(fmt::format("{}[{}]", at, i), "expected a token id");
      const int64_t id = list[i].get<int64_t>();
      if (id < 0 || id > INT32_MAX)
        bad(fmt::format("{}[{}]", at, i), fmt::format("token id {} out of range", id));
      ids.push_back(static_cast<int32_t>(id));
    }
    return ids;
  };
  if (prompt->is_string()) return tok.encode(prompt->get<std::string>(), true);
  if (!prompt->is_array())
    bad("prompt", fmt::format("expected a string or a list, got {}", prompt->type_name()));
  if (prompt->empty()) bad("prompt", "must not be empty");
  if ((*prompt)[0].is_number_integer()) return ids_of(*prompt, "prompt");
  if (prompt->size() != 1)
    bad("prompt", fmt::format("one prompt per request, got {}", prompt->size()));
  if ((*prompt)[0].is_string()) return tok.encode((*prompt)[0].get<std::string>(), true);
  if ((*prompt)[0].is_array()) {
    if ((*prompt)[0].empty()) bad("prompt[0]", "must not be empty");
    return ids_of((*prompt)[0], "prompt[0]");
  }
  bad("prompt[0]", "expected a string or token ids");
}

std::string random_id() {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  return fmt::format("{:016x}{:08x}", rng(), static_cast<uint32_t>(rng()));
}

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

const char* finish_reason(v1::FinishReason r) {
  switch (r) {
    case v1::FINISH_REASON_STOP:
      return "stop";
    case v1::FINISH_REASON_LENGTH:
      return "length";
    case v1::FINISH_REASON_CANCELLED:
      return "abort";
    default:
      return nullptr;
  }
}

}  // namespace

struct OpenAiApi::Shared {
  OpenAiOptions options;
  std::unique_ptr<v1::Coordinator::Stub> stub;
  std::shared_ptr<const Tokenizer> tokenizer;
  std::function<std::optional<ModelLimits>()> limits;
  int64_t created = unix_now();
  mutable std::mutex mu;
  std::condition_variable idle;
  bool stopping = false;                   // guarded by mu
  std::vector<std::weak_ptr<Call>> calls;  // guarded by mu: open ones, for shutdown
  size_t open = 0;                         // guarded by mu

  json model_json() const {
    json m = {{"id", options.model_name},
              {"object", "model"},
              {"created", created},
              {"owned_by", "mlaserve"}};
    if (const auto l = limits()) m["max_model_len"] = l->max_context;
    return m;
  }
};

namespace {

// One Generate call on behalf of one HTTP request: relays the coordinator's messages as
// OpenAI's chunks (streaming) or gathers them into one answer.
struct Call : grpc::ClientReadReactor<v1::GenerateResponse>, std::enable_shared_from_this<Call> {
  Call(std::shared_ptr<OpenAiApi::Shared> shared, std::shared_ptr<HttpExchange> exchange,
       Wanted wanted, std::string id)
      : shared_(std::move(shared)),
        exchange_(std::move(exchange)),
        w_(std::move(wanted)),
        id_(std::move(id)),
        created_(unix_now()) {}

  void start() {
    self_ = shared_from_this();
    std::weak_ptr<Call> weak = self_;
    exchange_->on_close([weak] {
      if (auto call = weak.lock()) call->context_.TryCancel();
    });
    shared_->stub->async()->Generate(&context_, &w_.request, this);
    // Reads are also started from the HTTP side (once a chunk is written), outside this
    // reactor's reactions: the hold keeps the call from finishing until no read will follow.
    AddHold();
    StartRead(&response_);
    StartCall();
  }

  void cancel() { context_.TryCancel(); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      RemoveHold();  // no read follows: OnDone may come
      return;
    }
    const v1::GenerateResponse& r = response_;
    text_ += r.text();
    for (int i = 0; i < r.token_ids_size(); ++i) {
      ids_.push_back(r.token_ids(i));
      if (i < r.logprobs_size()) logprobs_.push_back(r.logprobs(i));
      if (w_.top_logprobs > 0) {
        top_.push_back(i < r.top_logprobs_size() ? r.top_logprobs(i) : v1::TopLogprobs());
      }
    }
    if (r.has_usage()) usage_ = r.usage();
    if (const char* f = finish_reason(r.finish_reason())) finish_ = f;
    if (!w_.stream) {
      StartRead(&response_);
      return;
    }
    std::string out;
    if (!started_) {
      started_ = true;
      exchange_->start(200, "text/event-stream");
      if (w_.api == Api::kChat)
        out += event(chunk(json{{"role", "assistant"}, {"content", ""}}, nullptr, nullptr));
    }
    const size_t first = ids_.size() - static_cast<size_t>(r.token_ids_size());
    if (!r.text().empty() || r.finish_reason() != v1::FINISH_REASON_UNSPECIFIED ||
        (w_.logprobs && r.token_ids_size() > 0)) {
      const json lp =
          w_.logprobs ? logprobs_json(first, ids_.size(), sent_text_bytes_) : json(nullptr);
      const json delta = w_.api == Api::kChat
                             ? (r.text().empty() ? json::object() : json{{"content", r.text()}})
                             : json(r.text());
      out += event(chunk(delta, finish_reason(r.finish_reason()), lp));
    }
    sent_text_bytes_ += r.text().size();
    if (out.empty()) {
      StartRead(&response_);
      return;
    }
    exchange_->write(std::move(out), [self = shared_from_this()](bool written) {
      if (written)
        self->StartRead(&self->response_);
      else
        self->context_.TryCancel();
    });
  }

  void OnDone(const grpc::Status& status) override {
    if (!status.ok()) {
      // (A call cancelled because its client left answers no one: the exchange drops it.)
      const ApiError e = from_grpc(status);
      if (!started_) {
        send_error(*exchange_, e);
      } else {
        exchange_->write(event(json::parse(error_json(e))) + "data: [DONE]\n\n", nullptr);
        exchange_->finish();
      }
    } else if (w_.stream) {
      std::string out;
      if (!started_) {
        started_ = true;
        exchange_->start(200, "text/event-stream");
      }
      if (w_.include_usage) {
        json c = chunk(nullptr, nullptr, nullptr);
        c["choices"] = json::array();
        c["usage"] = usage_json();
        out += event(c);
      }
      out += "data: [DONE]\n\n";
      exchange_->write(std::move(out), nullptr);
      exchange_->finish();
    } else {
      exchange_->respond(200, "application/json",
                         whole().dump(-1, ' ', false, json::error_handler_t::replace));
    }
    std::shared_ptr<OpenAiApi::Shared> shared = shared_;
    self_.reset();  // `this` may go now
    {
      std::lock_guard lock(shared->mu);
      --shared->open;
    }
    shared->idle.notify_all();
  }

 private:
  static std::string event(const json& j) {
    return "data: " + j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
  }

  json usage_json() const {
    const int32_t prompt = usage_.prompt_tokens() > 0 ? usage_.prompt_tokens() : w_.prompt_tokens;
    const int32_t completion = usage_.completion_tokens() > 0 ? usage_.completion_tokens()
                                                              : static_cast<int32_t>(ids_.size());
    return {{"prompt_tokens", prompt},
            {"completion_tokens", completion},
            {"total_tokens", prompt + completion}};
  }

  // One streamed chunk: chat's delta or a completion's text.
  json chunk(const json& delta, const char* finish, const json& lp) const {
    json choice = {{"index", 0}};
    if (w_.api == Api::kChat)
      choice["delta"] = delta.is_null() ? json::object() : delta;
    else
      choice["text"] = delta.is_null() ? json("") : delta;
    choice["logprobs"] = lp;
    choice["finish_reason"] = finish == nullptr ? json(nullptr) : json(finish);
    return {{"id", id_},
            {"object", w_.api == Api::kChat ? "chat.completion.chunk" : "text_completion"},
            {"created", created_},
            {"model", shared_->options.model_name},
            {"choices", json::array({choice})}};
  }

  // Tokens [begin, end) as OpenAI's logprobs: chat's content list, or the completions'
  // tokens / token_logprobs / text_offset (offsets from `offset`, the text before them).
  json logprobs_json(size_t begin, size_t end, size_t offset) const {
    const Tokenizer& tok = *shared_->tokenizer;
    auto entry = [&](int32_t id, float lp) {
      const std::string& bytes = tok.token_bytes(id);
      json b = json::array();
      for (const char c : bytes) b.push_back(static_cast<int>(static_cast<unsigned char>(c)));
      return json{{"token", utf8::lossy(bytes)}, {"logprob", lp}, {"bytes", b}};
    };
    if (w_.api == Api::kChat) {
      json content = json::array();
      for (size_t i = begin; i < end && i < logprobs_.size(); ++i) {
        json e = entry(ids_[i], logprobs_[i]);
        json alternatives = json::array();
        if (i < top_.size())
          for (int k = 0; k < top_[i].token_ids_size(); ++k)
            alternatives.push_back(entry(top_[i].token_ids(k), top_[i].logprobs(k)));
        e["top_logprobs"] = alternatives;
        content.push_back(std::move(e));
      }
      return {{"content", content}};
    }
    json tokens = json::array(), lps = json::array(), offsets = json::array();
    json tops = w_.top_logprobs > 0 ? json::array() : json(nullptr);
    for (size_t i = begin; i < end && i < logprobs_.size(); ++i) {
      const std::string& bytes = tok.token_bytes(ids_[i]);
      tokens.push_back(utf8::lossy(bytes));
      lps.push_back(logprobs_[i]);
      offsets.push_back(offset);
      offset += bytes.size();
      if (w_.top_logprobs > 0) {
        json alternatives = json::object();
        if (i < top_.size())
          for (int k = 0; k < top_[i].token_ids_size(); ++k)
            alternatives[utf8::lossy(tok.token_bytes(top_[i].token_ids(k)))] = top_[i].logprobs(k);
        tops.push_back(std::move(alternatives));
      }
    }
    return {{"tokens", tokens},
            {"token_logprobs", lps},
            {"top_logprobs", tops},
            {"text_offset", offsets}};
  }

  json whole() const {
    json choice = {{"index", 0}};
    if (w_.api == Api::kChat)
      choice["message"] = {{"role", "assistant"}, {"content", text_}};
    else
      choice["text"] = text_;
    choice["logprobs"] = w_.logprobs ? logprobs_json(0, ids_.size(), 0) : json(nullptr);
    choice["finish_reason"] = finish_.empty() ? json(nullptr) : json(finish_);
    return {{"id", id_},
            {"object", w_.api == Api::kChat ? "chat.completion" : "text_completion"},
            {"created", created_},
            {"model", shared_->options.model_name},
            {"choices", json::array({choice})},
            {"usage", usage_json()}};
  }

  std::shared_ptr<OpenAiApi::Shared> shared_;
  std::shared_ptr<HttpExchange> exchange_;
  Wanted w_;
  const std::string id_;
  const int64_t created_;
  std::shared_ptr<Call> self_;  // held from start() to OnDone
  grpc::ClientContext context_;
  v1::GenerateResponse response_;
  bool started_ = false;  // the stream's header went out
  std::string text_;
  std::vector<int32_t> ids_;
  std::vector<float> logprobs_;
  std::vector<v1::TopLogprobs> top_;  // per token, with top_logprobs
  v1::Usage usage_;
  std::string finish_;
  size_t sent_text_bytes_ = 0;
};

}  // namespace

OpenAiApi::OpenAiApi(OpenAiOptions options, std::shared_ptr<grpc::Channel> channel,
                     std::shared_ptr<const Tokenizer> tokenizer,
                     std::function<std::optional<ModelLimits>()> limits)
    : shared_(std::make_shared<Shared>()) {
  MLA_REQUIRE(tokenizer != nullptr, "the OpenAI API needs the coordinator's tokenizer");
  MLA_REQUIRE(!options.model_name.empty(), "the OpenAI API needs a model name");
  shared_->options = std::move(options);
  shared_->stub = v1::Coordinator::NewStub(std::move(channel));
  shared_->tokenizer = std::move(tokenizer);
  shared_->limits = std::move(limits);
}

OpenAiApi::~OpenAiApi() { shutdown(); }

void OpenAiApi::shutdown() {
  std::vector<std::shared_ptr<Call>> open;
  {
    std::lock_guard lock(shared_->mu);
    shared_->stopping = true;
    for (auto& w : shared_->calls)
      if (auto c = w.lock()) open.push_back(std::move(c));
    shared_->calls.clear();
  }
  for (auto& c : open) c->cancel();
}

bool OpenAiApi::wait_idle(std::chrono::milliseconds timeout) {
  std::unique_lock lock(shared_->mu);
  return shared_->idle.wait_for(lock, timeout, [&] { return shared_->open == 0; });
}

size_t OpenAiApi::open_calls() const {
  std::lock_guard lock(shared_->mu);
  return shared_->open;
}

void OpenAiApi::handle(HttpRequest request, std::shared_ptr<HttpExchange> exchange) {
  try {
    std::string path = request.target.substr(0, request.target.find('?'));
    while (path.size() > 1 && path.back() == '/') path.pop_back();
    const Shared& s = *shared_;
    if (!s.options.api_key.empty() &&
        !equal_in_constant_time(request.header("authorization"), "Bearer " + s.options.api_key)) {
      throw ApiError{401, "authentication_error", "",
                     "a valid API key is needed (Authorization: Bearer ...)", "invalid_api_key"};
    }
    const bool models = path == "/v1/models" || path.starts_with("/v1/models/");
    const bool generate = path == "/v1/completions" || path == "/v1/chat/completions";
    if (!models && !generate) {
      throw ApiError{404, "not_found_error", "",
                     fmt::format("no route {} {}", request.method, path), ""};
    }
    if (request.method != (models ? "GET" : "POST")) {
      throw ApiError{
          405, "invalid_request_error", "",
          fmt::format("{} takes {}, not {}", path, models ? "GET" : "POST", request.method), ""};
    }
    if (models) {
      if (path == "/v1/models") {
        exchange->respond(200, "application/json",
                          json{{"object", "list"}, {"data", json::array({s.model_json()})}}.dump());
        return;
      }
      if (path.substr(std::string("/v1/models/").size()) != s.options.model_name) {
        throw ApiError{404, "invalid_request_error", "model",
                       fmt::format("the model '{}' does not exist", path.substr(11)),
                       "model_not_found"};
      }
      exchange->respond(200, "application/json", s.model_json().dump());
      return;
    }

    const json body = parse_body(request.body);
    const json* model = field(body, "model");
    if (model == nullptr) bad("model", "required");
    if (!model->is_string())
      bad("model", fmt::format("expected a string, got {}", model->type_name()));
    if (model->get<std::string>() != s.options.model_name) {
      throw ApiError{404, "invalid_request_error", "model",
                     fmt::format("the model '{}' does not exist (this server serves '{}')",
                                 model->get<std::string>(), s.options.model_name),
                     "model_not_found"};
    }
    Wanted w;
    w.api = path == "/v1/chat/completions" ? Api::kChat : Api::kCompletions;
    read_common(body, w.api, w);
    std::vector<int32_t> ids;
    const char* prompt_field = w.api == Api::kChat ? "messages" : "prompt";
    try {
      ids = w.api == Api::kChat ? s.tokenizer->encode_chat(read_messages(body))
                                : read_prompt(body, *s.tokenizer);
    } catch (const Error& e) {
      const std::string what = e.what();
      bad(prompt_field, what.starts_with("messages: ") ? what.substr(10) : what);
    }
    const std::optional<ModelLimits> limits = s.limits();
    if (limits && static_cast<int64_t>(ids.size()) >= limits->max_context) {
      bad(prompt_field, fmt::format("{} tokens, which leaves no room in the model's context of {}",
                                    ids.size(), limits->max_context));
    }
    std::optional<int64_t> max_tokens = get_int(body, "max_completion_tokens");
    if (!max_tokens) max_tokens = get_int(body, "max_tokens");
    if (max_tokens && *max_tokens < 1) {
      bad(field(body, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens",
          fmt::format("must be >= 1, got {}", *max_tokens));
    }
    if (!max_tokens) {
      max_tokens = w.api == Api::kCompletions
                       ? 16
                       : (limits ? limits->max_context - static_cast<int64_t>(ids.size()) : 1);
    }
    w.request.set_max_tokens(static_cast<int32_t>(std::min<int64_t>(*max_tokens, INT32_MAX)));
    w.request.mutable_prompt_ids()->Assign(ids.begin(), ids.end());
    w.request.set_return_text(true);
    w.prompt_tokens = static_cast<int32_t>(ids.size());
    const std::string id = (w.api == Api::kChat ? "chatcmpl-" : "cmpl-") + random_id();
    w.request.set_request_id(id);

    auto call = std::make_shared<Call>(shared_, exchange, std::move(w), id);
    {
      std::lock_guard lock(shared_->mu);
      if (shared_->stopping) {
        throw ApiError{503, "service_unavailable", "", "the server is shutting down", ""};
      }
      std::erase_if(shared_->calls, [](const auto& c) { return c.expired(); });
      shared_->calls.push_back(call);
      ++shared_->open;
    }
    call->start();
  } catch (const ApiError& e) {
    send_error(*exchange, e);
  } catch (const Error& e) {
    send_error(*exchange, ApiError{400, "invalid_request_error", "", e.what(), ""});
  }
}

}  // namespace mla
