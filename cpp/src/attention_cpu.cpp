// kvengine — fused decode attention over the quantized cache on the CPU.
//
// Work item = (sequence b, KV head h, chunk of the logical token range).  Each item keeps the g·Tq query rows of
// its KV head (GQA: K/V are unpacked once per token and used by every query head of the group), walks its tokens
// in blocks of ≤ 32, and keeps an online softmax state (m, l, acc).  Packed keys and values are unpacked 16 codes at
// a time and dequantized in registers (x̂ = code·scale + zero, the same fp32 operations as dequantize — folding the
// scale into q instead would be cheaper but loses precision to cancellation against large zero points), once per
// token, then used by every query row.  Nothing dequantized is ever written to memory.
// Chunks are merged by the usual log-sum-exp rule (flash-decoding split-K).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kvengine/attention.h"
#include "kvengine/parallel.h"
#include "rowio.h"

namespace kvengine {
namespace {

constexpr int W = 16;   // lanes of the vector type
constexpr int BT = 32;  // tokens per block
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint8_t vb __attribute__((vector_size(16)));

inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void stv(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }

inline float hsum(vf v) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// 16 codes starting at element d (d % 16 == 0) of a row packed as quantize_pack does, as floats
template <int BITS>
inline vf unpack16(const uint8_t* row, int64_t d) {
  if constexpr (BITS == 8) {
    vb b;
    std::memcpy(&b, row + d, 16);
    return __builtin_convertvector(__builtin_convertvector(b, vi), vf);
  } else if constexpr (BITS == 4) {
    uint32_t w[2];
    std::memcpy(w, row + d / 2, 8);
    const vu x = vu{w[0], w[0], w[0], w[0], w[0], w[0], w[0], w[0], w[1], w[1], w[1], w[1], w[1], w[1], w[1], w[1]};
    const vu sh = {0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28};
    return __builtin_convertvector((vi)((x >> sh) & 15u), vf);
  } else if constexpr (BITS == 2) {
    uint32_t w;
    std::memcpy(&w, row + d / 4, 4);
    const vu sh = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    return __builtin_convertvector((vi)(((vu{} + w) >> sh) & 3u), vf);
  } else {
    uint16_t w;
    std::memcpy(&w, row + d / 8, 2);
    const vu sh = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return __builtin_convertvector((vi)(((vu{} + uint32_t(w)) >> sh) & 1u), vf);
  }
}

struct State {  // per work item: query rows, online softmax state
  int R = 0, D = 0;
  std::vector<float> q, acc, m, l, s, p, tmp;
  void init(int rows, int d) {
    R = rows;
    D = d;
    q.assign(size_t(R) * D, 0.f);
    acc.assign(size_t(R) * D, 0.f);
    m.assign(R, -std::numeric_limits<float>::infinity());
    l.assign(R, 0.f);
    s.assign(size_t(R) * BT, 0.f);
    p.assign(size_t(R) * BT, 0.f);
    tmp.assign(size_t(BT) * D, 0.f);
  }
};

struct Ctx {
  const DecodeAttentionArgs* a;
  int g;          // query heads per KV head
  int R;          // rows = g * Tq
  int64_t chunk;  // tokens per work item
  int64_t nchunks;
  float* part;    // [B, Hkv, nchunks, R, D + 2]
};

template <int BK, int BV>
class Worker {
 public:
  Worker(const Ctx& c) : c_(c), a_(*c.a) {}

  void run(int64_t item, State& st) {
    const DecodeAttentionArgs& a = a_;
    const int64_t ck = item % c_.nchunks, bh = item / c_.nchunks, b = bh / a.Hkv, h = bh % a.Hkv;
    const int32_t ns = a.lens[b * 3], nq = a.lens[b * 3 + 1], nr = a.lens[b * 3 + 2];
    const int64_t N = int64_t(ns) + nq + nr;
    float* out = c_.part + item * int64_t(c_.R) * (a.D + 2);
    const int64_t c0 = ck * c_.chunk, c1 = std::min(N, c0 + c_.chunk);
    if (c0 >= c1) {  // empty chunk: weight 0 in the merge
      for (int r = 0; r < c_.R; ++r) {
        out[r * (a.D + 2)] = -std::numeric_limits<float>::infinity();
        out[r * (a.D + 2) + 1] = 0.f;
      }
      return;
    }
    st.init(c_.R, int(a.D));
    load_queries(b, h, st);
    N_ = N;
    const int esz = dtype_size(a.dtype);
    const char* kf = static_cast<const char*>(a.k_fp) + (b * a.Hkv + h) * a.f_cap * a.D * esz;
    const char* vf_ = static_cast<const char*>(a.v_fp) + (b * a.Hkv + h) * a.f_cap * a.D * esz;
    // sinks: logical [0, ns) = fp slots [0, ns)
    fp_range(st, kf, vf_, 0, ns, 0, c0, c1);
    // quantized: logical [ns, ns + nq)
    quant_range(st, b, h, ns, nq, c0, c1);
    // residual: logical [ns + nq, N) = fp slots [ns, ns + nr)
    fp_range(st, kf, vf_, ns, nr, int64_t(ns) + nq, c0, c1);
    for (int r = 0; r < c_.R; ++r) {
      out[r * (a.D + 2)] = st.m[r];
      out[r * (a.D + 2) + 1] = st.l[r];
      std::memcpy(out + r * (a.D + 2) + 2, st.acc.data() + size_t(r) * a.D, a.D * sizeof(float));
    }
  }

 private:
  const Ctx& c_;
  const DecodeAttentionArgs& a_;
  int64_t N_ = 0;

  void load_queries(int64_t b, int64_t h, State& st) {
    const DecodeAttentionArgs& a = a_;
    for (int hl = 0; hl < c_.g; ++hl)
      for (int64_t t = 0; t < a.Tq; ++t) {
        const int64_t hq = h * c_.g + hl;
        const char* src = static_cast<const char*>(a.q) +
                          (b * a.q_stride_b + hq * a.q_stride_h + t * a.q_stride_t) * dtype_size(a.dtype);
        float* dst = st.q.data() + size_t(hl * a.Tq + t) * a.D;
        detail::load_row(src, a.dtype, a.D, nullptr, dst);
        for (int64_t d = 0; d < a.D; ++d) dst[d] *= a.softmax_scale;
      }
  }

  // the last visible logical position of row r
  int64_t limit(int r) const { return N_ - a_.Tq + (r % a_.Tq); }

  // scores st.s[r][0..nt) are set for tokens at logical positions p0..p0+nt: mask, softmax update, fill st.p
  void softmax_block(State& st, int64_t p0, int nt) {
    for (int r = 0; r < st.R; ++r) {
      float* s = st.s.data() + size_t(r) * BT;
      float* p = st.p.data() + size_t(r) * BT;
      const int64_t lim = limit(r);
      float bm = -std::numeric_limits<float>::infinity();
      for (int t = 0; t < nt; ++t) {
        if (p0 + t > lim) s[t] = -std::numeric_limits<float>::infinity();
        bm = std::max(bm, s[t]);
      }
      if (bm == -std::numeric_limits<float>::infinity()) {
        std::fill(p, p + nt, 0.f);
        continue;
      }
      const float mn = std::max(st.m[r], bm);
      const float alpha = std::exp(st.m[r] - mn);  // 0 when m was -inf
      float sum = 0.f;
      for (int t = 0; t < nt; ++t) {
        p[t] = std::exp(s[t] - mn);
        sum += p[t];
      }
      if (alpha != 1.f) {
        float* acc = st.acc.data() + size_t(r) * st.D;
        const vf va = splat(alpha);
        for (int d = 0; d < st.D; d += W) stv(acc + d, ld(acc + d) * va);
      }
      st.l[r] = st.l[r] * alpha + sum;
      st.m[r] = mn;
    }
  }

  // full-precision tokens at slots [s0, s0 + n) with logical positions starting at lp0, clipped to [c0, c1)
  void fp_range(State& st, const char* kf, const char* vfp, int64_t s0, int64_t n, int64_t lp0, int64_t c0,
                int64_t c1) {
    const DecodeAttentionArgs& a = a_;
    const int64_t lo = std::max(lp0, c0), hi = std::min(lp0 + n, c1);
    const int esz = dtype_size(a.dtype);
    const int D = int(a.D);
    for (int64_t p0 = lo; p0 < hi; p0 += BT) {
      const int nt = int(std::min<int64_t>(BT, hi - p0));
      const int64_t slot0 = s0 + (p0 - lp0);
      for (int t = 0; t < nt; ++t) {
        float* krow = st.tmp.data() + size_t(t) * D;
        detail::load_row(kf + (slot0 + t) * D * esz, a.dtype, D, nullptr, krow);
      }
      for (int r = 0; r < st.R; ++r) {
        const float* q = st.q.data() + size_t(r) * D;
        for (int t = 0; t < nt; ++t) {
          const float* k = st.tmp.data() + size_t(t) * D;
          vf acc = {};
          for (int d = 0; d < D; d += W) acc += ld(q + d) * ld(k + d);
          st.s[size_t(r) * BT + t] = hsum(acc);
        }
      }
      softmax_block(st, p0, nt);
      for (int t = 0; t < nt; ++t) {
        float* vrow = st.tmp.data() + size_t(t) * D;
        detail::load_row(vfp + (slot0 + t) * D * esz, a.dtype, D, nullptr, vrow);
      }
      for (int r = 0; r < st.R; ++r) {
        float* acc = st.acc.data() + size_t(r) * D;
        const float* p = st.p.data() + size_t(r) * BT;
        for (int t = 0; t < nt; ++t) {
          if (p[t] == 0.f) continue;
          const vf pv = splat(p[t]);
          const float* v = st.tmp.data() + size_t(t) * D;
          for (int d = 0; d < D; d += W) stv(acc + d, ld(acc + d) + pv * ld(v + d));
        }
      }
    }
  }

  void quant_range(State& st, int64_t b, int64_t h, int64_t ns, int64_t nq, int64_t c0, int64_t c1) {
    const DecodeAttentionArgs& a = a_;
    const int64_t lo = std::max(ns, c0), hi = std::min(ns + nq, c1);
    if (lo >= hi) return;
    const int D = int(a.D), G = a.k_group, VG = a.v_group;
    const int64_t bh = b * a.Hkv + h;
    const int64_t krow_bytes = D * BK / 8, vrow_bytes = D * BV / 8;
    const uint8_t* kc = a.k_codes + bh * a.q_cap * krow_bytes;
    const uint8_t* vc = a.v_codes + bh * a.q_cap * vrow_bytes;
    const int64_t kmeta0 = bh * (a.q_cap / G) * D, vmeta0 = bh * a.q_cap * (D / VG);
    int64_t cur_group = -1;
    std::vector<float>& kv = st.tmp;  // scratch: K group scale / zero (2·D floats)
    for (int64_t p0 = lo; p0 < hi;) {
      const int64_t j0 = p0 - ns;                      // quantized index
      const int64_t gid = j0 / G;
      const int64_t gend = (gid + 1) * G + ns;         // logical end of this K group
      const int nt = int(std::min<int64_t>({int64_t(BT), hi - p0, gend - p0}));
      if (gid != cur_group) {  // this K group's per-channel scale / zero
        cur_group = gid;
        for (int d = 0; d < D; ++d) {
          kv[d] = load_as_float(a.k_scale, kmeta0 + gid * D + d, a.meta_dtype);
          kv[D + d] = load_as_float(a.k_zero, kmeta0 + gid * D + d, a.meta_dtype);
        }
      }
      // scores: each key row is dequantized once in registers (k̂ = code·scale + zero, exactly as dequantize
      // computes it) and used by every query row of the GQA group
      vf kbuf[256 / W];
      for (int t = 0; t < nt; ++t) {
        const uint8_t* row = kc + (j0 + t) * krow_bytes;
        for (int i = 0; i < D / W; ++i)
          kbuf[i] = unpack16<BK>(row, int64_t(i) * W) * ld(kv.data() + i * W) + ld(kv.data() + D + i * W);
        for (int r = 0; r < st.R; ++r) {
          const float* q = st.q.data() + size_t(r) * D;
          vf acc0 = {}, acc1 = {};
          int i = 0;
          for (; i + 1 < D / W; i += 2) {
            acc0 += ld(q + i * W) * kbuf[i];
            acc1 += ld(q + (i + 1) * W) * kbuf[i + 1];
          }
          if (i < D / W) acc0 += ld(q + i * W) * kbuf[i];
          st.s[size_t(r) * BT + t] = hsum(acc0 + acc1);
        }
      }
      softmax_block(st, p0, nt);
      // values: v̂ = code·scale + zero per V group of channels, dequantized once, acc += p·v̂ for every row
      for (int t = 0; t < nt; ++t) {
        const uint8_t* row = vc + (j0 + t) * vrow_bytes;
        const int64_t vm = vmeta0 + (j0 + t) * (D / VG);
        for (int i = 0; i < D / W; ++i) {
          const int64_t gv = i * W / VG;
          kbuf[i] = unpack16<BV>(row, int64_t(i) * W) * splat(load_as_float(a.v_scale, vm + gv, a.meta_dtype)) +
                    splat(load_as_float(a.v_zero, vm + gv, a.meta_dtype));
        }
        for (int r = 0; r < st.R; ++r) {
          const float pr = st.p[size_t(r) * BT + t];
          if (pr == 0.f) continue;
          float* acc = st.acc.data() + size_t(r) * D;
          const vf pv = splat(pr);
          for (int i = 0; i < D / W; ++i) stv(acc + i * W, ld(acc + i * W) + pv * kbuf[i]);
        }
      }
      p0 += nt;
    }
  }
};

template <int BK, int BV>
void run_items(const Ctx& c, int64_t nitems) {
  parallel_for(nitems, 1, [&](int64_t i0, int64_t i1) {
    State st;
    Worker<BK, BV> w(c);
    for (int64_t i = i0; i < i1; ++i) w.run(i, st);
  });
}

template <int BK>
void dispatch_bv(const Ctx& c, int64_t nitems, int bv) {
  switch (bv) {
    case 1: run_items<BK, 1>(c, nitems); break;
    case 2: run_items<BK, 2>(c, nitems); break;
    case 4: run_items<BK, 4>(c, nitems); break;
    default: run_items<BK, 8>(c, nitems); break;
  }
}

}  // namespace

void quant_decode_attention_cpu(const DecodeAttentionArgs& a) {
  Ctx c;
  c.a = &a;
  c.g = int(a.Hq / a.Hkv);
  c.R = int(c.g * a.Tq);
  int64_t maxN = 0;
  for (int64_t b = 0; b < a.B; ++b)
    maxN = std::max<int64_t>(maxN, int64_t(a.lens[b * 3]) + a.lens[b * 3 + 1] + a.lens[b * 3 + 2]);
  // split the context so that there are >= 64 work items when the context is long enough (>= 256 tokens each)
  const int64_t bh = a.B * a.Hkv;
  int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>((maxN + 255) / 256, (64 + bh - 1) / bh));
  int64_t chunk = (maxN + nchunks - 1) / nchunks;
  chunk = std::max<int64_t>(BT, (chunk + BT - 1) / BT * BT);
  nchunks = std::max<int64_t>(1, (maxN + chunk - 1) / chunk);
  c.chunk = chunk;
  c.nchunks = nchunks;
  const int64_t nitems = bh * nchunks;
  std::vector<float> part(size_t(nitems) * c.R * (a.D + 2));
  c.part = part.data();
  switch (a.bits_k) {
    case 1: dispatch_bv<1>(c, nitems, a.bits_v); break;
    case 2: dispatch_bv<2>(c, nitems, a.bits_v); break;
    case 4: dispatch_bv<4>(c, nitems, a.bits_v); break;
    default: dispatch_bv<8>(c, nitems, a.bits_v); break;
  }
  // merge the chunks of every (b, h, row) and write out[b, hq, t, :]
  const int64_t D = a.D;
  parallel_for(bh, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> o(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / a.Hkv, h = i % a.Hkv;
      for (int r = 0; r < c.R; ++r) {
        float M = -std::numeric_limits<float>::infinity();
        for (int64_t ck = 0; ck < nchunks; ++ck) M = std::max(M, part[((i * nchunks + ck) * c.R + r) * (D + 2)]);
        std::fill(o.begin(), o.end(), 0.f);
        float L = 0.f;
        for (int64_t ck = 0; ck < nchunks; ++ck) {
          const float* pr = part.data() + ((i * nchunks + ck) * c.R + r) * (D + 2);
          if (pr[1] == 0.f) continue;
          const float w = std::exp(pr[0] - M);
          L += pr[1] * w;
          for (int64_t d = 0; d < D; ++d) o[d] += pr[2 + d] * w;
        }
        const float inv = L > 0.f ? 1.f / L : 0.f;
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
        const int64_t hq = h * c.g + r / a.Tq, t = r % a.Tq;
        char* dst = static_cast<char*>(a.out) + (((b * a.Hq + hq) * a.Tq + t) * D) * dtype_size(a.dtype);
        detail::store_row(o.data(), 1.0f, a.dtype, D, dst);
      }
    }
  });
}

}  // namespace kvengine
