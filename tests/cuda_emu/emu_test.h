/* emu_test.h - the host side of the CUDA test programs in tests/cuda_emu:
   CHECK, device buffers, bf16 bits, the four emulator schedules, planted-bug
   accounting and the runner (last line "N passed, N failed"). Built with g++
   -DCUDA_EMU (the emulator) or nvcc (a GPU: one schedule, the GPU's). */
#ifndef EMU_TEST_H
#define EMU_TEST_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <string>

static int g_failed;
#define CHECK(cond)                                                               \
    do {                                                                          \
        if (!(cond)) {                                                            \
            printf("  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);     \
            g_failed = 1;                                                         \
        }                                                                         \
    } while (0)

static inline void *dalloc(size_t bytes) {
    void *p = NULL;
    if (cudaMalloc(&p, bytes) != cudaSuccess) { printf("cudaMalloc failed\n"); exit(1); }
    return p;
}
static inline void up(void *d, const void *h, size_t n) {
    cudaMemcpy(d, h, n, cudaMemcpyHostToDevice);
}
static inline void down(void *h, const void *d, size_t n) {
    cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost);
}

static inline uint16_t bf16_bits(float f) {   /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float bf16_value(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint32_t lcg(uint32_t *s) { *s = *s * 1664525u + 1013904223u; return *s >> 8; }

/* Schedules: each test runs under all; one alone misses some planted bugs. */
#ifdef CUDA_EMU
static const cuda_emu::schedule schedules[] = {
    {cuda_emu::FORWARD, false, cuda_emu::AT_WAIT, 1},
    {cuda_emu::REVERSE, true, cuda_emu::AT_ISSUE, 1},
    {cuda_emu::RANDOM, false, cuda_emu::AT_ISSUE, 7},
    {cuda_emu::RANDOM, true, cuda_emu::AT_WAIT, 8},
};
enum { NSCHED = 4 };
static inline void use_schedule(int s) { cuda_emu::current_schedule() = schedules[s]; }
static inline const char *schedule_name(int s) { return cuda_emu::describe(schedules[s]); }
static inline std::string launch_error() { return cuda_emu::last_error(); }
#else
enum { NSCHED = 1 };
static inline void use_schedule(int) {}
static inline const char *schedule_name(int) { return "gpu"; }
static inline std::string launch_error() { return ""; }
#endif

/* A planted bug is caught in a schedule when the launch fails or the answer
   is wrong; it must be caught in at least one. The planted bugs test the
   emulator: a GPU does not run them (a race need not show there, and the
   sanitizers would rightly report them). */
#ifdef CUDA_EMU
enum { PLANTED = 1 };
static inline void expect_caught(const char *bug, int caught_in) {
    printf("    planted bug \"%s\": caught in %d of %d schedules\n", bug, caught_in, NSCHED);
    CHECK(caught_in > 0);
}
#else
enum { PLANTED = 0 };
static inline void expect_caught(const char *bug, int) {
    printf("    planted bug \"%s\": an emulator self-test, not run on a GPU\n", bug);
}
#endif

typedef struct emu_test { const char *name; void (*fn)(void); } emu_test;

static inline int run_tests(const char *suite, const emu_test *tests, int count) {
    int n = 0, passed = 0, failed = 0;
#ifndef CUDA_EMU
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        printf("SKIP: no CUDA device (cudaGetDeviceCount says %s)\n",
               cudaGetErrorString(cudaGetLastError()));
        printf("0 passed, 0 failed\n");
        return 0;
    }
#endif
    /* EMU_TEST=route,backward: those tests alone */
    const std::string only = getenv("EMU_TEST") ? "," + std::string(getenv("EMU_TEST")) + "," : "";
    for (n = 0; n < count; n++) {
        const std::string name = "," + std::string(tests[n].name) + ",";
        if (only.size() > 2 && only.find(name) == std::string::npos) continue;
        g_failed = 0;
        printf("%s.%s (%d schedules: ", suite, tests[n].name, NSCHED);
        for (int s = 0; s < NSCHED; s++) printf("%s%s", s ? ", " : "", schedule_name(s));
        printf(")\n");
        tests[n].fn();
        if (g_failed) { failed++; printf("FAIL %s.%s\n", suite, tests[n].name); }
        else passed++;
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}

#endif /* EMU_TEST_H */
