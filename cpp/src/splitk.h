// kvengine — internal: split-K (flash-decoding) attention on the CPU, shared by the decode attention over the packed
// cache (attention_cpu.cpp) and the sparse attention over gathered tokens (retrieval_cpu.cpp).
//
// attend_block: one block of <= 32 tokens whose K / V rows are already in L1 (fp32, dequantized or gathered): scores
// four tokens at a time with one combined horizontal reduction, causal limit, online-softmax update (vectorized exp)
// and P·V with the accumulators in registers, for every query row of the work item.  Its products are written as
// `a * b + c`: the including file decides about FMA contraction (both includers allow it).
//
// merge_splits: the final step.  Each work item (b, KV head, chunk) left, per query row r, its online-softmax state
// (m, l, acc[D]) at part[((bh·nchunks + chunk)·R + r)·(D+2)].  Rows are r = (query head within the GQA group)·Tq + t.
// Chunks with l == 0 (nothing visible) weigh nothing.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kvengine/common.h"
#include "kvengine/parallel.h"
#include "rowio.h"
#include "simd.h"

namespace kvengine::detail {

constexpr int kBlockTokens = 32;  // tokens per block (K + V: 32 KiB at D = 128, fp32)

struct BlockState {  // per work item: query rows, online softmax state, one block of K / V rows (fp32)
  int R = 0, D = 0;  // rows, row length (a multiple of 16)
  simd::lvector<float> q, acc, m, l, s, kblk, vblk;
  void init(int rows, int d) {
    R = rows;
    D = d;
    q.assign(size_t(R) * D, 0.f);
    acc.assign(size_t(R) * D, 0.f);
    m.assign(R, -std::numeric_limits<float>::infinity());
    l.assign(R, 0.f);
    s.assign(size_t(R) * kBlockTokens, 0.f);
    kblk.resize(size_t(kBlockTokens) * D);
    vblk.resize(size_t(kBlockTokens) * D);
  }
};

// NV = D / 16 known at compile time (0: run time) so that query rows and accumulators live in registers.
// Row r sees the block's tokens at positions p0 .. up to n_ctx − tq + (r % tq) (the causal limit of decode rows).
// QK = false: the caller has already written the scores of tokens 0 .. nt − 1 to st.s (row r at r·32); kblk unused.
template <int NV, bool QK = true>
void attend_block_nv(BlockState& st, int64_t p0, int nt, int64_t n_ctx, int64_t tq) {
  using namespace simd;
  constexpr int BT = kBlockTokens;
  const int nv = NV ? NV : st.D / W, D = nv * W;
  constexpr int NN = NV * (W / WN);  // native vectors per row (0: run time)
  const int nn = D / WN;
  constexpr float NEG = -std::numeric_limits<float>::infinity();
  alignas(64) float p[BT];
  if constexpr (QK)
    for (int t = nt; t < BT; ++t) std::memset(st.kblk.data() + size_t(t) * D, 0, D * sizeof(float));
  for (int r = 0; r < st.R; ++r) {
    const float* q = st.q.data() + size_t(r) * D;
    float* s = st.s.data() + size_t(r) * BT;
    for (int t = 0; QK && t < nt; t += 4) {  // four tokens at a time: one combined horizontal reduction
      const float* k = st.kblk.data() + size_t(t) * D;
      vn a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int i = 0; i < nn; ++i) {
        const vn qi = ldn(q + i * WN);
        a0 += qi * ldn(k + i * WN);
        a1 += qi * ldn(k + D + i * WN);
        a2 += qi * ldn(k + 2 * D + i * WN);
        a3 += qi * ldn(k + 3 * D + i * WN);
      }
      hsum4n(a0, a1, a2, a3, s + t);
    }
    // causal limit of this row (only the newest tq tokens can be masked): the scores past it, and past nt, are
    // −inf; the block max by vectors
    const int64_t lim = n_ctx - tq + (r % tq);
    const int vis = int(std::clamp<int64_t>(lim - p0 + 1, 0, nt));
    for (int t = vis; t < BT; ++t) s[t] = NEG;
    vn bmv = splatn(NEG);
#pragma GCC unroll 4
    for (int t = 0; t < BT; t += WN) {
      const vn x = ldn(s + t);
      bmv = x > bmv ? x : bmv;  // a NaN score never becomes the max (as std::max(bm, s) before)
    }
    const float bm = hmaxn(bmv);
    if (bm == NEG) continue;  // every token of the block is masked for this row
    const float mn = std::max(st.m[r], bm);
    // 0 when m was -inf; the running max rarely moves after the first blocks: no libm call when it does not
    const float alpha = st.m[r] == mn ? 1.f : std::exp(st.m[r] - mn);
    vn sum = {};
    for (int t = 0; t < BT; t += WN) {
      const vn e = vexpn(ldn(s + t) - splatn(mn));
      stn(p + t, e);
      sum += e;
    }
    st.l[r] = st.l[r] * alpha + hsumn(sum);
    st.m[r] = mn;
    float* acc = st.acc.data() + size_t(r) * D;
    // P·V with up to 8 native accumulator vectors (128 channels with AVX-512, 64 with AVX2) held in registers
    // across the block's tokens
    for (int i0 = 0; i0 < nn; i0 += 8) {
      constexpr int C = NN ? (NN < 8 ? NN : 8) : 8;
      const int n8 = NN ? C : std::min(8, nn - i0);
      vn a8[C] = {};
#pragma GCC unroll 8
      for (int i = 0; i < C; ++i)
        if (i < n8) a8[i] = ldn(acc + (i0 + i) * WN) * splatn(alpha);
      for (int t = 0; t < nt; ++t) {
        const vn pv = splatn(p[t]);
        const float* v = st.vblk.data() + size_t(t) * D + i0 * WN;
#pragma GCC unroll 8
        for (int i = 0; i < C; ++i)
          if (i < n8) a8[i] += pv * ldn(v + i * WN);
      }
#pragma GCC unroll 8
      for (int i = 0; i < C; ++i)
        if (i < n8) stn(acc + (i0 + i) * WN, a8[i]);
    }
  }
}

template <bool QK = true>
inline void attend_block(BlockState& st, int64_t p0, int nt, int64_t n_ctx, int64_t tq) {
  switch (st.D / simd::W) {
    case 2: return attend_block_nv<2, QK>(st, p0, nt, n_ctx, tq);
    case 4: return attend_block_nv<4, QK>(st, p0, nt, n_ctx, tq);
    case 8: return attend_block_nv<8, QK>(st, p0, nt, n_ctx, tq);
    case 16: return attend_block_nv<16, QK>(st, p0, nt, n_ctx, tq);
    default: return attend_block_nv<0, QK>(st, p0, nt, n_ctx, tq);
  }
}

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
