/* moe_cuda.cuh - moe.h's MoE layer on NVIDIA GPUs (in progress, issue 16)
   no warranty implied; use at your own risk. License: MIT, as moe.h.

   STATUS
     Not usable yet: there is no public API. What is here is verified on the
     CPU emulator (tests/cuda_emu) and built by nvcc for sm_80 and sm_90a
     without spills; nothing is measured on a GPU yet.
     In pipeline order:
       - the device operations that are one PTX instruction (mma.sync
         m16n8k16 bf16, ldmatrix, cp.async), each behind one function;
       - token-choice routing (softmax / sigmoid, biases, group limit,
         normalisation, scaling), one warp per token, E <= 256, K <= 32;
       - dispatch: per-expert counts, their scan, row positions in moe.h's
         order and the gathered bf16 rows;
       - weight packing; moe_cuda__grouped_gemm, the expert GEMM C = A W^T
         over expert-contiguous rows, bf16 in, fp32 accumulate;
       - the FFN nonlinearity with biases, the combine.
     Next: aux losses and capacity, fused epilogues, the shared expert, the
     backward, and the public moe_cuda_forward / moe_cuda_backward.

   BUILD
     In a .cu file, after moe.h:   #include "moe_cuda.cuh"     (nvcc, sm_80+)
     On the CPU emulator:          g++ -x c++ -DCUDA_EMU -Itests/cuda_emu ...
*/
#ifndef MOE_CUDA_CUH
#define MOE_CUDA_CUH

#include <math.h>
#include <stdint.h>
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

/* ldmatrix.sync.aligned.m8n8.x4.shared.b16 (and .x2.trans): `row` is this
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
__device__ __forceinline__ void moe_cuda__ldmatrix_x2_trans(uint32_t r[2], const void *row) {
#ifdef CUDA_EMU
    cuda_emu::ldmatrix(__FILE__, __LINE__, r, 2, true, row);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
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
// slot e / 32 (E <= 256). A non-finite logit sets *nonfinite (moe.h returns
// MOE_STATUS_NONFINITE there) and the token's routing is not used.

enum { MOE_CUDA__MAX_EXPERTS = 256, MOE_CUDA__SLOTS = MOE_CUDA__MAX_EXPERTS / 32,
       MOE_CUDA__ROUTE_WARPS = 4 };

typedef struct moe_cuda__route_args {
    const float *x, *router, *router_bias, *selection_bias;   /* biases may be NULL */
    int tokens, d, experts, top_k, sigmoid;
    int n_group, topk_group, group_score_top, group_mask_zero;
    int normalize;   /* moe_norm */
    float norm_p, norm_eps, routed_scale;
    float *logits, *scores, *weight;   /* [T][E], [T][E], [T][K] */
    int32_t *expert;                   /* [T][K] */
    uint8_t *dropped;                  /* [T][K], all 0 (no capacity yet) */
    int *nonfinite;
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
__device__ __forceinline__ float moe_cuda__warp_sum(float v) {
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
            zmax = fmaxf(zmax, acc);
        }
    }
    if (__ballot_sync(0xffffffffu, !finite)) {
        if (lane == 0) *a.nonfinite = 1;
        return;   /* the whole warp */
    }
    for (int o = 16; o > 0; o /= 2) zmax = fmaxf(zmax, __shfl_xor_sync(0xffffffffu, zmax, o));

    /* scores */
    float part = 0.0f;
MOE_CUDA_UNROLL
    for (int s = 0; s < MOE_CUDA__SLOTS; s++) {
        const int e = lane + 32 * s;
        sc[s] = 0.0f;
        if (e < E) {
            sc[s] = a.sigmoid ? moe_cuda__sigmoid(z[s]) : expf(z[s] - zmax);
            part += sc[s];
        }
    }
    const float sum = a.sigmoid ? 1.0f : moe_cuda__warp_sum(part);
MOE_CUDA_UNROLL
    for (int s = 0; s < MOE_CUDA__SLOTS; s++) {
        const int e = lane + 32 * s;
        if (e < E) {
            if (!a.sigmoid) sc[s] /= sum;
            a.scores[(size_t)t * E + e] = sc[s];
            key[s] = sc[s] + (a.selection_bias ? a.selection_bias[e] : 0.0f);
        }
    }

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
// Dispatch: the kept (token, slot) pairs in expert-contiguous order, token
// order within an expert (moe.h's counting sort), and the gathered bf16 rows.
// One block per expert scans every pair in order, so each position is a
// plain count (no atomics, the same on every run):
//   1. moe_cuda__count_pairs   counts[e] = kept pairs of expert e
//   2. moe_cuda__scan_counts   offsets[0..E] = exclusive prefix sums (one block)
//   3. moe_cuda__gather_rows   row_of_pair[p], pair_of_row[row], and
//                              A[row][0..d_pad) = bf16(x[t]) then zeros
// A pair is kept when expert[p] >= 0 and dropped[p] == 0; row_of_pair of any
// other pair must be set to -1 beforehand (cudaMemsetAsync 0xff).

enum { MOE_CUDA__DISPATCH_THREADS = 256 };

__global__ void __launch_bounds__(MOE_CUDA__DISPATCH_THREADS)
moe_cuda__count_pairs(const int32_t *expert, const uint8_t *dropped, int pairs, int32_t *counts) {
    __shared__ int32_t warp_sum[MOE_CUDA__DISPATCH_THREADS / 32];
    const int e = (int)blockIdx.x, t = (int)threadIdx.x;
    int n = 0;
    for (int p = t; p < pairs; p += MOE_CUDA__DISPATCH_THREADS) n += expert[p] == e && !dropped[p];
    for (int o = 16; o > 0; o /= 2) n += __shfl_xor_sync(0xffffffffu, n, o);
    if ((t & 31) == 0) warp_sum[t >> 5] = n;
    __syncthreads();
    if (t == 0) {
        int total = 0;
        for (int w = 0; w < MOE_CUDA__DISPATCH_THREADS / 32; w++) total += warp_sum[w];
        counts[e] = total;
    }
}

__global__ void moe_cuda__scan_counts(const int32_t *counts, int experts, int32_t *offsets) {
    if (threadIdx.x == 0) {   /* E <= a few hundred: one thread, in order */
        int32_t run = 0;
        for (int e = 0; e < experts; e++) { offsets[e] = run; run += counts[e]; }
        offsets[experts] = run;
    }
}

/* BUG (tests only, 0 in the library): 1 copies rows without the barrier after
   the chunk's list is written, 2 counts the lane itself in its prefix. */
template <int BUG>
__global__ void __launch_bounds__(MOE_CUDA__DISPATCH_THREADS)
moe_cuda__gather_rows(const int32_t *expert, const uint8_t *dropped, int pairs, int top_k,
                      const int32_t *offsets, const float *x, int d, int d_pad,
                      __nv_bfloat16 *A, int32_t *row_of_pair, int32_t *pair_of_row) {
    enum { W = MOE_CUDA__DISPATCH_THREADS / 32 };
    __shared__ int32_t warp_count[W];
    __shared__ int32_t chunk_token[MOE_CUDA__DISPATCH_THREADS];
    __shared__ int32_t chunk_row[MOE_CUDA__DISPATCH_THREADS];
    const int e = (int)blockIdx.x, t = (int)threadIdx.x, lane = t & 31, warp = t >> 5;
    int base = offsets[e];   /* the next free row of expert e */
    for (int p0 = 0; p0 < pairs; p0 += MOE_CUDA__DISPATCH_THREADS) {
        const int p = p0 + t;
        const int mine = p < pairs && expert[p] == e && !dropped[p];
        const unsigned votes = __ballot_sync(0xffffffffu, mine);
        const unsigned below = BUG == 2 ? (2u << lane) - 1u : (1u << lane) - 1u;
        if (lane == 0) warp_count[warp] = __popc(votes);
        __syncthreads();
        int before = 0, total = 0;   /* kept pairs of this chunk before my warp, in all */
        for (int w = 0; w < W; w++) {
            before += w < warp ? warp_count[w] : 0;
            total += warp_count[w];
        }
        if (mine) {
            const int k = before + __popc(votes & below);   /* my place in the chunk */
            const int row = base + k;
            row_of_pair[p] = row;
            pair_of_row[row] = p;
            chunk_token[k] = p / top_k;
            chunk_row[k] = row;
        }
        if (BUG != 1) __syncthreads();   /* the chunk's list is complete */
        for (int i = 0; i < total; i++) {   /* the block copies each row together */
            const float *xs = x + (size_t)chunk_token[i] * d;
            __nv_bfloat16 *dst = A + (size_t)chunk_row[i] * d_pad;
            for (int c = t; c < d_pad; c += MOE_CUDA__DISPATCH_THREADS)
                dst[c] = __float2bfloat16_rn(c < d ? xs[c] : 0.0f);
        }
        base += total;
        __syncthreads();   /* warp_count and the list are reused */
    }
}

// ----------------------------------------------------------------------------
// Expert weights as the GEMMs read them: bf16, zero-padded to whole tiles.
//   W1 [E][n1_pad][d_pad]: rows [0, F) gate, [F, 2F) up (GLU only), from
//      nn.Linear gate [E][F][D] and up [E][F][D] (or HF's fused gate_up
//      [E][2F][D]: the same rows in the same order)
//   W2 [E][d_out_pad][f_pad]: down [E][D][F]
// One thread per output element: the source is a plain index computation.

/* up == NULL with glu: gate is HF's fused [E][2F][D] */
__global__ void moe_cuda__pack_w1(const float *gate, const float *up, int experts, int f, int d,
                                  int glu, int n1_pad, int d_pad, __nv_bfloat16 *W1) {
    const size_t total = (size_t)experts * n1_pad * d_pad;
    const int gate_rows = glu && !up ? 2 * f : f;   /* rows per expert in gate */
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int k = (int)(i % d_pad), n = (int)(i / d_pad % n1_pad);
        const int e = (int)(i / d_pad / n1_pad);
        float v = 0.0f;
        if (k < d && n < gate_rows) v = gate[((size_t)e * gate_rows + n) * d + k];
        else if (k < d && glu && n < 2 * f) v = up[((size_t)e * f + n - f) * d + k];
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
// Grouped expert GEMM: for each expert e, the rows [offsets[e], offsets[e+1])
// of A times W_e^T:  C[r][n] = sum_k A[r][k] W[e][n][k]   (nn.Linear [out][in]).
// bf16 operands, fp32 accumulation in the tensor cores.
//
//   A  [rows][k_pad] bf16, expert-contiguous rows, zero past k
//   W  [E][n_pad][k_pad] bf16, zero past n and k (k_pad, n_pad: multiples of
//      MOE_CUDA__BK and MOE_CUDA__BN; the packing pads)
//   C  [rows][ldc] fp32, columns n < N written
//
// Block tile BM x BN = 64 x 64, BK = 32, four warps of 32 x 32; a STAGES-deep
// cp.async pipeline. The grid is the worst case for `max_rows` (the host
// knows T * K, not the counts): grid.y = ceil(max_rows / BM) + E row tiles,
// and each block finds its (expert, row tile) from the offsets; blocks past
// the last tile exit at once. Rows past an expert's end load as zeros and
// are not stored. Each output is one fixed sequence of mma over k: the
// result does not depend on the grid or the schedule (deterministic).

enum {
    MOE_CUDA__BM = 64, MOE_CUDA__BN = 64, MOE_CUDA__BK = 32, MOE_CUDA__STAGES = 3,
    MOE_CUDA__GEMM_THREADS = 128,
    MOE_CUDA__STAGE_BYTES = (MOE_CUDA__BM + MOE_CUDA__BN) * MOE_CUDA__BK * 2
};

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

/* Stage s: A rows [row0, row0 + BM) and W_e rows [n0, n0 + BN), columns
   [k0, k0 + BK), as 16-byte chunks (4 per 32-column row; 2 + 2 per thread). */
__device__ __forceinline__ void moe_cuda__load_stage(unsigned char *stage,
                                                     const __nv_bfloat16 *A,
                                                     const __nv_bfloat16 *We, int k_pad,
                                                     int row0, int row_end, int n0, int k0) {
    const int t = (int)threadIdx.x;
    __nv_bfloat16 *sa = (__nv_bfloat16 *)stage, *sb = sa + MOE_CUDA__BM * MOE_CUDA__BK;
    for (int c = t; c < MOE_CUDA__BM * 4; c += MOE_CUDA__GEMM_THREADS) {
        const int r = c >> 2, col = (c & 3) * 8;
        const int live = row0 + r < row_end;   /* past the expert's rows: zeros */
        const __nv_bfloat16 *src = A + (size_t)(live ? row0 + r : row0) * k_pad + k0 + col;
        moe_cuda__cp_async16(sa + r * MOE_CUDA__BK + col, src, live ? 16 : 0);
    }
    for (int c = t; c < MOE_CUDA__BN * 4; c += MOE_CUDA__GEMM_THREADS) {
        const int r = c >> 2, col = (c & 3) * 8;
        moe_cuda__cp_async16(sb + r * MOE_CUDA__BK + col,
                             We + (size_t)(n0 + r) * k_pad + k0 + col, 16);
    }
}

/* BUG (tests only, 0 in the library): 1 waits for one group too few, 2
   refills a stage before the barrier, 3 swaps the B fragment registers. */
template <int BUG>
__global__ void __launch_bounds__(MOE_CUDA__GEMM_THREADS)
moe_cuda__grouped_gemm(const __nv_bfloat16 *A, const __nv_bfloat16 *W, const int32_t *offsets,
                       int experts, int n, int n_pad, int k_pad, float *C, int ldc) {
    int row0 = 0, row_end = 0;
    const int e = moe_cuda__find_tile(offsets, experts, (int)blockIdx.y, &row0, &row_end);
    if (e < 0) return;   /* a surplus tile of the worst-case grid: the whole block */
    const int n0 = (int)blockIdx.x * MOE_CUDA__BN;
    const __nv_bfloat16 *We = W + (size_t)e * n_pad * k_pad;
    unsigned char *smem = moe_cuda__smem();
    const int lane = (int)threadIdx.x & 31, warp = (int)threadIdx.x >> 5;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;   /* the warp's 32 x 32 */
    const int k_tiles = k_pad / MOE_CUDA__BK;
    float acc[2][4][4];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++)
            for (int r = 0; r < 4; r++) acc[i][j][r] = 0.0f;

    for (int s = 0; s < MOE_CUDA__STAGES - 1; s++) {   /* the pipeline's first stages */
        if (s < k_tiles)
            moe_cuda__load_stage(smem + s * MOE_CUDA__STAGE_BYTES, A, We, k_pad, row0, row_end,
                                 n0, s * MOE_CUDA__BK);
        moe_cuda__cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; kt++) {
        const int next = kt + MOE_CUDA__STAGES - 1;
        if (BUG == 2 && next < k_tiles)   /* planted: refills the stage others still read */
            moe_cuda__load_stage(smem + (next % MOE_CUDA__STAGES) * MOE_CUDA__STAGE_BYTES, A, We,
                                 k_pad, row0, row_end, n0, next * MOE_CUDA__BK);
        if (BUG == 1) moe_cuda__cp_async_wait<MOE_CUDA__STAGES - 1>();
        else moe_cuda__cp_async_wait<MOE_CUDA__STAGES - 2>();   /* tile kt has landed */
        __syncthreads();   /* ... for every thread, and tile kt - 1 is done with */
        if (BUG != 2 && next < k_tiles)
            moe_cuda__load_stage(smem + (next % MOE_CUDA__STAGES) * MOE_CUDA__STAGE_BYTES, A, We,
                                 k_pad, row0, row_end, n0, next * MOE_CUDA__BK);
        moe_cuda__cp_async_commit();   /* empty groups keep the count in step */

        const __nv_bfloat16 *sa =
            (const __nv_bfloat16 *)(smem + (kt % MOE_CUDA__STAGES) * MOE_CUDA__STAGE_BYTES);
        const __nv_bfloat16 *sb = sa + MOE_CUDA__BM * MOE_CUDA__BK;
        for (int kk = 0; kk < MOE_CUDA__BK; kk += 16) {
            uint32_t fa[2][4], fb[4][2];
            const int j = lane >> 3, r8 = lane & 7;   /* lane's matrix and row in it */
            for (int mi = 0; mi < 2; mi++)   /* A: rows +8 in matrices 1, 3; k +8 in 2, 3 */
                moe_cuda__ldmatrix_x4(fa[mi], sa + (wm + mi * 16 + r8 + 8 * (j & 1)) *
                                                  MOE_CUDA__BK + kk + 8 * (j >> 1));
            for (int ni = 0; ni < 4; ni += 2) {   /* W rows are B's columns: no .trans */
                uint32_t q[4];
                moe_cuda__ldmatrix_x4(q, sb + (wn + ni * 8 + 8 * (j >> 1) + r8) * MOE_CUDA__BK +
                                             kk + 8 * (j & 1));
                fb[ni][0] = q[0]; fb[ni][1] = q[1];
                fb[ni + 1][0] = q[2]; fb[ni + 1][1] = q[3];
                if (BUG == 3) { fb[ni][0] = q[1]; fb[ni][1] = q[0]; }
            }
            for (int mi = 0; mi < 2; mi++)
                for (int ni = 0; ni < 4; ni++)
                    moe_cuda__mma(acc[mi][ni], fa[mi], fb[ni], acc[mi][ni]);
        }
    }
    moe_cuda__cp_async_wait<0>();

    /* C fragment: register r holds row g + 8 (r >> 1), column 2t + (r & 1) */
    const int g = lane >> 2, t4 = lane & 3;
    for (int mi = 0; mi < 2; mi++)
        for (int ni = 0; ni < 4; ni++)
            for (int r = 0; r < 4; r++) {
                const int row = row0 + wm + mi * 16 + g + 8 * (r >> 1);
                const int col = n0 + wn + ni * 8 + 2 * t4 + (r & 1);
                if (row < row_end && col < n) C[(size_t)row * ldc + col] = acc[mi][ni][r];
            }
}

/* Launch geometry for max_rows rows at most (T * K for top-k routing). */
static inline dim3 moe_cuda__gemm_grid(int max_rows, int experts, int n_pad) {
    return dim3((unsigned)(n_pad / MOE_CUDA__BN),
                (unsigned)((max_rows + MOE_CUDA__BM - 1) / MOE_CUDA__BM + experts));
}

// ----------------------------------------------------------------------------
// The FFN's nonlinearity, as moe.h's moe__act: SiLU,
// GELU (erf, tanh), ReLU (NaN kept, as torch.relu). Host too: the tests model it.

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

/* The expert of row r: offsets[e] <= r < offsets[e + 1] (E is small). */
__device__ __forceinline__ int moe_cuda__expert_of_row(const int32_t *offsets, int experts, int r) {
    int e = 0;
    while (e + 1 < experts && offsets[e + 1] <= r) e++;
    return e;
}

/* H[r][0..f_pad) = act(G + gate_bias) (* (U + up_bias) for a GLU) in bf16,
   zeros past f. G, U: columns [0, f) and [f, 2f) of the first GEMM's C1. */
__global__ void moe_cuda__activate(const float *C1, int ldc1, const int32_t *offsets, int experts,
                                   int f, int f_pad, int act, int glu, const float *gate_bias,
                                   const float *up_bias, __nv_bfloat16 *H) {
    const int r = (int)blockIdx.x;
    if (r >= offsets[experts]) return;   /* rows of the worst-case grid past the last */
    const int e = moe_cuda__expert_of_row(offsets, experts, r);
    for (int c = (int)threadIdx.x; c < f_pad; c += (int)blockDim.x) {
        float h = 0.0f;
        if (c < f) {
            float g = C1[(size_t)r * ldc1 + c];
            if (gate_bias) g += gate_bias[(size_t)e * f + c];
            h = moe_cuda__act(act, g);
            if (glu) {
                float u = C1[(size_t)r * ldc1 + f + c];
                if (up_bias) u += up_bias[(size_t)e * f + c];
                h *= u;
            }
        }
        H[(size_t)r * f_pad + c] = __float2bfloat16_rn(h);
    }
}

/* y[t] = sum over t's kept slots j, in slot order, of weight[t][j] *
   (out[row] + down_bias[e]); 0 for a token with none. One block per token. */
__global__ void moe_cuda__combine(const float *out, int ldo, const int32_t *row_of_pair,
                                  const int32_t *expert, const float *weight, int top_k, int d,
                                  const float *down_bias, float *y) {
    const int t = (int)blockIdx.x;
    for (int c = (int)threadIdx.x; c < d; c += (int)blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < top_k; j++) {
            const int p = t * top_k + j, row = row_of_pair[p];
            if (row < 0) continue;
            float v = out[(size_t)row * ldo + c];
            if (down_bias) v += down_bias[(size_t)expert[p] * d + c];
            acc += weight[p] * v;
        }
        y[(size_t)t * d + c] = acc;
    }
}

#endif /* MOE_CUDA_CUH */
