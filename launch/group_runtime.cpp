#include "launch/group_runtime.h"

#include <spdlog/spdlog.h>

#include <cstdlib>

#include "kernels/error.h"
#include "launch/logging.h"

#if MLA_HAVE_CUDA
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_memory.h"
#endif

namespace mla::launch {
namespace {

// This process's rank among the ranks on its node (Open MPI and Slurm set it; a process
// started without either is rank 0).
int local_rank() {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"}) {
    if (const char* v = std::getenv(var)) return std::atoi(v);
  }
  return 0;
}

}  // namespace
}  // namespace mla::launch

namespace mla::launch {

std::unique_ptr<GroupRuntime> GroupRuntime::start(const DeployConfig& d, bool with_engine) {
  auto rt = std::make_unique<GroupRuntime>();
  const int tp = d.parallel.tp;
  if (!MpiSession::launched_by_mpirun() && tp > 1) {
    MLA_THROW(kInvalidArgument,
              "tensor parallelism {} (--tp, or parallel.tp in the config) needs {} processes: run "
              "under `mpirun -np {}` (a multiple of {} for several groups), or pass --tp 1",
              tp, tp, tp, tp);
  }
  if (MpiSession::launched_by_mpirun()) {
    rt->mpi.emplace();
    rt->groups = split_tp_groups(tp);
    set_log_tag(group_log_tag(rt->groups.group_index, rt->groups.tp_rank));
    set_error_reporter(rt->groups.is_leader());
    spdlog::info("{}", rt->groups.describe());
    rt->comm = std::make_unique<MpiCommunicator>(rt->groups.tp_comm.get(),
                                                 std::chrono::seconds(d.parallel.comm_timeout_s),
                                                 rt->groups.tp_label());
    rt->transport = std::make_shared<MpiTransport>(rt->mpi->thread_level());
  }
  ModelOptions options = d.model;
  options.tp_size = rt->groups.tp_size;
  options.tp_rank = rt->groups.tp_rank;
  options.kv_shard = d.parallel.kv_shard;
  options.show_progress = options.show_progress && rt->groups.world_rank == 0;
  Communicator* data = rt->comm.get();
  if (options.device == Device::kCuda) {
#if MLA_HAVE_CUDA
    // One GPU per rank: ranks on a node take its devices in local-rank order.
    const int devices = cuda::device_count();
    MLA_REQUIRE(devices > 0, "--device cuda: no CUDA device is visible on this node");
    const int device = local_rank() % devices;
    cuda::set_device(device);
    spdlog::info("rank {} uses GPU {} of {}", rt->groups.world_rank, device, devices);
#if MLA_HAVE_NCCL
    if (rt->comm != nullptr && rt->groups.tp_size > 1) {
      rt->nccl = std::make_unique<NcclCommunicator>(
          rt->groups.tp_comm.get(), device, std::chrono::seconds(d.parallel.comm_timeout_s));
      data = rt->nccl.get();
    }
#else
    MLA_REQUIRE(rt->groups.tp_size == 1, "tensor parallelism on GPUs needs a build with NCCL");
#endif
#else
    MLA_THROW(kFailedPrecondition, "this build has no CUDA backend; use --device cpu");
#endif
  }
  rt->model = load_model(d.model_dir, options);
  rt->data = data;
  if (with_engine)
    rt->engine = std::make_unique<Engine>(rt->model, d.engine_options(), data, rt->comm.get());
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
