#!/usr/bin/env bash
# make cuda: build a .cu test with nvcc for each target architecture, with
# ptxas's resource report; fail on any spill, local memory or warning, print
# registers / shared memory / stack per kernel, then run the binary (it prints
# SKIP where no GPU answers).
# Usage: tests/cuda_emu/nvcc_check.sh NVCC OUT_PREFIX SOURCE ARCH...
set -u
nvcc=$1 out=$2 src=$3; shift 3
status=0
for arch in "$@"; do
    log="$out-$arch.ptxas.log"
    if ! "$nvcc" -std=c++17 -O3 -arch="$arch" -lineinfo -Itests/cuda_emu \
            -Xptxas -v,-warn-spills,-warn-lmem-usage -o "$out-$arch" "$src" > "$log" 2>&1; then
        cat "$log"; echo "cuda: $src failed to build for $arch"; status=1; continue
    fi
    # one line per kernel: name, registers, shared memory, stack, spills
    awk -v arch="$arch" '
        /Compiling entry function/ { split($0, q, "'"'"'"); k = q[2] }
        /bytes stack frame/ { stack = $1; spill = $5 + $9 }
        /Used [0-9]+ registers/ {
            smem = 0
            for (i = 1; i <= NF; i++) if ($(i + 1) == "bytes" && $(i + 2) == "smem,") smem = $i
            printf "  %-8s %-48s %3d regs %6d B smem %4d B stack %d B spilled\n", arch, k, $5, smem, stack, spill
        }' "$log" | if command -v c++filt >/dev/null 2>&1; then c++filt; else cat; fi
    if grep -Eiq 'warning|[1-9][0-9]* bytes spill|[1-9][0-9]* bytes lmem' "$log"; then
        grep -Ei 'warning|bytes spill|lmem' "$log" | grep -Ev ' 0 bytes spill stores, 0 bytes spill loads'
        echo "cuda: spills, local memory or warnings for $arch"; status=1
    fi
done
[ $status -eq 0 ] && "./$out-$1" | tail -n 2
exit $status
