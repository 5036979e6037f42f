// LatentCache: the paged MLA latent cache (fp32 or fp8 on the host, bf16 or fp8 on the GPU).
//
// MLA caches one latent row per token and layer: the compressed kv `c` (kv_lora_rank
// floats) followed by the rotary key `k_r` (rope_dim floats). Rows live in fixed-size pages
// of block_size tokens; a sequence owns an ordered list of pages (its BlockTable), so token
// `pos` is row pos % block_size of page pages[pos / block_size]. Storage is
// [num_pages][num_layers][block_size][row], so one page's rows of one layer are contiguous:
// fp32 in host memory for the CPU model (or, with `cache.dtype: fp8`, FlashMLA's packed fp8
// rows: kernels/cpu/fp8_latent.h), bf16 or the same packed fp8 rows in device memory for the CUDA
// model (whose kernels address the pool directly; store_latent, load_latent and read_page_block are
// for host storage; row() and page_block() for host fp32 storage only).
//
// Under tensor parallelism each rank has its own LatentCache. With a sequence-sharded plan
// (docs/ARCHITECTURE.md section 6) it stores only the pages it owns (page j of a sequence on rank
// j mod P): a BlockTable then lists this rank's pages of the sequence, in order, and
// pages_for() counts only those. With a replicated plan every rank stores every page.
//
// Export/import move a sequence's latents between caches (migration, draining, failover)
// in a per-token layout, so the two caches may use different block sizes and shard layouts.
// Not thread-safe: the engine's step loop owns the cache.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kernels/tensor.h"
#include "parallel/shard_plan.h"
#include "runtime/page_pool.h"
#include "runtime/prefix_index.h"

namespace mla {

struct CacheGeometry {
  int32_t num_layers;
  int32_t block_size;                                        // tokens per page
  int32_t kv_lora_rank;                                      // d_c
  int32_t rope_dim;                                          // d_r
  int32_t width() const { return kv_lora_rank + rope_dim; }  // 576 for DeepSeek
};

// Where a cache keeps its rows, and how: host fp32, host fp8 (FlashMLA's packed row: d_c e4m3
// values, an fp32 scale per 128 of them, d_r bf16 values), device bf16, device fp8 (the same
// packed row). kNone keeps none (page accounting only: `mlaserve simulate` runs the real
// scheduler against it; reading or writing rows is a bug).
enum class CacheStorage { kHostF32, kHostFp8, kDeviceBf16, kDeviceFp8, kNone };
// The packed fp8 row, host or device.
inline bool is_fp8(CacheStorage s) {
  return s == CacheStorage::kHostFp8 || s == CacheStorage::kDeviceFp8;
}

// The deployment's choice of cache element (`cache.dtype`): kAuto is the backend's own (fp32 on
// the CPU, bf16 on the GPU); kFp8 the packed fp8 row, about 1.75x the context of bf16 in the
// same memory.
enum class CacheDType { kAuto, kFp8 };
// "auto" or "fp8"; throws kInvalidArgument naming `field` otherwise.
CacheDType cache_dtype_from_string(std::string_view name, std::string_view field);
const char* to_string(CacheDType d);

// One sequence's pages, in token order. num_tokens is how many tokens the pages were
// reserved for; the pages hold pages.size() * block_size tokens.
struct BlockTable {
  std::vector<int32_t> pages;
  int32_t num_tokens = 0;
  // With prefix caching: the PrefixIndex keys of the leading full units (pages, or groups of
  // P pages when sequence-sharded) already matched or offered (pages[0..prefix_keys.size())).
  std::vector<uint64_t> prefix_keys;
  // The sequence whose table this is (its request id; 0: none): how a tensor-parallel
  // leader's prefix ops name it to the followers.
  int64_t owner = 0;
};

// One change a tensor-parallel leader made to its prefix index and its tables' shares of it,
// which every follower makes to its own pages (LatentCache::take_prefix_ops and
// apply_prefix_op), in the order the leader made them.
struct PrefixOp {
  enum class Kind : int64_t {
    kReuse = 1,  // the owner's table takes the kept unit `key` as its page `page`
    kKeep = 2,   // the owner's page `page` is kept as unit `key`
    kEvict = 3,  // unit `key` is no longer kept
    kDrop = 4,   // the owner's table was released
  };
  Kind kind = Kind::kReuse;
  int64_t owner = 0;
  int32_t page = 0;
  uint64_t key = 0;
};

// A run of tokens [first, first + count).
struct TokenRun {
  int32_t first = 0, count = 0;
};

// The runs of tokens [first, first + count) on pages that `shard`'s rank stores (page j on
// rank j mod P when sharded), in token order: cut at page ends.
std::vector<TokenRun> stored_runs(const ShardPlan& shard, int32_t block_size, int32_t first,
                                  int32_t count);

// Between a rank's packed rows [layers, stored, width] (export_stored's) and a whole range
// [layers, count, width] of tokens [first, first + count): copies `from` into `to`, whichever
// is the packed one (the one with fewer tokens), placing or picking the runs' rows.
void copy_stored_rows(const Tensor& from, const std::vector<TokenRun>& runs, int32_t first,
                      Tensor& to);

class LatentCache {
 public:
  // Throws kInvalidArgument unless num_layers, block_size and kv_lora_rank are >= 1 and
  // rope_dim and num_pages are >= 0. Page contents start uninitialised. The default plan is
  // one rank holding everything. Device storage allocates on the current CUDA device (throws
  // kResourceExhausted if it lacks the memory, kFailedPrecondition in a build without CUDA).
  LatentCache(CacheGeometry geometry, int32_t num_pages, ShardPlan shard = ShardPlan(1, 0, 1),
              CacheStorage storage = CacheStorage::kHostF32);

  const CacheGeometry& geometry() const { return geometry_; }
  CacheStorage storage() const { return kind_; }
  // The whole pool [num_pages, num_layers, block_size, row_width()] in row_dtype().
  const Tensor& pool_storage() const { return storage_; }
  PagePool& pool() { return pool_; }
  const PagePool& pool() const { return pool_; }

  const ShardPlan& shard() const { return shard_; }
  bool holds_every_page() const { return shard_.holds_every_page(); }
  // Pages this rank stores for a sequence of num_tokens tokens: ceil(num_tokens /
  // block_size) sequence pages, of which this rank owns every P-th when sharded.
  int32_t pages_for(int32_t num_tokens) const;
  // How many of the sequence's keys at positions <= pos this rank stores. The rank's keys,
  // taken in position order, fill its pages in order, so key i of the rank is row
  // i % block_size of table.pages[i / block_size].
  int32_t local_keys(int32_t pos) const;

  // Grows `table` so it holds num_tokens tokens, allocating the missing pages, and sets
  // table.num_tokens = max(table.num_tokens, num_tokens). Returns false and leaves `table`
  // and the pool unchanged if the pool lacks free pages.
  bool reserve(BlockTable& table, int32_t num_tokens);
  // Releases every page of `table` and clears it.
  void release(BlockTable& table);

  // Prefix caching (off until enabled): full units of computed tokens stay in a PrefixIndex
  // after their sequences end, and a new sequence with the same leading tokens starts on them
  // instead of recomputing. A unit is a page (block_size tokens) when this rank holds every
  // page, and P pages (P x block_size tokens, one on each rank of a sequence-sharded group of
  // P) otherwise: unit u of a sequence is page u of every rank's table, so every rank keeps as
  // many pages as the leader and the leader's pool still bounds its followers'. reserve()
  // evicts kept units that no sequence holds, least recently used first, before it fails.
  // The leader's index decides: with record_ops, every change it makes (reuse, keep, evict,
  // and each release of an owned table) is recorded for take_prefix_ops().
  void enable_prefix_caching(bool record_ops = false);
  bool prefix_caching() const { return prefix_ != nullptr; }
  // Tokens per unit of the prefix index (block_size, or block_size x P when sharded).
  int32_t prefix_unit_tokens() const;
  // Starts the empty `table` on the kept units of the longest cached prefix of `tokens`, at
  // most max_tokens tokens (whole units); returns the tokens it covers (0 without caching).
  // The lookup is counted by count_prefix_lookup, once the sequence is admitted.
  int32_t reuse_prefix(BlockTable& table, const std::vector<int32_t>& tokens, int32_t max_tokens);
  // Undoes reuse_prefix on `table` when the sequence's admission failed right after it (no
  // other change since): gives the pages back and drops the ops recorded since `ops_mark`
  // (prefix_ops_mark() before the reuse), so a sequence that waits for room records nothing.
  void undo_reuse(BlockTable& table, size_t ops_mark);
  size_t prefix_ops_mark() const { return prefix_ops_.size(); }
  // Counts the lookup reuse_prefix(table, tokens, max_tokens) made, which covered `reused`
  // tokens, in the index's PrefixStats. No-op without caching.
  void count_prefix_lookup(const std::vector<int32_t>& tokens, int32_t max_tokens, int32_t reused);
  // Offers the table's units that `computed` tokens (of `tokens`, the sequence's) fill
  // completely and that it has not offered yet. No-op without caching.
  void keep_full_pages(BlockTable& table, const std::vector<int32_t>& tokens, int32_t computed);
  // Free pages plus kept pages no sequence holds: what reserve() can hand out.
  int32_t num_available() const;
  // Null without caching.
  const PrefixIndex* prefix_index() const { return prefix_.get(); }
  // The recorded ops since the last call, in order (a leader's, with record_ops).
  std::vector<PrefixOp> take_prefix_ops() { return std::exchange(prefix_ops_, {}); }
  bool has_prefix_ops() const { return !prefix_ops_.empty(); }
  // On a follower: makes the leader's `op` to this rank's pages. `table` is the owner's
  // table for kReuse and kKeep (ignored otherwise); kDrop is the caller's to carry out
  // (release the owner's table). Throws kInternal for an op that does not fit what this
  // rank holds (an unknown unit, a page the table lacks, a unit kept twice).
  void apply_prefix_op(const PrefixOp& op, BlockTable* table);

  // The latent row of token `pos` in layer `layer`: [width] (c, then k_r). Throws kInternal
  // if layer or pos is outside the table's pages or on a page this rank does not store, or
  // if the rows are not host fp32.
  float* row(const BlockTable& table, int32_t layer, int32_t pos);
  const float* row(const BlockTable& table, int32_t layer, int32_t pos) const;
  // Host storage of either element: stores the latent [width] (c, then k_r) of token `pos`
  // (quantised for fp8), or reads it back as fp32. Throws as row() does, or kInternal for
  // device storage.
  void store_latent(const BlockTable& table, int32_t layer, int32_t pos, const float* latent);
  void load_latent(const BlockTable& table, int32_t layer, int32_t pos, float* out) const;

  // One page's rows of one layer: [block_size, width], contiguous. Throws kInternal if the
  // page is out of range or free (a free page's rows belong to no sequence), or if the rows
  // are not host fp32.
  float* page_block(int32_t page, int32_t layer);
  const float* page_block(int32_t page, int32_t layer) const;
  // The same rows as fp32, copied (dequantised for fp8) into out [block_size, width]; host
  // storage of either element.
  void read_page_block(int32_t page, int32_t layer, float* out) const;

  // Rows in export and import tensors are the pool's own, so nothing is rounded on the way:
  // fp32 [width] for host fp32, bf16 [width] for device bf16, and for fp8 (host or device) the
  // packed row as row_width() bytes (kU8), so fp8 rows move between the backends as they are.
  DType row_dtype() const;
  // Elements of row_dtype() in one row: width(), or the fp8 row's bytes.
  int32_t row_width() const;

  // Copy of the first num_tokens tokens of every layer: [num_layers, num_tokens, row_width()] in
  // row_dtype(), on the host whatever the storage.
  // Throws kInvalidArgument if num_tokens is negative or above table.num_tokens.
  Tensor export_tokens(const BlockTable& table, int32_t num_tokens) const {
    return export_range(table, 0, num_tokens);
  }
  // The same for tokens [first, first + count): [num_layers, count, width] (live migration
  // copies a running sequence's latents in stages). On a sequence-sharded rank only the rows
  // of the pages it stores are filled; the others are zero (the group's leader gathers the
  // rest). Throws kInvalidArgument for a non-empty range outside [0, table.num_tokens).
  Tensor export_range(const BlockTable& table, int32_t first, int32_t count) const;
  // Only the rows this rank stores of tokens [first, first + count), packed in token order:
  // [num_layers, stored, width] (stored_runs() says which tokens; all of them unless sharded).
  // A device cache gathers them with one kernel and one copy to the host.
  Tensor export_stored(const BlockTable& table, int32_t first, int32_t count) const;
  // Writes latents [num_layers, count, width] in row_dtype() (as export_range returns) as
  // tokens [first, first + count) of `table`, whose pages must hold them; a sequence-sharded
  // rank writes the rows of its own pages and skips the rest. Throws kInvalidArgument for
  // latents of the wrong dtype or shape or a range the table does not hold.
  void write_range(const BlockTable& table, int32_t first, const Tensor& latents);
  // Reserves pages in `table`, which must be empty, for latents [num_layers, tokens, width]
  // (as export_tokens returns) and writes them in. Returns false, leaving `table` empty and
  // the pool unchanged, if the pool lacks free pages. Throws kInvalidArgument for a
  // non-empty table or latents of the wrong dtype or shape.
  bool import_tokens(BlockTable& table, const Tensor& latents);

 private:
  // The pool rows (page * num_layers + layer) * block_size + row of the stored tokens of
  // [first, first + count), layer by layer, in token order. Throws kInternal for a free page.
  std::vector<int32_t> pool_rows(const BlockTable& table, int32_t first, int32_t count) const;
  // Copies rows between the pool and `packed` [rows.size(), width] (host, row_dtype()): into
  // the pool when to_pool, else out of it.
  void move_rows(const std::vector<int32_t>& rows, const Tensor& packed, bool to_pool) const;

  CacheGeometry geometry_;
  ShardPlan shard_;
  PagePool pool_;
  CacheStorage kind_;
  std::unique_ptr<PrefixIndex> prefix_;  // declared after pool_: it releases into it
  bool record_ops_ = false;
  std::vector<PrefixOp> prefix_ops_;
  // A follower's kept units (apply_prefix_op): unit key -> this rank's page, held once.
  std::unordered_map<uint64_t, int32_t> followed_units_;
  int device_ = 0;  // device storage: the device the pool lives on (current at construction)
  Tensor storage_;  // [num_pages, num_layers, block_size, row_width()]
  // The address of a host row: page `page`'s row `row` of layer `layer`.
  const uint8_t* host_row(int32_t page, int32_t layer, int32_t row) const;
  // The pool page and row of token `pos` of `table`, checked as row() documents (host_row
  // checks the layer).
  std::pair<int32_t, int32_t> page_row(const BlockTable& table, int32_t pos) const;
};

}  // namespace mla
