// kvengine — internal: load a row of any storage dtype into fp32 and store it back (vectorized where possible).
#pragma once
#include "kvengine/common.h"

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define KVENGINE_AVX2 1
#endif

namespace kvengine::detail {

// dst[i] = x[perm ? perm[i] : i] as fp32, i < n
inline void load_row(const void* x, DType t, int64_t n, const int32_t* perm, float* dst) {
  if (perm) {
    for (int64_t i = 0; i < n; ++i) dst[i] = load_as_float(x, perm[i], t);
    return;
  }
  int64_t i = 0;
  switch (t) {
    case DType::F32:
      std::memcpy(dst, x, n * sizeof(float));
      return;
    case DType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(x);
#ifdef KVENGINE_AVX2
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
      // short rows (per-token group metadata: D / G values) would otherwise take the out-of-line scalar path
      for (; i + 4 <= n; i += 4)
        _mm_storeu_ps(dst + i, _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i))));
#endif
      for (; i < n; ++i) dst[i] = half_to_float(p[i]);
      return;
    }
    case DType::BF16: {
      const uint16_t* p = static_cast<const uint16_t*>(x);
#ifdef KVENGINE_AVX2
      for (; i + 8 <= n; i += 8) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
      }
      for (; i + 4 <= n; i += 4) {
        __m128i w = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i)));
        _mm_storeu_ps(dst + i, _mm_castsi128_ps(_mm_slli_epi32(w, 16)));
      }
#endif
      for (; i < n; ++i) dst[i] = bf16_to_float(p[i]);
      return;
    }
  }
}

#ifdef KVENGINE_AVX2
// round-to-nearest-even fp32 -> bf16 for 8 lanes (NaN handled like float_to_bf16)
inline __m128i cvt_ps_bf16(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  __m256i isnan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                     _mm256_set1_epi32(0x7f800000));
  __m256i qnan = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
  r = _mm256_blendv_epi8(r, qnan, isnan);
  r = _mm256_srli_epi32(r, 16);
  __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
  return _mm_packus_epi32(lo, hi);
}
#endif

// y[i] = src[i] * scale rounded to t, i < n
inline void store_row(const float* src, float scale, DType t, int64_t n, void* y) {
  int64_t i = 0;
  switch (t) {
    case DType::F32: {
      float* p = static_cast<float*>(y);
#ifdef KVENGINE_AVX2
      const __m256 s = _mm256_set1_ps(scale);
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, _mm256_mul_ps(_mm256_loadu_ps(src + i), s));
#endif
      for (; i < n; ++i) p[i] = src[i] * scale;
      return;
    }
    case DType::F16: {
      uint16_t* p = static_cast<uint16_t*>(y);
#ifdef KVENGINE_AVX2
      const __m256 s = _mm256_set1_ps(scale);
      for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i),
                         _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(src + i), s), _MM_FROUND_TO_NEAREST_INT));
#endif
      for (; i < n; ++i) p[i] = float_to_half(src[i] * scale);
      return;
    }
    case DType::BF16: {
      uint16_t* p = static_cast<uint16_t*>(y);
#ifdef KVENGINE_AVX2
      const __m256 s = _mm256_set1_ps(scale);
      for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i), cvt_ps_bf16(_mm256_mul_ps(_mm256_loadu_ps(src + i), s)));
#endif
      for (; i < n; ++i) p[i] = float_to_bf16(src[i] * scale);
      return;
    }
  }
}

// v[i] = round_to(v[i] · scale, t) in place (fp32 values that a store to dtype t and a load back would give)
inline void scale_round_row(float* v, float scale, DType t, int64_t n) {
  int64_t i = 0;
#ifdef KVENGINE_AVX2
  const __m256 s = _mm256_set1_ps(scale);
  switch (t) {
    case DType::F32:
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, _mm256_mul_ps(_mm256_loadu_ps(v + i), s));
      break;
    case DType::F16:
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(v + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(v + i), s),
                                                                 _MM_FROUND_TO_NEAREST_INT)));
      break;
    case DType::BF16:
      for (; i + 8 <= n; i += 8) {
        const __m256i w = _mm256_cvtepu16_epi32(cvt_ps_bf16(_mm256_mul_ps(_mm256_loadu_ps(v + i), s)));
        _mm256_storeu_ps(v + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
      }
      break;
  }
#endif
  for (; i < n; ++i) v[i] = round_to(v[i] * scale, t);
}

}  // namespace kvengine::detail
