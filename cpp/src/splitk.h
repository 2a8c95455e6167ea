// kvengine — internal: the final step of split-K (flash-decoding) attention on the CPU.  Each work item (b, KV head,
// chunk) left, per query row r, its online-softmax state (m, l, acc[D]) at part[((bh·nchunks + chunk)·R + r)·(D+2)].
// Rows are r = (query head within the GQA group)·Tq + t.  Chunks with l == 0 (nothing visible) weigh nothing.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kvengine/common.h"
#include "kvengine/parallel.h"
#include "rowio.h"

namespace kvengine::detail {

inline void merge_splits(const float* part, int64_t B, int64_t Hkv, int64_t Hq, int64_t Tq, int64_t D,
                         int64_t nchunks, DType dtype, void* out) {
  const int64_t g = Hq / Hkv, R = g * Tq;
  parallel_for(B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> o(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      for (int64_t r = 0; r < R; ++r) {
        float M = -std::numeric_limits<float>::infinity();
        for (int64_t ck = 0; ck < nchunks; ++ck) M = std::max(M, part[((i * nchunks + ck) * R + r) * (D + 2)]);
        std::fill(o.begin(), o.end(), 0.f);
        float L = 0.f;
        for (int64_t ck = 0; ck < nchunks; ++ck) {
          const float* pr = part + ((i * nchunks + ck) * R + r) * (D + 2);
          if (pr[1] == 0.f) continue;
          const float w = std::exp(pr[0] - M);
          L += pr[1] * w;
          for (int64_t d = 0; d < D; ++d) o[d] += pr[2 + d] * w;
        }
        const float inv = L > 0.f ? 1.f / L : 0.f;  // a row with nothing visible is 0
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
        const int64_t hq = h * g + r / Tq, t = r % Tq;
        store_row(o.data(), 1.0f, dtype, D, static_cast<char*>(out) + ((b * Hq + hq) * Tq + t) * D * dtype_size(dtype));
      }
    }
  });
}

}  // namespace kvengine::detail
