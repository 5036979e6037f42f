// StepMetadata: the host side of one CUDA step: its padded sizes, the layout of the batch and
// where each section of the packed int32 metadata the kernels read sits. pack_step() fills the
// runner's pinned staging buffer; the runner copies it to the device in one transfer.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/forward_batch.h"
#include "runtime/latent_cache.h"
#include "runtime/model_config.h"

namespace mla {

struct StepBuffers;

struct StepMetadata {
  BatchLayout batch;
  int64_t T = 0;         // tokens run (padded to the graph bucket in graph steps)
  int64_t S = 0;         // sequences (padded likewise)
  int64_t n_logits = 0;  // rows of logits (padded to S in graph steps)
  int64_t stride = 0;    // block-table row width
  bool graph = false;    // a pure decode step padded to its bucket, to capture or replay
  bool tuned = false;    // d_c 512, d_r 64, pages of 64: the tuned MLA kernels apply
  // Offsets (in int32 words) of the sections; each is 16-byte aligned.
  int64_t o_tokens = 0;      // [T] token ids
  int64_t o_pos = 0;         // [T] positions
  int64_t o_slot_page = 0;   // [T] cache page the token's latent goes to, -1 if another rank's
  int64_t o_slot_off = 0;    // [T] row within that page
  int64_t o_num_keys = 0;    // [T] keys this rank holds for the token (latent form; else 0)
  int64_t o_token_seq = 0;   // [T] sequence index of the token
  int64_t o_logit_rows = 0;  // [n_logits] token rows whose logits are wanted
  int64_t o_table = 0;       // [S, stride] local block tables
  int64_t o_cu = 0;          // [real S, 4] per sequence: query and key ranges (decompressed)
  int64_t total = 0;
  // Decompressed-form sequences: where their context row lists start (this rank's rows, then
  // under a sharded cache the reorder of the gathered rows), and how many local rows (padded to
  // the largest rank's share when sharded).
  std::vector<int64_t> ctx_offset, ctx_local;
  int64_t max_context = 0, max_local_context = 0;
};

// Lays out `batch` (checked and given forms by BatchLayout::of) and packs its metadata into
// buffers.meta_host, growing the buffers it needs (see StepBuffers::generation). `allow_graph`
// pads a pure decode step to its graph bucket.
StepMetadata pack_step(const ForwardBatch& batch, BatchLayout layout, const ModelConfig& config,
                       const LatentCache& cache, bool allow_graph, StepBuffers& buffers);

}  // namespace mla
