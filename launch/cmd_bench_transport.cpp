// `mlaserve bench-transport` (under mpirun, two ranks or more): the ceiling of the in-job MPI
// transport that migrations between groups of one job use (parallel/mpi_transport.h): world
// rank 0 sends 1 MiB messages (a migration's chunk size) to rank 1 through MpiTransport, 256
// MiB a round, and prints the best of three rounds in GB/s. Other ranks only take part in the
// set-up.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <iostream>
#include <memory>
#include <string>

#include "kernels/error.h"
#include "launch/commands.h"
#include "parallel/mpi_transport.h"
#include "parallel/process_groups.h"

namespace mla::launch {
namespace {

struct BenchTransportArgs {
  int32_t message_kib = 1024;
  int32_t round_mib = 256;
  int32_t rounds = 3;
};

int run_bench_transport(const BenchTransportArgs& a) {
  MLA_REQUIRE(MpiSession::launched_by_mpirun(),
              "bench-transport measures MPI between two ranks: run it under `mpirun -np 2`");
  MLA_REQUIRE(a.message_kib >= 1 && a.round_mib >= 1 && a.rounds >= 1,
              "--message-kib, --round-mib and --rounds must be >= 1");
  MpiSession session;
  MpiTransport transport(session.thread_level());
  MLA_REQUIRE(transport.usable(), "the MPI transport is off here: {}", transport.why_not());
  const int rank = transport.self().world_rank;
  if (rank > 1) return 0;
  const auto message = std::make_shared<const std::string>(size_t{1024} * a.message_kib, 'm');
  const int64_t per_round = int64_t{a.round_mib} * 1024 / a.message_kib;
  double best = 0;
  for (int round = 0; round < a.rounds; ++round) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < per_round; ++i) {
      if (rank == 0) {
        transport.send(message, 1, 1);
      } else {
        transport.recv(static_cast<int64_t>(message->size()), 0, 1);
      }
    }
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, static_cast<double>(per_round) * message->size() / 1e9 / s);
  }
  if (rank == 0) {
    std::cout << fmt::format("mpi transport ({} KiB messages, rank 0 -> 1): {:.2f} GB/s\n",
                             a.message_kib, best);
  }
  return 0;
}

}  // namespace

void add_bench_transport_command(CLI::App& app, int& exit_code) {
  auto a = std::make_shared<BenchTransportArgs>();
  auto* cmd = app.add_subcommand(
      "bench-transport",
      "Under mpirun: bandwidth of the in-job MPI transport migrations use (rank 0 -> rank 1)");
  cmd->add_option("--message-kib", a->message_kib, "Message size")->capture_default_str();
  cmd->add_option("--round-mib", a->round_mib, "Bytes per round")->capture_default_str();
  cmd->add_option("--rounds", a->rounds, "Rounds (the best is printed)")->capture_default_str();
  cmd->callback([a, &exit_code] { exit_code = run_bench_transport(*a); });
}

}  // namespace mla::launch
