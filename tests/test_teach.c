/* The training aids the teaching examples use: initialisation, warm-up
   noise, expert dropout (forward statistics; gradients are in test_grad.c),
   gradient zeroing and global-norm clipping, the GLaM and top-k-softmax
   presets.                                                                 */
#include "../moe.h"
#include "moe_test.h"

#define TE 4
#define TD 8
#define TF 6

typedef struct teach_params { float router[TE * TD], gate[TE * TF * TD], up[TE * TF * TD], down[TE * TD * TF]; } teach_params;

static moe_grads teach_set(teach_params *p) {
    moe_grads g;
    memset(&g, 0, sizeof g);
    g.router = p->router; g.gate = p->gate; g.up = p->up; g.down = p->down;
    return g;
}
static moe_config teach_cfg(void) {
    moe_config c;
    memset(&c, 0, sizeof c);
    c.num_experts = TE; c.top_k = 2; c.d_model = TD; c.d_ff = TF;
    return c;
}

/* Same seed -> same tensors; other seed -> other tensors; experts differ;
   the scale matches the scheme (Xavier bound, Switch std within 2 sigma). */
TEST(teach, init_weights_deterministic_and_scaled) {
    static teach_params a, b, d;
    moe_config c = teach_cfg();
    moe_grads ga = teach_set(&a), gb = teach_set(&b), gd = teach_set(&d);
    double bound = sqrt(6.0 / (TD + TF)), sum2 = 0.0, mx = 0.0;
    size_t i;
    CHECK_STATUS(moe_init_weights(&c, MOE_INIT_XAVIER, 42, &ga), MOE_STATUS_OK);
    CHECK_STATUS(moe_init_weights(&c, MOE_INIT_XAVIER, 42, &gb), MOE_STATUS_OK);
    CHECK_STATUS(moe_init_weights(&c, MOE_INIT_XAVIER, 43, &gd), MOE_STATUS_OK);
    CHECK(memcmp(&a, &b, sizeof a) == 0);
    CHECK(memcmp(a.gate, d.gate, sizeof a.gate) != 0);
    CHECK(memcmp(a.gate, a.gate + TF * TD, TF * TD * sizeof(float)) != 0);   /* expert 0 != 1 */
    for (i = 0; i < TE * TF * TD; i++) if (fabs(a.gate[i]) > mx) mx = fabs(a.gate[i]);
    CHECK(mx <= bound && mx > 0.5 * bound);
    CHECK_STATUS(moe_init_weights(&c, MOE_INIT_SWITCH, 42, &ga), MOE_STATUS_OK);
    for (i = 0; i < TE * TF * TD; i++) { sum2 += (double)a.gate[i] * a.gate[i]; if (fabs(a.gate[i]) > mx) mx = fabs(a.gate[i]); }
    /* std sqrt(0.1 / D) truncated at 2 std: sample std a bit below, none past 2 std */
    CHECK_NEAR(sqrt(sum2 / (TE * TF * TD)), 0.88 * sqrt(0.1 / TD), 0.0, 0.2);
    for (i = 0; i < TE * TF * TD; i++) CHECK(fabs(a.gate[i]) <= 2.0 * sqrt(0.1 / TD) + 1e-7);
    CHECK_STATUS(moe_init_weights(NULL, MOE_INIT_XAVIER, 1, &ga), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_init_weights(&c, (moe_init_scheme)7, 1, &ga), MOE_STATUS_BAD_ENUM);
}

/* Expert dropout: training drops about p of the hidden units (y changes with
   the seed), inference ignores it (y bitwise equal to no dropout).        */
TEST(teach, expert_dropout_forward) {
    static teach_params p;
    moe_config c = teach_cfg();
    moe_grads g = teach_set(&p);
    moe_weights w;
    float x[16 * TD], y0[16 * TD], y1[16 * TD], y2[16 * TD], y3[16 * TD];
    int i;
    for (i = 0; i < 16 * TD; i++) x[i] = (float)((i * 37) % 17) / 8.0f - 1.0f;
    moe_init_weights(&c, MOE_INIT_XAVIER, 3, &g);
    memset(&w, 0, sizeof w);
    w.router = p.router; w.gate = p.gate; w.up = p.up; w.down = p.down;
    CHECK_STATUS(moe_forward_alloc(&c, &w, x, 16, y0, NULL), MOE_STATUS_OK);
    c.expert_dropout = 0.5f;
    CHECK_STATUS(moe_forward_alloc(&c, &w, x, 16, y1, NULL), MOE_STATUS_OK);   /* inference */
    CHECK(memcmp(y0, y1, sizeof y0) == 0);
    c.training = 1; c.seed = 1;
    CHECK_STATUS(moe_forward_alloc(&c, &w, x, 16, y2, NULL), MOE_STATUS_OK);
    c.seed = 2;
    CHECK_STATUS(moe_forward_alloc(&c, &w, x, 16, y3, NULL), MOE_STATUS_OK);
    CHECK(memcmp(y0, y2, sizeof y0) != 0 && memcmp(y2, y3, sizeof y2) != 0);
    c.expert_dropout = 1.0f;
    CHECK_STATUS(moe_forward_alloc(&c, &w, x, 16, y2, NULL), MOE_STATUS_BAD_OPTION);
}

/* Warm-up noise: training with std > 0 changes routing scores reproducibly;
   inference ignores it; only top-k routing takes it.                      */
TEST(teach, warmup_noise) {
    static teach_params p;
    moe_config c = teach_cfg();
    moe_grads g = teach_set(&p);
    moe_weights w;
    moe_info a, b;
    float x[32 * TD], y[32 * TD], sa[32 * TE], sb[32 * TE], s0[32 * TE];
    int i;
    for (i = 0; i < 32 * TD; i++) x[i] = (float)((i * 29) % 23) / 11.0f - 1.0f;
    moe_init_weights(&c, MOE_INIT_XAVIER, 4, &g);
    memset(&w, 0, sizeof w);
    w.router = p.router; w.gate = p.gate; w.up = p.up; w.down = p.down;
    memset(&a, 0, sizeof a); memset(&b, 0, sizeof b);
    a.scores = s0;
    CHECK_STATUS(moe_forward_alloc(&c, &w, x, 32, y, &a), MOE_STATUS_OK);
    c.router_noise_std = 1.0f; c.training = 1; c.seed = 11;
    a.scores = sa; b.scores = sb;
    CHECK_STATUS(moe_forward_alloc(&c, &w, x, 32, y, &a), MOE_STATUS_OK);
    CHECK_STATUS(moe_forward_alloc(&c, &w, x, 32, y, &b), MOE_STATUS_OK);
    CHECK(memcmp(sa, sb, sizeof sa) == 0);
    CHECK(memcmp(sa, s0, sizeof sa) != 0);
    c.training = 0;
    CHECK_STATUS(moe_forward_alloc(&c, &w, x, 32, y, &a), MOE_STATUS_OK);
    CHECK(memcmp(sa, s0, sizeof sa) == 0);
    c.routing = MOE_ROUTING_DENSE;
    CHECK_STATUS(moe_forward_alloc(&c, &w, x, 32, y, &a), MOE_STATUS_BAD_OPTION);
}

/* moe_grads_zero zeroes exactly the given tensors; clip_norm scales to the
   bound and reports the norm; under the bound nothing changes.           */
TEST(teach, grads_zero_and_clip) {
    static teach_params p;
    moe_config c = teach_cfg();
    moe_grads g = teach_set(&p);
    float norm = 0.0f;
    double sum = 0.0;
    size_t i;
    float *all = (float *)(void *)&p;
    const size_t n = sizeof p / sizeof(float);
    for (i = 0; i < n; i++) all[i] = (float)(i % 7) - 3.0f;
    for (i = 0; i < n; i++) sum += (double)all[i] * all[i];
    CHECK_STATUS(moe_grads_clip_norm(&c, &g, 1e9f, &norm), MOE_STATUS_OK);
    CHECK_NEAR(norm, sqrt(sum), 0.0, 1e-6);
    CHECK(all[1] == -2.0f);
    CHECK_STATUS(moe_grads_clip_norm(&c, &g, 2.0f, &norm), MOE_STATUS_OK);
    sum = 0.0;
    for (i = 0; i < n; i++) sum += (double)all[i] * all[i];
    CHECK_NEAR(sqrt(sum), 2.0, 0.0, 1e-5);
    CHECK_STATUS(moe_grads_clip_norm(&c, &g, 0.0f, NULL), MOE_STATUS_BAD_OPTION);
    g.up = NULL;
    CHECK_STATUS(moe_grads_zero(&c, &g), MOE_STATUS_OK);
    for (i = 0; i < TE * TF * TD; i++) CHECK(p.gate[i] == 0.0f && p.down[i] == 0.0f);
    CHECK(p.up[0] != 0.0f || p.up[1] != 0.0f);          /* NULL tensor untouched */
}

/* GLaM: top-2 of 64 GEGLU experts. Top-k-softmax: softmax over the k kept
   logits gives exactly the weights the preset's renormalised top-k gives. */
TEST(teach, glam_and_topk_softmax_presets) {
    moe_config glam = moe_preset_glam(), tk = moe_preset_topk_softmax(), r;
    static const float logits[2 * 4] = {1.0f, 2.0f, 0.5f, -1.0f, 0.2f, -0.3f, 1.5f, 1.0f};
    float weight[4];
    int32_t expert[4];
    moe_info info;
    void *ws;
    size_t bytes;
    int t;
    CHECK_INT(glam.num_experts, 64); CHECK_INT(glam.top_k, 2);
    CHECK_INT(glam.activation, MOE_ACT_GEGLU);
    CHECK_STATUS(moe_config_resolve(&glam, &r), MOE_STATUS_OK);
    tk.num_experts = 4; tk.d_model = 4; tk.d_ff = 4;
    memset(&info, 0, sizeof info);
    info.weight = weight; info.expert = expert;
    moe_route_workspace_size(&tk, 2, &bytes);
    ws = malloc(bytes);
    CHECK_STATUS(moe_route(&tk, NULL, logits, NULL, 2, &info, ws, bytes), MOE_STATUS_OK);
    for (t = 0; t < 2; t++) {   /* softmax over the two kept logits, in double */
        const double z0 = logits[t * 4 + expert[t * 2]], z1 = logits[t * 4 + expert[t * 2 + 1]];
        CHECK_NEAR(weight[t * 2], exp(z0) / (exp(z0) + exp(z1)), 1e-7, 1e-6);
        CHECK_NEAR(weight[t * 2 + 1], exp(z1) / (exp(z0) + exp(z1)), 1e-7, 1e-6);
    }
    free(ws);
}

/* The helpers honour the fused [E][2F][D] gate_up layout: zeroing and
   clipping reach the up half, and init fills it.                          */
TEST(teach, helpers_fused_gate_up) {
    static float gate_up[TE * 2 * TF * TD];
    moe_config c = teach_cfg();
    moe_grads g;
    float norm = 0.0f;
    size_t i;
    memset(&g, 0, sizeof g);
    g.gate = gate_up; g.gate_up_fused = 1;
    CHECK_STATUS(moe_init_weights(&c, MOE_INIT_XAVIER, 5, &g), MOE_STATUS_OK);
    CHECK(gate_up[TE * 2 * TF * TD - 1] != 0.0f && gate_up[TF * TD] != 0.0f);   /* up halves filled */
    for (i = 0; i < TE * 2 * TF * TD; i++) gate_up[i] = 1.0f;
    CHECK_STATUS(moe_grads_clip_norm(&c, &g, 1e9f, &norm), MOE_STATUS_OK);
    CHECK_NEAR(norm, sqrt((double)TE * 2 * TF * TD), 0.0, 1e-6);
    CHECK_STATUS(moe_grads_zero(&c, &g), MOE_STATUS_OK);
    for (i = 0; i < TE * 2 * TF * TD; i++) CHECK(gate_up[i] == 0.0f);
}
