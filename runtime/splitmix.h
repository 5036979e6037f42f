// splitmix64's output function: a fast, well-mixed 64-bit hash of a 64-bit value, used where a
// counter or a chain needs reproducible bits (the sampler's draw for (seed, position), prefix
// page keys, the router's page records, make-tiny's fast fill). Stateless; thread-safe.
#pragma once

#include <cstdint>

namespace mla {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace mla
