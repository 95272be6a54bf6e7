/* bench/moe_bench.c -- MoE layer forward / forward+backward timings, CPU, and
   per-stage microbenchmarks of the same layer (--stage).
   build: make bench
   run:   ./build/moe_bench [options] [variants] [max_T] [json]
   variants: one number or a comma list (bench/run_bench.sh: 2,6,3,5,4)
   variant 0: moe.h reference forward (cfg.isa = MOE_ISA_REFERENCE)
   variant 1: moe.h reference forward + backward (training cache, recompute = 0)
   variant 2: SIMD forward on packed weights (moe_pack_weights once)      <- moe.h
   variant 3: SIMD forward on unpacked weights (each used expert packed per call)
   variant 4: SIMD forward (packed) + backward
   variant 5: OpenBLAS per-expert loop (peer; sgemm, or sgemv for one token;
              routing by moe_route), built with -DMOE_BENCH_OPENBLAS -lopenblas;
              its output is checked against moe_forward once per shape
   variant 6: SIMD forward on packed bf16 weights (cfg.pack_bf16)
   Shapes, each at T = 1, 16, 128, 1024 (up to max_T); 2 threads are the
   target machine (the reference path is serial):
     mixtral-mini   D=1024 F=3584 E=8  K=2 SwiGLU, softmax, renormalised
     deepseek-mini  D=1024 F=512  E=64 K=6 SwiGLU, softmax, no renormalisation
     qwen-mini      D=1024 F=384  E=60 K=4 SwiGLU, softmax, no renormalisation,
                    + shared expert Fs=1536 gated by sigmoid(x . w_sg): the
                    Qwen1.5-MoE-A2.7B layout (Fs = 4F) at half its width
   Machine ceilings, measured once per process before the shapes, with the
   OpenMP threads the variants use (OMP_NUM_THREADS):
     FMA peak   independent register-resident FMAs (12 accumulators, widest
                vector this build has), GFLOP/s with an FMA = 2 FLOPs; also
                on 1 thread, and a warning when the two do not scale (busy box)
     read bw    sum of a 1 GiB array (>> L3), first-touched by the same
                threads, GB/s
     sgemm      (OpenBLAS builds) one 2048^3 cblas_sgemm, GFLOP/s: the rate
                a tuned BLAS gets here, for the T=1024 target
   Environment: MOE_BENCH_T=n runs only T = n, MOE_BENCH_SHAPE=name only that
   shape (quick experiments; the recorded runs use neither).
   Each row: median and min-max of N timed runs after one warm-up, warm caches
   (N = 7 below T = 128, else 3);
     GFLOP/s  the FLOPs actually done (router + 3 GEMMs per processed pair +
              shared expert; forward+backward counts 3x the forward)
     GB/s     weight bytes a forward must read at least (router + every used
              expert + shared expert; bf16 for variant 6) / median time;
              activations are not counted (small next to the weights)
     %peak    GFLOP/s / FMA peak;   %bw   GB/s / read bandwidth
   Output: a table, and with a third argument JSON lines appended to that
   file: one {"type": "ceiling"} row, then one {"type": "result"} row per
   (variant, shape, T). bench/plot_roofline.py draws them.
   Options (anywhere among the arguments; without them the run is as above):
     --stage LIST  time stages of the layer alone instead of the layer:
                   router, topk, dispatch, ffn, combine, backward, comma
                   separated, or all (see "Stages" below)
     --reps N      N timed runs per row instead of 7 / 3 (1..100)
     --T LIST      these token counts (comma list) instead of 1, 16, 128,
                   1024 up to max_T (max_T is then unused: give any number
                   when a json file follows)
     --shape NAME  only this shape
     --qtype NAME  routed experts quantized with moe_quantize to q8_0, q4_0,
                   q4_k or mxfp4 (router and shared expert stay fp32), for
                   variants 0 (reference: decode, then fp32), 2 (packed from
                   the blocks into fp32 panels; experts of up to 16 rows
                   still run as integer dots on the blocks) and 3 (unpacked:
                   integer dots for experts of up to 16 rows, else decoded
                   into panels per call); GB/s counts the blocks' bytes for
                   variant 3, the panels' for variant 2. A shape
                   whose rows are not whole blocks is skipped (Q4_K needs
                   multiples of 256)
     --qpack 1     with --qtype: moe_qpack_weights once, w.qpacked set (the
                   decode layout the integer dots read where the build has
                   AVX-512 + BW: with every expert matrix on it, experts of
                   any number of rows run its dots), for variants 2 and 3
   Stages (--stage): the same shapes, T values, variants, timing loop,
   ceilings and columns; one row per (stage, shape, T), JSON rows of type
   "stage" with a "stage" field. Each (variant, shape, T) first runs one
   moe_forward (not timed), whose workspace and info hold what every stage
   reads; then each stage is timed alone on them. Variants pick the path:
   0 and 1 the reference ISA, 2 and 4 SIMD on packed fp32 weights, 3 SIMD
   unpacked (the ffn stage packs each used expert per call, as variant 3
   does), 6 SIMD on packed bf16; variant 5 has no stages. The stages, and how
   FLOPs and bytes are counted (N = kept (token, expert) pairs = rows of the
   grouped FFN, S = slots per token (K), "used" = experts with a row, 4-byte
   floats, 8-byte row indices, each array counted once as read or written:
   the least traffic the stage needs, not what the cache hierarchy sees):
     router    logits = x . Wr^T (T x D x E; SIMD: Wr transposed per call).
               FLOPs 2 T D E; bytes Wr + x + logits.
     topk      moe_route (public API) from the forward's logits: scores,
               top-k, groups, capacity, weights, aux losses. FLOPs: none
               counted (compares, exp and divides, no FMA work: GFLOP/s and
               %peak print "-"); bytes logits + scores [T][E], expert, weight
               and dropped [T][S], two [E] counts.
     dispatch  counting sort of the kept pairs into expert-contiguous rows,
               then the gather of x rows. FLOPs none; bytes N rows of x read
               and written to the row buffer, expert + dropped [T][S] read,
               pair_row [T][S] and row_pair [N] written.
     ffn       the grouped expert FFNs on the dispatched rows (SIMD or
               reference, packed where the variant packs), then the shared
               expert's FFN on every token. FLOPs 2 D F per GEMM per row (3
               GEMMs with a GLU, else 2) over N rows, and T rows of the shared
               expert; bytes the used experts' and the shared expert's weights
               (2 bytes each for variant 6) + rows in and out (N D and T D
               each); hidden activations not counted.
     combine   y[t] = sum_j weight[t][j] out[row(t, j)] in slot order, then
               y += gamma_t * shared_out[t]. FLOPs 2 N D (+ 2 T D with a shared
               expert); bytes out rows N D, y T D, weight + pair_row [T][S]
               (+ shared_out T D and gamma T).
     backward  moe_backward (public API) after one training forward (not
               timed; cfg.save_for_backward = 1, recompute = 0, gradients accumulate).
               FLOPs 2x the forward's (each GEMM's dX and dW products, router
               and shared gate included); bytes every used weight read and its
               gradient read and written (12 bytes an element) + x, dy read and
               dx written; the forward's cache is not counted.
   The shared expert's gate sigmoid(x . w_sg) (T x D) is in no stage. Stage
   rows print ms to 4 decimals; %bw is against the DRAM read rate, so a stage
   whose data sit in cache (small T, warm runs) can show more than 100. A stage
   that fails (non-OK status, or an output that differs from the forward's:
   router logits, topk routing, dispatch rows, ffn outputs, combine y; the
   workspace arrays are cleared before a stage's runs, so it must write them)
   ends the run with exit status 1.                                          */
#define _POSIX_C_SOURCE 199309L
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#  include <omp.h>
#endif
#ifdef MOE_BENCH_OPENBLAS
#  include <cblas.h>
#endif

/* The widest float vector this build has, for the ceiling loops. */
#if defined(__AVX512F__)
#  include <immintrin.h>
typedef __m512 vf;
#  define VW 16
#  define ISA_NAME "avx512f"
#  define VSET(a) _mm512_set1_ps(a)
#  define VFMA(acc, a, b) _mm512_fmadd_ps(a, b, acc)
#  define VLOAD(p) _mm512_loadu_ps(p)
#  define VADD(a, b) _mm512_add_ps(a, b)
#  define VSTORE(p, a) _mm512_storeu_ps(p, a)
#elif defined(__AVX2__) && defined(__FMA__)
#  include <immintrin.h>
typedef __m256 vf;
#  define VW 8
#  define ISA_NAME "avx2+fma"
#  define VSET(a) _mm256_set1_ps(a)
#  define VFMA(acc, a, b) _mm256_fmadd_ps(a, b, acc)
#  define VLOAD(p) _mm256_loadu_ps(p)
#  define VADD(a, b) _mm256_add_ps(a, b)
#  define VSTORE(p, a) _mm256_storeu_ps(p, a)
#elif defined(__ARM_NEON)
#  include <arm_neon.h>
typedef float32x4_t vf;
#  define VW 4
#  define ISA_NAME "neon"
#  define VSET(a) vdupq_n_f32(a)
#  define VFMA(acc, a, b) vfmaq_f32(acc, a, b)
#  define VLOAD(p) vld1q_f32(p)
#  define VADD(a, b) vaddq_f32(a, b)
#  define VSTORE(p, a) vst1q_f32(p, a)
#else
typedef float vf;
#  define VW 1
#  define ISA_NAME "scalar"
#  define VSET(a) (a)
#  define VFMA(acc, a, b) ((acc) + (a) * (b))
#  define VLOAD(p) (*(p))
#  define VADD(a, b) ((a) + (b))
#  define VSTORE(p, a) (*(p) = (a))
#endif

static uint64_t state = 0x9E3779B97F4A7C15ull;
static float *tensor(size_t n, float scale) {
    float *p = (float *)malloc(n * sizeof(float));
    size_t i;
    if (!p) { fprintf(stderr, "out of memory\n"); exit(1); }
    for (i = 0; i < n; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = scale * ((float)((state >> 40) * (1.0 / 8388608.0)) - 1.0f);
    }
    return p;
}
static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static int num_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* ---- machine ceilings ---------------------------------------------------- */
typedef struct ceilings {
    double peak_gflops, peak1_gflops, read_gbs, sgemm_gflops;
    int threads;
} ceilings;
static volatile float sink;   /* keeps the ceiling loops' results alive */

/* 12 independent FMA chains per thread: enough to cover latency x ports
   (4-5 cycles x 2 FMA pipes on Zen / Intel) so the loop is throughput-bound. */
#define NACC 12
#define ITERS (1L << 23)
static double fma_peak(int nt) {
    double best = 1e30;
    int rep;
    for (rep = 0; rep < 10; rep++) {   /* best of 10 short runs: the first also wakes the threads */
        const double t0 = now();
        double dt;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
        {
            const vf a = VSET(0.999999f), b = VSET(1e-7f);
            vf c0 = VSET(0.0f), c1 = VSET(0.1f), c2 = VSET(0.2f), c3 = VSET(0.3f), c4 = VSET(0.4f),
               c5 = VSET(0.5f), c6 = VSET(0.6f), c7 = VSET(0.7f), c8 = VSET(0.8f), c9 = VSET(0.9f),
               c10 = VSET(1.0f), c11 = VSET(1.1f);
            float out[VW];
            long i;
            for (i = 0; i < ITERS; i++) {
                c0 = VFMA(c0, a, b); c1 = VFMA(c1, a, b); c2 = VFMA(c2, a, b);
                c3 = VFMA(c3, a, b); c4 = VFMA(c4, a, b); c5 = VFMA(c5, a, b);
                c6 = VFMA(c6, a, b); c7 = VFMA(c7, a, b); c8 = VFMA(c8, a, b);
                c9 = VFMA(c9, a, b); c10 = VFMA(c10, a, b); c11 = VFMA(c11, a, b);
            }
            c0 = VADD(VADD(VADD(c0, c1), VADD(c2, c3)), VADD(VADD(c4, c5), VADD(c6, c7)));
            c0 = VADD(c0, VADD(VADD(c8, c9), VADD(c10, c11)));
            VSTORE(out, c0);
            if (thread_id() == 0) sink = out[0];
        }
        dt = now() - t0;
        if (dt < best) best = dt;
    }
    return 2.0 * NACC * VW * (double)ITERS * nt / best * 1e-9;
}

/* Each thread sums its own contiguous chunk (which it also first-touched),
   4 vector accumulators so the adds do not limit the loads. */
#define BW_BYTES ((size_t)1 << 30)
static double read_bw(int nt) {
    const size_t n = BW_BYTES / sizeof(float), chunk = n / (size_t)nt / (4 * VW) * (4 * VW);
    float *a = (float *)malloc(n * sizeof(float));
    double best = 1e30;
    int rep;
    if (!a) { fprintf(stderr, "out of memory (read-bandwidth array)\n"); exit(1); }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
        float *p = a + (size_t)thread_id() * chunk;
        size_t i;
        for (i = 0; i < chunk; i++) p[i] = 1.0f;
    }
    for (rep = 0; rep < 5; rep++) {
        const double t0 = now();
        double dt;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
        {
            const float *p = a + (size_t)thread_id() * chunk;
            vf s0 = VSET(0.0f), s1 = VSET(0.0f), s2 = VSET(0.0f), s3 = VSET(0.0f);
            float out[VW];
            size_t i;
            for (i = 0; i < chunk; i += 4 * VW) {
                s0 = VADD(s0, VLOAD(p + i)); s1 = VADD(s1, VLOAD(p + i + VW));
                s2 = VADD(s2, VLOAD(p + i + 2 * VW)); s3 = VADD(s3, VLOAD(p + i + 3 * VW));
            }
            VSTORE(out, VADD(VADD(s0, s1), VADD(s2, s3)));
            if (thread_id() == 0) sink = out[0];
        }
        dt = now() - t0;
        if (dt < best) best = dt;
    }
    free(a);
    return (double)chunk * nt * sizeof(float) / best * 1e-9;
}

#ifdef MOE_BENCH_OPENBLAS
/* OpenBLAS's own rate on one big square sgemm (n = 2048, best of 5): what a
   tuned BLAS gets from this machine, the yardstick of the T=1024 target. */
static double blas_sgemm_rate(void) {
    const int n = 2048;
    float *a = (float *)malloc((size_t)n * n * sizeof(float));
    float *b = (float *)malloc((size_t)n * n * sizeof(float));
    float *c = (float *)calloc((size_t)n * n, sizeof(float));
    double best = 1e30;
    size_t i;
    int rep;
    /* not tensor(): its random stream makes the shapes' data, which must not
       depend on whether this ceiling ran (the peer check compares routings) */
    for (i = 0; i < (size_t)n * n; i++) {
        a[i] = (float)(i % 97) * 1e-3f;
        b[i] = (float)(i % 89) * 1e-3f;
    }
    for (rep = 0; rep < 6; rep++) {   /* the first one warms up */
        const double t0 = now();
        double dt;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f,
                    c, n);
        dt = now() - t0;
        if (rep > 0 && dt < best) best = dt;
    }
    sink = c[12345];
    free(a); free(b); free(c);
    return 2.0 * n * (double)n * n / best * 1e-9;
}
#endif

static ceilings measure_ceilings(FILE *json) {
    ceilings c;
    c.threads = num_threads();
    c.peak1_gflops = fma_peak(1);
    c.peak_gflops = c.threads > 1 ? fma_peak(c.threads) : c.peak1_gflops;
    c.read_gbs = read_bw(c.threads);
    c.sgemm_gflops = 0.0;
    printf("# ceilings (measured now, %d threads): FMA peak %.1f GFLOP/s (%s, %d floats; "
           "1 thread %.1f), read %.1f GB/s (sum of 1 GiB)\n", c.threads, c.peak_gflops, ISA_NAME,
           VW, c.peak1_gflops, c.read_gbs);
#ifdef MOE_BENCH_OPENBLAS
    c.sgemm_gflops = blas_sgemm_rate();
    printf("# OpenBLAS sgemm 2048^3 (same threads): %.1f GFLOP/s = %.1f %% of the FMA peak\n",
           c.sgemm_gflops, 100.0 * c.sgemm_gflops / c.peak_gflops);
#endif
    /* FMA throughput scales with cores; if it does not, another job holds one and
       every figure of this run (ceilings and rows) is suspect */
    if (c.peak_gflops < 0.8 * c.threads * c.peak1_gflops)
        printf("# WARNING: the %d-thread peak is only %.1fx the 1-thread peak: "
               "the machine is busy\n", c.threads, c.peak_gflops / c.peak1_gflops);
    if (json)
        fprintf(json, "{\"type\": \"ceiling\", \"threads\": %d, \"isa\": \"%s\", "
                      "\"vector_floats\": %d, \"peak_gflops\": %.3f, "
                      "\"peak_1thread_gflops\": %.3f, \"read_gbs\": %.3f, \"read_bytes\": %lu, "
                      "\"blas_sgemm_gflops\": %.3f}\n",
                c.threads, ISA_NAME, VW, c.peak_gflops, c.peak1_gflops, c.read_gbs,
                (unsigned long)BW_BYTES, c.sgemm_gflops);
    return c;
}

#ifdef MOE_BENCH_OPENBLAS
/* The OpenBLAS peer: router sgemm, moe.h's routing, then per expert a gather,
   gate/up sgemm (sgemv for one token), SiLU * up, down sgemm, weighted
   scatter into y in slot order; the shared expert on all tokens, scaled by
   its sigmoid gate. What a careful C user writes with a BLAS. */
typedef struct blas_peer {
    float *logits, *xg, *hg, *hu, *out, *sh_g, *sh_u, *sh_out, *sh_z;
    void *route_ws;
    moe_info info;
} blas_peer;

/* Y[n][out] = X[n][in] . W[out][in]^T; sgemv for one row, as a BLAS user would */
static void linear(int n, int out, int in, const float *X, const float *W, float *Y) {
    if (n == 1) cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, W, in, X, 1, 0.0f, Y, 1);
    else cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, X, in, W, in, 0.0f,
                     Y, out);
}
static void swiglu(float *g, const float *u, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void blas_forward(const moe_config *cfg, const moe_weights *w, const float *x, int T,
                         float *y, blas_peer *P) {
    const int D = cfg->d_model, F = cfg->d_ff, E = cfg->num_experts, K = cfg->top_k;
    const int Fs = cfg->shared_d_ff;
    size_t bytes;
    int e, t, j, d;
    linear(T, E, D, x, w->router, P->logits);
    moe_route_workspace_size(cfg, T, &bytes);
    moe_route(cfg, w, P->logits, NULL, T, &P->info, P->route_ws, bytes);
    memset(y, 0, (size_t)T * D * sizeof(float));
    for (e = 0; e < E; e++) {
        int n = 0;
        for (t = 0; t < T; t++)
            for (j = 0; j < K; j++)
                if (P->info.expert[t * K + j] == e)
                    memcpy(P->xg + (size_t)n++ * D, x + (size_t)t * D, (size_t)D * sizeof(float));
        if (n == 0) continue;
        linear(n, F, D, P->xg, w->gate + (size_t)e * F * D, P->hg);
        linear(n, F, D, P->xg, w->up + (size_t)e * F * D, P->hu);
        swiglu(P->hg, P->hu, (size_t)n * F);
        linear(n, D, F, P->hg, w->down + (size_t)e * D * F, P->out);
        n = 0;
        for (t = 0; t < T; t++)
            for (j = 0; j < K; j++)
                if (P->info.expert[t * K + j] == e) {
                    const float wt = P->info.weight[t * K + j];
                    for (d = 0; d < D; d++) y[(size_t)t * D + d] += wt * P->out[(size_t)n * D + d];
                    n++;
                }
    }
    if (Fs > 0) {
        linear(T, Fs, D, x, w->shared_gate, P->sh_g);
        linear(T, Fs, D, x, w->shared_up, P->sh_u);
        swiglu(P->sh_g, P->sh_u, (size_t)T * Fs);
        linear(T, D, Fs, P->sh_g, w->shared_down, P->sh_out);
        if (cfg->shared_expert_gated) linear(T, 1, D, x, w->shared_expert_gate, P->sh_z);
        for (t = 0; t < T; t++) {
            const float g = cfg->shared_expert_gated ? 1.0f / (1.0f + expf(-P->sh_z[t])) : 1.0f;
            for (d = 0; d < D; d++) y[(size_t)t * D + d] += g * P->sh_out[(size_t)t * D + d];
        }
    }
}
#endif

static const char *const variant_names[7] = {
    "moe.h reference forward", "moe.h reference forward+backward", "moe.h SIMD forward, packed",
    "moe.h SIMD forward, unpacked", "moe.h SIMD forward (packed) + backward",
    "OpenBLAS per-expert loop", "moe.h SIMD forward, packed bf16"};

/* Timed runs per row: --reps, else 7 below T = 128 and 3 from there. */
#define MAX_REPS 100
static int reps_opt = 0;
static int reps_for(int T) { return reps_opt > 0 ? reps_opt : T >= 128 ? 3 : 7; }

static void *xmalloc(size_t n) {
    void *p = malloc(n > 0 ? n : 1);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(1); }
    return p;
}

/* The layer's tensors in moe_grads names (gradients: scale 0), always in this
   order: a shape's data depend only on the order of the tensor() calls. */
static void layer_tensors(const moe_config *cfg, moe_grads *t, float scale) {
    const size_t D = (size_t)cfg->d_model, F = (size_t)cfg->d_ff, E = (size_t)cfg->num_experts;
    const size_t Fs = (size_t)cfg->shared_d_ff;
    t->router = tensor(E * D, scale);
    t->gate = tensor(E * F * D, scale); t->up = tensor(E * F * D, scale);
    t->down = tensor(E * D * F, scale);
    if (Fs > 0) {
        t->shared_gate = tensor(Fs * D, scale); t->shared_up = tensor(Fs * D, scale);
        t->shared_down = tensor(D * Fs, scale);
        if (cfg->shared_expert_gated) t->shared_expert_gate = tensor(D, scale);
    }
}
static void weights_of(const moe_grads *t, moe_weights *w) {
    w->router = t->router; w->gate = t->gate; w->up = t->up; w->down = t->down;
    w->shared_gate = t->shared_gate; w->shared_up = t->shared_up; w->shared_down = t->shared_down;
    w->shared_expert_gate = t->shared_expert_gate;
}
static void free_tensors(moe_grads *t) {
    free(t->router); free(t->gate); free(t->up); free(t->down);
    free(t->shared_gate); free(t->shared_up); free(t->shared_down); free(t->shared_expert_gate);
}
/* moe_pack_weights into a new buffer, set as w.packed */
static void *pack(const moe_config *cfg, moe_weights *w) {
    size_t pb = 0;
    void *packed;
    moe_pack_size(cfg, &pb);
    packed = malloc(pb);
    if (moe_pack_weights(cfg, w, packed, pb) != MOE_STATUS_OK) {
        fprintf(stderr, "pack failed\n");
        exit(1);
    }
    w->packed = packed;
    w->packed_bytes = pb;
    return packed;
}

/* --qtype: the routed experts' tensors as blocks (-1: fp32); --qpack 1: with
   their decode layout too */
static int qtype_opt = -1, qpack_opt = 0;
/* t's routed expert tensors into blocks of qtype_opt, set in w; returns the
   blocks (one allocation) or NULL when a row is not whole blocks. */
static unsigned char *quantize_experts(const moe_config *cfg, const moe_grads *t, moe_weights *w) {
    const moe_qtype q = (moe_qtype)qtype_opt;
    const size_t E = (size_t)cfg->num_experts, D = (size_t)cfg->d_model, F = (size_t)cfg->d_ff;
    const size_t rd = moe_qtype_row_bytes(q, (int64_t)D), rf = moe_qtype_row_bytes(q, (int64_t)F);
    unsigned char *b;
    if (rd == 0 || rf == 0) return NULL;
    b = (unsigned char *)malloc(E * F * rd * 2 + E * D * rf);
    if (!b) { fprintf(stderr, "out of memory\n"); exit(1); }
    if (moe_quantize(q, t->gate, (int64_t)(E * F), (int64_t)D, b, E * F * rd) ||
        moe_quantize(q, t->up, (int64_t)(E * F), (int64_t)D, b + E * F * rd, E * F * rd) ||
        moe_quantize(q, t->down, (int64_t)(E * D), (int64_t)F, b + 2 * E * F * rd, E * D * rf)) {
        fprintf(stderr, "moe_quantize failed\n");
        exit(1);
    }
    w->gate_type = w->up_type = w->down_type = q;
    w->gate_q = b; w->up_q = b + E * F * rd; w->down_q = b + 2 * E * F * rd;
    w->gate = w->up = w->down = NULL;
    return b;
}

static void run_shape(const char *name, moe_config cfg, int variant, int T, const ceilings *cl,
                      FILE *json) {
    const int D = cfg.d_model, E = cfg.num_experts, F = cfg.d_ff, Fs = cfg.shared_d_ff;
    const int runs = reps_for(T);
    moe_weights w = {0};
    moe_grads wt = {0}, g = {0};
    moe_info info = {0};
    float *x = tensor((size_t)T * D, 1.0f), *y = tensor((size_t)T * D, 0.0f);
    float *dy = tensor((size_t)T * D, 1.0f), *dx = tensor((size_t)T * D, 0.0f);
    double times[MAX_REPS], flops, med, gflops, gbs;
    size_t fb = 0, bb = 0, ib = 0;
    void *fws, *bws = NULL, *ibuf;
    int r, e, used = 0;
    double bytes_touched;
#ifdef MOE_BENCH_OPENBLAS
    blas_peer peer;
#endif
    const int backward = variant == 1 || variant == 4;
    double esize = variant == 6 ? 2.0 : 4.0, esize_routed = esize;
    void *packed = NULL, *qpacked = NULL;
    unsigned char *blocks = NULL;
    cfg.training = cfg.save_for_backward = backward;
    if (variant <= 1) cfg.isa = MOE_ISA_REFERENCE;
    layer_tensors(&cfg, &wt, 0.03f);
    weights_of(&wt, &w);
    if (qtype_opt >= 0) {
        if (!(blocks = quantize_experts(&cfg, &wt, &w))) {
            printf("%-14s %5d  %d  skipped: rows of %d and %d values are not whole %s blocks\n",
                   name, T, variant, cfg.d_model, cfg.d_ff, moe_qtype_name((moe_qtype)qtype_opt));
            free(x); free(y); free(dy); free(dx); free_tensors(&wt);
            return;
        }
        if (variant != 2)   /* packed: fp32 panels decoded from the blocks */
            esize_routed = (double)moe_qtype_row_bytes((moe_qtype)qtype_opt, cfg.d_model) /
                           cfg.d_model;
    }
    if (variant == 6) cfg.pack_bf16 = 1;
    if (variant == 2 || variant == 4 || variant == 6) packed = pack(&cfg, &w);
    if (blocks && qpack_opt && (variant == 2 || variant == 3)) {
        size_t qb = 0;
        if (moe_qpack_size(&cfg, &w, &qb) != MOE_STATUS_OK || !(qpacked = malloc(qb)) ||
            moe_qpack_weights(&cfg, &w, qpacked, qb) != MOE_STATUS_OK) {
            fprintf(stderr, "moe_qpack_weights failed\n");
            exit(1);
        }
        w.qpacked = qpacked; w.qpacked_bytes = qb;
    }
    if (backward) {
        layer_tensors(&cfg, &g, 0.0f);
        moe_backward_workspace_size(&cfg, T, &bb);
        bws = malloc(bb);
    }
    moe_forward_workspace_size(&cfg, T, &fb);
    moe_info_size(&cfg, T, &ib);
    fws = malloc(fb); ibuf = malloc(ib);
    moe_info_bind(&cfg, T, &info, ibuf, ib);
#ifdef MOE_BENCH_OPENBLAS
    if (variant == 5) {
        size_t rb = 0;
        moe_route_workspace_size(&cfg, T, &rb);
        peer.logits = tensor((size_t)T * E, 0.0f);
        peer.xg = tensor((size_t)T * cfg.top_k * D, 0.0f);
        peer.hg = tensor((size_t)T * cfg.top_k * F, 0.0f);
        peer.hu = tensor((size_t)T * cfg.top_k * F, 0.0f);
        peer.out = tensor((size_t)T * cfg.top_k * D, 0.0f);
        peer.sh_g = tensor((size_t)T * (Fs > 0 ? Fs : 1), 0.0f);
        peer.sh_u = tensor((size_t)T * (Fs > 0 ? Fs : 1), 0.0f);
        peer.sh_out = tensor((size_t)T * D, 0.0f);
        peer.sh_z = tensor((size_t)T, 0.0f);
        peer.route_ws = malloc(rb);
        peer.info = info;   /* the arrays bound above */
    }
#endif
    for (r = -1; r < runs; r++) {
        double t0 = now();
        moe_status st = MOE_STATUS_OK;
#ifdef MOE_BENCH_OPENBLAS
        if (variant == 5) {
            blas_forward(&cfg, &w, x, T, y, &peer);
            if (r >= 0) times[r] = now() - t0;
            continue;
        }
#endif
        st = moe_forward(&cfg, &w, x, T, y, &info, fws, fb);
        if (st == MOE_STATUS_OK && backward)
            st = moe_backward(&cfg, &w, x, T, &info, dy, dx, &g, bws, bb);
        if (st != MOE_STATUS_OK) { fprintf(stderr, "%s\n", moe_status_string(st)); exit(1); }
        if (r >= 0) times[r] = now() - t0;
    }
#ifdef MOE_BENCH_OPENBLAS
    if (variant == 5) {   /* a peer that computes something else would be timed for nothing */
        double err = 0.0, scale = 0.0;
        size_t i;
        if (moe_forward(&cfg, &w, x, T, dx, NULL, fws, fb) != MOE_STATUS_OK) exit(1);
        for (i = 0; i < (size_t)T * D; i++) {
            const double a = fabs((double)y[i] - dx[i]), m = fabs((double)dx[i]);
            if (a > err) err = a;
            if (m > scale) scale = m;
        }
        if (err > 1e-3 * scale) {
            fprintf(stderr, "%s T=%d: OpenBLAS peer differs from moe_forward by %g (max |y| %g)\n",
                    name, T, err, scale);
            exit(1);
        }
    }
#endif
    qsort(times, (size_t)runs, sizeof(double), cmp);
    flops = 2.0 * T * D * E;
    for (e = 0; e < E; e++) {
        flops += 6.0 * info.expert_kept[e] * D * F;
        used += info.expert_kept[e] > 0;
    }
    if (Fs > 0) flops += 6.0 * T * D * Fs + (cfg.shared_expert_gated ? 2.0 * T * D : 0.0);
    if (backward) flops *= 3.0;
    /* weight bytes a forward must read at least: the router, every used expert
       and the shared expert (its gate vector stays fp32) */
    bytes_touched = 4.0 * E * D + esize_routed * 3.0 * used * D * F;
    if (Fs > 0) bytes_touched += esize * 3.0 * D * Fs + (cfg.shared_expert_gated ? 4.0 * D : 0.0);
    med = times[runs / 2];
    gflops = flops / med * 1e-9;
    gbs = bytes_touched / med * 1e-9;
    printf("%-14s %5d  %d  %10.2f  %9.2f-%-9.2f %7.2f %7.2f %6.1f %6.1f\n", name, T, variant,
           1e3 * med, 1e3 * times[0], 1e3 * times[runs - 1], gflops, gbs,
           100.0 * gflops / cl->peak_gflops, 100.0 * gbs / cl->read_gbs);
    fflush(stdout);
    if (json)
        fprintf(json, "{\"type\": \"result\", \"impl\": \"%s\", \"pass\": \"%s\", "
                      "\"qtype\": \"%s\", "
                      "\"shape\": \"%s\", \"T\": %d, \"variant\": %d, \"median_ms\": %.4f, "
                      "\"min_ms\": %.4f, \"max_ms\": %.4f, \"flop\": %.6g, \"weight_bytes\": %.6g, "
                      "\"gflops\": %.3f, \"weight_gbs\": %.3f, \"pct_peak\": %.2f, "
                      "\"pct_bw\": %.2f}\n",
                variant_names[variant], backward ? "fwd+bwd" : "fwd",
                moe_qtype_name(qtype_opt >= 0 ? (moe_qtype)qtype_opt : MOE_QTYPE_F32), name, T,
                variant, 1e3 * med,
                1e3 * times[0], 1e3 * times[runs - 1], flops, bytes_touched, gflops, gbs,
                100.0 * gflops / cl->peak_gflops, 100.0 * gbs / cl->read_gbs);
    free(x); free(y); free(dy); free(dx); free(fws); free(bws); free(ibuf);
    free_tensors(&wt); free_tensors(&g); free(packed); free(blocks); free(qpacked);
#ifdef MOE_BENCH_OPENBLAS
    if (variant == 5) {
        free(peer.logits); free(peer.xg); free(peer.hg); free(peer.hu); free(peer.out);
        free(peer.sh_g); free(peer.sh_u); free(peer.sh_out); free(peer.sh_z); free(peer.route_ws);
    }
#endif
}

/* ==== stage adapter: the bench's only calls into moe.h's internals ===========
   moe.h has no public call for the router GEMM, the dispatch, the grouped
   expert FFN or the combine alone, so --stage reaches them through moe.h's
   internal moe__* functions and types (this file defines MOE_IMPLEMENTATION).
   Every such use is in this section, and nothing outside it names a moe__ or
   MOE__ identifier: when the internals are renamed, only this section changes.
   The stages run on the workspace of a moe_forward of the same config and T
   (which filled it), at the offsets of moe.h's own planner.
   topk and backward need no adapter: moe_route and moe_backward are public. */
typedef struct stage_ws {
    moe_config c;        /* resolved, as moe_forward resolves it */
    moe__ws ws;          /* the forward workspace's typed arrays */
} stage_ws;

static moe_status stage_bind(stage_ws *s, const moe_config *cfg, int32_t T, void *workspace) {
    moe__layout L;
    moe_status st = moe_config_resolve(cfg, &s->c);
    if (st == MOE_STATUS_OK) st = moe__plan(&s->c, T, MOE__PLAN_FORWARD, &L);
    if (st == MOE_STATUS_OK) s->ws = moe__ws_bind(&L, moe__align_ptr(workspace));
    return st;
}
/* router: logits [T][E] = x . Wr^T into the workspace (SIMD: Wr transposed there first) */
static void stage_router(const stage_ws *s, const moe_weights *w, const float *x, int32_t T) {
    moe__router_logits_ref(&s->c, w, x, T, &s->ws);
}
/* dispatch: counting sort of the kept pairs into expert-contiguous rows, gather of x rows */
static void stage_dispatch(const stage_ws *s, const float *x, int32_t T, const moe_info *info) {
    moe__expert_inputs(&s->c, x, T, info->expert, info->dropped, NULL, &s->ws);
}
/* ffn: the grouped expert FFNs on the dispatched rows, then the shared expert on
   every token (moe__experts_stage without its first step, moe__expert_inputs) */
static void stage_ffn(const stage_ws *s, const moe_weights *w, const float *x, int32_t T) {
    moe__experts_ffn(&s->c, w, x, T, &s->ws);
}
/* combine: y[t] = sum_j weight[t][j] out[row(t, j)], slots in order; then the shared
   expert's y[t] += gamma_t sh_out[t] (gamma: the forward's sigmoid gates) */
static void stage_combine(const stage_ws *s, float *y, int32_t T, const moe_info *info) {
    const moe_config *c = &s->c;
    moe__combine(c, y, s->ws.out, info->weight, s->ws.pair_row, T, s->ws.S, c->d_model);
    if (c->shared_d_ff > 0)
        moe__add_shared(y, s->ws.sh_out, c->shared_expert_gated ? s->ws.sh_gamma : NULL, T,
                        c->d_model);
}
/* The float arrays a stage writes in the workspace, for the bench's check (it keeps
   the forward's copy, clears them before timing and compares after): router the
   logits, dispatch the gathered rows xg, ffn the rows' outputs and the shared expert's
   (rows: the kept pairs). which: 0 router, 1 dispatch, 2 ffn. */
typedef struct stage_out { float *p[2]; size_t n[2]; } stage_out;
static stage_out stage_outputs(const stage_ws *s, int which, int32_t T, size_t rows) {
    const size_t D = (size_t)s->c.d_model;
    stage_out o;
    memset(&o, 0, sizeof o);
    if (which == 0) {
        o.p[0] = s->ws.logits; o.n[0] = (size_t)T * (size_t)s->ws.R;
    } else if (which == 1) {
        o.p[0] = s->ws.xg; o.n[0] = rows * D;
    } else {
        o.p[0] = s->ws.out; o.n[0] = rows * D;
        if (s->c.shared_d_ff > 0) {
            o.p[1] = s->ws.sh_out; o.n[1] = (size_t)T * D;
        }
    }
    return o;
}
/* ==== end of the stage adapter ============================================== */

enum { ST_ROUTER, ST_TOPK, ST_DISPATCH, ST_FFN, ST_COMBINE, ST_BACKWARD, N_STAGES };
static const char *const stage_names[N_STAGES] = {"router", "topk", "dispatch", "ffn", "combine",
                                                  "backward"};
/* what the stages run, by variant: 0/1 and 2/4 are the same path here */
static const char *const stage_paths[7] = {
    "moe.h reference", "moe.h reference", "moe.h SIMD, packed", "moe.h SIMD, unpacked",
    "moe.h SIMD, packed", "", "moe.h SIMD, packed bf16"};

/* What one (variant, shape, T) gives its stages: the forward's info and
   workspace (ws), and for backward the training forward's info (tinfo). */
typedef struct stage_run {
    moe_config cfg, cfg_train;
    moe_weights w;
    moe_grads g;
    const float *x, *dy;
    float *y, *y_fwd, *dx;
    moe_info info, rinfo, tinfo;
    stage_ws ws;
    void *rws, *bws;
    size_t rb, bb;
    int T;
} stage_run;

static moe_status stage_call(int stage, stage_run *R) {
    const int T = R->T;
    switch (stage) {
    case ST_ROUTER: stage_router(&R->ws, &R->w, R->x, T); return MOE_STATUS_OK;
    case ST_TOPK:
        return moe_route(&R->cfg, &R->w, R->info.logits, NULL, T, &R->rinfo, R->rws, R->rb);
    case ST_DISPATCH: stage_dispatch(&R->ws, R->x, T, &R->info); return MOE_STATUS_OK;
    case ST_FFN: stage_ffn(&R->ws, &R->w, R->x, T); return MOE_STATUS_OK;
    case ST_COMBINE: stage_combine(&R->ws, R->y, T, &R->info); return MOE_STATUS_OK;
    default:
        return moe_backward(&R->cfg_train, &R->w, R->x, T, &R->tinfo, R->dy, R->dx, &R->g,
                            R->bws, R->bb);
    }
}

/* max |a - b| over max |b| (0 when both are 0) */
static double rel_diff(const float *a, const float *b, size_t n) {
    double err = 0.0, scale = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        const double d = fabs((double)a[i] - b[i]), m = fabs((double)b[i]);
        if (d > err) err = d;
        if (m > scale) scale = m;
    }
    return scale > 0.0 ? err / scale : err;
}

static void check_err(double err, int stage, const stage_run *R, const char *name) {
    if (err > 1e-4) {
        fprintf(stderr, "stage %s, %s T=%d: differs from moe_forward's by %g (relative)\n",
                stage_names[stage], name, R->T, err);
        exit(1);
    }
}

/* A stage whose output is not the forward's would be timed for nothing. Its outputs are
   compared with what moe_forward gave: topk's routing and combine's y here (they write
   their own buffers); router, dispatch and ffn write the forward's workspace, so
   time_stage clears those arrays first and compares them with the forward's copy. */
static void stage_check(int stage, const stage_run *R, const char *name) {
    const size_t T = (size_t)R->T, D = (size_t)R->cfg.d_model;
    const size_t TS = T * (size_t)moe_routing_slots(&R->cfg);
    double err = 0.0;
    if (stage == ST_TOPK)
        err = memcmp(R->rinfo.expert, R->info.expert, TS * sizeof(int32_t)) != 0
              ? 1.0 : rel_diff(R->rinfo.weight, R->info.weight, TS);
    if (stage == ST_COMBINE) err = rel_diff(R->y, R->y_fwd, T * D);
    check_err(err, stage, R, name);
}

/* FLOPs and bytes of one stage, counted as the comment at the top says. esize:
   bytes of an expert weight as the ffn stage reads it (4, or 2 with bf16 panels). */
static void stage_cost(int stage, const moe_config *c, int T, const moe_info *info,
                       double esize, double *flop, double *bytes) {
    const double D = c->d_model, F = c->d_ff, E = c->num_experts, Fs = c->shared_d_ff;
    const double TS = (double)T * moe_routing_slots(c), TD = (double)T * D;
    const double mats = c->activation <= MOE_ACT_GEGLU_TANH ? 3.0 : 2.0;   /* GLU: 3 GEMMs */
    const double sg = Fs > 0 && c->shared_expert_gated ? D : 0.0;   /* the shared gate's vector */
    const double sh = Fs > 0 ? 1.0 : 0.0;
    double N = 0.0, used = 0.0;
    int e;
    for (e = 0; e < c->num_experts; e++) {
        N += info->expert_kept[e];
        used += info->expert_kept[e] > 0;
    }
    switch (stage) {
    case ST_ROUTER:
        *flop = 2.0 * TD * E;
        *bytes = 4.0 * (E * D + TD + T * E);
        break;
    case ST_TOPK:   /* logits in, scores out, expert / weight / dropped, routed / kept */
        *flop = 0.0;
        *bytes = 8.0 * T * E + 9.0 * TS + 8.0 * E;
        break;
    case ST_DISPATCH:   /* rows copied, expert + dropped in, pair_row and row_pair out */
        *flop = 0.0;
        *bytes = 8.0 * N * D + 5.0 * TS + 8.0 * TS + 8.0 * N;
        break;
    case ST_FFN:
        *flop = 2.0 * mats * D * (N * F + T * Fs);
        *bytes = esize * mats * D * (used * F + Fs) + 8.0 * (N * D + sh * TD);
        break;
    case ST_COMBINE:   /* out rows, weight + pair_row in, y out (+ shared out and gates) */
        *flop = 2.0 * N * D + sh * 2.0 * TD;
        *bytes = 4.0 * N * D + 4.0 * TD + 12.0 * TS + sh * 4.0 * TD + (sg > 0 ? 4.0 * T : 0.0);
        break;
    default:   /* backward: dX and dW of every forward GEMM; W read, dW read and written */
        *flop = 2.0 * (2.0 * TD * E + 2.0 * mats * D * (N * F + T * Fs) + 2.0 * T * sg);
        *bytes = 12.0 * (E * D + mats * D * (used * F + Fs) + sg) + 12.0 * TD;
    }
}

static void time_stage(int stage, stage_run *R, const char *name, int variant, double esize,
                       const ceilings *cl, FILE *json) {
    const int T = R->T, runs = reps_for(T), bw = stage == ST_BACKWARD;
    double times[MAX_REPS], flop, bytes, med, gflops, gbs;
    char gf[16], pk[16];
    float *kept[2] = {NULL, NULL};
    stage_out o;
    size_t rows = 0;
    int r, i, e;
    memset(&o, 0, sizeof o);
    for (e = 0; e < R->cfg.num_experts; e++) rows += (size_t)R->info.expert_kept[e];
    if (stage == ST_ROUTER || stage == ST_DISPATCH || stage == ST_FFN) {
        o = stage_outputs(&R->ws, stage == ST_ROUTER ? 0 : stage == ST_DISPATCH ? 1 : 2, T, rows);
        for (i = 0; i < 2; i++)   /* the forward's copy, then cleared: the stage must write it */
            if (o.p[i]) {
                kept[i] = (float *)xmalloc(o.n[i] * sizeof(float));
                memcpy(kept[i], o.p[i], o.n[i] * sizeof(float));
                memset(o.p[i], 0, o.n[i] * sizeof(float));
            }
    }
    for (r = -1; r < runs; r++) {   /* one warm-up, then the timed runs */
        const double t0 = now();
        const moe_status st = stage_call(stage, R);
        const double dt = now() - t0;
        if (st != MOE_STATUS_OK) {
            fprintf(stderr, "stage %s, %s T=%d variant %d: %s\n", stage_names[stage], name, T,
                    variant, moe_status_string(st));
            exit(1);
        }
        if (r >= 0) times[r] = dt;
    }
    stage_check(stage, R, name);
    for (i = 0; i < 2; i++)
        if (kept[i]) {
            check_err(rel_diff(o.p[i], kept[i], o.n[i]), stage, R, name);
            free(kept[i]);
        }
    qsort(times, (size_t)runs, sizeof(double), cmp);
    stage_cost(stage, bw ? &R->cfg_train : &R->cfg, T, bw ? &R->tinfo : &R->info,
               stage == ST_FFN ? esize : 4.0, &flop, &bytes);
    med = times[runs / 2];
    gflops = flop / med * 1e-9;
    gbs = bytes / med * 1e-9;
    strcpy(gf, "-"); strcpy(pk, "-");   /* no FMA work: no GFLOP/s, no %peak */
    if (flop > 0.0) {
        snprintf(gf, sizeof gf, "%.2f", gflops);
        snprintf(pk, sizeof pk, "%.1f", 100.0 * gflops / cl->peak_gflops);
    }
    printf("%-9s %-14s %5d  %d  %10.4f  %9.4f-%-9.4f %8s %8.2f %6s %6.1f\n", stage_names[stage],
           name, T, variant, 1e3 * med, 1e3 * times[0], 1e3 * times[runs - 1], gf, gbs, pk,
           100.0 * gbs / cl->read_gbs);
    fflush(stdout);
    if (!json) return;
    fprintf(json, "{\"type\": \"stage\", \"stage\": \"%s\", \"impl\": \"%s\", \"pass\": \"%s\", "
                  "\"shape\": \"%s\", \"T\": %d, \"variant\": %d, \"median_ms\": %.5f, "
                  "\"min_ms\": %.5f, \"max_ms\": %.5f, \"flop\": %.6g, \"bytes\": %.6g, ",
            stage_names[stage], stage_paths[variant], bw ? "bwd" : "fwd", name, T, variant,
            1e3 * med, 1e3 * times[0], 1e3 * times[runs - 1], flop, bytes);
    if (flop > 0.0)
        fprintf(json, "\"gflops\": %.3f, \"gbs\": %.3f, \"pct_peak\": %.2f, \"pct_bw\": %.2f}\n",
                gflops, gbs, 100.0 * gflops / cl->peak_gflops, 100.0 * gbs / cl->read_gbs);
    else
        fprintf(json, "\"gflops\": null, \"gbs\": %.3f, \"pct_peak\": null, \"pct_bw\": %.2f}\n",
                gbs, 100.0 * gbs / cl->read_gbs);
}

static void must(moe_status st, const char *what, const char *name, int T) {
    if (st == MOE_STATUS_OK) return;
    fprintf(stderr, "%s (%s T=%d): %s\n", what, name, T, moe_status_string(st));
    exit(1);
}

/* The stages in `stages` (bit s: stage s) on one (variant, shape, T). */
static void run_stages(const char *name, moe_config cfg, int variant, int T, unsigned stages,
                       const ceilings *cl, FILE *json) {
    const size_t TD = (size_t)T * (size_t)cfg.d_model;
    stage_run R;
    moe_grads wt = {0};
    size_t fb = 0, ib = 0, tb = 0, tib = 0;
    void *fws, *ibuf, *rbuf = NULL, *tws = NULL, *tbuf = NULL, *packed = NULL;
    int s;
    memset(&R, 0, sizeof R);
    R.T = T;
    R.x = tensor(TD, 1.0f); R.dy = tensor(TD, 1.0f);
    R.y = tensor(TD, 0.0f); R.y_fwd = tensor(TD, 0.0f); R.dx = tensor(TD, 0.0f);
    cfg.training = 0;
    if (variant <= 1) cfg.isa = MOE_ISA_REFERENCE;
    if (variant == 6) cfg.pack_bf16 = 1;
    layer_tensors(&cfg, &wt, 0.03f);
    weights_of(&wt, &R.w);
    if (variant == 2 || variant == 4 || variant == 6) packed = pack(&cfg, &R.w);
    R.cfg = cfg;
    /* the forward whose workspace and info the stages read (not timed) */
    must(moe_forward_workspace_size(&cfg, T, &fb), "moe_forward_workspace_size", name, T);
    must(moe_info_size(&cfg, T, &ib), "moe_info_size", name, T);
    fws = xmalloc(fb); ibuf = xmalloc(ib);
    must(moe_info_bind(&cfg, T, &R.info, ibuf, ib), "moe_info_bind", name, T);
    must(moe_forward(&cfg, &R.w, R.x, T, R.y_fwd, &R.info, fws, fb), "moe_forward", name, T);
    must(stage_bind(&R.ws, &cfg, T, fws), "stage_bind", name, T);
    if (stages & (1u << ST_TOPK)) {
        must(moe_route_workspace_size(&cfg, T, &R.rb), "moe_route_workspace_size", name, T);
        R.rws = xmalloc(R.rb); rbuf = xmalloc(ib);
        must(moe_info_bind(&cfg, T, &R.rinfo, rbuf, ib), "moe_info_bind", name, T);
    }
    if (stages & (1u << ST_BACKWARD)) {   /* a training forward (not timed), its info kept */
        R.cfg_train = cfg;
        R.cfg_train.training = R.cfg_train.save_for_backward = 1;
        layer_tensors(&cfg, &R.g, 0.0f);
        must(moe_forward_workspace_size(&R.cfg_train, T, &tb), "workspace size", name, T);
        must(moe_info_size(&R.cfg_train, T, &tib), "moe_info_size", name, T);
        must(moe_backward_workspace_size(&R.cfg_train, T, &R.bb), "workspace size", name, T);
        tws = xmalloc(tb); tbuf = xmalloc(tib); R.bws = xmalloc(R.bb);
        must(moe_info_bind(&R.cfg_train, T, &R.tinfo, tbuf, tib), "moe_info_bind", name, T);
        must(moe_forward(&R.cfg_train, &R.w, R.x, T, R.dx, &R.tinfo, tws, tb),
             "training moe_forward", name, T);
    }
    for (s = 0; s < N_STAGES; s++)
        if (stages & (1u << s))
            time_stage(s, &R, name, variant, variant == 6 ? 2.0 : 4.0, cl, json);
    free((void *)R.x); free((void *)R.dy); free(R.y); free(R.y_fwd); free(R.dx);
    free(fws); free(ibuf); free(R.rws); free(rbuf); free(tws); free(tbuf); free(R.bws);
    free_tensors(&wt); free_tensors(&R.g); free(packed);
}

/* "router,ffn" or "all" -> bits; 0 on an unknown name */
static unsigned parse_stages(const char *list) {
    unsigned bits = 0;
    const char *p = list;
    if (strcmp(list, "all") == 0) return (1u << N_STAGES) - 1;
    while (*p) {
        const size_t n = strcspn(p, ",");
        int s;
        for (s = 0; s < N_STAGES; s++)
            if (strlen(stage_names[s]) == n && strncmp(p, stage_names[s], n) == 0) break;
        if (s == N_STAGES) return 0;
        bits |= 1u << s;
        p += n + (p[n] == ',');
    }
    return bits;
}

int main(int argc, char **argv) {
    const char *pos[3] = {NULL, NULL, NULL};   /* variants, max_T, json */
    const char *vlist, *opt_shape = NULL, *only_shape;
    int npos = 0, max_T, opt_T[16], n_opt_T = 0, Ts[16], nT = 0;
    unsigned stages = 0;
    FILE *json;
    static const int default_Ts[] = {1, 16, 128, 1024};
    moe_config shapes[3];
    static const char *const shape_names[3] = {"mixtral-mini", "deepseek-mini", "qwen-mini"};
    int variants[16], nv = 0, i, s, only_T;
    size_t k;
    ceilings cl;
    const char *p;
    for (i = 1; i < argc; i++) {   /* options anywhere; the rest positional, as before */
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0) {
            if (npos < 3) pos[npos++] = a;
            continue;
        }
        if (i + 1 >= argc) { fprintf(stderr, "%s needs a value\n", a); return 2; }
        p = argv[++i];
        if (strcmp(a, "--stage") == 0) {
            if (!(stages = parse_stages(p))) {
                fprintf(stderr, "--stage: router, topk, dispatch, ffn, combine, backward "
                                "(comma separated) or all\n");
                return 2;
            }
        } else if (strcmp(a, "--reps") == 0) {
            reps_opt = atoi(p);
            if (reps_opt < 1 || reps_opt > MAX_REPS) {
                fprintf(stderr, "--reps: 1..%d\n", MAX_REPS);
                return 2;
            }
        } else if (strcmp(a, "--T") == 0) {
            while (*p) {   /* "1,7" -> {1, 7} */
                char *end;
                const long v = strtol(p, &end, 10);
                if (end == p || v < 1 || v > 1 << 20 || (*end && *end != ',') || n_opt_T == 16) {
                    fprintf(stderr, "--T: up to 16 token counts 1..%d, comma separated\n", 1 << 20);
                    return 2;
                }
                opt_T[n_opt_T++] = (int)v;
                p = *end == ',' ? end + 1 : end;
            }
        } else if (strcmp(a, "--shape") == 0) {
            for (s = 0; s < 3 && strcmp(p, shape_names[s]) != 0; s++) {}
            if (s == 3) {
                fprintf(stderr, "--shape: mixtral-mini, deepseek-mini or qwen-mini\n");
                return 2;
            }
            opt_shape = p;
        } else if (strcmp(a, "--qtype") == 0) {
            static const moe_qtype qs[4] = {MOE_QTYPE_Q8_0, MOE_QTYPE_Q4_0, MOE_QTYPE_Q4_K,
                                            MOE_QTYPE_MXFP4};
            for (s = 0; s < 4 && strcmp(p, moe_qtype_name(qs[s])) != 0; s++) {}
            if (s == 4) { fprintf(stderr, "--qtype: q8_0, q4_0, q4_k or mxfp4\n"); return 2; }
            qtype_opt = (int)qs[s];
        } else if (strcmp(a, "--qpack") == 0) {
            qpack_opt = atoi(p) != 0;
        } else {
            fprintf(stderr, "unknown option %s (--stage, --reps, --T, --shape, --qtype, --qpack)\n",
                    a);
            return 2;
        }
    }
    vlist = pos[0] ? pos[0] : "0";
    max_T = pos[1] ? atoi(pos[1]) : 16;
    json = pos[2] ? fopen(pos[2], "a") : NULL;
    p = vlist;
    while (*p && nv < 16) {   /* "2,6,3" -> {2, 6, 3} */
        char *end;
        const long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > 6 || (*end && *end != ',')) {
            fprintf(stderr, "variants: numbers 0..6, comma separated\n");
            return 2;
        }
#ifndef MOE_BENCH_OPENBLAS
        if (v == 5 && !stages) {
            fprintf(stderr, "variant 5 needs -DMOE_BENCH_OPENBLAS -lopenblas\n");
            return 2;
        }
#endif
        if (v == 5 && stages) {
            fprintf(stderr, "variant 5 (the OpenBLAS peer) has no stages\n");
            return 2;
        }
        variants[nv++] = (int)v;
        p = *end == ',' ? end + 1 : end;
    }
    if (pos[2] && !json) { fprintf(stderr, "cannot open %s\n", pos[2]); return 2; }
    for (i = 0; i < nv && qtype_opt >= 0; i++)
        if (stages || (variants[i] != 0 && variants[i] != 2 && variants[i] != 3)) {
            fprintf(stderr, "--qtype: variants 0, 2 and 3 (forward), without --stage\n");
            return 2;
        }
    if (n_opt_T) memcpy(Ts, opt_T, sizeof(int) * (size_t)(nT = n_opt_T));
    else
        for (k = 0; k < sizeof default_Ts / sizeof default_Ts[0] && default_Ts[k] <= max_T; k++)
            Ts[nT++] = default_Ts[k];
    shapes[0] = moe_preset_mixtral();
    shapes[0].d_model = 1024; shapes[0].d_ff = 3584;
    shapes[1] = moe_preset_qwen3_moe();
    shapes[1].num_experts = 64; shapes[1].top_k = 6; shapes[1].d_model = 1024;
    shapes[1].d_ff = 512;
    shapes[1].normalize = MOE_NORM_NONE;
    shapes[2] = moe_preset_qwen2_moe();   /* E60 K4, no renorm, sigmoid-gated shared expert */
    shapes[2].d_model = 1024; shapes[2].d_ff = 384; shapes[2].shared_d_ff = 4 * 384;
    cl = measure_ceilings(json);
    only_T = getenv("MOE_BENCH_T") ? atoi(getenv("MOE_BENCH_T")) : 0;
    only_shape = getenv("MOE_BENCH_SHAPE");
    for (i = 0; i < nv; i++) {
        const int v = variants[i];
        if (stages)
            printf("moe.h %s stage bench, variant %d (%s)\n%-9s %-14s %5s  %s  %10s  %-19s "
                   "%8s %8s %6s %6s\n", MOE_VERSION_STRING, v, stage_paths[v], "stage", "shape",
                   "T", "v", "median ms", "min-max ms", "GFLOP/s", "GB/s", "%peak", "%bw");
        else
            printf("moe.h %s bench, variant %d (%s)\n%-14s %5s  %s  %10s  %-19s %7s %7s %6s %6s\n",
                   MOE_VERSION_STRING, v, variant_names[v], "shape", "T", "v", "median ms",
                   "min-max ms", "GFLOP/s", "GB/s", "%peak", "%bw");
        for (k = 0; k < (size_t)nT; k++)
            for (s = 0; s < 3; s++) {
                if ((only_T && Ts[k] != only_T) ||
                    (only_shape && strcmp(only_shape, shape_names[s]) != 0) ||
                    (opt_shape && strcmp(opt_shape, shape_names[s]) != 0))
                    continue;
                if (stages) run_stages(shape_names[s], shapes[s], v, Ts[k], stages, &cl, json);
                else run_shape(shape_names[s], shapes[s], v, Ts[k], &cl, json);
            }
    }
    if (json) fclose(json);
    return 0;
}
