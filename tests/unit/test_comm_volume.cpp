// The collective volumes of a decode step predicted for DeepSeek-V3's real shape (the mpi
// tests check the prediction against the bytes actually moved on the golden models).
#include <gtest/gtest.h>

#include <iostream>
#include <nlohmann/json.hpp>

#include "runtime/deepseek_model.h"

namespace mla {
namespace {

ModelConfig deepseek_v3() {
  return ModelConfig::from_json(nlohmann::json{{"model_type", "deepseek_v3"},
                                               {"vocab_size", 129280},
                                               {"hidden_size", 7168},
                                               {"num_hidden_layers", 61},
                                               {"num_attention_heads", 128},
                                               {"q_lora_rank", 1536},
                                               {"kv_lora_rank", 512},
                                               {"qk_rope_head_dim", 64},
                                               {"qk_nope_head_dim", 128},
                                               {"v_head_dim", 128},
                                               {"intermediate_size", 18432},
                                               {"moe_intermediate_size", 2048},
                                               {"n_routed_experts", 256},
                                               {"n_shared_experts", 1},
                                               {"num_experts_per_tok", 8},
                                               {"n_group", 8},
                                               {"topk_group", 4},
                                               {"first_k_dense_replace", 3}});
}

TEST(CommVolume, DeepseekV3DecodeStepPerLayer) {
  ModelConfig one_layer = deepseek_v3();
  one_layer.num_layers = 1;
  const int64_t T = 128;  // tokens in the step (a decode batch of 128)
  for (int P : {2, 4, 8}) {
    const CommStats sharded = predicted_step_comm(one_layer, P, KvShard::kSequence, T);
    const CommStats replicated = predicted_step_comm(one_layer, P, KvShard::kReplicate, T);
    const auto at = [](const CommStats& s, CommOp op) { return s.bytes[static_cast<int>(op)]; };
    // all-gather of T x H x 576 fp32 values, all-to-all of T x H x (512 + 1), two
    // all-reduces of T x 7168; the replicated baseline has only the all-reduces.
    EXPECT_EQ(at(sharded, CommOp::kAllGather), T * 128 * 576 * 4);
    EXPECT_EQ(at(sharded, CommOp::kAllToAll), T * 128 * 513 * 4);
    EXPECT_EQ(at(sharded, CommOp::kAllReduce), 2 * T * 7168 * 4);
    EXPECT_EQ(at(replicated, CommOp::kAllReduce), 2 * T * 7168 * 4);
    EXPECT_EQ(replicated.bytes[static_cast<int>(CommOp::kAllGather)] +
                  replicated.bytes[static_cast<int>(CommOp::kAllToAll)],
              0);
    // Each rank sends and receives (P - 1) / P of a gathered or exchanged buffer.
    std::cout << fmt::format(
        "V3 layer, T={}, P={}: sharded all_gather {} B, all_to_all {} B, all_reduce {} B "
        "(per-rank wire share {:.3f}); replicated all_reduce {} B\n",
        T, P, at(sharded, CommOp::kAllGather), at(sharded, CommOp::kAllToAll),
        at(sharded, CommOp::kAllReduce), (P - 1.0) / P, at(replicated, CommOp::kAllReduce));
  }
}

TEST(CommVolume, NothingForOneRank) {
  EXPECT_EQ(predicted_step_comm(deepseek_v3(), 1, KvShard::kSequence, 64).total_bytes(), 0);
}

}  // namespace
}  // namespace mla
