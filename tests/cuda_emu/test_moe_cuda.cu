/* test_moe_cuda.cu - moe_cuda.cuh's kernels against plain loops on the host
   (make test-cuda-emu; with nvcc, make cuda). Ragged shapes: experts with 0
   and 1 rows, row counts off the 64-row tile, N and K off the tiles (padded
   as the packing pads them). The planted bugs are template variants of the
   library's kernels that must fail in at least one schedule. The expert
   path (pack, dispatch, GEMM, activation, GEMM, combine) is compared with a
   host model of its bf16 rounding and with moe.h's fp32 reference forward. */
#define MOE_IMPLEMENTATION
#include "../../moe.h"
#include "../../moe_cuda.cuh"
#include "emu_test.h"
#include <vector>

static inline int pad_to(int v, int m) { return (v + m - 1) / m * m; }

/* One grouped GEMM case: `counts` rows per expert, C = A W_e^T, k columns,
   n outputs. Returns 1 when every C element is within fp32 accumulation
   error of the double-precision product of the bf16 inputs (and, for a
   correct kernel, the columns past n and the ldc padding stay untouched). */
template <int BUG>
static int gemm_case(const std::vector<int> &counts, int n, int k, uint32_t seed) {
    const int E = (int)counts.size();
    const int n_pad = pad_to(n, MOE_CUDA__BN), k_pad = pad_to(k, MOE_CUDA__BK);
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
    const int pairs = T * K, d_pad = pad_to(d, MOE_CUDA__BK);
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

/* ---- the expert path against moe.h -------------------------------------------- */

static inline float bf16_round(float v) { return bf16_value(bf16_bits(v)); }
static void fill_host(std::vector<float> &v, size_t n, float amp, uint32_t *seed) {
    v.resize(n);
    for (size_t i = 0; i < n; i++) v[i] = amp * (((float)(lcg(seed) % 2001) - 1000.0f) / 1000.0f);
}
template <class T> static T *to_device(const std::vector<T> &h) {
    T *d = (T *)dalloc(h.size() * sizeof(T) + 1);
    up(d, h.data(), h.size() * sizeof(T));
    return d;
}

/* moe.h routes T tokens (reference ISA) and computes y; the GPU kernels take
   that routing and compute y again. 1 when y matches the bf16 host model to
   1e-4 and moe.h's fp32 y to 2e-2 of max |y|. */
static int expert_path_case(moe_activation act, int T, int E, int K, int D, int F, int biases,
                            uint32_t seed, int fused, std::vector<float> *y_out) {
    moe_config c = moe_preset_mixtral();
    c.num_experts = E; c.top_k = K; c.d_model = D; c.d_ff = F; c.activation = act;
    c.expert_bias = biases; c.isa = MOE_ISA_REFERENCE; c.balance_coef = 0.0f;
    const int glu = act == MOE_ACT_SWIGLU || act == MOE_ACT_GEGLU || act == MOE_ACT_GEGLU_TANH;
    std::vector<float> x, router, gate, upw, dnw, gb, ub, db;
    fill_host(x, (size_t)T * D, 1.0f, &seed);
    fill_host(router, (size_t)E * D, 0.5f, &seed);
    fill_host(gate, (size_t)E * F * D, 0.3f, &seed);
    fill_host(upw, (size_t)E * F * D, 0.3f, &seed);
    fill_host(dnw, (size_t)E * D * F, 0.3f, &seed);
    fill_host(gb, (size_t)E * F, 0.5f, &seed);
    fill_host(ub, (size_t)E * F, 0.5f, &seed);
    fill_host(db, (size_t)E * D, 0.5f, &seed);
    moe_weights w;
    memset(&w, 0, sizeof w);
    std::vector<float> gate_up;   /* HF's fused layout: per expert F gate rows, F up rows */
    for (int e = 0; e < E; e++) {
        gate_up.insert(gate_up.end(), gate.begin() + (long)e * F * D, gate.begin() + (long)(e + 1) * F * D);
        gate_up.insert(gate_up.end(), upw.begin() + (long)e * F * D, upw.begin() + (long)(e + 1) * F * D);
    }
    fused = fused && glu;
    w.router = router.data(); w.gate = fused ? gate_up.data() : gate.data();
    w.up = glu && !fused ? upw.data() : NULL;
    w.gate_up_fused = fused;
    w.down = dnw.data();
    if (biases) { w.gate_bias = gb.data(); w.up_bias = glu ? ub.data() : NULL; w.down_bias = db.data(); }
    size_t info_bytes = 0;
    moe_info info;
    CHECK(moe_info_size(&c, T, &info_bytes) == MOE_STATUS_OK);
    std::vector<unsigned char> info_buf(info_bytes + 1);
    CHECK(moe_info_bind(&c, T, &info, info_buf.data(), info_bytes) == MOE_STATUS_OK);
    std::vector<float> y_ref((size_t)T * D + 1);
    if (moe_forward_alloc(&c, &w, x.data(), T, y_ref.data(), &info) != MOE_STATUS_OK) return 0;
    std::vector<int32_t> expert(info.expert, info.expert + (size_t)T * K);
    std::vector<float> weight(info.weight, info.weight + (size_t)T * K);
    std::vector<uint8_t> dropped(info.dropped, info.dropped + (size_t)T * K);
    if (T == 0) { expert.push_back(-1); weight.push_back(0.0f); dropped.push_back(0); }

    /* the GPU path */
    const int d_pad = pad_to(D, MOE_CUDA__BK), f_pad = pad_to(F, MOE_CUDA__BK);
    const int n1 = glu ? 2 * F : F, n1_pad = pad_to(n1, MOE_CUDA__BN);
    const int d_out_pad = pad_to(D, MOE_CUDA__BN), pairs = T * K, rows_max = pairs > 0 ? pairs : 1;
    float *dx = to_device(x), *dg = to_device(fused ? gate_up : gate), *du = to_device(upw);
    float *dd = to_device(dnw);
    float *dgb = to_device(gb), *dub = to_device(ub), *ddb = to_device(db);
    int32_t *dexp = to_device(expert);
    float *dwt = to_device(weight);
    uint8_t *ddrop = to_device(dropped);
    __nv_bfloat16 *W1 = (__nv_bfloat16 *)dalloc((size_t)E * n1_pad * d_pad * 2);
    __nv_bfloat16 *W2 = (__nv_bfloat16 *)dalloc((size_t)E * d_out_pad * f_pad * 2);
    __nv_bfloat16 *A = (__nv_bfloat16 *)dalloc((size_t)rows_max * d_pad * 2);
    __nv_bfloat16 *H = (__nv_bfloat16 *)dalloc((size_t)rows_max * f_pad * 2);
    float *C1 = (float *)dalloc((size_t)rows_max * n1 * 4), *O = (float *)dalloc((size_t)rows_max * D * 4);
    float *dy = (float *)dalloc((size_t)(T > 0 ? T : 1) * D * 4);
    int32_t *dcnt = (int32_t *)dalloc(E * 4), *doff = (int32_t *)dalloc((E + 1) * 4);
    int32_t *drop_row = (int32_t *)dalloc((size_t)rows_max * 4), *dpor = (int32_t *)dalloc((size_t)rows_max * 4);
    cudaMemset(drop_row, 0xff, (size_t)rows_max * 4);
    const dim3 T256(256), GT(MOE_CUDA__GEMM_THREADS), DT(MOE_CUDA__DISPATCH_THREADS);
    const size_t gsmem = MOE_CUDA__STAGES * MOE_CUDA__STAGE_BYTES;
    int ok = 1;
    ok &= MOE_CUDA_LAUNCH(moe_cuda__pack_w1, dim3(8), T256, 0, 0, dg, glu && !fused ? du : (const float *)NULL,
                          E, F, D, glu, n1_pad, d_pad, W1) == cudaSuccess;
    ok &= MOE_CUDA_LAUNCH(moe_cuda__pack_w2, dim3(8), T256, 0, 0, dd, E, D, F, d_out_pad, f_pad,
                          W2) == cudaSuccess;
    ok &= MOE_CUDA_LAUNCH(moe_cuda__count_pairs, dim3(E), DT, 0, 0, dexp, ddrop, pairs, dcnt) == cudaSuccess;
    ok &= MOE_CUDA_LAUNCH(moe_cuda__scan_counts, dim3(1), dim3(32), 0, 0, dcnt, E, doff) == cudaSuccess;
    ok &= MOE_CUDA_LAUNCH(moe_cuda__gather_rows<0>, dim3(E), DT, 0, 0, dexp, ddrop, pairs, K, doff,
                          dx, D, d_pad, A, drop_row, dpor) == cudaSuccess;
    ok &= MOE_CUDA_LAUNCH(moe_cuda__grouped_gemm<0>, moe_cuda__gemm_grid(pairs, E, n1_pad), GT, gsmem, 0,
                          A, W1, doff, E, n1, n1_pad, d_pad, C1, n1) == cudaSuccess;
    ok &= MOE_CUDA_LAUNCH(moe_cuda__activate, dim3(rows_max), dim3(64), 0, 0, C1, n1, doff, E, F,
                          f_pad, (int)act, glu, biases ? dgb : (const float *)NULL,
                          biases && glu ? dub : (const float *)NULL, H) == cudaSuccess;
    ok &= MOE_CUDA_LAUNCH(moe_cuda__grouped_gemm<0>, moe_cuda__gemm_grid(pairs, E, d_out_pad), GT, gsmem,
                          0, H, W2, doff, E, D, d_out_pad, f_pad, O, D) == cudaSuccess;
    if (T > 0)
        ok &= MOE_CUDA_LAUNCH(moe_cuda__combine, dim3(T), dim3(64), 0, 0, O, D, drop_row, dexp, dwt,
                              K, D, biases ? ddb : (const float *)NULL, dy) == cudaSuccess;
    if (!ok) printf("  launch: %s\n", launch_error().c_str());
    std::vector<float> y((size_t)T * D + 1);
    down(y.data(), dy, (size_t)T * D * 4);
    void *bufs[] = {dx, dg, du, dd, dgb, dub, ddb, dexp, dwt, ddrop, W1, W2, A, H, C1, O, dy, dcnt,
                    doff, drop_row, dpor};
    for (void *b : bufs) cudaFree(b);
    if (!ok) return 0;
    y_out->assign(y.begin(), y.end() - 1);

    /* the host model: bf16 x, weights and H; exact sums */
    double ymax = 0.0, err_model = 0.0, err_ref = 0.0;
    for (int t = 0; t < T; t++)
        for (int dcol = 0; dcol < D; dcol++) ymax = fmax(ymax, fabs(y_ref[(size_t)t * D + dcol]));
    std::vector<double> h(F);
    for (int t = 0; t < T; t++) {
        std::vector<double> acc(D, 0.0);
        for (int j = 0; j < K; j++) {
            const int p = t * K + j, e = expert[p];
            if (e < 0 || dropped[p]) continue;
            for (int f = 0; f < F; f++) {
                double g = 0.0, u = 0.0;
                for (int k = 0; k < D; k++) {
                    const double xv = bf16_round(x[(size_t)t * D + k]);
                    g += xv * bf16_round(gate[((size_t)e * F + f) * D + k]);
                    if (glu) u += xv * bf16_round(upw[((size_t)e * F + f) * D + k]);
                }
                if (biases) { g += gb[(size_t)e * F + f]; u += ub[(size_t)e * F + f]; }
                float hv = moe_cuda__act((int)act, (float)g);
                if (glu) hv *= (float)u;
                h[f] = bf16_round(hv);
            }
            for (int dcol = 0; dcol < D; dcol++) {
                double o = 0.0;
                for (int f = 0; f < F; f++) o += h[f] * bf16_round(dnw[((size_t)e * D + dcol) * F + f]);
                if (biases) o += db[(size_t)e * D + dcol];
                acc[dcol] += weight[p] * o;
            }
        }
        for (int dcol = 0; dcol < D; dcol++) {
            const double got = y[(size_t)t * D + dcol];
            err_model = fmax(err_model, fabs(got - acc[dcol]));
            err_ref = fmax(err_ref, fabs(got - y_ref[(size_t)t * D + dcol]));
        }
    }
    printf("    %s T=%d E=%d K=%d D=%d F=%d: max |y| %.3g, off the bf16 model %.2g, off moe.h %.2g\n",
           act == MOE_ACT_SWIGLU ? "swiglu" : act == MOE_ACT_RELU ? "relu" : act == MOE_ACT_GEGLU ? "geglu" : "gelu", T, E, K, D, F,
           ymax, err_model, err_ref);
    return err_model <= 1e-4 * (ymax + 1e-30) + 1e-30 && err_ref <= 2e-2 * ymax + 1e-30;
}

static void test_expert_path(void) {
    struct pcase { moe_activation act; int T, E, K, D, F, biases, fused; };
    static const pcase cases[] = {
        {MOE_ACT_SWIGLU, 37, 6, 2, 40, 48, 1, 0},
        {MOE_ACT_RELU, 9, 4, 1, 24, 70, 0, 0},
        {MOE_ACT_GELU, 7, 3, 3, 72, 20, 1, 0},    /* K = E */
        {MOE_ACT_SWIGLU, 1, 5, 2, 5, 7, 0, 0},
        {MOE_ACT_GEGLU, 20, 4, 2, 33, 40, 1, 1},  /* HF's fused gate_up */
        {MOE_ACT_SWIGLU, 0, 4, 2, 16, 16, 1, 0},
    };
    const int n = (int)(sizeof cases / sizeof cases[0]);
    std::vector<std::vector<float> > first(n);
    for (int s = 0; s < NSCHED; s++) {
        use_schedule(s);
        for (int i = 0; i < n; i++) {
            const pcase &k = cases[i];
            std::vector<float> y;
            CHECK(expert_path_case(k.act, k.T, k.E, k.K, k.D, k.F, k.biases, 11u + (uint32_t)i,
                                   k.fused, &y));
            if (s == 0) first[i] = y;   /* every schedule: the same bits */
            else CHECK(y.size() == first[i].size() &&
                       (y.empty() || memcmp(y.data(), first[i].data(), y.size() * 4) == 0));
        }
    }
}

/* ---- routing against moe_route ------------------------------------------------ */

/* The GPU routes T tokens; its logits must match a double dot product, and
   moe.h's moe_route on those logits must pick the same experts in the same
   order, with the same scores and weights (to 1e-6). */
/* ties: every expert the same; nan_token >= 0: that token's x[0] is NaN, and
   the kernel must raise *nonfinite (moe.h: MOE_STATUS_NONFINITE) */
static int route_case(moe_config c, int T, uint32_t seed, int ties = 0, int nan_token = -1) {
    moe_config rc;
    c.isa = MOE_ISA_REFERENCE;
    if (moe_config_resolve(&c, &rc) != MOE_STATUS_OK) { printf("  bad config\n"); return 0; }
    const int E = rc.num_experts, K = rc.top_k, D = rc.d_model;
    std::vector<float> x, router, rbias, sbias;
    fill_host(x, (size_t)T * D + 1, 1.0f, &seed);
    fill_host(router, (size_t)E * D, 0.4f, &seed);
    fill_host(rbias, (size_t)E, 0.3f, &seed);
    fill_host(sbias, (size_t)E, 0.2f, &seed);
    if (nan_token >= 0) x[(size_t)nan_token * D] = NAN;
    if (ties)   /* ties everywhere: the lower index wins */
        for (int e = 0; e < E; e++) {
            for (int k = 0; k < D; k++) router[(size_t)e * D + k] = router[k];
            rbias[e] = 0.0f; sbias[e] = 0.0f;
        }
    float *dx = to_device(x), *dr = to_device(router), *drb = to_device(rbias), *dsb = to_device(sbias);
    const size_t TE = (size_t)(T > 0 ? T : 1) * E, TK = (size_t)(T > 0 ? T : 1) * K;
    float *dlog = (float *)dalloc(TE * 4), *dsc = (float *)dalloc(TE * 4), *dw = (float *)dalloc(TK * 4);
    int32_t *dexp = (int32_t *)dalloc(TK * 4);
    uint8_t *ddrop = (uint8_t *)dalloc(TK);
    int *dnf = (int *)dalloc(4);
    cudaMemset(dnf, 0, 4);
    moe_cuda__route_args a;
    memset(&a, 0, sizeof a);
    a.x = dx; a.router = dr; a.router_bias = rc.router_bias ? drb : NULL;
    a.selection_bias = rc.selection_bias ? dsb : NULL;
    a.tokens = T; a.d = D; a.experts = E; a.top_k = K; a.sigmoid = rc.score == MOE_SCORE_SIGMOID;
    a.n_group = rc.n_group; a.topk_group = rc.topk_group; a.group_score_top = rc.group_score_top;
    a.group_mask_zero = rc.group_mask_zero; a.normalize = (int)rc.normalize;
    a.norm_p = rc.norm_p; a.norm_eps = rc.norm_eps; a.routed_scale = rc.routed_scale;
    a.logits = dlog; a.scores = dsc; a.weight = dw; a.expert = dexp; a.dropped = ddrop;
    a.nonfinite = dnf;
    const unsigned blocks = (unsigned)((T + MOE_CUDA__ROUTE_WARPS - 1) / MOE_CUDA__ROUTE_WARPS);
    int ok = T == 0 || MOE_CUDA_LAUNCH(moe_cuda__route_topk, dim3(blocks),
                                       dim3(32 * MOE_CUDA__ROUTE_WARPS), 0, 0, a) == cudaSuccess;
    if (!ok) printf("  launch: %s\n", launch_error().c_str());
    std::vector<float> logits(TE), scores(TE), weight(TK);
    std::vector<int32_t> expert(TK);
    int nonfinite = 0;
    down(logits.data(), dlog, TE * 4); down(scores.data(), dsc, TE * 4);
    down(weight.data(), dw, TK * 4); down(expert.data(), dexp, TK * 4); down(&nonfinite, dnf, 4);
    void *bufs[] = {dx, dr, drb, dsb, dlog, dsc, dw, dexp, ddrop, dnf};
    for (void *b : bufs) cudaFree(b);
    if (nan_token >= 0) return ok && nonfinite == 1;
    if (!ok || nonfinite) return 0;
    for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++) {
            double z = rc.router_bias ? rbias[e] : 0.0, mag = fabs(z);
            for (int k = 0; k < D; k++) {
                z += (double)x[(size_t)t * D + k] * router[(size_t)e * D + k];
                mag += fabs((double)x[(size_t)t * D + k] * router[(size_t)e * D + k]);
            }
            if (!(fabs(logits[(size_t)t * E + e] - z) <= 1e-6 * mag + 1e-30)) {
                printf("  logit [%d][%d] %.9g, want %.9g\n", t, e, logits[(size_t)t * E + e], z);
                return 0;
            }
        }
    /* moe.h on the GPU's logits */
    moe_weights w;
    memset(&w, 0, sizeof w);
    w.selection_bias = sbias.data();
    size_t ib = 0, ws = 0;
    moe_info info;
    CHECK(moe_info_size(&c, T, &ib) == MOE_STATUS_OK);
    CHECK(moe_route_workspace_size(&c, T, &ws) == MOE_STATUS_OK);
    std::vector<unsigned char> ibuf(ib + 1), wbuf(ws + 1);
    CHECK(moe_info_bind(&c, T, &info, ibuf.data(), ib) == MOE_STATUS_OK);
    if (moe_route(&c, &w, logits.data(), NULL, T, &info, wbuf.data(), ws) != MOE_STATUS_OK) return 0;
    for (size_t i = 0; i < (size_t)T * E; i++)
        if (!(fabs(scores[i] - info.scores[i]) <= 1e-6 * fabs(info.scores[i]) + 1e-30)) {
            printf("  score %zu: %.9g, moe.h %.9g\n", i, scores[i], info.scores[i]);
            return 0;
        }
    for (size_t i = 0; i < (size_t)T * K; i++)
        if (expert[i] != info.expert[i] ||
            !(fabs(weight[i] - info.weight[i]) <= 1e-6 * fabs(info.weight[i]) + 1e-30)) {
            printf("  slot %zu: expert %d weight %.9g, moe.h %d %.9g\n", i, expert[i], weight[i],
                   info.expert[i], info.weight[i]);
            return 0;
        }
    return 1;
}

static void test_route(void) {
    for (int s = 0; s < NSCHED; s++) {
        use_schedule(s);
        moe_config c = moe_preset_mixtral();   /* softmax top-2, renormalised */
        c.d_model = 24;
        CHECK(route_case(c, 37, 1u));
        c.router_bias = 1; c.top_k = 8;         /* K = E, router bias */
        CHECK(route_case(c, 7, 2u));
        c = moe_preset_deepseek_v3();          /* sigmoid, selection bias, groups, sum of top-2 */
        c.num_experts = 64; c.d_model = 20; c.n_group = 8; c.topk_group = 3;
        CHECK(route_case(c, 45, 3u));
        c = moe_preset_deepseek_v2();          /* group max, no renorm, x16 */
        c.num_experts = 32; c.top_k = 6; c.d_model = 17; c.group_mask_zero = 1;
        CHECK(route_case(c, 9, 4u));
        c = moe_preset_dbrx();                 /* p-norm, p = 1 */
        c.d_model = 33;
        CHECK(route_case(c, 30, 5u));
        c.norm_p = 2.5f;                        /* p-norm through pow */
        CHECK(route_case(c, 30, 6u));
        c = moe_preset_qwen2_moe();            /* no renorm, E = 60 */
        c.d_model = 16;
        CHECK(route_case(c, 1, 7u));
        c = moe_preset_deepseek_v3();          /* E = 256, K = 8 */
        c.d_model = 8;
        CHECK(route_case(c, 5, 8u));
        c = moe_preset_mixtral();
        c.top_k = 3; c.d_model = 12;
        CHECK(route_case(c, 6, 11u, 1));        /* ties */
        c = moe_preset_deepseek_v3();
        c.num_experts = 32; c.n_group = 4; c.topk_group = 2; c.d_model = 6;
        CHECK(route_case(c, 6, 12u, 1));        /* tied groups, tied experts */
        CHECK(route_case(c, 9, 13u, 0, 5));     /* a NaN in x: flagged */
        c = moe_preset_mixtral();
        c.num_experts = 1; c.top_k = 1; c.d_model = 3;
        CHECK(route_case(c, 3, 9u));
        CHECK(route_case(c, 0, 10u));
    }
}

int main(void) {
    static const emu_test tests[] = {{"grouped_gemm", test_grouped_gemm},
                                     {"dispatch", test_dispatch},
                                     {"expert_path", test_expert_path},
                                     {"route", test_route}};
    return run_tests("moe_cuda", tests, (int)(sizeof tests / sizeof tests[0]));
}
