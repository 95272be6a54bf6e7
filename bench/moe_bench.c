/* bench/moe_bench.c -- MoE layer forward / forward+backward timings, CPU.
   build: make bench        run: ./build/moe_bench [variant] [max_T]
   variant 0: moe.h reference forward (cfg.isa = MOE_ISA_REFERENCE)
   variant 1: moe.h reference forward + backward (training cache, recompute = 0)
   variant 2: SIMD forward on packed weights (moe_pack_weights once)      <- moe.h
   variant 3: SIMD forward on unpacked weights (each used expert packed per call)
   variant 4: SIMD forward (packed) + backward
   variant 6: SIMD forward on packed bf16 weights (cfg.pack_bf16)
   variant 5: OpenBLAS per-expert loop (peer; sgemm, or sgemv for one token;
              routing by moe_route), built with -DMOE_BENCH_OPENBLAS -lopenblas
   Output: a table, and with a third argument one JSON object per row
   appended to that file (bench/run_bench.sh collects them).
   Shapes (2 threads are the target machine; the reference path is serial):
     mixtral-mini   D=1024 F=3584 E=8  K=2 SwiGLU, softmax, renormalised
     deepseek-mini  D=1024 F=512  E=64 K=6 SwiGLU, softmax, greedy
   Each row: median and min-max of N timed runs after one warm-up, GFLOP/s of
   the FLOPs actually done (router + 3 GEMMs per processed pair; backward
   counts 2x the forward's GEMM FLOPs), warm caches. Peers (OpenBLAS, PyTorch)
   and the fast ISA variants arrive with the fast-path issue.               */
#define _POSIX_C_SOURCE 199309L
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#ifdef MOE_BENCH_OPENBLAS
#  include <cblas.h>
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

#ifdef MOE_BENCH_OPENBLAS
/* The OpenBLAS peer: router sgemm, moe.h's routing, then per expert a gather,
   gate/up sgemm (sgemv for one token), SiLU * up, down sgemm, weighted
   scatter into y in slot order. What a careful C user writes with a BLAS. */
typedef struct blas_peer {
    float *logits, *xg, *hg, *hu, *out, *info_buf;
    void *route_ws;
    moe_info info;
} blas_peer;

static void blas_forward(const moe_config *cfg, const moe_weights *w, const float *x, int T,
                         float *y, blas_peer *P) {
    const int D = cfg->d_model, F = cfg->d_ff, E = cfg->num_experts, K = cfg->top_k;
    size_t bytes;
    int e, t, j, i, d;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, E, D, 1.0f, x, D, w->router, D, 0.0f, P->logits, E);
    moe_route_workspace_size(cfg, T, &bytes);
    moe_route(cfg, w, P->logits, NULL, T, &P->info, P->route_ws, bytes);
    memset(y, 0, (size_t)T * D * sizeof(float));
    for (e = 0; e < E; e++) {
        int n = 0;
        const float *gate = w->gate + (size_t)e * F * D, *up = w->up + (size_t)e * F * D;
        const float *down = w->down + (size_t)e * D * F;
        for (t = 0; t < T; t++)
            for (j = 0; j < K; j++)
                if (P->info.expert[t * K + j] == e)
                    memcpy(P->xg + (size_t)n++ * D, x + (size_t)t * D, (size_t)D * sizeof(float));
        if (n == 0) continue;
        if (n == 1) {
            cblas_sgemv(CblasRowMajor, CblasNoTrans, F, D, 1.0f, gate, D, P->xg, 1, 0.0f, P->hg, 1);
            cblas_sgemv(CblasRowMajor, CblasNoTrans, F, D, 1.0f, up, D, P->xg, 1, 0.0f, P->hu, 1);
        } else {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, F, D, 1.0f, P->xg, D, gate, D, 0.0f, P->hg, F);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, F, D, 1.0f, P->xg, D, up, D, 0.0f, P->hu, F);
        }
        for (i = 0; i < n * F; i++) P->hg[i] = P->hg[i] / (1.0f + expf(-P->hg[i])) * P->hu[i];
        if (n == 1) cblas_sgemv(CblasRowMajor, CblasNoTrans, D, F, 1.0f, down, F, P->hg, 1, 0.0f, P->out, 1);
        else cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, D, F, 1.0f, P->hg, F, down, F, 0.0f, P->out, D);
        n = 0;
        for (t = 0; t < T; t++)
            for (j = 0; j < K; j++)
                if (P->info.expert[t * K + j] == e) {
                    const float wt = P->info.weight[t * K + j];
                    for (d = 0; d < D; d++) y[(size_t)t * D + d] += wt * P->out[(size_t)n * D + d];
                    n++;
                }
    }
}
#endif

static void run_shape(const char *name, moe_config cfg, int variant, int T, FILE *json) {
    const int D = cfg.d_model, F = cfg.d_ff, E = cfg.num_experts, runs = T >= 128 ? 3 : 7;
    moe_weights w = {0};
    moe_grads g = {0};
    moe_info info = {0};
    float *x = tensor((size_t)T * D, 1.0f), *y = tensor((size_t)T * D, 0.0f), *dy = tensor((size_t)T * D, 1.0f);
    float *dx = tensor((size_t)T * D, 0.0f);
    double times[7], flops;
    size_t fb = 0, bb = 0, ib = 0;
    void *fws, *bws = NULL, *ibuf;
    int r, e, used = 0;
    double bytes_touched;
#ifdef MOE_BENCH_OPENBLAS
    blas_peer peer;
#endif
    const int backward = variant == 1 || variant == 4;
    void *packed = NULL;
    cfg.training = backward;
    if (variant <= 1) cfg.isa = MOE_ISA_REFERENCE;
    w.router = tensor((size_t)E * D, 0.03f);
    w.gate = tensor((size_t)E * F * D, 0.03f); w.up = tensor((size_t)E * F * D, 0.03f);
    w.down = tensor((size_t)E * D * F, 0.03f);
    if (variant == 6) cfg.pack_bf16 = 1;
    if (variant == 2 || variant == 4 || variant == 6) {
        size_t pb = 0;
        moe_pack_size(&cfg, &pb);
        packed = malloc(pb);
        if (moe_pack_weights(&cfg, &w, packed, pb) != MOE_STATUS_OK) { fprintf(stderr, "pack failed\n"); exit(1); }
        w.packed = packed;
    }
    if (backward) {
        g.router = tensor((size_t)E * D, 0.0f);
        g.gate = tensor((size_t)E * F * D, 0.0f); g.up = tensor((size_t)E * F * D, 0.0f);
        g.down = tensor((size_t)E * D * F, 0.0f);
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
    qsort(times, (size_t)runs, sizeof(double), cmp);
    flops = 2.0 * T * D * E;
    for (e = 0; e < E; e++) {
        flops += 6.0 * info.expert_kept[e] * D * F;
        used += info.expert_kept[e] > 0;
    }
    if (backward) flops *= 3.0;
    /* weight bytes a forward must read at least: the router and every used expert */
    bytes_touched = 4.0 * E * D + (variant == 6 ? 2.0 : 4.0) * 3.0 * used * D * F;
    printf("%-14s %5d  %d  %10.2f  %9.2f-%-9.2f %7.2f %7.2f\n", name, T, variant, 1e3 * times[runs / 2],
           1e3 * times[0], 1e3 * times[runs - 1], flops / times[runs / 2] * 1e-9,
           bytes_touched / times[runs / 2] * 1e-9);
    if (json)
        fprintf(json, "{\"shape\": \"%s\", \"T\": %d, \"variant\": %d, \"median_ms\": %.4f, "
                      "\"min_ms\": %.4f, \"max_ms\": %.4f, \"gflops\": %.3f, \"weight_gbs\": %.3f}\n",
                name, T, variant, 1e3 * times[runs / 2], 1e3 * times[0], 1e3 * times[runs - 1],
                flops / times[runs / 2] * 1e-9, bytes_touched / times[runs / 2] * 1e-9);
    free(x); free(y); free(dy); free(dx); free(fws); free(bws); free(ibuf);
    free((void *)w.router); free((void *)w.gate); free((void *)w.up); free((void *)w.down);
    free(g.router); free(g.gate); free(g.up); free(g.down); free(packed);
#ifdef MOE_BENCH_OPENBLAS
    if (variant == 5) {
        free(peer.logits); free(peer.xg); free(peer.hg); free(peer.hu); free(peer.out); free(peer.route_ws);
    }
#endif
}

int main(int argc, char **argv) {
    const int variant = argc > 1 ? atoi(argv[1]) : 0, max_T = argc > 2 ? atoi(argv[2]) : 16;
    FILE *json = argc > 3 ? fopen(argv[3], "a") : NULL;
    const int Ts[] = {1, 16, 128, 1024};
    moe_config mixtral = moe_preset_mixtral(), deepseek = moe_preset_qwen3_moe();
    size_t i;
    mixtral.d_model = 1024; mixtral.d_ff = 3584;
    deepseek.num_experts = 64; deepseek.top_k = 6; deepseek.d_model = 1024; deepseek.d_ff = 512;
    deepseek.normalize = MOE_NORM_NONE;
    static const char *names[7] = {"reference forward", "reference forward+backward",
                                   "SIMD forward, packed", "SIMD forward, unpacked",
                                   "SIMD forward (packed) + backward", "OpenBLAS per-expert loop",
                                   "SIMD forward, packed bf16"};
#ifndef MOE_BENCH_OPENBLAS
    if (variant == 5) { fprintf(stderr, "variant 5 needs -DMOE_BENCH_OPENBLAS -lopenblas\n"); return 2; }
#endif
    if (variant < 0 || variant > 6) { fprintf(stderr, "variant 0..6\n"); return 2; }
    printf("moe.h %s bench, variant %d (%s)\n", MOE_VERSION_STRING, variant, names[variant]);
    printf("%-14s %5s  %s  %10s  %-19s %7s %7s\n", "shape", "T", "v", "median ms", "min-max ms", "GFLOP/s", "GB/s");
    for (i = 0; i < sizeof Ts / sizeof Ts[0] && Ts[i] <= max_T; i++) {
        run_shape("mixtral-mini", mixtral, variant, Ts[i], json);
        run_shape("deepseek-mini", deepseek, variant, Ts[i], json);
    }
    if (json) fclose(json);
    return 0;
}
