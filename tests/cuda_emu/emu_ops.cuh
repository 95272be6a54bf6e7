/* emu_ops.cuh - the device operations that are one PTX instruction on a GPU,
   each behind one function: inline PTX under nvcc, the emulator's body when
   CUDA_EMU is defined (tests/cuda_emu/cuda_emu.h). A launch macro that is
   <<<grid, block, smem, stream>>> under nvcc. */
#ifndef EMU_OPS_CUH
#define EMU_OPS_CUH

#include <stdint.h>
#ifdef CUDA_EMU
#  include "cuda_emu.h"
#  define EMU_LAUNCH(kernel, grid, block, smem, stream, ...) \
       CUDA_EMU_LAUNCH(kernel, grid, block, smem, stream, __VA_ARGS__)
#else
#  include <cuda_runtime.h>
#  define EMU_LAUNCH(kernel, grid, block, smem, stream, ...) \
       (kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__), cudaGetLastError())
#endif

/* The block's dynamic shared memory (16-byte aligned). */
__device__ __forceinline__ unsigned char *emu_dynamic_smem() {
#ifdef CUDA_EMU
    return cuda_emu::dynamic_smem();
#else
    extern __shared__ __align__(16) unsigned char emu_smem_[];
    return emu_smem_;
#endif
}

/* d = a * b + c: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 */
__device__ __forceinline__ void emu_mma_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                             const float c[4]) {
#ifdef CUDA_EMU
    cuda_emu::mma_m16n8k16_bf16(__FILE__, __LINE__, d, a, b, c);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

/* ldmatrix.sync.aligned.m8n8.x4.shared.b16 (and .x2 .trans): `row` is this
   lane's row address in shared memory. */
__device__ __forceinline__ void emu_ldmatrix_x4(uint32_t r[4], const void *row) {
#ifdef CUDA_EMU
    cuda_emu::ldmatrix(__FILE__, __LINE__, r, 4, false, row);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}
__device__ __forceinline__ void emu_ldmatrix_x2_trans(uint32_t r[2], const void *row) {
#ifdef CUDA_EMU
    cuda_emu::ldmatrix(__FILE__, __LINE__, r, 2, true, row);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
#endif
}

/* cp.async.cg.shared.global: 16 bytes, of which src_bytes are read (the rest
   zero-filled); commit_group; wait_group N. */
__device__ __forceinline__ void emu_cp_async16(void *smem_dst, const void *src, int src_bytes) {
#ifdef CUDA_EMU
    cuda_emu::cp_async(__FILE__, __LINE__, smem_dst, src, 16, src_bytes);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(a), "l"(src),
                 "r"(src_bytes));
#endif
}
__device__ __forceinline__ void emu_cp_async_commit() {
#ifdef CUDA_EMU
    cuda_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> __device__ __forceinline__ void emu_cp_async_wait() {
#ifdef CUDA_EMU
    cuda_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
#endif
}

#endif /* EMU_OPS_CUH */
