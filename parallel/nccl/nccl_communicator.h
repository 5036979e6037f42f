// NcclCommunicator: the Communicator of a tensor-parallel group on GPUs, over NCCL.
//
// Buffers are device pointers on this rank's `cuda_device` (float buffers for the
// collectives, raw bytes for broadcast and send/recv). Every operation is enqueued on the
// communicator's own stream and then waited for: it returns once the data is in place.
// Callers that produced the inputs on another stream must synchronise that stream first.
// Between begin_stream_ordered() and end_stream_ordered() (what the CUDA model does for a
// step) operations are instead enqueued on the caller's stream and not waited for, so a
// step's collectives need no host synchronisation and can be captured in a CUDA graph.
//
// Failures throw mla::Error naming this rank, the group size and the operation:
//  - kDeadlineExceeded: an operation (or the set-up) did not finish within the timeout,
//    e.g. because a peer never joined it. The NCCL communicator is then aborted.
//  - kUnavailable: NCCL reported an error (a peer died, a network or usage error); the
//    communicator is aborted too.
//  - kFailedPrecondition: an operation on a communicator that was aborted before.
//  - kInvalidArgument: a bad size, root or peer (nothing is enqueued; still usable).
// An aborted group cannot be repaired: make a new communicator (on every rank).
//
// Zero-sized operations are no-ops and are not counted in stats(), as in MpiCommunicator.
//
// Used by one thread at a time.
#pragma once

#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "kernels/error.h"
#include "parallel/communicator.h"

namespace mla {

class NcclCommunicator : public Communicator {
 public:
  // Collective over `comm` (every rank of it must call this, with its own device): rank 0
  // makes the NCCL id and broadcasts it over MPI; each rank selects `cuda_device` as the
  // calling thread's current device, creates its stream and joins the NCCL communicator.
  // `comm` is used only here. `timeout` bounds the set-up, each operation and teardown.
  NcclCommunicator(MPI_Comm comm, int cuda_device, std::chrono::milliseconds timeout);
  // Teardown flushes the communicator together with the other ranks (they should destroy
  // theirs at about the same time); if they don't within the timeout, or the communicator
  // failed earlier, it is aborted instead. Never throws.
  ~NcclCommunicator() override;

  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int device() const { return device_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  // Bounds every later operation and the teardown (set-up often needs a longer bound than
  // a collective). Throws kInvalidArgument if timeout <= 0.
  void set_timeout(std::chrono::milliseconds timeout);
  // The stream every operation is enqueued on; idle whenever no operation is running. It
  // is an ordinary (blocking) stream, so inputs written on the legacy default stream, e.g.
  // by cudaMemcpy, are in place before an operation reads them.
  cudaStream_t stream() const { return stream_; }
  // Whether a failure aborted the NCCL communicator (every later call throws
  // kFailedPrecondition).
  bool broken() const { return comm_ == nullptr; }

  // Stream-ordered mode (see Communicator): operations go on the caller's stream and
  // return once NCCL has enqueued them; end_stream_ordered() waits for that stream with the
  // timeout (aborting the communicator on a peer that never joins).
  bool begin_stream_ordered(void* stream) override;
  void end_stream_ordered() override;

  void all_reduce_sum(float* data, int64_t n) override;
  void all_gather(const float* send, int64_t n, float* recv) override;
  // Block r of `send` goes to rank r (the rank's own block is copied through NCCL too).
  void all_to_all(const float* send, int64_t n, float* recv) override;
  void broadcast(void* data, int64_t bytes, int root) override;
  // Blocking: returns once the peer has received (send) or the data is here (recv), so two
  // ranks must not both send to each other first. `peer` must differ from rank().
  void send(const void* data, int64_t bytes, int peer) override;
  void recv(void* data, int64_t bytes, int peer) override;

 private:
  // What an operation was, for error messages (formatted only on failure).
  struct OpDesc {
    CommOp op;
    const char* name;  // "all_reduce", "send", ...
    int64_t bytes;     // as counted in CommStats
    int peer = -1;     // send/recv peer or broadcast root; -1 when none
  };

  // Throws kFailedPrecondition if broken, kInvalidArgument if op.bytes < 0; returns
  // whether there is anything to do (op.bytes > 0).
  bool start(const OpDesc& op) const;
  // Waits until `issued` (the result of the NCCL call) and the stream's work are complete,
  // then counts the operation in stats_. Aborts the communicator and throws on failure.
  void finish(const OpDesc& op, ncclResult_t issued);
  // Aborts the communicator, then throws mla::Error(code) describing `op` and `why`.
  [[noreturn]] void fail(const OpDesc& op, ErrorCode code, const std::string& why);
  // Aborts the NCCL communicator (idempotent): anything still running on it is cancelled.
  void abort_comm() noexcept;

  // The stream operations go on: stream_, or the caller's in stream-ordered mode.
  cudaStream_t active() const { return ordered_ != nullptr ? ordered_ : stream_; }
  // Waits for `stream` and NCCL's async state, failing `op` at the deadline.
  void drain(const OpDesc& op, cudaStream_t stream);

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaStream_t ordered_ = nullptr;
  int rank_ = 0;
  int size_ = 0;
  int device_ = 0;
  std::chrono::milliseconds timeout_;
};

}  // namespace mla
