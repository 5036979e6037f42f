// NcclCommunicator over MPI_COMM_WORLD, one rank per GPU: exact results of every operation
// on poisoned device buffers, the byte accounting conventions of communicator.h, argument
// errors, and a peer that never joins (kDeadlineExceeded, then every rank tears down
// without hanging). Every test skips, on every rank alike, unless each rank has a GPU.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/error.h"
#include "parallel/nccl/nccl_communicator.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

using std::chrono::milliseconds;
using testing::HasSubstr;

// Long enough for a first NCCL set-up, short enough that a desynchronised test fails.
constexpr milliseconds kTestTimeout{60'000};
constexpr int64_t kF = sizeof(float);
// Elements past the end of each output, which must stay poisoned.
constexpr int64_t kGuard = 64;

// NVLink multicast can take a shared host's GPUs out of service: keep it off in every test
// run, whatever the environment says. Set before any NCCL call reads it.
class NoNvlinkMulticast : public testing::Environment {
 public:
  void SetUp() override { setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/1); }
};
[[maybe_unused]] testing::Environment* const kNoNvls =
    testing::AddGlobalTestEnvironment(new NoNvlinkMulticast);

struct World {
  int rank = 0;
  int size = 1;
};

World world() {
  World w;
  MPI_Comm_rank(MPI_COMM_WORLD, &w.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &w.size);
  return w;
}

// The same answer on every rank, so that all ranks skip (or run) together.
bool gpu_per_rank() {
  const int mine = cuda::device_count() >= world().size ? 1 : 0;
  int all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

#define SKIP_WITHOUT_GPU_PER_RANK()                                                          \
  if (!gpu_per_rank())                                                                       \
  GTEST_SKIP() << "needs one CUDA device per rank: " << cuda::device_count() << " visible, " \
               << world().size << " ranks"

std::unique_ptr<NcclCommunicator> make_comm(milliseconds timeout = kTestTimeout) {
  const World w = world();
  return std::make_unique<NcclCommunicator>(MPI_COMM_WORLD, w.rank % cuda::device_count(), timeout);
}

// Device buffers (test::DeviceArray: every byte 0xFF when made, NaN for floats) are made after
// the communicator, which selects this rank's device.

bool is_poison(float v) {
  uint32_t bits = 0;
  std::memcpy(&bits, &v, sizeof bits);
  return bits == 0xFFFFFFFFu;
}

// "" when got[0, expected.size()) == expected bit for bit and got[expected.size(), end) is
// still poisoned; otherwise where the first difference is.
std::string compare(const std::vector<float>& got, const std::vector<float>& expected) {
  for (size_t i = 0; i < got.size(); ++i) {
    if (i < expected.size()) {
      if (std::memcmp(&got[i], &expected[i], sizeof(float)) != 0) {
        return "element " + std::to_string(i) + ": got " + std::to_string(got[i]) + ", expected " +
               std::to_string(expected[i]);
      }
    } else if (!is_poison(got[i])) {
      return "guard element " + std::to_string(i) + " was overwritten";
    }
  }
  return "";
}

// Integers below 2^24, so sums are exact in float whatever the order.
float value(int rank, int64_t i) { return static_cast<float>(rank * 1000 + i % 100'000); }
// What rank `from` sends to rank `to` at position i of the block, in all_to_all.
float block_value(int from, int to, int64_t i) {
  return static_cast<float>(from * 1'000'000 + to * 100'000 + i % 100'000);
}
// Never 0xFF, so a byte left poisoned is told apart from one received.
uint8_t byte_value(int seed, int64_t i) {
  return static_cast<uint8_t>((i * 31 + seed * 7 + 3) % 255);
}

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

TEST(NcclCommunicator, ReportsRankSizeDeviceAndStream) {
  SKIP_WITHOUT_GPU_PER_RANK();
  const World w = world();
  auto comm = make_comm();
  EXPECT_EQ(comm->rank(), w.rank);
  EXPECT_EQ(comm->size(), w.size);
  EXPECT_EQ(comm->device(), w.rank % cuda::device_count());
  EXPECT_EQ(comm->timeout(), kTestTimeout);
  EXPECT_NE(comm->stream(), nullptr);
  EXPECT_FALSE(comm->broken());
  EXPECT_EQ(comm->stats().total_bytes(), 0);
  int current = -1;
  MLA_CUDA_CHECK(cudaGetDevice(&current));
  EXPECT_EQ(current, comm->device());
}

TEST(NcclCommunicator, AllReduceSumsEveryRank) {
  SKIP_WITHOUT_GPU_PER_RANK();
  auto comm = make_comm();
  const int p = comm->size();
  int64_t total = 0;
  const std::vector<int64_t> sizes = {1, 7, 1024, (1 << 20) + 3};
  for (int64_t n : sizes) {
    test::DeviceArray<float> data(n + kGuard);
    std::vector<float> mine(n), expected(n);
    for (int64_t i = 0; i < n; ++i) {
      mine[i] = value(comm->rank(), i);
      for (int r = 0; r < p; ++r) expected[i] += value(r, i);
    }
    data.upload(mine);
    comm->all_reduce_sum(data.get(), n);
    EXPECT_EQ(compare(data.download(), expected), "") << "n = " << n;
    total += n * kF;
  }
  const auto op = static_cast<int>(CommOp::kAllReduce);
  EXPECT_EQ(comm->stats().bytes[op], total);
  EXPECT_EQ(comm->stats().calls[op], static_cast<int64_t>(sizes.size()));
  EXPECT_EQ(comm->stats().total_bytes(), total);
}

TEST(NcclCommunicator, AllGatherConcatenatesInRankOrder) {
  SKIP_WITHOUT_GPU_PER_RANK();
  auto comm = make_comm();
  const int p = comm->size();
  int64_t total = 0;
  const std::vector<int64_t> sizes = {1, 7, 4097, 1 << 18};
  for (int64_t n : sizes) {
    test::DeviceArray<float> send(n), recv(p * n + kGuard);
    std::vector<float> mine(n), expected(p * n);
    for (int64_t i = 0; i < n; ++i) mine[i] = value(comm->rank(), i);
    for (int r = 0; r < p; ++r) {
      for (int64_t i = 0; i < n; ++i) expected[r * n + i] = value(r, i);
    }
    send.upload(mine);
    comm->all_gather(send.get(), n, recv.get());
    EXPECT_EQ(compare(recv.download(), expected), "") << "n = " << n;
    total += p * n * kF;
  }
  const auto op = static_cast<int>(CommOp::kAllGather);
  EXPECT_EQ(comm->stats().bytes[op], total);
  EXPECT_EQ(comm->stats().calls[op], static_cast<int64_t>(sizes.size()));
}

TEST(NcclCommunicator, AllToAllSendsBlockRToRankR) {
  SKIP_WITHOUT_GPU_PER_RANK();
  auto comm = make_comm();
  const int p = comm->size();
  const int me = comm->rank();
  int64_t total = 0;
  const std::vector<int64_t> sizes = {1, 7, 4097, 1 << 18};
  for (int64_t n : sizes) {
    test::DeviceArray<float> send(p * n), recv(p * n + kGuard);
    std::vector<float> mine(p * n), expected(p * n);
    for (int r = 0; r < p; ++r) {
      for (int64_t i = 0; i < n; ++i) {
        mine[r * n + i] = block_value(me, r, i);
        expected[r * n + i] = block_value(r, me, i);
      }
    }
    send.upload(mine);
    comm->all_to_all(send.get(), n, recv.get());
    EXPECT_EQ(compare(recv.download(), expected), "") << "n = " << n;
    total += p * n * kF;
  }
  const auto op = static_cast<int>(CommOp::kAllToAll);
  EXPECT_EQ(comm->stats().bytes[op], total);
  EXPECT_EQ(comm->stats().calls[op], static_cast<int64_t>(sizes.size()));
}

TEST(NcclCommunicator, BroadcastCopiesTheRootsBytes) {
  SKIP_WITHOUT_GPU_PER_RANK();
  auto comm = make_comm();
  const int p = comm->size();
  constexpr int64_t kBytes = 1001;  // not a multiple of any word size
  for (int root = 0; root < p; ++root) {
    test::DeviceArray<uint8_t> data(kBytes + kGuard);
    std::vector<uint8_t> expected(kBytes + kGuard, 0xFF);
    for (int64_t i = 0; i < kBytes; ++i) expected[i] = byte_value(root, i);
    if (comm->rank() == root) {
      data.upload(std::vector<uint8_t>(expected.begin(), expected.begin() + kBytes));
    }
    comm->broadcast(data.get(), kBytes, root);
    EXPECT_EQ(data.download(), expected) << "root " << root;
  }
  const auto op = static_cast<int>(CommOp::kBroadcast);
  EXPECT_EQ(comm->stats().bytes[op], kBytes * p);
  EXPECT_EQ(comm->stats().calls[op], p);
}

TEST(NcclCommunicator, SendAndRecvBetweenRanksZeroAndOne) {
  SKIP_WITHOUT_GPU_PER_RANK();
  auto comm = make_comm();
  if (comm->size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int me = comm->rank();
  int64_t total = 0;
  const std::vector<int64_t> sizes = {1, 4093, 1 << 22};
  for (int64_t bytes : sizes) {
    // Rank 0 sends `ping` and receives `pong`; rank 1 the other way round, in the order
    // that lets blocking calls meet. Other ranks stay out.
    std::vector<uint8_t> ping(bytes), pong(bytes);
    for (int64_t i = 0; i < bytes; ++i) {
      ping[i] = byte_value(1, i);
      pong[i] = byte_value(2, i);
    }
    test::DeviceArray<uint8_t> out(bytes), in(bytes + kGuard);
    std::vector<uint8_t> expected(bytes + kGuard, 0xFF);
    if (me == 0) {
      out.upload(ping);
      comm->send(out.get(), bytes, 1);
      comm->recv(in.get(), bytes, 1);
      std::copy(pong.begin(), pong.end(), expected.begin());
    } else if (me == 1) {
      out.upload(pong);
      comm->recv(in.get(), bytes, 0);
      comm->send(out.get(), bytes, 0);
      std::copy(ping.begin(), ping.end(), expected.begin());
    }
    if (me <= 1) {
      EXPECT_EQ(in.download(), expected) << "bytes = " << bytes;
      total += 2 * bytes;
    }
  }
  const auto op = static_cast<int>(CommOp::kSendRecv);
  EXPECT_EQ(comm->stats().bytes[op], total);
  EXPECT_EQ(comm->stats().calls[op], me <= 1 ? 2 * static_cast<int64_t>(sizes.size()) : 0);
}

TEST(NcclCommunicator, ZeroSizedOperationsAreUncountedNoOps) {
  SKIP_WITHOUT_GPU_PER_RANK();
  auto comm = make_comm();
  test::DeviceArray<float> a(kGuard), b(kGuard);
  comm->all_reduce_sum(a.get(), 0);
  comm->all_gather(a.get(), 0, b.get());
  comm->all_to_all(a.get(), 0, b.get());
  comm->broadcast(a.get(), 0, 0);
  EXPECT_EQ(compare(a.download(), {}), "");
  EXPECT_EQ(compare(b.download(), {}), "");
  for (int op = 0; op < kNumCommOps; ++op) EXPECT_EQ(comm->stats().calls[op], 0) << op;
  // Still in step with the other ranks.
  test::DeviceArray<float> one(1);
  one.upload({1.0f});
  comm->all_reduce_sum(one.get(), 1);
  EXPECT_EQ(one.download()[0], static_cast<float>(comm->size()));
}

TEST(NcclCommunicator, RejectsBadArgumentsAndStaysUsable) {
  SKIP_WITHOUT_GPU_PER_RANK();
  auto comm = make_comm();
  const int p = comm->size();
  const int me = comm->rank();
  test::DeviceArray<float> data(16);
  EXPECT_EQ(catch_error([&] { comm->broadcast(data.get(), 4, p); }).code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(catch_error([&] { comm->broadcast(data.get(), 4, -1); }).code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(catch_error([&] { comm->send(data.get(), 4, me); }).code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(catch_error([&] { comm->recv(data.get(), 4, p); }).code(), ErrorCode::kInvalidArgument);
  const Error negative = catch_error([&] { comm->all_reduce_sum(data.get(), -1); });
  EXPECT_EQ(negative.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(negative.what(), HasSubstr("(nccl)"));
  EXPECT_EQ(catch_error([&] { comm->set_timeout(milliseconds(0)); }).code(),
            ErrorCode::kInvalidArgument);
  EXPECT_FALSE(comm->broken());
  EXPECT_EQ(comm->stats().total_bytes(), 0);

  data.upload({2.0f});
  comm->all_reduce_sum(data.get(), 1);
  EXPECT_EQ(data.download()[0], 2.0f * p);
}

// A peer that never joins: rank 0 waits out the timeout, gets kDeadlineExceeded and aborts
// its communicator; the other ranks' teardown is bounded by the same timeout; a new
// communicator then works. Last in the file, so that a hang here shows after the rest ran.
TEST(NcclCommunicator, PeerThatNeverJoinsTimesOutAndTeardownDoesNotHang) {
  SKIP_WITHOUT_GPU_PER_RANK();
  const World w = world();
  if (w.size < 2) GTEST_SKIP() << "needs 2 ranks";
  constexpr milliseconds kShort{500};
  constexpr int64_t kN = 1024;
  {
    auto comm = make_comm();
    test::DeviceArray<float> data(kN);
    // Every rank joins once, so the connections exist and only the missing peer can stall
    // the next one; the set-up ran under the long timeout.
    comm->all_reduce_sum(data.get(), kN);
    comm->set_timeout(kShort);
    if (w.rank == 0) {
      const auto start = std::chrono::steady_clock::now();
      const Error e = catch_error([&] { comm->all_reduce_sum(data.get(), kN); });
      const auto waited = std::chrono::steady_clock::now() - start;
      EXPECT_EQ(e.code(), ErrorCode::kDeadlineExceeded) << e.what();
      EXPECT_THAT(e.what(), HasSubstr("rank 0 of " + std::to_string(w.size) +
                                      " (nccl): all_reduce of 4096 bytes did not finish "
                                      "within 500 ms"));
      EXPECT_GE(waited, kShort);
      EXPECT_LT(waited, std::chrono::seconds(20));
      EXPECT_TRUE(comm->broken());
      EXPECT_EQ(catch_error([&] { comm->all_reduce_sum(data.get(), kN); }).code(),
                ErrorCode::kFailedPrecondition);
    }
    EXPECT_EQ(comm->stats().calls[static_cast<int>(CommOp::kAllReduce)], 1);
    MPI_Barrier(MPI_COMM_WORLD);
    const auto start = std::chrono::steady_clock::now();
    comm.reset();
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20))
        << "teardown after a peer aborted";
  }
  MPI_Barrier(MPI_COMM_WORLD);
  auto fresh = make_comm();
  test::DeviceArray<float> one(1);
  one.upload({1.0f});
  fresh->all_reduce_sum(one.get(), 1);
  EXPECT_EQ(one.download()[0], static_cast<float>(w.size));
}

}  // namespace
}  // namespace mla
