/* train_balance.c -- load balancing made visible. A small MoE layer (E = 8
   SwiGLU experts, top-2, renormalised) plus a linear softmax readout is trained
   with Adam on a synthetic 8-cluster classification task, three ways:
     none   softmax router, no balancing: routing collapses, one expert gets
            every token and a few others share the second slot;
     aux    the same router plus the Switch / HF load-balancing loss
            (cfg.balance_coef; moe_backward adds its gradient);
     bias   DeepSeek-V3 aux-loss-free balancing: sigmoid scores,
            cfg.selection_bias = 1, and moe_selection_bias_update(E,
            info.expert_routed, gamma, bias) after every step.
   Public API only: moe_forward with cfg.training = 1, cfg.save_for_backward =
   1 and an info bound by moe_info_bind, then moe_backward; the readout, the
   loss, its gradient dy and Adam are written here. Writes train_balance.csv
   (every step of every run) and train_balance.svg (max/mean expert load and
   loss over the steps, final load per expert), and prints a summary table.

   build: cc -std=c99 -O2 -o train_balance examples/train_balance.c -lm
   run:   ./train_balance [output directory] [steps] [seed]   (defaults: . 400 1)

   tests/test_train.c includes this file with TRAIN_BALANCE_NO_MAIN defined and
   calls train_balance_run(); then main() and MOE_IMPLEMENTATION are left out. */
#ifndef TRAIN_BALANCE_NO_MAIN
#define MOE_IMPLEMENTATION
#endif
#include "../moe.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Shape of the model and the task. Small on purpose: the reference kernels
   are scalar; 3 runs x 400 steps take 1.2 s of CPU at -O2 (one core of a
   2-core x86-64 VM, gcc 12, 2026-12-05).                                  */
enum {
    TB_E = 8,          /* experts                                            */
    TB_K = 2,          /* experts per token                                  */
    TB_D = 16,         /* d_model                                            */
    TB_F = 16,         /* expert hidden width                                */
    TB_T = 256,        /* tokens per step (fresh samples every step)         */
    TB_CLUSTERS = 8,   /* input clusters                                     */
    TB_CLASSES = 2     /* readout classes                                    */
};
enum { TB_NONE = 0, TB_AUX = 1, TB_BIAS = 2, TB_MODES = 3 };   /* the three runs */

/* Training knobs, tuned for this demo (override with -D to experiment). */
#ifndef TB_LR
#define TB_LR 1e-2            /* Adam step: experts and readout                 */
#endif
#ifndef TB_ROUTER_LR
#define TB_ROUTER_LR 5e-3     /* Adam step of the router (why half: see below)  */
#endif
#ifndef TB_ROUTER_INIT
#define TB_ROUTER_INIT 0.01   /* router weights ~ N(0, 0.01^2), offset removed  */
#endif
#ifndef TB_OFFSET
#define TB_OFFSET 8.0         /* norm of the offset every input shares          */
#endif
#ifndef TB_BALANCE_COEF
#define TB_BALANCE_COEF 0.05f /* aux: weight of the HF / Switch balance loss    */
#endif
#ifndef TB_GAMMA
#define TB_GAMMA 5e-3f        /* bias: moe_selection_bias_update step           */
#endif

/* One training step of one run, as logged. */
typedef struct tb_step {
    float loss;              /* readout cross-entropy, mean over the T tokens  */
    float aux;               /* info.aux_balance (HF form: = K at balance)      */
    float max_over_mean;     /* max_e routed_e / (T K / E): 1 balanced, E/K = 4
                                when two experts take every token            */
    float frac[TB_E];        /* routed_e / (T K)                                */
} tb_step;

/* Train one run (mode TB_NONE, TB_AUX or TB_BIAS) for `steps` steps with data
   and initial weights drawn from `seed`; the three modes see the same data
   and start from the same weights. history[steps] may be NULL. 1 on success. */
int train_balance_train(int mode, int steps, unsigned seed, tb_step *history);

/* The test's entry point: seed 1. first_loss is the loss of step 0; last_loss
   and final_max_over_mean are means over the last 10% of the steps (a single
   step's load is noisy). 1 on success.                                     */
int train_balance_run(int mode, int steps, double *first_loss, double *last_loss,
                      double *final_max_over_mean);

/* xorshift64* and Box-Muller: the data and the initial weights. */
static double tb_uniform(uint64_t *s) {
    *s ^= *s >> 12; *s ^= *s << 25; *s ^= *s >> 27;
    return ((double)((*s * 2685821657736338717ull) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
static double tb_normal(uint64_t *s) {
    double u1 = tb_uniform(s), u2 = tb_uniform(s);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* A parameter tensor with its gradient and the two Adam moments. */
typedef struct tb_param { float *w, *g, *m, *v; size_t n; } tb_param;

static int tb_param_init(tb_param *p, size_t n, double scale, uint64_t *rng) {
    size_t i;
    p->n = n;
    p->w = (float *)calloc(4 * n, sizeof(float));
    if (!p->w) return 0;
    p->g = p->w + n; p->m = p->w + 2 * n; p->v = p->w + 3 * n;
    for (i = 0; i < n; i++) p->w[i] = (float)(scale * tb_normal(rng));
    return 1;
}

/* Adam (Kingma & Ba 2015), bias-corrected; t counts steps from 1. */
static void tb_adam(tb_param *p, double lr, int t) {
    const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
    const double c1 = 1.0 - pow(b1, t), c2 = 1.0 - pow(b2, t);
    size_t i;
    for (i = 0; i < p->n; i++) {
        const double g = p->g[i];
        p->m[i] = (float)(b1 * p->m[i] + (1.0 - b1) * g);
        p->v[i] = (float)(b2 * p->v[i] + (1.0 - b2) * g * g);
        p->w[i] -= (float)(lr * (p->m[i] / c1) / (sqrt(p->v[i] / c2) + eps));
    }
}

int train_balance_train(int mode, int steps, unsigned seed, tb_step *history) {
    enum { E = TB_E, K = TB_K, D = TB_D, F = TB_F, T = TB_T, NC = TB_CLUSTERS, C = TB_CLASSES };
    enum { P_ROUTER, P_GATE, P_UP, P_DOWN, P_WO, P_BO, NP };   /* trained tensors */
    float centers[NC][D], rule[NC][D], bias[E], logit[C];
    float *x = NULL, *y = NULL, *h = NULL, *dh = NULL;
    int label[T];
    tb_param p[NP];
    moe_config cfg = moe_preset_mixtral();   /* softmax, top-k, renormalise, HF loss */
    moe_weights w;
    moe_grads g;
    moe_info info;
    void *ws = NULL, *info_buf = NULL;
    size_t ws_bytes, bw_bytes, info_bytes;
    uint64_t rng = 0x9E3779B97F4A7C15ull * ((uint64_t)seed + 1);
    int i, t, c, d, k, e, step, ok = 0;

    memset(p, 0, sizeof p);
    if (mode < 0 || mode >= TB_MODES || steps < 1) return 0;
    cfg.num_experts = E; cfg.top_k = K; cfg.d_model = D; cfg.d_ff = F;
    cfg.training = 1; cfg.save_for_backward = 1;
    cfg.balance_coef = mode == TB_AUX ? TB_BALANCE_COEF : 0.0f;
    if (mode == TB_BIAS) {                   /* V3: sigmoid, bias for selection only, */
        cfg.score = MOE_SCORE_SIGMOID;       /* weights s / sum of the selected s     */
        cfg.selection_bias = 1;
    }

    /* The task. Inputs come from NC Gaussian clusters (unit noise, centers
       N(0, 1) per axis) that all share one offset of norm TB_OFFSET along
       (1, ..., 1). The label is binary and the rule differs per cluster:
       label = [rule_c . (x - center_c) > 0]. The readout sees x + moe(x) and
       is linear, so the layer must learn cluster-specific maps -- work that
       E experts can split.
       Why the unbalanced run collapses, and the tricks that make it reliable:
       1. Every input shares a large offset, so the router gradient of row e,
          sum_t dz[t][e] x_t, points mostly along the offset and moves expert
          e's logit for every token at once. Hidden states of real
          transformers have such a common direction too; here it is large
          on purpose.
       2. The router starts small (std 0.01) and Adam moves every weight by
          about lr per step whatever the size of its gradient, so the first
          steps along the offset outweigh the initial routing: from step 6
          on one expert gets every token (max/mean 4).
       3. Then the imbalance sustains itself (Shazeer et al. 2017's "self-
          reinforcing" imbalance): with renormalised top-k weights,
          w_j = p_j / sum of the selected p, an expert that gets no tokens
          gets no gradient at all, in its FFN or its router row, so it has
          no way back, while the busy experts get all the training. Only the
          aux loss (P_e covers every expert) or the bias (driven by the
          counts) reaches the idle experts.
       Over seeds 1..4, without the offset (-DTB_OFFSET=0) the unbalanced run
       ends at max/mean 1.5..1.9, and with -DTB_ROUTER_INIT=0.1 at 2.0..3.2,
       instead of 3.6..4. The router rows start orthogonal to the offset
       (zero mean) so that step 0 routes by cluster and is fairly balanced
       (max/mean 1.3..1.6): the collapse is what training does.
       The router's Adam step is half that of the rest: Adam moves every
       weight by ~lr per step however small its gradient, which along the
       offset shifts a logit by up to ~0.3 per step at lr 1e-2, and the bias
       (gamma per step, by the sign of the load only) then needs longer to
       catch up. Over seeds 1..12, the bias run's max/mean over steps 180..199
       is 1.25..2.73 with the router at 1e-2 and 1.26..1.58 at 5e-3 (after
       400 steps: 1.24..1.77 and 1.26..1.55). DeepSeek-V3's gamma = 1e-3
       goes with a router that moves slowly.                                 */
    for (c = 0; c < NC; c++)
        for (d = 0; d < D; d++) centers[c][d] = (float)(TB_OFFSET / sqrt((double)D) + tb_normal(&rng));
    for (c = 0; c < NC; c++)
        for (d = 0; d < D; d++) rule[c][d] = (float)tb_normal(&rng);

    /* parameters: Xavier-like experts, small router, zero readout (loss ln 2) */
    if (!tb_param_init(&p[P_ROUTER], (size_t)E * D, TB_ROUTER_INIT, &rng) ||
        !tb_param_init(&p[P_GATE], (size_t)E * F * D, 1.0 / sqrt((double)D), &rng) ||
        !tb_param_init(&p[P_UP], (size_t)E * F * D, 1.0 / sqrt((double)D), &rng) ||
        !tb_param_init(&p[P_DOWN], (size_t)E * D * F, 1.0 / sqrt((double)F), &rng) ||
        !tb_param_init(&p[P_WO], (size_t)C * D, 0.0, &rng) ||
        !tb_param_init(&p[P_BO], (size_t)C, 0.0, &rng))
        goto done;
    for (e = 0; e < E; e++) {            /* router rows orthogonal to the offset */
        float *r = p[P_ROUTER].w + (size_t)e * D, mean = 0.0f;
        for (d = 0; d < D; d++) mean += r[d] / D;
        for (d = 0; d < D; d++) r[d] -= mean;
    }
    memset(bias, 0, sizeof bias);
    memset(&w, 0, sizeof w);
    w.router = p[P_ROUTER].w; w.gate = p[P_GATE].w; w.up = p[P_UP].w; w.down = p[P_DOWN].w;
    w.selection_bias = bias;                          /* read only when cfg.selection_bias */
    memset(&g, 0, sizeof g);
    g.router = p[P_ROUTER].g; g.gate = p[P_GATE].g; g.up = p[P_UP].g; g.down = p[P_DOWN].g;

    /* one workspace for forward and backward; info holds the training cache */
    if (moe_forward_workspace_size(&cfg, T, &ws_bytes) != MOE_STATUS_OK ||
        moe_backward_workspace_size(&cfg, T, &bw_bytes) != MOE_STATUS_OK ||
        moe_info_size(&cfg, T, &info_bytes) != MOE_STATUS_OK)
        goto done;
    if (bw_bytes > ws_bytes) ws_bytes = bw_bytes;
    ws = malloc(ws_bytes);
    info_buf = malloc(info_bytes);
    x = (float *)malloc(4 * (size_t)T * D * sizeof(float));
    memset(&info, 0, sizeof info);
    if (!ws || !info_buf || !x || moe_info_bind(&cfg, T, &info, info_buf, info_bytes) != MOE_STATUS_OK)
        goto done;
    y = x + (size_t)T * D; h = y + (size_t)T * D; dh = h + (size_t)T * D;

    for (step = 0; step < steps; step++) {
        double loss = 0.0;
        int32_t maxload = 0;

        /* 1. a fresh batch: T tokens from random clusters, their labels */
        for (t = 0; t < T; t++) {
            const int cl = (int)(tb_uniform(&rng) * NC);
            float s = 0.0f;
            for (d = 0; d < D; d++) {
                x[t * D + d] = centers[cl][d] + (float)tb_normal(&rng);
                s += rule[cl][d] * (x[t * D + d] - centers[cl][d]);
            }
            label[t] = s > 0.0f;
        }

        /* 2. MoE forward (training: info keeps what the backward needs) */
        if (moe_forward(&cfg, &w, x, T, y, &info, ws, ws_bytes) != MOE_STATUS_OK) goto done;

        /* 3. readout logits = Wo (x + y) + bo, mean cross-entropy, and its
              backward: dlogit = (softmax - onehot) / T, dh = Wo^T dlogit   */
        for (i = 0; i < NP; i++) memset(p[i].g, 0, p[i].n * sizeof(float));
        for (t = 0; t < T; t++) {
            float mx = -INFINITY, sum = 0.0f;
            for (d = 0; d < D; d++) { h[t * D + d] = x[t * D + d] + y[t * D + d]; dh[t * D + d] = 0.0f; }
            for (k = 0; k < C; k++) {
                float z = p[P_BO].w[k];
                for (d = 0; d < D; d++) z += p[P_WO].w[k * D + d] * h[t * D + d];
                logit[k] = z;
                if (z > mx) mx = z;
            }
            for (k = 0; k < C; k++) sum += expf(logit[k] - mx);
            loss += log(sum) - (logit[label[t]] - mx);         /* -log softmax */
            for (k = 0; k < C; k++) {
                const float dz = (expf(logit[k] - mx) / sum - (k == label[t] ? 1.0f : 0.0f)) / T;
                p[P_BO].g[k] += dz;
                for (d = 0; d < D; d++) {
                    p[P_WO].g[k * D + d] += dz * h[t * D + d];
                    dh[t * D + d] += dz * p[P_WO].w[k * D + d];
                }
            }
        }
        loss /= T;

        /* 4. MoE backward: dy = dh (the residual's other branch, x, is data);
              it adds the balance loss's gradient when cfg.balance_coef > 0 */
        if (moe_backward(&cfg, &w, x, T, &info, dh, NULL, &g, ws, ws_bytes) != MOE_STATUS_OK) goto done;

        /* 5. update: Adam on every tensor; the selection bias by its own rule */
        for (i = 0; i < NP; i++) tb_adam(&p[i], i == P_ROUTER ? TB_ROUTER_LR : TB_LR, step + 1);
        if (mode == TB_BIAS && moe_selection_bias_update(E, info.expert_routed, TB_GAMMA, bias) != MOE_STATUS_OK)
            goto done;

        for (e = 0; e < E; e++) if (info.expert_routed[e] > maxload) maxload = info.expert_routed[e];
        if (history) {
            history[step].loss = (float)loss;
            history[step].aux = info.aux_balance;
            history[step].max_over_mean = (float)maxload * E / (T * K);
            for (e = 0; e < E; e++) history[step].frac[e] = (float)info.expert_routed[e] / (T * K);
        }
    }
    ok = 1;
done:
    for (i = 0; i < NP; i++) free(p[i].w);
    free(ws); free(info_buf); free(x);
    return ok;
}

int train_balance_run(int mode, int steps, double *first_loss, double *last_loss,
                      double *final_max_over_mean) {
    tb_step *hist = steps > 0 ? (tb_step *)malloc((size_t)steps * sizeof(tb_step)) : NULL;
    const int n = steps / 10 > 0 ? steps / 10 : 1;
    double loss = 0.0, load = 0.0;
    int i;
    if (!hist || !train_balance_train(mode, steps, 1, hist)) { free(hist); return 0; }
    for (i = steps - n; i < steps; i++) { loss += hist[i].loss; load += hist[i].max_over_mean; }
    if (first_loss) *first_loss = hist[0].loss;
    if (last_loss) *last_loss = loss / n;
    if (final_max_over_mean) *final_max_over_mean = load / n;
    free(hist);
    return 1;
}

#ifndef TRAIN_BALANCE_NO_MAIN
#include <time.h>

static const char *const tb_run_name[TB_MODES] = {"none", "aux", "bias"};
static const char *const tb_run_color[TB_MODES] = {"#d62728", "#1f77b4", "#2ca02c"};

/* Centred moving average over `win` steps. Near step 0 the window narrows
   symmetrically, so the fast early collapse is not smeared; near the last
   step it is cut off on the right, so the end is still averaged.          */
static void tb_smooth(const float *v, int n, int win, float *out) {
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
typedef struct tb_plot { double x0, y0, w, h, xmax, ymin, ymax; } tb_plot;
static double tb_px(const tb_plot *p, double v) { return p->x0 + p->w * v / p->xmax; }
static double tb_py(const tb_plot *p, double v) {
    if (v < p->ymin) v = p->ymin;
    if (v > p->ymax) v = p->ymax;
    return p->y0 + p->h * (1.0 - (v - p->ymin) / (p->ymax - p->ymin));
}

/* Frame, grid, ticks and axis labels of one panel. */
static void tb_svg_axes(FILE *f, const tb_plot *p, double xstep, double ystep,
                        const char *ylabel, const char *title, int xlabel) {
    double v;
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"15\" font-weight=\"bold\">%s</text>\n",
            p->x0, p->y0 - 10, title);
    for (v = p->ymin; v <= p->ymax + 1e-9; v += ystep) {
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e5e5e5\"/>\n",
                p->x0, tb_py(p, v), p->x0 + p->w, tb_py(p, v));
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\" text-anchor=\"end\">%g</text>\n",
                p->x0 - 6, tb_py(p, v) + 4, v);
    }
    for (v = 0; v <= p->xmax + 1e-9; v += xstep) {
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e5e5e5\"/>\n",
                tb_px(p, v), p->y0, tb_px(p, v), p->y0 + p->h);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\" text-anchor=\"middle\">%g</text>\n",
                tb_px(p, v), p->y0 + p->h + 16, v);
    }
    fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#333\"/>\n",
            p->x0, p->y0, p->w, p->h);
    fprintf(f, "<text transform=\"translate(%.1f %.1f) rotate(-90)\" font-size=\"13\" text-anchor=\"middle\">%s</text>\n",
            p->x0 - 42, p->y0 + p->h / 2, ylabel);
    if (xlabel)
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" text-anchor=\"middle\">training step</text>\n",
                p->x0 + p->w / 2, p->y0 + p->h + 36);
}

static void tb_svg_line(FILE *f, const tb_plot *p, const float *v, int n, const char *color,
                        double width, double opacity) {
    int i;
    fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"%.1f\" stroke-opacity=\"%.2f\" "
               "stroke-linejoin=\"round\" points=\"", color, width, opacity);
    for (i = 0; i < n; i++) fprintf(f, "%s%.1f,%.1f", i ? " " : "", tb_px(p, i), tb_py(p, v[i]));
    fprintf(f, "\"/>\n");
}

/* Horizontal dashed reference line with a note at its right end. */
static void tb_svg_ref(FILE *f, const tb_plot *p, double v, const char *note) {
    fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#555\" stroke-dasharray=\"5,4\"/>\n",
            p->x0, tb_py(p, v), p->x0 + p->w, tb_py(p, v));
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" fill=\"#555\" text-anchor=\"end\">%s</text>\n",
            p->x0 + p->w - 4, tb_py(p, v) - 4, note);
}

/* Two panels over the steps (max/mean load, loss), raw per step (faint) and a
   21-step moving average; on the right the final load of each expert per run. */
static int tb_write_svg(const char *path, tb_step *const hist[TB_MODES], int steps) {
    const int W = 1000, H = 700, tail = steps / 10 > 0 ? steps / 10 : 1;
    FILE *f = fopen(path, "w");
    float *raw = (float *)malloc(2 * (size_t)steps * sizeof(float)), *avg = raw + steps;
    double xstep = steps <= 100 ? 20 : steps <= 500 ? 100 : steps <= 1000 ? 200 : 500;
    tb_plot load = {80, 70, 580, 250, 0, 0, 0}, loss = {80, 400, 580, 230, 0, 0, 0};
    char note[64];
    int m, i, e;
    if (!f || !raw) { if (f) fclose(f); free(raw); return 0; }
    load.xmax = loss.xmax = steps - 1 > 1 ? steps - 1 : 1;
    load.ymax = (double)TB_E / TB_K + 0.5;                       /* collapse is E/K */
    loss.ymax = ceil(10.0 * log((double)TB_CLASSES) + 0.5) / 10.0; /* chance: ln C   */
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
               "viewBox=\"0 0 %d %d\" font-family=\"Helvetica, Arial, sans-serif\">\n", W, H, W, H);
    fprintf(f, "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n", W, H);
    fprintf(f, "<text x=\"%d\" y=\"30\" font-size=\"19\" font-weight=\"bold\" text-anchor=\"middle\">"
               "moe.h: load balancing while training (E = %d experts, top-%d, T = %d tokens per step)</text>\n",
            W / 2, TB_E, TB_K, TB_T);

    tb_svg_axes(f, &load, xstep, 0.5, "max / mean expert load", "Expert load imbalance", 0);
    tb_svg_ref(f, &load, 1.0, "perfect balance");
    tb_svg_ref(f, &load, (double)TB_E / TB_K, "collapse: one expert gets every token");
    tb_svg_axes(f, &loss, xstep, 0.1, "cross-entropy", "Task loss", 1);
    snprintf(note, sizeof note, "chance (ln %d)", TB_CLASSES);
    tb_svg_ref(f, &loss, log((double)TB_CLASSES), note);
    for (m = 0; m < TB_MODES; m++) {
        for (i = 0; i < steps; i++) raw[i] = hist[m][i].max_over_mean;
        tb_smooth(raw, steps, 21, avg);
        tb_svg_line(f, &load, raw, steps, tb_run_color[m], 1.0, 0.25);
        tb_svg_line(f, &load, avg, steps, tb_run_color[m], 2.5, 1.0);
        for (i = 0; i < steps; i++) raw[i] = hist[m][i].loss;
        tb_smooth(raw, steps, 21, avg);
        tb_svg_line(f, &loss, raw, steps, tb_run_color[m], 1.0, 0.25);
        tb_svg_line(f, &loss, avg, steps, tb_run_color[m], 2.5, 1.0);
    }
    /* legend, inside the load panel where the curves leave room (y 2 .. 3) */
    for (m = 0; m < TB_MODES; m++) {
        const double lx = load.x0 + load.w - 290, ly = tb_py(&load, 3.0) + 20 * m;
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"3\"/>\n",
                lx, ly, lx + 26, ly, tb_run_color[m]);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\">", lx + 32, ly + 4);
        if (m == TB_NONE) fprintf(f, "no balancing (softmax top-%d)</text>\n", TB_K);
        else if (m == TB_AUX) fprintf(f, "Switch/HF aux loss (coef %g)</text>\n", (double)TB_BALANCE_COEF);
        else fprintf(f, "DeepSeek-V3 bias (sigmoid, &#947; = %g)</text>\n", (double)TB_GAMMA);
    }
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" fill=\"#555\">faint: every step; "
               "bold: 21-step moving average</text>\n", load.x0 + load.w - 290, tb_py(&load, 3.0) + 60);

    /* right column: final tokens per expert (mean share over the last 10%) */
    fprintf(f, "<text x=\"730\" y=\"60\" font-size=\"15\" font-weight=\"bold\">Final share per expert</text>\n");
    fprintf(f, "<text x=\"730\" y=\"78\" font-size=\"11\" fill=\"#555\">mean over the last %d steps; "
               "dashed: 1/E</text>\n", tail);
    for (m = 0; m < TB_MODES; m++) {
        const double bx = 745, by = 110 + 190 * m, bw = 235, bh = 130, ymax = 0.5;
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"13\" fill=\"%s\" font-weight=\"bold\">%s</text>\n",
                bx - 15, by - 8, tb_run_color[m], tb_run_name[m]);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n",
                bx, by + bh, bx + bw, by + bh);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n",
                bx, by, bx, by + bh);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"10\" text-anchor=\"end\">50%%</text>\n", bx - 3, by + 4);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"10\" text-anchor=\"end\">0</text>\n", bx - 3, by + bh + 3);
        for (e = 0; e < TB_E; e++) {
            double share = 0.0, bar;
            for (i = steps - tail; i < steps; i++) share += hist[m][i].frac[e];
            share /= tail;
            bar = bh * (share > ymax ? ymax : share) / ymax;
            fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\"/>\n",
                    bx + 6 + e * (bw - 6) / TB_E, by + bh - bar, (bw - 6) / TB_E - 6, bar, tb_run_color[m]);
            fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"10\" text-anchor=\"middle\">%d</text>\n",
                    bx + 6 + (e + 0.5) * (bw - 6) / TB_E - 3, by + bh + 12, e);
        }
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#555\" stroke-dasharray=\"4,3\"/>\n",
                bx, by + bh * (1.0 - 1.0 / TB_E / ymax), bx + bw, by + bh * (1.0 - 1.0 / TB_E / ymax));
    }
    fprintf(f, "<text x=\"862\" y=\"%d\" font-size=\"12\" text-anchor=\"middle\">expert</text>\n", 110 + 190 * 2 + 160);
    fprintf(f, "</svg>\n");
    free(raw);
    return fclose(f) == 0;
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : ".";
    const int steps = argc > 2 ? atoi(argv[2]) : 400;
    const unsigned seed = argc > 3 ? (unsigned)atoi(argv[3]) : 1u;
    const int tail = steps / 10 > 0 ? steps / 10 : 1;
    char csv_path[1024], svg_path[1024];
    tb_step *hist[TB_MODES] = {NULL, NULL, NULL};
    double secs[TB_MODES];
    FILE *csv;
    int m, i, e, bad, rc = 1;

    if (steps < 2) { fprintf(stderr, "usage: %s [output directory] [steps >= 2] [seed]\n", argv[0]); return 2; }
    snprintf(csv_path, sizeof csv_path, "%s/train_balance.csv", dir);
    snprintf(svg_path, sizeof svg_path, "%s/train_balance.svg", dir);
    if (!(csv = fopen(csv_path, "w"))) { fprintf(stderr, "cannot write %s\n", csv_path); return 1; }
    printf("moe.h %s: training E=%d experts, top-%d, D=%d, F=%d, T=%d tokens/step, %d steps, seed %u\n",
           MOE_VERSION_STRING, TB_E, TB_K, TB_D, TB_F, TB_T, steps, seed);

    for (m = 0; m < TB_MODES; m++) {
        clock_t t0 = clock();
        hist[m] = (tb_step *)malloc((size_t)steps * sizeof(tb_step));
        if (!hist[m] || !train_balance_train(m, steps, seed, hist[m])) {
            fprintf(stderr, "run %s failed\n", tb_run_name[m]);
            goto done;
        }
        secs[m] = (double)(clock() - t0) / CLOCKS_PER_SEC;
    }

    /* summary: the last 10% of the steps, averaged (one step's load is noisy) */
    printf("\nrun    loss step 0  loss last %d  max/mean last %d  share per expert (%%), last %d   time\n",
           tail, tail, tail);
    for (m = 0; m < TB_MODES; m++) {
        double loss = 0.0, load = 0.0;
        printf("%-5s  %10.3f", tb_run_name[m], hist[m][0].loss);
        for (i = steps - tail; i < steps; i++) { loss += hist[m][i].loss; load += hist[m][i].max_over_mean; }
        printf("  %12.3f  %15.2f   ", loss / tail, load / tail);
        for (e = 0; e < TB_E; e++) {
            double share = 0.0;
            for (i = steps - tail; i < steps; i++) share += hist[m][i].frac[e];
            printf(" %3.0f", 100.0 * share / tail);
        }
        printf("   %.2f s\n", secs[m]);
    }
    printf("\nmax/mean = most tokens on one expert / (T K / E): 1 is perfect balance, %d is collapse\n"
           "(one expert gets every token).\n",
           TB_E / TB_K);

    fprintf(csv, "step,run,loss,aux_balance,max_over_mean");
    for (e = 0; e < TB_E; e++) fprintf(csv, ",load_%d", e);
    fprintf(csv, "\n");
    for (m = 0; m < TB_MODES; m++)
        for (i = 0; i < steps; i++) {
            fprintf(csv, "%d,%s,%.6f,%.6f,%.4f", i, tb_run_name[m], hist[m][i].loss, hist[m][i].aux,
                    hist[m][i].max_over_mean);
            for (e = 0; e < TB_E; e++) fprintf(csv, ",%.5f", hist[m][i].frac[e]);
            fprintf(csv, "\n");
        }
    bad = ferror(csv);
    bad |= fclose(csv) != 0;
    csv = NULL;
    if (bad) { fprintf(stderr, "cannot write %s\n", csv_path); goto done; }
    if (!tb_write_svg(svg_path, hist, steps)) { fprintf(stderr, "cannot write %s\n", svg_path); goto done; }
    printf("wrote %s and %s\n", csv_path, svg_path);
    rc = 0;
done:
    if (csv) fclose(csv);
    for (m = 0; m < TB_MODES; m++) free(hist[m]);
    return rc;
}
#endif /* TRAIN_BALANCE_NO_MAIN */
