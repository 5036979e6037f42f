#include "launch/logging.h"

#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "parallel/process_groups.h"

namespace mla::launch {
namespace {

std::mutex tag_mu;
std::string role_tag;     // guarded by tag_mu
std::string current_tag;  // guarded by tag_mu
std::atomic<bool> reporter{true};

// spdlog patterns treat '%' as a flag.
std::string escape_pattern(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '%') out += '%';
    out += c;
  }
  return out;
}

bool use_colours() {
  return ::isatty(STDOUT_FILENO) && !MpiSession::launched_by_mpirun() &&
         std::getenv("NO_COLOR") == nullptr;
}

}  // namespace

const std::vector<std::string>& log_level_names() {
  static const std::vector<std::string> names = {"trace", "debug",    "info", "warn",
                                                 "error", "critical", "off"};
  return names;
}

void init_logging(const std::string& role, spdlog::level::level_enum level) {
  auto logger = spdlog::stdout_color_mt(
      "mlaserve", use_colours() ? spdlog::color_mode::automatic : spdlog::color_mode::never);
  spdlog::set_default_logger(logger);
  spdlog::set_level(level);
  {
    std::lock_guard lock(tag_mu);
    role_tag = role;
  }
  set_log_tag(MpiSession::launched_by_mpirun()
                  ? fmt::format("{} rank {}", role, MpiSession::launcher_world_rank())
                  : role);
}

void set_log_tag(const std::string& tag) {
  std::lock_guard lock(tag_mu);
  current_tag = tag;
  spdlog::set_pattern(fmt::format("[%H:%M:%S.%e] [{}] [%^%l%$] %v", escape_pattern(tag)));
}

std::string group_log_tag(int group, int rank) {
  std::lock_guard lock(tag_mu);
  return fmt::format("{} g{} r{}", role_tag, group, rank);
}

void set_error_reporter(bool reports) { reporter = reports; }

bool reports_errors() { return reporter; }

void report_fatal_error(const std::string& message) {
  if (!reporter) {
    spdlog::debug("error (reported by another rank, if it failed too): {}", message);
    return;
  }
  std::string tag;
  if (MpiSession::launched_by_mpirun()) {
    std::lock_guard lock(tag_mu);
    tag = fmt::format(" [{}]", current_tag);
  }
  // One fwrite of the whole line: stderr is unbuffered, so this is one write(2).
  const std::string line = fmt::format("mlaserve{}: error: {}\n", tag, message);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace mla::launch
