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
// Creates DIR if needed. With expert_ranks P > 1 only the routed experts rank 0 of a TP-P group
// loads are written (experts [0, E / P)): a full-size MoE shape small enough to write, for
// `mlaserve profile --emulate --tp P`, which no other rank or TP size can load.
// Throws kInvalidArgument if DIR exists and is not a directory or P does not divide the
// routed experts, kFailedPrecondition naming the path if DIR cannot be created.
void write_random_checkpoint(const ModelConfig& config, const std::string& dir, uint64_t seed,
                             DType dtype = DType::kF32, int64_t expert_ranks = 1);

// Writes DIR/tokenizer.json and DIR/tokenizer_config.json beside a random checkpoint (which
// write_random_checkpoint calls): a byte-level BPE tokenizer without merges (every byte one
// token), DeepSeek-V3's pre-tokenizer, the begin- and end-of-sentence tokens at the config's
// ids (bos just before eos, as DeepSeek lays them out) and the user and assistant markers, so
// a random model takes and gives text. False, writing nothing, when the vocabulary has no room
// for 256 bytes and the two.
bool write_byte_level_tokenizer(const ModelConfig& config, const std::string& dir);

}  // namespace mla
