#include "parallel/communicator.h"

namespace mla {

const char* to_string(CommOp op) {
  switch (op) {
    case CommOp::kAllReduce:
      return "all_reduce";
    case CommOp::kAllGather:
      return "all_gather";
    case CommOp::kAllToAll:
      return "all_to_all";
    case CommOp::kBroadcast:
      return "broadcast";
    case CommOp::kSendRecv:
      return "send_recv";
  }
  return "?";
}

int64_t CommStats::total_bytes() const {
  int64_t total = 0;
  for (int64_t b : bytes) total += b;
  return total;
}

CommStats& CommStats::operator+=(const CommStats& other) {
  for (int op = 0; op < kNumCommOps; ++op) {
    bytes[op] += other.bytes[op];
    calls[op] += other.calls[op];
  }
  return *this;
}

CommStats CommStats::operator-(const CommStats& earlier) const {
  CommStats d;
  for (int op = 0; op < kNumCommOps; ++op) {
    d.bytes[op] = bytes[op] - earlier.bytes[op];
    d.calls[op] = calls[op] - earlier.calls[op];
  }
  return d;
}

}  // namespace mla
