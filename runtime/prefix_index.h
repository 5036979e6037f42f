// PrefixIndex: full cache pages kept for reuse by later sequences with the same token prefix
// (prefix caching). A page is keyed by a hash chained over the pages before it: page j's key
// hashes page j-1's key and page j's block_size tokens, so a key names a whole prefix. Each
// entry also stores its tokens and its parent's key, and a lookup compares them, so a hash
// collision cannot hand a sequence another prefix's latents.
//
// The index holds one reference on every page it keeps (PagePool::retain), so a kept page
// outlives the sequence that computed it; a page no sequence holds (reference count 1) is
// evictable, least recently used first. A parent is always more recent than its children (a
// new page goes just behind its parent; a lookup touches a prefix's pages from the last to the
// first), so children go first.
// Full pages are never written again (a sequence only appends), so sharing them needs no copy.
//
// Not thread-safe: the engine's step loop owns the cache and its index.
#pragma once

#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

#include "runtime/page_pool.h"

namespace mla {

// The key of a unit of `n` tokens after the unit keyed `parent` (0 for a prompt's first): what
// the index keys its entries by, and what a router computes to look a prompt up in a worker's
// reported keys. Never 0.
uint64_t prefix_unit_key(uint64_t parent, const int32_t* tokens, int32_t n);
// The keys of `tokens`' leading full units of `unit` tokens, each chained over those before.
std::vector<uint64_t> prefix_unit_keys(const std::vector<int32_t>& tokens, int32_t unit);

struct PrefixStats {
  int64_t lookups = 0;        // sequences looked up (once per admission)
  int64_t lookup_tokens = 0;  // tokens those sequences could have reused (their full pages)
  int64_t hit_tokens = 0;     // tokens reused
  int64_t inserted_pages = 0;
  int64_t evicted_pages = 0;
};

class PrefixIndex {
 public:
  // `pool` must outlive the index. Throws kInvalidArgument for block_size < 1.
  PrefixIndex(PagePool& pool, int32_t block_size);
  PrefixIndex(const PrefixIndex&) = delete;
  PrefixIndex& operator=(const PrefixIndex&) = delete;

  // The kept pages of the longest run of full pages, at most max_pages, that `tokens` starts
  // with, in order; each retained once for the caller (who releases them as its own). Their
  // keys are appended to *keys. Counts nothing: a lookup is counted (count_lookup) once the
  // sequence is admitted, not at each try.
  std::vector<int32_t> match(const std::vector<int32_t>& tokens, int32_t max_pages,
                             std::vector<uint64_t>* keys);
  // Counts one lookup of a sequence of `tokens` tokens, at most max_pages of it, that found
  // hit_pages pages (PrefixStats).
  void count_lookup(int32_t max_pages, int32_t tokens, int32_t hit_pages);
  // Offers `page`, full with the block_size tokens at `tokens`, as the page after the one
  // keyed `parent` (0 for a sequence's first page); keeps it unless that prefix's page is kept
  // already or its parent is not kept. Returns the page's key (the next page's parent);
  // *kept (if given) says whether it kept this page.
  uint64_t insert(uint64_t parent, const int32_t* tokens, int32_t page, bool* kept = nullptr);
  // Frees up to n kept pages that no sequence holds, least recently used first; returns how
  // many it freed, and appends their keys to *evicted (if given).
  int32_t evict(int32_t n, std::vector<uint64_t>* evicted = nullptr);
  // Kept pages that no sequence holds (what evict could free).
  int32_t evictable() const;
  int32_t kept() const { return static_cast<int32_t>(entries_.size()); }
  // The keys of up to `max` kept units, most recently used first.
  std::vector<uint64_t> recent_keys(size_t max) const;
  const PrefixStats& stats() const { return stats_; }

 private:
  struct Entry {
    uint64_t parent;  // the previous page's key; 0 for page 0
    std::vector<int32_t> tokens;
    int32_t page;
    std::list<uint64_t>::iterator lru;  // position in lru_
  };
  // The entry for page j of `tokens` under `parent`, or null.
  Entry* find(uint64_t key, uint64_t parent, const int32_t* tokens);
  void touch(Entry& e);  // most recently used

  PagePool& pool_;
  int32_t block_size_;
  std::unordered_map<uint64_t, Entry> entries_;
  std::list<uint64_t> lru_;  // keys, most recently used first
  PrefixStats stats_;
};

}  // namespace mla
