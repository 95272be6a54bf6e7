/* Misuse tests: every public function answers bad input with the exact named
   status (never an abort or a print), writes nothing on failure (except
   info->workspace_required), and never writes outside the caller's buffers.
   Covers config, capacity, info, route, forward, backward and bias update. */
#include "../moe.h"
#include "moe_test.h"
#include <stddef.h>
#include <stdint.h>

#define SENT_F 12345.0f     /* sentinel in float outputs          */
#define SENT_I (-7)         /* sentinel in int32 outputs          */
#define SENT_B 0xA5         /* sentinel byte                      */
#define SENT_WS ((size_t)777) /* sentinel in info.workspace_required */
#define GUARD 64            /* guard elements on each side of an output buffer */

/* Fixture shape: T tokens, E experts (P Soft MoE slots each), D, F, shared Fs. */
enum { FT = 3, FE = 4, FP = 2, FD = 4, FF = 4, FS = 4, FR = FE * FP, FMAX = FT * FR };
enum { FN = FT * FE };   /* most expert rows of any fixture config (dense: T*E) */

/* A status mismatch, named by case (for table-like tests). */
#define EXPECT_STATUS(what, got, want) expect_status(__FILE__, __LINE__, (what), (got), (want))
static void expect_status(const char *file, int line, const char *what, moe_status got,
                          moe_status want) {
    if (got != want)
        moe_test_fail(file, line, "%s: got %d (%s), want %d (%s)", what, (int)got,
                      moe_status_string(got), (int)want, moe_status_string(want));
}

static int f_all(const float *a, size_t n, float v) {
    size_t i;
    for (i = 0; i < n; i++) if (memcmp(&a[i], &v, sizeof v) != 0) return 0;
    return 1;
}
static int i_all(const int32_t *a, size_t n, int32_t v) {
    size_t i;
    for (i = 0; i < n; i++) if (a[i] != v) return 0;
    return 1;
}
static int b_all(const uint8_t *a, size_t n, uint8_t v) {
    size_t i;
    for (i = 0; i < n; i++) if (a[i] != v) return 0;
    return 1;
}
static int all_finite(const float *a, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) if (!(a[i] - a[i] == 0.0f)) return 0;
    return 1;
}

/* --- fixture: every tensor any config may read, small and finite ---------- */
typedef struct fixture {
    float x[FT * FD], router[FE * FD], router_bias[FE], sel_bias[FE], router_noise[FE * FD];
    float gate[FE * 2 * FF * FD], up[FE * FF * FD], down[FE * FD * FF];
    float gate_bias[FE * FF], up_bias[FE * FF], down_bias[FE * FD];
    float sh_gate[FS * FD], sh_up[FS * FD], sh_down[FD * FS];
    float sh_gate_bias[FS], sh_up_bias[FS], sh_down_bias[FD], sh_expert_gate[FD];
    float phi[FR * FD], scale[1];
    float logits[FMAX], noise_logits[FT * FE]; /* moe_route inputs */
    moe_weights w;
} fixture;

static void fill(float *a, size_t n, uint32_t *s) {
    size_t i;
    for (i = 0; i < n; i++) {
        *s = *s * 1664525u + 1013904223u;
        a[i] = (float)((*s >> 8) * (1.0 / 16777216.0)) - 0.5f;
    }
}

static fixture *fx(void) {
    static fixture f;
    uint32_t s = 12345u;
#define FILL(a) fill(a, sizeof(a) / sizeof(float), &s)
    FILL(f.x); FILL(f.router); FILL(f.router_bias); FILL(f.sel_bias); FILL(f.router_noise);
    FILL(f.gate); FILL(f.up); FILL(f.down); FILL(f.gate_bias); FILL(f.up_bias); FILL(f.down_bias);
    FILL(f.sh_gate); FILL(f.sh_up); FILL(f.sh_down); FILL(f.sh_gate_bias); FILL(f.sh_up_bias);
    FILL(f.sh_down_bias); FILL(f.sh_expert_gate); FILL(f.phi); FILL(f.logits); FILL(f.noise_logits);
#undef FILL
    f.scale[0] = 1.5f;
    memset(&f.w, 0, sizeof f.w);
    f.w.router = f.router; f.w.router_bias = f.router_bias; f.w.selection_bias = f.sel_bias;
    f.w.router_noise = f.router_noise; f.w.gate = f.gate; f.w.up = f.up; f.w.down = f.down;
    f.w.gate_bias = f.gate_bias; f.w.up_bias = f.up_bias; f.w.down_bias = f.down_bias;
    f.w.shared_gate = f.sh_gate; f.w.shared_up = f.sh_up; f.w.shared_down = f.sh_down;
    f.w.shared_gate_bias = f.sh_gate_bias; f.w.shared_up_bias = f.sh_up_bias;
    f.w.shared_down_bias = f.sh_down_bias; f.w.shared_expert_gate = f.sh_expert_gate;
    f.w.soft_phi = f.phi; f.w.soft_scale = f.scale;
    return &f;
}

/* A valid fixture-shaped config of each routing family. */
static moe_config base(moe_routing r) {
    moe_config c;
    memset(&c, 0, sizeof c);
    c.num_experts = FE; c.d_model = FD; c.d_ff = FF; c.routing = r;
    if (r == MOE_ROUTING_TOPK) c.top_k = 2;
    if (r == MOE_ROUTING_EXPERT_CHOICE) c.capacity = 2;
    if (r == MOE_ROUTING_SOFT) c.slots_per_expert = FP;
    return c;
}

/* --- output buffers with guard zones -------------------------------------- */
typedef struct outbuf {
    float y[GUARD + FT * FD + GUARD];
    float logits[GUARD + FMAX + GUARD], scores[GUARD + FMAX + GUARD];
    float dispatch[GUARD + FMAX + GUARD], weight[GUARD + FMAX + GUARD];
    int32_t expert[GUARD + FMAX + GUARD], routed[GUARD + FE + GUARD], kept[GUARD + FE + GUARD];
    uint8_t dropped[GUARD + FMAX + GUARD];
    float ch[GUARD + FN * FF + GUARD], cu[GUARD + FN * FF + GUARD], co[GUARD + FN * FD + GUARD];
    float csh[GUARD + FT * FS + GUARD], csu[GUARD + FT * FS + GUARD], cso[GUARD + FT * FD + GUARD];
    moe_info info;
} outbuf;
#define ALL_CACHE(X) X(ch) X(cu) X(co) X(csh) X(csu) X(cso)

/* Fill y, every info array and every info scalar with sentinels. dispatch is
   bound only when asked (it is a Soft MoE output). */
static void arm(outbuf *o, int with_dispatch) {
    size_t i;
    for (i = 0; i < sizeof o->y / sizeof(float); i++) o->y[i] = SENT_F;
    for (i = 0; i < GUARD + FMAX + GUARD; i++) {
        o->logits[i] = o->scores[i] = o->dispatch[i] = o->weight[i] = SENT_F;
        o->expert[i] = SENT_I;
        o->dropped[i] = SENT_B;
    }
    for (i = 0; i < GUARD + FE + GUARD; i++) o->routed[i] = o->kept[i] = SENT_I;
#define FILL_SENT(a) for (i = 0; i < sizeof o->a / sizeof(float); i++) o->a[i] = SENT_F;
    ALL_CACHE(FILL_SENT)
#undef FILL_SENT
    memset(&o->info, 0, sizeof o->info);
    o->info.cache_hidden = o->ch + GUARD; o->info.cache_up = o->cu + GUARD; o->info.cache_out = o->co + GUARD;
    o->info.cache_shared_hidden = o->csh + GUARD; o->info.cache_shared_up = o->csu + GUARD;
    o->info.cache_shared_out = o->cso + GUARD;
    o->info.logits = o->logits + GUARD; o->info.scores = o->scores + GUARD;
    o->info.dispatch = with_dispatch ? o->dispatch + GUARD : NULL;
    o->info.weight = o->weight + GUARD; o->info.expert = o->expert + GUARD;
    o->info.dropped = o->dropped + GUARD;
    o->info.expert_routed = o->routed + GUARD; o->info.expert_kept = o->kept + GUARD;
    o->info.slots = o->info.capacity = o->info.dropped_pairs = o->info.dropped_tokens = SENT_I;
    o->info.aux_balance = o->info.aux_z = o->info.aux_importance = SENT_F;
    o->info.aux_load = o->info.aux_seq = o->info.aux_total = SENT_F;
    o->info.workspace_required = SENT_WS;
}

/* y, the info arrays and the info scalars exactly as arm() left them
   (workspace_required is checked by the caller). */
static int untouched(const outbuf *o) {
    const moe_info *n = &o->info;
#define CACHE_SENT(a) if (!f_all(o->a, sizeof o->a / sizeof(float), SENT_F)) return 0;
    ALL_CACHE(CACHE_SENT)
#undef CACHE_SENT
    return f_all(o->y, sizeof o->y / sizeof(float), SENT_F) &&
           f_all(o->logits, GUARD + FMAX + GUARD, SENT_F) && f_all(o->scores, GUARD + FMAX + GUARD, SENT_F) &&
           f_all(o->dispatch, GUARD + FMAX + GUARD, SENT_F) && f_all(o->weight, GUARD + FMAX + GUARD, SENT_F) &&
           i_all(o->expert, GUARD + FMAX + GUARD, SENT_I) && b_all(o->dropped, GUARD + FMAX + GUARD, SENT_B) &&
           i_all(o->routed, GUARD + FE + GUARD, SENT_I) && i_all(o->kept, GUARD + FE + GUARD, SENT_I) &&
           n->slots == SENT_I && n->capacity == SENT_I && n->dropped_pairs == SENT_I &&
           n->dropped_tokens == SENT_I && n->aux_balance == SENT_F && n->aux_z == SENT_F &&
           n->aux_importance == SENT_F && n->aux_load == SENT_F && n->aux_seq == SENT_F &&
           n->aux_total == SENT_F;
}

/* Guards around the used part of each buffer untouched: ny floats of y,
   nr router columns x T, ns slots x T, ne experts. */
static int guards_ok(const outbuf *o, size_t ny, size_t ntr, size_t nts, size_t ne) {
#define G_F(a, n) (f_all(a, GUARD, SENT_F) && f_all((a) + GUARD + (n), sizeof(a) / sizeof(a[0]) - GUARD - (n), SENT_F))
#define G_I(a, n) (i_all(a, GUARD, SENT_I) && i_all((a) + GUARD + (n), sizeof(a) / sizeof(a[0]) - GUARD - (n), SENT_I))
    return G_F(o->y, ny) && G_F(o->logits, ntr) && G_F(o->scores, ntr) && G_F(o->dispatch, ntr) &&
           G_F(o->weight, nts) && G_I(o->expert, nts) && G_I(o->routed, ne) && G_I(o->kept, ne) &&
           b_all(o->dropped, GUARD, SENT_B) &&
           b_all(o->dropped + GUARD + nts, sizeof o->dropped - GUARD - nts, SENT_B);
#undef G_F
#undef G_I
}

/* Guards around the training cache: n rows bound (N), F, D and Fs as given. */
static int cache_guards_ok(const outbuf *o, size_t n, size_t F, size_t Fs) {
#define G_C(a, m) (f_all(o->a, GUARD, SENT_F) && f_all(o->a + GUARD + (m), sizeof(o->a) / sizeof(float) - GUARD - (m), SENT_F))
    return G_C(ch, n * F) && G_C(cu, n * F) && G_C(co, n * FD) && G_C(csh, (size_t)FT * Fs) &&
           G_C(csu, (size_t)FT * Fs) && G_C(cso, Fs ? (size_t)FT * FD : 0);
#undef G_C
}

/* --- gradient buffers with guard zones (moe_backward) ----------------------- */
enum { NGRAD = 18 };
static const size_t grad_len[NGRAD] = {   /* moe_grads field order */
    FE * FD, FE, FE * FD, FE * 2 * FF * FD, FE * FF * FD, FE * FD * FF, FE * FF, FE * FF, FE * FD,
    FS * FD, FS * FD, FD * FS, FS, FS, FD, FD, FR * FD, 1};
typedef struct gradbuf {
    float pool[NGRAD][GUARD + FE * 2 * FF * FD + GUARD];
    float dx[GUARD + FT * FD + GUARD];
    moe_grads g;
} gradbuf;

/* Every gradient and dx filled with the sentinel; all moe_grads pointers set. */
static void garm(gradbuf *b) {
    float **slot[NGRAD];
    size_t i, k;
    moe_grads *g = &b->g;
    slot[0] = &g->router; slot[1] = &g->router_bias; slot[2] = &g->router_noise;
    slot[3] = &g->gate; slot[4] = &g->up; slot[5] = &g->down; slot[6] = &g->gate_bias;
    slot[7] = &g->up_bias; slot[8] = &g->down_bias; slot[9] = &g->shared_gate;
    slot[10] = &g->shared_up; slot[11] = &g->shared_down; slot[12] = &g->shared_gate_bias;
    slot[13] = &g->shared_up_bias; slot[14] = &g->shared_down_bias;
    slot[15] = &g->shared_expert_gate; slot[16] = &g->soft_phi; slot[17] = &g->soft_scale;
    for (k = 0; k < NGRAD; k++) {
        for (i = 0; i < sizeof b->pool[k] / sizeof(float); i++) b->pool[k][i] = SENT_F;
        *slot[k] = b->pool[k] + GUARD;
    }
    for (i = 0; i < sizeof b->dx / sizeof(float); i++) b->dx[i] = SENT_F;
}
/* Nothing written at all (failure). */
static int g_untouched(const gradbuf *b) {
    size_t k;
    for (k = 0; k < NGRAD; k++) if (!f_all(b->pool[k], sizeof b->pool[k] / sizeof(float), SENT_F)) return 0;
    return f_all(b->dx, sizeof b->dx / sizeof(float), SENT_F);
}
/* Guards around every gradient tensor and around dx (ndx floats) intact. */
static int g_guards_ok(const gradbuf *b, size_t ndx) {
    size_t k, n = sizeof b->pool[0] / sizeof(float);
    for (k = 0; k < NGRAD; k++)
        if (!f_all(b->pool[k], GUARD, SENT_F) ||
            !f_all(b->pool[k] + GUARD + grad_len[k], n - GUARD - grad_len[k], SENT_F)) return 0;
    return f_all(b->dx, GUARD, SENT_F) &&
           f_all(b->dx + GUARD + ndx, sizeof b->dx / sizeof(float) - GUARD - ndx, SENT_F);
}

/* moe_backward with an exact workspace (large when the size query refuses). */
static moe_status bwd(const moe_config *c, const moe_weights *w, const float *x, int32_t T,
                      const moe_info *info, const float *dy, float *dx, const moe_grads *g) {
    size_t bytes = 0;
    void *ws;
    moe_status st;
    if (moe_backward_workspace_size(c, T, &bytes) != MOE_STATUS_OK) bytes = (size_t)1 << 20;
    ws = malloc(bytes);
    if (!ws) return MOE_STATUS_OUT_OF_MEMORY;
    st = moe_backward(c, w, x, T, info, dy, dx, g, ws, bytes);
    free(ws);
    return st;
}

/* moe_forward with an exact workspace (or a large one when the size query
   itself refuses the config, so that moe_forward's own answer is tested). */
static moe_status fwd(const moe_config *c, const moe_weights *w, const float *x, int32_t T,
                      float *y, moe_info *info) {
    size_t bytes = 0;
    void *ws;
    moe_status st;
    if (moe_forward_workspace_size(c, T, &bytes) != MOE_STATUS_OK) bytes = (size_t)1 << 20;
    ws = malloc(bytes);
    if (!ws) return MOE_STATUS_OUT_OF_MEMORY;
    st = moe_forward(c, w, x, T, y, info, ws, bytes);
    free(ws);
    return st;
}

/* moe_route with an exact workspace (large when the size query refuses). */
static moe_status route(const moe_config *c, const moe_weights *w, const float *logits,
                        const float *noise, int32_t T, moe_info *info) {
    size_t bytes = 0;
    void *ws;
    moe_status st;
    if (moe_route_workspace_size(c, T, &bytes) != MOE_STATUS_OK) bytes = (size_t)1 << 20;
    ws = malloc(bytes);
    if (!ws) return MOE_STATUS_OUT_OF_MEMORY;
    st = moe_route(c, w, logits, noise, T, info, ws, bytes);
    free(ws);
    return st;
}

/* Every call that takes (c, w, x) must return want and write nothing.
   cfg_level: the config alone is bad, so moe_config_resolve, the three size
   queries and moe_route must refuse it with the same status too. */
#define EXPECT_FAIL(what, c, w, x, want, cfg_level) \
    expect_fail(__FILE__, __LINE__, (what), (c), (w), (x), (want), (cfg_level))
static void expect_fail(const char *file, int line, const char *what, const moe_config *c,
                        const moe_weights *w, const float *x, moe_status want, int cfg_level) {
    static outbuf o;
    char msg[160];
    fixture *f = fx();
    arm(&o, 1);
    snprintf(msg, sizeof msg, "%s [moe_forward]", what);
    expect_status(file, line, msg, fwd(c, w, x, FT, o.y + GUARD, &o.info), want);
    if (!untouched(&o) || o.info.workspace_required != SENT_WS)
        moe_test_fail(file, line, "%s: moe_forward wrote outputs on failure", what);
    arm(&o, 1);
    snprintf(msg, sizeof msg, "%s [moe_forward_alloc]", what);
    expect_status(file, line, msg, moe_forward_alloc(c, w, x, FT, o.y + GUARD, &o.info), want);
    if (!untouched(&o) || o.info.workspace_required != SENT_WS)
        moe_test_fail(file, line, "%s: moe_forward_alloc wrote outputs on failure", what);
    if (want != MOE_STATUS_NONFINITE) {   /* the backward validates the same way (it does not scan x) */
        static gradbuf gb;
        garm(&gb);
        snprintf(msg, sizeof msg, "%s [moe_backward]", what);
        expect_status(file, line, msg, bwd(c, w, x, FT, &o.info, f->x, gb.dx + GUARD, &gb.g), want);
        snprintf(msg, sizeof msg, "%s [moe_backward_alloc]", what);
        expect_status(file, line, msg, moe_backward_alloc(c, w, x, FT, &o.info, f->x, gb.dx + GUARD, &gb.g), want);
        if (!g_untouched(&gb)) moe_test_fail(file, line, "%s: moe_backward wrote dx or grads on failure", what);
    }
    if (cfg_level) {
        moe_config out;
        unsigned char ref[sizeof(moe_config)];
        size_t bytes = SENT_WS;
        memset(&out, SENT_B, sizeof out);
        memset(ref, SENT_B, sizeof ref);
        snprintf(msg, sizeof msg, "%s [moe_config_resolve]", what);
        expect_status(file, line, msg, moe_config_resolve(c, &out), want);
        if (memcmp(&out, ref, sizeof out) != 0)
            moe_test_fail(file, line, "%s: moe_config_resolve wrote *out on failure", what);
        snprintf(msg, sizeof msg, "%s [moe_forward_workspace_size]", what);
        expect_status(file, line, msg, moe_forward_workspace_size(c, FT, &bytes), want);
        snprintf(msg, sizeof msg, "%s [moe_route_workspace_size]", what);
        expect_status(file, line, msg, moe_route_workspace_size(c, FT, &bytes), want);
        snprintf(msg, sizeof msg, "%s [moe_info_size]", what);
        expect_status(file, line, msg, moe_info_size(c, FT, &bytes), want);
        snprintf(msg, sizeof msg, "%s [moe_backward_workspace_size]", what);
        expect_status(file, line, msg, moe_backward_workspace_size(c, FT, &bytes), want);
        if (bytes != SENT_WS) moe_test_fail(file, line, "%s: a size query wrote *out_bytes on failure", what);
        arm(&o, 1);
        snprintf(msg, sizeof msg, "%s [moe_route]", what);
        expect_status(file, line, msg, route(c, w, f->logits, f->noise_logits, FT, &o.info), want);
        if (!untouched(&o) || o.info.workspace_required != SENT_WS)
            moe_test_fail(file, line, "%s: moe_route wrote outputs on failure", what);
    }
}
#define EXPECT_CFG(what, c, want) EXPECT_FAIL((what), &(c), &fx()->w, fx()->x, (want), 1)

/* --- moe_status_string ----------------------------------------------------- */

/* Every code has its own non-empty text; out-of-range values get a fallback. */
TEST(misuse, status_string_distinct_and_fallback) {
    int i, j;
    const char *fb[3];
    for (i = 0; i < MOE_STATUS_COUNT; i++) {
        const char *s = moe_status_string((moe_status)i);
        CHECK(s != NULL && s[0] != '\0');
        if (!s) continue;
        for (j = 0; j < i; j++) {
            const char *o = moe_status_string((moe_status)j);
            if (o && strcmp(s, o) == 0) moe_test_fail(__FILE__, __LINE__, "codes %d and %d share a string", i, j);
        }
    }
    fb[0] = moe_status_string(MOE_STATUS_COUNT);
    fb[1] = moe_status_string((moe_status)-1);
    fb[2] = moe_status_string((moe_status)1000);
    for (i = 0; i < 3; i++) {
        CHECK(fb[i] != NULL && fb[i][0] != '\0');
        if (!fb[i]) continue;
        for (j = 0; j < MOE_STATUS_COUNT; j++) CHECK(strcmp(fb[i], moe_status_string((moe_status)j)) != 0);
    }
}

/* --- moe_config_resolve and the config-level errors of every call --------- */

/* NULL cfg or out. */
TEST(misuse, resolve_null) {
    moe_config c = base(MOE_ROUTING_TOPK), out;
    unsigned char ref[sizeof(moe_config)];
    memset(&out, SENT_B, sizeof out);
    memset(ref, SENT_B, sizeof ref);
    CHECK_STATUS(moe_config_resolve(NULL, &out), MOE_STATUS_NULL_ARGUMENT);
    CHECK(memcmp(&out, ref, sizeof out) == 0);
    CHECK_STATUS(moe_config_resolve(&c, NULL), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_config_resolve(NULL, NULL), MOE_STATUS_NULL_ARGUMENT);
}

/* Defaults are applied, and out may alias cfg. */
TEST(misuse, resolve_defaults_in_place) {
    moe_config c = base(MOE_ROUTING_TOPK);
    CHECK_STATUS(moe_config_resolve(&c, &c), MOE_STATUS_OK);
    CHECK_INT(c.n_group, 1);
    CHECK_INT(c.topk_group, 1);
    CHECK_INT(c.group_score_top, 1);
    CHECK_INT(c.slots_per_expert, 1);
    CHECK(c.isa != MOE_ISA_AUTO);   /* the compiled SIMD ISA, or the reference */
    CHECK(c.routed_scale == 1.0f && c.second_threshold == 0.5f);
}

/* moe_config_fingerprint: what a save_for_backward forward stamps; 0 for no config. */
TEST(misuse, config_fingerprint) {
    moe_config c = base(MOE_ROUTING_TOPK), d;
    const uint64_t key = moe_config_fingerprint(&c);
    CHECK(key != 0);
    CHECK(moe_config_fingerprint(NULL) == 0);
    d = c; d.top_k = 0;
    CHECK(moe_config_fingerprint(&d) == 0);             /* invalid */
    d = c; d.isa = MOE_ISA_REFERENCE; d.num_threads = 3; d.router_grad_clip = 1.0f;
    d.save_for_backward = !c.save_for_backward;
    CHECK(moe_config_fingerprint(&d) == key);           /* not part of it */
    d = c; d.z_loss_coef = 0.25f;
    CHECK(moe_config_fingerprint(&d) != key);
    d = c; d.training = !c.training;
    CHECK(moe_config_fingerprint(&d) != key);
    d = c; d.seed = c.seed + 1;
    CHECK(moe_config_fingerprint(&d) != key);
}

/* D, F, E <= 0 and other negative sizes. */
TEST(misuse, bad_dimension) {
    moe_config c;
    c = base(MOE_ROUTING_TOPK); c.num_experts = 0; EXPECT_CFG("E = 0", c, MOE_STATUS_BAD_DIMENSION);
    c = base(MOE_ROUTING_TOPK); c.num_experts = -4; EXPECT_CFG("E = -4", c, MOE_STATUS_BAD_DIMENSION);
    c = base(MOE_ROUTING_TOPK); c.d_model = 0; EXPECT_CFG("D = 0", c, MOE_STATUS_BAD_DIMENSION);
    c = base(MOE_ROUTING_TOPK); c.d_model = -1; EXPECT_CFG("D = -1", c, MOE_STATUS_BAD_DIMENSION);
    c = base(MOE_ROUTING_TOPK); c.d_ff = 0; EXPECT_CFG("F = 0", c, MOE_STATUS_BAD_DIMENSION);
    c = base(MOE_ROUTING_TOPK); c.d_ff = -3; EXPECT_CFG("F = -3", c, MOE_STATUS_BAD_DIMENSION);
    c = base(MOE_ROUTING_TOPK); c.shared_d_ff = -1; EXPECT_CFG("Fs = -1", c, MOE_STATUS_BAD_DIMENSION);
    c = base(MOE_ROUTING_SOFT); c.slots_per_expert = -1; EXPECT_CFG("P = -1", c, MOE_STATUS_BAD_DIMENSION);
    c = base(MOE_ROUTING_TOPK); c.seq_len = -1; EXPECT_CFG("seq_len = -1", c, MOE_STATUS_BAD_DIMENSION);
    c = base(MOE_ROUTING_DENSE); c.d_model = 0; EXPECT_CFG("dense D = 0", c, MOE_STATUS_BAD_DIMENSION);
    c = base(MOE_ROUTING_SOFT); c.num_experts = 0; EXPECT_CFG("soft E = 0", c, MOE_STATUS_BAD_DIMENSION);
}

/* K = 0, K < 0 and K > E for top-k; other families ignore top_k. */
TEST(misuse, bad_top_k) {
    moe_config c;
    c = base(MOE_ROUTING_TOPK); c.top_k = 0; EXPECT_CFG("K = 0", c, MOE_STATUS_BAD_TOP_K);
    c = base(MOE_ROUTING_TOPK); c.top_k = -1; EXPECT_CFG("K = -1", c, MOE_STATUS_BAD_TOP_K);
    c = base(MOE_ROUTING_TOPK); c.top_k = FE + 1; EXPECT_CFG("K = E + 1", c, MOE_STATUS_BAD_TOP_K);
    c = base(MOE_ROUTING_EXPERT_CHOICE); c.top_k = 0; CHECK_STATUS(moe_config_resolve(&c, &c), MOE_STATUS_OK);
    c = base(MOE_ROUTING_DENSE); c.top_k = 0; CHECK_STATUS(moe_config_resolve(&c, &c), MOE_STATUS_OK);
    c = base(MOE_ROUTING_SOFT); c.top_k = 0; CHECK_STATUS(moe_config_resolve(&c, &c), MOE_STATUS_OK);
}

/* Group limits: n_group | E, topk_group <= n_group, enough experts, group_score_top. */
TEST(misuse, bad_groups) {
    moe_config c;
    c = base(MOE_ROUTING_TOPK); c.n_group = 3; EXPECT_CFG("n_group 3 of E 4", c, MOE_STATUS_BAD_GROUPS);
    c = base(MOE_ROUTING_TOPK); c.n_group = 8; EXPECT_CFG("n_group 8 > E", c, MOE_STATUS_BAD_GROUPS);
    c = base(MOE_ROUTING_TOPK); c.n_group = 2; c.topk_group = 3; EXPECT_CFG("topk_group > n_group", c, MOE_STATUS_BAD_GROUPS);
    c = base(MOE_ROUTING_TOPK); c.n_group = 2; c.topk_group = 1; c.top_k = 3;
    EXPECT_CFG("topk_group * groupsize < K", c, MOE_STATUS_BAD_GROUPS);
    c = base(MOE_ROUTING_TOPK); c.n_group = 2; c.group_score_top = 3; EXPECT_CFG("group_score_top > groupsize", c, MOE_STATUS_BAD_GROUPS);
    c = base(MOE_ROUTING_TOPK); c.n_group = -2; EXPECT_CFG("n_group < 0", c, MOE_STATUS_BAD_GROUPS);
    c = base(MOE_ROUTING_TOPK); c.topk_group = -1; EXPECT_CFG("topk_group < 0", c, MOE_STATUS_BAD_GROUPS);
    c = base(MOE_ROUTING_TOPK); c.group_score_top = -1; EXPECT_CFG("group_score_top < 0", c, MOE_STATUS_BAD_GROUPS);
    c = base(MOE_ROUTING_DENSE); c.n_group = 3; EXPECT_CFG("dense n_group 3 of E 4", c, MOE_STATUS_BAD_GROUPS);
    c = base(MOE_ROUTING_TOPK); c.n_group = 2; c.topk_group = 1; c.top_k = 2;   /* exactly enough: fine */
    CHECK_STATUS(moe_config_resolve(&c, &c), MOE_STATUS_OK);
}

/* capacity < 0, capacity_factor < 0 / NaN / Inf, EC without, dense/soft with. */
TEST(misuse, bad_capacity) {
    moe_config c;
    c = base(MOE_ROUTING_TOPK); c.capacity = -1; EXPECT_CFG("capacity -1", c, MOE_STATUS_BAD_CAPACITY);
    c = base(MOE_ROUTING_TOPK); c.capacity_factor = -0.5f; EXPECT_CFG("cf -0.5", c, MOE_STATUS_BAD_CAPACITY);
    c = base(MOE_ROUTING_TOPK); c.capacity_factor = NAN; EXPECT_CFG("cf NaN", c, MOE_STATUS_BAD_CAPACITY);
    c = base(MOE_ROUTING_TOPK); c.capacity_factor = INFINITY; EXPECT_CFG("cf +Inf", c, MOE_STATUS_BAD_CAPACITY);
    c = base(MOE_ROUTING_TOPK); c.capacity_factor = -INFINITY; EXPECT_CFG("cf -Inf", c, MOE_STATUS_BAD_CAPACITY);
    c = base(MOE_ROUTING_EXPERT_CHOICE); c.capacity = 0; EXPECT_CFG("EC without capacity", c, MOE_STATUS_BAD_CAPACITY);
    c = base(MOE_ROUTING_EXPERT_CHOICE); c.capacity = -2; EXPECT_CFG("EC capacity -2", c, MOE_STATUS_BAD_CAPACITY);
    c = base(MOE_ROUTING_EXPERT_CHOICE); c.capacity = 0; c.capacity_factor = NAN; EXPECT_CFG("EC cf NaN", c, MOE_STATUS_BAD_CAPACITY);
    c = base(MOE_ROUTING_DENSE); c.capacity = 1; EXPECT_CFG("dense with capacity", c, MOE_STATUS_BAD_CAPACITY);
    c = base(MOE_ROUTING_DENSE); c.capacity_factor = 1.0f; EXPECT_CFG("dense with cf", c, MOE_STATUS_BAD_CAPACITY);
    c = base(MOE_ROUTING_SOFT); c.capacity = 1; EXPECT_CFG("soft with capacity", c, MOE_STATUS_BAD_CAPACITY);
    c = base(MOE_ROUTING_SOFT); c.capacity_factor = 2.0f; EXPECT_CFG("soft with cf", c, MOE_STATUS_BAD_CAPACITY);
}

/* Every enum field, one past its range both ways. */
TEST(misuse, bad_enum) {
    moe_config c;
#define BAD_ENUM_CASE(field, type)                                                     \
    do {                                                                               \
        c = base(MOE_ROUTING_TOPK); c.field = (type)99;                                \
        EXPECT_CFG(#field " = 99", c, MOE_STATUS_BAD_ENUM);                            \
        c = base(MOE_ROUTING_TOPK); c.field = (type)-1;                                \
        EXPECT_CFG(#field " = -1", c, MOE_STATUS_BAD_ENUM);                            \
    } while (0)
    BAD_ENUM_CASE(activation, moe_activation);
    BAD_ENUM_CASE(routing, moe_routing);
    BAD_ENUM_CASE(score, moe_score_func);
    BAD_ENUM_CASE(normalize, moe_norm);
    BAD_ENUM_CASE(noise, moe_noise);
    BAD_ENUM_CASE(second_expert, moe_second_expert);
    BAD_ENUM_CASE(drop_policy, moe_drop_policy);
    BAD_ENUM_CASE(capacity_formula, moe_capacity_formula);
    BAD_ENUM_CASE(balance_loss, moe_balance_loss);
    BAD_ENUM_CASE(isa, moe_isa);
#undef BAD_ENUM_CASE
    c = base(MOE_ROUTING_TOPK); c.activation = (moe_activation)(MOE_ACT_SILU + 1);
    EXPECT_CFG("activation = last + 1", c, MOE_STATUS_BAD_ENUM);
}

/* Conflicting or out-of-range options. */
TEST(misuse, bad_option) {
    moe_config c;
    c = base(MOE_ROUTING_TOPK); c.top_k = 1; c.second_expert = MOE_SECOND_RANDOM;
    EXPECT_CFG("random 2nd expert, K = 1", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.top_k = 3; c.second_expert = MOE_SECOND_RANDOM;
    EXPECT_CFG("random 2nd expert, K = 3", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.top_k = 3; c.second_expert = MOE_SECOND_SAMPLED;
    EXPECT_CFG("sampled 2nd expert, K = 3", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_EXPERT_CHOICE); c.top_k = 2; c.second_expert = MOE_SECOND_RANDOM;
    EXPECT_CFG("random 2nd expert, expert choice", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_DENSE); c.noise = MOE_NOISE_SHAZEER; EXPECT_CFG("noise, dense", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_SOFT); c.noise = MOE_NOISE_SHAZEER; EXPECT_CFG("noise, soft", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.shared_expert_gated = 1; EXPECT_CFG("shared_expert_gated without shared_d_ff", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.training = 2; EXPECT_CFG("training 2", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.training = -1; EXPECT_CFG("training -1", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.save_for_backward = 2;
    EXPECT_CFG("save_for_backward 2", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.save_for_backward = -1;
    EXPECT_CFG("save_for_backward -1", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.normalize = MOE_NORM_PNORM; c.norm_p = -1.0f; EXPECT_CFG("norm_p -1", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.normalize = MOE_NORM_PNORM; c.norm_p = NAN; EXPECT_CFG("norm_p NaN", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.norm_eps = -1e-9f; EXPECT_CFG("norm_eps < 0", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.jitter = 1.0f; EXPECT_CFG("jitter 1", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.jitter = -0.01f; EXPECT_CFG("jitter < 0", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.jitter = NAN; EXPECT_CFG("jitter NaN", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.top_k = 2; c.second_expert = MOE_SECOND_RANDOM; c.second_threshold = -1.0f;
    EXPECT_CFG("second_threshold < 0", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.routed_scale = INFINITY; EXPECT_CFG("routed_scale Inf", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.noise_epsilon = -1.0f; EXPECT_CFG("noise_epsilon < 0", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.balance_coef = NAN; EXPECT_CFG("balance_coef NaN", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.z_loss_coef = INFINITY; EXPECT_CFG("z_loss_coef Inf", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.seq_balance_coef = -INFINITY; EXPECT_CFG("seq_balance_coef -Inf", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.router_grad_clip = -1.0f; EXPECT_CFG("router_grad_clip < 0", c, MOE_STATUS_BAD_OPTION);
    c = base(MOE_ROUTING_TOPK); c.router_grad_clip = NAN; EXPECT_CFG("router_grad_clip NaN", c, MOE_STATUS_BAD_OPTION);
}

/* A build has the reference and at most one SIMD ISA (the one AUTO resolves
   to); every other ISA is UNSUPPORTED. */
TEST(misuse, unsupported_isa) {
    static const moe_isa isas[3] = {MOE_ISA_AVX2, MOE_ISA_AVX512, MOE_ISA_NEON};
    static outbuf o;
    moe_config c, resolved;
    int i, r;
    c = base(MOE_ROUTING_TOPK);
    CHECK_STATUS(moe_config_resolve(&c, &resolved), MOE_STATUS_OK);
    for (r = 0; r <= MOE_ROUTING_SOFT; r++)
        for (i = 0; i < 3; i++) {
            if (isas[i] == resolved.isa) continue;
            c = base((moe_routing)r); c.isa = isas[i];
            EXPECT_CFG("unsupported ISA", c, MOE_STATUS_UNSUPPORTED);
        }
    for (r = 0; r <= MOE_ROUTING_SOFT; r++) {
        c = base((moe_routing)r); c.isa = MOE_ISA_REFERENCE;
        arm(&o, r == MOE_ROUTING_SOFT);
        CHECK_STATUS(fwd(&c, &fx()->w, fx()->x, FT, o.y + GUARD, &o.info), MOE_STATUS_OK);
        c.isa = MOE_ISA_AUTO;
        CHECK_STATUS(fwd(&c, &fx()->w, fx()->x, FT, o.y + GUARD, &o.info), MOE_STATUS_OK);
    }
}

/* --- moe_routing_slots ------------------------------------------------------ */

/* NULL -> 0; K, E, E, 0 per family; unknown routing -> 0. */
TEST(misuse, routing_slots) {
    moe_config c;
    CHECK_INT(moe_routing_slots(NULL), 0);
    c = base(MOE_ROUTING_TOPK); CHECK_INT(moe_routing_slots(&c), 2);
    c = base(MOE_ROUTING_EXPERT_CHOICE); CHECK_INT(moe_routing_slots(&c), FE);
    c = base(MOE_ROUTING_DENSE); CHECK_INT(moe_routing_slots(&c), FE);
    c = base(MOE_ROUTING_SOFT); CHECK_INT(moe_routing_slots(&c), 0);
    c = base(MOE_ROUTING_TOPK); c.routing = (moe_routing)99; CHECK_INT(moe_routing_slots(&c), 0);
    c = base(MOE_ROUTING_TOPK); c.routing = (moe_routing)-1; CHECK_INT(moe_routing_slots(&c), 0);
}

/* --- moe_capacity ------------------------------------------------------------ */

/* NULL out, T < 0, E <= 0, K = 0, K > E, cf <= 0 / NaN / Inf, unknown formula;
   out untouched on failure. */
TEST(misuse, capacity_bad_args) {
    int32_t C = SENT_I;
    CHECK_STATUS(moe_capacity(MOE_CAPACITY_MEGATRON, 6, 4, 2, 1.0f, NULL), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_capacity(MOE_CAPACITY_MEGATRON, -1, 4, 2, 1.0f, &C), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(moe_capacity(MOE_CAPACITY_MEGATRON, 6, 0, 2, 1.0f, &C), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(moe_capacity(MOE_CAPACITY_MEGATRON, 6, -4, 2, 1.0f, &C), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(moe_capacity(MOE_CAPACITY_MEGATRON, 6, 4, 0, 1.0f, &C), MOE_STATUS_BAD_TOP_K);
    CHECK_STATUS(moe_capacity(MOE_CAPACITY_MEGATRON, 6, 4, -1, 1.0f, &C), MOE_STATUS_BAD_TOP_K);
    CHECK_STATUS(moe_capacity(MOE_CAPACITY_MEGATRON, 6, 4, 2, 0.0f, &C), MOE_STATUS_BAD_CAPACITY);
    CHECK_STATUS(moe_capacity(MOE_CAPACITY_MEGATRON, 6, 4, 2, -1.0f, &C), MOE_STATUS_BAD_CAPACITY);
    CHECK_STATUS(moe_capacity(MOE_CAPACITY_MEGATRON, 6, 4, 2, NAN, &C), MOE_STATUS_BAD_CAPACITY);
    CHECK_STATUS(moe_capacity(MOE_CAPACITY_MEGATRON, 6, 4, 2, INFINITY, &C), MOE_STATUS_BAD_CAPACITY);
    CHECK_STATUS(moe_capacity((moe_capacity_formula)99, 6, 4, 2, 1.0f, &C), MOE_STATUS_BAD_ENUM);
    CHECK_STATUS(moe_capacity((moe_capacity_formula)-1, 6, 4, 2, 1.0f, &C), MOE_STATUS_BAD_ENUM);
    CHECK_INT(C, SENT_I);
    {   /* K > E: no config can have it (BAD_TOP_K's own text: 1 <= top_k <= num_experts) */
        int32_t C2 = SENT_I;
        CHECK_STATUS(moe_capacity(MOE_CAPACITY_MEGATRON, 6, 4, 5, 1.0f, &C2), MOE_STATUS_BAD_TOP_K);
        CHECK_INT(C2, SENT_I);
    }
    /* docs/ROUTING.md, "Capacity": column S = 6, E = 4, k = 2, cf = 1 */
    CHECK_STATUS(moe_capacity(MOE_CAPACITY_MEGATRON, 6, 4, 2, 1.0f, &C), MOE_STATUS_OK);
    CHECK_INT(C, 3);
    CHECK_STATUS(moe_capacity(MOE_CAPACITY_FAIRSEQ_TOP2, 6, 4, 2, 1.0f, &C), MOE_STATUS_OK);
    CHECK_INT(C, 4);
    CHECK_STATUS(moe_capacity(MOE_CAPACITY_MEGATRON, 0, 4, 2, 1.0f, &C), MOE_STATUS_OK);   /* T = 0 valid */
    CHECK_INT(C, 0);
    CHECK_STATUS(moe_capacity(MOE_CAPACITY_MEGATRON, 2147483647, 1, 1, 1e30f, &C), MOE_STATUS_OK);
    CHECK_INT(C, 2147483647);   /* saturates, no UB */
}

/* --- size queries and moe_info_bind ----------------------------------------- */

/* NULL cfg / out, T < 0; out_bytes untouched on failure. */
TEST(misuse, size_queries_bad_args) {
    moe_config c = base(MOE_ROUTING_TOPK);
    size_t b = SENT_WS;
    CHECK_STATUS(moe_forward_workspace_size(NULL, FT, &b), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_forward_workspace_size(&c, FT, NULL), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_forward_workspace_size(&c, -1, &b), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(moe_route_workspace_size(NULL, FT, &b), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_route_workspace_size(&c, FT, NULL), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_route_workspace_size(&c, -1, &b), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(moe_info_size(NULL, FT, &b), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_info_size(&c, FT, NULL), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_info_size(&c, -1, &b), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(moe_info_size(&c, -2147483647 - 1, &b), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(moe_backward_workspace_size(NULL, FT, &b), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_backward_workspace_size(&c, FT, NULL), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_backward_workspace_size(&c, -1, &b), MOE_STATUS_BAD_DIMENSION);
    CHECK(b == SENT_WS);
}

/* Sizes that do not fit in size_t give SIZE_OVERFLOW, not a wrapped size. */
TEST(misuse, size_overflow) {
    moe_config c = base(MOE_ROUTING_TOPK);
    size_t b = SENT_WS;
    c.num_experts = 2147483647; c.top_k = 1; c.d_model = 2147483647; c.d_ff = 2147483647;
    CHECK_STATUS(moe_forward_workspace_size(&c, 2147483647, &b), MOE_STATUS_SIZE_OVERFLOW);
    CHECK_STATUS(moe_route_workspace_size(&c, 2147483647, &b), MOE_STATUS_SIZE_OVERFLOW);
    CHECK_STATUS(moe_info_size(&c, 2147483647, &b), MOE_STATUS_SIZE_OVERFLOW);
    CHECK_STATUS(moe_backward_workspace_size(&c, 2147483647, &b), MOE_STATUS_SIZE_OVERFLOW);
    {
        float y1[1] = {SENT_F};
        CHECK_STATUS(moe_forward_alloc(&c, &fx()->w, fx()->x, 2147483647, y1, NULL), MOE_STATUS_SIZE_OVERFLOW);
        CHECK(y1[0] == SENT_F);
    }
    CHECK(b == SENT_WS);
}

/* Soft MoE with E * P beyond int32: the slot count R cannot be represented,
   so every call refuses the config (BAD_DIMENSION) instead of computing R
   with a signed overflow (UBSan would report it). */
TEST(misuse, soft_slot_count_overflow) {
    moe_config c = base(MOE_ROUTING_SOFT);
    c.num_experts = 65536; c.slots_per_expert = 65536;
    EXPECT_CFG("soft E * P = 2^32", c, MOE_STATUS_BAD_DIMENSION);
    c.num_experts = 46341; c.slots_per_expert = 46341;   /* just above INT32_MAX */
    EXPECT_CFG("soft E * P > INT32_MAX", c, MOE_STATUS_BAD_DIMENSION);
}

/* moe_info_bind: NULL args, T < 0, bad config, one byte short -> TOO_SMALL
   with workspace_required = moe_info_size; pointers untouched on failure.
   A misaligned buffer of exactly the size query binds inside the buffer. */
TEST(misuse, info_bind) {
    moe_config c = base(MOE_ROUTING_SOFT), bad = base(MOE_ROUTING_TOPK);
    moe_info info, ref;
    size_t need = 0;
    unsigned char *buf;
    int r;
    memset(&ref, SENT_B, sizeof ref);
    CHECK_STATUS(moe_info_size(&c, FT, &need), MOE_STATUS_OK);
    buf = (unsigned char *)malloc(need + 1);
    info = ref;
    CHECK_STATUS(moe_info_bind(NULL, FT, &info, buf, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_info_bind(&c, FT, NULL, buf, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_info_bind(&c, FT, &info, NULL, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_info_bind(&c, -1, &info, buf, need), MOE_STATUS_BAD_DIMENSION);
    bad.top_k = 0;
    CHECK_STATUS(moe_info_bind(&bad, FT, &info, buf, need), MOE_STATUS_BAD_TOP_K);
    CHECK(memcmp(&info, &ref, sizeof info) == 0);
    CHECK_STATUS(moe_info_bind(&c, FT, &info, buf, need - 1), MOE_STATUS_WORKSPACE_TOO_SMALL);
    CHECK(info.workspace_required == need);
    info.workspace_required = ref.workspace_required;
    CHECK(memcmp(&info, &ref, sizeof info) == 0);
    for (r = 0; r < 2 * (MOE_ROUTING_SOFT + 1); r++) {   /* every array inside [buf+1, buf+1+need) */
        moe_config k = base((moe_routing)(r / 2));
        const int train = r % 2;
        size_t TR, TS, E = FE, N;
        unsigned char *lo = buf + 1, *hi;
        if (train) { k.save_for_backward = 1; k.shared_d_ff = FS; }   /* binds the backward cache too */
        CHECK_STATUS(moe_info_size(&k, FT, &need), MOE_STATUS_OK);
        free(buf);
        buf = (unsigned char *)malloc(need + 1);
        lo = buf + 1; hi = lo + need;
        CHECK_STATUS(moe_info_bind(&k, FT, &info, lo, need), MOE_STATUS_OK);
        TR = (size_t)FT * (k.routing == MOE_ROUTING_SOFT ? FR : FE);
        TS = (size_t)FT * (size_t)moe_routing_slots(&k);
        N = k.routing == MOE_ROUTING_SOFT ? FR : k.routing == MOE_ROUTING_EXPERT_CHOICE ? (size_t)FE * 2 : TS;
#define INSIDE(p, n) ((p) && (unsigned char *)(p) >= lo && (unsigned char *)((p) + (n)) <= hi && \
                      ((uintptr_t)(p) % 64) == 0)
        CHECK(INSIDE(info.logits, TR));
        CHECK(INSIDE(info.scores, TR));
        CHECK(k.routing == MOE_ROUTING_SOFT ? INSIDE(info.dispatch, TR) : info.dispatch == NULL);
        CHECK(INSIDE(info.expert, TS));
        CHECK(INSIDE(info.weight, TS));
        CHECK(INSIDE(info.dropped, TS));
        CHECK(INSIDE(info.expert_routed, E));
        CHECK(INSIDE(info.expert_kept, E));
        if (train) {   /* [N][F] hidden and up, [N][D] out; shared [T][Fs], [T][D] */
            CHECK(INSIDE(info.cache_hidden, N * FF));
            CHECK(INSIDE(info.cache_up, N * FF));
            CHECK(INSIDE(info.cache_out, N * FD));
            CHECK(INSIDE(info.cache_shared_hidden, (size_t)FT * FS));
            CHECK(INSIDE(info.cache_shared_up, (size_t)FT * FS));
            CHECK(INSIDE(info.cache_shared_out, (size_t)FT * FD));
        } else {
            CHECK(!info.cache_hidden && !info.cache_up && !info.cache_out);
            CHECK(!info.cache_shared_hidden && !info.cache_shared_up && !info.cache_shared_out);
        }
#undef INSIDE
    }
    free(buf);
}

/* --- moe_forward / moe_forward_alloc ------------------------------------------ */

/* NULL cfg, w, x, y (T > 0); info may be NULL. Nothing written on failure. */
TEST(misuse, forward_null_arguments) {
    fixture *f = fx();
    moe_config c = base(MOE_ROUTING_TOPK);
    static outbuf o;
    EXPECT_FAIL("cfg NULL", NULL, &f->w, f->x, MOE_STATUS_NULL_ARGUMENT, 1);
    EXPECT_FAIL("w NULL", &c, NULL, f->x, MOE_STATUS_NULL_ARGUMENT, 0);
    EXPECT_FAIL("x NULL", &c, &f->w, NULL, MOE_STATUS_NULL_ARGUMENT, 0);
    arm(&o, 0);
    CHECK_STATUS(fwd(&c, &f->w, f->x, FT, NULL, &o.info), MOE_STATUS_NULL_ARGUMENT);
    CHECK(untouched(&o));
    CHECK_STATUS(moe_forward_alloc(&c, &f->w, f->x, FT, NULL, &o.info), MOE_STATUS_NULL_ARGUMENT);
    CHECK(untouched(&o));
    CHECK_STATUS(fwd(&c, &f->w, f->x, FT, o.y + GUARD, NULL), MOE_STATUS_OK);   /* info optional */
    CHECK(guards_ok(&o, FT * FD, 0, 0, 0));
}

/* T < 0 is BAD_DIMENSION everywhere, before anything is read. */
TEST(misuse, negative_tokens) {
    fixture *f = fx();
    moe_config c = base(MOE_ROUTING_TOPK);
    static outbuf o;
    arm(&o, 0);
    CHECK_STATUS(fwd(&c, &f->w, f->x, -1, o.y + GUARD, &o.info), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(moe_forward_alloc(&c, &f->w, f->x, -1, o.y + GUARD, &o.info), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(route(&c, &f->w, f->logits, NULL, -1, &o.info), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(fwd(&c, &f->w, f->x, -2147483647 - 1, o.y + GUARD, &o.info), MOE_STATUS_BAD_DIMENSION);
    CHECK(untouched(&o));
}

/* Each weight the config needs, NULL in turn -> MISSING_WEIGHT; tensors the
   config does not use may be NULL. */
TEST(misuse, missing_weights) {
    typedef struct { const char *what; int cfg; size_t field; } miss;
    enum { TOPK, RELU, FUSED, RBIAS, SBIAS, NOISE, NOISE_TRAIN, EBIAS, EBIAS_RELU, SHARED, SHARED_RELU,
           SHARED_BIAS, SHARED_GATE, SOFT, EC, DENSE, NCFG };
#define W(f) offsetof(moe_weights, f)
    static const miss cases[] = {
        {"router", TOPK, W(router)}, {"gate", TOPK, W(gate)}, {"up (GLU)", TOPK, W(up)},
        {"down", TOPK, W(down)}, {"relu gate", RELU, W(gate)}, {"relu down", RELU, W(down)},
        {"fused gate", FUSED, W(gate)}, {"fused down", FUSED, W(down)},
        {"router_bias", RBIAS, W(router_bias)}, {"selection_bias", SBIAS, W(selection_bias)},
        {"router_noise (inference)", NOISE, W(router_noise)},
        {"router_noise (training)", NOISE_TRAIN, W(router_noise)},
        {"gate_bias", EBIAS, W(gate_bias)}, {"up_bias", EBIAS, W(up_bias)},
        {"down_bias", EBIAS, W(down_bias)}, {"relu gate_bias", EBIAS_RELU, W(gate_bias)},
        {"relu down_bias", EBIAS_RELU, W(down_bias)},
        {"shared_gate", SHARED, W(shared_gate)}, {"shared_up", SHARED, W(shared_up)},
        {"shared_down", SHARED, W(shared_down)}, {"relu shared_gate", SHARED_RELU, W(shared_gate)},
        {"relu shared_down", SHARED_RELU, W(shared_down)},
        {"shared_gate_bias", SHARED_BIAS, W(shared_gate_bias)},
        {"shared_up_bias", SHARED_BIAS, W(shared_up_bias)},
        {"shared_down_bias", SHARED_BIAS, W(shared_down_bias)},
        {"shared_expert_gate", SHARED_GATE, W(shared_expert_gate)},
        {"soft_phi", SOFT, W(soft_phi)}, {"soft gate", SOFT, W(gate)}, {"soft down", SOFT, W(down)},
        {"EC router", EC, W(router)}, {"EC down", EC, W(down)}, {"dense router", DENSE, W(router)},
        {"dense up", DENSE, W(up)},
    };
    /* tensors each config does not read: NULL is fine */
    static const miss unused[] = {
        {"relu up", RELU, W(up)}, {"fused up", FUSED, W(up)}, {"relu up_bias", EBIAS_RELU, W(up_bias)},
        {"relu shared_up", SHARED_RELU, W(shared_up)}, {"soft router", SOFT, W(router)},
        {"soft scale", SOFT, W(soft_scale)}, {"ungated shared_expert_gate", SHARED, W(shared_expert_gate)},
        {"unused router_bias", TOPK, W(router_bias)}, {"unused phi", TOPK, W(soft_phi)},
        {"unused shared_gate", TOPK, W(shared_gate)}, {"unused biases", TOPK, W(gate_bias)},
    };
#undef W
    fixture *f = fx();
    static outbuf o;
    size_t i;
    for (i = 0; i < sizeof cases / sizeof cases[0] + sizeof unused / sizeof unused[0]; i++) {
        const int is_case = i < sizeof cases / sizeof cases[0];
        const miss *m = is_case ? &cases[i] : &unused[i - sizeof cases / sizeof cases[0]];
        moe_config c = base(MOE_ROUTING_TOPK);
        moe_weights w = f->w;
        switch (m->cfg) {
        case RELU: c.activation = MOE_ACT_RELU; break;
        case FUSED: w.gate_up_fused = 1; w.up = NULL; break;
        case RBIAS: c.router_bias = 1; break;
        case SBIAS: c.selection_bias = 1; c.score = MOE_SCORE_SIGMOID; break;
        case NOISE: c.noise = MOE_NOISE_SHAZEER; break;
        case NOISE_TRAIN: c.noise = MOE_NOISE_SHAZEER; c.training = 1; break;
        case EBIAS: c.expert_bias = 1; break;
        case EBIAS_RELU: c.expert_bias = 1; c.activation = MOE_ACT_RELU; break;
        case SHARED: c.shared_d_ff = FS; break;
        case SHARED_RELU: c.shared_d_ff = FS; c.activation = MOE_ACT_RELU; break;
        case SHARED_BIAS: c.shared_d_ff = FS; c.expert_bias = 1; break;
        case SHARED_GATE: c.shared_d_ff = FS; c.shared_expert_gated = 1; break;
        case SOFT: c = base(MOE_ROUTING_SOFT); c.activation = MOE_ACT_GELU; break;
        case EC: c = base(MOE_ROUTING_EXPERT_CHOICE); break;
        case DENSE: c = base(MOE_ROUTING_DENSE); break;
        default: break;
        }
        *(const float **)(void *)((char *)&w + m->field) = NULL;
        if (is_case) {
            EXPECT_FAIL(m->what, &c, &w, f->x, MOE_STATUS_MISSING_WEIGHT, 0);
        } else {
            arm(&o, c.routing == MOE_ROUTING_SOFT);
            EXPECT_STATUS(m->what, fwd(&c, &w, f->x, FT, o.y + GUARD, &o.info), MOE_STATUS_OK);
            CHECK(all_finite(o.y + GUARD, FT * FD));
        }
    }
    /* missing weights are reported even for T = 0 (the config is unusable) */
    {
        moe_config c = base(MOE_ROUTING_TOPK);
        moe_weights w = f->w;
        w.down = NULL;
        arm(&o, 0);
        CHECK_STATUS(fwd(&c, &w, NULL, 0, NULL, &o.info), MOE_STATUS_MISSING_WEIGHT);
        CHECK(untouched(&o));
    }
}

/* Workspace NULL -> NULL_ARGUMENT; one byte short or 0 bytes -> TOO_SMALL and
   info.workspace_required = the size query; nothing else written. */
TEST(misuse, forward_workspace) {
    fixture *f = fx();
    static outbuf o;
    int r;
    for (r = 0; r <= MOE_ROUTING_SOFT; r++) {
        moe_config c = base((moe_routing)r);
        size_t need = 0;
        unsigned char *ws;
        CHECK_STATUS(moe_forward_workspace_size(&c, FT, &need), MOE_STATUS_OK);
        ws = (unsigned char *)malloc(need);
        arm(&o, 1);
        CHECK_STATUS(moe_forward(&c, &f->w, f->x, FT, o.y + GUARD, &o.info, NULL, need), MOE_STATUS_NULL_ARGUMENT);
        CHECK(untouched(&o) && o.info.workspace_required == SENT_WS);
        CHECK_STATUS(moe_forward(&c, &f->w, f->x, FT, o.y + GUARD, &o.info, ws, need - 1),
                     MOE_STATUS_WORKSPACE_TOO_SMALL);
        CHECK(o.info.workspace_required == need);
        CHECK(untouched(&o));
        arm(&o, 1);
        CHECK_STATUS(moe_forward(&c, &f->w, f->x, FT, o.y + GUARD, &o.info, ws, 0), MOE_STATUS_WORKSPACE_TOO_SMALL);
        CHECK(o.info.workspace_required == need);
        CHECK(untouched(&o));
        arm(&o, 1);
        CHECK_STATUS(moe_forward(&c, &f->w, f->x, FT, o.y + GUARD, NULL, ws, need - 1),
                     MOE_STATUS_WORKSPACE_TOO_SMALL);   /* info NULL: nowhere to report, no crash */
        CHECK(untouched(&o));
        CHECK_STATUS(moe_forward(&c, &f->w, f->x, FT, o.y + GUARD, &o.info, ws, need), MOE_STATUS_OK);
        free(ws);
    }
}

/* NaN / +-Inf in x, router weights, router bias, selection bias, noise
   weights (training) and Soft MoE phi -> NONFINITE with nothing written. */
TEST(misuse, forward_nonfinite) {
    static const float bad[3] = {NAN, INFINITY, -INFINITY};
    static const char *names[3] = {"NaN", "+Inf", "-Inf"};
    fixture *f = fx();
    float x[FT * FD], router[FE * FD], rb[FE], sb[FE], rn[FE * FD], phi[FR * FD];
    char what[96];
    int b, r;
    for (b = 0; b < 3; b++) {
        for (r = 0; r <= MOE_ROUTING_SOFT; r++) {   /* x, every family */
            moe_config c = base((moe_routing)r);
            memcpy(x, f->x, sizeof x);
            x[FD + 2] = bad[b];
            snprintf(what, sizeof what, "%s in x, routing %d", names[b], r);
            EXPECT_FAIL(what, &c, &f->w, x, MOE_STATUS_NONFINITE, 0);
            if (r != MOE_ROUTING_SOFT) {               /* router weights */
                moe_weights w = f->w;
                memcpy(router, f->router, sizeof router);
                router[2 * FD + 1] = bad[b];
                w.router = router;
                snprintf(what, sizeof what, "%s in router, routing %d", names[b], r);
                EXPECT_FAIL(what, &c, &w, f->x, MOE_STATUS_NONFINITE, 0);
            }
        }
        {   /* router bias */
            moe_config c = base(MOE_ROUTING_TOPK);
            moe_weights w = f->w;
            c.router_bias = 1;
            memcpy(rb, f->router_bias, sizeof rb);
            rb[3] = bad[b];
            w.router_bias = rb;
            snprintf(what, sizeof what, "%s in router_bias", names[b]);
            EXPECT_FAIL(what, &c, &w, f->x, MOE_STATUS_NONFINITE, 0);
        }
        for (r = 0; r < 2; r++) {   /* selection bias: top-k (sigmoid) and expert choice */
            moe_config c = base(r ? MOE_ROUTING_EXPERT_CHOICE : MOE_ROUTING_TOPK);
            moe_weights w = f->w;
            c.selection_bias = 1; c.score = MOE_SCORE_SIGMOID;
            memcpy(sb, f->sel_bias, sizeof sb);
            sb[1] = bad[b];
            w.selection_bias = sb;
            snprintf(what, sizeof what, "%s in selection_bias, routing %d", names[b], r);
            EXPECT_FAIL(what, &c, &w, f->x, MOE_STATUS_NONFINITE, 0);
        }
        {   /* Shazeer noise weights, training */
            moe_config c = base(MOE_ROUTING_TOPK);
            moe_weights w = f->w;
            c.noise = MOE_NOISE_SHAZEER; c.training = 1;
            memcpy(rn, f->router_noise, sizeof rn);
            rn[5] = bad[b];
            w.router_noise = rn;
            snprintf(what, sizeof what, "%s in router_noise", names[b]);
            EXPECT_FAIL(what, &c, &w, f->x, MOE_STATUS_NONFINITE, 0);
        }
        {   /* Soft MoE slot parameters */
            moe_config c = base(MOE_ROUTING_SOFT);
            moe_weights w = f->w;
            memcpy(phi, f->phi, sizeof phi);
            phi[7] = bad[b];
            w.soft_phi = phi;
            snprintf(what, sizeof what, "%s in soft_phi", names[b]);
            EXPECT_FAIL(what, &c, &w, f->x, MOE_STATUS_NONFINITE, 0);
        }
    }
}

/* Expert weights are not scanned (documented): a NaN there reaches y, status OK. */
TEST(misuse, nonfinite_expert_weight_propagates) {
    fixture *f = fx();
    moe_config c = base(MOE_ROUTING_DENSE);
    moe_weights w = f->w;
    float down[FE * FD * FF];
    static outbuf o;
    int e;
    memcpy(down, f->down, sizeof down);
    for (e = 0; e < FE; e++) down[(size_t)e * FD * FF] = NAN;   /* row d = 0 of every expert */
    w.down = down;
    arm(&o, 0);
    CHECK_STATUS(fwd(&c, &w, f->x, FT, o.y + GUARD, &o.info), MOE_STATUS_OK);
    CHECK(o.y[GUARD] != o.y[GUARD]);
    CHECK(guards_ok(&o, FT * FD, FT * FE, FT * FE, FE));
}

/* ... and through every activation: a NaN pre-activation gives a NaN y, as
   torch.relu(NaN) is NaN (ReLU once wrote 0 for it: a finite y, status OK). */
TEST(misuse, nonfinite_preactivation_propagates) {
    fixture *f = fx();
    moe_config c = base(MOE_ROUTING_DENSE);
    moe_weights w = f->w;
    float gate[FE * FF * FD];
    static outbuf o;
    int e, a, i;
    memcpy(gate, f->gate, sizeof gate);
    for (e = 0; e < FE; e++)   /* row f = 0 of every expert: h_0 = NaN for every token */
        for (i = 0; i < FD; i++) gate[(size_t)e * FF * FD + (size_t)i] = NAN;
    w.gate = gate;
    for (a = 0; a <= (int)MOE_ACT_SILU; a++) {
        int nan_elems = 0;
        c.activation = (moe_activation)a;
        arm(&o, 0);
        CHECK_STATUS(fwd(&c, &w, f->x, FT, o.y + GUARD, &o.info), MOE_STATUS_OK);
        for (i = 0; i < FT * FD; i++) nan_elems += o.y[GUARD + i] != o.y[GUARD + i];
        CHECK_INT(nan_elems, FT * FD);
        CHECK(guards_ok(&o, FT * FD, FT * FE, FT * FE, FE));
    }
}

/* --- moe_route ---------------------------------------------------------------- */

/* NULL cfg / info / logits (T > 0) / noise logits (training Shazeer) /
   workspace; w NULL only when selection_bias is off. */
TEST(misuse, route_null_and_missing) {
    fixture *f = fx();
    moe_config c = base(MOE_ROUTING_TOPK), n = base(MOE_ROUTING_TOPK), s = base(MOE_ROUTING_TOPK);
    static outbuf o;
    size_t need = 0;
    void *ws;
    n.noise = MOE_NOISE_SHAZEER; n.training = 1;
    s.selection_bias = 1; s.score = MOE_SCORE_SIGMOID;
    CHECK_STATUS(moe_route_workspace_size(&n, FT, &need), MOE_STATUS_OK);
    ws = malloc(need);
    arm(&o, 0);
    CHECK_STATUS(moe_route(NULL, &f->w, f->logits, NULL, FT, &o.info, ws, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_route(&c, &f->w, f->logits, NULL, FT, NULL, ws, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_route(&c, &f->w, NULL, NULL, FT, &o.info, ws, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_route(&n, &f->w, f->logits, NULL, FT, &o.info, ws, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_route(&c, &f->w, f->logits, NULL, FT, &o.info, NULL, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_route(&s, NULL, f->logits, NULL, FT, &o.info, ws, need), MOE_STATUS_MISSING_WEIGHT);
    {
        moe_weights w = f->w;
        w.selection_bias = NULL;
        CHECK_STATUS(moe_route(&s, &w, f->logits, NULL, FT, &o.info, ws, need), MOE_STATUS_MISSING_WEIGHT);
    }
    CHECK(untouched(&o));
    CHECK(o.info.workspace_required == SENT_WS);
    CHECK_STATUS(moe_route(&c, NULL, f->logits, NULL, FT, &o.info, ws, need), MOE_STATUS_OK);
    n.training = 0;   /* noise logits unused at inference */
    CHECK_STATUS(moe_route(&n, NULL, f->logits, NULL, FT, &o.info, ws, need), MOE_STATUS_OK);
    free(ws);
}

/* Workspace one byte short -> TOO_SMALL with workspace_required = the query. */
TEST(misuse, route_workspace) {
    fixture *f = fx();
    static outbuf o;
    int r;
    for (r = 0; r <= MOE_ROUTING_SOFT; r++) {
        moe_config c = base((moe_routing)r);
        size_t need = 0;
        void *ws;
        CHECK_STATUS(moe_route_workspace_size(&c, FT, &need), MOE_STATUS_OK);
        ws = malloc(need);
        arm(&o, r == MOE_ROUTING_SOFT);
        CHECK_STATUS(moe_route(&c, NULL, f->logits, NULL, FT, &o.info, ws, need - 1), MOE_STATUS_WORKSPACE_TOO_SMALL);
        CHECK(o.info.workspace_required == need);
        CHECK(untouched(&o));
        CHECK_STATUS(moe_route(&c, NULL, f->logits, NULL, FT, &o.info, ws, need), MOE_STATUS_OK);
        free(ws);
    }
}

/* NaN / Inf logits, noise logits (training) and selection bias -> NONFINITE. */
TEST(misuse, route_nonfinite) {
    static const float bad[3] = {NAN, INFINITY, -INFINITY};
    fixture *f = fx();
    float lg[FMAX], nl[FT * FE], sb[FE];
    static outbuf o;
    int b, r;
    for (b = 0; b < 3; b++) {
        for (r = 0; r <= MOE_ROUTING_SOFT; r++) {
            moe_config c = base((moe_routing)r);
            memcpy(lg, f->logits, sizeof lg);
            lg[FMAX / FT + 1] = bad[b];   /* token 1 (row of E or E*P columns) */
            arm(&o, r == MOE_ROUTING_SOFT);
            CHECK_STATUS(route(&c, NULL, lg, NULL, FT, &o.info), MOE_STATUS_NONFINITE);
            CHECK(untouched(&o));
        }
        {
            moe_config c = base(MOE_ROUTING_TOPK);
            c.noise = MOE_NOISE_SHAZEER; c.training = 1;
            memcpy(nl, f->noise_logits, sizeof nl);
            nl[2] = bad[b];
            arm(&o, 0);
            CHECK_STATUS(route(&c, NULL, f->logits, nl, FT, &o.info), MOE_STATUS_NONFINITE);
            CHECK(untouched(&o));
            c.training = 0;   /* inference ignores the noise logits */
            CHECK_STATUS(route(&c, NULL, f->logits, nl, FT, &o.info), MOE_STATUS_OK);
        }
        {
            moe_config c = base(MOE_ROUTING_TOPK);
            moe_weights w = f->w;
            c.selection_bias = 1; c.score = MOE_SCORE_SIGMOID;
            memcpy(sb, f->sel_bias, sizeof sb);
            sb[0] = bad[b];
            w.selection_bias = sb;
            arm(&o, 0);
            CHECK_STATUS(route(&c, &w, f->logits, NULL, FT, &o.info), MOE_STATUS_NONFINITE);
            CHECK(untouched(&o));
        }
    }
}

/* --- T = 0 ------------------------------------------------------------------- */

/* T = 0 is a valid no-op for every family: OK, y untouched (or NULL), zero stats. */
TEST(misuse, zero_tokens_noop) {
    fixture *f = fx();
    static outbuf o;
    int r;
    for (r = 0; r <= MOE_ROUTING_SOFT; r++) {
        moe_config c = base((moe_routing)r);
        size_t need = 0;
        void *ws;
        CHECK_STATUS(moe_forward_workspace_size(&c, 0, &need), MOE_STATUS_OK);
        ws = malloc(need);
        arm(&o, r == MOE_ROUTING_SOFT);
        CHECK_STATUS(moe_forward(&c, &f->w, NULL, 0, NULL, NULL, ws, need), MOE_STATUS_OK);
        CHECK_STATUS(moe_forward(&c, &f->w, f->x, 0, o.y + GUARD, &o.info, ws, need), MOE_STATUS_OK);
        CHECK(f_all(o.y, sizeof o.y / sizeof(float), SENT_F));
        CHECK(guards_ok(&o, 0, 0, 0, FE));
        CHECK_INT(o.info.dropped_pairs, 0);
        CHECK_INT(o.info.dropped_tokens, 0);
        CHECK(o.info.aux_total == 0.0f);
        CHECK_STATUS(moe_forward_alloc(&c, &f->w, NULL, 0, NULL, NULL), MOE_STATUS_OK);
        CHECK_STATUS(moe_forward_alloc(&c, &f->w, f->x, 0, o.y + GUARD, &o.info), MOE_STATUS_OK);
        CHECK(f_all(o.y, sizeof o.y / sizeof(float), SENT_F));
        free(ws);
        CHECK_STATUS(moe_route_workspace_size(&c, 0, &need), MOE_STATUS_OK);
        ws = malloc(need);
        CHECK_STATUS(moe_route(&c, NULL, NULL, NULL, 0, &o.info, ws, need), MOE_STATUS_OK);
        free(ws);
    }
}

/* --- guard zones on successful calls ------------------------------------------ */

/* Successful forward and route calls write exactly their T*D / T*R / T*S / E
   elements (and, training, the N-row cache): guards on both sides of every
   buffer stay intact. */
TEST(misuse, guard_zones_untouched) {
    fixture *f = fx();
    static outbuf o;
    int r, v;
    for (r = 0; r <= MOE_ROUTING_SOFT; r++)
        for (v = 0; v < 3; v++) {   /* 0 plain, 1 training + shared, 2 training + drops */
            moe_config c = base((moe_routing)r);
            const int soft = r == MOE_ROUTING_SOFT;
            size_t TR = (size_t)FT * (soft ? FR : FE), TS, N;
            if (v) {
                c.training = 1; c.save_for_backward = 1;
                c.shared_d_ff = FS; c.shared_expert_gated = 1;
            }
            if (v == 2 && r == MOE_ROUTING_TOPK) c.capacity = 1;
            if (v == 2 && r == MOE_ROUTING_EXPERT_CHOICE) { c.capacity = 0; c.capacity_factor = 1.0f; }
            if (v == 2 && soft) { c.slots_per_expert = 1; TR = (size_t)FT * FE; }
            TS = (size_t)FT * (size_t)moe_routing_slots(&c);
            N = soft ? TR / FT : r == MOE_ROUTING_EXPERT_CHOICE ? (size_t)FE * (v == 2 ? 1 : 2) : TS;
            arm(&o, soft);
            CHECK_STATUS(fwd(&c, &f->w, f->x, FT, o.y + GUARD, &o.info), MOE_STATUS_OK);
            CHECK(guards_ok(&o, FT * FD, TR, TS, FE));
            CHECK(cache_guards_ok(&o, v ? N : 0, FF, v ? FS : 0));
            CHECK(all_finite(o.y + GUARD, FT * FD));
            arm(&o, soft);
            CHECK_STATUS(moe_forward_alloc(&c, &f->w, f->x, FT, o.y + GUARD, &o.info), MOE_STATUS_OK);
            CHECK(guards_ok(&o, FT * FD, TR, TS, FE));
            CHECK(cache_guards_ok(&o, v ? N : 0, FF, v ? FS : 0));
            arm(&o, soft);
            CHECK_STATUS(route(&c, NULL, f->logits, NULL, FT, &o.info), MOE_STATUS_OK);
            CHECK(guards_ok(&o, 0, TR, TS, FE));
            CHECK(f_all(o.y, sizeof o.y / sizeof(float), SENT_F));
        }
}

/* info.dispatch is documented "unused" outside Soft MoE: a caller buffer
   bound there must not be written by top-k, expert-choice or dense routing. */
TEST(misuse, dispatch_untouched_outside_soft) {
    fixture *f = fx();
    static outbuf o;
    int r;
    for (r = 0; r < MOE_ROUTING_SOFT; r++) {
        moe_config c = base((moe_routing)r);
        size_t need = 0;
        void *ws;
        arm(&o, 1);
        CHECK_STATUS(fwd(&c, &f->w, f->x, FT, o.y + GUARD, &o.info), MOE_STATUS_OK);
        if (!f_all(o.dispatch, GUARD + FMAX + GUARD, SENT_F))
            moe_test_fail(__FILE__, __LINE__, "moe_forward wrote info.dispatch for routing %d", r);
        /* moe_route: a workspace larger than the claimed size, so a read past
           the claimed end stays inside the allocation and only the write shows */
        CHECK_STATUS(moe_route_workspace_size(&c, FT, &need), MOE_STATUS_OK);
        ws = calloc(4, need);
        arm(&o, 1);
        CHECK_STATUS(moe_route(&c, NULL, f->logits, NULL, FT, &o.info, ws, need), MOE_STATUS_OK);
        if (!f_all(o.dispatch, GUARD + FMAX + GUARD, SENT_F))
            moe_test_fail(__FILE__, __LINE__, "moe_route wrote info.dispatch for routing %d", r);
        free(ws);
    }
}

/* --- moe_selection_bias_update ------------------------------------------------ */

/* NULL load / bias, E <= 0, gamma < 0 / NaN / Inf; bias untouched on failure. */
TEST(misuse, selection_bias_update_bad_args) {
    int32_t load[4] = {1, 2, 3, 4};
    float bias[4] = {SENT_F, SENT_F, SENT_F, SENT_F};
    CHECK_STATUS(moe_selection_bias_update(4, NULL, 1e-3f, bias), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_selection_bias_update(4, load, 1e-3f, NULL), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_selection_bias_update(0, load, 1e-3f, bias), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(moe_selection_bias_update(-1, load, 1e-3f, bias), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(moe_selection_bias_update(4, load, -1e-3f, bias), MOE_STATUS_BAD_OPTION);
    CHECK_STATUS(moe_selection_bias_update(4, load, NAN, bias), MOE_STATUS_BAD_OPTION);
    CHECK_STATUS(moe_selection_bias_update(4, load, INFINITY, bias), MOE_STATUS_BAD_OPTION);
    CHECK(f_all(bias, 4, SENT_F));
    CHECK_STATUS(moe_selection_bias_update(4, load, 0.0f, bias), MOE_STATUS_OK);   /* gamma 0: no-op */
    CHECK(f_all(bias, 4, SENT_F));
}

/* --- moe_backward ------------------------------------------------------------ */

/* A forward of (c, w, x; c saves for the backward) into an info bound by moe_info_bind. */
static void *train_forward(const moe_config *c, const moe_weights *w, moe_info *info) {
    size_t need = 0;
    void *buf;
    float y[FT * FD];
    CHECK_STATUS(moe_info_size(c, FT, &need), MOE_STATUS_OK);
    buf = malloc(need);
    memset(info, 0, sizeof *info);
    CHECK_STATUS(moe_info_bind(c, FT, info, buf, need), MOE_STATUS_OK);
    CHECK_STATUS(moe_forward_alloc(c, w, fx()->x, FT, y, info), MOE_STATUS_OK);
    return buf;
}

/* NULL cfg, w, info, grads, x and dy (T > 0), workspace -> NULL_ARGUMENT;
   dx may be NULL; nothing written on failure. */
TEST(misuse, backward_null_arguments) {
    fixture *f = fx();
    moe_config c = base(MOE_ROUTING_TOPK);
    static gradbuf gb;
    moe_info info;
    size_t need = 0;
    void *buf, *ws;
    c.training = 1; c.save_for_backward = 1;
    buf = train_forward(&c, &f->w, &info);
    CHECK_STATUS(moe_backward_workspace_size(&c, FT, &need), MOE_STATUS_OK);
    ws = malloc(need);
    garm(&gb);
    CHECK_STATUS(moe_backward(NULL, &f->w, f->x, FT, &info, f->x, gb.dx + GUARD, &gb.g, ws, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_backward(&c, NULL, f->x, FT, &info, f->x, gb.dx + GUARD, &gb.g, ws, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_backward(&c, &f->w, NULL, FT, &info, f->x, gb.dx + GUARD, &gb.g, ws, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_backward(&c, &f->w, f->x, FT, NULL, f->x, gb.dx + GUARD, &gb.g, ws, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_backward(&c, &f->w, f->x, FT, &info, NULL, gb.dx + GUARD, &gb.g, ws, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_backward(&c, &f->w, f->x, FT, &info, f->x, gb.dx + GUARD, NULL, ws, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_backward(&c, &f->w, f->x, FT, &info, f->x, gb.dx + GUARD, &gb.g, NULL, need), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_backward_alloc(&c, &f->w, f->x, FT, &info, NULL, gb.dx + GUARD, &gb.g), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_backward(&c, &f->w, f->x, -1, &info, f->x, gb.dx + GUARD, &gb.g, ws, need), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(moe_backward_alloc(&c, &f->w, f->x, -1, &info, f->x, gb.dx + GUARD, &gb.g), MOE_STATUS_BAD_DIMENSION);
    CHECK(g_untouched(&gb));
    CHECK_STATUS(moe_backward(&c, &f->w, f->x, FT, &info, f->x, NULL, &gb.g, ws, need), MOE_STATUS_OK);
    CHECK(f_all(gb.dx, sizeof gb.dx / sizeof(float), SENT_F));   /* dx NULL: not wanted */
    CHECK(g_guards_ok(&gb, 0));
    free(ws); free(buf);
}

/* The info must hold what the backward reads: each needed array NULL in turn
   (or a forward bound without the cache) -> MISSING_CACHE; recompute = 1
   needs no activation cache. */
TEST(misuse, backward_missing_cache) {
    fixture *f = fx();
    static gradbuf gb;
    int r;
    for (r = 0; r <= MOE_ROUTING_SOFT; r++) {
        moe_config c = base((moe_routing)r), plain;
        moe_info info, bad;
        void *buf, *buf2;
        size_t k;
        const int soft = r == MOE_ROUTING_SOFT;
        c.training = 1; c.save_for_backward = 1; c.shared_d_ff = FS;
        buf = train_forward(&c, &f->w, &info);
        garm(&gb);
        CHECK_STATUS(bwd(&c, &f->w, f->x, FT, &info, f->x, gb.dx + GUARD, &gb.g), MOE_STATUS_OK);
        CHECK(g_guards_ok(&gb, FT * FD));
        for (k = 0; k < 11; k++) {
            bad = info;
            switch (k) {
            case 0: bad.logits = NULL; break;
            case 1: bad.scores = NULL; break;
            case 2: if (soft) bad.dispatch = NULL; else bad.expert = NULL; break;
            case 3: if (soft) continue; bad.weight = NULL; break;
            case 4: if (soft) continue; bad.dropped = NULL; break;
            case 5: bad.cache_hidden = NULL; break;
            case 6: bad.cache_up = NULL; break;   /* SwiGLU */
            case 7: bad.cache_out = NULL; break;
            case 8: bad.cache_shared_hidden = NULL; break;
            case 9: bad.cache_shared_up = NULL; break;
            default: bad.cache_shared_out = NULL; break;
            }
            garm(&gb);
            if (bwd(&c, &f->w, f->x, FT, &bad, f->x, gb.dx + GUARD, &gb.g) != MOE_STATUS_MISSING_CACHE)
                moe_test_fail(__FILE__, __LINE__, "routing %d, array %d NULL: not MISSING_CACHE", r, (int)k);
            CHECK(g_untouched(&gb));
        }
        plain = c; plain.recompute = 1;   /* info bound without the cache */
        buf2 = train_forward(&plain, &f->w, &bad);
        garm(&gb);
        CHECK_STATUS(bwd(&c, &f->w, f->x, FT, &bad, f->x, gb.dx + GUARD, &gb.g), MOE_STATUS_MISSING_CACHE);
        CHECK(g_untouched(&gb));
        /* recompute: the routing arrays suffice */
        CHECK_STATUS(bwd(&plain, &f->w, f->x, FT, &bad, f->x, gb.dx + GUARD, &gb.g), MOE_STATUS_OK);
        CHECK(g_guards_ok(&gb, FT * FD));
        free(buf); free(buf2);
    }
}

/* Workspace NULL -> NULL_ARGUMENT; one byte short or 0 -> TOO_SMALL; T = 0 is
   a no-op even with NULL x, dy, dx and an empty info. */
TEST(misuse, backward_workspace_and_zero_tokens) {
    fixture *f = fx();
    static gradbuf gb;
    int r;
    for (r = 0; r <= MOE_ROUTING_SOFT; r++) {
        moe_config c = base((moe_routing)r);
        moe_info info, empty;
        size_t need = 0;
        unsigned char *ws;
        void *buf;
        c.training = 1; c.save_for_backward = 1;
        buf = train_forward(&c, &f->w, &info);
        CHECK_STATUS(moe_backward_workspace_size(&c, FT, &need), MOE_STATUS_OK);
        ws = (unsigned char *)malloc(need + 1);
        garm(&gb);
        CHECK_STATUS(moe_backward(&c, &f->w, f->x, FT, &info, f->x, gb.dx + GUARD, &gb.g, ws, need - 1),
                     MOE_STATUS_WORKSPACE_TOO_SMALL);
        CHECK_STATUS(moe_backward(&c, &f->w, f->x, FT, &info, f->x, gb.dx + GUARD, &gb.g, ws, 0),
                     MOE_STATUS_WORKSPACE_TOO_SMALL);
        CHECK_STATUS(moe_backward(&c, &f->w, f->x, FT, &info, f->x, gb.dx + GUARD, &gb.g, NULL, need),
                     MOE_STATUS_NULL_ARGUMENT);
        CHECK(g_untouched(&gb));
        CHECK_STATUS(moe_backward(&c, &f->w, f->x, FT, &info, f->x, gb.dx + GUARD, &gb.g, ws + 1, need),
                     MOE_STATUS_OK);   /* misaligned base is fine */
        CHECK(g_guards_ok(&gb, FT * FD));
        free(ws);
        memset(&empty, 0, sizeof empty);
        CHECK_STATUS(moe_backward_workspace_size(&c, 0, &need), MOE_STATUS_OK);
        ws = (unsigned char *)malloc(need);
        garm(&gb);
        CHECK_STATUS(moe_backward(&c, &f->w, NULL, 0, &empty, NULL, NULL, &gb.g, ws, need), MOE_STATUS_OK);
        CHECK_STATUS(moe_backward(&c, &f->w, f->x, 0, &empty, f->x, gb.dx + GUARD, &gb.g, ws, need), MOE_STATUS_OK);
        CHECK_STATUS(moe_backward_alloc(&c, &f->w, NULL, 0, &empty, NULL, NULL, &gb.g), MOE_STATUS_OK);
        CHECK(g_untouched(&gb));
        free(ws); free(buf);
    }
}

/* A successful backward writes exactly T*D of dx and each gradient's own
   elements, for every family, with fused gate_up, shared gate and Shazeer
   noise; guards on both sides stay intact. */
TEST(misuse, backward_guard_zones) {
    fixture *f = fx();
    static gradbuf gb;
    int r, v;
    for (r = 0; r <= MOE_ROUTING_SOFT; r++)
        for (v = 0; v < 2; v++) {
            moe_config c = base((moe_routing)r);
            moe_weights w = f->w;
            moe_info info;
            void *buf;
            c.training = 1; c.save_for_backward = 1;
            c.shared_d_ff = FS; c.shared_expert_gated = 1; c.expert_bias = 1;
            c.balance_coef = 0.01f; c.z_loss_coef = 1e-3f;
            if (v) {
                w.gate_up_fused = 1; w.up = NULL; c.recompute = 1; c.router_bias = 1;
                if (r == MOE_ROUTING_TOPK) { c.noise = MOE_NOISE_SHAZEER; c.jitter = 0.1f; c.capacity = 1; }
            }
            buf = train_forward(&c, &w, &info);
            garm(&gb);
            CHECK_STATUS(bwd(&c, &w, f->x, FT, &info, f->x, gb.dx + GUARD, &gb.g), MOE_STATUS_OK);
            CHECK(g_guards_ok(&gb, FT * FD));
            CHECK(all_finite(gb.dx + GUARD, FT * FD));
            garm(&gb);
            CHECK_STATUS(moe_backward_alloc(&c, &w, f->x, FT, &info, f->x, gb.dx + GUARD, &gb.g), MOE_STATUS_OK);
            CHECK(g_guards_ok(&gb, FT * FD));
            free(buf);
        }
}

/* A corrupted routing in info (expert index out of range, -1 in a top-k slot,
   an unknown drop flag, an expert-choice expert with more than C tokens) ->
   BAD_CACHE before any buffer is indexed with it; nothing written.         */
TEST(misuse, backward_bad_cache) {
    fixture *f = fx();
    static gradbuf gb;
    int r, k;
    for (r = 0; r <= MOE_ROUTING_DENSE; r++) {
        moe_config c = base((moe_routing)r);
        moe_info info;
        void *buf;
        const int S = moe_routing_slots(&c);
        c.training = 1; c.save_for_backward = 1;
        buf = train_forward(&c, &f->w, &info);
        for (k = 0; k < 4; k++) {
            const int32_t saved_e = info.expert[S + 1];
            const uint8_t saved_d = info.dropped[S + 1];
            int32_t t, e0 = -2;
            switch (k) {
            case 0: info.expert[S + 1] = FE; break;                       /* out of range */
            case 1: info.expert[S + 1] = -2; break;                       /* below -1 */
            case 2: info.dropped[S + 1] = 3; break;                       /* unknown flag */
            default:
                if (r == MOE_ROUTING_EXPERT_CHOICE) {                     /* expert 0 takes every token */
                    for (t = 0; t < FT; t++) { info.expert[(size_t)t * S] = 0; info.dropped[(size_t)t * S] = 0; }
                } else if (r == MOE_ROUTING_TOPK) {
                    info.expert[S + 1] = -1;                              /* top-k slot without expert */
                } else {
                    continue;
                }
                e0 = 0;
            }
            garm(&gb);
            if (bwd(&c, &f->w, f->x, FT, &info, f->x, gb.dx + GUARD, &gb.g) != MOE_STATUS_BAD_CACHE)
                moe_test_fail(__FILE__, __LINE__, "routing %d, corruption %d: not BAD_CACHE", r, k);
            CHECK(g_untouched(&gb));
            if (e0 == 0 && r == MOE_ROUTING_EXPERT_CHOICE) {             /* rebuild the forward's info */
                free(buf);
                buf = train_forward(&c, &f->w, &info);
            } else {
                info.expert[S + 1] = saved_e; info.dropped[S + 1] = saved_d;
            }
        }
        free(buf);
    }
}
