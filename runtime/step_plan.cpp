#include "runtime/step_plan.h"

#include <bit>
#include <limits>

#include "kernels/error.h"

namespace mla {
namespace {

// Reads a plan's words in order; every read names what it reads, so a malformed plan
// says where it broke.
class WordReader {
 public:
  explicit WordReader(const std::vector<int64_t>& words) : words_(words) {}

  int64_t next(const char* what) {
    if (pos_ >= words_.size()) {
      MLA_THROW(kInternal, "malformed step plan: its {} words end before its {}", words_.size(),
                what);
    }
    return words_[pos_++];
  }
  // A word that must lie in [lo, hi].
  int64_t next_in(const char* what, int64_t lo, int64_t hi) {
    return check(what, next(what), lo, hi);
  }
  // A count of items of `words_per_item` words each, at most what the words left can hold,
  // so a corrupt count cannot make the reader allocate.
  int64_t next_count(const char* what, size_t words_per_item) {
    const int64_t count = next(what);
    return check(what, count, 0, static_cast<int64_t>(left() / words_per_item));
  }
  size_t left() const { return words_.size() - pos_; }

 private:
  // `value`, the word just read, unless it lies outside [lo, hi].
  int64_t check(const char* what, int64_t value, int64_t lo, int64_t hi) const {
    if (value < lo || value > hi) {
      MLA_THROW(kInternal, "malformed step plan: {} {} at word {} is outside [{}, {}]", what, value,
                pos_ - 1, lo, hi);
    }
    return value;
  }

  const std::vector<int64_t>& words_;
  size_t pos_ = 0;
};

constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

}  // namespace

std::vector<int64_t> StepPlan::encode() const {
  std::vector<int64_t> words = {static_cast<int64_t>(kind)};
  if (is_cache_op()) {
    words.insert(words.end(), {op.import, static_cast<int64_t>(op.id), op.first, op.count});
    return words;
  }
  if (kind != Kind::kStep) return words;
  words.reserve(4 + released.size() + 4 * prefix_ops.size() + 4 * chunks.size() + tokens.size());
  words.push_back(static_cast<int64_t>(released.size()));
  for (RequestId id : released) words.push_back(static_cast<int64_t>(id));
  words.push_back(static_cast<int64_t>(prefix_ops.size()));
  for (const PrefixOp& op : prefix_ops) {
    words.insert(words.end(), {static_cast<int64_t>(op.kind), op.owner, op.page,
                               std::bit_cast<int64_t>(op.key)});
  }
  words.push_back(static_cast<int64_t>(chunks.size()));
  for (const Chunk& c : chunks) {
    words.insert(words.end(), {static_cast<int64_t>(c.id), c.start, c.num_tokens,
                               c.want_logits ? int64_t{1} : int64_t{0}});
  }
  words.insert(words.end(), tokens.begin(), tokens.end());
  return words;
}

StepPlan StepPlan::decode(const std::vector<int64_t>& words) {
  WordReader in(words);
  StepPlan plan;
  const int64_t kind = in.next("kind");
  switch (kind) {
    case static_cast<int64_t>(Kind::kShutdown):
    case static_cast<int64_t>(Kind::kHeartbeat):
      plan.kind = static_cast<Kind>(kind);
      if (in.left() > 0) {
        MLA_THROW(kInternal, "malformed step plan: a {} plan has {} words, not 1",
                  plan.kind == Kind::kShutdown ? "shutdown" : "heartbeat", words.size());
      }
      return plan;
    case static_cast<int64_t>(Kind::kStep):
      break;
    case static_cast<int64_t>(Kind::kCopyLatents):
    case static_cast<int64_t>(Kind::kWriteImport):
    case static_cast<int64_t>(Kind::kFinishImport):
    case static_cast<int64_t>(Kind::kAbortImport):
      plan.kind = static_cast<Kind>(kind);
      plan.op.import = in.next("import");
      plan.op.id = static_cast<RequestId>(in.next("request id"));
      plan.op.first = static_cast<int32_t>(in.next_in("first token", 0, kMaxInt32));
      plan.op.count = static_cast<int32_t>(in.next_in("token count", 0, kMaxInt32 - plan.op.first));
      if (in.left() > 0) {
        MLA_THROW(kInternal, "malformed step plan: a cache op has {} words, not 5", words.size());
      }
      return plan;
    default:
      MLA_THROW(kInternal, "malformed step plan: unknown kind {}", kind);
  }
  plan.released.resize(in.next_count("released count", 1));
  for (RequestId& id : plan.released) id = static_cast<RequestId>(in.next("released id"));
  plan.prefix_ops.resize(in.next_count("prefix op count", 4));
  for (PrefixOp& op : plan.prefix_ops) {
    op.kind = static_cast<PrefixOp::Kind>(in.next_in("prefix op kind", 1, 4));
    op.owner = in.next("prefix op owner");
    op.page = static_cast<int32_t>(in.next_in("prefix op page", 0, kMaxInt32));
    op.key = std::bit_cast<uint64_t>(in.next("prefix op key"));
  }
  plan.chunks.resize(in.next_count("chunk count", 4));
  int64_t num_tokens = 0;
  for (Chunk& c : plan.chunks) {
    c.id = static_cast<RequestId>(in.next("chunk id"));
    c.start = static_cast<int32_t>(in.next_in("chunk start", 0, kMaxInt32));
    c.num_tokens = static_cast<int32_t>(in.next_in("chunk num_tokens", 1, kMaxInt32));
    if (int64_t{c.start} + c.num_tokens > kMaxInt32) {
      MLA_THROW(kInternal, "malformed step plan: a chunk ends at {}, past the int32 range",
                int64_t{c.start} + c.num_tokens);
    }
    c.want_logits = in.next_in("chunk want_logits", 0, 1) != 0;
    num_tokens += c.num_tokens;
  }
  if (static_cast<int64_t>(in.left()) != num_tokens) {
    MLA_THROW(kInternal, "malformed step plan: its chunks have {} tokens but {} words follow",
              num_tokens, in.left());
  }
  plan.tokens.reserve(num_tokens);
  while (in.left() > 0)
    plan.tokens.push_back(static_cast<int32_t>(in.next_in("token", 0, kMaxInt32)));
  return plan;
}

}  // namespace mla
