/* Golden tests: moe.h against PyTorch / HF transformers modules.
   tests/ref/gen_golden.py wrote the inputs, weights and the modules' outputs
   to tests/ref/<case>.txt (committed; regenerate with `make golden`). The
   runner starts in tests/, so the files are read as ref/<case>.txt.
   Tolerance: fp32 both sides; the sums run in another order (torch's blocked
   GEMM, HF's expert-order index_add), so outputs agree to ~1e-7 relative to
   their scale; we ask for 1e-5 relative + 1e-6 absolute (the bound).
   Backward: files with a `dy` record also hold PyTorch autograd gradients of
   L = <dy, y> + balance_coef * aux_balance + z_loss_coef * aux_z (README in
   ref/). moe_backward runs as a user would run it (training forward with a
   bound info, then the backward into zeroed grads), with the training cache
   and with recompute, and must match every gradient record to
   |got - want| <= 1e-6 max(1, max_i |want_i|) + 1e-4 |want|, per tensor.
   The gradients are sums of many more fp32 products than y (dW sums over
   tokens and slots, dx over experts, the router and the shared expert), in
   another order than torch's, hence 1e-4 relative. The absolute part scales
   with the tensor because fp32 rounding is relative to the size of the
   terms summed, not to their sum: a router-gradient element that is a small
   difference of O(1) terms carries an O(1e-6 * scale) error on both sides.
   Measured: switch d_router [1][4] = 0.0067754 (float64 autograd) comes out
   0.0067769 in moe.h and 0.0067743 in torch fp32, in a tensor whose largest
   element is 3.3; a flat 1e-6 would reject that pair of equally good fp32
   results. Over all files both moe.h and torch fp32 are within ~7e-7 x the
   tensor's scale of float64 autograd; the largest |want| in a tensor is 16,
   and every tensor except switch d_router also passes the flat
   1e-6 + 1e-4 |want| (worst error / this bound: 0.65 for switch d_router,
   <= 0.09 elsewhere). */
#include "../moe.h"
#include "moe_test.h"

#define GOLDEN_RTOL 1e-5
#define GOLDEN_ATOL 1e-6
#define GRAD_RTOL 1e-4
#define GRAD_ATOL 1e-6
#define MAX_RECORDS 48

typedef struct golden {
    int n;
    char name[MAX_RECORDS][48];
    size_t count[MAX_RECORDS];
    double *val[MAX_RECORDS];
} golden;

/* Parse "<name> <count>\n<count numbers>" records after '#' comment lines. */
static int golden_load(golden *g, const char *path) {
    FILE *f = fopen(path, "rb");   /* binary: ftell/fseek offsets are exact on Windows too */
    char line[512];
    memset(g, 0, sizeof *g);
    if (!f) return 0;
    for (;;) {
        long pos = ftell(f);
        size_t i;
        if (!fgets(line, sizeof line, f)) break;
        if (line[0] == '#' || line[0] == '\n') continue;
        fseek(f, pos, SEEK_SET);
        if (g->n == MAX_RECORDS || fscanf(f, "%47s %zu", g->name[g->n], &g->count[g->n]) != 2) break;
        g->val[g->n] = (double *)malloc((g->count[g->n] + 1) * sizeof(double));
        for (i = 0; i < g->count[g->n]; i++)
            if (fscanf(f, "%lf", &g->val[g->n][i]) != 1) { fclose(f); return 0; }
        g->n++;
        if (!fgets(line, sizeof line, f)) break;   /* rest of the last number's line */
    }
    fclose(f);
    return g->n > 0;
}

static void golden_free(golden *g) { int i; for (i = 0; i < g->n; i++) free(g->val[i]); }

static const double *golden_get(const golden *g, const char *name, size_t *count) {
    int i;
    for (i = 0; i < g->n; i++)
        if (!strcmp(g->name[i], name)) { if (count) *count = g->count[i]; return g->val[i]; }
    return NULL;
}
static int golden_int(const golden *g, const char *name) {
    const double *v = golden_get(g, name, NULL);
    return v ? (int)v[0] : -1;
}
/* A float copy of a record (weights and inputs), or NULL when absent. */
static float *golden_floats(const golden *g, const char *name) {
    size_t n, i;
    const double *v = golden_get(g, name, &n);
    float *p;
    if (!v) return NULL;
    p = (float *)malloc(n * sizeof(float));
    for (i = 0; i < n; i++) p[i] = (float)v[i];
    return p;
}

typedef struct golden_case {
    golden g;
    moe_weights w;
    float *x;
    int T, D, E, K;
} golden_case;

static int golden_case_load(golden_case *gc, const char *file, moe_config *c) {
    char path[256];
    snprintf(path, sizeof path, "ref/%s", file);
    memset(gc, 0, sizeof *gc);
    if (!golden_load(&gc->g, path)) return 0;
    gc->T = golden_int(&gc->g, "T"); gc->D = golden_int(&gc->g, "D");
    gc->E = golden_int(&gc->g, "E"); gc->K = golden_int(&gc->g, "K");
    c->d_model = gc->D; c->d_ff = golden_int(&gc->g, "F");
    c->num_experts = gc->E; c->top_k = gc->K;
    gc->x = golden_floats(&gc->g, "x");
    gc->w.router = golden_floats(&gc->g, "router");
    gc->w.selection_bias = golden_floats(&gc->g, "selection_bias");
    gc->w.gate = golden_floats(&gc->g, "gate");
    gc->w.up = golden_floats(&gc->g, "up");
    gc->w.down = golden_floats(&gc->g, "down");
    gc->w.shared_gate = golden_floats(&gc->g, "shared_gate");
    gc->w.shared_up = golden_floats(&gc->g, "shared_up");
    gc->w.shared_down = golden_floats(&gc->g, "shared_down");
    gc->w.shared_expert_gate = golden_floats(&gc->g, "shared_expert_gate");
    gc->w.soft_phi = golden_floats(&gc->g, "soft_phi");
    gc->w.soft_scale = golden_floats(&gc->g, "soft_scale");
    return 1;
}

static void golden_case_free(golden_case *gc) {
    const float *p[] = {gc->x, gc->w.router, gc->w.selection_bias, gc->w.gate, gc->w.up, gc->w.down,
                        gc->w.shared_gate, gc->w.shared_up, gc->w.shared_down,
                        gc->w.shared_expert_gate, gc->w.soft_phi, gc->w.soft_scale};
    size_t i;
    for (i = 0; i < sizeof p / sizeof p[0]; i++) free((void *)p[i]);
    golden_free(&gc->g);
}

/* One gradient tensor against its record, with the per-tensor bound above. */
static void golden_grad_check(const char *what, const float *got, const double *want, size_t n) {
    double scale = 1.0;
    size_t i;
    for (i = 0; i < n; i++) if (fabs(want[i]) > scale) scale = fabs(want[i]);
    moe_test_check_array(__FILE__, __LINE__, what, got, want, n, GRAD_ATOL * scale, GRAD_RTOL);
}

/* Gradient records d_<name> and the moe_grads slot each one lands in. */
static float **golden_grad_slot(moe_grads *gr, const char *name) {
    if (!strcmp(name, "router")) return &gr->router;
    if (!strcmp(name, "gate")) return &gr->gate;
    if (!strcmp(name, "up")) return &gr->up;
    if (!strcmp(name, "down")) return &gr->down;
    if (!strcmp(name, "shared_gate")) return &gr->shared_gate;
    if (!strcmp(name, "shared_up")) return &gr->shared_up;
    if (!strcmp(name, "shared_down")) return &gr->shared_down;
    if (!strcmp(name, "shared_expert_gate")) return &gr->shared_expert_gate;
    if (!strcmp(name, "soft_phi")) return &gr->soft_phi;
    if (!strcmp(name, "soft_scale")) return &gr->soft_scale;
    return NULL;
}
static const char *const golden_grad_names[] = {
    "router", "gate", "up", "down", "shared_gate", "shared_up", "shared_down",
    "shared_expert_gate", "soft_phi", "soft_scale"};
#define GOLDEN_NGRAD (sizeof golden_grad_names / sizeof golden_grad_names[0])

/* Training forward + moe_backward on the file's dy, compared with the
   autograd records. The config is the forward's with training on, the
   file's aux coefficients (every other aux loss off: the files' loss has
   none) and no training-time randomness (the Switch preset's jitter).    */
static void golden_backward(golden_case *gc, const char *file, moe_config c, int recompute) {
    const golden *g = &gc->g;
    moe_info info;
    moe_grads gr;
    void *info_buf;
    size_t info_bytes, n = 0, nw = 0, i, nd = (size_t)gc->T * gc->D;
    float *y, *dx, *dy = golden_floats(g, "dy");
    const double *want, *bc = golden_get(g, "balance_coef", NULL), *zc = golden_get(g, "z_loss_coef", NULL);
    char what[160];
    double aux_want = 0.0;
    moe_status st;
    CHECK(dy != NULL && bc != NULL && zc != NULL);
    if (!dy || !bc || !zc) { free(dy); return; }
    c.training = 1; c.save_for_backward = 1; c.recompute = recompute;
    c.jitter = 0.0f;                               /* golden x is the router input */
    c.noise = MOE_NOISE_NONE;
    c.balance_coef = (float)bc[0]; c.z_loss_coef = (float)zc[0];
    c.importance_coef = c.load_coef = c.seq_balance_coef = 0.0f;
    c.router_grad_clip = 0.0f;

    memset(&info, 0, sizeof info);
    memset(&gr, 0, sizeof gr);
    CHECK_STATUS(moe_info_size(&c, gc->T, &info_bytes), MOE_STATUS_OK);
    info_buf = malloc(info_bytes);
    CHECK_STATUS(moe_info_bind(&c, gc->T, &info, info_buf, info_bytes), MOE_STATUS_OK);
    y = (float *)malloc(nd * sizeof(float));
    dx = (float *)malloc(nd * sizeof(float));
    for (i = 0; i < nd; i++) dx[i] = 1e30f;        /* dx is overwritten, not accumulated */
    for (i = 0; i < GOLDEN_NGRAD; i++)             /* zeroed gradients for every weight present */
        if (golden_get(g, golden_grad_names[i], &nw))
            *golden_grad_slot(&gr, golden_grad_names[i]) = (float *)calloc(nw, sizeof(float));

    st = moe_forward_alloc(&c, &gc->w, gc->x, gc->T, y, &info);
    CHECK_STATUS(st, MOE_STATUS_OK);
    if (st != MOE_STATUS_OK) goto done;           /* info holds nothing to differentiate */
    if ((want = golden_get(g, "y", &n)) && n == nd) CHECK_ARRAY_NEAR(y, want, n, GOLDEN_ATOL, GOLDEN_RTOL);
    if ((want = golden_get(g, "aux_balance", NULL))) aux_want += bc[0] * want[0];
    if ((want = golden_get(g, "aux_z", NULL))) aux_want += zc[0] * want[0];
    CHECK_NEAR(info.aux_total, aux_want, GOLDEN_ATOL, GOLDEN_RTOL);
    CHECK_STATUS(moe_backward_alloc(&c, &gc->w, gc->x, gc->T, &info, dy, dx, &gr), MOE_STATUS_OK);

    snprintf(what, sizeof what, "%s dx (recompute %d)", file, recompute);
    want = golden_get(g, "dx", &n);
    CHECK(want != NULL && n == nd);
    if (want && n == nd) golden_grad_check(what, dx, want, n);
    for (i = 0; i < GOLDEN_NGRAD; i++) {
        char rec[64];
        float *got = *golden_grad_slot(&gr, golden_grad_names[i]);
        snprintf(rec, sizeof rec, "d_%s", golden_grad_names[i]);
        n = nw = 0;
        want = golden_get(g, rec, &n);
        golden_get(g, golden_grad_names[i], &nw);
        if (!got && !want) continue;
        snprintf(what, sizeof what, "%s %s (recompute %d)", file, rec, recompute);
        if (!got || !want || n != nw) {             /* every weight has its gradient record */
            moe_test_fail(__FILE__, __LINE__, "%s: weight and gradient record do not pair up", what);
            continue;
        }
        golden_grad_check(what, got, want, n);
    }
done:
    for (i = 0; i < GOLDEN_NGRAD; i++) free(*golden_grad_slot(&gr, golden_grad_names[i]));
    free(y); free(dx); free(dy);
    free(info_buf);
}

/* Run the layer and compare every record the file has: y, logits, expert,
   weight, dropped, combine ([T][E] dense combine matrix), dispatch, aux;
   then, when the file has gradients (dy), the backward twice: with the
   training cache and with recompute.                                      */
static void golden_run(const char *file, moe_config c) {
    golden_case gc;
    moe_info info;
    void *info_buf;
    size_t info_bytes, n;
    float *y;
    const double *want;
    int t, j, S;
    if (!golden_case_load(&gc, file, &c)) { moe_test_fail(__FILE__, __LINE__, "cannot read ref/%s", file); return; }
    memset(&info, 0, sizeof info);
    CHECK_STATUS(moe_info_size(&c, gc.T, &info_bytes), MOE_STATUS_OK);
    info_buf = malloc(info_bytes);
    CHECK_STATUS(moe_info_bind(&c, gc.T, &info, info_buf, info_bytes), MOE_STATUS_OK);
    y = (float *)malloc((size_t)gc.T * gc.D * sizeof(float));
    CHECK_STATUS(moe_forward_alloc(&c, &gc.w, gc.x, gc.T, y, &info), MOE_STATUS_OK);
    S = info.slots;

    want = golden_get(&gc.g, "y", &n);
    CHECK(want != NULL && n == (size_t)gc.T * gc.D);   /* every case checks the output */
    if (want && n == (size_t)gc.T * gc.D) CHECK_ARRAY_NEAR(y, want, n, GOLDEN_ATOL, GOLDEN_RTOL);
    if ((want = golden_get(&gc.g, "logits", &n))) CHECK_ARRAY_NEAR(info.logits, want, n, GOLDEN_ATOL, GOLDEN_RTOL);
    if ((want = golden_get(&gc.g, "weight", &n))) CHECK_ARRAY_NEAR(info.weight, want, n, GOLDEN_ATOL, GOLDEN_RTOL);
    if ((want = golden_get(&gc.g, "expert", &n)))
        for (j = 0; j < (int)n; j++) CHECK_INT(info.expert[j], (int)want[j]);
    if ((want = golden_get(&gc.g, "dropped", &n)))
        for (j = 0; j < (int)n; j++) CHECK_INT(info.dropped[j], (int)want[j]);
    if ((want = golden_get(&gc.g, "capacity", NULL))) CHECK_INT(info.capacity, (int)want[0]);
    if ((want = golden_get(&gc.g, "combine", &n))) {
        /* [T][R] combine matrix: Soft MoE's scores, or the expert-choice gates */
        if (c.routing == MOE_ROUTING_SOFT) CHECK_ARRAY_NEAR(info.scores, want, n, GOLDEN_ATOL, GOLDEN_RTOL);
        else for (t = 0; t < gc.T; t++)
            for (j = 0; j < S; j++) {
                size_t p = (size_t)t * S + j;
                CHECK_INT(info.expert[p] >= 0, want[(size_t)t * gc.E + j] != 0.0);
                CHECK_NEAR(info.weight[p], want[(size_t)t * gc.E + j], GOLDEN_ATOL, GOLDEN_RTOL);
            }
    }
    if ((want = golden_get(&gc.g, "dispatch", &n))) CHECK_ARRAY_NEAR(info.dispatch, want, n, GOLDEN_ATOL, GOLDEN_RTOL);
    if ((want = golden_get(&gc.g, "aux_balance", NULL))) CHECK_NEAR(info.aux_balance, want[0], GOLDEN_ATOL, GOLDEN_RTOL);
    if ((want = golden_get(&gc.g, "aux_z", NULL))) CHECK_NEAR(info.aux_z, want[0], GOLDEN_ATOL, GOLDEN_RTOL);
    if (golden_get(&gc.g, "dy", NULL)) {
        golden_backward(&gc, file, c, 0);
        golden_backward(&gc, file, c, 1);
    }
    free(y);
    free(info_buf);
    golden_case_free(&gc);
}

TEST(golden, hf_mixtral_sparse_moe_block) {
    golden_run("mixtral.txt", moe_preset_mixtral());
}

TEST(golden, hf_qwen2_moe_shared_expert) {
    moe_config c = moe_preset_qwen2_moe();       /* no renorm, gated shared expert */
    golden g;
    if (golden_load(&g, "ref/qwen2_moe.txt")) { c.shared_d_ff = golden_int(&g, "Fs"); golden_free(&g); }
    golden_run("qwen2_moe.txt", c);
}

TEST(golden, hf_deepseek_v3_moe) {
    moe_config c = moe_preset_deepseek_v3();     /* sigmoid, noaux_tc, bias, x2.5 */
    golden g;
    if (golden_load(&g, "ref/deepseek_v3.txt")) {
        c.shared_d_ff = golden_int(&g, "Fs");
        c.n_group = golden_int(&g, "n_group");
        c.topk_group = golden_int(&g, "topk_group");
        c.routed_scale = (float)golden_get(&g, "routed_scaling_factor", NULL)[0];
        golden_free(&g);
    }
    golden_run("deepseek_v3.txt", c);
}

TEST(golden, torch_switch_capacity_drops) {
    moe_config c = moe_preset_switch();          /* top-1, raw p, ReLU */
    c.capacity_factor = 0.0f; c.capacity = 2;    /* the file's explicit C */
    golden_run("switch.txt", c);
}

TEST(golden, torch_gshard_top2_capacity) {
    moe_config c = moe_preset_gshard();
    c.activation = MOE_ACT_SWIGLU; c.second_expert = MOE_SECOND_GREEDY;
    c.capacity_factor = 0.0f; c.capacity = 3;
    golden_run("gshard.txt", c);
}

TEST(golden, torch_expert_choice) {
    moe_config c = moe_preset_expert_choice();   /* c = 2: C = 2T/E */
    golden_run("expert_choice.txt", c);
}

TEST(golden, torch_soft_moe) {
    moe_config c = moe_preset_soft_moe();
    golden g;
    if (golden_load(&g, "ref/soft_moe.txt")) { c.slots_per_expert = golden_int(&g, "P"); golden_free(&g); }
    golden_run("soft_moe.txt", c);
}
