// Maps mlaserve errors to gRPC statuses at the RPC boundary (handlers catch mla::Error and
// return this), keeping the message that says what is wrong.
#pragma once

#include <grpcpp/grpcpp.h>

#include "kernels/error.h"

namespace mla {

grpc::StatusCode grpc_code(ErrorCode code);
// "OK", "INVALID_ARGUMENT", ...: the canonical name of a gRPC status code.
const char* grpc_code_name(grpc::StatusCode code);
inline grpc::Status to_grpc_status(const Error& e) { return {grpc_code(e.code()), e.what()}; }

}  // namespace mla
