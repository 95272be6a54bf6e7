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
TEST_HDR := moe.h tests/moe_test.h tests/ref/quant_golden.h examples/gguf_moe.c examples/safetensors_moe.c examples/train_balance.c examples/vit_moe_digits.c

# moe.h picks its SIMD ISA at compile time. The suite is built once per ISA:
# the reference (no -m flags), AVX2 + FMA, AVX-512 (run only where the CPU
# has it) and NEON (cross-compiled, run under qemu: make test-neon).
HOST_AVX2   := $(shell grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw fma /proc/cpuinfo && echo 1)
HOST_AVX512 := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo 1)
AVX2_FLAGS   := -mavx2 -mfma
AVX512_FLAGS := -mavx512f -mavx512bf16
# the emulated Cooper Lake (make test-avx512-emu) also has AVX512_VNNI: vpdpbusd for quantized dots
AVX512_EMU_FLAGS := $(AVX512_FLAGS) -mavx512vnni -mavx512vl
# demos and benches use the best ISA of this machine, with OpenMP threads
SIMD_FLAGS := $(if $(HOST_AVX512),$(AVX512_FLAGS),$(if $(HOST_AVX2),$(AVX2_FLAGS),)) -fopenmp

.PHONY: all test check run golden compile-checks doc-snippets doc-numbers examples examples-listed \
        runner-check run-examples vit-demo tour-svgs bench bench-peers clean test-neon test-avx512-emu train-demo \
        install uninstall test-install test-windows

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

test: $(BUILD)/moe_tests $(BUILD)/moe_tests_avx2 $(BUILD)/moe_tests_avx512 compile-checks doc-snippets \
      examples-listed runner-check doc-numbers bench-stage-smoke
	@$(if $(HOST_AVX512),,echo "this CPU has no AVX-512: its suite is built but not run")
	tests/run_suites.sh $(TEST_RUNS)

# The suite prints a line per suite as it goes, and run_suites.sh passes them on.
runner-check: $(BUILD)/moe_tests
	tests/check_runner.sh ../$(BUILD)/moe_tests

# NEON: the suite cross-compiled for aarch64 (with the dot-product extension,
# for the integer dots of quantized experts) and run under qemu-user, whose
# default CPU has it; make compile-matrix builds plain armv8-a.
$(BUILD)/moe_tests_neon: $(TEST_SRC) $(TEST_HDR) | $(BUILD)
	aarch64-linux-gnu-gcc -std=c99 $(WARN) -O2 -march=armv8.2-a+dotprod -static -o $@ $(TEST_SRC) \
	    $(LDLIBS) -pthread

# NEON_FILTER=a,b,... runs only the suites whose names contain one of those
# (CI leaves out train and vit, slow under qemu, as it does on the emulated AVX-512)
test-neon: $(BUILD)/moe_tests_neon
	tests/run_suites.sh "qemu-aarch64 ../$(BUILD)/moe_tests_neon $(NEON_FILTER)"

# Windows (issue 19): the suite cross-built with mingw-w64 (gcc's posix-thread
# variant: OpenMP and pthreads; linked statically, so no DLLs to find) for the
# reference and AVX2 + FMA kernels, and run under wine (the AVX2 suite where
# this CPU has AVX2). What differs on Windows is the C runtime, threads and
# OpenMP, not the vector ISA: AVX-512 is left to make test and the emulator.
# Needs gcc-mingw-w64-x86-64 and wine (Debian packages; .ci/run installs them).
MINGW_CC ?= x86_64-w64-mingw32-gcc-posix
WIN_BUILD := $(BUILD)/win
$(WIN_BUILD)/moe_tests.exe: $(TEST_SRC) $(TEST_HDR)
	@mkdir -p $(WIN_BUILD)
	$(MINGW_CC) -std=c99 $(WARN) $(CFLAGS) -static -o $@ $(TEST_SRC) $(LDLIBS) -pthread
$(WIN_BUILD)/moe_tests_avx2.exe: $(TEST_SRC) $(TEST_HDR)
	@mkdir -p $(WIN_BUILD)
	$(MINGW_CC) -std=c99 $(WARN) $(CFLAGS) $(AVX2_FLAGS) -fopenmp -static -o $@ $(TEST_SRC) \
	    $(LDLIBS) -pthread
test-windows: $(WIN_BUILD)/moe_tests.exe $(WIN_BUILD)/moe_tests_avx2.exe
	WINEDEBUG=-all WINEPREFIX=$(abspath $(WIN_BUILD))/wineprefix tests/run_suites.sh \
	    "wine ../$(WIN_BUILD)/moe_tests.exe" \
	    $(if $(HOST_AVX2),"OMP_NUM_THREADS=2 wine ../$(WIN_BUILD)/moe_tests_avx2.exe",)

# AVX-512 + AVX512-BF16 + AVX512-VNNI: the suite linked statically and run on an emulated
# Cooper Lake CPU (Bochs, booting Debian's kernel): tests/emu/avx512.sh.
# EMU_FILTER=a,b,... runs only the suites whose names contain one of those.
$(BUILD)/moe_tests_avx512_static: $(TEST_SRC) $(TEST_HDR) | $(BUILD)
	$(CC) -std=c99 $(WARN) $(CFLAGS) $(AVX512_EMU_FLAGS) -fopenmp -static -o $@ $(TEST_SRC) $(LDLIBS) -pthread \
	    2> $@.log || { cat $@.log; exit 1; }

test-avx512-emu:
	tests/run_suites.sh "emu/avx512.sh"

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

# The README's "Use it" code and moe.h's banner EXAMPLE compile as written.
doc-snippets: | $(BUILD)
	tests/doc_snippets.sh $(BUILD)

# The main demo: a Mixtral-like layer on built-in synthetic weights.
$(BUILD)/mixtral_demo: examples/mixtral_demo.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 $(SIMD_FLAGS) -o $@ examples/mixtral_demo.c $(LDLIBS)

# Training demo: no balancing vs Switch/HF aux loss vs DeepSeek-V3 bias;
# writes train_balance.csv and train_balance.svg into build/.
$(BUILD)/train_balance: examples/train_balance.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 -o $@ examples/train_balance.c $(LDLIBS)

train-demo: $(BUILD)/train_balance
	./$(BUILD)/train_balance $(BUILD)

# Teaching examples. moe_transformer_layer exits 1 if its gradient check
# fails; tour exits 1 if a number disagrees with its worked values (it writes its
# SVGs into build/; docs/ holds the committed copies: make tour-svgs).
$(BUILD)/moe_transformer_layer: examples/moe_transformer_layer.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 -o $@ examples/moe_transformer_layer.c $(LDLIBS)

$(BUILD)/glam_block: examples/glam_block.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 $(SIMD_FLAGS) -o $@ examples/glam_block.c $(LDLIBS)

$(BUILD)/tour: examples/tour.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 -o $@ examples/tour.c $(LDLIBS)

# mixtral_block exits 1 if its gradient check fails; safetensors_moe exits 1
# if the layer's output misses the file's y_ref (HF's output) by more than the
# golden tolerance (tests/test_safetensors.c includes it, without its main).
$(BUILD)/mixtral_block: examples/mixtral_block.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 -o $@ examples/mixtral_block.c $(LDLIBS)

$(BUILD)/safetensors_moe: examples/safetensors_moe.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 -o $@ examples/safetensors_moe.c $(LDLIBS)

# gguf_moe exits 1 if the layer misses the file's y_ref (tests/ref/gguf:
# quantized experts; SIMD flags, so the integer dots run).
$(BUILD)/gguf_moe: examples/gguf_moe.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 $(SIMD_FLAGS) -o $@ examples/gguf_moe.c $(LDLIBS)

# ViT with MoE FFN layers trained on the UCI digits (examples/data/digits.txt);
# prints test accuracy and per-layer expert load, writes build/vit_moe_digits.svg.
$(BUILD)/vit_moe_digits: examples/vit_moe_digits.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 $(SIMD_FLAGS) -o $@ examples/vit_moe_digits.c $(LDLIBS)

vit-demo: $(BUILD)/vit_moe_digits
	./$(BUILD)/vit_moe_digits examples/data/digits.txt $(BUILD)

# The demos' numbers in README and the examples' comments, and the committed
# SVGs, are what the demos print and write (tests/doc_numbers.sh). The ViT is
# built for AVX2 where the CPU has it (whose run examples/vit_moe_digits.svg
# is), else with the reference kernels.
$(BUILD)/vit_docs: examples/vit_moe_digits.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 $(if $(HOST_AVX2),$(AVX2_FLAGS) -fopenmp,) -o $@ examples/vit_moe_digits.c $(LDLIBS)

doc-numbers: $(BUILD)/train_balance $(BUILD)/vit_docs
	tests/doc_numbers.sh $(BUILD)

EXAMPLES := $(BUILD)/mixtral_demo $(BUILD)/train_balance $(BUILD)/moe_transformer_layer \
            $(BUILD)/glam_block $(BUILD)/tour $(BUILD)/vit_moe_digits $(BUILD)/mixtral_block \
            $(BUILD)/safetensors_moe $(BUILD)/gguf_moe
examples: $(EXAMPLES)

run-examples: examples
	./$(BUILD)/moe_transformer_layer
	./$(BUILD)/glam_block
	./$(BUILD)/tour $(BUILD)
	./$(BUILD)/mixtral_block
	./$(BUILD)/safetensors_moe tests/ref/mixtral.safetensors
	./$(BUILD)/safetensors_moe tests/ref/deepseek_v3.safetensors
	./$(BUILD)/safetensors_moe tests/ref/ckpt/deepseek_v3 --input tests/ref/ckpt/deepseek_v3/io.safetensors
	./$(BUILD)/gguf_moe tests/ref/gguf/deepseek2_mxfp4.gguf
	./$(BUILD)/gguf_moe tests/ref/gguf/llama_q4_0_q4_k.gguf

# make test checks that `make examples` builds every examples/*.c but these:
# moe_mpi.c needs mpicc and Open MPI, so make test-mpi builds (and runs) it.
EXAMPLES_ELSEWHERE := moe_mpi
EXAMPLES_UNBUILT := $(filter-out $(notdir $(EXAMPLES)) $(EXAMPLES_ELSEWHERE), \
                      $(basename $(notdir $(wildcard examples/*.c))))
examples-listed:
	@test -z "$(EXAMPLES_UNBUILT)" || { echo "make examples does not build:" \
	    "$(patsubst %,examples/%.c,$(EXAMPLES_UNBUILT)) (add it to EXAMPLES in the Makefile)"; exit 1; }
	@echo "examples-listed: make examples builds every examples/*.c (but $(EXAMPLES_ELSEWHERE))"

tour-svgs: $(BUILD)/tour
	./$(BUILD)/tour docs

run: $(BUILD)/mixtral_demo
	./$(BUILD)/mixtral_demo

# Expert parallelism over MPI (examples/moe_mpi.c, Open MPI): test-mpi runs
# the bitwise check against moe_forward/moe_backward on 1, 2 and 4 ranks
# (last line "N passed, N failed"); bench-mpi times a mid-size layer
# (SIMD kernels, one thread per rank) on the same rank counts.
MPICC  ?= mpicc
MPIRUN ?= mpirun --oversubscribe --allow-run-as-root
MPI_BENCH ?= 512 1024 8 2 512 9
$(BUILD)/moe_mpi: examples/moe_mpi.c moe.h | $(BUILD)
	$(MPICC) -std=c99 $(WARN) -O2 -o $@ examples/moe_mpi.c $(LDLIBS)

$(BUILD)/moe_mpi_bench: examples/moe_mpi.c moe.h | $(BUILD)
	$(MPICC) -std=c99 $(WARN) -O2 $(HOST_SIMD) -o $@ examples/moe_mpi.c $(LDLIBS)

test-mpi: $(BUILD)/moe_mpi
	tests/run_suites.sh "$(MPIRUN) -np 1 ../$(BUILD)/moe_mpi" "$(MPIRUN) -np 2 ../$(BUILD)/moe_mpi" \
	    "$(MPIRUN) -np 4 ../$(BUILD)/moe_mpi"

bench-mpi: $(BUILD)/moe_mpi_bench
	for p in 1 2 4; do $(MPIRUN) -np $$p ./$(BUILD)/moe_mpi_bench --bench $(MPI_BENCH) || exit 1; done

.PHONY: test-mpi bench-mpi

# Benchmarks (bench/RESULTS.md records the figures with their commands).
$(BUILD)/moe_bench: bench/moe_bench.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 $(SIMD_FLAGS) -o $@ bench/moe_bench.c $(LDLIBS)

bench: $(BUILD)/moe_bench
	./$(BUILD)/moe_bench 2 1024
	./$(BUILD)/moe_bench 4 128

# Per-stage microbenchmarks: ./build/moe_bench --stage all [variants] [max_T] [json]
# (router, topk, dispatch, ffn, combine, backward; bench/moe_bench.c says how each is
# timed and counted). make test runs bench-stage-smoke: every stage of the smallest
# shape at T = 1 and 7, one timed run each, on the reference and the SIMD paths; it
# fails if a stage returns a non-OK status or differs from moe_forward (~10 s).
comma := ,
STAGE_SMOKE_VARIANTS := $(if $(HOST_AVX2)$(HOST_AVX512),0$(comma)2$(comma)3$(comma)6,0)
.PHONY: bench-stage-smoke
bench-stage-smoke: $(BUILD)/moe_bench
	@OMP_NUM_THREADS=2 ./$(BUILD)/moe_bench --stage all --reps 1 --T 1,7 --shape qwen-mini \
	    $(STAGE_SMOKE_VARIANTS) > $(BUILD)/bench-stage-smoke.log 2>&1 || \
	    { cat $(BUILD)/bench-stage-smoke.log; echo "bench-stage-smoke: FAILED"; exit 1; }
	@echo "bench-stage-smoke: ok (every stage, variants $(STAGE_SMOKE_VARIANTS), qwen-mini, T = 1, 7)"

# moe.h and the peers (OpenBLAS per-expert loop, PyTorch) in one run
bench-peers:
	bench/run_bench.sh 1024 $(BUILD)/bench.json

# roofline SVG of that JSON (python3 stdlib): build/roofline.svg
.PHONY: bench-plot
bench-plot:
	@test -f $(BUILD)/bench.json || { echo "no $(BUILD)/bench.json: run make bench-peers first"; exit 1; }
	$(PYTHON) bench/plot_roofline.py $(BUILD)/bench.json $(BUILD)/roofline.svg

# docs-check (CI): docs/TOUR.md's moe.h names exist, and every citation of a
# docs/ROUTING.md section names one of its headings
.PHONY: docs-check
docs-check:
	$(PYTHON) docs/check_refs.py

# Python package (issue 19, python/): python-cdef-check fails when python/moe/_cdef.h,
# the cffi declarations, is not what python/gen_cdef.py derives from moe.h (stdlib only).
# test-python makes a venv in $(PY_VENV), pip-installs ./python (the extension is moe.h
# compiled by the machine's compiler) and runs its pytest suite; PY_TORCH=1 also installs
# PyTorch from PyPI (~1 min, ~5 GB with its CUDA wheels) for the moe.torch tests, which
# are skipped without it.
# python-venv makes the venv alone (CI starts it early, beside the C steps). torch and
# numpy at the versions of tests/ref/requirements.txt, which the tests were checked with.
PY_VENV  ?= $(BUILD)/pyvenv
PY_TORCH ?= 0
PY_BIN   := $(abspath $(PY_VENV))/bin
.PHONY: python-cdef-check python-venv test-python
python-cdef-check:
	$(PYTHON) python/gen_cdef.py --check

python-venv:
	@test -x $(PY_BIN)/python || $(PYTHON) -m venv $(PY_VENV)
	$(PY_BIN)/pip install -q --disable-pip-version-check numpy==2.4.6 cffi pytest \
	    $(if $(filter 1,$(PY_TORCH)),torch==2.15.0,)

test-python: python-cdef-check python-venv
	$(PY_BIN)/pip install -q --disable-pip-version-check ./python
	cd python/tests && $(PY_BIN)/python -m pytest -q -rs .

# Regenerate the golden files from PyTorch / HF transformers (needs Python).
# Install (issue 19): the headers, a pkg-config file and a CMake package
# (find_package(moe) -> moe::moe). PREFIX and DESTDIR as usual; the header
# is the whole library, so nothing is compiled. make test-install builds four
# consumer projects against it (tests/consumers/run.sh).
PREFIX  ?= /usr/local
DESTDIR ?=
MOE_VERSION := $(shell sed -n 's/^\#define MOE_VERSION_STRING "\(.*\)"$$/\1/p' moe.h)
MOE_MAJOR := $(word 1,$(subst ., ,$(MOE_VERSION)))
MOE_MINOR := $(word 2,$(subst ., ,$(MOE_VERSION)))
INSTALLED := include/moe.h include/moe_cuda.cuh share/pkgconfig/moe.pc \
             share/cmake/moe/moeConfig.cmake share/cmake/moe/moeConfigVersion.cmake

install:
	install -d $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/share/pkgconfig \
	    $(DESTDIR)$(PREFIX)/share/cmake/moe
	install -m 644 moe.h moe_cuda.cuh $(DESTDIR)$(PREFIX)/include/
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(MOE_VERSION)|' cmake/moe.pc.in \
	    > $(DESTDIR)$(PREFIX)/share/pkgconfig/moe.pc
	install -m 644 cmake/moeConfig.cmake $(DESTDIR)$(PREFIX)/share/cmake/moe/
	sed -e 's|@VERSION@|$(MOE_VERSION)|' -e 's|@MAJOR@|$(MOE_MAJOR)|g' \
	    -e 's|@MINOR@|$(MOE_MINOR)|g' cmake/moeConfigVersion.cmake.in \
	    > $(DESTDIR)$(PREFIX)/share/cmake/moe/moeConfigVersion.cmake

uninstall:
	rm -f $(addprefix $(DESTDIR)$(PREFIX)/,$(INSTALLED))
	-rmdir $(DESTDIR)$(PREFIX)/share/cmake/moe 2>/dev/null

test-install:
	tests/consumers/run.sh

golden:
	$(PYTHON) -m pip install -q -r tests/ref/requirements.txt
	$(PYTHON) tests/ref/gen_golden.py
	$(PYTHON) tests/ref/gen_quant.py
	$(PYTHON) tests/ref/gen_gguf.py
	$(PYTHON) tests/ref/gen_checkpoints.py

clean:
	rm -rf $(BUILD)

# --- hardening (issue 8) ---
# check-valgrind    the suites under valgrind memcheck (leaks included); `make check`
#                   runs it after its own ASan + UBSan suites
# check-tsan        the suites under ThreadSanitizer (no OpenMP: libgomp is not
#                   instrumented; the suite's own pthreads exercise the tasks)
# compile-matrix    gcc/clang x C99/C11/C++17 x -O0/-O3 and the variants, -Werror
# fuzz              libFuzzer harness tests/fuzz/fuzz_moe.c for FUZZ_SECONDS
# test-fuzz-corpus  the seed corpus (and build/fuzz-corpus) replayed under gcc ASan + UBSan
# test-big          > 2^31-element arrays (~8.2 GiB RSS, ~1 min; not in the default suite)
CLANG        ?= clang
CLANGXX      ?= clang++
MATRIX_GCC   ?= gcc
MATRIX_GXX   ?= g++
AARCH64_CC   ?= aarch64-linux-gnu-gcc
VALGRIND     ?= valgrind
FUZZ_SECONDS ?= 60
# libFuzzer seed: a fixed one makes a CI run repeatable (given the same speed)
FUZZ_SEED ?= 1
MATRIX_JOBS  ?= 2
HOST_SIMD    := $(if $(HOST_AVX512),$(AVX512_FLAGS),$(if $(HOST_AVX2),$(AVX2_FLAGS),))

.PHONY: check-valgrind check-tsan compile-matrix matrix-objs matrix-extra fuzz fuzz-seeds \
        test-fuzz-corpus test-big

# make check = its ASan + UBSan suites (above) + check-valgrind: ~2.5 min more
# on 2 cores (measured on a clean clone, see .ci/run's per-step times).
check: check-valgrind

# valgrind runs the reference and the AVX2 suite side by side (valgrind has no
# AVX-512), one suite per valgrind run so VG_SKIP can leave out the slow ones:
# the ViT training test (4 s natively) takes ~4 min per binary under valgrind
# and is covered by ASan in `make check`. The AVX2 binary runs with
# OMP_NUM_THREADS=1: valgrind serialises threads and libgomp's spinning makes
# a 2-thread run ~10x slower; threads are TSan's job (check-tsan). The train
# suite (~1 min under valgrind) and the quant suite (~50 s: its layer checks)
# run on the reference binary only, so the two sides take about as long; the
# AVX2 integer dots are in ASan + UBSan's and TSan's runs.
VG_SKIP ?= vit
VG_SKIP_AVX2 ?= train quant
VG_SED := s/^TEST(\([a-z_0-9]*\),.*/\1/p
VG_SUITES := $(filter-out $(VG_SKIP),$(sort $(shell sed -n '$(VG_SED)' $(TEST_SRC))))
VG_SUITES_AVX2 := $(filter-out $(VG_SKIP_AVX2),$(VG_SUITES))
export VG := $(VALGRIND) -q --error-exitcode=1 --leak-check=full --show-leak-kinds=definite,indirect \
      --errors-for-leak-kinds=definite,indirect
check-valgrind: $(BUILD)/moe_tests $(if $(HOST_AVX2),$(BUILD)/moe_tests_avx2,)
	@echo "valgrind: suites $(VG_SUITES) (skipped: $(VG_SKIP); on AVX2 also: $(VG_SKIP_AVX2))"
	@$(MAKE) --no-print-directory -j2 valgrind-ref $(if $(HOST_AVX2),valgrind-avx2,)

.PHONY: valgrind-ref valgrind-avx2
valgrind-ref:
	@tests/run_suites.sh $(foreach s,$(VG_SUITES),'$$VG ../$(BUILD)/moe_tests $(s).')
valgrind-avx2:
	@OMP_NUM_THREADS=1 tests/run_suites.sh $(foreach s,$(VG_SUITES_AVX2),'$$VG ../$(BUILD)/moe_tests_avx2 $(s).')

$(BUILD)/moe_tests_tsan: $(TEST_SRC) $(TEST_HDR) | $(BUILD)
	$(CC) -std=c99 $(WARN) -O1 -g -fsanitize=thread -o $@ $(TEST_SRC) $(LDLIBS) -pthread

$(BUILD)/moe_tests_tsan_simd: $(TEST_SRC) $(TEST_HDR) | $(BUILD)
	$(CC) -std=c99 $(WARN) -O1 -g $(HOST_SIMD) -fsanitize=thread -o $@ $(TEST_SRC) $(LDLIBS) -pthread

# Run as one process per suite, both binaries side by side; TSAN_SKIP leaves
# out single-threaded suites that are slow under TSan (the ViT test: 80 s).
TSAN_SKIP ?= vit
TSAN_SUITES := $(filter-out $(TSAN_SKIP),$(sort $(shell sed -n '$(VG_SED)' $(TEST_SRC))))
check-tsan:
	@echo "tsan: suites $(TSAN_SUITES) (skipped: $(TSAN_SKIP))"
	@$(MAKE) --no-print-directory -j2 tsan-ref $(if $(HOST_SIMD),tsan-simd,)

.PHONY: tsan-ref tsan-simd
tsan-ref: $(BUILD)/moe_tests_tsan
	@TSAN_OPTIONS=halt_on_error=1 tests/run_suites.sh $(foreach s,$(TSAN_SUITES),'../$(BUILD)/moe_tests_tsan $(s).')
tsan-simd: $(BUILD)/moe_tests_tsan_simd
	@TSAN_OPTIONS=halt_on_error=1 tests/run_suites.sh $(foreach s,$(TSAN_SUITES),'../$(BUILD)/moe_tests_tsan_simd $(s).')

# Compile matrix: compile only (-c), each object depends on moe.h, run with
# -j$(MATRIX_JOBS). Full grid {gcc, clang} x {c99, c11, c++17} x {-O0, -O3};
# MOE_STATIC and MOE_NO_SIMD at -O0 (preprocessor variants), the ISA flags at
# -O3 (where the vector code is optimised and warned about), each for C99 and
# C++17 with both compilers; aarch64 (NEON) cross at -O0/-O3; the .cu file.
# nvcc gets no -pedantic: its generated host code uses GCC line markers.
# MATRIX_XFAIL: objects that fail for a known reason in moe.h (reported with
# issue 8); they print XFAIL instead of failing the build, XPASS once fixed.
MATRIX := $(BUILD)/matrix
MATRIX_XFAIL ?=
MATRIX_OBJS :=
# $(1) name, $(2) compiler, $(3) flags, $(4) source
define matrix_obj
MATRIX_OBJS += $(MATRIX)/$(1).o
$(MATRIX)/$(1).o: $(4) moe.h
	@mkdir -p $(MATRIX)
	@if $(2) $(3) $(WARN) -c $(4) -o $$@.tmp 2> $(MATRIX)/$(1).log; then \
	    mv $$@.tmp $$@; \
	    if echo " $(MATRIX_XFAIL) " | grep -q " $(1) "; then echo "XPASS $(1): remove it from MATRIX_XFAIL"; \
	    else echo "ok    $(1): $(2) $(3)"; fi; \
	elif echo " $(MATRIX_XFAIL) " | grep -q " $(1) "; then \
	    echo "XFAIL $(1): $(2) $(3) (known moe.h issue; log: $(MATRIX)/$(1).log)"; touch $$@; \
	else cat $(MATRIX)/$(1).log; echo "FAIL  $(1): $(2) $(3)"; exit 1; fi
endef
$(foreach o,O0 O3, \
  $(foreach s,c99 c11, \
    $(eval $(call matrix_obj,gcc-$(s)-$(o),$(MATRIX_GCC),-std=$(s) -$(o),$(COMPILE_C))) \
    $(eval $(call matrix_obj,clang-$(s)-$(o),$(CLANG),-std=$(s) -$(o),$(COMPILE_C)))) \
  $(eval $(call matrix_obj,gxx-cxx17-$(o),$(MATRIX_GXX),-std=c++17 -$(o),$(COMPILE_X))) \
  $(eval $(call matrix_obj,clangxx-cxx17-$(o),$(CLANGXX),-std=c++17 -$(o),$(COMPILE_X))))
# variant name:flags (+ for a space):optimisation
MATRIX_VARIANTS := static:-DMOE_STATIC:O0 nosimd:-DMOE_NO_SIMD:O0 avx2:-mavx2+-mfma:O3 \
                   avx512bf16:-mavx512f+-mavx512bf16:O3 \
                   avx512vnni:-mavx512f+-mavx512bf16+-mavx512vnni+-mavx512vl:O3
$(foreach v,$(MATRIX_VARIANTS), \
  $(eval mv_name := $(word 1,$(subst :, ,$(v)))) \
  $(eval mv_flags := $(subst +, ,$(word 2,$(subst :, ,$(v))))) \
  $(eval mv_opt := $(word 3,$(subst :, ,$(v)))) \
  $(eval $(call matrix_obj,gcc-c99-$(mv_opt)-$(mv_name),$(MATRIX_GCC),-std=c99 -$(mv_opt) $(mv_flags),$(COMPILE_C))) \
  $(eval $(call matrix_obj,clang-c99-$(mv_opt)-$(mv_name),$(CLANG),-std=c99 -$(mv_opt) $(mv_flags),$(COMPILE_C))) \
  $(eval $(call matrix_obj,gxx-cxx17-$(mv_opt)-$(mv_name),$(MATRIX_GXX),-std=c++17 -$(mv_opt) $(mv_flags),$(COMPILE_X))) \
  $(eval $(call matrix_obj,clangxx-cxx17-$(mv_opt)-$(mv_name),$(CLANGXX),-std=c++17 -$(mv_opt) $(mv_flags),$(COMPILE_X))))

# aarch64 and nvcc are skipped (with a message) when the tool is missing.
matrix-extra:
	@mkdir -p $(MATRIX)
	@if command -v $(AARCH64_CC) >/dev/null 2>&1; then \
	    for o in O0 O3; do $(AARCH64_CC) -std=c99 -$$o $(WARN) -c $(COMPILE_C) -o $(MATRIX)/aarch64-c99-$$o.o || exit 1; \
	        echo "ok    aarch64-c99-$$o: $(AARCH64_CC) -std=c99 -$$o"; done; \
	else echo "SKIP  aarch64: $(AARCH64_CC) not found (apt-get install gcc-aarch64-linux-gnu)"; fi
	@if command -v $(NVCC) >/dev/null 2>&1; then \
	    $(NVCC) -std=c++17 --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
	        -c tests/compile/compile_cu.cu -o $(MATRIX)/nvcc-cxx17.o || exit 1; \
	    echo "ok    nvcc-cxx17: $(NVCC) -std=c++17"; \
	else echo "SKIP  nvcc: $(NVCC) not found"; fi

matrix-objs: $(MATRIX_OBJS) matrix-extra

compile-matrix:
	@$(MAKE) --no-print-directory -j$(MATRIX_JOBS) matrix-objs
	@echo "compile matrix: ok"

# Fuzzing. The harness is built for the host's SIMD ISA, so every input runs
# the reference and the SIMD kernels and compares them.
FUZZ_SRC   := tests/fuzz/fuzz_moe.c
FUZZ_FLAGS := -std=c99 $(WARN) -O1 -g $(HOST_SIMD) -fno-sanitize-recover=all -fno-omit-frame-pointer
$(BUILD)/fuzz_moe: $(FUZZ_SRC) moe.h | $(BUILD)
	$(CLANG) $(FUZZ_FLAGS) -fsanitize=fuzzer,address,undefined -o $@ $(FUZZ_SRC) $(LDLIBS) -pthread

fuzz: $(BUILD)/fuzz_moe
	@mkdir -p $(BUILD)/fuzz-corpus $(BUILD)/fuzz-crashes
	@echo "fuzzing $(FUZZ_SECONDS) s (log $(BUILD)/fuzz.log, new inputs in $(BUILD)/fuzz-corpus)"
	@./$(BUILD)/fuzz_moe -seed=$(FUZZ_SEED) -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
	    -artifact_prefix=$(BUILD)/fuzz-crashes/ $(BUILD)/fuzz-corpus tests/fuzz/corpus > $(BUILD)/fuzz.log 2>&1; \
	rc=$$?; \
	if [ $$rc -ne 0 ]; then tail -n 60 $(BUILD)/fuzz.log; \
	    echo "fuzz: FAILED; the input is in $(BUILD)/fuzz-crashes (replay: make $(BUILD)/fuzz_replay && ./$(BUILD)/fuzz_replay FILE)"; \
	else grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added)' $(BUILD)/fuzz.log; \
	    echo "fuzz: ok"; fi; \
	exit $$rc

$(BUILD)/fuzz_replay: $(FUZZ_SRC) moe.h | $(BUILD)
	$(CC) $(FUZZ_FLAGS) -DFUZZ_STANDALONE -fsanitize=address,undefined -o $@ $(FUZZ_SRC) $(LDLIBS) -pthread

test-fuzz-corpus: $(BUILD)/fuzz_replay
	./$(BUILD)/fuzz_replay tests/fuzz/corpus $(wildcard $(BUILD)/fuzz-corpus)

# Rewrite the seed corpus (after changing the input layout of fuzz_moe.c).
# The regress_* inputs the fuzzer found are kept: after a layout change,
# rebuild each from the case its failure report printed.
fuzz-seeds: $(BUILD)/fuzz_replay
	find tests/fuzz/corpus -type f ! -name 'regress_*' -delete
	./$(BUILD)/fuzz_replay --make-seeds tests/fuzz/corpus

$(BUILD)/test_big: tests/big/test_big.c moe.h | $(BUILD)
	$(CC) -std=c99 $(WARN) -O2 $(SIMD_FLAGS) -o $@ tests/big/test_big.c $(LDLIBS)

test-big: $(BUILD)/test_big
	@if [ -x /usr/bin/time ]; then /usr/bin/time -f "test-big: %e s, peak RSS %M KiB" ./$(BUILD)/test_big; \
	else ./$(BUILD)/test_big; fi

# --- CUDA device code (issue 16) ---
# test-cuda-emu   tests/cuda_emu/test_emu.cu (the emulator's own suite) and
#                 test_moe_cuda.cu (moe_cuda.cuh's kernels) built with g++
#                 against the CUDA emulator (tests/cuda_emu/cuda_emu.h): the
#                 hand-written fiber switch, the ucontext one, and the first
#                 under ASan + UBSan
# cuda            the same sources through nvcc for $(CUDA_ARCHS): spills, local
#                 memory or warnings fail; resources per kernel printed; the
#                 SASS holds HMMA / LDSM / LDGSTS (cuobjdump, PyPI wheels in CI);
#                 the binaries run (SKIP without a GPU)
CUDA_ARCHS := sm_80 sm_90a
EMU_TESTS  := test_emu test_moe_cuda
EMU_DEPS   := moe.h moe_cuda.cuh tests/cuda_emu/cuda_emu.h tests/cuda_emu/emu_test.h
EMU_CXX    := $(CXX) -std=c++17 $(WARN) -O1 -g -x c++ -DCUDA_EMU -Itests/cuda_emu
EMU_BINS   := $(foreach t,$(EMU_TESTS),$(BUILD)/cuda_emu_$(t) $(BUILD)/cuda_emu_$(t)_ucontext \
                $(BUILD)/cuda_emu_$(t)_san)
.PHONY: test-cuda-emu cuda

$(BUILD)/cuda_emu_%: tests/cuda_emu/%.cu $(EMU_DEPS) | $(BUILD)
	$(EMU_CXX) -o $@ $<
$(BUILD)/cuda_emu_%_ucontext: tests/cuda_emu/%.cu $(EMU_DEPS) | $(BUILD)
	$(EMU_CXX) -DCUDA_EMU_UCONTEXT -o $@ $<
$(BUILD)/cuda_emu_%_san: tests/cuda_emu/%.cu $(EMU_DEPS) | $(BUILD)
	$(EMU_CXX) -fsanitize=address,undefined -fno-sanitize-recover=all -o $@ $<

# The ucontext switch (the portable fallback, ~5x slower) runs the emulator's
# suite and moe_cuda.cuh's kernel tests; the whole-layer tests run on the
# other two builds. Two binaries at a time.
EMU_UCONTEXT_ONLY := grouped_gemm,dispatch,route
test-cuda-emu: $(EMU_BINS)
	RUN_SUITES_JOBS=2 tests/run_suites.sh $(foreach b,$(EMU_BINS),$(if $(findstring moe_cuda_ucontext,$(b)),\
	    "EMU_TEST=$(EMU_UCONTEXT_ONLY) ../$(b)",../$(b)))

cuda: | $(BUILD)
	@if command -v $(NVCC) >/dev/null 2>&1; then \
	    SASS_EXPECT="HMMA.16816.F32.BF16 LDSM.16.M88.4 LDSM.16.MT88.4 LDGSTS.E.BYPASS.128" \
	        tests/cuda_emu/nvcc_check.sh $(NVCC) $(BUILD)/cuda_test_emu tests/cuda_emu/test_emu.cu \
	        $(CUDA_ARCHS) && \
	    SASS_EXPECT="HMMA.16816.F32.BF16 LDSM.16.M88.4 LDSM.16.MT88.4 LDGSTS.E.BYPASS.128" \
	        tests/cuda_emu/nvcc_check.sh $(NVCC) $(BUILD)/cuda_test_moe_cuda \
	        tests/cuda_emu/test_moe_cuda.cu $(CUDA_ARCHS); \
	else echo "nvcc not found: make cuda skipped"; fi
