/* moe_mpi.c -- expert parallelism over MPI with moe.h's moe_ep_* plan.
   P ranks; rank r owns a contiguous slice of the T tokens and experts
   [r*E/P, (r+1)*E/P). Per layer:
     forward:  moe_ep_route -> MPI_Alltoall(counts) + MPI_Allreduce(stats)
               -> moe_ep_pack -> MPI_Alltoallv(pairs, rows) -> moe_ep_expert_forward
               -> MPI_Alltoallv back (rows, dropped flags) -> moe_ep_combine
     backward: moe_ep_pack_backward -> MPI_Alltoallv(dout) -> moe_ep_expert_backward
               (expert gradients stay on the owner) -> MPI_Alltoallv back (dx)
               -> moe_ep_combine_backward; router gradients are summed by a
               chain in rank order (rank r adds its tokens onto rank r-1's sum),
               which reproduces one process's summation order bit for bit.
   Test mode (default): a few configs on the fp32 reference path, every rank
   checks its tokens' y, dx, routing, its experts' gradients and the router
   gradients bitwise against moe_forward / moe_backward run on all T tokens;
   the last line is "N passed, N failed" and the exit code is 1 on failure.
   Bench mode: --bench D F E K T REPS: median forward and forward+backward.
     build: mpicc -std=c99 -O2 examples/moe_mpi.c -o build/moe_mpi -lm
     run:   mpirun --oversubscribe --allow-run-as-root -np 4 build/moe_mpi      */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int rank, nranks;

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { fprintf(stderr, "out of memory\n"); MPI_Abort(MPI_COMM_WORLD, 2); }
    return p;
}
static float *fzeros(size_t n) { float *p = (float *)xmalloc(n * sizeof(float)); memset(p, 0, n * sizeof(float)); return p; }

#define CHECK_MOE(call) do { moe_status st_ = (call); if (st_ != MOE_STATUS_OK) { \
    fprintf(stderr, "rank %d: %s: %s\n", rank, #call, moe_status_string(st_)); MPI_Abort(MPI_COMM_WORLD, 3); } } while (0)

/* Deterministic inputs: every rank builds the same full tensors from a seed. */
static uint64_t rng_state;
static float frand(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) * (1.0 / 8388608.0)) - 1.0f;
}
static float *frandom(size_t n, float scale) {
    float *p = (float *)xmalloc(n * sizeof(float));
    size_t i;
    for (i = 0; i < n; i++) p[i] = scale * frand();
    return p;
}

/* The full layer: weights of all E experts (each rank reads its slice). */
typedef struct layer {
    moe_config cfg;
    int32_t T;
    float *router, *sel_bias, *gate, *up, *down;
} layer;

/* One rank's state for a layer: buffers sized for the worst case (every
   pair to one owner), allocated once, so a timed step does no malloc.    */
typedef struct ep_state {
    moe_config cfg;
    moe_ep_plan plan;
    moe_weights w_src, w_own;           /* router only / this rank's experts   */
    moe_grads g_own;                    /* this rank's expert gradients         */
    float *g_router;                    /* [E][D] router gradient (chained)     */
    moe_info info;
    void *info_buf, *ws, *ows;
    size_t ws_bytes, ows_bytes;
    int32_t nstats, *scnt, *rcnt, *sdsp, *rdsp, nsend, nrecv;
    double *stats, *stats_sum;
    moe_ep_pair *spairs, *rpairs;
    float *srows, *rrows, *oout, *rout, *ohid, *oup, *sdout, *rdout, *odx, *rdx;
    uint8_t *odrop, *rdrop;
    MPI_Datatype pair_t, row_t;
} ep_state;

static void ep_init(ep_state *s, const layer *l) {
    const moe_config *c = &l->cfg;
    const int32_t E = c->num_experts, D = c->d_model, F = c->d_ff, K = c->top_k, per = E / nranks;
    const int32_t T = l->T, base = T / nranks, extra = T % nranks;
    const size_t maxp = (size_t)T * K;
    moe_config icfg = *c;
    size_t bytes;
    memset(s, 0, sizeof *s);
    s->cfg = *c;
    s->plan.num_ranks = nranks; s->plan.rank = rank; s->plan.num_tokens = T;
    s->plan.local_tokens = base + (rank < extra);              /* uneven slices allowed */
    s->plan.token_offset = rank * base + (rank < extra ? rank : extra);
    s->w_src.router = l->router; s->w_src.selection_bias = l->sel_bias;
    s->w_own.gate = l->gate + (size_t)rank * per * F * D;
    s->w_own.up = l->up + (size_t)rank * per * F * D;
    s->w_own.down = l->down + (size_t)rank * per * D * F;
    s->g_own.gate = fzeros((size_t)per * F * D);
    s->g_own.up = fzeros((size_t)per * F * D);
    s->g_own.down = fzeros((size_t)per * D * F);
    s->g_router = fzeros((size_t)E * D);
    icfg.save_for_backward = 0;         /* routing arrays only: the owners hold the cache */
    CHECK_MOE(moe_info_size(&icfg, s->plan.local_tokens, &bytes));
    s->info_buf = xmalloc(bytes);
    CHECK_MOE(moe_info_bind(&icfg, s->plan.local_tokens, &s->info, s->info_buf, bytes));
    CHECK_MOE(moe_ep_workspace_size(c, &s->plan, &s->ws_bytes));
    s->ws = xmalloc(s->ws_bytes);
    CHECK_MOE(moe_ep_expert_workspace_size(c, &s->plan, (int32_t)maxp, &s->ows_bytes));
    s->ows = xmalloc(s->ows_bytes);
    CHECK_MOE(moe_ep_stats_count(c, &s->nstats));
    s->stats = (double *)xmalloc((size_t)s->nstats * sizeof(double));
    s->stats_sum = (double *)xmalloc((size_t)s->nstats * sizeof(double));
    s->scnt = (int32_t *)xmalloc(4 * (size_t)nranks * sizeof(int32_t));
    s->rcnt = s->scnt + nranks; s->sdsp = s->rcnt + nranks; s->rdsp = s->sdsp + nranks;
    s->spairs = (moe_ep_pair *)xmalloc(maxp * sizeof(moe_ep_pair));
    s->rpairs = (moe_ep_pair *)xmalloc(maxp * sizeof(moe_ep_pair));
    s->srows = fzeros(maxp * D); s->rrows = fzeros(maxp * D);
    s->oout = fzeros(maxp * D); s->rout = fzeros(maxp * D);
    s->ohid = fzeros(maxp * F); s->oup = fzeros(maxp * F);
    s->sdout = fzeros(maxp * D); s->rdout = fzeros(maxp * D);
    s->odx = fzeros(maxp * D); s->rdx = fzeros(maxp * D);
    s->odrop = (uint8_t *)xmalloc(maxp); s->rdrop = (uint8_t *)xmalloc(maxp);
    MPI_Type_contiguous((int)sizeof(moe_ep_pair), MPI_BYTE, &s->pair_t);
    MPI_Type_commit(&s->pair_t);
    MPI_Type_contiguous(D, MPI_FLOAT, &s->row_t);
    MPI_Type_commit(&s->row_t);
}

static void ep_free(ep_state *s) {
    MPI_Type_free(&s->pair_t); MPI_Type_free(&s->row_t);
    free(s->g_own.gate); free(s->g_own.up); free(s->g_own.down); free(s->g_router);
    free(s->info_buf); free(s->ws); free(s->ows); free(s->stats); free(s->stats_sum); free(s->scnt);
    free(s->spairs); free(s->rpairs); free(s->srows); free(s->rrows); free(s->oout); free(s->rout);
    free(s->ohid); free(s->oup); free(s->sdout); free(s->rdout); free(s->odx); free(s->rdx);
    free(s->odrop); free(s->rdrop);
}

/* Forward of this rank's tokens x -> y. */
static void ep_forward(ep_state *s, const float *x, float *y) {
    int32_t q;
    CHECK_MOE(moe_ep_route(&s->cfg, &s->w_src, &s->plan, x, &s->info, s->scnt, s->stats, s->ws, s->ws_bytes));
    MPI_Alltoall(s->scnt, 1, MPI_INT, s->rcnt, 1, MPI_INT, MPI_COMM_WORLD);
    MPI_Allreduce(s->stats, s->stats_sum, s->nstats, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    s->nsend = s->nrecv = 0;
    for (q = 0; q < nranks; q++) {
        s->sdsp[q] = s->nsend; s->nsend += s->scnt[q];
        s->rdsp[q] = s->nrecv; s->nrecv += s->rcnt[q];
    }
    CHECK_MOE(moe_ep_pack(&s->cfg, &s->plan, x, &s->info, s->scnt, s->spairs, s->srows));
    MPI_Alltoallv(s->spairs, s->scnt, s->sdsp, s->pair_t, s->rpairs, s->rcnt, s->rdsp, s->pair_t, MPI_COMM_WORLD);
    MPI_Alltoallv(s->srows, s->scnt, s->sdsp, s->row_t, s->rrows, s->rcnt, s->rdsp, s->row_t, MPI_COMM_WORLD);
    CHECK_MOE(moe_ep_expert_forward(&s->cfg, &s->w_own, &s->plan, s->rpairs, s->rrows, s->nrecv, s->oout,
                                    s->odrop, s->ohid, s->oup, s->ows, s->ows_bytes));
    MPI_Alltoallv(s->oout, s->rcnt, s->rdsp, s->row_t, s->rout, s->scnt, s->sdsp, s->row_t, MPI_COMM_WORLD);
    MPI_Alltoallv(s->odrop, s->rcnt, s->rdsp, MPI_UNSIGNED_CHAR, s->rdrop, s->scnt, s->sdsp, MPI_UNSIGNED_CHAR,
                  MPI_COMM_WORLD);
    CHECK_MOE(moe_ep_combine(&s->cfg, &s->plan, s->stats_sum, s->rout, s->rdrop, &s->info, y, s->ws, s->ws_bytes));
}

/* Backward of the last forward: dy -> dx; gradients accumulate. */
static void ep_backward(ep_state *s, const float *x, const float *dy, float *dx) {
    const size_t nr = (size_t)s->cfg.num_experts * (size_t)s->cfg.d_model;
    moe_grads gr;
    CHECK_MOE(moe_ep_pack_backward(&s->cfg, &s->plan, &s->info, dy, s->sdout));
    MPI_Alltoallv(s->sdout, s->scnt, s->sdsp, s->row_t, s->rdout, s->rcnt, s->rdsp, s->row_t, MPI_COMM_WORLD);
    CHECK_MOE(moe_ep_expert_backward(&s->cfg, &s->w_own, &s->plan, s->rpairs, s->rrows, s->nrecv, s->odrop,
                                     s->ohid, s->oup, s->rdout, s->odx, &s->g_own, s->ows, s->ows_bytes));
    MPI_Alltoallv(s->odx, s->rcnt, s->rdsp, s->row_t, s->rdx, s->scnt, s->sdsp, s->row_t, MPI_COMM_WORLD);
    /* router gradient: chain in rank order, then everyone gets the sum */
    if (rank > 0) MPI_Recv(s->g_router, (int)nr, MPI_FLOAT, rank - 1, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    memset(&gr, 0, sizeof gr);
    gr.router = s->g_router;
    CHECK_MOE(moe_ep_combine_backward(&s->cfg, &s->w_src, &s->plan, x, &s->info, s->stats_sum, dy, s->rout,
                                      s->rdx, dx, &gr, s->ws, s->ws_bytes));
    if (rank < nranks - 1) MPI_Send(s->g_router, (int)nr, MPI_FLOAT, rank + 1, 7, MPI_COMM_WORLD);
    MPI_Bcast(s->g_router, (int)nr, MPI_FLOAT, nranks - 1, MPI_COMM_WORLD);
}

static void layer_make(layer *l, const moe_config *c, int32_t T, uint64_t seed) {
    const size_t E = (size_t)c->num_experts, D = (size_t)c->d_model, F = (size_t)c->d_ff;
    l->cfg = *c; l->T = T;
    rng_state = seed;
    l->router = frandom(E * D, 0.5f);
    l->sel_bias = frandom(E, 0.05f);
    l->gate = frandom(E * F * D, 0.3f);
    l->up = frandom(E * F * D, 0.3f);
    l->down = frandom(E * D * F, 0.3f);
}
static void layer_free(layer *l) { free(l->router); free(l->sel_bias); free(l->gate); free(l->up); free(l->down); }

static int same(const void *a, const void *b, size_t n) { return n == 0 || memcmp(a, b, n) == 0; }

/* One test config: the reference on all T tokens on every rank, the EP run,
   and this rank's comparisons. Returns 1 if every rank agrees bitwise.    */
static int run_test(const char *name, moe_config cfg, int32_t T) {
    const int32_t E = cfg.num_experts, D = cfg.d_model, F = cfg.d_ff, K = cfg.top_k, per = E / nranks;
    layer l;
    ep_state s;
    moe_weights w;
    moe_grads g;
    moe_info info;
    void *ibuf;
    size_t ib;
    float *x, *dy, *y, *dx, *ye, *dxe;
    int bad = 0, all_bad = 0;
    double aux_err;
    cfg.training = 1; cfg.save_for_backward = 1;
    cfg.isa = MOE_ISA_REFERENCE;
    layer_make(&l, &cfg, T, 42);
    x = frandom((size_t)T * D, 1.0f);
    dy = frandom((size_t)T * D, 1.0f);

    /* one process, all T tokens */
    memset(&w, 0, sizeof w);
    w.router = l.router; w.selection_bias = l.sel_bias; w.gate = l.gate; w.up = l.up; w.down = l.down;
    memset(&g, 0, sizeof g);
    g.router = fzeros((size_t)E * D); g.gate = fzeros((size_t)E * F * D);
    g.up = fzeros((size_t)E * F * D); g.down = fzeros((size_t)E * D * F);
    memset(&info, 0, sizeof info);
    CHECK_MOE(moe_info_size(&cfg, T, &ib));
    ibuf = xmalloc(ib);
    CHECK_MOE(moe_info_bind(&cfg, T, &info, ibuf, ib));
    y = fzeros((size_t)T * D); dx = fzeros((size_t)T * D);
    CHECK_MOE(moe_forward_alloc(&cfg, &w, x, T, y, &info));
    CHECK_MOE(moe_backward_alloc(&cfg, &w, x, T, &info, dy, dx, &g));

    /* expert parallel */
    ep_init(&s, &l);
    {
        const size_t o = (size_t)s.plan.token_offset, n = (size_t)s.plan.local_tokens;
        ye = fzeros(n * D); dxe = fzeros(n * D);
        ep_forward(&s, x + o * D, ye);
        ep_backward(&s, x + o * D, dy + o * D, dxe);
        bad |= !same(y + o * D, ye, n * D * sizeof(float));
        bad |= !same(dx + o * D, dxe, n * D * sizeof(float)) << 1;
        bad |= !same(info.expert + o * K, s.info.expert, n * K * sizeof(int32_t)) << 2;
        bad |= !same(info.weight + o * K, s.info.weight, n * K * sizeof(float)) << 2;
        bad |= !same(info.dropped + o * K, s.info.dropped, n * K) << 2;
        bad |= !same(g.gate + (size_t)rank * per * F * D, s.g_own.gate, (size_t)per * F * D * sizeof(float)) << 3;
        bad |= !same(g.up + (size_t)rank * per * F * D, s.g_own.up, (size_t)per * F * D * sizeof(float)) << 3;
        bad |= !same(g.down + (size_t)rank * per * D * F, s.g_own.down, (size_t)per * D * F * sizeof(float)) << 3;
        bad |= !same(g.router, s.g_router, (size_t)E * D * sizeof(float)) << 4;
        /* aux values: double partial sums in another order, then rounded to float */
        aux_err = fabs((double)s.info.aux_total - info.aux_total);
        bad |= (aux_err > 1e-6 * fabs(info.aux_total) + 1e-9) << 5;
        free(ye); free(dxe);
    }
    MPI_Allreduce(&bad, &all_bad, 1, MPI_INT, MPI_BOR, MPI_COMM_WORLD);
    if (rank == 0)
        printf("%s %-40s T=%d P=%d dropped pairs %d, aux_total %.7g (one process %.7g)%s%s%s%s%s%s\n",
               all_bad ? "FAIL" : "ok  ", name, T, nranks, info.dropped_pairs, (double)s.info.aux_total,
               (double)info.aux_total, all_bad & 1 ? " y" : "", all_bad & 2 ? " dx" : "",
               all_bad & 4 ? " routing" : "", all_bad & 8 ? " expert-grads" : "",
               all_bad & 16 ? " router-grad" : "", all_bad & 32 ? " aux" : "");
    ep_free(&s);
    layer_free(&l);
    free(x); free(dy); free(y); free(dx); free(ibuf);
    free(g.router); free(g.gate); free(g.up); free(g.down);
    return !all_bad;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median forward and forward+backward seconds over reps steps (after one
   warm-up), the slowest rank's time per step.                           */
static void run_bench(int32_t D, int32_t F, int32_t E, int32_t K, int32_t T, int reps) {
    moe_config cfg = moe_preset_mixtral();
    layer l;
    ep_state s;
    double *tf = (double *)xmalloc((size_t)reps * sizeof(double)), *tb = (double *)xmalloc((size_t)reps * sizeof(double));
    float *x, *dy, *y, *dx;
    int i;
    cfg.num_experts = E; cfg.top_k = K; cfg.d_model = D; cfg.d_ff = F;
    cfg.training = 1; cfg.save_for_backward = 1;
    layer_make(&l, &cfg, T, 42);
    ep_init(&s, &l);
    x = frandom((size_t)s.plan.local_tokens * D, 1.0f);
    dy = frandom((size_t)s.plan.local_tokens * D, 1.0f);
    y = fzeros((size_t)s.plan.local_tokens * D); dx = fzeros((size_t)s.plan.local_tokens * D);
    for (i = -1; i < reps; i++) {
        double t0, t1, t2, a, b;
        MPI_Barrier(MPI_COMM_WORLD);
        t0 = MPI_Wtime();
        ep_forward(&s, x, y);
        t1 = MPI_Wtime();
        ep_backward(&s, x, dy, dx);
        t2 = MPI_Wtime();
        a = t1 - t0; b = t2 - t0;
        MPI_Allreduce(MPI_IN_PLACE, &a, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        MPI_Allreduce(MPI_IN_PLACE, &b, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        if (i >= 0) { tf[i] = a; tb[i] = b; }
    }
    qsort(tf, (size_t)reps, sizeof(double), cmp_double);
    qsort(tb, (size_t)reps, sizeof(double), cmp_double);
    if (rank == 0)
        printf("bench P=%d D=%d F=%d E=%d K=%d T=%d isa=%s reps=%d: forward %.2f ms, forward+backward %.2f ms "
               "(median); exchanged per layer and direction: %d rows of %d floats\n",
               nranks, D, F, E, K, T, cfg.isa == MOE_ISA_REFERENCE ? "reference" : "auto", reps,
               1e3 * tf[reps / 2], 1e3 * tb[reps / 2], T * K, D);
    ep_free(&s);
    layer_free(&l);
    free(tf); free(tb); free(x); free(dy); free(y); free(dx);
}

int main(int argc, char **argv) {
    int passed = 0, failed = 0;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    if (argc == 8 && strcmp(argv[1], "--bench") == 0) {
        run_bench(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atoi(argv[6]), atoi(argv[7]));
        MPI_Finalize();
        return 0;
    }
    if (8 % nranks != 0) {
        if (rank == 0) fprintf(stderr, "the test configs have 8 experts: run with 1, 2, 4 or 8 ranks\n");
        MPI_Finalize();
        return 2;
    }
    {
        moe_config c = moe_preset_mixtral();            /* softmax top-2, renormalised */
        c.num_experts = 8; c.top_k = 2; c.d_model = 32; c.d_ff = 48; c.z_loss_coef = 1e-3f;
        run_test("mixtral top-2 softmax, renormalised", c, 67) ? passed++ : failed++;

        c = moe_preset_switch();                         /* top-1, capacity, drops, aux */
        c.num_experts = 8; c.d_model = 32; c.d_ff = 48; c.capacity_factor = 1.0f;
        c.drop_policy = MOE_DROP_POSITION;
        run_test("switch top-1, capacity 1.0, position drops", c, 67) ? passed++ : failed++;

        c.drop_policy = MOE_DROP_BPR; c.capacity_factor = 0.8f;
        run_test("switch top-1, capacity 0.8, BPR drops", c, 64) ? passed++ : failed++;

        c = moe_preset_deepseek_v3();                    /* sigmoid, selection bias, groups */
        c.num_experts = 8; c.top_k = 3; c.n_group = 4; c.topk_group = 2; c.shared_d_ff = 0;
        c.d_model = 32; c.d_ff = 48; c.balance_loss = MOE_BALANCE_TOPK_NORMALIZED; c.balance_coef = 1e-2f;
        run_test("deepseek sigmoid, selection bias, groups", c, 67) ? passed++ : failed++;

        c = moe_preset_mixtral();                        /* weight policy, renormalise after drop */
        c.num_experts = 8; c.top_k = 2; c.d_model = 32; c.d_ff = 48;
        c.capacity_factor = 0.7f; c.drop_policy = MOE_DROP_WEIGHT; c.normalize_after_drop = 1;
        run_test("top-2, weight drops, normalize after drop", c, 64) ? passed++ : failed++;
    }
    if (rank == 0) printf("%d passed, %d failed\n", passed, failed);
    MPI_Finalize();
    return failed ? 1 : 0;
}
