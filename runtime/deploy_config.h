// DeployConfig: the YAML deployment file (configs/*.yaml) that sets up a model and its
// engine. Every field has a default (below); unknown keys are errors so typos don't pass
// silently. Command-line flags override what the file says.
#pragma once

#include <string>

#include "runtime/deepseek_model.h"
#include "runtime/engine.h"

namespace mla {

struct DeployConfig {
  std::string model_dir;   // `model`: Hugging Face model directory. Required.
  ModelOptions model;      // `absorb`: naive | factored | premerged | auto. Default: auto.
  EngineOptions engine;    // `cache.block_size` (64), `cache.num_pages` (256),
                           // `scheduler.max_batch_tokens` (512), `scheduler.max_running` (64)

  // Parses a YAML file; relative `model` paths are taken relative to the current directory.
  // Throws kNotFound for a missing file, kInvalidArgument naming the bad key or value.
  static DeployConfig load(const std::string& path);
  static DeployConfig parse(const std::string& yaml_text, const std::string& origin);
};

}  // namespace mla
