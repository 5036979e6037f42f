// Token sampling from one row of fp32 logits: greedy, temperature, top-k, top-p.
//
// The random draw for a token is a pure function of (seed, position), not of a stateful
// generator, so a request that moves to another engine (migration, failover) continues with
// exactly the tokens it would have produced where it started. Stateless; thread-safe.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace mla {

struct SamplingParams {
  float temperature = 0;  // 0 means greedy. Default: 0.
  int32_t top_k = 0;      // keep the top_k most likely tokens; 0 keeps all. Default: 0.
  float top_p = 1;        // keep the smallest most-likely set with this mass. Default: 1.
  uint64_t seed = 0;      // Default: 0.

  // Throws kInvalidArgument naming the bad field as a request spells it
  // ("sampling.top_p: ..."): temperature negative or not finite, top_k negative, top_p
  // outside (0, 1]; with a vocab_size, also top_k above it.
  void validate() const;
  void validate(int64_t vocab_size) const;
};

// Picks a token from logits [vocab_size], which must be free of NaN and +inf and have at
// least one finite value. temperature == 0: argmax, the lowest index winning ties.
// Otherwise: softmax(logits / temperature), restricted to the top_k largest (if top_k > 0),
// renormalised, then restricted to the shortest prefix of the tokens sorted by descending
// probability (ties by ascending index) whose mass reaches top_p, renormalised; the draw
// uniform_for(seed, position) picks a token from that list by inverse CDF.
// Same (logits, params, position) gives the same token in any process. Costs O(vocab_size)
// plus sorting the head of the list that the draw reads. Throws kInvalidArgument for
// invalid params.
int32_t sample_token(const float* logits, int64_t vocab_size, const SamplingParams& params,
                     int64_t position);

// A uniform draw in [0, 1) from a counter-based generator (splitmix64 mixing of seed and
// position): draws for distinct positions or seeds are independent.
double uniform_for(uint64_t seed, int64_t position);

// log softmax(logits)[token] of the raw logits (temperature 1).
float token_logprob(const float* logits, int64_t vocab_size, int32_t token);

// The `n` most likely tokens of the raw logits with their log softmax, most likely first (ties:
// lower id first).
std::vector<std::pair<int32_t, float>> top_logprobs(const float* logits, int64_t vocab_size,
                                                    int32_t n);

}  // namespace mla
