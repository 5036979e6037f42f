// Prometheus metrics without an external client library: counters, gauges and fixed-bucket
// histograms kept in a MetricsRegistry, rendered in the text exposition format 0.0.4, and
// served over HTTP (GET /metrics, GET /healthz) by a MetricsServer.
//
// Metric objects are lock-free (atomics) and live as long as their registry; references
// returned by the registry stay valid and may be cached. Everything here is thread-safe.
//
// Standard mlaserve metrics (the structs at the end register them):
//   mlaserve_requests_total{code}                counter    finished Generate calls by gRPC
//                                                            status name ("OK",
//                                                            "INVALID_ARGUMENT", ...)
//   mlaserve_tokens_generated_total              counter    tokens sent to clients
//   mlaserve_ttft_seconds                        histogram  arrival to first token
//   mlaserve_inter_token_latency_seconds         histogram  between consecutive tokens of a
//                                                            request
//   mlaserve_requests_in_flight                  gauge      requests accepted, not finished
//   mlaserve_requests_waiting                    gauge      requests waiting to be scheduled
//   mlaserve_cache_pages_used                    gauge      latent-cache pages in use
//   mlaserve_cache_pages_capacity                gauge      latent-cache pages in all
// and on the coordinator only:
//   mlaserve_prompt_tokens_total                 counter    prompt tokens admitted
//   mlaserve_request_duration_seconds            histogram  arrival to the end of the stream
//   mlaserve_time_per_output_token_seconds       histogram  per request, first to last token
//                                                            over the tokens after the first
//   mlaserve_workers_alive                       gauge      workers alive
//   mlaserve_failovers_total                     counter    requests moved after a failure
//   mlaserve_admission_rejections_total          counter    RESOURCE_EXHAUSTED at admission
//   mlaserve_stream_write_timeouts_total         counter    streams whose client stopped
//                                                            reading
//   mlaserve_migrations_total{outcome}           counter    live migrations: migrated, ended
//                                                            (the request ended first),
//                                                            refused, failed
//   mlaserve_migration_bytes_total               counter    latent bytes moved
//   mlaserve_migration_stop_seconds              histogram  the source's stop-and-copy
//   mlaserve_rebalances_total                    counter    moves queued by rebalancing
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "runtime/prefix_index.h"

namespace httplib {
class Server;
}

namespace mla {

// Label name -> value. Ordered, so one label set has one spelling and renders stably.
using Labels = std::map<std::string, std::string>;

// A monotonically increasing value (events, tokens).
class Counter {
 public:
  // Adds v, which must be >= 0 (kInvalidArgument otherwise).
  void inc(double v = 1.0);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// A value that goes up and down (queue depth, pages in use).
class Gauge {
 public:
  void set(double v) { value_.store(v, std::memory_order_relaxed); }
  void inc(double v = 1.0) { value_.fetch_add(v, std::memory_order_relaxed); }
  void dec(double v = 1.0) { value_.fetch_sub(v, std::memory_order_relaxed); }
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// Counts observations into fixed buckets. Bucket i counts values <= bounds[i] (and above
// bounds[i-1]); one more bucket counts the rest (+Inf). Rendering makes them cumulative.
class Histogram {
 public:
  // bounds: strictly increasing, finite, not empty (kInvalidArgument otherwise).
  explicit Histogram(std::vector<double> bounds);

  void observe(double v);

  const std::vector<double>& bounds() const { return bounds_; }
  // Cumulative counts, one per bound plus the +Inf bucket (whose count is count()).
  std::vector<uint64_t> cumulative_counts() const;
  uint64_t count() const;
  double sum() const { return sum_.load(std::memory_order_relaxed); }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // [bounds_.size() + 1], not cumulative
  std::atomic<double> sum_{0.0};
};

// Owns metric families (a name, its help, its type) and their children (one per label set).
class MetricsRegistry {
 public:
  MetricsRegistry() = default;
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  // Returns the metric for (name, labels), creating it on first use; later calls with the
  // same name and labels return the same object (help is taken from the first call).
  // Throws kInvalidArgument for an invalid metric or label name, for a name already
  // registered with another type, or (histograms) with other bounds. Histograms reserve
  // the label "le".
  Counter& counter(const std::string& name, const std::string& help, const Labels& labels = {});
  Gauge& gauge(const std::string& name, const std::string& help, const Labels& labels = {});
  Histogram& histogram(const std::string& name, const std::string& help,
                       const std::vector<double>& bounds, const Labels& labels = {});

  // The text exposition format (version 0.0.4): families sorted by name, each with its
  // HELP and TYPE lines, children sorted by labels; histograms as name_bucket{le=...}
  // (cumulative, ending with le="+Inf"), name_sum and name_count.
  std::string render() const;

 private:
  enum class Type { kCounter, kGauge, kHistogram };
  struct Family {
    Type type;
    std::string help;
    std::vector<double> bounds;  // histograms only
    std::map<Labels, std::unique_ptr<Counter>> counters;
    std::map<Labels, std::unique_ptr<Gauge>> gauges;
    std::map<Labels, std::unique_ptr<Histogram>> histograms;
  };

  static const char* type_name(Type type);
  Family& family(const std::string& name, const std::string& help, Type type, const Labels& labels);

  mutable std::mutex mutex_;  // guards families_ (not the metric values: those are atomic)
  std::map<std::string, Family> families_;
};

// Serves a registry over HTTP from a background thread: GET /metrics answers render() as
// "text/plain; version=0.0.4"; GET /livez answers 200 while the process runs; GET /readyz (and
// its older name /healthz) answers 200 "ready", or 503 "not ready" when a readiness callback
// is given and returns false; anything else is 404. Thread-safe.
class MetricsServer {
 public:
  // Binds host:port (port 0: any free port) and starts serving before returning. Throws
  // kUnavailable when the address cannot be bound. The registry must outlive the server;
  // `ready`, if set, is called from server threads.
  MetricsServer(const MetricsRegistry& registry, const std::string& host, int port,
                std::function<bool()> ready = {});
  ~MetricsServer();  // stop()
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  int port() const { return port_; }  // the bound port (the chosen one when 0 was asked)
  const std::string& host() const { return host_; }
  // Stops accepting, finishes the requests in progress and joins the thread. Idempotent.
  void stop();

 private:
  std::string host_;
  int port_ = 0;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  std::atomic<bool> listen_returned_{false};
  std::mutex stop_mutex_;  // serialises stop()
};

// Default buckets, in seconds.
std::vector<double> ttft_buckets();                 // 5 ms .. 30 s
std::vector<double> inter_token_latency_buckets();  // 1 ms .. ~1.3 s

// Request-level metrics, kept by the coordinator and by each worker. `labels` (e.g.
// {{"worker", id}}) are added to every metric.
struct RequestMetrics {
  explicit RequestMetrics(MetricsRegistry& registry, const Labels& labels = {});

  // mlaserve_requests_total{code=<code>}: call once per finished Generate, with the gRPC
  // status name ("OK", "RESOURCE_EXHAUSTED", ...).
  Counter& requests_total(std::string_view code);

  Counter& tokens_generated;               // mlaserve_tokens_generated_total
  Histogram& ttft_seconds;                 // mlaserve_ttft_seconds
  Histogram& inter_token_latency_seconds;  // mlaserve_inter_token_latency_seconds
  Gauge& in_flight;                        // mlaserve_requests_in_flight
  Gauge& queue_depth;                      // mlaserve_requests_waiting

 private:
  MetricsRegistry& registry_;
  Labels labels_;
};

// A worker group's latent cache, as its scheduler sees it.
struct CacheMetrics {
  explicit CacheMetrics(MetricsRegistry& registry, const Labels& labels = {});

  Gauge& pages_used;   // mlaserve_cache_pages_used
  Gauge& pages_total;  // mlaserve_cache_pages_capacity
  // Prefix caching (cache.prefix_caching): tokens looked up in full pages and found
  // (hit rate = hit / lookup), pages kept for reuse now, and pages evicted.
  Counter& prefix_lookup_tokens;  // mlaserve_prefix_cache_lookup_tokens_total
  Counter& prefix_hit_tokens;     // mlaserve_prefix_cache_hit_tokens_total
  Counter& prefix_evicted_pages;  // mlaserve_prefix_cache_evicted_pages_total
  Gauge& prefix_kept_pages;       // mlaserve_prefix_cache_kept_pages
  // Brings the prefix counters up to the index's cumulative `stats` (what changed since the
  // last call).
  void update_prefix(const PrefixStats& stats, int32_t kept);

 private:
  PrefixStats seen_;
};

std::vector<double> request_duration_buckets();  // 10 ms .. 5 min

// The coordinator's: RequestMetrics and its routing and admission.
struct CoordinatorMetrics : RequestMetrics {
  explicit CoordinatorMetrics(MetricsRegistry& registry);

  Counter& prompt_tokens;                    // mlaserve_prompt_tokens_total
  Histogram& request_duration_seconds;       // mlaserve_request_duration_seconds
  Histogram& time_per_output_token_seconds;  // mlaserve_time_per_output_token_seconds
  Gauge& workers_alive;                      // mlaserve_workers_alive
  Counter& failovers;                        // mlaserve_failovers_total
  Counter& admission_rejections;             // mlaserve_admission_rejections_total
  Counter& write_timeouts;                   // mlaserve_stream_write_timeouts_total
  // mlaserve_migrations_total{outcome=migrated|ended|refused|failed}: one per Migrate.
  Counter& migrations_total(std::string_view outcome);
  Counter& migration_bytes;           // mlaserve_migration_bytes_total: latent bytes moved
  Histogram& migration_stop_seconds;  // mlaserve_migration_stop_seconds: the source's final stage
  Counter& rebalances_total;          // mlaserve_rebalances_total: moves rebalancing queued

 private:
  MetricsRegistry& registry_;
};

}  // namespace mla
