"""cffi build script: compiles moe.h (with MOE_IMPLEMENTATION) into moe._moe_cffi.

Declarations come from moe/_cdef.h, generated from moe.h by gen_cdef.py; the
build refuses a stale one, so the extension always declares what it compiles.

Kernels are picked by compiler flags (moe.h, moe_compiled_isa). MOE_ISA
chooses them:
  native     (default) -march=native: the fastest kernels of the CPU that
             builds, e.g. AVX-512 (+ BF16, VNNI) here; the extension then
             needs a CPU with the same features (import checks the vector
             ISA, where the compiler's own code lets it get that far)
  avx512     -mavx512f -mavx512bw -mavx512vl  (any AVX-512 x86-64)
  avx2       -mavx2 -mfma
  reference  no ISA flags: the scalar reference kernels, runs anywhere
MOE_CFLAGS adds flags (split on spaces), MOE_OPENMP=0 builds without OpenMP
(then threads come only from cfg.parallel_for), MOE_H names another moe.h.
"""
import hashlib
import os
import platform
import sys

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_cdef  # noqa: E402  (next to this file)

HEADER = os.path.abspath(os.environ.get("MOE_H") or os.path.join(HERE, "..", "moe.h"))
if not os.path.isfile(HEADER):
    raise SystemExit("moe_build: %s not found (build from the moe.h repository, "
                     "pip install ./python, or set MOE_H)" % HEADER)
with open(HEADER, encoding="utf-8") as f:
    CDEF = gen_cdef.generate(f.read())
with open(gen_cdef.OUTPUT, encoding="utf-8") as f:
    if f.read() != CDEF:
        raise SystemExit("moe_build: python/moe/_cdef.h is stale for %s: run "
                         "python3 python/gen_cdef.py" % HEADER)

# The structs whose layout test_layout.py compares with the C compiler's.
STRUCTS = ("moe_config", "moe_weights", "moe_grads", "moe_info", "moe_ep_plan", "moe_ep_pair")

ISA_FLAGS = {
    "native": ["-march=native"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
    "reference": [],
}


def _layout_source():
    """sizeof and every field's offsetof, as the C compiler lays them out."""
    probe = cffi.FFI()
    probe.cdef(CDEF)
    out = []
    for s in STRUCTS:
        fields = [name for name, _ in probe.typeof(s).fields]
        values = ["sizeof(%s)" % s] + ["offsetof(%s, %s)" % (s, n) for n in fields]
        out.append("static const size_t moe_py_layout_%s[] = {\n    %s\n};\n"
                   % (s, ",\n    ".join(values)))
    cases = "".join("    case %d: t = moe_py_layout_%s; n = sizeof moe_py_layout_%s / sizeof *t; "
                    "break;\n" % (i, s, s) for i, s in enumerate(STRUCTS))
    out.append("""/* entry i of struct s: 0 = sizeof, 1 + j = offset of field j; (size_t)-1 past the end */
static size_t moe_py_layout(int s, int i) {
    const size_t *t;
    size_t n;
    switch (s) {
%s    default: return (size_t)-1;
    }
    return i >= 0 && (size_t)i < n ? t[i] : (size_t)-1;
}
""" % cases)
    return "".join(out)


SOURCE = r"""
#define MOE_IMPLEMENTATION
#include "moe.h"
#include <stddef.h>

%s
/* 1 if this CPU runs the vector ISA compiled in (an extension built with
   -march=native and copied to an older CPU would die of SIGILL instead) */
static int moe_py_cpu_ok(void) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
#  if defined(__AVX512F__)
    if (!__builtin_cpu_supports("avx512f")) return 0;
#  endif
#  if defined(__AVX2__)
    if (!__builtin_cpu_supports("avx2")) return 0;
#  endif
#  if defined(__FMA__)
    if (!__builtin_cpu_supports("fma")) return 0;
#  endif
#endif
    return 1;
}

static int moe_py_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
""" % _layout_source()

EXTRA_CDEF = """
size_t moe_py_layout(int s, int i);
int moe_py_cpu_ok(void);
int moe_py_openmp(void);
"""


def _flags():
    isa = os.environ.get("MOE_ISA", "native").strip().lower() or "native"
    if isa not in ISA_FLAGS:
        raise SystemExit("moe_build: MOE_ISA=%s: use one of %s" % (isa, ", ".join(ISA_FLAGS)))
    cflags = ["-O2", "-Wall", "-Wextra"] + ISA_FLAGS[isa]
    ldflags = []
    if os.environ.get("MOE_OPENMP", "1") != "0" and platform.system() == "Linux":
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    cflags += os.environ.get("MOE_CFLAGS", "").split()
    return cflags, ldflags


ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF + EXTRA_CDEF)
_cflags, _ldflags = _flags()
# setuptools rebuilds only when the generated .c is newer than the extension:
# naming the header's hash and the flags in it makes an edited moe.h or another
# MOE_ISA rebuild in a build directory that pip reuses (pip install ./python)
with open(HEADER, "rb") as f:
    _stamp = "/* moe.h sha256 %s, flags %s */\n" % (hashlib.sha256(f.read()).hexdigest(),
                                                   " ".join(_cflags + _ldflags))
ffibuilder.set_source("moe._moe_cffi", _stamp + SOURCE, include_dirs=[os.path.dirname(HEADER)],
                      extra_compile_args=_cflags, extra_link_args=_ldflags, libraries=["m"],
                      depends=[HEADER])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
