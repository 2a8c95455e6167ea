// kvengine — fused decode attention over the quantized KV cache on CUDA (flash-decoding split-K); semantics in
// kvengine/attention.h, same results as quant_decode_attention_cpu up to fp32 summation order.
//
// Kernels
//   attn_split_kernel<BK, BV, RB>  one CTA (128 threads, 4 warps) per (sequence b, KV head h, split s, row block).
//       The CTA owns RB (1, 2, 4 or 8) of the R = g·Tq query rows of KV head h (GQA: every K/V tile is read once for
//       the whole group; R > 8 uses several row blocks, adjacent in the grid so they share K/V through L2).
//       The split count S is fixed on the host from capacities only; on the device each CTA reads lens[b], splits
//       the actual length N into S chunks (a multiple of the tile TT) and walks its logical range [c0, c1) in the
//       order sinks (fp slots) -> quantized tokens -> residual (fp slots), with one online softmax (fp32, exp2 of
//       log2e-prescaled scores).  It writes its partial (m, l, acc[D]) per row into the workspace (empty: -inf, 0).
//   attn_merge_kernel  one CTA per output row: log-sum-exp over the S partials, out [B, Hq, Tq, D] in q's dtype.
//
// Tile: TT = 8192 / D tokens (D=128: 64).  Per tile, four phases separated by __syncthreads:
//   fold   (quant tiles) for each K group touched by the tile (<= nslot groups): qs = q·scale·2^-pos (a slot of
//          [RB][D] fp32 in shared memory) and qz = q·zero (reduced over the lanes of a row); the V metadata of the
//          tile is converted to fp32 pairs (scale, zero).
//   score  thread = (token pair, 32-channel slice): lanes tid % (D/32) of a pair hold consecutive 32-channel slices;
//          each unpacks the codes of its 2 tokens once into 64 floats and does RB·64 FMAs against qs read as float4
//          from shared memory (XOR-swizzled so the D/32 slices of a warp hit distinct banks); partial dots are
//          reduced with __shfl_xor_sync over the D/32 lanes, qz added, masked (range, causal) -> s[RB][TT].
//   softmax warp per row (rows warp, warp+4): tile max, rescale factor alpha, p = exp2(s - m), l update
//          -> p[TT][RB], alpha[RB].
//   PV     thread = (channel slice of CV channels, token slice): CV = 16 (RB <= 4) or 8 (RB = 8), all RB rows
//          in registers (acc[RB][CV] + zacc[RB]); tokens t ≡ slice (mod 128·CV/D).  Quantized:
//          acc += (p·s)·codes, zacc += p·z (CV <= 16 <= v_group, so a slice lies in one V group).
//          The slices are reduced once at the end (shuffles, then shared memory across the 4 warps).
// Unpacking without shifts or int->float conversions: code i of a 32-bit word is masked in place and OR-ed into
// the mantissa of 2^23, so (float(bits | 0x4B000000) - 2^23) = code · 2^(bits·pos) exactly (pos = i for the low
// codes, the high ones come from one shifted copy of the word).  The power of two is folded into qs for K and
// removed from acc once at the end for V (full-precision V rows are multiplied by its inverse instead) — exact.
// Quantized tiles (codes, per-token V metadata, per-channel K metadata of the groups touched) are staged in shared
// memory with 16-byte cp.async in a 3-stage ring (two tiles in flight while one is computed); full-precision
// tokens (sinks, residual) are read directly with 16-byte loads.  Quantized tiles start at even indices and never
// span more than nslot K groups, so a token pair shares its qs slot unless k_group is odd (handled per token).
// Nothing dequantized is ever written to global memory.
//
// Per-token keys (k_per_token, groups of k_group channels, k_group a multiple of 32): qs is q·2^-pos once per CTA
// (fold_per_token_keys) and qz the per-row sums of q over each 32-channel slice; a lane's slice lies in one channel
// group, so its partial dot becomes scale·dot + zero·Σq with the token's own metadata (staged like V's) before the
// lane reduction.  Tiles are then limited only by TT.
// Supported: D in {32, 64, 128, 256}; bits_k, bits_v in {1, 2, 4, 8} (fast paths (2,2), (4,4), (2,4), (4,2), the
// others through one runtime-bits kernel); v_group % 16 == 0 and D % v_group == 0; any k_group >= 1; any g, Tq.
// k_codes/v_codes/k_fp/v_fp must be 16-byte aligned, metadata aligned to its element size, workspace 8-byte aligned.
// Registers: __launch_bounds__(128, 3) for 4/8 rows (<= 168 regs), (128, 4) for 1/2 rows (<= 128 regs).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fwht_device.cuh"
#include "kvengine/attention.h"
#include "ptx.cuh"
#include "kvengine/cuda_ops.h"

namespace kvengine::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 3;
constexpr int kTileElems = 8192;  // TT * D: 2 tokens x 32 channels per thread in the score phase
constexpr int64_t kMinChunk = 256;  // smallest split of the capacity (host side)
constexpr int64_t kTargetCtas = 132 * 8;
constexpr int kMaxSplits = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;
constexpr const char* kErr = "kvengine::cuda::quant_decode_attention: ";

enum : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// what every kernel reads of the cache and the queries (filled from DecodeAttentionArgs by fill_cache_view)
struct CacheView {
  const void* q;
  int64_t q_sb, q_sh, q_st;
  int dtype, meta;  // DType as int
  int Hkv, Tq, D, g;
  float qscale;  // softmax_scale * log2(e)
  const uint8_t* kc;
  const uint8_t* ks;
  const uint8_t* kz;
  const uint8_t* vc;
  const uint8_t* vs;
  const uint8_t* vz;
  int bits_k, bits_v;
  int ktok, ngk, ngv;  // per-token keys: D / k_group channel groups; V: D / v_group groups
  int64_t q_cap, f_cap;
  const void* kf;
  const void* vf;
  const int32_t* lens;
};

struct Params : CacheView {
  int R, nRB, S;
  int kg, vg_log2, nslot;
  int kgc_log2;  // per-token keys: channel groups of 2^kgc_log2 channels (kg = the tile limit then)
  int TT, lpt_log2;  // lanes per token (score phase) = D / 32
  int krow, vrow, msz;
  // shared memory layout (bytes)
  int o_q, o_qs, o_qz, o_s, o_p, o_al, o_vmf, o_ring;
  int st_bytes, st_kc, st_vc, st_vs, st_vz, st_ks, st_kz;
  float2* ws_ml;
  float* ws_acc;
};

struct MergeParams {
  const float2* ws_ml;
  const float* ws_acc;
  void* out;
  int dtype, Hkv, Hq, Tq, D, g, R, S;
};

// ---- small device helpers ------------------------------------------------------------------------------------------

// v clamped to [lo, hi] (lo <= hi)
__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

__device__ __forceinline__ int swz(int d) { return d ^ (((d >> 5) & 7) << 2); }  // float index in a q / qs row

__device__ __forceinline__ float pow2i(int e) { return __uint_as_float(static_cast<uint32_t>(127 + e) << 23); }

// exponent (in units of bits) of the in-place unpacking of code c of an aligned word group; see decode_word
__host__ __device__ constexpr int code_pos(int bits, int c) {
  const int per = 32 / bits;
  const int low = (23 / bits) < per ? (23 / bits) : per;
  const int i = c % per;
  return i < low ? i : i - low;
}

__device__ __forceinline__ float meta_at(const uint8_t* base, int64_t i, int meta) {
  if (meta == kF32) return reinterpret_cast<const float*>(base)[i];
  const uint16_t u = reinterpret_cast<const uint16_t*>(base)[i];
  if (meta == kF16) return __half2float(__ushort_as_half(u));
  return __uint_as_float(static_cast<uint32_t>(u) << 16);
}

__device__ __forceinline__ float elem_at(const void* base, int64_t i, int dtype) {
  if (dtype == kF32) return static_cast<const float*>(base)[i];
  const uint16_t u = static_cast<const uint16_t*>(base)[i];
  if (dtype == kF16) return __half2float(__ushort_as_half(u));
  return __uint_as_float(static_cast<uint32_t>(u) << 16);
}

// 8 contiguous elements (16-byte aligned) as floats
__device__ __forceinline__ void load8(const void* base, int64_t off, int dtype, float (&v)[8]) {
  if (dtype == kF32)
    detail::load8_vec(static_cast<const float*>(base) + off, v);
  else if (dtype == kF16)
    detail::load8_vec(static_cast<const __half*>(base) + off, v);
  else
    detail::load8_vec(static_cast<const __nv_bfloat16*>(base) + off, v);
}

using ptx::cp_async16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;

// Stage bytes [src, src + n) into shared memory: byte x of the range lands at dst + (src & 15) + x.  Whole aligned
// 16-byte chunks go through cp.async; the (rare) partial head / tail chunks are copied byte by byte.
__device__ __forceinline__ void stage_copy(uint8_t* dst, const uint8_t* src, int64_t n, int tid) {
  if (n <= 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(src), e = a + static_cast<uintptr_t>(n);
  const uintptr_t a0 = a & ~uintptr_t(15);
  const int nch = static_cast<int>((e - a0 + 15) >> 4);
  for (int i = tid; i < nch; i += kThreads) {
    const uintptr_t ca = a0 + 16 * static_cast<uintptr_t>(i);
    if (ca >= a && ca + 16 <= e) {
      cp_async16(dst + 16 * i, reinterpret_cast<const void*>(ca));
    } else {
#pragma unroll 1
      for (int k = 0; k < 16; ++k) {
        const uintptr_t x = ca + k;
        if (x >= a && x < e) dst[16 * i + k] = *reinterpret_cast<const uint8_t*>(x);
      }
    }
  }
}

__device__ __forceinline__ int stage_mis(const void* src) { return static_cast<int>(reinterpret_cast<uintptr_t>(src) & 15); }

// ---- code unpacking ------------------------------------------------------------------------------------------------

template <int BITS>
struct CodeFmt {
  static constexpr int kPerWord = 32 / BITS;
  static constexpr int kLow = (23 / BITS) < kPerWord ? (23 / BITS) : kPerWord;  // codes masked in place
  static constexpr int kShift = BITS * kLow;                                   // the rest: from w >> kShift
  static constexpr uint32_t kMask = (1u << BITS) - 1u;
};

// out[i] = code_i(w) * 2^(BITS * code_pos(BITS, i)), exactly, for i < N (N <= codes per word)
template <int BITS, int N>
__device__ __forceinline__ void decode_word(uint32_t w, float* out) {
  using F = CodeFmt<BITS>;
  const uint32_t hi = w >> F::kShift;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const uint32_t x = i < F::kLow ? (w & (F::kMask << (BITS * i))) : (hi & (F::kMask << (BITS * (i - F::kLow))));
    out[i] = __uint_as_float(x | 0x4B000000u) - 8388608.0f;
  }
}

// The 32 codes of a 32-channel slice, kept packed: BITS 32-bit words (4·BITS bytes at p, aligned to
// min(16, 4·BITS)); unpacked 4 at a time by decode4 right where they are used (few live registers).
template <int BITS>
__device__ __forceinline__ void load_slice(const uint8_t* p, uint32_t (&w)[8]) {
  if constexpr (BITS == 1) {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else if constexpr (BITS == 2) {
    const uint2 a = *reinterpret_cast<const uint2*>(p);
    w[0] = a.x;
    w[1] = a.y;
  } else {
#pragma unroll
    for (int i = 0; i < BITS / 4; ++i) {
      const uint4 a = reinterpret_cast<const uint4*>(p)[i];
      w[4 * i] = a.x;
      w[4 * i + 1] = a.y;
      w[4 * i + 2] = a.z;
      w[4 * i + 3] = a.w;
    }
  }
}

// codes 4k .. 4k+3 of the slice (k a compile-time constant after unrolling), scaled as decode_word does
template <int BITS>
__device__ __forceinline__ void decode4(const uint32_t (&w)[8], int k, float (&o)[4]) {
  using F = CodeFmt<BITS>;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int c = 4 * k + e, wi = c / F::kPerWord, i = c % F::kPerWord;
    const uint32_t x =
        i < F::kLow ? (w[wi] & (F::kMask << (BITS * i))) : ((w[wi] >> F::kShift) & (F::kMask << (BITS * (i - F::kLow))));
    o[e] = __uint_as_float(x | 0x4B000000u) - 8388608.0f;
  }
}

// BITS == 0: the width is a runtime value
template <int BITS>
__device__ __forceinline__ void load_slice_any(int bits, const uint8_t* row, int cp, uint32_t (&w)[8]) {
  if constexpr (BITS != 0) {
    load_slice<BITS>(row + cp * 4 * BITS, w);
  } else {
    switch (bits) {
      case 1: load_slice<1>(row + cp * 4, w); break;
      case 2: load_slice<2>(row + cp * 8, w); break;
      case 4: load_slice<4>(row + cp * 16, w); break;
      default: load_slice<8>(row + cp * 32, w); break;
    }
  }
}

template <int BITS>
__device__ __forceinline__ void decode4_any(int bits, const uint32_t (&w)[8], int k, float (&o)[4]) {
  if constexpr (BITS != 0) {
    decode4<BITS>(w, k, o);
  } else {
    switch (bits) {
      case 1: decode4<1>(w, k, o); break;
      case 2: decode4<2>(w, k, o); break;
      case 4: decode4<4>(w, k, o); break;
      default: decode4<8>(w, k, o); break;
    }
  }
}

// the CV codes of a CV-channel slice (CV·BITS/8 bytes at p, aligned to that size)
template <int BITS, int CV>
__device__ __forceinline__ void decodeV(const uint8_t* p, float (&f)[CV]) {
  constexpr int NB = CV * BITS / 8;
  if constexpr (NB == 1) {
    decode_word<BITS, CV>(static_cast<uint32_t>(*p), f);
  } else if constexpr (NB == 2) {
    decode_word<BITS, CV>(static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(p)), f);
  } else if constexpr (NB == 4) {
    decode_word<BITS, CV>(*reinterpret_cast<const uint32_t*>(p), f);
  } else if constexpr (NB == 8) {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    decode_word<BITS, CV / 2>(w.x, f);
    decode_word<BITS, CV / 2>(w.y, f + CV / 2);
  } else {
    const uint4 w = *reinterpret_cast<const uint4*>(p);
    decode_word<BITS, CV / 4>(w.x, f);
    decode_word<BITS, CV / 4>(w.y, f + CV / 4);
    decode_word<BITS, CV / 4>(w.z, f + CV / 2);
    decode_word<BITS, CV / 4>(w.w, f + 3 * CV / 4);
  }
}

template <int BITS, int CV>
__device__ __forceinline__ void decodeV_any(int bits, const uint8_t* row, float (&f)[CV], int cs) {
  if constexpr (BITS != 0) {
    decodeV<BITS, CV>(row + cs * (CV * BITS / 8), f);
  } else {
    switch (bits) {
      case 1: decodeV<1, CV>(row + cs * (CV / 8), f); break;
      case 2: decodeV<2, CV>(row + cs * (CV / 4), f); break;
      case 4: decodeV<4, CV>(row + cs * (CV / 2), f); break;
      default: decodeV<8, CV>(row + cs * CV, f); break;
    }
  }
}

template <int RB>
__device__ __forceinline__ void load_rows(const float* p, float (&v)[RB]) {
  if constexpr (RB == 1) {
    v[0] = p[0];
  } else if constexpr (RB == 2) {
    const float2 a = *reinterpret_cast<const float2*>(p);
    v[0] = a.x;
    v[1] = a.y;
  } else {
#pragma unroll
    for (int i = 0; i < RB / 4; ++i) {
      const float4 a = reinterpret_cast<const float4*>(p)[i];
      v[4 * i] = a.x;
      v[4 * i + 1] = a.y;
      v[4 * i + 2] = a.z;
      v[4 * i + 3] = a.w;
    }
  }
}

__device__ __forceinline__ int quant_tile_len(int j, int jhi, int TT, int kg, int nslot) {
  int nt = min(TT, jhi - j);
  const int64_t lim = (static_cast<int64_t>(j / kg) + nslot) * kg - j;  // at most nslot K groups per tile
  if (lim < nt) nt = static_cast<int>(lim);
  return nt;
}

// ---- the split kernel ----------------------------------------------------------------------------------------------

template <int BK, int BV, int RB>
struct SplitCta {
  static constexpr int CV = RB >= 8 ? 8 : 16;  // PV channels per thread
  static constexpr int NROWW = (RB + kWarps - 1) / kWarps;

  const Params& p;
  uint8_t* smem;
  float* q_s;    // [RB][D] swizzled, prescaled
  float* qs_s;   // [nslot][RB][D] swizzled
  float* qz_s;   // [nslot][RB]
  float* s_s;    // [RB][TT]
  float* p_s;    // [TT][RB]
  float* al_s;   // [RB]
  float2* vmf;   // [TT][ngv]
  uint8_t* ring;
  int tid, lane, warp;
  int64_t bh;
  int ns, nq, N, r0, Rc;
  int bits_k, bits_v;

  // online softmax state of rows warp + 4 i (lane-replicated) and the PV accumulators
  float m_st[NROWW], l_st[NROWW];
  float acc[RB][CV];
  float zacc[RB];

  __device__ __forceinline__ int lim_of(int r) const { return N - p.Tq + (r0 + r) % p.Tq; }

  // ---- quantized tiles ----
  __device__ __forceinline__ void issue_quant(int stage, int j0, int nt) {
    uint8_t* buf = ring + stage * p.st_bytes;
    const int64_t tok0 = bh * p.q_cap + j0;
    stage_copy(buf + p.st_kc, p.kc + tok0 * p.krow, static_cast<int64_t>(nt) * p.krow, tid);
    stage_copy(buf + p.st_vc, p.vc + tok0 * p.vrow, static_cast<int64_t>(nt) * p.vrow, tid);
    const int64_t vm0 = tok0 * p.ngv * p.msz, vmn = static_cast<int64_t>(nt) * p.ngv * p.msz;
    stage_copy(buf + p.st_vs, p.vs + vm0, vmn, tid);
    stage_copy(buf + p.st_vz, p.vz + vm0, vmn, tid);
    if (p.ktok) {  // per-token K metadata of the tile, like V's
      const int64_t km0 = tok0 * p.ngk * p.msz, kmn = static_cast<int64_t>(nt) * p.ngk * p.msz;
      stage_copy(buf + p.st_ks, p.ks + km0, kmn, tid);
      stage_copy(buf + p.st_kz, p.kz + km0, kmn, tid);
      return;
    }
    const int g0 = j0 / p.kg, g1 = (j0 + nt - 1) / p.kg;
    const int64_t km0 = (bh * (p.q_cap / p.kg) + g0) * p.D * p.msz;
    const int64_t kmn = static_cast<int64_t>(g1 - g0 + 1) * p.D * p.msz;
    stage_copy(buf + p.st_ks, p.ks + km0, kmn, tid);
    stage_copy(buf + p.st_kz, p.kz + km0, kmn, tid);
  }

  // per-token keys: qs slot 0 = q · 2^-pos (no K scale: it is applied per token in score_quant) and
  // qz_s[r · LPT + cp] = Σ q over the 32-channel slice cp of row r (times the token's zero point there), once per CTA
  __device__ __forceinline__ void fold_per_token_keys() {
    const int D = p.D, LPT = D >> 5;
    for (int i = tid; i < RB * D; i += kThreads) {
      const int r = i / D, d = i - r * D;
      qs_s[r * D + swz(d)] = q_s[r * D + swz(d)] * pow2i(-bits_k * code_pos(bits_k, d & 31));
    }
    for (int i = tid; i < RB * LPT; i += kThreads) {
      const int r = i / LPT, cp = i - r * LPT;
      float sum = 0.f;
      for (int e = 0; e < 32; ++e) sum += q_s[r * D + swz(32 * cp + e)];
      qz_s[r * LPT + cp] = sum;
    }
  }

  // qs / qz for the K groups of the tile; V metadata -> fp32 pairs
  __device__ __forceinline__ void fold(const uint8_t* buf, int j0, int nt) {
    const int D = p.D, LPT = D >> 5;
    const int64_t tok0 = bh * p.q_cap + j0;
    const int g0 = j0 / p.kg, nsl = (j0 + nt - 1) / p.kg - g0 + 1;
    const int64_t km0 = (bh * (p.q_cap / p.kg) + g0) * D * p.msz;
    const uint8_t* ks = buf + p.st_ks + stage_mis(p.ks + km0);
    const uint8_t* kz = buf + p.st_kz + stage_mis(p.kz + km0);
    const int items = p.ktok ? 0 : nsl * RB * LPT;  // per-token keys: qs / qz are fixed (fold_per_token_keys)
    for (int base = 0; base < items; base += kThreads) {  // uniform trip count: shuffles below
      const int it = base + tid;
      const int cp = it & (LPT - 1);
      const int rs = it >> p.lpt_log2;
      const int r = rs % RB, sl = rs / RB;
      float zp = 0.f;
      if (it < items) {
        const float* qrow = q_s + r * D;
        float* qsrow = qs_s + (sl * RB + r) * D;
#pragma unroll 2
        for (int k = 0; k < 8; ++k) {
          const int d0 = 32 * cp + 4 * k;
          const int ph = swz(d0);
          const float4 q4 = *reinterpret_cast<const float4*>(qrow + ph);
          const float qv[4] = {q4.x, q4.y, q4.z, q4.w};
          float o[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t mi = static_cast<int64_t>(sl) * D + d0 + e;
            const float sc = meta_at(ks, mi, p.meta), zr = meta_at(kz, mi, p.meta);
            o[e] = (qv[e] * sc) * pow2i(-bits_k * code_pos(bits_k, 4 * k + e));
            zp = fmaf(qv[e], zr, zp);
          }
          *reinterpret_cast<float4*>(qsrow + ph) = make_float4(o[0], o[1], o[2], o[3]);
        }
      }
      for (int off = 1; off < LPT; off <<= 1) zp += __shfl_xor_sync(kFull, zp, off);
      if (it < items && cp == 0) qz_s[sl * RB + r] = zp;
    }
    const int64_t vm0 = tok0 * p.ngv * p.msz;
    const uint8_t* vs = buf + p.st_vs + stage_mis(p.vs + vm0);
    const uint8_t* vz = buf + p.st_vz + stage_mis(p.vz + vm0);
    for (int i = tid; i < nt * p.ngv; i += kThreads) vmf[i] = make_float2(meta_at(vs, i, p.meta), meta_at(vz, i, p.meta));
  }

  // partial dots of 2 tokens (packed codes) against the RB rows of a [RB][D] swizzled qs slot, over this lane's
  // 32 channels
  __device__ __forceinline__ void dot2(const float* qsl, int cp, const uint32_t (&wA)[8], const uint32_t (&wB)[8],
                                       float (&pa)[RB], float (&pb)[RB]) const {
#pragma unroll
    for (int r = 0; r < RB; ++r) pa[r] = pb[r] = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int ph = 32 * cp + 4 * (k ^ (cp & 7));
      float cA[4], cB[4];
      decode4_any<BK>(bits_k, wA, k, cA);
      decode4_any<BK>(bits_k, wB, k, cB);
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        const float4 q4 = *reinterpret_cast<const float4*>(qsl + r * p.D + ph);
        pa[r] = fmaf(q4.x, cA[0], pa[r]);
        pb[r] = fmaf(q4.x, cB[0], pb[r]);
        pa[r] = fmaf(q4.y, cA[1], pa[r]);
        pb[r] = fmaf(q4.y, cB[1], pb[r]);
        pa[r] = fmaf(q4.z, cA[2], pa[r]);
        pb[r] = fmaf(q4.z, cB[2], pb[r]);
        pa[r] = fmaf(q4.w, cA[3], pa[r]);
        pb[r] = fmaf(q4.w, cB[3], pb[r]);
      }
    }
  }

  // partial dots of one full-precision key row (32 channels of this lane) against the RB query rows
  __device__ __forceinline__ void dot1_fp(int64_t off, int cp, float (&pa)[RB]) const {
#pragma unroll
    for (int r = 0; r < RB; ++r) pa[r] = 0.f;
#pragma unroll 1
    for (int i = 0; i < 4; ++i) {
      float v[8];
      load8(p.kf, off + 8 * i, p.dtype, v);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int k = 2 * i + h;
        const int ph = 32 * cp + 4 * (k ^ (cp & 7));
#pragma unroll
        for (int r = 0; r < RB; ++r) {
          const float4 q4 = *reinterpret_cast<const float4*>(q_s + r * p.D + ph);
          pa[r] = fmaf(q4.x, v[4 * h], pa[r]);
          pa[r] = fmaf(q4.y, v[4 * h + 1], pa[r]);
          pa[r] = fmaf(q4.z, v[4 * h + 2], pa[r]);
          pa[r] = fmaf(q4.w, v[4 * h + 3], pa[r]);
        }
      }
    }
  }

  // reduce over the D/32 lanes of a token pair, then store masked scores
  __device__ __forceinline__ void store_scores(float (&ra)[RB], float (&rb)[RB], int cp, int tA, int nt, bool vA,
                                               bool vB, int posA, const float* qzA, const float* qzB) {
    const int LPT = p.D >> 5;
    for (int off = 1; off < LPT; off <<= 1) {
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        ra[r] += __shfl_xor_sync(kFull, ra[r], off);
        rb[r] += __shfl_xor_sync(kFull, rb[r], off);
      }
    }
    const float ninf = -__int_as_float(0x7f800000);
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      if ((r & (LPT - 1)) == cp && r < Rc) {
        const int lim = lim_of(r);
        if (tA < nt) s_s[r * p.TT + tA] = (vA && posA <= lim) ? ra[r] + (qzA ? qzA[r] : 0.f) : ninf;
        if (tA + 1 < nt) s_s[r * p.TT + tA + 1] = (vB && posA + 1 <= lim) ? rb[r] + (qzB ? qzB[r] : 0.f) : ninf;
      }
    }
  }

  __device__ __forceinline__ void score_quant(const uint8_t* buf, int j0, int nt, int jlo) {
    const int cp = tid & ((p.D >> 5) - 1), pi = tid >> p.lpt_log2;
    const int tA = 2 * pi, tB = tA + 1;
    const uint8_t* kcs = buf + p.st_kc + stage_mis(p.kc + (bh * p.q_cap + j0) * p.krow);
    uint32_t wA[8], wB[8];
    load_slice_any<BK>(bits_k, kcs + tA * p.krow, cp, wA);
    load_slice_any<BK>(bits_k, kcs + tB * p.krow, cp, wB);
    float ra[RB], rb[RB];
    const bool vA = tA < nt && j0 + tA >= jlo, vB = tB < nt && j0 + tB >= jlo;
    if (p.ktok) {
      // per-token keys: the lane's 32 channels lie in one channel group gk; score part = s·(q·code) + z·Σq
      dot2(qs_s, cp, wA, wB, ra, rb);
      const int gk = (32 * cp) >> p.kgc_log2;
      const int64_t km0 = (bh * p.q_cap + j0) * p.ngk * p.msz;
      const uint8_t* ks = buf + p.st_ks + stage_mis(p.ks + km0);
      const uint8_t* kz = buf + p.st_kz + stage_mis(p.kz + km0);
      // tokens past the tile end read the tile's first token (staged) instead; their scores are masked below
      const int iA = (tA < nt ? tA : 0) * p.ngk + gk, iB = (tB < nt ? tB : 0) * p.ngk + gk;
      const float sA = meta_at(ks, iA, p.meta), zA = meta_at(kz, iA, p.meta);
      const float sB = meta_at(ks, iB, p.meta), zB = meta_at(kz, iB, p.meta);
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        const float qsum = qz_s[r * (p.D >> 5) + cp];
        ra[r] = fmaf(ra[r], sA, zA * qsum);
        rb[r] = fmaf(rb[r], sB, zB * qsum);
      }
      store_scores(ra, rb, cp, tA, nt, vA, vB, ns + j0 + tA, nullptr, nullptr);
      return;
    }
    const int g0 = j0 / p.kg, nsl = (j0 + nt - 1) / p.kg - g0 + 1;
    const int sa = min((j0 + tA) / p.kg - g0, nsl - 1), sb = min((j0 + tB) / p.kg - g0, nsl - 1);
    dot2(qs_s + sa * RB * p.D, cp, wA, wB, ra, rb);
    if (sb != sa) {  // the pair straddles a K group boundary (odd k_group): token B again with its own slot
      float t0[RB], t1[RB];
      dot2(qs_s + sb * RB * p.D, cp, wB, wB, t0, t1);
#pragma unroll
      for (int r = 0; r < RB; ++r) rb[r] = t0[r];
    }
    store_scores(ra, rb, cp, tA, nt, vA, vB, ns + j0 + tA, qz_s + sa * RB, qz_s + sb * RB);
  }

  __device__ __forceinline__ void score_fp(int slot0, int pos0, int nt) {
    const int cp = tid & ((p.D >> 5) - 1), pi = tid >> p.lpt_log2;
    const int tA = 2 * pi, tB = tA + 1;
    const int64_t row0 = (bh * p.f_cap + slot0) * p.D + 32 * cp;
    float ra[RB], rb[RB];
    // every lane makes both calls (shuffles follow); a token past the tile end reads the tile's first row instead
    dot1_fp(row0 + static_cast<int64_t>(tA < nt ? tA : 0) * p.D, cp, ra);
    dot1_fp(row0 + static_cast<int64_t>(tB < nt ? tB : 0) * p.D, cp, rb);
    store_scores(ra, rb, cp, tA, nt, tA < nt, tB < nt, pos0 + tA, nullptr, nullptr);
  }

  // ---- online softmax over the tile ----
  __device__ __forceinline__ void softmax(int nt) {
    const float ninf = -__int_as_float(0x7f800000);
#pragma unroll
    for (int i = 0; i < NROWW; ++i) {
      const int r = warp + kWarps * i;
      if (r < Rc) {
        const float* srow = s_s + r * p.TT;
        float mx = ninf;
        for (int t = lane; t < nt; t += 32) mx = fmaxf(mx, srow[t]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
        const float mn = fmaxf(m_st[i], mx);
        float alpha = 1.f, sum = 0.f;
        if (mn == ninf) {
          for (int t = lane; t < nt; t += 32) p_s[t * RB + r] = 0.f;
        } else {
          alpha = exp2f(m_st[i] - mn);  // 0 when m was -inf
          for (int t = lane; t < nt; t += 32) {
            const float e = exp2f(srow[t] - mn);
            p_s[t * RB + r] = e;
            sum += e;
          }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
        l_st[i] = l_st[i] * alpha + sum;
        m_st[i] = mn;
        if (lane == 0) al_s[r] = alpha;
      }
    }
  }

  __device__ __forceinline__ void rescale() {
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      const float a = al_s[r];
      if (a != 1.f) {
#pragma unroll
        for (int c = 0; c < CV; ++c) acc[r][c] *= a;
        zacc[r] *= a;
      }
    }
  }

  __device__ __forceinline__ void pv_quant(const uint8_t* buf, int j0, int nt, int tv0) {
    const int ncs_log2 = p.lpt_log2 + 5 - (CV == 16 ? 4 : 3);  // log2(D / CV)
    const int cs = tid & ((1 << ncs_log2) - 1), ts = tid >> ncs_log2, nts = kThreads >> ncs_log2;
    const int gv = (cs * CV) >> p.vg_log2;
    const uint8_t* vcs = buf + p.st_vc + stage_mis(p.vc + (bh * p.q_cap + j0) * p.vrow);
    rescale();
#pragma unroll 2
    for (int t = ts; t < nt; t += nts) {
      if (t < tv0) continue;
      const float2 sz = vmf[t * p.ngv + gv];
      float pr[RB];
      load_rows<RB>(p_s + t * RB, pr);
      float f[CV];
      decodeV_any<BV, CV>(bits_v, vcs + t * p.vrow, f, cs);
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        const float ps = pr[r] * sz.x;
        zacc[r] = fmaf(pr[r], sz.y, zacc[r]);
#pragma unroll
        for (int c = 0; c < CV; ++c) acc[r][c] = fmaf(ps, f[c], acc[r][c]);
      }
    }
  }

  __device__ __forceinline__ void pv_fp(int slot0, int nt) {
    const int ncs_log2 = p.lpt_log2 + 5 - (CV == 16 ? 4 : 3);
    const int cs = tid & ((1 << ncs_log2) - 1), ts = tid >> ncs_log2, nts = kThreads >> ncs_log2;
    float finv[CV];  // values enter acc in the scaled domain of the quantized codes
#pragma unroll
    for (int c = 0; c < CV; ++c) finv[c] = pow2i(bits_v * code_pos(bits_v, c));
    rescale();
    const int64_t row0 = (bh * p.f_cap + slot0) * p.D + cs * CV;
#pragma unroll 1
    for (int t = ts; t < nt; t += nts) {
      float pr[RB];
      load_rows<RB>(p_s + t * RB, pr);
      float v[CV];
#pragma unroll
      for (int i = 0; i < CV / 8; ++i) {
        float w[8];
        load8(p.vf, row0 + static_cast<int64_t>(t) * p.D + 8 * i, p.dtype, w);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[8 * i + e] = w[e] * finv[8 * i + e];
      }
#pragma unroll
      for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int c = 0; c < CV; ++c) acc[r][c] = fmaf(pr[r], v[c], acc[r][c]);
    }
  }

  // full-precision tokens: logical [lo, hi) at fp slots starting at slot0
  __device__ __forceinline__ void fp_segment(int lo, int hi, int slot0) {
    for (int p0 = lo; p0 < hi; p0 += min(p.TT, hi - p0)) {  // never steps past hi (no overflow near 2^31)
      const int nt = min(p.TT, hi - p0), sl = slot0 + (p0 - lo);
      __syncthreads();
      score_fp(sl, p0, nt);
      __syncthreads();
      softmax(nt);
      __syncthreads();
      pv_fp(sl, nt);
    }
  }

  __device__ __forceinline__ void run() {
    const int D = p.D, TT = p.TT;
    int bid = static_cast<int>(blockIdx.x);
    const int rb = bid % p.nRB;
    bid /= p.nRB;
    const int s = bid % p.S;
    bid /= p.S;
    const int h = bid % p.Hkv, b = bid / p.Hkv;
    bh = static_cast<int64_t>(b) * p.Hkv + h;
    // lens are not checked on the host for CUDA inputs (that would need a sync): clamp them to the capacities so
    // that no slot outside the cache is ever read (valid lens are unchanged).  q_cap + f_cap < 2^31 (binding).
    const int64_t fcap = p.f_cap;
    ns = static_cast<int>(clamp64(__ldg(p.lens + 3 * b), 0, fcap));
    nq = static_cast<int>(clamp64(__ldg(p.lens + 3 * b + 1), 0, p.q_cap));
    const int nr = static_cast<int>(clamp64(__ldg(p.lens + 3 * b + 2), 0, fcap - ns));
    N = ns + nq + nr;
    r0 = rb * RB;
    Rc = min(RB, p.R - r0);
    const int64_t prow0 = (bh * p.S + s) * p.R + r0;
    // this split's share of the actual length, in whole tiles (64-bit: N + S and the rounding may pass 2^31)
    int64_t chunk = (static_cast<int64_t>(N) + p.S - 1) / p.S;
    chunk = (chunk + TT - 1) / TT * TT;
    if (chunk < TT) chunk = TT;
    const int64_t c0l = static_cast<int64_t>(s) * chunk;
    const float ninf = -__int_as_float(0x7f800000);
    if (c0l >= N) {
      if (tid < Rc) p.ws_ml[prow0 + tid] = make_float2(ninf, 0.f);
      return;
    }
    const int c0 = static_cast<int>(c0l), c1 = static_cast<int>(clamp64(c0l + chunk, 0, N));

    // queries of the row block, prescaled (scale · log2 e), swizzled; unused rows are zero
    for (int i = tid; i < RB * D; i += kThreads) {
      const int r = i / D, d = i - r * D;
      float v = 0.f;
      if (r < Rc) {
        const int rg = r0 + r, hl = rg / p.Tq, tq = rg - hl * p.Tq, hq = h * p.g + hl;
        v = elem_at(p.q, b * p.q_sb + hq * p.q_sh + tq * p.q_st + d, p.dtype) * p.qscale;
      }
      q_s[r * D + swz(d)] = v;
    }
    for (int i = tid; i < TT * RB; i += kThreads) p_s[i] = 0.f;
    if (tid < RB) al_s[tid] = 1.f;
    if (p.ktok) {
      __syncthreads();  // q_s complete
      fold_per_token_keys();  // read after the __syncthreads that precede every score phase
    }
#pragma unroll
    for (int i = 0; i < NROWW; ++i) {
      m_st[i] = ninf;
      l_st[i] = 0.f;
    }
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      zacc[r] = 0.f;
#pragma unroll
      for (int c = 0; c < CV; ++c) acc[r][c] = 0.f;
    }

    // quantized range in quant indices [jlo, jhi); tiles start at even indices
    const int jlo = max(c0, ns) - ns, jhi = min(c1, ns + nq) - ns;
    const bool has_q = jlo < jhi;
    int jiss = jlo & ~1;
    if (has_q) {  // prologue: the first kStages - 1 tiles in flight while the sinks are processed
#pragma unroll
      for (int st = 0; st < kStages - 1; ++st) {
        if (jiss < jhi) {
          const int nt = quant_tile_len(jiss, jhi, TT, p.kg, p.nslot);
          issue_quant(st, jiss, nt);
          jiss += nt;
        }
        cp_async_commit();
      }
    }
    // sinks: logical [c0, min(ns, c1)) = fp slots of the same index
    if (c0 < min(ns, c1)) fp_segment(c0, min(ns, c1), c0);
    if (has_q) {
      int it = 0;
      for (int j = jlo & ~1; j < jhi; ++it) {
        const int nt = quant_tile_len(j, jhi, TT, p.kg, p.nslot);
        cp_async_wait<kStages - 2>();
        __syncthreads();
        if (jiss < jhi) {
          const int nn = quant_tile_len(jiss, jhi, TT, p.kg, p.nslot);
          issue_quant((it + kStages - 1) % kStages, jiss, nn);
          jiss += nn;
        }
        cp_async_commit();
        const uint8_t* buf = ring + (it % kStages) * p.st_bytes;
        fold(buf, j, nt);
        __syncthreads();
        score_quant(buf, j, nt, jlo);
        __syncthreads();
        softmax(nt);
        __syncthreads();
        pv_quant(buf, j, nt, jlo - j);
        j += nt;
      }
      cp_async_wait<0>();
    }
    // residual: logical [ns + nq, N) = fp slots [ns, ns + nr)
    {
      const int lo = max(c0, ns + nq);
      if (lo < c1) fp_segment(lo, c1, ns + (lo - ns - nq));
    }

    // ---- finalize: undo the code scaling, add the zero terms, reduce the token slices, write the partial ----
    const int ncs_log2 = p.lpt_log2 + 5 - (CV == 16 ? 4 : 3);
    const int ncs = 1 << ncs_log2, cs = tid & (ncs - 1);
#pragma unroll
    for (int c = 0; c < CV; ++c) {
      const float fac = pow2i(-bits_v * code_pos(bits_v, c));
#pragma unroll
      for (int r = 0; r < RB; ++r) acc[r][c] = fmaf(acc[r][c], fac, zacc[r]);
    }
    for (int off = ncs; off < 32; off <<= 1) {
#pragma unroll
      for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int c = 0; c < CV; ++c) acc[r][c] += __shfl_xor_sync(kFull, acc[r][c], off);
    }
    __syncthreads();  // every phase done (and no copy in flight): the ring becomes the reduction buffer
    float* red = reinterpret_cast<float*>(ring);  // [kWarps][RB][D]
    if (lane < ncs) {
#pragma unroll
      for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int c = 0; c < CV; c += 4)
          *reinterpret_cast<float4*>(red + (warp * RB + r) * D + cs * CV + c) =
              make_float4(acc[r][c], acc[r][c + 1], acc[r][c + 2], acc[r][c + 3]);
    }
    __syncthreads();
    for (int i = tid; i < Rc * D; i += kThreads) {
      const int r = i / D, d = i - r * D;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v += red[(w * RB + r) * D + d];
      p.ws_acc[(prow0 + r) * D + d] = v;
    }
#pragma unroll
    for (int i = 0; i < NROWW; ++i) {
      const int r = warp + kWarps * i;
      if (r < Rc && lane == 0) p.ws_ml[prow0 + r] = make_float2(m_st[i], l_st[i]);
    }
  }
};

// at most 168 registers for 4 and 8 rows (3 CTAs / SM), 128 for 1 and 2 rows (4 CTAs / SM)
template <int BK, int BV, int RB>
__global__ void __launch_bounds__(kThreads, RB >= 4 ? 3 : 4) attn_split_kernel(const Params p) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  SplitCta<BK, BV, RB> c{p};
  c.smem = smem_raw;
  c.q_s = reinterpret_cast<float*>(smem_raw + p.o_q);
  c.qs_s = reinterpret_cast<float*>(smem_raw + p.o_qs);
  c.qz_s = reinterpret_cast<float*>(smem_raw + p.o_qz);
  c.s_s = reinterpret_cast<float*>(smem_raw + p.o_s);
  c.p_s = reinterpret_cast<float*>(smem_raw + p.o_p);
  c.al_s = reinterpret_cast<float*>(smem_raw + p.o_al);
  c.vmf = reinterpret_cast<float2*>(smem_raw + p.o_vmf);
  c.ring = smem_raw + p.o_ring;
  c.tid = static_cast<int>(threadIdx.x);
  c.lane = c.tid & 31;
  c.warp = c.tid >> 5;
  c.bits_k = BK != 0 ? BK : p.bits_k;
  c.bits_v = BV != 0 ? BV : p.bits_v;
  c.run();
}

// ---- merge kernel --------------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) attn_merge_kernel(const MergeParams m) {
  __shared__ float wts[kMaxSplits];
  __shared__ float red[2 * kWarps];
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int row = static_cast<int>(blockIdx.x);
  const int rg = row % m.R;
  const int64_t bh = row / m.R;
  const float2* ml = m.ws_ml + bh * m.S * m.R + rg;  // split s at ml[s * R]
  const float ninf = -__int_as_float(0x7f800000);
  float mx = ninf;
  for (int s = tid; s < m.S; s += kThreads) {
    const float2 v = ml[static_cast<int64_t>(s) * m.R];
    if (v.y > 0.f) mx = fmaxf(mx, v.x);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  float M = red[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) M = fmaxf(M, red[w]);
  float lsum = 0.f;
  for (int s = tid; s < m.S; s += kThreads) {
    const float2 v = ml[static_cast<int64_t>(s) * m.R];
    const float w = v.y > 0.f ? exp2f(v.x - M) : 0.f;  // empty splits (l == 0) never touch their acc
    wts[s] = w;
    lsum += v.y * w;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) lsum += __shfl_xor_sync(kFull, lsum, off);
  if (lane == 0) red[kWarps + warp] = lsum;
  __syncthreads();
  float L = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) L += red[kWarps + w];
  const float inv = L > 0.f ? 1.f / L : 0.f;
  const int b = static_cast<int>(bh / m.Hkv), h = static_cast<int>(bh % m.Hkv);
  const int hq = h * m.g + rg / m.Tq, t = rg % m.Tq;
  const int64_t orow = ((static_cast<int64_t>(b) * m.Hq + hq) * m.Tq + t) * m.D;
  const float* accp = m.ws_acc + (bh * m.S * m.R + rg) * m.D;
  for (int d = tid; d < m.D; d += kThreads) {
    float o = 0.f;
    for (int s = 0; s < m.S; ++s) {
      const float w = wts[s];
      if (w != 0.f) o = fmaf(accp[static_cast<int64_t>(s) * m.R * m.D + d], w, o);
    }
    o *= inv;
    if (m.dtype == kF32)
      static_cast<float*>(m.out)[orow + d] = o;
    else if (m.dtype == kF16)
      static_cast<__half*>(m.out)[orow + d] = __float2half_rn(o);
    else
      static_cast<__nv_bfloat16*>(m.out)[orow + d] = __float2bfloat16_rn(o);
  }
}


// ---- sparse kernel (retrieval: attend only indices[b, h, :]) -------------------------------------------------------
// attn_sparse_kernel<D>: one CTA (4 warps) per (b, KV head h, split s of the index list, row block of <= 8 rows).
// Warp w takes the indices c0 + w, c0 + w + 4, ... of its split; per index the whole warp dequantizes one token
// (lane l owns the D/32 contiguous channels [l·D/32, (l+1)·D/32): its code bits, its K/V scale/zero), forms the
// RB row scores by a shuffle reduction and updates its own online softmax (exp2 of log2 e-prescaled scores).  The
// four warps' states are combined in shared memory and written as one partial per row for attn_merge_kernel.
// A random gather of single tokens: memory-latency bound; good enough for top-k ≤ 4096 tokens per head.
constexpr int kSparseRB = 8;
constexpr int kSparseMinChunk = 128;

struct SparseParams : CacheView {
  int R, nRB, S, chunk;
  int kg, vg;
  const int32_t* idx;
  int64_t n_idx;
  float2* ws_ml;
  float* ws_acc;
};

// code of element c of a row packed with `bits` bits per element (as quantize_pack does)
__device__ __forceinline__ float code_of(const uint8_t* row, int c, int bits) {
  const int bit = c * bits;
  return static_cast<float>((row[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1));
}

template <int D>
__global__ void __launch_bounds__(kThreads) attn_sparse_kernel(const SparseParams p) {
  constexpr int CPL = D / 32;  // channels per lane
  constexpr int RB = kSparseRB;
  __shared__ float q_s[RB * D];
  __shared__ float st_ml[kWarps][RB][2];
  __shared__ float st_acc[kWarps][RB][D];
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  int bid = static_cast<int>(blockIdx.x);
  const int rb = bid % p.nRB;
  bid /= p.nRB;
  const int s = bid % p.S;
  bid /= p.S;
  const int h = bid % p.Hkv, b = bid / p.Hkv;
  const int64_t bh = static_cast<int64_t>(b) * p.Hkv + h;
  const int r0 = rb * RB, Rc = min(RB, p.R - r0);
  const int64_t fcap = p.f_cap;
  const int ns = static_cast<int>(clamp64(__ldg(p.lens + 3 * b), 0, fcap));
  const int nq = static_cast<int>(clamp64(__ldg(p.lens + 3 * b + 1), 0, p.q_cap));
  const int nr = static_cast<int>(clamp64(__ldg(p.lens + 3 * b + 2), 0, fcap - ns));
  const int64_t N = static_cast<int64_t>(ns) + nq + nr;
  for (int i = tid; i < RB * D; i += kThreads) {  // query rows (head hl = row, Tq = 1), prescaled; unused rows zero
    const int r = i / D, d = i - r * D;
    const int hq = h * p.g + r0 + r;
    q_s[i] = r < Rc ? elem_at(p.q, b * p.q_sb + hq * p.q_sh + d, p.dtype) * p.qscale : 0.f;
  }
  __syncthreads();
  const int c0 = lane * CPL;
  float qr[RB][CPL], acc[RB][CPL], m[RB], l[RB];
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < CPL; ++e) {
      qr[r][e] = q_s[r * D + c0 + e];
      acc[r][e] = 0.f;
    }
  }
  const int64_t i0 = static_cast<int64_t>(s) * p.chunk;
  const int64_t i1 = min(p.n_idx, i0 + p.chunk);
  const int32_t* ix = p.idx + bh * p.n_idx;
  for (int64_t i = i0 + warp; i < i1; i += kWarps) {
    const int64_t pos = __ldg(ix + i);
    if (pos < 0 || pos >= N) continue;  // warp-uniform
    float kv[CPL], vv[CPL];
    if (pos < ns || pos >= ns + nq) {
      const int64_t slot = pos < ns ? pos : pos - nq;
      const int64_t off = (bh * p.f_cap + slot) * D + c0;
#pragma unroll
      for (int e = 0; e < CPL; ++e) {
        kv[e] = elem_at(p.kf, off + e, p.dtype);
        vv[e] = elem_at(p.vf, off + e, p.dtype);
      }
    } else {
      const int64_t j = pos - ns, tok = bh * p.q_cap + j;
      const uint8_t* krow = p.kc + tok * (D * p.bits_k / 8);
      const uint8_t* vrow = p.vc + tok * (D * p.bits_v / 8);
#pragma unroll
      for (int e = 0; e < CPL; ++e) {
        const int c = c0 + e;
        const int64_t km = p.ktok ? tok * p.ngk + c / p.kg : (bh * (p.q_cap / p.kg) + j / p.kg) * D + c;
        const int64_t vm = tok * p.ngv + c / p.vg;
        kv[e] = code_of(krow, c, p.bits_k) * meta_at(p.ks, km, p.meta) + meta_at(p.kz, km, p.meta);
        vv[e] = code_of(vrow, c, p.bits_v) * meta_at(p.vs, vm, p.meta) + meta_at(p.vz, vm, p.meta);
      }
    }
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      float d = 0.f;
#pragma unroll
      for (int e = 0; e < CPL; ++e) d = fmaf(qr[r][e], kv[e], d);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) d += __shfl_xor_sync(kFull, d, off);
      const float mn = fmaxf(m[r], d);
      const float alpha = exp2f(m[r] - mn);  // 0 when m was -inf
      const float pr = exp2f(d - mn);
      l[r] = l[r] * alpha + pr;
      m[r] = mn;
#pragma unroll
      for (int e = 0; e < CPL; ++e) acc[r][e] = fmaf(pr, vv[e], acc[r][e] * alpha);
    }
  }
  // combine the 4 warps, then one partial per row
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    if (lane == 0) {
      st_ml[warp][r][0] = m[r];
      st_ml[warp][r][1] = l[r];
    }
#pragma unroll
    for (int e = 0; e < CPL; ++e) st_acc[warp][r][c0 + e] = acc[r][e];
  }
  __syncthreads();
  const int64_t prow0 = (bh * p.S + s) * p.R + r0;
  for (int i = tid; i < Rc * D; i += kThreads) {
    const int r = i / D, d = i - r * D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
      if (st_ml[w][r][1] > 0.f) M = fmaxf(M, st_ml[w][r][0]);
    float L = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (st_ml[w][r][1] > 0.f) {
        const float wt = exp2f(st_ml[w][r][0] - M);
        L = fmaf(st_ml[w][r][1], wt, L);
        o = fmaf(st_acc[w][r][d], wt, o);
      }
    }
    p.ws_acc[(prow0 + r) * D + d] = o;
    if (d == 0) p.ws_ml[prow0 + r] = make_float2(M, L);
  }
}

struct SparsePlan {
  int nRB, S, chunk;
};

SparsePlan make_sparse_plan(const DecodeAttentionArgs& a) {
  SparsePlan pl{};
  const int64_t R = a.Hkv > 0 ? a.Hq / a.Hkv : 0;
  pl.nRB = static_cast<int>((R + kSparseRB - 1) / kSparseRB);
  const int64_t per = a.B * a.Hkv * (pl.nRB > 0 ? pl.nRB : 1);
  int64_t S = per > 0 ? (kTargetCtas + per - 1) / per : 1;
  const int64_t by_len = (a.n_idx + kSparseMinChunk - 1) / kSparseMinChunk;
  if (S > by_len) S = by_len;
  if (S > kMaxSplits) S = kMaxSplits;
  if (S < 1) S = 1;
  pl.S = static_cast<int>(S);
  pl.chunk = static_cast<int>((a.n_idx + S - 1) / S);
  if (pl.chunk < 1) pl.chunk = 1;
  return pl;
}

// ---- host side -----------------------------------------------------------------------------------------------------

struct Plan {
  int R, RB, nRB, S, TT;
};

// (2|4, 2|4) have specialized kernels for 1, 2, 4 or 8 rows per CTA; other widths use the runtime-bits kernel with
// row blocks of 8
bool fast_bits(int bk, int bv) { return (bk == 2 || bk == 4) && (bv == 2 || bv == 4); }

Plan make_plan(const DecodeAttentionArgs& a) {
  Plan pl{};
  const int64_t g = a.Hkv > 0 ? a.Hq / a.Hkv : 0;
  pl.R = static_cast<int>(g * a.Tq);
  pl.RB = !fast_bits(a.bits_k, a.bits_v) ? 8 : pl.R <= 1 ? 1 : pl.R <= 2 ? 2 : pl.R <= 4 ? 4 : 8;
  pl.nRB = (pl.R + pl.RB - 1) / pl.RB;
  pl.TT = a.D > 0 ? static_cast<int>(kTileElems / a.D) : 1;
  const int64_t per = a.B * a.Hkv * (pl.nRB > 0 ? pl.nRB : 1);
  int64_t S = per > 0 ? (kTargetCtas + per - 1) / per : 1;
  const int64_t nmax = a.q_cap + a.f_cap;
  const int64_t by_len = (nmax + kMinChunk - 1) / kMinChunk;
  if (S > by_len) S = by_len;
  if (S > kMaxSplits) S = kMaxSplits;
  if (S < 1) S = 1;
  pl.S = static_cast<int>(S);
  return pl;
}

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

size_t ml_bytes(const DecodeAttentionArgs& a, const Plan& pl) {
  return align_up(static_cast<size_t>(a.B * a.Hkv) * pl.S * pl.R * sizeof(float2), 256);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(kErr) + what + ": " + cudaGetErrorString(e));
}

bool aligned(const void* ptr, unsigned n) { return (reinterpret_cast<uintptr_t>(ptr) & (n - 1)) == 0; }

using SplitFn = void (*)(Params);

template <int BK, int BV>
SplitFn pick_rb(int RB) {
  switch (RB) {
    case 1: return attn_split_kernel<BK, BV, 1>;
    case 2: return attn_split_kernel<BK, BV, 2>;
    case 4: return attn_split_kernel<BK, BV, 4>;
    default: return attn_split_kernel<BK, BV, 8>;
  }
}

SplitFn pick_kernel(int bk, int bv, int RB) {
  if (bk == 2 && bv == 2) return pick_rb<2, 2>(RB);
  if (bk == 4 && bv == 4) return pick_rb<4, 4>(RB);
  if (bk == 2 && bv == 4) return pick_rb<2, 4>(RB);
  if (bk == 4 && bv == 2) return pick_rb<4, 2>(RB);
  return attn_split_kernel<0, 0, 8>;  // any widths (make_plan sets RB = 8)
}

}  // namespace

size_t quant_decode_attention_workspace_bytes(const DecodeAttentionArgs& a) {
  if (a.B <= 0 || a.Hkv <= 0 || a.Hq <= 0 || a.Tq <= 0 || a.D <= 0) return 0;
  if (a.sparse) {
    const SparsePlan sp = make_sparse_plan(a);
    const size_t rows = static_cast<size_t>(a.B * a.Hkv) * sp.S * (a.Hq / a.Hkv);
    return align_up(rows * sizeof(float2), 256) + rows * a.D * sizeof(float);
  }
  const Plan pl = make_plan(a);
  return ml_bytes(a, pl) + static_cast<size_t>(a.B * a.Hkv) * pl.S * pl.R * a.D * sizeof(float);
}

namespace {

void fill_cache_view(const DecodeAttentionArgs& a, CacheView& p) {
  p.q = a.q;
  p.q_sb = a.q_stride_b;
  p.q_sh = a.q_stride_h;
  p.q_st = a.q_stride_t;
  p.dtype = static_cast<int>(a.dtype);
  p.meta = static_cast<int>(a.meta_dtype);
  p.Hkv = static_cast<int>(a.Hkv);
  p.Tq = static_cast<int>(a.Tq);
  p.D = static_cast<int>(a.D);
  p.g = static_cast<int>(a.Hq / a.Hkv);
  p.qscale = a.softmax_scale * kLog2e;
  p.kc = a.k_codes;
  p.ks = static_cast<const uint8_t*>(a.k_scale);
  p.kz = static_cast<const uint8_t*>(a.k_zero);
  p.vc = a.v_codes;
  p.vs = static_cast<const uint8_t*>(a.v_scale);
  p.vz = static_cast<const uint8_t*>(a.v_zero);
  p.bits_k = a.bits_k;
  p.bits_v = a.bits_v;
  p.ktok = a.k_per_token ? 1 : 0;
  p.ngk = a.k_per_token ? static_cast<int>(a.D / a.k_group) : 0;
  p.ngv = static_cast<int>(a.D / a.v_group);
  p.q_cap = a.q_cap;
  p.f_cap = a.f_cap;
  p.kf = a.k_fp;
  p.vf = a.v_fp;
  p.lens = a.lens;
}

// log-sum-exp merge of the S partials of every (b, h, row) into out
void launch_merge(const DecodeAttentionArgs& a, const float2* ml, const float* acc, int R, int S,
                  cudaStream_t stream) {
  MergeParams m{};
  m.ws_ml = ml;
  m.ws_acc = acc;
  m.out = a.out;
  m.dtype = static_cast<int>(a.dtype);
  m.Hkv = static_cast<int>(a.Hkv);
  m.Hq = static_cast<int>(a.Hq);
  m.Tq = static_cast<int>(a.Tq);
  m.D = static_cast<int>(a.D);
  m.g = static_cast<int>(a.Hq / a.Hkv);
  m.R = R;
  m.S = S;
  const int64_t mgrid = a.B * a.Hkv * R;
  if (mgrid > 0x7fffffff) throw std::runtime_error(std::string(kErr) + "grid too large");
  attn_merge_kernel<<<static_cast<unsigned>(mgrid), kThreads, 0, stream>>>(m);
  check(cudaGetLastError(), "merge kernel launch");
}

void sparse_attention(const DecodeAttentionArgs& a, void* workspace, cudaStream_t stream) {
  if (a.Tq != 1) throw std::runtime_error(std::string(kErr) + "sparse attention (indices) needs Tq = 1");
  if (a.n_idx > 0 && a.indices == nullptr) throw std::runtime_error(std::string(kErr) + "indices is null");
  const SparsePlan sp = make_sparse_plan(a);
  const int D = static_cast<int>(a.D);
  SparseParams p{};
  fill_cache_view(a, p);
  p.R = p.g;
  p.nRB = sp.nRB;
  p.S = sp.S;
  p.chunk = sp.chunk;
  p.kg = a.k_group;
  p.vg = a.v_group;
  p.idx = a.indices;
  p.n_idx = a.n_idx;
  const size_t rows = static_cast<size_t>(a.B * a.Hkv) * sp.S * p.R;
  p.ws_ml = static_cast<float2*>(workspace);
  p.ws_acc = reinterpret_cast<float*>(static_cast<uint8_t*>(workspace) + align_up(rows * sizeof(float2), 256));
  const int64_t grid = a.B * a.Hkv * static_cast<int64_t>(sp.S) * sp.nRB;
  if (grid > 0x7fffffff) throw std::runtime_error(std::string(kErr) + "grid too large");
  switch (D) {
    case 32: attn_sparse_kernel<32><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p); break;
    case 64: attn_sparse_kernel<64><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p); break;
    case 128: attn_sparse_kernel<128><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p); break;
    default: attn_sparse_kernel<256><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p); break;
  }
  check(cudaGetLastError(), "sparse kernel launch");
  launch_merge(a, p.ws_ml, p.ws_acc, p.R, sp.S, stream);
}

}  // namespace

void quant_decode_attention(const DecodeAttentionArgs& a, void* workspace, cudaStream_t stream) {
  if (a.B <= 0 || a.Hkv <= 0 || a.Hq <= 0 || a.Tq <= 0) return;
  if (!(a.D == 32 || a.D == 64 || a.D == 128 || a.D == 256))
    throw std::runtime_error(std::string(kErr) + "head dim must be 32, 64, 128 or 256");
  auto bits_ok = [](int b) { return b == 1 || b == 2 || b == 4 || b == 8; };
  if (!bits_ok(a.bits_k) || !bits_ok(a.bits_v)) throw std::runtime_error(std::string(kErr) + "bits must be 1, 2, 4 or 8");
  if (a.v_group < 16 || a.v_group % 16 != 0 || a.D % a.v_group != 0 || !is_pow2(a.v_group))
    throw std::runtime_error(std::string(kErr) + "v_group must be a multiple of 16 dividing D");
  if (a.k_per_token) {
    if (a.k_group < 32 || a.k_group % 32 != 0 || a.D % a.k_group != 0 || !is_pow2(a.k_group))
      throw std::runtime_error(std::string(kErr) + "per-token keys need k_group a multiple of 32 dividing D");
  } else if (a.k_group < 1 || a.q_cap % a.k_group != 0) {
    throw std::runtime_error(std::string(kErr) + "k_group must be >= 1 and divide q_cap");
  }
  if (a.Hq % a.Hkv != 0) throw std::runtime_error(std::string(kErr) + "Hq must be a multiple of Hkv");
  // token positions and query rows are 32-bit ints in the kernels (the binding raises a ValueError first)
  if (a.q_cap + a.f_cap > 0x7fffffff || a.B * a.Hq * a.Tq > 0x7fffffff)
    throw std::runtime_error(std::string(kErr) + "q_cap + f_cap and B·Hq·Tq must be < 2^31");
  if (!aligned(a.k_codes, 16) || !aligned(a.v_codes, 16) || !aligned(a.k_fp, 16) || !aligned(a.v_fp, 16))
    throw std::runtime_error(std::string(kErr) + "k_codes, v_codes, k_fp and v_fp must be 16-byte aligned");
  if (workspace == nullptr) throw std::runtime_error(std::string(kErr) + "workspace is null");
  if (a.sparse) return sparse_attention(a, workspace, stream);

  const Plan pl = make_plan(a);
  const int D = static_cast<int>(a.D);
  const int msz = dtype_size(a.meta_dtype);
  Params p{};
  fill_cache_view(a, p);
  p.R = pl.R;
  p.nRB = pl.nRB;
  p.S = pl.S;
  // per-token keys: no K group limits a tile (kg = the whole capacity), channel groups of k_group
  p.kg = a.k_per_token ? static_cast<int>(a.q_cap > 0 ? a.q_cap : 1) : a.k_group;
  p.kgc_log2 = a.k_per_token ? log2i(a.k_group) : 0;
  p.vg_log2 = log2i(a.v_group);
  p.TT = pl.TT;
  p.lpt_log2 = log2i(D / 32);
  p.krow = D * a.bits_k / 8;
  p.vrow = D * a.bits_v / 8;
  p.msz = msz;
  const int RB = pl.RB;
  {
    const int64_t slot_budget = 24576 / (static_cast<int64_t>(RB) * D * 4);
    p.nslot = static_cast<int>(slot_budget < 2 ? 2 : (slot_budget > 4 ? 4 : slot_budget));
  }
  // shared memory layout
  size_t off = 0;
  auto take = [&off](size_t n) {
    const size_t o = off;
    off = align_up(off + n, 16);
    return static_cast<int>(o);
  };
  const int TT = pl.TT;
  p.o_q = take(static_cast<size_t>(RB) * D * 4);
  p.o_qs = take(static_cast<size_t>(p.nslot) * RB * D * 4);
  p.o_qz = take(static_cast<size_t>(p.nslot > (D >> 5) ? p.nslot : (D >> 5)) * RB * 4);  // per-token keys: [RB][LPT]
  p.o_s = take(static_cast<size_t>(RB) * TT * 4);
  p.o_p = take(static_cast<size_t>(TT) * RB * 4);
  p.o_al = take(static_cast<size_t>(RB) * 4);
  p.o_vmf = take(static_cast<size_t>(TT) * p.ngv * 8);
  {
    size_t so = 0;
    auto stake = [&so](size_t n) {
      const size_t o = so;
      so = align_up(so + n + 16, 16);  // + 16: the source's misalignment
      return static_cast<int>(o);
    };
    p.st_kc = stake(static_cast<size_t>(TT) * p.krow);
    p.st_vc = stake(static_cast<size_t>(TT) * p.vrow);
    p.st_vs = stake(static_cast<size_t>(TT) * p.ngv * msz);
    p.st_vz = stake(static_cast<size_t>(TT) * p.ngv * msz);
    const size_t kmeta = p.ktok ? static_cast<size_t>(TT) * p.ngk * msz : static_cast<size_t>(p.nslot) * D * msz;
    p.st_ks = stake(kmeta);
    p.st_kz = stake(kmeta);
    p.st_bytes = static_cast<int>(so);
  }
  const size_t ring = static_cast<size_t>(kStages) * p.st_bytes;
  const size_t red = static_cast<size_t>(kWarps) * RB * D * 4;
  p.o_ring = take(ring > red ? ring : red);
  const size_t smem = off;
  p.ws_ml = static_cast<float2*>(workspace);
  p.ws_acc = reinterpret_cast<float*>(static_cast<uint8_t*>(workspace) + ml_bytes(a, pl));

  const SplitFn fn = pick_kernel(a.bits_k, a.bits_v, RB);
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
          "shared memory opt-in");
  const int64_t grid = a.B * a.Hkv * static_cast<int64_t>(pl.S) * pl.nRB;
  if (grid > 0x7fffffff) throw std::runtime_error(std::string(kErr) + "grid too large");
  fn<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(p);
  check(cudaGetLastError(), "split kernel launch");
  launch_merge(a, p.ws_ml, p.ws_acc, pl.R, pl.S, stream);
}

}  // namespace kvengine::cuda
