/* moe_transformer_layer.c -- one Transformer layer whose feed-forward sublayer
   is a Mixture of Experts, forward and backward, in the two arrangements in
   use (pick one at run time):
     post-LN (the original Transformer, Vaswani et al. 2017; also Switch, GShard):
         y = LN1(x + Attn(x))          z = LN2(y + MoE(y))
     pre-LN  (GPT-2 onwards; Mixtral, DeepSeek, Qwen, ...):
         y = x + Attn(LN1(x))          z = y + MoE(LN2(y))
   Causal multi-head self-attention, LayerNorm and the residual additions are
   written here, each with its backward pass, every step under its formula.
   The MoE sublayer is moe.h's public API: moe_forward with cfg.training = 1
   (train mode), cfg.save_for_backward = 1 and a moe_info bound by
   moe_info_bind (it keeps what the backward needs), then moe_backward. The
   loss is a task loss plus the MoE auxiliary loss:
         loss = mean((z - target)^2) + info.aux_total,
         info.aux_total = cfg.balance_coef * info.aux_balance (Switch/HF form)
   and moe_backward differentiates <dy, MoE output> + info.aux_total, so the
   aux loss's gradient comes out of the library with the task gradient.

   What it prints, per variant:
   1. a gradient check: central finite differences (loss summed in double
      from the float forward) against the backward, on coordinates of x, of
      the attention weights, of a LayerNorm gain and of the MoE router and
      expert weights, with the max relative error. The program returns 1 if
      any error is above CHECK_TOL (so `make examples` can run it as a test).
   2. SGD with momentum on a toy task (fresh tokens every step; the target
      mixes the tokens of the prefix, which attention must learn, with a
      per-cluster nonlinear map, which the experts can split): the loss every
      50 steps, the aux loss and the expert load.

   build: cc -std=c99 -O2 -o moe_transformer_layer examples/moe_transformer_layer.c -lm
   run:   ./moe_transformer_layer [post|pre|both]        (default both)       */
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Shapes: B sequences of L tokens (T = B*L tokens, batch-major: t = b*L + s,
   the order moe.h's sequence-wise options assume); NH heads of DH dims. The
   MoE sees the T tokens as one routing group; attention stays within a
   sequence. Small on purpose: the check and 400 steps take well under 1 s. */
enum { B = 2, L = 8, T = B * L, D = 16, NH = 2, DH = D / NH, E = 4, K = 2, F = 32, NCLUSTER = 4 };

#define LN_EPS 1e-5f
#define CHECK_TOL 1e-2      /* max relative error allowed in the gradient check */
#ifndef FD_STEP
#define FD_STEP (1.0 / 64)  /* finite-difference step (see grad_check)           */
#endif
#define STEPS 400
#define LR 0.05             /* SGD step; momentum MOMENTUM                      */
#define MOMENTUM 0.9
#define BALANCE_COEF 0.01f  /* Switch's alpha                                   */

/* ---------------------------------------------------------------------------
   Parameters (and, in the same layout, their gradients and momenta).
   Linear layers use nn.Linear layout [out][in], no biases, as moe.h does.  */
typedef struct params {
    float wq[D * D], wk[D * D], wv[D * D], wo[D * D];   /* attention            */
    float ln1_g[D], ln1_b[D], ln2_g[D], ln2_b[D];       /* LayerNorm gain, shift */
    float router[E * D], gate[E * F * D], up[E * F * D], down[E * D * F];   /* MoE */
} params;

/* The tensors of a params struct as (pointer, length), for the optimiser. */
enum { NTENSOR = 12 };
static void tensors(params *p, float **ptr, int *len) {
    float *const a[NTENSOR] = {p->wq, p->wk, p->wv, p->wo, p->ln1_g, p->ln1_b, p->ln2_g, p->ln2_b,
                               p->router, p->gate, p->up, p->down};
    const int n[NTENSOR] = {D * D, D * D, D * D, D * D, D, D, D, D, E * D, E * F * D, E * F * D, E * D * F};
    int i;
    for (i = 0; i < NTENSOR; i++) { ptr[i] = a[i]; len[i] = n[i]; }
}

/* Everything the forward keeps for the backward. */
typedef struct acts {
    float x[T * D];                  /* layer input                                 */
    float a_in[T * D];               /* attention input: x (post) or LN1(x) (pre)   */
    float q[T * D], k[T * D], v[T * D];
    float p[B * NH * L * L];         /* attention probabilities [b][h][t][s]        */
    float o[T * D];                  /* heads concatenated, before Wo               */
    float att[T * D];                /* Attn(a_in)                                  */
    float y[T * D];                  /* output of the attention sublayer            */
    float m_in[T * D];               /* MoE input: y (post) or LN2(y) (pre)         */
    float m[T * D];                  /* MoE output                                  */
    float z[T * D];                  /* layer output                                */
    float ln1_xhat[T * D], ln1_rstd[T], ln2_xhat[T * D], ln2_rstd[T];
} acts;

/* The MoE sublayer: config, the info the forward fills, one workspace. */
typedef struct moe_state {
    moe_config cfg;
    moe_info info;
    void *info_buf, *ws;
    size_t ws_bytes;
} moe_state;

static moe_weights moe_weights_of(const params *p) {
    moe_weights w;
    memset(&w, 0, sizeof w);
    w.router = p->router; w.gate = p->gate; w.up = p->up; w.down = p->down;
    return w;
}

/* xorshift64* and Box-Muller: data and initial weights, same on every run. */
static uint64_t rng = 0x2545F4914F6CDD1Dull;
static double uniform01(void) {
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return ((double)((rng * 2685821657736338717ull) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
static float normal(void) {
    double u1 = uniform01(), u2 = uniform01();
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// ----------------------------------------------------------------------------
// Building blocks, each forward followed by its backward

/* out[n][O] = in[n][I] . W^T,  W: [O][I] (nn.Linear, no bias). */
static void linear(float *out, const float *in, const float *W, int n, int O, int I) {
    int i, o, j;
    for (i = 0; i < n; i++)
        for (o = 0; o < O; o++) {
            float acc = 0.0f;
            for (j = 0; j < I; j++) acc += in[i * I + j] * W[o * I + j];
            out[i * O + o] = acc;
        }
}
/* Backward of out = in . W^T:  dW += dout^T . in;  din += dout . W
   (din ACCUMULATES here: the callers sum several paths into it).           */
static void linear_backward(float *din, float *dW, const float *dout, const float *in,
                            const float *W, int n, int O, int I) {
    int i, o, j;
    for (i = 0; i < n; i++)
        for (o = 0; o < O; o++) {
            const float g = dout[i * O + o];
            for (j = 0; j < I; j++) {
                dW[o * I + j] += g * in[i * I + j];
                din[i * I + j] += g * W[o * I + j];
            }
        }
}

/* LayerNorm over the D features of each token:
     mu = mean(v),  var = mean((v - mu)^2),  rstd = 1 / sqrt(var + eps)
     xhat = (v - mu) * rstd,  out = g * xhat + b
   xhat and rstd are kept for the backward.                                 */
static void layernorm(float *out, const float *v, const float *g, const float *b,
                      float *xhat, float *rstd) {
    int t, d;
    for (t = 0; t < T; t++) {
        const float *vt = v + t * D;
        float mu = 0.0f, var = 0.0f, r;
        for (d = 0; d < D; d++) mu += vt[d];
        mu /= D;
        for (d = 0; d < D; d++) var += (vt[d] - mu) * (vt[d] - mu);
        var /= D;
        r = 1.0f / sqrtf(var + LN_EPS);
        rstd[t] = r;
        for (d = 0; d < D; d++) {
            xhat[t * D + d] = (vt[d] - mu) * r;
            out[t * D + d] = g[d] * xhat[t * D + d] + b[d];
        }
    }
}
/* LayerNorm backward (dv ACCUMULATES):
     dg += dout * xhat,  db += dout,  dxhat = dout * g
     dv += rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))          */
static void layernorm_backward(float *dv, float *dg, float *db, const float *dout,
                               const float *g, const float *xhat, const float *rstd) {
    int t, d;
    for (t = 0; t < T; t++) {
        float mean_dxhat = 0.0f, mean_dxhat_xhat = 0.0f;
        for (d = 0; d < D; d++) {
            const float dxhat = dout[t * D + d] * g[d];
            dg[d] += dout[t * D + d] * xhat[t * D + d];
            db[d] += dout[t * D + d];
            mean_dxhat += dxhat;
            mean_dxhat_xhat += dxhat * xhat[t * D + d];
        }
        mean_dxhat /= D;
        mean_dxhat_xhat /= D;
        for (d = 0; d < D; d++) {
            const float dxhat = dout[t * D + d] * g[d];
            dv[t * D + d] += rstd[t] * (dxhat - mean_dxhat - xhat[t * D + d] * mean_dxhat_xhat);
        }
    }
}

/* Causal multi-head self-attention of the tokens a[T][D]:
     q = a Wq^T,  k = a Wk^T,  v = a Wv^T                  (each [T][D])
     per sequence b and head h (dims h*DH .. h*DH + DH - 1), for s <= t:
       S[t][s] = q_t . k_s / sqrt(DH)
       P[t][.] = softmax over s <= t of S[t][.]   (s > t masked out)
       o_t     = sum_s P[t][s] v_s
     att = o Wo^T                                                            */
static void attention(const params *p, acts *A) {
    const float scale = 1.0f / sqrtf((float)DH);
    int b, h, t, s, d;
    linear(A->q, A->a_in, p->wq, T, D, D);
    linear(A->k, A->a_in, p->wk, T, D, D);
    linear(A->v, A->a_in, p->wv, T, D, D);
    for (b = 0; b < B; b++)
        for (h = 0; h < NH; h++)
            for (t = 0; t < L; t++) {
                const float *qt = A->q + (b * L + t) * D + h * DH;
                float *P = A->p + ((b * NH + h) * L + t) * L, mx = -INFINITY, sum = 0.0f;
                float *ot = A->o + (b * L + t) * D + h * DH;
                for (s = 0; s <= t; s++) {        /* pass 1: scores and their max */
                    const float *ks = A->k + (b * L + s) * D + h * DH;
                    float acc = 0.0f;
                    for (d = 0; d < DH; d++) acc += qt[d] * ks[d];
                    P[s] = acc * scale;
                    if (P[s] > mx) mx = P[s];
                }
                for (s = 0; s <= t; s++) { P[s] = expf(P[s] - mx); sum += P[s]; }  /* pass 2 */
                for (s = 0; s <= t; s++) P[s] /= sum;
                for (s = t + 1; s < L; s++) P[s] = 0.0f;
                for (d = 0; d < DH; d++) ot[d] = 0.0f;                         /* pass 3 */
                for (s = 0; s <= t; s++) {
                    const float *vs = A->v + (b * L + s) * D + h * DH;
                    for (d = 0; d < DH; d++) ot[d] += P[s] * vs[d];
                }
            }
    linear(A->att, A->o, p->wo, T, D, D);
}
/* Attention backward, from datt to the weights and to da (ACCUMULATES):
     do = datt Wo,  dWo += datt^T o
     dP[t][s] = do_t . v_s,   dv_s += sum_t P[t][s] do_t
     dS[t][s] = P[t][s] (dP[t][s] - sum_s' P[t][s'] dP[t][s'])   (softmax)
     dq_t = sum_s dS[t][s] k_s / sqrt(DH),   dk_s = sum_t dS[t][s] q_t / sqrt(DH)
     dWq += dq^T a,  dWk += dk^T a,  dWv += dv^T a,  da += dq Wq + dk Wk + dv Wv  */
static void attention_backward(const params *p, params *g, const acts *A, const float *datt, float *da) {
    static float dO[T * D], dq[T * D], dk[T * D], dv[T * D];
    const float scale = 1.0f / sqrtf((float)DH);
    float dP[L];
    int b, h, t, s, d;
    memset(dO, 0, sizeof dO); memset(dq, 0, sizeof dq);
    memset(dk, 0, sizeof dk); memset(dv, 0, sizeof dv);
    linear_backward(dO, g->wo, datt, A->o, p->wo, T, D, D);
    for (b = 0; b < B; b++)
        for (h = 0; h < NH; h++)
            for (t = 0; t < L; t++) {
                const float *P = A->p + ((b * NH + h) * L + t) * L;
                const float *dot = dO + (b * L + t) * D + h * DH;
                float rowdot = 0.0f;
                for (s = 0; s <= t; s++) {
                    const float *vs = A->v + (b * L + s) * D + h * DH;
                    float *dvs = dv + (b * L + s) * D + h * DH;
                    float acc = 0.0f;
                    for (d = 0; d < DH; d++) { acc += dot[d] * vs[d]; dvs[d] += P[s] * dot[d]; }
                    dP[s] = acc;
                    rowdot += P[s] * acc;
                }
                for (s = 0; s <= t; s++) {
                    const float dS = P[s] * (dP[s] - rowdot) * scale;
                    const float *qt = A->q + (b * L + t) * D + h * DH, *ks = A->k + (b * L + s) * D + h * DH;
                    float *dqt = dq + (b * L + t) * D + h * DH, *dks = dk + (b * L + s) * D + h * DH;
                    for (d = 0; d < DH; d++) { dqt[d] += dS * ks[d]; dks[d] += dS * qt[d]; }
                }
            }
    linear_backward(da, g->wq, dq, A->a_in, p->wq, T, D, D);
    linear_backward(da, g->wk, dk, A->a_in, p->wk, T, D, D);
    linear_backward(da, g->wv, dv, A->a_in, p->wv, T, D, D);
}

// ----------------------------------------------------------------------------
// The layer

/* Forward of the whole layer on A->x; the MoE fills M->info. */
static moe_status layer_forward(const params *p, int pre_ln, acts *A, moe_state *M) {
    const moe_weights w = moe_weights_of(p);
    static float r[T * D];
    moe_status st;
    int i;
    if (pre_ln) {
        /* y = x + Attn(LN1(x)) */
        layernorm(A->a_in, A->x, p->ln1_g, p->ln1_b, A->ln1_xhat, A->ln1_rstd);
        attention(p, A);
        for (i = 0; i < T * D; i++) A->y[i] = A->x[i] + A->att[i];
        /* z = y + MoE(LN2(y)) */
        layernorm(A->m_in, A->y, p->ln2_g, p->ln2_b, A->ln2_xhat, A->ln2_rstd);
        st = moe_forward(&M->cfg, &w, A->m_in, T, A->m, &M->info, M->ws, M->ws_bytes);
        if (st != MOE_STATUS_OK) return st;
        for (i = 0; i < T * D; i++) A->z[i] = A->y[i] + A->m[i];
    } else {
        /* y = LN1(x + Attn(x)) */
        memcpy(A->a_in, A->x, sizeof A->x);
        attention(p, A);
        for (i = 0; i < T * D; i++) r[i] = A->x[i] + A->att[i];
        layernorm(A->y, r, p->ln1_g, p->ln1_b, A->ln1_xhat, A->ln1_rstd);
        /* z = LN2(y + MoE(y)) */
        memcpy(A->m_in, A->y, sizeof A->y);
        st = moe_forward(&M->cfg, &w, A->m_in, T, A->m, &M->info, M->ws, M->ws_bytes);
        if (st != MOE_STATUS_OK) return st;
        for (i = 0; i < T * D; i++) r[i] = A->y[i] + A->m[i];
        layernorm(A->z, r, p->ln2_g, p->ln2_b, A->ln2_xhat, A->ln2_rstd);
    }
    return MOE_STATUS_OK;
}

/* loss = (1/(T D)) sum (z - target)^2 + aux_total, summed in double. */
static double layer_loss(const acts *A, const float *target, const moe_info *info, double *task) {
    double s = 0.0;
    int i;
    for (i = 0; i < T * D; i++) s += ((double)A->z[i] - target[i]) * ((double)A->z[i] - target[i]);
    s /= T * D;
    if (task) *task = s;
    return s + info->aux_total;
}

/* Backward of the whole layer: parameter gradients ACCUMULATE into g, dx is
   OVERWRITTEN (the moe.h convention). Run right after layer_forward.      */
static moe_status layer_backward(const params *p, params *g, int pre_ln, const acts *A,
                                 const float *target, moe_state *M, float *dx) {
    const moe_weights w = moe_weights_of(p);
    moe_grads mg;
    static float dz[T * D], dy[T * D], dm_in[T * D], dr[T * D], da[T * D];
    moe_status st;
    int i;
    memset(&mg, 0, sizeof mg);
    mg.router = g->router; mg.gate = g->gate; mg.up = g->up; mg.down = g->down;

    /* d loss / dz = 2 (z - target) / (T D) */
    for (i = 0; i < T * D; i++) dz[i] = 2.0f * (A->z[i] - target[i]) / (T * D);

    if (pre_ln) {
        /* z = y + m:  dy = dz (residual), dm = dz */
        memcpy(dy, dz, sizeof dz);
        /* m = MoE(m_in): moe_backward gives dm_in (and the aux loss's gradient) */
        st = moe_backward(&M->cfg, &w, A->m_in, T, &M->info, dz, dm_in, &mg, M->ws, M->ws_bytes);
        if (st != MOE_STATUS_OK) return st;
        /* m_in = LN2(y):  dy += LN2'(dm_in) */
        layernorm_backward(dy, g->ln2_g, g->ln2_b, dm_in, p->ln2_g, A->ln2_xhat, A->ln2_rstd);
        /* y = x + att:  dx = dy (residual), datt = dy */
        memcpy(dx, dy, sizeof dy);
        /* att = Attn(a_in), a_in = LN1(x):  dx += LN1'(Attn'(datt)) */
        memset(da, 0, sizeof da);
        attention_backward(p, g, A, dy, da);
        layernorm_backward(dx, g->ln1_g, g->ln1_b, da, p->ln1_g, A->ln1_xhat, A->ln1_rstd);
    } else {
        /* z = LN2(r2), r2 = y + m:  dr2 = LN2'(dz);  dy = dr2, dm = dr2 */
        memset(dr, 0, sizeof dr);
        layernorm_backward(dr, g->ln2_g, g->ln2_b, dz, p->ln2_g, A->ln2_xhat, A->ln2_rstd);
        memcpy(dy, dr, sizeof dr);
        /* m = MoE(y):  dy += dm_in */
        st = moe_backward(&M->cfg, &w, A->m_in, T, &M->info, dr, dm_in, &mg, M->ws, M->ws_bytes);
        if (st != MOE_STATUS_OK) return st;
        for (i = 0; i < T * D; i++) dy[i] += dm_in[i];
        /* y = LN1(r1), r1 = x + att:  dr1 = LN1'(dy);  dx = dr1, datt = dr1 */
        memset(dr, 0, sizeof dr);
        layernorm_backward(dr, g->ln1_g, g->ln1_b, dy, p->ln1_g, A->ln1_xhat, A->ln1_rstd);
        memcpy(dx, dr, sizeof dr);
        /* att = Attn(x):  dx += Attn'(datt) */
        attention_backward(p, g, A, dr, dx);
    }
    return MOE_STATUS_OK;
}

// ----------------------------------------------------------------------------
// Data: tokens from NCLUSTER clusters; the target mixes the prefix (attention's
// job) with a per-cluster nonlinear map (the experts' job), normalised per
// token so that post-LN (whose output is normalised) can reach it too.

typedef struct task { float center[NCLUSTER][D], map[NCLUSTER][D * D]; } task;

static void task_init(task *tk) {
    int c, i;
    for (c = 0; c < NCLUSTER; c++) {
        for (i = 0; i < D; i++) tk->center[c][i] = 1.5f * normal();
        for (i = 0; i < D * D; i++) tk->map[c][i] = normal() / sqrtf((float)D);
    }
}
/* target_t = normalise(mean_{s <= t} x_s + tanh(map_c x_t)), c = cluster of t */
static void task_batch(const task *tk, float *x, float *target) {
    int b, s, d, j, c, i;
    for (b = 0; b < B; b++) {
        float prefix[D] = {0};
        for (s = 0; s < L; s++) {
            float *xt = x + (b * L + s) * D, *yt = target + (b * L + s) * D, mu = 0.0f, var = 0.0f;
            c = (int)(uniform01() * NCLUSTER);
            for (d = 0; d < D; d++) xt[d] = tk->center[c][d] + 0.5f * normal();
            for (d = 0; d < D; d++) prefix[d] += xt[d];
            for (d = 0; d < D; d++) {
                float acc = 0.0f;
                for (j = 0; j < D; j++) acc += tk->map[c][d * D + j] * xt[j];
                yt[d] = prefix[d] / (s + 1) + tanhf(acc);
            }
            for (i = 0; i < D; i++) mu += yt[i] / D;
            for (i = 0; i < D; i++) var += (yt[i] - mu) * (yt[i] - mu) / D;
            for (i = 0; i < D; i++) yt[i] = (yt[i] - mu) / sqrtf(var + LN_EPS);
        }
    }
}

static void params_init(params *p) {
    moe_grads init;
    const float a = 1.0f / sqrtf((float)D);
    int i;
    for (i = 0; i < D * D; i++) {
        p->wq[i] = a * normal(); p->wk[i] = a * normal();
        p->wv[i] = a * normal(); p->wo[i] = a * normal();
    }
    for (i = 0; i < D; i++) { p->ln1_g[i] = p->ln2_g[i] = 1.0f; p->ln1_b[i] = p->ln2_b[i] = 0.0f; }
    /* the MoE tensors: moe_init_weights (Xavier uniform, one stream per expert) */
    memset(&init, 0, sizeof init);
    init.router = p->router; init.gate = p->gate; init.up = p->up; init.down = p->down;
    {
        moe_config c = moe_preset_mixtral();
        c.num_experts = E; c.top_k = K; c.d_model = D; c.d_ff = F;
        moe_init_weights(&c, MOE_INIT_XAVIER, 7, &init);
    }
}

// ----------------------------------------------------------------------------
// Gradient check

/* Routing signature: the experts every token was sent to. Where a perturbed
   forward routes differently, the loss jumps (top-k is a step function) and
   a finite difference means nothing there: such a coordinate is skipped.  */
static int same_routing(const int32_t *a, const int32_t *b) { return memcmp(a, b, T * K * sizeof(int32_t)) == 0; }

/* Central difference  (loss(v + h) - loss(v - h)) / (actual step), where the
   actual step is what float could store: (float)(v + h) - (float)(v - h).
   Why h = 1/64: the forward is float, so each loss value carries rounding
   noise of ~1e-7 of its size, which the difference divides by 2h; the
   truncation error of the central difference grows as h^2. Measured on this
   layer, the max relative error over the coordinates below is ~5e-4 at
   h = 1/64, ~9e-4 at 1/256, ~5e-3 at 1/1024 and above 1e-2 at 1/4096 (the
   noise wins), so 1/64 it is; CHECK_TOL = 1e-2 leaves a 20x margin. It is
   sharp enough: scaling the attention's dS by 1.03, dropping LayerNorm's
   mean term, or leaving info.aux_total out of the loss each fail it.      */
static int grad_check(params *p, int pre_ln, acts *A, const float *target, moe_state *M,
                      double *max_rel) {
    static params g;
    static float dx[T * D];
    int32_t base_route[T * K], route[T * K];
    const double h = FD_STEP;
    struct { const char *name; float *param, *grad; int index; } c[12];
    int n = 0, i, checked = 0;
    float *gx = dx;
    memset(&g, 0, sizeof g);
    if (layer_forward(p, pre_ln, A, M) != MOE_STATUS_OK) return 0;
    memcpy(base_route, M->info.expert, sizeof base_route);
    if (layer_backward(p, &g, pre_ln, A, target, M, dx) != MOE_STATUS_OK) return 0;
#define COORD(nm, P, G, I) do { c[n].name = nm; c[n].param = (P); c[n].grad = (G); c[n].index = (I); n++; } while (0)
    COORD("x", A->x, gx, 5);        COORD("x", A->x, gx, 7 * D + 3);   COORD("x", A->x, gx, 15 * D + 11);
    COORD("Wq", p->wq, g.wq, 2 * D + 9);   COORD("Wq", p->wq, g.wq, 13 * D + 4);
    COORD("Wk", p->wk, g.wk, 6 * D + 1);   COORD("Wv", p->wv, g.wv, 10 * D + 12);
    COORD("Wo", p->wo, g.wo, 3 * D + 3);   COORD("ln1 gain", p->ln1_g, g.ln1_g, 4);
    COORD("router", p->router, g.router, 1 * D + 6);
    COORD("expert gate", p->gate, g.gate, 2 * F * D + 5 * D + 2);
    COORD("expert down", p->down, g.down, 3 * D * F + 9 * F + 17);
#undef COORD
    printf("  gradient check (central differences, h = %g, loss summed in double):\n", (double)FD_STEP);
    printf("    %-12s %6s %14s %14s %10s\n", "tensor", "index", "backward", "numeric", "rel err");
    *max_rel = 0.0;
    for (i = 0; i < n; i++) {
        float *v = c[i].param + c[i].index;
        const float v0 = *v, vp = (float)(v0 + h), vm = (float)(v0 - h);
        double lp, lm, num, an = c[i].grad[c[i].index], rel;
        int moved;
        *v = vp;
        if (layer_forward(p, pre_ln, A, M) != MOE_STATUS_OK) return 0;
        lp = layer_loss(A, target, &M->info, NULL);
        memcpy(route, M->info.expert, sizeof route);
        moved = !same_routing(route, base_route);
        *v = vm;
        if (layer_forward(p, pre_ln, A, M) != MOE_STATUS_OK) return 0;
        lm = layer_loss(A, target, &M->info, NULL);
        moved |= !same_routing(M->info.expert, base_route);
        *v = v0;
        num = (lp - lm) / ((double)vp - (double)vm);
        /* relative error with a floor: gradients below 1e-5 are compared absolutely */
        rel = fabs(an - num) / fmax(fmax(fabs(an), fabs(num)), 1e-5);
        if (moved) {
            printf("    %-12s %6d %14.6e %14s %10s  (routing changed: skipped)\n", c[i].name, c[i].index, an, "-", "-");
            continue;
        }
        checked++;
        if (rel > *max_rel) *max_rel = rel;
        printf("    %-12s %6d %14.6e %14.6e %10.2e\n", c[i].name, c[i].index, an, num, rel);
    }
    layer_forward(p, pre_ln, A, M);          /* leave the state of the base point */
    return checked >= n / 2;
}

// ----------------------------------------------------------------------------

static int run_variant(int pre_ln) {
    static params p, g, mom;
    static acts A;
    static task tk;
    static float target[T * D], dx[T * D];
    float *pt[NTENSOR], *gt[NTENSOR], *mt[NTENSOR];
    int len[NTENSOR], i, j, step, e, ok = 0;
    moe_state M;
    size_t bw_bytes, info_bytes;
    double max_rel, avg_task = 0.0, avg_aux = 0.0;
    int32_t load[E];

    printf("\n=== %s: %s ===\n", pre_ln ? "pre-LN" : "post-LN",
           pre_ln ? "y = x + Attn(LN1(x)),  z = y + MoE(LN2(y))" : "y = LN1(x + Attn(x)),  z = LN2(y + MoE(y))");
    rng = 0x2545F4914F6CDD1Dull;                 /* both variants: same data, same start */
    memset(&p, 0, sizeof p); memset(&g, 0, sizeof g); memset(&mom, 0, sizeof mom);
    task_init(&tk);
    params_init(&p);

    /* the MoE sublayer: Mixtral routing (softmax, top-2, renormalised, SwiGLU),
       shrunk; the Switch/HF balance loss with coefficient 0.01; train mode,
       and save_for_backward = 1 so the forward keeps what moe_backward reads */
    memset(&M, 0, sizeof M);
    M.cfg = moe_preset_mixtral();
    M.cfg.num_experts = E; M.cfg.top_k = K; M.cfg.d_model = D; M.cfg.d_ff = F;
    M.cfg.balance_coef = BALANCE_COEF;
    M.cfg.training = 1;
    M.cfg.save_for_backward = 1;
    if (moe_forward_workspace_size(&M.cfg, T, &M.ws_bytes) != MOE_STATUS_OK ||
        moe_backward_workspace_size(&M.cfg, T, &bw_bytes) != MOE_STATUS_OK ||
        moe_info_size(&M.cfg, T, &info_bytes) != MOE_STATUS_OK)
        return 0;
    if (bw_bytes > M.ws_bytes) M.ws_bytes = bw_bytes;
    M.ws = malloc(M.ws_bytes);
    M.info_buf = malloc(info_bytes);
    if (!M.ws || !M.info_buf || moe_info_bind(&M.cfg, T, &M.info, M.info_buf, info_bytes) != MOE_STATUS_OK)
        goto done;

    /* 1. gradient check on one batch */
    task_batch(&tk, A.x, target);
    if (!grad_check(&p, pre_ln, &A, target, &M, &max_rel)) { printf("  gradient check could not run\n"); goto done; }
    printf("  max relative error %.2e (tolerance %.0e): %s\n", max_rel, CHECK_TOL,
           max_rel <= CHECK_TOL ? "backward agrees with finite differences" : "FAILED");

    /* 2. training: SGD with momentum, fresh tokens every step:
          mom = MOMENTUM * mom + grad;  param -= LR * mom                   */
    tensors(&p, pt, len);
    tensors(&g, gt, len);
    tensors(&mom, mt, len);
    printf("  SGD (lr %g, momentum %g), %d tokens per step, loss = MSE + %g * aux_balance:\n",
           LR, MOMENTUM, T, (double)BALANCE_COEF);
    printf("    %5s  %10s  %11s  %s\n", "steps", "task (MSE)", "aux_balance", "tokens per expert (K = 2 each)");
    for (e = 0; e < E; e++) load[e] = 0;
    for (step = 1; step <= STEPS; step++) {
        double task_loss;
        task_batch(&tk, A.x, target);
        memset(&g, 0, sizeof g);
        if (layer_forward(&p, pre_ln, &A, &M) != MOE_STATUS_OK) goto done;
        layer_loss(&A, target, &M.info, &task_loss);
        if (layer_backward(&p, &g, pre_ln, &A, target, &M, dx) != MOE_STATUS_OK) goto done;
        for (i = 0; i < NTENSOR; i++)
            for (j = 0; j < len[i]; j++) {
                mt[i][j] = (float)(MOMENTUM * mt[i][j] + gt[i][j]);
                pt[i][j] -= (float)(LR * mt[i][j]);
            }
        avg_task += task_loss;
        avg_aux += M.info.aux_balance;
        for (e = 0; e < E; e++) load[e] += M.info.expert_routed[e];
        if (step == 1 || step % 50 == 0) {     /* means over the steps since the last line */
            const int n = step == 1 ? 1 : (step == 50 ? 49 : 50);
            printf("    %5d  %10.4f  %11.4f  ", step, avg_task / n, avg_aux / n);
            for (e = 0; e < E; e++) printf(" %4d", (int)((load[e] + n / 2) / n));
            printf("\n");
            avg_task = avg_aux = 0.0;
            for (e = 0; e < E; e++) load[e] = 0;
        }
    }
    printf("  (aux_balance is the HF form E * sum_e f_e P_e: %d = K at perfect balance; "
           "a mean of %d tokens per expert is balance)\n", K, T * K / E);
    ok = max_rel <= CHECK_TOL;
done:
    free(M.ws); free(M.info_buf);
    return ok;
}

int main(int argc, char **argv) {
    const char *which = argc > 1 ? argv[1] : "both";
    int ok = 1;
    if (strcmp(which, "post") && strcmp(which, "pre") && strcmp(which, "both")) {
        fprintf(stderr, "usage: %s [post|pre|both]\n", argv[0]);
        return 2;
    }
    printf("moe.h %s: one Transformer layer, MoE in place of the FFN\n", MOE_VERSION_STRING);
    printf("B=%d sequences x L=%d tokens (T=%d), D=%d, %d heads, causal; MoE: E=%d, top-%d, "
           "SwiGLU F=%d, balance_coef %g\n", B, L, T, D, NH, E, K, F, (double)BALANCE_COEF);
    if (strcmp(which, "pre")) ok &= run_variant(0);
    if (strcmp(which, "post")) ok &= run_variant(1);
    printf("\n%s\n", ok ? "all gradient checks passed" : "GRADIENT CHECK FAILED");
    return ok ? 0 : 1;
}
