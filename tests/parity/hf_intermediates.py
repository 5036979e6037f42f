#!/usr/bin/env python3
"""Dump a Hugging Face DeepSeek V2/V3 model's per-layer intermediates as .npy files.

Usage:
  python3 tests/parity/hf_intermediates.py --model DIR --tokens 1,2,3 --out OUT
      [--device cpu|cuda] [--dtype float32|bfloat16]

Runs transformers' own DeepseekV2ForCausalLM / DeepseekV3ForCausalLM (eager attention, no
cache) on one prompt and writes, with forward hooks, the tensors that `mlaserve generate
--dump-tensors` writes, under the same names and shapes, as float32 .npy files:
OUT/L{layer:02}.{name}.npy per layer and OUT/{name}.npy for the model. Compare two such
directories with compare_intermediates.py. Needs torch, transformers (5.x; written against
5.17, the version make_golden.py used) and numpy.

T is the prompt length, D hidden_size, H heads, d_n qk_nope_head_dim, d_r qk_rope_head_dim,
d_c kv_lora_rank, V vocab_size. Per layer:
  attn_norm   [T, D]       input_layernorm output
  q_nope      [T, H, d_n]  the non-rotary part of the query (q_proj, or q_b_proj after q-LoRA)
  q_rope      [T, H, d_r]  the rotary part of the query after RoPE (YaRN's attention factor
                           included), rotated pair j at (j, j + d_r/2); see ROPE LAYOUT
  q_absorbed  [T, H, d_c]  W_UK[h]^T q_nope[t, h], W_UK[h] the d_n rows of head h in kv_b_proj:
                           computed here from the weights, transformers has no such tensor
  latent      [T, d_c]     c: kv_a_layernorm output (what the latent cache stores first)
  k_rope      [T, d_r]     the rotary key after RoPE, same layout as q_rope
  attn_out    [T, D]       o_proj output, before the residual add
  ffn_norm    [T, D]       post_attention_layernorm output
  ffn_out     [T, D]       the MLP or MoE output (shared experts included), before the
                           residual add
  layer_out   [T, D]       the residual stream after the layer
Model level:
  final_norm  [T, D]       the final norm's output
  logits      [T, V]       lm_head output for every prompt position

ROPE LAYOUT. With interleaved RoPE (DeepSeek's checkpoints: V3's rope_interleave, and always
in V2) the pair (x[2j], x[2j+1]) rotates. transformers' V3 writes the rotated pair to (j,
j + d_r/2), as mlaserve does; transformers' V2 keeps it at (2j, 2j+1), so this script moves
V2's values to (j, j + d_r/2). Attention scores are unchanged (q and k are permuted alike).
Non-interleaved RoPE rotates (j, j + d_r/2) in place in every implementation.
"""

import argparse
import os
import sys

import numpy as np
import torch
import transformers

PER_LAYER = ("attn_norm", "q_nope", "q_rope", "q_absorbed", "latent", "k_rope", "attn_out",
             "ffn_norm", "ffn_out", "layer_out")
MODEL_LEVEL = ("final_norm", "logits")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="directory with config.json and safetensors")
    ap.add_argument("--tokens", required=True, help="prompt token ids, comma-separated")
    ap.add_argument("--out", required=True, help="output directory (created; must hold no .npy)")
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="weights and compute dtype (tensors are written as float32 either way)")
    args = ap.parse_args()
    try:
        args.tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    if not args.tokens:
        ap.error("--tokens is empty")
    return args


def read_config(model_dir):
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        sys.exit(f"hf_intermediates: no config.json in model directory {model_dir}")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if config.model_type not in ("deepseek_v2", "deepseek_v3"):
        sys.exit(f"hf_intermediates: model_type {config.model_type!r} in {model_dir} is not "
                 "deepseek_v2 or deepseek_v3")
    return config


def load_model(model_dir, device, dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


class Recorder:
    """Forward hooks (and a wrapper around the modeling file's RoPE function) that copy each
    named tensor of the one forward pass to float32 numpy arrays keyed by (layer, name)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.modeling = sys.modules[type(model).__module__]
        self.tensors = {}
        self.layer = None  # the attention module running now, for the RoPE wrapper
        self.handles = []
        self.patched = []
        # transformers' V2 leaves the rotated pairs interleaved; see ROPE LAYOUT
        self.deinterleave = self.config.model_type == "deepseek_v2"

    def put(self, layer, name, t):
        key = (layer, name)
        if key in self.tensors:
            raise RuntimeError(f"{name} of layer {layer} recorded twice: one forward pass only")
        self.tensors[key] = np.ascontiguousarray(t.detach().float().cpu().numpy())

    def hook_output(self, module, layer, name):
        def hook(_mod, _args, out):
            out = out[0] if isinstance(out, tuple) else out
            self.put(layer, name, out[0])  # batch of one
        self.handles.append(module.register_forward_hook(hook))

    def install(self):
        cfg = self.config
        H, d_n, d_r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            self.hook_output(layer.input_layernorm, i, "attn_norm")
            self.handles.append(attn.register_forward_pre_hook(
                lambda _m, _a, i=i: setattr(self, "layer", i)))
            q_proj = attn.q_proj if attn.q_proj is not None else attn.q_b_proj

            def q_hook(_mod, _args, out, i=i, attn=attn):
                q = out[0].view(out.shape[1], H, d_n + d_r)
                q_nope = q[..., :d_n]
                self.put(i, "q_nope", q_nope)
                w = attn.kv_b_proj.weight.view(H, -1, cfg.kv_lora_rank)[:, :d_n, :]  # W_UK
                self.put(i, "q_absorbed", torch.einsum("thn,hnc->thc", q_nope, w.to(q.dtype)))
            self.handles.append(q_proj.register_forward_hook(q_hook))
            self.hook_output(attn.kv_a_layernorm, i, "latent")
            self.hook_output(attn.o_proj, i, "attn_out")
            self.hook_output(layer.post_attention_layernorm, i, "ffn_norm")
            self.hook_output(layer.mlp, i, "ffn_out")
            self.hook_output(layer, i, "layer_out")
        self.hook_output(self.model.model.norm, -1, "final_norm")
        self.patch_rope()

    def patch_rope(self):
        """Wraps the modeling file's RoPE functions: their outputs are q_rope and k_rope as the
        model used them (no recomputation to drift from what transformers does)."""
        names = [n for n in ("apply_rotary_emb", "apply_rotary_pos_emb",
                             "apply_rotary_pos_emb_interleave") if hasattr(self.modeling, n)]
        if not names:
            raise RuntimeError(f"{self.modeling.__name__} has no RoPE function this script knows")
        for name in names:
            original = getattr(self.modeling, name)

            def wrapped(*args, original=original, **kwargs):
                q, k = original(*args, **kwargs)
                # q: [1, H, T, d_r], k: [1, 1, T, d_r]
                qr, kr = q[0].transpose(0, 1), k[0, 0]
                if self.deinterleave:
                    qr = torch.cat([qr[..., 0::2], qr[..., 1::2]], dim=-1)
                    kr = torch.cat([kr[..., 0::2], kr[..., 1::2]], dim=-1)
                self.put(self.layer, "q_rope", qr)
                self.put(self.layer, "k_rope", kr)
                return q, k
            setattr(self.modeling, name, wrapped)
            self.patched.append((name, original))

    def remove(self):
        for h in self.handles:
            h.remove()
        for name, original in self.patched:
            setattr(self.modeling, name, original)


def main():
    args = parse_args()
    vocab = read_config(args.model).vocab_size
    bad = [t for t in args.tokens if not 0 <= t < vocab]
    if bad:
        sys.exit(f"hf_intermediates: token ids {bad} are outside the vocabulary [0, {vocab})")
    # A stale dump would be compared as if it were this one.
    os.makedirs(args.out, exist_ok=True)
    stale = [f for f in os.listdir(args.out) if f.endswith(".npy")]
    if stale:
        sys.exit(f"hf_intermediates: {args.out} already holds {len(stale)} .npy files; "
                 "remove them or pick an empty directory")
    model = load_model(args.model, args.device, getattr(torch, args.dtype))
    cfg = model.config

    rec = Recorder(model)
    rec.install()
    try:
        with torch.no_grad():
            ids = torch.tensor([args.tokens], dtype=torch.long, device=args.device)
            out = model(input_ids=ids, use_cache=False)
        rec.put(-1, "logits", out.logits[0])
    finally:
        rec.remove()

    expected = [(i, n) for i in range(cfg.num_hidden_layers) for n in PER_LAYER]
    expected += [(-1, n) for n in MODEL_LEVEL]
    missing = [k for k in expected if k not in rec.tensors]
    if missing:
        sys.exit(f"hf_intermediates: transformers {transformers.__version__} did not produce "
                 f"{missing[:6]}{' ...' if len(missing) > 6 else ''}: its modeling file changed; "
                 "update the hooks")
    for (layer, name), a in rec.tensors.items():
        file = f"L{layer:02}.{name}.npy" if layer >= 0 else f"{name}.npy"
        np.save(os.path.join(args.out, file), a.astype("<f4", copy=False))
    print(f"wrote {len(rec.tensors)} tensors ({cfg.num_hidden_layers} layers, T = "
          f"{len(args.tokens)}) to {args.out} (transformers {transformers.__version__}, "
          f"{type(model).__name__}, {args.dtype} on {args.device})")


if __name__ == "__main__":
    main()
