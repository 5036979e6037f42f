#include "launch/group_runtime.h"

#include <spdlog/spdlog.h>

namespace mla::launch {

std::unique_ptr<GroupRuntime> GroupRuntime::start(const DeployConfig& d) {
  auto rt = std::make_unique<GroupRuntime>();
  if (MpiSession::launched_by_mpirun() || d.parallel.tp > 1) {
    rt->mpi.emplace();
    rt->groups = split_tp_groups(d.parallel.tp);
    spdlog::info("{}", rt->groups.describe());
    rt->comm = std::make_unique<MpiCommunicator>(rt->groups.tp_comm.get(),
                                                 std::chrono::seconds(d.parallel.comm_timeout_s),
                                                 rt->groups.tp_label());
  }
  ModelOptions options = d.model;
  options.tp_size = rt->groups.tp_size;
  options.tp_rank = rt->groups.tp_rank;
  options.kv_shard = d.parallel.kv_shard == "replicate" ? KvShard::kReplicate : KvShard::kSequence;
  options.show_progress = options.show_progress && rt->groups.world_rank == 0;
  rt->model = DeepseekModel::load(d.model_dir, options);
  rt->engine = std::make_unique<Engine>(rt->model, d.engine, rt->comm.get());
  return rt;
}

FollowerRelease::~FollowerRelease() {
  try {
    engine_.shutdown();
  } catch (const std::exception& e) {
    spdlog::error("could not release the follower ranks: {}", e.what());
  }
}

}  // namespace mla::launch
