/* moe.h - v0.4.0 - Mixture-of-Experts kernels in one C99 header
   no warranty implied; use at your own risk. License: end of file (MIT).

   Routing (softmax / sigmoid scores, top-k, group-limited top-k, selection bias,
   noisy top-k, expert choice, dense and Soft MoE), capacity and token dropping,
   counting-sort dispatch, grouped expert FFNs, deterministic combine and the
   load-balancing losses of Switch, GShard, HF/Mixtral, DeepSeek and Shazeer,
   and the backward pass of all of it; routed experts in fp32, bf16 panels or
   ggml's quantized blocks (docs/QUANT.md). docs/ROUTING.md specifies the semantics,
   topic by topic, with worked numbers. Every kernel has a plain scalar reference (the
   specification) and one SIMD twin chosen at compile time (AVX-512, AVX2+FMA
   or NEON), tested against it; work is cut into task lists that OpenMP or
   your own thread pool runs, with bitwise-identical results for any thread
   count. Before 1.0 the API and struct layouts may change between minor
   versions.

   USAGE
     In exactly one C or C++ file:
         #define MOE_IMPLEMENTATION
         #include "moe.h"
     Everywhere else just #include "moe.h". Link with -lm.

   OVERRIDE MACROS (define before the #include that has MOE_IMPLEMENTATION)
     MOE_STATIC              unset    make every function static (file-local copy)
     MOEDEF                  extern   linkage of public functions
     MOE_ASSERT(x)           assert   internal invariants only; never bad input
     MOE_MALLOC(ctx,size)    malloc   only the *_alloc convenience calls allocate;
     MOE_FREE(ctx,ptr)       free     define both or neither (ctx is always NULL)
     MOE_NO_SIMD             unset    build only the scalar reference kernels
     (compiler flags)                 -mavx512f / -mavx2 -mfma / aarch64 select
                                      the SIMD kernels; -fopenmp the threads

   EXAMPLE (a Mixtral-style layer; weights are caller-owned, PyTorch layout)
     #include <stdio.h>                           // fprintf, printf
     #include <stdlib.h>                          // malloc, free
     #include "moe.h"                             // then, in a function of x, T, y, weights:
     moe_config cfg = moe_preset_mixtral();       // softmax, top-2, renormalise
     cfg.d_model = 64; cfg.d_ff = 128;            // shrink the released shape
     moe_weights w = {0};                         // C++: moe_weights w = {};
     w.router = router;                           // [E][D]
     w.gate = gate; w.up = up; w.down = down;     // [E][F][D] [E][F][D] [E][D][F]
     size_t bytes;
     moe_forward_workspace_size(&cfg, T, &bytes);
     void *ws = malloc(bytes);
     moe_info info = {0};                         // scalars: drops, aux losses
     moe_status st = moe_forward(&cfg, &w, x, T, y, &info, ws, bytes);
     if (st != MOE_STATUS_OK) fprintf(stderr, "%s\n", moe_status_string(st));
     printf("balance loss %g, dropped %d\n", info.aux_balance, info.dropped_pairs);
     free(ws);
   Or let the library allocate:  moe_forward_alloc(&cfg, &w, x, T, y, &info);

   CONTENTS
     1. Declarations: version, status codes, enums, moe_config, moe_weights,
        moe_grads, moe_info, then the API in pipeline order:
        config -> quantized weights -> packing -> capacity -> routing
        (moe_route) -> forward -> backward -> expert parallelism (moe_ep_*)
        -> bias update.
     2. Implementation (MOE_IMPLEMENTATION), its banners in order: helpers
        (RNG, activations, top-k, the reference GEMMs), quantized weights
        (ggml's block formats: decode, quantize, the reference GEMM and dot
        on blocks, the decode layout of 16 interleaved rows and its dot),
        ISA selection, threads, config, capacity, workspace
        layout, the kernel table, then the pipeline's stages as plain
        references, each backward below its forward: routing (router
        logits, scores, top-k and groups, capacity, gate weights, aux
        losses) and its backward; experts (dispatch, expert FFNs, combine).
        Then the fast kernels (ISA primitives, micro-kernel, blocked GEMM,
        packed weights and the packed expert FFN, integer dots on quantized
        blocks, the kernel tables), the drivers (moe_route, moe_forward,
        the backward driver), expert parallelism, training helpers.
     TOUR: docs/TOUR.md walks through all of it with worked numbers.
     3. License.

   CONVENTIONS
     Dimensions, one meaning per letter in the code and its comments:
     T tokens, D d_model, F d_ff (Fs the shared expert's), E routed experts,
     K top-k, C per-expert capacity, R router columns (E; Soft MoE: E times
     cfg.slots_per_expert), S routing slots per token (K for top-k, E for
     expert choice / dense), N rows of the grouped expert FFN (kept pairs),
     L tokens per sequence (cfg.seq_len), P ranks (expert parallelism). The
     GEMM layer sizes its products m x cols x depth; A, B, C there are
     matrices (BLAS's operand names), not sizes.
     Weights use PyTorch nn.Linear layout [out][in], row-major, so HF
     checkpoint tensors are used as they are.
     One forward call = one routing group: capacity, Expert Choice, Soft MoE
     and the batch losses see exactly the T tokens of that call.
     Source: 4-space indents, lines at most 100 columns.

   TRAINING
     Run moe_forward with cfg.save_for_backward = 1 and an info bound by
     moe_info_bind, then moe_backward with the same info; cfg.training = 1
     (train mode, as PyTorch's module.training) also turns on the noise,
     jitter and dropout the config asks for. Gradient convention (llm.c):
     parameter gradients ACCUMULATE (+=, zero them per step), the activation
     gradient dx is OVERWRITTEN. The backward differentiates <dy, y> plus
     every aux loss times its coefficient (balance_coef, z_loss_coef, ...).
     What the forward keeps for it (moe_info_size says the bytes): the
     routing arrays (logits and scores, 2*T*R floats; expert, weight and
     dropped, 9*T*S bytes; Soft MoE adds dispatch), and the expert cache of
     N*(2F + D) floats (N*(F + D) for non-GLU FFNs; N = T*K for top-k), plus
     T*(2Fs + D) for a shared expert. cfg.recompute = 1 drops the expert
     cache; moe_backward then reruns the expert FFNs (one more forward's
     worth of expert FLOPs).
     Switch / ST-MoE recipe knobs: the router always runs in fp32 (logits,
     scores, weights and losses are float; the library has no bf16 router),
     cfg.z_loss_coef is the router z-loss, cfg.jitter the input jitter and
     cfg.router_grad_clip clips each token's router-logit gradient.

   EXPERT PARALLELISM (moe_ep_*; no MPI or NCCL inside)
     P ranks, each with a contiguous slice of the T tokens and E/P experts.
     moe_ep_route gives a rank its per-owner pair counts and a small vector
     of statistics to sum over ranks; moe_ep_pack fills the send buffers
     (pairs grouped by owner rank, then by token and slot); the owner's
     moe_ep_expert_forward applies capacity over ALL pairs of its experts
     (same C, same drop policy as one process over the T tokens) and runs
     them; moe_ep_combine sums the returned rows per token in slot order.
     The backward mirrors it (moe_ep_pack_backward, moe_ep_expert_backward,
     moe_ep_combine_backward). Top-k routing only; with the reference ISA
     the result is bitwise moe_forward / moe_backward on all T tokens (see
     the section's comment for the one ordering rule). examples/moe_mpi.c
     is an MPI transport.

   NaN / Inf POLICY
     The router logits are checked after the router GEMM (and the selection
     bias when it is used). Any NaN or +-Inf there (which is what NaN/Inf in x
     or in the router weights produce) makes moe_forward / moe_route return
     MOE_STATUS_NONFINITE without writing y or info. Huge finite logits are
     fine (softmax subtracts the row max; sigmoid is evaluated stably). Expert
     weights are not scanned: a NaN there propagates to y as IEEE arithmetic
     says. A renormalisation whose denominator is 0 (all selected scores
     underflowed) gives weights 0, not NaN.

   ALIASING AND THE TRAINING CACHE
     moe_forward may run in place (y == x), moe_backward with dx == dy or
     dx == x. Any other overlap of a written buffer (outputs, info arrays,
     gradients, workspace, packed blob) with another buffer of the call is
     MOE_STATUS_ALIASING, nothing written; the moe_ep_* calls have no in-place
     form. A forward with cfg.save_for_backward = 1 stamps its info (T, config
     fingerprint, routing checksum); moe_backward refuses an info without that
     stamp or with another T, config or changed routing (MISSING_CACHE /
     BAD_CACHE).

   DETERMINISM
     Same inputs, config and seed give bitwise-identical outputs. Top-k breaks
     ties towards the lower index; combine sums each token's experts in slot
     order; random numbers come from a counter-based generator keyed by
     (cfg.seed, purpose, token, column), so they do not depend on call order.

   REVISION HISTORY (all of it in CHANGELOG.md)
     0.4.0  (2026-12-05)  no status OK with a wrong answer: MOE_STATUS_ALIASING,
                          the training-cache stamp, w.packed_bytes, no packing
                          for the reference ISA, T = 0 without a workspace;
                          expert parallelism; AVX-512 BF16 and tuned kernels.
     0.3.1  (2026-11-23)  fuzzer-found fixes: finite router gradients for
                          denormal sigmoid scores and for Shazeer sigma = 0,
                          seq_len near INT32_MAX, aux_total with an overflowed
                          but unused loss, backward recompute checks w.packed.
     0.3.0  (2026-11-23)  SIMD micro-kernel (AVX-512/AVX2/NEON), packed fp32 /
                          bf16 expert panels with fused GLU epilogue, threads
                          via OpenMP or cfg.parallel_for; training aids:
                          moe_init_weights, warm-up noise, expert dropout,
                          gradient zero/clip helpers, GLaM preset.
     0.2.0  (2026-11-23)  moe_backward: gradients of x, router, experts, shared
                          expert, Soft MoE slots, through every aux loss;
                          training cache or recompute; MOE_STATUS_BAD_CACHE.
     0.1.0  (2026-11-23)  reference forward: every routing family of
                          docs/ROUTING.md, capacity and drops, aux losses.
*/
#ifndef MOE_H_INCLUDED
#define MOE_H_INCLUDED

#include <stddef.h>
#include <stdint.h>

#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 4
#define MOE_VERSION_PATCH 0
#define MOE_VERSION_STRING "0.4.0"

#ifndef MOEDEF
#  if defined(MOE_STATIC) && (defined(__GNUC__) || defined(__clang__))
#    define MOEDEF __attribute__((unused)) static /* no -Wunused-function */
#  elif defined(MOE_STATIC)
#    define MOEDEF static
#  else
#    define MOEDEF extern
#  endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------
   Status codes. Written once; the enum and moe_status_string() are generated
   from this list. Values are explicit and append-only.                      */
#define MOE__STATUS_LIST(X) \
    X(OK,                  0, "ok") \
    X(NULL_ARGUMENT,       1, "a required pointer argument is NULL") \
    X(BAD_DIMENSION,       2, "a size is out of range: need T >= 0, d_model, d_ff, " \
                              "num_experts >= 1, shared_d_ff >= 0, slots_per_expert >= 0") \
    X(BAD_TOP_K,           3, "top_k must satisfy 1 <= top_k <= num_experts (top-k routing)") \
    X(BAD_GROUPS,          4, "n_group must divide num_experts, 1 <= topk_group <= n_group, " \
                              "group_score_top <= experts per group, and topk_group groups " \
                              "must hold >= top_k experts") \
    X(BAD_CAPACITY,        5, "capacity must be >= 0 and capacity_factor >= 0 and finite; " \
                              "expert choice needs one of them; dense and Soft MoE take neither") \
    X(BAD_ENUM,            6, "a config field holds an unknown enum value") \
    X(BAD_OPTION,          7, "a config option is out of its range or conflicts with another " \
                              "(e.g. random/sampled second expert needs top_k == 2; p-norm " \
                              "needs norm_p >= 1; training and save_for_backward are 0 or 1; " \
                              "aux-loss coefficients, router_noise_std and " \
                              "noise_epsilon in [0, 1e6]; |routed_scale| <= 1e6)") \
    X(MISSING_WEIGHT,      8, "a weight tensor that the config needs is NULL") \
    X(WORKSPACE_TOO_SMALL, 9, "workspace smaller than the size query returned; " \
                              "info->workspace_required holds the size needed") \
    X(NONFINITE,          10, "a router logit or selection bias is NaN or Inf; " \
                              "nothing was written") \
    X(UNSUPPORTED,        11, "requested ISA is not the one compiled in (moe_compiled_isa), " \
                              "or packing weights for the reference ISA " \
                              "(only SIMD kernels read w.packed)") \
    X(OUT_OF_MEMORY,      12, "MOE_MALLOC returned NULL") \
    X(SIZE_OVERFLOW,      13, "a buffer size does not fit in size_t") \
    X(MISSING_CACHE,      14, "moe_backward needs moe_info arrays the forward did not fill: " \
                              "bind them with moe_info_bind and run the forward " \
                              "with save_for_backward = 1") \
    X(BAD_CACHE,          15, "moe_info is not the cache of a save_for_backward forward of " \
                              "this config and T, or its routing arrays changed since " \
                              "(or hold routing no forward produces)") \
    X(BAD_PACKED,         16, "w.packed was not made by moe_pack_weights for this config and " \
                              "this build's vector width, " \
                              "or w.packed_bytes is smaller than the blob") \
    X(EP_UNSUPPORTED,     17, "the expert-parallel plan (moe_ep_*) supports top-k routing only, " \
                              "without Shazeer noise or a shared expert") \
    X(BAD_PLAN,           18, "expert-parallel plan mismatch: need 0 <= rank < num_ranks " \
                              "dividing num_experts, the rank's token slice inside num_tokens " \
                              "(sequence-loss sequences inside one slice), and pairs/counts as " \
                              "moe_ep_route and moe_ep_pack produced them") \
    X(ALIASING,           19, "an output buffer overlaps an input, another output, the workspace " \
                              "or the moe_info arrays (only y == x in moe_forward and " \
                              "dx == dy or dx == x in moe_backward may share memory)") \
    X(CUDA_UNSUPPORTED,   20, "moe_cuda.cuh does not run this config on the GPU: top-k routing " \
                              "only (no expert choice, dense or Soft MoE), greedy second expert, " \
                              "no noise, jitter or expert dropout in training, position drop " \
                              "policy, num_experts <= 256, top_k <= 32") \
    X(CUDA_ERROR,         21, "a CUDA runtime call or kernel launch failed; " \
                              "moe_cuda_last_error() returns its cudaError_t") \
    X(BAD_QUANT,          22, "a quantized weight is malformed: a type outside moe_qtype, a row " \
                              "length that is not a multiple of its block size (32; 256 for " \
                              "Q4_K), or a buffer smaller than rows x moe_qtype_row_bytes") \
    X(QUANT_UNSUPPORTED,  23, "quantized expert weights run moe_forward and moe_pack_weights " \
                              "only: moe_backward, the moe_ep_* expert calls and " \
                              "moe_cuda.cuh take fp32 experts")

typedef enum moe_status {
#define MOE__X(name, value, text) MOE_STATUS_##name = value,
    MOE__STATUS_LIST(MOE__X)
#undef MOE__X
    MOE_STATUS_COUNT
} moe_status;

/* ---------------------------------------------------------------------------
   Enums. 0 is always the default.                                          */
typedef enum moe_score_func {    /* router score from logits z               */
    MOE_SCORE_SOFTMAX = 0,       /* p = softmax(z) over the E experts        */
    MOE_SCORE_SIGMOID = 1        /* s = sigmoid(z), DeepSeek-V3              */
} moe_score_func;

typedef enum moe_routing {
    MOE_ROUTING_TOPK = 0,          /* token choice: each token picks K experts  */
    MOE_ROUTING_EXPERT_CHOICE = 1, /* each expert picks its top-C tokens        */
    MOE_ROUTING_DENSE = 2,         /* every token uses every expert             */
    MOE_ROUTING_SOFT = 3           /* Soft MoE: experts see mixtures of tokens  */
} moe_routing;

typedef enum moe_norm {         /* top-k weight normalisation               */
    MOE_NORM_SUM = 0,           /* w = g / sum(g)  (Mixtral, norm_topk_prob) */
    MOE_NORM_NONE = 1,          /* w = g           (Switch, Qwen2, V2)       */
    MOE_NORM_PNORM = 2          /* w = g / ||g||_p (DBRX, p = cfg.norm_p)    */
} moe_norm;

typedef enum moe_noise {
    MOE_NOISE_NONE = 0,
    MOE_NOISE_SHAZEER = 1       /* H = z + N(0,1)*softplus(x.W_noise) + eps, training only */
} moe_noise;

typedef enum moe_second_expert { /* how top-2 picks / keeps its second expert */
    MOE_SECOND_GREEDY = 0,       /* second-best score (lingvo default)        */
    MOE_SECOND_RANDOM = 1,       /* keep it iff U(0,1) < w2 / second_threshold */
    MOE_SECOND_SAMPLED = 2       /* argmax of z + Gumbel noise (fairseq)      */
} moe_second_expert;

typedef enum moe_drop_policy {  /* which pairs an over-full expert keeps     */
    MOE_DROP_POSITION = 0,      /* slot 0 of every token first, then slot 1,
                                   ..., token order within a slot (GShard)   */
    MOE_DROP_BPR = 1,           /* as POSITION, tokens ordered by descending
                                   top-1 score (batch prioritised routing)   */
    MOE_DROP_WEIGHT = 2         /* each expert keeps its C highest weights
                                   (Megatron "probs")                        */
} moe_drop_policy;

typedef enum moe_capacity_formula {  /* C for a group of S tokens: docs/ROUTING.md, "Capacity" */
    MOE_CAPACITY_MEGATRON = 0,    /* ceil(cf*S*K/E)  (also GShard's 2S/E at cf=1, K=2) */
    MOE_CAPACITY_FAIRSEQ_TOP1 = 1,/* floor(cf*ceil(S/E))                         */
    MOE_CAPACITY_FAIRSEQ_TOP2 = 2,/* 2*ceil(S/E)  (cf ignored)                   */
    MOE_CAPACITY_DEEPSPEED = 3,   /* max(ceil(cf*S*K/E), 4)  (MoE layer min_capacity) */
    MOE_CAPACITY_LINGVO = 4,      /* floor(cf*S/E), 0 -> 4, up to a multiple of 4 */
    MOE_CAPACITY_MESH = 5,        /* max(min(S, floor(cf*S/E)), 4)               */
    MOE_CAPACITY_FLAXFORMER = 6,  /* max(round_half_even(cf*S/E), 4)             */
    MOE_CAPACITY_VMOE = 7         /* ceil(cf*S*K/E) up to a multiple of 4        */
} moe_capacity_formula;

typedef enum moe_balance_loss {  /* docs/ROUTING.md, "Balance losses"      */
    MOE_BALANCE_TOPK = 0,        /* E*sum_e (c_e/T)*P_e; = K at balance (HF, Switch at K=1) */
    MOE_BALANCE_TOPK_NORMALIZED = 1, /* E*sum_e (c_e/(K*T))*P_e; = 1 (Megatron, DeepSeek) */
    MOE_BALANCE_FIRST_CHOICE = 2 /* E*sum_e (c1_e/T)*P_e, slot 0 only (GShard)   */
} moe_balance_loss;

typedef enum moe_activation {
    MOE_ACT_SWIGLU = 0,          /* down . (silu(gate.x) * up.x)                 */
    MOE_ACT_GEGLU = 1,           /* down . (gelu_erf(gate.x) * up.x)             */
    MOE_ACT_GEGLU_TANH = 2,      /* down . (gelu_tanh(gate.x) * up.x)  (T5 v1.1) */
    MOE_ACT_RELU = 3,            /* down . relu(gate.x)                          */
    MOE_ACT_GELU = 4,            /* down . gelu_erf(gate.x)                      */
    MOE_ACT_GELU_TANH = 5,       /* down . gelu_tanh(gate.x)                     */
    MOE_ACT_SILU = 6             /* down . silu(gate.x)                          */
} moe_activation;

typedef enum moe_isa {
    MOE_ISA_AUTO = 0,            /* the SIMD ISA compiled in, else REFERENCE    */
    MOE_ISA_REFERENCE = 1,       /* scalar reference kernels                    */
    MOE_ISA_AVX2 = 2,
    MOE_ISA_AVX512 = 3,
    MOE_ISA_NEON = 4
} moe_isa;

/* Threading hook: run task(arg, i) for every i in [0, num_tasks), in any
   order and on any threads, and return when all are done. Tasks are
   independent and write disjoint outputs.                                  */
typedef void (*moe_task_fn)(void *arg, int32_t task);
typedef void (*moe_parallel_for_fn)(void *user, int32_t num_tasks, moe_task_fn task, void *arg);

/* ---------------------------------------------------------------------------
   moe_config: zero-initialise, set the required fields, and every other field
   takes the default written in its comment (moe_config_resolve applies them).
   In C++ write `moe_config cfg = {};`. The presets below fill in the routing
   fields of published models.                                               */
typedef struct moe_config {
    /* --- shape ------------------------------------------------------------ */
    int32_t num_experts;      /* E, required                                   */
    int32_t top_k;            /* K, required for top-k routing, 1 <= K <= E;
                                 ignored by expert choice, dense and Soft MoE  */
    int32_t d_model;          /* D, required                                   */
    int32_t d_ff;             /* F, required: routed expert hidden width       */
    moe_activation activation;/* 0 -> MOE_ACT_SWIGLU (also used by shared)     */
    int32_t expert_bias;      /* 0 -> no biases; 1: w.gate_bias, up_bias
                                 (GLU only), down_bias are required            */

    /* --- router scores and selection --------------------------------------- */
    moe_routing routing;      /* 0 -> MOE_ROUTING_TOPK                         */
    moe_score_func score;     /* 0 -> MOE_SCORE_SOFTMAX                        */
    int32_t router_bias;      /* 0 -> none; 1: w.router_bias [E] added to z    */
    int32_t selection_bias;   /* 0 -> none; 1: w.selection_bias [E] is added to
                                 the scores for selection only (DeepSeek-V3)   */
    int32_t n_group;          /* 0 -> 1 (no group limit); experts split into
                                 n_group contiguous groups of E/n_group        */
    int32_t topk_group;       /* 0 -> n_group: groups kept per token           */
    int32_t group_score_top;  /* 0 -> 1: group score = sum of the top-n keys in
                                 the group; 1 = max (DeepSeek-V2), 2 = V3      */
    int32_t group_mask_zero;  /* 0 -> experts of dropped groups get key -inf;
                                 1: key 0.0 (HF 4.x / V2 remote code compat)   */
    moe_second_expert second_expert; /* 0 -> GREEDY; others need K == 2      */
    float second_threshold;   /* 0 -> 0.5: RANDOM keeps expert 2 iff U < w2/theta
                                 (GShard paper: 2*w2 > U; mesh uses 0.2)       */

    /* --- gate weights ------------------------------------------------------ */
    moe_norm normalize;       /* 0 -> MOE_NORM_SUM over the selected experts   */
    float norm_p;             /* 0 -> 1.0: p of MOE_NORM_PNORM, finite, >= 1
                                 (below 1 a zero score has an infinite gradient) */
    float norm_eps;           /* 0 -> 0.0 (none): added to the normaliser
                                 (DeepSeek/Megatron 1e-20, lingvo 1e-9)        */
    int32_t normalize_after_drop; /* 0 -> normalise before capacity dropping
                                 (GShard paper); 1: over the kept pairs only
                                 (fairseq, DeepSpeed), a survivor gets 1.0     */
    float routed_scale;       /* 0 -> 1.0: routed_scaling_factor (V2 16, V3 2.5);
                                 |routed_scale| <= 1e6                         */

    /* --- train-mode randomness (off unless training = 1) ------------------- */
    int32_t training;         /* 0 -> eval mode; 1: train mode, as PyTorch's
                                 module.training: the noise, jitter and expert
                                 dropout set below apply (a random or sampled
                                 second expert samples in both modes). Keeping
                                 what moe_backward needs: save_for_backward    */
    uint64_t seed;            /* 0 -> 0: key of the counter-based RNG; change it
                                 every step (and micro-batch) you want fresh noise */
    moe_noise noise;          /* 0 -> none. SHAZEER needs w.router_noise       */
    float noise_epsilon;      /* 0 -> 0.0: added to softplus (paper 0, t2t 0.01);
                                 in [0, 1e6]                                   */
    float jitter;             /* 0 -> off: router input x *= U[1-eps, 1+eps]
                                 (Switch 0.01); only the router sees it        */
    float router_noise_std;   /* 0 -> off: warm-up noise, top-k routing scores
                                 z + N(0, std^2); schedule it per step (e.g.
                                 only for the first steps) to avoid early collapse;
                                 in [0, 1e6]                                   */
    float expert_dropout;     /* 0 -> off: dropout rate on the routed experts'
                                 hidden activations (inverted: kept units x
                                 1/(1-p)); Switch fine-tunes with ~0.4 there   */

    /* --- capacity (top-k and expert choice) --------------------------------- */
    int32_t capacity;         /* 0 -> none (dropless unless capacity_factor set);
                                 > 0: C tokens per expert, explicit            */
    float capacity_factor;    /* 0 -> none; > 0: C from capacity_formula       */
    moe_capacity_formula capacity_formula; /* 0 -> MEGATRON ceil(cf*T*K/E);
                                 expert choice always uses K = 1 here          */
    moe_drop_policy drop_policy; /* 0 -> MOE_DROP_POSITION                    */

    /* --- shared experts and Soft MoE -------------------------------------- */
    int32_t shared_d_ff;      /* 0 -> no shared expert; Fs: hidden width of the
                                 always-on shared FFN (N shared experts of width
                                 F are one FFN of width N*F, as DeepSeek fuses) */
    int32_t shared_expert_gated; /* 0 -> ungated; 1: y += sigmoid(x .
                                 w.shared_expert_gate) * shared(x) (Qwen2-MoE) */
    int32_t slots_per_expert; /* 0 -> 1: P, Soft MoE slots per expert          */

    /* --- auxiliary losses (values in moe_info; coefficients weight aux_total,
           each in [0, 1e6]: larger ones overflowed aux_total and the gradients) */
    moe_balance_loss balance_loss; /* 0 -> MOE_BALANCE_TOPK (HF)                */
    float balance_coef;       /* 0 -> 0.0: weight of aux_balance in aux_total  */
    float z_loss_coef;        /* 0 -> 0.0: weight of aux_z (ST-MoE 1e-3)       */
    float importance_coef;    /* 0 -> 0.0: weight of aux_importance (Shazeer)  */
    float load_coef;          /* 0 -> 0.0: weight of aux_load (Shazeer)        */
    float seq_balance_coef;   /* 0 -> 0.0: weight of aux_seq (DeepSeek-V3 1e-4) */
    int32_t seq_len;          /* 0 -> T: sequence length of the sequence-wise
                                 loss (tokens are batch-major, t = b*L + s)    */

    /* --- backward ------------------------------------------------------------ */
    int32_t save_for_backward; /* 0 -> the forward keeps nothing for moe_backward
                                 (its info holds no stamp: MISSING_CACHE); 1: it
                                 keeps what moe_backward reads in the bound info
                                 (routing arrays; the expert cache unless
                                 recompute) and stamps it. Independent of
                                 training: with training = 0 the gradients are
                                 those of the noise-free eval-mode forward     */
    int32_t recompute;        /* 0 -> a save_for_backward forward stores the
                                 expert hidden activations in moe_info for the
                                 backward pass; 1: store nothing, moe_backward
                                 recomputes them (less memory, one more expert
                                 forward)                                      */
    float router_grad_clip;   /* 0 -> off; > 0: each token's router-logit
                                 gradient dz_t is scaled to L2 norm <= clip     */

    /* --- kernels and threads --------------------------------------------- */
    moe_isa isa;              /* 0 -> MOE_ISA_AUTO: the SIMD ISA this file was
                                 compiled for (-mavx512f, -mavx2 -mfma, NEON),
                                 else the reference; REFERENCE forces scalar   */
    int32_t pack_bf16;        /* 0 -> moe_pack_weights stores fp32 panels; 1:
                                 bf16 (round to nearest even), half the bytes a
                                 decode step reads; products and sums in fp32.
                                 2: bf16 panels, and the packed expert GEMMs
                                 also round their inputs (x, the hidden
                                 activation) to bf16: bf16 x bf16 products
                                 summed in fp32, VDPBF16PS when compiled with
                                 -mavx512bf16 (same blob as 1; fp32 activations
                                 everywhere else)                             */
    moe_parallel_for_fn parallel_for; /* 0 -> OpenMP when compiled with
                                 -fopenmp, else serial. Results are bitwise the
                                 same for any thread count                    */
    void *parallel_user;      /* 0 -> NULL: first argument of parallel_for     */
    int32_t num_threads;      /* 0 -> OpenMP's default; 1 = serial (OpenMP only) */
} moe_config;

/* ---------------------------------------------------------------------------
   Weight types of the routed experts (moe_weights.gate_type, ...): fp32, or
   one of ggml's block formats, bit for bit as llama.cpp's GGUF files store
   them, so a file's tensors are used as they are (docs/QUANT.md). A row of
   n values is n / block-size blocks; the values are ids of ggml's type enum.
     type   values/block  bytes/block  value
     Q8_0   32            34           d * q,  d fp16, q int8
     Q4_0   32            18           d * (q - 8),  q 4-bit
     Q4_K   256           144          d * s_j * q - dmin * m_j,  8 sub-blocks
                                       of 32 with 6-bit s_j, m_j; d, dmin fp16
     MXFP4  32            17           2^(e - 127) * e2m1(q),  e 8-bit, q 4-bit */
typedef enum moe_qtype {
    MOE_QTYPE_F32 = 0,            /* float tensors (w.gate, ...); the default */
    MOE_QTYPE_Q4_0 = 2,
    MOE_QTYPE_Q8_0 = 8,
    MOE_QTYPE_Q4_K = 12,
    MOE_QTYPE_MXFP4 = 39
} moe_qtype;

/* ---------------------------------------------------------------------------
   moe_weights: caller-owned float tensors in PyTorch nn.Linear layout. Only
   the ones the config uses are read; the others may be NULL. Each expert is
   an FFN of its first matrix W1 = gate and second W2 = down, with W3 = up
   for the GLU activations (cfg.activation, biases with cfg.expert_bias):
     GLU (SwiGLU, GeGLU):     down . (act(gate . x + b1) * (up . x + b3)) + b2
     non-GLU (ReLU, GELU...): down . act(gate . x + b1) + b2
   so gate holds a GLU's gate projection (gate_proj, Mixtral w1) or a
   two-matrix FFN's fc1 (T5 wi); up is unused there (leave it NULL); down is
   W2 (down_proj, fc2, T5 wo) either way. The shared expert's shared_gate,
   shared_up and shared_down play the same three roles.                      */
typedef struct moe_weights {
    const float *router;          /* [E][D]   z = x . router^T                */
    const float *router_bias;     /* [E]      cfg.router_bias                 */
    const float *selection_bias;  /* [E]      cfg.selection_bias (V3 e_score_correction_bias) */
    const float *router_noise;    /* [E][D]   W_noise of MOE_NOISE_SHAZEER    */
    const float *gate;            /* [E][F][D] W1: gate_proj (GLU), or fc1 of a
                                     two-matrix FFN; [E][2F][D] when fused    */
    const float *up;              /* [E][F][D] W3: up_proj (GLU only, else
                                     unused; NULL when gate_up_fused)         */
    const float *down;            /* [E][D][F] W2: down_proj / fc2            */
    const float *gate_bias;       /* [E][F]   cfg.expert_bias                 */
    const float *up_bias;         /* [E][F]                                   */
    const float *down_bias;       /* [E][D]                                   */
    int32_t gate_up_fused;        /* 1: gate points at HF 5.x gate_up_proj
                                     [E][2F][D], gate rows then up rows       */
    /* Quantized routed experts (forward only): a tensor whose type is not
       MOE_QTYPE_F32 is read from its _q pointer, the same rows as the float
       tensor in moe_qtype's blocks ([E][F] rows of D values for gate and up,
       [E][2F] fused, [E][D] rows of F for down); its float pointer is then
       unused. The shared expert's three tensors take types the same way
       (shared_*_type below); biases and the router stay float. moe_forward
       and moe_pack_weights read them; the backward, moe_ep_* and moe_cuda.cuh
       refuse them (MOE_STATUS_QUANT_UNSUPPORTED).                            */
    int32_t gate_type, up_type, down_type;   /* moe_qtype, 0 = F32           */
    const void *gate_q, *up_q, *down_q;
    /* shared expert (cfg.shared_d_ff = Fs > 0), same activation as routed   */
    const float *shared_gate;     /* [Fs][D]  W1 (gate_proj, or fc1)          */
    const float *shared_up;       /* [Fs][D]  W3 (GLU only)                   */
    const float *shared_down;     /* [D][Fs]  W2 (down_proj, or fc2)          */
    const float *shared_gate_bias;/* [Fs]     cfg.expert_bias                 */
    const float *shared_up_bias;  /* [Fs]                                     */
    const float *shared_down_bias;/* [D]                                      */
    const float *shared_expert_gate; /* [D]   cfg.shared_expert_gated (Qwen2
                                     shared_expert_gate [1][D])               */
    /* quantized shared expert: [Fs] rows of D (gate, up), [D] rows of Fs   */
    int32_t shared_gate_type, shared_up_type, shared_down_type;
    const void *shared_gate_q, *shared_up_q, *shared_down_q;
    /* Soft MoE */
    const float *soft_phi;        /* [R][D] slot parameters, R = E * p with
                                     p = slots_per_expert (row s = slot s % p
                                     of expert s / p)                         */
    const float *soft_scale;      /* [1]      learnable logit scale; NULL -> 1 */
    /* moe_pack_weights output: the routed and shared expert matrices in the
       SIMD kernels' panel order. When set (and the ISA is not REFERENCE) the
       forward reads experts from here only: gate/up/down may then be NULL.
       The backward always needs gate/up/down.                               */
    const void *packed;
    size_t packed_bytes;          /* bytes readable at packed (>= what
                                     moe_pack_size said); required with it    */
    /* moe_qpack_weights output: the quantized expert matrices in the decode
       layout, beside their blocks (which stay needed). NULL: not used.      */
    const void *qpacked;
    size_t qpacked_bytes;
} moe_weights;

/* ---------------------------------------------------------------------------
   moe_grads: gradients of the loss with respect to the weights, same names
   and layouts as moe_weights (gate is [E][2F][D] when w.gate_up_fused).
   They ACCUMULATE (+=): zero them before the first backward of a step. Any
   pointer may be NULL: that gradient is not computed. The selection bias has
   no gradient (its update is moe_selection_bias_update).                    */
typedef struct moe_grads {
    float *router, *router_bias, *router_noise;
    float *gate, *up, *down, *gate_bias, *up_bias, *down_bias;
    float *shared_gate, *shared_up, *shared_down;
    float *shared_gate_bias, *shared_up_bias, *shared_down_bias, *shared_expert_gate;
    float *soft_phi, *soft_scale;
    int32_t gate_up_fused;    /* 1: gate is [E][2F][D] (gate rows, then up rows)
                                 and up is unused. moe_init_weights,
                                 moe_grads_zero and moe_grads_clip_norm read the
                                 layout from here; moe_backward takes it from
                                 w.gate_up_fused                              */
} moe_grads;

/* ---------------------------------------------------------------------------
   moe_info: what a forward call reports. The scalars are always written on
   success. Each array pointer is optional (NULL = not wanted) and caller-owned;
   moe_info_bind() points all of them into one buffer. R = E (Soft MoE: E*p),
   S = moe_routing_slots(cfg).                                              */
typedef struct moe_info {
    float   *logits;          /* [T][R] router logits z (clean, before noise)  */
    float   *scores;          /* [T][R] softmax p / sigmoid s (of the noisy H
                                 with Shazeer noise); Soft MoE: combine weights */
    float   *dispatch;        /* [T][R] Soft MoE dispatch weights (softmax over
                                 tokens); unused otherwise                     */
    int32_t *expert;          /* [T][S] expert of each slot, slot 0 best; -1 =
                                 none (expert choice: not picked)              */
    float   *weight;          /* [T][S] combine weight; 0 when dropped         */
    uint8_t *dropped;         /* [T][S] 1: dropped by capacity; 2: second expert
                                 rejected by random routing (GShard); else 0   */
    int32_t *expert_routed;   /* [E] pairs routed to e before capacity (random-
                                 routing rejections excluded)                  */
    int32_t *expert_kept;     /* [E] pairs e actually processed                */
    /* Training cache (written by a forward with cfg.save_for_backward = 1 and
       cfg.recompute = 0, read by moe_backward). Rows are the processed pairs in
       expert-contiguous order, token order within an expert; N = rows bound
       (T*K top-k, E*C expert choice, T*E dense, E*p Soft MoE).               */
    float   *cache_hidden;    /* [N][F] gate pre-activation gate.x + b          */
    float   *cache_up;        /* [N][F] up projection (GLU activations only)    */
    float   *cache_out;       /* [N][D] expert outputs, before the gate weight  */
    float   *cache_shared_hidden; /* [T][Fs] shared expert, same meaning        */
    float   *cache_shared_up; /* [T][Fs]                                       */
    float   *cache_shared_out;/* [T][D]                                        */

    int32_t slots;            /* S                                             */
    int32_t capacity;         /* C used, 0 = dropless                          */
    int32_t dropped_pairs;    /* routed (token, slot) pairs dropped by capacity */
    int32_t dropped_tokens;   /* tokens with no expert at all (output 0)       */
    float aux_balance;        /* load-balancing loss of cfg.balance_loss, unscaled */
    float aux_z;              /* router z-loss mean_t LSE(z_t)^2, unscaled     */
    float aux_importance;     /* Shazeer CV^2(importance), unscaled            */
    float aux_load;           /* Shazeer CV^2(load), unscaled                  */
    float aux_seq;            /* DeepSeek-V3 sequence-wise balance, unscaled   */
    float aux_total;          /* sum of coef * value over the five above       */
    size_t workspace_required;/* set with MOE_STATUS_WORKSPACE_TOO_SMALL       */
    /* What the arrays hold, for moe_backward: every call that fills them
       (and moe_info_bind) rewrites this stamp. A forward with
       cfg.save_for_backward = 1 records its T, a fingerprint of its config and
       a checksum of the routing arrays it wrote; any other call clears it.
       moe_backward runs only on the stamp of such a forward of its own config
       and T, with the arrays unchanged.                                      */
    int32_t cache_tokens;     /* T of that forward                             */
    uint64_t cache_config;    /* fingerprint of its config; 0: no cache        */
    uint64_t cache_check;     /* checksum of its routing arrays                */
} moe_info;

/* ---------------------------------------------------------------------------
   API, in pipeline order. Every function validates its arguments and returns
   a status; on failure it writes nothing (except info->workspace_required). */

MOEDEF const char *moe_status_string(moe_status status);

/* The ISA that MOE_ISA_AUTO runs in this build: the SIMD kernels compiled in
   (chosen by the compiler flags: -mavx512f, -mavx2 -mfma, aarch64 NEON), or
   MOE_ISA_REFERENCE. moe_isa_name gives "auto", "reference", "avx2",
   "avx512", "neon" ("unknown" outside the enum). */
MOEDEF moe_isa moe_compiled_isa(void);
MOEDEF const char *moe_isa_name(moe_isa isa);

/* Check cfg and write it with every default applied to *out (out may be cfg). */
MOEDEF moe_status moe_config_resolve(const moe_config *cfg, moe_config *out);
/* The fingerprint a save_for_backward forward stamps into
   moe_info.cache_config: a hash of every resolved field that shapes its
   routing and cache (all but isa, threads, pool, pack_bf16, router_grad_clip
   and save_for_backward itself). 0 for a bad config.
   moe_cuda.cuh stamps its forwards with it too.                           */
MOEDEF uint64_t moe_config_fingerprint(const moe_config *cfg);

/* Presets: the routing fields of a published model (docs/ROUTING.md, "Presets") with
   its released shape. Change num_experts / top_k / d_model / d_ff freely.  */
MOEDEF moe_config moe_preset_mixtral(void);       /* 8x7B: E8 K2, renormalise, HF loss 0.02 */
MOEDEF moe_config moe_preset_switch(void);        /* Switch-Base-8: top-1, no renorm, ReLU,
                                                     cf 1.25, jitter, z-loss */
MOEDEF moe_config moe_preset_gshard(void);        /* top-2, random 2nd expert, C = 2S/E,
                                                     first-choice loss */
MOEDEF moe_config moe_preset_shazeer(void);       /* noisy top-4, importance + load CV^2 */
MOEDEF moe_config moe_preset_qwen2_moe(void);     /* Qwen1.5-MoE-A2.7B: E60 K4, no renorm,
                                                     gated shared */
MOEDEF moe_config moe_preset_qwen3_moe(void);     /* Qwen3-30B-A3B: E128 K8, renormalise */
MOEDEF moe_config moe_preset_olmoe(void);         /* OLMoE-1B-7B: E64 K8, no renorm, z-loss */
MOEDEF moe_config moe_preset_dbrx(void);          /* E16 K4, p-norm (p = 1) */
MOEDEF moe_config moe_preset_jamba(void);         /* E16 K2, no renorm */
MOEDEF moe_config moe_preset_deepseek_v2(void);   /* E160 K6, group-limited greedy (max), x16 */
MOEDEF moe_config moe_preset_deepseek_v3(void);   /* E256 K8, sigmoid, noaux_tc, bias, x2.5 */
MOEDEF moe_config moe_preset_expert_choice(void); /* EC-CF2: experts pick 2T/E tokens */
MOEDEF moe_config moe_preset_soft_moe(void);      /* Soft MoE, 1 slot per expert */
MOEDEF moe_config moe_preset_dense(void);         /* every expert, softmax weights */
MOEDEF moe_config moe_preset_glam(void);          /* GLaM: top-2 of 64 GEGLU experts (every
                                                     other layer of the model is MoE) */
MOEDEF moe_config moe_preset_topk_softmax(void);  /* "top-k of the logits, then softmax over
                                                     those k" (Mixtral paper): the same
                                                     weights as softmax -> top-k -> renormalise */

/* Quantized weights (moe_qtype, docs/QUANT.md). moe_qtype_name gives "f32",
   "q4_0", "q8_0", "q4_k", "mxfp4" (NULL outside the enum); block_size the
   values per block (1 for f32, 0 outside the enum); row_bytes the bytes of a
   row of n values (0 when n is not a multiple of the block size).
   moe_quantize writes rows x n values of x as blocks (Q8_0, Q4_0 and MXFP4 as
   ggml's reference quantizers; Q4_K by its own min-max fit, see
   docs/QUANT.md), NONFINITE for a NaN or Inf in x; moe_dequantize is its
   inverse on any blocks, as ggml's dequantizers. dst_bytes / src_bytes must
   hold rows * moe_qtype_row_bytes(type, n); buffers must not overlap.    */
MOEDEF const char *moe_qtype_name(moe_qtype type);
MOEDEF int32_t moe_qtype_block_size(moe_qtype type);
MOEDEF size_t moe_qtype_row_bytes(moe_qtype type, int64_t n);
MOEDEF moe_status moe_quantize(moe_qtype type, const float *x, int64_t rows, int64_t n,
                               void *dst, size_t dst_bytes);
MOEDEF moe_status moe_dequantize(moe_qtype type, const void *src, size_t src_bytes,
                                 int64_t rows, int64_t n, float *y);

/* Packing (for the SIMD forward): moe_pack_size gives the bytes of the packed
   expert weights; moe_pack_weights writes them (routed and shared experts,
   from w.gate/up/down and the shared tensors). Pack once for inference, or
   after every optimiser step when training (one pass over the weights). The
   layout belongs to this build's vector width: pack and run with the same
   compiled header (moe_forward checks it: MOE_STATUS_BAD_PACKED), and set
   w.packed_bytes with w.packed. Only the SIMD kernels read panels, so
   packing for the reference ISA (cfg.isa, or a build without SIMD flags)
   returns MOE_STATUS_UNSUPPORTED instead of a blob no forward would use.   */
MOEDEF moe_status moe_pack_size(const moe_config *cfg, size_t *out_bytes);
MOEDEF moe_status moe_pack_weights(const moe_config *cfg, const moe_weights *w,
                                   void *packed, size_t bytes);

/* Decode layout of quantized experts: moe_qpack_weights copies every
   quantized expert matrix (routed and shared; fp32 ones are skipped) into
   groups of 16 rows with their codes interleaved (docs/QUANT.md, "Decode
   layout"), about the bytes of the blocks, which experts with few rows
   (decode, small batches) then read with one vector of dot products for
   16 rows at a time. Pack once after loading; set w.qpacked and
   w.qpacked_bytes (the blocks stay needed: larger experts read them, or
   w.packed). Builds with AVX-512 (+ BW) read it; others, and the
   reference ISA, ignore it. moe_forward checks it against the config and
   the weight types (MOE_STATUS_BAD_PACKED). No quantized matrix:
   MOE_STATUS_UNSUPPORTED.                                                  */
MOEDEF moe_status moe_qpack_size(const moe_config *cfg, const moe_weights *w,
                                 size_t *out_bytes);
MOEDEF moe_status moe_qpack_weights(const moe_config *cfg, const moe_weights *w,
                                    void *qpacked, size_t bytes);

/* Deterministic initialisation of a layer's tensors from a seed: every
   tensor of `params` (moe_grads names and layouts; NULL ones are skipped)
   gets its own stream, and every expert its own part of it, so experts start
   different. Biases start at 0, the Soft MoE scale at 1.
     MOE_INIT_XAVIER:  uniform(-a, a), a = sqrt(6 / (fan_in + fan_out))
     MOE_INIT_SWITCH:  normal, std = sqrt(0.1 / fan_in), truncated at 2 std
                       (Switch Transformer's scaled-down init)            */
typedef enum moe_init_scheme { MOE_INIT_XAVIER = 0, MOE_INIT_SWITCH = 1 } moe_init_scheme;
MOEDEF moe_status moe_init_weights(const moe_config *cfg, moe_init_scheme scheme, uint64_t seed,
                                   const moe_grads *params);

/* Gradient helpers: zero every tensor of g (before a step's backwards), and
   scale them all by min(1, max_norm / ||g||_2) over the whole layer (global
   norm clipping); *out_norm (may be NULL) gets the norm before clipping.   */
MOEDEF moe_status moe_grads_zero(const moe_config *cfg, const moe_grads *g);
MOEDEF moe_status moe_grads_clip_norm(const moe_config *cfg, const moe_grads *g, float max_norm,
                                      float *out_norm);

/* Routing slots per token S (K, or E for expert choice and dense, 0 for Soft). */
MOEDEF int32_t moe_routing_slots(const moe_config *cfg);

/* Capacity of a group of T tokens by one of the published formulas
   (docs/ROUTING.md, "Capacity"). cf must be > 0 and finite.                  */
MOEDEF moe_status moe_capacity(moe_capacity_formula formula, int32_t num_tokens,
                               int32_t num_experts, int32_t top_k,
                               float capacity_factor, int32_t *out_capacity);

/* Bytes for every moe_info array of a T-token call, and a binder that points
   them all into one caller buffer of that size (64-byte aligned pieces).    */
MOEDEF moe_status moe_info_size(const moe_config *cfg, int32_t num_tokens, size_t *out_bytes);
MOEDEF moe_status moe_info_bind(const moe_config *cfg, int32_t num_tokens, moe_info *info,
                                void *buffer, size_t bytes);

/* Routing alone, from caller-computed logits [T][R] (and, with Shazeer noise,
   the raw noise logits x.W_noise^T [T][E], else NULL): scores, selection,
   capacity, weights and aux losses into info. For Soft MoE the logits are
   the slot logits. The logits already include any router bias; w is read
   only for selection_bias and may be NULL when the config does not use it.
   T = 0 needs no workspace; an info array or the workspace overlapping
   another buffer of the call is MOE_STATUS_ALIASING.                     */
MOEDEF moe_status moe_route_workspace_size(const moe_config *cfg, int32_t num_tokens,
                                           size_t *out_bytes);
MOEDEF moe_status moe_route(const moe_config *cfg, const moe_weights *w,
                            const float *logits, const float *noise_logits,
                            int32_t num_tokens, moe_info *info,
                            void *workspace, size_t workspace_bytes);

/* The whole layer: y[T][D] = sum over slots of weight * expert(x) (+ shared).
   x: [T][D]. info may be NULL. No allocation. T = 0 is a valid no-op that
   needs no workspace (it may be NULL) and reports an empty routing in info.
   In place: y may be x. No other output (y, info arrays, the workspace) may
   overlap any buffer of the call: MOE_STATUS_ALIASING, nothing written.   */
MOEDEF moe_status moe_forward_workspace_size(const moe_config *cfg, int32_t num_tokens,
                                             size_t *out_bytes);
MOEDEF moe_status moe_forward(const moe_config *cfg, const moe_weights *w,
                              const float *x, int32_t num_tokens, float *y,
                              moe_info *info, void *workspace, size_t workspace_bytes);
/* Convenience: allocates the workspace with MOE_MALLOC, runs, frees.        */
MOEDEF moe_status moe_forward_alloc(const moe_config *cfg, const moe_weights *w,
                                    const float *x, int32_t num_tokens, float *y,
                                    moe_info *info);

/* Backward pass of the layer for the loss  L = <dy, y> + info.aux_total,
   i.e. every aux loss enters with its coefficient from cfg. info is the one
   the forward with cfg.save_for_backward = 1 (same cfg, training included,
   x, T and seed) filled; it must have logits, scores, expert, weight, dropped
   (Soft MoE: scores and dispatch) and, unless cfg.recompute, the cache
   arrays (moe_info_bind binds all of them). Its stamp is checked first: an
   info no such forward filled (training = 1 alone saves nothing) is
   MOE_STATUS_MISSING_CACHE; one from another T or config (fields other than
   isa, threads, pool, pack_bf16, router_grad_clip and save_for_backward; a
   recompute backward also takes the info of a forward that kept the
   cache), or whose routing arrays were rewritten since (e.g. by an
   evaluation forward through the same info or buffer), is
   MOE_STATUS_BAD_CACHE. dx [T][D] is OVERWRITTEN; grads ACCUMULATE. dx may
   be NULL, or x or dy (in place); no other pair of the call's buffers may
   overlap where one is written (grads, dx, workspace): MOE_STATUS_ALIASING.
   T = 0 needs no workspace.
   What is a constant (docs/ROUTING.md, "Backward"): top-k / group / capacity choices,
   noise samples, jitter factors, the selection bias and the count vectors f
   of the balance losses. On a SIMD ISA the workspace also holds packed
   copies of one GEMM's operands, read by the kernels in tile order: about
   (m + n) k floats for the largest m x n x k product of the expert backward
   (from the routed rows N, D and F: at most (D + F) N, (N + F) D, (N + D) F). */
MOEDEF moe_status moe_backward_workspace_size(const moe_config *cfg, int32_t num_tokens,
                                              size_t *out_bytes);
MOEDEF moe_status moe_backward(const moe_config *cfg, const moe_weights *w,
                               const float *x, int32_t num_tokens, const moe_info *info,
                               const float *dy, float *dx, const moe_grads *grads,
                               void *workspace, size_t workspace_bytes);
MOEDEF moe_status moe_backward_alloc(const moe_config *cfg, const moe_weights *w,
                                     const float *x, int32_t num_tokens, const moe_info *info,
                                     const float *dy, float *dx, const moe_grads *grads);

/* ---------------------------------------------------------------------------
   Expert parallelism (EP): P ranks, each owning a contiguous slice of the T
   tokens of a routing group (rank order = token order) and E/P experts
   (rank r owns experts [r*E/P, (r+1)*E/P)). These calls compute what a
   transport (MPI, NCCL, sockets) needs; moe.h itself sends nothing. Top-k
   routing only (no Shazeer noise, no shared expert: MOE_STATUS_EP_UNSUPPORTED);
   every drop policy, normalize_after_drop, selection bias, groups, jitter,
   random second expert and expert dropout work, keyed by global token
   indices so the result is the one-process result. Per layer and rank:
     source side (its tokens)                 owner side (its experts)
     moe_ep_route   -> send_counts[P], stats
        (exchange counts: all-to-all; sum stats over ranks: allreduce)
     moe_ep_pack    -> pairs + rows, grouped by owner rank
        ------------------ all-to-all-v ------------------>
                                              moe_ep_expert_forward: capacity
                                              over ALL pairs of its experts,
                                              expert FFNs -> out rows, dropped
        <----------------- all-to-all-v (same counts, reversed)
     moe_ep_combine -> y, final routing in info, aux losses (global)
   Backward: moe_ep_pack_backward (dout rows) -> moe_ep_expert_backward
   (expert weight gradients stay on the owner; dx rows) -> moe_ep_combine_backward
   (dx, router gradients of this rank's tokens: sum them over ranks).
   Send order: pairs grouped by owner rank; within a rank by (token, slot).
   Counts are pairs. Sizes per layer: T*K rows of D floats each way. With
   cfg.isa = MOE_ISA_REFERENCE, y, dx and the expert gradients are bitwise the
   one-process moe_forward / moe_backward; router gradients are too when the
   ranks' partial sums are chained in rank order (rank r adds its tokens onto
   rank r-1's result); aux-loss values agree to float rounding (the stats
   are double sums in another order). No call has an in-place form: an
   output overlapping any other buffer of the call is MOE_STATUS_ALIASING. */
typedef struct moe_ep_plan {
    int32_t num_ranks;        /* P >= 1, must divide num_experts              */
    int32_t rank;             /* this rank, 0 <= rank < P                     */
    int32_t num_tokens;       /* T of the whole routing group (all ranks);
                                 capacity and aux losses are computed over it */
    int32_t token_offset;     /* global index of this rank's first token      */
    int32_t local_tokens;     /* T_r: this rank's tokens [offset, offset + T_r) */
} moe_ep_plan;

/* What the owner of an expert is told about one routed (token, slot) pair. */
typedef struct moe_ep_pair {
    int64_t token;            /* global token index t                         */
    int32_t slot;             /* j in 0..K-1 (0 = best)                       */
    int32_t expert;           /* global expert index                          */
    float   weight;           /* gate weight before capacity (routed_scale in) */
    float   priority;         /* the token's top-1 score (BPR drop order)     */
} moe_ep_pair;

/* Number of doubles in the statistics vector that every rank fills with its
   partial sums (moe_ep_route) and that must be SUMMED over ranks (allreduce)
   before moe_ep_combine / moe_ep_combine_backward. Its first E entries are
   the pairs routed to each expert before capacity (the global load, e.g.
   for moe_selection_bias_update).                                         */
MOEDEF moe_status moe_ep_stats_count(const moe_config *cfg, int32_t *out_count);

/* Workspace of the source-side calls (route, combine, combine_backward) for
   this rank's T_r tokens.                                                 */
MOEDEF moe_status moe_ep_workspace_size(const moe_config *cfg, const moe_ep_plan *plan,
                                        size_t *out_bytes);

/* Router and selection of this rank's tokens x [T_r][D]: info (arrays for
   T_r tokens; logits, scores, expert, weight, dropped required) gets the
   routing with PRE-capacity weights; send_counts [P] the pairs for each
   owner rank; stats [moe_ep_stats_count] this rank's partial sums.         */
MOEDEF moe_status moe_ep_route(const moe_config *cfg, const moe_weights *w, const moe_ep_plan *plan,
                               const float *x, moe_info *info, int32_t *send_counts, double *stats,
                               void *workspace, size_t workspace_bytes);

/* Gather the send buffers in send order: pairs [n_send] and token rows
   send_rows [n_send][D], n_send = sum of send_counts (checked against info). */
MOEDEF moe_status moe_ep_pack(const moe_config *cfg, const moe_ep_plan *plan, const float *x,
                              const moe_info *info, const int32_t *send_counts,
                              moe_ep_pair *send_pairs, float *send_rows);

/* Owner side. w holds this rank's E/P experts only (gate/up [E/P][F][D],
   down [E/P][D][F], biases likewise; router unused; w.packed ignored).
   pairs/x: the num_recv received pairs and rows as the all-to-all delivers
   them (source ranks in rank order). One workspace size serves forward and
   backward.                                                               */
MOEDEF moe_status moe_ep_expert_workspace_size(const moe_config *cfg, const moe_ep_plan *plan,
                                               int32_t num_recv, size_t *out_bytes);
/* Capacity over all pairs of the owned experts (C of the global T, the
   config's drop policy), then the expert FFNs. out [num_recv][D] in arrival
   order (a dropped pair's row is 0), dropped [num_recv] (1 = dropped): send
   both back. cache_hidden / cache_up ([num_recv][F] each, up for GLU only)
   may be NULL; if given, the backward reads activations from them instead of
   recomputing.                                                            */
MOEDEF moe_status moe_ep_expert_forward(const moe_config *cfg, const moe_weights *w,
                                        const moe_ep_plan *plan, const moe_ep_pair *pairs,
                                        const float *x, int32_t num_recv, float *out,
                                        uint8_t *dropped, float *cache_hidden, float *cache_up,
                                        void *workspace, size_t workspace_bytes);

/* Source side, after the return exchange: ret_out [n_send][D] and
   ret_dropped [n_send] in send order, stats summed over all ranks. Turns
   info into the final routing of this rank's tokens (dropped flags, final
   weights, renormalised if normalize_after_drop; counts over its tokens; aux
   losses of the whole group) and writes y [T_r][D], slots summed in order.
   Call once per moe_ep_route.                                             */
MOEDEF moe_status moe_ep_combine(const moe_config *cfg, const moe_ep_plan *plan,
                                 const double *stats, const float *ret_out,
                                 const uint8_t *ret_dropped, moe_info *info, float *y,
                                 void *workspace, size_t workspace_bytes);

/* Backward, source side: send_dout [n_send][D] = weight * dy_t per pair, in
   send order (0 for dropped pairs), to the owners (the forward's counts).  */
MOEDEF moe_status moe_ep_pack_backward(const moe_config *cfg, const moe_ep_plan *plan,
                                       const moe_info *info, const float *dy, float *send_dout);

/* Backward, owner side: pairs, x, num_recv, dropped and the caches as in (and
   from) moe_ep_expert_forward, dout [num_recv][D] received. grads: this
   rank's experts' gradients (gate, up, down, biases; layout of w) ACCUMULATE;
   dx [num_recv][D] is OVERWRITTEN (0 for dropped pairs): send it back.    */
MOEDEF moe_status moe_ep_expert_backward(const moe_config *cfg, const moe_weights *w,
                                         const moe_ep_plan *plan, const moe_ep_pair *pairs,
                                         const float *x, int32_t num_recv, const uint8_t *dropped,
                                         const float *cache_hidden, const float *cache_up,
                                         const float *dout, float *dx, const moe_grads *grads,
                                         void *workspace, size_t workspace_bytes);

/* Backward, source side, last step: w needs the router (and router_bias);
   info, stats and ret_out as in moe_ep_combine, ret_dx [n_send][D] from the
   owners. dx [T_r][D] is OVERWRITTEN (may be NULL); grads->router and
   ->router_bias ACCUMULATE this rank's tokens in token order (sum them over
   ranks; expert tensors of grads are not touched).                        */
MOEDEF moe_status moe_ep_combine_backward(const moe_config *cfg, const moe_weights *w,
                                          const moe_ep_plan *plan, const float *x,
                                          const moe_info *info, const double *stats,
                                          const float *dy, const float *ret_out,
                                          const float *ret_dx, float *dx, const moe_grads *grads,
                                          void *workspace, size_t workspace_bytes);

/* Aux-loss-free balancing (DeepSeek-V3): bias[e] += gamma * sign(mean - load[e])
   with load = tokens routed per expert over the step (e.g. summed
   info.expert_routed). Call once per training step; gamma = 1e-3 in V3.    */
MOEDEF moe_status moe_selection_bias_update(int32_t num_experts, const int32_t *load,
                                            float gamma, float *bias);

#ifdef __cplusplus
}
#endif
#endif /* MOE_H_INCLUDED */

/* ===========================================================================
   IMPLEMENTATION
   =========================================================================== */
#ifdef MOE_IMPLEMENTATION
#ifndef MOE_IMPLEMENTATION_INCLUDED
#define MOE_IMPLEMENTATION_INCLUDED

#include <string.h>
#include <math.h>
#include <float.h>
#ifdef _OPENMP
#  include <omp.h>
#endif

// ----------------------------------------------------------------------------
// Macro defaults

#ifndef MOE_ASSERT                     /* internal invariants only             */
#  include <assert.h>
#  define MOE_ASSERT(x) assert(x)
#endif
#if defined(MOE_MALLOC) != defined(MOE_FREE)
#  error "define both MOE_MALLOC(ctx,size) and MOE_FREE(ctx,ptr), or neither"
#endif
#ifndef MOE_MALLOC
#  include <stdlib.h>
#  define MOE_MALLOC(ctx, size) ((void)(ctx), malloc(size))
#  define MOE_FREE(ctx, ptr)    ((void)(ctx), free(ptr))
#endif
#ifdef __cplusplus
#  define MOE_RESTRICT __restrict
#else
#  define MOE_RESTRICT restrict
#endif
#define MOE__ALIGN 64                  /* every workspace piece starts on a cache line */
#if defined(__GNUC__) || defined(__clang__)
#  define MOE__TWIN __attribute__((unused)) /* a reference twin this build may not call */
#  define MOE__INLINE static inline __attribute__((always_inline))   /* inner loops' helpers */
#elif defined(_MSC_VER)
#  define MOE__TWIN
#  define MOE__INLINE static __forceinline
#else
#  define MOE__TWIN
#  define MOE__INLINE static inline
#endif

// ----------------------------------------------------------------------------
// Private helpers

static int moe__isfinite(float v) { return v == v && v - v == 0.0f; } /* no -ffast-math tricks */

/* Bump allocator over byte offsets; *ok turns 0 when a size overflows size_t. */
static size_t moe__reserve(size_t *total, size_t count, size_t elem, int *ok) {
    size_t off = (*total + (MOE__ALIGN - 1)) & ~(size_t)(MOE__ALIGN - 1);
    if (off < *total || (elem != 0 && count > ((size_t)-1 - off) / elem)) { *ok = 0; return 0; }
    *total = off + count * elem;
    return off;
}

/* a * b for non-negative sizes, saturating to SIZE_MAX so moe__reserve fails. */
static size_t moe__mul(size_t a, size_t b) {
    if (a != 0 && b > (size_t)-1 / a) return (size_t)-1;
    return a * b;
}
/* a + b, saturating to SIZE_MAX like moe__mul (a saturated term stays SIZE_MAX). */
static size_t moe__add(size_t a, size_t b) { return b > (size_t)-1 - a ? (size_t)-1 : a + b; }
/* ceil(a / b) for a >= 0, b > 0, without forming a + b - 1 (no int overflow near INT64_MAX). */
static int64_t moe__ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

/* moe_info.dropped values */
enum { MOE__KEPT = 0, MOE__DROPPED = 1, MOE__REJECTED = 2 };

/* Expert-parallel statistics vector (moe_ep_stats_count doubles, summed over
   ranks): six [E] blocks, then two scalars.                               */
enum { MOE__EPS_ROUTED = 0,  /* pairs routed to e before capacity (not rejected) */
       MOE__EPS_FIRST = 1,   /* slot-0 pairs routed to e                         */
       MOE__EPS_P = 2,       /* sum_t of the balance-loss probability of e       */
       MOE__EPS_SEQC = 3,    /* plain top-K counts (sequence loss, one sequence) */
       MOE__EPS_IMP = 4,     /* Shazeer importance as the forward sums it        */
       MOE__EPS_IMPG = 5,    /* importance as the backward recomputes it         */
       MOE__EPS_VECS = 6 };  /* then [6E] sum_t LSE(z_t)^2, [6E+1] sum of the
                                sequence losses of whole local sequences        */

// ----------------------------------------------------------------------------
// Counter-based random numbers. Each draw is a pure function of
// (cfg.seed, purpose, counter), so results never depend on call order or
// thread count. splitmix64's finaliser on a keyed counter: statistically fine
// for noise, not cryptographic; part of the reproducibility contract.

enum { MOE__RNG_NOISE = 1, MOE__RNG_JITTER = 2, MOE__RNG_SECOND = 3, MOE__RNG_GUMBEL = 4,
       MOE__RNG_WARMUP = 5, MOE__RNG_DROPOUT = 6, MOE__RNG_INIT = 16 /* + tensor */ };

static uint64_t moe__rng_bits(uint64_t seed, uint64_t purpose, uint64_t counter) {
    uint64_t z = seed ^ (purpose * 0x9E3779B97F4A7C15ull);
    z += (counter + 1) * 0xD1B54A32D192ED03ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    z = (z ^ (z >> 32)) * 0xD6E8FEB86659FD93ull;   /* second round: decorrelate adjacent counters */
    return z ^ (z >> 32);
}
/* Uniform in the open interval (0, 1), 53 bits. */
static double moe__rng_uniform(uint64_t seed, uint64_t purpose, uint64_t counter) {
    return ((double)(moe__rng_bits(seed, purpose, counter) >> 11) + 0.5) *
           (1.0 / 9007199254740992.0);
}
/* Standard normal by Box-Muller from two independent uniforms. */
static double moe__rng_normal(uint64_t seed, uint64_t purpose, uint64_t counter) {
    double u1 = moe__rng_uniform(seed, purpose, 2 * counter);
    double u2 = moe__rng_uniform(seed, purpose, 2 * counter + 1);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

// ----------------------------------------------------------------------------
// Scalar math: activations, scores

static float moe__sigmoid(float z) {             /* stable for large |z| */
    if (z >= 0.0f) return 1.0f / (1.0f + expf(-z));
    { float e = expf(z); return e / (1.0f + e); }
}
static float moe__softplus(float z) { return z > 20.0f ? z : log1pf(expf(z)); }
static float moe__gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
static float moe__gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}
static double moe__normal_cdf(double u) { return 0.5 * erfc(-u * 0.70710678118654752); }
/* Shazeer's smooth load term Phi(diff / sigma). sigma = 0 (noise_epsilon 0
   and softplus underflowed) is the noiseless limit, a step: 1 above the
   threshold, 0 below, 1/2 on a tie (not 0/0 = NaN); its gradient is 0.   */
static double moe__load_prob(double diff, double sigma) {
    if (sigma > 0.0) return moe__normal_cdf(diff / sigma);
    return diff > 0.0 ? 1.0 : diff < 0.0 ? 0.0 : 0.5;
}

static int moe__act_is_glu(moe_activation a) {
    return a == MOE_ACT_SWIGLU || a == MOE_ACT_GEGLU || a == MOE_ACT_GEGLU_TANH;
}

/* act(v) of the FFN's nonlinearity (SiLU, GELU erf / tanh, ReLU). */
static float moe__act(moe_activation act, float v) {
    switch (act) {
    case MOE_ACT_SWIGLU: case MOE_ACT_SILU:          return v * moe__sigmoid(v);
    case MOE_ACT_GEGLU:  case MOE_ACT_GELU:          return moe__gelu_erf(v);
    case MOE_ACT_GEGLU_TANH: case MOE_ACT_GELU_TANH: return moe__gelu_tanh(v);
    default:                             return v > 0.0f || v != v ? v : 0.0f; /* RELU, NaN kept */
    }
}
/* act'(v), docs/ROUTING.md, "Expert FFNs": SiLU' = s(1 + v(1 - s)) with s = sigmoid(v);
   GELU_erf' = Phi(v) + v phi(v);  GELU_tanh' = (1 + tanh u)/2 + v (1 - tanh^2 u)
   sqrt(2/pi) (1 + 3 * 0.044715 v^2) / 2;  ReLU' = [v > 0].                   */
static float moe__act_grad(moe_activation act, float v) {
    switch (act) {
    case MOE_ACT_SWIGLU: case MOE_ACT_SILU: {
        float s = moe__sigmoid(v);
        return s * (1.0f + v * (1.0f - s));
    }
    case MOE_ACT_GEGLU: case MOE_ACT_GELU:
        return 0.5f * (1.0f + erff(v * 0.70710678118654752f)) +
               v * 0.39894228040143268f * expf(-0.5f * v * v);
    case MOE_ACT_GEGLU_TANH: case MOE_ACT_GELU_TANH: {
        float th = tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v));
        return 0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * 0.79788456080286536f *
                                    (1.0f + 3.0f * 0.044715f * v * v);
    }
    default: return v > 0.0f ? 1.0f : 0.0f;
    }
}

/* a = act(h) (two-matrix FFN) or act(h) * u (GLU); n elements. h and u are
   kept: the backward pass needs the pre-activations.                      */
static void moe__activate_ref(moe_activation act, float *MOE_RESTRICT a,
                              const float *MOE_RESTRICT h, const float *MOE_RESTRICT u, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) a[i] = u ? moe__act(act, h[i]) * u[i] : moe__act(act, h[i]);
}

/* p = softmax(z) over n entries; pass 1 finds the max so exp never overflows. */
static void moe__softmax_ref(float *MOE_RESTRICT p, const float *MOE_RESTRICT z, int32_t n) {
    float m = z[0], sum = 0.0f;
    int32_t i;
    for (i = 1; i < n; i++) if (z[i] > m) m = z[i];
    for (i = 0; i < n; i++) { p[i] = expf(z[i] - m); sum += p[i]; }
    for (i = 0; i < n; i++) p[i] /= sum;
}

/* log sum exp of n entries, in double (the z-loss squares it). */
static double moe__logsumexp(const float *z, int32_t n) {
    double m = z[0], s = 0.0;
    int32_t i;
    for (i = 1; i < n; i++) if (z[i] > m) m = z[i];
    for (i = 0; i < n; i++) s += exp((double)z[i] - m);
    return m + log(s);
}

/* Population CV^2 = var / (mean^2 + 1e-10)  (tensor2tensor cv_squared). */
static double moe__cv_squared(const double *v, int32_t n) {
    double mean = 0.0, var = 0.0;
    int32_t i;
    if (n <= 1) return 0.0;
    for (i = 0; i < n; i++) mean += v[i];
    mean /= n;
    for (i = 0; i < n; i++) var += (v[i] - mean) * (v[i] - mean);
    var /= n;
    return var / (mean * mean + 1e-10);
}

/* d CV^2 / d v_i with CV^2 = var / (mean^2 + 1e-10), population variance. */
static void moe__cv_squared_grad(const double *v, int32_t n, double coef, double *grad) {
    double mean = 0.0, var = 0.0, den;
    int32_t i;
    for (i = 0; i < n; i++) grad[i] = 0.0;
    if (n <= 1) return;
    for (i = 0; i < n; i++) mean += v[i];
    mean /= n;
    for (i = 0; i < n; i++) var += (v[i] - mean) * (v[i] - mean);
    var /= n;
    den = mean * mean + 1e-10;
    for (i = 0; i < n; i++)
        grad[i] = coef * (2.0 * (v[i] - mean) / n / den - var * 2.0 * mean / (n * den * den));
}

// ----------------------------------------------------------------------------
// Top-k and sorting. The rule everywhere (docs/ROUTING.md, "Tie rule"): larger value
// first; on ties the lower index wins.

/* idx[0..k) = indices of the k largest v[0..n), by (value desc, index asc).
   Insertion into a sorted list of k: an entry moves up only past strictly
   smaller values, so an earlier (lower) index stays ahead on a tie.       */
static void moe__topk_ref(const float *v, int32_t n, int32_t k, int32_t *idx) {
    int32_t i, filled = 0;
    for (i = 0; i < n; i++) {
        int32_t p;
        if (filled == k && !(v[i] > v[idx[k - 1]])) continue;
        p = filled < k ? filled++ : k - 1;
        while (p > 0 && v[i] > v[idx[p - 1]]) { idx[p] = idx[p - 1]; p--; }
        idx[p] = i;
    }
}

/* Stable sort of idx[0..n) by key[idx] descending (ties keep their order),
   bottom-up merge sort with a scratch array of n.                          */
static void moe__sort_desc(const float *key, int32_t *idx, int32_t *tmp, int32_t n) {
    int32_t width, i;
    int32_t *src = idx, *dst = tmp;
    for (width = 1; width < n; width *= 2) {
        for (i = 0; i < n; i += 2 * width) {
            int32_t a = i, amax = i + width < n ? i + width : n;
            int32_t b = amax, bmax = i + 2 * width < n ? i + 2 * width : n, o = i;
            while (a < amax && b < bmax) dst[o++] = key[src[b]] > key[src[a]] ? src[b++] : src[a++];
            while (a < amax) dst[o++] = src[a++];
            while (b < bmax) dst[o++] = src[b++];
        }
        { int32_t *t = src; src = dst; dst = t; }
    }
    if (src != idx) memcpy(idx, src, (size_t)n * sizeof(int32_t));
}

// ----------------------------------------------------------------------------
// Reference GEMMs: moe__gemm_ref (y = x . W^T + bias, nn.Linear layout) and
// moe__sgemm_ref (strided). The SIMD GEMM, moe__sgemm_simd (fast kernels),
// has moe__sgemm_ref's contract and signature (moe__sgemm_fn).

/* y[i][o] = bias[o] + sum_k x[i][k] * w[o][k]
   x: [n][n_in]   w: [n_out][n_in] (nn.Linear)   bias: [n_out] or NULL   y: [n][n_out]
   Sums k in ascending order in float.                                      */
static void moe__gemm_ref(float *MOE_RESTRICT y, const float *MOE_RESTRICT x,
                          const float *MOE_RESTRICT w, const float *MOE_RESTRICT bias,
                          int64_t n, int32_t n_out, int32_t n_in) {
    int64_t i;
    int32_t o, k;
    for (i = 0; i < n; i++) {
        const float *xi = x + (size_t)i * (size_t)n_in;
        float *yi = y + (size_t)i * (size_t)n_out;
        for (o = 0; o < n_out; o++) {
            const float *wo = w + (size_t)o * (size_t)n_in;
            float acc = 0.0f;
            for (k = 0; k < n_in; k++) acc += xi[k] * wo[k];
            yi[o] = bias ? acc + bias[o] : acc;
        }
    }
}

/* The strided GEMM every other product is written in (backward, packed
   forward): C[i][j] (+)= sum_k A[i*a_rs + k*a_cs] * B[k*ldb + j] for i < m,
   j0 <= j < j1, k ascending. A is read element by element (broadcast), B and C
   by rows, so one kernel serves x.W^T on packed weights, dh.W, dW += dh^T.x.  */
static void moe__sgemm_ref(int64_t m, int32_t j0, int32_t j1, int64_t depth,
                           const float *A, size_t a_rs, size_t a_cs,
                           const float *B, size_t ldb, float *C, size_t ldc, int accumulate) {
    int64_t i, k;
    int32_t j;
    for (i = 0; i < m; i++) {
        float *ci = C + (size_t)i * ldc;
        if (!accumulate) for (j = j0; j < j1; j++) ci[j] = 0.0f;
        for (k = 0; k < depth; k++) {   /* row of B at a time: C[i][j] still sums k in order */
            const float a = A[(size_t)i * a_rs + (size_t)k * a_cs];
            const float *bk = B + (size_t)k * ldb;
            for (j = j0; j < j1; j++) ci[j] += a * bk[j];
        }
    }
}

/* bias[j] += sum over n rows of A[i][j] (row stride lda): bias gradients. */
static void moe__sum_rows(float *bias, const float *A, int64_t n, int32_t m, size_t lda) {
    int64_t i;
    int32_t j;
    if (!bias) return;
    for (i = 0; i < n; i++)
        for (j = 0; j < m; j++) bias[j] += A[(size_t)i * lda + (size_t)j];
}

typedef void (*moe__sgemm_fn)(int64_t m, int32_t j0, int32_t j1, int64_t depth,
                              const float *A, size_t a_rs, size_t a_cs,
                              const float *B, size_t ldb, float *C, size_t ldc, int accumulate);

// ----------------------------------------------------------------------------
// Quantized weights: ggml's block formats (docs/QUANT.md). Each type has a
// plain dequantizer (the spec, bit for bit ggml's and the gguf package's) and
// a quantizer. The reference GEMM on blocks decodes a block, then sums as
// moe__gemm_ref does, so the reference forward on quantized experts is the
// fp32 reference forward on the decoded weights, bit for bit.

/* IEEE half -> float (exact), for the halves that are not normal numbers. */
static float moe__f16_float_rare(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, man = h & 0x3ffu;
    uint32_t u;
    float f;
    if ((h & 0x7c00u) == 0) {                /* zero, subnormal: man * 2^-24 */
        f = (float)man * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    u = sign | 0x7f800000u | man << 13;      /* Inf, NaN (payload kept) */
    memcpy(&f, &u, sizeof f);
    return f;
}
/* IEEE half -> float (exact). A normal half is its bits moved up 13 with the
   exponent rebiased (+112): the inline path every block scale takes. */
MOE__INLINE float moe__f16_float(uint16_t h) {
    const uint32_t ex = h & 0x7c00u;
    uint32_t u;
    float f;
    if (ex == 0 || ex == 0x7c00u) return moe__f16_float_rare(h);
    u = (uint32_t)(h & 0x8000u) << 16 | ((uint32_t)(h & 0x7fffu) + 0x1c000u) << 13;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float -> IEEE half, round to nearest even (numpy's astype(float16), ggml's
   GGML_FP32_TO_FP16); NaN stays a quiet NaN, >= 65520 becomes Inf. */
static uint16_t moe__f16_of(float v) {
    uint32_t u, a, sign, m, rem, half;
    int32_t shift;
    memcpy(&u, &v, sizeof u);
    sign = (u >> 16) & 0x8000u;
    a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);
    if (a >= 0x38800000u) {                 /* normal half: rebias, round 23 -> 10 bits */
        a -= 112u << 23;
        a += 0xfffu + ((a >> 13) & 1u);
        return (uint16_t)(sign | (a >> 13));
    }
    if (a < 0x33000000u) return (uint16_t)sign;   /* below 2^-25: rounds to 0 */
    /* subnormal half m * 2^-24: m = mantissa * 2^(exponent - 126), rounded */
    shift = 126 - (int32_t)(a >> 23);        /* 14 .. 24 */
    m = (a & 0x7fffffu) | 0x800000u;
    rem = m & ((1u << shift) - 1u);
    half = 1u << (shift - 1);
    m >>= shift;
    m += rem > half || (rem == half && (m & 1u));
    return (uint16_t)(sign | m);
}

/* a * b rounded to float before it is added to anything: a compiler may fuse
   a * b + c into one FMA (one rounding), which moves results off ggml's and
   numpy's, which round the product. */
static float moe__product(float a, float b) {
    volatile float p = a * b;
    return p;
}

typedef struct moe__qinfo { int32_t block; size_t bytes; } moe__qinfo;

/* Values and bytes per block; {0, 0} outside moe_qtype. */
static moe__qinfo moe__qblock(int32_t type) {
    moe__qinfo q = {0, 0};
    switch (type) {
    case MOE_QTYPE_F32: q.block = 1; q.bytes = 4; break;
    case MOE_QTYPE_Q4_0: q.block = 32; q.bytes = 18; break;
    case MOE_QTYPE_Q8_0: q.block = 32; q.bytes = 34; break;
    case MOE_QTYPE_Q4_K: q.block = 256; q.bytes = 144; break;
    case MOE_QTYPE_MXFP4: q.block = 32; q.bytes = 17; break;
    default: break;
    }
    return q;
}

/* MXFP4's e2m1 values, doubled (ggml's table), and its scale 2^(e - 128),
   half of the e8m0 value 2^(e - 127) to match (ggml's e8m0_to_fp32_half). */
static const int8_t moe__e2m1x2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
static float moe__e8m0_half(uint8_t e) {
    const uint32_t u = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Q4_K's 6-bit scale and min of sub-block j from its 12 packed bytes. */
MOE__INLINE void moe__q4k_scale_min(const unsigned char *s, int j, float *sc, float *mn) {
    if (j < 4) {
        *sc = (float)(s[j] & 63); *mn = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 0xf) | (s[j - 4] >> 6) << 4);
        *mn = (float)((s[j + 4] >> 4) | (s[j] >> 6) << 4);
    }
}

static uint16_t moe__u16le(const unsigned char *b) { return (uint16_t)(b[0] | b[1] << 8); }
/* A byte as int8, without a branch (random signs mispredict one). */
static int moe__i8(unsigned char b) { return (int)b - ((int)(b & 0x80u) << 1); }
static void moe__put_u16le(unsigned char *b, uint16_t v) {
    b[0] = (unsigned char)(v & 0xff); b[1] = (unsigned char)(v >> 8);
}

/* Sub-block sb (32 values; Q4_K has 8, the others 1) of the block at b as
   integer codes and the scale and min its values are  scale * code - min  of:
     Q8_0   code int8        scale d                min 0
     Q4_0   code nibble - 8  scale d                min 0
     MXFP4  code 2 e2m1      scale 2^(e - 128)      min 0
     Q4_K   code nibble      scale d * s_sb         min dmin * m_sb
   Q4_0 and MXFP4: value j < 16 is the low nibble of byte j, j + 16 its high.
   Q4_K: 32-byte chunk sb / 2, low nibbles for even sb, high for odd.      */
static void moe__subblock_codes(int32_t type, const unsigned char *b, int sb, int8_t *code,
                                float *scale, float *min) {
    int j;
    *min = 0.0f;
    if (type == MOE_QTYPE_Q8_0) {
        *scale = moe__f16_float(moe__u16le(b));
        for (j = 0; j < 32; j++) code[j] = (int8_t)moe__i8(b[2 + j]);
    } else if (type == MOE_QTYPE_Q4_0) {
        *scale = moe__f16_float(moe__u16le(b));
        for (j = 0; j < 16; j++) {
            code[j] = (int8_t)((b[2 + j] & 0xf) - 8);
            code[j + 16] = (int8_t)((b[2 + j] >> 4) - 8);
        }
    } else if (type == MOE_QTYPE_MXFP4) {
        *scale = moe__e8m0_half(b[0]);
        for (j = 0; j < 16; j++) {
            code[j] = moe__e2m1x2[b[1 + j] & 0xf];
            code[j + 16] = moe__e2m1x2[b[1 + j] >> 4];
        }
    } else {
        const unsigned char *q = b + 16 + 32 * (sb / 2);
        const int shift = (sb & 1) * 4;
        float sc, mn;
        moe__q4k_scale_min(b + 4, sb, &sc, &mn);
        *scale = moe__f16_float(moe__u16le(b)) * sc;
        *min = moe__f16_float(moe__u16le(b + 2)) * mn;
        for (j = 0; j < 32; j++) code[j] = (int8_t)((q[j] >> shift) & 0xf);
    }
}

/* The values of one block (moe__qblock(type).block of them) into y. With a
   min, the product is rounded before the subtraction (moe__product). */
static void moe__dequant_block(int32_t type, const unsigned char *b, float *y) {
    const int n_sub = moe__qblock(type).block / 32;
    int8_t code[32];
    float scale, mn;
    int sb, j;
    for (sb = 0; sb < n_sub; sb++, y += 32) {
        moe__subblock_codes(type, b, sb, code, &scale, &mn);
        if (mn == 0.0f) for (j = 0; j < 32; j++) y[j] = scale * (float)code[j];
        else for (j = 0; j < 32; j++) y[j] = moe__product(scale, (float)code[j]) - mn;
    }
}

/* Q4_K of 256 values: per 32-value sub-block j the range [lo_j, hi_j] (lo_j
   <= 0) as scale_j = (hi_j - lo_j) / 15 and min_j = -lo_j, both quantized to
   6 bits against the block's largest (d = max scale / 63, dmin = max min /
   63), then each value to the nearest of the 16 levels its decoded scale and
   min give. A plain min-max fit (ggml searches further; docs/QUANT.md). */
static void moe__quant_q4k(const float *x, unsigned char *b) {
    float scale[8], mins[8], max_scale = 0.0f, max_min = 0.0f, d, dmin;
    unsigned char ls[8], lm[8], L[256];
    int j, l;
    for (j = 0; j < 8; j++) {
        float lo = 0.0f, hi = x[32 * j];
        for (l = 0; l < 32; l++) {
            if (x[32 * j + l] < lo) lo = x[32 * j + l];
            if (x[32 * j + l] > hi) hi = x[32 * j + l];
        }
        scale[j] = (hi - lo) / 15.0f;
        mins[j] = -lo;
        if (scale[j] > max_scale) max_scale = scale[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    for (j = 0; j < 8; j++) {
        const float s = max_scale > 0.0f ? roundf(63.0f / max_scale * scale[j]) : 0.0f;
        const float m = max_min > 0.0f ? roundf(63.0f / max_min * mins[j]) : 0.0f;
        ls[j] = (unsigned char)(s < 63.0f ? s : 63.0f);
        lm[j] = (unsigned char)(m < 63.0f ? m : 63.0f);
    }
    moe__put_u16le(b, moe__f16_of(max_scale / 63.0f));
    moe__put_u16le(b + 2, moe__f16_of(max_min / 63.0f));
    d = moe__f16_float(moe__u16le(b));
    dmin = moe__f16_float(moe__u16le(b + 2));
    for (j = 0; j < 12; j++) b[4 + j] = 0;
    for (j = 0; j < 8; j++) {                  /* ggml's 12-byte packing of 8 x (6 + 6) bits */
        if (j < 4) {
            b[4 + j] = ls[j]; b[8 + j] = lm[j];
        } else {
            b[8 + j] = (unsigned char)((ls[j] & 0xf) | (lm[j] & 0xf) << 4);
            b[4 + j - 4] |= (unsigned char)((ls[j] >> 4) << 6);
            b[4 + j] |= (unsigned char)((lm[j] >> 4) << 6);
        }
    }
    for (j = 0; j < 8; j++) {
        const float dj = d * (float)ls[j], mj = dmin * (float)lm[j];
        for (l = 0; l < 32; l++) {
            const float q = dj > 0.0f ? roundf((x[32 * j + l] + mj) / dj) : 0.0f;
            L[32 * j + l] = (unsigned char)(q < 0.0f ? 0.0f : q > 15.0f ? 15.0f : q);
        }
    }
    for (j = 0; j < 4; j++)
        for (l = 0; l < 32; l++)
            b[16 + 32 * j + l] = (unsigned char)(L[64 * j + l] | L[64 * j + 32 + l] << 4);
}

/* One block of finite values x into b. Q8_0, Q4_0 and MXFP4 as ggml's
   quantize_row_*_ref (and the gguf package): the same bytes. */
static void moe__quant_block(int32_t type, const float *x, unsigned char *b) {
    int j;
    if (type == MOE_QTYPE_Q4_K) { moe__quant_q4k(x, b); return; }
    if (type == MOE_QTYPE_MXFP4) {             /* e from the largest |x|, nearest e2m1 each */
        float amax = 0.0f, d, e;
        for (j = 0; j < 32; j++) if (fabsf(x[j]) > amax) amax = fabsf(x[j]);
        e = amax > 0.0f ? floorf(log2f(amax)) - 2.0f + 127.0f : 0.0f;
        b[0] = (unsigned char)(e < 0.0f ? 0.0f : e);      /* amax < 2^-125 */
        d = moe__e8m0_half(b[0]);
        for (j = 0; j < 32; j++) {
            int i, best = 0;
            float best_err = fabsf(x[j]);              /* level 0 */
            for (i = 1; i < 16; i++) {
                const float err = fabsf(d * (float)moe__e2m1x2[i] - x[j]);
                if (err < best_err) { best = i; best_err = err; }
            }
            if (j < 16) b[1 + j] = (unsigned char)best;
            else b[1 + j - 16] |= (unsigned char)(best << 4);
        }
    } else if (type == MOE_QTYPE_Q8_0) {       /* d = max |x| / 127 */
        float amax = 0.0f, d, id;
        for (j = 0; j < 32; j++) if (fabsf(x[j]) > amax) amax = fabsf(x[j]);
        d = amax / 127.0f;
        id = d != 0.0f ? 1.0f / d : 0.0f;
        moe__put_u16le(b, moe__f16_of(d));
        for (j = 0; j < 32; j++) {
            const int q = (int)roundf(x[j] * id);
            b[2 + j] = (unsigned char)(q < 0 ? q + 256 : q);
        }
    } else {                                   /* Q4_0: d = (the x of largest |x|) / -8 */
        float amax = 0.0f, max = 0.0f, d, id;
        for (j = 0; j < 32; j++) if (fabsf(x[j]) > amax) { amax = fabsf(x[j]); max = x[j]; }
        d = max / -8.0f;
        id = d != 0.0f ? 1.0f / d : 0.0f;
        moe__put_u16le(b, moe__f16_of(d));
        for (j = 0; j < 16; j++) {
            const int lo = (int)(moe__product(x[j], id) + 8.5f);
            const int hi = (int)(moe__product(x[j + 16], id) + 8.5f);
            b[2 + j] = (unsigned char)((lo < 15 ? lo : 15) | (hi < 15 ? hi : 15) << 4);
        }
    }
}

/* A quantized matrix set, as the expert FFN reads it: expert e's row o of
   blocks starts at data + e * stride + o * row_bytes. data NULL: fp32. */
typedef struct moe__qmat {
    const unsigned char *data;
    int32_t type;
    size_t row_bytes, stride;
} moe__qmat;

/* moe__gemm_ref with W in blocks: y[i][o] = bias[o] + sum_k x[i][k] W[o][k],
   k ascending in float, each block decoded once for all n rows: the bits of
   moe__gemm_ref on the decoded W. */
static void moe__gemm_q_ref(float *MOE_RESTRICT y, const float *MOE_RESTRICT x,
                            const moe__qmat *W, size_t e, const float *MOE_RESTRICT bias,
                            int64_t n, int32_t n_out, int32_t n_in) {
    const moe__qinfo qi = moe__qblock(W->type);
    float block[256];
    int64_t i;
    int32_t o, k0, k;
    for (o = 0; o < n_out; o++) {
        const unsigned char *row = W->data + e * W->stride + (size_t)o * W->row_bytes;
        for (i = 0; i < n; i++) y[(size_t)i * (size_t)n_out + (size_t)o] = 0.0f;
        for (k0 = 0; k0 < n_in; k0 += qi.block) {
            moe__dequant_block(W->type, row + (size_t)(k0 / qi.block) * qi.bytes, block);
            for (i = 0; i < n; i++) {
                const float *xi = x + (size_t)i * (size_t)n_in + (size_t)k0;
                float acc = y[(size_t)i * (size_t)n_out + (size_t)o];
                for (k = 0; k < qi.block; k++) acc += xi[k] * block[k];
                y[(size_t)i * (size_t)n_out + (size_t)o] = acc;
            }
        }
        if (bias) for (i = 0; i < n; i++) y[(size_t)i * (size_t)n_out + (size_t)o] += bias[o];
    }
}

/* Activations for the integer dot products (small batches, docs/QUANT.md):
   rows of k values, k a multiple of 32, as 32-value blocks of int8 q with
   scale d = max|x| / 127, q = round(x / d) (ggml's q8 activations, with a
   float scale), and s = d * sum q, which Q4_K's mins need.               */
typedef struct moe__qact {
    int8_t *q;          /* [rows][k]    */
    float *d, *s;       /* [rows][k/32] */
    int32_t *qsum;      /* [rows][k/32] sum q (moe__qpdot_simd's offsets) */
    int32_t k;
} moe__qact;

/* One weight row in blocks . activation rows r0 .. r0 + nr - 1 into out:
   per 32 values (moe__subblock_codes) the integer sum isum of the codes
   times q, then  acc += (scale * d) * isum - min * s. The spec of
   moe__qdot_simd (the same integer sums; its float sums run in vector
   lanes).                                                                */
MOE__TWIN static void moe__qdot_ref(int32_t type, const unsigned char *w, const moe__qact *a,
                                    int64_t r0, int32_t nr, float *out) {
    const moe__qinfo qi = moe__qblock(type);
    const int32_t nb = a->k / 32, per = qi.block / 32;
    int8_t code[32];
    int32_t i, b, j;
    for (i = 0; i < nr; i++) {
        const int64_t r = r0 + i;
        const int8_t *q = a->q + (size_t)r * (size_t)a->k;
        const float *d = a->d + (size_t)r * (size_t)nb, *s = a->s + (size_t)r * (size_t)nb;
        float acc = 0.0f;
        for (b = 0; b < nb; b++, q += 32) {
            int32_t isum = 0;
            float scale, mn;
            moe__subblock_codes(type, w + (size_t)(b / per) * qi.bytes, b % per, code, &scale,
                                &mn);
            for (j = 0; j < 32; j++) isum += code[j] * q[j];
            acc += scale * d[b] * (float)isum - mn * s[b];
        }
        out[i] = acc;
    }
}

/* The decode layout (moe_qpack_weights): a quantized matrix's rows in groups
   of 16, so one vector of int32 lanes holds 16 rows' dot products and one
   activation broadcast serves all of them (no per-row horizontal sums; the
   layout of ggml's repacked blocks, in our own arrangement). Per group, the
   32-value units (blocks; Q4_K's sub-blocks) in k order:
     codes  4-bit types: 4 chunks of 64 bytes; chunk j holds row r's codes
              k = 4j .. 4j + 3 (low nibbles) and k = 16 + 4j .. 16 + 4j + 3
              (high nibbles) at bytes 4r .. 4r + 3
            Q8_0: 8 chunks; chunk j holds row r's k = 4j .. 4j + 3 as bytes
    unsigned codes: Q8_0 q + 128, Q4_0 q (value q - 8), Q4_K q, MXFP4 the
              e2m1 nibble (value moe__e2m1x2[q])
    scales Q8_0, Q4_0: 16 fp16 d; MXFP4: 16 fp32 2^(e - 128); Q4_K: 16 bytes
              s_j and 16 bytes m_j per unit, after 16 fp16 d and 16 fp16
              dmin at the start of each 256-value super-block
   Rows past the matrix's last are zero codes with zero scales. The bytes
   are those of the blocks (Q8_0, Q4_0), 3 % more (Q4_K) or 18 % more
   (MXFP4, whose scales stay exact as fp32).                                */
#define MOE__QP_ROWS 16

/* Bytes of one unit's codes; of its codes and scales; of a group of 16 rows
   of cols values (with Q4_K's super-block headers). */
static size_t moe__qp_code_bytes(int32_t type) { return type == MOE_QTYPE_Q8_0 ? 512 : 256; }
static size_t moe__qp_unit_bytes(int32_t type) {
    return moe__qp_code_bytes(type) + (type == MOE_QTYPE_MXFP4 ? 64 : 32);
}
static size_t moe__qp_group_bytes(int32_t type, size_t cols) {
    const size_t units = cols / 32;
    return units * moe__qp_unit_bytes(type) + (type == MOE_QTYPE_Q4_K ? cols / 256 * 64 : 0);
}
/* One matrix of `rows` rows (an expert's gate, up or down), 0 for fp32. */
static size_t moe__qp_matrix_bytes(const moe__qmat *q, size_t rows, size_t cols) {
    if (!q->data) return 0;
    return moe__mul((rows + MOE__QP_ROWS - 1) / MOE__QP_ROWS, moe__qp_group_bytes(q->type, cols));
}

/* Rows row0 .. row0 + 15 of expert e's matrix q (cols values a row; rows
   past n_rows are padding) into the group at dst. */
static void moe__qp_pack_group(const moe__qmat *q, size_t e, size_t row0, size_t n_rows,
                               size_t cols, unsigned char *dst) {
    const moe__qinfo qi = moe__qblock(q->type);
    const int32_t per = qi.block / 32, units = (int32_t)(cols / 32);
    const size_t code_bytes = moe__qp_code_bytes(q->type);
    int32_t u, r, j;
    for (u = 0; u < units; u++) {
        if (q->type == MOE_QTYPE_Q4_K && u % 8 == 0) {      /* super-block header */
            memset(dst, 0, 64);
            for (r = 0; r < MOE__QP_ROWS && row0 + (size_t)r < n_rows; r++) {
                const unsigned char *b = q->data + e * q->stride +
                                         (row0 + (size_t)r) * q->row_bytes + (size_t)(u / 8) * 144;
                memcpy(dst + 2 * r, b, 2);                     /* d    */
                memcpy(dst + 32 + 2 * r, b + 2, 2);            /* dmin */
            }
            dst += 64;
        }
        memset(dst, 0, moe__qp_unit_bytes(q->type));
        for (r = 0; r < MOE__QP_ROWS && row0 + (size_t)r < n_rows; r++) {
            const unsigned char *b = q->data + e * q->stride + (row0 + (size_t)r) * q->row_bytes +
                                     (size_t)(u / per) * qi.bytes;
            unsigned char code[32];
            if (q->type == MOE_QTYPE_Q8_0) {
                for (j = 0; j < 32; j++) code[j] = (unsigned char)(b[2 + j] ^ 0x80u);
                for (j = 0; j < 32; j++) dst[64 * (j / 4) + 4 * r + j % 4] = code[j];
                memcpy(dst + code_bytes + 2 * r, b, 2);
                continue;
            }
            if (q->type == MOE_QTYPE_Q4_K) {
                const unsigned char *c4 = b + 16 + 32 * ((u % 8) / 2);
                const int shift = (u % 8 & 1) * 4;
                float sc, mn;
                for (j = 0; j < 32; j++) code[j] = (unsigned char)((c4[j] >> shift) & 0xf);
                moe__q4k_scale_min(b + 4, u % 8, &sc, &mn);
                dst[code_bytes + r] = (unsigned char)sc;
                dst[code_bytes + 16 + r] = (unsigned char)mn;
            } else {                                  /* Q4_0, MXFP4: 16 bytes of nibbles */
                const unsigned char *c4 = b + (q->type == MOE_QTYPE_Q4_0 ? 2 : 1);
                for (j = 0; j < 16; j++) {
                    code[j] = (unsigned char)(c4[j] & 0xf);
                    code[j + 16] = (unsigned char)(c4[j] >> 4);
                }
                if (q->type == MOE_QTYPE_Q4_0) memcpy(dst + code_bytes + 2 * r, b, 2);
                else {
                    const float s = moe__e8m0_half(b[0]);
                    memcpy(dst + code_bytes + 4 * r, &s, sizeof s);
                }
            }
            for (j = 0; j < 16; j++)
                dst[64 * (j / 4) + 4 * r + j % 4] = (unsigned char)(code[j] | code[j + 16] << 4);
        }
        dst += moe__qp_unit_bytes(q->type);
    }
}

/* Row r's code k (0..31) of a unit, read back from a group as the signed
   code moe__subblock_codes gives for the original block. */
static int moe__qp_code(int32_t type, const unsigned char *unit, int32_t r, int32_t k) {
    if (type == MOE_QTYPE_Q8_0) return (int)unit[64 * (k / 4) + 4 * r + k % 4] - 128;
    {
        const unsigned char byte = unit[64 * (k % 16 / 4) + 4 * r + k % 4];
        const int nib = k < 16 ? byte & 0xf : byte >> 4;
        return type == MOE_QTYPE_Q4_0 ? nib - 8 : type == MOE_QTYPE_MXFP4 ? moe__e2m1x2[nib] : nib;
    }
}

/* moe__qdot_ref on a group: the 16 rows . activation rows r0 .. r0 + nr - 1
   into out[i][16], the same integer sums and the same float steps in the
   same order, so the same bits as moe__qdot_ref on the blocks. The spec of
   moe__qpdot_simd.                                                        */
MOE__TWIN static void moe__qpdot_ref(int32_t type, const unsigned char *g, const moe__qact *a,
                                     int64_t r0, int32_t nr, float *out) {
    const int32_t nb = a->k / 32;
    const size_t code_bytes = moe__qp_code_bytes(type);
    int32_t i, r, b, k;
    for (i = 0; i < nr; i++) {
        const int8_t *q = a->q + (size_t)(r0 + i) * (size_t)a->k;
        const float *d = a->d + (size_t)(r0 + i) * (size_t)nb, *s = a->s + (size_t)(r0 + i) * nb;
        for (r = 0; r < MOE__QP_ROWS; r++) {
            const unsigned char *unit = g, *head = g;
            float acc = 0.0f;
            for (b = 0; b < nb; b++) {
                int32_t isum = 0;
                float scale, mn = 0.0f;
                if (type == MOE_QTYPE_Q4_K && b % 8 == 0) { head = unit; unit += 64; }
                for (k = 0; k < 32; k++) isum += moe__qp_code(type, unit, r, k) * q[32 * b + k];
                if (type == MOE_QTYPE_MXFP4) {
                    memcpy(&scale, unit + code_bytes + 4 * r, sizeof scale);
                } else if (type == MOE_QTYPE_Q4_K) {
                    scale = moe__f16_float(moe__u16le(head + 2 * r)) * (float)unit[code_bytes + r];
                    mn = moe__f16_float(moe__u16le(head + 32 + 2 * r)) *
                         (float)unit[code_bytes + 16 + r];
                } else {
                    scale = moe__f16_float(moe__u16le(unit + code_bytes + 2 * r));
                }
                acc += scale * d[b] * (float)isum - mn * s[b];
                unit += moe__qp_unit_bytes(type);
            }
            out[(size_t)i * MOE__QP_ROWS + (size_t)r] = acc;
        }
    }
}

// ----------------------------------------------------------------------------
// ISA selection: one vector ISA per build, chosen at compile time; the fast
// kernels (the last layer of the implementation) are written on it.
//   AVX-512 (-mavx512f): 16 floats, 12x32 register tile
//   AVX2 + FMA (-mavx2 -mfma; MSVC /arch:AVX2, which has FMA but defines no
//     __FMA__): 8 floats, 6x16 tile
//   NEON (aarch64): 4 floats, 8x8 tile

#if !defined(MOE_NO_SIMD) && defined(__AVX512F__)
#  include <immintrin.h>
#  define MOE__SIMD_ISA MOE_ISA_AVX512
#  define MOE__HAS_SIMD 1
#  define MOE__VL 16
#  define MOE__MR 12
#elif !defined(MOE_NO_SIMD) && defined(__AVX2__) && (defined(__FMA__) || defined(_MSC_VER))
#  include <immintrin.h>
#  define MOE__SIMD_ISA MOE_ISA_AVX2
#  define MOE__HAS_SIMD 1
#  define MOE__VL 8
#  define MOE__MR 6
#elif !defined(MOE_NO_SIMD) && defined(__ARM_NEON) && defined(__aarch64__)
#  include <arm_neon.h>
#  define MOE__SIMD_ISA MOE_ISA_NEON
#  define MOE__HAS_SIMD 1
#  define MOE__VL 4
#  define MOE__MR 8
#else
#  define MOE__SIMD_ISA MOE_ISA_REFERENCE
#  define MOE__HAS_SIMD 0
#  define MOE__VL 4          /* layout constant of the packed format only */
#  define MOE__MR 1          /* no micro-kernel: workspace sizes only */
#endif
#define MOE__NR (2 * MOE__VL) /* register tile width: two vectors           */
/* moe__qpdot_simd, the decode layout's kernel (w.qpacked), needs AVX-512BW's
   byte operations; other builds do not read w.qpacked. */
#if MOE__HAS_SIMD && defined(__AVX512F__) && defined(__AVX512BW__)
#  define MOE__HAS_QPDOT 1
#else
#  define MOE__HAS_QPDOT 0
#endif

// ----------------------------------------------------------------------------
// Threads: the library cuts work into a flat list of independent tasks and
// hands it to cfg.parallel_for (the caller's pool), or to OpenMP when built
// with -fopenmp, or runs it serially. Every task writes its own outputs and
// sums in a fixed order, so results never depend on the thread count.

/* work: the list's cost in flops (or element moves); below MOE__PARALLEL_MIN
   it runs on the calling thread, where waking a pool would cost more than
   the work (measured on the 2-core AMD EPYC Zen 3 CI host: a T=16 layer
   took 100x longer when it was busy).                                    */
#define MOE__PARALLEL_MIN 2.0e6
static void moe__parallel_for(const moe_config *c, int32_t n, moe_task_fn fn, void *arg,
                              double work) {
    int32_t i;
    if (n <= 0) return;
    if (work < MOE__PARALLEL_MIN) { for (i = 0; i < n; i++) fn(arg, i); return; }
    if (c->parallel_for) { c->parallel_for(c->parallel_user, n, fn, arg); return; }
#ifdef _OPENMP
    if (n > 1 && c->num_threads != 1) {
        const int nt = c->num_threads > 0 ? c->num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (i = 0; i < n; i++) fn(arg, i);
        return;
    }
#endif
    for (i = 0; i < n; i++) fn(arg, i);
}

/* fn(arg, r0, r1) over [0, n) in blocks of `block` rows, as parallel tasks. */
typedef void (*moe__range_fn)(void *arg, int64_t r0, int64_t r1);
typedef struct moe__range_job { moe__range_fn fn; void *arg; int64_t n, block; } moe__range_job;
static void moe__range_task(void *arg, int32_t task) {
    const moe__range_job *j = (const moe__range_job *)arg;
    const int64_t r0 = (int64_t)task * j->block;
    j->fn(j->arg, r0, r0 + j->block < j->n ? r0 + j->block : j->n);
}
static void moe__parallel_rows(const moe_config *c, int64_t n, int64_t block, moe__range_fn fn,
                               void *arg, double work) {
    moe__range_job j;
    while (n / block >= INT32_MAX) block *= 2;   /* the task count is an int32 */
    j.fn = fn; j.arg = arg; j.n = n; j.block = block;
    if (n > 0) moe__parallel_for(c, (int32_t)((n + block - 1) / block), moe__range_task, &j, work);
}

/* One GEMM (moe__sgemm_fn contract) split into row blocks x column chunks. */
typedef struct moe__gemm_job {
    moe__sgemm_fn fn;
    int64_t m, depth;
    int32_t cols, rb, cb, n_cb;          /* row block, column chunk, chunks per row block */
    const float *A; size_t a_rs, a_cs;
    const float *B; size_t ldb;
    float *C; size_t ldc;
    int accumulate;
} moe__gemm_job;

static void moe__gemm_task(void *arg, int32_t task) {
    const moe__gemm_job *g = (const moe__gemm_job *)arg;
    const int64_t i0 = (int64_t)(task / g->n_cb) * g->rb;
    const int32_t j0 = (task % g->n_cb) * g->cb;
    const int64_t m = g->m - i0 < g->rb ? g->m - i0 : g->rb;
    const int32_t j1 = g->cols - j0 < g->cb ? g->cols : j0 + g->cb;
    g->fn(m, j0, j1, g->depth, g->A + (size_t)i0 * g->a_rs, g->a_rs, g->a_cs, g->B, g->ldb,
          g->C + (size_t)i0 * g->ldc, g->ldc, g->accumulate);
}

/* C[m][cols] (+)= A . B over the whole matrix, in parallel tasks of about
   MOE__TASK_FLOPS each (column chunks a multiple of the tile width).       */
#define MOE__TASK_FLOPS 4000000.0
static void moe__gemm(const moe_config *c, moe__sgemm_fn fn, int64_t m, int32_t cols, int64_t depth,
                      const float *A, size_t a_rs, size_t a_cs, const float *B, size_t ldb,
                      float *C, size_t ldc, int accumulate) {
    moe__gemm_job g;
    double tile_flops;
    int64_t n_rb;
    if (m <= 0 || cols <= 0) return;
    g.fn = fn;
    g.m = m; g.depth = depth; g.cols = cols;
    g.A = A; g.a_rs = a_rs; g.a_cs = a_cs; g.B = B; g.ldb = ldb; g.C = C; g.ldc = ldc;
    g.accumulate = accumulate;
    if (depth == 0) {            /* empty sum: C = 0 (or unchanged) */
        int64_t i;
        if (!accumulate)
            for (i = 0; i < m; i++) memset(C + (size_t)i * ldc, 0, (size_t)cols * sizeof(float));
        return;
    }
    /* blocks: whole tile rows, columns in NR multiples, ~TASK_FLOPS each */
    tile_flops = 2.0 * (double)depth * MOE__NR;
    g.rb = (int32_t)(m < 64 ? m : 64);
    g.cb = (int32_t)(MOE__TASK_FLOPS / (tile_flops * g.rb)) * MOE__NR;
    if (g.cb < MOE__NR) g.cb = MOE__NR;
    if (g.cb > cols) g.cb = cols;
    g.n_cb = (int32_t)moe__ceil_div(cols, g.cb);   /* cols + cb - 1 overflows near INT32_MAX */
    n_rb = moe__ceil_div(m, g.rb);
    while (n_rb * g.n_cb > INT32_MAX && g.rb <= INT32_MAX / 2) {   /* tasks are counted in int32 */
        g.rb *= 2;
        n_rb = moe__ceil_div(m, g.rb);
    }
    moe__parallel_for(c, (int32_t)(n_rb * g.n_cb), moe__gemm_task, &g,
                      2.0 * (double)m * cols * (double)depth);
}

/* The kernel table's parallel GEMM (moe__kernels.gemm) on the reference:
   moe__sgemm_ref in tasks (pack unused).                                  */
static void moe__gemm_par_ref(const moe_config *c, int64_t m, int32_t cols, int64_t depth,
                              const float *A, size_t a_rs, size_t a_cs, const float *B,
                              size_t ldb, float *C, size_t ldc, int accumulate, float *pack) {
    (void)pack;
    moe__gemm(c, moe__sgemm_ref, m, cols, depth, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
}

// ----------------------------------------------------------------------------
// Config: validation, defaults, presets

static int moe__bad_float(float v, float lo) { return !moe__isfinite(v) || v < lo; }
/* Documented ranges of float options (larger finite values gave NaN
   gradients with status OK). Generous: published models use <= 16.   */
#define MOE__COEF_MAX 1e6f     /* aux-loss coefficients, noise scales, |routed_scale| */
static int moe__out_of(float v, float lo, float hi) { return !(v >= lo && v <= hi); }

MOEDEF const char *moe_status_string(moe_status status) {
    switch (status) {
#define MOE__X(name, value, text) case MOE_STATUS_##name: return text;
    MOE__STATUS_LIST(MOE__X)
#undef MOE__X
    default: return "unknown moe_status";
    }
}

MOEDEF moe_isa moe_compiled_isa(void) { return MOE__SIMD_ISA; }

MOEDEF const char *moe_isa_name(moe_isa isa) {
    switch (isa) {
    case MOE_ISA_AUTO:      return "auto";
    case MOE_ISA_REFERENCE: return "reference";
    case MOE_ISA_AVX2:      return "avx2";
    case MOE_ISA_AVX512:    return "avx512";
    case MOE_ISA_NEON:      return "neon";
    default:                return "unknown";
    }
}

MOEDEF moe_status moe_config_resolve(const moe_config *cfg, moe_config *out) {
    moe_config c;
    int32_t group_size;
    if (!cfg || !out) return MOE_STATUS_NULL_ARGUMENT;
    c = *cfg;
    /* enums first: everything below switches on them */
    if ((int)c.activation < 0 || (int)c.activation > (int)MOE_ACT_SILU ||
        (int)c.routing < 0 || (int)c.routing > (int)MOE_ROUTING_SOFT ||
        (int)c.score < 0 || (int)c.score > (int)MOE_SCORE_SIGMOID ||
        (int)c.normalize < 0 || (int)c.normalize > (int)MOE_NORM_PNORM ||
        (int)c.noise < 0 || (int)c.noise > (int)MOE_NOISE_SHAZEER ||
        (int)c.second_expert < 0 || (int)c.second_expert > (int)MOE_SECOND_SAMPLED ||
        (int)c.drop_policy < 0 || (int)c.drop_policy > (int)MOE_DROP_WEIGHT ||
        (int)c.capacity_formula < 0 || (int)c.capacity_formula > (int)MOE_CAPACITY_VMOE ||
        (int)c.balance_loss < 0 || (int)c.balance_loss > (int)MOE_BALANCE_FIRST_CHOICE ||
        (int)c.isa < 0 || (int)c.isa > (int)MOE_ISA_NEON)
        return MOE_STATUS_BAD_ENUM;
    if (c.num_experts < 1 || c.d_model < 1 || c.d_ff < 1 || c.shared_d_ff < 0 ||
        c.slots_per_expert < 0 || c.seq_len < 0)
        return MOE_STATUS_BAD_DIMENSION;
    if (c.slots_per_expert == 0) c.slots_per_expert = 1;
    if ((int64_t)c.num_experts * c.slots_per_expert > INT32_MAX) return MOE_STATUS_BAD_DIMENSION;
    if (c.routing == MOE_ROUTING_TOPK && (c.top_k < 1 || c.top_k > c.num_experts))
        return MOE_STATUS_BAD_TOP_K;

    /* groups (top-k routing only reads them, but they must be coherent) */
    if (c.n_group < 0 || c.topk_group < 0 || c.group_score_top < 0) return MOE_STATUS_BAD_GROUPS;
    if (c.n_group == 0) c.n_group = 1;
    if (c.num_experts % c.n_group != 0) return MOE_STATUS_BAD_GROUPS;
    if (c.topk_group == 0) c.topk_group = c.n_group;
    if (c.group_score_top == 0) c.group_score_top = 1;
    group_size = c.num_experts / c.n_group;
    if (c.topk_group > c.n_group || c.group_score_top > group_size) return MOE_STATUS_BAD_GROUPS;
    if (c.routing == MOE_ROUTING_TOPK && (int64_t)c.topk_group * group_size < c.top_k)
        return MOE_STATUS_BAD_GROUPS;

    /* capacity */
    if (c.capacity < 0 || moe__bad_float(c.capacity_factor, 0.0f)) return MOE_STATUS_BAD_CAPACITY;
    if (c.routing == MOE_ROUTING_EXPERT_CHOICE && c.capacity == 0 && c.capacity_factor == 0.0f)
        return MOE_STATUS_BAD_CAPACITY;
    if ((c.routing == MOE_ROUTING_DENSE || c.routing == MOE_ROUTING_SOFT) &&
        (c.capacity != 0 || c.capacity_factor != 0.0f))
        return MOE_STATUS_BAD_CAPACITY;

    /* options that only make sense together */
    if (c.second_expert != MOE_SECOND_GREEDY && (c.routing != MOE_ROUTING_TOPK || c.top_k != 2))
        return MOE_STATUS_BAD_OPTION;
    if ((c.noise != MOE_NOISE_NONE || c.router_noise_std > 0.0f) && c.routing != MOE_ROUTING_TOPK)
        return MOE_STATUS_BAD_OPTION;
    if (c.shared_expert_gated && c.shared_d_ff == 0) return MOE_STATUS_BAD_OPTION;
    if (c.training < 0 || c.training > 1 || c.save_for_backward < 0 || c.save_for_backward > 1)
        return MOE_STATUS_BAD_OPTION;
    if (c.normalize == MOE_NORM_PNORM && c.norm_p == 0.0f) c.norm_p = 1.0f;
    if (c.second_threshold == 0.0f) c.second_threshold = 0.5f;
    if (c.routed_scale == 0.0f) c.routed_scale = 1.0f;
    if (moe__bad_float(c.norm_p, 0.0f) || (c.normalize == MOE_NORM_PNORM && c.norm_p < 1.0f) ||
        moe__bad_float(c.norm_eps, 0.0f) || moe__bad_float(c.second_threshold, 0.0f) ||
        moe__out_of(c.routed_scale, -MOE__COEF_MAX, MOE__COEF_MAX) ||
        moe__out_of(c.noise_epsilon, 0.0f, MOE__COEF_MAX) ||
        moe__bad_float(c.jitter, 0.0f) || c.jitter >= 1.0f ||
        moe__bad_float(c.router_grad_clip, 0.0f) ||
        moe__out_of(c.router_noise_std, 0.0f, MOE__COEF_MAX) ||
        moe__bad_float(c.expert_dropout, 0.0f) || c.expert_dropout >= 1.0f ||
        moe__out_of(c.balance_coef, 0.0f, MOE__COEF_MAX) ||
        moe__out_of(c.z_loss_coef, 0.0f, MOE__COEF_MAX) ||
        moe__out_of(c.importance_coef, 0.0f, MOE__COEF_MAX) ||
        moe__out_of(c.load_coef, 0.0f, MOE__COEF_MAX) ||
        moe__out_of(c.seq_balance_coef, 0.0f, MOE__COEF_MAX))
        return MOE_STATUS_BAD_OPTION;

    /* the reference and the one SIMD ISA this file was compiled for */
    if (c.isa == MOE_ISA_AUTO) c.isa = MOE__SIMD_ISA;
    if (c.isa != MOE_ISA_REFERENCE && c.isa != MOE__SIMD_ISA) return MOE_STATUS_UNSUPPORTED;
    if (c.num_threads < 0 || c.pack_bf16 < 0 || c.pack_bf16 > 2) return MOE_STATUS_BAD_OPTION;
    *out = c;
    return MOE_STATUS_OK;
}

MOEDEF int32_t moe_routing_slots(const moe_config *cfg) {
    if (!cfg) return 0;
    switch (cfg->routing) {
    case MOE_ROUTING_TOPK: return cfg->top_k;
    case MOE_ROUTING_EXPERT_CHOICE: case MOE_ROUTING_DENSE: return cfg->num_experts;
    default: return 0;
    }
}

/* Presets. Shapes are the released models'; routing fields: docs/ROUTING.md, "Presets". */
static moe_config moe__preset(int32_t E, int32_t K, int32_t D, int32_t F) {
    moe_config c;
    memset(&c, 0, sizeof c);
    c.num_experts = E; c.top_k = K; c.d_model = D; c.d_ff = F;
    return c;
}
MOEDEF moe_config moe_preset_mixtral(void) {   /* softmax, top-2, renormalise */
    moe_config c = moe__preset(8, 2, 4096, 14336);
    c.balance_loss = MOE_BALANCE_TOPK; c.balance_coef = 0.02f;
    return c;
}
MOEDEF moe_config moe_preset_switch(void) {    /* top-1, raw p, capacity, jitter */
    moe_config c = moe__preset(8, 1, 768, 3072);
    c.activation = MOE_ACT_RELU; c.normalize = MOE_NORM_NONE;
    c.capacity_factor = 1.25f; c.jitter = 0.01f;
    c.balance_loss = MOE_BALANCE_TOPK; c.balance_coef = 0.01f; c.z_loss_coef = 0.001f;
    return c;
}
MOEDEF moe_config moe_preset_gshard(void) {    /* top-2, random 2nd, C = 2S/E */
    moe_config c = moe__preset(2048, 2, 1024, 8192);
    c.activation = MOE_ACT_RELU; c.second_expert = MOE_SECOND_RANDOM; c.second_threshold = 0.5f;
    c.capacity_factor = 1.0f; c.drop_policy = MOE_DROP_POSITION;
    c.balance_loss = MOE_BALANCE_FIRST_CHOICE; c.balance_coef = 0.01f;
    return c;
}
MOEDEF moe_config moe_preset_shazeer(void) {   /* noisy top-k, t2t epsilon */
    moe_config c = moe__preset(32, 4, 512, 1024);
    c.activation = MOE_ACT_RELU; c.noise = MOE_NOISE_SHAZEER; c.noise_epsilon = 0.01f;
    c.importance_coef = 0.01f; c.load_coef = 0.01f;
    return c;
}
MOEDEF moe_config moe_preset_qwen2_moe(void) { /* no renorm, gated shared expert */
    moe_config c = moe__preset(60, 4, 2048, 1408);
    c.normalize = MOE_NORM_NONE; c.shared_d_ff = 5632; c.shared_expert_gated = 1;
    c.balance_coef = 0.001f;
    return c;
}
MOEDEF moe_config moe_preset_qwen3_moe(void) {
    moe_config c = moe__preset(128, 8, 2048, 768);
    c.balance_coef = 0.001f;
    return c;
}
MOEDEF moe_config moe_preset_olmoe(void) {     /* no renorm, z-loss */
    moe_config c = moe__preset(64, 8, 2048, 1024);
    c.normalize = MOE_NORM_NONE; c.balance_coef = 0.01f; c.z_loss_coef = 0.001f;
    return c;
}
MOEDEF moe_config moe_preset_dbrx(void) {      /* w / ||w||_p, p = 1 */
    moe_config c = moe__preset(16, 4, 6144, 10752);
    c.normalize = MOE_NORM_PNORM; c.norm_p = 1.0f; c.balance_coef = 0.05f;
    return c;
}
MOEDEF moe_config moe_preset_jamba(void) {     /* no renorm */
    moe_config c = moe__preset(16, 2, 4096, 14336);
    c.normalize = MOE_NORM_NONE; c.balance_coef = 0.001f;
    return c;
}
MOEDEF moe_config moe_preset_deepseek_v2(void) { /* group-limited greedy, x16 */
    moe_config c = moe__preset(160, 6, 5120, 1536);
    c.normalize = MOE_NORM_NONE; c.n_group = 8; c.topk_group = 3; c.group_score_top = 1;
    c.routed_scale = 16.0f; c.shared_d_ff = 2 * 1536;
    c.balance_loss = MOE_BALANCE_TOPK_NORMALIZED; c.balance_coef = 0.001f;
    return c;
}
MOEDEF moe_config moe_preset_deepseek_v3(void) { /* sigmoid, noaux_tc */
    moe_config c = moe__preset(256, 8, 7168, 2048);
    c.score = MOE_SCORE_SIGMOID; c.selection_bias = 1;
    c.n_group = 8; c.topk_group = 4; c.group_score_top = 2;
    c.normalize = MOE_NORM_SUM; c.norm_eps = 1e-20f; c.routed_scale = 2.5f;
    c.shared_d_ff = 2048; c.seq_balance_coef = 1e-4f;
    return c;
}
MOEDEF moe_config moe_preset_expert_choice(void) { /* EC-CF2 */
    moe_config c = moe__preset(64, 0, 1024, 4096);
    c.routing = MOE_ROUTING_EXPERT_CHOICE; c.activation = MOE_ACT_GELU;
    c.normalize = MOE_NORM_NONE; c.capacity_factor = 2.0f;
    return c;
}
MOEDEF moe_config moe_preset_soft_moe(void) {  /* Soft MoE S/16, 128 experts */
    moe_config c = moe__preset(128, 0, 384, 1536);
    c.routing = MOE_ROUTING_SOFT; c.activation = MOE_ACT_GELU; c.slots_per_expert = 1;
    return c;
}
MOEDEF moe_config moe_preset_glam(void) {      /* GLaM 64B/64E: D 8192, F 32768 */
    moe_config c = moe__preset(64, 2, 8192, 32768);
    c.activation = MOE_ACT_GEGLU; c.balance_coef = 0.01f;
    return c;
}
MOEDEF moe_config moe_preset_topk_softmax(void) {
    /* softmax over the k kept logits = p_j / sum of the kept p: the renormalised top-k
       of moe_preset_mixtral, with Mixtral's shape (docs/ROUTING.md, "Gate weights") */
    return moe_preset_mixtral();
}
MOEDEF moe_config moe_preset_dense(void) {
    moe_config c = moe__preset(8, 0, 1024, 4096);
    c.routing = MOE_ROUTING_DENSE; c.normalize = MOE_NORM_NONE;
    return c;
}

// ----------------------------------------------------------------------------
// Capacity (docs/ROUTING.md, "Capacity")

static double moe__round_half_even(double v) {
    double f = floor(v), d = v - f;
    if (d > 0.5) return f + 1.0;
    if (d < 0.5) return f;
    return fmod(f, 2.0) == 0.0 ? f : f + 1.0;
}
static double moe__round_up_to(double v, double m) { return ceil(v / m) * m; }

MOEDEF moe_status moe_capacity(moe_capacity_formula formula, int32_t num_tokens,
                               int32_t num_experts, int32_t top_k,
                               float capacity_factor, int32_t *out_capacity) {
    double S = num_tokens, E = num_experts, K = top_k, cf = capacity_factor, C;
    if (!out_capacity) return MOE_STATUS_NULL_ARGUMENT;
    if (num_tokens < 0 || num_experts < 1) return MOE_STATUS_BAD_DIMENSION;
    if (top_k < 1 || top_k > num_experts) return MOE_STATUS_BAD_TOP_K;
    if (!moe__isfinite(capacity_factor) || capacity_factor <= 0.0f) return MOE_STATUS_BAD_CAPACITY;
    switch (formula) {
    case MOE_CAPACITY_MEGATRON:     C = ceil(cf * S * K / E); break;
    case MOE_CAPACITY_FAIRSEQ_TOP1: C = floor(cf * ceil(S / E)); break;
    case MOE_CAPACITY_FAIRSEQ_TOP2: C = 2.0 * ceil(S / E); break;
    case MOE_CAPACITY_DEEPSPEED:    C = fmax(ceil(cf * S * K / E), 4.0); break;
    case MOE_CAPACITY_LINGVO:       C = floor(cf * S / E);
                                    C = moe__round_up_to(C == 0.0 ? 4.0 : C, 4.0); break;
    case MOE_CAPACITY_MESH:         C = fmax(fmin(S, floor(cf * S / E)), 4.0); break;
    case MOE_CAPACITY_FLAXFORMER:   C = fmax(moe__round_half_even(cf * S / E), 4.0); break;
    case MOE_CAPACITY_VMOE:         C = fmax(moe__round_up_to(ceil(cf * S * K / E), 4.0), 1.0);
                                    break;
    default: return MOE_STATUS_BAD_ENUM;
    }
    *out_capacity = C > 2147483647.0 ? 2147483647 : (int32_t)C;
    return MOE_STATUS_OK;
}

/* C of one call from a resolved config; 0 = dropless. Expert choice uses K = 1
   (k_c = T*c/E) and cannot take more than the T tokens there are.           */
static int32_t moe__capacity_of(const moe_config *c, int32_t T) {
    int32_t C = c->capacity;
    if (C == 0 && c->capacity_factor > 0.0f) {
        int32_t K = c->routing == MOE_ROUTING_TOPK ? c->top_k : 1;
        if (moe_capacity(c->capacity_formula, T, c->num_experts, K, c->capacity_factor,
                         &C) != MOE_STATUS_OK)
            C = 0;   /* unreachable for a resolved config */
    }
    if (c->routing == MOE_ROUTING_EXPERT_CHOICE && C > T) C = T;
    return C;
}

// ----------------------------------------------------------------------------
// Workspace layout: one function computes every offset, so the size query and
// the kernels cannot disagree (miniaudio's _get_heap_size pattern).

/* Top-k routing runs token chunks as parallel tasks. The chunking depends on
   T only (at most MOE__ROUTE_CHUNKS chunks of >= MOE__ROUTE_MIN_TOKENS), and
   the per-chunk Shazeer sums are added in chunk order: the same bits for
   any thread count. A chunk's scratch, in doubles: imp [2E], then the
   token's key [2E], small_f [2E + 2] (floats) and small_i [2E + 2] (int32). */
#define MOE__ROUTE_CHUNKS 32
#define MOE__ROUTE_MIN_TOKENS 32
static int32_t moe__route_nchunk(size_t T) {
    const size_t n = (T + MOE__ROUTE_MIN_TOKENS - 1) / MOE__ROUTE_MIN_TOKENS;
    return (int32_t)(n < MOE__ROUTE_CHUNKS ? n : MOE__ROUTE_CHUNKS);
}
static size_t moe__route_chunk_doubles(int32_t E) {
    const size_t e = (size_t)(E > 0 ? E : 0);
    return 2 * e + (2 * e + (2 * e + 2) + (2 * e + 2) + 1) / 2;   /* 4-byte items, rounded up */
}

/* Floats of the packed operands of an m x cols x depth product (moe__gemm_par_simd):
   A in whole MR-row tiles and B in whole NR-column panels, depth deep.        */
static size_t moe__gemm_pack_floats(int64_t m, int64_t cols, int64_t depth) {
    return moe__mul((size_t)((m + MOE__MR - 1) / MOE__MR) * MOE__MR +
                    (size_t)((cols + MOE__NR - 1) / MOE__NR) * MOE__NR,
                    (size_t)depth);
}

/* Packed-operand scratch (floats) for moe__experts_backward_simd on an FFN
   of width F over at most n rows: the largest of its four GEMM shapes.    */
static size_t moe__backward_pack_floats(const moe_config *c, size_t n, size_t F) {
    const int64_t D = c->d_model, Fi = (int64_t)F,
                  ni = (int64_t)(n < (size_t)INT64_MAX / 2 ? n : (size_t)INT64_MAX / 2);
    const size_t s[4] = {moe__gemm_pack_floats(ni, Fi, D), moe__gemm_pack_floats(D, Fi, ni),
                         moe__gemm_pack_floats(Fi, D, ni), moe__gemm_pack_floats(ni, D, Fi)};
    size_t m = 0;
    int i;
    if (c->isa == MOE_ISA_REFERENCE) return 0;
    for (i = 0; i < 4; i++) m = s[i] > m ? s[i] : m;
    return m;
}

/* The workspace's arrays, (element type, name), in the order the planner
   reserves them. moe__plan gives each an offset in a moe__layout (no bytes
   where a call needs none); moe__ws_bind turns the offsets into the typed
   pointers of a moe__ws, which the stages read their arrays from. Shapes
   are in the planner (moe__plan_routing / _forward / _forward_simd / _backward). */
#define MOE__WS_ARRAYS(X)                                                                      \
    /* routing (moe_route and moe_forward): the info arrays, then scratch */                   \
    X(float, scores) X(float, dispatch) X(int32_t, expert) X(float, weight)                    \
    X(uint8_t, dropped) X(int32_t, routed) X(int32_t, kept)                                    \
    X(float, key) X(int32_t, order) X(int32_t, order_tmp) X(int32_t, small_i)                  \
    X(float, small_f) X(int32_t, count) X(double, imp)                                         \
    X(double, route_chunks)   /* per-chunk scratch of the token-parallel top-k */              \
    X(double, stats)          /* the batch statistics the aux losses come from */              \
    /* the forward: router input and logits, dispatch, expert rows, shared expert */           \
    X(float, logits) X(float, noise_logits) X(float, xr) X(float, slot_norm)                   \
    X(int64_t, pair_row) X(int64_t, offsets) X(int64_t, row_pair) X(int64_t, row_key)          \
    X(float, xg) X(float, hg) X(float, hu) X(float, ha) X(float, out)                          \
    X(float, sh_g) X(float, sh_u) X(float, sh_a) X(float, sh_out) X(float, sh_gamma)           \
    /* the SIMD forward: tile results, task lists, the router's W^T, packed operands */        \
    X(float, tiles) X(float, sh_tiles) X(int64_t, task_off) X(int32_t, task_panels)            \
    X(float, router_t) X(float, pack) X(int64_t, tile_off) X(float, apack)                     \
    /* the backward: gradients of the rows and routing, the router's scratch */                \
    X(float, gw) X(float, dout) X(float, da) X(float, du) X(float, dxg)                        \
    X(float, dscore) X(float, dz) X(float, dsig) X(float, d_dispatch)                          \
    X(float, sh_dout) X(float, sh_da) X(float, sh_du) X(float, sh_dx) X(float, dx)             \
    X(float, gamma) X(double, rbw_f64) X(float, rbw_f32) X(uint8_t, rbw_u8)                    \
    X(float, tmp_x)        /* [T][D] */                                                       \
    X(float, gemm_pack)    /* packed GEMM operands of the backward (SIMD) */              \
    X(int32_t, pair_slot)  /* an expert-parallel owner's received slots (capacity) */

#define MOE__WS_OFFSET(type, name) size_t name;
#define MOE__WS_POINTER(type, name) type *name;
typedef struct moe__layout {
    int32_t R, S, C;      /* router columns, slots per token, capacity        */
    int64_t N;            /* rows the grouped FFN may see                     */
    MOE__WS_ARRAYS(MOE__WS_OFFSET)
    size_t total;         /* bytes, including slack to align the base pointer */
} moe__layout;
typedef struct moe__ws {
    int32_t R, S, C;
    int64_t N;
    MOE__WS_ARRAYS(MOE__WS_POINTER)
} moe__ws;
#undef MOE__WS_OFFSET
#undef MOE__WS_POINTER

enum { MOE__PLAN_ROUTE = 0, MOE__PLAN_FORWARD = 1, MOE__PLAN_BACKWARD = 2 };

/* The planner's sizes, computed once from the config and T. */
typedef struct moe__plan_dims {
    size_t nT, E, D, F, Fs, R, S, TR, TS, N, big;
    int glu;
} moe__plan_dims;

/* Routing arrays and scratch: moe_route's, and the first part of every plan. */
static void moe__plan_routing(const moe_config *c, const moe__plan_dims *d, moe__layout *lay,
                              size_t *t, int *ok) {
    lay->scores    = moe__reserve(t, d->TR, sizeof(float), ok);
    lay->dispatch  = moe__reserve(t, c->routing == MOE_ROUTING_SOFT ? d->TR : 0, sizeof(float),
                                ok);
    lay->expert    = moe__reserve(t, d->TS, sizeof(int32_t), ok);
    lay->weight    = moe__reserve(t, d->TS, sizeof(float), ok);
    lay->dropped   = moe__reserve(t, d->TS, sizeof(uint8_t), ok);
    lay->routed    = moe__reserve(t, d->E, sizeof(int32_t), ok);
    lay->kept      = moe__reserve(t, d->E, sizeof(int32_t), ok);
    lay->key       = moe__reserve(t, d->big + d->R, sizeof(float), ok);
    lay->order     = moe__reserve(t, d->big, sizeof(int32_t), ok);
    lay->order_tmp = moe__reserve(t, d->big, sizeof(int32_t), ok);
    lay->small_i   = moe__reserve(t, 2 * d->E + 2, sizeof(int32_t), ok);
    lay->small_f   = moe__reserve(t, 2 * d->E + 2, sizeof(float), ok);
    lay->count     = moe__reserve(t, d->E, sizeof(int32_t), ok);
    lay->imp       = moe__reserve(t, 2 * d->E, sizeof(double), ok);
    lay->route_chunks = moe__reserve(t, (size_t)moe__route_nchunk(d->nT) *
                                          moe__route_chunk_doubles(d->E),
                                   sizeof(double), ok);
    lay->stats = moe__reserve(t, MOE__EPS_VECS * d->E + 2, sizeof(double), ok);
}

/* The forward's arrays: logits, the dispatch, the expert FFNs' rows. */
static void moe__plan_forward(const moe_config *c, const moe__plan_dims *d, int mode,
                              moe__layout *lay, size_t *t, int *ok) {
    /* the backward always rebuilds the router input x * U here */
    int jitter = (c->training && c->jitter > 0.0f) || mode == MOE__PLAN_BACKWARD;
    lay->logits       = moe__reserve(t, d->TR, sizeof(float), ok);
    lay->noise_logits = moe__reserve(t, c->noise == MOE_NOISE_SHAZEER ? moe__mul(d->nT, d->E) : 0,
                                   sizeof(float), ok);
    lay->xr           = moe__reserve(t, jitter ? moe__mul(d->nT, d->D) : 0, sizeof(float), ok);
    lay->slot_norm    = moe__reserve(t, c->routing == MOE_ROUTING_SOFT ? d->R : 0,
                                   sizeof(float), ok);
    lay->pair_row     = moe__reserve(t, d->TS, sizeof(int64_t), ok);
    lay->offsets      = moe__reserve(t, d->E + 1, sizeof(int64_t), ok);
    lay->row_pair     = moe__reserve(t, d->N, sizeof(int64_t), ok);
    lay->xg           = moe__reserve(t, moe__mul(d->N, d->D), sizeof(float), ok);
    lay->hg           = moe__reserve(t, moe__mul(d->N, d->F), sizeof(float), ok);
    lay->hu           = moe__reserve(t, d->glu ? moe__mul(d->N, d->F) : 0, sizeof(float), ok);
    lay->ha           = moe__reserve(t, moe__mul(d->N, d->F), sizeof(float), ok);
    lay->out          = moe__reserve(t, moe__mul(d->N, d->D), sizeof(float), ok);
    lay->sh_g         = moe__reserve(t, moe__mul(d->nT, d->Fs), sizeof(float), ok);
    lay->sh_u         = moe__reserve(t, d->glu ? moe__mul(d->nT, d->Fs) : 0, sizeof(float), ok);
    lay->sh_a         = moe__reserve(t, moe__mul(d->nT, d->Fs), sizeof(float), ok);
    lay->sh_out       = moe__reserve(t, d->Fs ? moe__mul(d->nT, d->D) : 0, sizeof(float), ok);
    lay->sh_gamma     = moe__reserve(t, c->shared_expert_gated ? d->nT : 0, sizeof(float), ok);
}

/* What the SIMD forward adds: packed-panel tiles, task lists, packed A. */
static void moe__plan_forward_simd(const moe__plan_dims *d, moe__layout *lay, size_t *t,
                                   int *ok) {
    /* packed-panel tile results: N x (panels * NR), the wider stage */
    const size_t fc = d->glu ? MOE__VL : MOE__NR, p2 = (d->D + MOE__NR - 1) / MOE__NR;
    const size_t p1 = (d->F + fc - 1) / fc, p1s = (d->Fs + fc - 1) / fc;
    const size_t e_pad = (d->E + MOE__NR - 1) / MOE__NR * MOE__NR;
    const size_t a_rows = moe__add(d->N, d->E * MOE__MR);   /* N may have saturated */
    const size_t a_max = a_rows > d->nT + MOE__MR ? a_rows : d->nT + MOE__MR;
    const size_t p1_max = p1 > p1s ? p1 : p1s, f_max = d->F > d->Fs ? d->F : d->Fs;
    const size_t k_max = d->D > f_max ? d->D : f_max;   /* A's widest row */
    lay->tiles       = moe__reserve(t, moe__mul(d->N, (p1 > p2 ? p1 : p2) * MOE__NR),
                                  sizeof(float), ok);
    lay->sh_tiles    = moe__reserve(t,
                                  d->Fs ? moe__mul(d->nT, (p1s > p2 ? p1s : p2) * MOE__NR) : 0,
                                  sizeof(float), ok);
    lay->task_off    = moe__reserve(t, d->E + 2, sizeof(int64_t), ok);
    lay->task_panels = moe__reserve(t, d->E + 1, sizeof(int32_t), ok);
    lay->router_t    = moe__reserve(t, moe__mul(d->D, e_pad), sizeof(float), ok);
    /* A as k-major MR-row tiles: each expert's last tile padded */
    lay->tile_off    = moe__reserve(t, d->E + 2, sizeof(int64_t), ok);
    lay->apack       = moe__reserve(t, moe__mul(a_max, k_max), sizeof(float), ok);
    /* one expert's panels, for weights that come unpacked (rows rounded up to even) */
    lay->pack        = moe__reserve(t, moe__add(moe__mul(d->D + (d->D & 1), p1_max * MOE__NR),
                                               moe__mul(p2 * MOE__NR, f_max + 1)),
                                  sizeof(float), ok);
}

/* The backward's arrays: gradients of the rows, the router's scratch and
   the packed operands of its GEMMs. */
static void moe__plan_backward(const moe_config *c, const moe__plan_dims *d, moe__layout *lay,
                               size_t *t, int *ok) {
    lay->gw      = moe__reserve(t, d->TS, sizeof(float), ok);
    lay->dout    = moe__reserve(t, moe__mul(d->N, d->D), sizeof(float), ok);
    lay->da      = moe__reserve(t, moe__mul(d->N, d->F), sizeof(float), ok);
    lay->du      = moe__reserve(t, d->glu ? moe__mul(d->N, d->F) : 0, sizeof(float), ok);
    lay->dxg     = moe__reserve(t, moe__mul(d->N, d->D), sizeof(float), ok);
    lay->dscore  = moe__reserve(t, d->TR, sizeof(float), ok);
    lay->dz      = moe__reserve(t, d->TR, sizeof(float), ok);
    lay->dsig    = moe__reserve(t, c->noise == MOE_NOISE_SHAZEER ? moe__mul(d->nT, d->E) : 0,
                              sizeof(float), ok);
    lay->d_dispatch = moe__reserve(t, c->routing == MOE_ROUTING_SOFT ? d->TR : 0, sizeof(float),
                                 ok);
    lay->sh_dout = moe__reserve(t, d->Fs ? moe__mul(d->nT, d->D) : 0, sizeof(float), ok);
    lay->sh_da   = moe__reserve(t, moe__mul(d->nT, d->Fs), sizeof(float), ok);
    lay->sh_du   = moe__reserve(t, d->glu ? moe__mul(d->nT, d->Fs) : 0, sizeof(float), ok);
    lay->sh_dx   = moe__reserve(t, d->Fs ? moe__mul(d->nT, d->D) : 0, sizeof(float), ok);
    lay->dx      = moe__reserve(t, moe__mul(d->nT, d->D), sizeof(float), ok);
    lay->gamma   = moe__reserve(t, d->nT, sizeof(float), ok);
    lay->rbw_f64 = moe__reserve(t, 8 * d->E, sizeof(double), ok);
    lay->rbw_f32 = moe__reserve(t, 6 * d->E, sizeof(float), ok);
    lay->rbw_u8  = moe__reserve(t, 2 * d->E, sizeof(uint8_t), ok);
    lay->tmp_x   = moe__reserve(t, moe__mul(d->nT, d->D), sizeof(float), ok);
    {   /* the largest of the expert, shared-expert and router GEMMs */
        const size_t routed = moe__backward_pack_floats(c, d->N, d->F),
                     shared = d->Fs ? moe__backward_pack_floats(c, d->nT, d->Fs) : 0;
        size_t most = routed > shared ? routed : shared;
        if (c->isa != MOE_ISA_REFERENCE) {
            /* r1: dW_router, r2: dz . W */
            const size_t r1 = moe__gemm_pack_floats((int64_t)d->E, (int64_t)d->D, (int64_t)d->nT);
            const size_t r2 = moe__gemm_pack_floats((int64_t)d->nT, (int64_t)d->D, (int64_t)d->E);
            if (r1 > most) most = r1;
            if (r2 > most) most = r2;
        }
        lay->gemm_pack = moe__reserve(t, most, sizeof(float), ok);
    }
}

/* The call's shapes: router columns R, slots S, capacity C, FFN rows N. */
static void moe__plan_shapes(const moe_config *c, int32_t T, moe__layout *lay) {
    const size_t TS = moe__mul((size_t)T, (size_t)moe_routing_slots(c));
    memset(lay, 0, sizeof *lay);
    lay->R = c->routing == MOE_ROUTING_SOFT ? c->num_experts * c->slots_per_expert : c->num_experts;
    lay->S = moe_routing_slots(c);
    lay->C = moe__capacity_of(c, T);
    switch (c->routing) {
    case MOE_ROUTING_TOPK:
    case MOE_ROUTING_DENSE:         lay->N = (int64_t)TS; break;
    case MOE_ROUTING_EXPERT_CHOICE:
        lay->N = (int64_t)moe__mul((size_t)c->num_experts, (size_t)lay->C); break;
    default:                        lay->N = lay->R; break;   /* Soft MoE: one row per slot */
    }
}

static moe_status moe__plan(const moe_config *c, int32_t T, int mode, moe__layout *lay) {
    moe__plan_dims d;
    size_t t = 0, nT = (size_t)T, E = (size_t)c->num_experts, R, S, TR, TS, N;
    int ok = 1;
    moe__plan_shapes(c, T, lay);
    R = (size_t)lay->R; S = (size_t)lay->S;
    TR = moe__mul(nT, R); TS = moe__mul(nT, S);
    N = (size_t)lay->N;
    d.nT = nT; d.E = E; d.D = (size_t)c->d_model; d.F = (size_t)c->d_ff;
    d.Fs = (size_t)c->shared_d_ff; d.R = R; d.S = S; d.TR = TR; d.TS = TS; d.N = N;
    d.big = nT > R ? nT : R;
    if (c->routing == MOE_ROUTING_TOPK && lay->C > 0) {   /* capacity sorts the T x S pairs */
        if (TS > (size_t)INT32_MAX) return MOE_STATUS_SIZE_OVERFLOW;
        if (TS > d.big) d.big = TS;
    }
    d.glu = moe__act_is_glu(c->activation);
    moe__plan_routing(c, &d, lay, &t, &ok);
    if (mode >= MOE__PLAN_FORWARD) moe__plan_forward(c, &d, mode, lay, &t, &ok);
    if (mode >= MOE__PLAN_FORWARD && c->isa != MOE_ISA_REFERENCE)
        moe__plan_forward_simd(&d, lay, &t, &ok);
    if (mode == MOE__PLAN_BACKWARD) moe__plan_backward(c, &d, lay, &t, &ok);
    if (!ok || t > (size_t)-1 - MOE__ALIGN) return MOE_STATUS_SIZE_OVERFLOW;
    lay->total = t + MOE__ALIGN;   /* slack: the caller's pointer need not be aligned */
    return MOE_STATUS_OK;
}

static unsigned char *moe__align_ptr(void *p) {
    uintptr_t u = (uintptr_t)p;
    return (unsigned char *)p + ((MOE__ALIGN - (u % MOE__ALIGN)) % MOE__ALIGN);
}
#define MOE__AT(base, off, type) ((type *)(void *)((base) + (off)))

/* The typed arrays of a planned workspace whose aligned base is b. */
static moe__ws moe__ws_bind(const moe__layout *lay, unsigned char *b) {
    moe__ws ws;
    ws.R = lay->R; ws.S = lay->S; ws.C = lay->C; ws.N = lay->N;
#define MOE__WS_BIND(type, name) ws.name = MOE__AT(b, lay->name, type);
    MOE__WS_ARRAYS(MOE__WS_BIND)
#undef MOE__WS_BIND
    return ws;
}

// ----------------------------------------------------------------------------
// The kernel table: the contract between the stages and the kernels. An
// expert set (moe__ffn), its gradients, and the entries every ISA provides.

/* One set of experts in nn.Linear layout; expert e's tensors start at
   e * *_stride elements (the shared expert is a set of one). The same struct
   describes the gradient tensors (moe_grads), whose pointers it casts back. */
typedef struct moe__ffn {
    const float *gate, *up, *down;                 /* [F][D], [F][D], [D][F] each */
    const float *gate_bias, *up_bias, *down_bias;  /* [F], [F], [D] each or NULL  */
    size_t gate_stride, up_stride, down_stride;
    moe__qmat gate_q, up_q, down_q;                /* blocks instead (data set)   */
    /* the same blocks in moe_qpack_weights's groups (read where the build has
       moe__qpdot_simd), expert e's at *_qp + e * *_qps; NULL: none */
    const unsigned char *gate_qp, *up_qp, *down_qp;
    size_t gate_qps, up_qps, down_qps;
    int32_t D, F;
    moe_activation act;
    const moe_config *dropout;   /* non-NULL: expert dropout on (routed experts, training) */
    const int64_t *row_key;      /* row -> dropout key (the pair t*S + j); NULL: the row */
} moe__ffn;

/* Gradient tensors of one expert set, laid out like moe__ffn. */
typedef struct moe__ffn_grad {
    float *gate, *up, *down, *gate_bias, *up_bias, *down_bias;
} moe__ffn_grad;

/* The kernel table: the kernels of one ISA, picked once per call by
   moe__kernels_of(cfg) from the resolved cfg.isa. Stages and drivers call
   through it and never test the ISA. The _ref entries are plain loops, the
   spec; a SIMD build's _simd entries have the same signatures and contracts
   (tests/test_isa.c compares the twins on ragged shapes).                  */
typedef struct moe__kernels {
    moe_isa isa;
    /* C (+)= A . B as moe__sgemm_ref, in parallel tasks; pack: scratch of
       moe__backward_pack_floats for packed operands (the SIMD kernel's) */
    void (*gemm)(const moe_config *c, int64_t m, int32_t cols, int64_t depth, const float *A,
                 size_t a_rs, size_t a_cs, const float *B, size_t ldb, float *C, size_t ldc,
                 int accumulate, float *pack);
    /* y[T][E] = x . W^T + bias, the router's small GEMM */
    void (*linear)(const moe_config *c, float *y, const float *x, const float *W,
                   const float *bias, int32_t T, int32_t E, int32_t D, const moe__ws *ws);
    /* y = w x or y += w x;  <a, b> */
    void (*add_scaled)(float *y, const float *x, float w, size_t n, int accumulate);
    float (*dot)(const float *a, const float *b, size_t n);
    /* activation backward over elements [i0, i1) (moe__act_backward_ref) */
    void (*act_backward)(moe_activation act, float *dh, float *du, const float *hg,
                         const float *hu, float *ha, size_t i0, size_t i1);
    /* expert FFNs of a set over expert-contiguous rows (moe__experts_forward_ref);
       packed_set: the set's panels in w.packed, or NULL */
    void (*experts)(const moe_config *c, const moe__ffn *f, const unsigned char *packed_set,
                    int32_t n_sets, const int64_t *off, const float *x, float *hg, float *hu,
                    float *ha, float *out, float *tiles, const moe__ws *ws);
    /* their backward (moe__experts_backward_ref) */
    void (*experts_backward)(const moe_config *c, const moe__ffn *f, const moe__ffn_grad *g,
                             int32_t n_sets, const int64_t *off, const float *x,
                             const float *hg, const float *hu, float *ha, int rebuild_ha,
                             const float *dout, float *dh, float *du, float *dx, float *pack);
} moe__kernels;
static const moe__kernels *moe__kernels_of(const moe_config *c);

// ----------------------------------------------------------------------------
// Routing: scores -> selection -> capacity -> gate weights -> aux losses.
// Results go to a moe_info whose arrays point into the workspace; the public
// calls copy them out only once everything succeeded.

typedef struct moe__router {
    const moe_config *c;
    int32_t T, R, S, C;
    const float *logits;        /* [T][R]                                     */
    const float *noise_logits;  /* [T][E] raw x.W_noise (Shazeer) or NULL     */
    const float *sel_bias;      /* [E] or NULL                                */
    const float *noise_samples; /* [T][E] N(0,1) draws to use instead of the
                                   RNG (test seam: N of docs/ROUTING.md, "Noisy top-k") or NULL */
    int32_t t0;                 /* global index of token 0 (expert parallel):
                                   random draws are keyed by global tokens    */
    moe_info *res;              /* arrays in the workspace                    */
    float *key;                 /* scratch: >= max(T, R) + R floats           */
    int32_t *order, *order_tmp; /* scratch: max(T, R) each                    */
    int32_t *small_i;           /* scratch: 2E + 2                            */
    float *small_f;             /* scratch: 2E + 2                            */
    int32_t *count;             /* scratch: E                                 */
    double *imp;                /* [2E]: Shazeer importance, then load        */
    double *chunks;             /* token-chunk scratch (moe__route_nchunk)    */
    double *stats;              /* [MOE__EPS_VECS E + 2] batch statistics     */
} moe__router;

/* The scratch one token's top-k routing writes (one set per token chunk). */
typedef struct moe__token_scratch {
    float *key, *small_f;       /* [2E], [2E + 2]                             */
    int32_t *small_i;           /* [2E + 2]                                   */
    double *imp;                /* [2E]: this chunk's importance and load     */
} moe__token_scratch;

/* Jitter factor U[t][d] the forward multiplied the router input by (1 without). */
static float moe__jitter_factor(const moe_config *c, size_t i) {
    if (!(c->training && c->jitter > 0.0f)) return 1.0f;
    return (float)(1.0 - c->jitter +
                   2.0 * c->jitter * moe__rng_uniform(c->seed, MOE__RNG_JITTER, i));
}

/* The router's input for n elements of x: x itself, or with input jitter in
   training x * U, U keyed by the global element index off + i, into xj.
   The forward, the backward and the expert-parallel calls all build it here. */
static const float *moe__router_input(const moe_config *c, const float *x, size_t n, size_t off,
                                      float *xj) {
    size_t i;
    if (!(c->training && c->jitter > 0.0f)) return x;
    for (i = 0; i < n; i++) xj[i] = x[i] * moe__jitter_factor(c, off + i);
    return xj;
}

/* The kernel table's router GEMM (moe__kernels.linear), y[T][E] = x . W^T
   + bias for a small W [E][D]; on the reference the plain moe__gemm_ref.  */
static void moe__linear_ref(const moe_config *c, float *y, const float *x, const float *W,
                            const float *bias, int32_t T, int32_t E, int32_t D,
                            const moe__ws *ws) {
    (void)c; (void)ws;
    moe__gemm_ref(y, x, W, bias, T, E, D);
}

/* Router logits [T][R] (and the Shazeer noise logits [T][E]).
   Top-k / expert choice / dense: z = xr . router^T (+ router_bias), where xr
   is x times U[1-eps, 1+eps] per element when training with jitter.
   Soft MoE: z[t][s] = scale * <x_t, phi_s> / (|x_t| |phi_s|), |v| = sqrt(sum v^2 + 1e-6). */
static void moe__router_logits_ref(const moe_config *c, const moe_weights *w, const float *x,
                                   int32_t T, const moe__ws *ws) {
    const int32_t D = c->d_model, E = c->num_experts, R = ws->R;
    float *logits = ws->logits;
    const float *xr = x;
    int32_t t, s, d;
    if (c->routing == MOE_ROUTING_SOFT) {
        float *norm = ws->slot_norm;
        const float scale = w->soft_scale ? w->soft_scale[0] : 1.0f;
        for (s = 0; s < R; s++) {
            float ss = 0.0f;
            for (d = 0; d < D; d++)
                ss += w->soft_phi[(size_t)s * D + d] * w->soft_phi[(size_t)s * D + d];
            norm[s] = sqrtf(ss + 1e-6f);
        }
        moe__gemm_ref(logits, x, w->soft_phi, NULL, T, R, D);
        for (t = 0; t < T; t++) {
            float ss = 0.0f, nx;
            for (d = 0; d < D; d++) ss += x[(size_t)t * D + d] * x[(size_t)t * D + d];
            nx = sqrtf(ss + 1e-6f);
            for (s = 0; s < R; s++)
                logits[(size_t)t * R + s] = scale * (logits[(size_t)t * R + s] / (nx * norm[s]));
        }
        return;
    }
    xr = moe__router_input(c, x, (size_t)T * (size_t)D, 0, ws->xr);
    moe__kernels_of(c)->linear(c, logits, xr, w->router, c->router_bias ? w->router_bias : NULL,
                               T, E, D, ws);
    if (c->noise == MOE_NOISE_SHAZEER && c->training)
        moe__kernels_of(c)->linear(c, ws->noise_logits, xr, w->router_noise,
                                   NULL, T, E, D, ws);
}

/* Router GEMM backward: z = xr . W^T + b  =>  dW += dz^T xr, db += sum dz,
   dx += (dz . W) * U (U the jitter factors keyed by the global element
   index, off the first one's; xr = x * U given). tmp: [T][D]. The expert-
   parallel backward runs it on a rank's tokens with no pack scratch.      */
static void moe__router_gemm_backward(const moe_config *c, int32_t T, const float *dz,
                                      const float *W, float *dW, float *db, const float *xr,
                                      float *tmp, float *dx, float *pack, size_t off) {
    const moe__kernels *k = moe__kernels_of(c);
    const int32_t D = c->d_model, E = c->num_experts;
    const int jitter = c->training && c->jitter > 0.0f;
    size_t i, n = (size_t)T * (size_t)D;
    if (dW) k->gemm(c, E, D, T, dz, 1, (size_t)E, xr, (size_t)D, dW, (size_t)D, 1, pack);
    moe__sum_rows(db, dz, T, E, (size_t)E);
    k->gemm(c, T, D, E, dz, (size_t)E, 1, W, (size_t)D, tmp, (size_t)D, 0, pack);
    if (!jitter) k->add_scaled(dx, tmp, 1.0f, n, 1);
    else for (i = 0; i < n; i++) dx[i] += tmp[i] * moe__jitter_factor(c, off + i);
}

/* Score row: p = softmax(z) or s = sigmoid(z). */
static void moe__score_row(moe_score_func f, float *out, const float *z, int32_t n) {
    int32_t i;
    if (f == MOE_SCORE_SOFTMAX) { moe__softmax_ref(out, z, n); return; }
    for (i = 0; i < n; i++) out[i] = moe__sigmoid(z[i]);
}

/* ||g||_p over the entries with in[j] != 0 (in NULL: all), p >= 1. Scaled
   by the largest |g|: the plain (sum |g|^p)^(1/p) underflowed to 0 for large
   p (p = 1000: a NaN gradient). p = 1 keeps the plain sum.               */
static double moe__pnorm(const float *g, const uint8_t *in, int32_t n, double p) {
    double m = 0.0, s = 0.0;
    int32_t j;
    for (j = 0; j < n; j++)
        if (!in || in[j]) {
            const double a = fabs((double)g[j]);
            if (p == 1.0) s += a;
            if (a > m) m = a;
        }
    if (p == 1.0 || m == 0.0) return s;
    for (j = 0; j < n; j++) if (!in || in[j]) s += pow(fabs((double)g[j]) / m, p);
    return m * pow(s, 1.0 / p);   /* s in [1, n] */
}

/* Gate weights of the n selected scores g: w = g / (sum g + eps) (SUM),
   g (NONE), g / (||g||_p + eps) (PNORM). Entries with keep[j] == 0 are
   excluded and get 0. A zero normaliser gives zeros, never NaN.           */
static void moe__normalize(const moe_config *c, const float *g, const uint8_t *keep,
                           float *w, int32_t n) {
    double den = 0.0;
    int32_t j;
    if (c->normalize == MOE_NORM_PNORM) den = moe__pnorm(g, keep, n, c->norm_p);
    else for (j = 0; j < n; j++) den += keep && !keep[j] ? 0.0 : g[j];
    den += c->norm_eps;
    for (j = 0; j < n; j++) {
        float v = keep && !keep[j] ? 0.0f : g[j];
        if (c->normalize == MOE_NORM_NONE) w[j] = v;
        else w[j] = den > 0.0 ? (float)(v / den) : 0.0f;
    }
}

/* Gradient of w_j = r * m_j * g_j / den, den = sum_{q} g + eps (SUM),
   (sum_{q} |g|^p)^(1/p) + eps (PNORM), or 1 (NONE), with respect to g:
   dg_m += r m_m dw_m / den - r (sum_j m_j dw_j g_j) / den^2 * dden/dg_m.
   m: which weights are nonzero, q: which scores form the denominator.    */
static void moe__normalize_backward(const moe_config *c, const float *g, const uint8_t *m,
                                    const uint8_t *q, const float *dw, double *dg, int32_t n) {
    const double r = c->routed_scale;
    double nrm = 0.0, den, a = 0.0;
    int32_t j;
    if (c->normalize == MOE_NORM_NONE) {
        for (j = 0; j < n; j++) if (m[j]) dg[j] += r * dw[j];
        return;
    }
    if (c->normalize == MOE_NORM_PNORM) nrm = moe__pnorm(g, q, n, c->norm_p);
    else for (j = 0; j < n; j++) if (q[j]) nrm += g[j];
    den = nrm + c->norm_eps;
    if (!(den > 0.0)) return;                       /* the forward gave zeros */
    for (j = 0; j < n; j++) if (m[j]) a += (double)dw[j] * g[j];
    for (j = 0; j < n; j++) {
        double dden = 0.0;
        /* d||g||_p / dg_j = (|g_j| / ||g||_p)^(p-1) sign(g_j): a ratio <= 1 to a power
           >= 0, finite for every p >= 1 (|g|^(p-1) * ||g||^(1-p) was 0 * Inf) */
        if (q[j] && c->normalize == MOE_NORM_PNORM)
            dden = (nrm > 0.0 ? pow(fabs(g[j]) / nrm, c->norm_p - 1.0) : c->norm_p == 1.0) *
                   (g[j] < 0.0f ? -1.0 : 1.0);
        else if (q[j])
            dden = 1.0;
        /* r / den (dw_j - a / den dden_j): with one expert selected (and no eps)
           a / den is dw_j exactly, so the gate gets exactly the 0 it has in
           exact arithmetic, on every ISA (r dw / den - r a / den^2 left a
           rounding residue that grew with routed_scale) */
        dg[j] += r / den * ((m[j] ? (double)dw[j] : 0.0) - a / den * dden);
    }
}

/* Logits of token t as top-k routing scores them (training only adds noise):
     H = z + N(0,1) * sigma, sigma = softplus(x.W_noise) + eps   (Shazeer, cfg.noise)
           + N'(0,1) * cfg.router_noise_std                      (warm-up noise)
   sigma and the Shazeer draws N come back for the Shazeer losses and the
   backward. Every draw is a pure function of (seed, t, e).                */
static void moe__noisy_logits(const moe_config *c, int32_t t, const float *z,
                              const float *noise_row, const float *noise_samples, float *H,
                              float *sigma, float *N) {
    const int32_t E = c->num_experts;
    const int warm = c->training && c->router_noise_std > 0.0f;
    int32_t e;
    for (e = 0; e < E; e++) {
        const uint64_t ctr = (uint64_t)t * (uint64_t)E + (uint64_t)e;
        H[e] = z[e];
        if (noise_row) {
            sigma[e] = moe__softplus(noise_row[e]) + c->noise_epsilon;
            N[e] = noise_samples ? noise_samples[ctr]
                                 : (float)moe__rng_normal(c->seed, MOE__RNG_NOISE, ctr);
            H[e] += N[e] * sigma[e];
        }
        if (warm)
            H[e] += c->router_noise_std * (float)moe__rng_normal(c->seed, MOE__RNG_WARMUP, ctr);
    }
}

/* Group-limited top-k (docs/ROUTING.md, "Group-limited top-k"): the E keys
   in n_group groups; a group's score is the sum of its group_score_top best
   keys; outside the topk_group best groups every key becomes -inf (or 0 with
   group_mask_zero). top: 2 E ints and gscore: n_group floats of scratch. */
static void moe__group_limit(const moe_config *c, float *sel, int32_t *top, float *gscore) {
    const int32_t G = c->n_group, gsz = c->num_experts / G;
    int32_t gi, j, e, *kept = top + c->num_experts;
    for (gi = 0; gi < G; gi++) {
        moe__topk_ref(sel + gi * gsz, gsz, c->group_score_top, top);
        gscore[gi] = 0.0f;
        for (j = 0; j < c->group_score_top; j++) gscore[gi] += sel[gi * gsz + top[j]];
    }
    moe__topk_ref(gscore, G, c->topk_group, kept);
    for (gi = 0; gi < G; gi++) {
        int keep = 0;
        for (j = 0; j < c->topk_group; j++) keep |= kept[j] == gi;
        if (!keep)
            for (e = gi * gsz; e < (gi + 1) * gsz; e++)
                sel[e] = c->group_mask_zero ? 0.0f : -INFINITY;
    }
}

/* Token t of top-k routing: noisy logits, scores, (group-limited) top-k,
   second-expert policy, pre-capacity weights and the Shazeer statistics.  */
static void moe__route_token_topk(const moe__router *r, const moe__token_scratch *x, int32_t t) {
    const moe_config *c = r->c;
    const int32_t E = c->num_experts, K = c->top_k, S = r->S;
    const float *z = r->logits + (size_t)t * (size_t)E;
    float *sc = r->res->scores + (size_t)t * (size_t)E;
    int32_t *idx = r->res->expert + (size_t)t * (size_t)S;
    float *w = r->res->weight + (size_t)t * (size_t)S;
    float *H = x->key, *sel = x->key + E, *sigma = x->small_f + E, *g = x->small_f;
    const int noisy = c->noise == MOE_NOISE_SHAZEER && c->training;
    const int32_t tg = r->t0 + t;   /* RNG key: the global token */
    int32_t e, j;

    /* pass 1: the (noisy) logits H and their scores */
    moe__noisy_logits(c, tg, z, noisy ? r->noise_logits + (size_t)t * (size_t)E : NULL,
                      r->noise_samples, H, sigma, sel /* scratch for the draws */);
    moe__score_row(c->score, sc, H, E);

    /* pass 2: selection key = score (+ selection bias), group limit */
    for (e = 0; e < E; e++) sel[e] = sc[e] + (r->sel_bias ? r->sel_bias[e] : 0.0f);
    /* (g[] is filled only after this: its memory is the group limit's scratch) */
    if (c->n_group > 1) moe__group_limit(c, sel, x->small_i, x->small_f);
    moe__topk_ref(sel, E, K, idx);

    /* fairseq sampling: the second expert is argmax over e != e1 of z + Gumbel */
    if (c->second_expert == MOE_SECOND_SAMPLED) {
        float best = -INFINITY;
        int32_t arg = -1;
        for (e = 0; e < E; e++) {
            double u = moe__rng_uniform(c->seed, MOE__RNG_GUMBEL,
                                        (uint64_t)tg * (uint64_t)E + (uint64_t)e);
            float v = z[e] - (float)log(-log(u));
            if (e == idx[0] || sel[e] == -INFINITY) continue;
            if (arg < 0 || v > best) { best = v; arg = e; }
        }
        if (arg >= 0) idx[1] = arg;   /* always found: the kept groups hold >= 2 experts */
    }

    /* gate weights from the unbiased scores, normalised over all K slots */
    for (j = 0; j < K; j++) g[j] = sc[idx[j]];
    moe__normalize(c, g, NULL, w, K);

    /* GShard random routing: keep expert 2 iff U < w2 / theta; a rejected
       choice is deleted before capacity positions are counted.            */
    if (c->second_expert == MOE_SECOND_RANDOM &&
        !(moe__rng_uniform(c->seed, MOE__RNG_SECOND, (uint64_t)tg) <
          (double)w[1] / c->second_threshold)) {
        r->res->dropped[(size_t)t * S + 1] = MOE__REJECTED;   /* idx[1] kept for backward */
        w[1] = 0.0f;
    }
    for (j = 0; j < K; j++) {
        w[j] *= c->routed_scale;
        x->imp[idx[j]] += w[j];                           /* Shazeer importance */
    }

    /* Shazeer smooth load: P(t,e) = Phi((z_e - threshold) / sigma_e), where the
       threshold is the K-th largest H excluding e (t2t _prob_in_top_k).    */
    if (noisy && K < E) {
        int32_t *top = x->small_i;
        float thr_in, thr_out;
        moe__topk_ref(H, E, K + 1, top);
        thr_in = H[top[K]]; thr_out = H[top[K - 1]];
        for (e = 0; e < E; e++) {
            float thr = H[e] > thr_in ? thr_in : thr_out;
            x->imp[E + e] += moe__load_prob((double)z[e] - thr, sigma[e]);
        }
    }
}

/* The pairs capacity decides over, in (token, slot) order: pair r goes to
   expert[r] (< 0: none) from slot slot[r] (NULL: r % S, the dense T x S
   layout of one process); key[r] is its pre-drop weight (WEIGHT) or its
   token's top-1 score (BPR); drop[r] != 0 marks a pair already out
   (a random-routing rejection), which takes no place.                    */
typedef struct moe__pair_list {
    int32_t n, S;
    const int32_t *expert, *slot;
    const float *key;
    uint8_t *drop;
} moe__pair_list;

/* Capacity (docs/ROUTING.md, "Drop policies"): drop[r] = MOE__DROPPED for the
   pairs beyond C per expert. The one process's routing and an expert-parallel
   owner (with the pairs of its experts) both decide here.
     POSITION: slot 0 of every token first, then slot 1, ...; BPR: the same
     with tokens by descending top-1 score (stable); WEIGHT: each expert keeps
     its C highest weights, ties to the lower token.
   order, tmp: n entries of scratch; count: E.                             */
static void moe__capacity_drops(const moe_config *c, int32_t C, int32_t E,
                                const moe__pair_list *p, int32_t *order, int32_t *tmp,
                                int32_t *count) {
    const int32_t n = p->n;
    int32_t r, i, j, e;
    for (e = 0; e < E; e++) count[e] = 0;
    if (c->drop_policy == MOE_DROP_WEIGHT) {
        for (e = 0; e < E; e++) {
            int32_t m = 0;
            for (r = 0; r < n; r++)
                if (p->expert[r] == e && !p->drop[r]) order[m++] = r;
            moe__sort_desc(p->key, order, tmp, m);
            for (i = C; i < m; i++) p->drop[order[i]] = MOE__DROPPED;
        }
        return;
    }
    for (r = 0; r < n; r++) order[r] = r;
    if (c->drop_policy == MOE_DROP_BPR) moe__sort_desc(p->key, order, tmp, n);
    for (j = 0; j < p->S; j++)
        for (i = 0; i < n; i++) {
            r = order[i];
            e = p->expert[r];
            if ((p->slot ? p->slot[r] : r % p->S) != j || e < 0 || p->drop[r]) continue;
            if (count[e] < C) count[e]++;
            else p->drop[r] = MOE__DROPPED;
        }
}

/* Capacity over the T x S pairs of one process. */
static void moe__apply_capacity(moe__router *r) {
    const moe_config *c = r->c;
    const int32_t T = r->T, S = r->S;
    moe__pair_list p;
    int32_t t, j;
    p.n = T * S; p.S = S;
    p.expert = r->res->expert; p.slot = NULL;
    p.drop = r->res->dropped;
    p.key = r->res->weight;
    if (c->drop_policy == MOE_DROP_BPR) {
        for (t = 0; t < T; t++) {
            const int32_t e = r->res->expert[(size_t)t * S];
            const float top1 = e >= 0 ? r->res->scores[(size_t)t * r->R + e] : -INFINITY;
            for (j = 0; j < S; j++) r->key[(size_t)t * S + j] = top1;
        }
        p.key = r->key;
    }
    moe__capacity_drops(c, r->C, c->num_experts, &p, r->order, r->order_tmp, r->count);
}

static moe__token_scratch moe__token_scratch_of(const moe__router *r, int32_t chunk) {
    const int32_t E = r->c->num_experts;
    double *base = r->chunks + (size_t)chunk * moe__route_chunk_doubles(E);
    moe__token_scratch x;
    x.imp = base;
    x.key = (float *)(void *)(base + 2 * (size_t)E);
    x.small_f = x.key + 2 * (size_t)E;
    x.small_i = (int32_t *)(void *)(x.small_f + 2 * (size_t)E + 2);
    return x;
}
static void moe__route_chunk_task(void *arg, int32_t chunk) {
    const moe__router *r = (const moe__router *)arg;
    const int32_t n = moe__route_nchunk((size_t)r->T), E = r->c->num_experts;
    const int32_t t0 = (int32_t)((int64_t)r->T * chunk / n),
                  t1 = (int32_t)((int64_t)r->T * (chunk + 1) / n);
    const moe__token_scratch x = moe__token_scratch_of(r, chunk);
    int32_t t, e;
    for (e = 0; e < 2 * E; e++) x.imp[e] = 0.0;
    for (t = t0; t < t1; t++) moe__route_token_topk(r, &x, t);
}

/* Top-k selection and pre-capacity weights of every token, token chunks
   in parallel; the chunks' Shazeer sums are added to r->imp in chunk order. */
static void moe__route_tokens_topk(moe__router *r) {
    const moe_config *c = r->c;
    const int32_t T = r->T, E = c->num_experts, nchunk = moe__route_nchunk((size_t)T);
    int32_t q, e;
    moe__parallel_for(c, nchunk, moe__route_chunk_task, r, (double)T * E * (8.0 + c->top_k));
    for (q = 0; q < nchunk; q++) {
        const double *imp = moe__token_scratch_of(r, q).imp;
        for (e = 0; e < 2 * E; e++) r->imp[e] += imp[e];
    }
}

/* A token's final gate weights w after capacity: renormalised over its kept
   pairs (normalize_after_drop), or its pre-drop weights with the dropped
   pairs' zeroed. scores: the token's row; keep, g: S entries of scratch.
   The one-process and the expert-parallel routing both end here.        */
static void moe__final_weights(const moe_config *c, const float *scores, const int32_t *idx,
                               const uint8_t *drop, float *w, int32_t S, uint8_t *keep,
                               float *g) {
    int32_t j;
    if (c->normalize_after_drop) {
        for (j = 0; j < S; j++) {
            keep[j] = idx[j] >= 0 && !drop[j];
            g[j] = idx[j] >= 0 ? scores[idx[j]] : 0.0f;
        }
        moe__normalize(c, g, keep, w, S);
        for (j = 0; j < S; j++) w[j] *= c->routed_scale;
    } else {
        for (j = 0; j < S; j++) if (drop[j]) w[j] = 0.0f;
    }
}

/* Top-k routing of all tokens, then capacity and the final weights. */
static void moe__route_topk(moe__router *r) {
    const moe_config *c = r->c;
    const int32_t T = r->T, S = r->S;
    int32_t t;
    moe__route_tokens_topk(r);
    if (r->C > 0) moe__apply_capacity(r);
    for (t = 0; t < T; t++)
        moe__final_weights(c, r->res->scores + (size_t)t * r->R, r->res->expert + (size_t)t * S,
                           r->res->dropped + (size_t)t * S, r->res->weight + (size_t)t * S, S,
                           (uint8_t *)(void *)r->small_i, r->small_f);
}

/* Expert choice (docs/ROUTING.md, "Expert choice"): each expert takes the C tokens with the
   largest score in its column; weight = score, no per-token normalisation. */
static void moe__route_expert_choice(moe__router *r) {
    const moe_config *c = r->c;
    const int32_t T = r->T, E = c->num_experts;
    int32_t t, e, i;
    for (t = 0; t < T; t++) {
        moe__score_row(c->score, r->res->scores + (size_t)t * E, r->logits + (size_t)t * E, E);
        for (e = 0; e < E; e++) {
            r->res->expert[(size_t)t * E + e] = -1;
            r->res->weight[(size_t)t * E + e] = 0.0f;
        }
    }
    for (e = 0; e < E; e++) {
        for (t = 0; t < T; t++) {
            r->key[t] = r->res->scores[(size_t)t * E + e] + (r->sel_bias ? r->sel_bias[e] : 0.0f);
            r->order[t] = t;
        }
        moe__sort_desc(r->key, r->order, r->order_tmp, T);
        for (i = 0; i < r->C; i++) {
            size_t p = (size_t)r->order[i] * E + e;
            r->res->expert[p] = e;
            r->res->weight[p] = r->res->scores[p] * c->routed_scale;
        }
    }
}

/* Dense MoE: every token uses every expert, weights = normalised scores. */
static void moe__route_dense(moe__router *r) {
    const moe_config *c = r->c;
    const int32_t E = c->num_experts;
    int32_t t, e;
    for (t = 0; t < r->T; t++) {
        float *sc = r->res->scores + (size_t)t * E, *w = r->res->weight + (size_t)t * E;
        moe__score_row(c->score, sc, r->logits + (size_t)t * E, E);
        moe__normalize(c, sc, NULL, w, E);
        for (e = 0; e < E; e++) { r->res->expert[(size_t)t * E + e] = e; w[e] *= c->routed_scale; }
    }
}

/* Soft MoE (docs/ROUTING.md, "Soft MoE"): combine = softmax over slots (rows), dispatch =
   softmax over tokens (columns), both of the same logits.                  */
static void moe__route_soft(moe__router *r) {
    const int32_t T = r->T, R = r->R;
    int32_t t, s;
    for (t = 0; t < T; t++)
        moe__softmax_ref(r->res->scores + (size_t)t * R, r->logits + (size_t)t * R, R);
    for (s = 0; s < R; s++) {
        float m = -INFINITY, sum = 0.0f;
        for (t = 0; t < T; t++)
            if (r->logits[(size_t)t * R + s] > m) m = r->logits[(size_t)t * R + s];
        for (t = 0; t < T; t++) {
            float v = expf(r->logits[(size_t)t * R + s] - m);
            r->res->dispatch[(size_t)t * R + s] = v;
            sum += v;
        }
        for (t = 0; t < T; t++) r->res->dispatch[(size_t)t * R + s] /= sum;
    }
}

/* Normalised score of (t, e) for the balance losses: p for softmax, s / sum s
   for sigmoid (DeepSeek-V3's s').                                           */
static double moe__balance_prob(const moe_config *c, const float *sc_row, int32_t e) {
    double sum = 0.0;
    int32_t i;
    if (c->score == MOE_SCORE_SOFTMAX) return sc_row[e];
    for (i = 0; i < c->num_experts; i++) sum += sc_row[i];
    return sum > 0.0 ? sc_row[e] / sum : 0.0;
}

/* DeepSeek-V3 sequence-wise loss of the n tokens from t0: f from a plain
   top-K of the unbiased scores (no groups, no bias), P from s' = s/sum s. */
static double moe__seq_loss_of(const moe__router *r, int32_t t0, int32_t n) {
    const moe_config *c = r->c;
    const int32_t E = c->num_experts, K = c->top_k;
    const float *sc = r->res->scores;
    double seq = 0.0;
    int32_t t, j, e;
    for (e = 0; e < E; e++) r->count[e] = 0;
    for (t = t0; t < t0 + n; t++) {
        moe__topk_ref(sc + (size_t)t * E, E, K, r->small_i);
        for (j = 0; j < K; j++) r->count[r->small_i[j]]++;
    }
    for (e = 0; e < E; e++) {
        double P_e = 0.0;
        for (t = t0; t < t0 + n; t++) P_e += moe__balance_prob(c, sc + (size_t)t * E, e);
        seq += (double)E / ((double)K * n) * r->count[e] * (P_e / n);
    }
    return seq;
}

/* aux_total = sum of coef * value. A loss switched off (coef 0) adds nothing,
   even an overflowed one (0 * Inf is NaN; aux_z overflows for logits ~1e20).
   moe__route and the expert-parallel combine both form it here, from the
   same moe__aux_from_stats, so the two paths cannot drift apart again.    */
static void moe__aux_total(const moe_config *c, moe_info *res) {
    const float coef[5] = {c->balance_coef, c->z_loss_coef, c->importance_coef, c->load_coef,
                           c->seq_balance_coef};
    const float val[5] = {res->aux_balance, res->aux_z, res->aux_importance, res->aux_load,
                          res->aux_seq};
    float total = 0.0f;
    int i;
    for (i = 0; i < 5; i++) if (coef[i] != 0.0f) total += coef[i] * val[i];
    res->aux_total = total;
}

/* Top-k routing's aux losses come from batch statistics: moe__batch_stats
   sums one batch's share of everything the losses (and their gradients)
   take, Ta the tokens of the whole group; moe__aux_from_stats turns the
   group's sums into the losses. One process is the P = 1 case; the
   expert-parallel calls sum the vectors over the ranks in between.        */
static void moe__batch_stats(const moe_config *c, int32_t Ta, moe__router *r, double *st) {
    const int32_t T = r->T, E = c->num_experts, S = r->S, K = c->top_k;
    const int32_t L = c->seq_len > 0 ? c->seq_len : Ta;
    const moe_info *res = r->res;
    double *routed = st + MOE__EPS_ROUTED * E, *first = st + MOE__EPS_FIRST * E,
           *P = st + MOE__EPS_P * E;
    double *seqc = st + MOE__EPS_SEQC * E, *impg = st + MOE__EPS_IMPG * E;
    int32_t t, j, e;
    memset(st, 0, ((size_t)MOE__EPS_VECS * (size_t)E + 2) * sizeof(double));
    for (t = 0; t < T; t++) {
        const size_t p0 = (size_t)t * S;
        float *g = r->small_f, *w = r->small_f + E;
        for (j = 0; j < S; j++) {
            if (res->dropped[p0 + j] == MOE__REJECTED) continue;
            routed[res->expert[p0 + j]] += 1.0;
            if (j == 0) first[res->expert[p0 + j]] += 1.0;
        }
        /* importance as moe__shazeer_grads recomputes it (pre-drop weights) */
        for (j = 0; j < S; j++) g[j] = res->scores[(size_t)t * E + res->expert[p0 + j]];
        moe__normalize(c, g, NULL, w, S);
        for (j = 0; j < S; j++)
            if (res->dropped[p0 + j] != MOE__REJECTED)
                impg[res->expert[p0 + j]] += (double)w[j] * c->routed_scale;
        {
            const double l = moe__logsumexp(r->logits + (size_t)t * E, E);
            st[MOE__EPS_VECS * E] += l * l;
        }
    }
    for (e = 0; e < E; e++)
        for (t = 0; t < T; t++) P[e] += moe__balance_prob(c, res->scores + (size_t)t * E, e);
    for (e = 0; e < E; e++) st[MOE__EPS_IMP * E + e] = r->imp[e];
    if (L >= Ta) {   /* one sequence over all ranks: counts are summed */
        for (t = 0; t < T; t++) {
            moe__topk_ref(res->scores + (size_t)t * E, E, K, r->small_i);
            for (j = 0; j < K; j++) seqc[r->small_i[j]] += 1.0;
        }
    } else {         /* whole sequences inside this batch (moe__ep_check) */
        int32_t s0;
        for (s0 = 0; s0 < T; s0 = T - s0 > L ? s0 + L : T)
            st[MOE__EPS_VECS * E + 1] += moe__seq_loss_of(r, s0, T - s0 < L ? T - s0 : L);
    }
}

static void moe__aux_from_stats(const moe_config *c, int32_t Ta, const double *st,
                                moe_info *res) {
    const int32_t E = c->num_experts, K = c->top_k;
    const int32_t L = c->seq_len > 0 ? c->seq_len : Ta;
    double bal = 0.0;
    int32_t e;
    res->aux_balance = res->aux_z = res->aux_importance = res->aux_load = res->aux_seq = 0.0f;
    if (Ta > 0) {
        res->aux_z = (float)(st[MOE__EPS_VECS * E] / Ta);
        for (e = 0; e < E; e++) {
            double f = st[(c->balance_loss == MOE_BALANCE_FIRST_CHOICE
                           ? MOE__EPS_FIRST : MOE__EPS_ROUTED) * E + e];
            f /= (double)Ta * (c->balance_loss == MOE_BALANCE_TOPK_NORMALIZED ? K : 1);
            bal += f * (st[MOE__EPS_P * E + e] / Ta);
        }
        res->aux_balance = (float)(E * bal);
        if (L >= Ta) {
            double seq = 0.0;
            for (e = 0; e < E; e++)
                seq += (double)E / ((double)K * Ta) * st[MOE__EPS_SEQC * E + e] *
                       (st[MOE__EPS_P * E + e] / Ta);
            res->aux_seq = (float)seq;
        } else {
            res->aux_seq = (float)(st[MOE__EPS_VECS * E + 1] / (double)moe__ceil_div(Ta, L));
        }
        res->aux_importance = (float)moe__cv_squared(st + MOE__EPS_IMP * E, E);
        res->aux_load = (float)moe__cv_squared(st + MOE__EPS_ROUTED * E, E);
    }
}

/* Auxiliary losses (values; docs/ROUTING.md, "Balance losses" to "Sequence-wise balance"):
   z-loss for every routing with logits, the rest for top-k from the batch
   statistics; Shazeer's load is smooth when noisy (moe__route's imp[E..2E)). */
static void moe__aux_losses(moe__router *r) {
    const moe_config *c = r->c;
    const int32_t T = r->T, E = c->num_experts, K = c->top_k;
    moe_info *res = r->res;
    int32_t t;
    double z = 0.0;
    if (T == 0) return;
    if (c->routing == MOE_ROUTING_TOPK) {
        moe__batch_stats(c, T, r, r->stats);
        moe__aux_from_stats(c, T, r->stats, res);
        if (c->noise == MOE_NOISE_SHAZEER && c->training && K < E)
            res->aux_load = (float)moe__cv_squared(r->imp + E, E);
        return;
    }
    if (c->routing == MOE_ROUTING_SOFT) return;
    for (t = 0; t < T; t++) {                      /* z-loss: mean LSE^2 */
        const double l = moe__logsumexp(r->logits + (size_t)t * E, E);
        z += l * l;
    }
    res->aux_z = (float)(z / T);
}

/* info's per-expert counts of routed and kept pairs (either array may be
   NULL), its dropped pairs and its tokens with no kept pair, over T tokens
   of S slots. A pair with no expert, or rejected by the second-expert
   policy, is not routed. The one-process and the expert-parallel routing
   both count here.                                                       */
static void moe__count_pairs(moe_info *info, int32_t T, int32_t S, int32_t E) {
    int32_t t, j, e;
    info->dropped_pairs = info->dropped_tokens = 0;
    if (info->expert_routed) for (e = 0; e < E; e++) info->expert_routed[e] = 0;
    if (info->expert_kept) for (e = 0; e < E; e++) info->expert_kept[e] = 0;
    for (t = 0; t < T; t++) {
        int any = 0;
        for (j = 0; j < S; j++) {
            const size_t p = (size_t)t * S + j;
            e = info->expert[p];
            if (e < 0 || info->dropped[p] == MOE__REJECTED) continue;
            if (info->expert_routed) info->expert_routed[e]++;
            if (info->dropped[p]) info->dropped_pairs++;
            else { if (info->expert_kept) info->expert_kept[e]++; any = 1; }
        }
        if (!any) info->dropped_tokens++;
    }
}

/* 1 when all n values are finite (v NULL: nothing to check). The routing
   refuses non-finite logits and biases before writing anything. */
static int moe__all_finite(const float *v, size_t n) {
    size_t i;
    for (i = 0; v && i < n; i++) if (!moe__isfinite(v[i])) return 0;
    return 1;
}

/* The whole routing stage. Arrays of r->res must point into the workspace. */
static moe_status moe__route(moe__router *r) {
    const moe_config *c = r->c;
    const int32_t T = r->T, S = r->S, E = c->num_experts;
    moe_info *res = r->res;
    const size_t n = (size_t)T * (size_t)r->R;
    int32_t e;

    /* NaN/Inf policy: refuse non-finite logits and biases before any output */
    if (!moe__all_finite(r->logits, n) || !moe__all_finite(r->sel_bias, (size_t)E) ||
        (r->noise_logits && c->training &&
         !moe__all_finite(r->noise_logits, (size_t)T * (size_t)E)))
        return MOE_STATUS_NONFINITE;

    res->slots = S; res->capacity = r->C;
    res->dropped_pairs = res->dropped_tokens = 0;
    res->aux_balance = res->aux_z = res->aux_importance = res->aux_load = res->aux_seq = 0.0f;
    memset(res->dropped, 0, (size_t)T * (size_t)S);
    for (e = 0; e < 2 * E; e++) r->imp[e] = 0.0;

    switch (c->routing) {
    case MOE_ROUTING_TOPK:          moe__route_topk(r); break;
    case MOE_ROUTING_EXPERT_CHOICE: moe__route_expert_choice(r); break;
    case MOE_ROUTING_DENSE:         moe__route_dense(r); break;
    default:                        moe__route_soft(r); break;
    }

    moe__count_pairs(res, T, S, E);
    if (c->routing == MOE_ROUTING_SOFT) {   /* every expert fills its slots; no drops */
        for (e = 0; e < E; e++) res->expert_routed[e] = res->expert_kept[e] = c->slots_per_expert;
        res->dropped_tokens = 0;
    }
    moe__aux_losses(r);
    moe__aux_total(c, res);
    return MOE_STATUS_OK;
}

// ----------------------------------------------------------------------------
// Routing backward (docs/ROUTING.md, "Backward"): the gate weights, the aux
// losses, noise and the scores back to the router logits, each step the
// transpose of its forward twin above (the router GEMM's is beside it).

/* State the router backward shares between its passes. */
typedef struct moe__router_bw {
    const moe_config *c;
    const moe_info *info;
    int32_t T, S, K, E;
    int32_t T_all, t0;        /* tokens of the routing group and the global
                                 index of token 0 (T and 0 in one process)      */
    const double *stats;      /* expert parallel: the summed moe_ep statistics
                                 (global counts); NULL in one process           */
    const float *gw;          /* [T][S] dL/d weight (from the combine)          */
    const float *noise;       /* [T][E] raw noise logits x.W_noise (Shazeer)    */
    const float *noise_samples; /* test seam as in moe__router, or NULL         */
    float *dz, *dsig;         /* [T][E] dL/d logit; dL/d sigma (Shazeer)        */
    double *val;              /* [2E] Shazeer importance and load values        */
    double *dval;             /* [2E] their d(coef * CV^2) / d value            */
    double *fbal, *fseq;      /* [E] each: balance-loss factors                 */
    /* dL/d score of one token and dL/d its S gate scores, in double: with
       sigmoid scores summing to a denormal, a division by that sum overflows
       float before the s (1 - s) that brings it back (docs/ROUTING.md, "Router gradients") */
    double *ds, *dg;          /* [E] each                                       */
    uint8_t *m, *q;           /* [S] masks for moe__normalize_backward          */
    float *g, *dw, *H, *sigma, *N;   /* [E] scratch each                        */
    int32_t *top;             /* [E + 1]                                        */
} moe__router_bw;

/* Noisy logits H = z + N * sigma (+ warm-up noise) of token t (Shazeer,
   training), as the forward drew them from the same seed.                  */
static void moe__noisy_row(const moe__router_bw *B, int32_t t) {
    const size_t row = (size_t)t * (size_t)B->E;
    moe__noisy_logits(B->c, t, B->info->logits + row, B->noise + row, B->noise_samples, B->H,
                      B->sigma, B->N);
}

/* Pass 1 of the router backward: the Shazeer importance and smooth-load
   vectors (recomputed), then d(coef * CV^2)/d value for each.            */
static void moe__shazeer_grads(moe__router_bw *B) {
    const moe_config *c = B->c;
    const int32_t T = B->T, S = B->S, E = B->E, K = B->K;
    const int smooth = c->noise == MOE_NOISE_SHAZEER && c->training && K < E;
    double *imp = B->val, *load = B->val + E;
    int32_t t, j, e;
    for (e = 0; e < 2 * E; e++) B->val[e] = B->dval[e] = 0.0;
    if (c->importance_coef == 0.0f && !(smooth && c->load_coef != 0.0f)) return;
    if (B->stats)   /* expert parallel (never noisy): importance of all ranks */
        for (e = 0; e < E; e++) imp[e] = B->stats[MOE__EPS_IMPG * E + e];
    else for (t = 0; t < T; t++) {
        const float *sc = B->info->scores + (size_t)t * E;
        const int32_t *idx = B->info->expert + (size_t)t * S;
        const uint8_t *dr = B->info->dropped + (size_t)t * S;
        for (j = 0; j < S; j++) B->g[j] = sc[idx[j]];
        moe__normalize(c, B->g, NULL, B->dw, S);       /* pre-drop weights */
        for (j = 0; j < S; j++)
            if (dr[j] != MOE__REJECTED) imp[idx[j]] += (double)B->dw[j] * c->routed_scale;
        if (smooth) {
            float thr_in, thr_out;
            moe__noisy_row(B, t);
            moe__topk_ref(B->H, E, K + 1, B->top);
            thr_in = B->H[B->top[K]]; thr_out = B->H[B->top[K - 1]];
            for (e = 0; e < E; e++) {
                const float thr = B->H[e] > thr_in ? thr_in : thr_out;
                load[e] += moe__load_prob((double)B->info->logits[(size_t)t * E + e] - thr,
                                          B->sigma[e]);
            }
        }
    }
    moe__cv_squared_grad(imp, E, c->importance_coef, B->dval);
    if (smooth) moe__cv_squared_grad(load, E, c->load_coef, B->dval + E);
}

/* Per-sequence factor of the sequence-wise loss for the sequence starting at
   t0 with n tokens: fseq[e] = coef * f_e / (n * nseq), f_e = E/(K n) count_e
   of a plain top-K of the unbiased scores.                                 */
static void moe__seq_factors(moe__router_bw *B, int32_t t0, int32_t n, int32_t nseq) {
    const int32_t E = B->E, K = B->K;
    int32_t t, j, e;
    for (e = 0; e < E; e++) B->fseq[e] = 0.0;
    if (B->stats && n == B->T_all)   /* expert parallel, one sequence: all ranks' counts */
        for (e = 0; e < E; e++) B->fseq[e] = B->stats[MOE__EPS_SEQC * E + e];
    else for (t = t0; t < t0 + n; t++) {
        moe__topk_ref(B->info->scores + (size_t)t * E, E, K, B->top);
        for (j = 0; j < K; j++) B->fseq[B->top[j]] += 1.0;
    }
    for (e = 0; e < E; e++)
        B->fseq[e] = B->c->seq_balance_coef * ((double)E / ((double)K * n) * B->fseq[e]) /
                     ((double)n * nseq);
}

/* The router backward's arrays in the workspace: dz [T][E] and per-token
   scratch of E entries each (the one-process and the expert-parallel
   backward share it). */
static void moe__router_bw_scratch(moe__router_bw *B, const moe__ws *ws, int32_t E) {
    B->dz = ws->dz;
    B->val = ws->rbw_f64; B->dval = B->val + 2 * E;
    B->fbal = B->val + 4 * E; B->fseq = B->val + 5 * E;
    B->ds = B->val + 6 * E; B->dg = B->val + 7 * E;
    B->m = ws->rbw_u8; B->q = B->m + E;
    B->g = ws->rbw_f32; B->dw = B->g + 2 * E;
    B->H = B->g + 3 * E; B->sigma = B->g + 4 * E; B->N = B->g + 5 * E;
    B->top = ws->small_i;
}

/* The balance loss E * sum_e f~_e P_e: dL / d pn[t][e] = coef E f~_e / T for
   every token, into B->fbal (f~ from the kept pair counts of the group). */
static void moe__balance_factors(moe__router_bw *B) {
    const moe_config *c = B->c;
    const moe_info *info = B->info;
    const int32_t T = B->T, S = B->S, E = B->E, K = B->K, Ta = B->T_all;
    const int first = c->balance_loss == MOE_BALANCE_FIRST_CHOICE;
    int32_t t, j, e;
    for (e = 0; e < E; e++) B->fbal[e] = 0.0;
    if (c->routing != MOE_ROUTING_TOPK || c->balance_coef == 0.0f) return;
    if (B->stats)   /* expert parallel: the pair counts of all ranks */
        for (e = 0; e < E; e++)
            B->fbal[e] = B->stats[(first ? MOE__EPS_FIRST : MOE__EPS_ROUTED) * E + e];
    else for (t = 0; t < T; t++)
        for (j = 0; j < (first ? 1 : S); j++) {
            const size_t p = (size_t)t * S + j;
            if (info->dropped[p] != MOE__REJECTED) B->fbal[info->expert[p]] += 1.0;
        }
    for (e = 0; e < E; e++)
        B->fbal[e] = c->balance_coef * E * (B->fbal[e] / ((double)Ta *
                     (c->balance_loss == MOE_BALANCE_TOPK_NORMALIZED ? K : 1))) / Ta;
}

/* Token t's gate weights -> its scores, into ds (docs/ROUTING.md, "Router
   gradients"): through the normalisation, and the importance loss's
   pre-drop weights. */
static void moe__gate_weights_backward(moe__router_bw *B, int32_t t, double *ds) {
    const moe_config *c = B->c;
    const moe_info *info = B->info;
    const int32_t S = B->S, E = B->E;
    const float *sc = info->scores + (size_t)t * E;
    const int32_t *idx = info->expert + (size_t)t * S;
    const uint8_t *dr = info->dropped + (size_t)t * S;
    int32_t j, e;
    if (c->routing == MOE_ROUTING_EXPERT_CHOICE) {
        for (e = 0; e < E; e++)
            if (info->expert[(size_t)t * E + e] == e)
                ds[e] += c->routed_scale * B->gw[(size_t)t * E + e];
        return;
    }
    for (j = 0; j < S; j++) {
        B->g[j] = sc[idx[j]];
        B->dg[j] = 0.0;
        B->dw[j] = B->gw[(size_t)t * S + j];
        B->m[j] = dr[j] == MOE__KEPT;
        B->q[j] = c->normalize_after_drop ? dr[j] == MOE__KEPT : 1;
    }
    moe__normalize_backward(c, B->g, B->m, B->q, B->dw, B->dg, S);
    if (c->routing == MOE_ROUTING_TOPK && c->importance_coef != 0.0f) {
        for (j = 0; j < S; j++) {    /* importance uses pre-drop weights */
            B->m[j] = dr[j] != MOE__REJECTED;
            B->q[j] = 1;
            B->dw[j] = B->m[j] ? (float)B->dval[idx[j]] : 0.0f;
        }
        moe__normalize_backward(c, B->g, B->m, B->q, B->dw, B->dg, S);
    }
    for (j = 0; j < S; j++) ds[idx[j]] += B->dg[j];
}

/* Token t's balance and sequence-wise losses, into ds: both see pn = p
   (softmax) or s / sum s (sigmoid). nseq sequences of L tokens. */
static void moe__balance_backward_row(moe__router_bw *B, int32_t t, double *ds, int32_t L,
                                      int32_t nseq) {
    const moe_config *c = B->c;
    const int32_t E = B->E, Ta = B->T_all;
    const float *sc = B->info->scores + (size_t)t * E;
    double ssum = 0.0, corr = 0.0;
    int32_t e;
    if (c->seq_balance_coef != 0.0f && (t == 0 || (B->t0 + t) % L == 0)) {
        const int32_t g0 = (B->t0 + t) / L * L;   /* global start of t's sequence */
        moe__seq_factors(B, t, Ta - g0 < L ? Ta - g0 : L, nseq);
    }
    for (e = 0; e < E; e++)
        B->dw[e] = (float)(B->fbal[e] + (c->seq_balance_coef != 0.0f ? B->fseq[e] : 0.0));
    if (c->score == MOE_SCORE_SOFTMAX) {
        for (e = 0; e < E; e++) ds[e] += B->dw[e];
    } else {
        for (e = 0; e < E; e++) ssum += sc[e];
        if (ssum > 0.0) {
            for (e = 0; e < E; e++) corr += B->dw[e] * (sc[e] / ssum);
            for (e = 0; e < E; e++) ds[e] += (B->dw[e] - corr) / ssum;
        }
    }
}

/* Shazeer noise of token t: H = z + N sigma gives dsigma = dH N, and the
   smooth load loss Load_e = sum_t Phi((z_e - H_k) / sigma_e), H_k the
   threshold, reaches z and sigma. */
static void moe__noise_backward_row(moe__router_bw *B, int32_t t, float *dz) {
    const moe_config *c = B->c;
    const int32_t E = B->E, K = B->K;
    const float *z = B->info->logits + (size_t)t * E;
    float *dsig = B->dsig + (size_t)t * E;
    float thr_in;
    int32_t e;
    moe__noisy_row(B, t);
    for (e = 0; e < E; e++) dsig[e] = dz[e] * B->N[e];
    if (!(K < E && c->load_coef != 0.0f)) return;
    moe__topk_ref(B->H, E, K + 1, B->top);
    thr_in = B->H[B->top[K]];
    for (e = 0; e < E; e++) {
        const int32_t k = B->H[e] > thr_in ? B->top[K] : B->top[K - 1];
        double u, cf;
        if (!(B->sigma[e] > 0.0f)) continue;     /* a step: no gradient */
        u = ((double)z[e] - B->H[k]) / B->sigma[e];
        cf = B->dval[E + e] * 0.39894228040143268 * exp(-0.5 * u * u) / B->sigma[e];
        dz[e] += (float)cf;
        dsig[e] += (float)(-cf * u);
        dz[k] += (float)(-cf);
        dsig[k] += (float)(-cf * B->N[k]);
    }
}

/* Router backward for top-k, expert-choice and dense routing, token by
   token: combine gradient -> gate weights -> scores (+ balance losses) ->
   (noisy) logits (+ z-loss), then the optional clipping of the token's
   gradient. Writes dz [T][E] and, with Shazeer noise, dsig [T][E].        */
static void moe__router_backward_ref(moe__router_bw *B) {
    const moe_config *c = B->c;
    const moe_info *info = B->info;
    const int32_t T = B->T, E = B->E;
    const int topk = c->routing == MOE_ROUTING_TOPK;
    const int noisy = topk && c->noise == MOE_NOISE_SHAZEER && c->training;
    const int32_t Ta = B->T_all;     /* losses normalise by the whole group */
    const int32_t L = c->seq_len > 0 ? c->seq_len : Ta;
    /* no Ta + L - 1: L may be near INT32_MAX */
    const int32_t nseq = Ta > 0 ? 1 + (Ta - 1) / L : 0;
    int32_t t, e;
    memset(B->dz, 0, (size_t)T * E * sizeof(float));
    if (B->dsig) memset(B->dsig, 0, (size_t)T * E * sizeof(float));
    if (T == 0) return;
    if (topk) moe__shazeer_grads(B);
    moe__balance_factors(B);

    for (t = 0; t < T; t++) {
        const float *sc = info->scores + (size_t)t * E, *z = info->logits + (size_t)t * E;
        double *ds = B->ds, dot = 0.0;
        float *dz = B->dz + (size_t)t * E;
        for (e = 0; e < E; e++) ds[e] = 0.0;
        moe__gate_weights_backward(B, t, ds);
        if (topk && (c->balance_coef != 0.0f || c->seq_balance_coef != 0.0f))
            moe__balance_backward_row(B, t, ds, L, nseq);

        /* scores -> (noisy) logits */
        if (c->score == MOE_SCORE_SOFTMAX) {
            for (e = 0; e < E; e++) dot += ds[e] * sc[e];
            for (e = 0; e < E; e++) dz[e] = (float)(sc[e] * (ds[e] - dot));
        } else {
            for (e = 0; e < E; e++) dz[e] = (float)(ds[e] * sc[e] * (1.0 - sc[e]));
        }
        if (noisy) moe__noise_backward_row(B, t, dz);

        /* router z-loss on the clean logits: dz += coef 2/T LSE_t softmax(z_t) */
        if (c->z_loss_coef != 0.0f) {
            const double lse = moe__logsumexp(z, E);
            for (e = 0; e < E; e++)
                dz[e] += (float)(c->z_loss_coef * 2.0 / Ta * lse * exp((double)z[e] - lse));
        }

        /* optional clipping of the token's router gradient */
        if (c->router_grad_clip > 0.0f) {
            double nrm = 0.0;
            for (e = 0; e < E; e++) nrm += (double)dz[e] * dz[e];
            nrm = sqrt(nrm);
            if (nrm > c->router_grad_clip) {
                const float k = (float)(c->router_grad_clip / nrm);
                for (e = 0; e < E; e++) dz[e] *= k;
                if (noisy) for (e = 0; e < E; e++) B->dsig[(size_t)t * E + e] *= k;
            }
        }
    }
}

/* Soft MoE router backward. Forward: q = <x_t, phi_s> / (|x_t| |phi_s|),
   l = scale q, C = softmax_s(l) (rows), D = softmax_t(l) (columns).
     dl = C (dC - sum_s C dC) + D (dD - sum_t D dD)
     dscale += sum dl q
     dx_t   += scale / |x_t| sum_s dl phi_s/|phi_s| - x_t scale (sum_s dl q) / |x_t|^2
     dphi_s += scale / |phi_s| sum_t dl x_t/|x_t| - phi_s scale (sum_t dl q) / |phi_s|^2
   with |v| = sqrt(sum v^2 + 1e-6). dC arrives in dl, dD in dD; q in qbuf.   */
static void moe__soft_router_backward_ref(const moe_config *c, const moe_weights *w,
                                          const moe_grads *gr, const moe_info *info, const float *x,
                                          int32_t T, int32_t R, float *dl, const float *dD,
                                          float *qbuf, float *nphi, float *nx, float *dx) {
    const int32_t D = c->d_model;
    const float scale = w->soft_scale ? w->soft_scale[0] : 1.0f;
    const float *comb = info->scores, *disp = info->dispatch;
    double dscale = 0.0;
    int32_t t, s, d;
    for (s = 0; s < R; s++) {
        float ss = 0.0f;
        for (d = 0; d < D; d++)
            ss += w->soft_phi[(size_t)s * D + d] * w->soft_phi[(size_t)s * D + d];
        nphi[s] = sqrtf(ss + 1e-6f);
    }
    moe__gemm_ref(qbuf, x, w->soft_phi, NULL, T, R, D);
    for (t = 0; t < T; t++) {                              /* q and the row softmax */
        float ss = 0.0f;
        double rdot = 0.0;
        for (d = 0; d < D; d++) ss += x[(size_t)t * D + d] * x[(size_t)t * D + d];
        nx[t] = sqrtf(ss + 1e-6f);
        for (s = 0; s < R; s++) qbuf[(size_t)t * R + s] /= nx[t] * nphi[s];
        for (s = 0; s < R; s++) rdot += (double)comb[(size_t)t * R + s] * dl[(size_t)t * R + s];
        for (s = 0; s < R; s++)
            dl[(size_t)t * R + s] = comb[(size_t)t * R + s] * (float)(dl[(size_t)t * R + s] - rdot);
    }
    for (s = 0; s < R; s++) {                              /* the column softmax */
        double cdot = 0.0;
        for (t = 0; t < T; t++) cdot += (double)disp[(size_t)t * R + s] * dD[(size_t)t * R + s];
        for (t = 0; t < T; t++)
            dl[(size_t)t * R + s] +=
                disp[(size_t)t * R + s] * (float)(dD[(size_t)t * R + s] - cdot);
    }
    for (t = 0; t < T; t++) {                              /* into x */
        const float *xt = x + (size_t)t * D;
        double dq = 0.0;
        for (s = 0; s < R; s++) dq += (double)dl[(size_t)t * R + s] * qbuf[(size_t)t * R + s];
        dscale += dq;
        if (!dx) continue;
        for (d = 0; d < D; d++) {
            float acc = 0.0f;
            for (s = 0; s < R; s++)
                acc += dl[(size_t)t * R + s] * w->soft_phi[(size_t)s * D + d] / nphi[s];
            dx[(size_t)t * D + d] += scale / nx[t] * acc -
                                     xt[d] * (float)(scale * dq) / (nx[t] * nx[t]);
        }
    }
    if (gr->soft_scale) gr->soft_scale[0] += (float)dscale;
    if (!gr->soft_phi) return;
    for (s = 0; s < R; s++) {                              /* into phi */
        const float *ph = w->soft_phi + (size_t)s * D;
        double dq = 0.0;
        for (t = 0; t < T; t++) dq += (double)dl[(size_t)t * R + s] * qbuf[(size_t)t * R + s];
        for (d = 0; d < D; d++) {
            float acc = 0.0f;
            for (t = 0; t < T; t++) acc += dl[(size_t)t * R + s] * x[(size_t)t * D + d] / nx[t];
            gr->soft_phi[(size_t)s * D + d] += scale / nphi[s] * acc -
                                               ph[d] * (float)(scale * dq) / (nphi[s] * nphi[s]);
        }
    }
}

// ----------------------------------------------------------------------------
// Experts: dispatch, grouped FFN, combine

/* Inverted expert dropout (cfg.expert_dropout = p, training): hidden unit f of
   the row processing pair `key` is kept with probability 1 - p and scaled by
   1/(1 - p). A pure function of (seed, key, f): the backward regenerates the
   forward's mask, and it does not depend on row order or threads.         */
static float moe__dropout_scale(const moe_config *c, uint64_t key, int32_t f) {
    const double u = moe__rng_uniform(c->seed, MOE__RNG_DROPOUT,
                                      key * (uint64_t)c->d_ff + (uint64_t)f);
    return u < c->expert_dropout ? 0.0f : 1.0f / (1.0f - c->expert_dropout);
}
/* h[r][u] *= mask for rows [r0, r1) and units [u0, u1) (row stride F). */
static void moe__dropout_apply(const moe__ffn *f, float *h, int64_t r0, int64_t r1, int32_t u0,
                               int32_t u1) {
    int64_t r;
    int32_t u;
    if (!f->dropout) return;
    for (r = r0; r < r1; r++) {
        const uint64_t key = f->row_key ? (uint64_t)f->row_key[r] : (uint64_t)r;
        for (u = u0; u < u1; u++)
            h[(size_t)r * (size_t)f->F + (size_t)u] *= moe__dropout_scale(f->dropout, key, u);
    }
}

static moe__ffn moe__ffn_make(const moe_config *c, int32_t F, int fused,
                              const float *gate, const float *up, const float *down,
                              const float *gb, const float *ub, const float *db, int shared) {
    moe__ffn f;
    const size_t D = (size_t)c->d_model;
    memset(&f, 0, sizeof f);                            /* no blocks */
    f.D = c->d_model; f.F = F; f.act = c->activation;
    f.gate_stride = shared ? 0 : (size_t)(fused ? 2 : 1) * (size_t)F * D;
    f.up_stride = f.gate_stride;
    f.down_stride = shared ? 0 : D * (size_t)F;
    f.gate = gate; f.down = down;
    f.up = fused && gate ? gate + (size_t)F * D : up;   /* HF gate_up_proj: up rows follow */
    f.gate_bias = c->expert_bias ? gb : NULL;
    f.up_bias = c->expert_bias ? ub : NULL;
    f.down_bias = c->expert_bias ? db : NULL;
    f.dropout = NULL; f.row_key = NULL;
    return f;
}
/* Expert matrices of `rows` rows of `cols` values each, in blocks of `type`
   at data (data NULL: fp32, or a type outside moe_qtype, which the checks
   refuse before anything runs). */
static moe__qmat moe__qmat_of(int32_t type, const void *data, size_t rows, size_t cols) {
    moe__qmat q;
    const moe__qinfo qi = moe__qblock(type);
    q.type = type;
    q.data = type != MOE_QTYPE_F32 && qi.block > 0 ? (const unsigned char *)data : NULL;
    q.row_bytes = q.data ? cols / (size_t)qi.block * qi.bytes : 0;
    q.stride = rows * q.row_bytes;
    return q;
}
static moe__ffn moe__routed_ffn(const moe_config *c, const moe_weights *w) {
    const size_t F = (size_t)c->d_ff, D = (size_t)c->d_model;
    const size_t gate_rows = w->gate_up_fused ? 2 * F : F;
    moe__ffn f = moe__ffn_make(c, c->d_ff, w->gate_up_fused, w->gate, w->up, w->down,
                               w->gate_bias, w->up_bias, w->down_bias, 0);
    f.gate_q = moe__qmat_of(w->gate_type, w->gate_q, gate_rows, D);
    if (w->gate_up_fused) {                    /* up rows follow the gate rows */
        f.up_q = f.gate_q;
        if (f.up_q.data) f.up_q.data += F * f.up_q.row_bytes;
    } else if (moe__act_is_glu(c->activation)) {
        f.up_q = moe__qmat_of(w->up_type, w->up_q, F, D);
    }                                          /* else up is unused: no blocks */
    f.down_q = moe__qmat_of(w->down_type, w->down_q, D, F);
    return f;
}
/* The routed experts as a training layer sees them: with expert dropout
   keyed by the pair each row processes (Soft MoE: by the slot).           */
static moe__ffn moe__routed_ffn_train(const moe_config *c, const moe_weights *w,
                                      const int64_t *row_pair) {
    moe__ffn f = moe__routed_ffn(c, w);
    if (c->training && c->expert_dropout > 0.0f) {
        f.dropout = c;
        f.row_key = c->routing == MOE_ROUTING_SOFT ? NULL : row_pair;
    }
    return f;
}
static moe__ffn moe__shared_ffn(const moe_config *c, const moe_weights *w) {
    const size_t Fs = (size_t)c->shared_d_ff, D = (size_t)c->d_model;
    moe__ffn f = moe__ffn_make(c, c->shared_d_ff, 0, w->shared_gate, w->shared_up,
                               w->shared_down, w->shared_gate_bias, w->shared_up_bias,
                               w->shared_down_bias, 1);
    f.gate_q = moe__qmat_of(w->shared_gate_type, w->shared_gate_q, Fs, D);
    if (moe__act_is_glu(c->activation))
        f.up_q = moe__qmat_of(w->shared_up_type, w->shared_up_q, Fs, D);
    f.down_q = moe__qmat_of(w->shared_down_type, w->shared_down_q, D, Fs);
    return f;
}

/* Counting sort of the kept (token, slot) pairs into expert-contiguous rows.
   Stable: within an expert, rows follow token order. pair_row[t][j] is the
   row of pair (t, j), or -1 when the pair was not routed, was dropped or was
   rejected; row_pair is the inverse (row -> t * S + j). offsets: [E + 1] row
   starts.                                                                  */
static void moe__dispatch_ref(const int32_t *expert, const uint8_t *dropped, int32_t T, int32_t S,
                              int32_t E, int64_t *offsets, int64_t *pair_row, int64_t *row_pair) {
    int32_t t, j, e;
    size_t p;
    for (e = 0; e <= E; e++) offsets[e] = 0;
    for (p = 0; p < (size_t)T * (size_t)S; p++)            /* pass 1: count */
        if (expert[p] >= 0 && !dropped[p]) offsets[expert[p] + 1]++;
    for (e = 0; e < E; e++) offsets[e + 1] += offsets[e];  /* pass 2: prefix sums */
    for (t = 0; t < T; t++)                                /* pass 3: place, offsets[e] as cursor */
        for (j = 0; j < S; j++) {
            p = (size_t)t * S + j;
            e = expert[p];
            if (e < 0 || dropped[p]) { pair_row[p] = -1; continue; }
            pair_row[p] = offsets[e]++;
            row_pair[pair_row[p]] = (int64_t)p;
        }
    for (e = E; e > 0; e--) offsets[e] = offsets[e - 1];   /* cursors -> starts */
    offsets[0] = 0;
}

typedef struct moe__gather_job {
    float *xg; const float *x; const int64_t *row_pair; int32_t S, D;
} moe__gather_job;
static void moe__gather_rows(void *arg, int64_t r0, int64_t r1) {
    const moe__gather_job *J = (const moe__gather_job *)arg;
    int64_t r;
    for (r = r0; r < r1; r++)
        memcpy(J->xg + (size_t)r * J->D, J->x + (size_t)(J->row_pair[r] / J->S) * J->D,
               (size_t)J->D * sizeof(float));
}

/* Soft MoE slot inputs xs[s] = sum_t dispatch[t][s] * x[t]  (X~ = D^T X).  */
static void moe__soft_slots_ref(float *xs, const float *dispatch, const float *x,
                                int32_t T, int32_t R, int32_t D) {
    int32_t s, t, d;
    for (s = 0; s < R; s++) {
        float *xsr = xs + (size_t)s * D;
        for (d = 0; d < D; d++) xsr[d] = 0.0f;
        for (t = 0; t < T; t++) {
            const float dw = dispatch[(size_t)t * R + s];
            for (d = 0; d < D; d++) xsr[d] += dw * x[(size_t)t * D + d];
        }
    }
}

/* Stage 3 of the layer: expert inputs in expert-contiguous rows xg (a gather,
   or Soft MoE's dispatch mixtures), with offsets, pair_row and row_pair.    */
static void moe__expert_inputs(const moe_config *c, const float *x, int32_t T,
                               const int32_t *expert, const uint8_t *dropped, const float *dispatch,
                               const moe__ws *ws) {
    const int32_t E = c->num_experts, D = c->d_model;
    int64_t *offsets = ws->offsets;
    const int64_t *row_pair = ws->row_pair;
    float *xg = ws->xg;
    if (c->routing == MOE_ROUTING_SOFT) {
        int32_t e;
        for (e = 0; e <= E; e++) offsets[e] = (int64_t)e * c->slots_per_expert;
        moe__soft_slots_ref(xg, dispatch, x, T, ws->R, D);
    } else {
        moe__dispatch_ref(expert, dropped, T, ws->S, E, offsets, ws->pair_row,
                          ws->row_pair);
        moe__gather_job J;
        J.xg = xg; J.x = x; J.row_pair = row_pair; J.S = ws->S; J.D = D;
        moe__parallel_rows(c, offsets[E], 256, moe__gather_rows, &J, (double)offsets[E] * D);
    }
}

/* Row kernels of the activation backward, the combine, its backward and the
   gather to tokens, as _ref (plain loops, the spec) and _simd twins with the
   same signatures; the kernel table (moe__kernels) picks one set per call.

   Activation backward over elements [i0, i1) (moe__act_grad's formulas):
   GLU: du = da act(hg), dh = da hu act'(hg);  else dh = da act'(hg).
   dh holds da on entry. ha (or NULL): also rebuild the activation
   act(hg) [* hu] from a training cache while hg, hu pass by anyway.        */
static void moe__act_backward_ref(moe_activation act, float *dh, float *du, const float *hg,
                                  const float *hu, float *ha, size_t i0, size_t i1) {
    const int glu = moe__act_is_glu(act);
    size_t i;
    for (i = i0; i < i1; i++) {
        const float da = dh[i];
        if (ha) ha[i] = glu ? moe__act(act, hg[i]) * hu[i] : moe__act(act, hg[i]);
        if (glu) {
            du[i] = da * moe__act(act, hg[i]);
            dh[i] = da * hu[i] * moe__act_grad(act, hg[i]);
        } else dh[i] = da * moe__act_grad(act, hg[i]);
    }
}

/* y = w x, or y += w x with accumulate. */
static void moe__add_scaled_ref(float *y, const float *x, float w, size_t n, int accumulate) {
    size_t i;
    for (i = 0; i < n; i++) y[i] = accumulate ? y[i] + w * x[i] : w * x[i];
}

static float moe__dot_ref(const float *a, const float *b, size_t n) {
    float acc = 0.0f;
    size_t i;
    for (i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}


/* y = x . W_e^T + bias for expert e of a matrix set: fp32 (W, e * stride
   elements on) or blocks (q->data set). */
static void moe__project_ref(float *y, const float *x, const float *W, size_t stride,
                             const moe__qmat *q, size_t e, const float *bias, int64_t n,
                             int32_t n_out, int32_t n_in) {
    if (q->data) moe__gemm_q_ref(y, x, q, e, bias, n, n_out, n_in);
    else moe__gemm_ref(y, x, W + e * stride, bias, n, n_out, n_in);
}

/* Grouped expert FFN over expert-contiguous rows: rows [off[e], off[e+1]) of
   x belong to expert e. The reference (moe__gemm_ref per projection), the
   spec of moe__experts_simd; the kernel table picks one of them.
     x: [N][D]   hg, hu: [N][F] pre-activations (hu only for GLU)
     ha: [N][F] activation   out: [N][D]
     hg = gate_e.x + bg;  hu = up_e.x + bu;  ha = act(hg) [* hu];  out = down_e.ha + bd */
static void moe__experts_forward_ref(const moe__ffn *f, int32_t num_experts, const int64_t *off,
                                     const float *x, float *hg, float *hu, float *ha, float *out) {
    const size_t D = (size_t)f->D, F = (size_t)f->F;
    const int glu = moe__act_is_glu(f->act);
    int32_t e;
    for (e = 0; e < num_experts; e++) {
        const int64_t r0 = off[e], n = off[e + 1] - off[e];
        const size_t h0 = (size_t)r0 * F;
        if (n == 0) continue;
        moe__project_ref(hg + h0, x + (size_t)r0 * D, f->gate, f->gate_stride, &f->gate_q,
                         (size_t)e, f->gate_bias ? f->gate_bias + (size_t)e * F : NULL, n, f->F,
                         f->D);
        if (glu)
            moe__project_ref(hu + h0, x + (size_t)r0 * D, f->up, f->up_stride, &f->up_q,
                             (size_t)e, f->up_bias ? f->up_bias + (size_t)e * F : NULL, n, f->F,
                             f->D);
        moe__activate_ref(f->act, ha + h0, hg + h0, glu ? hu + h0 : NULL, (size_t)n * F);
        moe__dropout_apply(f, ha, r0, r0 + n, 0, f->F);
        moe__project_ref(out + (size_t)r0 * D, ha + h0, f->down, f->down_stride, &f->down_q,
                         (size_t)e, f->down_bias ? f->down_bias + (size_t)e * D : NULL, n, f->D,
                         f->F);
    }
}

/* Backward of moe__experts_forward_ref in plain loops (the spec of
   moe__experts_backward_simd):
     da = dout . down_e                       d bd += sum dout
     GLU: du = da * act(hg), dh = da * hu * act'(hg);   else dh = da * act'(hg)
     d down_e += dout^T . ha
     d gate_e += dh^T . x,  d up_e += du^T . x,  d bg += sum dh,  d bu += sum du
     dx = dh . gate_e + du . up_e   (overwritten, [N][D]; NULL: not wanted)
   Every sum runs in ascending order, a gradient's over its expert's rows
   from its value on entry, as moe__sgemm_ref sums (and streams rows, as it
   does). Two passes of independent tasks: rows (da, the activation, dx),
   then gradient rows (one output unit of one expert each). rebuild_ha: hg
   and hu come from a training cache and ha is rebuilt from them first.
   NULL gradient tensors are skipped.                                       */
typedef struct moe__experts_bw_job {
    const moe__ffn *f;
    const moe__ffn_grad *g;
    const int64_t *off;
    int32_t n_sets;
    const float *x, *hg, *hu, *dout;
    float *ha, *dh, *du, *dx;
    int rebuild_ha;
} moe__experts_bw_job;
static int32_t moe__expert_of_row(const int64_t *off, int32_t n_sets, int64_t r) {
    int32_t lo = 0, hi = n_sets - 1;   /* the e with off[e] <= r < off[e + 1] */
    while (lo < hi) {
        const int32_t mid = lo + (hi - lo + 1) / 2;
        if (off[mid] <= r) lo = mid; else hi = mid - 1;
    }
    return lo;
}
static void moe__experts_bw_rows_ref(void *arg, int64_t r0, int64_t r1) {
    const moe__experts_bw_job *J = (const moe__experts_bw_job *)arg;
    const moe__ffn *f = J->f;
    const size_t D = (size_t)f->D, F = (size_t)f->F;
    const int glu = moe__act_is_glu(f->act);
    int64_t r;
    size_t i, j;
    int32_t e;
    r0 += J->off[0]; r1 += J->off[0];
    e = moe__expert_of_row(J->off, J->n_sets, r0);
    for (r = r0; r < r1; r++) {
        const float *dy = J->dout + (size_t)r * D, *down, *gate, *up;
        float *dhr = J->dh + (size_t)r * F, *dur = glu ? J->du + (size_t)r * F : NULL;
        while (J->off[e + 1] <= r) e++;
        down = f->down + (size_t)e * f->down_stride;
        gate = f->gate + (size_t)e * f->gate_stride;
        up = glu ? f->up + (size_t)e * f->up_stride : NULL;
        for (j = 0; j < F; j++) dhr[j] = 0.0f;              /* da = dout . down_e */
        for (i = 0; i < D; i++)
            for (j = 0; j < F; j++) dhr[j] += dy[i] * down[i * F + j];
        moe__dropout_apply(f, J->dh, r, r + 1, 0, f->F);    /* through the dropout mask */
        moe__act_backward_ref(f->act, dhr, dur, J->hg + (size_t)r * F,
                              glu ? J->hu + (size_t)r * F : NULL,
                              J->rebuild_ha ? J->ha + (size_t)r * F : NULL, 0, F);
        if (J->rebuild_ha) moe__dropout_apply(f, J->ha, r, r + 1, 0, f->F);
        if (J->dx) {                                        /* dx = dh . gate_e + du . up_e */
            float *dxr = J->dx + (size_t)r * D;
            for (i = 0; i < D; i++) dxr[i] = 0.0f;
            for (j = 0; j < F; j++)
                for (i = 0; i < D; i++) dxr[i] += dhr[j] * gate[j * D + i];
            if (glu)
                for (j = 0; j < F; j++)
                    for (i = 0; i < D; i++) dxr[i] += dur[j] * up[j * D + i];
        }
    }
}
/* Gradient rows q of [q0, q1): q < n_sets F is hidden unit j of expert
   q / F (d gate_e, d up_e rows j, d bg, d bu); the rest are model units i
   of an expert (d down_e row i, d bd).                                    */
static void moe__experts_bw_grads_ref(void *arg, int64_t q0, int64_t q1) {
    const moe__experts_bw_job *J = (const moe__experts_bw_job *)arg;
    const moe__ffn *f = J->f;
    const moe__ffn_grad *g = J->g;
    const size_t D = (size_t)f->D, F = (size_t)f->F, nF = (size_t)J->n_sets * F;
    const int glu = moe__act_is_glu(f->act);
    int64_t q, r;
    size_t i, j;
    for (q = q0; q < q1; q++) {
        const int hidden = (size_t)q < nF;
        const size_t e = hidden ? (size_t)q / F : ((size_t)q - nF) / D,
                     o = hidden ? (size_t)q % F : ((size_t)q - nF) % D;
        if (hidden) {
            float *d_gate = g->gate ? g->gate + e * f->gate_stride + o * D : NULL,
                  *d_up = glu && g->up ? g->up + e * f->up_stride + o * D : NULL,
                  *d_bg = g->gate_bias ? g->gate_bias + e * F + o : NULL,
                  *d_bu = glu && g->up_bias ? g->up_bias + e * F + o : NULL;
            for (r = J->off[e]; r < J->off[e + 1]; r++) {
                const float *xr = J->x + (size_t)r * D, dh = J->dh[(size_t)r * F + o],
                            du = glu ? J->du[(size_t)r * F + o] : 0.0f;
                if (d_gate) for (i = 0; i < D; i++) d_gate[i] += dh * xr[i];
                if (d_up) for (i = 0; i < D; i++) d_up[i] += du * xr[i];
                if (d_bg) *d_bg += dh;
                if (d_bu) *d_bu += du;
            }
        } else {
            float *d_down = g->down ? g->down + e * f->down_stride + o * F : NULL,
                  *d_bd = g->down_bias ? g->down_bias + e * D + o : NULL;
            for (r = J->off[e]; r < J->off[e + 1]; r++) {
                const float dy = J->dout[(size_t)r * D + o], *har = J->ha + (size_t)r * F;
                if (d_down) for (j = 0; j < F; j++) d_down[j] += dy * har[j];
                if (d_bd) *d_bd += dy;
            }
        }
    }
}
static void moe__experts_backward_ref(const moe_config *c, const moe__ffn *f,
                                      const moe__ffn_grad *g, int32_t n_sets, const int64_t *off,
                                      const float *x, const float *hg, const float *hu, float *ha,
                                      int rebuild_ha, const float *dout, float *dh, float *du,
                                      float *dx, float *pack) {
    const double rows = (double)(off[n_sets] - off[0]), DF = (double)f->D * (double)f->F;
    moe__experts_bw_job J;
    J.f = f; J.g = g; J.off = off; J.n_sets = n_sets; J.x = x; J.hg = hg; J.hu = hu;
    J.dout = dout; J.ha = ha; J.dh = dh; J.du = du; J.dx = dx; J.rebuild_ha = rebuild_ha;
    (void)pack;
    if (n_sets <= 0) return;
    moe__parallel_rows(c, off[n_sets] - off[0], 16, moe__experts_bw_rows_ref, &J,
                       6.0 * rows * DF);
    moe__parallel_rows(c, (int64_t)n_sets * (f->F + f->D), 16, moe__experts_bw_grads_ref, &J,
                       6.0 * rows * DF);
}

/* The kernel table's experts entry on the reference: moe__experts_forward_ref. */
static void moe__experts_ref(const moe_config *c, const moe__ffn *f,
                             const unsigned char *packed_set, int32_t n_sets, const int64_t *off,
                             const float *x, float *hg, float *hu, float *ha, float *out,
                             float *tiles, const moe__ws *ws) {
    (void)c; (void)packed_set; (void)tiles; (void)ws;
    moe__experts_forward_ref(f, n_sets, off, x, hg, hu, ha, out);
}

/* y[t] = sum_j weight[t][j] * out[pair_row[t][j]], slots in order 0..S-1 so the
   sum is the same on every run (each token pulls its own results: no
   atomics, any thread count). A token with no kept pair gets 0.          */
typedef struct moe__combine_job {
    float *y;
    const float *out, *weight;
    const int64_t *pair_row;
    int32_t S, D;
    const moe__kernels *k;
} moe__combine_job;
static void moe__combine_rows(void *arg, int64_t t0, int64_t t1) {
    const moe__combine_job *J = (const moe__combine_job *)arg;
    float *y = J->y;
    const float *out = J->out, *weight = J->weight;
    const int64_t *pair_row = J->pair_row;
    const int32_t S = J->S, D = J->D;
    int64_t t;
    int32_t j, d;
    for (t = t0; t < t1; t++) {
        float *yt = y + (size_t)t * D;
        for (d = 0; d < D; d++) yt[d] = 0.0f;
        for (j = 0; j < S; j++) {
            const int64_t row = pair_row[(size_t)t * S + j];
            if (row < 0) continue;
            J->k->add_scaled(yt, out + (size_t)row * D, weight[(size_t)t * S + j], (size_t)D, 1);
        }
    }
}
static void moe__combine(const moe_config *c, float *y, const float *out, const float *weight,
                         const int64_t *pair_row, int32_t T, int32_t S, int32_t D) {
    moe__combine_job J;
    J.y = y; J.out = out; J.weight = weight; J.pair_row = pair_row; J.S = S; J.D = D;
    J.k = moe__kernels_of(c);
    moe__parallel_rows(c, T, 64, moe__combine_rows, &J, 2.0 * (double)T * S * D);
}

/* Row-parallel pieces of moe__backward (top-k, dense and expert choice: a
   token's pairs own distinct rows, so tokens are independent tasks).
   combine: gw[t][j] = <dy_t, out[row]>, dout[row] = w[t][j] dy_t.
   gather: dx_t = sum_j dxg[row(t, j)], slots in order.                   */
typedef struct moe__bw_rows_job {
    const float *dy, *out, *weight, *dxg;
    float *gw, *dout, *dx;
    const int64_t *pair_row;
    int32_t S, D;
    const moe__kernels *k;
} moe__bw_rows_job;
static void moe__bw_combine_rows(void *arg, int64_t t0, int64_t t1) {
    const moe__bw_rows_job *J = (const moe__bw_rows_job *)arg;
    const size_t D = (size_t)J->D;
    int64_t t;
    int32_t j;
    for (t = t0; t < t1; t++)
        for (j = 0; j < J->S; j++) {
            const size_t p = (size_t)t * (size_t)J->S + (size_t)j;
            const int64_t row = J->pair_row[p];
            const float *dyt = J->dy + (size_t)t * D;
            if (row < 0) { J->gw[p] = 0.0f; continue; }
            J->k->add_scaled(J->dout + (size_t)row * D, dyt, J->weight[p], D, 0);
            J->gw[p] = J->k->dot(dyt, J->out + (size_t)row * D, D);
        }
}
static void moe__bw_gather_rows(void *arg, int64_t t0, int64_t t1) {
    const moe__bw_rows_job *J = (const moe__bw_rows_job *)arg;
    const size_t D = (size_t)J->D;
    int64_t t;
    int32_t j;
    for (t = t0; t < t1; t++)
        for (j = 0; j < J->S; j++) {
            const int64_t row = J->pair_row[(size_t)t * (size_t)J->S + (size_t)j];
            if (row >= 0)
                J->k->add_scaled(J->dx + (size_t)t * D, J->dxg + (size_t)row * D, 1.0f, D, 1);
        }
}

/* Soft MoE output y[t] = sum_s C[t][s] * out[s]  (Y = C . Y~), s in order. */
static void moe__soft_combine_ref(float *y, const float *combine, const float *out, int32_t T,
                                  int32_t R, int32_t D) {
    int32_t t, s, d;
    for (t = 0; t < T; t++) {
        float *yt = y + (size_t)t * D;
        for (d = 0; d < D; d++) yt[d] = 0.0f;
        for (s = 0; s < R; s++) {
            const float cw = combine[(size_t)t * R + s];
            for (d = 0; d < D; d++) yt[d] += cw * out[(size_t)s * D + d];
        }
    }
}

/* y[t] += gamma[t] * sh_out[t]: the shared expert on every token (gamma
   NULL: 1; else its sigmoid gate, Qwen2). */
static void moe__add_shared(float *y, const float *sh_out, const float *gamma, int32_t T,
                            int32_t D) {
    int32_t t, d;
    for (t = 0; t < T; t++) {
        const float gate = gamma ? gamma[t] : 1.0f;
        for (d = 0; d < D; d++) y[(size_t)t * D + d] += gate * sh_out[(size_t)t * D + d];
    }
}

/* gamma_t = sigmoid(x_t . w_sg), the Qwen2-MoE shared-expert gate (1 if ungated). */
static float moe__shared_expert_gate_of(const moe_config *c, const moe_weights *w,
                                        const float *xt) {
    float z = 0.0f;
    int32_t d;
    if (!c->shared_expert_gated) return 1.0f;
    for (d = 0; d < c->d_model; d++) z += xt[d] * w->shared_expert_gate[d];
    return moe__sigmoid(z);
}

// ----------------------------------------------------------------------------
// Fast kernels (BLIS's layers): ISA primitives, the micro-kernel, the vector
// activation and row kernels, the blocked GEMM on packed operands, the packed
// expert FFN and its backward, and the kernel tables. Each is the twin of a
// plain reference above with the same contract; the stages reach them only
// through the kernel table (moe__kernels_of).

/* ISA primitives: each ISA has the same ones, and the micro-kernel and the
   vector sigmoid are written once on them. */
#if MOE__HAS_SIMD && defined(__AVX512F__)
typedef __m512 moe__vf;
static moe__vf moe__v_load(const float *p) { return _mm512_loadu_ps(p); }
static void moe__v_store(float *p, moe__vf v) { _mm512_storeu_ps(p, v); }
static moe__vf moe__v_set1(float a) { return _mm512_set1_ps(a); }
static moe__vf moe__v_zero(void) { return _mm512_setzero_ps(); }
static moe__vf moe__v_fma(moe__vf a, moe__vf b, moe__vf c) { return _mm512_fmadd_ps(a, b, c); }
static moe__vf moe__v_add(moe__vf a, moe__vf b) { return _mm512_add_ps(a, b); }
/* A row pair of a bf16 panel holds column j's weights for k and k + 1 in
   one 32-bit word, k in the low half: lo widens the k row (a shift), hi the
   k + 1 row (a mask). Each loads the pair itself, so the kernel need not
   hold both rows' vectors at once (AVX2's 6x16 tile has no registers to
   spare; see MOE__OPAQUE).
   (Zero-masked forms: GCC 12's unmasked ones start from an "undefined"
   register that g++ -O3 reports as maybe-uninitialized.)                  */
static moe__vf moe__v_bf16_lo(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32((__mmask16)0xFFFF,
                                                       _mm512_loadu_si512((const void *)p), 16));
}
static moe__vf moe__v_bf16_hi(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_maskz_and_epi32((__mmask16)0xFFFF,
                                                      _mm512_loadu_si512((const void *)p),
                                                      _mm512_set1_epi32((int)0xffff0000u)));
}
static moe__vf moe__v_mul(moe__vf a, moe__vf b) { return _mm512_mul_ps(a, b); }
static moe__vf moe__v_div(moe__vf a, moe__vf b) { return _mm512_div_ps(a, b); }
static moe__vf moe__v_neg_abs(moe__vf a) {               /* -|a|: set the sign bit */
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a),
                                               _mm512_set1_epi32((int)0x80000000u)));
}
static moe__vf moe__v_round(moe__vf a) {
    return _mm512_maskz_roundscale_ps((__mmask16)0xFFFF, a,
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static moe__vf moe__v_pow2i(moe__vf n) {                 /* 2^n, n integral in [-126, 127] */
    const __mmask16 all = (__mmask16)0xFFFF;
    const __m512i e = _mm512_add_epi32(_mm512_maskz_cvtps_epi32(all, n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(all, e, 23));
}
static moe__vf moe__v_select_lt(moe__vf x, moe__vf c, moe__vf a, moe__vf b) {   /* x < c ? a : b */
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, c, _CMP_LT_OQ), b, a);
}
#elif MOE__HAS_SIMD && defined(__AVX2__)
typedef __m256 moe__vf;
static moe__vf moe__v_load(const float *p) { return _mm256_loadu_ps(p); }
static void moe__v_store(float *p, moe__vf v) { _mm256_storeu_ps(p, v); }
static moe__vf moe__v_set1(float a) { return _mm256_set1_ps(a); }
static moe__vf moe__v_zero(void) { return _mm256_setzero_ps(); }
static moe__vf moe__v_fma(moe__vf a, moe__vf b, moe__vf c) { return _mm256_fmadd_ps(a, b, c); }
static moe__vf moe__v_add(moe__vf a, moe__vf b) { return _mm256_add_ps(a, b); }
static moe__vf moe__v_bf16_lo(const uint16_t *p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(const void *)p), 16));
}
static moe__vf moe__v_bf16_hi(const uint16_t *p) {   /* shifts: no mask register */
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)(const void *)p), 16), 16));
}
static moe__vf moe__v_mul(moe__vf a, moe__vf b) { return _mm256_mul_ps(a, b); }
static moe__vf moe__v_div(moe__vf a, moe__vf b) { return _mm256_div_ps(a, b); }
static moe__vf moe__v_neg_abs(moe__vf a) {   /* -|a| */
    return _mm256_or_ps(a, _mm256_set1_ps(-0.0f));
}
static moe__vf moe__v_round(moe__vf a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static moe__vf moe__v_pow2i(moe__vf n) {                 /* 2^n, n integral in [-126, 127] */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                                  _mm256_set1_epi32(127)), 23));
}
static moe__vf moe__v_select_lt(moe__vf x, moe__vf c, moe__vf a, moe__vf b) {   /* x < c ? a : b */
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, c, _CMP_LT_OQ));
}
#elif MOE__HAS_SIMD
typedef float32x4_t moe__vf;
static moe__vf moe__v_load(const float *p) { return vld1q_f32(p); }
static void moe__v_store(float *p, moe__vf v) { vst1q_f32(p, v); }
static moe__vf moe__v_set1(float a) { return vdupq_n_f32(a); }
static moe__vf moe__v_zero(void) { return vdupq_n_f32(0.0f); }
static moe__vf moe__v_fma(moe__vf a, moe__vf b, moe__vf c) { return vfmaq_f32(c, a, b); }
static moe__vf moe__v_add(moe__vf a, moe__vf b) { return vaddq_f32(a, b); }
static moe__vf moe__v_bf16_lo(const uint16_t *p) {
    return vreinterpretq_f32_u32(vshlq_n_u32(vld1q_u32((const uint32_t *)(const void *)p), 16));
}
static moe__vf moe__v_bf16_hi(const uint16_t *p) {
    return vreinterpretq_f32_u32(vandq_u32(vld1q_u32((const uint32_t *)(const void *)p),
                                           vdupq_n_u32(0xffff0000u)));
}
static moe__vf moe__v_mul(moe__vf a, moe__vf b) { return vmulq_f32(a, b); }
static moe__vf moe__v_div(moe__vf a, moe__vf b) { return vdivq_f32(a, b); }
static moe__vf moe__v_neg_abs(moe__vf a) { return vnegq_f32(vabsq_f32(a)); }
static moe__vf moe__v_round(moe__vf a) { return vrndnq_f32(a); }
static moe__vf moe__v_pow2i(moe__vf n) {                 /* 2^n, n integral in [-126, 127] */
    return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23));
}
static moe__vf moe__v_select_lt(moe__vf x, moe__vf c, moe__vf a, moe__vf b) {   /* x < c ? a : b */
    return vbslq_f32(vcltq_f32(x, c), a, b);
}
#endif

#if defined(__GNUC__) || defined(__clang__)
#  define MOE__PREFETCH(p) __builtin_prefetch(p)
#  define MOE__PREFETCH_L2(p) __builtin_prefetch(p, 0, 2)
#  define MOE__UNROLL _Pragma("GCC unroll 16")
#  define MOE__UNROLL_K _Pragma("GCC unroll 4")   /* the k loop: ~15% (AVX2, AMD Zen 3) */
/* z keeps its value (0), but the compiler no longer knows it: p + z is then
   loaded again, not taken from a register the compiler would have to keep */
#  define MOE__OPAQUE(z) __asm__("" : "+r"(z))
#else
#  define MOE__PREFETCH(p) ((void)0)
#  define MOE__PREFETCH_L2(p) ((void)0)
#  define MOE__UNROLL
#  define MOE__UNROLL_K
#  define MOE__OPAQUE(z) ((void)0)
#endif

#if MOE__HAS_SIMD
/* What a micro-kernel tile reads as B (and A):
     MOE__B_F32   fp32 rows [depth][NR]
     MOE__B_BF16  bf16 row pairs [depth/2][NR][2] (moe__v_bf16_lo/hi), widened
                  to fp32 exactly: fp32 products of bf16 weights
     MOE__B_DOT   bf16 row pairs, and A as bf16 pairs too (one 32-bit word per
                  row and pair of k): VDPBF16PS, 2 k steps per instruction.
                  AVX512-BF16 builds only (cfg.pack_bf16 = 2).              */
#define MOE__B_F32 0
#define MOE__B_BF16 1
#define MOE__B_DOT 2
#if defined(__AVX512BF16__) && MOE__SIMD_ISA == MOE_ISA_AVX512
#  define MOE__HAS_BF16_DOT 1
#else
#  define MOE__HAS_BF16_DOT 0
#endif

/* C tile rows += a(., k) * (b0 | b1): one rank-1 update. */
MOE__INLINE void moe__tile_rank1(const int32_t mr, moe__vf *c0, moe__vf *c1, const float *const *a,
                                 size_t ak, moe__vf b0, moe__vf b1) {
    int32_t i;
    MOE__UNROLL
    for (i = 0; i < mr; i++) {
        const moe__vf av = moe__v_set1(a[i][ak]);
        c0[i] = moe__v_fma(av, b0, c0[i]);
        c1[i] = moe__v_fma(av, b1, c1[i]);
    }
}

/* Micro-kernel (bench/moe_bench.c variants 2-4): an mr x NR tile of C in
   registers, one rank-1 update per k: two vector loads of B, mr broadcasts
   of A, 2*mr FMAs. mr is a compile-time constant in each instance below, so
   a one-token (decode) tile does one row of work, not MR. Each C element
   sums k in ascending order, like the reference (results differ by FMA
   rounding only; MOE__B_DOT adds each pair k+1 first, as VDPBF16PS does).
   pf (a constant too): on the way, prefetch pf_rows rows of a packed panel
   from next, one every pf_every k steps.                                  */
MOE__INLINE void moe__tile_body(const int32_t mr, const int kind, int64_t depth, const float *A,
                                size_t a_rs, size_t a_cs, const void *B, size_t ldb, float *C,
                                size_t ldc, int accumulate, const int pf, const char *next,
                                int64_t pf_rows, int64_t pf_every) {
    moe__vf c0[MOE__MR], c1[MOE__MR];
    const float *a[MOE__MR];
    const int64_t step = kind == MOE__B_F32 ? 1 : 2;
    /* MOE__B_DOT: an odd depth's last pair runs whole (A's and the panel's k + 1 are 0) */
    const int64_t k_end = kind == MOE__B_DOT ? depth + (depth & 1) : depth;
    const size_t row = MOE__NR * (kind == MOE__B_F32 ? sizeof(float) : sizeof(uint16_t));
    size_t again = 0;       /* hi loads the pair again in a tall tile: no spills */
    int64_t k, pf_k = 0;
    int32_t i;
    if (2 * mr > MOE__MR) MOE__OPAQUE(again);
    MOE__UNROLL
    for (i = 0; i < mr; i++) {
        a[i] = A + (size_t)i * a_rs;
        c0[i] = moe__v_zero();
        c1[i] = moe__v_zero();
    }
    MOE__UNROLL_K
    for (k = 0; k + step <= k_end; k += step) {
        const size_t bk = (size_t)k * ldb;      /* a row pair of NR columns is 2 * NR bf16 */
        if (pf && k >= pf_k && pf_rows > 0) {   /* a row of the next panel, towards L2 */
            size_t o;
            for (o = 0; o < row; o += 64) MOE__PREFETCH_L2(next + o);
            next += row; pf_rows--; pf_k += pf_every;
        }
        if (kind == MOE__B_F32) {
            moe__tile_rank1(mr, c0, c1, a, (size_t)k * a_cs, moe__v_load((const float *)B + bk),
                            moe__v_load((const float *)B + bk + MOE__VL));
        } else if (kind == MOE__B_BF16) {
            const uint16_t *bp = (const uint16_t *)B + bk;
            moe__tile_rank1(mr, c0, c1, a, (size_t)k * a_cs, moe__v_bf16_lo(bp),
                            moe__v_bf16_lo(bp + 2 * MOE__VL));
            moe__tile_rank1(mr, c0, c1, a, (size_t)(k + 1) * a_cs, moe__v_bf16_hi(bp + again),
                            moe__v_bf16_hi(bp + again + 2 * MOE__VL));
        }
#if MOE__HAS_BF16_DOT
        else {                                  /* A: [depth/2][a_cs] words, row i at i * a_rs */
            const __m512i w0 = _mm512_loadu_si512((const void *)((const uint16_t *)B + bk));
            const __m512i w1 = _mm512_loadu_si512((const void *)((const uint16_t *)B + bk +
                                                                 2 * MOE__VL));
            const uint32_t *ap = (const uint32_t *)(const void *)A + (size_t)(k / 2) * a_cs;
            MOE__UNROLL
            for (i = 0; i < mr; i++) {
                const __m512i av = _mm512_set1_epi32((int)ap[(size_t)i * a_rs]);
                c0[i] = _mm512_dpbf16_ps(c0[i], (__m512bh)av, (__m512bh)w0);
                c1[i] = _mm512_dpbf16_ps(c1[i], (__m512bh)av, (__m512bh)w1);
            }
        }
#endif
    }
    if (kind == MOE__B_BF16 && k < depth) {        /* odd depth: the last pair's k half */
        const uint16_t *bp = (const uint16_t *)B + (size_t)k * ldb;
        moe__tile_rank1(mr, c0, c1, a, (size_t)k * a_cs, moe__v_bf16_lo(bp),
                        moe__v_bf16_lo(bp + 2 * MOE__VL));
    }
    MOE__UNROLL
    for (i = 0; i < mr; i++) {
        float *ci = C + (size_t)i * ldc;
        if (accumulate) {
            c0[i] = moe__v_add(c0[i], moe__v_load(ci));
            c1[i] = moe__v_add(c1[i], moe__v_load(ci + MOE__VL));
        }
        moe__v_store(ci, c0[i]);
        moe__v_store(ci + MOE__VL, c1[i]);
    }
}

/* One instance per row count 1..MR (MR <= 12 on every ISA here) and per B
   kind (MOE__B_*).                                                        */
#define MOE__TILE_CASE(n, t) case n: \
    moe__tile_body(n, t, depth, A, a_rs, a_cs, B, ldb, C, ldc, accumulate, 0, NULL, 0, 0); break;
#if MOE__MR > 8
#  define MOE__TILE_SWITCH(t) switch (mr) { \
     MOE__TILE_CASE(1, t) MOE__TILE_CASE(2, t) MOE__TILE_CASE(3, t) MOE__TILE_CASE(4, t) \
     MOE__TILE_CASE(5, t) MOE__TILE_CASE(6, t) MOE__TILE_CASE(7, t) MOE__TILE_CASE(8, t) \
     MOE__TILE_CASE(9, t) MOE__TILE_CASE(10, t) MOE__TILE_CASE(11, t) MOE__TILE_CASE(12, t) \
     default: MOE_ASSERT(0); }
#elif MOE__MR > 6
#  define MOE__TILE_SWITCH(t) switch (mr) { \
     MOE__TILE_CASE(1, t) MOE__TILE_CASE(2, t) MOE__TILE_CASE(3, t) MOE__TILE_CASE(4, t) \
     MOE__TILE_CASE(5, t) MOE__TILE_CASE(6, t) MOE__TILE_CASE(7, t) MOE__TILE_CASE(8, t) \
     default: MOE_ASSERT(0); }
#else
#  define MOE__TILE_SWITCH(t) switch (mr) { \
     MOE__TILE_CASE(1, t) MOE__TILE_CASE(2, t) MOE__TILE_CASE(3, t) MOE__TILE_CASE(4, t) \
     MOE__TILE_CASE(5, t) MOE__TILE_CASE(6, t) default: MOE_ASSERT(0); }
#endif
static void moe__tile_simd(int32_t mr, int64_t depth, const float *A, size_t a_rs, size_t a_cs,
                           const float *B, size_t ldb, float *C, size_t ldc, int accumulate) {
    MOE__TILE_SWITCH(MOE__B_F32)
}
/* X(kind) with kind a compile-time MOE__B_* constant: one instance per kind. */
#if MOE__HAS_BF16_DOT
#  define MOE__KIND_SWITCH(kind, X) \
     if ((kind) == MOE__B_F32) { X(MOE__B_F32) } \
     else if ((kind) == MOE__B_DOT) { X(MOE__B_DOT) } \
     else { X(MOE__B_BF16) }
#else
#  define MOE__KIND_SWITCH(kind, X) \
     if ((kind) == MOE__B_F32) { X(MOE__B_F32) } else { X(MOE__B_BF16) }
#endif
/* A tile of a packed expert (moe__packed_task): A in MR-row k-major tiles,
   B a packed panel of the given kind.                                    */
static void moe__tile_simd_packed(int kind, int32_t mr, int64_t depth, const float *A,
                                  const void *B, float *C, size_t ldc) {
    const size_t a_rs = 1, a_cs = MOE__MR, ldb = MOE__NR;
    const int accumulate = 0;
    MOE__KIND_SWITCH(kind, MOE__TILE_SWITCH)
}
/* A full tile on a packed panel that also prefetches rows of the next
   panel: each of a row block's n full tiles on a panel brings in its 1/n of
   the panel after it, one row every n k steps, so the weights' first pass
   (from memory) does not wait and the requests stay spread out.           */
static void moe__tile_simd_next(int kind, int64_t depth, const float *A, const void *B, float *C,
                                size_t ldc, const void *next, int64_t rows, int64_t every) {
#define MOE__TILE_NEXT(t) moe__tile_body(MOE__MR, t, depth, A, 1, MOE__MR, B, MOE__NR, C, ldc, \
                                         0, 1, (const char *)next, rows, every);
    MOE__KIND_SWITCH(kind, MOE__TILE_NEXT)
#undef MOE__TILE_NEXT
}
#undef MOE__KIND_SWITCH
#undef MOE__TILE_SWITCH
#undef MOE__TILE_CASE

/* e^x for x <= 0 (the -|z| of moe__v_sigmoid), as Cephes' expf: x = n ln2 + r,
   |r| <= ln2/2, e^r by a degree-6 polynomial (about 1 ulp), times 2^n.
   Below ln(FLT_MIN) it returns 0 where expf gives a denormal (1 + e and
   e / (1 + e) do not see the difference); NaN stays NaN.                  */
MOE__INLINE moe__vf moe__v_exp_nonpos(moe__vf x) {
    const moe__vf n = moe__v_round(moe__v_mul(x, moe__v_set1(1.44269504088896341f)));
    const moe__vf r = moe__v_fma(n, moe__v_set1(2.12194440e-4f),
                                 moe__v_fma(n, moe__v_set1(-0.693359375f), x));
    moe__vf p = moe__v_set1(1.9875691500e-4f);
    p = moe__v_fma(p, r, moe__v_set1(1.3981999507e-3f));
    p = moe__v_fma(p, r, moe__v_set1(8.3334519073e-3f));
    p = moe__v_fma(p, r, moe__v_set1(4.1665795894e-2f));
    p = moe__v_fma(p, r, moe__v_set1(1.6666665459e-1f));
    p = moe__v_fma(p, r, moe__v_set1(5.0000001201e-1f));
    p = moe__v_fma(moe__v_mul(p, r), r, moe__v_add(r, moe__v_set1(1.0f)));
    return moe__v_select_lt(x, moe__v_set1(-87.33654475f), moe__v_zero(),
                            moe__v_mul(p, moe__v_pow2i(n)));
}

/* moe__sigmoid on a vector: 1 / (1 + e^-z) for z >= 0, e^z / (1 + e^z) below,
   so the exponential never overflows; +-Inf and NaN come out as there.     */
MOE__INLINE moe__vf moe__v_sigmoid(moe__vf z) {
    const moe__vf one = moe__v_set1(1.0f), e = moe__v_exp_nonpos(moe__v_neg_abs(z));
    const moe__vf s = moe__v_div(one, moe__v_add(one, e));
    return moe__v_select_lt(z, moe__v_zero(), moe__v_mul(e, s), s);
}

/* Activations with a vector form here: the SiLU family (SiLU, SwiGLU), the
   one whose expf dominates the epilogue. GELU stays on the scalar code.    */
static int moe__act_has_simd(moe_activation a) { return a == MOE_ACT_SILU || a == MOE_ACT_SWIGLU; }
#endif

#if MOE__HAS_SIMD
/* act(v) as the SIMD kernels compute it: the SiLU family through the vector
   sigmoid, lane 0 for a single value, so an element gets the same bits in
   the forward's epilogue, the backward's rebuild of ha from the cache and
   the recompute, wherever it sits in a vector.                            */
static float moe__act_simd(moe_activation act, float v) {
    if (moe__act_has_simd(act)) {
        float lanes[MOE__VL];
        moe__v_store(lanes, moe__v_sigmoid(moe__v_set1(v)));
        return v * lanes[0];
    }
    return moe__act(act, v);
}

/* moe__act_backward_ref on vectors where moe__act_has_simd; ha in the
   forward's bits (moe__act_simd) in vector lanes and tail alike.          */
static void moe__act_backward_simd(moe_activation act, float *dh, float *du, const float *hg,
                                   const float *hu, float *ha, size_t i0, size_t i1) {
    const int glu = moe__act_is_glu(act);
    size_t i = i0, q;
    if (!moe__act_has_simd(act)) {
        moe__act_backward_ref(act, dh, du, hg, hu, ha, i0, i1);
        return;
    }
    for (; i + MOE__VL <= i1; i += MOE__VL) {
        const moe__vf one = moe__v_set1(1.0f);
        const moe__vf v = moe__v_load(hg + i), da = moe__v_load(dh + i), s = moe__v_sigmoid(v);
        const moe__vf a = moe__v_mul(v, s);
        /* act' = s (1 + v (1 - s)) */
        const moe__vf grad = moe__v_mul(s, moe__v_fma(v, moe__v_fma(s, moe__v_set1(-1.0f), one),
                                                      one));
        if (glu) {
            const moe__vf u = moe__v_load(hu + i);
            if (ha) moe__v_store(ha + i, moe__v_mul(a, u));
            moe__v_store(du + i, moe__v_mul(da, a));
            moe__v_store(dh + i, moe__v_mul(moe__v_mul(da, u), grad));
        } else {
            if (ha) moe__v_store(ha + i, a);
            moe__v_store(dh + i, moe__v_mul(da, grad));
        }
    }
    if (ha)   /* the tail's ha from the vector sigmoid too: the forward's bits */
        for (q = i; q < i1; q++)
            ha[q] = glu ? moe__act_simd(act, hg[q]) * hu[q] : moe__act_simd(act, hg[q]);
    moe__act_backward_ref(act, dh, du, hg, hu, NULL, i, i1);
}

/* y = w x is a multiply then an add, as the scalar loop: the same bits. */
static void moe__add_scaled_simd(float *y, const float *x, float w, size_t n, int accumulate) {
    const moe__vf wv = moe__v_set1(w);
    size_t i = 0;
    for (; i + MOE__VL <= n; i += MOE__VL) {
        const moe__vf v = moe__v_mul(wv, moe__v_load(x + i));
        moe__v_store(y + i, accumulate ? moe__v_add(moe__v_load(y + i), v) : v);
    }
    moe__add_scaled_ref(y + i, x + i, w, n - i, accumulate);
}

/* 2 VL partial sums added in lane order at the end: fixed, whatever the
   thread count; then the tail in order.                                  */
static float moe__dot_simd(const float *a, const float *b, size_t n) {
    float acc = 0.0f;
    size_t i = 0;
    if (n >= MOE__NR) {
        float lanes[MOE__NR];
        moe__vf s0 = moe__v_zero(), s1 = moe__v_zero();
        int32_t l;
        for (; i + MOE__NR <= n; i += MOE__NR) {
            s0 = moe__v_fma(moe__v_load(a + i), moe__v_load(b + i), s0);
            s1 = moe__v_fma(moe__v_load(a + i + MOE__VL), moe__v_load(b + i + MOE__VL), s1);
        }
        moe__v_store(lanes, s0);
        moe__v_store(lanes + MOE__VL, s1);
        for (l = 0; l < MOE__NR; l++) acc += lanes[l];
    }
    for (; i < n; i++) acc += a[i] * b[i];
    return acc;
}
#endif

#if MOE__HAS_SIMD

/* The ragged right edge, nr < NR columns from j, on the micro-kernel too:
   MOE__EDGE_K rows of those columns at a time into a zero-padded panel on
   the stack, each row tile through a full tile there. (A router with E = 60
   or 8 experts has one; the reference loop took 3 % of a qwen-mini forward
   on AMD Zen 3 with AVX2.)                                                */
#define MOE__EDGE_K 64
static void moe__sgemm_simd_edge(int64_t m, int32_t j, int32_t nr, int64_t depth, const float *A,
                                 size_t a_rs, size_t a_cs, const float *B, size_t ldb, float *C,
                                 size_t ldc, int accumulate) {
    float panel[MOE__EDGE_K * MOE__NR], tile[MOE__MR * MOE__NR];
    int64_t k0, k, i;
    int32_t r, q;
    for (k0 = 0; k0 < depth; k0 += MOE__EDGE_K) {
        const int64_t kb = depth - k0 < MOE__EDGE_K ? depth - k0 : MOE__EDGE_K;
        for (k = 0; k < kb; k++)
            for (q = 0; q < MOE__NR; q++)
                panel[k * MOE__NR + q] = q < nr ? B[(size_t)(k0 + k) * ldb + (size_t)(j + q)]
                                                : 0.0f;
        for (i = 0; i < m; i += MOE__MR) {
            const int32_t mr = (int32_t)(m - i < MOE__MR ? m - i : MOE__MR);
            float *ci = C + (size_t)i * ldc + (size_t)j;
            for (r = 0; r < mr; r++)
                for (q = 0; q < MOE__NR; q++)
                    tile[r * MOE__NR + q] = (accumulate || k0 > 0) && q < nr
                                            ? ci[(size_t)r * ldc + (size_t)q] : 0.0f;
            moe__tile_simd(mr, kb, A + (size_t)i * a_rs + (size_t)k0 * a_cs, a_rs, a_cs, panel,
                           MOE__NR, tile, MOE__NR, 1);
            for (r = 0; r < mr; r++)
                for (q = 0; q < nr; q++) ci[(size_t)r * ldc + (size_t)q] = tile[r * MOE__NR + q];
        }
    }
}

/* moe__sgemm_ref's contract on the micro-kernel: full NR-wide column tiles in
   registers, the ragged right edge (j1 - j0 not a multiple of NR) by
   moe__sgemm_simd_edge. With accumulate the sum is C + (sum over k), one
   rounding later than the reference's running sum (the edge: one per
   MOE__EDGE_K block of k): same tolerance class.                          */
static void moe__sgemm_simd(int64_t m, int32_t j0, int32_t j1, int64_t depth,
                            const float *A, size_t a_rs, size_t a_cs,
                            const float *B, size_t ldb, float *C, size_t ldc, int accumulate) {
    int64_t i;
    int32_t j = j0;
    for (; j + MOE__NR <= j1; j += MOE__NR)
        for (i = 0; i < m; i += MOE__MR)
            moe__tile_simd((int32_t)(m - i < MOE__MR ? m - i : MOE__MR), depth,
                           A + (size_t)i * a_rs, a_rs, a_cs, B + j, ldb, C + (size_t)i * ldc + j,
                           ldc, accumulate);
    if (j < j1 && depth > 0)
        moe__sgemm_simd_edge(m, j, j1 - j, depth, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
    else if (j < j1) moe__sgemm_ref(m, j, j1, depth, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
}
#endif

/* The same product on packed copies (GotoBLAS / BLIS): A is copied into
   MR-row tiles stored k-major, B into NR-column panels, both zero-padded, so
   the micro-kernel reads both front to back whatever the caller's strides.
   Unpacked, the backward's operands are slow: a transposed activation gives
   one useful float per cache line, and rows of a [D][F] weight 4 KiB apart
   all map to one L1 set. Each task then sweeps its panels in KC-deep blocks,
   a B block (KC x NR) staying in L1 while the task's row tiles pass over
   it. Every C element is summed by one task, k ascending, KC at a time:
   the result does not depend on the thread count.                          */
#define MOE__KC 256
#define MOE__FEW_ROWS 288    /* a KC-deep A block of them (288 KiB) stays in L2 */
#if MOE__HAS_SIMD
typedef struct moe__gemm_pp {
    int64_t m, depth;
    int32_t cols, n_tiles, n_panels, tiles_per_task, panels_per_task, n_pc;
    const float *A; size_t a_rs, a_cs;
    const float *B; size_t ldb;
    float *C; size_t ldc;
    float *Ap, *Bp;                 /* [n_tiles][depth][MR], [n_panels][depth][NR] */
    int accumulate;
    int b_in_task;                  /* tasks pack their own B blocks (one row block) */
} moe__gemm_pp;

/* mr rows of depth elements (strides a_rs, a_cs) -> one k-major tile
   dst[k][MR], rows past mr zero.                                          */
static void moe__pack_a_tile(float *dst, const float *src, size_t a_rs, size_t a_cs, int32_t mr,
                             int64_t depth) {
    int64_t k;
    int32_t i;
    if (a_cs == 1) {                 /* rows contiguous: read along rows */
        for (i = 0; i < MOE__MR; i++)
            for (k = 0; k < depth; k++)
                dst[(size_t)k * MOE__MR + i] = i < mr ? src[(size_t)i * a_rs + (size_t)k] : 0.0f;
    } else {
        for (k = 0; k < depth; k++)
            for (i = 0; i < MOE__MR; i++)
                dst[(size_t)k * MOE__MR + i] = i < mr ? src[(size_t)i * a_rs + (size_t)k * a_cs]
                                                      : 0.0f;
    }
}

static void moe__pack_a_task(void *arg, int32_t t) {
    const moe__gemm_pp *g = (const moe__gemm_pp *)arg;
    const int64_t i0 = (int64_t)t * MOE__MR;
    moe__pack_a_tile(g->Ap + (size_t)t * MOE__MR * (size_t)g->depth, g->A + (size_t)i0 * g->a_rs,
                     g->a_rs, g->a_cs, (int32_t)(g->m - i0 < MOE__MR ? g->m - i0 : MOE__MR),
                     g->depth);
}

/* B in blocks of 16 rows: 16 read streams, and 16 x NR contiguous floats
   written per panel (a panel at a time would read one line per 4 KiB page). */
#define MOE__PACK_B_ROWS 16
/* Rows [k0, k1) of B's panel p -> dst[k1 - k0][NR], columns past cols zero. */
static void moe__pack_b_block(float *dst, const moe__gemm_pp *g, int32_t p, int64_t k0,
                              int64_t k1) {
    const int32_t j0 = p * MOE__NR, nr = g->cols - j0 < MOE__NR ? g->cols - j0 : MOE__NR;
    int64_t k;
    int32_t j;
    for (k = k0; k < k1; k++, dst += MOE__NR) {
        const float *row = g->B + (size_t)k * g->ldb + (size_t)j0;
        if (nr == MOE__NR) {
            moe__v_store(dst, moe__v_load(row));
            moe__v_store(dst + MOE__VL, moe__v_load(row + MOE__VL));
            continue;
        }
        for (j = 0; j < nr; j++) dst[j] = row[j];
        for (; j < MOE__NR; j++) dst[j] = 0.0f;
    }
}
/* Rows [k0, k0 + kc) of panels [p0, p1) -> dst[p1 - p0][kc][NR]: a task's
   own B block. Row by row (the run's columns of a row are adjacent), with
   rows MOE__PREFETCH_ROWS ahead requested: B's rows are often a page apart. */
#define MOE__PREFETCH_ROWS 16
static void moe__pack_b_run(float *dst, const moe__gemm_pp *g, int32_t p0, int32_t p1, int64_t k0,
                            int64_t kc) {
    int64_t k;
    int32_t p, j;
    for (k = k0; k < k0 + kc; k++) {
        if (k + MOE__PREFETCH_ROWS < g->depth)
            for (j = p0 * MOE__NR; j < p1 * MOE__NR && j < g->cols;
                 j += 64 / (int32_t)sizeof(float))
                MOE__PREFETCH(g->B + (size_t)(k + MOE__PREFETCH_ROWS) * g->ldb + (size_t)j);
        for (p = p0; p < p1; p++)
            moe__pack_b_block(dst + ((size_t)(p - p0) * (size_t)kc + (size_t)(k - k0)) * MOE__NR, g,
                              p, k, k + 1);
    }
}
static void moe__pack_b_task(void *arg, int32_t task) {
    const moe__gemm_pp *g = (const moe__gemm_pp *)arg;
    const int64_t k0 = (int64_t)task * MOE__PACK_B_ROWS,
                  k1 = k0 + MOE__PACK_B_ROWS < g->depth ? k0 + MOE__PACK_B_ROWS : g->depth;
    int32_t p;
    for (p = 0; p < g->n_panels; p++)
        moe__pack_b_block(g->Bp + ((size_t)p * (size_t)g->depth + (size_t)k0) * MOE__NR, g, p, k0,
                          k1);
}

/* One task list for both copies: A tiles first, then B row blocks. */
static void moe__pack_ab_task(void *arg, int32_t task) {
    const moe__gemm_pp *g = (const moe__gemm_pp *)arg;
    if (task < g->n_tiles) moe__pack_a_task(arg, task);
    else moe__pack_b_task(arg, task - g->n_tiles);
}

static void moe__gemm_pp_task(void *arg, int32_t task) {
    const moe__gemm_pp *g = (const moe__gemm_pp *)arg;
    const int32_t t0 = (task / g->n_pc) * g->tiles_per_task,
                  p0 = (task % g->n_pc) * g->panels_per_task;
    const int32_t t1 = t0 + g->tiles_per_task < g->n_tiles ? t0 + g->tiles_per_task : g->n_tiles;
    const int32_t p1 = p0 + g->panels_per_task < g->n_panels ? p0 + g->panels_per_task
                                                             : g->n_panels;
    const size_t depth = (size_t)g->depth;
    size_t k0;
    int32_t p, t, i, j;
    for (k0 = 0; k0 < depth; k0 += MOE__KC) {
        const int64_t kc = depth - k0 < MOE__KC ? (int64_t)(depth - k0) : MOE__KC;
        const int acc = g->accumulate || k0 > 0;
        float *slot = g->Bp + (size_t)p0 * (depth < MOE__KC ? depth : MOE__KC) * MOE__NR;
        if (g->b_in_task) moe__pack_b_run(slot, g, p0, p1, (int64_t)k0, kc);
        for (p = p0; p < p1; p++) {
            float *bp = g->Bp + ((size_t)p * depth + k0) * MOE__NR;
            const int32_t nr = g->cols - p * MOE__NR < MOE__NR ? g->cols - p * MOE__NR : MOE__NR;
            if (g->b_in_task) bp = slot + (size_t)(p - p0) * (size_t)kc * MOE__NR;
            for (t = t0; t < t1; t++) {
                const float *ap = g->Ap + ((size_t)t * depth + k0) * MOE__MR;
                const int32_t mr = (int32_t)(g->m - (int64_t)t * MOE__MR < MOE__MR
                                             ? g->m - (int64_t)t * MOE__MR : MOE__MR);
                float *cp = g->C + (size_t)t * MOE__MR * g->ldc + (size_t)p * MOE__NR;
                /* A weight gradient's C (accumulate, many row tiles) is in memory
                   and read only after the tile's k loop: fetch the next tile's
                   rows now (its dW GEMMs 15-30 % faster, AVX2 on AMD Zen 3). */
                if (g->accumulate && !g->b_in_task && k0 == 0 && t + 1 < t1) {
                    const int64_t r = (int64_t)(t + 1) * MOE__MR;
                    for (i = 0; i < MOE__MR && r + i < g->m; i++) {
                        MOE__PREFETCH(cp + (size_t)(MOE__MR + i) * g->ldc);
                        MOE__PREFETCH(cp + (size_t)(MOE__MR + i) * g->ldc + (size_t)(nr - 1));
                    }
                }
                if (nr == MOE__NR) {
                    moe__tile_simd(mr, kc, ap, 1, MOE__MR, bp, MOE__NR, cp, g->ldc, acc);
                } else {             /* ragged right edge: through a full tile */
                    float tile[MOE__MR * MOE__NR];
                    for (i = 0; i < mr; i++)
                        for (j = 0; j < MOE__NR; j++)
                            tile[i * MOE__NR + j] = acc && j < nr
                                                    ? cp[(size_t)i * g->ldc + (size_t)j] : 0.0f;
                    moe__tile_simd(mr, kc, ap, 1, MOE__MR, bp, MOE__NR, tile, MOE__NR, 1);
                    for (i = 0; i < mr; i++)
                        for (j = 0; j < nr; j++)
                            cp[(size_t)i * g->ldc + (size_t)j] = tile[i * MOE__NR + j];
                }
            }
        }
    }
}
#endif

/* The kernel table's parallel GEMM on a SIMD ISA: through packed copies in
   pack (moe__gemm_pack_floats(m, cols, depth) floats) when it is given and cols has a
   full panel; else moe__sgemm_simd in tasks. Even a few rows gain: an
   expert with under 2 MR rows read its weight rows 4 KiB apart in place
   (deepseek-mini's backward at T = 16 and 128: up to 25 % faster packed,
   AVX2 on the AMD EPYC Zen 3 host).                                       */
#if MOE__HAS_SIMD
static void moe__gemm_par_simd(const moe_config *c, int64_t m, int32_t cols, int64_t depth,
                               const float *A, size_t a_rs, size_t a_cs, const float *B,
                               size_t ldb, float *C, size_t ldc, int accumulate, float *pack) {
    if (pack && m >= 1 && cols >= MOE__NR && depth >= 1) {
        moe__gemm_pp g;
        const double flops = 2.0 * (double)m * cols * (double)depth;
        int32_t n_rt;
        g.m = m; g.cols = cols; g.depth = depth;
        g.A = A; g.a_rs = a_rs; g.a_cs = a_cs; g.B = B; g.ldb = ldb; g.C = C; g.ldc = ldc;
        g.accumulate = accumulate;
        g.n_tiles = (int32_t)((m + MOE__MR - 1) / MOE__MR);
        g.n_panels = (int32_t)moe__ceil_div(cols, MOE__NR);
        g.Ap = pack;
        g.Bp = pack + (size_t)g.n_tiles * MOE__MR * (size_t)depth;
        /* tasks: <= 12 row tiles (a KC-deep A block of them fits L2) x 16 panels
           (each A block serves 16 B blocks before the next is fetched), fewer
           panels when that leaves under 8 tasks for the threads. Up to
           MOE__FEW_ROWS rows (an expert's rows times a weight: da, dx) are
           one row block: each B block is then used by one task only, which
           packs it into its own slot right before its tiles pass over it,
           instead of a separate pass writing all of B out to memory and
           reading it back (da and dx of deepseek-mini and qwen-mini's
           experts: 5-15 % faster, AVX2 on AMD Zen 3).                      */
        g.b_in_task = m <= MOE__FEW_ROWS;
        n_rt = g.b_in_task ? 1 : (g.n_tiles + 11) / 12;     /* row blocks of <= 12 tiles, even */
        g.tiles_per_task = (g.n_tiles + n_rt - 1) / n_rt;
        n_rt = (g.n_tiles + g.tiles_per_task - 1) / g.tiles_per_task;
        g.panels_per_task = g.n_panels < 16 ? g.n_panels : 16;
        while (g.panels_per_task > 1 &&
               n_rt * ((g.n_panels + g.panels_per_task - 1) / g.panels_per_task) < 8)
            g.panels_per_task /= 2;
        g.n_pc = (g.n_panels + g.panels_per_task - 1) / g.panels_per_task;
        moe__parallel_for(c, g.b_in_task ? g.n_tiles
                                         : g.n_tiles + (int32_t)((depth + MOE__PACK_B_ROWS - 1) /
                                                                 MOE__PACK_B_ROWS),
                          moe__pack_ab_task, &g, flops);
        moe__parallel_for(c, n_rt * g.n_pc, moe__gemm_pp_task, &g, flops);
        return;
    }
    moe__gemm(c, moe__sgemm_simd, m, cols, depth, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
}
#endif

/* The router GEMM on a SIMD ISA: W is transposed into the workspace
   ([D][E_pad]) so the parallel GEMM can stream it. Up to MOE__ROUTER_DOT_T
   tokens, dots on W's rows instead: the transpose would cost more than the
   product (deepseek-mini, E 64, T = 1: half the time of its expert dots). */
#ifndef MOE__ROUTER_DOT_T
#define MOE__ROUTER_DOT_T 8
#endif
#if MOE__HAS_SIMD
static void moe__linear_simd(const moe_config *c, float *y, const float *x, const float *W,
                             const float *bias, int32_t T, int32_t E, int32_t D,
                             const moe__ws *ws) {
    const size_t ld = ((size_t)E + MOE__NR - 1) / MOE__NR * MOE__NR;
    float *Wt = ws->router_t;
    int32_t e, d, t;
    if (T <= MOE__ROUTER_DOT_T) {
        for (t = 0; t < T; t++)
            for (e = 0; e < E; e++)
                y[(size_t)t * E + e] = moe__dot_simd(x + (size_t)t * D, W + (size_t)e * D,
                                                     (size_t)D) + (bias ? bias[e] : 0.0f);
        return;
    }
    for (e = 0; e < E; e++)
        for (d = 0; d < D; d++) Wt[(size_t)d * ld + (size_t)e] = W[(size_t)e * D + d];
    moe__gemm(c, moe__sgemm_simd, T, E, D, x, (size_t)D, 1, Wt, ld, y, (size_t)E, 0);
    if (bias)
        for (t = 0; t < T; t++)
            for (e = 0; e < E; e++) y[(size_t)t * E + e] += bias[e];
}
#endif

// ----------------------------------------------------------------------------
// Packed weights (moe_pack_weights): every expert matrix transposed into
// panels of NR output columns, depth rows each, contiguous, so the micro-kernel
// streams one panel front to back (decode reads weights at bandwidth; large
// batches reuse a panel from L2 across row blocks). The GLU gate and up
// projections are interleaved VL columns at a time, so one tile holds gate
// and up of the same VL hidden units and the activation is fused into the
// tile's epilogue:  ha = act(gate.x + bg) * (up.x + bu).
//   header (64 bytes) | per routed expert: w13 panels, w2 panels |
//   shared expert: w13 panels, w2 panels

typedef struct moe__pack_header {
    char magic[8];                   /* "moe.pk2\0"                           */
    uint32_t vl, num_experts, d_model, d_ff, shared_d_ff, glu, bf16, pad;
    uint64_t bytes;
} moe__pack_header;

/* Panel geometry of one FFN of hidden width F. A panel has an even number
   of rows (k), the last one zero when depth is odd: bf16 panels store rows in
   pairs (moe__v_bf16_lo/hi), fp32 panels keep the same offsets.      */
typedef struct moe__pack_geom {
    int32_t p1, p2;           /* panels of w13 (over F) and of w2 (over D)    */
    int32_t f_cols;           /* hidden units per w13 panel: VL (GLU) or NR   */
    size_t k1, k2;            /* rows per w13 panel (D rounded up to even), per w2 panel (F) */
    size_t w13, w2;           /* elements per expert of each                  */
} moe__pack_geom;

static moe__pack_geom moe__pack_geometry(const moe_config *c, int32_t F) {
    moe__pack_geom g;
    /* sizes in size_t: F or d_model near INT32_MAX overflowed int */
    const size_t fc = moe__act_is_glu(c->activation) ? MOE__VL : MOE__NR;
    const size_t f = (size_t)(F > 0 ? F : 0), d = (size_t)(c->d_model > 0 ? c->d_model : 0);
    const size_t p1 = f / fc + (f % fc != 0), p2 = d / MOE__NR + (d % MOE__NR != 0);
    g.f_cols = (int32_t)fc;
    g.p1 = (int32_t)p1;                      /* <= INT32_MAX / VL + 1 */
    g.p2 = (int32_t)p2;
    g.k1 = d + (d & 1);
    g.k2 = f + (f & 1);
    g.w13 = moe__mul(moe__mul(p1, MOE__NR), g.k1);   /* SIZE_MAX when it does not fit */
    g.w2 = moe__mul(moe__mul(p2, MOE__NR), g.k2);
    return g;
}

/* Byte offsets of the pieces (elements are fp32, or bf16 with cfg.pack_bf16). */
typedef struct moe__pack_layout {
    moe__pack_geom routed, shared;
    size_t esize;             /* bytes per element                            */
    size_t experts, expert_stride, shared_off, bytes;
} moe__pack_layout;

/* Exact size_t arithmetic: SIZE_OVERFLOW only when the blob exceeds SIZE_MAX
   (moe__mul / moe__add saturate, and no real sum reaches SIZE_MAX).      */
static moe_status moe__pack_plan(const moe_config *c, moe__pack_layout *pk) {
    const size_t big = (size_t)-1;
    size_t shared = 0;
    pk->routed = moe__pack_geometry(c, c->d_ff);
    pk->shared = moe__pack_geometry(c, c->shared_d_ff > 0 ? c->shared_d_ff : 1);
    pk->esize = c->pack_bf16 ? sizeof(uint16_t) : sizeof(float);
    pk->experts = 64;
    pk->expert_stride = moe__mul(moe__add(pk->routed.w13, pk->routed.w2), pk->esize);
    if (c->shared_d_ff > 0) shared = moe__mul(moe__add(pk->shared.w13, pk->shared.w2), pk->esize);
    pk->shared_off = moe__add(pk->experts, moe__mul((size_t)c->num_experts, pk->expert_stride));
    pk->bytes = moe__add(pk->shared_off, shared);
    if (pk->expert_stride == big || shared == big || pk->shared_off == big || pk->bytes == big)
        return MOE_STATUS_SIZE_OVERFLOW;
    return MOE_STATUS_OK;
}

/* fp32 -> bf16, round to nearest even (NaN stays a quiet NaN). */
static uint16_t moe__bf16_of(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Whether a call reads w.packed: only the SIMD kernels run on panels; the
   reference runs from the nn.Linear tensors and ignores a blob.            */
static int moe__reads_packed(const moe_config *c, const moe_weights *w) {
    return w->packed != NULL && c->isa != MOE_ISA_REFERENCE;
}

/* Was w.packed made by moe_pack_weights for this config and vector width,
   and does w.packed_bytes hold all of it? (the header is read only then) */
static int moe__pack_check(const moe_config *c, const moe_weights *w) {
    moe__pack_header h;
    moe__pack_layout pk;
    if (!w->packed || (uintptr_t)w->packed % sizeof(float) != 0 || w->packed_bytes < sizeof h)
        return 0;
    memcpy(&h, w->packed, sizeof h);
    return memcmp(h.magic, "moe.pk2", 8) == 0 && h.vl == MOE__VL && h.bytes <= w->packed_bytes &&
           h.num_experts == (uint32_t)c->num_experts && h.d_model == (uint32_t)c->d_model &&
           h.d_ff == (uint32_t)c->d_ff && h.shared_d_ff == (uint32_t)c->shared_d_ff &&
           h.glu == (uint32_t)moe__act_is_glu(c->activation) &&
           h.bf16 == (uint32_t)(c->pack_bf16 != 0) &&
           moe__pack_plan(c, &pk) == MOE_STATUS_OK && h.bytes == pk.bytes;
}

/* The decode layout's blob (moe_qpack_weights):
     header (64 bytes) | routed gate, up, down: each [E] matrices |
     shared gate, up, down
   a matrix as moe__qp_matrix_bytes (0 for fp32 or unused tensors). */
typedef struct moe__qp_header {
    char magic[8];                   /* "moe.qp1\0"                           */
    uint32_t num_experts, d_model, d_ff, shared_d_ff, glu, fused, types[6];
    uint64_t bytes;
} moe__qp_header;

typedef struct moe__qp_plan {
    size_t off[6], per[6];           /* first byte, bytes per expert          */
    size_t bytes;
    int32_t types[6];
} moe__qp_plan;

/* The six matrix sets in blob order, with their rows and columns. */
static void moe__qp_sets(const moe_config *c, const moe__ffn *f, const moe__ffn *sh,
                         const moe__qmat **m, size_t *rows, size_t *cols, size_t *count) {
    const size_t D = (size_t)c->d_model, F = (size_t)c->d_ff, Fs = (size_t)c->shared_d_ff;
    const size_t E = (size_t)c->num_experts, n_sh = c->shared_d_ff > 0;
    const int glu = moe__act_is_glu(c->activation);
    int i;
    m[0] = &f->gate_q; m[1] = &f->up_q; m[2] = &f->down_q;
    m[3] = &sh->gate_q; m[4] = &sh->up_q; m[5] = &sh->down_q;
    for (i = 0; i < 6; i++) {
        rows[i] = i == 2 || i == 5 ? D : i < 3 ? F : Fs;
        cols[i] = i == 2 ? F : i == 5 ? Fs : D;
        count[i] = (i % 3 == 1 && !glu) ? 0 : i < 3 ? E : n_sh;
    }
}

static moe_status moe__qpack_plan(const moe_config *c, const moe_weights *w, moe__qp_plan *p) {
    const moe__ffn f = moe__routed_ffn(c, w), sh = moe__shared_ffn(c, w);
    const moe__qmat *m[6];
    size_t rows[6], cols[6], count[6], t = 64;
    int i, any = 0;
    moe__qp_sets(c, &f, &sh, m, rows, cols, count);
    for (i = 0; i < 6; i++) {
        p->types[i] = count[i] && m[i]->data ? m[i]->type : MOE_QTYPE_F32;
        p->per[i] = count[i] ? moe__qp_matrix_bytes(m[i], rows[i], cols[i]) : 0;
        p->off[i] = t;
        t = moe__add(t, moe__mul(count[i], p->per[i]));
        any |= p->per[i] != 0;
    }
    p->bytes = t;
    if (t == (size_t)-1) return MOE_STATUS_SIZE_OVERFLOW;
    return any ? MOE_STATUS_OK : MOE_STATUS_UNSUPPORTED;
}

/* The header moe_qpack_weights writes for this config, weights and plan. */
static void moe__qp_header_of(const moe_config *c, const moe_weights *w, const moe__qp_plan *p,
                              moe__qp_header *h) {
    int i;
    memset(h, 0, sizeof *h);
    memcpy(h->magic, "moe.qp1", 8);
    h->num_experts = (uint32_t)c->num_experts; h->d_model = (uint32_t)c->d_model;
    h->d_ff = (uint32_t)c->d_ff; h->shared_d_ff = (uint32_t)c->shared_d_ff;
    h->glu = (uint32_t)moe__act_is_glu(c->activation);
    h->fused = (uint32_t)(w->gate_up_fused != 0);
    for (i = 0; i < 6; i++) h->types[i] = (uint32_t)p->types[i];
    h->bytes = p->bytes;
}

/* Was w.qpacked made by moe_qpack_weights for this config and these weight
   types, and does w.qpacked_bytes hold all of it? */
static int moe__qpack_check(const moe_config *c, const moe_weights *w) {
    moe__qp_header h, want;
    moe__qp_plan p;
    if (!w->qpacked || w->qpacked_bytes < sizeof h) return 0;
    if (moe__qpack_plan(c, w, &p) != MOE_STATUS_OK || p.bytes > w->qpacked_bytes) return 0;
    memcpy(&h, w->qpacked, sizeof h);
    moe__qp_header_of(c, w, &p, &want);
    return memcmp(&h, &want, sizeof h) == 0;
}

/* Does the forward read w.qpacked? (checked by moe_forward first) */
static int moe__reads_qpacked(const moe_config *c, const moe_weights *w) {
    return MOE__HAS_QPDOT && w->qpacked != NULL && c->isa != MOE_ISA_REFERENCE;
}

/* Point the routed and shared sets' quantized matrices at their groups in
   w.qpacked (one plan for both). */
static void moe__ffn_attach_qpack(moe__ffn *routed, moe__ffn *shared, const moe_config *c,
                                  const moe_weights *w) {
    moe__qp_plan p;
    const unsigned char *base = (const unsigned char *)w->qpacked;
    int s;
    if (moe__qpack_plan(c, w, &p) != MOE_STATUS_OK) return;
    for (s = 0; s < 2; s++) {
        moe__ffn *f = s ? shared : routed;
        const int o = 3 * s;
        f->gate_qp = p.per[o] ? base + p.off[o] : NULL;         f->gate_qps = p.per[o];
        f->up_qp = p.per[o + 1] ? base + p.off[o + 1] : NULL;   f->up_qps = p.per[o + 1];
        f->down_qp = p.per[o + 2] ? base + p.off[o + 2] : NULL; f->down_qps = p.per[o + 2];
    }
}

#if MOE__HAS_SIMD
/* One stage of a packed expert set over expert-contiguous rows, as a flat
   task list: expert x row block x run of panels.
   stage 1: S = x . w13 panels, then per hidden unit (the fused epilogue)
            hg = S_gate + bg, hu = S_up + bu, ha = act(hg) [* hu]
   stage 2: S = ha . w2 panels, out = S + bd                                */
typedef struct moe__packed_job {
    const moe_config *c;
    const moe__ffn *f;              /* activation, dropout                   */
    const moe__pack_geom *g;
    int stage, glu;
    int32_t F, D, n_sets;
    const unsigned char *panels;    /* expert 0's w13 panels                 */
    size_t set_stride, esize;       /* bytes from one expert's panels to the next; per element */
    int kind;                       /* MOE__B_*: what the tiles read         */
    const int64_t *off;             /* [n_sets + 1] row offsets              */
    const float *x;                 /* [N][D]                                */
    float *hg, *hu, *ha, *out;      /* [N][F], [N][F], [N][F], [N][D]        */
    float *tiles;                   /* [N][ld_tiles] tile results             */
    size_t ld_tiles;
    const float *gate_bias, *up_bias, *down_bias;   /* per expert F, F, D, or NULL */
    int64_t *task_off;              /* [n_sets + 1]                          */
    int32_t *panels_per_task;       /* [n_sets]                              */
    int64_t *tile_off;              /* [n_sets + 1] first MR-row tile of each set */
    int64_t skip_rows;              /* sets of at most this many rows are not run
                                       (moe__experts_qdot ran them); 0: none    */
    float *Ap;                      /* the stage's A rows as k-major MR tiles */
} moe__packed_job;

/* Rows per task: the B panels are streamed from memory once per row block
   (memory-bound below ~100 rows). 144, a multiple of every MR (6, 8, 12):
   mixtral-mini T=1024 forward 1.15x faster than 72 rows, 288 no better.
   KC-blocking the k loop here measured 4 % slower (panels stream from L2).
   Measured with AVX2 on the 2-core AMD EPYC Zen 3 host.                   */
#define MOE__ROW_BLOCK 144
/* Work per packed task: a task's last panel prefetches nothing, so tasks of
   several panels. 16e6 rather than MOE__TASK_FLOPS (4e6): T=128 forward
   0.96-0.98x (mixtral-mini, deepseek-mini), T=1024 unchanged (AVX2, AMD
   Zen 3).                                                                  */
#define MOE__PACKED_TASK_FLOPS 16.0e6

/* The tiles of one task: panels [p0, p1) of expert e against its rows
   [r0, r0 + nr) (row block rb), each MR-row tile into S, or straight into
   out for a whole panel of the down projection. */
static void moe__packed_tiles(const moe__packed_job *J, int32_t e, int64_t rb, int32_t p0,
                              int32_t p1, int64_t r0, int64_t nr, int64_t depth) {
    const unsigned char *w = J->panels + (size_t)e * J->set_stride +
                             (J->stage == 1 ? 0 : J->g->w13 * J->esize);
    const float *A = J->Ap + (size_t)(J->tile_off[e] + rb * (MOE__ROW_BLOCK / MOE__MR)) *
                             MOE__MR * (size_t)depth;
    const size_t rows = J->stage == 1 ? J->g->k1 : J->g->k2;   /* depth rounded up to even */
    int32_t p;
    int64_t i;
    for (p = p0; p < p1; p++) {
        const void *panel = w + (size_t)p * rows * MOE__NR * J->esize;
        for (i = 0; i < nr; i += MOE__MR) {
            const int32_t mr = (int32_t)(nr - i < MOE__MR ? nr - i : MOE__MR);
            const float *a = A + (size_t)i * (size_t)depth;   /* tile i / MR: MR * depth floats */
            float *C = J->tiles + (size_t)(r0 + i) * J->ld_tiles + (size_t)p * MOE__NR;
            size_t ldc = J->ld_tiles;
            if (J->stage == 2 && (p + 1) * MOE__NR <= J->D) {
                /* a whole panel of out: straight there */
                C = J->out + (size_t)(r0 + i) * (size_t)J->D + (size_t)p * MOE__NR;
                ldc = (size_t)J->D;
            }
            if (mr == MOE__MR && p + 1 < p1 && nr > MOE__MR) {
                /* this task's next panel, 1/n each */
                const int64_t n = nr / MOE__MR, t = i / MOE__MR, k0 = depth * t / n,
                              k1 = depth * (t + 1) / n;
                moe__tile_simd_next(J->kind, depth, a, panel, C, ldc, (const unsigned char *)panel +
                                    (rows + (size_t)k0) * MOE__NR * J->esize, k1 - k0, n);
            } else {
                moe__tile_simd_packed(J->kind, mr, depth, a, panel, C, ldc);
            }
        }
    }
}

/* Stage 1's epilogue on row r, units of panels [p0, p1) of n_pan: hg (+ gate
   bias), hu (+ up bias), ha = act(hg) (* hu), then expert dropout. */
static void moe__packed_hidden_row(const moe__packed_job *J, int32_t e, int64_t r, int32_t p0,
                                   int32_t p1, int32_t n_pan) {
    const float *tile_row = J->tiles + (size_t)r * J->ld_tiles;
    /* p1 * fc only below the last panel: F near INT32_MAX overflowed it */
    const int32_t fc = J->g->f_cols, f_end = p1 < n_pan ? p1 * fc : J->F;
    const float *bg = J->gate_bias ? J->gate_bias + (size_t)e * J->F : NULL;
    const float *bu = J->up_bias ? J->up_bias + (size_t)e * J->F : NULL;
    int32_t f = p0 * fc;
    if (moe__act_has_simd(J->c->activation))    /* whole panels on vectors */
        for (; f <= f_end - fc; f += fc) {
            const float *sp = tile_row + (size_t)(f / fc) * MOE__NR;
            const size_t o = (size_t)r * J->F + (size_t)f;
            int32_t q;
            if (J->glu) {                        /* gate lanes, then up lanes */
                moe__vf gv = moe__v_load(sp), uv = moe__v_load(sp + MOE__VL);
                if (bg) gv = moe__v_add(gv, moe__v_load(bg + f));
                if (bu) uv = moe__v_add(uv, moe__v_load(bu + f));
                moe__v_store(J->hg + o, gv);
                moe__v_store(J->hu + o, uv);
                moe__v_store(J->ha + o, moe__v_mul(moe__v_mul(gv, moe__v_sigmoid(gv)), uv));
            } else {
                for (q = 0; q < fc; q += MOE__VL) {
                    moe__vf gv = moe__v_load(sp + q);
                    if (bg) gv = moe__v_add(gv, moe__v_load(bg + f + q));
                    moe__v_store(J->hg + o + (size_t)q, gv);
                    moe__v_store(J->ha + o + (size_t)q, moe__v_mul(gv, moe__v_sigmoid(gv)));
                }
            }
        }
    for (; f < f_end; f++) {
        const int32_t pp = f / fc, v = f % fc;
        const size_t o = (size_t)r * J->F + (size_t)f;
        const float gv = tile_row[(size_t)pp * MOE__NR + (size_t)v] + (bg ? bg[f] : 0.0f);
        J->hg[o] = gv;
        if (J->glu) {
            const float uv =
                tile_row[(size_t)pp * MOE__NR + MOE__VL + (size_t)v] + (bu ? bu[f] : 0.0f);
            J->hu[o] = uv;
            J->ha[o] = moe__act_simd(J->c->activation, gv) * uv;
        } else {
            J->ha[o] = moe__act_simd(J->c->activation, gv);
        }
    }
    moe__dropout_apply(J->f, J->ha, r, r + 1, p0 * fc, f_end);
}

/* Stage 2's epilogue on row r, columns of panels [p0, p1) of n_pan: out (+ down
   bias); whole panels are in out already, the partial last one in S. */
static void moe__packed_out_row(const moe__packed_job *J, int32_t e, int64_t r, int32_t p0,
                                int32_t p1, int32_t n_pan) {
    const float *tile_row = J->tiles + (size_t)r * J->ld_tiles;
    const int32_t d_end = p1 < n_pan ? p1 * MOE__NR : J->D, d_full = J->D / MOE__NR * MOE__NR;
    const float *bd = J->down_bias ? J->down_bias + (size_t)e * J->D : NULL;
    float *o = J->out + (size_t)r * J->D;
    int32_t d = p0 * MOE__NR;
    const int32_t d_mid = d_end < d_full ? d_end : d_full;
    if (bd) for (; d < d_mid; d++) o[d] += bd[d];
    for (d = d > d_mid ? d : d_mid; d < d_end; d++) o[d] = tile_row[d] + (bd ? bd[d] : 0.0f);
}

/* One task of a packed stage: its expert, row block and panel range from
   the task index, the tiles, then the epilogue on its rows. */
static void moe__packed_task(void *arg, int32_t task) {
    const moe__packed_job *J = (const moe__packed_job *)arg;
    const int32_t n_pan = J->stage == 1 ? J->g->p1 : J->g->p2;
    const int64_t depth = J->stage == 1 ? J->D : J->F;
    int32_t lo = 0, hi = J->n_sets, e, p0, p1, tb, n_tb;
    int64_t local, rb, r0, nr, r;
    while (hi - lo > 1) {                    /* expert of this task */
        const int32_t mid = (lo + hi) / 2;
        if (J->task_off[mid] <= task) lo = mid; else hi = mid;
    }
    e = lo;
    local = task - J->task_off[e];
    tb = J->panels_per_task[e];
    n_tb = (n_pan + tb - 1) / tb;
    rb = local / n_tb;
    p0 = (int32_t)(local % n_tb) * tb;
    p1 = p0 + tb < n_pan ? p0 + tb : n_pan;
    r0 = J->off[e] + rb * MOE__ROW_BLOCK;
    nr = J->off[e + 1] - r0 < MOE__ROW_BLOCK ? J->off[e + 1] - r0 : MOE__ROW_BLOCK;
    moe__packed_tiles(J, e, rb, p0, p1, r0, nr, depth);
    for (r = r0; r < r0 + nr; r++) {
        if (J->stage == 1) moe__packed_hidden_row(J, e, r, p0, p1, n_pan);
        else moe__packed_out_row(J, e, r, p0, p1, n_pan);
    }
}

/* v rounded to bf16 (nearest even), as a float. */
static float moe__bf16_float(float v) {
    const uint32_t u = (uint32_t)moe__bf16_of(v) << 16;
    float r;
    memcpy(&r, &u, sizeof r);
    return r;
}

/* Tile t of the stage's A (x rows, or ha rows in stage 2) into J->Ap: the
   micro-kernel then reads A front to back, not MR rows a row stride apart. */
static void moe__packed_a_task(void *arg, int32_t t) {
    const moe__packed_job *J = (const moe__packed_job *)arg;
    const int64_t depth = J->stage == 1 ? J->D : J->F;
    int32_t lo = 0, hi = J->n_sets;
    int64_t r0, left;
    while (hi - lo > 1) {                    /* set of this tile */
        const int32_t mid = (lo + hi) / 2;
        if (J->tile_off[mid] <= t) lo = mid; else hi = mid;
    }
    r0 = J->off[lo] + (t - J->tile_off[lo]) * MOE__MR;
    left = J->off[lo + 1] - r0;
    {
        float *dst = J->Ap + (size_t)t * MOE__MR * (size_t)depth;
        const float *src = (J->stage == 1 ? J->x : J->ha) + (size_t)r0 * (size_t)depth;
        const int32_t mr = (int32_t)(left < MOE__MR ? left : MOE__MR);
        size_t i, n = (size_t)MOE__MR * (size_t)depth;
        if (J->kind == MOE__B_DOT) {   /* bf16 pairs: [depth/2][MR] words, k in the low half */
            uint32_t *d32 = (uint32_t *)(void *)dst;
            int64_t k;
            int32_t r;
            for (k = 0; k < depth; k += 2)
                for (r = 0; r < MOE__MR; r++) {
                    const float *a = src + (size_t)r * (size_t)depth;
                    const uint32_t lo = r < mr ? moe__bf16_of(a[k]) : 0u;
                    const uint32_t hi = r < mr && k + 1 < depth ? moe__bf16_of(a[k + 1]) : 0u;
                    d32[(size_t)(k / 2) * MOE__MR + (size_t)r] = lo | hi << 16;
                }
            return;
        }
        moe__pack_a_tile(dst, src, (size_t)depth, 1, mr, depth);
        /* bf16 activations without VDPBF16PS */
        if (J->kind == MOE__B_BF16 && J->c->pack_bf16 == 2)
            for (i = 0; i < n; i++) dst[i] = moe__bf16_float(dst[i]);
    }
}

/* Rows of set e that the panels run. */
static int64_t moe__packed_rows(const moe__packed_job *J, int32_t e) {
    const int64_t n = J->off[e + 1] - J->off[e];
    return n <= J->skip_rows ? 0 : n;
}

/* Run both stages of a packed set: tasks of about MOE__PACKED_TASK_FLOPS. */
static void moe__packed_ffn(moe__packed_job *J) {
    int stage;
    int32_t e, grow;
    J->tile_off[0] = 0;
    for (e = 0; e < J->n_sets; e++)
        J->tile_off[e + 1] = J->tile_off[e] + (moe__packed_rows(J, e) + MOE__MR - 1) / MOE__MR;
    for (stage = 1; stage <= 2; stage++) {
        const int32_t n_pan = stage == 1 ? J->g->p1 : J->g->p2;
        const double depth = stage == 1 ? J->D : J->F;
        J->stage = stage;
        moe__parallel_for(J->c, (int32_t)J->tile_off[J->n_sets], moe__packed_a_task, J,
                          2.0 * (double)(J->off[J->n_sets] - J->off[0]) * depth * n_pan * MOE__NR);
        J->task_off[0] = 0;
        for (e = 0; e < J->n_sets; e++) {
            const int64_t n = moe__packed_rows(J, e);
            const int64_t n_rb = (n + MOE__ROW_BLOCK - 1) / MOE__ROW_BLOCK;
            const double rows = n < MOE__ROW_BLOCK ? (double)n : MOE__ROW_BLOCK;
            int32_t tb = n_pan;
            if (rows > 0) tb = (int32_t)(MOE__PACKED_TASK_FLOPS / (2.0 * rows * depth * MOE__NR));
            if (tb < 2) tb = 2;     /* a task's tiles prefetch its next panel */
            if (tb > n_pan) tb = n_pan;
            /* a few rows (decode) stream the weights: a set as one or two tasks would
               leave threads idle (a shared expert's stage 2 was one task), so at
               least 8 runs of panels per set (4: T=1 about 1.02x slower on the
               AMD Zen 3 host, a thread held up on a busy host left more of the
               stream to the other)                                               */
            if (n < MOE__MR && tb > (n_pan + 7) / 8) tb = (n_pan + 7) / 8;
            J->panels_per_task[e] = tb;
            J->task_off[e + 1] = J->task_off[e] + n_rb * ((n_pan + tb - 1) / tb);
        }
        /* the task count is an int32: over 2^31 tasks (a few million tokens of a
           wide layer), twice the panels per task until it fits */
        for (grow = 1; J->task_off[J->n_sets] > INT32_MAX && grow < n_pan; grow *= 2)
            for (e = 0; e < J->n_sets; e++) {
                const int32_t tb =
                    J->panels_per_task[e] < n_pan / 2 ? 2 * J->panels_per_task[e] : n_pan;
                const int64_t n_rb = moe__ceil_div(moe__packed_rows(J, e), MOE__ROW_BLOCK);
                J->panels_per_task[e] = tb;
                J->task_off[e + 1] = J->task_off[e] + n_rb * moe__ceil_div(n_pan, tb);
            }
        moe__parallel_for(J->c, (int32_t)J->task_off[J->n_sets], moe__packed_task, J,
                          2.0 * (double)(J->off[J->n_sets] - J->off[0]) * depth * n_pan * MOE__NR);
    }
}
#endif

/* Pack panels [p0, p1) of expert e's w13 (panels < g->p1) and w2 (the rest). */
typedef struct moe__pack_job {
    const moe__ffn *f;
    const moe__pack_geom *g;
    int glu, bf16;
    int32_t e;
    void *dst;                 /* this expert's panels: fp32, or bf16 (RNE) */
} moe__pack_job;

/* Element (k, v) of the panel at o: fp32 rows [k][NR], or bf16 row pairs
   [k/2][NR][2] (k + 1 beside k, for moe__v_bf16_lo/hi and VDPBF16PS). */
static void moe__pack_put(const moe__pack_job *J, size_t o, size_t k, size_t v, float x) {
    if (J->bf16)
        ((uint16_t *)J->dst)[o + (k & ~(size_t)1) * MOE__NR + 2 * v + (k & 1)] = moe__bf16_of(x);
    else ((float *)J->dst)[o + k * MOE__NR + v] = x;
}

/* Rows [k0, k1) of column v of the panel at o: values k0.. of row `row` of
   expert e's matrix (fp32 W, or blocks q; k0 a multiple of the block size),
   zeros from depth on and for a column with no row. */
static void moe__pack_column(const moe__pack_job *J, size_t o, size_t v, const float *W,
                             size_t stride, const moe__qmat *q, int has_row, size_t row,
                             size_t depth, size_t k0, size_t k1) {
    const moe__qinfo qi = moe__qblock(q->type);
    float block[256];
    size_t k = k0, i;
    if (has_row && q->data)
        for (; k < k1 && k < depth; k += (size_t)qi.block) {
            moe__dequant_block(q->type, q->data + (size_t)J->e * q->stride + row * q->row_bytes +
                                            k / (size_t)qi.block * qi.bytes, block);
            if (J->bf16) {
                for (i = 0; i < (size_t)qi.block; i++) moe__pack_put(J, o, k + i, v, block[i]);
            } else {                             /* fp32 rows of NR: a strided copy */
                float *dst = (float *)J->dst + o + k * MOE__NR + v;
                for (i = 0; i < (size_t)qi.block; i++) dst[i * MOE__NR] = block[i];
            }
        }
    else if (has_row)
        for (; k < k1 && k < depth; k++)
            moe__pack_put(J, o, k, v, W[(size_t)J->e * stride + row * depth + k]);
    for (; k < k1; k++) moe__pack_put(J, o, k, v, 0.0f);
}

/* A panel with quantized columns, 256 rows (a Q4_K block) at a time: each
   block decoded once, its tile of the panel written while in cache. */
static void moe__pack_q_panel(const moe__pack_job *J, int32_t task) {
    const moe__ffn *f = J->f;
    const int w13 = task < J->g->p1;
    const size_t D = (size_t)f->D, F = (size_t)f->F, p = (size_t)(w13 ? task : task - J->g->p1);
    const size_t rows = w13 ? J->g->k1 : J->g->k2, depth = w13 ? D : F;
    const size_t o = w13 ? p * rows * MOE__NR : J->g->w13 + p * rows * MOE__NR;
    size_t k0, v;
    for (k0 = 0; k0 < rows; k0 += 256)
        for (v = 0; v < MOE__NR; v++) {
            const size_t k1 = k0 + 256 < rows ? k0 + 256 : rows;
            if (w13) {
                const size_t col = J->glu ? p * MOE__VL + v % MOE__VL : p * MOE__NR + v;
                const int up = J->glu && v >= MOE__VL;
                moe__pack_column(J, o, v, up ? f->up : f->gate, up ? f->up_stride : f->gate_stride,
                                 up ? &f->up_q : &f->gate_q, col < F, col, depth, k0, k1);
            } else {
                const size_t col = p * MOE__NR + v;
                moe__pack_column(J, o, v, f->down, f->down_stride, &f->down_q, col < D, col,
                                 depth, k0, k1);
            }
        }
}

static void moe__pack_task(void *arg, int32_t task) {
    const moe__pack_job *J = (const moe__pack_job *)arg;
    const moe__ffn *f = J->f;
    const size_t D = (size_t)f->D, F = (size_t)f->F;
    const float *gate, *up, *down;
    size_t k, v;
    if (task < J->g->p1 ? f->gate_q.data || (J->glu && f->up_q.data) : f->down_q.data != NULL) {
        moe__pack_q_panel(J, task);
        return;
    }
    gate = f->gate + (size_t)J->e * f->gate_stride;
    up = J->glu ? f->up + (size_t)J->e * f->up_stride : NULL;
    down = f->down + (size_t)J->e * f->down_stride;
    if (task < J->g->p1) {                       /* w13 panel: [D][NR], D even */
        const size_t p = (size_t)task, o = p * J->g->k1 * MOE__NR;
        for (k = 0; k < J->g->k1; k++)
            for (v = 0; v < MOE__NR; v++) {
                const size_t col = J->glu ? p * MOE__VL + v % MOE__VL : p * MOE__NR + v;
                const float *src = J->glu && v >= MOE__VL ? up : gate;
                moe__pack_put(J, o, k, v, col < F && k < D ? src[col * D + k] : 0.0f);
            }
    } else {                                     /* w2 panel: [F][NR], F even */
        const size_t p = (size_t)(task - J->g->p1), o = J->g->w13 + p * J->g->k2 * MOE__NR;
        for (k = 0; k < J->g->k2; k++)
            for (v = 0; v < MOE__NR; v++) {
                const size_t col = p * MOE__NR + v;
                moe__pack_put(J, o, k, v, col < D && k < F ? down[col * F + k] : 0.0f);
            }
    }
}

#if MOE__HAS_SIMD
/* moe__qdot_ref's sums on vectors: one weight row against up to
   MOE__QDOT_NR activation rows, each block's codes decoded once for all of
   them. x86: 32 codes and 32 q per step in one 256-bit register; maddubs
   multiplies unsigned by signed bytes, so signed codes lend q their sign
   (|code| * q sign(code)), as ggml does; each row's float vector of 8 lanes
   accumulates (scale * d) * isum, its mins a float beside it. aarch64
   with the dot-product extension: SDOT. Other builds (NEON without
   +dotprod) run moe__qdot_ref.                                           */
#define MOE__QDOT_NR 4
/* Activation rows a call of moe__qdot_group (moe__qpdot_simd's most: its 8 accumulators, 8
   code vectors and scales fit the 32 registers) */
#define MOE__QPDOT_NR 8
#if defined(__AVX2__)
/* 32 nibbles of 16 bytes: value j < 16 the low nibble of byte j, j + 16 its high */
static __m256i moe__nibbles(const unsigned char *b) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)(const void *)b);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
                            _mm256_set1_epi8(0x0f));
}
#if defined(__AVX512F__) && defined(__AVX512BW__)
/* AVX-512 (with BW): two blocks per step in one 512-bit register, lanes 0-7
   block b and 8-15 block b + 1 (or zeros past an odd last block). No
   vpsignb at 512 bits: codes go in as |code|, q has its sign flipped where
   the code is negative (a masked 0 - q).                                   */
static __m512i moe__isum64(__m512i u, __m512i v) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, v);
#else
    return _mm512_madd_epi16(_mm512_maddubs_epi16(u, v), _mm512_set1_epi16(1));
#endif
}
static __m512i moe__pair512(__m256i lo, __m256i hi) {
    const __m512i z = _mm512_setzero_si512();
    return _mm512_mask_inserti64x4(z, 0xFF, _mm512_mask_inserti64x4(z, 0xFF, z, lo, 0), hi, 1);
}

/* The sum of v's 16 lanes (halves added, then quarters, then within). Here
   and below, zero-masked forms: see moe__v_pow2i's note. */
static float moe__hsum512(__m512 v) {
    const __m512d vd = _mm512_castps_pd(v);
    const __m256 lo = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, vd, 0));
    const __m256 hi = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, vd, 1));
    const __m256 h = _mm256_add_ps(lo, hi);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Two fp16 block scales as floats [s0, s1, 0, 0] (VCVTPH2PS is AVX-512F). */
static __m128 moe__f16x2(const unsigned char *h0, const unsigned char *h1) {
    const uint32_t bits = (uint32_t)moe__u16le(h0) | (uint32_t)moe__u16le(h1) << 16;
    return _mm512_maskz_extractf32x4_ps(0xF, _mm512_maskz_cvtph_ps((__mmask16)0xFFFF,
        _mm256_setr_epi32((int)bits, 0, 0, 0, 0, 0, 0, 0)), 0);
}

/* Blocks b and b + 1 (two: 0 drops the second) against the n_rows rows:
   acc[i] += [s0 d_i[b] x8, s1 d_i[b+1] x8] * isum_i, scales = [s0, s1, ..]. */
#define MOE__QDOT_PAIR(codes, is_signed, scales, b, two)                                       \
    do {                                                                                       \
        const __m512i c_ = (codes), u_ = (is_signed) ? _mm512_abs_epi8(c_) : c_;               \
        const __mmask64 neg_ = (is_signed) ? _mm512_movepi8_mask(c_) : 0;                      \
        const __mmask64 half_ = (two) ? ~(__mmask64)0 : 0xffffffffu;                           \
        const __m128 sc_ = (scales);                                                           \
        const __mmask16 all_ = 0xFFFF;                                                         \
        int32_t i_;                                                                            \
        for (i_ = 0; i_ < n_rows; i_++) {                                                      \
            const __m512i q_ = _mm512_maskz_loadu_epi8(half_, q[i_] + 32 * (b));               \
            const __m512i v_ = _mm512_mask_sub_epi8(q_, neg_, _mm512_setzero_si512(), q_);     \
            const __m128 d_ = (two) ? _mm_castpd_ps(_mm_load_sd((const double *)(const void *) \
                                                                (d[i_] + (b))))                \
                                    : _mm_load_ss(d[i_] + (b));                                \
            acc[i_] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(all_, moe__isum64(u_, v_)),     \
                                      _mm512_maskz_permutexvar_ps(all_, two_lanes,             \
                                          _mm512_maskz_broadcast_f32x4(all_,                   \
                                                                       _mm_mul_ps(sc_, d_))),  \
                                      acc[i_]);                                                \
        }                                                                                      \
    } while (0)

/* The kernel for NR rows (a constant where it is expanded: its row loops
   unroll and the accumulators stay in registers). */
#define MOE__QDOT_KERNEL(NR)                                                                   \
    static void moe__qdot_x86_##NR(int32_t type, const unsigned char *w, const moe__qact *a,   \
                                   int64_t r0, float *out) {                                   \
        const int32_t nb = a->k / 32, n_rows = NR;                                             \
        const __m512i two_lanes = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, \
                                                    1, 1);                                     \
        const __m256i zero = _mm256_setzero_si256();                                           \
        const int8_t *q[NR];                                                                   \
        const float *d[NR], *s[NR];                                                            \
        __m512 acc[NR];                                                                        \
        __m256 macc[NR];                                                                       \
        float mins[NR];                                                                        \
        int32_t b, i, j, two;                                                                  \
        for (i = 0; i < NR; i++) {                                                             \
            q[i] = a->q + (size_t)(r0 + i) * (size_t)a->k;                                     \
            d[i] = a->d + (size_t)(r0 + i) * (size_t)nb;                                       \
            s[i] = a->s + (size_t)(r0 + i) * (size_t)nb;                                       \
            acc[i] = _mm512_setzero_ps();                                                      \
            macc[i] = _mm256_setzero_ps();                                                     \
            mins[i] = 0.0f;                                                                    \
        }                                                                                      \
        if (type == MOE_QTYPE_Q8_0) {                                                          \
            for (b = 0; b < nb; b += 2, w += 68) {                                             \
                two = b + 1 < nb;                                                              \
                MOE__QDOT_PAIR(moe__pair512(_mm256_loadu_si256((const __m256i *)(const void *)  \
                                                               (w + 2)),                       \
                                            two ? _mm256_loadu_si256((const __m256i *)         \
                                                                     (const void *)(w + 36))   \
                                                : zero),                                       \
                               1, moe__f16x2(w, two ? w + 34 : w), b, two);                    \
            }                                                                                  \
        } else if (type == MOE_QTYPE_Q4_0) {                                                   \
            const __m512i eight = _mm512_set1_epi8(8);                                         \
            for (b = 0; b < nb; b += 2, w += 36) {                                             \
                two = b + 1 < nb;                                                              \
                MOE__QDOT_PAIR(_mm512_sub_epi8(moe__pair512(moe__nibbles(w + 2),               \
                                                            two ? moe__nibbles(w + 20)         \
                                                                : _mm256_set1_epi8(8)), eight),\
                               1, moe__f16x2(w, two ? w + 18 : w), b, two);                    \
            }                                                                                  \
        } else if (type == MOE_QTYPE_MXFP4) {                                                  \
            const __m512i table = _mm512_maskz_broadcast_i32x4(0xFFFF, _mm_setr_epi8(          \
                0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12));                     \
            for (b = 0; b < nb; b += 2, w += 34) {                                             \
                two = b + 1 < nb;                                                              \
                MOE__QDOT_PAIR(_mm512_shuffle_epi8(table, moe__pair512(moe__nibbles(w + 1),    \
                                                                       two ? moe__nibbles(     \
                                                                           w + 18) : zero)),   \
                               1, _mm_setr_ps(moe__e8m0_half(w[0]), two ? moe__e8m0_half(w[17])\
                                                                        : 0.0f, 0.0f, 0.0f),   \
                               b, two);                                                        \
            }                                                                                  \
        } else {                               /* Q4_K: 8 sub-blocks per 144 bytes */          \
            const __m256i lo = _mm256_set1_epi8(0x0f);                                         \
            for (b = 0; b < nb; b += 8, w += 144) {                                            \
                const float dd = moe__f16_float(moe__u16le(w));                                \
                const float dm = moe__f16_float(moe__u16le(w + 2));                            \
                float sc[8], mn[8];                                                            \
                __m256 mins8;                                                                  \
                for (j = 0; j < 8; j++) moe__q4k_scale_min(w + 4, j, &sc[j], &mn[j]);          \
                for (j = 0; j < 8; j += 2) {   /* 32 bytes: sub-block j low, j + 1 high */     \
                    const __m256i raw = _mm256_loadu_si256(                                    \
                        (const __m256i *)(const void *)(w + 16 + 16 * j));                     \
                    MOE__QDOT_PAIR(moe__pair512(_mm256_and_si256(raw, lo),                     \
                                                _mm256_and_si256(_mm256_srli_epi16(raw, 4),    \
                                                                 lo)),                         \
                                   0, _mm_setr_ps(dd * sc[j], dd * sc[j + 1], 0.0f, 0.0f), b + j, \
                                   1);                                                         \
                }                                                                              \
                mins8 = _mm256_mul_ps(_mm256_set1_ps(dm), _mm256_loadu_ps(mn));                \
                for (i = 0; i < NR; i++)   /* the mins in lanes: no serial chain */            \
                    macc[i] = _mm256_add_ps(macc[i], _mm256_mul_ps(mins8,                      \
                                                                   _mm256_loadu_ps(s[i] + b)));\
            }                                                                                  \
        }                                                                                      \
        for (i = 0; i < NR; i++) {                                                             \
            float m_[8];                                                                       \
            _mm256_storeu_ps(m_, macc[i]);                                                     \
            for (j = 0; j < 8; j++) mins[i] += m_[j];                                          \
            out[i] = moe__hsum512(acc[i]) - mins[i];                                           \
        }                                                                                      \
    }
#else
static float moe__hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* The 8 int32 partial sums of 32 codes (u: |codes|, or the codes when they
   are unsigned) times 32 q (v: q with the codes' signs, or q). */
static __m256i moe__isum32(__m256i u, __m256i v) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, v);   /* VPDPBUSD: 4 products a lane */
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, v);
#else
    /* pairs into int16 (|code|, |q| <= 127: no saturation), then pairs of those: the same sums */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, v), _mm256_set1_epi16(1));
#endif
}

/* One block of codes against the n_rows rows: acc[i] += (scale * d_i) * isum_i.
   mul + add: an AVX-512F build need not have FMA3's 256-bit forms. */
#define MOE__QDOT_BLOCK(codes, is_signed, scale, b)                                            \
    do {                                                                                       \
        const __m256i c_ = (codes), u_ = (is_signed) ? _mm256_sign_epi8(c_, c_) : c_;          \
        int32_t i_;                                                                            \
        for (i_ = 0; i_ < n_rows; i_++) {                                                      \
            const __m256i q_ = _mm256_loadu_si256((const __m256i *)(const void *)(q[i_] +      \
                                                                                  32 * (b)));  \
            const __m256i v_ = (is_signed) ? _mm256_sign_epi8(q_, c_) : q_;                    \
            acc[i_] = _mm256_add_ps(acc[i_], _mm256_mul_ps(_mm256_set1_ps((scale) * d[i_][b]), \
                                                           _mm256_cvtepi32_ps(                 \
                                                               moe__isum32(u_, v_))));         \
        }                                                                                      \
    } while (0)

/* The kernel for NR rows (a constant where it is expanded: its row loops
   unroll and the accumulators stay in registers). */
#define MOE__QDOT_KERNEL(NR)                                                                   \
    static void moe__qdot_x86_##NR(int32_t type, const unsigned char *w, const moe__qact *a,   \
                                   int64_t r0, float *out) {                                   \
        const int32_t nb = a->k / 32, n_rows = NR;                                             \
        const int8_t *q[NR];                                                                   \
        const float *d[NR], *s[NR];                                                            \
        __m256 acc[NR];                                                                        \
        __m256 macc[NR];                                                                       \
        int32_t b, i, j;                                                                       \
        for (i = 0; i < NR; i++) {                                                             \
            q[i] = a->q + (size_t)(r0 + i) * (size_t)a->k;                                     \
            d[i] = a->d + (size_t)(r0 + i) * (size_t)nb;                                       \
            s[i] = a->s + (size_t)(r0 + i) * (size_t)nb;                                       \
            acc[i] = _mm256_setzero_ps();                                                      \
            macc[i] = _mm256_setzero_ps();                                                     \
        }                                                                                      \
        if (type == MOE_QTYPE_Q8_0) {                                                          \
            for (b = 0; b < nb; b++, w += 34)                                                  \
                MOE__QDOT_BLOCK(_mm256_loadu_si256((const __m256i *)(const void *)(w + 2)), 1, \
                                moe__f16_float(moe__u16le(w)), b);                             \
        } else if (type == MOE_QTYPE_Q4_0) {                                                   \
            for (b = 0; b < nb; b++, w += 18)                                                  \
                MOE__QDOT_BLOCK(_mm256_sub_epi8(moe__nibbles(w + 2), _mm256_set1_epi8(8)), 1,  \
                                moe__f16_float(moe__u16le(w)), b);                             \
        } else if (type == MOE_QTYPE_MXFP4) {                                                  \
            const __m256i table = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, \
                                                   -6, -8, -12, 0, 1, 2, 3, 4, 6, 8, 12, 0,    \
                                                   -1, -2, -3, -4, -6, -8, -12);               \
            for (b = 0; b < nb; b++, w += 17)                                                  \
                MOE__QDOT_BLOCK(_mm256_shuffle_epi8(table, moe__nibbles(w + 1)), 1,            \
                                moe__e8m0_half(w[0]), b);                                      \
        } else {                               /* Q4_K: 8 sub-blocks per 144 bytes */          \
            for (b = 0; b < nb; b += 8, w += 144) {                                            \
                const float dd = moe__f16_float(moe__u16le(w));                                \
                const float dm = moe__f16_float(moe__u16le(w + 2));                            \
                float sc[8], mn[8];                                                            \
                __m256 mins8;                                                                  \
                for (j = 0; j < 8; j++) moe__q4k_scale_min(w + 4, j, &sc[j], &mn[j]);          \
                for (j = 0; j < 8; j += 2) {   /* 32 bytes: sub-block j low, j + 1 high */     \
                    const __m256i raw = _mm256_loadu_si256(                                    \
                        (const __m256i *)(const void *)(w + 16 + 16 * j));                     \
                    const __m256i lo = _mm256_set1_epi8(0x0f);                                 \
                    MOE__QDOT_BLOCK(_mm256_and_si256(raw, lo), 0, dd * sc[j], b + j);          \
                    MOE__QDOT_BLOCK(_mm256_and_si256(_mm256_srli_epi16(raw, 4), lo), 0,        \
                                    dd * sc[j + 1], b + j + 1);                                \
                }                                                                              \
                mins8 = _mm256_mul_ps(_mm256_set1_ps(dm), _mm256_loadu_ps(mn));                \
                for (i = 0; i < NR; i++)   /* the mins in lanes: no serial chain */            \
                    macc[i] = _mm256_add_ps(macc[i], _mm256_mul_ps(mins8,                      \
                                                                   _mm256_loadu_ps(s[i] + b)));\
            }                                                                                  \
        }                                                                                      \
        for (i = 0; i < NR; i++)                                                               \
            out[i] = moe__hsum256(acc[i]) - moe__hsum256(macc[i]);                             \
    }
#endif /* AVX-512 + BW, else AVX2 */
MOE__QDOT_KERNEL(1)
MOE__QDOT_KERNEL(2)
MOE__QDOT_KERNEL(3)
MOE__QDOT_KERNEL(4)
#undef MOE__QDOT_KERNEL
#undef MOE__QDOT_BLOCK
#undef MOE__QDOT_PAIR

static void moe__qdot_simd(int32_t type, const unsigned char *w, const moe__qact *a, int64_t r0,
                           int32_t nr, float *out) {
    switch (nr) {
    case 1: moe__qdot_x86_1(type, w, a, r0, out); break;
    case 2: moe__qdot_x86_2(type, w, a, r0, out); break;
    case 3: moe__qdot_x86_3(type, w, a, r0, out); break;
    default: moe__qdot_x86_4(type, w, a, r0, out); break;
    }
}
#if MOE__HAS_QPDOT
/* moe__qpdot_ref's sums on 512-bit vectors: lane r of every vector is row
   r of the group, so a unit is 8 (Q8_0) or 4 (4-bit) loads of codes and 8
   dpbusd per activation row, each with that row's 4 int8 q broadcast, and
   no horizontal sum. Codes are stored unsigned (moe__qp_pack_group): the
   products' sum has the offset's share, off * sum(q), taken back in int32.
   Without VNNI, dpbusd is maddubs + madd, exact for codes below 16 (Q8_0's
   bytes go in as two nibbles). Zero-masked forms where GCC 12 would warn
   (moe__v_pow2i's note).                                                  */
#if !defined(__AVX512VNNI__)
static __m512i moe__dpbusd(__m512i acc, __m512i u, __m512i s) {   /* u below 128 */
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s),
                                                   _mm512_set1_epi16(1)));
}
static __m512i moe__dpbusd_u8(__m512i acc, __m512i u, __m512i s) {   /* any byte u */
    const __m512i lo = _mm512_set1_epi8(0x0f);
    const __m512i hi = moe__dpbusd(_mm512_setzero_si512(),
                                   _mm512_and_si512(_mm512_srli_epi16(u, 4), lo), s);
    return _mm512_add_epi32(moe__dpbusd(acc, _mm512_and_si512(u, lo), s),
                            _mm512_maskz_slli_epi32((__mmask16)0xFFFF, hi, 4));
}
#endif
static __m512i moe__q4x16(const int8_t *p) {   /* 4 bytes to every lane: a load's broadcast */
    return _mm512_maskz_broadcastd_epi32((__mmask16)0xFFFF, _mm_loadu_si32(p));
}
static __m512 moe__f16x16(const unsigned char *h) {
    return _mm512_maskz_cvtph_ps((__mmask16)0xFFFF,
                                 _mm256_loadu_si256((const __m256i *)(const void *)h));
}
static __m512 moe__u8x16(const unsigned char *b) {
    return _mm512_maskz_cvtepi32_ps((__mmask16)0xFFFF, _mm512_maskz_cvtepu8_epi32(
        (__mmask16)0xFFFF, _mm_loadu_si128((const __m128i *)(const void *)b)));
}

/* Each unit prefetches the bytes 2 KiB ahead of it: the weights stream from memory with
   little work per byte, and at 1-4 activation rows the hardware prefetchers left the loads
   waiting (q4_0 and q8_0, 3 rounds: T = 16 1.1-1.3x faster, T = 1 up to 1.2x; 1 KiB and
   4 KiB no better). */
#define MOE__QP_AHEAD 2048u
/* Row i's 8 dpbusd over the unit's codes c0..c7 (two chains: half the
   latency), its offset taken back, then acc_i += isum * scale * d [- mn * s]. */
#define MOE__QP_ROW(NR, i)                                                                     \
    if ((NR) > (i)) {                                                                          \
        const int8_t *v_ = q[i] + 32 * b;                                                      \
        __m512i s0_, s1_;                                                                      \
        s0_ = MOE__QP_DP(_mm512_setzero_si512(), c0, v_);                                      \
        s1_ = MOE__QP_DP(_mm512_setzero_si512(), c1, v_ + 4);                                  \
        s0_ = MOE__QP_DP(s0_, c2, v_ + 8); s1_ = MOE__QP_DP(s1_, c3, v_ + 12);                 \
        s0_ = MOE__QP_DP(s0_, c4, v_ + 16); s1_ = MOE__QP_DP(s1_, c5, v_ + 20);                \
        s0_ = MOE__QP_DP(s0_, c6, v_ + 24); s1_ = MOE__QP_DP(s1_, c7, v_ + 28);                \
        s0_ = _mm512_sub_epi32(_mm512_add_epi32(s0_, s1_), _mm512_set1_epi32(off * qs[i][b])); \
        acc##i = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps((__mmask16)0xFFFF, s0_),             \
                                 _mm512_mul_ps(scale, _mm512_set1_ps(d[i][b])), acc##i);       \
        if (type == MOE_QTYPE_Q4_K)                                                            \
            acc##i = _mm512_fnmadd_ps(mn, _mm512_set1_ps(s[i][b]), acc##i);                    \
    }
#if defined(__AVX512VNNI__)
#define MOE__QP_DP(acc, c, p) _mm512_dpbusd_epi32((acc), (c), moe__q4x16(p))
#else
#define MOE__QP_DP(acc, c, p)                                                                  \
    (wide ? moe__dpbusd_u8((acc), (c), moe__q4x16(p)) : moe__dpbusd((acc), (c), moe__q4x16(p)))
#endif

/* The kernel for NR activation rows (a constant where it is expanded, so
   the codes and the accumulators stay in registers). */
#define MOE__QP_KERNEL(NR)                                                                     \
    static void moe__qpdot_x86_##NR(int32_t type, const unsigned char *g, const moe__qact *a, \
                                    int64_t r0, float *out) {                                  \
        const int32_t nb = a->k / 32, wide = type == MOE_QTYPE_Q8_0;                          \
        const int32_t off = wide ? 128 : type == MOE_QTYPE_Q4_0 ? 8                           \
                          : type == MOE_QTYPE_MXFP4 ? 12 : 0;                                  \
        const size_t code_bytes = moe__qp_code_bytes(type), unit = moe__qp_unit_bytes(type);  \
        const __m512i lo = _mm512_set1_epi8(0x0f);                                             \
        const __m512i e2m1 = _mm512_maskz_broadcast_i32x4((__mmask16)0xFFFF, _mm_setr_epi8(    \
            12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));  /* + 12 */         \
        const int8_t *q[MOE__QPDOT_NR];                                                        \
        const float *d[MOE__QPDOT_NR], *s[MOE__QPDOT_NR];                                      \
        const int32_t *qs[MOE__QPDOT_NR];                                                      \
        __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;              \
        __m512 acc4 = acc0, acc5 = acc0, acc6 = acc0, acc7 = acc0, dd = acc0, dm = acc0;       \
        int32_t b, i;                                                                          \
        for (i = 0; i < NR; i++) {                                                             \
            const size_t row = (size_t)(r0 + i);                                               \
            q[i] = a->q + row * (size_t)a->k;                                                  \
            d[i] = a->d + row * (size_t)nb; s[i] = a->s + row * (size_t)nb;                   \
            qs[i] = a->qsum + row * (size_t)nb;                                                \
        }                                                                                      \
        for (b = 0; b < nb; b++, g += unit) {                                                  \
            __m512i c0, c1, c2, c3, c4, c5, c6, c7;                                            \
            __m512 scale, mn = _mm512_setzero_ps();                                            \
            size_t pf_;                                                                        \
            for (pf_ = 0; pf_ < unit; pf_ += 64)   /* an address past the blob: no pointer */  \
                MOE__PREFETCH((const void *)((uintptr_t)g + MOE__QP_AHEAD + pf_));             \
            if (type == MOE_QTYPE_Q4_K && b % 8 == 0) {                                        \
                dd = moe__f16x16(g); dm = moe__f16x16(g + 32); g += 64;                        \
            }                                                                                  \
            if (wide) {                                                                        \
                c0 = _mm512_loadu_si512((const void *)g);                                      \
                c1 = _mm512_loadu_si512((const void *)(g + 64));                               \
                c2 = _mm512_loadu_si512((const void *)(g + 128));                              \
                c3 = _mm512_loadu_si512((const void *)(g + 192));                              \
                c4 = _mm512_loadu_si512((const void *)(g + 256));                              \
                c5 = _mm512_loadu_si512((const void *)(g + 320));                              \
                c6 = _mm512_loadu_si512((const void *)(g + 384));                              \
                c7 = _mm512_loadu_si512((const void *)(g + 448));                              \
            } else {           /* chunk j: low nibbles k-group j, high nibbles j + 4 */        \
                const __m512i r0_ = _mm512_loadu_si512((const void *)g);                       \
                const __m512i r1_ = _mm512_loadu_si512((const void *)(g + 64));                \
                const __m512i r2_ = _mm512_loadu_si512((const void *)(g + 128));               \
                const __m512i r3_ = _mm512_loadu_si512((const void *)(g + 192));               \
                c0 = _mm512_and_si512(r0_, lo); c1 = _mm512_and_si512(r1_, lo);                \
                c2 = _mm512_and_si512(r2_, lo); c3 = _mm512_and_si512(r3_, lo);                \
                c4 = _mm512_and_si512(_mm512_srli_epi16(r0_, 4), lo);                          \
                c5 = _mm512_and_si512(_mm512_srli_epi16(r1_, 4), lo);                          \
                c6 = _mm512_and_si512(_mm512_srli_epi16(r2_, 4), lo);                          \
                c7 = _mm512_and_si512(_mm512_srli_epi16(r3_, 4), lo);                          \
                if (type == MOE_QTYPE_MXFP4) {                                                 \
                    c0 = _mm512_shuffle_epi8(e2m1, c0); c1 = _mm512_shuffle_epi8(e2m1, c1);    \
                    c2 = _mm512_shuffle_epi8(e2m1, c2); c3 = _mm512_shuffle_epi8(e2m1, c3);    \
                    c4 = _mm512_shuffle_epi8(e2m1, c4); c5 = _mm512_shuffle_epi8(e2m1, c5);    \
                    c6 = _mm512_shuffle_epi8(e2m1, c6); c7 = _mm512_shuffle_epi8(e2m1, c7);    \
                }                                                                              \
            }                                                                                  \
            if (type == MOE_QTYPE_MXFP4) {                                                     \
                scale = _mm512_loadu_ps((const float *)(const void *)(g + code_bytes));        \
            } else if (type == MOE_QTYPE_Q4_K) {                                               \
                scale = _mm512_mul_ps(dd, moe__u8x16(g + code_bytes));                         \
                mn = _mm512_mul_ps(dm, moe__u8x16(g + code_bytes + 16));                       \
            } else {                                                                           \
                scale = moe__f16x16(g + code_bytes);                                           \
            }                                                                                  \
            MOE__QP_ROW(NR, 0) MOE__QP_ROW(NR, 1) MOE__QP_ROW(NR, 2) MOE__QP_ROW(NR, 3)        \
            MOE__QP_ROW(NR, 4) MOE__QP_ROW(NR, 5) MOE__QP_ROW(NR, 6) MOE__QP_ROW(NR, 7)        \
        }                                                                                      \
        _mm512_storeu_ps(out, acc0);                                                           \
        if (NR > 1) _mm512_storeu_ps(out + MOE__QP_ROWS, acc1);                                \
        if (NR > 2) _mm512_storeu_ps(out + 2 * MOE__QP_ROWS, acc2);                            \
        if (NR > 3) _mm512_storeu_ps(out + 3 * MOE__QP_ROWS, acc3);                            \
        if (NR > 4) _mm512_storeu_ps(out + 4 * MOE__QP_ROWS, acc4);                            \
        if (NR > 5) _mm512_storeu_ps(out + 5 * MOE__QP_ROWS, acc5);                            \
        if (NR > 6) _mm512_storeu_ps(out + 6 * MOE__QP_ROWS, acc6);                            \
        if (NR > 7) _mm512_storeu_ps(out + 7 * MOE__QP_ROWS, acc7);                            \
    }
MOE__QP_KERNEL(1)
MOE__QP_KERNEL(2)
MOE__QP_KERNEL(3)
MOE__QP_KERNEL(4)
MOE__QP_KERNEL(5)
MOE__QP_KERNEL(6)
MOE__QP_KERNEL(7)
MOE__QP_KERNEL(8)
#undef MOE__QP_KERNEL
#undef MOE__QP_ROW
#undef MOE__QP_DP

static void moe__qpdot_simd(int32_t type, const unsigned char *g, const moe__qact *a, int64_t r0,
                            int32_t nr, float *out) {
    switch (nr) {
    case 1: moe__qpdot_x86_1(type, g, a, r0, out); break;
    case 2: moe__qpdot_x86_2(type, g, a, r0, out); break;
    case 3: moe__qpdot_x86_3(type, g, a, r0, out); break;
    case 4: moe__qpdot_x86_4(type, g, a, r0, out); break;
    case 5: moe__qpdot_x86_5(type, g, a, r0, out); break;
    case 6: moe__qpdot_x86_6(type, g, a, r0, out); break;
    case 7: moe__qpdot_x86_7(type, g, a, r0, out); break;
    default: moe__qpdot_x86_8(type, g, a, r0, out); break;
    }
}
#endif /* AVX-512 + BW */
#elif defined(__ARM_FEATURE_DOTPROD)
/* aarch64 with the dot-product extension (-march=armv8.2-a+dotprod): SDOT
   sums four signed int8 products per 32-bit lane, so codes need no sign
   trick; a block is two 16-byte registers of codes. */
static void moe__qdot_simd(int32_t type, const unsigned char *w, const moe__qact *a, int64_t r0,
                           int32_t nr, float *out) {
    const int32_t nb = a->k / 32;
    const int8x16_t e2m1 = vld1q_s8(moe__e2m1x2);
    const uint8x16_t low4 = vdupq_n_u8(0x0f);
    float32x4_t acc[MOE__QDOT_NR];
    float mins[MOE__QDOT_NR], scale = 0.0f, mn = 0.0f;
    int32_t b, i;
    for (i = 0; i < nr; i++) { acc[i] = vdupq_n_f32(0.0f); mins[i] = 0.0f; }
    for (b = 0; b < nb; b++) {
        int8x16_t c0, c1;
        if (type == MOE_QTYPE_Q8_0) {
            const unsigned char *c = w + 34 * (size_t)b;
            scale = moe__f16_float(moe__u16le(c));
            c0 = vld1q_s8((const int8_t *)(const void *)(c + 2));
            c1 = vld1q_s8((const int8_t *)(const void *)(c + 18));
        } else if (type == MOE_QTYPE_Q4_0 || type == MOE_QTYPE_MXFP4) {
            const int q4 = type == MOE_QTYPE_Q4_0;
            const unsigned char *c = w + (q4 ? 18 : 17) * (size_t)b;
            const uint8x16_t raw = vld1q_u8(c + (q4 ? 2 : 1));
            const uint8x16_t lo = vandq_u8(raw, low4), hi = vshrq_n_u8(raw, 4);
            scale = q4 ? moe__f16_float(moe__u16le(c)) : moe__e8m0_half(c[0]);
            c0 = q4 ? vsubq_s8(vreinterpretq_s8_u8(lo), vdupq_n_s8(8)) : vqtbl1q_s8(e2m1, lo);
            c1 = q4 ? vsubq_s8(vreinterpretq_s8_u8(hi), vdupq_n_s8(8)) : vqtbl1q_s8(e2m1, hi);
        } else {                                 /* Q4_K: sub-block b % 8 of block b / 8 */
            const unsigned char *c = w + 144 * (size_t)(b / 8);
            const unsigned char *qs = c + 16 + 32 * ((b % 8) / 2);
            const uint8x16_t r0v = vld1q_u8(qs), r1v = vld1q_u8(qs + 16);
            float sc, m;
            moe__q4k_scale_min(c + 4, b % 8, &sc, &m);
            scale = moe__f16_float(moe__u16le(c)) * sc;
            mn = moe__f16_float(moe__u16le(c + 2)) * m;
            c0 = vreinterpretq_s8_u8(b & 1 ? vshrq_n_u8(r0v, 4) : vandq_u8(r0v, low4));
            c1 = vreinterpretq_s8_u8(b & 1 ? vshrq_n_u8(r1v, 4) : vandq_u8(r1v, low4));
        }
        for (i = 0; i < nr; i++) {
            const size_t row = (size_t)(r0 + i);
            const int8_t *q = a->q + row * (size_t)a->k + 32 * (size_t)b;
            const int32x4_t isum = vdotq_s32(vdotq_s32(vdupq_n_s32(0), c0, vld1q_s8(q)), c1,
                                             vld1q_s8(q + 16));
            acc[i] = vaddq_f32(acc[i], vmulq_n_f32(vcvtq_f32_s32(isum),
                                                    scale * a->d[row * (size_t)nb + (size_t)b]));
            if (type == MOE_QTYPE_Q4_K) mins[i] += mn * a->s[row * (size_t)nb + (size_t)b];
        }
    }
    for (i = 0; i < nr; i++) out[i] = vaddvq_f32(acc[i]) - mins[i];
}
#else
static void moe__qdot_simd(int32_t type, const unsigned char *w, const moe__qact *a, int64_t r0,
                           int32_t nr, float *out) {
    moe__qdot_ref(type, w, a, r0, nr, out);
}
#endif
#endif

#if MOE__HAS_SIMD
/* Experts with few rows on quantized weights (decode, small batches): dots
   straight from the blocks, with the activations quantized to int8 per 32
   values, so each weight is read once per call at its 4.25-8.5 bits
   instead of being decoded into fp32 panels first. A flat task list of
   (expert, run of MOE__QDOT_UNITS output units); each task writes its own
   units of its expert's rows, in a fixed order: the same bits for any
   thread count. With w.qpacked (AVX-512 builds) the dots read the decode
   layout, 16 weight rows a vector and 8 activation rows a pass; when all
   of an expert's matrices have it, it mostly runs here at any number of
   rows (an int8 GEMM; moe__qp_any_rows). Otherwise above MOE__QDOT_ROWS
   rows an expert takes the panels, above MOE__QDOT_ROWS_PACKED when
   w.packed holds them already and there is no decode layout (measured on
   the 2-core AVX-512 host: beside the blob, experts of 8-12 rows ran
   0.55-0.72x as fast on the blocks as packed fp32, of 1-4 rows 0.86-2.1x).
   fp32 experts without a blob take the same tasks up to MOE__ROWDOT_ROWS
   rows, reading their rows in place in the panels' summation order
   (moe__rowdot_simd) instead of being packed.                             */
#define MOE__QDOT_ROWS 16
#define MOE__QDOT_ROWS_PACKED 4
/* fp32 experts of up to this many rows (no blob) read their rows: AVX-512 T = 128 (12-32
   rows an expert) 1.2-4.4x faster than packing per call; AVX2 (the same host) slower at 32
   rows (mixtral-mini 145 against 133 ms), so 16 there (bench/RESULTS.md) */
#define MOE__ROWDOT_ROWS (MOE__VL == 16 ? 32 : 16)
#define MOE__QDOT_UNITS 32

/* Activation row r of x as moe__qact blocks (the spec of
   moe__qact_row_simd). */
MOE__TWIN static void moe__qact_row(const moe__qact *a, int64_t r, const float *x) {
    const int32_t nb = a->k / 32;
    int8_t *q = a->q + (size_t)r * (size_t)a->k;
    int32_t b, j;
    for (b = 0; b < nb; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f, d, id;
        int32_t sum = 0;
        for (j = 0; j < 32; j++) if (fabsf(xb[j]) > amax) amax = fabsf(xb[j]);
        d = amax / 127.0f;
        id = d > 0.0f ? 1.0f / d : 0.0f;
        for (j = 0; j < 32; j++) {
            q[32 * b + j] = (int8_t)roundf(xb[j] * id);
            sum += q[32 * b + j];
        }
        a->d[(size_t)r * (size_t)nb + (size_t)b] = d;
        a->s[(size_t)r * (size_t)nb + (size_t)b] = d * (float)sum;
        a->qsum[(size_t)r * (size_t)nb + (size_t)b] = sum;
    }
}

#if MOE__VL == 16
/* moe__qact_row on 512-bit vectors, the same bits: max |x| and sum q by
   reductions (NaN skipped as there), and roundf (half away from zero) as
   the truncation plus a step of 1 where the exact fraction reaches one
   half. No libm call: glibc's roundf is SSE code, which called after the
   AVX-512 kernels ran 27x slower (an SSE/AVX state-transition penalty;
   deepseek-mini T = 128, the quantization of ha, on the AVX-512 host).    */
static void moe__qact_row_simd(const moe__qact *a, int64_t r, const float *x) {
    const int32_t nb = a->k / 32;
    const __mmask16 all = (__mmask16)0xFFFF;
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
    int8_t *q = a->q + (size_t)r * (size_t)a->k;
    int32_t b, h;
    for (b = 0; b < nb; b++) {
        const float *xb = x + 32 * b;
        __m512 v[2];
        __m512i qi[2];
        float lanes[16], amax = 0.0f, d, id;
        int32_t sums[16], sum = 0, l;
        v[0] = _mm512_loadu_ps(xb);
        v[1] = _mm512_loadu_ps(xb + 16);
        /* max(|x|, m) keeps m where |x| is NaN, as the scalar `>` does */
        _mm512_storeu_ps(lanes, _mm512_maskz_max_ps(all, _mm512_abs_ps(v[1]), _mm512_maskz_max_ps(
                                    all, _mm512_abs_ps(v[0]), _mm512_setzero_ps())));
        for (l = 0; l < 16; l++) amax = lanes[l] > amax ? lanes[l] : amax;
        d = amax / 127.0f;
        id = d > 0.0f ? 1.0f / d : 0.0f;
        for (h = 0; h < 2; h++) {
            const __m512 y = _mm512_mul_ps(v[h], _mm512_set1_ps(id));
            const __m512 t = _mm512_maskz_roundscale_ps(all, y, _MM_FROUND_TO_ZERO |
                                                                _MM_FROUND_NO_EXC);
            const __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(y, t)), half,
                                                    _CMP_GE_OQ);
            const __m512 step = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_castps_si512(one), _mm512_and_si512(_mm512_castps_si512(y), sign)));
            qi[h] = _mm512_maskz_cvttps_epi32(all, _mm512_mask_add_ps(t, up, t, step));
            _mm_storeu_si128((__m128i *)(void *)(q + 32 * b + 16 * h),
                             _mm512_maskz_cvtepi32_epi8(all, qi[h]));
        }
        _mm512_storeu_si512((void *)sums, _mm512_add_epi32(qi[0], qi[1]));
        for (l = 0; l < 16; l++) sum += sums[l];
        a->d[(size_t)r * (size_t)nb + (size_t)b] = d;
        a->s[(size_t)r * (size_t)nb + (size_t)b] = d * (float)sum;
        a->qsum[(size_t)r * (size_t)nb + (size_t)b] = sum;
    }
}
#else
#  define moe__qact_row_simd moe__qact_row
#endif

typedef struct moe__qdot_job {
    const moe__ffn *f;
    const int64_t *off;
    const int32_t *experts;     /* the experts this path runs */
    int32_t n_experts, runs, stage;
    const float *x;             /* [N][D] rows (stage 1's float operand) */
    float *hg, *hu, *ha, *out;
    moe__qact a;                /* the stage's activations as int8 */
} moe__qdot_job;

/* fp32 rows as the panels sum them: rows 0 .. n - 1 (n <= 16) of W (row-
   major, depth columns) . activation rows 0 .. NR - 1 of x (depth apart)
   into out[i][16]. Each sum runs k ascending from 0 by FMA, as the micro-
   kernel sums a packed panel's column, so these are the panels' bits
   without packing the expert into the workspace first: its rows are read
   once, where the per-call pack read them, wrote the panels and read those
   again. A few columns of the 16 rows at a time are turned k-major (a
   vector lane a row; each ISA's way below), then one FMA per k, activation
   row and vector.                                                         */
#if MOE__VL == 16
/* AVX-512: 16 columns of the 16 rows at a time, loaded (zero-masked past
   depth and past row n) and turned k-major in registers: a 16 x 16
   transpose in 64 shuffles (32-bit, then 64-bit interleaves within 128-bit
   lanes, then the lanes), no trip through memory.                         */
static __m512 moe__pd_lo(__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_maskz_unpacklo_pd((__mmask8)0xFF, _mm512_castps_pd(a),
                                                     _mm512_castps_pd(b)));
}
static __m512 moe__pd_hi(__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_maskz_unpackhi_pd((__mmask8)0xFF, _mm512_castps_pd(a),
                                                     _mm512_castps_pd(b)));
}
MOE__INLINE void moe__transpose16(__m512 *r) {   /* r[j] lane k -> r[k] lane j */
    const __mmask16 all = (__mmask16)0xFFFF;    /* zero-masked forms: moe__v_pow2i's note */
    __m512 t[16];
    int32_t i, c;
    for (i = 0; i < 8; i++) {          /* lane L of t[2i]: rows 2i, 2i + 1 at 4L, 4L + 1 */
        t[2 * i] = _mm512_maskz_unpacklo_ps(all, r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_maskz_unpackhi_ps(all, r[2 * i], r[2 * i + 1]);
    }
    for (i = 0; i < 4; i++) {          /* lane L of r[4i + c]: rows 4i .. 4i + 3 at 4L + c */
        r[4 * i] = moe__pd_lo(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = moe__pd_hi(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = moe__pd_lo(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = moe__pd_hi(t[4 * i + 1], t[4 * i + 3]);
    }
    for (c = 0; c < 4; c++) {          /* column 4L + c: lane L of r[c], r[4 + c], ... */
        const __m512 lo = _mm512_maskz_shuffle_f32x4(all, r[c], r[4 + c], 0x44);
        const __m512 hi = _mm512_maskz_shuffle_f32x4(all, r[c], r[4 + c], 0xEE);
        const __m512 lo2 = _mm512_maskz_shuffle_f32x4(all, r[8 + c], r[12 + c], 0x44);
        const __m512 hi2 = _mm512_maskz_shuffle_f32x4(all, r[8 + c], r[12 + c], 0xEE);
        t[c] = _mm512_maskz_shuffle_f32x4(all, lo, lo2, 0x88);
        t[4 + c] = _mm512_maskz_shuffle_f32x4(all, lo, lo2, 0xDD);
        t[8 + c] = _mm512_maskz_shuffle_f32x4(all, hi, hi2, 0x88);
        t[12 + c] = _mm512_maskz_shuffle_f32x4(all, hi, hi2, 0xDD);
    }
    for (i = 0; i < 16; i++) r[i] = t[i];
}
MOE__INLINE void moe__rowdot_body(const int32_t NR, const float *W, size_t depth, int32_t n,
                                  const float *x, float *out) {
    __m512 acc[MOE__QDOT_NR], col[16];
    size_t k0, k;
    int32_t i, j;
    MOE__UNROLL
    for (i = 0; i < NR; i++) acc[i] = _mm512_setzero_ps();
    for (k0 = 0; k0 < depth; k0 += 16) {
        const size_t kc = depth - k0 < 16 ? depth - k0 : 16;
        const __mmask16 m = (__mmask16)(kc == 16 ? 0xFFFFu : (1u << kc) - 1u);
        MOE__UNROLL
        for (j = 0; j < 16; j++)
            col[j] = j < n ? _mm512_maskz_loadu_ps(m, W + (size_t)j * depth + k0)
                           : _mm512_setzero_ps();
        moe__transpose16(col);
        MOE__UNROLL
        for (k = 0; k < 16; k++) {
            if (k >= kc) break;
            MOE__UNROLL
            for (i = 0; i < NR; i++)
                acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[(size_t)i * depth + k0 + k]), col[k],
                                         acc[i]);
        }
    }
    MOE__UNROLL
    for (i = 0; i < NR; i++) _mm512_storeu_ps(out + (size_t)i * MOE__QP_ROWS, acc[i]);
}
#elif MOE__VL == 8
/* AVX2: 8 columns of each half of the 16 rows at a time, loaded (masked
   past depth, zeros past row n) and transposed 8 x 8 in registers (24
   shuffles).                                                              */
MOE__INLINE void moe__transpose8(__m256 *r) {     /* r[j] lane k -> r[k] lane j */
    __m256 t[8], u[8];
    int32_t i;
    for (i = 0; i < 4; i++) {          /* rows 2i, 2i + 1 interleaved */
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (i = 0; i < 2; i++) {          /* u[4i + c]: rows 4i .. 4i + 3 at c | c + 4 */
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
        r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
    }
}
MOE__INLINE void moe__rowdot_body(const int32_t NR, const float *W, size_t depth, int32_t n,
                                  const float *x, float *out) {
    static const int32_t ramp[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    __m256 acc[MOE__QDOT_NR][2], col[8];
    size_t k0, k;
    int32_t i, j, h;
    MOE__UNROLL
    for (i = 0; i < NR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (k0 = 0; k0 < depth; k0 += 8) {
        const size_t kc = depth - k0 < 8 ? depth - k0 : 8;
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)kc),
                                             _mm256_loadu_si256((const __m256i *)(const void *)
                                                                ramp));
        for (h = 0; h < 2; h++) {
            MOE__UNROLL
            for (j = 0; j < 8; j++)
                col[j] = 8 * h + j < n ? _mm256_maskload_ps(W + (size_t)(8 * h + j) * depth + k0,
                                                            m)
                                       : _mm256_setzero_ps();
            moe__transpose8(col);
            MOE__UNROLL
            for (k = 0; k < 8; k++) {
                if (k >= kc) break;
                MOE__UNROLL
                for (i = 0; i < NR; i++)
                    acc[i][h] = _mm256_fmadd_ps(_mm256_set1_ps(x[(size_t)i * depth + k0 + k]),
                                                col[k], acc[i][h]);
            }
        }
    }
    MOE__UNROLL
    for (i = 0; i < NR; i++) {
        _mm256_storeu_ps(out + (size_t)i * MOE__QP_ROWS, acc[i][0]);
        _mm256_storeu_ps(out + (size_t)i * MOE__QP_ROWS + 8, acc[i][1]);
    }
}
#else
/* Other ISAs: MOE__ROWDOT_KC columns of the 16 rows at a time copied
   k-major into L1, then read back as vectors. */
#define MOE__ROWDOT_KC 64
MOE__INLINE void moe__rowdot_body(const int32_t NR, const float *W, size_t depth, int32_t n,
                                  const float *x, float *out) {
    float t[MOE__ROWDOT_KC * MOE__QP_ROWS];
    moe__vf acc[MOE__QDOT_NR][MOE__QP_ROWS / MOE__VL];
    size_t k0, k;
    int32_t i, j, v;
    MOE__UNROLL
    for (i = 0; i < NR; i++)
        for (v = 0; v < MOE__QP_ROWS / MOE__VL; v++) acc[i][v] = moe__v_zero();
    for (k0 = 0; k0 < depth; k0 += MOE__ROWDOT_KC) {
        const size_t kc = depth - k0 < MOE__ROWDOT_KC ? depth - k0 : MOE__ROWDOT_KC;
        for (j = 0; j < n; j++) {
            const float *row = W + (size_t)j * depth + k0;
            for (k = 0; k < kc; k++) t[k * MOE__QP_ROWS + (size_t)j] = row[k];
        }
        for (; j < MOE__QP_ROWS; j++)            /* rows past n: zeros, never stored */
            for (k = 0; k < kc; k++) t[k * MOE__QP_ROWS + (size_t)j] = 0.0f;
        for (k = 0; k < kc; k++) {
            MOE__UNROLL
            for (v = 0; v < MOE__QP_ROWS / MOE__VL; v++) {
                const moe__vf w = moe__v_load(t + k * MOE__QP_ROWS + (size_t)v * MOE__VL);
                MOE__UNROLL
                for (i = 0; i < NR; i++)
                    acc[i][v] = moe__v_fma(moe__v_set1(x[(size_t)i * depth + k0 + k]), w,
                                           acc[i][v]);
            }
        }
    }
    MOE__UNROLL
    for (i = 0; i < NR; i++)
        for (v = 0; v < MOE__QP_ROWS / MOE__VL; v++)
            moe__v_store(out + (size_t)i * MOE__QP_ROWS + (size_t)v * MOE__VL, acc[i][v]);
}
#endif
static void moe__rowdot_simd(const float *W, size_t depth, int32_t n, const float *x, int32_t nr,
                             float *out) {
    switch (nr) {               /* MOE__QDOT_NR (4) instances: the accumulators in registers */
    case 1: moe__rowdot_body(1, W, depth, n, x, out); break;
    case 2: moe__rowdot_body(2, W, depth, n, x, out); break;
    case 3: moe__rowdot_body(3, W, depth, n, x, out); break;
    default: moe__rowdot_body(4, W, depth, n, x, out); break;
    }
}

/* Units g0 .. g0 + n - 1 (n <= 16, g0 a multiple of 16) of expert e's
   matrix . activation rows r0 .. r0 + nr - 1 (nr <= MOE__QPDOT_NR) into
   out[i][16]: on its decode layout qp (AVX-512BW builds), on its blocks q
   (a unit a call), or on fp32 W (the panels' bits, from act's rows); the
   last two MOE__QDOT_NR rows at a time. */
static void moe__qdot_group(const moe__qdot_job *J, const moe__qmat *q, const unsigned char *qp,
                            size_t qp_stride, const float *W, size_t stride, size_t e, int32_t g0,
                            int32_t n, const float *act, int64_t r0, int32_t nr, float *out) {
    const size_t depth = (size_t)J->a.k;
    float v[MOE__QDOT_NR];
    int32_t u, i, i0, m;
#if MOE__HAS_QPDOT
    if (qp) {
        moe__qpdot_simd(q->type, qp + e * qp_stride + (size_t)(g0 / MOE__QP_ROWS) *
                                     moe__qp_group_bytes(q->type, depth), &J->a, r0, nr, out);
        return;
    }
#else
    (void)qp; (void)qp_stride;
#endif
    for (i0 = 0; i0 < nr; i0 += MOE__QDOT_NR) {
        float *o = out + (size_t)i0 * MOE__QP_ROWS;
        m = nr - i0 < MOE__QDOT_NR ? nr - i0 : MOE__QDOT_NR;
        if (!q->data) {
            moe__rowdot_simd(W + e * stride + (size_t)g0 * depth, depth, n,
                             act + (size_t)(r0 + i0) * depth, m, o);
            continue;
        }
        for (u = 0; u < n; u++) {
            moe__qdot_simd(q->type, q->data + e * q->stride + (size_t)(g0 + u) * q->row_bytes,
                           &J->a, r0 + i0, m, v);
            for (i = 0; i < m; i++) o[(size_t)i * MOE__QP_ROWS + (size_t)u] = v[i];
        }
    }
}

static void moe__qdot_act_task(void *arg, int32_t i) {   /* one expert's rows to int8 */
    const moe__qdot_job *J = (const moe__qdot_job *)arg;
    const int32_t e = J->experts[i];
    const float *src = J->stage == 1 ? J->x : J->ha;
    int64_t r;
    for (r = J->off[e]; r < J->off[e + 1]; r++)
        moe__qact_row_simd(&J->a, r, src + (size_t)r * (size_t)J->a.k);
}

/* ha = act(hg) (* hu), n values, in the SIMD kernels' bits (moe__act_simd,
   as the panels' epilogue writes it). */
static void moe__activate_simd(moe_activation act, float *ha, const float *hg, const float *hu,
                               size_t n) {
    size_t i = 0;
    if (moe__act_has_simd(act))
        for (; i + MOE__VL <= n; i += MOE__VL) {
            const moe__vf g = moe__v_load(hg + i);
            const moe__vf a = moe__v_mul(g, moe__v_sigmoid(g));
            moe__v_store(ha + i, hu ? moe__v_mul(a, moe__v_load(hu + i)) : a);
        }
    for (; i < n; i++) ha[i] = hu ? moe__act_simd(act, hg[i]) * hu[i] : moe__act_simd(act, hg[i]);
}

/* A group call's out[i][16] (+ bias) into rows i of dst (ld apart), units
   0 .. n - 1; without a bias + 0.0f all the same (-0.0 becomes +0.0). */
static void moe__qdot_put(float *dst, size_t ld, const float *out, const float *bias, int32_t nr,
                          int32_t n) {
    int32_t i, u;
    for (i = 0; i < nr; i++) {
        float *d = dst + (size_t)i * ld;
        const float *o = out + (size_t)i * MOE__QP_ROWS;
        for (u = 0; u + MOE__VL <= n; u += MOE__VL)
            moe__v_store(d + u, moe__v_add(moe__v_load(o + u),
                                           bias ? moe__v_load(bias + u) : moe__v_zero()));
        for (; u < n; u++) d[u] = o[u] + (bias ? bias[u] : 0.0f);
    }
}

/* Units [u0, u1) of one expert's rows, 16 units and MOE__QPDOT_NR rows a
   call: stage 1 hg, hu and ha (+ biases, activation, dropout), stage 2 out
   (+ bias). */
static void moe__qdot_task(void *arg, int32_t task) {
    const moe__qdot_job *J = (const moe__qdot_job *)arg;
    const moe__ffn *f = J->f;
    const size_t e = (size_t)J->experts[task / J->runs];
    const int32_t n_units = J->stage == 1 ? f->F : f->D, u0 = task % J->runs * MOE__QDOT_UNITS;
    const int32_t u1 = u0 + MOE__QDOT_UNITS < n_units ? u0 + MOE__QDOT_UNITS : n_units;
    const size_t F = (size_t)f->F, n_out = J->stage == 1 ? F : (size_t)f->D;
    const int s1 = J->stage == 1, up = s1 && moe__act_is_glu(f->act);
    const moe__qmat *m = s1 ? &f->gate_q : &f->down_q;
    const unsigned char *qp = s1 ? f->gate_qp : f->down_qp;
    const size_t qps = s1 ? f->gate_qps : f->down_qps, stride = s1 ? f->gate_stride
                                                                   : f->down_stride;
    const float *W = s1 ? f->gate : f->down, *act = s1 ? J->x : J->ha;
    const float *bias = s1 ? f->gate_bias : f->down_bias;
    float *dst = s1 ? J->hg : J->out;
    float g16[MOE__QPDOT_NR * MOE__QP_ROWS], u16[MOE__QPDOT_NR * MOE__QP_ROWS];
    int64_t r0, r;
    int32_t g0, nr;
    for (r0 = J->off[e]; r0 < J->off[e + 1]; r0 += nr) {
        nr = (int32_t)(J->off[e + 1] - r0 < MOE__QPDOT_NR ? J->off[e + 1] - r0 : MOE__QPDOT_NR);
        for (g0 = u0; g0 < u1; g0 += MOE__QP_ROWS) {
            const int32_t n = u1 - g0 < MOE__QP_ROWS ? u1 - g0 : MOE__QP_ROWS;
            moe__qdot_group(J, m, qp, qps, W, stride, e, g0, n, act, r0, nr, g16);
            if (up)
                moe__qdot_group(J, &f->up_q, f->up_qp, f->up_qps, f->up, f->up_stride, e, g0, n,
                                act, r0, nr, u16);
            moe__qdot_put(dst + (size_t)r0 * n_out + (size_t)g0, n_out, g16,
                          bias ? bias + e * n_out + (size_t)g0 : NULL, nr, n);
            if (up)
                moe__qdot_put(J->hu + (size_t)r0 * F + (size_t)g0, F, u16,
                              f->up_bias ? f->up_bias + e * F + (size_t)g0 : NULL, nr, n);
        }
    }
    if (s1)
        for (r = J->off[e]; r < J->off[e + 1]; r++) {
            const size_t at = (size_t)r * F + (size_t)u0;
            moe__activate_simd(f->act, J->ha + at, J->hg + at, up ? J->hu + at : NULL,
                               (size_t)(u1 - u0));
            moe__dropout_apply(f, J->ha, r, r + 1, u0, u1);
        }
}

/* Run the experts of a set with 1..max_rows rows this way; returns how
   many it ran. experts: scratch for their list ([n_sets]); act: room for
   the int8 activations (1.375 bytes a value of N rows of max(D, F)). */
static int32_t moe__experts_qdot(const moe_config *c, const moe__ffn *f, int32_t n_sets,
                                 const int64_t *off, int64_t max_rows, const float *x, float *hg,
                                 float *hu, float *ha, float *out, int32_t *experts, float *act) {
    const int glu = moe__act_is_glu(f->act);
    const size_t N = (size_t)off[n_sets];
    moe__qdot_job J;
    int32_t e, n = 0;
    for (e = 0; e < n_sets; e++)
        if (off[e + 1] > off[e] && off[e + 1] - off[e] <= max_rows) experts[n++] = e;
    if (n == 0) return 0;
    memset(&J, 0, sizeof J);
    J.f = f; J.off = off; J.experts = experts; J.n_experts = n;
    J.x = x; J.hg = hg; J.hu = hu; J.ha = ha; J.out = out;
    for (J.stage = 1; J.stage <= 2; J.stage++) {
        const int32_t k = J.stage == 1 ? f->D : f->F, n_units = J.stage == 1 ? f->F : f->D;
        const size_t nb = (size_t)(k / 32);
        J.a.k = k;
        J.a.d = act; J.a.s = act + N * nb;
        J.a.qsum = (int32_t *)(void *)(act + 2 * N * nb);
        J.a.q = (int8_t *)(void *)(act + 3 * N * nb);
        if (J.stage == 1 ? f->gate_q.data || (glu && f->up_q.data) : f->down_q.data != NULL)
            moe__parallel_for(c, n, moe__qdot_act_task, &J, (double)N * (double)k);
        J.runs = (n_units + MOE__QDOT_UNITS - 1) / MOE__QDOT_UNITS;
        moe__parallel_for(c, n * J.runs, moe__qdot_task, &J,
                          2.0 * (double)N * (double)f->D * (double)f->F * (glu ? 2.0 : 1.0));
    }
    return n;
}
#endif

#if MOE__HAS_SIMD
/* Do a set's experts take the decode layout's dots at any number of rows? When
   every matrix has it: 8 rows a pass beat the panels at every T measured
   (bench/RESULTS.md), except Q8_0 without VNNI beside a blob: its full-byte
   codes take two maddubs passes, and the blob's panels ran T = 1024 faster
   (mixtral-mini 207 against 352 ms); such sets keep MOE__QDOT_ROWS. Without
   a blob they beat panels decoded on every call at 5 of the 6 shapes and T
   measured (T = 128, 1024; not mixtral-mini T = 1024, 356 against 256 ms). */
static int moe__qp_any_rows(const moe__ffn *f, const unsigned char *packed_set) {
    const int glu = moe__act_is_glu(f->act);
    if (!f->gate_qp || !f->down_qp || (glu && !f->up_qp)) return 0;
#if !defined(__AVX512VNNI__)
    if (packed_set && (f->gate_q.type == MOE_QTYPE_Q8_0 || f->down_q.type == MOE_QTYPE_Q8_0 ||
                       (glu && f->up_q.type == MOE_QTYPE_Q8_0)))
        return 0;
#else
    (void)packed_set;
#endif
    return 1;
}

/* Expert FFNs of a set on the SIMD kernels: from w.packed when given, else
   each expert with rows is packed into the workspace first (one extra pass
   over its weights), then run. Experts with few rows run as dots
   (moe__experts_qdot): quantized ones on their blocks either way, fp32 ones
   on their rows when there is no blob.                                     */
static void moe__experts_simd(const moe_config *c, const moe__ffn *f,
                              const unsigned char *packed_set, int32_t n_sets, const int64_t *off,
                              const float *x, float *hg, float *hu, float *ha, float *out,
                              float *tiles, const moe__ws *ws) {
    const moe__pack_geom g = moe__pack_geometry(c, f->F);
    const int quant = f->gate_q.data || f->up_q.data || f->down_q.data;
    /* fp32 experts without a blob read their rows as the panels would sum them
       (moe__rowdot_simd) instead of packing per call */
    const int64_t qdot_rows = !quant ? (packed_set ? 0 : MOE__ROWDOT_ROWS)
                            : moe__qp_any_rows(f, packed_set) ? INT64_MAX
                            : packed_set && !f->gate_qp && !f->down_qp ? MOE__QDOT_ROWS_PACKED
                                                                       : MOE__QDOT_ROWS;
    moe__packed_job J;
    moe__pack_job pj;
    int32_t e;
    memset(&J, 0, sizeof J);
    J.c = c; J.f = f; J.g = &g; J.glu = moe__act_is_glu(c->activation);
    J.F = f->F; J.D = f->D;
    J.x = x; J.hg = hg; J.hu = hu; J.ha = ha; J.out = out; J.tiles = tiles;
    J.ld_tiles = (size_t)(g.p1 > g.p2 ? g.p1 : g.p2) * MOE__NR;
    J.task_off = ws->task_off;
    J.panels_per_task = ws->task_panels;
    J.tile_off = ws->tile_off;
    J.Ap = ws->apack;
    /* few rows on blocks: integer dots, beside a blob too (they read a quarter to a half of
       its bytes); J's lists are free until the panels run */
    if (qdot_rows > 0)
        moe__experts_qdot(c, f, n_sets, off, qdot_rows, x, hg, hu, ha, out, ws->task_panels,
                          ws->apack);
    if (packed_set) {                            /* every other set in one task list */
        J.esize = c->pack_bf16 ? sizeof(uint16_t) : sizeof(float);
        J.kind = !c->pack_bf16 ? MOE__B_F32
                               : c->pack_bf16 == 2 && MOE__HAS_BF16_DOT ? MOE__B_DOT : MOE__B_BF16;
        J.panels = packed_set; J.set_stride = (g.w13 + g.w2) * J.esize;
        J.n_sets = n_sets; J.off = off;
        J.skip_rows = qdot_rows;
        J.gate_bias = f->gate_bias; J.up_bias = f->up_bias; J.down_bias = f->down_bias;
        moe__packed_ffn(&J);
        return;
    }
    pj.f = f; pj.g = &g; pj.glu = J.glu; pj.bf16 = 0; pj.dst = ws->pack;
    J.panels = (const unsigned char *)pj.dst; J.set_stride = 0; J.esize = sizeof(float);
    J.n_sets = 1; J.kind = MOE__B_F32;
    for (e = 0; e < n_sets; e++) {               /* expert by expert: pack, then run */
        if (off[e + 1] == off[e]) continue;      /* untouched experts cost nothing */
        if (off[e + 1] - off[e] <= qdot_rows) continue;   /* done above */
        pj.e = e;
        moe__parallel_for(c, g.p1 + g.p2, moe__pack_task, &pj, (double)(g.w13 + g.w2));
        J.off = off + e;
        J.gate_bias = f->gate_bias ? f->gate_bias + (size_t)e * (size_t)f->F : NULL;
        J.up_bias = f->up_bias ? f->up_bias + (size_t)e * (size_t)f->F : NULL;
        J.down_bias = f->down_bias ? f->down_bias + (size_t)e * (size_t)f->D : NULL;
        moe__packed_ffn(&J);
    }
}
#endif

#if MOE__HAS_SIMD
/* Activation backward of rows [r0, r1) of an expert set, as parallel tasks
   (and ha rebuilt from the cache, when ha is set).                         */
typedef struct moe__act_bw_job {
    const moe__ffn *f;
    int64_t base;                   /* first row of the set */
    float *dh, *du, *ha;
    const float *hg, *hu;
} moe__act_bw_job;
static void moe__act_bw_rows(void *arg, int64_t r0, int64_t r1) {
    const moe__act_bw_job *j = (const moe__act_bw_job *)arg;
    const size_t F = (size_t)j->f->F;
    r0 += j->base; r1 += j->base;
    moe__dropout_apply(j->f, j->dh, r0, r1, 0, j->f->F);  /* through the dropout mask */
    moe__act_backward_simd(j->f->act, j->dh, j->du, j->hg, j->hu, j->ha, (size_t)r0 * F,
                           (size_t)r1 * F);
    if (j->ha) moe__dropout_apply(j->f, j->ha, r0, r1, 0, j->f->F);  /* the forward's mask on ha */
}

/* moe__experts_backward_ref on the SIMD kernels: rows of each expert at
   once, every product one GEMM in parallel tasks (moe__gemm_par_simd:
   through packed copies in pack when the product is big enough), the
   activation backward over all rows in one pass (with rebuild_ha it writes
   ha too: one pass over hg and hu instead of two) before d down_e.        */
static void moe__experts_backward_simd(const moe_config *c, const moe__ffn *f,
                                       const moe__ffn_grad *g, int32_t num_experts,
                                       const int64_t *off, const float *x, const float *hg,
                                       const float *hu, float *ha, int rebuild_ha,
                                       const float *dout, float *dh, float *du, float *dx,
                                       float *pack) {
    const size_t D = (size_t)f->D, F = (size_t)f->F;
    const int glu = moe__act_is_glu(f->act);
    moe__act_bw_job aj;
    int32_t e;
    for (e = 0; e < num_experts; e++) {
        const int64_t r0 = off[e], n = off[e + 1] - off[e];
        const size_t h0 = (size_t)r0 * F, x0 = (size_t)r0 * D;
        if (n == 0) continue;
        /* da[n][F] = dout[n][D] . down[D][F] */
        moe__gemm_par_simd(c, n, f->F, f->D, dout + x0, D, 1,
                           f->down + (size_t)e * f->down_stride, F, dh + h0, F, 0, pack);
        moe__sum_rows(g->down_bias ? g->down_bias + (size_t)e * D : NULL, dout + x0, n, f->D, D);
    }
    /* through the dropout mask and the activation, every row at once */
    aj.f = f; aj.base = off[0];
    aj.dh = dh; aj.du = du; aj.hg = hg; aj.hu = hu;
    aj.ha = rebuild_ha ? ha : NULL;
    moe__parallel_rows(c, off[num_experts] - off[0], 256, moe__act_bw_rows, &aj,
                       20.0 * (double)(off[num_experts] - off[0]) * (double)F);
    for (e = 0; e < num_experts; e++) {
        const int64_t r0 = off[e], n = off[e + 1] - off[e];
        const size_t h0 = (size_t)r0 * F, x0 = (size_t)r0 * D;
        if (n == 0) continue;
        /* d down[D][F] += dout^T . ha */
        if (g->down)
            moe__gemm_par_simd(c, f->D, f->F, n, dout + x0, 1, D, ha + h0, F,
                               g->down + (size_t)e * f->down_stride, F, 1, pack);
        /* d gate[F][D] += dh^T . x,  d up += du^T . x */
        if (g->gate)
            moe__gemm_par_simd(c, f->F, f->D, n, dh + h0, 1, F, x + x0, D,
                               g->gate + (size_t)e * f->gate_stride, D, 1, pack);
        moe__sum_rows(g->gate_bias ? g->gate_bias + (size_t)e * F : NULL, dh + h0, n, f->F, F);
        if (glu) {
            if (g->up)
                moe__gemm_par_simd(c, f->F, f->D, n, du + h0, 1, F, x + x0, D,
                                   g->up + (size_t)e * f->up_stride, D, 1, pack);
            moe__sum_rows(g->up_bias ? g->up_bias + (size_t)e * F : NULL, du + h0, n, f->F, F);
        }
        /* dx[n][D] = dh . gate[F][D] (+ du . up) */
        if (!dx) continue;
        moe__gemm_par_simd(c, n, f->D, f->F, dh + h0, F, 1,
                           f->gate + (size_t)e * f->gate_stride, D, dx + x0, D, 0, pack);
        if (glu)
            moe__gemm_par_simd(c, n, f->D, f->F, du + h0, F, 1,
                               f->up + (size_t)e * f->up_stride, D, dx + x0, D, 1, pack);
    }
}
#endif

/* The two kernel tables and the one place that picks between them. */
static const moe__kernels moe__kernels_ref = {
    MOE_ISA_REFERENCE, moe__gemm_par_ref, moe__linear_ref, moe__add_scaled_ref, moe__dot_ref,
    moe__act_backward_ref, moe__experts_ref, moe__experts_backward_ref
};
#if MOE__HAS_SIMD
static const moe__kernels moe__kernels_simd = {
    MOE__SIMD_ISA, moe__gemm_par_simd, moe__linear_simd, moe__add_scaled_simd, moe__dot_simd,
    moe__act_backward_simd, moe__experts_simd, moe__experts_backward_simd
};
#endif
static const moe__kernels *moe__kernels_of(const moe_config *c) {
#if MOE__HAS_SIMD
    if (c->isa == MOE__SIMD_ISA) return &moe__kernels_simd;
#endif
    (void)c;
    return &moe__kernels_ref;
}

// ----------------------------------------------------------------------------
// Drivers: the public calls. Each checks its arguments, plans the workspace
// and runs the stages above in pipeline order through the kernel table.

/* Buffer overlap (MOE_STATUS_ALIASING). A call lists the caller buffers it
   reads and writes as byte spans; two may share bytes only if neither is
   written. An allowed in-place pair (y == x) is listed once, as written.
   The longest list is moe_backward's: 54 spans.                           */
#define MOE__MAX_SPANS 64
typedef struct moe__spans {
    struct { uintptr_t lo, hi; int written; } s[MOE__MAX_SPANS];
    int n;
} moe__spans;

static void moe__span(moe__spans *S, const void *p, size_t count, size_t elem, int written) {
    const uintptr_t lo = (uintptr_t)p;
    size_t bytes = moe__mul(count, elem);
    if (!p || bytes == 0) return;
    MOE_ASSERT(S->n < MOE__MAX_SPANS);
    if (bytes > (size_t)(UINTPTR_MAX - lo)) bytes = (size_t)(UINTPTR_MAX - lo);
    S->s[S->n].lo = lo; S->s[S->n].hi = lo + bytes; S->s[S->n].written = written;
    S->n++;
}

static int moe__spans_overlap(const moe__spans *S) {
    int i, j;
    for (i = 0; i < S->n; i++)
        for (j = i + 1; j < S->n; j++)
            if ((S->s[i].written || S->s[j].written) &&
                S->s[i].lo < S->s[j].hi && S->s[j].lo < S->s[i].hi)
                return 1;
    return 0;
}

/* The tensors of a moe_grads-shaped set with their sizes and fans. */
typedef struct moe__tensor {
    float *p; size_t n, per_expert; double fan_in, fan_out; int bias;
} moe__tensor;

static int32_t moe__tensors(const moe_config *c, const moe_grads *g, moe__tensor *t) {
    const double D = c->d_model, F = c->d_ff, Fs = c->shared_d_ff, E = c->num_experts;
    const size_t R = (size_t)c->num_experts * (size_t)c->slots_per_expert;
    const int glu = moe__act_is_glu(c->activation);
    int32_t n = 0;
#define MOE__T(ptr, count, per, fi, fo, isb) \
    do { t[n].p = (ptr); t[n].n = (size_t)(count); t[n].per_expert = (size_t)(per); \
         t[n].fan_in = (fi); t[n].fan_out = (fo); t[n].bias = (isb); n++; } while (0)
    MOE__T(g->router, E * D, D, D, E, 0);
    MOE__T(g->router_bias, E, 1, D, E, 1);
    MOE__T(g->router_noise, E * D, D, D, E, 0);
    /* fused: gate is [E][2F][D] (the layer reads it with that stride whatever
       the activation), one stream per expert covering both halves */
    MOE__T(g->gate, E * (g->gate_up_fused ? 2 : 1) * F * D, (g->gate_up_fused ? 2 : 1) * F * D,
           D, F, 0);
    MOE__T(glu && !g->gate_up_fused ? g->up : NULL, E * F * D, F * D, D, F, 0);
    MOE__T(g->down, E * D * F, D * F, F, D, 0);
    MOE__T(g->gate_bias, E * F, F, D, F, 1);
    MOE__T(glu ? g->up_bias : NULL, E * F, F, D, F, 1);
    MOE__T(g->down_bias, E * D, D, F, D, 1);
    MOE__T(Fs > 0 ? g->shared_gate : NULL, Fs * D, Fs * D, D, Fs, 0);
    MOE__T(Fs > 0 && glu ? g->shared_up : NULL, Fs * D, Fs * D, D, Fs, 0);
    MOE__T(Fs > 0 ? g->shared_down : NULL, D * Fs, D * Fs, Fs, D, 0);
    MOE__T(Fs > 0 ? g->shared_gate_bias : NULL, Fs, Fs, D, Fs, 1);
    MOE__T(Fs > 0 && glu ? g->shared_up_bias : NULL, Fs, Fs, D, Fs, 1);
    MOE__T(Fs > 0 ? g->shared_down_bias : NULL, D, D, Fs, D, 1);
    MOE__T(c->shared_expert_gated ? g->shared_expert_gate : NULL, D, D, D, 1, 0);
    MOE__T(c->routing == MOE_ROUTING_SOFT ? g->soft_phi : NULL, (double)R * D, D, D, (double)R, 0);
    MOE__T(c->routing == MOE_ROUTING_SOFT ? g->soft_scale : NULL, 1, 1, 1, 1, 2);
#undef MOE__T
    return n;
}

/* Spans of the weight (written: gradient) tensors a call of this config
   reads (writes), in moe_grads form. experts = 0 leaves out the routed and
   shared expert matrices (a forward that reads them from w.packed).       */
static void moe__tensor_spans(moe__spans *S, const moe_config *c, const moe_grads *g, int experts,
                              int written) {
    moe__tensor t[20];
    moe_grads u = *g;
    int32_t n, k;
    if (!c->router_bias) u.router_bias = NULL;
    if (c->noise != MOE_NOISE_SHAZEER) u.router_noise = NULL;
    if (c->routing == MOE_ROUTING_SOFT) u.router = NULL;
    if (!c->expert_bias) {
        u.gate_bias = u.up_bias = u.down_bias = NULL;
        u.shared_gate_bias = u.shared_up_bias = u.shared_down_bias = NULL;
    }
    if (!experts) {   /* the biases are still read from w */
        u.gate = u.up = u.down = NULL;
        u.shared_gate = u.shared_up = u.shared_down = NULL;
    }
    n = moe__tensors(c, &u, t);
    for (k = 0; k < n; k++) moe__span(S, t[k].p, t[k].n, sizeof(float), written);
}

/* moe_weights seen as a moe_grads (read only: the casts never write). */
static moe_grads moe__weights_as_grads(const moe_weights *w) {
    moe_grads g;
    memset(&g, 0, sizeof g);
    g.router = (float *)w->router; g.router_bias = (float *)w->router_bias;
    g.router_noise = (float *)w->router_noise;
    /* a quantized tensor's float pointer is unused (its blocks: moe__weight_spans) */
    g.gate = w->gate_type ? NULL : (float *)w->gate;
    g.up = w->up_type ? NULL : (float *)w->up;
    g.down = w->down_type ? NULL : (float *)w->down;
    g.gate_bias = (float *)w->gate_bias; g.up_bias = (float *)w->up_bias;
    g.down_bias = (float *)w->down_bias;
    g.shared_gate = w->shared_gate_type ? NULL : (float *)w->shared_gate;
    g.shared_up = w->shared_up_type ? NULL : (float *)w->shared_up;
    g.shared_down = w->shared_down_type ? NULL : (float *)w->shared_down;
    g.shared_gate_bias = (float *)w->shared_gate_bias;
    g.shared_up_bias = (float *)w->shared_up_bias;
    g.shared_down_bias = (float *)w->shared_down_bias;
    g.shared_expert_gate = (float *)w->shared_expert_gate;
    g.soft_phi = (float *)w->soft_phi; g.soft_scale = (float *)w->soft_scale;
    g.gate_up_fused = w->gate_up_fused;
    return g;
}

/* Everything a forward (or moe_pack_weights, experts only) reads of w. */
static void moe__weight_spans(moe__spans *S, const moe_config *c, const moe_weights *w,
                              int experts) {
    const moe_grads g = moe__weights_as_grads(w);
    moe__tensor_spans(S, c, &g, experts, 0);
    {   /* blocks: read with or without a blob */
        const moe__ffn f = moe__routed_ffn(c, w), sh = moe__shared_ffn(c, w);
        const size_t E = (size_t)c->num_experts, shared = c->shared_d_ff > 0;
        moe__span(S, f.gate_q.data, E, f.gate_q.stride, 0);
        if (moe__act_is_glu(c->activation) && !w->gate_up_fused)
            moe__span(S, f.up_q.data, E, f.up_q.stride, 0);
        moe__span(S, f.down_q.data, E, f.down_q.stride, 0);
        moe__span(S, sh.gate_q.data, shared, sh.gate_q.stride, 0);
        moe__span(S, sh.up_q.data, shared, sh.up_q.stride, 0);
        moe__span(S, sh.down_q.data, shared, sh.down_q.stride, 0);
    }
    if (c->selection_bias)
        moe__span(S, w->selection_bias, (size_t)c->num_experts, sizeof(float), 0);
    if (!experts) moe__span(S, w->packed, w->packed_bytes, 1, 0);
    moe__span(S, w->qpacked, w->qpacked_bytes, 1, 0);
}

/* Does the forward read quantized experts, routed or shared? (up only where used) */
static int moe__quantized(const moe_config *c, const moe_weights *w) {
    const int glu = moe__act_is_glu(c->activation), shared = c->shared_d_ff > 0;
    return w->gate_type != MOE_QTYPE_F32 || w->down_type != MOE_QTYPE_F32 ||
           (glu && !w->gate_up_fused && w->up_type != MOE_QTYPE_F32) ||
           (shared && (w->shared_gate_type != MOE_QTYPE_F32 ||
                       w->shared_down_type != MOE_QTYPE_F32 ||
                       (glu && w->shared_up_type != MOE_QTYPE_F32)));
}

/* One expert tensor of rows of `cols` values: its type, the row
   length its blocks allow, and the pointer that type reads (packed: fp32
   tensors are read from w.packed instead). */
static moe_status moe__check_tensor(int32_t type, const float *f32, const void *blocks,
                                    int32_t cols, int packed) {
    const moe__qinfo qi = moe__qblock(type);
    if (qi.block == 0 || cols % qi.block != 0) return MOE_STATUS_BAD_QUANT;
    /* blocks are read beside a blob too (experts with few rows) */
    if (type == MOE_QTYPE_F32 ? !packed && !f32 : !blocks) return MOE_STATUS_MISSING_WEIGHT;
    return MOE_STATUS_OK;
}

/* The routed experts' tensors and biases (moe_forward, moe_pack_weights and
   the expert-parallel owner). packed: the matrices come from w.packed. */
static moe_status moe__check_experts(const moe_config *c, const moe_weights *w, int packed) {
    const int glu = moe__act_is_glu(c->activation);
    moe_status st;
    if ((st = moe__check_tensor(w->gate_type, w->gate, w->gate_q, c->d_model, packed)) ||
        (glu && !w->gate_up_fused &&
         (st = moe__check_tensor(w->up_type, w->up, w->up_q, c->d_model, packed))) ||
        (st = moe__check_tensor(w->down_type, w->down, w->down_q, c->d_ff, packed)))
        return st;
    if (c->expert_bias && (!w->gate_bias || !w->down_bias || (glu && !w->up_bias)))
        return MOE_STATUS_MISSING_WEIGHT;
    return MOE_STATUS_OK;
}

/* Weights the config needs. packed: the forward reads the expert matrices
   from w.packed (SIMD ISA), so w.gate/up/down may be NULL.                 */
static moe_status moe__check_weights(const moe_config *c, const moe_weights *w, int packed) {
    const int glu = moe__act_is_glu(c->activation);
    moe_status st;
    if (c->routing == MOE_ROUTING_SOFT ? !w->soft_phi : !w->router)
        return MOE_STATUS_MISSING_WEIGHT;
    if ((c->router_bias && !w->router_bias) || (c->selection_bias && !w->selection_bias) ||
        (c->noise == MOE_NOISE_SHAZEER && !w->router_noise))
        return MOE_STATUS_MISSING_WEIGHT;
    if ((st = moe__check_experts(c, w, packed)) != MOE_STATUS_OK) return st;
    if (c->shared_d_ff > 0) {
        if ((st = moe__check_tensor(w->shared_gate_type, w->shared_gate, w->shared_gate_q,
                                    c->d_model, packed)) ||
            (glu && (st = moe__check_tensor(w->shared_up_type, w->shared_up, w->shared_up_q,
                                            c->d_model, packed))) ||
            (st = moe__check_tensor(w->shared_down_type, w->shared_down, w->shared_down_q,
                                    c->shared_d_ff, packed)))
            return st;
        if (c->expert_bias &&
            (!w->shared_gate_bias || !w->shared_down_bias || (glu && !w->shared_up_bias)))
            return MOE_STATUS_MISSING_WEIGHT;
        if (c->shared_expert_gated && !w->shared_expert_gate) return MOE_STATUS_MISSING_WEIGHT;
    }
    return MOE_STATUS_OK;
}

/* The info's arrays hold no saved forward's cache (moe_info.cache_*). */
static void moe__unstamp(moe_info *info) {
    info->cache_tokens = 0; info->cache_config = 0; info->cache_check = 0;
}

/* moe_info arrays, in one order shared by moe_info_size and moe_info_bind.
   The training cache is included when cfg.save_for_backward and not
   cfg.recompute.                                                          */
typedef struct moe__info_layout {
    size_t logits, scores, dispatch, expert, weight, dropped, routed, kept;
    size_t hidden, up, out, sh_hidden, sh_up, sh_out;
    size_t total;
} moe__info_layout;

static moe_status moe__info_plan(const moe_config *cfg, int32_t T, moe_config *c,
                                 moe__info_layout *il) {
    size_t t = 0, TR, TS, N = 0, Ts = 0;
    int ok = 1, glu;
    moe__layout lay;
    moe_status st = moe_config_resolve(cfg, c);
    if (st != MOE_STATUS_OK) return st;
    if (T < 0) return MOE_STATUS_BAD_DIMENSION;
    moe__plan_shapes(c, T, &lay);   /* the arrays only: a call's workspace may not fit */
    glu = moe__act_is_glu(c->activation);
    TR = moe__mul((size_t)T, (size_t)lay.R);
    TS = moe__mul((size_t)T, (size_t)lay.S);
    if (c->save_for_backward && !c->recompute) { N = (size_t)lay.N; Ts = (size_t)T; }
    il->logits   = moe__reserve(&t, TR, sizeof(float), &ok);
    il->scores   = moe__reserve(&t, TR, sizeof(float), &ok);
    il->dispatch = moe__reserve(&t, c->routing == MOE_ROUTING_SOFT ? TR : 0, sizeof(float), &ok);
    il->expert   = moe__reserve(&t, TS, sizeof(int32_t), &ok);
    il->weight   = moe__reserve(&t, TS, sizeof(float), &ok);
    il->dropped  = moe__reserve(&t, TS, sizeof(uint8_t), &ok);
    il->routed   = moe__reserve(&t, (size_t)c->num_experts, sizeof(int32_t), &ok);
    il->kept     = moe__reserve(&t, (size_t)c->num_experts, sizeof(int32_t), &ok);
    il->hidden   = moe__reserve(&t, moe__mul(N, (size_t)c->d_ff), sizeof(float), &ok);
    il->up       = moe__reserve(&t, glu ? moe__mul(N, (size_t)c->d_ff) : 0, sizeof(float), &ok);
    il->out      = moe__reserve(&t, moe__mul(N, (size_t)c->d_model), sizeof(float), &ok);
    il->sh_hidden = moe__reserve(&t, moe__mul(Ts, (size_t)c->shared_d_ff), sizeof(float), &ok);
    il->sh_up    = moe__reserve(&t, glu ? moe__mul(Ts, (size_t)c->shared_d_ff) : 0,
                              sizeof(float), &ok);
    il->sh_out   = moe__reserve(&t, c->shared_d_ff ? moe__mul(Ts, (size_t)c->d_model) : 0,
                              sizeof(float), &ok);
    if (!ok || t > (size_t)-1 - MOE__ALIGN) return MOE_STATUS_SIZE_OVERFLOW;
    il->total = t + MOE__ALIGN;
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_info_size(const moe_config *cfg, int32_t num_tokens, size_t *out_bytes) {
    moe_config c;
    moe__info_layout lay;
    moe_status st;
    if (!cfg || !out_bytes) return MOE_STATUS_NULL_ARGUMENT;
    st = moe__info_plan(cfg, num_tokens, &c, &lay);
    if (st == MOE_STATUS_OK) *out_bytes = lay.total;
    return st;
}

MOEDEF moe_status moe_info_bind(const moe_config *cfg, int32_t num_tokens, moe_info *info,
                                void *buffer, size_t bytes) {
    moe_config c;
    moe__info_layout lay;
    unsigned char *b;
    moe_status st;
    int cache, glu;
    if (!cfg || !info || !buffer) return MOE_STATUS_NULL_ARGUMENT;
    st = moe__info_plan(cfg, num_tokens, &c, &lay);
    if (st != MOE_STATUS_OK) return st;
    if (bytes < lay.total) {
        info->workspace_required = lay.total;
        return MOE_STATUS_WORKSPACE_TOO_SMALL;
    }
    b = moe__align_ptr(buffer);
    cache = c.save_for_backward && !c.recompute;
    glu = moe__act_is_glu(c.activation);
    info->logits = MOE__AT(b, lay.logits, float);
    info->scores = MOE__AT(b, lay.scores, float);
    info->dispatch = c.routing == MOE_ROUTING_SOFT ? MOE__AT(b, lay.dispatch, float) : NULL;
    info->expert = MOE__AT(b, lay.expert, int32_t);
    info->weight = MOE__AT(b, lay.weight, float);
    info->dropped = MOE__AT(b, lay.dropped, uint8_t);
    info->expert_routed = MOE__AT(b, lay.routed, int32_t);
    info->expert_kept = MOE__AT(b, lay.kept, int32_t);
    info->cache_hidden = cache ? MOE__AT(b, lay.hidden, float) : NULL;
    info->cache_up = cache && glu ? MOE__AT(b, lay.up, float) : NULL;
    info->cache_out = cache ? MOE__AT(b, lay.out, float) : NULL;
    info->cache_shared_hidden = cache && c.shared_d_ff ? MOE__AT(b, lay.sh_hidden, float) : NULL;
    info->cache_shared_up = cache && c.shared_d_ff && glu ? MOE__AT(b, lay.sh_up, float) : NULL;
    info->cache_shared_out = cache && c.shared_d_ff ? MOE__AT(b, lay.sh_out, float) : NULL;
    moe__unstamp(info);
    return MOE_STATUS_OK;
}

/* Point a router's result arrays and scratch into the aligned workspace. */
static void moe__router_init(moe__router *r, const moe_config *c, const moe__ws *ws, int32_t T,
                             moe_info *res) {
    memset(res, 0, sizeof *res);
    res->scores = ws->scores;
    res->dispatch = c->routing == MOE_ROUTING_SOFT ? ws->dispatch : NULL;
    res->expert = ws->expert;
    res->weight = ws->weight;
    res->dropped = ws->dropped;
    res->expert_routed = ws->routed;
    res->expert_kept = ws->kept;
    memset(r, 0, sizeof *r);
    r->c = c; r->T = T; r->R = ws->R; r->S = ws->S; r->C = ws->C; r->res = res;
    r->key = ws->key;
    r->order = ws->order;
    r->order_tmp = ws->order_tmp;
    r->small_i = ws->small_i;
    r->small_f = ws->small_f;
    r->count = ws->count;
    r->imp = ws->imp;
    r->chunks = ws->route_chunks;
    r->stats = ws->stats;
}

/* Copy a finished routing result to the caller's info: arrays it asked for,
   and every scalar (and no cache stamp: a saving forward adds it).          */
static void moe__info_export(moe_info *dst, const moe_info *src, const float *logits,
                             int32_t T, int32_t R, int32_t S, int32_t E) {
    const size_t TR = (size_t)T * (size_t)R, TS = (size_t)T * (size_t)S;
    if (dst->logits && TR) memcpy(dst->logits, logits, TR * sizeof(float));
    if (dst->scores && TR) memcpy(dst->scores, src->scores, TR * sizeof(float));
    if (dst->dispatch && TR && src->dispatch)
        memcpy(dst->dispatch, src->dispatch, TR * sizeof(float));
    if (dst->expert && TS) memcpy(dst->expert, src->expert, TS * sizeof(int32_t));
    if (dst->weight && TS) memcpy(dst->weight, src->weight, TS * sizeof(float));
    if (dst->dropped && TS) memcpy(dst->dropped, src->dropped, TS);
    if (dst->expert_routed)
        memcpy(dst->expert_routed, src->expert_routed, (size_t)E * sizeof(int32_t));
    if (dst->expert_kept) memcpy(dst->expert_kept, src->expert_kept, (size_t)E * sizeof(int32_t));
    dst->slots = src->slots; dst->capacity = src->capacity;
    dst->dropped_pairs = src->dropped_pairs; dst->dropped_tokens = src->dropped_tokens;
    dst->aux_balance = src->aux_balance; dst->aux_z = src->aux_z;
    dst->aux_importance = src->aux_importance; dst->aux_load = src->aux_load;
    dst->aux_seq = src->aux_seq; dst->aux_total = src->aux_total;
    moe__unstamp(dst);
}

/* A call on T = 0 tokens routes nothing and needs no workspace: info gets
   what moe__route reports for an empty batch (Soft MoE: slots_per_expert slots each). */
static void moe__info_no_tokens(moe_info *info, const moe_config *c) {
    const int32_t per = c->routing == MOE_ROUTING_SOFT ? c->slots_per_expert : 0;
    int32_t e;
    for (e = 0; e < c->num_experts; e++) {
        if (info->expert_routed) info->expert_routed[e] = per;
        if (info->expert_kept) info->expert_kept[e] = per;
    }
    info->slots = moe_routing_slots(c);
    info->capacity = moe__capacity_of(c, 0);
    info->dropped_pairs = info->dropped_tokens = 0;
    info->aux_balance = info->aux_z = info->aux_importance = info->aux_load = 0.0f;
    info->aux_seq = info->aux_total = 0.0f;
    moe__unstamp(info);
}

/* Spans of the info arrays a call writes (forward, route) or reads
   (backward): the routing arrays, the counts, and the N-row training cache
   (cache: 1 when cfg.save_for_backward and not cfg.recompute).           */
static void moe__info_spans(moe__spans *S, const moe_config *c, const moe_info *info, int32_t T,
                            const moe__layout *lay, int counts, int cache, int written) {
    const size_t TR = (size_t)T * (size_t)lay->R, TS = (size_t)T * (size_t)lay->S;
    const size_t N = (size_t)lay->N, F = (size_t)c->d_ff, D = (size_t)c->d_model;
    const size_t Ts = c->shared_d_ff > 0 ? (size_t)T : 0, Fs = (size_t)c->shared_d_ff;
    const int glu = moe__act_is_glu(c->activation);
    moe__span(S, info->logits, TR, sizeof(float), written);
    moe__span(S, info->scores, TR, sizeof(float), written);
    if (c->routing == MOE_ROUTING_SOFT) moe__span(S, info->dispatch, TR, sizeof(float), written);
    moe__span(S, info->expert, TS, sizeof(int32_t), written);
    moe__span(S, info->weight, TS, sizeof(float), written);
    moe__span(S, info->dropped, TS, sizeof(uint8_t), written);
    if (counts) {
        moe__span(S, info->expert_routed, (size_t)c->num_experts, sizeof(int32_t), written);
        moe__span(S, info->expert_kept, (size_t)c->num_experts, sizeof(int32_t), written);
    }
    if (!cache) return;
    moe__span(S, info->cache_hidden, N * F, sizeof(float), written);
    moe__span(S, glu ? info->cache_up : NULL, N * F, sizeof(float), written);
    moe__span(S, info->cache_out, N * D, sizeof(float), written);
    moe__span(S, info->cache_shared_hidden, Ts * Fs, sizeof(float), written);
    moe__span(S, glu ? info->cache_shared_up : NULL, Ts * Fs, sizeof(float), written);
    moe__span(S, info->cache_shared_out, Ts * D, sizeof(float), written);
}

/* The training-cache stamp (moe_info.cache_*). moe__hash is one step of an
   order-dependent 64-bit hash (splitmix64's finaliser): a fingerprint, not
   a random number.                                                        */
static uint64_t moe__hash(uint64_t h, uint64_t v) {
    uint64_t z = (h + 0x9E3779B97F4A7C15ull) ^ v;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static uint64_t moe__hash_bytes(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    uint64_t v;
    size_t i = 0;
    if (p) {
        for (; i + 8 <= n; i += 8) { memcpy(&v, b + i, 8); h = moe__hash(h, v); }
        if (i < n) { v = 0; memcpy(&v, b + i, n - i); h = moe__hash(h, v); }
    }
    return moe__hash(h, p ? (uint64_t)n : ~(uint64_t)0);
}

/* Every resolved config field that shapes a saving forward's routing or
   cache: all but isa, the threads and pool, pack_bf16 (the backward runs
   on the fp32 tensors), router_grad_clip (read by the backward only) and
   save_for_backward (1 in every forward that stamps).                     */
static uint64_t moe__config_key(const moe_config *c) {
    const int64_t i[] = {c->num_experts, c->top_k, c->d_model, c->d_ff, c->activation,
                         c->expert_bias, c->routing, c->score, c->router_bias, c->selection_bias,
                         c->n_group, c->topk_group, c->group_score_top, c->group_mask_zero,
                         c->second_expert, c->normalize, c->normalize_after_drop, c->training,
                         c->noise, c->capacity, c->capacity_formula, c->drop_policy,
                         c->shared_d_ff, c->shared_expert_gated, c->slots_per_expert,
                         c->balance_loss, c->seq_len, c->recompute};
    const float f[] = {c->second_threshold, c->norm_p, c->norm_eps, c->routed_scale,
                       c->noise_epsilon, c->jitter, c->router_noise_std, c->expert_dropout,
                       c->capacity_factor, c->balance_coef, c->z_loss_coef, c->importance_coef,
                       c->load_coef, c->seq_balance_coef};
    uint64_t h = moe__hash_bytes(c->seed, i, sizeof i);
    h = moe__hash_bytes(h, f, sizeof f);
    return h ? h : 1;   /* 0 means "no cache" */
}

MOEDEF uint64_t moe_config_fingerprint(const moe_config *cfg) {
    moe_config c;
    return moe_config_resolve(cfg, &c) == MOE_STATUS_OK ? moe__config_key(&c) : 0;
}

/* Does a forward of fingerprint key serve a backward of c? Its own config,
   or, for a recompute backward, the same config with the cache kept.     */
static int moe__cache_config_ok(const moe_config *c, uint64_t key) {
    moe_config kept = *c;
    kept.recompute = 0;
    return key == moe__config_key(c) || (c->recompute && key == moe__config_key(&kept));
}

/* Checksum of the routing arrays the backward reads (T and the config are
   checked first, so the extents are the ones the forward wrote).          */
static uint64_t moe__routing_check(const moe_config *c, const moe_info *info, int32_t T,
                                   int32_t R, int32_t S) {
    const size_t TR = (size_t)T * (size_t)R, TS = (size_t)T * (size_t)S;
    uint64_t h = moe__hash_bytes(0, info->logits, TR * sizeof(float));
    h = moe__hash_bytes(h, info->scores, TR * sizeof(float));
    if (c->routing == MOE_ROUTING_SOFT)
        return moe__hash_bytes(h, info->dispatch, TR * sizeof(float));
    h = moe__hash_bytes(h, info->expert, TS * sizeof(int32_t));
    h = moe__hash_bytes(h, info->weight, TS * sizeof(float));
    return moe__hash_bytes(h, info->dropped, TS);
}

/* Copy the expert activations of a saving forward into the info cache. */
static void moe__cache_export(moe_info *dst, const moe_config *c, int32_t T,
                              const moe__ws *ws) {
    const size_t rows = (size_t)ws->offsets[c->num_experts];
    const size_t F = (size_t)c->d_ff, D = (size_t)c->d_model, Fs = (size_t)c->shared_d_ff;
    const int glu = moe__act_is_glu(c->activation);
    if (dst->cache_hidden)
        memcpy(dst->cache_hidden, ws->hg, rows * F * sizeof(float));
    if (dst->cache_up && glu)
        memcpy(dst->cache_up, ws->hu, rows * F * sizeof(float));
    if (dst->cache_out) memcpy(dst->cache_out, ws->out, rows * D * sizeof(float));
    if (!Fs) return;
    if (dst->cache_shared_hidden)
        memcpy(dst->cache_shared_hidden, ws->sh_g,
               (size_t)T * Fs * sizeof(float));
    if (dst->cache_shared_up && glu)
        memcpy(dst->cache_shared_up, ws->sh_u, (size_t)T * Fs * sizeof(float));
    if (dst->cache_shared_out)
        memcpy(dst->cache_shared_out, ws->sh_out, (size_t)T * D * sizeof(float));
}

MOEDEF const char *moe_qtype_name(moe_qtype type) {
    switch (type) {
    case MOE_QTYPE_F32: return "f32";
    case MOE_QTYPE_Q4_0: return "q4_0";
    case MOE_QTYPE_Q8_0: return "q8_0";
    case MOE_QTYPE_Q4_K: return "q4_k";
    case MOE_QTYPE_MXFP4: return "mxfp4";
    default: return NULL;
    }
}

MOEDEF int32_t moe_qtype_block_size(moe_qtype type) { return moe__qblock(type).block; }

MOEDEF size_t moe_qtype_row_bytes(moe_qtype type, int64_t n) {
    const moe__qinfo qi = moe__qblock(type);
    if (qi.block == 0 || n < 0 || n % qi.block != 0) return 0;
    return moe__mul((size_t)(n / qi.block), qi.bytes);   /* SIZE_MAX: does not fit */
}

/* The checks moe_quantize and moe_dequantize share; *bytes: of the blocks. */
static moe_status moe__quant_args(moe_qtype type, int64_t rows, int64_t n, const void *a,
                                  const void *b, size_t have, size_t *bytes) {
    const moe__qinfo qi = moe__qblock(type);
    size_t row;
    if (!a || !b) return MOE_STATUS_NULL_ARGUMENT;
    if (rows < 0 || n < 0) return MOE_STATUS_BAD_DIMENSION;
    if (qi.block == 0 || n % qi.block != 0) return MOE_STATUS_BAD_QUANT;
    row = moe_qtype_row_bytes(type, n);
    *bytes = moe__mul((size_t)rows, row);
    if (row == (size_t)-1 || *bytes == (size_t)-1 ||
        moe__mul((size_t)rows, moe__mul((size_t)n, sizeof(float))) == (size_t)-1)
        return MOE_STATUS_SIZE_OVERFLOW;
    if (have < *bytes) return MOE_STATUS_BAD_QUANT;
    {
        moe__spans sp;
        sp.n = 0;
        moe__span(&sp, a, (size_t)rows * (size_t)n, sizeof(float), 1);
        moe__span(&sp, b, *bytes, 1, 1);
        if (moe__spans_overlap(&sp)) return MOE_STATUS_ALIASING;
    }
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_quantize(moe_qtype type, const float *x, int64_t rows, int64_t n,
                               void *dst, size_t dst_bytes) {
    const moe__qinfo qi = moe__qblock(type);
    size_t bytes, i, count;
    moe_status st = moe__quant_args(type, rows, n, x, dst, dst_bytes, &bytes);
    if (st != MOE_STATUS_OK) return st;
    count = (size_t)rows * (size_t)n;
    for (i = 0; i < count; i++) if (!moe__isfinite(x[i])) return MOE_STATUS_NONFINITE;
    if (type == MOE_QTYPE_F32) { if (count) memcpy(dst, x, bytes); return MOE_STATUS_OK; }
    for (i = 0; i < count / (size_t)qi.block; i++)
        moe__quant_block(type, x + i * (size_t)qi.block, (unsigned char *)dst + i * qi.bytes);
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_dequantize(moe_qtype type, const void *src, size_t src_bytes,
                                 int64_t rows, int64_t n, float *y) {
    const moe__qinfo qi = moe__qblock(type);
    size_t bytes, i, count;
    moe_status st = moe__quant_args(type, rows, n, y, src, src_bytes, &bytes);
    if (st != MOE_STATUS_OK) return st;
    count = (size_t)rows * (size_t)n;
    if (type == MOE_QTYPE_F32) { if (count) memcpy(y, src, bytes); return MOE_STATUS_OK; }
    for (i = 0; i < count / (size_t)qi.block; i++)
        moe__dequant_block(type, (const unsigned char *)src + i * qi.bytes,
                           y + i * (size_t)qi.block);
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_pack_size(const moe_config *cfg, size_t *out_bytes) {
    moe_config c;
    moe__pack_layout pk;
    moe_status st;
    if (!cfg || !out_bytes) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_config_resolve(cfg, &c)) != MOE_STATUS_OK) return st;
    if ((st = moe__pack_plan(&c, &pk)) != MOE_STATUS_OK) return st;
    *out_bytes = pk.bytes;
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_pack_weights(const moe_config *cfg, const moe_weights *w,
                                   void *packed, size_t bytes) {
    moe_config c;
    moe__pack_layout pk;
    moe__pack_header h;
    moe_status st;
    moe__ffn f[2];
    int32_t set, e;
    if (!cfg || !w || !packed) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_config_resolve(cfg, &c)) != MOE_STATUS_OK) return st;
    if (c.isa == MOE_ISA_REFERENCE) return MOE_STATUS_UNSUPPORTED;   /* no forward reads panels */
    if ((st = moe__check_weights(&c, w, 0)) != MOE_STATUS_OK) return st;
    if ((st = moe__pack_plan(&c, &pk)) != MOE_STATUS_OK) return st;
    if (bytes < pk.bytes) return MOE_STATUS_WORKSPACE_TOO_SMALL;
    if ((uintptr_t)packed % sizeof(float) != 0) return MOE_STATUS_BAD_PACKED;
    {
        moe__spans sp;
        sp.n = 0;
        moe__span(&sp, packed, pk.bytes, 1, 1);
        moe__weight_spans(&sp, &c, w, 1);
        if (moe__spans_overlap(&sp)) return MOE_STATUS_ALIASING;
    }
    f[0] = moe__routed_ffn(&c, w);
    f[1] = moe__shared_ffn(&c, w);
    for (set = 0; set < (c.shared_d_ff > 0 ? 2 : 1); set++) {
        moe__pack_job J;
        J.f = &f[set];
        J.g = set ? &pk.shared : &pk.routed;
        J.glu = moe__act_is_glu(c.activation);
        J.bf16 = c.pack_bf16 != 0;
        for (e = 0; e < (set ? 1 : c.num_experts); e++) {
            J.e = e;
            J.dst = (unsigned char *)packed +
                    (set ? pk.shared_off : pk.experts + (size_t)e * pk.expert_stride);
            moe__parallel_for(&c, J.g->p1 + J.g->p2, moe__pack_task, &J,
                              (double)(J.g->w13 + J.g->w2));
        }
    }
    memset(&h, 0, sizeof h);
    memcpy(h.magic, "moe.pk2", 8);
    h.vl = MOE__VL; h.num_experts = (uint32_t)c.num_experts; h.d_model = (uint32_t)c.d_model;
    h.d_ff = (uint32_t)c.d_ff; h.shared_d_ff = (uint32_t)c.shared_d_ff;
    h.glu = (uint32_t)moe__act_is_glu(c.activation); h.bf16 = (uint32_t)(c.pack_bf16 != 0);
    h.bytes = pk.bytes;
    memset(packed, 0, pk.experts);   /* the header's 64 bytes: no unwritten padding */
    memcpy(packed, &h, sizeof h);
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_qpack_size(const moe_config *cfg, const moe_weights *w,
                                 size_t *out_bytes) {
    moe_config c;
    moe__qp_plan p;
    moe_status st;
    if (!cfg || !w || !out_bytes) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_config_resolve(cfg, &c)) != MOE_STATUS_OK) return st;
    if ((st = moe__check_weights(&c, w, 0)) != MOE_STATUS_OK) return st;
    if ((st = moe__qpack_plan(&c, w, &p)) != MOE_STATUS_OK) return st;
    *out_bytes = p.bytes;
    return MOE_STATUS_OK;
}

/* One task: one group of 16 rows of one matrix of one expert. */
typedef struct moe__qpack_job {
    const moe__qmat *m;
    size_t rows, cols, groups, per;
    unsigned char *dst;
} moe__qpack_job;
static void moe__qpack_task(void *arg, int32_t task) {
    const moe__qpack_job *J = (const moe__qpack_job *)arg;
    const size_t e = (size_t)task / J->groups, g = (size_t)task % J->groups;
    const size_t gb = moe__qp_group_bytes(J->m->type, J->cols);
    moe__qp_pack_group(J->m, e, g * MOE__QP_ROWS, J->rows, J->cols, J->dst + e * J->per + g * gb);
}

MOEDEF moe_status moe_qpack_weights(const moe_config *cfg, const moe_weights *w,
                                    void *qpacked, size_t bytes) {
    moe_config c;
    moe__qp_plan p;
    moe__qp_header h;
    moe_status st;
    moe__ffn f, sh;
    const moe__qmat *m[6];
    size_t rows[6], cols[6], count[6];
    int i;
    if (!cfg || !w || !qpacked) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_config_resolve(cfg, &c)) != MOE_STATUS_OK) return st;
    if ((st = moe__check_weights(&c, w, 0)) != MOE_STATUS_OK) return st;
    if ((st = moe__qpack_plan(&c, w, &p)) != MOE_STATUS_OK) return st;
    if (bytes < p.bytes) return MOE_STATUS_WORKSPACE_TOO_SMALL;
    {
        moe__spans sp;
        moe_weights wr = *w;
        sp.n = 0;
        wr.qpacked = NULL;                        /* the blob being written is no input */
        moe__span(&sp, qpacked, p.bytes, 1, 1);
        moe__weight_spans(&sp, &c, &wr, 1);
        if (moe__spans_overlap(&sp)) return MOE_STATUS_ALIASING;
    }
    f = moe__routed_ffn(&c, w);
    sh = moe__shared_ffn(&c, w);
    moe__qp_sets(&c, &f, &sh, m, rows, cols, count);
    for (i = 0; i < 6; i++) {
        moe__qpack_job J;
        if (!p.per[i]) continue;
        J.m = m[i]; J.rows = rows[i]; J.cols = cols[i]; J.per = p.per[i];
        J.groups = (rows[i] + MOE__QP_ROWS - 1) / MOE__QP_ROWS;
        J.dst = (unsigned char *)qpacked + p.off[i];
        moe__parallel_for(&c, (int32_t)(count[i] * J.groups), moe__qpack_task, &J,
                          (double)count[i] * (double)p.per[i]);
    }
    moe__qp_header_of(&c, w, &p, &h);
    memset(qpacked, 0, 64);
    memcpy(qpacked, &h, sizeof h);
    return MOE_STATUS_OK;
}

/* The three workspace size queries: resolve, check T, lay out, report. */
static moe_status moe__workspace_size(const moe_config *cfg, int32_t T, int mode,
                                      size_t *out_bytes) {
    moe_config c;
    moe__layout lay;
    moe_status st;
    if (!cfg || !out_bytes) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_config_resolve(cfg, &c)) != MOE_STATUS_OK) return st;
    if (T < 0) return MOE_STATUS_BAD_DIMENSION;
    if ((st = moe__plan(&c, T, mode, &lay)) != MOE_STATUS_OK) return st;
    *out_bytes = lay.total;
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_route_workspace_size(const moe_config *cfg, int32_t num_tokens,
                                           size_t *out_bytes) {
    return moe__workspace_size(cfg, num_tokens, MOE__PLAN_ROUTE, out_bytes);
}

MOEDEF moe_status moe_route(const moe_config *cfg, const moe_weights *w,
                            const float *logits, const float *noise_logits,
                            int32_t num_tokens, moe_info *info,
                            void *workspace, size_t workspace_bytes) {
    moe_config c;
    moe__layout lay;
    moe__ws ws;
    moe__router r;
    moe_info res;
    moe_status st;
    const int32_t T = num_tokens;
    if (!cfg || !info) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_config_resolve(cfg, &c)) != MOE_STATUS_OK) return st;
    if (T < 0) return MOE_STATUS_BAD_DIMENSION;
    if (T > 0 && (!logits || (c.noise == MOE_NOISE_SHAZEER && c.training && !noise_logits)))
        return MOE_STATUS_NULL_ARGUMENT;
    if (c.selection_bias && (!w || !w->selection_bias)) return MOE_STATUS_MISSING_WEIGHT;
    if ((st = moe__plan(&c, T, MOE__PLAN_ROUTE, &lay)) != MOE_STATUS_OK) return st;
    {
        moe__spans sp;
        sp.n = 0;
        moe__span(&sp, logits, (size_t)T * (size_t)lay.R, sizeof(float), 0);
        if (c.noise == MOE_NOISE_SHAZEER)
            moe__span(&sp, noise_logits, (size_t)T * (size_t)c.num_experts, sizeof(float), 0);
        if (c.selection_bias)
            moe__span(&sp, w->selection_bias, (size_t)c.num_experts, sizeof(float), 0);
        moe__info_spans(&sp, &c, info, T, &lay, 1, 0, 1);
        moe__span(&sp, workspace, workspace_bytes, 1, 1);
        if (moe__spans_overlap(&sp)) return MOE_STATUS_ALIASING;
    }
    if (T == 0) { moe__info_no_tokens(info, &c); return MOE_STATUS_OK; }
    if (!workspace) return MOE_STATUS_NULL_ARGUMENT;
    if (workspace_bytes < lay.total) {
        info->workspace_required = lay.total;
        return MOE_STATUS_WORKSPACE_TOO_SMALL;
    }
    ws = moe__ws_bind(&lay, moe__align_ptr(workspace));
    moe__router_init(&r, &c, &ws, T, &res);
    r.logits = logits;
    r.noise_logits = c.noise == MOE_NOISE_SHAZEER ? noise_logits : NULL;
    r.sel_bias = c.selection_bias ? w->selection_bias : NULL;
    if ((st = moe__route(&r)) != MOE_STATUS_OK) return st;
    moe__info_export(info, &res, logits, T, lay.R, lay.S, c.num_experts);
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_forward_workspace_size(const moe_config *cfg, int32_t num_tokens,
                                             size_t *out_bytes) {
    return moe__workspace_size(cfg, num_tokens, MOE__PLAN_FORWARD, out_bytes);
}

/* Stage 4: the grouped expert FFN over the dispatched rows and the shared
   expert's FFN on every token, on the kernel table's experts entry (from
   w.packed where the ISA reads panels).                                   */
static void moe__experts_ffn(const moe_config *c, const moe_weights *w, const float *x, int32_t T,
                             const moe__ws *ws) {
    const int glu = moe__act_is_glu(c->activation);
    const int64_t sh_off[2] = {0, (int64_t)T};
    moe__ffn ffn = moe__routed_ffn_train(c, w, ws->row_pair), sh = moe__shared_ffn(c, w);
    const moe__kernels *k = moe__kernels_of(c);
    const unsigned char *packed = moe__reads_packed(c, w) ? (const unsigned char *)w->packed : NULL;
    moe__pack_layout pk;
    memset(&pk, 0, sizeof pk);
    if (moe__reads_qpacked(c, w)) moe__ffn_attach_qpack(&ffn, &sh, c, w);
    if (packed) moe__pack_plan(c, &pk);
    k->experts(c, &ffn, packed ? packed + pk.experts : NULL, c->num_experts, ws->offsets, ws->xg,
               ws->hg, glu ? ws->hu : NULL, ws->ha, ws->out, ws->tiles, ws);
    if (c->shared_d_ff > 0)
        k->experts(c, &sh, packed ? packed + pk.shared_off : NULL, 1, sh_off, x, ws->sh_g,
                   glu ? ws->sh_u : NULL, ws->sh_a, ws->sh_out, ws->sh_tiles, ws);
}

/* Stages 3-4, shared by the forward and the backward's recompute: expert
   inputs (moe__expert_inputs), then moe__experts_ffn.                    */
static void moe__experts_stage(const moe_config *c, const moe_weights *w, const float *x, int32_t T,
                               const int32_t *expert, const uint8_t *dropped, const float *dispatch,
                               const moe__ws *ws) {
    moe__expert_inputs(c, x, T, expert, dropped, dispatch, ws);
    moe__experts_ffn(c, w, x, T, ws);
}

/* The forward's routing (res) into the caller's info, the training cache,
   and the stamp that moe_backward checks. */
static void moe__info_publish(moe_info *info, const moe_config *c, const moe_info *res,
                              int32_t T, const moe__ws *ws) {
    moe__info_export(info, res, ws->logits, T, ws->R, ws->S, c->num_experts);
    if (c->save_for_backward && !c->recompute) moe__cache_export(info, c, T, ws);
    if (c->save_for_backward) {
        info->cache_tokens = T;
        info->cache_config = moe__config_key(c);
        info->cache_check = moe__routing_check(c, info, T, ws->R, ws->S);
    }
}

MOEDEF moe_status moe_forward(const moe_config *cfg, const moe_weights *w,
                              const float *x, int32_t num_tokens, float *y,
                              moe_info *info, void *workspace, size_t workspace_bytes) {
    moe_config c;
    moe__layout lay;
    moe__ws ws;
    moe__router r;
    moe_info res;
    moe_status st;
    const int32_t T = num_tokens;
    int32_t t;
    int forward_packed;
    if (!cfg || !w) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_config_resolve(cfg, &c)) != MOE_STATUS_OK) return st;
    if (T < 0) return MOE_STATUS_BAD_DIMENSION;
    if (T > 0 && (!x || !y)) return MOE_STATUS_NULL_ARGUMENT;
    forward_packed = moe__reads_packed(&c, w);
    if (forward_packed && !moe__pack_check(&c, w)) return MOE_STATUS_BAD_PACKED;
    if ((st = moe__check_weights(&c, w, forward_packed)) != MOE_STATUS_OK) return st;
    if (w->qpacked && !moe__qpack_check(&c, w)) return MOE_STATUS_BAD_PACKED;
    if ((st = moe__plan(&c, T, MOE__PLAN_FORWARD, &lay)) != MOE_STATUS_OK) return st;
    {   /* y may be x; nothing else written may overlap anything */
        moe__spans sp;
        const size_t TD = (size_t)T * (size_t)c.d_model;
        sp.n = 0;
        moe__span(&sp, y, TD, sizeof(float), 1);
        if (x != y) moe__span(&sp, x, TD, sizeof(float), 0);
        moe__weight_spans(&sp, &c, w, !forward_packed);
        if (info)
            moe__info_spans(&sp, &c, info, T, &lay, 1, c.save_for_backward && !c.recompute, 1);
        moe__span(&sp, workspace, workspace_bytes, 1, 1);
        if (moe__spans_overlap(&sp)) return MOE_STATUS_ALIASING;
    }
    if (T == 0) { if (info) moe__info_no_tokens(info, &c); return MOE_STATUS_OK; }
    if (!workspace) return MOE_STATUS_NULL_ARGUMENT;
    if (workspace_bytes < lay.total) {
        if (info) info->workspace_required = lay.total;
        return MOE_STATUS_WORKSPACE_TOO_SMALL;
    }
    ws = moe__ws_bind(&lay, moe__align_ptr(workspace));

    /* 1. router logits, 2. routing (the only step that can refuse the input) */
    moe__router_logits_ref(&c, w, x, T, &ws);
    moe__router_init(&r, &c, &ws, T, &res);
    r.logits = ws.logits;
    r.noise_logits = c.noise == MOE_NOISE_SHAZEER && c.training
                     ? ws.noise_logits : NULL;
    r.sel_bias = c.selection_bias ? w->selection_bias : NULL;
    if ((st = moe__route(&r)) != MOE_STATUS_OK) return st;

    /* 3-4. expert inputs and the grouped expert FFN (and the shared expert);
       the shared gates too: the last reads of x, since y may be x */
    moe__experts_stage(&c, w, x, T, res.expert, res.dropped, res.dispatch, &ws);
    if (c.shared_expert_gated)
        for (t = 0; t < T; t++)
            ws.sh_gamma[t] = moe__shared_expert_gate_of(&c, w, x + (size_t)t * c.d_model);

    /* 5. combine in fixed slot order (Soft MoE: Y = C . Y~) */
    if (c.routing == MOE_ROUTING_SOFT)
        moe__soft_combine_ref(y, res.scores, ws.out, T, lay.R, c.d_model);
    else
        moe__combine(&c, y, ws.out, res.weight,
                     ws.pair_row, T, lay.S, c.d_model);
    /* 6. shared expert on every token, optionally sigmoid-gated (Qwen2) */
    if (c.shared_d_ff > 0)
        moe__add_shared(y, ws.sh_out, c.shared_expert_gated ? ws.sh_gamma : NULL, T, c.d_model);
    if (info) moe__info_publish(info, &c, &res, T, &ws);
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_forward_alloc(const moe_config *cfg, const moe_weights *w,
                                    const float *x, int32_t num_tokens, float *y,
                                    moe_info *info) {
    size_t bytes;
    void *ws;
    moe_status st = moe_forward_workspace_size(cfg, num_tokens, &bytes);
    if (st != MOE_STATUS_OK) return st;
    ws = MOE_MALLOC(NULL, bytes);
    if (!ws) return MOE_STATUS_OUT_OF_MEMORY;
    st = moe_forward(cfg, w, x, num_tokens, y, info, ws, bytes);
    MOE_FREE(NULL, ws);
    return st;
}

// ----------------------------------------------------------------------------
// The backward driver: moe__backward mirrors moe_forward, one stage call per
// forward stage in reverse (docs/ROUTING.md, "Backward"); parameter gradients
// accumulate, dx is overwritten.

static moe__ffn_grad moe__ffn_grad_make(const moe__ffn *f, float *gate, float *up, float *down,
                                        float *gb, float *ub, float *db) {
    moe__ffn_grad g;
    const int expert_bias = f->gate_bias != NULL;
    g.gate = gate; g.down = down;
    g.up = up;
    g.gate_bias = expert_bias ? gb : NULL;
    g.up_bias = expert_bias ? ub : NULL;
    g.down_bias = expert_bias ? db : NULL;
    return g;
}

MOEDEF moe_status moe_backward_workspace_size(const moe_config *cfg, int32_t num_tokens,
                                              size_t *out_bytes) {
    return moe__workspace_size(cfg, num_tokens, MOE__PLAN_BACKWARD, out_bytes);
}

/* Does info hold what moe_backward reads? */
static moe_status moe__check_cache(const moe_config *c, const moe_info *info) {
    const int glu = moe__act_is_glu(c->activation);
    if (info->cache_config == 0) return MOE_STATUS_MISSING_CACHE;   /* no saving forward */
    if (!info->logits || !info->scores) return MOE_STATUS_MISSING_CACHE;
    if (c->routing == MOE_ROUTING_SOFT ? !info->dispatch
                                       : (!info->expert || !info->weight || !info->dropped))
        return MOE_STATUS_MISSING_CACHE;
    if (c->recompute) return MOE_STATUS_OK;
    if (!info->cache_hidden || !info->cache_out || (glu && !info->cache_up))
        return MOE_STATUS_MISSING_CACHE;
    if (c->shared_d_ff > 0 && (!info->cache_shared_hidden || !info->cache_shared_out ||
                               (glu && !info->cache_shared_up)))
        return MOE_STATUS_MISSING_CACHE;
    return MOE_STATUS_OK;
}

/* The backward trusts info's routing to index its buffers: check it is one a
   forward of this config could have produced (indices in range, known drop
   flags, no more processed rows than the workspace holds).                */
static moe_status moe__check_routing(const moe_config *c, const moe_info *info, int32_t T,
                                     const moe__layout *lay) {
    size_t p, n = (size_t)T * (size_t)lay->S;
    int64_t rows = 0;
    if (c->routing == MOE_ROUTING_SOFT) return MOE_STATUS_OK;
    for (p = 0; p < n; p++) {
        const int32_t e = info->expert[p];
        if (e < -1 || e >= c->num_experts || info->dropped[p] > MOE__REJECTED)
            return MOE_STATUS_BAD_CACHE;
        if (e < 0 && c->routing != MOE_ROUTING_EXPERT_CHOICE) return MOE_STATUS_BAD_CACHE;
        rows += e >= 0 && info->dropped[p] == MOE__KEPT;
    }
    return rows > lay->N ? MOE_STATUS_BAD_CACHE : MOE_STATUS_OK;
}

/* The checks of moe_backward that need the plan: the cache stamp and routing,
   overlaps, the workspace. Writes the plan to *lay. */
static moe_status moe__backward_check(const moe_config *c, const moe_weights *w, const float *x,
                                      int32_t T, const moe_info *info, const float *dy,
                                      const float *dx_out, const moe_grads *gr,
                                      const void *workspace, size_t workspace_bytes,
                                      moe__layout *lay) {
    moe_status st;
    moe__spans sp;
    moe_grads gu;
    const size_t TD = (size_t)T * (size_t)c->d_model;
    if ((st = moe__check_cache(c, info)) != MOE_STATUS_OK) return st;
    if ((st = moe__plan(c, T, MOE__PLAN_BACKWARD, lay)) != MOE_STATUS_OK) return st;
    /* the stamp before any array is read: extents of another T or config
       would be read out of bounds */
    if (info->cache_tokens != T || !moe__cache_config_ok(c, info->cache_config) ||
        info->cache_check != moe__routing_check(c, info, T, lay->R, lay->S))
        return MOE_STATUS_BAD_CACHE;
    if ((st = moe__check_routing(c, info, T, lay)) != MOE_STATUS_OK) return st;
    /* dx may be x or dy (it is written last); nothing else may overlap */
    sp.n = 0;
    moe__span(&sp, x, TD, sizeof(float), 0);
    moe__span(&sp, dy, TD, sizeof(float), 0);
    if (dx_out != x && dx_out != dy) moe__span(&sp, dx_out, TD, sizeof(float), 1);
    moe__weight_spans(&sp, c, w, 1);
    if (c->recompute && moe__reads_packed(c, w))
        moe__span(&sp, w->packed, w->packed_bytes, 1, 0);
    gu = *gr; gu.gate_up_fused = w->gate_up_fused;   /* the layout the backward writes */
    moe__tensor_spans(&sp, c, &gu, 1, 1);
    moe__info_spans(&sp, c, info, T, lay, 0, !c->recompute, 0);
    moe__span(&sp, workspace, workspace_bytes, 1, 1);
    if (moe__spans_overlap(&sp)) return MOE_STATUS_ALIASING;
    if (!workspace) return MOE_STATUS_NULL_ARGUMENT;
    if (workspace_bytes < lay->total) return MOE_STATUS_WORKSPACE_TOO_SMALL;
    return MOE_STATUS_OK;
}

/* What the backward's stages share: the call, its plan and workspace, the
   expert activations (recomputed or cached) and dx, which the stages add to
   in the workspace (copied out last: dx may be x or dy). */
typedef struct moe__bw_call {
    const moe_config *c;
    const moe_weights *w;
    const moe_grads *gr;
    const moe_info *info;
    const moe__ws *ws;                /* the workspace's arrays               */
    const float *x, *dy;
    int32_t T;
    float *dx;                        /* [T][D] in the workspace              */
    const float *hg, *hu, *out;       /* routed experts: pre-activations, out */
    float *ha;                        /* activations (rebuilt from hg, hu)    */
    const float *sh_g, *sh_u, *sh_out;   /* the shared expert's              */
    float *sh_a;
} moe__bw_call;

/* The expert activations: rerun the forward's FFNs (cfg.recompute), or the
   saving forward's cache, with the rows gathered again either way. */
static void moe__bw_activations(moe__bw_call *B) {
    const moe_config *c = B->c;
    const moe__ws *ws = B->ws;
    const moe_info *info = B->info;
    const int glu = moe__act_is_glu(c->activation);
    if (c->recompute) {
        moe__experts_stage(c, B->w, B->x, B->T, info->expert, info->dropped, info->dispatch, ws);
        B->hg = ws->hg; B->hu = glu ? ws->hu : NULL;
        B->out = ws->out;
        if (c->shared_d_ff) {
            B->sh_g = ws->sh_g;
            B->sh_u = glu ? ws->sh_u : NULL;
            B->sh_out = ws->sh_out;
        }
    } else {
        moe__expert_inputs(c, B->x, B->T, info->expert, info->dropped, info->dispatch, ws);
        B->hg = info->cache_hidden; B->hu = glu ? info->cache_up : NULL;
        B->out = info->cache_out;
        if (c->shared_d_ff) {
            B->sh_g = info->cache_shared_hidden;
            B->sh_u = glu ? info->cache_shared_up : NULL;
            B->sh_out = info->cache_shared_out;
        }
    }
    B->ha = ws->ha;   /* (from the cache: rebuilt by the expert backward) */
    if (c->shared_d_ff) B->sh_a = ws->sh_a;
}

/* 1. combine backward: gw[t][j] = <dy_t, out[row]>, dout[row] = w dy_t
   (Soft MoE: dC[t][s] = <dy_t, out_s>, dY~_s = sum_t C[t][s] dy_t). */
static void moe__bw_combine(const moe__bw_call *B) {
    const moe_config *c = B->c;
    const moe__ws *ws = B->ws;
    const int32_t T = B->T, D = c->d_model, R = ws->R;
    const float *dy = B->dy, *out = B->out;
    float *dout = ws->dout;
    int32_t t, s, d;
    if (c->routing == MOE_ROUTING_SOFT) {
        float *dscore = ws->dscore;
        memset(dout, 0, (size_t)R * D * sizeof(float));
        for (t = 0; t < T; t++)
            for (s = 0; s < R; s++) {
                const float cw = B->info->scores[(size_t)t * R + s];
                float acc = 0.0f;
                for (d = 0; d < D; d++) {
                    dout[(size_t)s * D + d] += cw * dy[(size_t)t * D + d];
                    acc += dy[(size_t)t * D + d] * out[(size_t)s * D + d];
                }
                dscore[(size_t)t * R + s] = acc;       /* dC */
            }
    } else {
        moe__bw_rows_job J;
        memset(&J, 0, sizeof J);
        J.dy = dy; J.out = out; J.weight = B->info->weight; J.gw = ws->gw;
        J.dout = dout; J.pair_row = ws->pair_row; J.S = ws->S; J.D = D;
        J.k = moe__kernels_of(c);
        moe__parallel_rows(c, T, 32, moe__bw_combine_rows, &J, 2.0 * (double)T * ws->S * D);
    }
}

/* 3. back to tokens: dx_t = sum_j dxg[row(t, j)] in slot order (Soft MoE:
   dx_t = sum_s D[t][s] dX~_s, and dD[t][s] = <dX~_s, x_t>). */
static void moe__bw_gather(const moe__bw_call *B) {
    const moe_config *c = B->c;
    const moe__ws *ws = B->ws;
    const int32_t T = B->T, D = c->d_model, R = ws->R;
    const float *dxg = ws->dxg, *x = B->x;
    float *dx = B->dx;
    int32_t t, s, d;
    memset(dx, 0, (size_t)T * D * sizeof(float));
    if (c->routing == MOE_ROUTING_SOFT) {
        float *dD = ws->d_dispatch;
        for (t = 0; t < T; t++)
            for (s = 0; s < R; s++) {
                const float dw = B->info->dispatch[(size_t)t * R + s];
                float acc = 0.0f;
                for (d = 0; d < D; d++) {
                    acc += dxg[(size_t)s * D + d] * x[(size_t)t * D + d];
                    dx[(size_t)t * D + d] += dw * dxg[(size_t)s * D + d];
                }
                dD[(size_t)t * R + s] = acc;
            }
    } else {
        moe__bw_rows_job J;
        memset(&J, 0, sizeof J);
        J.dxg = dxg; J.dx = dx; J.pair_row = ws->pair_row; J.S = ws->S;
        J.D = D; J.k = moe__kernels_of(c);
        moe__parallel_rows(c, T, 32, moe__bw_gather_rows, &J, (double)T * ws->S * D);
    }
}

/* 4. shared expert: y += gamma F(x), so dF = gamma dy and dgamma = <dy, F>;
   with its sigmoid gate gamma = sigmoid(x . w_sg) that reaches w_sg and dx. */
static void moe__bw_shared(const moe__bw_call *B) {
    const moe_config *c = B->c;
    const moe_weights *w = B->w;
    const moe_grads *gr = B->gr;
    const moe__ws *ws = B->ws;
    const int32_t T = B->T, D = c->d_model;
    const int64_t sh_off[2] = {0, (int64_t)T};
    float *sh_dout = ws->sh_dout, *sh_dx = ws->sh_dx;
    float *dx = B->dx;
    moe__ffn sh = moe__shared_ffn(c, w);
    moe__ffn_grad sg = moe__ffn_grad_make(&sh, gr->shared_gate, gr->shared_up, gr->shared_down,
                                          gr->shared_gate_bias, gr->shared_up_bias,
                                          gr->shared_down_bias);
    int32_t t, d;
    for (t = 0; t < T; t++) {
        const float *xt = B->x + (size_t)t * D, *dyt = B->dy + (size_t)t * D;
        const float gamma = moe__shared_expert_gate_of(c, w, xt);
        float dgamma = 0.0f;
        for (d = 0; d < D; d++) {
            sh_dout[(size_t)t * D + d] = gamma * dyt[d];
            dgamma += dyt[d] * B->sh_out[(size_t)t * D + d];
        }
        if (c->shared_expert_gated) {   /* gamma = sigmoid(x . w_sg) */
            const float dzg = dgamma * gamma * (1.0f - gamma);
            for (d = 0; d < D; d++) {
                if (gr->shared_expert_gate) gr->shared_expert_gate[d] += dzg * xt[d];
                dx[(size_t)t * D + d] += dzg * w->shared_expert_gate[d];
            }
        }
    }
    moe__kernels_of(c)->experts_backward(
        c, &sh, &sg, 1, sh_off, B->x, B->sh_g, B->sh_u, B->sh_a, !c->recompute, sh_dout,
        ws->sh_da,
        moe__act_is_glu(c->activation) ? ws->sh_du : NULL, sh_dx,
        ws->gemm_pack);
    for (t = 0; t < T; t++)
        for (d = 0; d < D; d++) dx[(size_t)t * D + d] += sh_dx[(size_t)t * D + d];
}

/* 5. token-choice and expert-choice router: gate weights -> scores ->
   logits (+ aux losses, noise) -> the router weights and dx. */
static void moe__bw_router(const moe__bw_call *B, const float *noise_samples) {
    const moe_config *c = B->c;
    const moe_weights *w = B->w;
    const moe__ws *ws = B->ws;
    const int32_t T = B->T, E = c->num_experts, D = c->d_model;
    const int noisy = c->noise == MOE_NOISE_SHAZEER && c->training;
    const float *xr = B->x;
    float *tmp = ws->tmp_x, *pack = ws->gemm_pack;
    moe__router_bw R;
    size_t i;
    memset(&R, 0, sizeof R);
    R.c = c; R.info = B->info; R.T = T; R.S = ws->S; R.E = E; R.T_all = T;
    R.K = c->routing == MOE_ROUTING_TOPK ? c->top_k : E;
    R.gw = ws->gw; R.noise_samples = noise_samples;
    moe__router_bw_scratch(&R, ws, E);
    R.dsig = noisy ? ws->dsig : NULL;
    /* the router input the forward saw (x * jitter), built once */
    xr = moe__router_input(c, B->x, (size_t)T * (size_t)D, 0, ws->xr);
    if (noisy) {   /* raw noise logits, by the forward's own GEMM */
        float *noise = ws->noise_logits;
        moe__kernels_of(c)->linear(c, noise, xr, w->router_noise, NULL, T, E, D, ws);
        R.noise = noise;
    }
    moe__router_backward_ref(&R);
    moe__router_gemm_backward(c, T, R.dz, w->router, B->gr->router,
                              c->router_bias ? B->gr->router_bias : NULL, xr, tmp, B->dx, pack, 0);
    if (noisy) {   /* sigma = softplus(r) + eps, r = xr . W_noise^T */
        float *dr = R.dsig;
        for (i = 0; i < (size_t)T * (size_t)E; i++) dr[i] *= moe__sigmoid(R.noise[i]);
        moe__router_gemm_backward(c, T, dr, w->router_noise, B->gr->router_noise, NULL, xr, tmp,
                                  B->dx, pack, 0);
    }
}

/* The backward with an optional noise seam (tests give the N of docs/ROUTING.md, "Noisy top-k"):
   the forward's stages in reverse, each the transpose of its forward. */
static moe_status moe__backward(const moe_config *cfg, const moe_weights *w, const float *x,
                                int32_t T, const moe_info *info, const float *dy, float *dx_out,
                                const moe_grads *gr, void *workspace, size_t workspace_bytes,
                                const float *noise_samples) {
    moe_config c;
    moe__layout lay;
    moe__ws ws;
    moe__bw_call B;
    moe_status st;
    if (!cfg || !w || !info || !gr) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_config_resolve(cfg, &c)) != MOE_STATUS_OK) return st;
    if (T < 0) return MOE_STATUS_BAD_DIMENSION;
    if (T > 0 && (!x || !dy)) return MOE_STATUS_NULL_ARGUMENT;
    if (moe__quantized(&c, w)) return MOE_STATUS_QUANT_UNSUPPORTED;
    if ((st = moe__check_weights(&c, w, 0)) != MOE_STATUS_OK) return st;
    /* recompute reruns the forward's expert FFNs, from w.packed where the
       forward would: the same check as moe_forward's */
    if (c.recompute && moe__reads_packed(&c, w) && !moe__pack_check(&c, w))
        return MOE_STATUS_BAD_PACKED;
    if (T == 0) return MOE_STATUS_OK;   /* nothing to read or write */
    if ((st = moe__backward_check(&c, w, x, T, info, dy, dx_out, gr, workspace, workspace_bytes,
                                  &lay)) != MOE_STATUS_OK)
        return st;
    memset(&B, 0, sizeof B);
    ws = moe__ws_bind(&lay, moe__align_ptr(workspace));
    B.c = &c; B.w = w; B.gr = gr; B.info = info; B.ws = &ws;
    B.x = x; B.dy = dy; B.T = T; B.dx = ws.dx;
    moe__bw_activations(&B);
    moe__bw_combine(&B);                                            /* 1. */
    {   /* 2. grouped expert FFN backward -> weight gradients and dxg rows */
        moe__ffn ffn = moe__routed_ffn_train(&c, w, ws.row_pair);
        moe__ffn_grad fg = moe__ffn_grad_make(&ffn, gr->gate,
                                              w->gate_up_fused && gr->gate
                                                  ? gr->gate + (size_t)c.d_ff * c.d_model
                                                  : gr->up,
                                              gr->down, gr->gate_bias, gr->up_bias, gr->down_bias);
        moe__kernels_of(&c)->experts_backward(
            &c, &ffn, &fg, c.num_experts, ws.offsets, ws.xg,
            B.hg, B.hu, B.ha, !c.recompute, ws.dout, ws.da,
            moe__act_is_glu(c.activation) ? ws.du : NULL,
            ws.dxg, ws.gemm_pack);
    }
    moe__bw_gather(&B);                                             /* 3. */
    if (c.shared_d_ff > 0) moe__bw_shared(&B);                      /* 4. */
    if (c.routing == MOE_ROUTING_SOFT)                              /* 5. */
        moe__soft_router_backward_ref(&c, w, gr, info, x, T, lay.R, ws.dscore,
                                      ws.d_dispatch, ws.dz,
                                      ws.slot_norm,
                                      ws.gamma, B.dx);
    else
        moe__bw_router(&B, noise_samples);
    if (dx_out) memcpy(dx_out, B.dx, (size_t)T * c.d_model * sizeof(float));
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_backward(const moe_config *cfg, const moe_weights *w,
                               const float *x, int32_t num_tokens, const moe_info *info,
                               const float *dy, float *dx, const moe_grads *grads,
                               void *workspace, size_t workspace_bytes) {
    return moe__backward(cfg, w, x, num_tokens, info, dy, dx, grads,
                         workspace, workspace_bytes, NULL);
}

MOEDEF moe_status moe_backward_alloc(const moe_config *cfg, const moe_weights *w,
                                     const float *x, int32_t num_tokens, const moe_info *info,
                                     const float *dy, float *dx, const moe_grads *grads) {
    size_t bytes;
    void *ws;
    moe_status st = moe_backward_workspace_size(cfg, num_tokens, &bytes);
    if (st != MOE_STATUS_OK) return st;
    ws = MOE_MALLOC(NULL, bytes);
    if (!ws) return MOE_STATUS_OUT_OF_MEMORY;
    st = moe_backward(cfg, w, x, num_tokens, info, dy, dx, grads, ws, bytes);
    MOE_FREE(NULL, ws);
    return st;
}

// ----------------------------------------------------------------------------
// Expert parallelism: the plan calls. No transport here: each call fills or
// reads the buffers one exchange step moves. The owner of an expert sees
// every pair routed to it with its global token and slot, so capacity and
// dropping are decided exactly as in one process over all T tokens.

/* Resolve cfg and check the plan; c gets the resolved config. */
static moe_status moe__ep_check(const moe_config *cfg, const moe_ep_plan *p, moe_config *c) {
    moe_status st;
    if (!cfg || !p) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_config_resolve(cfg, c)) != MOE_STATUS_OK) return st;
    if (c->routing != MOE_ROUTING_TOPK || c->noise != MOE_NOISE_NONE || c->shared_d_ff > 0)
        return MOE_STATUS_EP_UNSUPPORTED;
    if (p->num_ranks < 1 || p->rank < 0 || p->rank >= p->num_ranks ||
        c->num_experts % p->num_ranks != 0)
        return MOE_STATUS_BAD_PLAN;
    if (p->num_tokens < 0 || p->token_offset < 0 || p->local_tokens < 0 ||
        p->local_tokens > p->num_tokens - p->token_offset)
        return MOE_STATUS_BAD_PLAN;
    /* several sequences (sequence-wise loss): none may straddle two ranks */
    if (c->seq_len > 0 && c->seq_len < p->num_tokens &&
        (p->token_offset % c->seq_len != 0 ||
         (p->local_tokens % c->seq_len != 0 && p->token_offset + p->local_tokens != p->num_tokens)))
        return MOE_STATUS_BAD_PLAN;
    return MOE_STATUS_OK;
}

/* The source side reads these info arrays; check they exist and hold a
   routing this config can produce.                                        */
static moe_status moe__ep_check_info(const moe_config *c, const moe_info *info, int32_t Tr) {
    size_t p, n = (size_t)Tr * (size_t)c->top_k;
    if (!info->logits || !info->scores || !info->expert || !info->weight || !info->dropped)
        return MOE_STATUS_MISSING_CACHE;
    for (p = 0; p < n; p++)
        if (info->expert[p] < 0 || info->expert[p] >= c->num_experts ||
            info->dropped[p] > MOE__REJECTED)
            return MOE_STATUS_BAD_CACHE;
    return MOE_STATUS_OK;
}

/* Send order: owner rank q = 0..P-1, then (token, slot). pair_row[p] = the
   pair's index in the send buffer, -1 if it is not sent (rejected by random
   routing). One pass per rank over the metadata, so no scratch is needed.
   Returns the number of pairs sent.                                        */
static int64_t moe__ep_send_index(const moe_config *c, const moe_ep_plan *pl, const moe_info *info,
                                  int64_t *pair_row) {
    const size_t n = (size_t)pl->local_tokens * (size_t)c->top_k;
    const int32_t per = c->num_experts / pl->num_ranks;
    int64_t s = 0;
    int32_t q;
    size_t p;
    for (p = 0; p < n; p++) pair_row[p] = -1;
    for (q = 0; q < pl->num_ranks; q++)
        for (p = 0; p < n; p++)
            if (info->dropped[p] != MOE__REJECTED && info->expert[p] / per == q) pair_row[p] = s++;
    return s;
}

/* Source-side workspace: the routing scratch of moe__plan for T_r tokens,
   then logits, router input, the send index and the router backward's pieces. */
/* Pairs a rank sends (those not rejected by random routing): n_send.
   Counted in int32 runs: clang 14 -O3 -mavx512f crashes vectorising a
   size_t count of bytes (as in moe_ep_pack_backward).                    */
static size_t moe__ep_sent(const moe_config *c, const moe_ep_plan *pl, const moe_info *info) {
    const size_t n = (size_t)pl->local_tokens * (size_t)c->top_k;
    size_t p = 0, s = 0;
    while (p < n) {
        const size_t end = n - p > (size_t)INT32_MAX ? p + (size_t)INT32_MAX : n;
        int32_t k = 0;
        for (; p < end; p++) k += info->dropped[p] != MOE__REJECTED;
        s += (size_t)k;
    }
    return s;
}

/* Overlap spans of the EP calls (no in-place form: every output must be
   apart from every other buffer). The source side's routing arrays; the
   router tensors; the owner's expert tensors (weights, or written grads). */
static void moe__ep_info_spans(moe__spans *S, const moe_config *c, const moe_info *info,
                               int32_t Tr, int counts, int written) {
    moe__layout lay;
    memset(&lay, 0, sizeof lay);
    lay.R = c->num_experts; lay.S = c->top_k;
    moe__info_spans(S, c, info, Tr, &lay, counts, 0, written);
}
static void moe__ep_router_spans(moe__spans *S, const moe_config *c, const float *router,
                                 const float *router_bias, const float *selection_bias,
                                 int written) {
    const size_t E = (size_t)c->num_experts;
    moe__span(S, router, E * (size_t)c->d_model, sizeof(float), written);
    if (c->router_bias) moe__span(S, router_bias, E, sizeof(float), written);
    if (c->selection_bias) moe__span(S, selection_bias, E, sizeof(float), written);
}
static void moe__ep_expert_spans(moe__spans *S, const moe_config *cl, const moe_grads *g,
                                 int written) {
    moe_grads u = *g;
    u.router = u.router_bias = u.router_noise = NULL;
    moe__tensor_spans(S, cl, &u, 1, written);
}

static moe_status moe__ep_src_plan(const moe_config *c, const moe_ep_plan *pl, moe__layout *lay) {
    const size_t Tr = (size_t)pl->local_tokens, E = (size_t)c->num_experts, D = (size_t)c->d_model;
    size_t t, TS, TE, TD;
    int ok = 1;
    moe_status st = moe__plan(c, pl->local_tokens, MOE__PLAN_ROUTE, lay);
    if (st != MOE_STATUS_OK) return st;
    t = lay->total - MOE__ALIGN;
    TS = moe__mul(Tr, (size_t)lay->S); TE = moe__mul(Tr, E); TD = moe__mul(Tr, D);
    lay->logits   = moe__reserve(&t, TE, sizeof(float), &ok);
    lay->xr       = moe__reserve(&t, TD, sizeof(float), &ok);
    lay->router_t = moe__reserve(&t, c->isa != MOE_ISA_REFERENCE
                                   ? moe__mul(D, (E + MOE__NR - 1) / MOE__NR * MOE__NR) : 0,
                               sizeof(float), &ok);
    lay->pair_row = moe__reserve(&t, TS, sizeof(int64_t), &ok);
    lay->gw       = moe__reserve(&t, TS, sizeof(float), &ok);
    lay->dz       = moe__reserve(&t, TE, sizeof(float), &ok);
    lay->rbw_f64  = moe__reserve(&t, 8 * E, sizeof(double), &ok);   /* as moe__plan's */
    lay->rbw_f32  = moe__reserve(&t, 6 * E, sizeof(float), &ok);
    lay->rbw_u8   = moe__reserve(&t, 2 * E, sizeof(uint8_t), &ok);
    lay->tmp_x    = moe__reserve(&t, TD, sizeof(float), &ok);
    lay->dx       = moe__reserve(&t, TD, sizeof(float), &ok);
    if (!ok || t > (size_t)-1 - MOE__ALIGN) return MOE_STATUS_SIZE_OVERFLOW;
    lay->total = t + MOE__ALIGN;
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_ep_stats_count(const moe_config *cfg, int32_t *out_count) {
    moe_config c;
    moe_status st;
    if (!cfg || !out_count) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_config_resolve(cfg, &c)) != MOE_STATUS_OK) return st;
    if (c.routing != MOE_ROUTING_TOPK || c.noise != MOE_NOISE_NONE || c.shared_d_ff > 0)
        return MOE_STATUS_EP_UNSUPPORTED;
    if (c.num_experts > (INT32_MAX - 2) / MOE__EPS_VECS) return MOE_STATUS_SIZE_OVERFLOW;
    *out_count = MOE__EPS_VECS * c.num_experts + 2;
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_ep_workspace_size(const moe_config *cfg, const moe_ep_plan *plan,
                                        size_t *out_bytes) {
    moe_config c;
    moe__layout lay;
    moe_status st;
    if ((st = moe__ep_check(cfg, plan, &c)) != MOE_STATUS_OK) return st;
    if (!out_bytes) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe__ep_src_plan(&c, plan, &lay)) != MOE_STATUS_OK) return st;
    *out_bytes = lay.total;
    return MOE_STATUS_OK;
}


MOEDEF moe_status moe_ep_route(const moe_config *cfg, const moe_weights *w, const moe_ep_plan *plan,
                               const float *x, moe_info *info, int32_t *send_counts, double *stats,
                               void *workspace, size_t workspace_bytes) {
    moe_config c;
    moe__layout lay;
    moe__ws ws;
    moe__router r;
    moe_info res;
    moe_status st;
    float *logits;
    const float *xr;
    int32_t Tr, E, D, S, per, q, e;
    size_t i, n, TS;
    if ((st = moe__ep_check(cfg, plan, &c)) != MOE_STATUS_OK) return st;
    if (!w || !info || !send_counts || !stats) return MOE_STATUS_NULL_ARGUMENT;
    Tr = plan->local_tokens; E = c.num_experts; D = c.d_model; S = c.top_k;
    if (Tr > 0 && !x) return MOE_STATUS_NULL_ARGUMENT;
    if (!info->logits || !info->scores || !info->expert || !info->weight || !info->dropped)
        return MOE_STATUS_MISSING_CACHE;
    if (!w->router || (c.router_bias && !w->router_bias) ||
        (c.selection_bias && !w->selection_bias))
        return MOE_STATUS_MISSING_WEIGHT;
    if ((st = moe__ep_src_plan(&c, plan, &lay)) != MOE_STATUS_OK) return st;
    {
        moe__spans sp;
        sp.n = 0;
        moe__span(&sp, x, (size_t)Tr * (size_t)D, sizeof(float), 0);
        moe__ep_router_spans(&sp, &c, w->router, w->router_bias, w->selection_bias, 0);
        moe__ep_info_spans(&sp, &c, info, Tr, 1, 1);
        moe__span(&sp, send_counts, (size_t)plan->num_ranks, sizeof(int32_t), 1);
        moe__span(&sp, stats, (size_t)MOE__EPS_VECS * (size_t)E + 2, sizeof(double), 1);
        moe__span(&sp, workspace, workspace_bytes, 1, 1);
        if (moe__spans_overlap(&sp)) return MOE_STATUS_ALIASING;
    }
    if (!workspace) return MOE_STATUS_NULL_ARGUMENT;
    if (workspace_bytes < lay.total) {
        info->workspace_required = lay.total;
        return MOE_STATUS_WORKSPACE_TOO_SMALL;
    }
    ws = moe__ws_bind(&lay, moe__align_ptr(workspace));
    n = (size_t)Tr * (size_t)E; TS = (size_t)Tr * (size_t)S;

    /* 1. router logits of this rank's tokens; jitter keyed by global element */
    logits = ws.logits;
    xr = moe__router_input(&c, x, (size_t)Tr * (size_t)D,
                           (size_t)plan->token_offset * (size_t)D, ws.xr);
    if (Tr > 0)
        moe__kernels_of(&c)->linear(&c, logits, xr, w->router,
                                    c.router_bias ? w->router_bias : NULL, Tr, E, D, &ws);

    /* 2. NaN/Inf policy, as moe__route */
    if (!moe__all_finite(logits, n) ||
        !moe__all_finite(c.selection_bias ? w->selection_bias : NULL, (size_t)E))
        return MOE_STATUS_NONFINITE;

    /* 3. selection and pre-capacity weights; capacity is the owners' job */
    moe__router_init(&r, &c, &ws, Tr, &res);
    r.logits = logits;
    r.sel_bias = c.selection_bias ? w->selection_bias : NULL;
    r.t0 = plan->token_offset;
    r.C = 0;
    if (TS) memset(res.dropped, 0, TS);
    for (e = 0; e < 2 * E; e++) r.imp[e] = 0.0;
    moe__route_tokens_topk(&r);
    moe__count_pairs(&res, Tr, S, E);   /* kept = routed until the owners decide */
    res.slots = S;
    res.capacity = moe__capacity_of(&c, plan->num_tokens);

    /* 4. counts per owner rank, 5. this rank's statistics */
    per = E / plan->num_ranks;
    for (q = 0; q < plan->num_ranks; q++) send_counts[q] = 0;
    for (i = 0; i < TS; i++)
        if (res.dropped[i] != MOE__REJECTED) send_counts[res.expert[i] / per]++;
    moe__batch_stats(&c, plan->num_tokens, &r, stats);
    moe__info_export(info, &res, logits, Tr, E, S, E);
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_ep_pack(const moe_config *cfg, const moe_ep_plan *plan, const float *x,
                              const moe_info *info, const int32_t *send_counts,
                              moe_ep_pair *send_pairs, float *send_rows) {
    moe_config c;
    moe_status st;
    size_t p, n;
    int64_t s = 0, total = 0;
    int32_t q, per, S, D;
    if ((st = moe__ep_check(cfg, plan, &c)) != MOE_STATUS_OK) return st;
    if (!info || !send_counts) return MOE_STATUS_NULL_ARGUMENT;
    if (plan->local_tokens > 0 && !x) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe__ep_check_info(&c, info, plan->local_tokens)) != MOE_STATUS_OK) return st;
    S = c.top_k; D = c.d_model; per = c.num_experts / plan->num_ranks;
    n = (size_t)plan->local_tokens * (size_t)S;
    /* the counts must be this info's: one counting pass per rank first */
    for (q = 0; q < plan->num_ranks; q++) {
        int64_t cnt = 0;
        for (p = 0; p < n; p++)
            cnt += info->dropped[p] != MOE__REJECTED && info->expert[p] / per == q;
        if (cnt != send_counts[q]) return MOE_STATUS_BAD_PLAN;
        total += cnt;
    }
    if (total > 0 && (!send_pairs || !send_rows)) return MOE_STATUS_NULL_ARGUMENT;
    {
        moe__spans sp;
        sp.n = 0;
        moe__span(&sp, x, (size_t)plan->local_tokens * (size_t)D, sizeof(float), 0);
        moe__ep_info_spans(&sp, &c, info, plan->local_tokens, 0, 0);
        moe__span(&sp, send_counts, (size_t)plan->num_ranks, sizeof(int32_t), 0);
        moe__span(&sp, send_pairs, (size_t)total, sizeof(moe_ep_pair), 1);
        moe__span(&sp, send_rows, (size_t)total * (size_t)D, sizeof(float), 1);
        if (moe__spans_overlap(&sp)) return MOE_STATUS_ALIASING;
    }
    for (q = 0; q < plan->num_ranks; q++)
        for (p = 0; p < n; p++) {
            const int32_t e = info->expert[p], t = (int32_t)(p / (size_t)S),
                          j = (int32_t)(p % (size_t)S);
            moe_ep_pair *pr;
            if (info->dropped[p] == MOE__REJECTED || e / per != q) continue;
            pr = send_pairs + s;
            pr->token = (int64_t)plan->token_offset + t;
            pr->slot = j;
            pr->expert = e;
            pr->weight = info->weight[p];
            pr->priority = info->scores[(size_t)t * c.num_experts + info->expert[(size_t)t * S]];
            memcpy(send_rows + (size_t)s * D, x + (size_t)t * D, (size_t)D * sizeof(float));
            s++;
        }
    return MOE_STATUS_OK;
}

/* The owner's experts as a config of E/P experts, one slot, no capacity:
   moe__plan then lays out an expert-side workspace for num_recv rows, and
   the grouped FFN kernels run on it unchanged.                            */
static moe_config moe__ep_local_config(const moe_config *c, const moe_ep_plan *pl) {
    moe_config l = *c;
    l.num_experts = c->num_experts / pl->num_ranks;
    l.top_k = 1; l.capacity = 0; l.capacity_factor = 0.0f;
    l.n_group = 1; l.topk_group = 1; l.group_score_top = 1;
    l.second_expert = MOE_SECOND_GREEDY; l.selection_bias = 0; l.jitter = 0.0f;
    return l;
}


static moe_status moe__ep_expert_plan(const moe_config *cl, int32_t n, moe__layout *lay) {
    const size_t N = (size_t)n, D = (size_t)cl->d_model, F = (size_t)cl->d_ff;
    size_t t;
    int ok = 1;
    moe_status st = moe__plan(cl, n, MOE__PLAN_FORWARD, lay);
    if (st != MOE_STATUS_OK) return st;
    t = lay->total - MOE__ALIGN;
    lay->row_key = moe__reserve(&t, N, sizeof(int64_t), &ok);
    lay->pair_slot = moe__reserve(&t, N, sizeof(int32_t), &ok);
    lay->dout    = moe__reserve(&t, moe__mul(N, D), sizeof(float), &ok);
    lay->da      = moe__reserve(&t, moe__mul(N, F), sizeof(float), &ok);
    lay->du      = moe__reserve(&t, moe__act_is_glu(cl->activation) ? moe__mul(N, F) : 0,
                              sizeof(float), &ok);
    lay->dxg     = moe__reserve(&t, moe__mul(N, D), sizeof(float), &ok);
    lay->gemm_pack = moe__reserve(&t, moe__backward_pack_floats(cl, N, F), sizeof(float), &ok);
    if (!ok || t > (size_t)-1 - MOE__ALIGN) return MOE_STATUS_SIZE_OVERFLOW;
    lay->total = t + MOE__ALIGN;
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_ep_expert_workspace_size(const moe_config *cfg, const moe_ep_plan *plan,
                                               int32_t num_recv, size_t *out_bytes) {
    moe_config c, cl;
    moe__layout lay;
    moe_status st;
    if ((st = moe__ep_check(cfg, plan, &c)) != MOE_STATUS_OK) return st;
    if (!out_bytes) return MOE_STATUS_NULL_ARGUMENT;
    if (num_recv < 0) return MOE_STATUS_BAD_DIMENSION;
    cl = moe__ep_local_config(&c, plan);
    if ((st = moe__ep_expert_plan(&cl, num_recv, &lay)) != MOE_STATUS_OK) return st;
    *out_bytes = lay.total;
    return MOE_STATUS_OK;
}

/* The owner calls' workspace: local config, layout, size check, aligned base
   (*b = NULL with n = 0: nothing to do).                                  */
static moe_status moe__ep_expert_workspace(const moe_config *c, const moe_ep_plan *plan, int32_t n,
                                           void *workspace, size_t workspace_bytes,
                                           moe_config *cl, moe__ws *ws) {
    moe__layout lay;
    moe_status st;
    *cl = moe__ep_local_config(c, plan);
    if ((st = moe__ep_expert_plan(cl, n, &lay)) != MOE_STATUS_OK) return st;
    if (!workspace) return MOE_STATUS_NULL_ARGUMENT;
    if (workspace_bytes < lay.total) return MOE_STATUS_WORKSPACE_TOO_SMALL;
    *ws = moe__ws_bind(&lay, moe__align_ptr(workspace));
    return MOE_STATUS_OK;
}

/* Rows back in arrival order: dst[r] = src row of pair r, zeros for a
   dropped pair (pair_row < 0).                                            */
static void moe__ep_rows_back(const int64_t *pair_row, int32_t n, int32_t D, const float *src,
                              float *dst) {
    int32_t r;
    for (r = 0; r < n; r++) {
        if (pair_row[r] < 0) memset(dst + (size_t)r * D, 0, (size_t)D * sizeof(float));
        else memcpy(dst + (size_t)r * D, src + (size_t)pair_row[r] * D, (size_t)D * sizeof(float));
    }
}

/* Everything the owner calls check: weights of its experts, the received
   pairs (owned experts, valid slots and tokens, arriving in strictly
   increasing (token, slot) order, which contiguous rank slices give).     */
static moe_status moe__ep_check_owner(const moe_config *c, const moe_ep_plan *pl,
                                      const moe_weights *w, const moe_ep_pair *pairs,
                                      const float *x, int32_t n) {
    const int32_t per = c->num_experts / pl->num_ranks, e0 = pl->rank * per;
    moe_status st;
    int32_t r;
    if (!w) return MOE_STATUS_NULL_ARGUMENT;
    if (n < 0) return MOE_STATUS_BAD_DIMENSION;
    if (n > 0 && (!pairs || !x)) return MOE_STATUS_NULL_ARGUMENT;
    if (moe__quantized(c, w)) return MOE_STATUS_QUANT_UNSUPPORTED;
    if ((st = moe__check_experts(c, w, 0)) != MOE_STATUS_OK) return st;
    for (r = 0; r < n; r++) {
        const moe_ep_pair *p = pairs + r;
        if (p->expert < e0 || p->expert >= e0 + per || p->slot < 0 || p->slot >= c->top_k ||
            p->token < 0 || p->token >= pl->num_tokens)
            return MOE_STATUS_BAD_PLAN;
        if (r > 0 && (p->token < pairs[r - 1].token ||
                      (p->token == pairs[r - 1].token && p->slot <= pairs[r - 1].slot)))
            return MOE_STATUS_BAD_PLAN;
    }
    return MOE_STATUS_OK;
}

/* Owner rows: local experts and drops of the received pairs, the counting
   sort into expert-contiguous rows (token order within an expert, as in one
   process), dropout keys and the gathered inputs xg.                      */
static void moe__ep_owner_rows(const moe_config *c, const moe_config *cl, const moe_ep_plan *pl,
                               const moe_ep_pair *pairs, const float *x, int32_t n,
                               const uint8_t *dropped_in, const moe__ws *ws) {
    const int32_t El = cl->num_experts, e0 = pl->rank * El, D = c->d_model;
    int32_t *expert = ws->expert;
    uint8_t *drop = ws->dropped;
    int64_t *offsets = ws->offsets,
            *row_pair = ws->row_pair;
    int64_t *row_key = ws->row_key;
    float *xg = ws->xg;
    int64_t row;
    int32_t r;
    for (r = 0; r < n; r++) {
        expert[r] = pairs[r].expert - e0;
        drop[r] = dropped_in ? dropped_in[r] : 0;
    }
    if (!dropped_in) {
        const int32_t C = moe__capacity_of(c, pl->num_tokens);
        if (C > 0) {   /* the pairs of the owned experts, in (token, slot) order */
            moe__pair_list p;
            int32_t *slot = ws->pair_slot;
            p.n = n; p.S = c->top_k;
            p.expert = expert; p.slot = slot; p.drop = drop; p.key = ws->key;
            for (r = 0; r < n; r++) {
                slot[r] = pairs[r].slot;
                ws->key[r] = c->drop_policy == MOE_DROP_WEIGHT ? pairs[r].weight
                                                               : pairs[r].priority;
            }
            moe__capacity_drops(c, C, El, &p, ws->order, ws->order_tmp, ws->count);
        }
    }
    moe__dispatch_ref(expert, drop, n, 1, El, offsets, ws->pair_row, row_pair);
    for (row = 0; row < offsets[El]; row++) {
        const moe_ep_pair *p = pairs + row_pair[row];
        row_key[row] = p->token * c->top_k + p->slot;
        memcpy(xg + (size_t)row * D, x + (size_t)row_pair[row] * D, (size_t)D * sizeof(float));
    }
}

/* The owner's routed FFN, with expert dropout keyed by the global pair. */
static moe__ffn moe__ep_ffn(const moe_config *cl, const moe_weights *w, const moe__ws *ws) {
    moe__ffn f = moe__routed_ffn(cl, w);
    if (cl->training && cl->expert_dropout > 0.0f) {
        f.dropout = cl;
        f.row_key = ws->row_key;
    }
    return f;
}

/* Expert FFN forward over the owner's rows (the ISA's kernels). */
static void moe__ep_owner_ffn(const moe_config *cl, const moe__ffn *f, const moe__ws *ws) {
    float *hu = moe__act_is_glu(cl->activation) ? ws->hu : NULL;
    moe__kernels_of(cl)->experts(cl, f, NULL, cl->num_experts, ws->offsets,
                                 ws->xg, ws->hg, hu,
                                 ws->ha, ws->out,
                                 ws->tiles, ws);
}

MOEDEF moe_status moe_ep_expert_forward(const moe_config *cfg, const moe_weights *w,
                                        const moe_ep_plan *plan, const moe_ep_pair *pairs,
                                        const float *x, int32_t num_recv, float *out,
                                        uint8_t *dropped, float *cache_hidden, float *cache_up,
                                        void *workspace, size_t workspace_bytes) {
    moe_config c, cl;
    moe__ws ws;
    moe__ffn f;
    moe_status st;
    const int32_t n = num_recv;
    int64_t rows;
    int32_t r, D, F;
    const int64_t *pair_row;
    if ((st = moe__ep_check(cfg, plan, &c)) != MOE_STATUS_OK) return st;
    if ((st = moe__ep_check_owner(&c, plan, w, pairs, x, n)) != MOE_STATUS_OK) return st;
    if (n > 0 && (!out || !dropped)) return MOE_STATUS_NULL_ARGUMENT;
    {
        moe__spans sp;
        const moe_grads wg = moe__weights_as_grads(w);
        const size_t nD = (size_t)n * (size_t)c.d_model, nF = (size_t)n * (size_t)c.d_ff;
        cl = moe__ep_local_config(&c, plan);
        sp.n = 0;
        moe__span(&sp, pairs, (size_t)n, sizeof(moe_ep_pair), 0);
        moe__span(&sp, x, nD, sizeof(float), 0);
        moe__ep_expert_spans(&sp, &cl, &wg, 0);
        moe__span(&sp, out, nD, sizeof(float), 1);
        moe__span(&sp, dropped, (size_t)n, 1, 1);
        moe__span(&sp, cache_hidden, nF, sizeof(float), 1);
        if (moe__act_is_glu(c.activation)) moe__span(&sp, cache_up, nF, sizeof(float), 1);
        moe__span(&sp, workspace, workspace_bytes, 1, 1);
        if (moe__spans_overlap(&sp)) return MOE_STATUS_ALIASING;
    }
    if ((st = moe__ep_expert_workspace(&c, plan, n, workspace, workspace_bytes, &cl, &ws)) !=
        MOE_STATUS_OK)
        return st;
    if (n == 0) return MOE_STATUS_OK;
    D = c.d_model; F = c.d_ff;
    moe__ep_owner_rows(&c, &cl, plan, pairs, x, n, NULL, &ws);
    f = moe__ep_ffn(&cl, w, &ws);
    moe__ep_owner_ffn(&cl, &f, &ws);
    /* results back in arrival order; a dropped pair gets a zero row */
    pair_row = ws.pair_row;
    for (r = 0; r < n; r++)
        dropped[r] = pair_row[r] < 0 ? (uint8_t)MOE__DROPPED : (uint8_t)MOE__KEPT;
    moe__ep_rows_back(pair_row, n, D, ws.out, out);
    rows = ws.offsets[cl.num_experts];
    if (cache_hidden)
        memcpy(cache_hidden, ws.hg, (size_t)rows * F * sizeof(float));
    if (cache_up && moe__act_is_glu(c.activation))
        memcpy(cache_up, ws.hu, (size_t)rows * F * sizeof(float));
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_ep_combine(const moe_config *cfg, const moe_ep_plan *plan,
                                 const double *stats, const float *ret_out,
                                 const uint8_t *ret_dropped, moe_info *info, float *y,
                                 void *workspace, size_t workspace_bytes) {
    moe_config c;
    moe__layout lay;
    moe__ws ws;
    moe_status st;
    int64_t *pair_row, nsent, s;
    int32_t Tr, E, D, S, t, j, d;
    if ((st = moe__ep_check(cfg, plan, &c)) != MOE_STATUS_OK) return st;
    if (!info || !stats) return MOE_STATUS_NULL_ARGUMENT;
    Tr = plan->local_tokens; E = c.num_experts; D = c.d_model; S = c.top_k;
    if (Tr > 0 && !y) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe__ep_check_info(&c, info, Tr)) != MOE_STATUS_OK) return st;
    if ((st = moe__ep_src_plan(&c, plan, &lay)) != MOE_STATUS_OK) return st;
    {
        moe__spans sp;
        const size_t sent = moe__ep_sent(&c, plan, info);
        sp.n = 0;
        moe__span(&sp, stats, (size_t)MOE__EPS_VECS * (size_t)E + 2, sizeof(double), 0);
        moe__span(&sp, ret_out, sent * (size_t)D, sizeof(float), 0);
        moe__span(&sp, ret_dropped, sent, 1, 0);
        moe__ep_info_spans(&sp, &c, info, Tr, 1, 1);   /* rewritten in place */
        moe__span(&sp, y, (size_t)Tr * (size_t)D, sizeof(float), 1);
        moe__span(&sp, workspace, workspace_bytes, 1, 1);
        if (moe__spans_overlap(&sp)) return MOE_STATUS_ALIASING;
    }
    if (!workspace) return MOE_STATUS_NULL_ARGUMENT;
    if (workspace_bytes < lay.total) {
        info->workspace_required = lay.total;
        return MOE_STATUS_WORKSPACE_TOO_SMALL;
    }
    ws = moe__ws_bind(&lay, moe__align_ptr(workspace));
    pair_row = ws.pair_row;
    nsent = moe__ep_send_index(&c, plan, info, pair_row);
    if (nsent > 0 && (!ret_out || !ret_dropped)) return MOE_STATUS_NULL_ARGUMENT;
    for (s = 0; s < nsent; s++) if (ret_dropped[s] > MOE__DROPPED) return MOE_STATUS_BAD_CACHE;

    for (t = 0; t < Tr; t++) {
        int32_t *idx = info->expert + (size_t)t * S;
        float *wt = info->weight + (size_t)t * S;
        uint8_t *drop = info->dropped + (size_t)t * S;
        float *yt = y + (size_t)t * D;
        /* 1. the owners' capacity decisions, 2. final weights (moe__route_topk) */
        for (j = 0; j < S; j++) {
            s = pair_row[(size_t)t * S + j];
            if (s >= 0 && ret_dropped[s]) drop[j] = MOE__DROPPED;
        }
        moe__final_weights(&c, info->scores + (size_t)t * E, idx, drop, wt, S,
                           (uint8_t *)ws.small_i, ws.small_f);
        /* 3. y_t = sum of the kept slots in slot order (moe__combine_rows) */
        for (d = 0; d < D; d++) yt[d] = 0.0f;
        for (j = 0; j < S; j++) {
            const float *o;
            s = pair_row[(size_t)t * S + j];
            if (s < 0 || drop[j]) continue;
            o = ret_out + (size_t)s * D;
            for (d = 0; d < D; d++) yt[d] += wt[j] * o[d];
        }
    }
    /* 4. counts over this rank's tokens; aux losses of the whole group */
    moe__count_pairs(info, Tr, S, E);
    info->slots = S;
    info->capacity = moe__capacity_of(&c, plan->num_tokens);
    moe__unstamp(info);
    moe__aux_from_stats(&c, plan->num_tokens, stats, info);
    moe__aux_total(&c, info);
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_ep_pack_backward(const moe_config *cfg, const moe_ep_plan *plan,
                                       const moe_info *info, const float *dy, float *send_dout) {
    moe_config c;
    moe_status st;
    size_t p, n;
    int64_t s = 0;
    int32_t q, per, S, D, d;
    if ((st = moe__ep_check(cfg, plan, &c)) != MOE_STATUS_OK) return st;
    if (!info) return MOE_STATUS_NULL_ARGUMENT;
    if (plan->local_tokens > 0 && !dy) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe__ep_check_info(&c, info, plan->local_tokens)) != MOE_STATUS_OK) return st;
    S = c.top_k; D = c.d_model; per = c.num_experts / plan->num_ranks;
    n = (size_t)plan->local_tokens * (size_t)S;
    /* any row to send? (a loop with an exit: clang 14 -O3 -mavx512f crashes
       vectorising the counting form of it) */
    for (p = 0; p < n; p++) if (info->dropped[p] != MOE__REJECTED) break;
    if (p < n && !send_dout) return MOE_STATUS_NULL_ARGUMENT;
    {
        moe__spans sp;
        sp.n = 0;
        moe__span(&sp, dy, (size_t)plan->local_tokens * (size_t)D, sizeof(float), 0);
        moe__ep_info_spans(&sp, &c, info, plan->local_tokens, 0, 0);
        moe__span(&sp, send_dout, moe__ep_sent(&c, plan, info) * (size_t)D, sizeof(float), 1);
        if (moe__spans_overlap(&sp)) return MOE_STATUS_ALIASING;
    }
    for (q = 0; q < plan->num_ranks; q++)    /* moe_ep_pack's order */
        for (p = 0; p < n; p++) {
            const float *dyt = dy + (p / (size_t)S) * (size_t)D;
            float *o;
            if (info->dropped[p] == MOE__REJECTED || info->expert[p] / per != q) continue;
            o = send_dout + (size_t)(s++) * D;
            if (info->dropped[p]) { memset(o, 0, (size_t)D * sizeof(float)); continue; }
            for (d = 0; d < D; d++) o[d] = info->weight[p] * dyt[d];   /* dout = w dy */
        }
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_ep_expert_backward(const moe_config *cfg, const moe_weights *w,
                                         const moe_ep_plan *plan, const moe_ep_pair *pairs,
                                         const float *x, int32_t num_recv, const uint8_t *dropped,
                                         const float *cache_hidden, const float *cache_up,
                                         const float *dout, float *dx, const moe_grads *grads,
                                         void *workspace, size_t workspace_bytes) {
    moe_config c, cl;
    moe__ws ws;
    moe__ffn f;
    moe__ffn_grad g;
    moe_status st;
    const int32_t n = num_recv;
    const float *hg, *hu;
    float *ha;
    int64_t rows, row;
    const int64_t *row_pair;
    int32_t r, D, F, glu, cached;
    if ((st = moe__ep_check(cfg, plan, &c)) != MOE_STATUS_OK) return st;
    if (!grads) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe__ep_check_owner(&c, plan, w, pairs, x, n)) != MOE_STATUS_OK) return st;
    glu = moe__act_is_glu(c.activation);
    if (n > 0 && (!dropped || !dout || !dx)) return MOE_STATUS_NULL_ARGUMENT;
    cached = cache_hidden != NULL;
    if (cached && glu && !cache_up) return MOE_STATUS_MISSING_CACHE;
    for (r = 0; r < n; r++) if (dropped[r] > MOE__DROPPED) return MOE_STATUS_BAD_CACHE;
    {
        moe__spans sp;
        const moe_grads wg = moe__weights_as_grads(w);
        moe_grads gu;
        const size_t nD = (size_t)n * (size_t)c.d_model, nF = (size_t)n * (size_t)c.d_ff;
        cl = moe__ep_local_config(&c, plan);
        sp.n = 0;
        moe__span(&sp, pairs, (size_t)n, sizeof(moe_ep_pair), 0);
        moe__span(&sp, x, nD, sizeof(float), 0);
        moe__span(&sp, dropped, (size_t)n, 1, 0);
        moe__span(&sp, cache_hidden, nF, sizeof(float), 0);
        if (glu) moe__span(&sp, cache_up, nF, sizeof(float), 0);
        moe__span(&sp, dout, nD, sizeof(float), 0);
        moe__ep_expert_spans(&sp, &cl, &wg, 0);
        moe__span(&sp, dx, nD, sizeof(float), 1);
        gu = *grads; gu.gate_up_fused = w->gate_up_fused;
        moe__ep_expert_spans(&sp, &cl, &gu, 1);
        moe__span(&sp, workspace, workspace_bytes, 1, 1);
        if (moe__spans_overlap(&sp)) return MOE_STATUS_ALIASING;
    }
    if ((st = moe__ep_expert_workspace(&c, plan, n, workspace, workspace_bytes, &cl, &ws)) !=
        MOE_STATUS_OK)
        return st;
    if (n == 0) return MOE_STATUS_OK;
    D = c.d_model; F = c.d_ff;

    /* the forward's rows (its drop decisions), activations cached or redone */
    moe__ep_owner_rows(&c, &cl, plan, pairs, x, n, dropped, &ws);
    f = moe__ep_ffn(&cl, w, &ws);
    rows = ws.offsets[cl.num_experts];
    ha = ws.ha;
    if (cached) {   /* ha: rebuilt by the expert backward's activation pass */
        hg = cache_hidden; hu = glu ? cache_up : NULL;
    } else {
        moe__ep_owner_ffn(&cl, &f, &ws);
        hg = ws.hg; hu = glu ? ws.hu : NULL;
    }
    row_pair = ws.row_pair;
    for (row = 0; row < rows; row++)
        memcpy(ws.dout + (size_t)row * D, dout + (size_t)row_pair[row] * D,
               (size_t)D * sizeof(float));

    /* the grouped expert backward of one process, on the owned experts */
    g = moe__ffn_grad_make(&f, grads->gate,
                           w->gate_up_fused && grads->gate
                               ? grads->gate + (size_t)F * D : grads->up,
                           grads->down, grads->gate_bias, grads->up_bias, grads->down_bias);
    moe__kernels_of(&cl)->experts_backward(
        &cl, &f, &g, cl.num_experts, ws.offsets, ws.xg,
        hg, hu, ha, cached, ws.dout, ws.da,
        glu ? ws.du : NULL, ws.dxg,
        ws.gemm_pack);
    moe__ep_rows_back(ws.pair_row, n, D, ws.dxg, dx);
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_ep_combine_backward(const moe_config *cfg, const moe_weights *w,
                                          const moe_ep_plan *plan, const float *x,
                                          const moe_info *info, const double *stats,
                                          const float *dy, const float *ret_out,
                                          const float *ret_dx, float *dx_out,
                                          const moe_grads *grads, void *workspace,
                                          size_t workspace_bytes) {
    moe_config c;
    moe__layout lay;
    moe__ws ws;
    moe__router_bw B;
    moe_status st;
    const moe__kernels *k;
    int64_t *pair_row, nsent, s;
    float *gw, *dx, *xr_buf, *tmp;
    const float *xr;
    int32_t Tr, E, D, S, t, j;
    size_t nTD, off;
    if ((st = moe__ep_check(cfg, plan, &c)) != MOE_STATUS_OK) return st;
    k = moe__kernels_of(&c);
    if (!w || !info || !stats || !grads) return MOE_STATUS_NULL_ARGUMENT;
    Tr = plan->local_tokens; E = c.num_experts; D = c.d_model; S = c.top_k;
    if (Tr > 0 && (!x || !dy)) return MOE_STATUS_NULL_ARGUMENT;
    if (!w->router) return MOE_STATUS_MISSING_WEIGHT;
    if ((st = moe__ep_check_info(&c, info, Tr)) != MOE_STATUS_OK) return st;
    if ((st = moe__ep_src_plan(&c, plan, &lay)) != MOE_STATUS_OK) return st;
    {
        moe__spans sp;
        const size_t TD = (size_t)Tr * (size_t)D, sentD = moe__ep_sent(&c, plan, info) * (size_t)D;
        sp.n = 0;
        moe__span(&sp, x, TD, sizeof(float), 0);
        moe__span(&sp, dy, TD, sizeof(float), 0);
        moe__ep_info_spans(&sp, &c, info, Tr, 0, 0);
        moe__span(&sp, stats, (size_t)MOE__EPS_VECS * (size_t)E + 2, sizeof(double), 0);
        moe__span(&sp, ret_out, sentD, sizeof(float), 0);
        moe__span(&sp, ret_dx, sentD, sizeof(float), 0);
        moe__ep_router_spans(&sp, &c, w->router, w->router_bias, w->selection_bias, 0);
        moe__span(&sp, dx_out, TD, sizeof(float), 1);
        moe__ep_router_spans(&sp, &c, grads->router, grads->router_bias, NULL, 1);
        moe__span(&sp, workspace, workspace_bytes, 1, 1);
        if (moe__spans_overlap(&sp)) return MOE_STATUS_ALIASING;
    }
    if (!workspace) return MOE_STATUS_NULL_ARGUMENT;
    if (workspace_bytes < lay.total) return MOE_STATUS_WORKSPACE_TOO_SMALL;
    ws = moe__ws_bind(&lay, moe__align_ptr(workspace));
    pair_row = ws.pair_row;
    nsent = moe__ep_send_index(&c, plan, info, pair_row);
    if (nsent > 0 && (!ret_out || !ret_dx)) return MOE_STATUS_NULL_ARGUMENT;
    if (Tr == 0) return MOE_STATUS_OK;
    gw = ws.gw; dx = ws.dx;
    xr_buf = ws.xr; tmp = ws.tmp_x;
    nTD = (size_t)Tr * (size_t)D;
    off = (size_t)plan->token_offset * (size_t)D;

    /* 1. combine backward: g = <dy_t, out>, 3. dx_t = sum of the kept slots' rows */
    memset(dx, 0, nTD * sizeof(float));
    for (t = 0; t < Tr; t++)
        for (j = 0; j < S; j++) {
            const size_t p = (size_t)t * S + j;
            /* as moe__bw_combine_rows, bit for bit */
            s = pair_row[p];
            if (s < 0 || info->dropped[p]) { gw[p] = 0.0f; continue; }
            gw[p] = k->dot(dy + (size_t)t * D, ret_out + (size_t)s * D, (size_t)D);
            k->add_scaled(dx + (size_t)t * D, ret_dx + (size_t)s * D, 1.0f, (size_t)D, 1);
        }

    /* 5. router backward with the group's statistics, as in moe__backward */
    memset(&B, 0, sizeof B);
    B.c = &c; B.info = info; B.T = Tr; B.S = S; B.E = E; B.K = S;
    B.T_all = plan->num_tokens; B.t0 = plan->token_offset; B.stats = stats;
    B.gw = gw;
    moe__router_bw_scratch(&B, &ws, E);
    xr = moe__router_input(&c, x, nTD, off, xr_buf);
    moe__router_backward_ref(&B);
    moe__router_gemm_backward(&c, Tr, B.dz, w->router, grads->router,
                              c.router_bias ? grads->router_bias : NULL, xr, tmp, dx, NULL, off);
    if (dx_out) memcpy(dx_out, dx, nTD * sizeof(float));
    return MOE_STATUS_OK;
}

// ----------------------------------------------------------------------------
// Training helpers: initialisation and gradient utilities

MOEDEF moe_status moe_init_weights(const moe_config *cfg, moe_init_scheme scheme, uint64_t seed,
                                   const moe_grads *params) {
    moe_config c;
    moe__tensor t[20];
    moe_status st;
    int32_t n, k;
    if (!cfg || !params) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_config_resolve(cfg, &c)) != MOE_STATUS_OK) return st;
    if ((int)scheme < 0 || (int)scheme > (int)MOE_INIT_SWITCH) return MOE_STATUS_BAD_ENUM;
    n = moe__tensors(&c, params, t);
    for (k = 0; k < n; k++) {
        size_t i;
        if (!t[k].p) continue;
        for (i = 0; i < t[k].n; i++) {
            /* stream: (seed, tensor k); counter: expert index then element, so
               expert e's values do not depend on how many experts there are */
            const uint64_t e = i / t[k].per_expert, j = i % t[k].per_expert;
            const uint64_t ctr = (e << 40) + j;
            double v;
            if (t[k].bias) { t[k].p[i] = t[k].bias == 2 ? 1.0f : 0.0f; continue; }
            if (scheme == MOE_INIT_XAVIER) {
                const double a = sqrt(6.0 / (t[k].fan_in + t[k].fan_out));
                v = a * (2.0 * moe__rng_uniform(seed, MOE__RNG_INIT + (uint64_t)k, ctr) - 1.0);
            } else {
                uint64_t draw = 0;
                do v = moe__rng_normal(seed, MOE__RNG_INIT + (uint64_t)k, (ctr << 4) + draw++);
                while (fabs(v) > 2.0 && draw < 16);
                v *= sqrt(0.1 / t[k].fan_in);
            }
            t[k].p[i] = (float)v;
        }
    }
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_grads_zero(const moe_config *cfg, const moe_grads *g) {
    moe_config c;
    moe__tensor t[20];
    moe_status st;
    int32_t n, k;
    if (!cfg || !g) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_config_resolve(cfg, &c)) != MOE_STATUS_OK) return st;
    n = moe__tensors(&c, g, t);
    for (k = 0; k < n; k++) if (t[k].p) memset(t[k].p, 0, t[k].n * sizeof(float));
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_grads_clip_norm(const moe_config *cfg, const moe_grads *g, float max_norm,
                                      float *out_norm) {
    moe_config c;
    moe__tensor t[20];
    moe_status st;
    double sum = 0.0, norm;
    int32_t n, k;
    size_t i;
    if (!cfg || !g) return MOE_STATUS_NULL_ARGUMENT;
    if ((st = moe_config_resolve(cfg, &c)) != MOE_STATUS_OK) return st;
    if (!moe__isfinite(max_norm) || max_norm <= 0.0f) return MOE_STATUS_BAD_OPTION;
    n = moe__tensors(&c, g, t);
    for (k = 0; k < n; k++)
        if (t[k].p) for (i = 0; i < t[k].n; i++) sum += (double)t[k].p[i] * t[k].p[i];
    norm = sqrt(sum);
    if (out_norm) *out_norm = (float)norm;
    if (norm > max_norm) {
        const float scale = (float)(max_norm / norm);
        for (k = 0; k < n; k++)
            if (t[k].p) for (i = 0; i < t[k].n; i++) t[k].p[i] *= scale;
    }
    return MOE_STATUS_OK;
}

MOEDEF moe_status moe_selection_bias_update(int32_t num_experts, const int32_t *load,
                                            float gamma, float *bias) {
    double mean = 0.0;
    int32_t e;
    if (!load || !bias) return MOE_STATUS_NULL_ARGUMENT;
    if (num_experts < 1) return MOE_STATUS_BAD_DIMENSION;
    if (!moe__isfinite(gamma) || gamma < 0.0f) return MOE_STATUS_BAD_OPTION;
    for (e = 0; e < num_experts; e++) mean += load[e];
    mean /= num_experts;
    for (e = 0; e < num_experts; e++) {   /* sign(0) = 0: an expert at the mean stays */
        if (load[e] < mean) bias[e] += gamma;
        else if (load[e] > mean) bias[e] -= gamma;
    }
    return MOE_STATUS_OK;
}

#endif /* MOE_IMPLEMENTATION_INCLUDED */
#endif /* MOE_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
MIT License

Copyright (c) 2026 the moe.h authors

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
*/
