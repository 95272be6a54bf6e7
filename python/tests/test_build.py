"""The extension against moe.h: declarations, struct layouts, presets, version."""
import os
import re
import subprocess
import sys

import pytest

import moe

PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
HEADER = os.path.join(PY, "..", "moe.h")
STRUCTS = ("moe_config", "moe_weights", "moe_grads", "moe_info", "moe_ep_plan", "moe_ep_pair")


def test_cdef_matches_header():
    """python/moe/_cdef.h is what gen_cdef.py derives from moe.h (the drift check)."""
    r = subprocess.run([sys.executable, os.path.join(PY, "gen_cdef.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("struct", STRUCTS)
def test_struct_layout_matches_c(struct):
    """cffi's sizeof and offsets equal the C compiler's (the extension exports those)."""
    ffi, lib = moe.ffi, moe.lib
    assert lib.moe_py_layout(STRUCTS.index(struct), 0) == ffi.sizeof(struct)
    fields = ffi.typeof(struct).fields
    for j, (name, _) in enumerate(fields):
        assert lib.moe_py_layout(STRUCTS.index(struct), 1 + j) == ffi.offsetof(struct, name), name
    assert lib.moe_py_layout(STRUCTS.index(struct), 1 + len(fields)) == ffi.cast("size_t", -1)


def test_every_preset_of_the_header():
    with open(HEADER, encoding="utf-8") as f:
        names = re.findall(r"^MOEDEF moe_config moe_preset_(\w+)\(void\);", f.read(), re.M)
    assert names and sorted(names) == sorted(moe.PRESETS)
    for name in names:
        cfg = moe.Config(name)
        c = getattr(moe.lib, "moe_preset_" + name)()
        assert cfg.num_experts == c.num_experts and cfg.d_model == c.d_model


def test_version_and_isa():
    with open(HEADER, encoding="utf-8") as f:
        version = re.search(r'#define MOE_VERSION_STRING "([^"]+)"', f.read()).group(1)
    assert moe.__version__ == version
    assert moe.compiled_isa() in ("reference", "avx2", "avx512", "neon")


def test_status_strings():
    for status in range(moe.lib.MOE_STATUS_COUNT):
        e = moe.MoeError(status, "call")
        assert e.status == status and e.name in str(e)
        assert moe.ffi.string(moe.lib.moe_status_string(status)).decode() in str(e)
