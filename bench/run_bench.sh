#!/usr/bin/env bash
# One benchmark run, moe.h and its peers side by side (bench/RESULTS.md keeps
# the figures with this command):  bench/run_bench.sh [max_T] [out.json]
# Builds moe_bench with the best ISA of this CPU + OpenMP and with the
# OpenBLAS peer (apt: libopenblas-dev), runs every variant, then the PyTorch
# peers (pip: torch) with OMP_WAIT_POLICY=PASSIVE, all with 2 threads.
set -eu
cd "$(dirname "$0")/.."
max_T=${1:-1024}
json=${2:-build/bench.json}
mkdir -p build
: > "$json"
flags="-mavx2 -mfma"
grep -qw avx512f /proc/cpuinfo && flags="-mavx512f -mavx512bf16"
cc -std=c99 -O2 $flags -fopenmp -DMOE_BENCH_OPENBLAS -o build/moe_bench_peers bench/moe_bench.c -lopenblas -lm
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE   # the environment pins Haswell kernels: halves OpenBLAS
export OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2
echo "# $(date -u +%F) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) | flags: $flags -fopenmp"
for v in 2 6 3 5; do ./build/moe_bench_peers $v "$max_T" "$json"; done
./build/moe_bench_peers 4 "$((max_T < 128 ? max_T : 128))" "$json"
OMP_WAIT_POLICY=PASSIVE python3 bench/torch_bench.py "$max_T" "$json"
echo "# rows: $json"
