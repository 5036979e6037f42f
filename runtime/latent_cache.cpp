#include "runtime/latent_cache.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "kernels/error.h"
#if MLA_HAVE_CUDA
#include "kernels/cuda/device_memory.h"
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

}  // namespace

LatentCache::LatentCache(CacheGeometry geometry, int32_t num_pages, ShardPlan shard,
                         CacheStorage storage)
    : geometry_(geometry), shard_(shard), pool_(num_pages), kind_(storage) {
  MLA_REQUIRE(geometry.num_layers >= 1, "num_layers must be >= 1, got {}", geometry.num_layers);
  MLA_REQUIRE(geometry.block_size >= 1, "block_size must be >= 1, got {}", geometry.block_size);
  MLA_REQUIRE(geometry.kv_lora_rank >= 1, "kv_lora_rank must be >= 1, got {}",
              geometry.kv_lora_rank);
  MLA_REQUIRE(geometry.rope_dim >= 0, "rope_dim must be >= 0, got {}", geometry.rope_dim);
  Shape shape = {num_pages, geometry.num_layers, geometry.block_size, geometry.width()};
  if (storage == CacheStorage::kNone) return;
  if (storage == CacheStorage::kHostF32) {
    storage_ = Tensor::empty(std::move(shape));
    return;
  }
#if MLA_HAVE_CUDA
  device_ = cuda::current_device();
  storage_ = cuda::device_empty(std::move(shape), DType::kBF16);
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
  if (missing > 0 && !pool_.allocate(missing, &table.pages)) return false;
  table.num_tokens = std::max(table.num_tokens, num_tokens);
  return true;
}

void LatentCache::release(BlockTable& table) {
  for (int32_t page : table.pages) pool_.release(page);
  table.pages.clear();
  table.num_tokens = 0;
}

float* LatentCache::row(const BlockTable& table, int32_t layer, int32_t pos) {
  return const_cast<float*>(std::as_const(*this).row(table, layer, pos));
}

const float* LatentCache::row(const BlockTable& table, int32_t layer, int32_t pos) const {
  MLA_CHECK(pos >= 0, "negative token position {}", pos);
  const int32_t page = pos / geometry_.block_size;
  MLA_CHECK(shard_.owns_page(page), "token {} is on page {}, which rank {} does not store", pos,
            page, shard_.tp_rank());
  const auto local = static_cast<size_t>(shard_.local_page_index(page));
  MLA_CHECK(local < table.pages.size(), "token {} outside the table's {} pages", pos,
            table.pages.size());
  return page_block(table.pages[local], layer) +
         int64_t{pos % geometry_.block_size} * geometry_.width();
}

float* LatentCache::page_block(int32_t page, int32_t layer) {
  return const_cast<float*>(std::as_const(*this).page_block(page, layer));
}

const float* LatentCache::page_block(int32_t page, int32_t layer) const {
  MLA_CHECK(kind_ == CacheStorage::kHostF32, "the cache rows live on the GPU");
  MLA_CHECK(0 <= layer && layer < geometry_.num_layers, "layer {} out of range [0, {})", layer,
            geometry_.num_layers);
  MLA_CHECK(pool_.ref_count(page) > 0, "page {} is free", page);
  const int64_t block_numel = int64_t{geometry_.block_size} * geometry_.width();
  return storage_.f32() + (int64_t{page} * geometry_.num_layers + layer) * block_numel;
}

Tensor LatentCache::export_range(const BlockTable& table, int32_t first, int32_t count) const {
  // An empty range is empty anywhere (a preempted sequence's table holds nothing).
  MLA_REQUIRE(
      0 <= first && 0 <= count && (count == 0 || int64_t{first} + count <= table.num_tokens),
      "cannot export tokens [{}, {}) from a table of {}", first, int64_t{first} + count,
      table.num_tokens);
  const int64_t width = geometry_.width();
  Tensor out = holds_every_page() ? Tensor::empty({geometry_.num_layers, count, width})
                                  : Tensor::zeros({geometry_.num_layers, count, width});
  for_each_page_run(table, shard_, geometry_.block_size, first, count,
                    [&](int32_t at, int32_t row, int32_t n, int32_t page) {
                      read_rows(page, row, n, out.f32() + (at - first) * width, count * width);
                    });
  return out;
}

void LatentCache::write_range(const BlockTable& table, int32_t first, const Tensor& latents) {
  MLA_REQUIRE(latents.dtype() == DType::kF32 && latents.ndim() == 3 &&
                  latents.dim(0) == geometry_.num_layers && latents.dim(2) == geometry_.width(),
              "latents {} {} do not match cache [{}, tokens, {}] F32", shape_str(latents.shape()),
              dtype_name(latents.dtype()), geometry_.num_layers, geometry_.width());
  const int64_t width = geometry_.width(), count = latents.dim(1);
  MLA_REQUIRE(first >= 0 && (count == 0 || first + count <= table.num_tokens),
              "cannot write tokens [{}, {}) into a table of {}", first, first + count,
              table.num_tokens);
  for_each_page_run(table, shard_, geometry_.block_size, first, static_cast<int32_t>(count),
                    [&](int32_t at, int32_t row, int32_t n, int32_t page) {
                      write_rows(page, row, n, latents.f32() + (at - first) * width, count * width);
                    });
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

int64_t LatentCache::device_offset(int32_t page, int32_t layer) const {
  MLA_CHECK(0 <= layer && layer < geometry_.num_layers, "layer {} out of range [0, {})", layer,
            geometry_.num_layers);
  MLA_CHECK(pool_.ref_count(page) > 0, "page {} is free", page);
  return (int64_t{page} * geometry_.num_layers + layer) * geometry_.block_size * geometry_.width();
}

void LatentCache::read_rows(int32_t page, int32_t row, int32_t count, float* dst,
                            int64_t dst_layer_stride) const {
  const int64_t n = int64_t{count} * geometry_.width(), skip = int64_t{row} * geometry_.width();
  const int32_t L = geometry_.num_layers;
  MLA_CHECK(kind_ != CacheStorage::kNone, "an accounting-only cache has no rows");
  if (kind_ == CacheStorage::kHostF32) {
    for (int32_t l = 0; l < L; ++l) {
      std::memcpy(dst + l * dst_layer_stride, page_block(page, l) + skip, n * sizeof(float));
    }
    return;
  }
#if MLA_HAVE_CUDA
  // One pitched copy for every layer: the page's layers are B rows apart.
  const int64_t layer_pitch = int64_t{geometry_.block_size} * geometry_.width();
  std::vector<uint16_t> staged(L * n);
  const cuda::DeviceGuard on_device(device_);  // RPC handler threads export pages too
  cuda::copy_rows_to_host(staged.data(), n * sizeof(uint16_t),
                          storage_.data<uint16_t>() + device_offset(page, 0) + skip,
                          layer_pitch * sizeof(uint16_t), n * sizeof(uint16_t), L);
  for (int32_t l = 0; l < L; ++l) {
    const uint16_t* from = staged.data() + l * n;
    float* to = dst + l * dst_layer_stride;
    for (int64_t i = 0; i < n; ++i) to[i] = bf16_to_f32(from[i]);
  }
#endif
}

void LatentCache::write_rows(int32_t page, int32_t row, int32_t count, const float* src,
                             int64_t src_layer_stride) {
  const int64_t n = int64_t{count} * geometry_.width(), skip = int64_t{row} * geometry_.width();
  const int32_t L = geometry_.num_layers;
  MLA_CHECK(kind_ != CacheStorage::kNone, "an accounting-only cache has no rows");
  if (kind_ == CacheStorage::kHostF32) {
    for (int32_t l = 0; l < L; ++l) {
      std::memcpy(page_block(page, l) + skip, src + l * src_layer_stride, n * sizeof(float));
    }
    return;
  }
#if MLA_HAVE_CUDA
  const int64_t layer_pitch = int64_t{geometry_.block_size} * geometry_.width();
  std::vector<uint16_t> staged(L * n);
  for (int32_t l = 0; l < L; ++l) {
    const float* from = src + l * src_layer_stride;
    uint16_t* to = staged.data() + l * n;
    for (int64_t i = 0; i < n; ++i) to[i] = f32_to_bf16(from[i]);
  }
  const cuda::DeviceGuard on_device(device_);
  cuda::copy_rows_to_device(storage_.data<uint16_t>() + device_offset(page, 0) + skip,
                            layer_pitch * sizeof(uint16_t), staged.data(), n * sizeof(uint16_t),
                            n * sizeof(uint16_t), L);
#endif
}

}  // namespace mla
