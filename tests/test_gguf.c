/* GGUF files: examples/gguf_moe.c (included here without its main) reads
   llama.cpp GGUF files and loads one MoE layer by llama.cpp's tensor names,
   with its routing from the file's metadata.

   Golden: tests/ref/gen_gguf.py wrote tests/ref/gguf/ with the PyPI package
   gguf's own writer (gguf.GGUFWriter):
   - <arch>_f32.gguf: the HF transformers layers of the tests/ref safetensors files
     (Mixtral as llama, Qwen2-MoE as qwen2moe, DeepSeek-V3 as deepseek2),
     renamed as llama.cpp's converter does; y_ref is HF's output. These check
     the metadata -> routing mapping against HF: 1e-5 of the largest output.
   - the quantized files: experts in Q8_0, Q4_0, Q4_K (fused gate_up) and
     MXFP4 blocks, y_ref from gguf's dequantized weights in float64 (routed as
     llama.cpp does; the generator checked that float64 layer against the HF
     files to 2e-7). The reference kernels (decode, then fp32) must give 1e-5;
     the SIMD integer dots (int8 activations) 2.5 % (measured at most 1.4 %).
   Broken files: a small valid file is built here byte by byte, recording
   where each field lies; each test breaks one field and wants its gg_status,
   an error message and nothing allocated; every truncation of it fails
   cleanly; and 2000 random mutations of two golden files either fail
   cleanly or load and run. `make check` runs this under ASan + UBSan (the
   images are exact-size heap copies, so a read past the end is reported). */
#define GGUF_MOE_NO_MAIN
#include "../examples/gguf_moe.c"
#include "moe_test.h"

#define CHECK_GG(got, want)                                                               \
    do { gg_status g_ = (got), w_ = (want);                                                \
         if (g_ != w_) moe_test_fail(__FILE__, __LINE__, "%s = %s, want %s", #got,          \
                                     gg_status_string(g_), gg_status_string(w_)); } while (0)

/* max |y - ref| / max |ref| */
static double gg_test_err(const float *y, const float *ref, size_t n) {
    double err = 0, big = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        err = fmax(err, fabs((double)y[i] - (double)ref[i]));
        big = fmax(big, fabs((double)ref[i]));
    }
    return err / (big > 0 ? big : 1);
}

typedef struct golden_want {
    const char *file, *arch;
    int layer, E, K, D, F, Fs, fused, gated, sigmoid, norm, groups, bias;
    float scale;
    uint32_t gate, up, down;            /* ggml types of the expert tensors */
} golden_want;

static void golden(const golden_want *g) {
    char path[128];
    gg_file f;
    gg_layer L;
    float *x, *yref, *y, *y2;
    int32_t T = 0, T2 = 0;
    const int quantized = g->gate != GG_TYPE_F32 || g->down != GG_TYPE_F32;
    snprintf(path, sizeof path, "ref/gguf/%s", g->file);
    if (gg_open(&f, path)) { moe_test_fail(__FILE__, __LINE__, "%s: %s", path, f.error); return; }
    if (gg_load_layer(&f, NULL, &L)) {
        moe_test_fail(__FILE__, __LINE__, "%s: %s", path, L.error);
        gg_close(&f);
        return;
    }
    CHECK(!strcmp(L.arch, g->arch));
    CHECK_INT(L.layer, g->layer);
    CHECK_INT(L.E, g->E); CHECK_INT(L.cfg.top_k, g->K); CHECK_INT(L.D, g->D);
    CHECK_INT(L.F, g->F); CHECK_INT(L.Fs, g->Fs); CHECK_INT(L.fused, g->fused);
    CHECK_INT(L.cfg.shared_expert_gated, g->gated);
    CHECK_INT(L.cfg.score, g->sigmoid ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX);
    CHECK_INT(L.cfg.normalize, g->norm ? MOE_NORM_SUM : MOE_NORM_NONE);
    CHECK_INT(L.cfg.n_group, g->groups ? g->groups : 1);
    CHECK_INT(L.cfg.selection_bias, g->bias);
    CHECK(L.cfg.routed_scale == g->scale);
    CHECK_INT(L.gate_type, g->gate); CHECK_INT(L.up_type, g->up); CHECK_INT(L.down_type, g->down);
    {   /* blocks and F32 experts are used where they lie in the file */
        char n[64];
        const gg_tensor *t;
        snprintf(n, sizeof n, "blk.%d.ffn_down_exps.weight", g->layer);
        t = gg_find(&f, n);
        CHECK(t && (g->down == GG_TYPE_F32 ? (const void *)L.w.down : L.w.down_q) == t->data);
        snprintf(n, sizeof n, "blk.%d.ffn_up_shexp.weight", g->layer);
        t = gg_find(&f, n);
        CHECK(!t || (t->type == 1 ? L.w.shared_up == L.buf[GG__SH_UP]   /* F16: widened */
                     : t->type == GG_TYPE_F32 ? (const void *)L.w.shared_up == t->data
                     : (uint32_t)L.w.shared_up_type == t->type && L.w.shared_up_q == t->data));
    }
    x = gg_read_rows(&f, "x", L.D, &T);
    yref = gg_read_rows(&f, "y_ref", L.D, &T2);
    CHECK(x && yref && T == T2 && T > 0);
    if (x && yref && T == T2) {
        const size_t n = (size_t)T * (size_t)L.D;
        moe_config c = L.cfg;
        y = (float *)malloc(n * sizeof(float));
        y2 = (float *)malloc(n * sizeof(float));
        c.isa = MOE_ISA_REFERENCE;
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, x, T, y, NULL), MOE_STATUS_OK);
        if (!(gg_test_err(y, yref, n) <= 1e-5))
            moe_test_fail(__FILE__, __LINE__, "%s reference: err %.3g", g->file,
                          gg_test_err(y, yref, n));
        c = L.cfg;
        c.num_threads = 1;
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, x, T, y, NULL), MOE_STATUS_OK);
        if (!(gg_test_err(y, yref, n) <= (quantized ? 2.5e-2 : 1e-5)))
            moe_test_fail(__FILE__, __LINE__, "%s: err %.3g", g->file, gg_test_err(y, yref, n));
        c.num_threads = 2;
        CHECK_STATUS(moe_forward_alloc(&c, &L.w, x, T, y2, NULL), MOE_STATUS_OK);
        CHECK(!memcmp(y, y2, n * sizeof(float)));
        if (quantized) {   /* with the decode layout, as an engine packs it at load time */
            moe_weights wq = L.w;
            size_t qb = 0;
            void *qp;
            CHECK_STATUS(moe_qpack_size(&L.cfg, &L.w, &qb), MOE_STATUS_OK);
            qp = malloc(qb);
            CHECK_STATUS(moe_qpack_weights(&L.cfg, &L.w, qp, qb), MOE_STATUS_OK);
            wq.qpacked = qp; wq.qpacked_bytes = qb;
            CHECK_STATUS(moe_forward_alloc(&c, &wq, x, T, y, NULL), MOE_STATUS_OK);
            if (!(gg_test_err(y, yref, n) <= 2.5e-2))
                moe_test_fail(__FILE__, __LINE__, "%s qpacked: err %.3g", g->file,
                              gg_test_err(y, yref, n));
            free(qp);
        }
        free(y); free(y2);
    }
    free(x); free(yref);
    gg_layer_free(&L);
    gg_close(&f);
}

enum { F32_ = GG_TYPE_F32, Q4_0_ = 2, Q8_0_ = 8, Q4_K_ = 12, MXFP4_ = 39 };

TEST(gguf, golden_hf_mixtral_as_llama) {
    const golden_want g = {"llama_f32.gguf", "llama", 0, 8, 2, 16, 24, 0, 0, 0, 0, 1, 0, 0,
                           1.0f, F32_, F32_, F32_};
    golden(&g);
}
TEST(gguf, golden_hf_qwen2_moe) {
    const golden_want g = {"qwen2moe_f32.gguf", "qwen2moe", 0, 6, 3, 16, 12, 20, 0, 1, 0, 0, 0, 0,
                           1.0f, F32_, F32_, F32_};
    golden(&g);
}
TEST(gguf, golden_hf_deepseek_v3_as_deepseek2) {
    const golden_want g = {"deepseek2_f32.gguf", "deepseek2", 1, 16, 4, 16, 8, 8, 0, 0, 1, 1, 4,
                           1, 2.5f, F32_, F32_, F32_};
    golden(&g);
}
TEST(gguf, golden_qwen2moe_q8_0) {
    const golden_want g = {"qwen2moe_q8_0.gguf", "qwen2moe", 0, 8, 2, 64, 32, 64, 0, 1, 0, 0, 0, 0,
                           1.0f, Q8_0_, Q8_0_, Q8_0_};
    golden(&g);
}
TEST(gguf, golden_llama_fused_q4_k_down_q4_0) {
    const golden_want g = {"llama_q4_0_q4_k.gguf", "llama", 2, 4, 2, 256, 32, 0, 1, 0, 0, 1, 0, 0,
                           1.0f, Q4_K_, Q4_K_, Q4_0_};
    golden(&g);
}
TEST(gguf, golden_deepseek2_mxfp4) {
    const golden_want g = {"deepseek2_mxfp4.gguf", "deepseek2", 1, 16, 4, 64, 32, 32, 0, 0, 1, 1,
                           4, 1, 2.5f, MXFP4_, MXFP4_, MXFP4_};
    golden(&g);
}
TEST(gguf, golden_qwen3moe_q4_0_q8_0) {
    const golden_want g = {"qwen3moe_q4_0_q8_0.gguf", "qwen3moe", 1, 8, 3, 64, 64, 0, 0, 0, 0, 1,
                           0, 0, 1.0f, Q4_0_, Q4_0_, Q8_0_};
    golden(&g);
}

/* ---------------------------------------------------------------------------
   A small valid file built here, with the position of every field recorded */

#define GB_D 32
#define GB_F 32
#define GB_E 4
#define GB_NT 4

typedef struct gb {
    unsigned char *b;
    size_t n, cap;
    size_t version, ntensors, nkv, alignment_value, used_count_value, arch_value, block_count_key;
    size_t kv_type[8];                 /* the value-type field of each key          */
    size_t name[GB_NT], ndim[GB_NT], ne[GB_NT], type[GB_NT], offset[GB_NT];
    size_t data;                       /* start of the data section                 */
    float router[GB_E * GB_D], up[GB_E * GB_F * GB_D];
    unsigned char gate_q[GB_E * GB_F * (GB_D / 32) * 34], down_q[GB_E * GB_D * (GB_F / 32) * 34];
} gb;

static void gb_bytes(gb *g, const void *p, size_t n) {
    if (g->n + n > g->cap) {
        g->cap = 2 * (g->n + n) + 64;
        g->b = (unsigned char *)realloc(g->b, g->cap);
    }
    memcpy(g->b + g->n, p, n);
    g->n += n;
}
static void gb_u32(gb *g, uint32_t v) {
    unsigned char b[4];
    int i;
    for (i = 0; i < 4; i++) b[i] = (unsigned char)(v >> 8 * i);
    gb_bytes(g, b, 4);
}
static void gb_u64(gb *g, uint64_t v) {
    unsigned char b[8];
    int i;
    for (i = 0; i < 8; i++) b[i] = (unsigned char)(v >> 8 * i);
    gb_bytes(g, b, 8);
}
static void gb_str(gb *g, const char *s) { gb_u64(g, strlen(s)); gb_bytes(g, s, strlen(s)); }
static void gb_put_u64(gb *g, size_t at, uint64_t v) {
    int i;
    for (i = 0; i < 8; i++) g->b[at + (size_t)i] = (unsigned char)(v >> 8 * i);
}
static void gb_put_u32(gb *g, size_t at, uint32_t v) {
    int i;
    for (i = 0; i < 4; i++) g->b[at + (size_t)i] = (unsigned char)(v >> 8 * i);
}

/* llama arch, E 4 K 2, D = F = 32: router F32, gate Q8_0, up F32, down Q8_0;
   keys include a string array and general.alignment = 32. */
static void gb_build(gb *g) {
    static const char *const names[GB_NT] = {
        "blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight",
        "blk.0.ffn_down_exps.weight"};
    const uint64_t ne[GB_NT][3] = {{GB_D, GB_E, 1}, {GB_D, GB_F, GB_E}, {GB_D, GB_F, GB_E},
                                   {GB_F, GB_D, GB_E}};
    const uint32_t types[GB_NT] = {0, 8, 0, 8}, ndims[GB_NT] = {2, 3, 3, 3};
    const size_t bytes[GB_NT] = {sizeof g->router, sizeof g->gate_q, sizeof g->up,
                                 sizeof g->down_q};
    const void *data[GB_NT];
    uint64_t state = 18;
    float *tmp = moe_test_fill(&state, GB_E * GB_F * GB_D, 0.2f);
    uint64_t off = 0;
    int i;
    memset(g, 0, sizeof *g);
    for (i = 0; i < GB_E * GB_D; i++) g->router[i] = moe_test_rand(&state);
    for (i = 0; i < GB_E * GB_F * GB_D; i++) g->up[i] = 0.2f * moe_test_rand(&state);
    moe_quantize(MOE_QTYPE_Q8_0, tmp, GB_E * GB_F, GB_D, g->gate_q, sizeof g->gate_q);
    moe_quantize(MOE_QTYPE_Q8_0, tmp, GB_E * GB_D, GB_F, g->down_q, sizeof g->down_q);
    free(tmp);
    data[0] = g->router; data[1] = g->gate_q; data[2] = g->up; data[3] = g->down_q;
    gb_bytes(g, "GGUF", 4);
    g->version = g->n; gb_u32(g, 3);
    g->ntensors = g->n; gb_u64(g, GB_NT);
    g->nkv = g->n; gb_u64(g, 7);
    gb_str(g, "general.architecture"); g->kv_type[0] = g->n; gb_u32(g, GG_STRING);
    g->arch_value = g->n; gb_str(g, "llama");
    gb_str(g, "llama.expert_count"); g->kv_type[1] = g->n; gb_u32(g, GG_U32); gb_u32(g, GB_E);
    gb_str(g, "llama.expert_used_count"); g->kv_type[2] = g->n; gb_u32(g, GG_U32);
    g->used_count_value = g->n; gb_u32(g, 2);
    gb_str(g, "tokenizer.ggml.tokens"); g->kv_type[3] = g->n; gb_u32(g, GG_ARRAY);
    gb_u32(g, GG_STRING); gb_u64(g, 3); gb_str(g, "a"); gb_str(g, "bc"); gb_str(g, "");
    gb_str(g, "general.alignment"); g->kv_type[4] = g->n; gb_u32(g, GG_U32);
    g->alignment_value = g->n; gb_u32(g, 32);
    gb_str(g, "llama.expert_weights_scale"); g->kv_type[5] = g->n; gb_u32(g, GG_F32);
    gb_u32(g, 0);                                        /* 0.0f: unscaled */
    gb_str(g, "llama.block_count"); g->block_count_key = g->n - 17;
    g->kv_type[6] = g->n; gb_u32(g, GG_U32); gb_u32(g, 1);
    for (i = 0; i < GB_NT; i++) {
        int d;
        g->name[i] = g->n; gb_str(g, names[i]);
        g->ndim[i] = g->n; gb_u32(g, ndims[i]);
        g->ne[i] = g->n;
        for (d = 0; d < (int)ndims[i]; d++) gb_u64(g, ne[i][d]);
        g->type[i] = g->n; gb_u32(g, types[i]);
        g->offset[i] = g->n; gb_u64(g, off);
        off += (bytes[i] + 31) / 32 * 32;
    }
    while (g->n % 32) gb_bytes(g, "", 1);
    g->data = g->n;
    for (i = 0; i < GB_NT; i++) {
        gb_bytes(g, data[i], bytes[i]);
        while ((g->n - g->data) % 32) gb_bytes(g, "\0", 1);
    }
}

/* Open an exact-size copy of g's bytes (len of them) and load its layer. */
static gg_status gb_open_load(const gb *g, size_t len, gg_status *load, char *msg, size_t cap) {
    unsigned char *copy = (unsigned char *)malloc(len ? len : 1);
    gg_file f;
    gg_layer L;
    gg_status s;
    memcpy(copy, g->b, len);
    *load = GG_ERR_ARGUMENT;
    s = gg_open_memory(&f, copy, len);
    if (s) {
        snprintf(msg, cap, "%s", f.error);
        if (!f.error[0] || f.tensors || f.kv) moe_test_fail(__FILE__, __LINE__, "unclean failure");
    } else {
        *load = gg_load_layer(&f, NULL, &L);
        snprintf(msg, cap, "%s", *load ? L.error : "");
        if (*load) {
            size_t i;
            for (i = 0; i < GG__NBUF; i++) if (L.buf[i]) moe_test_fail(__FILE__, __LINE__, "leak");
        }
        gg_layer_free(&L);
        gg_close(&f);
    }
    free(copy);
    return s;
}

TEST(gguf, built_file_matches_direct_weights) {
    gb g;
    gg_file f;
    gg_layer L;
    moe_config c;
    moe_weights w;
    float x[3 * GB_D], y[3 * GB_D], y2[3 * GB_D];
    uint64_t state = 7;
    int i;
    gb_build(&g);
    for (i = 0; i < 3 * GB_D; i++) x[i] = moe_test_rand(&state);
    CHECK_GG(gg_open_memory(&f, g.b, g.n), GG_OK);
    CHECK_GG(gg_load_layer(&f, NULL, &L), GG_OK);
    if (f.ntensors == GB_NT && L.E == GB_E) {
        CHECK_INT(f.alignment, 32);
        CHECK_INT(f.data_offset, g.data);
        CHECK(!strcmp(L.arch, "llama"));
        CHECK(L.cfg.routed_scale == 1.0f && L.cfg.normalize == MOE_NORM_SUM);
        memset(&c, 0, sizeof c);
        c.num_experts = GB_E; c.top_k = 2; c.d_model = GB_D; c.d_ff = GB_F;
        memset(&w, 0, sizeof w);
        w.router = g.router; w.up = g.up;
        w.gate_type = w.down_type = MOE_QTYPE_Q8_0;
        w.gate_q = g.gate_q; w.down_q = g.down_q;
        CHECK_STATUS(moe_forward_alloc(&c, &w, x, 3, y, NULL), MOE_STATUS_OK);
        CHECK_STATUS(moe_forward_alloc(&L.cfg, &L.w, x, 3, y2, NULL), MOE_STATUS_OK);
        CHECK(!memcmp(y, y2, sizeof y));
        CHECK(L.w.up == (const float *)(const void *)(g.b + g.data + sizeof g.router +
                                                      sizeof g.gate_q));   /* in place */
        gg_layer_free(&L);
    }
    gg_close(&f);
    free(g.b);
}

TEST(gguf, every_truncation_fails_cleanly) {
    gb g;
    size_t len;
    int truncated = 0, offsets = 0;
    gg_status load;
    char msg[320];
    gb_build(&g);
    for (len = 0; len < g.n; len++) {
        gg_status s = gb_open_load(&g, len, &load, msg, sizeof msg);
        truncated += s == GG_ERR_TRUNCATED;
        offsets += s == GG_ERR_OFFSETS;
        if (s != GG_ERR_TRUNCATED && s != GG_ERR_OFFSETS)
            moe_test_fail(__FILE__, __LINE__, "%zu of %zu bytes: %s", len, g.n,
                          gg_status_string(s));
    }
    CHECK_INT(truncated, g.data);           /* the header, to the data section */
    CHECK_INT(offsets, g.n - g.data);       /* then a tensor past the end */
    free(g.b);
}

/* One broken field: open (or load) gives `want`. */
static void broken(gb *g, gg_status want_open, gg_status want_load, int line) {
    gg_status load, s;
    char msg[320];
    s = gb_open_load(g, g->n, &load, msg, sizeof msg);
    if (s != want_open || (s == GG_OK && load != want_load))
        moe_test_fail(__FILE__, line, "open %s / load %s, want %s / %s (%s)", gg_status_string(s),
                      s ? "-" : gg_status_string(load), gg_status_string(want_open),
                      gg_status_string(want_load), msg);
    else if (!msg[0] && (want_open || want_load))
        moe_test_fail(__FILE__, line, "no message");
    free(g->b);
    gb_build(g);                                         /* fresh for the next case */
}
#define BROKEN_OPEN(g, want) broken(g, want, GG_OK, __LINE__)
#define BROKEN_LOAD(g, want) broken(g, GG_OK, want, __LINE__)

TEST(gguf, broken_header_fields) {
    gb g;
    gb_build(&g);
    BROKEN_OPEN(&g, GG_OK);                                   /* the unbroken file */
    g.b[0] = 'g';                                 BROKEN_OPEN(&g, GG_ERR_MAGIC);
    gb_put_u32(&g, g.version, 1);                 BROKEN_OPEN(&g, GG_ERR_VERSION);
    gb_put_u32(&g, g.version, 4);                 BROKEN_OPEN(&g, GG_ERR_VERSION);
    gb_put_u32(&g, g.version, 0x03000000u);       BROKEN_OPEN(&g, GG_ERR_VERSION);
    gb_put_u64(&g, g.ntensors, 1ull << 60);       BROKEN_OPEN(&g, GG_ERR_TRUNCATED);
    gb_put_u64(&g, g.nkv, UINT64_MAX);            BROKEN_OPEN(&g, GG_ERR_TRUNCATED);
    gb_put_u32(&g, g.kv_type[1], 13);             BROKEN_OPEN(&g, GG_ERR_KV);
    gb_put_u32(&g, g.kv_type[3] + 4, GG_ARRAY);   BROKEN_OPEN(&g, GG_ERR_KV);  /* nested array */
    gb_put_u64(&g, g.kv_type[3] + 8, 1ull << 62); BROKEN_OPEN(&g, GG_ERR_TRUNCATED);
    gb_put_u64(&g, g.arch_value, 1ull << 40);     BROKEN_OPEN(&g, GG_ERR_TRUNCATED);
    gb_put_u64(&g, g.kv_type[1] - 26, 0);         BROKEN_OPEN(&g, GG_ERR_KV);  /* empty key */
    gb_put_u32(&g, g.alignment_value, 0);         BROKEN_OPEN(&g, GG_ERR_ALIGNMENT);
    gb_put_u32(&g, g.alignment_value, 48);        BROKEN_OPEN(&g, GG_ERR_ALIGNMENT);
    gb_put_u32(&g, g.kv_type[4], GG_I32);         BROKEN_OPEN(&g, GG_ERR_ALIGNMENT);
    memcpy(g.b + g.block_count_key, "general.alignment", 17);  /* a key twice */
    BROKEN_OPEN(&g, GG_ERR_DUPLICATE);
    free(g.b);
}

TEST(gguf, broken_tensor_fields) {
    gb g;
    gb_build(&g);
    gb_put_u32(&g, g.ndim[1], 0);                 BROKEN_OPEN(&g, GG_ERR_TENSOR_INFO);
    gb_put_u32(&g, g.ndim[1], 5);                 BROKEN_OPEN(&g, GG_ERR_TENSOR_INFO);
    gb_put_u64(&g, g.ne[2] + 8, 1ull << 63);      BROKEN_OPEN(&g, GG_ERR_TENSOR_INFO);
    gb_put_u64(&g, g.ne[2] + 8, 1ull << 40);
    gb_put_u64(&g, g.ne[2] + 16, 1ull << 40);     BROKEN_OPEN(&g, GG_ERR_TENSOR_INFO);
    gb_put_u64(&g, g.ne[2] + 8, 1ull << 40);      BROKEN_OPEN(&g, GG_ERR_OFFSETS);
    gb_put_u64(&g, g.ne[1], 48);                  BROKEN_OPEN(&g, GG_ERR_TENSOR_INFO); /* 1.5 */
    gb_put_u32(&g, g.type[1], 4);                 BROKEN_OPEN(&g, GG_ERR_TYPE);  /* removed Q4_2 */
    gb_put_u32(&g, g.type[1], 99);                BROKEN_OPEN(&g, GG_ERR_TYPE);
    gb_put_u64(&g, g.offset[1], 512 + 4);         BROKEN_OPEN(&g, GG_ERR_ALIGNMENT);
    gb_put_u64(&g, g.offset[3], 1ull << 40);      BROKEN_OPEN(&g, GG_ERR_OFFSETS);
    gb_put_u64(&g, g.offset[3], UINT64_MAX - 31); BROKEN_OPEN(&g, GG_ERR_OFFSETS);
    gb_put_u64(&g, g.offset[2], 512);             BROKEN_OPEN(&g, GG_ERR_OFFSETS); /* overlap */
    memcpy(g.b + g.name[3] + 8 + 10, "gate", 4);  BROKEN_OPEN(&g, GG_ERR_DUPLICATE);
    g.b[g.name[2] + 8 + 3] = 0;                   BROKEN_OPEN(&g, GG_ERR_TENSOR_INFO); /* NUL */
    gb_put_u64(&g, g.name[2], 200);               BROKEN_OPEN(&g, GG_ERR_TENSOR_INFO);
    free(g.b);
}

TEST(gguf, broken_layers) {
    gb g;
    gb_build(&g);
    memcpy(g.b + g.arch_value + 8, "mamba", 5);            BROKEN_LOAD(&g, GG_ERR_UNSUPPORTED);
    gb_put_u32(&g, g.used_count_value, 0);                 BROKEN_LOAD(&g, GG_ERR_CONFIG);
    gb_put_u32(&g, g.used_count_value, 5);                 BROKEN_LOAD(&g, GG_ERR_CONFIG);
    gb_put_u32(&g, g.kv_type[2], GG_I32);
    gb_put_u32(&g, g.used_count_value, 0xFFFFFFFFu);       BROKEN_LOAD(&g, GG_ERR_CONFIG);
    gb_put_u32(&g, g.kv_type[2], GG_F32);                  BROKEN_LOAD(&g, GG_ERR_CONFIG);
    memcpy(g.b + g.kv_type[2] - 10, "xxxx", 4);            BROKEN_LOAD(&g, GG_ERR_MISSING);
    gb_put_u32(&g, g.kv_type[1] + 4, GB_E + 1);            BROKEN_LOAD(&g, GG_ERR_SHAPE_MISMATCH);
    g.b[g.name[3] + 8 + 18] = 'X';                         BROKEN_LOAD(&g, GG_ERR_MISSING);
    memcpy(g.b + g.name[2] + 8 + 18, "bias__", 6);         BROKEN_LOAD(&g, GG_ERR_UNSUPPORTED);
    gb_put_u32(&g, g.type[1], 20);   /* IQ4_NL */          BROKEN_LOAD(&g, GG_ERR_UNSUPPORTED);
    gb_put_u64(&g, g.ne[3] + 8, GB_D / 2);                 BROKEN_LOAD(&g, GG_ERR_SHAPE_MISMATCH);
    memcpy(g.b + g.name[0] + 8 + 4, "1", 1);               BROKEN_LOAD(&g, GG_ERR_MISSING);
    gb_put_u64(&g, g.ne[0] + 8, 0);                        BROKEN_LOAD(&g, GG_ERR_SHAPE_MISMATCH);
    /* a float scale that is not finite */
    gb_put_u32(&g, g.kv_type[5] + 4, 0x7FC00000u);         BROKEN_LOAD(&g, GG_ERR_CONFIG);
    free(g.b);
}

/* Random mutations of two golden files: the parser fails cleanly, or the
   layer loads (or is refused) and, when it loads, runs. */
static uint32_t gz_state;
static uint32_t gz_below(uint32_t n) {
    gz_state = gz_state * 1664525u + 1013904223u;
    return (uint32_t)(((uint64_t)(gz_state >> 8) * n) >> 24);
}

TEST(gguf, fuzz_parser_and_loader) {
    static const char *const files[2] = {"ref/gguf/qwen2moe_q8_0.gguf",
                                         "ref/gguf/llama_q4_0_q4_k.gguf"};
    static const uint64_t odd[] = {0, 1, 31, 32, 1ull << 31, 1ull << 32, 1ull << 62, 1ull << 63,
                                   UINT64_MAX, UINT64_MAX - 31};
    int counts[GG_ERR_ARGUMENT + 1] = {0}, loaded = 0, ran = 0, fi, iter, iters = 1000;
    const char *env = getenv("GG_FUZZ_ITERS");
    if (env && atoi(env) > 0) iters = atoi(env);
    gz_state = 20261206u;
    for (fi = 0; fi < 2; fi++) {
        size_t base_len, head;
        unsigned char *base = moe_test_read_file(files[fi], &base_len);
        gg_file f;
        if (!base) { moe_test_fail(__FILE__, __LINE__, "cannot read %s", files[fi]); continue; }
        if (gg_open_memory(&f, base, base_len)) {
            moe_test_fail(__FILE__, __LINE__, "%s", f.error);
            continue;
        }
        head = (size_t)f.data_offset;                  /* mutations aim at the header */
        gg_close(&f);
        for (iter = 0; iter < iters; iter++) {
            size_t len = base_len, at = gz_below((uint32_t)head);
            unsigned char *b;
            gg_layer L;
            gg_status s;
            int k;
            switch (gz_below(4)) {
            case 0: len = gz_below((uint32_t)base_len); break;              /* truncate */
            case 1: at = gz_below((uint32_t)base_len); break;               /* anywhere */
            default: break;
            }
            b = (unsigned char *)malloc(len ? len : 1);                     /* exact size */
            memcpy(b, base, len);
            if (len > 8 && at + 8 <= len) {
                if (gz_below(2)) b[at] ^= (unsigned char)(1u << gz_below(8));
                else for (k = 0; k < 8; k++)
                    b[at + (size_t)k] = (unsigned char)(odd[gz_below(10)] >> 8 * k);
            }
            s = gg_open_memory(&f, b, len);
            counts[s]++;
            if (s) {
                CHECK(f.error[0] && !f.tensors && !f.kv);
            } else {
                if (gg_load_layer(&f, NULL, &L) == GG_OK) {
                    float x[2 * 256], y[2 * 256];
                    moe_status ms;
                    loaded++;
                    for (k = 0; k < 2 * L.D && k < 512; k++) x[k] = (float)sin(k);
                    if (L.D <= 256) {
                        ms = moe_forward_alloc(&L.cfg, &L.w, x, 2, y, NULL);
                        ran += ms == MOE_STATUS_OK;
                    }
                    gg_layer_free(&L);
                }
                gg_close(&f);
            }
            free(b);
        }
        free(base);
    }
    /* the mutations reach every kind of outcome, not just one early failure */
    CHECK(counts[GG_OK] > 0 && counts[GG_ERR_TRUNCATED] > 0 && counts[GG_ERR_OFFSETS] > 0);
    CHECK(loaded > 0 && ran > 0);
}
