/* Test runner: the one translation unit that builds moe.h's implementation.
   Every other tests/test_*.c includes moe.h for declarations only, so the
   suite also proves two translation units link without duplicate symbols.
   Output: a line per suite as it finishes ("suite forward: 17 passed,
   0 failed (1.2 s)", flushed, so a pipe shows progress), FAIL/skip lines and
   the failed checks, and last the total "N passed, N failed" (CI reads it). */
#define _POSIX_C_SOURCE 199309L       /* clock_gettime: the suites' wall time */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "moe_test.h"
#include <stdarg.h>
#include <time.h>

#define MAX_TESTS 1024
static struct { const char *suite, *name; moe_test_fn fn; } tests[MAX_TESTS];
static int num_tests, current_failed, current_skipped;

void moe_test_register(const char *suite, const char *name, moe_test_fn fn) {
    if (num_tests == MAX_TESTS) { fprintf(stderr, "too many tests\n"); exit(2); }
    tests[num_tests].suite = suite; tests[num_tests].name = name; tests[num_tests].fn = fn;
    num_tests++;
}

void moe_test_fail(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    if (current_failed++ >= 8) return;          /* keep a failing test's report short */
    fprintf(stderr, "  %s:%d: ", file, line);
    va_start(ap, fmt); vfprintf(stderr, fmt, ap); va_end(ap);
    fputc('\n', stderr);
}

float moe_test_rand(uint64_t *state) {
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*state >> 40) * (1.0 / 8388608.0)) - 1.0f;
}
float *moe_test_fill(uint64_t *state, size_t n, float scale) {
    float *a = (float *)malloc((n ? n : 1) * sizeof(float));
    size_t i;
    for (i = 0; i < n; i++) a[i] = scale * moe_test_rand(state);
    return a;
}

unsigned char *moe_test_read_file(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    unsigned char *b = NULL;
    long n;
    *len = 0;
    if (!fp) return NULL;
    if (fseek(fp, 0, SEEK_END) == 0 && (n = ftell(fp)) > 0 && fseek(fp, 0, SEEK_SET) == 0 &&
        (b = (unsigned char *)malloc((size_t)n)) && fread(b, 1, (size_t)n, fp) == (size_t)n)
        *len = (size_t)n;
    else { free(b); b = NULL; }
    fclose(fp);
    return b;
}

void moe_test_skip(const char *why) { current_skipped = 1; printf("  skipped: %s\n", why); }

void moe_test_check_array(const char *file, int line, const char *what, const float *got,
                          const double *want, size_t n, double atol, double rtol) {
    size_t i, bad = 0, worst = 0;
    double worst_excess = 0.0;
    for (i = 0; i < n; i++) {
        double err = fabs((double)got[i] - want[i]), lim = atol + rtol * fabs(want[i]);
        if (!(err <= lim)) {
            if (!bad || err - lim > worst_excess) { worst = i; worst_excess = err - lim; }
            bad++;
        }
    }
    if (bad)
        moe_test_fail(file, line, "%s: %zu of %zu elements off; worst [%zu] = %.9g, want %.9g",
                      what, bad, n, worst, (double)got[worst], want[worst]);
}

/* Does "suite.name" contain one of filter's comma-separated substrings? */
static int test_selected(const char *full, const char *filter) {
    if (*filter == '\0') return 1;                   /* "" selects all, as strstr did */
    while (filter) {
        const char *comma = strchr(filter, ',');
        const size_t n = comma ? (size_t)(comma - filter) : strlen(filter);
        const char *p;
        for (p = full; n > 0 && strlen(p) >= n; p++)
            if (strncmp(p, filter, n) == 0) return 1;
        filter = comma ? comma + 1 : NULL;
    }
    return 0;
}

static double wall_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* "suite NAME: N passed, N failed[, N skipped] (T s)", flushed */
static void suite_line(const char *suite, const int count[3], double t0) {
    printf("suite %s: %d passed, %d failed", suite, count[0], count[1]);
    if (count[2]) printf(", %d skipped", count[2]);
    printf(" (%.1f s)\n", wall_seconds() - t0);
    fflush(stdout);
}

int main(int argc, char **argv) {
    int i, passed = 0, failed = 0, skipped = 0, count[3] = {0, 0, 0};
    const char *filter = argc > 1 ? argv[1] : NULL;   /* optional: substrings of suite.name, a,b,... */
    const char *suite = NULL;                          /* the suite being run */
    double t0 = 0.0;
    for (i = 0; i < num_tests; i++) {
        char full[256];
        snprintf(full, sizeof full, "%s.%s", tests[i].suite, tests[i].name);
        if (filter && !test_selected(full, filter)) continue;
        if (!suite || strcmp(suite, tests[i].suite) != 0) {
            if (suite) suite_line(suite, count, t0);
            suite = tests[i].suite; count[0] = count[1] = count[2] = 0; t0 = wall_seconds();
        }
        current_failed = 0; current_skipped = 0;
        tests[i].fn();
        if (current_failed) { printf("FAIL %s\n", full); failed++; count[1]++; }
        else if (current_skipped) { printf("skip %s\n", full); skipped++; count[2]++; }
        else { passed++; count[0]++; }
        fflush(stdout);
    }
    if (suite) suite_line(suite, count, t0);
    if (skipped) printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
    else printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
