/* The call contract (issue 15): what may alias, what moe_backward accepts as
   its cache, the packed blob's length, what packing accepts, and T = 0. Each
   test here is one way to get status OK with a wrong answer (or a read out
   of bounds) from moe.h 0.3.1.                                              */
#include "../moe.h"
#include "moe_test.h"
#include <stdint.h>

enum { CE = 16, CD = 20, CF = 24, CFS = 16, CT = 7 };

/* A layer of any family: every tensor allocated (NULL where the config has
   no use for it does not matter: moe.h reads only what the config uses). */
typedef struct clayer {
    moe_config c;
    moe_weights w;
    moe_grads p;        /* the same tensors, writable (moe_init_weights fills them) */
    float *x;
    int32_t T;
} clayer;

static float *cl_alloc(size_t n) { return (float *)calloc(n ? n : 1, sizeof(float)); }

static void cl_make(clayer *L, moe_config c, int32_t T, uint64_t seed) {
    const size_t E = (size_t)c.num_experts, D = (size_t)c.d_model, F = (size_t)c.d_ff;
    const size_t Fs = (size_t)c.shared_d_ff;
    const size_t R = E * (size_t)(c.slots_per_expert ? c.slots_per_expert : 1);
    size_t i;
    memset(L, 0, sizeof *L);
    L->c = c; L->T = T;
    L->p.router = cl_alloc(E * D); L->p.router_bias = cl_alloc(E);
    L->p.router_noise = cl_alloc(E * D);
    L->p.gate = cl_alloc(E * F * D); L->p.up = cl_alloc(E * F * D); L->p.down = cl_alloc(E * D * F);
    L->p.gate_bias = cl_alloc(E * F); L->p.up_bias = cl_alloc(E * F);
    L->p.down_bias = cl_alloc(E * D);
    L->p.shared_gate = cl_alloc(Fs * D); L->p.shared_up = cl_alloc(Fs * D);
    L->p.shared_down = cl_alloc(D * Fs); L->p.shared_gate_bias = cl_alloc(Fs);
    L->p.shared_up_bias = cl_alloc(Fs); L->p.shared_down_bias = cl_alloc(D);
    L->p.shared_expert_gate = cl_alloc(D);
    L->p.soft_phi = cl_alloc(R * D); L->p.soft_scale = cl_alloc(1);
    CHECK_STATUS(moe_init_weights(&c, MOE_INIT_XAVIER, seed, &L->p), MOE_STATUS_OK);
    L->w.router = L->p.router; L->w.router_bias = L->p.router_bias;
    L->w.router_noise = L->p.router_noise;
    L->w.selection_bias = L->p.router_bias;   /* any finite [E] */
    L->w.gate = L->p.gate; L->w.up = L->p.up; L->w.down = L->p.down;
    L->w.gate_bias = L->p.gate_bias; L->w.up_bias = L->p.up_bias; L->w.down_bias = L->p.down_bias;
    L->w.shared_gate = L->p.shared_gate; L->w.shared_up = L->p.shared_up;
    L->w.shared_down = L->p.shared_down; L->w.shared_gate_bias = L->p.shared_gate_bias;
    L->w.shared_up_bias = L->p.shared_up_bias; L->w.shared_down_bias = L->p.shared_down_bias;
    L->w.shared_expert_gate = L->p.shared_expert_gate;
    L->w.soft_phi = L->p.soft_phi; L->w.soft_scale = L->p.soft_scale;
    L->x = cl_alloc((size_t)T * D);
    for (i = 0; i < (size_t)T * D; i++) L->x[i] = (float)sin(0.37 * (double)i + (double)seed);
}

static void cl_free(clayer *L) {
    float **t = &L->p.router;
    int k;
    for (k = 0; k < 18; k++) free(t[k]);   /* moe_grads: 18 float pointers first */
    free(L->x);
}

/* Gradient buffers of a layer (zeroed), in moe_grads form. */
static moe_grads cl_grads(const clayer *L) {
    moe_grads g;
    const size_t E = (size_t)L->c.num_experts, D = (size_t)L->c.d_model, F = (size_t)L->c.d_ff;
    const size_t Fs = (size_t)L->c.shared_d_ff;
    const size_t R = E * (size_t)(L->c.slots_per_expert ? L->c.slots_per_expert : 1);
    memset(&g, 0, sizeof g);
    g.router = cl_alloc(E * D); g.router_bias = cl_alloc(E); g.router_noise = cl_alloc(E * D);
    g.gate = cl_alloc(E * F * D); g.up = cl_alloc(E * F * D); g.down = cl_alloc(E * D * F);
    g.gate_bias = cl_alloc(E * F); g.up_bias = cl_alloc(E * F); g.down_bias = cl_alloc(E * D);
    g.shared_gate = cl_alloc(Fs * D); g.shared_up = cl_alloc(Fs * D);
    g.shared_down = cl_alloc(D * Fs);
    g.shared_gate_bias = cl_alloc(Fs); g.shared_up_bias = cl_alloc(Fs);
    g.shared_down_bias = cl_alloc(D);
    g.shared_expert_gate = cl_alloc(D); g.soft_phi = cl_alloc(R * D); g.soft_scale = cl_alloc(1);
    return g;
}
static void cl_grads_free(moe_grads *g) {
    float **t = &g->router;
    int k;
    for (k = 0; k < 18; k++) free(t[k]);
}
/* Bitwise equality of two gradient sets of layer L. */
static int cl_grads_equal(const clayer *L, const moe_grads *a, const moe_grads *b) {
    const size_t E = (size_t)L->c.num_experts, D = (size_t)L->c.d_model, F = (size_t)L->c.d_ff;
    const size_t Fs = (size_t)L->c.shared_d_ff;
    const size_t R = E * (size_t)(L->c.slots_per_expert ? L->c.slots_per_expert : 1);
    const size_t n[18] = {E * D, E, E * D, E * F * D, E * F * D, E * D * F, E * F, E * F, E * D,
                          Fs * D, Fs * D, D * Fs, Fs, Fs, D, D, R * D, 1};
    float *const *pa = &a->router, *const *pb = &b->router;
    int k;
    for (k = 0; k < 18; k++)
        if (n[k] && memcmp(pa[k], pb[k], n[k] * sizeof(float)) != 0) return 0;
    return 1;
}

/* An info bound for (c, T) in a fresh buffer (caller frees *buf). */
static void cl_bind(const moe_config *c, int32_t T, moe_info *info, void **buf) {
    size_t bytes = 0;
    memset(info, 0, sizeof *info);
    CHECK_STATUS(moe_info_size(c, T, &bytes), MOE_STATUS_OK);
    *buf = malloc(bytes);
    CHECK_STATUS(moe_info_bind(c, T, info, *buf, bytes), MOE_STATUS_OK);
}

/* The families, shrunk: every routing family and each in-place hazard
   (shared experts, the Qwen2 shared gate, noise, jitter, Soft MoE). */
static int cl_family(int i, moe_config *c, const char **name) {
    static const struct { const char *name; moe_config (*make)(void); } fam[] = {
        {"mixtral", moe_preset_mixtral}, {"switch", moe_preset_switch},
        {"gshard", moe_preset_gshard}, {"shazeer", moe_preset_shazeer},
        {"qwen2_moe", moe_preset_qwen2_moe}, {"qwen3_moe", moe_preset_qwen3_moe},
        {"olmoe", moe_preset_olmoe}, {"dbrx", moe_preset_dbrx}, {"jamba", moe_preset_jamba},
        {"deepseek_v2", moe_preset_deepseek_v2}, {"deepseek_v3", moe_preset_deepseek_v3},
        {"expert_choice", moe_preset_expert_choice}, {"soft_moe", moe_preset_soft_moe},
        {"dense", moe_preset_dense}, {"glam", moe_preset_glam},
        {"topk_softmax", moe_preset_topk_softmax}};
    if (i >= (int)(sizeof fam / sizeof fam[0])) return 0;
    *c = fam[i].make();
    *name = fam[i].name;
    c->num_experts = CE; c->d_model = CD; c->d_ff = CF;
    if (c->shared_d_ff) c->shared_d_ff = CFS;
    if (c->routing == MOE_ROUTING_TOPK && c->top_k > 8) c->top_k = 8;
    c->seed = 99;
    return 1;
}

/* --- 1. aliasing ----------------------------------------------------------- */

/* Every family forward with y == x gives the out-of-place y bitwise, and the
   backward with dx == dy and with dx == x the out-of-place dx and grads
   (0.3.1: Qwen2-MoE's shared gate read x after the combine overwrote it). */
TEST(contract, in_place_every_family) {
    int i;
    moe_config c;
    const char *name;
    for (i = 0; cl_family(i, &c, &name); i++) {
        clayer L;
        moe_info info;
        void *ibuf;
        moe_grads g0, g1, g2;
        const size_t TD = (size_t)CT * CD;
        float *y = cl_alloc(TD), *buf = cl_alloc(TD), *dy = cl_alloc(TD), *dx = cl_alloc(TD);
        size_t k;
        c.training = 1; c.save_for_backward = 1;
        cl_make(&L, c, CT, 5 + (uint64_t)i);
        for (k = 0; k < TD; k++) dy[k] = (float)cos(0.11 * (double)k);
        cl_bind(&c, CT, &info, &ibuf);
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, CT, y, &info), MOE_STATUS_OK);
        memcpy(buf, L.x, TD * sizeof(float));
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, buf, CT, buf, &info), MOE_STATUS_OK);
        if (memcmp(buf, y, TD * sizeof(float)) != 0)
            moe_test_fail(__FILE__, __LINE__, "%s: forward in place differs", name);

        g0 = cl_grads(&L); g1 = cl_grads(&L); g2 = cl_grads(&L);
        CHECK_STATUS(moe_backward_alloc(&c, &L.w, L.x, CT, &info, dy, dx, &g0), MOE_STATUS_OK);
        memcpy(buf, dy, TD * sizeof(float));                   /* dx == dy */
        CHECK_STATUS(moe_backward_alloc(&c, &L.w, L.x, CT, &info, buf, buf, &g1), MOE_STATUS_OK);
        if (memcmp(buf, dx, TD * sizeof(float)) != 0 || !cl_grads_equal(&L, &g0, &g1))
            moe_test_fail(__FILE__, __LINE__, "%s: backward with dx == dy differs", name);
        memcpy(buf, L.x, TD * sizeof(float));                  /* dx == x */
        CHECK_STATUS(moe_backward_alloc(&c, &L.w, buf, CT, &info, dy, buf, &g2), MOE_STATUS_OK);
        if (memcmp(buf, dx, TD * sizeof(float)) != 0 || !cl_grads_equal(&L, &g0, &g2))
            moe_test_fail(__FILE__, __LINE__, "%s: backward with dx == x differs", name);
        cl_grads_free(&g0); cl_grads_free(&g1); cl_grads_free(&g2);
        free(y); free(buf); free(dy); free(dx); free(ibuf);
        cl_free(&L);
    }
}

/* Overlaps other than the allowed in-place pairs: MOE_STATUS_ALIASING with
   nothing written (0.3.1: status OK, y 0.11 off for y inside the info). */
TEST(contract, forward_overlaps_refused) {
    moe_config c = moe_preset_qwen2_moe();
    clayer L;
    moe_info info, bad;
    void *ibuf;
    size_t ws_bytes = 0, k;
    const size_t TD = (size_t)CT * CD;
    unsigned char *ws;
    float *big, *y = cl_alloc(TD);
    c.num_experts = CE; c.d_model = CD; c.d_ff = CF; c.shared_d_ff = CFS;
    c.training = 1; c.save_for_backward = 1;
    cl_make(&L, c, CT, 3);
    cl_bind(&c, CT, &info, &ibuf);
    CHECK_STATUS(moe_forward_workspace_size(&c, CT, &ws_bytes), MOE_STATUS_OK);
    ws = (unsigned char *)malloc(ws_bytes + TD * sizeof(float));
    big = cl_alloc(3 * TD);
    for (k = 0; k < 7; k++) {
        float *yy = y;
        const float *xx = L.x;
        moe_weights w = L.w;
        size_t wsb = ws_bytes;
        unsigned char *wsp = ws;
        bad = info;
        memcpy(big, L.x, TD * sizeof(float));
        switch (k) {
        case 0: xx = big; yy = big + 1; break;                        /* y one float past x */
        case 1: yy = (float *)(void *)ws; break;                      /* y in the workspace */
        case 2: yy = info.logits; break;                              /* y in the info */
        case 3: bad.scores = bad.logits; break;                       /* two info arrays */
        case 4: xx = (float *)(void *)(ws + ws_bytes - 8); wsb = ws_bytes; break; /* x in the ws */
        case 5: yy = (float *)L.p.shared_expert_gate; break;          /* y over a weight */
        default: bad.cache_out = yy; break;                           /* cache over y */
        }
        memset(big + TD, 0x5a, 2 * TD * sizeof(float));
        if (k == 4) memcpy(ws + ws_bytes - 8, L.x, TD * sizeof(float));
        if (moe_forward(&c, &w, xx, CT, yy, &bad, wsp, wsb) != MOE_STATUS_ALIASING)
            moe_test_fail(__FILE__, __LINE__, "overlap %d: not ALIASING", (int)k);
        if (k == 0 && memcmp(big, L.x, TD * sizeof(float)) != 0)
            moe_test_fail(__FILE__, __LINE__, "overlap 0: x was written");
    }
    CHECK_STATUS(moe_forward(&c, &L.w, L.x, CT, y, &info, ws, ws_bytes), MOE_STATUS_OK);
    free(big); free(y); free(ws); free(ibuf);
    cl_free(&L);
}

TEST(contract, backward_overlaps_refused) {
    moe_config c = moe_preset_mixtral();
    clayer L;
    moe_info info;
    void *ibuf;
    size_t ws_bytes = 0, k;
    const size_t TD = (size_t)CT * CD;
    unsigned char *ws;
    float *y = cl_alloc(TD), *dy = cl_alloc(TD), *dx = cl_alloc(TD);
    float *want = cl_alloc((size_t)CE * CF * CD);
    moe_grads g;
    c.num_experts = CE; c.d_model = CD; c.d_ff = CF; c.training = 1; c.save_for_backward = 1;
    cl_make(&L, c, CT, 4);
    g = cl_grads(&L);
    for (k = 0; k < TD; k++) dy[k] = 0.25f;
    cl_bind(&c, CT, &info, &ibuf);
    CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, CT, y, &info), MOE_STATUS_OK);
    CHECK_STATUS(moe_backward_workspace_size(&c, CT, &ws_bytes), MOE_STATUS_OK);
    ws = (unsigned char *)malloc(ws_bytes);
    for (k = 0; k < 7; k++) {
        moe_grads gg = g;
        moe_weights w = L.w;
        float *dxx = dx;
        memcpy(want, g.gate, (size_t)CE * CF * CD * sizeof(float));
        switch (k) {
        case 0: dxx = (float *)(void *)ws; break;                 /* dx in the workspace */
        case 1: gg.gate = dy; break;                              /* a gradient over dy */
        case 2: gg.router = (float *)L.w.router; break;           /* gradient == weight */
        case 3: dxx = info.cache_out; break;                      /* dx over the cache */
        case 4: gg.up = gg.gate + 1; break;                       /* two gradients */
        case 5: dxx = dy + 1; break;                              /* dx one float past dy */
        default: gg.down = (float *)(void *)(ws + 64); break;     /* gradient in the ws */
        }
        if (moe_backward(&c, &w, L.x, CT, &info, dy, dxx, &gg, ws, ws_bytes) != MOE_STATUS_ALIASING)
            moe_test_fail(__FILE__, __LINE__, "overlap %d: not ALIASING", (int)k);
        if (memcmp(want, g.gate, (size_t)CE * CF * CD * sizeof(float)) != 0)
            moe_test_fail(__FILE__, __LINE__, "overlap %d: a gradient was written", (int)k);
    }
    CHECK_STATUS(moe_backward(&c, &L.w, L.x, CT, &info, dy, dx, &g, ws, ws_bytes), MOE_STATUS_OK);
    cl_grads_free(&g);
    free(y); free(dy); free(dx); free(want); free(ws); free(ibuf);
    cl_free(&L);
}

TEST(contract, route_and_pack_overlaps_refused) {
    moe_config c = moe_preset_mixtral(), r;
    clayer L;
    moe_info info;
    void *ibuf, *ws;
    size_t bytes = 0;
    float logits[CT * CE];
    int32_t k;
    c.num_experts = CE; c.d_model = CD; c.d_ff = CF;
    cl_make(&L, c, CT, 6);
    for (k = 0; k < CT * CE; k++) logits[k] = (float)sin(k);
    cl_bind(&c, CT, &info, &ibuf);
    CHECK_STATUS(moe_route_workspace_size(&c, CT, &bytes), MOE_STATUS_OK);
    ws = malloc(bytes);
    CHECK_STATUS(moe_route(&c, NULL, info.scores, NULL, CT, &info, ws, bytes), MOE_STATUS_ALIASING);
    CHECK_STATUS(moe_route(&c, NULL, logits, NULL, CT, &info, logits, sizeof logits),
                 MOE_STATUS_ALIASING);
    CHECK_STATUS(moe_route(&c, NULL, logits, NULL, CT, &info, ws, bytes), MOE_STATUS_OK);
    free(ws);
    moe_config_resolve(&c, &r);
    if (r.isa != MOE_ISA_REFERENCE) {   /* a blob written over its own source */
        CHECK_STATUS(moe_pack_size(&c, &bytes), MOE_STATUS_OK);
        CHECK_STATUS(moe_pack_weights(&c, &L.w, L.p.gate, bytes), MOE_STATUS_ALIASING);
    }
    free(ibuf);
    cl_free(&L);
}

/* --- 2-3. the backward checks its cache against the call ------------------- */

/* A forward of one config or T, the backward of another: BAD_CACHE before
   any array is read (0.3.1: top_k 1 -> 2 or T 32 -> 64 read past info's
   arrays, allocated at their documented sizes; 2 -> 1, another
   normalisation or activation: status OK, gradients off by up to 0.48).  */
TEST(contract, backward_other_config_or_t) {
    int k;
    for (k = 0; k < 8; k++) {
        moe_config c = moe_preset_mixtral(), cb;
        clayer L;
        moe_info info;
        void *ibuf;
        const int32_t T = 32, Tb = k == 1 ? 64 : 32;
        float *y = cl_alloc((size_t)64 * CD), *dy = cl_alloc((size_t)64 * CD);
        float *dx = cl_alloc((size_t)64 * CD), *xb = cl_alloc((size_t)64 * CD);
        moe_grads g;
        c.num_experts = CE; c.d_model = CD; c.d_ff = CF; c.training = 1; c.save_for_backward = 1;
        c.top_k = k == 0 ? 1 : 2;
        cb = c;
        switch (k) {
        case 0: cb.top_k = 2; break;
        case 1: break;                                   /* T 32 -> 64 */
        case 2: cb.top_k = 1; break;
        case 3: cb.normalize = MOE_NORM_NONE; break;
        case 4: cb.activation = MOE_ACT_GEGLU; break;
        case 5: cb.seed = 7; break;
        case 6: cb.balance_coef = 0.5f; break;
        default: cb.training = 0; break;
        }
        cl_make(&L, c, T, 8);
        memcpy(xb, L.x, (size_t)T * CD * sizeof(float));
        g = cl_grads(&L);
        cl_bind(&c, T, &info, &ibuf);   /* exactly the documented sizes */
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, T, y, &info), MOE_STATUS_OK);
        if (moe_backward_alloc(&cb, &L.w, xb, Tb, &info, dy, dx, &g) != MOE_STATUS_BAD_CACHE)
            moe_test_fail(__FILE__, __LINE__, "case %d: not BAD_CACHE", k);
        CHECK_STATUS(moe_backward_alloc(&c, &L.w, xb, T, &info, dy, dx, &g), MOE_STATUS_OK);
        cl_grads_free(&g);
        free(y); free(dy); free(dx); free(xb); free(ibuf);
        cl_free(&L);
    }
}

/* Kernel choices are not part of the cache: a SIMD forward's info serves a
   reference backward, another thread count, or a gradient clip (nor is
   save_for_backward, which only the forward reads); and a recompute
   backward runs on the info of a forward that kept its cache. */
TEST(contract, backward_kernel_fields_free) {
    moe_config c = moe_preset_mixtral(), cb;
    clayer L;
    moe_info info;
    void *ibuf;
    float *y = cl_alloc((size_t)CT * CD), *dy = cl_alloc((size_t)CT * CD);
    float *dx = cl_alloc((size_t)CT * CD);
    moe_grads g;
    c.num_experts = CE; c.d_model = CD; c.d_ff = CF; c.training = 1; c.save_for_backward = 1;
    cl_make(&L, c, CT, 9);
    g = cl_grads(&L);
    cl_bind(&c, CT, &info, &ibuf);
    CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, CT, y, &info), MOE_STATUS_OK);
    cb = c; cb.isa = MOE_ISA_REFERENCE; cb.num_threads = 1; cb.router_grad_clip = 0.5f;
    cb.pack_bf16 = 1; cb.save_for_backward = 0;
    CHECK_STATUS(moe_backward_alloc(&cb, &L.w, L.x, CT, &info, dy, dx, &g), MOE_STATUS_OK);
    cb.recompute = 1;   /* a recompute backward may ignore a kept cache */
    CHECK_STATUS(moe_backward_alloc(&cb, &L.w, L.x, CT, &info, dy, dx, &g), MOE_STATUS_OK);
    cl_grads_free(&g);
    free(y); free(dy); free(dx); free(ibuf);
    cl_free(&L);
}

/* The cache is valid from a save_for_backward forward until anything
   rewrites the arrays: an evaluation forward through the same info clears it
   (MISSING_CACHE; 0.3.1: OK, off by 0.66), so does moe_info_bind; a forward
   through another info bound to the same buffer is seen by the checksum
   (BAD_CACHE); an evaluation forward alone never made one (0.3.1: OK, off by
   0.48), nor does a train-mode forward that does not save (MISSING_CACHE),
   nor a recompute forward fill the activation cache bound for it. A
   forward with info = NULL leaves the cache as it was. */
TEST(contract, stale_cache) {
    int k;
    for (k = 0; k < 8; k++) {
        moe_config c = moe_preset_switch(), ev, rc, tr;
        clayer L;
        moe_info info, other;
        void *ibuf;
        size_t bytes = 0;
        const size_t TD = (size_t)CT * CD;
        float *y = cl_alloc(TD), *dy = cl_alloc(TD), *dx = cl_alloc(TD), *xb = cl_alloc(TD);
        moe_grads g;
        moe_status want = MOE_STATUS_OK, st;
        size_t i;
        c.num_experts = CE; c.d_model = CD; c.d_ff = CF; c.training = 1; c.save_for_backward = 1;
        ev = c; ev.training = 0; ev.save_for_backward = 0;
        rc = c; rc.recompute = 1;
        tr = c; tr.save_for_backward = 0;   /* train mode (jitter), nothing saved */
        cl_make(&L, c, CT, 10);
        for (i = 0; i < TD; i++) { dy[i] = 1.0f; xb[i] = -L.x[i]; }   /* batch B */
        g = cl_grads(&L);
        cl_bind(&c, CT, &info, &ibuf);
        CHECK_STATUS(moe_forward_alloc(k == 3 ? &ev : k == 6 ? &rc : k == 7 ? &tr : &c, &L.w, L.x,
                                       CT, y, &info),
                     MOE_STATUS_OK);
        switch (k) {
        case 0:
            CHECK_STATUS(moe_forward_alloc(&ev, &L.w, xb, CT, y, &info), MOE_STATUS_OK);
            want = MOE_STATUS_MISSING_CACHE;
            break;
        case 1:
            CHECK_STATUS(moe_info_size(&c, CT, &bytes), MOE_STATUS_OK);
            CHECK_STATUS(moe_info_bind(&c, CT, &info, ibuf, bytes), MOE_STATUS_OK);
            want = MOE_STATUS_MISSING_CACHE;
            break;
        case 2:
            CHECK_STATUS(moe_info_size(&c, CT, &bytes), MOE_STATUS_OK);
            memset(&other, 0, sizeof other);
            CHECK_STATUS(moe_info_bind(&ev, CT, &other, ibuf, bytes), MOE_STATUS_OK);
            CHECK_STATUS(moe_forward_alloc(&ev, &L.w, xb, CT, y, &other), MOE_STATUS_OK);
            want = MOE_STATUS_BAD_CACHE;
            break;
        case 3: want = MOE_STATUS_MISSING_CACHE; break;   /* never a saving forward */
        case 4: CHECK_STATUS(moe_forward_alloc(&ev, &L.w, xb, CT, y, NULL), MOE_STATUS_OK); break;
        case 5: info.weight[0] += 1.0f; want = MOE_STATUS_BAD_CACHE; break;   /* edited */
        case 6: want = MOE_STATUS_BAD_CACHE; break;   /* cache arrays bound, not written */
        default: want = MOE_STATUS_MISSING_CACHE; break;   /* training = 1 alone saves nothing */
        }
        st = moe_backward_alloc(&c, &L.w, L.x, CT, &info, dy, dx, &g);
        if (st != want)
            moe_test_fail(__FILE__, __LINE__, "case %d: %s, want %s", k, moe_status_string(st),
                          moe_status_string(want));
        cl_grads_free(&g);
        free(y); free(dy); free(dx); free(xb); free(ibuf);
        cl_free(&L);
    }
}

/* --- 5. a packed blob has a length ---------------------------------------- */

/* A truncated blob with a valid header, or a w.packed_bytes short of the
   header's size, is BAD_PACKED (0.3.1 read past the end: ASan). */
TEST(contract, packed_blob_length) {
    moe_config c = moe_preset_mixtral(), r;
    clayer L;
    size_t bytes = 0;
    unsigned char *blob, *cut;
    float *y = cl_alloc((size_t)CT * CD), *want = cl_alloc((size_t)CT * CD);
    moe_weights w;
    c.num_experts = CE; c.d_model = CD; c.d_ff = CF;
    CHECK_STATUS(moe_config_resolve(&c, &r), MOE_STATUS_OK);
    if (r.isa == MOE_ISA_REFERENCE) { free(y); free(want); SKIP("no SIMD ISA in this build"); }
    cl_make(&L, c, CT, 11);
    CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, CT, want, NULL), MOE_STATUS_OK);
    CHECK_STATUS(moe_pack_size(&c, &bytes), MOE_STATUS_OK);
    blob = (unsigned char *)malloc(bytes);
    CHECK_STATUS(moe_pack_weights(&c, &L.w, blob, bytes), MOE_STATUS_OK);
    cut = (unsigned char *)malloc(bytes / 2);              /* header + half the panels */
    memcpy(cut, blob, bytes / 2);
    w = L.w;
    w.gate = w.up = w.down = NULL;
    w.packed = cut; w.packed_bytes = bytes / 2;
    CHECK_STATUS(moe_forward_alloc(&c, &w, L.x, CT, y, NULL), MOE_STATUS_BAD_PACKED);
    w.packed = blob; w.packed_bytes = 0;                   /* not set */
    CHECK_STATUS(moe_forward_alloc(&c, &w, L.x, CT, y, NULL), MOE_STATUS_BAD_PACKED);
    w.packed_bytes = 63;                                   /* not even the header */
    CHECK_STATUS(moe_forward_alloc(&c, &w, L.x, CT, y, NULL), MOE_STATUS_BAD_PACKED);
    w.packed_bytes = bytes - 1;
    CHECK_STATUS(moe_forward_alloc(&c, &w, L.x, CT, y, NULL), MOE_STATUS_BAD_PACKED);
    w.packed_bytes = bytes;
    CHECK_STATUS(moe_forward_alloc(&c, &w, L.x, CT, y, NULL), MOE_STATUS_OK);
    CHECK(memcmp(y, want, (size_t)CT * CD * sizeof(float)) == 0);
    free(cut); free(blob); free(y); free(want);
    cl_free(&L);
}

/* --- 7. packing is refused where no kernel reads panels -------------------- */

/* 0.3.1 packed for the reference ISA with status OK; the forward then
   ignored the blob and, with the fp32 tensors freed, failed. Now the
   packer says UNSUPPORTED and writes nothing. */
TEST(contract, pack_reference_refused) {
    moe_config c = moe_preset_mixtral(), r;
    clayer L;
    size_t bytes = 0, i;
    unsigned char *blob;
    int ok = 1;
    c.num_experts = CE; c.d_model = CD; c.d_ff = CF; c.pack_bf16 = 1;
    cl_make(&L, c, CT, 12);
    CHECK_STATUS(moe_pack_size(&c, &bytes), MOE_STATUS_OK);
    blob = (unsigned char *)malloc(bytes);
    memset(blob, 0xA5, bytes);
    CHECK_STATUS(moe_config_resolve(&c, &r), MOE_STATUS_OK);
    if (r.isa == MOE_ISA_REFERENCE)   /* a build without SIMD flags */
        CHECK_STATUS(moe_pack_weights(&c, &L.w, blob, bytes), MOE_STATUS_UNSUPPORTED);
    c.isa = MOE_ISA_REFERENCE;
    CHECK_STATUS(moe_pack_weights(&c, &L.w, blob, bytes), MOE_STATUS_UNSUPPORTED);
    for (i = 0; i < bytes; i++) ok &= blob[i] == 0xA5;
    CHECK(ok);
    free(blob);
    cl_free(&L);
}

/* --- 8. T = 0 needs no workspace ------------------------------------------ */

TEST(contract, zero_tokens_without_workspace) {
    int i;
    moe_config c;
    const char *name;
    for (i = 0; cl_family(i, &c, &name); i++) {
        clayer L;
        moe_info info;
        int32_t routed[CE], kept[CE], e, per;
        moe_grads g;
        memset(&info, 0, sizeof info);
        info.aux_total = 5.0f; info.slots = -1;
        info.expert_routed = routed; info.expert_kept = kept;
        for (e = 0; e < CE; e++) routed[e] = kept[e] = -7;
        cl_make(&L, c, 1, 13);
        CHECK_STATUS(moe_forward(&c, &L.w, NULL, 0, NULL, &info, NULL, 0), MOE_STATUS_OK);
        CHECK_INT(info.slots, moe_routing_slots(&c));
        CHECK(info.aux_total == 0.0f && info.dropped_pairs == 0 && info.dropped_tokens == 0);
        per = c.routing == MOE_ROUTING_SOFT ? 1 : 0;
        for (e = 0; e < CE; e++)
            if (routed[e] != per || kept[e] != per)
                moe_test_fail(__FILE__, __LINE__, "%s: expert %d counts %d %d", name, (int)e,
                              (int)routed[e], (int)kept[e]);
        CHECK_STATUS(moe_route(&c, &L.w, NULL, NULL, 0, &info, NULL, 0), MOE_STATUS_OK);
        g = cl_grads(&L);
        CHECK_STATUS(moe_backward(&c, &L.w, NULL, 0, &info, NULL, NULL, &g, NULL, 0),
                     MOE_STATUS_OK);
        cl_grads_free(&g);
        cl_free(&L);
    }
}
