#include "runtime/prefix_index.h"

#include <algorithm>

#include "kernels/error.h"
#include "runtime/splitmix.h"

namespace mla {

PrefixIndex::PrefixIndex(PagePool& pool, int32_t block_size)
    : pool_(pool), block_size_(block_size) {
  MLA_REQUIRE(block_size >= 1, "block_size must be >= 1, got {}", block_size);
}

uint64_t prefix_unit_key(uint64_t parent, const int32_t* tokens, int32_t n) {
  uint64_t h = splitmix64(parent ^ 0x5bd1e995u);
  for (int32_t i = 0; i < n; ++i) h = splitmix64(h ^ static_cast<uint32_t>(tokens[i]));
  return h == 0 ? 1 : h;  // 0 is "no parent"
}

std::vector<uint64_t> prefix_unit_keys(const std::vector<int32_t>& tokens, int32_t unit) {
  MLA_REQUIRE(unit >= 1, "a prefix unit must hold >= 1 token, got {}", unit);
  std::vector<uint64_t> keys;
  uint64_t parent = 0;
  for (size_t end = unit; end <= tokens.size(); end += unit) {
    parent = prefix_unit_key(parent, tokens.data() + end - unit, unit);
    keys.push_back(parent);
  }
  return keys;
}

std::vector<uint64_t> PrefixIndex::recent_keys(size_t max) const {
  std::vector<uint64_t> keys;
  for (auto it = lru_.begin(); it != lru_.end() && keys.size() < max; ++it) keys.push_back(*it);
  return keys;
}

PrefixIndex::Entry* PrefixIndex::find(uint64_t key, uint64_t parent, const int32_t* tokens) {
  auto it = entries_.find(key);
  if (it == entries_.end()) return nullptr;
  Entry& e = it->second;
  if (e.parent != parent || !std::equal(e.tokens.begin(), e.tokens.end(), tokens)) return nullptr;
  return &e;
}

void PrefixIndex::touch(Entry& e) { lru_.splice(lru_.begin(), lru_, e.lru); }

std::vector<int32_t> PrefixIndex::match(const std::vector<int32_t>& tokens, int32_t max_pages,
                                        std::vector<uint64_t>* keys) {
  const int32_t full =
      std::min<int32_t>(max_pages, static_cast<int32_t>(tokens.size()) / block_size_);
  std::vector<int32_t> pages;
  std::vector<uint64_t> found;
  uint64_t parent = 0;
  for (int32_t j = 0; j < full; ++j) {
    const int32_t* page_tokens = tokens.data() + int64_t{j} * block_size_;
    const uint64_t key = prefix_unit_key(parent, page_tokens, block_size_);
    Entry* e = find(key, parent, page_tokens);
    if (e == nullptr) break;
    pool_.retain(e->page);
    pages.push_back(e->page);
    found.push_back(key);
    parent = key;
  }
  // Last page first, so a parent ends up more recent than its children.
  for (auto it = found.rbegin(); it != found.rend(); ++it) touch(entries_.at(*it));
  keys->insert(keys->end(), found.begin(), found.end());
  return pages;
}

void PrefixIndex::count_lookup(int32_t max_pages, int32_t tokens, int32_t hit_pages) {
  ++stats_.lookups;
  stats_.lookup_tokens +=
      int64_t{std::max(std::min(max_pages, tokens / block_size_), 0)} * block_size_;
  stats_.hit_tokens += int64_t{hit_pages} * block_size_;
}

uint64_t PrefixIndex::insert(uint64_t parent, const int32_t* tokens, int32_t page, bool* kept) {
  const uint64_t key = prefix_unit_key(parent, tokens, block_size_);
  if (kept != nullptr) *kept = false;
  // Kept already (this prefix, or another under a colliding key, which keeps its page).
  if (entries_.count(key) != 0) return key;
  auto up = entries_.find(parent);
  if (parent != 0 && up == entries_.end()) return key;  // its parent is gone
  pool_.retain(page);
  pool_.mark_indexed(page, true);
  // Just behind its parent in recency (a first page in front), so children go before parents.
  const auto at =
      parent == 0 ? lru_.insert(lru_.begin(), key) : lru_.insert(std::next(up->second.lru), key);
  entries_.emplace(key,
                   Entry{parent, std::vector<int32_t>(tokens, tokens + block_size_), page, at});
  ++stats_.inserted_pages;
  if (kept != nullptr) *kept = true;
  return key;
}

int32_t PrefixIndex::evict(int32_t n, std::vector<uint64_t>* evicted) {
  int32_t freed = 0;
  for (auto it = lru_.end(); freed < n && it != lru_.begin();) {
    --it;
    auto entry = entries_.find(*it);
    if (pool_.ref_count(entry->second.page) != 1) continue;  // a sequence holds it
    pool_.mark_indexed(entry->second.page, false);
    pool_.release(entry->second.page);
    if (evicted != nullptr) evicted->push_back(entry->first);
    entries_.erase(entry);
    it = lru_.erase(it);
    ++freed;
  }
  stats_.evicted_pages += freed;
  return freed;
}

int32_t PrefixIndex::evictable() const { return pool_.num_indexed_alone(); }

}  // namespace mla
