#include "runtime/deploy_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "kernels/error.h"

namespace mla {
namespace {

using testing::HasSubstr;

TEST(DeployConfig, ShippedTinyCpuConfigParses) {
  const auto c = DeployConfig::load(std::string(MLA_TEST_DATA_DIR) + "/../../configs/tiny-cpu.yaml");
  EXPECT_EQ(c.model_dir, ".quickstart/tiny-v3");
  EXPECT_EQ(c.model.absorb, AbsorbMode::kAuto);
  EXPECT_EQ(c.engine.block_size, 64);
  EXPECT_EQ(c.engine.num_pages, 256);
  EXPECT_EQ(c.engine.scheduler.max_batch_tokens, 512);
  EXPECT_EQ(c.engine.scheduler.max_running, 64);
}

TEST(DeployConfig, FieldsOverrideDefaults) {
  const auto c = DeployConfig::parse(
      "model: /m\nabsorb: premerged\ncache: {block_size: 4, num_pages: 9}\n"
      "scheduler: {max_batch_tokens: 32, max_running: 3}\n",
      "inline");
  EXPECT_EQ(c.model_dir, "/m");
  EXPECT_EQ(c.model.absorb, AbsorbMode::kPremerged);
  EXPECT_EQ(c.engine.block_size, 4);
  EXPECT_EQ(c.engine.num_pages, 9);
  EXPECT_EQ(c.engine.scheduler.max_batch_tokens, 32);
  EXPECT_EQ(c.engine.scheduler.max_running, 3);
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
  EXPECT_THAT(message("absorb: auto\n"), HasSubstr("`model`"));
  EXPECT_THAT(message("model: m\ncache: {blok_size: 4}\n"), HasSubstr("unknown key `cache.blok_size`"));
  EXPECT_THAT(message("model: m\nsched: {}\n"), HasSubstr("unknown key `sched`"));
  EXPECT_THAT(message("model: m\ncache: {block_size: big}\n"), HasSubstr("cache.block_size"));
  EXPECT_THAT(message("model: m\nabsorb: fast\n"), HasSubstr("unknown absorption mode `fast`"));
  EXPECT_THAT(message("model: m\ncache: {block_size: 0}\n"), HasSubstr("block_size must be >= 1"));
  EXPECT_THAT(message("model: [unclosed\n"), HasSubstr("x.yaml: not valid YAML"));
  EXPECT_THAT(message(""), HasSubstr("empty config"));
}

TEST(DeployConfig, MissingFileIsNotFound) {
  try {
    DeployConfig::load("/nonexistent/deploy.yaml");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNotFound);
    EXPECT_THAT(e.what(), HasSubstr("/nonexistent/deploy.yaml"));
  }
}

}  // namespace
}  // namespace mla
