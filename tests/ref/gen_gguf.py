#!/usr/bin/env python3
"""Generate the GGUF files tests/ref/gguf/<case>.gguf that tests/test_gguf.c
loads through examples/gguf_moe.c.

Each file holds ONE MoE layer under llama.cpp's tensor names (blk.N.ffn_*),
the model's routing metadata under llama.cpp's keys ({arch}.expert_count,
...), written by the PyPI package `gguf` (gguf.GGUFWriter, llama.cpp's own
writer), plus two F32 tensors:
    x      ne [D, T]  the block input   (numpy [T][D])
    y_ref  ne [D, T]  the expected output of the MoE block (no residual)

Two kinds of case:
  * HF cases (<model>_f32.gguf): the weights, x and y_ref of
    tests/ref/<model>.safetensors (gen_safetensors.py: y_ref is the HF
    transformers block's output) renamed and stacked as llama.cpp's
    convert_hf_to_gguf.py does. They check that the loader's reading of the
    metadata gives HF's routing.
  * quantized cases: experts in Q8_0, Q4_0, Q4_K or MXFP4 blocks (quantized
    by gguf.quants.quantize; Q4_K, which gguf cannot quantize, as random
    super-blocks). y_ref is computed here in float64 from the weights gguf
    dequantizes (gguf.quants.dequantize), routed as llama.cpp's
    build_moe_ffn does. That float64 layer is first checked against the HF
    cases' y_ref (1e-5), so it is the HF routing too.

Inputs are drawn so that every top-k and group boundary has a key gap above
1e-3: tie-breaking and int8 activation error never change the routing.

Usage: python3 tests/ref/gen_gguf.py [outdir]  (default tests/ref/gguf)
Needs: pip install gguf==0.19.0 numpy (tests/ref/requirements.txt).
"""

import json
import os
import struct
import sys
from importlib import metadata

import numpy as np
import gguf
from gguf.constants import GGMLQuantizationType as QT
from gguf.quants import quantize, dequantize

HERE = os.path.dirname(os.path.abspath(__file__))


def read_safetensors(path):
    """{name: float32 array}, metadata, for the F32 files gen_safetensors.py writes."""
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    head = json.loads(b[8:8 + n])
    meta = head.pop("__metadata__", {})
    out = {}
    for name, t in head.items():
        assert t["dtype"] == "F32", (path, name, t["dtype"])
        lo, hi = t["data_offsets"]
        out[name] = np.frombuffer(b[8 + n + lo:8 + n + hi], dtype="<f4").reshape(t["shape"])
    return out, meta


# ---------------------------------------------------------------------------
# The layer in float64, routed as llama.cpp's build_moe_ffn (src/llama-graph.cpp)

def moe_layer(x, L):
    """x [T][D]; L: dict of float64 weights [E][F][D] etc. and routing fields."""
    x = x.astype(np.float64)
    z = x @ L["router"].T                                   # [T][E]
    if L["gating"] == "sigmoid":
        p = 1.0 / (1.0 + np.exp(-z))
    else:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
    sel = p + L["bias"] if L.get("bias") is not None else p.copy()
    T, E = p.shape
    G, Gk, K = L["n_group"], L["topk_group"], L["K"]
    gaps = []
    if G > 1:                                  # group score: sum of its top 2 keys
        g = np.sort(sel.reshape(T, G, E // G), axis=2)[:, :, -2:].sum(axis=2)
        order = np.argsort(-g, axis=1, kind="stable")
        gs = -np.sort(-g, axis=1)
        gaps.append((gs[:, Gk - 1] - gs[:, Gk]).min())
        mask = np.full((T, G), True)
        np.put_along_axis(mask, order[:, :Gk], False, axis=1)
        sel = np.where(np.repeat(mask, E // G, axis=1), -np.inf, sel)
    top = np.argsort(-sel, axis=1, kind="stable")[:, :K]
    ss = -np.sort(-sel, axis=1)
    if K < E:
        gaps.append((ss[:, K - 1] - ss[:, K]).min())
    w = np.take_along_axis(p, top, axis=1)
    if L["norm"]:
        w = w / np.maximum(w.sum(axis=1, keepdims=True), 6.103515625e-5)
    w = w * L["scale"]
    y = np.zeros_like(x)
    silu = lambda v: v / (1.0 + np.exp(-v))
    for t in range(T):
        for k in range(K):
            j = top[t, k]
            h = silu(L["gate"][j] @ x[t]) * (L["up"][j] @ x[t])
            y[t] += w[t, k] * (L["down"][j] @ h)
    if L.get("sh_gate") is not None:
        h = silu(x @ L["sh_gate"].T) * (x @ L["sh_up"].T)
        s = h @ L["sh_down"].T
        if L.get("sh_egate") is not None:
            s = s / (1.0 + np.exp(-(x @ L["sh_egate"])))[:, None]
        y += s
    return y, min(gaps) if gaps else np.inf


# ---------------------------------------------------------------------------
# Writing

def rows_f16_exact(a):
    return a.astype(np.float16).astype(np.float64)


def put(wr, name, arr, qtype=QT.F32):
    """arr: float array in numpy (row-major, outermost first) order."""
    if qtype == QT.F32:
        wr.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    elif qtype == QT.F16:
        wr.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float16))
    elif qtype == QT.BF16:
        b = (np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
        wr.add_tensor(name, b.view(np.uint8), raw_dtype=QT.BF16)
    else:
        raise ValueError(qtype)


def put_blocks(wr, name, blocks, qtype):
    wr.add_tensor(name, blocks, raw_dtype=qtype)


def random_q4_k(rng, rows, n):
    """rows x n values as random Q4_K super-blocks (bytes [rows][n/256*144])."""
    nb = rows * (n // 256)
    raw = rng.integers(0, 256, size=(nb, 144), dtype=np.uint8)
    dd = (np.abs(rng.standard_normal((nb, 2))) * 4e-4 + 1e-4).astype(np.float16)
    raw[:, 0:4] = dd.view(np.uint8).reshape(nb, 4)
    return raw.reshape(rows, (n // 256) * 144)


def quantized(rng, shape, qtype, std):
    """(blocks [..][row bytes], their float64 values) for a weight of shape."""
    rows, n = int(np.prod(shape[:-1])), shape[-1]
    if qtype == QT.Q4_K:
        b = random_q4_k(rng, rows, n)
    else:
        b = quantize((rng.standard_normal((rows, n)) * std).astype(np.float32), qtype)
    v = dequantize(b, qtype).astype(np.float64).reshape(shape)
    return b.reshape(tuple(shape[:-1]) + (b.shape[-1],)), v


def writer(path, arch, layer, kv):
    wr = gguf.GGUFWriter(path, arch)
    wr.add_string("general.name", os.path.basename(path))
    wr.add_string("general.description", "moe.h test layer: tests/ref/gen_gguf.py, gguf %s"
                  % metadata.version("gguf"))
    wr.add_uint32(arch + ".block_count", layer + 1)
    for k, v in kv.items():
        key = arch + "." + k
        if isinstance(v, list):                    # one value per layer
            wr.add_array(key, v)
        elif isinstance(v, bool):
            wr.add_bool(key, v)
        elif isinstance(v, float):
            wr.add_float32(key, v)
        else:
            wr.add_uint32(key, v)
    return wr


def finish(wr, x, y):
    put(wr, "x", x)
    put(wr, "y_ref", y)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


# ---------------------------------------------------------------------------
# HF cases: the safetensors checkpoints, renamed

def hf_case(outdir, stem):
    st, meta = read_safetensors(os.path.join(HERE, stem + ".safetensors"))
    layer = int(meta["layer"])
    P = "model.layers.%d.%s" % (layer, "block_sparse_moe." if stem == "mixtral" else "mlp.")
    E, D = st[P + "gate.weight"].shape
    names = {"mixtral": ("w1", "w3", "w2")}.get(stem, ("gate_proj", "up_proj", "down_proj"))
    stack = lambda n: np.stack([st["%sexperts.%d.%s.weight" % (P, j, n)] for j in range(E)])
    L = dict(router=st[P + "gate.weight"], gate=stack(names[0]), up=stack(names[1]),
             down=stack(names[2]), K=int(meta["num_experts_per_tok"]), n_group=1,
             topk_group=1, scale=1.0, gating="softmax", bias=None)
    arch = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "deepseek_v3": "deepseek2"}[stem]
    F = L["gate"].shape[1]
    kv = {"expert_count": E, "expert_used_count": L["K"], "embedding_length": D,
          "expert_feed_forward_length": F}
    sh = "shared_experts." if stem == "deepseek_v3" else "shared_expert."
    if stem == "mixtral":
        L["norm"] = True                            # llama.cpp's llama arch: always
    elif stem == "qwen2_moe":
        assert meta["norm_topk_prob"] == "false"    # llama.cpp's qwen2moe: never
        L["norm"] = False
        L["sh_egate"] = st[P + "shared_expert_gate.weight"][0]
    else:
        L.update(norm=meta["norm_topk_prob"] == "true", gating="sigmoid",
                 n_group=int(meta["n_group"]), topk_group=int(meta["topk_group"]),
                 scale=float(meta["routed_scaling_factor"]),
                 bias=st[P + "gate.e_score_correction_bias"])
        kv.update(expert_gating_func=2, expert_weights_norm=L["norm"],
                  expert_weights_scale=L["scale"], expert_group_count=L["n_group"],
                  expert_group_used_count=L["topk_group"])
    if stem != "mixtral":
        L.update(sh_gate=st[P + sh + "gate_proj.weight"], sh_up=st[P + sh + "up_proj.weight"],
                 sh_down=st[P + sh + "down_proj.weight"])
        Fs = L["sh_gate"].shape[0]
        if stem == "deepseek_v3":
            assert Fs % F == 0
            kv["expert_shared_count"] = Fs // F
        else:
            kv["expert_shared_feed_forward_length"] = Fs
    x, y_hf = st["x"], st["y_ref"]
    y, gap = moe_layer(x, {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v)
                           for k, v in L.items()})
    err = np.abs(y - y_hf).max() / np.abs(y_hf).max()
    assert err < 1e-5, "%s: the float64 layer is %.3g off HF's y_ref" % (stem, err)
    path = os.path.join(outdir, "%s_f32.gguf" % arch)
    wr = writer(path, arch, layer, kv)
    write_layer(wr, layer, L, {})
    finish(wr, x, y_hf)                             # HF's own output is the reference
    return path, err


def write_layer(wr, layer, L, types):
    """L's tensors under llama.cpp's names; types[name] = blocks for quantized ones."""
    b = "blk.%d." % layer
    put(wr, b + "ffn_gate_inp.weight", L["router"], types.get("router", QT.F32))
    if L.get("bias") is not None:
        put(wr, b + "exp_probs_b.bias", L["bias"])
    for part in ("gate_up", "down") if "gate_up" in types else ("gate", "up", "down"):
        name = b + "ffn_%s_exps.weight" % part
        if part in types:
            put_blocks(wr, name, *types[part])
        else:
            put(wr, name, L[part])
    if L.get("sh_gate") is not None:
        t = types.get("shexp", QT.F32)
        for part in ("gate", "up", "down"):
            name = b + "ffn_%s_shexp.weight" % part
            if "sh_" + part in types:
                put_blocks(wr, name, *types["sh_" + part])
            else:
                put(wr, name, L["sh_" + part], t)
    if L.get("sh_egate") is not None:
        put(wr, b + "ffn_gate_inp_shexp.weight", L["sh_egate"])


# ---------------------------------------------------------------------------
# Quantized cases

def draw_x(rng, L, T, D):
    """x [T][D] with every routing boundary's key gap above 1e-3."""
    for _ in range(1000):
        x = rng.standard_normal((T, D)).astype(np.float32)
        y, gap = moe_layer(x, L)
        if gap > 1e-3:
            return x, y
    raise RuntimeError("no input with clear routing")


def quant_case(outdir, rng, arch, layer, E, K, D, F, types, Fs=0, sh_gated=False,
               groups=(1, 1), gating="softmax", norm=True, scale=1.0, bias=False,
               router_type=QT.F32, shexp_type=QT.F32, fused=False, T=9, k_per_layer=False):
    L = dict(K=K, n_group=groups[0], topk_group=groups[1], gating=gating, norm=norm,
             scale=scale, bias=None)
    blocks = {}
    r = rng.standard_normal((E, D)) * (2.0 / np.sqrt(D))
    if router_type == QT.BF16:
        r = r.astype(np.float32).view(np.uint32) & 0xFFFF0000
        r = r.view(np.float32).astype(np.float64)
    elif router_type == QT.F16:
        r = rows_f16_exact(r)
    L["router"] = r
    if bias:
        L["bias"] = (rng.standard_normal(E) * 0.05).astype(np.float32).astype(np.float64)
    if fused:
        blocks["gate_up"] = quantized(rng, (E, 2 * F, D), types[0], 0.05)
        L["gate"], L["up"] = blocks["gate_up"][1][:, :F], blocks["gate_up"][1][:, F:]
        blocks["gate_up"] = (blocks["gate_up"][0], types[0])
    else:
        for part, qt in (("gate", types[0]), ("up", types[1])):
            bl, L[part] = quantized(rng, (E, F, D), qt, 0.05)
            blocks[part] = (bl, qt)
    bl, L["down"] = quantized(rng, (E, D, F), types[2], 0.05)
    blocks["down"] = (bl, types[2])
    kv = {"expert_count": E, "expert_used_count": K, "embedding_length": D,
          "expert_feed_forward_length": F}
    if k_per_layer:                                # as newer llama.cpp files may
        kv["expert_used_count"] = [E] * layer + [K]
    if Fs:
        for part, shp in (("sh_gate", (Fs, D)), ("sh_up", (Fs, D)), ("sh_down", (D, Fs))):
            if shexp_type in (QT.F32, QT.F16):
                v = rng.standard_normal(shp) * 0.05
                L[part] = rows_f16_exact(v) if shexp_type == QT.F16 else \
                    v.astype(np.float32).astype(np.float64)
            else:
                bl, L[part] = quantized(rng, shp, shexp_type, 0.05)
                blocks[part] = (bl, shexp_type)
        if sh_gated:
            L["sh_egate"] = (rng.standard_normal(D) * 0.1).astype(np.float32).astype(np.float64)
        if arch == "deepseek2":
            kv["expert_shared_count"] = Fs // F
        else:
            kv["expert_shared_feed_forward_length"] = Fs
    if arch == "deepseek2":
        kv.update(expert_gating_func={"softmax": 1, "sigmoid": 2}[gating],
                  expert_weights_norm=norm, expert_weights_scale=scale)
    elif scale != 1.0:
        kv["expert_weights_scale"] = scale
    if groups[0] > 1:
        kv.update(expert_group_count=groups[0], expert_group_used_count=groups[1])
    x, y = draw_x(rng, L, T, D)
    name = "%s_%s.gguf" % (arch, "_".join(sorted({t.name.lower() for t in types})))
    path = os.path.join(outdir, name)
    wr = writer(path, arch, layer, kv)
    types_w = dict(blocks, router=router_type, shexp=shexp_type)
    write_layer(wr, layer, L, types_w)
    finish(wr, x, y.astype(np.float32))
    return path


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "gguf")
    os.makedirs(outdir, exist_ok=True)
    for stem in ("mixtral", "qwen2_moe", "deepseek_v3"):
        path, err = hf_case(outdir, stem)
        print("%s: float64 layer vs HF y_ref %.2g" % (path, err))
    rng = np.random.default_rng(18000)
    # Qwen2-MoE: Q8_0 experts, F16 gated shared expert, no renormalisation
    print(quant_case(outdir, rng, "qwen2moe", 0, E=8, K=2, D=64, F=32,
                     types=(QT.Q8_0, QT.Q8_0, QT.Q8_0), Fs=64, sh_gated=True,
                     norm=False, shexp_type=QT.F16))
    # Mixtral (llama arch): fused gate_up in Q4_K (rows of D = 256), down in Q4_0, BF16 router
    print(quant_case(outdir, rng, "llama", 2, E=4, K=2, D=256, F=32,
                     types=(QT.Q4_K, QT.Q4_K, QT.Q4_0), fused=True, router_type=QT.BF16))
    # DeepSeek-V3 (deepseek2 arch): MXFP4, sigmoid, bias, groups 4 keep 2, x2.5, Q8_0 shared
    print(quant_case(outdir, rng, "deepseek2", 1, E=16, K=4, D=64, F=32,
                     types=(QT.MXFP4, QT.MXFP4, QT.MXFP4), Fs=32, groups=(4, 2),
                     gating="sigmoid", norm=True, scale=2.5, bias=True, shexp_type=QT.Q8_0))
    # Qwen3-MoE: Q4_0 gate/up, Q8_0 down, renormalised, K given per layer
    print(quant_case(outdir, rng, "qwen3moe", 1, E=8, K=3, D=64, F=64,
                     types=(QT.Q4_0, QT.Q4_0, QT.Q8_0), norm=True, k_per_layer=True))


if __name__ == "__main__":
    main()
