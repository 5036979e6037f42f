// ShardPlan: which heads and which latent-cache pages each tensor-parallel rank owns.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "kernels/error.h"
#include "parallel/shard_plan.h"

namespace mla {
namespace {

using ::testing::HasSubstr;

const std::vector<int32_t> kSizes = {1, 2, 4, 8};

TEST(ShardPlan, HeadsSplitIntoEqualContiguousBlocks) {
  for (int64_t heads : {8, 16, 128}) {
    for (int32_t p : kSizes) {
      SCOPED_TRACE(testing::Message() << "H " << heads << " P " << p);
      std::vector<int> owners(heads, 0);
      int64_t next = 0;
      for (int32_t r = 0; r < p; ++r) {
        const ShardPlan plan(p, r, heads);
        EXPECT_EQ(plan.tp_size(), p);
        EXPECT_EQ(plan.tp_rank(), r);
        EXPECT_EQ(plan.local_heads(), heads / p);
        EXPECT_EQ(plan.head_begin(), next);  // ranks in order, no gaps
        EXPECT_EQ(plan.head_end() - plan.head_begin(), heads / p);
        for (int64_t h = plan.head_begin(); h < plan.head_end(); ++h) owners.at(h)++;
        next = plan.head_end();
      }
      EXPECT_EQ(next, heads);
      for (int64_t h = 0; h < heads; ++h) EXPECT_EQ(owners[h], 1) << "head " << h;
    }
  }
}

TEST(ShardPlan, SequenceModeOwnerOfPageIsIndexModP) {
  for (int32_t p : kSizes) {
    for (int32_t r = 0; r < p; ++r) {
      const ShardPlan plan(p, r, 16, KvShard::kSequence);
      EXPECT_EQ(plan.kv_shard(), KvShard::kSequence);
      for (int64_t j = 0; j < 100; ++j) {
        EXPECT_EQ(plan.owns_page(j), j % p == r) << "P " << p << " rank " << r << " page " << j;
      }
    }
  }
}

TEST(ShardPlan, SequenceModeLocalPagesPartitionTheSequence) {
  for (int32_t p : kSizes) {
    for (int64_t num_pages = 0; num_pages <= 67; ++num_pages) {
      int64_t total = 0;
      for (int32_t r = 0; r < p; ++r) {
        const ShardPlan plan(p, r, 8);
        int64_t owned = 0;
        for (int64_t j = 0; j < num_pages; ++j) owned += plan.owns_page(j) ? 1 : 0;
        EXPECT_EQ(plan.local_pages(num_pages), owned)
            << "P " << p << " rank " << r << " pages " << num_pages;
        // Balanced: no rank holds more than one page over another.
        EXPECT_LE(plan.local_pages(num_pages), (num_pages + p - 1) / p);
        EXPECT_GE(plan.local_pages(num_pages), num_pages / p);
        total += plan.local_pages(num_pages);
      }
      EXPECT_EQ(total, num_pages) << "P " << p;
    }
  }
}

TEST(ShardPlan, ReplicateModeOwnsEveryPage) {
  for (int32_t p : kSizes) {
    for (int32_t r = 0; r < p; ++r) {
      const ShardPlan plan(p, r, 16, KvShard::kReplicate);
      EXPECT_EQ(plan.kv_shard(), KvShard::kReplicate);
      for (int64_t j = 0; j < 50; ++j) EXPECT_TRUE(plan.owns_page(j));
      for (int64_t n : {0, 1, 7, 64}) EXPECT_EQ(plan.local_pages(n), n);
      // Heads are still split.
      EXPECT_EQ(plan.local_heads(), 16 / p);
      EXPECT_EQ(plan.head_begin(), r * (16 / p));
    }
  }
}

void expect_invalid(int32_t size, int32_t rank, int64_t heads, const std::string& text) {
  SCOPED_TRACE(testing::Message() << "size " << size << " rank " << rank << " heads " << heads);
  try {
    ShardPlan plan(size, rank, heads);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr(text));
  }
}

TEST(ShardPlan, RejectsInvalidGroups) {
  expect_invalid(3, 0, 16, "does not divide");
  expect_invalid(32, 0, 16, "does not divide");
  expect_invalid(2, 2, 16, "rank 2");
  expect_invalid(2, -1, 16, "rank -1");
  expect_invalid(0, 0, 16, ">= 1");
  expect_invalid(-2, 0, 16, ">= 1");
}

}  // namespace
}  // namespace mla
