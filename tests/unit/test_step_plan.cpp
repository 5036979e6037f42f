// StepPlan: encode() and decode() are inverses, and decode() refuses malformed words with
// kInternal naming what is wrong.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "runtime/step_plan.h"

namespace mla {
namespace {

using Words = std::vector<int64_t>;
using testing::HasSubstr;

void expect_same(const StepPlan& a, const StepPlan& b) {
  EXPECT_EQ(a.kind, b.kind);
  EXPECT_EQ(a.released, b.released);
  ASSERT_EQ(a.prefix_ops.size(), b.prefix_ops.size());
  for (size_t i = 0; i < a.prefix_ops.size(); ++i) {
    EXPECT_EQ(a.prefix_ops[i].kind, b.prefix_ops[i].kind) << "prefix op " << i;
    EXPECT_EQ(a.prefix_ops[i].owner, b.prefix_ops[i].owner) << "prefix op " << i;
    EXPECT_EQ(a.prefix_ops[i].page, b.prefix_ops[i].page) << "prefix op " << i;
    EXPECT_EQ(a.prefix_ops[i].key, b.prefix_ops[i].key) << "prefix op " << i;
  }
  ASSERT_EQ(a.chunks.size(), b.chunks.size());
  for (size_t i = 0; i < a.chunks.size(); ++i) {
    EXPECT_EQ(a.chunks[i].id, b.chunks[i].id) << "chunk " << i;
    EXPECT_EQ(a.chunks[i].start, b.chunks[i].start) << "chunk " << i;
    EXPECT_EQ(a.chunks[i].num_tokens, b.chunks[i].num_tokens) << "chunk " << i;
    EXPECT_EQ(a.chunks[i].want_logits, b.chunks[i].want_logits) << "chunk " << i;
  }
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.op.import, b.op.import);
  EXPECT_EQ(a.op.id, b.op.id);
  EXPECT_EQ(a.op.first, b.op.first);
  EXPECT_EQ(a.op.count, b.op.count);
}

StepPlan two_chunk_plan() {
  return {.kind = StepPlan::Kind::kStep,
          .released = {7, 9},
          .chunks = {{.id = 3, .start = 0, .num_tokens = 3, .want_logits = false},
                     {.id = 4, .start = 12, .num_tokens = 1, .want_logits = true}},
          .tokens = {10, 11, 12, 500}};
}

// decode()'s error message for `words`, or "no error".
std::string decode_error(const Words& words) {
  try {
    StepPlan::decode(words);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInternal) << e.what();
    return e.what();
  }
  return "no error";
}

TEST(StepPlan, EncodesTheDocumentedWords) {
  EXPECT_EQ(two_chunk_plan().encode(),
            (Words{1, 2, 7, 9, 0, 2, 3, 0, 3, 0, 4, 12, 1, 1, 10, 11, 12, 500}));
  EXPECT_EQ((StepPlan{.kind = StepPlan::Kind::kStep,
                      .prefix_ops = {{PrefixOp::Kind::kKeep, 3, 1, 0x8000000000000001u}}})
                .encode(),
            (Words{1, 0, 1, 2, 3, 1, INT64_MIN + 1, 0}));
  EXPECT_EQ(StepPlan{.kind = StepPlan::Kind::kShutdown}.encode(), Words{2});
  EXPECT_EQ(StepPlan{.kind = StepPlan::Kind::kHeartbeat}.encode(), Words{3});
  EXPECT_EQ((StepPlan{.kind = StepPlan::Kind::kCopyLatents,
                      .op = {.import = 0, .id = 5, .first = 64, .count = 10}})
                .encode(),
            (Words{4, 0, 5, 64, 10}));
}

TEST(StepPlan, RoundTrips) {
  const std::vector<StepPlan> plans = {
      two_chunk_plan(),
      {.kind = StepPlan::Kind::kStep},                   // nothing released, no chunk
      {.kind = StepPlan::Kind::kStep, .released = {1}},  // releases only
      {.kind = StepPlan::Kind::kStep,
       .released = {4},
       .prefix_ops = {{PrefixOp::Kind::kReuse, 5, 0, 17},
                      {PrefixOp::Kind::kKeep, 5, 2, UINT64_MAX},
                      {PrefixOp::Kind::kEvict, 0, 0, 1},
                      {PrefixOp::Kind::kDrop, 4, 0, 0}},
       .chunks = {{.id = 5, .start = 64, .num_tokens = 1}},
       .tokens = {9}},
      {.kind = StepPlan::Kind::kShutdown},
      {.kind = StepPlan::Kind::kHeartbeat},
      {.kind = StepPlan::Kind::kStep,
       .chunks = {{.id = UINT64_MAX, .start = INT32_MAX - 1, .num_tokens = 1}},
       .tokens = {INT32_MAX}},
      {.kind = StepPlan::Kind::kCopyLatents, .op = {.id = 3, .first = 0, .count = 130}},
      {.kind = StepPlan::Kind::kWriteImport, .op = {.import = 2, .first = 128, .count = 7}},
      {.kind = StepPlan::Kind::kFinishImport, .op = {.import = 2, .id = UINT64_MAX}},
      {.kind = StepPlan::Kind::kAbortImport, .op = {.import = INT64_MAX}},
  };
  for (const StepPlan& plan : plans) expect_same(StepPlan::decode(plan.encode()), plan);
}

TEST(StepPlan, MalformedWordsAreInternalErrorsNamingTheProblem) {
  EXPECT_THAT(decode_error({}), HasSubstr("before its kind"));
  EXPECT_THAT(decode_error({0}), HasSubstr("unknown kind 0"));
  EXPECT_THAT(decode_error({8}), HasSubstr("unknown kind 8"));
  EXPECT_THAT(decode_error({4, 0, 1, 0}), HasSubstr("before its token count"));
  EXPECT_THAT(decode_error({5, 1, 0, -1, 3}), HasSubstr("first token -1"));
  EXPECT_THAT(decode_error({5, 1, 0, INT32_MAX, 1}), HasSubstr("token count 1"));
  EXPECT_THAT(decode_error({7, 1, 0, 0, 0, 9}), HasSubstr("a cache op has 6 words"));
  EXPECT_THAT(decode_error({2, 0}), HasSubstr("a shutdown plan has 2 words"));
  EXPECT_THAT(decode_error({3, 1, 1}), HasSubstr("a heartbeat plan has 3 words"));
  EXPECT_THAT(decode_error({1}), HasSubstr("before its released count"));
  EXPECT_THAT(decode_error({1, 0}), HasSubstr("before its prefix op count"));
  EXPECT_THAT(decode_error({1, 0, 0}), HasSubstr("before its chunk count"));
  EXPECT_THAT(decode_error({1, -1, 0}), HasSubstr("released count -1"));
  EXPECT_THAT(decode_error({1, 3, 7, 0}), HasSubstr("released count 3"));
  EXPECT_THAT(decode_error({1, 1, 7}), HasSubstr("before its prefix op count"));
  EXPECT_THAT(decode_error({1, 0, 2, 1, 1, 0, 7, 0}), HasSubstr("prefix op count 2"));
  EXPECT_THAT(decode_error({1, 0, 1, 5, 1, 0, 7, 0}), HasSubstr("prefix op kind 5"));
  EXPECT_THAT(decode_error({1, 0, 1, 1, 1, -1, 7, 0}), HasSubstr("prefix op page -1"));
  EXPECT_THAT(decode_error({1, 0, 0, -2}), HasSubstr("chunk count -2"));
  EXPECT_THAT(decode_error({1, 0, 0, 2, 3, 0, 1, 0, 5}), HasSubstr("chunk count 2"));
  EXPECT_THAT(decode_error({1, 0, 0, 1, 3, -1, 1, 0, 5}), HasSubstr("chunk start -1"));
  EXPECT_THAT(decode_error({1, 0, 0, 1, 3, int64_t{1} << 31, 1, 0, 5}), HasSubstr("chunk start"));
  EXPECT_THAT(decode_error({1, 0, 0, 1, 3, 0, 0, 0}), HasSubstr("chunk num_tokens 0"));
  EXPECT_THAT(decode_error({1, 0, 0, 1, 3, (int64_t{1} << 31) - 1, 1, 0, 5}),
              HasSubstr("past the int32 range"));
  EXPECT_THAT(decode_error({1, 0, 0, 1, 3, 0, 1, 2, 5}), HasSubstr("chunk want_logits 2"));
  EXPECT_THAT(decode_error({1, 0, 0, 1, 3, 0, 2, 0, 5}),
              HasSubstr("its chunks have 2 tokens but 1 words follow"));
  EXPECT_THAT(decode_error({1, 0, 0, 1, 3, 0, 1, 0, 5, 6}),
              HasSubstr("its chunks have 1 tokens but 2 words follow"));
  EXPECT_THAT(decode_error({1, 0, 0, 1, 3, 0, 1, 0, -5}), HasSubstr("token -5"));

  // Every truncation of a valid plan is refused.
  const Words words = two_chunk_plan().encode();
  for (size_t n = 0; n < words.size(); ++n) {
    EXPECT_THAT(decode_error(Words(words.begin(), words.begin() + n)),
                HasSubstr("malformed step plan"))
        << n << " words";
  }
}

}  // namespace
}  // namespace mla
