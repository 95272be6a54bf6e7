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
TEST_HDR := moe.h tests/moe_test.h

.PHONY: all test check run golden compile-checks examples bench clean

all: $(BUILD)/moe_tests $(BUILD)/mixtral_demo $(BUILD)/moe_bench compile-checks

$(BUILD):
	mkdir -p $(BUILD)

# The suite: every tests/test_*.c; test_main.c holds the implementation.
$(BUILD)/moe_tests: $(TEST_SRC) $(TEST_HDR) | $(BUILD)
	$(CC) -std=c99 $(WARN) $(CFLAGS) -o $@ $(TEST_SRC) $(LDLIBS)

test: $(BUILD)/moe_tests compile-checks
	cd tests && ../$(BUILD)/moe_tests

# The same suite under AddressSanitizer + UndefinedBehaviorSanitizer.
$(BUILD)/moe_tests_san: $(TEST_SRC) $(TEST_HDR) | $(BUILD)
	$(CC) -std=c99 $(WARN) -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -fno-omit-frame-pointer -o $@ $(TEST_SRC) $(LDLIBS)

check: $(BUILD)/moe_tests_san
	cd tests && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ../$(BUILD)/moe_tests_san

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
	$(CC) -std=c99 $(WARN) -O2 -o $@ examples/mixtral_demo.c $(LDLIBS)

examples: $(BUILD)/mixtral_demo

run: $(BUILD)/mixtral_demo
	./$(BUILD)/mixtral_demo

# Benchmarks (bench/RESULTS.md records the figures with their commands).
$(BUILD)/moe_bench: bench/moe_bench.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 -o $@ bench/moe_bench.c $(LDLIBS)

bench: $(BUILD)/moe_bench
	./$(BUILD)/moe_bench 0 16
	./$(BUILD)/moe_bench 1 16

# Regenerate the golden files from PyTorch / HF transformers (needs Python).
golden:
	$(PYTHON) -m pip install -q -r tests/ref/requirements.txt
	$(PYTHON) tests/ref/gen_golden.py

clean:
	rm -rf $(BUILD)
