// gtest main for tests that run under mpirun (CPU MPI tests, multi-GPU NCCL tests).
//
// Every rank runs every test, in the same order; tests must make the same collective calls
// on every rank and skip (or not) alike. Rank 0 prints gtest's usual output; other ranks
// print only their failures, prefixed by the rank. The exit code is non-zero on every rank
// if any rank failed, and rank 0 ends with one line naming the ranks that failed.
#include <gtest/gtest.h>
#include <mpi.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <ctime>
#include <string>
#include <vector>

#include "parallel/process_groups.h"

namespace {

// Prints each failure of a non-zero rank as it happens, where the default printer is off.
class RankFailurePrinter : public testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}

  // The name is kept here because gtest holds its lock while calling OnTestPartResult,
  // so asking UnitTest::current_test_info() there would deadlock.
  void OnTestStart(const testing::TestInfo& test) override {
    test_name_ = std::string(test.test_suite_name()) + "." + test.name();
  }
  void OnTestEnd(const testing::TestInfo&) override { test_name_ = "(outside a test)"; }

  void OnTestPartResult(const testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::printf("[rank %d] FAILED: %s at %s:%d\n%s\n", rank_, test_name_.c_str(),
                result.file_name() != nullptr ? result.file_name() : "?", result.line_number(),
                result.message());
    std::fflush(stdout);
  }

 private:
  int rank_;
  std::string test_name_ = "(outside a test)";
};

std::string join_ranks(const std::vector<int>& codes) {
  std::string text;
  for (size_t r = 0; r < codes.size(); ++r) {
    if (codes[r] == 0) continue;
    if (!text.empty()) text += ", ";
    text += std::to_string(r);
  }
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  mla::MpiSession session(&argc, &argv);
  int rank = 0;
  int size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);

  testing::InitGoogleTest(&argc, argv);
  spdlog::set_level(spdlog::level::warn);  // model loads on every rank would drown the output
  // --gtest_shuffle without a seed picks one per process from the clock; every rank must
  // run the tests in the same order, so all take rank 0's.
  int seed = GTEST_FLAG_GET(random_seed);
  if (GTEST_FLAG_GET(shuffle) && seed == 0 && rank == 0) {
    seed = static_cast<int>(std::time(nullptr) % 99999) + 1;
  }
  MPI_Bcast(&seed, 1, MPI_INT, 0, MPI_COMM_WORLD);
  GTEST_FLAG_SET(random_seed, seed);
  if (rank != 0) {
    testing::TestEventListeners& listeners = testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }

  int code = RUN_ALL_TESTS();
  std::fflush(stdout);

  std::vector<int> codes(size);
  MPI_Gather(&code, 1, MPI_INT, codes.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  int worst = 0;
  MPI_Allreduce(&code, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0) {
    if (worst == 0) {
      std::printf("mpi tests: %d rank%s, all passed\n", size, size == 1 ? "" : "s");
    } else {
      std::printf("mpi tests: %d rank%s, FAILED on rank(s) %s\n", size, size == 1 ? "" : "s",
                  join_ranks(codes).c_str());
    }
    std::fflush(stdout);
  }
  return worst;
}
