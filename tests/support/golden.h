// Test support shared by the gtest suites: the transformers golden data in tests/data and
// a helper for asserting on mla::Error codes. Header-only; needs MLA_TEST_DATA_DIR.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "runtime/safetensors.h"

namespace mla::test {

// The golden data directory: MLA_TEST_DATA (set when the tests run on another machine than
// the one that built them, e.g. a GPU host) or the source tree's tests/data.
inline std::string model_dir(const std::string& name) {
  const char* moved = std::getenv("MLA_TEST_DATA");
  return std::string(moved != nullptr ? moved : MLA_TEST_DATA_DIR) + "/" + name;
}

// One golden model: its prompts, transformers' greedy tokens (it did not stop at eos), the
// logits of every prompt position and of every greedy step.
struct Golden {
  std::vector<std::vector<int32_t>> prompts, greedy;
  std::vector<Tensor> prompt_logits;  // [S, V] per prompt
  std::vector<Tensor> step_logits;    // [steps, V] per prompt
  int steps = 0;
  nlohmann::json meta;
};

// Loaded once per model name and variant. `variant` names the files: "golden" (transformers'
// fp32 forward), or "golden_fp8act" (an fp8 model's forward with its activations quantised as
// fp8_weights keep does; tests/parity/make_golden.py says how). Not thread-safe on first use.
inline const Golden& golden(const std::string& name, const std::string& variant = "golden") {
  static std::map<std::string, Golden> cache;
  const std::string key = name + "/" + variant;
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  Golden g;
  std::ifstream(model_dir(name) + "/" + variant + ".json") >> g.meta;
  g.steps = g.meta["steps"].get<int>();
  auto file = SafetensorsFile::open(model_dir(name) + "/" + variant + ".safetensors");
  for (int i = 0; i < g.meta["num_prompts"].get<int>(); ++i) {
    g.prompts.push_back(g.meta["prompts"][i].get<std::vector<int32_t>>());
    g.greedy.push_back(g.meta["greedy"][i].get<std::vector<int32_t>>());
    g.prompt_logits.push_back(file->tensor(fmt::format("prompt{}_logits", i)));
    g.step_logits.push_back(file->tensor(fmt::format("prompt{}_step_logits", i)));
  }
  return cache.emplace(key, std::move(g)).first->second;
}

// Relative L2 error |got - want| / |want| over n values, in double; infinite when got holds
// a NaN or an infinity (a kernel that left poison behind).
inline double rel_error(const float* got, const float* want, int64_t n) {
  double err = 0, norm = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    const double d = static_cast<double>(got[i]) - want[i];
    err += d * d;
    norm += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(err / norm);
}

// The code of the mla::Error `fn` throws (and its message); a test failure if none.
inline ErrorCode code_of(const std::function<void()>& fn, std::string* message = nullptr) {
  try {
    fn();
  } catch (const Error& e) {
    if (message) *message = e.what();
    return e.code();
  }
  ADD_FAILURE() << "no mla::Error thrown";
  return ErrorCode::kInternal;
}

}  // namespace mla::test
