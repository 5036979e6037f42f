// One process standing in for rank 0 of a larger tensor-parallel group (EmulatedCommunicator,
// `mlaserve profile --emulate`), and the link model that prices its collectives.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "launch/bench/link_model.h"
#include "parallel/emulated_communicator.h"
#include "runtime/deepseek_model.h"
#include "runtime/forward_batch.h"
#include "runtime/latent_cache.h"
#include "tests/support/golden.h"
#include "tests/support/golden_run.h"

namespace mla {
namespace {

void expect_error(ErrorCode code, const std::function<void()>& fn, const std::string& says) {
  std::string message;
  EXPECT_EQ(test::code_of(fn, &message), code);
  EXPECT_NE(message.find(says), std::string::npos) << message;
}

TEST(EmulatedCommunicator, FillsEveryBlockWithThisRanksDataAndCountsTheRealBytes) {
  EmulatedCommunicator comm(4);
  EXPECT_EQ(comm.rank(), 0);
  EXPECT_EQ(comm.size(), 4);

  std::vector<float> data = {1, 2, 3};
  comm.all_reduce_sum(data.data(), 3);
  EXPECT_EQ(data, (std::vector<float>{1, 2, 3}));

  std::vector<float> gathered(8, -1);
  const std::vector<float> mine = {5, 6};
  comm.all_gather(mine.data(), 2, gathered.data());
  EXPECT_EQ(gathered, (std::vector<float>{5, 6, 5, 6, 5, 6, 5, 6}));
  // In place: the send buffer is block 0 of recv.
  std::vector<float> in_place = {7, 8, 0, 0, 0, 0, 0, 0};
  comm.all_gather(in_place.data(), 2, in_place.data());
  EXPECT_EQ(in_place, (std::vector<float>{7, 8, 7, 8, 7, 8, 7, 8}));

  // Block r of send goes to rank r; every peer sends rank 0 what rank 0 sends itself.
  const std::vector<float> send = {1, 2, 3, 4};
  std::vector<float> recv(4, -1);
  comm.all_to_all(send.data(), 1, recv.data());
  EXPECT_EQ(recv, (std::vector<float>{1, 1, 1, 1}));

  comm.broadcast(data.data(), 12, 0);
  const CommStats& s = comm.stats();
  EXPECT_EQ(s.bytes[static_cast<int>(CommOp::kAllReduce)], 12);
  EXPECT_EQ(s.bytes[static_cast<int>(CommOp::kAllGather)], 2 * 4 * 4 * 2);
  EXPECT_EQ(s.calls[static_cast<int>(CommOp::kAllGather)], 2);
  EXPECT_EQ(s.bytes[static_cast<int>(CommOp::kAllToAll)], 4 * 4);
  EXPECT_EQ(s.bytes[static_cast<int>(CommOp::kBroadcast)], 12);

  comm.all_reduce_sum(data.data(), 0);  // zero-sized: not counted
  EXPECT_EQ(comm.stats().calls[static_cast<int>(CommOp::kAllReduce)], 1);
}

TEST(EmulatedCommunicator, RefusesWhatNeedsAnAbsentRank) {
  EmulatedCommunicator comm(2);
  float x = 0;
  expect_error(
      ErrorCode::kFailedPrecondition, [&] { comm.recv(&x, 4, 1); }, "rank 1");
  expect_error(
      ErrorCode::kFailedPrecondition, [&] { comm.send(&x, 4, 1); }, "rank 1");
  expect_error(
      ErrorCode::kFailedPrecondition, [&] { comm.broadcast(&x, 4, 1); }, "rank 1");
  expect_error(
      ErrorCode::kInvalidArgument, [] { EmulatedCommunicator(0); }, "one rank");
}

// With StreamOps, between begin_stream_ordered and end_stream_ordered the copies go to the
// stream's copy_async (here recorded, then done at drain, as a stream would run them later), and
// end_stream_ordered drains the stream once; outside it they are blocking again. Without
// StreamOps the communicator cannot be ordered.
TEST(EmulatedCommunicator, StreamOrderedCopiesAreEnqueuedAndDrained) {
  struct Pending {
    void* dst;
    const void* src;
    int64_t bytes;
  };
  std::vector<Pending> queue;
  int drains = 0;
  int stream_tag = 0;
  EmulatedCommunicator::StreamOps ops{
      .copy_async =
          [&](void* dst, const void* src, int64_t bytes, void* stream) {
            EXPECT_EQ(stream, &stream_tag);
            queue.push_back({dst, src, bytes});
          },
      .drain =
          [&](void* stream) {
            EXPECT_EQ(stream, &stream_tag);
            for (const Pending& p : queue) std::memcpy(p.dst, p.src, p.bytes);
            queue.clear();
            ++drains;
          }};
  EmulatedCommunicator comm(3, nullptr, ops);
  ASSERT_TRUE(comm.begin_stream_ordered(&stream_tag));
  const std::vector<float> mine = {4, 5};
  std::vector<float> gathered(6, -1);
  comm.all_gather(mine.data(), 2, gathered.data());
  EXPECT_EQ(queue.size(), 3u);
  EXPECT_EQ(gathered, (std::vector<float>(6, -1))) << "nothing copied before the stream runs";
  comm.end_stream_ordered();
  EXPECT_EQ(drains, 1);
  EXPECT_EQ(gathered, (std::vector<float>{4, 5, 4, 5, 4, 5}));
  std::vector<float> again(6, -1);
  comm.all_gather(mine.data(), 2, again.data());  // blocking again
  EXPECT_TRUE(queue.empty());
  EXPECT_EQ(again, gathered);
  EXPECT_EQ(comm.stats().calls[static_cast<int>(CommOp::kAllGather)], 2);

  EmulatedCommunicator host(3);
  EXPECT_FALSE(host.begin_stream_ordered(&stream_tag));
  expect_error(
      ErrorCode::kInvalidArgument,
      [] { EmulatedCommunicator(2, nullptr, {.copy_async = {}, .drain = [](void*) {}}); }, "both");
}

// Rank 0's share of a TP2 group, run alone, makes the collectives of the real group's step (the
// mpi suite's TpCommAccounting checks the same prediction against two real ranks), in both
// cache layouts, and its forward passes run to the end.
TEST(EmulatedGroup, RankZeroAloneMakesTheRealGroupsCollectives) {
  const test::Golden& gold = test::golden("v3");
  for (KvShard kv : {KvShard::kSequence, KvShard::kReplicate}) {
    ModelOptions options;
    options.absorb = AbsorbMode::kFactored;
    options.show_progress = false;
    options.tp_size = 2;
    options.tp_rank = 0;
    options.kv_shard = kv;
    auto m = DeepseekModel::load(test::model_dir("v3"), options);
    EmulatedCommunicator comm(2);
    LatentCache cache(m->cache_geometry(4), 64, m->shard());
    std::vector<BlockTable> tables;
    const auto [prefill, decode] = test::prefill_then_decode(gold, cache, tables);
    const auto runner = m->make_runner(cache, &comm);
    runner->forward(prefill);
    WorkCounter work;
    runner->forward(decode, &work);
    const CommStats want =
        predicted_step_comm(m->config(), 2, kv, static_cast<int64_t>(decode.tokens.size()));
    for (int op = 0; op < kNumCommOps; ++op) {
      EXPECT_EQ(work.comm.bytes[op], want.bytes[op]) << to_string(static_cast<CommOp>(op));
      EXPECT_EQ(work.comm.calls[op], want.calls[op]) << to_string(static_cast<CommOp>(op));
    }
    EXPECT_GT(want.total_bytes(), 0);
  }
}

TEST(LinkModel, PricesEachCollectiveByItsBusBytes) {
  bench::LinkModel link{100, 10};  // 100 GB/s, 10 us a call
  CommStats s;
  s.add(CommOp::kAllReduce, 1'000'000'000);  // ring: 2 (P-1)/P of it on the bus
  EXPECT_NEAR(link.ms(s, 4), 0.010 + 1.5e9 / 100e9 * 1e3, 1e-9);
  CommStats g;
  g.add(CommOp::kAllGather, 800'000'000);  // (P-1)/P of the gathered bytes
  g.add(CommOp::kAllToAll, 800'000'000);
  EXPECT_NEAR(link.ms(g, 8), 0.020 + 2 * 0.7e9 / 100e9 * 1e3, 1e-9);
  EXPECT_EQ(link.ms(s, 1), 0);
  expect_error(
      ErrorCode::kInvalidArgument,
      [] {
        bench::LinkModel{0, 1}.validate();
      },
      "--link-busbw-gbps");
  expect_error(
      ErrorCode::kInvalidArgument,
      [] {
        bench::LinkModel{1, -1}.validate();
      },
      "--link-latency-us");
}

}  // namespace
}  // namespace mla
