/* Real weights: examples/safetensors_moe.c (included here without its main)
   reads safetensors checkpoints and loads one MoE layer by its HF names.

   Golden: tests/ref/gen_safetensors.py built tiny HF transformers 5.x models
   (Mixtral with per-expert checkpoint names, Mixtral with the fused 5.x
   state_dict names, Mixtral in BF16, Qwen2-MoE with its gated shared expert,
   DeepSeek-V3 in F32 and in F16), filled one MoE layer, saved it with HF's
   own save_pretrained / state_dict names plus "x" and "y_ref" = the HF
   block's output. Each file must load through st_open / st_load_layer and
   moe_forward must reproduce y_ref to 1e-5 relative + 1e-6 absolute (the
   golden tolerance of test_golden.c: fp32 both sides, only the summation
   order differs). The BF16 / F16 files use the same tolerance on purpose:
   the generator rounded the weights to bf16 / f16 BEFORE running the fp32 HF
   module, and widening bf16 / f16 to f32 is exact, so both sides compute the
   same fp32 function of the same fp32 numbers; a looser bound would hide a
   wrong conversion (one bf16 ulp is 2^-8 relative, 400x this bound).
   Measured worst err / bound over the six files: 0.24 (reference
   kernels), 0.32 (AVX2 + FMA).

   Bad files: every malformed input gives its st_status and a message, never
   a crash; then a deterministic fuzz (2000 mutations of two golden files:
   byte and bit flips, truncation, digits spliced into the JSON, deletions,
   duplicated spans) checks the parser either fails cleanly or returns
   tensors inside the buffer, reads them, and loads and runs the layer when
   it can. `make check` runs it under ASan + UBSan, which would report any
   out-of-bounds read (the mutated image is an exact-size heap copy).     */
#define SAFETENSORS_MOE_NO_MAIN
#include "../examples/safetensors_moe.c"
#include "moe_test.h"

#define ST_RTOL 1e-5
#define ST_ATOL 1e-6

#define CHECK_STATUS_ST(got, want)                                                        \
    do { st_status g_ = (got), w_ = (want);                                                \
         if (g_ != w_) moe_test_fail(__FILE__, __LINE__, "%s = %s, want %s", #got,          \
                                     st_status_string(g_), st_status_string(w_)); } while (0)

/* A float copy of a tensor (NULL when absent or not convertible). */
static float *tensor_floats(const st_file *f, const char *name, uint64_t *numel) {
    const st_tensor *t = st_find(f, name);
    float *p;
    char err[200];
    if (!t) return NULL;
    p = (float *)malloc((size_t)t->numel * sizeof(float) + 1);
    if (p && st_read_f32(f, t, p, err, sizeof err) != ST_OK) { free(p); return NULL; }
    if (numel) *numel = t->numel;
    return p;
}

/* Load a golden checkpoint, run the layer on its x, compare with y_ref. */
static void golden_file(const char *file, const st_layer_options *o, st_model model, int fused,
                        int32_t E, int32_t F, int32_t Fs) {
    char path[128];
    st_file f;
    st_layer L;
    float *x, *yref, *y;
    uint64_t nx = 0, ny = 0;
    size_t i;
    double *want;
    st_status s;
    snprintf(path, sizeof path, "ref/%s", file);
    s = st_open(&f, path);
    if (s != ST_OK) { moe_test_fail(__FILE__, __LINE__, "%s: %s", path, f.error); return; }
    s = st_load_layer(&f, o, &L);
    if (s != ST_OK) { moe_test_fail(__FILE__, __LINE__, "%s: %s", path, L.error); st_close(&f); return; }
    CHECK_INT(L.model, model);
    CHECK_INT(L.fused, fused);
    CHECK_INT(L.E, E); CHECK_INT(L.D, 16); CHECK_INT(L.F, F); CHECK_INT(L.Fs, Fs);
    CHECK_INT(L.w.gate_up_fused, fused);
    CHECK(fused ? L.w.up == NULL : L.w.up != NULL);
    x = tensor_floats(&f, "x", &nx);
    yref = tensor_floats(&f, "y_ref", &ny);
    CHECK(x && yref && nx == ny && nx % 16 == 0);
    if (x && yref && nx == ny && nx % 16 == 0) {
        const int32_t T = (int32_t)(nx / 16);
        y = (float *)malloc((size_t)ny * sizeof(float));
        want = (double *)malloc((size_t)ny * sizeof(double));
        for (i = 0; i < ny; i++) want[i] = yref[i];
        CHECK_STATUS(moe_forward_alloc(&L.cfg, &L.w, x, T, y, NULL), MOE_STATUS_OK);
        moe_test_check_array(__FILE__, __LINE__, file, y, want, (size_t)ny, ST_ATOL, ST_RTOL);
        free(y); free(want);
    }
    free(x); free(yref);
    st_layer_free(&L);
    st_close(&f);
}

TEST(safetensors, golden_mixtral_checkpoint_names) {
    golden_file("mixtral.safetensors", NULL, ST_MODEL_MIXTRAL, 0, 8, 24, 0);
}
TEST(safetensors, golden_mixtral_fused_names) {
    golden_file("mixtral_fused.safetensors", NULL, ST_MODEL_MIXTRAL, 1, 8, 24, 0);
}
TEST(safetensors, golden_mixtral_bf16) {
    golden_file("mixtral_bf16.safetensors", NULL, ST_MODEL_MIXTRAL, 0, 8, 24, 0);
}
TEST(safetensors, golden_qwen2_moe_shared_expert) {
    golden_file("qwen2_moe.safetensors", NULL, ST_MODEL_QWEN2_MOE, 0, 6, 12, 20);
}
TEST(safetensors, golden_deepseek_v3) {
    golden_file("deepseek_v3.safetensors", NULL, ST_MODEL_DEEPSEEK_V3, 0, 16, 8, 8);
}
TEST(safetensors, golden_deepseek_v3_f16) {
    golden_file("deepseek_v3_f16.safetensors", NULL, ST_MODEL_DEEPSEEK_V3, 0, 16, 8, 8);
}

/* The golden files' BF16 / F16 weights are the rounded F32 ones of the same
   layer shape; spot-check that the file really stores the narrow dtypes. */
TEST(safetensors, golden_files_store_their_dtypes) {
    st_file f;
    const st_tensor *t;
    if (st_open(&f, "ref/mixtral_bf16.safetensors") != ST_OK) { moe_test_fail(__FILE__, __LINE__, "%s", f.error); return; }
    t = st_find(&f, "model.layers.0.block_sparse_moe.experts.3.w2.weight");
    CHECK(t && t->dtype == ST_BF16 && t->ndim == 2 && t->shape[0] == 16 && t->shape[1] == 24);
    t = st_find(&f, "x");
    CHECK(t && t->dtype == ST_F32);
    CHECK(st_meta(&f, "model_type") && !strcmp(st_meta(&f, "model_type"), "mixtral"));
    st_close(&f);
    if (st_open(&f, "ref/deepseek_v3_f16.safetensors") != ST_OK) { moe_test_fail(__FILE__, __LINE__, "%s", f.error); return; }
    t = st_find(&f, "model.layers.1.mlp.gate.e_score_correction_bias");
    CHECK(t && t->dtype == ST_F32 && t->ndim == 1 && t->shape[0] == 16);
    t = st_find(&f, "model.layers.1.mlp.shared_experts.down_proj.weight");
    CHECK(t && t->dtype == ST_F16);
    st_close(&f);
}

/* ---------------------------------------------------------------------------
   A small safetensors writer for the tests: tensors get consecutive offsets
   in the order added; raw mode writes any header text.                     */
typedef struct tb {
    char head[16384];
    size_t hlen;
    unsigned char data[65536];
    size_t dlen;
    int n;
} tb;

static void tb_init(tb *b, const char *metadata_json) {
    memset(b, 0, sizeof *b);
    b->hlen = (size_t)sprintf(b->head, "{");
    if (metadata_json) { b->hlen += (size_t)sprintf(b->head + b->hlen, "\"__metadata__\":%s", metadata_json); b->n = 1; }
}

/* Add a tensor; values (numel floats, may be NULL = 0.25 * index) are
   encoded as F32 or BF16 (truncated); other dtypes get zero bytes of esize. */
static void tb_add(tb *b, const char *name, const char *dtype, int ndim, const int64_t *shape, const float *v) {
    int64_t numel = 1, i;
    int d, es = !strcmp(dtype, "F32") || !strcmp(dtype, "I32") ? 4 : !strcmp(dtype, "F64") ? 8
              : !strcmp(dtype, "BF16") || !strcmp(dtype, "F16") ? 2 : 1;
    for (d = 0; d < ndim; d++) numel *= shape[d];
    b->hlen += (size_t)sprintf(b->head + b->hlen, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[", b->n++ ? "," : "", name, dtype);
    for (d = 0; d < ndim; d++) b->hlen += (size_t)sprintf(b->head + b->hlen, d ? ",%lld" : "%lld", (long long)shape[d]);
    b->hlen += (size_t)sprintf(b->head + b->hlen, "],\"data_offsets\":[%lu,%lu]}", (unsigned long)b->dlen,
                               (unsigned long)(b->dlen + (size_t)(numel * es)));
    for (i = 0; i < numel; i++) {
        float x = v ? v[i] : 0.25f * (float)i;
        uint32_t u;
        memcpy(&u, &x, 4);
        if (!strcmp(dtype, "F32")) { int k; for (k = 0; k < 4; k++) b->data[b->dlen++] = (unsigned char)(u >> (8 * k)); }
        else if (!strcmp(dtype, "BF16")) { b->data[b->dlen++] = (unsigned char)(u >> 16); b->data[b->dlen++] = (unsigned char)(u >> 24); }
        else { memset(b->data + b->dlen, 0, (size_t)es); b->dlen += (size_t)es; }
    }
}

/* Header text + data bytes -> an exact-size heap image. */
static unsigned char *tb_image(const char *head, size_t hlen, const unsigned char *data, size_t dlen, size_t *len) {
    unsigned char *img = (unsigned char *)malloc(8 + hlen + dlen + 1);
    int k;
    for (k = 0; k < 8; k++) img[k] = (unsigned char)((uint64_t)hlen >> (8 * k));
    memcpy(img + 8, head, hlen);
    if (dlen) memcpy(img + 8 + hlen, data, dlen);
    *len = 8 + hlen + dlen;
    return img;
}
static unsigned char *tb_finish(tb *b, size_t *len) {
    b->head[b->hlen++] = '}';
    while (b->hlen % 8) b->head[b->hlen++] = ' ';
    return tb_image(b->head, b->hlen, b->data, b->dlen, len);
}

/* Open a header given as text with dlen data bytes (0x00..); the status. */
static st_status open_raw(const char *head, size_t dlen, char *err, size_t errlen) {
    unsigned char data[256];
    size_t len, i;
    unsigned char *img;
    st_file f;
    st_status s;
    for (i = 0; i < sizeof data; i++) data[i] = (unsigned char)i;
    img = tb_image(head, strlen(head), data, dlen, &len);
    s = st_open_memory(&f, img, len);
    if (err) snprintf(err, errlen, "%s", f.error);
    if (s == ST_OK) st_close(&f);
    free(img);
    return s;
}

#define CHECK_OPEN(head, dlen, want)                                                              \
    do { char e_[320]; st_status s_ = open_raw((head), (dlen), e_, sizeof e_);                     \
         if (s_ != (want)) moe_test_fail(__FILE__, __LINE__, "%s -> %s (%s), want %s", (head),     \
                                         st_status_string(s_), e_, st_status_string(want));        \
         else if (s_ != ST_OK && !e_[0]) moe_test_fail(__FILE__, __LINE__, "%s: no message", (head)); \
    } while (0)

#define A1 "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}"

TEST(safetensors, valid_edge_cases) {
    tb b;
    unsigned char *img;
    size_t len;
    st_file f;
    const st_tensor *t;
    float v[4];
    int64_t s2[1] = {2}, s0[1] = {0};
    CHECK_OPEN("{}", 0, ST_OK);                                            /* no tensors at all */
    CHECK_OPEN("{}      ", 0, ST_OK);                                      /* space padding */
    CHECK_OPEN("{ \"a\" : " A1 " }\n\t\r ", 4, ST_OK);                     /* whitespace everywhere */
    CHECK_OPEN("{\"__metadata__\":{},\"a\":" A1 "}", 4, ST_OK);
    CHECK_OPEN("{\"a\":{\"data_offsets\":[0,4],\"shape\":[],\"dtype\":\"F32\"}}", 4, ST_OK);  /* scalar, any key order */
    CHECK_OPEN("{\"a\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[0,0]}}", 0, ST_OK); /* empty tensor */
    CHECK_OPEN("{\"a\":{\"dtype\":\"F4\",\"shape\":[4],\"data_offsets\":[0,2]}}", 2, ST_OK);   /* sub-byte, whole bytes */

    /* escapes in names, unaligned data, metadata, conversions */
    tb_init(&b, "{\"format\":\"pt\",\"k\\u00e9y\":\"v\\\"al\"}");
    tb_add(&b, "u8", "U8", 1, s2, NULL);                                 /* 2 bytes: the next tensor is unaligned */
    tb_add(&b, "we\\\"ird\\\\name\\u00e9\\ud83d\\ude00\\n", "F32", 1, s2, NULL);
    tb_add(&b, "b", "BF16", 1, s2, NULL);
    tb_add(&b, "empty", "F32", 1, s0, NULL);
    img = tb_finish(&b, &len);
    CHECK_STATUS_ST(st_open_memory(&f, img, len), ST_OK);
    CHECK_INT(f.ntensors, 4);
    t = st_find(&f, "we\"ird\\name\xc3\xa9\xf0\x9f\x98\x80\n");
    CHECK(t != NULL && t->begin == 2 && t->end == 10);
    if (t) {
        CHECK_INT(st_read_f32(&f, t, v, NULL, 0), ST_OK);
        CHECK(v[0] == 0.0f && v[1] == 0.25f);
    }
    t = st_find(&f, "b");
    if (t) { CHECK_INT(st_read_f32(&f, t, v, NULL, 0), ST_OK); CHECK(v[0] == 0.0f && v[1] == 0.25f); }
    t = st_find(&f, "empty");
    CHECK(t && t->numel == 0 && t->begin == t->end);
    CHECK(st_find(&f, "we") == NULL && st_find(&f, "") == NULL);
    CHECK(st_meta(&f, "format") && !strcmp(st_meta(&f, "format"), "pt"));
    CHECK(st_meta(&f, "k\xc3\xa9y") && !strcmp(st_meta(&f, "k\xc3\xa9y"), "v\"al"));
    t = st_find(&f, "u8");
    if (t) { char e[200]; CHECK_INT(st_read_f32(&f, t, v, e, sizeof e), ST_ERR_UNSUPPORTED); CHECK(strstr(e, "U8") != NULL); }
    st_close(&f);
    free(img);
}

TEST(safetensors, half_conversions) {
    /* f16: 1, -2, max 65504, smallest subnormal 2^-24, largest subnormal, -0, inf, -inf, NaN */
    CHECK(st_f16_to_f32(0x3C00) == 1.0f);
    CHECK(st_f16_to_f32(0xC000) == -2.0f);
    CHECK(st_f16_to_f32(0x7BFF) == 65504.0f);
    CHECK(st_f16_to_f32(0x0001) == ldexpf(1.0f, -24));
    CHECK(st_f16_to_f32(0x03FF) == ldexpf(1023.0f, -24));
    CHECK(st_f16_to_f32(0x0400) == ldexpf(1.0f, -14));
    CHECK(st_f16_to_f32(0x8000) == 0.0f && signbit(st_f16_to_f32(0x8000)));
    CHECK(isinf(st_f16_to_f32(0x7C00)) && st_f16_to_f32(0x7C00) > 0);
    CHECK(isinf(st_f16_to_f32(0xFC00)) && st_f16_to_f32(0xFC00) < 0);
    CHECK(isnan(st_f16_to_f32(0x7E00)));
    CHECK(st_f16_to_f32(0x3555) == 0.333251953125f);                  /* 2^-2 (1 + 341/1024) */
    /* bf16: the top half of an f32 */
    CHECK(st_bf16_to_f32(0x3F80) == 1.0f);
    CHECK(st_bf16_to_f32(0xC049) == -3.140625f);
    CHECK(st_bf16_to_f32(0x0001) == ldexpf(1.0f, -133));
    CHECK(isnan(st_bf16_to_f32(0x7FC0)));
}

TEST(safetensors, bad_header_length) {
    unsigned char img[16] = {0};
    st_file f;
    size_t len;
    unsigned char *big;
    CHECK_STATUS_ST(st_open_memory(&f, img, 0), ST_ERR_TRUNCATED);
    CHECK_STATUS_ST(st_open_memory(&f, img, 7), ST_ERR_TRUNCATED);
    CHECK(strstr(f.error, "8-byte") != NULL);
    CHECK_STATUS_ST(st_open_memory(&f, NULL, 0), ST_ERR_TRUNCATED);
    img[0] = 9;                                                 /* N = 9 > 8 bytes left */
    CHECK_STATUS_ST(st_open_memory(&f, img, 16), ST_ERR_HEADER_SIZE);
    memset(img, 0xFF, 8);                                       /* N = 2^64 - 1 */
    CHECK_STATUS_ST(st_open_memory(&f, img, 16), ST_ERR_HEADER_SIZE);
    memset(img, 0, 8); img[0] = 0x01; img[1] = 0xE1; img[2] = 0xF5; img[3] = 0x05;  /* 100,000,001 */
    CHECK_STATUS_ST(st_open_memory(&f, img, 16), ST_ERR_HEADER_SIZE);
    CHECK(strstr(f.error, "100,000,000") != NULL);
    memset(img, 0, 8);                                          /* N = 0: no '{' */
    CHECK_STATUS_ST(st_open_memory(&f, img, 16), ST_ERR_JSON);
    /* a real file cut at every interesting place */
    big = moe_test_read_file("ref/qwen2_moe.safetensors", &len);
    CHECK(big != NULL);
    if (big) {
        uint64_t n = 0;
        int k;
        size_t cuts[6], i;
        for (k = 7; k >= 0; k--) n = (n << 8) | big[k];
        cuts[0] = 4; cuts[1] = 8; cuts[2] = 8 + (size_t)n / 2; cuts[3] = 8 + (size_t)n;
        cuts[4] = 8 + (size_t)n + 100; cuts[5] = len - 1;
        for (i = 0; i < 6; i++) {
            unsigned char *cut = (unsigned char *)malloc(cuts[i]);
            st_status want = i == 0 ? ST_ERR_TRUNCATED : i < 3 ? ST_ERR_HEADER_SIZE : ST_ERR_OFFSETS;
            memcpy(cut, big, cuts[i]);
            CHECK_STATUS_ST(st_open_memory(&f, cut, cuts[i]), want);
            if (want == ST_ERR_OFFSETS) CHECK(strstr(f.error, "truncated") != NULL);
            free(cut);
        }
        /* the same through the stream reader (tmpfile is C99) */
        {
            FILE *fp = tmpfile();
            if (!fp) { free(big); SKIP("tmpfile() unavailable"); }
            CHECK(fwrite(big, 1, len - 3, fp) == len - 3);
            rewind(fp);
            CHECK_STATUS_ST(st_open_stream(&f, fp, "tmp"), ST_ERR_OFFSETS);
            rewind(fp);
            CHECK(fwrite(big, 1, len, fp) == len);
            rewind(fp);
            CHECK_STATUS_ST(st_open_stream(&f, fp, "tmp"), ST_OK);
            CHECK(st_find(&f, "model.layers.0.mlp.shared_expert_gate.weight") != NULL);
            st_close(&f);
            fclose(fp);
        }
        free(big);
    }
    CHECK_STATUS_ST(st_open(&f, "ref/no_such_file.safetensors"), ST_ERR_IO);
    CHECK(strstr(f.error, "no_such_file") != NULL);
}

TEST(safetensors, bad_offsets_and_layout) {
    CHECK_OPEN("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, ST_ERR_OFFSETS);   /* past the end */
    CHECK_OPEN("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 4, ST_ERR_OFFSETS);   /* begin > end */
    CHECK_OPEN("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,18446744073709551615]}}", 4, ST_ERR_OFFSETS);
    CHECK_OPEN("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, ST_ERR_SIZE);      /* 3 x 4 != 8 */
    CHECK_OPEN("{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[0,16]}}", 16, ST_ERR_SIZE);
    CHECK_OPEN("{\"a\":" A1 ",\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12, ST_ERR_LAYOUT); /* hole */
    CHECK_OPEN("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, ST_ERR_LAYOUT);   /* overlap */
    CHECK_OPEN("{\"a\":" A1 ",\"b\":" A1 "}", 4, ST_ERR_LAYOUT);                                          /* same bytes */
    CHECK_OPEN("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, ST_ERR_LAYOUT);    /* not from 0 */
    CHECK_OPEN("{\"a\":" A1 "}", 8, ST_ERR_LAYOUT);                                                       /* trailing bytes */
    CHECK_OPEN("{}", 4, ST_ERR_LAYOUT);
    CHECK_OPEN("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}}", 0, ST_ERR_BAD_SHAPE);
    CHECK_OPEN("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, ST_ERR_BAD_SHAPE);
    CHECK_OPEN("{\"a\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}", 2, ST_ERR_BAD_SHAPE);  /* 12 bits */
}

TEST(safetensors, bad_dtype_and_duplicates) {
    CHECK_OPEN("{\"a\":{\"dtype\":\"F33\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, ST_ERR_DTYPE);
    CHECK_OPEN("{\"a\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, ST_ERR_DTYPE);
    CHECK_OPEN("{\"a\":{\"dtype\":\"\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, ST_ERR_DTYPE);
    CHECK_OPEN("{\"a\":{\"dtype\":\"F32 \",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, ST_ERR_DTYPE);
    CHECK_OPEN("{\"a\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, ST_ERR_JSON);
    CHECK_OPEN("{\"a\":" A1 ",\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, ST_ERR_DUPLICATE);
    CHECK_OPEN("{\"__metadata__\":{},\"__metadata__\":{},\"a\":" A1 "}", 4, ST_ERR_DUPLICATE);
    CHECK_OPEN("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"},\"a\":" A1 "}", 4, ST_ERR_DUPLICATE);
    CHECK_OPEN("{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, ST_ERR_DUPLICATE);
}

TEST(safetensors, garbage_json) {
    static const char *const bad[] = {
        " {}", "[]", "x", "{", "}", "{\"a\"}", "{\"a\" " A1 "}", "{\"a\":" A1 ",}", "{\"a\":" A1 " x",
        "{\"a\":" A1 "}x", "{\"a\":" A1 "}}", "{,}", "{\"a\":" A1 ",,\"b\":1}", "{\"a\"::" A1 "}",
"{\"a\":null}", "{\"a\":[]}", "{\"a\":\"F32\"}", "{a:" A1 "}", "{'a':" A1 "}",
        "{\"a", "{\"a\\", "{\"a\\\"", "{\"a\\x\":" A1 "}", "{\"a\\u12\":" A1 "}", "{\"a\\udc00\":" A1 "}",
        "{\"a\\ud800\":" A1 "}", "{\"a\\ud800\\u0041\":" A1 "}", "{\"a\\u0000\":" A1 "}",
        "{\"a\x01\":" A1 "}", "{\"a\xff\":" A1 "}", "{\"a\xc0\x80\":" A1 "}", "{\"a\xed\xa0\x80\":" A1 "}",
        "{\"a\xe2\x82\":" A1 "}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1e0],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[01],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1 1],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":1,\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,99999999999999999999]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}",
        "{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"extra\":1}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},}",
        "{\"__metadata__\":{\"k\":1},\"a\":" A1 "}", "{\"__metadata__\":[],\"a\":" A1 "}",
        "{\"__metadata__\":{\"k\":\"v\",},\"a\":" A1 "}", "{\"__metadata__\":{\"k\":{}}}",
    };
    size_t i;
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char e[320];
        st_status s = open_raw(bad[i], 4, e, sizeof e);
        if (s != ST_ERR_JSON)
            moe_test_fail(__FILE__, __LINE__, "garbage #%zu '%s' -> %s (%s), want malformed JSON", i, bad[i],
                          st_status_string(s), e);
        else if (!strstr(e, "header") && !strstr(e, "tensor") && !strstr(e, "__metadata__"))
            moe_test_fail(__FILE__, __LINE__, "garbage #%zu: unhelpful message '%s'", i, e);
    }
    {   /* a NUL byte inside the header (the string literal form cannot hold it) */
        static const char h[] = "{\"a\":" A1 "} ";
        char hz[sizeof h];
        unsigned char *img;
        size_t len;
        st_file f;
        memcpy(hz, h, sizeof h);
        hz[sizeof h - 2] = '\0';
        img = tb_image(hz, sizeof h - 1, (const unsigned char *)"abcd", 4, &len);
        CHECK_STATUS_ST(st_open_memory(&f, img, len), ST_ERR_JSON);
        free(img);
    }
}

/* ---------------------------------------------------------------------------
   Layer loading: a Mixtral / Qwen2 layer written by the test writer from
   known floats, then broken one way at a time.                            */
enum { LE = 4, LD = 8, LF = 6, LFS = 5, LT = 3 };
typedef struct mini {
    float router[LE * LD], gate[LE * LF * LD], up[LE * LF * LD], down[LE * LD * LF];
    float sg[LFS * LD], su[LFS * LD], sd[LD * LFS], seg[LD], bias[LE];
} mini;

static void mini_fill(mini *m) {
    uint32_t r = 12345u;
    float *all = (float *)m;
    size_t i;
    for (i = 0; i < sizeof *m / sizeof(float); i++) {
        r = r * 1664525u + 1013904223u;
        all[i] = ((float)(r >> 8) / 16777216.0f - 0.5f) * 0.8f;
    }
}

enum { BREAK_NONE, BREAK_MISSING_EXPERT, BREAK_SHAPE, BREAK_DTYPE_I32, BREAK_DTYPE_FP8, BREAK_META,
       BREAK_SHARED_PART, BREAK_ROUTER_RANK, BREAK_EXTRA_TENSORS };

/* Mixtral names (w1/w3/w2) when qwen = 0, Qwen2-MoE names + shared expert when 1. */
static unsigned char *mini_file(const mini *m, int qwen, int brk, size_t *len) {
    tb b;
    char name[128];
    const char *P = qwen ? "model.layers.2.mlp." : "model.layers.2.block_sparse_moe.";
    int64_t sED[2] = {LE, LD}, sFD[2] = {LF, LD}, sDF[2] = {LD, LF}, sFsD[2] = {LFS, LD}, sDFs[2] = {LD, LFS};
    int64_t s1D[2] = {1, LD}, sBad[2] = {LF + 1, LD}, sE[1] = {LE * LD};
    int j;
    tb_init(&b, brk == BREAK_META ? "{\"num_experts_per_tok\":\"two\"}" : qwen ? "{\"num_experts_per_tok\":\"2\"}" : NULL);
    if (brk == BREAK_EXTRA_TENSORS) {                      /* attention and other layers: ignored */
        tb_add(&b, "model.layers.2.self_attn.q_proj.weight", "BF16", 2, sED, NULL);
        tb_add(&b, "model.layers.10.block_sparse_moe.gate.weight", "F32", 2, sED, m->router);
    }
    snprintf(name, sizeof name, "%sgate.weight", P);
    tb_add(&b, name, "F32", brk == BREAK_ROUTER_RANK ? 1 : 2, brk == BREAK_ROUTER_RANK ? sE : sED, m->router);
    for (j = 0; j < LE; j++) {
        if (!(brk == BREAK_MISSING_EXPERT && j == 2)) {
            snprintf(name, sizeof name, qwen ? "%sexperts.%d.gate_proj.weight" : "%sexperts.%d.w1.weight", P, j);
            tb_add(&b, name, "F32", 2, sFD, m->gate + j * LF * LD);
        }
        snprintf(name, sizeof name, qwen ? "%sexperts.%d.up_proj.weight" : "%sexperts.%d.w3.weight", P, j);
        tb_add(&b, name, brk == BREAK_DTYPE_I32 && j == 1 ? "I32" : "F32", 2, brk == BREAK_SHAPE && j == 3 ? sBad : sFD,
               m->up + j * LF * LD);
        snprintf(name, sizeof name, qwen ? "%sexperts.%d.down_proj.weight" : "%sexperts.%d.w2.weight", P, j);
        tb_add(&b, name, brk == BREAK_DTYPE_FP8 && j == 0 ? "F8_E4M3" : "F32", 2, sDF, m->down + j * LD * LF);
    }
    if (qwen) {
        snprintf(name, sizeof name, "%sshared_expert.gate_proj.weight", P);
        if (brk != BREAK_SHARED_PART) tb_add(&b, name, "F32", 2, sFsD, m->sg);
        snprintf(name, sizeof name, "%sshared_expert.up_proj.weight", P);
        tb_add(&b, name, "F32", 2, sFsD, m->su);
        snprintf(name, sizeof name, "%sshared_expert.down_proj.weight", P);
        tb_add(&b, name, "F32", 2, sDFs, m->sd);
        snprintf(name, sizeof name, "%sshared_expert_gate.weight", P);
        tb_add(&b, name, "F32", 2, s1D, m->seg);
    }
    return tb_finish(&b, len);
}

/* Load a built file: the status, and the error message in err. */
static st_status mini_load(const unsigned char *img, size_t len, const st_layer_options *o, st_layer *L,
                           st_file *f, char *err, size_t errlen) {
    st_status s = st_open_memory(f, img, len);
    if (s != ST_OK) { snprintf(err, errlen, "%s", f->error); return s; }
    s = st_load_layer(f, o, L);
    snprintf(err, errlen, "%s", s ? L->error : "");
    return s;
}

TEST(safetensors, layer_from_written_file_matches_direct_weights) {
    static mini m;
    int qwen;
    mini_fill(&m);
    for (qwen = 0; qwen < 2; qwen++) {
        int extra;
        for (extra = 0; extra < 2; extra++) {
            size_t len;
            unsigned char *img = mini_file(&m, qwen, extra ? BREAK_EXTRA_TENSORS : BREAK_NONE, &len);
            st_file f;
            st_layer L;
            char err[320];
            float x[LT * LD], y1[LT * LD], y2[LT * LD];
            moe_config c = qwen ? moe_preset_qwen2_moe() : moe_preset_mixtral();
            moe_weights w;
            int i;
            st_status s = mini_load(img, len, NULL, &L, &f, err, sizeof err);
            CHECK_STATUS_ST(s, ST_OK);
            if (s) { moe_test_fail(__FILE__, __LINE__, "%s", err); st_close(&f); free(img); continue; }
            CHECK_INT(L.layer, 2);       /* lowest MoE layer: 2, not 10 */
            CHECK_INT(L.model, qwen ? ST_MODEL_QWEN2_MOE : ST_MODEL_MIXTRAL);
            CHECK_INT(L.cfg.top_k, 2);
            CHECK_INT(L.Fs, qwen ? LFS : 0);
            for (i = 0; i < LT * LD; i++) x[i] = (float)((i * 7) % 11) * 0.1f - 0.5f;
            /* the same layer from the floats directly */
            c.num_experts = LE; c.top_k = 2; c.d_model = LD; c.d_ff = LF;
            c.shared_d_ff = qwen ? LFS : 0; c.shared_expert_gated = qwen;
            memset(&w, 0, sizeof w);
            w.router = m.router; w.gate = m.gate; w.up = m.up; w.down = m.down;
            if (qwen) { w.shared_gate = m.sg; w.shared_up = m.su; w.shared_down = m.sd; w.shared_expert_gate = m.seg; }
            CHECK_STATUS(moe_forward_alloc(&c, &w, x, LT, y1, NULL), MOE_STATUS_OK);
            CHECK_STATUS(moe_forward_alloc(&L.cfg, &L.w, x, LT, y2, NULL), MOE_STATUS_OK);
            CHECK(memcmp(y1, y2, sizeof y1) == 0);                  /* same floats, same config: bitwise */
            st_layer_free(&L);
            st_close(&f);
            free(img);
        }
    }
}

TEST(safetensors, layer_errors) {
    static mini m;
    static const struct { int qwen, brk; st_status want; const char *in_msg; } cases[] = {
        {0, BREAK_MISSING_EXPERT, ST_ERR_MISSING, "model.layers.2.block_sparse_moe.experts.2.w1.weight"},
        {1, BREAK_MISSING_EXPERT, ST_ERR_MISSING, "model.layers.2.mlp.experts.2.gate_proj.weight"},
        {0, BREAK_SHAPE, ST_ERR_SHAPE_MISMATCH, "experts.3.w3.weight' has shape [7, 8], expected [6, 8]"},
        {0, BREAK_DTYPE_I32, ST_ERR_UNSUPPORTED, "I32"},
        {1, BREAK_DTYPE_FP8, ST_ERR_UNSUPPORTED, "F8_E4M3"},
        {1, BREAK_META, ST_ERR_CONFIG, "num_experts_per_tok"},
        {1, BREAK_SHARED_PART, ST_ERR_MISSING, "shared_expert.gate_proj.weight"},
        {0, BREAK_ROUTER_RANK, ST_ERR_SHAPE_MISMATCH, "gate.weight' has shape [32]"},
    };
    size_t i;
    mini_fill(&m);
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t len;
        unsigned char *img = mini_file(&m, cases[i].qwen, cases[i].brk, &len);
        st_file f;
        st_layer L;
        char err[320];
        st_status s = mini_load(img, len, NULL, &L, &f, err, sizeof err);
        if (s != cases[i].want || !strstr(err, cases[i].in_msg))
            moe_test_fail(__FILE__, __LINE__, "case %zu: %s '%s', want %s with '%s'", i, st_status_string(s), err,
                          st_status_string(cases[i].want), cases[i].in_msg);
        CHECK(L.buf[0] == NULL && L.w.router == NULL);               /* nothing left allocated */
        st_close(&f);
        free(img);
    }
}

TEST(safetensors, layer_options_and_probing) {
    static mini m;
    size_t len;
    unsigned char *img;
    st_file f;
    st_layer L;
    st_layer_options o;
    char err[320];
    mini_fill(&m);
    img = mini_file(&m, 0, BREAK_NONE, &len);
    st_layer_options_default(&o);
    o.layer = 5;                                                  /* no such layer */
    CHECK_STATUS_ST(mini_load(img, len, &o, &L, &f, err, sizeof err), ST_ERR_MISSING);
    CHECK(strstr(err, "layer 5") != NULL);
    st_close(&f);
    st_layer_options_default(&o);
    o.model = ST_MODEL_QWEN2_MOE;                                 /* wrong scheme: names not found */
    CHECK_STATUS_ST(mini_load(img, len, &o, &L, &f, err, sizeof err), ST_ERR_MISSING);
    CHECK(strstr(err, "gate_proj") != NULL);
    st_close(&f);
    st_layer_options_default(&o);
    o.top_k = LE + 1;                                             /* moe.h rejects K > E */
    CHECK_STATUS_ST(mini_load(img, len, &o, &L, &f, err, sizeof err), ST_ERR_CONFIG);
    CHECK(strstr(err, "top_k") != NULL);
    st_close(&f);
    st_layer_options_default(&o);
    o.block_prefix = "model.layers.2.block_sparse_moe.";
    o.top_k = 1; o.norm_topk_prob = 0;
    CHECK_STATUS_ST(mini_load(img, len, &o, &L, &f, err, sizeof err), ST_OK);
    CHECK_INT(L.cfg.top_k, 1);
    CHECK_INT(L.cfg.normalize, MOE_NORM_NONE);
    st_layer_free(&L);
    st_close(&f);
    free(img);
    /* the golden files without their metadata: names are probed, routing
       fields come from the options (DeepSeek's preset groups do not fit E = 16) */
    {
        static const struct { const char *file; st_model model; int k, ng, tg, norm; double scale; } g[] = {
            {"mixtral_fused.safetensors", ST_MODEL_MIXTRAL, -1, -1, -1, -1, 0.0},
            {"qwen2_moe.safetensors", ST_MODEL_QWEN2_MOE, 3, -1, -1, -1, 0.0},
            {"deepseek_v3.safetensors", ST_MODEL_DEEPSEEK_V3, 4, 4, 2, 1, 2.5},
        };
        size_t i;
        for (i = 0; i < sizeof g / sizeof g[0]; i++) {
            char path[128];
            unsigned char *src, *img2;
            size_t n, k, j = 0;
            uint64_t N = 0, nx = 0;
            const char *meta;
            snprintf(path, sizeof path, "ref/%s", g[i].file);
            src = moe_test_read_file(path, &n);
            CHECK(src != NULL);
            if (!src) continue;
            for (k = 8; k-- > 0;) N = (N << 8) | src[k];
            /* blank out the "__metadata__":{...}, member (strings hold no braces here) */
            meta = strstr((const char *)src + 8, "\"__metadata__\"");
            CHECK(meta != NULL);
            img2 = (unsigned char *)malloc(n);
            memcpy(img2, src, n);
            if (meta) {
                size_t at = (size_t)((const unsigned char *)meta - src);
                for (j = at; j < 8 + N && src[j] != '}'; j++) img2[j] = ' ';
                img2[j] = ' ';
                if (img2[j + 1] == ',') img2[j + 1] = ' ';
            }
            st_layer_options_default(&o);
            o.top_k = g[i].k; o.n_group = g[i].ng; o.topk_group = g[i].tg; o.norm_topk_prob = g[i].norm;
            o.routed_scaling_factor = g[i].scale;
            if (mini_load(img2, n, &o, &L, &f, err, sizeof err) != ST_OK) {
                moe_test_fail(__FILE__, __LINE__, "%s without metadata: %s", g[i].file, err);
            } else {
                float *x = tensor_floats(&f, "x", &nx), *yr = tensor_floats(&f, "y_ref", NULL), *y;
                double *want = (double *)malloc((size_t)nx * sizeof(double));
                CHECK(f.nmeta == 0);
                CHECK_INT(L.model, g[i].model);
                y = (float *)malloc((size_t)nx * sizeof(float));
                for (k = 0; k < (size_t)nx; k++) want[k] = yr[k];
                CHECK_STATUS(moe_forward_alloc(&L.cfg, &L.w, x, (int32_t)(nx / 16), y, NULL), MOE_STATUS_OK);
                moe_test_check_array(__FILE__, __LINE__, g[i].file, y, want, (size_t)nx, ST_ATOL, ST_RTOL);
                free(x); free(yr); free(y); free(want);
                st_layer_free(&L);
            }
            st_close(&f);
            free(img2); free(src);
        }
    }
}

/* ---------------------------------------------------------------------------
   Fuzz: deterministic mutations of two golden files. Each case stacks one to
   three mutations; the ones that change the header's length keep the 8-byte
   length field in step, so the parser gets past the length check and into
   the JSON and the layout checks.                                         */
static uint64_t fz_state;
static uint32_t fz_next(void) {
    fz_state = fz_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(fz_state >> 33);
}
static uint32_t fz_below(uint32_t n) { return n ? fz_next() % n : 0; }

static uint64_t fz_hlen(const unsigned char *b, size_t len) {
    uint64_t n = 0;
    int k;
    if (len < 8) return 0;
    for (k = 7; k >= 0; k--) n = (n << 8) | b[k];
    return n;
}
static void fz_set_hlen(unsigned char *b, uint64_t n) { int k; for (k = 0; k < 8; k++) b[k] = (unsigned char)(n >> (8 * k)); }

/* Insert (del = 0) or delete (del > 0) bytes at pos inside the header; keeps N in step. */
static unsigned char *fz_splice(unsigned char *b, size_t *len, size_t pos, const char *ins, size_t nins, size_t del) {
    unsigned char *o;
    uint64_t N = fz_hlen(b, *len);
    if (*len < 8 || pos < 8 || pos > *len || del > *len - pos) return b;
    o = (unsigned char *)malloc(*len - del + nins + 1);
    memcpy(o, b, pos);
    memcpy(o + pos, ins, nins);
    memcpy(o + pos + nins, b + pos + del, *len - pos - del);
    if (N >= del && pos < 8 + N) fz_set_hlen(o, N - del + nins);
    *len = *len - del + nins;
    free(b);
    return o;
}

static unsigned char *fz_mutate(unsigned char *b, size_t *len) {
    size_t N = (size_t)fz_hlen(b, *len), hend = *len >= 8 && N <= *len - 8 ? 8 + N : *len;
    size_t hpos = 8 + fz_below((uint32_t)(hend > 8 ? hend - 8 : 1));           /* a header byte */
    switch (fz_below(9)) {
    case 0: if (hpos < *len) b[hpos] = (unsigned char)fz_next(); break;         /* random header byte */
    case 1: if (*len) b[fz_below((uint32_t)*len)] ^= (unsigned char)(1u << fz_below(8)); break;  /* any bit */
    case 2: b[fz_below(8) % (*len ? *len : 1)] ^= (unsigned char)(1u << fz_below(8)); break;      /* length bits */
    case 3: *len = fz_below((uint32_t)*len + 1); break;                          /* truncate */
    case 4: {                                                                    /* change a digit */
        size_t k, start = hpos;
        for (k = 0; k < 64 && start + k < hend; k++)
            if (b[start + k] >= '0' && b[start + k] <= '9') { b[start + k] = (unsigned char)('0' + fz_below(10)); break; }
        break;
    }
    case 5: {                                                                    /* splice digits in */
        char d[4];
        size_t n = 1 + fz_below(3), k;
        for (k = 0; k < n; k++) d[k] = (char)('0' + fz_below(10));
        b = fz_splice(b, len, hpos, d, n, 0);
        break;
    }
    case 6: {                                                                    /* a JSON token in */
        static const char tok[] = "{}[]\":,\\ -.eu0";
        char c = tok[fz_below(sizeof tok - 1)];
        b = fz_splice(b, len, hpos, &c, 1, 0);
        break;
    }
    case 7: if (hpos < hend) b = fz_splice(b, len, hpos, "", 0, 1 + fz_below((uint32_t)(hend - hpos < 8 ? hend - hpos : 8))); break;
    default: {                                                                   /* duplicate a span */
        char span[24];
        size_t n = 1 + fz_below(24);
        if (hpos + n > hend) break;
        memcpy(span, b + hpos, n);
        b = fz_splice(b, len, 8 + fz_below((uint32_t)(hend - 8)), span, n, 0);
        break;
    }
    }
    return b;
}

TEST(safetensors, fuzz_parser) {
    static const char *const files[2] = {"ref/mixtral_bf16.safetensors", "ref/deepseek_v3_f16.safetensors"};
    int counts[ST_ERR_ARGUMENT + 1] = {0}, loaded = 0, distinct = 0, fi, iter, k, iters = 1000;
    const char *env = getenv("ST_FUZZ_ITERS");          /* longer runs by hand: mutations per file */
    if (env && atoi(env) > 0) iters = atoi(env);
    fz_state = 20261123u;
    for (fi = 0; fi < 2; fi++) {
        size_t base_len;
        unsigned char *base = moe_test_read_file(files[fi], &base_len);
        if (!base) { moe_test_fail(__FILE__, __LINE__, "cannot read %s", files[fi]); continue; }
        for (iter = 0; iter < iters; iter++) {
            size_t len = base_len;
            unsigned char *b = (unsigned char *)malloc(len);
            int n = 1 + (int)fz_below(3);
            st_file f;
            st_status s;
            memcpy(b, base, len);
            for (k = 0; k < n; k++) b = fz_mutate(b, &len);
            {   /* exact-size copy: ASan sees any read past the end */
                unsigned char *exact = (unsigned char *)malloc(len ? len : 1);
                if (len) memcpy(exact, b, len);
                free(b);
                b = exact;
            }
            s = st_open_memory(&f, b, len);
            if ((int)s < 0 || (int)s > ST_ERR_ARGUMENT) { moe_test_fail(__FILE__, __LINE__, "status %d", (int)s); free(b); continue; }
            counts[s]++;
            if (s != ST_OK) {
                CHECK(f.error[0] != '\0' && f.tensors == NULL && f.ntensors == 0);
            } else {
                uint64_t covered = 0;
                int i;
                st_layer L;
                CHECK(f.data >= b + 8 && f.data + f.data_size == b + len);
                for (i = 0; i < f.ntensors; i++) {
                    const st_tensor *t = &f.tensors[i];
                    float *v;
                    char e[200];
                    CHECK(t->begin <= t->end && t->end <= f.data_size);
                    covered += t->end - t->begin;
                    CHECK(st_find(&f, t->name) == t);
                    if (t->numel > 100000) continue;
                    v = (float *)malloc((size_t)t->numel * sizeof(float) + 1);
                    s = st_read_f32(&f, t, v, e, sizeof e);
                    CHECK(s == ST_OK || s == ST_ERR_UNSUPPORTED);
                    free(v);
                }
                CHECK(covered == f.data_size);
                if (st_load_layer(&f, NULL, &L) == ST_OK) {
                    float x[2 * 64], y[2 * 64];
                    moe_status ms;
                    loaded++;
                    if (L.D <= 64) {
                        for (i = 0; i < 2 * L.D; i++) x[i] = 0.01f * (float)i;
                        ms = moe_forward_alloc(&L.cfg, &L.w, x, 2, y, NULL);
                        CHECK(ms == MOE_STATUS_OK || ms == MOE_STATUS_NONFINITE);
                    }
                    st_layer_free(&L);
                }
                st_close(&f);
            }
            free(b);
        }
        free(base);
    }
    for (k = 0; k <= ST_ERR_ARGUMENT; k++) distinct += counts[k] > 0;
    /* the mutations must reach past the length check into JSON and layout */
    CHECK(counts[ST_OK] > 20 && loaded > 10);
    CHECK(counts[ST_ERR_JSON] > 50 && counts[ST_ERR_HEADER_SIZE] > 20);
    CHECK(counts[ST_ERR_OFFSETS] + counts[ST_ERR_SIZE] + counts[ST_ERR_LAYOUT] > 20);
    CHECK(distinct >= 7);
    if (getenv("ST_FUZZ_VERBOSE")) {
        for (k = 0; k <= ST_ERR_ARGUMENT; k++)
            if (counts[k]) printf("  fuzz: %5d x %s\n", counts[k], st_status_string((st_status)k));
        printf("  fuzz: %d layers loaded and run\n", loaded);
    }
}

/* ===========================================================================
   Checkpoint directories: config.json, shards (suite "checkpoint").

   Golden: tests/ref/gen_checkpoints.py wrote tiny save_pretrained directories
   of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3 (that one in two
   shards, its MoE layer split between them), with configs whose routing is
   not moe.h's presets (K, norm_topk_prob, groups, scale, dense layers), and
   io.safetensors = x and the HF block's y_ref. st_checkpoint_open must read
   the routing from config.json and match y_ref to the golden tolerance.
   Bad configs and indexes go through st_checkpoint_init with shards held in
   memory; each must give its status, never a default.                       */

typedef struct ck_case {
    const char *dir;
    st_model model;
    int layer, E, K, F, Fs, norm, n_group, topk_group;
    double scale;
} ck_case;

static const ck_case ck_cases[] = {
    {"mixtral", ST_MODEL_MIXTRAL, 0, 4, 2, 24, 0, 1, 1, 1, 1.0},
    {"qwen2_moe", ST_MODEL_QWEN2_MOE, 1, 6, 3, 12, 20, 0, 1, 1, 1.0},
    {"qwen3_moe", ST_MODEL_QWEN3_MOE, 1, 8, 3, 12, 0, 1, 1, 1, 1.0},
    {"olmoe", ST_MODEL_OLMOE, 0, 6, 3, 12, 0, 0, 1, 1, 1.0},
    {"deepseek_v3", ST_MODEL_DEEPSEEK_V3, 1, 16, 4, 8, 16, 1, 4, 2, 1.7},
};

/* Run L on the directory's io.safetensors x; *worst = max err / tolerance. */
static int ck_run(const char *dir, const st_layer *L, int threads, float **y_out, double *worst) {
    char path[160];
    st_file io;
    float *x, *yref, *y;
    uint64_t nx = 0, ny = 0;
    moe_config cfg = L->cfg;
    size_t i;
    int ok;
    snprintf(path, sizeof path, "ref/ckpt/%s/io.safetensors", dir);
    if (st_open(&io, path) != ST_OK) { moe_test_fail(__FILE__, __LINE__, "%s: %s", path, io.error); return 0; }
    x = tensor_floats(&io, "x", &nx);
    yref = tensor_floats(&io, "y_ref", &ny);
    ok = x && yref && nx == ny && L->D > 0 && nx % (uint64_t)L->D == 0;
    CHECK(ok);
    y = (float *)malloc((size_t)ny * sizeof(float) + 1);
    *worst = 0.0;
    cfg.num_threads = threads;
    if (ok) {
        CHECK_STATUS(moe_forward_alloc(&cfg, &L->w, x, (int32_t)(nx / (uint64_t)L->D), y, NULL), MOE_STATUS_OK);
        for (i = 0; i < (size_t)ny; i++) {
            double e = fabs((double)y[i] - yref[i]) / (ST_ATOL + ST_RTOL * fabs((double)yref[i]));
            if (e > *worst) *worst = e;
        }
    }
    if (y_out) *y_out = y; else free(y);
    free(x); free(yref);
    st_close(&io);
    return ok;
}

TEST(checkpoint, golden_directories_route_from_config_json) {
    size_t c;
    for (c = 0; c < sizeof ck_cases / sizeof ck_cases[0]; c++) {
        const ck_case *g = &ck_cases[c];
        char path[160];
        st_checkpoint ck;
        st_layer L;
        float *y1 = NULL, *y2 = NULL;
        double worst = 0.0, worst2 = 0.0;
        snprintf(path, sizeof path, "ref/ckpt/%s", g->dir);
        if (st_checkpoint_open(&ck, path) != ST_OK) { moe_test_fail(__FILE__, __LINE__, "%s: %s", path, ck.error); continue; }
        CHECK(ck.has_config);
        CHECK_INT(ck.nshards, g->model == ST_MODEL_DEEPSEEK_V3 ? 2 : 1);
        if (st_load_checkpoint_layer(&ck, NULL, &L) != ST_OK) {
            moe_test_fail(__FILE__, __LINE__, "%s: %s", path, L.error);
            st_checkpoint_close(&ck);
            continue;
        }
        CHECK(!strcmp(L.routing_from, "config.json"));
        CHECK_INT(L.model, g->model);
        CHECK_INT(L.layer, g->layer);             /* the first MoE layer, after the dense ones */
        CHECK_INT(L.E, g->E); CHECK_INT(L.cfg.top_k, g->K); CHECK_INT(L.F, g->F); CHECK_INT(L.Fs, g->Fs);
        CHECK_INT(L.cfg.normalize, g->norm ? MOE_NORM_SUM : MOE_NORM_NONE);
        CHECK_INT(L.cfg.n_group, g->n_group); CHECK_INT(L.cfg.topk_group, g->topk_group);
        CHECK_NEAR(L.cfg.routed_scale, g->scale, 0, 1e-7);
        if (ck_run(g->dir, &L, 1, &y1, &worst) && ck_run(g->dir, &L, 2, &y2, &worst2)) {
            if (worst > 1.0) moe_test_fail(__FILE__, __LINE__, "%s: err / tolerance %.3f", g->dir, worst);
            CHECK(memcmp(y1, y2, (size_t)L.D * sizeof(float)) == 0);    /* 1 and 2 threads */
        }
        free(y1); free(y2);
        st_layer_free(&L);
        st_checkpoint_close(&ck);
    }
}

/* The failures the issue found: without config.json (the lone shard, the
   moe.h preset) Qwen3-MoE and DeepSeek-V3 miss HF; the same shard read as a
   checkpoint matches. And the command line still overrides config.json. */
TEST(checkpoint, config_json_is_what_makes_them_match) {
    st_checkpoint ck;
    st_file f;
    st_layer L;
    st_layer_options o;
    double worst = 0.0;
    /* Qwen3: the preset's renormalisation happens to be right, the shard alone
       has no dense-layer knowledge, so force what an old loader did: K 3 from
       the shapes is unknown, and the preset's K 8 does not fit E 8 x top-3 */
    CHECK_STATUS_ST(st_open(&f, "ref/ckpt/qwen3_moe/model.safetensors"), ST_OK);
    st_layer_options_default(&o);
    o.model = ST_MODEL_QWEN3_MOE;
    o.norm_topk_prob = 0;                         /* Qwen3MoeConfig's class default */
    o.top_k = 3;
    if (st_load_layer(&f, &o, &L) == ST_OK) {
        CHECK(!strcmp(L.routing_from, "preset"));
        if (ck_run("qwen3_moe", &L, 1, NULL, &worst)) CHECK(worst > 100.0);
        st_layer_free(&L);
    } else moe_test_fail(__FILE__, __LINE__, "%s", L.error);
    st_close(&f);
    /* DeepSeek-V3 in shards: no single file holds the layer */
    CHECK_STATUS_ST(st_open(&f, "ref/ckpt/deepseek_v3/model-00001-of-00002.safetensors"), ST_OK);
    CHECK_STATUS_ST(st_load_layer(&f, NULL, &L), ST_ERR_MISSING);
    st_close(&f);
    /* the checkpoint with the preset's groups and scale (what the old loader ran) */
    CHECK_STATUS_ST(st_checkpoint_open(&ck, "ref/ckpt/deepseek_v3"), ST_OK);
    st_layer_options_default(&o);
    o.n_group = 8; o.topk_group = 4; o.routed_scaling_factor = 2.5;
    if (st_load_checkpoint_layer(&ck, &o, &L) == ST_OK) {
        CHECK_INT(L.cfg.n_group, 8); CHECK_INT(L.cfg.topk_group, 4);
        if (ck_run("deepseek_v3", &L, 1, NULL, &worst)) CHECK(worst > 100.0);
        st_layer_free(&L);
    } else moe_test_fail(__FILE__, __LINE__, "%s", L.error);
    st_checkpoint_close(&ck);
    /* an override wins over config.json */
    CHECK_STATUS_ST(st_checkpoint_open(&ck, "ref/ckpt/qwen3_moe"), ST_OK);
    st_layer_options_default(&o);
    o.norm_topk_prob = 0; o.top_k = 2;
    if (st_load_checkpoint_layer(&ck, &o, &L) == ST_OK) {
        CHECK_INT(L.cfg.top_k, 2);
        CHECK_INT(L.cfg.normalize, MOE_NORM_NONE);
        st_layer_free(&L);
    } else moe_test_fail(__FILE__, __LINE__, "%s", L.error);
    st_checkpoint_close(&ck);
}

TEST(checkpoint, files_are_mapped) {
#ifdef ST_HAVE_MMAP
    st_file f;
    CHECK_STATUS_ST(st_open(&f, "ref/ckpt/olmoe/model.safetensors"), ST_OK);
    CHECK(f.mapped != NULL && f.owned == NULL && f.data == (const unsigned char *)f.mapped + 8 + f.header_size);
    st_close(&f);
    CHECK(f.mapped == NULL);
#else
    SKIP("no mmap on this system: st_open reads the file");
#endif
}

/* --- bad configs and indexes, with shards held in memory ------------------ */

typedef struct ck_mem {
    int n;
    const char *names[4];
    unsigned char *bytes[4];
    size_t len[4];
} ck_mem;

static st_status ck_mem_open(void *user, const char *shard, st_file *out) {
    const ck_mem *m = (const ck_mem *)user;
    int i;
    for (i = 0; i < m->n; i++) if (!strcmp(m->names[i], shard)) return st_open_memory(out, m->bytes[i], m->len[i]);
    memset(out, 0, sizeof *out);
    snprintf(out->error, sizeof out->error, "no such file");
    return ST_ERR_IO;
}

/* A copy of config.json text with key set to value (a JSON text), added
   after '{' when absent, or removed when value is NULL. Keys are on their
   own lines in save_pretrained's output. */
static char *ck_edit(const char *text, const char *key, const char *value) {
    char pat[96], *out = (char *)malloc(strlen(text) + (value ? strlen(value) : 0) + strlen(key) + 16);
    const char *at, *eol;
    snprintf(pat, sizeof pat, "\n  \"%s\": ", key);
    at = strstr(text, pat);
    if (!at) {                                       /* insert as the first member */
        const char *brace = strchr(text, '{');
        size_t pre = (size_t)(brace - text) + 1;
        memcpy(out, text, pre);
        sprintf(out + pre, "\n  \"%s\": %s,%s", key, value ? value : "null", brace + 1);
        return out;
    }
    eol = strchr(at + 1, '\n');
    if (eol[-1] == '[' || eol[-1] == '{')                /* a list or object over several lines */
        eol = strchr(strstr(eol, eol[-1] == '[' ? "\n  ]" : "\n  }") + 1, '\n');
    memcpy(out, text, (size_t)(at - text));
    if (value) {
        int comma = eol[-1] == ',';
        sprintf(out + (at - text), "%s%s%s%s", pat, value, comma ? "," : "", eol);
    } else {
        strcpy(out + (at - text), eol);
    }
    return out;
}

/* Load dir's first MoE layer with config text cfg_text (its own when NULL),
   shards from memory; returns the status, the message in err, and the
   resolved config in *cfg_out. */
static st_status ck_load_text_cfg(const char *dir, const char *cfg_text, const char *index_text,
                                  const st_layer_options *o, char *err, size_t errlen, moe_config *cfg_out) {
    char path[160];
    ck_mem m;
    st_checkpoint ck;
    st_layer L;
    st_status s;
    int i, sharded = !strcmp(dir, "deepseek_v3");
    char *own_cfg = NULL, *own_index = NULL;
    size_t cfg_len = cfg_text ? strlen(cfg_text) : 0, index_len = index_text ? strlen(index_text) : 0;
    memset(&m, 0, sizeof m);
    m.n = sharded ? 2 : 1;
    m.names[0] = sharded ? "model-00001-of-00002.safetensors" : "model.safetensors";
    m.names[1] = "model-00002-of-00002.safetensors";
    for (i = 0; i < m.n; i++) {
        snprintf(path, sizeof path, "ref/ckpt/%s/%s", dir, m.names[i]);
        m.bytes[i] = moe_test_read_file(path, &m.len[i]);
    }
    if (!cfg_text) {
        snprintf(path, sizeof path, "ref/ckpt/%s/config.json", dir);
        cfg_text = own_cfg = (char *)moe_test_read_file(path, &cfg_len);
    }
    if (!index_text && sharded) {
        snprintf(path, sizeof path, "ref/ckpt/%s/model.safetensors.index.json", dir);
        index_text = own_index = (char *)moe_test_read_file(path, &index_len);
    }
    s = st_checkpoint_init(&ck, cfg_text, cfg_len, index_text, index_len, m.names[0], ck_mem_open, &m);
    if (s == ST_OK) {
        s = st_load_checkpoint_layer(&ck, o, &L);
        snprintf(err, errlen, "%s", L.error);
        if (s == ST_OK && cfg_out) *cfg_out = L.cfg;
        if (s == ST_OK) st_layer_free(&L);
        st_checkpoint_close(&ck);
    } else snprintf(err, errlen, "%s", ck.error);
    for (i = 0; i < m.n; i++) free(m.bytes[i]);
    free(own_cfg); free(own_index);
    return s;
}
static st_status ck_load_text(const char *dir, const char *cfg_text, const char *index_text,
                              const st_layer_options *o, char *err, size_t errlen) {
    return ck_load_text_cfg(dir, cfg_text, index_text, o, err, errlen, NULL);
}

static char *ck_config(const char *dir) {
    char path[160];
    size_t n;
    char *t;
    snprintf(path, sizeof path, "ref/ckpt/%s/config.json", dir);
    t = (char *)moe_test_read_file(path, &n);
    if (t) { t = (char *)realloc(t, n + 1); t[n] = '\0'; }
    return t;
}

TEST(checkpoint, config_errors_are_named) {
    static const struct { const char *dir, *key, *value; st_status want; const char *says; } e[] = {
        /* keys that may change the routing and that transformers does not read for the model */
        {"mixtral", "norm_topk_prob", "true", ST_ERR_CONFIG, "norm_topk_prob"},
        {"qwen3_moe", "router_z_loss_coef", "0.001", ST_ERR_CONFIG, "--allow-key"},
        {"olmoe", "moe_capacity_factor", "1.25", ST_ERR_CONFIG, "moe_capacity_factor"},
        /* wrong types and ranges */
        {"mixtral", "num_experts_per_tok", "\"2\"", ST_ERR_CONFIG, "integer"},
        {"mixtral", "num_experts_per_tok", "2.5", ST_ERR_CONFIG, "integer"},
        {"mixtral", "num_experts_per_tok", "0", ST_ERR_CONFIG, "integer"},
        {"mixtral", "num_experts_per_tok", "5", ST_ERR_CONFIG, "top_k"},     /* K > E: moe.h */
        {"qwen3_moe", "norm_topk_prob", "1", ST_ERR_CONFIG, "true or false"},
        {"deepseek_v3", "routed_scaling_factor", "-1", ST_ERR_CONFIG, "positive"},
        {"deepseek_v3", "n_group", "3", ST_ERR_CONFIG, "n_group"},           /* 16 experts in 3 groups */
        /* the config and the tensors disagree */
        {"mixtral", "num_local_experts", "8", ST_ERR_SHAPE_MISMATCH, "num_local_experts"},
        {"qwen3_moe", "num_experts", "4", ST_ERR_CONFIG, "alias"},           /* beside num_local_experts 8 */
        {"olmoe", "hidden_size", "32", ST_ERR_SHAPE_MISMATCH, "hidden_size"},
        {"qwen2_moe", "shared_expert_intermediate_size", "24", ST_ERR_SHAPE_MISMATCH, "shared expert"},
        {"qwen2_moe", "shared_expert_intermediate_size", NULL, ST_ERR_SHAPE_MISMATCH, "default"},
        {"deepseek_v3", "n_shared_experts", "1", ST_ERR_SHAPE_MISMATCH, "n_shared_experts"},
        /* what the model cannot be here */
        {"mixtral", "hidden_act", "\"gelu\"", ST_ERR_UNSUPPORTED, "hidden_act"},
        {"mixtral", "quantization_config", "{\"quant_method\": \"fp8\"}", ST_ERR_UNSUPPORTED, "quantiz"},
        {"mixtral", "model_type", "\"llama4\"", ST_ERR_UNSUPPORTED, "llama4"},
        {"mixtral", "model_type", NULL, ST_ERR_CONFIG, "model_type"},
        {"deepseek_v3", "scoring_func", "\"softmax\"", ST_ERR_UNSUPPORTED, "sigmoid"},
        {"deepseek_v3", "topk_method", "\"group_limited_greedy\"", ST_ERR_UNSUPPORTED, "noaux_tc"},
        {"deepseek_v3", "moe_layer_freq", "2", ST_ERR_UNSUPPORTED, "moe_layer_freq"},
        /* the layer is dense in this model */
        {"qwen3_moe", "mlp_only_layers", "[0, 1]", ST_ERR_CONFIG, "mlp_only_layers"},
        {"qwen3_moe", "mlp_only_layers", "[\"0\"]", ST_ERR_CONFIG, "list of integers"},
        {"qwen2_moe", "decoder_sparse_step", "3", ST_ERR_CONFIG, "decoder_sparse_step"},
        {"deepseek_v3", "first_k_dense_replace", "2", ST_ERR_CONFIG, "first_k_dense_replace"},
        {"olmoe", "num_hidden_layers", "0", ST_ERR_CONFIG, "num_hidden_layers"},
        /* keys that cannot change the block are read past */
        {"olmoe", "rope_theta", "[1, {\"a\": [null, false]}]", ST_OK, ""},
        {"qwen2_moe", "attention_dropout", "0.5e-1", ST_OK, ""},
    };
    size_t i;
    for (i = 0; i < sizeof e / sizeof e[0]; i++) {
        char *base = ck_config(e[i].dir), *text, err[ST__ERRLEN];
        st_status s;
        if (!base) { moe_test_fail(__FILE__, __LINE__, "no config for %s", e[i].dir); continue; }
        text = ck_edit(base, e[i].key, e[i].value);
        s = ck_load_text(e[i].dir, text, NULL, NULL, err, sizeof err);
        if (s != e[i].want || !strstr(err, e[i].says))
            moe_test_fail(__FILE__, __LINE__, "%s with %s = %s: %s (\"%s\"), want %s mentioning \"%s\"", e[i].dir,
                          e[i].key, e[i].value ? e[i].value : "(removed)", st_status_string(s), err,
                          st_status_string(e[i].want), e[i].says);
        free(text); free(base);
    }
}

TEST(checkpoint, options_against_config) {
    st_layer_options o;
    char err[ST__ERRLEN], *base = ck_config("qwen3_moe"), *text;
    CHECK(base != NULL);
    if (!base) return;
    st_layer_options_default(&o);
    o.model = ST_MODEL_QWEN2_MOE;                                 /* disagrees with model_type */
    CHECK_STATUS_ST(ck_load_text("qwen3_moe", NULL, NULL, &o, err, sizeof err), ST_ERR_CONFIG);
    CHECK(strstr(err, "--model") != NULL);
    st_layer_options_default(&o);
    o.n_group = 2;                                                /* a DeepSeek field */
    CHECK_STATUS_ST(ck_load_text("qwen3_moe", NULL, NULL, &o, err, sizeof err), ST_ERR_CONFIG);
    st_layer_options_default(&o);
    o.layer = 0;                                                  /* dense: mlp_only_layers [0] */
    CHECK_STATUS_ST(ck_load_text("qwen3_moe", NULL, NULL, &o, err, sizeof err), ST_ERR_MISSING);
    /* an unknown routing key, accepted unread by name */
    text = ck_edit(base, "router_z_loss_coef", "0.001");
    st_layer_options_default(&o);
    CHECK_STATUS_ST(ck_load_text("qwen3_moe", text, NULL, &o, err, sizeof err), ST_ERR_CONFIG);
    o.allow_keys = "seq_aux,router_z_loss_coef";
    CHECK_STATUS_ST(ck_load_text("qwen3_moe", text, NULL, &o, err, sizeof err), ST_OK);
    o.allow_keys = "router_z_loss";                               /* whole names only */
    CHECK_STATUS_ST(ck_load_text("qwen3_moe", text, NULL, &o, err, sizeof err), ST_ERR_CONFIG);
    free(text); free(base);
    /* absent keys take transformers' class defaults, not moe.h's presets */
    {
        static const struct { const char *dir, *key; int k, norm, ng; double scale; } d[] = {
            {"qwen3_moe", "norm_topk_prob", 3, 0, 1, 1.0},       /* Qwen3MoeConfig: false */
            {"qwen3_moe", "num_experts_per_tok", 8, 1, 1, 1.0},
            {"qwen2_moe", "norm_topk_prob", 3, 0, 1, 1.0},
            {"deepseek_v3", "n_group", 4, 1, 8, 1.7},
            {"deepseek_v3", "norm_topk_prob", 4, 1, 4, 1.7},     /* DeepseekV3Config: true */
            {"deepseek_v3", "routed_scaling_factor", 4, 1, 4, 2.5},
        };
        size_t i;
        for (i = 0; i < sizeof d / sizeof d[0]; i++) {
            moe_config got;
            base = ck_config(d[i].dir);
            text = ck_edit(base, d[i].key, NULL);
            memset(&got, 0, sizeof got);
            if (ck_load_text_cfg(d[i].dir, text, NULL, NULL, err, sizeof err, &got) != ST_OK) {
                moe_test_fail(__FILE__, __LINE__, "%s without %s: %s", d[i].dir, d[i].key, err);
            } else {
                CHECK_INT(got.top_k, d[i].k);
                CHECK_INT(got.normalize, d[i].norm ? MOE_NORM_SUM : MOE_NORM_NONE);
                CHECK_INT(got.n_group, d[i].ng);
                CHECK_NEAR(got.routed_scale, d[i].scale, 0, 1e-7);
            }
            free(text); free(base);
        }
    }
}

TEST(checkpoint, broken_json_and_indexes) {
    static const char *const bad_json[] = {
        "", "[]", "{", "{\"a\": 1", "{\"a\" 1}", "{\"a\": 01}", "{\"a\": -}", "{\"a\": 1.}", "{\"a\": 1e}",
        "{\"a\": tru}", "{\"a\": nul}", "{\"a\": [1,]}", "{\"a\": {\"b\"}}", "{\"a\": 1} x", "{\"a\": 1e999}",
        "{\"a\": \"\\x\"}", "{\"a\": 1, \"a\": 2}",
    };
    static const struct { const char *index; st_status want; const char *says; } bi[] = {
        {"{\"metadata\": {}}", ST_ERR_JSON, "weight_map"},
        {"{\"weight_map\": {}}", ST_ERR_JSON, "empty"},
        {"{\"weight_map\": {\"a\": 1}}", ST_ERR_JSON, "file name"},
        {"{\"weight_map\": {\"a\": \"../model.safetensors\"}}", ST_ERR_CONFIG, "plain file name"},
        {"{\"weight_map\": {\"a\": \"x.safetensors\", \"a\": \"x.safetensors\"}}", ST_ERR_DUPLICATE, "twice"},
        {"{\"weight_map\": {\"a\": \"x.safetensors\"}, \"weight_map\": {}}", ST_ERR_DUPLICATE, "twice"},
    };
    char err[ST__ERRLEN], path[160], *index, *moved;
    size_t i, n;
    st_checkpoint ck;
    for (i = 0; i < sizeof bad_json / sizeof bad_json[0]; i++) {
        st_status s = ck_load_text("olmoe", bad_json[i], NULL, NULL, err, sizeof err);
        if (s != (i + 1 == sizeof bad_json / sizeof bad_json[0] ? ST_ERR_DUPLICATE : ST_ERR_JSON) || !err[0])
            moe_test_fail(__FILE__, __LINE__, "config.json %s: %s (%s)", bad_json[i], st_status_string(s), err);
    }
    for (i = 0; i < sizeof bi / sizeof bi[0]; i++) {
        st_status s = ck_load_text("deepseek_v3", NULL, bi[i].index, NULL, err, sizeof err);
        if (s != bi[i].want || !strstr(err, bi[i].says))
            moe_test_fail(__FILE__, __LINE__, "index %s: %s (%s)", bi[i].index, st_status_string(s), err);
    }
    /* the real index, edited: one layer tensor moved to the other shard, to a
       shard that does not exist, or dropped */
    snprintf(path, sizeof path, "ref/ckpt/deepseek_v3/model.safetensors.index.json");
    index = (char *)moe_test_read_file(path, &n);
    CHECK(index != NULL);
    if (!index) return;
    index = (char *)realloc(index, n + 1);
    index[n] = '\0';
    {
        const char *key = "\"model.layers.1.mlp.experts.0.down_proj.weight\": \"";
        char *at = strstr(index, key), *val;
        const char *to[2];
        st_status want[2] = {ST_ERR_MISSING, ST_ERR_IO};
        size_t k;
        CHECK(at != NULL);
        if (!at) { free(index); return; }
        val = at + strlen(key);
        /* the other real shard (it lacks the tensor), then one that is not there */
        to[0] = !strncmp(val, "model-00001", 11) ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors";
        to[1] = "model-00003-of-00003.safetensors";
        for (k = 0; k < 2; k++) {
            st_status s;
            moved = (char *)malloc(n + 64);
            sprintf(moved, "%.*s%s%s", (int)(val - index), index, to[k], strchr(val, '"'));
            s = ck_load_text("deepseek_v3", NULL, moved, NULL, err, sizeof err);
            if (s != want[k] || !strstr(err, k ? "model-00003-of-00003" : "does not hold it"))
                moe_test_fail(__FILE__, __LINE__, "moved to %s: %s (%s)", to[k], st_status_string(s), err);
            free(moved);
        }
        moved = (char *)malloc(n + 1);                /* dropped from the index */
        sprintf(moved, "%.*s%s", (int)(at - index), index, strchr(at, '\n') + 1);
        {
            st_status s = ck_load_text("deepseek_v3", NULL, moved, NULL, err, sizeof err);
            if (s != ST_ERR_MISSING || !strstr(err, "experts.0.down_proj"))
                moe_test_fail(__FILE__, __LINE__, "dropped: %s (%s)", st_status_string(s), err);
        }
        free(moved);
    }
    free(index);
    /* a directory without config.json, and a lone file without one (allowed) */
    CHECK_STATUS_ST(st_checkpoint_open(&ck, "ref"), ST_ERR_IO);
    CHECK(strstr(ck.error, "config.json") != NULL);
    CHECK_STATUS_ST(st_checkpoint_open(&ck, "ref/mixtral.safetensors"), ST_OK);
    CHECK(!ck.has_config);
    st_checkpoint_close(&ck);
    CHECK_STATUS_ST(st_checkpoint_open(&ck, "ref/no_such.safetensors"), ST_ERR_IO);
}

/* Mutated config.json and index texts (byte flips, deletions, JSON
   characters spliced in): each load fails with a status and a message, or
   succeeds; never a crash (ASan + UBSan under make check). */
TEST(checkpoint, fuzz_config_and_index) {
    static const char junk[] = "{}[],:\"\\0123456789-+.eEtruefalsn \n";
    const char *dirs[2] = {"qwen2_moe", "deepseek_v3"};
    int counts[ST_ERR_ARGUMENT + 1] = {0}, which, iter, iters = 300, distinct = 0, k;
    const char *env = getenv("ST_FUZZ_ITERS");
    if (env && atoi(env) > 0) iters = atoi(env);
    fz_state = 20261207u;
    for (which = 0; which < 3; which++) {           /* qwen2 config, dsv3 config, dsv3 index */
        char path[160], err[ST__ERRLEN];
        size_t n;
        char *base;
        snprintf(path, sizeof path, which < 2 ? "ref/ckpt/%s/config.json" : "ref/ckpt/%s/model.safetensors.index.json",
                 dirs[which ? 1 : 0]);
        base = (char *)moe_test_read_file(path, &n);
        if (!base) { moe_test_fail(__FILE__, __LINE__, "cannot read %s", path); continue; }
        for (iter = 0; iter < iters; iter++) {
            char *t = (char *)malloc(n + 8);
            size_t len = n, pos;
            int m, muts = 1 + (int)fz_below(3);
            st_status s;
            memcpy(t, base, n);
            for (m = 0; m < muts && len > 1; m++) {
                pos = fz_below((uint32_t)len);
                switch (fz_below(3)) {
                case 0: t[pos] = junk[fz_below(sizeof junk - 1)]; break;
                case 1: memmove(t + pos, t + pos + 1, len - pos - 1); len--; break;
                default: memmove(t + pos + 1, t + pos, len - pos); t[pos] = junk[fz_below(sizeof junk - 1)]; len++; break;
                }
            }
            t[len] = '\0';                     /* texts with a NUL inside end there: a cut */
            s = which < 2 ? ck_load_text(dirs[which], t, NULL, NULL, err, sizeof err)
                          : ck_load_text("deepseek_v3", NULL, t, NULL, err, sizeof err);
            if ((int)s < 0 || (int)s > ST_ERR_ARGUMENT) moe_test_fail(__FILE__, __LINE__, "status %d", (int)s);
            else {
                counts[s]++;
                if (s != ST_OK && !err[0]) moe_test_fail(__FILE__, __LINE__, "%s without a message", st_status_string(s));
            }
            free(t);
        }
        free(base);
    }
    for (k = 0; k <= ST_ERR_ARGUMENT; k++) distinct += counts[k] > 0;
    CHECK(counts[ST_OK] > 0 && counts[ST_ERR_JSON] > 0 && distinct >= 4);
}
