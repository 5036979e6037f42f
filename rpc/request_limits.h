// Limits and small helpers shared by the coordinator and worker services.
#pragma once

#include <chrono>
#include <cstddef>

namespace mla {

// Longest request_id a client may choose.
inline constexpr size_t kMaxRequestIdLength = 128;

// Milliseconds from `from` to `to`.
inline double ms_between(std::chrono::steady_clock::time_point from,
                         std::chrono::steady_clock::time_point to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}

}  // namespace mla
