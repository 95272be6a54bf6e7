/* Limits (issue 15): sizes of shapes near the int32 limits, the documented
   ranges of the float config fields (the largest accepted value gives finite
   outputs, aux losses and gradients; the first rejected one BAD_OPTION).
   The expert-parallel aux losses with huge router logits are in test_ep.c
   (ep.aux_total_huge_logits).                                             */
#include "../moe.h"
#include "moe_test.h"
#include <float.h>
#include <stdint.h>

static uint64_t lim_rng = 1;
static float *lim_fill(size_t n, float scale) { return moe_test_fill(&lim_rng, n, scale); }
static float *lim_zeros(size_t n) { return (float *)calloc(n ? n : 1, sizeof(float)); }
static int lim_finite(const float *a, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) if (!(a[i] - a[i] == 0.0f)) return 0;
    return 1;
}

/* --- one training step: forward (bound info) and backward ----------------- */

enum { LT = 24, LE = 4, LD = 8, LF = 6, LFS = 5 };

typedef struct lim_step {
    moe_status fwd, bwd;
    int y_ok, aux_ok, grad_ok;    /* all finite */
    moe_info info;                /* scalars of the forward */
} lim_step;

/* Run cfg (training) on LT tokens with weights uniform(-router_amp,
   router_amp) in the router, 0.5 elsewhere; x, dy uniform(-1, 1).        */
static lim_step lim_run(const moe_config *cfg_in, float router_amp) {
    enum { NW = 12 };
    moe_config c = *cfg_in;
    lim_step s;
    moe_weights w;
    moe_grads g;
    moe_info info;
    size_t ib = 0, n[NW];
    float *t[NW], *gr[NW], *x, *dy, *y, *dx;
    void *ibuf = NULL;
    const size_t E = LE, D = LD, F = LF, Fs = LFS;
    int i;
    c.training = 1; c.save_for_backward = 1;
    c.num_experts = LE; c.d_model = LD; c.d_ff = LF;
    memset(&s, 0, sizeof s);
    lim_rng = 99;
    n[0] = E * D; n[1] = E; n[2] = E * D; n[3] = E * F * D; n[4] = E * F * D; n[5] = E * D * F;
    n[6] = Fs * D; n[7] = Fs * D; n[8] = D * Fs; n[9] = D; n[10] = E * D; n[11] = 1;
    for (i = 0; i < NW; i++) {
        t[i] = lim_fill(n[i], i == 0 ? router_amp : 0.5f);
        gr[i] = lim_zeros(n[i]);
    }
    t[11][0] = 1.0f;
    x = lim_fill((size_t)LT * D, 1.0f);
    dy = lim_fill((size_t)LT * D, 1.0f);
    y = lim_zeros((size_t)LT * D);
    dx = lim_zeros((size_t)LT * D);
    memset(&w, 0, sizeof w);
    w.router = t[0]; w.router_bias = t[1]; w.router_noise = t[2];
    w.gate = t[3]; w.up = t[4]; w.down = t[5];
    w.shared_gate = t[6]; w.shared_up = t[7]; w.shared_down = t[8]; w.shared_expert_gate = t[9];
    w.soft_phi = t[10]; w.soft_scale = t[11];
    memset(&g, 0, sizeof g);
    g.router = gr[0]; g.router_bias = gr[1]; g.router_noise = gr[2];
    g.gate = gr[3]; g.up = gr[4]; g.down = gr[5];
    g.shared_gate = gr[6]; g.shared_up = gr[7]; g.shared_down = gr[8];
    g.shared_expert_gate = gr[9]; g.soft_phi = gr[10]; g.soft_scale = gr[11];
    memset(&info, 0, sizeof info);
    s.fwd = moe_info_size(&c, LT, &ib);
    if (s.fwd == MOE_STATUS_OK) {
        ibuf = malloc(ib);
        s.fwd = moe_info_bind(&c, LT, &info, ibuf, ib);
    }
    if (s.fwd == MOE_STATUS_OK) s.fwd = moe_forward_alloc(&c, &w, x, LT, y, &info);
    s.bwd = s.fwd == MOE_STATUS_OK ? moe_backward_alloc(&c, &w, x, LT, &info, dy, dx, &g) : s.fwd;
    if (s.fwd == MOE_STATUS_OK) {
        s.y_ok = lim_finite(y, (size_t)LT * D);
        s.aux_ok = lim_finite(&info.aux_balance, 1) && lim_finite(&info.aux_z, 1) &&
                   lim_finite(&info.aux_importance, 1) && lim_finite(&info.aux_load, 1) &&
                   lim_finite(&info.aux_seq, 1) && lim_finite(&info.aux_total, 1);
    }
    if (s.bwd == MOE_STATUS_OK) {
        s.grad_ok = lim_finite(dx, (size_t)LT * D);
        for (i = 0; i < NW; i++) s.grad_ok &= lim_finite(gr[i], n[i]);
    }
    s.info = info;
    for (i = 0; i < NW; i++) { free(t[i]); free(gr[i]); }
    free(x); free(dy); free(y); free(dx); free(ibuf);
    return s;
}

/* --- item 6: ranges of the float options ------------------------------------ */

/* Which field a boundary case sets, and what else it needs to matter. */
enum { B_NORM_P, B_BAL, B_Z, B_IMP, B_LOAD, B_SEQ, B_WARM, B_NEPS, B_RSCALE, B_THR, B_NEPS_NORM,
       B_CF, B_JITTER, B_DROPOUT, B_CLIP, B_COUNT };
static const char *const b_name[B_COUNT] = {
    "norm_p", "balance_coef", "z_loss_coef", "importance_coef", "load_coef", "seq_balance_coef",
    "router_noise_std", "noise_epsilon", "routed_scale", "second_threshold", "norm_eps",
    "capacity_factor", "jitter", "expert_dropout", "router_grad_clip"};

static moe_config lim_bound_cfg(int field, float v, int variant) {
    moe_config c;
    memset(&c, 0, sizeof c);
    c.num_experts = LE; c.top_k = 2; c.d_model = LD; c.d_ff = LF; c.isa = MOE_ISA_REFERENCE;
    c.score = variant ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
    c.balance_coef = 0.01f;
    switch (field) {
    case B_NORM_P:  c.normalize = MOE_NORM_PNORM; c.norm_p = v; break;
    case B_BAL:     c.balance_coef = v; c.balance_loss = (moe_balance_loss)variant; break;
    case B_Z:       c.z_loss_coef = v; break;
    case B_IMP:     c.importance_coef = v; c.noise = MOE_NOISE_SHAZEER; break;
    case B_LOAD:    c.load_coef = v; c.noise = MOE_NOISE_SHAZEER; break;
    case B_SEQ:     c.seq_balance_coef = v; c.seq_len = variant ? 6 : 0; break;
    case B_WARM:    c.router_noise_std = v; c.z_loss_coef = 1.0f; break;
    case B_NEPS:    c.noise_epsilon = v; c.noise = MOE_NOISE_SHAZEER; c.load_coef = 1.0f; break;
    case B_RSCALE:  c.routed_scale = v; c.normalize = variant ? MOE_NORM_PNORM : MOE_NORM_SUM;
                    break;
    case B_THR:     c.second_threshold = v; c.second_expert = MOE_SECOND_RANDOM; break;
    case B_NEPS_NORM: c.norm_eps = v; c.normalize = variant ? MOE_NORM_PNORM : MOE_NORM_SUM; break;
    case B_CF:      c.capacity_factor = v; break;
    case B_JITTER:  c.jitter = v; break;
    case B_DROPOUT: c.expert_dropout = v; break;
    default:        c.router_grad_clip = v; break;
    }
    return c;
}

/* Largest accepted values: a training step is OK with finite y, aux losses
   and gradients (both score functions, or a second loss / norm variant). */
static void lim_expect_finite(int field, float v) {
    int variant;
    for (variant = 0; variant < 2; variant++) {
        const moe_config c = lim_bound_cfg(field, v, variant);
        const lim_step s = lim_run(&c, 0.5f);
        if (s.fwd != MOE_STATUS_OK || s.bwd != MOE_STATUS_OK || !s.y_ok || !s.aux_ok || !s.grad_ok)
            moe_test_fail(__FILE__, __LINE__, "%s = %g (variant %d): status %d/%d, finite y %d, "
                          "aux %d (total %g), gradients %d", b_name[field], (double)v, variant,
                          (int)s.fwd, (int)s.bwd, s.y_ok, s.aux_ok, (double)s.info.aux_total,
                          s.grad_ok);
    }
}
static void lim_expect_rejected(int field, float v) {
    moe_config c = lim_bound_cfg(field, v, 0), r;
    const moe_status st = moe_config_resolve(&c, &r);
    if (st != MOE_STATUS_BAD_OPTION)
        moe_test_fail(__FILE__, __LINE__, "%s = %.9g: status %d (%s), want BAD_OPTION",
                      b_name[field], (double)v, (int)st, moe_status_string(st));
}

/* The documented ranges: norm_p in [1, FLT_MAX] (p-norm), the five aux-loss
   coefficients, router_noise_std and noise_epsilon in [0, 1e6], routed_scale
   in [-1e6, 1e6]. Once accepted with NaN gradients and status OK: norm_p
   1e-4 and 1000, router_noise_std 3e38, noise_epsilon 3e38, balance_coef
   3e38 (aux_total Inf too), z_loss_coef 3e38 (aux_total Inf). The ranges that
   did not change keep their largest values finite too.                   */
TEST(limits, option_ranges) {
    static const int coef[7] = {B_BAL, B_Z, B_IMP, B_LOAD, B_SEQ, B_WARM, B_NEPS};
    const float over = nextafterf(1e6f, INFINITY), under = -nextafterf(0.0f, 1.0f);
    int i;
    lim_expect_finite(B_NORM_P, 1.0f);
    lim_expect_finite(B_NORM_P, 1000.0f);
    lim_expect_finite(B_NORM_P, FLT_MAX);
    lim_expect_rejected(B_NORM_P, nextafterf(1.0f, 0.0f));
    lim_expect_rejected(B_NORM_P, 1e-4f);
    lim_expect_rejected(B_NORM_P, INFINITY);
    for (i = 0; i < 7; i++) {
        lim_expect_finite(coef[i], 1e6f);
        lim_expect_rejected(coef[i], over);
        lim_expect_rejected(coef[i], 3e38f);
        lim_expect_rejected(coef[i], under);
    }
    lim_expect_finite(B_RSCALE, 1e6f);
    lim_expect_finite(B_RSCALE, -1e6f);
    lim_expect_rejected(B_RSCALE, over);
    lim_expect_rejected(B_RSCALE, -over);
    /* unchanged ranges: finite and >= 0 (jitter, dropout below 1) */
    lim_expect_finite(B_THR, FLT_MAX);
    lim_expect_finite(B_THR, FLT_MIN);
    lim_expect_finite(B_NEPS_NORM, FLT_MAX);
    lim_expect_finite(B_CF, FLT_MAX);
    lim_expect_finite(B_CF, FLT_MIN);
    lim_expect_finite(B_JITTER, nextafterf(1.0f, 0.0f));
    lim_expect_finite(B_DROPOUT, nextafterf(1.0f, 0.0f));
    lim_expect_finite(B_CLIP, FLT_MAX);
    lim_expect_finite(B_CLIP, FLT_MIN);
    {   /* every new range at its largest at once */
        moe_config c = lim_bound_cfg(B_NORM_P, FLT_MAX, 0);
        lim_step s;
        c.noise = MOE_NOISE_SHAZEER; c.noise_epsilon = 1e6f; c.router_noise_std = 1e6f;
        c.balance_coef = c.z_loss_coef = c.importance_coef = c.load_coef = 1e6f;
        c.seq_balance_coef = 1e6f; c.routed_scale = 1e6f; c.seq_len = 6;
        s = lim_run(&c, 0.5f);
        CHECK_STATUS(s.fwd, MOE_STATUS_OK);
        CHECK_STATUS(s.bwd, MOE_STATUS_OK);
        CHECK(s.y_ok && s.aux_ok && s.grad_ok);
    }
}

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
        const uint64_t sh = lim_ffn_elems((uint64_t)c->d_model, (uint64_t)c->shared_d_ff, fc, nr,
                                          &over);
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
