// kvengine — FWHT on the CPU: AVX2 butterflies (3 in-register stages via shuffles, the rest across vectors),
// fp32 arithmetic, rows in parallel.
#include <algorithm>
#include <vector>

#include "kvengine/fwht.h"
#include "kvengine/parallel.h"
#include "rowio.h"

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

void fwht_cpu(const void* x, void* y, DType dtype, int64_t rows, int64_t n, int64_t x_row_stride,
              int64_t y_row_stride, float scale, const int32_t* perm) {
  const int esz = dtype_size(dtype);
  const char* xb = static_cast<const char*>(x);
  char* yb = static_cast<char*>(y);
  // grain: ~16K elements of work per task
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  parallel_for(rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(static_cast<size_t>(n));
    for (int64_t r = r0; r < r1; ++r) {
      detail::load_row(xb + r * x_row_stride * esz, dtype, n, perm, buf.data());
      fwht_row_f32(buf.data(), n);
      detail::store_row(buf.data(), scale, dtype, n, yb + r * y_row_stride * esz);
    }
  });
}

}  // namespace kvengine
