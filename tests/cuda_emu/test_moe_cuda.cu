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

int main(void) {
    static const emu_test tests[] = {{"grouped_gemm", test_grouped_gemm}};
    return run_tests("moe_cuda", tests, (int)(sizeof tests / sizeof tests[0]));
}
