#!/usr/bin/env bash
# make cuda: build a .cu test with nvcc for each target architecture, with
# ptxas's resource report; fail on any spill, local memory or warning, print
# registers / shared memory / stack per kernel, then run the binary (it prints
# SKIP where no GPU answers).
# With cuobjdump (PATH, or the PyPI wheels nvidia-cuda-cuobjdump and
# nvidia-cuda-nvdisasm), each SASS instruction named in SASS_EXPECT must be in
# every build: the PTX wrappers became the tensor-core and async-copy ops.
# Usage: [SASS_EXPECT="HMMA... LDSM..."] tests/cuda_emu/nvcc_check.sh NVCC OUT_PREFIX SOURCE ARCH...
set -u
nvcc=$1 out=$2 src=$3; shift 3
status=0
if ! command -v cuobjdump >/dev/null 2>&1; then
    wheel_bin=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "bin"))' 2>/dev/null)
    [ -n "$wheel_bin" ] && [ -x "$wheel_bin/cuobjdump" ] && PATH="$wheel_bin:$PATH"
fi
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
    if [ -n "${SASS_EXPECT:-}" ] && [ -x "$out-$arch" ]; then
        if command -v cuobjdump >/dev/null 2>&1; then
            sass=$(cuobjdump -sass "$out-$arch" 2>&1)
            for op in $SASS_EXPECT; do
                n=$(grep -c -- "$op" <<< "$sass")
                if [ "$n" -gt 0 ]; then echo "  $arch: $op x $n in the SASS"
                else echo "cuda: no $op in the $arch SASS"; status=1; fi
            done
        else echo "  cuobjdump not found: the SASS is not checked"; fi
    fi
done
[ $status -eq 0 ] && "./$out-$1" | tail -n 2
exit $status
