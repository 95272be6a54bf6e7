/* Numerical edge cases (issue 8). Each test states the behaviour moe.h
   documents (banner "NaN / Inf POLICY", moe_info field comments, the tie
   rule of docs/ROUTING.md) and asserts it, forward and, where meaningful, backward.
   Bad-input statuses are in test_misuse.c; this file is about valid calls
   with awkward numbers: overflow to Inf, ties, huge and denormal values,
   K = E, E = 1, tokens no expert takes, and capacity far below demand.
   The last tests are regressions of moe.h bugs the fuzzer found (fixed in
   0.3.1); two of them need the sanitizers to fail (`make check` runs them
   so), the packed one a SIMD build. */
#include "../moe.h"
#include "moe_test.h"
#include <float.h>
#include <stdint.h>

/* --- a small layer with bound info ------------------------------------------- */

typedef struct edge {
    moe_config c;
    int32_t T, E, D, F;
    float *x, *router, *gate, *up, *down, *y;
    moe_weights w;
    void *ibuf;
    moe_info info;
} edge;

static float lcg_uniform(uint32_t *s) {   /* uniform(-0.5, 0.5) */
    *s = *s * 1664525u + 1013904223u;
    return (float)((*s >> 8) * (1.0 / 16777216.0)) - 0.5f;
}
static float *rnd(size_t n, uint32_t *s, float amp) {
    float *p = (float *)malloc((n ? n : 1) * sizeof(float));
    size_t i;
    for (i = 0; i < n; i++) p[i] = amp * lcg_uniform(s);
    return p;
}

static moe_config cfg(int32_t E, int32_t K, int32_t D, int32_t F) {
    moe_config c;
    memset(&c, 0, sizeof c);
    c.num_experts = E; c.top_k = K; c.d_model = D; c.d_ff = F;
    return c;
}

/* Random x in (-1, 1) and weights in (-0.5, 0.5); info bound to one buffer. */
static void edge_init(edge *L, const moe_config *c, int32_t T, uint32_t seed) {
    uint32_t s = seed * 2654435761u + 99u;
    size_t n = 0, E, D, F;
    memset(L, 0, sizeof *L);
    L->c = *c; L->T = T; L->E = c->num_experts; L->D = c->d_model; L->F = c->d_ff;
    E = (size_t)L->E; D = (size_t)L->D; F = (size_t)L->F;
    L->x = rnd((size_t)T * D, &s, 2.0f);
    L->router = rnd(E * D, &s, 1.0f);
    L->gate = rnd(E * F * D, &s, 1.0f);
    L->up = rnd(E * F * D, &s, 1.0f);
    L->down = rnd(E * D * F, &s, 1.0f);
    L->y = (float *)malloc(((size_t)T * D + 1) * sizeof(float));
    L->w.router = L->router; L->w.gate = L->gate; L->w.up = L->up; L->w.down = L->down;
    CHECK_STATUS(moe_info_size(c, T, &n), MOE_STATUS_OK);
    L->ibuf = malloc(n);
    CHECK_STATUS(moe_info_bind(c, T, &L->info, L->ibuf, n), MOE_STATUS_OK);
}
static void edge_free(edge *L) {
    free(L->x); free(L->router); free(L->gate); free(L->up); free(L->down); free(L->y); free(L->ibuf);
}
static moe_status edge_forward(edge *L) {
    return moe_forward_alloc(&L->c, &L->w, L->x, L->T, L->y, &L->info);
}

/* Gradients of the router and every expert tensor, and dx. */
typedef struct egrad { float *router, *gate, *up, *down, *dx, *dy; moe_grads g; } egrad;
static void egrad_init(egrad *G, const edge *L, uint32_t seed) {
    uint32_t s = seed + 7u;
    const size_t E = (size_t)L->E, D = (size_t)L->D, F = (size_t)L->F, T = (size_t)L->T;
    memset(G, 0, sizeof *G);
    G->router = (float *)calloc(E * D, sizeof(float));
    G->gate = (float *)calloc(E * F * D, sizeof(float));
    G->up = (float *)calloc(E * F * D, sizeof(float));
    G->down = (float *)calloc(E * D * F, sizeof(float));
    G->dx = (float *)calloc(T * D + 1, sizeof(float));
    G->dy = rnd(T * D, &s, 2.0f);
    G->g.router = G->router; G->g.gate = G->gate; G->g.up = G->up; G->g.down = G->down;
}
static void egrad_free(egrad *G) {
    free(G->router); free(G->gate); free(G->up); free(G->down); free(G->dx); free(G->dy);
}
static moe_status edge_backward(edge *L, egrad *G) {
    return moe_backward_alloc(&L->c, &L->w, L->x, L->T, &L->info, G->dy, G->dx, &G->g);
}

static int all_finite(const float *a, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) if (!(a[i] - a[i] == 0.0f)) return 0;
    return 1;
}
static int grads_finite(const egrad *G, const edge *L) {
    const size_t E = (size_t)L->E, D = (size_t)L->D, F = (size_t)L->F;
    return all_finite(G->router, E * D) && all_finite(G->gate, E * F * D) &&
           all_finite(G->up, E * F * D) && all_finite(G->down, E * D * F) &&
           all_finite(G->dx, (size_t)L->T * D);
}
static int row_is_zero(const float *a, int32_t t, int32_t D) {
    int32_t d;
    for (d = 0; d < D; d++) if (a[(size_t)t * D + d] != 0.0f) return 0;
    return 1;
}
/* A token with no kept pair: every slot is unrouted (-1) or dropped. */
static int token_unserved(const moe_info *in, int32_t t) {
    int32_t j;
    for (j = 0; j < in->slots; j++) {
        const size_t p = (size_t)t * in->slots + j;
        if (in->expert[p] >= 0 && in->dropped[p] == 0) return 0;
    }
    return 1;
}

/* --- NaN / Inf ------------------------------------------------------------------ */

/* Policy: any NaN or +-Inf router logit -> MOE_STATUS_NONFINITE, y and info
   not written. Finite x and router weights whose product overflows give an
   Inf logit, so the call refuses them too (test_misuse.c covers NaN / Inf
   that are already in the inputs). */
TEST(edge, overflowing_logits_are_nonfinite) {
    int r;
    for (r = 0; r < 3; r++) {   /* top-k, expert choice, dense */
        moe_config c = cfg(3, 2, 2, 3);
        edge L;
        int32_t i;
        c.routing = (moe_routing)r;
        if (r == MOE_ROUTING_EXPERT_CHOICE) c.capacity = 1;
        edge_init(&L, &c, 4, 10 + (uint32_t)r);
        L.x[2 * 2] = 1e30f;           /* token 2, d 0 */
        L.router[1 * 2] = 1e30f;      /* expert 1, d 0: z[2][1] = 1e60 -> +Inf */
        for (i = 0; i < 4 * 2; i++) L.y[i] = 12345.0f;
        L.info.dropped_pairs = -7;
        CHECK_STATUS(edge_forward(&L), MOE_STATUS_NONFINITE);
        for (i = 0; i < 4 * 2; i++) CHECK(L.y[i] == 12345.0f);
        CHECK_INT(L.info.dropped_pairs, -7);
        edge_free(&L);
    }
}

/* Every token is scanned: NaN in the last of 100 tokens, in a dimension whose
   router column is all zeros (NaN * 0 = NaN), still gives NONFINITE. */
TEST(edge, nan_in_last_token_zero_router_column) {
    moe_config c = cfg(4, 2, 3, 2);
    edge L;
    int32_t e;
    edge_init(&L, &c, 100, 11);
    for (e = 0; e < 4; e++) L.router[(size_t)e * 3 + 1] = 0.0f;
    L.x[99 * 3 + 1] = NAN;
    CHECK_STATUS(edge_forward(&L), MOE_STATUS_NONFINITE);
    L.x[99 * 3 + 1] = -INFINITY;
    CHECK_STATUS(edge_forward(&L), MOE_STATUS_NONFINITE);
    L.x[99 * 3 + 1] = 0.5f;
    CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
    edge_free(&L);
}

/* --- ties ---------------------------------------------------------------------- */

/* docs/ROUTING.md, "Tie rule": larger score first, ties to the lower index. With a zero
   router all logits are 0: softmax scores 1/E, sigmoid 1/2; top-k picks
   experts 0..K-1 with equal weights (1/K renormalised, 1/E raw); group-limited
   top-k keeps the lower group; expert choice takes tokens 0..C-1; dense
   weights are 1/E. Backward gradients are finite. */
TEST(edge, all_equal_logits) {
    int v;
    for (v = 0; v < 5; v++) {
        enum { T = 5, E = 4, D = 3 };
        moe_config c = cfg(E, 2, D, 3);
        edge L;
        egrad G;
        int32_t t, j, e;
        c.training = 1; c.save_for_backward = 1;
        if (v == 1) c.normalize = MOE_NORM_NONE;
        if (v == 2) c.score = MOE_SCORE_SIGMOID;
        if (v == 3) { c.n_group = 2; c.topk_group = 1; }
        if (v == 4) { c.routing = MOE_ROUTING_EXPERT_CHOICE; c.capacity = 2; }
        edge_init(&L, &c, T, 20 + (uint32_t)v);
        for (e = 0; e < E * D; e++) L.router[e] = 0.0f;
        CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
        for (t = 0; t < T * E; t++) CHECK(L.info.scores[t] == (v == 2 ? 0.5f : 0.25f));
        for (t = 0; t < T; t++) {
            if (v == 4) {   /* experts 0..3 each take tokens 0 and 1 */
                for (e = 0; e < E; e++) {
                    CHECK_INT(L.info.expert[t * E + e], t < 2 ? e : -1);
                    CHECK(L.info.weight[t * E + e] == (t < 2 ? 0.25f : 0.0f));
                }
                if (t >= 2) CHECK(row_is_zero(L.y, t, D));
                continue;
            }
            for (j = 0; j < 2; j++) {
                CHECK_INT(L.info.expert[t * 2 + j], j);
                CHECK(L.info.weight[t * 2 + j] == (v == 1 ? 0.25f : 0.5f));
            }
        }
        if (v == 4) CHECK_INT(L.info.dropped_tokens, T - 2);
        egrad_init(&G, &L, 21);
        CHECK_STATUS(edge_backward(&L, &G), MOE_STATUS_OK);
        CHECK(grads_finite(&G, &L));
        egrad_free(&G);
        edge_free(&L);
    }
    {   /* dense: weights 1/E */
        moe_config c = cfg(4, 0, 3, 3);
        edge L;
        int32_t i;
        c.routing = MOE_ROUTING_DENSE;
        edge_init(&L, &c, 3, 22);
        for (i = 0; i < 4 * 3; i++) L.router[i] = 0.0f;
        CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
        for (i = 0; i < 3 * 4; i++) CHECK(L.info.weight[i] == 0.25f);
        edge_free(&L);
    }
}

/* --- huge and tiny values -------------------------------------------------------- */

/* Huge finite logits (|z| ~ 1e30): softmax subtracts the row max, so scores
   are finite, in [0, 1] and sum to 1; sigmoid is evaluated stably and stays
   in [0, 1]; weights and y are finite; the backward is finite (aux
   coefficients 0; aux_z itself is LSE^2 ~ 1e60 and overflows float, see the
   known-bug test below). */
TEST(edge, huge_logits) {
    int sig;
    for (sig = 0; sig < 2; sig++) {
        enum { T = 4, E = 4, D = 1, K = 2 };
        static const float rw[E] = {1e30f, -1e30f, 5e29f, 0.0f};
        moe_config c = cfg(E, K, D, 3);
        edge L;
        egrad G;
        int32_t t, e;
        c.score = sig ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
        c.training = 1; c.save_for_backward = 1;
        edge_init(&L, &c, T, 30 + (uint32_t)sig);
        memcpy(L.router, rw, sizeof rw);
        L.x[0] = 1.0f; L.x[1] = -1.0f; L.x[2] = 0.5f; L.x[3] = -2.0f;
        CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
        CHECK(all_finite(L.y, T * D));
        CHECK(all_finite(L.info.weight, T * K));
        for (t = 0; t < T; t++) {
            double sum = 0.0;
            for (e = 0; e < E; e++) {
                const float s = L.info.scores[t * E + e];
                CHECK(s >= 0.0f && s <= 1.0f);
                sum += s;
            }
            if (!sig) CHECK_NEAR(sum, 1.0, 1e-6, 0.0);
        }
        /* token 0 (x = +1): softmax top-1 is expert 0 with score 1 */
        CHECK_INT(L.info.expert[0], 0);
        if (!sig) CHECK(L.info.scores[0] == 1.0f && L.info.weight[0] == 1.0f && L.info.weight[1] == 0.0f);
        else CHECK(L.info.scores[0] == 1.0f && L.info.scores[1] == 0.0f && L.info.scores[3] == 0.5f);
        egrad_init(&G, &L, 31);
        CHECK_STATUS(edge_backward(&L, &G), MOE_STATUS_OK);
        CHECK(grads_finite(&G, &L));
        egrad_free(&G);
        edge_free(&L);
    }
}

/* Denormals are finite: denormal x (logits, hidden activations denormal or
   zero) and denormal weights are accepted and give finite y and gradients. */
TEST(edge, denormal_inputs) {
    int v;
    for (v = 0; v < 3; v++) {
        enum { T = 6, E = 4, D = 5, F = 3 };
        moe_config c = cfg(E, 2, D, F);
        edge L;
        egrad G;
        int32_t i;
        c.training = 1; c.save_for_backward = 1;
        if (v == 2) c.score = MOE_SCORE_SIGMOID;
        edge_init(&L, &c, T, 40 + (uint32_t)v);
        for (i = 0; i < T * D; i++) L.x[i] *= 1e-39f;                      /* denormal x */
        if (v >= 1) for (i = 0; i < E * F * D; i++) L.gate[i] *= 1e-38f;  /* denormal weights */
        for (i = 0; i < T * D; i++) CHECK(L.x[i] == 0.0f || fabsf(L.x[i]) < FLT_MIN);
        CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
        CHECK(all_finite(L.y, T * D));
        CHECK(all_finite(L.info.scores, T * E));
        egrad_init(&G, &L, 41);
        CHECK_STATUS(edge_backward(&L, &G), MOE_STATUS_OK);
        CHECK(grads_finite(&G, &L));
        egrad_free(&G);
        edge_free(&L);
    }
}

/* Policy: a renormalisation whose denominator is 0 (all selected sigmoid
   scores underflowed to 0, logits ~ -200) gives weights 0, not NaN: y = 0
   for that token; the backward is finite. */
TEST(edge, underflowed_sigmoid_scores_give_zero_weights) {
    enum { T = 3, E = 3, D = 2 };
    moe_config c = cfg(E, 2, D, 2);
    edge L;
    egrad G;
    int32_t i;
    c.score = MOE_SCORE_SIGMOID; c.training = 1; c.save_for_backward = 1;
    edge_init(&L, &c, T, 50);
    for (i = 0; i < E * D; i++) L.router[i] = -100.0f;
    for (i = 0; i < T * D; i++) L.x[i] = 1.0f;   /* z = -200, sigmoid = 0 exactly */
    CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
    for (i = 0; i < T * E; i++) CHECK(L.info.scores[i] == 0.0f);
    for (i = 0; i < T * 2; i++) CHECK(L.info.weight[i] == 0.0f);
    for (i = 0; i < T; i++) CHECK(row_is_zero(L.y, i, D));
    egrad_init(&G, &L, 51);
    CHECK_STATUS(edge_backward(&L, &G), MOE_STATUS_OK);
    CHECK(grads_finite(&G, &L));
    egrad_free(&G);
    edge_free(&L);
}

/* --- shapes at the ends of their ranges ------------------------------------------ */

/* K = E: every token's slots hold each expert once, in descending score
   order (ties to the lower index); renormalised weights sum to 1; backward
   finite. */
TEST(edge, k_equals_e) {
    enum { T = 7, E = 5, D = 4 };
    moe_config c = cfg(E, E, D, 3);
    edge L;
    egrad G;
    int32_t t, j;
    c.training = 1; c.save_for_backward = 1; c.balance_coef = 0.01f; c.z_loss_coef = 1e-3f;
    edge_init(&L, &c, T, 60);
    CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
    for (t = 0; t < T; t++) {
        int seen[E] = {0};
        double sum = 0.0;
        for (j = 0; j < E; j++) {
            const int32_t e = L.info.expert[t * E + j];
            CHECK(e >= 0 && e < E);
            if (e < 0 || e >= E) continue;
            CHECK(!seen[e]);
            seen[e] = 1;
            sum += L.info.weight[t * E + j];
            if (j > 0) {
                const int32_t p = L.info.expert[t * E + j - 1];
                const float sp = L.info.scores[t * E + p], se = L.info.scores[t * E + e];
                CHECK(sp > se || (sp == se && p < e));
            }
        }
        CHECK_NEAR(sum, 1.0, 1e-6, 0.0);
    }
    egrad_init(&G, &L, 61);
    CHECK_STATUS(edge_backward(&L, &G), MOE_STATUS_OK);
    CHECK(grads_finite(&G, &L));
    egrad_free(&G);
    edge_free(&L);
}

/* E = 1: softmax over one expert is 1, so the weight is 1 and y = FFN_0(x)
   (compared with a float64 evaluation); the balance loss E sum f P = 1; the
   router gradient is 0 exactly (the score does not depend on the logit);
   with sigmoid and no renormalisation the weight is sigmoid(z). */
TEST(edge, single_expert) {
    enum { T = 4, D = 3, F = 2 };
    moe_config c = cfg(1, 1, D, F);
    edge L;
    egrad G;
    int32_t t, d, f, i;
    c.training = 1; c.save_for_backward = 1; c.balance_coef = 0.5f;
    edge_init(&L, &c, T, 70);
    CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
    CHECK_NEAR(L.info.aux_balance, 1.0, 1e-6, 0.0);
    for (t = 0; t < T; t++) {
        double h[F];
        CHECK_INT(L.info.expert[t], 0);
        CHECK(L.info.weight[t] == 1.0f && L.info.scores[t] == 1.0f);
        for (f = 0; f < F; f++) {   /* SwiGLU in double */
            double g = 0.0, u = 0.0;
            for (d = 0; d < D; d++) {
                g += (double)L.gate[f * D + d] * L.x[t * D + d];
                u += (double)L.up[f * D + d] * L.x[t * D + d];
            }
            h[f] = g / (1.0 + exp(-g)) * u;
        }
        for (d = 0; d < D; d++) {
            double yd = 0.0;
            for (f = 0; f < F; f++) yd += (double)L.down[d * F + f] * h[f];
            CHECK_NEAR(L.y[t * D + d], yd, 1e-6, 1e-5);
        }
    }
    egrad_init(&G, &L, 71);
    CHECK_STATUS(edge_backward(&L, &G), MOE_STATUS_OK);
    CHECK(grads_finite(&G, &L));
    for (i = 0; i < D; i++) CHECK(G.router[i] == 0.0f);
    egrad_free(&G);
    edge_free(&L);

    c = cfg(1, 1, D, F);
    c.score = MOE_SCORE_SIGMOID; c.normalize = MOE_NORM_NONE;
    edge_init(&L, &c, T, 72);
    CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
    for (t = 0; t < T; t++) CHECK(L.info.weight[t] == L.info.scores[t]);
    edge_free(&L);
}

/* --- tokens nobody takes ------------------------------------------------------------ */

/* Expert choice: a token no expert picks has expert = -1 and weight 0 in
   every slot, y = 0 exactly, and counts in dropped_tokens; with no aux loss
   its dx is 0 exactly (neither the expert path nor the router sees it). */
TEST(edge, expert_choice_token_with_no_expert) {
    enum { T = 6, E = 2, D = 2 };
    moe_config c = cfg(E, 0, D, 3);
    edge L;
    egrad G;
    int32_t t, e, unserved = 0;
    c.routing = MOE_ROUTING_EXPERT_CHOICE; c.capacity = 1; c.training = 1; c.save_for_backward = 1;
    edge_init(&L, &c, T, 80);
    CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
    for (t = 0; t < T; t++) {
        int picked = 0;
        for (e = 0; e < E; e++) picked |= L.info.expert[t * E + e] >= 0;
        if (picked) continue;
        unserved++;
        for (e = 0; e < E; e++) CHECK(L.info.expert[t * E + e] == -1 && L.info.weight[t * E + e] == 0.0f);
        CHECK(row_is_zero(L.y, t, D));
    }
    CHECK(unserved >= T - E);
    CHECK_INT(L.info.dropped_tokens, unserved);
    egrad_init(&G, &L, 81);
    CHECK_STATUS(edge_backward(&L, &G), MOE_STATUS_OK);
    CHECK(grads_finite(&G, &L));
    for (t = 0; t < T; t++) if (token_unserved(&L.info, t)) CHECK(row_is_zero(G.dx, t, D));
    egrad_free(&G);
    edge_free(&L);
}

/* "Every token dropped" cannot happen (C >= 1 keeps one), so: every token
   picks expert 0 and C = 1. Token 0 is kept (position policy), the other
   T - 1 are dropped: dropped_pairs = dropped_tokens = T - 1, expert_routed =
   {T, 0, ..}, expert_kept = {1, 0, ..}, their y rows are 0 exactly, and with
   no aux loss their dx is 0 exactly (no expert path, zero router gradient). */
TEST(edge, one_expert_takes_all_capacity_one) {
    int policy;
    for (policy = 0; policy < 3; policy++) {
        enum { T = 6, E = 4, D = 3 };
        moe_config c = cfg(E, 1, D, 2);
        edge L;
        egrad G;
        int32_t t, e, kept_token = -1;
        c.capacity = 1; c.training = 1; c.save_for_backward = 1;
        c.drop_policy = (moe_drop_policy)policy;
        edge_init(&L, &c, T, 90 + (uint32_t)policy);
        for (e = 0; e < E * D; e++) L.router[e] = e < D ? 1.0f : -1.0f;   /* expert 0 wins ... */
        for (t = 0; t < T * D; t++) L.x[t] = 0.1f + 0.01f * (float)t;     /* ... for x > 0 */
        CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
        CHECK_INT(L.info.capacity, 1);
        CHECK_INT(L.info.dropped_pairs, T - 1);
        CHECK_INT(L.info.dropped_tokens, T - 1);
        CHECK_INT(L.info.expert_routed[0], T);
        CHECK_INT(L.info.expert_kept[0], 1);
        for (e = 1; e < E; e++) CHECK(L.info.expert_routed[e] == 0 && L.info.expert_kept[e] == 0);
        for (t = 0; t < T; t++) {
            CHECK_INT(L.info.expert[t], 0);
            if (!L.info.dropped[t]) { CHECK(kept_token < 0); kept_token = t; continue; }
            CHECK(L.info.weight[t] == 0.0f);
            CHECK(row_is_zero(L.y, t, D));
        }
        if (policy == MOE_DROP_POSITION) CHECK_INT(kept_token, 0);
        egrad_init(&G, &L, 91);
        CHECK_STATUS(edge_backward(&L, &G), MOE_STATUS_OK);
        CHECK(grads_finite(&G, &L));
        for (t = 0; t < T; t++) if (t != kept_token) CHECK(row_is_zero(G.dx, t, D));
        egrad_free(&G);
        edge_free(&L);
    }
}

/* Capacity 1 with top-2 under every drop policy: each expert keeps at most 1
   pair, kept + dropped = T*K, unserved tokens have y = 0; backward finite. */
TEST(edge, capacity_one_top2) {
    int policy;
    for (policy = 0; policy < 3; policy++) {
        enum { T = 12, E = 4, K = 2, D = 3 };
        moe_config c = cfg(E, K, D, 3);
        edge L;
        egrad G;
        int32_t t, e, kept = 0;
        c.capacity = 1; c.training = 1; c.save_for_backward = 1;
        c.drop_policy = (moe_drop_policy)policy;
        c.normalize_after_drop = policy == 2;
        edge_init(&L, &c, T, 100 + (uint32_t)policy);
        CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
        for (e = 0; e < E; e++) { CHECK(L.info.expert_kept[e] <= 1); kept += L.info.expert_kept[e]; }
        CHECK_INT(kept + L.info.dropped_pairs, T * K);
        for (t = 0; t < T; t++) if (token_unserved(&L.info, t)) CHECK(row_is_zero(L.y, t, D));
        egrad_init(&G, &L, 101);
        CHECK_STATUS(edge_backward(&L, &G), MOE_STATUS_OK);
        CHECK(grads_finite(&G, &L));
        egrad_free(&G);
        edge_free(&L);
    }
}

/* T much larger than E*C (T = 1000, E = 4, C = 2): top-1 and expert choice
   process at most E*C = 8 pairs; every other token is unserved, y = 0 and (no
   aux loss) dx = 0 exactly; counts add up; backward finite. */
TEST(edge, tokens_far_beyond_capacity) {
    int r;
    for (r = 0; r < 2; r++) {
        enum { T = 1000, E = 4, D = 3 };
        moe_config c = cfg(E, 1, D, 2);
        edge L;
        egrad G;
        int32_t t, e, kept = 0, unserved = 0;
        c.capacity = 2; c.training = 1; c.save_for_backward = 1;
        if (r) c.routing = MOE_ROUTING_EXPERT_CHOICE;
        edge_init(&L, &c, T, 110 + (uint32_t)r);
        CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
        for (e = 0; e < E; e++) { CHECK(L.info.expert_kept[e] <= 2); kept += L.info.expert_kept[e]; }
        CHECK(kept <= 8);
        if (r) CHECK_INT(kept, 8);
        else CHECK_INT(kept + L.info.dropped_pairs, T);
        for (t = 0; t < T; t++)
            if (token_unserved(&L.info, t)) { unserved++; CHECK(row_is_zero(L.y, t, D)); }
        CHECK_INT(L.info.dropped_tokens, unserved);
        CHECK(unserved >= T - 8);
        egrad_init(&G, &L, 111);
        CHECK_STATUS(edge_backward(&L, &G), MOE_STATUS_OK);
        CHECK(grads_finite(&G, &L));
        for (t = 0; t < T; t++) if (token_unserved(&L.info, t)) CHECK(row_is_zero(G.dx, t, D));
        egrad_free(&G);
        edge_free(&L);
    }
}

/* --- regressions of fixed bugs ------------------------------------------------------ */
/* Sigmoid scores that are denormal (logits about -93) with SUM renormalisation:
   the forward is fine (weights ~0.73 / 0.27) and the true gradient is finite
   (|d y / d z| < 1); the backward divided by the score sum in float and
   returned Inf / NaN router and x gradients. */
TEST(edge, regress_denormal_sigmoid_backward) {
    moe_config c = cfg(2, 2, 1, 1);
    edge L;
    egrad G;
    c.score = MOE_SCORE_SIGMOID; c.training = 1; c.save_for_backward = 1;
    edge_init(&L, &c, 1, 120);
    L.x[0] = 1.0f; L.router[0] = -93.0f; L.router[1] = -94.0f;
    L.gate[0] = L.gate[1] = 1.0f; L.up[0] = 1.0f; L.up[1] = 2.0f; L.down[0] = L.down[1] = 1.0f;
    CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
    CHECK(all_finite(L.y, 1));
    egrad_init(&G, &L, 121);
    CHECK_STATUS(edge_backward(&L, &G), MOE_STATUS_OK);
    CHECK(grads_finite(&G, &L));
    egrad_free(&G);
    edge_free(&L);
}

/* Shazeer noise with noise_epsilon = 0 (the paper's value) and noise logits
   below about -104: softplus underflows, sigma = 0; the smooth load was 0/0
   (aux_load, aux_total and the backward NaN on tied logits), now the step. */
TEST(edge, regress_shazeer_zero_sigma) {
    moe_config c = cfg(4, 2, 1, 1);
    edge L;
    egrad G;
    float noise[4] = {-200.0f, -200.0f, -200.0f, -200.0f};
    int32_t e;
    c.noise = MOE_NOISE_SHAZEER; c.training = 1; c.save_for_backward = 1; c.load_coef = 1.0f;
    edge_init(&L, &c, 2, 130);
    L.x[0] = L.x[1] = 1.0f;
    for (e = 0; e < 4; e++) L.router[e] = 0.5f;
    L.w.router_noise = noise;
    CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
    CHECK(L.info.aux_load == L.info.aux_load && L.info.aux_total == L.info.aux_total);
    egrad_init(&G, &L, 131);
    CHECK_STATUS(edge_backward(&L, &G), MOE_STATUS_OK);
    CHECK(grads_finite(&G, &L));
    egrad_free(&G);
    edge_free(&L);
}

/* Logits of +-1e20 (finite): aux_z = mean LSE^2 ~ 1e40 overflows to +Inf;
   with every coefficient 0 (the default) aux_total was 0 * Inf = NaN. */
TEST(edge, regress_aux_total_nan_with_zero_coefs) {
    moe_config c = cfg(2, 1, 1, 1);
    edge L;
    edge_init(&L, &c, 1, 140);
    L.x[0] = 1.0f; L.router[0] = 1e20f; L.router[1] = -1e20f;
    CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
    CHECK(L.info.aux_total == L.info.aux_total);
    edge_free(&L);
}

/* moe_grads_zero / moe_grads_clip_norm with moe_grads.gate_up_fused: the
   fused gate gradient is [E][2F][D]; all of it is measured, clipped and
   zeroed (they once saw E*F*D floats only). */
TEST(edge, regress_grads_helpers_fused_layout) {
    enum { E = 2, D = 3, F = 4 };
    moe_config c = cfg(E, 1, D, F);
    float gate[E * 2 * F * D], down[E * D * F], norm = 0.0f;
    moe_grads g;
    size_t i;
    memset(&g, 0, sizeof g);
    for (i = 0; i < E * 2 * F * D; i++) gate[i] = 1.0f;
    memset(down, 0, sizeof down);
    g.gate = gate; g.down = down;          /* up lives in gate when fused */
    g.gate_up_fused = 1;
    CHECK_STATUS(moe_grads_clip_norm(&c, &g, 1e9f, &norm), MOE_STATUS_OK);
    CHECK_NEAR(norm, sqrt((double)E * 2 * F * D), 1e-5, 1e-6);
    CHECK_STATUS(moe_grads_zero(&c, &g), MOE_STATUS_OK);
    for (i = 0; i < E * 2 * F * D; i++) CHECK(gate[i] == 0.0f);
}

/* cfg.seq_len = INT32_MAX is valid (one sequence); the router backward once
   computed T + seq_len - 1 in int32: signed overflow (UBSan). */
TEST(edge, regress_seq_len_int32_overflow) {
    moe_config c = cfg(2, 1, 2, 2);
    edge L;
    egrad G;
    c.training = 1; c.save_for_backward = 1; c.seq_len = 2147483647; c.seq_balance_coef = 0.01f;
    edge_init(&L, &c, 3, 150);
    CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
    egrad_init(&G, &L, 151);
    CHECK_STATUS(edge_backward(&L, &G), MOE_STATUS_OK);
    egrad_free(&G);
    edge_free(&L);
}

/* moe_backward with recompute on a SIMD build reruns the experts from
   w.packed: a blob packed for a smaller d_ff gives MOE_STATUS_BAD_PACKED
   (it was read out of bounds without the check moe_forward makes). */
TEST(edge, regress_backward_unchecked_packed) {
    moe_config c = cfg(2, 1, 16, 16), small, r;
    edge L, S;
    egrad G;
    size_t bytes = 0;
    void *blob;
    moe_status st;
    c.training = 1; c.save_for_backward = 1; c.recompute = 1;
    CHECK_STATUS(moe_config_resolve(&c, &r), MOE_STATUS_OK);
    if (r.isa == MOE_ISA_REFERENCE) SKIP("no SIMD ISA in this build");
    small = c; small.d_ff = 1;
    edge_init(&L, &c, 4, 160);
    edge_init(&S, &small, 4, 161);
    CHECK_STATUS(moe_pack_size(&small, &bytes), MOE_STATUS_OK);
    blob = malloc(bytes);
    CHECK_STATUS(moe_pack_weights(&small, &S.w, blob, bytes), MOE_STATUS_OK);
    CHECK_STATUS(edge_forward(&L), MOE_STATUS_OK);
    L.w.packed = blob;
    L.w.packed_bytes = bytes;
    egrad_init(&G, &L, 162);
    st = edge_backward(&L, &G);
    CHECK_STATUS(st, MOE_STATUS_BAD_PACKED);
    egrad_free(&G);
    free(blob);
    edge_free(&S);
    edge_free(&L);
}

