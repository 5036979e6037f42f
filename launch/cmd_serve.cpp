// `mlaserve worker`, `mlaserve coordinator` and `mlaserve client`: the serving cluster.
// Servers run until SIGINT or SIGTERM, then shut down cleanly (streams ended, followers
// released, ports closed).
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <unistd.h>

#include <csignal>
#include <iostream>
#include <memory>
#include <sstream>

#include "kernels/error.h"
#include "launch/commands.h"
#include "launch/deploy_flags.h"
#include "launch/group_runtime.h"
#include "rpc/client.h"
#include "rpc/coordinator_service.h"
#include "rpc/metrics.h"
#include "rpc/worker_service.h"

namespace mla::launch {
namespace {

// SIGINT and SIGTERM are caught by a handler that writes the signal number to a pipe, so
// whichever thread receives them (gRPC and MPI start their own), the process is not killed
// and wait_for_stop_signal() returns on the main thread to shut down in order.
int g_stop_pipe[2] = {-1, -1};

void on_stop_signal(int sig) {
  const unsigned char byte = static_cast<unsigned char>(sig);
  [[maybe_unused]] ssize_t n = write(g_stop_pipe[1], &byte, 1);
}

void catch_stop_signals() {
  if (g_stop_pipe[0] < 0 && pipe(g_stop_pipe) != 0) {
    MLA_THROW(kInternal, "cannot create the signal pipe");
  }
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
}

int wait_for_stop_signal() {
  unsigned char sig = 0;
  while (read(g_stop_pipe[0], &sig, 1) != 1) {
  }
  spdlog::info("received {}, shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
  return sig;
}

std::unique_ptr<grpc::Server> start_server(grpc::Service* service, const std::string& address,
                                           const char* what) {
  // The standard grpc.health.v1 service too, for load balancers and orchestrators.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(service);
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.SetMaxSendMessageSize(64 << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) MLA_THROW(kUnavailable, "{}: cannot listen on {}", what, address);
  server->GetHealthCheckService()->SetServingStatus(true);
  spdlog::info("{} listening on {}", what, address);
  return server;
}


struct WorkerArgs {
  DeployFlags deploy;
  std::string coordinator;
  std::string host;
  int32_t port_base = 0;
};

int run_worker(const WorkerArgs& a, const CLI::App& cmd) {
  DeployConfig d = a.deploy.resolve();
  if (cmd.get_option("--host")->count() > 0) d.workers.host = a.host;
  if (cmd.get_option("--port-base")->count() > 0) d.workers.port_base = a.port_base;
  const std::string coordinator =
      cmd.get_option("--coordinator")->count() > 0 ? a.coordinator : d.coordinator.address;
  catch_stop_signals();
  auto rt = GroupRuntime::start(d);
  Engine& engine = *rt->engine;
  if (!engine.is_leader()) {
    engine.follow();  // until the leader shuts down; stop signals only reach the pipe here
    return 0;
  }
  FollowerRelease release(engine);
  const int port = d.workers.port_base + rt->groups.group_index;
  const std::string listen = fmt::format("{}:{}", d.workers.host, port);
  // Listening on every interface, the worker advertises its host name to the coordinator.
  std::string advertised_host = d.workers.host;
  if (advertised_host == "0.0.0.0") {
    char name[256] = {};
    gethostname(name, sizeof(name) - 1);
    advertised_host = name;
  }
  const std::string address = fmt::format("{}:{}", advertised_host, port);
  WorkerServiceOptions wopts;
  wopts.worker_id = address;
  WorkerService service(engine, wopts);
  auto server = start_server(&service, listen, "worker");

  std::unique_ptr<MetricsRegistry> registry;
  std::unique_ptr<MetricsServer> metrics;
  if (d.workers.metrics_port_base > 0) {
    registry = std::make_unique<MetricsRegistry>();
    service.attach_metrics(*registry);
    metrics = std::make_unique<MetricsServer>(*registry, d.workers.host,
                                              d.workers.metrics_port_base + rt->groups.group_index);
    spdlog::info("worker metrics on http://{}:{}/metrics", d.workers.host, metrics->port());
  }

  CoordinatorLinkOptions lopts;
  lopts.coordinator_address = coordinator;
  lopts.worker_id = address;
  lopts.worker_address = address;
  lopts.model = service.model_info();
  lopts.load = [&service] { return service.load(); };
  lopts.on_drain = [&service] { service.drain(); };
  auto link = std::make_unique<CoordinatorLink>(lopts);

  wait_for_stop_signal();
  server->GetHealthCheckService()->SetServingStatus(false);
  link.reset();
  service.shutdown();
  // The service has ended its streams; gRPC would otherwise wait out the deadline for
  // idle client connections to close.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
  return 0;
}

struct CoordinatorArgs {
  std::string config_path;
  std::string address;
  std::string routing;
  int32_t max_in_flight = 0;
  int32_t metrics_port = 0;
};

int run_coordinator(const CoordinatorArgs& a, const CLI::App& cmd) {
  CoordinatorConfig c =
      a.config_path.empty() ? CoordinatorConfig{} : DeployConfig::load(a.config_path).coordinator;
  auto given = [&](const char* flag) { return cmd.get_option(flag)->count() > 0; };
  if (given("--address")) c.address = a.address;
  if (given("--routing")) c.routing = a.routing;
  if (given("--max-in-flight")) c.max_in_flight = a.max_in_flight;
  if (given("--metrics-port")) c.metrics_port = a.metrics_port;
  CoordinatorOptions options;
  options.policy = routing_policy_from_string(c.routing);
  options.max_in_flight = c.max_in_flight;
  options.heartbeat_interval_ms = c.heartbeat_interval_ms;
  options.dead_after_ms = 3 * c.heartbeat_interval_ms;
  catch_stop_signals();
  CoordinatorService service(options);
  std::unique_ptr<MetricsRegistry> registry;
  std::unique_ptr<MetricsServer> metrics;
  if (c.metrics_port > 0) {
    registry = std::make_unique<MetricsRegistry>();
    service.attach_metrics(*registry);
    const std::string host = c.address.substr(0, c.address.rfind(':'));
    metrics = std::make_unique<MetricsServer>(*registry, host, c.metrics_port);
    spdlog::info("coordinator metrics on http://{}:{}/metrics", host, metrics->port());
  }
  auto server = start_server(&service, c.address, "coordinator");
  wait_for_stop_signal();
  server->GetHealthCheckService()->SetServingStatus(false);
  service.shutdown();
  // The service has ended its streams; gRPC would otherwise wait out the deadline for
  // idle client connections to close.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
  return 0;
}

struct ClientArgs {
  std::string address = "127.0.0.1:50051";
  std::string prompt_ids;
  std::string request_id;
  int32_t max_tokens = 16;
  float temperature = 0.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
  bool ignore_eos = false;
  bool logprobs = false;
  bool status = false;
  int32_t wait_ready_s = 0;
  int32_t timeout_s = 0;
};

int run_client(const ClientArgs& a) {
  Client client(a.address);
  if (a.wait_ready_s > 0 && !client.wait_until_ready(std::chrono::seconds(a.wait_ready_s))) {
    MLA_THROW(kUnavailable, "no serving coordinator with a live worker at {} after {} s",
              a.address, a.wait_ready_s);
  }
  if (!a.prompt_ids.empty()) {
    mlaserve::v1::GenerateRequest req;
    req.set_request_id(a.request_id);
    for (int32_t id : parse_ids(a.prompt_ids)) req.add_prompt_ids(id);
    req.set_max_tokens(a.max_tokens);
    req.mutable_sampling()->set_temperature(a.temperature);
    req.mutable_sampling()->set_top_k(a.top_k);
    req.mutable_sampling()->set_top_p(a.top_p);
    req.mutable_sampling()->set_seed(a.seed);
    req.set_ignore_eos(a.ignore_eos);
    req.set_return_logprobs(a.logprobs);
    const auto result = client.generate(
        req,
        [&](const mlaserve::v1::GenerateResponse& m) {
          for (int i = 0; i < m.token_ids_size(); ++i) {
            std::cout << m.token_ids(i);
            if (a.logprobs && i < m.logprobs_size()) std::cout << fmt::format("({:.3f})", m.logprobs(i));
            std::cout << ' ' << std::flush;
          }
        },
        std::chrono::seconds(a.timeout_s));
    std::cout << fmt::format(
        "\n[{}] finish {}: {} prompt + {} generated tokens, ttft {:.1f} ms, total {:.1f} ms\n",
        result.request_id, mlaserve::v1::FinishReason_Name(result.finish),
        result.usage.prompt_tokens(), result.usage.completion_tokens(), result.timings.ttft_ms(),
        result.timings.total_ms());
  }
  if (a.status) std::cout << format_cluster_status(client.list_workers());
  return 0;
}

}  // namespace

void add_serve_commands(CLI::App& app, int& exit_code) {
  auto w = std::make_shared<WorkerArgs>();
  auto* worker = app.add_subcommand(
      "worker", "Serve a model as worker groups (under mpirun: N / tp groups), registered with a coordinator");
  w->deploy.add_to(*worker);
  worker->add_option("--coordinator", w->coordinator, "Coordinator address (default: from config)");
  worker->add_option("--host", w->host, "Address to listen on and advertise (default: from config)");
  worker->add_option("--port-base", w->port_base, "Group g listens on port-base + g");
  worker->callback([w, worker, &exit_code] { exit_code = run_worker(*w, *worker); });

  auto c = std::make_shared<CoordinatorArgs>();
  auto* coord = app.add_subcommand("coordinator", "Route client requests to worker groups");
  coord->add_option("--config", c->config_path, "Deployment config (YAML): its coordinator section");
  coord->add_option("--address", c->address, "Listen address (default 127.0.0.1:50051)");
  coord->add_option("--routing", c->routing, "least-loaded, round-robin or prefix-affinity");
  coord->add_option("--max-in-flight", c->max_in_flight, "Admission limit");
  coord->add_option("--metrics-port", c->metrics_port, "Prometheus /metrics port (0 = off)");
  coord->callback([c, coord, &exit_code] { exit_code = run_coordinator(*c, *coord); });

  auto k = std::make_shared<ClientArgs>();
  auto* client = app.add_subcommand("client", "Stream a generation from a coordinator, or show the cluster");
  client->add_option("--address", k->address, "Coordinator address")->capture_default_str();
  client->add_option("--prompt-ids", k->prompt_ids, "Prompt token ids, comma separated");
  client->add_option("--request-id", k->request_id, "Request id (default: assigned)");
  client->add_option("--max-tokens", k->max_tokens, "Tokens to generate")->capture_default_str();
  client->add_option("--temperature", k->temperature, "0 = greedy")->capture_default_str();
  client->add_option("--top-k", k->top_k, "0 = off")->capture_default_str();
  client->add_option("--top-p", k->top_p, "1 = off")->capture_default_str();
  client->add_option("--seed", k->seed, "Sampling seed")->capture_default_str();
  client->add_flag("--ignore-eos", k->ignore_eos, "Do not stop at the end-of-sequence token");
  client->add_flag("--logprobs", k->logprobs, "Print each token's log-probability");
  client->add_flag("--status", k->status, "Print the cluster status");
  client->add_option("--wait-ready", k->wait_ready_s, "Wait up to this many seconds for a live worker");
  client->add_option("--timeout", k->timeout_s, "Deadline of the generation in seconds (0 = none)");
  client->callback([k, &exit_code] { exit_code = run_client(*k); });
}

}  // namespace mla::launch
