/* tour.c -- every number docs/TOUR.md quotes, computed by moe.h's public API
   on the small worked examples of docs/ROUTING.md (the logits L of "Example
   logits", the GShard C = 2 example of "GShard top-2", the DeepSeek-V3 example
   of "Group-limited top-k", the "Worked layer"), each printed next to the
   value the spec gives. Also draws the tour's two pictures:
     tour_routing.svg   the GShard batch: 6 tokens, 4 experts, C = 2,
                        kept and dropped (token, expert) pairs
     tour_balance.svg   expert load before and after aux-loss-free balancing
                        (DeepSeek-V3's bias rule, moe_selection_bias_update)
   Exit status 0 when every number agrees with the spec (|got - want| <=
   2e-6 + 1e-5 |want|, the tolerance of docs/ROUTING.md, "Conventions"), 1 otherwise.

   build: cc -std=c99 -O2 -o tour examples/tour.c -lm
   run:   ./tour [directory for the SVGs]     (default: . ; docs/ holds copies) */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int mismatches = 0, checked = 0;

/* Print n numbers and compare them with the spec's. Where the spec's value
   (float64, 6 decimals) prints differently, it follows in brackets.      */
static void show(const char *name, const float *got, const double *want, int n) {
    double worst = 0.0;
    int i, bad = 0;
    printf("  %-26s", name);
    for (i = 0; i < n; i++) {
        const double d = fabs((double)got[i] - want[i]);
        char a[32], b[32];
        snprintf(a, sizeof a, "%.6f", got[i]);
        snprintf(b, sizeof b, "%.6f", want[i]);
        printf("%s%s", i ? " " : "", a);
        if (strcmp(a, b) != 0 && !(atof(a) == 0.0 && atof(b) == 0.0)) printf(" [spec %s]", b);   /* -0.000000 = 0 */
        if (d > worst) worst = d;
        if (!(d <= 2e-6 + 1e-5 * fabs(want[i]))) bad = 1;
    }
    printf(bad ? "   MISMATCH (max diff %.2g)\n" : "   ok\n", worst);
    mismatches += bad;
    checked++;
}
static void show1(const char *name, float got, double want) { show(name, &got, &want, 1); }
static void show_int(const char *name, const int32_t *got, const int32_t *want, int n) {
    int i, bad = 0;
    printf("  %-26s", name);
    for (i = 0; i < n; i++) {
        printf("%s%d", i ? " " : "", (int)got[i]);
        bad |= got[i] != want[i];
    }
    printf(bad ? "   MISMATCH\n" : "   ok\n");
    mismatches += bad;
    checked++;
}

/* A config for routing-only calls: E experts, top-K; d_model and d_ff are
   required fields but moe_route does not read them.                     */
static moe_config route_cfg(int32_t E, int32_t K) {
    moe_config c = moe_preset_mixtral();   /* softmax, top-k, renormalise, HF loss */
    c.num_experts = E; c.top_k = K; c.d_model = 1; c.d_ff = 1;
    return c;
}

/* moe_route on caller logits [T][E], into an info bound to a fresh buffer. */
typedef struct routed { moe_info info; void *buf; } routed;
static routed route(const moe_config *cfg, const moe_weights *w, const float *logits, int32_t T) {
    routed r;
    size_t ib, wb;
    void *ws;
    moe_status st;
    memset(&r, 0, sizeof r);
    if ((st = moe_info_size(cfg, T, &ib)) != MOE_STATUS_OK ||
        (st = moe_route_workspace_size(cfg, T, &wb)) != MOE_STATUS_OK) {
        fprintf(stderr, "moe.h: %s\n", moe_status_string(st));
        exit(1);
    }
    r.buf = malloc(ib);
    ws = malloc(wb);
    if (!r.buf || !ws) { fprintf(stderr, "out of memory\n"); exit(1); }
    moe_info_bind(cfg, T, &r.info, r.buf, ib);
    st = moe_route(cfg, w, logits, NULL, T, &r.info, ws, wb);
    free(ws);
    if (st != MOE_STATUS_OK) { fprintf(stderr, "moe_route: %s\n", moe_status_string(st)); exit(1); }
    return r;
}

// ----------------------------------------------------------------------------
// 1. Scores, top-k, ties, gate weights (docs/ROUTING.md: "Tie rule", "Example
//    logits", "Gate weights", "Switch top-1", "Balance losses", "Z-loss")

static const float Lg[3 * 4] = {1.0f, 2.0f, 0.5f, -1.0f, 0.2f, -0.3f, 1.5f, 1.0f, 2.5f, 0.0f, -0.5f, 1.75f};

static void section_scores(void) {
    static const double p[12] = {0.224208, 0.609460, 0.135989, 0.030343, 0.133309, 0.080856,
                                 0.489150, 0.296685, 0.623349, 0.051168, 0.031035, 0.294449};
    static const int32_t idx[6] = {1, 0, 2, 3, 0, 3};
    static const double w_sum[6] = {0.731059, 0.268941, 0.622459, 0.377541, 0.679179, 0.320821};
    static const double w_raw[6] = {0.609460, 0.224208, 0.489150, 0.296685, 0.623349, 0.294449};
    moe_config c = route_cfg(4, 2);
    routed r;
    int t;
    char name[32];
    printf("\n[1] scores, top-k and gate weights on L (\"Example logits\", \"Gate weights\"): T=3 tokens, E=4, K=2\n");
    r = route(&c, NULL, Lg, 3);
    for (t = 0; t < 3; t++) { snprintf(name, sizeof name, "p = softmax(z), t%d", t); show(name, r.info.scores + 4 * t, p + 4 * t, 4); }
    show_int("top-2 experts (t0 t1 t2)", r.info.expert, idx, 6);
    show("w renormalised (Mixtral)", r.info.weight, w_sum, 6);
    show1("HF balance loss", r.info.aux_balance, 2.045486);
    show1("z-loss mean LSE^2", r.info.aux_z, 6.656393);
    free(r.buf);
    c.normalize = MOE_NORM_NONE;                       /* Qwen / OLMoE: raw p */
    r = route(&c, NULL, Lg, 3);
    show("w raw p (no renorm)", r.info.weight, w_raw, 6);
    free(r.buf);
    c = route_cfg(4, 2);
    c.balance_loss = MOE_BALANCE_TOPK_NORMALIZED;      /* Megatron / DeepSeek */
    r = route(&c, NULL, Lg, 3);
    show1("k-normalised loss", r.info.aux_balance, 1.022743);
    free(r.buf);
    c = route_cfg(4, 1);                                /* Switch: top-1, raw p */
    c.normalize = MOE_NORM_NONE;
    r = route(&c, NULL, Lg, 3);
    {
        static const int32_t e1[3] = {1, 2, 0};
        static const double g1[3] = {0.609460, 0.489150, 0.623349};
        show_int("Switch top-1 experts", r.info.expert, e1, 3);
        show("Switch weights g", r.info.weight, g1, 3);
        show1("Switch loss (K=1)", r.info.aux_balance, 1.057121);
    }
    free(r.buf);

    /* ties ("Tie rule"): equal logits give bitwise equal scores, and
       the lower index wins                                                 */
    {
        static const float v1[4] = {1.0f, 0.3f, 0.3f, 0.3f}, v2[4] = {0.5f, 1.0f, 1.0f, 0.2f};
        static const int32_t want1[2] = {0, 1}, want2k1[1] = {1}, want2k2[2] = {1, 2};
        c = route_cfg(4, 2);
        r = route(&c, NULL, v1, 1); show_int("tie [1,.3,.3,.3] K=2", r.info.expert, want1, 2); free(r.buf);
        r = route(&c, NULL, v2, 1); show_int("tie [.5,1,1,.2] K=2", r.info.expert, want2k2, 2); free(r.buf);
        c = route_cfg(4, 1);
        r = route(&c, NULL, v2, 1); show_int("tie [.5,1,1,.2] K=1", r.info.expert, want2k1, 1); free(r.buf);
    }
}

// ----------------------------------------------------------------------------
// 2. Capacity and dropping; 3. dispatch (docs/ROUTING.md: "Capacity", "Drop
//    policies", "GShard top-2")

static const float L6[6 * 4] = {2.0f, 1.0f, 0.0f, -1.0f, 1.5f, 0.5f, 1.0f, 0.0f, 0.3f, 2.2f, 1.2f, 0.1f,
                                1.8f, -0.5f, 0.2f, 1.1f, 0.0f, 0.4f, 0.1f, 1.3f, 1.2f, 0.9f, -0.2f, 0.6f};

/* The GShard routing of L6, kept for the picture. */
static int32_t gs_expert[12];
static uint8_t gs_dropped[12];
static float gs_weight[12];

static void section_capacity(void) {
    static const char *const names[8] = {"MEGATRON ceil(cf S K/E)", "FAIRSEQ_TOP1", "FAIRSEQ_TOP2", "DEEPSPEED (min 4)",
                                         "LINGVO", "MESH", "FLAXFORMER", "VMOE"};
    static const int32_t capwant[8] = {3, 2, 4, 4, 4, 4, 4, 4};
    static const int32_t e12[12] = {0, 1, 0, 2, 1, 2, 0, 3, 3, 1, 0, 1};
    static const double wa[12] = {0.731059, 0.268941, 0.622459, 0.377541, 0.731059, 0.268941,
                                  0, 0.331812, 0.710950, 0, 0, 0};
    static const double wb[12] = {0.731059, 0.268941, 0.622459, 0.377541, 0.731059, 0.268941,
                                  0, 1.0, 1.0, 0, 0, 0};
    moe_config c = route_cfg(4, 2);
    routed r;
    int32_t f, cap[8], t, j, e;
    printf("\n[2] capacity and dropping (\"Capacity\", \"GShard top-2\"): S=6 tokens, E=4, K=2\n");
    for (f = 0; f < 8; f++) moe_capacity((moe_capacity_formula)f, 6, 4, 2, 1.0f, &cap[f]);
    printf("  moe_capacity, cf = 1.0: ");
    for (f = 0; f < 8; f++) printf("%s%s %d", f ? ", " : "", names[f], (int)cap[f]);
    printf("\n");
    show_int("capacities (as listed)", cap, capwant, 8);

    /* GShard example: C = 2 given directly, greedy second expert, positions
       slot 0 of every token first, then slot 1; weights normalised before
       dropping (the paper), then after dropping (fairseq, DeepSpeed)       */
    c.capacity = 2;
    c.balance_loss = MOE_BALANCE_FIRST_CHOICE;
    r = route(&c, NULL, L6, 6);
    show_int("experts (t0..t5, 2 each)", r.info.expert, e12, 12);
    printf("  %-26s", "dropped flags");
    for (t = 0; t < 12; t++) printf("%s%d", t ? " " : "", r.info.dropped[t]);
    printf("\n");
    show("w, normalise then drop", r.info.weight, wa, 12);
    show1("GShard first-choice loss", r.info.aux_balance, 1.320559);
    {
        const float dp = (float)r.info.dropped_pairs, dt = (float)r.info.dropped_tokens;
        show1("dropped pairs", dp, 4.0);
        show1("tokens with no expert", dt, 1.0);
    }
    memcpy(gs_expert, r.info.expert, sizeof gs_expert);
    memcpy(gs_dropped, r.info.dropped, sizeof gs_dropped);
    memcpy(gs_weight, r.info.weight, sizeof gs_weight);
    free(r.buf);
    c.normalize_after_drop = 1;
    r = route(&c, NULL, L6, 6);
    show("w, drop then normalise", r.info.weight, wb, 12);
    free(r.buf);
    c.normalize_after_drop = 0;
    c.drop_policy = MOE_DROP_WEIGHT;               /* Megatron "probs" */
    r = route(&c, NULL, L6, 6);
    printf("  drop policy WEIGHT (Megatron \"probs\"), pairs per expert:\n");
    for (e = 0; e < 4; e++) {
        printf("    e%d:", (int)e);
        for (t = 0; t < 6; t++)
            for (j = 0; j < 2; j++)
                if (r.info.expert[t * 2 + j] == e) {
                    if (r.info.dropped[t * 2 + j]) printf("  t%d dropped", (int)t);
                    else printf("  t%d w %.3f", (int)t, r.info.weight[t * 2 + j]);
                }
        printf("\n");
    }
    {
        static const uint8_t want[12] = {0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0};
        int bad = memcmp(r.info.dropped, want, 12) != 0;
        printf("  %-26s%s\n", "drops as in the spec", bad ? "MISMATCH" : "ok");
        mismatches += bad; checked++;
    }
    free(r.buf);

    /* 3. dispatch: the counting sort moe.h runs (moe__dispatch_ref), redone
       here on the routing above: count, prefix sums, place in token order */
    printf("\n[3] dispatch by counting sort (the GShard routing above)\n");
    {
        int32_t count[4] = {0, 0, 0, 0}, offs[5], cursor[4], row_t[8], row_j[8];
        static const int32_t want_offs[5] = {0, 2, 4, 6, 8};
        for (t = 0; t < 12; t++) if (!gs_dropped[t]) count[gs_expert[t]]++;            /* pass 1 */
        offs[0] = 0;
        for (e = 0; e < 4; e++) offs[e + 1] = offs[e] + count[e];                     /* pass 2 */
        for (e = 0; e < 4; e++) cursor[e] = offs[e];
        for (t = 0; t < 6; t++)                                                       /* pass 3 */
            for (j = 0; j < 2; j++)
                if (!gs_dropped[t * 2 + j]) {
                    const int32_t row = cursor[gs_expert[t * 2 + j]]++;
                    row_t[row] = t; row_j[row] = j;
                }
        show_int("offsets", offs, want_offs, 5);
        printf("  rows (expert: token/slot) ");
        for (e = 0; e < 4; e++) {
            int32_t rr;
            printf(" e%d:", (int)e);
            for (rr = offs[e]; rr < offs[e + 1]; rr++) printf(" t%d/%d", (int)row_t[rr], (int)row_j[rr]);
        }
        printf("\n");
    }
}

// ----------------------------------------------------------------------------
// 4. Expert FFNs, combine and 5. the backward: the full layer of 13.5

static float X[9] = {0.5f, -1.0f, 0.25f, 1.0f, 0.5f, -0.5f, -0.75f, 0.25f, 1.0f};
static const float WG[12] = {0.2f, -0.1f, 0.4f, 0.5f, 0.3f, -0.2f, -0.3f, 0.6f, 0.2f, 0.1f, -0.4f, 0.7f};
static const float DY[9] = {1.0f, -0.5f, 0.25f, 0.0f, 1.0f, -1.0f, 0.5f, 0.5f, 0.5f};
static float W1[4 * 2 * 3], W3[4 * 2 * 3], W2[4 * 3 * 2];

static void section_layer(void) {
    /* expert outputs o (before the gate weight) of each (token, expert) */
    static const double o_spec[4][3][3] = {   /* [e][t][d], only routed pairs are read */
        {{0.001999478, -0.006976406, -0.000926491}, {-0.082925005, -0.003828007, 0.049282522}, {0, 0, 0}},
        {{0, 0, 0}, {0.044113248, -0.018815305, 0.021740321}, {0, 0, 0}},
        {{0, 0, 0}, {0, 0, 0}, {0.014453979, 0.003844665, -0.024631382}},
        {{-0.013739383, 0.041842759, -0.027088512}, {0, 0, 0}, {0.000000000, 0.008789824, -0.006592368}}};
    static const double z_spec[12] = {0.3, -0.1, -0.7, 0.625, -0.05, 0.75, -0.1, -0.45, 0.225, -0.5, 0.575, 0.525};
    static const double w_spec[6] = {0.580542305, 0.419457695, 0.689974481, 0.310025519, 0.512497396, 0.487502604};
    static const int32_t idx_spec[6] = {3, 0, 1, 0, 2, 3};
    static const double y_spec[9] = {-0.007137596, 0.021365185, -0.016114651, 0.004728148, -0.014168860,
                                     0.030279106, 0.007407627, 0.006255443, -0.015837316};
    static const double dx_spec[9] = {-0.021300137, 0.037065873, 0.004301102, -0.065687277, -0.044992545,
                                      -0.018056352, 0.015749375, -0.015873961, 0.013814184};
    static const double dwg_spec[12] = {0.002999066, -0.012712171, 0.004185148, 0.002685615, 0.001342808,
                                        -0.001342808, 0.000799206, -0.000266402, -0.001065608, -0.006483888,
                                        0.011635765, -0.001776733};
    static const double dw1_spec[24] = {
        0.013548024, 0.004622674, -0.005913477, 0.028875299, 0.018969110, -0.016250234,
        0.091768618, 0.045884309, -0.045884309, -0.103282560, -0.051641280, 0.051641280,
        0.016000743, -0.005333581, -0.021334324, -0.010972781, 0.003657594, 0.014630374,
        -0.026397945, 0.033752819, 0.007748405, 0.013143398, -0.021286134, 0.001070971};
    static const double dw3_spec[24] = {
        0.034447536, 0.005702020, -0.012615069, -0.022744473, 0.029213251, -0.004861959,
        -0.011772752, -0.005886376, 0.005886376, -0.038788744, -0.019394372, 0.019394372,
        0.002774744, -0.000924915, -0.003699658, 0.005190950, -0.001730317, -0.006921267,
        0.045863684, -0.091727369, 0.022931842, 0.015057515, -0.028329588, 0.005564771};
    static const double dw2_spec[24] = {
        0.000614493, 0.005729716, 0.048180864, -0.010188920, -0.048334487, 0.008756491,
        0, 0, -0.006727287, 0.058183116, 0.006727287, -0.058183116,
        0.004162115, -0.010958673, 0.004162115, -0.010958673, 0.004162115, -0.010958673,
        -0.019940732, 0.051129508, 0.009970366, -0.017530262, -0.004985183, 0.016799623};
    /* d(HF balance loss)/dz of 13.5, to check the aux gradient reaches the router */
    static const double daux_spec[12] = {0.039398517, -0.060644735, -0.033282536, 0.054528754,
                                         0.060095377, -0.070321888, -0.030056625, 0.040283136,
                                         0.046763148, -0.027961067, -0.081925728, 0.063123647};
    moe_config c = moe_preset_mixtral();
    moe_weights w;
    moe_grads g;
    moe_info info;
    void *ib;
    size_t bytes;
    float y[9], dx[9], dwg[12], dw1[24], dw3[24], dw2[24], zero[9];
    int32_t e, m, h, t, j, row, rows_of[4] = {0, 0, 0, 0};
    char name[48];

    for (e = 0; e < 4; e++)
        for (m = 0; m < 2; m++)
            for (h = 0; h < 3; h++) {
                W1[(e * 2 + m) * 3 + h] = (float)(((7 * e + 3 * m + 5 * h) % 11) - 5) / 10.0f;
                W3[(e * 2 + m) * 3 + h] = (float)(((5 * e + 2 * m + 3 * h) % 11) - 5) / 10.0f;
                W2[(e * 3 + h) * 2 + m] = (float)(((3 * e + 4 * h + 7 * m) % 11) - 5) / 10.0f;
            }
    c.num_experts = 4; c.top_k = 2; c.d_model = 3; c.d_ff = 2;
    c.balance_coef = 0.0f;             /* the spec's backward is of <dy, y> alone */
    c.save_for_backward = 1;           /* keep the expert activations for the backward */
    memset(&w, 0, sizeof w);
    w.router = WG; w.gate = W1; w.up = W3; w.down = W2;
    if (moe_info_size(&c, 3, &bytes) != MOE_STATUS_OK) exit(1);
    ib = malloc(bytes);
    memset(&info, 0, sizeof info);
    moe_info_bind(&c, 3, &info, ib, bytes);
    if (!ib || moe_forward_alloc(&c, &w, X, 3, y, &info) != MOE_STATUS_OK) { fprintf(stderr, "forward failed\n"); exit(1); }

    printf("\n[4] the full layer of \"Worked layer\": T=3, D=3, F=2, E=4, K=2, SwiGLU\n");
    show("logits z = x Wg^T", info.logits, z_spec, 12);
    show_int("top-2 experts", info.expert, idx_spec, 6);
    show("gate weights w", info.weight, w_spec, 6);
    /* info.cache_out holds the expert outputs in dispatch order: expert by
       expert, tokens in order within an expert. Walk the rows as the
       counting sort placed them.                                          */
    for (t = 0; t < 3; t++) for (j = 0; j < 2; j++) rows_of[info.expert[t * 2 + j]]++;
    for (e = 0, row = 0; e < 4; e++)
        for (t = 0; t < 3; t++)
            for (j = 0; j < 2; j++)
                if (info.expert[t * 2 + j] == e) {
                    snprintf(name, sizeof name, "row %d: o(t%d, e%d)", (int)row, (int)t, (int)e);
                    show(name, info.cache_out + 3 * row, o_spec[e][t], 3);
                    row++;
                }
    show("y = sum_j w_j o_j, t0", y, y_spec, 3);
    show("y, t1", y + 3, y_spec + 3, 3);
    show("y, t2", y + 6, y_spec + 6, 3);
    show1("HF balance loss", info.aux_balance, 2.041652749);
    show1("z-loss", info.aux_z, 2.491868848);

    printf("\n[5] backward of <dy, y> (\"Worked layer\")\n");
    memset(dwg, 0, sizeof dwg); memset(dw1, 0, sizeof dw1); memset(dw3, 0, sizeof dw3); memset(dw2, 0, sizeof dw2);
    memset(&g, 0, sizeof g);
    g.router = dwg; g.gate = dw1; g.up = dw3; g.down = dw2;
    if (moe_backward_alloc(&c, &w, X, 3, &info, DY, dx, &g) != MOE_STATUS_OK) { fprintf(stderr, "backward failed\n"); exit(1); }
    show("dx, t0", dx, dx_spec, 3);
    show("dx, t1", dx + 3, dx_spec + 3, 3);
    show("dx, t2", dx + 6, dx_spec + 6, 3);
    for (e = 0; e < 4; e++) { snprintf(name, sizeof name, "dWg row e%d", (int)e); show(name, dwg + 3 * e, dwg_spec + 3 * e, 3); }
    for (e = 0; e < 4; e++) { snprintf(name, sizeof name, "dW1 (gate) e%d", (int)e); show(name, dw1 + 6 * e, dw1_spec + 6 * e, 6); }
    for (e = 0; e < 4; e++) { snprintf(name, sizeof name, "dW3 (up) e%d", (int)e); show(name, dw3 + 6 * e, dw3_spec + 6 * e, 6); }
    for (e = 0; e < 4; e++) { snprintf(name, sizeof name, "dW2 (down) e%d", (int)e); show(name, dw2 + 6 * e, dw2_spec + 6 * e, 6); }

    /* the balance loss alone (dy = 0, balance_coef = 1): its router gradient
       is dWg = (dL/dz)^T x, with dL/dz the spec's                          */
    {
        double want[12];
        int32_t d;
        c.balance_coef = 1.0f;
        memset(zero, 0, sizeof zero);
        if (moe_forward_alloc(&c, &w, X, 3, y, &info) != MOE_STATUS_OK) exit(1);
        memset(dwg, 0, sizeof dwg);
        memset(&g, 0, sizeof g);
        g.router = dwg;
        if (moe_backward_alloc(&c, &w, X, 3, &info, zero, dx, &g) != MOE_STATUS_OK) exit(1);
        for (e = 0; e < 4; e++)
            for (d = 0; d < 3; d++) {
                want[e * 3 + d] = 0.0;
                for (t = 0; t < 3; t++) want[e * 3 + d] += daux_spec[t * 4 + e] * X[t * 3 + d];
            }
        for (e = 0; e < 4; e++) {
            snprintf(name, sizeof name, "aux only: dWg row e%d", (int)e);
            show(name, dwg + 3 * e, want + 3 * e, 3);
        }
    }
    free(ib);
}

// ----------------------------------------------------------------------------
// 6. DeepSeek-V3: sigmoid scores, group-limited selection with a bias, the
//    bias update, the sequence-wise loss (docs/ROUTING.md: "Group-limited top-k",
//    "Bias update", "Sequence-wise balance")

static void section_bias(void) {
    static const float z[24] = {0.2f, -1.0f, 1.5f, 0.8f, 0.0f, -0.4f, 2.1f, -2.0f, 0.3f, 1.0f, 0.9f, -0.6f,
                                -0.3f, 0.7f, 0.1f, 1.9f, -1.2f, 0.5f, 0.4f, 0.6f, -0.8f, 1.3f, 0.0f, 2.4f};
    static float b[12] = {0.1f, 0.0f, -0.2f, 0.05f, 0.3f, 0.0f, -0.1f, 0.2f, 0.0f, 0.15f, -0.05f, -0.3f};
    static const float b0[12] = {0};
    static const int32_t idx[8] = {9, 4, 3, 10, 9, 3, 5, 11}, idx_nobias[4] = {6, 9, 10, 8};
    static const double w25[8] = {0.694399, 0.474927, 0.655375, 0.675298, 0.614892, 0.680663, 0.487055, 0.717389};
    static const int32_t load[12] = {0, 0, 0, 2, 1, 1, 0, 0, 0, 2, 1, 1};
    static const double b_new[12] = {0.1010, 0.0010, -0.1990, 0.0490, 0.2990, -0.0010, -0.0990, 0.2010,
                                     0.0010, 0.1490, -0.0510, -0.3010};
    moe_config c = moe_preset_deepseek_v3();   /* sigmoid, bias, groups, x2.5 */
    moe_weights w;
    routed r;
    printf("\n[6] DeepSeek-V3 (\"Group-limited top-k\"): E=12 in 4 groups, 2 groups kept, top-4, bias for selection\n");
    c.num_experts = 12; c.top_k = 4; c.n_group = 4; c.topk_group = 2; c.group_score_top = 2;
    c.d_model = 1; c.d_ff = 1; c.shared_d_ff = 0;
    memset(&w, 0, sizeof w);
    w.selection_bias = b;
    r = route(&c, &w, z, 2);
    show_int("experts (by s + b)", r.info.expert, idx, 8);
    show("w = 2.5 s/sum s (no b)", r.info.weight, w25, 8);
    show1("sequence-wise loss", r.info.aux_seq, 1.186448);
    free(r.buf);
    w.selection_bias = b0;
    r = route(&c, &w, z, 2);
    show_int("t0 experts with b = 0", r.info.expert, idx_nobias, 4);
    free(r.buf);
    moe_selection_bias_update(12, load, 1e-3f, b);
    show("b after one update", b, b_new, 12);
}

// ----------------------------------------------------------------------------
// Pictures

/* (a) the GShard batch of section 2: tokens left, experts right with their
   C = 2 slots filled in GShard's position order (slot 0 choices first). */
static int svg_routing(const char *path) {
    static const char *const col[4] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"};
    const double tx = 250, ty0 = 100, tdy = 52, ex = 560, ey0 = 78, edy = 84, slot_w = 120, slot_h = 26;
    int32_t fill[4] = {0, 0, 0, 0}, slot_of[12], t, j, e;
    FILE *f = fopen(path, "w");
    if (!f) return 0;
    /* positions: slot 0 of every token in token order, then slot 1 */
    for (j = 0; j < 2; j++)
        for (t = 0; t < 6; t++) {
            const int32_t p = t * 2 + j;
            slot_of[p] = gs_dropped[p] ? -1 : fill[gs_expert[p]]++;
        }
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"820\" height=\"480\" viewBox=\"0 0 820 480\" "
               "font-family=\"Helvetica, Arial, sans-serif\">\n<rect width=\"820\" height=\"480\" fill=\"white\"/>\n");
    fprintf(f, "<text x=\"410\" y=\"30\" font-size=\"18\" font-weight=\"bold\" text-anchor=\"middle\">"
               "Routing a batch: 6 tokens, 4 experts, top-2, capacity C = 2</text>\n");
    fprintf(f, "<text x=\"410\" y=\"50\" font-size=\"12\" fill=\"#555\" text-anchor=\"middle\">"
               "GShard top-2 (docs/ROUTING.md). Solid: first choice; dashed: second choice; grey line and red cross: "
               "dropped, the expert was full.</text>\n");
    for (t = 0; t < 6; t++) {          /* token boxes */
        const double y = ty0 + tdy * t;
        fprintf(f, "<rect x=\"%.0f\" y=\"%.0f\" width=\"50\" height=\"30\" rx=\"5\" fill=\"#f2f2f2\" stroke=\"#333\"/>\n",
                tx - 50, y - 15);
        fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-size=\"14\" text-anchor=\"middle\">t%d</text>\n", tx - 25, y + 5, (int)t);
    }
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-size=\"13\" fill=\"#b00\" text-anchor=\"end\">both choices dropped:</text>\n",
            tx - 60, ty0 + tdy * 5 - 2);
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-size=\"13\" fill=\"#b00\" text-anchor=\"end\">output 0, residual only</text>\n",
            tx - 60, ty0 + tdy * 5 + 14);
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-size=\"13\" fill=\"#555\" text-anchor=\"middle\">tokens</text>\n",
            tx - 25, ty0 - 30);
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-size=\"13\" fill=\"#555\" text-anchor=\"middle\">experts: C slots each "
               "(token, gate weight)</text>\n", ex + 90, ey0 - 12);
    for (e = 0; e < 4; e++) {          /* expert boxes, their C slots stacked */
        const double y = ey0 + edy * e;
        int32_t s;
        fprintf(f, "<rect x=\"%.0f\" y=\"%.0f\" width=\"180\" height=\"%.0f\" rx=\"6\" fill=\"none\" stroke=\"%s\" stroke-width=\"2\"/>\n",
                ex, y, 2 * slot_h + 18, col[e]);
        fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-size=\"16\" font-weight=\"bold\" fill=\"%s\">e%d</text>\n",
                ex + 145, y + slot_h + 14, col[e], (int)e);
        for (s = 0; s < 2; s++) {
            const double sy = y + 6 + s * (slot_h + 6);
            int32_t who = -1, p = -1;
            for (t = 0; t < 6; t++)
                for (j = 0; j < 2; j++)
                    if (gs_expert[t * 2 + j] == e && slot_of[t * 2 + j] == s) { who = t; p = t * 2 + j; }
            fprintf(f, "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"%s\" fill-opacity=\"0.15\" stroke=\"%s\"/>\n",
                    ex + 8, sy, slot_w, slot_h, col[e], col[e]);
            if (who >= 0)
                fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-size=\"13\">t%d  w %.3f</text>\n",
                        ex + 16, sy + 18, (int)who, gs_weight[p]);
        }
    }
    for (t = 0; t < 6; t++)            /* one line per (token, slot) pair */
        for (j = 0; j < 2; j++) {
            const int32_t p = t * 2 + j;
            const double x1 = tx, y1 = ty0 + tdy * t + (j ? 6 : -6);
            const double x2 = gs_dropped[p] ? ex - 10 : ex + 8;
            const double y2 = ey0 + edy * gs_expert[p] +
                              (gs_dropped[p] ? slot_h + 9 + (j ? 8 : -8) : 6 + slot_of[p] * (slot_h + 6) + slot_h / 2);
            fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"%s\"%s/>\n",
                    x1, y1, x2, y2, gs_dropped[p] ? "#aaa" : col[gs_expert[p]], gs_dropped[p] ? "1.5" : "2.5",
                    j ? " stroke-dasharray=\"7,4\"" : "");
            if (gs_dropped[p])
                fprintf(f, "<path d=\"M%.1f %.1f l9 9 m0 -9 l-9 9\" stroke=\"#b00\" stroke-width=\"2.5\"/>\n",
                        x2 - 4, y2 - 4.5);
        }
    fprintf(f, "<text x=\"410\" y=\"428\" font-size=\"12\" fill=\"#555\" text-anchor=\"middle\">Slots fill in GShard's "
               "position order: every token's first choice (in token order), then the second choices.</text>\n");
    fprintf(f, "<text x=\"410\" y=\"446\" font-size=\"12\" fill=\"#555\" text-anchor=\"middle\">Weights are normalised "
               "before dropping (GShard paper), so t3 keeps 0.332 on e3; with normalize_after_drop = 1</text>\n");
    fprintf(f, "<text x=\"410\" y=\"464\" font-size=\"12\" fill=\"#555\" text-anchor=\"middle\">(fairseq, DeepSpeed) "
               "a lone survivor gets 1.0. Drawn by examples/tour.c from moe_route's output.</text>\n");
    fprintf(f, "</svg>\n");
    return fclose(f) == 0;
}

/* (b) a skewed router balanced by DeepSeek-V3's bias rule. E = 8 experts,
   top-2, sigmoid scores, T = 512 fresh tokens a step with logits
   N(0, 1) + skew_e, skew rising from -1 (e0) to +1 (e7); after every step
   b_e += gamma sign(mean load - load_e) (moe_selection_bias_update).     */
enum { BE = 8, BK = 2, BT = 512, BSTEPS = 200, BTAIL = 20 };
#define BGAMMA 0.002f
static uint64_t brng = 0x9E3779B97F4A7C15ull;
static double bnormal(void) {
    double u1, u2;
    brng ^= brng >> 12; brng ^= brng << 25; brng ^= brng >> 27;
    u1 = ((double)((brng * 2685821657736338717ull) >> 11) + 0.5) / 9007199254740992.0;
    brng ^= brng >> 12; brng ^= brng << 25; brng ^= brng >> 27;
    u2 = ((double)((brng * 2685821657736338717ull) >> 11) + 0.5) / 9007199254740992.0;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static int bias_demo(const char *path) {
    static float logits[BT * BE];
    float bias[BE] = {0}, before[BE], after[BE] = {0};
    double mx_b = 0.0, mx_a = 0.0;
    moe_config c = route_cfg(BE, BK);
    moe_weights w;
    routed r;
    int32_t step, t, e;
    FILE *f;
    c.score = MOE_SCORE_SIGMOID;
    c.selection_bias = 1;
    memset(&w, 0, sizeof w);
    w.selection_bias = bias;
    for (step = 0; step < BSTEPS; step++) {
        for (t = 0; t < BT; t++)
            for (e = 0; e < BE; e++) logits[t * BE + e] = (float)(bnormal() - 1.0 + 2.0 * e / (BE - 1));
        r = route(&c, &w, logits, BT);
        for (e = 0; e < BE; e++) {
            if (step == 0) before[e] = (float)r.info.expert_routed[e];
            if (step >= BSTEPS - BTAIL) after[e] += (float)r.info.expert_routed[e] / BTAIL;
        }
        moe_selection_bias_update(BE, r.info.expert_routed, BGAMMA, bias);
        free(r.buf);
    }
    for (e = 0; e < BE; e++) {
        if (before[e] > mx_b) mx_b = before[e];
        if (after[e] > mx_a) mx_a = after[e];
    }
    printf("\n[7] aux-loss-free balancing: E=%d, top-%d, sigmoid, %d tokens a step with a skewed router,\n"
           "    gamma %g, %d steps (drawn in tour_balance.svg)\n", BE, BK, BT, (double)BGAMMA, BSTEPS);
    printf("  tokens per expert, step 0 (b = 0):   ");
    for (e = 0; e < BE; e++) printf(" %4.0f", before[e]);
    printf("   max/mean %.2f\n", mx_b * BE / (BT * BK));
    printf("  tokens per expert, last %d steps:    ", BTAIL);
    for (e = 0; e < BE; e++) printf(" %4.0f", after[e]);
    printf("   max/mean %.2f\n", mx_a * BE / (BT * BK));
    printf("  bias after %d steps:                 ", BSTEPS);
    for (e = 0; e < BE; e++) printf(" %+.3f", bias[e]);
    printf("\n");

    if (!(f = fopen(path, "w"))) return 0;
    {
        const double W = 820, H = 360, px[2] = {60, 450}, py = 100, pw = 300, ph = 180, ymax = 350;
        const float *v[2];
        const char *title[2] = {"before: step 0, bias 0", "after: mean of the last 20 steps"};
        int k;
        v[0] = before; v[1] = after;
        fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
                   "font-family=\"Helvetica, Arial, sans-serif\">\n<rect width=\"%.0f\" height=\"%.0f\" fill=\"white\"/>\n",
                W, H, W, H, W, H);
        fprintf(f, "<text x=\"%.0f\" y=\"28\" font-size=\"17\" font-weight=\"bold\" text-anchor=\"middle\">"
                   "Aux-loss-free balancing (DeepSeek-V3 bias): tokens per expert</text>\n", W / 2);
        fprintf(f, "<text x=\"%.0f\" y=\"48\" font-size=\"12\" fill=\"#555\" text-anchor=\"middle\">E = %d, top-%d, "
                   "sigmoid router skewed towards the high experts, %d fresh tokens a step;</text>\n", W / 2, BE, BK, BT);
        fprintf(f, "<text x=\"%.0f\" y=\"64\" font-size=\"12\" fill=\"#555\" text-anchor=\"middle\">after each step "
                   "b_e += %g sign(mean load - load_e)  (moe_selection_bias_update), %d steps</text>\n",
                W / 2, (double)BGAMMA, BSTEPS);
        for (k = 0; k < 2; k++) {
            const double mean = (double)BT * BK / BE, bw = pw / BE;
            fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-size=\"14\" font-weight=\"bold\">%s</text>\n", px[k], py - 10, title[k]);
            fprintf(f, "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"#333\"/>\n", px[k], py + ph, px[k] + pw, py + ph);
            fprintf(f, "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"#333\"/>\n", px[k], py, px[k], py + ph);
            fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-size=\"10\" text-anchor=\"end\">%.0f</text>\n", px[k] - 4, py + 4, ymax);
            fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-size=\"10\" text-anchor=\"end\">0</text>\n", px[k] - 4, py + ph + 3);
            for (e = 0; e < BE; e++) {
                const double hgt = ph * (v[k][e] > ymax ? ymax : v[k][e]) / ymax;
                fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\"/>\n",
                        px[k] + e * bw + 4, py + ph - hgt, bw - 8, hgt, k ? "#2ca02c" : "#d62728");
                fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" text-anchor=\"middle\">%.0f</text>\n",
                        px[k] + (e + 0.5) * bw, py + ph - hgt - 4, v[k][e]);
                fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" text-anchor=\"middle\">e%d</text>\n",
                        px[k] + (e + 0.5) * bw, py + ph + 15, (int)e);
            }
            fprintf(f, "<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.0f\" y2=\"%.1f\" stroke=\"#555\" stroke-dasharray=\"5,4\"/>\n",
                    px[k], py + ph * (1.0 - mean / ymax), px[k] + pw, py + ph * (1.0 - mean / ymax));
            fprintf(f, "<text x=\"%.0f\" y=\"%.1f\" font-size=\"11\" fill=\"#555\">mean</text>\n",
                    px[k] + pw + 4, py + ph * (1.0 - mean / ymax) - 2);
            fprintf(f, "<text x=\"%.0f\" y=\"%.1f\" font-size=\"11\" fill=\"#555\">%.0f</text>\n",
                    px[k] + pw + 4, py + ph * (1.0 - mean / ymax) + 11, mean);
            fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-size=\"12\" text-anchor=\"middle\">max/mean %.2f</text>\n",
                    px[k] + pw / 2, py + ph + 38, (k ? mx_a : mx_b) * BE / (BT * BK));
        }
        fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-size=\"11\" fill=\"#555\" text-anchor=\"middle\">The bias moves "
                   "selection only; the gate weights still come from the unbiased scores. Drawn by examples/tour.c.</text>\n",
                W / 2, H - 12);
        fprintf(f, "</svg>\n");
    }
    return fclose(f) == 0;
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : ".";
    char path_a[1024], path_b[1024];
    int ok_a, ok_b;
    printf("moe.h %s guided tour: the numbers of docs/TOUR.md, each checked against docs/ROUTING.md\n",
           MOE_VERSION_STRING);
    section_scores();
    section_capacity();
    section_layer();
    section_bias();
    snprintf(path_a, sizeof path_a, "%s/tour_routing.svg", dir);
    snprintf(path_b, sizeof path_b, "%s/tour_balance.svg", dir);
    ok_b = bias_demo(path_b);
    ok_a = svg_routing(path_a);
    printf("\n%s %s, %s %s\n", ok_a ? "wrote" : "COULD NOT WRITE", path_a, ok_b ? "wrote" : "COULD NOT WRITE", path_b);
    printf("%d of %d checks agree with docs/ROUTING.md\n", checked - mismatches, checked);
    return mismatches == 0 && ok_a && ok_b ? 0 : 1;
}
