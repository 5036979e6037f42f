// MpiTransport: bytes between any two ranks of one mpirun job, for data that leaves a
// tensor-parallel group: a migrating request's latents between the leaders of two groups that
// run in the same job (DESIGN section 7: "NCCL send/recv inside one job, gRPC streams between
// jobs"). The control of a migration stays on gRPC; only the chunks' bytes take this path.
//
// Every rank of the job constructs one at start-up (collective over MPI_COMM_WORLD): it works
// on its own duplicate of the world communicator, so its messages never meet the groups'
// traffic, and the job agrees on a random job id (drawn by world rank 0) by which a peer in
// another process tells that it runs in the same job. A rank of another job has another id:
// it is not reachable (MPI cannot connect two jobs), and the transfer goes over gRPC.
//
// send() and recv() are called from RPC handler threads while the group's step loop uses MPI
// for its own collectives, so the transport is usable only where MPI provides
// MPI_THREAD_MULTIPLE (MpiSession asks for it); elsewhere usable() is false and says why.
// Messages between the same two ranks with the same tag arrive in the order they were sent
// (MPI's non-overtaking rule): one tag per transfer (next_tag()) keeps concurrent transfers
// apart.
//
// Thread safety: every method may be called from any thread (MPI_THREAD_MULTIPLE).
#pragma once

#include <mpi.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "parallel/process_groups.h"

namespace mla {

// Where a rank of an mpirun job is: the job's id and the rank in its MPI_COMM_WORLD.
struct MpiEndpoint {
  uint64_t job_id = 0;
  int world_rank = -1;
};

class MpiTransport {
 public:
  static constexpr std::chrono::milliseconds kDefaultTimeout{30'000};

  // Collective over MPI_COMM_WORLD: every rank of the job must construct one, on one thread,
  // at the same point of its start-up. `thread_level` is what MPI provided
  // (MpiSession::thread_level()). Throws kUnavailable if MPI fails.
  explicit MpiTransport(int thread_level, std::chrono::milliseconds timeout = kDefaultTimeout);
  MpiTransport(const MpiTransport&) = delete;
  MpiTransport& operator=(const MpiTransport&) = delete;

  // This rank.
  MpiEndpoint self() const { return {job_id_, world_rank_}; }
  // Whether transfers can go over MPI at all; when not, why_not() says why (e.g. "MPI provides
  // only MPI_THREAD_SERIALIZED").
  bool usable() const { return why_not_.empty(); }
  const std::string& why_not() const { return why_not_; }
  // Whether `peer` is another rank of this job that this transport can reach.
  bool reaches(const MpiEndpoint& peer) const;

  // A tag no other transfer from this rank is using now (cycles through [1, 32767]).
  int next_tag();

  // Sends `data` to world rank `peer` with `tag` and waits until the peer has taken it.
  // Returns false, without a completed send, when `stop` (may be empty) returns true first.
  // Throws kDeadlineExceeded when the peer does not take the message within the timeout,
  // kUnavailable on an MPI error, kFailedPrecondition unless usable(), kInvalidArgument for a
  // bad peer or more than 2^31 - 1 bytes. The transport shares `data` for as long as MPI may
  // read it (after a timeout or a stop too).
  bool send(std::shared_ptr<const std::string> data, int peer, int tag,
            const std::function<bool()>& stop = nullptr);
  // Receives a message of exactly `bytes` bytes from world rank `peer` with `tag`. Null when
  // `stop` returns true first. Throws as send, and kInternal when the message has another
  // length.
  std::shared_ptr<std::string> recv(int64_t bytes, int peer, int tag,
                                    const std::function<bool()>& stop = nullptr);

 private:
  enum class Op { kSend, kRecv };
  // Waits for a started transfer; false when stopped. A transfer given up (stopped or timed
  // out) is cancelled and `buffer` kept in abandoned_ while MPI may still use it.
  bool finish(MPI_Request* request, Op op, int64_t bytes, int peer, int tag,
              const std::function<bool()>& stop, std::shared_ptr<const void> buffer);
  void check_peer(int peer, int64_t bytes, const char* what) const;

  std::chrono::milliseconds timeout_;
  MpiComm comm_;  // this transport's duplicate of MPI_COMM_WORLD
  uint64_t job_id_ = 0;
  int world_rank_ = 0;
  int world_size_ = 1;
  std::string why_not_;
  std::atomic<int> tag_{0};
  // Buffers of transfers given up (timed out or stopped) that MPI may still touch.
  std::mutex abandoned_mu_;
  std::vector<std::shared_ptr<const void>> abandoned_;
};

}  // namespace mla
