/* Generated from moe.h by python/gen_cdef.py: do not edit.
   The cffi declarations of the public API (make python-cdef-check). */

#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 4
#define MOE_VERSION_PATCH 0

typedef enum moe_status {
    MOE_STATUS_OK = 0,
    MOE_STATUS_NULL_ARGUMENT = 1,
    MOE_STATUS_BAD_DIMENSION = 2,
    MOE_STATUS_BAD_TOP_K = 3,
    MOE_STATUS_BAD_GROUPS = 4,
    MOE_STATUS_BAD_CAPACITY = 5,
    MOE_STATUS_BAD_ENUM = 6,
    MOE_STATUS_BAD_OPTION = 7,
    MOE_STATUS_MISSING_WEIGHT = 8,
    MOE_STATUS_WORKSPACE_TOO_SMALL = 9,
    MOE_STATUS_NONFINITE = 10,
    MOE_STATUS_UNSUPPORTED = 11,
    MOE_STATUS_OUT_OF_MEMORY = 12,
    MOE_STATUS_SIZE_OVERFLOW = 13,
    MOE_STATUS_MISSING_CACHE = 14,
    MOE_STATUS_BAD_CACHE = 15,
    MOE_STATUS_BAD_PACKED = 16,
    MOE_STATUS_EP_UNSUPPORTED = 17,
    MOE_STATUS_BAD_PLAN = 18,
    MOE_STATUS_ALIASING = 19,
    MOE_STATUS_CUDA_UNSUPPORTED = 20,
    MOE_STATUS_CUDA_ERROR = 21,
    MOE_STATUS_BAD_QUANT = 22,
    MOE_STATUS_QUANT_UNSUPPORTED = 23,

    MOE_STATUS_COUNT
} moe_status;

typedef enum moe_score_func {
    MOE_SCORE_SOFTMAX = 0,
    MOE_SCORE_SIGMOID = 1
} moe_score_func;

typedef enum moe_routing {
    MOE_ROUTING_TOPK = 0,
    MOE_ROUTING_EXPERT_CHOICE = 1,
    MOE_ROUTING_DENSE = 2,
    MOE_ROUTING_SOFT = 3
} moe_routing;

typedef enum moe_norm {
    MOE_NORM_SUM = 0,
    MOE_NORM_NONE = 1,
    MOE_NORM_PNORM = 2
} moe_norm;

typedef enum moe_noise {
    MOE_NOISE_NONE = 0,
    MOE_NOISE_SHAZEER = 1
} moe_noise;

typedef enum moe_second_expert {
    MOE_SECOND_GREEDY = 0,
    MOE_SECOND_RANDOM = 1,
    MOE_SECOND_SAMPLED = 2
} moe_second_expert;

typedef enum moe_drop_policy {
    MOE_DROP_POSITION = 0,
    MOE_DROP_BPR = 1,
    MOE_DROP_WEIGHT = 2
} moe_drop_policy;

typedef enum moe_capacity_formula {
    MOE_CAPACITY_MEGATRON = 0,
    MOE_CAPACITY_FAIRSEQ_TOP1 = 1,
    MOE_CAPACITY_FAIRSEQ_TOP2 = 2,
    MOE_CAPACITY_DEEPSPEED = 3,
    MOE_CAPACITY_LINGVO = 4,
    MOE_CAPACITY_MESH = 5,
    MOE_CAPACITY_FLAXFORMER = 6,
    MOE_CAPACITY_VMOE = 7
} moe_capacity_formula;

typedef enum moe_balance_loss {
    MOE_BALANCE_TOPK = 0,
    MOE_BALANCE_TOPK_NORMALIZED = 1,
    MOE_BALANCE_FIRST_CHOICE = 2
} moe_balance_loss;

typedef enum moe_activation {
    MOE_ACT_SWIGLU = 0,
    MOE_ACT_GEGLU = 1,
    MOE_ACT_GEGLU_TANH = 2,
    MOE_ACT_RELU = 3,
    MOE_ACT_GELU = 4,
    MOE_ACT_GELU_TANH = 5,
    MOE_ACT_SILU = 6
} moe_activation;

typedef enum moe_isa {
    MOE_ISA_AUTO = 0,
    MOE_ISA_REFERENCE = 1,
    MOE_ISA_AVX2 = 2,
    MOE_ISA_AVX512 = 3,
    MOE_ISA_NEON = 4
} moe_isa;

typedef void (*moe_task_fn)(void *arg, int32_t task);
typedef void (*moe_parallel_for_fn)(void *user, int32_t num_tasks, moe_task_fn task, void *arg);

typedef struct moe_config {
    int32_t num_experts;
    int32_t top_k;
    int32_t d_model;
    int32_t d_ff;
    moe_activation activation;
    int32_t expert_bias;

    moe_routing routing;
    moe_score_func score;
    int32_t router_bias;
    int32_t selection_bias;
    int32_t n_group;
    int32_t topk_group;
    int32_t group_score_top;
    int32_t group_mask_zero;
    moe_second_expert second_expert;
    float second_threshold;

    moe_norm normalize;
    float norm_p;
    float norm_eps;
    int32_t normalize_after_drop;
    float routed_scale;

    int32_t training;
    uint64_t seed;
    moe_noise noise;
    float noise_epsilon;
    float jitter;
    float router_noise_std;
    float expert_dropout;

    int32_t capacity;
    float capacity_factor;
    moe_capacity_formula capacity_formula;
    moe_drop_policy drop_policy;

    int32_t shared_d_ff;
    int32_t shared_expert_gated;
    int32_t slots_per_expert;

    moe_balance_loss balance_loss;
    float balance_coef;
    float z_loss_coef;
    float importance_coef;
    float load_coef;
    float seq_balance_coef;
    int32_t seq_len;

    int32_t save_for_backward;
    int32_t recompute;
    float router_grad_clip;

    moe_isa isa;
    int32_t pack_bf16;
    moe_parallel_for_fn parallel_for;
    void *parallel_user;
    int32_t num_threads;
} moe_config;

typedef enum moe_qtype {
    MOE_QTYPE_F32 = 0,
    MOE_QTYPE_Q4_0 = 2,
    MOE_QTYPE_Q8_0 = 8,
    MOE_QTYPE_Q4_K = 12,
    MOE_QTYPE_MXFP4 = 39
} moe_qtype;

typedef struct moe_weights {
    const float *router;
    const float *router_bias;
    const float *selection_bias;
    const float *router_noise;
    const float *gate;
    const float *up;
    const float *down;
    const float *gate_bias;
    const float *up_bias;
    const float *down_bias;
    int32_t gate_up_fused;

    int32_t gate_type, up_type, down_type;
    const void *gate_q, *up_q, *down_q;

    const float *shared_gate;
    const float *shared_up;
    const float *shared_down;
    const float *shared_gate_bias;
    const float *shared_up_bias;
    const float *shared_down_bias;
    const float *shared_expert_gate;

    int32_t shared_gate_type, shared_up_type, shared_down_type;
    const void *shared_gate_q, *shared_up_q, *shared_down_q;

    const float *soft_phi;
    const float *soft_scale;

    const void *packed;
    size_t packed_bytes;

    const void *qpacked;
    size_t qpacked_bytes;
} moe_weights;

typedef struct moe_grads {
    float *router, *router_bias, *router_noise;
    float *gate, *up, *down, *gate_bias, *up_bias, *down_bias;
    float *shared_gate, *shared_up, *shared_down;
    float *shared_gate_bias, *shared_up_bias, *shared_down_bias, *shared_expert_gate;
    float *soft_phi, *soft_scale;
    int32_t gate_up_fused;
} moe_grads;

typedef struct moe_info {
    float   *logits;
    float   *scores;
    float   *dispatch;
    int32_t *expert;
    float   *weight;
    uint8_t *dropped;
    int32_t *expert_routed;
    int32_t *expert_kept;

    float   *cache_hidden;
    float   *cache_up;
    float   *cache_out;
    float   *cache_shared_hidden;
    float   *cache_shared_up;
    float   *cache_shared_out;

    int32_t slots;
    int32_t capacity;
    int32_t dropped_pairs;
    int32_t dropped_tokens;
    float aux_balance;
    float aux_z;
    float aux_importance;
    float aux_load;
    float aux_seq;
    float aux_total;
    size_t workspace_required;

    int32_t cache_tokens;
    uint64_t cache_config;
    uint64_t cache_check;
} moe_info;

const char *moe_status_string(moe_status status);

moe_isa moe_compiled_isa(void);
const char *moe_isa_name(moe_isa isa);

moe_status moe_config_resolve(const moe_config *cfg, moe_config *out);

uint64_t moe_config_fingerprint(const moe_config *cfg);

moe_config moe_preset_mixtral(void);
moe_config moe_preset_switch(void);
moe_config moe_preset_gshard(void);
moe_config moe_preset_shazeer(void);
moe_config moe_preset_qwen2_moe(void);
moe_config moe_preset_qwen3_moe(void);
moe_config moe_preset_olmoe(void);
moe_config moe_preset_dbrx(void);
moe_config moe_preset_jamba(void);
moe_config moe_preset_deepseek_v2(void);
moe_config moe_preset_deepseek_v3(void);
moe_config moe_preset_expert_choice(void);
moe_config moe_preset_soft_moe(void);
moe_config moe_preset_dense(void);
moe_config moe_preset_glam(void);
moe_config moe_preset_topk_softmax(void);

const char *moe_qtype_name(moe_qtype type);
int32_t moe_qtype_block_size(moe_qtype type);
size_t moe_qtype_row_bytes(moe_qtype type, int64_t n);
moe_status moe_quantize(moe_qtype type, const float *x, int64_t rows, int64_t n,
                               void *dst, size_t dst_bytes);
moe_status moe_dequantize(moe_qtype type, const void *src, size_t src_bytes,
                                 int64_t rows, int64_t n, float *y);

moe_status moe_pack_size(const moe_config *cfg, size_t *out_bytes);
moe_status moe_pack_weights(const moe_config *cfg, const moe_weights *w,
                                   void *packed, size_t bytes);

moe_status moe_qpack_size(const moe_config *cfg, const moe_weights *w,
                                 size_t *out_bytes);
moe_status moe_qpack_weights(const moe_config *cfg, const moe_weights *w,
                                    void *qpacked, size_t bytes);

typedef enum moe_init_scheme { MOE_INIT_XAVIER = 0, MOE_INIT_SWITCH = 1 } moe_init_scheme;
moe_status moe_init_weights(const moe_config *cfg, moe_init_scheme scheme, uint64_t seed,
                                   const moe_grads *params);

moe_status moe_grads_zero(const moe_config *cfg, const moe_grads *g);
moe_status moe_grads_clip_norm(const moe_config *cfg, const moe_grads *g, float max_norm,
                                      float *out_norm);

int32_t moe_routing_slots(const moe_config *cfg);

moe_status moe_capacity(moe_capacity_formula formula, int32_t num_tokens,
                               int32_t num_experts, int32_t top_k,
                               float capacity_factor, int32_t *out_capacity);

moe_status moe_info_size(const moe_config *cfg, int32_t num_tokens, size_t *out_bytes);
moe_status moe_info_bind(const moe_config *cfg, int32_t num_tokens, moe_info *info,
                                void *buffer, size_t bytes);

moe_status moe_route_workspace_size(const moe_config *cfg, int32_t num_tokens,
                                           size_t *out_bytes);
moe_status moe_route(const moe_config *cfg, const moe_weights *w,
                            const float *logits, const float *noise_logits,
                            int32_t num_tokens, moe_info *info,
                            void *workspace, size_t workspace_bytes);

moe_status moe_forward_workspace_size(const moe_config *cfg, int32_t num_tokens,
                                             size_t *out_bytes);
moe_status moe_forward(const moe_config *cfg, const moe_weights *w,
                              const float *x, int32_t num_tokens, float *y,
                              moe_info *info, void *workspace, size_t workspace_bytes);

moe_status moe_forward_alloc(const moe_config *cfg, const moe_weights *w,
                                    const float *x, int32_t num_tokens, float *y,
                                    moe_info *info);

moe_status moe_backward_workspace_size(const moe_config *cfg, int32_t num_tokens,
                                              size_t *out_bytes);
moe_status moe_backward(const moe_config *cfg, const moe_weights *w,
                               const float *x, int32_t num_tokens, const moe_info *info,
                               const float *dy, float *dx, const moe_grads *grads,
                               void *workspace, size_t workspace_bytes);
moe_status moe_backward_alloc(const moe_config *cfg, const moe_weights *w,
                                     const float *x, int32_t num_tokens, const moe_info *info,
                                     const float *dy, float *dx, const moe_grads *grads);

typedef struct moe_ep_plan {
    int32_t num_ranks;
    int32_t rank;
    int32_t num_tokens;
    int32_t token_offset;
    int32_t local_tokens;
} moe_ep_plan;

typedef struct moe_ep_pair {
    int64_t token;
    int32_t slot;
    int32_t expert;
    float   weight;
    float   priority;
} moe_ep_pair;

moe_status moe_ep_stats_count(const moe_config *cfg, int32_t *out_count);

moe_status moe_ep_workspace_size(const moe_config *cfg, const moe_ep_plan *plan,
                                        size_t *out_bytes);

moe_status moe_ep_route(const moe_config *cfg, const moe_weights *w, const moe_ep_plan *plan,
                               const float *x, moe_info *info, int32_t *send_counts, double *stats,
                               void *workspace, size_t workspace_bytes);

moe_status moe_ep_pack(const moe_config *cfg, const moe_ep_plan *plan, const float *x,
                              const moe_info *info, const int32_t *send_counts,
                              moe_ep_pair *send_pairs, float *send_rows);

moe_status moe_ep_expert_workspace_size(const moe_config *cfg, const moe_ep_plan *plan,
                                               int32_t num_recv, size_t *out_bytes);

moe_status moe_ep_expert_forward(const moe_config *cfg, const moe_weights *w,
                                        const moe_ep_plan *plan, const moe_ep_pair *pairs,
                                        const float *x, int32_t num_recv, float *out,
                                        uint8_t *dropped, float *cache_hidden, float *cache_up,
                                        void *workspace, size_t workspace_bytes);

moe_status moe_ep_combine(const moe_config *cfg, const moe_ep_plan *plan,
                                 const double *stats, const float *ret_out,
                                 const uint8_t *ret_dropped, moe_info *info, float *y,
                                 void *workspace, size_t workspace_bytes);

moe_status moe_ep_pack_backward(const moe_config *cfg, const moe_ep_plan *plan,
                                       const moe_info *info, const float *dy, float *send_dout);

moe_status moe_ep_expert_backward(const moe_config *cfg, const moe_weights *w,
                                         const moe_ep_plan *plan, const moe_ep_pair *pairs,
                                         const float *x, int32_t num_recv, const uint8_t *dropped,
                                         const float *cache_hidden, const float *cache_up,
                                         const float *dout, float *dx, const moe_grads *grads,
                                         void *workspace, size_t workspace_bytes);

moe_status moe_ep_combine_backward(const moe_config *cfg, const moe_weights *w,
                                          const moe_ep_plan *plan, const float *x,
                                          const moe_info *info, const double *stats,
                                          const float *dy, const float *ret_out,
                                          const float *ret_dx, float *dx, const moe_grads *grads,
                                          void *workspace, size_t workspace_bytes);

moe_status moe_selection_bias_update(int32_t num_experts, const int32_t *load,
                                            float gamma, float *bias);
