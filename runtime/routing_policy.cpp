#include "runtime/routing_policy.h"

#include "kernels/error.h"

namespace mla {

RoutingPolicy routing_policy_from_string(std::string_view name, std::string_view field) {
  if (name == "least-loaded") return RoutingPolicy::kLeastLoaded;
  if (name == "round-robin") return RoutingPolicy::kRoundRobin;
  if (name == "prefix-affinity") return RoutingPolicy::kPrefixAffinity;
  MLA_THROW(kInvalidArgument, "{}: must be least-loaded, round-robin or prefix-affinity, got `{}`",
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
  }
  return "?";
}

}  // namespace mla
