# The extension is built by cffi (moe_build.py); the metadata is in pyproject.toml.
import re
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.environ.get("MOE_H") or os.path.join(HERE, "..", "moe.h"), encoding="utf-8") as f:
    VERSION = re.search(r'#define MOE_VERSION_STRING "([^"]+)"', f.read()).group(1)

setup(version=VERSION, cffi_modules=["moe_build.py:ffibuilder"])
