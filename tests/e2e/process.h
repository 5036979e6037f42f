// Child processes for the end-to-end tests: servers started in their own process group with
// their output in a log file, stopped with a signal and a bounded wait, or killed with their
// whole process tree (mpirun puts each rank in a process group of its own, so a tree is found
// through /proc, not through the group).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <optional>
#include <string>
#include <vector>

namespace mla::e2e {

// A process as /proc knows it: the start time tells a process from a later one that reuses
// its pid.
struct ProcId {
  pid_t pid = 0;
  unsigned long long start_time = 0;  // field 22 of /proc/<pid>/stat, in clock ticks
};

// Every descendant of `pid` alive now (children, grandchildren, ...), from /proc.
std::vector<ProcId> descendants(pid_t pid);
// Whether `p` is still the process it was (alive, same start time; zombies count as gone).
bool alive(const ProcId& p);
// The descendant of `root` (an mpirun) whose environment says it is MPI world rank `rank`
// (OMPI_COMM_WORLD_RANK), polled until `timeout`; nullopt when none appears.
std::optional<ProcId> mpi_rank_process(pid_t root, int rank, std::chrono::milliseconds timeout);

// A child process. Not thread-safe. The destructor SIGKILLs it and its descendants if it still
// runs, and reaps it.
class Process {
 public:
  // Starts argv[0] (a path) in a new process group, with the current environment plus
  // `extra_env` ("NAME=value", replacing a variable of the same name), stdin from /dev/null
  // and stdout and stderr appended to `log_path`. Throws std::runtime_error when it cannot.
  Process(std::vector<std::string> argv, std::string log_path,
          const std::vector<std::string>& extra_env = {});
  ~Process();
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_path_; }
  // argv joined by spaces, for messages.
  std::string command_line() const;

  // False once it has exited (and been reaped).
  bool running();
  // Sends `sig` to the process itself (not its group: mpirun forwards SIGTERM to its ranks).
  void signal(int sig);
  // Waits until it exits or `timeout` passes; true when it exited.
  bool wait_for_exit(std::chrono::milliseconds timeout);
  // SIGKILLs the process and every descendant it has now, then reaps it. Returns within a
  // few seconds.
  void kill_tree();
  // Sends SIGTERM to the process, or with `to_descendants` to each of its descendants instead
  // (mpirun's ranks: they then exit by themselves and mpirun with them, while a SIGTERM to
  // mpirun SIGKILLs ranks that do not exit within a second). Then waits up to `grace` for the
  // process and every descendant it had to exit; whatever is left is SIGKILLed. True when
  // everything exited within the grace period by itself.
  bool terminate(std::chrono::milliseconds grace, bool to_descendants = false);

  // "exit 0", "killed by signal 9", or "running".
  std::string exit_description() const;
  bool exited() const { return exited_; }
  int wait_status() const { return wait_status_; }

  // The log's last `max_bytes` bytes.
  std::string log_tail(size_t max_bytes = 16 * 1024) const;

 private:
  std::vector<std::string> argv_;
  std::string log_path_;
  pid_t pid_ = -1;
  bool exited_ = false;
  int wait_status_ = 0;
};

// Whether something accepts TCP connections on 127.0.0.1:port, polled until `timeout`.
bool wait_for_listener(int port, std::chrono::milliseconds timeout);

// A TCP port on 127.0.0.1 that was free a moment ago, such that the `count` ports from it are
// all free. Picked at random below the kernel's ephemeral range (ip_local_port_range), which
// the kernel hands to every outgoing connection and bind to port 0: a process restarted on a
// port from that range (a coordinator restart test) could find it taken by another test's
// client connection.
int free_loopback_ports(int count = 1);

}  // namespace mla::e2e
