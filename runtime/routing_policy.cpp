#include "runtime/routing_policy.h"

#include "kernels/error.h"

namespace mla {

RoutingPolicy routing_policy_from_string(std::string_view name, std::string_view field) {
  if (name == "least-loaded") return RoutingPolicy::kLeastLoaded;
  if (name == "round-robin") return RoutingPolicy::kRoundRobin;
  if (name == "prefix-affinity") return RoutingPolicy::kPrefixAffinity;
  if (name == "cache-aware") return RoutingPolicy::kCacheAware;
  MLA_THROW(kInvalidArgument,
            "{}: must be least-loaded, round-robin, prefix-affinity or cache-aware, got `{}`",
            field, name);
}

const char* routing_policy_name(RoutingPolicy policy) {
  switch (policy) {
    case RoutingPolicy::kLeastLoaded:
      return "least-loaded";
    case RoutingPolicy::kRoundRobin:
      return "round-robin";
    case RoutingPolicy::kPrefixAffinity:
      return "prefix-affinity";
    case RoutingPolicy::kCacheAware:
      return "cache-aware";
  }
  return "?";
}

}  // namespace mla
