#include "rpc/model_identity.h"

#include <fmt/format.h>
#include <openssl/evp.h>

#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "kernels/error.h"

namespace mla {

std::string sha256_hex(const std::string& bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (EVP_Digest(bytes.data(), bytes.size(), digest, &length, EVP_sha256(), nullptr) != 1) {
    MLA_THROW(kInternal, "SHA-256 failed");
  }
  std::string hex;
  for (unsigned int i = 0; i < length; ++i) hex += fmt::format("{:02x}", digest[i]);
  return hex;
}

std::string model_config_hash(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  std::ifstream in(path);
  if (!in) MLA_THROW(kNotFound, "{}: cannot be read", path);
  nlohmann::json config;
  try {
    in >> config;
  } catch (const nlohmann::json::exception& e) {
    MLA_THROW(kInvalidArgument, "{}: not valid JSON ({})", path, e.what());
  }
  // nlohmann::json keeps object keys sorted, so dump() is canonical.
  return sha256_hex(config.dump());
}

const char* model_difference(const mlaserve::v1::ModelInfo& a, const mlaserve::v1::ModelInfo& b) {
  if (a.model_type() != b.model_type()) return "model_type";
  if (a.vocab_size() != b.vocab_size()) return "vocab_size";
  if (a.max_context() != b.max_context()) return "max_context";
  if (a.dtype() != b.dtype()) return "dtype";
  if (a.weights() != b.weights()) return "weights";
  if (a.config_hash() != b.config_hash()) return "config_hash";
  return nullptr;
}

std::string model_field(const mlaserve::v1::ModelInfo& m, const std::string& field) {
  if (field == "vocab_size") return std::to_string(m.vocab_size());
  if (field == "max_context") return std::to_string(m.max_context());
  if (field == "model_type") return m.model_type();
  if (field == "dtype") return m.dtype();
  if (field == "weights") return m.weights().empty() ? "widened weights" : m.weights();
  return m.config_hash();
}

}  // namespace mla
