// kvengine CUDA emulator: nvcuda::wmma with an opaque layout — every lane holds the whole tile.  The API promises
// nothing about which lane holds which element, so kernels may only apply the same operation to every element of
// x[] (as the project's do); the emulator checks that all lanes hold identical fragments where they meet
// (mma_sync, store_matrix_sync).  Each call is a warp-collective operation (all 32 lanes must take part).
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <typename Use, int M, int N, int K>
struct dims;
template <int M, int N, int K>
struct dims<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K>
struct dims<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K>
struct dims<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };
inline uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
// the tensor cores read the top 19 bits of a tf32 operand
inline float tf32_operand(float f) { return from_bits(bits(f) & 0xffffe000u); }
// every lane of the warp takes part; the fragments met here must be identical in all lanes (compared while every
// lane is still inside the operation: a second exchange keeps a fast lane from changing its fragment meanwhile)
template <typename Frag>
inline void collective(uint32_t kind, const Frag* f) {
  auto slot = ::emu::warp_exchange(0xffffffffu, kind, &f, sizeof f);
  if (f && ::emu::lane() != 0) {  // every lane against lane 0
    const Frag* o;
    std::memcpy(&o, slot[0], sizeof o);
    if (std::memcmp(o->x, f->x, sizeof f->x) != 0)
      ::emu::fail("wmma fragments differ between lanes 0 and %d (lane-dependent element access?)", ::emu::lane());
  }
  const char done = 0;
  ::emu::warp_exchange(0xffffffffu, kind | 0x80000000u, &done, 1);
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = detail::dims<Use, M, N, K>::rows, cols = detail::dims<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  float x[rows * cols];
};

inline float __float_to_tf32(float f) {  // cvt.rna.tf32.f32: nearest, ties away from zero, 10 mantissa bits
  uint32_t u = detail::bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return f;
  u = (u + 0x1000u) & 0xffffe000u;
  return detail::from_bits(u);
}

template <typename Use, int M, int N, int K, typename T, typename L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  for (float& e : f.x) e = v;
  detail::collective(0x77310001u, &f);
}

template <typename Use, int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const float* p, unsigned ldm) {
  static_assert(std::is_same_v<L, row_major>, "emulated for row-major operands only");
  if (reinterpret_cast<uintptr_t>(p) & 31) ::emu::fail("wmma::load_matrix_sync: pointer %p not 256-bit aligned", p);
  if (ldm % 4) ::emu::fail("wmma::load_matrix_sync: ldm %u not a multiple of 16 bytes", ldm);
  using F = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = p[static_cast<size_t>(r) * ldm + c];
  detail::collective(0x77310002u, &f);
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  if (layout != mem_row_major) ::emu::fail("wmma::store_matrix_sync: emulated for mem_row_major only");
  if (reinterpret_cast<uintptr_t>(p) & 31) ::emu::fail("wmma::store_matrix_sync: pointer %p not 256-bit aligned", p);
  if (ldm % 4) ::emu::fail("wmma::store_matrix_sync: ldm %u not a multiple of 16 bytes", ldm);
  detail::collective(0x77310003u, &f);
  if (::emu::lane() == 0)
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < N; ++c) p[static_cast<size_t>(r) * ldm + c] = f.x[r * N + c];
  detail::collective<fragment<accumulator, M, N, K, float>>(0x77310004u, nullptr);  // the store is done for all lanes
}

template <int M, int N, int K, typename TA, typename TB, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  detail::collective(0x77310005u, &a);
  detail::collective(0x77310006u, &b);
  detail::collective(0x77310008u, &c);
  // the operands are the same in every lane: the first lane of the warp to get here computes, the others copy
  struct Cached {
    const void* cta = nullptr;
    int warp = -1;
    uint32_t gen = 0;
    float out[M * N];
  };
  static Cached cache;
  const int w = ::emu::warp(), l = ::emu::lane();
  const uint32_t gen = ::emu::g_cta->warps[w].gen[l];
  if (cache.cta != ::emu::g_cta || cache.warp != w || cache.gen != gen) {
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        float acc = c.x[m * N + n];
        for (int k = 0; k < K; ++k)  // tf32 x tf32 products are exact in fp32
          acc += detail::tf32_operand(a.x[m * K + k]) * detail::tf32_operand(b.x[k * N + n]);
        cache.out[m * N + n] = acc;
      }
    cache.cta = ::emu::g_cta;
    cache.warp = w;
    cache.gen = gen;
  }
  std::memcpy(d.x, cache.out, sizeof cache.out);
  detail::collective(0x77310007u, &d);
}
}  // namespace nvcuda::wmma
