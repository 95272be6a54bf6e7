/* The compiled SIMD ISA against the scalar reference: forward on packed
   and unpacked weights, backward, on odd shapes; determinism across thread
   counts and task orders; the packing API. In a build without a SIMD ISA
   (no -mavx2 / -mavx512f / NEON) AUTO is the reference and the comparisons
   are trivially equal; `make test` builds the suite once per ISA.          */
#include "../moe.h"
#include "moe_test.h"
#include <pthread.h>
#include <string.h>

/* Tolerance: the SIMD kernel sums each output in the same k order as the
   reference but with fused multiply-adds (one rounding per step instead of
   two) and, for accumulating GEMMs, adds C once at the end. Each product then
   differs by a few ulp of the running sum: for D, F <= 70 and O(1) values the
   worst relative difference seen is ~1e-6; 2e-5 relative + 2e-6 absolute
   (scaled by the output's magnitude) leaves a margin of 10x.              */
#define ISA_RTOL 2e-5
#define ISA_ATOL 2e-6

static uint32_t isa_seed;
static float isa_uniform(void) {
    isa_seed = isa_seed * 1664525u + 1013904223u;
    return (float)((isa_seed >> 8) * (1.0 / 16777216.0)) - 0.5f;
}
static float *isa_tensor(size_t n, float scale) {
    float *p = (float *)malloc((n ? n : 1) * sizeof(float));
    size_t i;
    for (i = 0; i < n; i++) p[i] = scale * isa_uniform();
    return p;
}

typedef struct isa_layer {
    moe_config c;
    moe_weights w;
    float *x, *dy;
    int32_t T;
} isa_layer;

static void isa_layer_make(isa_layer *L, moe_config c, int32_t T, uint32_t seed) {
    const size_t E = (size_t)c.num_experts, D = (size_t)c.d_model, F = (size_t)c.d_ff;
    const size_t Fs = (size_t)c.shared_d_ff;
    isa_seed = seed;
    memset(L, 0, sizeof *L);
    L->c = c; L->T = T;
    L->x = isa_tensor((size_t)T * D, 2.0f);
    L->dy = isa_tensor((size_t)T * D, 1.0f);
    L->w.router = isa_tensor(E * D, 1.0f);
    L->w.gate = isa_tensor(E * F * D, 0.5f);
    L->w.up = isa_tensor(E * F * D, 0.5f);
    L->w.down = isa_tensor(E * D * F, 0.5f);
    L->w.gate_bias = isa_tensor(E * F, 0.2f);
    L->w.up_bias = isa_tensor(E * F, 0.2f);
    L->w.down_bias = isa_tensor(E * D, 0.2f);
    L->w.shared_gate = isa_tensor(Fs * D, 0.5f);
    L->w.shared_up = isa_tensor(Fs * D, 0.5f);
    L->w.shared_down = isa_tensor(D * Fs, 0.5f);
    L->w.shared_gate_bias = isa_tensor(Fs, 0.2f);
    L->w.shared_up_bias = isa_tensor(Fs, 0.2f);
    L->w.shared_down_bias = isa_tensor(D, 0.2f);
    L->w.shared_expert_gate = isa_tensor(D, 0.5f);
    L->w.soft_phi = isa_tensor(E * (size_t)(c.slots_per_expert ? c.slots_per_expert : 1) * D, 1.0f);
}

static void isa_layer_free(isa_layer *L) {
    const float *p[] = {L->x, L->dy, L->w.router, L->w.gate, L->w.up, L->w.down, L->w.gate_bias,
                        L->w.up_bias, L->w.down_bias, L->w.shared_gate, L->w.shared_up,
                        L->w.shared_down, L->w.shared_gate_bias, L->w.shared_up_bias,
                        L->w.shared_down_bias, L->w.shared_expert_gate, L->w.soft_phi};
    size_t i;
    for (i = 0; i < sizeof p / sizeof p[0]; i++) free((void *)p[i]);
}

/* Largest |v| of an array, for a magnitude-scaled absolute tolerance. */
static double isa_scale(const float *v, size_t n) {
    double m = 1e-3;
    size_t i;
    for (i = 0; i < n; i++) if (fabs(v[i]) > m) m = fabs(v[i]);
    return m;
}
static void isa_check_close(const char *what, const float *got, const float *want, size_t n) {
    const double scale = isa_scale(want, n);
    size_t i;
    for (i = 0; i < n; i++)
        if (!(fabs((double)got[i] - want[i]) <= ISA_ATOL * scale + ISA_RTOL * fabs(want[i]))) {
            moe_test_fail(__FILE__, __LINE__, "%s[%zu] = %.9g, reference %.9g", what, i, (double)got[i], (double)want[i]);
            return;
        }
}

/* Forward + backward of one layer with a given ISA (and packed weights or not). */
typedef struct isa_run {
    float *y, *dx, *grads[7];
    moe_info info;
    void *info_buf;
    moe_status st;
} isa_run;

static void isa_run_layer(const isa_layer *L, moe_isa isa, int packed, int threads, isa_run *R) {
    moe_config c = L->c;
    moe_weights w = L->w;
    moe_grads g;
    const size_t E = (size_t)c.num_experts, D = (size_t)c.d_model, F = (size_t)c.d_ff, T = (size_t)L->T;
    size_t bytes = 0;
    void *pk = NULL;
    int i;
    c.isa = isa; c.training = 1; c.save_for_backward = 1; c.num_threads = threads;
    memset(R, 0, sizeof *R);
    R->y = (float *)calloc(T * D + 1, sizeof(float));
    R->dx = (float *)calloc(T * D + 1, sizeof(float));
    R->grads[0] = (float *)calloc(E * D, sizeof(float));
    R->grads[1] = (float *)calloc(E * F * D, sizeof(float));
    R->grads[2] = (float *)calloc(E * F * D, sizeof(float));
    R->grads[3] = (float *)calloc(E * D * F, sizeof(float));
    R->grads[4] = (float *)calloc(E * F, sizeof(float));
    R->grads[5] = (float *)calloc((size_t)c.shared_d_ff * D + 1, sizeof(float));
    R->grads[6] = (float *)calloc(E * (size_t)(c.slots_per_expert ? c.slots_per_expert : 1) * D, sizeof(float));
    if (packed) {
        moe_config r;
        CHECK_STATUS(moe_pack_size(&c, &bytes), MOE_STATUS_OK);
        pk = malloc(bytes);
        moe_config_resolve(&c, &r);
        if (r.isa == MOE_ISA_REFERENCE) {   /* no kernel here reads panels */
            CHECK_STATUS(moe_pack_weights(&c, &w, pk, bytes), MOE_STATUS_UNSUPPORTED);
        } else {
            CHECK_STATUS(moe_pack_weights(&c, &w, pk, bytes), MOE_STATUS_OK);
            w.packed = pk;
            w.packed_bytes = bytes;
        }
    }
    moe_info_size(&c, L->T, &bytes);
    R->info_buf = malloc(bytes);
    moe_info_bind(&c, L->T, &R->info, R->info_buf, bytes);
    R->st = moe_forward_alloc(&c, &w, L->x, L->T, R->y, &R->info);
    if (R->st == MOE_STATUS_OK) {
        memset(&g, 0, sizeof g);
        g.router = R->grads[0]; g.gate = R->grads[1]; g.up = R->grads[2]; g.down = R->grads[3];
        g.gate_bias = c.expert_bias ? R->grads[4] : NULL;
        g.shared_gate = c.shared_d_ff ? R->grads[5] : NULL;
        g.soft_phi = c.routing == MOE_ROUTING_SOFT ? R->grads[6] : NULL;
        R->st = moe_backward_alloc(&c, &w, L->x, L->T, &R->info, L->dy, R->dx, &g);
    }
    free(pk);
    (void)i;
}

static void isa_run_free(isa_run *R) {
    int i;
    free(R->y); free(R->dx); free(R->info_buf);
    for (i = 0; i < 7; i++) free(R->grads[i]);
}

static size_t isa_grad_len(const moe_config *c, int i) {
    const size_t E = (size_t)c->num_experts, D = (size_t)c->d_model, F = (size_t)c->d_ff;
    switch (i) {
    case 0: return E * D;
    case 1: case 2: case 3: return E * F * D;
    case 4: return c->expert_bias ? E * F : 0;
    case 5: return (size_t)c->shared_d_ff * D;
    default: return c->routing == MOE_ROUTING_SOFT ? E * (size_t)c->slots_per_expert * D : 0;
    }
}

/* ISA (packed and unpacked) against the reference: y, routing, dx, grads. */
static void isa_compare(moe_config c, int32_t T, uint32_t seed) {
    static const char *names[7] = {"d_router", "d_gate", "d_up", "d_down", "d_gate_bias", "d_shared_gate", "d_soft_phi"};
    isa_layer L;
    isa_run ref, fast;
    int packed, i;
    moe_config r;
    if (moe_config_resolve(&c, &r) != MOE_STATUS_OK) { moe_test_fail(__FILE__, __LINE__, "config"); return; }
    isa_layer_make(&L, c, T, seed);
    isa_run_layer(&L, MOE_ISA_REFERENCE, 0, 1, &ref);
    CHECK_STATUS(ref.st, MOE_STATUS_OK);
    for (packed = 0; packed <= 1; packed++) {
        isa_run_layer(&L, MOE_ISA_AUTO, packed, 0, &fast);
        CHECK_STATUS(fast.st, MOE_STATUS_OK);
        if (fast.st == MOE_STATUS_OK && ref.st == MOE_STATUS_OK) {
            const size_t TS = (size_t)T * (size_t)moe_routing_slots(&r);
            isa_check_close("y", fast.y, ref.y, (size_t)T * c.d_model);
            isa_check_close("dx", fast.dx, ref.dx, (size_t)T * c.d_model);
            /* routing is made of the logits: identical selections, since the
               test inputs keep every selection gap far above the tolerance */
            CHECK(TS == 0 || memcmp(fast.info.expert, ref.info.expert, TS * sizeof(int32_t)) == 0);
            CHECK(TS == 0 || memcmp(fast.info.dropped, ref.info.dropped, TS) == 0);
            for (i = 0; i < 7; i++) isa_check_close(names[i], fast.grads[i], ref.grads[i], isa_grad_len(&r, i));
        }
        isa_run_free(&fast);
    }
    isa_run_free(&ref);
    isa_layer_free(&L);
}

static moe_config isa_config(int32_t E, int32_t K, int32_t D, int32_t F, moe_activation act) {
    moe_config c;
    memset(&c, 0, sizeof c);
    c.num_experts = E; c.top_k = K; c.d_model = D; c.d_ff = F; c.activation = act;
    c.balance_coef = 0.01f; c.z_loss_coef = 0.001f;
    return c;
}

/* moe_compiled_isa is what AUTO resolves to, and what the compiler flags of
   this build select (the same conditions as moe.h's); every ISA has a name. */
TEST(isa, compiled_isa_and_names) {
    moe_config c = moe_preset_mixtral(), r;
    moe_isa want = MOE_ISA_REFERENCE;
    int i;
#if !defined(MOE_NO_SIMD) && defined(__AVX512F__)
    want = MOE_ISA_AVX512;
#elif !defined(MOE_NO_SIMD) && defined(__AVX2__) && defined(__FMA__)
    want = MOE_ISA_AVX2;
#elif !defined(MOE_NO_SIMD) && defined(__ARM_NEON) && defined(__aarch64__)
    want = MOE_ISA_NEON;
#endif
    CHECK(moe_compiled_isa() == want);
    c.isa = MOE_ISA_AUTO;
    CHECK(moe_config_resolve(&c, &r) == MOE_STATUS_OK && r.isa == want);
    CHECK(strcmp(moe_isa_name(MOE_ISA_AUTO), "auto") == 0);
    CHECK(strcmp(moe_isa_name(MOE_ISA_REFERENCE), "reference") == 0);
    CHECK(strcmp(moe_isa_name(MOE_ISA_AVX2), "avx2") == 0);
    CHECK(strcmp(moe_isa_name(MOE_ISA_AVX512), "avx512") == 0);
    CHECK(strcmp(moe_isa_name(MOE_ISA_NEON), "neon") == 0);
    CHECK(strcmp(moe_isa_name((moe_isa)99), "unknown") == 0);
    for (i = MOE_ISA_REFERENCE; i <= MOE_ISA_NEON; i++) {   /* another ISA is refused */
        c.isa = (moe_isa)i;
        CHECK((moe_config_resolve(&c, &r) == MOE_STATUS_OK) ==
               (i == MOE_ISA_REFERENCE || i == (int)want));
    }
}

/* Odd shapes: T in {0, 1, 2, 7, 63}, D and F off the vector width, K = E. */
TEST(isa, odd_shapes_match_reference) {
    static const int32_t Ts[] = {0, 1, 2, 7, 63};
    static const int32_t Ds[] = {1, 5, 17, 33};
    static const int32_t Fs[] = {3, 13, 40};
    size_t a, b, d;
    uint32_t seed = 1;
    for (a = 0; a < sizeof Ts / sizeof Ts[0]; a++)
        for (b = 0; b < sizeof Ds / sizeof Ds[0]; b++)
            for (d = 0; d < sizeof Fs / sizeof Fs[0]; d++) {
                moe_config c = isa_config(4, 2, Ds[b], Fs[d], (moe_activation)(seed % 7));
                isa_compare(c, Ts[a], seed++);
            }
    isa_compare(isa_config(3, 3, 19, 11, MOE_ACT_SWIGLU), 9, 101);       /* K = E */
    isa_compare(isa_config(1, 1, 16, 32, MOE_ACT_GELU), 5, 102);         /* E = 1 */
}

/* Shapes that take every backward GEMM through the packed path with more
   than one KC = 256 block of k: the inner dimension is D (da), the rows of
   an expert (weight gradients) or F (dx); ragged tiles on both edges; and
   with E >= 16 the router's two GEMMs (m = E rows, k = E). Both ways of
   packing B: up to MOE__FEW_ROWS = 288 rows each task packs its own B
   blocks (T = 100 below: da with k = D = 270 > 256), above it one pass
   packs all of B first (T = 300's da; D = 301's weight gradients, whose C
   tiles are prefetched, with a ragged last tile).                         */
TEST(isa, blocked_gemm_matches_reference) {
    isa_compare(isa_config(1, 1, 270, 40, MOE_ACT_SWIGLU), 300, 11);   /* k = D, k = rows > 256 */
    isa_compare(isa_config(1, 1, 270, 40, MOE_ACT_SWIGLU), 100, 15);   /* few tiles, k = D > 256 */
    isa_compare(isa_config(2, 2, 301, 24, MOE_ACT_SWIGLU), 40, 16);    /* m = D > 288 rows, accumulate */
    isa_compare(isa_config(2, 2, 40, 260, MOE_ACT_SILU), 20, 12);       /* k = F > 256, no GLU */
    isa_compare(isa_config(2, 1, 33, 70, MOE_ACT_GELU), 13, 13);        /* scalar activation */
    isa_compare(isa_config(20, 3, 40, 24, MOE_ACT_SWIGLU), 100, 14);    /* router GEMMs: E >= 16 */
}

/* T = 1000: long expert row blocks, tails of every kind, many tasks. */
TEST(isa, large_batch_matches_reference) {
    moe_config c = isa_config(8, 2, 37, 70, MOE_ACT_SWIGLU);
    isa_compare(c, 1000, 7);
}

/* A packed row block of more than MR rows whose panels span several tasks
   (moe__packed_task: tasks of MOE__PACKED_TASK_FLOPS), in both stages: one
   expert, a full 144-row block and a second block of 16 rows. AVX2: stage 1
   in 3 tasks of its 53 panels, stage 2 in 2 of 9, the last ragged (D = 136);
   AVX-512 (27 and 5 panels) and NEON (106 and 17) split both stages too.
   SIMD builds only: the reference has no packed tasks.                   */
TEST(isa, packed_tasks_split_panels) {
    moe_config c = isa_config(1, 1, 136, 424, MOE_ACT_SWIGLU), r;
    moe_config_resolve(&c, &r);
    if (r.isa == MOE_ISA_REFERENCE) SKIP("no SIMD ISA in this build");
    isa_compare(c, 160, 8);
}

/* Empty experts (one expert gets everything through its router bias), drops,
   biases, shared expert, fused-layout-free paths of every routing family.  */
TEST(isa, routing_families_match_reference) {
    moe_config c = isa_config(6, 2, 24, 20, MOE_ACT_GEGLU);
    c.expert_bias = 1; c.shared_d_ff = 12; c.shared_expert_gated = 1;
    isa_compare(c, 31, 11);
    c.capacity = 3;                                        /* drops */
    isa_compare(c, 31, 12);
    c.capacity = 0; c.routing = MOE_ROUTING_EXPERT_CHOICE; c.capacity_factor = 1.5f;
    isa_compare(c, 20, 13);
    c.capacity_factor = 0.0f; c.routing = MOE_ROUTING_DENSE;
    isa_compare(c, 9, 14);
    c.routing = MOE_ROUTING_SOFT; c.slots_per_expert = 2;
    c.shared_d_ff = 0; c.shared_expert_gated = 0;
    isa_compare(c, 9, 15);
    c = isa_config(8, 1, 20, 17, MOE_ACT_RELU);             /* experts without tokens */
    isa_compare(c, 3, 16);
}

/* --- determinism across threads and task order ----------------------------- */

/* A parallel_for that runs the tasks on two pthreads, interleaved, in reverse
   order: any dependence on schedule or thread count would show.           */
typedef struct isa_pf { moe_task_fn fn; void *arg; int32_t n, first; } isa_pf;
static void *isa_pf_thread(void *p) {
    isa_pf *a = (isa_pf *)p;
    int32_t i;
    for (i = a->n - 1 - a->first; i >= 0; i -= 2) a->fn(a->arg, i);
    return NULL;
}
static void isa_parallel_for(void *user, int32_t n, moe_task_fn fn, void *arg) {
    pthread_t th;
    isa_pf a, b;
    (void)user;
    a.fn = b.fn = fn; a.arg = b.arg = arg; a.n = b.n = n; a.first = 0; b.first = 1;
    pthread_create(&th, NULL, isa_pf_thread, &b);
    isa_pf_thread(&a);
    pthread_join(th, NULL);
}

TEST(isa, bitwise_identical_across_threads) {
    moe_config c = isa_config(8, 2, 40, 72, MOE_ACT_SWIGLU);
    isa_layer L;
    isa_run one, two;
    int i;
    c.shared_d_ff = 24;
    isa_layer_make(&L, c, 200, 21);
    isa_run_layer(&L, MOE_ISA_AUTO, 1, 1, &one);
    L.c.parallel_for = isa_parallel_for;
    isa_run_layer(&L, MOE_ISA_AUTO, 1, 2, &two);
    CHECK(memcmp(one.y, two.y, (size_t)200 * 40 * sizeof(float)) == 0);
    CHECK(memcmp(one.dx, two.dx, (size_t)200 * 40 * sizeof(float)) == 0);
    for (i = 0; i < 7; i++) {
        const size_t n = isa_grad_len(&c, i);
        CHECK(n == 0 || memcmp(one.grads[i], two.grads[i], n * sizeof(float)) == 0);
    }
    isa_run_free(&one); isa_run_free(&two);
    isa_layer_free(&L);
}

/* recompute = 1 redoes the expert FFNs on the ISA path; recompute = 0
   rebuilds ha from the cached pre-activations. Both must give the bits of
   the forward's epilogue (vector sigmoid on whole panels, its lane 0 on the
   ragged ones): F = 40 has both on every vector width.                    */
TEST(isa, recompute_bitwise_on_simd) {
    moe_activation acts[2] = {MOE_ACT_SWIGLU, MOE_ACT_SILU};
    int a, i;
    for (a = 0; a < 2; a++) {
        moe_config c = isa_config(4, 2, 33, 40, acts[a]);
        isa_layer L;
        isa_run cached, redone;
        c.shared_d_ff = 20;
        isa_layer_make(&L, c, 63, 41 + (uint32_t)a);
        isa_run_layer(&L, MOE_ISA_AUTO, 1, 0, &cached);
        L.c.recompute = 1;
        isa_run_layer(&L, MOE_ISA_AUTO, 1, 0, &redone);
        CHECK_STATUS(cached.st, MOE_STATUS_OK);
        CHECK_STATUS(redone.st, MOE_STATUS_OK);
        CHECK(memcmp(cached.dx, redone.dx, (size_t)63 * 33 * sizeof(float)) == 0);
        for (i = 0; i < 7; i++) {
            const size_t n = isa_grad_len(&c, i);
            CHECK(n == 0 || memcmp(cached.grads[i], redone.grads[i], n * sizeof(float)) == 0);
        }
        isa_run_free(&cached); isa_run_free(&redone);
        isa_layer_free(&L);
    }
}

/* Packed and unpacked weights run the same panels: bitwise the same y. */
TEST(isa, packed_equals_unpacked_bitwise) {
    moe_config c = isa_config(5, 2, 21, 35, MOE_ACT_SILU);
    isa_layer L;
    isa_run a, b;
    c.shared_d_ff = 9;
    isa_layer_make(&L, c, 40, 31);
    isa_run_layer(&L, MOE_ISA_AUTO, 0, 0, &a);
    isa_run_layer(&L, MOE_ISA_AUTO, 1, 0, &b);
    CHECK(memcmp(a.y, b.y, (size_t)40 * 21 * sizeof(float)) == 0);
    isa_run_free(&a); isa_run_free(&b);
    isa_layer_free(&L);
}

/* Experts of up to 16 rows on unpacked fp32 weights read their rows
   (moe__rowdot_simd) instead of packing per call: the same sums in the same
   order as the panels, so y, dx and every gradient are bitwise the packed
   run's, and close to the reference. Experts of 0, 1 and several rows, a
   shared expert, biases, every activation; D and F are no multiple of 16
   and D crosses the kernel's 64-column chunks with a ragged tail.         */
TEST(isa, few_rows_unpacked_equal_packed_bitwise) {
    static const moe_activation acts[4] = {MOE_ACT_SILU, MOE_ACT_SWIGLU, MOE_ACT_GELU,
                                           MOE_ACT_GEGLU};
    static const int32_t Ts[4] = {1, 3, 7, 21}, Ds[2] = {37, 131};
    int ia, it, id, i;
    for (ia = 0; ia < 4; ia++)
        for (id = 0; id < 2; id++)
            for (it = 0; it < 4; it++) {
                moe_config c = isa_config(8, 2, Ds[id], 35, acts[ia]);
                isa_layer L;
                isa_run a, b;
                const size_t n = (size_t)Ts[it] * (size_t)c.d_model;
                c.shared_d_ff = 19; c.expert_bias = 1;
                isa_layer_make(&L, c, Ts[it], 60u + (uint32_t)(ia * 8 + id * 4 + it));
                isa_run_layer(&L, MOE_ISA_AUTO, 0, 0, &a);
                isa_run_layer(&L, MOE_ISA_AUTO, 1, 0, &b);
                CHECK_STATUS(a.st, MOE_STATUS_OK);
                CHECK_STATUS(b.st, MOE_STATUS_OK);
                CHECK(memcmp(a.y, b.y, n * sizeof(float)) == 0);
                CHECK(memcmp(a.dx, b.dx, n * sizeof(float)) == 0);
                for (i = 0; i < 7; i++) {
                    const size_t g = isa_grad_len(&c, i);
                    CHECK(g == 0 || memcmp(a.grads[i], b.grads[i], g * sizeof(float)) == 0);
                }
                isa_run_free(&a); isa_run_free(&b);
                isa_layer_free(&L);
                isa_compare(c, Ts[it], 90u + (uint32_t)(ia * 8 + id * 4 + it));
            }
}

/* moe_pack_weights / moe_pack_size misuse, and a packed blob that does not
   fit the config -> BAD_PACKED (only the SIMD forward reads packed). */
TEST(isa, pack_api_errors) {
    moe_config c = isa_config(4, 2, 8, 12, MOE_ACT_SWIGLU), other, r;
    isa_layer L;
    size_t bytes = 0;
    void *pk;
    float y[8 * 3];
    isa_layer_make(&L, c, 3, 41);
    CHECK_STATUS(moe_pack_size(NULL, &bytes), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_pack_size(&c, NULL), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_pack_size(&c, &bytes), MOE_STATUS_OK);
    pk = malloc(bytes);
    moe_config_resolve(&c, &r);
    if (r.isa == MOE_ISA_REFERENCE) {
        free(pk);
        isa_layer_free(&L);
        SKIP("no SIMD ISA in this build (packing is refused: contract.pack_reference_refused)");
    }
    CHECK_STATUS(moe_pack_weights(&c, &L.w, pk, bytes - 1), MOE_STATUS_WORKSPACE_TOO_SMALL);
    CHECK_STATUS(moe_pack_weights(&c, &L.w, NULL, bytes), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_pack_weights(&c, NULL, pk, bytes), MOE_STATUS_NULL_ARGUMENT);
    CHECK_STATUS(moe_pack_weights(&c, &L.w, pk, bytes), MOE_STATUS_OK);
    other = c; other.d_ff = 13;                      /* a different shape */
    L.w.packed = pk;
    L.w.packed_bytes = bytes;
    moe_config_resolve(&c, &r);
    if (r.isa != MOE_ISA_REFERENCE) {
        CHECK_STATUS(moe_forward_alloc(&other, &L.w, L.x, 3, y, NULL), MOE_STATUS_BAD_PACKED);
        memset(pk, 0, 8);                            /* not a packed blob */
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, 3, y, NULL), MOE_STATUS_BAD_PACKED);
    }
    /* the reference ignores packed and needs the plain tensors */
    c.isa = MOE_ISA_REFERENCE;
    CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, 3, y, NULL), MOE_STATUS_OK);
    free(pk);
    isa_layer_free(&L);
}

/* fp32 -> bf16 -> fp32, round to nearest even (the packer's rounding). */
static float isa_bf16_round(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* bf16 activations (cfg.pack_bf16 = 2) against exact arithmetic. The inputs
   are chosen so that every fp32 sum in the first GEMM is exact: weights m/16
   (|m| <= 3: bf16 already), x = +-(1 + j/1024) / 2 or / 4 (11 significant
   bits, so rounding x to bf16 changes it), D = 37 terms. Then the hidden
   activation relu(gate.x) is the same in every kernel order, and so is its
   bf16 rounding; the second GEMM is compared with a 1e-5 tolerance, far
   below one bf16 step of an activation (2^-9 relative). With 1 (weights
   only) the same layer must match the unrounded activations. E = 1 (routing
   weight 1), no biases; D and F are odd (each panel's last row pair is half
   zero), 29 rows make full and ragged tiles over several panels.          */
TEST(isa, bf16_activations_exact) {
    enum { D = 37, F = 45, T = 29 };
    moe_config c = isa_config(1, 1, D, F, MOE_ACT_RELU), r;
    moe_weights w;
    static float x[T * D], gate[F * D], down[D * F], router[D], y[T * D], rx[T * D];
    static double want[T * D];
    double ha[F], scale;
    size_t i, bytes = 0;
    int mode, t, f, d, k, changed = 0;
    void *pk;
    moe_config_resolve(&c, &r);
    if (r.isa == MOE_ISA_REFERENCE) SKIP("no SIMD ISA in this build");
    isa_seed = 77;
    for (i = 0; i < (size_t)T * D; i++) {
        const float j = (float)(int)((isa_uniform() + 0.5f) * 1024.0f);   /* 0..1023 */
        x[i] = (isa_uniform() < 0.0f ? -1.0f : 1.0f) * (1.0f + j / 1024.0f) * (isa_uniform() < 0.0f ? 0.25f : 0.5f);
        changed += isa_bf16_round(x[i]) != x[i];
    }
    for (i = 0; i < (size_t)F * D; i++) gate[i] = (float)(int)lround(isa_uniform() * 6.0f) / 16.0f;
    for (i = 0; i < (size_t)D * F; i++) down[i] = (float)(int)lround(isa_uniform() * 6.0f) / 16.0f;
    for (i = 0; i < (size_t)D; i++) router[i] = isa_uniform();
    CHECK(changed > T * D / 2);                  /* most x are not bf16 numbers */
    memset(&w, 0, sizeof w);
    w.router = router; w.gate = gate; w.down = down;
    for (mode = 1; mode <= 2; mode++) {
        for (i = 0; i < (size_t)T * D; i++) rx[i] = mode == 2 ? isa_bf16_round(x[i]) : x[i];
        for (t = 0; t < T; t++) {
            for (f = 0; f < F; f++) {
                double hg = 0.0;                 /* exact: <= 21 significant bits */
                for (k = 0; k < D; k++) hg += (double)rx[t * D + k] * gate[f * D + k];
                ha[f] = hg > 0.0 ? hg : 0.0;
                if (mode == 2) ha[f] = isa_bf16_round((float)ha[f]);
            }
            for (d = 0; d < D; d++) {
                double s = 0.0;
                for (f = 0; f < F; f++) s += ha[f] * down[d * F + f];
                want[t * D + d] = s;
            }
        }
        c.pack_bf16 = mode;
        CHECK_STATUS(moe_pack_size(&c, &bytes), MOE_STATUS_OK);
        pk = malloc(bytes);
        CHECK_STATUS(moe_pack_weights(&c, &w, pk, bytes), MOE_STATUS_OK);
        w.packed = pk;
        w.packed_bytes = bytes;
        CHECK_STATUS(moe_forward_alloc(&c, &w, x, T, y, NULL), MOE_STATUS_OK);
        w.packed = NULL;
        scale = 1e-3;
        for (i = 0; i < (size_t)T * D; i++) if (fabs(want[i]) > scale) scale = fabs(want[i]);
        for (i = 0; i < (size_t)T * D; i++)
            if (fabs((double)y[i] - want[i]) > 1e-5 * scale) {
                moe_test_fail(__FILE__, __LINE__, "pack_bf16 = %d: y[%d] = %.9g, want %.9g", mode, (int)i,
                              (double)y[i], want[i]);
                break;
            }
        free(pk);
    }
    c.pack_bf16 = 3;
    CHECK_STATUS(moe_pack_size(&c, &bytes), MOE_STATUS_BAD_OPTION);
}

/* bf16 panels (cfg.pack_bf16): the SIMD forward equals the reference run on
   the bf16-rounded weights, within the fp32 tolerance, since the kernel
   widens each weight exactly and sums in fp32; and it is close to the fp32
   layer within bf16's 2^-8 relative weight error. The same blob with
   pack_bf16 = 2 (activations rounded too) stays within 3e-2 of it.       */
TEST(isa, bf16_packed_forward) {
    moe_config c = isa_config(6, 2, 37, 45, MOE_ACT_SWIGLU), r;
    isa_layer L;
    moe_weights rounded;
    float *gate, *up, *down, *sh_gate, *sh_up, *sh_down, *y_bf, *y_ref, *y_f32, *y_act;
    const size_t E = 6, D = 37, F = 45, Fs = 11, T = 29;
    size_t i, bytes = 0;
    void *pk;
    c.shared_d_ff = (int32_t)Fs;
    moe_config_resolve(&c, &r);
    if (r.isa == MOE_ISA_REFERENCE) SKIP("no SIMD ISA in this build");
    isa_layer_make(&L, c, (int32_t)T, 51);
    gate = (float *)malloc(E * F * D * sizeof(float)); up = (float *)malloc(E * F * D * sizeof(float));
    down = (float *)malloc(E * D * F * sizeof(float));
    sh_gate = (float *)malloc(Fs * D * sizeof(float)); sh_up = (float *)malloc(Fs * D * sizeof(float));
    sh_down = (float *)malloc(D * Fs * sizeof(float));
    for (i = 0; i < E * F * D; i++) { gate[i] = isa_bf16_round(L.w.gate[i]); up[i] = isa_bf16_round(L.w.up[i]); down[i] = isa_bf16_round(L.w.down[i]); }
    for (i = 0; i < Fs * D; i++) { sh_gate[i] = isa_bf16_round(L.w.shared_gate[i]); sh_up[i] = isa_bf16_round(L.w.shared_up[i]); sh_down[i] = isa_bf16_round(L.w.shared_down[i]); }
    rounded = L.w;
    rounded.gate = gate; rounded.up = up; rounded.down = down;
    rounded.shared_gate = sh_gate; rounded.shared_up = sh_up; rounded.shared_down = sh_down;
    y_bf = (float *)malloc(T * D * sizeof(float)); y_ref = (float *)malloc(T * D * sizeof(float));
    y_f32 = (float *)malloc(T * D * sizeof(float)); y_act = (float *)malloc(T * D * sizeof(float));
    c.pack_bf16 = 1;
    CHECK_STATUS(moe_pack_size(&c, &bytes), MOE_STATUS_OK);
    pk = malloc(bytes);
    CHECK_STATUS(moe_pack_weights(&c, &L.w, pk, bytes), MOE_STATUS_OK);
    {
        moe_weights w = L.w;
        moe_config f32 = c;
        w.packed = pk;
        w.packed_bytes = bytes;
        CHECK_STATUS(moe_forward_alloc(&c, &w, L.x, (int32_t)T, y_bf, NULL), MOE_STATUS_OK);
        f32.pack_bf16 = 0;                       /* a bf16 blob under an fp32 config */
        CHECK_STATUS(moe_forward_alloc(&f32, &w, L.x, (int32_t)T, y_f32, NULL), MOE_STATUS_BAD_PACKED);
        f32.pack_bf16 = 2;                       /* the same blob, bf16 activations too */
        CHECK_STATUS(moe_forward_alloc(&f32, &w, L.x, (int32_t)T, y_act, NULL), MOE_STATUS_OK);
    }
    c.isa = MOE_ISA_REFERENCE;
    CHECK_STATUS(moe_forward_alloc(&c, &rounded, L.x, (int32_t)T, y_ref, NULL), MOE_STATUS_OK);
    isa_check_close("y bf16 vs reference on rounded weights", y_bf, y_ref, T * D);
    CHECK_STATUS(moe_forward_alloc(&c, &L.w, L.x, (int32_t)T, y_f32, NULL), MOE_STATUS_OK);
    {
        const double scale = isa_scale(y_f32, T * D);
        size_t moved = 0;
        for (i = 0; i < T * D; i++) CHECK(fabs((double)y_bf[i] - y_f32[i]) <= 2e-2 * scale);
        for (i = 0; i < T * D; i++) {            /* GLU and shared expert with pack_bf16 = 2 */
            CHECK(fabs((double)y_act[i] - y_f32[i]) <= 3e-2 * scale);
            moved += y_act[i] != y_bf[i];
        }
        CHECK(moved > T * D / 2);                /* the activations were rounded */
    }
    free(pk); free(gate); free(up); free(down); free(sh_gate); free(sh_up); free(sh_down);
    free(y_bf); free(y_ref); free(y_f32); free(y_act);
    isa_layer_free(&L);
}
