// kvengine — hash-based top-k KV retrieval on the CPU: sign packing of hash projections, Hamming top-k with a
// counting select, and sparse decode attention over the selected tokens (semantics: kvengine/retrieval.h).
//
// hamming_topk: work items are (b, h, chunk of positions).  Pass 1 (parallel over items) scores every position of
// the chunk (g·W XOR+popcounts; AVX-512 VPOPCNTDQ four 128-bit codes per vector where available) into a uint16
// workspace and counts the middle positions' scores in a per-chunk histogram.  Pass 2 (per (b, h)) sums the
// histograms, finds the threshold T and the number of ties to take, and gives every chunk its output offset and
// tie budget (from its own histogram: the chunk's count above T and at T).  Pass 3 (parallel over items) rescans
// the uint16 scores of each chunk, 16 at a time against the threshold (a compare mask; only its set bits are visited),
// and writes its selected positions in ascending order.  Exact and deterministic.
//
// sparse_decode_attention: work items are (b, h, split of the index list); each gathers its K/V rows in blocks of
// 32 tokens into L1 (fp32, padded to whole 16-float vectors), and splitk.h's attend_block (the decode attention's
// block step) scores all g query rows of the group (K/V read once per group), keeps an online softmax (m, l, acc);
// the work item writes its partial state and partials are merged by log-sum-exp.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#define KVENGINE_VPOPCNT 1
#endif

#include "kvengine/parallel.h"
#include "kvengine/retrieval.h"
#include "rowio.h"
#include "simd.h"
#include "splitk.h"

namespace kvengine {

// ---- sign packing ------------------------------------------------------------------------------------------------
void hash_sign_pack_cpu(const float* f, int64_t rows, int64_t nbits, int64_t f_row_stride, uint32_t* codes) {
  const int64_t W = nbits / 32;
  parallel_for(rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = f + r * f_row_stride;
      for (int64_t w = 0; w < W; ++w) {
        uint32_t word = 0;
        for (int j = 0; j < 32; ++j) word |= uint32_t(x[w * 32 + j] > 0.0f) << j;
        codes[r * W + w] = word;
      }
    }
  });
}

// ---- Hamming top-k -------------------------------------------------------------------------------------------------
int64_t hamming_topk_chunk(int64_t N) {
  // 8192 positions (16 KiB of uint16 scores), more for very long contexts so that there are <= 256 chunks
  const int64_t c = std::max<int64_t>(8192, (N + 255) / 256);
  return (c + 255) / 256 * 256;
}

namespace {

struct TopkCtx {
  const HammingTopkArgs* a;
  int64_t g, nbits, nbins, chunk, nch;
  uint16_t* sc;     // [B, Hkv, N]
  int32_t* hist;    // [B, Hkv, nch, nbins]
  int64_t* off;     // [B, Hkv, nch]   output slot of the chunk's first selected position
  int64_t* take;    // [B, Hkv, nch]   ties (score == T) the chunk contributes
  int32_t* thr;     // [B, Hkv]        T (nbins when nothing is selected from the middle)

  int64_t len(int64_t b) const {
    const HammingTopkArgs& A = *a;
    if (!A.seq_lens) return A.N;
    return std::clamp<int64_t>(A.seq_lens[b], 0, A.N);
  }
  // kept counts for a sequence of length L
  void kept(int64_t L, int64_t& ns, int64_t& nr) const {
    ns = std::min<int64_t>(a->sinks, L);
    nr = std::min<int64_t>(a->recent, L - ns);
  }
};

// bit 2j set where s[j] >= lo, j < 16 (the even bits of a byte mask); scores and lo are <= 8193 (the binding's score
// range), so a signed 16-bit compare is exact
inline uint32_t ge_mask16(const uint16_t* s, int32_t lo) {
#if defined(__AVX2__)
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
  return uint32_t(_mm256_movemask_epi8(_mm256_cmpgt_epi16(v, _mm256_set1_epi16(int16_t(lo - 1))))) & 0x55555555u;
#else
  uint32_t m = 0;
  for (int j = 0; j < 16; ++j) m |= uint32_t(s[j] >= lo) << (2 * j);
  return m;
#endif
}

// scores of positions [p0, p1) of (b, h): g·nbits − Σ popcount(q_i ^ k_p)
template <int W>
void score_range(const uint32_t* q, int g, const uint32_t* k, int64_t p0, int64_t p1, int total, uint16_t* out) {
  int64_t p = p0;
#ifdef KVENGINE_VPOPCNT
  if constexpr (W == 4 || W == 8 || W == 16) {
    constexpr int KPV = 16 / W;  // keys per 512-bit vector
    // per query head, its code repeated KPV times
    __m512i qv[64];
    const int gg = std::min(g, 64);
    if (gg == g) {
      for (int i = 0; i < g; ++i) {
        alignas(64) uint32_t rep[16];
        for (int j = 0; j < 16; ++j) rep[j] = q[i * W + (j % W)];
        qv[i] = _mm512_load_si512(rep);
      }
      for (; p + 2 * KPV <= p1; p += 2 * KPV) {
        const __m512i k0 = _mm512_loadu_si512(k + p * W), k1 = _mm512_loadu_si512(k + (p + KPV) * W);
        __m512i c0 = _mm512_setzero_si512(), c1 = _mm512_setzero_si512();
        for (int i = 0; i < g; ++i) {
          c0 = _mm512_add_epi64(c0, _mm512_popcnt_epi64(_mm512_xor_si512(k0, qv[i])));
          c1 = _mm512_add_epi64(c1, _mm512_popcnt_epi64(_mm512_xor_si512(k1, qv[i])));
        }
        alignas(64) uint64_t s0[8], s1[8];
        _mm512_store_si512(s0, c0);
        _mm512_store_si512(s1, c1);
        constexpr int L64 = W / 2;  // 64-bit lanes per key
        for (int j = 0; j < KPV; ++j) {
          uint64_t t0 = 0, t1 = 0;
          for (int l = 0; l < L64; ++l) {
            t0 += s0[j * L64 + l];
            t1 += s1[j * L64 + l];
          }
          out[p + j] = uint16_t(total - int(t0));
          out[p + KPV + j] = uint16_t(total - int(t1));
        }
      }
    }
  }
#endif
  for (; p < p1; ++p) {
    const uint32_t* kp = k + p * W;
    int pc = 0;
    for (int i = 0; i < g; ++i) {
      const uint32_t* qi = q + i * W;
      if constexpr (W % 2 == 0) {
        for (int w = 0; w < W; w += 2) {
          uint64_t a, b;
          std::memcpy(&a, kp + w, 8);
          std::memcpy(&b, qi + w, 8);
          pc += __builtin_popcountll(a ^ b);
        }
      } else {
        for (int w = 0; w < W; ++w) pc += __builtin_popcount(kp[w] ^ qi[w]);
      }
    }
    out[p] = uint16_t(total - pc);
  }
}

void score_dispatch(int64_t W, const uint32_t* q, int g, const uint32_t* k, int64_t p0, int64_t p1, int total,
                    uint16_t* out) {
  switch (W) {
    case 1: return score_range<1>(q, g, k, p0, p1, total, out);
    case 2: return score_range<2>(q, g, k, p0, p1, total, out);
    case 4: return score_range<4>(q, g, k, p0, p1, total, out);
    default: return score_range<8>(q, g, k, p0, p1, total, out);
  }
}

}  // namespace

void hamming_topk_cpu(const HammingTopkArgs& a) {
  TopkCtx c;
  c.a = &a;
  c.g = a.Hq / a.Hkv;
  c.nbits = 32 * a.W;
  c.nbins = c.g * c.nbits + 1;
  c.chunk = hamming_topk_chunk(a.N);
  c.nch = std::max<int64_t>(1, (a.N + c.chunk - 1) / c.chunk);
  const int64_t BH = a.B * a.Hkv;
  simd::lvector<uint16_t> sc(size_t(BH) * a.N);  // not zeroed: pass 1 writes every position it reads later
  std::vector<int32_t> hist(size_t(BH) * c.nch * c.nbins);
  std::vector<int64_t> off(size_t(BH) * c.nch), take(size_t(BH) * c.nch);
  std::vector<int32_t> thr(BH);
  c.sc = sc.data();
  c.hist = hist.data();
  c.off = off.data();
  c.take = take.data();
  c.thr = thr.data();
  const int64_t nitems = BH * c.nch;

  // pass 1: scores + per-chunk histograms of the middle positions
  parallel_for(nitems, 1, [&](int64_t i0, int64_t i1) {
    std::vector<uint32_t> q(size_t(c.g) * a.W);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t bh = it / c.nch, ck = it % c.nch, b = bh / a.Hkv, h = bh % a.Hkv;
      const int64_t L = c.len(b);
      int64_t ns, nr;
      c.kept(L, ns, nr);
      int32_t* hi = c.hist + it * c.nbins;
      std::fill(hi, hi + c.nbins, 0);
      const int64_t p0 = ck * c.chunk, p1 = std::min(L, p0 + c.chunk);
      if (p0 >= p1) continue;
      for (int64_t i = 0; i < c.g; ++i)
        std::memcpy(q.data() + i * a.W, a.q_codes + b * a.q_stride_b + (h * c.g + i) * a.q_stride_h,
                    a.W * sizeof(uint32_t));
      uint16_t* s = c.sc + bh * a.N;
      score_dispatch(a.W, q.data(), int(c.g), a.k_codes + b * a.k_stride_b + h * a.k_stride_h, p0, p1,
                     int(c.g * c.nbits), s);
      const int64_t m0 = std::max(p0, ns), m1 = std::min(p1, L - nr);
      for (int64_t p = m0; p < m1; ++p) ++hi[s[p]];
    }
  });

  // pass 2: per (b, h) threshold, chunk offsets and tie budgets; kept positions and padding
  parallel_for(BH, 1, [&](int64_t i0, int64_t i1) {
    std::vector<int64_t> tot(c.nbins);
    for (int64_t bh = i0; bh < i1; ++bh) {
      const int64_t b = bh / a.Hkv;
      const int64_t L = c.len(b);
      int64_t ns, nr;
      c.kept(L, ns, nr);
      const int64_t m = std::max<int64_t>(0, std::min(a.k - ns - nr, L - ns - nr));
      std::fill(tot.begin(), tot.end(), 0);
      const int32_t* hb = c.hist + bh * c.nch * c.nbins;
      for (int64_t ck = 0; ck < c.nch; ++ck)
        for (int64_t s = 0; s < c.nbins; ++s) tot[s] += hb[ck * c.nbins + s];
      int64_t T = c.nbins, need = 0;
      if (m > 0) {
        int64_t cum = 0;
        for (int64_t s = c.nbins - 1; s >= 0; --s) {
          if (cum + tot[s] >= m) {
            T = s;
            need = m - cum;
            break;
          }
          cum += tot[s];
        }
      }
      c.thr[bh] = int32_t(T);
      int64_t slot = ns, eq_before = 0;
      for (int64_t ck = 0; ck < c.nch; ++ck) {
        const int32_t* h = hb + ck * c.nbins;
        int64_t gt = 0;
        for (int64_t s = T + 1; s < c.nbins; ++s) gt += h[s];
        const int64_t eq = T < c.nbins ? h[T] : 0;
        const int64_t tk = std::clamp<int64_t>(need - eq_before, 0, eq);
        c.off[bh * c.nch + ck] = slot;
        c.take[bh * c.nch + ck] = tk;
        slot += gt + tk;
        eq_before += eq;
      }
      int32_t* idx = a.indices + bh * a.k;
      int32_t* scr = a.scores + bh * a.k;
      const uint16_t* s = c.sc + bh * a.N;
      for (int64_t p = 0; p < ns; ++p) {
        idx[p] = int32_t(p);
        scr[p] = s[p];
      }
      const int64_t r0 = ns + m;
      for (int64_t j = 0; j < nr; ++j) {
        idx[r0 + j] = int32_t(L - nr + j);
        scr[r0 + j] = s[L - nr + j];
      }
      for (int64_t j = r0 + nr; j < a.k; ++j) {
        idx[j] = -1;
        scr[j] = -1;
      }
    }
  });

  // pass 3: every chunk writes its selected middle positions in ascending order
  parallel_for(nitems, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t bh = it / c.nch, ck = it % c.nch, b = bh / a.Hkv;
      const int64_t L = c.len(b);
      int64_t ns, nr;
      c.kept(L, ns, nr);
      const int64_t p0 = std::max(ck * c.chunk, ns), p1 = std::min(std::min(L, (ck + 1) * c.chunk), L - nr);
      const int32_t T = c.thr[bh];
      int64_t slot = c.off[it], tk = c.take[it];
      const uint16_t* s = c.sc + bh * a.N;
      int32_t* idx = a.indices + bh * a.k;
      int32_t* scr = a.scores + bh * a.k;
      // about k of N positions pass: 16 scores at a time are compared with lo, and only the positions whose bits are
      // set are visited. Once the chunk's ties are used up, lo = T + 1
      int32_t lo = tk > 0 ? T : T + 1;
      int64_t p = p0;
      for (; p + 16 <= p1; p += 16) {
        for (uint32_t m = ge_mask16(s + p, lo); m; m &= m - 1) {
          const int64_t q = p + __builtin_ctz(m) / 2;
          const int32_t v = s[q];
          if (v < lo) continue;  // a tie at T after the budget ran out within this group
          if (v == T && --tk == 0) lo = T + 1;
          idx[slot] = int32_t(q);
          scr[slot] = v;
          ++slot;
        }
      }
      for (; p < p1; ++p) {
        const int32_t v = s[p];
        if (v >= lo) {
          if (v == T && --tk == 0) lo = T + 1;
          idx[slot] = int32_t(p);
          scr[slot] = v;
          ++slot;
        }
      }
    }
  });
}

// ---- sparse decode attention -----------------------------------------------------------------------------------------
namespace {

constexpr int BT = detail::kBlockTokens;
using namespace simd;
constexpr int VW = simd::W;

struct SparseCtx {
  const SparseDecodeArgs* a;
  int64_t g, chunk, nchunks;
  float* part;  // [B, Hkv, nchunks, g, D + 2]
};

inline int64_t index_at(const SparseDecodeArgs& a, int64_t b, int64_t h, int64_t j) {
  const int64_t o = b * a.i_stride_b + h * a.i_stride_h + j;
  return a.indices_int64 ? static_cast<const int64_t*>(a.indices)[o] : static_cast<const int32_t*>(a.indices)[o];
}

void sparse_item(const SparseCtx& c, int64_t item, detail::BlockState& st) {
  const SparseDecodeArgs& a = *c.a;
  const int64_t ck = item % c.nchunks, bh = item / c.nchunks, b = bh / a.Hkv, h = bh % a.Hkv;
  const int64_t D = a.D, g = c.g, Dp = (D + VW - 1) / VW * VW;  // rows padded with zeros to whole 16-float vectors
  const int64_t L = a.seq_lens ? std::clamp<int64_t>(a.seq_lens[b], 0, a.N) : a.N;
  st.init(int(g), int(Dp));
  if (Dp != D) {  // the padding lanes of the K / V rows stay 0 (load_row writes D floats)
    std::fill(st.kblk.begin(), st.kblk.end(), 0.f);
    std::fill(st.vblk.begin(), st.vblk.end(), 0.f);
  }
  const int esz = dtype_size(a.dtype);
  for (int64_t r = 0; r < g; ++r) {
    float* q = st.q.data() + r * Dp;
    detail::load_row(static_cast<const char*>(a.q) + (b * a.q_stride_b + (h * g + r) * a.q_stride_h) * esz, a.dtype,
                     D, nullptr, q);
    for (int64_t d = 0; d < D; ++d) q[d] *= a.softmax_scale;
  }
  const char* kbase = static_cast<const char*>(a.k) + (b * a.k_stride_b + h * a.k_stride_h) * esz;
  const char* vbase = static_cast<const char*>(a.v) + (b * a.v_stride_b + h * a.v_stride_h) * esz;
  const int64_t j0 = ck * c.chunk, j1 = std::min(a.n_sel, j0 + c.chunk);
  // the rows of the token kLookAhead places ahead are requested before this one is copied (simd::prefetch)
  constexpr int64_t kLookAhead = 4;
  auto request = [&](int64_t jj) {
    const int64_t p = index_at(a, b, h, jj);
    if (p < 0 || p >= L) return;
    prefetch(kbase + p * a.k_stride_t * esz, D * esz);
    prefetch(vbase + p * a.v_stride_t * esz, D * esz);
  };
  for (int64_t jj = j0; jj < std::min(j1, j0 + kLookAhead); ++jj) request(jj);
  // every gathered token is visible: no causal limit (n_ctx past any position, one row per query head)
  constexpr int64_t kNoLimit = std::numeric_limits<int64_t>::max() / 4;
  int nt = 0;
  for (int64_t j = j0; j < j1; ++j) {
    if (j + kLookAhead < j1) request(j + kLookAhead);
    const int64_t p = index_at(a, b, h, j);
    if (p < 0 || p >= L) continue;
    detail::load_row(kbase + p * a.k_stride_t * esz, a.dtype, D, nullptr, st.kblk.data() + nt * Dp);
    detail::load_row(vbase + p * a.v_stride_t * esz, a.dtype, D, nullptr, st.vblk.data() + nt * Dp);
    if (++nt == BT) {
      detail::attend_block(st, 0, nt, kNoLimit, 1);
      nt = 0;
    }
  }
  if (nt) detail::attend_block(st, 0, nt, kNoLimit, 1);
  float* out = c.part + item * g * (D + 2);  // an empty chunk keeps m = -inf, l = 0: weight 0 in the merge
  for (int64_t r = 0; r < g; ++r) {
    out[r * (D + 2)] = st.m[r];
    out[r * (D + 2) + 1] = st.l[r];
    std::memcpy(out + r * (D + 2) + 2, st.acc.data() + r * Dp, D * sizeof(float));
  }
}

}  // namespace

void sparse_decode_attention_cpu(const SparseDecodeArgs& a) {
  SparseCtx c;
  c.a = &a;
  c.g = a.Hq / a.Hkv;
  const int64_t bh = a.B * a.Hkv;
  // >= 32 work items when the index list is long enough (>= 128 indices each)
  int64_t nch = std::max<int64_t>(1, std::min<int64_t>((a.n_sel + 127) / 128, (32 + bh - 1) / bh));
  c.chunk = std::max<int64_t>(1, (a.n_sel + nch - 1) / nch);
  c.nchunks = std::max<int64_t>(1, (a.n_sel + c.chunk - 1) / c.chunk);
  const int64_t D = a.D;
  std::vector<float> part(size_t(bh) * c.nchunks * c.g * (D + 2));
  c.part = part.data();
  parallel_for(bh * c.nchunks, 1, [&](int64_t i0, int64_t i1) {
    detail::BlockState st;
    for (int64_t i = i0; i < i1; ++i) sparse_item(c, i, st);
  });
  detail::merge_splits(part.data(), a.B, a.Hkv, a.Hq, 1, D, c.nchunks, a.dtype, a.out);
}

}  // namespace kvengine
