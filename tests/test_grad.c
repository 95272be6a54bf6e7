/* Gradient checks of moe_backward: central finite differences of the float
   forward, for every routing family, aux loss, activation and weight layout,
   and every gradient tensor the config uses (dx and each moe_grads field).
   Plus the conventions: recompute = 0/1 give bitwise the same gradients,
   parameter gradients accumulate, dx is overwritten (and may be NULL), and
   router_grad_clip limits each token's router-logit gradient.

   The scalar is the one moe_backward differentiates (moe.h TRAINING):
       L = sum_i dy_i * y_i + sum_k coef_k * aux_k
   evaluated in double from the float outputs of moe_forward.

   STEP AND TOLERANCE. Five-point stencil
       f' ~ (-L(+2h) + 8 L(+h) - 8 L(-h) + L(-2h)) / (12 h),
   truncation error h^4/30 * f^(5).
   * h = 2^-7 (7.8e-3). If the routing moves inside that stencil the
     coordinate retries with h/4, then h/16 (below), before it is skipped.
   * Exact steps: x is drawn on a 2^-11 grid (|x| <= 1), weights on a 2^-12
     grid (|w| <= 0.5), so v + k h for every step used here is exact in
     float (asserted): the stencil has no step-rounding error.
   * Truncation: the layer is a composition of O(1)-scaled smooth maps
     (|x|, |W| <= 1, a few layers deep), so |f^(5)| <= ~1e2 * M, where M is
     the magnitude of L (below); h^4/30 * 1e2 M = 1.2e-8 M. Negligible.
   * Rounding: each float forward is off by |dL| <= c eps_f32 M, with
     eps_f32 = 1.19e-7 and M = sum |dy_i y_i| + sum |coef_k aux_k| (the sum
     of magnitudes, not |L|: L can cancel to ~0 while y cannot). The stencil
     amplifies it by (1 + 8 + 8 + 1) / 12 / h = 1.5 / h. Measured over the
     ~13,000 coordinates of this file, |fd - an| <= 1e-5 M at h = 2^-7,
     i.e. c ~ 0.45 (rounding errors of y mostly cancel in the sum); take
     c = 8 (18x margin):
         |fd noise| <= 1.5 * 8 * eps_f32 * M / h = 1.8e-4 M at h = 2^-7
     (4x and 16x that at the smaller steps).
   * The analytic gradient is float too: relative error ~ a few eps per
     accumulated term; 1e-4 * |an| covers it.
   So a coordinate passes when
         |fd - an| <= GRAD_NOISE * M / h + GRAD_RTOL * |an|.
   Sensitivity (checked by mutating moe.h's backward): scaling a single
   term by 1..2% (the z-loss or balance factor, the sequence-wise factor,
   soft_scale's gradient, one Shazeer load term) fails a test here.

   NON-DIFFERENTIABLE POINTS (docs/ROUTING.md, "Backward"). Selection (top-k, groups,
   capacity keep/drop, random second expert, sampled expert, expert choice)
   is a constant of the backward. At each of the 4 stencil points the test
   compares a routing signature with the base point's (gp_signature): per
   token the sets of kept / dropped / rejected experts (info.expert and
   info.dropped), slot 0 for the first-choice loss, the plain top-K set of
   info.scores for the sequence-wise loss, the K-th and (K+1)-th noisy
   logits for the Shazeer smooth load, and for ReLU the sign pattern of the
   cached pre-activations. If it changes at every step of the ladder the
   coordinate is skipped; each tensor must keep >= 80% of its sampled
   coordinates, so no test can pass by skipping (in practice 99.9% are
   checked, 98% at the first step). Noise, jitter and random routing come
   from cfg.seed, which stays fixed, so FD works with training = 1. Seeds
   whose base point sits on a near-tie (two scores within ~1e-4) are
   avoided: such a point is not differentiable in practice.

   Build with -DGRAD_STATS to print per-tensor coverage and the worst error
   (the numbers quoted above).                                             */
#include "../moe.h"
#include "moe_test.h"
#include <stdint.h>

#define GRAD_H      0.0078125     /* 2^-7, the first step */
#define GRAD_LEVELS 3             /* then 2^-9, 2^-11 */
#define GRAD_NOISE  (1.5 * 8.0 * 1.1920929e-7)   /* |fd noise| <= GRAD_NOISE * M / h */
#define GRAD_RTOL   1e-4
#define GRAD_MAXC   40            /* sampled coordinates per tensor */
#define GRAD_MIN_CHECKED 0.8

/* --- deterministic tensors on a 2^-12 grid ----------------------------------- */

static uint32_t lcg_next(uint32_t *s) { *s = *s * 1664525u + 1013904223u; return *s; }
/* amp * uniform[-0.5, 0.5) on a grid of amp / 4096 (exact for FD steps) */
static float q_uniform(uint32_t *s, float amp) {
    return amp * (float)((int32_t)(lcg_next(s) >> 20) - 2048) / 4096.0f;
}

/* Tensors a layer may use, in a fixed order. */
enum {
    GT_X, GT_ROUTER, GT_ROUTER_BIAS, GT_ROUTER_NOISE, GT_GATE, GT_UP, GT_DOWN,
    GT_GATE_BIAS, GT_UP_BIAS, GT_DOWN_BIAS, GT_SH_GATE, GT_SH_UP, GT_SH_DOWN,
    GT_SH_GATE_BIAS, GT_SH_UP_BIAS, GT_SH_DOWN_BIAS, GT_SH_EXPERT_GATE, GT_PHI,
    GT_SCALE, GT_COUNT
};
static const char *const gt_name[GT_COUNT] = {
    "dx", "router", "router_bias", "router_noise", "gate", "up", "down",
    "gate_bias", "up_bias", "down_bias", "shared_gate", "shared_up", "shared_down",
    "shared_gate_bias", "shared_up_bias", "shared_down_bias", "shared_expert_gate",
    "soft_phi", "soft_scale"
};

/* One gradient problem: config, inputs, weights, their gradients, buffers. */
typedef struct gp {
    moe_config c;
    int32_t T, E, D, F, Fs, R, S, K;
    int fused, glu;
    float *x, *dy, *y, *sel_bias;
    float *t[GT_COUNT];      /* parameter (or x) tensors; NULL = unused */
    float *g[GT_COUNT];      /* analytic gradients (dx for GT_X)        */
    size_t n[GT_COUNT];
    moe_weights w;
    moe_grads grads;
    moe_info info;
    void *info_buf, *ws;
    size_t ws_bytes;
    unsigned char *sig0, *sig1;
    size_t sig_cap;
} gp;

static int gp_glu(moe_activation a) {
    return a == MOE_ACT_SWIGLU || a == MOE_ACT_GEGLU || a == MOE_ACT_GEGLU_TANH;
}

/* Build a problem for config c (save_for_backward is forced on; training as
   c has it: base_cfg turns it on), T tokens. Soft MoE gets a learnable
   scale of 1.5 unless no_scale. Every tensor is drawn whether used or not,
   so a config change does not reshuffle the others. */
static void gp_init_ex(gp *p, const moe_config *cfg, int32_t T, uint32_t seed, int fused, int no_scale) {
    uint32_t s = seed * 2654435761u + 77u;
    moe_config c = *cfg, r;
    size_t E, D, F, Fs, i, bytes = 0, b2 = 0;
    int k;
    memset(p, 0, sizeof *p);
    c.save_for_backward = 1;
    p->c = c;
    CHECK_STATUS(moe_config_resolve(&c, &r), MOE_STATUS_OK);
    p->T = T; p->E = c.num_experts; p->D = c.d_model; p->F = c.d_ff; p->Fs = c.shared_d_ff;
    p->R = c.routing == MOE_ROUTING_SOFT ? c.num_experts * r.slots_per_expert : c.num_experts;
    p->S = moe_routing_slots(&c);
    p->K = c.routing == MOE_ROUTING_TOPK ? c.top_k : c.num_experts;
    p->fused = fused;
    p->glu = gp_glu(c.activation);
    E = (size_t)p->E; D = (size_t)p->D; F = (size_t)p->F; Fs = (size_t)p->Fs;

    p->n[GT_X] = (size_t)T * D;
    p->n[GT_ROUTER] = E * D;
    p->n[GT_ROUTER_BIAS] = E;
    p->n[GT_ROUTER_NOISE] = E * D;
    p->n[GT_GATE] = E * (fused ? 2 : 1) * F * D;
    p->n[GT_UP] = E * F * D;
    p->n[GT_DOWN] = E * D * F;
    p->n[GT_GATE_BIAS] = E * F;
    p->n[GT_UP_BIAS] = E * F;
    p->n[GT_DOWN_BIAS] = E * D;
    p->n[GT_SH_GATE] = Fs * D;
    p->n[GT_SH_UP] = Fs * D;
    p->n[GT_SH_DOWN] = D * Fs;
    p->n[GT_SH_GATE_BIAS] = Fs;
    p->n[GT_SH_UP_BIAS] = Fs;
    p->n[GT_SH_DOWN_BIAS] = D;
    p->n[GT_SH_EXPERT_GATE] = D;
    p->n[GT_PHI] = (size_t)p->R * D;
    p->n[GT_SCALE] = 1;
    for (k = 0; k < GT_COUNT; k++) {
        size_t n = p->n[k] ? p->n[k] : 1;
        p->t[k] = (float *)malloc(n * sizeof(float));
        for (i = 0; i < n; i++) p->t[k][i] = q_uniform(&s, k == GT_X ? 2.0f : 1.0f);
    }
    p->t[GT_SCALE][0] = 1.5f;
    p->x = p->t[GT_X];
    p->dy = (float *)malloc(((size_t)T * D + 1) * sizeof(float));
    for (i = 0; i < (size_t)T * D; i++) p->dy[i] = q_uniform(&s, 2.0f);
    p->y = (float *)malloc(((size_t)T * D + 1) * sizeof(float));
    p->sel_bias = (float *)malloc(E * sizeof(float));
    for (i = 0; i < E; i++) p->sel_bias[i] = q_uniform(&s, 0.4f);

    /* drop the tensors this config does not use (no gradient to check) */
    {
        int soft = c.routing == MOE_ROUTING_SOFT;
        int used[GT_COUNT];
        used[GT_X] = 1;
        used[GT_ROUTER] = !soft;
        used[GT_ROUTER_BIAS] = !soft && c.router_bias;
        used[GT_ROUTER_NOISE] = c.noise == MOE_NOISE_SHAZEER;
        used[GT_GATE] = used[GT_DOWN] = 1;
        used[GT_UP] = p->glu && !fused;
        used[GT_GATE_BIAS] = used[GT_DOWN_BIAS] = c.expert_bias;
        used[GT_UP_BIAS] = c.expert_bias && p->glu;
        used[GT_SH_GATE] = used[GT_SH_DOWN] = Fs > 0;
        used[GT_SH_UP] = Fs > 0 && p->glu;
        used[GT_SH_GATE_BIAS] = used[GT_SH_DOWN_BIAS] = Fs > 0 && c.expert_bias;
        used[GT_SH_UP_BIAS] = Fs > 0 && c.expert_bias && p->glu;
        used[GT_SH_EXPERT_GATE] = Fs > 0 && c.shared_expert_gated;
        used[GT_PHI] = soft;
        used[GT_SCALE] = soft && !no_scale;
        for (k = 0; k < GT_COUNT; k++) {
            if (!used[k] || p->n[k] == 0) { free(p->t[k]); p->t[k] = NULL; p->n[k] = 0; continue; }
            p->g[k] = (float *)calloc(p->n[k], sizeof(float));
        }
        p->x = p->t[GT_X];
    }

    p->w.router = p->t[GT_ROUTER]; p->w.router_bias = p->t[GT_ROUTER_BIAS];
    p->w.selection_bias = c.selection_bias ? p->sel_bias : NULL;
    p->w.router_noise = p->t[GT_ROUTER_NOISE];
    p->w.gate = p->t[GT_GATE]; p->w.up = p->t[GT_UP]; p->w.down = p->t[GT_DOWN];
    p->w.gate_bias = p->t[GT_GATE_BIAS]; p->w.up_bias = p->t[GT_UP_BIAS]; p->w.down_bias = p->t[GT_DOWN_BIAS];
    p->w.gate_up_fused = fused;
    p->w.shared_gate = p->t[GT_SH_GATE]; p->w.shared_up = p->t[GT_SH_UP]; p->w.shared_down = p->t[GT_SH_DOWN];
    p->w.shared_gate_bias = p->t[GT_SH_GATE_BIAS]; p->w.shared_up_bias = p->t[GT_SH_UP_BIAS];
    p->w.shared_down_bias = p->t[GT_SH_DOWN_BIAS]; p->w.shared_expert_gate = p->t[GT_SH_EXPERT_GATE];
    p->w.soft_phi = p->t[GT_PHI]; p->w.soft_scale = p->t[GT_SCALE];

    p->grads.router = p->g[GT_ROUTER]; p->grads.router_bias = p->g[GT_ROUTER_BIAS];
    p->grads.router_noise = p->g[GT_ROUTER_NOISE];
    p->grads.gate = p->g[GT_GATE]; p->grads.up = p->g[GT_UP]; p->grads.down = p->g[GT_DOWN];
    p->grads.gate_bias = p->g[GT_GATE_BIAS]; p->grads.up_bias = p->g[GT_UP_BIAS];
    p->grads.down_bias = p->g[GT_DOWN_BIAS];
    p->grads.shared_gate = p->g[GT_SH_GATE]; p->grads.shared_up = p->g[GT_SH_UP];
    p->grads.shared_down = p->g[GT_SH_DOWN];
    p->grads.shared_gate_bias = p->g[GT_SH_GATE_BIAS]; p->grads.shared_up_bias = p->g[GT_SH_UP_BIAS];
    p->grads.shared_down_bias = p->g[GT_SH_DOWN_BIAS];
    p->grads.shared_expert_gate = p->g[GT_SH_EXPERT_GATE];
    p->grads.soft_phi = p->g[GT_PHI]; p->grads.soft_scale = p->g[GT_SCALE];

    CHECK_STATUS(moe_info_size(&p->c, T, &bytes), MOE_STATUS_OK);
    p->info_buf = malloc(bytes ? bytes : 1);
    CHECK_STATUS(moe_info_bind(&p->c, T, &p->info, p->info_buf, bytes), MOE_STATUS_OK);
    CHECK_STATUS(moe_forward_workspace_size(&p->c, T, &bytes), MOE_STATUS_OK);
    CHECK_STATUS(moe_backward_workspace_size(&p->c, T, &b2), MOE_STATUS_OK);
    p->ws_bytes = bytes > b2 ? bytes : b2;
    p->ws = malloc(p->ws_bytes ? p->ws_bytes : 1);
    p->sig_cap = (size_t)T * (6 * 8) +                                       /* routing */
                 ((size_t)T * (size_t)p->K + (size_t)p->R) * F + (size_t)T * Fs; /* ReLU signs */
    p->sig0 = (unsigned char *)malloc(p->sig_cap);
    p->sig1 = (unsigned char *)malloc(p->sig_cap);
}
static void gp_init(gp *p, const moe_config *c, int32_t T, uint32_t seed) { gp_init_ex(p, c, T, seed, 0, 0); }

static void gp_free(gp *p) {
    int k;
    for (k = 0; k < GT_COUNT; k++) { free(p->t[k]); free(p->g[k]); }
    free(p->dy); free(p->y); free(p->sel_bias); free(p->info_buf); free(p->ws);
    free(p->sig0); free(p->sig1);
}

static moe_status gp_forward(gp *p) {
    return moe_forward(&p->c, &p->w, p->x, p->T, p->y, &p->info, p->ws, p->ws_bytes);
}
static void gp_zero_grads(gp *p) {
    int k;
    for (k = 0; k < GT_COUNT; k++) if (p->g[k]) memset(p->g[k], 0, p->n[k] * sizeof(float));
}
static moe_status gp_backward(gp *p) {
    return moe_backward(&p->c, &p->w, p->x, p->T, &p->info, p->dy, p->g[GT_X], &p->grads,
                        p->ws, p->ws_bytes);
}

/* L in double, and its magnitude M (the rounding scale of the float forward). */
static double gp_loss(const gp *p, double *mag) {
    const moe_config *c = &p->c;
    const moe_info *in = &p->info;
    double L = 0.0, M = 0.0, a[5];
    size_t i;
    int k;
    for (i = 0; i < (size_t)p->T * p->D; i++) {
        const double v = (double)p->dy[i] * p->y[i];
        L += v; M += fabs(v);
    }
    a[0] = (double)c->balance_coef * in->aux_balance;
    a[1] = (double)c->z_loss_coef * in->aux_z;
    a[2] = (double)c->importance_coef * in->aux_importance;
    a[3] = (double)c->load_coef * in->aux_load;
    a[4] = (double)c->seq_balance_coef * in->aux_seq;
    for (k = 0; k < 5; k++) { L += a[k]; M += fabs(a[k]); }
    if (mag) *mag = M;
    return L;
}

/* ordered indices of the n largest v[0..E) (ties: lower index first) */
static void gp_topn(const float *v, int32_t E, int32_t n, int32_t *idx) {
    int32_t i, filled = 0;
    for (i = 0; i < E; i++) {
        int32_t q;
        if (filled == n && !(v[i] > v[idx[n - 1]])) continue;
        q = filled < n ? filled++ : n - 1;
        while (q > 0 && v[i] > v[idx[q - 1]]) { idx[q] = idx[q - 1]; q--; }
        idx[q] = i;
    }
}

/* Routing signature of the last forward: everything discrete the loss
   depends on (see the header comment). Returns its length in bytes.     */
static size_t gp_signature(const gp *p, unsigned char *out) {
    const moe_info *in = &p->info;
    size_t n = 0, i;
    const moe_config *c = &p->c;
    const int topk = c->routing == MOE_ROUTING_TOPK;
    int32_t t, j, top[64];
    /* Per token, the sets of kept, capacity-dropped and rejected (random
       second expert) experts. The layer is symmetric in a token's slots
       otherwise (the weights normalise over the set; the counts of the
       balance losses and the capacity keep/drop are per (token, expert)),
       so a swap of slot order alone is no kink and is not compared; the
       first-choice loss reads slot 0, which is compared.                  */
    if (p->S > 0)
        for (t = 0; t < p->T; t++) {
            uint64_t mask[3] = {0, 0, 0};
            for (j = 0; j < p->S; j++) {
                const int32_t e = in->expert[(size_t)t * p->S + j];
                const uint8_t d = in->dropped[(size_t)t * p->S + j];
                if (e >= 0) mask[d < 3 ? d : 0] |= (uint64_t)1 << e;
                if (d > 2) mask[0] = ~(uint64_t)0;   /* unknown value: never equal */
            }
            memcpy(out + n, mask, sizeof mask); n += sizeof mask;
            if (topk && c->balance_loss == MOE_BALANCE_FIRST_CHOICE) {
                memcpy(out + n, in->expert + (size_t)t * p->S, sizeof(int32_t)); n += sizeof(int32_t);
            }
        }
    /* The sequence-wise loss counts a plain top-K of the unbiased scores (its
       set); the Shazeer smooth load reads the (K+1)-th largest noisy logit
       (info.scores is monotone in it) and the K-th (last of info.expert).  */
    if (topk && c->seq_balance_coef != 0.0f) {
        for (t = 0; t < p->T; t++) {
            uint64_t mask = 0;
            gp_topn(in->scores + (size_t)t * p->E, p->E, p->K, top);
            for (j = 0; j < p->K; j++) mask |= (uint64_t)1 << top[j];
            memcpy(out + n, &mask, sizeof mask); n += sizeof mask;
        }
    }
    if (topk && c->noise == MOE_NOISE_SHAZEER && p->K < p->E) {
        for (t = 0; t < p->T; t++) {
            gp_topn(in->scores + (size_t)t * p->E, p->E, p->K + 1, top);
            memcpy(out + n, &top[p->K - 1], 2 * sizeof(int32_t)); n += 2 * sizeof(int32_t);
        }
    }
    if (p->c.activation == MOE_ACT_RELU) {   /* ReLU kinks: sign of each pre-activation */
        size_t rows = 0;
        int32_t e;
        for (e = 0; e < p->E; e++) rows += (size_t)in->expert_kept[e];
        for (i = 0; i < rows * (size_t)p->F; i++) out[n++] = in->cache_hidden[i] > 0.0f;
        for (i = 0; i < (size_t)p->T * (size_t)p->Fs; i++) out[n++] = in->cache_shared_hidden[i] > 0.0f;
    }
    if (n > p->sig_cap) { fprintf(stderr, "signature overflow\n"); abort(); }
    return n;
}

#ifdef GRAD_STATS
static double grad_worst;
#endif
/* The checker: analytic gradients once, then FD of sampled coordinates of
   every used tensor. On return p->info holds the base forward again.    */
static void grad_check(gp *p, const char *variant) {
    double L0, M, L0b, Mb;
    size_t sig_n;
    int k;
    uint32_t s = 12345u;
    CHECK(p->c.save_for_backward);
    CHECK(!p->c.recompute || p->c.activation != MOE_ACT_RELU);   /* the signature reads the cache */
    CHECK_STATUS(gp_forward(p), MOE_STATUS_OK);
    L0 = gp_loss(p, &M);
    sig_n = gp_signature(p, p->sig0);
    gp_zero_grads(p);
    CHECK_STATUS(gp_backward(p), MOE_STATUS_OK);
    CHECK(M > 0.0);

    for (k = 0; k < GT_COUNT; k++) {
        const size_t n = p->n[k];
        size_t sampled = 0, checked = 0, c;
        const size_t nc = n < GRAD_MAXC ? n : GRAD_MAXC;
        if (!p->t[k]) continue;
        for (c = 0; c < nc; c++) {
            /* all coordinates of a small tensor; else one per stride bucket */
            const size_t lo = c * n / nc, hi = (c + 1) * n / nc;
            const size_t i = lo + (hi > lo + 1 ? lcg_next(&s) % (hi - lo) : 0);
            const float v = p->t[k][i];
            static const int step[4] = {2, 1, -1, -2};
            double Ls[4], fd, an, tol, h = GRAD_H;
            int q, same = 0, level;
            sampled++;
            /* the step ladder: h, h/4, h/16 until the routing holds still */
            for (level = 0; level < GRAD_LEVELS && !same; level++, h *= 0.25) {
                same = 1;
                for (q = 0; q < 4; q++) {
                    p->t[k][i] = (float)(v + step[q] * h);
                    CHECK((double)p->t[k][i] == (double)v + step[q] * h);   /* exact step */
                    CHECK_STATUS(gp_forward(p), MOE_STATUS_OK);
                    Ls[q] = gp_loss(p, NULL);
                    if (gp_signature(p, p->sig1) != sig_n || memcmp(p->sig0, p->sig1, sig_n) != 0) {
                        same = 0;
                        break;
                    }
                }
            }
            h /= 0.25;
            p->t[k][i] = v;
            if (!same) continue;
            checked++;
            fd = (-Ls[0] + 8.0 * Ls[1] - 8.0 * Ls[2] + Ls[3]) / (12.0 * h);
            an = p->g[k][i];
            tol = GRAD_NOISE * M / h + GRAD_RTOL * fabs(an);
#ifdef GRAD_STATS
            if (fabs(fd - an) * h / (M * GRAD_H) > grad_worst)   /* normalised to h = 2^-7 */
                grad_worst = fabs(fd - an) * h / (M * GRAD_H);
#endif
            if (!(fabs(fd - an) <= tol))
                moe_test_fail(__FILE__, __LINE__, "%s: d%s[%zu] analytic %.9g, finite difference %.9g "
                              "(|diff| %.3g > tol %.3g, M %.4g)", variant, gt_name[k], i, an, fd,
                              fabs(fd - an), tol, M);
        }
#ifdef GRAD_STATS
        printf("  %-44s %-18s checked %3zu/%3zu  worst |fd - an| / M %.2e\n", variant, gt_name[k],
               checked, sampled, grad_worst);
        grad_worst = 0.0;
#endif
        if (!((double)checked >= GRAD_MIN_CHECKED * (double)sampled))
            moe_test_fail(__FILE__, __LINE__, "%s: %s: only %zu of %zu coordinates kept their routing "
                          "inside the stencil", variant, gt_name[k], checked, sampled);
    }
    /* restore: the base point again, bitwise (every perturbation was undone) */
    CHECK_STATUS(gp_forward(p), MOE_STATUS_OK);
    L0b = gp_loss(p, &Mb);
    CHECK(L0b == L0 && Mb == M);
}

/* Count of info.dropped == v over all pairs. */
static int gp_count_dropped(const gp *p, int v) {
    size_t i;
    int n = 0;
    for (i = 0; i < (size_t)p->T * (size_t)p->S; i++) n += p->info.dropped[i] == v;
    return n;
}

static moe_config base_cfg(int32_t E, int32_t K, int32_t D, int32_t F) {
    moe_config c;
    memset(&c, 0, sizeof c);
    c.num_experts = E; c.top_k = K; c.d_model = D; c.d_ff = F;
    c.training = 1; c.save_for_backward = 1; c.seed = 1234;
    return c;
}

/* Run grad_check on (c, T, seed) with fresh buffers. */
static void run_grad(const moe_config *c, int32_t T, uint32_t seed, const char *variant) {
    gp p;
    gp_init(&p, c, T, seed);
    grad_check(&p, variant);
    gp_free(&p);
}

// ----------------------------------------------------------------------------
// Top-k routing: normalisation, balance losses

/* Mixtral: SwiGLU, softmax top-2 renormalised, HF balance loss and z-loss. */
TEST(grad, mixtral_top2_balance_zloss) {
    moe_config c = base_cfg(8, 2, 6, 5);
    c.balance_coef = 0.1f; c.z_loss_coef = 0.05f;
    run_grad(&c, 9, 1, "mixtral T=9");
    run_grad(&c, 5, 2, "mixtral T=5");
}

TEST(grad, mixtral_single_token) {
    moe_config c = base_cfg(8, 2, 6, 5);
    c.balance_coef = 0.1f; c.z_loss_coef = 0.05f;
    run_grad(&c, 1, 3, "mixtral T=1");
}

TEST(grad, mixtral_k_equals_e) {
    moe_config c = base_cfg(4, 4, 5, 4);
    c.balance_coef = 0.1f; c.z_loss_coef = 0.05f;
    run_grad(&c, 5, 4, "K = E = 4");
}

TEST(grad, normalize_none_scaled) {
    moe_config c = base_cfg(6, 2, 6, 4);
    c.normalize = MOE_NORM_NONE; c.routed_scale = 2.5f;
    c.balance_coef = 0.1f; c.z_loss_coef = 0.05f;
    run_grad(&c, 9, 5, "NONE x2.5");
}

TEST(grad, normalize_pnorm_p2) {
    moe_config c = base_cfg(6, 3, 6, 4);
    c.normalize = MOE_NORM_PNORM; c.norm_p = 2.0f;
    c.balance_coef = 0.1f;
    run_grad(&c, 9, 6, "PNORM p=2");
    c.norm_p = 1.0f; c.norm_eps = 0.05f; c.routed_scale = 1.5f;
    run_grad(&c, 5, 7, "PNORM p=1 eps=0.05 x1.5");
}

TEST(grad, normalize_sum_eps) {
    moe_config c = base_cfg(6, 2, 6, 4);
    c.norm_eps = 0.1f; c.routed_scale = 2.0f; c.z_loss_coef = 0.05f;
    run_grad(&c, 9, 8, "SUM eps=0.1");
}

TEST(grad, balance_first_choice_and_topk_normalized) {
    moe_config c = base_cfg(6, 2, 6, 4);
    c.balance_loss = MOE_BALANCE_FIRST_CHOICE; c.balance_coef = 0.2f;
    run_grad(&c, 9, 9, "GShard first-choice loss");
    c.balance_loss = MOE_BALANCE_TOPK_NORMALIZED;
    run_grad(&c, 9, 10, "TOPK_NORMALIZED loss");
    c.score = MOE_SCORE_SIGMOID;
    run_grad(&c, 9, 11, "TOPK_NORMALIZED loss, sigmoid");
}

/* Each aux loss alone (dy = 0, coefficient 1): L is the loss itself, so M
   is its size and the check has its full resolution on the aux gradients. */
static void aux_alone(const moe_config *c, int32_t T, uint32_t seed, const char *v) {
    gp p;
    gp_init(&p, c, T, seed);
    memset(p.dy, 0, (size_t)T * p.D * sizeof(float));
    grad_check(&p, v);
    gp_free(&p);
}

TEST(grad, aux_losses_alone) {
    moe_config c = base_cfg(6, 2, 6, 4);
    c.balance_coef = 1.0f;
    aux_alone(&c, 9, 12, "alone: HF balance");
    c.capacity = 2;
    aux_alone(&c, 9, 13, "alone: HF balance, capacity 2");
    c.capacity = 0; c.balance_loss = MOE_BALANCE_FIRST_CHOICE; c.second_expert = MOE_SECOND_RANDOM;
    aux_alone(&c, 9, 14, "alone: first-choice balance, random second");
    c.second_expert = MOE_SECOND_GREEDY; c.balance_loss = MOE_BALANCE_TOPK_NORMALIZED;
    c.score = MOE_SCORE_SIGMOID;
    aux_alone(&c, 9, 15, "alone: TOPK_NORMALIZED balance, sigmoid");
    c.balance_coef = 0.0f; c.z_loss_coef = 1.0f;
    aux_alone(&c, 9, 16, "alone: z-loss");
    c = base_cfg(8, 3, 6, 4);
    c.score = MOE_SCORE_SIGMOID; c.selection_bias = 1; c.n_group = 4; c.topk_group = 2;
    c.group_score_top = 2; c.seq_balance_coef = 1.0f; c.seq_len = 4;
    aux_alone(&c, 9, 17, "alone: sequence-wise, sigmoid");
    c.score = MOE_SCORE_SOFTMAX; c.selection_bias = 0; c.seq_len = 3;
    aux_alone(&c, 9, 18, "alone: sequence-wise, softmax");
    c = base_cfg(8, 2, 6, 4);
    c.noise = MOE_NOISE_SHAZEER; c.noise_epsilon = 0.01f; c.importance_coef = 1.0f;
    aux_alone(&c, 9, 19, "alone: Shazeer importance");
    c.importance_coef = 0.0f; c.load_coef = 1.0f;
    aux_alone(&c, 9, 20, "alone: Shazeer load");
    c.noise = MOE_NOISE_NONE; c.importance_coef = 1.0f; c.load_coef = 1.0f;
    aux_alone(&c, 9, 33, "alone: importance without noise");
}

// ----------------------------------------------------------------------------
// Capacity and drops

/* E = 4, K = 2, T = 9, one expert suppressed by its router bias (never
   routed: an expert with no tokens), C = 1 or 2 (most pairs dropped, some
   tokens dropped entirely), every drop policy, normalise before / after. */
static void capacity_case(moe_drop_policy pol, int after, int32_t C, uint32_t seed, const char *v) {
    gp p;
    moe_config c = base_cfg(4, 2, 6, 4);
    c.capacity = C; c.drop_policy = pol; c.normalize_after_drop = after;
    c.router_bias = 1; c.balance_coef = 0.1f; c.z_loss_coef = 0.05f;
    gp_init(&p, &c, 9, seed);
    p.t[GT_ROUTER_BIAS][3] = -4.0f;
    grad_check(&p, v);
    CHECK(p.info.dropped_pairs > 0);
    CHECK(p.info.dropped_tokens > 0);
    CHECK_INT(p.info.expert_routed[3], 0);
    CHECK_INT(p.info.capacity, C);
    gp_free(&p);
}

TEST(grad, capacity_position) {
    capacity_case(MOE_DROP_POSITION, 0, 1, 21, "capacity 1 POSITION");
    capacity_case(MOE_DROP_POSITION, 0, 2, 22, "capacity 2 POSITION");
    capacity_case(MOE_DROP_POSITION, 1, 2, 23, "capacity 2 POSITION after-drop");
}
TEST(grad, capacity_bpr) {
    capacity_case(MOE_DROP_BPR, 0, 2, 24, "capacity 2 BPR");
    capacity_case(MOE_DROP_BPR, 1, 1, 30, "capacity 1 BPR after-drop");
}
TEST(grad, capacity_weight) {
    capacity_case(MOE_DROP_WEIGHT, 0, 2, 26, "capacity 2 WEIGHT");
    capacity_case(MOE_DROP_WEIGHT, 1, 2, 27, "capacity 2 WEIGHT after-drop");
}

/* capacity_factor + formula, NONE weights, after-drop: a token with one
   surviving pair gets weight routed_scale and zero router gradient there. */
TEST(grad, capacity_factor_after_drop_none) {
    gp p;
    moe_config c = base_cfg(4, 2, 6, 4);
    c.capacity_factor = 1.0f; c.normalize = MOE_NORM_NONE; c.normalize_after_drop = 1;
    c.routed_scale = 2.0f; c.balance_coef = 0.1f;
    gp_init(&p, &c, 9, 28);
    grad_check(&p, "cf=1 NONE after-drop");
    CHECK(p.info.dropped_pairs > 0);
    gp_free(&p);
}

// ----------------------------------------------------------------------------
// DeepSeek

/* V3: sigmoid, selection bias, 4 groups of 2 (keep 2, group score = top-2
   sum), K = 3, x2.5, norm_eps 1e-20, sequence-wise loss over 3 sequences
   (4 + 4 + 1 tokens), TOPK_NORMALIZED balance, a shared expert. */
TEST(grad, deepseek_v3_like) {
    gp p;
    moe_config c = base_cfg(8, 3, 6, 4);
    c.score = MOE_SCORE_SIGMOID; c.selection_bias = 1;
    c.n_group = 4; c.topk_group = 2; c.group_score_top = 2;
    c.routed_scale = 2.5f; c.norm_eps = 1e-20f;
    c.seq_balance_coef = 0.2f; c.seq_len = 4;
    c.balance_loss = MOE_BALANCE_TOPK_NORMALIZED; c.balance_coef = 0.1f;
    c.shared_d_ff = 4;
    gp_init(&p, &c, 9, 31);
    grad_check(&p, "DeepSeek-V3");
    CHECK(p.info.aux_seq > 0.0f);
    gp_free(&p);
}

/* V2: softmax, group max (group_score_top 1), NONE, x16, shared expert. */
TEST(grad, deepseek_v2_like) {
    moe_config c = base_cfg(8, 3, 6, 4);
    c.n_group = 4; c.topk_group = 2; c.group_score_top = 1;
    c.normalize = MOE_NORM_NONE; c.routed_scale = 16.0f;
    c.balance_loss = MOE_BALANCE_TOPK_NORMALIZED; c.balance_coef = 0.1f;
    c.shared_d_ff = 4;
    run_grad(&c, 9, 32, "DeepSeek-V2");
    c.group_mask_zero = 1; c.z_loss_coef = 0.05f;
    run_grad(&c, 9, 34, "DeepSeek-V2 group_mask_zero");
}

// ----------------------------------------------------------------------------
// Training-time randomness: noise, jitter, random / sampled second expert

/* Shazeer noisy top-k: H = z + N softplus(x W_noise) + eps, importance and
   smooth load CV^2 with coefficient 0.5; router_noise's gradient included. */
TEST(grad, shazeer_noisy_topk) {
    moe_config c = base_cfg(8, 2, 6, 4);
    c.noise = MOE_NOISE_SHAZEER; c.noise_epsilon = 0.01f;
    c.importance_coef = 0.5f; c.load_coef = 0.5f;
    run_grad(&c, 9, 41, "Shazeer K=2");
    c.top_k = 3; c.seed = 99; c.jitter = 0.05f;
    run_grad(&c, 5, 42, "Shazeer K=3 + jitter");
}

/* K = E: the load is the hard count (a constant); importance still flows. */
TEST(grad, shazeer_k_equals_e) {
    moe_config c = base_cfg(4, 4, 6, 4);
    c.noise = MOE_NOISE_SHAZEER; c.noise_epsilon = 0.01f;
    c.importance_coef = 0.5f; c.load_coef = 0.5f;
    c.normalize = MOE_NORM_NONE;
    run_grad(&c, 5, 43, "Shazeer K=E NONE");
    c.normalize = MOE_NORM_SUM; c.importance_coef = 0.0f;
    run_grad(&c, 5, 44, "Shazeer K=E SUM");
}

/* Switch: top-1, raw softmax, router input jitter; balance + z-loss. */
TEST(grad, switch_jitter) {
    moe_config c = base_cfg(6, 1, 6, 4);
    c.normalize = MOE_NORM_NONE; c.jitter = 0.05f; c.activation = MOE_ACT_GELU;
    c.balance_coef = 0.1f; c.z_loss_coef = 0.05f;
    run_grad(&c, 9, 51, "Switch jitter");
    c.capacity_factor = 1.25f;
    run_grad(&c, 9, 52, "Switch jitter cf=1.25");
}

/* GShard random second expert: some tokens must lose it, some keep it. */
TEST(grad, gshard_random_second) {
    gp p;
    moe_config c = base_cfg(6, 2, 6, 4);
    c.second_expert = MOE_SECOND_RANDOM;
    c.balance_loss = MOE_BALANCE_FIRST_CHOICE; c.balance_coef = 0.1f;
    gp_init(&p, &c, 9, 53);
    grad_check(&p, "GShard random second");
    CHECK(gp_count_dropped(&p, 2) > 0);
    CHECK(gp_count_dropped(&p, 2) < 9);
    gp_free(&p);
    c.capacity = 3; c.balance_loss = MOE_BALANCE_TOPK;
    gp_init(&p, &c, 9, 54);
    grad_check(&p, "GShard random second, capacity 3");
    CHECK(gp_count_dropped(&p, 2) > 0);
    gp_free(&p);
}

TEST(grad, sampled_second) {
    moe_config c = base_cfg(6, 2, 6, 4);
    c.second_expert = MOE_SECOND_SAMPLED;
    c.balance_coef = 0.1f; c.z_loss_coef = 0.05f;
    run_grad(&c, 9, 55, "sampled second");
}

// ----------------------------------------------------------------------------
// Expert choice, dense, Soft MoE

TEST(grad, expert_choice) {
    gp p;
    moe_config c = base_cfg(4, 0, 6, 4);
    c.routing = MOE_ROUTING_EXPERT_CHOICE; c.capacity_factor = 2.0f;
    c.normalize = MOE_NORM_NONE; c.z_loss_coef = 0.05f;
    gp_init(&p, &c, 9, 61);
    grad_check(&p, "expert choice cf=2");
    CHECK_INT(p.info.capacity, 5);
    gp_free(&p);
    c.capacity_factor = 0.0f; c.capacity = 3; c.routed_scale = 2.0f;
    c.score = MOE_SCORE_SIGMOID;
    gp_init(&p, &c, 9, 62);
    grad_check(&p, "expert choice C=3 sigmoid");
    CHECK_INT(p.info.capacity, 3);
    CHECK(p.info.dropped_tokens > 0);   /* 12 picks of 9 tokens: some unpicked */
    gp_free(&p);
}

TEST(grad, dense) {
    moe_config c = base_cfg(4, 0, 6, 4);
    c.routing = MOE_ROUTING_DENSE; c.normalize = MOE_NORM_NONE; c.z_loss_coef = 0.05f;
    run_grad(&c, 5, 63, "dense NONE");
    c.score = MOE_SCORE_SIGMOID; c.normalize = MOE_NORM_SUM; c.routed_scale = 2.0f;
    run_grad(&c, 5, 64, "dense sigmoid SUM");
}

TEST(grad, soft_moe) {
    gp p;
    moe_config c = base_cfg(3, 0, 6, 4);
    c.routing = MOE_ROUTING_SOFT; c.slots_per_expert = 2; c.activation = MOE_ACT_GELU;
    run_grad(&c, 5, 65, "Soft MoE P=2 scale 1.5");
    c.activation = MOE_ACT_SWIGLU;
    run_grad(&c, 9, 66, "Soft MoE P=2 SwiGLU T=9");
    gp_init_ex(&p, &c, 5, 67, 0, 1);   /* soft_scale = NULL -> 1 */
    CHECK(p.w.soft_scale == NULL);
    grad_check(&p, "Soft MoE no scale");
    gp_free(&p);
}

// ----------------------------------------------------------------------------
// Shared expert, biases, activations, fused layout

TEST(grad, shared_expert_gated) {
    moe_config c = base_cfg(6, 2, 6, 4);
    c.shared_d_ff = 5; c.shared_expert_gated = 1;
    c.normalize = MOE_NORM_NONE; c.balance_coef = 0.1f;
    run_grad(&c, 9, 71, "shared gated");
}

TEST(grad, shared_expert_ungated) {
    moe_config c = base_cfg(6, 2, 6, 4);
    c.shared_d_ff = 5; c.balance_coef = 0.1f;
    run_grad(&c, 9, 72, "shared ungated");
}

TEST(grad, expert_and_router_bias) {
    moe_config c = base_cfg(6, 2, 6, 4);
    c.expert_bias = 1; c.router_bias = 1; c.shared_d_ff = 3; c.shared_expert_gated = 1;
    c.balance_coef = 0.1f; c.z_loss_coef = 0.05f;
    run_grad(&c, 9, 73, "biases SwiGLU");
    c.activation = MOE_ACT_GELU_TANH;
    run_grad(&c, 9, 74, "biases GELU_TANH");
}

static void activation_case(moe_activation a, uint32_t seed, const char *v) {
    moe_config c = base_cfg(6, 2, 7, 5);
    c.activation = a; c.shared_d_ff = 3; c.expert_bias = 1;
    c.balance_coef = 0.1f;
    run_grad(&c, 9, seed, v);
}
TEST(grad, act_swiglu)     { activation_case(MOE_ACT_SWIGLU, 81, "SWIGLU"); }
TEST(grad, act_geglu)      { activation_case(MOE_ACT_GEGLU, 82, "GEGLU"); }
TEST(grad, act_geglu_tanh) { activation_case(MOE_ACT_GEGLU_TANH, 83, "GEGLU_TANH"); }
TEST(grad, act_gelu)       { activation_case(MOE_ACT_GELU, 84, "GELU"); }
TEST(grad, act_gelu_tanh)  { activation_case(MOE_ACT_GELU_TANH, 85, "GELU_TANH"); }
TEST(grad, act_silu)       { activation_case(MOE_ACT_SILU, 86, "SILU"); }
/* ReLU: a coordinate whose stencil moves a pre-activation across 0 is
   skipped (the signature holds their signs); >= 80% must remain.       */
TEST(grad, act_relu)       { activation_case(MOE_ACT_RELU, 87, "RELU"); }

TEST(grad, gate_up_fused) {
    gp p;
    moe_config c = base_cfg(6, 2, 6, 4);
    c.balance_coef = 0.1f; c.expert_bias = 1;
    gp_init_ex(&p, &c, 9, 91, 1, 0);
    CHECK(p.w.up == NULL && p.grads.up == NULL && p.n[GT_GATE] == (size_t)6 * 2 * 4 * 6);
    grad_check(&p, "gate_up_fused");
    gp_free(&p);
    c.activation = MOE_ACT_GEGLU; c.expert_bias = 0;
    gp_init_ex(&p, &c, 5, 92, 1, 0);
    grad_check(&p, "gate_up_fused GEGLU");
    gp_free(&p);
}

/* The fused gradient is the unfused one, gate rows then up rows per expert. */
TEST(grad, gate_up_fused_matches_unfused) {
    gp a, b;
    moe_config c = base_cfg(4, 2, 5, 3);
    size_t e, n = (size_t)3 * 5;
    gp_init_ex(&a, &c, 5, 93, 0, 0);
    gp_init_ex(&b, &c, 5, 93, 1, 0);
    memcpy(b.t[GT_X], a.t[GT_X], a.n[GT_X] * sizeof(float));
    memcpy(b.dy, a.dy, a.n[GT_X] * sizeof(float));
    memcpy(b.t[GT_ROUTER], a.t[GT_ROUTER], a.n[GT_ROUTER] * sizeof(float));
    memcpy(b.t[GT_DOWN], a.t[GT_DOWN], a.n[GT_DOWN] * sizeof(float));
    for (e = 0; e < 4; e++) {
        memcpy(b.t[GT_GATE] + e * 2 * n, a.t[GT_GATE] + e * n, n * sizeof(float));
        memcpy(b.t[GT_GATE] + e * 2 * n + n, a.t[GT_UP] + e * n, n * sizeof(float));
    }
    CHECK_STATUS(gp_forward(&a), MOE_STATUS_OK);
    CHECK_STATUS(gp_backward(&a), MOE_STATUS_OK);
    CHECK_STATUS(gp_forward(&b), MOE_STATUS_OK);
    CHECK_STATUS(gp_backward(&b), MOE_STATUS_OK);
    CHECK(memcmp(a.y, b.y, (size_t)5 * 5 * sizeof(float)) == 0);
    CHECK(memcmp(a.g[GT_X], b.g[GT_X], (size_t)5 * 5 * sizeof(float)) == 0);
    for (e = 0; e < 4; e++) {
        CHECK(memcmp(b.g[GT_GATE] + e * 2 * n, a.g[GT_GATE] + e * n, n * sizeof(float)) == 0);
        CHECK(memcmp(b.g[GT_GATE] + e * 2 * n + n, a.g[GT_UP] + e * n, n * sizeof(float)) == 0);
    }
    gp_free(&a);
    gp_free(&b);
}

// ----------------------------------------------------------------------------
// Conventions: recompute, accumulation, dx

/* recompute = 1 (no cache) gives bitwise the gradients of recompute = 0. */
static void recompute_case(const moe_config *c0, int32_t T, uint32_t seed, int fused) {
    gp a, b;
    moe_config c = *c0;
    int k;
    c.recompute = 0;
    gp_init_ex(&a, &c, T, seed, fused, 0);
    c.recompute = 1;
    gp_init_ex(&b, &c, T, seed, fused, 0);
    CHECK(a.info.cache_hidden != NULL && b.info.cache_hidden == NULL);
    CHECK_STATUS(gp_forward(&a), MOE_STATUS_OK);
    CHECK_STATUS(gp_forward(&b), MOE_STATUS_OK);
    CHECK(memcmp(a.y, b.y, (size_t)T * a.D * sizeof(float)) == 0);
    CHECK_STATUS(gp_backward(&a), MOE_STATUS_OK);
    CHECK_STATUS(gp_backward(&b), MOE_STATUS_OK);
    for (k = 0; k < GT_COUNT; k++) {
        CHECK((a.g[k] == NULL) == (b.g[k] == NULL));
        if (a.g[k] && b.g[k] && memcmp(a.g[k], b.g[k], a.n[k] * sizeof(float)) != 0)
            moe_test_fail(__FILE__, __LINE__, "recompute changes d%s", gt_name[k]);
    }
    gp_free(&a);
    gp_free(&b);
}

TEST(grad, recompute_bitwise) {
    moe_config c = base_cfg(6, 2, 6, 4);
    c.balance_coef = 0.1f; c.z_loss_coef = 0.05f;
    recompute_case(&c, 9, 101, 0);
    c.expert_bias = 1; c.shared_d_ff = 3; c.shared_expert_gated = 1; c.capacity = 2;
    recompute_case(&c, 9, 102, 0);
    recompute_case(&c, 9, 103, 1);
    c.activation = MOE_ACT_RELU;
    recompute_case(&c, 9, 104, 0);
    c = base_cfg(8, 3, 6, 4);
    c.noise = MOE_NOISE_SHAZEER; c.noise_epsilon = 0.01f; c.importance_coef = 0.5f;
    c.load_coef = 0.5f; c.jitter = 0.05f;
    recompute_case(&c, 9, 105, 0);
    c = base_cfg(4, 0, 6, 4);
    c.routing = MOE_ROUTING_EXPERT_CHOICE; c.capacity = 3; c.activation = MOE_ACT_GELU;
    recompute_case(&c, 9, 106, 0);
    c.routing = MOE_ROUTING_SOFT; c.capacity = 0; c.slots_per_expert = 2;
    recompute_case(&c, 5, 107, 0);
}

/* Parameter gradients accumulate (+=); dx is overwritten; dx may be NULL. */
TEST(grad, accumulate_and_dx_conventions) {
    gp p;
    moe_config c = base_cfg(8, 3, 6, 4);
    float *first[GT_COUNT], *dx0;
    int k;
    size_t i, n;
    c.score = MOE_SCORE_SIGMOID; c.selection_bias = 1; c.n_group = 4; c.topk_group = 2;
    c.routed_scale = 2.5f; c.seq_balance_coef = 0.1f; c.seq_len = 4; c.balance_coef = 0.1f;
    c.z_loss_coef = 0.05f; c.shared_d_ff = 3; c.shared_expert_gated = 1; c.expert_bias = 1;
    c.router_bias = 1; c.capacity = 3;
    gp_init(&p, &c, 9, 111);
    CHECK_STATUS(gp_forward(&p), MOE_STATUS_OK);
    gp_zero_grads(&p);
    CHECK_STATUS(gp_backward(&p), MOE_STATUS_OK);
    for (k = 0; k < GT_COUNT; k++) {
        first[k] = NULL;
        if (!p.g[k]) continue;
        first[k] = (float *)malloc(p.n[k] * sizeof(float));
        memcpy(first[k], p.g[k], p.n[k] * sizeof(float));
    }
    dx0 = first[GT_X];

    /* second backward on the same grads: parameters double, dx does not */
    CHECK_STATUS(gp_backward(&p), MOE_STATUS_OK);
    for (k = 0; k < GT_COUNT; k++) {
        double mx = 0.0;
        if (!p.g[k]) continue;
        n = p.n[k];
        for (i = 0; i < n; i++) if (fabs(first[k][i]) > mx) mx = fabs(first[k][i]);
        CHECK(mx > 0.0);
        for (i = 0; i < n; i++) {
            const double want = k == GT_X ? first[k][i] : 2.0 * first[k][i];
            if (k == GT_X ? p.g[k][i] != first[k][i]
                          : !(fabs(p.g[k][i] - want) <= 1e-6 * mx + 1e-6 * fabs(want))) {
                moe_test_fail(__FILE__, __LINE__, "twice: d%s[%zu] = %.9g, want %.9g",
                              gt_name[k], i, p.g[k][i], want);
                break;
            }
        }
    }

    /* pre-filled gradients: g = prefill + first */
    for (k = 1; k < GT_COUNT; k++)
        if (p.g[k]) for (i = 0; i < p.n[k]; i++) p.g[k][i] = 0.25f * (float)(i % 7) - 0.5f;
    for (i = 0; i < p.n[GT_X]; i++) p.g[GT_X][i] = (i % 2) ? 1e30f : -NAN;   /* garbage */
    CHECK_STATUS(gp_backward(&p), MOE_STATUS_OK);
    CHECK(memcmp(p.g[GT_X], dx0, p.n[GT_X] * sizeof(float)) == 0);
    for (k = 1; k < GT_COUNT; k++) {
        if (!p.g[k]) continue;
        for (i = 0; i < p.n[k]; i++) {
            const double want = (0.25 * (double)(i % 7) - 0.5) + first[k][i];
            if (!(fabs(p.g[k][i] - want) <= 1e-6 * (1.0 + fabs(want)))) {
                moe_test_fail(__FILE__, __LINE__, "prefilled: d%s[%zu] = %.9g, want %.9g",
                              gt_name[k], i, p.g[k][i], want);
                break;
            }
        }
    }

    /* dx = NULL: accepted, and the parameter gradients are bitwise the same */
    gp_zero_grads(&p);
    CHECK_STATUS(moe_backward(&p.c, &p.w, p.x, p.T, &p.info, p.dy, NULL, &p.grads, p.ws, p.ws_bytes),
                 MOE_STATUS_OK);
    for (k = 1; k < GT_COUNT; k++)
        if (p.g[k] && memcmp(p.g[k], first[k], p.n[k] * sizeof(float)) != 0)
            moe_test_fail(__FILE__, __LINE__, "dx = NULL changes d%s", gt_name[k]);
    /* every grad pointer NULL, dx only: dx unchanged */
    {
        moe_grads none;
        memset(&none, 0, sizeof none);
        memset(p.g[GT_X], 0, p.n[GT_X] * sizeof(float));
        CHECK_STATUS(moe_backward(&p.c, &p.w, p.x, p.T, &p.info, p.dy, p.g[GT_X], &none, p.ws, p.ws_bytes),
                     MOE_STATUS_OK);
        CHECK(memcmp(p.g[GT_X], dx0, p.n[GT_X] * sizeof(float)) == 0);
    }
    for (k = 0; k < GT_COUNT; k++) free(first[k]);
    gp_free(&p);
}

// ----------------------------------------------------------------------------
// router_grad_clip: a property of the backward, not of L (no FD)

/* One token, router bias on: d router_bias = dz_t exactly (the router GEMM
   backward adds dz_t once), so an unclipped run exposes dz_t. A clipped
   run must give dz_t * clip / |dz_t| there, d router = that (x) x_t, and
   dx must move by exactly the router path's share (k - 1) dz_t . W.      */
TEST(grad, router_grad_clip_one_token) {
    gp u, p;
    moe_config c = base_cfg(6, 2, 6, 4);
    double nrm = 0.0, k, got = 0.0;
    int32_t e, d;
    c.router_bias = 1; c.z_loss_coef = 0.05f; c.balance_coef = 0.1f;
    gp_init(&u, &c, 1, 121);
    CHECK_STATUS(gp_forward(&u), MOE_STATUS_OK);
    gp_zero_grads(&u);
    CHECK_STATUS(gp_backward(&u), MOE_STATUS_OK);
    for (e = 0; e < 6; e++) nrm += (double)u.g[GT_ROUTER_BIAS][e] * u.g[GT_ROUTER_BIAS][e];
    nrm = sqrt(nrm);
    CHECK(nrm > 1e-4);

    /* a large clip changes nothing, bitwise */
    c.router_grad_clip = (float)(10.0 * nrm);
    gp_init(&p, &c, 1, 121);
    CHECK_STATUS(gp_forward(&p), MOE_STATUS_OK);
    gp_zero_grads(&p);
    CHECK_STATUS(gp_backward(&p), MOE_STATUS_OK);
    CHECK(memcmp(p.g[GT_ROUTER], u.g[GT_ROUTER], u.n[GT_ROUTER] * sizeof(float)) == 0);
    CHECK(memcmp(p.g[GT_X], u.g[GT_X], u.n[GT_X] * sizeof(float)) == 0);
    gp_free(&p);

    /* a tiny clip: the router-logit gradient is rescaled to norm clip */
    c.router_grad_clip = (float)(0.25 * nrm);
    k = (double)c.router_grad_clip / nrm;
    gp_init(&p, &c, 1, 121);
    CHECK_STATUS(gp_forward(&p), MOE_STATUS_OK);
    gp_zero_grads(&p);
    CHECK_STATUS(gp_backward(&p), MOE_STATUS_OK);
    for (e = 0; e < 6; e++) {
        got += (double)p.g[GT_ROUTER_BIAS][e] * p.g[GT_ROUTER_BIAS][e];
        CHECK_NEAR(p.g[GT_ROUTER_BIAS][e], k * u.g[GT_ROUTER_BIAS][e], 1e-6 * nrm, 1e-5);
        for (d = 0; d < 6; d++)
            CHECK_NEAR(p.g[GT_ROUTER][e * 6 + d], (double)p.g[GT_ROUTER_BIAS][e] * p.x[d], 1e-6 * nrm, 1e-5);
    }
    CHECK_NEAR(sqrt(got), c.router_grad_clip, 1e-6 * nrm, 1e-5);
    for (d = 0; d < 6; d++) {
        double router_part = 0.0;
        for (e = 0; e < 6; e++) router_part += (double)u.g[GT_ROUTER_BIAS][e] * p.t[GT_ROUTER][e * 6 + d];
        CHECK_NEAR(p.g[GT_X][d], u.g[GT_X][d] + (k - 1.0) * router_part, 1e-6 * (1.0 + nrm), 1e-5);
    }
    /* the expert weights do not see the clip */
    CHECK(memcmp(p.g[GT_GATE], u.g[GT_GATE], u.n[GT_GATE] * sizeof(float)) == 0);
    CHECK(memcmp(p.g[GT_DOWN], u.g[GT_DOWN], u.n[GT_DOWN] * sizeof(float)) == 0);
    gp_free(&p);
    gp_free(&u);
}

/* Several tokens, no aux loss, dropless: each token's dz_t is what it gets
   alone (one-token runs), and the batch's router bias gradient must be
   sum_t dz_t * min(1, clip / |dz_t|), with a clip between the norms.     */
TEST(grad, router_grad_clip_per_token) {
    enum { T = 5, E = 6, D = 6 };
    gp b, one;
    moe_config c = base_cfg(E, 2, D, 4);
    double dz[T][E], nrm[T], want[E], lo = 1e30, hi = 0.0, clip;
    int32_t t, e, clipped = 0;
    c.router_bias = 1;
    gp_init(&b, &c, T, 131);
    for (t = 0; t < T; t++) {
        gp_init(&one, &c, 1, 131);
        memcpy(one.t[GT_X], b.x + (size_t)t * D, D * sizeof(float));
        memcpy(one.dy, b.dy + (size_t)t * D, D * sizeof(float));
        memcpy(one.t[GT_ROUTER], b.t[GT_ROUTER], (size_t)E * D * sizeof(float));
        memcpy(one.t[GT_ROUTER_BIAS], b.t[GT_ROUTER_BIAS], E * sizeof(float));
        memcpy(one.t[GT_GATE], b.t[GT_GATE], b.n[GT_GATE] * sizeof(float));
        memcpy(one.t[GT_UP], b.t[GT_UP], b.n[GT_UP] * sizeof(float));
        memcpy(one.t[GT_DOWN], b.t[GT_DOWN], b.n[GT_DOWN] * sizeof(float));
        CHECK_STATUS(gp_forward(&one), MOE_STATUS_OK);
        gp_zero_grads(&one);
        CHECK_STATUS(gp_backward(&one), MOE_STATUS_OK);
        nrm[t] = 0.0;
        for (e = 0; e < E; e++) { dz[t][e] = one.g[GT_ROUTER_BIAS][e]; nrm[t] += dz[t][e] * dz[t][e]; }
        nrm[t] = sqrt(nrm[t]);
        if (nrm[t] < lo) lo = nrm[t];
        if (nrm[t] > hi) hi = nrm[t];
        gp_free(&one);
    }
    CHECK(hi > 1.5 * lo);
    clip = 0.5 * (lo + hi);
    for (e = 0; e < E; e++) want[e] = 0.0;
    for (t = 0; t < T; t++) {
        const double k = nrm[t] > clip ? clip / nrm[t] : 1.0;
        clipped += nrm[t] > clip;
        for (e = 0; e < E; e++) want[e] += k * dz[t][e];
    }
    CHECK(clipped > 0 && clipped < T);
    b.c.router_grad_clip = (float)clip;
    CHECK_STATUS(gp_forward(&b), MOE_STATUS_OK);
    gp_zero_grads(&b);
    CHECK_STATUS(gp_backward(&b), MOE_STATUS_OK);
    for (e = 0; e < E; e++) CHECK_NEAR(b.g[GT_ROUTER_BIAS][e], want[e], 1e-6 * hi, 1e-5);
    gp_free(&b);
}

/* Expert dropout: the mask is a function of the seed, so the layer is smooth
   in every weight for a fixed seed; its gradient passes through the same
   mask (routed experts; the soft variant keys the mask by slot).           */
TEST(grad, expert_dropout) {
    moe_config c = base_cfg(6, 2, 6, 4);
    c.expert_dropout = 0.3f; c.seed = 5; c.balance_coef = 0.1f; c.shared_d_ff = 3;
    run_grad(&c, 9, 81, "expert dropout");
    c.recompute = 1;
    run_grad(&c, 9, 82, "expert dropout, recompute");
    c = base_cfg(4, 2, 6, 4);
    c.routing = MOE_ROUTING_SOFT; c.top_k = 0; c.slots_per_expert = 2; c.expert_dropout = 0.25f;
    run_grad(&c, 7, 83, "expert dropout, Soft MoE");
}

/* Warm-up router noise: additive, so d/dz is unchanged; the noise is drawn
   from the seed, so finite differences see a fixed function.             */
TEST(grad, warmup_router_noise) {
    moe_config c = base_cfg(6, 2, 6, 4);
    c.router_noise_std = 0.5f; c.seed = 9; c.balance_coef = 0.1f; c.z_loss_coef = 0.05f;
    run_grad(&c, 9, 84, "warm-up noise");
    c.noise = MOE_NOISE_SHAZEER; c.noise_epsilon = 0.01f; c.importance_coef = 0.5f; c.load_coef = 0.5f;
    run_grad(&c, 9, 85, "warm-up noise + Shazeer");
}

/* save_for_backward = 1 with training = 0: an eval-mode forward keeps what
   the backward reads. Shazeer and warm-up noise, jitter and expert dropout
   are configured but off, so finite differences agree, and the gradients
   (dx too) are bitwise those of the same layer without those knobs; the
   unused noise weights get a zero gradient.                               */
TEST(grad, save_for_backward_eval_mode) {
    moe_config c = base_cfg(6, 2, 6, 4), clean;
    gp a, b;
    size_t i;
    int k;
    c.training = 0; c.seed = 13;
    c.balance_coef = 0.1f; c.z_loss_coef = 0.05f; c.importance_coef = 0.5f; c.load_coef = 0.5f;
    c.noise = MOE_NOISE_SHAZEER; c.noise_epsilon = 0.01f; c.jitter = 0.1f;
    c.router_noise_std = 0.5f; c.expert_dropout = 0.3f;
    run_grad(&c, 9, 86, "eval mode, save_for_backward");
    clean = c;
    clean.noise = MOE_NOISE_NONE; clean.noise_epsilon = 0.0f; clean.jitter = 0.0f;
    clean.router_noise_std = 0.0f; clean.expert_dropout = 0.0f;
    gp_init(&a, &c, 9, 87);
    gp_init(&b, &clean, 9, 87);
    CHECK_STATUS(gp_forward(&a), MOE_STATUS_OK);
    CHECK_STATUS(gp_forward(&b), MOE_STATUS_OK);
    CHECK(memcmp(a.y, b.y, (size_t)9 * 6 * sizeof(float)) == 0);
    gp_zero_grads(&a); gp_zero_grads(&b);
    CHECK_STATUS(gp_backward(&a), MOE_STATUS_OK);
    CHECK_STATUS(gp_backward(&b), MOE_STATUS_OK);
    for (k = 0; k < GT_COUNT; k++) {
        if (!b.g[k]) continue;
        CHECK(a.g[k] != NULL);
        if (a.g[k] && memcmp(a.g[k], b.g[k], b.n[k] * sizeof(float)) != 0)
            moe_test_fail(__FILE__, __LINE__, "%s: not bitwise the clean layer's", gt_name[k]);
    }
    CHECK(a.g[GT_ROUTER_NOISE] != NULL && b.g[GT_ROUTER_NOISE] == NULL);
    for (i = 0; a.g[GT_ROUTER_NOISE] && i < a.n[GT_ROUTER_NOISE]; i++)
        CHECK(a.g[GT_ROUTER_NOISE][i] == 0.0f);
    gp_free(&a); gp_free(&b);
}
