/* docs/ROUTING.md, "Noisy top-k" (Shazeer): the worked example. The public
   API draws its own N(0,1) noise, so this file drives the internal router with
   the spec's explicit samples N through the moe__router.noise_samples seam.
   It builds a file-local static copy of the implementation (MOE_STATIC), so
   it links next to test_main.c's extern copy. */
#define MOE_STATIC
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "moe_test.h"

/* Clean logits z = L ("Example logits"), raw noise logits r, samples N; T = 3, E = 4. */
static const float spec2_z[12] = {1.0f, 2.0f, 0.5f, -1.0f, 0.2f, -0.3f, 1.5f, 1.0f,
                                  2.5f, 0.0f, -0.5f, 1.75f};
static const float spec2_r[12] = {0.0f, -1.0f, 0.5f, 1.0f, 1.0f, 0.0f, -0.5f, 0.2f,
                                  -2.0f, 0.3f, 0.0f, 0.7f};
static const float spec2_N[12] = {0.3f, -0.2f, 1.1f, -0.5f, -1.2f, 0.4f, 0.1f, 0.8f,
                                  0.5f, -0.7f, 0.9f, 1.5f};

typedef struct spec2_out {
    int32_t expert[6];
    float weight[6], scores[12];
    float importance[4], load[4];   /* the router's double accumulators */
    float aux_importance, aux_load;
} spec2_out;

/* Resolve the config, plan the routing workspace, run moe__route. */
static moe_status spec2_route(float noise_epsilon, int training, spec2_out *o) {
    moe_config c, rc;
    moe__layout L;
    moe__ws ws;
    moe__router r;
    moe_info res;
    void *buf;
    moe_status st;
    int i;
    memset(&c, 0, sizeof c);
    c.num_experts = 4; c.top_k = 2; c.d_model = 1; c.d_ff = 1;
    c.noise = MOE_NOISE_SHAZEER; c.training = training; c.noise_epsilon = noise_epsilon;
    if ((st = moe_config_resolve(&c, &rc)) != MOE_STATUS_OK) return st;
    if ((st = moe__plan(&rc, 3, 0, &L)) != MOE_STATUS_OK) return st;
    if (!(buf = malloc(L.total))) return MOE_STATUS_OUT_OF_MEMORY;
    ws = moe__ws_bind(&L, moe__align_ptr(buf));
    moe__router_init(&r, &rc, &ws, 3, &res);
    r.logits = spec2_z;
    r.noise_logits = spec2_r;
    r.noise_samples = spec2_N;
    st = moe__route(&r);
    if (st == MOE_STATUS_OK) {
        memcpy(o->expert, res.expert, sizeof o->expert);
        memcpy(o->weight, res.weight, sizeof o->weight);
        memcpy(o->scores, res.scores, sizeof o->scores);
        for (i = 0; i < 4; i++) { o->importance[i] = (float)r.imp[i]; o->load[i] = (float)r.imp[4 + i]; }
        o->aux_importance = res.aux_importance;
        o->aux_load = res.aux_load;
    }
    free(buf);
    return st;
}

static void spec2_check_ints(const char *file, int line, const char *what,
                             const int32_t *got, const int *want, int n) {
    int i;
    for (i = 0; i < n; i++)
        if (got[i] != want[i]) {
            moe_test_fail(file, line, "%s[%d] = %d, want %d", what, i, (int)got[i], want[i]);
            return;
        }
}
#define CHECK_INTS(got, want, n) spec2_check_ints(__FILE__, __LINE__, #got, (got), (want), (n))

/* Top-2 of the noisy H, slot order: t0 {1, 2}, t1 {3, 2}, t2 {3, 0}. */
static const int spec2_expert[6] = {1, 2, 3, 2, 3, 0};

/* "Noisy top-k", paper variant (eps_n = 0): gates G from H (slot order),
   Importance, smooth Load and their population CV^2. info.scores =
   softmax(H) over all E is checked against the spec's printed H (softmax
   taken here in double).                                                   */
TEST(spec_internal, shazeer_paper) {
    static const double H[12] = {1.207944, 1.937348, 1.571485, -1.656631,
                                 -1.375914, -0.022741, 1.547408, 1.638511,
                                 2.563464, -0.598049, 0.123832, 3.404779};
    static const double G_want[6] = {0.590459, 0.409541, 0.522760, 0.477240, 0.698742, 0.301258};
    static const double imp_want[4] = {0.301258, 0.590459, 0.886781, 1.221502};
    static const double load_want[4] = {1.357280, 0.999466, 1.233025, 1.854852};
    double p_want[12];
    spec2_out o;
    int t, e;
    for (t = 0; t < 3; t++) {
        double m = H[t * 4], s = 0.0;
        for (e = 1; e < 4; e++) if (H[t * 4 + e] > m) m = H[t * 4 + e];
        for (e = 0; e < 4; e++) s += exp(H[t * 4 + e] - m);
        for (e = 0; e < 4; e++) p_want[t * 4 + e] = exp(H[t * 4 + e] - m) / s;
    }
    CHECK_STATUS(spec2_route(0.0f, 1, &o), MOE_STATUS_OK);
    CHECK_INTS(o.expert, spec2_expert, 6);
    CHECK_ARRAY_NEAR(o.weight, G_want, 6, SPEC_ATOL, SPEC_RTOL);
    CHECK_ARRAY_NEAR(o.scores, p_want, 12, SPEC_ATOL, SPEC_RTOL);
    CHECK_ARRAY_NEAR(o.importance, imp_want, 4, SPEC_ATOL, SPEC_RTOL);
    CHECK_ARRAY_NEAR(o.load, load_want, 4, SPEC_ATOL, SPEC_RTOL);
    CHECK_NEAR(o.aux_importance, 0.207932, SPEC_ATOL, SPEC_RTOL);
    CHECK_NEAR(o.aux_load, 0.052758, SPEC_ATOL, SPEC_RTOL);
}

/* "Noisy top-k", tensor2tensor variant (eps_n = 0.01). */
TEST(spec_internal, shazeer_t2t) {
    static const double G_want[6] = {0.587312, 0.412688, 0.524506, 0.475494, 0.700843, 0.299157};
    static const double imp_want[4] = {0.299157, 0.587312, 0.888182, 1.225349};
    static const double load_want[4] = {1.357824, 0.998441, 1.234164, 1.848618};
    spec2_out o;
    CHECK_STATUS(spec2_route(0.01f, 1, &o), MOE_STATUS_OK);
    CHECK_INTS(o.expert, spec2_expert, 6);
    CHECK_ARRAY_NEAR(o.weight, G_want, 6, SPEC_ATOL, SPEC_RTOL);
    CHECK_ARRAY_NEAR(o.importance, imp_want, 4, SPEC_ATOL, SPEC_RTOL);
    CHECK_ARRAY_NEAR(o.load, load_want, 4, SPEC_ATOL, SPEC_RTOL);
    CHECK_NEAR(o.aux_importance, 0.211012, SPEC_ATOL, SPEC_RTOL);
    CHECK_NEAR(o.aux_load, 0.052099, SPEC_ATOL, SPEC_RTOL);
    /* t2t loss = 0.01 * (CV2(Imp) + CV2(Load)) */
    CHECK_NEAR(0.01 * ((double)o.aux_importance + o.aux_load), 0.00263111, 1e-8, SPEC_RTOL);
}

/* "Noisy top-k" at evaluation: no noise, H = z, so the picks are the plain
   top-2 of L with the Mixtral weights of "Gate weights", and Load is the hard
   count [2, 1, 1, 2] ("Importance and load"):
   mean 1.5, population variance 0.25, CV^2 = 0.25 / 2.25 = 1/9.           */
TEST(spec_internal, shazeer_eval_no_noise) {
    static const int e_want[6] = {1, 0, 2, 3, 0, 3};
    static const double w_want[6] = {0.731059, 0.268941, 0.622459, 0.377541, 0.679179, 0.320821};
    spec2_out o;
    CHECK_STATUS(spec2_route(0.01f, 0, &o), MOE_STATUS_OK);
    CHECK_INTS(o.expert, e_want, 6);
    CHECK_ARRAY_NEAR(o.weight, w_want, 6, SPEC_ATOL, SPEC_RTOL);
    CHECK_NEAR(o.aux_load, 1.0 / 9.0, SPEC_ATOL, SPEC_RTOL);
}

#if MOE__HAS_SIMD
/* The vector sigmoid of the SiLU epilogue against moe__sigmoid: a few ulp
   on finite inputs (Cephes exp polynomial), the same value class on every
   input, the denormal and overflow ranges and the non-finite ones included. */
TEST(spec_internal, vector_sigmoid_matches_scalar) {
    float z[MOE__VL], out[MOE__VL];
    const float special[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 87.0f, -87.0f, 87.4f, -87.4f, 88.8f, -88.8f,
                             -103.0f, -104.0f, 1e30f, -1e30f, 3.4e38f, -3.4e38f};
    double worst = 0.0;
    int n = 0, i, j;
    for (i = -20000; i <= 20000 + (int)(sizeof special / sizeof special[0]) + 3; i += MOE__VL) {
        for (j = 0; j < MOE__VL; j++) {
            const int k = i + j;
            if (k <= 20000) z[j] = (float)k * 0.0061f;       /* -122 .. 122 */
            else if (k - 20001 < (int)(sizeof special / sizeof special[0])) z[j] = special[k - 20001];
            else z[j] = k % 3 == 0 ? INFINITY : k % 3 == 1 ? -INFINITY : NAN;
        }
        moe__v_store(out, moe__v_sigmoid(moe__v_load(z)));
        for (j = 0; j < MOE__VL; j++) {
            const float want = moe__sigmoid(z[j]);
            CHECK(isnan(out[j]) == isnan(want));
            CHECK(isinf(out[j]) == isinf(want));
            if (moe__isfinite(want)) {
                const double err = fabs((double)out[j] - want);
                const double rel = err / (fabs(want) > 1e-30 ? fabs(want) : 1e-30);
                if (fabs(want) >= 1.1754944e-38 && rel > worst) worst = rel;
                CHECK(err <= 4e-7 * fabs(want) || err < 1.2e-38);   /* below FLT_MIN: flushed to 0 */
            }
            n++;
        }
    }
    CHECK(n > 40000);
    CHECK(worst < 4e-7);
}

/* moe__act_backward_simd (SiLU, SwiGLU) against its plain twin
   moe__act_backward_ref; lengths off the vector width; Inf and NaN land
   where the scalar ones do. The ha it rebuilds from a cache has the
   forward epilogue's bits (moe__act_simd) in vector lanes and tail alike.  */
TEST(spec_internal, vector_act_backward_matches_scalar) {
    enum { N = 77 };
    float hg[N], hu[N], dh_v[N], du_v[N], dh_s[N], du_s[N], ha[N];
    int a, i;
    for (a = 0; a < 2; a++) {
        const moe_activation act = a ? MOE_ACT_SWIGLU : MOE_ACT_SILU;
        for (i = 0; i < N; i++) {
            hg[i] = (float)((i * 37) % 41 - 20) * 0.7f;
            hu[i] = (float)((i * 11) % 13 - 6) * 0.3f;
            dh_v[i] = dh_s[i] = (float)((i * 5) % 9 - 4) * 0.25f;
        }
        hg[3] = INFINITY; hg[4] = -INFINITY; hg[5] = NAN; hg[6] = -95.0f; hg[7] = 95.0f;
        memset(du_v, 0, sizeof du_v); memset(du_s, 0, sizeof du_s);
        moe__act_backward_simd(act, dh_v, du_v, hg, hu, ha, 2, N);  /* unaligned start, ragged end */
        moe__act_backward_ref(act, dh_s, du_s, hg, hu, NULL, 2, N);
        for (i = 2; i < N; i++) {
            const float want = a ? moe__act_simd(act, hg[i]) * hu[i] : moe__act_simd(act, hg[i]);
            CHECK(isnan(want) ? isnan(ha[i]) : memcmp(&ha[i], &want, sizeof want) == 0);
        }
        for (i = 0; i < N; i++) {
            CHECK(isnan(dh_v[i]) == isnan(dh_s[i]) && isnan(du_v[i]) == isnan(du_s[i]));
            if (moe__isfinite(dh_s[i])) CHECK(fabs(dh_v[i] - dh_s[i]) <= 1e-6f * (1.0f + fabsf(dh_s[i])));
            if (moe__isfinite(du_s[i])) CHECK(fabs(du_v[i] - du_s[i]) <= 1e-6f * (1.0f + fabsf(du_s[i])));
        }
        CHECK(dh_v[0] == dh_s[0] && du_v[1] == 0.0f);           /* outside [2, N): untouched */
    }
}
#endif
