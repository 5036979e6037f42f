#include "rpc/worker_service.h"

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <optional>

#include "kernels/error.h"
#include "rpc/generate_request.h"
#include "rpc/latent_chunks.h"
#include "rpc/request_limits.h"
#include "rpc/status.h"
#include "runtime/request_validation.h"
#include "runtime/sampler.h"

namespace mla {

namespace v1 = mlaserve::v1;

namespace {

v1::FinishReason to_proto(FinishReason r) {
  switch (r) {
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    case FinishReason::kNone:
      break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

// Adds one to a gauge for its lifetime; nothing for a null gauge.
class GaugeHold {
 public:
  explicit GaugeHold(Gauge* gauge) : gauge_(gauge) {
    if (gauge_) gauge_->inc();
  }
  ~GaugeHold() {
    if (gauge_) gauge_->dec();
  }
  GaugeHold(const GaugeHold&) = delete;
  GaugeHold& operator=(const GaugeHold&) = delete;

 private:
  Gauge* gauge_;
};

// mla::Error keeps its code; anything else is a bug here.
grpc::Status status_of(const std::exception& e) {
  if (const auto* error = dynamic_cast<const Error*>(&e)) return to_grpc_status(*error);
  return {grpc::StatusCode::INTERNAL, e.what()};
}

}  // namespace

struct WorkerService::Metrics {
  RequestMetrics requests;
  CacheMetrics cache;
};

WorkerService::WorkerService(Engine& engine, WorkerServiceOptions options)
    : engine_(engine),
      options_(std::move(options)),
      model_limits_(ModelLimits::of(engine.model().config())),
      model_info_([&engine, this] {
        v1::ModelInfo info;
        info.set_dtype(latent_wire_dtype(engine.cache().storage()));
        info.set_config_hash(options_.config_hash);
        if (engine.model().fp8_weights() == Fp8Weights::kKeep) info.set_weights("fp8_e4m3");
        info.set_model_type(engine.model().config().family_name());
        info.set_vocab_size(static_cast<int32_t>(engine.model().config().vocab_size));
        info.set_max_context(static_cast<int32_t>(engine.model().config().max_position_embeddings));
        info.set_tp_size(engine.model().shard().tp_size());
        info.set_block_size(engine.cache().geometry().block_size);
        return info;
      }()) {
  MLA_REQUIRE(engine.is_leader(), "a WorkerService serves a group's leader engine, not a follower");
  MLA_REQUIRE(!options_.worker_id.empty(), "worker_id must not be empty");
  MLA_REQUIRE(options_.poll_interval_ms >= 1, "poll_interval_ms must be >= 1, got {}",
              options_.poll_interval_ms);
  MLA_REQUIRE(options_.load_window_ms >= 1, "load_window_ms must be >= 1, got {}",
              options_.load_window_ms);
  MLA_REQUIRE(options_.idle_heartbeat_ms >= 1, "idle_heartbeat_ms must be >= 1, got {}",
              options_.idle_heartbeat_ms);
  load_.set_total_pages(engine.cache().pool().num_pages());
  load_.set_free_pages(engine.cache().num_available());
  if (!options_.step_trace.empty()) {
    step_trace_.open(options_.step_trace, std::ios::app);
    MLA_REQUIRE(step_trace_.good(), "step_trace: cannot write {}", options_.step_trace);
  }
  step_thread_ = std::thread([this] { step_loop(); });
}

WorkerService::~WorkerService() { shutdown(); }

void WorkerService::attach_metrics(MetricsRegistry& registry) {
  const Labels labels = {{"worker", options_.worker_id}};
  auto metrics = std::unique_ptr<Metrics>(
      new Metrics{RequestMetrics(registry, labels), CacheMetrics(registry, labels)});
  std::lock_guard lk(mu_);
  if (metrics_owner_) MLA_THROW(kFailedPrecondition, "metrics are already attached");
  metrics_owner_ = std::move(metrics);
  metrics_owner_->cache.pages_total.set(load_.total_pages());
  metrics_owner_->cache.pages_used.set(load_.total_pages() - load_.free_pages());
  metrics_ = metrics_owner_.get();
}

void WorkerService::drain() {
  std::lock_guard lk(mu_);
  if (accepting_) {
    spdlog::info("worker {}: draining, accepting no new requests; {} running", options_.worker_id,
                 calls_.size());
  }
  accepting_ = false;
}

void WorkerService::undrain() {
  std::lock_guard lk(mu_);
  if (accepting_ || stopping_ || shutting_down_soon_) return;
  accepting_ = true;
  spdlog::info("worker {}: accepting requests again", options_.worker_id);
}

void WorkerService::drain_for_shutdown() {
  {
    std::lock_guard lk(mu_);
    shutting_down_soon_ = true;
  }
  drain();
}

size_t WorkerService::running() const {
  std::lock_guard lk(mu_);
  return calls_.size();
}

size_t WorkerService::imports_in_progress() const {
  std::lock_guard lk(mu_);
  return importing_.size() + held_imports_.size();
}

bool WorkerService::wait_until_idle(std::chrono::milliseconds timeout,
                                    const std::function<bool()>& give_up) {
  const auto end = Clock::now() + timeout;
  for (;;) {
    if (running() == 0) return true;
    if (Clock::now() >= end || (give_up && give_up())) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

bool WorkerService::draining() const {
  std::lock_guard lk(mu_);
  return !accepting_;
}

void WorkerService::shutdown() {
  {
    std::lock_guard lk(mu_);
    if (stopping_) return;
    accepting_ = false;
    stopping_ = true;
  }
  wake_.notify_all();
  if (step_thread_.joinable()) step_thread_.join();
  spdlog::info("worker {}: shut down", options_.worker_id);
}

v1::WorkerLoad WorkerService::load() const {
  std::lock_guard lk(mu_);
  v1::WorkerLoad out = load_;
  out.set_waiting(out.waiting() + static_cast<int32_t>(adds_.size()));
  const auto window = std::chrono::milliseconds(options_.load_window_ms);
  const auto cutoff = Clock::now() - window;
  while (!token_events_.empty() && token_events_.front().first < cutoff) token_events_.pop_front();
  int64_t tokens = 0;
  for (const auto& [when, n] : token_events_) tokens += n;
  out.set_tokens_per_second(static_cast<double>(tokens) /
                            std::chrono::duration<double>(window).count());
  return out;
}

Request WorkerService::validated(const v1::GenerateRequest& r) const {
  check_request_id(r.request_id());
  Request request = to_request(r);
  validate_request(request, model_limits_, kPromptField);
  check_token_ids({r.resume_ids().data(), static_cast<size_t>(r.resume_ids_size())}, "resume_ids",
                  model_limits_.vocab_size);
  return request;
}

grpc::Status WorkerService::Generate(grpc::ServerContext* context,
                                     const v1::GenerateRequest* request,
                                     grpc::ServerWriter<v1::GenerateResponse>* writer) {
  if (options_.secret) {
    if (grpc::Status auth = options_.secret->check(*context, "Worker.Generate"); !auth.ok()) {
      return auth;
    }
  }
  const grpc::Status status = generate(context, request, writer);
  if (Metrics* m = metrics_.load())
    m->requests.requests_total(grpc_code_name(status.error_code())).inc();
  return status;
}

grpc::Status WorkerService::generate(grpc::ServerContext* context,
                                     const v1::GenerateRequest* request,
                                     grpc::ServerWriter<v1::GenerateResponse>* writer) {
  const Clock::time_point arrival = Clock::now();
  {
    std::lock_guard lk(mu_);
    if (!accepting_) return refusal_locked(*context);
  }
  auto call = std::make_shared<Call>();
  try {
    call->request = validated(*request);
  } catch (const Error& e) {
    spdlog::debug("worker {}: rejected request '{}': {}", options_.worker_id, request->request_id(),
                  e.what());
    return to_grpc_status(e);
  }
  call->request_id = request->request_id();
  call->prompt_tokens = request->prompt_ids_size();
  call->resumed = request->resume_ids_size();
  call->return_logprobs = request->return_logprobs();
  call->top_logprobs = request->top_logprobs();
  call->arrival = arrival;
  Request& r = call->request;
  // The engine samples token i at position prompt + i, so continuing from prompt +
  // resume_ids draws exactly what the original run would have drawn next.
  r.prompt.insert(r.prompt.end(), request->resume_ids().begin(), request->resume_ids().end());
  r.max_tokens -= call->resumed;
  if (request->migrated()) take_import(*call, r.prompt);

  if (r.max_tokens <= 0) {
    // Every token was already produced elsewhere: nothing to run, only the final message.
    v1::GenerateResponse last;
    last.set_request_id(call->request_id);
    last.set_worker_id(options_.worker_id);
    last.set_finish_reason(v1::FINISH_REASON_LENGTH);
    last.mutable_usage()->set_prompt_tokens(call->prompt_tokens);
    last.mutable_usage()->set_completion_tokens(call->resumed);
    const double total_ms = ms_between(arrival, Clock::now());
    last.mutable_timings()->set_queue_ms(total_ms);
    last.mutable_timings()->set_total_ms(total_ms);
    writer->Write(last);
    return grpc::Status::OK;
  }

  {
    std::lock_guard lk(mu_);
    if (!accepting_) return refusal_locked(*context);
    if (call->request_id.empty()) {
      do {
        call->request_id = fmt::format("{}-{}", options_.worker_id, next_request_number_++);
      } while (calls_.count(call->request_id) != 0);
    } else if (calls_.count(call->request_id) != 0) {
      return {grpc::StatusCode::ALREADY_EXISTS,
              fmt::format("request_id '{}' is already running on worker {}", call->request_id,
                          options_.worker_id)};
    }
    calls_.emplace(call->request_id, call);
    adds_.push_back(call);
  }
  wake_.notify_one();
  // In flight from here until this handler returns, however it does.
  Metrics* const metrics = metrics_.load();
  const GaugeHold in_flight(metrics ? &metrics->requests.in_flight : nullptr);
  return stream(call, *context, *writer);
}

grpc::Status WorkerService::stream(const std::shared_ptr<Call>& call, grpc::ServerContext& context,
                                   grpc::ServerWriter<v1::GenerateResponse>& writer) {
  const auto poll = std::chrono::milliseconds(options_.poll_interval_ms);
  while (true) {
    std::deque<v1::GenerateResponse> messages;
    std::optional<grpc::Status> end;
    {
      std::unique_lock lk(call->mu);
      call->ready.wait_for(lk, poll, [&] { return !call->outbox.empty() || call->end; });
      messages.swap(call->outbox);
      end = call->end;
    }
    for (const v1::GenerateResponse& m : messages) {
      if (!writer.Write(m)) {
        cancel_call(call);
        spdlog::info("worker {}: request {}: the client went away", options_.worker_id,
                     call->request_id);
        return {grpc::StatusCode::CANCELLED, "the client went away"};
      }
    }
    if (end) return *end;
    if (context.IsCancelled()) {
      cancel_call(call);
      const bool deadline = context.deadline() <= std::chrono::system_clock::now();
      spdlog::info("worker {}: request {} {}", options_.worker_id, call->request_id,
                   deadline ? "passed its deadline" : "was cancelled by the client");
      if (deadline) return {grpc::StatusCode::DEADLINE_EXCEEDED, "the request's deadline passed"};
      return {grpc::StatusCode::CANCELLED, "the client cancelled the request"};
    }
  }
}

grpc::Status WorkerService::refusal_locked(grpc::ServerContext& context) const {
  // Tells the coordinator to stop routing here rather than to count this worker dead.
  if (!stopping_) context.AddTrailingMetadata("mlaserve-worker-state", "draining");
  return {grpc::StatusCode::UNAVAILABLE, fmt::format("worker {} is {}", options_.worker_id,
                                                     stopping_ ? "shutting down" : "draining")};
}

grpc::Status WorkerService::Cancel(grpc::ServerContext* context, const v1::CancelRequest* request,
                                   v1::CancelResponse* response) {
  if (options_.secret) {
    if (grpc::Status auth = options_.secret->check(*context, "Worker.Cancel"); !auth.ok()) {
      return auth;
    }
  }
  std::shared_ptr<Call> call;
  {
    std::lock_guard lk(mu_);
    auto it = calls_.find(request->request_id());
    if (it != calls_.end()) call = it->second;
  }
  response->set_cancelled(call != nullptr && cancel_call(call));
  // A migrated request whose Generate never came (its client cancelled in between).
  if (call == nullptr && drop_held_import(request->request_id())) response->set_cancelled(true);
  if (response->cancelled()) {
    spdlog::info("worker {}: request {} cancelled by Cancel", options_.worker_id,
                 request->request_id());
  }
  return grpc::Status::OK;
}

bool WorkerService::cancel_call(const std::shared_ptr<Call>& call) {
  {
    std::lock_guard lk(mu_);
    auto it = calls_.find(call->request_id);
    if (it == calls_.end() || it->second != call) return false;
    // Unregistered now, not when the step loop gets to it, so the caller may reuse the id.
    calls_.erase(it);
    call->cancelled = true;
    cancels_.push_back(call);
  }
  wake_.notify_one();
  return true;
}

// ---------------------------------------------------------------------------------------
// The step loop

void WorkerService::post_task(std::function<void()> task) {
  {
    std::lock_guard lk(mu_);
    if (loop_stopped_) {
      MLA_THROW(kUnavailable, "worker {} is shutting down", options_.worker_id);
    }
    tasks_.push_back(std::move(task));
  }
  wake_.notify_one();
}

void WorkerService::step_loop() {
  while (true) {
    std::deque<std::shared_ptr<Call>> adds, cancels;
    std::deque<std::function<void()>> tasks;
    bool stopping = false;
    const auto heartbeat_interval = std::chrono::milliseconds(options_.idle_heartbeat_ms);
    {
      std::unique_lock lk(mu_);
      update_load_locked();
      // Held imports expire while idle too.
      auto wake_at = last_plan_ + heartbeat_interval;
      for (const auto& [id, held] : held_imports_) wake_at = std::min(wake_at, held.expires);
      // A stalled engine (work, but no step could run: a waiting request needs pages that an
      // import holds) waits for something to change instead of spinning.
      wake_.wait_until(lk, wake_at, [&] {
        return stopping_ || !adds_.empty() || !cancels_.empty() || !tasks_.empty() ||
               (engine_.has_work() && !stalled_);
      });
      adds.swap(adds_);
      cancels.swap(cancels_);
      tasks.swap(tasks_);
      stopping = stopping_;
      if (stopping) loop_stopped_ = true;  // tasks posted from now on are refused
    }
    // Tasks first: a migration's copy runs between steps, and its futures must be answered
    // even when the loop stops.
    for (auto& task : tasks) task();

    if (stopping) {
      const grpc::Status gone(grpc::StatusCode::UNAVAILABLE,
                              fmt::format("worker {} is shutting down", options_.worker_id));
      for (const auto& call : adds) {
        release_import(*call);
        fail_call(*call, gone);
      }
      fail_all_running(gone);
      std::lock_guard lk(mu_);
      update_load_locked();
      return;
    }
    expire_held_imports(Clock::now());

    // Whatever goes wrong, the loop must go on: every open stream waits on it.
    const int64_t steps_before = engine_.stats().steps;
    try {
      run_iteration(adds, cancels);
    } catch (const std::exception& e) {
      spdlog::error("worker {}: step loop error, ending {} requests: {}", options_.worker_id,
                    in_engine_.size(), e.what());
      const grpc::Status status = status_of(e);
      for (const auto& call : adds) {
        release_import(*call);
        fail_call(*call, status);
      }
      fail_all_running(status);
    }
    stalled_ = engine_.has_work() && engine_.stats().steps == steps_before;
    // Steps carry plans to the followers; without them, a heartbeat must, or they time out.
    // Inbox work that ends without a step (refusals, cancels of queued requests) does not
    // postpone it.
    if ((!engine_.has_work() || stalled_) && Clock::now() >= last_plan_ + heartbeat_interval) {
      last_plan_ = Clock::now();
      try {
        engine_.heartbeat();
      } catch (const std::exception& e) {
        // The group is broken; the next request's step fails and reports it to its client.
        spdlog::error("worker {}: heartbeat to the group's followers failed: {}",
                      options_.worker_id, e.what());
      }
    }
  }
}

void WorkerService::run_iteration(const std::deque<std::shared_ptr<Call>>& adds,
                                  const std::deque<std::shared_ptr<Call>>& cancels) {
  const Clock::time_point now = Clock::now();
  struct TraceLine {  // appends the step's line once it is delivered
    WorkerService& w;
    Clock::time_point begin;
    bool stepped = false;
    ~TraceLine() {
      if (!stepped || !w.step_trace_.is_open()) return;
      const Engine::StepRecord& r = w.engine_.last_step();
      const auto end = Clock::now();
      w.step_trace_ << fmt::format(
          "{{\"t\": {:.6f}, \"prefill_tokens\": {}, \"decode_seqs\": {}, \"context_tokens\": {}, "
          "\"prefill_pairs\": {}, \"step_ms\": {:.4f}, \"loop_ms\": {:.4f}}}\n",
          std::chrono::duration<double>(end - w.started_).count(), r.shape.prefill_tokens,
          r.shape.decode_seqs, r.shape.context_tokens, r.shape.prefill_pairs, r.step_ms,
          std::chrono::duration<double, std::milli>(end - begin).count());
      w.step_trace_.flush();  // a reader may look while the worker runs
    }
  } trace{*this, now};
  for (const auto& call : adds) {
    if (call->cancelled) {
      release_import(*call);
      finish_call(*call, new_message(*call), v1::FINISH_REASON_CANCELLED, now);
    } else {
      add_to_engine(call);
    }
  }
  for (const auto& call : cancels) {
    if (call->ended) continue;
    // Cancels run after adds, so a call not in the engine now has been refused.
    if (in_engine_.erase(call->engine_id) != 0) engine_.cancel(call->engine_id);
    finish_call(*call, new_message(*call), v1::FINISH_REASON_CANCELLED, now);
  }
  if (!engine_.has_work()) return;

  const Clock::time_point start = Clock::now();
  for (const auto& call : not_yet_stepped_) {
    if (!call->first_step) call->first_step = start;
  }
  not_yet_stepped_.clear();
  const int64_t steps_before = engine_.stats().steps;
  const std::vector<StepOutput> outputs = engine_.step();
  trace.stepped = engine_.stats().steps != steps_before;
  if (trace.stepped) last_plan_ = start;  // a try that ran no step sent the followers nothing
  const Clock::time_point done = Clock::now();
  const auto tokens = std::count_if(outputs.begin(), outputs.end(),
                                    [](const StepOutput& o) { return o.token >= 0; });
  {
    // Before delivering, so a client that has seen a token sees its pages in load().
    std::lock_guard lk(mu_);
    update_load_locked();
    if (tokens > 0) token_events_.emplace_back(done, tokens);
    const auto cutoff = done - std::chrono::milliseconds(options_.load_window_ms);
    while (!token_events_.empty() && token_events_.front().first < cutoff) {
      token_events_.pop_front();
    }
  }
  for (const StepOutput& out : outputs) deliver(out, done);
}

void WorkerService::update_load_locked() {
  load_.set_free_pages(engine_.cache().num_available());
  load_.set_running(engine_.num_running());
  load_.set_waiting(engine_.num_waiting());
  load_.set_preemptions(engine_.stats().preemptions);
  if (const PrefixIndex* prefix = engine_.cache().prefix_index()) {
    // The units kept for reuse, for cache-aware routing; listed again only when they (or, with
    // a lookup, their recency: the list is cut at the most recent) changed.
    const PrefixStats& st = prefix->stats();
    const int64_t version = st.inserted_pages + st.evicted_pages + st.lookups;
    if (version != reported_units_version_) {
      reported_units_version_ = version;
      const std::vector<uint64_t> keys = prefix->recent_keys(kReportedUnits);
      load_.mutable_cached_units()->Assign(keys.begin(), keys.end());
      load_.set_prefix_unit_tokens(engine_.cache().prefix_unit_tokens());
    }
  }
  if (Metrics* m = metrics_.load()) {
    m->cache.pages_used.set(load_.total_pages() - load_.free_pages());
    if (const PrefixIndex* prefix = engine_.cache().prefix_index()) {
      m->cache.update_prefix(prefix->stats(), prefix->kept());
    }
    m->requests.queue_depth.set(load_.waiting() + static_cast<double>(adds_.size()));
  }
}

void WorkerService::add_to_engine(const std::shared_ptr<Call>& call) {
  try {
    if (call->import_handle != 0) {
      // A migrated request: its imported latents become its computed tokens.
      const std::vector<int32_t>& tokens = call->request.prompt;
      call->engine_id = engine_.finish_import(
          call->import_handle,
          {call->request, tokens, static_cast<int32_t>(tokens.size()), Tensor(), 0});
      call->import_handle = 0;
    } else {
      call->engine_id = engine_.add_request(call->request);
    }
  } catch (const std::exception& e) {
    spdlog::info("worker {}: request {} refused by the engine: {}", options_.worker_id,
                 call->request_id, e.what());
    release_import(*call);
    fail_call(*call, status_of(e));
    return;
  }
  in_engine_.emplace(call->engine_id, call);
  not_yet_stepped_.push_back(call);
  spdlog::info("worker {}: request {} started: {} prompt tokens, {} resumed, {} to generate",
               options_.worker_id, call->request_id, call->prompt_tokens, call->resumed,
               call->request.max_tokens);
}

v1::GenerateResponse WorkerService::new_message(const Call& call) const {
  v1::GenerateResponse msg;
  msg.set_request_id(call.request_id);
  msg.set_worker_id(options_.worker_id);
  return msg;
}

void WorkerService::deliver(const StepOutput& out, Clock::time_point now) {
  auto it = in_engine_.find(out.id);
  if (it == in_engine_.end()) return;
  const std::shared_ptr<Call> call = it->second;
  if (out.finished) in_engine_.erase(it);

  v1::GenerateResponse msg = new_message(*call);
  if (out.token >= 0) {
    msg.add_token_ids(out.token);
    if (call->return_logprobs && !out.logits.empty()) {
      msg.add_logprobs(token_logprob(out.logits.data(), model_limits_.vocab_size, out.token));
      if (call->top_logprobs > 0) {
        v1::TopLogprobs* top = msg.add_top_logprobs();
        for (const auto& [id, lp] :
             top_logprobs(out.logits.data(), model_limits_.vocab_size, call->top_logprobs)) {
          top->add_token_ids(id);
          top->add_logprobs(lp);
        }
      }
    }
    ++call->generated;
    if (Metrics* m = metrics_.load()) {
      m->requests.tokens_generated.inc();
      if (call->first_token) {
        m->requests.inter_token_latency_seconds.observe(
            std::chrono::duration<double>(now - call->last_token).count());
      } else {
        m->requests.ttft_seconds.observe(
            std::chrono::duration<double>(now - call->arrival).count());
      }
    }
    if (!call->first_token) call->first_token = now;
    call->last_token = now;
    spdlog::debug("worker {}: request {} token {}", options_.worker_id, call->request_id,
                  out.token);
  }
  if (out.finished) {
    finish_call(*call, std::move(msg), to_proto(out.finish), now);
    return;
  }
  std::lock_guard lk(call->mu);
  call->outbox.push_back(std::move(msg));
  call->ready.notify_one();
}

void WorkerService::finish_call(Call& call, v1::GenerateResponse last, v1::FinishReason reason,
                                Clock::time_point now) {
  if (call.ended) return;
  call.ended = true;
  {
    std::lock_guard lk(mu_);
    auto it = calls_.find(call.request_id);
    if (it != calls_.end() && it->second.get() == &call) calls_.erase(it);
  }
  const double queue_ms = ms_between(call.arrival, call.first_step.value_or(now));
  const double ttft_ms = call.first_token ? ms_between(call.arrival, *call.first_token) : 0.0;
  const double total_ms = ms_between(call.arrival, call.first_token ? call.last_token : now);
  const int32_t completion = call.resumed + call.generated;
  spdlog::info(
      "worker {}: request {} finished ({}): {} tokens, queue {:.1f} ms, ttft {:.1f} ms, "
      "total {:.1f} ms",
      options_.worker_id, call.request_id, v1::FinishReason_Name(reason), completion, queue_ms,
      ttft_ms, total_ms);
  last.set_finish_reason(reason);
  last.mutable_usage()->set_prompt_tokens(call.prompt_tokens);
  last.mutable_usage()->set_completion_tokens(completion);
  last.mutable_timings()->set_queue_ms(queue_ms);
  last.mutable_timings()->set_ttft_ms(ttft_ms);
  last.mutable_timings()->set_total_ms(total_ms);

  std::lock_guard lk(call.mu);
  call.outbox.push_back(std::move(last));
  call.end = grpc::Status::OK;
  call.ready.notify_one();
}

void WorkerService::fail_call(Call& call, const grpc::Status& status) {
  if (call.ended) return;
  call.ended = true;
  {
    std::lock_guard lk(mu_);
    auto it = calls_.find(call.request_id);
    if (it != calls_.end() && it->second.get() == &call) calls_.erase(it);
  }
  std::lock_guard lk(call.mu);
  call.end = status;
  call.ready.notify_one();
}

void WorkerService::fail_all_running(const grpc::Status& status) {
  for (auto& [id, call] : in_engine_) {
    try {
      engine_.cancel(id);
    } catch (const std::exception& e) {
      spdlog::error("worker {}: cancelling request {} failed: {}", options_.worker_id,
                    call->request_id, e.what());
    }
    fail_call(*call, status);
  }
  in_engine_.clear();
  not_yet_stepped_.clear();
}

}  // namespace mla
