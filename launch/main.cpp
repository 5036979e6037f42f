// The `mlaserve` command. Errors end it with a one-line message and a non-zero exit code.
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <iostream>

#include "kernels/error.h"
#include "launch/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"mlaserve: serving runtime for DeepSeek multi-head latent attention models"};
  app.require_subcommand(1);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
      ->capture_default_str();
  app.parse_complete_callback([&] {
    spdlog::set_level(spdlog::level::from_str(log_level));
    spdlog::set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
  });
  int exit_code = 0;
  mla::launch::add_generate_command(app, exit_code);
  mla::launch::add_make_tiny_command(app, exit_code);
  mla::launch::add_serve_commands(app, exit_code);
  mla::launch::add_bench_command(app, exit_code);
  mla::launch::add_bench_kernels_command(app, exit_code);
  mla::launch::add_bench_decode_command(app, exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const mla::Error& e) {
    std::cerr << "mlaserve: error: " << e.what() << " [" << mla::error_code_name(e.code())
              << "]\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "mlaserve: error: " << e.what() << "\n";
    return 1;
  }
  return exit_code;
}
