"""NumPy front end of moe.h: configs, weights, forward, backward, route, pack.

Arrays are checked, never converted: a float64 or non-contiguous array is an
error naming the argument, because a silent copy would hide its cost and
break in-place semantics (moe.h's y may be x). Every C status other than OK
becomes a MoeError carrying moe_status_string.
"""
import numpy as np

from ._moe_cffi import ffi, lib

__all__ = ["MoeError", "Config", "Weights", "Info", "PRESETS", "compiled_isa", "has_openmp",
           "weight_shapes", "forward", "backward", "route", "pack", "Layer", "Quantized",
           "quantize", "dequantize", "QTYPES"]

if not lib.moe_py_cpu_ok():
    raise ImportError("moe: this extension was built for the %s kernels, which this CPU lacks; "
                      "rebuild it here (pip install ./python) or with MOE_ISA=reference"
                      % ffi.string(lib.moe_isa_name(lib.moe_compiled_isa())).decode())

VERSION = "%d.%d.%d" % (lib.MOE_VERSION_MAJOR, lib.MOE_VERSION_MINOR, lib.MOE_VERSION_PATCH)

_STATUS_NAMES = {v: k[len("MOE_STATUS_"):]
                 for v, k in ffi.typeof("moe_status").elements.items()}


class MoeError(RuntimeError):
    """A moe.h call returned a status other than MOE_STATUS_OK.

    status: the moe_status value; name: its name without MOE_STATUS_
    (e.g. "BAD_TOP_K"); str(): the call, the name and moe_status_string."""

    def __init__(self, status, call):
        self.status = int(status)
        self.name = _STATUS_NAMES.get(self.status, str(self.status))
        self.call = call
        text = ffi.string(lib.moe_status_string(self.status)).decode()
        super().__init__("%s: MOE_STATUS_%s: %s" % (call, self.name, text))


def _check(status, call):
    if status != lib.MOE_STATUS_OK:
        raise MoeError(status, call)


def compiled_isa():
    """The kernels MOE_ISA_AUTO runs in this build: "avx512", "avx2", "neon" or "reference"."""
    return ffi.string(lib.moe_isa_name(lib.moe_compiled_isa())).decode()


def has_openmp():
    """Whether the extension was built with OpenMP (cfg num_threads then applies)."""
    return bool(lib.moe_py_openmp())


# --- config ------------------------------------------------------------------

PRESETS = tuple(sorted(n[len("moe_preset_"):] for n in dir(lib) if n.startswith("moe_preset_")))

_CONFIG_FIELDS = dict(ffi.typeof("moe_config").fields)
# pointer fields (the thread-pool hook) have no Python value
_SETTABLE = tuple(n for n, f in _CONFIG_FIELDS.items() if f.type.kind in ("primitive", "enum"))


def _enum_names(ctype):
    """{lower-case short name: value} of an enum, e.g. moe_routing -> {"topk": 0, ...}."""
    names = list(ctype.elements.values())
    prefix = names[0]
    for n in names[1:]:                      # common prefix, up to an underscore
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix[:prefix.rfind("_") + 1]
    return {name[len(prefix):].lower(): value for value, name in ctype.elements.items()}


_ENUMS = {n: _enum_names(f.type) for n, f in _CONFIG_FIELDS.items() if f.type.kind == "enum"}


def _set_field(c, name, value):
    if name not in _CONFIG_FIELDS:
        raise TypeError("moe.Config: unknown field %r" % name)
    if name not in _SETTABLE:
        raise TypeError("moe.Config: field %r (a C pointer) cannot be set from Python" % name)
    if name in _ENUMS:
        names = _ENUMS[name]
        if isinstance(value, str):
            if value.lower() not in names:
                raise ValueError("moe.Config: %s=%r: expected one of %s"
                                 % (name, value, ", ".join(names)))
            value = names[value.lower()]
        elif isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError("moe.Config: %s takes a name (%s) or an int, not %s"
                            % (name, ", ".join(names), type(value).__name__))
    elif isinstance(value, bool):
        value = int(value)
    try:
        setattr(c, name, value)
    except (TypeError, OverflowError) as e:
        raise type(e)("moe.Config: %s=%r: %s" % (name, value, e)) from None


class Config:
    """A moe_config, checked by moe_config_resolve when made.

        Config("mixtral", d_model=64, d_ff=128)   # a preset, then fields
        Config(num_experts=8, top_k=2, d_model=64, d_ff=128)

    Keywords are moe_config's field names (moe.h documents each); enum fields
    take their short names ("softmax", "expert_choice", "geglu", ...) or ints.
    Unset fields keep moe.h's zero default. A Config is immutable: replace()
    makes a changed copy; resolved() has every default applied."""

    __slots__ = ("_c",)

    def __init__(self, preset=None, **fields):
        c = ffi.new("moe_config *")
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError("moe.Config: unknown preset %r; presets: %s"
                                 % (preset, ", ".join(PRESETS)))
            c[0] = getattr(lib, "moe_preset_" + preset)()
        for name, value in fields.items():
            _set_field(c, name, value)
        _check(lib.moe_config_resolve(c, ffi.new("moe_config *")), "moe_config_resolve")
        object.__setattr__(self, "_c", c)

    @classmethod
    def _wrap(cls, c):
        self = object.__new__(cls)
        object.__setattr__(self, "_c", c)
        return self

    def __getattr__(self, name):
        if name not in _SETTABLE:
            raise AttributeError("moe.Config has no field %r" % name)
        value = getattr(self._c, name)
        if name in _ENUMS:
            back = {v: k for k, v in _ENUMS[name].items()}
            return back.get(value, value)
        return value

    def __setattr__(self, name, value):
        raise AttributeError("moe.Config is immutable: use cfg.replace(%s=...)" % name)

    def replace(self, **fields):
        """A copy with these fields changed, checked again."""
        c = ffi.new("moe_config *", self._c[0])
        for name, value in fields.items():
            _set_field(c, name, value)
        _check(lib.moe_config_resolve(c, ffi.new("moe_config *")), "moe_config_resolve")
        return Config._wrap(c)

    def resolved(self):
        """The config with every default applied (moe_config_resolve)."""
        out = ffi.new("moe_config *")
        _check(lib.moe_config_resolve(self._c, out), "moe_config_resolve")
        return Config._wrap(out)

    def fingerprint(self):
        return int(lib.moe_config_fingerprint(self._c))

    def as_dict(self):
        return {n: getattr(self, n) for n in _SETTABLE}

    def __eq__(self, other):
        return isinstance(other, Config) and self.as_dict() == other.as_dict()

    __hash__ = None

    def __repr__(self):
        def show(v):        # a float field as the float32 it is: 0.02, not 0.0199999995
            return str(np.float32(v)) if isinstance(v, float) else repr(v)
        fields = ", ".join("%s=%s" % (k, show(v)) for k, v in self.as_dict().items()
                           if v not in (0, 0.0) and not (k in _ENUMS and _ENUMS[k].get(v) == 0))
        return "moe.Config(%s)" % fields


def _as_config(cfg):
    if not isinstance(cfg, Config):
        raise TypeError("cfg: expected a moe.Config, got %s" % type(cfg).__name__)
    return cfg


# --- arrays ------------------------------------------------------------------

def _check_array(name, a, shape, dtype=np.float32, writable=False):
    """a must be a C-contiguous ndarray of dtype and this shape; no conversion."""
    if not isinstance(a, np.ndarray):
        raise TypeError("%s: expected a numpy.ndarray of %s, got %s"
                        % (name, np.dtype(dtype).name, type(a).__name__))
    if a.dtype != dtype:
        raise TypeError("%s: dtype %s, expected %s (convert explicitly, e.g. "
                        "a.astype(np.%s))" % (name, a.dtype, np.dtype(dtype).name,
                                              np.dtype(dtype).name))
    if tuple(a.shape) != tuple(shape):
        raise ValueError("%s: shape %s, expected %s" % (name, tuple(a.shape), tuple(shape)))
    if not a.flags.c_contiguous or not a.flags.aligned:
        raise ValueError("%s: not a C-contiguous, aligned array (use np.ascontiguousarray)"
                         % name)
    if writable and not a.flags.writeable:
        raise ValueError("%s: read-only array, but it is written" % name)
    return a


def _ptr(a, ctype="float *"):
    if a is None:
        return ffi.NULL
    return ffi.cast(ctype, a.ctypes.data)


def _tokens(name, x, d_model):
    """x is [..., D]: T = product of the leading dimensions."""
    if not isinstance(x, np.ndarray):
        raise TypeError("%s: expected a numpy.ndarray of float32, got %s"
                        % (name, type(x).__name__))
    if x.ndim < 2 or x.shape[-1] != d_model:
        raise ValueError("%s: shape %s, expected (T, %d) or (..., %d) with d_model = %d"
                         % (name, x.shape, d_model, d_model, d_model))
    _check_array(name, x, x.shape)
    T = int(np.prod(x.shape[:-1]))
    if T > 2**31 - 1:
        raise ValueError("%s: %d tokens, more than moe.h's int32 T" % (name, T))
    return T


# --- quantized tensors ---------------------------------------------------------

QTYPES = _enum_names(ffi.typeof("moe_qtype"))      # {"f32": 0, "q4_0": 2, "q8_0": 8, ...}


def _qtype(qtype):
    if isinstance(qtype, str) and qtype.lower() in QTYPES:
        return QTYPES[qtype.lower()]
    if isinstance(qtype, (int, np.integer)) and int(qtype) in QTYPES.values():
        return int(qtype)
    raise ValueError("qtype: %r, expected one of %s" % (qtype, ", ".join(QTYPES)))


class Quantized:
    """A tensor of float shape `shape` stored as rows of ggml blocks (moe_qtype,
    docs/QUANT.md): data is uint8, rows x moe_qtype_row_bytes(qtype, shape[-1]).
    Weights takes one for gate, up, down and the shared expert's three
    (moe.h's forward reads them; its backward refuses them)."""

    def __init__(self, qtype, data, shape):
        self.qtype = _qtype(qtype)
        self.shape = tuple(int(v) for v in shape)
        n = self.shape[-1] if self.shape else 0
        row = lib.moe_qtype_row_bytes(self.qtype, n)
        if row == 0 or n == 0:
            raise ValueError("%s rows of %d values: not a multiple of its block size %d"
                             % (self.name, n, lib.moe_qtype_block_size(self.qtype)))
        self.rows = int(np.prod(self.shape[:-1]))
        self.data = _check_array("data", data, (self.rows * row,), np.uint8) \
            if getattr(data, "ndim", 1) == 1 else _check_array("data", data, (self.rows, row),
                                                                 np.uint8)

    @property
    def name(self):
        return ffi.string(lib.moe_qtype_name(self.qtype)).decode()

    def __repr__(self):
        return "moe.Quantized(%s, shape %s, %d bytes)" % (self.name, self.shape, self.data.nbytes)


def quantize(x, qtype):
    """x [..., n] float32 as rows of blocks (moe_quantize): a moe.Quantized."""
    qtype = _qtype(qtype)
    if not isinstance(x, np.ndarray) or x.ndim < 1:
        raise TypeError("x: expected a float32 numpy.ndarray")
    _check_array("x", x, x.shape)
    n = x.shape[-1]
    rows = int(np.prod(x.shape[:-1]))
    row = lib.moe_qtype_row_bytes(qtype, n)
    data = np.empty((rows, row), np.uint8)
    _check(lib.moe_quantize(qtype, _ptr(x), rows, n, _ptr(data, "void *"), data.nbytes),
           "moe_quantize")
    return Quantized(qtype, data, x.shape)


def dequantize(q):
    """The float32 values of a moe.Quantized (moe_dequantize)."""
    if not isinstance(q, Quantized):
        raise TypeError("q: expected a moe.Quantized, got %s" % type(q).__name__)
    y = np.empty(q.shape, np.float32)
    _check(lib.moe_dequantize(q.qtype, _ptr(q.data, "void *"), q.data.nbytes, q.rows,
                              q.shape[-1], _ptr(y)), "moe_dequantize")
    return y


# --- weights -----------------------------------------------------------------

_WEIGHT_FIELDS = [n for n, f in ffi.typeof("moe_weights").fields
                  if f.type.kind == "pointer" and f.type.item.cname == "float"]
_GLU = {v for k, v in _ENUMS["activation"].items() if "glu" in k}
# the tensors with a moe_qtype (w.gate_type, ...): the experts' matrices
_QUANTIZABLE = tuple(n[:-len("_type")] for n, _ in ffi.typeof("moe_weights").fields
                     if n.endswith("_type"))


def weight_shapes(cfg, fused=False):
    """{name: shape} of every float tensor this config reads (moe_weights names).

    fused: gate is HF 5.x gate_up_proj [E][2F][D] and there is no up.
    soft_scale is optional (absent: scale 1)."""
    r = _as_config(cfg).resolved()._c
    E, D, F, Fs = r.num_experts, r.d_model, r.d_ff, r.shared_d_ff
    glu = r.activation in _GLU
    soft = r.routing == _ENUMS["routing"]["soft"]
    s = {}
    if soft:
        s["soft_phi"] = (E * r.slots_per_expert, D)
        s["soft_scale"] = (1,)
    else:
        s["router"] = (E, D)
        if r.router_bias:
            s["router_bias"] = (E,)
        if r.selection_bias:
            s["selection_bias"] = (E,)
        if r.noise == _ENUMS["noise"]["shazeer"]:
            s["router_noise"] = (E, D)
    s["gate"] = (E, 2 * F, D) if fused else (E, F, D)
    if glu and not fused:
        s["up"] = (E, F, D)
    s["down"] = (E, D, F)
    if r.expert_bias:
        s["gate_bias"] = (E, F)
        if glu:
            s["up_bias"] = (E, F)
        s["down_bias"] = (E, D)
    if Fs > 0:
        s["shared_gate"] = (Fs, D)
        if glu:
            s["shared_up"] = (Fs, D)
        s["shared_down"] = (D, Fs)
        if r.expert_bias:
            s["shared_gate_bias"] = (Fs,)
            if glu:
                s["shared_up_bias"] = (Fs,)
            s["shared_down_bias"] = (D,)
        if r.shared_expert_gated:
            s["shared_expert_gate"] = (D,)
    return s


class Weights:
    """A layer's float tensors (moe_weights names, PyTorch [out][in] layout),
    checked against a config's shapes. The arrays are kept, not copied: C
    reads them in place, so do not resize them while the Weights is in use.

        Weights(cfg, router=r, gate=g, up=u, down=d)
        Weights(cfg, router=r, gate=gate_up, down=d, fused=True)   # HF 5.x

    A tensor the config does not read is an error (a likely mix-up), except
    soft_scale (optional). shared_expert_gate also takes HF's [1][D]."""

    def __init__(self, cfg, fused=False, packed=None, qpacked=None, **arrays):
        shapes = weight_shapes(cfg, fused)
        for name in arrays:
            if name not in _WEIGHT_FIELDS:
                raise TypeError("moe.Weights: unknown tensor %r (moe_weights float tensors: %s)"
                                % (name, ", ".join(_WEIGHT_FIELDS)))
            if name not in shapes and arrays[name] is not None:
                raise ValueError("moe.Weights: this config does not read %r%s" % (
                    name, " (fused: gate holds gate and up)" if name == "up" and fused else ""))
        self.cfg, self.fused, self.arrays, self.quantized = cfg, bool(fused), {}, {}
        for name, shape in shapes.items():
            a = arrays.get(name)
            if a is None:
                continue
            if isinstance(a, Quantized):
                if name not in _QUANTIZABLE:
                    raise TypeError("%s: moe.h reads quantized blocks only for %s"
                                    % (name, ", ".join(_QUANTIZABLE)))
                if a.shape != shape:
                    raise ValueError("%s: shape %s, expected %s" % (name, a.shape, shape))
                self.quantized[name] = a
                continue
            if name == "shared_expert_gate" and getattr(a, "shape", None) == (1, shape[0]):
                shape = (1, shape[0])
            self.arrays[name] = _check_array(name, a, shape)
        self.packed, self.qpacked = packed, qpacked
        self._c = ffi.new("moe_weights *")
        for name, a in self.arrays.items():
            setattr(self._c, name, _ptr(a))
        for name, q in self.quantized.items():
            setattr(self._c, name + "_type", q.qtype)
            setattr(self._c, name + "_q", _ptr(q.data, "void *"))
        self._c.gate_up_fused = int(self.fused)
        if packed is not None:
            self._c.packed = _ptr(packed, "void *")
            self._c.packed_bytes = packed.nbytes
        if qpacked is not None:
            self._c.qpacked = _ptr(qpacked, "void *")
            self._c.qpacked_bytes = qpacked.nbytes

    def __getitem__(self, name):
        return self.arrays[name]

    def check(self, cfg):
        """The shapes still fit cfg (a forward may use another config than the one made with)."""
        shapes = weight_shapes(cfg, self.fused)
        for name, a in list(self.arrays.items()) + list(self.quantized.items()):
            want = shapes.get(name)
            if want is None:
                raise ValueError("moe.Weights: this config does not read %r" % name)
            if tuple(a.shape) != want and not (name == "shared_expert_gate"
                                               and a.shape == (1,) + want):
                raise ValueError("%s: shape %s, expected %s for this config"
                                 % (name, a.shape, want))
        return self

    def __repr__(self):
        return "moe.Weights(%s%s%s)" % (", ".join(
            ["%s%s" % (n, a.shape) for n, a in self.arrays.items()] +
            ["%s%s %s" % (n, q.shape, q.name) for n, q in self.quantized.items()]),
                                        ", fused" if self.fused else "",
                                        ", packed %d bytes" % self.packed.nbytes
                                        if self.packed is not None else "")


def _as_weights(cfg, w):
    if isinstance(w, dict):
        w = Weights(cfg, **w)
    if not isinstance(w, Weights):
        raise TypeError("weights: expected a moe.Weights or a dict of arrays, got %s"
                        % type(w).__name__)
    return w.check(cfg)


# --- info ----------------------------------------------------------------------

_INFO_FIELDS = dict(ffi.typeof("moe_info").fields)

class Info:
    """What a forward or route call reports (moe_info): the scalars
    (aux_balance, aux_z, aux_importance, aux_load, aux_seq, aux_total, slots,
    capacity, dropped_pairs, dropped_tokens) and the routing arrays as
    read-only NumPy views: logits, scores [T][R]; expert, weight, dropped
    [T][S]; expert_routed, expert_kept [E]; dispatch [T][R] (Soft MoE).
    A forward with save_for_backward also holds the cache moe_backward reads."""

    _SCALARS = ("slots", "capacity", "dropped_pairs", "dropped_tokens", "aux_balance", "aux_z",
                "aux_importance", "aux_load", "aux_seq", "aux_total")

    def __init__(self, cfg, T, saved):
        r = cfg.resolved()._c
        self.cfg, self.num_tokens, self.saved = cfg, T, saved
        E = r.num_experts
        R = E * r.slots_per_expert if r.routing == _ENUMS["routing"]["soft"] else E
        S = int(lib.moe_routing_slots(r))
        self._c = ffi.new("moe_info *")
        shapes = {"logits": ((T, R), np.float32), "scores": ((T, R), np.float32),
                  "expert": ((T, S), np.int32), "weight": ((T, S), np.float32),
                  "dropped": ((T, S), np.uint8), "expert_routed": ((E,), np.int32),
                  "expert_kept": ((E,), np.int32)}
        if r.routing == _ENUMS["routing"]["soft"]:
            shapes["dispatch"] = ((T, R), np.float32)
        self._arrays = {}
        if saved:
            # one buffer for every array, the training cache included (moe_info_bind)
            n = ffi.new("size_t *")
            _check(lib.moe_info_size(cfg._c, T, n), "moe_info_size")
            self._buf = np.empty(max(n[0], 1), np.uint8)
            _check(lib.moe_info_bind(cfg._c, T, self._c, _ptr(self._buf, "void *"), n[0]),
                   "moe_info_bind")
            base = self._buf.ctypes.data
            for name, (shape, dtype) in shapes.items():
                p = getattr(self._c, name)
                if p == ffi.NULL:
                    continue
                off = int(ffi.cast("uintptr_t", p)) - base
                self._arrays[name] = np.ndarray(shape, dtype, buffer=self._buf, offset=off)
        else:
            for name, (shape, dtype) in shapes.items():
                a = np.empty(shape, dtype)
                self._arrays[name] = a
                setattr(self._c, name, ffi.cast(_INFO_FIELDS[name].type, a.ctypes.data))
        for a in self._arrays.values():
            a.flags.writeable = False     # the backward checks them: changing one is BAD_CACHE

    def __getattr__(self, name):
        if name in Info._SCALARS:
            return getattr(self._c, name)
        arrays = self.__dict__.get("_arrays", {})
        if name in arrays:
            return arrays[name]
        if name in ("logits", "scores", "dispatch", "expert", "weight", "dropped",
                    "expert_routed", "expert_kept"):
            return None
        raise AttributeError("moe.Info has no attribute %r" % name)

    def __repr__(self):
        return "moe.Info(T=%d, %s%s)" % (self.num_tokens, ", ".join(
            "%s=%g" % (n, getattr(self, n)) for n in Info._SCALARS),
            ", saved for backward" if self.saved else "")


def _workspace(size_fn, cfg, T, call):
    n = ffi.new("size_t *")
    _check(size_fn(cfg._c, T, n), call)
    buf = np.empty(max(n[0], 1), np.uint8)
    return buf, _ptr(buf, "void *"), n[0]


# --- the calls -----------------------------------------------------------------

def forward(cfg, weights, x, *, save_for_backward=False, out=None):
    """y, info = moe_forward of x [T][D] (or [..., D]); y has x's shape.

    save_for_backward: keep what moe.backward needs in info (its cache).
    out: a float32 array for y, x's shape (may be x itself: in place)."""
    cfg = _as_config(cfg)
    if save_for_backward:
        cfg = cfg.replace(save_for_backward=1)
    w = _as_weights(cfg, weights)
    T = _tokens("x", x, cfg._c.d_model)
    if out is None:
        y = np.empty(x.shape, np.float32)
    else:
        y = _check_array("out", out, x.shape, writable=True)
    info = Info(cfg, T, bool(save_for_backward))
    ws, wsp, wsn = _workspace(lib.moe_forward_workspace_size, cfg, T,
                              "moe_forward_workspace_size")
    _check(lib.moe_forward(cfg._c, w._c, _ptr(x), T, _ptr(y), info._c, wsp, wsn), "moe_forward")
    info.weights = w               # the backward reads the same tensors
    return y, info


def backward(cfg, weights, x, info, dy, *, grads=None, dx=None):
    """dx, grads = moe_backward for the loss <dy, y> + info.aux_total.

    info: from moe.forward(..., save_for_backward=True) of this cfg, weights
    and x. grads: a dict of float32 arrays (moe_grads names) that ACCUMULATE,
    as moe.h's gradients do; None: fresh zeros for every tensor of weights
    except selection_bias (it has no gradient). dx: an output array (x's
    shape; may be dy or x) or None for a new one."""
    cfg = _as_config(cfg)
    w = _as_weights(cfg, weights)
    T = _tokens("x", x, cfg._c.d_model)
    if not isinstance(info, Info):
        raise TypeError("info: expected the moe.Info of a forward, got %s" % type(info).__name__)
    _check_array("dy", dy, x.shape)
    dx = np.empty(x.shape, np.float32) if dx is None else _check_array("dx", dx, x.shape,
                                                                       writable=True)
    if grads is None:
        grads = {n: np.zeros(a.shape, np.float32) for n, a in w.arrays.items()
                 if n != "selection_bias"}
    g = ffi.new("moe_grads *")
    gfields = dict(ffi.typeof("moe_grads").fields)
    for name, a in grads.items():
        if name not in gfields or name == "gate_up_fused":
            raise TypeError("grads: unknown tensor %r" % name)
        if name not in w.arrays:
            raise ValueError("grads[%r]: the weights have no such tensor" % name)
        _check_array("grads[%r]" % name, a, w.arrays[name].shape, writable=True)
        setattr(g, name, _ptr(a))
    g.gate_up_fused = int(w.fused)
    ws, wsp, wsn = _workspace(lib.moe_backward_workspace_size, cfg, T,
                              "moe_backward_workspace_size")
    _check(lib.moe_backward(cfg._c, w._c, _ptr(x), T, info._c, _ptr(dy), _ptr(dx), g, wsp, wsn),
           "moe_backward")
    return dx, grads


def route(cfg, logits, *, noise_logits=None, selection_bias=None):
    """info = moe_route on caller-computed router logits [T][R] (they include
    any router bias): scores, selection, capacity, weights and aux losses.
    noise_logits [T][E]: x . W_noise^T for Shazeer noise; selection_bias [E]
    when cfg.selection_bias."""
    cfg = _as_config(cfg)
    r = cfg.resolved()._c
    soft = r.routing == _ENUMS["routing"]["soft"]
    R = r.num_experts * (r.slots_per_expert if soft else 1)
    if not isinstance(logits, np.ndarray) or logits.ndim != 2:
        raise ValueError("logits: expected a float32 array of shape (T, %d)" % R)
    T = logits.shape[0]
    _check_array("logits", logits, (T, R))
    if noise_logits is not None:
        _check_array("noise_logits", noise_logits, (T, r.num_experts))
    w = ffi.new("moe_weights *")
    if selection_bias is not None:
        w.selection_bias = _ptr(_check_array("selection_bias", selection_bias,
                                             (r.num_experts,)))
    info = Info(cfg, T, False)
    ws, wsp, wsn = _workspace(lib.moe_route_workspace_size, cfg, T, "moe_route_workspace_size")
    _check(lib.moe_route(cfg._c, w, _ptr(logits), _ptr(noise_logits), T, info._c, wsp, wsn),
           "moe_route")
    return info


def pack(cfg, weights):
    """Weights with moe_pack_weights' panels attached (w.packed): the SIMD
    forward reads the experts from them. The float tensors stay (the backward
    needs them). MoeError UNSUPPORTED on the reference kernels."""
    cfg = _as_config(cfg)
    w = _as_weights(cfg, weights)
    n = ffi.new("size_t *")
    _check(lib.moe_pack_size(cfg._c, n), "moe_pack_size")
    blob = np.empty(max(n[0], 1), np.uint8)
    _check(lib.moe_pack_weights(cfg._c, w._c, _ptr(blob, "void *"), n[0]), "moe_pack_weights")
    return Weights(cfg, fused=w.fused, packed=blob, qpacked=w.qpacked, **w.arrays, **w.quantized)


def qpack(cfg, weights):
    """Weights with moe_qpack_weights' decode layout of its quantized experts
    attached (w.qpacked): experts with few rows (decode, small batches) then
    run their integer dots 16 weight rows at a time, on builds with AVX-512;
    other builds ignore it. The blocks stay (larger experts read them).
    MoeError UNSUPPORTED when no expert tensor is quantized."""
    cfg = _as_config(cfg)
    w = _as_weights(cfg, weights)
    n = ffi.new("size_t *")
    _check(lib.moe_qpack_size(cfg._c, w._c, n), "moe_qpack_size")
    blob = np.empty(max(n[0], 1), np.uint8)
    _check(lib.moe_qpack_weights(cfg._c, w._c, _ptr(blob, "void *"), n[0]), "moe_qpack_weights")
    return Weights(cfg, fused=w.fused, packed=w.packed, qpacked=blob, **w.arrays, **w.quantized)


class Layer:
    """A config and its weights together: layer(x) -> y; layer.forward /
    backward as the functions; layer.pack() attaches packed panels."""

    def __init__(self, cfg, weights=None, fused=False, **arrays):
        self.cfg = _as_config(cfg)
        self.weights = weights if weights is not None else Weights(cfg, fused=fused, **arrays)
        self.info = None

    def __call__(self, x, **kw):
        y, self.info = forward(self.cfg, self.weights, x, **kw)
        return y

    def forward(self, x, **kw):
        return forward(self.cfg, self.weights, x, **kw)

    def backward(self, x, info, dy, **kw):
        return backward(self.cfg, self.weights, x, info, dy, **kw)

    def pack(self):
        self.weights = pack(self.cfg, self.weights)
        return self
