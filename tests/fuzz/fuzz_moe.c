/* fuzz_moe.c -- libFuzzer harness for moe.h (issue 8: hardening).

   Decodes arbitrary bytes into a moe_config (every enum and field, including
   out-of-range values), bounded shapes (T <= 64, D, F, Fs <= 32, E <= 16,
   P <= 3), weights, inputs, router logits and an upstream gradient, then calls
   moe_config_resolve, the four size queries, moe_info_size / moe_info_bind,
   moe_route, moe_forward (workspace, bound-info and _alloc forms) and, after a
   forward, moe_backward (workspace and _alloc forms, cache and recompute).
   Every ISA value that moe_config_resolve accepts is run and compared with
   MOE_ISA_REFERENCE.

   Properties (a violation prints the decoded case and aborts, so libFuzzer
   keeps the input):
     P1  no crash, no hang, no read or write outside a buffer: every buffer,
         workspace and info array is malloc'ed at exactly its documented size
         (ASan / valgrind see one element too many); tensors the config does
         not use are 0-byte allocations, so reading them is caught too.
     P2  every call returns a moe_status; the size queries, resolve and the
         calls agree on a config-level error; a workspace one byte short gives
         WORKSPACE_TOO_SMALL with workspace_required = the query (T > 0: T = 0
         needs no workspace).
     P3  NaN / Inf policy: OK implies the router inputs (x, router weights and
         bias, selection bias, noise weights, Soft MoE phi and scale, the
         logits given to moe_route) were finite and the reported logits are
         finite; in the finite value classes (every |value| <= 4 and bounded
         config scalars, so no overflow is possible) a valid config always
         returns OK, and OK means finite y, scores, weights, aux losses, dx
         and gradients.
     P4  determinism: two calls on workspaces filled with different garbage,
         the workspace vs the _alloc form, separate vs moe_info_bind'ed info
         arrays, and (backward) cache vs recompute are bitwise identical.
     P5  routing invariants: expert indices in range, drop flags known,
         dropped_pairs / dropped_tokens / expert_kept match the arrays, kept
         pairs <= capacity, a token with no kept pair and no shared expert
         has y = 0 exactly; moe_route on the forward's logits reproduces the
         forward's routing bitwise.
     P6  every other ISA that resolves OK returns the reference's status and,
         when both succeed, agrees with it within ISA_ATOL_REL / ISA_RTOL (see
         below; tokens whose routing differs, e.g. a near-tie flipped by a
         different summation order, are compared on logits only).
     P7  size-only mode (H_MODE bit 2; size_only): dimensions up to INT32_MAX,
         nothing allocated. The size queries run without int overflow (UBSan);
         moe_pack_size equals the packed layout's bytes (SIZE_OVERFLOW exactly
         when they exceed SIZE_MAX), moe_info_size brackets the documented
         arrays, and the route, forward and backward workspaces nest.

   Builds:
     make fuzz              clang -fsanitize=fuzzer,address,undefined, runs
                            FUZZ_SECONDS (default 60) from tests/fuzz/corpus
     make test-fuzz-corpus  gcc -fsanitize=address,undefined -DFUZZ_STANDALONE:
                            main() replays the files (or directories) named on
                            the command line
     fuzz_moe --make-seeds DIR   (standalone build) writes the seed corpus

   Input layout: a header of H_COUNT bytes (see enum hdr; missing bytes read
   as 0, and 0 is always a sensible default), then two bytes (pattern,
   amplitude) per tensor, then a poke count and 4 bytes per poke (tensor,
   index lo, index hi, value code). Bytes >= 240 in a config field select
   an invalid value for it.                                                  */
#if defined(FUZZ_STANDALONE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L   /* opendir, stat (replay of corpus directories) */
#endif
#define MOE_IMPLEMENTATION
#include "../../moe.h"

#include <float.h>
#include <pthread.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Bounds of the decoded shapes. */
enum { MAX_T = 64, MAX_E = 16, MAX_D = 32, MAX_F = 32, MAX_FS = 32, MAX_P = 3 };
/* Work cap: T is reduced until T * S * (F + Fs) * D <= WORK_CAP, which keeps
   one input well under 50 ms under ASan (dense E = 16, F = D = 32: T <= 32). */
#define WORK_CAP (1L << 19)
/* Finite value classes: every tensor value and poke has |v| <= FIN_AMP; with
   D, F <= 32 the largest expert output is about 32 * 4 * (32 * 16 + 4)^2 ~ 3e7
   and the largest gradient ~ 1e13: far from FLT_MAX, so OK must mean finite. */
#define FIN_AMP 4.0f
/* Fast ISA vs reference (P6): kernels may reorder fp32 sums of at most
   2 * 32 terms (plus FMA contraction): error <~ 64 * 2^-24 * sum|terms| ~
   4e-6 sum|terms|. sum|terms| can exceed max|ref| through cancellation, so
   allow 25x that relative to the array's largest magnitude, plus 1e-4
   relative per element; ISA_ATOL_ABS forgives flush-to-zero of denormals. */
#define ISA_ATOL_REL 1e-4
#define ISA_RTOL 1e-4
#define ISA_ATOL_ABS 1e-30
/* Gradients sum over up to T*S = 1024 rows (weight gradients) in a different
   association (accumulating GEMMs add C once at the end): 10x the forward's. */
#define ISA_GRAD_ATOL_REL 1e-3
#define ISA_GRAD_RTOL 1e-3
/* Inputs that once exposed moe.h bugs (fixed in 0.3.1) or harness false
   alarms stay in the seed corpus as tests/fuzz/corpus/regress_*. */

/* --- byte reader ----------------------------------------------------------- */

enum hdr {
    H_MODE, H_T, H_E, H_D, H_F, H_K, H_ROUTING, H_SCORE, H_ACT, H_NORM, H_NOISE, H_SECOND,
    H_DROP, H_FORMULA, H_BALANCE, H_ISA, H_FLAGS, H_FLAGS2, H_NGROUP, H_TOPKG, H_GST, H_CAP,
    H_CF, H_FS, H_P, H_SEQLEN, H_SEED, H_NORMP, H_NORMEPS, H_THR, H_RSCALE, H_NEPS, H_JITTER,
    H_BAL, H_Z, H_IMP, H_LOAD, H_SEQ, H_CLIP, H_SCALE, H_MISSING, H_WSOFF, H_THREADS, H_PACK,
    H_WARM, H_DROPOUT, H_CLIPNORM, H_INIT, H_COUNT
};
/* H_THREADS: bits 0-1 num_threads (0..2, 3 -> -1 invalid when bit 3 set),
   bit 2 cfg.parallel_for = a two-pthread runner.
   H_PACK % 8: 0-3 plain weights; 4-5 w.packed from moe_pack_weights; 6 the
   same with gate/up/down (routed and shared) NULL; 7 w.packed not made for
   this config (bit 3: packed for another d_ff, else garbage bytes); bit 4:
   cfg.pack_bf16.
   H_WARM / H_DROPOUT: cfg.router_noise_std / expert_dropout. H_CLIPNORM, H_INIT:
   max_norm of moe_grads_clip_norm and the scheme of moe_init_weights. */
enum { PK_NONE = 0, PK_GOOD = 4, PK_ONLY = 6, PK_BAD = 7 };
/* H_FLAGS bits (F_TRAINING: cfg.training and cfg.save_for_backward) */
enum { F_EXPERT_BIAS = 1, F_ROUTER_BIAS = 2, F_SEL_BIAS = 4, F_SHARED_GATE = 8,
       F_MASK_ZERO = 16, F_NORM_AFTER_DROP = 32, F_TRAINING = 64, F_RECOMPUTE = 128 };
/* H_FLAGS2 bits */
enum { F2_FUSED = 1, F2_SCALE = 2 };
/* value classes (H_MODE & 3): 0-2 finite, 3 special (NaN / Inf / huge).
   H_MODE bit 2: size-only mode (size_only): dimensions up to INT32_MAX, only
   the size queries run. */
enum { VC_SPECIAL = 3 };

/* Tensors, in the order of their fill bytes. */
enum tensor {
    X_X, X_ROUTER, X_RBIAS, X_SBIAS, X_RNOISE, X_GATE, X_UP, X_DOWN, X_GBIAS, X_UBIAS, X_DBIAS,
    X_SH_GATE, X_SH_UP, X_SH_DOWN, X_SH_GBIAS, X_SH_UBIAS, X_SH_DBIAS, X_SH_EGATE, X_PHI,
    X_LOGITS, X_NLOGITS, X_DY, NT
};
static const char *tensor_name[NT] = {
    "x", "router", "router_bias", "selection_bias", "router_noise", "gate", "up", "down",
    "gate_bias", "up_bias", "down_bias", "shared_gate", "shared_up", "shared_down",
    "shared_gate_bias", "shared_up_bias", "shared_down_bias", "shared_expert_gate", "soft_phi",
    "route_logits", "route_noise_logits", "dy"};

typedef struct reader { const uint8_t *p; size_t n, i; } reader;
static uint8_t rd8(reader *r) { return r->i < r->n ? r->p[r->i++] : 0; }

/* In-range value b % n, or (b >= 240) one of the invalid ones. */
static int32_t pick(uint8_t b, int32_t n, const int32_t *bad, int nbad) {
    return b < 240 ? (int32_t)(b % n) : bad[b % nbad];
}
static float pickf(uint8_t b, const float *good, int ngood, const float *bad, int nbad) {
    return b < 240 ? good[b % ngood] : bad[b % nbad];
}

/* --- the decoded case ---------------------------------------------------------- */

typedef struct fcase {
    int vclass, special;
    moe_config c;
    int32_t T;
    int fused, missing, ws_off, pack_mode;
    float scale;
    int has_scale;
    void *packed;          /* w.packed of wp, exact size */
    float *rounded[6];     /* bf16-rounded gate, up, down, shared gate, up, down */
    moe_weights wr;        /* w with those (pack_bf16: what the packed forward computes) */
    float max_norm;
    int init_scheme;
    moe_weights wp;        /* w with packed set (PK_GOOD / PK_ONLY / PK_BAD) */
    /* clamped sizes used for allocation */
    size_t E, D, F, Fs, P, R, Tn;
    float *t[NT];
    size_t n[NT];
    moe_weights w;
} fcase;

static fcase *g_case;   /* for the violation report */
static int g_verbose;   /* FUZZ_VERBOSE=1 (standalone): one line per input */

static void report_case(const fcase *k) {
    const moe_config *c = &k->c;
    fprintf(stderr,
            "  case: T=%d E=%d K=%d D=%d F=%d Fs=%d P=%d routing=%d score=%d act=%d norm=%d noise=%d\n"
            "        second=%d drop=%d formula=%d balance=%d isa=%d expert_bias=%d router_bias=%d\n"
            "        selection_bias=%d shared_expert_gated=%d n_group=%d topk_group=%d gst=%d mask0=%d\n"
            "        after_drop=%d training=%d save=%d recompute=%d capacity=%d cf=%g seq_len=%d seed=%llu\n"
            "        norm_p=%g norm_eps=%g thr=%g scale=%g noise_eps=%g jitter=%g coefs=%g,%g,%g,%g,%g\n"
            "        clip=%g fused=%d soft_scale=%s%g missing=%d vclass=%d\n",
            (int)k->T, (int)c->num_experts, (int)c->top_k, (int)c->d_model, (int)c->d_ff,
            (int)c->shared_d_ff, (int)c->slots_per_expert, (int)c->routing, (int)c->score,
            (int)c->activation, (int)c->normalize, (int)c->noise, (int)c->second_expert,
            (int)c->drop_policy, (int)c->capacity_formula, (int)c->balance_loss, (int)c->isa,
            (int)c->expert_bias, (int)c->router_bias, (int)c->selection_bias,
            (int)c->shared_expert_gated,
            (int)c->n_group, (int)c->topk_group, (int)c->group_score_top, (int)c->group_mask_zero,
            (int)c->normalize_after_drop, (int)c->training, (int)c->save_for_backward,
            (int)c->recompute, (int)c->capacity,
            (double)c->capacity_factor, (int)c->seq_len, (unsigned long long)c->seed,
            (double)c->norm_p, (double)c->norm_eps, (double)c->second_threshold,
            (double)c->routed_scale, (double)c->noise_epsilon, (double)c->jitter,
            (double)c->balance_coef, (double)c->z_loss_coef, (double)c->importance_coef,
            (double)c->load_coef, (double)c->seq_balance_coef, (double)c->router_grad_clip,
            k->fused, k->has_scale ? "" : "(none) ", (double)k->scale, k->missing, k->vclass);
    {
        int i;
        fprintf(stderr, "  tensors (elements, non-finite, max |v|):");
        for (i = 0; i < NT; i++) {
            size_t j, bad = 0;
            double m = 0.0;
            for (j = 0; j < k->n[i]; j++) {
                const float v = k->t[i][j];
                if (!(v - v == 0.0f)) bad++;
                else if (fabs((double)v) > m) m = fabs((double)v);
            }
            fprintf(stderr, "%s %s %zu %zu %g", i % 4 ? "," : "\n   ", tensor_name[i], k->n[i], bad, m);
        }
        fputc('\n', stderr);
    }
}

#define REQUIRE(cond) \
    do { if (!(cond)) violation(__LINE__, #cond); } while (0)
static void violation(int line, const char *what) {
    fprintf(stderr, "fuzz_moe: property violated (fuzz_moe.c:%d): %s\n", line, what);
    if (g_case) report_case(g_case);
    abort();
}

/* --- helpers -------------------------------------------------------------------- */

static void *xmalloc(size_t bytes) {   /* exact size: malloc(0) is a valid 0-byte block */
    void *p = malloc(bytes);
    if (!p && bytes) { fprintf(stderr, "fuzz_moe: out of memory\n"); abort(); }
    return p;
}
static void *xcalloc(size_t n, size_t elem) {
    void *p = xmalloc(n * elem);
    if (n) memset(p, 0, n * elem);
    return p;
}
static int finite_f(float v) { return v == v && v - v == 0.0f; }
static int all_finite(const float *a, size_t n) {
    size_t i;
    if (!a) return 1;
    for (i = 0; i < n; i++) if (!finite_f(a[i])) return 0;
    return 1;
}
static int same_bytes(const void *a, const void *b, size_t n) {
    if (n == 0) return 1;
    if (!a || !b) return a == b;
    return memcmp(a, b, n) == 0;
}
static uint32_t lcg(uint32_t *s) { *s = *s * 1664525u + 1013904223u; return *s >> 8; }
static float unit(uint32_t *s) { return (float)(lcg(s) * (1.0 / 16777216.0)) * 2.0f - 1.0f; } /* [-1, 1) */

/* Tensor fill: pattern (b0) and amplitude (b1). All finite, |v| <= FIN_AMP,
   except pattern 6 (|v| ~ 1e30) in the special class. */
static void fill(float *a, size_t n, uint8_t b0, uint8_t b1, uint32_t seed, int special) {
    static const float amps[4] = {0.01f, 0.25f, 1.0f, FIN_AMP};
    const float amp = amps[b1 & 3];
    uint32_t s = seed * 2654435761u + b1 * 40503u + 1u;
    size_t i;
    int pat = b0 % (special ? 7 : 6);
    for (i = 0; i < n; i++) {
        float v;
        switch (pat) {
        case 0: v = amp * unit(&s); break;                                  /* uniform */
        case 1: { static const float k[6] = {0.0f, 1.0f, -1.0f, 0.5f, 4.0f, -4.0f};
                  v = k[(b1 >> 2) % 6]; break; }                               /* constant: ties */
        case 2: v = amp * (float)((int)(lcg(&s) % 3u) - 1); break;           /* {-a, 0, a}   */
        case 3: v = (float)((int)(lcg(&s) % 2001u) - 1000) * 1e-41f; break; /* denormals    */
        case 4: v = (i & 1) ? -amp : amp; break;                              /* max magnitude */
        case 5: v = unit(&s) * 1e-30f; break;                                 /* tiny normals */
        default: v = unit(&s) * 1e30f; break;                                 /* huge (special) */
        }
        a[i] = v;
    }
}

/* Poke values: finite ones (|v| <= FIN_AMP, denormals, FLT_MIN) and, in the
   special class, NaN / Inf / huge. */
static float poke_value(uint8_t b, int special) {
    static const float fin[8] = {0.0f, FIN_AMP, -FIN_AMP, 1.4e-45f, -3e-39f, 1.17549435e-38f, 2.5f, -1e-3f};
    if (special && (b & 1)) {
        const float sp[8] = {NAN, INFINITY, -INFINITY, 1e30f, -1e30f, FLT_MAX, -FLT_MAX, 1e20f};
        return sp[(b >> 1) % 8];
    }
    return fin[(b >> 1) % 8];
}

/* fp32 -> bf16 -> fp32, round to nearest even; NaN stays NaN (cfg.pack_bf16). */
static float bf16_round(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) u |= 0x00400000u;          /* quiet NaN */
    else u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* --- cfg.parallel_for: two pthreads, tasks interleaved in reverse order ------------ */

static int g_pf_user;   /* cfg.parallel_user must come back unchanged */
typedef struct pf_half { moe_task_fn fn; void *arg; int32_t n, first; } pf_half;
static void *pf_thread(void *p) {
    const pf_half *a = (const pf_half *)p;
    int32_t i;
    for (i = a->n - 1 - a->first; i >= 0; i -= 2) a->fn(a->arg, i);
    return NULL;
}
static void fuzz_parallel_for(void *user, int32_t n, moe_task_fn fn, void *arg) {
    pthread_t th;
    pf_half a, b;
    if (user != &g_pf_user || n < 1 || !fn) { fprintf(stderr, "fuzz_moe: bad parallel_for call\n"); abort(); }
    a.fn = b.fn = fn; a.arg = b.arg = arg; a.n = b.n = n; a.first = 0; b.first = 1;
    if (n == 1 || pthread_create(&th, NULL, pf_thread, &b) != 0) {
        int32_t i;
        for (i = 0; i < n; i++) fn(arg, i);
        return;
    }
    pf_thread(&a);
    pthread_join(th, NULL);
}

/* --- decoding ------------------------------------------------------------------- */

static void decode(fcase *k, const uint8_t *data, size_t size) {
    uint8_t h[H_COUNT];
    reader r;
    moe_config *c = &k->c;
    int32_t E, K, D, F, ng, gsz, i;
    size_t j;
    memset(k, 0, sizeof *k);
    memset(h, 0, sizeof h);
    memcpy(h, data, size < H_COUNT ? size : H_COUNT);
    r.p = data; r.n = size; r.i = H_COUNT < size ? H_COUNT : size;

    k->vclass = h[H_MODE] & 3;
    k->special = k->vclass == VC_SPECIAL;
    memset(c, 0, sizeof *c);

    { static const int32_t bad[2] = {-1, -7}; k->T = h[H_T] >= 250 ? bad[h[H_T] & 1] : h[H_T] % (MAX_T + 1); }
    { static const int32_t bad[2] = {0, -3};  E = h[H_E] >= 250 ? bad[h[H_E] & 1] : 1 + h[H_E] % MAX_E; }
    { static const int32_t bad[2] = {0, -1};  D = h[H_D] >= 250 ? bad[h[H_D] & 1] : 1 + h[H_D] % MAX_D; }
    { static const int32_t bad[2] = {0, -2};  F = h[H_F] >= 250 ? bad[h[H_F] & 1] : 1 + h[H_F] % MAX_F; }
    c->num_experts = E; c->d_model = D; c->d_ff = F;
    {
        static const int32_t bad[4] = {-1, 99, -2147483647 - 1, 2147483647};
        c->routing = (moe_routing)pick(h[H_ROUTING], 4, bad, 4);
        c->score = (moe_score_func)pick(h[H_SCORE], 2, bad, 4);
        c->activation = (moe_activation)pick(h[H_ACT], 7, bad, 4);
        c->normalize = (moe_norm)pick(h[H_NORM], 3, bad, 4);
        c->drop_policy = (moe_drop_policy)pick(h[H_DROP], 3, bad, 4);
        c->capacity_formula = (moe_capacity_formula)pick(h[H_FORMULA], 8, bad, 4);
        c->balance_loss = (moe_balance_loss)pick(h[H_BALANCE], 3, bad, 4);
        c->isa = (moe_isa)pick(h[H_ISA], 5, bad, 4);
    }
    {   /* K: 1..E, or 0 / E + 1 / -1 */
        int32_t bad[3];
        bad[0] = 0; bad[1] = E + 1; bad[2] = -1;
        K = h[H_K] < 240 ? 1 + h[H_K] % (E > 0 ? E : 1) : bad[h[H_K] % 3];
        c->top_k = K;
    }
    {   /* second expert and noise only where they are valid, unless >= 240 */
        static const int32_t bad[2] = {5, -1};
        const int topk = c->routing == MOE_ROUTING_TOPK;
        if (h[H_SECOND] >= 240) c->second_expert = (moe_second_expert)bad[h[H_SECOND] & 1];
        else if (h[H_SECOND] >= 200) c->second_expert = (moe_second_expert)(h[H_SECOND] % 3); /* maybe invalid */
        else c->second_expert = (moe_second_expert)(topk && K == 2 ? h[H_SECOND] % 3 : 0);
        if (h[H_NOISE] >= 240) c->noise = (moe_noise)bad[h[H_NOISE] & 1];
        else c->noise = (moe_noise)(topk || h[H_NOISE] >= 200 ? h[H_NOISE] % 2 : 0);
    }
    c->expert_bias = !!(h[H_FLAGS] & F_EXPERT_BIAS);
    c->router_bias = !!(h[H_FLAGS] & F_ROUTER_BIAS);
    c->selection_bias = !!(h[H_FLAGS] & F_SEL_BIAS);
    c->group_mask_zero = !!(h[H_FLAGS] & F_MASK_ZERO);
    c->normalize_after_drop = !!(h[H_FLAGS] & F_NORM_AFTER_DROP);
    c->training = c->save_for_backward = !!(h[H_FLAGS] & F_TRAINING);
    c->recompute = !!(h[H_FLAGS] & F_RECOMPUTE);
    k->fused = !!(h[H_FLAGS2] & F2_FUSED);
    k->has_scale = !!(h[H_FLAGS2] & F2_SCALE);

    /* groups: a divisor of E (or 0 = default), topk_group 0..ng, gst 0..group size */
    {
        int32_t div[MAX_E + 1], nd = 0;
        div[nd++] = 0;
        for (i = 1; i <= E; i++) if (E % i == 0) div[nd++] = i;
        if (h[H_NGROUP] < 240) ng = div[h[H_NGROUP] % nd];
        else { const int32_t bad[3] = {-2, E + 1, 3}; ng = bad[h[H_NGROUP] % 3]; }
        c->n_group = ng;
        if (ng < 1) ng = 1;
        gsz = E > 0 && ng > 0 && E % ng == 0 ? E / ng : 1;
        if (h[H_TOPKG] < 240) c->topk_group = h[H_TOPKG] % (ng + 1);
        else c->topk_group = (h[H_TOPKG] & 1) ? -1 : ng + 1;
        if (h[H_GST] < 240) c->group_score_top = h[H_GST] % (gsz + 1);
        else c->group_score_top = (h[H_GST] & 1) ? -1 : gsz + 1;
    }
    {   /* capacity: only where it is valid unless >= 240 */
        static const float cf_good[11] = {0.0f, 0.0f, 0.5f, 1.0f, 1.25f, 2.0f, 0.01f, 8.0f, 1.0f, 3.0f, 1e30f};
        static const float cf_bad[3] = {-1.0f, NAN, INFINITY};
        const int needs_none = c->routing == MOE_ROUTING_DENSE || c->routing == MOE_ROUTING_SOFT;
        if (h[H_CAP] >= 240) c->capacity = -1;
        else if (needs_none && h[H_CAP] < 230) c->capacity = 0;
        else if (h[H_CAP] >= 232) c->capacity = 2147483647;   /* valid: never drops */
        else c->capacity = h[H_CAP] < 128 ? 0 : 1 + h[H_CAP] % 8;
        if (h[H_CF] >= 240) c->capacity_factor = cf_bad[h[H_CF] % 3];
        else if (needs_none && h[H_CF] < 230) c->capacity_factor = 0.0f;
        else c->capacity_factor = cf_good[h[H_CF] % 11];
        if (c->routing == MOE_ROUTING_EXPERT_CHOICE && c->capacity == 0 && c->capacity_factor == 0.0f &&
            h[H_CAP] < 230)
            c->capacity = 1 + h[H_CAP] % 8;
    }
    {
        static const int32_t bad[2] = {-1, -5};
        c->shared_d_ff = h[H_FS] >= 240 ? bad[h[H_FS] & 1] : (h[H_FS] < 160 ? 0 : 1 + h[H_FS] % MAX_FS);
        c->slots_per_expert = h[H_P] >= 240 ? -1 : h[H_P] % (MAX_P + 1);
        if (h[H_SEQLEN] >= 240) c->seq_len = -1;
        else if (h[H_SEQLEN] >= 232)   /* near the int32 limit: valid, one sequence */
            c->seq_len = 2147483647 - (h[H_SEQLEN] & 1);
        else c->seq_len = h[H_SEQLEN] % (k->T > 0 ? k->T + 2 : 2);
        c->shared_expert_gated = (h[H_FLAGS] & F_SHARED_GATE) &&
                                 (c->shared_d_ff > 0 || h[H_FS] >= 230);
    }
    c->seed = (uint64_t)h[H_SEED] * 0x9E3779B97F4A7C15ull;
    {   /* float options: in-range values (bounded so OK implies finite in the
           finite classes), the largest valid ones (issue 15: norm_p FLT_MAX,
           coefficients and noise scales 1e6) and, at >= 240, invalid ones:
           also just past each documented range */
        static const float p_good[6] = {0.0f, 1.0f, 2.0f, 1000.0f, 3.0f, FLT_MAX};
        static const float p_bad[5] = {-1.0f, NAN, INFINITY, 0.99999994f, 1e-4f};
        static const float eps_good[5] = {0.0f, 0.0f, 1e-20f, 1e-9f, 1e-6f}, eps_bad[2] = {-1e-9f, NAN};
        static const float thr_good[4] = {0.0f, 0.5f, 0.2f, 1.0f}, thr_bad[2] = {-1.0f, NAN};
        static const float rs_good[8] = {0.0f, 0.0f, 1.0f, 2.5f, 16.0f, -0.5f, 1e6f, -1e6f};
        static const float rs_bad[4] = {INFINITY, NAN, 1.0000001e6f, -3e38f};
        static const float ne_good[5] = {0.0f, 0.01f, 1.0f, 0.0f, 1e6f};
        static const float ne_bad[3] = {-1.0f, INFINITY, 1.0000001e6f};
        static const float jit_good[5] = {0.0f, 0.0f, 0.01f, 0.5f, 0.99f}, jit_bad[3] = {1.0f, -0.1f, NAN};
        static const float coef_good[7] = {0.0f, 0.0f, 0.01f, 1e-3f, 1.0f, 1e6f, 100.0f};
        static const float coef_bad[5] = {NAN, INFINITY, -1.0f, 1.0000001e6f, 3e38f};
        static const float clip_good[5] = {0.0f, 0.0f, 0.1f, 1.0f, 100.0f}, clip_bad[2] = {-1.0f, NAN};
        static const float sc_good[6] = {1.0f, 10.0f, -3.0f, 0.1f, 0.0f, 100.0f};
        static const float sc_special[4] = {NAN, INFINITY, 1e30f, -FLT_MAX};
        c->norm_p = pickf(h[H_NORMP], p_good, 6, p_bad, 5);
        c->norm_eps = pickf(h[H_NORMEPS], eps_good, 5, eps_bad, 2);
        c->second_threshold = pickf(h[H_THR], thr_good, 4, thr_bad, 2);
        c->routed_scale = pickf(h[H_RSCALE], rs_good, 8, rs_bad, 4);
        c->noise_epsilon = pickf(h[H_NEPS], ne_good, 5, ne_bad, 3);
        c->jitter = pickf(h[H_JITTER], jit_good, 5, jit_bad, 3);
        c->balance_coef = pickf(h[H_BAL], coef_good, 7, coef_bad, 5);
        c->z_loss_coef = pickf(h[H_Z], coef_good, 7, coef_bad, 5);
        c->importance_coef = pickf(h[H_IMP], coef_good, 7, coef_bad, 5);
        c->load_coef = pickf(h[H_LOAD], coef_good, 7, coef_bad, 5);
        c->seq_balance_coef = pickf(h[H_SEQ], coef_good, 7, coef_bad, 5);
        c->router_grad_clip = pickf(h[H_CLIP], clip_good, 5, clip_bad, 2);
        k->scale = k->special && h[H_SCALE] >= 200 ? sc_special[h[H_SCALE] % 4] : sc_good[h[H_SCALE] % 6];
        if (k->special && h[H_RSCALE] >= 200 && h[H_RSCALE] < 240)
            c->routed_scale = 1e6f;   /* the largest valid */
    }
    k->missing = h[H_MISSING] >= 236 ? h[H_MISSING] - 236 : -1;   /* 0..19: a weight pointer set to NULL */
    k->ws_off = h[H_WSOFF] % 64;                                    /* misaligned workspaces */
    c->num_threads = (h[H_THREADS] & 3) == 3 ? ((h[H_THREADS] & 8) ? -1 : 0) : h[H_THREADS] & 3;
    if (h[H_THREADS] & 4) { c->parallel_for = fuzz_parallel_for; c->parallel_user = &g_pf_user; }
    k->pack_mode = h[H_PACK] % 8 < 4 ? PK_NONE : h[H_PACK] % 8 == 7 ? PK_BAD : h[H_PACK] % 8 == 6 ? PK_ONLY : PK_GOOD;
    c->pack_bf16 = !!(h[H_PACK] & 16);
    {
        static const float warm_good[5] = {0.0f, 0.0f, 0.1f, 1.0f, 1e6f};
        static const float warm_bad[3] = {-1.0f, NAN, 1.0000001e6f};
        static const float drop_good[4] = {0.0f, 0.0f, 0.1f, 0.5f}, drop_bad[3] = {1.0f, -0.1f, NAN};
        static const float mn_good[4] = {1e-3f, 1.0f, 1e6f, 0.5f}, mn_bad[3] = {0.0f, -1.0f, NAN};
        c->router_noise_std = c->routing == MOE_ROUTING_TOPK || h[H_WARM] >= 240
                              ? pickf(h[H_WARM], warm_good, 5, warm_bad, 3) : 0.0f;
        c->expert_dropout = pickf(h[H_DROPOUT], drop_good, 4, drop_bad, 3);
        k->max_norm = pickf(h[H_CLIPNORM], mn_good, 4, mn_bad, 3);
        k->init_scheme = h[H_INIT] >= 240 ? 2 + (h[H_INIT] & 1) * -3 : h[H_INIT] % 2;   /* 2, -1: bad */
    }

    /* clamped sizes for allocation; reduce T to the work cap */
    k->E = (size_t)(E > 0 ? E : 1); k->D = (size_t)(D > 0 ? D : 1); k->F = (size_t)(F > 0 ? F : 1);
    k->Fs = (size_t)(c->shared_d_ff > 0 ? c->shared_d_ff : 0);
    k->P = (size_t)(c->slots_per_expert > 0 ? c->slots_per_expert : 1);
    k->R = c->routing == MOE_ROUTING_SOFT ? k->E * k->P : k->E;
    if (k->T > 0) {
        size_t S = c->routing == MOE_ROUTING_TOPK ? (size_t)(K > 0 ? K : 1) : k->E;
        size_t per = S * (k->F + k->Fs) * k->D;
        while (k->T > 1 && (size_t)k->T * per > (size_t)WORK_CAP) k->T /= 2;
    }
    k->Tn = (size_t)(k->T > 0 ? k->T : 0);

    {   /* tensor sizes (0 for tensors the config cannot use) */
        const size_t Ee = k->E, Dd = k->D, Ff = k->F, Fs = k->Fs, Tt = k->Tn;
        k->n[X_X] = Tt * Dd;
        k->n[X_ROUTER] = Ee * Dd; k->n[X_RBIAS] = Ee; k->n[X_SBIAS] = Ee; k->n[X_RNOISE] = Ee * Dd;
        k->n[X_GATE] = Ee * (k->fused ? 2 : 1) * Ff * Dd;
        k->n[X_UP] = k->fused ? 0 : Ee * Ff * Dd;
        k->n[X_DOWN] = Ee * Dd * Ff;
        k->n[X_GBIAS] = Ee * Ff; k->n[X_UBIAS] = Ee * Ff; k->n[X_DBIAS] = Ee * Dd;
        k->n[X_SH_GATE] = Fs * Dd; k->n[X_SH_UP] = Fs * Dd; k->n[X_SH_DOWN] = Dd * Fs;
        k->n[X_SH_GBIAS] = Fs; k->n[X_SH_UBIAS] = Fs; k->n[X_SH_DBIAS] = Fs ? Dd : 0;
        k->n[X_SH_EGATE] = Fs ? Dd : 0;
        k->n[X_PHI] = k->R * Dd;
        k->n[X_LOGITS] = Tt * k->R; k->n[X_NLOGITS] = Tt * Ee; k->n[X_DY] = Tt * Dd;
    }
    for (i = 0; i < NT; i++) {
        uint8_t b0 = rd8(&r), b1 = rd8(&r);
        k->t[i] = (float *)xmalloc(k->n[i] * sizeof(float));
        fill(k->t[i], k->n[i], b0, b1, (uint32_t)i * 7919u + h[H_SEED], k->special);
    }
    {   /* pokes */
        int np = rd8(&r) % 9;
        for (i = 0; i < np; i++) {
            uint8_t tb = rd8(&r), lo = rd8(&r), hi = rd8(&r), vb = rd8(&r);
            const int ti = tb % NT;
            if (!k->n[ti]) continue;
            j = ((size_t)hi << 8 | lo) % k->n[ti];
            k->t[ti][j] = poke_value(vb, k->special);
        }
    }

    /* weights */
    memset(&k->w, 0, sizeof k->w);
    k->w.router = k->t[X_ROUTER]; k->w.router_bias = k->t[X_RBIAS];
    k->w.selection_bias = k->t[X_SBIAS]; k->w.router_noise = k->t[X_RNOISE];
    k->w.gate = k->t[X_GATE]; k->w.up = k->fused ? NULL : k->t[X_UP]; k->w.down = k->t[X_DOWN];
    k->w.gate_bias = k->t[X_GBIAS]; k->w.up_bias = k->t[X_UBIAS]; k->w.down_bias = k->t[X_DBIAS];
    k->w.gate_up_fused = k->fused;
    k->w.shared_gate = k->t[X_SH_GATE]; k->w.shared_up = k->t[X_SH_UP];
    k->w.shared_down = k->t[X_SH_DOWN]; k->w.shared_gate_bias = k->t[X_SH_GBIAS];
    k->w.shared_up_bias = k->t[X_SH_UBIAS]; k->w.shared_down_bias = k->t[X_SH_DBIAS];
    k->w.shared_expert_gate = k->t[X_SH_EGATE];
    k->w.soft_phi = k->t[X_PHI];
    k->w.soft_scale = k->has_scale ? &k->scale : NULL;
    if (k->missing >= 0) {
        const float **slot[19];
        slot[0] = &k->w.router; slot[1] = &k->w.router_bias; slot[2] = &k->w.selection_bias;
        slot[3] = &k->w.router_noise; slot[4] = &k->w.gate; slot[5] = &k->w.up; slot[6] = &k->w.down;
        slot[7] = &k->w.gate_bias; slot[8] = &k->w.up_bias; slot[9] = &k->w.down_bias;
        slot[10] = &k->w.shared_gate; slot[11] = &k->w.shared_up; slot[12] = &k->w.shared_down;
        slot[13] = &k->w.shared_gate_bias; slot[14] = &k->w.shared_up_bias;
        slot[15] = &k->w.shared_down_bias; slot[16] = &k->w.shared_expert_gate;
        slot[17] = &k->w.soft_phi; slot[18] = &k->w.soft_scale;
        if (k->missing < 19) *slot[k->missing] = NULL;
    }

    /* bf16-rounded expert tensors (what a pack_bf16 forward multiplies by) */
    k->wr = k->w;
    if (c->pack_bf16) {
        const float **src[6];
        int q;
        src[0] = &k->wr.gate; src[1] = &k->wr.up; src[2] = &k->wr.down;
        src[3] = &k->wr.shared_gate; src[4] = &k->wr.shared_up; src[5] = &k->wr.shared_down;
        for (q = 0; q < 6; q++) {
            static const int tid[6] = {X_GATE, X_UP, X_DOWN, X_SH_GATE, X_SH_UP, X_SH_DOWN};
            const size_t nq = k->n[tid[q]];
            if (!*src[q]) continue;
            k->rounded[q] = (float *)xmalloc(nq * sizeof(float));
            for (j = 0; j < nq; j++) k->rounded[q][j] = bf16_round((*src[q])[j]);
            *src[q] = k->rounded[q];
        }
    }

    /* w.packed (only for a config the library accepts) */
    k->wp = k->w;
    if (k->pack_mode != PK_NONE) {
        moe_config pc = *c;
        size_t bytes = 0;
        int garbage = k->pack_mode == PK_BAD && !(h[H_PACK] & 8);
        if (k->pack_mode == PK_BAD && !garbage)   /* packed for another shape, smaller when possible */
            pc.d_ff = c->d_ff > 1 ? c->d_ff - 1 : c->d_ff + 1;
        pc.isa = MOE_ISA_AUTO;   /* packing for the reference ISA is refused */
        if (MOE__SIMD_ISA == MOE_ISA_REFERENCE)   /* no panels without SIMD kernels */
            k->pack_mode = PK_NONE;
        else if (moe_pack_size(&pc, &bytes) == MOE_STATUS_OK) {
            REQUIRE(bytes >= 64);
            k->packed = xmalloc(bytes);
            if (garbage) {
                uint32_t gs = 12345u + h[H_SEED];
                for (j = 0; j < bytes; j++) ((unsigned char *)k->packed)[j] = (unsigned char)lcg(&gs);
            } else {
                moe_weights wsrc = k->w;
                float *gate2 = NULL, *up2 = NULL, *down2 = NULL;
                if (pc.d_ff != c->d_ff) {   /* tensors of the other shape, zeros */
                    const size_t E2 = k->E, F2 = (size_t)pc.d_ff, D2 = k->D;
                    gate2 = (float *)xcalloc(E2 * (k->fused ? 2 : 1) * F2 * D2, sizeof(float));
                    up2 = (float *)xcalloc(E2 * F2 * D2, sizeof(float));
                    down2 = (float *)xcalloc(E2 * D2 * F2, sizeof(float));
                    wsrc.gate = gate2; wsrc.up = k->fused ? NULL : up2; wsrc.down = down2;
                    wsrc.gate_bias = wsrc.up_bias = NULL;
                    pc.expert_bias = 0;
                }
                if (moe_pack_weights(&pc, &wsrc, k->packed, bytes - 1) != MOE_STATUS_WORKSPACE_TOO_SMALL ||
                    moe_pack_weights(&pc, &wsrc, k->packed, bytes) != MOE_STATUS_OK) {
                    /* only a missing weight (decoded) may stop packing */
                    REQUIRE(k->missing >= 0);
                    memset(k->packed, 0, bytes);
                }
                free(gate2); free(up2); free(down2);
            }
            k->wp.packed = k->packed;
            k->wp.packed_bytes = bytes;
            if (k->pack_mode == PK_ONLY) {
                k->wp.gate = k->wp.up = k->wp.down = NULL;
                k->wp.shared_gate = k->wp.shared_up = k->wp.shared_down = NULL;
            }
        } else {
            k->pack_mode = PK_NONE;
        }
    }
}

static void free_case(fcase *k) {
    int i;
    for (i = 0; i < NT; i++) free(k->t[i]);
    for (i = 0; i < 6; i++) free(k->rounded[i]);
    free(k->packed);
}

/* --- info arrays, allocated separately at their documented sizes --------------- */

typedef struct infobuf {
    moe_info info;
    size_t TR, TS, E, N, Tc, F, D, Fs;   /* element counts */
    int glu, cache, soft;
} infobuf;

static int is_glu(moe_activation a) {
    return a == MOE_ACT_SWIGLU || a == MOE_ACT_GEGLU || a == MOE_ACT_GEGLU_TANH;
}

/* Rows N of the training cache, as moe_info documents it: T*K top-k, E*C
   expert choice (C capped at T), T*E dense, E*P Soft MoE. rc is resolved. */
static size_t cache_rows(const moe_config *rc, int32_t T) {
    const size_t E = (size_t)rc->num_experts;
    switch (rc->routing) {
    case MOE_ROUTING_TOPK: return (size_t)T * (size_t)rc->top_k;
    case MOE_ROUTING_DENSE: return (size_t)T * E;
    case MOE_ROUTING_SOFT: return E * (size_t)rc->slots_per_expert;
    default: {
        int32_t C = rc->capacity;
        if (C == 0) REQUIRE(moe_capacity(rc->capacity_formula, T, rc->num_experts, 1, rc->capacity_factor, &C) == MOE_STATUS_OK);
        if (C > T) C = T;
        return E * (size_t)C;
    }
    }
}

static void info_alloc(infobuf *b, const moe_config *rc, int32_t T) {
    const size_t Tn = (size_t)T, E = (size_t)rc->num_experts;
    const int soft = rc->routing == MOE_ROUTING_SOFT;
    memset(b, 0, sizeof *b);
    b->soft = soft;
    b->E = E;
    b->TR = Tn * (soft ? E * (size_t)rc->slots_per_expert : E);
    b->TS = Tn * (size_t)moe_routing_slots(rc);
    b->glu = is_glu(rc->activation);
    b->cache = rc->save_for_backward && !rc->recompute;
    b->F = (size_t)rc->d_ff; b->D = (size_t)rc->d_model; b->Fs = (size_t)rc->shared_d_ff;
    b->N = b->cache ? cache_rows(rc, T) : 0;
    b->Tc = b->cache ? Tn : 0;
    b->info.logits = (float *)xmalloc(b->TR * sizeof(float));
    b->info.scores = (float *)xmalloc(b->TR * sizeof(float));
    b->info.dispatch = soft ? (float *)xmalloc(b->TR * sizeof(float)) : NULL;
    b->info.expert = (int32_t *)xmalloc(b->TS * sizeof(int32_t));
    b->info.weight = (float *)xmalloc(b->TS * sizeof(float));
    b->info.dropped = (uint8_t *)xmalloc(b->TS);
    b->info.expert_routed = (int32_t *)xmalloc(E * sizeof(int32_t));
    b->info.expert_kept = (int32_t *)xmalloc(E * sizeof(int32_t));
    if (b->cache) {
        b->info.cache_hidden = (float *)xmalloc(b->N * b->F * sizeof(float));
        b->info.cache_up = b->glu ? (float *)xmalloc(b->N * b->F * sizeof(float)) : NULL;
        b->info.cache_out = (float *)xmalloc(b->N * b->D * sizeof(float));
        if (b->Fs) {
            b->info.cache_shared_hidden = (float *)xmalloc(b->Tc * b->Fs * sizeof(float));
            b->info.cache_shared_up = b->glu ? (float *)xmalloc(b->Tc * b->Fs * sizeof(float)) : NULL;
            b->info.cache_shared_out = (float *)xmalloc(b->Tc * b->D * sizeof(float));
        }
    }
}
static void info_free(infobuf *b) {
    moe_info *i = &b->info;
    free(i->logits); free(i->scores); free(i->dispatch); free(i->expert); free(i->weight);
    free(i->dropped); free(i->expert_routed); free(i->expert_kept); free(i->cache_hidden);
    free(i->cache_up); free(i->cache_out); free(i->cache_shared_hidden); free(i->cache_shared_up);
    free(i->cache_shared_out);
}

/* Routing arrays and every scalar of two infos, bitwise. */
static int same_routing(const moe_info *a, const moe_info *b, size_t TR, size_t TS, size_t E, int soft) {
    return same_bytes(a->scores, b->scores, TR * sizeof(float)) &&
           (!soft || same_bytes(a->dispatch, b->dispatch, TR * sizeof(float))) &&
           same_bytes(a->expert, b->expert, TS * sizeof(int32_t)) &&
           same_bytes(a->weight, b->weight, TS * sizeof(float)) &&
           same_bytes(a->dropped, b->dropped, TS) &&
           same_bytes(a->expert_routed, b->expert_routed, E * sizeof(int32_t)) &&
           same_bytes(a->expert_kept, b->expert_kept, E * sizeof(int32_t)) &&
           a->slots == b->slots && a->capacity == b->capacity &&
           a->dropped_pairs == b->dropped_pairs && a->dropped_tokens == b->dropped_tokens &&
           same_bytes(&a->aux_balance, &b->aux_balance, sizeof(float)) &&
           same_bytes(&a->aux_z, &b->aux_z, sizeof(float)) &&
           same_bytes(&a->aux_importance, &b->aux_importance, sizeof(float)) &&
           same_bytes(&a->aux_load, &b->aux_load, sizeof(float)) &&
           same_bytes(&a->aux_seq, &b->aux_seq, sizeof(float)) &&
           same_bytes(&a->aux_total, &b->aux_total, sizeof(float));
}
static int same_cache(const infobuf *a, const moe_info *b, size_t rows) {
    const moe_info *x = &a->info;
    if (!a->cache) return 1;
    return same_bytes(x->cache_hidden, b->cache_hidden, rows * a->F * sizeof(float)) &&
           (!a->glu || same_bytes(x->cache_up, b->cache_up, rows * a->F * sizeof(float))) &&
           same_bytes(x->cache_out, b->cache_out, rows * a->D * sizeof(float)) &&
           (!a->Fs || (same_bytes(x->cache_shared_hidden, b->cache_shared_hidden, a->Tc * a->Fs * sizeof(float)) &&
                       (!a->glu || same_bytes(x->cache_shared_up, b->cache_shared_up, a->Tc * a->Fs * sizeof(float))) &&
                       same_bytes(x->cache_shared_out, b->cache_shared_out, a->Tc * a->D * sizeof(float))));
}

/* --- workspace calls ------------------------------------------------------------- */

/* A workspace of exactly `need` bytes starting `off` bytes into its block,
   filled with `garbage`. */
typedef struct wsbuf { unsigned char *block; void *p; } wsbuf;
static wsbuf ws_make(size_t need, int off, unsigned char garbage) {
    wsbuf w;
    w.block = (unsigned char *)xmalloc(need + (size_t)off);
    if (need + (size_t)off) memset(w.block, garbage, need + (size_t)off);
    w.p = w.block + off;
    return w;
}

static moe_status fwd_w(const fcase *k, const moe_weights *wt, const moe_config *c, float *y,
                        moe_info *info, size_t need, unsigned char garbage) {
    wsbuf w = ws_make(need, k->ws_off, garbage);
    moe_status st = moe_forward(c, wt, k->t[X_X], k->T, y, info, w.p, need);
    free(w.block);
    return st;
}
static moe_status fwd(const fcase *k, const moe_config *c, float *y, moe_info *info, size_t need,
                      unsigned char garbage) {
    return fwd_w(k, &k->w, c, y, info, need, garbage);
}

/* Every gradient tensor at its exact size, zeroed. */
enum { NG = 18 };
typedef struct gradbuf { float *p[NG]; size_t n[NG]; float *dx; size_t ndx; moe_grads g; } gradbuf;
static void grads_alloc(gradbuf *b, const fcase *k) {
    const size_t E = k->E, D = k->D, F = k->F, Fs = k->Fs;
    float **slot[NG];
    int i;
    memset(b, 0, sizeof *b);
    b->n[0] = E * D; b->n[1] = E; b->n[2] = E * D; b->n[3] = E * (k->fused ? 2 : 1) * F * D;
    b->n[4] = k->fused ? 0 : E * F * D; b->n[5] = E * D * F; b->n[6] = E * F; b->n[7] = E * F;
    b->n[8] = E * D; b->n[9] = Fs * D; b->n[10] = Fs * D; b->n[11] = D * Fs; b->n[12] = Fs;
    b->n[13] = Fs; b->n[14] = Fs ? D : 0; b->n[15] = Fs ? D : 0; b->n[16] = k->R * D; b->n[17] = 1;
    slot[0] = &b->g.router; slot[1] = &b->g.router_bias; slot[2] = &b->g.router_noise;
    slot[3] = &b->g.gate; slot[4] = &b->g.up; slot[5] = &b->g.down; slot[6] = &b->g.gate_bias;
    slot[7] = &b->g.up_bias; slot[8] = &b->g.down_bias; slot[9] = &b->g.shared_gate;
    slot[10] = &b->g.shared_up; slot[11] = &b->g.shared_down; slot[12] = &b->g.shared_gate_bias;
    slot[13] = &b->g.shared_up_bias; slot[14] = &b->g.shared_down_bias;
    slot[15] = &b->g.shared_expert_gate; slot[16] = &b->g.soft_phi; slot[17] = &b->g.soft_scale;
    for (i = 0; i < NG; i++) { b->p[i] = (float *)xcalloc(b->n[i], sizeof(float)); *slot[i] = b->p[i]; }
    if (k->fused) b->g.up = NULL;
    b->g.gate_up_fused = k->fused;   /* the helpers then see the whole [E][2F][D] gate */
    b->ndx = k->Tn * D;
    b->dx = (float *)xmalloc(b->ndx * sizeof(float));
    if (b->ndx) memset(b->dx, 0x7f, b->ndx * sizeof(float));   /* overwritten on OK */
}
static void grads_free(gradbuf *b) {
    int i;
    for (i = 0; i < NG; i++) free(b->p[i]);
    free(b->dx);
}
static int grads_same(const gradbuf *a, const gradbuf *b) {
    int i;
    for (i = 0; i < NG; i++) if (!same_bytes(a->p[i], b->p[i], a->n[i] * sizeof(float))) return 0;
    return same_bytes(a->dx, b->dx, a->ndx * sizeof(float));
}
static const char *grad_name[NG] = {
    "router", "router_bias", "router_noise", "gate", "up", "down", "gate_bias", "up_bias",
    "down_bias", "shared_gate", "shared_up", "shared_down", "shared_gate_bias", "shared_up_bias",
    "shared_down_bias", "shared_expert_gate", "soft_phi", "soft_scale"};
static int grads_finite(const gradbuf *a) {
    int i, ok = 1;
    for (i = 0; i < NG; i++)
        if (!all_finite(a->p[i], a->n[i])) {
            if (g_verbose) fprintf(stderr, "  non-finite gradient: %s\n", grad_name[i]);
            ok = 0;
        }
    if (!all_finite(a->dx, a->ndx)) {
        if (g_verbose) fprintf(stderr, "  non-finite gradient: dx\n");
        ok = 0;
    }
    return ok;
}

static moe_status bwd_w(const fcase *k, const moe_weights *wt, const moe_config *c, const moe_info *info,
                        gradbuf *g, size_t need, unsigned char garbage) {
    wsbuf w = ws_make(need, k->ws_off, garbage);
    moe_status st = moe_backward(c, wt, k->t[X_X], k->T, info, k->t[X_DY], g->dx, &g->g, w.p, need);
    free(w.block);
    return st;
}
static moe_status bwd(const fcase *k, const moe_config *c, const moe_info *info, gradbuf *g,
                      size_t need, unsigned char garbage) {
    return bwd_w(k, &k->w, c, info, g, need, garbage);
}

/* --- tolerance compare (P6) -------------------------------------------------------- */

static double maxabs(const float *a, size_t n) {
    double m = 0.0;
    size_t i;
    for (i = 0; i < n; i++) if (fabs((double)a[i]) > m) m = fabs((double)a[i]);
    return m;
}
/* |got - ref| <= atol_rel * scale + rtol * |ref| (+ ISA_ATOL_ABS), scale =
   the largest |ref| of the array the n values belong to. */
static int close_scaled(const float *got, const float *ref, size_t n, double scale, double atol_rel, double rtol) {
    size_t i;
    for (i = 0; i < n; i++) {
        const double e = fabs((double)got[i] - (double)ref[i]);
        if (!(e <= atol_rel * scale + rtol * fabs((double)ref[i]) + ISA_ATOL_ABS)) {
            if (g_verbose)
                fprintf(stderr, "  ISA mismatch at [%zu] of %zu: got %.9g, reference %.9g (max |ref| %g)\n",
                        i, n, (double)got[i], (double)ref[i], scale);
            return 0;
        }
    }
    return 1;
}
static int close_tol(const float *got, const float *ref, size_t n, double atol_rel, double rtol) {
    return close_scaled(got, ref, n, maxabs(ref, n), atol_rel, rtol);
}
static int close_enough(const float *got, const float *ref, size_t n) {
    return close_tol(got, ref, n, ISA_ATOL_REL, ISA_RTOL);
}

/* --- properties -------------------------------------------------------------------- */

/* Every config-level error is reported the same by all entry points. */
static void check_config_errors(const fcase *k, moe_status st) {
    size_t b = 777;
    unsigned char dummy[64];
    float y1[1];
    moe_info info;
    memset(&info, 0, sizeof info);
    REQUIRE(moe_forward_workspace_size(&k->c, k->T, &b) == st);
    REQUIRE(moe_route_workspace_size(&k->c, k->T, &b) == st);
    REQUIRE(moe_backward_workspace_size(&k->c, k->T, &b) == st);
    REQUIRE(moe_info_size(&k->c, k->T, &b) == st);
    REQUIRE(b == 777);
    REQUIRE(moe_forward(&k->c, &k->w, k->t[X_X], k->T, y1, &info, dummy, sizeof dummy) == st);
    REQUIRE(moe_forward_alloc(&k->c, &k->w, k->t[X_X], k->T, y1, &info) == st);
    REQUIRE(moe_route(&k->c, &k->w, k->t[X_LOGITS], k->t[X_NLOGITS], k->T, &info, dummy, sizeof dummy) == st);
    REQUIRE(moe_info_bind(&k->c, k->T, &info, dummy, sizeof dummy) == st);
    REQUIRE(info.logits == NULL && info.workspace_required == 0);
}

/* Structural invariants of a successful routing (P5). rc resolved. */
static void check_routing(const fcase *k, const moe_config *rc, const moe_info *in, const float *y) {
    const int32_t T = k->T, E = rc->num_experts, S = moe_routing_slots(rc);
    const size_t D = (size_t)rc->d_model;
    int32_t t, j, e, dropped_pairs = 0, dropped_tokens = 0, kept[MAX_E], routed[MAX_E];
    if (rc->routing == MOE_ROUTING_SOFT) {
        REQUIRE(in->dropped_pairs == 0 && in->dropped_tokens == 0);
        for (e = 0; e < E; e++) REQUIRE(in->expert_kept[e] == rc->slots_per_expert);
        return;
    }
    REQUIRE(in->slots == S);
    for (e = 0; e < E; e++) kept[e] = routed[e] = 0;
    for (t = 0; t < T; t++) {
        int any = 0;
        for (j = 0; j < S; j++) {
            const size_t p = (size_t)t * S + j;
            e = in->expert[p];
            REQUIRE(e >= -1 && e < E);
            REQUIRE(in->dropped[p] <= 2);
            if (rc->routing != MOE_ROUTING_EXPERT_CHOICE) REQUIRE(e >= 0);
            if (rc->routing == MOE_ROUTING_EXPERT_CHOICE || rc->routing == MOE_ROUTING_DENSE)
                REQUIRE(e == -1 || e == j);
            if (e < 0) { REQUIRE(in->weight[p] == 0.0f); continue; }
            if (in->dropped[p] == 2) { REQUIRE(rc->second_expert == MOE_SECOND_RANDOM && j == 1); continue; }
            routed[e]++;
            if (in->dropped[p]) { dropped_pairs++; REQUIRE(in->weight[p] == 0.0f); }
            else { kept[e]++; any = 1; }
        }
        for (j = 0; j < S; j++)   /* an expert appears at most once per token */
            if (in->expert[(size_t)t * S + j] >= 0) {
                int32_t j2;
                for (j2 = j + 1; j2 < S; j2++) REQUIRE(in->expert[(size_t)t * S + j2] != in->expert[(size_t)t * S + j]);
            }
        if (!any) {
            dropped_tokens++;
            if (rc->shared_d_ff == 0 && y) {   /* documented: output 0 */
                size_t d;
                for (d = 0; d < D; d++) REQUIRE(y[(size_t)t * D + d] == 0.0f);
            }
        }
    }
    REQUIRE(in->dropped_pairs == dropped_pairs);
    REQUIRE(in->dropped_tokens == dropped_tokens);
    for (e = 0; e < E; e++) {
        REQUIRE(in->expert_kept[e] == kept[e]);
        REQUIRE(in->expert_routed[e] == routed[e]);
        if (in->capacity > 0) REQUIRE(kept[e] <= in->capacity);
    }
    if (rc->routing == MOE_ROUTING_EXPERT_CHOICE)
        for (e = 0; e < E; e++) REQUIRE(kept[e] == (in->capacity < T ? in->capacity : T));
}

static int info_scalars_finite(const moe_info *in) {
    return finite_f(in->aux_balance) && finite_f(in->aux_z) && finite_f(in->aux_importance) &&
           finite_f(in->aux_load) && finite_f(in->aux_seq) && finite_f(in->aux_total);
}

/* The router inputs a successful call must have found finite (P3). */
static int router_inputs_finite(const fcase *k, const moe_config *rc) {
    if (k->T == 0) return 1;
    if (!all_finite(k->t[X_X], k->n[X_X])) return 0;
    if (rc->routing == MOE_ROUTING_SOFT) {
        if (!all_finite(k->w.soft_phi, k->n[X_PHI])) return 0;
        if (k->w.soft_scale && !finite_f(k->scale)) return 0;
        return 1;
    }
    if (!all_finite(k->w.router, k->n[X_ROUTER])) return 0;
    if (rc->router_bias && !all_finite(k->w.router_bias, k->n[X_RBIAS])) return 0;
    if (rc->selection_bias && !all_finite(k->w.selection_bias, k->n[X_SBIAS])) return 0;
    if (rc->noise == MOE_NOISE_SHAZEER && rc->training && !all_finite(k->w.router_noise, k->n[X_RNOISE])) return 0;
    return 1;
}

/* moe_route on the decoded logits. */
static void run_route(const fcase *k, const moe_config *rc) {
    size_t need = 0;
    infobuf a, b;
    moe_status st, st2;
    wsbuf w;
    const int noisy = rc->noise == MOE_NOISE_SHAZEER && rc->training;
    REQUIRE(moe_route_workspace_size(&k->c, k->T, &need) == MOE_STATUS_OK);
    info_alloc(&a, rc, k->T);
    info_alloc(&b, rc, k->T);
    /* one byte short */
    w = ws_make(need - 1, k->ws_off, 0xA5);
    a.info.workspace_required = 0;
    st = moe_route(&k->c, &k->w, k->t[X_LOGITS], k->t[X_NLOGITS], k->T, &a.info, w.p, need - 1);
    free(w.block);
    if (k->T == 0) REQUIRE(st == MOE_STATUS_OK || st == MOE_STATUS_MISSING_WEIGHT);
    else if (st == MOE_STATUS_WORKSPACE_TOO_SMALL) REQUIRE(a.info.workspace_required == need);
    else REQUIRE(st == MOE_STATUS_MISSING_WEIGHT);
    /* exact */
    w = ws_make(need, k->ws_off, 0x00);
    st = moe_route(&k->c, &k->w, k->t[X_LOGITS], k->t[X_NLOGITS], k->T, &a.info, w.p, need);
    free(w.block);
    w = ws_make(need, k->ws_off, 0xFF);
    st2 = moe_route(&k->c, &k->w, k->t[X_LOGITS], k->t[X_NLOGITS], k->T, &b.info, w.p, need);
    free(w.block);
    REQUIRE(st == st2);
    REQUIRE(st == MOE_STATUS_OK || st == MOE_STATUS_NONFINITE || st == MOE_STATUS_MISSING_WEIGHT);
    if (st == MOE_STATUS_MISSING_WEIGHT) REQUIRE(rc->selection_bias && !k->w.selection_bias);
    if (st == MOE_STATUS_OK) {
        REQUIRE(all_finite(k->t[X_LOGITS], k->n[X_LOGITS]));
        if (noisy) REQUIRE(all_finite(k->t[X_NLOGITS], k->n[X_NLOGITS]));
        if (rc->selection_bias && k->T > 0) REQUIRE(all_finite(k->w.selection_bias, k->n[X_SBIAS]));
        REQUIRE(same_routing(&a.info, &b.info, a.TR, a.TS, a.E, a.soft));
        REQUIRE(same_bytes(a.info.logits, k->t[X_LOGITS], a.TR * sizeof(float)));
        check_routing(k, rc, &a.info, NULL);
        if (!k->special) {
            REQUIRE(all_finite(a.info.scores, a.TR) && all_finite(a.info.weight, a.TS));
            REQUIRE(!a.soft || all_finite(a.info.dispatch, a.TR));
            REQUIRE(info_scalars_finite(&a.info));
        }
    }
    if (!k->special && !(rc->selection_bias && !k->w.selection_bias)) REQUIRE(st == MOE_STATUS_OK);
    info_free(&a);
    info_free(&b);
}

/* One forward for an ISA: y and separately allocated info arrays. */
typedef struct fwdres { moe_status st; float *y; infobuf ib; size_t rows, need; } fwdres;
static void forward_isa(const fcase *k, const moe_config *c, const moe_config *rc, fwdres *o) {
    size_t need = 0;
    o->y = (float *)xmalloc(k->Tn * k->D * sizeof(float));
    info_alloc(&o->ib, rc, k->T);
    REQUIRE(moe_forward_workspace_size(c, k->T, &need) == MOE_STATUS_OK);
    o->need = need;
    o->st = fwd(k, c, o->y, &o->ib.info, need, 0x00);
    o->rows = 0;
    if (o->st == MOE_STATUS_OK) {
        int32_t e;
        for (e = 0; e < rc->num_experts; e++) o->rows += (size_t)o->ib.info.expert_kept[e];
        if (rc->routing == MOE_ROUTING_SOFT) o->rows = (size_t)rc->num_experts * (size_t)rc->slots_per_expert;
    }
}
static void fwdres_free(fwdres *o) { free(o->y); info_free(&o->ib); }

/* moe_grads_clip_norm, moe_grads_zero and moe_init_weights on a gradient set
   whose tensors are allocated at exactly their sizes (ASan sees a write past
   any of them). The clip's norm is the norm of every gradient the backward
   wrote; after clipping it is <= max_norm; zero leaves nothing; init is
   deterministic and finite. */
static double grads_norm(const gradbuf *g) {
    double s2 = 0.0;
    size_t i;
    int q;
    for (q = 0; q < NG; q++) for (i = 0; i < g->n[q]; i++) s2 += (double)g->p[q][i] * g->p[q][i];
    return sqrt(s2);
}
static void grad_helpers(const fcase *k, const moe_config *c, gradbuf *g) {
    const int ok_norm = finite_f(k->max_norm) && k->max_norm > 0.0f;
    const double before = grads_norm(g);
    float out = -1.0f;
    moe_status st = moe_grads_clip_norm(c, &g->g, k->max_norm, &out);
    int q;
    size_t i;
    REQUIRE(st == (ok_norm ? MOE_STATUS_OK : MOE_STATUS_BAD_OPTION));
    if (st == MOE_STATUS_OK && before - before == 0.0 && before < 1e30) {
        const double after = grads_norm(g);
        REQUIRE(fabs((double)out - before) <= 1e-5 * before + 1e-30);
        REQUIRE(after <= (double)k->max_norm * (1.0 + 1e-5) || after <= before * (1.0 + 1e-6));
        if (before > k->max_norm) REQUIRE(after <= (double)k->max_norm * (1.0 + 1e-5));
    }
    REQUIRE(moe_grads_zero(c, &g->g) == MOE_STATUS_OK);
    for (q = 0; q < NG; q++) for (i = 0; i < g->n[q]; i++) REQUIRE(g->p[q][i] == 0.0f);
    st = moe_init_weights(c, (moe_init_scheme)k->init_scheme, 42u, &g->g);
    REQUIRE(st == (k->init_scheme == 0 || k->init_scheme == 1 ? MOE_STATUS_OK : MOE_STATUS_BAD_ENUM));
    if (st == MOE_STATUS_OK) {
        gradbuf h;
        grads_alloc(&h, k);
        REQUIRE(moe_init_weights(c, (moe_init_scheme)k->init_scheme, 42u, &h.g) == MOE_STATUS_OK);
        for (q = 0; q < NG; q++) {
            REQUIRE(all_finite(g->p[q], g->n[q]));
            REQUIRE(same_bytes(g->p[q], h.p[q], g->n[q] * sizeof(float)));
        }
        grads_free(&h);
    }
}

/* ReLU' jumps at 0: a pre-activation within rounding of 0 can take the other
   side on another ISA (FMA rounding), and its gradient then differs by a
   whole term, not by rounding. Gradients of ReLU layers are compared across
   ISAs only when every cached pre-activation is clear of 0 (|h| > 1e-3
   max |h|); without the cache they are not compared. */
static int relu_ambiguous(const moe_config *rc, const moe_info *in, int32_t T) {
    size_t rows = 0, i, n;
    int32_t e;
    double m = 0.0;
    const float *h;
    int pass;
    if (rc->activation != MOE_ACT_RELU) return 0;
    if (!in->cache_hidden) return 1;
    if (rc->routing == MOE_ROUTING_SOFT) rows = (size_t)rc->num_experts * (size_t)rc->slots_per_expert;
    else for (e = 0; e < rc->num_experts; e++) rows += (size_t)in->expert_kept[e];
    for (pass = 0; pass < 2; pass++) {
        h = pass ? in->cache_shared_hidden : in->cache_hidden;
        n = pass ? (size_t)T * (size_t)rc->shared_d_ff : rows * (size_t)rc->d_ff;
        if (!h) continue;
        m = 0.0;
        for (i = 0; i < n; i++) if (fabs((double)h[i]) > m) m = fabs((double)h[i]);
        for (i = 0; i < n; i++) if (fabs((double)h[i]) <= 1e-3 * m && h[i] != 0.0f) return 1;
    }
    return 0;
}

/* --- gradient comparison with a conditioning allowance (P6) ----------------------- */

/* A fixed max-relative tolerance is wrong where a gradient is a sum whose
   terms cancel: two correct fp32 orders (FMA or not) leave residuals of
   ~2^-24 * sum|terms|, which the next GEMM can multiply by large weights.
   Seen: da = sum_d (w dy_d) down_df with terms of +-1.7e-4 cancelling exactly
   in the reference and to 6.8e-12 with FMA, times up . x = 1e8 (a FLT_MAX
   weight), so dx was 0 against 5e-4; and exact-zero weight gradients
   against 1e-14 in the finite classes. So when the plain check fails, the
   reference is rerun on inputs perturbed by PERTURB_REL (relative, random
   sign, every tensor), and each gradient tensor may also differ by the
   largest change that perturbation caused in it: a backward-stable kernel
   is off by about what 2^-24-sized input changes cause, far below
   PERTURB_REL ~ 2^-16. If a perturbation changes the routing, the case is
   a near-tie and is not compared (as for tokens routed differently).
   8 runs: the envelope is a max over random perturbations, and 2 fell short of
   the rounding spread of Soft MoE's scale gradient at D = 1 (x and phi
   normalise to +-1; its softmax-gradient terms cancel to 1e-7): SIMD and
   reference 1.4e-9 apart, 2 runs' envelope 1.9e-10 (corpus: soft_d1_*). */
#define PERTURB_REL (1.0 / 65536.0)
#define PERTURB_RUNS 8

/* k with every tensor scaled elementwise by 1 + PERTURB_REL * u, u in [-1, 1). */
static void perturb_case(const fcase *k, fcase *kp, uint32_t seed) {
    const float **wf[19];
    int i, q;
    *kp = *k;
    for (i = 0; i < NT; i++) {
        size_t j;
        uint32_t s = seed * 747796405u + (uint32_t)i * 2891336453u + 1u;
        kp->t[i] = (float *)xmalloc(k->n[i] * sizeof(float));
        for (j = 0; j < k->n[i]; j++) kp->t[i][j] = k->t[i][j] * (float)(1.0 + PERTURB_REL * unit(&s));
    }
    wf[0] = &kp->w.router; wf[1] = &kp->w.router_bias; wf[2] = &kp->w.selection_bias;
    wf[3] = &kp->w.router_noise; wf[4] = &kp->w.gate; wf[5] = &kp->w.up; wf[6] = &kp->w.down;
    wf[7] = &kp->w.gate_bias; wf[8] = &kp->w.up_bias; wf[9] = &kp->w.down_bias;
    wf[10] = &kp->w.shared_gate; wf[11] = &kp->w.shared_up; wf[12] = &kp->w.shared_down;
    wf[13] = &kp->w.shared_gate_bias; wf[14] = &kp->w.shared_up_bias;
    wf[15] = &kp->w.shared_down_bias; wf[16] = &kp->w.shared_expert_gate; wf[17] = &kp->w.soft_phi;
    wf[18] = NULL;
    for (q = 0; wf[q]; q++)
        for (i = 0; i < NT; i++)
            if (*wf[q] && *wf[q] == k->t[i]) { *wf[q] = kp->t[i]; break; }
    kp->w.packed = NULL;
}
static void perturbed_free(fcase *kp) {
    int i;
    for (i = 0; i < NT; i++) free(kp->t[i]);
}

/* One perturbed reference forward (seed): y and the info it fills (ib,
   freed by the caller). 1 when it succeeded with the reference's routing;
   0 otherwise (a near-tie: the case is not compared).                     */
static int perturbed_forward(const fcase *k, const moe_config *c, const moe_config *rc, const moe_info *rinfo,
                             uint32_t seed, fcase *kp, float *y, moe_info *pi, void **ib) {
    const size_t TS = k->Tn * (size_t)moe_routing_slots(rc);
    size_t ibn = 0, need = 0;
    perturb_case(k, kp, seed);
    REQUIRE(moe_info_size(c, k->T, &ibn) == MOE_STATUS_OK);
    *ib = xmalloc(ibn);
    memset(pi, 0, sizeof *pi);
    REQUIRE(moe_info_bind(c, k->T, pi, *ib, ibn) == MOE_STATUS_OK);
    REQUIRE(moe_forward_workspace_size(c, k->T, &need) == MOE_STATUS_OK);
    if (fwd(kp, c, y, pi, need, 0x00) != MOE_STATUS_OK) return 0;
    return rc->routing == MOE_ROUTING_SOFT ||   /* soft routing is continuous: nothing to flip */
           (same_bytes(pi->expert, rinfo->expert, TS * sizeof(int32_t)) &&
            same_bytes(pi->dropped, rinfo->dropped, TS));
}

/* Largest |perturbed - reference| per gradient tensor (env[NG] is dx), or 0
   when a perturbation changed the routing or the status. */
static int grad_envelope(const fcase *k, const moe_config *c, const moe_config *rc, const moe_info *rinfo,
                         const gradbuf *gref, double *env) {
    int run, q;
    for (q = 0; q <= NG; q++) env[q] = 0.0;
    for (run = 0; run < PERTURB_RUNS; run++) {
        fcase kp;
        gradbuf gp;
        size_t bneed = 0;
        void *ib;
        moe_info pi;
        float *y = (float *)xmalloc(k->Tn * k->D * sizeof(float));
        int ok = perturbed_forward(k, c, rc, rinfo, 0x9e37u + (uint32_t)run, &kp, y, &pi, &ib);
        REQUIRE(moe_backward_workspace_size(c, k->T, &bneed) == MOE_STATUS_OK);
        grads_alloc(&gp, k);
        ok = ok && bwd(&kp, c, &pi, &gp, bneed, 0x00) == MOE_STATUS_OK && grads_finite(&gp);
        if (ok) {
            for (q = 0; q <= NG; q++) {
                const float *a = q < NG ? gp.p[q] : gp.dx, *b = q < NG ? gref->p[q] : gref->dx;
                const size_t n = q < NG ? gp.n[q] : gp.ndx;
                size_t j;
                for (j = 0; j < n; j++) {
                    const double e = fabs((double)a[j] - (double)b[j]);
                    if (e > env[q]) env[q] = e;
                }
            }
        }
        grads_free(&gp);
        free(ib);
        free(y);
        perturbed_free(&kp);
        if (!ok) {
            if (g_verbose) fprintf(stderr, "  perturbed reference routed differently: gradients not compared\n");
            return 0;
        }
    }
    return 1;
}

/* The same envelope for the forward output: the largest |perturbed -
   reference| over y (seen: y = sum_f down_df ha_f with four terms that
   cancel to exactly 0 in the reference and to -3.4e-14 with FMA, while all
   of y is 0, so no y-scaled tolerance is left). 0: routing changed.       */
static int y_envelope(const fcase *k, const moe_config *c, const moe_config *rc, const moe_info *rinfo,
                      const float *yref, double *env) {
    const size_t ny = k->Tn * k->D;
    int run, ok = 1;
    *env = 0.0;
    for (run = 0; run < PERTURB_RUNS && ok; run++) {
        fcase kp;
        void *ib;
        moe_info pi;
        size_t j;
        float *y = (float *)xmalloc(ny * sizeof(float));
        ok = perturbed_forward(k, c, rc, rinfo, 0x7f4au + (uint32_t)run, &kp, y, &pi, &ib);
        for (j = 0; ok && j < ny; j++) {
            const double e = fabs((double)y[j] - (double)yref[j]);
            if (e == e && e > *env) *env = e;
        }
        free(ib);
        free(y);
        perturbed_free(&kp);
    }
    if (!ok && g_verbose) fprintf(stderr, "  perturbed reference routed differently: y not compared\n");
    return ok;
}

/* The ISA's gradients against the reference's (P6). */
static void check_grads_close(const fcase *k, const moe_config *c, const moe_config *rc, const moe_info *rinfo,
                              const gradbuf *gi, const gradbuf *gref) {
    double env[NG + 1];
    int q, plain = 1;
    for (q = 0; q < NG && plain; q++) plain = close_tol(gi->p[q], gref->p[q], gi->n[q], ISA_GRAD_ATOL_REL, ISA_GRAD_RTOL);
    if (plain) plain = close_tol(gi->dx, gref->dx, gi->ndx, ISA_GRAD_ATOL_REL, ISA_GRAD_RTOL);
    if (plain || !grad_envelope(k, c, rc, rinfo, gref, env)) return;
    for (q = 0; q < NG; q++)
        REQUIRE(close_scaled(gi->p[q], gref->p[q], gi->n[q], 1.0,
                             ISA_GRAD_ATOL_REL * maxabs(gref->p[q], gi->n[q]) + env[q], ISA_GRAD_RTOL));
    REQUIRE(close_scaled(gi->dx, gref->dx, gi->ndx, 1.0,
                         ISA_GRAD_ATOL_REL * maxabs(gref->dx, gi->ndx) + env[NG], ISA_GRAD_RTOL));
}

/* Everything about the reference forward and backward (P2-P5), then every
   other ISA against it (P6). */
static void run_layer(const fcase *k, const moe_config *rc0) {
    static const moe_isa isas[5] = {MOE_ISA_REFERENCE, MOE_ISA_AUTO, MOE_ISA_AVX2, MOE_ISA_AVX512, MOE_ISA_NEON};
    moe_config c = k->c, rc = *rc0;
    fwdres ref;
    size_t need = 0, D = k->D;
    const size_t ny = k->Tn * D;
    int fin_ok, i;
    gradbuf gref;
    int have_bwd = 0;
    void *ibuf = NULL;
    moe_info bound;

    c.isa = MOE_ISA_REFERENCE;
    REQUIRE(moe_config_resolve(&c, &rc) == MOE_STATUS_OK);
    forward_isa(k, &c, &rc, &ref);

    /* P2: one byte short -> TOO_SMALL, workspace_required, y untouched */
    REQUIRE(moe_forward_workspace_size(&c, k->T, &need) == MOE_STATUS_OK);
    {
        float *y = (float *)xmalloc(ny * sizeof(float));
        moe_info in;
        moe_status st;
        memset(&in, 0, sizeof in);
        if (ny) memset(y, 0x5a, ny * sizeof(float));
        st = fwd(k, &c, y, &in, need - 1, 0x00);
        if (ref.st == MOE_STATUS_MISSING_WEIGHT) REQUIRE(st == MOE_STATUS_MISSING_WEIGHT);
        else if (k->T == 0) REQUIRE(st == MOE_STATUS_OK);   /* no workspace needed */
        else {
            size_t q;
            REQUIRE(st == MOE_STATUS_WORKSPACE_TOO_SMALL && in.workspace_required == need);
            for (q = 0; q < ny * sizeof(float); q++) REQUIRE(((unsigned char *)y)[q] == 0x5a);
        }
        free(y);
    }

    REQUIRE(ref.st == MOE_STATUS_OK || ref.st == MOE_STATUS_NONFINITE || ref.st == MOE_STATUS_MISSING_WEIGHT);
    fin_ok = !k->special && k->missing < 0;
    if (fin_ok) REQUIRE(ref.st == MOE_STATUS_OK);
    if (ref.st == MOE_STATUS_MISSING_WEIGHT) REQUIRE(k->missing >= 0);

    if (ref.st == MOE_STATUS_OK) {
        const moe_info *in = &ref.ib.info;
        fwdres again;
        REQUIRE(router_inputs_finite(k, &rc));
        REQUIRE(all_finite(in->logits, ref.ib.TR));
        check_routing(k, &rc, in, ref.y);
        if (!k->special) {
            REQUIRE(all_finite(ref.y, ny));
            REQUIRE(all_finite(in->scores, ref.ib.TR) && all_finite(in->weight, ref.ib.TS));
            REQUIRE(!ref.ib.soft || all_finite(in->dispatch, ref.ib.TR));
            REQUIRE(info_scalars_finite(in));
        }
        /* P4: a second run on a workspace full of other garbage */
        again.y = (float *)xmalloc(ny * sizeof(float));
        info_alloc(&again.ib, &rc, k->T);
        REQUIRE(fwd(k, &c, again.y, &again.ib.info, need, 0xFF) == MOE_STATUS_OK);
        REQUIRE(same_bytes(ref.y, again.y, ny * sizeof(float)));
        REQUIRE(same_bytes(in->logits, again.ib.info.logits, ref.ib.TR * sizeof(float)));
        REQUIRE(same_routing(in, &again.ib.info, ref.ib.TR, ref.ib.TS, ref.ib.E, ref.ib.soft));
        REQUIRE(same_cache(&ref.ib, &again.ib.info, ref.rows));
        /* P4: the _alloc form, no info */
        REQUIRE(moe_forward_alloc(&c, &k->w, k->t[X_X], k->T, again.y, NULL) == MOE_STATUS_OK);
        REQUIRE(same_bytes(ref.y, again.y, ny * sizeof(float)));
        fwdres_free(&again);

        /* P5: moe_route on the reported logits reproduces the routing (not
           with training noise: moe_route would need the noise logits) */
        if (!(rc.noise == MOE_NOISE_SHAZEER && rc.training)) {
            infobuf rb;
            size_t rneed = 0;
            wsbuf w;
            info_alloc(&rb, &rc, k->T);
            REQUIRE(moe_route_workspace_size(&c, k->T, &rneed) == MOE_STATUS_OK);
            w = ws_make(rneed, k->ws_off, 0x33);
            REQUIRE(moe_route(&c, &k->w, in->logits, NULL, k->T, &rb.info, w.p, rneed) == MOE_STATUS_OK);
            free(w.block);
            REQUIRE(same_routing(in, &rb.info, ref.ib.TR, ref.ib.TS, ref.ib.E, ref.ib.soft));
            info_free(&rb);
        }

        /* moe_info_size + moe_info_bind: same results in the bound arrays */
        {
            size_t ib = 0;
            float *y = (float *)xmalloc(ny * sizeof(float));
            REQUIRE(moe_info_size(&c, k->T, &ib) == MOE_STATUS_OK);
            ibuf = xmalloc(ib + (size_t)k->ws_off);
            memset(&bound, 0, sizeof bound);
            REQUIRE(moe_info_bind(&c, k->T, &bound, (unsigned char *)ibuf + k->ws_off, ib) == MOE_STATUS_OK);
            REQUIRE(fwd(k, &c, y, &bound, need, 0x11) == MOE_STATUS_OK);
            REQUIRE(same_bytes(ref.y, y, ny * sizeof(float)));
            REQUIRE(same_bytes(in->logits, bound.logits, ref.ib.TR * sizeof(float)));
            REQUIRE(same_routing(in, &bound, ref.ib.TR, ref.ib.TS, ref.ib.E, ref.ib.soft));
            REQUIRE(same_cache(&ref.ib, &bound, ref.rows));
            free(y);
        }

        /* backward on the bound info */
        if (k->T > 0) {
            size_t bneed = 0;
            moe_status st;
            gradbuf g2;
            const int expect_ok = rc.save_for_backward;   /* else the forward left no cache */
            REQUIRE(moe_backward_workspace_size(&c, k->T, &bneed) == MOE_STATUS_OK);
            grads_alloc(&gref, k);
            st = bwd(k, &c, &bound, &gref, bneed, 0x00);
            if (expect_ok) REQUIRE(st == MOE_STATUS_OK);
            else REQUIRE(st == MOE_STATUS_MISSING_CACHE);
            if (st == MOE_STATUS_OK) {
                have_bwd = 1;
                if (!k->special)
                    REQUIRE(grads_finite(&gref));
                /* determinism: other garbage in the workspace */
                grads_alloc(&g2, k);
                REQUIRE(bwd(k, &c, &bound, &g2, bneed, 0xFF) == MOE_STATUS_OK);
                REQUIRE(grads_same(&gref, &g2));
                grads_free(&g2);
                /* the _alloc form */
                grads_alloc(&g2, k);
                REQUIRE(moe_backward_alloc(&c, &k->w, k->t[X_X], k->T, &bound, k->t[X_DY], g2.dx, &g2.g) == MOE_STATUS_OK);
                REQUIRE(grads_same(&gref, &g2));
                grad_helpers(k, &c, &g2);
                grads_free(&g2);
                /* the separately allocated info of the first forward */
                grads_alloc(&g2, k);
                REQUIRE(bwd(k, &c, &ref.ib.info, &g2, bneed, 0x22) == MOE_STATUS_OK);
                REQUIRE(grads_same(&gref, &g2));
                grads_free(&g2);
                /* recompute instead of the cache: bitwise the same */
                if (rc.save_for_backward && !rc.recompute) {
                    moe_config cr = c;
                    size_t rneed = 0;
                    cr.recompute = 1;
                    REQUIRE(moe_backward_workspace_size(&cr, k->T, &rneed) == MOE_STATUS_OK);
                    grads_alloc(&g2, k);
                    REQUIRE(bwd(k, &cr, &bound, &g2, rneed, 0x44) == MOE_STATUS_OK);
                    REQUIRE(grads_same(&gref, &g2));
                    grads_free(&g2);
                }
            } else {
                grads_free(&gref);
            }
        }
    }

    if (g_verbose)
        printf("  T=%d E=%d routing=%d training=%d: forward %s, backward %s\n", (int)k->T,
               (int)rc.num_experts, (int)rc.routing, (int)rc.training, moe_status_string(ref.st),
               have_bwd ? "ok" : "not run");

    /* the reference ignores w.packed (and so needs the plain expert tensors) */
    if (k->pack_mode != PK_NONE && k->missing < 0) {
        float *y = (float *)xmalloc(ny * sizeof(float));
        const moe_status st = fwd_w(k, &k->wp, &c, y, NULL, need, 0x55);
        if (k->pack_mode == PK_ONLY) REQUIRE(st == MOE_STATUS_MISSING_WEIGHT);
        else {
            REQUIRE(st == ref.st);
            if (st == MOE_STATUS_OK) REQUIRE(same_bytes(y, ref.y, ny * sizeof(float)));
        }
        free(y);
    }

    /* P6: every other ISA the build and CPU accept */
    for (i = 1; i < 5; i++) {
        moe_config ci = k->c, rci, ct;
        fwdres o;
        int all_same = 1;
        ci.isa = isas[i];
        if (moe_config_resolve(&ci, &rci) != MOE_STATUS_OK) continue;
        ct = ci;   /* the same call with the thread hook toggled */
        if (ct.parallel_for) { ct.parallel_for = NULL; ct.parallel_user = NULL; }
        else { ct.parallel_for = fuzz_parallel_for; ct.parallel_user = &g_pf_user; }
        forward_isa(k, &ci, &rci, &o);
        REQUIRE(o.st == ref.st);
        if (o.st == MOE_STATUS_OK) {
            const moe_info *a = &o.ib.info, *r = &ref.ib.info;
            const int32_t S = moe_routing_slots(&rc);
            const double ymax = maxabs(ref.y, ny);
            int32_t t;
            check_routing(k, &rci, a, o.y);
            if (!k->special) REQUIRE(all_finite(o.y, ny));
            if (all_finite(r->logits, ref.ib.TR)) REQUIRE(close_enough(a->logits, r->logits, ref.ib.TR));
            if (ref.ib.soft) {
                double yenv;   /* cancellation as below: all of y can be an exact 0 */
                if (all_finite(ref.y, ny) && all_finite(r->scores, ref.ib.TR) && !close_enough(o.y, ref.y, ny) &&
                    y_envelope(k, &c, &rc, r, ref.y, &yenv))
                    REQUIRE(close_scaled(o.y, ref.y, ny, 1.0, ISA_ATOL_REL * ymax + yenv, ISA_RTOL));
            } else {
                double yenv = -1.0;         /* perturbation envelope, computed on demand */
                for (t = 0; t < k->T; t++) {
                    const size_t p = (size_t)t * (size_t)S;
                    if (!same_bytes(a->expert + p, r->expert + p, (size_t)S * sizeof(int32_t)) ||
                        !same_bytes(a->dropped + p, r->dropped + p, (size_t)S)) { all_same = 0; continue; }
                    if (all_finite(ref.y + (size_t)t * D, D) && all_finite(r->weight + p, (size_t)S)) {
                        REQUIRE(close_enough(a->weight + p, r->weight + p, (size_t)S));
                        /* scale: all of y (a row of ReLU experts can be 0 in one ISA, 1e-14 in the other);
                           then what 2^-16 input changes do to the reference (cancellation) */
                        if (close_scaled(o.y + (size_t)t * D, ref.y + (size_t)t * D, D, ymax, ISA_ATOL_REL, ISA_RTOL))
                            continue;
                        if (yenv < 0.0 && !y_envelope(k, &c, &rc, r, ref.y, &yenv)) break;
                        REQUIRE(close_scaled(o.y + (size_t)t * D, ref.y + (size_t)t * D, D, 1.0,
                                             ISA_ATOL_REL * ymax + yenv, ISA_RTOL));
                    }
                }
            }
        }
        {   /* any thread count or pool: bitwise the same */
            float *y = (float *)xmalloc(ny * sizeof(float));
            REQUIRE(fwd(k, &ct, y, NULL, o.need, 0x77) == o.st);
            if (o.st == MOE_STATUS_OK) REQUIRE(same_bytes(y, o.y, ny * sizeof(float)));
            free(y);
        }
        if (k->pack_mode != PK_NONE && k->missing < 0 && rci.isa != MOE_ISA_REFERENCE) {
            /* w.packed on the SIMD ISA: bitwise the unpacked run (AUTO in a
               build without SIMD is the reference, checked above) */
            float *y = (float *)xmalloc(ny * sizeof(float));
            const moe_status st = fwd_w(k, &k->wp, &ci, y, NULL, o.need, 0x66);
            if (k->pack_mode == PK_BAD) REQUIRE(st == MOE_STATUS_BAD_PACKED);
            else if (!rci.pack_bf16) {
                REQUIRE(st == o.st);
                if (st == MOE_STATUS_OK) REQUIRE(same_bytes(y, o.y, ny * sizeof(float)));
            } else {   /* bf16 panels: bitwise the fp32 path on bf16-rounded weights */
                float *yr = (float *)xmalloc(ny * sizeof(float));
                REQUIRE(st == o.st);
                REQUIRE(fwd_w(k, &k->wr, &ci, yr, NULL, o.need, 0x65) == st);
                if (st == MOE_STATUS_OK) REQUIRE(same_bytes(y, yr, ny * sizeof(float)));
                free(yr);
            }
            free(y);
        }
        if (have_bwd && o.st == MOE_STATUS_OK) {
            void *ib2;
            size_t ibn = 0, bneed = 0;
            moe_info bi;
            float *y = (float *)xmalloc(ny * sizeof(float));
            gradbuf gi, g2;
            REQUIRE(moe_info_size(&ci, k->T, &ibn) == MOE_STATUS_OK);
            ib2 = xmalloc(ibn);
            memset(&bi, 0, sizeof bi);
            REQUIRE(moe_info_bind(&ci, k->T, &bi, ib2, ibn) == MOE_STATUS_OK);
            REQUIRE(fwd(k, &ci, y, &bi, o.need, 0x00) == MOE_STATUS_OK);
            REQUIRE(moe_backward_workspace_size(&ci, k->T, &bneed) == MOE_STATUS_OK);
            grads_alloc(&gi, k);
            REQUIRE(bwd(k, &ci, &bi, &gi, bneed, 0x00) == MOE_STATUS_OK);
            if (!k->special)
                REQUIRE(grads_finite(&gi));
            if (all_same && grads_finite(&gref) && grads_finite(&gi) && !relu_ambiguous(&rci, &bi, k->T) &&
                !relu_ambiguous(&rc, &bound, k->T)) {
                check_grads_close(k, &c, &rc, &bound, &gi, &gref);
            }
            /* thread hook toggled: bitwise */
            grads_alloc(&g2, k);
            REQUIRE(bwd(k, &ct, &bi, &g2, bneed, 0x99) == MOE_STATUS_OK);
            REQUIRE(grads_same(&gi, &g2));
            grads_free(&g2);
            /* w.packed: the backward reads the plain tensors (recompute: the
               panels, which hold the same numbers) */
            if (k->pack_mode != PK_NONE && k->missing < 0) {
                moe_status st;
                grads_alloc(&g2, k);
                st = bwd_w(k, &k->wp, &ci, &bi, &g2, bneed, 0x88);
                if (k->pack_mode == PK_ONLY) REQUIRE(st == MOE_STATUS_MISSING_WEIGHT);
                else if (k->pack_mode == PK_GOOD && rci.pack_bf16 && rci.recompute)
                    REQUIRE(st == MOE_STATUS_OK);   /* activations from bf16 panels */
                else if (k->pack_mode == PK_GOOD) REQUIRE(st == MOE_STATUS_OK && grads_same(&gi, &g2));
                else REQUIRE(st == MOE_STATUS_BAD_PACKED || (st == MOE_STATUS_OK && grads_same(&gi, &g2)));
                grads_free(&g2);
            }
            grads_free(&gi);
            free(y);
            free(ib2);
        }
        fwdres_free(&o);
    }
    if (have_bwd) grads_free(&gref);
    free(ibuf);
    fwdres_free(&ref);
}

/* --- size-only mode (H_MODE bit 2): shapes too large to run ------------------ */

/* A dimension from one byte: small, a power of two, odd near a power of two,
   or within 63 of INT32_MAX. */
static int32_t huge_dim(uint8_t b) {
    switch (b >> 6) {
    case 0: return 1 + b % 64;
    case 1: return (int32_t)1 << (10 + b % 21);
    case 2: return INT32_MAX - (b & 63);
    default: return ((int32_t)1 << (20 + b % 11)) - 1;
    }
}

/* uint64 arithmetic with an overflow flag: the sizes the documented layouts
   imply, computed without the library's helpers. */
static uint64_t u64_mul(uint64_t a, uint64_t b, int *over) {
    if (b != 0 && a > UINT64_MAX / b) *over = 1;
    return a * b;
}
static uint64_t u64_add(uint64_t a, uint64_t b, int *over) {
    if (a > UINT64_MAX - b) *over = 1;
    return a + b;
}
/* Elements of one FFN's packed panels (moe_pack_weights' layout). */
static uint64_t pack_ffn_elems(uint64_t D, uint64_t F, uint64_t fc, int *over) {
    const uint64_t nr = MOE__NR;
    const uint64_t w13 = u64_mul(u64_mul(F / fc + (F % fc != 0), nr, over), D + (D & 1), over);
    const uint64_t w2 = u64_mul(u64_mul(D / nr + (D % nr != 0), nr, over), F + (F & 1), over);
    return u64_add(w13, w2, over);
}

/* moe_pack_size: OK with exactly the layout's bytes, or SIZE_OVERFLOW exactly
   when they exceed SIZE_MAX. rc resolved. */
static void size_check_pack(const moe_config *rc) {
    const uint64_t fc = is_glu(rc->activation) ? MOE__VL : MOE__NR, es = rc->pack_bf16 ? 2 : 4;
    int over = 0;
    uint64_t want = 64, per;
    size_t got = 0;
    moe_status st;
    per = u64_mul(pack_ffn_elems((uint64_t)rc->d_model, (uint64_t)rc->d_ff, fc, &over), es, &over);
    want = u64_add(want, u64_mul((uint64_t)rc->num_experts, per, &over), &over);
    if (rc->shared_d_ff > 0) {
        const uint64_t sh = pack_ffn_elems((uint64_t)rc->d_model, (uint64_t)rc->shared_d_ff, fc,
                                           &over);
        want = u64_add(want, u64_mul(sh, es, &over), &over);
    }
    if (want > (uint64_t)SIZE_MAX) over = 1;
    st = moe_pack_size(rc, &got);
    if (over) REQUIRE(st == MOE_STATUS_SIZE_OVERFLOW);
    else REQUIRE(st == MOE_STATUS_OK && (uint64_t)got == want);
}

/* moe_info_size: the documented arrays, each 64-byte aligned (+ 64 bytes of
   slack for the base): OK within [sum, sum + 64 * (pieces + 1)], or
   SIZE_OVERFLOW only when that upper end exceeds SIZE_MAX. */
static void size_check_info(const moe_config *rc, int32_t T) {
    const uint64_t Tn = (uint64_t)T, E = (uint64_t)rc->num_experts, D = (uint64_t)rc->d_model;
    const uint64_t F = (uint64_t)rc->d_ff, Fs = (uint64_t)rc->shared_d_ff;
    const int soft = rc->routing == MOE_ROUTING_SOFT, glu = is_glu(rc->activation);
    const int cache = rc->save_for_backward && !rc->recompute;
    int over = 0, i;
    uint64_t R, TR, TS, N, Tc, sum = 0, piece[14], hi;
    size_t got = 0;
    moe_status st;
    R = soft ? E * (uint64_t)rc->slots_per_expert : E;
    TR = u64_mul(Tn, R, &over);
    TS = u64_mul(Tn, (uint64_t)moe_routing_slots(rc), &over);
    N = cache ? (uint64_t)cache_rows(rc, T) : 0;
    Tc = cache ? Tn : 0;
    piece[0] = piece[1] = u64_mul(TR, 4, &over); piece[2] = soft ? piece[0] : 0;
    piece[3] = piece[4] = u64_mul(TS, 4, &over); piece[5] = TS;
    piece[6] = piece[7] = E * 4;
    piece[8] = u64_mul(u64_mul(N, F, &over), 4, &over); piece[9] = glu ? piece[8] : 0;
    piece[10] = u64_mul(u64_mul(N, D, &over), 4, &over);
    piece[11] = u64_mul(u64_mul(Tc, Fs, &over), 4, &over); piece[12] = glu ? piece[11] : 0;
    piece[13] = Fs ? u64_mul(u64_mul(Tc, D, &over), 4, &over) : 0;
    for (i = 0; i < 14; i++) sum = u64_add(sum, piece[i], &over);
    hi = u64_add(sum, 64 * 15, &over);
    if (hi > (uint64_t)SIZE_MAX) over = 1;
    st = moe_info_size(rc, T, &got);
    if (st == MOE_STATUS_OK) REQUIRE(!over || sum <= (uint64_t)SIZE_MAX);
    if (st == MOE_STATUS_OK) REQUIRE((uint64_t)got >= sum && (uint64_t)got <= hi);
    else REQUIRE(st == MOE_STATUS_SIZE_OVERFLOW && over);
}

/* Huge dimensions (up to INT32_MAX): the size queries run without int
   overflow (UBSan), agree with the layouts where those are documented, and
   the workspaces nest: route <= forward <= backward. Nothing is allocated. */
static void size_only(const uint8_t *data, size_t size) {
    uint8_t h[H_COUNT];
    moe_config c, rc;
    int32_t T;
    size_t wr = 0, wf = 0, wb = 0;
    moe_status sr, sf, sb;
    memset(h, 0, sizeof h);
    memcpy(h, data, size < H_COUNT ? size : H_COUNT);
    memset(&c, 0, sizeof c);
    c.num_experts = h[H_E] < 128 ? 1 + h[H_E] % MAX_E : huge_dim(h[H_E]);
    c.d_model = huge_dim(h[H_D]);
    c.d_ff = huge_dim(h[H_F]);
    c.shared_d_ff = h[H_FS] < 160 ? 0 : huge_dim(h[H_FS]);
    c.routing = (moe_routing)(h[H_ROUTING] % 4);
    c.top_k = 1 + h[H_K] % (c.num_experts < 8 ? c.num_experts : 8);
    c.activation = (moe_activation)(h[H_ACT] % 7);
    c.slots_per_expert = 1 + h[H_P] % MAX_P;
    if (c.routing == MOE_ROUTING_EXPERT_CHOICE) {
        c.capacity = h[H_CAP] < 128 ? 0 : huge_dim(h[H_CAP]);
        c.capacity_factor = c.capacity ? 0.0f : 2.0f;
    } else if (c.routing == MOE_ROUTING_TOPK && (h[H_CF] & 1)) {
        c.capacity_factor = 1.25f;
    }
    c.noise = (moe_noise)(c.routing == MOE_ROUTING_TOPK && (h[H_NOISE] & 1));
    c.training = c.save_for_backward = !!(h[H_FLAGS] & F_TRAINING);
    c.recompute = !!(h[H_FLAGS] & F_RECOMPUTE);
    c.pack_bf16 = !!(h[H_PACK] & 16);
    c.isa = (h[H_ISA] & 1) ? MOE_ISA_REFERENCE : MOE_ISA_AUTO;
    T = h[H_T] < 128 ? h[H_T] % (MAX_T + 1) : huge_dim(h[H_T]);
    if (g_verbose)
        printf("  size-only: T=%d E=%d K=%d D=%d F=%d Fs=%d routing=%d\n", (int)T,
               (int)c.num_experts, (int)c.top_k, (int)c.d_model, (int)c.d_ff, (int)c.shared_d_ff,
               (int)c.routing);
    if (moe_config_resolve(&c, &rc) != MOE_STATUS_OK) return;   /* e.g. E * P > INT32_MAX */
    size_check_pack(&rc);
    size_check_info(&rc, T);
    sr = moe_route_workspace_size(&rc, T, &wr);
    sf = moe_forward_workspace_size(&rc, T, &wf);
    sb = moe_backward_workspace_size(&rc, T, &wb);
    REQUIRE(sr == MOE_STATUS_OK || sr == MOE_STATUS_SIZE_OVERFLOW);
    REQUIRE(sf == MOE_STATUS_OK || sf == MOE_STATUS_SIZE_OVERFLOW);
    REQUIRE(sb == MOE_STATUS_OK || sb == MOE_STATUS_SIZE_OVERFLOW);
    if (sf == MOE_STATUS_OK) REQUIRE(sr == MOE_STATUS_OK && wr <= wf);
    if (sb == MOE_STATUS_OK) REQUIRE(sf == MOE_STATUS_OK && wf <= wb);
    if (sr == MOE_STATUS_OK) {   /* the scores [T][R] live in every workspace */
        const uint64_t R = rc.routing == MOE_ROUTING_SOFT ?
                           (uint64_t)rc.num_experts * (uint64_t)rc.slots_per_expert :
                           (uint64_t)rc.num_experts;
        REQUIRE((uint64_t)wr >= (uint64_t)T * R * 4);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fcase k;
    moe_config rc;
    moe_status st;
    if (size > H_MODE && (data[H_MODE] & 4)) {   /* size-only mode: nothing to run */
        size_only(data, size);
        return 0;
    }
    decode(&k, data, size);
    g_case = &k;

    /* P2: resolve, and every entry point agrees on a config-level error */
    memset(&rc, 0, sizeof rc);
    st = moe_config_resolve(&k.c, &rc);
    REQUIRE(st >= MOE_STATUS_OK && st < MOE_STATUS_COUNT);
    if (st == MOE_STATUS_OK && k.T < 0) st = MOE_STATUS_BAD_DIMENSION;
    if (st != MOE_STATUS_OK) {
        if (g_verbose) printf("  config: %s\n", moe_status_string(st));
        check_config_errors(&k, st);
    }
    /* the layer runs on the reference ISA; run_layer then tries every other
       one (a decoded ISA this build lacks only changes the status above) */
    k.c.isa = MOE_ISA_REFERENCE;
    st = moe_config_resolve(&k.c, &rc);
    if (st == MOE_STATUS_OK && k.T >= 0) {
        moe_config rc2;
        /* resolve is idempotent on its own output */
        REQUIRE(moe_config_resolve(&rc, &rc2) == MOE_STATUS_OK);
        REQUIRE(rc2.n_group == rc.n_group && rc2.topk_group == rc.topk_group &&
                rc2.group_score_top == rc.group_score_top && rc2.slots_per_expert == rc.slots_per_expert &&
                rc2.isa == rc.isa && rc2.routed_scale == rc.routed_scale && rc2.norm_p == rc.norm_p &&
                rc2.second_threshold == rc.second_threshold);
        run_route(&k, &rc);
        run_layer(&k, &rc);
    }
    g_case = NULL;
    free_case(&k);
    return 0;
}

/* --- standalone replay and seed writer (no libFuzzer) ------------------------------ */
#ifdef FUZZ_STANDALONE
#include <dirent.h>
#include <sys/stat.h>

static int replay_file(const char *path) {
    FILE *f = fopen(path, "rb");
    uint8_t *buf;
    long n;
    if (!f) { fprintf(stderr, "fuzz_moe: cannot open %s\n", path); return 1; }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = (uint8_t *)xmalloc((size_t)(n > 0 ? n : 0));
    if (n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n) { fclose(f); free(buf); return 1; }
    fclose(f);
    LLVMFuzzerTestOneInput(buf, (size_t)n);
    free(buf);
    return 0;
}

/* --- seeds: one per routing family and feature, plus bad input ------------- */
typedef struct seed { const char *name; uint8_t h[H_COUNT]; uint8_t fills[2 * NT]; uint8_t pokes[1 + 4 * 8]; } seed;

static void seed_base(seed *s, const char *name, int T, int E, int K, int D, int F) {
    int i;
    memset(s, 0, sizeof *s);
    s->name = name;
    s->h[H_T] = (uint8_t)T; s->h[H_E] = (uint8_t)(E - 1); s->h[H_K] = (uint8_t)(K - 1);
    s->h[H_D] = (uint8_t)(D - 1); s->h[H_F] = (uint8_t)(F - 1);
    for (i = 0; i < NT; i++) { s->fills[2 * i] = 0; s->fills[2 * i + 1] = 2; }   /* uniform(-1, 1) */
    s->h[H_SEED] = 7;
}
static int write_seed(const char *dir, const seed *s) {
    char path[512];
    FILE *f;
    size_t np = s->pokes[0] % 9;
    snprintf(path, sizeof path, "%s/%s", dir, s->name);
    f = fopen(path, "wb");
    if (!f) { fprintf(stderr, "fuzz_moe: cannot write %s\n", path); return 1; }
    fwrite(s->h, 1, H_COUNT, f);
    fwrite(s->fills, 1, sizeof s->fills, f);
    fwrite(s->pokes, 1, 1 + 4 * np, f);
    fclose(f);
    return 0;
}
static void poke(seed *s, int tensor, int index, int code) {
    int n = s->pokes[0]++;
    s->pokes[1 + 4 * n] = (uint8_t)tensor; s->pokes[2 + 4 * n] = (uint8_t)(index & 255);
    s->pokes[3 + 4 * n] = (uint8_t)(index >> 8); s->pokes[4 + 4 * n] = (uint8_t)code;
}
/* value codes of poke_value(): finite (b >> 1) % 8 with b even; special b odd */
enum { V_ZERO = 0, V_FOUR = 2, V_DENORM_MIN = 6, V_NAN = 1, V_INF = 3, V_NINF = 5, V_HUGE = 7 };

static int make_seeds(const char *dir) {
    seed s;
    int bad = 0;
    /* mixtral: softmax top-2, SwiGLU, training with balance + z-loss */
    seed_base(&s, "mixtral_train", 16, 8, 2, 8, 8);
    s.h[H_FLAGS] = F_TRAINING; s.h[H_BAL] = 2; s.h[H_Z] = 3;
    s.h[H_PACK] = PK_GOOD | 16; s.h[H_THREADS] = 4 | 2;   /* bf16 packed weights, pool, 2 threads */
    bad |= write_seed(dir, &s);
    /* switch: top-1 ReLU, cf 1.25 (Megatron), jitter, z-loss, expert biases */
    seed_base(&s, "switch_capacity_jitter", 24, 4, 1, 6, 5);
    s.h[H_ACT] = 3; s.h[H_NORM] = 1; s.h[H_CAP] = 0; s.h[H_CF] = 4; s.h[H_JITTER] = 2; s.h[H_Z] = 3;
    s.h[H_FLAGS] = F_TRAINING | F_EXPERT_BIAS; s.h[H_DROPOUT] = 3; s.h[H_INIT] = 1;   /* expert dropout 0.5 */
    bad |= write_seed(dir, &s);
    /* gshard: random second expert, cf 1, first-choice loss, after-drop norm */
    seed_base(&s, "gshard_random_second", 20, 4, 2, 5, 4);
    s.h[H_SECOND] = 1; s.h[H_CF] = 3; s.h[H_BALANCE] = 2; s.h[H_BAL] = 2;
    s.h[H_FLAGS] = F_TRAINING | F_NORM_AFTER_DROP; s.h[H_ACT] = 3; s.h[H_WARM] = 2; s.h[H_CLIPNORM] = 2;
    bad |= write_seed(dir, &s);
    /* fairseq sampled second expert, GELU, drop by weight, capacity 2 */
    seed_base(&s, "sampled_second_drop_weight", 12, 6, 2, 4, 6);
    s.h[H_SECOND] = 2; s.h[H_CAP] = 129; s.h[H_DROP] = 2; s.h[H_ACT] = 4; s.h[H_FLAGS] = F_TRAINING;
    bad |= write_seed(dir, &s);
    /* shazeer noisy top-4, importance + load, noise eps */
    seed_base(&s, "shazeer_noise", 16, 8, 4, 6, 4);
    s.h[H_NOISE] = 1; s.h[H_NEPS] = 1; s.h[H_IMP] = 4; s.h[H_LOAD] = 4; s.h[H_ACT] = 3;
    s.h[H_FLAGS] = F_TRAINING;
    bad |= write_seed(dir, &s);
    /* deepseek-v3: sigmoid, selection bias, groups 4 / topk_group 2 / sum top-2,
       x2.5, eps, shared expert, sequence-wise loss with seq_len 4 */
    seed_base(&s, "deepseek_v3", 12, 8, 2, 8, 4);
    s.h[H_SCORE] = 1; s.h[H_FLAGS] = F_SEL_BIAS | F_TRAINING; s.h[H_NGROUP] = 3; s.h[H_TOPKG] = 2;
    s.h[H_GST] = 2; s.h[H_RSCALE] = 3; s.h[H_NORMEPS] = 2; s.h[H_FS] = 160 + 5; s.h[H_SEQ] = 2;
    s.h[H_SEQLEN] = 4;
    bad |= write_seed(dir, &s);
    /* deepseek-v2: group max with HF 0.0 mask, no renorm, x16, gated shared, fused gate_up */
    seed_base(&s, "deepseek_v2_gated_shared_fused", 10, 8, 3, 6, 4);
    s.h[H_NGROUP] = 3; s.h[H_TOPKG] = 2; s.h[H_GST] = 1; s.h[H_NORM] = 1; s.h[H_RSCALE] = 4;
    s.h[H_FLAGS] = F_MASK_ZERO | F_SHARED_GATE | F_TRAINING | F_EXPERT_BIAS; s.h[H_FS] = 160 + 3;
    s.h[H_FLAGS2] = F2_FUSED; s.h[H_PACK] = PK_ONLY; s.h[H_THREADS] = 4;
    bad |= write_seed(dir, &s);
    /* expert choice: capacity 3, GEGLU, training, recompute */
    seed_base(&s, "expert_choice", 10, 4, 1, 4, 5);
    s.h[H_ROUTING] = 1; s.h[H_CAP] = 130; s.h[H_ACT] = 1; s.h[H_FLAGS] = F_TRAINING | F_RECOMPUTE;
    s.h[H_PACK] = PK_GOOD; s.h[H_THREADS] = 4;
    bad |= write_seed(dir, &s);
    /* expert choice by capacity factor (lingvo), sigmoid, router bias */
    seed_base(&s, "expert_choice_cf_sigmoid", 9, 3, 1, 5, 3);
    s.h[H_ROUTING] = 1; s.h[H_CF] = 5; s.h[H_FORMULA] = 4; s.h[H_SCORE] = 1;
    s.h[H_FLAGS] = F_TRAINING | F_ROUTER_BIAS;
    bad |= write_seed(dir, &s);
    /* dense: p-norm p = 2, GEGLU tanh, training */
    seed_base(&s, "dense_pnorm", 7, 5, 1, 4, 4);
    s.h[H_ROUTING] = 2; s.h[H_NORM] = 2; s.h[H_NORMP] = 2; s.h[H_ACT] = 2; s.h[H_FLAGS] = F_TRAINING;
    s.h[H_PACK] = PK_BAD;   /* garbage w.packed */
    bad |= write_seed(dir, &s);
    /* Soft MoE: 2 slots per expert, learnable scale, training */
    seed_base(&s, "soft_moe", 6, 3, 1, 5, 4);
    s.h[H_ROUTING] = 3; s.h[H_P] = 2; s.h[H_FLAGS2] = F2_SCALE; s.h[H_SCALE] = 1; s.h[H_ACT] = 4;
    s.h[H_FLAGS] = F_TRAINING; s.h[H_THREADS] = 4;
    bad |= write_seed(dir, &s);
    /* capacity 1 with batch-prioritised dropping, router grad clip */
    seed_base(&s, "capacity_one_bpr_clip", 16, 4, 2, 4, 4);
    s.h[H_CAP] = 128; s.h[H_DROP] = 1; s.h[H_CLIP] = 2; s.h[H_FLAGS] = F_TRAINING; s.h[H_BAL] = 4;
    bad |= write_seed(dir, &s);
    /* ties: constant x and router, K = E */
    seed_base(&s, "ties_k_equals_e", 8, 4, 4, 4, 3);
    s.fills[2 * X_X] = 1; s.fills[2 * X_X + 1] = 1 << 2; s.fills[2 * X_ROUTER] = 1;
    s.h[H_FLAGS] = F_TRAINING; s.h[H_BAL] = 4; s.h[H_Z] = 4;
    bad |= write_seed(dir, &s);
    /* denormal x and router weights, E = 1 */
    seed_base(&s, "denormals_e1", 5, 1, 1, 6, 3);
    s.h[H_MODE] = 1; s.fills[2 * X_X] = 3; s.fills[2 * X_ROUTER] = 3; s.fills[2 * X_GATE] = 3;
    s.h[H_FLAGS] = F_TRAINING;
    bad |= write_seed(dir, &s);
    /* largest finite magnitudes: |x| = |w| = 4, D = F = 32, sigmoid */
    seed_base(&s, "max_magnitude", 4, 4, 2, 32, 32);
    {
        int i;
        for (i = 0; i < NT; i++) { s.fills[2 * i] = 4; s.fills[2 * i + 1] = 3; }
    }
    s.h[H_SCORE] = 1; s.h[H_FLAGS] = F_TRAINING | F_EXPERT_BIAS;
    bad |= write_seed(dir, &s);
    /* NaN in x, Inf in the router, huge finite x: NONFINITE / OK */
    seed_base(&s, "nan_in_x", 6, 4, 2, 4, 4);
    s.h[H_MODE] = VC_SPECIAL; poke(&s, X_X, 5, V_NAN);
    bad |= write_seed(dir, &s);
    seed_base(&s, "inf_in_router", 6, 4, 2, 4, 4);
    s.h[H_MODE] = VC_SPECIAL; poke(&s, X_ROUTER, 3, V_INF); poke(&s, X_LOGITS, 1, V_NINF);
    bad |= write_seed(dir, &s);
    seed_base(&s, "huge_x_sigmoid", 6, 4, 2, 4, 4);
    s.h[H_MODE] = VC_SPECIAL; s.h[H_SCORE] = 1; poke(&s, X_X, 2, V_HUGE); poke(&s, X_DOWN, 0, V_NAN);
    s.h[H_FLAGS] = F_TRAINING;
    bad |= write_seed(dir, &s);
    /* regressions of fixed moe.h bugs: denormal sigmoid scores, Shazeer
       noise with sigma = 0, a backward that read an unchecked w.packed,
       seq_len near INT32_MAX */
    seed_base(&s, "regress_sigmoid_underflow", 3, 2, 2, 24, 3);
    s.h[H_SCORE] = 1; s.h[H_FLAGS] = F_TRAINING;
    s.fills[2 * X_X] = 1; s.fills[2 * X_X + 1] = 4 << 2;             /* x = 4       */
    s.fills[2 * X_ROUTER] = 1; s.fills[2 * X_ROUTER + 1] = 2 << 2;   /* router = -1 */
    bad |= write_seed(dir, &s);
    seed_base(&s, "regress_backward_stale_packed", 6, 3, 1, 8, 6);   /* recompute + w.packed of d_ff 5 */
    s.h[H_FLAGS] = F_TRAINING | F_RECOMPUTE; s.h[H_PACK] = PK_BAD | 8;
    bad |= write_seed(dir, &s);
    seed_base(&s, "regress_seq_len_overflow", 4, 4, 2, 4, 3);   /* seq_len near INT32_MAX */
    s.h[H_FLAGS] = F_TRAINING; s.h[H_SEQLEN] = 232; s.h[H_CAP] = 232; s.h[H_SEQ] = 2;
    bad |= write_seed(dir, &s);
    seed_base(&s, "regress_shazeer_zero_sigma", 4, 4, 2, 8, 3);
    s.h[H_NOISE] = 1; s.h[H_LOAD] = 4; s.h[H_FLAGS] = F_TRAINING;
    s.fills[2 * X_X] = 1; s.fills[2 * X_X + 1] = 4 << 2;             /* x = 4             */
    s.fills[2 * X_RNOISE] = 1; s.fills[2 * X_RNOISE + 1] = 5 << 2;   /* router_noise = -4 */
    bad |= write_seed(dir, &s);
    /* size-only mode: d_model, d_ff, both, and E, T near INT32_MAX (issue 15) */
    seed_base(&s, "size_d_model_int32_max", 4, 4, 2, 1, 8);
    s.h[H_MODE] = 4; s.h[H_D] = 128 + 3; s.h[H_F] = 7; s.h[H_FLAGS] = F_TRAINING;
    bad |= write_seed(dir, &s);
    seed_base(&s, "size_d_ff_int32_max_bf16", 4, 4, 2, 8, 1);
    s.h[H_MODE] = 4; s.h[H_D] = 5; s.h[H_F] = 128; s.h[H_FS] = 128 + 41; s.h[H_PACK] = 16;
    s.h[H_ACT] = 3;
    bad |= write_seed(dir, &s);
    seed_base(&s, "size_all_huge", 4, 4, 2, 8, 8);
    s.h[H_MODE] = 4; s.h[H_D] = 128 + 1; s.h[H_F] = 128 + 2; s.h[H_E] = 128 + 64 + 5;
    s.h[H_T] = 128 + 64 + 10; s.h[H_FLAGS] = F_TRAINING; s.h[H_ROUTING] = 2;
    bad |= write_seed(dir, &s);
    seed_base(&s, "size_expert_choice_huge_t", 4, 4, 2, 8, 8);
    s.h[H_MODE] = 4; s.h[H_T] = 128 + 2; s.h[H_ROUTING] = 1; s.h[H_CAP] = 128 + 7;
    s.h[H_F] = 64 + 20; s.h[H_FLAGS] = F_TRAINING;
    bad |= write_seed(dir, &s);
    /* option ranges (issue 15): the largest valid values must stay finite
       (p-norm p = 1000 once gave NaN gradients), and values just past them
       are BAD_OPTION (a balance coefficient of 3e38 once made aux_total Inf) */
    seed_base(&s, "limits_largest_options", 12, 4, 2, 6, 5);
    s.h[H_FLAGS] = F_TRAINING; s.h[H_NORM] = 2; s.h[H_NORMP] = 3; s.h[H_RSCALE] = 6;
    s.h[H_BAL] = 5; s.h[H_Z] = 5; s.h[H_IMP] = 5; s.h[H_LOAD] = 5; s.h[H_SEQ] = 5;
    s.h[H_SEQLEN] = 6;
    s.h[H_NOISE] = 1; s.h[H_NEPS] = 4; s.h[H_WARM] = 4;
    bad |= write_seed(dir, &s);
    seed_base(&s, "limits_pnorm_flt_max", 12, 4, 3, 6, 5);
    s.h[H_FLAGS] = F_TRAINING; s.h[H_NORM] = 2; s.h[H_NORMP] = 5; s.h[H_SCORE] = 1; s.h[H_BAL] = 5;
    bad |= write_seed(dir, &s);
    seed_base(&s, "limits_coef_3e38", 12, 4, 2, 6, 5);
    s.h[H_FLAGS] = F_TRAINING; s.h[H_BAL] = 244;
    bad |= write_seed(dir, &s);
    /* bad input: unknown enum, NULL weight, K > E */
    seed_base(&s, "bad_enum", 4, 4, 2, 4, 4);
    s.h[H_ACT] = 241;
    bad |= write_seed(dir, &s);
    seed_base(&s, "missing_weight", 4, 4, 2, 4, 4);
    s.h[H_MISSING] = 236 + 6;   /* down */
    bad |= write_seed(dir, &s);
    seed_base(&s, "k_too_large", 4, 4, 2, 4, 4);
    s.h[H_K] = 241;
    bad |= write_seed(dir, &s);
    return bad;
}

int main(int argc, char **argv) {
    int i, n = 0, bad = 0;
    if (argc == 3 && strcmp(argv[1], "--make-seeds") == 0) return make_seeds(argv[2]);
    g_verbose = getenv("FUZZ_VERBOSE") != NULL;
    for (i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) == 0 && S_ISDIR(st.st_mode)) {
            DIR *d = opendir(argv[i]);
            struct dirent *e;
            if (!d) { bad = 1; continue; }
            while ((e = readdir(d)) != NULL) {
                char path[4096];
                if (e->d_name[0] == '.') continue;
                snprintf(path, sizeof path, "%s/%s", argv[i], e->d_name);
                if (g_verbose) printf("%s\n", path);
                bad |= replay_file(path);
                n++;
            }
            closedir(d);
        } else {
            bad |= replay_file(argv[i]);
            n++;
        }
    }
    if (bad) printf("fuzz_moe: replayed %d inputs; some could not be read\n", n);
    else printf("fuzz_moe: replayed %d input%s, all properties held\n", n, n == 1 ? "" : "s");
    return bad;
}
#endif
