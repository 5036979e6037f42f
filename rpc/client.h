// The C++ client of the mlaserve Coordinator's client plane
// (rpc/proto/mlaserve/v1/mlaserve.proto), over one coordinator or several.
//
//   mla::Client client({"10.0.0.1:50051", "10.0.0.2:50051"});  // or "127.0.0.1:50051"
//   client.wait_until_ready(std::chrono::seconds(30));
//   mlaserve::v1::GenerateRequest req;
//   req.add_prompt_ids(1); req.set_max_tokens(16);
//   auto result = client.generate(req, [](const auto& msg) { /* tokens as they come */ });
//
// Failures throw mla::Error whose code follows the gRPC status (error_code_from_grpc) and
// whose message is "<STATUS_NAME>: <the server's message>", e.g.
// "INVALID_ARGUMENT: prompt_ids: must not be empty".
//
// Several coordinators: calls go to the first one that answers. When a generate() stream
// breaks (its coordinator died or stopped: UNAVAILABLE, or INTERNAL / UNKNOWN before the
// final message), the client resumes it on the next coordinator, sending the tokens it
// already received as received_ids under the same request_id, so the caller sees one stream
// with nothing lost or repeated.
//
// Thread safety: a Client is thread-safe; all calls may run concurrently on one Client (they
// share one channel per coordinator; each call has its own context), e.g. cancel() from one
// thread while generate() streams on another.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "mlaserve/v1/mlaserve.grpc.pb.h"
#include "mlaserve/v1/mlaserve.pb.h"
#include "rpc/shared_secret.h"
#include "rpc/status.h"

namespace mla {

struct ClientOptions {
  // Largest message the client accepts. Default: 64 MiB.
  int max_receive_message_bytes = 64 << 20;
  // Deadline of each unary call (cancel, health, list_workers); 0 = none. Default: 10 s.
  std::chrono::milliseconds unary_deadline{10000};
  // Channel credentials (rpc/tls_credentials.h). Default: null, meaning plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // Times one generate() resumes a broken stream (on the next coordinator, round the list)
  // before it gives up with the last error; the waits between tries grow from 100 ms to 1 s.
  // Default: 8.
  int max_resumes = 8;
  // Own TCP connections instead of sharing them with the process's other channels to the
  // same address (each connection carries about 100 streams at once). Default: false.
  bool own_connections = false;
};

struct GenerateResult {
  std::string request_id;       // as the server reported it (assigned when the request had none)
  std::vector<int32_t> tokens;  // all generated tokens, in order
  std::string text;             // the messages' text, for text prompts and stop strings
  std::vector<float> logprobs;  // parallel to tokens when return_logprobs was set
  mlaserve::v1::FinishReason finish = mlaserve::v1::FINISH_REASON_UNSPECIFIED;
  mlaserve::v1::Usage usage;      // from the last message
  mlaserve::v1::Timings timings;  // server-side, from the last message
  // Distinct worker groups that produced tokens, in order of first appearance (more than
  // one after a failover or migration).
  std::vector<std::string> worker_ids;
  // Coordinators that served the stream, in order (more than one after a resume).
  std::vector<std::string> coordinators;
  int32_t num_messages = 0;
  // Measured by the client from the call's start.
  double client_ttft_ms = 0.0;   // to the first message with tokens
  double client_total_ms = 0.0;  // to the end of the stream
};

// The ErrorCode for a gRPC status code (codes without a counterpart map to the closest:
// CANCELLED and ABORTED -> kUnavailable, ALREADY_EXISTS -> kInvalidArgument,
// PERMISSION_DENIED / UNAUTHENTICATED -> kFailedPrecondition, others -> kInternal).
ErrorCode error_code_from_grpc(grpc::StatusCode code);
// mla::Error(error_code_from_grpc(code), "<NAME>: <message>") for a failed status.
Error error_from_grpc_status(const grpc::Status& status);

class Client {
 public:
  // Creates a channel to each coordinator ("host:port"; `addresses` may also be one string
  // of comma-separated addresses); connecting is lazy, so this does not fail when no server
  // is up yet. Throws kInvalidArgument for an empty list or address.
  explicit Client(const std::string& addresses, ClientOptions options = {});
  explicit Client(const std::vector<std::string>& addresses, ClientOptions options = {});

  // Sends a request and reads its stream to the end, calling on_message (if set) for each
  // message as it arrives, on the calling thread; a stream that breaks is resumed on
  // another coordinator (see above). deadline 0 = none; otherwise the whole call, resumes
  // included, must finish within it (kDeadlineExceeded). If on_message throws, the call is
  // cancelled and the exception propagates. Throws mla::Error when the server answers with
  // an error or no coordinator can be reached.
  GenerateResult generate(
      const mlaserve::v1::GenerateRequest& request,
      const std::function<void(const mlaserve::v1::GenerateResponse&)>& on_message = {},
      std::chrono::milliseconds deadline = std::chrono::milliseconds{0});

  // Cancels a running request (on the coordinator serving its stream from this client, else
  // on each); false when it is not running (finished or unknown).
  bool cancel(const std::string& request_id);
  // From the first coordinator that answers.
  mlaserve::v1::HealthResponse health();
  mlaserve::v1::ListWorkersResponse list_workers();

  // Polls health() until a coordinator is serving with at least one live worker (true) or
  // `timeout` passes (false). Errors while polling (servers not up yet) are not thrown.
  bool wait_until_ready(std::chrono::milliseconds timeout);

  const std::vector<std::string>& addresses() const { return addresses_; }

 private:
  struct Coordinator {
    std::string address;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<mlaserve::v1::Coordinator::Stub> stub;
  };
  void set_unary_deadline(grpc::ClientContext& ctx) const;
  // Runs a unary call on each coordinator from the preferred one until one answers without
  // UNAVAILABLE; that answer (or the last failure) is returned.
  grpc::Status first_answer(
      const std::function<grpc::Status(Coordinator&, grpc::ClientContext&)>& call);
  // One stream on one coordinator: appends to `result`; the call's status.
  grpc::Status stream_once(
      Coordinator& coordinator, const mlaserve::v1::GenerateRequest& request,
      const std::function<void(const mlaserve::v1::GenerateResponse&)>& on_message,
      std::chrono::system_clock::time_point deadline, std::chrono::steady_clock::time_point start,
      GenerateResult& result, bool& finished);

  std::vector<std::string> addresses_;
  ClientOptions options_;
  std::vector<Coordinator> coordinators_;
  std::atomic<size_t> preferred_{0};  // the coordinator that answered last
  std::mutex mu_;
  std::map<std::string, size_t> streams_;  // request id -> coordinator serving its stream
};

// Admin calls to a coordinator's control plane (mlaserve.v1.Control), with the deployment's
// shared secret. Thread-safe. Failures throw mla::Error as Client's do.
class AdminClient {
 public:
  AdminClient(const std::string& control_address, std::shared_ptr<const SharedSecret> secret,
              std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr,
              std::chrono::milliseconds deadline = std::chrono::seconds(10));
  // draining: true when the worker is now draining (false: it is dead); migrating: its
  // requests queued to move elsewhere (none with `finish_in_place`).
  mlaserve::v1::DrainResponse drain(const std::string& worker_id, bool finish_in_place = false);
  // Moves a running request, with its cache, to `to_worker` (empty: the coordinator's
  // choice); throws mla::Error with the coordinator's status (Control.Migrate). `stop_first`:
  // a blocking stop-and-copy instead of live stages (MigrateRequest.stop_first).
  mlaserve::v1::MigrateResponse migrate(const std::string& request_id,
                                        const std::string& to_worker = "", bool stop_first = false);
  // True when the worker is alive (it takes requests again once it heartbeats).
  bool undrain(const std::string& worker_id);
  mlaserve::v1::ListWorkersResponse list_workers();

 private:
  void prepare(grpc::ClientContext& ctx) const;

  std::shared_ptr<const SharedSecret> secret_;
  std::chrono::milliseconds deadline_;
  std::unique_ptr<mlaserve::v1::Control::Stub> stub_;
};

// A readable table of the cluster (worker id, address, state, tp, free/total pages, running,
// waiting, tokens/s, in flight, ms since heartbeat), then a line with the totals. Ends with
// a newline.
std::string format_cluster_status(const mlaserve::v1::ListWorkersResponse& status);

}  // namespace mla
