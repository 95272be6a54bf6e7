/* bench/ggml_moe_bench.c -- peer benchmark: ggml's quantized MoE FFN layer
   (ggml_mul_mat_id on the CPU backend) at the shapes of bench/moe_bench.c
   --qtype.  Not part of the build or of CI: bench/ggml_bench.sh fetches ggml
   (llama-cpp-python sdist from PyPI), builds it and this file, and runs it:
     bench/ggml_bench.sh [options]          (build + run)
     build/ggml/ggml_moe_bench [options]    (once built)
   Options:
     --T LIST       token counts, comma list (default 1,16,128,1024)
     --shape NAME   mixtral-mini, deepseek-mini or qwen-mini (default all)
     --qtype LIST   q8_0, q4_0, q4_k, mxfp4, comma list (default all)
     --reps N       timed runs per row (default 9 for T < 128, else 5)
     --threads N    CPU backend threads (default 2, the target machine)
     --no-repack    expert weights in the plain CPU buffer (llama.cpp's
                    --no-repack); default: as llama.cpp, the first CPU "extra"
                    buffer type that supports MUL_MAT_ID on them (CPU_REPACK
                    for q4_0, q4_k and mxfp4 on AVX2; none for q8_0 on x86)
   Shapes (as moe_bench.c; SwiGLU experts, softmax router):
     mixtral-mini   D=1024 F=3584 E=8  K=2, top-k weights renormalised
     deepseek-mini  D=1024 F=512  E=64 K=6, no renormalisation
     qwen-mini      D=1024 F=384  E=60 K=4, no renormalisation, + shared
                    expert Fs=1536 gated by sigmoid(x . w_sg)
   q4_k needs rows that are multiples of 256: qwen-mini's down projection has
   rows of F=384, so q4_k skips qwen-mini (as moe_bench.c does).
   What one timed run is: one ggml_backend_graph_compute of the graph
   llama.cpp's llm_graph_context::build_moe_ffn builds (llama.cpp 0c1e57098,
   src/llama-graph.cpp), for T tokens x [D, T] fp32:
     router    logits = ggml_mul_mat(w_r, x) (w_r fp32, as llama-quantize
               leaves ffn_gate_inp), probs = ggml_soft_max, selected =
               ggml_argsort_top_k(probs, K), weights = ggml_get_rows(probs,
               selected); mixtral-mini: weights / clamp(sum_rows(weights))
     experts   up = ggml_mul_mat_id(up_exps, x, selected), gate likewise,
               ggml_swiglu_split(gate, up), down = ggml_mul_mat_id(down_exps,
               ., selected), ggml_mul by the weights, sum over the K slots
               by K - 1 ggml_adds of views
     shared    (qwen-mini) as llama.cpp's qwen2moe: ggml_mul_mat by the fp32
               shared up/gate/down (moe_bench.c keeps them fp32 too),
               ggml_swiglu_split, times silu(g)/g = sigmoid(g) with g =
               ggml_mul_mat(w_sg, x), added to the routed output
   Weights: uniform in [-0.03, 0.03], x in [-1, 1] (fixed seeds, the same
   distributions as moe_bench.c, not the same numbers), experts quantized by
   ggml_quantize_chunk (no importance matrix). Warm caches: one warm-up run,
   then N timed runs; each row prints the median and min-max ms, and GB/s =
   the weight bytes a forward must read at least (router + every expert that
   some token routed to, in its quantized bytes, + shared expert) / median.
   Check (every row, on the warm-up's output): tokens 0 and T-1 recomputed in
   plain C (float data, double sums) from the same weights, the experts
   dequantized by ggml's to_float (ggml_get_type_traits), the routing
   recomputed from the logits; error = ||y_ggml - y_ref|| / ||y_ref|| (2-norm
   over those tokens), against two references:
     f32-ref   the activations (x, and the SwiGLU output h entering the down
               projection) in float. ggml's CPU kernels round them to 8 bits
               (q8_0, or q8_K for q4_k: the weight type's vec_dot_type) for
               their integer dots, which alone gives ~1e-2 here (q8_0 about
               0.9e-2, q8_K 1.4e-2): tolerance 3e-2
     q8-ref    x and h rounded to that vec_dot_type and back (ggml's own
               from_float / to_float) before the float dots, as ggml does:
               left are float summation-order differences (~1e-7):
               tolerance 1e-3
   "ok" when both are within tolerance and ggml picked the same K experts
   for both tokens; otherwise "FAIL" and exit status 1.                    */
#define _POSIX_C_SOURCE 199309L
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_REPS 100
#define MAX_LIST 8 /* items of --T and --qtype */
#define TOL_F32 3e-2 /* f32-ref */
#define TOL_Q8 1e-3  /* q8-ref */

typedef struct {
    const char *name;
    int D, F, E, K, Fs; /* Fs: shared expert width, 0 for none */
    int renorm;         /* divide the top-k weights by their sum */
} shape_t;

static const shape_t shapes[3] = {
    {"mixtral-mini", 1024, 3584, 8, 2, 0, 1},
    {"deepseek-mini", 1024, 512, 64, 6, 0, 0},
    {"qwen-mini", 1024, 384, 60, 4, 1536, 0},
};

static const struct {
    const char *name;
    enum ggml_type type;
} qtypes[4] = {
    {"q8_0", GGML_TYPE_Q8_0},
    {"q4_0", GGML_TYPE_Q4_0},
    {"q4_k", GGML_TYPE_Q4_K},
    {"mxfp4", GGML_TYPE_MXFP4},
};

/* ---------------------------------------------------------------- utils */

static uint64_t rng_state;
static float *random_floats(size_t n, float scale) {
    float *p = (float *)malloc(n * sizeof(float));
    size_t i;
    if (!p) { fprintf(stderr, "out of memory\n"); exit(1); }
    for (i = 0; i < n; i++) {
        rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = scale * ((float)((rng_state >> 40) * (1.0 / 8388608.0)) - 1.0f);
    }
    return p;
}
static void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(1); }
    return p;
}
static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ---------------------------------------------------------------- layer */

/* One MoE layer's weights: ggml tensors in backend buffers, plus host copies
   (fp32, and the experts' blocks before any repacking) for the check. */
typedef struct {
    const shape_t *s;
    enum ggml_type type;
    float *router;    /* [E][D] */
    void *exps[3];    /* gate [E][F][D], up [E][F][D], down [E][D][F] blocks */
    float *sh[3];     /* shared gate [Fs][D], up [Fs][D], down [D][Fs] */
    float *sh_inp;    /* shared expert gate w_sg [D] */
    struct ggml_context *ctx_f32, *ctx_exp[3];
    ggml_backend_buffer_t buf_f32, buf_exp[3];
    struct ggml_tensor *w_r, *w_exp[3], *w_sh[3], *w_sh_inp;
    const char *exp_buft; /* buffer type name of the expert tensors */
} layer_t;

static struct ggml_context *new_meta_ctx(size_t n_tensors) {
    struct ggml_init_params p = {ggml_tensor_overhead() * n_tensors, NULL, true};
    struct ggml_context *ctx = ggml_init(p);
    if (!ctx) { fprintf(stderr, "ggml_init failed\n"); exit(1); }
    return ctx;
}

/* The buffer type llama.cpp would give expert tensor w (its
   weight_buft_supported with GGML_OP_MUL_MAT_ID): the first CPU extra buffer
   type whose supports_op accepts the op, else the plain CPU buffer type. */
static ggml_backend_buffer_type_t expert_buft(struct ggml_tensor *w, int K, int repack) {
    ggml_backend_reg_t reg = ggml_backend_cpu_reg();
    ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, 0);
    ggml_backend_dev_get_extra_bufts_t get_extra = (ggml_backend_dev_get_extra_bufts_t)
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    ggml_backend_buffer_type_t *b = get_extra && repack ? get_extra(dev) : NULL;
    for (; b && *b; b++) {
        struct ggml_context *ctx = new_meta_ctx(8);
        struct ggml_tensor *x = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, w->ne[0], K, 512);
        struct ggml_tensor *ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, K, 512);
        struct ggml_tensor *op = ggml_mul_mat_id(ctx, w, x, ids);
        int ok;
        w->buffer = ggml_backend_buft_alloc_buffer(*b, 0); /* dummy, names the type */
        ok = ggml_backend_dev_supports_op(dev, op);
        ggml_backend_buffer_free(w->buffer);
        w->buffer = NULL;
        ggml_free(ctx);
        if (ok) return *b;
    }
    return ggml_backend_cpu_buffer_type();
}

/* Random weights for shape s (the same for every type), the experts quantized
   to type by ggml_quantize_chunk and loaded as llama.cpp would place them. */
static layer_t make_layer(const shape_t *s, enum ggml_type type, int repack) {
    const int64_t D = s->D, F = s->F, E = s->E, Fs = s->Fs;
    /* gate, up: E matrices of F rows of D; down: E of D rows of F */
    const int64_t rows[3] = {E * F, E * F, E * D}, cols[3] = {D, D, F};
    layer_t L;
    int i;
    memset(&L, 0, sizeof L);
    L.s = s;
    L.type = type;
    rng_state = 0x9E3779B97F4A7C15ull; /* same weights for every type */
    L.router = random_floats((size_t)(E * D), 0.03f);
    for (i = 0; i < 3; i++) {
        float *w = random_floats((size_t)(rows[i] * cols[i]), 0.03f);
        const size_t bytes = ggml_row_size(type, cols[i]) * (size_t)rows[i];
        L.exps[i] = xmalloc(bytes);
        if (ggml_quantize_chunk(type, w, L.exps[i], 0, rows[i], cols[i], NULL) != bytes) {
            fprintf(stderr, "ggml_quantize_chunk: unexpected size\n");
            exit(1);
        }
        free(w);
    }
    if (Fs) {
        L.sh[0] = random_floats((size_t)(Fs * D), 0.03f);
        L.sh[1] = random_floats((size_t)(Fs * D), 0.03f);
        L.sh[2] = random_floats((size_t)(D * Fs), 0.03f);
        L.sh_inp = random_floats((size_t)D, 0.03f);
    }

    /* fp32 tensors: router, shared expert (ggml layout: ne0 = row length) */
    L.ctx_f32 = new_meta_ctx(8);
    L.w_r = ggml_new_tensor_2d(L.ctx_f32, GGML_TYPE_F32, D, E);
    if (Fs) {
        L.w_sh[0] = ggml_new_tensor_2d(L.ctx_f32, GGML_TYPE_F32, D, Fs);
        L.w_sh[1] = ggml_new_tensor_2d(L.ctx_f32, GGML_TYPE_F32, D, Fs);
        L.w_sh[2] = ggml_new_tensor_2d(L.ctx_f32, GGML_TYPE_F32, Fs, D);
        L.w_sh_inp = ggml_new_tensor_1d(L.ctx_f32, GGML_TYPE_F32, D);
    }
    L.buf_f32 = ggml_backend_alloc_ctx_tensors_from_buft(L.ctx_f32,
                                                         ggml_backend_cpu_buffer_type());
    if (!L.buf_f32) { fprintf(stderr, "buffer allocation failed\n"); exit(1); }
    ggml_backend_tensor_set(L.w_r, L.router, 0, ggml_nbytes(L.w_r));
    if (Fs) {
        for (i = 0; i < 3; i++)
            ggml_backend_tensor_set(L.w_sh[i], L.sh[i], 0, ggml_nbytes(L.w_sh[i]));
        ggml_backend_tensor_set(L.w_sh_inp, L.sh_inp, 0, ggml_nbytes(L.w_sh_inp));
    }

    /* experts [cols, rows/E, E], each in the buffer type llama.cpp would pick;
       ggml_backend_tensor_set repacks them there when that type repacks */
    for (i = 0; i < 3; i++) {
        ggml_backend_buffer_type_t buft;
        L.ctx_exp[i] = new_meta_ctx(1);
        L.w_exp[i] = ggml_new_tensor_3d(L.ctx_exp[i], type, cols[i], rows[i] / E, E);
        buft = expert_buft(L.w_exp[i], s->K, repack);
        L.buf_exp[i] = ggml_backend_alloc_ctx_tensors_from_buft(L.ctx_exp[i], buft);
        if (!L.buf_exp[i]) { fprintf(stderr, "buffer allocation failed\n"); exit(1); }
        ggml_backend_tensor_set(L.w_exp[i], L.exps[i], 0, ggml_nbytes(L.w_exp[i]));
        if (i == 0) L.exp_buft = ggml_backend_buft_name(buft);
        else if (strcmp(L.exp_buft, ggml_backend_buft_name(buft)) != 0) L.exp_buft = "mixed";
    }
    return L;
}

static void free_layer(layer_t *L) {
    int i;
    for (i = 0; i < 3; i++) {
        ggml_backend_buffer_free(L->buf_exp[i]);
        ggml_free(L->ctx_exp[i]);
        free(L->exps[i]);
        free(L->sh[i]);
    }
    ggml_backend_buffer_free(L->buf_f32);
    ggml_free(L->ctx_f32);
    free(L->router);
    free(L->sh_inp);
}

/* ---------------------------------------------------------------- graph */

/* llama.cpp's build_moe_ffn (softmax gating, no bias, no scale, SwiGLU with
   separate gate and up, weights after the FFN) for x [D, T], plus the
   qwen2moe shared expert. *topk_out: the tensor holding the selected
   experts, the first K entries of each of its T rows (the [E, T] argsort
   that ggml_argsort_top_k views). */
static struct ggml_tensor *build_moe_ffn(struct ggml_context *ctx, struct ggml_cgraph *gf,
                                         const layer_t *L, struct ggml_tensor *x,
                                         struct ggml_tensor **topk_out) {
    const shape_t *s = L->s;
    const int64_t T = x->ne[1];
    struct ggml_tensor *logits, *probs, *selected, *weights, *cur, *up, *gate, *experts;
    struct ggml_tensor *moe_out;
    int i;

    logits = ggml_mul_mat(ctx, L->w_r, x);                       /* [E, T] */
    probs = ggml_soft_max(ctx, logits);                          /* [E, T] */
    selected = ggml_argsort_top_k(ctx, probs, s->K);             /* [K, T] */
    *topk_out = selected->view_src ? selected->view_src : selected;
    weights = ggml_get_rows(ctx, ggml_reshape_3d(ctx, probs, 1, s->E, T), selected);
    if (s->renorm) {                                             /* [1, K, T] */
        struct ggml_tensor *sum;
        weights = ggml_reshape_2d(ctx, weights, s->K, T);
        sum = ggml_clamp(ctx, ggml_sum_rows(ctx, weights), 6.103515625e-5f, INFINITY);
        weights = ggml_reshape_3d(ctx, ggml_div(ctx, weights, sum), 1, s->K, T);
    }
    ggml_build_forward_expand(gf, weights);

    cur = ggml_reshape_3d(ctx, x, s->D, 1, T);
    up = ggml_mul_mat_id(ctx, L->w_exp[1], cur, selected);       /* [F, K, T] */
    gate = ggml_mul_mat_id(ctx, L->w_exp[0], cur, selected);     /* [F, K, T] */
    cur = ggml_swiglu_split(ctx, gate, up);
    experts = ggml_mul_mat_id(ctx, L->w_exp[2], cur, selected);  /* [D, K, T] */
    experts = ggml_mul(ctx, experts, weights);
    ggml_build_forward_expand(gf, experts);

    moe_out = NULL;
    for (i = 0; i < s->K; i++) {
        struct ggml_tensor *v = ggml_view_2d(ctx, experts, s->D, T, experts->nb[2],
                                             (size_t)i * experts->nb[1]);
        ggml_build_forward_expand(gf, v);
        moe_out = moe_out ? ggml_add(ctx, moe_out, v) : v;
        if (i) ggml_build_forward_expand(gf, moe_out);
    }
    if (s->K == 1) moe_out = ggml_cont(ctx, moe_out);

    if (s->Fs) { /* qwen2moe.cpp: shared expert, sigmoid gate as silu(g) / g */
        struct ggml_tensor *g = ggml_mul_mat(ctx, L->w_sh_inp, x); /* [1, T] */
        struct ggml_tensor *sg = ggml_div(ctx, ggml_silu(ctx, g), g);
        struct ggml_tensor *su = ggml_mul_mat(ctx, L->w_sh[1], x);  /* [Fs, T] */
        struct ggml_tensor *sh = ggml_mul_mat(ctx, L->w_sh[0], x);
        sh = ggml_swiglu_split(ctx, sh, su);
        sh = ggml_mul_mat(ctx, L->w_sh[2], sh);                     /* [D, T] */
        moe_out = ggml_add(ctx, moe_out, ggml_mul(ctx, sh, sg));
    }
    return moe_out;
}

/* ---------------------------------------------------------------- check */

static double dot(const float *a, const float *b, int64_t n) {
    double acc = 0;
    int64_t i;
    for (i = 0; i < n; i++) acc += (double)a[i] * b[i];
    return acc;
}
static double silu(double v) { return v / (1.0 + exp(-v)); }

/* ggml's block_q8_K (ggml-common.h, not public): value i = d * qs[i]. ggml's
   type traits have no to_float for q8_K (an activation-only type). */
typedef struct {
    float d;
    int8_t qs[256];
    int16_t bsums[256 / 16];
} q8_K_block;

/* v [n] rounded as ggml's CPU matmul rounds the activations it multiplies
   with weights of type wt: to wt's vec_dot_type (q8_0, q8_K) and back.
   buf: at least 4 n bytes. */
static void round_like_ggml(enum ggml_type wt, float *v, int64_t n, void *buf) {
    const enum ggml_type vt = ggml_get_type_traits_cpu(wt)->vec_dot_type;
    const ggml_to_float_t to_float = ggml_get_type_traits(vt)->to_float;
    int64_t b, i;
    if (vt == GGML_TYPE_F32) return;
    ggml_get_type_traits_cpu(vt)->from_float(v, buf, n);
    if (to_float) {
        to_float(buf, v, n);
    } else if (vt == GGML_TYPE_Q8_K && ggml_type_size(vt) == sizeof(q8_K_block) &&
               ggml_blck_size(vt) == 256) {
        const q8_K_block *q = (const q8_K_block *)buf;
        for (b = 0; b < n / 256; b++)
            for (i = 0; i < 256; i++) v[b * 256 + i] = q[b].d * (float)q[b].qs[i];
    } else {
        fprintf(stderr, "no dequantizer for %s\n", ggml_type_name(vt));
        exit(1);
    }
}

/* Reference y [D] for one token x0 [D] in plain C: fp32 router, softmax,
   top-K (ties to the lower index), experts dequantized by ggml's to_float;
   round_act: the experts' inputs rounded as ggml rounds them (q8-ref).
   sel_out [K]: the experts picked. scratch: F * D + 3 * F + 2 * D floats. */
static void reference_token(const layer_t *L, const float *x0, double *y, int *sel_out,
                            float *scratch, int round_act) {
    const shape_t *s = L->s;
    const int64_t D = s->D, F = s->F, E = s->E, Fs = s->Fs;
    const ggml_to_float_t to_float = ggml_get_type_traits(L->type)->to_float;
    const size_t rd = ggml_row_size(L->type, D), rf = ggml_row_size(L->type, F);
    double p[256], wsum = 0, mx = -INFINITY, z = 0;
    float *mat = scratch, *g = scratch + F * D, *u = g + F, *x = u + F, *xe = x + D;
    void *qbuf = mat; /* free while the activations are rounded */
    int64_t e, f, d;
    int k, j;
    memcpy(x, x0, (size_t)D * sizeof(float));
    memcpy(xe, x0, (size_t)D * sizeof(float)); /* the experts' input */
    if (round_act) round_like_ggml(L->type, xe, D, qbuf);
    for (e = 0; e < E; e++) { p[e] = dot(L->router + e * D, x, D); if (p[e] > mx) mx = p[e]; }
    for (e = 0; e < E; e++) { p[e] = exp(p[e] - mx); z += p[e]; }
    for (e = 0; e < E; e++) p[e] /= z;
    for (k = 0; k < s->K; k++) {
        int best = -1;
        for (e = 0; e < E; e++) {
            int taken = 0;
            for (j = 0; j < k; j++) taken |= sel_out[j] == (int)e;
            if (!taken && (best < 0 || p[e] > p[best])) best = (int)e;
        }
        sel_out[k] = best;
        wsum += p[best];
    }
    for (d = 0; d < D; d++) y[d] = 0;
    for (k = 0; k < s->K; k++) {
        const int64_t ex = sel_out[k];
        const double w = s->renorm ? p[ex] / wsum : p[ex];
        to_float((const char *)L->exps[0] + (size_t)(ex * F) * rd, mat, F * D);
        for (f = 0; f < F; f++) g[f] = (float)dot(mat + f * D, xe, D);
        to_float((const char *)L->exps[1] + (size_t)(ex * F) * rd, mat, F * D);
        for (f = 0; f < F; f++) u[f] = (float)dot(mat + f * D, xe, D);
        for (f = 0; f < F; f++) g[f] = (float)(silu(g[f]) * u[f]);
        if (round_act) round_like_ggml(L->type, g, F, u); /* u: 4 F bytes, free now */
        to_float((const char *)L->exps[2] + (size_t)(ex * D) * rf, mat, D * F);
        for (d = 0; d < D; d++) y[d] += w * dot(mat + d * F, g, F);
    }
    if (Fs) {
        const double gate = 1.0 / (1.0 + exp(-dot(L->sh_inp, x, D)));
        float *h = (float *)xmalloc((size_t)Fs * sizeof(float));
        for (f = 0; f < Fs; f++)
            h[f] = (float)(silu(dot(L->sh[0] + f * D, x, D)) * dot(L->sh[1] + f * D, x, D));
        for (d = 0; d < D; d++) y[d] += gate * dot(L->sh[2] + d * Fs, h, Fs);
        free(h);
    }
}

/* ||y - ref|| / ||ref|| over tokens 0 and T-1 of the graph's output y, for
   the f32-ref (rel[0]) and the q8-ref (rel[1]); topk: ggml's selected
   experts, row stride ld. Returns the tokens whose ggml routing (set of K
   experts) differs from the reference's. */
static int check_rows(const layer_t *L, const float *x, const float *y, const int32_t *topk,
                      int64_t ld, int64_t T, double rel[2]) {
    const shape_t *s = L->s;
    const int64_t toks[2] = {0, T - 1};
    float *scratch = (float *)xmalloc(((size_t)s->F * (s->D + 3) + 2 * (size_t)s->D) *
                                      sizeof(float));
    double *ref = (double *)xmalloc((size_t)s->D * sizeof(double)), err[2] = {0, 0}, mag = 0;
    int sel[64], n, k, j, d, r, route_diff = 0;
    for (n = 0; n < (T > 1 ? 2 : 1); n++) {
        const int64_t t = toks[n];
        for (r = 0; r < 2; r++) {
            reference_token(L, x + t * s->D, ref, sel, scratch, r);
            for (d = 0; d < s->D; d++) {
                const double diff = y[t * s->D + d] - ref[d];
                err[r] += diff * diff;
                if (r == 0) mag += ref[d] * ref[d];
            }
        }
        for (k = 0; k < s->K; k++) {
            int found = 0;
            for (j = 0; j < s->K; j++) found |= topk[t * ld + j] == sel[k];
            if (!found) { route_diff++; break; }
        }
    }
    for (r = 0; r < 2; r++) rel[r] = mag > 0 ? sqrt(err[r] / mag) : sqrt(err[r]);
    free(scratch);
    free(ref);
    return route_diff;
}

/* ---------------------------------------------------------------- bench */

static int n_reps_opt, n_threads = 2;

/* One row: graph for T tokens, warm-up + timed runs + check. Returns 1 when
   the check fails. */
static int run_row(ggml_backend_t backend, const layer_t *L, int64_t T, const char *qname) {
    const shape_t *s = L->s;
    const int reps = n_reps_opt ? n_reps_opt : (T < 128 ? 9 : 5);
    struct ggml_init_params ip = {ggml_tensor_overhead() * 256 + ggml_graph_overhead(), NULL,
                                  true};
    struct ggml_context *ctx = ggml_init(ip);
    struct ggml_cgraph *gf;
    struct ggml_tensor *x, *y, *topk;
    ggml_gallocr_t galloc;
    float *xh, *yh;
    int32_t *th;
    double times[MAX_REPS], med, bytes, rel[2];
    int r, e, used = 0, route_diff, fail;
    int64_t t;
    char used_e[256];

    if (!ctx) { fprintf(stderr, "ggml_init failed\n"); exit(1); }
    gf = ggml_new_graph(ctx);
    x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, s->D, T);
    ggml_set_input(x);
    y = build_moe_ffn(ctx, gf, L, x, &topk);
    ggml_set_output(y);
    ggml_set_output(topk);
    ggml_build_forward_expand(gf, y);
    galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend));
    if (!ggml_gallocr_alloc_graph(galloc, gf)) {
        fprintf(stderr, "ggml_gallocr_alloc_graph failed\n");
        exit(1);
    }
    rng_state = 0x2545F4914F6CDD1Dull + (uint64_t)T; /* x: fixed per T */
    xh = random_floats((size_t)(T * s->D), 1.0f);
    ggml_backend_tensor_set(x, xh, 0, ggml_nbytes(x));

    if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) { /* warm-up */
        fprintf(stderr, "ggml_backend_graph_compute failed\n");
        exit(1);
    }
    yh = (float *)xmalloc(ggml_nbytes(y));
    th = (int32_t *)xmalloc(ggml_nbytes(topk));
    ggml_backend_tensor_get(y, yh, 0, ggml_nbytes(y));
    ggml_backend_tensor_get(topk, th, 0, ggml_nbytes(topk));
    for (r = 0; r < reps; r++) {
        const double t0 = now();
        const enum ggml_status st = ggml_backend_graph_compute(backend, gf);
        times[r] = now() - t0;
        if (st != GGML_STATUS_SUCCESS) { fprintf(stderr, "compute failed\n"); exit(1); }
    }
    qsort(times, (size_t)reps, sizeof(double), cmp_double);
    med = times[reps / 2];
    if (reps % 2 == 0) med = 0.5 * (times[reps / 2 - 1] + times[reps / 2]);

    /* bytes a forward must read: router, used experts, shared expert */
    memset(used_e, 0, sizeof used_e);
    for (t = 0; t < T; t++)
        for (r = 0; r < s->K; r++) used_e[th[t * topk->ne[0] + r]] = 1;
    for (e = 0; e < s->E; e++) used += used_e[e];
    bytes = 4.0 * s->E * s->D +
            (double)used * (2.0 * s->F * ggml_row_size(L->type, s->D) +
                            (double)s->D * ggml_row_size(L->type, s->F)) +
            (s->Fs ? 4.0 * (3.0 * s->Fs * s->D + s->D) : 0.0);

    route_diff = check_rows(L, xh, yh, th, topk->ne[0], T, rel);
    fail = !(rel[0] < TOL_F32) || !(rel[1] < TOL_Q8) || route_diff;
    printf("%-14s %5d  %-5s %-10s %10.3f  %8.3f-%-8.3f %7.1f  %8.1e %8.1e %s%s\n", s->name,
           (int)T, qname, L->exp_buft, 1e3 * med, 1e3 * times[0], 1e3 * times[reps - 1],
           bytes / med * 1e-9, rel[0], rel[1], fail ? "FAIL" : "ok",
           route_diff ? " (routing differs)" : "");
    fflush(stdout);
    free(xh);
    free(yh);
    free(th);
    ggml_gallocr_free(galloc);
    ggml_free(ctx);
    return fail;
}

/* ggml's log to stderr, without its debug lines (one per repacked tensor) */
static void log_cb(enum ggml_log_level level, const char *text, void *user_data) {
    static int last_debug;
    (void)user_data;
    if (level == GGML_LOG_LEVEL_DEBUG || (level == GGML_LOG_LEVEL_CONT && last_debug)) {
        last_debug = 1;
        return;
    }
    last_debug = 0;
    fputs(text, stderr);
}

static int parse_list(const char *arg, char items[][16], int max) {
    int n = 0;
    while (*arg && n < max) {
        size_t len = strcspn(arg, ",");
        if (len == 0 || len >= 16) return -1;
        memcpy(items[n], arg, len);
        items[n++][len] = 0;
        arg += len + (arg[len] == ',');
    }
    return *arg ? -1 : n;
}

int main(int argc, char **argv) {
    static const int default_T[4] = {1, 16, 128, 1024};
    int Ts[MAX_LIST], nT = 4, use_q[4] = {1, 1, 1, 1}, repack = 1, failures = 0;
    const char *only_shape = NULL;
    char items[MAX_LIST][16];
    ggml_backend_t backend;
    int i, j, si, qi;
    memcpy(Ts, default_T, sizeof default_T);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--no-repack") == 0) { repack = 0; continue; }
        if (!v) { fprintf(stderr, "%s: missing value (see the header of %s)\n", a, __FILE__);
                  return 2; }
        i++;
        if (strcmp(a, "--T") == 0) {
            nT = parse_list(v, items, MAX_LIST);
            for (j = 0; j < nT; j++)
                if ((Ts[j] = atoi(items[j])) < 1 || Ts[j] > 65536) nT = -1;
            if (nT < 1) { fprintf(stderr, "--T: comma list of 1..65536\n"); return 2; }
        } else if (strcmp(a, "--shape") == 0) {
            only_shape = v;
            for (si = 0; si < 3 && strcmp(v, shapes[si].name) != 0; si++) {}
            if (si == 3) {
                fprintf(stderr, "--shape: mixtral-mini, deepseek-mini or qwen-mini\n");
                return 2;
            }
        } else if (strcmp(a, "--qtype") == 0) {
            const int n = parse_list(v, items, MAX_LIST);
            memset(use_q, 0, sizeof use_q);
            for (j = 0; j < n; j++) {
                for (qi = 0; qi < 4 && strcmp(items[j], qtypes[qi].name) != 0; qi++) {}
                if (qi == 4) break;
                use_q[qi] = 1;
            }
            if (n < 1 || j < n) {
                fprintf(stderr, "--qtype: comma list of q8_0, q4_0, q4_k, mxfp4\n");
                return 2;
            }
        } else if (strcmp(a, "--reps") == 0) {
            n_reps_opt = atoi(v);
            if (n_reps_opt < 1 || n_reps_opt > MAX_REPS) {
                fprintf(stderr, "--reps: 1..%d\n", MAX_REPS);
                return 2;
            }
        } else if (strcmp(a, "--threads") == 0) {
            n_threads = atoi(v);
            if (n_threads < 1) { fprintf(stderr, "--threads: >= 1\n"); return 2; }
        } else {
            fprintf(stderr, "unknown option %s (--T, --shape, --qtype, --reps, --threads, "
                            "--no-repack)\n", a);
            return 2;
        }
    }

    ggml_log_set(log_cb, NULL);
    ggml_cpu_init();
    backend = ggml_backend_cpu_init();
    if (!backend) { fprintf(stderr, "ggml_backend_cpu_init failed\n"); return 1; }
    ggml_backend_cpu_set_n_threads(backend, n_threads);
    printf("ggml %s (%s) CPU backend, %d threads, expert weights %s; avx2 %d avx512 %d "
           "avx512_vnni %d amx_int8 %d\n", ggml_version(), ggml_commit(), n_threads,
           repack ? "in llama.cpp's buffer choice" : "unpacked (--no-repack)",
           ggml_cpu_has_avx2(), ggml_cpu_has_avx512(), ggml_cpu_has_avx512_vnni(),
           ggml_cpu_has_amx_int8());
    printf("router and shared expert fp32; median of N timed runs after one warm-up; check: "
           "tokens 0, T-1 vs plain C, ||diff|| / ||ref|| (tol f32-ref %.0e, q8-ref %.0e)\n",
           TOL_F32, TOL_Q8);
    printf("%-14s %5s  %-5s %-10s %10s  %-17s %7s  %8s %8s %s\n", "shape", "T", "type",
           "weights", "median ms", "min-max ms", "GB/s", "f32-ref", "q8-ref", "check");
    for (si = 0; si < 3; si++) {
        if (only_shape && strcmp(only_shape, shapes[si].name) != 0) continue;
        for (qi = 0; qi < 4; qi++) {
            layer_t L;
            if (!use_q[qi]) continue;
            if (shapes[si].D % ggml_blck_size(qtypes[qi].type) ||
                shapes[si].F % ggml_blck_size(qtypes[qi].type)) {
                printf("%-14s %5s  %-5s skipped: rows of %d or %d not whole %d-blocks\n",
                       shapes[si].name, "-", qtypes[qi].name, shapes[si].D, shapes[si].F,
                       (int)ggml_blck_size(qtypes[qi].type));
                continue;
            }
            L = make_layer(&shapes[si], qtypes[qi].type, repack);
            for (j = 0; j < nT; j++) failures += run_row(backend, &L, Ts[j], qtypes[qi].name);
            free_layer(&L);
        }
    }
    ggml_backend_free(backend);
    ggml_quantize_free();
    if (failures) printf("%d row(s) failed the check\n", failures);
    return failures ? 1 : 0;
}
