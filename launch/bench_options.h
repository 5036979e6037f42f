// Command-line options `mlaserve bench` and `mlaserve simulate` share.
#pragma once

#include <CLI/CLI.hpp>

#include "launch/bench/workload.h"

namespace mla::launch {

// --dataset, --input-len (--prompt-len), --output-len (--max-tokens), --prefix-groups,
// --prefix-len, --trace, --trace-time-scale into `w`.
void add_workload_options(CLI::App& cmd, bench::WorkloadSpec& w);

}  // namespace mla::launch
