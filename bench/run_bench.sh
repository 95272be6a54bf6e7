#!/usr/bin/env bash
# One benchmark run, moe.h and its peers side by side (bench/RESULTS.md keeps
# the figures with this command):  bench/run_bench.sh [max_T] [out.json]
# Builds moe_bench with the best ISA of this CPU + OpenMP and with the
# OpenBLAS peer (apt: libopenblas-dev); one moe_bench process measures the
# machine ceilings (FMA peak, read bandwidth) and runs every variant, forward
# and forward+backward, T = 1 .. max_T; then the PyTorch peers (pip: torch)
# with OMP_WAIT_POLICY=PASSIVE take the ceilings from the same JSON file.
# All with 2 threads. `make bench-plot` draws the JSON as a roofline SVG.
set -eu
cd "$(dirname "$0")/.."
max_T=${1:-1024}
json=${2:-build/bench.json}
mkdir -p build
: > "$json"
flags="-mavx2 -mfma"
grep -qw avx512f /proc/cpuinfo && flags="$flags -mavx512f"
grep -qw avx512_bf16 /proc/cpuinfo && flags="$flags -mavx512bf16"   # not every AVX-512 CPU has it
cc -std=c99 -Wall -Wextra -pedantic -O2 $flags -fopenmp -DMOE_BENCH_OPENBLAS -o build/moe_bench_peers bench/moe_bench.c -lopenblas -lm
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE   # the environment pins Haswell kernels: halves OpenBLAS
export OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2
echo "# $(date -u +%F) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) | flags: $flags -fopenmp"
./build/moe_bench_peers 2,6,3,5,4 "$max_T" "$json"
OMP_WAIT_POLICY=PASSIVE python3 bench/torch_bench.py "$max_T" "$json"
echo "# rows: $json"
