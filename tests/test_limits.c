/* Limits (issue 15): sizes of shapes near the int32 limits, the documented
   ranges of the float config fields (the largest accepted value gives finite
   outputs, aux losses and gradients; the first rejected one BAD_OPTION), and
   the expert-parallel aux losses against the one-process layer when a
   router logit is huge.                                                   */
#include "../moe.h"
#include "moe_test.h"
#include <float.h>
#include <stdint.h>

/* --- item 4: sizes of shapes near the int32 limits ------------------------ */

/* a * b and a + b in uint64 with an overflow flag: the check computes the
   documented blob layout on its own, without the library's helpers.      */
static uint64_t lim_mul(uint64_t a, uint64_t b, int *over) {
    if (b != 0 && a > UINT64_MAX / b) *over = 1;
    return a * b;
}
static uint64_t lim_add(uint64_t a, uint64_t b, int *over) {
    if (a > UINT64_MAX - b) *over = 1;
    return a + b;
}
static uint64_t lim_ceil(uint64_t a, uint64_t b) { return a / b + (a % b ? 1 : 0); }

/* Elements of one FFN's packed panels: w13 over F (fc hidden units per NR-wide
   panel, D rows rounded up to even), w2 over D (NR columns, F rows, even).  */
static uint64_t lim_ffn_elems(uint64_t D, uint64_t F, uint64_t fc, uint64_t nr, int *over) {
    const uint64_t w13 = lim_mul(lim_mul(lim_ceil(F, fc), nr, over), D + (D & 1), over);
    const uint64_t w2 = lim_mul(lim_mul(lim_ceil(D, nr), nr, over), F + (F & 1), over);
    return lim_add(w13, w2, over);
}

/* This build's panel width NR, from the blob of E = D = F = 1 (ReLU, fp32):
   64-byte header + w13 (1 panel x 2 rows) + w2 (1 panel x 2 rows).       */
static uint64_t lim_pack_nr(void) {
    moe_config c;
    size_t bytes = 0;
    memset(&c, 0, sizeof c);
    c.num_experts = 1; c.top_k = 1; c.d_model = 1; c.d_ff = 1; c.activation = MOE_ACT_RELU;
    CHECK_STATUS(moe_pack_size(&c, &bytes), MOE_STATUS_OK);
    return (uint64_t)(bytes - 64) / 16;
}

/* moe_pack_size(c) against the independent computation: OK with exactly
   that size, or SIZE_OVERFLOW exactly when it exceeds SIZE_MAX.          */
static void lim_check_pack_size(const moe_config *c, uint64_t nr) {
    const int glu = c->activation == MOE_ACT_SWIGLU || c->activation == MOE_ACT_GEGLU ||
                    c->activation == MOE_ACT_GEGLU_TANH;
    const uint64_t fc = glu ? nr / 2 : nr, es = c->pack_bf16 ? 2 : 4;
    int over = 0;
    uint64_t want = 64, per;
    size_t got = 0;
    moe_status st;
    per = lim_mul(lim_ffn_elems((uint64_t)c->d_model, (uint64_t)c->d_ff, fc, nr, &over), es, &over);
    want = lim_add(want, lim_mul((uint64_t)c->num_experts, per, &over), &over);
    if (c->shared_d_ff > 0) {
        const uint64_t sh = lim_ffn_elems((uint64_t)c->d_model, (uint64_t)c->shared_d_ff, fc, nr, &over);
        want = lim_add(want, lim_mul(sh, es, &over), &over);
    }
    if (!over && want > (uint64_t)SIZE_MAX) over = 1;
    st = moe_pack_size(c, &got);
    if (over) {
        if (st != MOE_STATUS_SIZE_OVERFLOW)
            moe_test_fail(__FILE__, __LINE__, "E %d D %d F %d Fs %d: status %d, want SIZE_OVERFLOW",
                          (int)c->num_experts, (int)c->d_model, (int)c->d_ff, (int)c->shared_d_ff,
                          (int)st);
    } else if (st != MOE_STATUS_OK || (uint64_t)got != want) {
        moe_test_fail(__FILE__, __LINE__, "E %d D %d F %d Fs %d glu %d bf16 %d: status %d, %llu "
                      "bytes, want %llu", (int)c->num_experts, (int)c->d_model, (int)c->d_ff,
                      (int)c->shared_d_ff, glu, (int)c->pack_bf16, (int)st,
                      (unsigned long long)got, (unsigned long long)want);
    }
}

/* d_model or d_ff (or shared_d_ff) = INT32_MAX - k: blobs of 86 GB and more
   that fit size_t. The sizes were formed in int: signed overflow, and
   SIZE_OVERFLOW for k < NR - 1.                                          */
TEST(limits, pack_size_near_int32_max) {
    const uint64_t nr = lim_pack_nr();
    int k, v;
    CHECK(nr == 8 || nr == 16 || nr == 32);
    for (k = 0; k <= 15; k++)
        for (v = 0; v < 8; v++) {
            moe_config c;
            const int32_t big = INT32_MAX - k;
            memset(&c, 0, sizeof c);
            c.top_k = 1;
            c.activation = (v & 1) ? MOE_ACT_RELU : MOE_ACT_SWIGLU;
            c.pack_bf16 = (v >> 1) & 1;
            c.num_experts = 3; c.d_model = big; c.d_ff = 7 + k;
            if (v & 4) c.shared_d_ff = 5;
            lim_check_pack_size(&c, nr);
            c.num_experts = 2; c.d_model = 5 + k; c.d_ff = big;
            lim_check_pack_size(&c, nr);
            c.shared_d_ff = big;                   /* a huge shared expert too */
            lim_check_pack_size(&c, nr);
            c.d_model = big;                       /* ~2^62 elements per expert: too big */
            lim_check_pack_size(&c, nr);
            c.num_experts = 1; c.shared_d_ff = 0; c.pack_bf16 = 1;
            lim_check_pack_size(&c, nr);
            c.num_experts = INT32_MAX; c.d_model = 1 + k; c.d_ff = 1 + k;
            lim_check_pack_size(&c, nr);
        }
}
