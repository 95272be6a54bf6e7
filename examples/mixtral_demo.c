/* mixtral_demo.c -- moe.h's main demo (`make run`): a Mixtral-like MoE layer
   (softmax router, top-2 of 8 SwiGLU experts, renormalised) on built-in
   synthetic weights and tokens. Prints the per-expert load as a histogram,
   the aux losses, dropped tokens when a capacity factor is set, and the time
   and GFLOP/s of the reference kernels next to the SIMD kernels on packed
   fp32 and bf16 weights (the ISA the compiler flags select).

   build: cc -std=c99 -O2 -mavx2 -mfma -fopenmp -o mixtral_demo examples/mixtral_demo.c -lm
   run:   ./mixtral_demo [T] [d_model] [d_ff] [experts] [top_k]
          defaults: T=128, D=512, F=1792, E=8, K=2                            */
#define _POSIX_C_SOURCE 199309L
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* Deterministic uniform(-1, 1) from a 64-bit LCG: same weights on every run. */
static uint64_t rng_state = 0x853c49e6748fea9bull;
static float uniform(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) * (1.0 / 8388608.0)) - 1.0f;
}
static float *random_tensor(size_t n, float scale) {
    float *p = (float *)malloc(n * sizeof(float));
    size_t i;
    if (!p) { fprintf(stderr, "out of memory\n"); exit(1); }
    for (i = 0; i < n; i++) p[i] = scale * uniform();
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

static void print_load(const moe_info *info, int32_t E, int32_t T, int32_t K) {
    int32_t e, i, max = 1;
    for (e = 0; e < E; e++) if (info->expert_routed[e] > max) max = info->expert_routed[e];
    printf("  expert  routed  kept  load (mean = %.1f)\n", (double)T * K / E);
    for (e = 0; e < E; e++) {
        int bars = (int)(40.0 * info->expert_routed[e] / max + 0.5);
        printf("  %6d  %6d  %4d  ", (int)e, (int)info->expert_routed[e], (int)info->expert_kept[e]);
        for (i = 0; i < bars; i++) putchar('#');
        putchar('\n');
    }
}

int main(int argc, char **argv) {
    const int32_t T = argc > 1 ? atoi(argv[1]) : 128;
    moe_config cfg = moe_preset_mixtral();
    moe_weights w = {0};
    moe_info info = {0};
    float *x, *y;
    void *info_buf, *ws;
    size_t ws_bytes, info_bytes;
    moe_status st;
    double times[7], flops;
    int32_t E, K, D, F, t, d, run, variant;
    const int runs = 7;

    cfg.d_model = argc > 2 ? atoi(argv[2]) : 512;
    cfg.d_ff = argc > 3 ? atoi(argv[3]) : 1792;
    cfg.num_experts = argc > 4 ? atoi(argv[4]) : 8;
    cfg.top_k = argc > 5 ? atoi(argv[5]) : 2;
    E = cfg.num_experts; K = cfg.top_k; D = cfg.d_model; F = cfg.d_ff;
    if (T < 1 || D < 1 || F < 1 || E < 1 || K < 1 || K > E) {
        fprintf(stderr, "usage: %s [T>=1] [d_model] [d_ff] [experts] [top_k<=experts]\n", argv[0]);
        return 2;
    }

    /* synthetic layer: Xavier-like scales; tokens from 4 clusters so the
       router has something to separate                                      */
    w.router = random_tensor((size_t)E * D, 1.0f / sqrtf((float)D));
    w.gate = random_tensor((size_t)E * F * D, 1.0f / sqrtf((float)D));
    w.up = random_tensor((size_t)E * F * D, 1.0f / sqrtf((float)D));
    w.down = random_tensor((size_t)E * D * F, 1.0f / sqrtf((float)F));
    {
        float *centers = random_tensor((size_t)4 * D, 2.0f);
        x = random_tensor((size_t)T * D, 0.5f);
        for (t = 0; t < T; t++)
            for (d = 0; d < D; d++) x[(size_t)t * D + d] += centers[(size_t)(t % 4) * D + d];
        free(centers);
    }
    y = (float *)malloc((size_t)T * D * sizeof(float));

    /* the workspace and the info arrays are sized once, then reused */
    if ((st = moe_forward_workspace_size(&cfg, T, &ws_bytes)) != MOE_STATUS_OK ||
        (st = moe_info_size(&cfg, T, &info_bytes)) != MOE_STATUS_OK) {
        fprintf(stderr, "moe.h: %s\n", moe_status_string(st));
        return 1;
    }
    ws = malloc(ws_bytes);
    info_buf = malloc(info_bytes);
    moe_info_bind(&cfg, T, &info, info_buf, info_bytes);

    {
        moe_config r;
        static const char *isa_names[5] = {"auto", "reference", "AVX2+FMA", "AVX-512", "NEON"};
        moe_config_resolve(&cfg, &r);
        printf("moe.h %s demo: Mixtral-like layer, T=%d D=%d F=%d E=%d K=%d, SwiGLU, kernels: %s\n",
               MOE_VERSION_STRING, (int)T, (int)D, (int)F, (int)E, (int)K, isa_names[r.isa]);
    }
    printf("workspace %.1f MiB\n\n", ws_bytes / 1048576.0);

    printf("  %-26s %10s  %-17s %8s\n", "kernels", "median ms", "min-max ms", "GFLOP/s");
    for (variant = 0; variant < 3; variant++) {
        moe_config vc = cfg;
        moe_weights vw = w;
        void *packed = NULL;
        size_t pb = 0;
        static const char *names[3] = {"reference (scalar)", "SIMD, packed fp32", "SIMD, packed bf16"};
        if (variant == 0) vc.isa = MOE_ISA_REFERENCE;
        if (variant == 2) vc.pack_bf16 = 1;
        if (variant > 0) {
            moe_config r;
            moe_config_resolve(&vc, &r);
            if (r.isa == MOE_ISA_REFERENCE) break;          /* built without SIMD flags */
            moe_pack_size(&vc, &pb);
            packed = malloc(pb);
            moe_pack_weights(&vc, &vw, packed, pb);
            vw.packed = packed;
            vw.packed_bytes = pb;
        }
        for (run = 0; run < runs; run++) {
            double t0 = now_seconds();
            st = moe_forward(&vc, &vw, x, T, y, &info, ws, ws_bytes);
            times[run] = now_seconds() - t0;
            if (st != MOE_STATUS_OK) { fprintf(stderr, "moe_forward: %s\n", moe_status_string(st)); return 1; }
        }
        free(packed);
        qsort(times, runs, sizeof(double), cmp_double);
        /* router GEMM + three D x F GEMMs (gate, up, down) per processed pair */
        flops = 2.0 * T * D * E;
        for (d = 0; d < E; d++) flops += 6.0 * info.expert_kept[d] * D * F;
        printf("  %-26s %10.2f  %7.2f-%-9.2f %8.2f\n", names[variant], 1e3 * times[runs / 2],
               1e3 * times[0], 1e3 * times[runs - 1], flops / times[runs / 2] * 1e-9);
    }
    printf("\ndropless (Mixtral):\n");
    print_load(&info, E, T, K);
    printf("  aux: balance (HF, = K at balance) %.4f, z-loss %.4f, total %.6f\n\n",
           info.aux_balance, info.aux_z, info.aux_total);

    /* the same layer with a capacity: C = ceil(1.0 * T * K / E) */
    cfg.capacity_factor = 1.0f;
    moe_forward_workspace_size(&cfg, T, &ws_bytes);
    ws = realloc(ws, ws_bytes);
    if ((st = moe_forward(&cfg, &w, x, T, y, &info, ws, ws_bytes)) != MOE_STATUS_OK) {
        fprintf(stderr, "moe_forward: %s\n", moe_status_string(st));
        return 1;
    }
    printf("capacity factor 1.0 (C = %d per expert, drop by position):\n", (int)info.capacity);
    print_load(&info, E, T, K);
    printf("  dropped: %d of %d (token, expert) pairs; %d tokens got no expert\n",
           (int)info.dropped_pairs, (int)(T * K), (int)info.dropped_tokens);

    free((void *)w.router); free((void *)w.gate); free((void *)w.up); free((void *)w.down);
    free(x); free(y); free(ws); free(info_buf);
    return 0;
}
