/* The integer dot kernels of quantized experts (moe.h, "Quantized weights"):
   moe__qdot_simd against its plain twin moe__qdot_ref, and both against the
   float64 sum of the decoded weights times the decoded int8 activations, on
   random blocks of every type and rows of 32 to 4096 values. A file-local
   static copy of the implementation (MOE_STATIC) reaches the kernels. */
#define MOE_STATIC
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "moe_test.h"

#if MOE__HAS_SIMD
/* sum_j w_j * (d_b q_j) in float64, w decoded by moe_dequantize. */
static double qi_exact(moe_qtype t, const unsigned char *w, const moe__qact *a, int32_t r,
                       int32_t k, double *mag) {
    float *wd = (float *)malloc((size_t)k * sizeof(float));
    double sum = 0.0;
    int32_t j;
    moe_dequantize(t, w, moe_qtype_row_bytes(t, k), 1, k, wd);
    *mag = 0.0;
    for (j = 0; j < k; j++) {
        const double x = (double)a->d[(size_t)r * (size_t)(k / 32) + (size_t)(j / 32)] *
                         a->q[(size_t)r * (size_t)k + (size_t)j];
        sum += (double)wd[j] * x;
        *mag += fabs((double)wd[j] * x);
    }
    free(wd);
    return sum;
}
#endif

TEST(quant_internal, qdot_twins) {
#if MOE__HAS_SIMD
    const moe_qtype types[4] = {MOE_QTYPE_Q8_0, MOE_QTYPE_Q4_0, MOE_QTYPE_MXFP4, MOE_QTYPE_Q4_K};
    const int32_t ks[5] = {32, 96, 256, 768, 4096};
    uint64_t s = 5;
    int it, ik, n_checked = 0;
    for (it = 0; it < 4; it++)
        for (ik = 0; ik < 5; ik++) {
            const moe_qtype t = types[it];
            const int32_t k = ks[ik], rows = MOE__QDOT_NR;
            const size_t bytes = moe_qtype_row_bytes(t, k);
            unsigned char *w;
            float *x, scale, ref[MOE__QDOT_NR], simd[MOE__QDOT_NR];
            moe__qact a;
            double exact, mag;
            size_t i;
            int32_t r, nr;
            if (bytes == 0) continue;            /* Q4_K rows of whole 256-blocks */
            w = (unsigned char *)malloc(bytes);
            x = (float *)malloc((size_t)k * sizeof(float));
            a.k = k;
            a.q = (int8_t *)malloc((size_t)rows * (size_t)k);
            a.d = (float *)malloc((size_t)rows * (size_t)k / 32 * sizeof(float));
            a.s = (float *)malloc((size_t)rows * (size_t)k / 32 * sizeof(float));
            a.qsum = (int32_t *)malloc((size_t)rows * (size_t)k / 32 * sizeof(int32_t));
            for (i = 0; i < bytes; i++) w[i] = (unsigned char)(moe_test_rand(&s) * 128.0f + 128.0f);
            /* sane scales (random fp16 bytes may be Inf or NaN) */
            for (i = 0; i < bytes; i += (size_t)moe_qtype_row_bytes(t, moe_qtype_block_size(t))) {
                if (t == MOE_QTYPE_MXFP4) { w[i] = (unsigned char)(120 + (w[i] & 7)); continue; }
                scale = 0.01f + 0.02f * moe_test_rand(&s);
                moe__put_u16le(w + i, moe__f16_of(scale));
                if (t == MOE_QTYPE_Q4_K) moe__put_u16le(w + i + 2, moe__f16_of(0.5f * scale));
            }
            for (r = 0; r < rows; r++) {         /* rows of other sizes and signs */
                for (i = 0; i < (size_t)k; i++)
                    x[i] = moe_test_rand(&s) * (1.0f + (float)((i + (size_t)r) % 7)) +
                           0.3f * (float)(r - 1);
                moe__qact_row(&a, r, x);
            }
            for (nr = 1; nr <= rows; nr++) {     /* each row count from row 0 and from row 1 */
                int32_t r0;
                for (r0 = 0; r0 + nr <= rows && r0 <= 1; r0++) {
                    moe__qdot_ref(t, w, &a, r0, nr, ref);
                    moe__qdot_simd(t, w, &a, r0, nr, simd);
                    for (r = 0; r < nr; r++) {
                        exact = qi_exact(t, w, &a, r0 + r, k, &mag);
                        /* fp32 sums of k / 32 block terms: a few ulp of the magnitude each */
                        CHECK_NEAR(ref[r], exact, 1e-6 * mag, 0.0);
                        CHECK_NEAR(simd[r], exact, 1e-6 * mag, 0.0);
                    }
                }
            }
            n_checked++;
            free(w); free(x); free(a.q); free(a.d); free(a.s); free(a.qsum);
        }
    CHECK_INT(n_checked, 4 * 5 - 2);   /* Q4_K skips k = 32 and 96 */
#else
    SKIP("no SIMD ISA in this build: the integer dots run in SIMD builds only");
#endif
}

/* The decode layout (moe_qpack_weights): matrices of n rows (1, 15, 16,
   17, 33: one group, a full one, one row past, three) packed into groups
   by moe__qp_pack_group; per group, moe__qpdot_ref must give each live row
   the bits moe__qdot_ref gives it on the blocks, and moe__qpdot_simd (where
   the build has it) the same to a few ulp of the magnitude (its float
   steps fuse: fma). Activation rows 1..8 from row 0 and from row 1. */
TEST(quant_internal, qpdot_twins) {
#if MOE__HAS_SIMD
    const moe_qtype types[4] = {MOE_QTYPE_Q8_0, MOE_QTYPE_Q4_0, MOE_QTYPE_MXFP4, MOE_QTYPE_Q4_K};
    const int32_t ks[4] = {32, 96, 256, 768}, ns[5] = {1, 15, 16, 17, 33};
    uint64_t s = 7;
    int it, ik, in, n_checked = 0, bad_ref = 0, bad_simd = 0;
    for (it = 0; it < 4; it++)
        for (ik = 0; ik < 4; ik++)
            for (in = 0; in < 5; in++) {
                const moe_qtype t = types[it];
                const int32_t k = ks[ik], n = ns[in], rows = MOE__QPDOT_NR + 1;
                const size_t rb = moe_qtype_row_bytes(t, k), gb = moe__qp_group_bytes(t, (size_t)k);
                const int32_t groups = (n + 15) / 16;
                unsigned char *w, *g;
                float *x, ref[MOE__QPDOT_NR + 1], grp_ref[MOE__QPDOT_NR * 16];
                float grp_simd[MOE__QPDOT_NR * 16];
                moe__qmat m;
                moe__qact a;
                size_t i;
                int32_t r, nr, r0, gi, o;
                if (rb == 0) continue;           /* Q4_K rows of whole 256-blocks */
                w = (unsigned char *)malloc((size_t)n * rb);
                g = (unsigned char *)malloc((size_t)groups * gb);
                x = (float *)malloc((size_t)k * sizeof(float));
                for (i = 0; i < (size_t)n * rb; i++)
                    w[i] = (unsigned char)(moe_test_rand(&s) * 128.0f + 128.0f);
                for (i = 0; i < (size_t)n * rb; i += moe_qtype_row_bytes(t, moe_qtype_block_size(t))) {
                    const float scale = 0.01f + 0.02f * moe_test_rand(&s);
                    if (t == MOE_QTYPE_MXFP4) { w[i] = (unsigned char)(120 + (w[i] & 7)); continue; }
                    moe__put_u16le(w + i, moe__f16_of(scale));
                    if (t == MOE_QTYPE_Q4_K) moe__put_u16le(w + i + 2, moe__f16_of(0.5f * scale));
                }
                m.data = w; m.type = t; m.row_bytes = rb; m.stride = (size_t)n * rb;
                for (gi = 0; gi < groups; gi++)
                    moe__qp_pack_group(&m, 0, (size_t)gi * 16, (size_t)n, (size_t)k, g + (size_t)gi * gb);
                a.k = k;
                a.q = (int8_t *)malloc((size_t)rows * (size_t)k);
                a.d = (float *)malloc((size_t)rows * (size_t)k / 32 * sizeof(float));
                a.s = (float *)malloc((size_t)rows * (size_t)k / 32 * sizeof(float));
                a.qsum = (int32_t *)malloc((size_t)rows * (size_t)k / 32 * sizeof(int32_t));
                for (r = 0; r < rows; r++) {
                    for (i = 0; i < (size_t)k; i++)
                        x[i] = moe_test_rand(&s) * (1.0f + (float)((i + (size_t)r) % 5)) - 0.2f * (float)r;
                    moe__qact_row(&a, r, x);
                }
                for (nr = 1; nr <= MOE__QPDOT_NR; nr++)
                    for (r0 = 0; r0 + nr <= rows && r0 <= 1; r0++)
                        for (gi = 0; gi < groups; gi++) {
                            moe__qpdot_ref(t, g + (size_t)gi * gb, &a, r0, nr, grp_ref);
#if MOE__HAS_QPDOT
                            moe__qpdot_simd(t, g + (size_t)gi * gb, &a, r0, nr, grp_simd);
#else
                            memcpy(grp_simd, grp_ref, sizeof grp_ref);
#endif
                            for (o = gi * 16; o < n && o < gi * 16 + 16; o++) {
                                moe__qdot_ref(t, w + (size_t)o * rb, &a, r0, nr, ref);
                                for (r = 0; r < nr; r++) {
                                    const float gr = grp_ref[r * 16 + (o - gi * 16)];
                                    const float gs = grp_simd[r * 16 + (o - gi * 16)];
                                    double mag = 0.0;
                                    int32_t b;
                                    for (b = 0; b < k / 32; b++)   /* |terms| bound the rounding */
                                        mag += fabs((double)a.s[(size_t)(r0 + r) * (size_t)(k / 32) + b]) *
                                               0.05 * 32.0 * 16.0 + 1e-30;
                                    bad_ref += memcmp(&gr, &ref[r], sizeof gr) != 0;
                                    bad_simd += fabs((double)gs - (double)ref[r]) > 1e-6 * mag + 1e-6 * fabs(ref[r]);
                                }
                            }
                        }
                n_checked++;
                free(w); free(g); free(x); free(a.q); free(a.d); free(a.s); free(a.qsum);
            }
    CHECK_INT(bad_ref, 0);
    CHECK_INT(bad_simd, 0);
    CHECK_INT(n_checked, (4 * 4 - 2) * 5);   /* Q4_K skips k = 32 and 96 */
#else
    SKIP("no SIMD ISA in this build: the integer dots run in SIMD builds only");
#endif
}

/* float -> half (the block scales moe_quantize stores): every finite half
   comes back as itself; the midpoint of two neighbours goes to the even one,
   and the next float above it to the upper one (round to nearest even). */
TEST(quant_internal, f16_rounding) {
    uint32_t h;
    int bad = 0;
    for (h = 0; h < 0x7c00u; h++) {
        const float lo = moe__f16_float((uint16_t)h);
        const float hi = h + 1 == 0x7c00u ? 65536.0f : moe__f16_float((uint16_t)(h + 1));
        const float mid = (float)(((double)lo + (double)hi) / 2.0);   /* exact: 12 bits */
        const uint16_t even = (uint16_t)(h & 1u ? h + 1 : h);
        bad += moe__f16_of(lo) != h;
        bad += moe__f16_of(-lo) != (h | 0x8000u);
        bad += moe__f16_of(mid) != even;     /* 65520, above 65504, is Inf's tie */
        bad += moe__f16_of(nextafterf(mid, INFINITY)) != h + 1;
        bad += moe__f16_of(nextafterf(mid, 0.0f)) != h;
    }
    bad += moe__f16_of(INFINITY) != 0x7c00u;
    bad += (moe__f16_of(NAN) & 0x7c00u) != 0x7c00u || (moe__f16_of(NAN) & 0x3ffu) == 0;
    bad += moe__f16_of(1e-30f) != 0 || moe__f16_of(-1e-30f) != 0x8000u;
    CHECK_INT(bad, 0);
}

/* moe__qact_row_simd gives moe__qact_row's bits: codes, scales, sums, on
   random rows, rows whose values land on halves (x * id = n + 0.5 exactly,
   and the float just below 0.5), zero blocks and a NaN among the values. */
TEST(quant_internal, qact_twins) {
#if MOE__HAS_SIMD
    const int32_t k = 256, nb = k / 32, rows = 6;
    uint64_t s = 11;
    float *x = (float *)malloc((size_t)rows * (size_t)k * sizeof(float));
    moe__qact a, b;
    int32_t r, j, bad = 0;
    a.k = b.k = k;
    a.q = (int8_t *)malloc((size_t)rows * (size_t)k);
    b.q = (int8_t *)malloc((size_t)rows * (size_t)k);
    a.d = (float *)malloc((size_t)rows * (size_t)nb * sizeof(float));
    b.d = (float *)malloc((size_t)rows * (size_t)nb * sizeof(float));
    a.s = (float *)malloc((size_t)rows * (size_t)nb * sizeof(float));
    b.s = (float *)malloc((size_t)rows * (size_t)nb * sizeof(float));
    a.qsum = (int32_t *)malloc((size_t)rows * (size_t)nb * sizeof(int32_t));
    b.qsum = (int32_t *)malloc((size_t)rows * (size_t)nb * sizeof(int32_t));
    for (r = 0; r < rows; r++)
        for (j = 0; j < k; j++) {
            float *v = x + (size_t)r * (size_t)k + (size_t)j;
            switch (r) {
            case 0: *v = (moe_test_rand(&s) - 0.5f) * 3.0f; break;
            case 1: *v = (moe_test_rand(&s) - 0.5f) * 1e-3f * (float)(j % 7 + 1); break;
            /* a block's max 127: id = 1, so x itself is rounded; halves both signs */
            case 2: *v = j % 32 == 0 ? 127.0f : (float)(j % 32 - 16) + (j & 1 ? 0.5f : -0.5f);
                break;
            case 3: *v = j % 32 == 0 ? -127.0f : (j & 1 ? 0.49999997f : -0.49999997f) *
                                                 (float)(j % 3 + 1);
                break;
            case 4: *v = j < 64 ? 0.0f : (moe_test_rand(&s) - 0.5f) * 1e3f; break;
            default: *v = j == 40 ? NAN : (moe_test_rand(&s) - 0.5f); break;
            }
        }
    for (r = 0; r < rows; r++) {
        moe__qact_row(&a, r, x + (size_t)r * (size_t)k);
        moe__qact_row_simd(&b, r, x + (size_t)r * (size_t)k);
    }
    for (r = 0; r < rows; r++) {
        const size_t o = (size_t)r * (size_t)nb;
        /* the NaN's own code is the float-to-int conversion's (undefined in C): skip it */
        for (j = 0; j < k; j++)
            if (!(r == 5 && j == 40)) bad += a.q[(size_t)r * (size_t)k + (size_t)j] !=
                                             b.q[(size_t)r * (size_t)k + (size_t)j];
        bad += memcmp(a.d + o, b.d + o, (size_t)nb * sizeof(float)) != 0;
        if (r != 5) {
            bad += memcmp(a.s + o, b.s + o, (size_t)nb * sizeof(float)) != 0;
            bad += memcmp(a.qsum + o, b.qsum + o, (size_t)nb * sizeof(int32_t)) != 0;
        }
    }
    CHECK_INT(bad, 0);
    /* the halves did round away from zero: -14.5, -0.5 and 1.5 */
    CHECK_INT(b.q[2 * k + 33], -15);
    CHECK_INT(b.q[2 * k + 48], -1);
    CHECK_INT(b.q[2 * k + 49], 2);
    free(x); free(a.q); free(b.q); free(a.d); free(b.d); free(a.s); free(b.s);
    free(a.qsum); free(b.qsum);
#else
    SKIP("no SIMD ISA in this build: activations are quantized in SIMD builds only");
#endif
}
