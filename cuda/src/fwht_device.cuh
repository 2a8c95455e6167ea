// kvengine — internal CUDA device building blocks shared by fwht.cu and quant.cu:
//   * storage-dtype traits (fp32 / fp16 / bf16 <-> fp32, round-to-nearest-even),
//   * 8-element row loads/stores (16-byte vector, scalar, or permuted gather),
//   * the FWHT butterflies: 3 stages in registers, 5 across a warp with __shfl_xor_sync, and the remaining stages
//     (bit 8 and up) in phases over an fp32 row held in shared memory.
//
// Numerics match fwht_row_f32 on the CPU bit for bit: every butterfly is one fp32 add (a0 + a1) and one fp32
// subtract (a0 - a1), and the stages run in the same order (bit 0 first, then bit 1, ...).  The caller applies the
// scale once at the end and rounds once to the storage dtype.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kvengine::cuda::detail {

// ---- storage dtype traits -------------------------------------------------------------------------------------
template <typename T>
struct Storage;

template <>
struct Storage<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <>
struct Storage<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Storage<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// v rounded to the storage dtype T and back (identity for fp32)
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return Storage<T>::to_float(Storage<T>::from_float(v));
}

// ---- 8-element loads / stores ------------------------------------------------------------------------------------
// How a lane reads its 8 elements of a row.
enum LoadMode : int {
  kLoadScalar = 0,  // 8 scalar loads (pointer or stride not 16-byte aligned)
  kLoadVector = 1,  // 16-byte vector loads (row start + offset is 16-byte aligned)
  kLoadGather = 2,  // x[row, perm[off + j] mod n]
};

// two 16-bit values packed in a 32-bit word -> two floats
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t w, float& a, float& b);
template <>
__device__ __forceinline__ void unpack2<__half>(uint32_t w, float& a, float& b) {
  a = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  b = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
template <>
__device__ __forceinline__ void unpack2<__nv_bfloat16>(uint32_t w, float& a, float& b) {
  a = __uint_as_float(w << 16);
  b = __uint_as_float(w & 0xffff0000u);
}

// two floats -> two 16-bit values (rounded to nearest even) packed in a 32-bit word, a in the low half
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const uint32_t lo = __half_as_ushort(__float2half_rn(a)), hi = __half_as_ushort(__float2half_rn(b));
  return lo | (hi << 16);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(a));
  const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(b));
  return lo | (hi << 16);
}

// 8 contiguous elements as raw bits (one 16-byte vector for 16-bit types, two for fp32): lets a thread issue several
// wide loads before converting any of them, with few registers live.
template <typename T>
struct Raw8 {
  uint4 a;
};
template <>
struct Raw8<float> {
  float4 a, b;
};

// p must be 16-byte aligned
template <typename T>
__device__ __forceinline__ Raw8<T> load_raw8(const T* p) {
  Raw8<T> r;
  if constexpr (sizeof(T) == 4) {
    r.a = reinterpret_cast<const float4*>(p)[0];
    r.b = reinterpret_cast<const float4*>(p)[1];
  } else {
    r.a = *reinterpret_cast<const uint4*>(p);
  }
  return r;
}

template <typename T>
__device__ __forceinline__ void unpack_raw8(const Raw8<T>& r, float (&v)[8]) {
  if constexpr (sizeof(T) == 4) {
    v[0] = r.a.x; v[1] = r.a.y; v[2] = r.a.z; v[3] = r.a.w;
    v[4] = r.b.x; v[5] = r.b.y; v[6] = r.b.z; v[7] = r.b.w;
  } else {
    unpack2<T>(r.a.x, v[0], v[1]);
    unpack2<T>(r.a.y, v[2], v[3]);
    unpack2<T>(r.a.z, v[4], v[5]);
    unpack2<T>(r.a.w, v[6], v[7]);
  }
}

// v[0..8) = p[0..8); p must be 16-byte aligned
template <typename T>
__device__ __forceinline__ void load8_vec(const T* p, float (&v)[8]) {
  unpack_raw8(load_raw8(p), v);
}

// p[0..8) = v[0..8) rounded to T; p must be 16-byte aligned
template <typename T>
__device__ __forceinline__ void store8_vec(T* p, const float (&v)[8]) {
  if constexpr (sizeof(T) == 4) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint4 u;
    u.x = pack2<T>(v[0], v[1]);
    u.y = pack2<T>(v[2], v[3]);
    u.z = pack2<T>(v[4], v[5]);
    u.w = pack2<T>(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = u;
  }
}

// v[j] = row[off + j] (or row[perm[off + j] mod n] in gather mode), j < 8
template <typename T>
__device__ __forceinline__ void load8(const T* row, int off, const int32_t* perm, int n, int mode, float (&v)[8]) {
  if (mode == kLoadGather) {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = Storage<T>::to_float(row[__ldg(perm + off + j) & (n - 1)]);
  } else if (mode == kLoadVector) {
    load8_vec(row + off, v);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = Storage<T>::to_float(row[off + j]);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8], bool vec) {
  if (vec) {
    store8_vec(p, v);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) p[j] = Storage<T>::from_float(v[j]);
  }
}

// fp32 shared-memory chunk of 8 floats per lane (lane-major, lane * 8 + j), written / read as two float4 in an order
// that is bank-conflict free: lanes 4..7 of every 8 start with their upper half.
__device__ __forceinline__ void smem_store8(float* s, const float (&v)[8], int lane) {
  const bool sw = (lane >> 2) & 1;
  const float4 a = sw ? make_float4(v[4], v[5], v[6], v[7]) : make_float4(v[0], v[1], v[2], v[3]);
  const float4 b = sw ? make_float4(v[0], v[1], v[2], v[3]) : make_float4(v[4], v[5], v[6], v[7]);
  *reinterpret_cast<float4*>(s + (sw ? 4 : 0)) = a;
  *reinterpret_cast<float4*>(s + (sw ? 0 : 4)) = b;
}
__device__ __forceinline__ void smem_load8(const float* s, float (&v)[8], int lane) {
  const bool sw = (lane >> 2) & 1;
  const float4 a = *reinterpret_cast<const float4*>(s + (sw ? 4 : 0));
  const float4 b = *reinterpret_cast<const float4*>(s + (sw ? 0 : 4));
  v[0] = sw ? b.x : a.x; v[1] = sw ? b.y : a.y; v[2] = sw ? b.z : a.z; v[3] = sw ? b.w : a.w;
  v[4] = sw ? a.x : b.x; v[5] = sw ? a.y : b.y; v[6] = sw ? a.z : b.z; v[7] = sw ? a.w : b.w;
}

// ---- butterflies ---------------------------------------------------------------------------------------------------
// Radix-2 stages over an in-register array of N = 2^k elements (bits 0 .. k-1 of the register index), low bit first.
template <int N>
__device__ __forceinline__ void butterfly_regs(float (&v)[N]) {
#pragma unroll
  for (int h = 1; h < N; h <<= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if ((i & h) == 0) {
        const float a0 = v[i], a1 = v[i + h];
        v[i] = a0 + a1;
        v[i + h] = a0 - a1;
      }
    }
  }
}

// Stages for element bits 3 .. log2n_warp-1 (log2n_warp <= 8) where lane l holds elements 8l .. 8l+7 of a 256-element
// span: bit b of the element index is bit b-3 of the lane.  All 32 lanes must call this together.
__device__ __forceinline__ void butterfly_warp(float (&v)[8], int lane, int log2n_warp) {
  for (int b = 3; b < log2n_warp; ++b) {
    const int m = 1 << (b - 3);
    const bool upper = (lane & m) != 0;  // this lane holds a1 of each pair
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float o = __shfl_xor_sync(0xffffffffu, v[j], m);
      v[j] = upper ? (o - v[j]) : (v[j] + o);
    }
  }
}

// One shared-memory phase: stages for bits b .. b+K-1 of an fp32 row s[0, n).  Each thread gathers the 2^K elements
// {hi · 2^(b+K) + m · 2^b + lo : m < 2^K}; consecutive threads take consecutive `lo` (b >= 8), so accesses are
// bank-conflict free.
template <int K>
__device__ __forceinline__ void smem_phase(float* s, int n, int b, int tid, int nthreads) {
  constexpr int M = 1 << K;
  const int count = n >> K, lomask = (1 << b) - 1;
  for (int p = tid; p < count; p += nthreads) {
    float* base = s + (((p >> b) << (b + K)) | (p & lomask));
    float v[M];
#pragma unroll
    for (int m = 0; m < M; ++m) v[m] = base[m << b];
    butterfly_regs<M>(v);
#pragma unroll
    for (int m = 0; m < M; ++m) base[m << b] = v[m];
  }
}

// Stages for bits 8 .. log2n-1 of the fp32 row s (bits 0..7 already done), in balanced phases of at most
// kMaxPhaseBits bits (4: 16 values per thread keeps the block kernels within 64 registers at 1024 threads).
// Call with all threads of the block after a __syncthreads that published s; returns after a __syncthreads.
constexpr int kMaxPhaseBits = 4;

__device__ __forceinline__ void butterfly_smem(float* s, int n, int log2n, int tid, int nthreads) {
  const int nb = log2n - 8;
  if (nb <= 0) return;
  const int phases = (nb + kMaxPhaseBits - 1) / kMaxPhaseBits;
  int b = 8;
  for (int ph = 0; ph < phases; ++ph) {
    const int k = nb / phases + (ph < nb % phases ? 1 : 0);
    switch (k) {
      case 1: smem_phase<1>(s, n, b, tid, nthreads); break;
      case 2: smem_phase<2>(s, n, b, tid, nthreads); break;
      case 3: smem_phase<3>(s, n, b, tid, nthreads); break;
      default: smem_phase<4>(s, n, b, tid, nthreads); break;
    }
    b += k;
    __syncthreads();
  }
}

// ---- whole-row transforms ------------------------------------------------------------------------------------------
// n in [8, 256], one warp: lane holds elements off .. off+7 (off = (8·lane) mod n) of row `row` (the row of lane
// 8·lane / n of the warp's 256-element span); the warp covers 256/n rows.  `active` false: the lane loads nothing
// but still takes part in the shuffles.  On return v is the unscaled transform.
template <typename T>
__device__ __forceinline__ void warp_fwht(const T* row, int off, const int32_t* perm, int n, int log2n, int mode,
                                          bool active, int lane, float (&v)[8]) {
  if (active) {
    load8(row, off, perm, n, mode, v);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = 0.0f;
  }
  butterfly_regs<8>(v);
  butterfly_warp(v, lane, log2n);
}

// 256-element chunks one warp loads at once in block_fwht_to_smem (vector mode): 32 bytes in flight per thread,
// the most that stays within 64 registers (1024-thread blocks) without spilling.
template <typename T>
__host__ __device__ constexpr int chunks_in_flight() {
  return sizeof(T) == 4 ? 1 : 2;
}

// Stages for bits 0..7 of one 256-element chunk held 8 per lane, then the chunk to the fp32 shared row.
__device__ __forceinline__ void chunk_to_smem(float (&v)[8], float* s_chunk, int lane) {
  butterfly_regs<8>(v);
  butterfly_warp(v, lane, 8);
  smem_store8(s_chunk + lane * 8, v, lane);
}

// n in (256, 32768], whole block: transforms the row (x[perm] if gather) into the fp32 shared buffer s[0, n)
// (unscaled).  Must be called by all threads; returns after a __syncthreads, s ready to read.  The caller must
// __syncthreads again before s is reused.
template <typename T>
__device__ __forceinline__ void block_fwht_to_smem(const T* row, const int32_t* perm, int n, int log2n, int mode,
                                                   float* s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int nchunks = n >> 8;
  if (mode == kLoadVector) {
    constexpr int kChunksInFlight = chunks_in_flight<T>();
    for (int c0 = warp; c0 < nchunks; c0 += nwarps * kChunksInFlight) {
      Raw8<T> raw[kChunksInFlight];
#pragma unroll
      for (int u = 0; u < kChunksInFlight; ++u) {  // issue all loads first
        const int c = c0 + u * nwarps;
        if (c < nchunks) raw[u] = load_raw8(row + c * 256 + lane * 8);
      }
#pragma unroll
      for (int u = 0; u < kChunksInFlight; ++u) {
        const int c = c0 + u * nwarps;
        if (c < nchunks) {  // warp-uniform
          float v[8];
          unpack_raw8(raw[u], v);
          chunk_to_smem(v, s + c * 256, lane);
        }
      }
    }
  } else {
    for (int c = warp; c < nchunks; c += nwarps) {
      float v[8];
      load8(row, c * 256 + lane * 8, perm, n, mode, v);
      chunk_to_smem(v, s + c * 256, lane);
    }
  }
  __syncthreads();
  butterfly_smem(s, n, log2n, threadIdx.x, blockDim.x);
}

// n in {2, 4}: one thread transforms a whole row in registers (v[i] = x[perm[i] mod n] or x[i]).
template <int N, typename T>
__device__ __forceinline__ void small_fwht(const T* row, const int32_t* perm, float (&v)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = Storage<T>::to_float(row[perm ? (__ldg(perm + i) & (N - 1)) : i]);
  butterfly_regs<N>(v);
}

// ---- misc ------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ int64_t global_thread_id() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t global_thread_count() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

}  // namespace kvengine::cuda::detail
