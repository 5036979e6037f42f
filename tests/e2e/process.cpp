#include "tests/e2e/process.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

extern char** environ;

namespace mla::e2e {
namespace {

using Clock = std::chrono::steady_clock;

struct StatLine {
  char state = '?';
  pid_t ppid = 0;
  unsigned long long start_time = 0;
};

// Parses /proc/<pid>/stat; false when the process is gone. The command name (field 2) may hold
// spaces and parentheses, so the fields are read after its last ')'.
bool read_stat(pid_t pid, StatLine* out) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!in || !std::getline(in, line)) return false;
  const size_t close = line.rfind(')');
  if (close == std::string::npos) return false;
  std::istringstream fields(line.substr(close + 1));
  std::vector<std::string> f;  // f[i] is field i + 3
  for (std::string s; fields >> s;) f.push_back(s);
  if (f.size() < 20) return false;
  out->state = f[0].empty() ? '?' : f[0][0];
  out->ppid = static_cast<pid_t>(std::stol(f[1]));
  out->start_time = std::stoull(f[19]);
  return true;
}

std::string errno_text() { return std::strerror(errno); }

}  // namespace

std::vector<ProcId> descendants(pid_t root) {
  std::multimap<pid_t, ProcId> children;  // by parent
  if (DIR* dir = opendir("/proc")) {
    while (dirent* e = readdir(dir)) {
      char* end = nullptr;
      const long pid = std::strtol(e->d_name, &end, 10);
      if (end == e->d_name || *end != '\0') continue;
      StatLine st;
      if (read_stat(static_cast<pid_t>(pid), &st)) {
        children.emplace(st.ppid, ProcId{static_cast<pid_t>(pid), st.start_time});
      }
    }
    closedir(dir);
  }
  std::vector<ProcId> out;
  std::vector<pid_t> frontier = {root};
  while (!frontier.empty()) {
    const pid_t parent = frontier.back();
    frontier.pop_back();
    auto [lo, hi] = children.equal_range(parent);
    for (auto it = lo; it != hi; ++it) {
      out.push_back(it->second);
      frontier.push_back(it->second.pid);
    }
  }
  return out;
}

std::optional<ProcId> mpi_rank_process(pid_t root, int rank, std::chrono::milliseconds timeout) {
  const std::string wanted = "OMPI_COMM_WORLD_RANK=" + std::to_string(rank);
  const auto end = Clock::now() + timeout;
  do {
    for (const ProcId& p : descendants(root)) {
      // environ is NUL-separated "NAME=value" entries.
      std::ifstream in("/proc/" + std::to_string(p.pid) + "/environ", std::ios::binary);
      for (std::string entry; std::getline(in, entry, '\0');) {
        if (entry == wanted && alive(p)) return p;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  } while (Clock::now() < end);
  return std::nullopt;
}

bool alive(const ProcId& p) {
  StatLine st;
  return read_stat(p.pid, &st) && st.start_time == p.start_time && st.state != 'Z' &&
         st.state != 'X';
}

Process::Process(std::vector<std::string> argv, std::string log_path,
                 const std::vector<std::string>& extra_env)
    : argv_(std::move(argv)), log_path_(std::move(log_path)) {
  if (argv_.empty()) throw std::runtime_error("Process: empty argv");

  std::vector<std::string> env;
  auto name_of = [](const std::string& kv) { return kv.substr(0, kv.find('=')); };
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string kv = *e;
    bool replaced = false;
    for (const std::string& x : extra_env) replaced = replaced || name_of(x) == name_of(kv);
    if (!replaced) env.push_back(kv);
  }
  env.insert(env.end(), extra_env.begin(), extra_env.end());
  std::vector<char*> envp;
  for (std::string& s : env) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<char*> args;
  for (std::string& s : argv_) args.push_back(s.data());
  args.push_back(nullptr);

  posix_spawn_file_actions_t files;
  posix_spawn_file_actions_init(&files);
  posix_spawn_file_actions_addopen(&files, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&files, 1, log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND,
                                   0644);
  posix_spawn_file_actions_adddup2(&files, 1, 2);

  // A process group of its own (a Ctrl-C at the terminal goes to the test only), default
  // signal handling and no blocked signals whatever the test process set up.
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr,
                           POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  posix_spawnattr_setpgroup(&attr, 0);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  sigset_t defaults;
  sigemptyset(&defaults);
  for (int sig : {SIGTERM, SIGINT, SIGPIPE, SIGHUP, SIGCHLD}) sigaddset(&defaults, sig);
  posix_spawnattr_setsigdefault(&attr, &defaults);

  const int rc = posix_spawn(&pid_, args[0], &files, &attr, args.data(), envp.data());
  posix_spawn_file_actions_destroy(&files);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    throw std::runtime_error("cannot start " + command_line() + ": " + std::strerror(rc));
  }
}

Process::~Process() {
  if (!exited_) kill_tree();
}

std::string Process::command_line() const {
  std::string s;
  for (const std::string& a : argv_) s += (s.empty() ? "" : " ") + a;
  return s;
}

bool Process::running() {
  if (exited_) return false;
  int status = 0;
  const pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    exited_ = true;
    wait_status_ = status;
  } else if (r < 0 && errno == ECHILD) {
    exited_ = true;  // reaped elsewhere; nothing to wait for
  }
  return !exited_;
}

void Process::signal(int sig) {
  if (running()) ::kill(pid_, sig);
}

bool Process::wait_for_exit(std::chrono::milliseconds timeout) {
  const auto end = Clock::now() + timeout;
  while (running()) {
    if (Clock::now() >= end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

void Process::kill_tree() {
  const std::vector<ProcId> tree = running() ? descendants(pid_) : std::vector<ProcId>{};
  if (running()) ::kill(pid_, SIGKILL);
  for (const ProcId& p : tree) {
    if (alive(p)) ::kill(p.pid, SIGKILL);
  }
  wait_for_exit(std::chrono::seconds(5));
  const auto end = Clock::now() + std::chrono::seconds(5);
  for (const ProcId& p : tree) {
    while (alive(p) && Clock::now() < end)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

bool Process::terminate(std::chrono::milliseconds grace, bool to_descendants) {
  if (!running()) return true;
  const std::vector<ProcId> tree = descendants(pid_);
  const auto end = Clock::now() + grace;
  if (to_descendants) {
    for (const ProcId& p : tree) {
      if (alive(p)) ::kill(p.pid, SIGTERM);
    }
  } else {
    ::kill(pid_, SIGTERM);
  }
  bool clean = wait_for_exit(grace);
  for (const ProcId& p : tree) {
    while (alive(p) && Clock::now() < end)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  for (const ProcId& p : tree) {
    if (alive(p)) {
      clean = false;
      ::kill(p.pid, SIGKILL);
    }
  }
  if (running()) kill_tree();
  return clean;
}

std::string Process::exit_description() const {
  if (!exited_) return "running";
  if (WIFEXITED(wait_status_)) return "exit " + std::to_string(WEXITSTATUS(wait_status_));
  if (WIFSIGNALED(wait_status_))
    return "killed by signal " + std::to_string(WTERMSIG(wait_status_));
  return "status " + std::to_string(wait_status_);
}

std::string Process::log_tail(size_t max_bytes) const {
  std::ifstream in(log_path_, std::ios::binary);
  if (!in) return "(no log at " + log_path_ + ")";
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  if (s.size() > max_bytes) s = "[...]" + s.substr(s.size() - max_bytes);
  return s;
}

bool wait_for_listener(int port, std::chrono::milliseconds timeout) {
  const auto end = Clock::now() + timeout;
  for (;;) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw std::runtime_error("socket: " + errno_text());
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    const bool connected = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    close(fd);
    if (connected) return true;
    if (Clock::now() >= end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

int free_loopback_ports(int count) {
  // Below the ephemeral range, and above the ports services commonly hold.
  constexpr int kLowest = 10000;
  int ephemeral_low = 32768;
  std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> ephemeral_low;
  const int highest_first = std::max(kLowest, ephemeral_low - count);
  static std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> pick(kLowest, highest_first);
  for (int attempt = 0; attempt < 200; ++attempt) {
    // Beyond the first 100 attempts (or with no room below the range), the kernel's pick.
    const bool below = attempt < 100 && highest_first > kLowest;
    std::vector<int> fds;
    auto bind_port = [&](int port) {
      const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (fd < 0) throw std::runtime_error("socket: " + errno_text());
      fds.push_back(fd);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      addr.sin_port = htons(static_cast<uint16_t>(port));
      if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return 0;
      socklen_t len = sizeof addr;
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
      return static_cast<int>(ntohs(addr.sin_port));
    };
    const int first = bind_port(below ? pick(rng) : 0);
    bool ok = first > 0 && first + count - 1 <= 65535;
    for (int i = 1; ok && i < count; ++i) ok = bind_port(first + i) == first + i;
    for (int fd : fds) close(fd);
    if (ok) return first;
  }
  throw std::runtime_error("no run of free loopback ports found");
}

}  // namespace mla::e2e
