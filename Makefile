# moe.h -- build, test and demo. `make test` and `make run` are all a newcomer needs.
CC      ?= cc
CXX     ?= c++
CFLAGS  ?= -O2 -g
WARN    := -Wall -Wextra -Werror -pedantic
LDLIBS  := -lm
BUILD   := build
PYTHON  ?= python3
NVCC    ?= nvcc

TEST_SRC := $(wildcard tests/test_*.c)
TEST_HDR := moe.h tests/moe_test.h examples/train_balance.c

# moe.h picks its SIMD ISA at compile time. The suite is built once per ISA:
# the reference (no -m flags), AVX2 + FMA, AVX-512 (run only where the CPU
# has it) and NEON (cross-compiled, run under qemu: make test-neon).
HOST_AVX2   := $(shell grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw fma /proc/cpuinfo && echo 1)
HOST_AVX512 := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo 1)
AVX2_FLAGS   := -mavx2 -mfma
AVX512_FLAGS := -mavx512f -mavx512bf16
# demos and benches use the best ISA of this machine, with OpenMP threads
SIMD_FLAGS := $(if $(HOST_AVX512),$(AVX512_FLAGS),$(if $(HOST_AVX2),$(AVX2_FLAGS),)) -fopenmp

.PHONY: all test check run golden compile-checks examples bench bench-peers clean test-neon train-demo

all: $(BUILD)/moe_tests $(BUILD)/moe_tests_avx2 $(BUILD)/moe_tests_avx512 examples $(BUILD)/moe_bench compile-checks

$(BUILD):
	mkdir -p $(BUILD)

# The suite: every tests/test_*.c; test_main.c holds the implementation.
$(BUILD)/moe_tests: $(TEST_SRC) $(TEST_HDR) | $(BUILD)
	$(CC) -std=c99 $(WARN) $(CFLAGS) -o $@ $(TEST_SRC) $(LDLIBS) -pthread

$(BUILD)/moe_tests_avx2: $(TEST_SRC) $(TEST_HDR) | $(BUILD)
	$(CC) -std=c99 $(WARN) $(CFLAGS) $(AVX2_FLAGS) -fopenmp -o $@ $(TEST_SRC) $(LDLIBS) -pthread

$(BUILD)/moe_tests_avx512: $(TEST_SRC) $(TEST_HDR) | $(BUILD)
	$(CC) -std=c99 $(WARN) $(CFLAGS) $(AVX512_FLAGS) -fopenmp -o $@ $(TEST_SRC) $(LDLIBS) -pthread

TEST_RUNS := ../$(BUILD)/moe_tests \
             $(if $(HOST_AVX2),"OMP_NUM_THREADS=2 ../$(BUILD)/moe_tests_avx2",) \
             $(if $(HOST_AVX512),"OMP_NUM_THREADS=2 ../$(BUILD)/moe_tests_avx512",)

test: $(BUILD)/moe_tests $(BUILD)/moe_tests_avx2 $(BUILD)/moe_tests_avx512 compile-checks
	@$(if $(HOST_AVX512),,echo "this CPU has no AVX-512: its suite is built but not run")
	tests/run_suites.sh $(TEST_RUNS)

# NEON: the suite cross-compiled for aarch64 and run under qemu-user.
$(BUILD)/moe_tests_neon: $(TEST_SRC) $(TEST_HDR) | $(BUILD)
	aarch64-linux-gnu-gcc -std=c99 $(WARN) -O2 -static -o $@ $(TEST_SRC) $(LDLIBS) -pthread

test-neon: $(BUILD)/moe_tests_neon
	tests/run_suites.sh "qemu-aarch64 ../$(BUILD)/moe_tests_neon"

# The same suite under AddressSanitizer + UndefinedBehaviorSanitizer.
$(BUILD)/moe_tests_san: $(TEST_SRC) $(TEST_HDR) | $(BUILD)
	$(CC) -std=c99 $(WARN) -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -fno-omit-frame-pointer -o $@ $(TEST_SRC) $(LDLIBS) -pthread

$(BUILD)/moe_tests_san_avx2: $(TEST_SRC) $(TEST_HDR) | $(BUILD)
	$(CC) -std=c99 $(WARN) -O1 -g $(AVX2_FLAGS) -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -fno-omit-frame-pointer -o $@ $(TEST_SRC) $(LDLIBS) -pthread

check: $(BUILD)/moe_tests_san $(if $(HOST_AVX2),$(BUILD)/moe_tests_san_avx2,)
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 tests/run_suites.sh ../$(BUILD)/moe_tests_san \
	    $(if $(HOST_AVX2),../$(BUILD)/moe_tests_san_avx2,)

# Compile checks: C99, C++17, MOE_STATIC, MOE_NO_SIMD, ISA flags, all at -Werror.
COMPILE_C := tests/compile/compile_c99.c
COMPILE_X := tests/compile/compile_cpp.cpp
compile-checks: | $(BUILD)
	$(CC)  -std=c99   $(WARN) -c $(COMPILE_C) -o $(BUILD)/cc_default.o
	$(CC)  -std=c99   $(WARN) -DMOE_STATIC -c $(COMPILE_C) -o $(BUILD)/cc_static.o
	$(CC)  -std=c99   $(WARN) -DMOE_NO_SIMD -c $(COMPILE_C) -o $(BUILD)/cc_nosimd.o
	$(CC)  -std=c99   $(WARN) -mavx2 -mfma -c $(COMPILE_C) -o $(BUILD)/cc_avx2.o
	$(CC)  -std=c99   $(WARN) -mavx512f -c $(COMPILE_C) -o $(BUILD)/cc_avx512.o
	$(CXX) -std=c++17 $(WARN) -c $(COMPILE_X) -o $(BUILD)/cxx_default.o
	$(CXX) -std=c++17 $(WARN) -DMOE_STATIC -c $(COMPILE_X) -o $(BUILD)/cxx_static.o
	$(CC) -std=c11 $(WARN) -O3 -c $(COMPILE_C) -o $(BUILD)/cc_c11_o3.o
	@if command -v $(NVCC) >/dev/null 2>&1; then \
	    $(NVCC) -std=c++17 --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
	        -c tests/compile/compile_cu.cu -o $(BUILD)/cu_default.o && echo "nvcc .cu check: ok"; \
	else echo "nvcc not found: skipping the .cu compile check"; fi
	@echo "compile checks: ok"

# The main demo: a Mixtral-like layer on built-in synthetic weights.
$(BUILD)/mixtral_demo: examples/mixtral_demo.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 $(SIMD_FLAGS) -o $@ examples/mixtral_demo.c $(LDLIBS)

# Training demo: no balancing vs Switch/HF aux loss vs DeepSeek-V3 bias;
# writes train_balance.csv and train_balance.svg into build/.
$(BUILD)/train_balance: examples/train_balance.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 -o $@ examples/train_balance.c $(LDLIBS)

train-demo: $(BUILD)/train_balance
	./$(BUILD)/train_balance $(BUILD)

examples: $(BUILD)/mixtral_demo $(BUILD)/train_balance

run: $(BUILD)/mixtral_demo
	./$(BUILD)/mixtral_demo

# Benchmarks (bench/RESULTS.md records the figures with their commands).
$(BUILD)/moe_bench: bench/moe_bench.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 $(SIMD_FLAGS) -o $@ bench/moe_bench.c $(LDLIBS)

bench: $(BUILD)/moe_bench
	./$(BUILD)/moe_bench 2 1024
	./$(BUILD)/moe_bench 4 128

# moe.h and the peers (OpenBLAS per-expert loop, PyTorch) in one run
bench-peers:
	bench/run_bench.sh 1024 $(BUILD)/bench.json

# Regenerate the golden files from PyTorch / HF transformers (needs Python).
golden:
	$(PYTHON) -m pip install -q -r tests/ref/requirements.txt
	$(PYTHON) tests/ref/gen_golden.py

clean:
	rm -rf $(BUILD)
