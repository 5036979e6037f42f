#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "kernels/error.h"
#include "runtime/latent_cache.h"
#include "runtime/page_pool.h"

namespace mla {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

ErrorCode code_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.code();
  }
  ADD_FAILURE() << "expected mla::Error";
  return ErrorCode::kInternal;
}

TEST(PagePool, AllocatesLowestFreeIdsWithRefCountOne) {
  PagePool pool(8);
  std::vector<int32_t> pages = {42};  // allocate appends
  ASSERT_TRUE(pool.allocate(3, &pages));
  EXPECT_EQ(pages, (std::vector<int32_t>{42, 0, 1, 2}));
  EXPECT_EQ(pool.num_free(), 5);
  for (int32_t page = 0; page < 8; ++page) EXPECT_EQ(pool.ref_count(page), page < 3 ? 1 : 0);
}

TEST(PagePool, ExhaustionLeavesStateUnchanged) {
  PagePool pool(4);
  std::vector<int32_t> held;
  ASSERT_TRUE(pool.allocate(3, &held));
  std::vector<int32_t> pages = {7};
  EXPECT_FALSE(pool.allocate(2, &pages));
  EXPECT_EQ(pages, (std::vector<int32_t>{7}));
  EXPECT_EQ(pool.num_free(), 1);
  EXPECT_EQ(pool.ref_count(3), 0);
  ASSERT_TRUE(pool.allocate(1, &pages));
  EXPECT_EQ(pages, (std::vector<int32_t>{7, 3}));
  EXPECT_EQ(pool.num_free(), 0);
  EXPECT_TRUE(pool.allocate(0, &pages));
}

TEST(PagePool, ReleaseRestoresExactFreeCount) {
  PagePool pool(10);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(pool.allocate(4, &a));
  ASSERT_TRUE(pool.allocate(6, &b));
  EXPECT_EQ(pool.num_free(), 0);
  for (int32_t page : a) pool.release(page);
  EXPECT_EQ(pool.num_free(), 4);
  for (int32_t page : b) pool.release(page);
  EXPECT_EQ(pool.num_free(), 10);
  std::vector<int32_t> all;
  EXPECT_TRUE(pool.allocate(10, &all));
}

TEST(PagePool, RetainAndReleaseCountReferences) {
  PagePool pool(2);
  std::vector<int32_t> pages;
  ASSERT_TRUE(pool.allocate(1, &pages));
  pool.retain(0);
  pool.retain(0);
  EXPECT_EQ(pool.ref_count(0), 3);
  pool.release(0);
  pool.release(0);
  EXPECT_EQ(pool.ref_count(0), 1);
  EXPECT_EQ(pool.num_free(), 1);
  pool.release(0);
  EXPECT_EQ(pool.ref_count(0), 0);
  EXPECT_EQ(pool.num_free(), 2);
}

TEST(PagePool, MisuseThrowsInternal) {
  PagePool pool(2);
  EXPECT_EQ(code_of([&] { pool.release(0); }), ErrorCode::kInternal);  // free page
  EXPECT_EQ(code_of([&] { pool.retain(1); }), ErrorCode::kInternal);   // free page
  EXPECT_EQ(code_of([&] { pool.release(2); }), ErrorCode::kInternal);
  EXPECT_EQ(code_of([&] { pool.release(-1); }), ErrorCode::kInternal);
  EXPECT_EQ(code_of([&] { pool.ref_count(2); }), ErrorCode::kInternal);
  EXPECT_EQ(pool.num_free(), 2);
}

CacheGeometry geometry_with_block(int32_t block_size) {
  return CacheGeometry{.num_layers = 3, .block_size = block_size, .kv_lora_rank = 6, .rope_dim = 2};
}

// A value unique to (layer, pos, element), exact in fp32.
float value_at(int32_t layer, int32_t pos, int32_t element) {
  return static_cast<float>(layer * 100000 + pos * 10 + element);
}

void fill_tokens(LatentCache& cache, const BlockTable& table, int32_t num_tokens) {
  const CacheGeometry& g = cache.geometry();
  for (int32_t layer = 0; layer < g.num_layers; ++layer) {
    for (int32_t pos = 0; pos < num_tokens; ++pos) {
      float* row = cache.row(table, layer, pos);
      for (int32_t e = 0; e < g.width(); ++e) row[e] = value_at(layer, pos, e);
    }
  }
}

void expect_tokens(const LatentCache& cache, const BlockTable& table, int32_t num_tokens) {
  const CacheGeometry& g = cache.geometry();
  for (int32_t layer = 0; layer < g.num_layers; ++layer) {
    for (int32_t pos = 0; pos < num_tokens; ++pos) {
      const float* row = cache.row(table, layer, pos);
      for (int32_t e = 0; e < g.width(); ++e) {
        ASSERT_EQ(row[e], value_at(layer, pos, e)) << "layer " << layer << " pos " << pos;
      }
    }
  }
}

// Fills every free page with NaN, so reading a row nobody wrote shows up in comparisons.
void poison_free_pages(LatentCache& cache) {
  const CacheGeometry& g = cache.geometry();
  BlockTable all;
  ASSERT_TRUE(cache.pool().allocate(cache.pool().num_free(), &all.pages));
  for (int32_t page : all.pages) {
    for (int32_t layer = 0; layer < g.num_layers; ++layer) {
      std::fill_n(cache.page_block(page, layer), g.block_size * g.width(), kNaN);
    }
  }
  cache.release(all);
}

TEST(LatentCache, RejectsInvalidGeometry) {
  for (CacheGeometry g : {CacheGeometry{0, 4, 6, 2}, CacheGeometry{3, 0, 6, 2},
                          CacheGeometry{3, 4, 0, 2}, CacheGeometry{3, 4, 6, -1}}) {
    EXPECT_EQ(code_of([&] { LatentCache(g, 4); }), ErrorCode::kInvalidArgument);
  }
  EXPECT_EQ(code_of([&] { LatentCache(geometry_with_block(4), -1); }), ErrorCode::kInvalidArgument);
}

TEST(LatentCache, PagesForRoundsUp) {
  LatentCache cache(geometry_with_block(4), 1);
  EXPECT_EQ(cache.geometry().width(), 8);
  EXPECT_EQ(cache.pages_for(0), 0);
  EXPECT_EQ(cache.pages_for(1), 1);
  EXPECT_EQ(cache.pages_for(4), 1);
  EXPECT_EQ(cache.pages_for(5), 2);
}

TEST(LatentCache, ReserveGrowsTableAndFailureLeavesItUnchanged) {
  LatentCache cache(geometry_with_block(4), 3);
  BlockTable table;
  ASSERT_TRUE(cache.reserve(table, 5));
  EXPECT_EQ(table.pages, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(table.num_tokens, 5);
  ASSERT_TRUE(cache.reserve(table, 8));  // fits in the pages already held
  EXPECT_EQ(table.pages.size(), 2u);
  EXPECT_EQ(table.num_tokens, 8);
  ASSERT_TRUE(cache.reserve(table, 3));  // never shrinks
  EXPECT_EQ(table.num_tokens, 8);

  EXPECT_FALSE(cache.reserve(table, 13));
  EXPECT_EQ(table.pages, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(table.num_tokens, 8);
  EXPECT_EQ(cache.pool().num_free(), 1);

  ASSERT_TRUE(cache.reserve(table, 12));
  EXPECT_EQ(cache.pool().num_free(), 0);
  cache.release(table);
  EXPECT_TRUE(table.pages.empty());
  EXPECT_EQ(table.num_tokens, 0);
  EXPECT_EQ(cache.pool().num_free(), 3);
}

TEST(LatentCache, FragmentedPoolFillsHolesExactly) {
  LatentCache cache(geometry_with_block(4), 12);
  std::vector<BlockTable> tables(6);
  for (BlockTable& table : tables) ASSERT_TRUE(cache.reserve(table, 8));
  EXPECT_EQ(cache.pool().num_free(), 0);
  for (size_t i = 0; i < tables.size(); i += 2) cache.release(tables[i]);
  EXPECT_EQ(cache.pool().num_free(), 6);

  BlockTable big;
  ASSERT_TRUE(cache.reserve(big, 24));
  EXPECT_EQ(big.pages, (std::vector<int32_t>{0, 1, 4, 5, 8, 9}));
  EXPECT_EQ(cache.pool().num_free(), 0);
  BlockTable more;
  EXPECT_FALSE(cache.reserve(more, 1));

  // The survivors' rows and the new table's rows do not overlap.
  fill_tokens(cache, big, 24);
  for (size_t i = 1; i < tables.size(); i += 2) {
    for (int32_t page : tables[i].pages) {
      for (int32_t layer = 0; layer < 3; ++layer)
        std::fill_n(cache.page_block(page, layer), 4 * 8, -1.0f);
    }
  }
  expect_tokens(cache, big, 24);
}

class LatentCacheBlockSize : public ::testing::TestWithParam<int32_t> {};

TEST_P(LatentCacheBlockSize, RowsAddressTheirPageAcrossBoundaries) {
  const int32_t block_size = GetParam();
  LatentCache cache(geometry_with_block(block_size), 8);
  BlockTable other, table;
  // Interleave two tables so consecutive pages of `table` are not adjacent in memory.
  for (int32_t tokens = block_size; tokens <= 3 * block_size; tokens += block_size) {
    ASSERT_TRUE(cache.reserve(other, tokens));
    ASSERT_TRUE(cache.reserve(table, tokens));
  }
  EXPECT_EQ(table.pages, (std::vector<int32_t>{1, 3, 5}));
  const int32_t num_tokens = 3 * block_size;
  const int32_t width = cache.geometry().width();
  for (int32_t layer = 0; layer < 3; ++layer) {
    for (int32_t pos = 0; pos < num_tokens; ++pos) {
      EXPECT_EQ(
          cache.row(table, layer, pos),
          cache.page_block(table.pages[pos / block_size], layer) + (pos % block_size) * width);
    }
  }
  fill_tokens(cache, table, num_tokens);
  fill_tokens(cache, other, num_tokens);  // writes elsewhere; must not clobber `table`
  expect_tokens(cache, table, num_tokens);

  EXPECT_EQ(code_of([&] { cache.row(table, 0, num_tokens); }), ErrorCode::kInternal);
  EXPECT_EQ(code_of([&] { cache.row(table, 0, -1); }), ErrorCode::kInternal);
  EXPECT_EQ(code_of([&] { cache.row(table, 3, 0); }), ErrorCode::kInternal);
  EXPECT_EQ(code_of([&] { cache.page_block(7, 0); }), ErrorCode::kInternal);  // free
  EXPECT_EQ(code_of([&] { cache.page_block(8, 0); }), ErrorCode::kInternal);
}

INSTANTIATE_TEST_SUITE_P(BlockSizes, LatentCacheBlockSize, ::testing::Values(1, 4, 64));

struct MigrationCase {
  int32_t from_block_size;
  int32_t to_block_size;
};

class LatentCacheMigration : public ::testing::TestWithParam<MigrationCase> {};

TEST_P(LatentCacheMigration, ExportImportRoundTrips) {
  const auto [from_block, to_block] = GetParam();
  constexpr int32_t kTokens = 11;
  LatentCache source(geometry_with_block(from_block), 16);
  LatentCache target(geometry_with_block(to_block), 16);
  poison_free_pages(source);
  poison_free_pages(target);

  BlockTable table;
  ASSERT_TRUE(source.reserve(table, kTokens));
  fill_tokens(source, table, kTokens);
  const Tensor latents = source.export_tokens(table, kTokens);
  EXPECT_EQ(latents.shape(), (Shape{3, kTokens, 8}));
  for (int32_t layer = 0; layer < 3; ++layer) {
    for (int32_t pos = 0; pos < kTokens; ++pos) {
      for (int32_t e = 0; e < 8; ++e) {
        ASSERT_EQ(latents.f32()[(layer * kTokens + pos) * 8 + e], value_at(layer, pos, e));
      }
    }
  }

  BlockTable moved;
  ASSERT_TRUE(target.import_tokens(moved, latents));
  EXPECT_EQ(moved.num_tokens, kTokens);
  EXPECT_EQ(static_cast<int32_t>(moved.pages.size()), target.pages_for(kTokens));
  expect_tokens(target, moved, kTokens);
}

INSTANTIATE_TEST_SUITE_P(BlockSizes, LatentCacheMigration,
                         ::testing::Values(MigrationCase{4, 4}, MigrationCase{4, 1},
                                           MigrationCase{1, 64}, MigrationCase{64, 4}));

// A sequence-sharded rank (page j on rank j mod 2) writes and exports only its own pages;
// the two ranks' exports together are the whole sequence, whatever range is asked for.
TEST(LatentCache, ShardedRanksExportAndWriteOnlyTheirPages) {
  constexpr int32_t kTokens = 11;  // pages 0 and 2 on rank 0, page 1 on rank 1
  LatentCache whole(geometry_with_block(4), 4);
  BlockTable table;
  ASSERT_TRUE(whole.reserve(table, kTokens));
  fill_tokens(whole, table, kTokens);
  const Tensor latents = whole.export_tokens(table, kTokens);
  const int64_t width = 8;
  std::vector<float> sum(latents.numel(), 0.0f), range_sum(3 * 6 * width, 0.0f);
  for (int32_t rank = 0; rank < 2; ++rank) {
    LatentCache shard(geometry_with_block(4), 4, ShardPlan(2, rank, 2));
    poison_free_pages(shard);
    BlockTable mine;
    ASSERT_TRUE(shard.reserve(mine, kTokens));
    EXPECT_EQ(mine.pages.size(), rank == 0 ? 2u : 1u);
    shard.write_range(mine, 0, latents);
    for (int32_t pos = 0; pos < kTokens; ++pos) {
      if ((pos / 4) % 2 == rank) EXPECT_EQ(shard.row(mine, 2, pos)[5], value_at(2, pos, 5));
    }
    const Tensor out = shard.export_tokens(mine, kTokens);
    for (int32_t layer = 0; layer < 3; ++layer) {
      for (int32_t pos = 0; pos < kTokens; ++pos) {
        const float v = out.f32()[(layer * kTokens + pos) * width + 3];
        EXPECT_EQ(v, (pos / 4) % 2 == rank ? value_at(layer, pos, 3) : 0.0f)
            << "rank " << rank << " layer " << layer << " token " << pos;
      }
    }
    for (int64_t i = 0; i < out.numel(); ++i) sum[i] += out.f32()[i];
    const Tensor part = shard.export_range(mine, 3, 6);  // tokens 3..8 cross all three pages
    for (int64_t i = 0; i < part.numel(); ++i) range_sum[i] += part.f32()[i];
  }
  for (int64_t i = 0; i < latents.numel(); ++i) ASSERT_EQ(sum[i], latents.f32()[i]) << i;
  for (int32_t layer = 0; layer < 3; ++layer) {
    for (int32_t pos = 3; pos < 9; ++pos) {
      EXPECT_EQ(range_sum[(layer * 6 + pos - 3) * width + 7], value_at(layer, pos, 7));
    }
  }
}

// export_stored packs a sharded rank's rows in token order; copy_stored_rows puts them back
// in place (the leader of a sequence-sharded group does that with each follower's rows).
TEST(LatentCache, StoredRowsPackAndUnpackByTheRanksRuns) {
  constexpr int32_t kTokens = 11;
  LatentCache whole(geometry_with_block(4), 4);
  BlockTable table;
  ASSERT_TRUE(whole.reserve(table, kTokens));
  fill_tokens(whole, table, kTokens);
  const Tensor latents = whole.export_range(table, 2, 8);  // tokens 2..9: pages 0, 1, 2
  Tensor rebuilt = Tensor::zeros(latents.shape());
  for (int32_t rank = 0; rank < 2; ++rank) {
    const ShardPlan plan(2, rank, 2);
    LatentCache shard(geometry_with_block(4), 4, plan);
    BlockTable mine;
    ASSERT_TRUE(shard.reserve(mine, kTokens));
    shard.write_range(mine, 0, whole.export_tokens(table, kTokens));
    const auto runs = stored_runs(plan, 4, 2, 8);
    ASSERT_EQ(runs.size(), rank == 0 ? 2u : 1u);
    const Tensor packed = shard.export_stored(mine, 2, 8);
    ASSERT_EQ(packed.dim(1), rank == 0 ? 2 + 2 : 4);  // tokens 2,3 and 8,9 / tokens 4..7
    EXPECT_EQ(packed.f32()[(2 * packed.dim(1) + 0) * 8 + 1], value_at(2, rank == 0 ? 2 : 4, 1));
    copy_stored_rows(packed, runs, 2, rebuilt);
    Tensor repacked = Tensor::empty(packed.shape());
    copy_stored_rows(latents, runs, 2, repacked);
    EXPECT_EQ(std::memcmp(repacked.raw(), packed.raw(), packed.nbytes()), 0) << "rank " << rank;
  }
  EXPECT_EQ(std::memcmp(rebuilt.raw(), latents.raw(), latents.nbytes()), 0);
}

TEST(LatentCache, ExportsAPrefix) {
  LatentCache cache(geometry_with_block(4), 4);
  BlockTable table;
  ASSERT_TRUE(cache.reserve(table, 10));
  fill_tokens(cache, table, 10);
  const Tensor prefix = cache.export_tokens(table, 5);
  EXPECT_EQ(prefix.shape(), (Shape{3, 5, 8}));
  EXPECT_EQ(prefix.f32()[(2 * 5 + 4) * 8 + 7], value_at(2, 4, 7));
  EXPECT_EQ(cache.export_tokens(table, 0).shape(), (Shape{3, 0, 8}));
  EXPECT_EQ(code_of([&] { cache.export_tokens(table, 11); }), ErrorCode::kInvalidArgument);
}

TEST(LatentCache, ImportIntoFullCacheReturnsFalseAndChangesNothing) {
  LatentCache source(geometry_with_block(4), 4);
  BlockTable table;
  ASSERT_TRUE(source.reserve(table, 9));
  fill_tokens(source, table, 9);
  const Tensor latents = source.export_tokens(table, 9);

  LatentCache target(geometry_with_block(4), 4);
  BlockTable resident;
  ASSERT_TRUE(target.reserve(resident, 8));  // leaves 2 pages; the import needs 3
  BlockTable moved;
  EXPECT_FALSE(target.import_tokens(moved, latents));
  EXPECT_TRUE(moved.pages.empty());
  EXPECT_EQ(moved.num_tokens, 0);
  EXPECT_EQ(target.pool().num_free(), 2);

  target.release(resident);
  ASSERT_TRUE(target.import_tokens(moved, latents));
  expect_tokens(target, moved, 9);
}

TEST(LatentCache, ImportRejectsBadInput) {
  LatentCache cache(geometry_with_block(4), 4);
  BlockTable table;
  EXPECT_EQ(code_of([&] {
              cache.import_tokens(table, Tensor::zeros({2, 3, 8}));
            }),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] {
              cache.import_tokens(table, Tensor::zeros({3, 3, 7}));
            }),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] {
              cache.import_tokens(table, Tensor::zeros({3, 3, 8}, DType::kBF16));
            }),
            ErrorCode::kInvalidArgument);
  ASSERT_TRUE(cache.reserve(table, 1));
  EXPECT_EQ(code_of([&] {
              cache.import_tokens(table, Tensor::zeros({3, 3, 8}));
            }),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(cache.pool().num_free(), 3);
}

}  // namespace
}  // namespace mla
