// SharedSecret: the control plane's credential. Every Control call (workers registering and
// heartbeating, operators draining) and every Worker call (coordinators relaying requests)
// carries it as call metadata `authorization: Bearer <secret>`; servers answer a call without
// it, or with another one, UNAUTHENTICATED and log the refusal (rate-limited, with the peer).
//
// The secret comes from the environment variable MLASERVE_CONTROL_SECRET or from a file
// (config `control.secret_file`), never from the command line, where `ps` would show it. It
// must be at least kMinSecretLength characters; surrounding whitespace (a file's trailing
// newline) is not part of it. Immutable after construction; thread-safe.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

namespace mla {

inline constexpr size_t kMinSecretLength = 16;
inline constexpr const char* kSecretEnvVar = "MLASERVE_CONTROL_SECRET";

class SharedSecret {
 public:
  // Throws mla::Error(kInvalidArgument) when the secret is shorter than kMinSecretLength.
  explicit SharedSecret(std::string secret);
  SharedSecret(const SharedSecret&) = delete;
  SharedSecret& operator=(const SharedSecret&) = delete;

  // The secret from MLASERVE_CONTROL_SECRET when set, else from `secret_file` when not empty.
  // Throws mla::Error: kFailedPrecondition naming both sources when neither gives one,
  // kNotFound naming the file when it cannot be read, kInvalidArgument for a short secret.
  static std::shared_ptr<const SharedSecret> load(const std::string& secret_file);

  // Adds the secret to an outgoing call's metadata.
  void attach(grpc::ClientContext& context) const;
  // OK when the call carries the secret; UNAUTHENTICATED otherwise (the refusal is logged,
  // at most once a second, with how many were refused since). `what` names the RPC.
  grpc::Status check(const grpc::ServerContext& context, const char* what) const;

 private:
  std::string header_;  // "Bearer <secret>"
  mutable std::mutex log_mu_;
  mutable std::chrono::steady_clock::time_point last_log_{};
  mutable size_t refused_since_log_ = 0;
};

// Whether a == b, in time that depends on the lengths only, so that a caller cannot find a
// secret byte by byte from how fast it is refused.
bool equal_in_constant_time(std::string_view a, std::string_view b);

}  // namespace mla
