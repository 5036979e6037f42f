#include "runtime/latent_cache.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "kernels/cpu/fp8_latent.h"
#include "kernels/error.h"
#if MLA_HAVE_CUDA
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/gather_rows.h"
#endif

namespace mla {
namespace {

// Calls fn(token, row, count, page) for each run of tokens [first, first + num) within one page
// that this rank stores: `count` tokens from `token` on, at rows [row, row + count) of `page`
// (a page of `table`, which lists only the stored pages, in order).
template <typename Fn>
void for_each_page_run(const BlockTable& table, const ShardPlan& shard, int32_t block_size,
                       int32_t first, int32_t num, Fn fn) {
  for (int32_t at = first; at < first + num;) {
    const int32_t row = at % block_size, n = std::min(block_size - row, first + num - at);
    const int32_t page = at / block_size;
    if (shard.owns_page(page)) fn(at, row, n, table.pages[shard.local_page_index(page)]);
    at += n;
  }
}

cpu::Fp8LatentRow fp8_row(const CacheGeometry& g) {
  return {.d_c = g.kv_lora_rank, .d_r = g.rope_dim};
}

bool on_host(CacheStorage s) { return s == CacheStorage::kHostF32 || s == CacheStorage::kHostFp8; }

}  // namespace

CacheDType cache_dtype_from_string(std::string_view name, std::string_view field) {
  if (name == "auto") return CacheDType::kAuto;
  if (name == "fp8") return CacheDType::kFp8;
  MLA_THROW(kInvalidArgument, "{}: '{}' is not a cache dtype (auto, fp8)", field, name);
}

const char* to_string(CacheDType d) { return d == CacheDType::kFp8 ? "fp8" : "auto"; }

LatentCache::LatentCache(CacheGeometry geometry, int32_t num_pages, ShardPlan shard,
                         CacheStorage storage)
    : geometry_(geometry), shard_(shard), pool_(num_pages), kind_(storage) {
  MLA_REQUIRE(geometry.num_layers >= 1, "num_layers must be >= 1, got {}", geometry.num_layers);
  MLA_REQUIRE(geometry.block_size >= 1, "block_size must be >= 1, got {}", geometry.block_size);
  MLA_REQUIRE(geometry.kv_lora_rank >= 1, "kv_lora_rank must be >= 1, got {}",
              geometry.kv_lora_rank);
  MLA_REQUIRE(geometry.rope_dim >= 0, "rope_dim must be >= 0, got {}", geometry.rope_dim);
  // Rows are addressed with 32-bit indices (the gather and scatter kernels take them).
  MLA_REQUIRE(int64_t{num_pages} * geometry.num_layers * geometry.block_size <=
                  std::numeric_limits<int32_t>::max(),
              "{} pages of {} layers x {} tokens: more rows than a cache addresses (2^31)",
              num_pages, geometry.num_layers, geometry.block_size);
  Shape shape = {num_pages, geometry.num_layers, geometry.block_size, row_width()};
  if (storage == CacheStorage::kNone) return;
  if (on_host(storage)) {
    storage_ = Tensor::empty(std::move(shape), row_dtype());
    return;
  }
#if MLA_HAVE_CUDA
  device_ = cuda::current_device();
  storage_ = cuda::device_empty(std::move(shape), row_dtype());
#else
  MLA_THROW(kFailedPrecondition, "a device cache needs a build with the CUDA backend");
#endif
}

int32_t LatentCache::pages_for(int32_t num_tokens) const {
  MLA_REQUIRE(num_tokens >= 0, "num_tokens must be >= 0, got {}", num_tokens);
  const int64_t sequence_pages =
      (int64_t{num_tokens} + geometry_.block_size - 1) / geometry_.block_size;
  return static_cast<int32_t>(shard_.local_pages(sequence_pages));
}

int32_t LatentCache::local_keys(int32_t pos) const {
  return static_cast<int32_t>(shard_.local_keys(pos, geometry_.block_size));
}

bool LatentCache::reserve(BlockTable& table, int32_t num_tokens) {
  const int32_t missing = pages_for(num_tokens) - static_cast<int32_t>(table.pages.size());
  if (missing > pool_.num_free() && prefix_ != nullptr) {
    if (missing > pool_.num_free() + prefix_->evictable()) return false;
    std::vector<uint64_t> evicted;
    prefix_->evict(missing - pool_.num_free(), record_ops_ ? &evicted : nullptr);
    for (uint64_t key : evicted) prefix_ops_.push_back({PrefixOp::Kind::kEvict, 0, 0, key});
  }
  if (missing > 0 && !pool_.allocate(missing, &table.pages)) return false;
  table.num_tokens = std::max(table.num_tokens, num_tokens);
  return true;
}

void LatentCache::release(BlockTable& table) {
  if (record_ops_ && table.owner != 0 && !table.pages.empty()) {
    prefix_ops_.push_back({PrefixOp::Kind::kDrop, table.owner, 0, 0});
  }
  for (int32_t page : table.pages) pool_.release(page);
  table.pages.clear();
  table.num_tokens = 0;
  table.prefix_keys.clear();
}

void LatentCache::enable_prefix_caching(bool record_ops) {
  if (prefix_ == nullptr) prefix_ = std::make_unique<PrefixIndex>(pool_, prefix_unit_tokens());
  record_ops_ = record_ops;
}

int32_t LatentCache::prefix_unit_tokens() const {
  return geometry_.block_size * (holds_every_page() ? 1 : shard_.tp_size());
}

int32_t LatentCache::reuse_prefix(BlockTable& table, const std::vector<int32_t>& tokens,
                                  int32_t max_tokens) {
  MLA_CHECK(table.pages.empty(), "a prefix is reused by an empty table only");
  if (prefix_ == nullptr) return 0;
  const int32_t unit = prefix_unit_tokens();
  table.pages = prefix_->match(tokens, max_tokens / unit, &table.prefix_keys);
  table.num_tokens = static_cast<int32_t>(table.pages.size()) * unit;
  if (record_ops_) {
    for (size_t u = 0; u < table.pages.size(); ++u) {
      prefix_ops_.push_back(
          {PrefixOp::Kind::kReuse, table.owner, static_cast<int32_t>(u), table.prefix_keys[u]});
    }
  }
  return table.num_tokens;
}

void LatentCache::undo_reuse(BlockTable& table, size_t ops_mark) {
  MLA_CHECK(ops_mark <= prefix_ops_.size(), "prefix ops mark {} past the {} ops recorded", ops_mark,
            prefix_ops_.size());
  prefix_ops_.resize(ops_mark);
  for (int32_t page : table.pages) pool_.release(page);
  table.pages.clear();
  table.num_tokens = 0;
  table.prefix_keys.clear();
}

void LatentCache::count_prefix_lookup(const std::vector<int32_t>& tokens, int32_t max_tokens,
                                      int32_t reused) {
  if (prefix_ == nullptr) return;
  const int32_t unit = prefix_unit_tokens();
  prefix_->count_lookup(max_tokens / unit, static_cast<int32_t>(tokens.size()), reused / unit);
}

void LatentCache::keep_full_pages(BlockTable& table, const std::vector<int32_t>& tokens,
                                  int32_t computed) {
  if (prefix_ == nullptr) return;
  const int32_t unit = prefix_unit_tokens();
  for (auto u = static_cast<int32_t>(table.prefix_keys.size());
       (u + 1) * unit <= computed && u < static_cast<int32_t>(table.pages.size()); ++u) {
    const uint64_t parent = u == 0 ? 0 : table.prefix_keys.back();
    bool kept = false;
    table.prefix_keys.push_back(
        prefix_->insert(parent, tokens.data() + int64_t{u} * unit, table.pages[u], &kept));
    if (kept && record_ops_) {
      prefix_ops_.push_back({PrefixOp::Kind::kKeep, table.owner, u, table.prefix_keys.back()});
    }
  }
}

void LatentCache::apply_prefix_op(const PrefixOp& op, BlockTable* table) {
  switch (op.kind) {
    case PrefixOp::Kind::kReuse: {
      auto it = followed_units_.find(op.key);
      MLA_CHECK(it != followed_units_.end(), "the leader reuses unit {:x}, which this rank lacks",
                op.key);
      MLA_CHECK(table != nullptr && op.page == static_cast<int32_t>(table->pages.size()),
                "the leader reuses unit {:x} as page {} of a table of another length", op.key,
                op.page);
      pool_.retain(it->second);
      table->pages.push_back(it->second);
      table->num_tokens = static_cast<int32_t>(table->pages.size()) * prefix_unit_tokens();
      return;
    }
    case PrefixOp::Kind::kKeep: {
      MLA_CHECK(table != nullptr && op.page < static_cast<int32_t>(table->pages.size()),
                "the leader keeps page {} of a table this rank holds fewer pages of", op.page);
      const int32_t page = table->pages[static_cast<size_t>(op.page)];
      MLA_CHECK(followed_units_.emplace(op.key, page).second, "unit {:x} kept twice", op.key);
      pool_.retain(page);
      return;
    }
    case PrefixOp::Kind::kEvict: {
      auto it = followed_units_.find(op.key);
      MLA_CHECK(it != followed_units_.end(), "the leader evicts unit {:x}, which this rank lacks",
                op.key);
      pool_.release(it->second);
      followed_units_.erase(it);
      return;
    }
    case PrefixOp::Kind::kDrop:
      return;
  }
}

int32_t LatentCache::num_available() const {
  return pool_.num_free() + (prefix_ != nullptr ? prefix_->evictable() : 0);
}

float* LatentCache::row(const BlockTable& table, int32_t layer, int32_t pos) {
  return const_cast<float*>(std::as_const(*this).row(table, layer, pos));
}

std::pair<int32_t, int32_t> LatentCache::page_row(const BlockTable& table, int32_t pos) const {
  MLA_CHECK(pos >= 0, "negative token position {}", pos);
  const int32_t page = pos / geometry_.block_size;
  MLA_CHECK(shard_.owns_page(page), "token {} is on page {}, which rank {} does not store", pos,
            page, shard_.tp_rank());
  const auto local = static_cast<size_t>(shard_.local_page_index(page));
  MLA_CHECK(local < table.pages.size(), "token {} outside the table's {} pages", pos,
            table.pages.size());
  return {table.pages[local], pos % geometry_.block_size};
}

const float* LatentCache::row(const BlockTable& table, int32_t layer, int32_t pos) const {
  const auto [page, r] = page_row(table, pos);
  return page_block(page, layer) + int64_t{r} * geometry_.width();
}

const uint8_t* LatentCache::host_row(int32_t page, int32_t layer, int32_t row) const {
  MLA_CHECK(on_host(kind_), "the cache rows are not in host memory");
  MLA_CHECK(0 <= layer && layer < geometry_.num_layers, "layer {} out of range [0, {})", layer,
            geometry_.num_layers);
  MLA_CHECK(pool_.ref_count(page) > 0, "page {} is free", page);
  const int64_t index = (int64_t{page} * geometry_.num_layers + layer) * geometry_.block_size + row;
  return static_cast<const uint8_t*>(storage_.raw()) +
         index * row_width() * static_cast<int64_t>(dtype_size(row_dtype()));
}

void LatentCache::store_latent(const BlockTable& table, int32_t layer, int32_t pos,
                               const float* latent) {
  const auto [page, r] = page_row(table, pos);
  auto* dst = const_cast<uint8_t*>(host_row(page, layer, r));
  if (kind_ == CacheStorage::kHostFp8) {
    cpu::quantize_latent_fp8(fp8_row(geometry_), latent, 1, geometry_.width(), dst);
  } else {
    std::memcpy(dst, latent, geometry_.width() * sizeof(float));
  }
}

void LatentCache::load_latent(const BlockTable& table, int32_t layer, int32_t pos,
                              float* out) const {
  const auto [page, r] = page_row(table, pos);
  const uint8_t* src = host_row(page, layer, r);
  if (kind_ == CacheStorage::kHostFp8) {
    cpu::dequantize_latent_fp8(fp8_row(geometry_), src, 1, out, geometry_.width());
  } else {
    std::memcpy(out, src, geometry_.width() * sizeof(float));
  }
}

float* LatentCache::page_block(int32_t page, int32_t layer) {
  return const_cast<float*>(std::as_const(*this).page_block(page, layer));
}

const float* LatentCache::page_block(int32_t page, int32_t layer) const {
  MLA_CHECK(kind_ == CacheStorage::kHostF32, "the cache rows are not fp32 in host memory");
  return reinterpret_cast<const float*>(host_row(page, layer, 0));
}

void LatentCache::read_page_block(int32_t page, int32_t layer, float* out) const {
  const uint8_t* src = host_row(page, layer, 0);
  if (kind_ == CacheStorage::kHostFp8) {
    cpu::dequantize_latent_fp8(fp8_row(geometry_), src, geometry_.block_size, out,
                               geometry_.width());
  } else {
    std::memcpy(out, src, int64_t{geometry_.block_size} * geometry_.width() * sizeof(float));
  }
}

std::vector<TokenRun> stored_runs(const ShardPlan& shard, int32_t block_size, int32_t first,
                                  int32_t count) {
  std::vector<TokenRun> runs;
  for (int32_t at = first; at < first + count;) {
    const int32_t n = std::min(block_size - at % block_size, first + count - at);
    if (shard.owns_page(at / block_size)) runs.push_back({at, n});
    at += n;
  }
  return runs;
}

void copy_stored_rows(const Tensor& from, const std::vector<TokenRun>& runs, int32_t first,
                      Tensor& to) {
  const bool packing = to.dim(1) < from.dim(1);
  const Tensor& packed = packing ? to : from;
  const Tensor& whole = packing ? from : to;
  MLA_CHECK(from.ndim() == 3 && to.ndim() == 3 && from.dtype() == to.dtype() &&
                from.dim(0) == to.dim(0) && from.dim(2) == to.dim(2),
            "rows {} and {} differ in layers, width or dtype", shape_str(from.shape()),
            shape_str(to.shape()));
  int64_t stored = 0;
  for (const TokenRun& run : runs) stored += run.count;
  MLA_CHECK(packed.dim(1) == stored, "{} stored rows, the runs hold {}", packed.dim(1), stored);
  const size_t row_bytes = static_cast<size_t>(from.dim(2)) * dtype_size(from.dtype());
  auto* packed_bytes = static_cast<char*>(packed.raw());
  auto* whole_bytes = static_cast<char*>(whole.raw());
  for (int64_t layer = 0; layer < from.dim(0); ++layer) {
    int64_t at = 0;  // the run's first row in the packed layer
    for (const TokenRun& run : runs) {
      char* p = packed_bytes + (layer * stored + at) * row_bytes;
      char* w = whole_bytes + (layer * whole.dim(1) + run.first - first) * row_bytes;
      std::memcpy(packing ? p : w, packing ? w : p, run.count * row_bytes);
      at += run.count;
    }
  }
}

DType LatentCache::row_dtype() const {
  switch (kind_) {
    case CacheStorage::kDeviceBf16:
      return DType::kBF16;
    case CacheStorage::kHostFp8:
    case CacheStorage::kDeviceFp8:
      return DType::kU8;
    default:
      return DType::kF32;
  }
}

int32_t LatentCache::row_width() const {
  return is_fp8(kind_) ? static_cast<int32_t>(fp8_row(geometry_).bytes()) : geometry_.width();
}

Tensor LatentCache::export_stored(const BlockTable& table, int32_t first, int32_t count) const {
  // An empty range is empty anywhere (a preempted sequence's table holds nothing).
  MLA_REQUIRE(
      0 <= first && 0 <= count && (count == 0 || int64_t{first} + count <= table.num_tokens),
      "cannot export tokens [{}, {}) from a table of {}", first, int64_t{first} + count,
      table.num_tokens);
  MLA_CHECK(kind_ != CacheStorage::kNone, "an accounting-only cache has no rows");
  const std::vector<int32_t> rows = pool_rows(table, first, count);
  const int32_t L = geometry_.num_layers;
  const int64_t stored = static_cast<int64_t>(rows.size()) / L;
  Tensor out = Tensor::empty({L, stored, row_width()}, row_dtype());
  move_rows(rows, out, /*to_pool=*/false);
  return out;
}

Tensor LatentCache::export_range(const BlockTable& table, int32_t first, int32_t count) const {
  Tensor stored = export_stored(table, first, count);
  if (stored.dim(1) == count) return stored;
  Tensor out = Tensor::zeros({geometry_.num_layers, count, row_width()}, row_dtype());
  copy_stored_rows(stored, stored_runs(shard_, geometry_.block_size, first, count), first, out);
  return out;
}

void LatentCache::write_range(const BlockTable& table, int32_t first, const Tensor& latents) {
  MLA_REQUIRE(latents.dtype() == row_dtype() && latents.ndim() == 3 &&
                  latents.dim(0) == geometry_.num_layers && latents.dim(2) == row_width(),
              "latents {} {} do not match cache [{}, tokens, {}] {}", shape_str(latents.shape()),
              dtype_name(latents.dtype()), geometry_.num_layers, row_width(),
              dtype_name(row_dtype()));
  const int64_t count = latents.dim(1);
  MLA_REQUIRE(first >= 0 && (count == 0 || first + count <= table.num_tokens),
              "cannot write tokens [{}, {}) into a table of {}", first, first + count,
              table.num_tokens);
  MLA_CHECK(kind_ != CacheStorage::kNone, "an accounting-only cache has no rows");
  const std::vector<int32_t> rows = pool_rows(table, first, static_cast<int32_t>(count));
  const int32_t L = geometry_.num_layers;
  if (static_cast<int64_t>(rows.size()) == L * count) {
    move_rows(rows, latents, /*to_pool=*/true);
    return;
  }
  Tensor mine = Tensor::empty({L, static_cast<int64_t>(rows.size()) / L, row_width()}, row_dtype());
  copy_stored_rows(latents, stored_runs(shard_, geometry_.block_size, first, count), first, mine);
  move_rows(rows, mine, /*to_pool=*/true);
}

bool LatentCache::import_tokens(BlockTable& table, const Tensor& latents) {
  MLA_REQUIRE(table.pages.empty() && table.num_tokens == 0,
              "import needs an empty block table, got one with {} pages", table.pages.size());
  MLA_REQUIRE(latents.ndim() == 3 && latents.dim(1) <= std::numeric_limits<int32_t>::max(),
              "cannot import latents {}", shape_str(latents.shape()));
  const auto num_tokens = static_cast<int32_t>(latents.dim(1));
  if (!reserve(table, num_tokens)) return false;
  try {
    write_range(table, 0, latents);
  } catch (...) {
    release(table);
    throw;
  }
  return true;
}

std::vector<int32_t> LatentCache::pool_rows(const BlockTable& table, int32_t first,
                                            int32_t count) const {
  std::vector<int32_t> rows;
  const int32_t L = geometry_.num_layers, B = geometry_.block_size;
  for (int32_t layer = 0; layer < L; ++layer) {
    for_each_page_run(table, shard_, B, first, count,
                      [&](int32_t, int32_t row, int32_t n, int32_t page) {
                        MLA_CHECK(pool_.ref_count(page) > 0, "page {} is free", page);
                        const int32_t page_row = (page * L + layer) * B + row;
                        for (int32_t i = 0; i < n; ++i) rows.push_back(page_row + i);
                      });
  }
  return rows;
}

void LatentCache::move_rows(const std::vector<int32_t>& rows, const Tensor& packed,
                            bool to_pool) const {
  const size_t row_bytes = static_cast<size_t>(row_width()) * dtype_size(row_dtype());
  auto* pool = static_cast<char*>(storage_.raw());
  auto* rows_here = static_cast<char*>(packed.raw());
  if (on_host(kind_)) {
    for (size_t i = 0; i < rows.size(); ++i) {
      char* p = pool + rows[i] * row_bytes;
      char* h = rows_here + i * row_bytes;
      std::memcpy(to_pool ? p : h, to_pool ? h : p, row_bytes);
    }
    return;
  }
#if MLA_HAVE_CUDA
  if (rows.empty()) return;
  // One gather or scatter kernel over every row, through a packed buffer on the device, all on
  // a stream of this call's own (in order: a copy from pageable memory may return before its
  // transfer ends), waited for before returning (the next step reads or reuses the rows).
  const cuda::DeviceGuard on_device(device_);  // RPC handler threads export pages too
  const auto n = static_cast<int64_t>(rows.size());
  Tensor index = cuda::device_empty({n}, DType::kI32);
  Tensor staged = cuda::device_empty({n, row_width()}, row_dtype());
  cudaStream_t stream = nullptr;
  MLA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const std::unique_ptr<CUstream_st, decltype(&cudaStreamDestroy)> owned(stream,
                                                                         &cudaStreamDestroy);
  MLA_CUDA_CHECK(cudaMemcpyAsync(index.raw(), rows.data(), n * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, stream));
  const auto bytes = static_cast<int64_t>(row_bytes);
  if (to_pool) {
    MLA_CUDA_CHECK(
        cudaMemcpyAsync(staged.raw(), packed.raw(), n * row_bytes, cudaMemcpyHostToDevice, stream));
    cuda::scatter_rows({.in = staged.raw(),
                        .index = index.data<int32_t>(),
                        .out = pool,
                        .rows = n,
                        .row_bytes = bytes,
                        .in_stride = bytes,
                        .out_stride = bytes},
                       stream);
  } else {
    cuda::gather_rows({.in = pool,
                       .index = index.data<int32_t>(),
                       .out = staged.raw(),
                       .rows = n,
                       .row_bytes = bytes,
                       .in_stride = bytes,
                       .out_stride = bytes},
                      stream);
    MLA_CUDA_CHECK(
        cudaMemcpyAsync(packed.raw(), staged.raw(), n * row_bytes, cudaMemcpyDeviceToHost, stream));
  }
  MLA_CUDA_CHECK(cudaStreamSynchronize(stream));
#endif
}

}  // namespace mla
