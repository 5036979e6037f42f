// MpiCommunicator: the Communicator of the CPU backend, over host float buffers and MPI.
//
// Every operation starts the non-blocking MPI call and polls it until it completes or the
// timeout passes, so a peer that never joins turns into an mla::Error instead of a hang:
//   kDeadlineExceeded  "rank 1 of 2 (tp group 0): all_reduce of 4096 bytes did not finish
//                       within 300 s"
//   kUnavailable       an MPI error (a dead peer, a truncated message), with MPI's text
//   kInvalidArgument   a bad root/peer or a negative or too large (> 2^31 - 1) count
//   kInternal          a recv whose peer sent fewer bytes than asked for (ranks disagree)
// Polling spins briefly, then yields and sleeps a few tens of microseconds between tests,
// so oversubscribed runs (more ranks than cores) do not starve the ranks they wait for.
//
// After any failure the communicator is broken: every later call throws
// kFailedPrecondition. MPI cannot cancel a collective, so a timed-out collective stays
// pending inside MPI and may still write into the buffers it was given if the missing
// peers arrive late; treat a failure as fatal for the group (keep those buffers alive or
// end the process). A timed-out receive is cancelled.
//
// Zero-sized operations are no-ops and are not counted in stats().
//
// Thread safety: not thread-safe; one thread at a time (MPI_THREAD_SERIALIZED suffices).
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "parallel/communicator.h"
#include "parallel/process_groups.h"

namespace mla {

class MpiCommunicator : public Communicator {
 public:
  static constexpr std::chrono::milliseconds kDefaultTimeout{300'000};

  // Collective over `comm`: every rank of it must construct one (MPI_Comm_idup, bounded by
  // `timeout`). The communicator works on its own duplicate of `comm`, so its messages
  // never mix with other traffic on `comm`; `comm` itself is not modified and may be
  // freed afterwards. `label` names the group in error messages (e.g. "tp group 0").
  // Throws kInvalidArgument if timeout <= 0, or the errors above.
  explicit MpiCommunicator(MPI_Comm comm, std::chrono::milliseconds timeout = kDefaultTimeout,
                           std::string label = "tp");
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& label() const { return label_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  // Whether an earlier call failed (every later call throws kFailedPrecondition).
  bool broken() const { return broken_; }

  void all_reduce_sum(float* data, int64_t n) override;
  // `send` may alias its own block of `recv` (send == recv + rank() * n).
  void all_gather(const float* send, int64_t n, float* recv) override;
  // `send` and `recv` must not overlap.
  void all_to_all(const float* send, int64_t n, float* recv) override;
  void broadcast(void* data, int64_t bytes, int root) override;
  void send(const void* data, int64_t bytes, int peer) override;
  void recv(void* data, int64_t bytes, int peer) override;
  // Returns once every rank of the group has called barrier(). Not counted in stats().
  void barrier();

 private:
  // How a request that timed out is given up: a collective cannot be cancelled or freed
  // in MPI and is left pending; a send is freed (MPI finishes it if it can); a receive is
  // cancelled, so its buffer is not written later.
  enum class Kind { kCollective, kSend, kRecv };
  // One operation, for error messages: "<name>[ of <bytes> bytes][ <prep> rank <peer>]".
  struct OpInfo {
    const char* name;
    int64_t bytes = -1;  // -1: no payload (barrier, set-up)
    Kind kind = Kind::kCollective;
    const char* peer_prep = nullptr;  // "to", "from"; null when there is no peer
    int peer = -1;
  };

  void check_usable(const OpInfo& op) const;
  int to_count(int64_t n, const OpInfo& op) const;
  void check_rank(int r, const char* what, const OpInfo& op) const;
  // Throws kUnavailable (and breaks the communicator) if rc is an MPI error.
  void check_mpi(int rc, const OpInfo& op);
  // Polls `request` until it completes; on timeout abandons it and throws.
  void wait(MPI_Request* request, const OpInfo& op, MPI_Status* status = MPI_STATUS_IGNORE);
  std::string where(const OpInfo& op) const;

  MpiComm comm_;
  int rank_ = 0;
  int size_ = 1;
  std::chrono::milliseconds timeout_;
  std::string label_;
  bool broken_ = false;
};

}  // namespace mla
