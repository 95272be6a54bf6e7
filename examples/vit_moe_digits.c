/* vit_moe_digits.c -- a Vision Transformer whose feed-forward layers are
   Mixture-of-Experts layers (a small V-MoE), trained from scratch in plain C
   on real handwritten digits: the UCI 8x8 digits that scikit-learn ships
   (examples/data/: 1437 training and 360 test images, 10 classes).

     8x8 image -> 9 overlapping 4x4 patches (stride 2) -> linear patch
     embedding + learned position embedding -> 2 blocks of
       [pre-LN 2-head self-attention, pre-LN MoE FFN (moe.h: 4 SwiGLU
        experts, top-2, Mixtral routing)]
     -> final LayerNorm -> mean over the 9 tokens -> linear head -> softmax
     cross-entropy (+ 0.01 x the Switch/HF load-balancing loss per layer).

   What it shows: the tokens of all the images of a minibatch go through ONE
   moe_forward call per layer (T = 32 images x 9 tokens = 288), with
   cfg.training = 1 (train mode: the noise and dropout below),
   cfg.save_for_backward = 1 and a moe_info bound by moe_info_bind (what the
   backward reads); moe_backward then
   returns the input gradient the rest of the network needs and adds the
   balance loss's gradient (cfg.balance_coef). The training recipe uses the
   library's helpers: moe_init_weights (one stream per expert, so experts
   start different), warm-up router noise (cfg.router_noise_std, 1 -> 0 over
   the first 300 steps), expert dropout (cfg.expert_dropout = 0.1),
   moe_grads_zero, moe_grads_clip_norm, and a smaller AdamW step for the
   routers than for the experts. Attention, LayerNorm, the embeddings, the
   head, softmax cross-entropy, all their backward passes and AdamW are
   written here, simply, each step with its formula. Test accuracy is
   measured with cfg.training = 0 (no noise, no dropout).
   Result (20 epochs = 880 steps; gcc 12 -O2, x86-64), the final test accuracy printed:
     build flags                       make vit-demo on  seed 1                seeds 1..6
     none: the scalar reference                          98.06 % (353 of 360)  97.78..98.33 %
     -mavx2 -mfma -fopenmp             an AVX2 CPU       98.61 % (355 of 360)  97.50..98.61 %
     -mavx512f -mavx512bf16 -fopenmp   an AVX-512 CPU    98.06 % (353 of 360)  98.06..99.17 %
   The builds differ because FMA and blocked sums round differently and
   training amplifies it. 18 s wall with the reference kernels, 6 s with
   AVX2 or AVX-512 (2-core x86-64 VM). vit_moe_digits.svg in this directory
   is the AVX2 run (make vit-demo HOST_AVX512= on any AVX2 CPU).

   Prints test accuracy per epoch, the final expert load of each layer, and
   writes vit_moe_digits.svg: test accuracy and expert load over training,
   final load per expert, and the misclassified test digits.

   build: cc -std=c99 -O2 -o vit_moe_digits examples/vit_moe_digits.c -lm
   run:   ./vit_moe_digits [digits.txt] [output directory] [epochs] [seed]
          (defaults: examples/data/digits.txt . 20 1)

   tests/test_vit.c includes this file with VIT_MOE_DIGITS_NO_MAIN defined and
   calls vm_train() for a short run; then main() and MOE_IMPLEMENTATION are
   left out.                                                                 */
#ifndef VIT_MOE_DIGITS_NO_MAIN
#define MOE_IMPLEMENTATION
#endif
#include "../moe.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------
   Shapes. Override with -D to experiment (-DVM_PATCH=2 -DVM_STRIDE=2 gives
   16 non-overlapping 2x2 patches: ~1.8x the tokens, slower to learn).      */
#ifndef VM_PATCH
#define VM_PATCH 4            /* patch side in pixels                          */
#endif
#ifndef VM_STRIDE
#define VM_STRIDE 2           /* patch stride: (8 - 4) / 2 + 1 = 3 per side     */
#endif
#ifndef VM_DMODEL
#define VM_DMODEL 32          /* D: token width                                 */
#endif
#ifndef VM_HEADS
#define VM_HEADS 2            /* attention heads (divide D)                     */
#endif
#ifndef VM_EXPERTS
#define VM_EXPERTS 4          /* E: experts per MoE layer                       */
#endif
#ifndef VM_TOPK
#define VM_TOPK 2             /* K: experts per token                           */
#endif
#ifndef VM_DFF
#define VM_DFF 64             /* F: hidden width of one expert                  */
#endif
#ifndef VM_LAYERS
#define VM_LAYERS 2           /* transformer blocks                             */
#endif
#ifndef VM_BATCH
#define VM_BATCH 32           /* images per step                                */
#endif

/* Training knobs, tuned for this demo (seeds 1..6, 20 epochs). */
#ifndef VM_LR
#define VM_LR 3e-3            /* AdamW step: experts and the non-MoE tensors    */
#endif
#ifndef VM_ROUTER_LR
#define VM_ROUTER_LR 1e-3     /* AdamW step of the routers (why: training step 5) */
#endif
#ifndef VM_WEIGHT_DECAY
#define VM_WEIGHT_DECAY 1.0   /* AdamW decoupled decay of the matrices: without
                                 it 95.56..97.50 % over seeds 1..6 (AVX2; the
                                 model overfits 1437 images), with it
                                 97.50..98.61 %; 0.5..2 gave similar results */
#endif
#ifndef VM_WARMUP
#define VM_WARMUP 50          /* steps of linear learning-rate warm-up          */
#endif
#ifndef VM_BALANCE_COEF
#define VM_BALANCE_COEF 0.01f /* Switch/HF load-balancing loss weight           */
#endif
#ifndef VM_NOISE_STD
#define VM_NOISE_STD 1.0f     /* warm-up router noise std at step 0 ...         */
#endif
#ifndef VM_NOISE_STEPS
#define VM_NOISE_STEPS 300    /* ... falling linearly to 0 at this step         */
#endif
#ifndef VM_DROPOUT
#define VM_DROPOUT 0.1f       /* expert dropout (training only)                 */
#endif
#ifndef VM_CLIP
#define VM_CLIP 1.0f          /* global-norm gradient clipping, per group       */
#endif

enum {
    VM_SIDE = 8,                                    /* image side              */
    VM_PIX = VM_SIDE * VM_SIDE,                     /* 64 pixels               */
    VM_GRID = (VM_SIDE - VM_PATCH) / VM_STRIDE + 1, /* patches per side        */
    VM_N = VM_GRID * VM_GRID,                       /* tokens per image        */
    VM_PD = VM_PATCH * VM_PATCH,                    /* pixels per patch        */
    VM_D = VM_DMODEL, VM_H = VM_HEADS, VM_DH = VM_DMODEL / VM_HEADS,
    VM_E = VM_EXPERTS, VM_K = VM_TOPK, VM_F = VM_DFF, VM_L = VM_LAYERS,
    VM_B = VM_BATCH,
    VM_TMAX = VM_BATCH * VM_N,                      /* MoE tokens per call     */
    VM_C = 10,                                      /* classes                 */
    VM_NPARAM = 3 + 12 * VM_LAYERS + 4              /* tensors in the model    */
};

/* ---------------------------------------------------------------------------
   The data: "label v0 .. v63" per line, pixels 0..16 (examples/data/README.md).
   The file is already shuffled: the last ceil(n/5) samples (360 of 1797) are
   the test set, the others (1437) the training set.                        */
typedef struct vm_data {
    int n, n_train;           /* samples; the first n_train are for training  */
    float *x;                 /* [n][64] pixels / 16, in [0, 1]               */
    unsigned char *y;         /* [n] labels 0..9                              */
} vm_data;

static void vm_data_free(vm_data *d) { free(d->x); free(d->y); memset(d, 0, sizeof *d); }

static int vm_data_load(const char *path, vm_data *d) {
    FILE *f = fopen(path, "r");
    int cap = 2048, v, i, bad = 0;
    memset(d, 0, sizeof *d);
    if (!f) return 0;
    d->x = (float *)malloc((size_t)cap * VM_PIX * sizeof(float));
    d->y = (unsigned char *)malloc((size_t)cap);
    bad = !d->x || !d->y;
    while (!bad && fscanf(f, "%d", &v) == 1) {
        if (d->n == cap) {                        /* grow x and y */
            float *nx = (float *)realloc(d->x, (size_t)2 * cap * VM_PIX * sizeof(float));
            unsigned char *ny = nx ? (unsigned char *)realloc(d->y, (size_t)2 * cap) : NULL;
            if (nx) d->x = nx;
            if (ny) d->y = ny;
            if (!ny) { bad = 1; break; }
            cap *= 2;
        }
        bad = v < 0 || v > 9;
        d->y[d->n] = (unsigned char)v;
        for (i = 0; i < VM_PIX && !bad; i++) {
            bad = fscanf(f, "%d", &v) != 1 || v < 0 || v > 16;
            d->x[(size_t)d->n * VM_PIX + i] = (float)v / 16.0f;
        }
        d->n++;
    }
    bad |= !feof(f) || d->n < 10;                 /* stopped early: malformed */
    fclose(f);
    if (bad) { vm_data_free(d); return 0; }
    d->n_train = d->n - (d->n + 4) / 5;
    return 1;
}

/* xorshift64* and Box-Muller: minibatch order and the non-MoE initial weights. */
static double vm_uniform(uint64_t *s) {
    *s ^= *s >> 12; *s ^= *s << 25; *s ^= *s >> 27;
    return ((double)((*s * 2685821657736338717ull) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
static double vm_normal(uint64_t *s) {
    double u1 = vm_uniform(s), u2 = vm_uniform(s);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ---------------------------------------------------------------------------
   Parameters: a tensor with its gradient and AdamW's two moments. The group
   picks the learning rate and the clipping group; decay: a matrix (AdamW
   decays matrices, not biases, gains or the position embedding).          */
enum { VM_GROUP_DENSE = 0, VM_GROUP_ROUTER = 1, VM_GROUP_EXPERT = 2 };
typedef struct vm_param { float *w, *g, *m, *v; size_t n; int group, decay; } vm_param;

/* One transformer block: attention and MoE, and the moe.h views of the MoE
   tensors (moe_weights reads them, moe_grads accumulates into them).       */
typedef struct vm_block {
    vm_param ln1_g, ln1_b;    /* [D] LayerNorm before attention                */
    vm_param wqkv, bqkv;      /* [3D][D], [3D]: rows of Wq, then Wk, then Wv   */
    vm_param wo, bo;          /* [D][D], [D]: attention output projection      */
    vm_param ln2_g, ln2_b;    /* [D] LayerNorm before the MoE                  */
    vm_param router;          /* [E][D]                                        */
    vm_param gate, up, down;  /* [E][F][D], [E][F][D], [E][D][F] (SwiGLU)      */
    moe_weights w;
    moe_grads g;
} vm_block;

typedef struct vm_model {
    vm_param patch_w, patch_b;/* [D][PD], [D]: patch embedding                */
    vm_param pos;             /* [N][D] learned position embedding            */
    vm_block blk[VM_L];
    vm_param lnf_g, lnf_b;    /* [D] final LayerNorm                          */
    vm_param head_w, head_b;  /* [C][D], [C]: classifier                      */
    vm_param *all[VM_NPARAM]; /* every tensor above, for AdamW and clipping   */
    int n_all;
    moe_config cfg;           /* the MoE layers' config (training fields set per step) */
} vm_model;

/* Activations of one block, kept by the forward for the backward. T = nb*N. */
typedef struct vm_block_acts {
    float *x_in;              /* [T][D]  block input (residual stream)       */
    float *xhat1, *rstd1, *a; /* LN1: normalised x, 1/std per token, output  */
    float *qkv;               /* [T][3D]                                     */
    float *att;               /* [B][H][N][N] attention probabilities        */
    float *ctx;               /* [T][D]  heads' outputs, concatenated        */
    float *x_mid;             /* [T][D]  x_in + attention                    */
    float *xhat2, *rstd2, *m; /* LN2: ..., m = MoE input                     */
    float *y;                 /* [T][D]  MoE output                          */
    moe_info info;            /* routing and expert cache of this step       */
    void *info_buf;
} vm_block_acts;

typedef struct vm_acts {
    float *patches;           /* [T][PD] pixels of every patch               */
    vm_block_acts blk[VM_L];
    float *x_out;             /* [T][D]  last block's output                 */
    float *xhatf, *rstdf, *z; /* final LN                                    */
    float *pooled;            /* [B][D]  mean over the image's tokens        */
    float *prob;              /* [B][C]  softmax of the logits               */
    /* backward scratch */
    float *dx, *dx2, *dqkv, *dctx, *dm, *dpooled, *dlogit;
    void *ws;                 /* moe.h workspace (forward and backward)      */
    size_t ws_bytes;
    int32_t eval_routed[VM_L][VM_E], eval_kept[VM_L][VM_E]; /* inference info arrays */
} vm_acts;

/* w = fill + scale * N(0, 1) per element. */
static int vm_param_init(vm_model *mo, vm_param *p, size_t n, int group, int decay,
                         double scale, double fill, uint64_t *rng) {
    size_t i;
    p->n = n; p->group = group; p->decay = decay;
    p->w = (float *)calloc(4 * n, sizeof(float));
    if (!p->w) return 0;
    p->g = p->w + n; p->m = p->w + 2 * n; p->v = p->w + 3 * n;
    for (i = 0; i < n; i++) p->w[i] = (float)(fill + scale * vm_normal(rng));
    mo->all[mo->n_all++] = p;
    return 1;
}

static void vm_model_free(vm_model *mo) {
    int i;
    for (i = 0; i < mo->n_all; i++) free(mo->all[i]->w);
    mo->n_all = 0;
}

/* Weights: LayerNorm gain 1 and bias 0; linear maps N(0, 1/fan_in); position
   embedding N(0, 0.02^2); zero head (the first loss is ln 10). The MoE
   tensors come from moe_init_weights (Xavier/Glorot uniform, its own stream
   per expert, so the experts start different).                             */
static int vm_model_init(vm_model *mo, uint64_t seed) {
    const size_t D = VM_D, F = VM_F, E = VM_E;
    const double s_pd = 1.0 / sqrt((double)VM_PD), s_d = 1.0 / sqrt((double)VM_D);
    uint64_t rng = 0x9E3779B97F4A7C15ull * (seed + 1);
    int l, ok = 1;
    memset(mo, 0, sizeof *mo);
    ok = ok && vm_param_init(mo, &mo->patch_w, D * VM_PD, VM_GROUP_DENSE, 1, s_pd, 0, &rng);
    ok = ok && vm_param_init(mo, &mo->patch_b, D, VM_GROUP_DENSE, 0, 0, 0, &rng);
    ok = ok && vm_param_init(mo, &mo->pos, (size_t)VM_N * D, VM_GROUP_DENSE, 0, 0.02, 0, &rng);
    for (l = 0; l < VM_L; l++) {
        vm_block *b = &mo->blk[l];
        ok = ok && vm_param_init(mo, &b->ln1_g, D, VM_GROUP_DENSE, 0, 0, 1, &rng);
        ok = ok && vm_param_init(mo, &b->ln1_b, D, VM_GROUP_DENSE, 0, 0, 0, &rng);
        ok = ok && vm_param_init(mo, &b->wqkv, 3 * D * D, VM_GROUP_DENSE, 1, s_d, 0, &rng);
        ok = ok && vm_param_init(mo, &b->bqkv, 3 * D, VM_GROUP_DENSE, 0, 0, 0, &rng);
        ok = ok && vm_param_init(mo, &b->wo, D * D, VM_GROUP_DENSE, 1, s_d, 0, &rng);
        ok = ok && vm_param_init(mo, &b->bo, D, VM_GROUP_DENSE, 0, 0, 0, &rng);
        ok = ok && vm_param_init(mo, &b->ln2_g, D, VM_GROUP_DENSE, 0, 0, 1, &rng);
        ok = ok && vm_param_init(mo, &b->ln2_b, D, VM_GROUP_DENSE, 0, 0, 0, &rng);
        ok = ok && vm_param_init(mo, &b->router, E * D, VM_GROUP_ROUTER, 1, 0, 0, &rng);
        ok = ok && vm_param_init(mo, &b->gate, E * F * D, VM_GROUP_EXPERT, 1, 0, 0, &rng);
        ok = ok && vm_param_init(mo, &b->up, E * F * D, VM_GROUP_EXPERT, 1, 0, 0, &rng);
        ok = ok && vm_param_init(mo, &b->down, E * D * F, VM_GROUP_EXPERT, 1, 0, 0, &rng);
        if (!ok) return 0;
        b->w.router = b->router.w; b->w.gate = b->gate.w; b->w.up = b->up.w; b->w.down = b->down.w;
        b->g.router = b->router.g; b->g.gate = b->gate.g; b->g.up = b->up.g; b->g.down = b->down.g;
    }
    ok = ok && vm_param_init(mo, &mo->lnf_g, D, VM_GROUP_DENSE, 0, 0, 1, &rng);
    ok = ok && vm_param_init(mo, &mo->lnf_b, D, VM_GROUP_DENSE, 0, 0, 0, &rng);
    ok = ok && vm_param_init(mo, &mo->head_w, (size_t)VM_C * D, VM_GROUP_DENSE, 1, 0, 0, &rng);
    ok = ok && vm_param_init(mo, &mo->head_b, VM_C, VM_GROUP_DENSE, 0, 0, 0, &rng);
    if (!ok) return 0;

    /* The MoE layers: Mixtral's routing (softmax over E, top-k, weights
       renormalised over the k) with this demo's shape; HF balance loss
         aux = E * sum_e f_e P_e   (f_e: share of the T*K pairs routed to e,
                                    P_e: mean router probability of e)
       weighted 0.01 -- moe_backward adds its gradient. No capacity limit:
       every pair is processed (dropless).                                  */
    mo->cfg = moe_preset_mixtral();
    mo->cfg.num_experts = VM_E; mo->cfg.top_k = VM_K;
    mo->cfg.d_model = VM_D; mo->cfg.d_ff = VM_F;          /* SwiGLU experts */
    mo->cfg.balance_coef = VM_BALANCE_COEF;
    for (l = 0; l < VM_L; l++) {
        /* moe_grads names the tensors to fill: here the weights themselves */
        moe_grads params;
        memset(&params, 0, sizeof params);
        params.router = mo->blk[l].router.w; params.gate = mo->blk[l].gate.w;
        params.up = mo->blk[l].up.w; params.down = mo->blk[l].down.w;
        if (moe_init_weights(&mo->cfg, MOE_INIT_XAVIER, seed * 131 + (uint64_t)l, &params) != MOE_STATUS_OK)
            return 0;
    }
    return 1;
}

/* The training config of a MoE layer at one step: cfg.training = 1 (train
   mode) and save_for_backward = 1 with a fresh seed per step and layer (new
   noise and dropout masks), the warm-up noise of the step and expert
   dropout. The backward gets the same one.                                */
static moe_config vm_train_cfg(const moe_config *base, float noise_std, uint64_t seed) {
    moe_config c = *base;
    c.training = 1;
    c.save_for_backward = 1;
    c.seed = seed;
    c.router_noise_std = noise_std;   /* selection sees z + N(0, std^2)       */
    c.expert_dropout = VM_DROPOUT;    /* expert hidden units dropped w.p. 0.1 */
    return c;
}

static int vm_acts_alloc(vm_acts *a, const moe_config *cfg) {
    const size_t T = VM_TMAX, D = VM_D;
    const moe_config train = vm_train_cfg(cfg, VM_NOISE_STD, 0);
    size_t bw, info_bytes;
    int l, ok = 1;
    memset(a, 0, sizeof *a);
#define VM_ALLOC(p, count) ok = ok && ((p) = (float *)calloc((size_t)(count), sizeof(float))) != NULL
    VM_ALLOC(a->patches, T * VM_PD);
    for (l = 0; l < VM_L; l++) {
        vm_block_acts *b = &a->blk[l];
        VM_ALLOC(b->x_in, T * D); VM_ALLOC(b->xhat1, T * D); VM_ALLOC(b->rstd1, T); VM_ALLOC(b->a, T * D);
        VM_ALLOC(b->qkv, T * 3 * D); VM_ALLOC(b->att, (size_t)VM_B * VM_H * VM_N * VM_N);
        VM_ALLOC(b->ctx, T * D); VM_ALLOC(b->x_mid, T * D);
        VM_ALLOC(b->xhat2, T * D); VM_ALLOC(b->rstd2, T); VM_ALLOC(b->m, T * D); VM_ALLOC(b->y, T * D);
    }
    VM_ALLOC(a->x_out, T * D); VM_ALLOC(a->xhatf, T * D); VM_ALLOC(a->rstdf, T); VM_ALLOC(a->z, T * D);
    VM_ALLOC(a->pooled, VM_B * D); VM_ALLOC(a->prob, VM_B * VM_C);
    VM_ALLOC(a->dx, T * D); VM_ALLOC(a->dx2, T * D); VM_ALLOC(a->dqkv, T * 3 * D);
    VM_ALLOC(a->dctx, T * D); VM_ALLOC(a->dm, T * D);
    VM_ALLOC(a->dpooled, VM_B * D); VM_ALLOC(a->dlogit, VM_B * VM_C);
#undef VM_ALLOC
    if (!ok) return 0;
    /* one workspace for forward and backward; per layer an info that holds
       what the training forward keeps for moe_backward (routing + expert cache) */
    if (moe_forward_workspace_size(&train, VM_TMAX, &a->ws_bytes) != MOE_STATUS_OK ||
        moe_backward_workspace_size(&train, VM_TMAX, &bw) != MOE_STATUS_OK ||
        moe_info_size(&train, VM_TMAX, &info_bytes) != MOE_STATUS_OK)
        return 0;
    if (bw > a->ws_bytes) a->ws_bytes = bw;
    if (!(a->ws = malloc(a->ws_bytes))) return 0;
    for (l = 0; l < VM_L; l++) {
        vm_block_acts *b = &a->blk[l];
        if (!(b->info_buf = malloc(info_bytes)) ||
            moe_info_bind(&train, VM_TMAX, &b->info, b->info_buf, info_bytes) != MOE_STATUS_OK)
            return 0;
    }
    return 1;
}

static void vm_acts_free(vm_acts *a) {
    int l;
    free(a->patches);
    for (l = 0; l < VM_L; l++) {
        vm_block_acts *b = &a->blk[l];
        free(b->x_in); free(b->xhat1); free(b->rstd1); free(b->a); free(b->qkv); free(b->att);
        free(b->ctx); free(b->x_mid); free(b->xhat2); free(b->rstd2); free(b->m); free(b->y);
        free(b->info_buf);
    }
    free(a->x_out); free(a->xhatf); free(a->rstdf); free(a->z); free(a->pooled); free(a->prob);
    free(a->dx); free(a->dx2); free(a->dqkv); free(a->dctx); free(a->dm); free(a->dpooled);
    free(a->dlogit); free(a->ws);
    memset(a, 0, sizeof *a);
}

/* ---------------------------------------------------------------------------
   Building blocks, forward and backward.

   Linear map (PyTorch layout W [O][I]):   y[t] = W x[t] + b
   backward:  dx[t] = W^T dy[t]  (overwritten; skipped when dx is NULL),
              dW += sum_t dy[t] x[t]^T,   db += sum_t dy[t]                   */
static void vm_linear(float *y, const float *x, const float *W, const float *b, int T, int I, int O) {
    int t, o, i;
    for (t = 0; t < T; t++)
        for (o = 0; o < O; o++) {
            const float *wo = W + (size_t)o * I, *xt = x + (size_t)t * I;
            float s = b ? b[o] : 0.0f;
            for (i = 0; i < I; i++) s += wo[i] * xt[i];
            y[(size_t)t * O + o] = s;
        }
}
static void vm_linear_back(float *dx, float *dW, float *db, const float *dy, const float *x,
                           const float *W, int T, int I, int O) {
    int t, o, i;
    for (t = 0; t < T; t++) {
        const float *dyt = dy + (size_t)t * O, *xt = x + (size_t)t * I;
        float *dxt = dx ? dx + (size_t)t * I : NULL;
        if (dxt) memset(dxt, 0, (size_t)I * sizeof(float));
        for (o = 0; o < O; o++) {
            const float g = dyt[o];
            float *dwo = dW + (size_t)o * I;
            const float *wo = W + (size_t)o * I;
            if (db) db[o] += g;
            for (i = 0; i < I; i++) dwo[i] += g * xt[i];
            if (dxt) for (i = 0; i < I; i++) dxt[i] += g * wo[i];
        }
    }
}

/* LayerNorm over the D features of each token:
     mu = mean(x),  var = mean((x - mu)^2),  xhat = (x - mu) / sqrt(var + eps)
     y = g * xhat + b
   backward (dxhat = dy * g):
     dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sqrt(var + eps)
     dg += dy * xhat,  db += dy.   dx is ADDED to (the residual stream's). */
static void vm_layernorm(float *y, float *xhat, float *rstd, const float *x, const float *g,
                         const float *b, int T) {
    int t, d;
    for (t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * VM_D;
        float mu = 0.0f, var = 0.0f, r;
        for (d = 0; d < VM_D; d++) mu += xt[d];
        mu /= VM_D;
        for (d = 0; d < VM_D; d++) var += (xt[d] - mu) * (xt[d] - mu);
        var /= VM_D;
        r = 1.0f / sqrtf(var + 1e-5f);
        rstd[t] = r;
        for (d = 0; d < VM_D; d++) {
            const float h = (xt[d] - mu) * r;
            xhat[(size_t)t * VM_D + d] = h;
            y[(size_t)t * VM_D + d] = g[d] * h + b[d];
        }
    }
}
static void vm_layernorm_back(float *dx, float *dg, float *db, const float *dy, const float *xhat,
                              const float *rstd, const float *g, int T) {
    int t, d;
    for (t = 0; t < T; t++) {
        const float *dyt = dy + (size_t)t * VM_D, *ht = xhat + (size_t)t * VM_D;
        float mean_dh = 0.0f, mean_dhh = 0.0f;
        for (d = 0; d < VM_D; d++) {
            const float dh = dyt[d] * g[d];
            mean_dh += dh; mean_dhh += dh * ht[d];
            dg[d] += dyt[d] * ht[d]; db[d] += dyt[d];
        }
        mean_dh /= VM_D; mean_dhh /= VM_D;
        for (d = 0; d < VM_D; d++)
            dx[(size_t)t * VM_D + d] += rstd[t] * (dyt[d] * g[d] - mean_dh - ht[d] * mean_dhh);
    }
}

/* Multi-head self-attention among the N tokens of each image, head h using
   features [h*Dh, (h+1)*Dh) of q, k, v (qkv[t] = [q | k | v]):
     S_ij = q_i . k_j / sqrt(Dh),  P_ij = softmax_j(S_ij),  ctx_i = sum_j P_ij v_j
   backward, from dctx:
     dP_ij = dctx_i . v_j,        dv_j += sum_i P_ij dctx_i
     dS_ij = P_ij (dP_ij - sum_j' P_ij' dP_ij')            (softmax backward)
     dq_i += sum_j dS_ij k_j / sqrt(Dh),  dk_j += sum_i dS_ij q_i / sqrt(Dh) */
static void vm_attention(float *ctx, float *att, const float *qkv, int nb) {
    const float scale = 1.0f / sqrtf((float)VM_DH);
    int b, h, i, j, c;
    for (b = 0; b < nb; b++)
        for (h = 0; h < VM_H; h++)
            for (i = 0; i < VM_N; i++) {
                const float *q = qkv + (size_t)(b * VM_N + i) * 3 * VM_D + h * VM_DH;
                float *p = att + (((size_t)b * VM_H + h) * VM_N + i) * VM_N, mx = -INFINITY, sum = 0.0f;
                float *o = ctx + (size_t)(b * VM_N + i) * VM_D + h * VM_DH;
                for (j = 0; j < VM_N; j++) {
                    const float *k = qkv + (size_t)(b * VM_N + j) * 3 * VM_D + VM_D + h * VM_DH;
                    float s = 0.0f;
                    for (c = 0; c < VM_DH; c++) s += q[c] * k[c];
                    p[j] = s * scale;
                    if (p[j] > mx) mx = p[j];
                }
                for (j = 0; j < VM_N; j++) { p[j] = expf(p[j] - mx); sum += p[j]; }
                for (j = 0; j < VM_N; j++) p[j] /= sum;
                for (c = 0; c < VM_DH; c++) o[c] = 0.0f;
                for (j = 0; j < VM_N; j++) {
                    const float *v = qkv + (size_t)(b * VM_N + j) * 3 * VM_D + 2 * VM_D + h * VM_DH;
                    for (c = 0; c < VM_DH; c++) o[c] += p[j] * v[c];
                }
            }
}
static void vm_attention_back(float *dqkv, const float *dctx, const float *att, const float *qkv, int nb) {
    const float scale = 1.0f / sqrtf((float)VM_DH);
    float dp[VM_N];
    int b, h, i, j, c;
    memset(dqkv, 0, (size_t)nb * VM_N * 3 * VM_D * sizeof(float));
    for (b = 0; b < nb; b++)
        for (h = 0; h < VM_H; h++)
            for (i = 0; i < VM_N; i++) {
                const size_t ti = (size_t)(b * VM_N + i);
                const float *p = att + (((size_t)b * VM_H + h) * VM_N + i) * VM_N;
                const float *q = qkv + ti * 3 * VM_D + h * VM_DH, *dci = dctx + ti * VM_D + h * VM_DH;
                float *dq = dqkv + ti * 3 * VM_D + h * VM_DH, dot = 0.0f;
                for (j = 0; j < VM_N; j++) {
                    const size_t tj = (size_t)(b * VM_N + j);
                    const float *v = qkv + tj * 3 * VM_D + 2 * VM_D + h * VM_DH;
                    float *dv = dqkv + tj * 3 * VM_D + 2 * VM_D + h * VM_DH;
                    dp[j] = 0.0f;
                    for (c = 0; c < VM_DH; c++) { dp[j] += dci[c] * v[c]; dv[c] += p[j] * dci[c]; }
                    dot += p[j] * dp[j];
                }
                for (j = 0; j < VM_N; j++) {
                    const size_t tj = (size_t)(b * VM_N + j);
                    const float ds = p[j] * (dp[j] - dot) * scale;
                    const float *k = qkv + tj * 3 * VM_D + VM_D + h * VM_DH;
                    float *dk = dqkv + tj * 3 * VM_D + VM_D + h * VM_DH;
                    for (c = 0; c < VM_DH; c++) { dq[c] += ds * k[c]; dk[c] += ds * q[c]; }
                }
            }
}

/* ---------------------------------------------------------------------------
   The model, forward. img: nb images [nb][64]. training = 1: the MoE layers
   run with vm_train_cfg (warm-up noise, expert dropout, the training cache
   in each block's bound info, cfg.seed = seed + layer); training = 0:
   inference, info arrays only for the load. Leaves softmax(logits) in a->prob. */
static moe_status vm_forward(vm_model *mo, vm_acts *a, const float *img, int nb, int training,
                             float noise_std, uint64_t seed) {
    const int T = nb * VM_N;
    int l, t, b, n, d, i;
    /* 1. patch embedding: token n of an image is the PxP patch whose top-left
          pixel is (n / G, n % G) * stride (G patches per side), its pixels
          row by row;   x0[n] = W_pe patch[n] + b_pe + pos[n]               */
    for (b = 0; b < nb; b++)
        for (n = 0; n < VM_N; n++)
            for (i = 0; i < VM_PD; i++) {
                const int r = (n / VM_GRID) * VM_STRIDE + i / VM_PATCH, c = (n % VM_GRID) * VM_STRIDE + i % VM_PATCH;
                a->patches[(size_t)(b * VM_N + n) * VM_PD + i] = img[(size_t)b * VM_PIX + r * VM_SIDE + c];
            }
    vm_linear(a->blk[0].x_in, a->patches, mo->patch_w.w, mo->patch_b.w, T, VM_PD, VM_D);
    for (t = 0; t < T; t++)
        for (d = 0; d < VM_D; d++) a->blk[0].x_in[(size_t)t * VM_D + d] += mo->pos.w[(t % VM_N) * VM_D + d];

    for (l = 0; l < VM_L; l++) {
        vm_block *w = &mo->blk[l];
        vm_block_acts *s = &a->blk[l];
        float *out = l + 1 < VM_L ? a->blk[l + 1].x_in : a->x_out;
        moe_info eval_info;
        moe_status st;
        /* 2. attention sublayer (pre-LN):  x_mid = x + Wo attn(LN1(x)) + bo  */
        vm_layernorm(s->a, s->xhat1, s->rstd1, s->x_in, w->ln1_g.w, w->ln1_b.w, T);
        vm_linear(s->qkv, s->a, w->wqkv.w, w->bqkv.w, T, VM_D, 3 * VM_D);
        vm_attention(s->ctx, s->att, s->qkv, nb);
        vm_linear(s->x_mid, s->ctx, w->wo.w, w->bo.w, T, VM_D, VM_D);
        for (i = 0; i < T * VM_D; i++) s->x_mid[i] += s->x_in[i];
        /* 3. MoE sublayer (pre-LN):  out = x_mid + MoE(LN2(x_mid)), where
              MoE(m) = sum over the token's top-k experts e of w_e SwiGLU_e(m),
              w = softmax(router m) renormalised over the k. ONE moe.h call
              for all the nb x N tokens of the batch.                        */
        vm_layernorm(s->m, s->xhat2, s->rstd2, s->x_mid, w->ln2_g.w, w->ln2_b.w, T);
        if (training) {
            const moe_config cfg = vm_train_cfg(&mo->cfg, noise_std, seed + (uint64_t)l);
            st = moe_forward(&cfg, &w->w, s->m, T, s->y, &s->info, a->ws, a->ws_bytes);
        } else {                          /* inference: mo->cfg has training = 0 */
            memset(&eval_info, 0, sizeof eval_info);  /* and we want the load only */
            eval_info.expert_routed = a->eval_routed[l];
            eval_info.expert_kept = a->eval_kept[l];
            st = moe_forward(&mo->cfg, &w->w, s->m, T, s->y, &eval_info, a->ws, a->ws_bytes);
        }
        if (st != MOE_STATUS_OK) return st;
        for (i = 0; i < T * VM_D; i++) out[i] = s->x_mid[i] + s->y[i];
    }

    /* 4. head: z = LNf(x), pooled_b = mean_n z[b, n], logits = W_c pooled + b_c,
          prob = softmax(logits)                                             */
    vm_layernorm(a->z, a->xhatf, a->rstdf, a->x_out, mo->lnf_g.w, mo->lnf_b.w, T);
    for (b = 0; b < nb; b++) {
        float logit[VM_C], mx = -INFINITY, sum = 0.0f;
        float *pb = a->pooled + (size_t)b * VM_D;
        for (d = 0; d < VM_D; d++) pb[d] = 0.0f;
        for (n = 0; n < VM_N; n++)
            for (d = 0; d < VM_D; d++) pb[d] += a->z[(size_t)(b * VM_N + n) * VM_D + d] / VM_N;
        vm_linear(logit, pb, mo->head_w.w, mo->head_b.w, 1, VM_D, VM_C);
        for (i = 0; i < VM_C; i++) if (logit[i] > mx) mx = logit[i];
        for (i = 0; i < VM_C; i++) { logit[i] = expf(logit[i] - mx); sum += logit[i]; }
        for (i = 0; i < VM_C; i++) a->prob[b * VM_C + i] = logit[i] / sum;
    }
    return MOE_STATUS_OK;
}

/* The model, backward, for L = mean_b CE_b + balance_coef * sum_l aux_l, after
   a training forward of the same nb images. Gradients ACCUMULATE.
     cross-entropy:  CE_b = -log prob_b[y_b],  dlogit_b = (prob_b - onehot(y_b)) / nb */
static moe_status vm_backward(vm_model *mo, vm_acts *a, const unsigned char *label, int nb,
                              float noise_std, uint64_t seed) {
    const int T = nb * VM_N;
    int l, t, b, n, d, i;
    for (b = 0; b < nb; b++)
        for (i = 0; i < VM_C; i++)
            a->dlogit[b * VM_C + i] = (a->prob[b * VM_C + i] - (i == label[b] ? 1.0f : 0.0f)) / nb;
    /* head: dpooled = W_c^T dlogit;  dz[b, n] = dpooled_b / N;  LNf backward */
    vm_linear_back(a->dpooled, mo->head_w.g, mo->head_b.g, a->dlogit, a->pooled, mo->head_w.w, nb, VM_D, VM_C);
    for (t = 0; t < T; t++)
        for (d = 0; d < VM_D; d++) a->dx2[(size_t)t * VM_D + d] = a->dpooled[(t / VM_N) * VM_D + d] / VM_N;
    memset(a->dx, 0, (size_t)T * VM_D * sizeof(float));
    vm_layernorm_back(a->dx, mo->lnf_g.g, mo->lnf_b.g, a->dx2, a->xhatf, a->rstdf, mo->lnf_g.w, T);

    for (l = VM_L - 1; l >= 0; l--) {    /* a->dx: gradient at the block output */
        vm_block *w = &mo->blk[l];
        vm_block_acts *s = &a->blk[l];
        const moe_config cfg = vm_train_cfg(&mo->cfg, noise_std, seed + (uint64_t)l);
        moe_status st;
        /* MoE sublayer: out = x_mid + y.  moe_backward gets dy = dout and
           returns dm (overwritten), the MoE grads (accumulated) and adds the
           balance loss's gradient; then dx_mid = dout + LN2^T dm.  Same cfg
           and seed as the forward: the noise and dropout masks are replayed. */
        st = moe_backward(&cfg, &w->w, s->m, T, &s->info, a->dx, a->dm, &w->g, a->ws, a->ws_bytes);
        if (st != MOE_STATUS_OK) return st;
        vm_layernorm_back(a->dx, w->ln2_g.g, w->ln2_b.g, a->dm, s->xhat2, s->rstd2, w->ln2_g.w, T);
        /* attention sublayer: x_mid = x_in + Wo ctx + bo */
        vm_linear_back(a->dctx, w->wo.g, w->bo.g, a->dx, s->ctx, w->wo.w, T, VM_D, VM_D);
        vm_attention_back(a->dqkv, a->dctx, s->att, s->qkv, nb);
        vm_linear_back(a->dm, w->wqkv.g, w->bqkv.g, a->dqkv, s->a, w->wqkv.w, T, VM_D, 3 * VM_D);
        vm_layernorm_back(a->dx, w->ln1_g.g, w->ln1_b.g, a->dm, s->xhat1, s->rstd1, w->ln1_g.w, T);
    }
    /* embedding: x0[t] = W_pe patch[t] + b_pe + pos[t % N] */
    vm_linear_back(NULL, mo->patch_w.g, mo->patch_b.g, a->dx, a->patches, mo->patch_w.w, T, VM_PD, VM_D);
    for (t = 0; t < T; t++) {
        n = t % VM_N;
        for (d = 0; d < VM_D; d++) mo->pos.g[n * VM_D + d] += a->dx[(size_t)t * VM_D + d];
    }
    return MOE_STATUS_OK;
}

/* AdamW (Kingma & Ba 2015; decoupled weight decay: Loshchilov & Hutter
   2019), bias-corrected; t counts steps from 1:
     m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
     w -= lr ((m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd w)
   with wd = VM_WEIGHT_DECAY for matrices and 0 for everything else.       */
static void vm_adamw(vm_param *p, double lr, int t) {
    const double b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = p->decay ? VM_WEIGHT_DECAY : 0.0;
    const double c1 = 1.0 - pow(b1, t), c2 = 1.0 - pow(b2, t);
    size_t i;
    for (i = 0; i < p->n; i++) {
        const double g = p->g[i];
        p->m[i] = (float)(b1 * p->m[i] + (1.0 - b1) * g);
        p->v[i] = (float)(b2 * p->v[i] + (1.0 - b2) * g * g);
        p->w[i] -= (float)(lr * ((p->m[i] / c1) / (sqrt(p->v[i] / c2) + eps) + wd * p->w[i]));
    }
}

/* Global-norm clipping of the non-MoE tensors (moe_grads_clip_norm does the
   same for each MoE layer):  g *= min(1, max_norm / ||g||_2).              */
static void vm_clip_dense(vm_model *mo, float max_norm) {
    double sum = 0.0, norm;
    size_t i;
    int k;
    for (k = 0; k < mo->n_all; k++)
        if (mo->all[k]->group == VM_GROUP_DENSE)
            for (i = 0; i < mo->all[k]->n; i++) sum += (double)mo->all[k]->g[i] * mo->all[k]->g[i];
    norm = sqrt(sum);
    if (norm > max_norm)
        for (k = 0; k < mo->n_all; k++)
            if (mo->all[k]->group == VM_GROUP_DENSE)
                for (i = 0; i < mo->all[k]->n; i++) mo->all[k]->g[i] *= (float)(max_norm / norm);
}

/* Test accuracy (inference: cfg.training = 0) and each layer's expert load
   over the whole test set, load[l][e] = pairs routed to e / (tokens * K).
   pred[n - n_train] (may be NULL) gets the predicted labels.               */
static int vm_evaluate(vm_model *mo, vm_acts *a, const vm_data *data, double *accuracy,
                       float load[VM_L][VM_E], unsigned char *pred) {
    int32_t routed[VM_L][VM_E];
    int start, b, i, l, e, correct = 0, tokens = 0;
    memset(routed, 0, sizeof routed);
    for (start = data->n_train; start < data->n; start += VM_B) {
        const int nb = data->n - start < VM_B ? data->n - start : VM_B;
        if (vm_forward(mo, a, data->x + (size_t)start * VM_PIX, nb, 0, 0.0f, 0) != MOE_STATUS_OK) return 0;
        for (b = 0; b < nb; b++) {                /* prediction = argmax prob */
            int best = 0;
            for (i = 1; i < VM_C; i++) if (a->prob[b * VM_C + i] > a->prob[b * VM_C + best]) best = i;
            correct += best == data->y[start + b];
            if (pred) pred[start + b - data->n_train] = (unsigned char)best;
        }
        for (l = 0; l < VM_L; l++) for (e = 0; e < VM_E; e++) routed[l][e] += a->eval_routed[l][e];
        tokens += nb * VM_N;
    }
    *accuracy = (double)correct / (data->n - data->n_train);
    for (l = 0; l < VM_L; l++)
        for (e = 0; e < VM_E; e++) load[l][e] = (float)routed[l][e] / ((float)tokens * VM_K);
    return 1;
}

/* ---------------------------------------------------------------------------
   Training. What is logged: */
typedef struct vm_step {
    float loss;                   /* mean cross-entropy of the step's batch     */
    float aux[VM_L];              /* info.aux_balance per layer (= K balanced)  */
    float max_over_mean[VM_L];    /* max_e routed_e / (T K / E): 1 = balanced    */
} vm_step;
typedef struct vm_eval {
    int step;                     /* evaluated after this many steps            */
    float accuracy;               /* test accuracy in [0, 1]                    */
    float load[VM_L][VM_E];       /* test-set share of the pairs per expert     */
} vm_eval;
typedef struct vm_history {
    int steps, evals, steps_per_epoch, n_test;
    vm_step *step;                /* [steps]                                    */
    vm_eval *eval;                /* [evals]: before training, after each epoch */
    unsigned char *pred;          /* [n_test] final predictions on the test set */
} vm_history;

static void vm_history_free(vm_history *h) {
    free(h->step); free(h->eval); free(h->pred);
    memset(h, 0, sizeof *h);
}

/* Train for `epochs` passes over the training set (minibatches of VM_B
   images in a fresh random order every epoch; the last n_train % VM_B of an
   epoch's order wait for the next one), evaluating on the test set before
   training and after each epoch. hist (may be NULL; free it with
   vm_history_free) gets the log, *final_accuracy (may be NULL) the last test
   accuracy. verbose: a line per epoch on stdout. 1 on success.             */
int vm_train(const char *data_path, int epochs, unsigned seed, int verbose, vm_history *hist,
             double *final_accuracy);

int vm_train(const char *data_path, int epochs, unsigned seed, int verbose, vm_history *hist,
             double *final_accuracy) {
    vm_data data;
    vm_model mo;
    vm_acts acts;
    vm_history h;
    int *order = NULL, ok = 0, epoch, step = 0, i, k, l, e;
    uint64_t rng = 0xD1B54A32D192ED03ull * ((uint64_t)seed + 7);
    float batch_x[VM_B * VM_PIX];
    unsigned char batch_y[VM_B];
    double acc = 0.0;

    memset(&h, 0, sizeof h);
    memset(&mo, 0, sizeof mo);
    memset(&acts, 0, sizeof acts);
    if (epochs < 1 || !vm_data_load(data_path, &data)) return 0;
    h.steps_per_epoch = data.n_train / VM_B;
    h.steps = epochs * h.steps_per_epoch;
    h.n_test = data.n - data.n_train;
    h.step = (vm_step *)calloc((size_t)h.steps + 1, sizeof(vm_step));
    h.eval = (vm_eval *)calloc((size_t)epochs + 1, sizeof(vm_eval));
    h.pred = (unsigned char *)calloc((size_t)h.n_test, 1);
    order = (int *)malloc((size_t)data.n_train * sizeof(int));
    if (!h.step || !h.eval || !h.pred || !order || h.steps_per_epoch < 1 ||
        !vm_model_init(&mo, seed) || !vm_acts_alloc(&acts, &mo.cfg))
        goto done;
    for (i = 0; i < data.n_train; i++) order[i] = i;

    if (!vm_evaluate(&mo, &acts, &data, &acc, h.eval[0].load, NULL)) goto done;
    h.eval[0].accuracy = (float)acc;
    h.evals = 1;
    for (epoch = 0; epoch < epochs; epoch++) {
        double epoch_loss = 0.0;
        /* 0. a fresh order of the training images (Fisher-Yates shuffle) */
        for (i = data.n_train - 1; i > 0; i--) {
            const int j = (int)(vm_uniform(&rng) * (i + 1)), tmp = order[i];
            order[i] = order[j]; order[j] = tmp;
        }
        for (i = 0; i + VM_B <= data.n_train; i += VM_B, step++) {
            /* schedules over the S steps of the run: learning rate = linear
               warm-up over W steps, then cosine decay to 0,
                 lr(s) = lr_0 min(1, (s + 1) / W) (1 + cos(pi s / S)) / 2,
               router noise std = sigma_0 max(0, 1 - s / N_noise),
               W = min(VM_WARMUP, S / 4), N_noise = min(VM_NOISE_STEPS, S / 2)
               (short runs, such as the test's, get shorter warm-ups)        */
            const int warm = VM_WARMUP < h.steps / 4 ? VM_WARMUP : h.steps / 4 + 1;
            const int noise_steps = VM_NOISE_STEPS < h.steps / 2 ? VM_NOISE_STEPS : h.steps / 2 + 1;
            const double sched = (step + 1 < warm ? (step + 1.0) / warm : 1.0) *
                                 0.5 * (1.0 + cos(3.141592653589793 * step / h.steps));
            const float noise = step < noise_steps ? VM_NOISE_STD * (1.0f - (float)step / noise_steps) : 0.0f;
            const uint64_t step_seed = ((uint64_t)seed << 32) + (uint64_t)step * VM_L;
            vm_step *rec = &h.step[step];
            double loss = 0.0;
            int b;

            /* 1. the minibatch */
            for (b = 0; b < VM_B; b++) {
                memcpy(batch_x + b * VM_PIX, data.x + (size_t)order[i + b] * VM_PIX, VM_PIX * sizeof(float));
                batch_y[b] = data.y[order[i + b]];
            }
            /* 2. forward (training) and the loss  CE = mean_b -log prob_b[y_b] */
            if (vm_forward(&mo, &acts, batch_x, VM_B, 1, noise, step_seed) != MOE_STATUS_OK) goto done;
            for (b = 0; b < VM_B; b++) loss -= log(acts.prob[b * VM_C + batch_y[b]] + 1e-30);
            rec->loss = (float)(loss / VM_B);
            epoch_loss += rec->loss;
            for (l = 0; l < VM_L; l++) {
                const moe_info *info = &acts.blk[l].info;
                int32_t mx = 0;
                for (e = 0; e < VM_E; e++) if (info->expert_routed[e] > mx) mx = info->expert_routed[e];
                rec->aux[l] = info->aux_balance;
                rec->max_over_mean[l] = (float)mx * VM_E / ((float)VM_B * VM_N * VM_K);
            }
            /* 3. backward: zero the gradients (moe_grads_zero for the MoE
                  tensors), then accumulate dL/dw of
                  L = CE + balance_coef * sum over layers of aux_balance     */
            for (k = 0; k < mo.n_all; k++)
                if (mo.all[k]->group == VM_GROUP_DENSE) memset(mo.all[k]->g, 0, mo.all[k]->n * sizeof(float));
            for (l = 0; l < VM_L; l++) if (moe_grads_zero(&mo.cfg, &mo.blk[l].g) != MOE_STATUS_OK) goto done;
            if (vm_backward(&mo, &acts, batch_y, VM_B, noise, step_seed) != MOE_STATUS_OK) goto done;
            /* 4. clip each MoE layer's gradient to global norm VM_CLIP, and
                  the other tensors' as one group                           */
            for (l = 0; l < VM_L; l++)
                if (moe_grads_clip_norm(&mo.cfg, &mo.blk[l].g, VM_CLIP, NULL) != MOE_STATUS_OK) goto done;
            vm_clip_dense(&mo, VM_CLIP);
            /* 5. AdamW; the routers take a smaller step. Adam moves every
                  weight by about lr per step whatever its gradient's size,
                  and a router step re-routes many tokens at once: the experts
                  would then see different inputs from one step to the next.
                  (On this small task it is a habit more than a need: with
                  the router at 3e-3 too, seeds 1..3 end at 97.50..98.33 %
                  with AVX2.)                                               */
            for (k = 0; k < mo.n_all; k++)
                vm_adamw(mo.all[k], (mo.all[k]->group == VM_GROUP_ROUTER ? VM_ROUTER_LR : VM_LR) * sched, step + 1);
        }
        /* 6. test accuracy (inference) after each epoch */
        if (!vm_evaluate(&mo, &acts, &data, &acc, h.eval[epoch + 1].load, h.pred)) goto done;
        h.eval[epoch + 1].step = step;
        h.eval[epoch + 1].accuracy = (float)acc;
        h.evals = epoch + 2;
        if (verbose) {
            printf("epoch %2d  step %4d  train loss %.4f  test accuracy %5.1f %%  test load max/mean",
                   epoch + 1, step, epoch_loss / h.steps_per_epoch, 100.0 * acc);
            for (l = 0; l < VM_L; l++) {
                float mx = 0.0f;
                for (e = 0; e < VM_E; e++) if (h.eval[epoch + 1].load[l][e] > mx) mx = h.eval[epoch + 1].load[l][e];
                printf(" %.2f", mx * VM_E);
            }
            printf("\n");
            fflush(stdout);
        }
    }
    if (final_accuracy) *final_accuracy = acc;
    ok = 1;
done:
    if (ok && hist) *hist = h;
    else vm_history_free(&h);
    vm_acts_free(&acts);
    vm_model_free(&mo);
    vm_data_free(&data);
    free(order);
    return ok;
}

#ifndef VIT_MOE_DIGITS_NO_MAIN
#include <time.h>

static const char *const vm_layer_color[4] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd"};

/* Centred moving average over `win` steps, the window narrowing at the ends. */
static void vm_smooth(const float *v, int n, int win, float *out) {
    int i, j;
    for (i = 0; i < n; i++) {
        const int r = i < win / 2 ? i : win / 2;
        const int a = i - r, b = i + r < n ? i + r : n - 1;
        double s = 0.0;
        for (j = a; j <= b; j++) s += v[j];
        out[i] = (float)(s / (b - a + 1));
    }
}

/* A plot area: pixel box and data range; maps data to SVG coordinates. */
typedef struct vm_plot { double x0, y0, w, h, xmax, ymin, ymax; } vm_plot;
static double vm_px(const vm_plot *p, double v) { return p->x0 + p->w * v / p->xmax; }
static double vm_py(const vm_plot *p, double v) {
    if (v < p->ymin) v = p->ymin;
    if (v > p->ymax) v = p->ymax;
    return p->y0 + p->h * (1.0 - (v - p->ymin) / (p->ymax - p->ymin));
}

/* Frame, grid, ticks and axis labels of one panel. */
static void vm_svg_axes(FILE *f, const vm_plot *p, double xstep, double ystep, const char *ylabel,
                        const char *title, const char *xlabel) {
    double v;
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"15\" font-weight=\"bold\">%s</text>\n",
            p->x0, p->y0 - 10, title);
    for (v = p->ymin; v <= p->ymax + 1e-9; v += ystep) {
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e5e5e5\"/>\n",
                p->x0, vm_py(p, v), p->x0 + p->w, vm_py(p, v));
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\" text-anchor=\"end\">%g</text>\n",
                p->x0 - 6, vm_py(p, v) + 4, v);
    }
    for (v = 0; v <= p->xmax + 1e-9; v += xstep) {
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e5e5e5\"/>\n",
                vm_px(p, v), p->y0, vm_px(p, v), p->y0 + p->h);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\" text-anchor=\"middle\">%g</text>\n",
                vm_px(p, v), p->y0 + p->h + 16, v);
    }
    fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#333\"/>\n",
            p->x0, p->y0, p->w, p->h);
    fprintf(f, "<text transform=\"translate(%.1f %.1f) rotate(-90)\" font-size=\"13\" text-anchor=\"middle\">%s</text>\n",
            p->x0 - 42, p->y0 + p->h / 2, ylabel);
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" text-anchor=\"middle\">%s</text>\n",
            p->x0 + p->w / 2, p->y0 + p->h + 36, xlabel);
}

static void vm_svg_line(FILE *f, const vm_plot *p, const float *x, const float *y, int n,
                        const char *color, double width, double opacity) {
    int i;
    fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"%.1f\" stroke-opacity=\"%.2f\" "
               "stroke-linejoin=\"round\" points=\"", color, width, opacity);
    for (i = 0; i < n; i++)
        fprintf(f, "%s%.1f,%.1f", i ? " " : "", vm_px(p, x ? x[i] : i), vm_py(p, y[i]));
    fprintf(f, "\"/>\n");
}

/* Horizontal dashed reference line with a note at its right (or left) end. */
static void vm_svg_ref(FILE *f, const vm_plot *p, double v, const char *note, int left) {
    fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#555\" stroke-dasharray=\"5,4\"/>\n",
            p->x0, vm_py(p, v), p->x0 + p->w, vm_py(p, v));
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" fill=\"#555\" text-anchor=\"%s\">%s</text>\n",
            left ? p->x0 + 4 : p->x0 + p->w - 4, vm_py(p, v) - 4, left ? "start" : "end", note);
}

/* An 8x8 digit as grey squares (0 white .. 1 black), top-left at (x, y). */
static void vm_svg_digit(FILE *f, const float *img, double x, double y, double cell) {
    int r, c;
    fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"white\" stroke=\"#999\"/>\n",
            x, y, 8 * cell, 8 * cell);
    for (r = 0; r < VM_SIDE; r++)
        for (c = 0; c < VM_SIDE; c++) {
            const int g = (int)(255.0 * (1.0 - img[r * VM_SIDE + c]) + 0.5);
            if (g < 255)
                fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"rgb(%d,%d,%d)\"/>\n",
                        x + c * cell, y + r * cell, cell, cell, g, g, g);
        }
}

/* Left: test accuracy per epoch and the expert load imbalance per step;
   right: the test-set share of each expert before and after training, and
   the misclassified test digits.                                          */
/* The kernels this build runs (moe.h picks them at compile time): the
   accuracy differs between builds, as FMA and blocked sums round differently. */
static const char *vm_kernels(void) {
    moe_config c = moe_preset_mixtral(), r;
    if (moe_config_resolve(&c, &r) != MOE_STATUS_OK) return "unknown";
    switch (r.isa) {
    case MOE_ISA_AVX2: return "AVX2 + FMA";
    case MOE_ISA_AVX512: return "AVX-512";
    case MOE_ISA_NEON: return "NEON";
    default: return "scalar reference";
    }
}

static int vm_write_svg(const char *path, const vm_history *h, const vm_data *data) {
    const int W = 1000, H = 770, n = h->steps, last = h->evals - 1;
    FILE *f = fopen(path, "w");
    float *xs = (float *)calloc((size_t)(2 * n + 2 * h->evals), sizeof(float));
    float *raw = xs + h->evals, *avg = raw + n, *ys = avg + n;
    vm_plot acc = {80, 120, 560, 250, 0, 0, 100}, load = {80, 460, 560, 240, 0, 1.0, 2.2};
    char note[96], title[128];
    int i, l, e, wrong = 0;
    if (!f || !xs) { if (f) fclose(f); free(xs); return 0; }
    acc.xmax = load.xmax = n;
    load.ymax = (double)VM_E / VM_K + 0.2;
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
               "viewBox=\"0 0 %d %d\" font-family=\"Helvetica, Arial, sans-serif\">\n", W, H, W, H);
    fprintf(f, "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n", W, H);
    fprintf(f, "<text x=\"%d\" y=\"32\" font-size=\"19\" font-weight=\"bold\" text-anchor=\"middle\">"
               "moe.h: a Vision Transformer with MoE layers learns handwritten digits</text>\n", W / 2);
    fprintf(f, "<text x=\"%d\" y=\"55\" font-size=\"13\" fill=\"#444\" text-anchor=\"middle\">UCI handwritten "
               "digits, 8x8 (%d train / %d test)  |  %d patches of %dx%d (stride %d), D = %d, %d blocks of "
               "%d-head attention + MoE</text>\n",
            W / 2, data->n_train, h->n_test, VM_N, VM_PATCH, VM_PATCH, VM_STRIDE, VM_D, VM_L, VM_H);
    fprintf(f, "<text x=\"%d\" y=\"73\" font-size=\"13\" fill=\"#444\" text-anchor=\"middle\">MoE: E = %d "
               "SwiGLU experts (F = %d), top-%d, balance loss %g, expert dropout %g  |  AdamW, %d images "
               "(%d MoE tokens) per step, %d epochs</text>\n",
            W / 2, VM_E, VM_F, VM_K, (double)VM_BALANCE_COEF, (double)VM_DROPOUT, VM_B, VM_TMAX, last);

    /* accuracy per epoch */
    snprintf(title, sizeof title, "Test accuracy (inference, after each epoch; %s kernels)", vm_kernels());
    vm_svg_axes(f, &acc, n <= 500 ? 100 : 200, 20, "test accuracy (%)", title, "training step");
    vm_svg_ref(f, &acc, 10.0, "chance (10 %)", 0);
    vm_svg_ref(f, &acc, 90.0, "90 %", 1);
    for (i = 0; i < h->evals; i++) { xs[i] = (float)h->eval[i].step; ys[i] = 100.0f * h->eval[i].accuracy; }
    vm_svg_line(f, &acc, xs, ys, h->evals, "#333", 2.0, 1.0);
    for (i = 0; i < h->evals; i++)
        fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"#333\"/>\n", vm_px(&acc, xs[i]), vm_py(&acc, ys[i]));
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"14\" font-weight=\"bold\" text-anchor=\"end\">%.1f %%</text>\n",
            vm_px(&acc, xs[last]) - 6, vm_py(&acc, ys[last]) + 22, ys[last]);

    /* expert load imbalance per step, per layer */
    vm_svg_axes(f, &load, n <= 500 ? 100 : 200, 0.2, "max / mean expert load",
                "Expert load imbalance while training (per step)", "training step");
    fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#f2c94c\" fill-opacity=\"0.18\"/>\n",
            load.x0, load.y0, vm_px(&load, VM_NOISE_STEPS < n ? VM_NOISE_STEPS : n) - load.x0, load.h);
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" fill=\"#8a6d00\">warm-up router noise, "
               "std %g &#8594; 0</text>\n", load.x0 + 6, load.y0 + 16, (double)VM_NOISE_STD);
    snprintf(note, sizeof note, "collapse: %d experts take every token (E/K = %g)", VM_K, (double)VM_E / VM_K);
    vm_svg_ref(f, &load, (double)VM_E / VM_K, note, 0);
    for (l = 0; l < VM_L; l++) {
        for (i = 0; i < n; i++) raw[i] = h->step[i].max_over_mean[l];
        vm_smooth(raw, n, 21, avg);
        vm_svg_line(f, &load, NULL, raw, n, vm_layer_color[l % 4], 1.0, 0.22);
        vm_svg_line(f, &load, NULL, avg, n, vm_layer_color[l % 4], 2.5, 1.0);
    }
    for (l = 0; l < VM_L; l++) {
        const double lx = load.x0 + load.w - 300, ly = vm_py(&load, 1.8) + 18 * l;
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"3\"/>\n",
                lx, ly, lx + 26, ly, vm_layer_color[l % 4]);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\">MoE layer %d (block %d)</text>\n", lx + 32, ly + 4, l, l);
    }
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" fill=\"#555\">faint: each step (%d tokens); "
               "bold: 21-step average</text>\n", load.x0 + load.w - 300, vm_py(&load, 1.8) + 18 * VM_L + 4, VM_TMAX);

    /* right column: share of the pairs per expert on the test set */
    fprintf(f, "<text x=\"700\" y=\"110\" font-size=\"15\" font-weight=\"bold\">Expert load on the test set</text>\n");
    fprintf(f, "<text x=\"700\" y=\"128\" font-size=\"11\" fill=\"#555\">share of the token-expert pairs after "
               "training;</text>\n");
    fprintf(f, "<text x=\"700\" y=\"142\" font-size=\"11\" fill=\"#555\">dotted outline: before training; "
               "dashed line: 1/E</text>\n");
    for (l = 0; l < VM_L && l < 2; l++) {
        const double bx = 730, by = 180 + 145 * l, bw = 240, bh = 95, ymax = 0.5, slot = bw / VM_E;
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" fill=\"%s\" font-weight=\"bold\">MoE layer %d</text>\n",
                bx - 30, by - 8, vm_layer_color[l % 4], l);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n", bx, by + bh, bx + bw, by + bh);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n", bx, by, bx, by + bh);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"10\" text-anchor=\"end\">50%%</text>\n", bx - 3, by + 4);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"10\" text-anchor=\"end\">0</text>\n", bx - 3, by + bh + 3);
        for (e = 0; e < VM_E; e++) {
            const double after = h->eval[last].load[l][e], before = h->eval[0].load[l][e];
            const double x = bx + 8 + e * slot, bar_w = slot - 16;
            const double ha = bh * (after > ymax ? ymax : after) / ymax, hb = bh * (before > ymax ? ymax : before) / ymax;
            fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\" fill-opacity=\"0.85\"/>\n",
                    x, by + bh - ha, bar_w, ha, vm_layer_color[l % 4]);
            fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#222\" "
                       "stroke-width=\"1.2\" stroke-dasharray=\"3,2\"/>\n", x, by + bh - hb, bar_w, hb);
            fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" fill=\"white\" font-weight=\"bold\" "
                       "text-anchor=\"middle\">%.0f%%</text>\n", x + bar_w / 2, by + bh - ha + 14, 100.0 * after);
            fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" text-anchor=\"middle\">expert %d</text>\n",
                    x + bar_w / 2, by + bh + 14, e);
        }
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#555\" stroke-dasharray=\"4,3\"/>\n",
                bx, by + bh * (1.0 - 1.0 / VM_E / ymax), bx + bw, by + bh * (1.0 - 1.0 / VM_E / ymax));
    }

    /* right column, below: the misclassified test digits */
    for (i = 0; i < h->n_test; i++) wrong += h->pred[i] != data->y[data->n_train + i];
    fprintf(f, "<text x=\"700\" y=\"490\" font-size=\"15\" font-weight=\"bold\">Misclassified test digits "
               "(%d of %d)</text>\n", wrong, h->n_test);
    fprintf(f, "<text x=\"700\" y=\"508\" font-size=\"11\" fill=\"#555\">label &#8594; prediction</text>\n");
    for (i = 0, e = 0; i < h->n_test && e < 10; i++) {
        const int idx = data->n_train + i;
        double x, y;
        if (h->pred[i] == data->y[idx]) continue;
        x = 705 + (e % 5) * 57; y = 520 + (e / 5) * 84;
        vm_svg_digit(f, data->x + (size_t)idx * VM_PIX, x, y, 6.0);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" text-anchor=\"middle\">%d &#8594; "
                   "<tspan fill=\"#d62728\" font-weight=\"bold\">%d</tspan></text>\n",
                x + 24, y + 66, data->y[idx], h->pred[i]);
        e++;
    }
    if (wrong > 10)
        fprintf(f, "<text x=\"700\" y=\"710\" font-size=\"11\" fill=\"#555\">(the first 10 shown)</text>\n");
    fprintf(f, "</svg>\n");
    free(xs);
    return fclose(f) == 0;
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "examples/data/digits.txt";
    const char *dir = argc > 2 ? argv[2] : ".";
    const int epochs = argc > 3 ? atoi(argv[3]) : 20;
    const unsigned seed = argc > 4 ? (unsigned)atoi(argv[4]) : 1u;
    char svg_path[1024];
    vm_history h;
    vm_data data;
    double acc = 0.0;
    clock_t t0 = clock();
    int l, e, rc = 1;

    if (epochs < 1) { fprintf(stderr, "usage: %s [digits.txt] [output directory] [epochs >= 1] [seed]\n", argv[0]); return 2; }
    if (!vm_data_load(path, &data)) { fprintf(stderr, "cannot read %s (see examples/data/README.md)\n", path); return 1; }
    printf("moe.h %s: ViT-MoE on the UCI digits (%s: %d train, %d test), %d tokens/image, D=%d, %d blocks,\n"
           "E=%d SwiGLU experts top-%d, F=%d, batch %d images = %d MoE tokens, %d epochs, seed %u, %s kernels\n",
           MOE_VERSION_STRING, path, data.n_train, data.n - data.n_train, VM_N, VM_D, VM_L, VM_E, VM_K, VM_F,
           VM_B, VM_TMAX, epochs, seed, vm_kernels());
    if (!vm_train(path, epochs, seed, 1, &h, &acc)) { fprintf(stderr, "training failed\n"); vm_data_free(&data); return 1; }
    printf("\nfinal test accuracy %.2f %% (%d of %d)   [%.1f s CPU]\n", 100.0 * acc,
           (int)(acc * h.n_test + 0.5), h.n_test, (double)(clock() - t0) / CLOCKS_PER_SEC);
    printf("\nexpert load on the test set (share of the token-expert pairs; balanced = %.3f)\n", 1.0 / VM_E);
    printf("layer          ");
    for (e = 0; e < VM_E; e++) printf("  expert %d", e);
    printf("   max/mean\n");
    for (l = 0; l < VM_L; l++) {
        float mx = 0.0f;
        printf("%d  before      ", l);
        for (e = 0; e < VM_E; e++) printf("  %8.3f", h.eval[0].load[l][e]);
        for (e = 0; e < VM_E; e++) if (h.eval[0].load[l][e] > mx) mx = h.eval[0].load[l][e];
        printf("   %8.2f\n", mx * VM_E);
        mx = 0.0f;
        printf("%d  after       ", l);
        for (e = 0; e < VM_E; e++) printf("  %8.3f", h.eval[h.evals - 1].load[l][e]);
        for (e = 0; e < VM_E; e++) if (h.eval[h.evals - 1].load[l][e] > mx) mx = h.eval[h.evals - 1].load[l][e];
        printf("   %8.2f\n", mx * VM_E);
    }
    snprintf(svg_path, sizeof svg_path, "%s/vit_moe_digits.svg", dir);
    if (!vm_write_svg(svg_path, &h, &data)) fprintf(stderr, "cannot write %s\n", svg_path);
    else { printf("\nwrote %s\n", svg_path); rc = 0; }
    vm_history_free(&h);
    vm_data_free(&data);
    return rc;
}
#endif /* VIT_MOE_DIGITS_NO_MAIN */
