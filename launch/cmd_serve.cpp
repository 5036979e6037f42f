// `mlaserve worker`, `mlaserve coordinator`, `mlaserve client` and `mlaserve admin`: the
// serving cluster. Servers run until SIGINT or SIGTERM, then stop gracefully: a worker drains
// (takes no new requests, gives the running ones workers.drain_timeout_s to finish; the rest
// fail over to other groups), a coordinator takes no new requests and gives open streams
// coordinator.drain_timeout_s. A second signal stops at once.
#include <grpcpp/grpcpp.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>

#include "kernels/error.h"
#include "launch/commands.h"
#include "launch/deploy_flags.h"
#include "launch/group_runtime.h"
#include "launch/logging.h"
#include "rpc/client.h"
#include "rpc/control_service.h"
#include "rpc/coordinator_link.h"
#include "rpc/coordinator_service.h"
#include "rpc/http_server.h"
#include "rpc/metrics.h"
#include "rpc/model_identity.h"
#include "rpc/openai_api.h"
#include "rpc/shared_secret.h"
#include "rpc/tls_credentials.h"
#include "rpc/worker_service.h"

namespace mla::launch {

namespace v1 = mlaserve::v1;
namespace {

// SIGINT and SIGTERM are caught by a handler that writes the signal number to a pipe, so
// whichever thread receives them (gRPC and MPI start their own), the process is not killed
// and the main thread reads them in order to shut down.
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

// The next stop signal, waiting up to `timeout` (forever when none); nullopt when none came.
std::optional<int> next_stop_signal(std::optional<std::chrono::milliseconds> timeout = {}) {
  pollfd fd{g_stop_pipe[0], POLLIN, 0};
  const int ms = timeout ? static_cast<int>(timeout->count()) : -1;
  while (true) {
    const int ready = poll(&fd, 1, ms);
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) return std::nullopt;
    unsigned char sig = 0;
    if (read(g_stop_pipe[0], &sig, 1) == 1) {
      spdlog::info("received {}", sig == SIGINT ? "SIGINT" : "SIGTERM");
      return sig;
    }
  }
}

// Polls `done` until it is true (true), `timeout` passes or a second stop signal comes
// (false).
bool drain_until(const std::function<bool()>& done, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        end - std::chrono::steady_clock::now());
    if (left.count() <= 0) return false;
    if (next_stop_signal(std::min(left, std::chrono::milliseconds(50)))) {
      spdlog::warn("second stop signal: stopping now");
      return false;
    }
  }
  return true;
}

// "host:port" with a port in [0, 65535] (0: any free port). gRPC would read a port beyond
// that range as port 0 and listen somewhere unexpected.
void check_listen_address(const std::string& address, const char* what) {
  const size_t colon = address.rfind(':');
  const std::string port = colon == std::string::npos ? "" : address.substr(colon + 1);
  const bool digits =
      !port.empty() && port.size() <= 5 &&
      std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; });
  if (colon == 0 || !digits || std::stoi(port) > 65535) {
    MLA_THROW(kInvalidArgument, "{}: `{}` is not host:port with a port in [0, 65535]", what,
              address);
  }
}

std::unique_ptr<grpc::Server> start_server(grpc::Service* service, const std::string& address,
                                           const std::shared_ptr<grpc::ServerCredentials>& creds,
                                           const char* what) {
  check_listen_address(address, what);
  // The standard grpc.health.v1 service too, for load balancers and orchestrators.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, creds, &port);
  builder.RegisterService(service);
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.SetMaxSendMessageSize(64 << 20);
  // gRPC sets SO_REUSEPORT by default, which lets a second process bind the same port and
  // take half its connections; a port in use must be an error instead.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    MLA_THROW(kUnavailable,
              "{}: cannot listen on {} (address in use, or not an address of this "
              "host)",
              what, address);
  }
  server->GetHealthCheckService()->SetServingStatus(true);
  spdlog::info("{} listening on {}{}", what, address,
               address.ends_with(":0") ? fmt::format(" (port {})", port) : "");
  return server;
}

struct WorkerArgs {
  DeployFlags deploy;
  std::string coordinator;
  std::string host;
  int32_t port_base = 0;
  int32_t group = 0;
  int32_t drain_timeout_s = 0;
  std::string role;
  std::string migration_transport;
  std::string step_trace;
};

std::vector<std::string> split_list(const std::string& list) {
  std::vector<std::string> out;
  std::stringstream ss(list);
  for (std::string item; std::getline(ss, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

int run_worker(const WorkerArgs& a, const CLI::App& cmd) {
  DeployConfig d = a.deploy.resolve();
  auto given = [&](const char* flag) { return cmd.get_option(flag)->count() > 0; };
  if (given("--host")) d.workers.host = a.host;
  if (given("--port-base")) d.workers.port_base = a.port_base;
  if (given("--group")) d.workers.group = a.group;
  if (given("--coordinator")) d.workers.coordinators = split_list(a.coordinator);
  if (given("--drain-timeout")) d.workers.drain_timeout_s = a.drain_timeout_s;
  if (given("--role")) d.workers.role = a.role;
  if (given("--migration-transport")) d.workers.migration_transport = a.migration_transport;
  if (given("--step-trace")) d.workers.step_trace = a.step_trace;
  MLA_REQUIRE(d.workers.role == "prefill" || d.workers.role == "decode" || d.workers.role == "both",
              "--role / workers.role: prefill, decode or both, got '{}'", d.workers.role);
  MLA_REQUIRE(d.workers.migration_transport == "auto" || d.workers.migration_transport == "grpc",
              "--migration-transport / workers.migration_transport: auto or grpc, got '{}'",
              d.workers.migration_transport);
  MLA_REQUIRE(d.workers.group >= 0, "--group must be >= 0, got {}", d.workers.group);
  MLA_REQUIRE(d.workers.drain_timeout_s >= 0, "--drain-timeout must be >= 0, got {}",
              d.workers.drain_timeout_s);
  const std::vector<std::string> coordinators = d.coordinator_control_addresses();
  MLA_REQUIRE(!coordinators.empty(), "--coordinator: no coordinator address");
  // What the leader needs to serve, checked before the slow model load.
  const auto secret = SharedSecret::load(d.control.secret_file);
  const auto server_creds = server_credentials(d.tls);
  const auto channel_creds = channel_credentials(d.tls);
  const std::string config_hash = model_config_hash(d.model_dir);
  catch_stop_signals();
  auto rt = GroupRuntime::start(d);
  // The group's index in the deployment: this job's first group plus its place in the job.
  const int group = d.workers.group + rt->groups.group_index;
  set_log_tag(group_log_tag(group, rt->groups.tp_rank));
  Engine& engine = *rt->engine;
  if (!engine.is_leader()) {
    engine.follow();  // until the leader shuts down; stop signals only reach the pipe here
    return 0;
  }
  FollowerRelease release(engine);
  const int port = d.workers.port_base + group;
  MLA_REQUIRE(port < 65536, "workers.port_base {} + group {} is not a TCP port",
              d.workers.port_base, group);
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
  wopts.secret = secret;
  wopts.config_hash = config_hash;
  // Each group of a job its own file: FILE.gGROUP when the job runs several.
  wopts.step_trace = d.workers.step_trace.empty() || rt->groups.num_groups == 1
                         ? d.workers.step_trace
                         : fmt::format("{}.g{}", d.workers.step_trace, group);
  wopts.peer_credentials = channel_creds;
  if (d.workers.migration_transport == "auto" && rt->transport && rt->transport->usable()) {
    wopts.mpi = rt->transport;
    spdlog::info(
        "worker {}: migrations with groups of this mpirun job move latents over MPI "
        "(world rank {})",
        address, rt->transport->self().world_rank);
  } else if (d.workers.migration_transport == "auto" && rt->transport &&
             rt->groups.num_groups > 1) {
    spdlog::warn("worker {}: migrations between this job's groups go over gRPC: {}", address,
                 rt->transport->why_not());
  }
  WorkerService service(engine, wopts);
  auto server = start_server(&service, listen, server_creds, "worker");

  std::unique_ptr<MetricsRegistry> registry;
  std::unique_ptr<MetricsServer> metrics;
  if (d.workers.metrics_port_base > 0) {
    registry = std::make_unique<MetricsRegistry>();
    service.attach_metrics(*registry);
    metrics = std::make_unique<MetricsServer>(*registry, d.workers.host,
                                              d.workers.metrics_port_base + group,
                                              [&service] { return !service.draining(); });
    spdlog::info("worker metrics on http://{}:{}/metrics", d.workers.host, metrics->port());
  }

  // One link per coordinator: each routes to this worker independently.
  std::vector<std::unique_ptr<CoordinatorLink>> links;
  for (const std::string& coordinator : coordinators) {
    CoordinatorLinkOptions lopts;
    lopts.coordinator_address = coordinator;
    lopts.worker_id = address;
    lopts.worker_address = address;
    lopts.model = service.model_info();
    lopts.role = d.workers.role;
    lopts.load = [&service] { return service.load(); };
    lopts.draining = [&service] { return service.draining(); };
    lopts.on_drain = [&service] { service.drain(); };
    lopts.on_undrain = [&service] { service.undrain(); };
    lopts.secret = secret;
    lopts.credentials = channel_creds;
    links.push_back(std::make_unique<CoordinatorLink>(lopts));
  }

  next_stop_signal();
  // Drain: the coordinators hear it in the next heartbeat and stop routing here; requests
  // that arrive meanwhile are refused and fail over at once.
  service.drain_for_shutdown();
  for (const auto& link : links) link->heartbeat_now();
  const auto timeout = std::chrono::seconds(d.workers.drain_timeout_s);
  spdlog::info("worker {}: draining: {} requests running, up to {} s", address, service.running(),
               timeout.count());
  if (drain_until([&service] { return service.running() == 0; }, timeout)) {
    spdlog::info("worker {}: drained", address);
  } else {
    spdlog::warn("worker {}: {} requests still running; they fail over to other groups", address,
                 service.running());
  }
  server->GetHealthCheckService()->SetServingStatus(false);
  links.clear();
  service.shutdown();
  // The service has ended its streams; gRPC would otherwise wait out the deadline for
  // idle client connections to close.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
  return 0;
}

struct CoordinatorArgs {
  std::string config_path;
  std::string address;
  std::string control_address;
  std::string routing;
  int32_t max_in_flight = 0;
  int32_t metrics_port = 0;
  int32_t drain_timeout_s = 0;
  std::string tokenizer;
  std::string http_address;
  std::string served_model_name;
};

// The API key of coordinator.http: the first line of api_key_file, else MLASERVE_API_KEY.
std::string load_api_key(const std::string& file) {
  if (file.empty()) {
    const char* env = std::getenv("MLASERVE_API_KEY");
    return env == nullptr ? "" : env;
  }
  std::ifstream in(file);
  if (!in) MLA_THROW(kNotFound, "coordinator.http.api_key_file: cannot read {}", file);
  std::string key;
  std::getline(in, key);
  while (!key.empty() && std::isspace(static_cast<unsigned char>(key.back()))) key.pop_back();
  MLA_REQUIRE(!key.empty(), "coordinator.http.api_key_file: {} has an empty first line", file);
  return key;
}

int run_coordinator(const CoordinatorArgs& a, const CLI::App& cmd) {
  const DeployConfig d = a.config_path.empty() ? DeployConfig{} : DeployConfig::load(a.config_path);
  CoordinatorConfig c = d.coordinator;
  auto given = [&](const char* flag) { return cmd.get_option(flag)->count() > 0; };
  if (given("--address")) c.address = a.address;
  if (given("--control-address")) c.control_address = a.control_address;
  if (given("--routing")) c.routing = routing_policy_from_string(a.routing, "--routing");
  if (given("--max-in-flight")) c.max_in_flight = a.max_in_flight;
  if (given("--metrics-port")) c.metrics_port = a.metrics_port;
  if (given("--drain-timeout")) c.drain_timeout_s = a.drain_timeout_s;
  if (given("--tokenizer")) c.tokenizer = a.tokenizer;
  if (given("--http-address")) c.http.address = a.http_address;
  if (given("--served-model-name")) c.http.model_name = a.served_model_name;
  MLA_REQUIRE(c.http.address.empty() || !c.tokenizer.empty(),
              "coordinator.http needs coordinator.tokenizer (--tokenizer): the model directory "
              "whose tokenizer.json and chat template the OpenAI API uses");
  MLA_REQUIRE(c.drain_timeout_s >= 0, "--drain-timeout must be >= 0, got {}", c.drain_timeout_s);
  MLA_REQUIRE(c.address != c.control_address || c.address.ends_with(":0"),
              "coordinator: the client plane ({}) and the control plane ({}) need their own "
              "addresses",
              c.address, c.control_address);
  const auto secret = SharedSecret::load(d.control.secret_file);
  CoordinatorOptions options;
  options.policy = c.routing;
  options.max_in_flight = c.max_in_flight;
  options.heartbeat_interval_ms = c.heartbeat_interval_ms;
  options.dead_after_ms = 3 * c.heartbeat_interval_ms;
  options.forget_dead_after_ms = std::max(1000 * c.forget_dead_after_s, options.dead_after_ms);
  options.stream_write_timeout_ms = 1000 * c.stream_write_timeout_s;
  options.migrate_on_drain = c.migrate_on_drain;
  options.rebalance = c.rebalance.enabled;
  options.rebalance_low_free = c.rebalance.low_free;
  options.rebalance_high_free = c.rebalance.high_free;
  options.rebalance_interval_ms = c.rebalance.interval_ms;
  options.secret = secret;
  options.worker_credentials = channel_credentials(d.tls);
  if (!c.tokenizer.empty()) {
    options.tokenizer = std::make_shared<const Tokenizer>(Tokenizer::load(c.tokenizer));
    spdlog::info("coordinator: text prompts and stop strings through {}/tokenizer.json ({} tokens)",
                 c.tokenizer, options.tokenizer->vocab_size());
  }
  const auto server_creds = server_credentials(d.tls);
  catch_stop_signals();
  CoordinatorService service(options);
  ControlService control(service, *secret);
  std::unique_ptr<MetricsRegistry> registry;
  std::unique_ptr<MetricsServer> metrics;
  if (c.metrics_port > 0) {
    registry = std::make_unique<MetricsRegistry>();
    service.attach_metrics(*registry);
    const std::string host = c.address.substr(0, c.address.rfind(':'));
    metrics = std::make_unique<MetricsServer>(*registry, host, c.metrics_port,
                                              [&service] { return service.ready(); });
    spdlog::info("coordinator metrics on http://{}:{}/metrics (/livez, /readyz)", host,
                 metrics->port());
  }
  auto server = start_server(&service, c.address, server_creds, "coordinator");
  service.attach_health(server->GetHealthCheckService());
  auto control_server = start_server(&control, c.control_address, server_creds, "control plane");
  std::unique_ptr<OpenAiApi> openai;
  std::unique_ptr<HttpServer> http;
  if (!c.http.address.empty()) {
    OpenAiOptions o;
    o.model_name = c.http.model_name.empty()
                       ? std::filesystem::path(c.tokenizer).lexically_normal().filename().string()
                       : c.http.model_name;
    if (o.model_name.empty()) o.model_name = "mlaserve";
    o.api_key = load_api_key(c.http.api_key_file);
    openai = std::make_unique<OpenAiApi>(o, server->InProcessChannel(grpc::ChannelArguments()),
                                         options.tokenizer,
                                         [&service] { return service.model_limits(); });
    const size_t colon = c.http.address.rfind(':');
    MLA_REQUIRE(colon != std::string::npos,
                "coordinator.http.address: expected host:port, got '{}'", c.http.address);
    HttpServerOptions ho;
    ho.host = c.http.address.substr(0, colon);
    ho.port = std::stoi(c.http.address.substr(colon + 1));
    ho.threads = c.http.threads;
    ho.max_body_bytes = static_cast<size_t>(c.http.max_body_bytes);
    http = std::make_unique<HttpServer>(ho, [api = openai.get()](HttpRequest r, auto exchange) {
      api->handle(std::move(r), std::move(exchange));
    });
    spdlog::info("coordinator: OpenAI-compatible API on http://{}:{}/v1 (model '{}'{}, {} threads)",
                 ho.host, http->port(), o.model_name, o.api_key.empty() ? "" : ", API key",
                 ho.threads);
  }

  next_stop_signal();
  service.stop_accepting();
  const auto timeout = std::chrono::seconds(c.drain_timeout_s);
  spdlog::info("coordinator: {} streams open; waiting up to {} s for them", service.in_flight(),
               timeout.count());
  if (!drain_until([&service] { return service.in_flight() == 0; }, timeout)) {
    spdlog::warn("coordinator: ending {} open streams", service.in_flight());
  }
  server->GetHealthCheckService()->SetServingStatus(false);
  if (openai) openai->shutdown();
  service.shutdown();
  if (openai && !openai->wait_idle(std::chrono::seconds(2))) {
    spdlog::warn("coordinator: {} HTTP calls still open", openai->open_calls());
  }
  if (http) http->stop();
  // The service has ended its streams; gRPC would otherwise wait out the deadline for
  // idle client connections to close.
  const auto soon = std::chrono::system_clock::now() + std::chrono::milliseconds(200);
  server->Shutdown(soon);
  control_server->Shutdown(soon);
  return 0;
}

struct ClientArgs {
  std::string config_path;
  std::string address = "127.0.0.1:50051";
  std::string prompt;
  std::vector<std::string> chat;
  std::string system;
  std::vector<std::string> stop;
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

int run_client(const ClientArgs& a, const CLI::App& cmd) {
  const bool given_address = cmd.get_option("--address")->count() > 0;
  if (a.prompt.empty() && a.prompt_ids.empty() && a.chat.empty() && !a.status &&
      a.wait_ready_s <= 0) {
    MLA_THROW(kInvalidArgument,
              "client: nothing to do: give --prompt, --chat or --prompt-ids to generate, --status "
              "to show the cluster, or --wait-ready to wait for it");
  }
  MLA_REQUIRE(
      (a.prompt.empty() ? 0 : 1) + (a.prompt_ids.empty() ? 0 : 1) + (a.chat.empty() ? 0 : 1) <= 1,
      "give one of --prompt, --chat and --prompt-ids");
  MLA_REQUIRE(a.system.empty() || !a.chat.empty(), "--system goes with --chat");
  MLA_REQUIRE(a.chat.empty() || a.chat.size() % 2 == 1,
              "--chat: the turns alternate user, assistant, ..., user: give an odd number, got {}",
              a.chat.size());
  const DeployConfig d = a.config_path.empty() ? DeployConfig{} : DeployConfig::load(a.config_path);
  const std::string address =
      given_address || a.config_path.empty() ? a.address : d.coordinator.address;
  ClientOptions options;
  options.credentials = channel_credentials(d.tls);
  Client client(address, options);
  if (a.wait_ready_s > 0 && !client.wait_until_ready(std::chrono::seconds(a.wait_ready_s))) {
    MLA_THROW(kUnavailable, "no serving coordinator with a live worker at {} after {} s", address,
              a.wait_ready_s);
  }
  if (!a.prompt_ids.empty() || !a.prompt.empty() || !a.chat.empty()) {
    mlaserve::v1::GenerateRequest req;
    req.set_request_id(a.request_id);
    if (!a.prompt.empty()) req.set_prompt(a.prompt);
    if (!a.system.empty()) {
      auto* m = req.add_messages();
      m->set_role("system");
      m->set_content(a.system);
    }
    for (size_t i = 0; i < a.chat.size(); ++i) {
      auto* m = req.add_messages();
      m->set_role(i % 2 == 0 ? "user" : "assistant");
      m->set_content(a.chat[i]);
    }
    for (const std::string& s : a.stop) req.add_stop(s);
    if (!a.prompt_ids.empty()) {
      for (int32_t id : parse_ids(a.prompt_ids)) req.add_prompt_ids(id);
    }
    const bool as_text = !a.prompt.empty() || !a.chat.empty();
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
          if (as_text) {
            std::cout << m.text() << std::flush;
            return;
          }
          for (int i = 0; i < m.token_ids_size(); ++i) {
            std::cout << m.token_ids(i);
            if (a.logprobs && i < m.logprobs_size())
              std::cout << fmt::format("({:.3f})", m.logprobs(i));
            std::cout << ' ' << std::flush;
          }
        },
        std::chrono::seconds(a.timeout_s));
    std::cout << fmt::format(
        "\n[{}] finish {}: {} prompt + {} generated tokens, ttft {:.1f} ms, total {:.1f} ms{}\n",
        result.request_id, mlaserve::v1::FinishReason_Name(result.finish),
        result.usage.prompt_tokens(), result.usage.completion_tokens(), result.timings.ttft_ms(),
        result.timings.total_ms(),
        result.coordinators.size() > 1
            ? fmt::format(" (resumed on {} coordinators)", result.coordinators.size())
            : "");
  }
  if (a.status) std::cout << format_cluster_status(client.list_workers());
  return 0;
}

struct AdminArgs {
  std::string config_path;
  std::string address;
  std::string worker_id;
  bool finish_in_place = false;
  std::string request_id;
  std::string to_worker;
  bool stop_first = false;
};

// `mlaserve admin drain|undrain|workers`: the control plane, with the shared secret.
AdminClient admin_client(const AdminArgs& a) {
  const DeployConfig d = a.config_path.empty() ? DeployConfig{} : DeployConfig::load(a.config_path);
  const std::string address = a.address.empty() ? d.coordinator.control_address : a.address;
  return AdminClient(address, SharedSecret::load(d.control.secret_file),
                     channel_credentials(d.tls));
}

}  // namespace

void add_serve_commands(CLI::App& app, int& exit_code) {
  auto w = std::make_shared<WorkerArgs>();
  auto* worker = app.add_subcommand(
      "worker",
      "Serve a model as worker groups (under mpirun: N / tp groups), registered with the "
      "coordinators");
  w->deploy.add_to(*worker);
  worker->add_option("--coordinator", w->coordinator,
                     "Coordinators' control-plane addresses, comma-separated (default: "
                     "workers.coordinators, else coordinator.control_address)");
  worker->add_option("--host", w->host,
                     "Address to listen on and advertise (default: from config)");
  worker->add_option("--port-base", w->port_base, "Group g listens on port-base + g");
  worker->add_option("--group", w->group,
                     "Index of this job's first group (one mpirun job per group: job g gets "
                     "--group g)");
  worker->add_option("--drain-timeout", w->drain_timeout_s,
                     "Seconds a SIGTERMed worker gives running requests before they fail over "
                     "(default: workers.drain_timeout_s, 30)");
  worker->add_option("--role", w->role,
                     "prefill, decode or both (default: workers.role, both): prefill groups hand "
                     "each request to a decode group after its first token");
  worker->add_option("--migration-transport", w->migration_transport,
                     "auto or grpc (default: workers.migration_transport, auto): auto moves a "
                     "migrating request's latents over MPI when both groups run in this mpirun "
                     "job, gRPC otherwise");
  worker->add_option("--step-trace", w->step_trace,
                     "Append one JSON line per step (its shape and times) to this file "
                     "(default: workers.step_trace, none)");
  worker->callback([w, worker, &exit_code] { exit_code = run_worker(*w, *worker); });

  auto c = std::make_shared<CoordinatorArgs>();
  auto* coord = app.add_subcommand("coordinator", "Route client requests to worker groups");
  coord->add_option("--config", c->config_path,
                    "Deployment config (YAML): its coordinator, control and tls sections");
  coord->add_option("--address", c->address,
                    "Client-plane listen address (default 127.0.0.1:50051)");
  coord->add_option("--control-address", c->control_address,
                    "Control-plane listen address (default 127.0.0.1:50052)");
  coord->add_option("--routing", c->routing,
                    "least-loaded, round-robin, prefix-affinity or cache-aware");
  coord->add_option("--max-in-flight", c->max_in_flight, "Admission limit");
  coord->add_option("--metrics-port", c->metrics_port,
                    "Prometheus /metrics, /livez and /readyz port (0 = off)");
  coord->add_option("--drain-timeout", c->drain_timeout_s,
                    "Seconds a SIGTERMed coordinator gives open streams (default: "
                    "coordinator.drain_timeout_s, 30)");
  coord->add_option("--http-address", c->http_address,
                    "host:port of the OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/models); needs --tokenizer (default: "
                    "coordinator.http.address; none: off)");
  coord->add_option("--served-model-name", c->served_model_name,
                    "The model id HTTP clients send (default: coordinator.http.model_name, else "
                    "the tokenizer directory's name)");
  coord->add_option("--tokenizer", c->tokenizer,
                    "Model directory whose tokenizer.json turns text prompts into ids and "
                    "generated tokens into text (default: coordinator.tokenizer; none: ids only)");
  coord->callback([c, coord, &exit_code] { exit_code = run_coordinator(*c, *coord); });

  auto k = std::make_shared<ClientArgs>();
  auto* client =
      app.add_subcommand("client", "Stream a generation from a coordinator, or show the cluster");
  client->add_option("--config", k->config_path,
                     "Deployment config: coordinator.address and the tls section");
  client
      ->add_option("--address", k->address,
                   "Coordinator addresses, comma-separated (a broken stream resumes on the next)")
      ->capture_default_str();
  client->add_option("--prompt", k->prompt,
                     "Prompt text (the coordinator's tokenizer encodes it); prints text as it "
                     "comes");
  client->add_option("--chat", k->chat,
                     "A conversation's turns (user, assistant, ..., user; repeat the flag), "
                     "rendered with the model's chat template by the coordinator; prints text as "
                     "it comes");
  client->add_option("--system", k->system, "The conversation's system message (with --chat)");
  client->add_option("--stop", k->stop, "End the generation before this text; repeatable");
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
  client->add_option("--wait-ready", k->wait_ready_s,
                     "Wait up to this many seconds for a live worker");
  client->add_option("--timeout", k->timeout_s, "Deadline of the generation in seconds (0 = none)");
  client->callback([k, client, &exit_code] { exit_code = run_client(*k, *client); });

  auto m = std::make_shared<AdminArgs>();
  auto* admin = app.add_subcommand(
      "admin",
      "Control-plane commands for operators (the shared secret from MLASERVE_CONTROL_SECRET or "
      "control.secret_file)");
  admin->require_subcommand(1);
  admin->add_option("--config", m->config_path,
                    "Deployment config: coordinator.control_address, control and tls sections");
  admin->add_option("--address", m->address,
                    "The coordinator's control-plane address (default: from config, else "
                    "127.0.0.1:50052)");
  auto* drain =
      admin->add_subcommand("drain", "Route no new requests to a worker; it finishes what it runs");
  drain->add_option("worker_id", m->worker_id, "The worker's id (see `admin workers`)")->required();
  drain->add_flag("--finish-in-place", m->finish_in_place,
                  "Let its running requests finish there instead of moving them to other "
                  "workers");
  drain->callback([m, &exit_code] {
    const v1::DrainResponse r = admin_client(*m).drain(m->worker_id, m->finish_in_place);
    std::cout << fmt::format("worker {}: {}\n", m->worker_id,
                             !r.draining()       ? "dead (nothing to drain)"
                             : r.migrating() > 0 ? fmt::format("draining; moving {} running "
                                                               "requests to other workers",
                                                               r.migrating())
                                                 : std::string("draining"));
    exit_code = r.draining() ? 0 : 1;
  });
  auto* migrate = admin->add_subcommand(
      "migrate", "Move a running request, with its latent cache, to another worker");
  migrate->add_option("request_id", m->request_id, "The request's id")->required();
  migrate->add_option("--to", m->to_worker,
                      "The worker to move it to (default: the coordinator picks the live worker "
                      "with the most free pages)");
  migrate->add_flag("--stop-first", m->stop_first,
                    "Stop the request, then copy its whole cache (a blocking stop-and-copy, the "
                    "baseline to compare live migration with)");
  migrate->callback([m, &exit_code] {
    const v1::MigrateResponse r =
        admin_client(*m).migrate(m->request_id, m->to_worker, m->stop_first);
    const v1::MigrationStats& s = r.stats();
    if (r.outcome() == "migrated") {
      std::cout << fmt::format(
          "request {}: migrated from {} to {} over {}: {} tokens, {} bytes in {} chunks, {} "
          "stages, {:.1f} ms; the source stopped for {:.1f} ms\n",
          m->request_id, s.source_worker_id(), s.destination_worker_id(), s.transport(), s.tokens(),
          s.bytes(), s.chunks(), s.stages(), s.duration_ms(), s.stop_ms());
    } else {
      std::cout << fmt::format("request {}: ended on {} before it could move\n", m->request_id,
                               s.source_worker_id());
    }
    exit_code = 0;
  });
  auto* undrain = admin->add_subcommand("undrain", "Let a drained worker take requests again");
  undrain->add_option("worker_id", m->worker_id, "The worker's id")->required();
  undrain->callback([m, &exit_code] {
    const bool alive = admin_client(*m).undrain(m->worker_id);
    std::cout << fmt::format("worker {}: {}\n", m->worker_id,
                             alive ? "takes requests again" : "dead (nothing to undrain)");
    exit_code = alive ? 0 : 1;
  });
  auto* workers = admin->add_subcommand("workers", "List the workers the coordinator knows");
  workers->callback([m, &exit_code] {
    std::cout << format_cluster_status(admin_client(*m).list_workers());
    exit_code = 0;
  });
}

}  // namespace mla::launch
