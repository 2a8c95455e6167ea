// kvengine — fast Walsh–Hadamard transform (CPU entry points).
//
// y[r, :] = (x[r, perm] · H_n) · scale  for each of `rows` rows, H_n the Sylvester-ordered Hadamard matrix
// (H_1 = [1], H_2k = [[H_k, H_k], [H_k, -H_k]]), n a power of two in [2, 32768].  Elements along a row are
// contiguous; rows are `x_row_stride` / `y_row_stride` elements apart.  perm (int32, length n) may be null.
// Arithmetic is fp32 whatever the storage dtype; the result is rounded once to the output dtype.
#pragma once
#include "kvengine/common.h"

namespace kvengine {

constexpr int64_t kFwhtMaxN = 32768;

void fwht_cpu(const void* x, void* y, DType dtype, int64_t rows, int64_t n, int64_t x_row_stride,
              int64_t y_row_stride, float scale, const int32_t* perm);

// In-place transform of one fp32 row (no scale).  The shared building block of every CPU kernel that rotates.
void fwht_row_f32(float* v, int64_t n);

}  // namespace kvengine
