"""moe.torch against PyTorch autograd of the same layer written in torch ops."""
import pytest

torch = pytest.importorskip("torch")
import moe  # noqa: E402
import moe.torch  # noqa: E402

E, D, F = 6, 16, 24


def torch_layer(x, p, top_k, renormalize, balance_coef, shared=False):
    """y and coef * HF load-balancing loss, plain torch ops (HF Mixtral / Qwen2-MoE style)."""
    T = x.shape[0]
    probs = torch.softmax(x @ p["router"].T, dim=-1)
    weight, expert = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weight = weight / weight.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    for e in range(E):
        tok, slot = torch.where(expert == e)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        h = torch.nn.functional.silu(xe @ p["gate"][e].T) * (xe @ p["up"][e].T)
        y = y.index_add(0, tok, (h @ p["down"][e].T) * weight[tok, slot, None])
    if shared:
        h = torch.nn.functional.silu(x @ p["shared_gate"].T) * (x @ p["shared_up"].T)
        y = y + torch.sigmoid(x @ p["shared_expert_gate"])[:, None] * (h @ p["shared_down"].T)
    counts = torch.nn.functional.one_hot(expert, E).sum((0, 1)).to(x.dtype)   # a constant
    aux = E * torch.sum(counts / T * probs.mean(0))
    return y, balance_coef * aux


CASES = {
    "mixtral": (dict(num_experts=E, top_k=2, d_model=D, d_ff=F), 2, True, False),
    "qwen2_moe": (dict(num_experts=E, top_k=4, d_model=D, d_ff=F, shared_d_ff=32), 4, False, True),
}


@pytest.mark.parametrize("preset", sorted(CASES))
def test_gradients_match_autograd(preset):
    fields, K, renorm, shared = CASES[preset]
    cfg = moe.Config(preset, **fields)
    layer = moe.torch.MoE(cfg, seed=3)
    torch.manual_seed(0)
    x = torch.randn(40, D, requires_grad=True)
    dy = torch.randn(40, D)
    y = layer(x)
    (y * dy).sum().backward()   # moe.h adds coef * aux loss by itself

    params = {n: t.detach().clone().requires_grad_() for n, t in layer.named_parameters()}
    x_ref = x.detach().clone().requires_grad_()
    y_ref, aux = torch_layer(x_ref, params, K, renorm, cfg.balance_coef, shared)
    ((y_ref * dy).sum() + aux).backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert layer.last_info.aux_total == pytest.approx(float(aux.detach()), rel=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for n, t in layer.named_parameters():
        torch.testing.assert_close(t.grad, params[n].grad, rtol=1e-5, atol=1e-6, msg=n)


def test_only_requested_gradients():
    cfg = moe.Config("mixtral", num_experts=E, d_model=D, d_ff=F)
    layer = moe.torch.MoE(cfg)
    layer.router.requires_grad_(False)
    x = torch.randn(5, D)                          # no grad wanted for x
    layer(x).sum().backward()
    assert layer.router.grad is None and layer.gate.grad is not None


def test_tensor_checks():
    layer = moe.torch.MoE(moe.Config("mixtral", num_experts=E, d_model=D, d_ff=F))
    with pytest.raises(TypeError, match="x: dtype torch.float64"):
        layer(torch.randn(3, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="x: not contiguous"):
        layer(torch.randn(D, 3).T)


def test_batch_shape_and_eval_mode():
    layer = moe.torch.MoE(moe.Config("switch", num_experts=E, d_model=D, d_ff=F)).eval()
    x = torch.randn(2, 3, D)
    y = layer(x)
    assert y.shape == (2, 3, D) and layer.last_info.expert.shape == (6, 1)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)   # eval: no jitter


def test_under_torch_compile():
    """torch.compile graph-breaks around the layer (compiler.disable) and runs it eagerly."""
    layer = moe.torch.MoE(moe.Config("mixtral", num_experts=E, d_model=D, d_ff=F))

    def block(x):
        return torch.relu(layer(x)) * 2.0

    x = torch.randn(8, D, requires_grad=True)
    y_eager = block(x)
    compiled = torch.compile(block, backend="eager")
    y = compiled(x)
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
