#include "runtime/page_pool.h"

#include "kernels/error.h"

namespace mla {

PagePool::PagePool(int32_t num_pages) {
  MLA_REQUIRE(num_pages >= 0, "num_pages must be >= 0, got {}", num_pages);
  ref_counts_.assign(num_pages, 0);
  indexed_.assign(num_pages, false);
  for (int32_t page = 0; page < num_pages; ++page) free_.push(page);
}

bool PagePool::allocate(int32_t n, std::vector<int32_t>* out) {
  MLA_REQUIRE(n >= 0, "cannot allocate {} pages", n);
  if (n > num_free()) return false;
  out->reserve(out->size() + n);
  for (int32_t i = 0; i < n; ++i) {
    const int32_t page = free_.top();
    free_.pop();
    ref_counts_[page] = 1;
    out->push_back(page);
  }
  return true;
}

void PagePool::retain(int32_t page) {
  check_range(page);
  MLA_CHECK(ref_counts_[page] > 0, "retain of free page {}", page);
  if (indexed_[page] && ref_counts_[page] == 1) --indexed_alone_;
  ++ref_counts_[page];
}

void PagePool::release(int32_t page) {
  check_range(page);
  MLA_CHECK(ref_counts_[page] > 0, "release of free page {}", page);
  MLA_CHECK(!indexed_[page] || ref_counts_[page] > 1,
            "release of page {}'s last holder while an index holds it", page);
  if (--ref_counts_[page] == 0) free_.push(page);
  if (indexed_[page] && ref_counts_[page] == 1) ++indexed_alone_;
}

void PagePool::mark_indexed(int32_t page, bool indexed) {
  check_range(page);
  MLA_CHECK(ref_counts_[page] > 0, "index mark on free page {}", page);
  MLA_CHECK(indexed_[page] != indexed, "page {} is {} indexed", page, indexed ? "already" : "not");
  indexed_[page] = indexed;
  if (ref_counts_[page] == 1) indexed_alone_ += indexed ? 1 : -1;
}

int32_t PagePool::ref_count(int32_t page) const {
  check_range(page);
  return ref_counts_[page];
}

void PagePool::check_range(int32_t page) const {
  MLA_CHECK(0 <= page && page < num_pages(), "page {} out of range [0, {})", page, num_pages());
}

}  // namespace mla
