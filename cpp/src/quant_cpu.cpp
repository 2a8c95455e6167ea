// kvengine — asymmetric group quantization + bit-packing on the CPU (optionally fused with the FWHT rotation).
// One task = one tile: the G rows of a per-channel group, or a run of rows for per-token groups.  Each tile is
// loaded (and rotated) into an fp32 buffer once, then quantized from it.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kvengine/fwht.h"
#include "kvengine/parallel.h"
#include "kvengine/quant.h"
#include "rowio.h"

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

// scale / zero of one group of n values v[i·stride] with fp32 min/max lo/hi: min/max, or the best of `clip`
// range-search candidates (quant.h)
inline void group_meta(const float* v, int64_t n, int64_t stride, float lo, float hi, float qmax, DType md,
                       int clip, float& s, float& z) {
  s = round_to((hi - lo) / qmax, md);
  z = round_to(lo, md);
  if (clip <= 1) return;
  float best = group_sse(v, n, stride, s, z, qmax);
  if (!std::isfinite(best)) return;
  const float w = hi - lo;
  for (int c = 1; c < clip; ++c) {
    const float aw = clip_shrink(c) * w;
    const float l = lo + aw, h = hi - aw;
    const float sc = round_to((h - l) / qmax, md), zc = round_to(l, md);
    const float e = group_sse(v, n, stride, sc, zc, qmax);
    if (e < best) {
      best = e;
      s = sc;
      z = zc;
    }
  }
}

// pack D one-byte codes into D*bits/8 bytes (first element in the lowest bits)
inline void pack_codes(const uint8_t* c, int64_t D, int bits, uint8_t* out) {
  if (bits == 8) { std::memcpy(out, c, D); return; }
  const int per = 8 / bits;
  const int64_t nb = D / per;
  for (int64_t j = 0; j < nb; ++j) {
    uint32_t b = 0;
    for (int k = 0; k < per; ++k) b |= static_cast<uint32_t>(c[j * per + k]) << (k * bits);
    out[j] = static_cast<uint8_t>(b);
  }
}

inline void unpack_codes(const uint8_t* in, int64_t D, int bits, uint8_t* c) {
  if (bits == 8) { std::memcpy(c, in, D); return; }
  const int per = 8 / bits;
  const uint32_t mask = (1u << bits) - 1;
  const int64_t nb = D / per;
  for (int64_t j = 0; j < nb; ++j) {
    const uint32_t b = in[j];
    for (int k = 0; k < per; ++k) c[j * per + k] = static_cast<uint8_t>((b >> (k * bits)) & mask);
  }
}

// Load `nrows` rows starting at row t0 of batch b into buf [nrows, D] (fp32), rotated + rounded if asked.
void load_tile(const char* xb, DType dt, int64_t D, int64_t x_batch_stride, int64_t x_row_stride, int64_t b,
               int64_t t0, int64_t nrows, const RotateParams& rp, float* buf) {
  const int esz = dtype_size(dt);
  for (int64_t r = 0; r < nrows; ++r) {
    const char* row = xb + (b * x_batch_stride + (t0 + r) * x_row_stride) * esz;
    float* dst = buf + r * D;
    detail::load_row(row, dt, D, rp.enabled ? rp.perm : nullptr, dst);
    if (rp.enabled) {
      fwht_row_f32(dst, D);
      for (int64_t i = 0; i < D; ++i) dst[i] = round_to(dst[i] * rp.scale, dt);
    }
  }
}

}  // namespace

void quantize_pack_cpu(const void* x, DType dtype, int64_t batch, int64_t T, int64_t D, int64_t x_batch_stride,
                       int64_t x_row_stride, const QuantParams& qp, const RotateParams& rp, uint8_t* codes,
                       void* scale, void* zero) {
  const char* xb = static_cast<const char*>(x);
  const int G = qp.group_size, bits = qp.bits;
  const float qmax = qmax_of(bits);
  const int64_t row_bytes = D * bits / 8;
  const DType md = qp.meta_dtype;

  if (qp.mode == QuantMode::PerChannel) {
    const int64_t groups = T / G, tiles = batch * groups;
    parallel_for(tiles, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> buf(static_cast<size_t>(G) * D), s(D), z(D);
      std::vector<float> lo2, hi2, cs, cz, ce, be;  // range search scratch
      if (qp.clip > 1) {
        for (auto* v : {&lo2, &hi2, &cs, &cz, &ce, &be}) v->resize(D);
      }
      std::vector<uint8_t> c(D);
      for (int64_t tile = i0; tile < i1; ++tile) {
        const int64_t b = tile / groups, g = tile % groups;
        load_tile(xb, dtype, D, x_batch_stride, x_row_stride, b, g * G, G, rp, buf.data());
        std::vector<float>& lo = s;  // reuse: lo in s, hi in z, then overwritten with scale / zero
        std::vector<float>& hi = z;
        std::copy(buf.begin(), buf.begin() + D, lo.begin());
        std::copy(buf.begin(), buf.begin() + D, hi.begin());
        for (int r = 1; r < G; ++r) {
          const float* row = buf.data() + static_cast<int64_t>(r) * D;
          for (int64_t d = 0; d < D; ++d) {
            lo[d] = nan_min(lo[d], row[d]);
            hi[d] = nan_max(hi[d], row[d]);
          }
        }
        const int64_t moff = (b * groups + g) * D;
        if (qp.clip > 1) {
          // range search, channels in the inner loop (vectorizable); each channel's error summed over the rows in
          // order, as group_meta does
          for (int64_t d = 0; d < D; ++d) { lo2[d] = lo[d]; hi2[d] = hi[d]; }
          for (int cand = 0; cand < qp.clip; ++cand) {
            for (int64_t d = 0; d < D; ++d) {
              const float aw = clip_shrink(cand) * (hi2[d] - lo2[d]);
              const float l = cand ? lo2[d] + aw : lo2[d], h = cand ? hi2[d] - aw : hi2[d];
              cs[d] = round_to((h - l) / qmax, md);
              cz[d] = round_to(l, md);
              ce[d] = 0.0f;
            }
            for (int r = 0; r < G; ++r) {
              const float* row = buf.data() + static_cast<int64_t>(r) * D;
              for (int64_t d = 0; d < D; ++d) {
                const float e = static_cast<float>(quant_code(row[d], cs[d], cz[d], qmax)) * cs[d] + cz[d] - row[d];
                ce[d] += e * e;
              }
            }
            for (int64_t d = 0; d < D; ++d) {
              if (cand == 0) {
                be[d] = std::isfinite(ce[d]) ? ce[d] : -1.0f;  // -1: not finite, keep min/max
                s[d] = cs[d];
                z[d] = cz[d];
              } else if (ce[d] < be[d]) {
                be[d] = ce[d];
                s[d] = cs[d];
                z[d] = cz[d];
              }
            }
          }
          for (int64_t d = 0; d < D; ++d) {
            store_from_float(scale, moff + d, md, s[d]);
            store_from_float(zero, moff + d, md, z[d]);
          }
        } else {
          for (int64_t d = 0; d < D; ++d) {
            const float sc = round_to((hi[d] - lo[d]) / qmax, md), zz = round_to(lo[d], md);
            store_from_float(scale, moff + d, md, sc);
            store_from_float(zero, moff + d, md, zz);
            s[d] = sc;
            z[d] = zz;
          }
        }
        for (int r = 0; r < G; ++r) {
          const float* row = buf.data() + static_cast<int64_t>(r) * D;
          for (int64_t d = 0; d < D; ++d) c[d] = quant_code(row[d], s[d], z[d], qmax);
          pack_codes(c.data(), D, bits, codes + (b * T + g * G + r) * row_bytes);
        }
      }
    });
  } else {
    const int64_t gpr = D / G;  // groups per row
    const int64_t rows = batch * T;
    parallel_for(rows, std::max<int64_t>(1, 4096 / D), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(D);
      std::vector<uint8_t> c(D);
      for (int64_t rr = r0; rr < r1; ++rr) {
        const int64_t b = rr / T, t = rr % T;
        load_tile(xb, dtype, D, x_batch_stride, x_row_stride, b, t, 1, rp, buf.data());
        for (int64_t g = 0; g < gpr; ++g) {
          const float* v = buf.data() + g * G;
          float lo = v[0], hi = v[0];
          for (int i = 1; i < G; ++i) { lo = nan_min(lo, v[i]); hi = nan_max(hi, v[i]); }
          float sc, zz;
          group_meta(v, G, 1, lo, hi, qmax, md, qp.clip, sc, zz);
          store_from_float(scale, rr * gpr + g, md, sc);
          store_from_float(zero, rr * gpr + g, md, zz);
          for (int i = 0; i < G; ++i) c[g * G + i] = quant_code(v[i], sc, zz, qmax);
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
  parallel_for(rows, std::max<int64_t>(1, 4096 / D), [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> c(D);
    std::vector<float> out(D);
    for (int64_t rr = r0; rr < r1; ++rr) {
      unpack_codes(codes + rr * row_bytes, D, bits, c.data());
      if (qp.mode == QuantMode::PerChannel) {
        const int64_t b = rr / T, t = rr % T, moff = (b * (T / G) + t / G) * D;
        for (int64_t d = 0; d < D; ++d) {
          const float s = load_as_float(scale, moff + d, md), z = load_as_float(zero, moff + d, md);
          out[d] = static_cast<float>(c[d]) * s + z;
        }
      } else {
        const int64_t gpr = D / G;
        for (int64_t g = 0; g < gpr; ++g) {
          const float s = load_as_float(scale, rr * gpr + g, md), z = load_as_float(zero, rr * gpr + g, md);
          for (int i = 0; i < G; ++i) out[g * G + i] = static_cast<float>(c[g * G + i]) * s + z;
        }
      }
      detail::store_row(out.data(), 1.0f, out_dtype, D, static_cast<char*>(y) + rr * D * esz);
    }
  });
}

}  // namespace kvengine
