/* test_moe_cuda.cu - moe_cuda.cuh's kernels against plain loops on the host
   (make test-cuda-emu; with nvcc, make cuda). Ragged shapes: experts with 0
   and 1 rows, row counts off the 64-row tile, N and K off the tiles (padded
   as the packing pads them). The planted bugs are template variants of the
   library's kernels that must fail in at least one schedule. */
#include "../../moe_cuda.cuh"
#include "emu_test.h"
#include <vector>

/* One grouped GEMM case: `counts` rows per expert, C = A W_e^T, k columns,
   n outputs. Returns 1 when every C element is within fp32 accumulation
   error of the double-precision product of the bf16 inputs (and, for a
   correct kernel, the columns past n and the ldc padding stay untouched). */
template <int BUG>
static int gemm_case(const std::vector<int> &counts, int n, int k, uint32_t seed) {
    const int E = (int)counts.size();
    const int n_pad = (n + MOE_CUDA__BN - 1) / MOE_CUDA__BN * MOE_CUDA__BN;
    const int k_pad = (k + MOE_CUDA__BK - 1) / MOE_CUDA__BK * MOE_CUDA__BK;
    const int ldc = n + 3;   /* C's row stride need not be n */
    std::vector<int32_t> offsets(E + 1, 0);
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
    const int rows = offsets[E];
    std::vector<uint16_t> a((size_t)(rows > 0 ? rows : 1) * k_pad, 0);
    std::vector<uint16_t> w((size_t)E * n_pad * k_pad, 0);
    std::vector<float> c((size_t)(rows > 0 ? rows : 1) * ldc, -7.0f);
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < k; i++)
            a[(size_t)r * k_pad + i] = bf16_bits(((float)(lcg(&seed) % 2001) - 1000.0f) / 1000.0f);
    for (int e = 0; e < E; e++)
        for (int o = 0; o < n; o++)
            for (int i = 0; i < k; i++)
                w[((size_t)e * n_pad + o) * k_pad + i] =
                    bf16_bits(((float)(lcg(&seed) % 2001) - 1000.0f) / 4000.0f);

    __nv_bfloat16 *da = (__nv_bfloat16 *)dalloc(a.size() * 2);
    __nv_bfloat16 *dw = (__nv_bfloat16 *)dalloc(w.size() * 2);
    int32_t *doff = (int32_t *)dalloc(offsets.size() * 4);
    float *dc = (float *)dalloc(c.size() * 4);
    up(da, a.data(), a.size() * 2);
    up(dw, w.data(), w.size() * 2);
    up(doff, offsets.data(), offsets.size() * 4);
    up(dc, c.data(), c.size() * 4);
    /* the worst-case grid for twice the rows: surplus tiles must exit */
    const dim3 grid = moe_cuda__gemm_grid(2 * rows + 1, E, n_pad);
    const size_t smem = MOE_CUDA__STAGES * MOE_CUDA__STAGE_BYTES;
    const cudaError_t st = MOE_CUDA_LAUNCH(moe_cuda__grouped_gemm<BUG>, grid,
                                           dim3(MOE_CUDA__GEMM_THREADS), smem, 0, da, dw, doff,
                                           E, n, n_pad, k_pad, dc, ldc);
    down(c.data(), dc, c.size() * 4);
    cudaFree(da); cudaFree(dw); cudaFree(doff); cudaFree(dc);
    if (st != cudaSuccess) {
        if (!BUG) printf("  launch: %s\n", launch_error().c_str());
        return 0;
    }
    int ok = 1;
    for (int e = 0; e < E; e++)
        for (int r = offsets[e]; r < offsets[e + 1]; r++)
            for (int col = 0; col < ldc; col++) {
                const float got = c[(size_t)r * ldc + col];
                if (col >= n) { ok &= got == -7.0f; continue; }
                double want = 0.0, mag = 0.0;
                for (int i = 0; i < k; i++) {
                    const double p = (double)bf16_value(a[(size_t)r * k_pad + i]) *
                                     bf16_value(w[((size_t)e * n_pad + col) * k_pad + i]);
                    want += p;
                    mag += fabs(p);
                }
                /* fp32 accumulation over k / 16 mma steps: ~k 2^-24 sum |p| */
                if (!(fabs(got - want) <= 1e-6 * k * mag + 1e-30)) {
                    if (!BUG && ok)
                        printf("  C[%d][%d] = %.9g, want %.9g (expert %d)\n", r, col, got, want, e);
                    ok = 0;
                }
            }
    return ok;
}

static void test_grouped_gemm(void) {
    /* experts with 0, 1, a tile and one, two tiles less one rows; E = 1 */
    const std::vector<int> ragged = {0, 1, 65, 0, 127, 3};
    const std::vector<int> one = {7};
    int caught[4] = {0, 0, 0, 0};
    for (int s = 0; s < NSCHED; s++) {
        use_schedule(s);
        CHECK(gemm_case<0>(ragged, 72, 160, 1u));   /* N off the tile, five K tiles */
        CHECK(gemm_case<0>(ragged, 64, 40, 2u));    /* K off the tile (zero-padded) */
        CHECK(gemm_case<0>(one, 5, 16, 3u));        /* a tiny expert, one K tile */
        CHECK(gemm_case<0>(std::vector<int>{0, 0}, 8, 32, 4u));   /* no rows at all */
        caught[1] += !gemm_case<1>(ragged, 72, 160, 1u);
        caught[2] += !gemm_case<2>(ragged, 72, 160, 1u);
        caught[3] += !gemm_case<3>(ragged, 72, 160, 1u);
    }
    expect_caught("one cp.async group too few waited for", caught[1]);
    expect_caught("stage refilled before the barrier", caught[2]);   /* needs > STAGES tiles */
    expect_caught("B fragment registers swapped", caught[3]);
}

/* Dispatch of T tokens x K slots over E experts: counts, offsets and row maps
   against a host counting sort, the gathered rows against bf16(x). Slots go
   to expert -1 (none) or are dropped now and then; some experts get none. */
template <int BUG>
static int dispatch_case(int T, int K, int E, int d, uint32_t seed) {
    const int pairs = T * K, d_pad = (d + MOE_CUDA__BK - 1) / MOE_CUDA__BK * MOE_CUDA__BK;
    std::vector<int32_t> expert((size_t)(pairs > 0 ? pairs : 1), -1);
    std::vector<uint8_t> dropped((size_t)(pairs > 0 ? pairs : 1), 0);
    std::vector<float> x((size_t)(T > 0 ? T : 1) * d);
    for (int t = 0; t < T; t++)
        for (int j = 0; j < K; j++) {
            const uint32_t r = lcg(&seed) % 16;
            /* distinct experts per token, skewed to the low ones, E - 1 unused */
            int e = (int)((lcg(&seed) % 7) * (lcg(&seed) % 7) % (uint32_t)(E > 1 ? E - 1 : 1));
            for (int q = 0; q < j; q++)
                if (expert[(size_t)t * K + q] == e) { e = -1; break; }
            expert[(size_t)t * K + j] = r == 0 ? -1 : e;
            dropped[(size_t)t * K + j] = r == 1 ? 1 : r == 2 ? 2 : 0;
        }
    for (size_t i = 0; i < x.size(); i++) x[i] = ((float)(lcg(&seed) % 2001) - 1000.0f) / 7.0f;

    /* the host's counting sort: pair order within an expert */
    std::vector<int32_t> counts(E, 0), offsets(E + 1, 0), row_of_pair(expert.size(), -1);
    for (int p = 0; p < pairs; p++)
        if (expert[p] >= 0 && !dropped[p]) counts[expert[p]]++;
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
    const int rows = offsets[E];
    std::vector<int32_t> next(offsets.begin(), offsets.end() - 1), pair_of_row(rows > 0 ? rows : 1);
    for (int p = 0; p < pairs; p++)
        if (expert[p] >= 0 && !dropped[p]) {
            row_of_pair[p] = next[expert[p]]++;
            pair_of_row[row_of_pair[p]] = p;
        }

    int32_t *dexp = (int32_t *)dalloc(expert.size() * 4), *dcnt = (int32_t *)dalloc(E * 4);
    int32_t *doff = (int32_t *)dalloc((E + 1) * 4), *d_rop = (int32_t *)dalloc(expert.size() * 4);
    /* a planted bug may write rows past the end: room for it, so that ASan
       builds see the wrong answer instead of stopping (the real kernel gets
       buffers of exactly their size) */
    const size_t slack = BUG ? MOE_CUDA__DISPATCH_THREADS : 0;
    int32_t *dpor = (int32_t *)dalloc((pair_of_row.size() + slack) * 4);
    uint8_t *ddrop = (uint8_t *)dalloc(dropped.size());
    float *dx = (float *)dalloc(x.size() * 4);
    const size_t a_elems = (size_t)(rows > 0 ? rows : 1) * d_pad;
    __nv_bfloat16 *da = (__nv_bfloat16 *)dalloc((a_elems + slack * d_pad) * 2);
    up(dexp, expert.data(), expert.size() * 4);
    up(ddrop, dropped.data(), dropped.size());
    up(dx, x.data(), x.size() * 4);
    cudaMemset(d_rop, 0xff, expert.size() * 4);
    int ok = MOE_CUDA_LAUNCH(moe_cuda__count_pairs, dim3(E), dim3(MOE_CUDA__DISPATCH_THREADS), 0,
                             0, dexp, ddrop, pairs, dcnt) == cudaSuccess;
    ok = ok && MOE_CUDA_LAUNCH(moe_cuda__scan_counts, dim3(1), dim3(32), 0, 0, dcnt, E,
                               doff) == cudaSuccess;
    ok = ok && MOE_CUDA_LAUNCH(moe_cuda__gather_rows<BUG>, dim3(E),
                               dim3(MOE_CUDA__DISPATCH_THREADS), 0, 0, dexp, ddrop, pairs, K,
                               doff, dx, d, d_pad, da, d_rop, dpor) == cudaSuccess;
    std::vector<int32_t> g_counts(E), g_offsets(E + 1), g_rop(expert.size()),
        g_por(pair_of_row.size());
    std::vector<uint16_t> g_a(a_elems);
    down(g_counts.data(), dcnt, E * 4);
    down(g_offsets.data(), doff, (E + 1) * 4);
    down(g_rop.data(), d_rop, expert.size() * 4);
    down(g_por.data(), dpor, pair_of_row.size() * 4);
    down(g_a.data(), da, a_elems * 2);
    cudaFree(dexp); cudaFree(dcnt); cudaFree(doff); cudaFree(d_rop); cudaFree(dpor);
    cudaFree(ddrop); cudaFree(dx); cudaFree(da);
    if (!ok) {
        if (!BUG) printf("  launch: %s\n", launch_error().c_str());
        return 0;
    }
    ok = g_counts == counts && g_offsets == offsets;
    for (int p = 0; p < pairs; p++) ok &= g_rop[p] == row_of_pair[p];
    for (int r = 0; r < rows; r++) {
        ok &= g_por[r] == pair_of_row[r];
        const int t = pair_of_row[r] / K;
        for (int c = 0; c < d_pad; c++)
            ok &= g_a[(size_t)r * d_pad + c] == (c < d ? bf16_bits(x[(size_t)t * d + c]) : 0);
    }
    return ok;
}

static void test_dispatch(void) {
    int caught[3] = {0, 0, 0};
    for (int s = 0; s < NSCHED; s++) {
        use_schedule(s);
        CHECK(dispatch_case<0>(300, 2, 8, 70, 1u));   /* chunks of 256 pairs: three */
        CHECK(dispatch_case<0>(7, 6, 6, 24, 2u));     /* K = E */
        CHECK(dispatch_case<0>(1, 1, 1, 5, 3u));      /* one token, one expert */
        CHECK(dispatch_case<0>(0, 2, 4, 16, 4u));     /* no tokens */
        caught[1] += !dispatch_case<1>(300, 2, 8, 70, 1u);
        caught[2] += !dispatch_case<2>(300, 2, 8, 70, 1u);
    }
    expect_caught("rows copied before the chunk's list is complete", caught[1]);
    expect_caught("a lane counted in its own prefix", caught[2]);
}

int main(void) {
    static const emu_test tests[] = {{"grouped_gemm", test_grouped_gemm},
                                     {"dispatch", test_dispatch}};
    return run_tests("moe_cuda", tests, (int)(sizeof tests / sizeof tests[0]));
}
