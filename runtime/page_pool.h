// PagePool: reference-counted allocator of cache page ids.
//
// Pages are the ids 0..num_pages-1; a page is free while its reference count is zero.
// Sharing a page (prefix reuse, forked sequences) is a retain; each holder releases once.
// Allocation hands out the lowest free ids first, so a given sequence of calls always
// yields the same ids. Not thread-safe: the engine's step loop owns the pool.
#pragma once

#include <cstdint>
#include <functional>
#include <queue>
#include <vector>

namespace mla {

class PagePool {
 public:
  explicit PagePool(int32_t num_pages);

  int32_t num_pages() const { return static_cast<int32_t>(ref_counts_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }

  // All or nothing: appends n free ids to *out, each with reference count 1, and returns
  // true; returns false and changes nothing (pool and *out) if fewer than n are free.
  bool allocate(int32_t n, std::vector<int32_t>* out);
  // Adds a holder to an allocated page. Throws kInternal for a free or out-of-range page.
  void retain(int32_t page);
  // Drops a holder; the page becomes free when none remain. Throws kInternal for a free or
  // out-of-range page (a double release is a bug in the caller's bookkeeping).
  void release(int32_t page);
  // 0 for a free page. Throws kInternal for an out-of-range id.
  int32_t ref_count(int32_t page) const;

  // Marks an allocated page as held by an index (the prefix cache's), or no longer. The pool
  // counts the marked pages that nothing else holds (reference count 1): what the index could
  // free, kept current by retain and release so reading it costs nothing. Throws kInternal for
  // a free or out-of-range page, or a mark that does not change.
  void mark_indexed(int32_t page, bool indexed);
  int32_t num_indexed_alone() const { return indexed_alone_; }

 private:
  void check_range(int32_t page) const;

  std::vector<int32_t> ref_counts_;  // [num_pages]
  std::vector<bool> indexed_;        // [num_pages]
  int32_t indexed_alone_ = 0;
  std::priority_queue<int32_t, std::vector<int32_t>, std::greater<>> free_;  // min-heap
};

}  // namespace mla
