// What identifies a model across worker groups: ModelInfo.config_hash, the SHA-256 of the
// checkpoint's config.json in canonical form (parsed and written back with sorted keys and no
// whitespace), so two copies of one checkpoint agree whatever their formatting, and any
// change of a field (a fine-tune's vocabulary, a different rope scaling) makes them differ.
#pragma once

#include <string>

#include "mlaserve/v1/mlaserve.pb.h"

namespace mla {

// Lower-case hex SHA-256 of `model_dir`/config.json, canonicalised. Throws mla::Error:
// kNotFound naming the file when it cannot be read, kInvalidArgument when it is not JSON.
std::string model_config_hash(const std::string& model_dir);

// Lower-case hex SHA-256 of `bytes`.
std::string sha256_hex(const std::string& bytes);

// The model fields every worker of a cluster must agree on (model_type, vocab_size,
// max_context, dtype, weights, config_hash): the first that differs between `a` and `b`, or
// null.
const char* model_difference(const mlaserve::v1::ModelInfo& a, const mlaserve::v1::ModelInfo& b);
// The value of one of those fields, as text.
std::string model_field(const mlaserve::v1::ModelInfo& m, const std::string& field);

}  // namespace mla
