// Logging and fatal-error reporting for the `mlaserve` command.
//
// Every log line names the process's role and place, so that the lines of several ranks
// (mpirun interleaves them) or processes (a cluster) can be told apart:
//   [12:00:00.123] [worker g1 r0] [info] serving group 1 on 127.0.0.1:50101
// The tag starts as the subcommand ("generate", or "generate rank 3" under mpirun, before
// the ranks form groups) and is replaced once the group and rank are known.
//
// Colours: only when stdout is a terminal and no launcher started the process. Under
// mpirun a rank's stdout is a pseudo-terminal even when mpirun's own output goes to a file,
// so a rank cannot tell, and colours there would end up as escape codes in log files.
// NO_COLOR (no-color.org) turns them off too.
//
// Thread safety: set_log_tag, set_error_reporter and report_fatal_error may be called from
// any thread; init_logging once, from main, before any other thread starts.
#pragma once

#include <spdlog/common.h>

#include <string>
#include <vector>

namespace mla::launch {

// The values --log-level accepts, most verbose first.
const std::vector<std::string>& log_level_names();

// Sets up the default logger at `level` for subcommand `role`, tagged as described above.
void init_logging(const std::string& role, spdlog::level::level_enum level);

// Replaces the tag on every later line, e.g. "worker g1 r0". Callable any number of times.
void set_log_tag(const std::string& tag);

// "<role> g<group> r<rank>": the tag of rank `rank` of tensor-parallel group `group`.
std::string group_log_tag(int group, int rank);

// Whether this process reports a fatal error or leaves it to another rank (see
// report_fatal_error). Before the ranks form groups, world rank 0 reports, since every rank
// runs the same start-up and fails alike; after, each group's rank 0, since a group fails
// on its own. Default: true.
void set_error_reporter(bool reports);

// Prints `message` as the one-line fatal error of this process: "mlaserve: error: MESSAGE"
// on stderr in one write (so ranks' lines do not interleave mid-line), with the tag after
// "mlaserve" under a launcher. A process that does not report errors logs the line at debug
// level instead (--log-level debug shows every rank's).
void report_fatal_error(const std::string& message);

// Whether this process reports fatal errors; the others stay quiet on the terminal.
bool reports_errors();

}  // namespace mla::launch
