#include "parallel/mpi_poll.h"

#include <algorithm>
#include <thread>

namespace mla {
namespace {

constexpr int64_t kSpinPolls = 1000;
constexpr int64_t kYieldPolls = 2000;
constexpr std::chrono::microseconds kPollSleep{20};
constexpr std::chrono::microseconds kMaxPollSleep{500};
// How often a `stop` callback is asked (it may take a lock or read a gRPC context).
constexpr std::chrono::milliseconds kStopCheck{5};

}  // namespace

PollResult poll_mpi_request(MPI_Request* request, std::chrono::steady_clock::time_point deadline,
                            MPI_Status* status, int* rc, const std::function<bool()>& stop) {
  using Clock = std::chrono::steady_clock;
  std::chrono::microseconds sleep = kPollSleep;
  auto next_stop_check = Clock::now() + kStopCheck;
  for (int64_t polls = 0;; ++polls) {
    int done = 0;
    *rc = MPI_Test(request, &done, status);
    if (*rc != MPI_SUCCESS || done) return PollResult::kCompleted;
    const auto now = Clock::now();
    if (now >= deadline) return PollResult::kDeadline;
    if (stop && now >= next_stop_check) {
      if (stop()) return PollResult::kStopped;
      next_stop_check = now + kStopCheck;
    }
    if (polls < kSpinPolls) continue;
    if (polls < kYieldPolls) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(sleep);
      sleep = std::min(2 * sleep, kMaxPollSleep);
    }
  }
}

}  // namespace mla
