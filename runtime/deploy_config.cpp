#include "runtime/deploy_config.h"

#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "kernels/error.h"
#include "runtime/paths.h"

namespace mla {
namespace {

void reject_unknown(const YAML::Node& node, const std::set<std::string>& known,
                    const std::string& where, const std::string& origin) {
  for (const auto& kv : node) {
    const auto key = kv.first.as<std::string>();
    if (!known.contains(key))
      MLA_THROW(kInvalidArgument, "{}: unknown key `{}{}`", origin, where, key);
  }
}

template <typename T>
void read(const YAML::Node& node, const char* key, T& out, const std::string& where,
          const std::string& origin) {
  if (!node[key]) return;
  try {
    out = node[key].as<T>();
  } catch (const YAML::Exception&) {
    MLA_THROW(kInvalidArgument, "{}: `{}{}` has an invalid value", origin, where, key);
  }
}

// A key whose value is one of a few names, parsed by `from_string`, which throws naming the
// field it is given and the accepted names.
template <typename Enum>
void read_enum(const YAML::Node& node, const char* key, Enum& out,
               Enum (*from_string)(std::string_view, std::string_view), const std::string& where,
               const std::string& origin) {
  if (!node[key]) return;
  std::string name;
  read(node, key, name, where, origin);
  out = from_string(name, fmt::format("{}: {}{}", origin, where, key));
}

}  // namespace

KvShard kv_shard_from_string(std::string_view name, std::string_view field) {
  if (name == "sequence") return KvShard::kSequence;
  if (name == "replicate") return KvShard::kReplicate;
  MLA_THROW(kInvalidArgument, "{}: must be sequence or replicate, got `{}`", field, name);
}

DeployConfig DeployConfig::parse(const std::string& yaml_text, const std::string& origin) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    MLA_THROW(kInvalidArgument, "{}: not valid YAML: {}", origin, e.what());
  }
  DeployConfig c;
  if (root.IsNull()) MLA_THROW(kInvalidArgument, "{}: empty config", origin);
  if (!root.IsMap()) MLA_THROW(kInvalidArgument, "{}: top level must be a mapping", origin);
  reject_unknown(root,
                 {"model", "absorb", "device", "cuda_graphs", "cuda_small_gemm",
                  "cuda_prefetch_weights", "cuda_fused_attention", "deterministic", "fp8_weights",
                  "cache", "scheduler", "parallel", "coordinator", "workers", "control", "tls"},
                 "", origin);
  read(root, "model", c.model_dir, "", origin);
  std::string absorb = to_string(c.model.absorb);
  read(root, "absorb", absorb, "", origin);
  c.model.absorb = absorb_mode_from_string(absorb);
  std::string device = to_string(c.model.device);
  read(root, "device", device, "", origin);
  c.model.device = device_from_string(device);
  read(root, "cuda_graphs", c.model.cuda.graphs, "", origin);
  read(root, "cuda_small_gemm", c.model.cuda.small_gemm, "", origin);
  read(root, "cuda_prefetch_weights", c.model.cuda.prefetch_weights, "", origin);
  read(root, "cuda_fused_attention", c.model.cuda.fused_attention, "", origin);
  read(root, "deterministic", c.model.deterministic, "", origin);
  read_enum(root, "fp8_weights", c.model.fp8_weights, fp8_weights_from_string, "", origin);
  if (const auto cache = root["cache"]) {
    reject_unknown(cache, {"block_size", "num_pages", "memory_fraction", "prefix_caching", "dtype"},
                   "cache.", origin);
    read(cache, "block_size", c.engine.block_size, "cache.", origin);
    read_enum(cache, "dtype", c.model.cache_dtype, cache_dtype_from_string, "cache.", origin);
    read(cache, "prefix_caching", c.engine.prefix_caching, "cache.", origin);
    if (cache["num_pages"]) {
      read(cache, "num_pages", c.engine.num_pages, "cache.", origin);
      MLA_REQUIRE(c.engine.num_pages >= 0, "{}: cache.num_pages must be >= 0 (0: automatic)",
                  origin);
    }
    read(cache, "memory_fraction", c.engine.cache_memory_fraction, "cache.", origin);
  }
  if (const auto sched = root["scheduler"]) {
    reject_unknown(sched, {"max_batch_tokens", "max_running"}, "scheduler.", origin);
    read(sched, "max_batch_tokens", c.engine.scheduler.max_batch_tokens, "scheduler.", origin);
    read(sched, "max_running", c.engine.scheduler.max_running, "scheduler.", origin);
  }
  if (const auto par = root["parallel"]) {
    reject_unknown(par, {"tp", "kv_shard", "comm_timeout_s"}, "parallel.", origin);
    read(par, "tp", c.parallel.tp, "parallel.", origin);
    read_enum(par, "kv_shard", c.parallel.kv_shard, kv_shard_from_string, "parallel.", origin);
    read(par, "comm_timeout_s", c.parallel.comm_timeout_s, "parallel.", origin);
  }
  if (const auto co = root["coordinator"]) {
    reject_unknown(co,
                   {"address", "control_address", "metrics_port", "routing", "max_in_flight",
                    "heartbeat_interval_ms", "forget_dead_after_s", "drain_timeout_s",
                    "stream_write_timeout_s", "migrate_on_drain", "rebalance", "tokenizer", "http"},
                   "coordinator.", origin);
    read(co, "address", c.coordinator.address, "coordinator.", origin);
    read(co, "control_address", c.coordinator.control_address, "coordinator.", origin);
    read(co, "forget_dead_after_s", c.coordinator.forget_dead_after_s, "coordinator.", origin);
    read(co, "drain_timeout_s", c.coordinator.drain_timeout_s, "coordinator.", origin);
    read(co, "stream_write_timeout_s", c.coordinator.stream_write_timeout_s, "coordinator.",
         origin);
    read(co, "metrics_port", c.coordinator.metrics_port, "coordinator.", origin);
    read(co, "migrate_on_drain", c.coordinator.migrate_on_drain, "coordinator.", origin);
    read(co, "tokenizer", c.coordinator.tokenizer, "coordinator.", origin);
    read_enum(co, "routing", c.coordinator.routing, routing_policy_from_string, "coordinator.",
              origin);
    read(co, "max_in_flight", c.coordinator.max_in_flight, "coordinator.", origin);
    read(co, "heartbeat_interval_ms", c.coordinator.heartbeat_interval_ms, "coordinator.", origin);
    if (const auto rb = co["rebalance"]) {
      RebalanceConfig& r = c.coordinator.rebalance;
      const char* prefix = "coordinator.rebalance.";
      reject_unknown(rb, {"enabled", "low_free", "high_free", "interval_ms"}, prefix, origin);
      read(rb, "enabled", r.enabled, prefix, origin);
      read(rb, "low_free", r.low_free, prefix, origin);
      read(rb, "high_free", r.high_free, prefix, origin);
      read(rb, "interval_ms", r.interval_ms, prefix, origin);
      MLA_REQUIRE(0 <= r.low_free && r.low_free <= r.high_free && r.high_free <= 1,
                  "{}: coordinator.rebalance needs 0 <= low_free <= high_free <= 1, got {} and {}",
                  origin, r.low_free, r.high_free);
      MLA_REQUIRE(r.interval_ms >= 1, "{}: coordinator.rebalance.interval_ms must be >= 1, got {}",
                  origin, r.interval_ms);
    }
    if (const auto http = co["http"]) {
      HttpConfig& h = c.coordinator.http;
      const char* prefix = "coordinator.http.";
      reject_unknown(http, {"address", "threads", "max_body_bytes", "model_name", "api_key_file"},
                     prefix, origin);
      read(http, "address", h.address, prefix, origin);
      read(http, "threads", h.threads, prefix, origin);
      read(http, "max_body_bytes", h.max_body_bytes, prefix, origin);
      read(http, "model_name", h.model_name, prefix, origin);
      read(http, "api_key_file", h.api_key_file, prefix, origin);
      MLA_REQUIRE(h.threads >= 1 && h.threads <= 256,
                  "{}: coordinator.http.threads must be 1 to 256, got {}", origin, h.threads);
      MLA_REQUIRE(h.max_body_bytes >= 1024,
                  "{}: coordinator.http.max_body_bytes must be >= 1024, got {}", origin,
                  h.max_body_bytes);
    }
  }
  if (const auto wk = root["workers"]) {
    reject_unknown(wk,
                   {"host", "port_base", "metrics_port_base", "group", "coordinators",
                    "drain_timeout_s", "role", "migration_transport", "step_trace"},
                   "workers.", origin);
    read(wk, "coordinators", c.workers.coordinators, "workers.", origin);
    read(wk, "drain_timeout_s", c.workers.drain_timeout_s, "workers.", origin);
    read(wk, "role", c.workers.role, "workers.", origin);
    read(wk, "migration_transport", c.workers.migration_transport, "workers.", origin);
    read(wk, "step_trace", c.workers.step_trace, "workers.", origin);
    read(wk, "host", c.workers.host, "workers.", origin);
    read(wk, "port_base", c.workers.port_base, "workers.", origin);
    read(wk, "metrics_port_base", c.workers.metrics_port_base, "workers.", origin);
    read(wk, "group", c.workers.group, "workers.", origin);
  }
  if (const auto control = root["control"]) {
    reject_unknown(control, {"secret_file"}, "control.", origin);
    read(control, "secret_file", c.control.secret_file, "control.", origin);
  }
  if (const auto tls = root["tls"]) {
    reject_unknown(tls, {"cert_file", "key_file", "ca_file", "require_client_cert"}, "tls.",
                   origin);
    read(tls, "cert_file", c.tls.cert_file, "tls.", origin);
    read(tls, "key_file", c.tls.key_file, "tls.", origin);
    read(tls, "ca_file", c.tls.ca_file, "tls.", origin);
    read(tls, "require_client_cert", c.tls.require_client_cert, "tls.", origin);
  }
  MLA_REQUIRE(c.coordinator.forget_dead_after_s >= 1,
              "{}: coordinator.forget_dead_after_s must be >= 1", origin);
  MLA_REQUIRE(c.coordinator.drain_timeout_s >= 0, "{}: coordinator.drain_timeout_s must be >= 0",
              origin);
  MLA_REQUIRE(c.coordinator.stream_write_timeout_s >= 1,
              "{}: coordinator.stream_write_timeout_s must be >= 1", origin);
  MLA_REQUIRE(c.workers.drain_timeout_s >= 0, "{}: workers.drain_timeout_s must be >= 0", origin);
  MLA_REQUIRE(c.tls.cert_file.empty() == c.tls.key_file.empty(),
              "{}: tls.cert_file and tls.key_file go together", origin);
  MLA_REQUIRE(!c.tls.require_client_cert || (!c.tls.ca_file.empty() && !c.tls.cert_file.empty()),
              "{}: tls.require_client_cert needs tls.ca_file and tls.cert_file", origin);
  MLA_REQUIRE(c.parallel.tp >= 1, "{}: parallel.tp must be >= 1", origin);
  MLA_REQUIRE(c.parallel.comm_timeout_s >= 1, "{}: parallel.comm_timeout_s must be >= 1", origin);
  MLA_REQUIRE(c.coordinator.max_in_flight >= 1, "{}: coordinator.max_in_flight must be >= 1",
              origin);
  MLA_REQUIRE(c.coordinator.heartbeat_interval_ms >= 10,
              "{}: coordinator.heartbeat_interval_ms must be >= 10", origin);
  MLA_REQUIRE(c.workers.port_base > 0 && c.workers.port_base < 65536,
              "{}: workers.port_base must be a TCP port", origin);
  MLA_REQUIRE(c.workers.group >= 0, "{}: workers.group must be >= 0", origin);
  MLA_REQUIRE(c.engine.block_size >= 1, "{}: cache.block_size must be >= 1", origin);
  MLA_REQUIRE(c.engine.cache_memory_fraction > 0 && c.engine.cache_memory_fraction < 1,
              "{}: cache.memory_fraction must be in (0, 1)", origin);
  return c;
}

std::vector<std::string> DeployConfig::coordinator_control_addresses() const {
  if (!workers.coordinators.empty()) return workers.coordinators;
  return {coordinator.control_address};
}

EngineOptions DeployConfig::engine_options() const {
  EngineOptions e = engine;
  if (e.num_pages == kPagesByDevice) e.num_pages = model.device == Device::kCuda ? 0 : 256;
  return e;
}

DeployConfig DeployConfig::load(const std::string& path) {
  // A directory opens as a stream that reads nothing, which would parse as an empty config.
  require_file(path, "config file");
  std::ifstream in(path);
  if (!in) {
    MLA_THROW(kFailedPrecondition, "cannot read config file {}: {}", path, std::strerror(errno));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return parse(ss.str(), path);
}

}  // namespace mla
