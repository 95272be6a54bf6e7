/* safetensors_moe.c -- run moe.h on one MoE layer of a real checkpoint.
   A small, dependency-free reader of Hugging Face checkpoints: safetensors
   files (8-byte header length, a JSON header parsed by hand, F32 / BF16 / F16
   tensors widened to float), config.json, and the shard index
   model.safetensors.index.json. A loader finds one MoE layer's tensors by
   their HF names, fills a moe_config and moe_weights, and runs moe_forward.
   Naming schemes (those of the HF transformers modules), with prefix
   P = model.layers.{i}.:
     Mixtral      P block_sparse_moe.gate.weight [E][D],
                  P block_sparse_moe.experts.{j}.w1 / w3 / w2.weight (gate, up, down)
     Qwen2-MoE    P mlp.gate.weight, P mlp.experts.{j}.gate_proj / up_proj / down_proj.weight,
                  P mlp.shared_expert.{gate,up,down}_proj.weight, P mlp.shared_expert_gate.weight [1][D]
     Qwen3-MoE,   P mlp.gate.weight, P mlp.experts.{j}.gate_proj / up_proj / down_proj.weight
     OLMoE
     DeepSeek-V3  P mlp.gate.weight, P mlp.gate.e_score_correction_bias [E],
                  P mlp.experts.{j}.{gate,up,down}_proj.weight, P mlp.shared_experts.*
   and for each the transformers 5.x fused names that
   safetensors.torch.save_file(model.state_dict()) writes:
                  P mlp.experts.gate_up_proj [E][2F][D], P mlp.experts.down_proj [E][D][F]
                  (used in place through moe_weights.gate_up_fused = 1).

   A checkpoint is a directory as save_pretrained writes it: config.json,
   then model.safetensors, or shards listed by model.safetensors.index.json
   (a layer may be split across shards; only the shards that hold it are
   opened). The routing comes from config.json, read as transformers reads
   it for the model_type: num_experts_per_tok, norm_topk_prob, n_group,
   topk_group, routed_scaling_factor, scoring_func, topk_method, the shared
   expert's width, and which layers are MoE (decoder_sparse_step,
   mlp_only_layers, first_k_dense_replace); an absent key takes the
   transformers config class's default. The shapes it gives must match the
   tensors. A key that looks like MoE routing but is not one transformers
   reads for that model is an error (ST_ERR_CONFIG), never a silent default;
   --allow-key accepts it unread. Command-line flags override config.json.
   A lone .safetensors file uses the config.json beside it when there is
   one, else its __metadata__ (the test files tests/ref/<case>.safetensors
   carry the routing there), else the model's moe.h preset, with a warning.

   Files are mapped (mmap) on POSIX systems, so a 100 GB checkpoint costs
   only the pages of the layer read; elsewhere they are read whole.

   The input is --input FILE's tensor "x" ([..., D]), else the lone file's
   "x", else T synthetic tokens. When that file also has "y_ref" (the HF
   module's output, as in tests/ref) the output is compared with it.

   build: cc -std=c99 -O2 -o safetensors_moe examples/safetensors_moe.c -lm
   run:   ./safetensors_moe tests/ref/ckpt/deepseek_v3 --input tests/ref/ckpt/deepseek_v3/io.safetensors
          ./safetensors_moe tests/ref/mixtral.safetensors
          ./safetensors_moe CHECKPOINT [--layer N] [--prefix BLOCK_PREFIX] [--input FILE]
              [--model NAME] [--top-k K] [--norm-topk-prob 0|1] [--n-group G] [--topk-group G]
              [--scale S] [--allow-key K1,K2] [--tokens T] [--synthetic] [--out y.safetensors] [--list]

   Every bad input -- a truncated file, a header length past the end, bad
   JSON, unknown dtype, offsets past the end, holes or overlaps between
   tensors, a missing tensor or shard, an index that names a shard without
   the tensor, a config key or value it does not understand, a shape that
   does not fit the layer or the config -- is an st_status with a message,
   and exit status 1; never a crash.

   tests/test_safetensors.c includes this file with SAFETENSORS_MOE_NO_MAIN
   defined and calls st_open_memory / st_checkpoint_init / st_load_layer /
   st_load_checkpoint_layer; then main() and MOE_IMPLEMENTATION are left out. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L       /* mmap and fstat under -std=c99 */
#endif
#ifndef SAFETENSORS_MOE_NO_MAIN
#define MOE_IMPLEMENTATION
#endif
#include "../moe.h"
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define ST_HAVE_MMAP 1
#endif

/* ===========================================================================
   1. The safetensors file
   =========================================================================== */

typedef enum st_status {
    ST_OK = 0,
    ST_ERR_IO = 1,             /* cannot open or read the file                    */
    ST_ERR_TRUNCATED = 2,      /* shorter than the 8-byte header length           */
    ST_ERR_HEADER_SIZE = 3,    /* header length > 100,000,000 or past the end     */
    ST_ERR_JSON = 4,           /* the header, config.json or the index is not the JSON expected */
    ST_ERR_DTYPE = 5,          /* unknown dtype string                            */
    ST_ERR_BAD_SHAPE = 6,      /* rank > ST_MAX_DIMS, or numel * bits overflows / is not whole bytes */
    ST_ERR_OFFSETS = 7,        /* data_offsets begin > end, or end past the data buffer */
    ST_ERR_SIZE = 8,           /* end - begin != numel * element size             */
    ST_ERR_LAYOUT = 9,         /* tensors do not tile the buffer (hole, overlap, trailing bytes) */
    ST_ERR_DUPLICATE = 10,     /* a tensor name (or __metadata__) appears twice   */
    ST_ERR_MISSING = 11,       /* a tensor the layer needs is not in the file     */
    ST_ERR_SHAPE_MISMATCH = 12,/* a tensor's shape does not fit the layer         */
    ST_ERR_UNSUPPORTED = 13,   /* a valid dtype this loader does not convert (F32, BF16, F16 only) */
    ST_ERR_CONFIG = 14,        /* bad option / metadata value, or moe.h rejects the layer's config */
    ST_ERR_NO_MEMORY = 15,
    ST_ERR_ARGUMENT = 16       /* NULL argument                                   */
} st_status;

const char *st_status_string(st_status s) {
    switch (s) {
    case ST_OK: return "ok";
    case ST_ERR_IO: return "cannot read the file";
    case ST_ERR_TRUNCATED: return "file shorter than the 8-byte header length";
    case ST_ERR_HEADER_SIZE: return "header length too large or past the end of the file";
    case ST_ERR_JSON: return "malformed JSON";
    case ST_ERR_DTYPE: return "unknown dtype";
    case ST_ERR_BAD_SHAPE: return "unsupported or overflowing shape";
    case ST_ERR_OFFSETS: return "data_offsets outside the data buffer";
    case ST_ERR_SIZE: return "data_offsets do not match dtype and shape";
    case ST_ERR_LAYOUT: return "tensors do not tile the data buffer";
    case ST_ERR_DUPLICATE: return "duplicate key";
    case ST_ERR_MISSING: return "missing tensor";
    case ST_ERR_SHAPE_MISMATCH: return "tensor shape does not fit the layer";
    case ST_ERR_UNSUPPORTED: return "dtype not supported by this loader";
    case ST_ERR_CONFIG: return "bad layer configuration";
    case ST_ERR_NO_MEMORY: return "out of memory";
    case ST_ERR_ARGUMENT: return "bad argument";
    }
    return "unknown st_status";
}

/* Every dtype string of the safetensors format, with its bits per element. */
typedef enum st_dtype {
    ST_BOOL, ST_U8, ST_I8, ST_I16, ST_U16, ST_I32, ST_U32, ST_I64, ST_U64,
    ST_F16, ST_BF16, ST_F32, ST_F64, ST_F8_E4M3, ST_F8_E5M2, ST_F8_E8M0, ST_F4,
    ST_F6_E2M3, ST_F6_E3M2, ST_C64, ST_F8_E4M3FNUZ, ST_F8_E5M2FNUZ, ST_DTYPE_COUNT
} st_dtype;
static const struct { const char *name; int bits; } st__dtypes[ST_DTYPE_COUNT] = {
    {"BOOL", 8}, {"U8", 8}, {"I8", 8}, {"I16", 16}, {"U16", 16}, {"I32", 32}, {"U32", 32},
    {"I64", 64}, {"U64", 64}, {"F16", 16}, {"BF16", 16}, {"F32", 32}, {"F64", 64},
    {"F8_E4M3", 8}, {"F8_E5M2", 8}, {"F8_E8M0", 8}, {"F4", 4}, {"F6_E2M3", 6}, {"F6_E3M2", 6},
    {"C64", 64}, {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8}};
const char *st_dtype_name(st_dtype d) { return (unsigned)d < ST_DTYPE_COUNT ? st__dtypes[d].name : "?"; }

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER 100000000ull   /* the reference reader's limit */
#define ST__ERRLEN 320

typedef struct st_tensor {
    char *name;                    /* UTF-8, escapes decoded, NUL-terminated      */
    st_dtype dtype;
    int ndim;
    uint64_t shape[ST_MAX_DIMS];   /* row-major, outermost first                  */
    uint64_t numel;
    uint64_t begin, end;           /* byte offsets in the data buffer, end exclusive */
} st_tensor;

typedef struct st_file {
    const unsigned char *data;     /* the byte buffer: file offset 8 + header_size */
    uint64_t data_size;
    uint64_t header_size;          /* N of the first 8 bytes                      */
    st_tensor *tensors;            /* in header order                             */
    int ntensors;
    int *by_name;                  /* tensor indices sorted by name (st_find)     */
    char **meta;                   /* __metadata__: key0, value0, key1, value1, ... */
    int nmeta;
    unsigned char *owned;          /* the file's bytes when st_open read them     */
    void *mapped;                  /* the file's mapping when st_open mapped it   */
    size_t mapped_size;
    char error[ST__ERRLEN];               /* what went wrong, for people                 */
} st_file;

#if defined(__GNUC__) || defined(__clang__)
#define ST__PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define ST__PRINTF(a, b)
#endif
static st_status st__fail(char *buf, size_t n, st_status s, const char *fmt, ...) ST__PRINTF(4, 5);
static st_status st__fail(char *buf, size_t n, st_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, n, fmt, ap);
    va_end(ap);
    return s;
}
#define ST__FAIL(f, s, ...) st__fail((f)->error, sizeof (f)->error, (s), __VA_ARGS__)

void st_close(st_file *f) {
    int i;
    if (!f) return;
    for (i = 0; i < f->ntensors; i++) free(f->tensors[i].name);
    for (i = 0; i < 2 * f->nmeta; i++) free(f->meta[i]);
    free(f->tensors); free(f->by_name); free(f->meta); free(f->owned);
#ifdef ST_HAVE_MMAP
    if (f->mapped) munmap(f->mapped, f->mapped_size);
#endif
    f->tensors = NULL; f->by_name = NULL; f->meta = NULL; f->owned = NULL;
    f->mapped = NULL; f->mapped_size = 0;
    f->ntensors = f->nmeta = 0;
    f->data = NULL; f->data_size = 0;
}

/* --- the JSON header ------------------------------------------------------
   Exactly what safetensors writes: an object whose members are
     "<name>": {"dtype": "<DTYPE>", "shape": [d0, ...], "data_offsets": [begin, end]}
   (the three keys in any order, each once, nothing else), and at most one
     "__metadata__": {"<key>": "<value>", ...}   (strings only)
   with JSON whitespace anywhere between tokens and after the closing brace
   (writers pad with spaces). Strings take every JSON escape (\uXXXX with
   surrogate pairs) and must be valid UTF-8 without NUL; numbers must be
   non-negative integers that fit in 64 bits. No recursion: the nesting depth
   is fixed at two.                                                           */
typedef struct st__json {
    const unsigned char *s, *p, *end;
    st_file *f;                    /* where __metadata__ goes (NULL for config.json) */
    char *err;                     /* the message buffer, ST__ERRLEN bytes          */
    const char *what;              /* "header" or the JSON file's name              */
} st__json;
#define ST__JFAIL(J, s, ...) st__fail((J)->err, ST__ERRLEN, (s), __VA_ARGS__)

static long st__pos(const st__json *J) { return (long)(J->p - J->s); }

static void st__ws(st__json *J) {
    while (J->p < J->end && (*J->p == ' ' || *J->p == '\t' || *J->p == '\n' || *J->p == '\r')) J->p++;
}

static st_status st__expect(st__json *J, char c) {
    st__ws(J);
    if (J->p >= J->end) return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: expected '%c', found the end of the %s", J->what, st__pos(J), c, J->what);
    if (*J->p != (unsigned char)c)
        return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: expected '%c', found '%c' (0x%02x)", J->what, st__pos(J), c,
                        *J->p >= 0x20 && *J->p < 0x7f ? *J->p : '?', *J->p);
    J->p++;
    return ST_OK;
}

/* Next token is c (after whitespace)? Does not consume. */
static int st__peek(st__json *J, char c) { st__ws(J); return J->p < J->end && *J->p == (unsigned char)c; }

static int st__hex4(const unsigned char *p, unsigned *out) {
    unsigned v = 0;
    int i;
    for (i = 0; i < 4; i++) {
        unsigned c = p[i], d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return 0;
        v = v * 16 + d;
    }
    *out = v;
    return 1;
}

/* Length of the valid UTF-8 sequence at p (1..4), 0 if invalid (overlong,
   surrogate, > U+10FFFF, cut short by end).                                  */
static int st__utf8_len(const unsigned char *p, const unsigned char *end) {
    unsigned c = p[0], cp;
    int n, i;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) n = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF) n = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4) n = 4, cp = c & 0x07;
    else return 0;
    if (end - p < n) return 0;
    for (i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (p[i] & 0x3F);
    }
    if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
        return 0;
    return n;
}

static char *st__put_utf8(char *o, unsigned cp) {
    if (cp < 0x80) *o++ = (char)cp;
    else if (cp < 0x800) { *o++ = (char)(0xC0 | (cp >> 6)); *o++ = (char)(0x80 | (cp & 0x3F)); }
    else if (cp < 0x10000) {
        *o++ = (char)(0xE0 | (cp >> 12)); *o++ = (char)(0x80 | ((cp >> 6) & 0x3F)); *o++ = (char)(0x80 | (cp & 0x3F));
    } else {
        *o++ = (char)(0xF0 | (cp >> 18)); *o++ = (char)(0x80 | ((cp >> 12) & 0x3F));
        *o++ = (char)(0x80 | ((cp >> 6) & 0x3F)); *o++ = (char)(0x80 | (cp & 0x3F));
    }
    return o;
}

/* A JSON string, decoded into a new malloc'd NUL-terminated buffer. */
static st_status st__string(st__json *J, char **out) {
    const unsigned char *start, *q;
    char *buf, *o;
    st_status s = st__expect(J, '"');
    *out = NULL;
    if (s) return s;
    start = J->p;
    for (q = start; q < J->end && *q != '"'; q++) if (*q == '\\') { q++; if (q == J->end) break; }
    if (q >= J->end) return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: string never ends", J->what, (long)(start - 1 - J->s));
    /* the decoded string is never longer than its source */
    if (!(buf = (char *)malloc((size_t)(q - start) + 1))) return ST__JFAIL(J, ST_ERR_NO_MEMORY, "out of memory");
    o = buf;
    while (J->p < q) {
        unsigned c = *J->p;
        if (c < 0x20) { free(buf); return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: control character 0x%02x in a string", J->what, st__pos(J), c); }
        if (c == '\\') {
            unsigned cp;
            J->p++;                                   /* J->p < q: the scan above skipped it */
            switch (*J->p) {
            case '"': *o++ = '"'; J->p++; break;
            case '\\': *o++ = '\\'; J->p++; break;
            case '/': *o++ = '/'; J->p++; break;
            case 'b': *o++ = '\b'; J->p++; break;
            case 'f': *o++ = '\f'; J->p++; break;
            case 'n': *o++ = '\n'; J->p++; break;
            case 'r': *o++ = '\r'; J->p++; break;
            case 't': *o++ = '\t'; J->p++; break;
            case 'u':
                if (q - J->p < 5 || !st__hex4(J->p + 1, &cp)) goto bad_escape;
                J->p += 5;
                if (cp >= 0xDC00 && cp <= 0xDFFF) goto bad_escape;          /* lone low surrogate */
                if (cp >= 0xD800 && cp <= 0xDBFF) {                         /* needs its low half */
                    unsigned lo;
                    if (q - J->p < 6 || J->p[0] != '\\' || J->p[1] != 'u' || !st__hex4(J->p + 2, &lo) ||
                        lo < 0xDC00 || lo > 0xDFFF)
                        goto bad_escape;
                    J->p += 6;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                }
                if (cp == 0) { free(buf); return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: \\u0000 in a string", J->what, st__pos(J)); }
                o = st__put_utf8(o, cp);
                break;
            default:
            bad_escape:
                free(buf);
                return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: bad escape sequence in a string", J->what, st__pos(J));
            }
        } else {
            int n = st__utf8_len(J->p, q);
            if (!n) { free(buf); return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: invalid UTF-8 in a string", J->what, st__pos(J)); }
            memcpy(o, J->p, (size_t)n);
            o += n; J->p += n;
        }
    }
    *o = '\0';
    J->p = q + 1;
    *out = buf;
    return ST_OK;
}

static st_status st__uint(st__json *J, uint64_t *out) {
    uint64_t v = 0;
    const unsigned char *start;
    st__ws(J);
    start = J->p;
    if (J->p >= J->end || *J->p < '0' || *J->p > '9')
        return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: expected a non-negative integer", J->what, st__pos(J));
    while (J->p < J->end && *J->p >= '0' && *J->p <= '9') {
        unsigned d = (unsigned)(*J->p - '0');
        if (v > (UINT64_MAX - d) / 10) return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: integer does not fit in 64 bits", J->what, (long)(start - J->s));
        v = v * 10 + d;
        J->p++;
    }
    if (J->p - start > 1 && *start == '0') return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: integer with a leading zero", J->what, (long)(start - J->s));
    if (J->p < J->end && (*J->p == '.' || *J->p == 'e' || *J->p == 'E'))
        return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: expected an integer, found a fraction or exponent", J->what, (long)(start - J->s));
    *out = v;
    return ST_OK;
}

/* [n0, n1, ...] with at most max entries. */
static st_status st__uint_array(st__json *J, uint64_t *v, int max, int *n, const char *what, st_status too_long) {
    st_status s = st__expect(J, '[');
    *n = 0;
    if (s) return s;
    if (st__peek(J, ']')) { J->p++; return ST_OK; }
    for (;;) {
        uint64_t x = 0;
        if ((s = st__uint(J, &x))) return s;
        if (*n == max) return ST__JFAIL(J, too_long, "%s byte %ld: %s has more than %d entries", J->what, st__pos(J), what, max);
        v[(*n)++] = x;
        st__ws(J);
        if (st__peek(J, ',')) { J->p++; continue; }
        return st__expect(J, ']');
    }
}

static st_status st__tensor_entry(st__json *J, st_tensor *t) {
    int seen[3] = {0, 0, 0}, i;
    st_status s = st__expect(J, '{');
    if (s) return s;
    for (;;) {
        char *key = NULL;
        int which;
        if ((s = st__string(J, &key))) return s;
        which = !strcmp(key, "dtype") ? 0 : !strcmp(key, "shape") ? 1 : !strcmp(key, "data_offsets") ? 2 : -1;
        if (which < 0 || seen[which]) {
            s = ST__JFAIL(J, which < 0 ? ST_ERR_JSON : ST_ERR_DUPLICATE, "tensor '%s': %s key \"%.40s\"", t->name,
                         which < 0 ? "unknown" : "duplicate", key);
            free(key);
            return s;
        }
        free(key);
        seen[which] = 1;
        if ((s = st__expect(J, ':'))) return s;
        if (which == 0) {
            char *d = NULL;
            if ((s = st__string(J, &d))) return s;
            for (i = 0; i < ST_DTYPE_COUNT && strcmp(d, st__dtypes[i].name); i++) {}
            if (i == ST_DTYPE_COUNT) {
                s = ST__JFAIL(J, ST_ERR_DTYPE, "tensor '%s': unknown dtype \"%.40s\"", t->name, d);
                free(d);
                return s;
            }
            free(d);
            t->dtype = (st_dtype)i;
        } else if (which == 1) {
            if ((s = st__uint_array(J, t->shape, ST_MAX_DIMS, &t->ndim, "shape", ST_ERR_BAD_SHAPE))) return s;
        } else {
            uint64_t off[2];
            int n;
            if ((s = st__uint_array(J, off, 2, &n, "data_offsets", ST_ERR_JSON))) return s;
            if (n != 2) return ST__JFAIL(J, ST_ERR_JSON, "tensor '%s': data_offsets needs [begin, end]", t->name);
            t->begin = off[0]; t->end = off[1];
        }
        if (st__peek(J, ',')) { J->p++; continue; }
        if ((s = st__expect(J, '}'))) return s;
        break;
    }
    if (!seen[0] || !seen[1] || !seen[2])
        return ST__JFAIL(J, ST_ERR_JSON, "tensor '%s': missing \"%s\"", t->name,
                        !seen[0] ? "dtype" : !seen[1] ? "shape" : "data_offsets");
    return ST_OK;
}

static st_status st__metadata(st__json *J) {
    st_file *f = J->f;
    int cap = 0;
    st_status s = st__expect(J, '{');
    if (s) return s;
    if (st__peek(J, '}')) { J->p++; return ST_OK; }
    for (;;) {
        char *k = NULL, *v = NULL;
        if (f->nmeta == cap) {
            char **m;
            cap = cap ? 2 * cap : 8;
            if (!(m = (char **)realloc(f->meta, (size_t)cap * 2 * sizeof(char *)))) return ST__FAIL(f, ST_ERR_NO_MEMORY, "out of memory");
            f->meta = m;
        }
        if ((s = st__string(J, &k))) return s;
        if ((s = st__expect(J, ':'))) { free(k); return s; }
        if (!st__peek(J, '"')) {
            s = ST__FAIL(f, ST_ERR_JSON, "header byte %ld: __metadata__ \"%.40s\" is not a string (values must be strings)", st__pos(J), k);
            free(k);
            return s;
        }
        if ((s = st__string(J, &v))) { free(k); return s; }
        f->meta[2 * f->nmeta] = k; f->meta[2 * f->nmeta + 1] = v;
        f->nmeta++;
        if (st__peek(J, ',')) { J->p++; continue; }
        return st__expect(J, '}');
    }
}

static int st__cmp_name(const void *a, const void *b, const st_file *f) {
    return strcmp(f->tensors[*(const int *)a].name, f->tensors[*(const int *)b].name);
}
/* qsort has no context pointer in C99: a small merge sort instead. */
static void st__sort(int *idx, int *tmp, int n, const st_file *f,
                     int (*cmp)(const void *, const void *, const st_file *)) {
    int w, i;
    for (w = 1; w < n; w *= 2) {
        for (i = 0; i < n; i += 2 * w) {
            int a = i, am = i + w < n ? i + w : n, b = am, bm = i + 2 * w < n ? i + 2 * w : n, o = i;
            while (a < am && b < bm) tmp[o++] = cmp(&idx[b], &idx[a], f) < 0 ? idx[b++] : idx[a++];
            while (a < am) tmp[o++] = idx[a++];
            while (b < bm) tmp[o++] = idx[b++];
        }
        memcpy(idx, tmp, (size_t)n * sizeof(int));
    }
}
static int st__cmp_offset(const void *a, const void *b, const st_file *f) {
    const st_tensor *x = &f->tensors[*(const int *)a], *y = &f->tensors[*(const int *)b];
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* Bytes of numel elements of a dtype, 0 with *ok = 0 when it overflows or is
   not a whole number of bytes (sub-byte types). */
static uint64_t st__bytes(st_dtype d, uint64_t numel, int *ok) {
    uint64_t bits = (uint64_t)st__dtypes[d].bits;
    *ok = 1;
    if (numel > UINT64_MAX / bits || (numel * bits) % 8 != 0) { *ok = 0; return 0; }
    return numel * bits / 8;
}

/* Everything the reference reader checks, after the JSON parsed. */
static st_status st__validate(st_file *f) {
    int i, *idx, *tmp;
    uint64_t cursor = 0;
    for (i = 0; i < f->ntensors; i++) {
        st_tensor *t = &f->tensors[i];
        uint64_t numel = 1, bytes;
        int d, ok;
        for (d = 0; d < t->ndim; d++) {
            if (t->shape[d] != 0 && numel > UINT64_MAX / t->shape[d])
                return ST__FAIL(f, ST_ERR_BAD_SHAPE, "tensor '%s': element count overflows 64 bits", t->name);
            numel *= t->shape[d];
        }
        t->numel = numel;
        bytes = st__bytes(t->dtype, numel, &ok);
        if (!ok) return ST__FAIL(f, ST_ERR_BAD_SHAPE, "tensor '%s': %llu elements of %s are not a whole number of bytes",
                                 t->name, (unsigned long long)numel, st_dtype_name(t->dtype));
        if (t->begin > t->end || t->end > f->data_size)
            return ST__FAIL(f, ST_ERR_OFFSETS, "tensor '%s': data_offsets [%llu, %llu] outside the data buffer of %llu bytes%s",
                            t->name, (unsigned long long)t->begin, (unsigned long long)t->end,
                            (unsigned long long)f->data_size, t->end > f->data_size ? " (truncated file?)" : "");
        if (t->end - t->begin != bytes)
            return ST__FAIL(f, ST_ERR_SIZE, "tensor '%s': data_offsets [%llu, %llu] span %llu bytes, but %llu x %s needs %llu",
                            t->name, (unsigned long long)t->begin, (unsigned long long)t->end,
                            (unsigned long long)(t->end - t->begin), (unsigned long long)numel,
                            st_dtype_name(t->dtype), (unsigned long long)bytes);
    }
    /* sorted by begin, the tensors must tile [0, data_size) exactly */
    idx = (int *)malloc((size_t)(f->ntensors + 1) * sizeof(int));
    tmp = (int *)malloc((size_t)(f->ntensors + 1) * sizeof(int));
    if (!idx || !tmp) { free(idx); free(tmp); return ST__FAIL(f, ST_ERR_NO_MEMORY, "out of memory"); }
    for (i = 0; i < f->ntensors; i++) idx[i] = i;
    st__sort(idx, tmp, f->ntensors, f, st__cmp_offset);
    for (i = 0; i < f->ntensors; i++) {
        const st_tensor *t = &f->tensors[idx[i]];
        if (t->begin != cursor) {
            st_status s = ST__FAIL(f, ST_ERR_LAYOUT, "tensor '%s' starts at byte %llu, but the previous tensor ends at %llu (%s)",
                                   t->name, (unsigned long long)t->begin, (unsigned long long)cursor,
                                   t->begin > cursor ? "a hole" : "an overlap");
            free(idx); free(tmp);
            return s;
        }
        cursor = t->end;
    }
    if (cursor != f->data_size) {
        free(idx); free(tmp);
        return ST__FAIL(f, ST_ERR_LAYOUT, "the tensors end at byte %llu of a %llu-byte data buffer (trailing bytes)",
                        (unsigned long long)cursor, (unsigned long long)f->data_size);
    }
    /* names: sorted once for st_find, which also finds duplicates */
    for (i = 0; i < f->ntensors; i++) idx[i] = i;
    st__sort(idx, tmp, f->ntensors, f, st__cmp_name);
    free(tmp);
    for (i = 1; i < f->ntensors; i++)
        if (!strcmp(f->tensors[idx[i]].name, f->tensors[idx[i - 1]].name)) {
            st_status s = ST__FAIL(f, ST_ERR_DUPLICATE, "tensor name '%s' appears twice", f->tensors[idx[i]].name);
            free(idx);
            return s;
        }
    f->by_name = idx;
    for (i = 0; i < f->nmeta; i++) {
        int j;
        for (j = 0; j < i; j++)
            if (!strcmp(f->meta[2 * i], f->meta[2 * j]))
                return ST__FAIL(f, ST_ERR_DUPLICATE, "__metadata__ key '%s' appears twice", f->meta[2 * i]);
    }
    return ST_OK;
}

static st_status st__parse(st_file *f, const unsigned char *bytes, size_t size) {
    st__json J;
    uint64_t n = 0;
    int i, cap = 0, have_meta = 0;
    st_status s;
    if (size < 8) return ST__FAIL(f, ST_ERR_TRUNCATED, "the file has %lu bytes; a safetensors file starts with an 8-byte header length", (unsigned long)size);
    for (i = 7; i >= 0; i--) n = (n << 8) | bytes[i];            /* little-endian u64 */
    if (n > ST_MAX_HEADER) return ST__FAIL(f, ST_ERR_HEADER_SIZE, "header length %llu exceeds the limit of 100,000,000 bytes", (unsigned long long)n);
    if (n > (uint64_t)size - 8)
        return ST__FAIL(f, ST_ERR_HEADER_SIZE, "header length %llu runs past the end of the file (%lu bytes after the length)",
                        (unsigned long long)n, (unsigned long)(size - 8));
    f->header_size = n;
    f->data = bytes + 8 + n;
    f->data_size = (uint64_t)size - 8 - n;
    J.s = J.p = bytes + 8; J.end = bytes + 8 + n; J.f = f; J.err = f->error; J.what = "header";
    if (n == 0 || *J.p != '{') return ST__FAIL(f, ST_ERR_JSON, "the header does not start with '{'");
    J.p++;
    if (!st__peek(&J, '}')) {
        for (;;) {
            char *name = NULL;
            if ((s = st__string(&J, &name))) return s;
            if ((s = st__expect(&J, ':'))) { free(name); return s; }
            if (!strcmp(name, "__metadata__")) {
                free(name);
                if (have_meta++) return ST__FAIL(f, ST_ERR_DUPLICATE, "__metadata__ appears twice");
                if ((s = st__metadata(&J))) return s;
            } else {
                st_tensor *t;
                if (f->ntensors == cap) {
                    st_tensor *nt;
                    cap = cap ? 2 * cap : 64;
                    if (!(nt = (st_tensor *)realloc(f->tensors, (size_t)cap * sizeof *nt))) { free(name); return ST__FAIL(f, ST_ERR_NO_MEMORY, "out of memory"); }
                    f->tensors = nt;
                }
                t = &f->tensors[f->ntensors++];
                memset(t, 0, sizeof *t);
                t->name = name;
                if ((s = st__tensor_entry(&J, t))) return s;
            }
            if (st__peek(&J, ',')) { J.p++; continue; }
            break;
        }
    }
    if ((s = st__expect(&J, '}'))) return s;
    st__ws(&J);
    if (J.p != J.end) return ST__FAIL(f, ST_ERR_JSON, "%s byte %ld: unexpected data after the closing '}'", J.what, st__pos(&J));
    return st__validate(f);
}

/* Open a file image held in memory (borrowed: it must outlive f). */
st_status st_open_memory(st_file *f, const void *bytes, size_t size) {
    st_status s;
    if (!f) return ST_ERR_ARGUMENT;
    memset(f, 0, sizeof *f);
    if (!bytes && size) return ST__FAIL(f, ST_ERR_ARGUMENT, "NULL buffer");
    s = st__parse(f, (const unsigned char *)bytes, bytes ? size : 0);
    if (s) { char keep[sizeof f->error]; memcpy(keep, f->error, sizeof keep); st_close(f); memcpy(f->error, keep, sizeof keep); }
    return s;
}

/* Read all of a stream into memory, then parse it (f owns the bytes). */
st_status st_open_stream(st_file *f, FILE *fp, const char *what) {
    unsigned char *buf = NULL;
    size_t len = 0, cap = 0;
    st_status s;
    if (!f) return ST_ERR_ARGUMENT;
    memset(f, 0, sizeof *f);
    if (!fp) return ST__FAIL(f, ST_ERR_IO, "cannot open '%s'", what ? what : "(null)");
    for (;;) {
        size_t got;
        if (len == cap) {
            unsigned char *nb;
            size_t ncap = cap ? 2 * cap : 1 << 16;
            if (ncap < cap || !(nb = (unsigned char *)realloc(buf, ncap))) { free(buf); return ST__FAIL(f, ST_ERR_NO_MEMORY, "out of memory reading '%s'", what); }
            buf = nb; cap = ncap;
        }
        got = fread(buf + len, 1, cap - len, fp);
        len += got;
        if (got == 0) break;
    }
    if (ferror(fp)) { free(buf); return ST__FAIL(f, ST_ERR_IO, "read error on '%s'", what); }
    s = st_open_memory(f, buf, len);
    if (s) { free(buf); return s; }
    f->owned = buf;
    return ST_OK;
}

/* Open a file: mapped where the system can (a 100 GB checkpoint then costs
   only the pages of the layer read), else read whole.                       */
st_status st_open(st_file *f, const char *path) {
    FILE *fp;
    st_status s;
    if (!f || !path) { if (f) memset(f, 0, sizeof *f); return ST_ERR_ARGUMENT; }
#ifdef ST_HAVE_MMAP
    {
        struct stat sb;
        void *mem;
        int fd = open(path, O_RDONLY);
        if (fd >= 0 && !fstat(fd, &sb) && S_ISREG(sb.st_mode) && sb.st_size > 0 &&
            (uint64_t)sb.st_size <= (size_t)-1 &&
            (mem = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0)) != MAP_FAILED) {
            close(fd);
            if ((s = st_open_memory(f, mem, (size_t)sb.st_size)) != ST_OK) {
                munmap(mem, (size_t)sb.st_size);
                return s;
            }
            f->mapped = mem;
            f->mapped_size = (size_t)sb.st_size;
            return ST_OK;
        }
        if (fd >= 0) close(fd);                  /* empty, not a file, or no mapping */
    }
#endif
    fp = fopen(path, "rb");
    s = st_open_stream(f, fp, path);
    if (fp) fclose(fp);
    return s;
}

/* The tensor called name, or NULL (binary search over the sorted names). */
const st_tensor *st_find(const st_file *f, const char *name) {
    int lo = 0, hi;
    if (!f || !name || !f->by_name) return NULL;
    hi = f->ntensors - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2, c = strcmp(name, f->tensors[f->by_name[mid]].name);
        if (!c) return &f->tensors[f->by_name[mid]];
        if (c < 0) hi = mid - 1; else lo = mid + 1;
    }
    return NULL;
}

/* A __metadata__ value, or NULL. */
const char *st_meta(const st_file *f, const char *key) {
    int i;
    if (!f || !key) return NULL;
    for (i = 0; i < f->nmeta; i++) if (!strcmp(f->meta[2 * i], key)) return f->meta[2 * i + 1];
    return NULL;
}

/* Little-endian bytes to float, whatever the alignment or the host order. */
static float st__f32_bits(uint32_t u) { float v; memcpy(&v, &u, sizeof v); return v; }
float st_bf16_to_f32(uint16_t h) { return st__f32_bits((uint32_t)h << 16); }
float st_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31u, man = h & 1023u;
    if (exp == 31) return st__f32_bits(sign | 0x7F800000u | (man << 13));      /* Inf, NaN */
    if (exp == 0) {                                                             /* 0, subnormal: man * 2^-24 */
        float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    return st__f32_bits(sign | ((exp + 112u) << 23) | (man << 13));
}

/* Convert a whole tensor to float (out holds numel floats). */
st_status st_read_f32(const st_file *f, const st_tensor *t, float *out, char *err, size_t errlen) {
    const unsigned char *p;
    uint64_t i;
    if (!f || !t || (!out && t->numel)) return ST_ERR_ARGUMENT;
    if (t->begin > t->end || t->end > f->data_size) return st__fail(err, errlen, ST_ERR_OFFSETS, "tensor '%s' lies outside the buffer", t->name);
    p = f->data + t->begin;
    switch (t->dtype) {
    case ST_F32:
        for (i = 0; i < t->numel; i++, p += 4)
            out[i] = st__f32_bits((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        return ST_OK;
    case ST_BF16:
        for (i = 0; i < t->numel; i++, p += 2) out[i] = st_bf16_to_f32((uint16_t)(p[0] | p[1] << 8));
        return ST_OK;
    case ST_F16:
        for (i = 0; i < t->numel; i++, p += 2) out[i] = st_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
        return ST_OK;
    default:
        return st__fail(err, errlen, ST_ERR_UNSUPPORTED, "tensor '%s' is %s; this loader converts F32, BF16 and F16 "
                        "(dequantize FP8 / MXFP4 checkpoints first)", t->name, st_dtype_name(t->dtype));
    }
}

/* ===========================================================================
   2. A checkpoint directory: config.json and the shard index
   =========================================================================== */

/* --- config.json -----------------------------------------------------------
   Any JSON object. Each member is kept as (key, value): numbers, strings,
   booleans, null and arrays of integers are decoded; other arrays and objects
   are checked (nesting up to ST__MAX_DEPTH) and kept as ST_JOTHER. A key that
   appears twice is ST_ERR_DUPLICATE: Python's json keeps the last one, and a
   loader that guessed would hide a broken file. The same parser reads
   model.safetensors.index.json.                                              */
#define ST__MAX_DEPTH 64

typedef enum st_jtype { ST_JNULL, ST_JBOOL, ST_JNUMBER, ST_JSTRING, ST_JINTS, ST_JOTHER } st_jtype;

typedef struct st_config_item {
    char *key;
    st_jtype type;
    double number;              /* ST_JNUMBER; ST_JBOOL: 0 or 1                       */
    int is_integer;             /* a number without fraction or exponent, |v| < 2^53 */
    char *string;               /* ST_JSTRING                                         */
    int64_t *ints;              /* ST_JINTS: the array's entries ([] included)        */
    int nints;
} st_config_item;

typedef struct st_config {
    st_config_item *items;      /* in file order                                     */
    int nitems;
    char error[ST__ERRLEN];
} st_config;

void st_config_free(st_config *c) {
    int i;
    if (!c) return;
    for (i = 0; i < c->nitems; i++) {
        free(c->items[i].key); free(c->items[i].string); free(c->items[i].ints);
    }
    free(c->items);
    c->items = NULL;
    c->nitems = 0;
}

const st_config_item *st_config_get(const st_config *c, const char *key) {
    int i;
    if (!c || !key) return NULL;
    for (i = 0; i < c->nitems; i++) if (!strcmp(c->items[i].key, key)) return &c->items[i];
    return NULL;
}

static st_status st__literal(st__json *J, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(J->end - J->p) < n || memcmp(J->p, word, n))
        return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: expected a JSON value", J->what, st__pos(J));
    J->p += n;
    return ST_OK;
}

static int st__digit(const unsigned char *p, const unsigned char *end) { return p < end && *p >= '0' && *p <= '9'; }

/* A JSON number (RFC 8259 grammar), converted with strtod. */
static st_status st__number(st__json *J, double *v, int *is_integer) {
    const unsigned char *q = J->p, *start = J->p;
    char buf[64];
    int whole = 1;
    if (q < J->end && *q == '-') q++;
    if (!st__digit(q, J->end)) return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: expected a JSON value", J->what, st__pos(J));
    if (*q == '0') q++; else while (st__digit(q, J->end)) q++;
    if (q < J->end && *q == '.') {
        q++; whole = 0;
        if (!st__digit(q, J->end)) return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: bad number", J->what, st__pos(J));
        while (st__digit(q, J->end)) q++;
    }
    if (q < J->end && (*q == 'e' || *q == 'E')) {
        q++; whole = 0;
        if (q < J->end && (*q == '+' || *q == '-')) q++;
        if (!st__digit(q, J->end)) return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: bad number", J->what, st__pos(J));
        while (st__digit(q, J->end)) q++;
    }
    if ((size_t)(q - start) >= sizeof buf)
        return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: number longer than 63 characters", J->what, st__pos(J));
    memcpy(buf, start, (size_t)(q - start));
    buf[q - start] = '\0';
    *v = strtod(buf, NULL);
    if (!(*v - *v == 0.0))                                   /* overflowed to +-inf */
        return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: number out of range", J->what, st__pos(J));
    *is_integer = whole && fabs(*v) < 9007199254740992.0;
    J->p = q;
    return ST_OK;
}

/* Any JSON value. With it, the value is decoded into it (top-level members);
   without, it is only checked (nested values). */
static st_status st__any(st__json *J, int depth, st_config_item *it) {
    st_status s;
    st__ws(J);
    if (J->p >= J->end) return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: expected a JSON value, found the end", J->what, st__pos(J));
    if (depth > ST__MAX_DEPTH) return ST__JFAIL(J, ST_ERR_JSON, "%s byte %ld: nested deeper than %d", J->what, st__pos(J), ST__MAX_DEPTH);
    switch (*J->p) {
    case '"': {
        char *str = NULL;
        if ((s = st__string(J, &str))) return s;
        if (it) { it->type = ST_JSTRING; it->string = str; } else free(str);
        return ST_OK;
    }
    case 't': case 'f': case 'n': {
        const char *word = *J->p == 't' ? "true" : *J->p == 'f' ? "false" : "null";
        if ((s = st__literal(J, word))) return s;
        if (it) { it->type = *word == 'n' ? ST_JNULL : ST_JBOOL; it->number = *word == 't'; }
        return ST_OK;
    }
    case '[': {
        int cap = 0;
        J->p++;
        if (it) it->type = ST_JINTS;
        if (st__peek(J, ']')) { J->p++; return ST_OK; }
        for (;;) {
            st__ws(J);
            if (it && it->type == ST_JINTS && J->p < J->end && (*J->p == '-' || st__digit(J->p, J->end))) {
                double v;
                int whole;
                if ((s = st__number(J, &v, &whole))) return s;
                if (!whole) it->type = ST_JOTHER;
                else {
                    if (it->nints == cap) {
                        int64_t *n2;
                        cap = cap ? 2 * cap : 8;
                        if (!(n2 = (int64_t *)realloc(it->ints, (size_t)cap * sizeof *n2)))
                            return ST__JFAIL(J, ST_ERR_NO_MEMORY, "out of memory");
                        it->ints = n2;
                    }
                    it->ints[it->nints++] = (int64_t)v;
                }
            } else {
                if ((s = st__any(J, depth + 1, NULL))) return s;
                if (it) it->type = ST_JOTHER;
            }
            if (st__peek(J, ',')) { J->p++; continue; }
            return st__expect(J, ']');
        }
    }
    case '{':
        J->p++;
        if (it) it->type = ST_JOTHER;
        if (st__peek(J, '}')) { J->p++; return ST_OK; }
        for (;;) {
            char *key = NULL;
            if ((s = st__string(J, &key))) return s;
            free(key);
            if ((s = st__expect(J, ':')) || (s = st__any(J, depth + 1, NULL))) return s;
            if (st__peek(J, ',')) { J->p++; continue; }
            return st__expect(J, '}');
        }
    default: {
        double v;
        int whole;
        if ((s = st__number(J, &v, &whole))) return s;
        if (it) { it->type = ST_JNUMBER; it->number = v; it->is_integer = whole; }
        return ST_OK;
    }
    }
}

/* Parse a JSON object's text (config.json); what names it in messages. */
st_status st_config_parse(st_config *c, const char *text, size_t len, const char *what) {
    st__json J;
    st_status s = ST_OK;
    int cap = 0;
    if (!c) return ST_ERR_ARGUMENT;
    memset(c, 0, sizeof *c);
    if (!text && len) return st__fail(c->error, sizeof c->error, ST_ERR_ARGUMENT, "NULL text");
    J.s = J.p = (const unsigned char *)text; J.end = J.s + (text ? len : 0);
    J.f = NULL; J.err = c->error; J.what = what ? what : "config.json";
    if ((s = st__expect(&J, '{'))) goto fail;
    if (st__peek(&J, '}')) J.p++;
    else for (;;) {
        st_config_item *it;
        int i;
        if (c->nitems == cap) {
            st_config_item *n2;
            cap = cap ? 2 * cap : 32;
            if (!(n2 = (st_config_item *)realloc(c->items, (size_t)cap * sizeof *n2))) {
                s = ST__JFAIL(&J, ST_ERR_NO_MEMORY, "out of memory"); goto fail;
            }
            c->items = n2;
        }
        it = &c->items[c->nitems];
        memset(it, 0, sizeof *it);
        if ((s = st__string(&J, &it->key))) goto fail;
        c->nitems++;
        for (i = 0; i < c->nitems - 1; i++)
            if (!strcmp(c->items[i].key, it->key)) {
                s = ST__JFAIL(&J, ST_ERR_DUPLICATE, "%s: key \"%.60s\" appears twice", J.what, it->key);
                goto fail;
            }
        if ((s = st__expect(&J, ':')) || (s = st__any(&J, 1, it))) goto fail;
        if (st__peek(&J, ',')) { J.p++; continue; }
        if ((s = st__expect(&J, '}'))) goto fail;
        break;
    }
    st__ws(&J);
    if (J.p != J.end) { s = ST__JFAIL(&J, ST_ERR_JSON, "%s byte %ld: data after the closing '}'", J.what, st__pos(&J)); goto fail; }
    return ST_OK;
fail:
    st_config_free(c);
    return s;
}

/* --- the shards ------------------------------------------------------------
   A checkpoint is config.json (optional for a lone file) and either one
   model.safetensors or shards listed by model.safetensors.index.json:
     {"metadata": {...}, "weight_map": {"<tensor>": "<shard file>", ...}}
   Shards are opened (mapped) when a tensor in them is first needed, through
   open_shard, so loading one layer of a 160-shard model touches the shards
   that hold that layer. Shard names must be plain file names in the same
   directory: no '/', '\\' or "..".                                           */
typedef struct st_map_entry { char *name; int shard; } st_map_entry;
typedef st_status (*st_shard_open_fn)(void *user, const char *shard, st_file *out);

typedef struct st_checkpoint {
    st_config config;
    int has_config;
    int nshards;
    char **shard_names;
    st_file *shards;
    signed char *shard_state;       /* 0: not opened yet, 1: open, -1: failed      */
    int borrowed;                   /* shards[0] belongs to the caller (st_load_layer) */
    st_map_entry *map;              /* the weight_map, sorted by name; none: one shard */
    int nmap;
    st_shard_open_fn open_shard;
    void *user;
    char dir[1024];                 /* st_checkpoint_open's directory ("" : cwd)   */
    char error[ST__ERRLEN];
} st_checkpoint;

void st_checkpoint_close(st_checkpoint *ck) {
    int i;
    if (!ck) return;
    st_config_free(&ck->config);
    for (i = 0; i < ck->nshards; i++) {
        if (ck->shards && ck->shard_state[i] == 1 && !ck->borrowed) st_close(&ck->shards[i]);
        if (ck->shard_names) free(ck->shard_names[i]);
    }
    for (i = 0; i < ck->nmap; i++) free(ck->map[i].name);
    if (!ck->borrowed) free(ck->shards);
    free(ck->shard_names); free(ck->shard_state); free(ck->map);
    ck->shards = NULL; ck->shard_names = NULL; ck->shard_state = NULL; ck->map = NULL;
    ck->nshards = ck->nmap = ck->has_config = 0;
}

static st_status st__add_shard(st_checkpoint *ck, const char *name, int *index) {
    int i;
    char **n2;
    for (i = 0; i < ck->nshards; i++) if (!strcmp(ck->shard_names[i], name)) { *index = i; return ST_OK; }
    if (!*name || strchr(name, '/') || strchr(name, '\\') || !strcmp(name, ".") || !strcmp(name, "..") ||
        strlen(name) >= 256)
        return st__fail(ck->error, sizeof ck->error, ST_ERR_CONFIG, "shard name \"%.60s\" is not a plain file "
                        "name in the checkpoint's directory", name);
    if (!(n2 = (char **)realloc(ck->shard_names, (size_t)(ck->nshards + 1) * sizeof *n2)))
        return st__fail(ck->error, sizeof ck->error, ST_ERR_NO_MEMORY, "out of memory");
    ck->shard_names = n2;
    if (!(n2[ck->nshards] = (char *)malloc(strlen(name) + 1)))
        return st__fail(ck->error, sizeof ck->error, ST_ERR_NO_MEMORY, "out of memory");
    strcpy(n2[ck->nshards], name);
    *index = ck->nshards++;
    return ST_OK;
}

static int st__cmp_entry(const void *a, const void *b) {
    return strcmp(((const st_map_entry *)a)->name, ((const st_map_entry *)b)->name);
}

/* The weight_map of model.safetensors.index.json. */
static st_status st__parse_index(st_checkpoint *ck, const char *text, size_t len) {
    st__json J;
    st_status s;
    int have_map = 0, cap = 0, i;
    J.s = J.p = (const unsigned char *)text; J.end = J.s + len;
    J.f = NULL; J.err = ck->error; J.what = "model.safetensors.index.json";
    if ((s = st__expect(&J, '{'))) return s;
    if (!st__peek(&J, '}')) for (;;) {
        char *key = NULL;
        if ((s = st__string(&J, &key))) return s;
        if ((s = st__expect(&J, ':'))) { free(key); return s; }
        if (strcmp(key, "weight_map")) { free(key); if ((s = st__any(&J, 1, NULL))) return s; }
        else {
            free(key);
            if (have_map++) return ST__JFAIL(&J, ST_ERR_DUPLICATE, "%s: \"weight_map\" appears twice", J.what);
            if ((s = st__expect(&J, '{'))) return s;
            if (!st__peek(&J, '}')) for (;;) {
                char *tensor = NULL, *shard = NULL;
                int k;
                if ((s = st__string(&J, &tensor))) return s;
                if ((s = st__expect(&J, ':')) || !st__peek(&J, '"')) {
                    free(tensor);
                    return s ? s : ST__JFAIL(&J, ST_ERR_JSON, "%s byte %ld: a weight_map value must be a "
                                             "file name string", J.what, st__pos(&J));
                }
                if ((s = st__string(&J, &shard))) { free(tensor); return s; }
                s = st__add_shard(ck, shard, &k);
                free(shard);
                if (!s && ck->nmap == cap) {
                    st_map_entry *m2;
                    cap = cap ? 2 * cap : 64;
                    if (!(m2 = (st_map_entry *)realloc(ck->map, (size_t)cap * sizeof *m2)))
                        s = st__fail(ck->error, sizeof ck->error, ST_ERR_NO_MEMORY, "out of memory");
                    else ck->map = m2;
                }
                if (s) { free(tensor); return s; }
                ck->map[ck->nmap].name = tensor;
                ck->map[ck->nmap++].shard = k;
                if (st__peek(&J, ',')) { J.p++; continue; }
                if ((s = st__expect(&J, '}'))) return s;
                break;
            } else J.p++;
        }
        if (st__peek(&J, ',')) { J.p++; continue; }
        if ((s = st__expect(&J, '}'))) return s;
        break;
    } else J.p++;
    st__ws(&J);
    if (J.p != J.end) return ST__JFAIL(&J, ST_ERR_JSON, "%s byte %ld: data after the closing '}'", J.what, st__pos(&J));
    if (!have_map) return st__fail(ck->error, sizeof ck->error, ST_ERR_JSON, "%s has no \"weight_map\"", J.what);
    if (!ck->nmap) return st__fail(ck->error, sizeof ck->error, ST_ERR_JSON, "%s: the weight_map is empty", J.what);
    qsort(ck->map, (size_t)ck->nmap, sizeof *ck->map, st__cmp_entry);
    for (i = 1; i < ck->nmap; i++)
        if (!strcmp(ck->map[i].name, ck->map[i - 1].name))
            return st__fail(ck->error, sizeof ck->error, ST_ERR_DUPLICATE, "%s: tensor '%s' appears twice in "
                            "the weight_map", J.what, ck->map[i].name);
    return ST_OK;
}

static st_status st__ck_fail(st_checkpoint *ck, st_status s) {
    char keep[ST__ERRLEN];
    memcpy(keep, ck->error, sizeof keep);
    st_checkpoint_close(ck);
    memcpy(ck->error, keep, sizeof keep);
    return s;
}

/* Open shard k if it is not open yet. */
static st_status st__ck_shard(st_checkpoint *ck, int k) {
    st_status s;
    if (ck->shard_state[k] == 1) return ST_OK;
    if (ck->shard_state[k] < 0)
        return st__fail(ck->error, sizeof ck->error, ST_ERR_IO, "shard '%s' failed to open", ck->shard_names[k]);
    if ((s = ck->open_shard(ck->user, ck->shard_names[k], &ck->shards[k])) != ST_OK) {
        ck->shard_state[k] = -1;
        return st__fail(ck->error, sizeof ck->error, s, "%s: %s", ck->shard_names[k], ck->shards[k].error);
    }
    ck->shard_state[k] = 1;
    return ST_OK;
}

/* Set up a checkpoint from the texts of config.json (NULL: none) and of
   model.safetensors.index.json (NULL: the one shard single_shard). Shards
   open through open_shard(user, name, out) when first needed.                */
st_status st_checkpoint_init(st_checkpoint *ck, const char *config_json, size_t config_len,
                             const char *index_json, size_t index_len, const char *single_shard,
                             st_shard_open_fn open_shard, void *user) {
    st_status s;
    int k;
    if (!ck) return ST_ERR_ARGUMENT;
    memset(ck, 0, sizeof *ck);
    if (!open_shard || (!index_json && !single_shard))
        return st__fail(ck->error, sizeof ck->error, ST_ERR_ARGUMENT, "no shard opener, or neither an index nor a shard");
    ck->open_shard = open_shard;
    ck->user = user;
    if (config_json) {
        if ((s = st_config_parse(&ck->config, config_json, config_len, "config.json")) != ST_OK) {
            memcpy(ck->error, ck->config.error, sizeof ck->error);
            return st__ck_fail(ck, s);
        }
        ck->has_config = 1;
    }
    s = index_json ? st__parse_index(ck, index_json, index_len) : st__add_shard(ck, single_shard, &k);
    if (s) return st__ck_fail(ck, s);
    ck->shards = (st_file *)calloc((size_t)ck->nshards, sizeof *ck->shards);
    ck->shard_state = (signed char *)calloc((size_t)ck->nshards, 1);
    if (!ck->shards || !ck->shard_state)
        return st__ck_fail(ck, st__fail(ck->error, sizeof ck->error, ST_ERR_NO_MEMORY, "out of memory"));
    return ST_OK;
}

/* Is a tensor called name in the checkpoint? (The index alone answers for a
   sharded one: nothing is opened. A lone shard is open: st__ck_ready.) */
static int st__ck_has(const st_checkpoint *ck, const char *name) {
    st_map_entry key;
    if (!ck->nmap) return st_find(&ck->shards[0], name) != NULL;
    key.name = (char *)name;
    return bsearch(&key, ck->map, (size_t)ck->nmap, sizeof key, st__cmp_entry) != NULL;
}

/* The tensor called name, opening its shard; NULL with *s = ST_OK when the
   checkpoint has no such tensor, else *s (and ck->error) say what failed. */
static const st_tensor *st__ck_find(st_checkpoint *ck, const char *name, const st_file **owner, st_status *s) {
    const st_tensor *t;
    st_map_entry key, *e = NULL;
    int k = 0;
    *s = ST_OK;
    if (ck->nmap) {
        key.name = (char *)name;
        if (!(e = (st_map_entry *)bsearch(&key, ck->map, (size_t)ck->nmap, sizeof key, st__cmp_entry))) return NULL;
        k = e->shard;
        if ((*s = st__ck_shard(ck, k)) != ST_OK) return NULL;
    }
    if (!(t = st_find(&ck->shards[k], name)) && e)
        *s = st__fail(ck->error, sizeof ck->error, ST_ERR_MISSING, "model.safetensors.index.json puts '%s' in "
                      "'%s', which does not hold it", name, ck->shard_names[k]);
    *owner = &ck->shards[k];
    return t;
}

/* A checkpoint without an index opens its one shard before anything else. */
static st_status st__ck_ready(st_checkpoint *ck) { return ck->nmap ? ST_OK : st__ck_shard(ck, 0); }

/* The tensor names, for scans: the index's, else the one shard's. */
static int st__ck_count(const st_checkpoint *ck) { return ck->nmap ? ck->nmap : ck->shards[0].ntensors; }
static const char *st__ck_name(const st_checkpoint *ck, int i) {
    return ck->nmap ? ck->map[i].name : ck->shards[0].tensors[i].name;
}

/* --- st_checkpoint_open: a directory, or one .safetensors file ------------ */

#define ST__MAX_JSON_FILE (256u << 20)

/* A whole small file (config.json, the index) into memory; *text NULL and
   ST_OK when it does not exist and may be absent. */
static st_status st__read_text(const char *path, int required, char **text, size_t *len, char *err) {
    FILE *fp = fopen(path, "rb");
    long n;
    *text = NULL;
    *len = 0;
    if (!fp) return required ? st__fail(err, ST__ERRLEN, ST_ERR_IO, "cannot open '%s'", path) : ST_OK;
    if (fseek(fp, 0, SEEK_END) || (n = ftell(fp)) < 0 || fseek(fp, 0, SEEK_SET)) {
        fclose(fp);
        return st__fail(err, ST__ERRLEN, ST_ERR_IO, "cannot read '%s' (not a regular file?)", path);
    }
    if ((unsigned long)n > ST__MAX_JSON_FILE) {
        fclose(fp);
        return st__fail(err, ST__ERRLEN, ST_ERR_HEADER_SIZE, "'%s' is larger than 256 MiB", path);
    }
    if (!(*text = (char *)malloc((size_t)n + 1))) {
        fclose(fp);
        return st__fail(err, ST__ERRLEN, ST_ERR_NO_MEMORY, "out of memory reading '%s'", path);
    }
    if (fread(*text, 1, (size_t)n, fp) != (size_t)n) {
        fclose(fp); free(*text); *text = NULL;
        return st__fail(err, ST__ERRLEN, ST_ERR_IO, "read error on '%s'", path);
    }
    fclose(fp);
    (*text)[n] = '\0';
    *len = (size_t)n;
    return ST_OK;
}

static st_status st__open_in_dir(void *user, const char *shard, st_file *out) {
    const st_checkpoint *ck = (const st_checkpoint *)user;
    char path[1400];
    snprintf(path, sizeof path, "%s%s%s", ck->dir, *ck->dir ? "/" : "", shard);
    return st_open(out, path);
}

/* Open a checkpoint: a directory as save_pretrained writes it (config.json,
   then model.safetensors.index.json with its shards, else model.safetensors),
   or a single .safetensors file, with the config.json beside it if there is
   one. */
st_status st_checkpoint_open(st_checkpoint *ck, const char *path) {
    char dir[1024], file[1400], *config = NULL, *index = NULL;
    const char *shard = "model.safetensors";
    size_t n = path ? strlen(path) : 0, config_len = 0, index_len = 0;
    int lone = n > 12 && !strcmp(path + n - 12, ".safetensors");
    st_status s;
    if (!ck) return ST_ERR_ARGUMENT;
    memset(ck, 0, sizeof *ck);
    if (!path || n >= sizeof dir) return st__fail(ck->error, sizeof ck->error, ST_ERR_ARGUMENT, "no path, or a path too long");
    strcpy(dir, path);
    if (lone) {                                    /* split off the file name */
        char *slash = strrchr(dir, '/');
        shard = slash ? path + (slash - dir) + 1 : path;
        if (slash) *slash = '\0'; else dir[0] = '\0';
    } else if (n > 1 && dir[n - 1] == '/') dir[n - 1] = '\0';
    snprintf(file, sizeof file, "%s%sconfig.json", dir, *dir ? "/" : "");
    if ((s = st__read_text(file, !lone, &config, &config_len, ck->error)) != ST_OK) return s;
    if (!lone) {
        snprintf(file, sizeof file, "%s/model.safetensors.index.json", dir);
        if ((s = st__read_text(file, 0, &index, &index_len, ck->error)) != ST_OK) { free(config); return s; }
    }
    s = st_checkpoint_init(ck, config, config_len, index, index_len, shard, st__open_in_dir, ck);
    free(config); free(index);
    if (s) return s;
    strcpy(ck->dir, dir);                          /* st__open_in_dir reads it */
    if ((s = st__ck_ready(ck)) != ST_OK) return st__ck_fail(ck, s);
    return ST_OK;
}

/* ===========================================================================
   3. One MoE layer by its HF names
   =========================================================================== */

typedef enum st_model {
    ST_MODEL_AUTO = 0,        /* config.json's model_type, else --model, else __metadata__,
                                 else probe the names                                  */
    ST_MODEL_MIXTRAL = 1,
    ST_MODEL_QWEN2_MOE = 2,
    ST_MODEL_DEEPSEEK_V3 = 3,
    ST_MODEL_QWEN3_MOE = 4,
    ST_MODEL_OLMOE = 5
} st_model;
#define ST_MODEL_COUNT 6
static const char *const st__model_names[ST_MODEL_COUNT] = {
    "auto", "mixtral", "qwen2_moe", "deepseek_v3", "qwen3_moe", "olmoe"};
const char *st_model_name(st_model m) { return (unsigned)m < ST_MODEL_COUNT ? st__model_names[m] : "?"; }
st_model st_model_from_name(const char *name) {
    int m;
    for (m = 1; name && m < ST_MODEL_COUNT; m++) if (!strcmp(name, st__model_names[m])) return (st_model)m;
    return ST_MODEL_AUTO;
}

typedef struct st_layer_options {
    st_model model;            /* ST_MODEL_AUTO: see above                          */
    int layer;                 /* -1: the lowest model.layers.{i} with a MoE router */
    const char *block_prefix;  /* non-NULL: the block's prefix verbatim, e.g.
                                  "model.layers.3.mlp." or "" (a bare block)     */
    /* Overrides of config.json's routing fields; -1 (scale: 0) = not set.     */
    int top_k, norm_topk_prob, n_group, topk_group;
    double routed_scaling_factor;
    const char *allow_keys;    /* comma-separated config.json keys to accept unread */
} st_layer_options;

void st_layer_options_default(st_layer_options *o) {
    memset(o, 0, sizeof *o);
    o->layer = -1;
    o->top_k = o->norm_topk_prob = o->n_group = o->topk_group = -1;
}

enum { ST__ROUTER, ST__BIAS, ST__GATE, ST__UP, ST__DOWN, ST__SH_GATE, ST__SH_UP, ST__SH_DOWN, ST__SH_EGATE, ST__NBUF };

typedef struct st_layer {
    st_model model;
    int layer;                 /* -1 when block_prefix was given                    */
    int fused;                 /* experts stored as gate_up_proj / down_proj (5.x)  */
    char block_prefix[200];    /* e.g. "model.layers.0.block_sparse_moe."           */
    int32_t E, D, F, Fs;       /* Fs = 0: no shared expert                          */
    const char *routing_from;  /* "config.json", "__metadata__" or "preset"         */
    moe_config cfg;            /* preset + shape + routing fields, resolved         */
    moe_weights w;             /* points into buf                                   */
    float *buf[ST__NBUF];      /* owned float copies                                */
    char error[ST__ERRLEN];
} st_layer;

void st_layer_free(st_layer *L) {
    int i;
    if (!L) return;
    for (i = 0; i < ST__NBUF; i++) { free(L->buf[i]); L->buf[i] = NULL; }
    memset(&L->w, 0, sizeof L->w);
}

#define ST__LFAIL(L, s, ...) st__fail((L)->error, sizeof (L)->error, (s), __VA_ARGS__)

static int st__name(char *out, size_t n, const char *a, const char *b) {
    int k = snprintf(out, n, "%s%s", a, b);
    return k >= 0 && (size_t)k < n;
}
static int st__has2(const st_checkpoint *ck, const char *prefix, const char *suffix) {
    char name[512];
    return st__name(name, sizeof name, prefix, suffix) && st__ck_has(ck, name);
}

static void st__shape_str(const st_tensor *t, char *out, size_t n) {
    size_t used = 0;
    int d;
    used += (size_t)snprintf(out, n, "[");
    for (d = 0; d < t->ndim && used < n; d++)
        used += (size_t)snprintf(out + used, n - used, d ? ", %llu" : "%llu", (unsigned long long)t->shape[d]);
    if (used < n) snprintf(out + used, n - used, "]");
}

/* Find name = prefix + suffix, check its shape against want[0..ndim) (a
   want of 0 accepts any size and is filled in), convert it into a new float
   buffer. */
static st_status st__take(st_layer *L, st_checkpoint *ck, const char *prefix, const char *suffix,
                          int ndim, int64_t *want, float **out) {
    char name[512], got[160];
    const st_tensor *t;
    const st_file *owner = NULL;
    int d;
    st_status s;
    *out = NULL;
    if (!st__name(name, sizeof name, prefix, suffix)) return ST__LFAIL(L, ST_ERR_ARGUMENT, "tensor name too long");
    t = st__ck_find(ck, name, &owner, &s);
    if (s) return ST__LFAIL(L, s, "%s", ck->error);
    if (!t) return ST__LFAIL(L, ST_ERR_MISSING, "missing tensor '%s'", name);
    for (d = 0; d < ndim && t->ndim == ndim; d++)
        if (want[d] == 0) {                           /* a dimension this tensor defines */
            st__shape_str(t, got, sizeof got);
            if (t->shape[d] == 0 || t->shape[d] > (uint64_t)INT32_MAX)
                return ST__LFAIL(L, ST_ERR_SHAPE_MISMATCH, "tensor '%s' has shape %s: dimension %d must be in 1..2^31-1", name, got, d);
            want[d] = (int64_t)t->shape[d];
        }
    for (d = 0; d < ndim && t->ndim == ndim; d++) if ((uint64_t)want[d] != t->shape[d]) break;
    if (t->ndim != ndim || d < ndim) {
        char exp[160];
        size_t used = (size_t)snprintf(exp, sizeof exp, "[");
        for (d = 0; d < ndim && used < sizeof exp; d++)
            used += want[d] ? (size_t)snprintf(exp + used, sizeof exp - used, d ? ", %lld" : "%lld", (long long)want[d])
                            : (size_t)snprintf(exp + used, sizeof exp - used, d ? ", *" : "*");
        if (used < sizeof exp) snprintf(exp + used, sizeof exp - used, "]");
        st__shape_str(t, got, sizeof got);
        return ST__LFAIL(L, ST_ERR_SHAPE_MISMATCH, "tensor '%s' has shape %s, expected %s", name, got, exp);
    }
    if (t->numel > (uint64_t)((size_t)-1 / sizeof(float)))
        return ST__LFAIL(L, ST_ERR_NO_MEMORY, "tensor '%s' is too large", name);
    if (!(*out = (float *)malloc(t->numel ? (size_t)t->numel * sizeof(float) : 1)))
        return ST__LFAIL(L, ST_ERR_NO_MEMORY, "out of memory for '%s'", name);
    if ((s = st_read_f32(owner, t, *out, L->error, sizeof L->error))) { free(*out); *out = NULL; }
    return s;
}

/* --- routing from __metadata__ (single files without a config.json) ------- */

/* Integer / boolean value of an option: the command line (>= 0), else
   __metadata__[key], else keep *v (the preset's).                           */
static st_status st__meta_int(st_layer *L, const st_file *f, int cli, const char *key, int is_bool, int *v) {
    const char *m;
    char *endp;
    long x;
    if (cli >= 0) { *v = cli; return ST_OK; }
    if (!f || !(m = st_meta(f, key))) return ST_OK;
    L->routing_from = "__metadata__";
    if (is_bool && (!strcmp(m, "true") || !strcmp(m, "True"))) { *v = 1; return ST_OK; }
    if (is_bool && (!strcmp(m, "false") || !strcmp(m, "False"))) { *v = 0; return ST_OK; }
    x = strtol(m, &endp, 10);
    if (endp == m || *endp || x < 0 || x > (is_bool ? 1 : INT32_MAX))
        return ST__LFAIL(L, ST_ERR_CONFIG, "__metadata__ \"%s\" = \"%.40s\" is not a%s", key, m,
                         is_bool ? " boolean" : " non-negative integer");
    *v = (int)x;
    return ST_OK;
}

static st_status st__routing_from_metadata(st_layer *L, const st_file *f, const st_layer_options *o) {
    const char *m;
    int norm = -1;
    st_status s;
    if ((s = st__meta_int(L, f, o->top_k, "num_experts_per_tok", 0, &L->cfg.top_k))) return s;
    if ((s = st__meta_int(L, f, o->norm_topk_prob, "norm_topk_prob", 1, &norm))) return s;
    if (norm >= 0) L->cfg.normalize = norm ? MOE_NORM_SUM : MOE_NORM_NONE;
    if ((s = st__meta_int(L, f, o->n_group, "n_group", 0, &L->cfg.n_group))) return s;
    if ((s = st__meta_int(L, f, o->topk_group, "topk_group", 0, &L->cfg.topk_group))) return s;
    if (o->routed_scaling_factor > 0.0) L->cfg.routed_scale = (float)o->routed_scaling_factor;
    else if (f && (m = st_meta(f, "routed_scaling_factor"))) {
        char *endp;
        double v = strtod(m, &endp);
        if (endp == m || *endp || !(v > 0.0 && v < 1e30))
            return ST__LFAIL(L, ST_ERR_CONFIG, "__metadata__ \"routed_scaling_factor\" = \"%.40s\" is not a positive number", m);
        L->cfg.routed_scale = (float)v;
        L->routing_from = "__metadata__";
    }
    return ST_OK;
}

/* --- routing from config.json ----------------------------------------------
   What transformers reads for each model_type (its config classes and MoE
   blocks, 5.x): the shape fields (with the aliases of the config's
   attribute_map), the routing fields and their defaults when a key is
   absent (the config class's, which are not always moe.h's preset's: Qwen3's
   class default is norm_topk_prob = false, its released checkpoints say
   true). A key that looks like MoE routing and that this table does not
   list is an error, not a silent default: it may change the routing (pass
   it in allow_keys / --allow-key to accept it unread). Other keys
   (attention, vocabulary, rope) cannot change the MoE block.               */
typedef struct st__hf_model {
    const char *experts, *experts_alias;   /* E                                        */
    const char *ffn;                       /* F                                        */
    int top_k;                             /* num_experts_per_tok when absent          */
    int norm;                              /* norm_topk_prob when absent; -1: no key (Mixtral
                                              always renormalises)                   */
    const char *more;                      /* other keys it reads, or knows to be training-only */
} st__hf_model;

static const st__hf_model st__hf[ST_MODEL_COUNT] = {
    {NULL, NULL, NULL, 0, 0, ""},
    {"num_local_experts", "num_experts", "intermediate_size", 2, -1, " router_jitter_noise "},
    {"num_experts", NULL, "moe_intermediate_size", 4, 0,
     " norm_topk_prob shared_expert_intermediate_size decoder_sparse_step mlp_only_layers "},
    {"n_routed_experts", "num_local_experts", "moe_intermediate_size", 8, 1,
     " norm_topk_prob n_shared_experts n_group topk_group routed_scaling_factor first_k_dense_replace"
     " moe_layer_freq scoring_func topk_method aux_loss_alpha seq_aux "},
    {"num_local_experts", "num_experts", "moe_intermediate_size", 8, 0,
     " norm_topk_prob decoder_sparse_step mlp_only_layers "},
    {"num_experts", "num_local_experts", "intermediate_size", 8, 0, " norm_topk_prob "},
};
/* read for every model, or training-only (aux loss, router logits output) */
static const char st__hf_common[] =
    " model_type hidden_size num_hidden_layers hidden_act num_experts_per_tok"
    " router_aux_loss_coef output_router_logits ";

static int st__word_in(const char *list, const char *word, char sep) {
    size_t n = strlen(word);
    const char *p = list;
    while ((p = strstr(p, word)) != NULL) {
        if ((p == list || p[-1] == sep || p[-1] == ' ') && (p[n] == sep || p[n] == ' ' || !p[n])) return 1;
        p += n;
    }
    return 0;
}

static int st__looks_moe(const char *key) {
    static const char *const parts[] = {"expert", "moe", "topk", "top_k", "router", "routing", "routed",
        "scoring", "gate", "gating", "group", "sparse", "aux", "capacity", "jitter", "mlp_only", "dense",
        "layer_freq"};
    size_t i;
    for (i = 0; i < sizeof parts / sizeof parts[0]; i++) if (strstr(key, parts[i])) return 1;
    return 0;
}

/* config.json[key] (or its alias) as an integer in [lo, hi]; *v kept when absent. */
static st_status st__cfg_int(st_layer *L, const st_config *c, const char *key, const char *alias,
                             long lo, long hi, int *v) {
    const st_config_item *it = st_config_get(c, key), *al = alias ? st_config_get(c, alias) : NULL;
    if (it && al && !(it->type == al->type && it->number == al->number))
        return ST__LFAIL(L, ST_ERR_CONFIG, "config.json has both \"%s\" and its alias \"%s\", with different values", key, alias);
    if (!it) it = al;
    if (!it) return ST_OK;
    if (it->type != ST_JNUMBER || !it->is_integer || it->number < (double)lo || it->number > (double)hi)
        return ST__LFAIL(L, ST_ERR_CONFIG, "config.json \"%s\" must be an integer in %ld..%ld", it->key, lo, hi);
    *v = (int)it->number;
    return ST_OK;
}
static st_status st__cfg_bool(st_layer *L, const st_config *c, const char *key, int *v) {
    const st_config_item *it = st_config_get(c, key);
    if (!it) return ST_OK;
    if (it->type != ST_JBOOL) return ST__LFAIL(L, ST_ERR_CONFIG, "config.json \"%s\" must be true or false", key);
    *v = it->number != 0.0;
    return ST_OK;
}
/* A string key that transformers' code fixes to one value (want). */
static st_status st__cfg_fixed(st_layer *L, const st_config *c, const char *key, const char *want, const char *why) {
    const st_config_item *it = st_config_get(c, key);
    if (!it || (it->type == ST_JSTRING && !strcmp(it->string, want))) return ST_OK;
    return ST__LFAIL(L, ST_ERR_UNSUPPORTED, "config.json \"%s\" is %s%.40s%s; only \"%s\" is supported (%s)", key,
                     it->type == ST_JSTRING ? "\"" : "not a string", it->type == ST_JSTRING ? it->string : "",
                     it->type == ST_JSTRING ? "\"" : "", want, why);
}

/* Check a shape field against the tensors: a mismatch means the config and
   the weights disagree, and the routing read from it cannot be trusted. */
static st_status st__cfg_shape(st_layer *L, const st_config *c, const char *key, const char *alias, int32_t have) {
    int v = -1;
    st_status s = st__cfg_int(L, c, key, alias, 0, INT32_MAX, &v);
    if (s || v < 0 || v == have) return s;
    return ST__LFAIL(L, ST_ERR_SHAPE_MISMATCH, "config.json \"%s\" = %d, but the tensors say %d", key, v, (int)have);
}

static st_status st__routing_from_config(st_layer *L, const st_config *c, const st_layer_options *o) {
    const st__hf_model *m = &st__hf[L->model];
    int i, k = m->top_k, norm = m->norm, v;
    st_status s;
    L->routing_from = "config.json";
    /* 1. every key that could change the routing is one transformers reads */
    for (i = 0; i < c->nitems; i++) {
        const char *key = c->items[i].key;
        if (!strcmp(key, "quantization_config"))
            return ST__LFAIL(L, ST_ERR_UNSUPPORTED, "config.json has a quantization_config: the experts are "
                             "quantized (dequantize the checkpoint first, or use its GGUF with gguf_moe)");
        if (st__word_in(st__hf_common, key, ' ') || st__word_in(m->more, key, ' ') ||
            !strcmp(key, m->experts) || (m->experts_alias && !strcmp(key, m->experts_alias)) || !strcmp(key, m->ffn))
            continue;
        if (st__looks_moe(key) && !(o->allow_keys && st__word_in(o->allow_keys, key, ',')))
            return ST__LFAIL(L, ST_ERR_CONFIG, "config.json key \"%.60s\" is not one this loader reads for %s, "
                             "and it may change the routing (--allow-key %.60s accepts it unread)",
                             key, st_model_name(L->model), key);
    }
    {
        const st_config_item *act = st_config_get(c, "hidden_act");
        if (act && !(act->type == ST_JSTRING && !strcmp(act->string, "silu")))
            return ST__LFAIL(L, ST_ERR_UNSUPPORTED, "config.json \"hidden_act\" is not \"silu\" (the experts here are SwiGLU)");
    }
    /* 2. the shapes agree with the tensors */
    if ((s = st__cfg_shape(L, c, "hidden_size", NULL, L->D)) || (s = st__cfg_shape(L, c, m->experts, m->experts_alias, L->E)) ||
        (s = st__cfg_shape(L, c, m->ffn, NULL, L->F)))
        return s;
    if (L->model == ST_MODEL_QWEN2_MOE) {
        v = 5632;                                       /* Qwen2MoeConfig's default */
        if ((s = st__cfg_int(L, c, "shared_expert_intermediate_size", NULL, 0, INT32_MAX, &v))) return s;
        if (v != L->Fs)
            return ST__LFAIL(L, v && !L->Fs ? ST_ERR_MISSING : ST_ERR_SHAPE_MISMATCH, "config.json gives a shared expert "
                             "of width %d (shared_expert_intermediate_size%s), but the tensors %s%d", v,
                             st_config_get(c, "shared_expert_intermediate_size") ? "" : ", absent: the default",
                             L->Fs ? "say " : "have none: ", (int)L->Fs);
    }
    if (L->model == ST_MODEL_DEEPSEEK_V3) {
        int nsh = 1;
        if ((s = st__cfg_int(L, c, "n_shared_experts", NULL, 0, 1 << 16, &nsh))) return s;
        if ((int64_t)nsh * L->F != L->Fs)
            return ST__LFAIL(L, nsh && !L->Fs ? ST_ERR_MISSING : ST_ERR_SHAPE_MISMATCH, "config.json gives shared experts of "
                             "width n_shared_experts x moe_intermediate_size = %d x %d, but the tensors %s%d", nsh,
                             (int)L->F, L->Fs ? "say " : "have none: ", (int)L->Fs);
    }
    /* 3. is this layer a MoE layer in this model? */
    if (L->layer >= 0) {
        int nl = -1, step = 1, first_dense = 3, freq = 1;
        const st_config_item *dense = st_config_get(c, "mlp_only_layers");
        if ((s = st__cfg_int(L, c, "num_hidden_layers", NULL, 1, INT32_MAX, &nl))) return s;
        if (nl >= 0 && L->layer >= nl)
            return ST__LFAIL(L, ST_ERR_CONFIG, "layer %d, but config.json has num_hidden_layers = %d", L->layer, nl);
        if (L->model == ST_MODEL_QWEN2_MOE || L->model == ST_MODEL_QWEN3_MOE) {
            if ((s = st__cfg_int(L, c, "decoder_sparse_step", NULL, 1, INT32_MAX, &step))) return s;
            if (dense && dense->type != ST_JINTS)
                return ST__LFAIL(L, ST_ERR_CONFIG, "config.json \"mlp_only_layers\" must be a list of integers");
            for (i = 0; dense && i < dense->nints; i++)
                if (dense->ints[i] == L->layer)
                    return ST__LFAIL(L, ST_ERR_CONFIG, "config.json makes layer %d dense (mlp_only_layers)", L->layer);
            if ((L->layer + 1) % step)
                return ST__LFAIL(L, ST_ERR_CONFIG, "config.json makes layer %d dense (decoder_sparse_step = %d: MoE "
                                 "layers are those with (layer + 1) %% %d == 0)", L->layer, step, step);
        }
        if (L->model == ST_MODEL_DEEPSEEK_V3) {
            if ((s = st__cfg_int(L, c, "first_k_dense_replace", NULL, 0, INT32_MAX, &first_dense)) ||
                (s = st__cfg_int(L, c, "moe_layer_freq", NULL, 1, INT32_MAX, &freq)))
                return s;
            if (L->layer < first_dense)
                return ST__LFAIL(L, ST_ERR_CONFIG, "config.json makes layer %d dense (first_k_dense_replace = %d)",
                                 L->layer, first_dense);
            if (freq != 1)        /* transformers ignores it; DeepSeek's own code uses layer % freq */
                return ST__LFAIL(L, ST_ERR_UNSUPPORTED, "config.json \"moe_layer_freq\" = %d: transformers ignores it, "
                                 "DeepSeek's code does not; only 1 is unambiguous", freq);
        }
    }
    /* 4. the routing fields, then the command line's overrides */
    if ((s = st__cfg_int(L, c, "num_experts_per_tok", NULL, 1, INT32_MAX, &k))) return s;
    if (norm >= 0 && (s = st__cfg_bool(L, c, "norm_topk_prob", &norm))) return s;
    L->cfg.top_k = o->top_k >= 0 ? o->top_k : k;
    if (o->norm_topk_prob >= 0) norm = o->norm_topk_prob;
    if (norm >= 0) L->cfg.normalize = norm ? MOE_NORM_SUM : MOE_NORM_NONE;
    if (L->model == ST_MODEL_DEEPSEEK_V3) {
        int ng = 8, tg = 4;
        const st_config_item *sc = st_config_get(c, "routed_scaling_factor");
        double scale = 2.5;
        if ((s = st__cfg_fixed(L, c, "scoring_func", "sigmoid", "transformers' DeepSeek-V3 router always uses sigmoid")) ||
            (s = st__cfg_fixed(L, c, "topk_method", "noaux_tc", "transformers' DeepSeek-V3 router always uses noaux_tc")) ||
            (s = st__cfg_int(L, c, "n_group", NULL, 1, INT32_MAX, &ng)) ||
            (s = st__cfg_int(L, c, "topk_group", NULL, 1, INT32_MAX, &tg)))
            return s;
        if (sc && (sc->type != ST_JNUMBER || !(sc->number > 0.0 && sc->number < 1e30)))
            return ST__LFAIL(L, ST_ERR_CONFIG, "config.json \"routed_scaling_factor\" must be a positive number");
        if (sc) scale = sc->number;
        L->cfg.n_group = o->n_group >= 0 ? o->n_group : ng;
        L->cfg.topk_group = o->topk_group >= 0 ? o->topk_group : tg;
        L->cfg.routed_scale = (float)(o->routed_scaling_factor > 0.0 ? o->routed_scaling_factor : scale);
    } else if (o->n_group >= 0 || o->topk_group >= 0 || o->routed_scaling_factor > 0.0) {
        return ST__LFAIL(L, ST_ERR_CONFIG, "--n-group, --topk-group and --scale are DeepSeek-V3 fields; %s has none",
                         st_model_name(L->model));
    }
    return ST_OK;
}

/* Lowest i with model.layers.{i}.block_sparse_moe.gate.weight or
   model.layers.{i}.mlp.gate.weight in the checkpoint; -1 if none. */
static int st__first_moe_layer(const st_checkpoint *ck) {
    static const char *const pre = "model.layers.";
    const size_t np = strlen(pre);
    int i, best = -1, n = st__ck_count(ck);
    for (i = 0; i < n; i++) {
        const char *name = st__ck_name(ck, i), *q;
        long v = 0;
        if (strncmp(name, pre, np)) continue;
        for (q = name + np; *q >= '0' && *q <= '9' && v < 1000000; q++) v = v * 10 + (*q - '0');
        if (q == name + np || *q != '.' || v >= 1000000) continue;
        if (strcmp(q + 1, "block_sparse_moe.gate.weight") && strcmp(q + 1, "mlp.gate.weight")) continue;
        if (best < 0 || v < best) best = (int)v;
    }
    return best;
}

/* Load the layer from a checkpoint. On failure L->error says what, and
   nothing is left allocated. */
st_status st_load_checkpoint_layer(st_checkpoint *ck, const st_layer_options *opt, st_layer *L) {
    st_layer_options o;
    const char *P, *mt = NULL;
    const char *sh;
    char gname[96], uname[96], dname[96], sname[3][64];
    const st_file *meta_file;
    int64_t shp[3];
    int32_t j;
    moe_status ms;
    st_status s;
    if (!L) return ST_ERR_ARGUMENT;
    memset(L, 0, sizeof *L);
    if (!ck || !ck->shards) return ST__LFAIL(L, ST_ERR_ARGUMENT, "no open checkpoint");
    if ((s = st__ck_ready(ck))) return ST__LFAIL(L, s, "%s", ck->error);
    if (opt) o = *opt; else st_layer_options_default(&o);
    meta_file = ck->nmap ? NULL : &ck->shards[0];          /* __metadata__: lone files only */

    /* 1. where the block is */
    if (o.block_prefix) {
        if (strlen(o.block_prefix) >= sizeof L->block_prefix) return ST__LFAIL(L, ST_ERR_ARGUMENT, "prefix too long");
        strcpy(L->block_prefix, o.block_prefix);
        L->layer = -1;
    } else {
        char base[64];
        L->layer = o.layer >= 0 ? o.layer : st__first_moe_layer(ck);
        if (L->layer < 0) {
            if (st__ck_has(ck, "gate.weight")) L->block_prefix[0] = '\0';     /* a bare block's state_dict */
            else return ST__LFAIL(L, ST_ERR_MISSING, "no MoE router in the checkpoint: looked for "
                                  "model.layers.{i}.block_sparse_moe.gate.weight, model.layers.{i}.mlp.gate.weight and gate.weight");
        } else {
            snprintf(base, sizeof base, "model.layers.%d.", L->layer);
            snprintf(L->block_prefix, sizeof L->block_prefix, "%s%s", base,
                     st__has2(ck, base, "block_sparse_moe.gate.weight") ? "block_sparse_moe." : "mlp.");
        }
    }
    P = L->block_prefix;

    /* 2. which model: config.json's model_type (which --model must agree
       with), else --model, else __metadata__, else the names */
    L->model = o.model;
    if (ck->has_config) {
        const st_config_item *it = st_config_get(&ck->config, "model_type");
        st_model cm;
        if (!it || it->type != ST_JSTRING)
            return ST__LFAIL(L, ST_ERR_CONFIG, "config.json has no \"model_type\" string");
        if ((cm = st_model_from_name(it->string)) == ST_MODEL_AUTO)
            return ST__LFAIL(L, ST_ERR_UNSUPPORTED, "config.json model_type \"%.40s\" is not one this loader reads "
                             "(mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3)", it->string);
        if (L->model != ST_MODEL_AUTO && L->model != cm)
            return ST__LFAIL(L, ST_ERR_CONFIG, "--model %s, but config.json says model_type \"%s\"",
                             st_model_name(L->model), it->string);
        L->model = cm;
    }
    if (L->model == ST_MODEL_AUTO && meta_file && (mt = st_meta(meta_file, "model_type")))
        L->model = st_model_from_name(mt);
    if (L->model == ST_MODEL_AUTO) {
        if (st__has2(ck, P, "gate.e_score_correction_bias") || st__has2(ck, P, "shared_experts.gate_proj.weight"))
            L->model = ST_MODEL_DEEPSEEK_V3;
        else if (st__has2(ck, P, "shared_expert.gate_proj.weight") || st__has2(ck, P, "shared_expert_gate.weight") ||
                 st__has2(ck, P, "experts.0.gate_proj.weight"))
            L->model = ST_MODEL_QWEN2_MOE;
        else
            L->model = ST_MODEL_MIXTRAL;      /* block_sparse_moe.experts.{j}.w1, or fused without extras */
    }
    if ((unsigned)L->model >= ST_MODEL_COUNT) return ST__LFAIL(L, ST_ERR_CONFIG, "unknown model %d", (int)L->model);
    L->cfg = L->model == ST_MODEL_MIXTRAL ? moe_preset_mixtral()
           : L->model == ST_MODEL_QWEN2_MOE ? moe_preset_qwen2_moe()
           : L->model == ST_MODEL_QWEN3_MOE ? moe_preset_qwen3_moe()
           : L->model == ST_MODEL_OLMOE ? moe_preset_olmoe() : moe_preset_deepseek_v3();
    if (!st__has2(ck, P, "gate.weight")) {
        if (L->layer >= 0)
            return ST__LFAIL(L, ST_ERR_MISSING, "no MoE router for layer %d: neither 'model.layers.%d.block_sparse_moe.gate.weight' "
                             "nor 'model.layers.%d.mlp.gate.weight' is in the checkpoint", L->layer, L->layer, L->layer);
        return ST__LFAIL(L, ST_ERR_MISSING, "missing tensor '%sgate.weight' (the router)", P);
    }
    L->fused = st__has2(ck, P, "experts.gate_up_proj");

    /* 3. router [E][D] gives E and D */
    shp[0] = shp[1] = 0;
    if ((s = st__take(L, ck, P, "gate.weight", 2, shp, &L->buf[ST__ROUTER]))) goto fail;
    L->E = (int32_t)shp[0]; L->D = (int32_t)shp[1];

    /* 4. routed experts: fused [E][2F][D] + [E][D][F], or one Linear per expert */
    if (L->fused) {
        shp[0] = L->E; shp[1] = 0; shp[2] = L->D;
        if ((s = st__take(L, ck, P, "experts.gate_up_proj", 3, shp, &L->buf[ST__GATE]))) goto fail;
        if (shp[1] % 2) { s = ST__LFAIL(L, ST_ERR_SHAPE_MISMATCH, "'%sexperts.gate_up_proj' has an odd middle dimension %lld (need 2F)", P, (long long)shp[1]); goto fail; }
        L->F = (int32_t)(shp[1] / 2);
        shp[0] = L->E; shp[1] = L->D; shp[2] = L->F;
        if ((s = st__take(L, ck, P, "experts.down_proj", 3, shp, &L->buf[ST__DOWN]))) goto fail;
    } else {
        const int w123 = L->model == ST_MODEL_MIXTRAL;
        size_t FD = 0;
        for (j = 0; j < L->E; j++) {
            float *g = NULL, *u = NULL, *d = NULL;
            snprintf(gname, sizeof gname, w123 ? "experts.%d.w1.weight" : "experts.%d.gate_proj.weight", (int)j);
            snprintf(uname, sizeof uname, w123 ? "experts.%d.w3.weight" : "experts.%d.up_proj.weight", (int)j);
            snprintf(dname, sizeof dname, w123 ? "experts.%d.w2.weight" : "experts.%d.down_proj.weight", (int)j);
            shp[0] = L->F; shp[1] = L->D;                 /* F = 0 at j = 0: expert 0 sets it */
            if ((s = st__take(L, ck, P, gname, 2, shp, &g))) goto fail;
            L->F = (int32_t)shp[0];
            if (j == 0) {
                FD = (size_t)L->F * (size_t)L->D;
                if ((size_t)L->E > ((size_t)-1 / sizeof(float)) / FD) { free(g); s = ST__LFAIL(L, ST_ERR_NO_MEMORY, "experts too large"); goto fail; }
                L->buf[ST__GATE] = (float *)malloc((size_t)L->E * FD * sizeof(float));
                L->buf[ST__UP] = (float *)malloc((size_t)L->E * FD * sizeof(float));
                L->buf[ST__DOWN] = (float *)malloc((size_t)L->E * FD * sizeof(float));
                if (!L->buf[ST__GATE] || !L->buf[ST__UP] || !L->buf[ST__DOWN]) { free(g); s = ST__LFAIL(L, ST_ERR_NO_MEMORY, "out of memory"); goto fail; }
            }
            shp[0] = L->F; shp[1] = L->D;
            if ((s = st__take(L, ck, P, uname, 2, shp, &u))) { free(g); goto fail; }
            shp[0] = L->D; shp[1] = L->F;
            if ((s = st__take(L, ck, P, dname, 2, shp, &d))) { free(g); free(u); goto fail; }
            memcpy(L->buf[ST__GATE] + (size_t)j * FD, g, FD * sizeof(float));   /* stack: [E][F][D] */
            memcpy(L->buf[ST__UP] + (size_t)j * FD, u, FD * sizeof(float));
            memcpy(L->buf[ST__DOWN] + (size_t)j * FD, d, FD * sizeof(float));   /* [E][D][F] */
            free(g); free(u); free(d);
        }
    }

    /* 5. model extras: DeepSeek's selection bias; shared experts */
    if (L->model == ST_MODEL_DEEPSEEK_V3) {
        shp[0] = L->E;
        if ((s = st__take(L, ck, P, "gate.e_score_correction_bias", 1, shp, &L->buf[ST__BIAS]))) goto fail;
    }
    sh = L->model == ST_MODEL_DEEPSEEK_V3 ? "shared_experts." : "shared_expert.";
    snprintf(sname[0], sizeof sname[0], "%sgate_proj.weight", sh);
    snprintf(sname[1], sizeof sname[1], "%sup_proj.weight", sh);
    snprintf(sname[2], sizeof sname[2], "%sdown_proj.weight", sh);
    if ((L->model == ST_MODEL_QWEN2_MOE || L->model == ST_MODEL_DEEPSEEK_V3) && st__has2(ck, P, sname[0])) {
        shp[0] = 0; shp[1] = L->D;
        if ((s = st__take(L, ck, P, sname[0], 2, shp, &L->buf[ST__SH_GATE]))) goto fail;
        L->Fs = (int32_t)shp[0];
        shp[0] = L->Fs; shp[1] = L->D;
        if ((s = st__take(L, ck, P, sname[1], 2, shp, &L->buf[ST__SH_UP]))) goto fail;
        shp[0] = L->D; shp[1] = L->Fs;
        if ((s = st__take(L, ck, P, sname[2], 2, shp, &L->buf[ST__SH_DOWN]))) goto fail;
        if (L->model == ST_MODEL_QWEN2_MOE && st__has2(ck, P, "shared_expert_gate.weight")) {
            shp[0] = 1; shp[1] = L->D;
            if ((s = st__take(L, ck, P, "shared_expert_gate.weight", 2, shp, &L->buf[ST__SH_EGATE]))) goto fail;
        }
    } else if ((L->model == ST_MODEL_QWEN2_MOE || L->model == ST_MODEL_DEEPSEEK_V3) && st__has2(ck, P, sname[1])) {
        s = ST__LFAIL(L, ST_ERR_MISSING, "missing tensor '%s%s' (the shared expert's other tensors are there)", P, sname[0]);
        goto fail;
    }

    /* 6. the config: the preset, the shape, the routing fields */
    L->cfg.num_experts = L->E; L->cfg.d_model = L->D; L->cfg.d_ff = L->F;
    L->cfg.shared_d_ff = L->Fs;
    L->cfg.shared_expert_gated = L->buf[ST__SH_EGATE] != NULL;
    L->cfg.selection_bias = L->buf[ST__BIAS] != NULL;
    L->routing_from = "preset";
    s = ck->has_config ? st__routing_from_config(L, &ck->config, &o) : st__routing_from_metadata(L, meta_file, &o);
    if (s) goto fail;
    if ((ms = moe_config_resolve(&L->cfg, &L->cfg)) != MOE_STATUS_OK) {
        s = ST__LFAIL(L, ST_ERR_CONFIG, "moe.h rejects the %s config (E %d, K %d, n_group %d, topk_group %d): %s",
                      st_model_name(L->model), (int)L->cfg.num_experts, (int)L->cfg.top_k, (int)L->cfg.n_group,
                      (int)L->cfg.topk_group, moe_status_string(ms));
        goto fail;
    }

    /* 7. the weights, in place */
    L->w.router = L->buf[ST__ROUTER];
    L->w.selection_bias = L->buf[ST__BIAS];
    L->w.gate = L->buf[ST__GATE];
    L->w.up = L->fused ? NULL : L->buf[ST__UP];
    L->w.down = L->buf[ST__DOWN];
    L->w.gate_up_fused = L->fused;
    L->w.shared_gate = L->buf[ST__SH_GATE];
    L->w.shared_up = L->buf[ST__SH_UP];
    L->w.shared_down = L->buf[ST__SH_DOWN];
    L->w.shared_expert_gate = L->buf[ST__SH_EGATE];      /* [1][D] is [D] */
    return ST_OK;
fail:
    st_layer_free(L);
    return s;
}

/* Load the layer from one open file, without a config.json: the routing
   comes from the options, else the file's __metadata__, else the preset. */
st_status st_load_layer(const st_file *f, const st_layer_options *opt, st_layer *L) {
    st_checkpoint ck;
    signed char is_open = 1;
    if (!L) return ST_ERR_ARGUMENT;
    if (!f || !f->by_name) { memset(L, 0, sizeof *L); return ST__LFAIL(L, ST_ERR_ARGUMENT, "no open file"); }
    memset(&ck, 0, sizeof ck);
    ck.nshards = 1;
    ck.shards = (st_file *)f;              /* borrowed and never written: it is open */
    ck.shard_state = &is_open;
    ck.borrowed = 1;
    return st_load_checkpoint_layer(&ck, opt, L);
}

/* Write float32 tensors as a safetensors file (the header padded with spaces
   to a multiple of 8, as the reference writer does). shapes[i] has ndims[i]
   entries. Returns 0 on success. */
int st_write_f32(const char *path, int n, const char *const *names, const int *ndims,
                 const int64_t *const *shapes, const float *const *data) {
    FILE *fp;
    char *head;
    size_t cap = 256, len = 0, pad;
    uint64_t off = 0, total;
    int i, d, ok = 1;
    unsigned char le[8];
    for (i = 0; i < n; i++) cap += strlen(names[i]) * 6 + 96 + 24 * (size_t)ndims[i];
    if (!(head = (char *)malloc(cap))) return -1;
    len += (size_t)sprintf(head + len, "{");
    for (i = 0; i < n; i++) {
        const char *c;
        uint64_t numel = 1;
        for (d = 0; d < ndims[i]; d++) numel *= (uint64_t)shapes[i][d];
        len += (size_t)sprintf(head + len, "%s\"", i ? "," : "");
        for (c = names[i]; *c; c++) {                 /* JSON-escape the name */
            unsigned char ch = (unsigned char)*c;
            if (ch == '"' || ch == '\\') len += (size_t)sprintf(head + len, "\\%c", ch);
            else if (ch < 0x20) len += (size_t)sprintf(head + len, "\\u%04x", ch);
            else head[len++] = (char)ch;
        }
        len += (size_t)sprintf(head + len, "\":{\"dtype\":\"F32\",\"shape\":[");
        for (d = 0; d < ndims[i]; d++) len += (size_t)sprintf(head + len, d ? ",%lld" : "%lld", (long long)shapes[i][d]);
        len += (size_t)sprintf(head + len, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                               (unsigned long long)(off + 4 * numel));
        off += 4 * numel;
    }
    head[len++] = '}';
    pad = (8 - len % 8) % 8;
    memset(head + len, ' ', pad);
    len += pad;
    if (!(fp = fopen(path, "wb"))) { free(head); return -1; }
    total = len;
    for (i = 0; i < 8; i++) le[i] = (unsigned char)(total >> (8 * i));
    ok = fwrite(le, 1, 8, fp) == 8 && fwrite(head, 1, len, fp) == len;
    for (i = 0; ok && i < n; i++) {
        uint64_t numel = 1, k;
        for (d = 0; d < ndims[i]; d++) numel *= (uint64_t)shapes[i][d];
        for (k = 0; ok && k < numel; k++) {
            uint32_t u;
            unsigned char b[4];
            memcpy(&u, &data[i][k], 4);
            b[0] = (unsigned char)u; b[1] = (unsigned char)(u >> 8); b[2] = (unsigned char)(u >> 16); b[3] = (unsigned char)(u >> 24);
            ok = fwrite(b, 1, 4, fp) == 4;
        }
    }
    free(head);
    if (fclose(fp) != 0) ok = 0;
    return ok ? 0 : -1;
}

/* ===========================================================================
   4. The command-line program
   =========================================================================== */
#ifndef SAFETENSORS_MOE_NO_MAIN

static void usage(void) {
    fprintf(stderr,
        "usage: safetensors_moe CHECKPOINT [options]\n"
        "  CHECKPOINT is a directory as save_pretrained writes it (config.json, then\n"
        "  model.safetensors or model.safetensors.index.json and its shards), or one\n"
        "  .safetensors file (with the config.json beside it, if there is one)\n"
        "  --list                 print the tensors (and __metadata__), then exit\n"
        "  --layer N              layer index (default: the first MoE layer)\n"
        "  --prefix P             the block's tensor prefix verbatim (\"\" for a bare block)\n"
        "  --input FILE           read x (and y_ref) from FILE, not from the checkpoint\n"
        "  --tokens T             synthetic input tokens when there is no \"x\" (default 4)\n"
        "  --synthetic            ignore \"x\" and \"y_ref\"\n"
        "  --out PATH             write x and y to PATH as a safetensors file\n"
        "routing comes from config.json; these override it (or, without one, set it):\n"
        "  --model NAME           mixtral | qwen2_moe | qwen3_moe | olmoe | deepseek_v3\n"
        "  --top-k K              num_experts_per_tok     --norm-topk-prob 0|1\n"
        "  --n-group G            --topk-group G          --scale S (routed_scaling_factor)\n"
        "  --allow-key K1,K2      accept these config.json keys unread\n");
}

static int parse_int(const char *s, int lo, int *out) {
    char *e;
    long v = strtol(s, &e, 10);
    if (e == s || *e || v < lo || v > INT32_MAX) return 0;
    *out = (int)v;
    return 1;
}

int main(int argc, char **argv) {
    st_checkpoint ck;
    st_file in;
    const st_file *xf = NULL;
    st_layer L;
    st_layer_options o;
    const char *path = NULL, *out_path = NULL, *in_path = NULL;
    int list = 0, synthetic = 0, tokens = 4, i, rc = 0;
    int32_t T;
    const st_tensor *tx = NULL, *tr;
    float *x = NULL, *y = NULL, *yref = NULL;
    moe_info info;
    moe_status ms;
    st_status s;

    st_layer_options_default(&o);
    memset(&in, 0, sizeof in);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int ok = 1;
        if (!strcmp(a, "--list")) { list = 1; continue; }
        if (!strcmp(a, "--synthetic")) { synthetic = 1; continue; }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(); return 0; }
        if (a[0] != '-' || !a[1]) { if (path) { usage(); return 2; } path = a; continue; }
        if (!v) { fprintf(stderr, "error: %s needs a value\n", a); return 2; }
        i++;
        if (!strcmp(a, "--model")) ok = (o.model = st_model_from_name(v)) != ST_MODEL_AUTO;
        else if (!strcmp(a, "--layer")) ok = parse_int(v, 0, &o.layer);
        else if (!strcmp(a, "--prefix")) o.block_prefix = v;
        else if (!strcmp(a, "--input")) in_path = v;
        else if (!strcmp(a, "--allow-key")) o.allow_keys = v;
        else if (!strcmp(a, "--top-k")) ok = parse_int(v, 1, &o.top_k);
        else if (!strcmp(a, "--norm-topk-prob")) ok = parse_int(v, 0, &o.norm_topk_prob) && o.norm_topk_prob <= 1;
        else if (!strcmp(a, "--n-group")) ok = parse_int(v, 1, &o.n_group);
        else if (!strcmp(a, "--topk-group")) ok = parse_int(v, 1, &o.topk_group);
        else if (!strcmp(a, "--tokens")) ok = parse_int(v, 1, &tokens) && tokens <= 1000000;
        else if (!strcmp(a, "--out")) out_path = v;
        else if (!strcmp(a, "--scale")) { char *e; o.routed_scaling_factor = strtod(v, &e); ok = e != v && !*e && o.routed_scaling_factor > 0; }
        else ok = 0;
        if (!ok) { fprintf(stderr, "error: bad option %s %s\n", a, v); usage(); return 2; }
    }
    if (!path) { usage(); return 2; }

    if ((s = st_checkpoint_open(&ck, path)) != ST_OK) {
        fprintf(stderr, "error: %s: %s: %s\n", path, st_status_string(s), ck.error);
        return 1;
    }
    if (list) {
        for (i = 0; !ck.nmap && i < ck.shards[0].nmeta; i++)
            printf("__metadata__ %s = %s\n", ck.shards[0].meta[2 * i], ck.shards[0].meta[2 * i + 1]);
        for (i = 0; i < st__ck_count(&ck); i++) {
            const st_file *owner = NULL;
            const st_tensor *t = st__ck_find(&ck, st__ck_name(&ck, i), &owner, &s);
            char shape[160];
            if (!t) { fprintf(stderr, "error: %s: %s\n", path, ck.error); rc = 1; break; }
            st__shape_str(t, shape, sizeof shape);
            printf("%-60s %-5s %-16s %s\n", t->name, st_dtype_name(t->dtype), shape,
                   ck.nmap ? ck.shard_names[ck.map[i].shard] : "");
        }
        st_checkpoint_close(&ck);
        return rc;
    }
    if ((s = st_load_checkpoint_layer(&ck, &o, &L)) != ST_OK) {
        fprintf(stderr, "error: %s: %s: %s\n", path, st_status_string(s), L.error);
        st_checkpoint_close(&ck);
        return 1;
    }
    printf("%s: %s layer, tensors %s* (%s experts)\n", path, st_model_name(L.model), L.block_prefix,
           L.fused ? "fused 5.x" : "per-expert checkpoint");
    printf("  E %d  K %d  D %d  F %d  shared F %d%s  normalise %s  scale %g  groups %d/%d  (routing: %s)\n",
           (int)L.E, (int)L.cfg.top_k, (int)L.D, (int)L.F, (int)L.Fs, L.cfg.shared_expert_gated ? " (gated)" : "",
           L.cfg.normalize == MOE_NORM_SUM ? "yes" : "no", (double)L.cfg.routed_scale,
           (int)L.cfg.topk_group, (int)L.cfg.n_group, L.routing_from);
    if (!strcmp(L.routing_from, "preset"))
        fprintf(stderr, "warning: no config.json and no routing in __metadata__: the routing is moe.h's %s "
                "preset; pass the checkpoint's directory, or set --top-k / --norm-topk-prob / ...\n",
                st_model_name(L.model));

    /* the input: x [..., D] from --input or the checkpoint, or synthetic tokens */
    if (in_path && !synthetic) {
        if ((s = st_open(&in, in_path)) != ST_OK) {
            fprintf(stderr, "error: %s: %s: %s\n", in_path, st_status_string(s), in.error);
            rc = 1; goto done;
        }
        xf = &in;
        tx = st_find(xf, "x");
    } else if (!synthetic && !ck.nmap) {
        xf = &ck.shards[0];
        tx = st_find(xf, "x");
    }
    if (tx) {
        if (tx->ndim < 1 || tx->shape[tx->ndim - 1] != (uint64_t)L.D || tx->numel / (uint64_t)L.D > 1000000) {
            fprintf(stderr, "error: tensor 'x' must have shape [..., %d]\n", (int)L.D);
            rc = 1; goto done;
        }
        T = (int32_t)(tx->numel / (uint64_t)L.D);
        x = (float *)malloc((size_t)T * (size_t)L.D * sizeof(float) + 1);
        if (!x || (s = st_read_f32(xf, tx, x, L.error, sizeof L.error)) != ST_OK) {
            fprintf(stderr, "error: %s\n", x ? L.error : "out of memory");
            rc = 1; goto done;
        }
    } else {
        uint64_t r = 0x9E3779B97F4A7C15ull;
        size_t k;
        T = tokens;
        x = (float *)malloc((size_t)T * (size_t)L.D * sizeof(float));
        if (!x) { fprintf(stderr, "error: out of memory\n"); rc = 1; goto done; }
        for (k = 0; k < (size_t)T * (size_t)L.D; k++) {           /* uniform(-1, 1) */
            r = r * 6364136223846793005ull + 1442695040888963407ull;
            x[k] = (float)((double)(r >> 11) / 4503599627370496.0 - 1.0);
        }
    }
    y = (float *)malloc((size_t)T * (size_t)L.D * sizeof(float));
    if (!y) { fprintf(stderr, "error: out of memory\n"); rc = 1; goto done; }
    memset(&info, 0, sizeof info);
    if ((ms = moe_forward_alloc(&L.cfg, &L.w, x, T, y, &info)) != MOE_STATUS_OK) {
        fprintf(stderr, "error: moe_forward: %s\n", moe_status_string(ms));
        rc = 1; goto done;
    }
    printf("  %d tokens%s; y[t][0..%d):\n", (int)T, tx ? " from x" : " (synthetic)", L.D < 6 ? (int)L.D : 6);
    for (i = 0; i < T && i < 4; i++) {
        int d;
        printf("    t=%d", i);
        for (d = 0; d < L.D && d < 6; d++) printf(" %+.6f", (double)y[(size_t)i * L.D + d]);
        printf("\n");
    }

    /* the HF reference, when the input file carries one */
    tr = tx ? st_find(xf, "y_ref") : NULL;
    if (tr && tr->numel == (uint64_t)T * (uint64_t)L.D && (yref = (float *)malloc((size_t)tr->numel * sizeof(float))) &&
        st_read_f32(xf, tr, yref, L.error, sizeof L.error) == ST_OK) {
        double worst = 0.0, max_abs = 0.0;
        size_t k;
        for (k = 0; k < (size_t)tr->numel; k++) {
            double e = fabs((double)y[k] - (double)yref[k]), lim = 1e-6 + 1e-5 * fabs((double)yref[k]);
            if (e > max_abs) max_abs = e;
            if (e / lim > worst) worst = e / lim;
        }
        printf("  vs y_ref (HF): max |err| %.3g, worst err / (1e-6 + 1e-5 |ref|) = %.3f -> %s\n",
               max_abs, worst, worst <= 1.0 ? "match" : "MISMATCH");
        if (worst > 1.0) rc = 1;
    }
    if (out_path) {
        const char *names[2] = {"x", "y"};
        int nd[2] = {2, 2};
        int64_t shp[2] = {T, L.D};
        const int64_t *shapes[2] = {shp, shp};
        const float *data[2] = {x, y};
        if (st_write_f32(out_path, 2, names, nd, shapes, data) != 0) { fprintf(stderr, "error: cannot write %s\n", out_path); rc = 1; }
        else printf("  wrote x and y to %s\n", out_path);
    }
done:
    free(x); free(y); free(yref);
    st_layer_free(&L);
    st_close(&in);
    st_checkpoint_close(&ck);
    return rc;
}
#endif /* SAFETENSORS_MOE_NO_MAIN */
