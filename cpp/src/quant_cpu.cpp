// kvengine — asymmetric group quantization + bit-packing on the CPU (optionally fused with the FWHT rotation).
// One task = one tile: the G rows of a per-channel group, or a run of rows for per-token groups.  Each tile is
// loaded (and rotated) into an fp32 buffer once, then quantized from it, 16 lanes per step with the scalar code's
// exact operations (IEEE division), so codes and metadata are bit-identical to the reference's formula:
// per-channel, lanes = channels (rows in order); per-token, 16 groups are gathered into the columns of a [G, 16]
// tile so that the same column search (tile_meta) finds their scales / zeros.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "kvengine/fwht.h"
#include "kvengine/parallel.h"
#include "kvengine/quant.h"
#include "rowio.h"
#include "simd.h"

namespace kvengine {
namespace {

// min / max that propagate NaN (as torch.amin / amax do): a NaN anywhere in a group makes its scale and zero NaN
inline float nan_min(float a, float b) { return (b < a || b != b) ? b : a; }
inline float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

inline float qmax_of(int bits) { return static_cast<float>((1 << bits) - 1); }

// code of one value; identical formula in reference.py and the CUDA kernels
inline uint8_t quant_code(float x, float s, float z, float qmax) {
  if (s == 0.0f) return 0;
  float c = std::floor((x - z) / s + 0.5f);
  if (!(c >= 0.0f)) c = 0.0f;  // also NaN -> 0 (a NaN group has NaN scale/zero, so it dequantizes to NaN anyway)
  if (c > qmax) c = qmax;
  return static_cast<uint8_t>(c);
}

// ---- native vectors (simd.h: 16 lanes with AVX-512, 8 with AVX2): the same arithmetic as quant_code, lane by lane
// (IEEE division, so the codes stay bit-identical to the reference's). Buffers are padded to W = 16 floats
// (the layout is the same in both builds); loops step WN.
using simd::vn;
using simd::vni;
using simd::WN;
constexpr int W = simd::W;

inline vn vfloor(vn x) {
#if defined(__AVX512F__)
  // the masked form (all lanes) takes its pass-through operand explicitly: GCC 12 warns on the plain one's
  // _mm512_undefined_ps()
  return (vn)_mm512_mask_roundscale_ps((__m512)x, 0xffff, (__m512)x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#elif defined(__AVX__)
  return (vn)_mm256_floor_ps((__m256)x);
#else
  for (int i = 0; i < WN; ++i) x[i] = std::floor(x[i]);
  return x;
#endif
}

// codes (as floats) of WN values
inline vn quant_coden(vn x, vn s, vn z, vn qmax) {
  vn c = vfloor((x - z) / s + 0.5f);
  c = c >= 0.0f ? c : vn{};  // also NaN -> 0
  c = c > qmax ? qmax : c;
  return s == 0.0f ? vn{} : c;
}

// lane-wise nan_min / nan_max
inline vn vnan_min(vn a, vn b) { return (b < a) | (b != b) ? b : a; }
inline vn vnan_max(vn a, vn b) { return (b > a) | (b != b) ? b : a; }

// WN codes (floats in [0, 255]) -> WN bytes
inline void store_codesn(vn c, uint8_t* out) {
  typedef uint8_t vnb __attribute__((vector_size(WN)));
  const vnb b = __builtin_convertvector(__builtin_convertvector(c, vni), vnb);
  std::memcpy(out, &b, sizeof b);
}

// Σ over the n values v[i·stride] of (code·s + z − v)², in order (fp32)
inline float group_sse(const float* v, int64_t n, int64_t stride, float s, float z, float qmax) {
  float e = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float x = v[i * stride];
    const float d = static_cast<float>(quant_code(x, s, z, qmax)) * s + z - x;
    e += d * d;
  }
  return e;
}

// scale / zero of one group with fp32 min/max lo/hi: min/max, or the best of `clip` range-search candidates
// (quant.h); sse(s, z) = the group's Σ (code·s + z − x)²
template <class Sse>
inline void group_meta(float lo, float hi, float qmax, DType md, int clip, Sse&& sse, float& s, float& z) {
  s = round_to((hi - lo) / qmax, md);
  z = round_to(lo, md);
  if (clip <= 1) return;
  float best = sse(s, z);
  if (!std::isfinite(best)) return;
  const float w = hi - lo;
  for (int c = 1; c < clip; ++c) {
    const float aw = clip_shrink(c) * w;
    const float l = lo + aw, h = hi - aw;
    const float sc = round_to((h - l) / qmax, md), zc = round_to(l, md);
    const float e = sse(sc, zc);
    if (e < best) {
      best = e;
      s = sc;
      z = zc;
    }
  }
}

// 8 one-byte codes (each < 2^BITS) in w (first code in the lowest byte) -> 8·BITS bits, first code lowest
template <int BITS>
inline uint64_t compact8(uint64_t w) {
  static_assert(BITS == 1 || BITS == 2 || BITS == 4);
  constexpr int S1 = 8 - BITS, S2 = 16 - 2 * BITS, S3 = 32 - 4 * BITS;
  constexpr uint64_t M1 = 0x0001000100010001ull * ((1ull << (2 * BITS)) - 1);
  constexpr uint64_t M2 = 0x0000000100000001ull * ((1ull << (4 * BITS)) - 1);
  constexpr uint64_t M3 = (1ull << (8 * BITS)) - 1;
  w = (w | (w >> S1)) & M1;
  w = (w | (w >> S2)) & M2;
  return (w | (w >> S3)) & M3;
}

template <int BITS>
inline void pack_codes_t(const uint8_t* c, int64_t D, uint8_t* out) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__);
  int64_t j = 0;
  for (; j + 8 <= D; j += 8) {
    uint64_t w;
    std::memcpy(&w, c + j, 8);
    const uint64_t p = compact8<BITS>(w);
    std::memcpy(out + j * BITS / 8, &p, BITS);
  }
  constexpr int per = 8 / BITS;
  for (int64_t jb = j / per; jb < D / per; ++jb) {
    uint32_t b = 0;
    for (int k = 0; k < per; ++k) b |= static_cast<uint32_t>(c[jb * per + k]) << (k * BITS);
    out[jb] = static_cast<uint8_t>(b);
  }
}

// pack D one-byte codes into D*bits/8 bytes (first element in the lowest bits)
inline void pack_codes(const uint8_t* c, int64_t D, int bits, uint8_t* out) {
  switch (bits) {
    case 8: std::memcpy(out, c, D); return;
    case 4: pack_codes_t<4>(c, D, out); return;
    case 2: pack_codes_t<2>(c, D, out); return;
    default: pack_codes_t<1>(c, D, out); return;
  }
}

// inverse of compact8: 8·BITS bits (first code lowest) -> 8 one-byte codes
template <int BITS>
inline uint64_t expand8(uint64_t p) {
  constexpr int S1 = 8 - BITS, S2 = 16 - 2 * BITS, S3 = 32 - 4 * BITS;
  constexpr uint64_t M0 = 0x0101010101010101ull * ((1ull << BITS) - 1);
  constexpr uint64_t M1 = 0x0001000100010001ull * ((1ull << (2 * BITS)) - 1);
  constexpr uint64_t M2 = 0x0000000100000001ull * ((1ull << (4 * BITS)) - 1);
  p = (p | (p << S3)) & M2;
  p = (p | (p << S2)) & M1;
  return (p | (p << S1)) & M0;
}

template <int BITS>
inline void unpack_codes_t(const uint8_t* in, int64_t D, uint8_t* c) {
  int64_t j = 0;
  for (; j + 8 <= D; j += 8) {
    uint64_t p = 0;
    std::memcpy(&p, in + j * BITS / 8, BITS);
    const uint64_t w = expand8<BITS>(p);
    std::memcpy(c + j, &w, 8);
  }
  constexpr int per = 8 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1;
  for (int64_t jb = j / per; jb < D / per; ++jb) {
    const uint32_t b = in[jb];
    for (int k = 0; k < per; ++k) c[jb * per + k] = static_cast<uint8_t>((b >> (k * BITS)) & mask);
  }
}

inline void unpack_codes(const uint8_t* in, int64_t D, int bits, uint8_t* c) {
  switch (bits) {
    case 8: std::memcpy(c, in, D); return;
    case 4: unpack_codes_t<4>(in, D, c); return;
    case 2: unpack_codes_t<2>(in, D, c); return;
    default: unpack_codes_t<1>(in, D, c); return;
  }
}

// WN one-byte codes -> floats
inline vn load_codesn(const uint8_t* c) {
  typedef uint8_t vnb __attribute__((vector_size(WN)));
  vnb b;
  std::memcpy(&b, c, sizeof b);
  return __builtin_convertvector(__builtin_convertvector(b, vni), vn);
}

// Load `nrows` rows starting at row t0 of batch b into buf [nrows, ld] (fp32; the first D of each row), rotated +
// rounded if asked.
void load_tile(const char* xb, DType dt, int64_t D, int64_t x_batch_stride, int64_t x_row_stride, int64_t b,
               int64_t t0, int64_t nrows, const RotateParams& rp, float* buf, int64_t ld) {
  const int esz = dtype_size(dt);
  for (int64_t r = 0; r < nrows; ++r) {
    const char* row = xb + (b * x_batch_stride + (t0 + r) * x_row_stride) * esz;
    float* dst = buf + r * ld;
    detail::load_row(row, dt, D, rp.enabled ? rp.perm : nullptr, dst);
    if (rp.enabled) {
      fwht_row_f32(dst, D);
      detail::scale_round_row(dst, rp.scale, dt, D);
    }
  }
}

// Σ over the G rows (stride ld) of WN channels of (code·s + z − x)², rows in order (as group_sse)
inline vn column_ssen(const float* v, int G, int64_t ld, vn s, vn z, vn qmax) {
  vn e2{};
  for (int r = 0; r < G; ++r) {
    const vn x = simd::ldn(v + r * ld);
    const vn e = quant_coden(x, s, z, qmax) * s + z - x;
    e2 = e2 + e * e;
  }
  return e2;
}

// Scratch of tile_meta: per column of a [G, Dp] tile
struct TileMeta {
  simd::lvector<float> lo, hi, s, z, cs, cz, be;
  explicit TileMeta(int64_t Dp) {
    for (auto* v : {&lo, &hi, &s, &z, &cs, &cz, &be}) v->resize(Dp);
  }
};

// scale / zero (m.s, m.z) of every column of a tile of G rows × Dp columns (stride Dp, Dp % 16 == 0), each column
// one group: min/max, or the best of `clip` range-search candidates (the same rule as group_meta, with each
// column's error summed over the rows in order, as group_sse does; a column whose min/max error is not finite
// keeps min/max: best error -1)
void tile_meta(const float* buf, int G, int64_t Dp, float qmax, DType md, int clip, TileMeta& m) {
  const vn vq = simd::splatn(qmax);
  for (int64_t d0 = 0; d0 < Dp; d0 += WN) {
    vn l = simd::ldn(buf + d0), h = l;
    for (int r = 1; r < G; ++r) {
      const vn v = simd::ldn(buf + r * Dp + d0);
      l = vnan_min(l, v);
      h = vnan_max(h, v);
    }
    simd::stn(m.lo.data() + d0, l);
    simd::stn(m.hi.data() + d0, h);
  }
  for (int64_t d = 0; d < Dp; ++d) {
    m.s[d] = round_to((m.hi[d] - m.lo[d]) / qmax, md);
    m.z[d] = round_to(m.lo[d], md);
  }
  if (clip <= 1) return;
  for (int64_t d0 = 0; d0 < Dp; d0 += WN) {
    const vn e = column_ssen(buf + d0, G, Dp, simd::ldn(m.s.data() + d0), simd::ldn(m.z.data() + d0), vq);
    simd::stn(m.be.data() + d0, e <= std::numeric_limits<float>::max() ? e : simd::splatn(-1.0f));
  }
  for (int cand = 1; cand < clip; ++cand) {
    for (int64_t d = 0; d < Dp; ++d) {
      const float aw = clip_shrink(cand) * (m.hi[d] - m.lo[d]);
      const float l = m.lo[d] + aw, h = m.hi[d] - aw;
      m.cs[d] = round_to((h - l) / qmax, md);
      m.cz[d] = round_to(l, md);
    }
    for (int64_t d0 = 0; d0 < Dp; d0 += WN) {
      const vn vs = simd::ldn(m.cs.data() + d0), vz = simd::ldn(m.cz.data() + d0);
      const vn e = column_ssen(buf + d0, G, Dp, vs, vz, vq);
      const vn bst = simd::ldn(m.be.data() + d0);
      const vni better = e < bst;
      simd::stn(m.be.data() + d0, better ? e : bst);
      simd::stn(m.s.data() + d0, better ? vs : simd::ldn(m.s.data() + d0));
      simd::stn(m.z.data() + d0, better ? vz : simd::ldn(m.z.data() + d0));
    }
  }
}

// tile[i·16 + l] = v[l·G + i]: 16 consecutive groups of G values as the 16 columns of a [G, 16] tile
inline void transpose_groups16(const float* v, int G, float* tile) {
#if defined(__AVX512F__)
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(G));
  const __m512 zero = _mm512_setzero_ps();  // the masked form: no _mm512_undefined_ps() (GCC 12 warns on it)
  for (int i = 0; i < G; ++i) _mm512_storeu_ps(tile + i * W, _mm512_mask_i32gather_ps(zero, 0xffff, idx, v + i, 4));
#else
  for (int l = 0; l < W; ++l)
    for (int i = 0; i < G; ++i) tile[i * W + l] = v[l * G + i];
#endif
}

}  // namespace

void quantize_pack_cpu(const void* x, DType dtype, int64_t batch, int64_t T, int64_t D, int64_t x_batch_stride,
                       int64_t x_row_stride, const QuantParams& qp, const RotateParams& rp, uint8_t* codes,
                       void* scale, void* zero) {
  const char* xb = static_cast<const char*>(x);
  const int G = qp.group_size, bits = qp.bits;
  const float qmax = qmax_of(bits);
  const vn vq = simd::splatn(qmax);
  const int64_t row_bytes = D * bits / 8;
  const DType md = qp.meta_dtype;

  if (qp.mode == QuantMode::PerChannel) {
    // one tile = G rows × D channels in fp32, channels padded with zeros to whole 16-lane vectors (Dp); every loop
    // runs over 16 channels at a time, rows in order
    const int64_t groups = T / G, tiles = batch * groups;
    const int64_t Dp = (D + W - 1) / W * W;
    parallel_for(tiles, 1, [&](int64_t i0, int64_t i1) {
      simd::lvector<float> buf(static_cast<size_t>(G) * Dp, 0.0f);
      TileMeta m(Dp);
      const float* s = m.s.data();
      const float* z = m.z.data();
      std::vector<uint8_t> c(Dp);
      for (int64_t tile = i0; tile < i1; ++tile) {
        const int64_t b = tile / groups, g = tile % groups;
        load_tile(xb, dtype, D, x_batch_stride, x_row_stride, b, g * G, G, rp, buf.data(), Dp);
        tile_meta(buf.data(), G, Dp, qmax, md, qp.clip, m);
        const int64_t moff = (b * groups + g) * D;
        for (int64_t d = 0; d < D; ++d) {
          store_from_float(scale, moff + d, md, s[d]);
          store_from_float(zero, moff + d, md, z[d]);
        }
        for (int r = 0; r < G; ++r) {
          const float* row = buf.data() + r * Dp;
          for (int64_t d0 = 0; d0 < Dp; d0 += WN)
            store_codesn(quant_coden(simd::ldn(row + d0), simd::ldn(s + d0), simd::ldn(z + d0), vq), c.data() + d0);
          pack_codes(c.data(), D, bits, codes + (b * T + g * G + r) * row_bytes);
        }
      }
    });
  } else {
    // blocks of RB rows hold RB·D/G groups, a multiple of 16: each 16 consecutive groups are transposed into a
    // [G, 16] tile (one group per column) whose scales / zeros tile_meta finds as for per-channel groups; the codes
    // are then computed in the row layout
    const int64_t gpr = D / G;  // groups per row
    const int64_t rows = batch * T;
    const int64_t RB = W / std::gcd<int64_t>(W, gpr), nblk = (rows + RB - 1) / RB;
    parallel_for(nblk, std::max<int64_t>(1, 4096 / (RB * D)), [&](int64_t k0, int64_t k1) {
      // buf: RB rows plus room for a last tile's unused columns (their values are never stored)
      simd::lvector<float> buf(static_cast<size_t>(RB * D + W * G), 0.0f), tile(static_cast<size_t>(G) * W);
      std::vector<uint8_t> c(static_cast<size_t>(RB * D) + W);
      TileMeta m(W);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * RB, nr = std::min(RB, rows - r0), ng = nr * gpr;
        for (int64_t r = 0; r < nr; ++r)
          load_tile(xb, dtype, D, x_batch_stride, x_row_stride, (r0 + r) / T, (r0 + r) % T, 1, rp,
                    buf.data() + r * D, D);
        for (int64_t q0 = 0; q0 < ng; q0 += W) {
          transpose_groups16(buf.data() + q0 * G, G, tile.data());
          tile_meta(tile.data(), G, W, qmax, md, qp.clip, m);
          const int nl = int(std::min<int64_t>(W, ng - q0));
          for (int l = 0; l < nl; ++l) {
            const int64_t q = q0 + l;
            const float sc = m.s[l], zz = m.z[l];
            store_from_float(scale, r0 * gpr + q, md, sc);
            store_from_float(zero, r0 * gpr + q, md, zz);
            const float* v = buf.data() + q * G;
            uint8_t* cq = c.data() + q * G;
            int i = 0;
            for (; i + WN <= G; i += WN)
              store_codesn(quant_coden(simd::ldn(v + i), simd::splatn(sc), simd::splatn(zz), vq), cq + i);
            for (; i < G; ++i) cq[i] = quant_code(v[i], sc, zz, qmax);
          }
        }
        for (int64_t r = 0; r < nr; ++r) pack_codes(c.data() + r * D, D, bits, codes + (r0 + r) * row_bytes);
      }
    });
  }
}

void dequantize_cpu(const uint8_t* codes, const void* scale, const void* zero, DType out_dtype, int64_t batch,
                    int64_t T, int64_t D, const QuantParams& qp, void* y) {
  const int G = qp.group_size, bits = qp.bits;
  const int64_t row_bytes = D * bits / 8, rows = batch * T;
  const DType md = qp.meta_dtype;
  const int esz = dtype_size(out_dtype);
  const int64_t Dp = (D + W - 1) / W * W;  // buffers padded to whole 16-lane vectors
  parallel_for(rows, std::max<int64_t>(1, 4096 / D), [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> c(Dp, 0);
    simd::lvector<float> out(Dp), s(Dp, 0.0f), z(Dp, 0.0f);
    int64_t cached = -1;  // per-channel: the meta row (group) held in s / z
    const int64_t gpr = D / G;
    for (int64_t rr = r0; rr < r1; ++rr) {
      unpack_codes(codes + rr * row_bytes, D, bits, c.data());
      if (qp.mode == QuantMode::PerChannel) {
        const int64_t b = rr / T, t = rr % T, mrow = b * (T / G) + t / G;
        if (mrow != cached) {
          for (int64_t d = 0; d < D; ++d) {
            s[d] = load_as_float(scale, mrow * D + d, md);
            z[d] = load_as_float(zero, mrow * D + d, md);
          }
          cached = mrow;
        }
        for (int64_t d0 = 0; d0 < Dp; d0 += WN)
          simd::stn(out.data() + d0, load_codesn(c.data() + d0) * simd::ldn(s.data() + d0) + simd::ldn(z.data() + d0));
      } else if (G % WN == 0) {
        for (int64_t g = 0; g < gpr; ++g) {
          const vn vs = simd::splatn(load_as_float(scale, rr * gpr + g, md));
          const vn vz = simd::splatn(load_as_float(zero, rr * gpr + g, md));
          for (int64_t i = g * G; i < (g + 1) * G; i += WN)
            simd::stn(out.data() + i, load_codesn(c.data() + i) * vs + vz);
        }
      } else {
        for (int64_t g = 0; g < gpr; ++g) {
          const float sg = load_as_float(scale, rr * gpr + g, md), zg = load_as_float(zero, rr * gpr + g, md);
          for (int i = 0; i < G; ++i) out[g * G + i] = static_cast<float>(c[g * G + i]) * sg + zg;
        }
      }
      detail::store_row(out.data(), 1.0f, out_dtype, D, static_cast<char*>(y) + rr * D * esz);
    }
  });
}

}  // namespace kvengine
