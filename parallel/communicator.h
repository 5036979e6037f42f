// Communicator: the collectives one tensor-parallel group needs, behind one interface so
// the model code is the same on the CPU (MPI over host memory) and on GPUs (NCCL over
// device memory). Buffers are host pointers for MpiCommunicator and device pointers for
// NcclCommunicator; every rank of the group must make the same calls in the same order.
//
// Failures (a peer that died, a collective that does not finish within the timeout) throw
// mla::Error naming this rank, the group and the operation, instead of hanging.
// A Communicator is used by one thread at a time.
#pragma once

#include <array>
#include <cstdint>
#include <string>

namespace mla {

enum class CommOp { kAllReduce, kAllGather, kAllToAll, kBroadcast, kSendRecv };
inline constexpr int kNumCommOps = 5;
const char* to_string(CommOp op);

// Bytes each collective moved, as seen by one rank: all-reduce and broadcast count the
// buffer, all-gather the gathered result (P x the contribution), all-to-all the send
// buffer (P x the per-rank block), send/recv the message. Calls are counted too.
struct CommStats {
  std::array<int64_t, kNumCommOps> bytes{};
  std::array<int64_t, kNumCommOps> calls{};
  void add(CommOp op, int64_t n) {
    bytes[static_cast<int>(op)] += n;
    calls[static_cast<int>(op)] += 1;
  }
  int64_t total_bytes() const;
  CommStats& operator+=(const CommStats& other);
  // The calls made between two snapshots of one communicator's stats.
  CommStats operator-(const CommStats& earlier) const;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  // data[n] <- sum over ranks of data[n], in place.
  virtual void all_reduce_sum(float* data, int64_t n) = 0;
  // recv[size * n] <- concatenation of every rank's send[n], in rank order.
  virtual void all_gather(const float* send, int64_t n, float* recv) = 0;
  // send[size * n]: block r goes to rank r; recv[size * n]: block r came from rank r.
  virtual void all_to_all(const float* send, int64_t n, float* recv) = 0;
  // data[bytes] <- root's data[bytes].
  virtual void broadcast(void* data, int64_t bytes, int root) = 0;
  // Point-to-point: blocking send to / receive from `peer` (a rank of this group).
  virtual void send(const void* data, int64_t bytes, int peer) = 0;
  virtual void recv(void* data, int64_t bytes, int peer) = 0;

  // Stream-ordered collectives (device communicators): from begin_stream_ordered(stream) on,
  // the collective calls only enqueue their work on `stream`, after what the caller enqueued
  // there, and return without waiting, so the caller need not synchronise around them;
  // end_stream_ordered() waits until `stream` has drained (bounded by the communicator's
  // timeout, failing like a collective) and returns to blocking calls. Returns false, and
  // changes nothing, where the communicator cannot do this (the default, and MPI's).
  virtual bool begin_stream_ordered(void* stream) { return false; }
  virtual void end_stream_ordered() {}

  const CommStats& stats() const { return stats_; }
  void reset_stats() { stats_ = CommStats{}; }

 protected:
  CommStats stats_;
};

}  // namespace mla
