#include "runtime/cuda_model.h"

#include <cuda_bf16.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <map>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/cpu/moe.h"
#include "kernels/cuda/add_rms_norm.h"
#include "kernels/cuda/argmax.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/gather_rows.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/latent_attention.h"
#include "kernels/cuda/latent_store.h"
#include "kernels/cuda/lse_merge.h"
#include "kernels/cuda/mha_prefill.h"
#include "kernels/cuda/mla_decode.h"
#include "kernels/cuda/mla_prefill.h"
#include "kernels/cuda/moe_experts.h"
#include "kernels/cuda/moe_gate.h"
#include "kernels/cuda/rope_bf16.h"
#include "kernels/cuda/sampling.h"
#include "kernels/cuda/silu_mul.h"
#include "runtime/checkpoint.h"
#include "runtime/weight_loader.h"

namespace mla {
namespace {

using bf16 = __nv_bfloat16;
constexpr float kLoraNormEps = 1e-6f;     // q_a_layernorm and kv_a_layernorm: fixed in HF
constexpr int32_t kKernelBlockSize = 64;  // the MLA kernels' page size

struct DevMlp {
  Tensor gate_up;  // bf16 [2 * width, D]
  Tensor down;     // bf16 [D, width]
  int64_t width = 0;
};

struct DevLayer {
  Tensor input_norm, post_attn_norm;      // f32 [D]
  Tensor q_a, q_b, kv_a, kv_b, o;         // bf16, shapes as in AttentionWeights
  Tensor q_a_norm, kv_a_norm;             // f32
  Tensor q_absorbed, q_rope, o_absorbed;  // bf16, premerged form only
  bool is_moe = false;
  DevMlp mlp;                    // dense layers
  Tensor gate, correction_bias;  // f32 [E, D], [E]
  Tensor experts_gate_up;        // bf16 [E_local, 2I, D]
  Tensor experts_down;           // bf16 [E_local, D, I]
  int64_t first_expert = 0, local_experts = 0;
  DevMlp shared;
};

DevMlp upload_mlp(const MlpWeights& m) {
  return DevMlp{cuda::upload_bf16(m.gate_up), cuda::upload_bf16(m.down), m.width};
}

// Host tensors of equal shape stacked into one device bf16 tensor [n, *shape].
Tensor upload_stacked(const std::vector<const Tensor*>& parts) {
  Shape shape = parts.front()->shape();
  const int64_t each = parts.front()->numel();
  shape.insert(shape.begin(), static_cast<int64_t>(parts.size()));
  Tensor host = Tensor::empty(shape, DType::kBF16);
  auto* dst = host.data<uint16_t>();
  for (const Tensor* t : parts) {
    const float* src = t->f32();
    for (int64_t i = 0; i < each; ++i) *dst++ = f32_to_bf16(src[i]);
  }
  return cuda::upload_bf16(host);
}

template <typename T>
T* ptr(const Tensor& t) {
  return t.defined() ? static_cast<T*>(t.raw()) : nullptr;
}

int64_t round_up_pow2(int64_t n, int64_t floor) {
  int64_t b = floor;
  while (b < n) b *= 2;
  return b;
}

}  // namespace

// Everything a step needs on the device: weights, scratch buffers sized for a token
// capacity, the packed step metadata, cuBLAS, graphs.
struct CudaModel::Impl {
  // --- set at load ---
  const ModelConfig* c = nullptr;
  const ShardPlan* shard = nullptr;
  const FormPolicy* forms = nullptr;
  bool use_graphs = true;
  float scale = 0, rope_factor = 0;
  int num_sms = 0;
  int device = 0;  // where everything below lives; entry points make it current
  cudaStream_t stream = nullptr;
  std::unique_ptr<cuda::Blas> blas;
  Tensor embed, final_norm, lm_head, inv_freq;
  std::vector<DevLayer> layers;
  int64_t weight_bytes = 0;
  int64_t max_width = 0;  // widest dense / shared MLP on this rank

  // --- scratch, sized for cap_tokens tokens and cap_seqs sequences ---
  int64_t cap_tokens = 0, cap_seqs = 0;
  Tensor x, delta, xn, xn32, qa32, qn, kv32, q, qrot, q_lat, q_all, q_ord, o_att, lse_att, o_lat,
      o_v;
  Tensor a2a_send, a2a_recv, lse_send, lse_recv;
  Tensor gate_up, act, router_logits, topk_ids, topk_weights, moe_ws;
  Tensor decode_ws, prefill_ws, x_last, logits, sampled, logprobs, sample_params, sort_ws;
  Tensor context, context_mine, context_all, up;  // decompressed form, grown on demand
  // Packed int32 step metadata: pinned host staging and its device copy.
  int32_t* meta_host = nullptr;
  Tensor meta_dev;
  int64_t meta_cap = 0;

  // --- graphs ---
  // A captured decode step, and (tensor parallel) the collectives it holds, which replays
  // count again because the communicator only sees them once, at capture.
  enum Section { kAttention, kCollectives };
  using TimedSection = std::tuple<Section, cudaEvent_t, cudaEvent_t>;
  struct Graph {
    cudaGraphExec_t exec = nullptr;
    CommStats comm;
    // Profiled graphs: their event record nodes (events owned here) and the sections.
    std::vector<cudaEvent_t> events;
    std::vector<TimedSection> timed;
  };
  // (batch bucket, table width bucket, profiled).
  using GraphKey = std::tuple<int64_t, int64_t, bool>;
  // Captured kernels hold the cache pool's address and geometry and the communicator's NCCL
  // handle: the graphs belong to one cache and one communicator (their ids; 0 = none).
  std::map<GraphKey, Graph> graphs;
  // Tensor parallel: shapes run once without capture (NCCL connects lazily on first use).
  // Kept when graphs are dropped for moved buffers (the connections stay), so every rank of
  // a group takes the same path for a shape even when only one of them re-captures.
  std::set<GraphKey> warmed;
  uint64_t graph_cache = 0, graph_comm = 0;
  int64_t captured = 0, replays = 0;

  // --- profiling (CudaModel::set_profiling) ---
  bool profiling = false;
  std::vector<cudaEvent_t> events;  // a pool for uncaptured steps, reused every step
  size_t next_event = 0;
  std::vector<TimedSection> timed;  // this step's sections
  // While capturing a profiled graph: its events (recorded as event record nodes).
  std::vector<cudaEvent_t>* capture_events = nullptr;
  CudaModel::StepProfile profile;

  cudaEvent_t record_event() {
    if (capture_events != nullptr) {
      cudaEvent_t e;
      MLA_CUDA_CHECK(cudaEventCreate(&e));
      capture_events->push_back(e);
      MLA_CUDA_CHECK(cudaEventRecordWithFlags(e, stream, cudaEventRecordExternal));
      return e;
    }
    if (next_event == events.size()) {
      cudaEvent_t e;
      MLA_CUDA_CHECK(cudaEventCreate(&e));
      events.push_back(e);
    }
    cudaEvent_t e = events[next_event++];
    MLA_CUDA_CHECK(cudaEventRecord(e, stream));
    return e;
  }
  // Adds the finished step's sections to `profile` (the stream must have drained).
  void collect_profile() {
    if (!profiling) return;
    for (const auto& [section, begin, end] : timed) {
      float ms = 0;
      MLA_CUDA_CHECK(cudaEventElapsedTime(&ms, begin, end));
      (section == kAttention ? profile.attention_ms : profile.collective_ms) += ms;
    }
    profile.steps++;
    timed.clear();
    next_event = 0;
  }

  ~Impl() {
    drop_graphs();
    for (cudaEvent_t e : events) cudaEventDestroy(e);
    if (meta_host != nullptr) cudaFreeHost(meta_host);
    blas.reset();
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  void drop_graphs() {
    for (auto& [key, g] : graphs) {
      cudaGraphExecDestroy(g.exec);
      for (cudaEvent_t e : g.events) cudaEventDestroy(e);
    }
    graphs.clear();
    timed.clear();  // may name events of the graphs just destroyed
  }

  void reserve(int64_t tokens, int64_t seqs);
  void reserve_meta(int64_t ints);
  void ensure_context(int64_t keys, int64_t cap_keys);
};

void CudaModel::Impl::reserve(int64_t tokens, int64_t seqs) {
  if (tokens <= cap_tokens && seqs <= cap_seqs) return;
  // Buffers move: graphs that captured the old addresses are stale.
  drop_graphs();
  const int64_t T = std::max(tokens, cap_tokens), S = std::max(seqs, cap_seqs);
  const int64_t D = c->hidden_size, Hl = shard->local_heads(), H = c->num_heads,
                P = shard->tp_size(), dc = c->kv_lora_rank, dq = c->latent_width(),
                dqk = c->qk_head_dim(), dv = c->v_head_dim, dr = c->qk_rope_head_dim;
  const bool sharded = P > 1 && shard->kv_shard() == KvShard::kSequence;
  const int64_t Ha = sharded ? H : Hl;
  auto f32 = [](Shape s) { return cuda::device_empty(std::move(s), DType::kF32); };
  auto b16 = [](Shape s) { return cuda::device_empty(std::move(s), DType::kBF16); };
  x = f32({T, D});
  delta = f32({T, D});
  xn = b16({T, D});
  xn32 = f32({T, D});
  if (c->q_lora_rank > 0) {
    qa32 = f32({T, c->q_lora_rank});
    qn = b16({T, c->q_lora_rank});
  }
  kv32 = f32({T, dq});
  q = b16({T, Hl * dqk});
  qrot = b16({T, Hl * dr});
  q_lat = b16({T, Hl * dq});
  if (sharded) {
    q_all = b16({P * T, Hl * dq});  // the all-gather's [P, T, Hl, 576]
    q_ord = b16({T, H * dq});       // reordered [T, H, 576]
    a2a_send = b16({P * T, Hl * dc});
    a2a_recv = b16({P * T, Hl * dc});
    lse_send = f32({P * T, Hl});
    lse_recv = f32({P * T, Hl});
  }
  if (sharded) o_att = b16({T, Ha * dc});  // else attention writes o_lat directly
  lse_att = f32({T, Ha});
  o_lat = b16({T, Hl * dc});
  o_v = b16({T, Hl * dv});
  gate_up = f32({T, 2 * std::max<int64_t>(max_width, 1)});
  act = b16({T, std::max<int64_t>(max_width, 1)});
  if (c->n_routed_experts > 0) {
    const int64_t E = c->n_routed_experts, K = c->num_experts_per_tok, El = E / shard->tp_size();
    router_logits = f32({T, E});
    topk_ids = cuda::device_empty({T, K}, DType::kI32);
    topk_weights = f32({T, K});
    moe_ws = cuda::device_empty({static_cast<int64_t>(cuda::moe_experts_workspace_bytes(
                                    T, K, El, D, c->moe_intermediate_size))},
                                DType::kU8);
  }
  decode_ws =
      cuda::device_empty({static_cast<int64_t>(cuda::mla_decode_workspace_bytes(
                             static_cast<int32_t>(S), 1, static_cast<int32_t>(Ha), num_sms))},
                         DType::kU8);
  x_last = b16({S, D});
  logits = f32({S, c->vocab_size});
  sampled = cuda::device_empty({S}, DType::kI32);
  logprobs = f32({S});
  sample_params =
      cuda::device_empty({static_cast<int64_t>(cuda::sampling_params_bytes(S))}, DType::kU8);
  sort_ws = cuda::device_empty(
      {static_cast<int64_t>(cuda::sampling_workspace_bytes(S, c->vocab_size))}, DType::kU8);
  cap_tokens = T;
  cap_seqs = S;
}

void CudaModel::Impl::reserve_meta(int64_t ints) {
  if (ints <= meta_cap) return;
  drop_graphs();
  const int64_t n = std::max(ints, 2 * meta_cap);
  if (meta_host != nullptr) MLA_CUDA_CHECK(cudaFreeHost(meta_host));
  MLA_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&meta_host), n * sizeof(int32_t),
                               cudaHostAllocDefault));
  meta_dev = cuda::device_empty({n}, DType::kI32);
  meta_cap = n;
}

void CudaModel::Impl::ensure_context(int64_t keys, int64_t cap_keys) {
  const int64_t dq = c->latent_width(), Hl = shard->local_heads(),
                dkv = c->qk_nope_head_dim + c->v_head_dim, P = shard->tp_size();
  if (!context.defined() || context.dim(0) < keys) {
    context = cuda::device_empty({keys, dq}, DType::kBF16);
    up = cuda::device_empty({keys, Hl * dkv}, DType::kBF16);
  }
  if (P > 1 && (!context_all.defined() || context_all.dim(0) < P * cap_keys)) {
    context_mine = cuda::device_empty({cap_keys, dq}, DType::kBF16);
    context_all = cuda::device_empty({P * cap_keys, dq}, DType::kBF16);
  }
}

CudaModel::CudaModel(ModelConfig config, const ModelOptions& options, ShardPlan shard)
    : Model(std::move(config), options, shard), impl_(std::make_unique<Impl>()) {}

CudaModel::~CudaModel() {
  // Free everything on the model's device; a destructor must not throw, so errors are let be.
  int previous = 0;
  const bool known = cudaGetDevice(&previous) == cudaSuccess;
  cudaSetDevice(impl_->device);
  impl_.reset();
  if (known) cudaSetDevice(previous);
}

std::shared_ptr<CudaModel> CudaModel::load(const std::string& model_dir,
                                           const ModelOptions& options) {
  MLA_REQUIRE(cuda::device_count() > 0, "--device cuda: no CUDA device is visible");
  ModelConfig config = ModelConfig::load(model_dir);
  const ShardPlan shard = plan_for(config, options);
  // The form policy weighs FLOPs against weight bytes: left at the CPU default, use the
  // GPU's balance (bf16 weights; an H100 does ~300 bf16 FLOPs per byte of HBM traffic).
  ModelOptions gpu = options;
  if (gpu.cost.flops_per_byte == CostModel{}.flops_per_byte &&
      gpu.cost.weight_bytes_per_element == CostModel{}.weight_bytes_per_element) {
    gpu.cost.flops_per_byte = 300;
    gpu.cost.weight_bytes_per_element = 2;
  }
  std::shared_ptr<CudaModel> model(new CudaModel(std::move(config), gpu, shard));
  Impl& m = *model->impl_;
  const ModelConfig& c = model->config_;
  m.c = &model->config_;
  m.shard = &model->shard_;
  m.forms = &model->forms_;
  m.use_graphs = options.cuda_graphs;
  m.scale = static_cast<float>(c.softmax_scale());
  m.rope_factor = c.rope_attention_factor();
  m.device = cuda::current_device();
  m.num_sms = cuda::num_sms();
  MLA_CUDA_CHECK(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking));
  m.blas = std::make_unique<cuda::Blas>(m.stream,
                                        cuda::BlasOptions{.small_gemm = options.cuda_small_gemm});

  Checkpoint ckpt = Checkpoint::open(model_dir, c.fp8_block);
  ckpt.set_progress(options.show_progress);
  WeightLoader loader(ckpt, c, shard);
  const Tensor embed = loader.embed();
  m.embed = cuda::upload_bf16(embed);
  m.final_norm = cuda::upload_f32(loader.final_norm());
  const Tensor head = loader.lm_head(embed);
  m.lm_head = head.raw() == embed.raw() ? m.embed : cuda::upload_bf16(head);
  m.inv_freq = cuda::upload_f32(
      Tensor::from_vector({static_cast<int64_t>(c.qk_rope_head_dim / 2)}, c.rope_inv_freq()));
  m.layers.resize(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    LayerWeights lw = loader.layer(l);
    if (model->forms_.needs_premerged()) build_premerged(c, shard.local_heads(), lw.attn);
    DevLayer& d = m.layers[l];
    d.input_norm = cuda::upload_f32(lw.input_norm);
    d.post_attn_norm = cuda::upload_f32(lw.post_attn_norm);
    const AttentionWeights& a = lw.attn;
    if (a.q_a.defined()) {
      d.q_a = cuda::upload_bf16(a.q_a);
      d.q_a_norm = cuda::upload_f32(a.q_a_norm);
    }
    d.q_b = cuda::upload_bf16(a.q_b);
    d.kv_a = cuda::upload_bf16(a.kv_a);
    d.kv_a_norm = cuda::upload_f32(a.kv_a_norm);
    d.kv_b = cuda::upload_bf16(a.kv_b);
    d.o = cuda::upload_bf16(a.o);
    if (a.q_absorbed.defined()) {
      d.q_absorbed = cuda::upload_bf16(a.q_absorbed);
      d.q_rope = cuda::upload_bf16(a.q_rope);
      d.o_absorbed = cuda::upload_bf16(a.o_absorbed);
    }
    d.is_moe = lw.is_moe;
    if (!lw.is_moe) {
      d.mlp = upload_mlp(lw.mlp);
      m.max_width = std::max(m.max_width, d.mlp.width);
      continue;
    }
    d.gate = cuda::upload_f32(lw.moe.gate);
    if (lw.moe.correction_bias.defined())
      d.correction_bias = cuda::upload_f32(lw.moe.correction_bias);
    std::vector<const Tensor*> gu, down;
    for (const MlpWeights& e : lw.moe.experts) {
      gu.push_back(&e.gate_up);
      down.push_back(&e.down);
    }
    d.experts_gate_up = upload_stacked(gu);
    d.experts_down = upload_stacked(down);
    d.first_expert = lw.moe.first_expert;
    d.local_experts = static_cast<int64_t>(lw.moe.experts.size());
    if (lw.moe.shared.gate_up.defined()) {
      d.shared = upload_mlp(lw.moe.shared);
      m.max_width = std::max(m.max_width, d.shared.width);
    }
  }
  ckpt.finish_progress();
  auto bytes = [](const Tensor& t) { return t.defined() ? static_cast<int64_t>(t.nbytes()) : 0; };
  m.weight_bytes = bytes(m.embed) + bytes(m.final_norm) +
                   (m.lm_head.raw() == m.embed.raw() ? 0 : bytes(m.lm_head));
  for (const DevLayer& d : m.layers) {
    for (const Tensor* t : {&d.input_norm,
                            &d.post_attn_norm,
                            &d.q_a,
                            &d.q_b,
                            &d.kv_a,
                            &d.kv_b,
                            &d.o,
                            &d.q_a_norm,
                            &d.kv_a_norm,
                            &d.q_absorbed,
                            &d.q_rope,
                            &d.o_absorbed,
                            &d.mlp.gate_up,
                            &d.mlp.down,
                            &d.gate,
                            &d.correction_bias,
                            &d.experts_gate_up,
                            &d.experts_down,
                            &d.shared.gate_up,
                            &d.shared.down}) {
      m.weight_bytes += bytes(*t);
    }
  }
  model->log_loaded(options, "cuda bf16");
  spdlog::info("{:.2f} GiB of weights on the GPU", m.weight_bytes / double(1 << 30));
  return model;
}

int64_t CudaModel::weight_bytes() const { return impl_->weight_bytes; }
void CudaModel::set_profiling(bool on) const {
  impl_->profiling = on;
  impl_->timed.clear();
  impl_->next_event = 0;
}

CudaModel::StepProfile CudaModel::profile() const { return impl_->profile; }

void CudaModel::reset_profile() const { impl_->profile = {}; }

int CudaModel::cuda_device() const { return impl_->device; }

int64_t CudaModel::graphs_captured() const { return impl_->captured; }
int64_t CudaModel::graph_replays() const { return impl_->replays; }

int32_t CudaModel::auto_num_pages(int32_t block_size, double memory_fraction) const {
  MLA_REQUIRE(memory_fraction > 0 && memory_fraction < 1,
              "cache memory fraction must be in (0, 1), got {}", memory_fraction);
  const cuda::DeviceGuard on_device(impl_->device);
  impl_->reserve(kMaxStepTokens, 256);
  const cuda::MemoryInfo mem = cuda::memory_info();
  const int64_t page_bytes = int64_t{block_size} * config_.num_layers * config_.latent_width() * 2;
  const auto pages =
      static_cast<int64_t>(static_cast<double>(mem.free) * memory_fraction) / page_bytes;
  MLA_REQUIRE(pages >= 1, "no room for a cache page: {} bytes free, a page takes {}", mem.free,
              page_bytes);
  const auto n = static_cast<int32_t>(std::min<int64_t>(pages, INT32_MAX));
  spdlog::info(
      "latent cache: {} pages of {} tokens = {:.2f} GiB ({} of {:.2f} GiB free), {} "
      "tokens",
      n, block_size, n * double(page_bytes) / (1 << 30), memory_fraction,
      mem.free / double(1 << 30), int64_t{n} * block_size);
  return n;
}

namespace {

// The host side of one step: sizes, per-sequence forms, and the offsets of each section
// of the packed metadata.
struct StepPlan {
  int64_t T = 0;  // tokens run (padded to the bucket in graph steps)
  int64_t S = 0;  // sequences (padded likewise)
  int64_t real_T = 0, real_S = 0;
  int64_t n_logits = 0;  // rows of logits (padded to S in graph steps)
  int64_t stride = 0;    // block-table row width
  bool pure_decode = false;
  bool tuned = false;  // d_c 512, d_r 64, pages of 64: the tuned MLA kernels apply
  bool any_full_q = false, any_latent = false, any_decompressed = false;
  std::vector<AttnForm> forms;
  std::vector<int64_t> seq_begin;
  // Offsets (in int32 words) of the metadata sections.
  int64_t o_tokens = 0, o_pos = 0, o_slot_page = 0, o_slot_off = 0, o_num_keys = 0, o_token_seq = 0,
          o_logit_rows = 0, o_table = 0, o_cu = 0, total = 0;
  // Decompressed-form sequences: where their context row lists start in the metadata (the
  // local rows, then under a sharded cache the reorder of the gathered rows), and how many
  // local rows (padded to the largest rank's share when sharded).
  std::vector<int64_t> ctx_offset, ctx_local;
};

// A step's work, enqueued on the model's stream. Kept out of the header: it is the body
// of forward() and of the captured graphs.
class CudaStep {
 public:
  // `ordered`: comm enqueues its collectives on the model's stream (no host syncs).
  CudaStep(CudaModel::Impl& m, const ForwardBatch& batch, const StepPlan& plan, LatentCache& cache,
           Communicator* comm, bool ordered)
      : m_(m),
        c_(*m.c),
        batch_(batch),
        plan_(plan),
        cache_(cache),
        comm_(comm),
        ordered_(ordered) {}

  void enqueue();

 private:
  const int32_t* meta(int64_t offset) const { return m_.meta_dev.data<int32_t>() + offset; }
  void attention(int64_t l, const DevLayer& d, const bf16* q_in, int64_t qin);
  void latent_attention(int64_t l, const bf16* q_local);
  void decompressed(int64_t l, const DevLayer& d);
  void ffn(const DevLayer& d);
  void mlp(const DevMlp& w, const bf16* x, float* out);
  void all_reduce(float* data, int64_t n);
  void sync_for_comm();

  // Times a section of the step with events on the model's stream while profiling.
  class Timed {
   public:
    Timed(CudaModel::Impl& m, CudaModel::Impl::Section section)
        : m_(m.profiling ? &m : nullptr), section_(section) {
      if (m_ != nullptr) begin_ = m_->record_event();
    }
    ~Timed() noexcept(false) {
      if (m_ != nullptr && std::uncaught_exceptions() == 0) {
        m_->timed.emplace_back(section_, begin_, m_->record_event());
      }
    }
    Timed(const Timed&) = delete;
    Timed& operator=(const Timed&) = delete;

   private:
    CudaModel::Impl* m_;
    CudaModel::Impl::Section section_;
    cudaEvent_t begin_ = nullptr;
  };
  Timed time_collective() { return Timed(m_, CudaModel::Impl::kCollectives); }

  CudaModel::Impl& m_;
  const ModelConfig& c_;
  const ForwardBatch& batch_;
  const StepPlan& plan_;
  LatentCache& cache_;
  Communicator* comm_;
  bool ordered_;
};

// A blocking communicator runs on its own stream: the model's work must be done first.
void CudaStep::sync_for_comm() {
  if (!ordered_) MLA_CUDA_CHECK(cudaStreamSynchronize(m_.stream));
}

void CudaStep::all_reduce(float* data, int64_t n) {
  if (comm_ == nullptr) return;
  sync_for_comm();
  auto timed = time_collective();
  comm_->all_reduce_sum(data, n);
}

void CudaStep::enqueue() {
  const int64_t T = plan_.T, D = c_.hidden_size;
  const cudaStream_t s = m_.stream;
  cuda::embedding_bf16(
      {ptr<bf16>(m_.embed), meta(plan_.o_tokens), ptr<float>(m_.x), T, c_.vocab_size, D}, s);
  const float eps = static_cast<float>(c_.rms_norm_eps);
  for (int64_t l = 0; l < c_.num_layers; ++l) {
    const DevLayer& d = m_.layers[l];
    // x += delta (the previous layer's FFN), xn = RMSNorm(x).
    cuda::add_rms_norm({ptr<float>(m_.x), l == 0 ? nullptr : ptr<float>(m_.delta),
                        ptr<float>(d.input_norm), ptr<bf16>(m_.xn), nullptr, T, D, D, D, eps},
                       s);
    const bf16* q_in = ptr<bf16>(m_.xn);
    int64_t qin = D;
    if (c_.q_lora_rank > 0) {
      cuda::linear(*m_.blas, m_.xn.raw(), T, D, d.q_a.raw(), c_.q_lora_rank, m_.qa32.raw(),
                   DType::kF32);
      cuda::add_rms_norm({ptr<float>(m_.qa32), nullptr, ptr<float>(d.q_a_norm), ptr<bf16>(m_.qn),
                          nullptr, T, c_.q_lora_rank, c_.q_lora_rank, c_.q_lora_rank, kLoraNormEps},
                         s);
      q_in = ptr<bf16>(m_.qn);
      qin = c_.q_lora_rank;
    }
    attention(l, d, q_in, qin);
    all_reduce(ptr<float>(m_.delta), T * D);
    cuda::add_rms_norm(
        {ptr<float>(m_.x), ptr<float>(m_.delta), ptr<float>(d.post_attn_norm), ptr<bf16>(m_.xn),
         d.is_moe ? ptr<float>(m_.xn32) : nullptr, T, D, D, D, eps},
        s);
    ffn(d);
    all_reduce(ptr<float>(m_.delta), T * D);
  }
  // Final norm on every row, then only the rows whose logits are wanted go through the head.
  cuda::add_rms_norm({ptr<float>(m_.x), ptr<float>(m_.delta), ptr<float>(m_.final_norm),
                      ptr<bf16>(m_.xn), nullptr, T, D, D, D, eps},
                     s);
  if (plan_.n_logits == 0) return;
  cuda::gather_rows(
      {m_.xn.raw(), meta(plan_.o_logit_rows), m_.x_last.raw(), plan_.n_logits, D * 2, D * 2, D * 2},
      s);
  cuda::linear(*m_.blas, m_.x_last.raw(), plan_.n_logits, D, m_.lm_head.raw(), c_.vocab_size,
               m_.logits.raw(), DType::kF32);
}

void CudaStep::attention(int64_t l, const DevLayer& d, const bf16* q_in, int64_t qin) {
  const int64_t T = plan_.T, D = c_.hidden_size, Hl = m_.shard->local_heads(), dc = c_.kv_lora_rank,
                dr = c_.qk_rope_head_dim, dn = c_.qk_nope_head_dim, dv = c_.v_head_dim,
                dqk = c_.qk_head_dim(), dq = c_.latent_width();
  const cudaStream_t s = m_.stream;
  const auto& geo = cache_.geometry();

  // The new tokens' latents: c = RMSNorm(kv[:d_c]), k_r = RoPE(kv[d_c:]) into the pages
  // this rank stores.
  cuda::linear(*m_.blas, m_.xn.raw(), T, D, d.kv_a.raw(), dq, m_.kv32.raw(), DType::kF32);
  cuda::latent_store(
      {ptr<float>(m_.kv32), dq, ptr<float>(d.kv_a_norm), kLoraNormEps, meta(plan_.o_pos),
       ptr<float>(m_.inv_freq), m_.rope_factor, c_.rope_interleave, meta(plan_.o_slot_page),
       meta(plan_.o_slot_off), cache_.pool_storage().data<bf16>(), static_cast<int32_t>(l),
       geo.num_layers, geo.block_size, static_cast<int32_t>(dc), static_cast<int32_t>(dr), T},
      s);

  const bool premerged = m_.forms->needs_premerged();
  bf16* q = ptr<bf16>(m_.q);
  bf16* q_lat = ptr<bf16>(m_.q_lat);
  if (plan_.any_full_q || (plan_.any_latent && !premerged)) {
    // q: [T, Hl, d_n + d_r], its rotary part rotated in place.
    cuda::linear(*m_.blas, q_in, T, qin, d.q_b.raw(), Hl * dqk, q, DType::kBF16);
    cuda::rope_bf16({q + dn, q + dn, meta(plan_.o_pos), ptr<float>(m_.inv_freq), T, Hl, dr,
                     Hl * dqk, dqk, Hl * dqk, dqk, m_.rope_factor, c_.rope_interleave},
                    s);
  }
  if (plan_.any_latent) {
    if (premerged) {
      // q~[t, h] = W_Q'[h] q_in[t]: one product per head into the [T, Hl, 576] layout.
      cuda::GemmParams g{q_in, d.q_absorbed.raw(), q_lat, T, dc, qin, qin, qin, Hl * dq};
      g.c_type = DType::kBF16;
      g.batch = Hl;
      g.stride_b = dc * qin;
      g.b_constant = true;  // a weight
      g.stride_c = dq;
      cuda::gemm(*m_.blas, g);
      cuda::linear(*m_.blas, q_in, T, qin, d.q_rope.raw(), Hl * dr, m_.qrot.raw(), DType::kBF16);
      cuda::rope_bf16({ptr<bf16>(m_.qrot), q_lat + dc, meta(plan_.o_pos), ptr<float>(m_.inv_freq),
                       T, Hl, dr, Hl * dr, dr, Hl * dq, dq, m_.rope_factor, c_.rope_interleave},
                      s);
    } else {
      // q~[t, h] = W_UK[h]^T q_nope[t, h]: W_UK[h] is the [d_n, d_c] row block of kv_b.
      cuda::GemmParams g{q, d.kv_b.raw(), q_lat, T, dc, dn, Hl * dqk, dc, Hl * dq};
      g.b_nk = false;
      g.c_type = DType::kBF16;
      g.batch = Hl;
      g.stride_a = dqk;
      g.stride_b = (dn + dv) * dc;
      g.b_constant = true;  // a weight
      g.stride_c = dq;
      cuda::gemm(*m_.blas, g);
      MLA_CUDA_CHECK(cudaMemcpy2DAsync(q_lat + dc, dq * 2, q + dn, dqk * 2, dr * 2, T * Hl,
                                       cudaMemcpyDeviceToDevice, s));
    }
    Timed timed(m_, CudaModel::Impl::kAttention);
    latent_attention(l, q_lat);
  }

  bf16* o_v = ptr<bf16>(m_.o_v);
  float* out = ptr<float>(m_.delta);
  if (plan_.any_latent && !premerged) {
    // o[t, h] = W_UV[h] o~[t, h]; rows of decompressed-form tokens hold o~ = 0.
    cuda::GemmParams g{m_.o_lat.raw(), d.kv_b.raw(), o_v, T, dv, dc, Hl * dc, dc, Hl * dv};
    g.b = ptr<bf16>(d.kv_b) + dn * dc;
    g.c_type = DType::kBF16;
    g.batch = Hl;
    g.stride_a = dc;
    g.stride_b = (dn + dv) * dc;
    g.b_constant = true;  // a weight
    g.stride_c = dv;
    cuda::gemm(*m_.blas, g);
  } else if (plan_.any_decompressed) {
    MLA_CUDA_CHECK(cudaMemsetAsync(o_v, 0, T * Hl * dv * 2, s));
  }
  if (plan_.any_decompressed) decompressed(l, d);
  const bool o_from_v = plan_.any_decompressed || (plan_.any_latent && !premerged);
  if (plan_.any_latent && premerged) {
    cuda::linear(*m_.blas, m_.o_lat.raw(), T, Hl * dc, d.o_absorbed.raw(), D, out, DType::kF32);
  }
  if (o_from_v) {
    cuda::linear(*m_.blas, o_v, T, Hl * dv, d.o.raw(), D, out, DType::kF32,
                 plan_.any_latent && premerged ? 1.0f : 0.0f);
  }
}

void CudaStep::latent_attention(int64_t l, const bf16* q_local) {
  const int64_t T = plan_.T, Hl = m_.shard->local_heads(), P = m_.shard->tp_size(),
                dc = c_.kv_lora_rank, dq = c_.latent_width();
  const cudaStream_t s = m_.stream;
  const bool sharded = P > 1 && !cache_.holds_every_page();
  const int64_t Ha = sharded ? Hl * P : Hl;
  const bf16* q_att = q_local;
  if (sharded) {
    // All-gather the absorbed queries as [P, T, Hl, 576], then lay them out [T, P * Hl, 576]
    // (bf16 pairs travel as floats: the collectives only move bytes).
    sync_for_comm();
    auto timed = time_collective();
    comm_->all_gather(reinterpret_cast<const float*>(q_local), T * Hl * dq / 2,
                      ptr<float>(m_.q_all));
    bf16* q_ord = ptr<bf16>(m_.q_ord);
    for (int64_t r = 0; r < P; ++r) {
      MLA_CUDA_CHECK(cudaMemcpy2DAsync(q_ord + r * Hl * dq, Ha * dq * 2,
                                       ptr<bf16>(m_.q_all) + r * T * Hl * dq, Hl * dq * 2,
                                       Hl * dq * 2, T, cudaMemcpyDeviceToDevice, s));
    }
    q_att = q_ord;
  }
  const auto& geo = cache_.geometry();
  bf16* o_att = sharded ? ptr<bf16>(m_.o_att) : ptr<bf16>(m_.o_lat);
  float* lse = ptr<float>(m_.lse_att);
  // The three attention kernels share these fields (same names in each Params struct).
  auto common = [&](auto& p) {
    p.q = q_att;
    p.pool = cache_.pool_storage().data<bf16>();
    p.layer = static_cast<int32_t>(l);
    p.num_layers = geo.num_layers;
    p.block_table = meta(plan_.o_table);
    p.table_stride = static_cast<int32_t>(plan_.stride);
    p.num_keys = meta(plan_.o_num_keys);
    p.heads = static_cast<int32_t>(Ha);
    p.scale = m_.scale;
    p.out = o_att;
    p.lse = lse;
  };
  if (!plan_.tuned) {
    cuda::LatentAttentionParams p{};
    common(p);
    p.block_size = geo.block_size;
    p.d_c = static_cast<int32_t>(dc);
    p.d_r = static_cast<int32_t>(c_.qk_rope_head_dim);
    p.token_seq = meta(plan_.o_token_seq);
    p.tokens = static_cast<int32_t>(T);
    cuda::latent_attention(p, s);
  } else if (plan_.pure_decode) {
    cuda::MlaDecodeParams p{};
    common(p);
    p.batch = static_cast<int32_t>(plan_.S);
    p.s_q = 1;
    p.num_sms = m_.num_sms;
    // Every layer of the step has the same batch, heads and key counts: the first layer's
    // split plan serves them all (decode_ws is only touched by mla_decode).
    p.reuse_plan = l > 0;
    cuda::mla_decode(p, m_.decode_ws.raw(), s);
  } else {
    cuda::MlaPrefillParams p{};
    common(p);
    p.token_seq = meta(plan_.o_token_seq);
    p.tokens = static_cast<int32_t>(T);
    cuda::mla_prefill(p, m_.prefill_ws.raw(), s);
  }
  if (!sharded) return;
  // Every rank attended all heads over its own pages. Send head block r (partial o~ and
  // LSE) to rank r and merge what comes back by LSE.
  bf16* send = ptr<bf16>(m_.a2a_send);
  float* lse_send = ptr<float>(m_.lse_send);
  for (int64_t r = 0; r < P; ++r) {
    MLA_CUDA_CHECK(cudaMemcpy2DAsync(send + r * T * Hl * dc, Hl * dc * 2, o_att + r * Hl * dc,
                                     Ha * dc * 2, Hl * dc * 2, T, cudaMemcpyDeviceToDevice, s));
    MLA_CUDA_CHECK(cudaMemcpy2DAsync(lse_send + r * T * Hl, Hl * 4, lse + r * Hl, Ha * 4, Hl * 4, T,
                                     cudaMemcpyDeviceToDevice, s));
  }
  sync_for_comm();
  {
    auto timed = time_collective();
    comm_->all_to_all(reinterpret_cast<const float*>(send), T * Hl * dc / 2,
                      ptr<float>(m_.a2a_recv));
    comm_->all_to_all(lse_send, T * Hl, ptr<float>(m_.lse_recv));
  }
  cuda::lse_merge({ptr<bf16>(m_.a2a_recv), ptr<float>(m_.lse_recv), static_cast<int32_t>(P), T * Hl,
                   dc, ptr<bf16>(m_.o_lat), nullptr},
                  s);
}

void CudaStep::decompressed(int64_t l, const DevLayer& d) {
  const int64_t Hl = m_.shard->local_heads(), P = m_.shard->tp_size(), dc = c_.kv_lora_rank,
                dn = c_.qk_nope_head_dim, dv = c_.v_head_dim, dr = c_.qk_rope_head_dim,
                dqk = c_.qk_head_dim(), dq = c_.latent_width(), dkv = dn + dv;
  const cudaStream_t s = m_.stream;
  const auto& geo = cache_.geometry();
  const bool sharded = P > 1 && !cache_.holds_every_page();
  // Row r of `layer_rows` is the cache row r of this layer: page * num_layers * B + offset.
  const bf16* layer_rows = cache_.pool_storage().data<bf16>() + int64_t{l} * geo.block_size * dq;
  for (size_t i = 0; i < batch_.seqs.size(); ++i) {
    if (plan_.forms[i] != AttnForm::kDecompressed) continue;
    const ForwardSeq& seq = batch_.seqs[i];
    const int64_t n = seq.num_tokens, L = seq.start + seq.num_tokens, r0 = plan_.seq_begin[i];
    const int64_t local = plan_.ctx_local[i], o = plan_.ctx_offset[i];
    bf16* context = ptr<bf16>(m_.context);
    if (!sharded) {
      cuda::gather_rows({layer_rows, meta(o), context, L, dq * 2, dq * 2, dq * 2}, s);
    } else {
      // Each rank contributes its rows padded to the largest share; rank r's k-th local key
      // is sequence position (r + (k / B) * P) * B + k % B.
      bf16* mine = ptr<bf16>(m_.context_mine);
      cuda::gather_rows({layer_rows, meta(o), mine, local, dq * 2, dq * 2, dq * 2}, s);
      sync_for_comm();
      {
        auto timed = time_collective();
        comm_->all_gather(reinterpret_cast<const float*>(mine), local * dq / 2,
                          ptr<float>(m_.context_all));
      }
      cuda::gather_rows({m_.context_all.raw(), meta(o + local), context, L, dq * 2, dq * 2, dq * 2},
                        s);
    }
    // The up-projection absorption avoids: [L, Hl * (d_n + d_v)] = c W_kvb^T.
    cuda::GemmParams g{context, d.kv_b.raw(), m_.up.raw(), L, Hl * dkv, dc, dq, dc, Hl * dkv};
    g.c_type = DType::kBF16;
    g.b_constant = true;  // a weight
    cuda::gemm(*m_.blas, g);
    const int32_t* cu = meta(plan_.o_cu + 4 * static_cast<int64_t>(i));
    cuda::MhaPrefillParams p{};
    p.q = ptr<bf16>(m_.q) + r0 * Hl * dqk;
    p.k_nope = ptr<bf16>(m_.up);
    p.k_rope = context + dc;
    p.v = ptr<bf16>(m_.up) + dn;
    p.q_token_stride = Hl * dqk;
    p.q_head_stride = dqk;
    p.kn_token_stride = Hl * dkv;
    p.kn_head_stride = dkv;
    p.kr_token_stride = dq;
    p.kr_head_stride = 0;
    p.v_token_stride = Hl * dkv;
    p.v_head_stride = dkv;
    p.cu_q = cu;
    p.cu_k = cu + 2;
    p.num_seqs = 1;
    p.max_q = static_cast<int32_t>(n);
    p.heads = static_cast<int32_t>(Hl);
    p.d_nope = static_cast<int32_t>(dn);
    p.d_rope = static_cast<int32_t>(dr);
    p.d_v = static_cast<int32_t>(dv);
    p.scale = m_.scale;
    p.out = ptr<bf16>(m_.o_v) + r0 * Hl * dv;
    p.lse = nullptr;
    cuda::mha_prefill(p, s);
  }
}

void CudaStep::ffn(const DevLayer& d) {
  const int64_t T = plan_.T, D = c_.hidden_size;
  const cudaStream_t s = m_.stream;
  float* out = ptr<float>(m_.delta);
  if (!d.is_moe) {
    mlp(d.mlp, ptr<bf16>(m_.xn), out);
    return;
  }
  const int64_t E = c_.n_routed_experts, K = c_.num_experts_per_tok;
  // The router in fp32, like transformers.
  cuda::GemmParams g{m_.xn32.raw(), d.gate.raw(), m_.router_logits.raw(), T, E, D, D, D, E};
  g.ab_type = DType::kF32;
  g.b_constant = true;  // a weight
  cuda::gemm(*m_.blas, g);
  cuda::MoeGateParams gp{};
  gp.logits = ptr<float>(m_.router_logits);
  gp.bias = ptr<float>(d.correction_bias);
  gp.tokens = T;
  gp.experts = E;
  gp.n_group = c_.n_group;
  gp.topk_group = c_.topk_group;
  gp.top_k = K;
  gp.gate = moe_gate_kind(c_.gate);
  gp.renormalize = c_.norm_topk_prob && c_.family == ModelFamily::kDeepseekV3;
  gp.scaling = static_cast<float>(c_.routed_scaling_factor);
  gp.ids = ptr<int32_t>(m_.topk_ids);
  gp.weights = ptr<float>(m_.topk_weights);
  cuda::moe_gate(gp, s);
  if (d.shared.width > 0) {
    mlp(d.shared, ptr<bf16>(m_.xn), out);
  } else {
    MLA_CUDA_CHECK(cudaMemsetAsync(out, 0, T * D * sizeof(float), s));
  }
  cuda::MoeExpertsParams ep{};
  ep.x = ptr<bf16>(m_.xn);
  ep.ids = ptr<int32_t>(m_.topk_ids);
  ep.weights = ptr<float>(m_.topk_weights);
  ep.gate_up = ptr<bf16>(d.experts_gate_up);
  ep.down = ptr<bf16>(d.experts_down);
  ep.out = out;
  ep.tokens = T;
  ep.top_k = K;
  ep.first_expert = d.first_expert;
  ep.local_experts = d.local_experts;
  ep.d = D;
  ep.inter = c_.moe_intermediate_size;
  ep.experts = E;
  // The weight-streaming expert kernels go with the small-row products (ModelOptions).
  ep.gemv_max_slots = m_.blas->options().small_gemm ? cuda::kMoeGemvMaxSlots : 0;
  cuda::moe_experts(ep, m_.moe_ws.raw(), m_.moe_ws.nbytes(), s);
}

void CudaStep::mlp(const DevMlp& w, const bf16* x, float* out) {
  const int64_t T = plan_.T, D = c_.hidden_size;
  cuda::linear(*m_.blas, x, T, D, w.gate_up.raw(), 2 * w.width, m_.gate_up.raw(), DType::kF32);
  cuda::silu_mul_bf16({ptr<float>(m_.gate_up), ptr<bf16>(m_.act), T, w.width}, m_.stream);
  cuda::linear(*m_.blas, m_.act.raw(), T, w.width, w.down.raw(), D, out, DType::kF32);
}

// Validates the batch, decides the forms and the shape of the step, and packs the step
// metadata into m.meta_host. `graph` pads the step to its bucket (pure decode steps only).
StepPlan make_plan(CudaModel::Impl& m, const ForwardBatch& batch, const LatentCache& cache,
                   bool allow_graph, WorkCounter& counter) {
  const ModelConfig& c = *m.c;
  const auto& geo = cache.geometry();
  const ShardPlan& sp = cache.shard();
  const int64_t B = geo.block_size, P = sp.tp_size();
  // Check layout
  MLA_REQUIRE(cache.storage() == CacheStorage::kDeviceBf16,
              "the CUDA model needs a device cache (CacheStorage::kDeviceBf16)");
  MLA_CHECK(sp.tp_size() == m.shard->tp_size() && sp.tp_rank() == m.shard->tp_rank(),
            "cache shard does not match the model's plan");

  StepPlan plan;
  plan.real_T = static_cast<int64_t>(batch.tokens.size());
  plan.real_S = static_cast<int64_t>(batch.seqs.size());
  // max_pages: the widest local page table; seq_pages: the most pages a sequence has over
  // the whole group (the same number on every rank).
  int64_t rows = 0, n_logits = 0, max_pages = 1, seq_pages = 1;
  bool all_single = true;
  for (const ForwardSeq& seq : batch.seqs) {
    MLA_CHECK(seq.table != nullptr && seq.num_tokens > 0, "empty sequence in batch");
    MLA_CHECK(seq.start + seq.num_tokens <= seq.table->num_tokens,
              "sequence pages hold {} tokens, step needs {}", seq.table->num_tokens,
              seq.start + seq.num_tokens);
    const AttnForm form = m.forms->choose(seq.num_tokens, seq.start + seq.num_tokens);
    counter.form_chunks[static_cast<int>(form)]++;
    plan.forms.push_back(form);
    plan.seq_begin.push_back(rows);
    plan.any_latent |= form != AttnForm::kDecompressed;
    plan.any_decompressed |= form == AttnForm::kDecompressed;
    plan.any_full_q |= form == AttnForm::kDecompressed;
    all_single &= seq.num_tokens == 1;
    rows += seq.num_tokens;
    n_logits += seq.want_logits ? 1 : 0;
    max_pages = std::max<int64_t>(max_pages, static_cast<int64_t>(seq.table->pages.size()));
    seq_pages = std::max<int64_t>(seq_pages, (int64_t{seq.table->num_tokens} + B - 1) / B);
  }
  MLA_CHECK(rows == plan.real_T, "batch has {} tokens but its sequences cover {}", plan.real_T,
            rows);
  for (int32_t tok : batch.tokens) {
    MLA_CHECK(tok >= 0 && tok < c.vocab_size, "token id {} outside vocabulary", tok);
  }
  plan.pure_decode = all_single && !plan.any_decompressed && plan.real_S > 0;
  plan.tuned = c.kv_lora_rank == 512 && c.qk_rope_head_dim == 64 && B == kKernelBlockSize;
  const bool graph = allow_graph && plan.pure_decode;
  plan.T = graph ? round_up_pow2(plan.real_T, 1) : plan.real_T;
  plan.S = graph ? plan.T : plan.real_S;
  plan.n_logits = graph ? plan.S : n_logits;
  // Graph steps bucket the table width by the group-wide page count, so every rank of a
  // group picks the same graph key and captures (or runs uncaptured) the same steps.
  plan.stride = graph ? round_up_pow2(std::max(max_pages, seq_pages), 16) : max_pages;

  // Decompressed sequences' context row lists.
  plan.ctx_offset.assign(batch.seqs.size(), 0);
  plan.ctx_local.assign(batch.seqs.size(), 0);
  int64_t ctx_words = 0, max_keys = 0, max_local = 0;
  for (size_t i = 0; i < batch.seqs.size(); ++i) {
    if (plan.forms[i] != AttnForm::kDecompressed) continue;
    const int64_t L = batch.seqs[i].start + batch.seqs[i].num_tokens;
    const int64_t pages = (L + B - 1) / B;
    const int64_t local = cache.holds_every_page() ? L : (pages + P - 1) / P * B;
    plan.ctx_local[i] = local;
    ctx_words += local + (cache.holds_every_page() ? 0 : L);
    max_keys = std::max(max_keys, L);
    max_local = std::max(max_local, local);
  }

  const int64_t T = plan.T, S = plan.S;
  int64_t off = 0;
  auto section = [&](int64_t n) {
    const int64_t at = off;
    off += (n + 3) / 4 * 4;  // 16-byte aligned sections
    return at;
  };
  plan.o_tokens = section(T);
  plan.o_pos = section(T);
  plan.o_slot_page = section(T);
  plan.o_slot_off = section(T);
  plan.o_num_keys = section(T);
  plan.o_token_seq = section(T);
  plan.o_logit_rows = section(std::max<int64_t>(plan.n_logits, 1));
  plan.o_table = section(S * plan.stride);
  plan.o_cu = section(4 * plan.real_S);
  const int64_t o_ctx = section(ctx_words);
  plan.total = off;
  m.reserve(T, S);
  m.reserve_meta(plan.total);

  int32_t* w = m.meta_host;
  std::fill_n(w, plan.total, 0);
  int64_t t = 0, logit = 0, ctx = o_ctx;
  for (size_t i = 0; i < batch.seqs.size(); ++i) {
    const ForwardSeq& seq = batch.seqs[i];
    const BlockTable& table = *seq.table;
    const bool latent = plan.forms[i] != AttnForm::kDecompressed;
    for (int32_t k = 0; k < seq.num_tokens; ++k, ++t) {
      const int32_t pos = seq.start + k;
      w[plan.o_tokens + t] = batch.tokens[t];
      w[plan.o_pos + t] = pos;
      const int32_t page = static_cast<int32_t>(pos / B);
      int32_t slot = -1;
      if (sp.owns_page(page)) {
        const size_t local = (sp.kv_shard() == KvShard::kReplicate || P == 1) ? page : page / P;
        MLA_CHECK(local < table.pages.size(), "token {} outside the table's {} pages", pos,
                  table.pages.size());
        slot = table.pages[local];
      }
      w[plan.o_slot_page + t] = slot;
      w[plan.o_slot_off + t] = static_cast<int32_t>(pos % B);
      w[plan.o_num_keys + t] = latent ? cache.local_keys(pos) : 0;
      w[plan.o_token_seq + t] = static_cast<int32_t>(i);
    }
    if (seq.want_logits) w[plan.o_logit_rows + logit++] = static_cast<int32_t>(t - 1);
    std::copy(table.pages.begin(), table.pages.end(), w + plan.o_table + i * plan.stride);
    int32_t* cu = w + plan.o_cu + 4 * i;
    const int32_t L = seq.start + seq.num_tokens;
    cu[0] = 0;
    cu[1] = seq.num_tokens;
    cu[2] = 0;
    cu[3] = L;
    if (latent) continue;
    // Context rows: cache row index (page * num_layers * B + offset) of every local key,
    // padded; then, sharded, the row of the gathered [P, local] block for each position.
    plan.ctx_offset[i] = ctx;
    const int64_t nl = geo.num_layers, local = plan.ctx_local[i];
    const int64_t have = cache.holds_every_page() ? L : cache.local_keys(L - 1);
    for (int64_t k = 0; k < have; ++k) {
      w[ctx + k] = static_cast<int32_t>(table.pages[k / B] * nl * B + k % B);
    }
    ctx += local;
    if (!cache.holds_every_page()) {
      for (int64_t pos = 0; pos < L; ++pos) {
        const int64_t r = (pos / B) % P, k = (pos / B) / P * B + pos % B;
        w[ctx + pos] = static_cast<int32_t>(r * local + k);
      }
      ctx += L;
    }
  }
  for (int64_t pad = plan.real_S; pad < plan.n_logits; ++pad) {
    w[plan.o_logit_rows + pad] = static_cast<int32_t>(pad);
  }
  for (int64_t pad = plan.real_T; pad < T; ++pad) w[plan.o_slot_page + pad] = -1;
  if (plan.tuned && !plan.pure_decode && plan.any_latent) {
    // The prefill kernel's workspace depends on the step's shape (not monotonically).
    const bool sharded = P > 1 && !cache.holds_every_page();
    const auto heads = static_cast<int32_t>(sharded ? c.num_heads : m.shard->local_heads());
    const size_t need = cuda::mla_prefill_workspace_size(static_cast<int32_t>(T), heads);
    if (!m.prefill_ws.defined() || m.prefill_ws.nbytes() < need) {
      m.prefill_ws = cuda::device_empty({static_cast<int64_t>(need)}, DType::kU8);
    }
  }
  if (max_keys > 0) m.ensure_context(max_keys, max_local);
  return plan;
}

}  // namespace

void CudaModel::run(const ForwardBatch& batch, LatentCache& cache, WorkCounter* counter,
                    Communicator* comm) const {
  Impl& m = *impl_;
  // A step that failed before its profile was collected leaves nothing behind.
  m.timed.clear();
  m.next_event = 0;
  WorkCounter local;
  WorkCounter& work = counter != nullptr ? *counter : local;
  MLA_CHECK(shard_.tp_size() == 1 || comm != nullptr, "a tensor-parallel model needs its group");
  if (shard_.tp_size() == 1) comm = nullptr;
  const CommStats before = comm != nullptr ? comm->stats() : CommStats{};
  // Collectives that can go on the model's stream need no host sync around them and can be
  // captured in the step's graph; the step's end drains the stream once, within the
  // communicator's timeout.
  const bool ordered = comm != nullptr && comm->begin_stream_ordered(m.stream);
  struct EndOrdered {
    Communicator* comm;
    ~EndOrdered() noexcept(false) {
      if (comm == nullptr) return;
      if (std::uncaught_exceptions() == 0) {
        comm->end_stream_ordered();
        return;
      }
      try {  // already failing: the first error is the one to report
        comm->end_stream_ordered();
      } catch (const std::exception&) {
      }
    }
  } end_ordered{ordered ? comm : nullptr};
  const bool graphs = m.use_graphs && (comm == nullptr || ordered);
  StepPlan plan = make_plan(m, batch, cache, graphs, work);
  MLA_CUDA_CHECK(cudaMemcpyAsync(m.meta_dev.raw(), m.meta_host, plan.total * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, m.stream));
  CudaStep step(m, batch, plan, cache, comm, ordered);
  const CudaModel::Impl::GraphKey key{plan.T, plan.stride, m.profiling};
  const uint64_t comm_id = comm != nullptr ? comm->id() : 0;
  if (graphs && plan.pure_decode && (m.graph_cache != cache.id() || m.graph_comm != comm_id)) {
    // Another cache or group (a new engine on this model): old graphs must not replay.
    m.drop_graphs();
    if (m.graph_comm != comm_id) m.warmed.clear();
    m.graph_cache = cache.id();
    m.graph_comm = comm_id;
  }
  // Every rank of a group makes this choice on its own (its table width may differ), which
  // is safe: the same collectives are issued in the same order captured or not.
  const bool warm = comm == nullptr || m.warmed.count(key) > 0;
  if (graphs && plan.pure_decode && warm) {
    auto it = m.graphs.find(key);
    if (it == m.graphs.end()) {
      const CommStats at = comm != nullptr ? comm->stats() : CommStats{};
      CudaModel::Impl::Graph g;
      struct Capturing {  // profiled sections record into g's own events while capturing
        CudaModel::Impl& m;
        ~Capturing() { m.capture_events = nullptr; }
      } capturing{m};
      m.capture_events = m.profiling ? &g.events : nullptr;
      m.timed.clear();
      cudaGraph_t graph = nullptr;
      struct Unfinished {  // frees what a capture that failed part way leaves
        CudaModel::Impl::Graph& g;
        cudaGraph_t& graph;
        bool kept = false;
        ~Unfinished() {
          if (kept) return;
          if (graph != nullptr) cudaGraphDestroy(graph);
          if (g.exec != nullptr) cudaGraphExecDestroy(g.exec);
          for (cudaEvent_t e : g.events) cudaEventDestroy(e);
        }
      } unfinished{g, graph};
      MLA_CUDA_CHECK(cudaStreamBeginCapture(m.stream, cudaStreamCaptureModeThreadLocal));
      try {
        step.enqueue();
      } catch (...) {
        cudaGraph_t partial = nullptr;
        if (cudaStreamEndCapture(m.stream, &partial) == cudaSuccess && partial != nullptr) {
          cudaGraphDestroy(partial);
        }
        m.timed.clear();
        throw;
      }
      MLA_CUDA_CHECK(cudaStreamEndCapture(m.stream, &graph));
      MLA_CUDA_CHECK(cudaGraphInstantiate(&g.exec, graph, 0));
      if (comm != nullptr) g.comm = comm->stats() - at;
      g.timed = std::move(m.timed);
      unfinished.kept = true;
      cudaGraphDestroy(graph);
      it = m.graphs.emplace(key, std::move(g)).first;
      m.captured++;
      spdlog::debug("captured decode graph for batch {} x {} pages", plan.T, plan.stride);
    } else {
      m.replays++;
      work.comm += it->second.comm;
    }
    m.timed = it->second.timed;  // read back by collect_profile() once the step is done
    MLA_CUDA_CHECK(cudaGraphLaunch(it->second.exec, m.stream));
  } else {
    if (graphs && plan.pure_decode) m.warmed.insert(key);
    step.enqueue();
  }
  if (comm != nullptr) work.comm += comm->stats() - before;
}

Tensor CudaModel::forward(const ForwardBatch& batch, LatentCache& cache, WorkCounter* counter,
                          Communicator* comm) const {
  Impl& m = *impl_;
  const cuda::DeviceGuard on_device(m.device);
  int64_t n_logits = 0;
  for (const ForwardSeq& seq : batch.seqs) n_logits += seq.want_logits ? 1 : 0;
  run(batch, cache, counter, comm);
  Tensor logits = Tensor::empty({n_logits, config_.vocab_size});
  MLA_CUDA_CHECK(cudaMemcpyAsync(logits.raw(), m.logits.raw(), logits.nbytes(),
                                 cudaMemcpyDeviceToHost, m.stream));
  MLA_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  m.collect_profile();
  return logits;
}

SampledStep CudaModel::forward_sample(const ForwardBatch& batch,
                                      const std::vector<SampleRequest>& requests,
                                      LatentCache& cache, WorkCounter* counter,
                                      Communicator* comm) const {
  Impl& m = *impl_;
  const cuda::DeviceGuard on_device(m.device);
  run(batch, cache, counter, comm);
  SampledStep out;
  const auto R = static_cast<int64_t>(requests.size());
  if (R == 0) {
    MLA_CUDA_CHECK(cudaStreamSynchronize(m.stream));
    m.collect_profile();
    return out;
  }
  const int64_t V = config_.vocab_size;
  bool all_greedy = true;
  for (const SampleRequest& r : requests) {
    r.params.validate(V);
    all_greedy &= r.params.temperature == 0;
  }
  int32_t* tokens = ptr<int32_t>(m.sampled);
  if (all_greedy) {
    cuda::argmax_f32({ptr<float>(m.logits), tokens, R, V}, m.stream);
  } else {
    std::vector<cuda::SampleRow> rows(R);
    for (int64_t i = 0; i < R; ++i) {
      const SamplingParams& sp = requests[i].params;
      rows[i] = {sp.temperature, sp.top_k, sp.top_p, sp.seed, requests[i].position};
    }
    MLA_CUDA_CHECK(cudaMemcpyAsync(m.sample_params.raw(), rows.data(), R * sizeof(cuda::SampleRow),
                                   cudaMemcpyHostToDevice, m.stream));
    cuda::SampleParams p{};
    p.logits = ptr<float>(m.logits);
    p.rows = R;
    p.vocab = V;
    p.params = static_cast<const cuda::SampleRow*>(m.sample_params.raw());
    p.tokens = tokens;
    p.logprobs = ptr<float>(m.logprobs);
    cuda::sample(p, m.sort_ws.raw(), m.sort_ws.nbytes(), m.stream);
  }
  out.tokens.resize(R);
  MLA_CUDA_CHECK(cudaMemcpyAsync(out.tokens.data(), tokens, R * sizeof(int32_t),
                                 cudaMemcpyDeviceToHost, m.stream));
  out.logits.resize(R);
  for (int64_t i = 0; i < R; ++i) {
    if (!requests[i].keep_logits) continue;
    out.logits[i].resize(V);
    MLA_CUDA_CHECK(cudaMemcpyAsync(out.logits[i].data(), ptr<float>(m.logits) + i * V,
                                   V * sizeof(float), cudaMemcpyDeviceToHost, m.stream));
  }
  MLA_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  m.collect_profile();
  return out;
}

}  // namespace mla
