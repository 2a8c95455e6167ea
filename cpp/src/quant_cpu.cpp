// kvengine — asymmetric group quantization + bit-packing on the CPU (optionally fused with the FWHT rotation).
// One task = one tile: the G rows of a per-channel group, or a run of rows for per-token groups.  Each tile is
// loaded (and rotated) into an fp32 buffer once, then quantized from it.
#include <algorithm>
#include <cmath>
#include <limits>
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

// ---- 16 lanes at a time (simd.h): the same arithmetic as quant_code, lane by lane (IEEE division, so the codes stay
// bit-identical to the reference's)
using simd::vf;
using simd::vi;
constexpr int W = simd::W;

inline vf vfloor(vf x) {
#if defined(__AVX512F__)
  // the masked form (all lanes) takes its pass-through operand explicitly: GCC 12 warns on the plain one's
  // _mm512_undefined_ps()
  return (vf)_mm512_mask_roundscale_ps((__m512)x, 0xffff, (__m512)x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#elif defined(__AVX__)
  typedef float v8 __attribute__((vector_size(32)));
  const v8 lo = (v8)_mm256_floor_ps((__m256)__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7));
  const v8 hi = (v8)_mm256_floor_ps((__m256)__builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  for (int i = 0; i < W; ++i) x[i] = std::floor(x[i]);
  return x;
#endif
}

// codes (as floats) of 16 values
inline vf quant_code16(vf x, vf s, vf z, vf qmax) {
  vf c = vfloor((x - z) / s + 0.5f);
  c = c >= 0.0f ? c : vf{};  // also NaN -> 0
  c = c > qmax ? qmax : c;
  return s == 0.0f ? vf{} : c;
}

// lane-wise nan_min / nan_max
inline vf vnan_min(vf a, vf b) { return (b < a) | (b != b) ? b : a; }
inline vf vnan_max(vf a, vf b) { return (b > a) | (b != b) ? b : a; }

// nan_min / nan_max over the 16 lanes (a shuffle tree; NaN anywhere gives NaN)
inline float hnan_min(vf v) {
  v = vnan_min(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vnan_min(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vnan_min(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  return nan_min(v[0], v[1]);
}
inline float hnan_max(vf v) {
  v = vnan_max(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vnan_max(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vnan_max(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  return nan_max(v[0], v[1]);
}

// 16 codes (floats in [0, 255]) -> 16 bytes
inline void store_codes16(vf c, uint8_t* out) {
  const simd::vb b = __builtin_convertvector(__builtin_convertvector(c, vi), simd::vb);
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

// 16 one-byte codes -> floats
inline vf load_codes16(const uint8_t* c) {
  simd::vb b;
  std::memcpy(&b, c, sizeof b);
  return __builtin_convertvector(__builtin_convertvector(b, vi), vf);
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

// Σ over the G rows (stride ld) of 16 channels of (code·s + z − x)², rows in order (as group_sse)
inline vf column_sse16(const float* v, int G, int64_t ld, vf s, vf z, vf qmax) {
  vf e2{};
  for (int r = 0; r < G; ++r) {
    const vf x = simd::ld(v + r * ld);
    const vf e = quant_code16(x, s, z, qmax) * s + z - x;
    e2 = e2 + e * e;
  }
  return e2;
}

// Σ over the n = 16·nv contiguous values v of (code·s + z − v)² (16 partial sums, then their sum)
inline float group_sse16(const float* v, int nv, float s, float z, vf qmax) {
  const vf vs = simd::splat(s), vz = simd::splat(z);
  vf e2{};
  for (int k = 0; k < nv; ++k) {
    const vf x = simd::ld(v + k * W);
    const vf e = quant_code16(x, vs, vz, qmax) * vs + vz - x;
    e2 = e2 + e * e;
  }
  return simd::hsum(e2);
}

}  // namespace

void quantize_pack_cpu(const void* x, DType dtype, int64_t batch, int64_t T, int64_t D, int64_t x_batch_stride,
                       int64_t x_row_stride, const QuantParams& qp, const RotateParams& rp, uint8_t* codes,
                       void* scale, void* zero) {
  const char* xb = static_cast<const char*>(x);
  const int G = qp.group_size, bits = qp.bits;
  const float qmax = qmax_of(bits);
  const vf vq = simd::splat(qmax);
  const int64_t row_bytes = D * bits / 8;
  const DType md = qp.meta_dtype;

  if (qp.mode == QuantMode::PerChannel) {
    // one tile = G rows × D channels in fp32, channels padded with zeros to whole 16-lane vectors (Dp); every loop
    // runs over 16 channels at a time, rows in order
    const int64_t groups = T / G, tiles = batch * groups;
    const int64_t Dp = (D + W - 1) / W * W;
    parallel_for(tiles, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> buf(static_cast<size_t>(G) * Dp, 0.0f), lo(Dp), hi(Dp), s(Dp), z(Dp);
      std::vector<float> cs, cz, be;  // range search scratch
      if (qp.clip > 1) {
        for (auto* v : {&cs, &cz, &be}) v->resize(Dp);
      }
      std::vector<uint8_t> c(Dp);
      for (int64_t tile = i0; tile < i1; ++tile) {
        const int64_t b = tile / groups, g = tile % groups;
        load_tile(xb, dtype, D, x_batch_stride, x_row_stride, b, g * G, G, rp, buf.data(), Dp);
        for (int64_t d0 = 0; d0 < Dp; d0 += W) {
          vf l = simd::ld(buf.data() + d0), h = l;
          for (int r = 1; r < G; ++r) {
            const vf v = simd::ld(buf.data() + r * Dp + d0);
            l = vnan_min(l, v);
            h = vnan_max(h, v);
          }
          simd::stv(lo.data() + d0, l);
          simd::stv(hi.data() + d0, h);
        }
        for (int64_t d = 0; d < Dp; ++d) {
          s[d] = round_to((hi[d] - lo[d]) / qmax, md);
          z[d] = round_to(lo[d], md);
        }
        if (qp.clip > 1) {
          // range search: each channel's error summed over the rows in order, as group_meta does; a channel whose
          // min/max error is not finite keeps min/max (best error -1)
          for (int64_t d0 = 0; d0 < Dp; d0 += W) {
            const vf e = column_sse16(buf.data() + d0, G, Dp, simd::ld(s.data() + d0), simd::ld(z.data() + d0), vq);
            simd::stv(be.data() + d0, e <= std::numeric_limits<float>::max() ? e : simd::splat(-1.0f));
          }
          for (int cand = 1; cand < qp.clip; ++cand) {
            for (int64_t d = 0; d < Dp; ++d) {
              const float aw = clip_shrink(cand) * (hi[d] - lo[d]);
              const float l = lo[d] + aw, h = hi[d] - aw;
              cs[d] = round_to((h - l) / qmax, md);
              cz[d] = round_to(l, md);
            }
            for (int64_t d0 = 0; d0 < Dp; d0 += W) {
              const vf vs = simd::ld(cs.data() + d0), vz = simd::ld(cz.data() + d0);
              const vf e = column_sse16(buf.data() + d0, G, Dp, vs, vz, vq);
              const vf bst = simd::ld(be.data() + d0);
              const vi better = e < bst;
              simd::stv(be.data() + d0, better ? e : bst);
              simd::stv(s.data() + d0, better ? vs : simd::ld(s.data() + d0));
              simd::stv(z.data() + d0, better ? vz : simd::ld(z.data() + d0));
            }
          }
        }
        const int64_t moff = (b * groups + g) * D;
        for (int64_t d = 0; d < D; ++d) {
          store_from_float(scale, moff + d, md, s[d]);
          store_from_float(zero, moff + d, md, z[d]);
        }
        for (int r = 0; r < G; ++r) {
          const float* row = buf.data() + r * Dp;
          for (int64_t d0 = 0; d0 < Dp; d0 += W)
            store_codes16(quant_code16(simd::ld(row + d0), simd::ld(s.data() + d0), simd::ld(z.data() + d0), vq),
                          c.data() + d0);
          pack_codes(c.data(), D, bits, codes + (b * T + g * G + r) * row_bytes);
        }
      }
    });
  } else {
    const int64_t gpr = D / G;  // groups per row
    const int64_t rows = batch * T;
    const bool vec = G % W == 0;  // whole 16-lane vectors per group (else one value at a time)
    parallel_for(rows, std::max<int64_t>(1, 4096 / D), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(D);
      std::vector<uint8_t> c(D);
      for (int64_t rr = r0; rr < r1; ++rr) {
        const int64_t b = rr / T, t = rr % T;
        load_tile(xb, dtype, D, x_batch_stride, x_row_stride, b, t, 1, rp, buf.data(), D);
        for (int64_t g = 0; g < gpr; ++g) {
          const float* v = buf.data() + g * G;
          float lo = v[0], hi = v[0], sc, zz;  // (the scalar path's running min / max)
          if (vec) {
            const int nv = G / W;
            vf l = simd::ld(v), h = l;
            for (int k = 1; k < nv; ++k) {
              const vf x = simd::ld(v + k * W);
              l = vnan_min(l, x);
              h = vnan_max(h, x);
            }
            lo = hnan_min(l);
            hi = hnan_max(h);
            group_meta(lo, hi, qmax, md, qp.clip, [&](float s, float z) { return group_sse16(v, nv, s, z, vq); }, sc,
                       zz);
            const vf vs = simd::splat(sc), vz = simd::splat(zz);
            for (int k = 0; k < nv; ++k) store_codes16(quant_code16(simd::ld(v + k * W), vs, vz, vq), c.data() + g * G + k * W);
          } else {
            for (int i = 1; i < G; ++i) { lo = nan_min(lo, v[i]); hi = nan_max(hi, v[i]); }
            group_meta(lo, hi, qmax, md, qp.clip, [&](float s, float z) { return group_sse(v, G, 1, s, z, qmax); }, sc,
                       zz);
            for (int i = 0; i < G; ++i) c[g * G + i] = quant_code(v[i], sc, zz, qmax);
          }
          store_from_float(scale, rr * gpr + g, md, sc);
          store_from_float(zero, rr * gpr + g, md, zz);
        }
        pack_codes(c.data(), D, bits, codes + rr * row_bytes);
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
    std::vector<float> out(Dp), s(Dp, 0.0f), z(Dp, 0.0f);
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
        for (int64_t d0 = 0; d0 < Dp; d0 += W)
          simd::stv(out.data() + d0, load_codes16(c.data() + d0) * simd::ld(s.data() + d0) + simd::ld(z.data() + d0));
      } else if (G % W == 0) {
        for (int64_t g = 0; g < gpr; ++g) {
          const vf vs = simd::splat(load_as_float(scale, rr * gpr + g, md));
          const vf vz = simd::splat(load_as_float(zero, rr * gpr + g, md));
          for (int64_t i = g * G; i < (g + 1) * G; i += W)
            simd::stv(out.data() + i, load_codes16(c.data() + i) * vs + vz);
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
