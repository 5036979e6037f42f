#include "runtime/page_pool.h"

#include "kernels/error.h"

namespace mla {

PagePool::PagePool(int32_t num_pages) {
  MLA_REQUIRE(num_pages >= 0, "num_pages must be >= 0, got {}", num_pages);
  ref_counts_.assign(num_pages, 0);
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
  ++ref_counts_[page];
}

void PagePool::release(int32_t page) {
  check_range(page);
  MLA_CHECK(ref_counts_[page] > 0, "release of free page {}", page);
  if (--ref_counts_[page] == 0) free_.push(page);
}

int32_t PagePool::ref_count(int32_t page) const {
  check_range(page);
  return ref_counts_[page];
}

void PagePool::check_range(int32_t page) const {
  MLA_CHECK(0 <= page && page < num_pages(), "page {} out of range [0, {})", page, num_pages());
}

}  // namespace mla
