// kvengine — hash-based top-k KV retrieval (Spotlight Attention style): sign-packed hash codes, Hamming top-k over
// a code cache with a fused counting select, and exact softmax attention over the selected tokens only.
// CPU entry points here; CUDA launchers (same semantics) in cuda_ops.h.
//
// Codes: nbits ∈ {32, 64, 128, 256} signs packed into W = nbits/32 uint32 words per row; bit j of word w is 1 iff
// f[32w + j] > 0 (f the hash projection; 0 and NaN give bit 0).
//
// hamming_topk, per sequence b and KV head h (g = Hq / Hkv query heads per group, L = seq_lens[b] clamped to [0, N]):
//   score(p) = Σ_{query heads i of the group} (nbits − popcount(q_i xor k_p)),  an integer in [0, g·nbits].
//   Always-kept positions: the first ns = min(sinks, L) and the last nr = min(recent, L − ns) tokens; they count
//   toward k (the binding checks sinks + recent <= k).  From the middle [ns, L − nr) the m = min(k − ns − nr,
//   L − ns − nr) best scores are selected: every position with score > T and the lowest-indexed positions with
//   score == T, T the largest threshold that yields >= m positions (exact, deterministic: ties -> lower index).
//   Output (indices, scores) [B, Hkv, k] int32: ascending positions (sinks, selected middle, recent), then -1
//   padding where L < k.  Algorithm: one pass over the codes writes per-position scores (uint16 workspace) and a
//   histogram per chunk of positions; per (b, h) the histograms give T and every chunk's output offset; a second
//   pass over the uint16 scores writes each chunk's selection in order.  O(N) work, no sort, deterministic.
//
// sparse_decode_attention: out[b, hq] = softmax(scale · q·k_iᵀ) · v_i over the tokens i = indices[b, hq/g, :]
// with 0 <= i < L (other entries — the -1 padding — are skipped; duplicates count twice); fp32 math; zeros when no
// index is valid.
#pragma once
#include "kvengine/common.h"

namespace kvengine {

// codes[r, w] bit j = (f[r, 32w + j] > 0); f fp32 rows of nbits values (row stride f_row_stride, elements)
void hash_sign_pack_cpu(const float* f, int64_t rows, int64_t nbits, int64_t f_row_stride, uint32_t* codes);

struct HammingTopkArgs {
  // q codes [B, Hq, W] (strides in words; a row's W words contiguous)
  const uint32_t* q_codes = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0;
  // k codes [B, Hkv, N, W] (strides in words; rows of W words, row stride W)
  const uint32_t* k_codes = nullptr;
  int64_t k_stride_b = 0, k_stride_h = 0;
  const int32_t* seq_lens = nullptr;  // [B] valid lengths, or null (= N); clamped to [0, N]
  int64_t B = 0, Hq = 0, Hkv = 0, N = 0, W = 0;
  int64_t k = 0, sinks = 0, recent = 0;  // requires sinks + recent <= k <= N, g·32·W < 65536
  int32_t* indices = nullptr;  // [B, Hkv, k] contiguous
  int32_t* scores = nullptr;   // [B, Hkv, k] contiguous
};

// positions per chunk of the selection passes (a multiple of 256; depends on N only)
int64_t hamming_topk_chunk(int64_t N);
void hamming_topk_cpu(const HammingTopkArgs& a);

struct SparseDecodeArgs {
  // q [B, Hq, D] (element strides, D contiguous), out [B, Hq, D] contiguous; q, k, v, out all `dtype`
  const void* q = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0;
  void* out = nullptr;
  // k, v [B, Hkv, N, D] (element strides, D contiguous)
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_t = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_t = 0;
  // indices [B, Hkv, n_sel] int32 or int64 (element strides, last dim contiguous)
  const void* indices = nullptr;
  bool indices_int64 = false;
  int64_t i_stride_b = 0, i_stride_h = 0, n_sel = 0;
  const int32_t* seq_lens = nullptr;  // [B] or null (= N)
  DType dtype = DType::F32;
  int64_t B = 0, Hq = 0, Hkv = 0, N = 0, D = 0;
  float softmax_scale = 1.0f;
};

void sparse_decode_attention_cpu(const SparseDecodeArgs& a);

}  // namespace kvengine

namespace kvengine {

// hash_encode on CUDA (the CPU path composes ATen matmuls with hash_sign_pack_cpu in the binding):
//   u = x @ w1[h] (+ b1[h]);  f = u (w2 null)  or  f = u + silu(u) @ w2[h] (+ b2[h]);  codes = signs of f packed.
// x [O, H, T, D] (element strides, D contiguous), weights fp32 contiguous: w1 [Hw, D, nbits], b1 [Hw, nbits],
// w2 [Hw, nbits, nbits], b2 [Hw, nbits] with Hw = H (per head) or 1 (shared); codes [O, H, T, nbits/32].
struct HashEncodeArgs {
  const void* x = nullptr;
  DType dtype = DType::F32;
  int64_t O = 0, H = 0, T = 0, D = 0;
  int64_t x_stride_o = 0, x_stride_h = 0, x_stride_t = 0;
  const float* w1 = nullptr;
  const float* b1 = nullptr;  // optional
  const float* w2 = nullptr;  // optional (null: linear hash)
  const float* b2 = nullptr;  // optional
  bool per_head = true;
  int nbits = 128;
  uint32_t* codes = nullptr;
};

}  // namespace kvengine
