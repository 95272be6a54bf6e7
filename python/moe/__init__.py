"""moe: Python bindings of moe.h, the Mixture-of-Experts kernels in one C header.

    import numpy as np, moe
    cfg = moe.Config("mixtral", num_experts=8, d_model=64, d_ff=128)
    w = moe.Weights(cfg, router=router, gate=gate, up=up, down=down)
    y, info = moe.forward(cfg, w, x)                       # x: float32 [T][D]
    y, info = moe.forward(cfg, w, x, save_for_backward=True)
    dx, grads = moe.backward(cfg, w, x, info, dy)

moe.torch (imported on its own, needs PyTorch) wraps the layer as a
torch.autograd.Function whose backward is moe_backward.
"""
from ._core import (PRESETS, QTYPES, VERSION, Config, Info, Layer, MoeError, Quantized, Weights,
                    backward, compiled_isa, dequantize, forward, has_openmp, pack, qpack, quantize,
                    route, weight_shapes)
from ._moe_cffi import ffi, lib

__version__ = VERSION
__all__ = ["MoeError", "Config", "Weights", "Info", "Layer", "PRESETS", "VERSION",
           "compiled_isa", "has_openmp", "weight_shapes", "forward", "backward", "route", "pack",
           "Quantized", "quantize", "dequantize", "qpack", "QTYPES", "ffi", "lib"]
