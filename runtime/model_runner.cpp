#include "runtime/model_runner.h"

#include "kernels/error.h"

namespace mla {

ModelRunner::ModelRunner(const Model& model, LatentCache& cache, Communicator* comm)
    : model_(model), cache_(cache), comm_(model.shard().tp_size() > 1 ? comm : nullptr) {
  const ShardPlan& shard = model.shard();
  // Check the group
  MLA_REQUIRE(shard.tp_size() == 1 || comm != nullptr,
              "a model sharded for {} ranks needs its group's communicator", shard.tp_size());
  MLA_REQUIRE(
      comm_ == nullptr || (comm_->size() == shard.tp_size() && comm_->rank() == shard.tp_rank()),
      "communicator rank {}/{} does not match the shard plan {}/{}", comm_->rank(), comm_->size(),
      shard.tp_rank(), shard.tp_size());
  // Check the cache
  const CacheGeometry want = model.cache_geometry(cache.geometry().block_size);
  const CacheGeometry& have = cache.geometry();
  MLA_REQUIRE(have.num_layers == want.num_layers && have.kv_lora_rank == want.kv_lora_rank &&
                  have.rope_dim == want.rope_dim,
              "the cache holds {} layers of d_c {} + d_r {}, the model needs {} of {} + {}",
              have.num_layers, have.kv_lora_rank, have.rope_dim, want.num_layers, want.kv_lora_rank,
              want.rope_dim);
  MLA_REQUIRE(cache.storage() == model.cache_storage(),
              "the cache's storage does not match the model's backend (a {} model)",
              model.cuda_device() >= 0 ? "CUDA" : "CPU");
  MLA_REQUIRE(cache.shard().tp_size() == shard.tp_size() &&
                  cache.shard().tp_rank() == shard.tp_rank() &&
                  cache.shard().kv_shard() == shard.kv_shard(),
              "the cache's shard plan does not match the model's");
}

void ModelRunner::set_dump(TensorDump* dump) {
  MLA_REQUIRE(dump == nullptr || model_.shard().tp_size() == 1,
              "tensor dumps need a model on one rank, this one is sharded over {}",
              model_.shard().tp_size());
  dump_ = dump;
}

SampledStep ModelRunner::forward_sample(const ForwardBatch& batch,
                                        const std::vector<SampleRequest>& requests,
                                        WorkCounter* counter) {
  const Tensor logits = forward(batch, counter);
  SampledStep step;
  if (requests.empty()) return step;
  const int64_t V = model_.config().vocab_size;
  MLA_CHECK(static_cast<int64_t>(requests.size()) == logits.dim(0),
            "{} sample requests for {} rows of logits", requests.size(), logits.dim(0));
  step.logits.resize(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    const float* row = logits.f32() + static_cast<int64_t>(i) * V;
    step.tokens.push_back(sample_token(row, V, requests[i].params, requests[i].position));
    if (requests[i].keep_logits) step.logits[i].assign(row, row + V);
  }
  return step;
}

}  // namespace mla
