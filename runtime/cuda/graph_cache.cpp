#include "runtime/cuda/graph_cache.h"

#include <spdlog/spdlog.h>

#include "kernels/cuda/cuda_check.h"

namespace mla {

void GraphCache::clear() {
  for (auto& [key, g] : graphs_) {
    cudaGraphExecDestroy(g.exec);
    for (cudaEvent_t e : g.events) cudaEventDestroy(e);
  }
  graphs_.clear();
}

void GraphCache::run(const Key& key, const std::function<void()>& enqueue, Communicator* comm,
                     StepProfiler& profiler, WorkCounter& work) {
  // Every rank of a group makes this choice on its own (its table width may differ), which is
  // safe: the same collectives are issued in the same order captured or not.
  if (comm != nullptr && warmed_.insert(key).second) {
    enqueue();
    return;
  }
  auto it = graphs_.find(key);
  Graph* g = nullptr;
  if (it == graphs_.end()) {
    g = &capture(key, enqueue, comm, profiler);
  } else {
    g = &it->second;
    replays_++;
    work.comm += g->comm;
  }
  profiler.set_sections(g->sections);  // read back once the step is done
  MLA_CUDA_CHECK(cudaGraphLaunch(g->exec, stream_));
}

GraphCache::Graph& GraphCache::capture(const Key& key, const std::function<void()>& enqueue,
                                       Communicator* comm, StepProfiler& profiler) {
  const CommStats at = comm != nullptr ? comm->stats() : CommStats{};
  Graph g;
  cudaGraph_t graph = nullptr;
  // Profiled sections record into g's own events while capturing; whatever a capture that
  // failed part way leaves is freed.
  struct Unfinished {
    Graph& g;
    cudaGraph_t& graph;
    StepProfiler& profiler;
    bool kept = false;
    ~Unfinished() {
      profiler.capture_into(nullptr);
      if (kept) return;
      profiler.clear_sections();
      if (graph != nullptr) cudaGraphDestroy(graph);
      if (g.exec != nullptr) cudaGraphExecDestroy(g.exec);
      for (cudaEvent_t e : g.events) cudaEventDestroy(e);
    }
  } unfinished{g, graph, profiler};
  profiler.capture_into(profiler.on() ? &g.events : nullptr);
  profiler.clear_sections();
  MLA_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  try {
    enqueue();
  } catch (...) {
    cudaGraph_t partial = nullptr;
    if (cudaStreamEndCapture(stream_, &partial) == cudaSuccess && partial != nullptr) {
      cudaGraphDestroy(partial);
    }
    cudaGetLastError();  // what the failed capture left is not the next launch's error
    throw;
  }
  MLA_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
  MLA_CUDA_CHECK(cudaGraphInstantiate(&g.exec, graph, 0));
  if (comm != nullptr) g.comm = comm->stats() - at;
  g.sections = profiler.take_sections();
  unfinished.kept = true;
  cudaGraphDestroy(graph);
  captured_++;
  spdlog::debug("captured decode graph for batch {} x {} pages", std::get<0>(key),
                std::get<1>(key));
  return graphs_.emplace(key, std::move(g)).first->second;
}

}  // namespace mla
