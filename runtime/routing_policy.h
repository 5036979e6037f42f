// RoutingPolicy: how the coordinator picks a worker group for a new request (the policies
// are described and implemented in rpc/routing.h). It is a deployment setting
// (`coordinator.routing`, `--routing`), so it lives here, below rpc/, where DeployConfig
// can hold it. Stateless; thread-safe.
#pragma once

#include <string_view>

namespace mla {

enum class RoutingPolicy { kLeastLoaded, kRoundRobin, kPrefixAffinity, kCacheAware };

// "least-loaded", "round-robin", "prefix-affinity" or "cache-aware"; anything else throws
// kInvalidArgument naming `field` (where the name came from) and the accepted names.
RoutingPolicy routing_policy_from_string(std::string_view name, std::string_view field = "routing");
const char* routing_policy_name(RoutingPolicy policy);

}  // namespace mla
