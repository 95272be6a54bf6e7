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
#include <algorithm>
#include <vector>

static inline int pad_to(int v, int m) { return (v + m - 1) / m * m; }
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
/* a device halt flag that is not raised (the kernels' early exit) */
static int32_t *no_halt(void) {
    int32_t *h = (int32_t *)dalloc(4);
    cudaMemset(h, 0, 4);
    return h;
}

static uint16_t random_bf16(uint32_t *seed, float scale) {
    return bf16_bits(((float)(lcg(seed) % 2001) - 1000.0f) / 1000.0f * scale);
}
/* |got - want| within fp32 accumulation error over k terms of size mag */
static int accumulated(double got, double want, double mag, int k) {
    return fabs(got - want) <= 1e-6 * k * mag + 1e-30;
}

/* One ROWS GEMM case: `counts` rows per expert, C = A B_e with B_e(k, o) =
   W_e[o][k], stored mn-major ([n_end][k_pad], the forward's weights) or
   k-major ([k_pad][n_end], the backward's reads down the columns); k columns,
   n outputs, n_end = n padded to 32 (not to the 64-column tile). 1 when every
   C element is within fp32 accumulation error of the double-precision
   product of the bf16 inputs (and, for a correct kernel, the columns past n
   and the ldc padding stay untouched). */
template <int B_KMAJOR, int BUG>
static int gemm_case(const std::vector<int> &counts, int n, int k, uint32_t seed) {
    const int E = (int)counts.size();
    const int n_end = pad_to(n, 32), k_pad = pad_to(k, MOE_CUDA__BK);
    const int ldc = n + 3;   /* C's row stride need not be n */
    std::vector<int32_t> offsets(E + 1, 0);
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
    const int rows = offsets[E];
    std::vector<uint16_t> a((size_t)(rows > 0 ? rows : 1) * k_pad, 0);
    std::vector<uint16_t> w((size_t)E * n_end * k_pad, 0);
    std::vector<float> c((size_t)(rows > 0 ? rows : 1) * ldc, -7.0f);
    auto w_at = [&](int e, int o, int i) -> uint16_t & {
        return w[B_KMAJOR ? ((size_t)e * k_pad + i) * n_end + o
                          : ((size_t)e * n_end + o) * k_pad + i];
    };
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < k; i++) a[(size_t)r * k_pad + i] = random_bf16(&seed, 1.0f);
    for (int e = 0; e < E; e++)
        for (int o = 0; o < n; o++)
            for (int i = 0; i < k; i++) w_at(e, o, i) = random_bf16(&seed, 0.25f);

    __nv_bfloat16 *da = (__nv_bfloat16 *)to_device(a), *dw = (__nv_bfloat16 *)to_device(w);
    int32_t *doff = to_device(offsets);
    float *dc = to_device(c);
    /* the worst-case grid for twice the rows: surplus tiles must exit */
    const dim3 grid = moe_cuda__gemm_grid(2 * rows + 1, E, n_end);
    int32_t *halt = no_halt();
    moe_cuda__epilogue out;
    memset(&out, 0, sizeof out);
    out.c = dc; out.ldc = ldc; out.n = n;
    moe_cuda__gemm_args g;
    g.a = da; g.b = dw; g.lda = k_pad; g.ldb = B_KMAJOR ? n_end : k_pad;
    g.b_stride = (size_t)n_end * k_pad; g.n_end = n_end; g.k_end = k_pad;
    g.offsets = doff; g.experts = E; g.halt = halt;
    const cudaError_t st =
        MOE_CUDA_LAUNCH((moe_cuda__grouped_gemm<MOE_CUDA__EPI_STORE, B_KMAJOR, BUG>), grid,
                        dim3(MOE_CUDA__GEMM_THREADS), MOE_CUDA__GEMM_SMEM, 0, g, out);
    down(c.data(), dc, c.size() * 4);
    cudaFree(da); cudaFree(dw); cudaFree(doff); cudaFree(dc); cudaFree(halt);
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
                                     bf16_value(w_at(e, col, i));
                    want += p;
                    mag += fabs(p);
                }
                if (!accumulated(got, want, mag, k)) {
                    if (!BUG && ok)
                        printf("  C[%d][%d] = %.9g, want %.9g (expert %d)\n", r, col, got, want, e);
                    ok = 0;
                }
            }
    return ok;
}

/* One DEPTH GEMM case (the weight gradients): C_e[i][j] += sum over expert
   e's rows r of A[r][i] B[r][j], A [rows][m_end] and B [rows][n_end] with
   the ends m and n padded to 32; C_e [m][n] starts at 0.5 (it accumulates). */
template <int BUG>
static int depth_case(const std::vector<int> &counts, int m, int n, uint32_t seed) {
    const int E = (int)counts.size(), m_end = pad_to(m, 32), n_end = pad_to(n, 32);
    std::vector<int32_t> offsets(E + 1, 0);
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
    const int rows = offsets[E] > 0 ? offsets[E] : 1;
    std::vector<uint16_t> a((size_t)rows * m_end, 0), b((size_t)rows * n_end, 0);
    for (int r = 0; r < offsets[E]; r++) {
        for (int i = 0; i < m; i++) a[(size_t)r * m_end + i] = random_bf16(&seed, 1.0f);
        for (int j = 0; j < n; j++) b[(size_t)r * n_end + j] = random_bf16(&seed, 0.5f);
    }
    std::vector<float> c((size_t)E * m * n, 0.5f);
    __nv_bfloat16 *da = (__nv_bfloat16 *)to_device(a), *db = (__nv_bfloat16 *)to_device(b);
    int32_t *doff = to_device(offsets);
    float *dc = to_device(c);
    moe_cuda__grad_out out;
    memset(&out, 0, sizeof out);
    out.first = dc; out.stride = (size_t)m * n; out.m_out = m; out.n_out = n;
    const dim3 grid((unsigned)((m_end + 63) / 64), (unsigned)((n_end + 63) / 64), (unsigned)E);
    const cudaError_t st = MOE_CUDA_LAUNCH(moe_cuda__grouped_gemm_depth<BUG>, grid,
                                           dim3(MOE_CUDA__GEMM_THREADS), MOE_CUDA__GEMM_SMEM, 0,
                                           (const __nv_bfloat16 *)da, m_end, m_end,
                                           (const __nv_bfloat16 *)db, n_end, n_end,
                                           (const int32_t *)doff, out);
    down(c.data(), dc, c.size() * 4);
    cudaFree(da); cudaFree(db); cudaFree(doff); cudaFree(dc);
    if (st != cudaSuccess) {
        if (!BUG) printf("  launch: %s\n", launch_error().c_str());
        return 0;
    }
    int ok = 1;
    for (int e = 0; e < E; e++)
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) {
                double want = 0.5, mag = 0.5;
                for (int r = offsets[e]; r < offsets[e + 1]; r++) {
                    const double p = (double)bf16_value(a[(size_t)r * m_end + i]) *
                                     bf16_value(b[(size_t)r * n_end + j]);
                    want += p;
                    mag += fabs(p);
                }
                const float got = c[((size_t)e * m + i) * n + j];
                if (!accumulated(got, want, mag, counts[e] + 1)) {
                    if (!BUG && ok)
                        printf("  C_%d[%d][%d] = %.9g, want %.9g\n", e, i, j, got, want);
                    ok = 0;
                }
            }
    return ok;
}

static void test_grouped_gemm(void) {
    /* experts with 0, 1, a tile and one, two tiles less one rows; E = 1 */
    const std::vector<int> ragged = {0, 1, 65, 0, 127, 3};
    const std::vector<int> one = {7};
    int caught[4] = {0, 0, 0, 0}, caught_t[4] = {0, 0, 0, 0}, caught_d[4] = {0, 0, 0, 0};
    for (int s = 0; s < NSCHED; s++) {
        use_schedule(s);
        CHECK((gemm_case<0, 0>(ragged, 72, 160, 1u)));   /* N off the tile, five K tiles */
        CHECK((gemm_case<0, 0>(ragged, 64, 40, 2u)));    /* K off the tile (zero-padded) */
        CHECK((gemm_case<0, 0>(one, 5, 16, 3u)));        /* a tiny expert, one K tile */
        CHECK((gemm_case<0, 0>(std::vector<int>{0, 0}, 8, 32, 4u)));   /* no rows at all */
        CHECK((gemm_case<1, 0>(ragged, 72, 160, 5u)));   /* B read down its columns */
        CHECK((gemm_case<1, 0>(one, 40, 24, 6u)));
        CHECK(depth_case<0>(ragged, 72, 40, 7u));        /* ragged K: 0 to 127 rows */
        CHECK(depth_case<0>(one, 8, 100, 8u));
        if (!PLANTED) continue;
        caught[1] += !gemm_case<0, 1>(ragged, 72, 160, 1u);
        caught[2] += !gemm_case<0, 2>(ragged, 72, 160, 1u);
        caught[3] += !gemm_case<0, 3>(ragged, 72, 160, 1u);
        caught_t[3] += !gemm_case<1, 3>(ragged, 72, 160, 5u);
        caught_d[1] += !depth_case<1>(ragged, 72, 40, 7u);
        caught_d[3] += !depth_case<3>(ragged, 72, 40, 7u);
    }
    expect_caught("one cp.async group too few waited for", caught[1]);
    expect_caught("stage refilled before the barrier", caught[2]);   /* needs > STAGES tiles */
    expect_caught("B fragment registers swapped", caught[3]);
    expect_caught("B fragment registers swapped (k-major B)", caught_t[3]);
    expect_caught("one cp.async group too few waited for (DEPTH)", caught_d[1]);
    expect_caught("B fragment registers swapped (DEPTH)", caught_d[3]);
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
    const size_t slack = BUG ? MOE_CUDA__BLOCK : 0;
    int32_t *dpor = (int32_t *)dalloc((pair_of_row.size() + slack) * 4);
    uint8_t *ddrop = (uint8_t *)dalloc(dropped.size());
    float *dx = (float *)dalloc(x.size() * 4);
    const size_t a_elems = (size_t)(rows > 0 ? rows : 1) * d_pad;
    __nv_bfloat16 *da = (__nv_bfloat16 *)dalloc((a_elems + slack * d_pad) * 2);
    up(dexp, expert.data(), expert.size() * 4);
    up(ddrop, dropped.data(), dropped.size());
    up(dx, x.data(), x.size() * 4);
    cudaMemset(d_rop, 0xff, expert.size() * 4);
    int32_t *halt = no_halt();
    int ok = MOE_CUDA_LAUNCH(moe_cuda__count_pairs, dim3(E), dim3(MOE_CUDA__BLOCK), 0, 0, dexp,
                             ddrop, pairs, dcnt, halt) == cudaSuccess;
    ok = ok && MOE_CUDA_LAUNCH(moe_cuda__scan_counts, dim3(1), dim3(32), 0, 0, dcnt, E, doff,
                               halt) == cudaSuccess;
    ok = ok && MOE_CUDA_LAUNCH(moe_cuda__gather_rows<BUG>, dim3(E), dim3(MOE_CUDA__BLOCK), 0, 0,
                               dexp, ddrop, pairs, K, doff, dx, d, d_pad, da, d_rop, dpor,
                               halt) == cudaSuccess;
    std::vector<int32_t> g_counts(E), g_offsets(E + 1), g_rop(expert.size()),
        g_por(pair_of_row.size());
    std::vector<uint16_t> g_a(a_elems);
    down(g_counts.data(), dcnt, E * 4);
    down(g_offsets.data(), doff, (E + 1) * 4);
    down(g_rop.data(), d_rop, expert.size() * 4);
    down(g_por.data(), dpor, pair_of_row.size() * 4);
    down(g_a.data(), da, a_elems * 2);
    cudaFree(dexp); cudaFree(dcnt); cudaFree(doff); cudaFree(d_rop); cudaFree(dpor);
    cudaFree(ddrop); cudaFree(dx); cudaFree(da); cudaFree(halt);
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
        if (!PLANTED) continue;
        caught[1] += !dispatch_case<1>(300, 2, 8, 70, 1u);
        caught[2] += !dispatch_case<2>(300, 2, 8, 70, 1u);
    }
    expect_caught("rows copied before the chunk's list is complete", caught[1]);
    expect_caught("a lane counted in its own prefix", caught[2]);
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
    float *dx = to_device(x), *dr = to_device(router);
    float *drb = to_device(rbias), *dsb = to_device(sbias);
    const size_t TE = (size_t)(T > 0 ? T : 1) * E, TK = (size_t)(T > 0 ? T : 1) * K;
    float *dlog = (float *)dalloc(TE * 4), *dsc = (float *)dalloc(TE * 4);
    float *dw = (float *)dalloc(TK * 4);
    int32_t *dexp = (int32_t *)dalloc(TK * 4);
    uint8_t *ddrop = (uint8_t *)dalloc(TK);
    int32_t *dnf = no_halt(), *dplain = (int32_t *)dalloc(TK * 4);
    double *dlse = (double *)dalloc((size_t)(T > 0 ? T : 1) * 8);
    double *dssum = (double *)dalloc((size_t)(T > 0 ? T : 1) * 8);
    moe_cuda__route_args a;
    memset(&a, 0, sizeof a);
    a.x = dx; a.router = dr; a.router_bias = rc.router_bias ? drb : NULL;
    a.selection_bias = rc.selection_bias ? dsb : NULL;
    a.tokens = T; a.d = D; a.experts = E; a.top_k = K; a.sigmoid = rc.score == MOE_SCORE_SIGMOID;
    a.n_group = rc.n_group; a.topk_group = rc.topk_group; a.group_score_top = rc.group_score_top;
    a.group_mask_zero = rc.group_mask_zero; a.normalize = (int)rc.normalize;
    a.norm_p = rc.norm_p; a.norm_eps = rc.norm_eps; a.routed_scale = rc.routed_scale;
    a.logits = dlog; a.scores = dsc; a.weight = dw; a.expert = dexp; a.dropped = ddrop;
    a.halt = dnf; a.lse_sq = dlse; a.score_sum = dssum; a.plain = dplain;
    const unsigned blocks = (unsigned)((T + MOE_CUDA__ROUTE_WARPS - 1) / MOE_CUDA__ROUTE_WARPS);
    int ok = T == 0 || MOE_CUDA_LAUNCH(moe_cuda__route_topk, dim3(blocks),
                                       dim3(32 * MOE_CUDA__ROUTE_WARPS), 0, 0, a) == cudaSuccess;
    if (!ok) printf("  launch: %s\n", launch_error().c_str());
    std::vector<float> logits(TE), scores(TE), weight(TK);
    std::vector<int32_t> expert(TK), plain(TK);
    std::vector<double> lse_sq((size_t)(T > 0 ? T : 1));
    int32_t nonfinite = 0;
    down(logits.data(), dlog, TE * 4); down(scores.data(), dsc, TE * 4);
    down(weight.data(), dw, TK * 4); down(expert.data(), dexp, TK * 4); down(&nonfinite, dnf, 4);
    down(plain.data(), dplain, TK * 4); down(lse_sq.data(), dlse, (size_t)T * 8);
    void *bufs[] = {dx, dr, drb, dsb, dlog, dsc, dw, dexp, ddrop, dnf, dplain, dlse, dssum};
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
    if (moe_route(&c, &w, logits.data(), NULL, T, &info, wbuf.data(), ws) != MOE_STATUS_OK)
        return 0;
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
    /* the sequence loss's plain top-k of the scores, and LSE(z)^2 for the z-loss */
    for (int t = 0; t < T; t++) {
        const float *sc = info.scores + (size_t)t * E, *z = logits.data() + (size_t)t * E;
        std::vector<int> order(E);
        for (int e = 0; e < E; e++) order[e] = e;
        std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return sc[i] > sc[j]; });
        for (int j = 0; j < K; j++)
            if (plain[(size_t)t * K + j] != order[j]) {
                printf("  token %d plain slot %d: %d, want %d\n", t, j, plain[(size_t)t * K + j],
                       order[j]);
                return 0;
            }
        double m = z[0], sum = 0.0;
        for (int e = 1; e < E; e++) m = fmax(m, z[e]);
        for (int e = 0; e < E; e++) sum += exp((double)z[e] - m);
        const double l = m + log(sum);
        if (!(fabs(lse_sq[t] - l * l) <= 1e-12 * (l * l + 1.0))) {
            printf("  token %d LSE^2 %.17g, want %.17g\n", t, lse_sq[t], l * l);
            return 0;
        }
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

/* ---- the whole layer: moe_cuda_forward against moe_forward -------------------- */

/* Values on a grid that make every router logit exact in any summation order
   (x: multiples of 1/8 in [-1, 1]; router and its biases: multiples of 1/64),
   so the GPU's routing must be moe.h's, integer for integer. */
static void fill_grid(std::vector<float> &v, size_t n, int steps, float unit, uint32_t *seed) {
    v.resize(n);
    for (size_t i = 0; i < n; i++) v[i] = ((int)(lcg(seed) % (2u * steps + 1)) - steps) * unit;
}

/* One layer's host tensors, in moe_weights layout, and device copies. */
/* moe.h's moe_info for T tokens of c, every array bound in its own buffer. */
struct host_info {
    moe_info info;
    std::vector<unsigned char> buf;
    int ok;
    host_info(const moe_config &c, int T) {
        size_t n = 0;
        memset(&info, 0, sizeof info);
        ok = moe_info_size(&c, T, &n) == MOE_STATUS_OK;
        buf.resize(n + 1);
        ok = ok && moe_info_bind(&c, T, &info, buf.data(), n) == MOE_STATUS_OK;
    }
};

struct layer {
    moe_config c;   /* resolved */
    int T, E, K, D, F, Fs, glu, fused;
    std::vector<float> x, router, rbias, sbias, gate, upw, down, gb, ub, db;
    std::vector<float> sgate, sup, sdown, sgb, sub, sdb, segate;
    moe_weights host, dev;
    std::vector<void *> bufs;
    template <class V> const float *put(const V &h) {
        float *d = (float *)dalloc(h.size() * sizeof(float) + 4);
        up(d, h.data(), h.size() * sizeof(float));
        bufs.push_back(d);
        return d;
    }
    ~layer() { for (void *b : bufs) cudaFree(b); }
};

static int make_layer(layer &L, const moe_config &cfg, int T, int fused, uint32_t seed) {
    if (moe_config_resolve(&cfg, &L.c) != MOE_STATUS_OK) { printf("  bad config\n"); return 0; }
    const moe_config &c = L.c;
    L.T = T; L.E = c.num_experts; L.K = c.top_k; L.D = c.d_model; L.F = c.d_ff;
    L.Fs = c.shared_d_ff; L.glu = moe_cuda__is_glu(c.activation); L.fused = fused && L.glu;
    const size_t E = L.E, D = L.D, F = L.F, Fs = L.Fs;
    fill_grid(L.x, (size_t)T * D + 1, 8, 1.0f / 8, &seed);
    fill_grid(L.router, E * D, 16, 1.0f / 64, &seed);
    fill_grid(L.rbias, E, 16, 1.0f / 64, &seed);
    fill_grid(L.sbias, E, 16, 1.0f / 256, &seed);
    fill_host(L.gate, E * F * D, 0.3f, &seed);
    fill_host(L.upw, E * F * D, 0.3f, &seed);
    fill_host(L.down, E * D * F, 0.3f, &seed);
    fill_host(L.gb, E * F, 0.5f, &seed);
    fill_host(L.ub, E * F, 0.5f, &seed);
    fill_host(L.db, E * D, 0.5f, &seed);
    fill_host(L.sgate, Fs * D, 0.3f, &seed);
    fill_host(L.sup, Fs * D, 0.3f, &seed);
    fill_host(L.sdown, D * Fs, 0.3f, &seed);
    fill_host(L.sgb, Fs, 0.5f, &seed);
    fill_host(L.sub, Fs, 0.5f, &seed);
    fill_host(L.sdb, D, 0.5f, &seed);
    fill_host(L.segate, D, 0.5f, &seed);
    if (L.fused) {   /* HF's gate_up [E][2F][D]: per expert F gate rows, then F up rows */
        std::vector<float> gu;
        for (size_t e = 0; e < E; e++) {
            gu.insert(gu.end(), L.gate.begin() + e * F * D, L.gate.begin() + (e + 1) * F * D);
            gu.insert(gu.end(), L.upw.begin() + e * F * D, L.upw.begin() + (e + 1) * F * D);
        }
        L.gate = gu;
    }
    moe_weights &h = L.host, &d = L.dev;
    memset(&h, 0, sizeof h);
    h.router = L.router.data(); h.router_bias = L.rbias.data(); h.selection_bias = L.sbias.data();
    h.gate = L.gate.data(); h.up = L.glu && !L.fused ? L.upw.data() : NULL; h.down = L.down.data();
    h.gate_up_fused = L.fused;
    if (c.expert_bias) {
        h.gate_bias = L.gb.data(); h.up_bias = L.glu ? L.ub.data() : NULL;
        h.down_bias = L.db.data();
        if (Fs) {
            h.shared_gate_bias = L.sgb.data(); h.shared_up_bias = L.glu ? L.sub.data() : NULL;
            h.shared_down_bias = L.sdb.data();
        }
    }
    if (Fs) {
        h.shared_gate = L.sgate.data(); h.shared_up = L.glu ? L.sup.data() : NULL;
        h.shared_down = L.sdown.data();
    }
    h.shared_expert_gate = c.shared_expert_gated ? L.segate.data() : NULL;
    d = h;   /* the same tensors on the device */
    d.router = L.put(L.router); d.router_bias = L.put(L.rbias); d.selection_bias = L.put(L.sbias);
    d.gate = L.put(L.gate); d.up = h.up ? L.put(L.upw) : NULL; d.down = L.put(L.down);
    d.gate_bias = h.gate_bias ? L.put(L.gb) : NULL; d.up_bias = h.up_bias ? L.put(L.ub) : NULL;
    d.down_bias = h.down_bias ? L.put(L.db) : NULL;
    d.shared_gate = h.shared_gate ? L.put(L.sgate) : NULL;
    d.shared_up = h.shared_up ? L.put(L.sup) : NULL;
    d.shared_down = h.shared_down ? L.put(L.sdown) : NULL;
    d.shared_gate_bias = h.shared_gate_bias ? L.put(L.sgb) : NULL;
    d.shared_up_bias = h.shared_up_bias ? L.put(L.sub) : NULL;
    d.shared_down_bias = h.shared_down_bias ? L.put(L.sdb) : NULL;
    d.shared_expert_gate = h.shared_expert_gate ? L.put(L.segate) : NULL;
    return 1;
}

/* Device moe_info arrays of a T-token call, and their host copies. */
struct dev_info {
    moe_info info;
    std::vector<void *> bufs;
    dev_info(const layer &L) {
        const size_t TE = (size_t)L.T * L.E + 1, TK = (size_t)L.T * L.K + 1;
        memset(&info, 0, sizeof info);
        info.logits = (float *)take(TE * 4); info.scores = (float *)take(TE * 4);
        info.expert = (int32_t *)take(TK * 4); info.weight = (float *)take(TK * 4);
        info.dropped = (uint8_t *)take(TK);
        info.expert_routed = (int32_t *)take((size_t)L.E * 4);
        info.expert_kept = (int32_t *)take((size_t)L.E * 4);
    }
    void *take(size_t n) { void *p = dalloc(n); bufs.push_back(p); return p; }
    ~dev_info() { for (void *b : bufs) cudaFree(b); }
};
template <class T> static std::vector<T> fetch(const T *d, size_t n) {
    std::vector<T> h(n + 1);
    down(h.data(), d, n * sizeof(T));
    h.pop_back();
    return h;
}

/* The layer as the tensor cores compute it: bf16 x, weights and hidden
   activations, exact sums (fp32 in the hardware), on the routing `info` holds. */
static std::vector<double> bf16_model(const layer &L, const moe_info &info) {
    const int T = L.T, D = L.D;
    std::vector<double> y((size_t)T * D, 0.0);
    const moe_weights &w = L.host;
    /* one FFN row: expert e's (or the shared expert's) output for token t */
    auto ffn = [&](int t, int F, const float *gate, const float *upw, size_t up_stride,
                   const float *gb, const float *ub, const float *down, const float *db,
                   std::vector<double> &out) {
        std::vector<double> h(F);
        for (int f = 0; f < F; f++) {
            double g = 0.0, u = 0.0;
            for (int k = 0; k < D; k++) {
                const double xv = bf16_round(L.x[(size_t)t * D + k]);
                g += xv * bf16_round(gate[(size_t)f * D + k]);
                if (L.glu) u += xv * bf16_round(upw[(size_t)f * up_stride + k]);
            }
            if (gb) g += gb[f];
            if (ub) u += ub[f];
            float hv = moe_cuda__act((int)L.c.activation, (float)g);
            if (L.glu) hv *= (float)u;
            h[f] = bf16_round(hv);
        }
        for (int c = 0; c < D; c++) {
            double o = db ? db[c] : 0.0;
            for (int f = 0; f < F; f++) o += h[f] * bf16_round(down[(size_t)c * F + f]);
            out[c] = o;
        }
    };
    std::vector<double> o(D);
    const size_t F = (size_t)L.F, gate_rows = L.fused ? 2 * F : F;
    for (int t = 0; t < T; t++) {
        for (int j = 0; j < L.K; j++) {
            const size_t p = (size_t)t * L.K + j;
            const int e = info.expert[p];
            if (info.dropped[p]) continue;
            const float *gate = w.gate + (size_t)e * gate_rows * D;
            const float *upw = L.fused ? gate + F * D : L.glu ? w.up + (size_t)e * F * D : NULL;
            ffn(t, L.F, gate, upw, D, w.gate_bias ? w.gate_bias + e * F : NULL,
                w.up_bias ? w.up_bias + e * F : NULL, w.down + (size_t)e * D * F,
                w.down_bias ? w.down_bias + (size_t)e * D : NULL, o);
            for (int c = 0; c < D; c++) y[(size_t)t * D + c] += info.weight[p] * o[c];
        }
        if (L.Fs) {
            double gamma = 1.0;
            if (w.shared_expert_gate) {
                double z = 0.0;
                for (int k = 0; k < D; k++)
                    z += (double)L.x[(size_t)t * D + k] * w.shared_expert_gate[k];
                gamma = 1.0 / (1.0 + exp(-z));
            }
            ffn(t, L.Fs, w.shared_gate, w.shared_up, D, w.shared_gate_bias, w.shared_up_bias,
                w.shared_down, w.shared_down_bias, o);
            for (int c = 0; c < D; c++) y[(size_t)t * D + c] += gamma * o[c];
        }
    }
    return y;
}

static int close_to(double got, double want, double rel, double abs_tol) {
    return fabs(got - want) <= rel * fabs(want) + abs_tol;
}

/* Runs cfg on T tokens through moe_forward (reference ISA) and moe_cuda_forward
   (tensor cores, or the fp32 kernels with simt); 1 when they agree: routing,
   drops and counts exactly, weights / scores / aux losses to 1e-5, y to the
   bf16 model (1e-4 of max |y|) and moe.h (2e-2; fp32 kernels: 2e-5). */
static int forward_case(const char *name, moe_config cfg, int T, int fused, int simt,
                        uint32_t seed, std::vector<float> *y_out, int verbose) {
    layer L;
    cfg.isa = MOE_ISA_REFERENCE;
    if (!make_layer(L, cfg, T, fused, seed)) return 0;
    const int E = L.E, K = L.K, D = L.D;
    const size_t TE = (size_t)T * E, TK = (size_t)T * K, TD = (size_t)T * D;

    /* moe.h */
    host_info hi(L.c, T);
    CHECK(hi.ok);
    moe_info &ref = hi.info;
    std::vector<float> y_ref(TD + 1);
    if (moe_forward_alloc(&L.c, &L.host, L.x.data(), T, y_ref.data(), &ref) != MOE_STATUS_OK) {
        printf("  moe_forward failed\n");
        return 0;
    }

    /* the GPU */
    moe_config gc = cfg;
    gc.isa = simt ? MOE_ISA_REFERENCE : MOE_ISA_AUTO;
    moe_weights w = L.dev;
    size_t pb = 0, wb = 0;
    void *packed = NULL;
    int ok = 1;
    if (!simt) {
        ok &= moe_cuda_pack_size(&gc, &pb) == MOE_STATUS_OK;
        packed = dalloc(pb);
        ok &= moe_cuda_pack_weights(&gc, &w, packed, pb) == MOE_STATUS_OK;
        w.packed = packed; w.packed_bytes = pb;
        w.gate = w.up = w.down = NULL;   /* the tensor-core path reads the blob only */
        w.shared_gate = w.shared_up = w.shared_down = NULL;
    }
    ok &= moe_cuda_forward_workspace_size(&gc, T, &wb) == MOE_STATUS_OK;
    void *ws = dalloc(wb);
    dev_info di(L);
    float *dx = (float *)L.put(L.x), *dy = (float *)dalloc(TD * 4 + 4);
    moe_status st = moe_cuda_forward(&gc, &w, dx, T, dy, &di.info, ws, wb);
    if (st != MOE_STATUS_OK) printf("  moe_cuda_forward: %s\n", moe_status_string(st));
    moe_info got = di.info;
    const moe_status res = moe_cuda_forward_result(ws, &got);
    if (res != MOE_STATUS_OK)
        printf("  result: %s (%s)\n", moe_status_string(res), launch_error().c_str());
    ok &= st == MOE_STATUS_OK && res == MOE_STATUS_OK;
    const std::vector<float> y = fetch(dy, TD), logits = fetch(di.info.logits, TE),
                             scores = fetch(di.info.scores, TE), weight = fetch(di.info.weight, TK);
    const std::vector<int32_t> expert = fetch(di.info.expert, TK),
                               routed = fetch(di.info.expert_routed, (size_t)E),
                               kept = fetch(di.info.expert_kept, (size_t)E);
    const std::vector<uint8_t> dropped = fetch(di.info.dropped, TK);
    cudaFree(ws); cudaFree(dy); cudaFree(packed);
    if (!ok) return 0;
    *y_out = y;

    /* routing: integers exactly, floats to 1e-6 */
    int bad = 0;
    for (size_t i = 0; i < TE; i++) {
        bad += logits[i] != ref.logits[i];
        bad += !close_to(scores[i], ref.scores[i], 1e-6, 1e-30);
    }
    for (size_t i = 0; i < TK; i++)
        bad += expert[i] != ref.expert[i] || dropped[i] != ref.dropped[i] ||
               !close_to(weight[i], ref.weight[i], 1e-6, 1e-30);
    for (int e = 0; e < E; e++)
        bad += routed[e] != ref.expert_routed[e] || kept[e] != ref.expert_kept[e];
    bad += got.slots != ref.slots || got.capacity != ref.capacity ||
           got.dropped_pairs != ref.dropped_pairs || got.dropped_tokens != ref.dropped_tokens;
    const float ga[6] = {got.aux_balance, got.aux_z, got.aux_importance, got.aux_load,
                         got.aux_seq, got.aux_total};
    const float ra[6] = {ref.aux_balance, ref.aux_z, ref.aux_importance, ref.aux_load,
                         ref.aux_seq, ref.aux_total};
    for (int i = 0; i < 6; i++) bad += !close_to(ga[i], ra[i], 1e-5, 1e-7);
    if (bad) {
        printf("  %s: %d routing / count / loss values differ (aux: %g %g %g %g %g %g vs "
               "%g %g %g %g %g %g; drops %d %d vs %d %d)\n", name, bad, ga[0], ga[1], ga[2],
               ga[3], ga[4], ga[5], ra[0], ra[1], ra[2], ra[3], ra[4], ra[5], got.dropped_pairs,
               got.dropped_tokens, ref.dropped_pairs, ref.dropped_tokens);
        return 0;
    }

    /* y */
    double ymax = 0.0, err_ref = 0.0, err_model = 0.0;
    for (size_t i = 0; i < TD; i++) {
        ymax = fmax(ymax, fabs(y_ref[i]));
        err_ref = fmax(err_ref, fabs(y[i] - y_ref[i]));
    }
    if (!simt) {
        moe_info routing = ref;   /* the same integers as the GPU's; its weights */
        routing.weight = (float *)weight.data();
        const std::vector<double> model = bf16_model(L, routing);
        for (size_t i = 0; i < TD; i++) err_model = fmax(err_model, fabs(y[i] - model[i]));
    }
    if (verbose)
        printf("    %-6s %-11s T=%d E=%d K=%d D=%d F=%d Fs=%d: max |y| %.3g, off moe.h %.2g",
               simt ? "fp32" : "tensor", name, T, E, K, D, L.F, L.Fs, ymax, err_ref);
    if (verbose && !simt) printf(", off the bf16 model %.2g", err_model);
    if (verbose) printf(", aux_total %.6g, %d dropped\n", got.aux_total, got.dropped_pairs);
    if (simt) return err_ref <= 2e-5 * ymax + 1e-30;
    return err_model <= 1e-4 * ymax + 1e-30 && err_ref <= 2e-2 * ymax + 1e-30;
}

struct fcase { const char *name; moe_config c; int T, fused; };

/* The layer cases of the forward and backward tests (each sets what it
   runs: training, the ISA); every routing and loss feature the GPU has. */
static std::vector<fcase> layer_cases(void) {
    std::vector<fcase> v;
    moe_config c = moe_preset_mixtral();   /* softmax top-2, SwiGLU, biases, balance, z */
    c.num_experts = 6; c.d_model = 40; c.d_ff = 48; c.expert_bias = 1; c.z_loss_coef = 1e-3f;
    v.push_back({"mixtral", c, 37, 0});
    c = moe_preset_switch();               /* top-1, ReLU, capacity drops, no renorm */
    c.num_experts = 4; c.d_model = 24; c.d_ff = 30; c.jitter = 0.0f;
    v.push_back({"switch", c, 19, 0});
    c = moe_preset_mixtral();              /* K = E, GELU, biases, router gradient clipped */
    c.num_experts = 3; c.top_k = 3; c.d_model = 36; c.d_ff = 20; c.activation = MOE_ACT_GELU;
    c.expert_bias = 1; c.router_grad_clip = 0.01f;
    v.push_back({"k_eq_e", c, 7, 0});
    c = moe_preset_glam();                 /* GEGLU, HF's fused gate_up */
    c.num_experts = 4; c.d_model = 33; c.d_ff = 40;
    v.push_back({"glam_fused", c, 20, 1});
    c = moe_preset_deepseek_v3();          /* sigmoid, selection bias, groups, x2.5, shared */
    c.num_experts = 32; c.top_k = 4; c.n_group = 4; c.topk_group = 2; c.d_model = 16;
    c.d_ff = 12; c.shared_d_ff = 24; c.seq_len = 5; c.seq_balance_coef = 1e-1f;
    c.balance_loss = MOE_BALANCE_TOPK_NORMALIZED; c.balance_coef = 1e-2f; c.router_bias = 1;
    c.expert_bias = 1;
    v.push_back({"deepseek_v3", c, 23, 0});
    c = moe_preset_qwen2_moe();            /* no renorm, gated shared expert, softmax seq loss */
    c.num_experts = 8; c.top_k = 4; c.d_model = 24; c.d_ff = 16; c.shared_d_ff = 40;
    c.balance_coef = 0.01f; c.seq_balance_coef = 0.05f;
    v.push_back({"qwen2", c, 13, 0});
    c = moe_preset_dbrx();                 /* p-norm after drops, first choice, Shazeer losses */
    c.num_experts = 8; c.top_k = 2; c.d_model = 20; c.d_ff = 24; c.capacity = 3;
    c.normalize_after_drop = 1; c.norm_p = 2.0f; c.balance_loss = MOE_BALANCE_FIRST_CHOICE;
    c.importance_coef = 0.1f; c.load_coef = 0.1f;
    v.push_back({"dbrx_drops", c, 30, 0});
    c = moe_preset_olmoe();                /* E = 64, K = 8, no renorm, z-loss */
    c.d_model = 16; c.d_ff = 8;
    v.push_back({"olmoe", c, 40, 0});
    c = moe_preset_mixtral();              /* one token; no tokens */
    c.num_experts = 5; c.d_model = 5; c.d_ff = 7;
    v.push_back({"one_token", c, 1, 0});
    v.push_back({"no_tokens", c, 0, 0});
    return v;
}

static void test_forward(void) {
    const std::vector<fcase> cases = layer_cases();
    const int n = (int)cases.size();
    std::vector<std::vector<float> > first(2 * n);
    for (int s = 0; s < NSCHED; s++) {
        use_schedule(s);
        for (int i = 0; i < 2 * n; i++) {
            const fcase &k = cases[i / 2];
            std::vector<float> y;
            CHECK(forward_case(k.name, k.c, k.T, k.fused, i & 1, 100u + (uint32_t)i, &y, s == 0));
            if (s == 0) first[i] = y;   /* every schedule: the same bits */
            else CHECK(y.size() == first[i].size() &&
                       (y.empty() || memcmp(y.data(), first[i].data(), y.size() * 4) == 0));
        }
    }
}

/* What only the device sees: a NaN in x makes moe_cuda_forward_result say
   NONFINITE, and y and the info arrays keep their bytes. */
static void test_forward_nonfinite(void) {
    for (int s = 0; s < NSCHED; s++) {
        use_schedule(s);
        for (int simt = 0; simt < 2; simt++) {
            moe_config c = moe_preset_qwen2_moe();
            c.num_experts = 8; c.top_k = 2; c.d_model = 16; c.d_ff = 8; c.shared_d_ff = 8;
            c.capacity = 2;
            c.isa = simt ? MOE_ISA_REFERENCE : MOE_ISA_AUTO;
            layer L;
            CHECK(make_layer(L, c, 9, 0, 5u));
            L.x[3 * 16 + 4] = NAN;
            moe_weights w = L.dev;
            size_t pb = 0, wb = 0;
            CHECK(moe_cuda_pack_size(&c, &pb) == MOE_STATUS_OK);
            void *packed = dalloc(pb);
            CHECK(moe_cuda_pack_weights(&c, &w, packed, pb) == MOE_STATUS_OK);
            w.packed = packed; w.packed_bytes = pb;
            CHECK(moe_cuda_forward_workspace_size(&c, L.T, &wb) == MOE_STATUS_OK);
            void *ws = dalloc(wb);
            dev_info di(L);
            const size_t TD = (size_t)L.T * L.D, TK = (size_t)L.T * L.K;
            std::vector<float> y0(TD, 7.0f);
            std::vector<int32_t> e0(TK, 0x55);
            float *dx = (float *)L.put(L.x), *dy = (float *)L.put(y0);
            up(di.info.expert, e0.data(), TK * 4);
            moe_info got = di.info;
            got.aux_total = 123.0f;
            CHECK(moe_cuda_forward(&c, &w, dx, L.T, dy, &di.info, ws, wb) == MOE_STATUS_OK);
            CHECK(moe_cuda_forward_result(ws, &got) == MOE_STATUS_NONFINITE);
            CHECK(fetch(dy, TD) == y0);
            CHECK(fetch(di.info.expert, TK) == e0);
            CHECK(got.aux_total == 123.0f);
            cudaFree(ws); cudaFree(packed);
        }
    }
}

/* Gradient tensors, host and device, with the same nonzero start (they accumulate). */
struct grad_set {
    enum { ROUTER, ROUTER_BIAS, GATE, UP, DOWN, GATE_BIAS, UP_BIAS, DOWN_BIAS, S_GATE, S_UP,
           S_DOWN, S_GATE_BIAS, S_UP_BIAS, S_DOWN_BIAS, S_EXPERT_GATE, DX };
    static const int N = DX + 1;
    std::vector<float> h[N];
    float *d[N];
    grad_set(const layer &L, uint32_t seed) {
        const size_t E = L.E, D = L.D, F = L.F, Fs = L.Fs;
        const size_t n[N] = {E * D, E, E * F * D * (L.fused ? 2 : 1),
                             L.glu && !L.fused ? E * F * D : 0, E * D * F, E * F,
                             L.glu ? E * F : 0, E * D, Fs * D, L.glu ? Fs * D : 0, D * Fs, Fs,
                             L.glu ? Fs : 0, Fs ? D : 0, Fs ? D : 0, (size_t)L.T * D};
        for (int i = 0; i < N; i++) {
            fill_host(h[i], n[i], 0.25f, &seed);
            d[i] = NULL;
            if (n[i]) { d[i] = (float *)dalloc(n[i] * 4); up(d[i], h[i].data(), n[i] * 4); }
        }
    }
    ~grad_set() { for (int i = 0; i < N; i++) cudaFree(d[i]); }
    static moe_grads bind(float *const *t, int fused) {
        moe_grads g;
        memset(&g, 0, sizeof g);
        g.router = t[ROUTER]; g.router_bias = t[ROUTER_BIAS]; g.gate = t[GATE]; g.up = t[UP];
        g.down = t[DOWN]; g.gate_bias = t[GATE_BIAS]; g.up_bias = t[UP_BIAS];
        g.down_bias = t[DOWN_BIAS]; g.shared_gate = t[S_GATE]; g.shared_up = t[S_UP];
        g.shared_down = t[S_DOWN]; g.shared_gate_bias = t[S_GATE_BIAS];
        g.shared_up_bias = t[S_UP_BIAS]; g.shared_down_bias = t[S_DOWN_BIAS];
        g.shared_expert_gate = t[S_EXPERT_GATE]; g.gate_up_fused = fused;
        return g;
    }
};
static const char *const grad_names[grad_set::N] = {
    "router", "router_bias", "gate", "up", "down", "gate_bias", "up_bias", "down_bias",
    "shared_gate", "shared_up", "shared_down", "shared_gate_bias", "shared_up_bias",
    "shared_down_bias", "shared_expert_gate", "dx"};

/* moe.h's router gradient (from zero) of a training forward and backward. */
static std::vector<float> router_grad_of(const layer &L, const moe_config &c,
                                         const std::vector<float> &dy) {
    host_info hi(c, L.T);
    std::vector<float> r((size_t)L.E * L.D, 0.0f), y((size_t)L.T * L.D + 1), dx(y.size());
    moe_grads g;
    memset(&g, 0, sizeof g);
    g.router = r.data();
    if (!hi.ok ||
        moe_forward_alloc(&c, &L.host, L.x.data(), L.T, y.data(), &hi.info) != MOE_STATUS_OK ||
        moe_backward_alloc(&c, &L.host, L.x.data(), L.T, &hi.info, dy.data(), dx.data(), &g) !=
            MOE_STATUS_OK)
        r.assign(r.size(), NAN);
    return r;
}

/* A training forward and backward of cfg on T tokens through moe.h (fp32,
   reference ISA) and the GPU: its fp32 kernels (simt) or the tensor cores.
   1 when every gradient agrees with moe.h's to 1e-4 (fp32) or 2e-2 (bf16
   operands) of its largest magnitude. The GPU's gradients (and dx) go to *out. */
static int backward_case(const char *name, moe_config cfg, int T, int fused, int simt,
                         uint32_t seed, std::vector<std::vector<float> > *out, int verbose) {
    layer L;
    cfg.isa = MOE_ISA_REFERENCE;   /* moe.h's, and then the GPU's fp32 path ... */
    cfg.training = 1; cfg.save_for_backward = 1;
    if (!make_layer(L, cfg, T, fused, seed)) return 0;
    if (!simt) cfg.isa = MOE_ISA_AUTO;   /* ... or its tensor cores */
    const double tol = simt ? 1e-4 : 2e-2;
    const size_t TD = (size_t)T * L.D;
    std::vector<float> dy;
    fill_host(dy, TD + 1, 0.5f, &seed);
    grad_set G(L, seed + 7);

    /* moe.h: grads start at G.h, dx overwritten */
    host_info hi(L.c, T);
    CHECK(hi.ok);
    moe_info &ref = hi.info;
    std::vector<float> y(TD + 1);
    std::vector<float> want[grad_set::N];
    float *wp[grad_set::N];
    for (int i = 0; i < grad_set::N; i++) {
        want[i] = G.h[i];
        wp[i] = want[i].empty() ? NULL : want[i].data();
    }
    moe_grads hg = grad_set::bind(wp, L.fused);
    if (moe_forward_alloc(&L.c, &L.host, L.x.data(), T, y.data(), &ref) != MOE_STATUS_OK ||
        moe_backward_alloc(&L.c, &L.host, L.x.data(), T, &ref, dy.data(), wp[grad_set::DX],
                           &hg) !=
            MOE_STATUS_OK) {
        printf("  %s: moe.h failed\n", name);
        return 0;
    }
    if (T > 0) {   /* each router term the case sets must move the router gradient */
        const std::vector<float> full = router_grad_of(L, L.c, dy);
        for (int k = 0; k < 5; k++) {
            moe_config u = L.c;
            float *knob[5] = {&u.balance_coef, &u.z_loss_coef, &u.importance_coef,
                              &u.seq_balance_coef, &u.router_grad_clip};
            if (*knob[k] == 0.0f) continue;
            *knob[k] = 0.0f;
            if (router_grad_of(L, u, dy) == full) {
                printf("  %s: router term %d changes nothing\n", name, k);
                return 0;
            }
        }
    }

    /* the GPU */
    dev_info di(L);
    size_t fb = 0, bb = 0, pb = 0;
    moe_weights dw = L.dev;
    moe_status st = moe_cuda_forward_workspace_size(&cfg, T, &fb);
    if (st == MOE_STATUS_OK) st = moe_cuda_backward_workspace_size(&cfg, T, &bb);
    if (st == MOE_STATUS_OK) st = moe_cuda_pack_size(&cfg, &pb);
    void *fws = dalloc(fb), *bws = dalloc(bb), *packed = dalloc(pb);
    if (st == MOE_STATUS_OK && !simt) st = moe_cuda_pack_weights(&cfg, &dw, packed, pb);
    dw.packed = packed; dw.packed_bytes = pb;
    float *dxin = (float *)L.put(L.x), *dyv = (float *)L.put(dy);
    float *dyout = (float *)dalloc(TD * 4 + 4);
    moe_info got = di.info;
    if (st == MOE_STATUS_OK) st = moe_cuda_forward(&cfg, &dw, dxin, T, dyout, &got, fws, fb);
    if (st == MOE_STATUS_OK) st = moe_cuda_forward_result(fws, &got);
    moe_grads dg = grad_set::bind(G.d, L.fused);
    if (st == MOE_STATUS_OK)
        st = moe_cuda_backward(&cfg, &dw, dxin, T, &got, dyv, G.d[grad_set::DX], &dg, bws, bb);
    cudaFree(fws); cudaFree(bws); cudaFree(dyout); cudaFree(packed);
    if (st != MOE_STATUS_OK) {
        printf("  %s: %s (%s)\n", name, moe_status_string(st), launch_error().c_str());
        return 0;
    }
    int good = 1;
    if (verbose)
        printf("    %-11s %s T=%d E=%d K=%d D=%d F=%d: off moe.h", name, simt ? "fp32  " : "tensor",
               T, L.E, L.K, L.D, L.F);
    out->clear();
    for (int i = 0; i < grad_set::N; i++) {
        const std::vector<float> gpu = fetch(G.d[i], want[i].size());
        double big = 0.0, err = 0.0;
        for (size_t k = 0; k < gpu.size(); k++) {
            big = fmax(big, fabs(want[i][k] - G.h[i][k]));   /* the gradient's own size */
            err = fmax(err, fabs(gpu[k] - want[i][k]));
        }
        if (verbose && big > 0) printf(" %s %.1e", grad_names[i], err / big);   /* relative */
        if (!(err <= tol * big + 1e-7)) {
            good = 0;
            printf("  %s: %s off by %.3g (largest gradient %.3g)\n", name, grad_names[i], err, big);
        }
        out->push_back(gpu);
    }
    if (verbose) printf(", %d dropped\n", got.dropped_pairs);
    return good;
}


static void test_backward(void) {
    const std::vector<fcase> cases = layer_cases();
    const size_t n = cases.size();
    std::vector<std::vector<std::vector<float> > > first(2 * n);
    for (int s = 0; s < NSCHED; s++) {
        use_schedule(s);
        for (size_t i = 0; i < 2 * n; i++) {   /* each case on the fp32 path, then tensor cores */
            const fcase &k = cases[i / 2];
            std::vector<std::vector<float> > g;
            CHECK(backward_case(k.name, k.c, k.T, k.fused, !(i & 1), 300u + (uint32_t)(i / 2), &g,
                                s == 0));
            if (s == 0) { first[i] = g; continue; }
            int same = g.size() == first[i].size();   /* every schedule: the same bits */
            for (size_t j = 0; same && j < g.size(); j++)
                same = g[j].size() == first[i][j].size() &&
                       (g[j].empty() || !memcmp(g[j].data(), first[i][j].data(), g[j].size() * 4));
            CHECK(same);
        }
    }
}

/* moe_cuda_backward's refusals (nothing written) and its in-place form. */
static void test_backward_contract(void) {
    use_schedule(0);
    layer L;
    moe_config c = moe_preset_mixtral();
    c.num_experts = 4; c.d_model = 12; c.d_ff = 10; c.isa = MOE_ISA_REFERENCE;
    c.training = 1; c.save_for_backward = 1;
    CHECK(make_layer(L, c, 9, 0, 77u));
    const size_t TD = (size_t)L.T * L.D;
    std::vector<float> dyh;
    uint32_t seed = 5u;
    fill_host(dyh, TD, 0.5f, &seed);
    dev_info di(L);
    size_t fb = 0, bb = 0;
    CHECK(moe_cuda_forward_workspace_size(&c, L.T, &fb) == MOE_STATUS_OK);
    CHECK(moe_cuda_backward_workspace_size(&c, L.T, &bb) == MOE_STATUS_OK);
    void *fws = dalloc(fb), *bws = dalloc(bb);
    float *x = (float *)L.put(L.x), *dy = (float *)L.put(dyh), *y = (float *)dalloc(TD * 4);
    float *dx = (float *)dalloc(TD * 4);
    grad_set G(L, 9u);
    moe_grads g = grad_set::bind(G.d, 0);
    const std::vector<float> router0 = fetch(G.d[0], G.h[0].size());

    /* a forward without save_for_backward leaves no stamp (in train mode
       too), nor does an evaluation forward; a saving one does */
    moe_info info = di.info;
    moe_config eval = c, nosave = c;
    eval.training = 0; eval.save_for_backward = 0;
    nosave.save_for_backward = 0;
    CHECK(moe_cuda_forward(&eval, &L.dev, x, L.T, y, &info, fws, fb) == MOE_STATUS_OK);
    CHECK(moe_cuda_forward_result(fws, &info) == MOE_STATUS_OK);
    CHECK(moe_cuda_backward(&c, &L.dev, x, L.T, &info, dy, dx, &g, bws, bb) ==
          MOE_STATUS_MISSING_CACHE);
    CHECK(moe_cuda_forward(&nosave, &L.dev, x, L.T, y, &info, fws, fb) == MOE_STATUS_OK);
    CHECK(moe_cuda_forward_result(fws, &info) == MOE_STATUS_OK);
    CHECK(info.cache_config == 0);
    CHECK(moe_cuda_backward(&c, &L.dev, x, L.T, &info, dy, dx, &g, bws, bb) ==
          MOE_STATUS_MISSING_CACHE);
    CHECK(moe_cuda_forward(&c, &L.dev, x, L.T, y, &info, fws, fb) == MOE_STATUS_OK);
    CHECK(info.cache_config == 0);   /* cleared when queued, set by the result */
    CHECK(moe_cuda_forward_result(fws, &info) == MOE_STATUS_OK);
    CHECK(info.cache_tokens == L.T && info.cache_config == moe_config_fingerprint(&c));

    /* another T or config; unsupported configs; missing pieces; overlaps */
    CHECK(moe_cuda_backward(&c, &L.dev, x, L.T - 1, &info, dy, dx, &g, bws, bb) ==
          MOE_STATUS_BAD_CACHE);
    moe_config other = c;
    other.z_loss_coef = 0.5f;
    CHECK(moe_cuda_backward(&other, &L.dev, x, L.T, &info, dy, dx, &g, bws, bb) ==
          MOE_STATUS_BAD_CACHE);
    other = moe_preset_shazeer();   /* noisy training: the forward's refusal */
    other.training = 1; other.save_for_backward = 1;
    CHECK(moe_cuda_backward_workspace_size(&other, L.T, &fb) == MOE_STATUS_CUDA_UNSUPPORTED);
    other.training = 0;             /* eval mode saving for the backward: noise-free, runs */
    size_t eval_bb = 0;
    CHECK(moe_cuda_backward_workspace_size(&other, L.T, &eval_bb) == MOE_STATUS_OK);
    CHECK(moe_cuda_backward(&c, &L.dev, x, L.T, &info, dy, dx, NULL, bws, bb) ==
          MOE_STATUS_NULL_ARGUMENT);
    CHECK(moe_cuda_backward(&c, &L.dev, x, L.T, &info, dy, dx, &g, bws, bb - 1) ==
          MOE_STATUS_WORKSPACE_TOO_SMALL);
    moe_weights w = L.dev;
    w.down = NULL;
    CHECK(moe_cuda_backward(&c, &w, x, L.T, &info, dy, dx, &g, bws, bb) ==
          MOE_STATUS_MISSING_WEIGHT);
    moe_config tensor = c;   /* the tensor-core backward reads the packed blob */
    tensor.isa = MOE_ISA_AUTO;
    size_t tb = 0;
    CHECK(moe_cuda_backward_workspace_size(&tensor, L.T, &tb) == MOE_STATUS_OK);
    void *tws = dalloc(tb), *blob = dalloc(4096);
    w = L.dev;   /* no blob */
    CHECK(moe_cuda_backward(&tensor, &w, x, L.T, &info, dy, dx, &g, tws, tb) ==
          MOE_STATUS_MISSING_WEIGHT);
    w.packed = blob; w.packed_bytes = 64;   /* too small for this layer */
    CHECK(moe_cuda_backward(&tensor, &w, x, L.T, &info, dy, dx, &g, tws, tb) ==
          MOE_STATUS_BAD_PACKED);
    cudaFree(tws); cudaFree(blob);
    moe_info no_scores = info;
    no_scores.scores = NULL;
    CHECK(moe_cuda_backward(&c, &L.dev, x, L.T, &no_scores, dy, dx, &g, bws, bb) ==
          MOE_STATUS_MISSING_CACHE);
    moe_grads bad = g;
    bad.down = dx + 3;   /* a gradient over dx */
    CHECK(moe_cuda_backward(&c, &L.dev, x, L.T, &info, dy, dx, &bad, bws, bb) ==
          MOE_STATUS_ALIASING);
    bad = g;
    bad.gate = (float *)info.scores;   /* a gradient over a routing array */
    CHECK(moe_cuda_backward(&c, &L.dev, x, L.T, &info, dy, dx, &bad, bws, bb) ==
          MOE_STATUS_ALIASING);
    CHECK(fetch(G.d[0], G.h[0].size()) == router0);   /* nothing written so far */

    /* in place (dx over dy) and without dx: the same gradients as out of place */
    CHECK(moe_cuda_backward(&c, &L.dev, x, L.T, &info, dy, dx, &g, bws, bb) == MOE_STATUS_OK);
    const std::vector<float> dx_out = fetch(dx, TD), router1 = fetch(G.d[0], G.h[0].size());
    CHECK(moe_cuda_backward(&c, &L.dev, x, L.T, &info, dy, dy, &g, bws, bb) == MOE_STATUS_OK);
    CHECK(fetch(dy, TD) == dx_out);
    up(dy, dyh.data(), TD * 4);
    CHECK(moe_cuda_backward(&c, &L.dev, x, L.T, &info, dy, NULL, &g, bws, bb) == MOE_STATUS_OK);
    const std::vector<float> router3 = fetch(G.d[0], G.h[0].size());
    int doubled = 1;   /* three equal increments, in the same order of additions */
    for (size_t i = 0; i < router0.size(); i++) {
        const float step = router1[i] - router0[i];
        doubled &= fabsf(router3[i] - (router1[i] + 2.0f * step)) <= 1e-6f * (1.0f + fabsf(step));
    }
    CHECK(doubled);
    CHECK(moe_cuda_backward(&c, &L.dev, NULL, 0, &info, NULL, NULL, &g, NULL, 0) ==
          MOE_STATUS_OK);   /* T = 0: nothing to do */
    cudaFree(fws); cudaFree(bws); cudaFree(y); cudaFree(dx);
}

/* Host-side refusals: named statuses, nothing queued or written. */
static void test_forward_contract(void) {
    use_schedule(0);
    moe_config c = moe_preset_mixtral();
    c.num_experts = 4; c.d_model = 8; c.d_ff = 16; c.shared_d_ff = 8;
    layer L;
    CHECK(make_layer(L, c, 6, 0, 9u));
    size_t pb = 0, wb = 0, b = 0;
    CHECK(moe_cuda_pack_size(&c, &pb) == MOE_STATUS_OK);
    CHECK(moe_cuda_forward_workspace_size(&c, L.T, &wb) == MOE_STATUS_OK);
    void *packed = dalloc(pb), *ws = dalloc(wb);
    moe_weights w = L.dev;
    CHECK(moe_cuda_pack_weights(&c, &w, packed, pb - 1) == MOE_STATUS_WORKSPACE_TOO_SMALL);
    CHECK(moe_cuda_pack_weights(&c, &w, packed, pb) == MOE_STATUS_OK);
    const size_t TD = (size_t)L.T * L.D;
    float *dx = (float *)L.put(L.x), *dy = (float *)dalloc(TD * 4), *dy2 = (float *)dalloc(TD * 4);
    moe_info info;
    memset(&info, 0, sizeof info);

    /* configs the GPU path does not run */
    moe_config u[8];
    u[0] = moe_preset_expert_choice(); u[1] = moe_preset_dense(); u[2] = moe_preset_soft_moe();
    u[3] = moe_preset_gshard(); u[4] = moe_preset_shazeer(); u[4].training = 1;   /* noise */
    u[5] = moe_preset_switch(); u[5].training = 1;   /* jitter */
    u[6] = moe_preset_mixtral(); u[6].capacity = 4; u[6].drop_policy = MOE_DROP_BPR;
    u[7] = moe_preset_mixtral(); u[7].num_experts = 300;
    for (int i = 0; i < 8; i++) {
        CHECK(moe_cuda_forward_workspace_size(&u[i], 4, &b) == MOE_STATUS_CUDA_UNSUPPORTED);
        CHECK(moe_cuda_pack_size(&u[i], &b) == MOE_STATUS_CUDA_UNSUPPORTED);
        CHECK(moe_cuda_forward(&u[i], &w, dx, 4, dy, NULL, ws, wb) == MOE_STATUS_CUDA_UNSUPPORTED);
    }
    u[4].training = 0;   /* Shazeer's noise is training-only: inference runs */
    CHECK(moe_cuda_pack_size(&u[4], &b) == MOE_STATUS_OK);
    u[4].save_for_backward = 1;   /* and so does an eval-mode forward that saves */
    CHECK(moe_cuda_pack_size(&u[4], &b) == MOE_STATUS_OK);

    /* weights, sizes, pointers */
    CHECK(moe_cuda_forward(&c, &w, dx, L.T, dy, NULL, ws, wb) == MOE_STATUS_MISSING_WEIGHT);
    w.packed = packed; w.packed_bytes = pb - 1;
    CHECK(moe_cuda_forward(&c, &w, dx, L.T, dy, NULL, ws, wb) == MOE_STATUS_BAD_PACKED);
    w.packed_bytes = pb;
    CHECK(moe_cuda_forward(&c, &w, dx, L.T, dy, &info, ws, wb - 1) ==
          MOE_STATUS_WORKSPACE_TOO_SMALL);
    CHECK(info.workspace_required == wb);
    CHECK(moe_cuda_forward(&c, &w, NULL, L.T, dy, NULL, ws, wb) == MOE_STATUS_NULL_ARGUMENT);
    CHECK(moe_cuda_forward(&c, &w, dx, -1, dy, NULL, ws, wb) == MOE_STATUS_BAD_DIMENSION);
    moe_config r = c;
    r.isa = MOE_ISA_REFERENCE;
    moe_weights w32 = L.dev;
    w32.down = NULL;
    CHECK(moe_cuda_forward(&r, &w32, dx, L.T, dy, NULL, ws, wb) == MOE_STATUS_MISSING_WEIGHT);
    w32 = L.dev;   /* quantized experts are moe.h's CPU forward only */
    w32.down_type = MOE_QTYPE_Q8_0; w32.down_q = w32.down;
    CHECK(moe_cuda_forward(&r, &w32, dx, L.T, dy, NULL, ws, wb) == MOE_STATUS_QUANT_UNSUPPORTED);
    CHECK(moe_cuda_pack_weights(&c, &w32, packed, pb) == MOE_STATUS_QUANT_UNSUPPORTED);
    w32 = L.dev;   /* a quantized shared expert too */
    w32.shared_up_type = MOE_QTYPE_Q4_0; w32.shared_up_q = w32.down;
    CHECK(moe_cuda_forward(&r, &w32, dx, L.T, dy, NULL, ws, wb) == MOE_STATUS_QUANT_UNSUPPORTED);

    /* overlaps: y with the workspace, an info array with y, the blob with a weight */
    CHECK(moe_cuda_forward(&c, &w, dx, L.T, (float *)ws, NULL, ws, wb) == MOE_STATUS_ALIASING);
    moe_info bad;
    memset(&bad, 0, sizeof bad);
    bad.scores = dy + 4;
    CHECK(moe_cuda_forward(&c, &w, dx, L.T, dy, &bad, ws, wb) == MOE_STATUS_ALIASING);
    CHECK(moe_cuda_pack_weights(&c, &w, (void *)L.dev.down, pb) == MOE_STATUS_ALIASING ||
          moe_cuda_pack_weights(&c, &w, (void *)L.dev.down, pb) == MOE_STATUS_BAD_PACKED);

    /* in place: the same bits as out of place */
    CHECK(moe_cuda_forward(&c, &w, dx, L.T, dy, NULL, ws, wb) == MOE_STATUS_OK);
    CHECK(moe_cuda_forward_result(ws, NULL) == MOE_STATUS_OK);
    up(dy2, L.x.data(), TD * 4);
    CHECK(moe_cuda_forward(&c, &w, dy2, L.T, dy2, NULL, ws, wb) == MOE_STATUS_OK);
    CHECK(moe_cuda_forward_result(ws, NULL) == MOE_STATUS_OK);
    CHECK(fetch(dy, TD) == fetch(dy2, TD));

    /* T = 0: a report and nothing else; a workspace no forward finished on */
    memset(&info, 0, sizeof info);
    info.aux_total = 5.0f;
    CHECK(moe_cuda_forward(&c, &w, NULL, 0, NULL, &info, ws, wb) == MOE_STATUS_OK);
    CHECK(moe_cuda_forward_result(ws, &info) == MOE_STATUS_OK);
    CHECK(info.slots == 2 && info.capacity == 0 && info.aux_total == 0.0f);
    void *fresh = dalloc(wb);
#ifdef CUDA_EMU
    CHECK(moe_cuda_forward_result(fresh, NULL) == MOE_STATUS_CUDA_ERROR);   /* NaN bytes */
#endif
    cudaMemset(fresh, 0, wb);   /* a GPU's fresh memory may hold an old report */
    CHECK(moe_cuda_forward_result(fresh, NULL) == MOE_STATUS_CUDA_ERROR);
    CHECK(moe_cuda_forward_result(NULL, NULL) == MOE_STATUS_NULL_ARGUMENT);
    cudaFree(fresh); cudaFree(ws); cudaFree(packed); cudaFree(dy); cudaFree(dy2);
}

int main(void) {
    static const emu_test tests[] = {{"grouped_gemm", test_grouped_gemm},
                                     {"dispatch", test_dispatch},
                                     {"route", test_route},
                                     {"forward", test_forward},
                                     {"forward_nonfinite", test_forward_nonfinite},
                                     {"forward_contract", test_forward_contract},
                                     {"backward", test_backward},
                                     {"backward_contract", test_backward_contract}};
    return run_tests("moe_cuda", tests, (int)(sizeof tests / sizeof tests[0]));
}
