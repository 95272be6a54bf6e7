/* bench/moe_bench.c -- MoE layer forward / forward+backward timings, CPU.
   build: make bench        run: ./build/moe_bench [variants] [max_T] [json]
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
   Each row: median and min-max of N timed runs after one warm-up, warm caches;
     GFLOP/s  the FLOPs actually done (router + 3 GEMMs per processed pair +
              shared expert; forward+backward counts 3x the forward)
     GB/s     weight bytes a forward must read at least (router + every used
              expert + shared expert; bf16 for variant 6) / median time;
              activations are not counted (small next to the weights)
     %peak    GFLOP/s / FMA peak;   %bw   GB/s / read bandwidth
   Output: a table, and with a third argument JSON lines appended to that
   file: one {"type": "ceiling"} row, then one {"type": "result"} row per
   (variant, shape, T). bench/plot_roofline.py draws them.                   */
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
typedef struct ceilings { double peak_gflops, peak1_gflops, read_gbs, sgemm_gflops; int threads; } ceilings;
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
                c0 = VFMA(c0, a, b); c1 = VFMA(c1, a, b); c2 = VFMA(c2, a, b); c3 = VFMA(c3, a, b);
                c4 = VFMA(c4, a, b); c5 = VFMA(c5, a, b); c6 = VFMA(c6, a, b); c7 = VFMA(c7, a, b);
                c8 = VFMA(c8, a, b); c9 = VFMA(c9, a, b); c10 = VFMA(c10, a, b); c11 = VFMA(c11, a, b);
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
    float *a = (float *)malloc((size_t)n * n * sizeof(float)), *b = (float *)malloc((size_t)n * n * sizeof(float));
    float *c = (float *)calloc((size_t)n * n, sizeof(float));
    double best = 1e30;
    size_t i;
    int rep;
    /* not tensor(): its random stream makes the shapes' data, which must not
       depend on whether this ceiling ran (the peer check compares routings) */
    for (i = 0; i < (size_t)n * n; i++) { a[i] = (float)(i % 97) * 1e-3f; b[i] = (float)(i % 89) * 1e-3f; }
    for (rep = 0; rep < 6; rep++) {   /* the first one warms up */
        const double t0 = now();
        double dt;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
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
    printf("# ceilings (measured now, %d threads): FMA peak %.1f GFLOP/s (%s, %d floats; 1 thread %.1f), "
           "read %.1f GB/s (sum of 1 GiB)\n", c.threads, c.peak_gflops, ISA_NAME, VW, c.peak1_gflops, c.read_gbs);
#ifdef MOE_BENCH_OPENBLAS
    c.sgemm_gflops = blas_sgemm_rate();
    printf("# OpenBLAS sgemm 2048^3 (same threads): %.1f GFLOP/s = %.1f %% of the FMA peak\n", c.sgemm_gflops,
           100.0 * c.sgemm_gflops / c.peak_gflops);
#endif
    /* FMA throughput scales with cores; if it does not, another job holds one and
       every figure of this run (ceilings and rows) is suspect */
    if (c.peak_gflops < 0.8 * c.threads * c.peak1_gflops)
        printf("# WARNING: the %d-thread peak is only %.1fx the 1-thread peak: the machine is busy\n",
               c.threads, c.peak_gflops / c.peak1_gflops);
    if (json)
        fprintf(json, "{\"type\": \"ceiling\", \"threads\": %d, \"isa\": \"%s\", \"vector_floats\": %d, "
                      "\"peak_gflops\": %.3f, \"peak_1thread_gflops\": %.3f, \"read_gbs\": %.3f, "
                      "\"read_bytes\": %lu, \"blas_sgemm_gflops\": %.3f}\n",
                c.threads, ISA_NAME, VW, c.peak_gflops, c.peak1_gflops, c.read_gbs, (unsigned long)BW_BYTES,
                c.sgemm_gflops);
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
    else cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, X, in, W, in, 0.0f, Y, out);
}
static void swiglu(float *g, const float *u, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void blas_forward(const moe_config *cfg, const moe_weights *w, const float *x, int T,
                         float *y, blas_peer *P) {
    const int D = cfg->d_model, F = cfg->d_ff, E = cfg->num_experts, K = cfg->top_k, Fs = cfg->shared_d_ff;
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
    "moe.h SIMD forward, unpacked", "moe.h SIMD forward (packed) + backward", "OpenBLAS per-expert loop",
    "moe.h SIMD forward, packed bf16"};

static void run_shape(const char *name, moe_config cfg, int variant, int T, const ceilings *cl, FILE *json) {
    const int D = cfg.d_model, F = cfg.d_ff, E = cfg.num_experts, Fs = cfg.shared_d_ff, runs = T >= 128 ? 3 : 7;
    moe_weights w = {0};
    moe_grads g = {0};
    moe_info info = {0};
    float *x = tensor((size_t)T * D, 1.0f), *y = tensor((size_t)T * D, 0.0f), *dy = tensor((size_t)T * D, 1.0f);
    float *dx = tensor((size_t)T * D, 0.0f);
    double times[7], flops, med, gflops, gbs;
    size_t fb = 0, bb = 0, ib = 0;
    void *fws, *bws = NULL, *ibuf;
    int r, e, used = 0;
    double bytes_touched;
#ifdef MOE_BENCH_OPENBLAS
    blas_peer peer;
#endif
    const int backward = variant == 1 || variant == 4;
    const double esize = variant == 6 ? 2.0 : 4.0;
    void *packed = NULL;
    cfg.training = cfg.save_for_backward = backward;
    if (variant <= 1) cfg.isa = MOE_ISA_REFERENCE;
    w.router = tensor((size_t)E * D, 0.03f);
    w.gate = tensor((size_t)E * F * D, 0.03f); w.up = tensor((size_t)E * F * D, 0.03f);
    w.down = tensor((size_t)E * D * F, 0.03f);
    if (Fs > 0) {
        w.shared_gate = tensor((size_t)Fs * D, 0.03f); w.shared_up = tensor((size_t)Fs * D, 0.03f);
        w.shared_down = tensor((size_t)D * Fs, 0.03f);
        if (cfg.shared_expert_gated) w.shared_expert_gate = tensor((size_t)D, 0.03f);
    }
    if (variant == 6) cfg.pack_bf16 = 1;
    if (variant == 2 || variant == 4 || variant == 6) {
        size_t pb = 0;
        moe_pack_size(&cfg, &pb);
        packed = malloc(pb);
        if (moe_pack_weights(&cfg, &w, packed, pb) != MOE_STATUS_OK) { fprintf(stderr, "pack failed\n"); exit(1); }
        w.packed = packed;
        w.packed_bytes = pb;
    }
    if (backward) {
        g.router = tensor((size_t)E * D, 0.0f);
        g.gate = tensor((size_t)E * F * D, 0.0f); g.up = tensor((size_t)E * F * D, 0.0f);
        g.down = tensor((size_t)E * D * F, 0.0f);
        if (Fs > 0) {
            g.shared_gate = tensor((size_t)Fs * D, 0.0f); g.shared_up = tensor((size_t)Fs * D, 0.0f);
            g.shared_down = tensor((size_t)D * Fs, 0.0f);
            if (cfg.shared_expert_gated) g.shared_expert_gate = tensor((size_t)D, 0.0f);
        }
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
        if (st == MOE_STATUS_OK && backward) st = moe_backward(&cfg, &w, x, T, &info, dy, dx, &g, bws, bb);
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
    bytes_touched = 4.0 * E * D + esize * 3.0 * used * D * F;
    if (Fs > 0) bytes_touched += esize * 3.0 * D * Fs + (cfg.shared_expert_gated ? 4.0 * D : 0.0);
    med = times[runs / 2];
    gflops = flops / med * 1e-9;
    gbs = bytes_touched / med * 1e-9;
    printf("%-14s %5d  %d  %10.2f  %9.2f-%-9.2f %7.2f %7.2f %6.1f %6.1f\n", name, T, variant, 1e3 * med,
           1e3 * times[0], 1e3 * times[runs - 1], gflops, gbs, 100.0 * gflops / cl->peak_gflops,
           100.0 * gbs / cl->read_gbs);
    fflush(stdout);
    if (json)
        fprintf(json, "{\"type\": \"result\", \"impl\": \"%s\", \"pass\": \"%s\", \"shape\": \"%s\", "
                      "\"T\": %d, \"variant\": %d, \"median_ms\": %.4f, \"min_ms\": %.4f, \"max_ms\": %.4f, "
                      "\"flop\": %.6g, \"weight_bytes\": %.6g, \"gflops\": %.3f, \"weight_gbs\": %.3f, "
                      "\"pct_peak\": %.2f, \"pct_bw\": %.2f}\n",
                variant_names[variant], backward ? "fwd+bwd" : "fwd", name, T, variant, 1e3 * med,
                1e3 * times[0], 1e3 * times[runs - 1], flops, bytes_touched, gflops, gbs,
                100.0 * gflops / cl->peak_gflops, 100.0 * gbs / cl->read_gbs);
    free(x); free(y); free(dy); free(dx); free(fws); free(bws); free(ibuf);
    free((void *)w.router); free((void *)w.gate); free((void *)w.up); free((void *)w.down);
    free((void *)w.shared_gate); free((void *)w.shared_up); free((void *)w.shared_down);
    free((void *)w.shared_expert_gate);
    free(g.router); free(g.gate); free(g.up); free(g.down);
    free(g.shared_gate); free(g.shared_up); free(g.shared_down); free(g.shared_expert_gate); free(packed);
#ifdef MOE_BENCH_OPENBLAS
    if (variant == 5) {
        free(peer.logits); free(peer.xg); free(peer.hg); free(peer.hu); free(peer.out);
        free(peer.sh_g); free(peer.sh_u); free(peer.sh_out); free(peer.sh_z); free(peer.route_ws);
    }
#endif
}

int main(int argc, char **argv) {
    const char *vlist = argc > 1 ? argv[1] : "0";
    const int max_T = argc > 2 ? atoi(argv[2]) : 16;
    FILE *json = argc > 3 ? fopen(argv[3], "a") : NULL;
    const int Ts[] = {1, 16, 128, 1024};
    moe_config shapes[3];
    static const char *const shape_names[3] = {"mixtral-mini", "deepseek-mini", "qwen-mini"};
    int variants[16], nv = 0, i, s, only_T;
    const char *only_shape;
    size_t k;
    ceilings cl;
    const char *p = vlist;
    while (*p && nv < 16) {   /* "2,6,3" -> {2, 6, 3} */
        char *end;
        const long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > 6 || (*end && *end != ',')) {
            fprintf(stderr, "variants: numbers 0..6, comma separated\n");
            return 2;
        }
#ifndef MOE_BENCH_OPENBLAS
        if (v == 5) { fprintf(stderr, "variant 5 needs -DMOE_BENCH_OPENBLAS -lopenblas\n"); return 2; }
#endif
        variants[nv++] = (int)v;
        p = *end == ',' ? end + 1 : end;
    }
    if (argc > 3 && !json) { fprintf(stderr, "cannot open %s\n", argv[3]); return 2; }
    shapes[0] = moe_preset_mixtral();
    shapes[0].d_model = 1024; shapes[0].d_ff = 3584;
    shapes[1] = moe_preset_qwen3_moe();
    shapes[1].num_experts = 64; shapes[1].top_k = 6; shapes[1].d_model = 1024; shapes[1].d_ff = 512;
    shapes[1].normalize = MOE_NORM_NONE;
    shapes[2] = moe_preset_qwen2_moe();   /* E60 K4, no renorm, sigmoid-gated shared expert */
    shapes[2].d_model = 1024; shapes[2].d_ff = 384; shapes[2].shared_d_ff = 4 * 384;
    cl = measure_ceilings(json);
    only_T = getenv("MOE_BENCH_T") ? atoi(getenv("MOE_BENCH_T")) : 0;
    only_shape = getenv("MOE_BENCH_SHAPE");
    for (i = 0; i < nv; i++) {
        const int v = variants[i];
        printf("moe.h %s bench, variant %d (%s)\n", MOE_VERSION_STRING, v, variant_names[v]);
        printf("%-14s %5s  %s  %10s  %-19s %7s %7s %6s %6s\n", "shape", "T", "v", "median ms", "min-max ms",
               "GFLOP/s", "GB/s", "%peak", "%bw");
        for (k = 0; k < sizeof Ts / sizeof Ts[0] && Ts[k] <= max_T; k++)
            for (s = 0; s < 3; s++) {
                if ((only_T && Ts[k] != only_T) || (only_shape && strcmp(only_shape, shape_names[s]) != 0)) continue;
                run_shape(shape_names[s], shapes[s], v, Ts[k], &cl, json);
            }
    }
    if (json) fclose(json);
    return 0;
}
