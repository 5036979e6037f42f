#include "launch/bench/link_model.h"

#include "kernels/error.h"

namespace mla::bench {

void LinkModel::validate() const {
  MLA_REQUIRE(busbw_gbps > 0, "--link-busbw-gbps must be > 0, not {}", busbw_gbps);
  MLA_REQUIRE(latency_us >= 0, "--link-latency-us must be >= 0, not {}", latency_us);
}

double LinkModel::ms(const CommStats& stats, int ranks) const {
  if (ranks <= 1) return 0;
  const double spread = static_cast<double>(ranks - 1) / ranks;
  double bus_bytes = 0;
  int64_t calls = 0;
  for (int op = 0; op < kNumCommOps; ++op) {
    const double bytes = static_cast<double>(stats.bytes[op]);
    switch (static_cast<CommOp>(op)) {
      case CommOp::kAllReduce:
        bus_bytes += 2 * spread * bytes;
        break;
      case CommOp::kAllGather:
      case CommOp::kAllToAll:
        bus_bytes += spread * bytes;
        break;
      case CommOp::kBroadcast:
      case CommOp::kSendRecv:
        bus_bytes += bytes;
        break;
    }
    calls += stats.calls[op];
  }
  return calls * latency_us / 1e3 + bus_bytes / (busbw_gbps * 1e9) * 1e3;
}

nlohmann::ordered_json LinkModel::to_json() const {
  return {{"busbw_gbps", busbw_gbps}, {"latency_us", latency_us}};
}

}  // namespace mla::bench
