// What identifies a model across worker groups: ModelInfo.config_hash, the SHA-256 of the
// checkpoint's config.json in canonical form (parsed and written back with sorted keys and no
// whitespace), so two copies of one checkpoint agree whatever their formatting, and any
// change of a field (a fine-tune's vocabulary, a different rope scaling) makes them differ.
#pragma once

#include <string>

namespace mla {

// Lower-case hex SHA-256 of `model_dir`/config.json, canonicalised. Throws mla::Error:
// kNotFound naming the file when it cannot be read, kInvalidArgument when it is not JSON.
std::string model_config_hash(const std::string& model_dir);

// Lower-case hex SHA-256 of `bytes`.
std::string sha256_hex(const std::string& bytes);

}  // namespace mla
