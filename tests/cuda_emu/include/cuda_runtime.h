// kvengine CUDA emulator: the part of the CUDA runtime and device API the project's kernels use (see kve_emu.h).
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kve_emu.h"

#ifdef KVE_EMU_REAL_TYPES
// the toolkit's declarations first: they name parameters gridDim / blockDim, which are macros below
#include <cuda_runtime_api.h>
#include <vector_functions.h>
#endif

// ---- qualifiers (replacing the toolkit's host definitions, if its headers came first) -------------------------------------
#undef __device__
#undef __global__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __align__
#undef __grid_constant__
#undef __shared__
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __grid_constant__
// every __shared__ declaration is rewritten by translate.py; one that is not fails to compile here
#define __shared__ KVENGINE_EMU_UNTRANSLATED_SHARED_DECLARATION

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::g_cta->bid)
#define blockDim (::emu::g_cta->block)
#define gridDim (::emu::g_cta->grid)
#define warpSize 32

// ---- vector types and runtime enums (the toolkit's, see kve_emu.h, or these) -----------------------------------------------
#ifndef KVE_EMU_REAL_TYPES
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) double2 { double x, y; };

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef cudaError_t cudaError;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};
#endif

#ifndef KVE_EMU_REAL_TYPES
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
#endif

// ---- runtime API ----------------------------------------------------------------------------------------------------------
// The emulated device: KVENGINE_EMU_SMS multiprocessors (default 8), compute capability 9.0, 227 KB of shared memory
// per block.  With the toolkit's headers these are its C declarations, defined in emu_runtime.cpp; otherwise inline.
#ifdef KVE_EMU_REAL_TYPES
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int v) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(fn), attr, v);
}
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F* fn, int threads, size_t smem) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, reinterpret_cast<const void*>(fn), threads, smem);
}
#else
#define KVE_EMU_RUNTIME_INLINE 1
#include "kve_emu_runtime_api.inc"
#endif

// ---- arithmetic intrinsics (IEEE round-to-nearest; the emulated TUs are compiled with -ffp-contract=off) ----------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x != x ? 0.f : std::min(1.f, std::max(0.f, x)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
[[noreturn]] inline void __trap() { ::emu::fail("__trap() reached"); }
inline void __threadfence() {}
inline void __threadfence_block() {}
// CUDA's device math has these in the global namespace
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;
// CUDA's device min/max overloads (mixed integer types promote as in C++)
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

// ---- synchronization ----------------------------------------------------------------------------------------------------
inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  char nothing = 0;
  ::emu::warp_exchange(mask, 6, &nothing, 1);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int l = ::emu::lane(), src = l ^ lane_mask;
  return ::emu::shfl_any(mask, v, (src & ~(width - 1)) == (l & ~(width - 1)) ? src : l, 1);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int l = ::emu::lane();
  return ::emu::shfl_any(mask, v, (l & ~(width - 1)) + (src_lane & (width - 1)), 2);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int l = ::emu::lane(), seg = l & ~(width - 1);
  const int src = l + static_cast<int>(delta);
  return ::emu::shfl_any(mask, v, src < seg + width ? src : l, 3);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int l = ::emu::lane(), seg = l & ~(width - 1);
  const int src = l - static_cast<int>(delta);
  return ::emu::shfl_any(mask, v, src >= seg ? src : l, 4);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  const unsigned char p = pred != 0;
  auto slot = ::emu::warp_exchange(mask, 5, &p, 1);
  unsigned r = 0;
  for (int j = 0; j < 32; ++j)
    if (((mask >> j) & 1u) && slot[j][0]) r |= 1u << j;
  return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

// ---- atomics (the emulator runs one thread at a time: plain read-modify-write) -------------------------------------------
template <typename T, typename U>
inline T atomicAdd(T* p, U v) { const T o = *p; *p = static_cast<T>(o + v); return o; }
template <typename T, typename U>
inline T atomicSub(T* p, U v) { const T o = *p; *p = static_cast<T>(o - v); return o; }
template <typename T, typename U>
inline T atomicMax(T* p, U v) { const T o = *p; *p = std::max<T>(o, static_cast<T>(v)); return o; }
template <typename T, typename U>
inline T atomicMin(T* p, U v) { const T o = *p; *p = std::min<T>(o, static_cast<T>(v)); return o; }
template <typename T, typename U>
inline T atomicOr(T* p, U v) { const T o = *p; *p = static_cast<T>(o | v); return o; }
template <typename T, typename U>
inline T atomicAnd(T* p, U v) { const T o = *p; *p = static_cast<T>(o & v); return o; }
template <typename T, typename U>
inline T atomicExch(T* p, U v) { const T o = *p; *p = static_cast<T>(v); return o; }
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) { const T o = *p; if (o == cmp) *p = v; return o; }

// ---- shared-memory addresses (only dynamic shared memory is addressed this way) ------------------------------------------
inline size_t __cvta_generic_to_shared(const void* p) {
  const unsigned char* q = static_cast<const unsigned char*>(p);
  const unsigned char* b = ::emu::dyn_smem();
  if (q < b || q > b + ::emu::g_cta->dyn_size) ::emu::fail("__cvta_generic_to_shared of a non-shared address");
  return static_cast<size_t>(q - b);
}

// ---- inline PTX the kernels use (translate.py turns `asm volatile("op ...")` into ptx_op(operands...)) -----------------
namespace emu {
inline void ptx_cp_async_cg_shared_global(uint32_t smem, const void* gmem, int bytes) {
  if (bytes != 16) fail("cp.async.cg of %d bytes (16 only)", bytes);
  cp_async16(smem, gmem);
}
inline void ptx_cp_async_commit_group() { cp_async_commit(); }
inline void ptx_cp_async_wait_group(int n) { cp_async_wait(n); }
inline void ptx_cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait(0);
}
inline void ptx_ldmatrix_sync_aligned_m8n8_x4_trans_shared_b16(uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                               uint32_t& r3, uint32_t smem) {
  uint32_t r[4];
  ldmatrix_x4(true, r, smem);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
inline void ptx_ldmatrix_sync_aligned_m8n8_x4_shared_b16(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                                         uint32_t smem) {
  uint32_t r[4];
  ldmatrix_x4(false, r, smem);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
// 2^a with subnormal inputs and results flushed to (signed) zero; the hardware's approximation error (~2 ulp) is not
// modelled
inline void ptx_ex2_approx_ftz_f32(float& d, float a) {
  if (std::fpclassify(a) == FP_SUBNORMAL) a = 0.f;
  const float y = std::exp2(a);
  d = std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}
inline void mma16816(bool bf16, float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2,
                     uint32_t a3, uint32_t b0, uint32_t b1, float c0, float c1, float c2, float c3) {
  float d[4];
  const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
  const float c[4] = {c0, c1, c2, c3};
  mma_m16n8k16_f32(bf16, d, a, b, c);
  d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
}
inline void ptx_mma_sync_aligned_m16n8k16_row_col_f32_f16_f16_f32(float& d0, float& d1, float& d2, float& d3,
                                                                   uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                                   uint32_t b0, uint32_t b1, float c0, float c1,
                                                                   float c2, float c3) {
  mma16816(false, d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);
}
inline void ptx_mma_sync_aligned_m16n8k16_row_col_f32_bf16_bf16_f32(float& d0, float& d1, float& d2, float& d3,
                                                                     uint32_t a0, uint32_t a1, uint32_t a2,
                                                                     uint32_t a3, uint32_t b0, uint32_t b1, float c0,
                                                                     float c1, float c2, float c3) {
  mma16816(true, d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);
}
inline void ptx_mma_sync_aligned_m16n8k8_row_col_f32_tf32_tf32_f32(float& d0, float& d1, float& d2, float& d3,
                                                                   uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                                   uint32_t b0, uint32_t b1, float c0, float c1,
                                                                   float c2, float c3) {
  float d[4];
  const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
  const float c[4] = {c0, c1, c2, c3};
  mma_m16n8k8_tf32(d, a, b, c);
  d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
}
template <typename R>
inline void ptx_mma_sync_aligned_m16n8k256_row_col_s32_b1_b1_s32_and_popc(R& d0, R& d1, R& d2, R& d3, uint32_t a0,
                                                                          uint32_t a1, uint32_t a2, uint32_t a3,
                                                                          uint32_t b0, uint32_t b1, int32_t c0,
                                                                          int32_t c1, int32_t c2, int32_t c3) {
  int32_t d[4];
  const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
  const int32_t c[4] = {c0, c1, c2, c3};
  mma_m16n8k256_and_popc(d, a, b, c);
  d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
}
}  // namespace emu
