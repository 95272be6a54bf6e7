#!/usr/bin/env bash
# moe.h at a git revision against the working tree, alternating in one run.
#   bench/ab_bench.sh REV ROUNDS FLAGS -- MOE_BENCH_ARGS...
# e.g. bench/ab_bench.sh 512ff70 3 "-mavx2 -mfma" -- --T 1,16,128 --reps 5 3 1
# Builds bench/moe_bench.c twice with `cc -std=c99 -O2 FLAGS -fopenmp` (moe.h of REV, and the
# working tree's), then runs them in turn, ROUNDS times, on 2 OpenMP threads, and prints each
# row as "round before|after <moe_bench row>". Summarise with bench/ab_table.py.
# Manual (not CI). The host is shared: compare only rows of one run.
set -eu
cd "$(dirname "$0")/.."
[ $# -ge 4 ] && [ "$4" = "--" ] || { echo "usage: $0 REV ROUNDS FLAGS -- MOE_BENCH_ARGS..." >&2; exit 2; }
rev=$1 rounds=$2 flags=$3
shift 4
out=build/ab_bench
mkdir -p "$out/before"
git show "$rev:moe.h" > "$out/before/moe.h"
sed 's|#include "../moe.h"|#include "moe.h"|' bench/moe_bench.c > "$out/before/moe_bench.c"
# shellcheck disable=SC2086 # FLAGS is a list of compiler flags
cc -std=c99 -O2 $flags -fopenmp -o "$out/before/moe_bench" "$out/before/moe_bench.c" -lm
# shellcheck disable=SC2086
cc -std=c99 -O2 $flags -fopenmp -o "$out/after_moe_bench" bench/moe_bench.c -lm
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
export OMP_NUM_THREADS=2
for r in $(seq 1 "$rounds"); do
    "$out/before/moe_bench" "$@" 2> /dev/null | grep -E '^[a-z]+-mini ' | sed "s/^/$r before /"
    "$out/after_moe_bench" "$@" 2> /dev/null | grep -E '^[a-z]+-mini ' | sed "s/^/$r after /"
done
