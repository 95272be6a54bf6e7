/* Expert-parallel plan (moe_ep_*), without MPI: P ranks simulated in one
   process, the all-to-all exchanges done by memcpy between their buffers.
   The EP result must be bitwise the one-process moe_forward / moe_backward
   (reference ISA): y, dx, routing, expert and router gradients (the router
   gradients chained in rank order); aux-loss values to float rounding.
   Also: bad arguments, counts and the send order / pack round trip.      */
#include "../moe.h"
#include "moe_test.h"
#include <stdint.h>

static uint64_t ep_rng = 1;
static float ep_router_amp = 0.5f;   /* router weights uniform(-amp, amp) in ep_check */
static float ep_rand(void) { return moe_test_rand(&ep_rng); }
static float *ep_fill(size_t n, float scale) { return moe_test_fill(&ep_rng, n, scale); }
static float *ep_zeros(size_t n) { return (float *)calloc(n ? n : 1, sizeof(float)); }

/* All-to-all-v of items of `width` bytes: cnt[a*P + b] items go from a to b;
   a's buffer holds its segments for b = 0..P-1 in order, b's buffer receives
   them from a = 0..P-1 in order (what MPI_Alltoallv does).               */
static void ep_exchange(int32_t P, const int32_t *cnt, size_t width, void *const *src, void *const *dst) {
    int32_t a, b, k;
    for (a = 0; a < P; a++) {
        size_t so = 0;
        for (b = 0; b < P; b++) {
            size_t ro = 0;
            for (k = 0; k < a; k++) ro += (size_t)cnt[k * P + b];
            memcpy((char *)dst[b] + ro * width, (const char *)src[a] + so * width, (size_t)cnt[a * P + b] * width);
            so += (size_t)cnt[a * P + b];
        }
    }
}

typedef struct ep_layer {
    float *router, *router_bias, *sel_bias, *gate, *up, *down, *gb, *ub, *db;
} ep_layer;

static int same(const void *a, const void *b, size_t n) { return n == 0 || memcmp(a, b, n) == 0; }
static int finite(const float *a, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) if (!(a[i] - a[i] == 0.0f)) return 0;
    return 1;
}
/* aux values rebuilt from double sums in another order: float rounding, or
   the same infinity (aux_z overflows for logits ~1e20) */
#define CHECK_AUX(got, want) \
    do { if ((got) != (want)) CHECK_NEAR(got, want, 1e-7, 1e-6); } while (0)

/* Run cfg (training) on T tokens in one process and on P simulated ranks;
   check everything. fused: HF gate_up layout. cache: owners keep activations. */
static void ep_check(const moe_config *cfg_in, int32_t T, int32_t P, int fused, int cache) {
    moe_config cfg = *cfg_in, icfg;
    const int32_t E = cfg.num_experts, K = cfg.top_k, D = cfg.d_model, F = cfg.d_ff, per = E / P;
    const int glu = cfg.activation == MOE_ACT_SWIGLU || cfg.activation == MOE_ACT_GEGLU ||
                    cfg.activation == MOE_ACT_GEGLU_TANH;
    const size_t gsz = (size_t)(fused ? 2 : 1) * F * D;     /* gate rows per expert */
    ep_layer l;
    moe_weights w;
    moe_grads g, ge;
    moe_info info;
    size_t ib;
    void *ibuf;
    float *x, *dy, *y, *dx, *ye, *dxe;
    int32_t r, q, nstats, *cnt, *cntT;
    double *stats_sum;
    int32_t off[9], Tr[9];
    moe_ep_plan plan[8];
    moe_info einfo[8];
    void *eibuf[8], *ws[8], *ows[8];
    double *stats[8];
    moe_ep_pair *spairs[8], *rpairs[8];
    float *srows[8], *rrows[8], *oout[8], *rout[8], *ochid[8], *ocup[8], *sdout[8], *rdout[8], *odx[8], *rdx[8];
    uint8_t *odrop[8], *rdrop[8];
    int32_t nsend[8], nrecv[8];
    if (P > 8) return;
    cfg.training = 1; cfg.save_for_backward = 1;
    cfg.isa = MOE_ISA_REFERENCE;
    ep_rng = 12345 + (uint64_t)T * 7 + (uint64_t)P;
    memset(&l, 0, sizeof l);
    l.router = ep_fill((size_t)E * D, ep_router_amp);
    l.router_bias = ep_fill((size_t)E, 0.1f);
    l.sel_bias = ep_fill((size_t)E, 0.05f);
    l.gate = ep_fill((size_t)E * gsz, 0.3f);
    l.up = fused ? NULL : ep_fill((size_t)E * F * D, 0.3f);
    l.down = ep_fill((size_t)E * D * F, 0.3f);
    l.gb = ep_fill((size_t)E * F, 0.1f); l.ub = ep_fill((size_t)E * F, 0.1f); l.db = ep_fill((size_t)E * D, 0.1f);
    x = ep_fill((size_t)T * D, 1.0f);
    dy = ep_fill((size_t)T * D, 1.0f);
    memset(&w, 0, sizeof w);
    w.router = l.router; w.router_bias = l.router_bias; w.selection_bias = l.sel_bias;
    w.gate = l.gate; w.up = l.up; w.down = l.down; w.gate_up_fused = fused;
    w.gate_bias = l.gb; w.up_bias = l.ub; w.down_bias = l.db;

    /* one process */
    memset(&info, 0, sizeof info);
    CHECK_STATUS(moe_info_size(&cfg, T, &ib), MOE_STATUS_OK);
    ibuf = malloc(ib);
    CHECK_STATUS(moe_info_bind(&cfg, T, &info, ibuf, ib), MOE_STATUS_OK);
    y = ep_zeros((size_t)T * D); dx = ep_zeros((size_t)T * D);
    memset(&g, 0, sizeof g);
    g.router = ep_zeros((size_t)E * D); g.router_bias = ep_zeros((size_t)E);
    g.gate = ep_zeros((size_t)E * gsz); g.up = fused ? NULL : ep_zeros((size_t)E * F * D);
    g.down = ep_zeros((size_t)E * D * F);
    g.gate_bias = ep_zeros((size_t)E * F); g.up_bias = ep_zeros((size_t)E * F); g.down_bias = ep_zeros((size_t)E * D);
    CHECK_STATUS(moe_forward_alloc(&cfg, &w, x, T, y, &info), MOE_STATUS_OK);
    CHECK_STATUS(moe_backward_alloc(&cfg, &w, x, T, &info, dy, dx, &g), MOE_STATUS_OK);

    /* P ranks */
    ye = ep_zeros((size_t)T * D); dxe = ep_zeros((size_t)T * D);
    ge = g;
    ge.router = ep_zeros((size_t)E * D); ge.router_bias = ep_zeros((size_t)E);
    ge.gate = ep_zeros((size_t)E * gsz); ge.up = fused ? NULL : ep_zeros((size_t)E * F * D);
    ge.down = ep_zeros((size_t)E * D * F);
    ge.gate_bias = ep_zeros((size_t)E * F); ge.up_bias = ep_zeros((size_t)E * F); ge.down_bias = ep_zeros((size_t)E * D);
    CHECK_STATUS(moe_ep_stats_count(&cfg, &nstats), MOE_STATUS_OK);
    stats_sum = (double *)calloc((size_t)nstats, sizeof(double));
    cnt = (int32_t *)calloc((size_t)P * P, sizeof(int32_t));
    cntT = (int32_t *)calloc((size_t)P * P, sizeof(int32_t));
    icfg = cfg; icfg.save_for_backward = 0;   /* source-side info: routing arrays only */
    off[0] = 0;
    for (r = 0; r < P; r++) {          /* uneven slices: the first T % P ranks get one more */
        size_t bytes;
        Tr[r] = T / P + (r < T % P);
        off[r + 1] = off[r] + Tr[r];
        plan[r].num_ranks = P; plan[r].rank = r; plan[r].num_tokens = T;
        plan[r].token_offset = off[r]; plan[r].local_tokens = Tr[r];
        memset(&einfo[r], 0, sizeof einfo[r]);
        moe_info_size(&icfg, Tr[r], &bytes);
        eibuf[r] = malloc(bytes);
        moe_info_bind(&icfg, Tr[r], &einfo[r], eibuf[r], bytes);
        CHECK_STATUS(moe_ep_workspace_size(&cfg, &plan[r], &bytes), MOE_STATUS_OK);
        ws[r] = malloc(bytes);
        stats[r] = (double *)malloc((size_t)nstats * sizeof(double));
        CHECK_STATUS(moe_ep_route(&cfg, &w, &plan[r], x + (size_t)off[r] * D, &einfo[r], cnt + (size_t)r * P,
                                  stats[r], ws[r], bytes), MOE_STATUS_OK);
        for (q = 0; q < nstats; q++) stats_sum[q] += stats[r][q];
        nsend[r] = 0;
        for (q = 0; q < P; q++) { nsend[r] += cnt[r * P + q]; cntT[q * P + r] = cnt[r * P + q]; }
        spairs[r] = (moe_ep_pair *)malloc((size_t)(nsend[r] + 1) * sizeof(moe_ep_pair));
        srows[r] = ep_zeros((size_t)nsend[r] * D);
        CHECK_STATUS(moe_ep_pack(&cfg, &plan[r], x + (size_t)off[r] * D, &einfo[r], cnt + (size_t)r * P,
                                 spairs[r], srows[r]), MOE_STATUS_OK);
    }
    for (q = 0; q < P; q++) {
        nrecv[q] = 0;
        for (r = 0; r < P; r++) nrecv[q] += cnt[r * P + q];
        rpairs[q] = (moe_ep_pair *)malloc((size_t)(nrecv[q] + 1) * sizeof(moe_ep_pair));
        rrows[q] = ep_zeros((size_t)nrecv[q] * D);
        oout[q] = ep_zeros((size_t)nrecv[q] * D);
        odrop[q] = (uint8_t *)calloc((size_t)nrecv[q] + 1, 1);
        ochid[q] = cache ? ep_zeros((size_t)nrecv[q] * F) : NULL;
        ocup[q] = cache && glu ? ep_zeros((size_t)nrecv[q] * F) : NULL;
        rdout[q] = ep_zeros((size_t)nrecv[q] * D);
        odx[q] = ep_zeros((size_t)nrecv[q] * D);
    }
    ep_exchange(P, cnt, sizeof(moe_ep_pair), (void *const *)spairs, (void *const *)rpairs);
    ep_exchange(P, cnt, (size_t)D * sizeof(float), (void *const *)srows, (void *const *)rrows);
    for (q = 0; q < P; q++) {          /* owners: their experts' slices of the tensors */
        moe_weights wl = w;
        size_t bytes;
        wl.router = NULL;
        wl.gate = l.gate + (size_t)q * per * gsz;
        wl.up = fused ? NULL : l.up + (size_t)q * per * F * D;
        wl.down = l.down + (size_t)q * per * D * F;
        wl.gate_bias = l.gb + (size_t)q * per * F; wl.up_bias = l.ub + (size_t)q * per * F;
        wl.down_bias = l.db + (size_t)q * per * D;
        CHECK_STATUS(moe_ep_expert_workspace_size(&cfg, &plan[q], nrecv[q], &bytes), MOE_STATUS_OK);
        ows[q] = malloc(bytes);
        CHECK_STATUS(moe_ep_expert_forward(&cfg, &wl, &plan[q], rpairs[q], rrows[q], nrecv[q], oout[q], odrop[q],
                                           ochid[q], ocup[q], ows[q], bytes), MOE_STATUS_OK);
    }
    for (r = 0; r < P; r++) {
        rout[r] = ep_zeros((size_t)nsend[r] * D);
        rdrop[r] = (uint8_t *)calloc((size_t)nsend[r] + 1, 1);
        sdout[r] = ep_zeros((size_t)nsend[r] * D);
        rdx[r] = ep_zeros((size_t)nsend[r] * D);
    }
    ep_exchange(P, cntT, (size_t)D * sizeof(float), (void *const *)oout, (void *const *)rout);
    ep_exchange(P, cntT, 1, (void *const *)odrop, (void *const *)rdrop);
    for (r = 0; r < P; r++) {
        size_t bytes;
        moe_ep_workspace_size(&cfg, &plan[r], &bytes);
        CHECK_STATUS(moe_ep_combine(&cfg, &plan[r], stats_sum, rout[r], rdrop[r], &einfo[r],
                                    ye + (size_t)off[r] * D, ws[r], bytes), MOE_STATUS_OK);
        CHECK_STATUS(moe_ep_pack_backward(&cfg, &plan[r], &einfo[r], dy + (size_t)off[r] * D, sdout[r]), MOE_STATUS_OK);
    }
    ep_exchange(P, cnt, (size_t)D * sizeof(float), (void *const *)sdout, (void *const *)rdout);
    for (q = 0; q < P; q++) {
        moe_weights wl = w;
        moe_grads gl;
        size_t bytes;
        memset(&gl, 0, sizeof gl);
        wl.gate = l.gate + (size_t)q * per * gsz;
        wl.up = fused ? NULL : l.up + (size_t)q * per * F * D;
        wl.down = l.down + (size_t)q * per * D * F;
        wl.gate_bias = l.gb + (size_t)q * per * F; wl.up_bias = l.ub + (size_t)q * per * F;
        wl.down_bias = l.db + (size_t)q * per * D;
        gl.gate = ge.gate + (size_t)q * per * gsz;
        gl.up = fused ? NULL : ge.up + (size_t)q * per * F * D;
        gl.down = ge.down + (size_t)q * per * D * F;
        gl.gate_bias = ge.gate_bias + (size_t)q * per * F; gl.up_bias = ge.up_bias + (size_t)q * per * F;
        gl.down_bias = ge.down_bias + (size_t)q * per * D;
        moe_ep_expert_workspace_size(&cfg, &plan[q], nrecv[q], &bytes);
        CHECK_STATUS(moe_ep_expert_backward(&cfg, &wl, &plan[q], rpairs[q], rrows[q], nrecv[q], odrop[q],
                                            ochid[q], ocup[q], rdout[q], odx[q], &gl, ows[q], bytes), MOE_STATUS_OK);
    }
    ep_exchange(P, cntT, (size_t)D * sizeof(float), (void *const *)odx, (void *const *)rdx);
    for (r = 0; r < P; r++) {          /* rank order: the router gradient chain */
        size_t bytes;
        moe_ep_workspace_size(&cfg, &plan[r], &bytes);
        CHECK_STATUS(moe_ep_combine_backward(&cfg, &w, &plan[r], x + (size_t)off[r] * D, &einfo[r], stats_sum,
                                             dy + (size_t)off[r] * D, rout[r], rdx[r], dxe + (size_t)off[r] * D,
                                             &ge, ws[r], bytes), MOE_STATUS_OK);
    }

    /* bitwise: outputs, routing, gradients; aux values to float rounding */
    CHECK(finite(&info.aux_total, 1) && finite(y, (size_t)T * D) && finite(dx, (size_t)T * D));
    CHECK(finite(g.router, (size_t)E * D) && finite(g.gate, (size_t)E * gsz));
    CHECK(same(y, ye, (size_t)T * D * sizeof(float)));
    CHECK(same(dx, dxe, (size_t)T * D * sizeof(float)));
    for (r = 0; r < P; r++) {
        const size_t p0 = (size_t)off[r] * K, n = (size_t)Tr[r] * K;
        CHECK(same(info.expert + p0, einfo[r].expert, n * sizeof(int32_t)));
        CHECK(same(info.weight + p0, einfo[r].weight, n * sizeof(float)));
        CHECK(same(info.dropped + p0, einfo[r].dropped, n));
        CHECK_AUX(einfo[r].aux_total, info.aux_total);
        CHECK_AUX(einfo[r].aux_balance, info.aux_balance);
        CHECK_AUX(einfo[r].aux_z, info.aux_z);
        CHECK_AUX(einfo[r].aux_importance, info.aux_importance);
        CHECK_AUX(einfo[r].aux_load, info.aux_load);
        CHECK_AUX(einfo[r].aux_seq, info.aux_seq);
        CHECK_INT(einfo[r].capacity, info.capacity);
    }
    for (q = 0; q < E; q++) CHECK_INT((int64_t)stats_sum[q], info.expert_routed[q]);
    CHECK(same(g.router, ge.router, (size_t)E * D * sizeof(float)));
    CHECK(same(g.router_bias, ge.router_bias, (size_t)E * sizeof(float)));
    CHECK(same(g.gate, ge.gate, (size_t)E * gsz * sizeof(float)));
    if (!fused) CHECK(same(g.up, ge.up, (size_t)E * F * D * sizeof(float)));
    CHECK(same(g.down, ge.down, (size_t)E * D * F * sizeof(float)));
    CHECK(same(g.gate_bias, ge.gate_bias, (size_t)E * F * sizeof(float)));
    CHECK(same(g.up_bias, ge.up_bias, (size_t)E * F * sizeof(float)));
    CHECK(same(g.down_bias, ge.down_bias, (size_t)E * D * sizeof(float)));

    for (r = 0; r < P; r++) {
        free(eibuf[r]); free(ws[r]); free(stats[r]); free(spairs[r]); free(srows[r]);
        free(rout[r]); free(rdrop[r]); free(sdout[r]); free(rdx[r]);
    }
    for (q = 0; q < P; q++) {
        free(rpairs[q]); free(rrows[q]); free(oout[q]); free(odrop[q]); free(ochid[q]); free(ocup[q]);
        free(rdout[q]); free(odx[q]); free(ows[q]);
    }
    free(stats_sum); free(cnt); free(cntT); free(ibuf); free(x); free(dy); free(y); free(dx); free(ye); free(dxe);
    free(l.router); free(l.router_bias); free(l.sel_bias); free(l.gate); free(l.up); free(l.down);
    free(l.gb); free(l.ub); free(l.db);
    free(g.router); free(g.router_bias); free(g.gate); free(g.up); free(g.down);
    free(g.gate_bias); free(g.up_bias); free(g.down_bias);
    free(ge.router); free(ge.router_bias); free(ge.gate); free(ge.up); free(ge.down);
    free(ge.gate_bias); free(ge.up_bias); free(ge.down_bias);
}

static moe_config ep_small(moe_config c, int32_t E, int32_t K) {
    c.num_experts = E; c.top_k = K; c.d_model = 12; c.d_ff = 10;
    return c;
}

TEST(ep, bitwise_mixtral) {             /* softmax top-2, renormalised, HF balance loss */
    moe_config c = ep_small(moe_preset_mixtral(), 8, 2);
    c.z_loss_coef = 0.001f;
    ep_check(&c, 37, 1, 0, 0);
    ep_check(&c, 37, 2, 0, 1);
    ep_check(&c, 37, 4, 1, 0);
    ep_check(&c, 3, 8, 0, 1);           /* ranks without tokens */
}

TEST(ep, bitwise_switch_capacity) {     /* top-1, capacity and drops, jitter, z-loss */
    moe_config c = ep_small(moe_preset_switch(), 4, 1);
    c.capacity_factor = 0.75f;          /* force drops */
    ep_check(&c, 29, 1, 0, 1);
    ep_check(&c, 29, 2, 0, 0);
    ep_check(&c, 29, 4, 0, 1);
}

TEST(ep, bitwise_deepseek) {            /* sigmoid, selection bias, groups, x2.5, sequence loss */
    moe_config c = ep_small(moe_preset_deepseek_v3(), 8, 3);
    c.n_group = 4; c.topk_group = 2; c.shared_d_ff = 0;
    c.balance_loss = MOE_BALANCE_TOPK_NORMALIZED; c.balance_coef = 0.01f;
    ep_check(&c, 31, 2, 0, 1);
    ep_check(&c, 31, 4, 0, 0);
    c.seq_len = 8;                      /* sequences inside the slices: T = 32, P = 4 */
    ep_check(&c, 32, 4, 0, 1);
    ep_check(&c, 32, 2, 1, 0);
}

TEST(ep, bitwise_drop_policies) {       /* BPR, weight, normalize after drop, GShard random */
    moe_config c = ep_small(moe_preset_mixtral(), 8, 2);
    c.capacity_factor = 0.6f;
    c.drop_policy = MOE_DROP_BPR;
    ep_check(&c, 40, 4, 0, 1);
    c.drop_policy = MOE_DROP_WEIGHT; c.normalize_after_drop = 1;
    ep_check(&c, 40, 2, 0, 0);
    c = ep_small(moe_preset_gshard(), 8, 2);
    c.balance_coef = 0.01f; c.importance_coef = 0.0f;
    ep_check(&c, 33, 4, 0, 1);
    c.second_expert = MOE_SECOND_SAMPLED; c.capacity_formula = MOE_CAPACITY_FAIRSEQ_TOP2;
    ep_check(&c, 33, 2, 0, 0);
}

TEST(ep, bitwise_importance_load) {     /* Shazeer importance and load CV^2, without noise */
    moe_config c = ep_small(moe_preset_mixtral(), 8, 2);
    c.importance_coef = 0.1f; c.load_coef = 0.1f; c.balance_coef = 0.0f;
    ep_check(&c, 37, 2, 0, 1);
    ep_check(&c, 37, 4, 0, 0);
}

TEST(ep, bitwise_training_extras) {     /* expert dropout, warm-up noise, biases, GELU */
    moe_config c = ep_small(moe_preset_mixtral(), 4, 2);
    c.expert_dropout = 0.3f; c.router_noise_std = 0.5f; c.router_bias = 1; c.expert_bias = 1;
    c.router_grad_clip = 0.05f; c.seed = 99;
    ep_check(&c, 21, 2, 0, 1);
    ep_check(&c, 21, 4, 1, 0);
    c.activation = MOE_ACT_GELU;
    ep_check(&c, 21, 2, 0, 1);
}

/* Router logits ~1e20 (LSE^2 overflows float: aux_z = Inf) with z_loss_coef
   0: moe_forward's aux_total skips the unused z-loss, and so must
   moe_ep_combine (0.3.1 added 0 * Inf = NaN there); y, dx and the gradients
   stay finite and bitwise the one process's. */
TEST(ep, aux_total_huge_logits) {
    moe_config c = ep_small(moe_preset_mixtral(), 4, 2);   /* softmax top-2, balance 0.02 */
    ep_router_amp = 1e20f;
    ep_check(&c, 10, 2, 0, 0);
    c.importance_coef = 0.01f; c.load_coef = 0.01f; c.seq_balance_coef = 0.01f;
    ep_check(&c, 10, 2, 0, 0);
    c.score = MOE_SCORE_SIGMOID;
    ep_check(&c, 10, 2, 0, 0);
    ep_router_amp = 0.5f;
}

/* Fixture for the argument tests: E 4, K 2, D 4, F 4, T 6 on 2 ranks. */
typedef struct ep_fx {
    moe_config c;
    moe_ep_plan plan;
    moe_weights w;
    float router[16], gate[64], up[64], down[64], x[12];
    moe_info info;
    float logits[12], scores[12], weight[6];
    int32_t expert[6], routed[4], kept[4], counts[2];
    uint8_t dropped[6];
    double stats[64];
    unsigned char ws[1 << 16];
} ep_fx;

static void ep_fx_init(ep_fx *f) {
    int i;
    memset(f, 0, sizeof *f);
    f->c = moe_preset_mixtral();
    f->c.num_experts = 4; f->c.top_k = 2; f->c.d_model = 4; f->c.d_ff = 4;
    f->plan.num_ranks = 2; f->plan.rank = 1; f->plan.num_tokens = 6;
    f->plan.token_offset = 3; f->plan.local_tokens = 3;
    ep_rng = 7;
    for (i = 0; i < 16; i++) f->router[i] = ep_rand();
    for (i = 0; i < 64; i++) { f->gate[i] = ep_rand(); f->up[i] = ep_rand(); f->down[i] = ep_rand(); }
    for (i = 0; i < 12; i++) f->x[i] = ep_rand();
    f->w.router = f->router; f->w.gate = f->gate; f->w.up = f->up; f->w.down = f->down;
    f->info.logits = f->logits; f->info.scores = f->scores; f->info.weight = f->weight;
    f->info.expert = f->expert; f->info.dropped = f->dropped;
    f->info.expert_routed = f->routed; f->info.expert_kept = f->kept;
}

TEST(ep, stats_count_and_unsupported) {
    moe_config c = moe_preset_mixtral();
    int32_t n = -1;
    CHECK_STATUS(moe_ep_stats_count(&c, &n), MOE_STATUS_OK);
    CHECK_INT(n, 6 * 8 + 2);
    CHECK_STATUS(moe_ep_stats_count(NULL, &n), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_ep_stats_count(&c, NULL), MOE_STATUS_NULL_ARGUMENT);
    c = moe_preset_expert_choice();
    CHECK_STATUS(moe_ep_stats_count(&c, &n), MOE_STATUS_EP_UNSUPPORTED);
    c = moe_preset_soft_moe();
    CHECK_STATUS(moe_ep_stats_count(&c, &n), MOE_STATUS_EP_UNSUPPORTED);
    c = moe_preset_dense();
    CHECK_STATUS(moe_ep_stats_count(&c, &n), MOE_STATUS_EP_UNSUPPORTED);
    c = moe_preset_shazeer();
    CHECK_STATUS(moe_ep_stats_count(&c, &n), MOE_STATUS_EP_UNSUPPORTED);
    c = moe_preset_qwen2_moe();          /* shared expert */
    CHECK_STATUS(moe_ep_stats_count(&c, &n), MOE_STATUS_EP_UNSUPPORTED);
    c = moe_preset_mixtral(); c.top_k = 9;
    CHECK_STATUS(moe_ep_stats_count(&c, &n), MOE_STATUS_BAD_TOP_K);
}

TEST(ep, bad_plan) {
    ep_fx *f = (ep_fx *)calloc(1, sizeof *f);
    size_t bytes;
    moe_ep_plan p;
    ep_fx_init(f);
    CHECK_STATUS(moe_ep_workspace_size(&f->c, &f->plan, &bytes), MOE_STATUS_OK);
    CHECK_STATUS(moe_ep_workspace_size(&f->c, NULL, &bytes), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_ep_workspace_size(&f->c, &f->plan, NULL), MOE_STATUS_NULL_ARGUMENT);
    p = f->plan; p.num_ranks = 3;        /* does not divide E = 4 */
    CHECK_STATUS(moe_ep_workspace_size(&f->c, &p, &bytes), MOE_STATUS_BAD_PLAN);
    p = f->plan; p.rank = 2;
    CHECK_STATUS(moe_ep_workspace_size(&f->c, &p, &bytes), MOE_STATUS_BAD_PLAN);
    p = f->plan; p.rank = -1;
    CHECK_STATUS(moe_ep_workspace_size(&f->c, &p, &bytes), MOE_STATUS_BAD_PLAN);
    p = f->plan; p.num_ranks = 0;
    CHECK_STATUS(moe_ep_workspace_size(&f->c, &p, &bytes), MOE_STATUS_BAD_PLAN);
    p = f->plan; p.local_tokens = 4;     /* past num_tokens */
    CHECK_STATUS(moe_ep_workspace_size(&f->c, &p, &bytes), MOE_STATUS_BAD_PLAN);
    p = f->plan; p.token_offset = -1;
    CHECK_STATUS(moe_ep_workspace_size(&f->c, &p, &bytes), MOE_STATUS_BAD_PLAN);
    p = f->plan; f->c.seq_len = 2;       /* a sequence of 2 would straddle tokens 2..3 */
    CHECK_STATUS(moe_ep_workspace_size(&f->c, &p, &bytes), MOE_STATUS_BAD_PLAN);
    f->c.seq_len = 3;
    CHECK_STATUS(moe_ep_workspace_size(&f->c, &p, &bytes), MOE_STATUS_OK);
    f->c.seq_len = 0;
    CHECK_STATUS(moe_ep_expert_workspace_size(&f->c, &f->plan, -1, &bytes), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(moe_ep_expert_workspace_size(&f->c, &f->plan, 5, NULL), MOE_STATUS_NULL_ARGUMENT);
    free(f);
}

TEST(ep, route_bad_arguments_write_nothing) {
    ep_fx *f = (ep_fx *)calloc(1, sizeof *f);
    size_t bytes;
    moe_info info;
    ep_fx_init(f);
    moe_ep_workspace_size(&f->c, &f->plan, &bytes);
    CHECK(bytes <= sizeof f->ws);
    f->counts[0] = f->counts[1] = -5;
    CHECK_STATUS(moe_ep_route(&f->c, &f->w, &f->plan, NULL, &f->info, f->counts, f->stats, f->ws, bytes),
                 MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_ep_route(&f->c, &f->w, &f->plan, f->x, &f->info, NULL, f->stats, f->ws, bytes),
                 MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_ep_route(&f->c, &f->w, &f->plan, f->x, &f->info, f->counts, NULL, f->ws, bytes),
                 MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_ep_route(&f->c, &f->w, &f->plan, f->x, &f->info, f->counts, f->stats, NULL, bytes),
                 MOE_STATUS_NULL_ARGUMENT);
    f->info.workspace_required = 0;
    CHECK_STATUS(moe_ep_route(&f->c, &f->w, &f->plan, f->x, &f->info, f->counts, f->stats, f->ws, bytes - 1),
                 MOE_STATUS_WORKSPACE_TOO_SMALL);
    CHECK(f->info.workspace_required == bytes);
    info = f->info; info.scores = NULL;
    CHECK_STATUS(moe_ep_route(&f->c, &f->w, &f->plan, f->x, &info, f->counts, f->stats, f->ws, bytes),
                 MOE_STATUS_MISSING_CACHE);
    f->w.router = NULL;
    CHECK_STATUS(moe_ep_route(&f->c, &f->w, &f->plan, f->x, &f->info, f->counts, f->stats, f->ws, bytes),
                 MOE_STATUS_MISSING_WEIGHT);
    f->w.router = f->router;
    f->x[5] = NAN;
    CHECK_STATUS(moe_ep_route(&f->c, &f->w, &f->plan, f->x, &f->info, f->counts, f->stats, f->ws, bytes),
                 MOE_STATUS_NONFINITE);
    CHECK(f->counts[0] == -5 && f->counts[1] == -5);   /* nothing written */
    CHECK(f->expert[0] == 0 && f->weight[0] == 0.0f);
    f->x[5] = 0.25f;
    f->c.routing = MOE_ROUTING_DENSE; f->c.top_k = 0;
    CHECK_STATUS(moe_ep_route(&f->c, &f->w, &f->plan, f->x, &f->info, f->counts, f->stats, f->ws, bytes),
                 MOE_STATUS_EP_UNSUPPORTED);
    free(f);
}

TEST(ep, counts_and_pack_round_trip) {
    ep_fx *f = (ep_fx *)calloc(1, sizeof *f);
    size_t bytes;
    moe_ep_pair pairs[6];
    float rows[24];
    int32_t n, i, bad[2];
    ep_fx_init(f);
    moe_ep_workspace_size(&f->c, &f->plan, &bytes);
    CHECK_STATUS(moe_ep_route(&f->c, &f->w, &f->plan, f->x, &f->info, f->counts, f->stats, f->ws, bytes),
                 MOE_STATUS_OK);
    CHECK_INT(f->counts[0] + f->counts[1], 6);   /* 3 tokens x 2 slots, greedy: all sent */
    n = 0;
    for (i = 0; i < 6; i++) n += f->expert[i] < 2;
    CHECK_INT(f->counts[0], n);                   /* rank 0 owns experts 0, 1 */
    CHECK_INT((int32_t)f->stats[0] + (int32_t)f->stats[1] + (int32_t)f->stats[2] + (int32_t)f->stats[3], 6);
    bad[0] = f->counts[0] + 1; bad[1] = f->counts[1] - 1;
    CHECK_STATUS(moe_ep_pack(&f->c, &f->plan, f->x, &f->info, bad, pairs, rows), MOE_STATUS_BAD_PLAN);
    CHECK_STATUS(moe_ep_pack(&f->c, &f->plan, f->x, &f->info, f->counts, NULL, rows), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_ep_pack(&f->c, &f->plan, f->x, &f->info, f->counts, pairs, rows), MOE_STATUS_OK);
    for (i = 0; i < 6; i++) {                     /* grouped by owner, then (token, slot) */
        const moe_ep_pair *p = pairs + i;
        const int32_t t = (int32_t)p->token - 3;
        CHECK(t >= 0 && t < 3);
        CHECK_INT(p->expert, f->expert[t * 2 + p->slot]);
        CHECK(p->weight == f->weight[t * 2 + p->slot]);
        CHECK(p->priority == f->scores[t * 4 + f->expert[t * 2]]);
        CHECK(memcmp(rows + i * 4, f->x + t * 4, 4 * sizeof(float)) == 0);
        CHECK_INT(p->expert / 2, i < f->counts[0] ? 0 : 1);
        if (i > 0 && (i < f->counts[0]) == (i - 1 < f->counts[0]))
            CHECK(p->token > pairs[i - 1].token || (p->token == pairs[i - 1].token && p->slot > pairs[i - 1].slot));
    }
    f->expert[0] = 4;                             /* corrupt routing */
    CHECK_STATUS(moe_ep_pack(&f->c, &f->plan, f->x, &f->info, f->counts, pairs, rows), MOE_STATUS_BAD_CACHE);
    free(f);
}

TEST(ep, expert_side_bad_arguments) {
    ep_fx *f = (ep_fx *)calloc(1, sizeof *f);
    size_t bytes;
    moe_ep_pair pairs[3];
    float rows[12], out[12], dx[12];
    uint8_t drop[3] = {0, 0, 0};
    moe_grads g;
    int i;
    ep_fx_init(f);                                /* rank 1 owns experts 2, 3 */
    for (i = 0; i < 3; i++) {
        pairs[i].token = i; pairs[i].slot = 0; pairs[i].expert = 2 + (i & 1);
        pairs[i].weight = 0.5f; pairs[i].priority = 0.5f;
    }
    memcpy(rows, f->x, sizeof rows);
    CHECK_STATUS(moe_ep_expert_workspace_size(&f->c, &f->plan, 3, &bytes), MOE_STATUS_OK);
    CHECK(bytes <= sizeof f->ws);
    CHECK_STATUS(moe_ep_expert_forward(&f->c, &f->w, &f->plan, pairs, rows, 3, out, drop, NULL, NULL, f->ws, bytes),
                 MOE_STATUS_OK);
    CHECK_STATUS(moe_ep_expert_forward(&f->c, &f->w, &f->plan, pairs, rows, 3, out, drop, NULL, NULL, f->ws, bytes - 1),
                 MOE_STATUS_WORKSPACE_TOO_SMALL);
    CHECK_STATUS(moe_ep_expert_forward(&f->c, &f->w, &f->plan, NULL, rows, 3, out, drop, NULL, NULL, f->ws, bytes),
                 MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_ep_expert_forward(&f->c, &f->w, &f->plan, pairs, rows, -1, out, drop, NULL, NULL, f->ws, bytes),
                 MOE_STATUS_BAD_DIMENSION);
    pairs[1].expert = 1;                          /* not this rank's expert */
    CHECK_STATUS(moe_ep_expert_forward(&f->c, &f->w, &f->plan, pairs, rows, 3, out, drop, NULL, NULL, f->ws, bytes),
                 MOE_STATUS_BAD_PLAN);
    pairs[1].expert = 3; pairs[2].token = 0;      /* out of (token, slot) order */
    CHECK_STATUS(moe_ep_expert_forward(&f->c, &f->w, &f->plan, pairs, rows, 3, out, drop, NULL, NULL, f->ws, bytes),
                 MOE_STATUS_BAD_PLAN);
    pairs[2].token = 9;                           /* past num_tokens */
    CHECK_STATUS(moe_ep_expert_forward(&f->c, &f->w, &f->plan, pairs, rows, 3, out, drop, NULL, NULL, f->ws, bytes),
                 MOE_STATUS_BAD_PLAN);
    pairs[2].token = 2; pairs[2].slot = 2;        /* slot >= K */
    CHECK_STATUS(moe_ep_expert_forward(&f->c, &f->w, &f->plan, pairs, rows, 3, out, drop, NULL, NULL, f->ws, bytes),
                 MOE_STATUS_BAD_PLAN);
    pairs[2].slot = 0;
    f->w.up = NULL;
    CHECK_STATUS(moe_ep_expert_forward(&f->c, &f->w, &f->plan, pairs, rows, 3, out, drop, NULL, NULL, f->ws, bytes),
                 MOE_STATUS_MISSING_WEIGHT);
    f->w.up = f->up;
    memset(&g, 0, sizeof g);
    CHECK_STATUS(moe_ep_expert_backward(&f->c, &f->w, &f->plan, pairs, rows, 3, drop, NULL, NULL, out, dx, NULL,
                                        f->ws, bytes), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_ep_expert_backward(&f->c, &f->w, &f->plan, pairs, rows, 3, drop, out, NULL, out, dx, &g,
                                        f->ws, bytes), MOE_STATUS_MISSING_CACHE);   /* GLU needs cache_up */
    drop[1] = 7;
    CHECK_STATUS(moe_ep_expert_backward(&f->c, &f->w, &f->plan, pairs, rows, 3, drop, NULL, NULL, out, dx, &g,
                                        f->ws, bytes), MOE_STATUS_BAD_CACHE);
    drop[1] = 0;
    CHECK_STATUS(moe_ep_expert_backward(&f->c, &f->w, &f->plan, pairs, rows, 3, drop, NULL, NULL, out, dx, &g,
                                        f->ws, bytes), MOE_STATUS_OK);
    free(f);
}

TEST(ep, combine_bad_arguments) {
    ep_fx *f = (ep_fx *)calloc(1, sizeof *f);
    size_t bytes;
    float ret[24], y[12], dx[12];
    uint8_t rdrop[6] = {0, 0, 0, 0, 0, 0};
    moe_grads g;
    ep_fx_init(f);
    moe_ep_workspace_size(&f->c, &f->plan, &bytes);
    moe_ep_route(&f->c, &f->w, &f->plan, f->x, &f->info, f->counts, f->stats, f->ws, bytes);
    memset(ret, 0, sizeof ret);
    CHECK_STATUS(moe_ep_combine(&f->c, &f->plan, NULL, ret, rdrop, &f->info, y, f->ws, bytes), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_ep_combine(&f->c, &f->plan, f->stats, NULL, rdrop, &f->info, y, f->ws, bytes), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_ep_combine(&f->c, &f->plan, f->stats, ret, rdrop, &f->info, NULL, f->ws, bytes), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_ep_combine(&f->c, &f->plan, f->stats, ret, rdrop, &f->info, y, f->ws, bytes - 1),
                 MOE_STATUS_WORKSPACE_TOO_SMALL);
    rdrop[3] = 9;
    CHECK_STATUS(moe_ep_combine(&f->c, &f->plan, f->stats, ret, rdrop, &f->info, y, f->ws, bytes), MOE_STATUS_BAD_CACHE);
    rdrop[3] = 0;
    CHECK_STATUS(moe_ep_combine(&f->c, &f->plan, f->stats, ret, rdrop, &f->info, y, f->ws, bytes), MOE_STATUS_OK);
    CHECK_STATUS(moe_ep_pack_backward(&f->c, &f->plan, &f->info, NULL, ret), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_ep_pack_backward(&f->c, &f->plan, &f->info, f->x, NULL), MOE_STATUS_NULL_ARGUMENT);
    memset(&g, 0, sizeof g);
    CHECK_STATUS(moe_ep_combine_backward(&f->c, &f->w, &f->plan, f->x, &f->info, f->stats, f->x, ret, NULL, dx, &g,
                                         f->ws, bytes), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_ep_combine_backward(&f->c, &f->w, &f->plan, f->x, &f->info, f->stats, f->x, ret, ret, dx, NULL,
                                         f->ws, bytes), MOE_STATUS_NULL_ARGUMENT);
    f->w.router = NULL;
    CHECK_STATUS(moe_ep_combine_backward(&f->c, &f->w, &f->plan, f->x, &f->info, f->stats, f->x, ret, ret, dx, &g,
                                         f->ws, bytes), MOE_STATUS_MISSING_WEIGHT);
    f->w.router = f->router;
    CHECK_STATUS(moe_ep_combine_backward(&f->c, &f->w, &f->plan, f->x, &f->info, f->stats, f->x, ret, ret, dx, &g,
                                         f->ws, bytes), MOE_STATUS_OK);
    free(f);
}

/* The EP calls have no in-place form: an output overlapping any other buffer
   of the call is MOE_STATUS_ALIASING (issue 15), checked before anything is
   written; the same calls with apart buffers succeed. */
TEST(ep, overlaps_refused) {
    ep_fx *f = (ep_fx *)calloc(1, sizeof *f);
    size_t bytes, wsx = 0;
    moe_ep_pair pairs[6];
    float rows[24], out[24], dy[12], y[12], groute[16];
    uint8_t drop[6];
    moe_info bad;
    moe_grads g;
    int32_t n0, n1, i;
    ep_fx_init(f);
    for (i = 0; i < 12; i++) dy[i] = 0.5f;
    memset(&g, 0, sizeof g);
    memset(groute, 0, sizeof groute);
    moe_ep_workspace_size(&f->c, &f->plan, &bytes);
    bad = f->info; bad.scores = f->logits;
    CHECK_STATUS(moe_ep_route(&f->c, &f->w, &f->plan, f->x, &bad, f->counts, f->stats, f->ws, bytes),
                 MOE_STATUS_ALIASING);
    CHECK_STATUS(moe_ep_route(&f->c, &f->w, &f->plan, f->x, &f->info, f->counts, f->stats,
                              f->logits, bytes), MOE_STATUS_ALIASING);
    CHECK_STATUS(moe_ep_route(&f->c, &f->w, &f->plan, f->x, &f->info, f->counts, f->stats, f->ws, bytes),
                 MOE_STATUS_OK);
    CHECK_STATUS(moe_ep_pack(&f->c, &f->plan, f->x, &f->info, f->counts, pairs, f->x),
                 MOE_STATUS_ALIASING);
    CHECK_STATUS(moe_ep_pack(&f->c, &f->plan, f->x, &f->info, f->counts, pairs, rows), MOE_STATUS_OK);
    /* this rank (1) as the owner of its pairs: the second group */
    n0 = f->counts[0]; n1 = f->counts[1];
    CHECK_STATUS(moe_ep_expert_workspace_size(&f->c, &f->plan, n1, &wsx), MOE_STATUS_OK);
    CHECK(wsx <= sizeof f->ws);
    CHECK_STATUS(moe_ep_expert_forward(&f->c, &f->w, &f->plan, pairs + n0, rows + 4 * n0, n1,
                                       rows + 4 * n0, drop, NULL, NULL, f->ws, wsx),
                 MOE_STATUS_ALIASING);
    CHECK_STATUS(moe_ep_expert_forward(&f->c, &f->w, &f->plan, pairs + n0, rows + 4 * n0, n1,
                                       out, (uint8_t *)out, NULL, NULL, f->ws, wsx),
                 MOE_STATUS_ALIASING);
    CHECK_STATUS(moe_ep_expert_forward(&f->c, &f->w, &f->plan, pairs + n0, rows + 4 * n0, n1,
                                       out, drop, NULL, NULL, f->ws, wsx), MOE_STATUS_OK);
    CHECK_STATUS(moe_ep_expert_backward(&f->c, &f->w, &f->plan, pairs + n0, rows + 4 * n0, n1, drop,
                                        NULL, NULL, out, out, &g, f->ws, wsx), MOE_STATUS_ALIASING);
    /* source side: every pair's rows and flags back (the values do not matter here) */
    memset(drop, 0, sizeof drop);
    CHECK_STATUS(moe_ep_combine(&f->c, &f->plan, f->stats, rows, drop, &f->info, rows, f->ws, bytes),
                 MOE_STATUS_ALIASING);
    CHECK_STATUS(moe_ep_combine(&f->c, &f->plan, f->stats, rows, drop, &f->info, y, f->ws, bytes),
                 MOE_STATUS_OK);
    CHECK_STATUS(moe_ep_pack_backward(&f->c, &f->plan, &f->info, dy, dy), MOE_STATUS_ALIASING);
    g.router = (float *)f->router;
    CHECK_STATUS(moe_ep_combine_backward(&f->c, &f->w, &f->plan, f->x, &f->info, f->stats, dy, rows,
                                         out, y, &g, f->ws, bytes), MOE_STATUS_ALIASING);
    g.router = groute;
    CHECK_STATUS(moe_ep_combine_backward(&f->c, &f->w, &f->plan, f->x, &f->info, f->stats, dy, rows,
                                         rows, y, &g, f->ws, bytes), MOE_STATUS_OK);
    free(f);
}
