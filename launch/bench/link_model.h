// LinkModel: the time a tensor-parallel group's collectives take on its links, from two numbers
// in nccl-tests' terms: the bus bandwidth (GB/s, what nccl-tests prints as busbw, e.g. for a
// large all-reduce over NVLink) and a fixed latency per call (us). For P ranks, by the
// CommStats byte conventions (parallel/communicator.h):
//   all-reduce of S bytes      latency + S * 2 (P - 1) / P / busbw   (ring: reduce-scatter +
//                                                                    all-gather)
//   all-gather of S gathered   latency + S * (P - 1) / P / busbw
//   all-to-all of S sent       latency + S * (P - 1) / P / busbw
//   broadcast, send/recv of S  latency + S / busbw
// `mlaserve profile --emulate` adds this to the compute it measured for one rank of a group
// larger than the machine (launch/group_runtime.h, emulate_rank0).
#pragma once

#include <nlohmann/json.hpp>

#include "parallel/communicator.h"

namespace mla::bench {

struct LinkModel {
  double busbw_gbps = 0;  // > 0
  double latency_us = 0;  // >= 0

  // Throws kInvalidArgument naming the flag (--link-busbw-gbps, --link-latency-us) when a
  // number is out of range.
  void validate() const;
  // Milliseconds the collectives `stats` counted take in a group of `ranks`.
  double ms(const CommStats& stats, int ranks) const;
  nlohmann::ordered_json to_json() const;
};

}  // namespace mla::bench
