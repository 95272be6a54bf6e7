/* test_emu.cu - the emulator's own suite (make test-cuda-emu).
   Each small kernel runs under four schedules against a host answer, and
   each has planted-bug variants (template argument BUG) that must fail in at
   least one schedule, so the emulator cannot pass everything silently.
   The mma and ldmatrix checks pack and unpack fragments from CuTe's SM80
   layouts (a second statement of the PTX tables the emulator implements).
   The device operations are moe_cuda.cuh's one-instruction wrappers. The
   same file builds with nvcc (make cuda) and then runs on a GPU when one is
   present; the schedules and planted bugs are emulator-only. */
#include "../../moe.h"
#include "../../moe_cuda.cuh"
#include "emu_test.h"

/* ---- kernels --------------------------------------------------------------- */

/* Tree sum of each block's slice of x. BUG 1: no barrier between levels. */
template <int BUG> __global__ void block_sum(const float *x, int n, float *out) {
    float *part = (float *)moe_cuda__smem();
    const int t = (int)threadIdx.x, i = (int)(blockIdx.x * blockDim.x) + t;
    part[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (int s = (int)blockDim.x / 2; s > 0; s /= 2) {
        if (t < s) part[t] += part[t + s];
        if (BUG != 1) __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = part[0];
}

/* Per-warp sums (a tree of down shuffles, then lane 0's total to every lane)
   over the lanes the block has. BUG 1: a full mask on the last, partial warp. */
template <int BUG> __global__ void warp_sum(const int *x, int *out) {
    const int t = (int)threadIdx.x, lane = t & 31, first = t - lane;
    const int lanes = (int)blockDim.x - first < 32 ? (int)blockDim.x - first : 32;
    const unsigned mask = BUG == 1 || lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
    int v = x[t];
    for (int o = 16; o > 0; o /= 2) {
        const int w = __shfl_down_sync(mask, v, o);
        if (lane + o < lanes) v += w;
    }
    out[t] = __shfl_sync(mask, v, 0);
}

/* Each thread reads its right neighbour's value through shared memory.
   BUG 1: threads past n return before the barrier. BUG 2: two barriers on
   different paths. */
template <int BUG> __global__ void neighbour(const float *x, int n, float *out) {
    float *s = (float *)moe_cuda__smem();
    const int t = (int)threadIdx.x;
    if (BUG == 1 && t >= n) return;
    s[t] = t < n ? x[t] : 0.0f;
    if (BUG == 2 && t == 0) __syncthreads();
    else __syncthreads();
    if (t < n) out[t] = s[(t + 1) % n];
}

/* One m16n8k16: the fragments come packed per lane (10 registers), the
   result goes out per lane (4 floats). BUG 1: A registers 1 and 2 swapped. */
template <int BUG> __global__ void mma_once(const uint32_t *frag, float *d) {
    const int lane = (int)threadIdx.x;
    uint32_t a[4], b[2];
    float c[4], r[4];
    for (int i = 0; i < 4; i++) a[i] = frag[lane * 10 + i];
    if (BUG == 1) { const uint32_t tmp = a[1]; a[1] = a[2]; a[2] = tmp; }
    b[0] = frag[lane * 10 + 4]; b[1] = frag[lane * 10 + 5];
    for (int i = 0; i < 4; i++) c[i] = __uint_as_float(frag[lane * 10 + 6 + i]);
    moe_cuda__mma(r, a, b, c);
    for (int i = 0; i < 4; i++) d[lane * 4 + i] = r[i];
}

/* A (16x16 bf16, m by k) and B (16x16, k by n) through shared memory into
   mma fragments with ldmatrix, addressed as moe_cuda__gemm_tiles does: A
   from an m-major copy (ldmatrix) and from a k-major one (.trans), B's two
   8-column fragments from k-major rows (.trans). Out per lane: 4 + 4 + 4. */
__global__ void ldmatrix_frags(const uint16_t *a, const uint16_t *b, uint32_t *regs) {
    uint16_t *sa = (uint16_t *)moe_cuda__smem(), *sat = sa + 256, *sb = sat + 256;
    const int lane = (int)threadIdx.x;
    for (int i = lane; i < 256; i += 32) {
        sa[i] = a[i];
        sat[(i % 16) * 16 + i / 16] = a[i];
        sb[i] = b[i];
    }
    __syncthreads();
    uint32_t r[12];
    /* matrix j = lane / 8, its row lane % 8: A m +8 in j = 1, 3 and k +8 in
       j = 2, 3; B k +8 in j = 1, 3 and n +8 in j = 2, 3 */
    const int j = lane >> 3, r8 = lane & 7;
    moe_cuda__ldmatrix_x4(r, sa + (r8 + 8 * (j & 1)) * 16 + 8 * (j >> 1));
    moe_cuda__ldmatrix_x4_trans(r + 4, sat + (8 * (j >> 1) + r8) * 16 + 8 * (j & 1));
    moe_cuda__ldmatrix_x4_trans(r + 8, sb + (8 * (j & 1) + r8) * 16 + 8 * (j >> 1));
    for (int i = 0; i < 12; i++) regs[lane * 12 + i] = r[i];
}

/* A two-stage cp.async pipeline: 64 threads stream chunks of 256 floats
   through shared memory; each thread sums values another thread copied.
   BUG 1: no wait for the chunk. BUG 2: no barrier before a stage is refilled. */
enum { PIPE_THREADS = 64, PIPE_CHUNK = 256 };
template <int BUG> __global__ void pipeline_sum(const float *x, int chunks, float *out) {
    float *buf = (float *)moe_cuda__smem();
    const int t = (int)threadIdx.x;
    const float *xb = x + (size_t)blockIdx.x * chunks * PIPE_CHUNK;
    float acc = 0.0f;
    moe_cuda__cp_async16(buf + 4 * t, xb + 4 * t, 16);
    moe_cuda__cp_async_commit();
    for (int c = 0; c < chunks; c++) {
        const int cur = c & 1;
        if (c + 1 < chunks)
            moe_cuda__cp_async16(buf + (cur ^ 1) * PIPE_CHUNK + 4 * t, xb + (c + 1) * PIPE_CHUNK + 4 * t, 16);
        moe_cuda__cp_async_commit();
        if (BUG != 1) moe_cuda__cp_async_wait<1>();   /* chunk c has landed */
        __syncthreads();
        for (int i = 0; i < 4; i++)
            acc += buf[cur * PIPE_CHUNK + ((4 * t + PIPE_CHUNK / 2 + i) % PIPE_CHUNK)] * (float)(c + 1);
        if (BUG != 2) __syncthreads();          /* every thread is done with `cur` */
    }
    out[blockIdx.x * PIPE_THREADS + t] = acc;
}

/* Warp votes and reductions, and an integer atomic count over the block. */
__global__ void votes(const int *x, unsigned *ballots, int *sums, int *maxes, int *count) {
    const int t = (int)threadIdx.x, v = x[t];
    ballots[t] = __ballot_sync(0xffffffffu, v & 1);
    sums[t] = (int)__reduce_add_sync(0xffffffffu, (unsigned)v);
    maxes[t] = __reduce_max_sync(0xffffffffu, v);
    if (v & 1) atomicAdd(count, 1);
}

__global__ void copy_floats(const float *x, float *y, int n) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i < n) y[i] = x[i];
}
__global__ void read_smem(float *y) { y[threadIdx.x] = ((float *)moe_cuda__smem())[threadIdx.x]; }
__global__ void barrier_vs_warp(int *y) {
    if (threadIdx.x == 0) __syncthreads();
    else __syncwarp(0xffffffffu);
    y[threadIdx.x] = 1;
}

/* ---- host side -------------------------------------------------------------- */

static void test_block_sum(void) {
    enum { N = 1000, B = 256, G = (N + B - 1) / B };
    float hx[N], hout[G], want[G] = {0};
    for (int i = 0; i < N; i++) { hx[i] = (float)(i % 17); want[i / B] += hx[i]; }
    float *x = (float *)dalloc(sizeof hx), *out = (float *)dalloc(sizeof hout);
    up(x, hx, sizeof hx);
    int caught = 0;
    for (int s = 0; s < NSCHED; s++) {
        use_schedule(s);
        CHECK(MOE_CUDA_LAUNCH(block_sum<0>, dim3(G), dim3(B), B * sizeof(float), 0, x, N, out) == cudaSuccess);
        down(hout, out, sizeof hout);
        for (int g = 0; g < G; g++) CHECK(hout[g] == want[g]);
        if (!PLANTED) continue;
        const cudaError_t e = MOE_CUDA_LAUNCH(block_sum<1>, dim3(G), dim3(B), B * sizeof(float), 0, x, N, out);
        down(hout, out, sizeof hout);
        int wrong = e != cudaSuccess;
        for (int g = 0; g < G; g++) wrong |= hout[g] != want[g];
        caught += wrong;
    }
    expect_caught("no barrier between reduction levels", caught);
    cudaFree(x); cudaFree(out);
}

static void test_warp_sum(void) {
    enum { B = 52 };   /* one full warp, one of 20 lanes */
    int hx[B], hout[B];
    for (int i = 0; i < B; i++) hx[i] = i * 3 + 1;
    int *x = (int *)dalloc(sizeof hx), *out = (int *)dalloc(sizeof hout);
    up(x, hx, sizeof hx);
    int caught = 0;
    for (int s = 0; s < NSCHED; s++) {
        use_schedule(s);
        CHECK(MOE_CUDA_LAUNCH(warp_sum<0>, dim3(1), dim3(B), 0, 0, x, out) == cudaSuccess);
        down(hout, out, sizeof hout);
        for (int i = 0; i < B; i++) {
            int want = 0;
            for (int j = i & ~31; j < B && j < (i & ~31) + 32; j++) want += hx[j];
            CHECK(hout[i] == want);
        }
        if (!PLANTED) continue;
        const cudaError_t e = MOE_CUDA_LAUNCH(warp_sum<1>, dim3(1), dim3(B), 0, 0, x, out);
        caught += e != cudaSuccess;
        if (e != cudaSuccess && s == 0) printf("    planted, reported: %s\n", launch_error().c_str());
    }
    expect_caught("full mask on a partial warp", caught);
    cudaFree(x); cudaFree(out);
}

static void test_barriers(void) {
    enum { B = 64, N = 50 };
    float hx[N], hout[N];
    for (int i = 0; i < N; i++) hx[i] = (float)i;
    float *x = (float *)dalloc(sizeof hx), *out = (float *)dalloc(sizeof hout);
    int *flags = (int *)dalloc(32 * sizeof(int));
    up(x, hx, sizeof hx);
    int caught_exit = 0, caught_divergent = 0, caught_deadlock = 0;
    for (int s = 0; s < NSCHED; s++) {
        use_schedule(s);
        CHECK(MOE_CUDA_LAUNCH(neighbour<0>, dim3(1), dim3(B), B * sizeof(float), 0, x, N, out) == cudaSuccess);
        down(hout, out, sizeof hout);
        for (int i = 0; i < N; i++) CHECK(hout[i] == hx[(i + 1) % N]);
        if (!PLANTED) continue;
        caught_exit += MOE_CUDA_LAUNCH(neighbour<1>, dim3(1), dim3(B), B * sizeof(float), 0, x, N, out) != cudaSuccess;
        if (s == 0) printf("    planted, reported: %s\n", launch_error().c_str());
        caught_divergent += MOE_CUDA_LAUNCH(neighbour<2>, dim3(1), dim3(B), B * sizeof(float), 0, x, N, out) != cudaSuccess;
        if (s == 0) printf("    planted, reported: %s\n", launch_error().c_str());
        caught_deadlock += MOE_CUDA_LAUNCH(barrier_vs_warp, dim3(1), dim3(32), 0, 0, flags) != cudaSuccess &&
                           launch_error().find("deadlock") != std::string::npos;
        if (s == 0) printf("    planted, reported: %s\n", launch_error().c_str());
    }
    expect_caught("return before a barrier", caught_exit);
    expect_caught("barriers on different paths", caught_divergent);
    expect_caught("a barrier against a warp sync", caught_deadlock);
    cudaFree(x); cudaFree(out); cudaFree(flags);
}

/* CuTe's SM80 16x8x16 F32 BF16 layouts, (thread, value) -> column-major index:
   A ((4,8),(2,2,2)):((32,1),(16,8,128)) over 16x16 (m, k);
   B ((4,8),(2,2)):((16,1),(8,64)) over 8x16 (n, k);
   C ((4,8),(2,2)):((32,1),(16,8)) over 16x8 (m, n). Thread = t0 + 4 t1. */
static int cute_a(int thr, int v) {
    return 32 * (thr % 4) + (thr / 4) + 16 * (v % 2) + 8 * (v / 2 % 2) + 128 * (v / 4);
}
static int cute_b(int thr, int v) { return 16 * (thr % 4) + (thr / 4) + 8 * (v % 2) + 64 * (v / 2); }
static int cute_c(int thr, int v) { return 32 * (thr % 4) + (thr / 4) + 16 * (v % 2) + 8 * (v / 2); }

static void test_mma(void) {
    float A[16][16], B[16][8], C[16][8];
    uint16_t Ab[16][16], Bb[16][8];
    uint32_t frag[32 * 10];
    uint32_t s = 99;
    for (int m = 0; m < 16; m++)
        for (int k = 0; k < 16; k++) {
            Ab[m][k] = bf16_bits((float)((int)(lcg(&s) % 17) - 8) * 0.37f);
            A[m][k] = bf16_value(Ab[m][k]);
        }
    for (int k = 0; k < 16; k++)
        for (int n = 0; n < 8; n++) {
            Bb[k][n] = bf16_bits((float)((int)(lcg(&s) % 13) - 6) * 0.21f);
            B[k][n] = bf16_value(Bb[k][n]);
        }
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 8; n++) C[m][n] = (float)((int)(lcg(&s) % 7) - 3);
    memset(frag, 0, sizeof frag);
    for (int thr = 0; thr < 32; thr++) {
        for (int v = 0; v < 8; v++) {   /* value v sits in register v / 2, half v % 2 */
            const int i = cute_a(thr, v);
            frag[thr * 10 + v / 2] |= (uint32_t)Ab[i % 16][i / 16] << (16 * (v % 2));
        }
        for (int v = 0; v < 4; v++) {
            const int i = cute_b(thr, v);
            frag[thr * 10 + 4 + v / 2] |= (uint32_t)Bb[i / 8][i % 8] << (16 * (v % 2));
        }
        for (int v = 0; v < 4; v++) {
            const int i = cute_c(thr, v);
            float c = C[i % 16][i / 16];
            memcpy(&frag[thr * 10 + 6 + v], &c, 4);
        }
    }
    uint32_t *df = (uint32_t *)dalloc(sizeof frag);
    float *dd = (float *)dalloc(32 * 4 * sizeof(float));
    float hd[32 * 4];
    up(df, frag, sizeof frag);
    int caught = 0;
    for (int sc = 0; sc < NSCHED; sc++) {
        use_schedule(sc);
        for (int bug = 0; bug < 1 + PLANTED; bug++) {
            const cudaError_t e = bug ? MOE_CUDA_LAUNCH(mma_once<1>, dim3(1), dim3(32), 0, 0, df, dd)
                                      : MOE_CUDA_LAUNCH(mma_once<0>, dim3(1), dim3(32), 0, 0, df, dd);
            down(hd, dd, sizeof hd);
            int wrong = e != cudaSuccess;
            for (int thr = 0; thr < 32; thr++)
                for (int v = 0; v < 4; v++) {
                    const int i = cute_c(thr, v), m = i % 16, n = i / 16;
                    double want = C[m][n];
                    for (int k = 0; k < 16; k++) want += (double)A[m][k] * B[k][n];
                    /* exact here: bf16 products of these values fit a float */
                    if (fabs(hd[thr * 4 + v] - want) > 1e-4 * (1.0 + fabs(want))) wrong = 1;
                }
            if (bug) caught += wrong;
            else CHECK(!wrong);
        }
    }
    expect_caught("A fragment registers swapped", caught);
    cudaFree(df); cudaFree(dd);
}

static void test_ldmatrix(void) {
    uint16_t a[256], b[256];
    uint32_t regs[32 * 12];
    for (int i = 0; i < 256; i++) a[i] = (uint16_t)(i * 7 + 1);
    for (int i = 0; i < 256; i++) b[i] = (uint16_t)(i * 5 + 3);
    uint16_t *da = (uint16_t *)dalloc(sizeof a), *db = (uint16_t *)dalloc(sizeof b);
    uint32_t *dr = (uint32_t *)dalloc(sizeof regs);
    up(da, a, sizeof a);
    up(db, b, sizeof b);
    for (int sc = 0; sc < NSCHED; sc++) {
        use_schedule(sc);
        CHECK(MOE_CUDA_LAUNCH(ldmatrix_frags, dim3(1), dim3(32), 768 * sizeof(uint16_t), 0, da,
                              db, dr) == cudaSuccess);
        down(regs, dr, sizeof regs);
        int ok = 1;
        const auto half = [&](int thr, int reg, int v) {
            return (uint16_t)(regs[thr * 12 + reg + v / 2] >> (16 * (v % 2)));
        };
        for (int thr = 0; thr < 32; thr++) {
            for (int v = 0; v < 8; v++) {   /* A fragment, both copies: a[m][k] */
                const int i = cute_a(thr, v);
                ok &= half(thr, 0, v) == a[(i % 16) * 16 + i / 16];
                ok &= half(thr, 4, v) == a[(i % 16) * 16 + i / 16];
            }
            for (int v = 0; v < 4; v++) {   /* B fragments, columns 0-7 and 8-15: b[k][n] */
                const int i = cute_b(thr, v), n = i % 8, k = i / 8;
                ok &= half(thr, 8, v) == b[k * 16 + n];
                ok &= half(thr, 10, v) == b[k * 16 + 8 + n];
            }
        }
        CHECK(ok);
    }
    cudaFree(da); cudaFree(db); cudaFree(dr);
}

static void test_pipeline(void) {
    enum { CHUNKS = 5, BLOCKS = 3, N = BLOCKS * CHUNKS * PIPE_CHUNK };
    static float hx[N], hout[BLOCKS * PIPE_THREADS], want[BLOCKS * PIPE_THREADS];
    for (int i = 0; i < N; i++) hx[i] = (float)(i % 23);
    for (int b = 0; b < BLOCKS; b++)
        for (int t = 0; t < PIPE_THREADS; t++) {
            float acc = 0.0f;
            for (int c = 0; c < CHUNKS; c++)
                for (int i = 0; i < 4; i++)
                    acc += hx[(b * CHUNKS + c) * PIPE_CHUNK + (4 * t + PIPE_CHUNK / 2 + i) % PIPE_CHUNK] *
                           (float)(c + 1);
            want[b * PIPE_THREADS + t] = acc;
        }
    float *x = (float *)dalloc(sizeof hx), *out = (float *)dalloc(sizeof hout);
    up(x, hx, sizeof hx);
    const size_t smem = 2 * PIPE_CHUNK * sizeof(float);
    int caught[3] = {0, 0, 0};
    for (int sc = 0; sc < NSCHED; sc++) {
        use_schedule(sc);
        for (int bug = 0; bug < 1 + 2 * PLANTED; bug++) {
            cudaError_t e;
            if (bug == 0) e = MOE_CUDA_LAUNCH(pipeline_sum<0>, dim3(BLOCKS), dim3(PIPE_THREADS), smem, 0, x, CHUNKS, out);
            else if (bug == 1) e = MOE_CUDA_LAUNCH(pipeline_sum<1>, dim3(BLOCKS), dim3(PIPE_THREADS), smem, 0, x, CHUNKS, out);
            else e = MOE_CUDA_LAUNCH(pipeline_sum<2>, dim3(BLOCKS), dim3(PIPE_THREADS), smem, 0, x, CHUNKS, out);
            down(hout, out, sizeof hout);
            int wrong = e != cudaSuccess;
            for (int i = 0; i < BLOCKS * PIPE_THREADS; i++) wrong |= hout[i] != want[i];
            if (bug) caught[bug] += wrong;
            else CHECK(!wrong);
        }
    }
    expect_caught("no cp.async wait", caught[1]);
    expect_caught("stage refilled without a barrier", caught[2]);
    cudaFree(x); cudaFree(out);
}

static void test_votes(void) {
    enum { B = 64 };
    int hx[B], hs[B], hm[B], hc = 0;
    unsigned hb[B];
    for (int i = 0; i < B; i++) hx[i] = (i * 37 + 11) % 53 - 20;
    int *x = (int *)dalloc(sizeof hx), *s = (int *)dalloc(sizeof hs), *m = (int *)dalloc(sizeof hm);
    int *c = (int *)dalloc(sizeof(int));
    unsigned *b = (unsigned *)dalloc(sizeof hb);
    up(x, hx, sizeof hx);
    for (int sc = 0; sc < NSCHED; sc++) {
        use_schedule(sc);
        cudaMemset(c, 0, sizeof(int));
        CHECK(MOE_CUDA_LAUNCH(votes, dim3(1), dim3(B), 0, 0, x, b, s, m, c) == cudaSuccess);
        down(hb, b, sizeof hb); down(hs, s, sizeof hs); down(hm, m, sizeof hm); down(&hc, c, sizeof hc);
        int odd = 0;
        for (int w = 0; w < B / 32; w++) {
            unsigned want_b = 0;
            int want_s = 0, want_m = hx[32 * w];
            for (int l = 0; l < 32; l++) {
                const int v = hx[32 * w + l];
                if (v & 1) { want_b |= 1u << l; odd++; }
                want_s += v;
                if (v > want_m) want_m = v;
            }
            for (int l = 0; l < 32; l++) {
                CHECK(hb[32 * w + l] == want_b);
                CHECK(hs[32 * w + l] == want_s);
                CHECK(hm[32 * w + l] == want_m);
            }
        }
        CHECK(hc == odd);
    }
    cudaFree(x); cudaFree(s); cudaFree(m); cudaFree(c); cudaFree(b);
}

/* Launch limits and poisoned memory (emulator only: a GPU's are its own). */
static void test_limits_and_poison(void) {
#ifdef CUDA_EMU
    float *x = (float *)dalloc(64 * sizeof(float)), *y = (float *)dalloc(64 * sizeof(float));
    float hy[64];
    use_schedule(0);
    CHECK(MOE_CUDA_LAUNCH(copy_floats, dim3(1), dim3(1025), 0, 0, x, y, 64) == cudaErrorInvalidConfiguration);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
    CHECK(cudaGetLastError() == cudaSuccess);
    CHECK(MOE_CUDA_LAUNCH(read_smem, dim3(1), dim3(64), 49152 + 4, 0, y) == cudaErrorInvalidValue);
    cudaGetLastError();
    CHECK(cudaFuncSetAttribute(read_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 100000) == cudaSuccess);
    CHECK(cudaFuncSetAttribute(read_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 300000) == cudaErrorInvalidValue);
    CHECK(MOE_CUDA_LAUNCH(read_smem, dim3(1), dim3(64), 49152 + 4, 0, y) == cudaSuccess);
    down(hy, y, sizeof hy);
    CHECK(hy[0] != hy[0] && hy[63] != hy[63]);   /* shared memory never written: NaN */
    CHECK(MOE_CUDA_LAUNCH(copy_floats, dim3(1), dim3(64), 0, 0, x, y, 64) == cudaSuccess);
    down(hy, y, sizeof hy);
    CHECK(hy[0] != hy[0] && hy[63] != hy[63]);   /* device memory never written: NaN */
    cudaFree(x); cudaFree(y);
#endif
}

int main(void) {
    static const emu_test tests[] = {
        {"block_sum", test_block_sum}, {"warp_sum", test_warp_sum}, {"barriers", test_barriers},
        {"votes", test_votes}, {"mma", test_mma}, {"ldmatrix", test_ldmatrix},
        {"pipeline", test_pipeline}, {"limits_and_poison", test_limits_and_poison},
    };
    return run_tests("emu", tests, (int)(sizeof tests / sizeof tests[0]));
}
