"""forward, backward, route and pack on NumPy arrays."""
import numpy as np
import pytest

import moe
from reference import moe_layer, random_weights, softmax, topk

E, K, D, F = 6, 2, 16, 24


def mixtral(**kw):
    return moe.Config("mixtral", num_experts=E, top_k=K, d_model=D, d_ff=F, **kw)


def layer(cfg, seed=1, fused=False):
    return moe.Weights(cfg, fused=fused, **random_weights(moe.weight_shapes(cfg, fused), seed))


def tokens(T, seed=2):
    return np.random.default_rng(seed).standard_normal((T, D)).astype(np.float32)


# --- forward against the NumPy reference ---------------------------------------

@pytest.mark.parametrize("T", [1, 7, 64])
def test_forward_matches_reference(T):
    cfg = mixtral()
    w = layer(cfg)
    x = tokens(T)
    y, info = moe.forward(cfg, w, x)
    y_ref, expert, weight = moe_layer(x, w.arrays, K)
    assert y.dtype == np.float32 and y.shape == (T, D)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(info.expert, expert)
    np.testing.assert_allclose(info.weight, weight, rtol=1e-5)
    assert info.expert_routed.sum() == T * K


def test_qwen2_like_shared_expert():
    cfg = moe.Config("qwen2_moe", num_experts=E, top_k=4, d_model=D, d_ff=F, shared_d_ff=32)
    w = layer(cfg)
    x = tokens(9)
    y, _ = moe.forward(cfg, w, x)
    y_ref, _, _ = moe_layer(x, w.arrays, 4, renormalize=False, shared=True)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)


def test_fused_gate_up_is_the_same_layer():
    cfg = mixtral()
    w = layer(cfg)
    gate_up = np.ascontiguousarray(np.concatenate([w["gate"], w["up"]], axis=1))
    wf = moe.Weights(cfg, fused=True, router=w["router"], gate=gate_up, down=w["down"])
    x = tokens(5)
    np.testing.assert_array_equal(moe.forward(cfg, wf, x)[0], moe.forward(cfg, w, x)[0])


def test_batch_dimensions_and_in_place():
    cfg = mixtral()
    w = layer(cfg)
    x = tokens(12).reshape(3, 4, D)
    y, info = moe.forward(cfg, w, x)
    assert y.shape == (3, 4, D) and info.expert.shape == (12, K)
    x2 = x.copy()
    y2, _ = moe.forward(cfg, w, x2, out=x2)
    np.testing.assert_array_equal(x2, y)
    assert y2 is x2


def test_zero_tokens():
    cfg = mixtral()
    y, info = moe.forward(cfg, layer(cfg), np.zeros((0, D), np.float32), save_for_backward=True)
    assert y.shape == (0, D) and info.expert.shape == (0, K) and info.dropped_pairs == 0
    dx, grads = moe.backward(cfg, layer(cfg), np.zeros((0, D), np.float32), info,
                             np.zeros((0, D), np.float32))
    assert dx.shape == (0, D) and not any(g.any() for g in grads.values())


def test_threads_are_bitwise_deterministic():
    cfg = mixtral()
    w = layer(cfg)
    x = tokens(100)
    ys = [moe.forward(cfg.replace(num_threads=n), w, x)[0] for n in (1, 2, 3)]
    np.testing.assert_array_equal(ys[0], ys[1])
    np.testing.assert_array_equal(ys[0], ys[2])
    y, info = moe.forward(cfg, w, x, save_for_backward=True)
    dy = tokens(100, seed=5)
    g1 = moe.backward(cfg.replace(num_threads=1), w, x, info, dy)
    g2 = moe.backward(cfg.replace(num_threads=2), w, x, info, dy)
    np.testing.assert_array_equal(g1[0], g2[0])
    for n in g1[1]:
        np.testing.assert_array_equal(g1[1][n], g2[1][n])


# --- argument checks -------------------------------------------------------------

def test_dtype_is_refused_not_converted():
    cfg = mixtral()
    with pytest.raises(TypeError, match="x: dtype float64, expected float32"):
        moe.forward(cfg, layer(cfg), tokens(3).astype(np.float64))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        moe.forward(cfg, layer(cfg), tokens(3).tolist())
    w = random_weights(moe.weight_shapes(cfg), 1)
    w["gate"] = w["gate"].astype(np.float16)
    with pytest.raises(TypeError, match="gate: dtype float16"):
        moe.Weights(cfg, **w)


def test_shapes_are_checked():
    cfg = mixtral()
    with pytest.raises(ValueError, match=r"x: shape \(3, 15\), expected \(T, 16\)"):
        moe.forward(cfg, layer(cfg), np.zeros((3, 15), np.float32))
    with pytest.raises(ValueError, match="x: shape"):
        moe.forward(cfg, layer(cfg), np.zeros(16, np.float32))
    w = random_weights(moe.weight_shapes(cfg), 1)
    w["down"] = np.zeros((E, F, D), np.float32)
    with pytest.raises(ValueError, match=r"down: shape \(6, 24, 16\), expected \(6, 16, 24\)"):
        moe.Weights(cfg, **w)
    with pytest.raises(ValueError, match="does not read 'up'"):
        moe.Weights(cfg, fused=True, **random_weights(moe.weight_shapes(cfg), 1))
    with pytest.raises(TypeError, match="unknown tensor 'gate_proj'"):
        moe.Weights(cfg, gate_proj=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="for this config"):
        moe.forward(cfg.replace(d_ff=8), layer(cfg), tokens(3))


def test_contiguity_is_checked():
    cfg = mixtral()
    x = np.zeros((D, 5), np.float32).T
    with pytest.raises(ValueError, match="x: not a C-contiguous"):
        moe.forward(cfg, layer(cfg), x)
    w = random_weights(moe.weight_shapes(cfg), 1)
    w["router"] = np.asfortranarray(w["router"])
    with pytest.raises(ValueError, match="router: not a C-contiguous"):
        moe.Weights(cfg, **w)
    y = np.zeros((5, D), np.float32)
    y.flags.writeable = False
    with pytest.raises(ValueError, match="out: read-only"):
        moe.forward(cfg, layer(cfg), tokens(5), out=y)


def test_status_errors():
    cfg = mixtral()
    w = random_weights(moe.weight_shapes(cfg), 1)
    del w["up"]
    with pytest.raises(moe.MoeError, match="moe_forward: MOE_STATUS_MISSING_WEIGHT") as e:
        moe.forward(cfg, moe.Weights(cfg, **w), tokens(3))
    assert e.value.status == moe.lib.MOE_STATUS_MISSING_WEIGHT
    x = tokens(3)
    x[1, 2] = np.nan
    with pytest.raises(moe.MoeError, match="NONFINITE"):
        moe.forward(cfg, layer(cfg), x)
    _, info = moe.forward(cfg, layer(cfg), tokens(3))            # not saved
    with pytest.raises(moe.MoeError, match="MISSING_CACHE"):
        moe.backward(cfg, layer(cfg), tokens(3), info, tokens(3))
    _, info = moe.forward(cfg, layer(cfg), tokens(3), save_for_backward=True)
    with pytest.raises(moe.MoeError, match="BAD_CACHE"):           # another config
        moe.backward(cfg.replace(top_k=1), layer(cfg), tokens(3), info, tokens(3))
    with pytest.raises(ValueError, match="read-only"):             # routing arrays are kept
        info.expert[0, 0] = 1


# --- backward ----------------------------------------------------------------------

def test_backward_matches_finite_differences():
    """moe_backward's dx and weight gradients against central differences of
    the float64 reference's <dy, y> (no aux loss: balance_coef = 0)."""
    cfg = mixtral(balance_coef=0.0)
    w = layer(cfg)
    x = tokens(4)
    dy = tokens(4, seed=9)
    _, info = moe.forward(cfg, w, x, save_for_backward=True)
    dx, grads = moe.backward(cfg, w, x, info, dy)
    assert set(grads) == {"router", "gate", "up", "down"}
    ref = {n: a.astype(np.float64) for n, a in w.arrays.items()}

    def objective(xx, ww):
        return float((moe_layer(xx, ww, K)[0] * dy).sum())

    rng = np.random.default_rng(3)
    h = 1e-5
    for name, g in [("x", dx)] + sorted(grads.items()):
        target = x.astype(np.float64) if name == "x" else ref[name]
        for flat in rng.choice(target.size, 6, replace=False):
            idx = np.unravel_index(flat, target.shape)
            plus, minus = target.copy(), target.copy()
            plus[idx] += h
            minus[idx] -= h
            if name == "x":
                num = (objective(plus, ref) - objective(minus, ref)) / (2 * h)
            else:
                num = (objective(x, {**ref, name: plus}) - objective(x, {**ref, name: minus})) / (2 * h)
            assert abs(g[idx] - num) <= 1e-3 * max(1.0, abs(num)), (name, idx, g[idx], num)


def test_grads_accumulate_and_dx_in_place():
    cfg = mixtral()
    w = layer(cfg)
    x = tokens(5)
    dy = tokens(5, seed=4)
    _, info = moe.forward(cfg, w, x, save_for_backward=True)
    dx, grads = moe.backward(cfg, w, x, info, dy)
    dx2, grads2 = moe.backward(cfg, w, x, info, dy, grads={n: g.copy() for n, g in grads.items()})
    for n in grads:
        np.testing.assert_allclose(grads2[n], 2 * grads[n], rtol=1e-6, atol=1e-7)
    dy2 = dy.copy()
    moe.backward(cfg, w, x, info, dy2, dx=dy2)
    np.testing.assert_array_equal(dy2, dx)
    only = moe.backward(cfg, w, x, info, dy, grads={"router": np.zeros((E, D), np.float32)})[1]
    np.testing.assert_array_equal(only["router"], grads["router"])


# --- route ---------------------------------------------------------------------------

def test_route_topk_softmax():
    cfg = mixtral()
    logits = np.random.default_rng(7).standard_normal((11, E)).astype(np.float32)
    info = moe.route(cfg, logits)
    p = softmax(logits.astype(np.float64))
    np.testing.assert_allclose(info.scores, p, rtol=1e-5)
    np.testing.assert_array_equal(info.logits, logits)
    np.testing.assert_array_equal(info.expert, topk(p, K))
    sel = np.take_along_axis(p, topk(p, K), axis=-1)
    np.testing.assert_allclose(info.weight, sel / sel.sum(-1, keepdims=True), rtol=1e-5)
    counts = np.bincount(info.expert.ravel(), minlength=E)
    np.testing.assert_array_equal(info.expert_routed, counts)
    # HF's load-balancing loss: E * sum_e (c_e / T) * mean_t p_te
    np.testing.assert_allclose(info.aux_balance, E * np.sum(counts / 11 * p.mean(0)), rtol=1e-5)


def test_route_capacity_and_selection_bias():
    cfg = moe.Config("mixtral", num_experts=4, top_k=1, d_model=8, d_ff=8, capacity=2)
    logits = np.zeros((6, 4), np.float32)
    logits[:, 3] = 1.0                       # every token wants expert 3
    info = moe.route(cfg, logits)
    assert (info.expert[:, 0] == 3).all() and info.dropped.sum() == 4 and info.capacity == 2
    assert info.dropped_pairs == 4 and (info.weight[info.dropped[:, 0] == 1] == 0).all()
    v3 = moe.Config("deepseek_v3", num_experts=8, top_k=2, n_group=1, topk_group=1,
                    d_model=8, d_ff=8)
    bias = np.zeros(8, np.float32)
    bias[5] = 10.0
    info = moe.route(v3, np.zeros((3, 8), np.float32), selection_bias=bias)
    assert (info.expert[:, 0] == 5).all()
    with pytest.raises(moe.MoeError, match="MISSING_WEIGHT"):
        moe.route(v3, np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match=r"logits: shape \(3, 5\), expected \(3, 8\)"):
        moe.route(v3, np.zeros((3, 5), np.float32))


# --- pack -------------------------------------------------------------------------------

@pytest.mark.skipif(moe.compiled_isa() == "reference", reason="packing needs SIMD kernels")
@pytest.mark.parametrize("pack_bf16", [0, 1])
def test_packed_forward_equals_unpacked(pack_bf16):
    cfg = moe.Config("qwen2_moe", num_experts=E, top_k=4, d_model=D, d_ff=F, shared_d_ff=32,
                     pack_bf16=pack_bf16)
    w = layer(cfg)
    x = tokens(33)
    wp = moe.pack(cfg, w)
    assert wp.packed is not None and wp.packed.nbytes > 0
    y, info = moe.forward(cfg, w, x)
    yp, infop = moe.forward(cfg, wp, x)
    np.testing.assert_array_equal(info.expert, infop.expert)
    if pack_bf16:    # bf16 panels: weights rounded to 8 bits of mantissa
        np.testing.assert_allclose(yp, y, rtol=0.05, atol=5e-3)
    else:
        np.testing.assert_allclose(yp, y, rtol=1e-5, atol=1e-6)
    # the packed layer trains: the backward reads the float tensors it kept
    _, info = moe.forward(cfg, wp, x, save_for_backward=True)
    moe.backward(cfg, wp, x, info, x)


def test_pack_refused_on_reference_kernels():
    cfg = mixtral(isa="reference")
    with pytest.raises(moe.MoeError, match="UNSUPPORTED"):
        moe.pack(cfg, layer(cfg))


def test_layer_object():
    cfg = mixtral()
    lay = moe.Layer(cfg, **random_weights(moe.weight_shapes(cfg), 1))
    x = tokens(4)
    y = lay(x)
    assert lay.info.expert.shape == (4, K)
    if moe.compiled_isa() != "reference":
        np.testing.assert_allclose(lay.pack()(x), y, rtol=1e-5, atol=1e-6)


# --- every preset ---------------------------------------------------------------------

@pytest.mark.parametrize("preset", moe.PRESETS)
def test_every_preset_runs_forward_and_backward(preset):
    """Each preset's routing family (top-k, groups, sigmoid, noise, expert choice,
    dense, Soft MoE, shared experts) through forward and backward at a small shape."""
    fields = dict(num_experts=16, d_model=32, d_ff=32)
    if moe.Config(preset).shared_d_ff:
        fields["shared_d_ff"] = 48
    cfg = moe.Config(preset, **fields)
    w = layer(cfg, seed=4)
    x = np.random.default_rng(5).standard_normal((20, 32)).astype(np.float32)
    y, info = moe.forward(cfg, w, x, save_for_backward=True)
    assert y.shape == x.shape and np.isfinite(y).all()
    S = moe.lib.moe_routing_slots(cfg._c)
    assert info.slots == S and (info.expert is None or info.expert.shape == (20, S))
    dx, grads = moe.backward(cfg, w, x, info, np.ones_like(y))
    assert np.isfinite(dx).all() and all(np.isfinite(g).all() for g in grads.values())
    assert set(grads) == set(w.arrays) - {"selection_bias"}
    if cfg.routing == "soft":
        assert info.dispatch.shape == (20, 16)
