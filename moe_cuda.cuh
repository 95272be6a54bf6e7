/* moe_cuda.cuh - moe.h's MoE layer on NVIDIA GPUs (sm_80 and newer)
   no warranty implied; use at your own risk. License: MIT, as moe.h.

   STATUS
     The forward of token-choice (top-k) routing runs: routing, capacity,
     dispatch, the grouped expert GEMMs on tensor cores, the shared expert,
     the combine and the aux losses, all on the device; and the backward of
     every config the forward runs, its expert GEMMs on the tensor cores too.
     Verified on the CPU emulator in tests/cuda_emu against moe.h; built by
     nvcc for sm_80 and sm_90a without spills; NOT YET MEASURED ON A GPU.

   USAGE
     In a .cu file, after moe.h (with MOE_IMPLEMENTATION in one file):
         #include "moe.h"
         #include "moe_cuda.cuh"
     Same moe_config, presets and statuses as moe.h; moe_weights, x, y and
     the moe_info arrays are DEVICE pointers. Per layer, once:
         moe_cuda_pack_size(&cfg, &pb);  cudaMalloc(&packed, pb);
         moe_cuda_pack_weights(&cfg, &w, packed, pb, stream);
         w.packed = packed; w.packed_bytes = pb;
     Per call:
         moe_cuda_forward_workspace_size(&cfg, T, &wb);       (cudaMalloc once)
         st = moe_cuda_forward(&cfg, &w, x, T, y, &info, ws, wb, stream);
         ... more work on the stream ...
         st = moe_cuda_forward_result(ws, &info, stream);     (waits)
     Training: cfg.save_for_backward = 1 and info's device arrays logits,
     scores, expert, weight and dropped; the result stamps info; then
         moe_cuda_backward_workspace_size(&cfg, T, &bb);      (cudaMalloc once)
         st = moe_cuda_backward(&cfg, &w, x, T, &info, dy, dx, &grads, bws, bb,
                                stream);     (dx overwritten, grads accumulate)
     moe_cuda_forward checks everything the host can know (config, shapes,
     pointers, sizes, overlaps) and queues the kernels: it neither allocates
     nor waits, and the launch geometry depends only on T and the config, so
     the call can be captured in a CUDA graph. What only the device can know
     comes from moe_cuda_forward_result: MOE_STATUS_NONFINITE when a router
     logit or the selection bias is NaN or Inf (then y and the info arrays are
     left as they were), and info's scalars (drops, aux losses).

   WHAT RUNS WHERE
     cfg.isa = MOE_ISA_REFERENCE runs the experts with the plain fp32 kernels
     (moe_cuda__ffn_*_ref: one thread per output, obvious loops, fp32 weights
     from w.gate / w.up / w.down, no packing): the specification the tensor-
     core path is compared with on a GPU. Any other isa runs the tensor-core
     path: bf16 x and weights (w.packed), fp32 accumulation, bf16 hidden
     activations, fp32 everywhere else (router, scores, combine, losses).
     Not run (MOE_STATUS_CUDA_UNSUPPORTED, checked first): expert choice,
     dense and Soft MoE, random or sampled second experts, Shazeer noise,
     jitter, warm-up noise and expert dropout in training, the BPR and weight
     drop policies, more than 256 experts or top_k > 32.

   DETERMINISM
     No float atomics: every sum has one fixed order, so a forward or a
     backward gives the same bits on every run of the same GPU and build.

   CONTENTS (pipeline order)
     PTX wrappers; routing; capacity; dispatch; weight packing; grouped GEMM
     with fused epilogues; the plain fp32 expert FFN; combine; aux losses and
     counts; the backward's kernels; the host API (forward, then backward).
*/
#ifndef MOE_CUDA_CUH
#define MOE_CUDA_CUH

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifndef MOE_H_INCLUDED
#  error "include moe.h before moe_cuda.cuh"
#endif
#ifdef CUDA_EMU
#  include "cuda_emu.h"
#  define MOE_CUDA_LAUNCH(kernel, grid, block, smem, stream, ...) \
       CUDA_EMU_LAUNCH(kernel, grid, block, smem, stream, __VA_ARGS__)
#else
#  include <cuda_runtime.h>
#  include <cuda_bf16.h>
/* kernel<<<grid, block, smem, stream>>>(...) as an expression: the launch's error */
#  define MOE_CUDA_LAUNCH(kernel, grid, block, smem, stream, ...) \
       (kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__), cudaGetLastError())
#endif

/* loops over register arrays must unroll (a dynamic index puts the array in
   local memory); g++ has no such pragma and needs none */
#ifdef CUDA_EMU
#  define MOE_CUDA_UNROLL
#else
#  define MOE_CUDA_UNROLL _Pragma("unroll")
#endif

// ----------------------------------------------------------------------------
// One PTX instruction each: inline PTX under nvcc, the emulator's body under
// CUDA_EMU (the fragment layouts are in tests/cuda_emu/cuda_emu.h).

/* The block's dynamic shared memory (16-byte aligned). */
__device__ __forceinline__ unsigned char *moe_cuda__smem() {
#ifdef CUDA_EMU
    return cuda_emu::dynamic_smem();
#else
    extern __shared__ __align__(16) unsigned char moe_cuda__smem_[];
    return moe_cuda__smem_;
#endif
}

/* d = a b + c: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 */
__device__ __forceinline__ void moe_cuda__mma(float d[4], const uint32_t a[4],
                                              const uint32_t b[2], const float c[4]) {
#ifdef CUDA_EMU
    cuda_emu::mma_m16n8k16_bf16(__FILE__, __LINE__, d, a, b, c);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

/* ldmatrix.sync.aligned.m8n8.x4.shared.b16 (and .trans): `row` is this
   lane's row address in shared memory (lanes 8j..8j+7: the rows of matrix j). */
__device__ __forceinline__ void moe_cuda__ldmatrix_x4(uint32_t r[4], const void *row) {
#ifdef CUDA_EMU
    cuda_emu::ldmatrix(__FILE__, __LINE__, r, 4, false, row);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}
__device__ __forceinline__ void moe_cuda__ldmatrix_x4_trans(uint32_t r[4], const void *row) {
#ifdef CUDA_EMU
    cuda_emu::ldmatrix(__FILE__, __LINE__, r, 4, true, row);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}

/* cp.async.cg.shared.global: 16 bytes, of which src_bytes (0 or 16) are
   read and the rest zero-filled; commit_group; wait_group N. */
__device__ __forceinline__ void moe_cuda__cp_async16(void *smem_dst, const void *src,
                                                     int src_bytes) {
#ifdef CUDA_EMU
    cuda_emu::cp_async(__FILE__, __LINE__, smem_dst, src, 16, src_bytes);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(src),
                 "r"(src_bytes));
#endif
}
__device__ __forceinline__ void moe_cuda__cp_async_commit() {
#ifdef CUDA_EMU
    cuda_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> __device__ __forceinline__ void moe_cuda__cp_async_wait() {
#ifdef CUDA_EMU
    cuda_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}


// ----------------------------------------------------------------------------
// Token-choice routing, one warp per token (moe.h's moe__route_token_topk
// without noise): logits z = x W^T (+ router bias) summed in d order with
// fmaf; scores softmax / sigmoid; keys = score (+ selection bias); the group
// limit (group score = sum of its top group_score_top keys, the best
// topk_group groups kept, the rest -inf or 0); top-k by (key desc, index
// asc); weights from the unbiased scores, normalised (sum, p-norm, none) in
// double as moe.h does, times routed_scale. Expert e lives in lane e % 32,
// slot e / 32 (E <= 256). A non-finite logit or selection bias sets *halt
// (moe.h returns MOE_STATUS_NONFINITE there): every later kernel then exits.
// For the aux losses each token also leaves LSE(z)^2, the sum of its scores
// and, when keys differ from scores, the plain top-k of the scores.

enum { MOE_CUDA__MAX_EXPERTS = 256, MOE_CUDA__MAX_TOP_K = 32,
       MOE_CUDA__SLOTS = MOE_CUDA__MAX_EXPERTS / 32, MOE_CUDA__ROUTE_WARPS = 4 };

typedef struct moe_cuda__route_args {
    const float *x, *router, *router_bias, *selection_bias;   /* biases may be NULL */
    int tokens, d, experts, top_k, sigmoid;
    int n_group, topk_group, group_score_top, group_mask_zero;
    int normalize;   /* moe_norm */
    float norm_p, norm_eps, routed_scale;
    float *logits, *scores, *weight;   /* [T][E], [T][E], [T][K] (before capacity) */
    int32_t *expert;                   /* [T][K] */
    uint8_t *dropped;                  /* [T][K], all 0 (capacity comes after) */
    double *lse_sq, *score_sum;        /* [T] */
    int32_t *plain;                    /* [T][K] plain top-k of the scores, or NULL */
    int32_t *halt;
} moe_cuda__route_args;

/* sigmoid without overflow for large |v| (moe.h's moe__sigmoid); host too */
__host__ __device__ __forceinline__ float moe_cuda__sigmoid(float v) {
    return v >= 0.0f ? 1.0f / (1.0f + expf(-v)) : expf(v) / (1.0f + expf(v));
}

/* (value, index) ordering of every top-k: larger value first, then lower index */
__device__ __forceinline__ bool moe_cuda__before(float v, int i, float w, int j) {
    return v > w || (v == w && i < j);
}
/* The warp's best (value, index) of the candidates each lane offers. */
__device__ __forceinline__ void moe_cuda__warp_best(float *v, int *i) {
    for (int o = 16; o > 0; o /= 2) {
        const float w = __shfl_xor_sync(0xffffffffu, *v, o);
        const int j = __shfl_xor_sync(0xffffffffu, *i, o);
        if (moe_cuda__before(w, j, *v, *i)) { *v = w; *i = j; }
    }
}
/* The best untaken entry of val[] (slots in use: e = lane + 32 s < n, and
   lo <= e < hi), over the warp; marks nothing. */
__device__ __forceinline__ void moe_cuda__best_of(const float *val, unsigned taken, int n, int lo,
                                                  int hi, float *v, int *i) {
    const int lane = (int)threadIdx.x & 31;
    *v = -INFINITY;
    *i = 0x7fffffff;   /* loses every tie: a valid -inf entry still wins */
MOE_CUDA_UNROLL
    for (int s = 0; s < MOE_CUDA__SLOTS; s++) {
        const int e = lane + 32 * s;
        const bool open = e < n && e >= lo && e < hi && !(taken >> s & 1u);
        if (open && moe_cuda__before(val[s], e, *v, *i)) {
            *v = val[s];
            *i = e;
        }
    }
    moe_cuda__warp_best(v, i);
}
template <class V> __device__ __forceinline__ V moe_cuda__warp_sum(V v) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
/* slot s of this lane's array, for a slot index uniform across the warp */
__device__ __forceinline__ float moe_cuda__slot(const float *a, int s) {
    float r = 0.0f;
MOE_CUDA_UNROLL
    for (int q = 0; q < MOE_CUDA__SLOTS; q++) if (q == s) r = a[q];
    return r;
}

__global__ void __launch_bounds__(32 * MOE_CUDA__ROUTE_WARPS)
moe_cuda__route_topk(moe_cuda__route_args a) {
    const int lane = (int)threadIdx.x & 31;
    const int t = (int)blockIdx.x * MOE_CUDA__ROUTE_WARPS + ((int)threadIdx.x >> 5);
    if (t >= a.tokens) return;   /* whole warps: no collective loses a lane */
    const int E = a.experts;
    const float *xt = a.x + (size_t)t * a.d;
    float z[MOE_CUDA__SLOTS], sc[MOE_CUDA__SLOTS], key[MOE_CUDA__SLOTS];
    bool finite = true;

    /* logits, and their maximum for the softmax */
    float zmax = -INFINITY;
MOE_CUDA_UNROLL
    for (int s = 0; s < MOE_CUDA__SLOTS; s++) {
        const int e = lane + 32 * s;
        z[s] = 0.0f;
        if (e < E) {
            const float *we = a.router + (size_t)e * a.d;
            float acc = 0.0f;
            for (int k = 0; k < a.d; k++) acc = fmaf(xt[k], we[k], acc);
            if (a.router_bias) acc += a.router_bias[e];
            z[s] = acc;
            a.logits[(size_t)t * E + e] = acc;
            finite = finite && acc - acc == 0.0f;
            if (a.selection_bias) {
                const float b = a.selection_bias[e];
                finite = finite && b - b == 0.0f;
            }
            zmax = fmaxf(zmax, acc);
        }
    }
    if (__ballot_sync(0xffffffffu, !finite)) {
        if (lane == 0) *a.halt = 1;
        return;   /* the whole warp */
    }
    for (int o = 16; o > 0; o /= 2) zmax = fmaxf(zmax, __shfl_xor_sync(0xffffffffu, zmax, o));

    /* scores, and LSE(z) in double for the z-loss (moe.h's moe__logsumexp) */
    float part = 0.0f;
    double part_exp = 0.0;
MOE_CUDA_UNROLL
    for (int s = 0; s < MOE_CUDA__SLOTS; s++) {
        const int e = lane + 32 * s;
        sc[s] = 0.0f;
        if (e < E) {
            sc[s] = a.sigmoid ? moe_cuda__sigmoid(z[s]) : expf(z[s] - zmax);
            part += sc[s];
            part_exp += exp((double)z[s] - (double)zmax);
        }
    }
    const float sum = a.sigmoid ? 1.0f : moe_cuda__warp_sum(part);
    const double lse = (double)zmax + log(moe_cuda__warp_sum(part_exp));
    double score_sum = 0.0;
MOE_CUDA_UNROLL
    for (int s = 0; s < MOE_CUDA__SLOTS; s++) {
        const int e = lane + 32 * s;
        if (e < E) {
            if (!a.sigmoid) sc[s] /= sum;
            a.scores[(size_t)t * E + e] = sc[s];
            score_sum += sc[s];
            key[s] = sc[s] + (a.selection_bias ? a.selection_bias[e] : 0.0f);
        }
    }
    score_sum = moe_cuda__warp_sum(score_sum);
    if (lane == 0) { a.lse_sq[t] = lse * lse; a.score_sum[t] = score_sum; }

    /* group limit: groups of gsz experts; group g's score in lane g % 32, slot g / 32 */
    if (a.n_group > 1) {
        const int G = a.n_group, gsz = E / G;
        float gscore[MOE_CUDA__SLOTS];
MOE_CUDA_UNROLL
        for (int s = 0; s < MOE_CUDA__SLOTS; s++) gscore[s] = 0.0f;
        for (int g = 0; g < G; g++) {
            unsigned taken = 0;
            float total = 0.0f;
            for (int j = 0; j < a.group_score_top; j++) {
                float v;
                int i;
                moe_cuda__best_of(key, taken, E, g * gsz, (g + 1) * gsz, &v, &i);
                total += v;   /* in descending order, as moe.h adds them */
                if ((i & 31) == lane) taken |= 1u << (i >> 5);
            }
MOE_CUDA_UNROLL
            for (int s = 0; s < MOE_CUDA__SLOTS; s++) if (g == lane + 32 * s) gscore[s] = total;
        }
        unsigned kept = 0;   /* bit s: group lane + 32 s is kept */
        for (int j = 0; j < a.topk_group; j++) {
            float v;
            int i;
            moe_cuda__best_of(gscore, kept, G, 0, G, &v, &i);
            if ((i & 31) == lane) kept |= 1u << (i >> 5);
        }
MOE_CUDA_UNROLL
        for (int s = 0; s < MOE_CUDA__SLOTS; s++) {
            const int e = lane + 32 * s, g = e < E ? e / gsz : 0;
            const unsigned owner = __shfl_sync(0xffffffffu, kept, g & 31);
            if (e < E && !(owner >> (g >> 5) & 1u)) key[s] = a.group_mask_zero ? 0.0f : -INFINITY;
        }
    }

    /* top-k, and the gate weights from the unbiased scores */
    unsigned taken = 0;
    int chosen = -1;   /* lane j < K holds slot j: its expert and score */
    float g = 0.0f;
    for (int j = 0; j < a.top_k; j++) {
        float v;
        int i;
        moe_cuda__best_of(key, taken, E, 0, E, &v, &i);
        if ((i & 31) == lane) taken |= 1u << (i >> 5);
        const float gi = __shfl_sync(0xffffffffu, moe_cuda__slot(sc, i >> 5), i & 31);
        if (lane == j) { chosen = i; g = gi; }
    }
    /* the sequence-wise loss counts a plain top-k of the scores (no bias, no
       groups); where the keys are the scores, that is the top-k above */
    if (a.plain) {
        unsigned plain_taken = 0;
        for (int j = 0; j < a.top_k; j++) {
            float v;
            int i;
            moe_cuda__best_of(sc, plain_taken, E, 0, E, &v, &i);
            if ((i & 31) == lane) plain_taken |= 1u << (i >> 5);
            if (lane == 0) a.plain[(size_t)t * a.top_k + j] = i;
        }
    }
    /* normaliser over the K slots (lanes 0..K-1; K <= 32 here), in slot order */
    double den = 0.0;
    if (a.normalize == MOE_NORM_PNORM) {
        double m = 0.0, s1 = 0.0;
        for (int j = 0; j < a.top_k; j++) {
            const double v = fabs((double)__shfl_sync(0xffffffffu, g, j));
            if (a.norm_p == 1.0f) s1 += v;
            if (v > m) m = v;
        }
        if (a.norm_p != 1.0f && m != 0.0) {
            for (int j = 0; j < a.top_k; j++)
                s1 += pow(fabs((double)__shfl_sync(0xffffffffu, g, j)) / m, (double)a.norm_p);
            den = m * pow(s1, 1.0 / (double)a.norm_p);
        } else den = s1;
    } else {
        for (int j = 0; j < a.top_k; j++) den += __shfl_sync(0xffffffffu, g, j);
    }
    den += a.norm_eps;
    if (lane < a.top_k) {
        float w = g;
        if (a.normalize != MOE_NORM_NONE) w = den > 0.0 ? (float)((double)g / den) : 0.0f;
        const size_t p = (size_t)t * a.top_k + lane;
        a.expert[p] = chosen;
        a.weight[p] = w * a.routed_scale;
        a.dropped[p] = 0;
    }
}

// ----------------------------------------------------------------------------
// Capacity (moe.h's moe__apply_capacity, POSITION policy): an expert keeps
// its first C pairs in the order slot 0 of every token, then slot 1, ...,
// tokens in index order within a slot; the rest are dropped (dropped = 1).
// One block per expert walks the pairs in that order in chunks of 256, and a
// pair's place is the kept count before its chunk plus its rank in the chunk.
// Then the final weights: dropped pairs get 0, or (normalize_after_drop) the
// token's weights are normalised again over its kept pairs.

enum { MOE_CUDA__BLOCK = 256 };

/* The number of threads before this one in the block with `mine` set, and
   (*total) in the whole block. Every thread of the block calls it; warp_count
   is MOE_CUDA__BLOCK / 32 ints of shared memory. self_too (planted bugs only)
   counts the thread in its own rank. */
__device__ __forceinline__ int moe_cuda__block_rank(int mine, int32_t *warp_count, int *total,
                                                    bool self_too = false) {
    const int t = (int)threadIdx.x, lane = t & 31, warp = t >> 5;
    const unsigned votes = __ballot_sync(0xffffffffu, mine);
    const unsigned below = self_too ? (2u << lane) - 1u : (1u << lane) - 1u;
    __syncthreads();   /* the last call's readers are done with warp_count */
    if (lane == 0) warp_count[warp] = __popc(votes);
    __syncthreads();
    int before = 0;
    *total = 0;
    for (int w = 0; w < MOE_CUDA__BLOCK / 32; w++) {
        before += w < warp ? warp_count[w] : 0;
        *total += warp_count[w];
    }
    return before + __popc(votes & below);
}

__global__ void __launch_bounds__(MOE_CUDA__BLOCK)
moe_cuda__capacity(const int32_t *expert, int tokens, int top_k, int capacity, uint8_t *dropped,
                   const int32_t *halt) {
    __shared__ int32_t warp_count[MOE_CUDA__BLOCK / 32];
    if (*halt) return;
    const int e = (int)blockIdx.x;
    const int64_t pairs = (int64_t)tokens * top_k;
    int kept = 0;
    for (int64_t q0 = 0; q0 < pairs; q0 += MOE_CUDA__BLOCK) {
        const int64_t q = q0 + threadIdx.x;   /* slot-major: q = j T + t */
        const int64_t p = q < pairs ? q % tokens * top_k + q / tokens : 0;
        const int mine = q < pairs && expert[p] == e;
        int total;
        const int rank = moe_cuda__block_rank(mine, warp_count, &total);
        if (mine && kept + rank >= capacity) dropped[p] = 1;
        kept += total;
    }
}

/* moe.h's normaliser (moe__normalize, before eps) of a token's slot scores
   g_j = score_row[idx[j]]: their sum (SUM) or p-norm (PNORM), over the kept
   slots (only_kept) or all. The weights divide by it; the backward too. */
__device__ __forceinline__ double moe_cuda__slot_norm(const float *score_row,
                                                      const int32_t *idx, const uint8_t *dropped,
                                                      int k, int only_kept, int normalize,
                                                      float norm_p) {
    double s = 0.0, m = 0.0;
    for (int j = 0; j < k; j++) {
        if (only_kept && dropped[j]) continue;   /* (dropped may be NULL when !only_kept) */
        const double a = fabs((double)score_row[idx[j]]);
        if (normalize != MOE_NORM_PNORM) s += score_row[idx[j]];
        else if (norm_p == 1.0f) s += a;
        if (a > m) m = a;
    }
    if (normalize == MOE_NORM_PNORM && norm_p != 1.0f && m != 0.0) {
        s = 0.0;   /* m (sum (|g| / m)^p)^(1/p): no overflow for large p */
        for (int j = 0; j < k; j++)
            if (!(only_kept && dropped[j])) s += pow(fabs((double)score_row[idx[j]]) / m,
                                                     (double)norm_p);
        s = m * pow(s, 1.0 / (double)norm_p);
    }
    return s;
}

/* One thread per token: the final weights from the pre-capacity weight0. */
__global__ void moe_cuda__final_weights(const float *scores, int experts, const int32_t *expert,
                                        const uint8_t *dropped, const float *weight0,
                                        int tokens, int top_k, int after_drop, int normalize,
                                        float norm_p, float norm_eps, float routed_scale,
                                        float *weight, const int32_t *halt) {
    const int t = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (*halt || t >= tokens) return;
    const size_t p0 = (size_t)t * top_k;
    if (!after_drop) {
        for (int j = 0; j < top_k; j++) weight[p0 + j] = dropped[p0 + j] ? 0.0f : weight0[p0 + j];
        return;
    }
    /* moe.h's moe__normalize over the kept pairs, reading g from the scores */
    double den = normalize == MOE_NORM_NONE ? 0.0
                 : moe_cuda__slot_norm(scores + (size_t)t * experts, expert + p0,
                                       dropped + p0, top_k, 1, normalize, norm_p);
    den += norm_eps;
    for (int j = 0; j < top_k; j++) {
        const float v = dropped[p0 + j] ? 0.0f : scores[(size_t)t * experts + expert[p0 + j]];
        float w = v;
        if (normalize != MOE_NORM_NONE) w = den > 0.0 ? (float)(v / den) : 0.0f;
        weight[p0 + j] = w * routed_scale;
    }
}

// ----------------------------------------------------------------------------
// Dispatch: the kept (token, slot) pairs in expert-contiguous order, token
// order within an expert (moe.h's counting sort), and the gathered bf16 rows.
// One block per expert scans every pair in order, so each position is a
// plain count (no atomics, the same on every run):
//   1. moe_cuda__count_pairs   counts[e] = kept pairs of expert e
//   2. moe_cuda__scan_counts   offsets[0..E] = exclusive prefix sums (one block)
//   3. moe_cuda__gather_rows   row_of_pair[p], pair_of_row[row], and (A not
//                              NULL) A[row][0..d_pad) = bf16(x[t]) then zeros
// A pair is kept when expert[p] >= 0 and dropped[p] == 0; row_of_pair of any
// other pair must be set to -1 beforehand (cudaMemsetAsync 0xff).

__global__ void __launch_bounds__(MOE_CUDA__BLOCK)
moe_cuda__count_pairs(const int32_t *expert, const uint8_t *dropped, int pairs, int32_t *counts,
                      const int32_t *halt) {
    __shared__ int32_t warp_sum[MOE_CUDA__BLOCK / 32];
    if (*halt) return;
    const int e = (int)blockIdx.x, t = (int)threadIdx.x;
    int n = 0;
    for (int p = t; p < pairs; p += MOE_CUDA__BLOCK) n += expert[p] == e && !dropped[p];
    n = moe_cuda__warp_sum(n);
    if ((t & 31) == 0) warp_sum[t >> 5] = n;
    __syncthreads();
    if (t == 0) {
        int total = 0;
        for (int w = 0; w < MOE_CUDA__BLOCK / 32; w++) total += warp_sum[w];
        counts[e] = total;
    }
}

__global__ void moe_cuda__scan_counts(const int32_t *counts, int experts, int32_t *offsets,
                                      const int32_t *halt) {
    if (*halt) return;
    if (threadIdx.x == 0) {   /* E <= 256: one thread, in order */
        int32_t run = 0;
        for (int e = 0; e < experts; e++) { offsets[e] = run; run += counts[e]; }
        offsets[experts] = run;
    }
}

/* BUG (tests only, 0 in the library): 1 copies rows without the barrier after
   the chunk's list is written, 2 counts the lane itself in its prefix. */
template <int BUG>
__global__ void __launch_bounds__(MOE_CUDA__BLOCK)
moe_cuda__gather_rows(const int32_t *expert, const uint8_t *dropped, int pairs, int top_k,
                      const int32_t *offsets, const float *x, int d, int d_pad,
                      __nv_bfloat16 *A, int32_t *row_of_pair, int32_t *pair_of_row,
                      const int32_t *halt) {
    __shared__ int32_t warp_count[MOE_CUDA__BLOCK / 32];
    __shared__ int32_t chunk_token[MOE_CUDA__BLOCK];
    __shared__ int32_t chunk_row[MOE_CUDA__BLOCK];
    if (*halt) return;
    const int e = (int)blockIdx.x, t = (int)threadIdx.x;
    int base = offsets[e];   /* the next free row of expert e */
    for (int p0 = 0; p0 < pairs; p0 += MOE_CUDA__BLOCK) {
        const int p = p0 + t;
        const int mine = p < pairs && expert[p] == e && !dropped[p];
        int total;   /* kept pairs of this chunk */
        const int k = moe_cuda__block_rank(mine, warp_count, &total, BUG == 2);
        if (mine) {
            const int row = base + k;
            row_of_pair[p] = row;
            pair_of_row[row] = p;
            chunk_token[k] = p / top_k;
            chunk_row[k] = row;
        }
        if (BUG != 1) __syncthreads();   /* the chunk's list is complete */
        for (int i = 0; A && i < total; i++) {   /* the block copies each row together */
            const float *xs = x + (size_t)chunk_token[i] * d;
            __nv_bfloat16 *dst = A + (size_t)chunk_row[i] * d_pad;
            for (int c = t; c < d_pad; c += MOE_CUDA__BLOCK)
                dst[c] = __float2bfloat16_rn(c < d ? xs[c] : 0.0f);
        }
        base += total;   /* (block_rank's first barrier guards the list's reuse) */
    }
}

/* The shared expert's rows: every token, in order (offsets {0, T}), and its
   bf16 copy of x for the tensor-core path (Xs NULL: the fp32 path). */
__global__ void moe_cuda__shared_rows(const float *x, int tokens, int d, int d_pad,
                                      __nv_bfloat16 *Xs, int32_t *offsets, const int32_t *halt) {
    if (*halt) return;
    const int t = (int)blockIdx.x;
    if (t == 0 && threadIdx.x == 0) { offsets[0] = 0; offsets[1] = tokens; }
    for (int c = (int)threadIdx.x; Xs && c < d_pad; c += (int)blockDim.x)
        Xs[(size_t)t * d_pad + c] = __float2bfloat16_rn(c < d ? x[(size_t)t * d + c] : 0.0f);
}

// ----------------------------------------------------------------------------
// Expert weights as the GEMMs read them: bf16, zero-padded to whole tiles.
//   W1 [E][n1_pad][d_pad]: the first projection. For a GLU each 64-row tile
//      holds 32 hidden units, gate and up interleaved by 16 rows
//      (gate f0..f0+15, up f0..f0+15, gate f0+16..f0+31, up f0+16..f0+31),
//      so each warp's 32 columns hold the gate and up of the same 16 units
//      and the epilogue forms act(gate) * up in registers. Without a GLU,
//      row f is gate row f.
//   W2 [E][d_out_pad][f_pad]: down [E][D][F].
// One thread per output element: the source is a plain index computation.

/* Row n of a W1 tile: hidden unit *f, gate (0) or up (1). */
__host__ __device__ __forceinline__ int moe_cuda__w1_unit(int n, int glu, int *f) {
    if (!glu) { *f = n; return 0; }
    *f = (n >> 6) * 32 + ((n >> 5) & 1) * 16 + (n & 15);
    return (n & 31) >= 16;
}
/* The inverse: the W1 tile row of unit f's gate (is_up 0) or up (1). */
__host__ __device__ __forceinline__ int moe_cuda__w1_row(int f, int glu, int is_up) {
    return glu ? (f >> 5) * 64 + ((f >> 4) & 1) * 32 + 16 * is_up + (f & 15) : f;
}

/* gate row (e, f) at gate[(e gate_rows + f) d], up row at up[(e up_rows + f) d]
   (HF's fused gate_up [E][2F][D]: up = gate + F d, both strides 2F). */
__global__ void moe_cuda__pack_w1(const float *gate, int gate_rows, const float *up, int up_rows,
                                  int experts, int f, int d, int glu, int n1_pad, int d_pad,
                                  __nv_bfloat16 *W1) {
    const size_t total = (size_t)experts * n1_pad * d_pad;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int k = (int)(i % d_pad), n = (int)(i / d_pad % n1_pad);
        const int e = (int)(i / d_pad / n1_pad);
        int u;
        const int is_up = moe_cuda__w1_unit(n, glu, &u);
        float v = 0.0f;
        if (k < d && u < f)
            v = is_up ? up[((size_t)e * up_rows + u) * d + k]
                      : gate[((size_t)e * gate_rows + u) * d + k];
        W1[i] = __float2bfloat16_rn(v);
    }
}

__global__ void moe_cuda__pack_w2(const float *down, int experts, int d, int f, int d_out_pad,
                                  int f_pad, __nv_bfloat16 *W2) {
    const size_t total = (size_t)experts * d_out_pad * f_pad;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int k = (int)(i % f_pad), n = (int)(i / f_pad % d_out_pad);
        const int e = (int)(i / f_pad / d_out_pad);
        W2[i] = __float2bfloat16_rn(k < f && n < d ? down[((size_t)e * d + n) * f + k] : 0.0f);
    }
}

// ----------------------------------------------------------------------------
// The FFN's nonlinearity, as moe.h's moe__act: SiLU, GELU (erf, tanh), ReLU
// (NaN kept, as torch.relu). Host too: the tests model it.

__host__ __device__ __forceinline__ float moe_cuda__act(int act, float v) {
    switch (act) {
    case MOE_ACT_SWIGLU: case MOE_ACT_SILU:
        return v * moe_cuda__sigmoid(v);
    case MOE_ACT_GEGLU: case MOE_ACT_GELU:
        return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case MOE_ACT_GEGLU_TANH: case MOE_ACT_GELU_TANH:
        return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default:
        return v > 0.0f || v != v ? v : 0.0f;
    }
}
/* act'(v), as moe.h's moe__act_grad: SiLU' = s (1 + v (1 - s)), GELU' = Phi(v)
   + v phi(v) (erf) or its tanh form, ReLU' = [v > 0]. */
__host__ __device__ __forceinline__ float moe_cuda__act_grad(int act, float v) {
    switch (act) {
    case MOE_ACT_SWIGLU: case MOE_ACT_SILU: {
        const float s = moe_cuda__sigmoid(v);
        return s * (1.0f + v * (1.0f - s));
    }
    case MOE_ACT_GEGLU: case MOE_ACT_GELU:
        return 0.5f * (1.0f + erff(v * 0.70710678118654752f)) +
               v * 0.39894228040143268f * expf(-0.5f * v * v);
    case MOE_ACT_GEGLU_TANH: case MOE_ACT_GELU_TANH: {
        const float k = 0.79788456080286536f, th = tanhf(k * (v + 0.044715f * v * v * v));
        return 0.5f * (1.0f + th) +
               0.5f * v * (1.0f - th * th) * k * (1.0f + 3.0f * 0.044715f * v * v);
    }
    default:
        return v > 0.0f ? 1.0f : 0.0f;
    }
}
__host__ __device__ __forceinline__ int moe_cuda__is_glu(int act) {
    return act == MOE_ACT_SWIGLU || act == MOE_ACT_GEGLU || act == MOE_ACT_GEGLU_TANH;
}

// ----------------------------------------------------------------------------
// Grouped expert GEMMs on the tensor cores: bf16 operands, fp32 accumulation
// (mma.sync.m16n8k16), in 64 x 64 output tiles, BK = 32, four warps of
// 32 x 32, a STAGES-deep cp.async pipeline. Two schedules share one main loop:
//
//   ROWS   C[r][n] = sum_k A[r][k] B_e(k, n) for the rows r of each expert e,
//          [offsets[e], offsets[e+1]): the forward's two projections
//          (B_e = W_e^T, nn.Linear [out][in]) and the backward's dA and dX
//          (B_e = W_e read down its columns). Ragged M, K fixed.
//   DEPTH  C_e[m][n] = sum over e's rows r of A[r][m] B[r][n]: the weight
//          gradients. Ragged K, one C per expert.
//
// An operand is stored mn-major ([mn][k]: token rows, nn.Linear weights) or
// k-major ([k][mn]: a weight read down its columns, token rows summed over).
// A stage holds a 64 x 32 (mn x k) tile of each operand in its stored
// orientation, as 16-byte chunks of 8 bf16:
//   mn-major: 64 rows of 4 chunks      k-major: 32 rows of 8 chunks
// the chunk index XORed with bits of the row so that the eight rows one
// ldmatrix reads fall in different banks; k-major tiles reach the mma
// fragments through ldmatrix.trans. Elements past an operand's ends load as
// zeros (cp.async with 0 source bytes).
//
// The ROWS grid is the worst case for `max_rows` (the host knows T * K, not
// the counts): grid.x = ceil(max_rows / BM) + E row tiles, each block finds
// its (expert, row tile) from the offsets, and blocks past the last tile exit
// at once. Each output is one fixed sequence of mma over k: the result does
// not depend on the grid or the schedule (deterministic).

enum {
    MOE_CUDA__BM = 64, MOE_CUDA__BN = 64, MOE_CUDA__BK = 32, MOE_CUDA__STAGES = 3,
    MOE_CUDA__GEMM_THREADS = 128,
    MOE_CUDA__STAGE_BYTES = (MOE_CUDA__BM + MOE_CUDA__BN) * MOE_CUDA__BK * 2,
    MOE_CUDA__GEMM_SMEM = MOE_CUDA__STAGES * MOE_CUDA__STAGE_BYTES
};

/* One operand: element (mn, k) at p[mn * ld + k] (mn-major) or p[k * ld + mn]
   (k-major); mn >= mn_end reads as zero. k-major: mn_end a multiple of 8;
   mn-major: the k end a multiple of 8 (whole chunks). */
typedef struct moe_cuda__operand {
    const __nv_bfloat16 *p;
    int ld, mn0, mn_end;
} moe_cuda__operand;

/* Where chunk `chunk` of tile row `row` lives (in bf16 elements from the tile). */
template <int KMAJOR> __device__ __forceinline__ int moe_cuda__chunk_at(int row, int chunk) {
    return KMAJOR ? row * 64 + ((chunk ^ (row & 7)) << 3)
                  : row * 32 + ((chunk ^ ((row >> 1) & 3)) << 3);
}

/* The operand's tile at [mn0, mn0 + 64) x [k0, k0 + 32), 2 chunks a thread. */
template <int KMAJOR>
__device__ __forceinline__ void moe_cuda__load_tile(__nv_bfloat16 *s, moe_cuda__operand o,
                                                    int k0, int k_end) {
    for (int c = (int)threadIdx.x; c < 256; c += MOE_CUDA__GEMM_THREADS) {
        const int row = KMAJOR ? c >> 3 : c >> 2, chunk = KMAJOR ? c & 7 : c & 3;
        const int mn = o.mn0 + (KMAJOR ? chunk * 8 : row), k = k0 + (KMAJOR ? row : chunk * 8);
        const int live = mn < o.mn_end && k < k_end;
        const size_t at = KMAJOR ? (size_t)k * o.ld + mn : (size_t)mn * o.ld + k;
        moe_cuda__cp_async16(s + moe_cuda__chunk_at<KMAJOR>(row, chunk), live ? o.p + at : o.p,
                             live ? 16 : 0);
    }
}
template <int A_KMAJOR, int B_KMAJOR>
__device__ __forceinline__ void moe_cuda__load_stage(unsigned char *stage, moe_cuda__operand a,
                                                     moe_cuda__operand b, int k0, int k_end) {
    __nv_bfloat16 *sa = (__nv_bfloat16 *)stage;
    moe_cuda__load_tile<A_KMAJOR>(sa, a, k0, k_end);
    moe_cuda__load_tile<B_KMAJOR>(sa + MOE_CUDA__BM * MOE_CUDA__BK, b, k0, k_end);
}

/* acc = this warp's 32 x 32 of the block's A B over [k_begin, k_end).
   BUG (tests only, 0 in the library): 1 waits for one group too few, 2
   refills a stage before the barrier, 3 swaps the B fragment registers. */
template <int A_KMAJOR, int B_KMAJOR, int BUG>
__device__ __forceinline__ void moe_cuda__gemm_tiles(float acc[2][4][4], moe_cuda__operand a,
                                                     moe_cuda__operand b, int k_begin,
                                                     int k_end) {
    unsigned char *smem = moe_cuda__smem();
    const int lane = (int)threadIdx.x & 31, warp = (int)threadIdx.x >> 5;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;   /* the warp's 32 x 32 */
    const int k_tiles = (k_end - k_begin + MOE_CUDA__BK - 1) / MOE_CUDA__BK;
MOE_CUDA_UNROLL
    for (int i = 0; i < 2; i++)
MOE_CUDA_UNROLL
        for (int j = 0; j < 4; j++)
MOE_CUDA_UNROLL
            for (int r = 0; r < 4; r++) acc[i][j][r] = 0.0f;

    for (int s = 0; s < MOE_CUDA__STAGES - 1; s++) {   /* the pipeline's first stages */
        if (s < k_tiles)
            moe_cuda__load_stage<A_KMAJOR, B_KMAJOR>(smem + s * MOE_CUDA__STAGE_BYTES, a, b,
                                                     k_begin + s * MOE_CUDA__BK, k_end);
        moe_cuda__cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; kt++) {
        const int next = kt + MOE_CUDA__STAGES - 1;
        unsigned char *refill = smem + (next % MOE_CUDA__STAGES) * MOE_CUDA__STAGE_BYTES;
        if (BUG == 2 && next < k_tiles)   /* planted: refills the stage others still read */
            moe_cuda__load_stage<A_KMAJOR, B_KMAJOR>(refill, a, b, k_begin + next * MOE_CUDA__BK,
                                                     k_end);
        if (BUG == 1) moe_cuda__cp_async_wait<MOE_CUDA__STAGES - 1>();
        else moe_cuda__cp_async_wait<MOE_CUDA__STAGES - 2>();   /* tile kt has landed */
        __syncthreads();   /* ... for every thread, and tile kt - 1 is done with */
        if (BUG != 2 && next < k_tiles)
            moe_cuda__load_stage<A_KMAJOR, B_KMAJOR>(refill, a, b, k_begin + next * MOE_CUDA__BK,
                                                     k_end);
        moe_cuda__cp_async_commit();   /* empty groups keep the count in step */

        const __nv_bfloat16 *sa =
            (const __nv_bfloat16 *)(smem + (kt % MOE_CUDA__STAGES) * MOE_CUDA__STAGE_BYTES);
        const __nv_bfloat16 *sb = sa + MOE_CUDA__BM * MOE_CUDA__BK;
MOE_CUDA_UNROLL
        for (int kk = 0; kk < MOE_CUDA__BK; kk += 16) {
            uint32_t fa[2][4], fb[4][2];
            const int j = lane >> 3, r8 = lane & 7;   /* lane's matrix and row in it */
MOE_CUDA_UNROLL
            for (int mi = 0; mi < 2; mi++) {   /* A: m +8 in matrices 1, 3; k +8 in 2, 3 */
                const int m = wm + mi * 16 + 8 * (j & 1), k = kk + 8 * (j >> 1);
                if (A_KMAJOR)
                    moe_cuda__ldmatrix_x4_trans(fa[mi],
                                                sa + moe_cuda__chunk_at<1>(k + r8, m >> 3));
                else
                    moe_cuda__ldmatrix_x4(fa[mi], sa + moe_cuda__chunk_at<0>(m + r8, k >> 3));
            }
MOE_CUDA_UNROLL
            for (int ni = 0; ni < 4; ni += 2) {   /* B: k +8 in matrices 1, 3; n +8 in 2, 3 */
                const int n = wn + ni * 8 + 8 * (j >> 1), k = kk + 8 * (j & 1);
                uint32_t q[4];
                if (B_KMAJOR)
                    moe_cuda__ldmatrix_x4_trans(q, sb + moe_cuda__chunk_at<1>(k + r8, n >> 3));
                else
                    moe_cuda__ldmatrix_x4(q, sb + moe_cuda__chunk_at<0>(n + r8, k >> 3));
                fb[ni][0] = q[0]; fb[ni][1] = q[1];
                fb[ni + 1][0] = q[2]; fb[ni + 1][1] = q[3];
                if (BUG == 3) { fb[ni][0] = q[1]; fb[ni][1] = q[0]; }
            }
MOE_CUDA_UNROLL
            for (int mi = 0; mi < 2; mi++)
MOE_CUDA_UNROLL
                for (int ni = 0; ni < 4; ni++)
                    moe_cuda__mma(acc[mi][ni], fa[mi], fb[ni], acc[mi][ni]);
        }
    }
    moe_cuda__cp_async_wait<0>();
}

/* Where a warp's C fragments sit: register r of acc[mi][ni] holds row
   wm + 16 mi + g + 8 (r >> 1), column wn + 8 ni + 2 t4 + (r & 1), with
   g = lane / 4 and t4 = lane % 4. */
#define MOE_CUDA__FRAGMENT_ROW(mi, r) (wm + (mi) * 16 + (lane >> 2) + 8 * ((r) >> 1))
#define MOE_CUDA__FRAGMENT_COL(ni, r) (wn + (ni) * 8 + 2 * (lane & 3) + ((r) & 1))

/* The ROWS operands: A [rows][lda] (mn-major), B_e at b + e * b_stride, its
   n in [0, n_end), k in [0, k_end). */
typedef struct moe_cuda__gemm_args {
    const __nv_bfloat16 *a, *b;
    int lda, ldb, n_end, k_end;
    size_t b_stride;
    const int32_t *offsets;
    int experts;
    const int32_t *halt;
} moe_cuda__gemm_args;

/* ROWS epilogues (EPI):
   STORE  C[r][n] in fp32 (columns n < out.n; the down projection, dX)
   GLU    H[r][f] = bf16(act(gate + gate_bias) * (up + up_bias)), f < ldh, 0
          past out.f (W1's interleaved tiles put both in one warp)
   ACT    H[r][f] = bf16(act(C[r][f] + gate_bias)), the two-matrix FFNs
   DACT   (backward; C = dA, the gradient of the activation's output)
          dG = dA u act'(g), dU = dA act(g) (GLU) or dG = dA act'(g),
          from the pre-activations out.g, out.u; into dH [r][ldh] in W1's
          row order (bf16; 0 past out.f, columns < out.n) and, when not NULL,
          fp32 out.dg, out.du [r][f]
   GLU and ACT also keep the pre-activations in out.g, out.u [r][f] when
   those are not NULL (the backward's recompute). */
enum { MOE_CUDA__EPI_STORE = 0, MOE_CUDA__EPI_GLU = 1, MOE_CUDA__EPI_ACT = 2,
       MOE_CUDA__EPI_DACT = 3 };

typedef struct moe_cuda__epilogue {
    float *c;                      /* STORE: C [rows][ldc], columns < n     */
    int ldc, n;
    __nv_bfloat16 *h;              /* GLU, ACT: H; DACT: dH; [rows][ldh]    */
    int f, ldh, act;
    const float *gate_bias, *up_bias;   /* [E][f] or NULL                  */
    float *g, *u, *dg, *du;        /* fp32 [rows][f] or NULL                */
} moe_cuda__epilogue;

/* This block's expert and first row, from its row-tile index; -1: no tile. */
__device__ __forceinline__ int moe_cuda__find_tile(const int32_t *offsets, int experts,
                                                   int tile, int *row0, int *row_end) {
    for (int e = 0; e < experts; e++) {
        const int begin = offsets[e], end = offsets[e + 1];
        const int tiles = (end - begin + MOE_CUDA__BM - 1) / MOE_CUDA__BM;
        if (tile < tiles) {
            *row0 = begin + tile * MOE_CUDA__BM;
            *row_end = end;
            return e;
        }
        tile -= tiles;
    }
    return -1;
}

template <int EPI, int B_KMAJOR, int BUG>
__global__ void __launch_bounds__(MOE_CUDA__GEMM_THREADS)
moe_cuda__grouped_gemm(moe_cuda__gemm_args g, moe_cuda__epilogue out) {
    int row0 = 0, row_end = 0;
    if (*g.halt) return;
    const int e = moe_cuda__find_tile(g.offsets, g.experts, (int)blockIdx.x, &row0, &row_end);
    if (e < 0) return;   /* a surplus tile of the worst-case grid: the whole block */
    const int n0 = (int)blockIdx.y * MOE_CUDA__BN;
    const moe_cuda__operand a = {g.a, g.lda, row0, row_end};
    const moe_cuda__operand b = {g.b + (size_t)e * g.b_stride, g.ldb, n0, g.n_end};
    float acc[2][4][4];
    moe_cuda__gemm_tiles<0, B_KMAJOR, BUG>(acc, a, b, 0, g.k_end);

    const int lane = (int)threadIdx.x & 31, warp = (int)threadIdx.x >> 5;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    const int glu = moe_cuda__is_glu(out.act);
MOE_CUDA_UNROLL
    for (int mi = 0; mi < 2; mi++)
MOE_CUDA_UNROLL
        for (int ni = 0; ni < (EPI == MOE_CUDA__EPI_GLU ? 2 : 4); ni++)
MOE_CUDA_UNROLL
            for (int r = 0; r < 4; r++) {
                const int row = row0 + MOE_CUDA__FRAGMENT_ROW(mi, r);
                const int col = n0 + MOE_CUDA__FRAGMENT_COL(ni, r);
                if (row >= row_end) continue;
                const float v = acc[mi][ni][r];
                if (EPI == MOE_CUDA__EPI_STORE) {
                    if (col < out.n) out.c[(size_t)row * out.ldc + col] = v;
                    continue;
                }
                const size_t fi = (size_t)row * out.f;   /* + f: [rows][f] arrays */
                if (EPI == MOE_CUDA__EPI_DACT) {
                    if (col >= out.n) continue;
                    float dg = 0.0f, du = 0.0f;
                    if (col < out.f) {
                        const float gv = out.g[fi + col];
                        if (glu) {
                            du = v * moe_cuda__act(out.act, gv);
                            dg = v * out.u[fi + col] * moe_cuda__act_grad(out.act, gv);
                            if (out.du) out.du[fi + col] = du;
                        } else {
                            dg = v * moe_cuda__act_grad(out.act, gv);
                        }
                        if (out.dg) out.dg[fi + col] = dg;
                    }
                    __nv_bfloat16 *dh = out.h + (size_t)row * out.ldh;
                    dh[moe_cuda__w1_row(col, glu, 0)] = __float2bfloat16_rn(dg);
                    if (glu) dh[moe_cuda__w1_row(col, glu, 1)] = __float2bfloat16_rn(du);
                    continue;
                }
                /* GLU: gate in fragments 0, 1 and up in 2, 3 of the same unit */
                const int f = EPI == MOE_CUDA__EPI_GLU ? n0 / 2 + (warp & 1) * 16 + ni * 8 +
                                                             2 * (lane & 3) + (r & 1) : col;
                float h = 0.0f;
                if (f < out.f) {
                    float gv = v;
                    if (out.gate_bias) gv += out.gate_bias[(size_t)e * out.f + f];
                    h = moe_cuda__act(out.act, gv);
                    if (out.g) out.g[fi + f] = gv;
                    if (EPI == MOE_CUDA__EPI_GLU) {
                        float u = acc[mi][ni + 2][r];
                        if (out.up_bias) u += out.up_bias[(size_t)e * out.f + f];
                        h *= u;
                        if (out.u) out.u[fi + f] = u;
                    }
                }
                out.h[(size_t)row * out.ldh + f] = __float2bfloat16_rn(h);
            }
}

/* Launch geometry for max_rows rows at most (T * K for top-k routing). */
static inline dim3 moe_cuda__gemm_grid(int max_rows, int experts, int n_end) {
    return dim3((unsigned)((max_rows + MOE_CUDA__BM - 1) / MOE_CUDA__BM + experts),
                (unsigned)((n_end + MOE_CUDA__BN - 1) / MOE_CUDA__BN));
}

/* DEPTH: C_e[m][n] = sum over e's rows r of A[r][m] B[r][n], both k-major
   ([rows][ld], m < m_end, n < n_end), added in fp32 to the gradient of
   expert e: grid (m tiles, n tiles, E). With `units`, m is a row of W1's
   tiles (moe_cuda__w1_unit): gate rows go to `first`, up rows to `second`
   ([E][f][n] at e * stride), else C_e goes to first ([E][m_out][n]). Each
   NULL destination is skipped. */
typedef struct moe_cuda__grad_out {
    float *first, *second;
    size_t stride;
    int m_out, n_out, units, glu;   /* C_e's rows and columns kept (< m_out, < n_out) */
} moe_cuda__grad_out;

template <int BUG>
__global__ void __launch_bounds__(MOE_CUDA__GEMM_THREADS)
moe_cuda__grouped_gemm_depth(const __nv_bfloat16 *A, int lda, int m_end,
                             const __nv_bfloat16 *B, int ldb, int n_end,
                             const int32_t *offsets, moe_cuda__grad_out out) {
    const int e = (int)blockIdx.z;
    const int m0 = (int)blockIdx.x * MOE_CUDA__BM, n0 = (int)blockIdx.y * MOE_CUDA__BN;
    const int r0 = offsets[e], r1 = offsets[e + 1];
    if (r0 == r1) return;   /* no rows: nothing to add */
    const moe_cuda__operand a = {A, lda, m0, m_end}, b = {B, ldb, n0, n_end};
    float acc[2][4][4];
    moe_cuda__gemm_tiles<1, 1, BUG>(acc, a, b, r0, r1);

    const int lane = (int)threadIdx.x & 31, warp = (int)threadIdx.x >> 5;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
MOE_CUDA_UNROLL
    for (int mi = 0; mi < 2; mi++)
MOE_CUDA_UNROLL
        for (int ni = 0; ni < 4; ni++)
MOE_CUDA_UNROLL
            for (int r = 0; r < 4; r++) {
                const int m = m0 + MOE_CUDA__FRAGMENT_ROW(mi, r);
                const int n = n0 + MOE_CUDA__FRAGMENT_COL(ni, r);
                int row = m;
                const int up = out.units ? moe_cuda__w1_unit(m, out.glu, &row) : 0;
                float *dst = up ? out.second : out.first;
                if (dst && row < out.m_out && n < out.n_out)
                    dst[e * out.stride + (size_t)row * out.n_out + n] += acc[mi][ni][r];
            }
}
#undef MOE_CUDA__FRAGMENT_ROW
#undef MOE_CUDA__FRAGMENT_COL

// ----------------------------------------------------------------------------
// The plain fp32 expert FFN (cfg.isa = MOE_ISA_REFERENCE): what the tensor-
// core path computes, one thread per output, sums in index order with fmaf,
// fp32 weights straight from moe_weights. Rows are dispatched as above.

typedef struct moe_cuda__ffn32 {
    const float *gate, *up, *down;            /* expert e at e * *_stride  */
    const float *gate_bias, *up_bias;         /* [E][F] (down's: the combine adds it) */
    size_t gate_stride, up_stride, down_stride;
    int d, f, act;
} moe_cuda__ffn32;

/* The expert of row r: the e with offsets[e] <= r < offsets[e + 1]. */
__device__ __forceinline__ int moe_cuda__expert_of_row(const int32_t *offsets, int experts,
                                                       int r) {
    int lo = 0, hi = experts - 1;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (offsets[mid + 1] > r) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

/* H[r][f] = act(x_t . gate_e[f] + gb) (* (x_t . up_e[f] + ub)); the token of
   row r is pair_of_row[r] / top_k (pair_of_row NULL: t = r, the shared expert).
   The backward also keeps the pre-activations: G (gate) and U (up), or NULL. */
__global__ void moe_cuda__ffn_hidden_ref(moe_cuda__ffn32 ffn, const float *x,
                                         const int32_t *pair_of_row, int top_k,
                                         const int32_t *offsets, int experts, float *H,
                                         float *G, float *U, const int32_t *halt) {
    const int r = (int)blockIdx.x;
    if (*halt || r >= offsets[experts]) return;
    const int e = moe_cuda__expert_of_row(offsets, experts, r);
    const float *xt = x + (size_t)(pair_of_row ? pair_of_row[r] / top_k : r) * ffn.d;
    for (int f = (int)threadIdx.x; f < ffn.f; f += (int)blockDim.x) {
        const float *wg = ffn.gate + e * ffn.gate_stride + (size_t)f * ffn.d;
        float g = 0.0f, u = 0.0f;
        for (int k = 0; k < ffn.d; k++) g = fmaf(xt[k], wg[k], g);
        if (ffn.gate_bias) g += ffn.gate_bias[(size_t)e * ffn.f + f];
        float h = moe_cuda__act(ffn.act, g);
        if (moe_cuda__is_glu(ffn.act)) {
            const float *wu = ffn.up + e * ffn.up_stride + (size_t)f * ffn.d;
            for (int k = 0; k < ffn.d; k++) u = fmaf(xt[k], wu[k], u);
            if (ffn.up_bias) u += ffn.up_bias[(size_t)e * ffn.f + f];
            h *= u;
            if (U) U[(size_t)r * ffn.f + f] = u;
        }
        if (G) G[(size_t)r * ffn.f + f] = g;
        H[(size_t)r * ffn.f + f] = h;
    }
}

/* O[r][c] = H[r] . down_e[c]: the expert's output row, before its bias and weight. */
__global__ void moe_cuda__ffn_out_ref(moe_cuda__ffn32 ffn, const float *H,
                                      const int32_t *offsets, int experts, float *O,
                                      const int32_t *halt) {
    const int r = (int)blockIdx.x;
    if (*halt || r >= offsets[experts]) return;
    const int e = moe_cuda__expert_of_row(offsets, experts, r);
    for (int c = (int)threadIdx.x; c < ffn.d; c += (int)blockDim.x) {
        const float *wd = ffn.down + e * ffn.down_stride + (size_t)c * ffn.f;
        float o = 0.0f;
        for (int f = 0; f < ffn.f; f++) o = fmaf(H[(size_t)r * ffn.f + f], wd[f], o);
        O[(size_t)r * ffn.d + c] = o;
    }
}

// ----------------------------------------------------------------------------
// Combine, one block per token: y[t] = sum over t's kept slots j, in slot
// order, of weight[t][j] * (out[row] + down_bias[e]); then, with a shared
// expert, + gamma (shared_out[t] + shared_down_bias), gamma = sigmoid(x_t .
// shared_expert_gate) or 1. x is read before y is written: y may be x.

enum { MOE_CUDA__COMBINE_THREADS = 128 };

typedef struct moe_cuda__combine_args {
    const float *out;               /* [rows][d] routed expert outputs      */
    const int32_t *row_of_pair, *expert;
    const float *weight, *down_bias;
    const float *shared_out, *shared_down_bias, *shared_expert_gate;   /* or NULL */
    const float *x;
    float *y;
    int top_k, d;
    const int32_t *halt;
} moe_cuda__combine_args;

__global__ void __launch_bounds__(MOE_CUDA__COMBINE_THREADS)
moe_cuda__combine(moe_cuda__combine_args a) {
    __shared__ float warp_part[MOE_CUDA__COMBINE_THREADS / 32];
    if (*a.halt) return;
    const int t = (int)blockIdx.x, tid = (int)threadIdx.x;
    float gamma = 1.0f;
    if (a.shared_expert_gate) {
        float part = 0.0f;
        for (int c = tid; c < a.d; c += MOE_CUDA__COMBINE_THREADS)
            part = fmaf(a.x[(size_t)t * a.d + c], a.shared_expert_gate[c], part);
        part = moe_cuda__warp_sum(part);
        if ((tid & 31) == 0) warp_part[tid >> 5] = part;
        __syncthreads();   /* also: every read of x[t] is done */
        float z = 0.0f;
        for (int w = 0; w < MOE_CUDA__COMBINE_THREADS / 32; w++) z += warp_part[w];
        gamma = moe_cuda__sigmoid(z);
    }
    for (int c = tid; c < a.d; c += MOE_CUDA__COMBINE_THREADS) {
        float acc = 0.0f;
        for (int j = 0; j < a.top_k; j++) {
            const int p = t * a.top_k + j, row = a.row_of_pair[p];
            if (row < 0) continue;
            float v = a.out[(size_t)row * a.d + c];
            if (a.down_bias) v += a.down_bias[(size_t)a.expert[p] * a.d + c];
            acc += a.weight[p] * v;
        }
        if (a.shared_out) {
            float v = a.shared_out[(size_t)t * a.d + c];
            if (a.shared_down_bias) v += a.shared_down_bias[c];
            acc += gamma * v;
        }
        a.y[(size_t)t * a.d + c] = acc;
    }
}

// ----------------------------------------------------------------------------
// Aux losses and counts (moe.h's moe__aux_losses for top-k routing), in two
// deterministic steps, double sums throughout:
//   1. moe_cuda__chunk_stats: one block per chunk of at most 128 tokens
//      (chunks never straddle a sequence of the sequence-wise loss); thread
//      e sums its expert's column: P_e (softmax p, or s / sum s for sigmoid),
//      the balance count f_e, pairs routed / kept, importance (pre-capacity
//      weights) and the sequence loss's plain top-k count. Thread 0 adds the
//      chunk's LSE^2 and its dropped pairs and tokens.
//   2. moe_cuda__finish_stats: one block; thread e adds its chunks in order,
//      then fixed-shape tree sums over experts give the losses, written with
//      the counts into the report (and info's expert_routed / expert_kept).
// Both exit when routing halted; the finish marks the report done either way.

enum { MOE_CUDA__CHUNK_TOKENS = 128 };

/* What the device tells the host about one forward (the workspace's first bytes). */
typedef struct moe_cuda__report {
    int32_t halt;           /* routing saw a non-finite logit or selection bias */
    int32_t done;           /* the forward's last kernel ran                    */
    int32_t slots, capacity, dropped_pairs, dropped_tokens;
    float aux_balance, aux_z, aux_importance, aux_load, aux_seq, aux_total;
    int32_t stamp_tokens;   /* a saving forward's T and config fingerprint      */
    uint64_t stamp_config;  /* (0: not saving), for moe_cuda_backward's check   */
} moe_cuda__report;

typedef struct moe_cuda__stats_args {
    const float *scores, *weight0;
    const int32_t *expert, *plain;       /* plain: the sequence loss's top-k      */
    const uint8_t *dropped;
    const double *lse_sq, *score_sum;
    int tokens, capacity, experts, top_k, sigmoid, balance_loss;
    int64_t seq_len;                     /* L: tokens per sequence (T when unset) */
    int chunks_per_seq, n_chunks, n_seq;
    double *sum_d;                       /* [chunk][2E + 1]: P, importance, z     */
    int32_t *sum_i;                      /* [chunk][4E + 2]: f, routed, kept,
                                            seq count; dropped pairs, tokens     */
    float coef[5];                       /* balance, z, importance, load, seq     */
    uint64_t stamp_config;               /* moe_config_fingerprint when saving    */
    int32_t *expert_routed, *expert_kept;   /* info arrays [E] or NULL            */
    moe_cuda__report *report;
} moe_cuda__stats_args;

/* Tokens [*t0, *t1) of chunk c: chunks_per_seq chunks per sequence of L. */
__device__ __forceinline__ void moe_cuda__chunk_span(const moe_cuda__stats_args *a, int c,
                                                     int64_t *t0, int64_t *t1) {
    const int64_t s = c / a->chunks_per_seq, i = c % a->chunks_per_seq;
    const int64_t seq_end = s * a->seq_len + a->seq_len < a->tokens ? s * a->seq_len + a->seq_len
                                                                     : a->tokens;
    *t0 = s * a->seq_len + i * MOE_CUDA__CHUNK_TOKENS;
    *t1 = *t0 + MOE_CUDA__CHUNK_TOKENS < seq_end ? *t0 + MOE_CUDA__CHUNK_TOKENS : seq_end;
}

__global__ void __launch_bounds__(MOE_CUDA__BLOCK)
moe_cuda__chunk_stats(moe_cuda__stats_args a) {
    if (a.report->halt) return;
    const int c = (int)blockIdx.x, e = (int)threadIdx.x, E = a.experts, K = a.top_k;
    int64_t t0, t1;
    moe_cuda__chunk_span(&a, c, &t0, &t1);
    double *sd = a.sum_d + (size_t)c * (2 * E + 1);
    int32_t *si = a.sum_i + (size_t)c * (4 * E + 2);
    if (e < E) {
        double P = 0.0, imp = 0.0;
        int32_t f = 0, routed = 0, kept = 0, seq = 0;
        for (int64_t t = t0; t < t1; t++) {
            const double s = a.scores[t * E + e];
            P += !a.sigmoid ? s : a.score_sum[t] > 0.0 ? s / a.score_sum[t] : 0.0;
            for (int j = 0; j < K; j++) {
                const int64_t p = t * K + j;
                if (a.expert[p] == e) {
                    routed++;
                    f += j == 0 || a.balance_loss != MOE_BALANCE_FIRST_CHOICE;
                    kept += !a.dropped[p];
                    imp += a.weight0[p];
                }
                seq += (a.plain ? a.plain[p] : a.expert[p]) == e;
            }
        }
        sd[e] = P; sd[E + e] = imp;
        si[e] = f; si[E + e] = routed; si[2 * E + e] = kept; si[3 * E + e] = seq;
    }
    if (e == 0) {
        double z = 0.0;
        int32_t drop_pairs = 0, drop_tokens = 0;
        for (int64_t t = t0; t < t1; t++) {
            int any = 0;
            z += a.lse_sq[t];
            for (int j = 0; j < K; j++) {
                drop_pairs += a.dropped[t * K + j] != 0;
                any |= !a.dropped[t * K + j];
            }
            drop_tokens += !any;
        }
        sd[2 * E] = z;
        si[4 * E] = drop_pairs; si[4 * E + 1] = drop_tokens;
    }
}

/* Sum of v over the block's MOE_CUDA__BLOCK threads in one fixed tree;
   red: MOE_CUDA__BLOCK doubles of shared memory. Every thread calls it. */
__device__ __forceinline__ double moe_cuda__block_sum(double v, double *red) {
    const int t = (int)threadIdx.x;
    __syncthreads();   /* the last call's readers are done with red */
    red[t] = v;
    __syncthreads();
    for (int half = MOE_CUDA__BLOCK / 2; half > 0; half /= 2) {
        if (t < half) red[t] += red[t + half];
        __syncthreads();
    }
    return red[0];
}

__global__ void __launch_bounds__(MOE_CUDA__BLOCK)
moe_cuda__finish_stats(moe_cuda__stats_args a) {
    __shared__ double red[MOE_CUDA__BLOCK];
    moe_cuda__report *rep = a.report;
    const int e = (int)threadIdx.x, E = a.experts, K = a.top_k;
    const int64_t T = a.tokens;
    if (rep->halt) {
        if (e == 0) rep->done = 1;
        return;
    }
    double P = 0.0, imp = 0.0, seq = 0.0;
    int64_t f = 0, routed = 0, kept = 0;
    if (e < E) {
        for (int c = 0; c < a.n_chunks; c++) {
            const double *sd = a.sum_d + (size_t)c * (2 * E + 1);
            const int32_t *si = a.sum_i + (size_t)c * (4 * E + 2);
            P += sd[e]; imp += sd[E + e];
            f += si[e]; routed += si[E + e]; kept += si[2 * E + e];
        }
        for (int s = 0; s < a.n_seq; s++) {   /* per sequence: E / (K n) f_s P_s / n */
            const int64_t n = T - s * a.seq_len < a.seq_len ? T - s * a.seq_len : a.seq_len;
            double Ps = 0.0, fs = 0.0;
            for (int i = 0; i < a.chunks_per_seq; i++) {
                const int c = s * a.chunks_per_seq + i;
                Ps += a.sum_d[(size_t)c * (2 * E + 1) + e];
                fs += a.sum_i[(size_t)c * (4 * E + 2) + 3 * E + e];
            }
            seq += (double)E / ((double)K * n) * fs * (Ps / n);
        }
        if (a.expert_routed) a.expert_routed[e] = (int32_t)routed;
        if (a.expert_kept) a.expert_kept[e] = (int32_t)kept;
    }
    const double per = T > 0 ? (double)T * (a.balance_loss == MOE_BALANCE_TOPK_NORMALIZED ? K : 1)
                             : 1.0;
    const double bal = moe_cuda__block_sum(e < E && T > 0 ? (double)f / per * (P / T) : 0.0, red);
    const double seq_all = moe_cuda__block_sum(seq, red);
    /* Shazeer's CV^2 = var / (mean^2 + 1e-10) of importance and of load (the counts) */
    const double imp_mean = moe_cuda__block_sum(imp, red) / E;
    const double load_mean = moe_cuda__block_sum((double)routed, red) / E;
    const double imp_var = moe_cuda__block_sum(e < E ? (imp - imp_mean) * (imp - imp_mean) : 0.0,
                                               red) / E;
    const double load_var = moe_cuda__block_sum(
        e < E ? ((double)routed - load_mean) * ((double)routed - load_mean) : 0.0, red) / E;
    if (e == 0) {
        double z = 0.0;
        int32_t drop_pairs = 0, drop_tokens = 0;
        for (int c = 0; c < a.n_chunks; c++) {
            z += a.sum_d[(size_t)c * (2 * E + 1) + 2 * E];
            drop_pairs += a.sum_i[(size_t)c * (4 * E + 2) + 4 * E];
            drop_tokens += a.sum_i[(size_t)c * (4 * E + 2) + 4 * E + 1];
        }
        rep->slots = K;
        rep->capacity = a.capacity;
        rep->dropped_pairs = drop_pairs;
        rep->dropped_tokens = drop_tokens;
        if (T > 0) {
            rep->aux_balance = (float)(E * bal);
            rep->aux_z = (float)(z / T);
            rep->aux_seq = (float)(seq_all / a.n_seq);
            rep->aux_importance = E > 1 ? (float)(imp_var / (imp_mean * imp_mean + 1e-10)) : 0.0f;
            rep->aux_load = E > 1 ? (float)(load_var / (load_mean * load_mean + 1e-10)) : 0.0f;
        }
        /* a loss switched off (coef 0) adds nothing, even an overflowed one */
        const float val[5] = {rep->aux_balance, rep->aux_z, rep->aux_importance, rep->aux_load,
                              rep->aux_seq};
        float total = 0.0f;
MOE_CUDA_UNROLL
        for (int i = 0; i < 5; i++) if (a.coef[i] != 0.0f) total += a.coef[i] * val[i];
        rep->aux_total = total;
        rep->stamp_tokens = (int32_t)T;
        rep->stamp_config = a.stamp_config;
        rep->done = 1;
    }
}

/* Routing into the caller's info arrays (each may be NULL), unless halted. */
typedef struct moe_cuda__publish_args {
    const float *logits, *scores, *weight;
    const int32_t *expert;
    const uint8_t *dropped;
    float *info_logits, *info_scores, *info_weight;
    int32_t *info_expert;
    uint8_t *info_dropped;
    int64_t te, tk;   /* T E and T K */
    const int32_t *halt;
} moe_cuda__publish_args;

__global__ void moe_cuda__publish(moe_cuda__publish_args a) {
    if (*a.halt) return;
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.te; i += step) {
        if (a.info_logits) a.info_logits[i] = a.logits[i];
        if (a.info_scores) a.info_scores[i] = a.scores[i];
    }
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.tk; i += step) {
        if (a.info_weight) a.info_weight[i] = a.weight[i];
        if (a.info_expert) a.info_expert[i] = a.expert[i];
        if (a.info_dropped) a.info_dropped[i] = a.dropped[i];
    }
}

// ----------------------------------------------------------------------------
// Backward: the gradient of L = <dy, y> + aux_total, as moe_backward
// computes it. The routing arrays come from the saving forward's
// moe_info; the rows are re-dispatched from them and the expert FFNs
// recomputed (no activation cache). The experts' steps 1, 3 and 4 run on
// the path the forward runs: the tensor-core GEMMs (bf16 operands, fp32
// sums) or the plain fp32 kernels below (one thread per output, sums in
// index order). The rest is fp32 on both. No atomics: the same bits on
// every run.
//   1. dispatch again; G, U (pre-activations), H and O = H down^T per row
//   2. gw[p] = <dy_t, O_row + down_bias>: dL / d weight of each kept pair
//   3. dG, dU: (weight dy_t) down_e through the activation
//   4. weight gradients of down and gate / up (+ biases), per expert, summed
//      over its rows in row order; dXr[row] = dG gate_e + dU up_e
//      (the shared expert: steps 1-4 as one expert whose row r is token r
//      and whose weight is the gate gamma_t, with dL / d gamma_t)
//   5. router, one thread per token: gw through the normalisation, the
//      importance, balance and sequence losses, softmax / sigmoid, z-loss
//      and clipping -> dz[t][e]
//   6. router weight (+ bias) gradients; dx = the token's dXr rows in slot
//      order (+ the shared expert's) + dz router (written last: dx may be x
//      or dy)
// Kernels that take pair_of_row read pair p = pair_of_row[r] and token
// p / top_k of row r; with pair_of_row NULL (the shared expert) p = t = r.

/* 2. gw[p] for the pairs p of the tokens (0 for a dropped pair) */
__global__ void moe_cuda__bw_gate_grad(const float *dy, const float *O, const int32_t *row_of_pair,
                                       const int32_t *expert, const float *down_bias, int pairs,
                                       int top_k, int d, float *gw) {
    const int p = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (p >= pairs) return;
    const int row = row_of_pair[p];
    if (row < 0) { gw[p] = 0.0f; return; }
    const float *dyt = dy + (size_t)(p / top_k) * d, *o = O + (size_t)row * d;
    const float *db = down_bias ? down_bias + (size_t)expert[p] * d : NULL;
    float acc = 0.0f;
    for (int c = 0; c < d; c++) acc = fmaf(dyt[c], db ? o[c] + db[c] : o[c], acc);
    gw[p] = acc;
}

/* 3. one block per row: da[f] = sum_c (w_p dy_t[c]) down_e[c][f], then
   dU = da act(g), dG = da u act'(g) (GLU) or dG = da act'(g) */
__global__ void moe_cuda__bw_hidden(moe_cuda__ffn32 ffn, const float *dy, const float *weight,
                                    const int32_t *pair_of_row, int top_k,
                                    const int32_t *offsets, int experts, const float *G,
                                    const float *U, float *dG, float *dU) {
    const int r = (int)blockIdx.x;
    if (r >= offsets[experts]) return;
    const int e = moe_cuda__expert_of_row(offsets, experts, r);
    const int p = pair_of_row ? pair_of_row[r] : r;
    const float *dyt = dy + (size_t)(p / top_k) * ffn.d, w = weight[p];
    const float *down = ffn.down + e * ffn.down_stride;
    for (int f = (int)threadIdx.x; f < ffn.f; f += (int)blockDim.x) {
        float da = 0.0f;
        for (int c = 0; c < ffn.d; c++) da = fmaf(w * dyt[c], down[(size_t)c * ffn.f + f], da);
        const size_t i = (size_t)r * ffn.f + f;
        const float g = G[i];
        if (moe_cuda__is_glu(ffn.act)) {
            dU[i] = da * moe_cuda__act(ffn.act, g);
            dG[i] = da * U[i] * moe_cuda__act_grad(ffn.act, g);
        } else {
            dG[i] = da * moe_cuda__act_grad(ffn.act, g);
        }
    }
}

/* 4a. dXr[r][c] = sum_f dG[r][f] gate_e[f][c] (+ sum_f dU[r][f] up_e[f][c]) */
__global__ void moe_cuda__bw_row_dx(moe_cuda__ffn32 ffn, const int32_t *offsets, int experts,
                                    const float *dG, const float *dU, float *dXr) {
    const int r = (int)blockIdx.x;
    if (r >= offsets[experts]) return;
    const int e = moe_cuda__expert_of_row(offsets, experts, r);
    const float *gate = ffn.gate + e * ffn.gate_stride, *up = ffn.up + e * ffn.up_stride;
    const float *dg = dG + (size_t)r * ffn.f, *du = dU + (size_t)r * ffn.f;
    for (int c = (int)threadIdx.x; c < ffn.d; c += (int)blockDim.x) {
        float acc = 0.0f;
        for (int f = 0; f < ffn.f; f++) acc = fmaf(dg[f], gate[(size_t)f * ffn.d + c], acc);
        if (moe_cuda__is_glu(ffn.act))
            for (int f = 0; f < ffn.f; f++) acc = fmaf(du[f], up[(size_t)f * ffn.d + c], acc);
        dXr[(size_t)r * ffn.d + c] = acc;
    }
}

/* Where the gradients go; each may be NULL (not wanted). Strides per expert. */
typedef struct moe_cuda__ffn_grads {
    float *gate, *up, *down, *gate_bias, *up_bias, *down_bias;
    size_t gate_stride, up_stride, down_stride;
} moe_cuda__ffn_grads;

/* 4b. one thread per (e, c, f), grid.y = e: d down[c][f] += sum over e's rows
   of (w_p dy_t[c]) h[f], and d down_bias[c] += sum of w_p dy_t[c] (f == 0) */
__global__ void moe_cuda__bw_down_grad(moe_cuda__ffn32 ffn, moe_cuda__ffn_grads g,
                                       const float *dy, const float *weight,
                                       const int32_t *pair_of_row, int top_k,
                                       const int32_t *offsets, const float *G, const float *U) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int e = (int)blockIdx.y;
    if (i >= (int64_t)ffn.d * ffn.f) return;
    const int c = (int)(i / ffn.f), f = (int)(i % ffn.f);
    const int glu = moe_cuda__is_glu(ffn.act);
    float acc = 0.0f, bias = 0.0f;
    for (int r = offsets[e]; r < offsets[e + 1]; r++) {
        const int p = pair_of_row ? pair_of_row[r] : r;
        const float dout = weight[p] * dy[(size_t)(p / top_k) * ffn.d + c];
        float h = moe_cuda__act(ffn.act, G[(size_t)r * ffn.f + f]);
        if (glu) h *= U[(size_t)r * ffn.f + f];
        acc = fmaf(dout, h, acc);
        bias += dout;
    }
    if (g.down) g.down[e * g.down_stride + (size_t)i] += acc;
    if (g.down_bias && f == 0) g.down_bias[(size_t)e * ffn.d + c] += bias;
}

/* 4c. one thread per (e, f, k), grid.y = e: d gate[f][k] += sum over e's rows
   of dG[r][f] x_t[k] (d up from dU likewise), the biases at k == 0 */
__global__ void moe_cuda__bw_w1_grad(moe_cuda__ffn32 ffn, moe_cuda__ffn_grads g, const float *x,
                                     const int32_t *pair_of_row, int top_k,
                                     const int32_t *offsets, const float *dG, const float *dU) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int e = (int)blockIdx.y;
    if (i >= (int64_t)ffn.f * ffn.d) return;
    const int f = (int)(i / ffn.d), k = (int)(i % ffn.d);
    const int glu = moe_cuda__is_glu(ffn.act);
    float ag = 0.0f, au = 0.0f, bg = 0.0f, bu = 0.0f;
    for (int r = offsets[e]; r < offsets[e + 1]; r++) {
        const int p = pair_of_row ? pair_of_row[r] : r;
        const float xv = x[(size_t)(p / top_k) * ffn.d + k];
        const float dg = dG[(size_t)r * ffn.f + f];
        ag = fmaf(dg, xv, ag);
        bg += dg;
        if (glu) {
            const float du = dU[(size_t)r * ffn.f + f];
            au = fmaf(du, xv, au);
            bu += du;
        }
    }
    if (g.gate) g.gate[e * g.gate_stride + (size_t)i] += ag;
    if (glu && g.up) g.up[e * g.up_stride + (size_t)i] += au;
    if (k == 0 && g.gate_bias) g.gate_bias[(size_t)e * ffn.f + f] += bg;
    if (k == 0 && glu && g.up_bias) g.up_bias[(size_t)e * ffn.f + f] += bu;
}

/* 3t. (tensor-core path) Dy[r] = bf16(w_p dy_t), zero from d to ld: the
   rows the down projection's gradients are made of; one block per row. */
__global__ void moe_cuda__bw_scaled_rows(const float *dy, const float *weight,
                                         const int32_t *pair_of_row, int top_k,
                                         const int32_t *offsets, int experts, int d, int ld,
                                         __nv_bfloat16 *Dy) {
    const int r = (int)blockIdx.x;
    if (r >= offsets[experts]) return;
    const int p = pair_of_row ? pair_of_row[r] : r;
    const float w = weight[p], *dyt = dy + (size_t)(p / top_k) * d;
    for (int c = (int)threadIdx.x; c < ld; c += (int)blockDim.x)
        Dy[(size_t)r * ld + c] = __float2bfloat16_rn(c < d ? w * dyt[c] : 0.0f);
}

/* 4t. a bias gradient, one thread per (column j, expert blockIdx.y):
   out[e][j] += the sum over e's rows, in row order, of src[r][j] ([rows][n]),
   or with src NULL of w_p dy_t[j] (the down projection's bias) */
__global__ void moe_cuda__bw_bias(const float *src, const float *dy, const float *weight,
                                  const int32_t *pair_of_row, int top_k, const int32_t *offsets,
                                  int n, float *out) {
    const int j = (int)(blockIdx.x * blockDim.x + threadIdx.x), e = (int)blockIdx.y;
    if (j >= n) return;
    float acc = 0.0f;
    for (int r = offsets[e]; r < offsets[e + 1]; r++) {
        if (src) {
            acc += src[(size_t)r * n + j];
        } else {
            const int p = pair_of_row ? pair_of_row[r] : r;
            acc += weight[p] * dy[(size_t)(p / top_k) * n + j];
        }
    }
    out[(size_t)e * n + j] += acc;
}

/* 2s. the shared expert's gate, one thread per token: gamma = sigmoid(x_t .
   shared_expert_gate) (1 without), and with the gate dL / d z = <dy_t, O_t +
   shared_down_bias> gamma (1 - gamma) */
__global__ void moe_cuda__bw_shared_expert_gate(const float *x, const float *dy, const float *Os,
                                                const float *down_bias, const float *gate_w,
                                                int tokens, int d, float *gamma, float *dzg) {
    const int t = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (t >= tokens) return;
    const float *xt = x + (size_t)t * d, *dyt = dy + (size_t)t * d, *o = Os + (size_t)t * d;
    if (!gate_w) { gamma[t] = 1.0f; dzg[t] = 0.0f; return; }
    float z = 0.0f, dg = 0.0f;
    for (int c = 0; c < d; c++) z = fmaf(xt[c], gate_w[c], z);
    const float g = moe_cuda__sigmoid(z);
    for (int c = 0; c < d; c++) dg = fmaf(dyt[c], down_bias ? o[c] + down_bias[c] : o[c], dg);
    gamma[t] = g;
    dzg[t] = dg * g * (1.0f - g);
}

typedef struct moe_cuda__router_bw_args {
    const float *logits, *scores, *gw;
    const int32_t *expert;
    const uint8_t *dropped;
    int tokens, experts, top_k, sigmoid, balance_loss, normalize, after_drop;
    float norm_p, norm_eps, routed_scale, balance_coef, z_coef, clip;
    float importance_coef, seq_coef;
    int64_t seq_len;   /* L of the sequence loss (T when unset)              */
    double *fbal;   /* [E] the balance loss's dL / d pn[t][e] (1 block)  */
    double *fseq;   /* [n_seq][E] the sequence loss's, per sequence       */
    double *dimp;   /* [E] d(coef CV^2(importance)) / d importance_e      */
    double *ds;     /* [T][E] scratch: dL / d score                       */
    float *dz;      /* [T][E] dL / d logit                                */
} moe_cuda__router_bw_args;

/* The pre-drop gate weight of slot j of token t (moe.h's moe__normalize over
   all slots, without routed_scale): what the importance loss sums. */
__device__ __forceinline__ float moe_cuda__pre_drop_weight(const moe_cuda__router_bw_args *a,
                                                           int64_t t, int j) {
    const float *sc = a->scores + t * a->experts;
    const int32_t *idx = a->expert + t * a->top_k;
    const float g = sc[idx[j]];
    if (a->normalize == MOE_NORM_NONE) return g;
    const double den = moe_cuda__slot_norm(sc, idx, NULL, a->top_k, 0, a->normalize,
                                           a->norm_p) + a->norm_eps;
    return den > 0.0 ? (float)(g / den) : 0.0f;
}

/* 5b. one block, thread e: importance_e = sum of e's pre-drop weights (x
   routed_scale), then d(coef CV^2)/d importance_e, CV^2 = var / (mean^2 +
   1e-10) over the E experts (population variance) */
__global__ void __launch_bounds__(MOE_CUDA__BLOCK)
moe_cuda__bw_importance(moe_cuda__router_bw_args a) {
    __shared__ double red[MOE_CUDA__BLOCK];
    const int e = (int)threadIdx.x, E = a.experts;
    double v = 0.0;
    if (e < E)
        for (int64_t t = 0; t < a.tokens; t++)
            for (int j = 0; j < a.top_k; j++)
                if (a.expert[t * a.top_k + j] == e)
                    v += (double)moe_cuda__pre_drop_weight(&a, t, j) * a.routed_scale;
    const double mean = moe_cuda__block_sum(e < E ? v : 0.0, red) / E;
    const double var = moe_cuda__block_sum(e < E ? (v - mean) * (v - mean) : 0.0, red) / E;
    const double den = mean * mean + 1e-10;
    if (e < E)
        a.dimp[e] = E <= 1 ? 0.0 : a.importance_coef * (2.0 * (v - mean) / E / den -
                                                        var * 2.0 * mean / (E * den * den));
}

/* 5c. one block per sequence s, thread e: coef f_e / (n nseq) with f_e = E /
   (K n) times the tokens of s whose plain top-K scores hold e */
__global__ void __launch_bounds__(MOE_CUDA__BLOCK)
moe_cuda__bw_sequence(moe_cuda__router_bw_args a) {
    const int s = (int)blockIdx.x, e = (int)threadIdx.x, E = a.experts, K = a.top_k;
    if (e >= E) return;
    const int64_t L = a.seq_len, t0 = s * L, n_seq = (a.tokens + L - 1) / L;
    const int64_t n = a.tokens - t0 < L ? a.tokens - t0 : L;
    int64_t f = 0;
    for (int64_t t = t0; t < t0 + n; t++) {
        const float *sc = a.scores + t * E;
        int rank = 0;   /* experts before e in (score desc, index asc) */
        for (int q = 0; q < E; q++) rank += moe_cuda__before(sc[q], q, sc[e], e);
        f += rank < K;
    }
    a.fseq[(size_t)s * E + e] =
        a.seq_coef * ((double)E / ((double)K * n) * (double)f) / ((double)n * n_seq);
}


/* 5a. one block, thread e: coef E f_e / (T (K)) / T, f_e the pairs routed to
   expert e, dropped ones too (first choices only for FIRST_CHOICE); the
   counts are constants of the gradient */
__global__ void __launch_bounds__(MOE_CUDA__BLOCK)
moe_cuda__bw_balance(moe_cuda__router_bw_args a) {
    const int e = (int)threadIdx.x, K = a.top_k;
    if (e >= a.experts) return;
    const int slots = a.balance_loss == MOE_BALANCE_FIRST_CHOICE ? 1 : K;
    int64_t f = 0;
    for (int64_t t = 0; t < a.tokens; t++)
        for (int j = 0; j < slots; j++) f += a.expert[t * K + j] == e;   /* drops count */
    const double T = (double)a.tokens;
    const double per = a.balance_loss == MOE_BALANCE_TOPK_NORMALIZED ? (double)K : 1.0;
    a.fbal[e] = a.balance_coef != 0.0f && a.tokens > 0
                    ? (double)a.balance_coef * a.experts * ((double)f / (T * per)) / T : 0.0;
}

/* moe.h's moe__normalize_backward for one token: the weights w_j = r m_j g_j
   / den (den over the slots in the denominator, + eps; 1 for NONE) carry
   dL/dw_j = dw[j] (or dexp[slot j's expert]) back to the scores g_j = sc[idx[j]],
   added into ds. m_j: slot j kept (dr NULL: all); in the denominator: all
   slots, or the kept ones with after_drop. */
__device__ __forceinline__ void moe_cuda__normalize_backward(const moe_cuda__router_bw_args *a,
                                                             const float *sc, const int32_t *idx,
                                                             const uint8_t *dr, int after_drop,
                                                             const float *dw, const double *dexp,
                                                             double *ds) {
    const int K = a->top_k;
    const double r = a->routed_scale;
#define MOE_CUDA__DW(j) (dw ? dw[j] : (float)dexp[idx[j]])
#define MOE_CUDA__KEPT(j) (!(dr && dr[j]))
    if (a->normalize == MOE_NORM_NONE) {
        for (int j = 0; j < K; j++) if (MOE_CUDA__KEPT(j)) ds[idx[j]] += r * MOE_CUDA__DW(j);
    } else {
        const double nrm = moe_cuda__slot_norm(sc, idx, dr, K, after_drop, a->normalize,
                                               a->norm_p);
        const double den = nrm + a->norm_eps;
        double dot = 0.0;
        for (int j = 0; j < K; j++)
            if (MOE_CUDA__KEPT(j)) dot += (double)MOE_CUDA__DW(j) * sc[idx[j]];
        for (int j = 0; den > 0.0 && j < K; j++) {
            const int in = !(after_drop && !MOE_CUDA__KEPT(j));   /* in the denominator */
            const double g = sc[idx[j]];
            double dden = 0.0;
            if (in && a->normalize == MOE_NORM_PNORM)   /* (|g| / ||g||_p)^(p-1) sign g */
                dden = (nrm > 0.0 ? pow(fabs(g) / nrm, a->norm_p - 1.0) : a->norm_p == 1.0f) *
                       (g < 0.0 ? -1.0 : 1.0);
            else if (in)
                dden = 1.0;
            ds[idx[j]] += r / den *
                          ((MOE_CUDA__KEPT(j) ? (double)MOE_CUDA__DW(j) : 0.0) - dot / den * dden);
        }
    }
#undef MOE_CUDA__KEPT
#undef MOE_CUDA__DW
}

/* 5d. one thread per token, in moe.h's order (moe__router_backward_ref) */
__global__ void moe_cuda__bw_router(moe_cuda__router_bw_args a) {
    const int t = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (t >= a.tokens) return;
    const int E = a.experts, K = a.top_k;
    const float *sc = a.scores + (size_t)t * E, *z = a.logits + (size_t)t * E;
    const int32_t *idx = a.expert + (size_t)t * K;
    const uint8_t *dr = a.dropped + (size_t)t * K;
    const float *dw = a.gw + (size_t)t * K;
    double *ds = a.ds + (size_t)t * E;
    float *dz = a.dz + (size_t)t * E;
    for (int e = 0; e < E; e++) ds[e] = 0.0;

    /* gate weights -> scores; the importance loss sums the pre-drop weights:
       the same backward with dw_j = d(coef CV^2)/d importance of slot j's
       expert, every slot kept */
    moe_cuda__normalize_backward(&a, sc, idx, dr, a.after_drop, dw, NULL, ds);
    if (a.importance_coef != 0.0f)
        moe_cuda__normalize_backward(&a, sc, idx, NULL, 0, NULL, a.dimp, ds);

    /* the balance and sequence losses see pn = p (softmax) or s / sum s (sigmoid) */
    if (a.balance_coef != 0.0f || a.seq_coef != 0.0f) {
        const double *fs = a.seq_coef != 0.0f ? a.fseq + (size_t)(t / a.seq_len) * E : NULL;
#define MOE_CUDA__PN_GRAD(e) ((float)(a.fbal[e] + (fs ? fs[e] : 0.0)))
        if (!a.sigmoid) {
            for (int e = 0; e < E; e++) ds[e] += MOE_CUDA__PN_GRAD(e);
        } else {
            double ssum = 0.0, corr = 0.0;
            for (int e = 0; e < E; e++) ssum += sc[e];
            if (ssum > 0.0) {
                for (int e = 0; e < E; e++) corr += MOE_CUDA__PN_GRAD(e) * (sc[e] / ssum);
                for (int e = 0; e < E; e++) ds[e] += (MOE_CUDA__PN_GRAD(e) - corr) / ssum;
            }
        }
#undef MOE_CUDA__PN_GRAD
    }

    /* scores -> logits */
    if (!a.sigmoid) {
        double dot = 0.0;
        for (int e = 0; e < E; e++) dot += ds[e] * sc[e];
        for (int e = 0; e < E; e++) dz[e] = (float)(sc[e] * (ds[e] - dot));
    } else {
        for (int e = 0; e < E; e++) dz[e] = (float)(ds[e] * sc[e] * (1.0 - sc[e]));
    }

    /* z-loss (1/T) sum LSE^2: dz += coef 2/T LSE softmax(z) */
    if (a.z_coef != 0.0f) {
        double m = z[0], s = 0.0;
        for (int e = 1; e < E; e++) if (z[e] > m) m = z[e];
        for (int e = 0; e < E; e++) s += exp((double)z[e] - m);
        const double lse = m + log(s);
        for (int e = 0; e < E; e++)
            dz[e] += (float)(a.z_coef * 2.0 / a.tokens * lse * exp((double)z[e] - lse));
    }

    /* the token's router gradient clipped to norm clip */
    if (a.clip > 0.0f) {
        double nrm = 0.0;
        for (int e = 0; e < E; e++) nrm += (double)dz[e] * dz[e];
        nrm = sqrt(nrm);
        if (nrm > a.clip) {
            const float k = (float)(a.clip / nrm);
            for (int e = 0; e < E; e++) dz[e] *= k;
        }
    }
}

/* 6a. one thread per (e, k): d router[e][k] += sum_t dz[t][e] x[t][k];
   d router_bias[e] += sum_t dz[t][e] (k == 0) */
__global__ void moe_cuda__bw_router_grad(const float *dz, const float *x, int tokens, int experts,
                                         int d, float *g_router, float *g_router_bias) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)experts * d) return;
    const int e = (int)(i / d), k = (int)(i % d);
    float acc = 0.0f, bias = 0.0f;
    for (int t = 0; t < tokens; t++) {
        const float g = dz[(size_t)t * experts + e];
        acc = fmaf(g, x[(size_t)t * d + k], acc);
        bias += g;
    }
    if (g_router) g_router[i] += acc;
    if (g_router_bias && k == 0) g_router_bias[e] += bias;
}

/* 6b. one block per token: dx[t][c] = sum over kept slots (slot order) of
   dXr[row][c], (+ the shared gate's dzg[t] gate_w[c] + its expert's dXs[t][c])
   + sum_e dz[t][e] router[e][c] */
__global__ void moe_cuda__bw_token_dx(const float *dXr, const int32_t *row_of_pair, int top_k,
                                      const float *dzg, const float *gate_w, const float *dXs,
                                      const float *dz, const float *router, int experts, int d,
                                      float *dx) {
    const int t = (int)blockIdx.x;
    for (int c = (int)threadIdx.x; c < d; c += (int)blockDim.x) {
        float acc = 0.0f, r = 0.0f;
        for (int j = 0; j < top_k; j++) {
            const int row = row_of_pair[(size_t)t * top_k + j];
            if (row >= 0) acc += dXr[(size_t)row * d + c];
        }
        if (gate_w) acc += dzg[t] * gate_w[c];
        if (dXs) acc += dXs[(size_t)t * d + c];
        for (int e = 0; e < experts; e++)
            r = fmaf(dz[(size_t)t * experts + e], router[(size_t)e * d + c], r);
        dx[(size_t)t * d + c] = acc + r;
    }
}

// ----------------------------------------------------------------------------
// The host API. Everything the host can check is checked before the first
// launch; a refused call writes nothing (but info->workspace_required).

/* The cudaError_t behind the last MOE_STATUS_CUDA_ERROR on this thread. */
static inline cudaError_t &moe_cuda__error_slot() {
    static thread_local cudaError_t error = cudaSuccess;
    return error;
}
static inline cudaError_t moe_cuda_last_error() { return moe_cuda__error_slot(); }

/* Every size a call needs, from the resolved config and T. */
typedef struct moe_cuda__plan {
    moe_config c;
    int T, E, K, D, F, Fs, glu, simt, C, pairs, rows;   /* rows: pairs, at least 1 */
    int backward;                                       /* a moe_cuda_backward plan */
    int d_pad, f_pad, n1_pad, d_out_pad, fs_pad, n1s_pad;
    int64_t seq_len;
    int chunks_per_seq, n_seq, n_chunks, plain;
} moe_cuda__plan;

static inline int moe_cuda__pad(int v, int m) { return (v + m - 1) / m * m; }

/* A GLU's hidden units go 32 to a 64-row W1 tile; without one, 64. */
static inline void moe_cuda__ffn_pads(int f, int glu, int *f_pad, int *n1_pad) {
    *f_pad = moe_cuda__pad(f, glu ? MOE_CUDA__BN / 2 : MOE_CUDA__BN);
    *n1_pad = glu ? 2 * *f_pad : *f_pad;
}

static inline moe_status moe_cuda__plan_of(const moe_config *cfg, int32_t T, moe_cuda__plan *p) {
    moe_status st;
    if (!cfg) return MOE_STATUS_NULL_ARGUMENT;
    if (T < 0) return MOE_STATUS_BAD_DIMENSION;
    memset(p, 0, sizeof *p);
    if ((st = moe_config_resolve(cfg, &p->c)) != MOE_STATUS_OK) return st;
    const moe_config *c = &p->c;
    const int capacity_on = c->capacity > 0 || c->capacity_factor > 0.0f;
    if (c->routing != MOE_ROUTING_TOPK || c->second_expert != MOE_SECOND_GREEDY ||
        (c->training && (c->noise != MOE_NOISE_NONE || c->jitter > 0.0f ||
                         c->router_noise_std > 0.0f || c->expert_dropout > 0.0f)) ||
        (capacity_on && c->drop_policy != MOE_DROP_POSITION) ||
        c->num_experts > MOE_CUDA__MAX_EXPERTS || c->top_k > MOE_CUDA__MAX_TOP_K)
        return MOE_STATUS_CUDA_UNSUPPORTED;
    if ((int64_t)T * c->top_k > INT32_MAX / 2) return MOE_STATUS_SIZE_OVERFLOW;
    p->T = T; p->E = c->num_experts; p->K = c->top_k; p->D = c->d_model; p->F = c->d_ff;
    p->Fs = c->shared_d_ff; p->glu = moe_cuda__is_glu(c->activation);
    p->simt = cfg->isa == MOE_ISA_REFERENCE;   /* (resolving turns AUTO into the host's ISA) */
    p->C = c->capacity;
    if (p->C == 0 && c->capacity_factor > 0.0f &&
        (st = moe_capacity(c->capacity_formula, T, p->E, p->K, c->capacity_factor, &p->C)) !=
            MOE_STATUS_OK)
        return st;
    p->pairs = T * p->K;
    p->rows = p->pairs > 0 ? p->pairs : 1;
    p->d_pad = moe_cuda__pad(p->D, MOE_CUDA__BK);
    p->d_out_pad = moe_cuda__pad(p->D, MOE_CUDA__BN);
    moe_cuda__ffn_pads(p->F, p->glu, &p->f_pad, &p->n1_pad);
    moe_cuda__ffn_pads(p->Fs, p->glu, &p->fs_pad, &p->n1s_pad);
    /* a sequence longer than T is one sequence of T tokens */
    p->seq_len = c->seq_len > 0 && c->seq_len < T ? c->seq_len : (T > 0 ? T : 1);
    p->chunks_per_seq = (int)((p->seq_len + MOE_CUDA__CHUNK_TOKENS - 1) / MOE_CUDA__CHUNK_TOKENS);
    p->n_seq = (int)((T + p->seq_len - 1) / p->seq_len);
    if ((int64_t)p->n_seq * p->chunks_per_seq > INT32_MAX) return MOE_STATUS_SIZE_OVERFLOW;
    p->n_chunks = p->n_seq * p->chunks_per_seq;
    p->plain = c->selection_bias || c->n_group > 1;
    return MOE_STATUS_OK;
}

/* The workspace: the report first, then one array after another, 256-byte
   aligned from the first 256-byte boundary of the caller's pointer (the size
   includes the slack). With base NULL only the size is computed. */
typedef struct moe_cuda__ws {
    moe_cuda__report *report;
    float *logits, *scores, *weight0, *weight;
    int32_t *expert, *plain, *counts, *offsets, *row_of_pair, *pair_of_row, *shared_offsets;
    uint8_t *dropped;
    double *lse_sq, *score_sum, *sum_d;
    int32_t *sum_i;
    __nv_bfloat16 *A, *H, *Xs, *Hs;   /* tensor-core path */
    __nv_bfloat16 *Dy, *dH, *Dys, *dHs;   /* its backward: w_p dy_t rows, dL / d(W1 x) */
    float *Hf, *Hsf;                  /* fp32 path        */
    float *O, *Os;
    /* backward: pre-activations and their gradients [rows][F], per-row dx,
       dL / d weight [T K], balance factors [E], dL / d score and logit [T][E] */
    float *G, *U, *dG, *dU, *dXr, *gw, *dz;
    double *fbal, *fseq, *dimp, *ds;
    /* and the shared expert's: [T][Fs] each, [T][D], gamma and dL / d z [T] */
    float *Gs, *Us, *dGs, *dUs, *dXs, *gamma, *dzg;
} moe_cuda__ws;

static inline size_t moe_cuda__bind(const moe_cuda__plan *p, unsigned char *base,
                                    moe_cuda__ws *w) {
    size_t at = 0;
    memset(w, 0, sizeof *w);
#define MOE_CUDA__TAKE(field, type, count)                                   \
    do {                                                                     \
        w->field = base ? (type *)(void *)(base + at) : NULL;                \
        at += ((size_t)(count) * sizeof(type) + 255) / 256 * 256;            \
    } while (0)
    MOE_CUDA__TAKE(report, moe_cuda__report, 1);
    if (p->T > 0 && p->backward) {
        const size_t T = (size_t)p->T, E = (size_t)p->E, TK = (size_t)p->pairs;
        const size_t RF = (size_t)p->rows * p->F, RD = (size_t)p->rows * p->D;
        MOE_CUDA__TAKE(counts, int32_t, E);
        MOE_CUDA__TAKE(offsets, int32_t, E + 1);
        MOE_CUDA__TAKE(row_of_pair, int32_t, TK);
        MOE_CUDA__TAKE(pair_of_row, int32_t, (size_t)p->rows);
        if (p->simt) MOE_CUDA__TAKE(Hf, float, RF);
        else {
            MOE_CUDA__TAKE(A, __nv_bfloat16, (size_t)p->rows * p->d_pad);
            MOE_CUDA__TAKE(H, __nv_bfloat16, (size_t)p->rows * p->f_pad);
            MOE_CUDA__TAKE(Dy, __nv_bfloat16, (size_t)p->rows * p->d_out_pad);
            MOE_CUDA__TAKE(dH, __nv_bfloat16, (size_t)p->rows * p->n1_pad);
        }
        /* fp32 dG, dU: the fp32 path's, or the tensor path's bias gradients */
        const int fp32_grads = p->simt || p->c.expert_bias;
        MOE_CUDA__TAKE(G, float, RF);
        if (p->glu) MOE_CUDA__TAKE(U, float, RF);
        if (fp32_grads) MOE_CUDA__TAKE(dG, float, RF);
        if (fp32_grads && p->glu) MOE_CUDA__TAKE(dU, float, RF);
        MOE_CUDA__TAKE(O, float, RD);
        MOE_CUDA__TAKE(dXr, float, RD);
        MOE_CUDA__TAKE(gw, float, TK);
        MOE_CUDA__TAKE(fbal, double, E);
        MOE_CUDA__TAKE(fseq, double, (size_t)p->n_seq * E);
        MOE_CUDA__TAKE(dimp, double, E);
        MOE_CUDA__TAKE(ds, double, T * E);
        MOE_CUDA__TAKE(dz, float, T * E);
        if (p->Fs > 0) {
            const size_t TF = T * (size_t)p->Fs;
            MOE_CUDA__TAKE(shared_offsets, int32_t, 2);
            if (p->simt) MOE_CUDA__TAKE(Hsf, float, TF);
            else {
                MOE_CUDA__TAKE(Xs, __nv_bfloat16, T * p->d_pad);
                MOE_CUDA__TAKE(Hs, __nv_bfloat16, T * p->fs_pad);
                MOE_CUDA__TAKE(Dys, __nv_bfloat16, T * p->d_out_pad);
                MOE_CUDA__TAKE(dHs, __nv_bfloat16, T * p->n1s_pad);
            }
            MOE_CUDA__TAKE(Gs, float, TF);
            if (p->glu) MOE_CUDA__TAKE(Us, float, TF);
            if (fp32_grads) MOE_CUDA__TAKE(dGs, float, TF);
            if (fp32_grads && p->glu) MOE_CUDA__TAKE(dUs, float, TF);
            MOE_CUDA__TAKE(Os, float, T * (size_t)p->D);
            MOE_CUDA__TAKE(dXs, float, T * (size_t)p->D);
            MOE_CUDA__TAKE(gamma, float, T);
            MOE_CUDA__TAKE(dzg, float, T);
        }
    } else if (p->T > 0) {
        const size_t T = (size_t)p->T, E = (size_t)p->E, TK = (size_t)p->pairs;
        const size_t rows = (size_t)p->rows;
        MOE_CUDA__TAKE(logits, float, T * E);
        MOE_CUDA__TAKE(scores, float, T * E);
        MOE_CUDA__TAKE(weight0, float, TK);
        if (p->C > 0) MOE_CUDA__TAKE(weight, float, TK);
        MOE_CUDA__TAKE(expert, int32_t, TK);
        if (p->plain) MOE_CUDA__TAKE(plain, int32_t, TK);
        MOE_CUDA__TAKE(dropped, uint8_t, TK);
        MOE_CUDA__TAKE(lse_sq, double, T);
        MOE_CUDA__TAKE(score_sum, double, T);
        MOE_CUDA__TAKE(sum_d, double, (size_t)p->n_chunks * (2 * E + 1));
        MOE_CUDA__TAKE(sum_i, int32_t, (size_t)p->n_chunks * (4 * E + 2));
        MOE_CUDA__TAKE(counts, int32_t, E);
        MOE_CUDA__TAKE(offsets, int32_t, E + 1);
        MOE_CUDA__TAKE(row_of_pair, int32_t, TK);
        MOE_CUDA__TAKE(pair_of_row, int32_t, rows);
        MOE_CUDA__TAKE(O, float, rows * (size_t)p->D);
        if (p->simt) MOE_CUDA__TAKE(Hf, float, rows * (size_t)p->F);
        else {
            MOE_CUDA__TAKE(A, __nv_bfloat16, rows * (size_t)p->d_pad);
            MOE_CUDA__TAKE(H, __nv_bfloat16, rows * (size_t)p->f_pad);
        }
        if (p->Fs > 0) {
            MOE_CUDA__TAKE(shared_offsets, int32_t, 2);
            MOE_CUDA__TAKE(Os, float, T * (size_t)p->D);
            if (p->simt) MOE_CUDA__TAKE(Hsf, float, T * (size_t)p->Fs);
            else {
                MOE_CUDA__TAKE(Xs, __nv_bfloat16, T * (size_t)p->d_pad);
                MOE_CUDA__TAKE(Hs, __nv_bfloat16, T * (size_t)p->fs_pad);
            }
        }
    }
#undef MOE_CUDA__TAKE
    if (!p->C && base) w->weight = w->weight0;   /* no capacity: the weights are final */
    return at + 255;
}
static inline unsigned char *moe_cuda__aligned(const void *workspace) {
    return (unsigned char *)(((uintptr_t)workspace + 255) / 256 * 256);
}

/* The packed blob: routed W1, W2, then the shared expert's, 256-byte aligned. */
typedef struct moe_cuda__blob { size_t w1, w2, ws1, ws2, total; } moe_cuda__blob;

static inline moe_cuda__blob moe_cuda__blob_of(const moe_cuda__plan *p) {
    moe_cuda__blob b;
    const size_t E = (size_t)p->E, two = sizeof(__nv_bfloat16);
    size_t at = 0;
#define MOE_CUDA__PIECE(field, elems) \
    do { b.field = at; at += ((elems) * two + 255) / 256 * 256; } while (0)
    MOE_CUDA__PIECE(w1, E * p->n1_pad * p->d_pad);
    MOE_CUDA__PIECE(w2, E * p->d_out_pad * p->f_pad);
    MOE_CUDA__PIECE(ws1, (size_t)p->n1s_pad * p->d_pad);
    MOE_CUDA__PIECE(ws2, (size_t)p->d_out_pad * p->fs_pad);
#undef MOE_CUDA__PIECE
    b.total = at;
    return b;
}

/* Buffer overlap, as moe.h checks it: two spans may share bytes only if
   neither is written. */
typedef struct moe_cuda__spans {
    struct { uintptr_t lo, hi; int written; } s[40];
    int n;
} moe_cuda__spans;
static inline void moe_cuda__span(moe_cuda__spans *sp, const void *p, size_t bytes,
                                  int written) {
    if (!p || !bytes) return;
    sp->s[sp->n].lo = (uintptr_t)p;
    sp->s[sp->n].hi = (uintptr_t)p + bytes;
    sp->s[sp->n].written = written;
    sp->n++;
}
static inline int moe_cuda__overlap(const moe_cuda__spans *sp) {
    for (int i = 0; i < sp->n; i++)
        for (int j = i + 1; j < sp->n; j++)
            if ((sp->s[i].written || sp->s[j].written) && sp->s[i].lo < sp->s[j].hi &&
                sp->s[j].lo < sp->s[i].hi)
                return 1;
    return 0;
}

/* The weight spans a forward reads (fp32 experts on the fp32 path, else the blob). */
static inline void moe_cuda__weight_spans(moe_cuda__spans *sp, const moe_cuda__plan *p,
                                          const moe_weights *w) {
    const size_t f4 = sizeof(float), E = (size_t)p->E, D = (size_t)p->D, F = (size_t)p->F;
    const size_t Fs = (size_t)p->Fs;
    moe_cuda__span(sp, w->router, E * D * f4, 0);
    moe_cuda__span(sp, w->router_bias, p->c.router_bias ? E * f4 : 0, 0);
    moe_cuda__span(sp, w->selection_bias, p->c.selection_bias ? E * f4 : 0, 0);
    if (p->simt) {
        moe_cuda__span(sp, w->gate, E * F * D * f4 * (w->gate_up_fused ? 2 : 1), 0);
        moe_cuda__span(sp, w->up, p->glu && !w->gate_up_fused ? E * F * D * f4 : 0, 0);
        moe_cuda__span(sp, w->down, E * D * F * f4, 0);
        moe_cuda__span(sp, w->shared_gate, Fs * D * f4, 0);
        moe_cuda__span(sp, w->shared_up, p->glu ? Fs * D * f4 : 0, 0);
        moe_cuda__span(sp, w->shared_down, D * Fs * f4, 0);
    } else {
        moe_cuda__span(sp, w->packed, w->packed_bytes, 0);
    }
    if (p->c.expert_bias) {
        moe_cuda__span(sp, w->gate_bias, E * F * f4, 0);
        moe_cuda__span(sp, w->up_bias, p->glu ? E * F * f4 : 0, 0);
        moe_cuda__span(sp, w->down_bias, E * D * f4, 0);
        moe_cuda__span(sp, w->shared_gate_bias, Fs * f4, 0);
        moe_cuda__span(sp, w->shared_up_bias, p->glu ? Fs * f4 : 0, 0);
        moe_cuda__span(sp, w->shared_down_bias, Fs ? D * f4 : 0, 0);
    }
    moe_cuda__span(sp, w->shared_expert_gate, p->c.shared_expert_gated ? D * f4 : 0, 0);
}

/* The weights a forward of this plan needs (MOE_STATUS_MISSING_WEIGHT). */
static inline int moe_cuda__weights_present(const moe_cuda__plan *p, const moe_weights *w,
                                            int fp32_experts) {
    const moe_config *c = &p->c;
    if (!w->router || (c->router_bias && !w->router_bias) ||
        (c->selection_bias && !w->selection_bias) ||
        (c->shared_expert_gated && !w->shared_expert_gate))
        return 0;
    if (c->expert_bias && (!w->gate_bias || (p->glu && !w->up_bias) || !w->down_bias))
        return 0;
    if (c->expert_bias && p->Fs > 0 &&
        (!w->shared_gate_bias || (p->glu && !w->shared_up_bias) || !w->shared_down_bias))
        return 0;
    if (!fp32_experts) return 1;
    if (!w->gate || !w->down || (p->glu && !w->gate_up_fused && !w->up)) return 0;
    return p->Fs == 0 || (w->shared_gate && w->shared_down && (!p->glu || w->shared_up));
}

/* Quantized expert tensors (routed or shared): the CUDA kernels run fp32 / bf16 only. */
static inline int moe_cuda__quantized(const moe_weights *w) {
    return w->gate_type || w->up_type || w->down_type || w->shared_gate_type ||
           w->shared_up_type || w->shared_down_type;
}

/* The weights a call reads: MISSING_WEIGHT when one is absent, BAD_PACKED
   when the tensor-core path's blob is too small or misaligned. */
static inline moe_status moe_cuda__check_weights(const moe_cuda__plan *p, const moe_weights *w) {
    if (moe_cuda__quantized(w)) return MOE_STATUS_QUANT_UNSUPPORTED;
    if (!moe_cuda__weights_present(p, w, p->simt) || (!p->simt && !w->packed))
        return MOE_STATUS_MISSING_WEIGHT;
    if (!p->simt && (w->packed_bytes < moe_cuda__blob_of(p).total || (uintptr_t)w->packed % 256))
        return MOE_STATUS_BAD_PACKED;
    return MOE_STATUS_OK;
}

/* Bytes of moe_cuda_pack_weights' blob for this config. */
static inline moe_status moe_cuda_pack_size(const moe_config *cfg, size_t *out_bytes) {
    moe_cuda__plan p;
    moe_status st;
    if (!out_bytes) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_cuda__plan_of(cfg, 0, &p)) != MOE_STATUS_OK) return st;
    *out_bytes = moe_cuda__blob_of(&p).total;
    return MOE_STATUS_OK;
}

/* Routed and shared expert weights (fp32, device) into the bf16 blob the
   tensor-core forward reads (device, `bytes` >= moe_cuda_pack_size), queued
   on `stream`. Pack once for inference, after each optimiser step when
   training. Then set w.packed and w.packed_bytes. */
static inline moe_status moe_cuda_pack_weights(const moe_config *cfg, const moe_weights *w,
                                               void *packed, size_t bytes,
                                               cudaStream_t stream = 0) {
    moe_cuda__plan p;
    moe_status st;
    if (!cfg || !w || !packed) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_cuda__plan_of(cfg, 0, &p)) != MOE_STATUS_OK) return st;
    if (moe_cuda__quantized(w)) return MOE_STATUS_QUANT_UNSUPPORTED;
    if (!moe_cuda__weights_present(&p, w, 1)) return MOE_STATUS_MISSING_WEIGHT;
    const moe_cuda__blob b = moe_cuda__blob_of(&p);
    if (bytes < b.total) return MOE_STATUS_WORKSPACE_TOO_SMALL;
    if ((uintptr_t)packed % 256 != 0) return MOE_STATUS_BAD_PACKED;
    {
        moe_cuda__spans sp;
        sp.n = 0;
        moe_cuda__plan fp = p;
        fp.simt = 1;   /* the fp32 tensors are what packing reads */
        moe_cuda__weight_spans(&sp, &fp, w);
        moe_cuda__span(&sp, packed, b.total, 1);
        if (moe_cuda__overlap(&sp)) return MOE_STATUS_ALIASING;
    }
    unsigned char *base = (unsigned char *)packed;
    const int fused = w->gate_up_fused && p.glu;
    const int gate_rows = fused ? 2 * p.F : p.F;
    const float *up = fused ? w->gate + (size_t)p.F * p.D : w->up;
    const dim3 grid(1024), block(256);
    cudaError_t e = MOE_CUDA_LAUNCH(moe_cuda__pack_w1, grid, block, 0, stream, w->gate,
                                    gate_rows, up, gate_rows, p.E, p.F, p.D, p.glu, p.n1_pad,
                                    p.d_pad, (__nv_bfloat16 *)(void *)(base + b.w1));
    if (e == cudaSuccess)
        e = MOE_CUDA_LAUNCH(moe_cuda__pack_w2, grid, block, 0, stream, w->down, p.E, p.D, p.F,
                            p.d_out_pad, p.f_pad, (__nv_bfloat16 *)(void *)(base + b.w2));
    if (e == cudaSuccess && p.Fs > 0)
        e = MOE_CUDA_LAUNCH(moe_cuda__pack_w1, grid, block, 0, stream, w->shared_gate, p.Fs,
                            w->shared_up, p.Fs, 1, p.Fs, p.D, p.glu, p.n1s_pad, p.d_pad,
                            (__nv_bfloat16 *)(void *)(base + b.ws1));
    if (e == cudaSuccess && p.Fs > 0)
        e = MOE_CUDA_LAUNCH(moe_cuda__pack_w2, grid, block, 0, stream, w->shared_down, 1, p.D,
                            p.Fs, p.d_out_pad, p.fs_pad, (__nv_bfloat16 *)(void *)(base + b.ws2));
    if (e != cudaSuccess) { moe_cuda__error_slot() = e; return MOE_STATUS_CUDA_ERROR; }
    return MOE_STATUS_OK;
}

/* Bytes of device workspace for a T-token forward (T = 0 included: the
   workspace always holds the forward's report). */
static inline moe_status moe_cuda_forward_workspace_size(const moe_config *cfg, int32_t T,
                                                         size_t *out_bytes) {
    moe_cuda__plan p;
    moe_cuda__ws w;
    if (!out_bytes) return MOE_STATUS_NULL_ARGUMENT;
    const moe_status st = moe_cuda__plan_of(cfg, T, &p);
    if (st == MOE_STATUS_OK) *out_bytes = moe_cuda__bind(&p, NULL, &w);
    return st;
}

/* The fp32 tensors of the routed experts (HF's fused gate_up: up = gate +
   F D) or of the shared expert. */
static inline moe_cuda__ffn32 moe_cuda__ffn32_of(const moe_cuda__plan *p, const moe_weights *w,
                                                 int shared) {
    const int fused = !shared && w->gate_up_fused && p->glu;
    moe_cuda__ffn32 r;
    memset(&r, 0, sizeof r);
    r.gate = shared ? w->shared_gate : w->gate;
    r.down = shared ? w->shared_down : w->down;
    r.up = shared ? w->shared_up : fused ? w->gate + (size_t)p->F * p->D : w->up;
    r.f = shared ? p->Fs : p->F;
    r.gate_stride = r.up_stride = (size_t)r.f * p->D * (fused ? 2 : 1);
    r.down_stride = (size_t)p->D * r.f;
    if (p->c.expert_bias) {
        r.gate_bias = shared ? w->shared_gate_bias : w->gate_bias;
        r.up_bias = shared ? w->shared_up_bias : w->up_bias;
    }
    r.d = p->D; r.act = (int)p->c.activation;
    return r;
}

/* The fp32 path's FFN of one expert set: H (and the pre-activations G, U
   when not NULL), then O = H down^T. */
static inline cudaError_t moe_cuda__ffn_simt(const moe_cuda__ffn32 &f, const float *x,
                                             const int32_t *pair_of_row, int top_k,
                                             const int32_t *offsets, int experts, int max_rows,
                                             float *H, float *G, float *U, float *O,
                                             const int32_t *halt, cudaStream_t stream) {
    const dim3 grid((unsigned)max_rows), block(128);
    cudaError_t e = MOE_CUDA_LAUNCH(moe_cuda__ffn_hidden_ref, grid, block, 0, stream, f, x,
                                    pair_of_row, top_k, offsets, experts, H, G, U, halt);
    if (e == cudaSuccess)
        e = MOE_CUDA_LAUNCH(moe_cuda__ffn_out_ref, grid, block, 0, stream, f, (const float *)H,
                            offsets, experts, O, halt);
    return e;
}

/* One set of experts on the tensor cores, the routed ones or the shared
   one (one expert whose row t is token t), with its workspace arrays. */
typedef struct moe_cuda__tensor_experts {
    int experts, f, f_pad, n1_pad, max_rows;
    const __nv_bfloat16 *w1, *w2;          /* in the packed blob */
    const float *gate_bias, *up_bias;      /* or NULL */
    const int32_t *offsets;
    __nv_bfloat16 *x, *h, *dy, *dh;        /* A, H; the backward's Dy, dH */
    float *o, *g, *u;                      /* expert outputs; pre-activations or NULL */
} moe_cuda__tensor_experts;

static inline moe_cuda__tensor_experts moe_cuda__tensor_set(const moe_cuda__plan *p,
                                                            const moe_weights *w,
                                                            const moe_cuda__ws *ws, int shared) {
    const moe_cuda__blob blob = moe_cuda__blob_of(p);
    const unsigned char *base = (const unsigned char *)w->packed;
    moe_cuda__tensor_experts s;
    memset(&s, 0, sizeof s);
    s.experts = shared ? 1 : p->E;
    s.f = shared ? p->Fs : p->F;
    s.f_pad = shared ? p->fs_pad : p->f_pad;
    s.n1_pad = shared ? p->n1s_pad : p->n1_pad;
    s.max_rows = shared ? p->T : p->pairs;
    if (base) {   /* (none on the fp32 path) */
        s.w1 = (const __nv_bfloat16 *)(const void *)(base + (shared ? blob.ws1 : blob.w1));
        s.w2 = (const __nv_bfloat16 *)(const void *)(base + (shared ? blob.ws2 : blob.w2));
    }
    if (p->c.expert_bias) {
        s.gate_bias = shared ? w->shared_gate_bias : w->gate_bias;
        s.up_bias = shared ? w->shared_up_bias : w->up_bias;
    }
    s.offsets = shared ? ws->shared_offsets : ws->offsets;
    s.x = shared ? ws->Xs : ws->A;
    s.h = shared ? ws->Hs : ws->H;
    s.dy = shared ? ws->Dys : ws->Dy;
    s.dh = shared ? ws->dHs : ws->dH;
    s.o = shared ? ws->Os : ws->O;
    s.g = shared ? ws->Gs : ws->G;   /* NULL in a forward's workspace */
    s.u = shared ? ws->Us : ws->U;
    return s;
}

/* A ROWS GEMM of `s`'s experts: C = A B_e, the epilogue EPI. */
template <int EPI, int B_KMAJOR>
static inline cudaError_t moe_cuda__rows_gemm(const moe_cuda__tensor_experts &s,
                                              const __nv_bfloat16 *a, int lda,
                                              const __nv_bfloat16 *b, int ldb, size_t b_stride,
                                              int n_end, int k_end, moe_cuda__epilogue out,
                                              const int32_t *halt, cudaStream_t stream) {
    moe_cuda__gemm_args g;
    g.a = a; g.b = b; g.lda = lda; g.ldb = ldb; g.b_stride = b_stride;
    g.n_end = n_end; g.k_end = k_end; g.offsets = s.offsets; g.experts = s.experts;
    g.halt = halt;
    return MOE_CUDA_LAUNCH((moe_cuda__grouped_gemm<EPI, B_KMAJOR, 0>),
                           moe_cuda__gemm_grid(s.max_rows, s.experts, n_end),
                           dim3(MOE_CUDA__GEMM_THREADS), MOE_CUDA__GEMM_SMEM, stream, g, out);
}

/* The experts' FFN on their gathered bf16 rows: H = act(x W1^T) (GLU: the
   gate times up), O = H W2^T in fp32; the pre-activations too when s.g. */
static inline cudaError_t moe_cuda__ffn_tensor(const moe_cuda__plan *p,
                                               const moe_cuda__tensor_experts &s,
                                               const int32_t *halt, cudaStream_t stream) {
    moe_cuda__epilogue h, o;
    memset(&h, 0, sizeof h);
    h.h = s.h; h.f = s.f; h.ldh = s.f_pad; h.act = (int)p->c.activation;
    h.gate_bias = s.gate_bias; h.up_bias = s.up_bias; h.g = s.g; h.u = s.u;
    const size_t w1_stride = (size_t)s.n1_pad * p->d_pad;
    const size_t w2_stride = (size_t)p->d_out_pad * s.f_pad;
    cudaError_t e = p->glu
        ? moe_cuda__rows_gemm<MOE_CUDA__EPI_GLU, 0>(s, s.x, p->d_pad, s.w1, p->d_pad, w1_stride,
                                                    s.n1_pad, p->d_pad, h, halt, stream)
        : moe_cuda__rows_gemm<MOE_CUDA__EPI_ACT, 0>(s, s.x, p->d_pad, s.w1, p->d_pad, w1_stride,
                                                    s.n1_pad, p->d_pad, h, halt, stream);
    memset(&o, 0, sizeof o);
    o.c = s.o; o.ldc = p->D; o.n = p->D;
    if (e == cudaSuccess)
        e = moe_cuda__rows_gemm<MOE_CUDA__EPI_STORE, 0>(s, s.h, s.f_pad, s.w2, s.f_pad,
                                                        w2_stride, p->d_out_pad, s.f_pad, o,
                                                        halt, stream);
    return e;
}

/* Queue the routing kernel of a forward (a benchmark times it alone). */
static inline cudaError_t moe_cuda__route(const moe_cuda__plan *p, const moe_weights *w,
                                          const float *x, const moe_cuda__ws *ws,
                                          cudaStream_t stream) {
    const moe_config *c = &p->c;
    moe_cuda__route_args ra;
    memset(&ra, 0, sizeof ra);
    ra.x = x; ra.router = w->router;
    ra.router_bias = c->router_bias ? w->router_bias : NULL;
    ra.selection_bias = c->selection_bias ? w->selection_bias : NULL;
    ra.tokens = p->T; ra.d = p->D; ra.experts = p->E; ra.top_k = p->K;
    ra.sigmoid = c->score == MOE_SCORE_SIGMOID;
    ra.n_group = c->n_group; ra.topk_group = c->topk_group;
    ra.group_score_top = c->group_score_top; ra.group_mask_zero = c->group_mask_zero;
    ra.normalize = (int)c->normalize; ra.norm_p = c->norm_p; ra.norm_eps = c->norm_eps;
    ra.routed_scale = c->routed_scale;
    ra.logits = ws->logits; ra.scores = ws->scores; ra.weight = ws->weight0;
    ra.expert = ws->expert; ra.dropped = ws->dropped; ra.lse_sq = ws->lse_sq;
    ra.score_sum = ws->score_sum; ra.plain = ws->plain; ra.halt = &ws->report->halt;
    const unsigned blocks = (unsigned)((p->T + MOE_CUDA__ROUTE_WARPS - 1) /
                                       MOE_CUDA__ROUTE_WARPS);
    return MOE_CUDA_LAUNCH(moe_cuda__route_topk, dim3(blocks), dim3(32 * MOE_CUDA__ROUTE_WARPS),
                           0, stream, ra);
}

/* Queue the layer y[T][D] = sum over kept slots of weight * expert(x) (+ the
   shared expert) on `stream`. x, y, the weights, the workspace and info's
   arrays are device memory; info (host struct, may be NULL) names the arrays
   to fill: logits, scores, expert, weight, dropped, expert_routed,
   expert_kept (each may be NULL; no activation cache: the backward
   recomputes). Queuing clears info's training stamp; the result sets it
   when cfg.save_for_backward = 1.
   y may be x; no other written buffer may overlap another buffer
   (MOE_STATUS_ALIASING). OK means queued: moe_cuda_forward_result gives the
   outcome. The workspace must not be reused before that. */
static inline moe_status moe_cuda_forward(const moe_config *cfg, const moe_weights *w,
                                          const float *x, int32_t T, float *y, moe_info *info,
                                          void *workspace, size_t workspace_bytes,
                                          cudaStream_t stream = 0) {
    moe_cuda__plan p;
    moe_cuda__ws ws;
    moe_status st;
    if (!cfg || !w || !workspace) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_cuda__plan_of(cfg, T, &p)) != MOE_STATUS_OK) return st;
    const moe_config *c = &p.c;
    if (T > 0 && (!x || !y)) return MOE_STATUS_NULL_ARGUMENT;
    if (T > 0 && (st = moe_cuda__check_weights(&p, w)) != MOE_STATUS_OK) return st;
    const size_t need = moe_cuda__bind(&p, NULL, &ws);
    if (workspace_bytes < need) {
        if (info) info->workspace_required = need;
        return MOE_STATUS_WORKSPACE_TOO_SMALL;
    }
    {
        const size_t TE = (size_t)T * p.E * 4, TK = (size_t)p.pairs;
        moe_cuda__spans sp;
        sp.n = 0;
        if (T > 0) {
            moe_cuda__span(&sp, y, (size_t)T * p.D * 4, 1);
            if (x != y) moe_cuda__span(&sp, x, (size_t)T * p.D * 4, 0);
            moe_cuda__weight_spans(&sp, &p, w);
        }
        moe_cuda__span(&sp, workspace, workspace_bytes, 1);
        if (info) {
            moe_cuda__span(&sp, info->logits, TE, 1);
            moe_cuda__span(&sp, info->scores, TE, 1);
            moe_cuda__span(&sp, info->expert, TK * 4, 1);
            moe_cuda__span(&sp, info->weight, TK * 4, 1);
            moe_cuda__span(&sp, info->dropped, TK, 1);
            moe_cuda__span(&sp, info->expert_routed, (size_t)p.E * 4, 1);
            moe_cuda__span(&sp, info->expert_kept, (size_t)p.E * 4, 1);
        }
        if (moe_cuda__overlap(&sp)) return MOE_STATUS_ALIASING;
    }

    if (info) { info->cache_tokens = 0; info->cache_config = 0; info->cache_check = 0; }
    moe_cuda__bind(&p, moe_cuda__aligned(workspace), &ws);
    const int32_t *halt = &ws.report->halt;
    cudaError_t e = cudaMemsetAsync(ws.report, 0, sizeof *ws.report, stream);
#define MOE_CUDA__RUN(call) do { if (e == cudaSuccess) e = (call); } while (0)
    if (T > 0) {
        const unsigned blocks_t = (unsigned)T, rows = (unsigned)p.rows;
        const dim3 B(MOE_CUDA__BLOCK);
        MOE_CUDA__RUN(moe_cuda__route(&p, w, x, &ws, stream));
        if (p.C > 0) {
            MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__capacity, dim3((unsigned)p.E), B, 0, stream,
                                          (const int32_t *)ws.expert, T, p.K, p.C, ws.dropped,
                                          halt));
            MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__final_weights, dim3((T + 255) / 256), B, 0,
                                          stream, (const float *)ws.scores, p.E,
                                          (const int32_t *)ws.expert,
                                          (const uint8_t *)ws.dropped,
                                          (const float *)ws.weight0, T, p.K,
                                          c->normalize_after_drop, (int)c->normalize, c->norm_p,
                                          c->norm_eps, c->routed_scale, ws.weight, halt));
        }

        /* dispatch */
        MOE_CUDA__RUN(cudaMemsetAsync(ws.row_of_pair, 0xff, (size_t)p.pairs * 4, stream));
        MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__count_pairs, dim3((unsigned)p.E), B, 0, stream,
                                      (const int32_t *)ws.expert, (const uint8_t *)ws.dropped,
                                      p.pairs, ws.counts, halt));
        MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__scan_counts, dim3(1), dim3(32), 0, stream,
                                      (const int32_t *)ws.counts, p.E, ws.offsets, halt));
        MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__gather_rows<0>, dim3((unsigned)p.E), B, 0,
                                      stream, (const int32_t *)ws.expert,
                                      (const uint8_t *)ws.dropped, p.pairs, p.K,
                                      (const int32_t *)ws.offsets, x, p.D, p.d_pad, ws.A,
                                      ws.row_of_pair, ws.pair_of_row, halt));
        if (p.Fs > 0)
            MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__shared_rows, dim3(blocks_t), dim3(128), 0,
                                          stream, x, T, p.D, p.d_pad, ws.Xs, ws.shared_offsets,
                                          halt));

        /* the expert FFNs: routed, then shared */
        if (p.simt) {
            MOE_CUDA__RUN(moe_cuda__ffn_simt(moe_cuda__ffn32_of(&p, w, 0), x, ws.pair_of_row,
                                             p.K, ws.offsets, p.E, rows, ws.Hf, NULL, NULL, ws.O,
                                             halt, stream));
            if (p.Fs > 0)
                MOE_CUDA__RUN(moe_cuda__ffn_simt(moe_cuda__ffn32_of(&p, w, 1), x, NULL, 1,
                                                 ws.shared_offsets, 1, T, ws.Hsf, NULL, NULL,
                                                 ws.Os, halt, stream));
        } else {
            MOE_CUDA__RUN(moe_cuda__ffn_tensor(&p, moe_cuda__tensor_set(&p, w, &ws, 0), halt,
                                               stream));
            if (p.Fs > 0)
                MOE_CUDA__RUN(moe_cuda__ffn_tensor(&p, moe_cuda__tensor_set(&p, w, &ws, 1), halt,
                                                   stream));
        }

        /* combine, the routing into info, the aux losses */
        moe_cuda__combine_args ca;
        memset(&ca, 0, sizeof ca);
        ca.out = ws.O; ca.row_of_pair = ws.row_of_pair; ca.expert = ws.expert;
        ca.weight = ws.weight; ca.down_bias = c->expert_bias ? w->down_bias : NULL;
        if (p.Fs > 0) {
            ca.shared_out = ws.Os;
            ca.shared_down_bias = c->expert_bias ? w->shared_down_bias : NULL;
            ca.shared_expert_gate = c->shared_expert_gated ? w->shared_expert_gate : NULL;
        }
        ca.x = x; ca.y = y; ca.top_k = p.K; ca.d = p.D; ca.halt = halt;
        MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__combine, dim3(blocks_t),
                                      dim3(MOE_CUDA__COMBINE_THREADS), 0, stream, ca));
        if (info) {
            moe_cuda__publish_args pa;
            pa.logits = ws.logits; pa.scores = ws.scores; pa.weight = ws.weight;
            pa.expert = ws.expert; pa.dropped = ws.dropped;
            pa.info_logits = info->logits; pa.info_scores = info->scores;
            pa.info_weight = info->weight; pa.info_expert = info->expert;
            pa.info_dropped = info->dropped;
            pa.te = (int64_t)T * p.E; pa.tk = p.pairs; pa.halt = halt;
            MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__publish, dim3((T + 63) / 64), B, 0, stream,
                                          pa));
        }
    }
    moe_cuda__stats_args sa;
    memset(&sa, 0, sizeof sa);
    sa.scores = ws.scores; sa.weight0 = ws.weight0; sa.expert = ws.expert; sa.plain = ws.plain;
    sa.dropped = ws.dropped; sa.lse_sq = ws.lse_sq; sa.score_sum = ws.score_sum;
    sa.tokens = T; sa.capacity = p.C; sa.experts = p.E; sa.top_k = p.K;
    sa.sigmoid = c->score == MOE_SCORE_SIGMOID;
    sa.balance_loss = (int)c->balance_loss; sa.seq_len = p.seq_len;
    sa.chunks_per_seq = p.chunks_per_seq; sa.n_chunks = p.n_chunks; sa.n_seq = p.n_seq;
    sa.sum_d = ws.sum_d; sa.sum_i = ws.sum_i;
    sa.coef[0] = c->balance_coef; sa.coef[1] = c->z_loss_coef; sa.coef[2] = c->importance_coef;
    sa.coef[3] = c->load_coef; sa.coef[4] = c->seq_balance_coef;
    sa.expert_routed = info ? info->expert_routed : NULL;
    sa.expert_kept = info ? info->expert_kept : NULL;
    sa.report = ws.report;
    sa.stamp_config = c->save_for_backward ? moe_config_fingerprint(cfg) : 0;
    if (p.n_chunks > 0)
        MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__chunk_stats, dim3((unsigned)p.n_chunks),
                                      dim3(MOE_CUDA__BLOCK), 0, stream, sa));
    MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__finish_stats, dim3(1), dim3(MOE_CUDA__BLOCK), 0,
                                  stream, sa));
#undef MOE_CUDA__RUN
    if (e != cudaSuccess) { moe_cuda__error_slot() = e; return MOE_STATUS_CUDA_ERROR; }
    return MOE_STATUS_OK;
}

/* Wait for `stream` and read the outcome of the forward that last used this
   workspace: MOE_STATUS_OK, with info's scalars written (slots, capacity,
   drops, aux losses; a saving forward's stamp), or MOE_STATUS_NONFINITE
   (a NaN / Inf router logit or selection bias: y, the info arrays and info
   are as they were), or MOE_STATUS_CUDA_ERROR (the stream failed, or no
   forward finished on this workspace). info may be NULL. */
static inline moe_status moe_cuda_forward_result(const void *workspace, moe_info *info,
                                                 cudaStream_t stream = 0) {
    moe_cuda__report r;
    if (!workspace) return MOE_STATUS_NULL_ARGUMENT;
    cudaError_t e = cudaStreamSynchronize(stream);
    if (e == cudaSuccess)
        e = cudaMemcpy(&r, moe_cuda__aligned(workspace), sizeof r, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess && r.done != 1) e = cudaErrorInvalidValue;
    if (e != cudaSuccess) { moe_cuda__error_slot() = e; return MOE_STATUS_CUDA_ERROR; }
    if (r.halt) return MOE_STATUS_NONFINITE;
    if (info) {
        info->slots = r.slots; info->capacity = r.capacity;
        info->dropped_pairs = r.dropped_pairs; info->dropped_tokens = r.dropped_tokens;
        info->aux_balance = r.aux_balance; info->aux_z = r.aux_z;
        info->aux_importance = r.aux_importance; info->aux_load = r.aux_load;
        info->aux_seq = r.aux_seq; info->aux_total = r.aux_total;
        /* a saving forward stamps info for moe_cuda_backward (no checksum
           of the arrays: cache_check stays 0, which moe_backward refuses) */
        info->cache_tokens = r.stamp_config ? r.stamp_tokens : 0;
        info->cache_config = r.stamp_config;
        info->cache_check = 0;
    }
    return MOE_STATUS_OK;
}

/* Where a set's gradients go (moe_grads' fields for its tensors). */
static inline moe_cuda__ffn_grads moe_cuda__grads_of(const moe_cuda__plan *p,
                                                     const moe_grads *grads, int fused,
                                                     int shared) {
    const size_t D = (size_t)p->D, F = (size_t)(shared ? p->Fs : p->F);
    moe_cuda__ffn_grads g;
    memset(&g, 0, sizeof g);
    if (shared && p->Fs == 0) return g;
    g.gate = shared ? grads->shared_gate : grads->gate;
    g.down = shared ? grads->shared_down : grads->down;
    if (p->glu)
        g.up = shared ? grads->shared_up : fused ? (g.gate ? g.gate + F * D : NULL) : grads->up;
    if (p->c.expert_bias) {
        g.gate_bias = shared ? grads->shared_gate_bias : grads->gate_bias;
        g.down_bias = shared ? grads->shared_down_bias : grads->down_bias;
        if (p->glu) g.up_bias = shared ? grads->shared_up_bias : grads->up_bias;
    }
    g.gate_stride = g.up_stride = F * D * (fused ? 2 : 1);
    g.down_stride = D * F;
    return g;
}

/* 3.-4. of the backward on the tensor cores (bf16 operands, fp32 sums) for
   one expert set: Dy = bf16(w_p dy_t); dA = Dy W2_e through the activation
   into dH (bf16, W1's row order; fp32 dG, dU for the biases); dXr = dH W1_e;
   d down_e += Dy^T H and d W1_e += dH^T X over e's rows (DEPTH GEMMs); the
   bias gradients summed in fp32. */
static inline cudaError_t moe_cuda__experts_backward_tensor(
    const moe_cuda__plan *p, const moe_cuda__tensor_experts &s, const moe_cuda__ffn_grads &g,
    const float *dy, const float *weight, const int32_t *pair_of_row, int top_k, float *dG,
    float *dU, float *dXr, const int32_t *halt, cudaStream_t stream) {
    const int D = p->D, d_pad = p->d_pad, d_out_pad = p->d_out_pad;
    const size_t w1_stride = (size_t)s.n1_pad * d_pad, w2_stride = (size_t)d_out_pad * s.f_pad;
    const dim3 GT(MOE_CUDA__GEMM_THREADS);
    const size_t smem = MOE_CUDA__GEMM_SMEM;
    moe_cuda__epilogue da, o;
    cudaError_t e = MOE_CUDA_LAUNCH(moe_cuda__bw_scaled_rows, dim3((unsigned)s.max_rows),
                                    dim3(128), 0, stream, dy, weight, pair_of_row, top_k,
                                    s.offsets, s.experts, D, d_out_pad, s.dy);
    memset(&da, 0, sizeof da);
    da.h = s.dh; da.ldh = s.n1_pad; da.f = s.f; da.n = s.f_pad; da.act = (int)p->c.activation;
    da.g = s.g; da.u = s.u; da.dg = g.gate_bias ? dG : NULL; da.du = g.up_bias ? dU : NULL;
    if (e == cudaSuccess)   /* B = W2_e read down its columns: [c][f], k = c */
        e = moe_cuda__rows_gemm<MOE_CUDA__EPI_DACT, 1>(s, s.dy, d_out_pad, s.w2, s.f_pad,
                                                       w2_stride, s.f_pad, d_out_pad, da, halt,
                                                       stream);
    memset(&o, 0, sizeof o);
    o.c = dXr; o.ldc = D; o.n = D;
    if (e == cudaSuccess && dXr)   /* B = W1_e as [unit][c], k = unit */
        e = moe_cuda__rows_gemm<MOE_CUDA__EPI_STORE, 1>(s, s.dh, s.n1_pad, s.w1, d_pad,
                                                        w1_stride, d_pad, s.n1_pad, o, halt,
                                                        stream);
    moe_cuda__grad_out down, w1;
    memset(&down, 0, sizeof down);
    down.first = g.down; down.stride = g.down_stride; down.m_out = D; down.n_out = s.f;
    if (e == cudaSuccess && g.down)
        e = MOE_CUDA_LAUNCH(moe_cuda__grouped_gemm_depth<0>,
                            dim3((unsigned)(d_out_pad / MOE_CUDA__BM),
                                 (unsigned)((s.f_pad + MOE_CUDA__BN - 1) / MOE_CUDA__BN),
                                 (unsigned)s.experts),
                            GT, smem, stream, (const __nv_bfloat16 *)s.dy, d_out_pad, d_out_pad,
                            (const __nv_bfloat16 *)s.h, s.f_pad, s.f_pad, s.offsets, down);
    memset(&w1, 0, sizeof w1);
    w1.first = g.gate; w1.second = g.up; w1.stride = g.gate_stride; w1.m_out = s.f;
    w1.n_out = D; w1.units = 1; w1.glu = p->glu;
    if (e == cudaSuccess && (g.gate || g.up))
        e = MOE_CUDA_LAUNCH(moe_cuda__grouped_gemm_depth<0>,
                            dim3((unsigned)(s.n1_pad / MOE_CUDA__BM),
                                 (unsigned)((d_pad + MOE_CUDA__BN - 1) / MOE_CUDA__BN),
                                 (unsigned)s.experts),
                            GT, smem, stream, (const __nv_bfloat16 *)s.dh, s.n1_pad, s.n1_pad,
                            (const __nv_bfloat16 *)s.x, d_pad, d_pad, s.offsets, w1);
    const unsigned experts = (unsigned)s.experts;
    const dim3 by_f((unsigned)((s.f + 127) / 128), experts);
    const dim3 by_d((unsigned)((D + 127) / 128), experts);
    if (e == cudaSuccess && g.down_bias)
        e = MOE_CUDA_LAUNCH(moe_cuda__bw_bias, by_d, dim3(128), 0, stream, (const float *)NULL,
                            dy, weight, pair_of_row, top_k, s.offsets, D, g.down_bias);
    if (e == cudaSuccess && g.gate_bias)
        e = MOE_CUDA_LAUNCH(moe_cuda__bw_bias, by_f, dim3(128), 0, stream, (const float *)dG,
                            dy, weight, pair_of_row, top_k, s.offsets, s.f, g.gate_bias);
    if (e == cudaSuccess && g.up_bias)
        e = MOE_CUDA_LAUNCH(moe_cuda__bw_bias, by_f, dim3(128), 0, stream, (const float *)dU,
                            dy, weight, pair_of_row, top_k, s.offsets, s.f, g.up_bias);
    return e;
}

/* The backward's plan: the forward's (same path), with the backward's workspace. */
static inline moe_status moe_cuda__backward_plan(const moe_config *cfg, int32_t T,
                                                 moe_cuda__plan *p) {
    const moe_status st = moe_cuda__plan_of(cfg, T, p);
    if (st != MOE_STATUS_OK) return st;
    p->backward = 1;
    return MOE_STATUS_OK;
}

/* Bytes of device workspace for moe_cuda_backward on T tokens. */
static inline moe_status moe_cuda_backward_workspace_size(const moe_config *cfg, int32_t T,
                                                          size_t *out_bytes) {
    moe_cuda__plan p;
    moe_cuda__ws w;
    if (!out_bytes) return MOE_STATUS_NULL_ARGUMENT;
    const moe_status st = moe_cuda__backward_plan(cfg, T, &p);
    if (st == MOE_STATUS_OK) *out_bytes = moe_cuda__bind(&p, NULL, &w);
    return st;
}

/* Queue the gradient of L = <dy, y> + info.aux_total on `stream`, as
   moe_backward: dx [T][D] is OVERWRITTEN (may be NULL, x or dy), the
   gradients ACCUMULATE (each field may be NULL). info is the one a forward
   with cfg.save_for_backward = 1 (same config and T) filled through
   moe_cuda_forward and moe_cuda_forward_result: its device arrays logits,
   scores, expert, weight and dropped, and its stamp (none:
   MOE_STATUS_MISSING_CACHE; another T or config: MOE_STATUS_BAD_CACHE; the
   arrays' contents are not checksummed on the GPU). The experts run where
   the forward's do: on the tensor cores from w.packed (as packed for that
   forward), or with cfg.isa = MOE_ISA_REFERENCE on fp32 kernels from the
   fp32 weights. Every config the forward runs; no allocation, no wait. */
static inline moe_status moe_cuda_backward(const moe_config *cfg, const moe_weights *w,
                                           const float *x, int32_t T, const moe_info *info,
                                           const float *dy, float *dx, const moe_grads *grads,
                                           void *workspace, size_t workspace_bytes,
                                           cudaStream_t stream = 0) {
    moe_cuda__plan p;
    moe_cuda__ws ws;
    moe_status st;
    if (!cfg || !w || !info || !grads) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_cuda__backward_plan(cfg, T, &p)) != MOE_STATUS_OK) return st;
    const moe_config *c = &p.c;
    if (T == 0) return MOE_STATUS_OK;
    if (!x || !dy || !workspace) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_cuda__check_weights(&p, w)) != MOE_STATUS_OK) return st;
    if (!info->logits || !info->scores || !info->expert || !info->weight || !info->dropped ||
        info->cache_config == 0)
        return MOE_STATUS_MISSING_CACHE;
    if (info->cache_tokens != T || info->cache_config != moe_config_fingerprint(cfg))
        return MOE_STATUS_BAD_CACHE;
    const size_t need = moe_cuda__bind(&p, NULL, &ws);
    if (workspace_bytes < need) return MOE_STATUS_WORKSPACE_TOO_SMALL;
    const int fused = w->gate_up_fused && p.glu;
    const size_t E = (size_t)p.E, D = (size_t)p.D, F = (size_t)p.F, TK = (size_t)p.pairs;
    const size_t Fs = (size_t)p.Fs;
    const moe_cuda__ffn_grads g = moe_cuda__grads_of(&p, grads, fused, 0);
    const moe_cuda__ffn_grads sg = moe_cuda__grads_of(&p, grads, 0, 1);
    float *g_router = grads->router, *g_rbias = c->router_bias ? grads->router_bias : NULL;
    float *g_seg = Fs && c->shared_expert_gated ? grads->shared_expert_gate : NULL;
    {   /* dx may be x or dy (written last); no other written buffer may overlap */
        const size_t TD = (size_t)T * D * 4, TE = (size_t)T * E * 4;
        moe_cuda__spans sp;
        sp.n = 0;
        moe_cuda__span(&sp, x, TD, 0);
        moe_cuda__span(&sp, dy, TD, 0);
        if (dx && dx != x && dx != dy) moe_cuda__span(&sp, dx, TD, 1);
        moe_cuda__weight_spans(&sp, &p, w);
        moe_cuda__span(&sp, info->logits, TE, 0);
        moe_cuda__span(&sp, info->scores, TE, 0);
        moe_cuda__span(&sp, info->expert, TK * 4, 0);
        moe_cuda__span(&sp, info->weight, TK * 4, 0);
        moe_cuda__span(&sp, info->dropped, TK, 0);
        moe_cuda__span(&sp, g_router, E * D * 4, 1);
        moe_cuda__span(&sp, g_rbias, E * 4, 1);
        moe_cuda__span(&sp, g.gate, E * F * D * 4 * (fused ? 2 : 1), 1);
        if (!fused) moe_cuda__span(&sp, g.up, E * F * D * 4, 1);
        moe_cuda__span(&sp, g.down, E * D * F * 4, 1);
        moe_cuda__span(&sp, g.gate_bias, E * F * 4, 1);
        moe_cuda__span(&sp, g.up_bias, E * F * 4, 1);
        moe_cuda__span(&sp, g.down_bias, E * D * 4, 1);
        moe_cuda__span(&sp, sg.gate, Fs * D * 4, 1);
        moe_cuda__span(&sp, sg.up, Fs * D * 4, 1);
        moe_cuda__span(&sp, sg.down, D * Fs * 4, 1);
        moe_cuda__span(&sp, sg.gate_bias, Fs * 4, 1);
        moe_cuda__span(&sp, sg.up_bias, Fs * 4, 1);
        moe_cuda__span(&sp, sg.down_bias, Fs ? D * 4 : 0, 1);
        moe_cuda__span(&sp, g_seg, D * 4, 1);
        moe_cuda__span(&sp, workspace, workspace_bytes, 1);
        if (moe_cuda__overlap(&sp)) return MOE_STATUS_ALIASING;
    }

    moe_cuda__bind(&p, moe_cuda__aligned(workspace), &ws);
    const int32_t *halt = &ws.report->halt;   /* never raised: the dispatch kernels read it */
    const unsigned B = MOE_CUDA__BLOCK;
    cudaError_t e = cudaMemsetAsync(ws.report, 0, sizeof *ws.report, stream);
#define MOE_CUDA__RUN(call) do { if (e == cudaSuccess) e = (call); } while (0)
    /* 1. dispatch again (and the shared expert's rows: every token) */
    __nv_bfloat16 *A = p.simt ? NULL : ws.A, *Xs = p.simt ? NULL : ws.Xs;
    const int d_pad = p.simt ? 0 : p.d_pad;
    MOE_CUDA__RUN(cudaMemsetAsync(ws.row_of_pair, 0xff, TK * 4, stream));
    MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__count_pairs, dim3((unsigned)p.E), dim3(B), 0, stream,
                                  (const int32_t *)info->expert, (const uint8_t *)info->dropped,
                                  p.pairs, ws.counts, halt));
    MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__scan_counts, dim3(1), dim3(32), 0, stream,
                                  (const int32_t *)ws.counts, p.E, ws.offsets, halt));
    MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__gather_rows<0>, dim3((unsigned)p.E), dim3(B), 0,
                                  stream, (const int32_t *)info->expert,
                                  (const uint8_t *)info->dropped, p.pairs, p.K,
                                  (const int32_t *)ws.offsets, x, p.D, d_pad, A, ws.row_of_pair,
                                  ws.pair_of_row, halt));
    if (Fs)
        MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__shared_rows, dim3((unsigned)T), dim3(128), 0,
                                      stream, x, T, p.D, d_pad, Xs, ws.shared_offsets, halt));
    for (int shared = 0; shared <= (Fs > 0); shared++) {
        /* the set's rows: routed row r is pair pair_of_row[r], weighted by
           info->weight; the shared expert's row t is token t, weighted by gamma_t */
        const moe_cuda__ffn32 f32 = moe_cuda__ffn32_of(&p, w, shared);
        const moe_cuda__ffn_grads &gs = shared ? sg : g;
        const int32_t *offsets = shared ? ws.shared_offsets : ws.offsets;
        const int32_t *pair_of_row = shared ? NULL : ws.pair_of_row;
        const int n_exp = shared ? 1 : p.E, top_k = shared ? 1 : p.K, rows = shared ? T : p.rows;
        const float *weight = shared ? ws.gamma : info->weight;
        float *G = shared ? ws.Gs : ws.G, *U = shared ? ws.Us : ws.U;
        float *dG = shared ? ws.dGs : ws.dG, *dU = shared ? ws.dUs : ws.dU;
        float *O = shared ? ws.Os : ws.O, *dXr = dx ? (shared ? ws.dXs : ws.dXr) : NULL;
        const moe_cuda__tensor_experts ts = moe_cuda__tensor_set(&p, w, &ws, shared);
        /* 1. the FFN again, keeping the pre-activations */
        if (p.simt)
            MOE_CUDA__RUN(moe_cuda__ffn_simt(f32, x, pair_of_row, top_k, offsets, n_exp, rows,
                                             shared ? ws.Hsf : ws.Hf, G, U, O, halt, stream));
        else
            MOE_CUDA__RUN(moe_cuda__ffn_tensor(&p, ts, halt, stream));
        /* 2. dL / d weight: of each kept pair, or of the shared expert's gate */
        if (!shared)
            MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__bw_gate_grad,
                                          dim3((unsigned)((TK + B - 1) / B)), dim3(B), 0, stream,
                                          dy, (const float *)O, (const int32_t *)ws.row_of_pair,
                                          (const int32_t *)info->expert,
                                          (const float *)(c->expert_bias ? w->down_bias : NULL),
                                          p.pairs, p.K, p.D, ws.gw));
        else
            MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__bw_shared_expert_gate,
                                          dim3((unsigned)((T + 127) / 128)), dim3(128), 0,
                                          stream, x, dy, (const float *)O,
                                          (const float *)(c->expert_bias ? w->shared_down_bias
                                                                         : NULL),
                                          (const float *)(c->shared_expert_gated
                                                              ? w->shared_expert_gate : NULL),
                                          T, p.D, ws.gamma, ws.dzg));
        /* 3.-4. through the FFN to its weights and its rows' dx */
        if (p.simt) {
            const dim3 wgrid((unsigned)((D * f32.f + B - 1) / B), (unsigned)n_exp);
            MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__bw_hidden, dim3((unsigned)rows), dim3(128), 0,
                                          stream, f32, dy, weight, pair_of_row, top_k, offsets,
                                          n_exp, (const float *)G, (const float *)U, dG, dU));
            if (dXr)
                MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__bw_row_dx, dim3((unsigned)rows),
                                              dim3(128), 0, stream, f32, offsets, n_exp,
                                              (const float *)dG, (const float *)dU, dXr));
            MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__bw_down_grad, wgrid, dim3(B), 0, stream, f32,
                                          gs, dy, weight, pair_of_row, top_k, offsets,
                                          (const float *)G, (const float *)U));
            MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__bw_w1_grad, wgrid, dim3(B), 0, stream, f32,
                                          gs, x, pair_of_row, top_k, offsets, (const float *)dG,
                                          (const float *)dU));
        } else {
            MOE_CUDA__RUN(moe_cuda__experts_backward_tensor(&p, ts, gs, dy, weight, pair_of_row,
                                                            top_k, dG, dU, dXr, halt, stream));
        }
        if (shared && g_seg)   /* d shared_expert_gate[k] = sum_t dzg_t x[t][k]: a one-row router */
            MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__bw_router_grad,
                                          dim3((unsigned)((D + B - 1) / B)), dim3(B), 0, stream,
                                          (const float *)ws.dzg, x, T, 1, p.D, g_seg,
                                          (float *)NULL));
    }
    /* 5. the router */
    moe_cuda__router_bw_args ra;
    memset(&ra, 0, sizeof ra);
    ra.logits = info->logits; ra.scores = info->scores; ra.gw = ws.gw;
    ra.expert = info->expert; ra.dropped = info->dropped;
    ra.tokens = T; ra.experts = p.E; ra.top_k = p.K;
    ra.sigmoid = c->score == MOE_SCORE_SIGMOID; ra.balance_loss = (int)c->balance_loss;
    ra.normalize = (int)c->normalize; ra.after_drop = c->normalize_after_drop;
    ra.norm_p = c->norm_p; ra.norm_eps = c->norm_eps; ra.routed_scale = c->routed_scale;
    ra.balance_coef = c->balance_coef; ra.z_coef = c->z_loss_coef;
    ra.clip = c->router_grad_clip;
    ra.importance_coef = c->importance_coef; ra.seq_coef = c->seq_balance_coef;
    ra.seq_len = p.seq_len;
    ra.fbal = ws.fbal; ra.fseq = ws.fseq; ra.dimp = ws.dimp; ra.ds = ws.ds; ra.dz = ws.dz;
    MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__bw_balance, dim3(1), dim3(B), 0, stream, ra));
    if (c->importance_coef != 0.0f)
        MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__bw_importance, dim3(1), dim3(B), 0, stream, ra));
    if (c->seq_balance_coef != 0.0f)
        MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__bw_sequence, dim3((unsigned)p.n_seq), dim3(B), 0,
                                      stream, ra));
    MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__bw_router, dim3((unsigned)((T + 127) / 128)),
                                  dim3(128), 0, stream, ra));
    /* 6. router weights, then dx */
    MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__bw_router_grad, dim3((unsigned)((E * D + B - 1) / B)),
                                  dim3(B), 0, stream, (const float *)ws.dz, x, T, p.E, p.D,
                                  g_router, g_rbias));
    if (dx)
        MOE_CUDA__RUN(MOE_CUDA_LAUNCH(moe_cuda__bw_token_dx, dim3((unsigned)T), dim3(128), 0,
                                      stream, (const float *)ws.dXr,
                                      (const int32_t *)ws.row_of_pair, p.K,
                                      (const float *)ws.dzg,
                                      (const float *)(Fs && c->shared_expert_gated
                                                          ? w->shared_expert_gate : NULL),
                                      (const float *)ws.dXs, (const float *)ws.dz, w->router,
                                      p.E, p.D, dx));
#undef MOE_CUDA__RUN
    if (e != cudaSuccess) { moe_cuda__error_slot() = e; return MOE_STATUS_CUDA_ERROR; }
    return MOE_STATUS_OK;
}

#endif /* MOE_CUDA_CUH */
