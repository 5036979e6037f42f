// ShardPlan: which attention heads and which latent-cache pages one tensor-parallel rank
// owns (docs/ARCHITECTURE.md section 6). A tiny value type; every getter is derived, and it is
// the one place the sequence-shard geometry is written down.
//
// Heads are split in contiguous blocks of H / P; page j of a sequence (tokens
// [j * B, (j + 1) * B)) lives on rank j mod P when the cache is sequence-sharded, and on
// every rank when it is replicated. A rank's keys, taken in position order, fill its pages in
// order: its k-th key is row k % B of its (k / B)-th page, which is sequence page
// r + (k / B) * P.
#pragma once

#include <cstdint>

namespace mla {

enum class KvShard { kSequence, kReplicate };

class ShardPlan {
 public:
  // Throws kInvalidArgument unless 0 <= rank < size and size divides num_heads.
  ShardPlan(int32_t tp_size, int32_t tp_rank, int64_t num_heads,
            KvShard kv_shard = KvShard::kSequence);

  // The plan of another rank of the same group.
  ShardPlan for_rank(int32_t rank) const {
    return ShardPlan(tp_size_, rank, num_heads_, kv_shard_);
  }

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
  // Whether every rank stores every page (a replicated cache, or a group of one).
  bool holds_every_page() const { return kv_shard_ == KvShard::kReplicate || tp_size_ == 1; }
  // Pages of a sequence of `num_pages` pages that this rank stores.
  int64_t local_pages(int64_t num_pages) const;
  // Where sequence page `page` sits in this rank's block table (the rank must own it).
  int64_t local_page_index(int64_t page) const {
    return holds_every_page() ? page : page / tp_size_;
  }
  // How many of a sequence's keys at positions <= pos this rank stores, with pages of `block`
  // tokens.
  int64_t local_keys(int64_t pos, int64_t block) const;
  // The sequence position of rank `rank`'s k-th key (pages of `block` tokens).
  int64_t position_of_local_key(int32_t rank, int64_t k, int64_t block) const {
    if (holds_every_page()) return k;
    return (rank + (k / block) * tp_size_) * block + k % block;
  }
  // The most keys any rank of the group stores of a sequence of `keys` keys (what a gather of
  // every rank's keys pads each share to).
  int64_t max_local_keys(int64_t keys, int64_t block) const;

 private:
  int32_t tp_size_;
  int32_t tp_rank_;
  int64_t num_heads_;
  KvShard kv_shard_;
};

}  // namespace mla
