/* docs/ROUTING.md worked examples, one TEST each, through moe.h's public API.
   Each comment opens with the section of docs/ROUTING.md its numbers come
   from (make docs-check checks that the section exists).
   Routing examples feed the spec's logits straight to moe_route(); examples
   that need a whole layer build a tiny one whose expert outputs are exact, so
   the only numbers compared are the spec's (or ones derived from the spec's
   printed values in double, with the derivation in a comment).
   "Noisy top-k" needs the spec's explicit noise samples and lives in
   test_spec_internal.c; "Worked layer" (forward, backward and aux-loss
   gradients) is in test_layer.c. Not covered here: the derivative columns of
   "Expert FFNs", and the reference behaviours of "Not in moe.h". */
#include "../moe.h"
#include "moe_test.h"

/* ---------------------------------------------------------------------------
   Shared inputs and helpers                                                  */

/* "Example logits": L (T = 3, E = 4) */
static const float spec_L[12] = {1.0f, 2.0f, 0.5f, -1.0f, 0.2f, -0.3f, 1.5f, 1.0f,
                                 2.5f, 0.0f, -0.5f, 1.75f};
/* "Example logits": p = softmax(L) */
static const double spec_p[12] = {0.224208, 0.609460, 0.135989, 0.030343,
                                  0.133309, 0.080856, 0.489150, 0.296685,
                                  0.623349, 0.051168, 0.031035, 0.294449};
/* "Example logits": L6 (S = 6, E = 4) and g = softmax(L6) */
static const float spec_L6[24] = {2.0f, 1.0f, 0.0f, -1.0f, 1.5f, 0.5f, 1.0f, 0.0f,
                                  0.3f, 2.2f, 1.2f, 0.1f, 1.8f, -0.5f, 0.2f, 1.1f,
                                  0.0f, 0.4f, 0.1f, 1.3f, 1.2f, 0.9f, -0.2f, 0.6f};
static const double spec_g6[24] = {0.643914, 0.236883, 0.087144, 0.032059,
                                   0.455054, 0.167405, 0.276004, 0.101536,
                                   0.091206, 0.609792, 0.224330, 0.074673,
                                   0.555945, 0.055738, 0.112243, 0.276074,
                                   0.137622, 0.205308, 0.152096, 0.504975,
                                   0.394287, 0.292095, 0.097230, 0.216389};

static void spec_check_ints(const char *file, int line, const char *what,
                            const int32_t *got, const int *want, int n) {
    int i;
    for (i = 0; i < n; i++)
        if (got[i] != want[i]) {
            moe_test_fail(file, line, "%s[%d] = %d, want %d", what, i, (int)got[i], want[i]);
            return;
        }
}
static void spec_check_flags(const char *file, int line, const char *what,
                             const uint8_t *got, const int *want, int n) {
    int i;
    for (i = 0; i < n; i++)
        if ((int)got[i] != want[i]) {
            moe_test_fail(file, line, "%s[%d] = %d, want %d", what, i, (int)got[i], want[i]);
            return;
        }
}
#define CHECK_INTS(got, want, n)  spec_check_ints(__FILE__, __LINE__, #got, (got), (want), (n))
#define CHECK_FLAGS(got, want, n) spec_check_flags(__FILE__, __LINE__, #got, (got), (want), (n))

/* A routing-only config: E experts, top-K, the shape fields at their minimum. */
static moe_config spec_cfg(int32_t E, int32_t K) {
    moe_config c;
    memset(&c, 0, sizeof c);
    c.num_experts = E; c.top_k = K; c.d_model = 1; c.d_ff = 1;
    return c;
}

/* moe_route() with every info array bound (moe_info_size / moe_info_bind). */
typedef struct spec_routed {
    moe_info info;
    void *info_buf, *ws;
} spec_routed;

static moe_status spec_route(spec_routed *r, const moe_config *c, const moe_weights *w,
                             const float *logits, int32_t T) {
    size_t ib = 0, wb = 0;
    moe_status st;
    memset(r, 0, sizeof *r);
    if ((st = moe_info_size(c, T, &ib)) != MOE_STATUS_OK) return st;
    if ((st = moe_route_workspace_size(c, T, &wb)) != MOE_STATUS_OK) return st;
    r->info_buf = malloc(ib);
    r->ws = malloc(wb);
    if (!r->info_buf || !r->ws) return MOE_STATUS_OUT_OF_MEMORY;
    if ((st = moe_info_bind(c, T, &r->info, r->info_buf, ib)) != MOE_STATUS_OK) return st;
    return moe_route(c, w, logits, NULL, T, &r->info, r->ws, wb);
}
static void spec_free(spec_routed *r) { free(r->info_buf); free(r->ws); }

/* Route, and leave the test on failure (the arrays would hold garbage). */
#define ROUTE_OR_RETURN(r, cfg, w, logits, T)                                   \
    do { moe_status st_ = spec_route((r), (cfg), (w), (logits), (T));           \
         CHECK_STATUS(st_, MOE_STATUS_OK);                                      \
         if (st_ != MOE_STATUS_OK) { spec_free(r); return; } } while (0)

/* LSE of one logit row: route it alone, aux_z = LSE^2, and LSE > 0 here. */
static double spec_lse(const float *row, int32_t E) {
    moe_config c = spec_cfg(E, 1);
    spec_routed r;
    double v = -1.0;
    if (spec_route(&r, &c, NULL, row, 1) == MOE_STATUS_OK) v = sqrt((double)r.info.aux_z);
    spec_free(&r);
    return v;
}

/* ---------------------------------------------------------------------------
   "Tie rule": deterministic top-k, ties go to the lower index. Equal logits give
   bit-equal softmax probabilities, so the ties survive the scoring.          */
TEST(spec, tie_rule) {
    static const float v1[4] = {1.0f, 0.3f, 0.3f, 0.3f};
    static const float v2[4] = {0.5f, 1.0f, 1.0f, 0.2f};
    static const int want1[2] = {0, 1}, want2k1[1] = {1}, want2k2[2] = {1, 2};
    moe_config c = spec_cfg(4, 2);
    spec_routed r;
    ROUTE_OR_RETURN(&r, &c, NULL, v1, 1);
    CHECK_INTS(r.info.expert, want1, 2);
    spec_free(&r);

    c.top_k = 1;
    ROUTE_OR_RETURN(&r, &c, NULL, v2, 1);
    CHECK_INTS(r.info.expert, want2k1, 1);
    spec_free(&r);

    c.top_k = 2;
    ROUTE_OR_RETURN(&r, &c, NULL, v2, 1);
    CHECK_INTS(r.info.expert, want2k2, 2);
    spec_free(&r);
}

/* "Example logits": p, P (mean of p per expert) and LSE per row. */
TEST(spec, softmax_and_lse) {
    static const double P_want[4] = {0.326955, 0.247161, 0.218725, 0.207159};
    static const double lse_want[3] = {2.495182, 2.215085, 2.972649};
    moe_config c = spec_cfg(4, 2);
    spec_routed r;
    float P[4] = {0};
    int t, e;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L, 3);
    CHECK_ARRAY_NEAR(r.info.scores, spec_p, 12, SPEC_ATOL, SPEC_RTOL);
    for (t = 0; t < 12; t++) CHECK(r.info.logits[t] == spec_L[t]);   /* copied as given */
    for (e = 0; e < 4; e++) {
        double s = 0.0;
        for (t = 0; t < 3; t++) s += r.info.scores[t * 4 + e];
        P[e] = (float)(s / 3.0);
    }
    CHECK_ARRAY_NEAR(P, P_want, 4, SPEC_ATOL, SPEC_RTOL);
    /* aux_z = mean_t LSE_t^2 */
    CHECK_NEAR(r.info.aux_z, (lse_want[0] * lse_want[0] + lse_want[1] * lse_want[1] +
                              lse_want[2] * lse_want[2]) / 3.0, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);
    for (t = 0; t < 3; t++) CHECK_NEAR(spec_lse(spec_L + 4 * t, 4), lse_want[t], SPEC_ATOL, SPEC_RTOL);
}

/* "Capacity": the formula table, column S = 6, E = 4, k = 2, cf = 1.0, every formula. */
TEST(spec, capacity_table_row) {
    static const struct { moe_capacity_formula f; int want; } rows[] = {
        {MOE_CAPACITY_MEGATRON, 3},     /* ceil(6*2/4) = 3 (= GShard 2S/E)      */
        {MOE_CAPACITY_FAIRSEQ_TOP1, 2}, /* int(1 * ceil(1.5)) = 2               */
        {MOE_CAPACITY_FAIRSEQ_TOP2, 4}, /* 2 * ceil(1.5) = 4                    */
        {MOE_CAPACITY_DEEPSPEED, 4},    /* ceil(1.5 * 2) = 3, min_capacity 4    */
        {MOE_CAPACITY_LINGVO, 4},       /* int(1.5) = 1, up to a multiple of 4  */
        {MOE_CAPACITY_MESH, 4},         /* min(6, 1) = 1, max with 4            */
        {MOE_CAPACITY_FLAXFORMER, 4},   /* round(1.5) = 2, max with 4           */
        {MOE_CAPACITY_VMOE, 4},         /* ceil(3) = 3, up to a multiple of 4   */
    };
    size_t i;
    for (i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        int32_t C = -1;
        CHECK_STATUS(moe_capacity(rows[i].f, 6, 4, 2, 1.0f, &C), MOE_STATUS_OK);
        if (C != rows[i].want)
            moe_test_fail(__FILE__, __LINE__, "formula %d: C = %d, want %d",
                          (int)rows[i].f, (int)C, rows[i].want);
    }
}

/* "Capacity": each formula above its minimum (and at it), derived by hand from the
   formulas in the table (and moe.h's header comments).                     */
TEST(spec, capacity_formulas_by_hand) {
    static const struct { moe_capacity_formula f; int S, E, K; float cf; int want; } rows[] = {
        {MOE_CAPACITY_MEGATRON, 10, 4, 2, 1.25f, 7},     /* ceil(6.25)                       */
        {MOE_CAPACITY_MEGATRON, 0, 4, 2, 1.0f, 0},       /* no minimum                        */
        {MOE_CAPACITY_FAIRSEQ_TOP1, 10, 4, 1, 1.5f, 4},  /* floor(1.5 * ceil(2.5)) = floor(4.5) */
        {MOE_CAPACITY_FAIRSEQ_TOP2, 9, 4, 2, 3.0f, 6},   /* 2 * ceil(2.25); cf ignored        */
        {MOE_CAPACITY_DEEPSPEED, 64, 8, 2, 1.0f, 16},    /* ceil(16), above min 4             */
        {MOE_CAPACITY_DEEPSPEED, 10, 4, 1, 1.0f, 4},     /* ceil(2.5) = 3 -> min 4            */
        {MOE_CAPACITY_LINGVO, 64, 4, 2, 1.0f, 16},       /* int(16), already a multiple of 4; no k */
        {MOE_CAPACITY_LINGVO, 36, 4, 2, 1.0f, 12},       /* int(9) -> next multiple of 4      */
        {MOE_CAPACITY_LINGVO, 2, 4, 2, 1.0f, 4},         /* int(0.5) = 0 becomes 4            */
        {MOE_CAPACITY_MESH, 64, 4, 2, 1.25f, 20},        /* int(20), above min 4; no k        */
        {MOE_CAPACITY_MESH, 8, 1, 1, 2.0f, 8},           /* min(S = 8, int(16)) = 8           */
        {MOE_CAPACITY_FLAXFORMER, 42, 4, 2, 1.0f, 10},   /* round(10.5) = 10 (half to even)   */
        {MOE_CAPACITY_FLAXFORMER, 46, 4, 2, 1.0f, 12},   /* round(11.5) = 12 (half to even)   */
        {MOE_CAPACITY_FLAXFORMER, 43, 4, 2, 1.0f, 11},   /* round(10.75) = 11                 */
        {MOE_CAPACITY_FLAXFORMER, 10, 4, 2, 1.0f, 4},    /* round(2.5) = 2 -> min 4           */
        {MOE_CAPACITY_VMOE, 64, 8, 2, 1.25f, 20},        /* ceil(20), a multiple of 4         */
        {MOE_CAPACITY_VMOE, 64, 8, 2, 1.1f, 20},         /* ceil(17.6) = 18 -> 20             */
        {MOE_CAPACITY_VMOE, 0, 4, 1, 1.0f, 1},           /* 0 -> minimum 1                    */
    };
    size_t i;
    for (i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        int32_t C = -1;
        CHECK_STATUS(moe_capacity(rows[i].f, rows[i].S, rows[i].E, rows[i].K, rows[i].cf, &C),
                     MOE_STATUS_OK);
        if (C != rows[i].want)
            moe_test_fail(__FILE__, __LINE__, "row %d (formula %d, S=%d E=%d K=%d cf=%g): C = %d, want %d",
                          (int)i, (int)rows[i].f, rows[i].S, rows[i].E, rows[i].K,
                          (double)rows[i].cf, (int)C, rows[i].want);
    }
}

/* "Balance losses": the families on L: top-k (HF), k-normalised, Switch (k = 1). */
TEST(spec, balance_losses) {
    moe_config c = spec_cfg(4, 2);
    spec_routed r;
    c.balance_loss = MOE_BALANCE_TOPK;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L, 3);
    CHECK_NEAR(r.info.aux_balance, 2.045486, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);

    c.balance_loss = MOE_BALANCE_TOPK_NORMALIZED;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L, 3);
    CHECK_NEAR(r.info.aux_balance, 1.022743, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);

    c.balance_loss = MOE_BALANCE_TOPK; c.top_k = 1;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L, 3);
    CHECK_NEAR(r.info.aux_balance, 1.057121, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);
}

/* ---------------------------------------------------------------------------
   "GShard top-2" on L6, C = 2, greedy second expert, position policy.     */
static moe_config spec_gshard_cfg(void) {
    moe_config c = spec_cfg(4, 2);
    c.capacity = 2;
    c.second_expert = MOE_SECOND_GREEDY;
    c.drop_policy = MOE_DROP_POSITION;
    c.balance_loss = MOE_BALANCE_FIRST_CHOICE;
    return c;
}
static const int spec_gshard_expert[12] = {0, 1, 0, 2, 1, 2, 0, 3, 3, 1, 0, 1};
static const int spec_gshard_dropped[12] = {0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1};

static void spec_gshard_common(const spec_routed *r) {
    static const int kept[4] = {2, 2, 2, 2}, routed[4] = {4, 4, 2, 2};
    CHECK_INTS(r->info.expert, spec_gshard_expert, 12);
    CHECK_FLAGS(r->info.dropped, spec_gshard_dropped, 12);
    CHECK_INTS(r->info.expert_kept, kept, 4);     /* e0=[t0,t1] e1=[t2,t0] e2=[t1,t2] e3=[t4,t3] */
    CHECK_INTS(r->info.expert_routed, routed, 4);
    CHECK_INT(r->info.capacity, 2);
    CHECK_INT(r->info.dropped_pairs, 4);
    CHECK_INT(r->info.dropped_tokens, 1);         /* token 5: residual only */
    CHECK_NEAR(r->info.aux_balance, 1.320559, SPEC_ATOL, SPEC_RTOL);  /* E * sum f1 * m */
    CHECK_ARRAY_NEAR(r->info.scores, spec_g6, 24, SPEC_ATOL, SPEC_RTOL);
}

/* "GShard top-2" (a) normalise before dropping (paper, lingvo legacy): eps = 1e-9. */
TEST(spec, gshard_normalize_before_drop) {
    static const double w_want[12] = {0.731059, 0.268941, 0.622459, 0.377541, 0.731059, 0.268941,
                                      0.0, 0.331812, 0.710950, 0.0, 0.0, 0.0};
    moe_config c = spec_gshard_cfg();
    spec_routed r;
    c.norm_eps = 1e-9f;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L6, 6);
    spec_gshard_common(&r);
    CHECK_ARRAY_NEAR(r.info.weight, w_want, 12, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);
}

/* "GShard top-2" (b) normalise after dropping (fairseq, DeepSpeed): a
   survivor gets 1.0. */
TEST(spec, gshard_normalize_after_drop) {
    static const double w_want[12] = {0.731059, 0.268941, 0.622459, 0.377541, 0.731059, 0.268941,
                                      0.0, 1.0, 1.0, 0.0, 0.0, 0.0};
    moe_config c = spec_gshard_cfg();
    spec_routed r;
    c.normalize_after_drop = 1;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L6, 6);
    spec_gshard_common(&r);
    CHECK_ARRAY_NEAR(r.info.weight, w_want, 12, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);
}

/* "Drop policies": "probs" (Megatron; moe.h MOE_DROP_WEIGHT) ranking the renormalised
   weights: e0 keeps t0, t3 (drops t1, t5); e1 keeps t2, t5 (drops t0, t4);
   e2 and e3 keep everything. Kept weights are the pre-drop shares
   g_j / (g1 + g2), derived here from the spec's g.                          */
TEST(spec, gshard_probs_policy) {
    static const int dropped_want[12] = {0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0};
    static const int kept_want[4] = {2, 2, 2, 2};
    double w_want[12];
    moe_config c = spec_gshard_cfg();
    spec_routed r;
    int t, j;
    c.drop_policy = MOE_DROP_WEIGHT;
    for (t = 0; t < 6; t++) {
        const double g1 = spec_g6[t * 4 + spec_gshard_expert[2 * t]];
        const double g2 = spec_g6[t * 4 + spec_gshard_expert[2 * t + 1]];
        for (j = 0; j < 2; j++)
            w_want[2 * t + j] = dropped_want[2 * t + j] ? 0.0 : (j ? g2 : g1) / (g1 + g2);
    }
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L6, 6);
    CHECK_INTS(r.info.expert, spec_gshard_expert, 12);
    CHECK_FLAGS(r.info.dropped, dropped_want, 12);
    CHECK_INTS(r.info.expert_kept, kept_want, 4);
    CHECK_INT(r.info.dropped_pairs, 4);
    CHECK_INT(r.info.dropped_tokens, 0);
    CHECK_ARRAY_NEAR(r.info.weight, w_want, 12, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);
}

/* ---------------------------------------------------------------------------
   "Switch top-1": raw p, no renormalisation.
   Example A: logits L, no capacity.                                         */
TEST(spec, switch_a) {
    static const int e_want[3] = {1, 2, 0};
    static const double g_want[3] = {0.609460, 0.489150, 0.623349};
    moe_config c = spec_cfg(4, 1);
    spec_routed r;
    c.normalize = MOE_NORM_NONE;
    c.balance_loss = MOE_BALANCE_TOPK;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L, 3);
    CHECK_INTS(r.info.expert, e_want, 3);
    CHECK_ARRAY_NEAR(r.info.weight, g_want, 3, SPEC_ATOL, SPEC_RTOL);
    CHECK_NEAR(r.info.aux_balance, 1.057121, SPEC_ATOL, SPEC_RTOL);
    CHECK_NEAR(r.info.aux_z, 6.656393, SPEC_ATOL, SPEC_RTOL);
    CHECK_INT(r.info.dropped_pairs, 0);
    spec_free(&r);
}

/* "Switch top-1" example B: logits L6, C = 2; overflow tokens 3 and 5 get weight 0. */
TEST(spec, switch_b) {
    static const int e_want[6] = {0, 0, 1, 0, 3, 0};
    static const int drop_want[6] = {0, 0, 0, 1, 0, 1};   /* keep = [1,1,1,0,1,0] */
    static const int kept_want[4] = {2, 1, 0, 1}, routed_want[4] = {4, 1, 0, 1};
    static const double w_want[6] = {0.643914, 0.455054, 0.609792, 0.0, 0.504975, 0.0};
    static const double lse_want[6] = {2.440190, 2.287339, 2.694638, 2.387087, 1.983246, 2.130677};
    moe_config c = spec_cfg(4, 1);
    spec_routed r;
    int t;
    c.normalize = MOE_NORM_NONE;
    c.capacity = 2;
    c.balance_loss = MOE_BALANCE_TOPK;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L6, 6);
    CHECK_INTS(r.info.expert, e_want, 6);
    CHECK_FLAGS(r.info.dropped, drop_want, 6);
    CHECK_INTS(r.info.expert_kept, kept_want, 4);
    CHECK_INTS(r.info.expert_routed, routed_want, 4);   /* f counts dropped tokens */
    CHECK_ARRAY_NEAR(r.info.weight, w_want, 6, SPEC_ATOL, SPEC_RTOL);
    CHECK_INT(r.info.dropped_tokens, 2);
    CHECK_NEAR(r.info.aux_balance, 1.320559, SPEC_ATOL, SPEC_RTOL);
    CHECK_NEAR(r.info.aux_z, 5.436459, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);
    for (t = 0; t < 6; t++) CHECK_NEAR(spec_lse(spec_L6 + 4 * t, 4), lse_want[t], SPEC_ATOL, SPEC_RTOL);
}

/* ---------------------------------------------------------------------------
   "Gate weights" (Mixtral): softmax over all E, top-2, renormalise; HF loss
   ("Balance losses").                                                       */
TEST(spec, mixtral) {
    static const int e_want[6] = {1, 0, 2, 3, 0, 3};
    static const double w_want[6] = {0.731059, 0.268941, 0.622459, 0.377541, 0.679179, 0.320821};
    static const double combine_want[12] = {0.268941, 0.731059, 0, 0, 0, 0, 0.622459, 0.377541,
                                            0.679179, 0, 0, 0.320821};
    moe_config c = spec_cfg(4, 2);
    spec_routed r;
    float combine[12] = {0};
    int t, j;
    c.normalize = MOE_NORM_SUM;
    c.balance_loss = MOE_BALANCE_TOPK;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L, 3);
    CHECK_INTS(r.info.expert, e_want, 6);
    CHECK_ARRAY_NEAR(r.info.weight, w_want, 6, SPEC_ATOL, SPEC_RTOL);
    CHECK_ARRAY_NEAR(r.info.scores, spec_p, 12, SPEC_ATOL, SPEC_RTOL);
    for (t = 0; t < 3; t++)            /* dense combine [T][E] from (idx, w) */
        for (j = 0; j < 2; j++) combine[t * 4 + r.info.expert[t * 2 + j]] += r.info.weight[t * 2 + j];
    CHECK_ARRAY_NEAR(combine, combine_want, 12, SPEC_ATOL, SPEC_RTOL);
    CHECK_NEAR(r.info.aux_balance, 2.0454855325, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);

    c.balance_loss = MOE_BALANCE_TOPK_NORMALIZED;      /* the k-normalised form */
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L, 3);
    CHECK_NEAR(r.info.aux_balance, 1.022743, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);
}

/* ---------------------------------------------------------------------------
   "Gate weights" (Qwen): norm_topk_prob = false keeps the raw p.          */
TEST(spec, qwen_no_renorm) {
    static const int e_want[6] = {1, 0, 2, 3, 0, 3};
    static const double w_want[6] = {0.609460, 0.224208, 0.489150, 0.296685, 0.623349, 0.294449};
    moe_config c = spec_cfg(4, 2);
    spec_routed r;
    c.normalize = MOE_NORM_NONE;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L, 3);
    CHECK_INTS(r.info.expert, e_want, 6);
    CHECK_ARRAY_NEAR(r.info.weight, w_want, 6, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);
}

/* "Shared expert": Qwen2's gate = sigmoid(x . w_sg) on the x of "Worked layer", with
   w_sg = [0.3, -0.2, 0.1]: gate = [0.592667, 0.537430, 0.456361].
   Layer built so y = gate_t * x_t exactly:
     routed experts: all-zero weights, so they output exactly 0;
     shared expert: ReLU, Fs = 2D, gate = [I; -I], down = [I, -I], so
       shared(x) = relu(x) - relu(-x) = x exactly.
   The router is the worked layer's Wg, so info also checks Qwen's no-renorm
   weights on a real layer: its raw p at idx [[3,0],[1,0],[2,3]].          */
TEST(spec, qwen2_shared_gate_layer) {
    static const float x[9] = {0.5f, -1.0f, 0.25f, 1.0f, 0.5f, -0.5f, -0.75f, 0.25f, 1.0f};
    static const float wg[12] = {0.2f, -0.1f, 0.4f, 0.5f, 0.3f, -0.2f, -0.3f, 0.6f, 0.2f,
                                 0.1f, -0.4f, 0.7f};
    static const float w_sg[3] = {0.3f, -0.2f, 0.1f};
    static const double gate_want[3] = {0.592667, 0.537430, 0.456361};
    static const int e_want[6] = {3, 0, 1, 0, 2, 3};
    static const double w_want[6] = {0.404423605, 0.292207117, 0.459149870, 0.206309336,
                                     0.333643035, 0.317371072};
    float zeros_g[4 * 1 * 3] = {0}, zeros_d[4 * 3 * 1] = {0};
    float sh_gate[6 * 3] = {0}, sh_down[3 * 6] = {0};
    float y[9], weight[6];
    int32_t expert[6];
    double y_want[9];
    moe_config c = spec_cfg(4, 2);
    moe_weights w;
    moe_info info;
    int d, t;
    c.d_model = 3; c.d_ff = 1;
    c.activation = MOE_ACT_RELU;
    c.normalize = MOE_NORM_NONE;
    c.shared_d_ff = 6; c.shared_expert_gated = 1;
    for (d = 0; d < 3; d++) {
        sh_gate[d * 3 + d] = 1.0f;  sh_gate[(3 + d) * 3 + d] = -1.0f;   /* [Fs][D] */
        sh_down[d * 6 + d] = 1.0f;  sh_down[d * 6 + 3 + d] = -1.0f;     /* [D][Fs] */
    }
    memset(&w, 0, sizeof w);
    memset(&info, 0, sizeof info);
    w.router = wg; w.gate = zeros_g; w.down = zeros_d;
    w.shared_gate = sh_gate; w.shared_down = sh_down; w.shared_expert_gate = w_sg;
    info.expert = expert; info.weight = weight;
    CHECK_STATUS(moe_forward_alloc(&c, &w, x, 3, y, &info), MOE_STATUS_OK);
    for (t = 0; t < 3; t++)
        for (d = 0; d < 3; d++) y_want[t * 3 + d] = gate_want[t] * x[t * 3 + d];
    CHECK_ARRAY_NEAR(y, y_want, 9, SPEC_ATOL, SPEC_RTOL);
    CHECK_INTS(expert, e_want, 6);
    CHECK_ARRAY_NEAR(weight, w_want, 6, SPEC_ATOL, SPEC_RTOL);
}

/* ---------------------------------------------------------------------------
   "Group-limited top-k", DeepSeek-V2 greedy: E = 8, 4 groups of 2, keep 2 groups by
   their max, K = 3, no renormalisation, x16.                               */
static const float spec_v2_z[16] = {0.5f, 1.2f, -0.3f, 2.0f, 0.1f, 0.8f, 1.9f, -1.0f,
                                    1.0f, 0.2f, 0.4f, 0.3f, 2.2f, -0.5f, 0.0f, 0.9f};
static moe_config spec_v2_cfg(void) {
    moe_config c = spec_cfg(8, 3);
    c.n_group = 4; c.topk_group = 2; c.group_score_top = 1;
    c.normalize = MOE_NORM_NONE;
    c.routed_scale = 16.0f;
    c.balance_loss = MOE_BALANCE_TOPK_NORMALIZED;
    return c;
}

TEST(spec, deepseek_v2_group_limited) {
    static const double s_want[16] = {0.070209, 0.141383, 0.031547, 0.314653, 0.047062, 0.094772,
                                      0.284710, 0.015666, 0.136786, 0.061462, 0.075070, 0.067926,
                                      0.454146, 0.030521, 0.050321, 0.123769};
    static const int e_want[6] = {3, 6, 2, 4, 0, 1};
    static const double w_want[6] = {5.034446, 4.555355, 0.504748, 7.266328, 2.188576, 0.983391};
    static const int routed_want[8] = {1, 1, 1, 1, 1, 0, 1, 0};
    moe_config c = spec_v2_cfg();
    spec_routed r;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_v2_z, 2);
    CHECK_ARRAY_NEAR(r.info.scores, s_want, 16, SPEC_ATOL, SPEC_RTOL);
    CHECK_INTS(r.info.expert, e_want, 6);
    CHECK_ARRAY_NEAR(r.info.weight, w_want, 6, SPEC_ATOL, SPEC_RTOL);
    CHECK_INTS(r.info.expert_routed, routed_want, 8);
    /* moe.h's TOPK_NORMALIZED = E * sum (c/(K T)) P = sum f P with the spec's
       f_i = E/(K T) * count_i (counts of the group-limited picks). */
    CHECK_NEAR(r.info.aux_balance, 1.156848, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);
}

/* "Group-limited top-k", DeepSeek-V2: the plain top-3 (no groups). */
TEST(spec, deepseek_v2_greedy) {
    static const int e_want[6] = {3, 6, 1, 4, 0, 7};
    moe_config c = spec_v2_cfg();
    spec_routed r;
    c.n_group = 1; c.topk_group = 1;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_v2_z, 2);
    CHECK_INTS(r.info.expert, e_want, 6);
    spec_free(&r);
}

/* ---------------------------------------------------------------------------
   "Group-limited top-k", DeepSeek-V3 noaux_tc: sigmoid, selection bias b,
   4 groups of 3 scored by the sum of their top-2 s+b, keep 2, K = 4, weights
   from the unbiased s renormalised, x2.5.                                  */
static const float spec_v3_z[24] = {0.2f, -1.0f, 1.5f, 0.8f, 0.0f, -0.4f, 2.1f, -2.0f, 0.3f, 1.0f, 0.9f, -0.6f,
                                    -0.3f, 0.7f, 0.1f, 1.9f, -1.2f, 0.5f, 0.4f, 0.6f, -0.8f, 1.3f, 0.0f, 2.4f};
static const float spec_v3_b[12] = {0.1f, 0.0f, -0.2f, 0.05f, 0.3f, 0.0f, -0.1f, 0.2f,
                                    0.0f, 0.15f, -0.05f, -0.3f};
static moe_config spec_v3_cfg(void) {
    moe_config c = spec_cfg(12, 4);
    c.score = MOE_SCORE_SIGMOID;
    c.selection_bias = 1;
    c.n_group = 4; c.topk_group = 2; c.group_score_top = 2;
    c.normalize = MOE_NORM_SUM; c.norm_eps = 1e-20f;
    c.routed_scale = 2.5f;
    return c;
}

TEST(spec, deepseek_v3_noaux_tc) {
    static const double s_want[24] = {
        0.549834, 0.268941, 0.817574, 0.689974, 0.500000, 0.401312, 0.890903, 0.119203,
        0.574443, 0.731059, 0.710950, 0.354344,
        0.425557, 0.668188, 0.524979, 0.869892, 0.231475, 0.622459, 0.598688, 0.645656,
        0.310026, 0.785835, 0.500000, 0.916827};
    static const int e_want[8] = {9, 4, 3, 10, 9, 3, 5, 11};
    static const double w_want[8] = {0.694399, 0.474927, 0.655375, 0.675298,
                                      0.614892, 0.680663, 0.487055, 0.717389};
    moe_config c = spec_v3_cfg();
    moe_weights w;
    spec_routed r;
    memset(&w, 0, sizeof w);
    w.selection_bias = spec_v3_b;
    ROUTE_OR_RETURN(&r, &c, &w, spec_v3_z, 2);
    CHECK_ARRAY_NEAR(r.info.scores, s_want, 24, SPEC_ATOL, SPEC_RTOL);
    CHECK_INTS(r.info.expert, e_want, 8);
    CHECK_ARRAY_NEAR(r.info.weight, w_want, 8, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);
}

/* "Group-limited top-k", DeepSeek-V3: with b = 0 token 0 keeps groups [2, 3]
   and picks [6, 9, 10, 8]; a plain top-4 of s (no groups, no bias) is
   [6, 2, 9, 10] and [11, 3, 9, 1].                                         */
TEST(spec, deepseek_v3_without_bias) {
    static const float zero_b[12] = {0};
    static const int e0_want[4] = {6, 9, 10, 8};
    static const int plain_want[8] = {6, 2, 9, 10, 11, 3, 9, 1};
    moe_config c = spec_v3_cfg();
    moe_weights w;
    spec_routed r;
    memset(&w, 0, sizeof w);
    w.selection_bias = zero_b;
    ROUTE_OR_RETURN(&r, &c, &w, spec_v3_z, 2);
    CHECK_INTS(r.info.expert, e0_want, 4);       /* token 0 only: token 1 is not printed */
    spec_free(&r);

    c.selection_bias = 0; c.n_group = 1; c.topk_group = 1; c.group_score_top = 1;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_v3_z, 2);
    CHECK_INTS(r.info.expert, plain_want, 8);
    spec_free(&r);
}

/* "Group-limited top-k", the fill value (HF's 0.0): E = 4, 2 groups, keep 1,
   k = 2, group score = top-2 sum, s~ = [0.9, -0.2, 0.3, 0.1]. moe.h has no
   "given s~" input, so s~ = s + b with sigmoid scores of all-zero logits
   (s = 0.5 exactly) and selection bias b = s~ - 0.5. Group scores [0.7, 0.4]
   keep group 0. -inf fill: {0, 1}; 0.0 fill: {0, 2} (2 and 3 tie at exactly
   0.0). The weights are the unbiased s = 0.5 each, renormalised.           */
TEST(spec, group_mask_fill) {
    static const float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    static const float b[4] = {0.4f, -0.7f, -0.2f, -0.4f};
    static const int inf_want[2] = {0, 1}, zero_want[2] = {0, 2};
    static const double w_want[2] = {0.5, 0.5};
    moe_config c = spec_cfg(4, 2);
    moe_weights w;
    spec_routed r;
    memset(&w, 0, sizeof w);
    w.selection_bias = b;
    c.score = MOE_SCORE_SIGMOID; c.selection_bias = 1;
    c.n_group = 2; c.topk_group = 1; c.group_score_top = 2;
    ROUTE_OR_RETURN(&r, &c, &w, z, 1);            /* default: -inf */
    CHECK_INTS(r.info.expert, inf_want, 2);
    CHECK_ARRAY_NEAR(r.info.weight, w_want, 2, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);

    c.group_mask_zero = 1;                        /* HF 0.0 fill */
    ROUTE_OR_RETURN(&r, &c, &w, z, 1);
    CHECK_INTS(r.info.expert, zero_want, 2);
    CHECK_ARRAY_NEAR(r.info.weight, w_want, 2, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);
}

/* "Bias update", gamma = 1e-3, the 2 tokens as the whole step: the load is
   info.expert_routed of the routing above.                                 */
TEST(spec, bias_update) {
    static const int load_want[12] = {0, 0, 0, 2, 1, 1, 0, 0, 0, 2, 1, 1};
    static const double b_want[12] = {0.1010, 0.0010, -0.1990, 0.0490, 0.2990, -0.0010,
                                      -0.0990, 0.2010, 0.0010, 0.1490, -0.0510, -0.3010};
    moe_config c = spec_v3_cfg();
    moe_weights w;
    spec_routed r;
    float b[12];
    int32_t load[12];
    memset(&w, 0, sizeof w);
    w.selection_bias = spec_v3_b;
    ROUTE_OR_RETURN(&r, &c, &w, spec_v3_z, 2);
    CHECK_INTS(r.info.expert_routed, load_want, 12);
    memcpy(load, r.info.expert_routed, sizeof load);
    spec_free(&r);
    memcpy(b, spec_v3_b, sizeof b);
    CHECK_STATUS(moe_selection_bias_update(12, load, 1e-3f, b), MOE_STATUS_OK);
    CHECK_ARRAY_NEAR(b, b_want, 12, SPEC_ATOL, SPEC_RTOL);
    {   /* the rule's sign(0) = 0 (no expert sits at the mean above): load
           [1, 2, 3] has mean 2, so b moves by [+gamma, 0, -gamma]          */
        static const int32_t load3[3] = {1, 2, 3};
        static const double b3_want[3] = {1e-3, 0.0, -1e-3};
        float b3[3] = {0.0f, 0.0f, 0.0f};
        CHECK_STATUS(moe_selection_bias_update(3, load3, 1e-3f, b3), MOE_STATUS_OK);
        CHECK_ARRAY_NEAR(b3, b3_want, 3, 1e-9, SPEC_RTOL);
    }
}

/* "Sequence-wise balance" (one sequence of T = 2): f from the unbiased plain
   top-4, P from s / sum s. seq_len 0 (= T) and 2 must agree.              */
TEST(spec, sequence_wise_loss) {
    moe_config c = spec_v3_cfg();
    moe_weights w;
    spec_routed r;
    int32_t L;
    memset(&w, 0, sizeof w);
    w.selection_bias = spec_v3_b;
    for (L = 0; L <= 2; L += 2) {
        c.seq_len = L;
        ROUTE_OR_RETURN(&r, &c, &w, spec_v3_z, 2);
        CHECK_NEAR(r.info.aux_seq, 1.186448, SPEC_ATOL, SPEC_RTOL);
        spec_free(&r);
    }
}

/* ---------------------------------------------------------------------------
   "Expert choice" on L plus a 4th token; each expert takes its top-2 tokens.
   expert/weight are [T][E]: expert[t][e] = e if e picked t, else -1, and the
   weight array is the combine matrix.                                      */
static const float spec_ec_z[16] = {1.0f, 2.0f, 0.5f, -1.0f, 0.2f, -0.3f, 1.5f, 1.0f,
                                    2.5f, 0.0f, -0.5f, 1.75f, -0.5f, 3.0f, 0.8f, 1.5f};

static void spec_ec_check(const moe_config *c) {
    static const double S_want[16] = {0.224208, 0.609460, 0.135989, 0.030343,
                                      0.133309, 0.080856, 0.489150, 0.296685,
                                      0.623349, 0.051168, 0.031035, 0.294449,
                                      0.022137, 0.733068, 0.081226, 0.163569};
    /* e0: [2, 0]; e1: [3, 0]; e2: [1, 0]; e3: [1, 2] */
    static const int e_want[16] = {0, 1, 2, -1, -1, -1, 2, 3, 0, -1, -1, 3, -1, 1, -1, -1};
    static const double combine_want[16] = {0.224208, 0.609460, 0.135989, 0, 0, 0, 0.489150, 0.296685,
                                            0.623349, 0, 0, 0.294449, 0, 0.733068, 0, 0};
    static const int per_token_want[4] = {3, 2, 2, 1};
    static const int routed_want[4] = {2, 2, 2, 2};
    spec_routed r;
    int32_t per_token[4] = {0};
    int t, e;
    ROUTE_OR_RETURN(&r, c, NULL, spec_ec_z, 4);
    CHECK_INT(r.info.slots, 4);
    CHECK_INT(r.info.capacity, 2);
    CHECK_ARRAY_NEAR(r.info.scores, S_want, 16, SPEC_ATOL, SPEC_RTOL);
    CHECK_INTS(r.info.expert, e_want, 16);
    CHECK_ARRAY_NEAR(r.info.weight, combine_want, 16, SPEC_ATOL, SPEC_RTOL);
    for (t = 0; t < 4; t++)
        for (e = 0; e < 4; e++) per_token[t] += r.info.expert[t * 4 + e] >= 0;
    CHECK_INTS(per_token, per_token_want, 4);
    CHECK_INTS(r.info.expert_routed, routed_want, 4);
    CHECK_INT(r.info.dropped_tokens, 0);
    spec_free(&r);
}

TEST(spec, expert_choice_explicit_capacity) {
    moe_config c = spec_cfg(4, 0);
    c.routing = MOE_ROUTING_EXPERT_CHOICE;
    c.normalize = MOE_NORM_NONE;
    c.capacity = 2;
    spec_ec_check(&c);
}

/* "Expert choice", c = 2: k_c = n * c / e = 4 * 2 / 4 = 2 from capacity_factor. */
TEST(spec, expert_choice_capacity_factor) {
    moe_config c = spec_cfg(4, 0);
    c.routing = MOE_ROUTING_EXPERT_CHOICE;
    c.normalize = MOE_NORM_NONE;
    c.capacity_factor = 2.0f;
    spec_ec_check(&c);
}

/* ---------------------------------------------------------------------------
   "Soft MoE": m = 3 tokens, n = 2 experts, p = 2 slots, logits = L.
   Dispatch = softmax over tokens (columns), combine = softmax over slots.  */
static const double spec_soft_D[12] = {0.168605, 0.809327, 0.244728, 0.041612,
                                       0.075759, 0.081142, 0.665241, 0.307471,
                                       0.755636, 0.109531, 0.090031, 0.650917};

TEST(spec, soft_moe_route) {
    moe_config c = spec_cfg(2, 0);
    spec_routed r;
    c.routing = MOE_ROUTING_SOFT;
    c.slots_per_expert = 2;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L, 3);
    CHECK(r.info.dispatch != NULL);
    if (r.info.dispatch) CHECK_ARRAY_NEAR(r.info.dispatch, spec_soft_D, 12, SPEC_ATOL, SPEC_RTOL);
    CHECK_ARRAY_NEAR(r.info.scores, spec_p, 12, SPEC_ATOL, SPEC_RTOL);    /* C = p of L */
    CHECK_INT(r.info.slots, 0);
    spec_free(&r);
}

/* "Soft MoE": the whole layer on the spec's X, f0(v) = 2v, f1(v) = v + 1.
   moe_forward computes the logits as scale * cos(x_t, phi_s), so the layer is
   built to make them equal L:
     x_t = [X_t0, X_t1, 1000 * onehot(t) (3 dims), 0]   (D = 6)
     phi_s = [0, 0, a_0s, a_1s, a_2s, r_s], a_ts = L[t][s] * |x_t| / 1000,
     r_s fills |phi_s| up to N = 4, and soft_scale = N,
   so scale * x_t.phi_s / (|x_t| |phi_s|) = L[t][s] (the 1e-6 in the norms is
   below fp32 resolution at these sizes). Experts are elementwise ReLU FFNs,
   F = 2D, gate = [I; -I]: down = [2I, -2I] gives 2v, down = [I, -I] plus
   down_bias 1 gives v + 1, both exact in fp32. Being elementwise, they leave
   dims 0-1 exactly the spec's 2-d example, so y[:, 0:2] must be the spec's Y.
   All 6 dims are also checked against Y = C f(D^T x) recomputed in double
   from the returned D and C.                                               */
TEST(spec, soft_moe_layer) {
    enum { T = 3, Dm = 6, F = 12, R = 4 };
    static const double X[6] = {1, 0, 0, 1, 1, -1};
    static const double Y_want[6] = {1.767327, -0.105337, 1.550055, 0.779446, 1.786067, -0.608297};
    const double N = 4.0;
    float x[T * Dm] = {0}, phi[R * Dm] = {0}, scale = (float)N;
    float gate[2 * F * Dm] = {0}, down[2 * Dm * F] = {0};
    float gate_bias[2 * F] = {0}, down_bias[2 * Dm] = {0};
    float y[T * Dm], logits[T * R], dispatch[T * R], combine[T * R], y2[T * 2];
    double nx[T], y_full[T * Dm];
    moe_config c = spec_cfg(2, 0);
    moe_weights w;
    moe_info info;
    int t, s, d, e;
    for (t = 0; t < T; t++) {
        x[t * Dm + 0] = (float)X[t * 2]; x[t * Dm + 1] = (float)X[t * 2 + 1];
        x[t * Dm + 2 + t] = 1000.0f;
        nx[t] = sqrt(X[t * 2] * X[t * 2] + X[t * 2 + 1] * X[t * 2 + 1] + 1e6);
    }
    for (s = 0; s < R; s++) {
        double ss = 0.0;
        for (t = 0; t < T; t++) {
            double a = spec_L[t * R + s] * nx[t] / 1000.0;
            phi[s * Dm + 2 + t] = (float)a;
            ss += a * a;
        }
        phi[s * Dm + 5] = (float)sqrt(N * N - ss);
    }
    for (e = 0; e < 2; e++)
        for (d = 0; d < Dm; d++) {
            const float k = e == 0 ? 2.0f : 1.0f;
            gate[(e * F + d) * Dm + d] = 1.0f;           /* [E][F][D] */
            gate[(e * F + Dm + d) * Dm + d] = -1.0f;
            down[(e * Dm + d) * F + d] = k;              /* [E][D][F] */
            down[(e * Dm + d) * F + Dm + d] = -k;
            down_bias[e * Dm + d] = e == 0 ? 0.0f : 1.0f;
        }
    c.routing = MOE_ROUTING_SOFT; c.slots_per_expert = 2;
    c.d_model = Dm; c.d_ff = F;
    c.activation = MOE_ACT_RELU; c.expert_bias = 1;
    memset(&w, 0, sizeof w);
    memset(&info, 0, sizeof info);
    w.soft_phi = phi; w.soft_scale = &scale;
    w.gate = gate; w.down = down; w.gate_bias = gate_bias; w.down_bias = down_bias;
    info.logits = logits; info.dispatch = dispatch; info.scores = combine;
    CHECK_STATUS(moe_forward_alloc(&c, &w, x, T, y, &info), MOE_STATUS_OK);
    {
        double L_want[12];
        for (s = 0; s < 12; s++) L_want[s] = spec_L[s];
        CHECK_ARRAY_NEAR(logits, L_want, 12, SPEC_ATOL, SPEC_RTOL);
    }
    CHECK_ARRAY_NEAR(dispatch, spec_soft_D, 12, SPEC_ATOL, SPEC_RTOL);
    CHECK_ARRAY_NEAR(combine, spec_p, 12, SPEC_ATOL, SPEC_RTOL);
    for (t = 0; t < T; t++) { y2[t * 2] = y[t * Dm]; y2[t * 2 + 1] = y[t * Dm + 1]; }
    CHECK_ARRAY_NEAR(y2, Y_want, 6, SPEC_ATOL, SPEC_RTOL);
    /* X~ = D^T x, Y~_s = f_{s/2}(X~_s), Y = C Y~, in double from moe.h's D, C */
    for (t = 0; t < T; t++)
        for (d = 0; d < Dm; d++) {
            double acc = 0.0;
            for (s = 0; s < R; s++) {
                double xs = 0.0, ys;
                int u;
                for (u = 0; u < T; u++) xs += (double)dispatch[u * R + s] * x[u * Dm + d];
                ys = s < 2 ? 2.0 * xs : xs + 1.0;
                acc += (double)combine[t * R + s] * ys;
            }
            y_full[t * Dm + d] = acc;
        }
    CHECK_ARRAY_NEAR(y, y_full, T * Dm, SPEC_ATOL, SPEC_RTOL);   /* dims 2-4 are ~1e3: rtol governs */
}

/* ---------------------------------------------------------------------------
   "Gate weights", DBRX p-norm on L, k = 2: p = 1 is Mixtral's
   renormalisation; p = 2: t0 [0.938508, 0.345258], t1 [0.855020, 0.518596],
   t2 [0.904198, 0.427113]. */
TEST(spec, dbrx_pnorm) {
    static const double w1_want[6] = {0.731059, 0.268941, 0.622459, 0.377541, 0.679179, 0.320821};
    static const double w2_want[6] = {0.938508, 0.345258, 0.855020, 0.518596, 0.904198, 0.427113};
    moe_config c = spec_cfg(4, 2);
    spec_routed r;
    c.normalize = MOE_NORM_PNORM; c.norm_p = 1.0f;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L, 3);
    CHECK_ARRAY_NEAR(r.info.weight, w1_want, 6, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);
    c.norm_p = 2.0f;
    ROUTE_OR_RETURN(&r, &c, NULL, spec_L, 3);
    CHECK_ARRAY_NEAR(r.info.weight, w2_want, 6, SPEC_ATOL, SPEC_RTOL);
    spec_free(&r);
}

/* ---------------------------------------------------------------------------
   "Expert FFNs": the activation table through a one-expert layer: E = K = 1
   (the softmax of one expert is exactly 1.0), D = F = 1, gate = [1],
   down = [1], so y = act(x) for the six table inputs as T = 6 tokens.      */
static const float spec_act_x[6] = {-2.0f, -0.5f, 0.0f, 0.5f, 1.0f, 2.0f};
static const double spec_act_relu[6] = {0, 0, 0, 0.5, 1.0, 2.0};
static const double spec_act_silu[6] = {-0.238405844, -0.188770334, 0, 0.311229666, 0.731058579, 1.761594156};
static const double spec_act_gelu[6] = {-0.045500264, -0.154268769, 0, 0.345731231, 0.841344746, 1.954499736};
static const double spec_act_gelu_tanh[6] = {-0.045402306, -0.154285990, 0, 0.345714010, 0.841191991, 1.954597694};

static void spec_act_layer(moe_activation act, float up_w, float *y, moe_status *st) {
    static const float one = 1.0f;
    float up = up_w;
    moe_config c = spec_cfg(1, 1);
    moe_weights w;
    c.activation = act;
    memset(&w, 0, sizeof w);
    w.router = &one; w.gate = &one; w.down = &one; w.up = &up;
    *st = moe_forward_alloc(&c, &w, spec_act_x, 6, y, NULL);
}

TEST(spec, activations) {
    static const struct { moe_activation act; const double *want; } rows[] = {
        {MOE_ACT_RELU, spec_act_relu}, {MOE_ACT_SILU, spec_act_silu},
        {MOE_ACT_GELU, spec_act_gelu}, {MOE_ACT_GELU_TANH, spec_act_gelu_tanh},
    };
    size_t i;
    for (i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        float y[6];
        moe_status st;
        spec_act_layer(rows[i].act, 0.0f, y, &st);
        CHECK_STATUS(st, MOE_STATUS_OK);
        if (st == MOE_STATUS_OK) CHECK_ARRAY_NEAR(y, rows[i].want, 6, SPEC_ATOL, SPEC_RTOL);
    }
}

/* "Expert FFNs", GLU variants: y = act(gate.x) * (up.x) with up = [-1.5], so
   the expected value is table(x) * (-1.5 x). GEGLU uses the erf GELU,
   GEGLU_TANH the tanh form (T5 v1.1 gated-gelu), SWIGLU the SiLU.          */
TEST(spec, activations_glu) {
    static const struct { moe_activation act; const double *table; } rows[] = {
        {MOE_ACT_SWIGLU, spec_act_silu}, {MOE_ACT_GEGLU, spec_act_gelu},
        {MOE_ACT_GEGLU_TANH, spec_act_gelu_tanh},
    };
    size_t i;
    int t;
    for (i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        float y[6];
        double want[6];
        moe_status st;
        for (t = 0; t < 6; t++) want[t] = rows[i].table[t] * (-1.5 * spec_act_x[t]);
        spec_act_layer(rows[i].act, -1.5f, y, &st);
        CHECK_STATUS(st, MOE_STATUS_OK);
        if (st == MOE_STATUS_OK) CHECK_ARRAY_NEAR(y, want, 6, SPEC_ATOL, SPEC_RTOL);
    }
}
