/* moe_cuda_bench.cu - times moe_cuda.cuh on a GPU (bench/gpu_check.sh builds and runs it).

   For each layer shape: the forward (tensor-core path) against cuBLAS bf16
   GEMMs of the same FLOPs (the two projections of every kept token-expert
   pair as two dense GEMMs, fp32 accumulation), the routing kernel alone,
   the backward, and decode (T = 1..16) against the measured copy bandwidth on the bytes
   the step must read (the touched experts' bf16 weights and the router).

   Method (no number without these): random inputs (never zeros), y poisoned
   with NaN before the first forward and checked finite after it, the tensor
   path checked against the fp32 path on 32 tokens of the real shape, every
   CUDA call checked, warm-up first, device events around each repetition,
   median with min-max. Ceilings measured in the same run: a device-to-device
   copy (bytes read + written) and cuBLAS.

   Usage: moe_cuda_bench [--tiny]
   --tiny runs small shapes, for the emulator (g++ -DCUDA_EMU): it exercises
   this program's plumbing; its times mean nothing. Without a GPU the nvcc
   build prints SKIP. The backward is timed on the tensor cores at each T
   and on the fp32 kernels at T = 1024 (or the first T when smaller). */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "../moe_cuda.cuh"
#ifndef CUDA_EMU
#  include <cublas_v2.h>
#endif
#include <algorithm>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <string>
#include <vector>

#define CK(call)                                                                      \
    do {                                                                              \
        const cudaError_t e_ = (call);                                                \
        if (e_ != cudaSuccess) {                                                      \
            printf("FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #call,                 \
                   cudaGetErrorString(e_));                                           \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)
#define CK_MOE(call)                                                                  \
    do {                                                                              \
        const moe_status s_ = (call);                                                 \
        if (s_ != MOE_STATUS_OK) {                                                    \
            printf("FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #call,                 \
                   moe_status_string(s_));                                            \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

static void *dev_alloc(size_t bytes) {
    void *p = NULL;
    CK(cudaMalloc(&p, bytes ? bytes : 1));
    return p;
}

/* uniform in [-scale, scale) from a hash of (i, seed): any size, any order */
__global__ void fill_uniform(float *p, size_t n, uint32_t seed, float scale) {
    const size_t step = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        uint32_t h = (uint32_t)i * 2654435761u ^ (uint32_t)(i >> 32) * 40503u ^ seed;
        h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
        p[i] = scale * ((float)(h >> 8) * (2.0f / 16777216.0f) - 1.0f);
    }
}
static float *random_floats(size_t n, uint32_t seed, float scale) {
    float *p = (float *)dev_alloc(n * sizeof(float));
    const unsigned blocks = (unsigned)std::min<size_t>(1024, (n + 255) / 256);
    CK(MOE_CUDA_LAUNCH(fill_uniform, dim3(blocks ? blocks : 1), dim3(256), 0, 0, p, n, seed,
                       scale));
    return p;
}

/* median, min and max of `reps` timed runs of f (after `warm` untimed ones) */
typedef struct timing { double med, lo, hi; } timing;
template <class F> static timing time_ms(F f, int warm, int reps) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int i = 0; i < warm; i++) f();
    std::vector<double> ms;
    for (int i = 0; i < reps; i++) {
        CK(cudaEventRecord(a, 0));
        f();
        CK(cudaEventRecord(b, 0));
        CK(cudaEventSynchronize(b));
        float t = 0.0f;
        CK(cudaEventElapsedTime(&t, a, b));
        ms.push_back(t);
    }
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    std::sort(ms.begin(), ms.end());
    timing r = {ms[ms.size() / 2], ms.front(), ms.back()};
    return r;
}

typedef struct shape { const char *name; int D, F, E, K; std::vector<int> Ts; } shape;

/* One layer's device buffers, sized for its largest T. */
typedef struct layer {
    moe_config c;
    moe_weights w;
    float *x, *y;
    void *packed, *ws;
    size_t packed_bytes, ws_bytes;
    int32_t *expert;   /* info.expert for the decode's touched experts */
} layer;

static layer make_layer(const shape &s, int t_max) {
    layer L;
    memset(&L, 0, sizeof L);
    L.c = moe_preset_mixtral();   /* softmax top-k, renormalised, SwiGLU, balance loss */
    L.c.num_experts = s.E; L.c.top_k = s.K; L.c.d_model = s.D; L.c.d_ff = s.F;
    const size_t E = (size_t)s.E, D = (size_t)s.D, F = (size_t)s.F;
    L.w.router = random_floats(E * D, 1u, 1.0f / sqrtf((float)D));
    L.w.gate = random_floats(E * F * D, 2u, 1.0f / sqrtf((float)D));
    L.w.up = random_floats(E * F * D, 3u, 1.0f / sqrtf((float)D));
    L.w.down = random_floats(E * D * F, 4u, 1.0f / sqrtf((float)F));
    L.x = random_floats((size_t)t_max * D, 5u, 1.0f);
    L.y = (float *)dev_alloc((size_t)t_max * D * sizeof(float));
    L.expert = (int32_t *)dev_alloc((size_t)t_max * s.K * sizeof(int32_t));
    CK_MOE(moe_cuda_pack_size(&L.c, &L.packed_bytes));
    L.packed = dev_alloc(L.packed_bytes);
    CK_MOE(moe_cuda_pack_weights(&L.c, &L.w, L.packed, L.packed_bytes));
    L.w.packed = L.packed;
    L.w.packed_bytes = L.packed_bytes;
    CK_MOE(moe_cuda_forward_workspace_size(&L.c, t_max, &L.ws_bytes));
    L.ws = dev_alloc(L.ws_bytes);
    CK(cudaDeviceSynchronize());
    return L;
}
static void free_layer(layer *L) {
    CK(cudaFree((void *)L->w.router)); CK(cudaFree((void *)L->w.gate));
    CK(cudaFree((void *)L->w.up)); CK(cudaFree((void *)L->w.down));
    CK(cudaFree(L->x)); CK(cudaFree(L->y)); CK(cudaFree(L->expert));
    CK(cudaFree(L->packed)); CK(cudaFree(L->ws));
}

static void forward(layer *L, const moe_config *c, int T, moe_info *info) {
    CK_MOE(moe_cuda_forward(c, &L->w, L->x, T, L->y, info, L->ws, L->ws_bytes));
}

/* The first forward of a shape: NaN-poisoned y, status OK, every y finite,
   and the tensor path within bf16 error of the fp32 path on 32 tokens
   (relative to the norm: bf16 operands give 1e-3 to 1e-2, never more). */
static int check_layer(layer *L, int D) {
    const int T = 32;
    std::vector<float> y16((size_t)T * D), y32((size_t)T * D);
    moe_config ref = L->c;
    ref.isa = MOE_ISA_REFERENCE;
    CK(cudaMemset(L->y, 0xff, (size_t)T * D * sizeof(float)));
    forward(L, &ref, T, NULL);
    CK_MOE(moe_cuda_forward_result(L->ws, NULL));
    CK(cudaMemcpy(y32.data(), L->y, y32.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemset(L->y, 0xff, (size_t)T * D * sizeof(float)));
    forward(L, &L->c, T, NULL);
    CK_MOE(moe_cuda_forward_result(L->ws, NULL));
    CK(cudaMemcpy(y16.data(), L->y, y16.size() * 4, cudaMemcpyDeviceToHost));
    double num = 0.0, den = 0.0;
    int finite = 1;
    for (size_t i = 0; i < y16.size(); i++) {
        finite &= y16[i] - y16[i] == 0.0f && y32[i] - y32[i] == 0.0f;
        num += ((double)y16[i] - y32[i]) * ((double)y16[i] - y32[i]);
        den += (double)y32[i] * y32[i];
    }
    const double rel = sqrt(num / (den > 0.0 ? den : 1.0));
    printf("  check: tensor path vs fp32 path, 32 tokens: |dy|/|y| = %.2e%s\n", rel,
           finite ? "" : ", NOT FINITE");
    return finite && den > 0.0 && rel < 2e-2;
}

#ifndef CUDA_EMU
/* cuBLAS, row-major C[M][N] = A[M][K] B[N][K]^T in bf16 with fp32 accumulation */
static void gemm_bf16(cublasHandle_t h, int M, int N, int K, const void *A, const void *B,
                      void *C, cudaDataType c_type) {
    const float one = 1.0f, zero = 0.0f;
    const cublasStatus_t st =
        cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, B, CUDA_R_16BF, K, A,
                     CUDA_R_16BF, K, &zero, C, c_type, N, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) { printf("FAIL cublasGemmEx: %d\n", (int)st); exit(1); }
}
__global__ void to_bf16(const float *in, __nv_bfloat16 *out, size_t n) {
    const size_t step = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step)
        out[i] = __float2bfloat16(in[i]);
}
static __nv_bfloat16 *random_bf16(size_t n, uint32_t seed, float scale) {
    float *f = random_floats(n, seed, scale);
    __nv_bfloat16 *b = (__nv_bfloat16 *)dev_alloc(n * 2);
    CK(MOE_CUDA_LAUNCH(to_bf16, dim3(1024), dim3(256), 0, 0, (const float *)f, b, n));
    CK(cudaDeviceSynchronize());
    CK(cudaFree(f));
    return b;
}
/* The forward's two projections over M = T K rows as dense GEMMs. */
static timing cublas_same_flops(cublasHandle_t h, int M, int D, int F, int reps) {
    __nv_bfloat16 *A = random_bf16((size_t)M * D, 11u, 1.0f);
    __nv_bfloat16 *W1 = random_bf16((size_t)2 * F * D, 12u, 0.02f);
    __nv_bfloat16 *W2 = random_bf16((size_t)D * F, 13u, 0.02f);
    __nv_bfloat16 *H = (__nv_bfloat16 *)dev_alloc((size_t)M * 2 * F * 2);
    float *O = (float *)dev_alloc((size_t)M * D * 4);
    const timing t = time_ms([&] {
        gemm_bf16(h, M, 2 * F, D, A, W1, H, CUDA_R_16BF);
        gemm_bf16(h, M, D, F, H, W2, O, CUDA_R_32F);   /* H read as [M][F] */
    }, 2, reps);
    CK(cudaGetLastError());
    CK(cudaFree(A)); CK(cudaFree(W1)); CK(cudaFree(W2)); CK(cudaFree(H)); CK(cudaFree(O));
    return t;
}
#endif

int main(int argc, char **argv) {
    const int tiny = argc > 1 && strcmp(argv[1], "--tiny") == 0;
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        printf("SKIP: no CUDA device (cudaGetDeviceCount says %s)\n",
               cudaGetErrorString(cudaGetLastError()));
        return 0;
    }
    std::vector<shape> shapes;
    std::vector<int> decode_T;
    int reps_big, reps_small;
    if (tiny) {
        shapes.push_back(shape{"mixtral-tiny", 72, 80, 8, 2, {64, 100}});
        shapes.push_back(shape{"fine-tiny", 40, 24, 64, 6, {64}});
        decode_T = {1, 3};
        reps_big = 2; reps_small = 2;
    } else {
        shapes.push_back(shape{"mixtral", 4096, 14336, 8, 2, {4096, 16384}});
        shapes.push_back(shape{"fine", 2048, 1408, 64, 6, {4096, 16384}});
        decode_T = {1, 2, 4, 8, 16};
        reps_big = 10; reps_small = 50;
    }

    /* the bandwidth ceiling: a device-to-device copy, bytes read + written */
    double copy_gbs = 0.0;
    {
        const size_t n = tiny ? ((size_t)1 << 16) : ((size_t)1 << 30);
        void *a = dev_alloc(n), *b = dev_alloc(n);
        CK(cudaMemset(a, 1, n));
        const timing t = time_ms([&] { CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice)); },
                                 2, reps_small);
        copy_gbs = 2.0 * (double)n / (t.med * 1e-3) / 1e9;
        printf("copy ceiling: %.0f GB/s (%.0f-%.0f), %zu MiB device to device\n", copy_gbs,
               2.0 * n / (t.hi * 1e-3) / 1e9, 2.0 * n / (t.lo * 1e-3) / 1e9, n >> 20);
        CK(cudaFree(a)); CK(cudaFree(b));
    }
#ifndef CUDA_EMU
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs, %.0f GiB\n", prop.name, prop.multiProcessorCount,
           (double)prop.totalGlobalMem / (1 << 30));
    cublasHandle_t blas;
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) { printf("FAIL cublasCreate\n"); return 1; }
#endif

    std::vector<std::string> table;
    char line[256];
    int ok = 1;
    for (const shape &s : shapes) {
        const int t_max = *std::max_element(s.Ts.begin(), s.Ts.end());
        printf("%s: D=%d F=%d E=%d K=%d, SwiGLU, softmax top-k renormalised\n", s.name, s.D,
               s.F, s.E, s.K);
        layer L = make_layer(s, t_max);
        ok &= check_layer(&L, s.D);

        /* routing alone (the route kernel: logits, scores, top-k, weights) */
        for (int T : s.Ts) {
            moe_cuda__plan p;
            moe_cuda__ws ws;
            CK_MOE(moe_cuda__plan_of(&L.c, T, &p));
            moe_cuda__bind(&p, moe_cuda__aligned(L.ws), &ws);
            CK(cudaMemset(ws.report, 0, sizeof *ws.report));
            const timing t = time_ms([&] { CK(moe_cuda__route(&p, &L.w, L.x, &ws, 0)); }, 3,
                                     reps_small);
            snprintf(line, sizeof line, "%-13s T=%-6d routing      %9.1f us (%.1f-%.1f)",
                     s.name, T, t.med * 1e3, t.lo * 1e3, t.hi * 1e3);
            table.push_back(line);
        }

        /* the forward against cuBLAS at the same FLOPs */
        std::vector<double> fwd_tflops;
        for (int T : s.Ts) {
            const timing t = time_ms([&] { forward(&L, &L.c, T, NULL); }, 2, reps_big);
            moe_info info;
            memset(&info, 0, sizeof info);
            CK_MOE(moe_cuda_forward_result(L.ws, &info));
            const double pairs = (double)T * s.K - info.dropped_pairs;
            const double flops = 2.0 * pairs * (3.0 * s.D * s.F);
            fwd_tflops.push_back(flops / (t.med * 1e-3) / 1e12);
            snprintf(line, sizeof line,
                     "%-13s T=%-6d forward      %9.3f ms (%.3f-%.3f) %7.1f TFLOP/s", s.name, T,
                     t.med, t.lo, t.hi, fwd_tflops.back());
            std::string row = line;
#ifndef CUDA_EMU
            const timing b = cublas_same_flops(blas, T * s.K, s.D, s.F, reps_big);
            snprintf(line, sizeof line, ", cuBLAS %.3f ms %.1f TFLOP/s: %.0f %% of cuBLAS",
                     b.med, flops / (b.med * 1e-3) / 1e12, 100.0 * b.med / t.med);
            row += line;
#endif
            table.push_back(row);
        }

        /* the backward after a saving forward, on the tensor cores at each T
           (its TFLOP/s against the forward's) and on the fp32 kernels at
           T = 1024 at most (plain loops: seconds per call on the large shapes).
           Counted FLOPs: dx and the weight gradients, twice the forward's
           expert FLOPs; the backward also recomputes the forward (no
           activation cache), so the counted rate is at most 2/3 of the
           GEMMs' own: the ratio is also printed with the recompute counted. */
        for (size_t ti = 0; ti <= s.Ts.size(); ti++) {
            const int simt = ti == s.Ts.size(), T = simt ? std::min(s.Ts[0], 1024) : s.Ts[ti];
            moe_config tc = L.c;
            tc.training = 1; tc.save_for_backward = 1;
            if (simt) tc.isa = MOE_ISA_REFERENCE;
            const size_t TE = (size_t)T * s.E, TK = (size_t)T * s.K, TD = (size_t)T * s.D;
            const size_t E = (size_t)s.E, D = (size_t)s.D, F = (size_t)s.F;
            moe_info info;
            memset(&info, 0, sizeof info);
            info.logits = (float *)dev_alloc(TE * 4); info.scores = (float *)dev_alloc(TE * 4);
            info.expert = (int32_t *)dev_alloc(TK * 4); info.weight = (float *)dev_alloc(TK * 4);
            info.dropped = (uint8_t *)dev_alloc(TK);
            CK_MOE(moe_cuda_forward(&tc, &L.w, L.x, T, L.y, &info, L.ws, L.ws_bytes));
            CK_MOE(moe_cuda_forward_result(L.ws, &info));
            moe_grads g;
            memset(&g, 0, sizeof g);
            g.router = random_floats(E * D, 21u, 0.0f);
            g.gate = random_floats(E * F * D, 22u, 0.0f);
            g.up = random_floats(E * F * D, 23u, 0.0f);
            g.down = random_floats(E * D * F, 24u, 0.0f);
            float *dy = random_floats(TD, 25u, 1.0f), *dx = (float *)dev_alloc(TD * 4);
            size_t bb = 0;
            CK_MOE(moe_cuda_backward_workspace_size(&tc, T, &bb));
            void *bws = dev_alloc(bb);
            const timing t = time_ms([&] {
                CK_MOE(moe_cuda_backward(&tc, &L.w, L.x, T, &info, dy, dx, &g, bws, bb));
            }, 1, simt ? 2 : reps_big);
            CK(cudaDeviceSynchronize());
            const double pairs = (double)TK - info.dropped_pairs;
            const double tflops = 2.0 * 2.0 * pairs * 3.0 * D * F / (t.med * 1e-3) / 1e12;
            snprintf(line, sizeof line, "%-13s T=%-6d backward     %9.3f ms (%.3f-%.3f) %7.1f "
                     "TFLOP/s", s.name, T, t.med, t.lo, t.hi, tflops);
            std::string row = line;
            if (simt) row += " (fp32 kernels)";
            else {
                snprintf(line, sizeof line, ": forward / backward TFLOP/s %.2f (%.2f counting "
                         "the recomputed forward)", fwd_tflops[ti] / tflops,
                         fwd_tflops[ti] / (1.5 * tflops));
                row += line;
            }
            table.push_back(row);
            CK(cudaFree(info.logits)); CK(cudaFree(info.scores)); CK(cudaFree(info.expert));
            CK(cudaFree(info.weight)); CK(cudaFree(info.dropped));
            CK(cudaFree(g.router)); CK(cudaFree(g.gate)); CK(cudaFree(g.up));
            CK(cudaFree(g.down)); CK(cudaFree(dy)); CK(cudaFree(dx)); CK(cudaFree(bws));
        }

        /* decode: bytes the step must read over its time */
        for (int T : decode_T) {
            moe_info info;
            memset(&info, 0, sizeof info);
            info.expert = L.expert;
            const timing t = time_ms([&] { forward(&L, &L.c, T, &info); }, 3, reps_small);
            CK_MOE(moe_cuda_forward_result(L.ws, &info));
            std::vector<int32_t> ex((size_t)T * s.K);
            CK(cudaMemcpy(ex.data(), L.expert, ex.size() * 4, cudaMemcpyDeviceToHost));
            std::sort(ex.begin(), ex.end());
            const double touched = (double)(std::unique(ex.begin(), ex.end()) - ex.begin());
            const double bytes = touched * 3.0 * s.D * s.F * 2.0 + (double)s.E * s.D * 4.0 +
                                 2.0 * T * s.D * 4.0;
            const double gbs = bytes / (t.med * 1e-3) / 1e9;
            snprintf(line, sizeof line,
                     "%-13s T=%-6d decode       %9.1f us (%.1f-%.1f) %2.0f experts %7.0f GB/s "
                     "%3.0f %% of copy", s.name, T, t.med * 1e3, t.lo * 1e3, t.hi * 1e3,
                     touched, gbs, 100.0 * gbs / copy_gbs);
            table.push_back(line);
        }
        free_layer(&L);
    }
#ifndef CUDA_EMU
    cublasDestroy(blas);
#endif
    printf("\n");
    printf("%s\n", tiny ? "(--tiny on the emulator: the times mean nothing)" : "");
    for (const std::string &r : table) printf("%s\n", r.c_str());
    printf("%s\n", ok ? "bench: checks passed" : "FAIL bench: a check failed");
    return ok ? 0 : 1;
}
