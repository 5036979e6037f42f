// StepPlan: what a tensor-parallel leader tells its followers before each step
// (docs/ARCHITECTURE.md section 6): which sequences released their cache pages, which chunks
// run and their tokens. It travels as int64 words over the group's control communicator:
//
//   [kind]                                                    heartbeat, shutdown
//   [kind, n_released, released ids..., n_prefix_ops, (kind, owner, page, key) per op,
//    n_chunks, (id, start, num_tokens, want_logits) per chunk, tokens of every chunk...]  step
//   [kind, import, id, first, count]                          a live migration's cache op
//
// Cache ops move a migrating request's latents in or out of a group whose ranks each hold
// their own pages: after kCopyLatents every follower sends the leader the rows it stores of
// request `id`'s tokens [first, first + count); after kWriteImport the leader broadcasts the
// latents of tokens [first, first + count) and every rank writes its pages of import `import`;
// kFinishImport makes that import's pages request `id`'s; kAbortImport frees them.
//
// A step's prefix ops (with prefix caching: what the leader's index did since the last plan,
// in order) are made before its released sequences are freed, and both before its chunks.
//
// A value type; not thread-safe to mutate.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/latent_cache.h"
#include "runtime/sequence.h"

namespace mla {

struct StepPlan {
  // Heartbeat: the leader is alive but has no step. Shutdown: followers stop following.
  enum class Kind : int64_t {
    kStep = 1,
    kShutdown = 2,
    kHeartbeat = 3,
    kCopyLatents = 4,
    kWriteImport = 5,
    kFinishImport = 6,
    kAbortImport = 7,
  };

  // The operands of a cache op (the kinds from kCopyLatents on).
  struct CacheOp {
    int64_t import = 0;  // the import's handle (kWriteImport, kFinishImport, kAbortImport)
    RequestId id = 0;    // the request (kCopyLatents, kFinishImport)
    int32_t first = 0;   // tokens [first, first + count) (kCopyLatents, kWriteImport)
    int32_t count = 0;
  };

  struct Chunk {
    RequestId id = 0;
    int32_t start = 0;       // position of the chunk's first token
    int32_t num_tokens = 0;  // >= 1
    bool want_logits = false;
  };

  Kind kind = Kind::kStep;
  std::vector<RequestId> released;   // sequences whose pages were freed since the last plan
  std::vector<PrefixOp> prefix_ops;  // the leader's prefix index changes since the last plan
  std::vector<Chunk> chunks;
  std::vector<int32_t> tokens;  // every chunk's tokens, concatenated in chunk order
  CacheOp op;                   // cache ops only

  bool is_cache_op() const { return kind >= Kind::kCopyLatents; }
  // The words above; a heartbeat or shutdown plan is its kind alone.
  std::vector<int64_t> encode() const;
  // The inverse of encode(). Throws kInternal naming what is malformed: no words, an unknown
  // kind, a count or value out of range, too few or too many words.
  static StepPlan decode(const std::vector<int64_t>& words);
};

}  // namespace mla
