// Waiting for a non-blocking MPI request without blocking inside MPI: polls MPI_Test until
// the request completes, a deadline passes or the caller says stop. Polling spins briefly,
// then yields, then sleeps with a doubling pause (20 us up to 500 us), so a waiting rank
// gives its core to the ranks it waits for when there are more ranks than cores, and an idle
// follower waiting for its leader's next plan costs little CPU.
// Thread safety: as MPI_Test under the thread level MPI provides.
#pragma once

#include <mpi.h>

#include <chrono>
#include <functional>

namespace mla {

enum class PollResult { kCompleted, kDeadline, kStopped };

// Polls `request` until it completes (then *rc is MPI_Test's code and *status its status),
// `deadline` passes, or `stop` (checked every few milliseconds; may be empty) returns true.
PollResult poll_mpi_request(MPI_Request* request, std::chrono::steady_clock::time_point deadline,
                            MPI_Status* status, int* rc,
                            const std::function<bool()>& stop = nullptr);

}  // namespace mla
