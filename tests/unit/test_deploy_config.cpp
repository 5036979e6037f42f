#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "kernels/error.h"
#include "runtime/deploy_config.h"

namespace mla {
namespace {

using testing::HasSubstr;

TEST(DeployConfig, ShippedTinyCpuConfigParses) {
  const auto c =
      DeployConfig::load(std::string(MLA_TEST_DATA_DIR) + "/../../configs/tiny-cpu.yaml");
  EXPECT_EQ(c.model_dir, ".quickstart/tiny-v3");
  EXPECT_EQ(c.model.absorb, AbsorbMode::kAuto);
  EXPECT_EQ(c.engine.block_size, 64);
  EXPECT_EQ(c.engine.num_pages, 256);
  EXPECT_EQ(c.engine.scheduler.max_batch_tokens, 512);
  EXPECT_EQ(c.engine.scheduler.max_running, 64);
}

TEST(DeployConfig, ShippedConfigsParse) {
  const std::string dir = std::string(MLA_TEST_DATA_DIR) + "/../../configs/";
  const auto tiny = DeployConfig::load(dir + "tiny-cpu.yaml");
  EXPECT_EQ(tiny.parallel.tp, 2);
  EXPECT_EQ(tiny.coordinator.address, "127.0.0.1:50051");
  EXPECT_EQ(tiny.workers.port_base, 50100);
  EXPECT_EQ(tiny.coordinator.http.address, "127.0.0.1:8000");
  EXPECT_EQ(tiny.coordinator.http.model_name, "tiny-v3");
  const auto multi = DeployConfig::load(dir + "multi-node.yaml");
  EXPECT_EQ(multi.parallel.tp, 8);
  EXPECT_EQ(multi.coordinator.routing, RoutingPolicy::kPrefixAffinity);
  EXPECT_EQ(multi.workers.metrics_port_base, 9500);
  const auto one_gpu = DeployConfig::load(dir + "one-gpu.yaml");
  EXPECT_EQ(one_gpu.parallel.tp, 1);
  EXPECT_TRUE(one_gpu.model.cuda.small_gemm);
  const auto tp2 = DeployConfig::load(dir + "tp2-gpu.yaml");
  EXPECT_EQ(tp2.parallel.tp, 2);
  EXPECT_EQ(tp2.parallel.kv_shard, KvShard::kSequence);
}

// Unset, num_pages follows the device: 256 pages on the CPU, sized from free memory on GPUs.
TEST(DeployConfig, NumPagesDefaultFollowsTheDevice) {
  EXPECT_EQ(DeployConfig::parse("model: /m\n", "t").engine_options().num_pages, 256);
  EXPECT_EQ(DeployConfig::parse("model: /m\ndevice: cuda\n", "t").engine_options().num_pages, 0);
  EXPECT_EQ(DeployConfig::parse("model: /m\ndevice: cuda\ncache: {num_pages: 5}\n", "t")
                .engine_options()
                .num_pages,
            5);
  EXPECT_EQ(
      DeployConfig::parse("model: /m\ncache: {num_pages: 0}\n", "t").engine_options().num_pages, 0);
  try {
    DeployConfig::parse("model: /m\ncache: {num_pages: -1}\n", "t");
    FAIL() << "num_pages -1 accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("cache.num_pages must be >= 0"));
  }
}

TEST(DeployConfig, FieldsOverrideDefaults) {
  const auto c = DeployConfig::parse(
      "model: /m\nabsorb: premerged\ncache: {block_size: 4, num_pages: 9}\n"
      "scheduler: {max_batch_tokens: 32, max_running: 3}\ncuda_graphs: false\n"
      "cuda_small_gemm: false\ncuda_prefetch_weights: true\ncuda_fused_attention: true\n",
      "inline");
  EXPECT_EQ(c.model_dir, "/m");
  EXPECT_EQ(c.model.absorb, AbsorbMode::kPremerged);
  EXPECT_EQ(c.engine.block_size, 4);
  EXPECT_EQ(c.engine.num_pages, 9);
  EXPECT_EQ(c.engine.scheduler.max_batch_tokens, 32);
  EXPECT_EQ(c.engine.scheduler.max_running, 3);
  EXPECT_FALSE(c.model.cuda.graphs);
  EXPECT_FALSE(c.model.cuda.small_gemm);
  EXPECT_TRUE(DeployConfig::parse("model: /m\n", "t").model.cuda.small_gemm);
  EXPECT_TRUE(c.model.cuda.prefetch_weights);
  EXPECT_FALSE(DeployConfig::parse("model: /m\n", "t").model.cuda.prefetch_weights);
  EXPECT_TRUE(c.model.cuda.fused_attention);
  EXPECT_FALSE(DeployConfig::parse("model: /m\n", "t").model.cuda.fused_attention);
  EXPECT_EQ(DeployConfig::parse("model: /m\n", "t").model.cache_dtype, CacheDType::kAuto);
  EXPECT_EQ(DeployConfig::parse("cache: {dtype: fp8}\n", "t").model.cache_dtype, CacheDType::kFp8);
  EXPECT_EQ(DeployConfig::parse("model: /m\n", "t").model.fp8_weights, Fp8Weights::kWiden);
  EXPECT_EQ(DeployConfig::parse("fp8_weights: keep\n", "t").model.fp8_weights, Fp8Weights::kKeep);

  const RebalanceConfig off = DeployConfig::parse("model: /m\n", "t").coordinator.rebalance;
  EXPECT_FALSE(off.enabled);
  EXPECT_EQ(off.low_free, 0.1);
  EXPECT_EQ(off.high_free, 0.3);
  EXPECT_EQ(off.interval_ms, 1000);
  const RebalanceConfig on =
      DeployConfig::parse(
          "coordinator: {rebalance: {enabled: true, low_free: 0.2, high_free: 0.5, "
          "interval_ms: 250}}\n",
          "t")
          .coordinator.rebalance;
  EXPECT_TRUE(on.enabled);
  EXPECT_EQ(on.low_free, 0.2);
  EXPECT_EQ(on.high_free, 0.5);
  EXPECT_EQ(on.interval_ms, 250);

  const HttpConfig no_http = DeployConfig::parse("model: /m\n", "t").coordinator.http;
  EXPECT_EQ(no_http.address, "");  // off
  EXPECT_EQ(no_http.threads, 2);
  EXPECT_EQ(no_http.max_body_bytes, 4 << 20);
  const HttpConfig http = DeployConfig::parse(
                              "coordinator: {http: {address: 0.0.0.0:8000, threads: 4, "
                              "max_body_bytes: 65536, model_name: ds, api_key_file: /k}}\n",
                              "t")
                              .coordinator.http;
  EXPECT_EQ(http.address, "0.0.0.0:8000");
  EXPECT_EQ(http.threads, 4);
  EXPECT_EQ(http.max_body_bytes, 65536);
  EXPECT_EQ(http.model_name, "ds");
  EXPECT_EQ(http.api_key_file, "/k");
}

TEST(DeployConfig, ErrorsNameTheProblem) {
  auto message = [](const std::string& yaml) {
    try {
      DeployConfig::parse(yaml, "x.yaml");
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      return std::string(e.what());
    }
    return std::string("no error");
  };
  // A coordinator's config needs no model (workers check theirs: --model or `model`).
  EXPECT_EQ(message("coordinator: {migrate_on_drain: false}\n"), "no error");
  EXPECT_THAT(message("coordinator: {rebalance: {enable: true}}\n"),
              HasSubstr("unknown key `coordinator.rebalance.enable`"));
  EXPECT_THAT(message("coordinator: {rebalance: {low_free: 0.5, high_free: 0.4}}\n"),
              HasSubstr("low_free <= high_free"));
  EXPECT_THAT(message("coordinator: {rebalance: {interval_ms: 0}}\n"),
              HasSubstr("coordinator.rebalance.interval_ms must be >= 1"));
  EXPECT_THAT(message("coordinator: {http: {adress: x}}\n"),
              HasSubstr("unknown key `coordinator.http.adress`"));
  EXPECT_THAT(message("coordinator: {http: {threads: 0}}\n"),
              HasSubstr("coordinator.http.threads must be 1 to 256"));
  EXPECT_THAT(message("model: m\ncache: {blok_size: 4}\n"),
              HasSubstr("unknown key `cache.blok_size`"));
  EXPECT_THAT(message("model: m\nsched: {}\n"), HasSubstr("unknown key `sched`"));
  EXPECT_THAT(message("model: m\ncache: {block_size: big}\n"), HasSubstr("cache.block_size"));
  EXPECT_THAT(message("model: m\nabsorb: fast\n"), HasSubstr("unknown absorption mode `fast`"));
  EXPECT_THAT(message("model: m\ncache: {block_size: 0}\n"), HasSubstr("block_size must be >= 1"));
  EXPECT_THAT(message("model: [unclosed\n"), HasSubstr("x.yaml: not valid YAML"));
  EXPECT_THAT(message(""), HasSubstr("empty config"));
  EXPECT_THAT(message("model: m\nparallel: {kv_shard: both}\n"),
              HasSubstr("x.yaml: parallel.kv_shard: must be sequence or replicate, got `both`"));
  EXPECT_THAT(message("model: m\ncoordinator: {routing: random}\n"),
              HasSubstr("x.yaml: coordinator.routing: must be least-loaded, round-robin, "
                        "prefix-affinity or cache-aware, got `random`"));
  EXPECT_THAT(message("model: m\nparallel: {tp: 0}\n"), HasSubstr("parallel.tp must be >= 1"));
  EXPECT_THAT(message("model: m\ncache: {dtype: int4}\n"),
              HasSubstr("x.yaml: cache.dtype: 'int4' is not a cache dtype (auto, fp8)"));
  EXPECT_THAT(
      message("model: m\nfp8_weights: fp4\n"),
      HasSubstr("x.yaml: fp8_weights: 'fp4' is not a choice for fp8 weights (widen, keep)"));
  EXPECT_THAT(message("model: m\nworkers: {port_base: 70000}\n"), HasSubstr("workers.port_base"));
  EXPECT_THAT(message("model: m\ncoordinator: {adress: x}\n"),
              HasSubstr("unknown key `coordinator.adress`"));
}

TEST(DeployConfig, MissingFileIsNotFound) {
  try {
    DeployConfig::load("/nonexistent/deploy.yaml");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNotFound);
    EXPECT_THAT(e.what(), HasSubstr("config file /nonexistent/deploy.yaml does not exist"));
  }
}

// A directory opens as a stream that reads nothing; it must not pass for an empty config.
TEST(DeployConfig, DirectoryIsNotAConfigFile) {
  const std::string dir = std::string(MLA_TEST_DATA_DIR) + "/../../configs";
  try {
    DeployConfig::load(dir);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr("config file " + dir + " is a directory"));
  }
}

}  // namespace
}  // namespace mla
