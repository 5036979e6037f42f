// The Engine tests' fixture: the tiny random v3 model (one seed; eos ids on demand) and the
// golden "v3" checkpoint, request builders, a run's outputs per request, and engine options.
// Shared by test_engine.cpp (stops, validation, preemption, batching, determinism, cancel,
// attention forms) and test_engine_migration.cpp (export, import, live migration).
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "runtime/deepseek_model.h"
#include "runtime/engine.h"
#include "runtime/tiny_checkpoint.h"
#include "tests/support/golden.h"

namespace mla::test_engine {

using Tokens = std::vector<int32_t>;

inline constexpr uint64_t kTinySeed = 7;
inline constexpr int kMaxSteps = 500;  // no test needs nearly this many; more means a livelock

// ---------------------------------------------------------------------------------------
// Models

// A per-process temporary directory, removed at exit.
class TempDir {
 public:
  TempDir()
      : path_(std::filesystem::temp_directory_path() /
              fmt::format("mla_test_engine_{}", ::getpid())) {
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  std::string sub(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

inline const TempDir& temp_dir() {
  static TempDir dir;
  return dir;
}

// model_preset("v3") with random weights (always the same: one seed), with `eos` as the
// eos ids when given.
// A model's options in `mode`, without the loading progress line.
inline ModelOptions quiet_options(AbsorbMode mode) {
  ModelOptions o;
  o.absorb = mode;
  o.show_progress = false;
  return o;
}

inline std::shared_ptr<const DeepseekModel> tiny_model(AbsorbMode mode,
                                                       std::optional<int32_t> eos = std::nullopt) {
  static std::map<std::pair<int, int32_t>, std::shared_ptr<const DeepseekModel>> cache;
  auto& m = cache[{static_cast<int>(mode), eos.value_or(-1)}];
  if (m) return m;
  ModelConfig config = model_preset("v3");
  if (eos) config.eos_token_ids = {*eos};
  const std::string dir = temp_dir().sub(fmt::format("v3_eos{}", eos.value_or(-1)));
  if (!std::filesystem::exists(dir + "/config.json")) {
    write_random_checkpoint(config, dir, kTinySeed);
  }
  m = DeepseekModel::load(dir, quiet_options(mode));
  return m;
}

using test::Golden;
inline std::string golden_dir() { return test::model_dir("v3"); }
inline const Golden& golden() { return test::golden("v3"); }

inline std::shared_ptr<const DeepseekModel> golden_model() {
  static const std::shared_ptr<const DeepseekModel> m =
      DeepseekModel::load(golden_dir(), quiet_options(AbsorbMode::kAuto));
  return m;
}

// ---------------------------------------------------------------------------------------
// Running requests

inline Request make_request(Tokens prompt, int32_t max_tokens, std::optional<uint64_t> seed = {}) {
  Request r;
  r.prompt = std::move(prompt);
  r.max_tokens = max_tokens;
  r.ignore_eos = true;
  if (seed) r.sampling = {.temperature = 0.8f, .top_k = 0, .top_p = 0.9f, .seed = *seed};
  return r;
}

// Everything a run produced, per request id.
struct Outputs {
  std::map<RequestId, Tokens> tokens;
  std::map<RequestId, FinishReason> finish;
  std::map<RequestId, int> outputs_after_finish;  // must stay 0

  void add(const std::vector<StepOutput>& step) {
    for (const StepOutput& o : step) {
      if (finish.count(o.id)) ++outputs_after_finish[o.id];
      if (o.token >= 0) tokens[o.id].push_back(o.token);
      if (o.finished) finish[o.id] = o.finish;
    }
  }
};

inline void run_to_end(Engine& engine, Outputs& out) {
  for (int step = 0; engine.has_work(); ++step) {
    ASSERT_LT(step, kMaxSteps) << "engine does not finish: " << engine.num_running() << " running, "
                               << engine.num_waiting() << " waiting, "
                               << engine.cache().pool().num_free() << " pages free";
    out.add(engine.step());
  }
}

inline EngineOptions options(int32_t block_size, int32_t num_pages,
                             int32_t max_batch_tokens = 512) {
  EngineOptions o;
  o.block_size = block_size;
  o.num_pages = num_pages;
  o.scheduler.max_batch_tokens = max_batch_tokens;
  return o;
}

// The tokens a request produces alone in an ample cache.
inline Tokens run_alone(std::shared_ptr<const DeepseekModel> model, const Request& r,
                        FinishReason* finish = nullptr) {
  Engine engine(std::move(model), options(16, 64));
  const RequestId id = engine.add_request(r);
  Outputs out;
  run_to_end(engine, out);
  if (finish) *finish = out.finish[id];
  return out.tokens[id];
}

}  // namespace mla::test_engine
