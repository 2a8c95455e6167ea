// kvengine — 1-bit QK attention (BinaryAttention) on the CPU; semantics in kvengine/binary_attention.h.
//
// sign_pack_cpu: per-channel means over the token axis in fp64 (when centering), then one pass per row: the sign
// bits of 32 channels into one uint32 word, mean |x| into the scale.
//
// binary_attention_cpu: flash-attention style, never materializing Lq × Lk. Keys are processed in blocks of BT (64;
// AVX2: 256) in one layout (KeyBlock): the sign words block-transposed, [D/32][BT] (zero padded), so that one
// 16-lane vector holds word w of 16 consecutive keys; D·β_j, −2·β_j and the block's D · max β; V as an fp32 panel
// (per chunk of 64 channels, 16 with AVX2, the chunk's keys contiguous). The relative-position table is reversed
// (index increasing with the key) and ×log2 e. Two ways to cut the work (use_split):
//   tile path   work item (b, query head, tile of 128 query rows); a pre-pass lays out every key block of every
//               KV head once, since each of the head's tiles reads them all.
//   split path  when the g·Lq query rows of a GQA group fit one item (decode, short queries): work item (b, KV
//               head, chunk of keys) with the rows of every query head of the group, each block laid out where it
//               is used (L1/L2) — no pre-pass, K and V read once per group — and the chunks merged by
//               log-sum-exp (splitk.h). Decode went from the pre-pass's three passes over V per call plus one per
//               query head to one (docs/performance.md).
//   per block, for each of the item's query rows (packed into sign words, a_i = α_i · softmax_scale · log2 e):
//     score    16 keys at a time: pc = Σ_w popcount(q_w XOR k_w) (AVX-512 VPOPCNTD where available; AVX2: byte
//              counts by a nibble table summed over the words, then per lane; the word loop unrolled for
//              D = 32/64/128/256), t = pc·(−2β) + Dβ, s = a_i · t + log2 e · bias (dense and/or
//              relative), causal / range mask (only in chunks that cross the last visible key)
//     softmax  online, in base 2 (exp2 by a degree-5 polynomial and VSCALEFPS), the denominator kept as 16 partial
//              sums. Without a bias, once a row has a running max m, a block whose bound |a_i|·D·max β is at most
//              m + 64 takes one pass: p = 2^(a_i·t − m) (≤ 2^64, no block max, no rescale, scores never stored);
//              otherwise (first block, biases, outliers) block max, rescale α (exp2 skipped when the max did not
//              move), p.
//     P·V      fp32, a 4-row × 64-channel register tile (16 accumulators; AVX2: 6 rows × 16 channels) over the
//              block's keys; the V chunk (one panel, BT keys × 64 channels) stays in L1 across the row groups of
//              the tile. 128 rows per tile (was 16)
//              because each tile streams the head's whole V (2 MiB at L = 4K, D = 128) through L2/L3: at 16 rows
//              that stream, not the FMAs, set the speed on a 2 MiB-L2 Xeon (docs/performance.md).
//   A row with no visible key (causal with Lq > Lk, or a bias of −inf everywhere) outputs 0.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

#include "kvengine/binary_attention.h"
#include "kvengine/parallel.h"
#include "rowio.h"
#include "simd.h"
#include "splitk.h"

namespace kvengine {
namespace {

using namespace simd;
// keys per block: 64 with AVX-512; 256 with AVX2, where the per-block costs (P·V accumulator tiles loaded, scaled
// and stored, per-row setup of the score loop) measured 8–10 % of the time at 64 keys (docs/performance.md)
constexpr int BT = simd::WN == 16 ? 64 : 256;
constexpr int RQ = 128;  // query rows per work item
// query rows per P·V register tile: 4 × 64 channels with AVX-512 (16 of 32 registers), 6 × 16 channels with AVX2
// (12 of 16 registers, the classic AVX2 GEMM tile: enough independent FMAs to hide their latency)
constexpr int RG = simd::WN == 16 ? 4 : 6;
constexpr int RQP = (RQ + RG - 1) / RG * RG;  // rows of the per-tile buffers (whole register tiles)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float NEG = -std::numeric_limits<float>::infinity();
constexpr float kSlack = 64.f;  // log2 units a block may exceed the running max by without a rescale
constexpr int kBiasAhead = 8;   // rows by which the dense bias is requested ahead (simd::prefetch)

#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2 popcount in two halves: the bit count of every byte (nibble table, VPSHUFB), and the four byte counts of each
// 32-bit lane summed (VPMADDUBSW + VPMADDWD). Byte counts of up to 31 words can be added before the second half.
inline __m256i popcnt_bytes(vnu x) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                       2, 3, 2, 3, 3, 4);
  const __m256i m4 = _mm256_set1_epi8(0x0f);
  const __m256i v = (__m256i)x;
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v, m4)),
                         _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4)));
}
inline vnu bytes_to_lanes(__m256i c) {
  return (vnu)_mm256_madd_epi16(_mm256_maddubs_epi16(c, _mm256_set1_epi8(1)), _mm256_set1_epi16(1));
}
#endif

// per-lane popcount of native vectors
inline vnu vpopcntn(vnu x) {
#if defined(__AVX512VPOPCNTDQ__) && defined(__AVX512F__)
  return (vnu)_mm512_popcnt_epi32((__m512i)x);
#elif defined(__AVX2__) && !defined(__AVX512F__)
  return bytes_to_lanes(popcnt_bytes(x));
#else
  vnu r;
  for (int i = 0; i < WN; ++i) r[i] = uint32_t(__builtin_popcount(x[i]));
  return r;
#endif
}

// 2^x for x <= 64 (scores minus the running max), exactly 0 for x < −126 (and −inf): round to the nearest integer n,
// 2^(x − n) by a degree-5 polynomial (relative-error minimax on [−1/2, 1/2], fitted by reweighted least squares:
// 9.2e-8 in exact arithmetic, < 2e-7 evaluated in fp32), then ·2^n with VSCALEFPS — about half the instructions of
// simd::vexp2, which it replaces only here.
// its coefficients, highest degree first
constexpr float kExp2Poly[6] = {1.3264701733242236e-3f, 9.671504598373026e-3f, 5.550733731208585e-2f,
                                2.4022242209729897e-1f, 6.931469776578078e-1f, 1.f};
inline vn exp2_fast(vn x) {
#if defined(__AVX512F__)
  const __m512 xv = _mm512_max_ps((__m512)x, _mm512_set1_ps(-127.f));
  const __m512 n = _mm512_roundscale_ps(xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xv, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  return (vn)_mm512_maskz_scalef_ps(keep, p, n);
#elif defined(__AVX2__) && defined(__FMA__)
  // the same polynomial; 2^n by building the exponent field (n >= −127, so n + 127 >= 0: 2^−127 becomes +0)
  const __m256 xv = _mm256_max_ps((__m256)x, _mm256_set1_ps(-127.f));
  const __m256 n = _mm256_round_ps(xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(xv, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return (vn)_mm256_and_ps(r, _mm256_cmp_ps((__m256)x, _mm256_set1_ps(-126.f), _CMP_GE_OQ));
#else
  return vexp2n(x);
#endif
}

// one row of D channels (fp32) -> D/32 sign words (bit j of word w: x[32w + j] < 0, so −0 and NaN give 0) + sum |x|
inline float pack_row(const float* x, int64_t D, uint32_t* bits) {
#if defined(__AVX512F__)
  __m512 s = _mm512_setzero_ps();
  for (int64_t w = 0; w < D / 32; ++w) {
    const __m512 a = _mm512_loadu_ps(x + w * 32), b = _mm512_loadu_ps(x + w * 32 + 16);
    const uint32_t lo = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_LT_OQ);
    const uint32_t hi = _mm512_cmp_ps_mask(b, _mm512_setzero_ps(), _CMP_LT_OQ);
    bits[w] = lo | hi << 16;
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  }
  return _mm512_reduce_add_ps(s);
#elif defined(__AVX2__)
  const __m256 z = _mm256_setzero_ps(), absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 s = z;
  for (int64_t w = 0; w < D / 32; ++w) {
    uint32_t word = 0;
    for (int q = 0; q < 4; ++q) {
      const __m256 v = _mm256_loadu_ps(x + w * 32 + q * 8);
      word |= uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(v, z, _CMP_LT_OQ))) << (8 * q);
      s = _mm256_add_ps(s, _mm256_and_ps(v, absm));
    }
    bits[w] = word;
  }
  return hsumn((vn)s);
#else
  float s = 0.f;
  for (int64_t w = 0; w < D / 32; ++w) {
    uint32_t word = 0;
    for (int j = 0; j < 32; ++j) {
      const float v = x[w * 32 + j];
      word |= uint32_t(v < 0.f) << j;
      s += std::fabs(v);
    }
    bits[w] = word;
  }
  return s;
#endif
}

// channels per P·V chunk: 64 with AVX-512 (4 native vectors), 16 with AVX2 (2); a last, narrower chunk of 32
// channels when D % 64 == 32 (AVX-512)
constexpr int CVN = WN == 16 ? 4 : 2;
constexpr int64_t kChunk = int64_t(CVN) * WN;

// acc[r][c0 .. c0 + WN·CV) = acc·alpha[r] + Σ_t p[r][t] · v[t][0 .. WN·CV), r < RG, t < nt, v the chunk's panel
// (nt rows of WN·CV contiguous floats). Native vectors: RG·CV accumulators stay in registers: 4 × 4 with AVX-512,
// 6 × 2 of the 16 AVX2 registers
template <int CV>
inline void pv_tile(float* acc, int64_t D, const float* p, const float* alpha, const float* v, int nt, int64_t c0) {
  vn a[RG][CV];
#pragma GCC unroll 6
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 6
    for (int c = 0; c < CV; ++c) a[r][c] = ldn(acc + r * D + c0 + c * WN) * splatn(alpha[r]);
  for (int t = 0; t < nt; ++t) {
    vn vv[CV];
    const float* vr = v + t * (CV * WN);
#pragma GCC unroll 6
    for (int c = 0; c < CV; ++c) vv[c] = ldn(vr + c * WN);
#pragma GCC unroll 6
    for (int r = 0; r < RG; ++r) {
      const vn pr = splatn(p[r * BT + t]);
#pragma GCC unroll 6
      for (int c = 0; c < CV; ++c) a[r][c] = fmaddn(pr, vv[c], a[r][c]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 6
    for (int c = 0; c < CV; ++c) stn(acc + r * D + c0 + c * WN, a[r][c]);
}

// One block of BT keys in the layout the score loop reads: sign words block-transposed ([nw][BT], word w of key t
// at kt[w·BT + t], zero past the block's nt keys), D·β and −2·β (0 past nt), D · max β (NaN if a β is NaN: that
// block takes the two-pass softmax), V as an fp32 panel (see Prep::vp), keys j0 .. j0 + nt.
struct KeyBlock {
  const uint32_t* kt = nullptr;
  const float *bd = nullptr, *bm2 = nullptr, *vp = nullptr;
  float dbmax = 0.f;
  int64_t j0 = 0;
  int nt = 0;
};

// keys [j, j + nt) of one (b, KV head): row-major sign words kb (nw per key) -> kt [nw][BT]; β -> bd, bm2; returns
// D · max β (NaN propagated)
inline float block_keys(const uint32_t* kb, const float* beta, int nt, int64_t nw, int64_t D, uint32_t* kt, float* bd,
                        float* bm2) {
  for (int t = 0; t < nt; ++t)
    for (int64_t w = 0; w < nw; ++w) kt[w * BT + t] = kb[t * nw + w];
  for (int t = nt; t < BT; ++t)
    for (int64_t w = 0; w < nw; ++w) kt[w * BT + t] = 0u;
  float mx = 0.f;
  for (int t = 0; t < BT; ++t) {
    const float bt = t < nt ? beta[t] : 0.f;
    bd[t] = float(D) * bt;
    bm2[t] = -2.f * bt;
    const float v = float(D) * bt;
    if (t < nt) mx = (std::isnan(mx) || std::isnan(v)) ? v + mx : std::max(mx, v);  // NaN stays
  }
  return mx;
}

// value rows [j, j + nt) of one (b, KV head) -> the block's fp32 panel (rows past nt are left as they are: never read)
inline void block_values(const BinaryAttentionArgs& a, int64_t b, int64_t hk, int64_t j, int nt, float* row, float* blk) {
  const int64_t D = a.D;
  const int ves = dtype_size(a.v_dtype);
  const char* vb = static_cast<const char*>(a.v) + (b * a.v_stride_b + hk * a.v_stride_h) * ves;
  for (int t = 0; t < nt; ++t) {
    const char* vr = vb + (j + t) * a.v_stride_t * ves;
    const float* src = row;
    if (a.v_dtype == DType::F32)
      src = reinterpret_cast<const float*>(vr);
    else
      detail::load_row(vr, a.v_dtype, D, nullptr, row);
    int64_t c0 = 0;
    for (; c0 + kChunk <= D; c0 += kChunk)  // a fixed-size copy (inlined), not a memmove call per chunk
      std::memcpy(blk + c0 * BT + t * kChunk, src + c0, size_t(kChunk) * sizeof(float));
    if (c0 < D)  // the narrower last chunk (AVX-512, D % 64 == 32)
      std::memcpy(blk + c0 * BT + t * (D - c0), src + c0, size_t(D - c0) * sizeof(float));
  }
}

struct Prep {  // the tile path's pre-pass: every key block of every (b, KV head), laid out once
  int64_t nblk = 0, nw = 0;
  lvector<uint32_t> kt;  // [B·Hkv][nblk][nw][BT]
  lvector<float> bd, bm2;  // [B·Hkv][nblk·BT]: D·β, −2·β (0 past Lk)
  std::vector<float> bmax;     // [B·Hkv][nblk]: D · max β of the block
  // V in fp32 panels: [B·Hkv][nblk][BT·D], within a block the channel chunk starting at c0 at offset c0·BT, its
  // keys' min(64, D − c0) channels (AVX2: 16) contiguous, one stream. With V's own rows (stride 4·D bytes) the 64
  // lines of a 16-channel chunk fell into 8 of the 64 sets of a 32 KiB L1 and were evicted by P
  // (docs/performance.md)
  lvector<float> vp;
  KeyBlock block(int64_t bhk, int64_t j0, int64_t Lk) const {
    const int64_t blk = j0 / BT;
    KeyBlock k;
    k.kt = kt.data() + (bhk * nblk + blk) * nw * BT;
    k.bd = bd.data() + bhk * nblk * BT + j0;
    k.bm2 = bm2.data() + bhk * nblk * BT + j0;
    k.vp = vp.data() + (bhk * nblk + blk) * BT * (nw * 32);
    k.dbmax = bmax[bhk * nblk + blk];
    k.j0 = j0;
    k.nt = int(std::min<int64_t>(BT, Lk - j0));
    return k;
  }
};

struct Tile {  // per-thread scratch of one work item: up to RQ query rows (of one head, or of a whole GQA group)
  lvector<float> qrow, a, m, lv, al, s, p, acc;  // lv: per-row softmax denominators, W partial sums each
  lvector<uint32_t> qw;
  std::vector<int64_t> rh, ri;  // row r: query head, query index
  // the split path's key block, laid out per block instead of by a pre-pass
  lvector<uint32_t> kt;
  lvector<float> bd, bm2, vp;
  void init(int64_t D, int64_t nw, bool split) {
    qrow.resize(D);
    a.resize(RQ);
    m.resize(RQ);
    lv.resize(size_t(RQ) * W);
    al.resize(RQP);
    s.resize(BT);
    p.resize(size_t(RQP) * BT);
    acc.resize(size_t(RQP) * D);
    qw.resize(size_t(RQ) * nw);
    rh.resize(RQ);
    ri.resize(RQ);
    if (split) {
      kt.resize(size_t(nw) * BT);
      bd.resize(BT);
      bm2.resize(BT);
      vp.resize(size_t(BT) * D);
    }
  }
};

// pack the item's R query rows (tl.rh, tl.ri) into sign words and a_i = α_i · softmax_scale · log2 e; reset the
// online-softmax state
void begin_rows(const BinaryAttentionArgs& a, int64_t b, int R, Tile& tl) {
  const int64_t D = a.D, nw = D / 32;
  const int Rp = (R + RG - 1) / RG * RG;
  const int qes = dtype_size(a.q_dtype);
  const float qmul = a.softmax_scale * kLog2e / float(D);
  for (int r = 0; r < R; ++r) {
    const char* src = static_cast<const char*>(a.q) + (b * a.q_stride_b + tl.rh[r] * a.q_stride_h + tl.ri[r] * a.q_stride_t) * qes;
    detail::load_row(src, a.q_dtype, D, nullptr, tl.qrow.data());
    tl.a[r] = pack_row(tl.qrow.data(), D, tl.qw.data() + r * nw) * qmul;
  }
  std::fill(tl.m.begin(), tl.m.end(), NEG);
  std::fill(tl.lv.begin(), tl.lv.end(), 0.f);
  std::fill(tl.acc.begin(), tl.acc.begin() + size_t(Rp) * D, 0.f);
  std::fill(tl.p.begin(), tl.p.end(), 0.f);  // rows >= R stay 0
}

// the item's R finished rows, normalized, into out[b, tl.rh[r], tl.ri[r], :] (0 for a row that saw no key)
void end_rows(const BinaryAttentionArgs& a, int64_t b, int R, Tile& tl) {
  const int64_t D = a.D;
  const int oes = dtype_size(a.v_dtype);
  for (int r = 0; r < R; ++r) {
    const float l = hsumn(ldn(tl.lv.data() + r * W));
    const float inv = l > 0.f ? 1.f / l : 0.f;
    char* dst = static_cast<char*>(a.out) + (((b * a.Hq + tl.rh[r]) * a.Lq + tl.ri[r]) * D) * oes;
    detail::store_row(tl.acc.data() + r * D, inv, a.v_dtype, D, dst);
  }
}

// one key block for the item's R rows: scores, online softmax, P·V. Keys at or past kend (the end of the item's
// key range) are invisible.
// NW: D/32 when it is 1, 2, 4 or 8 (the popcount loop unrolled, the query words broadcast once per row), else 0
template <int NW>
void attend_block(const BinaryAttentionArgs& a, int64_t b, const KeyBlock& kb, int64_t kend, int R, Tile& tl) {
  const int64_t D = a.D, nw = NW ? NW : D / 32;
  const int Rp = (R + RG - 1) / RG * RG;
  const int64_t shift = a.Lk - a.Lq;  // query i sits at key position i + shift
  const vni iota = iotan();
  const int64_t relc = (a.rel_len - 1) / 2;
  const bool biased = a.bias || a.rel_bias;
  const int64_t j0 = kb.j0;
  const uint32_t* kt = kb.kt;
  const float dbmax = kb.dbmax;  // D · max β over the block
  const float* bd = kb.bd;       // D · β
  const float* bm2 = kb.bm2;     // −2 · β
  for (int r = 0; r < R; ++r) {
    const int64_t h = tl.rh[r], i = tl.ri[r], pos = i + shift;
    const int64_t lim = std::min<int64_t>(kend - 1, a.causal ? pos : a.Lk - 1);  // last visible key
    float* p = tl.p.data() + r * BT;
    if (a.bias) {  // dense bias: 64 floats per row and block, rows far apart; requested kBiasAhead rows early
      const int rr = r + kBiasAhead;
      const int64_t jb = rr < R ? j0 : j0 + BT;
      if (jb < kend) {
        const int ru = rr % R;
        const float* nb = a.bias + b * a.bias_stride_b + tl.rh[ru] * a.bias_stride_h + tl.ri[ru] * a.bias_stride_i;
        prefetch(nb + jb, std::min<int64_t>(BT, a.Lk - jb) * int64_t(sizeof(float)));
      }
    }
    if (j0 > lim) {  // nothing visible in this block for this row
      std::memset(p, 0, BT * sizeof(float));
      tl.al[r] = 1.f;
      continue;
    }
    const uint32_t* qw = tl.qw.data() + r * nw;
    const vn ar = splatn(tl.a[r]);
    vnu qb[NW ? NW : 1];
    if constexpr (NW > 0)
      for (int w = 0; w < NW; ++w) qb[w] = splatnu(qw[w]);
    // t_j = β_j · (D − 2·popcount(q xor k_j)); the score is a_i · t_j (+ biases)
    auto t_of = [&](int c) {
      vnu pc = {};
      if constexpr (NW > 0) {
#if defined(__AVX2__) && !defined(__AVX512F__)
        __m256i cb = _mm256_setzero_si256();  // byte counts summed over the words (≤ 64 per byte)
#pragma GCC unroll 8
        for (int w = 0; w < NW; ++w) cb = _mm256_add_epi8(cb, popcnt_bytes(qb[w] ^ ldnu(kt + w * BT + c)));
        pc = bytes_to_lanes(cb);
#else
#pragma GCC unroll 8
        for (int w = 0; w < NW; ++w) pc += vpopcntn(qb[w] ^ ldnu(kt + w * BT + c));
#endif
      } else {
        for (int64_t w = 0; w < nw; ++w) pc += vpopcntn(splatnu(qw[w]) ^ ldnu(kt + w * BT + c));
      }
      return fmaddn(__builtin_convertvector((vni)pc, vn), ldn(bm2 + c), ldn(bd + c));
    };
    if (!biased && tl.m[r] != NEG && std::fabs(tl.a[r]) * dbmax <= tl.m[r] + kSlack) {
      // no score of the block can exceed the running max by more than kSlack: one pass, the max left as it is
      // (p <= 2^kSlack, finite and far from overflowing the fp32 sums)
      const vn nm = splatn(-tl.m[r]);
      vn sum = {};
      for (int c = 0; c < BT; c += WN) {
        vn e = exp2_fast(fmaddn(ar, t_of(c), nm));
        const int64_t jc = j0 + c;
        if (jc + WN - 1 > lim) e = (iota + int32_t(jc) > int32_t(lim)) ? vn{} : e;
        stn(p + c, e);
        sum += e;
      }
      stn(tl.lv.data() + r * W, ldn(tl.lv.data() + r * W) + sum);
      tl.al[r] = 1.f;
      continue;
    }
    float* s = tl.s.data();
    const float* brow = a.bias ? a.bias + b * a.bias_stride_b + h * a.bias_stride_h + i * a.bias_stride_i : nullptr;
    const float* relh = a.rel_bias ? a.rel_bias + h * a.rel_len : nullptr;  // reversed, × log2 e (see binary_attention_cpu)
    vn vmax = splatn(NEG);
    for (int c = 0; c < BT; c += WN) {
      vn sv = t_of(c) * ar;
      const int64_t jc = j0 + c;
      if (jc <= lim) {
        if (brow) {
          if (jc + WN <= a.Lk) {
            sv = fmaddn(ldn(brow + jc), splatn(kLog2e), sv);
          } else {
            for (int t = 0; t < WN && jc + t < a.Lk; ++t) sv[t] += brow[jc + t] * kLog2e;
          }
        }
        if (relh) {
          const float* rr = relh + relc - pos + jc;  // reversed table: index increases with j
          if (jc + WN <= a.Lk) {
            sv += ldn(rr);
          } else {
            for (int t = 0; t < WN && jc + t < a.Lk; ++t) sv[t] += rr[t];
          }
        }
      }
      if (jc + WN - 1 > lim) sv = (iota + int32_t(jc) > int32_t(lim)) ? splatn(NEG) : sv;
      stn(s + c, sv);
      vmax = vmax > sv ? vmax : sv;
    }
    const float bm = hmaxn(vmax);
    if (bm == NEG) {  // every visible key has a bias of −inf
      std::memset(p, 0, BT * sizeof(float));
      tl.al[r] = 1.f;
      continue;
    }
    const float mn = std::max(tl.m[r], bm);
    // the running max rarely moves after the first blocks: skip the scalar exp2 (a libm call) when it does not
    const float alpha = tl.m[r] == NEG ? 0.f : (tl.m[r] == mn ? 1.f : std::exp2(tl.m[r] - mn));
    vn sum = {};
    for (int c = 0; c < BT; c += WN) {
      const vn e = exp2_fast(ldn(s + c) - splatn(mn));
      stn(p + c, e);
      sum += e;
    }
    stn(tl.lv.data() + r * W, fmaddn(ldn(tl.lv.data() + r * W), splatn(alpha), sum));  // reduced at the end
    tl.m[r] = mn;
    tl.al[r] = alpha;
  }
  for (int r = R; r < Rp; ++r) tl.al[r] = 1.f;
  // P·V
  const float* vb = kb.vp;
  const int nt = kb.nt;
  int64_t c0 = 0;
  for (; c0 + kChunk <= D; c0 += kChunk)
    for (int r = 0; r < Rp; r += RG)
      pv_tile<CVN>(tl.acc.data() + r * D, D, tl.p.data() + r * BT, tl.al.data() + r, vb + c0 * BT, nt, c0);
  for (; c0 < D; c0 += 2 * WN)  // AVX-512: D % 64 == 32
    for (int r = 0; r < Rp; r += RG)
      pv_tile<2>(tl.acc.data() + r * D, D, tl.p.data() + r * BT, tl.al.data() + r, vb + c0 * BT, nt, c0);
}

// tile path: work item (b, query head, tile of RQ query rows) over the pre-pass's key blocks; writes out
template <int NW>
void run_tile(const BinaryAttentionArgs& a, const Prep& pr, int64_t item, Tile& tl) {
  const int64_t nqt = (a.Lq + RQ - 1) / RQ;
  const int64_t qt = item % nqt, bh = item / nqt, b = bh / a.Hq, h = bh % a.Hq;
  const int64_t bhk = b * a.Hkv + h / (a.Hq / a.Hkv);
  const int64_t i0 = qt * RQ;
  const int R = int(std::min<int64_t>(RQ, a.Lq - i0));
  for (int r = 0; r < R; ++r) {
    tl.rh[r] = h;
    tl.ri[r] = i0 + r;
  }
  begin_rows(a, b, R, tl);
  const int64_t kend = a.causal ? std::min<int64_t>(a.Lk, i0 + R + a.Lk - a.Lq) : a.Lk;
  for (int64_t j0 = 0; j0 < kend; j0 += BT) attend_block<NW>(a, b, pr.block(bhk, j0, a.Lk), kend, R, tl);
  end_rows(a, b, R, tl);
}

// split path (decode-shaped calls, g·Lq <= RQ): work item (b, KV head, chunk of keys) with the query rows of every
// head of the GQA group, so each key block is read from K / V once for the whole group; no pre-pass (each block is
// laid out in L1/L2 where it is used). Leaves the online-softmax state of each row in part (natural-log max, sum,
// unnormalized acc) for detail::merge_splits.
struct Split {
  int64_t chunk = 0, nchunks = 0;
  float* part = nullptr;  // [B·Hkv][nchunks][g·Lq][D + 2]
};

template <int NW>
void run_split(const BinaryAttentionArgs& a, const Split& sp, int64_t item, Tile& tl) {
  const int64_t ck = item % sp.nchunks, bhk = item / sp.nchunks, b = bhk / a.Hkv, hk = bhk % a.Hkv;
  const int64_t g = a.Hq / a.Hkv, D = a.D, nw = D / 32;
  const int R = int(g * a.Lq);
  for (int r = 0; r < R; ++r) {
    tl.rh[r] = hk * g + r / a.Lq;
    tl.ri[r] = r % a.Lq;
  }
  begin_rows(a, b, R, tl);
  const int64_t c0 = ck * sp.chunk, c1 = std::min<int64_t>(a.Lk, c0 + sp.chunk);
  for (int64_t j0 = c0; j0 < c1; j0 += BT) {
    KeyBlock kb;
    kb.j0 = j0;
    kb.nt = int(std::min<int64_t>(BT, c1 - j0));
    kb.dbmax = block_keys(a.k_bits + (bhk * a.Lk + j0) * nw, a.k_scale + bhk * a.Lk + j0, kb.nt, nw, D, tl.kt.data(),
                          tl.bd.data(), tl.bm2.data());
    block_values(a, b, hk, j0, kb.nt, tl.qrow.data(), tl.vp.data());
    kb.kt = tl.kt.data();
    kb.bd = tl.bd.data();
    kb.bm2 = tl.bm2.data();
    kb.vp = tl.vp.data();
    attend_block<NW>(a, b, kb, c1, R, tl);
  }
  if (sp.nchunks == 1) return end_rows(a, b, R, tl);  // the whole key range: no merge
  constexpr float kLn2 = 0.6931471805599453f;
  for (int r = 0; r < R; ++r) {
    float* o = sp.part + ((bhk * sp.nchunks + ck) * R + r) * (D + 2);
    o[0] = tl.m[r] * kLn2;  // base 2 -> natural log units
    o[1] = hsumn(ldn(tl.lv.data() + r * W));
    std::memcpy(o + 2, tl.acc.data() + r * D, size_t(D) * sizeof(float));
  }
}

}  // namespace

void sign_pack_cpu(const void* x, DType dtype, int64_t batch, int64_t L, int64_t D, int64_t x_stride_b,
                   int64_t x_stride_t, bool center, uint32_t* bits, float* scale) {
  if (batch <= 0 || L <= 0 || D <= 0) return;
  const int es = dtype_size(dtype);
  std::vector<float> mean;
  if (center) {
    mean.resize(size_t(batch) * D);
    parallel_for(batch, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> acc(D);
      std::vector<float> row(D);
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t t = 0; t < L; ++t) {
          detail::load_row(static_cast<const char*>(x) + (b * x_stride_b + t * x_stride_t) * es, dtype, D, nullptr,
                           row.data());
          for (int64_t c = 0; c < D; ++c) acc[c] += double(row[c]);
        }
        for (int64_t c = 0; c < D; ++c) mean[b * D + c] = float(acc[c] / double(L));
      }
    });
  }
  parallel_for(batch * L, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / L, t = r % L;
      detail::load_row(static_cast<const char*>(x) + (b * x_stride_b + t * x_stride_t) * es, dtype, D, nullptr,
                       row.data());
      if (center)
        for (int64_t c = 0; c < D; ++c) row[c] = row[c] - mean[b * D + c];
      scale[r] = pack_row(row.data(), D, bits + r * (D / 32)) / float(D);
    }
  });
}

// f(item, tile, std::integral_constant<int, NW>{}) for every item in [0, nitems) on the pool, one Tile per thread;
// NW = D / 32 when it is 1, 2, 4 or 8 (the unrolled popcount loops), else 0
template <class F>
void for_items(int64_t nitems, int64_t D, bool split, F&& f) {
  parallel_for(nitems, 1, [&](int64_t i0, int64_t i1) {
    Tile tl;
    tl.init(D, D / 32, split);
    for (int64_t i = i0; i < i1; ++i) {
      switch (D / 32) {
        case 1: f(i, tl, std::integral_constant<int, 1>{}); break;
        case 2: f(i, tl, std::integral_constant<int, 2>{}); break;
        case 4: f(i, tl, std::integral_constant<int, 4>{}); break;
        case 8: f(i, tl, std::integral_constant<int, 8>{}); break;
        default: f(i, tl, std::integral_constant<int, 0>{});
      }
    }
  });
}

// Which path a call takes: the split path when the rows of a GQA group fit one work item (g·Lq <= RQ: decode and
// short queries), else the tile path. KVENGINE_BINARY_CPU_SPLIT=0 / 1 forces the tile / split path (1 only where
// g·Lq <= RQ) — for tests and benchmarks.
static bool use_split(const BinaryAttentionArgs& a) {
  const bool fits = (a.Hq / a.Hkv) * a.Lq <= RQ;
  const char* e = std::getenv("KVENGINE_BINARY_CPU_SPLIT");
  if (e && *e) return fits && std::strcmp(e, "0") != 0;
  return fits;
}

void binary_attention_cpu(const BinaryAttentionArgs& args) {
  if (args.B <= 0 || args.Hq <= 0 || args.Lq <= 0 || args.D <= 0) return;
  BinaryAttentionArgs a = args;
  const int64_t D = a.D, nw = D / 32, BHk = a.B * a.Hkv;
  // the kernels read the relative-position table reversed (index increasing with the key) and × log2 e
  std::vector<float> rel;
  if (a.rel_bias) {
    rel.resize(size_t(a.Hq) * a.rel_len);
    for (int64_t h = 0; h < a.Hq; ++h)
      for (int64_t u = 0; u < a.rel_len; ++u)
        rel[h * a.rel_len + u] = a.rel_bias[h * a.rel_len + (a.rel_len - 1 - u)] * kLog2e;
    a.rel_bias = rel.data();
  }
  if (a.Lk <= 0) {  // no key at all: every row is 0
    std::memset(a.out, 0, size_t(a.B * a.Hq * a.Lq * D) * dtype_size(a.v_dtype));
    return;
  }
  if (use_split(a)) {
    // split the keys so that there are >= 64 work items when the context is long enough (>= 4 blocks each)
    Split sp;
    sp.nchunks = std::max<int64_t>(1, std::min<int64_t>((a.Lk + 4 * BT - 1) / (4 * BT), (64 + BHk - 1) / BHk));
    sp.chunk = ((a.Lk + sp.nchunks - 1) / sp.nchunks + BT - 1) / BT * BT;
    sp.nchunks = (a.Lk + sp.chunk - 1) / sp.chunk;
    const int64_t R = (a.Hq / a.Hkv) * a.Lq;
    std::vector<float> part(sp.nchunks > 1 ? size_t(BHk * sp.nchunks * R) * (D + 2) : 0);
    sp.part = part.data();
    for_items(BHk * sp.nchunks, D, true,
              [&](int64_t i, Tile& tl, auto nwc) { run_split<decltype(nwc)::value>(a, sp, i, tl); });
    if (sp.nchunks > 1) detail::merge_splits(part.data(), a.B, a.Hkv, a.Hq, a.Lq, D, sp.nchunks, a.v_dtype, a.out);
    return;
  }
  Prep pr;
  pr.nw = nw;
  pr.nblk = (a.Lk + BT - 1) / BT;
  pr.kt.resize(size_t(BHk) * pr.nblk * nw * BT);
  pr.bd.resize(size_t(BHk) * pr.nblk * BT);
  pr.bm2.resize(size_t(BHk) * pr.nblk * BT);
  pr.bmax.resize(size_t(BHk) * pr.nblk);
  pr.vp.resize(size_t(BHk) * pr.nblk * BT * D);  // not zeroed: keys past Lk are never read
  parallel_for(BHk, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> row(D);
    for (int64_t bh = h0; bh < h1; ++bh) {
      for (int64_t blk = 0; blk < pr.nblk; ++blk) {
        const int64_t j0 = blk * BT;
        const int nt = int(std::min<int64_t>(BT, a.Lk - j0));
        pr.bmax[bh * pr.nblk + blk] =
            block_keys(a.k_bits + (bh * a.Lk + j0) * nw, a.k_scale + bh * a.Lk + j0, nt, nw, D,
                       pr.kt.data() + (bh * pr.nblk + blk) * nw * BT, pr.bd.data() + bh * pr.nblk * BT + j0,
                       pr.bm2.data() + bh * pr.nblk * BT + j0);
        block_values(a, bh / a.Hkv, bh % a.Hkv, j0, nt, row.data(), pr.vp.data() + (bh * pr.nblk + blk) * BT * D);
      }
    }
  });
  const int64_t nitems = a.B * a.Hq * ((a.Lq + RQ - 1) / RQ);
  for_items(nitems, D, false, [&](int64_t i, Tile& tl, auto nwc) { run_tile<decltype(nwc)::value>(a, pr, i, tl); });
}

}  // namespace kvengine
