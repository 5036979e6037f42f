// ShardPlan: which attention heads and which latent-cache pages one tensor-parallel rank
// owns (docs/ARCHITECTURE.md section 6). A tiny value type; every getter is derived.
//
// Heads are split in contiguous blocks of H / P; page j of a sequence (tokens
// [j * B, (j + 1) * B)) lives on rank j mod P when the cache is sequence-sharded, and on
// every rank when it is replicated.
#pragma once

#include <cstdint>

namespace mla {

enum class KvShard { kSequence, kReplicate };

class ShardPlan {
 public:
  // Throws kInvalidArgument unless 0 <= rank < size and size divides num_heads.
  ShardPlan(int32_t tp_size, int32_t tp_rank, int64_t num_heads,
            KvShard kv_shard = KvShard::kSequence);

  int32_t tp_size() const { return tp_size_; }
  int32_t tp_rank() const { return tp_rank_; }
  KvShard kv_shard() const { return kv_shard_; }
  int64_t local_heads() const { return num_heads_ / tp_size_; }
  int64_t head_begin() const { return tp_rank_ * local_heads(); }
  int64_t head_end() const { return head_begin() + local_heads(); }
  // Whether this rank stores page `page_index` (0-based, in sequence order).
  bool owns_page(int64_t page_index) const {
    return kv_shard_ == KvShard::kReplicate || page_index % tp_size_ == tp_rank_;
  }
  // Pages of a sequence of `num_pages` pages that this rank stores.
  int64_t local_pages(int64_t num_pages) const;

 private:
  int32_t tp_size_;
  int32_t tp_rank_;
  int64_t num_heads_;
  KvShard kv_shard_;
};

}  // namespace mla
