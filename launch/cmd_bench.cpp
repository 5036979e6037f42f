// `mlaserve bench`: a load generator for a coordinator (or, with --worker, one Worker service
// directly, so that the difference of the two is the coordinator's routing overhead; or, with
// --http, any OpenAI-compatible server's POST /v1/completions, streamed, so that the same tool
// measures mlaserve's HTTP API, its gRPC API, and other servers).
//
// Each of --concurrency threads keeps one Generate stream open at a time and takes the next
// request when its stream ends (closed loop); with --rate, request i may not start before
// i / rate seconds (open loop, capped by the concurrency). Latencies are measured by the
// client from the call's start. Everything is bounded: --requests calls at most, and every
// call's deadline is the end of the run (--timeout). Exits 1 when any request failed, was not
// sent before the timeout, or ended OK with fewer tokens than asked.
#include <fmt/format.h>
#include <grpcpp/grpcpp.h>
#include <httplib.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "kernels/error.h"
#include "launch/commands.h"
#include "mlaserve/v1/mlaserve.grpc.pb.h"
#include "rpc/client.h"
#include "rpc/status.h"
#include "rpc/tls_credentials.h"
#include "runtime/deploy_config.h"

namespace mla::launch {
namespace {

namespace v1 = mlaserve::v1;
using Clock = std::chrono::steady_clock;
using Reader = grpc::ClientReaderInterface<v1::GenerateResponse>;

// Streams sharing one channel (one HTTP/2 connection): well under the usual
// max_concurrent_streams of 100.
constexpr int32_t kStreamsPerChannel = 64;

struct BenchArgs {
  std::string config_path;                  // its tls section
  std::string address = "127.0.0.1:50051";  // coordinators: comma-separated
  bool worker = false;
  std::string http;   // an OpenAI-compatible server's base URL, e.g. http://127.0.0.1:8000
  std::string model;  // with --http: the `model` to send (default: the server's first)
  int32_t requests = 100;
  int32_t concurrency = 1;
  double rate = 0.0;
  int32_t warmup = 0;
  int32_t prompt_len = 32;
  int32_t max_tokens = 16;
  int32_t vocab = 0;
  uint64_t seed = 0;
  bool ignore_eos = true;
  double timeout_s = 300.0;
  int32_t wait_ready_s = 0;
};

// One Generate call as the client saw it.
struct Sample {
  bool sent = false;        // false: the run ended before its turn
  std::string code = "OK";  // the gRPC status name the call ended with
  int64_t tokens = 0;
  bool complete = false;  // OK and ended with a finish_reason
  double ttft_ms = 0.0;   // to the first message with tokens; 0 when none came
  double total_ms = 0.0;
  std::string worker_id;      // of the first message that named one
  double start_lag_ms = 0.0;  // with --rate: how late the call started against the schedule
};

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// An OpenAI-compatible server: streamed POST /v1/completions with the prompt as token ids, one
// keep-alive connection per thread. TTFT is the first chunk with text; the tokens are the
// final usage's completion_tokens (stream_options.include_usage).
class HttpTarget {
 public:
  HttpTarget(std::string base, std::string model)
      : base_(std::move(base)), model_(std::move(model)) {}

  Sample run_one(const v1::GenerateRequest& req, std::chrono::system_clock::time_point deadline) {
    thread_local std::unique_ptr<httplib::Client> client;
    thread_local std::string client_base;
    if (!client || client_base != base_) {
      client = std::make_unique<httplib::Client>(base_);
      client->set_keep_alive(true);
      client_base = base_;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::system_clock::now());
    client->set_read_timeout(std::chrono::milliseconds(std::max<int64_t>(left.count(), 1)));
    nlohmann::json body = {
        {"model", model_},
        {"prompt", std::vector<int32_t>(req.prompt_ids().begin(), req.prompt_ids().end())},
        {"max_tokens", req.max_tokens()},
        {"temperature", 0},
        {"ignore_eos", req.ignore_eos()},
        {"stream", true},
        {"stream_options", {{"include_usage", true}}}};
    Sample s;
    const Clock::time_point start = Clock::now();
    bool finished = false, done = false;
    std::string pending;
    httplib::Request http;
    http.method = "POST";
    http.path = "/v1/completions";
    http.body = body.dump();
    http.set_header("Content-Type", "application/json");
    http.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) {
      pending.append(data, len);
      for (size_t end; (end = pending.find("\n\n")) != std::string::npos;) {
        const std::string event = pending.substr(0, end);
        pending.erase(0, end + 2);
        if (!event.starts_with("data: ")) continue;
        const std::string payload = event.substr(6);
        if (payload == "[DONE]") {
          done = true;
          continue;
        }
        const auto j = nlohmann::json::parse(payload, nullptr, false);
        if (j.is_discarded()) continue;
        if (j.contains("error")) {
          s.code = j["error"].value("type", "error");
          continue;
        }
        if (j.contains("usage") && j["usage"].is_object())
          s.tokens = j["usage"].value("completion_tokens", 0);
        if (!j.contains("choices") || j["choices"].empty()) continue;
        const auto& choice = j["choices"][0];
        if (s.ttft_ms == 0 && !choice.value("text", "").empty())
          s.ttft_ms = ms_between(start, Clock::now());
        if (choice.contains("finish_reason") && !choice["finish_reason"].is_null()) finished = true;
      }
      return true;
    };
    const httplib::Result res = client->send(http);
    if (!res) {
      s.code = "HTTP_" + httplib::to_string(res.error());
      client.reset();
    } else if (res->status != 200) {
      s.code = fmt::format("HTTP_{}", res->status);
    }
    s.total_ms = ms_between(start, Clock::now());
    s.complete = s.code == "OK" && finished && done;
    return s;
  }

 private:
  std::string base_, model_;
};

// Where the calls go: the coordinators through the client library (which resumes a stream on
// another coordinator when one breaks), one worker's Worker service directly (with the control
// secret from the environment), or an OpenAI-compatible HTTP server.
class Target {
 public:
  Target(const std::string& address, bool worker, int32_t channel_index,
         const std::shared_ptr<grpc::ChannelCredentials>& credentials, const std::string& http,
         const std::string& model) {
    if (!http.empty()) {
      http_ = std::make_unique<HttpTarget>(http, model);
      return;
    }
    if (!worker) {
      ClientOptions options;
      options.own_connections = true;
      options.credentials = credentials;
      client_ = std::make_unique<Client>(address, options);
      return;
    }
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    // Distinct channels otherwise share one connection through the global subchannel pool.
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt("mlaserve.bench_channel", channel_index);
    worker_ = v1::Worker::NewStub(grpc::CreateCustomChannel(address, credentials, args));
    secret_ = SharedSecret::load("");
  }

  Sample run_one(const v1::GenerateRequest& req, std::chrono::system_clock::time_point deadline) {
    if (http_) return http_->run_one(req, deadline);
    Sample s;
    const Clock::time_point start = Clock::now();
    bool finished = false;
    auto on_message = [&](const v1::GenerateResponse& msg) {
      if (msg.token_ids_size() > 0 && s.tokens == 0) s.ttft_ms = ms_between(start, Clock::now());
      s.tokens += msg.token_ids_size();
      if (s.worker_id.empty()) s.worker_id = msg.worker_id();
      if (msg.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) finished = true;
    };
    if (client_) {
      try {
        client_->generate(req, on_message,
                          std::chrono::duration_cast<std::chrono::milliseconds>(
                              deadline - std::chrono::system_clock::now()));
      } catch (const Error& e) {
        // The client's message is "<STATUS_NAME>: <server message>".
        const std::string what = e.what();
        s.code = what.substr(0, what.find(':'));
      }
    } else {
      grpc::ClientContext ctx;
      ctx.set_deadline(deadline);
      secret_->attach(ctx);
      std::unique_ptr<Reader> reader = worker_->Generate(&ctx, req);
      v1::GenerateResponse msg;
      while (reader->Read(&msg)) on_message(msg);
      s.code = grpc_code_name(reader->Finish().error_code());
    }
    s.total_ms = ms_between(start, Clock::now());
    s.complete = s.code == "OK" && finished;
    return s;
  }

 private:
  std::unique_ptr<Client> client_;
  std::unique_ptr<HttpTarget> http_;
  std::unique_ptr<v1::Worker::Stub> worker_;
  std::shared_ptr<const SharedSecret> secret_;
};

// Request i's prompt depends only on (seed, i), not on which thread sends it.
v1::GenerateRequest make_request(const BenchArgs& a, int32_t vocab, int64_t i) {
  std::mt19937_64 rng(a.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(i));
  std::uniform_int_distribution<int32_t> id(1, vocab - 1);
  v1::GenerateRequest req;
  for (int32_t t = 0; t < a.prompt_len; ++t) req.add_prompt_ids(id(rng));
  req.set_max_tokens(a.max_tokens);
  req.set_ignore_eos(a.ignore_eos);
  return req;
}

// Nearest-rank percentile of sorted values; 0 for none.
double percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0.0;
  const auto rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(sorted.size())));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

// The deployment's channel credentials (plaintext without a config or its tls section).
std::shared_ptr<grpc::ChannelCredentials> credentials_of(const BenchArgs& a) {
  return channel_credentials(a.config_path.empty() ? TlsConfig{}
                                                   : DeployConfig::load(a.config_path).tls);
}

ClientOptions client_options(const BenchArgs& a) {
  ClientOptions options;
  options.credentials = credentials_of(a);
  return options;
}

// The workers' vocabulary, through the coordinator's ListWorkers.
int32_t vocab_from_coordinator(const BenchArgs& a) {
  const std::string& address = a.address;
  const v1::ListWorkersResponse status = Client(address, client_options(a)).list_workers();
  for (const v1::WorkerStatus& w : status.workers()) {
    if (w.state() == "alive" && w.model().vocab_size() > 0) return w.model().vocab_size();
  }
  MLA_THROW(kUnavailable, "bench: no live worker at {} to take --vocab from; give --vocab",
            address);
}

// The model an OpenAI-compatible server lists first (GET /v1/models).
std::string model_from_server(const std::string& base) {
  httplib::Client client(base);
  const httplib::Result res = client.Get("/v1/models");
  if (!res || res->status != 200) {
    MLA_THROW(kUnavailable, "bench: GET {}/v1/models failed ({}); give --model", base,
              res ? fmt::format("HTTP {}", res->status) : httplib::to_string(res.error()));
  }
  const auto j = nlohmann::json::parse(res->body, nullptr, false);
  if (j.is_discarded() || !j.contains("data") || j["data"].empty()) {
    MLA_THROW(kUnavailable, "bench: {}/v1/models lists no model; give --model", base);
  }
  return j["data"][0].value("id", "");
}

void wait_until_ready(const BenchArgs& a) {
  const auto timeout = std::chrono::seconds(a.wait_ready_s);
  if (!a.http.empty()) {
    const auto end = Clock::now() + timeout;
    httplib::Client client(a.http);
    while (true) {
      const httplib::Result res = client.Get("/v1/models");
      if (res && res->status == 200) return;
      if (Clock::now() >= end) {
        MLA_THROW(kUnavailable, "bench: {}/v1/models not answering after {} s", a.http,
                  a.wait_ready_s);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }
  if (!a.worker) {
    if (!Client(a.address, client_options(a)).wait_until_ready(timeout)) {
      MLA_THROW(kUnavailable, "bench: no serving coordinator with a live worker at {} after {} s",
                a.address, a.wait_ready_s);
    }
    return;
  }
  auto channel = grpc::CreateChannel(a.address, credentials_of(a));
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + timeout)) {
    MLA_THROW(kUnavailable, "bench: worker at {} not reachable after {} s", a.address,
              a.wait_ready_s);
  }
}

struct Run {
  std::vector<Sample> samples;  // [i - first] for request i
  double wall_s = 0.0;
};

// Runs requests [first, first + count) on --concurrency threads, thread t on channel
// t / kStreamsPerChannel; no request starts at or after `end`, when every open call's deadline
// passes. With rate > 0, request first + i starts no earlier than i / rate s after the start.
Run run_load(const BenchArgs& a, int32_t vocab, std::vector<std::unique_ptr<Target>>& targets,
             int64_t first, int64_t count, double rate, Clock::time_point end) {
  Run run;
  run.samples.resize(static_cast<size_t>(count));
  const auto deadline =
      std::chrono::system_clock::now() +
      std::chrono::duration_cast<std::chrono::system_clock::duration>(end - Clock::now());
  std::atomic<int64_t> next{0};
  const Clock::time_point start = Clock::now();
  const int32_t threads = static_cast<int32_t>(std::min<int64_t>(a.concurrency, count));
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads));
  auto join_all = [&] {
    for (std::thread& th : pool) th.join();
  };
  for (int32_t t = 0; t < threads; ++t) {
    try {
      pool.emplace_back([&, t] {
        Target& target = *targets[static_cast<size_t>(t / kStreamsPerChannel)];
        for (;;) {
          const int64_t i = next.fetch_add(1);
          if (i >= count) return;
          Clock::time_point scheduled = start;
          if (rate > 0) {
            scheduled += std::chrono::duration_cast<Clock::duration>(
                std::chrono::duration<double>(static_cast<double>(i) / rate));
            std::this_thread::sleep_until(std::min(end, scheduled));
          }
          const Clock::time_point now = Clock::now();
          if (now >= end) return;
          Sample& s = run.samples[static_cast<size_t>(i)];
          s = target.run_one(make_request(a, vocab, first + i), deadline);
          s.sent = true;
          s.start_lag_ms = ms_between(scheduled, now);
        }
      });
    } catch (const std::system_error& e) {
      next = count;  // the running threads take no new request
      join_all();
      MLA_THROW(kResourceExhausted, "bench: cannot start thread {} of {} ({}); lower --concurrency",
                t + 1, threads, e.what());
    }
  }
  join_all();
  run.wall_s = std::chrono::duration<double>(Clock::now() - start).count();
  return run;
}

int run_bench(const BenchArgs& a) {
  MLA_REQUIRE(a.requests >= 1, "--requests must be >= 1, got {}", a.requests);
  MLA_REQUIRE(a.concurrency >= 1, "--concurrency must be >= 1, got {}", a.concurrency);
  MLA_REQUIRE(a.rate >= 0, "--rate must be >= 0, got {}", a.rate);
  MLA_REQUIRE(a.warmup >= 0, "--warmup must be >= 0, got {}", a.warmup);
  MLA_REQUIRE(a.prompt_len >= 1, "--prompt-len must be >= 1, got {}", a.prompt_len);
  MLA_REQUIRE(a.max_tokens >= 1, "--max-tokens must be >= 1, got {}", a.max_tokens);
  MLA_REQUIRE(a.timeout_s > 0, "--timeout must be > 0, got {}", a.timeout_s);
  MLA_REQUIRE(a.vocab == 0 || a.vocab >= 2, "--vocab must be >= 2, got {}", a.vocab);
  MLA_REQUIRE(a.vocab > 0 || !a.worker, "--worker needs --vocab (a worker cannot be asked)");
  MLA_REQUIRE(a.vocab > 0 || a.http.empty(), "--http needs --vocab (the prompts are token ids)");
  MLA_REQUIRE(a.http.empty() || !a.worker, "give --http or --worker, not both");

  if (a.wait_ready_s > 0) wait_until_ready(a);
  const Clock::time_point end = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                   std::chrono::duration<double>(a.timeout_s));
  const int32_t vocab = a.vocab > 0 ? a.vocab : vocab_from_coordinator(a);
  const auto credentials = credentials_of(a);
  const std::string model =
      a.http.empty() || !a.model.empty() ? a.model : model_from_server(a.http);

  std::vector<std::unique_ptr<Target>> targets;
  for (int32_t c = 0; c * kStreamsPerChannel < a.concurrency; ++c) {
    targets.push_back(std::make_unique<Target>(a.address, a.worker, c, credentials, a.http, model));
  }
  const char* target_name = !a.http.empty() ? "http" : a.worker ? "worker" : "coordinator";
  const std::string& where = a.http.empty() ? a.address : a.http;
  spdlog::info(
      "bench: {} requests (+ {} warm-up) to {} {} over {} channel(s), concurrency {}, "
      "rate {}, prompt {} + {} tokens, vocab {}",
      a.requests, a.warmup, target_name, where, targets.size(), a.concurrency,
      a.rate > 0 ? fmt::format("{}/s", a.rate) : "unlimited", a.prompt_len, a.max_tokens, vocab);

  // Warm-up: connections set up and the servers' first steps out of the measurements.
  if (a.warmup > 0) run_load(a, vocab, targets, -a.warmup, a.warmup, 0.0, end);
  const Run run = run_load(a, vocab, targets, 0, a.requests, a.rate, end);

  std::map<std::string, int64_t> errors, per_worker;
  std::vector<double> ttft, total, lag;
  int64_t ok = 0, sent = 0, tokens = 0, incomplete = 0;
  for (const Sample& s : run.samples) {
    if (!s.sent) continue;
    ++sent;
    lag.push_back(s.start_lag_ms);
    tokens += s.tokens;
    if (s.code != "OK") {
      ++errors[s.code];
      continue;
    }
    ++ok;
    ++per_worker[s.worker_id.empty() ? "?" : s.worker_id];
    // A stream that ended OK but short of what was asked is a server bug, not a load effect.
    if (!s.complete || (a.ignore_eos && s.tokens != a.max_tokens)) ++incomplete;
    if (s.tokens > 0) ttft.push_back(s.ttft_ms);
    total.push_back(s.total_ms);
  }
  std::sort(ttft.begin(), ttft.end());
  std::sort(total.begin(), total.end());
  std::sort(lag.begin(), lag.end());
  // Closed loop: every call starts when a stream frees up, so there is no schedule to lag.
  const double lag_p99 = a.rate > 0 ? percentile(lag, 99) : 0.0;
  int64_t num_errors = 0;
  std::string error_list;
  for (const auto& [name, n] : errors) {
    num_errors += n;
    error_list += fmt::format("{}{}:{}", error_list.empty() ? "" : ",", name, n);
  }
  std::string worker_list;
  for (const auto& [id, n] : per_worker) {
    worker_list += fmt::format("{}{}={}", worker_list.empty() ? "" : ",", id, n);
  }
  const double tokens_per_s = run.wall_s > 0 ? static_cast<double>(tokens) / run.wall_s : 0.0;

  std::cout << fmt::format("target      {} {}\n", target_name, where)
            << fmt::format("requests    {} ok, {} errors{}, {} not sent (timeout), {} incomplete\n",
                           ok, num_errors, error_list.empty() ? "" : " (" + error_list + ")",
                           a.requests - sent, incomplete)
            << fmt::format("wall        {:.3f} s\n", run.wall_s)
            << fmt::format("tokens      {} streamed, {:.1f} tokens/s, {:.1f} requests/s\n", tokens,
                           tokens_per_s,
                           run.wall_s > 0 ? static_cast<double>(ok) / run.wall_s : 0.0)
            << fmt::format("ttft        p50 {:.2f} ms, p90 {:.2f} ms, p99 {:.2f} ms\n",
                           percentile(ttft, 50), percentile(ttft, 90), percentile(ttft, 99))
            << fmt::format("latency     p50 {:.2f} ms, p99 {:.2f} ms\n", percentile(total, 50),
                           percentile(total, 99))
            << fmt::format("workers     {}\n", worker_list.empty() ? "none" : worker_list);
  if (a.rate > 0) {
    std::cout << fmt::format(
        "start lag   p99 {:.2f} ms behind the --rate schedule (large: --concurrency too low)\n",
        lag_p99);
  }
  // One line of key=value pairs for scripts.
  std::cout << fmt::format(
      "BENCH target={} requests={} ok={} errors={} error_codes={} not_sent={} incomplete={} "
      "wall_s={:.3f} tokens={} tokens_per_s={:.1f} ttft_p50_ms={:.3f} ttft_p90_ms={:.3f} "
      "ttft_p99_ms={:.3f} latency_p50_ms={:.3f} latency_p99_ms={:.3f} start_lag_p99_ms={:.3f} "
      "per_worker={}\n",
      target_name, a.requests, ok, num_errors, error_list.empty() ? "none" : error_list,
      a.requests - sent, incomplete, run.wall_s, tokens, tokens_per_s, percentile(ttft, 50),
      percentile(ttft, 90), percentile(ttft, 99), percentile(total, 50), percentile(total, 99),
      lag_p99, worker_list.empty() ? "none" : worker_list);
  return num_errors == 0 && sent == a.requests && incomplete == 0 ? 0 : 1;
}

}  // namespace

void add_bench_command(CLI::App& app, int& exit_code) {
  auto a = std::make_shared<BenchArgs>();
  auto* cmd = app.add_subcommand(
      "bench", "Load a coordinator (or one worker) with Generate streams and report latencies");
  cmd->add_option("--config", a->config_path, "Deployment config: its tls section");
  cmd->add_option("--address", a->address,
                  "Coordinator addresses, comma-separated (a broken stream resumes on the next), "
                  "or a worker's with --worker")
      ->capture_default_str();
  cmd->add_flag("--worker", a->worker, "Call the Worker service at --address directly");
  cmd->add_option("--http", a->http,
                  "Load an OpenAI-compatible server instead (base URL, e.g. "
                  "http://127.0.0.1:8000): streamed POST /v1/completions, prompts as token ids "
                  "(needs --vocab)");
  cmd->add_option("--model", a->model,
                  "With --http: the model to ask for (default: the first of GET /v1/models)");
  cmd->add_option("--requests", a->requests, "Requests to send")->capture_default_str();
  cmd->add_option("--concurrency", a->concurrency, "Streams open at once at most")
      ->capture_default_str();
  cmd->add_option("--rate", a->rate, "Requests started per second (0 = as concurrency allows)")
      ->capture_default_str();
  cmd->add_option("--warmup", a->warmup, "Requests sent first and left out of the figures")
      ->capture_default_str();
  cmd->add_option("--prompt-len", a->prompt_len, "Prompt tokens per request")
      ->capture_default_str();
  cmd->add_option("--max-tokens", a->max_tokens, "Tokens to generate per request")
      ->capture_default_str();
  cmd->add_option("--vocab", a->vocab,
                  "Prompt ids are drawn from [1, vocab) (0 = the workers', through the "
                  "coordinator)")
      ->capture_default_str();
  cmd->add_option("--seed", a->seed, "Seed of the random prompts")->capture_default_str();
  cmd->add_flag("--ignore-eos,!--no-ignore-eos", a->ignore_eos,
                "Generate max_tokens regardless of eos (default on)");
  cmd->add_option("--timeout", a->timeout_s,
                  "Seconds the run (warm-up included) may take; calls still open then end "
                  "with DEADLINE_EXCEEDED")
      ->capture_default_str();
  cmd->add_option("--wait-ready", a->wait_ready_s, "Wait up to this many seconds for the target")
      ->capture_default_str();
  cmd->callback([a, &exit_code] { exit_code = run_bench(*a); });
}

}  // namespace mla::launch
