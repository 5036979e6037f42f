#include "runtime/tiny_checkpoint.h"

#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "kernels/error.h"
#include "kernels/tensor.h"
#include "runtime/safetensors.h"
#include "runtime/splitmix.h"
#include "runtime/tokenizer.h"

namespace mla {
namespace {

ModelConfig tiny_base() {
  ModelConfig c;
  c.vocab_size = 512;
  c.hidden_size = 64;
  c.num_layers = 3;
  c.num_heads = 4;
  c.kv_lora_rank = 32;
  c.qk_rope_head_dim = 16;
  c.qk_nope_head_dim = 16;
  c.v_head_dim = 16;
  c.intermediate_size = 128;
  c.moe_intermediate_size = 32;
  c.first_k_dense_replace = 1;
  c.max_position_embeddings = 2048;
  c.eos_token_ids = {1};
  return c;
}

// Every tensor of the checkpoint with its shape, in Hugging Face naming; of the routed experts
// only those rank 0 of `expert_ranks` ranks loads.
std::vector<std::pair<std::string, Shape>> checkpoint_shapes(const ModelConfig& c,
                                                             int64_t expert_ranks) {
  const int64_t D = c.hidden_size, H = c.num_heads;
  std::vector<std::pair<std::string, Shape>> out = {
      {"model.embed_tokens.weight", {c.vocab_size, D}},
      {"model.norm.weight", {D}},
      {"lm_head.weight", {c.vocab_size, D}}};
  auto mlp = [&](const std::string& p, int64_t width) {
    out.push_back({p + "gate_proj.weight", {width, D}});
    out.push_back({p + "up_proj.weight", {width, D}});
    out.push_back({p + "down_proj.weight", {D, width}});
  };
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    out.push_back({p + "input_layernorm.weight", {D}});
    out.push_back({p + "post_attention_layernorm.weight", {D}});
    const std::string a = p + "self_attn.";
    if (c.q_lora_rank > 0) {
      out.push_back({a + "q_a_proj.weight", {c.q_lora_rank, D}});
      out.push_back({a + "q_a_layernorm.weight", {c.q_lora_rank}});
      out.push_back({a + "q_b_proj.weight", {H * c.qk_head_dim(), c.q_lora_rank}});
    } else {
      out.push_back({a + "q_proj.weight", {H * c.qk_head_dim(), D}});
    }
    out.push_back({a + "kv_a_proj_with_mqa.weight", {c.latent_width(), D}});
    out.push_back({a + "kv_a_layernorm.weight", {c.kv_lora_rank}});
    out.push_back(
        {a + "kv_b_proj.weight", {H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}});
    out.push_back({a + "o_proj.weight", {D, H * c.v_head_dim}});
    const std::string m = p + "mlp.";
    if (!c.is_moe_layer(l)) {
      mlp(m, c.intermediate_size);
      continue;
    }
    out.push_back({m + "gate.weight", {c.n_routed_experts, D}});
    if (c.gate == GateKind::kSigmoidNoauxTc) {
      out.push_back({m + "gate.e_score_correction_bias", {c.n_routed_experts}});
    }
    for (int64_t e = 0; e < c.n_routed_experts / expert_ranks; ++e) {
      mlp(fmt::format("{}experts.{}.", m, e), c.moe_intermediate_size);
    }
    if (c.n_shared_experts > 0)
      mlp(m + "shared_experts.", c.n_shared_experts * c.moe_intermediate_size);
  }
  return out;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Tensors of at least this many values (the full-size presets' weights) are filled, narrowed
// and quantised on all cores: serially, DeepSeek-V2-Lite's 15.7B values or V3's fp8 experts
// take minutes.
constexpr int64_t kParallelElements = int64_t{1} << 20;

// fn(begin, end) over [0, n) cut into one range per core, each on its own thread, when
// `values` (the work the n items stand for) reaches kParallelElements; else fn(0, n).
template <typename Fn>
void parallel_ranges(int64_t n, int64_t values, Fn&& fn) {
  const unsigned threads =
      values < kParallelElements ? 1u : std::max(1u, std::thread::hardware_concurrency());
  if (threads == 1) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
  std::vector<std::thread> pool;
  for (unsigned w = 0; w < threads; ++w) {
    const int64_t begin = std::min(n, w * chunk), end = std::min(n, (w + 1) * chunk);
    pool.emplace_back([&fn, begin, end] { fn(begin, end); });
  }
  for (auto& t : pool) t.join();
}

Tensor narrow_to(const Tensor& f32, DType dtype) {
  Tensor out = Tensor::empty(f32.shape(), dtype);
  const float* src = f32.f32();
  auto* dst = out.data<uint16_t>();
  parallel_ranges(f32.numel(), f32.numel(), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      dst[i] = dtype == DType::kBF16 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
    }
  });
  return out;
}

// Block-wise fp8 e4m3 quantisation: per 128x128 block, scale = amax / 448.
std::pair<Tensor, Tensor> quantize_fp8(const Tensor& w, int block) {
  const int64_t rows = w.dim(0), cols = w.dim(1);
  const int64_t br = (rows + block - 1) / block, bc = (cols + block - 1) / block;
  Tensor q = Tensor::empty({rows, cols}, DType::kF8E4M3);
  Tensor scale_inv = Tensor::empty({br, bc});
  const float* src = w.f32();
  uint8_t* codes = q.data<uint8_t>();
  float* scales = scale_inv.f32();
  // Blocks are independent: rows of blocks go to the threads.
  parallel_ranges(br, rows * cols, [&](int64_t bi_begin, int64_t bi_end) {
    for (int64_t bi = bi_begin; bi < bi_end; ++bi) {
      const int64_t i_end = std::min(rows, (bi + 1) * block);
      for (int64_t bj = 0; bj < bc; ++bj) {
        const int64_t j_end = std::min(cols, (bj + 1) * block);
        float amax = 0.0f;
        for (int64_t i = bi * block; i < i_end; ++i)
          for (int64_t j = bj * block; j < j_end; ++j)
            amax = std::max(amax, std::fabs(src[i * cols + j]));
        const float scale = amax > 0 ? amax / 448.0f : 1.0f;
        scales[bi * bc + bj] = scale;
        for (int64_t i = bi * block; i < i_end; ++i)
          for (int64_t j = bj * block; j < j_end; ++j)
            codes[i * cols + j] = f32_to_fp8e4m3(src[i * cols + j] / scale);
      }
    }
  });
  return {q, scale_inv};
}

}  // namespace

std::vector<std::string> model_preset_names() {
  return {"v3", "v3-full", "v2-lite", "v2-lite-full"};
}

ModelConfig model_preset(const std::string& name) {
  ModelConfig c = tiny_base();
  if (name == "v3-full") {  // DeepSeek-V3's published config (61 layers; cut with --layers)
    c.family = ModelFamily::kDeepseekV3;
    c.vocab_size = 129280;
    c.hidden_size = 7168;
    c.num_layers = 61;
    c.num_heads = 128;
    c.q_lora_rank = 1536;
    c.kv_lora_rank = 512;
    c.qk_rope_head_dim = 64;
    c.qk_nope_head_dim = 128;
    c.v_head_dim = 128;
    c.intermediate_size = 18432;
    c.moe_intermediate_size = 2048;
    c.n_routed_experts = 256;
    c.n_shared_experts = 1;
    c.num_experts_per_tok = 8;
    c.n_group = 8;
    c.topk_group = 4;
    c.first_k_dense_replace = 3;
    c.norm_topk_prob = true;
    c.routed_scaling_factor = 2.5;
    c.gate = GateKind::kSigmoidNoauxTc;
    c.max_position_embeddings = 163840;
    c.eos_token_ids = {1};
    c.rope = {RopeType::kYarn, 10000.0, 40.0, 4096, 32.0, 1.0, 1.0, 1.0, 0.0, true};
  } else if (name == "v3") {
    c.family = ModelFamily::kDeepseekV3;
    c.q_lora_rank = 48;
    c.n_routed_experts = 16;
    c.n_shared_experts = 1;
    c.num_experts_per_tok = 4;
    c.n_group = 4;
    c.topk_group = 2;
    c.norm_topk_prob = true;
    c.routed_scaling_factor = 2.5;
    c.gate = GateKind::kSigmoidNoauxTc;
    c.rope = {RopeType::kYarn, 10000.0, 4.0, 256, 32.0, 1.0, 1.0, 1.0, 0.0, true};
  } else if (name == "v2-lite" || name == "v2-lite-full") {
    c.family = ModelFamily::kDeepseekV2;
    c.n_routed_experts = 8;
    c.n_shared_experts = 2;
    c.num_experts_per_tok = 2;
    c.gate = GateKind::kSoftmaxGreedy;
    c.num_layers = 2;
    c.eos_token_ids = {2};
    c.rope = {RopeType::kYarn, 10000.0, 4.0, 256, 32.0, 1.0, 0.707, 0.707, 0.0, true};
    if (name == "v2-lite-full") {  // DeepSeek-V2-Lite's published config
      c.vocab_size = 102400;
      c.hidden_size = 2048;
      c.num_layers = 27;
      c.num_heads = 16;
      c.kv_lora_rank = 512;
      c.qk_rope_head_dim = 64;
      c.qk_nope_head_dim = 128;
      c.v_head_dim = 128;
      c.intermediate_size = 10944;
      c.moe_intermediate_size = 1408;
      c.n_routed_experts = 64;
      c.num_experts_per_tok = 6;
      c.max_position_embeddings = 163840;
      c.eos_token_ids = {100001};
      c.rope = {RopeType::kYarn, 10000.0, 40.0, 4096, 32.0, 1.0, 0.707, 0.707, 0.0, true};
    }
  } else {
    MLA_THROW(kInvalidArgument, "unknown preset `{}` (known: {})", name,
              fmt::join(model_preset_names(), ", "));
  }
  c.validate();
  return c;
}

namespace {

// Approximately normal values (the sum of four 16-bit uniforms, rescaled: mean 0, variance 1,
// bounded by +-3.46) from a counter-based hash, on all cores; for tensors of at least
// kParallelElements, where the serial normal generator is too slow. Deterministic in `seed`.
void fast_fill(float* p, int64_t n, float mean, float std_dev, uint64_t seed) {
  parallel_ranges(n, n, [=](int64_t begin, int64_t end) {
    // Sum of 4 uniforms on [0, 65535]: mean 131070, sd 65536 * sqrt(4 / 12).
    constexpr float kCenter = 4 * 65535.0f / 2, kScale = 1.0f / (65536.0f * 1.1547005f);
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t h = splitmix64(seed ^ static_cast<uint64_t>(i));
      const float sum = static_cast<float>((h & 0xffff) + ((h >> 16) & 0xffff) +
                                           ((h >> 32) & 0xffff) + (h >> 48));
      p[i] = mean + std_dev * (sum - kCenter) * kScale;
    }
  });
}

}  // namespace

void write_random_checkpoint(const ModelConfig& config, const std::string& dir, uint64_t seed,
                             DType dtype, int64_t expert_ranks) {
  MLA_REQUIRE(dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF8E4M3,
              "make-tiny writes F32, BF16 or F8_E4M3, not {}", dtype_name(dtype));
  MLA_REQUIRE(expert_ranks >= 1 && config.n_routed_experts % expert_ranks == 0,
              "--for-emulated-tp {}: must divide the {} routed experts", expert_ranks,
              config.n_routed_experts);
  std::error_code ec;
  if (std::filesystem::exists(dir, ec) && !std::filesystem::is_directory(dir, ec)) {
    MLA_THROW(kInvalidArgument, "output directory {} exists and is not a directory", dir);
  }
  std::filesystem::create_directories(dir, ec);
  if (ec) MLA_THROW(kFailedPrecondition, "cannot create directory {}: {}", dir, ec.message());
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& [name, shape] : checkpoint_shapes(config, expert_ranks)) {
    Tensor t = Tensor::empty(shape);
    float* p = t.f32();
    const bool is_norm = ends_with(name, "norm.weight");
    const bool is_bias = ends_with(name, "e_score_correction_bias");
    const bool is_embed = name == "model.embed_tokens.weight";
    const float std_dev = is_norm    ? 0.1f
                          : is_bias  ? 0.05f
                          : is_embed ? 1.0f
                                     : 1.0f / std::sqrt(static_cast<float>(shape.back()));
    const float mean = is_norm ? 1.0f : 0.0f;
    if (t.numel() < kParallelElements) {
      for (int64_t i = 0; i < t.numel(); ++i) p[i] = mean + std_dev * normal(rng);
    } else {
      fast_fill(p, t.numel(), mean, std_dev, rng());
    }

    const bool linear = shape.size() == 2 && !is_embed && name != "lm_head.weight" &&
                        !ends_with(name, "mlp.gate.weight");
    if (dtype == DType::kF8E4M3 && linear) {
      auto [q, scale_inv] = quantize_fp8(t, config.fp8_block[0]);
      tensors.emplace_back(name, q);
      tensors.emplace_back(name + "_scale_inv", scale_inv);
    } else if (dtype != DType::kF32 && !is_bias) {
      tensors.emplace_back(name, narrow_to(t, DType::kBF16));
    } else {
      tensors.emplace_back(name, t);
    }
  }
  write_safetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}});

  nlohmann::json j = config.to_json();
  j["torch_dtype"] = dtype == DType::kF32 ? "float32" : "bfloat16";
  if (dtype == DType::kF8E4M3) {
    j["quantization_config"] = {{"quant_method", "fp8"},
                                {"fmt", "e4m3"},
                                {"activation_scheme", "dynamic"},
                                {"weight_block_size", {config.fp8_block[0], config.fp8_block[1]}}};
  }
  std::ofstream(dir + "/config.json") << j.dump(2) << "\n";
  const bool tokenizer = write_byte_level_tokenizer(config, dir);
  spdlog::info("wrote random {} checkpoint ({} tensors, {}{}{}) to {}", config.family_name(),
               tensors.size(), dtype_name(dtype), tokenizer ? ", byte-level tokenizer" : "",
               expert_ranks > 1 ? fmt::format(", routed experts of rank 0 of {} only", expert_ranks)
                                : std::string(),
               dir);
}

// DeepSeek-V3's chat template as its checkpoints publish it (tokenizer_config.json), so that a
// tiny model talks chat like the real one (tests/data/tokenizers/v3 holds the same).
constexpr const char* kDeepSeekV3ChatTemplate =
    R"({% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{)"
    R"(% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, )"
    R"(system_prompt='', is_first_sp=true) %}{%- for message in messages %}{%- if message['r)"
    R"(ole'] == 'system' %}{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_promp)"
    R"(t + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}{% set ns.system_)"
    R"(prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}{%- endif %}{%-)"
    R"( endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if messa)"
    R"(ge['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content')"
    R"(]}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none %)"
    R"(}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.i)"
    R"(s_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + ')"
    R"(<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function'])"
    R"(['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%-)"
    R"( else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['functi)"
    R"(on']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```')"
    R"( + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- en)"
    R"(dfor %}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is no)"
    R"(t none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁o)"
    R"(f▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{{'<｜Assistant｜>' + message[')"
    R"(content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == )"
    R"('tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁b)"
    R"(egin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns)"
    R"(.is_output_first = false %}{%- else %}{{'\n<｜tool▁output▁begin｜>' + message['content')"
    R"(] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{)"
    R"({'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %})"
    R"({{'<｜Assistant｜>'}}{% endif %})";

bool write_byte_level_tokenizer(const ModelConfig& config, const std::string& dir) {
  using json = nlohmann::json;
  const int32_t eos = config.eos_token_ids.empty() ? 1 : config.eos_token_ids[0];
  const int32_t bos = eos >= 1 ? eos - 1 : eos + 1;  // DeepSeek's layout: bos just before eos
  if (config.vocab_size < 258 || eos >= config.vocab_size) return false;
  const std::string bos_text = "<｜begin▁of▁sentence｜>", eos_text = "<｜end▁of▁sentence｜>";
  // GPT-2's byte-level characters, on the first ids not taken by bos and eos.
  json vocab = json::object();
  int32_t id = 0;
  auto next_id = [&] {
    while (id == bos || id == eos) ++id;
    return id++;
  };
  for (int b = 0; b < 256; ++b)
    vocab[Tokenizer::byte_level_char(static_cast<uint8_t>(b))] = next_id();
  json added = json::array();
  auto add = [&](int32_t token_id, const std::string& text) {
    added.push_back({{"id", token_id},
                     {"content", text},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  };
  add(bos, bos_text);
  add(eos, eos_text);
  for (const char* role : {"<｜User｜>", "<｜Assistant｜>"}) {
    const int32_t role_id = next_id();
    if (role_id < config.vocab_size) add(role_id, role);
  }
  // DeepSeek-V3's pre-tokenizer.
  json splits = json::array();
  for (const char* pattern :
       {R"(\p{N}{1,3})", "[一-龥\u3040-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?"
        "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"}) {
    splits.push_back({{"type", "Split"},
                      {"pattern", {{"Regex", pattern}}},
                      {"behavior", "Isolated"},
                      {"invert", false}});
  }
  splits.push_back({{"type", "ByteLevel"},
                    {"add_prefix_space", false},
                    {"trim_offsets", true},
                    {"use_regex", false}});
  const json bos_item = {{"SpecialToken", {{"id", bos_text}, {"type_id", 0}}}};
  json t = {{"version", "1.0"},
            {"truncation", nullptr},
            {"padding", nullptr},
            {"added_tokens", added},
            {"normalizer", nullptr},
            {"pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", splits}}},
            {"post_processor",
             {{"type", "TemplateProcessing"},
              {"single", {bos_item, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
              {"pair",
               {bos_item,
                {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                bos_item,
                {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
              {"special_tokens",
               {{bos_text, {{"id", bos_text}, {"ids", {bos}}, {"tokens", {bos_text}}}}}}}},
            {"decoder",
             {{"type", "ByteLevel"},
              {"add_prefix_space", true},
              {"trim_offsets", true},
              {"use_regex", true}}},
            {"model",
             {{"type", "BPE"},
              {"dropout", nullptr},
              {"unk_token", nullptr},
              {"continuing_subword_prefix", nullptr},
              {"end_of_word_suffix", nullptr},
              {"fuse_unk", false},
              {"byte_fallback", false},
              {"ignore_merges", false},
              {"vocab", vocab},
              {"merges", json::array()}}}};
  std::ofstream(dir + "/tokenizer.json") << t.dump(2) << "\n";
  const json tokenizer_config = {{"add_bos_token", true},
                                 {"add_eos_token", false},
                                 {"bos_token", bos_text},
                                 {"eos_token", eos_text},
                                 {"model_max_length", config.max_position_embeddings},
                                 {"tokenizer_class", "LlamaTokenizerFast"},
                                 {"chat_template", kDeepSeekV3ChatTemplate}};
  std::ofstream(dir + "/tokenizer_config.json") << tokenizer_config.dump(2) << "\n";
  return true;
}

}  // namespace mla
