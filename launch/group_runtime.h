// GroupRuntime: this process's place in the world and its share of the model, set up the
// same way for every subcommand that runs one: under mpirun the world splits into
// tensor-parallel groups (the layout is logged, and the log tag and error reporting follow
// the group and rank: launch/logging.h), each rank loads its shard, and each builds an
// Engine around the group's communicator. A single process (no mpirun) runs tp 1. With
// `device: cuda` each rank takes a GPU (local rank modulo the node's devices) and the model's
// collectives go over NCCL while step plans stay on MPI.
#pragma once

#include <memory>
#include <optional>

#include "parallel/emulated_communicator.h"
#include "parallel/mpi_communicator.h"
#include "parallel/mpi_transport.h"
#if MLA_HAVE_NCCL
#include "parallel/nccl/nccl_communicator.h"
#endif
#include "parallel/process_groups.h"
#include "runtime/deploy_config.h"
#include "runtime/engine.h"

namespace mla::launch {

struct GroupRuntime {
  std::optional<MpiSession> mpi;  // first member: finalised last
  ProcessGroups groups;
  std::unique_ptr<MpiCommunicator> comm;  // null for a single process; carries step plans
  // To any rank of this mpirun job (latents of requests migrating between its groups); null
  // for a process mpirun did not start.
  std::shared_ptr<MpiTransport> transport;
#if MLA_HAVE_NCCL
  std::unique_ptr<NcclCommunicator> nccl;  // the model's collectives on GPUs (tp > 1)
#endif
  // emulate_rank0's stand-ins for the absent ranks: the model's collectives and the step plans.
  std::unique_ptr<EmulatedCommunicator> emulated_data, emulated_control;
  std::shared_ptr<const Model> model;
  std::unique_ptr<Engine> engine;  // null when started without one
  Communicator* data = nullptr;    // the model's collectives (null for a single rank)

  // Sets everything up from the deployment config; `with_engine` false stops after the
  // model (a benchmark that drives the model and a cache itself). Throws mla::Error;
  // kInvalidArgument, saying how to run it, for tp > 1 in a process mpirun did not start.
  static std::unique_ptr<GroupRuntime> start(const DeployConfig& d, bool with_engine = true);
  // One process standing in for rank 0 of a group of d.parallel.tp ranks (profiling a rank's
  // share of a group larger than the machine): the model is rank 0's shard, the engine the
  // leader's, and the collectives and step plans go to EmulatedCommunicators (their stats say
  // what the real group's collectives would move). Throws kInvalidArgument under mpirun.
  static std::unique_ptr<GroupRuntime> emulate_rank0(const DeployConfig& d);
};

// Calls engine.shutdown() when leaving a scope however it is left, so a leader that fails
// still releases its followers.
class FollowerRelease {
 public:
  explicit FollowerRelease(Engine& engine) : engine_(engine) {}
  ~FollowerRelease();
  FollowerRelease(const FollowerRelease&) = delete;
  FollowerRelease& operator=(const FollowerRelease&) = delete;

 private:
  Engine& engine_;
};

}  // namespace mla::launch
