// The `mlaserve` command. Errors end it with a one-line message and a non-zero exit code;
// under mpirun only the rank that reports errors prints it (launch/logging.h).
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <ostream>

#include "kernels/error.h"
#include "launch/commands.h"
#include "launch/logging.h"
#include "parallel/process_groups.h"

int main(int argc, char** argv) {
  using namespace mla::launch;
  set_error_reporter(mla::MpiSession::launcher_world_rank() == 0);
  CLI::App app{"mlaserve: serving runtime for DeepSeek multi-head latent attention models"};
  app.require_subcommand(1);
  // Subcommands (added below, inheriting this) pass --log-level and --version up to here,
  // so they are accepted after the subcommand as well as before it.
  app.fallthrough();
  app.set_version_flag("--version", "mlaserve " MLA_VERSION_STRING);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "Log level")
      ->check(CLI::IsMember(log_level_names()))
      ->capture_default_str();
  app.parse_complete_callback([&] {
    init_logging(app.get_subcommands().front()->get_name(), spdlog::level::from_str(log_level));
  });
  int exit_code = 0;
  add_generate_command(app, exit_code);
  add_make_tiny_command(app, exit_code);
  add_serve_commands(app, exit_code);
  add_bench_command(app, exit_code);
  add_bench_kernels_command(app, exit_code);
  add_bench_decode_command(app, exit_code);
  add_bench_migration_command(app, exit_code);
  add_bench_transport_command(app, exit_code);
  add_bench_tokenizer_command(app, exit_code);
  add_simulate_commands(app, exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (reports_errors()) return app.exit(e);
    std::ostream quiet(nullptr);
    return app.exit(e, quiet, quiet);
  } catch (const mla::Error& e) {
    report_fatal_error(fmt::format("{} [{}]", e.what(), mla::error_code_name(e.code())));
    return 1;
  } catch (const std::exception& e) {
    report_fatal_error(e.what());
    return 1;
  }
  return exit_code;
}
