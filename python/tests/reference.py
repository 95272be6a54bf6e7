"""NumPy reference of a top-k softmax MoE layer (Mixtral / Qwen2-MoE), float64.

Written from the formulas of docs/ROUTING.md, independent of moe.h's code:
softmax over the E router logits, the top-k (ties to the lower index),
optional renormalisation, SwiGLU experts, optional sigmoid-gated shared expert.
"""
import numpy as np


def silu(v):
    return v / (1.0 + np.exp(-v))


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def topk(p, k):
    # stable sort of -p: equal scores keep index order, so ties go to the lower index
    return np.argsort(-p, axis=-1, kind="stable")[:, :k]


def swiglu(x, gate, up, down):
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def moe_layer(x, w, top_k, renormalize=True, shared=False):
    """y [T][D], expert [T][K], weight [T][K] of the layer, in float64."""
    x = x.astype(np.float64)
    w = {n: a.astype(np.float64) for n, a in w.items()}
    p = softmax(x @ w["router"].T)
    expert = topk(p, top_k)
    weight = np.take_along_axis(p, expert, axis=-1)
    if renormalize:
        weight = weight / weight.sum(axis=-1, keepdims=True)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = expert[t, j]
            y[t] += weight[t, j] * swiglu(x[t:t + 1], w["gate"][e], w["up"][e], w["down"][e])[0]
    if shared:
        s = swiglu(x, w["shared_gate"], w["shared_up"], w["shared_down"])
        g = 1.0 / (1.0 + np.exp(-(x @ w["shared_expert_gate"].reshape(-1))))
        y += g[:, None] * s
    return y, expert, weight


def random_weights(cfg_shapes, seed, scale=0.2):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in cfg_shapes.items()}
