"""PyTorch wrapper: the layer as a torch.autograd.Function whose backward is
moe_backward, and an nn.Module holding its parameters.

    import moe, moe.torch
    layer = moe.torch.MoE(moe.Config("mixtral", num_experts=8, d_model=64, d_ff=128))
    y = layer(x)                  # x: float32 CPU tensor [..., D]
    (y * dy).sum().backward()     # gradients of x and every parameter

The gradients are moe.h's: those of <dy, y> plus every aux loss times its
coefficient (cfg.balance_coef, ...), which enter by themselves as in
moe_backward; layer.last_info.aux_total is their value (for logging).
Tensors are checked as the NumPy calls check arrays: float32, contiguous,
on the CPU; nothing is converted. torch.compile does not trace into the layer:
moe_layer is marked torch.compiler.disable (a graph break; eager there).
"""
import numpy as np
import torch

from . import _core
from ._moe_cffi import ffi, lib

__all__ = ["MoEFunction", "moe_layer", "MoE"]


def _array(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError("%s: expected a torch.Tensor, got %s" % (name, type(t).__name__))
    if t.device.type != "cpu":
        raise ValueError("%s: on %s; moe.h runs on the CPU" % (name, t.device))
    if t.dtype != torch.float32:
        raise TypeError("%s: dtype %s, expected torch.float32" % (name, t.dtype))
    if not t.is_contiguous():
        raise ValueError("%s: not contiguous (use .contiguous())" % name)
    return t.detach().numpy()


class MoEFunction(torch.autograd.Function):
    """apply(cfg, fused, names, report, x, *tensors) -> y.

    names: the moe_weights name of each tensor; report: a dict that receives
    the forward's moe.Info under "info" (a Function returns tensors only)."""

    @staticmethod
    def forward(ctx, cfg, fused, names, report, x, *tensors):
        w = _core.Weights(cfg, fused=fused, **{n: _array(n, t) for n, t in zip(names, tensors)})
        y, info = _core.forward(cfg, w, _array("x", x), save_for_backward=True)
        report["info"] = info
        ctx.cfg, ctx.w, ctx.info, ctx.names = cfg, w, info, names
        ctx.save_for_backward(x, *tensors)     # autograd notices in-place changes to them
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, dy):
        x, *tensors = ctx.saved_tensors
        need = ctx.needs_input_grad[5:]
        # dy comes from autograd (e.g. an expanded scalar): make it what moe.h reads
        dy = dy.to(torch.float32).contiguous().numpy()
        grads = {n: np.zeros(t.shape, np.float32)
                 for n, t, g in zip(ctx.names, tensors, need) if g and n != "selection_bias"}
        dx, grads = _core.backward(ctx.cfg, ctx.w, x.detach().numpy(), ctx.info, dy,
                                   grads=grads)
        dx = torch.from_numpy(dx) if ctx.needs_input_grad[4] else None
        return (None, None, None, None, dx,
                *[torch.from_numpy(grads[n]) if n in grads else None for n in ctx.names])


def _disable(fn):
    compiler = getattr(torch, "compiler", None)
    return compiler.disable(fn) if compiler is not None and hasattr(compiler, "disable") else fn


@_disable
def moe_layer(cfg, x, weights, fused=False, report=None):
    """y = the layer on x [..., D] with weights {moe_weights name: tensor}."""
    names = tuple(weights)
    return MoEFunction.apply(cfg, fused, names, {} if report is None else report, x,
                             *[weights[n] for n in names])


_INIT = {"xavier": lib.MOE_INIT_XAVIER, "switch": lib.MOE_INIT_SWITCH}


class MoE(torch.nn.Module):
    """The layer with its tensors (weight_shapes(cfg, fused)) as parameters,
    initialised by moe_init_weights (init "xavier" or "switch", seed); the
    selection bias is a buffer (it has no gradient). The config's training
    field follows module.train() / eval()."""

    def __init__(self, cfg, fused=False, init="xavier", seed=0):
        super().__init__()
        if init not in _INIT:
            raise ValueError("init: %r, expected one of %s" % (init, ", ".join(_INIT)))
        self.cfg, self.fused, self.last_info = cfg, bool(fused), None
        self._names = tuple(_core.weight_shapes(cfg, fused))
        g = ffi.new("moe_grads *")
        g.gate_up_fused = int(self.fused)
        for name, shape in _core.weight_shapes(cfg, fused).items():
            t = torch.zeros(shape, dtype=torch.float32)
            setattr(g, name, ffi.cast("float *", t.data_ptr()))
            if name == "selection_bias":
                self.register_buffer(name, t)
            else:
                setattr(self, name, torch.nn.Parameter(t))
        _core._check(lib.moe_init_weights(cfg._c, _INIT[init], seed, g), "moe_init_weights")

    def forward(self, x):
        cfg = self.cfg
        if cfg.training != int(self.training):
            cfg = cfg.replace(training=int(self.training))
        report = {}
        y = moe_layer(cfg, x, {n: getattr(self, n) for n in self._names}, self.fused, report)
        self.last_info = report.get("info")
        return y

    def extra_repr(self):
        return repr(self.cfg) + (", fused" if self.fused else "")
