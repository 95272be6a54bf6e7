/* Quantized expert weights (docs/QUANT.md): ggml's block formats against the
   independent oracle, the PyPI package gguf (llama.cpp's numpy code). Its
   blocks and values are in ref/quant_golden.h (tests/ref/gen_quant.py), as
   IEEE bits, so every comparison with it is exact. Then the layer: on
   quantized experts it must be bit for bit the fp32 layer on the decoded
   weights, for the reference and the compiled SIMD ISA, packed or not, for 1
   and 2 threads; and close to the layer on the unquantized weights. */
#include "../moe.h"
#include "moe_test.h"
#include "ref/quant_golden.h"

static float q_bits(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }
static uint32_t q_u32(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }

/* Exact value of the half h (ldexp of its fields), for finite h. */
static double q_half(uint16_t h) {
    const int ex = (h >> 10) & 0x1f, man = h & 0x3ff;
    const double v = ex ? ldexp(1024.0 + man, ex - 25) : ldexp((double)man, -24);
    return (h & 0x8000) ? -v : v;
}

/* Every half as a Q8_0 scale: d * 1 and d * -1 decode exactly to it. */
TEST(quant, fp16_every_half) {
    unsigned char b[34];
    float y[32];
    uint32_t h;
    int bad = 0;
    memset(b, 0, sizeof b);
    b[2] = 1; b[3] = 0xff;                        /* q = 1, -1 */
    for (h = 0; h < 65536; h++) {
        b[0] = (unsigned char)(h & 0xff); b[1] = (unsigned char)(h >> 8);
        CHECK_STATUS(moe_dequantize(MOE_QTYPE_Q8_0, b, sizeof b, 1, 32, y), MOE_STATUS_OK);
        if (((h >> 10) & 0x1f) == 0x1f) {
            if ((h & 0x3ff) ? !(y[0] != y[0]) : !(isinf(y[0]) && (y[0] < 0) == (h >> 15 == 1)))
                bad++;
        } else if ((double)y[0] != q_half((uint16_t)h) || y[1] != -y[0]) {
            bad++;
        }
    }
    CHECK_INT(bad, 0);
}

/* moe_quantize gives gguf's bytes for x; moe_dequantize gives gguf's values. */
static void q_against_gguf(moe_qtype type, int rows, const uint32_t *xb, const uint8_t *blocks,
                           const uint32_t *yb) {
    const size_t n = (size_t)rows * QG_N, bytes = (size_t)rows * moe_qtype_row_bytes(type, QG_N);
    float *x = (float *)malloc(n * sizeof(float)), *y = (float *)malloc(n * sizeof(float));
    unsigned char *b = (unsigned char *)malloc(bytes);
    size_t i, bad_b = 0, bad_y = 0;
    for (i = 0; i < n; i++) x[i] = q_bits(xb[i]);
    CHECK_STATUS(moe_quantize(type, x, rows, QG_N, b, bytes), MOE_STATUS_OK);
    for (i = 0; i < bytes; i++) bad_b += b[i] != blocks[i];
    CHECK_STATUS(moe_dequantize(type, blocks, bytes, rows, QG_N, y), MOE_STATUS_OK);
    for (i = 0; i < n; i++) bad_y += q_u32(y[i]) != yb[i];
    if (bad_b || bad_y)
        moe_test_fail(__FILE__, __LINE__, "%s: %zu of %zu bytes, %zu of %zu values differ",
                      moe_qtype_name(type), bad_b, bytes, bad_y, n);
    free(x); free(y); free(b);
}

TEST(quant, blocks_match_gguf) {
    q_against_gguf(MOE_QTYPE_Q8_0, QG_Q8_0_ROWS, qg_q8_0_x, qg_q8_0_blocks, qg_q8_0_y);
    q_against_gguf(MOE_QTYPE_Q4_0, QG_Q4_0_ROWS, qg_q4_0_x, qg_q4_0_blocks, qg_q4_0_y);
    q_against_gguf(MOE_QTYPE_MXFP4, QG_MXFP4_ROWS, qg_mxfp4_x, qg_mxfp4_blocks, qg_mxfp4_y);
}

/* gguf cannot quantize Q4_K: random blocks, dequantized. */
TEST(quant, q4_k_values_match_gguf) {
    float y[QG_Q4_K_BLOCKS * 256];
    size_t i, bad = 0;
    CHECK_STATUS(moe_dequantize(MOE_QTYPE_Q4_K, qg_q4_k_blocks, sizeof qg_q4_k_blocks,
                                QG_Q4_K_BLOCKS, 256, y), MOE_STATUS_OK);
    for (i = 0; i < QG_Q4_K_BLOCKS * 256; i++) bad += q_u32(y[i]) != qg_q4_k_y[i];
    CHECK_INT(bad, 0);
}

/* Round trip on bell-shaped rows (sums of uniforms): relative RMS error and
   the largest error relative to the row's largest |x|. Largest-error bounds
   from the formats: Q8_0 half a step, amax / 254 (+ the fp16 scale's
   rounding); Q4_0 an eighth of amax (levels -8..7: the side opposite the
   largest |x| ends at 7/8 of it); MXFP4 a quarter (e2m1 steps of 2 between
   4 and 6, clipping from 6 to 8 units); Q4_K, a min-max fit, 0.1 (measured
   0.062). RMS bounds are 1.5x the measured (q8_0 0.0052, q4_0 0.083, q4_k
   0.076, mxfp4 0.112). A quantizer that clips, picks the wrong scale or the
   wrong nibble is far outside them. */
static void q_round_trip(moe_qtype type, double rms_bound, double max_bound) {
    const int rows = 16, n = 512;
    const size_t N = (size_t)rows * n, bytes = (size_t)rows * moe_qtype_row_bytes(type, n);
    float *x = (float *)malloc(N * sizeof(float)), *y = (float *)malloc(N * sizeof(float));
    unsigned char *b = (unsigned char *)malloc(bytes);
    uint64_t s = 77;
    double se = 0.0, sx = 0.0, worst = 0.0;
    size_t i;
    int r;
    for (i = 0; i < N; i++)
        x[i] = moe_test_rand(&s) + moe_test_rand(&s) + moe_test_rand(&s) + moe_test_rand(&s);
    for (i = 0; i < (size_t)n; i++) x[i] *= 1e-3f;            /* rows at other scales */
    for (i = (size_t)n; i < 2 * (size_t)n; i++) x[i] *= 50.0f;
    CHECK_STATUS(moe_quantize(type, x, rows, n, b, bytes), MOE_STATUS_OK);
    CHECK_STATUS(moe_dequantize(type, b, bytes, rows, n, y), MOE_STATUS_OK);
    for (r = 0; r < rows; r++) {
        double amax = 0.0, rs = 0.0, rx = 0.0;
        for (i = (size_t)r * n; i < (size_t)(r + 1) * n; i++) {
            const double e = (double)y[i] - x[i];
            if (fabs(x[i]) > amax) amax = fabs(x[i]);
            rs += e * e; rx += (double)x[i] * x[i];
        }
        for (i = (size_t)r * n; i < (size_t)(r + 1) * n; i++)
            if (fabs((double)y[i] - x[i]) / amax > worst) worst = fabs((double)y[i] - x[i]) / amax;
        se += rs / rx; sx += 1.0;
    }
    se = sqrt(se / sx);
    printf("    %s round trip: rms %.4f, max %.4f of max|x|\n", moe_qtype_name(type), se, worst);
    if (!(se <= rms_bound && worst <= max_bound))
        moe_test_fail(__FILE__, __LINE__, "%s: rms %.4f (bound %.4f), max %.4f (bound %.4f)",
                      moe_qtype_name(type), se, rms_bound, worst, max_bound);
    free(x); free(y); free(b);
}

TEST(quant, round_trip_error) {
    q_round_trip(MOE_QTYPE_Q8_0, 0.008, 1.0 / 254 + 0.0005);
    q_round_trip(MOE_QTYPE_Q4_0, 0.125, 0.125 + 0.001);
    q_round_trip(MOE_QTYPE_Q4_K, 0.115, 0.1);
    q_round_trip(MOE_QTYPE_MXFP4, 0.17, 0.25);
}

TEST(quant, api_statuses) {
    float x[64], y[64];
    unsigned char b[160];
    size_t i;
    CHECK(!strcmp(moe_qtype_name(MOE_QTYPE_Q4_K), "q4_k"));
    CHECK(!strcmp(moe_qtype_name(MOE_QTYPE_F32), "f32"));
    CHECK(moe_qtype_name((moe_qtype)1) == NULL);
    CHECK_INT(moe_qtype_block_size(MOE_QTYPE_Q4_K), 256);
    CHECK_INT(moe_qtype_block_size(MOE_QTYPE_MXFP4), 32);
    CHECK_INT(moe_qtype_block_size((moe_qtype)99), 0);
    CHECK_INT(moe_qtype_row_bytes(MOE_QTYPE_Q8_0, 64), 68);
    CHECK_INT(moe_qtype_row_bytes(MOE_QTYPE_Q4_0, 64), 36);
    CHECK_INT(moe_qtype_row_bytes(MOE_QTYPE_MXFP4, 64), 34);
    CHECK_INT(moe_qtype_row_bytes(MOE_QTYPE_Q4_K, 512), 288);
    CHECK_INT(moe_qtype_row_bytes(MOE_QTYPE_F32, 5), 20);
    CHECK_INT(moe_qtype_row_bytes(MOE_QTYPE_Q8_0, 48), 0);
    CHECK_INT(moe_qtype_row_bytes(MOE_QTYPE_Q8_0, -32), 0);
    for (i = 0; i < 64; i++) x[i] = (float)i - 20.0f;
    memset(b, 0xa5, sizeof b);
    CHECK_STATUS(moe_quantize(MOE_QTYPE_Q8_0, NULL, 1, 64, b, sizeof b),
                 MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_quantize(MOE_QTYPE_Q8_0, x, -1, 64, b, sizeof b), MOE_STATUS_BAD_DIMENSION);
    CHECK_STATUS(moe_quantize(MOE_QTYPE_Q4_K, x, 1, 64, b, sizeof b), MOE_STATUS_BAD_QUANT);
    CHECK_STATUS(moe_quantize((moe_qtype)1, x, 1, 64, b, sizeof b), MOE_STATUS_BAD_QUANT);
    CHECK_STATUS(moe_quantize(MOE_QTYPE_Q8_0, x, 1, 64, b, 67), MOE_STATUS_BAD_QUANT);
    CHECK_STATUS(moe_quantize(MOE_QTYPE_Q8_0, x, 1, 64, (unsigned char *)x + 8, 68),
                 MOE_STATUS_ALIASING);
    x[40] = NAN;
    CHECK_STATUS(moe_quantize(MOE_QTYPE_Q8_0, x, 1, 64, b, sizeof b), MOE_STATUS_NONFINITE);
    x[40] = INFINITY;
    CHECK_STATUS(moe_quantize(MOE_QTYPE_Q8_0, x, 1, 64, b, sizeof b), MOE_STATUS_NONFINITE);
    for (i = 0; i < sizeof b; i++) if (b[i] != 0xa5) break;
    CHECK_INT(i, sizeof b);                        /* nothing written */
    x[40] = 20.0f;
    CHECK_STATUS(moe_quantize(MOE_QTYPE_Q8_0, x, 0, 64, b, 0), MOE_STATUS_OK);   /* no rows */
    CHECK_STATUS(moe_quantize(MOE_QTYPE_Q8_0, x, 2, 32, b, 68), MOE_STATUS_OK);
    for (i = 0; i < 64; i++) y[i] = -7.0f;
    CHECK_STATUS(moe_dequantize(MOE_QTYPE_Q8_0, b, 67, 2, 32, y), MOE_STATUS_BAD_QUANT);
    CHECK_STATUS(moe_dequantize(MOE_QTYPE_Q8_0, b, 68, 2, 32, NULL), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_dequantize(MOE_QTYPE_Q8_0, (float *)y + 1, 68, 2, 32, y),
                 MOE_STATUS_ALIASING);
    CHECK(y[0] == -7.0f && y[63] == -7.0f);
    CHECK_STATUS(moe_dequantize(MOE_QTYPE_Q8_0, b, 68, 2, 32, y), MOE_STATUS_OK);
    CHECK_NEAR(y[63], 43.0, 0.0, 0.01);            /* x[63] = 43 */
    CHECK_STATUS(moe_quantize(MOE_QTYPE_F32, x, 1, 3, b, 12), MOE_STATUS_OK);
    CHECK(!memcmp(b, x, 12));
}

/* ---- the layer on quantized experts ---- */

typedef struct q_layer {
    moe_config c;
    float *x, *router, *gate, *up, *down;     /* the fp32 weights */
    float *dgate, *dup, *ddown;               /* their quantized values, decoded */
    void *qgate, *qup, *qdown;                /* the blocks */
    float *sh[3], *dsh[3];                    /* shared expert gate, up, down (q_layer_shared) */
    void *qsh[3];
    float *sh_gate_w;
    moe_weights wq, wd, wf;                   /* on blocks, on decoded, on fp32 */
} q_layer;

static float *q_fill(uint64_t *s, size_t n, float scale) { return moe_test_fill(s, n, scale); }

/* One tensor of `rows` rows of n values in type t: blocks and decoded copy
   (fp32: the tensor itself). */
static void q_tensor(moe_qtype t, const float *w, size_t rows, int32_t n, void **blocks,
                     float **decoded) {
    const size_t bytes = rows * moe_qtype_row_bytes(t, n);
    *blocks = malloc(bytes ? bytes : 1);
    *decoded = (float *)malloc(rows * (size_t)n * sizeof(float));
    CHECK_STATUS(moe_quantize(t, w, (int64_t)rows, n, *blocks, bytes), MOE_STATUS_OK);
    CHECK_STATUS(moe_dequantize(t, *blocks, bytes, (int64_t)rows, n, *decoded), MOE_STATUS_OK);
}

static void q_layer_make(q_layer *L, moe_activation act, int fused, int32_t D, int32_t F,
                         moe_qtype tg, moe_qtype tu, moe_qtype td, int32_t T) {
    const size_t E = 4, grows = (size_t)(fused ? 2 : 1) * (size_t)F;
    const int glu = act == MOE_ACT_SWIGLU || act == MOE_ACT_GEGLU || act == MOE_ACT_GEGLU_TANH;
    uint64_t s = 1000u + (uint64_t)D * 7u + (uint64_t)tg * 31u + (uint64_t)td;
    memset(L, 0, sizeof *L);
    L->c = moe_preset_mixtral();
    L->c.num_experts = (int32_t)E; L->c.top_k = 2;
    L->c.d_model = D; L->c.d_ff = F; L->c.activation = act;
    L->x = q_fill(&s, (size_t)(T ? T : 1) * (size_t)D, 1.0f);
    L->router = q_fill(&s, E * (size_t)D, 0.5f);
    L->gate = q_fill(&s, E * grows * (size_t)D, 1.0f / sqrtf((float)D));
    L->up = q_fill(&s, E * (size_t)F * (size_t)D, 1.0f / sqrtf((float)D));
    L->down = q_fill(&s, E * (size_t)D * (size_t)F, 1.0f / sqrtf((float)F));
    q_tensor(tg, L->gate, E * grows, D, &L->qgate, &L->dgate);
    q_tensor(tu, L->up, E * (size_t)F, D, &L->qup, &L->dup);
    q_tensor(td, L->down, E * (size_t)D, F, &L->qdown, &L->ddown);
    L->wf.router = L->router;
    L->wf.gate = L->gate; L->wf.up = glu && !fused ? L->up : NULL; L->wf.down = L->down;
    L->wf.gate_up_fused = fused;
    L->wd = L->wf;
    L->wd.gate = L->dgate; L->wd.up = glu && !fused ? L->dup : NULL; L->wd.down = L->ddown;
    L->wq = L->wf;
    L->wq.gate_type = tg; L->wq.up_type = tu; L->wq.down_type = td;
    L->wq.gate_q = L->qgate; L->wq.up_q = L->qup; L->wq.down_q = L->qdown;
    if (tg != MOE_QTYPE_F32) L->wq.gate = NULL;   /* the blocks are what it reads */
    if (tu != MOE_QTYPE_F32) L->wq.up = NULL;
    if (td != MOE_QTYPE_F32) L->wq.down = NULL;
}

/* A gated shared expert of width Fs, its three tensors in type ts. */
static void q_layer_shared(q_layer *L, moe_qtype ts, int32_t Fs) {
    const size_t D = (size_t)L->c.d_model, F = (size_t)Fs;
    const size_t rows[3] = {F, F, D};
    const int32_t cols[3] = {(int32_t)D, (int32_t)D, Fs};
    uint64_t s = 77u + (uint64_t)ts;
    int k;
    L->c.shared_d_ff = Fs;
    L->c.shared_expert_gated = 1;
    for (k = 0; k < 3; k++) {
        L->sh[k] = q_fill(&s, rows[k] * (size_t)cols[k], 1.0f / sqrtf((float)cols[k]));
        q_tensor(ts, L->sh[k], rows[k], cols[k], &L->qsh[k], &L->dsh[k]);
    }
    L->sh_gate_w = q_fill(&s, D, 0.3f);
    L->wf.shared_gate = L->sh[0]; L->wf.shared_up = L->sh[1]; L->wf.shared_down = L->sh[2];
    L->wf.shared_expert_gate = L->sh_gate_w;
    L->wd.shared_gate = L->dsh[0]; L->wd.shared_up = L->dsh[1]; L->wd.shared_down = L->dsh[2];
    L->wd.shared_expert_gate = L->sh_gate_w;
    L->wq.shared_expert_gate = L->sh_gate_w;
    L->wq.shared_gate_type = L->wq.shared_up_type = L->wq.shared_down_type = ts;
    L->wq.shared_gate_q = L->qsh[0]; L->wq.shared_up_q = L->qsh[1];
    L->wq.shared_down_q = L->qsh[2];
    if (ts == MOE_QTYPE_F32) {
        L->wq.shared_gate = L->sh[0]; L->wq.shared_up = L->sh[1]; L->wq.shared_down = L->sh[2];
    }
}

static void q_layer_free(q_layer *L) {
    int k;
    free(L->x); free(L->router); free(L->gate); free(L->up); free(L->down);
    free(L->dgate); free(L->dup); free(L->ddown); free(L->qgate); free(L->qup); free(L->qdown);
    for (k = 0; k < 3; k++) { free(L->sh[k]); free(L->dsh[k]); free(L->qsh[k]); }
    free(L->sh_gate_w);
}

static float *q_run(const moe_config *c, const moe_weights *w, const float *x, int32_t T) {
    float *y = (float *)calloc((size_t)(T ? T : 1) * (size_t)c->d_model, sizeof(float));
    CHECK_STATUS(moe_forward_alloc(c, w, x, T, y, NULL), MOE_STATUS_OK);
    return y;
}

static int q_same(const float *a, const float *b, size_t n) {
    return n == 0 || memcmp(a, b, n * sizeof(float)) == 0;
}

/* A packed blob of w (NULL where packing is refused: the reference build). */
static void *q_pack(const moe_config *c, const moe_weights *w, size_t *bytes) {
    void *p;
    if (moe_pack_size(c, bytes) != MOE_STATUS_OK) return NULL;
    p = malloc(*bytes);
    if (moe_pack_weights(c, w, p, *bytes) != MOE_STATUS_OK) { free(p); return NULL; }
    return p;
}

/* Fewest rows any expert got in a forward of c on w (expert_kept). */
static int32_t q_min_rows(const moe_config *c, const moe_weights *w, const float *x, int32_t T) {
    moe_info info;
    int32_t kept[64], e, m = INT32_MAX;
    float *y = (float *)calloc((size_t)T * (size_t)c->d_model + 1, sizeof(float));
    memset(&info, 0, sizeof info);
    info.expert_kept = kept;
    CHECK_STATUS(moe_forward_alloc(c, w, x, T, y, &info), MOE_STATUS_OK);
    for (e = 0; e < c->num_experts; e++) if (kept[e] < m) m = kept[e];
    free(y);
    return m;
}

/* Experts with 1 to 16 rows in a forward of c on w (the integer dots' experts). */
static int32_t q_small_experts(const moe_config *c, const moe_weights *w, const float *x,
                               int32_t T) {
    moe_info info;
    int32_t kept[64], e, n = 0;
    float *y = (float *)calloc((size_t)T * (size_t)c->d_model + 1, sizeof(float));
    memset(&info, 0, sizeof info);
    info.expert_kept = kept;
    CHECK_STATUS(moe_forward_alloc(c, w, x, T, y, &info), MOE_STATUS_OK);
    for (e = 0; e < c->num_experts; e++) n += kept[e] >= 1 && kept[e] <= 16;
    free(y);
    return n;
}

/* Relative L2 distance ||a - b|| / ||b||. */
static double q_rel(const float *a, const float *b, size_t n) {
    double se = 0.0, sb = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        se += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        sb += (double)b[i] * b[i];
    }
    return sb > 0.0 ? sqrt(se / sb) : sqrt(se);
}

/* Integer dots (moe__experts_qdot) against the reference on the decoded
   weights: 8-bit activations per 32 values cost up to 1/254 of a block's
   largest |x| per value, in x and again in the hidden activations (the
   same error as ggml's q8 activations). Measured relative L2 error of the
   layer: 0.0105 at worst over these cases (Q4_0 gate, MXFP4 down, T = 1;
   AVX2 and AVX-512 builds alike); the bound is 2x that, where a wrong
   block, scale or nibble order is off by about 1. */
#define Q_INT8_BOUND 0.021
/* Does this build read w.qpacked? (moe.h: AVX-512 with BW) */
#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(MOE_NO_SIMD)
#define QP_READ 1
#else
#define QP_READ 0
#endif
static double q_int8_worst;

/* The layer on blocks against the fp32 layer on their decoded values:
   - reference ISA: bit for bit, any T;
   - the compiled SIMD ISA, unpacked, 1 and 2 threads bit for bit with each
     other; where every expert has more than 16 rows (the panels) bit for bit
     the SIMD layer on the decoded weights, else (integer dots) within
     Q_INT8_BOUND of the reference;
   - moe_pack_weights from blocks (fp32 and bf16 panels): the same bytes as
     from the decoded weights; a forward on that blob with the blocks runs
     experts of up to 4 rows on the blocks and the others on the panels:
     where all have more than 16 rows, the decoded layer's bits, else within
     Q_INT8_BOUND of the reference. */
static void q_layer_check(moe_activation act, int fused, int32_t D, int32_t F, moe_qtype tg,
                          moe_qtype tu, moe_qtype td, int32_t T, int32_t Fs, moe_qtype ts) {
    q_layer L;
    moe_config c;
    const size_t TD = (size_t)T * (size_t)D;
    float *yq, *yd, *yr, *y1 = NULL;
    int bf16, panels;
    q_layer_make(&L, act, fused, D, F, tg, tu, td, T);
    if (Fs > 0) q_layer_shared(&L, ts, Fs);
    c = L.c;
    c.isa = MOE_ISA_REFERENCE;
    yq = q_run(&c, &L.wq, L.x, T); yr = q_run(&c, &L.wd, L.x, T);
    if (!q_same(yq, yr, TD))
        moe_test_fail(__FILE__, __LINE__, "reference %s/%s/%s D%d F%d T%d: not the decoded layer",
                      moe_qtype_name(tg), moe_qtype_name(tu), moe_qtype_name(td), D, F, T);
    free(yq);
    if (moe_compiled_isa() == MOE_ISA_REFERENCE) { free(yr); q_layer_free(&L); return; }
    c.isa = MOE_ISA_AUTO;
    panels = T > 0 && q_min_rows(&c, &L.wq, L.x, T) > 16 && (Fs == 0 || T > 16);
    for (c.num_threads = 1; c.num_threads <= 2; c.num_threads++) {
        yq = q_run(&c, &L.wq, L.x, T);
        if (panels) {
            yd = q_run(&c, &L.wd, L.x, T);
            if (!q_same(yq, yd, TD))
                moe_test_fail(__FILE__, __LINE__, "%s %s/%s/%s D%d F%d T%d: not the decoded layer",
                              moe_isa_name(moe_compiled_isa()), moe_qtype_name(tg),
                              moe_qtype_name(tu), moe_qtype_name(td), D, F, T);
            free(yd);
        } else if (T > 0) {
            const double rel = q_rel(yq, yr, TD);
            if (rel > q_int8_worst) q_int8_worst = rel;
            if (!(rel <= Q_INT8_BOUND))
                moe_test_fail(__FILE__, __LINE__, "%s %s/%s/%s D%d F%d T%d: int8 path %.4f off",
                              moe_isa_name(moe_compiled_isa()), moe_qtype_name(tg),
                              moe_qtype_name(tu), moe_qtype_name(td), D, F, T, rel);
        }
        if (y1) {
            if (!q_same(yq, y1, TD))
                moe_test_fail(__FILE__, __LINE__, "%s/%s/%s T%d: 2 threads differ from 1",
                              moe_qtype_name(tg), moe_qtype_name(tu), moe_qtype_name(td), T);
            free(yq);
        } else {
            y1 = yq;
        }
    }
    /* the decode layout (moe_qpack_weights) beside the blocks: the same integer
       sums in other float steps (tests/test_quant_internal.c checks them to
       the bit), but a hidden value one ulp away may round to another int8
       code for the down projection, so within Q_INT8_BOUND of the reference,
       as the blocks' run; 1 and 2 threads alike. Alone, and beside a blob.
       Builds with AVX-512BW read it: scrambled codes there change y;
       elsewhere it is ignored and y stays the blocks' run. A set (routed or
       shared) whose every matrix is quantized reads it at any number of
       rows, so its experts of more than 16 rows leave the panels too (beside
       a blob, Q8_0 without VNNI keeps the panels there). */
    {
        size_t qb = 0;
        void *qp;
        float *yp1 = NULL, *yp;
        moe_weights wq2 = L.wq;
        /* without a blob, a set whose every matrix is quantized runs the decode layout at
           any rows (fused: the up half is the gate tensor's) */
        const int glu = act == MOE_ACT_SWIGLU || act == MOE_ACT_GEGLU;
        const int routed_all = tg != MOE_QTYPE_F32 && td != MOE_QTYPE_F32 &&
                               (!glu || fused || tu != MOE_QTYPE_F32);
        const int shared_q = Fs > 0 && ts != MOE_QTYPE_F32;
        const int qp_panels = panels && !(QP_READ && (routed_all || shared_q));
        CHECK_STATUS(moe_qpack_size(&c, &L.wq, &qb), MOE_STATUS_OK);
        qp = malloc(qb);
        CHECK_STATUS(moe_qpack_weights(&c, &L.wq, qp, qb), MOE_STATUS_OK);
        wq2.qpacked = qp; wq2.qpacked_bytes = qb;
        for (c.num_threads = 1; c.num_threads <= 2; c.num_threads++) {
            yp = q_run(&c, &wq2, L.x, T);
            if (T > 0 && !qp_panels && !(q_rel(yp, yr, TD) <= Q_INT8_BOUND))
                moe_test_fail(__FILE__, __LINE__, "qpacked %s/%s/%s D%d F%d T%d: %.4f off",
                              moe_qtype_name(tg), moe_qtype_name(tu), moe_qtype_name(td), D, F, T,
                              q_rel(yp, yr, TD));
            if (qp_panels || QP_READ == 0) CHECK(q_same(yp, y1, TD));
            if (yp1) { CHECK(q_same(yp, yp1, TD)); free(yp); } else yp1 = yp;
        }
        c.num_threads = 0;
        if (T > 0 && !qp_panels) {
            /* every quantized matrix's groups are read (an fp32 one beside it reads its
               rows) */
            const int routed = tg != MOE_QTYPE_F32 || (glu && tu != MOE_QTYPE_F32) ||
                               td != MOE_QTYPE_F32;
            const int reads_qp = (routed && (routed_all || q_small_experts(&c, &L.wq, L.x,
                                                                           T) > 0)) ||
                                 shared_q;
            unsigned char *scrambled = (unsigned char *)malloc(qb);
            size_t k;
            memcpy(scrambled, qp, qb);
            for (k = 64; k < qb; k++) scrambled[k] = (unsigned char)(scrambled[k] * 13u + 7u);
            wq2.qpacked = scrambled;
            yp = q_run(&c, &wq2, L.x, T);
            if (QP_READ && reads_qp) CHECK(!q_same(yp, yp1, TD)); else CHECK(q_same(yp, yp1, TD));
            free(yp); free(scrambled);
            wq2.qpacked = qp;
        }
        {
            size_t bq = 0;
            void *pq = q_pack(&c, &L.wq, &bq);
            if (pq) {
                wq2.packed = pq; wq2.packed_bytes = bq;
                yp = q_run(&c, &wq2, L.x, T);
                if (T > 0) CHECK(q_rel(yp, yr, TD) <= Q_INT8_BOUND);
                free(yp);
                free(pq);
            }
        }
        free(yp1); free(qp);
    }
    c.num_threads = 0;
    for (bf16 = 0; bf16 <= 1; bf16++) {
        size_t bq = 0, bd = 0;
        void *pq, *pd;
        c.pack_bf16 = bf16;
        pq = q_pack(&c, &L.wq, &bq); pd = q_pack(&c, &L.wd, &bd);
        CHECK(pq && pd && bq == bd && !memcmp(pq, pd, bq));
        if (pq && bf16 == 0) {
            /* the forward on the blob: experts of up to 16 rows still read the blocks (the
               unpacked run's bits), the others the panels (the decoded layer's bits) */
            moe_weights wp = L.wq, wdp = L.wd;
            wp.packed = pq; wp.packed_bytes = bq;
            wdp.packed = pq; wdp.packed_bytes = bq;
            yq = q_run(&c, &wp, L.x, T);
            if (panels) {
                yd = q_run(&c, &wdp, L.x, T);
                CHECK(q_same(yq, yd, TD));
                free(yd);
            } else if (T > 0) {
                CHECK(q_rel(yq, yr, TD) <= Q_INT8_BOUND);
            }
            free(yq);
        }
        free(pq); free(pd);
    }
    free(y1); free(yr);
    q_layer_free(&L);
}

TEST(quant, layer_on_blocks) {
    const int32_t Ts[5] = {1, 7, 33, 100, 0};
    const moe_qtype F32 = MOE_QTYPE_F32, Q8 = MOE_QTYPE_Q8_0, Q4 = MOE_QTYPE_Q4_0,
                    Q4K = MOE_QTYPE_Q4_K, MX = MOE_QTYPE_MXFP4;
    int i;
    for (i = 0; i < 5; i++) {
        q_layer_check(MOE_ACT_SWIGLU, 0, 64, 96, Q8, Q8, Q8, Ts[i], 0, F32);
        q_layer_check(MOE_ACT_GELU, 0, 96, 64, Q4, F32, Q4, Ts[i], 0, F32);
        q_layer_check(MOE_ACT_SWIGLU, 1, 256, 256, Q4K, F32, Q4K, Ts[i], 0, F32);
        q_layer_check(MOE_ACT_SWIGLU, 0, 64, 64, MX, MX, MX, Ts[i], 0, F32);
        /* mixed: every type in one layer; fp32 and blocks in one w13 panel */
        q_layer_check(MOE_ACT_GEGLU, 0, 64, 96, Q4, Q8, MX, Ts[i], 0, F32);
        q_layer_check(MOE_ACT_SWIGLU, 0, 64, 32, F32, Q8, F32, Ts[i], 0, F32);
        /* a gated shared expert in blocks, beside routed blocks or fp32 */
        q_layer_check(MOE_ACT_SWIGLU, 0, 64, 32, Q8, Q8, Q8, Ts[i], 96, Q4);
        q_layer_check(MOE_ACT_SWIGLU, 0, 64, 32, F32, F32, F32, Ts[i], 64, MX);
        q_layer_check(MOE_ACT_GELU, 0, 256, 64, Q4, F32, Q4, Ts[i], 256, Q4K);
    }
    q_layer_check(MOE_ACT_SWIGLU, 0, 256, 256, Q4K, Q8, Q4, 1000, 0, F32);
    q_layer_check(MOE_ACT_SWIGLU, 0, 64, 64, Q8, Q8, Q8, 1000, 128, Q8);
    if (moe_compiled_isa() != MOE_ISA_REFERENCE)
        printf("    integer dots: worst relative error %.4f (bound %.3f)\n", q_int8_worst,
               Q_INT8_BOUND);
}

/* The layer on blocks against the layer on the fp32 weights they came from:
   relative error ||y_q - y|| / ||y|| over T = 64 tokens (reference ISA), for
   uniform weights of scale 1/sqrt(fan_in). The bounds are 1.5x the measured
   (q8_0 0.0064, q4_0 0.114, q4_k 0.106, mxfp4 0.291: the weights' errors of
   round_trip_error through three projections and the GLU); a layer that read
   a wrong block or scale is off by about 1. */
TEST(quant, layer_close_to_fp32) {
    const moe_qtype types[4] = {MOE_QTYPE_Q8_0, MOE_QTYPE_Q4_0, MOE_QTYPE_Q4_K, MOE_QTYPE_MXFP4};
    const double bound[4] = {0.0096, 0.17, 0.16, 0.44};
    const int32_t T = 64;
    int i;
    for (i = 0; i < 4; i++) {
        q_layer L;
        float *yq, *yf;
        double se = 0.0, sy = 0.0, rel;
        size_t k;
        q_layer_make(&L, MOE_ACT_SWIGLU, 0, 256, 256, types[i], types[i], types[i], T);
        L.c.isa = MOE_ISA_REFERENCE;
        yq = q_run(&L.c, &L.wq, L.x, T); yf = q_run(&L.c, &L.wf, L.x, T);
        for (k = 0; k < (size_t)T * 256; k++) {
            se += ((double)yq[k] - yf[k]) * ((double)yq[k] - yf[k]);
            sy += (double)yf[k] * yf[k];
        }
        rel = sqrt(se / sy);
        printf("    %s layer: relative error %.4f\n", moe_qtype_name(types[i]), rel);
        if (!(rel <= bound[i]))
            moe_test_fail(__FILE__, __LINE__, "%s: %.4f > %.4f", moe_qtype_name(types[i]), rel,
                          bound[i]);
        free(yq); free(yf);
        q_layer_free(&L);
    }
}

/* The backward refuses the layer on blocks (QUANT_UNSUPPORTED, dx
   untouched) and takes it on the decoded weights. */
static void q_backward_refused(q_layer *L, int32_t T) {
    moe_config c = L->c;
    moe_info info;
    moe_grads g;
    const size_t TD = (size_t)T * (size_t)c.d_model;
    float *y = (float *)calloc(TD + 1, sizeof(float)), *dx = (float *)malloc((TD + 1) * 4);
    size_t i, ib;
    void *ibuf;
    c.save_for_backward = 1;
    memset(&info, 0, sizeof info);
    CHECK_STATUS(moe_info_size(&c, T, &ib), MOE_STATUS_OK);
    ibuf = malloc(ib);
    CHECK_STATUS(moe_info_bind(&c, T, &info, ibuf, ib), MOE_STATUS_OK);
    CHECK_STATUS(moe_forward_alloc(&c, &L->wq, L->x, T, y, &info), MOE_STATUS_OK);
    memset(&g, 0, sizeof g);
    for (i = 0; i < TD; i++) dx[i] = -3.0f;
    CHECK_STATUS(moe_backward_alloc(&c, &L->wq, L->x, T, &info, y, dx, &g),
                 MOE_STATUS_QUANT_UNSUPPORTED);
    for (i = 0; i < TD && dx[i] == -3.0f; i++) {}
    CHECK(i == TD);
    CHECK_STATUS(moe_backward_alloc(&c, &L->wd, L->x, T, &info, y, dx, &g), MOE_STATUS_OK);
    free(ibuf); free(y); free(dx);
}

/* Malformed quantized weights: a named status and y untouched. */
TEST(quant, layer_statuses) {
    q_layer L;
    moe_weights w;
    const int32_t T = 3;
    float y[3 * 64];
    size_t i;
    q_layer_make(&L, MOE_ACT_SWIGLU, 0, 64, 96, MOE_QTYPE_Q8_0, MOE_QTYPE_Q4_0, MOE_QTYPE_MXFP4, T);
    for (i = 0; i < 3 * 64; i++) y[i] = -3.0f;
    w = L.wq; w.gate_type = 1;                         /* ggml's F16: not a moe_qtype */
    CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, T, y, NULL), MOE_STATUS_BAD_QUANT);
    w = L.wq; w.down_type = 99;
    CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, T, y, NULL), MOE_STATUS_BAD_QUANT);
    w = L.wq; w.up_type = MOE_QTYPE_Q4_K;              /* D = 64: not whole 256-blocks */
    CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, T, y, NULL), MOE_STATUS_BAD_QUANT);
    w = L.wq; w.down_q = NULL;
    CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, T, y, NULL), MOE_STATUS_MISSING_WEIGHT);
    if (moe_compiled_isa() != MOE_ISA_REFERENCE) {    /* a blob does not replace blocks */
        size_t pb = 0;
        void *blob = q_pack(&L.c, &L.wq, &pb);
        CHECK(blob != NULL);
        w = L.wq; w.packed = blob; w.packed_bytes = pb; w.up_q = NULL;
        CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, T, y, NULL), MOE_STATUS_MISSING_WEIGHT);
        free(blob);
    }
    w = L.wq;                                          /* y over the gate's blocks */
    CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, 1, (float *)L.qgate + 8, NULL),
                 MOE_STATUS_ALIASING);
    for (i = 0; i < 3 * 64; i++) if (y[i] != -3.0f) break;
    CHECK_INT(i, 3 * 64);
    {   /* the non-GLU layer ignores up's type, as it ignores w.up */
        moe_config c = L.c;
        c.activation = MOE_ACT_GELU;
        w = L.wq; w.up_type = 99; w.up_q = NULL;
        CHECK_STATUS(moe_forward_alloc(&c, &w, L.x, T, y, NULL), MOE_STATUS_OK);
    }
    {   /* the decode layout: its statuses, and a blob of other weights refused */
        size_t qb = 0, qb2 = 0;
        unsigned char *qp;
        moe_weights wf = L.wf;
        CHECK_STATUS(moe_qpack_size(NULL, &L.wq, &qb), MOE_STATUS_NULL_ARGUMENT);
        CHECK_STATUS(moe_qpack_size(&L.c, &L.wq, NULL), MOE_STATUS_NULL_ARGUMENT);
        CHECK_STATUS(moe_qpack_size(&L.c, &wf, &qb), MOE_STATUS_UNSUPPORTED);  /* all fp32 */
        w = L.wq; w.gate_type = 99;
        CHECK_STATUS(moe_qpack_size(&L.c, &w, &qb), MOE_STATUS_BAD_QUANT);
        CHECK_STATUS(moe_qpack_size(&L.c, &L.wq, &qb), MOE_STATUS_OK);
        qp = (unsigned char *)malloc(qb);
        CHECK_STATUS(moe_qpack_weights(&L.c, &L.wq, qp, qb - 1), MOE_STATUS_WORKSPACE_TOO_SMALL);
        CHECK_STATUS(moe_qpack_weights(&L.c, &L.wq, (unsigned char *)L.qgate + 4, qb),
                     MOE_STATUS_ALIASING);
        CHECK_STATUS(moe_qpack_weights(&L.c, &L.wq, qp, qb), MOE_STATUS_OK);
        w = L.wq; w.qpacked = qp; w.qpacked_bytes = qb;
        CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, T, y, NULL), MOE_STATUS_OK);
        for (i = 0; i < 3 * 64; i++) y[i] = -3.0f;
        w.qpacked_bytes = qb - 1;                      /* cut short */
        CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, T, y, NULL), MOE_STATUS_BAD_PACKED);
        w.qpacked_bytes = qb;
        w.down_type = MOE_QTYPE_Q8_0;                  /* the weights it was not made from */
        w.down_q = L.qgate;
        CHECK_STATUS(moe_qpack_size(&L.c, &w, &qb2), MOE_STATUS_OK);
        CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, T, y, NULL), MOE_STATUS_BAD_PACKED);
        w = L.wq; w.qpacked = qp; w.qpacked_bytes = qb; w.gate_up_fused = 1; w.up_q = NULL;
        CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, T, y, NULL), MOE_STATUS_BAD_PACKED);
        w = L.wq; w.qpacked = qp; w.qpacked_bytes = qb;
        qp[3] ^= 1;                                    /* not its magic */
        CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, T, y, NULL), MOE_STATUS_BAD_PACKED);
        qp[3] ^= 1;
        CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, T, (float *)(void *)(qp + 64), NULL),
                     MOE_STATUS_ALIASING);             /* y over the blob */
        for (i = 0; i < 3 * 64; i++) if (y[i] != -3.0f) break;
        CHECK_INT(i, 3 * 64);
        free(qp);
    }
    q_backward_refused(&L, T);                         /* fp32 experts only */
    {   /* the expert-parallel owner too */
        moe_ep_plan plan;
        moe_ep_pair pair;
        float out[64];
        uint8_t dropped = 0;
        size_t wb;
        void *ws;
        plan.num_ranks = 1; plan.rank = 0; plan.num_tokens = 1;
        plan.token_offset = 0; plan.local_tokens = 1;
        memset(&pair, 0, sizeof pair);
        pair.weight = 1.0f; pair.priority = 1.0f;
        L.c.save_for_backward = 0;
        CHECK_STATUS(moe_ep_workspace_size(&L.c, &plan, &wb), MOE_STATUS_OK);
        ws = malloc(wb);
        CHECK_STATUS(moe_ep_expert_forward(&L.c, &L.wq, &plan, &pair, L.x, 1, out, &dropped,
                                           NULL, NULL, ws, wb),
                     MOE_STATUS_QUANT_UNSUPPORTED);
        free(ws);
    }
    q_layer_free(&L);
}

/* A quantized shared expert: its own statuses; the backward refuses it even
   when every routed expert is fp32. */
TEST(quant, shared_expert_statuses) {
    q_layer L;
    moe_weights w;
    const int32_t T = 3;
    float y[3 * 64];
    size_t i;
    q_layer_make(&L, MOE_ACT_SWIGLU, 0, 64, 32, MOE_QTYPE_F32, MOE_QTYPE_F32, MOE_QTYPE_F32, T);
    q_layer_shared(&L, MOE_QTYPE_Q8_0, 96);
    for (i = 0; i < 3 * 64; i++) y[i] = -3.0f;
    w = L.wq; w.shared_up_type = MOE_QTYPE_Q4_K;          /* D = 64: not whole 256-blocks */
    CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, T, y, NULL), MOE_STATUS_BAD_QUANT);
    w = L.wq; w.shared_down_type = 1;
    CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, T, y, NULL), MOE_STATUS_BAD_QUANT);
    w = L.wq; w.shared_down_q = NULL;
    CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, T, y, NULL), MOE_STATUS_MISSING_WEIGHT);
    w = L.wq;                                          /* y over the shared gate's blocks */
    CHECK_STATUS(moe_forward_alloc(&L.c, &w, L.x, 1, (float *)L.qsh[0] + 4, NULL),
                 MOE_STATUS_ALIASING);
    for (i = 0; i < 3 * 64; i++) if (y[i] != -3.0f) break;
    CHECK_INT(i, 3 * 64);
    {   /* without a shared expert its types are not read */
        moe_config c = L.c;
        c.shared_d_ff = 0; c.shared_expert_gated = 0;
        w = L.wq; w.shared_gate_type = 99;
        CHECK_STATUS(moe_forward_alloc(&c, &w, L.x, T, y, NULL), MOE_STATUS_OK);
    }
    q_backward_refused(&L, T);
    q_layer_free(&L);
}
