// CoordinatorService::Generate on gRPC's callback API: one Relay (a server write reactor) per
// client stream, and for each worker attempt one Attempt (a client read reactor) on the
// worker's Worker.Generate. Neither blocks a thread: an open stream is a few objects.
//
// The pipeline is strictly alternating, which keeps one message in the coordinator per stream
// and carries the client's pace back to the worker (flow control): read a message from the
// worker, write it to the client, and only when that write is done read the next one. When
// an attempt ends (Attempt::OnDone) the relay decides, as the contract in
// coordinator_service.h says: finish the stream, give the client the worker's error, or fail
// over to another worker with resume_ids = every token already sent. The client stream is
// finished only when no attempt is running, so a Relay is deleted (in OnDone) after its last
// Attempt.
//
// Locking: the coordinator's mu_ guards the registry and requests_ (the InFlight entry that
// lets Cancel, the monitor and shutdown reach the current attempt); the relay's own mu_
// guards the flags other threads set (client gone, write timed out). gRPC runs the reactions
// of application reactors on its own threads, never inline in the call that starts an
// operation or cancels one, so those calls may be made with a mutex held.
#include <grpcpp/alarm.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/proto_buffer_writer.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <set>

#include "kernels/error.h"
#include "rpc/coordinator_service.h"
#include "rpc/generate_request.h"
#include "rpc/request_limits.h"
#include "rpc/status.h"
#include "runtime/request_validation.h"
#include "runtime/text_stream.h"

namespace mla {

namespace v1 = mlaserve::v1;

namespace {

using Clock = std::chrono::steady_clock;

// How long an attempt's unexplained CANCELLED waits for the client's cancel to be heard.
inline constexpr std::chrono::milliseconds kCancelGrace{100};

// The checks that need no model (the wire's limits, what a client may not set, and
// validate_request's model-free part); returns the Request the client asks for.
Request checked_without_model(const v1::GenerateRequest& r, size_t max_prompt_ids) {
  check_request_id(r.request_id());
  // Before the request is copied: the message limit admits tens of millions of ids.
  MLA_REQUIRE(static_cast<size_t>(r.prompt_ids_size()) <= max_prompt_ids,
              "prompt_ids: {} ids (limit {})", r.prompt_ids_size(), max_prompt_ids);
  MLA_REQUIRE(r.resume_ids_size() == 0,
              "resume_ids: set by the coordinator on failover; clients resume a broken stream "
              "with received_ids");
  Request wanted = to_request(r);
  validate_request(wanted, kPromptField);
  MLA_REQUIRE(r.received_ids_size() < r.max_tokens(),
              "received_ids: {} tokens received of max_tokens {}: nothing is left to generate",
              r.received_ids_size(), r.max_tokens());
  return wanted;
}

// Worker errors after which the request moves to another worker. The rest (bad input,
// admission, deadline) would fail the same way anywhere and go back to the client.
bool fails_over(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::INTERNAL:
    case grpc::StatusCode::UNKNOWN:
    case grpc::StatusCode::ABORTED:
    case grpc::StatusCode::DATA_LOSS:
    case grpc::StatusCode::CANCELLED:  // only reached when neither the client nor we cancelled
      return true;
    default:
      return false;
  }
}

std::string describe(const grpc::Status& status) {
  return fmt::format("{}: {}", grpc_code_name(status.error_code()), status.error_message());
}

// A worker answering a refusal because it drains says so in its trailing metadata.
bool refused_while_draining(const grpc::ClientContext& call) {
  const auto& trailers = call.GetServerTrailingMetadata();
  const auto it = trailers.find("mlaserve-worker-state");
  return it != trailers.end() && it->second == "draining";
}

double seconds_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

// Parses a request that arrived as bytes; INVALID_ARGUMENT saying what it is not, for bytes
// that do not parse (gRPC's own failure would be INTERNAL with no message).
template <typename Message>
grpc::Status parse(const grpc::ByteBuffer& bytes, Message* message) {
  grpc::ByteBuffer copy(bytes);  // a reference to the same slices
  const grpc::Status status = grpc::SerializationTraits<Message>::Deserialize(&copy, message);
  if (status.ok()) return status;
  return {grpc::StatusCode::INVALID_ARGUMENT,
          fmt::format("the request ({} bytes) is not a valid {}", bytes.Length(),
                      Message::descriptor()->full_name())};
}

// Replaces `out` with `message`'s bytes.
void serialize(const google::protobuf::Message& message, grpc::ByteBuffer* out) {
  out->Clear();  // the writer appends to an empty buffer only
  bool own_buffer = false;
  const grpc::Status status =
      grpc::GenericSerialize<grpc::ProtoBufferWriter, google::protobuf::Message>(message, out,
                                                                                 &own_buffer);
  MLA_CHECK(status.ok(), "serializing a {}: {}", message.GetTypeName(), status.error_message());
}

}  // namespace

class CoordinatorService::Relay final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  Relay(CoordinatorService& service, grpc::CallbackServerContext* context)
      : service_(service), context_(context), arrival_(Clock::now()) {}

  // Parses, validates and admits the request, then starts the first attempt (or finishes at
  // once).
  void start(const grpc::ByteBuffer& request);

  // The monitor's check: cancels the stream when a write to the client has waited longer
  // than `timeout` (the client stopped reading). Called with the coordinator's mu_ held.
  void cancel_if_write_stalled(Clock::time_point now, std::chrono::milliseconds timeout);

  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

  // The prompt and every token the client has; any thread.
  int32_t context_tokens() const { return context_tokens_.load(); }
  // Tokens the request may still generate (max_tokens less those the client has); any thread.
  int32_t tokens_left() const { return final_tokens_.load() - context_tokens_.load(); }

 private:
  class Attempt;

  // How an attempt ended: the flags the relay, Cancel, the monitor and shutdown set.
  struct AttemptEnd {
    std::string worker_id;
    bool cancel_requested = false;  // the Cancel RPC
    bool worker_lost = false;       // the monitor declared the worker dead
    bool shutting_down = false;
    bool client_gone = false;
    bool write_timed_out = false;
    std::string migrating_to;  // a migration's target was importing the request
  };

  // Routes the request to a worker it has not tried and streams from it, or finishes the
  // stream when it is cancelled or no worker is left.
  void start_attempt();
  // The router's choice for `prompt` among the live workers not tried yet, or null; the
  // coordinator's mu_ held.
  WorkerEntry* pick_worker_locked(const std::vector<int32_t>& prompt);
  // Starts the attempt on `worker` with resume_ids = the tokens sent so far, and makes it
  // reachable through `flight`; the coordinator's mu_ held.
  // `migrated`: the worker holds the request's cache, imported from the attempt before.
  void stream_from_locked(WorkerEntry& worker, InFlight& flight, Clock::time_point dispatch,
                          bool migrated);
  void on_worker_message(v1::GenerateResponse message);
  // After an attempt: finish the stream, give the client the worker's error, or fail over.
  void on_attempt_done(const grpc::Status& status);
  // What follows an ended attempt: finish, fail over, or move on after a migration.
  void decide(const AttemptEnd& end, const grpc::Status& status);
  // Takes the ended attempt out, reads the flags and updates its worker's state (a worker
  // refusing as draining stops being routed to; one refusing connections is dead).
  AttemptEnd end_attempt(const grpc::Status& status);
  // Moves the request to another worker, unless every token has arrived (the closing
  // message is written) or max_failovers is reached (UNAVAILABLE).
  void fail_over(const AttemptEnd& end, const grpc::Status& status);
  // What to do with a worker message: turns it into the client's message; false when it is
  // to be dropped (after the end, or the client is gone).
  bool relay_message(v1::GenerateResponse& message);
  // The closing message the coordinator writes itself (cancelled, or complete when the worker
  // died after the last token but before its final message), then the stream ends with OK.
  void write_closing_and_finish(v1::FinishReason reason, const std::string& worker_id);
  void finish(const grpc::Status& status);
  void write(const v1::GenerateResponse& message);

  CoordinatorService& service_;
  grpc::CallbackServerContext* const context_;
  const Clock::time_point arrival_;
  v1::GenerateRequest request_;         // the client's
  v1::GenerateRequest worker_request_;  // as sent to the workers (resume_ids per attempt)
  std::string request_id_;
  bool admitted_ = false;
  grpc::Status final_status_;

  // Touched by one reaction at a time (reads and writes alternate; attempts follow one
  // another), except where noted.
  std::unique_ptr<Attempt> attempt_;
  std::vector<int32_t> sent_;  // every token the client has, over all attempts
  std::set<std::string> tried_;
  int32_t failovers_ = 0;
  std::string failed_worker_;  // the last worker that failed, and why
  std::string failure_;
  std::string migrate_to_;  // the next attempt goes there, with the migrated cache
  std::string migrated_from_;
  std::atomic<int32_t> context_tokens_{0};
  std::atomic<int32_t> final_tokens_{0};  // prompt + max_tokens
  bool finished_ = false;                 // the current attempt delivered the final message
  // With a text prompt or stop strings: the generated text (rpc/../runtime/text_stream.h).
  std::optional<TextStream> text_;
  bool stop_worker_ = false;  // a stop string ended the stream: cancel the worker's request
  std::optional<Clock::time_point> first_token_at_;
  Clock::time_point first_token_dispatch_{};
  Clock::time_point last_token_at_{};
  v1::GenerateResponse out_;    // the message being written
  grpc::ByteBuffer out_bytes_;  // ... serialized

  std::mutex mu_;  // guards the fields below
  bool client_gone_ = false;
  // Holds an unexplained CANCELLED back for kCancelGrace (on_attempt_done).
  grpc::Alarm cancel_grace_;
  std::optional<Clock::time_point> write_started_;
  bool write_timed_out_ = false;
};

// One worker call. Holds the call open (AddHold) until the relay stops reading, since reads
// are started from the relay's write completions, outside this reactor's reactions.
class CoordinatorService::Relay::Attempt final
    : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  Attempt(Relay& relay, std::string worker_id, std::shared_ptr<v1::Worker::StubInterface> stub,
          Clock::time_point dispatch)
      : relay_(relay),
        worker_id_(std::move(worker_id)),
        stub_(std::move(stub)),
        dispatch_(dispatch) {}

  void start(const v1::GenerateRequest& request, const CoordinatorOptions& options,
             grpc::CallbackServerContext& server_context) {
    call_ = grpc::ClientContext::FromCallbackServerContext(server_context);
    if (options.secret) options.secret->attach(*call_);
    stub_->async()->Generate(call_.get(), &request, this);
    AddHold();
    StartRead(&message_);
    StartCall();
  }
  // The next message (after a cancel: a read that ends at once, letting the call end).
  void read_next() { StartRead(&message_); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      RemoveHold();  // the stream has ended: OnDone follows
      return;
    }
    relay_.on_worker_message(std::move(message_));
  }
  void OnDone(const grpc::Status& status) override { relay_.on_attempt_done(status); }

  grpc::ClientContext* call() const { return call_.get(); }
  const std::string& worker_id() const { return worker_id_; }
  const std::shared_ptr<v1::Worker::StubInterface>& stub() const { return stub_; }
  Clock::time_point dispatch() const { return dispatch_; }
  size_t sent_before = 0;  // tokens the client had when this attempt started
  // A prefill worker's attempt: the request moves to a decode worker after its first token.
  bool hand_off = false;

 private:
  Relay& relay_;
  const std::string worker_id_;
  const std::shared_ptr<v1::Worker::StubInterface> stub_;
  const Clock::time_point dispatch_;
  std::unique_ptr<grpc::ClientContext> call_;
  v1::GenerateResponse message_;
};

grpc::ServerWriteReactor<grpc::ByteBuffer>* CoordinatorService::Generate(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  auto* relay = new Relay(*this, context);
  relay->start(*request);
  return relay;
}

grpc::ServerUnaryReactor* CoordinatorService::Cancel(grpc::CallbackServerContext* context,
                                                     const grpc::ByteBuffer* request,
                                                     grpc::ByteBuffer* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  v1::CancelRequest cancel_request;
  grpc::Status status = parse(*request, &cancel_request);
  if (status.ok()) {
    v1::CancelResponse cancelled;
    cancelled.set_cancelled(cancel(cancel_request.request_id()));
    serialize(cancelled, response);
  }
  reactor->Finish(status);
  return reactor;
}

void CoordinatorService::Relay::start(const grpc::ByteBuffer& request) {
  grpc::Status admitted = parse(request, &request_);
  try {
    if (admitted.ok()) {
      const Tokenizer* tokenizer = service_.options_.tokenizer.get();
      // A text prompt is at most a few bytes per id.
      encode_text(request_, tokenizer, 8 * service_.options_.max_prompt_ids);
      if (tokenizer != nullptr && (!request_.prompt().empty() || request_.stop_size() > 0 ||
                                   request_.messages_size() > 0 || request_.return_text())) {
        text_.emplace(*tokenizer,
                      std::vector<std::string>(request_.stop().begin(), request_.stop().end()));
        // What a resumed stream's client has: its text was sent by the first coordinator.
        for (int32_t id : request_.received_ids()) text_->push(id);
      }
      const Request wanted = checked_without_model(request_, service_.options_.max_prompt_ids);
      admitted = service_.admit(request_, wanted, &request_id_, this);
    }
  } catch (const Error& e) {
    admitted = to_grpc_status(e);
  }
  if (!admitted.ok()) {
    // Debug, not info: refusals can come thousands a second (the metrics count them).
    spdlog::debug("request '{}' refused: {}", request_.request_id(), admitted.error_message());
    if (service_.metrics_ && admitted.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      service_.metrics_->admission_rejections.inc();
    }
    finish(admitted);
    return;
  }
  admitted_ = true;
  if (service_.metrics_) {
    service_.metrics_->in_flight.inc();
    service_.metrics_->prompt_tokens.inc(request_.prompt_ids_size());
  }
  worker_request_ = request_;
  worker_request_.set_request_id(request_id_);
  worker_request_.clear_received_ids();
  worker_request_.clear_prompt();  // the workers take ids
  worker_request_.clear_messages();
  worker_request_.clear_return_text();
  worker_request_.clear_stop();
  sent_.assign(request_.received_ids().begin(), request_.received_ids().end());
  context_tokens_ = request_.prompt_ids_size() + static_cast<int32_t>(sent_.size());
  final_tokens_ = request_.prompt_ids_size() + request_.max_tokens();
  start_attempt();
}

void CoordinatorService::Relay::start_attempt() {
  if (context_->IsCancelled()) {
    finish({grpc::StatusCode::CANCELLED, fmt::format("request {}: cancelled", request_id_)});
    return;
  }
  bool cancel_requested = false;
  std::optional<grpc::Status> refusal;
  const std::vector<int32_t> prompt(request_.prompt_ids().begin(), request_.prompt_ids().end());
  const auto dispatch = Clock::now();
  {
    std::lock_guard lock(service_.mu_);
    InFlight& flight = service_.requests_.at(request_id_);
    cancel_requested = flight.cancel_requested;
    if (service_.shutting_down_) {
      refusal = grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down");
    } else if (!cancel_requested) {
      // After a migration, the target that holds the request's cache, while it lives.
      WorkerEntry* worker = nullptr;
      if (auto it = service_.workers_.find(migrate_to_);
          it != service_.workers_.end() && it->second.state == WorkerState::kAlive) {
        worker = &it->second;
      }
      const bool migrated = worker != nullptr;
      migrate_to_.clear();
      if (!worker) worker = pick_worker_locked(prompt);
      if (worker) {
        stream_from_locked(*worker, flight, dispatch, migrated);
      } else if (failed_worker_.empty()) {
        refusal = grpc::Status(grpc::StatusCode::UNAVAILABLE, "no worker is alive");
      } else {
        refusal = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                               fmt::format("request {}: worker {} failed ({}) after {} tokens and "
                                           "no other worker is alive",
                                           request_id_, failed_worker_, failure_, sent_.size()));
      }
    }
  }
  if (cancel_requested) {
    write_closing_and_finish(v1::FINISH_REASON_CANCELLED, failed_worker_);
    return;
  }
  if (refusal) finish(*refusal);
}

CoordinatorService::WorkerEntry* CoordinatorService::Relay::pick_worker_locked(
    const std::vector<int32_t>& prompt) {
  // A new request starts on a worker that prefills (prefill or both); decode workers take it
  // only when no such worker is left.
  const bool fresh =
      sent_.size() == static_cast<size_t>(request_.received_ids_size()) && failovers_ == 0;
  std::vector<WorkerView> views;
  views.reserve(service_.workers_.size());
  bool prefill_left = false;
  for (const auto& [id, w] : service_.workers_) {
    prefill_left = prefill_left || (w.state == WorkerState::kAlive && !tried_.contains(id) &&
                                    w.role != Role::kDecode);
  }
  for (const auto& [id, w] : service_.workers_) {
    views.push_back({.id = id,
                     .routable = w.state == WorkerState::kAlive && !tried_.contains(id) &&
                                 !(fresh && prefill_left && w.role == Role::kDecode),
                     .free_pages = w.load.free_pages(),
                     .total_pages = w.load.total_pages(),
                     .running = w.load.running(),
                     .waiting = w.load.waiting(),
                     .in_flight = w.in_flight,
                     .cached_units = w.cached_units,
                     .unit_tokens = w.unit_tokens,
                     .units_epoch = w.units_epoch});
  }
  const std::optional<std::string> picked = service_.router_.pick(views, prompt);
  return picked ? &service_.workers_.at(*picked) : nullptr;
}

void CoordinatorService::Relay::stream_from_locked(WorkerEntry& worker, InFlight& flight,
                                                   Clock::time_point dispatch, bool migrated) {
  ++worker.in_flight;
  if (migrated) {
    spdlog::info("request {}: continues on {} with its cache (migrated from {}) after {} tokens",
                 request_id_, worker.id, migrated_from_, sent_.size());
  } else if (failovers_ == 0) {
    spdlog::debug("request {}: routed to {}", request_id_, worker.id);
  } else {
    spdlog::warn("request {}: failover {}/{} from {} to {} after {} tokens ({})", request_id_,
                 failovers_, service_.options_.max_failovers, failed_worker_, worker.id,
                 sent_.size(), failure_);
  }
  attempt_ = std::make_unique<Attempt>(*this, worker.id, worker.stub, dispatch);
  attempt_->sent_before = sent_.size();
  attempt_->hand_off = worker.role == Role::kPrefill;
  worker_request_.mutable_resume_ids()->Assign(sent_.begin(), sent_.end());
  worker_request_.set_migrated(migrated);
  // The context exists from here on, so Cancel and the monitor can reach it. The attempt may
  // end (and be taken from attempt_) on another thread once started, but not before this
  // lock is released.
  Attempt* attempt = attempt_.get();
  attempt->start(worker_request_, service_.options_, *context_);
  flight.worker_call = attempt->call();
  flight.worker_id = worker.id;
  flight.worker_lost = false;
}

bool CoordinatorService::Relay::relay_message(v1::GenerateResponse& message) {
  {
    std::lock_guard lock(mu_);
    if (finished_ || client_gone_) return false;  // drain whatever follows the end
  }
  sent_.insert(sent_.end(), message.token_ids().begin(), message.token_ids().end());
  context_tokens_ = request_.prompt_ids_size() + static_cast<int32_t>(sent_.size());
  const auto received = Clock::now();
  CoordinatorMetrics* metrics = service_.metrics_.get();
  if (message.token_ids_size() > 0) {
    if (metrics) {
      metrics->tokens_generated.inc(message.token_ids_size());
      if (first_token_at_) {
        metrics->inter_token_latency_seconds.observe(seconds_between(last_token_at_, received));
      } else {
        metrics->ttft_seconds.observe(seconds_between(arrival_, received));
      }
    }
    last_token_at_ = received;
    if (!first_token_at_) {
      first_token_at_ = received;
      first_token_dispatch_ = attempt_->dispatch();
    }
  }
  message.set_request_id(request_id_);
  if (message.worker_id().empty()) message.set_worker_id(attempt_->worker_id());
  if (text_) {
    std::string text;
    for (int32_t id : message.token_ids()) {
      text += text_->push(id);
      if (text_->stopped()) break;
    }
    if (text_->stopped() && message.finish_reason() == v1::FINISH_REASON_UNSPECIFIED) {
      // A stop string: the stream ends here and the worker stops generating.
      message.set_finish_reason(v1::FINISH_REASON_STOP);
      stop_worker_ = true;
    } else if (message.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      text += text_->finish();
    }
    message.set_text(std::move(text));
  }
  if (attempt_->hand_off && message.token_ids_size() > 0 &&
      message.finish_reason() == v1::FINISH_REASON_UNSPECIFIED) {
    // Prefilled: on to a decode worker (disaggregated serving), as a migration.
    attempt_->hand_off = false;
    std::lock_guard lock(service_.mu_);
    service_.queue_handoff_locked(request_id_);
  }
  if (message.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
    finished_ = true;
    // Usage and timings span all attempts. queue_ms: the worker's queue time counts when its
    // attempt produced the first token; an earlier attempt's died with it.
    const size_t received_ids = request_.received_ids_size();
    const double worker_queue_ms =
        attempt_->sent_before == received_ids ? message.timings().queue_ms() : 0.0;
    message.mutable_usage()->set_prompt_tokens(request_.prompt_ids_size());
    message.mutable_usage()->set_completion_tokens(static_cast<int32_t>(sent_.size()));
    v1::Timings* timings = message.mutable_timings();
    timings->set_total_ms(ms_between(arrival_, received));
    if (first_token_at_) {
      const double ttft = ms_between(arrival_, *first_token_at_);
      timings->set_ttft_ms(ttft);
      timings->set_queue_ms(
          std::min(ttft, ms_between(arrival_, first_token_dispatch_) + worker_queue_ms));
    } else {
      timings->set_ttft_ms(0);
      timings->set_queue_ms(ms_between(arrival_, attempt_->dispatch()) + worker_queue_ms);
    }
  }
  return true;
}

void CoordinatorService::Relay::on_worker_message(v1::GenerateResponse message) {
  if (!relay_message(message)) {
    attempt_->read_next();
    return;
  }
  if (stop_worker_) attempt_->call()->TryCancel();  // the attempt ends; the relay is finished
  write(message);
}

void CoordinatorService::Relay::write(const v1::GenerateResponse& message) {
  serialize(message, &out_bytes_);
  {
    std::lock_guard lock(mu_);
    write_started_ = Clock::now();
  }
  StartWrite(&out_bytes_);
}

void CoordinatorService::Relay::OnWriteDone(bool ok) {
  bool gone = false;
  {
    std::lock_guard lock(mu_);
    write_started_.reset();
    if (!ok) client_gone_ = true;
    gone = client_gone_;
  }
  if (!attempt_) return;  // the closing message: Finish follows through StartWriteAndFinish
  if (gone) attempt_->call()->TryCancel();
  // The next message; after a cancel, a read that ends at once and lets the attempt end.
  attempt_->read_next();
}

void CoordinatorService::Relay::OnCancel() {
  {
    std::lock_guard lock(mu_);
    client_gone_ = true;
  }
  std::lock_guard lock(service_.mu_);
  auto it = service_.requests_.find(request_id_);
  if (admitted_ && it != service_.requests_.end() && it->second.worker_call) {
    it->second.worker_call->TryCancel();
  }
}

void CoordinatorService::Relay::cancel_if_write_stalled(Clock::time_point now,
                                                        std::chrono::milliseconds timeout) {
  {
    std::lock_guard lock(mu_);
    if (!write_started_ || write_timed_out_ || now - *write_started_ < timeout) return;
    write_timed_out_ = true;
  }
  spdlog::warn("request {}: the client took no message for {} ms; cancelling the stream",
               request_id_, timeout.count());
  if (service_.metrics_) service_.metrics_->write_timeouts.inc();
  context_->TryCancel();  // the write completes with ok = false, and OnCancel follows
}

void CoordinatorService::Relay::on_attempt_done(const grpc::Status& status) {
  const AttemptEnd end = end_attempt(status);
  if (status.error_code() == grpc::StatusCode::CANCELLED && !end.client_gone &&
      !end.cancel_requested && !end.write_timed_out && !end.shutting_down && !finished_) {
    // A CANCELLED nobody here asked for: often the client's own cancel, which reaches the
    // worker call (through the propagated context) before this relay hears of it (OnCancel).
    // Wait a little for that before treating it as the worker's failure.
    cancel_grace_.Set(std::chrono::system_clock::now() + kCancelGrace, [this, end, status](bool) {
      AttemptEnd now = end;
      {
        std::lock_guard lock(mu_);
        now.client_gone = client_gone_;
      }
      decide(now, status);
    });
    return;
  }
  decide(end, status);
}

void CoordinatorService::Relay::decide(const AttemptEnd& end, const grpc::Status& status) {
  if (finished_) {
    finish(grpc::Status::OK);
    return;
  }
  if (end.write_timed_out) {
    finish({grpc::StatusCode::CANCELLED,
            fmt::format("request {}: the client took no message for {} ms", request_id_,
                        service_.options_.stream_write_timeout_ms)});
    return;
  }
  if (end.client_gone || context_->IsCancelled()) {
    spdlog::debug("request {}: cancelled by the client after {} tokens", request_id_, sent_.size());
    finish({grpc::StatusCode::CANCELLED,
            fmt::format("request {}: cancelled by the client", request_id_)});
    return;
  }
  if (end.cancel_requested) {
    spdlog::info("request {}: cancelled after {} tokens", request_id_, sent_.size());
    write_closing_and_finish(v1::FINISH_REASON_CANCELLED, end.worker_id);
    return;
  }
  if (end.shutting_down) {
    finish({grpc::StatusCode::UNAVAILABLE, "coordinator shutting down"});
    return;
  }
  if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED ||
      std::chrono::system_clock::now() >= context_->deadline()) {
    finish(
        {grpc::StatusCode::DEADLINE_EXCEEDED,
         fmt::format("request {}: deadline exceeded after {} tokens", request_id_, sent_.size())});
    return;
  }
  if (!end.migrating_to.empty()) {
    // The source stopped the request for its migration (ABORTED), or failed meanwhile: the
    // target continues it, from the imported cache if it has it, else recomputing it.
    migrate_to_ = end.migrating_to;
    migrated_from_ = end.worker_id;
    start_attempt();
    return;
  }
  if (!end.worker_lost && !status.ok() && !fails_over(status.error_code())) {
    spdlog::info("request {}: worker {} answered {}", request_id_, end.worker_id, describe(status));
    finish(status);
    return;
  }
  fail_over(end, status);
}

CoordinatorService::Relay::AttemptEnd CoordinatorService::Relay::end_attempt(
    const grpc::Status& status) {
  std::unique_ptr<Attempt> attempt;
  {
    // start_attempt holds the coordinator's mu_ from creating the attempt to starting it.
    std::lock_guard lock(service_.mu_);
    attempt = std::move(attempt_);
  }
  AttemptEnd end{.worker_id = attempt->worker_id()};
  {
    std::lock_guard lock(mu_);
    end.client_gone = client_gone_;
    end.write_timed_out = write_timed_out_;
  }
  std::lock_guard lock(service_.mu_);
  InFlight& flight = service_.requests_.at(request_id_);
  flight.worker_call = nullptr;
  end.cancel_requested = flight.cancel_requested;
  end.worker_lost = flight.worker_lost;
  end.migrating_to = std::move(flight.migrating_to);
  flight.migrating_to.clear();
  end.shutting_down = service_.shutting_down_;
  WorkerEntry& worker = service_.workers_.at(end.worker_id);
  --worker.in_flight;
  // A worker that refused because it drains stops being routed to; one refusing connections
  // is gone: unless it re-registered meanwhile (new stub), it is dead until it does.
  const bool failed = !finished_ && !end.client_gone && !end.cancel_requested &&
                      !end.shutting_down && status.error_code() == grpc::StatusCode::UNAVAILABLE &&
                      worker.stub == attempt->stub();
  if (failed && refused_while_draining(*attempt->call())) {
    worker.worker_draining = true;
    update_state_locked(worker);
    service_.publish_readiness_locked();
  } else if (failed) {
    service_.mark_dead_locked(worker, fmt::format("request {}: {}", request_id_, describe(status)),
                              /*cancel_attempts=*/false);
  }
  return end;
}

void CoordinatorService::Relay::fail_over(const AttemptEnd& end, const grpc::Status& status) {
  failed_worker_ = end.worker_id;
  failure_ = end.worker_lost ? std::string("worker stopped heartbeating")
             : status.ok()   ? std::string("stream ended without a final message")
                             : describe(status);
  tried_.insert(end.worker_id);
  if (sent_.size() >= static_cast<size_t>(request_.max_tokens())) {
    // Every token arrived; only the final message was lost.
    write_closing_and_finish(v1::FINISH_REASON_LENGTH, end.worker_id);
    return;
  }
  if (failovers_ >= service_.options_.max_failovers) {
    spdlog::error("request {}: worker {} failed ({}) after {} tokens; gave up after {} failovers",
                  request_id_, end.worker_id, failure_, sent_.size(), failovers_);
    finish({grpc::StatusCode::UNAVAILABLE,
            fmt::format("request {}: worker {} failed ({}); gave up after {} failovers",
                        request_id_, end.worker_id, failure_, failovers_)});
    return;
  }
  ++failovers_;
  if (service_.metrics_) service_.metrics_->failovers.inc();
  start_attempt();
}

void CoordinatorService::Relay::write_closing_and_finish(v1::FinishReason reason,
                                                         const std::string& worker_id) {
  out_.Clear();
  out_.set_request_id(request_id_);
  out_.set_worker_id(worker_id);
  out_.set_finish_reason(reason);
  out_.mutable_usage()->set_prompt_tokens(request_.prompt_ids_size());
  out_.mutable_usage()->set_completion_tokens(static_cast<int32_t>(sent_.size()));
  const auto now = Clock::now();
  out_.mutable_timings()->set_total_ms(ms_between(arrival_, now));
  if (first_token_at_) {
    out_.mutable_timings()->set_ttft_ms(ms_between(arrival_, *first_token_at_));
    out_.mutable_timings()->set_queue_ms(ms_between(arrival_, first_token_dispatch_));
  }
  final_status_ = grpc::Status::OK;
  serialize(out_, &out_bytes_);
  {
    std::lock_guard lock(mu_);
    write_started_ = Clock::now();  // a client that stopped reading times out here too
  }
  StartWriteAndFinish(&out_bytes_, grpc::WriteOptions(), grpc::Status::OK);
}

void CoordinatorService::Relay::finish(const grpc::Status& status) {
  final_status_ = status;
  Finish(status);
}

void CoordinatorService::Relay::OnDone() {
  CoordinatorMetrics* metrics = service_.metrics_.get();
  if (metrics) {
    metrics->requests_total(grpc_code_name(final_status_.error_code())).inc();
    if (admitted_) {
      metrics->in_flight.dec();
      const double total = seconds_between(arrival_, Clock::now());
      metrics->request_duration_seconds.observe(total);
      const size_t generated = sent_.size() - request_.received_ids_size();
      if (first_token_at_ && generated > 1) {
        metrics->time_per_output_token_seconds.observe(
            seconds_between(*first_token_at_, last_token_at_) / static_cast<double>(generated - 1));
      }
    }
  }
  if (admitted_) {
    std::lock_guard lock(service_.mu_);
    service_.requests_.erase(request_id_);
    if (service_.requests_.empty()) service_.idle_cv_.notify_all();
  }
  delete this;
}

int32_t CoordinatorService::context_tokens(const Relay& relay) { return relay.context_tokens(); }
int32_t CoordinatorService::tokens_left(const Relay& relay) { return relay.tokens_left(); }

void CoordinatorService::cancel_stalled_writes_locked(Clock::time_point now) {
  const auto timeout = std::chrono::milliseconds(options_.stream_write_timeout_ms);
  for (auto& [id, flight] : requests_) {
    if (flight.relay) flight.relay->cancel_if_write_stalled(now, timeout);
  }
}

}  // namespace mla
