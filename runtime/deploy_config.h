// DeployConfig: the YAML deployment file (configs/*.yaml) that sets up a model and its
// engine. Every field has a default (below); unknown keys are errors so typos don't pass
// silently. Command-line flags override what the file says.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "parallel/shard_plan.h"
#include "runtime/deepseek_model.h"
#include "runtime/engine.h"
#include "runtime/routing_policy.h"

namespace mla {

// "sequence" or "replicate" (the config's and --kv-shard's spelling); anything else throws
// kInvalidArgument naming `field` (where the name came from) and the accepted names.
KvShard kv_shard_from_string(std::string_view name, std::string_view field);

// `parallel:` how worker ranks form tensor-parallel groups.
struct ParallelConfig {
  int32_t tp = 1;                         // `tp`: ranks per group. Default: 1.
  KvShard kv_shard = KvShard::kSequence;  // `kv_shard`: sequence | replicate. Default: sequence.
  int32_t comm_timeout_s = 300;  // `comm_timeout_s`: a collective fails after this. Default: 300.
};

// `coordinator.rebalance:` moving requests off workers short of cache pages (live migration).
// After a heartbeat in which a worker has fewer than `low_free` of its pages free, or
// preempted a request since its previous heartbeat, the coordinator moves the running request
// that would hold the most of its pages until it ends (context plus the tokens it may still
// generate) to the worker with the most free pages, if that one has at least `high_free` of
// its pages free and room for the request; at most one move per worker every `interval_ms`.
struct RebalanceConfig {
  bool enabled = false;        // `enabled`. Default: false.
  double low_free = 0.1;       // `low_free`: fraction of pages. Default: 0.1.
  double high_free = 0.3;      // `high_free`: fraction of pages. Default: 0.3.
  int32_t interval_ms = 1000;  // `interval_ms`. Default: 1000.
};

// `coordinator.http:` the OpenAI-compatible HTTP API (rpc/openai_api.h): POST /v1/completions,
// POST /v1/chat/completions, GET /v1/models. Needs coordinator.tokenizer.
struct HttpConfig {
  std::string address;               // `address`: host:port to listen on; "" = off. Default: off.
  int32_t threads = 2;               // `threads`: the threads serving every connection. Default: 2.
  int64_t max_body_bytes = 4 << 20;  // `max_body_bytes`: larger bodies get 413. Default: 4 MiB.
  // `model_name`: the id clients send as `model` and GET /v1/models lists. Default: the last
  // component of coordinator.tokenizer (the model directory's name).
  std::string model_name;
  // `api_key_file`: a file whose first line is the key clients must send as
  // "Authorization: Bearer KEY"; "" = no key (or the MLASERVE_API_KEY environment variable).
  // Default: none.
  std::string api_key_file;
};

// `coordinator:` the client plane (Generate, Cancel, Health, ListWorkers) and the control
// plane (workers' registration and heartbeats, admin drain), each on its own listener.
struct CoordinatorConfig {
  std::string address = "127.0.0.1:50051";  // `address`: listen address. Default: 127.0.0.1:50051.
  // `control_address`: the control plane's listen address; keep it off networks clients
  // reach. Default: 127.0.0.1:50052.
  std::string control_address = "127.0.0.1:50052";
  int32_t metrics_port = 0;  // `metrics_port`: Prometheus /metrics; 0 = off. Default: 0.
  // `routing`: least-loaded | round-robin | prefix-affinity | cache-aware. Default: least-loaded.
  RoutingPolicy routing = RoutingPolicy::kLeastLoaded;
  int32_t max_in_flight = 4096;         // `max_in_flight`: admission limit. Default: 4096.
  int32_t heartbeat_interval_ms = 500;  // `heartbeat_interval_ms`: worker heartbeats. Default: 500.
  // `forget_dead_after_s`: a dead worker's entry (and its id's binding to its address) is
  // dropped after this long. Default: 60.
  int32_t forget_dead_after_s = 60;
  // `drain_timeout_s`: on SIGTERM the coordinator takes no new requests and gives the open
  // streams this long to finish. Default: 30.
  int32_t drain_timeout_s = 30;
  // `stream_write_timeout_s`: a stream whose client takes no message for this long is
  // cancelled and its admission slot and the worker's pages freed. Default: 30.
  int32_t stream_write_timeout_s = 30;
  // `migrate_on_drain`: a draining worker's running requests move, with their latent caches,
  // to other workers (live migration) instead of finishing there. Default: true.
  bool migrate_on_drain = true;
  RebalanceConfig rebalance;  // `rebalance:`
  // `tokenizer`: a model directory whose tokenizer.json encodes text prompts and decodes the
  // generated text (GenerateRequest.prompt, messages, stop). Default: none (ids only).
  std::string tokenizer;
  HttpConfig http;  // `http:`
};

// `workers:` where each group's leader serves its Worker service.
struct WorkersConfig {
  std::string host =
      "127.0.0.1";  // `host`: address workers listen on and advertise. Default: 127.0.0.1.
  int32_t port_base = 50100;      // `port_base`: group g listens on port_base + g. Default: 50100.
  int32_t metrics_port_base = 0;  // `metrics_port_base`: group g on base + g; 0 = off. Default: 0.
  // `group`: the index of the first group this mpirun job runs (one job per group keeps each
  // group its own failure domain: launch/cluster.sh starts job g with group g). Default: 0.
  int32_t group = 0;
  // `coordinators`: the control addresses of every coordinator the workers register with.
  // Default: empty, meaning coordinator.control_address alone.
  std::vector<std::string> coordinators;
  // `drain_timeout_s`: on SIGTERM a worker takes no new requests and gives the running ones
  // this long to finish; the rest fail over to other groups. Default: 30.
  int32_t drain_timeout_s = 30;
  // `role`: prefill | decode | both. Prefill groups take new requests and hand each, with
  // its cache, to a decode group after its first token (disaggregated prefill/decode);
  // decode groups take requests that way. Default: both.
  std::string role = "both";
  // `migration_transport`: auto | grpc. auto moves a migrating request's latents over MPI
  // when the source and destination groups run in the same mpirun job (and MPI provides
  // MPI_THREAD_MULTIPLE), over gRPC otherwise; grpc always streams them over gRPC. The
  // migration's control is gRPC either way. Default: auto.
  std::string migration_transport = "auto";
  // `step_trace`: a file the group's leader appends one JSON line to per step (its shape and
  // times; WorkerServiceOptions::step_trace); in a job of several groups, group g's goes to
  // FILE.g<g>. Default: empty, none.
  std::string step_trace;
};

// `control:` the shared secret every control-plane and worker call carries. It is read from
// the environment variable MLASERVE_CONTROL_SECRET or from `secret_file`, never from the
// command line (where `ps` shows it).
struct ControlConfig {
  std::string secret_file;  // `secret_file`: a file holding the secret. Default: none.
};

// `tls:` TLS for every gRPC listener and channel (client plane, control plane, workers), off
// when no file is named. Files are PEM.
struct TlsConfig {
  std::string cert_file;  // `cert_file`: this process's certificate chain. Default: none.
  std::string key_file;   // `key_file`: its private key. Default: none.
  std::string ca_file;    // `ca_file`: the CA that signs the peers' certificates. Default: none.
  // `require_client_cert`: servers ask clients for a certificate signed by ca_file (mutual
  // TLS); clients then present cert_file. Default: false.
  bool require_client_cert = false;
  bool enabled() const { return !cert_file.empty() || !ca_file.empty(); }
};

struct DeployConfig {
  std::string model_dir;  // `model`: Hugging Face model directory. Required by workers.
  ModelOptions model;     // `absorb`: naive | factored | premerged | auto. Default: auto.
                          // `device`: cpu | cuda. Default: cpu.
                          // `cuda_graphs`: capture decode steps. Default: true.
                          // `cuda_small_gemm`: products with <= 2 rows and routed experts
                          // at <= 16 slots through the small-row kernels. Default: true.
                          // `cuda_prefetch_weights`: decode prefetches o_proj and the shared
                          // experts into L2 beside the attention. Default: false.
                          // `cuda_fused_attention`: decode at few tokens and short contexts
                          // runs the attention as one kernel. Default: false.
                          // `deterministic`: batch-invariant logits (CPU and GPU). Default: false.
                          // `fp8_weights`: widen | keep, for an fp8 checkpoint's weights
                          // (Fp8Weights). Default: widen.
  // `cache.block_size` (64), `cache.num_pages` (default: 256 with device cpu, 0 with cuda;
  // 0 = from free GPU memory), `cache.memory_fraction` (0.9), `cache.prefix_caching` (false:
  // keep full pages for requests with the same leading tokens, any TP size and layout),
  // `cache.dtype` (auto: fp32 on the CPU, bf16 on the GPU; fp8: FlashMLA's packed fp8 rows,
  // either backend; ModelOptions::cache_dtype),
  // `scheduler.max_batch_tokens` (512), `scheduler.max_running` (64). Read engine_options(),
  // which resolves the default.
  EngineOptions engine = [] {
    EngineOptions e;
    e.num_pages = kPagesByDevice;
    return e;
  }();
  ParallelConfig parallel;
  CoordinatorConfig coordinator;
  WorkersConfig workers;
  ControlConfig control;
  TlsConfig tls;

  // workers.coordinators, or coordinator.control_address when that is empty.
  std::vector<std::string> coordinator_control_addresses() const;

  // engine.num_pages until a config or flag sets it: 256 pages on the CPU, automatic on GPUs.
  static constexpr int32_t kPagesByDevice = -1;
  // The engine's options with the device's default page count applied.
  EngineOptions engine_options() const;

  // Parses a YAML file; relative `model` paths are taken relative to the current directory.
  // Throws kNotFound for a missing file, kInvalidArgument naming the path if it is a
  // directory, kFailedPrecondition if it cannot be read, kInvalidArgument naming the bad key
  // or value. Whether `model` exists is not checked here (a coordinator reads the same file
  // on a machine without the model).
  static DeployConfig load(const std::string& path);
  static DeployConfig parse(const std::string& yaml_text, const std::string& origin);
};

}  // namespace mla
