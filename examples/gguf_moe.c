/* gguf_moe.c -- run moe.h on one MoE layer of a llama.cpp GGUF file.

   A dependency-free GGUF reader (every count, length, type, shape and offset
   checked against the file before use) and a loader that finds one MoE
   layer by llama.cpp's tensor names, takes its routing from the file's
   metadata, and runs moe_forward on it. Quantized experts (Q8_0, Q4_0, Q4_K,
   MXFP4) are used in place: moe.h reads ggml's blocks as they lie in the
   mapped file, with no copy.

   Tensors of layer N (ggml lists dimensions innermost first: ne [D, F, E] is
   the C array [E][F][D]):
     blk.N.ffn_gate_inp.weight   ne [D, E]       router
     blk.N.ffn_gate_exps.weight  ne [D, F, E]    gate_proj of every expert
     blk.N.ffn_up_exps.weight    ne [D, F, E]    up_proj
       or blk.N.ffn_gate_up_exps.weight  ne [D, 2F, E]  (gate rows first)
     blk.N.ffn_down_exps.weight  ne [F, D, E]    down_proj
     blk.N.exp_probs_b.bias      ne [E]          selection bias (DeepSeek-V3)
     blk.N.ffn_{gate,up}_shexp.weight  ne [D, Fs],  ffn_down_shexp ne [Fs, D]
     blk.N.ffn_gate_inp_shexp.weight   ne [D]    shared-expert gate (Qwen2-MoE)
   Routing, as llama.cpp's build_moe_ffn reads it (A = general.architecture):
     A.expert_count              E (must match the router)
     A.expert_used_count         K (a number, or an array with one per layer)
     A.expert_gating_func        absent/0/1 softmax, 2 sigmoid; 3 (gpt-oss's
                                 softmax over the chosen) and 4 are refused
     A.expert_weights_norm       renormalise the K weights; when absent the
                                 arch's rule: llama (Mixtral) and qwen3moe
                                 yes, qwen2moe, olmoe and deepseek2 no
     A.expert_weights_scale      multiply the weights (absent or 0: 1)
     A.expert_group_count, A.expert_group_used_count   group-limited top-k,
                                 a group's score the sum of its 2 best keys
     A.expert_shared_count (deepseek2), A.expert_shared_feed_forward_length
                                 checked against the shared-expert shapes
   Architectures: llama (Mixtral), qwen2moe, qwen3moe, olmoe, deepseek2.
   Others are refused by name (gpt-oss's clamped SwiGLU with biases is not a
   moe.h activation), as is any tensor the arch does not use.

   Types: routed and shared experts in F32 (used in place), F16 / BF16
   (widened to float), or Q8_0 / Q4_0 / Q4_K / MXFP4 (in place); the router
   and selection bias are widened or decoded to float (moe.h's router is fp32).
   Any other ggml type (Q6_K, IQ*, ...) is GG_ERR_UNSUPPORTED, by name.

   The input is the file's tensor "x" (ne [D, T], F32) when it has one, else T
   synthetic tokens; when the file also has "y_ref" (the expected output, as
   in tests/ref/gguf/) the output is compared with it.

   build: cc -std=c99 -O2 -o gguf_moe examples/gguf_moe.c -lm
   run:   ./gguf_moe tests/ref/gguf/deepseek2_mxfp4.gguf
          ./gguf_moe FILE [--layer N] [--top-k K] [--norm 0|1] [--scale S]
              [--n-group G] [--topk-group G] [--tokens T] [--isa reference] [--list]

   Every bad file -- truncated, bad magic or version, a count or length past
   the end, an unknown value or tensor type, a shape that overflows or is not
   whole blocks, a misaligned, overlapping or out-of-file tensor, a missing
   tensor or key, a shape that does not fit the layer -- is a gg_status with
   a message, and exit status 1; never a crash. On POSIX systems the file is
   mapped (mmap), so a 100 GB model costs only the pages of the layer read.

   tests/test_gguf.c includes this file with GGUF_MOE_NO_MAIN defined; then
   main() and MOE_IMPLEMENTATION are left out. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L       /* mmap and fstat under -std=c99 */
#endif
#ifndef GGUF_MOE_NO_MAIN
#define MOE_IMPLEMENTATION
#endif
#include "../moe.h"
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define GG_HAVE_MMAP 1
#endif

/* ===========================================================================
   1. The GGUF file
   =========================================================================== */

typedef enum gg_status {
    GG_OK = 0,
    GG_ERR_IO = 1,             /* cannot open, map or read the file                */
    GG_ERR_TRUNCATED = 2,      /* the header or a tensor runs past the end         */
    GG_ERR_MAGIC = 3,          /* the file does not start with "GGUF"              */
    GG_ERR_VERSION = 4,        /* version other than 2 or 3 (or big-endian)        */
    GG_ERR_KV = 5,             /* bad metadata: value type, nesting, string size   */
    GG_ERR_DUPLICATE = 6,      /* a key or tensor name appears twice               */
    GG_ERR_TENSOR_INFO = 7,    /* rank outside 1..4, a negative or overflowing shape,
                                  a name too long, rows not whole blocks            */
    GG_ERR_TYPE = 8,           /* a tensor type ggml does not define               */
    GG_ERR_ALIGNMENT = 9,      /* general.alignment not a power of two, or an offset
                                  not a multiple of it                             */
    GG_ERR_OFFSETS = 10,       /* a tensor past the end of the data, or two overlap */
    GG_ERR_MISSING = 11,       /* a tensor or key the layer needs is not there     */
    GG_ERR_SHAPE_MISMATCH = 12,/* a tensor's shape or a key's value does not fit   */
    GG_ERR_UNSUPPORTED = 13,   /* a valid type, arch or gating this loader does not run */
    GG_ERR_CONFIG = 14,        /* bad option or metadata value, or moe.h refuses it */
    GG_ERR_NO_MEMORY = 15,
    GG_ERR_ARGUMENT = 16       /* NULL argument, or no open file                   */
} gg_status;

const char *gg_status_string(gg_status s) {
    switch (s) {
    case GG_OK: return "ok";
    case GG_ERR_IO: return "cannot read the file";
    case GG_ERR_TRUNCATED: return "file ends early";
    case GG_ERR_MAGIC: return "not a GGUF file";
    case GG_ERR_VERSION: return "unsupported GGUF version";
    case GG_ERR_KV: return "malformed metadata";
    case GG_ERR_DUPLICATE: return "duplicate key or tensor name";
    case GG_ERR_TENSOR_INFO: return "malformed tensor description";
    case GG_ERR_TYPE: return "unknown tensor type";
    case GG_ERR_ALIGNMENT: return "bad alignment";
    case GG_ERR_OFFSETS: return "tensor data outside the file or overlapping";
    case GG_ERR_MISSING: return "missing tensor or key";
    case GG_ERR_SHAPE_MISMATCH: return "tensor shape or key value does not fit the layer";
    case GG_ERR_UNSUPPORTED: return "not supported by this loader";
    case GG_ERR_CONFIG: return "bad layer configuration";
    case GG_ERR_NO_MEMORY: return "out of memory";
    case GG_ERR_ARGUMENT: return "bad argument";
    }
    return "unknown gg_status";
}

/* Metadata value types of the GGUF format. */
enum {
    GG_U8 = 0, GG_I8 = 1, GG_U16 = 2, GG_I16 = 3, GG_U32 = 4, GG_I32 = 5, GG_F32 = 6,
    GG_BOOL = 7, GG_STRING = 8, GG_ARRAY = 9, GG_U64 = 10, GG_I64 = 11, GG_F64 = 12,
    GG_NVTYPES = 13
};
static const unsigned char gg__vsize[GG_NVTYPES] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

/* Every ggml tensor type id with its block (values) and block bytes; ids
   ggml removed have 0 bytes. Checked against gguf's GGML_QUANT_SIZES. */
#define GG_NTYPES 42
static const struct { const char *name; unsigned short blck, bytes; } gg__types[GG_NTYPES] = {
    {"F32", 1, 4}, {"F16", 1, 2}, {"Q4_0", 32, 18}, {"Q4_1", 32, 20}, {"", 0, 0}, {"", 0, 0},
    {"Q5_0", 32, 22}, {"Q5_1", 32, 24}, {"Q8_0", 32, 34}, {"Q8_1", 32, 40},
    {"Q2_K", 256, 84}, {"Q3_K", 256, 110}, {"Q4_K", 256, 144}, {"Q5_K", 256, 176},
    {"Q6_K", 256, 210}, {"Q8_K", 256, 292}, {"IQ2_XXS", 256, 66}, {"IQ2_XS", 256, 74},
    {"IQ3_XXS", 256, 98}, {"IQ1_S", 256, 50}, {"IQ4_NL", 32, 18}, {"IQ3_S", 256, 110},
    {"IQ2_S", 256, 82}, {"IQ4_XS", 256, 136}, {"I8", 1, 1}, {"I16", 1, 2}, {"I32", 1, 4},
    {"I64", 1, 8}, {"F64", 1, 8}, {"IQ1_M", 256, 56}, {"BF16", 1, 2}, {"", 0, 0},
    {"", 0, 0}, {"", 0, 0}, {"TQ1_0", 256, 54}, {"TQ2_0", 256, 66}, {"", 0, 0},
    {"", 0, 0}, {"", 0, 0}, {"MXFP4", 32, 17}, {"NVFP4", 64, 36}, {"Q1_0", 128, 18}};
enum { GG_TYPE_F32 = 0, GG_TYPE_F16 = 1, GG_TYPE_BF16 = 30 };

const char *gg_type_name(uint32_t type) {
    return type < GG_NTYPES && gg__types[type].bytes ? gg__types[type].name : "?";
}

#define GG_MAX_DIMS 4
#define GG_MAX_NAME 64            /* ggml's GGML_MAX_NAME, the terminating NUL included */
#define GG_DEFAULT_ALIGNMENT 32

typedef struct gg_kv {
    char *key;                     /* NUL-terminated copy                          */
    uint32_t type;                 /* GG_U8 .. GG_F64                              */
    uint32_t elem_type;            /* arrays: the elements' type                   */
    uint64_t count;                /* arrays: elements; strings: bytes             */
    const unsigned char *value;    /* in the file: the scalar, the string's bytes, or
                                      the array's first element                    */
} gg_kv;

typedef struct gg_tensor {
    char name[GG_MAX_NAME];
    uint32_t ndim, type;
    int64_t ne[GG_MAX_DIMS];       /* innermost first; unused dimensions are 1     */
    uint64_t offset, nbytes;       /* within the data section                      */
    const unsigned char *data;     /* in the file                                  */
} gg_tensor;

typedef struct gg_file {
    const unsigned char *bytes;    /* the whole file                               */
    uint64_t size;
    uint32_t version;
    uint64_t alignment;
    uint64_t data_offset;          /* where the data section starts                */
    gg_kv *kv;
    uint64_t nkv;
    gg_tensor *tensors;            /* in file order                                */
    uint64_t ntensors;
    void *mapped;                  /* gg_open's mapping or heap copy               */
    int is_mapped;
    char error[320];               /* what went wrong, for people                  */
} gg_file;

#if defined(__GNUC__) || defined(__clang__)
#define GG__PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define GG__PRINTF(a, b)
#endif
static gg_status gg__fail(char *buf, size_t n, gg_status s, const char *fmt, ...) GG__PRINTF(4, 5);
static gg_status gg__fail(char *buf, size_t n, gg_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, n, fmt, ap);
    va_end(ap);
    return s;
}
#define GG__FAIL(f, s, ...) gg__fail((f)->error, sizeof (f)->error, (s), __VA_ARGS__)

void gg_close(gg_file *f) {
    uint64_t i;
    if (!f) return;
    for (i = 0; f->kv && i < f->nkv; i++) free(f->kv[i].key);
    free(f->kv);
    free(f->tensors);
#ifdef GG_HAVE_MMAP
    if (f->is_mapped && f->mapped) munmap(f->mapped, (size_t)f->size);
#endif
    if (!f->is_mapped) free(f->mapped);
    memset(f, 0, sizeof *f);
}

/* --- reading the header: a cursor that never passes the end -------------- */
typedef struct gg__cursor { const unsigned char *p, *end; } gg__cursor;

static uint64_t gg__left(const gg__cursor *c) { return (uint64_t)(c->end - c->p); }
static uint64_t gg__le(const unsigned char *p, int n) {   /* little-endian, any host */
    uint64_t v = 0;
    while (n--) v = v << 8 | p[n];
    return v;
}
static int gg__u32(gg__cursor *c, uint32_t *v) {
    if (gg__left(c) < 4) return 0;
    *v = (uint32_t)gg__le(c->p, 4); c->p += 4;
    return 1;
}
static int gg__u64(gg__cursor *c, uint64_t *v) {
    if (gg__left(c) < 8) return 0;
    *v = gg__le(c->p, 8); c->p += 8;
    return 1;
}
/* A string: u64 length, then that many bytes (no NUL). */
static int gg__str(gg__cursor *c, const unsigned char **s, uint64_t *len) {
    if (!gg__u64(c, len) || *len > gg__left(c)) return 0;
    *s = c->p; c->p += *len;
    return 1;
}

/* Parse one value of type t (arrays one level deep, as ggml reads them). */
static gg_status gg__value(gg_file *f, gg__cursor *c, gg_kv *kv) {
    uint64_t i, len;
    const unsigned char *s;
    if (kv->type >= GG_NVTYPES) return GG__FAIL(f, GG_ERR_KV, "key '%s': unknown value type %u",
                                                 kv->key, (unsigned)kv->type);
    kv->value = c->p;
    if (kv->type == GG_STRING) {
        if (!gg__str(c, &s, &kv->count))
            return GG__FAIL(f, GG_ERR_TRUNCATED, "key '%s': string past the end", kv->key);
        kv->value = s;
        return GG_OK;
    }
    if (kv->type != GG_ARRAY) {
        if (gg__left(c) < gg__vsize[kv->type])
            return GG__FAIL(f, GG_ERR_TRUNCATED, "key '%s': value past the end", kv->key);
        c->p += gg__vsize[kv->type];
        return GG_OK;
    }
    if (!gg__u32(c, &kv->elem_type) || !gg__u64(c, &kv->count))
        return GG__FAIL(f, GG_ERR_TRUNCATED, "key '%s': array header past the end", kv->key);
    if (kv->elem_type >= GG_NVTYPES || kv->elem_type == GG_ARRAY)
        return GG__FAIL(f, GG_ERR_KV, "key '%s': array of type %u (nested arrays are not GGUF)",
                        kv->key, (unsigned)kv->elem_type);
    kv->value = c->p;
    if (kv->elem_type == GG_STRING) {
        if (kv->count > gg__left(c) / 8)         /* each string is at least its length */
            return GG__FAIL(f, GG_ERR_TRUNCATED, "key '%s': %llu strings past the end", kv->key,
                            (unsigned long long)kv->count);
        for (i = 0; i < kv->count; i++)
            if (!gg__str(c, &s, &len))
                return GG__FAIL(f, GG_ERR_TRUNCATED, "key '%s': string %llu past the end",
                                kv->key, (unsigned long long)i);
        return GG_OK;
    }
    if (kv->count > gg__left(c) / gg__vsize[kv->elem_type])
        return GG__FAIL(f, GG_ERR_TRUNCATED, "key '%s': array of %llu past the end", kv->key,
                        (unsigned long long)kv->count);
    c->p += kv->count * gg__vsize[kv->elem_type];
    return GG_OK;
}

static int gg__cmp_kv(const void *a, const void *b) {
    return strcmp((*(const gg_kv *const *)a)->key, (*(const gg_kv *const *)b)->key);
}
static int gg__cmp_name(const void *a, const void *b) {
    return strcmp((*(const gg_tensor *const *)a)->name, (*(const gg_tensor *const *)b)->name);
}
static int gg__cmp_offset(const void *a, const void *b) {
    const gg_tensor *x = *(const gg_tensor *const *)a, *y = *(const gg_tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

const gg_kv *gg_find_kv(const gg_file *f, const char *key) {
    uint64_t i;
    for (i = 0; f && i < f->nkv; i++) if (!strcmp(f->kv[i].key, key)) return &f->kv[i];
    return NULL;
}
const gg_tensor *gg_find(const gg_file *f, const char *name) {
    uint64_t i;
    for (i = 0; f && i < f->ntensors; i++)
        if (!strcmp(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

/* No two keys, and no two tensors, with one name. */
static gg_status gg__check_unique(gg_file *f) {
    uint64_t n = f->nkv > f->ntensors ? f->nkv : f->ntensors, i;
    const void **idx = (const void **)malloc((size_t)(n ? n : 1) * sizeof *idx);
    gg_status s = GG_OK;
    if (!idx) return GG__FAIL(f, GG_ERR_NO_MEMORY, "out of memory");
    for (i = 0; i < f->nkv; i++) idx[i] = &f->kv[i];
    qsort(idx, (size_t)f->nkv, sizeof *idx, gg__cmp_kv);
    for (i = 1; i < f->nkv && !s; i++)
        if (!gg__cmp_kv(&idx[i - 1], &idx[i]))
            s = GG__FAIL(f, GG_ERR_DUPLICATE, "key '%s' appears twice",
                         ((const gg_kv *)idx[i])->key);
    for (i = 0; i < f->ntensors && !s; i++) idx[i] = &f->tensors[i];
    if (!s) qsort(idx, (size_t)f->ntensors, sizeof *idx, gg__cmp_name);
    for (i = 1; i < f->ntensors && !s; i++)
        if (!gg__cmp_name(&idx[i - 1], &idx[i]))
            s = GG__FAIL(f, GG_ERR_DUPLICATE, "tensor '%s' appears twice",
                         ((const gg_tensor *)idx[i])->name);
    /* data: sorted by offset, each ends before the next begins */
    for (i = 0; i < f->ntensors && !s; i++) idx[i] = &f->tensors[i];
    if (!s) qsort(idx, (size_t)f->ntensors, sizeof *idx, gg__cmp_offset);
    for (i = 1; i < f->ntensors && !s; i++) {
        const gg_tensor *a = (const gg_tensor *)idx[i - 1], *b = (const gg_tensor *)idx[i];
        if (a->offset + a->nbytes > b->offset)
            s = GG__FAIL(f, GG_ERR_OFFSETS, "tensors '%s' and '%s' overlap", a->name, b->name);
    }
    free(idx);
    return s;
}

/* One tensor description: name, rank, ne[], type, offset. */
static gg_status gg__tensor_info(gg_file *f, gg__cursor *c, gg_tensor *t) {
    const unsigned char *s;
    uint64_t len, rows = 1, offset, v, row_blocks;
    uint32_t d;
    int zero = 0, over = 0;
    if (!gg__str(c, &s, &len)) return GG__FAIL(f, GG_ERR_TRUNCATED, "tensor name past the end");
    if (len >= GG_MAX_NAME || memchr(s, 0, (size_t)len))
        return GG__FAIL(f, GG_ERR_TENSOR_INFO, "a tensor name of %llu bytes (at most %d, no NUL)",
                        (unsigned long long)len, GG_MAX_NAME - 1);
    memcpy(t->name, s, (size_t)len);
    t->name[len] = '\0';
    if (!gg__u32(c, &t->ndim))
        return GG__FAIL(f, GG_ERR_TRUNCATED, "'%s': rank past the end", t->name);
    if (t->ndim < 1 || t->ndim > GG_MAX_DIMS)
        return GG__FAIL(f, GG_ERR_TENSOR_INFO, "'%s': rank %u (1..4)", t->name, (unsigned)t->ndim);
    for (d = 0; d < GG_MAX_DIMS; d++) {
        t->ne[d] = 1;
        if (d >= t->ndim) continue;
        if (!gg__u64(c, &v))
            return GG__FAIL(f, GG_ERR_TRUNCATED, "'%s': shape past the end", t->name);
        if (v > (uint64_t)INT64_MAX)
            return GG__FAIL(f, GG_ERR_TENSOR_INFO, "'%s': dimension %u is negative", t->name, d);
        t->ne[d] = (int64_t)v;
    }
    if (!gg__u32(c, &t->type) || !gg__u64(c, &offset))
        return GG__FAIL(f, GG_ERR_TRUNCATED, "'%s': type or offset past the end", t->name);
    if (t->type >= GG_NTYPES || !gg__types[t->type].bytes)
        return GG__FAIL(f, GG_ERR_TYPE, "'%s': tensor type %u", t->name, (unsigned)t->type);
    if (t->ne[0] % gg__types[t->type].blck)
        return GG__FAIL(f, GG_ERR_TENSOR_INFO, "'%s': rows of %lld values are not whole %s blocks "
                        "of %u", t->name, (long long)t->ne[0], gg__types[t->type].name,
                        (unsigned)gg__types[t->type].blck);
    /* bytes = ne0 / blck * block bytes * ne1 * ne2 * ne3, overflow checked */
    row_blocks = (uint64_t)t->ne[0] / gg__types[t->type].blck;
    for (d = 1; d < GG_MAX_DIMS; d++) {
        if (!t->ne[d]) zero = 1;
        else if (rows > UINT64_MAX / (uint64_t)t->ne[d]) over = 1;
        else rows *= (uint64_t)t->ne[d];
    }
    if (row_blocks > UINT64_MAX / gg__types[t->type].bytes) over = 1;
    t->nbytes = over ? 0 : row_blocks * gg__types[t->type].bytes;
    if (zero) rows = 0;
    else if (over || (rows && t->nbytes > UINT64_MAX / rows))
        return GG__FAIL(f, GG_ERR_TENSOR_INFO, "'%s': shape overflows", t->name);
    t->nbytes *= rows;
    t->offset = offset;
    return GG_OK;
}

/* Parse the file in bytes[0, size): nothing is copied but keys. */
static gg_status gg__parse(gg_file *f) {
    gg__cursor c;
    uint64_t i;
    uint32_t magic;
    gg_status s;
    const gg_kv *al;
    c.p = f->bytes; c.end = f->bytes + f->size;
    if (!gg__u32(&c, &magic)) return GG__FAIL(f, GG_ERR_TRUNCATED, "%llu bytes: no GGUF header",
                                              (unsigned long long)f->size);
    if (magic != 0x46554747u) return GG__FAIL(f, GG_ERR_MAGIC, "the file does not begin with GGUF");
    if (!gg__u32(&c, &f->version)) return GG__FAIL(f, GG_ERR_TRUNCATED, "no version");
    if (f->version != 2 && f->version != 3)
        return GG__FAIL(f, GG_ERR_VERSION, "GGUF version %u (2 and 3 are read; a byte-swapped "
                        "version is a big-endian file)", (unsigned)f->version);
    if (!gg__u64(&c, &f->ntensors) || !gg__u64(&c, &f->nkv))
        return GG__FAIL(f, GG_ERR_TRUNCATED, "no tensor and key counts");
    /* a key takes at least 13 bytes and a tensor 24: counts past that are lies */
    if (f->nkv > gg__left(&c) / 13 || f->ntensors > gg__left(&c) / 24)
        return GG__FAIL(f, GG_ERR_TRUNCATED, "%llu keys and %llu tensors cannot fit in %llu bytes",
                        (unsigned long long)f->nkv, (unsigned long long)f->ntensors,
                        (unsigned long long)f->size);
    f->kv = (gg_kv *)calloc((size_t)(f->nkv ? f->nkv : 1), sizeof *f->kv);
    f->tensors = (gg_tensor *)calloc((size_t)(f->ntensors ? f->ntensors : 1), sizeof *f->tensors);
    if (!f->kv || !f->tensors) return GG__FAIL(f, GG_ERR_NO_MEMORY, "out of memory");
    for (i = 0; i < f->nkv; i++) {
        gg_kv *kv = &f->kv[i];
        const unsigned char *key;
        uint64_t len;
        if (!gg__str(&c, &key, &len) || !gg__u32(&c, &kv->type)) {
            f->nkv = i;
            return GG__FAIL(f, GG_ERR_TRUNCATED, "key %llu past the end", (unsigned long long)i);
        }
        if (len == 0 || len > 65535 || memchr(key, 0, (size_t)len)) {
            f->nkv = i;
            return GG__FAIL(f, GG_ERR_KV, "key %llu: %llu bytes (1..65535, no NUL)",
                            (unsigned long long)i, (unsigned long long)len);
        }
        if (!(kv->key = (char *)malloc((size_t)len + 1))) {
            f->nkv = i;
            return GG__FAIL(f, GG_ERR_NO_MEMORY, "out of memory");
        }
        memcpy(kv->key, key, (size_t)len);
        kv->key[len] = '\0';
        if ((s = gg__value(f, &c, kv))) { f->nkv = i + 1; return s; }
    }
    for (i = 0; i < f->ntensors; i++)
        if ((s = gg__tensor_info(f, &c, &f->tensors[i]))) return s;
    f->alignment = GG_DEFAULT_ALIGNMENT;
    if ((al = gg_find_kv(f, "general.alignment"))) {
        if (al->type != GG_U32)
            return GG__FAIL(f, GG_ERR_ALIGNMENT, "general.alignment has value type %u, not u32",
                            (unsigned)al->type);
        f->alignment = gg__le(al->value, 4);
        if (!f->alignment || (f->alignment & (f->alignment - 1)))
            return GG__FAIL(f, GG_ERR_ALIGNMENT, "general.alignment %llu is not a power of two",
                            (unsigned long long)f->alignment);
    }
    f->data_offset = (uint64_t)(c.p - f->bytes);
    f->data_offset += (f->alignment - f->data_offset % f->alignment) % f->alignment;
    if (f->data_offset > f->size)
        return GG__FAIL(f, GG_ERR_TRUNCATED, "the data section starts at %llu, past the end (%llu)",
                        (unsigned long long)f->data_offset, (unsigned long long)f->size);
    for (i = 0; i < f->ntensors; i++) {
        gg_tensor *t = &f->tensors[i];
        const uint64_t room = f->size - f->data_offset;
        if (t->offset % f->alignment)
            return GG__FAIL(f, GG_ERR_ALIGNMENT, "'%s': offset %llu is not a multiple of %llu",
                            t->name, (unsigned long long)t->offset,
                            (unsigned long long)f->alignment);
        if (t->offset > room || t->nbytes > room - t->offset)
            return GG__FAIL(f, GG_ERR_OFFSETS, "'%s': bytes %llu..%llu of a data section of %llu",
                            t->name, (unsigned long long)t->offset,
                            (unsigned long long)(t->offset + t->nbytes), (unsigned long long)room);
        t->data = f->bytes + f->data_offset + t->offset;
    }
    return gg__check_unique(f);
}

/* Open a file image held by the caller (kept alive and unchanged while f is open). */
gg_status gg_open_memory(gg_file *f, const void *bytes, size_t size) {
    gg_status s;
    if (!f) return GG_ERR_ARGUMENT;
    memset(f, 0, sizeof *f);
    if (!bytes && size) return GG__FAIL(f, GG_ERR_ARGUMENT, "NULL bytes");
    f->bytes = (const unsigned char *)(bytes ? bytes : "");
    f->size = size;
    if ((s = gg__parse(f))) {
        char msg[sizeof f->error];
        memcpy(msg, f->error, sizeof msg);
        gg_close(f);
        memcpy(f->error, msg, sizeof msg);
    }
    return s;
}

/* Open a file: mapped where the system can, else read whole. */
gg_status gg_open(gg_file *f, const char *path) {
    void *mem = NULL;
    size_t size = 0;
    int mapped = 0;
    gg_status s;
    char msg[sizeof f->error];
    if (!f) return GG_ERR_ARGUMENT;
    memset(f, 0, sizeof *f);
    if (!path) return GG__FAIL(f, GG_ERR_ARGUMENT, "NULL path");
#ifdef GG_HAVE_MMAP
    {
        struct stat st;
        int fd = open(path, O_RDONLY);
        if (fd < 0) return GG__FAIL(f, GG_ERR_IO, "cannot open '%s'", path);
        if (fstat(fd, &st) || st.st_size < 0 || (uint64_t)st.st_size > (size_t)-1) {
            close(fd);
            return GG__FAIL(f, GG_ERR_IO, "cannot stat '%s'", path);
        }
        size = (size_t)st.st_size;
        if (size) {
            mem = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
            mapped = mem != MAP_FAILED;
            if (!mapped) mem = NULL;
        }
        close(fd);
    }
#endif
    if (!mapped) {                               /* no mmap: the whole file into memory */
        FILE *fp = fopen(path, "rb");
        long n;
        if (!fp) return GG__FAIL(f, GG_ERR_IO, "cannot open '%s'", path);
        if (fseek(fp, 0, SEEK_END) || (n = ftell(fp)) < 0 || fseek(fp, 0, SEEK_SET)) {
            fclose(fp);
            return GG__FAIL(f, GG_ERR_IO, "cannot seek in '%s'", path);
        }
        size = (size_t)n;
        if (!(mem = malloc(size ? size : 1))) {
            fclose(fp);
            return GG__FAIL(f, GG_ERR_NO_MEMORY, "out of memory");
        }
        if (fread(mem, 1, size, fp) != size) {
            fclose(fp); free(mem);
            return GG__FAIL(f, GG_ERR_IO, "cannot read '%s'", path);
        }
        fclose(fp);
    }
    s = gg_open_memory(f, mem, size);
    memcpy(msg, f->error, sizeof msg);
    if (s) {
#ifdef GG_HAVE_MMAP
        if (mapped) munmap(mem, size);
#endif
        if (!mapped) free(mem);
        memcpy(f->error, msg, sizeof msg);
        return s;
    }
    f->mapped = mem;
    f->is_mapped = mapped;
    return GG_OK;
}

/* --- typed metadata lookups ----------------------------------------------- */

/* An unsigned integer key (any integer type, or an array with one per layer:
   element `index`). 0: found; 1: absent; else the status. */
static gg_status gg__get_uint(gg_file *f, const char *key, uint64_t index, uint64_t *out,
                              int *absent) {
    const gg_kv *kv = gg_find_kv(f, key);
    uint32_t t;
    const unsigned char *p;
    int64_t v;
    *absent = !kv;
    if (!kv) return GG_OK;
    t = kv->type == GG_ARRAY ? kv->elem_type : kv->type;
    p = kv->value;
    if (kv->type == GG_ARRAY) {
        if (index >= kv->count)
            return GG__FAIL(f, GG_ERR_SHAPE_MISMATCH, "'%s' has %llu entries, layer %llu has none",
                            key, (unsigned long long)kv->count, (unsigned long long)index);
        p += index * gg__vsize[t];
    }
    switch (t) {
    case GG_U8: case GG_U16: case GG_U32: case GG_U64: case GG_BOOL:
        *out = gg__le(p, gg__vsize[t]);
        return GG_OK;
    case GG_I8: case GG_I16: case GG_I32: case GG_I64:
        v = (int64_t)(gg__le(p, gg__vsize[t]) << (64 - 8 * gg__vsize[t]));
        v >>= 64 - 8 * gg__vsize[t];                      /* sign-extended */
        if (v >= 0) { *out = (uint64_t)v; return GG_OK; }
        return GG__FAIL(f, GG_ERR_CONFIG, "'%s' = %lld is negative", key, (long long)v);
    default:
        return GG__FAIL(f, GG_ERR_CONFIG, "'%s' has value type %u, not an integer", key,
                        (unsigned)t);
    }
}

static gg_status gg__get_float(gg_file *f, const char *key, double *out, int *absent) {
    const gg_kv *kv = gg_find_kv(f, key);
    uint64_t bits;
    *absent = !kv;
    if (!kv) return GG_OK;
    if (kv->type == GG_F32) {
        float v;
        uint32_t b = (uint32_t)gg__le(kv->value, 4);
        memcpy(&v, &b, 4);
        *out = v;
    } else if (kv->type == GG_F64) {
        bits = gg__le(kv->value, 8);
        memcpy(out, &bits, 8);
    } else {
        return GG__FAIL(f, GG_ERR_CONFIG, "'%s' has value type %u, not a float", key,
                        (unsigned)kv->type);
    }
    if (*out != *out || fabs(*out) > 1e6)
        return GG__FAIL(f, GG_ERR_CONFIG, "'%s' = %g is not a finite weight scale", key, *out);
    return GG_OK;
}

/* ===========================================================================
   2. One MoE layer
   =========================================================================== */

typedef struct gg_layer_options {
    int layer;                 /* -1: the lowest N with blk.N.ffn_gate_inp.weight   */
    /* routing overrides; -1 (scale: 0) = the file's metadata / the arch's rule */
    int top_k, norm, n_group, topk_group;
    double scale;
} gg_layer_options;

void gg_layer_options_default(gg_layer_options *o) {
    memset(o, 0, sizeof *o);
    o->layer = o->top_k = o->norm = o->n_group = o->topk_group = -1;
}

enum { GG__ROUTER, GG__BIAS, GG__GATE, GG__UP, GG__DOWN, GG__SH_GATE, GG__SH_UP, GG__SH_DOWN,
       GG__SH_EGATE, GG__NBUF };

typedef struct gg_layer {
    char arch[32];
    int layer;
    int fused;                 /* experts as ffn_gate_up_exps                        */
    int32_t E, D, F, Fs;       /* Fs = 0: no shared expert                           */
    uint32_t gate_type, up_type, down_type;   /* ggml type ids as in the file         */
    uint32_t shared_type[3];                  /* the shared expert's gate, up, down   */
    moe_config cfg;            /* shape + routing, resolved                          */
    moe_weights w;             /* points into the file or into buf                  */
    float *buf[GG__NBUF];      /* float copies (widened or decoded tensors)          */
    char error[320];
} gg_layer;

void gg_layer_free(gg_layer *L) {
    int i;
    if (!L) return;
    for (i = 0; i < GG__NBUF; i++) { free(L->buf[i]); L->buf[i] = NULL; }
    memset(&L->w, 0, sizeof L->w);
}

#define GG__LFAIL(L, s, ...) gg__fail((L)->error, sizeof (L)->error, (s), __VA_ARGS__)

/* The architectures this loader runs, with llama.cpp's renormalisation rule
   (build_moe_ffn's norm_w) and whether they have a shared expert. */
static const struct gg__arch { const char *name; int norm, shared; } gg__archs[] = {
    {"llama", 1, 0}, {"qwen2moe", 0, 1}, {"qwen3moe", 1, 0}, {"olmoe", 0, 0},
    {"deepseek2", 0, 1}};

static float gg__f16(uint16_t h) {
    const uint32_t e = (h >> 10) & 31u, m = h & 1023u;
    const float v = e == 0 ? (float)m * 5.9604644775390625e-8f            /* m * 2^-24 */
                  : e == 31 ? (m ? NAN : HUGE_VALF) : ldexpf((float)(m | 1024u), (int)e - 25);
    return h >> 15 ? -v : v;
}
static float gg__bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* Tensor t as n floats (F32, F16, BF16, or blocks moe_dequantize reads). */
static gg_status gg__to_float(gg_layer *L, const gg_tensor *t, float *out) {
    const uint64_t n = t->nbytes / gg__types[t->type].bytes * gg__types[t->type].blck;
    uint64_t i;
    moe_status ms;
    switch (t->type) {
    case GG_TYPE_F32:
        for (i = 0; i < n; i++) {
            uint32_t b = (uint32_t)gg__le(t->data + 4 * i, 4);
            memcpy(&out[i], &b, 4);
        }
        return GG_OK;
    case GG_TYPE_F16:
        for (i = 0; i < n; i++) out[i] = gg__f16((uint16_t)gg__le(t->data + 2 * i, 2));
        return GG_OK;
    case GG_TYPE_BF16:
        for (i = 0; i < n; i++) out[i] = gg__bf16((uint16_t)gg__le(t->data + 2 * i, 2));
        return GG_OK;
    default:
        if (!moe_qtype_name((moe_qtype)t->type))
            return GG__LFAIL(L, GG_ERR_UNSUPPORTED, "'%s' is %s: this loader reads F32, F16, BF16, "
                             "Q8_0, Q4_0, Q4_K and MXFP4", t->name, gg_type_name(t->type));
        ms = moe_dequantize((moe_qtype)t->type, t->data, (size_t)t->nbytes,
                            (int64_t)(n / (uint64_t)t->ne[0]), t->ne[0], out);
        if (ms) return GG__LFAIL(L, GG_ERR_CONFIG, "'%s': %s", t->name, moe_status_string(ms));
        return GG_OK;
    }
}

static void gg__shape_str(const int64_t *ne, uint32_t ndim, char *out, size_t n) {
    size_t used = (size_t)snprintf(out, n, "[");
    uint32_t d;
    for (d = 0; d < ndim && used < n; d++)
        used += (size_t)snprintf(out + used, n - used, d ? ", %lld" : "%lld", (long long)ne[d]);
    if (used < n) snprintf(out + used, n - used, "]");
}

/* blk.N.<suffix>: must have rank ndim and ne == want (a want of 0 accepts
   any size in 1..2^31-1 and is filled in). */
static gg_status gg__tensor(gg_layer *L, const gg_file *f, const char *suffix, uint32_t ndim,
                            int64_t *want, const gg_tensor **out) {
    char name[GG_MAX_NAME + 32], got[96], exp[96];
    const gg_tensor *t;
    uint32_t d, rank;
    snprintf(name, sizeof name, "blk.%d.%s", L->layer, suffix);
    if (!(*out = t = gg_find(f, name)))
        return GG__LFAIL(L, GG_ERR_MISSING, "missing tensor '%s'", name);
    for (rank = GG_MAX_DIMS; rank > 1 && t->ne[rank - 1] == 1; rank--) {}
    for (d = 0; d < ndim; d++)
        if (!want[d] && t->ne[d] >= 1 && t->ne[d] <= INT32_MAX) want[d] = t->ne[d];
    for (d = 0; d < ndim && want[d] && t->ne[d] == want[d]; d++) {}
    if (d < ndim || rank > ndim) {
        gg__shape_str(t->ne, t->ndim, got, sizeof got);
        gg__shape_str(want, ndim, exp, sizeof exp);
        return GG__LFAIL(L, GG_ERR_SHAPE_MISMATCH, "'%s' has ne %s, expected %s%s", name, got,
                         exp, strchr(exp, '0') ? " (0: any size in 1..2^31-1)" : "");
    }
    return GG_OK;
}

/* blk.N.<suffix> as a new float buffer buf[slot]. */
static gg_status gg__take_float(gg_layer *L, const gg_file *f, const char *suffix,
                                uint32_t ndim, int64_t *want, int slot) {
    const gg_tensor *t;
    gg_status s;
    uint64_t n = 1;
    uint32_t d;
    if ((s = gg__tensor(L, f, suffix, ndim, want, &t))) return s;
    for (d = 0; d < ndim; d++) n *= (uint64_t)want[d];
    if (n > (size_t)-1 / sizeof(float) ||
        !(L->buf[slot] = (float *)malloc((size_t)n * sizeof(float))))
        return GG__LFAIL(L, GG_ERR_NO_MEMORY, "out of memory for '%s'", t->name);
    return gg__to_float(L, t, L->buf[slot]);
}

static int gg__little_endian(void) {
    const uint32_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* An expert tensor (routed: rank 3, shared: 2): blocks and F32 in place,
   F16 / BF16 widened into buf[slot]. */
static gg_status gg__take_experts(gg_layer *L, const gg_file *f, const char *suffix,
                                  uint32_t ndim, int64_t *want, int slot, const float **fp,
                                  const void **qp, int32_t *qtype, uint32_t *file_type) {
    const gg_tensor *t;
    gg_status s;
    if ((s = gg__tensor(L, f, suffix, ndim, want, &t))) return s;
    *file_type = t->type;
    if (moe_qtype_name((moe_qtype)t->type) && t->type != GG_TYPE_F32) {
        *qtype = (int32_t)t->type;                /* ggml's ids are moe_qtype's */
        *qp = t->data;
        return GG_OK;
    }
    if (t->type == GG_TYPE_F32 && (uintptr_t)t->data % sizeof(float) == 0 && gg__little_endian()) {
        *fp = (const float *)(const void *)t->data;
        return GG_OK;
    }
    if (t->type != GG_TYPE_F32 && t->type != GG_TYPE_F16 && t->type != GG_TYPE_BF16)
        return GG__LFAIL(L, GG_ERR_UNSUPPORTED, "'%s' is %s: moe.h runs experts in F32, F16, BF16, "
                         "Q8_0, Q4_0, Q4_K and MXFP4", t->name, gg_type_name(t->type));
    if ((s = gg__take_float(L, f, suffix, ndim, want, slot))) return s;
    *fp = L->buf[slot];
    return GG_OK;
}

/* The lowest N with blk.N.ffn_gate_inp.weight; -1 if none. */
static int gg__first_moe_layer(const gg_file *f) {
    uint64_t i;
    int best = -1;
    for (i = 0; i < f->ntensors; i++) {
        const char *n = f->tensors[i].name, *q;
        long v = 0;
        if (strncmp(n, "blk.", 4)) continue;
        for (q = n + 4; *q >= '0' && *q <= '9' && v < 1000000; q++) v = v * 10 + (*q - '0');
        if (q == n + 4 || strcmp(q, ".ffn_gate_inp.weight")) continue;
        if (best < 0 || v < best) best = (int)v;
    }
    return best;
}

/* MoE tensors of blk.N the loader does not use (biases, scales, an arch's
   extra parts) are refused, so nothing of the layer is silently ignored;
   attention and norms are not ours to check. */
static gg_status gg__check_all_used(gg_layer *L, const gg_file *f) {
    static const char *const used[] = {
        "ffn_gate_inp.weight", "exp_probs_b.bias", "ffn_gate_exps.weight", "ffn_up_exps.weight",
        "ffn_gate_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_shexp.weight",
        "ffn_up_shexp.weight", "ffn_down_shexp.weight", "ffn_gate_inp_shexp.weight"};
    char pre[32];
    const size_t np = (size_t)snprintf(pre, sizeof pre, "blk.%d.", L->layer);
    uint64_t i;
    size_t k;
    for (i = 0; i < f->ntensors; i++) {
        const char *n = f->tensors[i].name;
        if (strncmp(n, pre, np) || (!strstr(n, "exps") && !strstr(n, "shexp") &&
                                    !strstr(n, "exp_probs") && !strstr(n, "gate_inp")))
            continue;
        for (k = 0; k < sizeof used / sizeof *used && strcmp(n + np, used[k]); k++) {}
        if (k == sizeof used / sizeof *used)
            return GG__LFAIL(L, GG_ERR_UNSUPPORTED, "'%s': this loader does not run it", n);
    }
    return GG_OK;
}

static gg_status gg__key_matches(gg_layer *L, gg_file *f, const char *key, int64_t want) {
    char k[96];
    uint64_t v;
    int absent;
    gg_status s;
    snprintf(k, sizeof k, "%s.%s", L->arch, key);
    if ((s = gg__get_uint(f, k, (uint64_t)L->layer, &v, &absent))) {
        memcpy(L->error, f->error, sizeof L->error);
        return s;
    }
    if (!absent && v != (uint64_t)want)
        return GG__LFAIL(L, GG_ERR_SHAPE_MISMATCH, "'%s' = %llu, but the tensors give %lld", k,
                         (unsigned long long)v, (long long)want);
    return GG_OK;
}

/* A routing key: the option when >= 0, else the file's value, else dflt. */
static gg_status gg__routing_uint(gg_layer *L, gg_file *f, const char *key, int opt,
                                  int required, int *out) {
    char k[96];
    uint64_t v;
    int absent;
    gg_status s;
    if (opt >= 0) { *out = opt; return GG_OK; }
    snprintf(k, sizeof k, "%s.%s", L->arch, key);
    if ((s = gg__get_uint(f, k, (uint64_t)L->layer, &v, &absent))) {
        memcpy(L->error, f->error, sizeof L->error);
        return s;
    }
    if (absent && required) return GG__LFAIL(L, GG_ERR_MISSING, "missing key '%s'", k);
    if (!absent && v > INT32_MAX) return GG__LFAIL(L, GG_ERR_CONFIG, "'%s' = %llu", k,
                                                   (unsigned long long)v);
    if (!absent) *out = (int)v;
    return GG_OK;
}

/* The arch, the layer, and the routing fields of cfg (shapes come later). */
static gg_status gg__routing(gg_layer *L, gg_file *f, const gg_layer_options *o,
                             const struct gg__arch **arch) {
    const gg_kv *a = gg_find_kv(f, "general.architecture");
    char k[96];
    int gating = 0, norm;
    double scale = 1.0;
    int absent;
    size_t i;
    gg_status s;
    if (!a || a->type != GG_STRING)
        return GG__LFAIL(L, a ? GG_ERR_CONFIG : GG_ERR_MISSING, "general.architecture: %s",
                         a ? "not a string" : "missing");
    if (a->count >= sizeof L->arch || memchr(a->value, 0, (size_t)a->count))
        return GG__LFAIL(L, GG_ERR_UNSUPPORTED, "general.architecture is %llu bytes long",
                         (unsigned long long)a->count);
    memcpy(L->arch, a->value, (size_t)a->count);
    for (i = 0; i < sizeof gg__archs / sizeof *gg__archs; i++)
        if (!strcmp(gg__archs[i].name, L->arch)) break;
    if (i == sizeof gg__archs / sizeof *gg__archs)
        return GG__LFAIL(L, GG_ERR_UNSUPPORTED, "architecture '%s': this loader runs llama "
                         "(Mixtral), qwen2moe, qwen3moe, olmoe and deepseek2%s", L->arch,
                         strcmp(L->arch, "gpt-oss") ? "" : " (gpt-oss's clamped SwiGLU with "
                         "biases is not a moe.h activation)");
    *arch = &gg__archs[i];
    norm = gg__archs[i].norm;
    if ((s = gg__routing_uint(L, f, "expert_used_count", o->top_k, 1, &L->cfg.top_k)) ||
        (s = gg__routing_uint(L, f, "expert_gating_func", -1, 0, &gating)) ||
        (s = gg__routing_uint(L, f, "expert_weights_norm", o->norm, 0, &norm)) ||
        (s = gg__routing_uint(L, f, "expert_group_count", o->n_group, 0, &L->cfg.n_group)) ||
        (s = gg__routing_uint(L, f, "expert_group_used_count", o->topk_group, 0,
                              &L->cfg.topk_group)))
        return s;
    if (gating > 2)
        return GG__LFAIL(L, GG_ERR_UNSUPPORTED, "%s.expert_gating_func = %d: moe.h scores by "
                         "softmax (1) or sigmoid (2)", L->arch, gating);
    if (norm > 1) return GG__LFAIL(L, GG_ERR_CONFIG, "%s.expert_weights_norm = %d", L->arch, norm);
    snprintf(k, sizeof k, "%s.expert_weights_scale", L->arch);
    if (o->scale != 0.0) scale = o->scale;
    else if ((s = gg__get_float(f, k, &scale, &absent))) {
        memcpy(L->error, f->error, sizeof L->error);
        return s;
    } else if (absent || scale == 0.0) scale = 1.0;     /* llama.cpp: 0 means unscaled */
    L->cfg.score = gating == 2 ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
    L->cfg.normalize = norm ? MOE_NORM_SUM : MOE_NORM_NONE;
    L->cfg.routed_scale = (float)scale;
    L->cfg.group_score_top = 2;          /* llama.cpp: a group's 2 best keys, summed */
    return GG_OK;
}

/* Load layer opt->layer (or the first MoE layer). On failure L->error says
   what, and nothing is left allocated. */
gg_status gg_load_layer(gg_file *f, const gg_layer_options *opt, gg_layer *L) {
    gg_layer_options o;
    const struct gg__arch *arch = NULL;
    const gg_tensor *t;
    int64_t shp[3];
    moe_status ms;
    gg_status s;
    if (!L) return GG_ERR_ARGUMENT;
    memset(L, 0, sizeof *L);
    if (!f || !f->tensors) return GG__LFAIL(L, GG_ERR_ARGUMENT, "no open file");
    if (opt) o = *opt; else gg_layer_options_default(&o);
    L->layer = o.layer >= 0 ? o.layer : gg__first_moe_layer(f);
    if (L->layer < 0)
        return GG__LFAIL(L, GG_ERR_MISSING, "no MoE layer: no blk.N.ffn_gate_inp.weight");
    if ((s = gg__routing(L, f, &o, &arch)) || (s = gg__check_all_used(L, f))) goto fail;

    /* router ne [D, E]; the experts [D, F, E] (or [D, 2F, E]) and [F, D, E] */
    shp[0] = shp[1] = 0;
    if ((s = gg__take_float(L, f, "ffn_gate_inp.weight", 2, shp, GG__ROUTER))) goto fail;
    L->D = (int32_t)shp[0]; L->E = (int32_t)shp[1];
    if ((s = gg__key_matches(L, f, "expert_count", L->E)) ||
        (s = gg__key_matches(L, f, "embedding_length", L->D)))
        goto fail;
    {
        char n[GG_MAX_NAME + 32];
        snprintf(n, sizeof n, "blk.%d.ffn_gate_up_exps.weight", L->layer);
        L->fused = gg_find(f, n) != NULL;
    }
    shp[0] = L->D; shp[1] = 0; shp[2] = L->E;
    if ((s = gg__take_experts(L, f, L->fused ? "ffn_gate_up_exps.weight" : "ffn_gate_exps.weight",
                              3, shp, GG__GATE, &L->w.gate, &L->w.gate_q, &L->w.gate_type,
                              &L->gate_type)))
        goto fail;
    if (L->fused && shp[1] % 2) {
        s = GG__LFAIL(L, GG_ERR_SHAPE_MISMATCH, "ffn_gate_up_exps has %lld rows an expert, not 2F",
                      (long long)shp[1]);
        goto fail;
    }
    L->F = (int32_t)(L->fused ? shp[1] / 2 : shp[1]);
    if (!L->fused && (s = gg__take_experts(L, f, "ffn_up_exps.weight", 3, shp, GG__UP, &L->w.up,
                                           &L->w.up_q, &L->w.up_type, &L->up_type)))
        goto fail;
    if (L->fused) L->up_type = L->gate_type;
    shp[0] = L->F; shp[1] = L->D; shp[2] = L->E;
    if ((s = gg__take_experts(L, f, "ffn_down_exps.weight", 3, shp, GG__DOWN, &L->w.down,
                              &L->w.down_q, &L->w.down_type, &L->down_type)) ||
        (s = gg__key_matches(L, f, "expert_feed_forward_length", L->F)))
        goto fail;

    /* DeepSeek-V3's selection bias; the shared expert */
    shp[0] = L->E;
    if (gg__tensor(L, f, "exp_probs_b.bias", 1, shp, &t) == GG_OK &&
        (s = gg__take_float(L, f, "exp_probs_b.bias", 1, shp, GG__BIAS)))
        goto fail;
    shp[0] = L->D; shp[1] = 0;
    if (gg__tensor(L, f, "ffn_gate_shexp.weight", 2, shp, &t) != GG_ERR_MISSING) {
        if (!arch->shared) {
            s = GG__LFAIL(L, GG_ERR_UNSUPPORTED, "%s has no shared expert in llama.cpp, but "
                          "the file has blk.%d.ffn_gate_shexp.weight", L->arch, L->layer);
            goto fail;
        }
        shp[0] = L->D; shp[1] = 0;
        if ((s = gg__take_experts(L, f, "ffn_gate_shexp.weight", 2, shp, GG__SH_GATE,
                                  &L->w.shared_gate, &L->w.shared_gate_q,
                                  &L->w.shared_gate_type, &L->shared_type[0])))
            goto fail;
        L->Fs = (int32_t)shp[1];
        if ((s = gg__take_experts(L, f, "ffn_up_shexp.weight", 2, shp, GG__SH_UP,
                                  &L->w.shared_up, &L->w.shared_up_q, &L->w.shared_up_type,
                                  &L->shared_type[1])))
            goto fail;
        shp[0] = L->Fs; shp[1] = L->D;
        if ((s = gg__take_experts(L, f, "ffn_down_shexp.weight", 2, shp, GG__SH_DOWN,
                                  &L->w.shared_down, &L->w.shared_down_q,
                                  &L->w.shared_down_type, &L->shared_type[2])))
            goto fail;
        if (!strcmp(L->arch, "deepseek2") && L->Fs % L->F) {
            s = GG__LFAIL(L, GG_ERR_SHAPE_MISMATCH, "shared expert width %d is not a multiple "
                          "of the experts' %d", (int)L->Fs, (int)L->F);
            goto fail;
        }
        if ((s = !strcmp(L->arch, "deepseek2")
                 ? gg__key_matches(L, f, "expert_shared_count", L->Fs / L->F)
                 : gg__key_matches(L, f, "expert_shared_feed_forward_length", L->Fs)))
            goto fail;
        shp[0] = L->D;
        if (!strcmp(L->arch, "qwen2moe") &&        /* llama.cpp's qwen2moe: always gated */
            (s = gg__take_float(L, f, "ffn_gate_inp_shexp.weight", 1, shp, GG__SH_EGATE)))
            goto fail;
    } else {
        char n[GG_MAX_NAME + 32];
        snprintf(n, sizeof n, "blk.%d.ffn_up_shexp.weight", L->layer);
        if (gg_find(f, n)) {
            s = GG__LFAIL(L, GG_ERR_MISSING, "missing tensor 'blk.%d.ffn_gate_shexp.weight' (the "
                          "shared expert's other tensors are there)", L->layer);
            goto fail;
        }
    }

    /* the config */
    L->cfg.num_experts = L->E; L->cfg.d_model = L->D; L->cfg.d_ff = L->F;
    L->cfg.shared_d_ff = L->Fs;
    L->cfg.shared_expert_gated = L->buf[GG__SH_EGATE] != NULL;
    L->cfg.selection_bias = L->buf[GG__BIAS] != NULL;
    if ((ms = moe_config_resolve(&L->cfg, &L->cfg)) != MOE_STATUS_OK) {
        s = GG__LFAIL(L, GG_ERR_CONFIG, "moe.h refuses the %s layer (E %d, K %d, groups %d keep "
                      "%d): %s", L->arch, (int)L->E, (int)L->cfg.top_k, (int)L->cfg.n_group,
                      (int)L->cfg.topk_group, moe_status_string(ms));
        goto fail;
    }
    L->w.router = L->buf[GG__ROUTER];
    L->w.selection_bias = L->buf[GG__BIAS];
    L->w.gate_up_fused = L->fused;
    L->w.shared_expert_gate = L->buf[GG__SH_EGATE];
    return GG_OK;
fail:
    gg_layer_free(L);
    return s;
}

/* F32 tensor `name` of ne [D, T] (T >= 0 rows of D): a new float copy. */
float *gg_read_rows(const gg_file *f, const char *name, int32_t D, int32_t *T) {
    const gg_tensor *t = gg_find(f, name);
    float *out;
    uint64_t i, n;
    if (!t || t->type != GG_TYPE_F32 || t->ne[0] != D || t->ne[1] > INT32_MAX || t->ne[2] != 1 ||
        t->ne[3] != 1)
        return NULL;
    n = (uint64_t)t->ne[0] * (uint64_t)t->ne[1];
    if (!(out = (float *)malloc(n ? (size_t)n * sizeof(float) : 1))) return NULL;
    for (i = 0; i < n; i++) {
        uint32_t b = (uint32_t)gg__le(t->data + 4 * i, 4);
        memcpy(&out[i], &b, 4);
    }
    *T = (int32_t)t->ne[1];
    return out;
}

/* ===========================================================================
   3. The command line
   =========================================================================== */
#ifndef GGUF_MOE_NO_MAIN
#include <time.h>

static void usage(void) {
    fprintf(stderr,
            "usage: gguf_moe FILE [--layer N] [--top-k K] [--norm 0|1] [--scale S]\n"
            "                [--n-group G] [--topk-group G] [--tokens T] [--isa reference]"
            " [--list]\n"
            "Runs moe_forward on one MoE layer of a llama.cpp GGUF file (routing from its\n"
            "metadata; the options override it). With tensors x and y_ref in the file, the\n"
            "output is checked against y_ref.\n");
}

static int parse_int(const char *s, int lo, int *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v < lo || v > INT32_MAX) return 0;
    *out = (int)v;
    return 1;
}

static void list_file(const gg_file *f) {
    uint64_t i;
    char shape[96];
    printf("GGUF v%u, %llu keys, %llu tensors, alignment %llu\n", (unsigned)f->version,
           (unsigned long long)f->nkv, (unsigned long long)f->ntensors,
           (unsigned long long)f->alignment);
    for (i = 0; i < f->nkv; i++) {
        const gg_kv *kv = &f->kv[i];
        printf("  %-44s ", kv->key);
        if (kv->type == GG_STRING) printf("\"%.*s\"\n", (int)(kv->count > 60 ? 60 : kv->count),
                                          (const char *)kv->value);
        else if (kv->type == GG_ARRAY) printf("array of %llu\n", (unsigned long long)kv->count);
        else if (kv->type == GG_F32 || kv->type == GG_F64) {
            double v = 0;
            int absent;
            gg__get_float((gg_file *)f, kv->key, &v, &absent);
            printf("%g\n", v);
        } else printf("%llu\n", (unsigned long long)gg__le(kv->value, gg__vsize[kv->type]));
    }
    for (i = 0; i < f->ntensors; i++) {
        gg__shape_str(f->tensors[i].ne, f->tensors[i].ndim, shape, sizeof shape);
        printf("  %-44s %-6s ne %s\n", f->tensors[i].name, gg_type_name(f->tensors[i].type), shape);
    }
}

int main(int argc, char **argv) {
    gg_layer_options o;
    const char *path = NULL;
    int list = 0, tokens = 8, reference = 0, i, quantized;
    int32_t T = 0, Tref = 0;
    gg_file f;
    gg_layer L;
    float *x, *y, *yref;
    void *qpacked = NULL;
    moe_info info;
    moe_status ms;
    clock_t t0;
    double ms_taken;
    gg_layer_options_default(&o);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int ok = 1;
        if (!strcmp(a, "--list")) { list = 1; continue; }
        if (a[0] != '-') { if (path) ok = 0; path = a; if (!ok) break; continue; }
        if (!v) ok = 0;
        else if (!strcmp(a, "--layer")) ok = parse_int(v, 0, &o.layer);
        else if (!strcmp(a, "--top-k")) ok = parse_int(v, 1, &o.top_k);
        else if (!strcmp(a, "--norm")) ok = parse_int(v, 0, &o.norm) && o.norm <= 1;
        else if (!strcmp(a, "--n-group")) ok = parse_int(v, 1, &o.n_group);
        else if (!strcmp(a, "--topk-group")) ok = parse_int(v, 1, &o.topk_group);
        else if (!strcmp(a, "--tokens")) ok = parse_int(v, 0, &tokens);
        else if (!strcmp(a, "--isa")) ok = !strcmp(v, "reference") ? (reference = 1) : 0;
        else if (!strcmp(a, "--scale")) {
            char *end;
            o.scale = strtod(v, &end);
            ok = end != v && !*end && o.scale > 0 && o.scale < 1e6;
        } else ok = 0;
        if (!ok) {
            fprintf(stderr, "gguf_moe: bad option %s %s\n", a, v ? v : "");
            usage();
            return 2;
        }
        i++;
    }
    if (!path) { usage(); return 2; }
    if (gg_open(&f, path)) { fprintf(stderr, "error: %s\n", f.error); return 1; }
    if (list) list_file(&f);
    if (gg_load_layer(&f, &o, &L)) {
        fprintf(stderr, "error: %s\n", L.error);
        gg_close(&f);
        return 1;
    }
    if (reference) L.cfg.isa = MOE_ISA_REFERENCE;
    quantized = L.w.gate_type || L.w.up_type || L.w.down_type || L.w.shared_gate_type ||
                L.w.shared_up_type || L.w.shared_down_type;
    printf("%s: %s layer %d, E %d K %d, D %d F %d, shared %d%s%s\n", path, L.arch, L.layer,
           (int)L.E, (int)L.cfg.top_k, (int)L.D, (int)L.F, (int)L.Fs,
           L.Fs ? " " : "", L.Fs ? gg_type_name(L.shared_type[0]) : "");
    if (L.cfg.shared_expert_gated) printf("  (the shared expert is sigmoid-gated)\n");
    printf("  experts: gate%s %s", L.fused ? "_up" : "", gg_type_name(L.gate_type));
    if (!L.fused) printf(", up %s", gg_type_name(L.up_type));
    printf(", down %s; %s, renormalise %s, scale %g", gg_type_name(L.down_type),
           L.cfg.score == MOE_SCORE_SIGMOID ? "sigmoid" : "softmax",
           L.cfg.normalize == MOE_NORM_SUM ? "yes" : "no", (double)L.cfg.routed_scale);
    if (L.cfg.n_group > 1) printf(", groups %d keep %d", (int)L.cfg.n_group, (int)L.cfg.topk_group);
    printf("%s\n", L.w.selection_bias ? ", selection bias" : "");
    x = gg_read_rows(&f, "x", L.D, &T);
    if (!x) {                                   /* synthetic tokens, fixed pattern */
        size_t k;
        T = tokens;
        if (!(x = (float *)malloc((size_t)T * (size_t)L.D * sizeof(float) + 1))) return 1;
        for (k = 0; k < (size_t)T * (size_t)L.D; k++) x[k] = (float)sin(0.37 * (double)k);
    }
    yref = gg_read_rows(&f, "y_ref", L.D, &Tref);
    if (!(y = (float *)malloc((size_t)T * (size_t)L.D * sizeof(float) + 1))) return 1;
    if (quantized && !reference) {   /* the decode layout, as an engine packs at load time */
        size_t qb = 0;
        if (moe_qpack_size(&L.cfg, &L.w, &qb) == MOE_STATUS_OK && (qpacked = malloc(qb)) &&
            moe_qpack_weights(&L.cfg, &L.w, qpacked, qb) == MOE_STATUS_OK) {
            L.w.qpacked = qpacked;
            L.w.qpacked_bytes = qb;
            printf("  decode layout: %.1f MiB (moe_qpack_weights)\n", (double)qb / 1048576.0);
        }
    }
    memset(&info, 0, sizeof info);
    t0 = clock();
    ms = moe_forward_alloc(&L.cfg, &L.w, x, T, y, &info);
    ms_taken = 1e3 * (double)(clock() - t0) / CLOCKS_PER_SEC;
    if (ms != MOE_STATUS_OK) {
        fprintf(stderr, "error: moe_forward: %s\n", moe_status_string(ms));
        return 1;
    }
    printf("  forward: %d tokens, %.2f ms CPU (%s)\n", (int)T, ms_taken,
           reference ? "reference kernels" : "SIMD kernels");
    if (yref && Tref == T) {
        /* fp32 both sides: 1e-5 of the largest output; integer dots (int8
           activations per 32 values) measured 1.05 %: bound 2.5 % */
        const double bound = quantized && !reference ? 2.5e-2 : 1e-5;
        double err = 0, big = 0;
        size_t k;
        for (k = 0; k < (size_t)T * (size_t)L.D; k++) {
            err = fmax(err, fabs((double)y[k] - (double)yref[k]));
            big = fmax(big, fabs((double)yref[k]));
        }
        err /= big > 0 ? big : 1;
        printf("  vs y_ref: max |err| / max |y_ref| = %.3g (bound %.3g) -> %s\n", err, bound,
               err <= bound ? "ok" : "FAIL");
        if (err > bound) return 1;
    }
    free(x); free(y); free(yref); free(qpacked);
    gg_layer_free(&L);
    gg_close(&f);
    return 0;
}
#endif /* GGUF_MOE_NO_MAIN */
