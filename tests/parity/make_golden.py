#!/usr/bin/env python3
"""Generate golden parity data for mlaserve from tiny random DeepSeek V2/V3 models.

Usage: python3 tests/parity/make_golden.py --out DIR [--only NAME ...]

Needs torch, transformers (5.x, tested with 5.17) and safetensors. Runs on CPU in
float32 with eager attention. For each model NAME it writes DIR/NAME/ holding:
  config.json, model.safetensors (or shards + model.safetensors.index.json)
  golden.safetensors  prompt{i}_tokens  int64 [S_i]
                      prompt{i}_logits  f32   [S_i, V]  full-prompt forward
                      prompt{i}_step_logits f32 [N, V]  step 0 = last prompt row,
                                                        step t = incremental decode of greedy[t-1]
                      prompt{i}_greedy  int64 [N]      argmax of step_logits rows
  golden.json         metadata (see write_model()).
A model with `fp8_block` (v3_fp8) is saved in DeepSeek-V3's fp8 format instead (e4m3 weights,
`*_scale_inv` block scales, quantization_config) and gets golden_fp8act.{json,safetensors}:
the same prompts run with fp8-quantised activations (ActivationQuantisation).

Prompts are redrawn (next draw of the prompt generator) whenever a greedy step has a
top1-top2 logit margin < MARGIN_MIN, or an MoE routing decision is closer than
ROUTER_GAP_MIN (so fp32 C++ code reproduces tokens and expert choices exactly).
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

import torch

import transformers
from safetensors import safe_open
from safetensors.torch import save_file

VOCAB = 256
STEPS = 8
PROMPT_LENS = (5, 11, 19)
MARGIN_MIN = 2e-3
ROUTER_GAP_MIN = 1e-5
MAX_DRAWS = 200
ERRORS = []

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    intermediate_size=128,
    moe_intermediate_size=32,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
    attention_bias=False,
)


def yarn(mscale, mscale_all_dim):
    return dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        original_max_position_embeddings=64,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=mscale,
        mscale_all_dim=mscale_all_dim,
    )


DEFAULT_ROPE = dict(rope_type="default", rope_theta=10000.0)

MODELS = [
    dict(
        name="v3",
        arch="v3",
        seed=1001,
        rope=yarn(1.0, 1.0),
        cfg=dict(
            num_hidden_layers=3,
            first_k_dense_replace=1,
            q_lora_rank=48,
            n_routed_experts=16,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=4,
            n_shared_experts=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_interleave=True,
        ),
    ),
    dict(
        name="v3_plain",
        arch="v3",
        seed=1002,
        rope=DEFAULT_ROPE,
        cfg=dict(
            num_hidden_layers=2,
            first_k_dense_replace=1,
            q_lora_rank=None,
            n_routed_experts=8,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=2,
            n_shared_experts=2,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            rope_interleave=False,
        ),
    ),
    dict(
        name="v2_lite",
        arch="v2",
        seed=1003,
        rope=yarn(0.707, 0.707),
        cfg=dict(
            num_hidden_layers=2,
            first_k_dense_replace=1,
            q_lora_rank=None,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
        ),
    ),
    dict(
        name="v2_group",
        arch="v2",
        seed=1004,
        rope=DEFAULT_ROPE,
        shard_sizes=("300KB", "400KB", "250KB", "500KB", "200KB", "600KB"),
        cfg=dict(
            num_hidden_layers=2,
            first_k_dense_replace=1,
            q_lora_rank=48,
            n_routed_experts=16,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=4,
            n_shared_experts=1,
            topk_method="group_limited_greedy",
            norm_topk_prob=False,
            routed_scaling_factor=2.0,
        ),
    ),
    # The real MLA dimensions of every DeepSeek model (d_c 512, d_r 64, d_n 128, d_v 128), so
    # the tuned CUDA kernels run on it; narrow elsewhere to keep the files small.
    # Its prompts keep the greedy top-2 margin and every routing decision's gap well above bf16
    # rounding, so the CUDA model (bf16) can be held to transformers without near-ties.
    dict(
        name="v3_mla",
        arch="v3",
        seed=1005,
        margin_min=2e-2,
        router_gap_min=5e-3,
        rope=yarn(1.0, 1.0),
        cfg=dict(
            hidden_size=128,
            num_attention_heads=2,
            num_key_value_heads=2,
            kv_lora_rank=512,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            q_lora_rank=128,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            n_shared_experts=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_interleave=True,
        ),
    ),
]

# The same real MLA dimensions with 8 heads, so tensor parallelism up to TP8 can split it
# (v3_mla's 2 heads stop at TP2).
_V3_MLA = next(m for m in MODELS if m["name"] == "v3_mla")
MODELS.append(dict(_V3_MLA, name="v3_mla_h8", seed=1006,
                   cfg=dict(_V3_MLA["cfg"], num_attention_heads=8, num_key_value_heads=8)))
# DeepSeek-V3's checkpoint format: every linear layer of the decoder (not the router, the
# embeddings or lm_head) stored as fp8 e4m3 with an fp32 scale per 128x128 block
# (`weight_scale_inv`, W = fp8 * scale_inv), and config.json's quantization_config. The real MLA
# dimensions again, 4 heads and MLP widths of 256 so that TP2 and TP4 shards start on block
# boundaries as V3's TP8 shards do; kv_a_proj's 576 rows end in a half block, as in V3.
# The golden logits are transformers' fp32 forward over the dequantised weights;
# convert_checkpoint_fp8 checks that the fp8 files dequantise to exactly those weights.
# (transformers 5.17 cannot load the files back itself: FineGrainedFP8Config(dequantize=True)
# refuses kv_a_proj's 576 rows, "not divisible by scale grid (5, 1)", which V3's own
# 576 x 7168 weight would meet too.)
MODELS.append(dict(_V3_MLA, name="v3_fp8", seed=1007, fp8_block=(128, 128),
                   cfg=dict(_V3_MLA["cfg"], num_attention_heads=4, num_key_value_heads=4,
                            intermediate_size=256, moe_intermediate_size=256)))

FP8_MAX = 448.0


def is_fp8_weight(name):
    """The tensors DeepSeek-V3 ships in fp8: the decoder's linear layers but the MoE router."""
    if not name.startswith("model.layers.") or ".mlp.gate." in name:
        return False
    return name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight") or \
        name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")


def fp8_blocks(w, block):
    """e4m3 values and per-block scales of a 2-D fp32 tensor (scale = block amax / 448)."""
    br, bc = block
    R, C = w.shape
    nr, nc = -(-R // br), -(-C // bc)
    scale = torch.ones(nr, nc, dtype=torch.float32)
    q = torch.empty(R, C, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            blk = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            amax = blk.abs().max().item()
            s = amax / FP8_MAX if amax > 0 else 1.0
            scale[i, j] = s
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def dequant_blocks(q, scale, block):
    br, bc = block
    full = scale.repeat_interleave(br, 0)[:q.shape[0]].repeat_interleave(bc, 1)[:, :q.shape[1]]
    return q.float() * full


@torch.no_grad()
def quantise_model_fp8(model, block):
    """Replaces every fp8-stored weight by its dequantised fp8 value (fused experts per expert)."""
    count = 0
    for name, t in model.named_parameters():
        if not is_fp8_weight(name):
            continue
        mats = t.data.view(-1, *t.shape[-2:]) if t.dim() == 3 else t.data[None]
        for m in mats:
            q, s = fp8_blocks(m.float(), block)
            m.copy_(dequant_blocks(q, s, block))
        count += 1
    print(f"  quantised {count} weight tensors to fp8 blocks {list(block)}")


class ActivationQuantisation:
    """Within `with`, every linear product with an fp8-stored weight quantises its input per row
    and 128 columns first (s = amax / 448, e4m3(x / s) * s), as transformers' FP8Linear (its
    act_quant) and DeepSeek-V3's inference do; kv_b_proj excepted, which mlaserve (like
    DeepSeek's own inference code) keeps dequantised because the absorbed forms fold it. The
    routed experts run transformers' eager implementation meanwhile (its other ones multiply
    with torch's grouped kernels, not through functional.linear)."""

    def __init__(self, model, group):
        self.model = model
        self.experts_implementation = model.config._experts_implementation
        self.group = group
        self.storages = {t.untyped_storage().data_ptr() for n, t in model.named_parameters()
                         if is_fp8_weight(n) and "kv_b_proj" not in n}
        self.linear = torch.nn.functional.linear

    def quantise(self, x):
        shape, g = x.shape, self.group
        k = shape[-1]
        pad = (-k) % g
        xs = torch.nn.functional.pad(x.float(), (0, pad)).reshape(-1, (k + pad) // g, g)
        amax = xs.abs().amax(-1, keepdim=True)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        q = (xs / s).to(torch.float8_e4m3fn).float() * s
        return q.reshape(-1, k + pad)[:, :k].reshape(shape)

    def __enter__(self):
        def linear(x, w, b=None):
            if w.untyped_storage().data_ptr() in self.storages:
                x = self.quantise(x)
            return self.linear(x, w, b)
        torch.nn.functional.linear = linear
        self.model.config._experts_implementation = "eager"
        return self

    def __exit__(self, *exc):
        torch.nn.functional.linear = self.linear
        self.model.config._experts_implementation = self.experts_implementation


def write_fp8_activation_golden(model, spec, folder, prompts):
    """golden_fp8act.{json,safetensors}: the same prompts under ActivationQuantisation, the
    numerics of `fp8_weights: keep` (its own greedy tokens: quantisation may change them)."""
    golden, greedys, margins = {}, [], []
    with ActivationQuantisation(model, spec["fp8_block"][1]):
        for i, toks in enumerate(prompts):
            toks = torch.tensor(toks, dtype=torch.long)
            pl, sl, gr, margin = run_prompt(model, toks)
            golden[f"prompt{i}_tokens"] = toks.contiguous()
            golden[f"prompt{i}_logits"] = pl.contiguous()
            golden[f"prompt{i}_step_logits"] = sl.contiguous()
            golden[f"prompt{i}_greedy"] = gr.contiguous()
            greedys.append(gr.tolist())
            margins.append(margin)
    save_file(golden, os.path.join(folder, "golden_fp8act.safetensors"))
    meta = {"name": spec["name"], "variant": "fp8 activations", "steps": STEPS,
            "num_prompts": len(prompts), "prompts": prompts, "greedy": greedys,
            "min_top2_margin": min(margins), "activation_group": spec["fp8_block"][1],
            "description": ActivationQuantisation.__doc__.split("\n")[0]}
    with open(os.path.join(folder, "golden_fp8act.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"  fp8 activations: greedy {greedys} min margin {min(margins):.4f}")


def convert_checkpoint_fp8(folder, block):
    """Rewrites the saved fp32 checkpoint in V3's format: fp8 weights + `_scale_inv` + config."""
    tensors, _ = read_checkpoint(folder)
    out = {}
    for k, t in tensors.items():
        if is_fp8_weight(k) and t.dim() == 2:
            q, s = fp8_blocks(t.float(), block)
            if not torch.equal(dequant_blocks(q, s, block), t.float()):
                raise RuntimeError(f"{k}: saved weight is not an fp8 value")
            out[k], out[k + "_scale_inv"] = q.contiguous(), s.contiguous()
        else:
            out[k] = t.contiguous()
    for f in os.listdir(folder):
        if f.startswith("model") and f.endswith(".safetensors"):
            os.remove(os.path.join(folder, f))
    save_file(out, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    n = sum(1 for k in out if k.endswith("_scale_inv"))
    print(f"  rewrote the checkpoint with {n} fp8 weights and their scales")


def classes(arch):
    if arch == "v3":
        return transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM
    return transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM


def make_config(spec):
    cfg_cls, _ = classes(spec["arch"])
    kw = dict(COMMON)
    kw.update(spec["cfg"])
    rope = dict(spec["rope"])
    try:
        cfg = cfg_cls(**kw, rope_parameters=dict(rope))
        how = "rope_parameters"
    except TypeError as e:  # older transformers (4.x): rope_scaling + rope_theta
        print(f"  rope_parameters rejected ({e}); falling back to rope_scaling", flush=True)
        theta = rope.pop("rope_theta")
        scaling = None if rope["rope_type"] == "default" else rope
        cfg = cfg_cls(**kw, rope_theta=theta, rope_scaling=scaling)
        how = "rope_scaling"
    cfg._attn_implementation = "eager"
    try:
        cfg.dtype = torch.float32
    except Exception:
        pass
    return cfg, how


def build_model(spec):
    _, model_cls = classes(spec["arch"])
    cfg, how = make_config(spec)
    torch.manual_seed(spec["seed"])
    model = model_cls(cfg)
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
        except Exception as e:
            print("  set_attn_implementation failed:", e)
    model = model.float().eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    return model, how


def rerandomise(model, seed):
    """Deterministically overwrite every parameter and persistent buffer."""
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    persistent = set(model.state_dict().keys())
    touched = []
    items = list(model.named_parameters()) + list(model.named_buffers())
    with torch.no_grad():
        for name, t in items:
            if "inv_freq" in name:
                continue
            if not t.is_floating_point():
                print(f"  skip non-float tensor {name} {tuple(t.shape)}")
                continue
            if name not in persistent:
                print(f"  note: non-persistent tensor {name} {tuple(t.shape)} (re-randomised anyway)")
            r = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                v = 1.0 + 0.1 * r
            elif name.endswith("e_score_correction_bias"):
                v = 0.05 * r
            elif "embed_tokens" in name:
                v = r
            else:
                v = r * (1.0 / math.sqrt(t.shape[-1]))
            t.copy_(v.to(t.dtype))
            touched.append(name)
    return touched


# ---------------------------------------------------------------- routing gap
class RouterProbe:
    """Records, for every MoE call, how close the routing decision was to flipping."""

    def __init__(self, model, arch):
        self.arch = arch
        self.cfg = model.config
        self.min_gap = float("inf")
        self.handles = []
        for layer in model.model.layers:
            mlp = layer.mlp
            if hasattr(mlp, "gate") and hasattr(mlp, "experts"):
                self.handles.append(mlp.register_forward_pre_hook(self._hook))

    def reset(self):
        self.min_gap = float("inf")

    def _hook(self, mlp, args):
        x = args[0]
        with torch.no_grad():
            self.min_gap = min(self.min_gap, self.gap(mlp, x.reshape(-1, x.shape[-1])))

    def gap(self, mlp, x):
        cfg = self.cfg
        E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        logits = x.float() @ mlp.gate.weight.float().t()
        if self.arch == "v3":
            s = logits.sigmoid() + mlp.gate.e_score_correction_bias.float()[None]
            ng, tg = cfg.n_group, cfg.topk_group
            gs = s.view(-1, ng, E // ng).topk(2, dim=-1)[0].sum(-1) if ng > 1 else None
        else:
            s = logits.softmax(-1)
            if cfg.topk_method == "group_limited_greedy":
                ng, tg = cfg.n_group, cfg.topk_group
                gs = s.view(-1, ng, E // ng).max(-1).values
            else:
                ng, tg, gs = 1, 1, None
        gaps = []
        if gs is not None and tg < ng:
            sg = gs.sort(-1, descending=True).values
            gaps.append((sg[:, tg - 1] - sg[:, tg]).min().item())
            gidx = gs.topk(tg, dim=-1).indices
            gmask = torch.zeros_like(gs).scatter_(1, gidx, 1.0)
            emask = gmask[:, :, None].expand(-1, ng, E // ng).reshape(-1, E).bool()
            s = s.masked_fill(~emask, 0.0)
        ss = s.sort(-1, descending=True).values
        gaps.append((ss[:, k - 1] - ss[:, k]).min().item())
        return min(gaps)


# ---------------------------------------------------------------- decoding
def top2_margin(row):
    v = torch.topk(row, 2).values
    return (v[0] - v[1]).item()


@torch.no_grad()
def run_prompt(model, tokens):
    out = model(input_ids=tokens[None], use_cache=True)
    prompt_logits = out.logits[0].float().clone()
    past = out.past_key_values
    step_logits = [prompt_logits[-1].clone()]
    greedy = [int(torch.argmax(step_logits[0]))]
    for _ in range(1, STEPS):
        out = model(input_ids=torch.tensor([[greedy[-1]]], dtype=torch.long), past_key_values=past, use_cache=True)
        past = out.past_key_values
        row = out.logits[0, -1].float().clone()
        step_logits.append(row)
        greedy.append(int(torch.argmax(row)))
    step_logits = torch.stack(step_logits)
    margin = min(top2_margin(r) for r in step_logits)
    return prompt_logits, step_logits, torch.tensor(greedy, dtype=torch.long), margin


@torch.no_grad()
def full_forward_check(model, tokens, greedy, step_logits):
    """Non-cached forward over prompt + greedy[:-1]; its last STEPS rows must match the cached decode."""
    seq = torch.cat([tokens, greedy[:-1]])
    logits = model(input_ids=seq[None], use_cache=False).logits[0].float()
    return (logits[-STEPS:] - step_logits).abs().max().item()


# ---------------------------------------------------------------- saving
def save_checkpoint(model, folder, shard_sizes=None):
    def _save(path, **kw):
        try:
            model.save_pretrained(path, safe_serialization=True, **kw)
        except TypeError as e:
            if "safe_serialization" not in str(e):
                raise
            model.save_pretrained(path, **kw)

    if not shard_sizes:
        _save(folder)
        return None
    for size in shard_sizes:
        tmp = tempfile.mkdtemp()
        _save(tmp, max_shard_size=size)
        n = len([f for f in os.listdir(tmp) if f.endswith(".safetensors")])
        has_index = os.path.exists(os.path.join(tmp, "model.safetensors.index.json"))
        print(f"  max_shard_size={size}: {n} shards, index={has_index}")
        if 2 <= n <= 4 and has_index:
            for f in os.listdir(tmp):
                shutil.move(os.path.join(tmp, f), os.path.join(folder, f))
            shutil.rmtree(tmp)
            return size
        shutil.rmtree(tmp)
    raise RuntimeError("could not get 2-4 shards")


def read_checkpoint(folder):
    tensors, where = {}, {}
    for f in sorted(os.listdir(folder)):
        if f.startswith("model") and f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), framework="pt") as fh:
                for k in fh.keys():
                    assert k not in tensors, f"duplicate key {k}"
                    tensors[k] = fh.get_tensor(k)
                    where[k] = f
    return tensors, where


def verify_checkpoint(model, folder, model_cls, prompts_ref):
    tensors, where = read_checkpoint(folder)
    sd = model.state_dict()
    same_keys = set(tensors) & set(sd)
    mismatched = [k for k in same_keys if not torch.equal(tensors[k], sd[k].float())]
    only_file = sorted(set(tensors) - set(sd))
    only_model = sorted(set(sd) - set(tensors))
    print(f"  checkpoint: {len(tensors)} tensors; {len(same_keys)} share names with state_dict, "
          f"{len(mismatched)} of those differ; {len(only_file)} only in file; {len(only_model)} only in model")
    if only_file:
        print("   only in file (first 8):", only_file[:8])
    if only_model:
        print("   only in model (first 8):", only_model[:8])
    if mismatched:
        raise RuntimeError(f"saved values differ: {mismatched[:8]}")
    bias_keys = [k for k in tensors if k.endswith("e_score_correction_bias")]
    for k in bias_keys:
        nz = int((tensors[k] != 0).sum())
        print(f"   {k}: shape {tuple(tensors[k].shape)} nonzero {nz}, |max| {tensors[k].abs().max().item():.4f}")
        if nz == 0:
            print("   WARNING: e_score_correction_bias saved as all zeros")
    # reload round trip: logits must match exactly
    try:
        re = model_cls.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    except TypeError:
        re = model_cls.from_pretrained(folder, attn_implementation="eager", torch_dtype=torch.float32)
    re = re.float().eval()
    worst = 0.0
    with torch.no_grad():
        for toks, ref in prompts_ref:
            worst = max(worst, (re(input_ids=toks[None]).logits[0].float() - ref).abs().max().item())
    print(f"  reload round trip: max |logit diff| = {worst:.3g}")
    if worst > 1e-5:
        ERRORS.append("reloaded checkpoint does not reproduce the logits")
        print("  ERROR: reloaded checkpoint does not reproduce the logits")
    return tensors, where, bias_keys, worst


# ---------------------------------------------------------------- main
def write_model(spec, out_dir):
    name = spec["name"]
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    print(f"\n===== {name} =====", flush=True)
    model, how = build_model(spec)
    rot = model.model.rotary_emb
    print(f"  config via {how}; class {type(model).__name__}; rotary rope_type={getattr(rot, 'rope_type', None)} "
          f"attention_scaling={rot.attention_scaling}")
    print("  config:", json.dumps(model.config.to_dict(), default=str, sort_keys=True))
    want = spec["rope"]["rope_type"]
    if getattr(rot, "rope_type", want) != want:
        raise RuntimeError(f"rope_type {getattr(rot, 'rope_type', None)} != {want}")
    dim = model.config.qk_rope_head_dim
    default_inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    inv = rot.inv_freq.detach().float().cpu()
    yarn_effect = not torch.allclose(inv, default_inv)
    print(f"  inv_freq={inv.tolist()}\n  inv_freq differs from default: {yarn_effect}")
    if (want == "yarn") != yarn_effect:
        raise RuntimeError("YaRN did not take effect as expected")

    touched = rerandomise(model, spec["seed"])
    if spec.get("fp8_block"):
        quantise_model_fp8(model, spec["fp8_block"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  re-randomised {len(touched)} tensors; {n_params} params")
    buffers = [n for n, _ in model.named_buffers()]
    print("  buffers:", buffers)

    probe = RouterProbe(model, spec["arch"])
    g = torch.Generator().manual_seed(spec["seed"] + 500)
    golden, prompts, greedys, margins, router_gaps, cache_diffs = {}, [], [], [], [], []
    for i, L in enumerate(PROMPT_LENS):
        for draw in range(MAX_DRAWS):
            toks = torch.randint(1, VOCAB, (L,), generator=g, dtype=torch.long)
            probe.reset()
            pl, sl, gr, margin = run_prompt(model, toks)
            rgap = probe.min_gap
            if margin >= spec.get("margin_min", MARGIN_MIN) and rgap >= spec.get(
                "router_gap_min", ROUTER_GAP_MIN
            ):
                break
            print(f"  prompt{i} draw {draw}: margin {margin:.3g} router gap {rgap:.3g} -> redraw")
        else:
            raise RuntimeError("no robust prompt found")
        diff = full_forward_check(model, toks, gr, sl)
        print(f"  prompt{i} len {L} draws {draw + 1}: greedy {gr.tolist()} margin {margin:.4f} "
              f"router_gap {rgap:.3g} cache-vs-full max diff {diff:.3g}")
        if diff > 1e-4:
            print("  WARNING: cached decode disagrees with full forward")
        cache_diffs.append(diff)
        golden[f"prompt{i}_tokens"] = toks.contiguous()
        golden[f"prompt{i}_logits"] = pl.contiguous()
        golden[f"prompt{i}_step_logits"] = sl.contiguous()
        golden[f"prompt{i}_greedy"] = gr.contiguous()
        prompts.append(toks.tolist())
        greedys.append(gr.tolist())
        margins.append(margin)
        router_gaps.append(rgap)
    for h in probe.handles:
        h.remove()

    shard = save_checkpoint(model, folder, spec.get("shard_sizes"))
    _, model_cls = classes(spec["arch"])
    refs = [(golden[f"prompt{i}_tokens"], golden[f"prompt{i}_logits"]) for i in range(len(PROMPT_LENS))]
    tensors, where, bias_keys, reload_diff = verify_checkpoint(model, folder, model_cls, refs)
    if spec.get("fp8_block"):
        convert_checkpoint_fp8(folder, spec["fp8_block"])
        tensors, where = read_checkpoint(folder)
        write_fp8_activation_golden(model, spec, folder, prompts)
    save_file(golden, os.path.join(folder, "golden.safetensors"))

    meta = {
        "name": name,
        "model_class": type(model).__name__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "num_prompts": len(prompts),
        "steps": STEPS,
        "prompts": prompts,
        "greedy": greedys,
        "rope_type": getattr(rot, "rope_type", want),
        "rope_inv_freq": inv.tolist(),
        "rope_attention_scaling": float(rot.attention_scaling),
        "softmax_scale": float(model.model.layers[0].self_attn.scaling),
        "min_top2_margin": min(margins),
        "min_router_gap": min(router_gaps),
        "margin_threshold": spec.get("margin_min", MARGIN_MIN),
        "router_gap_threshold": spec.get("router_gap_min", ROUTER_GAP_MIN),
        "max_shard_size": shard,
        "reload_max_logit_diff": reload_diff,
        "fp8_block": list(spec["fp8_block"]) if spec.get("fp8_block") else None,
        "cache_vs_full_max_diff": max(cache_diffs),
        "e_score_correction_bias_saved": bool(bias_keys),
        "weight_names": [
            {"name": k, "shape": list(tensors[k].shape), "dtype": str(tensors[k].dtype).replace("torch.", ""),
             "file": where[k]}
            for k in sorted(tensors)
        ],
    }
    with open(os.path.join(folder, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)

    sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}
    total = sum(sizes.values())
    print(f"  files: {sizes}")
    print(f"SUMMARY {name}: class={meta['model_class']} params={n_params} total_bytes={total} "
          f"ckpt_files={sorted(set(where.values()))} min_margin={meta['min_top2_margin']:.4f} "
          f"min_router_gap={meta['min_router_gap']:.3g} softmax_scale={meta['softmax_scale']:.6f} "
          f"rope_attention_scaling={meta['rope_attention_scaling']:.6f} rope_type={meta['rope_type']}", flush=True)
    if total > {"v3_mla": 6, "v3_mla_h8": 12, "v3_fp8": 6}.get(name, 2.2) * 1024 * 1024:
        print(f"  WARNING: folder {name} is {total} bytes (> ~2 MB)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    torch.set_num_threads(4)
    torch.manual_seed(0)
    print(f"transformers {transformers.__version__} torch {torch.__version__} python {sys.version.split()[0]}")
    os.makedirs(args.out, exist_ok=True)
    for spec in MODELS:
        if args.only and spec["name"] not in args.only:
            continue
        try:
            write_model(spec, args.out)
        except Exception:
            import traceback

            traceback.print_exc()
            ERRORS.append(f"{spec['name']} failed")
        sys.stdout.flush()
    if ERRORS:
        print("ERRORS:", ERRORS)
        sys.exit(1)
    print("ALL OK")


if __name__ == "__main__":
    main()
