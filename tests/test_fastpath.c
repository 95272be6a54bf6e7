/* What README's "Fast path" says runs as parallel tasks, checked through a
   counting cfg.parallel_for (it runs each list's tasks in order, on the
   calling thread, and counts the lists):
   - with the scalar reference (no SIMD flags, or cfg.isa = MOE_ISA_REFERENCE)
     a forward hands out exactly 3 task lists, top-k routing (token chunks),
     the gather into expert order and the combine; its router GEMM and expert
     FFNs run on the calling thread. Its backward's GEMMs are task lists;
   - with the build's SIMD ISA the forward hands out more (router GEMM and
     expert FFNs too);
   - a list under 2e6 flops (or element moves) runs on the calling thread:
     a small layer hands out none.
   The shape puts every list of the reference forward just over that bar:
   routing T*E*(8+K) = 2.6e6, gather T*K*D = 2.1e6, combine 2*T*K*D = 4.2e6;
   F = 4 keeps the scalar expert FFNs cheap.                                 */
#include "../moe.h"
#include "moe_test.h"

static int fastpath_lists;
static void fastpath_pool(void *user, int32_t n, moe_task_fn fn, void *arg) {
    int32_t i;
    (void)user;
    fastpath_lists++;
    for (i = 0; i < n; i++) fn(arg, i);
}

/* task lists of one forward (and, if backward_lists, one backward) */
static int fastpath_count(moe_isa isa, int32_t T, int *backward_lists) {
    enum { D = 256, F = 4, E = 64 };
    moe_config c = moe_preset_mixtral();
    moe_weights w = {0};
    moe_grads g = {0};
    moe_info info = {0};
    size_t i, nx = (size_t)T * D, nw = (size_t)E * F * D, ibytes = 0;
    float *x = (float *)malloc(3 * nx * sizeof(float)), *y = x + nx, *dx = y + nx;
    float *wt = (float *)malloc((2 * (size_t)E * D + 6 * nw) * sizeof(float));
    void *ibuf = NULL;
    int forward_lists = -1;
    c.d_model = D; c.d_ff = F; c.num_experts = E; c.isa = isa;
    c.parallel_for = fastpath_pool; c.training = backward_lists != NULL;
    c.save_for_backward = c.training;
    if (!x || !wt) goto done;
    for (i = 0; i < nx; i++) x[i] = (float)((i * 7919u) % 1000u) / 1000.0f - 0.5f;
    for (i = 0; i < (size_t)E * D; i++) wt[i] = (float)((i * 104729u) % 1000u) / 1000.0f - 0.5f;
    for (i = (size_t)E * D; i < (size_t)E * D + 3 * nw; i++) wt[i] = (float)((i * 31u) % 1000u) / 1e4f;
    memset(wt + (size_t)E * D + 3 * nw, 0, ((size_t)E * D + 3 * nw) * sizeof(float));
    w.router = wt; w.gate = wt + (size_t)E * D; w.up = w.gate + nw; w.down = w.up + nw;
    CHECK_STATUS(moe_info_size(&c, T, &ibytes), MOE_STATUS_OK);
    ibuf = malloc(ibytes);
    CHECK(ibuf != NULL);
    if (!ibuf) goto done;
    CHECK_STATUS(moe_info_bind(&c, T, &info, ibuf, ibytes), MOE_STATUS_OK);
    fastpath_lists = 0;
    CHECK_STATUS(moe_forward_alloc(&c, &w, x, T, y, &info), MOE_STATUS_OK);
    forward_lists = fastpath_lists;
    if (backward_lists) {
        g.router = wt + (size_t)E * D + 3 * nw; g.gate = g.router + (size_t)E * D; g.up = g.gate + nw; g.down = g.up + nw;
        fastpath_lists = 0;
        CHECK_STATUS(moe_backward_alloc(&c, &w, x, T, &info, x, dx, &g), MOE_STATUS_OK);
        *backward_lists = fastpath_lists;
    }
done:
    free(x); free(wt); free(ibuf);
    return forward_lists;
}

TEST(fastpath, reference_tasks) {
    int backward = 0;
    CHECK_INT(fastpath_count(MOE_ISA_REFERENCE, 4096, &backward), 3);
    CHECK(backward > 0);
    CHECK_INT(fastpath_count(MOE_ISA_REFERENCE, 16, NULL), 0);
}

TEST(fastpath, simd_tasks) {
    moe_config c = moe_preset_mixtral(), r;
    moe_config_resolve(&c, &r);
    if (r.isa == MOE_ISA_REFERENCE) SKIP("no SIMD ISA in this build");
    CHECK(fastpath_count(MOE_ISA_AUTO, 4096, NULL) > 3);
    CHECK_INT(fastpath_count(MOE_ISA_AUTO, 16, NULL), 0);
}
