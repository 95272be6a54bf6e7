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
