// Drives one request through a live migration in stages between two engines, as a migrator
// would (Engine's copy_latents / begin_import / write_import / export_request /
// finish_import), and checks what must hold whatever the backend: the source keeps running
// during the copy and frees every page, the destination recomputes nothing and frees every
// page at the end.
#pragma once

#include <gtest/gtest.h>

#include <vector>

#include "runtime/engine.h"

namespace mla::test {

// Adds `request` to `a`, runs `first_steps` steps, copies its latents to `b`, runs two more
// steps at `a` while the copy is in flight, copies what they computed, stops the request for
// the tail and finishes it on `b`. Returns every token the request produced, on both engines.
// Both engines must be idle.
inline std::vector<int32_t> migrate_in_stages(Engine& a, Engine& b, const Request& request,
                                              int first_steps) {
  // Free pages, and with prefix caching the kept ones no request holds.
  const int32_t a_pages = a.cache().num_available(), b_pages = b.cache().num_available();
  std::vector<int32_t> tokens;
  auto run = [&](Engine& e, RequestId id) {
    for (const StepOutput& o : e.step()) {
      EXPECT_EQ(o.id, id);
      if (o.token >= 0) tokens.push_back(o.token);
    }
  };
  const RequestId id = a.add_request(request);
  for (int i = 0; i < first_steps; ++i) run(a, id);
  int32_t end = 0;
  const Tensor first = a.copy_latents(id, 0, &end);
  EXPECT_GT(end, 0);
  const int64_t h = b.begin_import(end);
  b.write_import(h, 0, first);
  for (int i = 0; i < 2; ++i) run(a, id);  // it keeps running during the copy
  int32_t end2 = 0;
  b.write_import(h, end, a.copy_latents(id, end, &end2));
  EXPECT_EQ(end2, end + 2);
  const RequestSnapshot tail = a.export_request(id, end2);  // the stop-and-copy
  EXPECT_EQ(tail.latents.dim(1), 0) << "nothing ran since the last copy";
  EXPECT_EQ(a.cache().num_available(), a_pages) << "the source frees its pages";
  const RequestId id_b = b.finish_import(h, tail);
  EXPECT_EQ(b.pending_imports(), 0u);
  while (b.has_work()) run(b, id_b);
  EXPECT_EQ(b.stats().computed_tokens, b.stats().steps) << "the destination recomputed context";
  EXPECT_EQ(b.cache().num_available(), b_pages);
  return tokens;
}

// The tokens `request` produces alone on an engine of `model` with `options` equal those it
// produces migrated in stages (migrate_in_stages, after `first_steps` steps) between two more.
template <typename ModelPtr>
void expect_migration_keeps_tokens(const ModelPtr& model, const EngineOptions& options,
                                   const Request& request, int first_steps = 2) {
  std::vector<int32_t> want;
  {
    Engine alone(model, options);
    alone.add_request(request);
    while (alone.has_work()) {
      for (const StepOutput& o : alone.step()) want.push_back(o.token);
    }
  }
  Engine a(model, options), b(model, options);
  EXPECT_EQ(migrate_in_stages(a, b, request, first_steps), want);
}

}  // namespace mla::test
