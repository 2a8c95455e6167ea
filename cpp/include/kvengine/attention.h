// kvengine — decode attention over a quantized KV cache (CPU entry point; CUDA launcher in cuda_ops.h).
//
// Per sequence b and KV head h the cache holds, in time order of their logical positions:
//   sinks     n_sink[b] full-precision tokens      (fp segment, slots [0, n_sink))
//   quantized n_quant[b] packed tokens             (K per-channel groups of k_group tokens — or, with k_per_token,
//                                                   per-token groups of k_group channels —, V per-token groups of
//                                                   v_group channels; both packed along D as quantize_pack does)
//   residual  n_res[b] full-precision tokens       (fp segment, slots [n_sink, n_sink + n_res))
// logical position: sink f -> f; quantized j -> n_sink + j; residual r -> n_sink + n_quant + r; N = sum of the three.
// Query row t (of Tq new tokens, the last Tq positions) sees positions p <= N - Tq + t (causal within the new
// tokens).  out = softmax(scale · q·kᵀ) · v over all visible tokens, exactly (fp32 math), in q's dtype.
// GQA/MQA: query head hq reads KV head hq / (Hq / Hkv).  Rotation, if any, is applied by the caller (binding).
// With `indices` (retrieval): softmax over the selected positions only, same dequantization, no causal mask.
#pragma once
#include "kvengine/common.h"

namespace kvengine {

struct DecodeAttentionArgs {
  // queries [B, Hq, Tq, D] (strides in elements, D contiguous); out [B, Hq, Tq, D] contiguous; both `dtype`
  const void* q = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_t = 0;
  void* out = nullptr;
  DType dtype = DType::F32;
  int64_t B = 0, Hq = 0, Hkv = 0, Tq = 1, D = 0;
  float softmax_scale = 1.0f;

  // quantized segment, capacity q_cap tokens per (b, h) (a multiple of k_group); all contiguous:
  // k_codes [B, Hkv, q_cap, D*bits_k/8], k_scale/k_zero [B, Hkv, q_cap/k_group, D]
  //   (k_per_token: k_scale/k_zero [B, Hkv, q_cap, D/k_group], k_group a multiple of 16 dividing D)
  // v_codes [B, Hkv, q_cap, D*bits_v/8], v_scale/v_zero [B, Hkv, q_cap, D/v_group]
  const uint8_t* k_codes = nullptr;
  const void* k_scale = nullptr;
  const void* k_zero = nullptr;
  const uint8_t* v_codes = nullptr;
  const void* v_scale = nullptr;
  const void* v_zero = nullptr;
  DType meta_dtype = DType::F32;
  int bits_k = 2, bits_v = 2;
  int k_group = 32, v_group = 32;
  bool k_per_token = false;  // keys quantized like the values (per token, groups of k_group channels)
  int64_t q_cap = 0;
  // int8 QK (CPU; per-channel keys of <= 4 bits, dense): per key group and query row, q'[d] = q[d]·scale·k_scale[d]
  // is rounded to int8 (q8 = round(q' · 127 / max|q'|)) and the packed codes' scores are
  // max|q'| / 127 · Σ q8[d]·(code[d] − m) + Σ q[d]·scale·(k_zero[d] + m·k_scale[d]), m = (2^bits − 1) / 2 (integer
  // dot products: VNNI / vpmaddubsw; centering the codes halves the error q8's rounding adds).
  // Sinks, recent tokens and the other cases stay exact.  Elsewhere (CUDA) the flag is ignored: exact scores.
  bool qk_int8 = false;

  // full-precision segment [B, Hkv, f_cap, D] contiguous, `dtype`
  const void* k_fp = nullptr;
  const void* v_fp = nullptr;
  int64_t f_cap = 0;

  // lens [B, 3] int32: n_sink, n_quant, n_res (on the kernel's device)
  const int32_t* lens = nullptr;

  // optional sparse selection (Tq == 1): indices [B, Hkv, n_idx] int32 contiguous of logical positions; query row
  // (b, hq) attends only positions indices[b, hq / g, :] (entries < 0 or >= N skipped, duplicates count twice).
  bool sparse = false;
  const int32_t* indices = nullptr;  // may be null when n_idx == 0
  int64_t n_idx = 0;
};

void quant_decode_attention_cpu(const DecodeAttentionArgs& a);

}  // namespace kvengine
