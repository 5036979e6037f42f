// MpiCommunicator over MPI_COMM_WORLD: exact results of every collective, the byte
// accounting conventions of communicator.h, and the errors for a peer that never comes.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <numeric>
#include <vector>

#include "kernels/error.h"
#include "parallel/mpi_communicator.h"

namespace mla {
namespace {

using std::chrono::milliseconds;
using testing::HasSubstr;

// Long enough for oversubscribed runs, short enough that a desynchronised test fails.
constexpr milliseconds kTestTimeout{60'000};
constexpr int64_t kF = sizeof(float);

// Sizes that take different algorithm paths inside MPI (tiny, odd, medium, large).
const std::vector<int64_t> kSizes = {1, 7, 1024, 1 << 18};

// Values are integers below 2^24, so sums are exact in float whatever the order.
float value(int rank, int64_t i) { return static_cast<float>(rank * 1000 + i); }

int64_t expected_rank_sum(int size) { return static_cast<int64_t>(size) * (size - 1) / 2; }

// Runs `body` and returns the mla::Error it throws; fails the test if it throws none.
template <class Body>
Error catch_error(Body&& body) {
  try {
    body();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "expected an mla::Error";
  return Error(ErrorCode::kInternal, "no error thrown");
}

TEST(MpiCommunicator, RankAndSizeMatchTheCommunicator) {
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MpiCommunicator comm(MPI_COMM_WORLD, kTestTimeout, "world");
  EXPECT_EQ(comm.rank(), rank);
  EXPECT_EQ(comm.size(), size);
  EXPECT_EQ(comm.label(), "world");
  EXPECT_EQ(comm.timeout(), kTestTimeout);
  EXPECT_FALSE(comm.broken());
  EXPECT_EQ(comm.stats().total_bytes(), 0);
}

TEST(MpiCommunicator, AllReduceSumsEveryRank) {
  MpiCommunicator comm(MPI_COMM_WORLD, kTestTimeout, "world");
  const int p = comm.size();
  int64_t bytes = 0;
  for (int64_t n : kSizes) {
    std::vector<float> data(n);
    for (int64_t i = 0; i < n; ++i) data[i] = value(comm.rank(), i);
    comm.all_reduce_sum(data.data(), n);
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; ++i) {
      wrong += data[i] != static_cast<float>(1000 * expected_rank_sum(p) + p * i);
    }
    EXPECT_EQ(wrong, 0) << "n = " << n;
    bytes += n * kF;
  }
  EXPECT_EQ(comm.stats().bytes[static_cast<int>(CommOp::kAllReduce)], bytes);
  EXPECT_EQ(comm.stats().calls[static_cast<int>(CommOp::kAllReduce)],
            static_cast<int64_t>(kSizes.size()));
  EXPECT_EQ(comm.stats().total_bytes(), bytes);
}

TEST(MpiCommunicator, AllReduceOfNothingIsANoOp) {
  MpiCommunicator comm(MPI_COMM_WORLD, kTestTimeout, "world");
  comm.all_reduce_sum(nullptr, 0);
  EXPECT_EQ(comm.stats().total_bytes(), 0);
  EXPECT_EQ(comm.stats().calls[static_cast<int>(CommOp::kAllReduce)], 0);
}

TEST(MpiCommunicator, AllGatherConcatenatesInRankOrder) {
  MpiCommunicator comm(MPI_COMM_WORLD, kTestTimeout, "world");
  const int p = comm.size();
  int64_t bytes = 0;
  for (int64_t n : kSizes) {
    std::vector<float> send(n);
    for (int64_t i = 0; i < n; ++i) send[i] = value(comm.rank(), i);
    std::vector<float> recv(p * n, -1.0f);
    comm.all_gather(send.data(), n, recv.data());
    int64_t wrong = 0;
    for (int r = 0; r < p; ++r) {
      for (int64_t i = 0; i < n; ++i) wrong += recv[r * n + i] != value(r, i);
    }
    EXPECT_EQ(wrong, 0) << "n = " << n;
    bytes += p * n * kF;
  }
  EXPECT_EQ(comm.stats().bytes[static_cast<int>(CommOp::kAllGather)], bytes);
  EXPECT_EQ(comm.stats().calls[static_cast<int>(CommOp::kAllGather)],
            static_cast<int64_t>(kSizes.size()));
}

TEST(MpiCommunicator, AllGatherInPlace) {
  MpiCommunicator comm(MPI_COMM_WORLD, kTestTimeout, "world");
  const int p = comm.size();
  const int64_t n = 33;
  std::vector<float> buffer(p * n, -1.0f);
  for (int64_t i = 0; i < n; ++i) buffer[comm.rank() * n + i] = value(comm.rank(), i);
  comm.all_gather(buffer.data() + comm.rank() * n, n, buffer.data());
  for (int r = 0; r < p; ++r) {
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(buffer[r * n + i], value(r, i)) << r << " " << i;
  }
  EXPECT_EQ(comm.stats().bytes[static_cast<int>(CommOp::kAllGather)], p * n * kF);
}

TEST(MpiCommunicator, AllToAllSendsBlockRToRankR) {
  MpiCommunicator comm(MPI_COMM_WORLD, kTestTimeout, "world");
  const int p = comm.size();
  const int me = comm.rank();
  // Block r of rank s holds s * 1000 + r * 100 + i: sender, receiver and index are visible.
  auto element = [](int sender, int receiver, int64_t i) {
    return static_cast<float>(sender * 1000 + receiver * 100 + i);
  };
  int64_t bytes = 0;
  for (int64_t n : {int64_t{1}, int64_t{5}, int64_t{100}}) {
    std::vector<float> send(p * n);
    for (int r = 0; r < p; ++r) {
      for (int64_t i = 0; i < n; ++i) send[r * n + i] = element(me, r, i);
    }
    std::vector<float> recv(p * n, -1.0f);
    comm.all_to_all(send.data(), n, recv.data());
    for (int r = 0; r < p; ++r) {
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_EQ(recv[r * n + i], element(r, me, i)) << "from rank " << r << ", i " << i;
      }
    }
    bytes += p * n * kF;
  }
  // Large blocks (rendezvous protocol), with a cheaper check.
  const int64_t n = 1 << 16;
  std::vector<float> send(p * n), recv(p * n, -1.0f);
  for (int r = 0; r < p; ++r) {
    for (int64_t i = 0; i < n; ++i) send[r * n + i] = static_cast<float>((me * p + r) * n + i);
  }
  comm.all_to_all(send.data(), n, recv.data());
  int64_t wrong = 0;
  for (int r = 0; r < p; ++r) {
    for (int64_t i = 0; i < n; ++i)
      wrong += recv[r * n + i] != static_cast<float>((r * p + me) * n + i);
  }
  EXPECT_EQ(wrong, 0);
  bytes += p * n * kF;
  EXPECT_EQ(comm.stats().bytes[static_cast<int>(CommOp::kAllToAll)], bytes);
  EXPECT_EQ(comm.stats().calls[static_cast<int>(CommOp::kAllToAll)], 4);
}

TEST(MpiCommunicator, BroadcastFromEveryRoot) {
  MpiCommunicator comm(MPI_COMM_WORLD, kTestTimeout, "world");
  const int p = comm.size();
  int64_t bytes = 0;
  for (int64_t size : {int64_t{1}, int64_t{37}, int64_t{1} << 20}) {
    for (int root = 0; root < p; ++root) {
      std::vector<uint8_t> data(size);
      for (int64_t i = 0; i < size; ++i) {
        data[i] = static_cast<uint8_t>(comm.rank() == root ? (root * 31 + i * 7) : 0xEE);
      }
      comm.broadcast(data.data(), size, root);
      int64_t wrong = 0;
      for (int64_t i = 0; i < size; ++i) {
        wrong += data[i] != static_cast<uint8_t>(root * 31 + i * 7);
      }
      EXPECT_EQ(wrong, 0) << "root " << root << ", " << size << " bytes";
      bytes += size;
    }
  }
  EXPECT_EQ(comm.stats().bytes[static_cast<int>(CommOp::kBroadcast)], bytes);
  EXPECT_EQ(comm.stats().calls[static_cast<int>(CommOp::kBroadcast)], 3 * p);
}

TEST(MpiCommunicator, SendRecvAroundARing) {
  MpiCommunicator comm(MPI_COMM_WORLD, kTestTimeout, "world");
  const int p = comm.size();
  if (p < 2) GTEST_SKIP() << "needs 2 ranks";
  const int me = comm.rank();
  const int next = (me + 1) % p;
  const int prev = (me + p - 1) % p;
  int64_t bytes = 0;
  // Small (eager) and large (rendezvous) messages. Rank 0 sends first and every other rank
  // receives first, so blocking sends cannot deadlock at any world size.
  for (int64_t n : {int64_t{3}, int64_t{1} << 18}) {
    std::vector<float> out(n), in(n, -1.0f);
    for (int64_t i = 0; i < n; ++i) out[i] = value(me, i);
    if (me == 0) {
      comm.send(out.data(), n * kF, next);
      comm.recv(in.data(), n * kF, prev);
    } else {
      comm.recv(in.data(), n * kF, prev);
      comm.send(out.data(), n * kF, next);
    }
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; ++i) wrong += in[i] != value(prev, i);
    EXPECT_EQ(wrong, 0) << "n = " << n;
    bytes += 2 * n * kF;
  }
  EXPECT_EQ(comm.stats().bytes[static_cast<int>(CommOp::kSendRecv)], bytes);
  EXPECT_EQ(comm.stats().calls[static_cast<int>(CommOp::kSendRecv)], 4);
}

TEST(MpiCommunicator, ResetStatsClearsTheCounts) {
  MpiCommunicator comm(MPI_COMM_WORLD, kTestTimeout, "world");
  float x = 1.0f;
  comm.all_reduce_sum(&x, 1);
  EXPECT_EQ(comm.stats().total_bytes(), 4);
  comm.reset_stats();
  EXPECT_EQ(comm.stats().total_bytes(), 0);
  EXPECT_EQ(comm.stats().calls[static_cast<int>(CommOp::kAllReduce)], 0);
}

TEST(MpiCommunicator, RejectsBadArgumentsWithoutCommunicating) {
  MpiCommunicator comm(MPI_COMM_WORLD, kTestTimeout, "world");
  const int p = comm.size();
  std::vector<uint8_t> buffer(16);
  EXPECT_EQ(catch_error([&] { comm.broadcast(buffer.data(), 16, p); }).code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(catch_error([&] { comm.broadcast(buffer.data(), 16, -1); }).code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(catch_error([&] { comm.send(buffer.data(), 16, comm.rank()); }).code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(catch_error([&] { comm.recv(buffer.data(), 16, p); }).code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(catch_error([&] { comm.all_reduce_sum(nullptr, -1); }).code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(catch_error([&] { comm.all_reduce_sum(nullptr, int64_t{1} << 31); }).code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(catch_error([] { MpiCommunicator c(MPI_COMM_WORLD, milliseconds(0)); }).code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(catch_error([] { MpiCommunicator c(MPI_COMM_NULL); }).code(),
            ErrorCode::kInvalidArgument);
  // Argument errors do not break the communicator.
  EXPECT_FALSE(comm.broken());
  float x = 1.0f;
  comm.all_reduce_sum(&x, 1);
  EXPECT_EQ(x, static_cast<float>(p));
}

TEST(MpiCommunicator, CollectiveThatOneRankSkipsTimesOut) {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size < 2) GTEST_SKIP() << "needs 2 ranks";
  const milliseconds timeout(300);
  {
    // Its own communicator (a duplicate), abandoned after the failure, so the pending
    // collective can never match a later one.
    MpiCommunicator comm(MPI_COMM_WORLD, timeout, "tp group 0");
    const int absent = size - 1;
    if (comm.rank() != absent) {
      // MPI may still write into a timed-out collective's buffer: keep it alive for good.
      static std::vector<float>* abandoned = new std::vector<float>(1024, 1.0f);
      const auto start = std::chrono::steady_clock::now();
      const Error e = catch_error([&] { comm.all_reduce_sum(abandoned->data(), 1024); });
      const auto waited = std::chrono::steady_clock::now() - start;
      EXPECT_EQ(e.code(), ErrorCode::kDeadlineExceeded);
      EXPECT_THAT(e.what(), HasSubstr(fmt::format("rank {} of {} (tp group 0): all_reduce of "
                                                  "4096 bytes did not finish within 300 ms",
                                                  comm.rank(), size)));
      EXPECT_GE(waited, timeout);
      EXPECT_LT(waited, milliseconds(10'000));
      EXPECT_TRUE(comm.broken());
      // No further traffic on a broken communicator.
      float x = 0.0f;
      const Error again = catch_error([&] { comm.all_reduce_sum(&x, 1); });
      EXPECT_EQ(again.code(), ErrorCode::kFailedPrecondition);
      EXPECT_THAT(again.what(), HasSubstr("unusable"));
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
  // The world is still usable.
  MpiCommunicator comm(MPI_COMM_WORLD, kTestTimeout, "world");
  float x = 1.0f;
  comm.all_reduce_sum(&x, 1);
  EXPECT_EQ(x, static_cast<float>(size));
}

TEST(MpiCommunicator, RecvFromASilentPeerTimesOut) {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size < 2) GTEST_SKIP() << "needs 2 ranks";
  {
    MpiCommunicator comm(MPI_COMM_WORLD, milliseconds(200), "tp group 3");
    if (comm.rank() == 0) {
      std::vector<uint8_t> buffer(64);
      const Error e = catch_error([&] { comm.recv(buffer.data(), 64, 1); });
      EXPECT_EQ(e.code(), ErrorCode::kDeadlineExceeded);
      EXPECT_THAT(e.what(), HasSubstr(fmt::format("rank 0 of {} (tp group 3): recv of 64 bytes "
                                                  "from rank 1 did not finish within 200 ms",
                                                  size)));
      EXPECT_TRUE(comm.broken());
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(MpiCommunicator, MpiErrorBecomesUnavailable) {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size < 2) GTEST_SKIP() << "needs 2 ranks";
  {
    MpiCommunicator comm(MPI_COMM_WORLD, kTestTimeout, "world");
    std::vector<uint8_t> buffer(64, 7);
    if (comm.rank() == 0) {
      comm.send(buffer.data(), 64, 1);
      EXPECT_FALSE(comm.broken());
    } else if (comm.rank() == 1) {
      // A receive smaller than the message: MPI reports truncation.
      const Error e = catch_error([&] { comm.recv(buffer.data(), 16, 0); });
      EXPECT_EQ(e.code(), ErrorCode::kUnavailable);
      EXPECT_THAT(e.what(), HasSubstr("rank 1 of"));
      EXPECT_THAT(e.what(), HasSubstr("recv of 16 bytes from rank 0 failed: "));
      EXPECT_THAT(e.what(), HasSubstr("MPI error"));
      EXPECT_TRUE(comm.broken());
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(MpiCommunicator, BarrierReturnsOnEveryRank) {
  MpiCommunicator comm(MPI_COMM_WORLD, kTestTimeout, "world");
  for (int i = 0; i < 3; ++i) comm.barrier();
  EXPECT_EQ(comm.stats().total_bytes(), 0);
}

}  // namespace
}  // namespace mla
