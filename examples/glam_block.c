/* glam_block.c -- the GLaM-style block: causal self-attention plus a
   Mixture-of-Experts FFN residual (64 GEGLU experts, top-2), and what it
   buys: a table of parameters, FLOPs per token and measured time of the MoE
   FFN against a dense FFN with the same parameter count and against a dense
   FFN with the same FLOPs per token.

   GLaM (Du et al. 2021, "GLaM: Efficient Scaling of Language Models with
   Mixture-of-Experts") makes every other Transformer layer an MoE layer:
   in every other layer the FFN is 64 experts with top-2 gating, and the
   layers between keep a dense FFN. The second half of the output runs such
   a 2-layer stack (layer 0 dense FFN, layer 1 MoE FFN) on synthetic tokens.

   The MoE FFN is moe_preset_glam() (E = 64, K = 2, GEGLU experts, softmax
   router renormalised over the two, balance_coef 0.01) shrunk from the
   preset's D = 8192, F = 32768 to D = 64, F = 256. The dense FFNs are moe.h
   layers too: E = 1, K = 1 with d_ff = 64 F (same parameters) or 2 F (same
   FLOPs). A one-expert layer's router is a 1-column GEMM whose softmax is
   exactly 1, so it is a plain GEGLU FFN run by the same kernels as the
   experts: the times compare like with like. Attention and LayerNorm are
   written here (forward only).

   FLOPs count GEMM multiply-adds as 2 (activations, softmax and combine
   are left out: a few percent here, less at larger D). Times are the
   median of a few runs of moe_forward (inference, training = 0) with the
   workspace preallocated; on a SIMD build the expert weights are packed
   once with moe_pack_weights. They are wall-clock times on whatever else
   the machine is doing: on a busy 2-core VM the small sublayers scattered
   by up to 3x between runs (the FLOP and parameter columns are exact).

   build: cc -std=c99 -O2 -o glam_block examples/glam_block.c -lm
          (add -mavx2 -mfma, or -mavx512f, for the SIMD kernels; -fopenmp
          for threads, which on a busy machine makes small layers slower)
   run:   ./glam_block [T]          (default T = 128 tokens: 2 sequences of 64) */
#define _POSIX_C_SOURCE 199309L
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { D = 64, F = 256, E = 64, K = 2, NH = 4, DH = D / NH, SEQ = 64 };

/* Deterministic uniform(-1, 1) from a 64-bit LCG: same tokens on every run. */
static uint64_t rng_state = 0x853c49e6748fea9bull;
static float uniform(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) * (1.0 / 8388608.0)) - 1.0f;
}
static void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(1); }
    return p;
}
static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// ----------------------------------------------------------------------------
// An FFN sublayer as a moe.h layer: MoE (E experts, top-K) or dense (E = K = 1)

typedef struct ffn_layer {
    moe_config cfg;
    moe_weights w;
    float *router, *gate, *up, *down;
    void *ws, *packed;
    size_t ws_bytes;
} ffn_layer;

static void ffn_init(ffn_layer *f, int32_t experts, int32_t top_k, int32_t d_ff, int32_t T, uint64_t seed) {
    moe_grads init;
    size_t pack_bytes;
    moe_config resolved;
    f->cfg = moe_preset_glam();                 /* GEGLU experts, softmax, renormalise */
    f->cfg.num_experts = experts; f->cfg.top_k = top_k;
    f->cfg.d_model = D; f->cfg.d_ff = d_ff;
    f->router = (float *)xmalloc((size_t)experts * D * sizeof(float));
    f->gate = (float *)xmalloc((size_t)experts * d_ff * D * sizeof(float));
    f->up = (float *)xmalloc((size_t)experts * d_ff * D * sizeof(float));
    f->down = (float *)xmalloc((size_t)experts * D * d_ff * sizeof(float));
    memset(&init, 0, sizeof init);
    init.router = f->router; init.gate = f->gate; init.up = f->up; init.down = f->down;
    moe_init_weights(&f->cfg, MOE_INIT_XAVIER, seed, &init);   /* each expert its own stream */
    memset(&f->w, 0, sizeof f->w);
    f->w.router = f->router; f->w.gate = f->gate; f->w.up = f->up; f->w.down = f->down;
    f->packed = NULL;
    moe_config_resolve(&f->cfg, &resolved);
    if (resolved.isa != MOE_ISA_REFERENCE && moe_pack_size(&f->cfg, &pack_bytes) == MOE_STATUS_OK) {
        f->packed = xmalloc(pack_bytes);        /* once, as for inference */
        if (moe_pack_weights(&f->cfg, &f->w, f->packed, pack_bytes) == MOE_STATUS_OK) {
            f->w.packed = f->packed;
            f->w.packed_bytes = pack_bytes;
        }
    }
    moe_forward_workspace_size(&f->cfg, T, &f->ws_bytes);
    f->ws = xmalloc(f->ws_bytes);
}
static void ffn_free(ffn_layer *f) {
    free(f->router); free(f->gate); free(f->up); free(f->down); free(f->ws); free(f->packed);
}
static void ffn_forward(ffn_layer *f, const float *x, int32_t T, float *y, moe_info *info) {
    moe_status st = moe_forward(&f->cfg, &f->w, x, T, y, info, f->ws, f->ws_bytes);
    if (st != MOE_STATUS_OK) { fprintf(stderr, "moe_forward: %s\n", moe_status_string(st)); exit(1); }
}
/* parameters: router E*D + per expert gate, up [F][D] and down [D][F] */
static double ffn_params(const ffn_layer *f) {
    return (double)f->cfg.num_experts * D + (double)f->cfg.num_experts * 3.0 * D * f->cfg.d_ff;
}
/* FLOPs per token: router 2*D*E, then K experts of three D x F GEMMs */
static double ffn_flops(const ffn_layer *f) {
    return 2.0 * D * f->cfg.num_experts + (double)f->cfg.top_k * 6.0 * D * f->cfg.d_ff;
}
/* median seconds of `runs` forwards after one warm-up; a layer slower than
   0.25 s a call (the dense FFN on the reference kernels) gets one timed run */
static double ffn_time(ffn_layer *f, const float *x, int32_t T, float *y, int runs) {
    double t[9], t0 = now_seconds();
    int r;
    ffn_forward(f, x, T, y, NULL);
    if (now_seconds() - t0 > 0.25) runs = 1;
    for (r = 0; r < runs; r++) {
        t0 = now_seconds();
        ffn_forward(f, x, T, y, NULL);
        t[r] = now_seconds() - t0;
    }
    qsort(t, (size_t)runs, sizeof(double), cmp_double);
    return t[runs / 2];
}

// ----------------------------------------------------------------------------
// Attention and LayerNorm (forward only; moe_transformer_layer.c has both
// with their backward passes)

typedef struct attn_layer { float wq[D * D], wk[D * D], wv[D * D], wo[D * D], ln_g[D], ln_b[D]; } attn_layer;

static void attn_init(attn_layer *a) {
    const float s = 1.0f / sqrtf((float)D);
    int i;
    for (i = 0; i < D * D; i++) {
        a->wq[i] = s * uniform(); a->wk[i] = s * uniform();
        a->wv[i] = s * uniform(); a->wo[i] = s * uniform();
    }
    for (i = 0; i < D; i++) { a->ln_g[i] = 1.0f; a->ln_b[i] = 0.0f; }
}
/* out = g * (v - mean) / sqrt(var + 1e-5) + b, per token */
static void layernorm(float *out, const float *v, const float *g, const float *b, int32_t T) {
    int32_t t, d;
    for (t = 0; t < T; t++) {
        float mu = 0.0f, var = 0.0f, r;
        for (d = 0; d < D; d++) mu += v[t * D + d] / D;
        for (d = 0; d < D; d++) var += (v[t * D + d] - mu) * (v[t * D + d] - mu) / D;
        r = 1.0f / sqrtf(var + 1e-5f);
        for (d = 0; d < D; d++) out[t * D + d] = g[d] * (v[t * D + d] - mu) * r + b[d];
    }
}
/* out[n][D] = in[n][D] . W^T (nn.Linear layout, no bias) */
static void linear(float *out, const float *in, const float *W, int32_t n) {
    int32_t i, o, j;
    for (i = 0; i < n; i++)
        for (o = 0; o < D; o++) {
            float acc = 0.0f;
            for (j = 0; j < D; j++) acc += in[i * D + j] * W[o * D + j];
            out[i * D + o] = acc;
        }
}
/* att = Wo . concat_h(softmax_causal(q_h k_h^T / sqrt(DH)) v_h) on sequences
   of SEQ tokens (the last one may be shorter); scratch: 4 T D floats.     */
static void attention(const attn_layer *a, const float *x, int32_t T, float *att, float *scratch) {
    float *q = scratch, *k = q + (size_t)T * D, *v = k + (size_t)T * D, *o = v + (size_t)T * D, P[SEQ];
    const float scale = 1.0f / sqrtf((float)DH);
    int32_t b0, h, t, s, d;
    linear(q, x, a->wq, T); linear(k, x, a->wk, T); linear(v, x, a->wv, T);
    for (b0 = 0; b0 < T; b0 += SEQ)
        for (h = 0; h < NH; h++)
            for (t = b0; t < T && t < b0 + SEQ; t++) {
                float mx = -INFINITY, sum = 0.0f;
                for (s = b0; s <= t; s++) {
                    float acc = 0.0f;
                    for (d = 0; d < DH; d++) acc += q[t * D + h * DH + d] * k[s * D + h * DH + d];
                    P[s - b0] = acc * scale;
                    if (P[s - b0] > mx) mx = P[s - b0];
                }
                for (s = b0; s <= t; s++) { P[s - b0] = expf(P[s - b0] - mx); sum += P[s - b0]; }
                for (d = 0; d < DH; d++) {
                    float acc = 0.0f;
                    for (s = b0; s <= t; s++) acc += P[s - b0] * v[s * D + h * DH + d];
                    o[t * D + h * DH + d] = acc / sum;
                }
            }
    linear(att, o, a->wo, T);
}
/* attention FLOPs per token: four D x D projections, and q.k and P.v over
   on average (SEQ + 1) / 2 earlier tokens (causal)                         */
static double attn_flops(void) { return 8.0 * D * D + 2.0 * 2.0 * D * (SEQ + 1) / 2.0; }

/* One pre-LN block:  h = x + Attn(LN_a(x));  out = h + FFN(LN_f(h))  (LN_f
   shares attn_layer's parameters' shape; a second attn_layer holds it).   */
static void block(const attn_layer *a, const attn_layer *ln_f, ffn_layer *f, const float *x, int32_t T,
                  float *out, float *scratch, moe_info *info, double *t_attn, double *t_ffn) {
    float *n = scratch + 4 * (size_t)T * D, *att = n + (size_t)T * D, *m = att + (size_t)T * D;
    double t0 = now_seconds();
    int32_t i;
    layernorm(n, x, a->ln_g, a->ln_b, T);
    attention(a, n, T, att, scratch);
    for (i = 0; i < T * D; i++) out[i] = x[i] + att[i];
    *t_attn = now_seconds() - t0;
    t0 = now_seconds();
    layernorm(n, out, ln_f->ln_g, ln_f->ln_b, T);
    ffn_forward(f, n, T, m, info);
    for (i = 0; i < T * D; i++) out[i] += m[i];
    *t_ffn = now_seconds() - t0;
}

/* One table row: a label (printf format with up to three ints), parameters,
   FLOPs per token, seconds; with T > 0 also the achieved GFLOP/s.        */
static void row(const char *fmt, int a, int b, int c, double params, double flops, double secs, int32_t T) {
    char label[64];
    snprintf(label, sizeof label, fmt, a, b, c);
    printf("%-34s %8.3f M %11.3f M %10.3f ms", label, params * 1e-6, flops * 1e-6, secs * 1e3);
    if (T > 0) printf(" %9.2f", flops * T / secs * 1e-9);
    printf("\n");
}

static const char *isa_name(const moe_config *cfg) {
    moe_config c;
    moe_config_resolve(cfg, &c);
    switch (c.isa) {
    case MOE_ISA_AVX2: return "AVX2+FMA";
    case MOE_ISA_AVX512: return "AVX-512";
    case MOE_ISA_NEON: return "NEON";
    default: return "scalar reference";
    }
}

int main(int argc, char **argv) {
    const int32_t T = argc > 1 ? atoi(argv[1]) : 128;
    const moe_config glam = moe_preset_glam();
    ffn_layer moe, dense_p, dense_f, dense_0;
    static attn_layer attn0, attn1, lnf0, lnf1;
    moe_info info;
    int32_t routed[E], e, i, lo, hi;
    float *x, *y, *h1, *h2, *scratch;
    double t_moe, t_dp, t_df, ta0, tf0, ta1, tf1, big_params, big_flops;

    if (T < 1 || T > 1 << 20) { fprintf(stderr, "usage: %s [T >= 1]\n", argv[0]); return 2; }
    ffn_init(&moe, E, K, F, T, 1);           /* the MoE FFN: 64 experts of width F, top-2    */
    ffn_init(&dense_p, 1, 1, E * F, T, 2);   /* dense, same parameters: one FFN of width E F */
    ffn_init(&dense_f, 1, 1, K * F, T, 3);   /* dense, same FLOPs: width K F                 */
    x = (float *)xmalloc((size_t)T * D * sizeof(float));
    y = (float *)xmalloc((size_t)T * D * sizeof(float));
    h1 = (float *)xmalloc((size_t)T * D * sizeof(float));
    h2 = (float *)xmalloc((size_t)T * D * sizeof(float));
    scratch = (float *)xmalloc(7 * (size_t)T * D * sizeof(float));
    for (i = 0; i < T * D; i++) x[i] = uniform();

    printf("moe.h %s: a GLaM-style block. GLaM alternates dense and MoE layers: every other\n"
           "layer's FFN is an MoE of %d GEGLU experts with top-%d gating.\n",
           MOE_VERSION_STRING, (int)glam.num_experts, (int)glam.top_k);
    printf("moe_preset_glam(): E=%d K=%d D=%d F=%d, shrunk here to D=%d F=%d. T=%d tokens, kernels: %s",
           (int)glam.num_experts, (int)glam.top_k, (int)glam.d_model, (int)glam.d_ff, D, F, (int)T,
           isa_name(&moe.cfg));
#ifdef _OPENMP
    printf(", OpenMP threads: %d", omp_get_max_threads());
#endif
    printf("\n\n");

    /* 1. the table: MoE FFN vs dense FFNs of equal parameters and equal FLOPs */
    t_moe = ffn_time(&moe, x, T, y, 7);
    t_dp = ffn_time(&dense_p, x, T, y, 3);
    t_df = ffn_time(&dense_f, x, T, y, 7);
    printf("%-34s %10s %13s %13s %9s\n", "FFN sublayer (one layer)", "params", "FLOPs/token", "time", "GFLOP/s");
    row("MoE: %d experts x F=%d, top-%d", E, F, K, ffn_params(&moe), ffn_flops(&moe), t_moe, T);
    row("dense, same params: F=%d", E * F, 0, 0, ffn_params(&dense_p), ffn_flops(&dense_p), t_dp, T);
    row("dense, same FLOPs: F=%d", K * F, 0, 0, ffn_params(&dense_f), ffn_flops(&dense_f), t_df, T);
    printf("\nThe MoE holds %.0fx the parameters of the same-FLOPs dense FFN and does %.1fx less arithmetic\n"
           "per token than the same-parameter one (E/K = %d, less the router). Measured: %.1fx less time than\n"
           "the same-parameter dense FFN, %.1fx the time of the same-FLOPs one. Time does not follow FLOPs\n"
           "exactly (GFLOP/s column): each expert multiplies only T K / E = %.0f rows, so its weights are\n"
           "read for a few tokens, while the dense GEMMs have all T rows; how much that costs depends on the\n"
           "kernels (reference or SIMD) and on T (try ./glam_block 1024).\n",
           ffn_params(&moe) / ffn_params(&dense_f), ffn_flops(&dense_p) / ffn_flops(&moe), E / K,
           t_dp / t_moe, t_moe / t_df, (double)T * K / E);
    big_params = (double)glam.num_experts * (3.0 * glam.d_model * glam.d_ff + glam.d_model);
    big_flops = 2.0 * glam.d_model * glam.num_experts + (double)glam.top_k * 6.0 * glam.d_model * glam.d_ff;
    printf("At the preset's full shape (D=%d, F=%d, three matrices per GEGLU expert) one MoE FFN layer\n"
           "holds %.1f G parameters and spends %.2f GFLOP per token; a dense FFN of the same parameters\n"
           "would spend %.1f GFLOP per token.\n\n",
           (int)glam.d_model, (int)glam.d_ff, big_params * 1e-9, big_flops * 1e-9,
           2.0 * 3.0 * glam.d_model * glam.d_ff * glam.num_experts * 1e-9);

    /* 2. the 2-layer stack: layer 0 attention + dense FFN (width F, as one
          expert), layer 1 attention + MoE FFN; pre-LN blocks               */
    ffn_init(&dense_0, 1, 1, F, T, 4);
    attn_init(&attn0); attn_init(&attn1); attn_init(&lnf0); attn_init(&lnf1);
    memset(&info, 0, sizeof info);
    info.expert_routed = routed;
    {   /* one warm-up pass, then the median of 5 for each sublayer */
        double ta[2][5], tf[2][5];
        int r;
        block(&attn0, &lnf0, &dense_0, x, T, h1, scratch, NULL, &ta0, &tf0);
        block(&attn1, &lnf1, &moe, h1, T, h2, scratch, &info, &ta1, &tf1);
        for (r = 0; r < 5; r++) {
            block(&attn0, &lnf0, &dense_0, x, T, h1, scratch, NULL, &ta[0][r], &tf[0][r]);
            block(&attn1, &lnf1, &moe, h1, T, h2, scratch, &info, &ta[1][r], &tf[1][r]);
        }
        qsort(ta[0], 5, sizeof(double), cmp_double); qsort(tf[0], 5, sizeof(double), cmp_double);
        qsort(ta[1], 5, sizeof(double), cmp_double); qsort(tf[1], 5, sizeof(double), cmp_double);
        ta0 = ta[0][2]; tf0 = tf[0][2]; ta1 = ta[1][2]; tf1 = tf[1][2];
    }
    printf("2-layer stack, pre-LN blocks  h = x + Attn(LN(x));  out = h + FFN(LN(h)):\n");
    printf("%-34s %10s %13s %13s\n", "layer, sublayer", "params", "FLOPs/token", "time (med. 5)");
    row("0  attention, %d heads", NH, 0, 0, 4.0 * D * D, attn_flops(), ta0, 0);
    row("0  dense FFN, F=%d", F, 0, 0, ffn_params(&dense_0), ffn_flops(&dense_0), tf0, 0);
    row("1  attention, %d heads", NH, 0, 0, 4.0 * D * D, attn_flops(), ta1, 0);
    row("1  MoE FFN, %d x F=%d, top-%d", E, F, K, ffn_params(&moe), ffn_flops(&moe), tf1, 0);
    printf("(LayerNorm parameters, 2 D per LayerNorm, are not counted)\n");
    lo = hi = routed[0];
    for (e = 1; e < E; e++) { if (routed[e] < lo) lo = routed[e]; if (routed[e] > hi) hi = routed[e]; }
    printf("layer 1 routing: %d (token, expert) pairs over %d experts, %d..%d per expert (mean %.1f),\n"
           "dropless (no capacity), aux_balance %.3f (= K = %d at perfect balance; untrained router)\n",
           (int)(T * K), E, (int)lo, (int)hi, (double)T * K / E, info.aux_balance, K);

    ffn_free(&moe); ffn_free(&dense_p); ffn_free(&dense_f); ffn_free(&dense_0);
    free(x); free(y); free(h1); free(h2); free(scratch);
    return 0;
}
