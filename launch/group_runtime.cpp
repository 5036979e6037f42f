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

namespace {

ModelOptions rank_options(const DeployConfig& d, int tp_size, int tp_rank, bool shows_progress) {
  ModelOptions options = d.model;
  options.tp_size = tp_size;
  options.tp_rank = tp_rank;
  options.kv_shard = d.parallel.kv_shard;
  options.show_progress = options.show_progress && shows_progress;
  return options;
}

// With `device: cuda`, makes this rank's GPU current (one GPU per rank: ranks on a node take
// its devices in local-rank order) and returns it; -1 for the CPU backend.
int take_gpu(const ModelOptions& options, int world_rank) {
  if (options.device != Device::kCuda) return -1;
#if MLA_HAVE_CUDA
  const int devices = cuda::device_count();
  MLA_REQUIRE(devices > 0, "--device cuda: no CUDA device is visible on this node");
  const int device = local_rank() % devices;
  cuda::set_device(device);
  spdlog::info("rank {} uses GPU {} of {}", world_rank, device, devices);
  return device;
#else
  MLA_THROW(kFailedPrecondition, "this build has no CUDA backend; use --device cpu");
#endif
}

}  // namespace

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
  const ModelOptions options =
      rank_options(d, rt->groups.tp_size, rt->groups.tp_rank, rt->groups.world_rank == 0);
  Communicator* data = rt->comm.get();
  const int device = take_gpu(options, rt->groups.world_rank);
  if (device >= 0) {
#if MLA_HAVE_NCCL
    if (rt->comm != nullptr && rt->groups.tp_size > 1) {
      rt->nccl = std::make_unique<NcclCommunicator>(
          rt->groups.tp_comm.get(), device, std::chrono::seconds(d.parallel.comm_timeout_s));
      data = rt->nccl.get();
    }
#else
    MLA_REQUIRE(rt->groups.tp_size == 1, "tensor parallelism on GPUs needs a build with NCCL");
#endif
  }
  rt->model = load_model(d.model_dir, options);
  rt->data = data;
  if (with_engine)
    rt->engine = std::make_unique<Engine>(rt->model, d.engine_options(), data, rt->comm.get());
  return rt;
}

std::unique_ptr<GroupRuntime> GroupRuntime::emulate_rank0(const DeployConfig& d) {
  MLA_REQUIRE(!MpiSession::launched_by_mpirun(),
              "an emulated group is one process: run it without mpirun");
  const int tp = d.parallel.tp;
  auto rt = std::make_unique<GroupRuntime>();
  const ModelOptions options = rank_options(d, tp, 0, true);
  EmulatedCommunicator::Copy copy;  // host memory by default
  EmulatedCommunicator::StreamOps stream_ops;
  if (take_gpu(options, 0) >= 0) {
#if MLA_HAVE_CUDA
    copy = [](void* dst, const void* src, int64_t bytes) {
      cuda::copy_on_device(dst, src, static_cast<size_t>(bytes));
    };
    // Stream-ordered as NCCL is, so the emulated rank runs its steps as a real group's rank
    // does: no host waits around collectives, decode steps in CUDA graphs.
    stream_ops.copy_async = [](void* dst, const void* src, int64_t bytes, void* stream) {
      cuda::copy_on_device_async(dst, src, static_cast<size_t>(bytes), stream);
    };
    stream_ops.drain = [](void* stream) { cuda::synchronize(stream); };
#endif
  }
  rt->emulated_data = std::make_unique<EmulatedCommunicator>(tp, copy, stream_ops);
  rt->emulated_control = std::make_unique<EmulatedCommunicator>(tp);
  spdlog::info("emulating rank 0 of a tensor-parallel group of {} ({} cache)", tp,
               d.parallel.kv_shard == KvShard::kReplicate ? "replicated" : "sequence-sharded");
  rt->model = load_model(d.model_dir, options);
  rt->data = rt->emulated_data.get();
  rt->engine =
      std::make_unique<Engine>(rt->model, d.engine_options(), rt->data, rt->emulated_control.get());
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
