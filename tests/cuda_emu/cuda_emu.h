/* cuda_emu.h - run CUDA device code on a CPU, to verify it without a GPU.

   The same .cu source builds with nvcc for a GPU and, with CUDA_EMU defined,
   with g++ against this header. Each CUDA thread of a block is a fiber (its
   own small stack, switched by hand), so __syncthreads and the warp
   collectives complete only when every thread they name has arrived, in
   whatever order the schedule releases them. What runs as one instruction on
   a GPU (mma.sync, ldmatrix, cp.async) is one function here, with the
   emulated body the PTX ISA describes.

   What it checks: indexing and tail errors (with ASan: out of bounds device
   and shared memory), barrier divergence (a thread that leaves while others
   wait, a barrier some threads never reach), warp collectives whose mask
   names an absent or exited lane, races that some release order exposes
   (forward, reverse, random; warps run on after a warp op, or take turns),
   reads of memory never written (device and dynamic shared memory start as
   NaN bytes, 0xff), cp.async data read before its wait (copies land at the
   wait) or overwritten while in use (copies land at issue), fragment layout
   mistakes, launch limits (1024 threads, 48 KiB of dynamic shared memory
   unless cudaFuncSetAttribute raised it, 227 KiB at most).
   What it cannot check: races between barriers no schedule exposes,
   memory-model effects (fences, flags between blocks, spin-waits: kernels
   must not rely on them), bank conflicts, occupancy, speed, the exact
   rounding of tensor cores (the emulated mma adds exactly and rounds once).

   Blocks run one after another on the calling thread; a launch returns when
   the grid is done. An error stops the launch; cudaGetLastError then returns
   cudaErrorLaunchFailure and cuda_emu::last_error() says what happened, where.
   Not thread-safe: one launch at a time. */
#ifndef CUDA_EMU_H
#define CUDA_EMU_H

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <deque>
#include <utility>
#include <functional>
#include <map>
#include <string>
#include <vector>
#include <sys/mman.h>

#if defined(__x86_64__) && !defined(CUDA_EMU_UCONTEXT)
#  define CUDA_EMU_ASM_SWITCH 1
#else
#  include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#  define CUDA_EMU_ASAN 1
#elif defined(__has_feature)
#  if __has_feature(address_sanitizer)
#    define CUDA_EMU_ASAN 1
#  endif
#endif
#ifdef CUDA_EMU_ASAN
#  include <sanitizer/asan_interface.h>
#  include <sanitizer/common_interface_defs.h>
#endif

/* ---- CUDA's vocabulary ---------------------------------------------------- */

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
/* Static shared variables are one per kernel, shared by the fibers of a block
   and kept from block to block (as on a GPU, never rely on their contents at
   entry). Tiles belong in dynamic shared memory, which starts poisoned. */
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned x, y, z; };

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorLaunchFailure = 719
} cudaError_t;
typedef struct CUstream_st *cudaStream_t;
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

/* bf16: the storage type and the conversions the kernels use (round to
   nearest even, as __float2bfloat16_rn; NaN stays NaN). */
struct __nv_bfloat16 { unsigned short x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) u |= 0x00400000u;
    else u += 0x7fffu + ((u >> 16) & 1u);
    __nv_bfloat16 b;
    b.x = (unsigned short)(u >> 16);
    return b;
}
static inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
static inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    __nv_bfloat162 r;
    r.x = __float2bfloat16_rn(lo);
    r.y = __float2bfloat16_rn(hi);
    return r;
}

static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline int __popc(unsigned v) { return __builtin_popcount(v); }
static inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }
static inline void __threadfence() {}   /* memory-model effects are out of reach */
/* Integer atomics only (fibers never preempt each other, so a plain update is
   atomic here). There is no float atomicAdd: its sum depends on arrival
   order, and the kernels must be deterministic. */
static inline int atomicAdd(int *p, int v) { const int old = *p; *p = old + v; return old; }
static inline unsigned atomicAdd(unsigned *p, unsigned v) {
    const unsigned old = *p;
    *p = old + v;
    return old;
}

namespace cuda_emu {

/* ---- schedules ---------------------------------------------------------------- */

enum order { FORWARD, REVERSE, RANDOM };   /* blocks, and threads released together */
enum landing { AT_WAIT, AT_ISSUE };        /* when a cp.async's bytes arrive */
struct schedule {
    order release;
    bool round_robin;   /* after a warp op, other warps run first (else the warp runs on) */
    landing cp_async;
    uint64_t seed;      /* RANDOM */
};
static inline schedule &current_schedule() {
    static schedule s = {FORWARD, false, AT_WAIT, 1};
    return s;
}
static inline const char *describe(const schedule &s) {
    static char buf[96];
    static const char *ord[3] = {"forward", "reverse", "random"};
    std::snprintf(buf, sizeof buf, "%s/%s/cp.async %s", ord[s.release],
                  s.round_robin ? "round-robin" : "greedy",
                  s.cp_async == AT_WAIT ? "late" : "early");
    return buf;
}

/* ---- fibers ------------------------------------------------------------------ */

enum fiber_state { READY, AT_BARRIER, AT_WARP_OP, DONE };

struct pending_copy { unsigned char *dst; const unsigned char *src; int bytes, src_bytes; };

struct fiber {
    void *sp;                       /* saved stack pointer (asm switch) */
#ifndef CUDA_EMU_ASM_SWITCH
    ucontext_t ctx;
#endif
    unsigned char *stack;           /* lowest usable byte; a guard page lies below */
    size_t stack_bytes;
    void *asan_fake;
    bool abandoned;                 /* left mid-kernel by a failed launch */
    uint3 tid;
    int linear, lane, warp;
    fiber_state state;
    const char *wait_file;
    int wait_line;
    const char *wait_what;
    uint32_t out[8];                /* a warp op's result for this lane */
    std::vector<pending_copy> copies;              /* not yet committed */
    std::deque<std::vector<pending_copy> > groups; /* committed, not yet landed */
};

/* One warp collective in progress: the lanes of mask arrive one by one; the
   last computes every lane's result. */
struct warp_op {
    const char *what, *file;
    int line;
    unsigned mask, arrived;
    uint32_t in[32][12];
    const void *addr[32];
    void (*finish)(warp_op &op, fiber **lanes);
};

struct launch_state {
    const char *kernel;
    std::function<void()> body;
    dim3 grid, block;
    uint3 block_idx;
    int nthreads;
    std::vector<fiber *> fibers;    /* the block's threads, by linear index */
    std::deque<fiber *> ready;
    int exited, at_barrier;
    const char *barrier_file;
    int barrier_line;
    std::vector<std::vector<warp_op> > warps;
    std::vector<unsigned char> smem;
    bool failed;
    std::string error;
    uint64_t rng;
};

struct emulator {
    std::vector<fiber *> pool;      /* reused between launches */
    launch_state *launch = nullptr;
    fiber *current = nullptr;
    void *main_sp = nullptr;
#ifndef CUDA_EMU_ASM_SWITCH
    ucontext_t main_ctx;
#endif
    const void *main_stack_bottom = nullptr;
    size_t main_stack_bytes = 0;
    void *main_fake = nullptr;
    cudaError_t last = cudaSuccess;
    std::string last_message;
    std::map<const void *, size_t> smem_limit;   /* cudaFuncSetAttribute */
    std::map<void *, size_t> allocations;        /* cudaMalloc */
    ~emulator() {
        for (fiber *f : pool) {
            munmap(f->stack - 4096, f->stack_bytes + 4096);
            delete f;
        }
    }
};
static inline emulator &emu() {
    static emulator e;
    return e;
}

/* The error of the last failed launch ("" if none). */
static inline const std::string &last_error() { return emu().last_message; }

/* Stack sizes: kernels keep fragments and accumulators on the stack;
   ASan's redzones need more. Only touched pages are committed. */
#ifdef CUDA_EMU_ASAN
static const size_t fiber_stack_bytes = 1u << 20;
#else
static const size_t fiber_stack_bytes = 256u << 10;
#endif

#ifdef CUDA_EMU_ASM_SWITCH
/* cuda_emu_switch(&save, to): push the callee-saved registers, store rsp in
   *save, load rsp from `to`, pop, return into the other context. */
extern "C" void cuda_emu_switch(void **save, void *to);
asm(".text\n"
    ".globl cuda_emu_switch\n"
    ".type cuda_emu_switch,@function\n"
    "cuda_emu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size cuda_emu_switch, .-cuda_emu_switch\n");
#endif

[[noreturn]] void fiber_main();

static inline void start_fiber(fiber *f) {
#ifdef CUDA_EMU_ASAN
    /* a finished fiber's last frames (it never returns), or all of an
       abandoned one's, are left with their redzones poisoned */
    if (f->abandoned) __asan_unpoison_memory_region(f->stack, f->stack_bytes);
    else __asan_unpoison_memory_region(f->stack + f->stack_bytes - 4096, 4096);
#endif
    f->abandoned = false;
#ifdef CUDA_EMU_ASM_SWITCH
    /* a fresh stack as cuda_emu_switch leaves one: 8 bytes of MXCSR / x87
       control words, six registers, then fiber_main as the return address
       (entered with rsp = 8 mod 16, as after a call) */
    uint64_t *top = (uint64_t *)(f->stack + f->stack_bytes);
    uint32_t csr[2];
    asm volatile("stmxcsr %0\n fnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
    *--top = 0;                                  /* fiber_main's return address: none */
    *--top = (uint64_t)(uintptr_t)&fiber_main;
    for (int i = 0; i < 6; i++) *--top = 0;
    *--top = (uint64_t)csr[0] | ((uint64_t)(csr[1] & 0xffff) << 32);
    f->sp = top;
#else
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = f->stack;
    f->ctx.uc_stack.ss_size = f->stack_bytes;
    f->ctx.uc_link = nullptr;
    makecontext(&f->ctx, (void (*)())fiber_main, 0);
#endif
}

/* main -> fiber f, back when it blocks, yields or finishes */
static inline void run_fiber(fiber *f) {
    emulator &e = emu();
    e.current = f;
#ifdef CUDA_EMU_ASAN
    __sanitizer_start_switch_fiber(&e.main_fake, f->stack, f->stack_bytes);
#endif
#ifdef CUDA_EMU_ASM_SWITCH
    cuda_emu_switch(&e.main_sp, f->sp);
#else
    swapcontext(&e.main_ctx, &f->ctx);
#endif
#ifdef CUDA_EMU_ASAN
    __sanitizer_finish_switch_fiber(e.main_fake, nullptr, nullptr);
#endif
    e.current = nullptr;
}

/* fiber -> main; `finished`: this fiber's stack is done with */
static inline void to_main(bool finished) {
    emulator &e = emu();
    fiber *f = e.current;
#ifdef CUDA_EMU_ASAN
    __sanitizer_start_switch_fiber(finished ? nullptr : &f->asan_fake, e.main_stack_bottom,
                                   e.main_stack_bytes);
#else
    (void)finished;
#endif
#ifdef CUDA_EMU_ASM_SWITCH
    cuda_emu_switch(&f->sp, e.main_sp);
#else
    swapcontext(&f->ctx, &e.main_ctx);
#endif
#ifdef CUDA_EMU_ASAN
    __sanitizer_finish_switch_fiber(f->asan_fake, &e.main_stack_bottom, &e.main_stack_bytes);
#endif
}

static inline fiber *new_fiber() {
    const size_t page = 4096;
    fiber *f = new fiber();
    unsigned char *m = (unsigned char *)mmap(nullptr, fiber_stack_bytes + page,
                                             PROT_READ | PROT_WRITE,
                                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == (unsigned char *)MAP_FAILED) {
        std::fprintf(stderr, "cuda_emu: cannot map a fiber stack\n");
        std::abort();
    }
    mprotect(m, page, PROT_NONE);   /* a stack overflow faults instead of corrupting */
    f->stack = m + page;
    f->stack_bytes = fiber_stack_bytes;
    return f;
}

/* ---- errors ------------------------------------------------------------------- */

static inline uint64_t next_random(uint64_t &s) {   /* splitmix64 */
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Stop the launch with a message naming the kernel, block and thread. From a
   fiber, it never returns (the fiber is abandoned). */
static inline void vfail(const fiber *who, const char *file, int line, const char *fmt,
                         va_list ap) {
    emulator &e = emu();
    launch_state *L = e.launch;
    char msg[512];
    std::vsnprintf(msg, sizeof msg, fmt, ap);
    if (!who) who = e.current;
    if (L && !L->failed) {
        char head[256];
        if (who)
            std::snprintf(head, sizeof head, "%s, block (%u,%u,%u), thread (%u,%u,%u), %s:%d: ",
                          L->kernel, L->block_idx.x, L->block_idx.y, L->block_idx.z,
                          who->tid.x, who->tid.y, who->tid.z, file, line);
        else
            std::snprintf(head, sizeof head, "%s, block (%u,%u,%u): ", L->kernel,
                          L->block_idx.x, L->block_idx.y, L->block_idx.z);
        L->failed = true;
        L->error = std::string(head) + msg;
    }
    if (e.current) {
        to_main(false);
        std::abort();   /* never resumed */
    }
}
static inline void fail(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(nullptr, file, line, fmt, ap);
    va_end(ap);
}
/* the same, about another thread (found by the lane that completed a warp op) */
static inline void fail_for(const fiber *who, const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(who, file, line, fmt, ap);
    va_end(ap);
}

static inline fiber *self(const char *what) {
    fiber *f = emu().current;
    if (!f) {
        std::fprintf(stderr, "cuda_emu: %s outside a kernel\n", what);
        std::abort();
    }
    return f;
}

/* ---- ordering of released threads --------------------------------------------- */

static inline void release(std::vector<fiber *> &v, bool front) {
    launch_state *L = emu().launch;
    switch (current_schedule().release) {
    case FORWARD: break;
    case REVERSE: std::reverse(v.begin(), v.end()); break;
    case RANDOM:
        for (size_t i = v.size(); i > 1; i--) std::swap(v[i - 1], v[next_random(L->rng) % i]);
        break;
    }
    for (fiber *f : v) f->state = READY;
    if (front) L->ready.insert(L->ready.begin(), v.begin(), v.end());
    else L->ready.insert(L->ready.end(), v.begin(), v.end());
}

/* ---- __syncthreads ---------------------------------------------------------- */

static inline void syncthreads(const char *file, int line) {
    launch_state *L = emu().launch;
    fiber *f = self("__syncthreads");
    if (L->exited > 0)
        fail(file, line, "__syncthreads after %d thread(s) of the block exited", L->exited);
    if (L->at_barrier > 0 && (L->barrier_line != line || std::strcmp(L->barrier_file, file)))
        fail(file, line, "__syncthreads here while other threads wait at the one at %s:%d",
             L->barrier_file, L->barrier_line);
    L->barrier_file = file;
    L->barrier_line = line;
    f->state = AT_BARRIER;
    f->wait_file = file;
    f->wait_line = line;
    f->wait_what = "__syncthreads";
    if (++L->at_barrier == L->nthreads) {
        std::vector<fiber *> all;
        for (fiber *g : L->fibers)
            if (g != f) all.push_back(g);
        L->at_barrier = 0;
        release(all, false);
        f->state = READY;
        L->ready.push_back(f);   /* the last arrival does not run ahead of the others */
    }
    to_main(false);
}

/* ---- warp collectives ------------------------------------------------------------ */

/* Join the warp op of this lane's mask; returns when every lane of the mask
   arrived and the last one ran `finish`. The caller's result is in f->out. */
static inline fiber *warp_collective(const char *what, const char *file, int line, unsigned mask,
                                     const uint32_t *in, int nin, const void *addr,
                                     void (*finish)(warp_op &, fiber **)) {
    launch_state *L = emu().launch;
    fiber *f = self(what);
    const int base = f->warp * 32;
    fiber *lanes[32];
    for (int l = 0; l < 32; l++) lanes[l] = base + l < L->nthreads ? L->fibers[base + l] : nullptr;
    if (!(mask >> f->lane & 1u))
        fail(file, line, "%s: mask 0x%08x leaves out the calling lane %d", what, mask, f->lane);
    for (int l = 0; l < 32; l++) {
        if (!(mask >> l & 1u)) continue;
        if (!lanes[l])
            fail(file, line, "%s: mask 0x%08x names lane %d, which the block does not have "
                 "(%d threads)", what, mask, l, L->nthreads);
        if (lanes[l]->state == DONE)
            fail(file, line, "%s: mask 0x%08x names lane %d, which has exited", what, mask, l);
    }
    std::vector<warp_op> &ops = L->warps[f->warp];
    size_t k = 0;
    for (; k < ops.size(); k++) {
        if (!(ops[k].mask >> f->lane & 1u)) continue;
        if (ops[k].mask != mask || std::strcmp(ops[k].what, what) || ops[k].line != line)
            fail(file, line, "%s (mask 0x%08x) while lanes of this warp wait at %s (mask 0x%08x) "
                 "at %s:%d", what, mask, ops[k].what, ops[k].mask, ops[k].file, ops[k].line);
        break;
    }
    if (k == ops.size()) {
        for (const warp_op &o : ops)
            if (o.mask & mask)
                fail(file, line, "%s: mask 0x%08x overlaps the mask 0x%08x of %s at %s:%d", what,
                     mask, o.mask, o.what, o.file, o.line);
        warp_op o;
        std::memset(&o, 0, sizeof o);
        o.what = what; o.file = file; o.line = line; o.mask = mask; o.finish = finish;
        ops.push_back(o);
    }
    warp_op &op = ops[k];
    for (int i = 0; i < nin; i++) op.in[f->lane][i] = in[i];
    op.addr[f->lane] = addr;
    op.arrived |= 1u << f->lane;
    f->wait_file = file;
    f->wait_line = line;
    f->wait_what = what;
    if (op.arrived != mask) {
        f->state = AT_WARP_OP;
        to_main(false);
        return f;
    }
    op.finish(op, lanes);
    std::vector<fiber *> others;
    for (int l = 0; l < 32; l++)
        if ((mask >> l & 1u) && l != f->lane) others.push_back(lanes[l]);
    ops.erase(ops.begin() + (long)k);
    if (current_schedule().round_robin) {   /* every warp gets a turn first */
        others.push_back(f);
        release(others, false);
        f->state = READY;
        to_main(false);
    } else {
        release(others, true);              /* the warp runs on */
    }
    return f;
}

static inline void finish_sync(warp_op &, fiber **) {}
static inline void syncwarp(const char *file, int line, unsigned mask) {
    warp_collective("__syncwarp", file, line, mask, nullptr, 0, nullptr, finish_sync);
}

/* in[lane][0] value, [1] source lane or delta, [2] width, [3] kind */
enum { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR };
static inline void finish_shfl(warp_op &op, fiber **lanes) {
    for (int l = 0; l < 32; l++) {
        if (!(op.mask >> l & 1u)) continue;
        const int arg = (int)op.in[l][1], width = (int)op.in[l][2];
        const int seg = l & ~(width - 1);
        int src;
        switch (op.in[l][3]) {
        case SHFL_IDX: src = seg + (arg & (width - 1)); break;
        case SHFL_UP: src = l - arg >= seg ? l - arg : l; break;
        case SHFL_DOWN: src = l + arg < seg + width ? l + arg : l; break;
        default: src = l ^ arg; if (src >= seg + width) src = l; break;
        }
        /* a lane outside the mask gives an undefined value: NaN bits */
        lanes[l]->out[0] = op.mask >> src & 1u ? op.in[src][0] : 0xffffffffu;
    }
}
template <class T>
static inline T shfl(const char *what, const char *file, int line, unsigned mask, T v, int arg,
                     int width, int kind) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "32- and 64-bit shuffles only");
    if constexpr (sizeof(T) == 8) {   /* as CUDA's headers do it: two 32-bit shuffles */
        uint32_t half[2];
        std::memcpy(half, &v, 8);
        half[0] = shfl(what, file, line, mask, half[0], arg, width, kind);
        half[1] = shfl(what, file, line, mask, half[1], arg, width, kind);
        T r;
        std::memcpy(&r, half, 8);
        return r;
    }
    if (width < 1 || width > 32 || (width & (width - 1)))
        fail(file, line, "%s: width %d is not a power of two in 1..32", what, width);
    uint32_t in[4];
    std::memcpy(&in[0], &v, 4);
    in[1] = (uint32_t)arg; in[2] = (uint32_t)width; in[3] = (uint32_t)kind;
    fiber *f = warp_collective(what, file, line, mask, in, 4, nullptr, finish_shfl);
    T r;
    std::memcpy(&r, &f->out[0], 4);
    return r;
}

static inline void finish_ballot(warp_op &op, fiber **lanes) {
    uint32_t bits = 0;
    for (int l = 0; l < 32; l++)
        if ((op.mask >> l & 1u) && op.in[l][0]) bits |= 1u << l;
    for (int l = 0; l < 32; l++)
        if (op.mask >> l & 1u) lanes[l]->out[0] = bits;
}
template <class T>
static inline T shfl_idx(const char *file, int line, unsigned mask, T v, int src, int width = 32) {
    return shfl("__shfl_sync", file, line, mask, v, src, width, SHFL_IDX);
}
template <class T>
static inline T shfl_up(const char *file, int line, unsigned mask, T v, unsigned d,
                        int width = 32) {
    return shfl("__shfl_up_sync", file, line, mask, v, (int)d, width, SHFL_UP);
}
template <class T>
static inline T shfl_down(const char *file, int line, unsigned mask, T v, unsigned d,
                          int width = 32) {
    return shfl("__shfl_down_sync", file, line, mask, v, (int)d, width, SHFL_DOWN);
}
template <class T>
static inline T shfl_xor(const char *file, int line, unsigned mask, T v, int x, int width = 32) {
    return shfl("__shfl_xor_sync", file, line, mask, v, x, width, SHFL_XOR);
}

static inline unsigned ballot(const char *file, int line, unsigned mask, int pred) {
    uint32_t in = pred != 0;
    return warp_collective("__ballot_sync", file, line, mask, &in, 1, nullptr,
                           finish_ballot)->out[0];
}

/* __reduce_{add,min,max}_sync: in[lane][1] the operation */
static inline void finish_reduce(warp_op &op, fiber **lanes) {
    bool first = true;
    uint32_t acc = 0;
    for (int l = 0; l < 32; l++) {
        if (!(op.mask >> l & 1u)) continue;
        const uint32_t v = op.in[l][0];
        if (first) acc = v;
        else if (op.in[l][1] == 0) acc += v;
        else if (op.in[l][1] == 1) acc = (int32_t)v < (int32_t)acc ? v : acc;
        else if (op.in[l][1] == 2) acc = (int32_t)v > (int32_t)acc ? v : acc;
        else if (op.in[l][1] == 3) acc = v < acc ? v : acc;
        else acc = v > acc ? v : acc;
        first = false;
    }
    for (int l = 0; l < 32; l++)
        if (op.mask >> l & 1u) lanes[l]->out[0] = acc;
}
static inline uint32_t reduce(const char *what, const char *file, int line, unsigned mask,
                              uint32_t v, int kind) {
    uint32_t in[2] = {v, (uint32_t)kind};
    return warp_collective(what, file, line, mask, in, 2, nullptr, finish_reduce)->out[0];
}

/* ---- tensor-core operations --------------------------------------------------- */

static inline float bf16_lo(uint32_t r) { return __uint_as_float(r << 16); }
static inline float bf16_hi(uint32_t r) { return __uint_as_float(r & 0xffff0000u); }

/* mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, from the PTX ISA's
   fragment tables (lane = 4g + t): A reg r = A[g + 8(r&1)][2t + 8(r>>1) + {0,1}],
   B reg r = B[2t + 8r + {0,1}][g], C/D reg r = C[g + 8(r>>1)][2t + (r&1)].
   in[lane]: a0..a3, b0..b1, c0..c3 (floats as bits). */
static inline void finish_mma(warp_op &op, fiber **lanes) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; l++) {
        const int g = l >> 2, t = l & 3;
        for (int r = 0; r < 4; r++) {
            const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
            A[row][col] = bf16_lo(op.in[l][r]);
            A[row][col + 1] = bf16_hi(op.in[l][r]);
        }
        for (int r = 0; r < 2; r++) {
            B[2 * t + 8 * r][g] = bf16_lo(op.in[l][4 + r]);
            B[2 * t + 8 * r + 1][g] = bf16_hi(op.in[l][4 + r]);
        }
        for (int r = 0; r < 4; r++)
            C[g + 8 * (r >> 1)][2 * t + (r & 1)] = __uint_as_float(op.in[l][6 + r]);
    }
    for (int l = 0; l < 32; l++) {
        const int g = l >> 2, t = l & 3;
        for (int r = 0; r < 4; r++) {
            const int m = g + 8 * (r >> 1), n = 2 * t + (r & 1);
            double s = C[m][n];   /* exact products and sum, one rounding */
            for (int k = 0; k < 16; k++) s += (double)A[m][k] * (double)B[k][n];
            lanes[l]->out[r] = __float_as_uint((float)s);
        }
    }
}
static inline void mma_m16n8k16_bf16(const char *file, int line, float d[4], const uint32_t a[4],
                                     const uint32_t b[2], const float c[4]) {
    uint32_t in[10];
    for (int i = 0; i < 4; i++) in[i] = a[i];
    in[4] = b[0]; in[5] = b[1];
    for (int i = 0; i < 4; i++) in[6 + i] = __float_as_uint(c[i]);
    fiber *f = warp_collective("mma.sync.m16n8k16", file, line, 0xffffffffu, in, 10, nullptr,
                               finish_mma);
    for (int i = 0; i < 4; i++) d[i] = __uint_as_float(f->out[i]);
}

/* ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lanes 8j..8j+7 give
   the 16-byte rows of matrix j; lane l gets, in register j, row l/4 elements
   2(l%4) and 2(l%4)+1 of matrix j (of its transpose with .trans).
   in[lane][0] = number of matrices, [1] = trans. */
static inline void finish_ldmatrix(warp_op &op, fiber **lanes) {
    const int nmat = (int)op.in[0][0], trans = (int)op.in[0][1];
    launch_state *L = emu().launch;
    for (int j = 0; j < nmat; j++)
        for (int r = 0; r < 8; r++) {
            const unsigned char *p = (const unsigned char *)op.addr[8 * j + r];
            const unsigned char *lo = L->smem.data(), *hi = lo + L->smem.size();
            if (((uintptr_t)p & 15) || p < lo || p + 16 > hi) {
                fail_for(lanes[8 * j + r], op.file, op.line,
                         "ldmatrix: lane %d's row address %p is not a 16-byte "
                         "aligned row inside dynamic shared memory", 8 * j + r, (const void *)p);
            }
        }
    for (int l = 0; l < 32; l++)
        for (int j = 0; j < nmat; j++) {
            uint16_t e[2];
            for (int h = 0; h < 2; h++) {
                const int row = trans ? 2 * (l & 3) + h : l >> 2;
                const int col = trans ? l >> 2 : 2 * (l & 3) + h;
                std::memcpy(&e[h], (const unsigned char *)op.addr[8 * j + row] + 2 * col, 2);
            }
            lanes[l]->out[j] = (uint32_t)e[0] | (uint32_t)e[1] << 16;
        }
}
static inline void ldmatrix(const char *file, int line, uint32_t *r, int nmat, bool trans,
                            const void *row) {
    uint32_t in[2] = {(uint32_t)nmat, (uint32_t)trans};
    fiber *f = warp_collective(trans ? "ldmatrix.trans" : "ldmatrix", file, line, 0xffffffffu, in,
                               2, row, finish_ldmatrix);
    for (int j = 0; j < nmat; j++) r[j] = f->out[j];
}

/* ---- cp.async ---------------------------------------------------------------------- */

static inline void land(const std::vector<pending_copy> &g) {
    for (const pending_copy &c : g) {
        std::memcpy(c.dst, c.src, (size_t)c.src_bytes);
        std::memset(c.dst + c.src_bytes, 0, (size_t)(c.bytes - c.src_bytes));
    }
}
/* cp.async.cg.shared.global [dst], [src], bytes, src_bytes (the rest zero-filled) */
static inline void cp_async(const char *file, int line, void *dst, const void *src, int bytes,
                            int src_bytes) {
    fiber *f = self("cp.async");
    launch_state *L = emu().launch;
    unsigned char *d = (unsigned char *)dst;
    if ((bytes != 4 && bytes != 8 && bytes != 16) || src_bytes < 0 || src_bytes > bytes)
        fail(file, line, "cp.async: %d bytes (src %d)", bytes, src_bytes);
    if (((uintptr_t)d | (uintptr_t)src) & (uintptr_t)(bytes - 1))
        fail(file, line, "cp.async: addresses not aligned to %d bytes", bytes);
    if (d < L->smem.data() || d + bytes > L->smem.data() + L->smem.size())
        fail(file, line, "cp.async: destination outside dynamic shared memory");
    pending_copy c = {d, (const unsigned char *)src, bytes, src_bytes};
    if (current_schedule().cp_async == AT_ISSUE) land(std::vector<pending_copy>(1, c));
    else f->copies.push_back(c);
}
static inline void cp_async_commit() {
    fiber *f = self("cp.async.commit_group");
    f->groups.push_back(f->copies);
    f->copies.clear();
}
/* all but the newest n committed groups have landed */
static inline void cp_async_wait(int n) {
    fiber *f = self("cp.async.wait_group");
    while ((int)f->groups.size() > n) {
        land(f->groups.front());
        f->groups.pop_front();
    }
}

/* ---- launches ---------------------------------------------------------------------- */

[[noreturn]] inline void fiber_main() {
    emulator &e = emu();
#ifdef CUDA_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &e.main_stack_bottom, &e.main_stack_bytes);
#endif
    e.launch->body();
    fiber *f = e.current;
    launch_state *L = e.launch;
    if (L->at_barrier > 0)
        fail("(exit)", 0, "thread exited while %d thread(s) wait at __syncthreads at %s:%d",
             L->at_barrier, L->barrier_file, L->barrier_line);
    for (const warp_op &o : L->warps[f->warp])
        if (o.mask >> f->lane & 1u)
            fail("(exit)", 0, "lane %d exited while named in the mask 0x%08x of %s at %s:%d",
                 f->lane, o.mask, o.what, o.file, o.line);
    f->groups.push_back(f->copies);   /* copies never waited for land at exit */
    f->copies.clear();
    cp_async_wait(0);
    f->state = DONE;
    L->exited++;
    to_main(true);
    std::abort();
}

static inline void run_block(launch_state &L) {
    std::vector<fiber *> order;
    for (int i = 0; i < L.nthreads; i++) {
        fiber *f = L.fibers[i];
        f->state = READY;
        f->copies.clear();
        f->groups.clear();
        start_fiber(f);
        order.push_back(f);
    }
    L.ready.clear();
    L.exited = 0;
    L.at_barrier = 0;
    for (auto &w : L.warps) w.clear();
    if (!L.smem.empty()) std::memset(L.smem.data(), 0xff, L.smem.size());
    release(order, false);
    while (!L.failed) {
        if (L.ready.empty()) {
            if (L.exited == L.nthreads) break;
            std::string who;
            for (fiber *f : L.fibers)
                if (f->state != DONE) {
                    char b[160];
                    std::snprintf(b, sizeof b, "%s thread %d at %s (%s:%d)", who.empty() ? "" : ";",
                                  f->linear, f->wait_what, f->wait_file, f->wait_line);
                    who += b;
                    if (who.size() > 400) { who += " ..."; break; }
                }
            fail("(scheduler)", 0, "deadlock: %d thread(s) exited, the rest wait:%s", L.exited,
                 who.c_str());
            break;
        }
        fiber *f = L.ready.front();
        L.ready.pop_front();
        if (f->state != READY) continue;
        run_fiber(f);
    }
}

/* Everything a launch needs checked before it runs, as cudaLaunchKernel does. */
template <class... P, class... A>
static inline cudaError_t launch(const char *name, void (*kernel)(P...), dim3 grid, dim3 block,
                                 size_t smem, cudaStream_t stream, A... args) {
    emulator &e = emu();
    (void)stream;
    const unsigned long nthreads = (unsigned long)block.x * block.y * block.z;
    auto limit = e.smem_limit.find((const void *)kernel);
    const size_t smem_max = limit == e.smem_limit.end() ? (48u << 10) : limit->second;
    if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
        grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
        e.last = cudaErrorInvalidConfiguration;
        e.last_message = std::string(name) + ": invalid launch configuration";
        return e.last;
    }
    if (smem > smem_max) {
        e.last = cudaErrorInvalidValue;
        e.last_message = std::string(name) + ": " + std::to_string(smem) +
                         " bytes of dynamic shared memory, the limit is " +
                         std::to_string(smem_max);
        return e.last;
    }
    launch_state L;
    L.kernel = name;
    L.body = [=]() { kernel(args...); };
    L.grid = grid;
    L.block = block;
    L.nthreads = (int)nthreads;
    L.warps.resize((nthreads + 31) / 32);
    L.smem.assign(smem, 0xff);
    L.failed = false;
    L.rng = current_schedule().seed * 0x2545f4914f6cdd1dull + 1;
    L.barrier_file = "";
    L.barrier_line = 0;
    while (e.pool.size() < nthreads) e.pool.push_back(new_fiber());
    for (unsigned long i = 0; i < nthreads; i++) {
        fiber *f = e.pool[i];
        f->linear = (int)i;
        f->lane = (int)(i & 31);
        f->warp = (int)(i >> 5);
        f->tid.x = (unsigned)(i % block.x);
        f->tid.y = (unsigned)(i / block.x % block.y);
        f->tid.z = (unsigned)(i / ((unsigned long)block.x * block.y));
        L.fibers.push_back(f);
    }
    const unsigned long nblocks = (unsigned long)grid.x * grid.y * grid.z;
    std::vector<unsigned long> blocks(nblocks);
    for (unsigned long b = 0; b < nblocks; b++) blocks[b] = b;
    if (current_schedule().release == REVERSE) std::reverse(blocks.begin(), blocks.end());
    if (current_schedule().release == RANDOM)
        for (size_t i = blocks.size(); i > 1; i--)
            std::swap(blocks[i - 1], blocks[next_random(L.rng) % i]);
    e.launch = &L;
    for (unsigned long b : blocks) {
        L.block_idx.x = (unsigned)(b % grid.x);
        L.block_idx.y = (unsigned)(b / grid.x % grid.y);
        L.block_idx.z = (unsigned)(b / ((unsigned long)grid.x * grid.y));
        run_block(L);
        if (L.failed) break;
    }
    e.launch = nullptr;
    if (L.failed)
        for (fiber *f : L.fibers) f->abandoned = f->state != DONE;
    if (L.failed) {
        e.last = cudaErrorLaunchFailure;
        e.last_message = L.error;
        return e.last;
    }
    return cudaSuccess;
}

static inline launch_state &in_launch(const char *what) {
    if (!emu().launch) {
        std::fprintf(stderr, "cuda_emu: %s outside a kernel\n", what);
        std::abort();
    }
    return *emu().launch;
}
static inline unsigned char *dynamic_smem() {
    return in_launch("dynamic shared memory").smem.data();
}

}  // namespace cuda_emu

/* ---- device-side names ---------------------------------------------------------- */

#define threadIdx (::cuda_emu::self("threadIdx")->tid)
#define blockIdx (::cuda_emu::in_launch("blockIdx").block_idx)
#define blockDim (::cuda_emu::in_launch("blockDim").block)
#define gridDim (::cuda_emu::in_launch("gridDim").grid)
#define warpSize 32

#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(mask) ::cuda_emu::syncwarp(__FILE__, __LINE__, (mask))
#define __shfl_sync(m, ...) ::cuda_emu::shfl_idx(__FILE__, __LINE__, (m), __VA_ARGS__)
#define __shfl_up_sync(m, ...) ::cuda_emu::shfl_up(__FILE__, __LINE__, (m), __VA_ARGS__)
#define __shfl_down_sync(m, ...) ::cuda_emu::shfl_down(__FILE__, __LINE__, (m), __VA_ARGS__)
#define __shfl_xor_sync(m, ...) ::cuda_emu::shfl_xor(__FILE__, __LINE__, (m), __VA_ARGS__)
#define __ballot_sync(m, p) ::cuda_emu::ballot(__FILE__, __LINE__, (m), (p))
#define __reduce_add_sync(m, v) \
    ::cuda_emu::reduce("__reduce_add_sync", __FILE__, __LINE__, (m), (uint32_t)(v), 0)
#define __reduce_min_sync(m, v) \
    ::cuda_emu::reduce("__reduce_min_sync", __FILE__, __LINE__, (m), (uint32_t)(v), 1)
#define __reduce_max_sync(m, v) \
    ::cuda_emu::reduce("__reduce_max_sync", __FILE__, __LINE__, (m), (uint32_t)(v), 2)

/* <<<grid, block, smem, stream>>> (nvcc) as a call; returns the launch's cudaError_t */
#define CUDA_EMU_LAUNCH(kernel, grid, block, smem, stream, ...) \
    ::cuda_emu::launch(#kernel, kernel, (grid), (block), (smem), (stream), __VA_ARGS__)

/* ---- host API subset ------------------------------------------------------------ */

static inline cudaError_t cudaMalloc(void **p, size_t bytes) {
    void *m = nullptr;   /* 256-byte aligned as cudaMalloc's; ASan sees any access past the end */
    if (posix_memalign(&m, 256, bytes ? bytes : 1) != 0) return cudaErrorMemoryAllocation;
    std::memset(m, 0xff, bytes);                /* NaN bytes: reads of unwritten memory show */
    ::cuda_emu::emu().allocations[m] = bytes;
    *p = m;
    return cudaSuccess;
}
template <class T> static inline cudaError_t cudaMalloc(T **p, size_t bytes) {
    return cudaMalloc((void **)p, bytes);
}
static inline cudaError_t cudaFree(void *p) {
    if (!p) return cudaSuccess;
    if (!::cuda_emu::emu().allocations.erase(p)) return cudaErrorInvalidValue;
    std::free(p);
    return cudaSuccess;
}
static inline cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind) {
    if (n) std::memmove(d, s, n);
    return cudaSuccess;
}
static inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k,
                                          cudaStream_t = nullptr) {
    return cudaMemcpy(d, s, n, k);
}
static inline cudaError_t cudaMemset(void *d, int v, size_t n) {
    if (n) std::memset(d, v, n);
    return cudaSuccess;
}
static inline cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t = nullptr) {
    return cudaMemset(d, v, n);
}
static inline cudaError_t cudaStreamCreate(cudaStream_t *s) { *s = nullptr; return cudaSuccess; }
static inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
static inline cudaError_t cudaGetLastError() {
    const cudaError_t r = ::cuda_emu::emu().last;
    ::cuda_emu::emu().last = cudaSuccess;
    return r;
}
static inline cudaError_t cudaPeekAtLastError() { return ::cuda_emu::emu().last; }
static inline cudaError_t cudaDeviceSynchronize() { return cudaGetLastError(); }
static inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaGetLastError(); }
static inline cudaError_t cudaGetDeviceCount(int *n) { *n = 1; return cudaSuccess; }
/* Events read the host clock when recorded (every call here is synchronous):
   a benchmark's plumbing runs on the emulator, its times mean nothing. */
typedef struct cuda_emu_event { std::chrono::steady_clock::time_point at; } *cudaEvent_t;
static inline cudaError_t cudaEventCreate(cudaEvent_t *e) {
    *e = new cuda_emu_event();
    return cudaSuccess;
}
static inline cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
static inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) {
    e->at = std::chrono::steady_clock::now();
    return cudaSuccess;
}
static inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
static inline cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
    return cudaSuccess;
}
static inline const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
    }
}
template <class F>
static inline cudaError_t cudaFuncSetAttribute(F *kernel, cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > (227 << 10))
        return cudaErrorInvalidValue;   /* 227 KiB: an H100's opt-in maximum per block */
    ::cuda_emu::emu().smem_limit[(const void *)kernel] = (size_t)value;
    return cudaSuccess;
}

#endif /* CUDA_EMU_H */
