#include "runtime/cuda/step_metadata.h"

#include <algorithm>

#include "kernels/cuda/mla_prefill.h"
#include "kernels/error.h"
#include "runtime/cuda/step_buffers.h"

namespace mla {
namespace {

constexpr int32_t kKernelBlockSize = 64;  // the tuned MLA kernels' page size

int64_t round_up_pow2(int64_t n, int64_t floor) {
  int64_t b = floor;
  while (b < n) b *= 2;
  return b;
}

}  // namespace

StepMetadata pack_step(const ForwardBatch& batch, BatchLayout layout, const ModelConfig& c,
                       const LatentCache& cache, bool allow_graph, StepBuffers& buffers) {
  const ShardPlan& shard = cache.shard();
  const int64_t B = cache.geometry().block_size, P = shard.tp_size();
  const bool every_page = cache.holds_every_page();
  StepMetadata m;
  m.batch = std::move(layout);
  const BatchLayout& b = m.batch;
  const auto real_T = b.num_tokens, real_S = static_cast<int64_t>(batch.seqs.size());
  // max_pages: the widest local page table; seq_pages: the most pages a sequence has over the
  // whole group (the same number on every rank).
  int64_t max_pages = 1, seq_pages = 1;
  for (const ForwardSeq& seq : batch.seqs) {
    max_pages = std::max<int64_t>(max_pages, static_cast<int64_t>(seq.table->pages.size()));
    seq_pages = std::max<int64_t>(seq_pages, (int64_t{seq.table->num_tokens} + B - 1) / B);
  }
  m.tuned = c.kv_lora_rank == 512 && c.qk_rope_head_dim == 64 && B == kKernelBlockSize;
  m.graph = allow_graph && b.pure_decode();
  m.T = m.graph ? round_up_pow2(real_T, 1) : real_T;
  m.S = m.graph ? m.T : real_S;
  m.n_logits = m.graph ? m.S : b.num_logits;
  // Graph steps bucket the table width by the group-wide page count, so every rank of a
  // group picks the same graph key and captures (or runs uncaptured) the same steps.
  m.stride = m.graph ? round_up_pow2(std::max(max_pages, seq_pages), 16) : max_pages;

  // Decompressed sequences' context row lists.
  m.ctx_offset.assign(real_S, 0);
  m.ctx_local.assign(real_S, 0);
  int64_t ctx_words = 0;
  for (int64_t i = 0; i < real_S; ++i) {
    if (b.forms[i] != AttnForm::kDecompressed) continue;
    const int64_t L = batch.seqs[i].start + batch.seqs[i].num_tokens;
    const int64_t local = shard.max_local_keys(L, B);
    m.ctx_local[i] = local;
    ctx_words += local + (every_page ? 0 : L);
    m.max_context = std::max(m.max_context, L);
    m.max_local_context = std::max(m.max_local_context, local);
  }

  const int64_t T = m.T, S = m.S;
  int64_t off = 0;
  auto section = [&](int64_t n) {
    const int64_t at = off;
    off += (n + 3) / 4 * 4;  // 16-byte aligned sections
    return at;
  };
  m.o_tokens = section(T);
  m.o_pos = section(T);
  m.o_slot_page = section(T);
  m.o_slot_off = section(T);
  m.o_num_keys = section(T);
  m.o_token_seq = section(T);
  m.o_logit_rows = section(std::max<int64_t>(m.n_logits, 1));
  m.o_table = section(S * m.stride);
  m.o_cu = section(4 * real_S);
  const int64_t o_ctx = section(ctx_words);
  m.total = off;
  buffers.reserve(T, S);
  buffers.reserve_meta(m.total);

  int32_t* w = buffers.meta_host;
  std::fill_n(w, m.total, 0);
  int64_t t = 0, logit = 0, ctx = o_ctx;
  for (int64_t i = 0; i < real_S; ++i) {
    const ForwardSeq& seq = batch.seqs[i];
    const BlockTable& table = *seq.table;
    const bool latent = b.forms[i] == AttnForm::kLatent;
    for (int32_t k = 0; k < seq.num_tokens; ++k, ++t) {
      const int32_t pos = seq.start + k;
      w[m.o_tokens + t] = batch.tokens[t];
      w[m.o_pos + t] = pos;
      const int64_t page = pos / B;
      int32_t slot = -1;
      if (shard.owns_page(page)) {
        const auto local = static_cast<size_t>(shard.local_page_index(page));
        MLA_CHECK(local < table.pages.size(), "token {} outside the table's {} pages", pos,
                  table.pages.size());
        slot = table.pages[local];
      }
      w[m.o_slot_page + t] = slot;
      w[m.o_slot_off + t] = static_cast<int32_t>(pos % B);
      w[m.o_num_keys + t] = latent ? cache.local_keys(pos) : 0;
      w[m.o_token_seq + t] = static_cast<int32_t>(i);
    }
    if (seq.want_logits) w[m.o_logit_rows + logit++] = static_cast<int32_t>(t - 1);
    std::copy(table.pages.begin(), table.pages.end(), w + m.o_table + i * m.stride);
    int32_t* cu = w + m.o_cu + 4 * i;
    const int32_t L = seq.start + seq.num_tokens;
    cu[0] = 0;
    cu[1] = seq.num_tokens;
    cu[2] = 0;
    cu[3] = L;
    if (latent) continue;
    // Context rows: the cache row (page * num_layers * B + offset) of every local key, padded;
    // then, sharded, the row of the gathered [P, local] block for each position.
    m.ctx_offset[i] = ctx;
    const int64_t layers = cache.geometry().num_layers, local = m.ctx_local[i];
    const int64_t have = cache.local_keys(L - 1);
    for (int64_t k = 0; k < have; ++k) {
      w[ctx + k] = static_cast<int32_t>(table.pages[k / B] * layers * B + k % B);
    }
    ctx += local;
    if (every_page) continue;
    for (int32_t r = 0; r < P; ++r) {
      for (int64_t k = 0; k < local; ++k) {
        const int64_t pos = shard.position_of_local_key(r, k, B);
        if (pos < L) w[ctx + pos] = static_cast<int32_t>(r * local + k);
      }
    }
    ctx += L;
  }
  for (int64_t pad = real_S; pad < m.n_logits; ++pad) {
    w[m.o_logit_rows + pad] = static_cast<int32_t>(pad);
  }
  for (int64_t pad = real_T; pad < T; ++pad) w[m.o_slot_page + pad] = -1;
  if (m.tuned && !b.pure_decode() && b.any_latent) {
    const auto heads = static_cast<int32_t>(every_page ? shard.local_heads() : c.num_heads);
    buffers.reserve_prefill_workspace(
        cuda::mla_prefill_workspace_size(static_cast<int32_t>(T), heads));
  }
  if (m.max_context > 0) buffers.reserve_context(m.max_context, m.max_local_context);
  return m;
}

}  // namespace mla
