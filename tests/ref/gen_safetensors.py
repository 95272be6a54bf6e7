#!/usr/bin/env python3
"""Generate the safetensors checkpoints tests/ref/<case>.safetensors that
tests/test_safetensors.c loads through examples/safetensors_moe.c.

Each file holds ONE MoE layer of a tiny HF transformers 5.x model under the
tensor names a real checkpoint uses, plus two extra tensors:
    x      [T][D]  F32  the block input
    y_ref  [T][D]  F32  the HF block's output, block(x) (no residual)
and a __metadata__ map with the routing fields of the model's config.json
(num_experts_per_tok, norm_topk_prob, n_group, topk_group,
routed_scaling_factor), the model type and the layer index, which the loader
reads when present (the tensors carry the shapes, not these).

Names come from transformers itself:
  * "checkpoint" cases: a tiny <Model>ForCausalLM is built, the MoE block of
    one layer is filled, and model.save_pretrained() writes the file; it runs
    revert_weight_conversion, so the names are the Hub's original per-expert
    ones (Mixtral block_sparse_moe.experts.{j}.w1/w3/w2, Qwen2-MoE and
    DeepSeek-V3 mlp.experts.{j}.gate_proj/up_proj/down_proj). The layer's MoE
    tensors are taken from that file as written.
  * "fused" case: the model's own state_dict() (5.x fused parameters:
    mlp.experts.gate_up_proj [E][2F][D], mlp.experts.down_proj [E][D][F],
    mlp.gate.weight), the names safetensors.torch.save_file(state_dict) writes.
Every name mapping is then proven by loading the saved checkpoint back into a
fresh HF model (from_pretrained runs HF's own weight converter; the fused case
goes through load_state_dict) and checking its block reproduces y_ref
bitwise.

Precision: the HF module always runs in float32 on CPU, eager experts. For a
BF16 / F16 case the weights are first rounded to that dtype (t.to(bf16)
.float()), the fp32 module runs on the rounded values, and the file stores
the weights in the narrow dtype. Widening bf16/f16 -> f32 is exact, so the C
loader computes on exactly the weights HF used and the fp32 tolerance applies.
DeepSeek-V3's e_score_correction_bias stays F32 (as released).

Inputs are drawn so that every top-k (and DeepSeek group) boundary has a key
gap > 1e-4: tie-breaking never matters.

Usage: python3 tests/ref/gen_safetensors.py [outdir]   (default: this folder)
Needs: pip install -r tests/ref/requirements.txt (torch, transformers,
safetensors). Output is byte-for-byte deterministic (the __metadata__ keys,
which safetensors writes in hash order, are re-serialised sorted).
"""

import json
import os
import platform
import struct
import sys
import tempfile

import torch
import torch.nn.functional as Fn

import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM,
                          Qwen2MoeConfig, Qwen2MoeForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gen_golden import GAP, dsv3_route, sorted_gaps_ok, boundary_gap_ok  # noqa: E402  (helpers only)

torch.set_default_dtype(torch.float32)
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VERSIONS = "python %s, torch %s, transformers %s, safetensors %s" % (
    platform.python_version(), torch.__version__, transformers.__version__,
    __import__("safetensors").__version__)
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
MAX_SEED_TRIES = 1000


# --------------------------------------------------------------------------
# tiny models: one MoE layer each (DeepSeek-V3: layer 0 dense, layer 1 MoE)
# --------------------------------------------------------------------------

def tiny_mixtral():
    T, D, F, E, K = 7, 16, 24, 8, 2
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=32,
                        hidden_act="silu", router_jitter_noise=0.0)
    meta = {"model_type": "mixtral", "num_experts_per_tok": str(K)}
    return dict(cls=MixtralForCausalLM, cfg=cfg, layer=0, T=T, D=D, E=E, K=K, meta=meta,
                scales={"gate.weight": 0.25, "experts.gate_up_proj": 0.3, "experts.down_proj": 0.3})


def tiny_qwen2():
    T, D, F, Fs, E, K = 5, 16, 12, 20, 6, 3
    cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F, shared_expert_intermediate_size=Fs,
                         num_experts=E, num_experts_per_tok=K, norm_topk_prob=False, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=32, hidden_act="silu")
    meta = {"model_type": "qwen2_moe", "num_experts_per_tok": str(K), "norm_topk_prob": "false"}
    return dict(cls=Qwen2MoeForCausalLM, cfg=cfg, layer=0, T=T, D=D, E=E, K=K, meta=meta,
                scales={"gate.weight": 0.25, "experts.gate_up_proj": 0.3, "experts.down_proj": 0.3,
                        "shared_expert.gate_proj.weight": 0.3, "shared_expert.up_proj.weight": 0.3,
                        "shared_expert.down_proj.weight": 0.3, "shared_expert_gate.weight": 0.25})


def tiny_deepseek_v3():
    T, D, F, E, K, NG, TG, RSF = 6, 16, 8, 16, 4, 4, 2, 2.5
    cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=K,
                           n_group=NG, topk_group=TG, routed_scaling_factor=RSF, norm_topk_prob=True,
                           n_shared_experts=1, num_hidden_layers=2, first_k_dense_replace=1,
                           intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, vocab_size=32,
                           q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
                           v_head_dim=4, hidden_act="silu")
    meta = {"model_type": "deepseek_v3", "num_experts_per_tok": str(K), "norm_topk_prob": "true",
            "n_group": str(NG), "topk_group": str(TG), "routed_scaling_factor": repr(RSF)}
    return dict(cls=DeepseekV3ForCausalLM, cfg=cfg, layer=1, T=T, D=D, E=E, K=K, meta=meta,
                NG=NG, TG=TG, RSF=RSF,
                scales={"gate.weight": 0.25, "gate.e_score_correction_bias": 0.1,
                        "experts.gate_up_proj": 0.3, "experts.down_proj": 0.3,
                        "shared_experts.gate_proj.weight": 0.3, "shared_experts.up_proj.weight": 0.3,
                        "shared_experts.down_proj.weight": 0.3})


CASES = [
    # file stem,      model,            names,        weight dtype, base seed
    ("mixtral",       tiny_mixtral,     "checkpoint", "F32",  11000),
    ("mixtral_fused", tiny_mixtral,     "fused",      "F32",  12000),
    ("mixtral_bf16",  tiny_mixtral,     "checkpoint", "BF16", 13000),
    ("qwen2_moe",     tiny_qwen2,       "checkpoint", "F32",  14000),
    ("deepseek_v3",   tiny_deepseek_v3, "checkpoint", "F32",  15000),
    ("deepseek_v3_f16", tiny_deepseek_v3, "checkpoint", "F16", 16000),
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def build(spec):
    cfg = spec["cfg"]
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)      # the rest of the model: any values, never saved into our file
    model = spec["cls"](cfg).eval()
    return model, model.model.layers[spec["layer"]].mlp


def fill_block(block, scales, seed, dtype):
    """Every parameter of the block (and DeepSeek's bias buffer) explicitly,
    rounded to the stored dtype (the bias stays fp32)."""
    named = dict(block.named_parameters())
    named.update(dict(block.named_buffers()))
    missing = set(dict(block.named_parameters())) - set(scales)
    assert not missing, "unfilled parameters: %s" % sorted(missing)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name in sorted(scales):
            t = named[name]
            if name.endswith("e_score_correction_bias"):
                t.copy_((torch.rand(t.shape) * 2 - 1) * scales[name])
            else:
                t.copy_((torch.randn(t.shape) * scales[name]).to(DTYPES[dtype]).float())


def routing_ok(spec, block, x):
    with torch.no_grad():
        logits = Fn.linear(x, block.gate.weight)
        if "NG" not in spec:
            return sorted_gaps_ok(torch.softmax(logits, -1), spec["K"])
        b = block.gate.e_score_correction_bias
        r = dsv3_route(logits, b, spec["NG"], spec["TG"], spec["K"], spec["RSF"])
        return bool(boundary_gap_ok(r["gs"], spec["TG"]) and sorted_gaps_ok(r["cm"], spec["K"])
                    and (b != 0).all())


def run_block(block, x):
    T, D = x.shape
    with torch.no_grad():
        return block(x.view(1, T, D)).view(T, D).contiguous()


def moe_prefix(model, names, layer):
    if names == "fused" or not isinstance(model, MixtralForCausalLM):
        return "model.layers.%d.mlp." % layer
    return "model.layers.%d.block_sparse_moe." % layer


def canonical_metadata(path):
    """Rewrite the header with the __metadata__ keys sorted (safetensors writes
    them in Rust HashMap order, which changes from run to run). Same keys and
    values, so the JSON has the same length and the data does not move."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8:8 + n].decode("utf-8"))
    meta = head.pop("__metadata__")
    out = {"__metadata__": dict(sorted(meta.items()))}
    out.update(head)                                  # tensor entries in the writer's order
    text = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert len(text) <= n
    with open(path, "wb") as f:
        f.write(data[:8] + text + b" " * (n - len(text)) + data[8 + n:])


def make_case(outdir, stem, model_fn, names, dtype, base_seed):
    spec = model_fn()
    model, block = build(spec)
    T, D = spec["T"], spec["D"]
    for seed in range(base_seed, base_seed + MAX_SEED_TRIES):
        fill_block(block, spec["scales"], seed, dtype)
        torch.manual_seed(seed + 500000)
        x = torch.randn(T, D)
        if routing_ok(spec, block, x):
            break
    else:
        raise RuntimeError("no acceptable seed for %s" % stem)
    y_ref = run_block(block, x)
    prefix = moe_prefix(model, names, spec["layer"])

    with tempfile.TemporaryDirectory() as tmp:
        if names == "checkpoint":
            model.save_pretrained(tmp)                # HF reverts to the original names
            with safe_open(os.path.join(tmp, "model.safetensors"), "pt") as f:
                layer = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
            # round trip through HF's loader (its weight converter): same output
            back = spec["cls"].from_pretrained(tmp, experts_implementation="eager").eval()
            y_back = run_block(back.model.layers[spec["layer"]].mlp, x)
        else:
            sd = model.state_dict()
            layer = {k: v.detach().clone().contiguous() for k, v in sd.items() if k.startswith(prefix)}
            fresh, _ = build(model_fn())
            fresh.load_state_dict(dict(sd), strict=True)
            y_back = run_block(fresh.model.layers[spec["layer"]].mlp, x)
    assert torch.equal(y_back, y_ref), "%s: checkpoint does not reload to the same block" % stem
    assert layer, "%s: no tensors under %s" % (stem, prefix)

    tensors = {}
    for k, v in sorted(layer.items()):
        v = v.contiguous()
        if v.dtype == torch.float32 and not k.endswith("e_score_correction_bias"):
            narrow = v.to(DTYPES[dtype])
            assert torch.equal(narrow.float(), v), "%s: %s not representable in %s" % (stem, k, dtype)
            v = narrow
        tensors[k] = v
    tensors["x"] = x.contiguous()
    tensors["y_ref"] = y_ref
    meta = dict(spec["meta"])
    meta.update({"format": "pt", "layer": str(spec["layer"]), "names": names, "weights_dtype": dtype,
                 "generator": "tests/ref/gen_safetensors.py (seed %d)" % seed, "versions": VERSIONS})
    path = os.path.join(outdir, stem + ".safetensors")
    save_file(tensors, path, metadata=meta)
    canonical_metadata(path)
    os.chmod(path, 0o644)

    # read back with the reference reader: same names, dtypes and values
    with safe_open(path, "pt") as f:
        assert f.metadata() == meta
        assert sorted(f.keys()) == sorted(tensors)
        for k in tensors:
            assert torch.equal(f.get_tensor(k), tensors[k]), k
    kinds = sorted({str(v.dtype).replace("torch.", "") for v in tensors.values()})
    return dict(file=os.path.basename(path), size=os.path.getsize(path), seed=seed,
                tensors=len(tensors), dtypes="/".join(kinds), first=sorted(layer)[0])


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else HERE
    os.makedirs(outdir, exist_ok=True)
    print("versions:", VERSIONS)
    print("gap at every selection boundary > %g" % GAP)
    for case in CASES:
        r = make_case(outdir, *case)
        print("wrote %s" % ", ".join("%s=%s" % (k, v) for k, v in r.items()))


if __name__ == "__main__":
    main()
