/* bench/moe_bench.c -- MoE layer forward / forward+backward timings, CPU.
   build: make bench        run: ./build/moe_bench [variant] [max_T]
   variant 0: moe.h reference forward (cfg.isa = MOE_ISA_REFERENCE)
   variant 1: moe.h reference forward + backward (training cache, recompute = 0)
   variant 2: SIMD forward on packed weights (moe_pack_weights once)      <- moe.h
   variant 3: SIMD forward on unpacked weights (each used expert packed per call)
   variant 4: SIMD forward (packed) + backward
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

static void run_shape(const char *name, moe_config cfg, int variant, int T) {
    const int D = cfg.d_model, F = cfg.d_ff, E = cfg.num_experts, runs = T >= 128 ? 3 : 7;
    moe_weights w = {0};
    moe_grads g = {0};
    moe_info info = {0};
    float *x = tensor((size_t)T * D, 1.0f), *y = tensor((size_t)T * D, 0.0f), *dy = tensor((size_t)T * D, 1.0f);
    float *dx = tensor((size_t)T * D, 0.0f);
    double times[7], flops;
    size_t fb = 0, bb = 0, ib = 0;
    void *fws, *bws = NULL, *ibuf;
    int r, e;
    const int backward = variant == 1 || variant == 4;
    void *packed = NULL;
    cfg.training = backward;
    if (variant <= 1) cfg.isa = MOE_ISA_REFERENCE;
    w.router = tensor((size_t)E * D, 0.03f);
    w.gate = tensor((size_t)E * F * D, 0.03f); w.up = tensor((size_t)E * F * D, 0.03f);
    w.down = tensor((size_t)E * D * F, 0.03f);
    if (variant == 2 || variant == 4) {
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
    for (r = -1; r < runs; r++) {
        double t0 = now();
        moe_status st = moe_forward(&cfg, &w, x, T, y, &info, fws, fb);
        if (st == MOE_STATUS_OK && backward) st = moe_backward(&cfg, &w, x, T, &info, dy, dx, &g, bws, bb);
        if (st != MOE_STATUS_OK) { fprintf(stderr, "%s\n", moe_status_string(st)); exit(1); }
        if (r >= 0) times[r] = now() - t0;
    }
    qsort(times, (size_t)runs, sizeof(double), cmp);
    flops = 2.0 * T * D * E;
    for (e = 0; e < E; e++) flops += 6.0 * info.expert_kept[e] * D * F;
    if (backward) flops *= 3.0;
    printf("%-14s %5d  %d  %10.2f  %9.2f-%-9.2f %7.2f\n", name, T, variant, 1e3 * times[runs / 2],
           1e3 * times[0], 1e3 * times[runs - 1], flops / times[runs / 2] * 1e-9);
    free(x); free(y); free(dy); free(dx); free(fws); free(bws); free(ibuf);
    free((void *)w.router); free((void *)w.gate); free((void *)w.up); free((void *)w.down);
    free(g.router); free(g.gate); free(g.up); free(g.down); free(packed);
}

int main(int argc, char **argv) {
    const int variant = argc > 1 ? atoi(argv[1]) : 0, max_T = argc > 2 ? atoi(argv[2]) : 16;
    const int Ts[] = {1, 16, 128, 1024};
    moe_config mixtral = moe_preset_mixtral(), deepseek = moe_preset_qwen3_moe();
    size_t i;
    mixtral.d_model = 1024; mixtral.d_ff = 3584;
    deepseek.num_experts = 64; deepseek.top_k = 6; deepseek.d_model = 1024; deepseek.d_ff = 512;
    deepseek.normalize = MOE_NORM_NONE;
    static const char *names[5] = {"reference forward", "reference forward+backward",
                                   "SIMD forward, packed", "SIMD forward, unpacked",
                                   "SIMD forward (packed) + backward"};
    if (variant < 0 || variant > 4) { fprintf(stderr, "variant 0..4\n"); return 2; }
    printf("moe.h %s bench, variant %d (%s)\n", MOE_VERSION_STRING, variant, names[variant]);
    printf("%-14s %5s  %s  %10s  %-19s %7s\n", "shape", "T", "v", "median ms", "min-max ms", "GFLOP/s");
    for (i = 0; i < sizeof Ts / sizeof Ts[0] && Ts[i] <= max_T; i++) {
        run_shape("mixtral-mini", mixtral, variant, Ts[i]);
        run_shape("deepseek-mini", deepseek, variant, Ts[i]);
    }
    return 0;
}
