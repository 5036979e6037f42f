// StepProfiler: where a CUDA step's time goes (attention and collectives), timed with events
// on the runner's stream, summed over the steps run while it is on. Sections of a step being
// captured into a CUDA graph record into events the graph owns (event record nodes), so
// profiled graphs time themselves on every replay.
//
// Not thread-safe: it belongs to one CudaRunner and is driven by that runner's thread. Lives on
// the runner's device (the caller makes it current).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace mla {

// Summed over the steps run while profiling: the latent decode / prefill attention (its
// collectives under a sequence-sharded cache included; with CudaOptions::fused_attention, the
// fused kernel, whose W_UK^T, RoPE and W_UV run inside it) and every collective of the step.
struct StepProfile {
  int64_t steps = 0;
  double attention_ms = 0;
  double collective_ms = 0;
};

class StepProfiler {
 public:
  enum Section { kAttention, kCollectives };
  using TimedSection = std::tuple<Section, cudaEvent_t, cudaEvent_t>;

  explicit StepProfiler(cudaStream_t stream) : stream_(stream) {}
  ~StepProfiler();
  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;

  bool on() const { return on_; }
  // Turns profiling on or off; the sections of an unfinished step are dropped.
  void set_on(bool on);
  const StepProfile& profile() const { return profile_; }
  void reset() { profile_ = {}; }

  // Starts a step: drops what a step that failed before end_step() left.
  void begin_step();
  // Adds the finished step's sections to profile() (the stream must have drained).
  void end_step();

  // While capturing a graph: sections record into events appended to `owned` (the graph
  // frees them); nullptr ends it. Its sections are then taken with take_sections().
  void capture_into(std::vector<cudaEvent_t>* owned) { capture_events_ = owned; }
  std::vector<TimedSection> take_sections() { return std::move(sections_); }
  // A replayed graph's sections: read back by end_step().
  void set_sections(const std::vector<TimedSection>& sections) { sections_ = sections; }
  // Forgets this step's sections (they may name events of graphs being destroyed).
  void clear_sections() { sections_.clear(); }

  // Times its scope as `section` while profiling; does nothing otherwise.
  class Scope {
   public:
    Scope(StepProfiler& profiler, Section section);
    ~Scope() noexcept(false);
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    StepProfiler* profiler_;
    Section section_;
    cudaEvent_t begin_ = nullptr;
  };

 private:
  cudaEvent_t record();

  cudaStream_t stream_;
  bool on_ = false;
  std::vector<cudaEvent_t> pool_;  // events of uncaptured steps, reused every step
  size_t next_ = 0;
  std::vector<TimedSection> sections_;  // this step's
  std::vector<cudaEvent_t>* capture_events_ = nullptr;
  StepProfile profile_;
};

}  // namespace mla
