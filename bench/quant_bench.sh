#!/usr/bin/env bash
# Quantized experts: moe.h against ggml's mul_mat_id, alternating in one run.
#   bench/quant_bench.sh [rounds (3)] [T list (1,16,128,1024)]
# Manual (not CI): it needs ggml, which bench/ggml_bench.sh fetches and builds.
# Each round runs, one after another, on 2 OpenMP threads:
#   moe.h fp32 packed (moe_bench variant 2), the reference point of the T = 1024 target;
#   for q8_0, q4_0, q4_k, mxfp4: moe.h variants 3 (blocks, no blob) and 2 (blob
#   from the blocks, the blocks beside it) built as `make` builds the bench
#   (-mavx512f -mavx512bf16 here), variant 3 again built with VNNI
#   (-mavx512vnni -mavx512vl, where the CPU has it: ggml's native build uses it);
#   the same with the decode layout (--qpack 1: moe_qpack_weights once; with every expert
#   matrix on it, experts of any number of rows run its integer dots): v3 and v2 with make's
#   flags, v3 and v2 with VNNI;
#   then ggml_moe_bench on all four types.
# Raw outputs land in build/quant_bench/; bench/quant_table.py prints the table
# (median over rounds of each round's median ms, [min-max of those]).
set -eu
cd "$(dirname "$0")/.."
rounds=${1:-3}
Ts=${2:-1,16,128,1024}
out=build/quant_bench
mkdir -p "$out"
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
export OMP_NUM_THREADS=2
make -s build/moe_bench
vnni=
if grep -qw avx512_vnni /proc/cpuinfo; then
    cc -std=c99 -O2 -mavx512f -mavx512bf16 -mavx512vnni -mavx512vl -fopenmp \
        -o build/moe_bench_vnni bench/moe_bench.c -lm
    vnni=1
fi
[ -x build/ggml/ggml_moe_bench ] || bench/ggml_bench.sh --T 1 --reps 1 --shape qwen-mini > /dev/null
date -u +"start %Y-%m-%d %H:%M UTC, moe.h at $(git rev-parse --short HEAD)" | tee "$out/when.txt"
for r in $(seq 1 "$rounds"); do
    ./build/moe_bench --T "$Ts" --reps 5 2 1 > "$out/r${r}_fp32.txt"
    for q in q8_0 q4_0 q4_k mxfp4; do
        ./build/moe_bench --T "$Ts" --reps 5 --qtype $q 3,2 1 > "$out/r${r}_$q.txt"
        [ -z "$vnni" ] ||
            ./build/moe_bench_vnni --T "$Ts" --reps 5 --qtype $q 3 1 > "$out/r${r}_${q}_vnni.txt"
        ./build/moe_bench --T "$Ts" --reps 5 --qtype $q --qpack 1 3,2 1 > "$out/r${r}_${q}_qp.txt"
        [ -z "$vnni" ] || ./build/moe_bench_vnni --T "$Ts" --reps 5 --qtype $q --qpack 1 3,2 1 \
            > "$out/r${r}_${q}_qp_vnni.txt"
    done
    build/ggml/ggml_moe_bench --T "$Ts" --reps 5 > "$out/r${r}_ggml.txt"
    echo "round $r done"
done
date -u +"end %Y-%m-%d %H:%M UTC" | tee -a "$out/when.txt"
python3 bench/quant_table.py "$out" "$rounds"
