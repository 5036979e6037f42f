// MPI start-up and the split of the world into tensor-parallel groups (docs/ARCHITECTURE.md section
// 6).
//
// mpirun starts W processes; consecutive world ranks form a group of P = --tp ranks:
// world rank r is rank r % P of group r / P. Each group gets its own MPI communicator,
// from which the group's Communicator (MPI on the CPU, NCCL on GPUs) is built.
//
// Thread safety: a communicator is used by one thread at a time (MPI_THREAD_SERIALIZED would
// do); MpiTransport's transfers run beside it on other threads, which needs the
// MPI_THREAD_MULTIPLE that MpiSession asks for. None of these types are thread-safe.
#pragma once

#include <mpi.h>

#include <string>

namespace mla {

// Initialises MPI on construction and finalises it on destruction. If MPI is already
// initialised (by the host program or another session), it does neither, so sessions may
// nest. Requests MPI_THREAD_MULTIPLE (thread_level() says what MPI provided). When this session
// initialises MPI, it also sets MPI_ERRORS_RETURN on MPI_COMM_WORLD, so MPI failures surface as
// mla::Error instead of aborting the job. Create it once, on the main thread, before any other MPI
// use. Throws kFailedPrecondition if MPI was already finalised, kUnavailable if init fails.
class MpiSession {
 public:
  // argc/argv may be null; MPI may strip its own arguments from them.
  explicit MpiSession(int* argc = nullptr, char*** argv = nullptr);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  // Whether this session called MPI_Init_thread (and will call MPI_Finalize).
  bool owns_mpi() const { return owns_; }
  // The thread level MPI provided (MPI_THREAD_*).
  int thread_level() const { return thread_level_; }

  // Whether this process was started by mpirun/mpiexec/srun (Open MPI, MPICH or PMIx
  // environment variables are set). Does not touch MPI; safe to call before init.
  static bool launched_by_mpirun();
  // This process's world rank as the launcher's environment gives it (Open MPI, PMIx,
  // MPICH/PMI); 0 for a process no launcher started. Does not touch MPI.
  static int launcher_world_rank();

 private:
  bool owns_ = false;
  int thread_level_ = MPI_THREAD_SINGLE;
};

// Owns one MPI communicator and frees it on destruction (unless MPI is already
// finalised, when freeing is no longer possible or needed). Move-only. Never owns
// MPI_COMM_WORLD, MPI_COMM_SELF or MPI_COMM_NULL.
class MpiComm {
 public:
  MpiComm() = default;
  explicit MpiComm(MPI_Comm comm) : comm_(comm) {}
  ~MpiComm() { reset(); }
  MpiComm(MpiComm&& other) noexcept : comm_(other.release()) {}
  MpiComm& operator=(MpiComm&& other) noexcept;
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;

  MPI_Comm get() const { return comm_; }
  // Gives up ownership without freeing; returns the communicator.
  MPI_Comm release();
  // Frees the communicator now (local in Open MPI; collective in the MPI standard, so
  // every member should free it). Leaves MPI_COMM_NULL.
  void reset();

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
};

// Where this process sits: its world rank and its tensor-parallel group.
struct ProcessGroups {
  int world_rank = 0;
  int world_size = 1;
  int tp_size = 1;      // P: ranks per group
  int tp_rank = 0;      // world_rank % P; rank 0 of a group is its leader
  int group_index = 0;  // world_rank / P
  int num_groups = 1;   // world_size / P
  MpiComm tp_comm;      // this group's ranks, ordered by tp_rank

  bool is_leader() const { return tp_rank == 0; }
  // "tp group 1": the label communicators of this group put in their error messages.
  std::string tp_label() const;
  // One line for the start-up log, e.g.
  // "world 4 = 2 groups x tp 2; rank 3 is group 1 rank 1".
  std::string describe() const;
};

// Splits `world` into groups of `tp_size` consecutive ranks (MPI_Comm_split). Collective:
// every rank of `world` must call it with the same tp_size. Throws kInvalidArgument if
// tp_size < 1 or the world size is not a multiple of tp_size (checked on every rank before
// any communication, so all ranks throw alike), kUnavailable if MPI fails.
ProcessGroups split_tp_groups(int tp_size, MPI_Comm world = MPI_COMM_WORLD);

// The MPI library's text for an error code, e.g. "MPI_ERR_TRUNCATE: message truncated
// (MPI error 15)".
std::string mpi_error_string(int code);

}  // namespace mla
