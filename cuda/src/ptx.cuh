// kvengine — the inline-PTX helpers the CUDA kernels share: asynchronous global -> shared copies (sm_80+) and the
// ldmatrix fragment load.  Device code only; every instruction here has an emulator counterpart
// (tests/cuda_emu/include/cuda_runtime.h), so keep the asm strings in this exact form.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace kvengine::cuda::ptx {

// 16-byte asynchronous copy (both addresses 16-byte aligned); lands by cp_async_wait / cp_async_wait_all
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// wait until at most N of this thread's committed groups are still in flight
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Four transposed 8 x 8 b16 matrices from shared memory.  Lane 8m + r gives the 16-byte aligned address of row r of
// matrix m; register m of lane l receives elements (row 2(l % 4), col l / 4) (low half) and (row 2(l % 4) + 1,
// col l / 4) (high half) of matrix m: with the rows = keys of a row-major [key][channel] tile, that is the B fragment
// of mma.m16n8k16 (.col) for 8 channels.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s)
               : "memory");
}

}  // namespace kvengine::cuda::ptx
