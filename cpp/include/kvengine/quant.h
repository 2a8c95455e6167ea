// kvengine — asymmetric group quantization and bit-packing (CPU entry points).
//
// Input x is a batch of `batch` matrices [T, D] (row stride `x_row_stride`, batch stride `x_batch_stride`,
// elements along D contiguous).  Groups:
//   PerChannel: `group_size` consecutive tokens × 1 channel   -> scale/zero [batch, T/group_size, D]
//   PerToken:   1 token × `group_size` consecutive channels   -> scale/zero [batch, T, D/group_size]
// For each group: lo = min, hi = max (fp32), scale = round_meta((hi - lo) / (2^bits - 1)), zero = round_meta(lo),
// code = clamp(floor((x - zero) / scale + 0.5), 0, 2^bits - 1)  (code = 0 where scale == 0),
// x̂ = code · scale + zero.  round_meta rounds to the metadata dtype; codes are computed from the rounded values
// so quantize and dequantize agree.
// Range search (clip = n > 1): candidate c = 0 … n−1 shrinks the group's range around its centre,
//   a = 0.025·c (fp32), lo_c = lo + a·w, hi_c = hi − a·w, w = hi − lo   (c = 0: min/max; n <= 20, so hi_c > lo_c),
// scale/zero as above from (lo_c, hi_c); the candidate with the smallest Σ (code·scale + zero − x)² over the group
// (fp32) wins, ties to the lower c.  Codes of values outside a shrunk range clamp to 0 / 2^bits − 1.  A group whose
// min/max error is not finite (NaN, Inf) keeps min/max.  Every kernel follows the same fp32 operation sequence
// without FMA contraction; the error sums may round differently (summation order), so near-ties can resolve
// differently across devices.  A zero-range group therefore dequantizes to exactly zero == x (when the
// metadata dtype can hold x), never NaN.
// Packing: codes are packed along D, densely: byte j of a row holds elements j·(8/bits) … j·(8/bits)+8/bits−1, the
// first element in the lowest bits.  codes are uint8 [batch, T, D·bits/8], contiguous.
//
// rotate: when true, each token row is first transformed by the normalized FWHT over D (with optional channel
// permutation `perm` and `rot_scale`), and the rotated value is rounded to x's dtype before quantization, so the
// fused path equals quantize(fwht(x)) exactly.
#pragma once
#include "kvengine/common.h"

namespace kvengine {

struct QuantParams {
  int bits = 2;          // 1, 2, 4, 8
  int group_size = 32;
  QuantMode mode = QuantMode::PerChannel;
  DType meta_dtype = DType::F32;  // scale / zero storage
  int clip = 0;                   // range-search candidates (0 or 1: min/max only), at most kMaxClip
};

constexpr int kMaxClip = 20;
// shrink fraction of range-search candidate c (each end moves by clip_shrink(c)·(hi − lo))
inline float clip_shrink(int c) { return 0.025f * static_cast<float>(c); }

struct RotateParams {
  bool enabled = false;
  float scale = 1.0f;           // normally 1/sqrt(D)
  const int32_t* perm = nullptr;  // length D or null
};

// x: [batch, T, D] strided as described; codes/scale/zero contiguous outputs.
void quantize_pack_cpu(const void* x, DType dtype, int64_t batch, int64_t T, int64_t D, int64_t x_batch_stride,
                       int64_t x_row_stride, const QuantParams& qp, const RotateParams& rp, uint8_t* codes,
                       void* scale, void* zero);

// Inverse of quantize_pack (without rotation): codes/scale/zero contiguous -> y [batch, T, D] contiguous, dtype out.
void dequantize_cpu(const uint8_t* codes, const void* scale, const void* zero, DType out_dtype, int64_t batch,
                    int64_t T, int64_t D, const QuantParams& qp, void* y);

}  // namespace kvengine
