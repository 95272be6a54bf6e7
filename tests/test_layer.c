/* Whole-layer tests: ROUTING_SPEC 13.5's worked Mixtral layer, and layer
   properties (empty batches, shared experts, fused layouts, determinism). */
#include "../moe.h"
#include "moe_test.h"

/* ROUTING_SPEC 13.5: T = 3, D = 3, F = 2, E = 4, K = 2, SwiGLU, dropless. */
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
    /* aux losses on the same logits (13.5): HF balance loss and z-loss */
    CHECK_NEAR(info.aux_balance, 2.041652749, SPEC_ATOL, SPEC_RTOL);
    CHECK_NEAR(info.aux_z, 2.491868848, SPEC_ATOL, SPEC_RTOL);
    CHECK_NEAR(info.aux_total, 0.02 * 2.041652749, SPEC_ATOL, SPEC_RTOL);
    CHECK_INT(info.dropped_pairs, 0);
    CHECK_INT(info.capacity, 0);
}
