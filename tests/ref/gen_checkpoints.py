#!/usr/bin/env python3
"""Generate the tiny checkpoint directories tests/ref/ckpt/<case>/ that
tests/test_safetensors.c loads through examples/safetensors_moe.c's
st_checkpoint_open, which reads the routing from config.json.

Each directory is what transformers' save_pretrained writes for a tiny
<Model>ForCausalLM (config.json, generation_config.json, model.safetensors or
shards plus model.safetensors.index.json), with the MoE block of one layer
filled with known values, plus one file of ours:
    io.safetensors   x [T][D] and y_ref [T][D] = block(x), the HF block's
                     output (no residual); __metadata__ "layer" = its index.

The configs are chosen so that the routing read from config.json differs
from moe.h's presets, so a loader that ignored config.json would fail:
  mixtral      E 4, K 2 (the preset's E is 8)
  qwen2_moe    2 layers, decoder_sparse_step 2 (layer 0 dense), K 3, gated shared expert
  qwen3_moe    2 layers, mlp_only_layers [0], K 3, norm_topk_prob true
  olmoe        K 3, norm_topk_prob false
  deepseek_v3  sharded (the MoE layer spans shards), first_k_dense_replace 1,
               E 16, K 4, n_group 4, topk_group 2, routed_scaling_factor 1.7,
               n_shared_experts 2, and the released configs' scoring_func and
               topk_method keys
Each is proven by loading the directory back with from_pretrained (HF's own
converter and config reader) and checking the block reproduces y_ref
bitwise. Inputs keep every top-k (and group) boundary gap > 1e-4.

Usage: python3 tests/ref/gen_checkpoints.py [outdir]   (default: ckpt/ here)
Needs: pip install -r tests/ref/requirements.txt. Output is byte-for-byte
deterministic.
"""

import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM,
                          OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gen_safetensors import VERSIONS, build, canonical_metadata, fill_block, routing_ok, run_block  # noqa: E402

SMALL = dict(num_attention_heads=2, num_key_value_heads=2, vocab_size=32, hidden_act="silu")
ROUTED = {"gate.weight": 0.25, "experts.gate_up_proj": 0.3, "experts.down_proj": 0.3}


def spec(cls, cfg, layer, T, K, scales, **extra):
    d = dict(cls=cls, cfg=cfg, layer=layer, T=T, D=cfg.hidden_size, K=K, scales=scales)
    d.update(extra)
    return d


def mixtral():
    cfg = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                        num_hidden_layers=1, router_jitter_noise=0.0, **SMALL)
    return spec(MixtralForCausalLM, cfg, 0, 7, 2, ROUTED)


def qwen2_moe():
    cfg = Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=12, shared_expert_intermediate_size=20,
                         intermediate_size=20, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
                         decoder_sparse_step=2, num_hidden_layers=2, **SMALL)
    sh = {"shared_expert.gate_proj.weight": 0.3, "shared_expert.up_proj.weight": 0.3,
          "shared_expert.down_proj.weight": 0.3, "shared_expert_gate.weight": 0.25}
    return spec(Qwen2MoeForCausalLM, cfg, 1, 5, 3, dict(ROUTED, **sh))


def qwen3_moe():
    cfg = Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=12, intermediate_size=20, num_experts=8,
                         num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[0], num_hidden_layers=2,
                         head_dim=8, **SMALL)
    return spec(Qwen3MoeForCausalLM, cfg, 1, 6, 3, ROUTED)


def olmoe():
    cfg = OlmoeConfig(hidden_size=16, intermediate_size=12, num_experts=6, num_experts_per_tok=3,
                      norm_topk_prob=False, num_hidden_layers=1, **SMALL)
    return spec(OlmoeForCausalLM, cfg, 0, 5, 3, ROUTED)


def deepseek_v3():
    NG, TG, RSF = 4, 2, 1.7
    cfg = DeepseekV3Config(hidden_size=16, moe_intermediate_size=8, n_routed_experts=16, num_experts_per_tok=4,
                           n_group=NG, topk_group=TG, routed_scaling_factor=RSF, norm_topk_prob=True,
                           n_shared_experts=2, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=32,
                           q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4,
                           scoring_func="sigmoid", topk_method="noaux_tc", **SMALL)
    sh = {"gate.e_score_correction_bias": 0.1, "shared_experts.gate_proj.weight": 0.3,
          "shared_experts.up_proj.weight": 0.3, "shared_experts.down_proj.weight": 0.3}
    return spec(DeepseekV3ForCausalLM, cfg, 1, 6, 4, dict(ROUTED, **sh), NG=NG, TG=TG, RSF=RSF,
                shard="24KB")


CASES = [("mixtral", mixtral, 21000), ("qwen2_moe", qwen2_moe, 22000), ("qwen3_moe", qwen3_moe, 23000),
         ("olmoe", olmoe, 24000), ("deepseek_v3", deepseek_v3, 25000)]


def make_case(outdir, name, model_fn, base_seed):
    s = model_fn()
    model, block = build(s)
    for seed in range(base_seed, base_seed + 1000):
        fill_block(block, s["scales"], seed, "F32")
        torch.manual_seed(seed + 500000)
        x = torch.randn(s["T"], s["D"])
        if routing_ok(s, block, x):
            break
    else:
        raise RuntimeError("no acceptable seed for %s" % name)
    y_ref = run_block(block, x)

    path = os.path.join(outdir, name)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path, max_shard_size=s.get("shard", "1GB"))
    back = s["cls"].from_pretrained(path, experts_implementation="eager").eval()
    assert torch.equal(run_block(back.model.layers[s["layer"]].mlp, x), y_ref), name

    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if "shard" in s:                       # the MoE layer must span shards
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            wm = json.load(f)["weight_map"]
        prefix = "model.layers.%d.mlp." % s["layer"]
        held = {v for k, v in wm.items() if k.startswith(prefix)}
        assert len(held) >= 2, "%s: the MoE layer is in one shard: %s" % (name, held)
    io = os.path.join(path, "io.safetensors")
    save_file({"x": x.contiguous(), "y_ref": y_ref}, io,
              metadata={"layer": str(s["layer"]), "generator": "tests/ref/gen_checkpoints.py (seed %d)" % seed,
                        "versions": VERSIONS})
    canonical_metadata(io)                 # sorted keys: the same bytes every run
    with safe_open(io, "pt") as f:
        assert torch.equal(f.get_tensor("y_ref"), y_ref)
    for f in os.listdir(path):
        os.chmod(os.path.join(path, f), 0o644)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return "%s: layer %d, seed %d, %d shard(s), %d bytes" % (name, s["layer"], seed, len(shards), size)


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "ckpt")
    os.makedirs(outdir, exist_ok=True)
    print("versions:", VERSIONS)
    for name, fn, seed in CASES:
        print("wrote", make_case(outdir, name, fn, seed))


if __name__ == "__main__":
    main()
