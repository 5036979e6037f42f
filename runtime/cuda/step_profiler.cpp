#include "runtime/cuda/step_profiler.h"

#include <exception>

#include "kernels/cuda/cuda_check.h"

namespace mla {

StepProfiler::~StepProfiler() {
  for (cudaEvent_t e : pool_) cudaEventDestroy(e);
}

void StepProfiler::set_on(bool on) {
  on_ = on;
  begin_step();
}

void StepProfiler::begin_step() {
  sections_.clear();
  next_ = 0;
}

void StepProfiler::end_step() {
  if (!on_) return;
  for (const auto& [section, begin, end] : sections_) {
    float ms = 0;
    MLA_CUDA_CHECK(cudaEventElapsedTime(&ms, begin, end));
    (section == kAttention ? profile_.attention_ms : profile_.collective_ms) += ms;
  }
  profile_.steps++;
  begin_step();
}

cudaEvent_t StepProfiler::record() {
  cudaEvent_t e;
  if (capture_events_ != nullptr) {
    MLA_CUDA_CHECK(cudaEventCreate(&e));
    capture_events_->push_back(e);
    MLA_CUDA_CHECK(cudaEventRecordWithFlags(e, stream_, cudaEventRecordExternal));
    return e;
  }
  if (next_ == pool_.size()) {
    MLA_CUDA_CHECK(cudaEventCreate(&e));
    pool_.push_back(e);
  }
  e = pool_[next_++];
  MLA_CUDA_CHECK(cudaEventRecord(e, stream_));
  return e;
}

StepProfiler::Scope::Scope(StepProfiler& profiler, Section section)
    : profiler_(profiler.on_ ? &profiler : nullptr), section_(section) {
  if (profiler_ != nullptr) begin_ = profiler_->record();
}

StepProfiler::Scope::~Scope() noexcept(false) {
  if (profiler_ != nullptr && std::uncaught_exceptions() == 0) {
    profiler_->sections_.emplace_back(section_, begin_, profiler_->record());
  }
}

}  // namespace mla
