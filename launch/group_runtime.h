// GroupRuntime: this process's place in the world and its share of the model, set up the
// same way for every subcommand that runs one: under mpirun (or with tp > 1) the world
// splits into tensor-parallel groups (the layout is logged), each rank loads its shard,
// and each builds an Engine around the group's communicator.
#pragma once

#include <memory>
#include <optional>

#include "parallel/mpi_communicator.h"
#include "parallel/process_groups.h"
#include "runtime/deploy_config.h"
#include "runtime/engine.h"

namespace mla::launch {

struct GroupRuntime {
  std::optional<MpiSession> mpi;  // first member: finalised last
  ProcessGroups groups;
  std::unique_ptr<MpiCommunicator> comm;  // null for a single process
  std::shared_ptr<const DeepseekModel> model;
  std::unique_ptr<Engine> engine;

  // Sets everything up from the deployment config. Throws mla::Error.
  static std::unique_ptr<GroupRuntime> start(const DeployConfig& d);
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
