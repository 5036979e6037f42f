// mla::Error and the checking macros used across mlaserve.
//
// Library code reports failures by throwing mla::Error (a code plus a message that says
// what is wrong and where). Boundaries catch it: the CLI turns it into an exit code and a
// one-line message; RPC handlers turn it into a grpc::Status. Library code never exits.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace mla {

// Mirrors the gRPC status codes we need, so the RPC layer can map them one to one.
enum class ErrorCode {
  kInvalidArgument,     // the caller passed something malformed (bad config, bad token id)
  kNotFound,            // a file, tensor or request id does not exist
  kOutOfRange,          // a value is outside what the model or cache supports
  kResourceExhausted,   // no cache pages / queue space for this request
  kFailedPrecondition,  // the object is not in a state where the call makes sense
  kDataLoss,            // a file is truncated or corrupt
  kDeadlineExceeded,    // an operation (e.g. a collective) did not finish in time
  kUnavailable,         // a peer (rank, worker) is gone or unreachable
  kInternal,            // a broken invariant inside mlaserve (a bug)
};

const char* error_code_name(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace mla

// Throws mla::Error(code, formatted message).
#define MLA_THROW(code, ...) throw ::mla::Error(::mla::ErrorCode::code, fmt::format(__VA_ARGS__))

// Checks an invariant that callers cannot violate through valid input; failure is a bug.
#define MLA_CHECK(cond, ...)                                                                    \
  do {                                                                                          \
    if (!(cond)) {                                                                              \
      throw ::mla::Error(::mla::ErrorCode::kInternal,                                           \
                         fmt::format("{}:{}: check `{}` failed: {}", __FILE__, __LINE__, #cond, \
                                     fmt::format(__VA_ARGS__)));                                \
    }                                                                                           \
  } while (0)

// Validates caller input; failure is the caller's error.
#define MLA_REQUIRE(cond, ...)                             \
  do {                                                     \
    if (!(cond)) MLA_THROW(kInvalidArgument, __VA_ARGS__); \
  } while (0)
