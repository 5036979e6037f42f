// MpiTransport: one job id for the whole job, transfers between ranks 0 and 1 on several
// threads at once (different tags, in order within a tag) while every rank runs collectives
// on a group communicator (the step loop's traffic), and the failure paths (a stop, a
// timeout, a size mismatch, a rank of another job).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "kernels/error.h"
#include "parallel/mpi_communicator.h"
#include "parallel/mpi_transport.h"
#include "parallel/process_groups.h"

namespace mla {
namespace {

using namespace std::chrono_literals;

int thread_level() {
  int level = MPI_THREAD_SINGLE;
  MPI_Query_thread(&level);
  return level;
}

int world_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// Message m of thread t: a length that varies (empty, small, larger than an eager message)
// and bytes that name it.
std::string payload(int t, int m) {
  const size_t n = m == 0 ? 0 : static_cast<size_t>((m * 7919 + t * 104729) % (3 << 20));
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 31 + t * 7 + m) & 0xFF);
  return s;
}

TEST(MpiTransport, TheJobAgreesOnItsIdAndThreadsTransferInOrderBesideCollectives) {
  MpiTransport transport(thread_level());
  // Every rank holds rank 0's id.
  std::vector<uint64_t> ids(world_size());
  const uint64_t mine = transport.self().job_id;
  MPI_Allgather(&mine, 1, MPI_UINT64_T, ids.data(), 1, MPI_UINT64_T, MPI_COMM_WORLD);
  for (uint64_t id : ids) EXPECT_EQ(id, ids[0]);
  EXPECT_NE(mine, 0u);
  const int rank = transport.self().world_rank;
  EXPECT_FALSE(transport.reaches(transport.self())) << "a rank does not send to itself";
  EXPECT_FALSE(transport.reaches({mine + 1, 1 - rank})) << "a rank of another job";
  if (world_size() < 2) {
    EXPECT_FALSE(transport.usable());
    EXPECT_THAT(transport.why_not(), testing::HasSubstr("one rank"));
    return;
  }
  ASSERT_TRUE(transport.usable()) << transport.why_not();

  // The step loop's collectives on every rank, meanwhile.
  MpiCommunicator group(MPI_COMM_WORLD, 60s, "test");
  std::atomic<bool> done{false};
  std::thread collectives([&] {
    std::vector<float> v(1024);
    // Every rank stops after the same number of rounds: one that ran fewer would leave the
    // others waiting in an all-reduce.
    for (int round = 0; round < 200; ++round) {
      std::fill(v.begin(), v.end(), 1.0f);
      group.all_reduce_sum(v.data(), static_cast<int64_t>(v.size()));
      EXPECT_EQ(v[17], static_cast<float>(world_size()));
    }
    done = true;
  });

  constexpr int kThreads = 3, kMessages = 6;
  if (rank <= 1) {
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        const int tag = 100 + t;  // both sides agree on each thread's tag
        for (int m = 0; m < kMessages; ++m) {
          const std::string want = payload(t, m);
          if (rank == 0) {
            EXPECT_TRUE(transport.send(std::make_shared<const std::string>(want), 1, tag));
          } else {
            const auto got = transport.recv(static_cast<int64_t>(want.size()), 0, tag);
            ASSERT_NE(got, nullptr);
            EXPECT_TRUE(*got == want) << "thread " << t << " message " << m;
          }
        }
      });
    }
    for (std::thread& t : threads) t.join();
  }
  collectives.join();
  EXPECT_TRUE(done);
  EXPECT_NE(transport.next_tag(), transport.next_tag());
}

TEST(MpiTransport, AStopATimeoutAndASizeMismatchEachEndATransfer) {
  MpiTransport transport(thread_level(), 300ms);
  if (world_size() < 2) GTEST_SKIP() << "needs two ranks";
  const int rank = transport.self().world_rank;
  // Nobody sends tag 7: a stopped receive returns null, an unstopped one times out.
  if (rank == 0) {
    const auto start = std::chrono::steady_clock::now();
    EXPECT_EQ(
        transport.recv(16, 1, 7, [&] { return std::chrono::steady_clock::now() - start > 30ms; }),
        nullptr);
    try {
      transport.recv(16, 1, 7);
      ADD_FAILURE() << "a receive nobody answers must time out";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kDeadlineExceeded) << e.what();
    }
  }
  // Rank 1 sends 10 bytes where rank 0 expects 12.
  if (rank == 1) EXPECT_TRUE(transport.send(std::make_shared<const std::string>(10, 'x'), 0, 8));
  if (rank == 0) {
    try {
      transport.recv(12, 1, 8);
      ADD_FAILURE() << "a short message must be refused";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInternal) << e.what();
    }
  }
  EXPECT_THROW(transport.send(std::make_shared<const std::string>("x"), world_size(), 9), Error);
  MPI_Barrier(MPI_COMM_WORLD);
}

}  // namespace
}  // namespace mla
