#!/usr/bin/env bash
# ggml peer benchmark: ggml's quantized MoE FFN (ggml_mul_mat_id, as llama.cpp's
# build_moe_ffn builds it) at the shapes of bench/moe_bench.c --qtype.
#   bench/ggml_bench.sh [ggml_moe_bench options]     e.g. --T 1,16 --reps 3
# Manual only, never run by CI (it downloads ~50 MB and builds ggml, minutes
# on 2 cores); with CI set in the environment it does nothing.
# Steps, each skipped when its output is already there (all under build/ggml,
# which is git-ignored):
#   1. pip download the llama-cpp-python sdist (PyPI; it vendors llama.cpp and
#      ggml), check its sha256 (pinned below), unpack it
#   2. cmake: ggml's CPU backend alone (vendor/llama.cpp/ggml), static libs,
#      Release, GGML_NATIVE=ON, OpenMP on, no BLAS, no CUDA; the other
#      options at ggml's defaults (CPU_REPACK and LLAMAFILE on, as llama.cpp)
#   3. compile bench/ggml_moe_bench.c against it: build/ggml/ggml_moe_bench
#   4. run it with the arguments given (none: every shape, type and T)
# Needs: python3 + pip, cmake (>= 3.14), gcc/g++ with OpenMP (Debian:
# apt-get install cmake g++).
set -eu
if [ -n "${CI:-}" ]; then
    echo "bench/ggml_bench.sh: manual benchmark, not run under CI" >&2
    exit 0
fi
cd "$(dirname "$0")/.."

version=0.3.36   # llama-cpp-python; vendors ggml 0.25.3 (llama.cpp 0c1e57098)
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
dir=build/ggml
sdist=$dir/llama_cpp_python-$version.tar.gz
src=$dir/llama_cpp_python-$version/vendor/llama.cpp/ggml
bld=$dir/build
jobs=$(nproc 2>/dev/null || echo 2)

for tool in python3 cmake gcc g++; do
    command -v "$tool" > /dev/null ||
        { echo "missing $tool (Debian: apt-get install cmake g++ python3-pip)" >&2; exit 1; }
done
mkdir -p "$dir"

# 1. fetch, verify, unpack
if [ ! -f "$sdist" ]; then
    python3 -m pip download --no-deps --no-binary :all: -d "$dir" \
        "llama-cpp-python==$version"
fi
echo "$sha256  $sdist" | sha256sum -c - ||
    { echo "sha256 mismatch: remove $sdist and retry, or check the pin" >&2; exit 1; }
if [ ! -f "$src/CMakeLists.txt" ]; then
    tar -xzf "$sdist" -C "$dir"
fi

# 2. ggml CPU backend, static. Built as a subproject of a three-line wrapper:
#    standalone, ggml's CMakeLists wants ggml.pc.in, which the sdist lacks.
wrap=$dir/wrap
mkdir -p "$wrap"
printf '%s\n' 'cmake_minimum_required(VERSION 3.14)' 'project(ggml_moe_bench_deps C CXX)' \
    "add_subdirectory(\"$PWD/$src\" ggml)" > "$wrap/CMakeLists.txt"
if [ -z "$(find "$bld" -name libggml-cpu.a 2>/dev/null)" ]; then
    cmake -S "$wrap" -B "$bld" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF \
        -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BACKEND_DL=OFF \
        -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF
    cmake --build "$bld" -j "$jobs" --target ggml-base ggml-cpu ggml
fi

# 3. the bench (C; linked with g++ since ggml-cpu has C++ parts)
lib() { find "$bld" -name "$1" | head -n 1; }
gcc -std=c11 -O2 -Wall -Wextra -march=native -I"$src/include" \
    -c bench/ggml_moe_bench.c -o "$dir/ggml_moe_bench.o"
g++ -o "$dir/ggml_moe_bench" "$dir/ggml_moe_bench.o" "$(lib libggml.a)" \
    "$(lib libggml-cpu.a)" "$(lib libggml-base.a)" -fopenmp -lpthread -lm

# 4. run
echo "# $(date -u +%F) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)" \
     "| llama-cpp-python $version sdist, ggml CPU backend, GGML_NATIVE"
exec "$dir/ggml_moe_bench" "$@"
