#include "runtime/cuda/cuda_runner.h"

#include <exception>

#include "kernels/cuda/argmax.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/sampling.h"
#include "runtime/cuda/cuda_model.h"
#include "runtime/cuda/cuda_step.h"
#include "runtime/cuda/step_metadata.h"

namespace mla {
namespace {

// Ends a stream-ordered section of the communicator when the step ends, however it ends.
struct EndOrdered {
  Communicator* comm;
  ~EndOrdered() noexcept(false) {
    if (comm == nullptr) return;
    if (std::uncaught_exceptions() == 0) {
      comm->end_stream_ordered();
      return;
    }
    try {  // already failing: the first error is the one to report
      comm->end_stream_ordered();
    } catch (const std::exception&) {
    }
  }
};

}  // namespace

CudaRunner::CudaRunner(const CudaModel& model, LatentCache& cache, Communicator* comm)
    : ModelRunner(model, cache, comm),
      cuda_model_(model),
      device_(model.cuda_device()),
      scale_(static_cast<float>(model.config().softmax_scale())),
      rope_factor_(model.config().rope_attention_factor()) {
  const cuda::DeviceGuard on_device(device_);
  num_sms_ = cuda::num_sms();
  l2_bytes_ = cuda::l2_cache_bytes();
  MLA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  try {
    MLA_CUDA_CHECK(cudaStreamCreateWithFlags(&side_stream_, cudaStreamNonBlocking));
    MLA_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
    MLA_CUDA_CHECK(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming));
    blas_ = std::make_unique<cuda::Blas>(
        stream_, cuda::BlasOptions{.small_gemm = model.options().small_gemm,
                                   .batch_invariant = model.deterministic()});
    buffers_ = std::make_unique<StepBuffers>(model.step_sizing(num_sms_));
    profiler_ = std::make_unique<StepProfiler>(stream_);
    graphs_ = std::make_unique<GraphCache>(stream_);
  } catch (...) {
    release();
    throw;
  }
}

CudaRunner::~CudaRunner() {
  // On the model's device; a destructor must not throw, so errors are let be.
  int previous = 0;
  const bool known = cudaGetDevice(&previous) == cudaSuccess;
  cudaSetDevice(device_);
  release();
  if (known) cudaSetDevice(previous);
}

void CudaRunner::release() noexcept {
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  graphs_.reset();
  profiler_.reset();
  buffers_.reset();
  blas_.reset();
  if (side_stream_ != nullptr) {
    cudaStreamSynchronize(side_stream_);
    cudaStreamDestroy(side_stream_);
  }
  if (fork_ != nullptr) cudaEventDestroy(fork_);
  if (join_ != nullptr) cudaEventDestroy(join_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
  stream_ = side_stream_ = nullptr;
  fork_ = join_ = nullptr;
}

void CudaRunner::run(const ForwardBatch& batch, WorkCounter& work) {
  profiler_->begin_step();
  const CommStats before = comm_ != nullptr ? comm_->stats() : CommStats{};
  // Collectives that can go on the runner's stream need no host sync around them and can be
  // captured in the step's graph; the step's end drains the stream once, within the
  // communicator's timeout.
  const bool ordered = comm_ != nullptr && comm_->begin_stream_ordered(stream_);
  EndOrdered end_ordered{ordered ? comm_ : nullptr};
  const bool use_graphs =
      cuda_model_.options().graphs && (comm_ == nullptr || ordered) && dump_ == nullptr;
  const ModelConfig& c = model_.config();
  const StepMetadata meta = pack_step(batch, BatchLayout::of(batch, c, model_.forms(), work), c,
                                      cache_, use_graphs, *buffers_);
  // Graphs hold buffer addresses: none captured before buffers moved may replay, even when the
  // step that moved them failed.
  if (graphs_generation_ != buffers_->generation()) {
    graphs_->clear();
    graphs_generation_ = buffers_->generation();
  }
  MLA_CUDA_CHECK(cudaMemcpyAsync(buffers_->meta_dev.raw(), buffers_->meta_host,
                                 meta.total * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
  const CudaStepContext context{.config = c,
                                .shard = model_.shard(),
                                .weights = cuda_model_.weights(),
                                .premerged = model_.forms().needs_premerged(),
                                .scale = scale_,
                                .rope_factor = rope_factor_,
                                .num_sms = num_sms_,
                                .stream = stream_,
                                .blas = *blas_,
                                .buffers = *buffers_,
                                .profiler = *profiler_,
                                .cache = cache_,
                                .comm = comm_,
                                .ordered = ordered,
                                .dump = dump_,
                                .batch_invariant = cuda_model_.deterministic(),
                                .prefetch_weights = cuda_model_.options().prefetch_weights,
                                .fused_attention = cuda_model_.options().fused_attention,
                                .side_stream = side_stream_,
                                .fork = fork_,
                                .join = join_,
                                .l2_bytes = l2_bytes_};
  CudaStep step(context, batch, meta);
  if (meta.graph) {
    graphs_->run(
        {meta.T, meta.stride, profiler_->on()}, [&] { step.enqueue(); }, comm_, *profiler_, work);
  } else {
    step.enqueue();
  }
  if (comm_ != nullptr) work.comm += comm_->stats() - before;
}

void CudaRunner::finish() {
  MLA_CUDA_CHECK(cudaStreamSynchronize(stream_));
  profiler_->end_step();
}

Tensor CudaRunner::forward(const ForwardBatch& batch, WorkCounter* counter) {
  const cuda::DeviceGuard on_device(device_);
  WorkCounter local;
  run(batch, counter != nullptr ? *counter : local);
  int64_t n_logits = 0;
  for (const ForwardSeq& seq : batch.seqs) n_logits += seq.want_logits ? 1 : 0;
  Tensor logits = Tensor::empty({n_logits, model_.config().vocab_size});
  MLA_CUDA_CHECK(cudaMemcpyAsync(logits.raw(), buffers_->logits.raw(), logits.nbytes(),
                                 cudaMemcpyDeviceToHost, stream_));
  finish();
  return logits;
}

SampledStep CudaRunner::forward_sample(const ForwardBatch& batch,
                                       const std::vector<SampleRequest>& requests,
                                       WorkCounter* counter) {
  const cuda::DeviceGuard on_device(device_);
  WorkCounter local;
  run(batch, counter != nullptr ? *counter : local);
  SampledStep out;
  const auto R = static_cast<int64_t>(requests.size());
  if (R == 0) {
    finish();
    return out;
  }
  const int64_t V = model_.config().vocab_size;
  bool all_greedy = true;
  for (const SampleRequest& r : requests) {
    r.params.validate(V);
    all_greedy &= r.params.temperature == 0;
  }
  int32_t* tokens = buffers_->sampled.data<int32_t>();
  if (all_greedy) {
    cuda::argmax_f32(
        {.logits = buffers_->logits.data<float>(), .out = tokens, .rows = R, .vocab = V}, stream_);
  } else {
    std::vector<cuda::SampleRow> rows(R);
    for (int64_t i = 0; i < R; ++i) {
      const SamplingParams& sp = requests[i].params;
      rows[i] = {sp.temperature, sp.top_k, sp.top_p, sp.seed, requests[i].position};
    }
    MLA_CUDA_CHECK(cudaMemcpyAsync(buffers_->sample_params.raw(), rows.data(),
                                   R * sizeof(cuda::SampleRow), cudaMemcpyHostToDevice, stream_));
    cuda::SampleParams p{};
    p.logits = buffers_->logits.data<float>();
    p.rows = R;
    p.vocab = V;
    p.params = static_cast<const cuda::SampleRow*>(buffers_->sample_params.raw());
    p.tokens = tokens;
    p.logprobs = buffers_->logprobs.data<float>();
    cuda::sample(p, buffers_->sort_workspace.raw(), buffers_->sort_workspace.nbytes(), stream_);
  }
  out.tokens.resize(R);
  MLA_CUDA_CHECK(cudaMemcpyAsync(out.tokens.data(), tokens, R * sizeof(int32_t),
                                 cudaMemcpyDeviceToHost, stream_));
  out.logits.resize(R);
  for (int64_t i = 0; i < R; ++i) {
    if (!requests[i].keep_logits) continue;
    out.logits[i].resize(V);
    MLA_CUDA_CHECK(cudaMemcpyAsync(out.logits[i].data(), buffers_->logits.data<float>() + i * V,
                                   V * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  }
  finish();
  return out;
}

}  // namespace mla
