// kvengine — internal: 16-lane fp32/int32 vectors (GCC vector extensions: AVX-512 where compiled for it, two AVX2
// halves otherwise) and the small reductions and transcendental the CPU attention kernels share.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

namespace kvengine::simd {

// Storage aligned to a cache line, so that a 64-byte vector load never straddles two lines. glibc's malloc aligns to
// 16 bytes only, and a large block is mmapped at page + 16: every AVX-512 load of such a buffer splits two lines
// (docs/performance.md, binary_attention on Ice Lake). Elements are default-initialized (resize leaves floats
// unset; assign / value-initialization still zero them).
template <class T>
struct LineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  LineAllocator() = default;
  template <class U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  template <class U, class... A>
  void construct(U* p, A&&... a) {
    if constexpr (sizeof...(A) == 0)
      ::new (static_cast<void*>(p)) U;
    else
      ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
  template <class U>
  bool operator==(const LineAllocator<U>&) const { return true; }
};
template <class T>
using lvector = std::vector<T, LineAllocator<T>>;

constexpr int W = 16;  // lanes
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint8_t vb __attribute__((vector_size(16)));

inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vu ldu(const uint32_t* p) { vu v; std::memcpy(&v, p, sizeof v); return v; }
inline void stv(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// x in every lane. Not `vf{} + x`: without -ffast-math that is a real add (0 + −0 = +0), an extra instruction and,
// on Intel, a register broadcast on an FMA port in every P·V step; this compiles to one vbroadcastss (from memory
// where x comes from memory).
inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// Hint the cache lines of [p, p + n) into L1 (a software prefetch never faults). For gathers of rows at
// data-dependent addresses: there the out-of-order window sees only the next row or two, so the misses of one row
// follow the previous row's instead of overlapping. On x86 an asm volatile, not __builtin_prefetch: GCC 12 deletes a
// loop of __builtin_prefetch as side-effect free once it is inlined (-ffinite-loops, on by default in C++).
inline void prefetch(const void* p, int64_t n) {
  const uintptr_t e = reinterpret_cast<uintptr_t>(p) + uintptr_t(n);
  for (uintptr_t l = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); l < e; l += 64) {
#if defined(__x86_64__)
    asm volatile("prefetcht0 (%0)" : : "r"(l));
#else
    __builtin_prefetch(reinterpret_cast<const void*>(l), 0, 3);
#endif
  }
}

// a·b + c, fused even where the translation unit is built with -ffp-contract=off
inline vf fmadd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  typedef float v8 __attribute__((vector_size(32)));
  const v8 lo = (v8)_mm256_fmadd_ps((__m256)__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7),
                                    (__m256)__builtin_shufflevector(b, b, 0, 1, 2, 3, 4, 5, 6, 7),
                                    (__m256)__builtin_shufflevector(c, c, 0, 1, 2, 3, 4, 5, 6, 7));
  const v8 hi = (v8)_mm256_fmadd_ps((__m256)__builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15),
                                    (__m256)__builtin_shufflevector(b, b, 8, 9, 10, 11, 12, 13, 14, 15),
                                    (__m256)__builtin_shufflevector(c, c, 8, 9, 10, 11, 12, 13, 14, 15));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  return a * b + c;
#endif
}

inline float hsum(vf v) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline float hmax(vf v) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  const v8 x = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const v8 y = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v8 a = x > y ? x : y;
  const v4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3), d = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const v4 e = c > d ? c : d;
  return std::max(std::max(e[0], e[1]), std::max(e[2], e[3]));
}

// the four sums of a0..a3 (transpose-and-add: 13 shuffles/adds instead of four separate reductions)
inline void hsum4(vf a0, vf a1, vf a2, vf a3, float* out) {
  const vf x = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vf y = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vf z = __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const vf w = z + __builtin_shufflevector(z, z, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  const vf u = w + __builtin_shufflevector(w, w, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  out[0] = u[0];
  out[1] = u[4];
  out[2] = u[8];
  out[3] = u[12];
}

// Native-width vectors: one register each (16 lanes with AVX-512, 8 with AVX2). Hot loops that keep many
// accumulators in registers use these: without AVX-512, GCC keeps an array of the 64-byte `vf` on the stack and
// moves it through general registers 8 bytes at a time (measured: the decode attention's P·V ran ~5× slower on an
// AVX2-only host than with 8-lane accumulators).
#if defined(__AVX512F__)
constexpr int WN = 16;
#else
constexpr int WN = 8;
#endif
typedef float vn __attribute__((vector_size(WN * 4)));
inline vn ldn(const float* p) { vn v; std::memcpy(&v, p, sizeof v); return v; }
inline void stn(float* p, vn v) { std::memcpy(p, &v, sizeof v); }
inline vn splatn(float x) {
#if defined(__AVX512F__)
  return splat(x);
#else
  return vn{x, x, x, x, x, x, x, x};
#endif
}

// the four sums of a0..a3 in native width
inline void hsum4n(vn a0, vn a1, vn a2, vn a3, float* out) {
#if defined(__AVX512F__)
  hsum4(a0, a1, a2, a3, out);
#else
  const vn x = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 8, 9, 10, 11) +
               __builtin_shufflevector(a0, a1, 4, 5, 6, 7, 12, 13, 14, 15);  // a0 | a1, 4 partials each
  const vn y = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 8, 9, 10, 11) +
               __builtin_shufflevector(a2, a3, 4, 5, 6, 7, 12, 13, 14, 15);
  const vn z = __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);  // a0 a0 a2 a2 a1 a1 a3 a3
  const vn u = z + __builtin_shufflevector(z, z, 1, 0, 3, 2, 5, 4, 7, 6);
  out[0] = u[0];
  out[1] = u[4];
  out[2] = u[2];
  out[3] = u[6];
#endif
}

// more native-width helpers: integer vectors, reductions (the AVX-512 build forwards to the 16-lane ones below)
typedef int32_t vni __attribute__((vector_size(WN * 4)));
typedef uint32_t vnu __attribute__((vector_size(WN * 4)));
inline vnu ldnu(const uint32_t* p) { vnu v; std::memcpy(&v, p, sizeof v); return v; }
inline vnu splatnu(uint32_t x) {
#if defined(__AVX512F__)
  return vnu{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#else
  return vnu{x, x, x, x, x, x, x, x};
#endif
}
inline vni iotan() {
#if defined(__AVX512F__)
  return vni{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#else
  return vni{0, 1, 2, 3, 4, 5, 6, 7};
#endif
}

// 2^x: 2^n · e^(f·ln2), f in [-0.5, 0.5], degree-6 polynomial (rel. err < 2e-7); x < -126 (and -inf) -> 0.
// One body for 16-lane vf and (AVX2) 8-lane vn.
template <class V, class VI, V (*Splat)(float), V (*Fma)(V, V, V)>
inline V vexp2_impl(V x) {
  const V lo = Splat(-126.0f);
  const VI below = x < lo;
  x = below ? lo : x;
  const V n = __builtin_convertvector(__builtin_convertvector(x + (x < 0 ? Splat(-0.5f) : Splat(0.5f)), VI), V);
  const V f = (x - n) * Splat(0.693147180559945309f);
  V p = Splat(1.0f / 720);
  p = Fma(p, f, Splat(1.0f / 120));
  p = Fma(p, f, Splat(1.0f / 24));
  p = Fma(p, f, Splat(1.0f / 6));
  p = Fma(p, f, Splat(0.5f));
  p = Fma(p, f, Splat(1.0f));
  p = Fma(p, f, Splat(1.0f));
  const VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  const V r = p * (V)e;
  return below ? Splat(0.0f) : r;
}
inline vf vexp2(vf x) { return vexp2_impl<vf, vi, splat, fmadd>(x); }

inline vf vexp(vf x) { return vexp2(x * splat(1.44269504088896341f)); }

#if defined(__AVX512F__)
inline vn fmaddn(vn a, vn b, vn c) { return fmadd(a, b, c); }
inline float hsumn(vn v) { return hsum(v); }
inline float hmaxn(vn v) { return hmax(v); }
inline vn vexp2n(vn x) { return vexp2(x); }
#else
inline vn fmaddn(vn a, vn b, vn c) {
#if defined(__FMA__)
  return (vn)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
inline float hsumn(vn v) {
  typedef float v4 __attribute__((vector_size(16)));
  const v4 b = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
inline float hmaxn(vn v) {
  typedef float v4 __attribute__((vector_size(16)));
  const v4 c = __builtin_shufflevector(v, v, 0, 1, 2, 3), d = __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const v4 e = c > d ? c : d;
  return std::max(std::max(e[0], e[1]), std::max(e[2], e[3]));
}
inline vn vexp2n(vn x) { return vexp2_impl<vn, vni, splatn, fmaddn>(x); }
#endif
inline vn vexpn(vn x) { return vexp2n(x * splatn(1.44269504088896341f)); }

}  // namespace kvengine::simd
