/* The kernel table (moe__kernels): each SIMD kernel against its plain-loop
   twin, the reference table's entry, on ragged shapes (lengths 0, 1, 7,
   around the vector width, 1000; experts with 0 and 1 rows; widths not a
   multiple of 16). In a build without a SIMD ISA only the reference table
   exists and the picking is checked. Like test_spec_internal.c it builds a
   file-local static copy of the implementation.                           */
#define MOE_STATIC
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "moe_test.h"

static moe_config kt_config(moe_isa isa, int32_t D, int32_t F) {
    moe_config c, r;
    memset(&c, 0, sizeof c);
    c.num_experts = 5; c.top_k = 1; c.d_model = D; c.d_ff = F; c.isa = isa;
    c.num_threads = 2;
    CHECK_STATUS(moe_config_resolve(&c, &r), MOE_STATUS_OK);
    return r;
}

/* The table is picked from the resolved ISA: the reference's entries are
   the plain loops whatever the build; AUTO picks the build's ISA. */
TEST(kernels, table_follows_the_resolved_isa) {
    const moe_config ref = kt_config(MOE_ISA_REFERENCE, 8, 8), aut = kt_config(MOE_ISA_AUTO, 8, 8);
    const moe__kernels *k = moe__kernels_of(&ref);
    CHECK(k == &moe__kernels_ref);
    CHECK(k->isa == MOE_ISA_REFERENCE && k->dot == moe__dot_ref && k->gemm == moe__gemm_par_ref);
    CHECK(moe__kernels_of(&aut)->isa == moe_compiled_isa());
#if MOE__HAS_SIMD
    CHECK(moe__kernels_of(&aut) == &moe__kernels_simd);
#else
    CHECK(moe__kernels_of(&aut) == &moe__kernels_ref);
#endif
}

#if MOE__HAS_SIMD
static uint32_t kt_seed = 12345u;
static float kt_uniform(void) {   /* in [-1, 1) */
    kt_seed = kt_seed * 1664525u + 1013904223u;
    return (float)(kt_seed >> 8) / 8388608.0f - 1.0f;
}
static float *kt_tensor(size_t n) {
    float *p = (float *)malloc((n ? n : 1) * sizeof(float));
    size_t i;
    for (i = 0; i < n; i++) p[i] = kt_uniform();
    return p;
}

/* |got - want| <= 1e-5 * (largest |want| + 1), element by element: fused
   multiply-adds and a different order of the tile sums, not a bug (a
   wrong index or a missed row is O(1) off). */
static void kt_close(const char *what, const float *got, const float *want, size_t n) {
    double scale = 1.0, worst = 0.0;
    size_t i, at = 0;
    for (i = 0; i < n; i++) scale = fabs(want[i]) + 1.0 > scale ? fabs(want[i]) + 1.0 : scale;
    for (i = 0; i < n; i++) {
        const double d = fabs((double)got[i] - (double)want[i]);
        if (!(d <= worst)) { worst = d; at = i; }
    }
    if (!(worst <= 1e-5 * scale))
        moe_test_fail(__FILE__, __LINE__, "%s: element %zu differs by %g (scale %g)", what, at,
                      worst, scale);
}

static const size_t kt_lengths[] = {0, 1, 7, MOE__VL - 1, MOE__VL, MOE__VL + 1, MOE__NR + 3, 77,
                                    1000};
#define KT_NLEN (sizeof kt_lengths / sizeof kt_lengths[0])

/* add_scaled: a multiply then an add on both sides, so bitwise equal. dot:
   2 VL partial sums against one running sum. */
TEST(kernels, row_kernels_match_their_twins) {
    size_t li, i;
    for (li = 0; li < KT_NLEN; li++) {
        const size_t n = kt_lengths[li];
        float *x = kt_tensor(n + 1), *y0 = kt_tensor(n + 1), *y1, *y2;
        int acc;
        y1 = (float *)malloc((n + 1) * sizeof(float));
        y2 = (float *)malloc((n + 1) * sizeof(float));
        for (acc = 0; acc <= 1; acc++) {
            memcpy(y1, y0, (n + 1) * sizeof(float));
            memcpy(y2, y0, (n + 1) * sizeof(float));
            moe__kernels_simd.add_scaled(y1, x, 0.37f, n, acc);
            moe__kernels_ref.add_scaled(y2, x, 0.37f, n, acc);
            CHECK(memcmp(y1, y2, (n + 1) * sizeof(float)) == 0);   /* y[n] untouched too */
            CHECK(y1[n] == y0[n]);
        }
        {
            const float d1 = moe__kernels_simd.dot(x, y0, n), d2 = moe__kernels_ref.dot(x, y0, n);
            double mag = 1.0;
            for (i = 0; i < n; i++) mag += fabs((double)x[i] * y0[i]);
            CHECK(fabs((double)d1 - d2) <= 1e-6 * mag);
        }
        free(x); free(y0); free(y1); free(y2);
    }
}

/* The parallel GEMM, C (+)= A . B with strided A (both orientations), with
   and without pack scratch (the packed path needs N >= NR), ragged m, N, K. */
TEST(kernels, gemm_matches_its_twin) {
    static const int32_t shapes[][3] = {{1, 1, 1}, {7, 37, 70}, {13, MOE__NR, 1},
                                        {100, 3 * MOE__NR + 5, 33}, {0, 20, 5}, {5, 20, 0}};
    const moe_config c = kt_config(MOE_ISA_AUTO, 8, 8);
    size_t si;
    int trans, acc, use_pack;
    for (si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const int64_t m = shapes[si][0], K = shapes[si][2];
        const int32_t N = shapes[si][1];
        const size_t nA = (size_t)(m * K), nC = (size_t)m * (size_t)N;
        float *A = kt_tensor(nA), *B = kt_tensor((size_t)K * N), *C0 = kt_tensor(nC);
        float *C1 = (float *)malloc((nC + 1) * sizeof(float));
        float *C2 = (float *)malloc((nC + 1) * sizeof(float));
        float *pack = (float *)malloc((moe__gemm_pack_floats(m, N, K) + 1) * sizeof(float));
        for (trans = 0; trans <= 1; trans++)
            for (acc = 0; acc <= 1; acc++)
                for (use_pack = 0; use_pack <= 1; use_pack++) {
                    const size_t a_rs = trans ? 1 : (size_t)K, a_cs = trans ? (size_t)m : 1;
                    memcpy(C1, C0, nC * sizeof(float));
                    memcpy(C2, C0, nC * sizeof(float));
                    moe__kernels_simd.gemm(&c, m, N, K, A, a_rs, a_cs, B, (size_t)N, C1,
                                           (size_t)N, acc, use_pack ? pack : NULL);
                    moe__kernels_ref.gemm(&c, m, N, K, A, a_rs, a_cs, B, (size_t)N, C2,
                                          (size_t)N, acc, NULL);
                    kt_close("gemm", C1, C2, nC);
                }
        free(A); free(B); free(C0); free(C1); free(C2); free(pack);
    }
}

/* The expert backward: moe__experts_backward_simd (GEMMs in tasks, packed
   operands, one activation pass) against moe__experts_backward_ref (plain
   loops), on 5 experts holding 0, 1, 0, 9 and 17 rows, D = 37, F = 70; GLU
   and not, with and without the ha rebuild, biases on. */
TEST(kernels, expert_backward_matches_its_twin) {
    static const int64_t off[6] = {0, 0, 1, 1, 10, 27};
    const int32_t E = 5, D = 37, F = 70;
    const moe_config c = kt_config(MOE_ISA_AUTO, D, F);   /* its D sizes the pack scratch */
    const size_t N = (size_t)off[E], ED = (size_t)E * D, EFD = (size_t)E * F * D;
    int glu, rebuild, side, i;
    for (glu = 0; glu <= 1; glu++)
        for (rebuild = 0; rebuild <= 1; rebuild++) {
            float *w[6], *in[5], *grad[2][6], *buf[2][4], *ha0;
            moe__ffn f;
            moe__ffn_grad g[2];
            memset(&f, 0, sizeof f);
            w[0] = kt_tensor(EFD); w[1] = kt_tensor(EFD); w[2] = kt_tensor(EFD);
            w[3] = kt_tensor((size_t)E * F); w[4] = kt_tensor((size_t)E * F); w[5] = kt_tensor(ED);
            f.gate = w[0]; f.up = glu ? w[1] : NULL; f.down = w[2];
            f.gate_bias = w[3]; f.up_bias = glu ? w[4] : NULL; f.down_bias = w[5];
            f.gate_stride = f.up_stride = f.down_stride = (size_t)F * D;
            f.D = D; f.F = F; f.act = glu ? MOE_ACT_SWIGLU : MOE_ACT_GELU;
            in[0] = kt_tensor(N * D);                  /* x */
            in[1] = kt_tensor(N * F);                  /* hg */
            in[2] = kt_tensor(N * F);                  /* hu */
            in[3] = kt_tensor(N * D);                  /* dout */
            in[4] = kt_tensor(N * F);                  /* ha given (no rebuild) */
            ha0 = in[4];
            for (side = 0; side < 2; side++) {
                for (i = 0; i < 6; i++) {   /* the same starting gradients on both sides */
                    const size_t n = i < 3 ? EFD : i < 5 ? (size_t)E * F : ED;
                    size_t q;
                    grad[side][i] = (float *)malloc(n * sizeof(float));
                    for (q = 0; q < n; q++) grad[side][i][q] = (float)q * 1e-4f;
                }
                for (i = 0; i < 4; i++)   /* dh, du, dx, ha */
                    buf[side][i] = (float *)calloc(N * (i == 2 ? D : F) + 1, sizeof(float));
                memcpy(buf[side][3], ha0, N * F * sizeof(float));
                g[side].gate = grad[side][0]; g[side].up = glu ? grad[side][1] : NULL;
                g[side].down = grad[side][2]; g[side].gate_bias = grad[side][3];
                g[side].up_bias = glu ? grad[side][4] : NULL; g[side].down_bias = grad[side][5];
            }
            {
                float *pack = (float *)malloc((moe__backward_pack_floats(&c, N, (size_t)F) + 1) *
                                              sizeof(float));
                moe__kernels_simd.experts_backward(&c, &f, &g[0], E, off, in[0], in[1],
                                                   glu ? in[2] : NULL, buf[0][3], rebuild, in[3],
                                                   buf[0][0], glu ? buf[0][1] : NULL, buf[0][2],
                                                   pack);
                moe__kernels_ref.experts_backward(&c, &f, &g[1], E, off, in[0], in[1],
                                                  glu ? in[2] : NULL, buf[1][3], rebuild, in[3],
                                                  buf[1][0], glu ? buf[1][1] : NULL, buf[1][2],
                                                  NULL);
                free(pack);
            }
            kt_close("dx", buf[0][2], buf[1][2], N * D);
            kt_close("ha", buf[0][3], buf[1][3], N * F);
            kt_close("d gate", grad[0][0], grad[1][0], EFD);
            kt_close("d down", grad[0][2], grad[1][2], EFD);
            kt_close("d gate bias", grad[0][3], grad[1][3], (size_t)E * F);
            kt_close("d down bias", grad[0][5], grad[1][5], ED);
            if (glu) {
                kt_close("d up", grad[0][1], grad[1][1], EFD);
                kt_close("d up bias", grad[0][4], grad[1][4], (size_t)E * F);
            }
            /* an expert without rows gets no gradient: expert 0's is as on entry */
            CHECK(grad[0][0][5] == 5.0f * 1e-4f && grad[1][0][5] == 5.0f * 1e-4f);
            CHECK(grad[0][5][3] == 3.0f * 1e-4f && grad[1][5][3] == 3.0f * 1e-4f);
            for (i = 0; i < 6; i++) free(w[i]);
            for (i = 0; i < 5; i++) free(in[i]);
            for (side = 0; side < 2; side++) {
                for (i = 0; i < 6; i++) free(grad[side][i]);
                for (i = 0; i < 4; i++) free(buf[side][i]);
            }
        }
}
#endif
