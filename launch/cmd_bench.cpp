// `mlaserve bench`: a serving benchmark against a coordinator (gRPC), one Worker service
// directly (--worker: the difference is the coordinator's routing overhead), or any
// OpenAI-compatible server (--http: streamed POST /v1/completions), so that the same schedule
// measures mlaserve and other servers.
//
// Workloads (launch/bench/workload.h): random prompts with input/output length distributions,
// shared-prefix groups, or a JSONL trace replayed as recorded. Arrivals: open loop, Poisson
// (--request-rate R) or gamma (--burstiness), or all at once (inf); --max-concurrency caps the
// streams open at once (a request whose turn comes while all are busy starts late, and the
// lag is reported). --request-rate 1,2,4 sweeps in one command. Warm-up requests run first
// and are left out. Each run prints vLLM's result table, a `BENCH key=value` line for
// scripts, and with --result-file writes the result JSON (launch/bench/report.h: the keys of
// `vllm bench serve`, --save-detailed adds per-request arrays), which
// tests/bench/plot_bench.py draws. A progress line goes to stderr.
//
// Everything is bounded: every call's deadline is the end of the run (--timeout). Exits 1 when
// any request failed, was not sent before the timeout, or ended OK short of what it asked.
#include <fmt/format.h>
#include <grpcpp/grpcpp.h>
#include <httplib.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "kernels/error.h"
#include "launch/bench/report.h"
#include "launch/bench/workload.h"
#include "launch/bench_options.h"
#include "launch/commands.h"
#include "mlaserve/v1/mlaserve.grpc.pb.h"
#include "rpc/client.h"
#include "rpc/shared_secret.h"
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
  std::string request_rates = "inf";
  double burstiness = 1.0;
  int32_t warmup = 0;
  bench::WorkloadSpec workload;
  int32_t vocab = 0;
  uint64_t seed = 0;
  bool ignore_eos = true;
  double timeout_s = 300.0;
  int32_t wait_ready_s = 0;
  std::string percentiles = "50,90,99";
  std::string goodput;
  std::string result_file;
  bool save_detailed = false;
  bool progress = true;
};

using bench::RequestRecord;
using bench::WorkItem;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// What a call saw, message by message: token timings relative to the run's start.
class Recorder {
 public:
  Recorder(RequestRecord& r, Clock::time_point run_start)
      : r_(r), run_start_(run_start), start_(Clock::now()) {
    r_.start_s = std::chrono::duration<double>(start_ - run_start_).count();
  }
  void tokens(int32_t n, const std::string& worker) {
    const Clock::time_point now = Clock::now();
    if (n <= 0) return;
    if (r_.token_s.empty())
      r_.ttft_ms = ms_between(start_, now);
    else
      r_.itl_ms.push_back(ms_between(last_, now));
    last_ = now;
    r_.token_s.push_back(std::chrono::duration<double>(now - run_start_).count());
    r_.token_n.push_back(n);
    r_.output_tokens += n;
    if (!worker.empty() && (r_.workers.empty() || r_.workers.back() != worker))
      r_.workers.push_back(worker);
  }
  void end() { r_.e2el_ms = ms_between(start_, Clock::now()); }

 private:
  RequestRecord& r_;
  Clock::time_point run_start_, start_, last_;
};

// An OpenAI-compatible server: streamed POST /v1/completions (prompt as token ids or text),
// one keep-alive connection per thread. Each chunk with text is a message; the token count
// is the final usage's (stream_options.include_usage), the difference put on the last chunk.
class HttpTarget {
 public:
  HttpTarget(std::string base, std::string model)
      : base_(std::move(base)), model_(std::move(model)) {}

  void run_one(const v1::GenerateRequest& req, std::chrono::system_clock::time_point deadline,
               Clock::time_point run_start, RequestRecord& r) {
    thread_local std::unique_ptr<httplib::Client> client;
    thread_local std::string client_base;
    if (!client || client_base != base_) {
      client = std::make_unique<httplib::Client>(base_);
      client->set_keep_alive(true);
      client->set_tcp_nodelay(true);
      client_base = base_;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::system_clock::now());
    client->set_read_timeout(std::chrono::milliseconds(std::max<int64_t>(left.count(), 1)));
    nlohmann::json body = {{"model", model_},  {"max_tokens", req.max_tokens()},
                           {"temperature", 0}, {"ignore_eos", req.ignore_eos()},
                           {"stream", true},   {"stream_options", {{"include_usage", true}}}};
    if (!req.prompt().empty())
      body["prompt"] = req.prompt();
    else
      body["prompt"] = std::vector<int32_t>(req.prompt_ids().begin(), req.prompt_ids().end());
    Recorder rec(r, run_start);
    bool finished = false, done = false;
    int32_t usage_tokens = -1;
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
          r.code = j["error"].value("type", "error");
          continue;
        }
        if (j.contains("usage") && j["usage"].is_object()) {
          usage_tokens = j["usage"].value("completion_tokens", 0);
          r.input_tokens = j["usage"].value("prompt_tokens", r.input_tokens);
        }
        if (!j.contains("choices") || j["choices"].empty()) continue;
        const auto& choice = j["choices"][0];
        if (!choice.value("text", "").empty()) rec.tokens(1, "");
        if (choice.contains("finish_reason") && !choice["finish_reason"].is_null()) finished = true;
      }
      return true;
    };
    const httplib::Result res = client->send(http);
    rec.end();
    if (!res) {
      r.code = "HTTP_" + httplib::to_string(res.error());
      client.reset();
    } else if (res->status != 200) {
      r.code = fmt::format("HTTP_{}", res->status);
    }
    if (usage_tokens >= 0 && !r.token_n.empty()) {
      r.token_n.back() += usage_tokens - r.output_tokens;
      r.output_tokens = usage_tokens;
    }
    r.complete = r.code == "OK" && finished && done;
  }

 private:
  std::string base_, model_;
};

// Where the calls go: the coordinators through the client library (which resumes a stream on
// another coordinator when one breaks), one worker's Worker service directly (with the control
// secret from the environment), or an OpenAI-compatible HTTP server.
class Target {
 public:
  Target(const BenchArgs& a, int32_t channel_index,
         const std::shared_ptr<grpc::ChannelCredentials>& credentials, const std::string& model) {
    if (!a.http.empty()) {
      http_ = std::make_unique<HttpTarget>(a.http, model);
      return;
    }
    if (!a.worker) {
      ClientOptions options;
      options.own_connections = true;
      options.credentials = credentials;
      client_ = std::make_unique<Client>(a.address, options);
      return;
    }
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    // Distinct channels otherwise share one connection through the global subchannel pool.
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt("mlaserve.bench_channel", channel_index);
    worker_ = v1::Worker::NewStub(grpc::CreateCustomChannel(a.address, credentials, args));
    secret_ = SharedSecret::load("");
  }

  void run_one(const v1::GenerateRequest& req, std::chrono::system_clock::time_point deadline,
               Clock::time_point run_start, RequestRecord& r) {
    r.input_tokens = req.prompt_ids_size();
    if (http_) return http_->run_one(req, deadline, run_start, r);
    Recorder rec(r, run_start);
    bool finished = false;
    auto on_message = [&](const v1::GenerateResponse& msg) {
      rec.tokens(msg.token_ids_size(), msg.worker_id());
      if (msg.has_usage() && msg.usage().prompt_tokens() > 0)
        r.input_tokens = msg.usage().prompt_tokens();
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
        r.code = what.substr(0, what.find(':'));
      }
    } else {
      grpc::ClientContext ctx;
      ctx.set_deadline(deadline);
      secret_->attach(ctx);
      std::unique_ptr<Reader> reader = worker_->Generate(&ctx, req);
      v1::GenerateResponse msg;
      while (reader->Read(&msg)) on_message(msg);
      r.code = grpc_code_name(reader->Finish().error_code());
    }
    rec.end();
    r.complete = r.code == "OK" && finished;
  }

 private:
  std::unique_ptr<Client> client_;
  std::unique_ptr<HttpTarget> http_;
  std::unique_ptr<v1::Worker::Stub> worker_;
  std::shared_ptr<const SharedSecret> secret_;
};

v1::GenerateRequest to_request(const WorkItem& w, bool ignore_eos) {
  v1::GenerateRequest req;
  if (w.prompt_text.empty())
    req.mutable_prompt_ids()->Assign(w.prompt_ids.begin(), w.prompt_ids.end());
  else
    req.set_prompt(w.prompt_text);
  req.set_max_tokens(w.output_len);
  req.set_ignore_eos(ignore_eos);
  return req;
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
  std::vector<RequestRecord> records;  // [i] for work item i
  double wall_s = 0.0;
};

// Prints "done/total, req/s, errors" to stderr about every second while a run goes.
class Progress {
 public:
  Progress(bool on, std::string label, int64_t total, const std::atomic<int64_t>& done,
           const std::atomic<int64_t>& errors)
      : label_(std::move(label)), total_(total), done_(done), errors_(errors) {
    if (!on) return;
    tty_ = ::isatty(STDERR_FILENO) == 1;
    thread_ = std::thread([this] {
      const Clock::time_point start = Clock::now();
      std::unique_lock lock(mu_);
      while (!cv_.wait_for(lock, std::chrono::seconds(tty_ ? 1 : 5), [this] { return stop_; })) {
        const double s = std::chrono::duration<double>(Clock::now() - start).count();
        std::cerr << fmt::format("{}{}: {}/{} done, {:.1f} req/s, {} errors, {:.0f} s{}",
                                 tty_ ? "\r" : "", label_, done_.load(), total_,
                                 static_cast<double>(done_.load()) / s, errors_.load(), s,
                                 tty_ ? "" : "\n")
                  << std::flush;
      }
    });
  }
  ~Progress() {
    if (!thread_.joinable()) return;
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
    if (tty_) std::cerr << "\n";
  }

 private:
  std::string label_;
  int64_t total_;
  const std::atomic<int64_t>& done_;
  const std::atomic<int64_t>& errors_;
  bool tty_ = false;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

// Runs `items` on up to --max-concurrency threads (thread t on channel t / kStreamsPerChannel):
// each takes the next item in arrival order and starts it at its arrival time, or as soon as
// it is free when late; nothing starts at or after `end`, when every open call's deadline
// passes.
Run run_load(const BenchArgs& a, const std::vector<WorkItem>& items,
             std::vector<std::unique_ptr<Target>>& targets, Clock::time_point end,
             const std::string& label) {
  Run run;
  const int64_t count = static_cast<int64_t>(items.size());
  run.records.resize(items.size());
  const auto deadline =
      std::chrono::system_clock::now() +
      std::chrono::duration_cast<std::chrono::system_clock::duration>(end - Clock::now());
  std::atomic<int64_t> next{0}, done{0}, errors{0};
  const Clock::time_point start = Clock::now();
  const int32_t threads = static_cast<int32_t>(std::min<int64_t>(a.concurrency, count));
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads));
  auto join_all = [&] {
    for (std::thread& th : pool) th.join();
  };
  {
    Progress progress(a.progress, label, count, done, errors);
    for (int32_t t = 0; t < threads; ++t) {
      try {
        pool.emplace_back([&, t] {
          Target& target = *targets[static_cast<size_t>(t / kStreamsPerChannel)];
          for (;;) {
            const int64_t i = next.fetch_add(1);
            if (i >= count) return;
            const WorkItem& w = items[static_cast<size_t>(i)];
            const Clock::time_point scheduled =
                start + std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(w.arrival_s));
            std::this_thread::sleep_until(std::min(end, scheduled));
            const Clock::time_point now = Clock::now();
            if (now >= end) return;
            RequestRecord& r = run.records[static_cast<size_t>(i)];
            target.run_one(to_request(w, a.ignore_eos), deadline, start, r);
            r.sent = true;
            r.start_lag_ms = ms_between(scheduled, now);
            // Without eos, a stream that ended OK short of its tokens is a server bug.
            if (a.ignore_eos && r.output_tokens != w.output_len) r.complete = false;
            ++done;
            if (r.code != "OK") ++errors;
          }
        });
      } catch (const std::system_error& e) {
        next = count;  // the running threads take no new request
        join_all();
        MLA_THROW(kResourceExhausted,
                  "bench: cannot start thread {} of {} ({}); lower --max-concurrency", t + 1,
                  threads, e.what());
      }
    }
    join_all();
  }
  run.wall_s = std::chrono::duration<double>(Clock::now() - start).count();
  return run;
}

int run_bench(const BenchArgs& a) {
  MLA_REQUIRE(a.requests >= 1, "--num-prompts must be >= 1, got {}", a.requests);
  MLA_REQUIRE(a.concurrency >= 1, "--max-concurrency must be >= 1, got {}", a.concurrency);
  MLA_REQUIRE(a.warmup >= 0, "--warmup must be >= 0, got {}", a.warmup);
  MLA_REQUIRE(a.timeout_s > 0, "--timeout must be > 0, got {}", a.timeout_s);
  MLA_REQUIRE(a.vocab == 0 || a.vocab >= 2, "--vocab must be >= 2, got {}", a.vocab);
  MLA_REQUIRE(a.vocab > 0 || !a.worker, "--worker needs --vocab (a worker cannot be asked)");
  MLA_REQUIRE(a.vocab > 0 || a.http.empty(), "--http needs --vocab (the prompts are token ids)");
  MLA_REQUIRE(a.http.empty() || !a.worker, "give --http or --worker, not both");
  const std::vector<double> rates = bench::parse_rates(a.request_rates);
  bench::RunInfo info;
  info.percentiles = bench::parse_positive_list(a.percentiles, "--percentiles", false);
  for (const double p : info.percentiles) MLA_REQUIRE(p <= 100, "--percentiles: {} is over 100", p);
  info.goodput = bench::Slo::parse(a.goodput);
  info.burstiness = a.burstiness;
  info.max_concurrency = a.concurrency;
  info.save_detailed = a.save_detailed;

  if (a.wait_ready_s > 0) wait_until_ready(a);
  const int32_t vocab = a.vocab > 0 ? a.vocab : vocab_from_coordinator(a);
  const auto credentials = credentials_of(a);
  const std::string model =
      a.http.empty() || !a.model.empty() ? a.model : model_from_server(a.http);
  std::vector<std::unique_ptr<Target>> targets;
  for (int32_t c = 0; c * kStreamsPerChannel < a.concurrency; ++c) {
    targets.push_back(std::make_unique<Target>(a, c, credentials, model));
  }
  const char* target_name = !a.http.empty() ? "http" : a.worker ? "worker" : "coordinator";
  info.backend = !a.http.empty() ? "openai-http" : a.worker ? "mlaserve-worker" : "mlaserve-grpc";
  info.target = a.http.empty() ? a.address : a.http;
  info.model_id = model.empty() ? "mlaserve" : model;

  std::string description;
  const std::vector<WorkItem> base =
      bench::make_workload(a.workload, vocab, a.requests, a.seed, &description);
  info.workload = description;
  info.num_prompts = static_cast<int64_t>(base.size());
  spdlog::info(
      "bench: {} requests (+ {} warm-up) to {} {}, max concurrency {}, rate {}, {}, vocab {}",
      base.size(), a.warmup, target_name, info.target, a.concurrency, a.request_rates, description,
      vocab);

  const Clock::time_point end = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                   std::chrono::duration<double>(a.timeout_s));
  // Warm-up: connections set up and the servers' first steps out of the measurements.
  if (a.warmup > 0) {
    std::string unused;
    bench::WorkloadSpec w = a.workload;
    if (w.dataset == "trace") w.dataset = "random";
    run_load(a, bench::make_workload(w, vocab, a.warmup, a.seed + 1, &unused), targets, end,
             "warm-up");
  }
  bool all_ok = true;
  std::vector<nlohmann::ordered_json> results;
  for (const double rate : rates) {
    std::vector<WorkItem> items = base;
    if (a.workload.dataset != "trace") {
      const std::vector<double> at =
          bench::arrival_times(static_cast<int64_t>(items.size()), rate, a.burstiness, a.seed);
      for (size_t i = 0; i < items.size(); ++i) items[i].arrival_s = at[i];
    }
    const std::string label = rate > 0 ? fmt::format("rate {}", rate) : "rate inf";
    const Run run = run_load(a, items, targets, end, label);
    info.request_rate = a.workload.dataset == "trace" ? 0 : rate;
    info.duration_s = run.wall_s;
    const nlohmann::ordered_json result = bench::result_json(info, run.records);
    std::cout << bench::result_table(result);

    // The summary line scripts read (keys kept from earlier versions).
    std::vector<double> ttft, e2el, lag;
    std::string worker_list;
    for (const RequestRecord& r : run.records) {
      if (!r.sent) continue;
      lag.push_back(r.start_lag_ms);
      if (r.code != "OK") continue;
      if (r.output_tokens > 0) ttft.push_back(r.ttft_ms);
      e2el.push_back(r.e2el_ms);
    }
    for (auto* v : {&ttft, &e2el, &lag}) std::sort(v->begin(), v->end());
    for (const auto& [id, n] : result["per_worker"].items())
      worker_list += fmt::format("{}{}={}", worker_list.empty() ? "" : ",", id, n.get<int64_t>());
    std::string error_list;
    for (const auto& [code, n] : result["errors_by_code"].items())
      error_list += fmt::format("{}{}:{}", error_list.empty() ? "" : ",", code, n.get<int64_t>());
    const int64_t ok = result["completed"], failed = result["failed"],
                  not_sent = result["not_sent"], incomplete = result["incomplete"];
    int64_t streamed = 0;
    for (const RequestRecord& r : run.records) streamed += r.sent ? r.output_tokens : 0;
    std::cout << fmt::format(
        "BENCH target={} rate={} requests={} ok={} errors={} error_codes={} not_sent={} "
        "incomplete={} wall_s={:.3f} tokens={} tokens_per_s={:.1f} ttft_p50_ms={:.3f} "
        "ttft_p90_ms={:.3f} ttft_p99_ms={:.3f} latency_p50_ms={:.3f} latency_p99_ms={:.3f} "
        "tpot_p50_ms={:.3f} tpot_p99_ms={:.3f} start_lag_p99_ms={:.3f} max_concurrent={} "
        "moved={} per_worker={}\n",
        target_name, rate > 0 ? fmt::format("{}", rate) : "inf", base.size(), ok, failed,
        error_list.empty() ? "none" : error_list, not_sent, incomplete, run.wall_s, streamed,
        run.wall_s > 0 ? static_cast<double>(streamed) / run.wall_s : 0.0,
        bench::percentile(ttft, 50), bench::percentile(ttft, 90), bench::percentile(ttft, 99),
        bench::percentile(e2el, 50), bench::percentile(e2el, 99),
        result.value("median_tpot_ms", 0.0), result.value("p99_tpot_ms", 0.0),
        bench::percentile(lag, 99), result["max_concurrent_requests"].get<int64_t>(),
        result["moved_requests"].get<int64_t>(), worker_list.empty() ? "none" : worker_list);
    if (failed > 0 || not_sent > 0 || incomplete > 0) all_ok = false;
    if (!a.result_file.empty()) {
      const std::string path = bench::result_path_for_rate(a.result_file, rate, rates.size() > 1);
      std::ofstream out(path);
      if (!out) MLA_THROW(kUnavailable, "--result-file: cannot write {}", path);
      out << result.dump(2) << "\n";
      spdlog::info("bench: result written to {}", path);
    }
    results.push_back(result);
  }
  if (results.size() > 1) {
    std::cout
        << "\n| request rate | completed | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | "
           "TPOT p50 ms | TPOT p99 ms | E2EL p99 ms |\n|---|---|---|---|---|---|---|---|---|\n";
    for (const auto& r : results) {
      std::cout << fmt::format(
          "| {} | {} | {:.2f} | {:.1f} | {:.1f} | {:.1f} | {:.2f} | {:.2f} | {:.1f} |\n",
          r["request_rate"].is_string() ? "inf"
                                        : fmt::format("{}", r["request_rate"].get<double>()),
          r["completed"].get<int64_t>(), r["request_throughput"].get<double>(),
          r["output_throughput"].get<double>(), r.value("median_ttft_ms", 0.0),
          r.value("p99_ttft_ms", 0.0), r.value("median_tpot_ms", 0.0), r.value("p99_tpot_ms", 0.0),
          r.value("p99_e2el_ms", 0.0));
    }
  }
  return all_ok ? 0 : 1;
}

}  // namespace

void add_workload_options(CLI::App& cmd, bench::WorkloadSpec& w) {
  cmd.add_option("--dataset", w.dataset, "random, shared-prefix or trace")->capture_default_str();
  cmd.add_option("--input-len,--prompt-len", w.input_len,
                 "Prompt tokens (shared-prefix: the question after the prefix): N, "
                 "uniform:LOW-HIGH or lognormal:MEAN,SIGMA")
      ->capture_default_str();
  cmd.add_option("--output-len,--max-tokens", w.output_len,
                 "Tokens to generate per request, as --input-len")
      ->capture_default_str();
  cmd.add_option("--prefix-groups", w.prefix_groups, "shared-prefix: how many prefixes")
      ->capture_default_str();
  cmd.add_option("--prefix-len", w.prefix_len, "shared-prefix: tokens per prefix")
      ->capture_default_str();
  cmd.add_option("--trace", w.trace,
                 "trace: a JSONL file, one request per line: arrival_s (or timestamp), prompt "
                 "(text) or input_len, output_len");
  cmd.add_option("--trace-time-scale", w.trace_time_scale,
                 "trace: multiply its arrival times (0.5 = twice as fast)")
      ->capture_default_str();
}

void add_bench_command(CLI::App& app, int& exit_code) {
  auto a = std::make_shared<BenchArgs>();
  auto* cmd = app.add_subcommand(
      "bench",
      "Serving benchmark: a workload on an open-loop schedule against a coordinator, "
      "a worker or any OpenAI-compatible server; vLLM-style results and JSON");
  cmd->add_option("--config", a->config_path, "Deployment config: its tls section");
  cmd->add_option("--address", a->address,
                  "Coordinator addresses, comma-separated (a broken stream resumes on the next), "
                  "or a worker's with --worker")
      ->capture_default_str();
  cmd->add_flag("--worker", a->worker, "Call the Worker service at --address directly");
  cmd->add_option("--http", a->http,
                  "Load an OpenAI-compatible server instead (base URL, e.g. "
                  "http://127.0.0.1:8000): streamed POST /v1/completions (needs --vocab)");
  cmd->add_option("--model", a->model,
                  "With --http: the model to ask for (default: the first of GET /v1/models)");
  cmd->add_option("--num-prompts,--requests", a->requests, "Requests per run")
      ->capture_default_str();
  cmd->add_option("--max-concurrency,--concurrency", a->concurrency, "Streams open at once at most")
      ->capture_default_str();
  cmd->add_option("--request-rate,--rate", a->request_rates,
                  "Requests per second, Poisson (gamma with --burstiness); inf = all at once; "
                  "a comma-separated list sweeps (one run each)")
      ->capture_default_str();
  cmd->add_option("--burstiness", a->burstiness,
                  "Shape of the gamma inter-arrival times: 1 Poisson, < 1 burstier, > 1 steadier")
      ->capture_default_str();
  cmd->add_option("--warmup", a->warmup, "Requests sent first and left out of the figures")
      ->capture_default_str();
  add_workload_options(*cmd, a->workload);
  cmd->add_option("--vocab", a->vocab,
                  "Prompt ids are drawn from [1, vocab) (0 = the workers', through the "
                  "coordinator)")
      ->capture_default_str();
  cmd->add_option("--seed", a->seed, "Seed of the prompts and the schedule")->capture_default_str();
  cmd->add_flag("--ignore-eos,!--no-ignore-eos", a->ignore_eos,
                "Generate every token asked for regardless of eos (default on)");
  cmd->add_option("--percentiles", a->percentiles, "Percentiles to report, comma-separated")
      ->capture_default_str();
  cmd->add_option("--goodput", a->goodput,
                  "SLOs for goodput, e.g. ttft:500,tpot:50,e2el:3000 (milliseconds)");
  cmd->add_option("--result-file", a->result_file,
                  "Write the result JSON here (vLLM's keys; a sweep adds .rateR before the "
                  "extension)");
  cmd->add_flag("--save-detailed", a->save_detailed,
                "Add per-request arrays and the per-worker timeline to the JSON");
  cmd->add_flag("--progress,!--no-progress", a->progress, "A progress line on stderr (default on)");
  cmd->add_option("--timeout", a->timeout_s,
                  "Seconds everything (warm-up included) may take; calls still open then end "
                  "with DEADLINE_EXCEEDED")
      ->capture_default_str();
  cmd->add_option("--wait-ready", a->wait_ready_s, "Wait up to this many seconds for the target")
      ->capture_default_str();
  cmd->callback([a, &exit_code] { exit_code = run_bench(*a); });
}

}  // namespace mla::launch
