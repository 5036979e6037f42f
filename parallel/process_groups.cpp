#include "parallel/process_groups.h"

#include <cstdlib>
#include <utility>

#include "kernels/error.h"

namespace mla {
namespace {

void check_mpi(int rc, const char* what) {
  if (rc != MPI_SUCCESS) MLA_THROW(kUnavailable, "{} failed: {}", what, mpi_error_string(rc));
}

bool mpi_finalized() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized != 0;
}

}  // namespace

std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
  if (length == 0) return fmt::format("MPI error {}", code);
  return fmt::format("{} (MPI error {})", std::string(text, length), code);
}

MpiSession::MpiSession(int* argc, char*** argv) {
  if (mpi_finalized()) MLA_THROW(kFailedPrecondition, "MPI was already finalised");
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) {
    MPI_Query_thread(&thread_level_);
    return;
  }
  // Multiple: the group's communicator is driven by the engine's thread while RPC handler
  // threads move migrating latents over MpiTransport. MPI may provide less (then the
  // transport is off, and serialized use of the communicator is what the rest needs).
  const int rc = MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &thread_level_);
  check_mpi(rc, "MPI_Init_thread");
  owns_ = true;
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
}

MpiSession::~MpiSession() {
  if (owns_ && !mpi_finalized()) MPI_Finalize();
}

bool MpiSession::launched_by_mpirun() {
  // Open MPI, PMIx-based launchers (Open MPI 5, srun --mpi=pmix), MPICH/Hydra and PMI-1/2.
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK"}) {
    if (std::getenv(name) != nullptr) return true;
  }
  return false;
}

int MpiSession::launcher_world_rank() {
  for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"}) {
    if (const char* v = std::getenv(name)) return std::atoi(v);
  }
  return 0;
}

MpiComm& MpiComm::operator=(MpiComm&& other) noexcept {
  if (this != &other) {
    reset();
    comm_ = other.release();
  }
  return *this;
}

MPI_Comm MpiComm::release() { return std::exchange(comm_, MPI_COMM_NULL); }

void MpiComm::reset() {
  MPI_Comm comm = release();
  if (comm == MPI_COMM_NULL || comm == MPI_COMM_WORLD || comm == MPI_COMM_SELF) return;
  if (!mpi_finalized()) MPI_Comm_free(&comm);
}

std::string ProcessGroups::tp_label() const { return fmt::format("tp group {}", group_index); }

std::string ProcessGroups::describe() const {
  return fmt::format("world {} = {} group{} x tp {}; rank {} is group {} rank {}", world_size,
                     num_groups, num_groups == 1 ? "" : "s", tp_size, world_rank, group_index,
                     tp_rank);
}

ProcessGroups split_tp_groups(int tp_size, MPI_Comm world) {
  ProcessGroups groups;
  check_mpi(MPI_Comm_rank(world, &groups.world_rank), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(world, &groups.world_size), "MPI_Comm_size");
  MLA_REQUIRE(tp_size >= 1, "--tp must be at least 1, got {}", tp_size);
  MLA_REQUIRE(groups.world_size % tp_size == 0,
              "world size {} is not a multiple of --tp {}: start a multiple of {} ranks",
              groups.world_size, tp_size, tp_size);
  groups.tp_size = tp_size;
  groups.tp_rank = groups.world_rank % tp_size;
  groups.group_index = groups.world_rank / tp_size;
  groups.num_groups = groups.world_size / tp_size;

  MPI_Comm tp_comm = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split(world, groups.group_index, groups.tp_rank, &tp_comm),
            "MPI_Comm_split into tp groups");
  groups.tp_comm = MpiComm(tp_comm);
  MPI_Comm_set_errhandler(tp_comm, MPI_ERRORS_RETURN);
  return groups;
}

}  // namespace mla
