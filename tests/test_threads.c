/* Thread safety and determinism (issue 8).
   moe.h keeps no global state: two threads calling moe_forward / moe_backward
   at once, each with its own workspace, info and gradient buffers and sharing
   the read-only weights and x, must give bitwise the results of sequential
   calls. `make check-tsan` runs this under ThreadSanitizer.
   Determinism beyond test_forward.c (which compares forwards and the forward
   workspace vs _alloc forms): gradients across runs and across
   moe_backward vs moe_backward_alloc, and results that do not depend on what
   the caller's workspace held before the call. */
#include "../moe.h"
#include "moe_test.h"
#include <pthread.h>
#include <stdint.h>

/* --- one layer per config, shared read-only by the threads ------------------- */

enum { NCFG = 6, TT = 24, TD = 8, TF = 6, TE = 6, TFS = 4, TP = 2 };

typedef struct tlayer {
    moe_config c;
    float *x, *dy, *router, *noise, *sbias, *gate, *up, *down, *sh_gate, *sh_up, *sh_down, *sh_eg, *phi;
    float scale;
    moe_weights w;
} tlayer;

/* The results of one forward + backward. */
typedef struct tresult {
    float *y, *dx, *g_router, *g_gate, *g_up, *g_down, *g_sh_gate, *g_phi;
    void *ibuf;
    moe_info info;
    size_t ib;
} tresult;

static float lcg_uniform(uint32_t *s) {
    *s = *s * 1664525u + 1013904223u;
    return (float)((*s >> 8) * (1.0 / 16777216.0)) - 0.5f;
}
static float *rnd(size_t n, uint32_t *s) {
    float *p = (float *)malloc(n * sizeof(float));
    size_t i;
    for (i = 0; i < n; i++) p[i] = lcg_uniform(s);
    return p;
}

/* Six configs covering every routing family and the random parts: Mixtral
   top-2 with losses; Switch with jitter and capacity; Shazeer noise; GShard
   random second expert with a gated shared expert; expert choice; Soft MoE. */
static void tlayer_init(tlayer *L, int which) {
    uint32_t s = 777u + (uint32_t)which * 31u;
    moe_config *c = &L->c;
    memset(L, 0, sizeof *L);
    c->num_experts = TE; c->top_k = 2; c->d_model = TD; c->d_ff = TF;
    c->training = 1; c->save_for_backward = 1; c->seed = 1234u + (uint64_t)which;
    c->balance_coef = 0.01f; c->z_loss_coef = 1e-3f;
    switch (which) {
    case 0: break;
    case 1: c->top_k = 1; c->jitter = 0.05f; c->capacity_factor = 1.0f; c->activation = MOE_ACT_RELU; break;
    case 2: c->noise = MOE_NOISE_SHAZEER; c->noise_epsilon = 0.01f; c->importance_coef = 0.1f; c->load_coef = 0.1f; break;
    case 3: c->second_expert = MOE_SECOND_RANDOM; c->shared_d_ff = TFS; c->shared_expert_gated = 1; c->capacity = 6; break;
    case 4: c->routing = MOE_ROUTING_EXPERT_CHOICE; c->capacity = 5; c->top_k = 0; c->activation = MOE_ACT_GELU; break;
    default: c->routing = MOE_ROUTING_SOFT; c->slots_per_expert = TP; c->top_k = 0; c->balance_coef = 0.0f;
             c->z_loss_coef = 0.0f; break;
    }
    L->x = rnd(TT * TD, &s); L->dy = rnd(TT * TD, &s);
    L->router = rnd(TE * TD, &s); L->noise = rnd(TE * TD, &s); L->sbias = rnd(TE, &s);
    L->gate = rnd(TE * TF * TD, &s); L->up = rnd(TE * TF * TD, &s); L->down = rnd(TE * TD * TF, &s);
    L->sh_gate = rnd(TFS * TD, &s); L->sh_up = rnd(TFS * TD, &s); L->sh_down = rnd(TD * TFS, &s);
    L->sh_eg = rnd(TD, &s); L->phi = rnd(TE * TP * TD, &s); L->scale = 2.0f;
    L->w.router = L->router; L->w.router_noise = L->noise; L->w.selection_bias = L->sbias;
    L->w.gate = L->gate; L->w.up = L->up; L->w.down = L->down;
    L->w.shared_gate = L->sh_gate; L->w.shared_up = L->sh_up; L->w.shared_down = L->sh_down;
    L->w.shared_expert_gate = L->sh_eg; L->w.soft_phi = L->phi; L->w.soft_scale = &L->scale;
}
static void tlayer_free(tlayer *L) {
    float *p[] = {L->x, L->dy, L->router, L->noise, L->sbias, L->gate, L->up, L->down,
                  L->sh_gate, L->sh_up, L->sh_down, L->sh_eg, L->phi};
    size_t i;
    for (i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
}

static void tresult_init(tresult *r, const moe_config *c) {
    memset(r, 0, sizeof *r);
    r->y = (float *)malloc(TT * TD * sizeof(float));
    r->dx = (float *)malloc(TT * TD * sizeof(float));
    r->g_router = (float *)calloc(TE * TD, sizeof(float));
    r->g_gate = (float *)calloc(TE * TF * TD, sizeof(float));
    r->g_up = (float *)calloc(TE * TF * TD, sizeof(float));
    r->g_down = (float *)calloc(TE * TD * TF, sizeof(float));
    r->g_sh_gate = (float *)calloc(TFS * TD, sizeof(float));
    r->g_phi = (float *)calloc(TE * TP * TD, sizeof(float));
    if (moe_info_size(c, TT, &r->ib) != MOE_STATUS_OK) r->ib = 0;
    r->ibuf = malloc(r->ib ? r->ib : 1);
    if (r->ib) (void)moe_info_bind(c, TT, &r->info, r->ibuf, r->ib);
}
static void tresult_free(tresult *r) {
    free(r->y); free(r->dx); free(r->g_router); free(r->g_gate); free(r->g_up); free(r->g_down);
    free(r->g_sh_gate); free(r->g_phi); free(r->ibuf);
}
static void tresult_zero_grads(tresult *r) {
    memset(r->g_router, 0, TE * TD * sizeof(float));
    memset(r->g_gate, 0, TE * TF * TD * sizeof(float));
    memset(r->g_up, 0, TE * TF * TD * sizeof(float));
    memset(r->g_down, 0, TE * TD * TF * sizeof(float));
    memset(r->g_sh_gate, 0, TFS * TD * sizeof(float));
    memset(r->g_phi, 0, TE * TP * TD * sizeof(float));
}
/* y, dx and every gradient, bitwise. */
static int tresult_same(const tresult *a, const tresult *b) {
    return memcmp(a->y, b->y, TT * TD * sizeof(float)) == 0 &&
           memcmp(a->dx, b->dx, TT * TD * sizeof(float)) == 0 &&
           memcmp(a->g_router, b->g_router, TE * TD * sizeof(float)) == 0 &&
           memcmp(a->g_gate, b->g_gate, TE * TF * TD * sizeof(float)) == 0 &&
           memcmp(a->g_up, b->g_up, TE * TF * TD * sizeof(float)) == 0 &&
           memcmp(a->g_down, b->g_down, TE * TD * TF * sizeof(float)) == 0 &&
           memcmp(a->g_sh_gate, b->g_sh_gate, TFS * TD * sizeof(float)) == 0 &&
           memcmp(a->g_phi, b->g_phi, TE * TP * TD * sizeof(float)) == 0;
}

/* Forward + backward with caller workspaces that start out filled with
   `garbage` (alloc != 0: the _alloc forms instead). */
static moe_status run(const tlayer *L, tresult *r, unsigned char garbage, int alloc) {
    moe_grads g;
    moe_status st;
    size_t fb = 0, bb = 0;
    unsigned char *ws;
    memset(&g, 0, sizeof g);
    g.router = r->g_router; g.gate = r->g_gate; g.up = r->g_up; g.down = r->g_down;
    g.shared_gate = r->g_sh_gate; g.soft_phi = r->g_phi;
    tresult_zero_grads(r);
    if (alloc) {
        st = moe_forward_alloc(&L->c, &L->w, L->x, TT, r->y, &r->info);
        if (st != MOE_STATUS_OK) return st;
        return moe_backward_alloc(&L->c, &L->w, L->x, TT, &r->info, L->dy, r->dx, &g);
    }
    if ((st = moe_forward_workspace_size(&L->c, TT, &fb)) != MOE_STATUS_OK) return st;
    if ((st = moe_backward_workspace_size(&L->c, TT, &bb)) != MOE_STATUS_OK) return st;
    ws = (unsigned char *)malloc(fb > bb ? fb : bb);
    if (!ws) return MOE_STATUS_OUT_OF_MEMORY;
    memset(ws, garbage, fb > bb ? fb : bb);
    st = moe_forward(&L->c, &L->w, L->x, TT, r->y, &r->info, ws, fb);
    if (st == MOE_STATUS_OK) {
        memset(ws, garbage ^ 0x5a, bb);
        st = moe_backward(&L->c, &L->w, L->x, TT, &r->info, L->dy, r->dx, &g, ws, bb);
    }
    free(ws);
    return st;
}

/* --- threads ------------------------------------------------------------------- */

enum { ITERS = 8 };
typedef struct worker {
    const tlayer *layers;
    const tresult *expect;   /* the sequential results, one per config */
    int id, mismatches, failures;
} worker;

static void *worker_main(void *arg) {
    worker *wk = (worker *)arg;
    int it, k;
    for (it = 0; it < ITERS; it++)
        for (k = 0; k < NCFG; k++) {
            /* the two threads walk the configs in opposite orders, and every
               other iteration uses the _alloc forms */
            const int which = wk->id ? NCFG - 1 - k : k;
            tresult r;
            tresult_init(&r, &wk->layers[which].c);
            if (run(&wk->layers[which], &r, (unsigned char)(0x11 * (it + 1) + wk->id), (it + wk->id) & 1) != MOE_STATUS_OK)
                wk->failures++;
            else if (!tresult_same(&r, &wk->expect[which]))
                wk->mismatches++;
            tresult_free(&r);
        }
    return NULL;
}

/* Two threads, concurrent forward + backward on their own buffers, bitwise
   equal to the sequential results. */
TEST(threads, concurrent_forward_backward_match_sequential) {
    tlayer layers[NCFG];
    tresult expect[NCFG];
    pthread_t th[2];
    worker wk[2];
    int k, i;
    for (k = 0; k < NCFG; k++) {
        tlayer_init(&layers[k], k);
        tresult_init(&expect[k], &layers[k].c);
        CHECK_STATUS(run(&layers[k], &expect[k], 0x00, 0), MOE_STATUS_OK);
    }
    for (i = 0; i < 2; i++) {
        memset(&wk[i], 0, sizeof wk[i]);
        wk[i].layers = layers; wk[i].expect = expect; wk[i].id = i;
        CHECK(pthread_create(&th[i], NULL, worker_main, &wk[i]) == 0);
    }
    for (i = 0; i < 2; i++) {
        CHECK(pthread_join(th[i], NULL) == 0);
        CHECK_INT(wk[i].failures, 0);
        CHECK_INT(wk[i].mismatches, 0);
    }
    for (k = 0; k < NCFG; k++) { tresult_free(&expect[k]); tlayer_free(&layers[k]); }
}

/* --- determinism without threads --------------------------------------------------- */

/* Gradients (and y) are bitwise the same across runs whatever the workspace
   held before the call (zeros, 0xFF = NaN patterns, other bytes), and the
   same through moe_forward_alloc + moe_backward_alloc. */
TEST(determinism, gradients_across_runs_and_apis) {
    static const unsigned char garbage[4] = {0x00, 0xFF, 0x7F, 0xA5};
    int k, g;
    for (k = 0; k < NCFG; k++) {
        tlayer L;
        tresult a, b;
        tlayer_init(&L, k);
        tresult_init(&a, &L.c);
        tresult_init(&b, &L.c);
        CHECK_STATUS(run(&L, &a, garbage[0], 0), MOE_STATUS_OK);
        for (g = 1; g < 4; g++) {
            CHECK_STATUS(run(&L, &b, garbage[g], 0), MOE_STATUS_OK);
            if (!tresult_same(&a, &b)) moe_test_fail(__FILE__, __LINE__, "config %d: workspace garbage 0x%02x changed the results", k, garbage[g]);
        }
        CHECK_STATUS(run(&L, &b, 0, 1), MOE_STATUS_OK);
        if (!tresult_same(&a, &b)) moe_test_fail(__FILE__, __LINE__, "config %d: _alloc forms differ from workspace forms", k);
        tresult_free(&a); tresult_free(&b); tlayer_free(&L);
    }
}

/* The router input jitter, Shazeer noise and random routing are keyed by
   (seed, purpose, token, column): the first T tokens of a 2T-token call are
   routed, weighted and processed exactly as in a T-token call. (Batch-level
   quantities are excluded: no capacity and no losses here.) */
TEST(determinism, random_routing_independent_of_batch_size) {
    int k;
    for (k = 0; k < 3; k++) {
        enum { T2 = 2 * TT };
        tlayer L;
        float *x2, *y1, *y2;
        int32_t i;
        tlayer_init(&L, k == 0 ? 1 : k == 1 ? 2 : 3);
        L.c.capacity = 0; L.c.capacity_factor = 0.0f;
        L.c.shared_d_ff = 0; L.c.shared_expert_gated = 0;
        L.c.balance_coef = L.c.z_loss_coef = L.c.importance_coef = L.c.load_coef = 0.0f;
        x2 = (float *)malloc(T2 * TD * sizeof(float));
        y1 = (float *)malloc(TT * TD * sizeof(float));
        y2 = (float *)malloc(T2 * TD * sizeof(float));
        memcpy(x2, L.x, TT * TD * sizeof(float));
        for (i = 0; i < TT * TD; i++) x2[TT * TD + i] = -L.x[i];
        CHECK_STATUS(moe_forward_alloc(&L.c, &L.w, L.x, TT, y1, NULL), MOE_STATUS_OK);
        CHECK_STATUS(moe_forward_alloc(&L.c, &L.w, x2, T2, y2, NULL), MOE_STATUS_OK);
        CHECK(memcmp(y1, y2, TT * TD * sizeof(float)) == 0);
        free(x2); free(y1); free(y2); tlayer_free(&L);
    }
}

/* Token-parallel top-k routing (moe__route_topk runs token chunks as tasks):
   a batch big enough to go parallel gives the same routing, Shazeer
   importance / load and output bitwise, whether the chunks run serially, in
   reverse order through cfg.parallel_for, or on the default pool. */
static void reverse_pool(void *user, int32_t n, moe_task_fn fn, void *arg) {
    int32_t i;
    (void)user;
    for (i = n - 1; i >= 0; i--) fn(arg, i);
}
TEST(determinism, parallel_routing_any_schedule) {
    enum { BT = 4096, BE = 64, BK = 6, BD = 4, BF = 2 };
    moe_config c;
    moe_weights w;
    moe_info in[3];
    void *ib[3];
    float *y[3];
    float *x, *router, *noise, *gate, *up, *down;
    uint32_t s = 4242u;
    size_t ibytes = 0;
    int k;
    memset(&c, 0, sizeof c);
    c.num_experts = BE; c.top_k = BK; c.d_model = BD; c.d_ff = BF;
    c.training = 1; c.seed = 99u; c.noise = MOE_NOISE_SHAZEER; c.noise_epsilon = 0.01f;
    c.importance_coef = 0.1f; c.load_coef = 0.1f; c.balance_coef = 0.01f; c.capacity_factor = 0.5f;
    x = rnd((size_t)BT * BD, &s); router = rnd((size_t)BE * BD, &s); noise = rnd((size_t)BE * BD, &s);
    gate = rnd((size_t)BE * BF * BD, &s); up = rnd((size_t)BE * BF * BD, &s); down = rnd((size_t)BE * BD * BF, &s);
    memset(&w, 0, sizeof w);
    w.router = router; w.router_noise = noise; w.gate = gate; w.up = up; w.down = down;
    CHECK_STATUS(moe_info_size(&c, BT, &ibytes), MOE_STATUS_OK);
    for (k = 0; k < 3; k++) {
        moe_config ck = c;
        if (k == 0) ck.num_threads = 1;
        if (k == 1) ck.parallel_for = reverse_pool;
        y[k] = (float *)malloc((size_t)BT * BD * sizeof(float));
        ib[k] = malloc(ibytes);
        memset(&in[k], 0, sizeof in[k]);
        CHECK_STATUS(moe_info_bind(&ck, BT, &in[k], ib[k], ibytes), MOE_STATUS_OK);
        CHECK_STATUS(moe_forward_alloc(&ck, &w, x, BT, y[k], &in[k]), MOE_STATUS_OK);
    }
    CHECK(in[0].aux_importance > 0.0f && in[0].aux_load > 0.0f && in[0].dropped_pairs > 0);
    for (k = 1; k < 3; k++) {
        CHECK(memcmp(y[0], y[k], (size_t)BT * BD * sizeof(float)) == 0);
        CHECK(memcmp(in[0].expert, in[k].expert, (size_t)BT * BK * sizeof(int32_t)) == 0);
        CHECK(memcmp(in[0].weight, in[k].weight, (size_t)BT * BK * sizeof(float)) == 0);
        CHECK(memcmp(in[0].dropped, in[k].dropped, (size_t)BT * BK) == 0);
        CHECK(memcmp(&in[0].aux_importance, &in[k].aux_importance, sizeof(float)) == 0);
        CHECK(memcmp(&in[0].aux_load, &in[k].aux_load, sizeof(float)) == 0);
        CHECK(memcmp(&in[0].aux_total, &in[k].aux_total, sizeof(float)) == 0);
    }
    for (k = 0; k < 3; k++) { free(y[k]); free(ib[k]); }
    free(x); free(router); free(noise); free(gate); free(up); free(down);
}
