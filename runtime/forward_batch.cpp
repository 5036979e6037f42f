#include "runtime/forward_batch.h"

#include "kernels/error.h"

namespace mla {

void WorkCounter::add(const WorkCounter& other) {
  weight_flops += other.weight_flops;
  cache_upproj_flops += other.cache_upproj_flops;
  attention_flops += other.attention_flops;
  for (int f = 0; f < kNumAttnForms; ++f) form_chunks[f] += other.form_chunks[f];
  comm += other.comm;
}

BatchLayout BatchLayout::of(const ForwardBatch& batch, const ModelConfig& config,
                            const FormPolicy& policy, WorkCounter& counter) {
  BatchLayout b;
  b.num_tokens = static_cast<int64_t>(batch.tokens.size());
  int64_t rows = 0;
  for (const ForwardSeq& seq : batch.seqs) {
    MLA_CHECK(seq.table != nullptr && seq.num_tokens > 0, "empty sequence in batch");
    MLA_CHECK(seq.start + seq.num_tokens <= seq.table->num_tokens,
              "sequence pages hold {} tokens, step needs {}", seq.table->num_tokens,
              seq.start + seq.num_tokens);
    const AttnForm form = policy.choose(seq.num_tokens, seq.start + seq.num_tokens);
    counter.form_chunks[static_cast<int>(form)]++;
    b.forms.push_back(form);
    b.seq_begin.push_back(rows);
    b.any_latent |= form == AttnForm::kLatent;
    b.any_decompressed |= form == AttnForm::kDecompressed;
    b.all_single_token &= seq.num_tokens == 1;
    rows += seq.num_tokens;
    b.num_logits += seq.want_logits ? 1 : 0;
  }
  MLA_CHECK(rows == b.num_tokens, "batch has {} tokens but its sequences cover {}", b.num_tokens,
            rows);
  for (int32_t tok : batch.tokens) {
    MLA_CHECK(tok >= 0 && tok < config.vocab_size, "token id {} outside vocabulary", tok);
  }
  return b;
}

}  // namespace mla
