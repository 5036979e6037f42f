// The `mlaserve` subcommands. Each add_*_command registers its flags on `app` and a
// callback that runs the command and stores its exit status in `exit_code`; errors are
// thrown as mla::Error and reported by main().
#pragma once

#include <CLI/CLI.hpp>

namespace mla::launch {

void add_generate_command(CLI::App& app, int& exit_code);
void add_make_tiny_command(CLI::App& app, int& exit_code);
// worker, coordinator and client.
void add_serve_commands(CLI::App& app, int& exit_code);
// Serving benchmark against a coordinator, a worker or an OpenAI server (launch/cmd_bench.cpp).
void add_bench_command(CLI::App& app, int& exit_code);
void add_bench_kernels_command(CLI::App& app, int& exit_code);
// Whole-model decode steps at chosen batch and context (launch/cmd_bench_decode.cpp).
void add_bench_decode_command(CLI::App& app, int& exit_code);
// Live migration downtime and bandwidth against a cluster (launch/cmd_bench_migration.cpp).
void add_bench_migration_command(CLI::App& app, int& exit_code);
// Under mpirun: the in-job MPI transport's bandwidth (launch/cmd_bench_transport.cpp).
void add_bench_transport_command(CLI::App& app, int& exit_code);
// A model's tokenizer speed on a text file (launch/cmd_bench_tokenizer.cpp).
void add_bench_tokenizer_command(CLI::App& app, int& exit_code);
// `profile` (step times of a model) and `simulate` (bench's workloads against simulated groups)
// (launch/cmd_simulate.cpp).
void add_simulate_commands(CLI::App& app, int& exit_code);

}  // namespace mla::launch
