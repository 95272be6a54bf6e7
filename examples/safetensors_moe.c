/* safetensors_moe.c -- run moe.h on one MoE layer of a real checkpoint.
   A small, dependency-free safetensors reader (8-byte header length, a JSON
   header parsed by hand, F32 / BF16 / F16 tensors widened to float) and a
   loader that finds one MoE layer's tensors by their Hugging Face names, fills
   a moe_config and moe_weights, and runs moe_forward. Three naming schemes
   (those of the HF transformers modules), with prefix P = model.layers.{i}.:
     Mixtral      P block_sparse_moe.gate.weight [E][D],
                  P block_sparse_moe.experts.{j}.w1 / w3 / w2.weight (gate, up, down)
     Qwen2-MoE    P mlp.gate.weight, P mlp.experts.{j}.gate_proj / up_proj / down_proj.weight,
                  P mlp.shared_expert.{gate,up,down}_proj.weight, P mlp.shared_expert_gate.weight [1][D]
     DeepSeek-V3  P mlp.gate.weight, P mlp.gate.e_score_correction_bias [E],
                  P mlp.experts.{j}.{gate,up,down}_proj.weight, P mlp.shared_experts.*
   and for each the transformers 5.x fused names that
   safetensors.torch.save_file(model.state_dict()) writes:
                  P mlp.experts.gate_up_proj [E][2F][D], P mlp.experts.down_proj [E][D][F]
                  (used in place through moe_weights.gate_up_fused = 1).
   The model is taken from --model, else the file's __metadata__ "model_type",
   else probed from the names. Dimensions come from the tensor shapes; the
   routing fields that live in config.json (num_experts_per_tok,
   norm_topk_prob, n_group, topk_group, routed_scaling_factor) come from the
   command line, else the file's __metadata__ (the test checkpoints carry
   them), else the model's moe.h preset.

   The input is the file's tensor "x" ([..., D]) when it has one, else T
   synthetic tokens. When the file also has "y_ref" (the HF module's output,
   as in the files tests/ref/<case>.safetensors) the output is compared with it.

   build: cc -std=c99 -O2 -o safetensors_moe examples/safetensors_moe.c -lm
   run:   ./safetensors_moe tests/ref/mixtral.safetensors
          ./safetensors_moe FILE [--model mixtral|qwen2_moe|deepseek_v3] [--layer N]
              [--prefix BLOCK_PREFIX] [--top-k K] [--norm-topk-prob 0|1] [--n-group G]
              [--topk-group G] [--scale S] [--tokens T] [--synthetic] [--out y.safetensors] [--list]

   Every bad file -- truncated, a header length past the end, bad JSON,
   unknown dtype, offsets past the end, holes or overlaps between tensors, a
   missing tensor, a shape that does not fit the layer -- is an st_status
   with a message, and exit status 1; never a crash. The file is read into
   memory whole (a production loader would mmap it and read only the layer).

   tests/test_safetensors.c includes this file with SAFETENSORS_MOE_NO_MAIN
   defined and calls st_open_memory / st_find / st_load_layer; then main()
   and MOE_IMPLEMENTATION are left out. */
#ifndef SAFETENSORS_MOE_NO_MAIN
#define MOE_IMPLEMENTATION
#endif
#include "../moe.h"
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ===========================================================================
   1. The safetensors file
   =========================================================================== */

typedef enum st_status {
    ST_OK = 0,
    ST_ERR_IO = 1,             /* cannot open or read the file                    */
    ST_ERR_TRUNCATED = 2,      /* shorter than the 8-byte header length           */
    ST_ERR_HEADER_SIZE = 3,    /* header length > 100,000,000 or past the end     */
    ST_ERR_JSON = 4,           /* header is not the JSON object safetensors writes */
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
    case ST_ERR_JSON: return "malformed JSON header";
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
    char error[320];               /* what went wrong, for people                 */
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
    f->tensors = NULL; f->by_name = NULL; f->meta = NULL; f->owned = NULL;
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
    st_file *f;
} st__json;

static long st__pos(const st__json *J) { return (long)(J->p - J->s); }

static void st__ws(st__json *J) {
    while (J->p < J->end && (*J->p == ' ' || *J->p == '\t' || *J->p == '\n' || *J->p == '\r')) J->p++;
}

static st_status st__expect(st__json *J, char c) {
    st__ws(J);
    if (J->p >= J->end) return ST__FAIL(J->f, ST_ERR_JSON, "header byte %ld: expected '%c', found the end of the header", st__pos(J), c);
    if (*J->p != (unsigned char)c)
        return ST__FAIL(J->f, ST_ERR_JSON, "header byte %ld: expected '%c', found '%c' (0x%02x)", st__pos(J), c,
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
    if (q >= J->end) return ST__FAIL(J->f, ST_ERR_JSON, "header byte %ld: string never ends", (long)(start - 1 - J->s));
    /* the decoded string is never longer than its source */
    if (!(buf = (char *)malloc((size_t)(q - start) + 1))) return ST__FAIL(J->f, ST_ERR_NO_MEMORY, "out of memory");
    o = buf;
    while (J->p < q) {
        unsigned c = *J->p;
        if (c < 0x20) { free(buf); return ST__FAIL(J->f, ST_ERR_JSON, "header byte %ld: control character 0x%02x in a string", st__pos(J), c); }
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
                if (cp == 0) { free(buf); return ST__FAIL(J->f, ST_ERR_JSON, "header byte %ld: \\u0000 in a string", st__pos(J)); }
                o = st__put_utf8(o, cp);
                break;
            default:
            bad_escape:
                free(buf);
                return ST__FAIL(J->f, ST_ERR_JSON, "header byte %ld: bad escape sequence in a string", st__pos(J));
            }
        } else {
            int n = st__utf8_len(J->p, q);
            if (!n) { free(buf); return ST__FAIL(J->f, ST_ERR_JSON, "header byte %ld: invalid UTF-8 in a string", st__pos(J)); }
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
        return ST__FAIL(J->f, ST_ERR_JSON, "header byte %ld: expected a non-negative integer", st__pos(J));
    while (J->p < J->end && *J->p >= '0' && *J->p <= '9') {
        unsigned d = (unsigned)(*J->p - '0');
        if (v > (UINT64_MAX - d) / 10) return ST__FAIL(J->f, ST_ERR_JSON, "header byte %ld: integer does not fit in 64 bits", (long)(start - J->s));
        v = v * 10 + d;
        J->p++;
    }
    if (J->p - start > 1 && *start == '0') return ST__FAIL(J->f, ST_ERR_JSON, "header byte %ld: integer with a leading zero", (long)(start - J->s));
    if (J->p < J->end && (*J->p == '.' || *J->p == 'e' || *J->p == 'E'))
        return ST__FAIL(J->f, ST_ERR_JSON, "header byte %ld: expected an integer, found a fraction or exponent", (long)(start - J->s));
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
        if (*n == max) return ST__FAIL(J->f, too_long, "header byte %ld: %s has more than %d entries", st__pos(J), what, max);
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
            s = ST__FAIL(J->f, which < 0 ? ST_ERR_JSON : ST_ERR_DUPLICATE, "tensor '%s': %s key \"%.40s\"", t->name,
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
                s = ST__FAIL(J->f, ST_ERR_DTYPE, "tensor '%s': unknown dtype \"%.40s\"", t->name, d);
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
            if (n != 2) return ST__FAIL(J->f, ST_ERR_JSON, "tensor '%s': data_offsets needs [begin, end]", t->name);
            t->begin = off[0]; t->end = off[1];
        }
        if (st__peek(J, ',')) { J->p++; continue; }
        if ((s = st__expect(J, '}'))) return s;
        break;
    }
    if (!seen[0] || !seen[1] || !seen[2])
        return ST__FAIL(J->f, ST_ERR_JSON, "tensor '%s': missing \"%s\"", t->name,
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
    J.s = J.p = bytes + 8; J.end = bytes + 8 + n; J.f = f;
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
    if (J.p != J.end) return ST__FAIL(f, ST_ERR_JSON, "header byte %ld: unexpected data after the closing '}'", st__pos(&J));
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

st_status st_open(st_file *f, const char *path) {
    FILE *fp;
    st_status s;
    if (!f || !path) { if (f) memset(f, 0, sizeof *f); return ST_ERR_ARGUMENT; }
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
   2. One MoE layer by its HF names
   =========================================================================== */

typedef enum st_model {
    ST_MODEL_AUTO = 0,        /* --model, else __metadata__ model_type, else probe the names */
    ST_MODEL_MIXTRAL = 1,
    ST_MODEL_QWEN2_MOE = 2,
    ST_MODEL_DEEPSEEK_V3 = 3
} st_model;
static const char *const st__model_names[] = {"auto", "mixtral", "qwen2_moe", "deepseek_v3"};
const char *st_model_name(st_model m) { return (unsigned)m <= 3 ? st__model_names[m] : "?"; }

typedef struct st_layer_options {
    st_model model;            /* ST_MODEL_AUTO: see above                          */
    int layer;                 /* -1: the lowest model.layers.{i} with a MoE router */
    const char *block_prefix;  /* non-NULL: the block's prefix verbatim, e.g.
                                  "model.layers.3.mlp." or "" (a bare block)     */
    /* config.json routing fields; -1 (scale: 0) = __metadata__, else the preset */
    int top_k, norm_topk_prob, n_group, topk_group;
    double routed_scaling_factor;
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
    moe_config cfg;            /* preset + shape + routing fields, resolved         */
    moe_weights w;             /* points into buf                                   */
    float *buf[ST__NBUF];      /* owned float copies                                */
    char error[320];
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
static const st_tensor *st__find2(const st_file *f, const char *prefix, const char *suffix) {
    char name[512];
    return st__name(name, sizeof name, prefix, suffix) ? st_find(f, name) : NULL;
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
static st_status st__take(st_layer *L, const st_file *f, const char *prefix, const char *suffix,
                          int ndim, int64_t *want, float **out) {
    char name[512], got[160];
    const st_tensor *t;
    int d;
    st_status s;
    *out = NULL;
    if (!st__name(name, sizeof name, prefix, suffix)) return ST__LFAIL(L, ST_ERR_ARGUMENT, "tensor name too long");
    if (!(t = st_find(f, name))) return ST__LFAIL(L, ST_ERR_MISSING, "missing tensor '%s'", name);
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
    if ((s = st_read_f32(f, t, *out, L->error, sizeof L->error))) { free(*out); *out = NULL; }
    return s;
}

/* Integer / boolean / float value of an option: the command line (>= 0),
   else __metadata__[key], else keep *v (the preset's).                      */
static st_status st__opt_int(st_layer *L, const st_file *f, int cli, const char *key, int is_bool, int *v) {
    const char *m;
    char *endp;
    long x;
    if (cli >= 0) { *v = cli; return ST_OK; }
    if (!(m = st_meta(f, key))) return ST_OK;
    if (is_bool && (!strcmp(m, "true") || !strcmp(m, "True"))) { *v = 1; return ST_OK; }
    if (is_bool && (!strcmp(m, "false") || !strcmp(m, "False"))) { *v = 0; return ST_OK; }
    x = strtol(m, &endp, 10);
    if (endp == m || *endp || x < 0 || x > (is_bool ? 1 : INT32_MAX))
        return ST__LFAIL(L, ST_ERR_CONFIG, "__metadata__ \"%s\" = \"%.40s\" is not a%s", key, m,
                         is_bool ? " boolean" : " non-negative integer");
    *v = (int)x;
    return ST_OK;
}

/* Lowest i with model.layers.{i}.block_sparse_moe.gate.weight or
   model.layers.{i}.mlp.gate.weight in the file; -1 if none. */
static int st__first_moe_layer(const st_file *f) {
    static const char *const pre = "model.layers.";
    const size_t np = strlen(pre);
    int i, best = -1;
    for (i = 0; i < f->ntensors; i++) {
        const char *n = f->tensors[i].name, *q;
        long v = 0;
        if (strncmp(n, pre, np)) continue;
        for (q = n + np; *q >= '0' && *q <= '9' && v < 1000000; q++) v = v * 10 + (*q - '0');
        if (q == n + np || *q != '.' || v >= 1000000) continue;
        if (strcmp(q + 1, "block_sparse_moe.gate.weight") && strcmp(q + 1, "mlp.gate.weight")) continue;
        if (best < 0 || v < best) best = (int)v;
    }
    return best;
}

/* Load the layer. On failure L->error says what, and nothing is left allocated. */
st_status st_load_layer(const st_file *f, const st_layer_options *opt, st_layer *L) {
    st_layer_options o;
    const char *P, *mt;
    const char *sg_name, *su_name, *sd_name;
    char gname[96], uname[96], dname[96];
    int64_t shp[3];
    int32_t j;
    int norm = -1;
    moe_status ms;
    st_status s;
    if (!L) return ST_ERR_ARGUMENT;
    memset(L, 0, sizeof *L);
    if (!f || !f->by_name) return ST__LFAIL(L, ST_ERR_ARGUMENT, "no open file");
    if (opt) o = *opt; else st_layer_options_default(&o);

    /* 1. where the block is */
    if (o.block_prefix) {
        if (strlen(o.block_prefix) >= sizeof L->block_prefix) return ST__LFAIL(L, ST_ERR_ARGUMENT, "prefix too long");
        strcpy(L->block_prefix, o.block_prefix);
        L->layer = -1;
    } else {
        char base[64];
        L->layer = o.layer >= 0 ? o.layer : st__first_moe_layer(f);
        if (L->layer < 0) {
            if (st_find(f, "gate.weight")) L->block_prefix[0] = '\0';     /* a bare block's state_dict */
            else return ST__LFAIL(L, ST_ERR_MISSING, "no MoE router in the file: looked for "
                                  "model.layers.{i}.block_sparse_moe.gate.weight, model.layers.{i}.mlp.gate.weight and gate.weight");
        } else {
            snprintf(base, sizeof base, "model.layers.%d.", L->layer);
            snprintf(L->block_prefix, sizeof L->block_prefix, "%s%s", base,
                     st__find2(f, base, "block_sparse_moe.gate.weight") ? "block_sparse_moe." : "mlp.");
        }
    }
    P = L->block_prefix;
    if (!st__find2(f, P, "gate.weight")) {
        if (L->layer >= 0)
            return ST__LFAIL(L, ST_ERR_MISSING, "no MoE router for layer %d: neither 'model.layers.%d.block_sparse_moe.gate.weight' "
                             "nor 'model.layers.%d.mlp.gate.weight' is in the file", L->layer, L->layer, L->layer);
        return ST__LFAIL(L, ST_ERR_MISSING, "missing tensor '%sgate.weight' (the router)", P);
    }
    L->fused = st__find2(f, P, "experts.gate_up_proj") != NULL;

    /* 2. which model: option, else metadata, else the names */
    L->model = o.model;
    if (L->model == ST_MODEL_AUTO && (mt = st_meta(f, "model_type"))) {
        if (!strcmp(mt, "mixtral")) L->model = ST_MODEL_MIXTRAL;
        else if (!strcmp(mt, "qwen2_moe")) L->model = ST_MODEL_QWEN2_MOE;
        else if (!strcmp(mt, "deepseek_v3")) L->model = ST_MODEL_DEEPSEEK_V3;
    }
    if (L->model == ST_MODEL_AUTO) {
        if (st__find2(f, P, "gate.e_score_correction_bias") || st__find2(f, P, "shared_experts.gate_proj.weight"))
            L->model = ST_MODEL_DEEPSEEK_V3;
        else if (st__find2(f, P, "shared_expert.gate_proj.weight") || st__find2(f, P, "shared_expert_gate.weight") ||
                 st__find2(f, P, "experts.0.gate_proj.weight"))
            L->model = ST_MODEL_QWEN2_MOE;
        else
            L->model = ST_MODEL_MIXTRAL;      /* block_sparse_moe.experts.{j}.w1, or fused without extras */
    }
    if ((unsigned)L->model > 3) return ST__LFAIL(L, ST_ERR_CONFIG, "unknown model %d", (int)L->model);
    L->cfg = L->model == ST_MODEL_MIXTRAL ? moe_preset_mixtral()
           : L->model == ST_MODEL_QWEN2_MOE ? moe_preset_qwen2_moe() : moe_preset_deepseek_v3();

    /* 3. router [E][D] gives E and D */
    shp[0] = shp[1] = 0;
    if ((s = st__take(L, f, P, "gate.weight", 2, shp, &L->buf[ST__ROUTER]))) goto fail;
    L->E = (int32_t)shp[0]; L->D = (int32_t)shp[1];
    if (L->E < 1 || L->D < 1) { s = ST__LFAIL(L, ST_ERR_SHAPE_MISMATCH, "router '%sgate.weight' has a zero or huge dimension", P); goto fail; }

    /* 4. routed experts: fused [E][2F][D] + [E][D][F], or one Linear per expert */
    if (L->fused) {
        shp[0] = L->E; shp[1] = 0; shp[2] = L->D;
        if ((s = st__take(L, f, P, "experts.gate_up_proj", 3, shp, &L->buf[ST__GATE]))) goto fail;
        if (shp[1] % 2) { s = ST__LFAIL(L, ST_ERR_SHAPE_MISMATCH, "'%sexperts.gate_up_proj' has an odd middle dimension %lld (need 2F)", P, (long long)shp[1]); goto fail; }
        L->F = (int32_t)(shp[1] / 2);
        shp[0] = L->E; shp[1] = L->D; shp[2] = L->F;
        if ((s = st__take(L, f, P, "experts.down_proj", 3, shp, &L->buf[ST__DOWN]))) goto fail;
    } else {
        const int w123 = L->model == ST_MODEL_MIXTRAL;
        size_t FD = 0;
        for (j = 0; j < L->E; j++) {
            float *g = NULL, *u = NULL, *d = NULL;
            snprintf(gname, sizeof gname, w123 ? "experts.%d.w1.weight" : "experts.%d.gate_proj.weight", (int)j);
            snprintf(uname, sizeof uname, w123 ? "experts.%d.w3.weight" : "experts.%d.up_proj.weight", (int)j);
            snprintf(dname, sizeof dname, w123 ? "experts.%d.w2.weight" : "experts.%d.down_proj.weight", (int)j);
            shp[0] = L->F; shp[1] = L->D;                 /* F = 0 at j = 0: expert 0 sets it */
            if ((s = st__take(L, f, P, gname, 2, shp, &g))) goto fail;
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
            if ((s = st__take(L, f, P, uname, 2, shp, &u))) { free(g); goto fail; }
            shp[0] = L->D; shp[1] = L->F;
            if ((s = st__take(L, f, P, dname, 2, shp, &d))) { free(g); free(u); goto fail; }
            memcpy(L->buf[ST__GATE] + (size_t)j * FD, g, FD * sizeof(float));   /* stack: [E][F][D] */
            memcpy(L->buf[ST__UP] + (size_t)j * FD, u, FD * sizeof(float));
            memcpy(L->buf[ST__DOWN] + (size_t)j * FD, d, FD * sizeof(float));   /* [E][D][F] */
            free(g); free(u); free(d);
        }
    }

    /* 5. model extras: DeepSeek's selection bias; shared experts */
    if (L->model == ST_MODEL_DEEPSEEK_V3) {
        shp[0] = L->E;
        if ((s = st__take(L, f, P, "gate.e_score_correction_bias", 1, shp, &L->buf[ST__BIAS]))) goto fail;
    }
    sg_name = L->model == ST_MODEL_DEEPSEEK_V3 ? "shared_experts.gate_proj.weight" : "shared_expert.gate_proj.weight";
    su_name = L->model == ST_MODEL_DEEPSEEK_V3 ? "shared_experts.up_proj.weight" : "shared_expert.up_proj.weight";
    sd_name = L->model == ST_MODEL_DEEPSEEK_V3 ? "shared_experts.down_proj.weight" : "shared_expert.down_proj.weight";
    if (L->model != ST_MODEL_MIXTRAL && st__find2(f, P, sg_name)) {
        shp[0] = 0; shp[1] = L->D;
        if ((s = st__take(L, f, P, sg_name, 2, shp, &L->buf[ST__SH_GATE]))) goto fail;
        L->Fs = (int32_t)shp[0];
        shp[0] = L->Fs; shp[1] = L->D;
        if ((s = st__take(L, f, P, su_name, 2, shp, &L->buf[ST__SH_UP]))) goto fail;
        shp[0] = L->D; shp[1] = L->Fs;
        if ((s = st__take(L, f, P, sd_name, 2, shp, &L->buf[ST__SH_DOWN]))) goto fail;
        if (L->model == ST_MODEL_QWEN2_MOE && st__find2(f, P, "shared_expert_gate.weight")) {
            shp[0] = 1; shp[1] = L->D;
            if ((s = st__take(L, f, P, "shared_expert_gate.weight", 2, shp, &L->buf[ST__SH_EGATE]))) goto fail;
        }
    } else if (L->model != ST_MODEL_MIXTRAL && st__find2(f, P, L->model == ST_MODEL_DEEPSEEK_V3 ? "shared_experts.up_proj.weight" : "shared_expert.up_proj.weight")) {
        s = ST__LFAIL(L, ST_ERR_MISSING, "missing tensor '%s%s' (the shared expert's other tensors are there)", P, sg_name);
        goto fail;
    }

    /* 6. the config: the preset, the shape, the routing fields */
    L->cfg.num_experts = L->E; L->cfg.d_model = L->D; L->cfg.d_ff = L->F;
    L->cfg.shared_d_ff = L->Fs;
    L->cfg.shared_expert_gated = L->buf[ST__SH_EGATE] != NULL;
    L->cfg.selection_bias = L->buf[ST__BIAS] != NULL;
    if ((s = st__opt_int(L, f, o.top_k, "num_experts_per_tok", 0, &L->cfg.top_k))) goto fail;
    if ((s = st__opt_int(L, f, o.norm_topk_prob, "norm_topk_prob", 1, &norm))) goto fail;
    if (norm >= 0) L->cfg.normalize = norm ? MOE_NORM_SUM : MOE_NORM_NONE;
    if ((s = st__opt_int(L, f, o.n_group, "n_group", 0, &L->cfg.n_group))) goto fail;
    if ((s = st__opt_int(L, f, o.topk_group, "topk_group", 0, &L->cfg.topk_group))) goto fail;
    if (o.routed_scaling_factor > 0.0) L->cfg.routed_scale = (float)o.routed_scaling_factor;
    else if ((mt = st_meta(f, "routed_scaling_factor"))) {
        char *endp;
        double v = strtod(mt, &endp);
        if (endp == mt || *endp || !(v > 0.0 && v < 1e30)) { s = ST__LFAIL(L, ST_ERR_CONFIG, "__metadata__ \"routed_scaling_factor\" = \"%.40s\" is not a positive number", mt); goto fail; }
        L->cfg.routed_scale = (float)v;
    }
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
   3. The command-line program
   =========================================================================== */
#ifndef SAFETENSORS_MOE_NO_MAIN

static void usage(void) {
    fprintf(stderr,
        "usage: safetensors_moe FILE.safetensors [options]\n"
        "  --list                 print the tensors and __metadata__, then exit\n"
        "  --model NAME           mixtral | qwen2_moe | deepseek_v3 (default: metadata, else probe)\n"
        "  --layer N              layer index (default: the first MoE layer in the file)\n"
        "  --prefix P             the block's tensor prefix verbatim (\"\" for a bare block)\n"
        "  --top-k K              num_experts_per_tok     --norm-topk-prob 0|1\n"
        "  --n-group G            --topk-group G          --scale S (routed_scaling_factor)\n"
        "  --tokens T             synthetic input tokens when the file has no \"x\" (default 4)\n"
        "  --synthetic            ignore the file's \"x\" and \"y_ref\"\n"
        "  --out PATH             write x and y to PATH as a safetensors file\n");
}

static int parse_int(const char *s, int lo, int *out) {
    char *e;
    long v = strtol(s, &e, 10);
    if (e == s || *e || v < lo || v > INT32_MAX) return 0;
    *out = (int)v;
    return 1;
}

int main(int argc, char **argv) {
    st_file f;
    st_layer L;
    st_layer_options o;
    const char *path = NULL, *out_path = NULL;
    int list = 0, synthetic = 0, tokens = 4, i, rc = 0;
    int32_t T;
    const st_tensor *tx, *tr;
    float *x = NULL, *y = NULL, *yref = NULL;
    moe_info info;
    moe_status ms;
    st_status s;

    st_layer_options_default(&o);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int ok = 1;
        if (!strcmp(a, "--list")) { list = 1; continue; }
        if (!strcmp(a, "--synthetic")) { synthetic = 1; continue; }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(); return 0; }
        if (a[0] != '-' || !a[1]) { if (path) { usage(); return 2; } path = a; continue; }
        if (!v) { fprintf(stderr, "error: %s needs a value\n", a); return 2; }
        i++;
        if (!strcmp(a, "--model")) {
            o.model = !strcmp(v, "mixtral") ? ST_MODEL_MIXTRAL : !strcmp(v, "qwen2_moe") ? ST_MODEL_QWEN2_MOE
                    : !strcmp(v, "deepseek_v3") ? ST_MODEL_DEEPSEEK_V3 : ST_MODEL_AUTO;
            ok = o.model != ST_MODEL_AUTO;
        } else if (!strcmp(a, "--layer")) ok = parse_int(v, 0, &o.layer);
        else if (!strcmp(a, "--prefix")) o.block_prefix = v;
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

    if ((s = st_open(&f, path)) != ST_OK) {
        fprintf(stderr, "error: %s: %s: %s\n", path, st_status_string(s), f.error);
        return 1;
    }
    if (list) {
        for (i = 0; i < f.nmeta; i++) printf("__metadata__ %s = %s\n", f.meta[2 * i], f.meta[2 * i + 1]);
        for (i = 0; i < f.ntensors; i++) {
            char shape[160];
            st__shape_str(&f.tensors[i], shape, sizeof shape);
            printf("%-60s %-5s %s\n", f.tensors[i].name, st_dtype_name(f.tensors[i].dtype), shape);
        }
        st_close(&f);
        return 0;
    }
    if ((s = st_load_layer(&f, &o, &L)) != ST_OK) {
        fprintf(stderr, "error: %s: %s: %s\n", path, st_status_string(s), L.error);
        st_close(&f);
        return 1;
    }
    printf("%s: %s layer, tensors %s* (%s experts)\n", path, st_model_name(L.model), L.block_prefix,
           L.fused ? "fused 5.x" : "per-expert checkpoint");
    printf("  E %d  K %d  D %d  F %d  shared F %d%s  normalise %s  scale %g  groups %d/%d\n",
           (int)L.E, (int)L.cfg.top_k, (int)L.D, (int)L.F, (int)L.Fs, L.cfg.shared_expert_gated ? " (gated)" : "",
           L.cfg.normalize == MOE_NORM_SUM ? "yes" : "no", (double)L.cfg.routed_scale,
           (int)L.cfg.topk_group, (int)L.cfg.n_group);

    /* the input: the file's x [..., D], or synthetic tokens */
    tx = synthetic ? NULL : st_find(&f, "x");
    if (tx) {
        if (tx->ndim < 1 || tx->shape[tx->ndim - 1] != (uint64_t)L.D || tx->numel / (uint64_t)L.D > 1000000) {
            fprintf(stderr, "error: %s: tensor 'x' must have shape [..., %d]\n", path, (int)L.D);
            rc = 1; goto done;
        }
        T = (int32_t)(tx->numel / (uint64_t)L.D);
        x = (float *)malloc((size_t)T * (size_t)L.D * sizeof(float) + 1);
        if (!x || (s = st_read_f32(&f, tx, x, f.error, sizeof f.error)) != ST_OK) {
            fprintf(stderr, "error: %s: %s\n", path, x ? f.error : "out of memory");
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
    printf("  %d tokens%s; y[t][0..%d):\n", (int)T, tx ? " from the file's x" : " (synthetic)", L.D < 6 ? (int)L.D : 6);
    for (i = 0; i < T && i < 4; i++) {
        int d;
        printf("    t=%d", i);
        for (d = 0; d < L.D && d < 6; d++) printf(" %+.6f", (double)y[(size_t)i * L.D + d]);
        printf("\n");
    }

    /* the HF reference, when the file carries one */
    tr = tx ? st_find(&f, "y_ref") : NULL;
    if (tr && tr->numel == (uint64_t)T * (uint64_t)L.D && (yref = (float *)malloc((size_t)tr->numel * sizeof(float))) &&
        st_read_f32(&f, tr, yref, f.error, sizeof f.error) == ST_OK) {
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
    st_close(&f);
    return rc;
}
#endif /* SAFETENSORS_MOE_NO_MAIN */
