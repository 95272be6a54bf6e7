/* Whole-layer tests: the Mixtral layer of docs/ROUTING.md, "Worked layer", and layer
   properties (empty batches, shared experts, fused layouts, determinism). */
#include "../moe.h"
#include "moe_test.h"

/* docs/ROUTING.md, "Worked layer": T = 3, D = 3, F = 2, E = 4, K = 2, SwiGLU, dropless. */
typedef struct spec_layer {
    float x[9], wg[12], w1[24], w3[24], w2[24];
} spec_layer;

static void spec_layer_init(spec_layer *s) {
    static const float x[9] = {0.5f, -1.0f, 0.25f, 1.0f, 0.5f, -0.5f, -0.75f, 0.25f, 1.0f};
    static const float wg[12] = {0.2f, -0.1f, 0.4f, 0.5f, 0.3f, -0.2f, -0.3f, 0.6f, 0.2f, 0.1f, -0.4f, 0.7f};
    int e, m, h;
    memcpy(s->x, x, sizeof x);
    memcpy(s->wg, wg, sizeof wg);
    for (e = 0; e < 4; e++)
        for (m = 0; m < 2; m++)
            for (h = 0; h < 3; h++) {
                s->w1[(e * 2 + m) * 3 + h] = (float)(((7 * e + 3 * m + 5 * h) % 11) - 5) / 10.0f;
                s->w3[(e * 2 + m) * 3 + h] = (float)(((5 * e + 2 * m + 3 * h) % 11) - 5) / 10.0f;
                s->w2[(e * 3 + h) * 2 + m] = (float)(((3 * e + 4 * h + 7 * m) % 11) - 5) / 10.0f;
            }
}

static moe_config spec_layer_config(void) {
    moe_config c = moe_preset_mixtral();
    c.num_experts = 4; c.top_k = 2; c.d_model = 3; c.d_ff = 2;
    return c;
}

TEST(layer, spec_13_5_mixtral_forward) {
    static const double y_want[9] = {-0.007137596, 0.021365185, -0.016114651,
                                     0.004728148, -0.014168860, 0.030279106,
                                     0.007407627, 0.006255443, -0.015837316};
    static const double z_want[12] = {0.3, -0.1, -0.7, 0.625, -0.05, 0.75, -0.1, -0.45,
                                      0.225, -0.5, 0.575, 0.525};
    static const double w_want[6] = {0.580542305, 0.419457695, 0.689974481, 0.310025519,
                                     0.512497396, 0.487502604};
    static const int idx_want[6] = {3, 0, 1, 0, 2, 3};
    spec_layer s;
    moe_config c = spec_layer_config();
    moe_weights w;
    moe_info info;
    float y[9], logits[12], weight[6];
    int32_t expert[6];
    int i;
    spec_layer_init(&s);
    memset(&w, 0, sizeof w);
    memset(&info, 0, sizeof info);
    w.router = s.wg; w.gate = s.w1; w.up = s.w3; w.down = s.w2;
    info.logits = logits; info.expert = expert; info.weight = weight;
    CHECK_STATUS(moe_forward_alloc(&c, &w, s.x, 3, y, &info), MOE_STATUS_OK);
    CHECK_ARRAY_NEAR(logits, z_want, 12, SPEC_ATOL, SPEC_RTOL);
    CHECK_ARRAY_NEAR(weight, w_want, 6, SPEC_ATOL, SPEC_RTOL);
    for (i = 0; i < 6; i++) CHECK_INT(expert[i], idx_want[i]);
    /* y is O(1e-2); 1e-8 absolute is 1e-6 relative to its scale */
    CHECK_ARRAY_NEAR(y, y_want, 9, 1e-8, SPEC_RTOL);
    /* aux losses on the same logits ("Worked layer"): HF balance loss and z-loss */
    CHECK_NEAR(info.aux_balance, 2.041652749, SPEC_ATOL, SPEC_RTOL);
    CHECK_NEAR(info.aux_z, 2.491868848, SPEC_ATOL, SPEC_RTOL);
    CHECK_NEAR(info.aux_total, 0.02 * 2.041652749, SPEC_ATOL, SPEC_RTOL);
    CHECK_INT(info.dropped_pairs, 0);
    CHECK_INT(info.capacity, 0);
}

/* "Worked layer" backward, for the scalar sum(dy * y): dx, router and
   expert weight gradients; then the HF balance loss and the z-loss alone
   (dy = 0), whose dL/dz the spec prints, reach the router as dz^T x.      */
TEST(layer, spec_13_5_mixtral_backward) {
    static const float dy[9] = {1.0f, -0.5f, 0.25f, 0.0f, 1.0f, -1.0f, 0.5f, 0.5f, 0.5f};
    static const double dx_want[9] = {-0.021300137, 0.037065873, 0.004301102,
                                      -0.065687277, -0.044992545, -0.018056352,
                                      0.015749375, -0.015873961, 0.013814184};
    static const double dwg_want[12] = {0.002999066, -0.012712171, 0.004185148,
                                        0.002685615, 0.001342808, -0.001342808,
                                        0.000799206, -0.000266402, -0.001065608,
                                        -0.006483888, 0.011635765, -0.001776733};
    static const double dw1_want[24] = {
        0.013548024, 0.004622674, -0.005913477, 0.028875299, 0.018969110, -0.016250234,
        0.091768618, 0.045884309, -0.045884309, -0.103282560, -0.051641280, 0.051641280,
        0.016000743, -0.005333581, -0.021334324, -0.010972781, 0.003657594, 0.014630374,
        -0.026397945, 0.033752819, 0.007748405, 0.013143398, -0.021286134, 0.001070971};
    static const double dw3_want[24] = {
        0.034447536, 0.005702020, -0.012615069, -0.022744473, 0.029213251, -0.004861959,
        -0.011772752, -0.005886376, 0.005886376, -0.038788744, -0.019394372, 0.019394372,
        0.002774744, -0.000924915, -0.003699658, 0.005190950, -0.001730317, -0.006921267,
        0.045863684, -0.091727369, 0.022931842, 0.015057515, -0.028329588, 0.005564771};
    static const double dw2_want[24] = {
        0.000614493, 0.005729716, 0.048180864, -0.010188920, -0.048334487, 0.008756491,
        0, 0, -0.006727287, 0.058183116, 0.006727287, -0.058183116,
        0.004162115, -0.010958673, 0.004162115, -0.010958673, 0.004162115, -0.010958673,
        -0.019940732, 0.051129508, 0.009970366, -0.017530262, -0.004985183, 0.016799623};
    /* dL/dz of the aux losses on z ("Worked layer"), for dy = 0 */
    static const double dz_bal[12] = {0.039398517, -0.060644735, -0.033282536, 0.054528754,
                                      0.060095377, -0.070321888, -0.030056625, 0.040283136,
                                      0.046763148, -0.027961067, -0.081925728, 0.063123647};
    static const double dz_z[12] = {0.298108225, 0.199827919, 0.109667887, 0.412590919,
                                    0.210212517, 0.467836560, 0.199960331, 0.140909664,
                                    0.262181195, 0.126980794, 0.372052825, 0.353907595};
    spec_layer s;
    moe_config c = spec_layer_config();
    moe_weights w;
    moe_grads g;
    moe_info info;
    float y[9], dx[9], dwg[12], dw1[24], dw3[24], dw2[24], zero_dy[9];
    double want[12];
    void *buf;
    size_t bytes;
    int pass, e, d, t, recompute;
    spec_layer_init(&s);
    memset(&w, 0, sizeof w);
    w.router = s.wg; w.gate = s.w1; w.up = s.w3; w.down = s.w2;
    for (recompute = 0; recompute <= 1; recompute++) {
        c.training = 1; c.save_for_backward = 1; c.recompute = recompute; c.balance_coef = 0.0f;
        memset(&info, 0, sizeof info);
        CHECK_STATUS(moe_info_size(&c, 3, &bytes), MOE_STATUS_OK);
        buf = malloc(bytes);
        CHECK_STATUS(moe_info_bind(&c, 3, &info, buf, bytes), MOE_STATUS_OK);
        CHECK(recompute ? info.cache_hidden == NULL : info.cache_hidden != NULL);
        CHECK_STATUS(moe_forward_alloc(&c, &w, s.x, 3, y, &info), MOE_STATUS_OK);
        memset(dwg, 0, sizeof dwg); memset(dw1, 0, sizeof dw1);
        memset(dw3, 0, sizeof dw3); memset(dw2, 0, sizeof dw2);
        memset(&g, 0, sizeof g);
        g.router = dwg; g.gate = dw1; g.up = dw3; g.down = dw2;
        CHECK_STATUS(moe_backward_alloc(&c, &w, s.x, 3, &info, dy, dx, &g), MOE_STATUS_OK);
        CHECK_ARRAY_NEAR(dx, dx_want, 9, 1e-8, SPEC_RTOL);
        CHECK_ARRAY_NEAR(dwg, dwg_want, 12, 1e-8, SPEC_RTOL);
        CHECK_ARRAY_NEAR(dw1, dw1_want, 24, 1e-8, SPEC_RTOL);
        CHECK_ARRAY_NEAR(dw3, dw3_want, 24, 1e-8, SPEC_RTOL);
        CHECK_ARRAY_NEAR(dw2, dw2_want, 24, 1e-8, SPEC_RTOL);

        /* aux losses alone: router gradient = sum_t dz_t^T x_t */
        memset(zero_dy, 0, sizeof zero_dy);
        for (pass = 0; pass < 2; pass++) {
            const double *dz = pass ? dz_z : dz_bal;
            c.balance_coef = pass ? 0.0f : 1.0f;
            c.z_loss_coef = pass ? 1.0f : 0.0f;
            CHECK_STATUS(moe_forward_alloc(&c, &w, s.x, 3, y, &info), MOE_STATUS_OK);
            memset(dwg, 0, sizeof dwg);
            memset(&g, 0, sizeof g);
            g.router = dwg;
            CHECK_STATUS(moe_backward_alloc(&c, &w, s.x, 3, &info, zero_dy, dx, &g), MOE_STATUS_OK);
            for (e = 0; e < 4; e++)
                for (d = 0; d < 3; d++) {
                    want[e * 3 + d] = 0.0;
                    for (t = 0; t < 3; t++) want[e * 3 + d] += dz[t * 4 + e] * s.x[t * 3 + d];
                }
            CHECK_ARRAY_NEAR(dwg, want, 12, 1e-7, SPEC_RTOL);
        }
        c.z_loss_coef = 0.0f;
        free(buf);
    }
}
