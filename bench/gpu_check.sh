#!/usr/bin/env bash
# bench/gpu_check.sh - moe_cuda.cuh on the GPU present, in one call of under 5 minutes:
#   1. nvcc builds the two suites and the benchmark for this GPU's architecture
#      (in parallel; ptxas's report in the logs)
#   2. the suites run on the GPU (tests/cuda_emu/test_emu.cu, test_moe_cuda.cu)
#   3. compute-sanitizer memcheck, racecheck and synccheck on test_moe_cuda
#   4. bench/moe_cuda_bench (forward against cuBLAS at equal FLOPs, routing alone,
#      the backward against the forward, decode against the copy bandwidth) and
#      bench/torch_grouped_mm.py
# Without a GPU it does what it can: the benchmark's nvcc build (sm_90a; make cuda
# builds the suites), the suites and the benchmark's --tiny plumbing on the CPU
# emulator; the GPU steps print SKIP.
# The summary comes last; full logs go to OUT_DIR.
# Usage: bench/gpu_check.sh [OUT_DIR]     (default build/gpu_check; run from anywhere)
set -u
cd "$(dirname "$0")/.."
out=${1:-build/gpu_check}
mkdir -p "$out" build
NVCC=${NVCC:-nvcc}
summary=()
fails=0
note() { summary+=("$1"); echo "== $1"; }
fail() { note "FAIL $1"; fails=$((fails + 1)); }

gpu=0
arch=sm_90a
if command -v nvidia-smi >/dev/null 2>&1 &&
        cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1) &&
        [ -n "$cap" ]; then
    gpu=1
    arch=sm_${cap/./}
    [ "$arch" = sm_90 ] && arch=sm_90a   # the a-target: Hopper's own instructions allowed
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
        --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
fi
note "GPU: $([ $gpu = 1 ] && echo "compute capability ${cap}, building for $arch" ||
                 echo "none found; building for $arch, running on the CPU emulator")"

# 1. builds, in parallel
if ! command -v "$NVCC" >/dev/null 2>&1; then
    fail "nvcc not found"
else
    flags=(-std=c++17 -O3 -arch="$arch" -lineinfo -Itests/cuda_emu -Xptxas -v,-warn-spills)
    t0=$SECONDS
    pids=()
    if [ $gpu = 1 ]; then
        "$NVCC" "${flags[@]}" -o build/gpu_test_emu tests/cuda_emu/test_emu.cu \
            > "$out/build_test_emu.log" 2>&1 & pids+=($!)
        "$NVCC" "${flags[@]}" -o build/gpu_test_moe_cuda tests/cuda_emu/test_moe_cuda.cu \
            > "$out/build_test_moe_cuda.log" 2>&1 & pids+=($!)
    fi
    "$NVCC" "${flags[@]}" -o build/gpu_moe_cuda_bench bench/moe_cuda_bench.cu -lcublas \
        > "$out/build_bench.log" 2>&1 & pids+=($!)
    built=1
    for p in "${pids[@]}"; do wait "$p" || built=0; done
    what=$([ $gpu = 1 ] && echo "suites and benchmark" || echo "benchmark")
    if [ $built = 1 ]; then note "nvcc $arch: $what built ($((SECONDS - t0)) s)"
    else
        fail "nvcc $arch: a build failed (see $out/build_*.log)"
        tail -n 20 "$out"/build_*.log
    fi
fi

if [ $gpu = 1 ]; then
    # 2. the suites on the GPU
    for t in test_emu test_moe_cuda; do
        if [ -x build/gpu_$t ]; then
            timeout 120 ./build/gpu_$t > "$out/$t.log" 2>&1
            rc=$?
            last=$(tail -n 1 "$out/$t.log")
            if [ $rc = 0 ]; then note "$t on the GPU: $last"
            else
                fail "$t on the GPU (exit $rc): $last"
                grep -E "FAIL|CHECK" "$out/$t.log" | head
            fi
        fi
    done
    # 3. the sanitizers, side by side
    if command -v compute-sanitizer >/dev/null 2>&1 && [ -x build/gpu_test_moe_cuda ]; then
        pids=()
        for tool in memcheck racecheck synccheck; do
            timeout 200 compute-sanitizer --tool $tool --error-exitcode 3 \
                ./build/gpu_test_moe_cuda > "$out/sanitizer_$tool.log" 2>&1 & pids+=($!)
        done
        i=0
        for tool in memcheck racecheck synccheck; do
            wait "${pids[$i]}"
            rc=$?
            i=$((i + 1))
            summ=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$out/sanitizer_$tool.log" | tail -n 1)
            if [ $rc = 0 ]; then note "compute-sanitizer $tool: ${summ:-clean}"
            else fail "compute-sanitizer $tool (exit $rc): $summ"; fi
        done
    else
        fail "compute-sanitizer not found"
    fi
    # 4. timings
    if [ -x build/gpu_moe_cuda_bench ]; then
        timeout 200 ./build/gpu_moe_cuda_bench > "$out/bench.log" 2>&1
        rc=$?
        [ $rc = 0 ] || fail "moe_cuda_bench (exit $rc): $(tail -n 1 "$out/bench.log")"
    fi
    if command -v python3 >/dev/null 2>&1; then
        timeout 120 python3 bench/torch_grouped_mm.py > "$out/torch_grouped_mm.log" 2>&1 ||
            fail "torch_grouped_mm.py: $(tail -n 1 "$out/torch_grouped_mm.log")"
    fi
else
    # what runs without a GPU: the nvcc binary says SKIP, the emulator does the rest
    [ -x build/gpu_moe_cuda_bench ] &&
        note "moe_cuda_bench, nvcc build: $(./build/gpu_moe_cuda_bench | head -n 1)"
    if make -s build/cuda_emu_test_emu build/cuda_emu_test_moe_cuda > "$out/emu_build.log" 2>&1
    then
        for t in test_emu test_moe_cuda; do
            if ./build/cuda_emu_$t > "$out/emu_$t.log" 2>&1; then
                note "$t on the emulator: $(tail -n 1 "$out/emu_$t.log")"
            else fail "$t on the emulator: $(tail -n 1 "$out/emu_$t.log")"; fi
        done
    else
        fail "emulator builds (see $out/emu_build.log)"
    fi
    emu=(-std=c++17 -Wall -Wextra -Werror -pedantic -O1 -x c++ -DCUDA_EMU -Itests/cuda_emu)
    if ${CXX:-g++} "${emu[@]}" -o build/moe_cuda_bench_emu bench/moe_cuda_bench.cu \
            > "$out/emu_bench_build.log" 2>&1 &&
            ./build/moe_cuda_bench_emu --tiny > "$out/bench.log" 2>&1; then
        note "moe_cuda_bench --tiny on the emulator: $(tail -n 1 "$out/bench.log")"
    else
        fail "moe_cuda_bench --tiny on the emulator: $(tail -n 1 "$out/bench.log" 2>/dev/null)"
    fi
    note "SKIP on the GPU: the suites, compute-sanitizer, the timings"
fi

echo
echo "gpu_check summary ($(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD 2>/dev/null)):"
for s in "${summary[@]}"; do echo "  $s"; done
if [ -f "$out/bench.log" ]; then
    echo
    grep -E "^(device|copy|  check|backward)|T=" "$out/bench.log"
    grep -E "T=|SKIP" "$out/torch_grouped_mm.log" 2>/dev/null
fi
echo "gpu_check: $fails failed"
[ $fails = 0 ]
