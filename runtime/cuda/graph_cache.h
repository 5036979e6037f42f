// GraphCache: CUDA graphs of decode steps, one per (batch bucket, table-width bucket, profiled),
// captured on first use and replayed after. Under tensor parallelism each shape first runs once
// uncaptured (NCCL connects lazily on first use) and the graph holds the step's collectives;
// replays add the collectives captured to the step's counter, since the communicator only saw
// them once.
//
// The graphs hold the addresses of the runner's buffers, cache pool and communicator: they
// belong to one runner, which clears them when its buffers move. Not thread-safe.
#pragma once

#include <cuda_runtime.h>

#include <functional>
#include <map>
#include <set>
#include <tuple>
#include <vector>

#include "parallel/communicator.h"
#include "runtime/cuda/step_profiler.h"
#include "runtime/forward_batch.h"

namespace mla {

class GraphCache {
 public:
  // (padded tokens, table width, profiled)
  using Key = std::tuple<int64_t, int64_t, bool>;

  explicit GraphCache(cudaStream_t stream) : stream_(stream) {}
  ~GraphCache() { clear(); }
  GraphCache(const GraphCache&) = delete;
  GraphCache& operator=(const GraphCache&) = delete;

  // Runs the step `enqueue` enqueues for shape `key`: replays its graph, or captures one, or
  // (tensor parallel, first time for this shape) runs it uncaptured. `comm` is the group (null
  // for one rank); profiled sections go through `profiler`.
  void run(const Key& key, const std::function<void()>& enqueue, Communicator* comm,
           StepProfiler& profiler, WorkCounter& work);
  // Destroys every graph (the buffers they captured moved). Shapes already run stay warm: the
  // connections they made remain, and every rank of a group must take the same path per shape.
  void clear();

  int64_t captured() const { return captured_; }
  int64_t replays() const { return replays_; }

 private:
  struct Graph {
    cudaGraphExec_t exec = nullptr;
    CommStats comm;                   // collectives inside the graph
    std::vector<cudaEvent_t> events;  // a profiled graph's event record nodes (owned)
    std::vector<StepProfiler::TimedSection> sections;
  };
  Graph& capture(const Key& key, const std::function<void()>& enqueue, Communicator* comm,
                 StepProfiler& profiler);

  cudaStream_t stream_;
  std::map<Key, Graph> graphs_;
  std::set<Key> warmed_;
  int64_t captured_ = 0, replays_ = 0;
};

}  // namespace mla
