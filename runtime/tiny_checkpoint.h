// Random DeepSeek checkpoints in Hugging Face format, for trying deployments and tests
// without real weights (`mlaserve make-tiny`).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "runtime/model_config.h"

namespace mla {

// Named model shapes: "v3" and "v2-lite" (tiny, CPU-friendly), "v2-lite-full" and "v3-full"
// (the exact DeepSeek-V2-Lite and DeepSeek-V3 shapes). Throws kInvalidArgument for an unknown name,
// listing the known.
ModelConfig model_preset(const std::string& name);
std::vector<std::string> model_preset_names();

// Writes DIR/config.json and DIR/model.safetensors with random weights (seeded, so the
// same arguments give the same files). dtype F32, BF16, or F8_E4M3 (linear weights in fp8
// with 128x128 block scales `*_scale_inv`, the rest in BF16, as DeepSeek-V3 ships).
// Creates DIR if needed. Throws kInvalidArgument if DIR exists and is not a directory,
// kFailedPrecondition naming the path if it cannot be created.
void write_random_checkpoint(const ModelConfig& config, const std::string& dir, uint64_t seed,
                             DType dtype = DType::kF32);

}  // namespace mla
