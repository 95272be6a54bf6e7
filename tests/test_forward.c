/* Layer properties of moe_forward on the reference path: agreement with a
   naive float64 implementation written here, consistency between routing
   families and APIs, capacity and dropping, determinism, and a smoke run of
   every preset. Weights come from a fixed LCG, uniform(-0.5, 0.5). */
#include "../moe.h"
#include "moe_test.h"
#include <stdint.h>

/* float64 reference vs fp32 library: 1e-5 relative + 1e-6 absolute (brief). */
#define REF_ATOL 1e-6
#define REF_RTOL 1e-5

/* --- deterministic weights -------------------------------------------------- */

static float lcg_uniform(uint32_t *s) {   /* uniform(-0.5, 0.5), 24 bits */
    *s = *s * 1664525u + 1013904223u;
    return (float)((*s >> 8) * (1.0 / 16777216.0)) - 0.5f;
}
static float *rnd(size_t n, uint32_t *s, float amp) {
    float *p = (float *)malloc((n ? n : 1) * sizeof(float));
    size_t i;
    for (i = 0; i < n; i++) p[i] = amp * lcg_uniform(s);
    return p;
}

/* One layer: inputs and every tensor any config may read. */
typedef struct layer {
    int32_t T, E, D, F, Fs, R;
    float *x, *router, *router_bias, *sel_bias, *router_noise, *gate, *up, *down;
    float *gate_bias, *up_bias, *down_bias, *sh_gate, *sh_up, *sh_down;
    float *sh_gate_bias, *sh_up_bias, *sh_down_bias, *sh_expert_gate, *phi;
    moe_weights w;
} layer;

static void layer_init(layer *L, const moe_config *c, int32_t T, uint32_t seed) {
    uint32_t s = seed * 2654435761u + 12345u;
    size_t E, D, F, Fs, P;
    memset(L, 0, sizeof *L);
    L->T = T; L->E = c->num_experts; L->D = c->d_model; L->F = c->d_ff;
    L->Fs = c->shared_d_ff > 0 ? c->shared_d_ff : 1;
    P = c->slots_per_expert > 0 ? (size_t)c->slots_per_expert : 1;
    E = (size_t)L->E; D = (size_t)L->D; F = (size_t)L->F; Fs = (size_t)L->Fs;
    L->R = c->routing == MOE_ROUTING_SOFT ? (int32_t)(E * P) : L->E;
    L->x = rnd((size_t)T * D, &s, 2.0f);   /* x in (-1, 1) */
    L->router = rnd(E * D, &s, 1.0f);
    L->router_bias = rnd(E, &s, 1.0f);
    L->sel_bias = rnd(E, &s, 0.2f);
    L->router_noise = rnd(E * D, &s, 1.0f);
    L->gate = rnd(E * F * D, &s, 1.0f);
    L->up = rnd(E * F * D, &s, 1.0f);
    L->down = rnd(E * D * F, &s, 1.0f);
    L->gate_bias = rnd(E * F, &s, 1.0f);
    L->up_bias = rnd(E * F, &s, 1.0f);
    L->down_bias = rnd(E * D, &s, 1.0f);
    L->sh_gate = rnd(Fs * D, &s, 1.0f);
    L->sh_up = rnd(Fs * D, &s, 1.0f);
    L->sh_down = rnd(D * Fs, &s, 1.0f);
    L->sh_gate_bias = rnd(Fs, &s, 1.0f);
    L->sh_up_bias = rnd(Fs, &s, 1.0f);
    L->sh_down_bias = rnd(D, &s, 1.0f);
    L->sh_expert_gate = rnd(D, &s, 1.0f);
    L->phi = rnd((size_t)L->R * D, &s, 1.0f);
    L->w.router = L->router; L->w.router_bias = L->router_bias; L->w.selection_bias = L->sel_bias;
    L->w.router_noise = L->router_noise; L->w.gate = L->gate; L->w.up = L->up; L->w.down = L->down;
    L->w.gate_bias = L->gate_bias; L->w.up_bias = L->up_bias; L->w.down_bias = L->down_bias;
    L->w.shared_gate = L->sh_gate; L->w.shared_up = L->sh_up; L->w.shared_down = L->sh_down;
    L->w.shared_gate_bias = L->sh_gate_bias; L->w.shared_up_bias = L->sh_up_bias;
    L->w.shared_down_bias = L->sh_down_bias; L->w.shared_expert_gate = L->sh_expert_gate;
    L->w.soft_phi = L->phi;
}

static void layer_free(layer *L) {
    float *p[] = {L->x, L->router, L->router_bias, L->sel_bias, L->router_noise, L->gate, L->up,
                  L->down, L->gate_bias, L->up_bias, L->down_bias, L->sh_gate, L->sh_up, L->sh_down,
                  L->sh_gate_bias, L->sh_up_bias, L->sh_down_bias, L->sh_expert_gate, L->phi};
    size_t i;
    for (i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
}

/* Router identity (needs D == E): the logits are x itself, so a test picks
   them by hand. */
static void layer_identity_router(layer *L) {
    int32_t e, d;
    for (e = 0; e < L->E; e++)
        for (d = 0; d < L->D; d++) L->router[(size_t)e * L->D + d] = e == d ? 1.0f : 0.0f;
}

/* Every moe_info array for (c, T), bound into one buffer by moe_info_bind. */
typedef struct outs { void *buf; moe_info info; } outs;
static void outs_init(outs *o, const moe_config *c, int32_t T) {
    size_t n = 0;
    memset(o, 0, sizeof *o);
    CHECK_STATUS(moe_info_size(c, T, &n), MOE_STATUS_OK);
    o->buf = malloc(n);
    CHECK_STATUS(moe_info_bind(c, T, &o->info, o->buf, n), MOE_STATUS_OK);
}

/* y of exactly T*D floats, so ASan sees any write past the end. */
static float *ybuf(const layer *L) { return (float *)malloc((size_t)L->T * L->D * sizeof(float)); }

/* --- float64 reference -------------------------------------------------------- */

static int is_glu(moe_activation a) {
    return a == MOE_ACT_SWIGLU || a == MOE_ACT_GEGLU || a == MOE_ACT_GEGLU_TANH;
}
static double act_ref(moe_activation a, double v) {
    switch (a) {
    case MOE_ACT_SWIGLU: case MOE_ACT_SILU: return v / (1.0 + exp(-v));
    case MOE_ACT_GEGLU: case MOE_ACT_GELU: return 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
    case MOE_ACT_GEGLU_TANH: case MOE_ACT_GELU_TANH:
        return 0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
    default: return v > 0.0 ? v : 0.0;
    }
}
static double sigmoid_ref(double z) { return 1.0 / (1.0 + exp(-z)); }

/* out[D] += scale * FFN(x): down . act(gate . x + bg) [* (up . x + bu)] + bd.
   gate/up: [F][D], down: [D][F]; biases may be NULL. */
static void ffn_ref(moe_activation act, int32_t D, int32_t F, const float *gate, const float *up,
                    const float *down, const float *bg, const float *bu, const float *bd,
                    const double *x, double scale, double *out) {
    double h[512];
    int32_t f, d;
    for (f = 0; f < F && f < 512; f++) {
        double g = bg ? bg[f] : 0.0, u = bu ? bu[f] : 0.0;
        for (d = 0; d < D; d++) g += (double)gate[(size_t)f * D + d] * x[d];
        if (is_glu(act)) {
            for (d = 0; d < D; d++) u += (double)up[(size_t)f * D + d] * x[d];
            h[f] = act_ref(act, g) * u;
        } else {
            h[f] = act_ref(act, g);
        }
    }
    for (d = 0; d < D; d++) {
        double v = bd ? bd[d] : 0.0;
        for (f = 0; f < F; f++) v += (double)down[(size_t)d * F + f] * h[f];
        out[d] += scale * v;
    }
}

/* out += scale * FFN_e(x) with the layer's weights as w presents them. */
static void expert_ref(const layer *L, const moe_config *c, const moe_weights *w, int32_t e,
                       const double *x, double scale, double *out) {
    const size_t D = (size_t)L->D, F = (size_t)L->F, gs = (w->gate_up_fused ? 2 : 1) * F * D;
    const float *up = w->gate_up_fused ? w->gate + e * gs + F * D : (w->up ? w->up + e * F * D : NULL);
    ffn_ref(c->activation, L->D, L->F, w->gate + e * gs, up, w->down + e * D * F,
            c->expert_bias ? w->gate_bias + e * F : NULL,
            c->expert_bias && is_glu(c->activation) ? w->up_bias + e * F : NULL,
            c->expert_bias ? w->down_bias + e * D : NULL, x, scale, out);
}

/* y_ref[T][D] = sum over kept slots of weight * FFN_expert(x_t) (+ shared),
   from the routing the library reported in info. */
static void layer_ref(const layer *L, const moe_config *c, const moe_weights *w, const moe_info *info,
                      double *yref) {
    const int32_t D = L->D, S = info->slots;
    double xd[512];
    int32_t t, j, d;
    for (t = 0; t < L->T; t++) {
        double *yt = yref + (size_t)t * D;
        for (d = 0; d < D; d++) { xd[d] = L->x[(size_t)t * D + d]; yt[d] = 0.0; }
        for (j = 0; j < S; j++) {
            const size_t p = (size_t)t * S + j;
            if (info->expert[p] < 0 || (info->dropped && info->dropped[p])) continue;
            expert_ref(L, c, w, info->expert[p], xd, info->weight[p], yt);
        }
        if (c->shared_d_ff > 0) {
            double g = 1.0;
            if (c->shared_expert_gated) {
                double z = 0.0;
                for (d = 0; d < D; d++) z += xd[d] * w->shared_expert_gate[d];
                g = sigmoid_ref(z);
            }
            ffn_ref(c->activation, D, c->shared_d_ff, w->shared_gate, w->shared_up, w->shared_down,
                    c->expert_bias ? w->shared_gate_bias : NULL,
                    c->expert_bias && is_glu(c->activation) ? w->shared_up_bias : NULL,
                    c->expert_bias ? w->shared_down_bias : NULL, xd, g, yt);
        }
    }
}

static double *ref_for(const layer *L, const moe_config *c, const moe_info *info) {
    double *r = (double *)malloc(((size_t)L->T * L->D + 1) * sizeof(double));
    layer_ref(L, c, &L->w, info, r);
    return r;
}

static int all_finite(const float *a, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) if (!(a[i] - a[i] == 0.0f)) return 0;
    return 1;
}

static moe_config cfg_topk(int32_t E, int32_t K, int32_t D, int32_t F) {
    moe_config c;
    memset(&c, 0, sizeof c);
    c.num_experts = E; c.top_k = K; c.d_model = D; c.d_ff = F;
    return c;
}

/* --- agreement with the float64 reference ------------------------------------- */

/* Dropless top-k on odd shapes, every activation, with and without expert
   biases, matches sum_j w_j FFN_{e_j}(x) computed in double. */
TEST(forward, topk_matches_float64_reference) {
    static const int32_t Ts[] = {1, 7, 33}, Ds[] = {1, 5, 17}, Fs[] = {3, 13}, Es[] = {1, 3, 8};
    int a, bias, ti, di, fi, ei, ki;
    uint32_t seed = 1;
    for (a = MOE_ACT_SWIGLU; a <= MOE_ACT_SILU; a++)
        for (bias = 0; bias < 2; bias++)
            for (ti = 0; ti < 3; ti++)
                for (di = 0; di < 3; di++)
                    for (fi = 0; fi < 2; fi++)
                        for (ei = 0; ei < 3; ei++)
                            for (ki = 0; ki < 3; ki++) {
                                const int32_t E = Es[ei], T = Ts[ti], D = Ds[di], F = Fs[fi];
                                const int32_t K = ki == 0 ? 1 : ki == 1 ? 2 : E;
                                moe_config c = cfg_topk(E, K, D, F);
                                layer L;
                                outs o;
                                float *y;
                                double *yref;
                                char what[128];
                                int32_t t, j;
                                if (K > E || (ki == 2 && E <= 2)) continue;   /* K in {1, 2, E}, no repeats */
                                c.activation = (moe_activation)a; c.expert_bias = bias;
                                layer_init(&L, &c, T, seed++);
                                outs_init(&o, &c, T);
                                y = ybuf(&L);
                                CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, T, y, &o.info), MOE_STATUS_OK);
                                yref = ref_for(&L, &c, &o.info);
                                snprintf(what, sizeof what, "y (act %d bias %d T %d D %d F %d E %d K %d)",
                                         a, bias, (int)T, (int)D, (int)F, (int)E, (int)K);
                                moe_test_check_array(__FILE__, __LINE__, what, y, yref, (size_t)T * D, REF_ATOL, REF_RTOL);
                                for (t = 0; t < T; t++) {   /* distinct experts, weights sum to 1 */
                                    double sum = 0.0;
                                    for (j = 0; j < K; j++) {
                                        const int32_t e = o.info.expert[t * K + j];
                                        CHECK(e >= 0 && e < E);
                                        if (j > 0) CHECK(e != o.info.expert[t * K + j - 1]);
                                        sum += o.info.weight[t * K + j];
                                    }
                                    CHECK_NEAR(sum, 1.0, 1e-6, 0.0);
                                }
                                free(y); free(yref); free(o.buf); layer_free(&L);
                            }
}

/* Top-k with K = E and no normalisation is the dense layer: same weights per
   expert (bitwise) and the same y up to the summation order. */
TEST(forward, topk_all_experts_equals_dense) {
    moe_config tk = cfg_topk(6, 6, 7, 5), dn = tk;
    layer L;
    outs ot, od;
    float *yt, *yd;
    double *ydd;
    int32_t t, j, i;
    tk.normalize = MOE_NORM_NONE;
    dn.routing = MOE_ROUTING_DENSE; dn.top_k = 0; dn.normalize = MOE_NORM_NONE;
    layer_init(&L, &tk, 9, 77);
    outs_init(&ot, &tk, 9);
    outs_init(&od, &dn, 9);
    yt = ybuf(&L); yd = ybuf(&L);
    ydd = (double *)malloc(9 * 7 * sizeof(double));
    CHECK_STATUS(moe_forward_alloc(&tk, &L.w, L.x, 9, yt, &ot.info), MOE_STATUS_OK);
    CHECK_STATUS(moe_forward_alloc(&dn, &L.w, L.x, 9, yd, &od.info), MOE_STATUS_OK);
    for (t = 0; t < 9; t++)
        for (j = 0; j < 6; j++) {
            const int32_t e = ot.info.expert[t * 6 + j];
            CHECK_INT(od.info.expert[t * 6 + j], j);   /* dense: slot j = expert j */
            CHECK(ot.info.weight[t * 6 + j] == od.info.weight[t * 6 + e]);
        }
    for (i = 0; i < 9 * 7; i++) ydd[i] = yd[i];
    CHECK_ARRAY_NEAR(yt, ydd, 9 * 7, 1e-7, 1e-6);
    free(yt); free(yd); free(ydd); free(ot.buf); free(od.buf); layer_free(&L);
}

/* A fused [E][2F][D] gate_up tensor gives bitwise the y of separate tensors. */
TEST(forward, gate_up_fused_bitwise) {
    static const moe_activation acts[2] = {MOE_ACT_SWIGLU, MOE_ACT_GEGLU_TANH};
    int a, bias;
    for (a = 0; a < 2; a++)
        for (bias = 0; bias < 2; bias++) {
            moe_config c = cfg_topk(5, 2, 6, 7);
            layer L;
            moe_weights wf;
            float *fused, *y1, *y2;
            int32_t e;
            c.activation = acts[a]; c.expert_bias = bias; c.shared_d_ff = 3;
            layer_init(&L, &c, 11, 5 + (uint32_t)a);
            fused = (float *)malloc((size_t)5 * 2 * 7 * 6 * sizeof(float));
            for (e = 0; e < 5; e++) {
                memcpy(fused + (size_t)e * 2 * 7 * 6, L.gate + (size_t)e * 7 * 6, 7 * 6 * sizeof(float));
                memcpy(fused + (size_t)e * 2 * 7 * 6 + 7 * 6, L.up + (size_t)e * 7 * 6, 7 * 6 * sizeof(float));
            }
            wf = L.w; wf.gate = fused; wf.up = NULL; wf.gate_up_fused = 1;
            y1 = ybuf(&L); y2 = ybuf(&L);
            CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, 11, y1, NULL), MOE_STATUS_OK);
            CHECK_STATUS(moe_forward_alloc(&c, &wf, L.x, 11, y2, NULL), MOE_STATUS_OK);
            CHECK(memcmp(y1, y2, 11 * 6 * sizeof(float)) == 0);
            free(fused); free(y1); free(y2); layer_free(&L);
        }
}

/* A shared expert adds FFN_shared(x) to every token, sigmoid-gated by
   x . w_sg when shared_expert_gated = 1 (Qwen2), matching the float64 reference. */
TEST(forward, shared_expert) {
    static const moe_activation acts[3] = {MOE_ACT_SWIGLU, MOE_ACT_GELU, MOE_ACT_RELU};
    int a, gated, bias;
    for (a = 0; a < 3; a++)
        for (gated = 0; gated < 2; gated++)
            for (bias = 0; bias < 2; bias++) {
                moe_config c = cfg_topk(4, 2, 9, 5);
                layer L;
                outs o;
                float *y;
                double *yref;
                c.activation = acts[a]; c.shared_d_ff = 11; c.shared_expert_gated = gated; c.expert_bias = bias;
                c.normalize = MOE_NORM_NONE;
                layer_init(&L, &c, 13, 100 + (uint32_t)(a * 4 + gated * 2 + bias));
                outs_init(&o, &c, 13);
                y = ybuf(&L);
                CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, 13, y, &o.info), MOE_STATUS_OK);
                yref = ref_for(&L, &c, &o.info);
                CHECK_ARRAY_NEAR(y, yref, 13 * 9, REF_ATOL, REF_RTOL);
                free(y); free(yref); free(o.buf); layer_free(&L);
            }
}

/* --- capacity and dropping ---------------------------------------------------- */

/* Position policy, recomputed from info.expert: slot 0 of every token in
   token order first, then slot 1, ...; a pair is kept while its expert has room. */
static void position_drops(const int32_t *expert, int32_t T, int32_t S, int32_t E, int32_t C,
                           uint8_t *drop) {
    int32_t count[64], t, j;
    memset(count, 0, sizeof count);
    (void)E;
    for (j = 0; j < S; j++)
        for (t = 0; t < T; t++) {
            const int32_t e = expert[t * S + j];
            drop[t * S + j] = 0;
            if (e < 0) continue;
            if (count[e] < C) count[e]++;
            else drop[t * S + j] = 1;
        }
}

/* capacity = 1 with many tokens: kept <= 1 per expert, drop counts add up,
   dropped slots follow the position policy and carry weight 0, and a token
   with every slot dropped gets exactly 0.0. */
TEST(forward, capacity_one_position_policy) {
    enum { T = 40, E = 4, K = 2, D = 6, F = 5 };
    moe_config c = cfg_topk(E, K, D, F);
    layer L;
    outs o;
    float *y;
    double *yref;
    uint8_t want[T * K];
    int32_t t, j, e, routed = 0, kept = 0, none = 0, count[E] = {0};
    c.capacity = 1;
    layer_init(&L, &c, T, 9);
    outs_init(&o, &c, T);
    y = ybuf(&L);
    CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, T, y, &o.info), MOE_STATUS_OK);
    CHECK_INT(o.info.capacity, 1);
    for (t = 0; t < T * K; t++) count[o.info.expert[t]]++;
    for (e = 0; e < E; e++) {
        CHECK(o.info.expert_kept[e] <= 1);
        CHECK_INT(o.info.expert_routed[e], count[e]);
        routed += o.info.expert_routed[e];
        kept += o.info.expert_kept[e];
    }
    CHECK_INT(routed, T * K);
    CHECK_INT(o.info.dropped_pairs, routed - kept);
    position_drops(o.info.expert, T, K, E, 1, want);
    for (t = 0; t < T; t++) {
        int any = 0;
        for (j = 0; j < K; j++) {
            CHECK_INT(o.info.dropped[t * K + j], want[t * K + j]);
            if (o.info.dropped[t * K + j]) CHECK(o.info.weight[t * K + j] == 0.0f);
            else any = 1;
        }
        if (!any) {
            none++;
            for (j = 0; j < D; j++) CHECK(y[t * D + j] == 0.0f && !signbit(y[t * D + j]));
        }
    }
    CHECK_INT(o.info.dropped_tokens, none);
    CHECK(none > 0);
    yref = ref_for(&L, &c, &o.info);
    CHECK_ARRAY_NEAR(y, yref, T * D, REF_ATOL, REF_RTOL);
    free(y); free(yref); free(o.buf); layer_free(&L);
}

/* BPR keeps the token with the highest top-1 score; position the first one.
   E = 2, K = 1, C = 1, three tokens all routed to expert 0 with p0 =
   0.599 (t0), 0.900 (t1), 0.701 (t2). */
TEST(forward, drop_bpr_keeps_highest_top1) {
    static const float logit0[3] = {0.4f, 2.2f, 0.85f};
    static const int32_t kept_token[3] = {0, 1, 1};   /* POSITION, BPR, WEIGHT */
    int pol;
    for (pol = 0; pol < 3; pol++) {
        moe_config c = cfg_topk(2, 1, 2, 3);
        layer L;
        outs o;
        float *y;
        double *yref;
        int32_t t, d;
        c.capacity = 1; c.normalize = MOE_NORM_NONE; c.drop_policy = (moe_drop_policy)pol;
        layer_init(&L, &c, 3, 21);
        layer_identity_router(&L);
        for (t = 0; t < 3; t++) { L.x[t * 2] = logit0[t]; L.x[t * 2 + 1] = 0.0f; }
        outs_init(&o, &c, 3);
        y = ybuf(&L);
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, 3, y, &o.info), MOE_STATUS_OK);
        for (t = 0; t < 3; t++) {
            CHECK_INT(o.info.expert[t], 0);
            CHECK_INT(o.info.dropped[t], t != kept_token[pol]);
            if (t != kept_token[pol])
                for (d = 0; d < 2; d++) CHECK(y[t * 2 + d] == 0.0f);
        }
        CHECK_INT(o.info.dropped_pairs, 2);
        CHECK_INT(o.info.dropped_tokens, 2);
        yref = ref_for(&L, &c, &o.info);
        CHECK_ARRAY_NEAR(y, yref, 6, REF_ATOL, REF_RTOL);
        free(y); free(yref); free(o.buf); layer_free(&L);
    }
}

/* The hand-built case of the weight policy (E = 3, K = 2, C = 1, no norm):
   token A = logits [0, 0.1, 0] -> experts [1, 0], weights [0.356, 0.322];
   token B = [2, 1.9, -5] -> [0, 1], [0.525, 0.475]. Position keeps slot 0 of
   both; WEIGHT lets B win both experts, so A loses everything. */
static void two_token_case(layer *L, moe_config *c) {
    static const float x[6] = {0.0f, 0.1f, 0.0f, 2.0f, 1.9f, -5.0f};
    *c = cfg_topk(3, 2, 3, 4);
    c->capacity = 1;
    layer_init(L, c, 2, 33);
    layer_identity_router(L);
    memcpy(L->x, x, sizeof x);
}

/* MOE_DROP_WEIGHT keeps each expert's highest-weight pair. */
TEST(forward, drop_weight_keeps_highest_weights) {
    static const uint8_t want[2][4] = {{0, 1, 0, 1}, {1, 1, 0, 0}};   /* POSITION, WEIGHT */
    static const int32_t want_expert[4] = {1, 0, 0, 1};
    int p, i, d;
    for (p = 0; p < 2; p++) {
        moe_config c;
        layer L;
        outs o;
        float *y;
        double *yref;
        two_token_case(&L, &c);
        c.normalize = MOE_NORM_NONE;
        c.drop_policy = p ? MOE_DROP_WEIGHT : MOE_DROP_POSITION;
        outs_init(&o, &c, 2);
        y = ybuf(&L);
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, 2, y, &o.info), MOE_STATUS_OK);
        for (i = 0; i < 4; i++) {
            CHECK_INT(o.info.expert[i], want_expert[i]);
            CHECK_INT(o.info.dropped[i], want[p][i]);
        }
        CHECK_INT(o.info.dropped_pairs, 2);
        CHECK_INT(o.info.dropped_tokens, p ? 1 : 0);
        if (p) for (d = 0; d < 3; d++) CHECK(y[d] == 0.0f);
        yref = ref_for(&L, &c, &o.info);
        CHECK_ARRAY_NEAR(y, yref, 6, REF_ATOL, REF_RTOL);
        free(y); free(yref); free(o.buf); layer_free(&L);
    }
}

/* normalize_after_drop: a token that lost one of its two slots puts weight
   exactly 1.0 on the survivor (SUM); without it the survivor keeps g1/(g1+g2). */
TEST(forward, normalize_after_drop) {
    int after;
    for (after = 0; after < 2; after++) {
        moe_config c;
        layer L;
        outs o;
        float *y;
        double *yref;
        two_token_case(&L, &c);
        c.normalize_after_drop = after;
        outs_init(&o, &c, 2);
        y = ybuf(&L);
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, 2, y, &o.info), MOE_STATUS_OK);
        CHECK_INT(o.info.dropped[1], 1);
        CHECK_INT(o.info.dropped[3], 1);
        CHECK(o.info.weight[1] == 0.0f && o.info.weight[3] == 0.0f);
        if (after) {
            CHECK(o.info.weight[0] == 1.0f);
            CHECK(o.info.weight[2] == 1.0f);
        } else {   /* A: e^0.1 / (e^0.1 + 1) */
            CHECK_NEAR(o.info.weight[0], exp(0.1) / (exp(0.1) + 1.0), 1e-6, 0.0);
        }
        yref = ref_for(&L, &c, &o.info);
        CHECK_ARRAY_NEAR(y, yref, 6, REF_ATOL, REF_RTOL);
        free(y); free(yref); free(o.buf); layer_free(&L);
    }
}

/* --- determinism and API equivalence -------------------------------------------- */

/* y and every info array and scalar of two runs, compared bitwise. */
static int same_run(const moe_config *c, const moe_info *a, const moe_info *b, const float *ya,
                    const float *yb, int32_t T, int32_t D) {
    const size_t TR = (size_t)T * c->num_experts, TS = (size_t)T * a->slots, E = (size_t)c->num_experts;
    return memcmp(ya, yb, (size_t)T * D * sizeof(float)) == 0 &&
           memcmp(a->logits, b->logits, TR * sizeof(float)) == 0 &&
           memcmp(a->scores, b->scores, TR * sizeof(float)) == 0 &&
           memcmp(a->expert, b->expert, TS * sizeof(int32_t)) == 0 &&
           memcmp(a->weight, b->weight, TS * sizeof(float)) == 0 &&
           memcmp(a->dropped, b->dropped, TS) == 0 &&
           memcmp(a->expert_routed, b->expert_routed, E * sizeof(int32_t)) == 0 &&
           memcmp(a->expert_kept, b->expert_kept, E * sizeof(int32_t)) == 0 &&
           a->slots == b->slots && a->capacity == b->capacity && a->dropped_pairs == b->dropped_pairs &&
           a->dropped_tokens == b->dropped_tokens && a->aux_balance == b->aux_balance &&
           a->aux_z == b->aux_z && a->aux_importance == b->aux_importance && a->aux_load == b->aux_load &&
           a->aux_seq == b->aux_seq && a->aux_total == b->aux_total;
}

/* Same inputs and seed: bitwise-identical y and info, also in training with
   jitter, Shazeer noise, random or sampled second experts, or jitter alone;
   another seed changes y;
   training = 0 ignores noise and jitter entirely. */
TEST(forward, determinism_and_seeds) {
    enum { T = 24, E = 8, D = 10, F = 6 };
    int variant;
    for (variant = 0; variant < 4; variant++) {
        moe_config c = cfg_topk(E, 2, D, F), clean;
        layer L;
        outs o1, o2;
        float *y1, *y2;
        c.capacity_factor = 1.0f; c.seed = 42;
        c.balance_coef = 0.01f; c.z_loss_coef = 1e-3f; c.importance_coef = 0.1f; c.load_coef = 0.1f;
        if (variant == 0) { c.training = 1; c.jitter = 0.05f; c.noise = MOE_NOISE_SHAZEER; c.noise_epsilon = 0.01f; }
        if (variant == 1) { c.training = 1; c.second_expert = MOE_SECOND_RANDOM; c.jitter = 0.1f; }
        if (variant == 2) { c.training = 1; c.second_expert = MOE_SECOND_SAMPLED; }
        if (variant == 3) { c.training = 1; c.jitter = 0.1f; c.capacity_factor = 0.0f; }
        layer_init(&L, &c, T, 55);
        outs_init(&o1, &c, T); outs_init(&o2, &c, T);
        y1 = ybuf(&L); y2 = ybuf(&L);
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, T, y1, &o1.info), MOE_STATUS_OK);
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, T, y2, &o2.info), MOE_STATUS_OK);
        CHECK(same_run(&c, &o1.info, &o2.info, y1, y2, T, D));
        c.seed = 43;   /* a new seed draws new noise */
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, T, y2, &o2.info), MOE_STATUS_OK);
        CHECK(memcmp(y1, y2, (size_t)T * D * sizeof(float)) != 0);
        if (variant == 0) {   /* inference: noise and jitter are ignored */
            c.training = 0;
            clean = c; clean.noise = MOE_NOISE_NONE; clean.jitter = 0.0f; clean.seed = 0;
            CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, T, y1, NULL), MOE_STATUS_OK);
            CHECK_STATUS(moe_forward_alloc(&clean, &L.w, L.x, T, y2, NULL), MOE_STATUS_OK);
            CHECK(memcmp(y1, y2, (size_t)T * D * sizeof(float)) == 0);
        }
        free(y1); free(y2); free(o1.buf); free(o2.buf); layer_free(&L);
    }
}

/* moe_forward with a caller workspace (aligned or at base + 1) and
   moe_forward_alloc give bitwise-identical y and info. */
TEST(forward, workspace_and_alloc_bitwise) {
    int r;
    for (r = 0; r < 3; r++) {
        enum { T = 17, D = 6 };
        moe_config c = cfg_topk(5, 2, D, 7);
        layer L;
        outs o1, o2, o3;
        float *y1, *y2, *y3;
        size_t need = 0;
        unsigned char *ws;
        c.routing = (moe_routing)r; c.shared_d_ff = 4;
        if (r == MOE_ROUTING_TOPK) c.capacity_factor = 1.0f;
        if (r == MOE_ROUTING_EXPERT_CHOICE) c.capacity = 4;
        layer_init(&L, &c, T, 200 + (uint32_t)r);
        outs_init(&o1, &c, T); outs_init(&o2, &c, T); outs_init(&o3, &c, T);
        y1 = ybuf(&L); y2 = ybuf(&L); y3 = ybuf(&L);
        CHECK_STATUS(moe_forward_workspace_size(&c, T, &need), MOE_STATUS_OK);
        ws = (unsigned char *)malloc(need + 1);
        CHECK_STATUS(moe_forward(&c, &L.w, L.x, T, y1, &o1.info, ws, need), MOE_STATUS_OK);
        CHECK_STATUS(moe_forward(&c, &L.w, L.x, T, y2, &o2.info, ws + 1, need), MOE_STATUS_OK);
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, T, y3, &o3.info), MOE_STATUS_OK);
        CHECK(same_run(&c, &o1.info, &o2.info, y1, y2, T, D));
        CHECK(same_run(&c, &o1.info, &o3.info, y1, y3, T, D));
        free(ws); free(y1); free(y2); free(y3); free(o1.buf); free(o2.buf); free(o3.buf); layer_free(&L);
    }
}

/* moe_route on the logits moe_forward reported reproduces its routing bitwise
   (top-k with groups, selection bias and capacity; expert choice; dense). */
TEST(forward, route_reproduces_forward) {
    int r;
    for (r = 0; r < 3; r++) {
        enum { T = 19, E = 8, D = 5 };
        moe_config c = cfg_topk(E, 3, D, 4);
        layer L;
        outs of, orr;
        float *y;
        size_t need = 0;
        void *ws;
        c.routing = (moe_routing)r;
        if (r == MOE_ROUTING_TOPK) {
            c.score = MOE_SCORE_SIGMOID; c.selection_bias = 1; c.n_group = 4; c.topk_group = 2;
            c.group_score_top = 2; c.capacity_factor = 1.0f; c.routed_scale = 2.5f;
        }
        if (r == MOE_ROUTING_EXPERT_CHOICE) c.capacity_factor = 2.0f;
        layer_init(&L, &c, T, 300 + (uint32_t)r);
        outs_init(&of, &c, T); outs_init(&orr, &c, T);
        y = ybuf(&L);
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, T, y, &of.info), MOE_STATUS_OK);
        CHECK_STATUS(moe_route_workspace_size(&c, T, &need), MOE_STATUS_OK);
        ws = malloc(need);
        CHECK_STATUS(moe_route(&c, &L.w, of.info.logits, NULL, T, &orr.info, ws, need), MOE_STATUS_OK);
        CHECK(same_run(&c, &of.info, &orr.info, y, y, T, D));
        free(ws); free(y); free(of.buf); free(orr.buf); layer_free(&L);
    }
}

/* Router weights ~1e4 give logits ~1e4: finite scores and y, weights sum to 1. */
TEST(forward, huge_finite_logits) {
    int sig;
    for (sig = 0; sig < 2; sig++) {
        enum { T = 16, E = 6, K = 2, D = 8 };
        moe_config c = cfg_topk(E, K, D, 5);
        layer L;
        outs o;
        float *y;
        int32_t i, t;
        c.score = sig ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
        layer_init(&L, &c, T, 400 + (uint32_t)sig);
        for (i = 0; i < E * D; i++) L.router[i] *= 2e4f;
        outs_init(&o, &c, T);
        y = ybuf(&L);
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, T, y, &o.info), MOE_STATUS_OK);
        CHECK(all_finite(y, (size_t)T * D));
        CHECK(all_finite(o.info.scores, (size_t)T * E));
        CHECK(o.info.aux_z == o.info.aux_z && o.info.aux_balance == o.info.aux_balance);
        for (i = 0; i < T * E; i++) CHECK(fabsf(o.info.logits[i]) < 1e6f);
        for (t = 0; t < T; t++) {
            float s0 = o.info.weight[t * K], s1 = o.info.weight[t * K + 1];
            if (sig && o.info.scores[t * E + o.info.expert[t * K]] == 0.0f) continue;   /* all underflowed */
            CHECK_NEAR((double)s0 + s1, 1.0, 1e-6, 0.0);
        }
        free(y); free(o.buf); layer_free(&L);
    }
}

/* --- expert choice, Soft MoE, selection bias ------------------------------------ */

/* Each expert processes exactly C tokens: its top-C scores in its column
   (ties to the lower token); layout [T][E] with expert[t][e] in {e, -1};
   weight = score; unchosen tokens get y = 0; y matches the reference. */
TEST(forward, expert_choice) {
    int variant;
    for (variant = 0; variant < 2; variant++) {
        enum { T = 12, E = 3, D = 5 };
        moe_config c = cfg_topk(E, 0, D, 4);
        layer L;
        outs o;
        float *y;
        double *yref;
        int32_t t, e, C, unchosen = 0;
        c.routing = MOE_ROUTING_EXPERT_CHOICE; c.activation = MOE_ACT_GELU;
        if (variant == 0) c.capacity = 2;
        else c.capacity_factor = 2.0f;   /* ceil(2 * 12 / 3) = 8 */
        C = variant == 0 ? 2 : 8;
        layer_init(&L, &c, T, 500 + (uint32_t)variant);
        outs_init(&o, &c, T);
        y = ybuf(&L);
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, T, y, &o.info), MOE_STATUS_OK);
        CHECK_INT(o.info.slots, E);
        CHECK_INT(o.info.capacity, C);
        for (e = 0; e < E; e++) {
            int32_t n = 0;
            float worst_in = 2.0f, best_out = -1.0f;
            CHECK_INT(o.info.expert_kept[e], C);
            CHECK_INT(o.info.expert_routed[e], C);
            for (t = 0; t < T; t++) {
                const int32_t v = o.info.expert[t * E + e];
                const float s = o.info.scores[t * E + e];
                CHECK(v == e || v == -1);
                if (v == e) { n++; CHECK(o.info.weight[t * E + e] == s); if (s < worst_in) worst_in = s; }
                else { CHECK(o.info.weight[t * E + e] == 0.0f); if (s > best_out) best_out = s; }
            }
            CHECK_INT(n, C);
            CHECK(worst_in >= best_out);
        }
        for (t = 0; t < T; t++) {
            int chosen = 0;
            for (e = 0; e < E; e++) chosen |= o.info.expert[t * E + e] >= 0;
            if (!chosen) {
                unchosen++;
                for (e = 0; e < D; e++) CHECK(y[t * D + e] == 0.0f);
            }
        }
        CHECK_INT(o.info.dropped_tokens, unchosen);
        if (variant == 0) CHECK(unchosen >= T - E * C);
        yref = ref_for(&L, &c, &o.info);
        CHECK_ARRAY_NEAR(y, yref, T * D, REF_ATOL, REF_RTOL);
        free(y); free(yref); free(o.buf); layer_free(&L);
    }
}

/* Soft MoE: combine rows and dispatch columns sum to 1 and match a float64
   softmax of the cosine logits; y = C . FFN(D^T X) in double. */
TEST(forward, soft_moe_matches_reference) {
    int variant;
    for (variant = 0; variant < 2; variant++) {
        enum { T = 5, E = 3, P = 2, R = E * P, D = 4, F = 3 };
        moe_config c = cfg_topk(E, 0, D, F);
        layer L;
        outs o;
        float *y, scale = 1.5f;
        double lg[T][R], cmb[T][R], dsp[T][R], xs[R][D], ys[R][D], yref[T * D];
        double cw[T * R], dw[T * R];
        int32_t t, s, d;
        c.routing = MOE_ROUTING_SOFT; c.slots_per_expert = P;
        c.activation = variant ? MOE_ACT_SWIGLU : MOE_ACT_GELU; c.expert_bias = variant;
        layer_init(&L, &c, T, 600 + (uint32_t)variant);
        if (variant) L.w.soft_scale = &scale;
        outs_init(&o, &c, T);
        y = ybuf(&L);
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, T, y, &o.info), MOE_STATUS_OK);
        for (t = 0; t < T; t++)   /* logits = scale * <x, phi> / (|x| |phi|) */
            for (s = 0; s < R; s++) {
                double dot = 0.0, nx = 1e-6, np = 1e-6;
                for (d = 0; d < D; d++) {
                    const double a = L.x[t * D + d], b = L.phi[s * D + d];
                    dot += a * b; nx += a * a; np += b * b;
                }
                lg[t][s] = (variant ? scale : 1.0) * dot / (sqrt(nx) * sqrt(np));
            }
        for (t = 0; t < T; t++) {   /* combine: softmax over slots */
            double sum = 0.0;
            for (s = 0; s < R; s++) sum += exp(lg[t][s]);
            for (s = 0; s < R; s++) cmb[t][s] = exp(lg[t][s]) / sum;
        }
        for (s = 0; s < R; s++) {   /* dispatch: softmax over tokens */
            double sum = 0.0;
            for (t = 0; t < T; t++) sum += exp(lg[t][s]);
            for (t = 0; t < T; t++) dsp[t][s] = exp(lg[t][s]) / sum;
        }
        for (t = 0; t < T; t++) {
            double rs = 0.0;
            for (s = 0; s < R; s++) {
                cw[t * R + s] = cmb[t][s]; dw[t * R + s] = dsp[t][s];
                rs += o.info.scores[t * R + s];
            }
            CHECK_NEAR(rs, 1.0, 1e-6, 0.0);
        }
        for (s = 0; s < R; s++) {
            double cs = 0.0;
            for (t = 0; t < T; t++) cs += o.info.dispatch[t * R + s];
            CHECK_NEAR(cs, 1.0, 1e-6, 0.0);
        }
        CHECK_ARRAY_NEAR(o.info.scores, cw, T * R, 1e-6, 1e-5);
        CHECK_ARRAY_NEAR(o.info.dispatch, dw, T * R, 1e-6, 1e-5);
        for (s = 0; s < R; s++) {   /* slot inputs and outputs */
            for (d = 0; d < D; d++) {
                xs[s][d] = 0.0;
                for (t = 0; t < T; t++) xs[s][d] += dsp[t][s] * L.x[t * D + d];
                ys[s][d] = 0.0;
            }
            expert_ref(&L, &c, &L.w, s / P, xs[s], 1.0, ys[s]);
        }
        for (t = 0; t < T; t++)
            for (d = 0; d < D; d++) {
                yref[t * D + d] = 0.0;
                for (s = 0; s < R; s++) yref[t * D + d] += cmb[t][s] * ys[s][d];
            }
        CHECK_ARRAY_NEAR(y, yref, T * D, REF_ATOL, REF_RTOL);
        CHECK_INT(o.info.slots, 0);
        for (s = 0; s < E; s++) CHECK_INT(o.info.expert_kept[s], P);
        free(y); free(o.buf); layer_free(&L);
    }
}

/* DeepSeek-V3 style: a large selection bias on one expert makes every token
   pick it first, while its weight is the unbiased sigmoid score. */
TEST(forward, selection_bias_selects_not_weights) {
    int norm;
    for (norm = 0; norm < 2; norm++) {
        enum { T = 10, E = 8, K = 2, D = 6 };
        moe_config c = cfg_topk(E, K, D, 4);
        layer L;
        outs o;
        float *y;
        double *yref;
        int32_t t, e;
        c.score = MOE_SCORE_SIGMOID; c.selection_bias = 1;
        c.normalize = norm ? MOE_NORM_SUM : MOE_NORM_NONE;
        layer_init(&L, &c, T, 700 + (uint32_t)norm);
        for (e = 0; e < E; e++) L.sel_bias[e] = 0.0f;
        L.sel_bias[5] = 10.0f;
        outs_init(&o, &c, T);
        y = ybuf(&L);
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, T, y, &o.info), MOE_STATUS_OK);
        for (t = 0; t < T; t++) {
            const double s5 = sigmoid_ref(o.info.logits[t * E + 5]);
            const int32_t e1 = o.info.expert[t * K + 1];
            const double s1 = sigmoid_ref(o.info.logits[t * E + e1]);
            CHECK_INT(o.info.expert[t * K], 5);
            CHECK_NEAR(o.info.scores[t * E + 5], s5, 1e-7, 1e-6);
            CHECK_NEAR(o.info.weight[t * K], norm ? s5 / (s5 + s1) : s5, 1e-7, 1e-6);
            CHECK(o.info.weight[t * K] < 1.0f);
            for (e = 0; e < E; e++)   /* slot 1 is the best unbiased score of the rest */
                if (e != 5) CHECK(o.info.scores[t * E + e] <= o.info.scores[t * E + e1]);
        }
        CHECK_INT(o.info.expert_routed[5], T);
        yref = ref_for(&L, &c, &o.info);
        CHECK_ARRAY_NEAR(y, yref, T * D, REF_ATOL, REF_RTOL);
        free(y); free(yref); free(o.buf); layer_free(&L);
    }
}

/* Aux-loss-free balancing: bias rises for underloaded experts, falls for
   overloaded ones and stays for an expert exactly at the mean (sign(0) = 0). */
TEST(forward, selection_bias_update) {
    int32_t load[5] = {2, 6, 4, 4, 4};   /* mean 4 */
    float bias[5] = {0.1f, 0.2f, 0.3f, -0.4f, 0.0f};
    const float g = 1e-3f;
    CHECK_STATUS(moe_selection_bias_update(5, load, g, bias), MOE_STATUS_OK);
    CHECK(bias[0] == 0.1f + g);
    CHECK(bias[1] == 0.2f - g);
    CHECK(bias[2] == 0.3f);
    CHECK(bias[3] == -0.4f);
    CHECK(bias[4] == 0.0f);
    {   /* docs/ROUTING.md, "Bias update" example: load from 2 tokens, mean 2/3 */
        int32_t l2[12] = {0, 0, 0, 2, 1, 1, 0, 0, 0, 2, 1, 1};
        float b2[12] = {0.1f, 0.0f, -0.2f, 0.05f, 0.3f, 0.0f, -0.1f, 0.2f, 0.0f, 0.15f, -0.05f, -0.3f};
        static const double want[12] = {0.1010, 0.0010, -0.1990, 0.0490, 0.2990, -0.0010,
                                        -0.0990, 0.2010, 0.0010, 0.1490, -0.0510, -0.3010};
        CHECK_STATUS(moe_selection_bias_update(12, l2, g, b2), MOE_STATUS_OK);
        CHECK_ARRAY_NEAR(b2, want, 12, 1e-7, 1e-6);
    }
}

/* --- presets -------------------------------------------------------------------- */

/* Every preset resolves as released, and runs a tiny forward (inference and
   training) after shrinking D, F (and E when large): OK, finite output. */
TEST(forward, presets_resolve_and_run) {
    static moe_config (*const presets[])(void) = {
        moe_preset_mixtral, moe_preset_switch, moe_preset_gshard, moe_preset_shazeer,
        moe_preset_qwen2_moe, moe_preset_qwen3_moe, moe_preset_olmoe, moe_preset_dbrx,
        moe_preset_jamba, moe_preset_deepseek_v2, moe_preset_deepseek_v3,
        moe_preset_expert_choice, moe_preset_soft_moe, moe_preset_dense};
    size_t i;
    int training;
    for (i = 0; i < sizeof presets / sizeof presets[0]; i++)
        for (training = 0; training < 2; training++) {
            moe_config c = presets[i](), r;
            layer L;
            outs o;
            float *y;
            char what[64];
            snprintf(what, sizeof what, "preset %d", (int)i);
            if (moe_config_resolve(&c, &r) != MOE_STATUS_OK)
                moe_test_fail(__FILE__, __LINE__, "%s does not resolve as released", what);
            c.d_model = 8; c.d_ff = 4;
            if (c.shared_d_ff > 0) c.shared_d_ff = 6;
            if (c.num_experts > 64) c.num_experts = 16;   /* n_group 8 still divides; groups hold >= K */
            c.training = training; c.seed = 3;
            if (moe_config_resolve(&c, &r) != MOE_STATUS_OK) {
                moe_test_fail(__FILE__, __LINE__, "%s does not resolve when shrunk", what);
                continue;
            }
            layer_init(&L, &c, 6, 800 + (uint32_t)i);
            outs_init(&o, &c, 6);
            y = ybuf(&L);
            if (moe_forward_alloc(&c, &L.w, L.x, 6, y, &o.info) != MOE_STATUS_OK)
                moe_test_fail(__FILE__, __LINE__, "%s: forward failed (training %d)", what, training);
            else if (!all_finite(y, 6 * 8) || !(o.info.aux_total - o.info.aux_total == 0.0f))
                moe_test_fail(__FILE__, __LINE__, "%s: non-finite output (training %d)", what, training);
            free(y); free(o.buf); layer_free(&L);
        }
}
