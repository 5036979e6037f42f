#include "parallel/shard_plan.h"

#include "kernels/error.h"

namespace mla {

ShardPlan::ShardPlan(int32_t tp_size, int32_t tp_rank, int64_t num_heads, KvShard kv_shard)
    : tp_size_(tp_size), tp_rank_(tp_rank), num_heads_(num_heads), kv_shard_(kv_shard) {
  MLA_REQUIRE(tp_size >= 1, "tensor-parallel size must be >= 1, got {}", tp_size);
  MLA_REQUIRE(tp_rank >= 0 && tp_rank < tp_size, "rank {} outside a group of {}", tp_rank, tp_size);
  MLA_REQUIRE(num_heads % tp_size == 0,
              "tensor-parallel size {} does not divide the {} attention heads", tp_size, num_heads);
}

int64_t ShardPlan::local_pages(int64_t num_pages) const {
  if (kv_shard_ == KvShard::kReplicate) return num_pages;
  // Pages tp_rank, tp_rank + P, tp_rank + 2P, ... below num_pages.
  return num_pages > tp_rank_ ? (num_pages - tp_rank_ + tp_size_ - 1) / tp_size_ : 0;
}

int64_t ShardPlan::local_keys(int64_t pos, int64_t block) const {
  if (holds_every_page()) return pos + 1;
  // Full local pages before pos's page, plus the part of pos's page if this rank owns it.
  const int64_t page = pos / block;
  return local_pages(page) * block + (owns_page(page) ? pos % block + 1 : 0);
}

int64_t ShardPlan::max_local_keys(int64_t keys, int64_t block) const {
  if (holds_every_page()) return keys;
  const int64_t pages = (keys + block - 1) / block;
  return (pages + tp_size_ - 1) / tp_size_ * block;
}

}  // namespace mla
