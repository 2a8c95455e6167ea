// kvengine — 1-bit QK attention (BinaryAttention): sign packing and a fused flash-style attention whose scores come
// from popcounts of packed sign bits (CPU entry points; CUDA launchers in cuda_ops.h).
//
// Sign packing of a row x[0..D) (D a multiple of 32):  word w (uint32) bit j = (x[32w + j] < 0), sign(0) = +1;
// scale = mean |x| (fp32).  With centering, x is first replaced by x − μ, μ[c] = fp32(Σ_t fp64(x[t, c]) / L) (mean
// over the token axis, per channel), the subtraction done in fp32 — so the bits are reproducible bit for bit.
//
// Attention, per batch b, query head h (KV head h / (Hq / Hkv)), query i < Lq, key j < Lk:
//   dot[i, j]   = D − 2·popcount(qbits_i XOR kbits_j)            (= sign(q_i)·sign(k_j), an exact integer)
//   score[i, j] = softmax_scale · α_i · β_j · dot[i, j]  + bias[b, h, i, j]  + rel[h, c + (i + Lk − Lq) − j]
//   α_i = mean|q_i|, β_j = k_scale[j];  c = (rel_len − 1) / 2, rel_len odd, c ≥ max(Lq, Lk) − 1
//   causal: key j visible to query i iff j ≤ i + Lk − Lq (queries are the newest Lq positions; Lq = Lk: j ≤ i)
//   out[i]      = Σ_j softmax_j(score[i, :]) · v[j]   (fp32 accumulation; a row with no visible key -> 0)
// Keys arrive packed (kbits, β) — the binding packs them with sign_pack_cpu / cuda::sign_pack first.
#pragma once
#include "kvengine/common.h"

namespace kvengine {

// x [batch, L, D] (element strides x_stride_b, x_stride_t; D contiguous), any float dtype.
// bits [batch, L, D/32] uint32 contiguous; scale [batch, L] fp32 contiguous.
void sign_pack_cpu(const void* x, DType dtype, int64_t batch, int64_t L, int64_t D, int64_t x_stride_b,
                   int64_t x_stride_t, bool center, uint32_t* bits, float* scale);

struct BinaryAttentionArgs {
  // q [B, Hq, Lq, D] (element strides, D contiguous), `q_dtype`
  const void* q = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_t = 0;
  DType q_dtype = DType::F32;
  // packed keys: k_bits [B, Hkv, Lk, D/32] uint32, k_scale [B, Hkv, Lk] fp32, both contiguous
  const uint32_t* k_bits = nullptr;
  const float* k_scale = nullptr;
  // v [B, Hkv, Lk, D] (element strides, D contiguous), `v_dtype`; out [B, Hq, Lq, D] contiguous, `v_dtype`
  const void* v = nullptr;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_t = 0;
  DType v_dtype = DType::F32;
  void* out = nullptr;
  // optional dense additive bias, fp32, element [b, h, i, j] at b·bias_stride_b + h·bias_stride_h + i·bias_stride_i + j
  // (strides may be 0 to broadcast)
  const float* bias = nullptr;
  int64_t bias_stride_b = 0, bias_stride_h = 0, bias_stride_i = 0;
  // optional relative-position table [Hq, rel_len] fp32 contiguous (rel_len odd, (rel_len − 1) / 2 ≥ max(Lq, Lk) − 1)
  const float* rel_bias = nullptr;
  int64_t rel_len = 0;
  int64_t B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, D = 0;
  bool causal = false;
  float softmax_scale = 1.0f;
};

void binary_attention_cpu(const BinaryAttentionArgs& a);

}  // namespace kvengine
