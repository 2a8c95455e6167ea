// kvengine — fused decode attention over the quantized cache on the CPU.
//
// Work item = (sequence b, KV head h, chunk of the logical token range).  Each item keeps the g·Tq query rows of
// its KV head (GQA: K/V are unpacked once per token and used by every query head of the group), walks its tokens
// in blocks of ≤ 32, and keeps an online softmax state (m, l, acc).  Packed keys and values are unpacked one
// native vector (16 codes with AVX-512, 8 with AVX2: simd::vn) at a time and dequantized (x̂ = code·scale + zero —
// folding the scale into q would be cheaper but loses precision to cancellation against large zero points) into a
// 32-token block that stays in L1, then used by every query row
// (scores four tokens at a time with one combined horizontal reduction; P·V with the accumulators in registers).
// Keys are per-channel (KIVI: one scale/zero row per group of k_group tokens) or per token (k_per_token: groups of
// k_group channels, like the values).  Nothing dequantized is ever written to the cache or to main memory.  Built
// with FMA contraction allowed.
// Chunks are merged by the usual log-sum-exp rule (flash-decoding split-K).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kvengine/attention.h"
#include "kvengine/parallel.h"
#include "rowio.h"
#include "simd.h"
#include "splitk.h"

namespace kvengine {
namespace {

using namespace simd;
constexpr int BT = detail::kBlockTokens;  // tokens per block

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

// WN (native width) codes starting at element d (d % WN == 0), as floats
template <int BITS>
inline vn unpackn(const uint8_t* row, int64_t d) {
#if defined(__AVX512F__)
  return unpack16<BITS>(row, d);
#else
  if constexpr (BITS == 8) {
    typedef uint8_t vnb __attribute__((vector_size(8)));
    vnb b;
    std::memcpy(&b, row + d, 8);
    return __builtin_convertvector(__builtin_convertvector(b, vni), vn);
  } else {
    constexpr int PER_WORD = 32 / BITS;  // codes per 32-bit word
    uint32_t w = 0;
    std::memcpy(&w, row + d * BITS / 8, 8 * BITS / 8);
    const vnu sh = vnu{0, 1, 2, 3, 4, 5, 6, 7} * uint32_t(BITS);
    static_assert(PER_WORD >= 8, "8 codes fit one word");
    return __builtin_convertvector((vni)(((vnu{} + w) >> sh) & uint32_t((1u << BITS) - 1)), vn);
  }
#endif
}

// one row of D codes dequantized in channel groups of G (a multiple of WN; one scale/zero per group):
// out[d] = code[d] · s[d / G] + z[d / G] (no division in the loop)
template <int BITS>
inline void dequant_groups(const uint8_t* row, const float* s, const float* z, int D, int G, float* out) {
  const int per = G / WN;
  for (int g = 0, i = 0; g < D / G; ++g) {
    const vn vs = splatn(s[g]), vz = splatn(z[g]);
    for (int j = 0; j < per; ++j, ++i) stn(out + i * WN, unpackn<BITS>(row, int64_t(i) * WN) * vs + vz);
  }
}

// the same with the head size known at compile time (NN = D / WN native vectors, gi[i] = channel group of vector i):
// the loop unrolls fully; NN = 0 falls back to dequant_groups
template <int BITS, int NN>
inline void dequant_row(const uint8_t* row, const float* s, const float* z, int D, int G, const int* gi, float* out) {
  if constexpr (NN > 0) {
#pragma GCC unroll 16
    for (int i = 0; i < NN; ++i)
      stn(out + i * WN, unpackn<BITS>(row, int64_t(i) * WN) * splatn(s[gi[i]]) + splatn(z[gi[i]]));
  } else {
    dequant_groups<BITS>(row, s, z, D, G, out);
  }
}

// ---- int8 QK (DecodeAttentionArgs::qk_int8) ---------------------------------------------------------------------
// A packed key row holds channel PL·j + c (PL = 8 / BITS codes per byte) in bits BITS·c of byte j.  It is unpacked
// into PL planes of P = D·BITS/8 bytes, plane c holding channels PL·j + c: a shift and a mask per plane, the same
// instructions on every ISA.  The dot product does not care about the channel order as long as the int8 query row
// uses the same one, so the query rows and the key group's scales / zeros are brought into it instead.  Plane c sits
// at slot brev(c) (its log2(PL) bits reversed): that order is log2(PL) rounds of "evens first, then odds", which
// vector shuffles do in a few instructions per 32 floats.
constexpr int kPadBytes = 64;  // rows of codes / int8 queries padded with zeros to whole 64-byte vectors

inline int plane_slot(int c, int bits) {  // brev(c) over log2(8 / bits) bits
  int r = 0;
  for (int pl = 8 / bits; pl > 1; pl >>= 1, c >>= 1) r = (r << 1) | (c & 1);
  return r;
}

inline int plane_pos(int d, int D, int bits) {  // where channel d lands in the unpacked row
  const int pl = 8 / bits;
  return plane_slot(d % pl, bits) * (D * bits / 8) + d / pl;
}

// PB: plane bytes D·BITS/8 known at compile time (0: run time).  Inlined with it known, a short plane (D·BITS < 256,
// e.g. head_dim 64 at 2 bits) takes one 16-byte operation; called per token with it unknown, the planes took a byte
// loop behind a dozen branches, and qk_int8 ran at 0.66x the exact kernel at head_dim 64.
template <int BITS, int PB = 0>
inline __attribute__((always_inline)) void unpack_planes(const uint8_t* row, int D, uint8_t* out) {
  constexpr int PL = 8 / BITS;
  constexpr uint8_t M = uint8_t((1u << BITS) - 1);
  typedef uint8_t v32b __attribute__((vector_size(32)));
  typedef uint8_t v16b __attribute__((vector_size(16)));
  const int P = PB ? PB : D * BITS / 8;
#pragma GCC unroll 8
  for (int c = 0; c < PL; ++c) {
    uint8_t* o = out + plane_slot(c, BITS) * P;
    int j = 0;
    for (; j + 32 <= P; j += 32) {
      v32b x;
      std::memcpy(&x, row + j, 32);
      x = (x >> uint8_t(BITS * c)) & M;
      std::memcpy(o + j, &x, 32);
    }
    for (; j + 16 <= P; j += 16) {
      v16b x;
      std::memcpy(&x, row + j, 16);
      x = (x >> uint8_t(BITS * c)) & M;
      std::memcpy(o + j, &x, 16);
    }
    for (; j < P; ++j) o[j] = uint8_t((row[j] >> (BITS * c)) & M);
  }
}

// out[i] = in[2i], out[n/2 + i] = in[2i + 1] (n a multiple of 2·WN)
inline void deinterleave(const float* in, float* out, int n) {
  for (int k = 0; 2 * k * WN < n; ++k) {
    const vn a = ldn(in + 2 * k * WN), b = ldn(in + 2 * k * WN + WN);
#if defined(__AVX512F__)
    stn(out + k * WN, __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30));
    stn(out + n / 2 + k * WN,
        __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
#else
    stn(out + k * WN, __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14));
    stn(out + n / 2 + k * WN, __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15));
#endif
  }
}

// x rounded to the nearest integer, ties to even (an instruction, so that no multiply is fused into it)
inline vn round_even(vn x) {
#if defined(__AVX512F__)
  // (the maskz form: the plain one reads an "undefined" register, which GCC 12 warns about)
  return (vn)_mm512_maskz_roundscale_ps(__mmask16(0xFFFF), (__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  return (vn)_mm256_round_ps((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
}

// out = in (D floats) in plane order; tmp: D floats of scratch; pos: plane_pos of every channel
inline void to_planes(const float* in, float* out, float* tmp, int D, int bits, const int* pos) {
  int rounds = 0;
  for (int pl = 8 / bits; pl > 1; pl >>= 1) ++rounds;
  if ((D >> (rounds - 1)) % (2 * WN)) {  // segments too short for whole vectors
    for (int d = 0; d < D; ++d) out[pos[d]] = in[d];
    return;
  }
  // alternate between out and tmp so that the last round writes out
  float* bufs[2] = {rounds % 2 ? out : tmp, rounds % 2 ? tmp : out};
  const float* src = in;
  for (int l = 0; l < rounds; ++l) {
    float* dst = bufs[l % 2];
    const int n = D >> l;
    for (int s0 = 0; s0 < D; s0 += n) deinterleave(src + s0, dst + s0, n);
    src = dst;
  }
}

// out[i] = Σ_d k[i·ks + d] · q[d] (d < Dp, a multiple of 64; codes < 16, so vpmaddubsw's int16 pairs never
// saturate), i < 4: exact integers, returned as floats
inline void dot4_u8s8(const uint8_t* k, int64_t ks, const int8_t* q, int Dp, float* out) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (int i = 0; i < Dp; i += 64) {
    const __m512i qv = _mm512_loadu_si512(q + i);
    a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(k + i), qv);
    a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(k + ks + i), qv);
    a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512(k + 2 * ks + i), qv);
    a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512(k + 3 * ks + i), qv);
  }
  hsum4n(__builtin_convertvector((vi)a0, vn), __builtin_convertvector((vi)a1, vn),
         __builtin_convertvector((vi)a2, vn), __builtin_convertvector((vi)a3, vn), out);
#elif defined(__AVX2__)
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  auto step = [&](__m256i acc, const uint8_t* kp, __m256i qv) {
    const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(kv, qv), ones));
  };
  for (int i = 0; i < Dp; i += 32) {
    const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i));
    a0 = step(a0, k + i, qv);
    a1 = step(a1, k + ks + i, qv);
    a2 = step(a2, k + 2 * ks + i, qv);
    a3 = step(a3, k + 3 * ks + i, qv);
  }
  typedef int32_t v8i __attribute__((vector_size(32)));
  typedef float v8f __attribute__((vector_size(32)));
  const auto f = [](__m256i x) {  // 8 sums as a native vector (AVX-512 without VNNI: the upper half 0)
    const v8f h = __builtin_convertvector((v8i)x, v8f);
    vn r = {};
    std::memcpy(&r, &h, sizeof h);
    return r;
  };
  hsum4n(f(a0), f(a1), f(a2), f(a3), out);
#else
  for (int i = 0; i < 4; ++i) {
    int32_t x = 0;
    for (int d = 0; d < Dp; ++d) x += int32_t(k[i * ks + d]) * int32_t(q[d]);
    out[i] = float(x);
  }
#endif
}

struct State : detail::BlockState {  // + the dequantization metadata of one block
  simd::lvector<float> meta;
  // int8 QK: query rows [R][Dp] (plane order), their scales σ and zero-point terms, the block's codes [BT][Dp]
  simd::lvector<int8_t> q8;
  simd::lvector<uint8_t> kc8;
  simd::lvector<float> qsig, qoff, qbias, qp, perm;  // + the query rows and one key group's scale / zero in plane order
  std::vector<int> pos;                        // channel d -> its place in plane order
  int Dp = 0;
  void init(int rows, int d) {
    BlockState::init(rows, d);
    meta.resize(2 * size_t(d) + 4 * size_t(BT) * (d / 16));  // K rows | V per token | K per token
  }
  void init_int8(int rows, int d, int bits) {
    Dp = (d + kPadBytes - 1) / kPadBytes * kPadBytes;
    q8.assign(size_t(rows) * Dp, 0);
    kc8.assign(size_t(BT) * Dp, 0);
    qsig.assign(rows, 0.f);
    qbias.assign(rows, 0.f);
    qoff.assign(rows, 0.f);
    pos.resize(d);
    for (int i = 0; i < d; ++i) pos[i] = plane_pos(i, d, bits);
    perm.resize(3 * size_t(d));
    qp.resize(size_t(rows) * d);
    for (int r = 0; r < rows; ++r)
      to_planes(q.data() + size_t(r) * d, qp.data() + size_t(r) * d, perm.data(), d, bits, pos.data());
  }
};

struct Ctx {
  const DecodeAttentionArgs* a;
  int g;          // query heads per KV head
  int R;          // rows = g * Tq
  int64_t chunk;  // tokens per work item
  int64_t nchunks;
  float* part;    // [B, Hkv, nchunks, R, D + 2]
  bool sparse = false;  // a.indices given: chunks split the index list, not the context
};

template <int BK, int BV>
class Worker {
 public:
  Worker(const Ctx& c) : c_(c), a_(*c.a) {}

  void run(int64_t item, State& st) {
    if (c_.sparse) return run_sparse(item, st);
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
    const char* vfp = static_cast<const char*>(a.v_fp) + (b * a.Hkv + h) * a.f_cap * a.D * esz;
    fp_range(st, kf, vfp, 0, ns, 0, c0, c1);                        // sinks: logical [0, ns)
    quant_range(st, b, h, ns, nq, c0, c1);                          // quantized: logical [ns, ns + nq)
    fp_range(st, kf, vfp, ns, nr, int64_t(ns) + nq, c0, c1);        // recent: logical [ns + nq, N)
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

  // retrieval: the positions indices[b, h, c0 .. c1) of this chunk, gathered (dequantized) 32 at a time
  void run_sparse(int64_t item, State& st) {
    const DecodeAttentionArgs& a = a_;
    const int64_t ck = item % c_.nchunks, bh = item / c_.nchunks, b = bh / a.Hkv, h = bh % a.Hkv;
    const int32_t ns = a.lens[b * 3], nq = a.lens[b * 3 + 1], nr = a.lens[b * 3 + 2];
    const int64_t N = int64_t(ns) + nq + nr;
    float* out = c_.part + item * int64_t(c_.R) * (a.D + 2);
    const int64_t c0 = ck * c_.chunk, c1 = std::min(a.n_idx, c0 + c_.chunk);
    st.init(c_.R, int(a.D));
    if (c0 < c1) {
      load_queries(b, h, st);
      N_ = std::numeric_limits<int64_t>::max() / 4;  // nothing is masked: every selected position is visible
      const int32_t* ix = a.indices + bh * a.n_idx;
      // each token is a handful of lines in separate arrays (codes, per-group key metadata, value metadata) and its
      // dequantization keeps the core busy, so without a look-ahead the misses of consecutive tokens do not overlap
      for (int64_t i = c0; i < std::min(c1, c0 + kLookAhead); ++i) prefetch_token(b, h, ns, nq, N, ix[i]);
      int nt = 0;
      for (int64_t i = c0; i < c1; ++i) {
        if (i + kLookAhead < c1) prefetch_token(b, h, ns, nq, N, ix[i + kLookAhead]);
        const int64_t pos = ix[i];
        if (pos < 0 || pos >= N) continue;
        load_token(b, h, ns, nq, pos, st, st.kblk.data() + size_t(nt) * a.D, st.vblk.data() + size_t(nt) * a.D);
        if (++nt == BT) {
          process_block(st, 0, nt);
          nt = 0;
        }
      }
      if (nt) process_block(st, 0, nt);
    }
    for (int r = 0; r < c_.R; ++r) {  // an empty chunk keeps m = -inf, l = 0: weight 0 in the merge
      out[r * (a.D + 2)] = st.m[r];
      out[r * (a.D + 2) + 1] = st.l[r];
      std::memcpy(out + r * (a.D + 2) + 2, st.acc.data() + size_t(r) * a.D, a.D * sizeof(float));
    }
  }

  static constexpr int kLookAhead = 4;  // tokens whose lines are requested ahead of their use (run_sparse)

  // the lines load_token(pos) will read
  void prefetch_token(int64_t b, int64_t h, int64_t ns, int64_t nq, int64_t N, int64_t pos) const {
    const DecodeAttentionArgs& a = a_;
    if (pos < 0 || pos >= N) return;
    const int64_t D = a.D, esz = dtype_size(a.dtype), msz = dtype_size(a.meta_dtype), bh = b * a.Hkv + h;
    if (pos < ns || pos >= ns + nq) {
      const int64_t slot = pos < ns ? pos : pos - nq;
      prefetch(static_cast<const char*>(a.k_fp) + (bh * a.f_cap + slot) * D * esz, D * esz);
      prefetch(static_cast<const char*>(a.v_fp) + (bh * a.f_cap + slot) * D * esz, D * esz);
      return;
    }
    const int64_t j = pos - ns, gpr = D / a.v_group;
    prefetch(a.k_codes + (bh * a.q_cap + j) * (D * BK / 8), D * BK / 8);
    prefetch(a.v_codes + (bh * a.q_cap + j) * (D * BV / 8), D * BV / 8);
    const int64_t km = a.k_per_token ? (bh * a.q_cap + j) * (D / a.k_group)
                                     : (bh * (a.q_cap / a.k_group) + j / a.k_group) * D;
    const int64_t kn = a.k_per_token ? D / a.k_group : D;
    prefetch(static_cast<const char*>(a.k_scale) + km * msz, kn * msz);
    prefetch(static_cast<const char*>(a.k_zero) + km * msz, kn * msz);
    prefetch(static_cast<const char*>(a.v_scale) + (bh * a.q_cap + j) * gpr * msz, gpr * msz);
    prefetch(static_cast<const char*>(a.v_zero) + (bh * a.q_cap + j) * gpr * msz, gpr * msz);
  }

  // K and V rows (fp32) of logical position pos: a sink / recent slot, or a packed token dequantized as quant_range
  // does (the same fp32 operations)
  void load_token(int64_t b, int64_t h, int64_t ns, int64_t nq, int64_t pos, State& st, float* kd, float* vd) {
    const DecodeAttentionArgs& a = a_;
    const int D = int(a.D), esz = dtype_size(a.dtype), msz = dtype_size(a.meta_dtype);
    const int64_t bh = b * a.Hkv + h;
    if (pos < ns || pos >= ns + nq) {
      const int64_t slot = pos < ns ? pos : pos - nq;  // recent tokens follow the sinks in the fp segment
      const char* kf = static_cast<const char*>(a.k_fp) + ((bh * a.f_cap + slot) * D) * esz;
      const char* vf = static_cast<const char*>(a.v_fp) + ((bh * a.f_cap + slot) * D) * esz;
      detail::load_row(kf, a.dtype, D, nullptr, kd);
      detail::load_row(vf, a.dtype, D, nullptr, vd);
      return;
    }
    const int64_t j = pos - ns;
    const int G = a.k_group, VG = a.v_group, nn = D / WN, gpr = D / VG;
    const uint8_t* krow = a.k_codes + (bh * a.q_cap + j) * (D * BK / 8);
    const uint8_t* vrow = a.v_codes + (bh * a.q_cap + j) * (D * BV / 8);
    float* ks = st.meta.data();
    float* kz = ks + D;
    float* vs = kz + D;
    float* vz = vs + gpr;
    if (a.k_per_token) {
      const int gpk = D / G;
      const int64_t m0 = (bh * a.q_cap + j) * gpk;
      detail::load_row(static_cast<const char*>(a.k_scale) + m0 * msz, a.meta_dtype, gpk, nullptr, ks);
      detail::load_row(static_cast<const char*>(a.k_zero) + m0 * msz, a.meta_dtype, gpk, nullptr, kz);
      dequant_groups<BK>(krow, ks, kz, D, G, kd);
    } else {
      const int64_t m0 = (bh * (a.q_cap / G) + j / G) * D;
      detail::load_row(static_cast<const char*>(a.k_scale) + m0 * msz, a.meta_dtype, D, nullptr, ks);
      detail::load_row(static_cast<const char*>(a.k_zero) + m0 * msz, a.meta_dtype, D, nullptr, kz);
      for (int i = 0; i < nn; ++i)
        stn(kd + i * WN, unpackn<BK>(krow, int64_t(i) * WN) * ldn(ks + i * WN) + ldn(kz + i * WN));
    }
    const int64_t v0 = (bh * a.q_cap + j) * gpr;
    detail::load_row(static_cast<const char*>(a.v_scale) + v0 * msz, a.meta_dtype, gpr, nullptr, vs);
    detail::load_row(static_cast<const char*>(a.v_zero) + v0 * msz, a.meta_dtype, gpr, nullptr, vz);
    dequant_groups<BV>(vrow, vs, vz, D, VG, vd);
  }

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

  // One block of nt (<= BT) tokens at logical positions p0.. whose K and V rows are in st.kblk / st.vblk (fp32):
  // scores, causal mask, online-softmax update and P·V for every query row (splitk.h)
  void process_block(State& st, int64_t p0, int nt) { detail::attend_block(st, p0, nt, N_, a_.Tq); }

  // int8 QK: per query row, q' = q·k_scale (q holds softmax_scale already) rounded to int8, its scale
  // σ = max|q'| / 127 and the zero-point term Σ q·k_zero, for the key group whose scale / zero rows are ks / kz.
  // Everything in plane order (st.qp: the query rows permuted once per work item).
  void quantize_queries(State& st, const float* ks, const float* kz) const {
    const int D = int(a_.D), nn = D / WN;
    const float mid = float((1 << a_.bits_k) - 1) / 2;  // codes are centered: (code − mid) ∈ [−mid, mid]
    float* ksp = st.perm.data();
    to_planes(ks, ksp, ksp + D, D, a_.bits_k, st.pos.data());
    for (int r = 0; r < c_.R; ++r) {
      const float* q = st.qp.data() + size_t(r) * D;
      const float* qn = st.q.data() + size_t(r) * D;  // the zero-point term does not need the plane order
      vn amax = {}, bias = {};
      for (int i = 0; i < nn; ++i) {
        const vn x = ldn(q + i * WN) * ldn(ksp + i * WN);
        const vn ax = x < 0 ? -x : x;
        amax = ax > amax ? ax : amax;
        bias += ldn(qn + i * WN) * (ldn(kz + i * WN) + splatn(mid) * ldn(ks + i * WN));
      }
      const float am = hmaxn(amax);
      const float inv = am > 0.f ? 127.f / am : 0.f;
      int8_t* q8 = st.q8.data() + size_t(r) * st.Dp;
      vni isum = {};
      for (int i = 0; i < nn; ++i) {
        const vn x = (ldn(q + i * WN) * ldn(ksp + i * WN)) * splatn(inv);  // two roundings, as the reference
        const vni v = __builtin_convertvector(round_even(x), vni);
        isum += v;
        typedef int8_t v8 __attribute__((vector_size(WN)));
        const v8 b = __builtin_convertvector(v, v8);
        std::memcpy(q8 + i * WN, &b, WN);
      }
      const float is = hsumn(__builtin_convertvector(isum, vn));  // exact: |Σ q8| <= 127·256
      st.qsig[r] = am / 127.f;
      st.qoff[r] = mid * is;  // exact (a multiple of 1/2 below 2^24)
      st.qbias[r] = hsumn(bias);
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
        detail::load_row(kf + (slot0 + t) * D * esz, a.dtype, D, nullptr, st.kblk.data() + size_t(t) * D);
        detail::load_row(vfp + (slot0 + t) * D * esz, a.dtype, D, nullptr, st.vblk.data() + size_t(t) * D);
      }
      process_block(st, p0, nt);
    }
  }

  // packed tokens: with per-channel keys blocks never straddle a K group, so one per-channel scale/zero serves the
  // whole block; per-token keys (and values) take their scale/zero per token and channel group
  void quant_range(State& st, int64_t b, int64_t h, int64_t ns, int64_t nq, int64_t c0, int64_t c1) {
    switch (a_.D / WN) {  // the dequantization loops unrolled for the common head sizes
#if defined(__AVX512F__)
      case 4: return quant_range_nn<4>(st, b, h, ns, nq, c0, c1);   // D = 64
      case 8: return quant_range_nn<8>(st, b, h, ns, nq, c0, c1);   // D = 128
#else
      case 8: return quant_range_nn<8>(st, b, h, ns, nq, c0, c1);   // D = 64
      case 16: return quant_range_nn<16>(st, b, h, ns, nq, c0, c1); // D = 128
#endif
      default: return quant_range_nn<0>(st, b, h, ns, nq, c0, c1);
    }
  }

  // NN = D / WN native vectors per row (0: known at run time only)
  template <int NN>
  void quant_range_nn(State& st, int64_t b, int64_t h, int64_t ns, int64_t nq, int64_t c0, int64_t c1) {
    const DecodeAttentionArgs& a = a_;
    const int64_t lo = std::max(ns, c0), hi = std::min(ns + nq, c1);
    if (lo >= hi) return;
    const bool ktok = a.k_per_token;
    const int D = int(a.D), G = a.k_group, VG = a.v_group, nn = NN ? NN : D / WN;
    // the channel group of each native vector (groups are whole vectors), for the unrolled per-token dequantization
    int vgi[NN ? NN : 1], kgi[NN ? NN : 1];
    for (int i = 0; i < (NN ? NN : 0); ++i) {
      vgi[i] = i * WN / VG;
      kgi[i] = i * WN / G;
    }
    const int64_t bh = b * a.Hkv + h;
    const int64_t krow_bytes = D * BK / 8, vrow_bytes = D * BV / 8;
    const uint8_t* kc = a.k_codes + bh * a.q_cap * krow_bytes;
    const uint8_t* vc = a.v_codes + bh * a.q_cap * vrow_bytes;
    const int64_t kmeta0 = ktok ? bh * a.q_cap * (D / G) : bh * (a.q_cap / G) * D, vmeta0 = bh * a.q_cap * (D / VG);
    const int msz = dtype_size(a.meta_dtype);
    float* ks = st.meta.data();
    float* kz = st.meta.data() + D;
    int64_t cur_group = -1;
    const bool i8 = BK <= 4 && a.qk_int8 && !ktok;  // int8 QK on the packed keys
    if (i8) st.init_int8(c_.R, D, BK);
    for (int64_t p0 = lo; p0 < hi;) {
      const int64_t j0 = p0 - ns;  // index in the quantized segment
      const int64_t gid = ktok ? 0 : j0 / G;
      const int64_t glim = ktok ? hi - p0 : (gid + 1) * G + ns - p0;
      const int nt = int(std::min<int64_t>({int64_t(BT), hi - p0, glim}));
      // this block's per-token scales / zeros (V, and K when per token), converted to fp32 in one pass each
      const int gpr = D / VG, gpk = ktok ? D / G : 0;
      float* vs = st.meta.data() + 2 * D;
      float* vz = vs + BT * gpr;
      detail::load_row(static_cast<const char*>(a.v_scale) + (vmeta0 + j0 * gpr) * msz, a.meta_dtype,
                       int64_t(nt) * gpr, nullptr, vs);
      detail::load_row(static_cast<const char*>(a.v_zero) + (vmeta0 + j0 * gpr) * msz, a.meta_dtype,
                       int64_t(nt) * gpr, nullptr, vz);
      float* kts = vz + BT * gpr;  // per-token K scales / zeros [nt][gpk] (gpk <= D / 16)
      float* ktz = kts + BT * gpk;
      if (ktok) {
        detail::load_row(static_cast<const char*>(a.k_scale) + (kmeta0 + j0 * gpk) * msz, a.meta_dtype,
                         int64_t(nt) * gpk, nullptr, kts);
        detail::load_row(static_cast<const char*>(a.k_zero) + (kmeta0 + j0 * gpk) * msz, a.meta_dtype,
                         int64_t(nt) * gpk, nullptr, ktz);
      } else if (gid != cur_group) {
        cur_group = gid;
        detail::load_row(static_cast<const char*>(a.k_scale) + (kmeta0 + gid * D) * msz, a.meta_dtype, D, nullptr,
                         ks);
        detail::load_row(static_cast<const char*>(a.k_zero) + (kmeta0 + gid * D) * msz, a.meta_dtype, D, nullptr,
                         kz);
        if (i8) quantize_queries(st, ks, kz);
      }
      // dequantize in registers, k̂ = code·scale + zero / v̂ likewise — the same fp32 operations as dequantize
      if (i8) {
        if constexpr (BK <= 4) {
          for (int t = 0; t < nt; ++t)
            unpack_planes<BK, NN * WN * BK / 8>(kc + (j0 + t) * krow_bytes, D, st.kc8.data() + size_t(t) * st.Dp);
          for (int r = 0; r < c_.R; ++r) {  // scores σ·(q8 · (codes − mid)) + q·(zero + mid·scale)
            float* sr = st.s.data() + size_t(r) * BT;
            const int8_t* qr = st.q8.data() + size_t(r) * st.Dp;
            for (int t = 0; t < nt; t += 4) dot4_u8s8(st.kc8.data() + size_t(t) * st.Dp, st.Dp, qr, st.Dp, sr + t);
            const float sg = st.qsig[r], off = st.qoff[r], bs = st.qbias[r];
            for (int t = 0; t < nt; ++t) sr[t] = (sr[t] - off) * sg + bs;  // sr − off: exact
          }
        }
      }
      for (int t = 0; t < nt; ++t) {
        const uint8_t* vrow = vc + (j0 + t) * vrow_bytes;
        float* vd = st.vblk.data() + size_t(t) * D;
        dequant_row<BV, NN>(vrow, vs + t * gpr, vz + t * gpr, D, VG, vgi, vd);
        if (i8) continue;
        const uint8_t* krow = kc + (j0 + t) * krow_bytes;
        float* kd = st.kblk.data() + size_t(t) * D;
        if (ktok) {
          dequant_row<BK, NN>(krow, kts + t * gpk, ktz + t * gpk, D, G, kgi, kd);
        } else {
#pragma GCC unroll 16
          for (int i = 0; i < nn; ++i)
            stn(kd + i * WN, unpackn<BK>(krow, int64_t(i) * WN) * ldn(ks + i * WN) + ldn(kz + i * WN));
        }
      }
      if (i8)
        detail::attend_block<false>(st, p0, nt, N_, a_.Tq);
      else
        process_block(st, p0, nt);
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
  c.sparse = a.sparse;
  if (c.sparse) maxN = a.n_idx;  // split the index list instead of the context
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
  detail::merge_splits(part.data(), a.B, a.Hkv, a.Hq, a.Tq, a.D, nchunks, a.dtype, a.out);
}

}  // namespace kvengine
