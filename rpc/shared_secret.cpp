#include "rpc/shared_secret.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "kernels/error.h"

namespace mla {
namespace {

constexpr const char* kHeader = "authorization";

std::string trimmed(const std::string& s) {
  const auto not_space = [](unsigned char c) { return !std::isspace(c); };
  const auto begin = std::find_if(s.begin(), s.end(), not_space);
  const auto end = std::find_if(s.rbegin(), s.rend(), not_space).base();
  return begin < end ? std::string(begin, end) : std::string();
}

}  // namespace

bool equal_in_constant_time(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

SharedSecret::SharedSecret(std::string secret) {
  secret = trimmed(secret);
  MLA_REQUIRE(secret.size() >= kMinSecretLength,
              "control secret: {} characters; at least {} are required", secret.size(),
              kMinSecretLength);
  header_ = "Bearer " + secret;
}

std::shared_ptr<const SharedSecret> SharedSecret::load(const std::string& secret_file) {
  if (const char* env = std::getenv(kSecretEnvVar); env != nullptr && *env != '\0') {
    try {
      return std::make_shared<const SharedSecret>(env);
    } catch (const Error& e) {
      MLA_THROW(kInvalidArgument, "{}: {}", kSecretEnvVar, e.what());
    }
  }
  if (secret_file.empty()) {
    MLA_THROW(kFailedPrecondition,
              "no control secret: set the environment variable {} or control.secret_file in "
              "the config (the coordinator, its workers and `mlaserve admin` must share it)",
              kSecretEnvVar);
  }
  std::ifstream in(secret_file);
  if (!in) MLA_THROW(kNotFound, "control.secret_file {}: cannot be read", secret_file);
  std::stringstream text;
  text << in.rdbuf();
  try {
    return std::make_shared<const SharedSecret>(text.str());
  } catch (const Error& e) {
    MLA_THROW(kInvalidArgument, "control.secret_file {}: {}", secret_file, e.what());
  }
}

void SharedSecret::attach(grpc::ClientContext& context) const {
  context.AddMetadata(kHeader, header_);
}

grpc::Status SharedSecret::check(const grpc::ServerContext& context, const char* what) const {
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find(kHeader);
  if (it != metadata.end() &&
      equal_in_constant_time(std::string_view(it->second.data(), it->second.size()), header_)) {
    return grpc::Status::OK;
  }
  {
    std::lock_guard lock(log_mu_);
    ++refused_since_log_;
    const auto now = std::chrono::steady_clock::now();
    if (now - last_log_ >= std::chrono::seconds(1)) {
      spdlog::warn("refused {} from {}: {} control secret ({} refused since the last report)", what,
                   context.peer(), it == metadata.end() ? "no" : "wrong", refused_since_log_);
      last_log_ = now;
      refused_since_log_ = 0;
    }
  }
  return {grpc::StatusCode::UNAUTHENTICATED,
          fmt::format("{}: this call needs the control secret", what)};
}

}  // namespace mla
