// MpiSession and the split of the world into tensor-parallel groups.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstdlib>
#include <vector>

#include "kernels/error.h"
#include "parallel/mpi_communicator.h"
#include "parallel/process_groups.h"

namespace mla {
namespace {

using testing::HasSubstr;

constexpr std::chrono::milliseconds kTestTimeout{60'000};

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int world_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

std::vector<int> divisors(int n) {
  std::vector<int> out;
  for (int d = 1; d <= n; ++d) {
    if (n % d == 0) out.push_back(d);
  }
  return out;
}

TEST(MpiSession, NestedSessionLeavesMpiRunning) {
  EXPECT_TRUE(MpiSession::launched_by_mpirun() || std::getenv("OMPI_COMM_WORLD_SIZE") == nullptr);
  {
    MpiSession nested;
    EXPECT_FALSE(nested.owns_mpi());
    EXPECT_GE(nested.thread_level(), MPI_THREAD_SERIALIZED);
  }
  int finalized = 1;
  MPI_Finalized(&finalized);
  EXPECT_EQ(finalized, 0);
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(MpiSession, LaunchedByMpirunSeesTheLauncher) {
  // ctest starts this binary through Open MPI's mpirun.
  if (std::getenv("OMPI_COMM_WORLD_SIZE") == nullptr) GTEST_SKIP() << "not under Open MPI";
  EXPECT_TRUE(MpiSession::launched_by_mpirun());
}

TEST(ProcessGroups, EveryDivisorOfTheWorldSplitsIntoConsecutiveGroups) {
  const int rank = world_rank();
  const int size = world_size();
  for (int tp : divisors(size)) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    ProcessGroups groups = split_tp_groups(tp);
    EXPECT_EQ(groups.world_rank, rank);
    EXPECT_EQ(groups.world_size, size);
    EXPECT_EQ(groups.tp_size, tp);
    EXPECT_EQ(groups.tp_rank, rank % tp);
    EXPECT_EQ(groups.group_index, rank / tp);
    EXPECT_EQ(groups.num_groups, size / tp);
    EXPECT_EQ(groups.is_leader(), rank % tp == 0);
    ASSERT_NE(groups.tp_comm.get(), MPI_COMM_NULL);
    int comm_rank = -1, comm_size = -1;
    MPI_Comm_rank(groups.tp_comm.get(), &comm_rank);
    MPI_Comm_size(groups.tp_comm.get(), &comm_size);
    EXPECT_EQ(comm_rank, groups.tp_rank);
    EXPECT_EQ(comm_size, tp);
  }
}

TEST(ProcessGroups, CollectivesStayInsideTheGroup) {
  const int rank = world_rank();
  for (int tp : divisors(world_size())) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    const ProcessGroups groups = split_tp_groups(tp);
    MpiCommunicator comm(groups.tp_comm.get(), kTestTimeout, groups.tp_label());
    EXPECT_EQ(comm.rank(), groups.tp_rank);
    EXPECT_EQ(comm.size(), tp);
    const int first = groups.group_index * tp;

    // Sum of world_rank + 1 over the group's ranks only.
    std::vector<float> data(8, static_cast<float>(rank + 1));
    comm.all_reduce_sum(data.data(), 8);
    int expected = 0;
    for (int r = first; r < first + tp; ++r) expected += r + 1;
    EXPECT_THAT(data, testing::Each(static_cast<float>(expected)));

    // All-gather lists the group's world ranks in tp-rank order.
    const float me = static_cast<float>(rank);
    std::vector<float> gathered(tp, -1.0f);
    comm.all_gather(&me, 1, gathered.data());
    for (int r = 0; r < tp; ++r) EXPECT_EQ(gathered[r], static_cast<float>(first + r));

    // The leader's broadcast reaches its group and no other.
    int plan = groups.is_leader() ? 100 + groups.group_index : -1;
    comm.broadcast(&plan, sizeof(plan), 0);
    EXPECT_EQ(plan, 100 + groups.group_index);
  }
}

TEST(ProcessGroups, DescribeNamesTheLayout) {
  const int rank = world_rank();
  const int size = world_size();
  const ProcessGroups one = split_tp_groups(1);
  EXPECT_EQ(one.describe(), fmt::format("world {} = {} group{} x tp 1; rank {} is group {} rank 0",
                                        size, size, size == 1 ? "" : "s", rank, rank));
  const ProcessGroups all = split_tp_groups(size);
  EXPECT_EQ(all.describe(), fmt::format("world {} = 1 group x tp {}; rank {} is group 0 rank {}",
                                        size, size, rank, rank));
  EXPECT_EQ(all.tp_label(), "tp group 0");
  if (size == 4) {
    const ProcessGroups two = split_tp_groups(2);
    EXPECT_EQ(two.describe(), fmt::format("world 4 = 2 groups x tp 2; rank {} is group {} rank {}",
                                          rank, rank / 2, rank % 2));
    EXPECT_EQ(two.tp_label(), fmt::format("tp group {}", rank / 2));
  }
}

TEST(ProcessGroups, SizeThatDoesNotDivideTheWorldIsRejected) {
  const int size = world_size();
  std::vector<int> bad = {size + 1};
  if (size == 4) bad.push_back(3);
  for (int tp : bad) {
    try {
      split_tp_groups(tp);
      ADD_FAILURE() << "tp " << tp << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_THAT(e.what(),
                  HasSubstr(fmt::format("world size {} is not a multiple of --tp {}", size, tp)));
    }
  }
  for (int tp : {0, -2}) {
    try {
      split_tp_groups(tp);
      ADD_FAILURE() << "tp " << tp << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_THAT(e.what(), HasSubstr("--tp must be at least 1"));
    }
  }
}

TEST(MpiComm, MovesAndFreesItsCommunicator) {
  MPI_Comm dup = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &dup);
  MpiComm a(dup);
  MpiComm b(std::move(a));
  EXPECT_EQ(a.get(), MPI_COMM_NULL);
  EXPECT_EQ(b.get(), dup);
  MpiComm c;
  c = std::move(b);
  EXPECT_EQ(b.get(), MPI_COMM_NULL);
  EXPECT_EQ(c.get(), dup);
  c.reset();
  EXPECT_EQ(c.get(), MPI_COMM_NULL);
  // World is never freed.
  { MpiComm world(MPI_COMM_WORLD); }
  MPI_Barrier(MPI_COMM_WORLD);
}

}  // namespace
}  // namespace mla
