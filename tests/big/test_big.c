/* test_big.c -- `make test-big` (issue 8): 64-bit offsets on arrays of more
   than 2^31 elements. Not in the default suite: it needs ~9 GiB of RAM.

   What is feasible. An element index can only pass 2^31 in an array of more
   than 2^31 elements (8 GiB of floats). Every float tensor of moe.h that can
   be that large comes with a twin of the same size: x / y [T][D], gate /
   down [E][F][D], logits / scores [T][E], xg / out [N][D] in the workspace,
   and the backward's dx plus its [T][D] scratch. The backward therefore needs
   >= 17 GiB resident and weight tensors >= 16 GiB: infeasible on a 24 GiB
   machine. The forward is feasible because
     - x is calloc'ed: its 8 GiB are zero pages that are never written, so
       reading them costs no resident memory (only two rows are set);
     - with capacity 1 only E*C = 2 rows are gathered: the [N][D] workspace
       rows of dropped tokens are never touched (the workspace is virtual);
     - y is written in full (dropped tokens get 0): the one 8 GiB resident.
   Shape: T = 2^21 tokens, D = 1025, E = 2, K = 1, F = 1: T*D = 2,149,580,800
   > 2^31 elements. The two kept tokens sit where 32-bit offsets break: token
   2,095,105 (its y row straddles element 2^31) and the last token (offset
   2,149,579,775). Both y rows are checked against float64, rows around
   them and a sample of dropped rows must be exactly 0, and the routing
   counts must add up. It runs the reference and (when compiled for one) the
   SIMD ISA, threaded when built with -fopenmp.
   Part 1 checks the size queries' 64-bit arithmetic without allocating.
   Peak RSS ~8.7 GiB, about 20 s (numbers in the hardening report).         */
#define _DEFAULT_SOURCE            /* MAP_ANONYMOUS, MAP_NORESERVE */
#define MOE_IMPLEMENTATION
#include "../../moe.h"

#include <sys/mman.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { E = 2, D = 1025, F = 1 };
#define T_BIG ((int32_t)1 << 21)
#define T_EDGE ((int32_t)2095105)           /* row [T_EDGE*D, (T_EDGE+1)*D) contains 2^31 */
#define T_LAST (T_BIG - 1)

static int failures;
#define EXPECT(cond) \
    do { if (!(cond)) { failures++; fprintf(stderr, "test_big.c:%d: FAILED %s\n", __LINE__, #cond); } } while (0)

/* Part 1: size queries near the limits (no allocation). */
static void size_queries(void) {
    moe_config c;
    size_t bytes = 0;
    memset(&c, 0, sizeof c);
    c.num_experts = E; c.top_k = 1; c.d_model = D; c.d_ff = F;
    EXPECT(moe_forward_workspace_size(&c, T_BIG, &bytes) == MOE_STATUS_OK);
    /* xg and out are [T*K][D] floats each: the size must not have wrapped */
    EXPECT(bytes >= (size_t)2 * T_BIG * D * sizeof(float));
    EXPECT(moe_backward_workspace_size(&c, T_BIG, &bytes) == MOE_STATUS_OK);
    EXPECT(bytes >= (size_t)4 * T_BIG * D * sizeof(float));
    EXPECT(moe_info_size(&c, T_BIG, &bytes) == MOE_STATUS_OK);
    EXPECT(bytes >= (size_t)2 * T_BIG * E * sizeof(float));
    c.d_model = 2147483647; c.d_ff = 2147483647; c.num_experts = 2147483647; c.top_k = 2147483647;
    EXPECT(moe_forward_workspace_size(&c, 2147483647, &bytes) == MOE_STATUS_SIZE_OVERFLOW);
    EXPECT(moe_backward_workspace_size(&c, 2147483647, &bytes) == MOE_STATUS_SIZE_OVERFLOW);
    EXPECT(moe_info_size(&c, 2147483647, &bytes) == MOE_STATUS_SIZE_OVERFLOW);
}

/* w * down . (silu(gate . x) * (up . x)) in double, one row. */
static void expect_row(const float *y, const float *x, const float *gate, const float *up,
                       const float *down, int32_t e, double w) {
    double g = 0.0, u = 0.0, h;
    int32_t d, bad = 0;
    for (d = 0; d < D; d++) {
        g += (double)gate[(size_t)e * D + d] * x[d];
        u += (double)up[(size_t)e * D + d] * x[d];
    }
    h = g / (1.0 + exp(-g)) * u;
    for (d = 0; d < D; d++) {
        const double want = w * (double)down[(size_t)e * D + d] * h;
        if (!(fabs(y[d] - want) <= 1e-5 + 1e-4 * fabs(want))) bad++;
    }
    EXPECT(bad == 0);
}

static int row_zero(const float *y, size_t t) {
    size_t d;
    for (d = 0; d < D; d++) if (y[t * D + d] != 0.0f) return 0;
    return 1;
}

int main(void) {
    const size_t n = (size_t)T_BIG * D;
    float *x, *y, router[E * D], gate[E * F * D], up[E * F * D], down[E * D * F];
    float *logits, *scores, *weight;
    int32_t *expert, routed[E], kept[E];
    uint8_t *dropped;
    moe_weights w;
    moe_config c;
    int pass;
    size_t i, t;
    uint32_t s = 12345u;

    printf("test_big: T = %d, D = %d: T*D = %zu elements (2^31 = %zu), y = %.2f GiB\n", (int)T_BIG, D, n,
           (size_t)1 << 31, (double)n * 4 / (1 << 30));
    size_queries();

    x = (float *)calloc(n, sizeof(float));          /* zero pages: no resident memory */
    y = (float *)malloc(n * sizeof(float));
    logits = (float *)malloc((size_t)T_BIG * E * sizeof(float));
    scores = (float *)malloc((size_t)T_BIG * E * sizeof(float));
    weight = (float *)malloc((size_t)T_BIG * sizeof(float));
    expert = (int32_t *)malloc((size_t)T_BIG * sizeof(int32_t));
    dropped = (uint8_t *)malloc((size_t)T_BIG);
    if (!x || !y || !logits || !scores || !weight || !expert || !dropped) {
        printf("test_big: cannot allocate %.1f GiB: skipped\n", (double)n * 8 / (1 << 30));
        return 0;
    }
    for (i = 0; i < (size_t)E * D; i++) {
        s = s * 1664525u + 1013904223u; gate[i] = (float)((s >> 8) * (1.0 / 16777216.0)) - 0.5f;
        s = s * 1664525u + 1013904223u; up[i] = (float)((s >> 8) * (1.0 / 16777216.0)) - 0.5f;
        s = s * 1664525u + 1013904223u; down[i] = (float)((s >> 8) * (1.0 / 16777216.0)) - 0.5f;
    }
    /* router: expert 0 reads d = 0, expert 1 reads d = 1 */
    memset(router, 0, sizeof router);
    router[0] = 1.0f; router[D + 1] = 1.0f;
    /* the last token picks expert 0 (score 0.88, the highest of its 2^21 - 1
       tokens, which all tie at 0.5); T_EDGE is the only token of expert 1 */
    for (i = 0; i < D; i++) {
        s = s * 1664525u + 1013904223u;
        x[(size_t)T_LAST * D + i] = i == 0 ? 2.0f : i == 1 ? 0.0f : (float)((s >> 8) * (1.0 / 16777216.0)) - 0.5f;
        s = s * 1664525u + 1013904223u;
        x[(size_t)T_EDGE * D + i] = i == 1 ? 2.0f : i == 0 ? 0.0f : (float)((s >> 8) * (1.0 / 16777216.0)) - 0.5f;
    }

    memset(&w, 0, sizeof w);
    w.router = router; w.gate = gate; w.up = up; w.down = down;
    memset(&c, 0, sizeof c);
    c.num_experts = E; c.top_k = 1; c.d_model = D; c.d_ff = F;
    c.normalize = MOE_NORM_NONE;              /* weight = score */
    c.capacity = 1; c.drop_policy = MOE_DROP_WEIGHT;

    for (pass = 0; pass < 2; pass++) {
        moe_info info;
        moe_status st;
        moe_config rc;
        c.isa = pass ? MOE_ISA_AUTO : MOE_ISA_REFERENCE;
        moe_config_resolve(&c, &rc);
        if (pass && rc.isa == MOE_ISA_REFERENCE) { printf("test_big: no SIMD ISA compiled in\n"); break; }
        memset(&info, 0, sizeof info);
        info.logits = logits; info.scores = scores; info.weight = weight; info.expert = expert;
        info.dropped = dropped; info.expert_routed = routed; info.expert_kept = kept;
        {   /* the workspace is mostly rows that are never touched: reserve it
               as virtual memory (the SIMD one is ~26 GiB, more than malloc
               may promise on a 24 GiB machine) */
            size_t need = 0;
            void *ws;
            EXPECT(moe_forward_workspace_size(&c, T_BIG, &need) == MOE_STATUS_OK);
            ws = mmap(NULL, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (ws == MAP_FAILED) { printf("test_big: cannot map a %.1f GiB workspace\n", (double)need / (1 << 30)); failures++; continue; }
            printf("test_big: %s workspace %.1f GiB (virtual)\n", pass ? "SIMD" : "reference", (double)need / (1 << 30));
            st = moe_forward(&c, &w, x, T_BIG, y, &info, ws, need);
            munmap(ws, need);
        }
        printf("test_big: forward (%s): %s\n", pass ? "SIMD" : "reference", moe_status_string(st));
        EXPECT(st == MOE_STATUS_OK);
        if (st != MOE_STATUS_OK) continue;
        EXPECT(info.capacity == 1);
        EXPECT(routed[0] == T_BIG - 1 && routed[1] == 1 && kept[0] == 1 && kept[1] == 1);
        EXPECT(info.dropped_pairs == T_BIG - 2 && info.dropped_tokens == T_BIG - 2);
        EXPECT(expert[T_LAST] == 0 && !dropped[T_LAST] && expert[T_EDGE] == 1 && !dropped[T_EDGE]);
        expect_row(y + (size_t)T_LAST * D, x + (size_t)T_LAST * D, gate, up, down, 0, weight[T_LAST]);
        expect_row(y + (size_t)T_EDGE * D, x + (size_t)T_EDGE * D, gate, up, down, 1, weight[T_EDGE]);
        EXPECT(fabs(weight[T_LAST] - 1.0 / (1.0 + exp(-2.0))) < 1e-6);
        EXPECT(row_zero(y, (size_t)T_EDGE - 1) && row_zero(y, (size_t)T_EDGE + 1) && row_zero(y, (size_t)T_LAST - 1));
        for (t = 0; t < (size_t)T_BIG; t += 4099)   /* a sample of dropped rows */
            if (t != (size_t)T_EDGE && t != (size_t)T_LAST) EXPECT(row_zero(y, t));
    }
    free(x); free(y); free(logits); free(scores); free(weight); free(expert); free(dropped);
    printf("test_big: %s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
