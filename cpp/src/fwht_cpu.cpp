// kvengine — FWHT on the CPU: AVX2 butterflies (3 in-register stages via shuffles, the rest across vectors),
// fp32 arithmetic, rows in parallel.
#include <algorithm>
#include <vector>

#include "kvengine/fwht.h"
#include "kvengine/parallel.h"
#include "rowio.h"
#include "simd.h"

namespace kvengine {

void fwht_row_f32(float* v, int64_t n) {
  int64_t h = 1;
#ifdef KVENGINE_AVX2
  if (n >= 8) {
    // stages h = 1, 2, 4 inside each 8-float vector: out = x * sign + swap(x)
    const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
    const __m256 s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
    const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
    for (int64_t i = 0; i < n; i += 8) {
      __m256 x = _mm256_loadu_ps(v + i);
      x = _mm256_fmadd_ps(x, s1, _mm256_permute_ps(x, 0xB1));
      x = _mm256_fmadd_ps(x, s2, _mm256_permute_ps(x, 0x4E));
      x = _mm256_fmadd_ps(x, s4, _mm256_permute2f128_ps(x, x, 1));
      _mm256_storeu_ps(v + i, x);
    }
    h = 8;
    // remaining stages, two at a time (radix-4) to halve the passes over the row
    for (; 2 * h < n; h *= 4) {
      for (int64_t b = 0; b < n; b += 4 * h) {
        for (int64_t j = b; j < b + h; j += 8) {
          __m256 a0 = _mm256_loadu_ps(v + j), a1 = _mm256_loadu_ps(v + j + h);
          __m256 a2 = _mm256_loadu_ps(v + j + 2 * h), a3 = _mm256_loadu_ps(v + j + 3 * h);
          __m256 b0 = _mm256_add_ps(a0, a1), b1 = _mm256_sub_ps(a0, a1);
          __m256 b2 = _mm256_add_ps(a2, a3), b3 = _mm256_sub_ps(a2, a3);
          _mm256_storeu_ps(v + j, _mm256_add_ps(b0, b2));
          _mm256_storeu_ps(v + j + h, _mm256_add_ps(b1, b3));
          _mm256_storeu_ps(v + j + 2 * h, _mm256_sub_ps(b0, b2));
          _mm256_storeu_ps(v + j + 3 * h, _mm256_sub_ps(b1, b3));
        }
      }
    }
    for (; h < n; h *= 2) {
      for (int64_t b = 0; b < n; b += 2 * h) {
        for (int64_t j = b; j < b + h; j += 8) {
          __m256 a0 = _mm256_loadu_ps(v + j), a1 = _mm256_loadu_ps(v + j + h);
          _mm256_storeu_ps(v + j, _mm256_add_ps(a0, a1));
          _mm256_storeu_ps(v + j + h, _mm256_sub_ps(a0, a1));
        }
      }
    }
    return;
  }
#endif
  for (; h < n; h *= 2)
    for (int64_t b = 0; b < n; b += 2 * h)
      for (int64_t j = b; j < b + h; ++j) {
        const float a0 = v[j], a1 = v[j + h];
        v[j] = a0 + a1;
        v[j + h] = a0 - a1;
      }
}

#ifdef KVENGINE_AVX2
namespace {

inline __m256 butterfly8(__m256 x) {  // H_8 inside one vector
  const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  x = _mm256_fmadd_ps(x, s1, _mm256_permute_ps(x, 0xB1));
  x = _mm256_fmadd_ps(x, s2, _mm256_permute_ps(x, 0x4E));
  return _mm256_fmadd_ps(x, s4, _mm256_permute2f128_ps(x, x, 1));
}

inline __m256 load8(const void* p, DType t) {
  switch (t) {
    case DType::F32: return _mm256_loadu_ps(static_cast<const float*>(p));
    case DType::F16: return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    default:
      return _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))), 16));
  }
}

inline void store8(void* p, DType t, __m256 v) {
  switch (t) {
    case DType::F32: _mm256_storeu_ps(static_cast<float*>(p), v); break;
    case DType::F16:
      _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
      break;
    default: _mm_storeu_si128(static_cast<__m128i*>(p), detail::cvt_ps_bf16(v)); break;
  }
}

// One row of n = 8·NV elements held entirely in registers: load, transform, scale, store.
template <int NV, DType T>
inline void fwht_row_regs(const char* x, char* y, float scale) {
  constexpr int esz = T == DType::F32 ? 4 : 2;
  __m256 r[NV];
#pragma GCC unroll 32
  for (int v = 0; v < NV; ++v) r[v] = butterfly8(load8(x + v * 8 * esz, T));
#pragma GCC unroll 8
  for (int h = 1; h < NV; h *= 2) {
#pragma GCC unroll 32
    for (int j = 0; j < NV; ++j) {
      if (j & h) continue;
      const __m256 a = r[j], b = r[j + h];
      r[j] = _mm256_add_ps(a, b);
      r[j + h] = _mm256_sub_ps(a, b);
    }
  }
  const __m256 s = _mm256_set1_ps(scale);
#pragma GCC unroll 32
  for (int v = 0; v < NV; ++v) store8(y + v * 8 * esz, T, _mm256_mul_ps(r[v], s));
}

template <int NV, DType T>
void fwht_rows_regs(const char* xb, char* yb, int64_t r0, int64_t r1, int64_t xs, int64_t ys, float scale) {
  constexpr int esz = T == DType::F32 ? 4 : 2;
  for (int64_t r = r0; r < r1; ++r) fwht_row_regs<NV, T>(xb + r * xs * esz, yb + r * ys * esz, scale);
}

template <DType T>
bool fwht_rows_small(int64_t n, const char* xb, char* yb, int64_t r0, int64_t r1, int64_t xs, int64_t ys,
                     float scale) {
  switch (n) {
    case 8: fwht_rows_regs<1, T>(xb, yb, r0, r1, xs, ys, scale); return true;
    case 16: fwht_rows_regs<2, T>(xb, yb, r0, r1, xs, ys, scale); return true;
    case 32: fwht_rows_regs<4, T>(xb, yb, r0, r1, xs, ys, scale); return true;
    case 64: fwht_rows_regs<8, T>(xb, yb, r0, r1, xs, ys, scale); return true;
    case 128: fwht_rows_regs<16, T>(xb, yb, r0, r1, xs, ys, scale); return true;
    case 256: fwht_rows_regs<32, T>(xb, yb, r0, r1, xs, ys, scale); return true;
    default: return false;
  }
}

}  // namespace
#endif

void fwht_cpu(const void* x, void* y, DType dtype, int64_t rows, int64_t n, int64_t x_row_stride,
              int64_t y_row_stride, float scale, const int32_t* perm) {
  const int esz = dtype_size(dtype);
  const char* xb = static_cast<const char*>(x);
  char* yb = static_cast<char*>(y);
  // grain: ~16K elements of work per task
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  parallel_for(rows, grain, [&](int64_t r0, int64_t r1) {
#ifdef KVENGINE_AVX2
    if (!perm && n >= 8 && n <= 256) {
      const bool done =
          dtype == DType::F32   ? fwht_rows_small<DType::F32>(n, xb, yb, r0, r1, x_row_stride, y_row_stride, scale)
          : dtype == DType::F16 ? fwht_rows_small<DType::F16>(n, xb, yb, r0, r1, x_row_stride, y_row_stride, scale)
                                : fwht_rows_small<DType::BF16>(n, xb, yb, r0, r1, x_row_stride, y_row_stride, scale);
      if (done) return;
    }
#endif
    simd::lvector<float> buf(static_cast<size_t>(n));
    for (int64_t r = r0; r < r1; ++r) {
      detail::load_row(xb + r * x_row_stride * esz, dtype, n, perm, buf.data());
      fwht_row_f32(buf.data(), n);
      detail::store_row(buf.data(), scale, dtype, n, yb + r * y_row_stride * esz);
    }
  });
}

}  // namespace kvengine
