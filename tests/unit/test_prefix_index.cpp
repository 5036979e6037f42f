// PrefixIndex (prefix caching): full pages of a prefix are found again by later sequences
// with the same leading tokens, never by another prefix (partial pages, other tokens, another
// parent), kept pages hold one reference each, and eviction frees only pages no sequence
// holds, children before their parents, least recently used first.
#include <gtest/gtest.h>

#include <vector>

#include "kernels/error.h"
#include "runtime/page_pool.h"
#include "runtime/prefix_index.h"

namespace mla {
namespace {

constexpr int32_t kB = 4;

std::vector<int32_t> seq(std::initializer_list<int32_t> pages_first_tokens) {
  // Each page k holds first, first+1, first+2, first+3.
  std::vector<int32_t> t;
  for (int32_t f : pages_first_tokens) {
    for (int32_t i = 0; i < kB; ++i) t.push_back(f + i);
  }
  return t;
}

// Offers the first n pages of `tokens`, computed into freshly allocated pages; returns them
// (still held by the "sequence").
std::vector<int32_t> compute(PagePool& pool, PrefixIndex& index, const std::vector<int32_t>& tokens,
                             int32_t n) {
  std::vector<int32_t> pages;
  EXPECT_TRUE(pool.allocate(n, &pages));
  uint64_t parent = 0;
  for (int32_t j = 0; j < n; ++j) parent = index.insert(parent, tokens.data() + j * kB, pages[j]);
  return pages;
}

void release_all(PagePool& pool, const std::vector<int32_t>& pages) {
  for (int32_t p : pages) pool.release(p);
}

TEST(PrefixIndex, ALaterSequenceFindsTheFullPagesOfItsPrefix) {
  PagePool pool(16);
  PrefixIndex index(pool, kB);
  const std::vector<int32_t> a = seq({10, 20, 30});
  const std::vector<int32_t> pages = compute(pool, index, a, 3);
  release_all(pool, pages);  // the sequence ends; the index keeps them
  EXPECT_EQ(index.kept(), 3);
  EXPECT_EQ(index.evictable(), 3);
  EXPECT_EQ(pool.num_free(), 13);

  // Same first two pages, then other tokens, then a partial page.
  std::vector<int32_t> b = seq({10, 20, 99});
  b.push_back(7);
  std::vector<uint64_t> keys;
  const std::vector<int32_t> got = index.match(b, 8, &keys);
  EXPECT_EQ(got, (std::vector<int32_t>{pages[0], pages[1]}));
  EXPECT_EQ(keys.size(), 2u);
  EXPECT_EQ(pool.ref_count(pages[0]), 2) << "the index and the new sequence";
  EXPECT_EQ(index.evictable(), 1);
  EXPECT_EQ(index.stats().lookups, 0) << "counted once the sequence is admitted";
  index.count_lookup(8, static_cast<int32_t>(b.size()), static_cast<int32_t>(got.size()));
  EXPECT_EQ(index.stats().lookups, 1);
  EXPECT_EQ(index.stats().lookup_tokens, 3 * kB) << "its three full pages";
  EXPECT_EQ(index.stats().hit_tokens, 2 * kB);
  release_all(pool, got);

  // At most max_pages; nothing for a different first page or for a prefix shorter than a page.
  keys.clear();
  EXPECT_EQ(index.match(a, 1, &keys).size(), 1u);
  pool.release(pages[0]);
  EXPECT_TRUE(index.match(seq({11, 20, 30}), 8, &keys).empty());
  EXPECT_TRUE(index.match({10, 11, 12}, 8, &keys).empty());
}

TEST(PrefixIndex, ThePageOfAnotherParentIsNotFound) {
  PagePool pool(16);
  PrefixIndex index(pool, kB);
  // Page 1 of both holds tokens 20..23, after different first pages.
  const std::vector<int32_t> x = compute(pool, index, seq({10, 20}), 2);
  std::vector<uint64_t> keys;
  const std::vector<int32_t> got = index.match(seq({50, 20}), 8, &keys);
  EXPECT_TRUE(got.empty());
  release_all(pool, x);
}

TEST(PrefixIndex, ASecondCopyOfAKeptPageIsNotKept) {
  PagePool pool(16);
  PrefixIndex index(pool, kB);
  const std::vector<int32_t> first = compute(pool, index, seq({10, 20}), 2);
  const std::vector<int32_t> second = compute(pool, index, seq({10, 20}), 2);
  EXPECT_EQ(index.kept(), 2);
  EXPECT_EQ(pool.ref_count(second[0]), 1) << "only its sequence holds the duplicate";
  release_all(pool, first);
  release_all(pool, second);
  EXPECT_EQ(pool.num_free(), 14);
}

TEST(PrefixIndex, EvictionFreesOnlyUnheldPagesChildrenFirstLeastRecentFirst) {
  PagePool pool(16);
  PrefixIndex index(pool, kB);
  const std::vector<int32_t> old_pages = compute(pool, index, seq({1, 2, 3}), 3);
  const std::vector<int32_t> new_pages = compute(pool, index, seq({7, 8}), 2);
  release_all(pool, old_pages);
  // new_pages are still held by their sequence.
  EXPECT_EQ(index.evictable(), 3);
  EXPECT_EQ(index.evict(1), 1);
  // The oldest prefix's last page went first: its first two pages are still found.
  std::vector<uint64_t> keys;
  std::vector<int32_t> got = index.match(seq({1, 2, 3}), 8, &keys);
  EXPECT_EQ(got, (std::vector<int32_t>{old_pages[0], old_pages[1]}));
  release_all(pool, got);
  EXPECT_EQ(index.evict(10), 2) << "held pages are never evicted";
  EXPECT_EQ(index.kept(), 2);
  release_all(pool, new_pages);
  EXPECT_EQ(index.evict(10), 2);
  EXPECT_EQ(index.kept(), 0);
  EXPECT_EQ(pool.num_free(), 16) << "every reference back";
  EXPECT_EQ(index.stats().evicted_pages, 5);
}

// The pool counts the pages an index holds alone as references come and go (what evictable()
// reads), and refuses marks that make no sense.
TEST(PrefixIndex, ThePoolCountsIndexedPagesNothingElseHolds) {
  PagePool pool(4);
  std::vector<int32_t> pages;
  ASSERT_TRUE(pool.allocate(2, &pages));
  pool.retain(pages[0]);  // the index's reference, then its mark
  pool.mark_indexed(pages[0], true);
  EXPECT_EQ(pool.num_indexed_alone(), 0) << "its sequence still holds it";
  pool.release(pages[0]);
  EXPECT_EQ(pool.num_indexed_alone(), 1);
  pool.retain(pages[0]);  // a later sequence reuses it
  EXPECT_EQ(pool.num_indexed_alone(), 0);
  pool.release(pages[0]);
  EXPECT_THROW(pool.release(pages[0]), Error) << "the index's own reference, still marked";
  EXPECT_THROW(pool.mark_indexed(pages[0], true), Error) << "marked twice";
  EXPECT_THROW(pool.mark_indexed(3, true), Error) << "a free page";
  pool.mark_indexed(pages[0], false);
  EXPECT_EQ(pool.num_indexed_alone(), 0);
  pool.release(pages[0]);
  pool.release(pages[1]);
  EXPECT_EQ(pool.num_free(), 4);
}

TEST(PrefixIndex, APageWhoseParentWasEvictedIsNotKept) {
  PagePool pool(16);
  PrefixIndex index(pool, kB);
  const std::vector<int32_t> a = compute(pool, index, seq({1}), 1);
  release_all(pool, a);
  EXPECT_EQ(index.evict(1), 1);
  std::vector<int32_t> pages;
  ASSERT_TRUE(pool.allocate(1, &pages));
  // Offered as page 1 under the evicted page 0's key.
  const std::vector<int32_t> t = seq({1, 2});
  const uint64_t parent = index.insert(0, t.data(), pages[0]);  // re-kept as page 0
  EXPECT_EQ(index.kept(), 1);
  pool.release(pages[0]);
  EXPECT_EQ(index.evict(1), 1);
  std::vector<int32_t> child;
  ASSERT_TRUE(pool.allocate(1, &child));
  index.insert(parent, t.data() + kB, child[0]);
  EXPECT_EQ(index.kept(), 0);
  pool.release(child[0]);
  EXPECT_EQ(pool.num_free(), 16);
}

}  // namespace
}  // namespace mla
