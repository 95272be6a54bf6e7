/* moe_test.h -- the tiny test harness of moe.h's suite (in the spirit of utest.h).
   TEST(suite, name) { ... } registers itself before main() runs (a GCC/Clang
   constructor); CHECK* record a failure with file:line and carry on; the
   runner (tests/test_main.c) prints one summary line "N passed, N failed".  */
#ifndef MOE_TEST_H
#define MOE_TEST_H
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

typedef void (*moe_test_fn)(void);
void moe_test_register(const char *suite, const char *name, moe_test_fn fn);
void moe_test_fail(const char *file, int line, const char *fmt, ...);
void moe_test_skip(const char *why);

#define TEST(suite, name)                                                        \
    static void suite##__##name(void);                                           \
    __attribute__((constructor)) static void suite##__##name##__reg(void) {      \
        moe_test_register(#suite, #name, suite##__##name);                       \
    }                                                                            \
    static void suite##__##name(void)

#define CHECK(cond) \
    do { if (!(cond)) moe_test_fail(__FILE__, __LINE__, "CHECK(%s)", #cond); } while (0)
#define CHECK_INT(got, want)                                                     \
    do { long long g_ = (long long)(got), w_ = (long long)(want);                 \
         if (g_ != w_) moe_test_fail(__FILE__, __LINE__, "%s = %lld, want %lld", #got, g_, w_); } while (0)
#define CHECK_STATUS(got, want)                                                  \
    do { int g_ = (int)(got), w_ = (int)(want);                                  \
         if (g_ != w_) moe_test_fail(__FILE__, __LINE__, "%s = %d (%s), want %d (%s)", #got, \
             g_, moe_status_string((moe_status)g_), w_, moe_status_string((moe_status)w_)); } while (0)
/* |got - want| <= atol + rtol * |want|  (llm.c's rule) */
#define CHECK_NEAR(got, want, atol, rtol)                                        \
    do { double g_ = (double)(got), w_ = (double)(want);                          \
         if (!(fabs(g_ - w_) <= (atol) + (rtol) * fabs(w_)))                     \
             moe_test_fail(__FILE__, __LINE__, "%s = %.9g, want %.9g", #got, g_, w_); } while (0)
/* Element-wise CHECK_NEAR over n floats; reports the first and worst miss. */
#define CHECK_ARRAY_NEAR(got, want, n, atol, rtol) \
    moe_test_check_array(__FILE__, __LINE__, #got, (got), (want), (n), (atol), (rtol))
void moe_test_check_array(const char *file, int line, const char *what, const float *got,
                          const double *want, size_t n, double atol, double rtol);
#define SKIP(why) do { moe_test_skip(why); return; } while (0)

/* Test data from a 64-bit LCG, one stream per state variable: uniform in
   [-1, 1), and n such values times scale in a malloc'd array.            */
float moe_test_rand(uint64_t *state);
float *moe_test_fill(uint64_t *state, size_t n, float scale);
/* A file's bytes in an exact-size heap copy (NULL when unreadable or empty). */
unsigned char *moe_test_read_file(const char *path, size_t *len);

/* Tolerances for comparisons against docs/ROUTING.md's float64 numbers, printed
   to 6 decimals: fp32 agrees to ~1e-6 absolute / 1e-5 relative ("Conventions"). */
#define SPEC_ATOL 2e-6
#define SPEC_RTOL 1e-5
#endif
