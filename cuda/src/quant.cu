// kvengine — asymmetric group quantization + bit-packing on CUDA, optionally fused with the FWHT rotation
// (see kvengine/quant.h for the semantics; codes and metadata are bit-identical to quantize_pack_cpu).
//
// Kernels:
//   quant_token_warp_kernel  per-token groups of G = 8·2^k <= 256 channels (D % 8 == 0): a lane holds 8 contiguous
//                            channels, a group is G/8 adjacent lanes, min/max by xor-shuffles; rotation for
//                            8 <= D <= 256 happens in registers (the warp FWHT).  No shared memory.
//   quant_tile_kernel        everything else: a block stages a tile (rows × channel slice) in shared memory as the
//                            data dtype with cp.async (all of it in flight at once), rotates it in place when asked
//                            (writing the rotated rows back as the data dtype is the rounding to x's dtype), then
//                            quantizes from it:
//                              per-channel: a unit = (group, cpt channels), its G rows split over P lanes whose
//                                           partial min/max are combined by shuffles;
//                              per-token:   the lane scheme above from shared memory, or (odd group sizes) a thread
//                                           per group for the metadata then a thread per code byte.
//                            When not even a minimal tile fits in shared memory (huge non-rotated groups), the same
//                            code reads straight from global memory instead (two passes, the second mostly from L2).
//   dequant_kernel           thread per (row, 8 channels): codes, metadata, one 16-byte store.
//
// Exactness: scale = round_meta((hi - lo) / qmax) and code = clamp(floor((x - zero) / scale + 0.5)) use the _rn
// intrinsics (true IEEE division, no FMA contraction), x̂ = code · scale + zero likewise; min/max are exact.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "fwht_device.cuh"
#include "kvengine/cuda_ops.h"
#include "ptx.cuh"

namespace kvengine::cuda {
namespace {

using detail::Storage;

constexpr int kThreads = 256;                     // every kernel here
constexpr size_t kFusedSmemMax = 160 * 1024;      // <= the opt-in maximum of sm_80 (163 KB) and sm_90 (227 KB)
constexpr size_t kTileTarget = 32 * 1024;         // preferred tile bytes (several blocks per SM)
constexpr size_t kSliceBudget = 64 * 1024;        // max tile bytes for non-rotated per-channel slices

// ---- arguments -----------------------------------------------------------------------------------------------------

struct QuantArgs {
  const void* x;
  int64_t x_batch_stride, x_row_stride;  // elements
  int64_t T, D, rows;                    // rows = batch * T ("flat rows")
  bool x_dense;                          // flat row r starts at r * x_row_stride
  uint8_t* codes;
  void* scale;
  void* zero;
  int64_t code_row_bytes;  // D * bits / 8
  bool codes_aligned;      // codes base is 8-byte aligned (packed words are stored whole)
  int bits, G, meta;       // meta: DType of scale/zero as int
  int log2G;               // log2(G) when G is a power of two (per-token lane groups)
  int clip;                // range-search candidates (quant.h); <= 1: min/max only
  float qmax;
  // rotation
  bool rotate;
  float rot_scale;
  const int32_t* perm;  // only used when rotating
  int log2D;
  int load_mode;  // how rows of x are read: detail::LoadMode (gather when rotating with perm)
};

struct TileArgs {
  int64_t ntiles;   // super tiles = ceil(rows / RR) * nslices
  int RR;           // flat rows per super tile (PerChannel: a multiple of G, whole groups)
  int DC;           // channels per slice (= D unless a non-rotated per-channel tile is sliced)
  int nslices;
  bool in_smem;     // false: quantize straight from global memory
  bool view_vec;    // 8-channel 16-byte loads from the tile / from global are allowed
  bool copy_vec;    // tile staged with 16-byte cp.async copies (then rotated in place when rotating)
  int cpt;          // PerChannel: channels per unit (8, or 8/bits when D % 8 != 0)
  int P;            // PerChannel: lanes sharing a unit's rows (power of two <= 32)
  bool tok_fast;    // PerToken: lane-group shuffle path (D % 8 == 0, G = 8·2^k <= 256)
  int tile_bytes;   // byte offset of the fp32 rotation scratch in shared memory
};

struct DequantArgs {
  const uint8_t* codes;
  const void* scale;
  const void* zero;
  void* y;
  int64_t T, D, rows, code_row_bytes;
  int bits, G, meta, cpt;  // cpt: channels per thread item (8, or 8/bits when D % 8 != 0)
  bool per_channel, codes_aligned, meta_vec, y_vec;
};

// ---- small device helpers ------------------------------------------------------------------------------------------

// a / b for non-negative values, 32-bit division when both fit
__device__ __forceinline__ int64_t udiv(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
  return a / b;
}

// start of flat row fr of x
template <typename T>
__device__ __forceinline__ const T* x_row(const QuantArgs& a, int64_t fr) {
  const T* x = static_cast<const T*>(a.x);
  if (a.x_dense) return x + fr * a.x_row_stride;
  const int64_t b = udiv(fr, a.T);
  return x + b * a.x_batch_stride + (fr - b * a.T) * a.x_row_stride;
}

__device__ __forceinline__ float round_meta(float v, int meta) {
  if (meta == static_cast<int>(DType::F16)) return __half2float(__float2half_rn(v));
  if (meta == static_cast<int>(DType::BF16)) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}

// v is already representable in the metadata dtype (rounded by round_meta), so the conversion is exact
__device__ __forceinline__ void store_meta(void* p, int64_t i, int meta, float v) {
  if (meta == static_cast<int>(DType::F16)) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else if (meta == static_cast<int>(DType::BF16)) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else static_cast<float*>(p)[i] = v;
}

__device__ __forceinline__ float load_meta(const void* p, int64_t i, int meta) {
  if (meta == static_cast<int>(DType::F16)) return __half2float(static_cast<const __half*>(p)[i]);
  if (meta == static_cast<int>(DType::BF16)) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// min / max that propagate NaN (as torch.amin / amax and the CPU kernel do): a NaN poisons its group
__device__ __forceinline__ float nan_min(float a, float b) { return (b < a || b != b) ? b : a; }
__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// scale / zero of a group from its fp32 min / max (rounded to the metadata dtype)
__device__ __forceinline__ void group_params(float lo, float hi, float qmax, int meta, float& sc, float& zr) {
  sc = round_meta(__fdiv_rn(__fsub_rn(hi, lo), qmax), meta);
  zr = round_meta(lo, meta);
}

// clamp(floor((x - zero) / scale + 0.5), 0, qmax), 0 when scale == 0 — same operation sequence as the CPU
__device__ __forceinline__ uint32_t quant_code(float x, float sc, float zr, float qmax) {
  if (sc == 0.0f) return 0u;
  float c = floorf(__fadd_rn(__fdiv_rn(__fsub_rn(x, zr), sc), 0.5f));
  c = fminf(fmaxf(c, 0.0f), qmax);  // fmaxf(NaN, 0) == 0: a NaN code becomes 0, as on the CPU
  return static_cast<uint32_t>(c);
}

// (code·scale + zero − x)², the CPU's operation order, never contracted to FMA
__device__ __forceinline__ float sq_err(float x, float sc, float zr, float qmax) {
  const float d = __fsub_rn(__fadd_rn(__fmul_rn(static_cast<float>(quant_code(x, sc, zr, qmax)), sc), zr), x);
  return __fmul_rn(d, d);
}

// scale / zero of range-search candidate c >= 1 (quant.h): both ends of [lo, hi] moved in by 0.025·c·(hi − lo)
__device__ __forceinline__ void clip_params(float lo, float hi, int c, float qmax, int meta, float& sc, float& zr) {
  const float aw = __fmul_rn(__fmul_rn(0.025f, static_cast<float>(c)), __fsub_rn(hi, lo));
  sc = round_meta(__fdiv_rn(__fsub_rn(__fsub_rn(hi, aw), __fadd_rn(lo, aw)), qmax), meta);
  zr = round_meta(__fadd_rn(lo, aw), meta);
}

// the low nbytes (1, 2, 4 or 8) of w, as one store when aligned
__device__ __forceinline__ void store_packed(uint8_t* p, uint64_t w, int nbytes, bool aligned) {
  if (aligned) {
    switch (nbytes) {
      case 1: *p = static_cast<uint8_t>(w); return;
      case 2: *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(w); return;
      case 4: *reinterpret_cast<uint32_t*>(p) = static_cast<uint32_t>(w); return;
      default: *reinterpret_cast<unsigned long long*>(p) = static_cast<unsigned long long>(w); return;
    }
  }
  for (int i = 0; i < nbytes; ++i) p[i] = static_cast<uint8_t>(w >> (8 * i));
}

__device__ __forceinline__ uint64_t load_packed(const uint8_t* p, int nbytes, bool aligned) {
  if (aligned) {
    switch (nbytes) {
      case 1: return *p;
      case 2: return *reinterpret_cast<const uint16_t*>(p);
      case 4: return *reinterpret_cast<const uint32_t*>(p);
      default: return *reinterpret_cast<const unsigned long long*>(p);
    }
  }
  uint64_t w = 0;
  for (int i = 0; i < nbytes; ++i) w |= static_cast<uint64_t>(p[i]) << (8 * i);
  return w;
}

using ptx::cp_async16;
using ptx::cp_async_wait_all;

// v[i] = p[i] for i < cnt (one 16-byte load when vec, which implies cnt == 8 and p 16-byte aligned)
template <typename T>
__device__ __forceinline__ void load_vals(const T* p, float (&v)[8], int cnt, bool vec) {
  if (vec) {
    detail::load8_vec(p, v);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = i < cnt ? Storage<T>::to_float(p[i]) : 0.0f;
  }
}

// ---- per-token quantization of one lane's 8 channels (lane groups of L = G/8 adjacent lanes) --------------------
// All 32 lanes call this together.  Lane holds channels off .. off+7 of flat row fr; inactive lanes (whole groups)
// only take part in the shuffles.
__device__ __forceinline__ void token_lane_quant(const QuantArgs& a, const float (&v)[8], bool active, int64_t fr,
                                                 int64_t off, int L, int lane) {
  float lo = v[0], hi = v[0];
#pragma unroll
  for (int j = 1; j < 8; ++j) {
    lo = nan_min(lo, v[j]);
    hi = nan_max(hi, v[j]);
  }
  if (!active) {
    lo = __int_as_float(0x7f800000);   // +inf
    hi = __int_as_float(0xff800000);   // -inf
  }
  for (int m = 1; m < L; m <<= 1) {
    lo = nan_min(lo, __shfl_xor_sync(0xffffffffu, lo, m));
    hi = nan_max(hi, __shfl_xor_sync(0xffffffffu, hi, m));
  }
  float sc, zr;
  group_params(lo, hi, a.qmax, a.meta, sc, zr);
  if (a.clip > 1) {  // warp-uniform; every lane takes part in the shuffles (inactive ones add 0)
    const int leader = lane & ~(L - 1);
    auto group_sse = [&](float s_, float z_) {
      float e = 0.0f;
      if (active) {
#pragma unroll
        for (int j = 0; j < 8; ++j) e = __fadd_rn(e, sq_err(v[j], s_, z_, a.qmax));
      }
      for (int m = 1; m < L; m <<= 1) e = __fadd_rn(e, __shfl_xor_sync(0xffffffffu, e, m));
      return __shfl_sync(0xffffffffu, e, leader);  // one value per group: its lanes must agree
    };
    float best = group_sse(sc, zr);
    const bool keep = !isfinite(best);
    for (int c = 1; c < a.clip; ++c) {
      float s2, z2;
      clip_params(lo, hi, c, a.qmax, a.meta, s2, z2);
      const float e = group_sse(s2, z2);
      if (!keep && e < best) {
        best = e;
        sc = s2;
        zr = z2;
      }
    }
  }
  if (!active) return;
  if ((lane & (L - 1)) == 0) {
    const int64_t mi = fr * (a.D >> a.log2G) + (off >> a.log2G);
    store_meta(a.scale, mi, a.meta, sc);
    store_meta(a.zero, mi, a.meta, zr);
  }
  uint64_t w = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) w |= static_cast<uint64_t>(quant_code(v[j], sc, zr, a.qmax)) << (j * a.bits);
  store_packed(a.codes + fr * a.code_row_bytes + (off >> 3) * a.bits, w, a.bits, a.codes_aligned);
}

// ---- kernel: per-token, lane groups, no shared memory ------------------------------------------------------------
// Warp task = 32 consecutive 8-channel slots of the flat [rows, D] matrix.  With rotation (8 <= D <= 256) a task is
// 256/D whole rows and the FWHT runs across the lanes of each row.
template <typename T>
__global__ void __launch_bounds__(kThreads) quant_token_warp_kernel(QuantArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t D8 = a.D >> 3;
  const int64_t slots = a.rows * D8;
  const int64_t tasks = (slots + 31) >> 5;
  const int L = a.G >> 3;
  const int n = static_cast<int>(a.D);
  const int64_t wstride = detail::global_thread_count() >> 5;
  for (int64_t task = detail::global_thread_id() >> 5; task < tasks; task += wstride) {  // warp-uniform
    const int64_t slot = (task << 5) + lane;
    const bool active = slot < slots;
    const int64_t fr = active ? udiv(slot, D8) : 0;
    const int64_t off = active ? (slot - fr * D8) << 3 : 0;
    const T* row = x_row<T>(a, fr);
    float v[8];
    if (a.rotate) {
      detail::warp_fwht(row, static_cast<int>(off), a.perm, n, a.log2D, a.load_mode, active, lane, v);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = detail::round_to<T>(v[j] * a.rot_scale);
    } else if (active) {
      detail::load8(row, static_cast<int>(off), nullptr, n, a.load_mode, v);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = 0.0f;
    }
    token_lane_quant(a, v, active, fr, off, L, lane);
  }
}

// ---- tile kernel pieces --------------------------------------------------------------------------------------------

// Rotates the rows of the shared tile [nrows, D] in place (x[perm] when perm), rounding to T.  The raw rows were
// staged by cp.async.  In place is safe: a row belongs to one warp (D <= 256), whose lanes all read before the
// first shuffle and write after it, or is first transformed into the fp32 scratch (D > 256).
template <typename T>
__device__ void rotate_tile_inplace(const QuantArgs& a, int nrows, T* tile, float* scratch) {
  const int tid = threadIdx.x, nth = blockDim.x, lane = tid & 31, warp = tid >> 5, nwarps = nth >> 5;
  const int n = static_cast<int>(a.D), log2n = a.log2D;
  const int mode = a.perm ? detail::kLoadGather : detail::kLoadVector;
  if (n <= 256) {  // 8 <= n (the tile was staged with 16-byte copies)
    const int n8_log2 = log2n - 3, slots = nrows << n8_log2;
    for (int base = warp * 32; base < slots; base += nwarps * 32) {  // warp-uniform
      const int slot = base + lane;
      const bool active = slot < slots;
      const int r = active ? slot >> n8_log2 : 0, off = (slot & ((1 << n8_log2) - 1)) << 3;
      float v[8];
      detail::warp_fwht(tile + r * n, off, a.perm, n, log2n, mode, active, lane, v);
      if (active) {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] *= a.rot_scale;
        detail::store8_vec(tile + r * n + off, v);  // rounds to T
      }
    }
  } else {
    for (int r = 0; r < nrows; ++r) {  // block-uniform
      T* row = tile + static_cast<int64_t>(r) * n;
      detail::block_fwht_to_smem(row, a.perm, n, log2n, mode, scratch);
      for (int i = tid; i < (n >> 3); i += nth) {
        float v[8];
        detail::smem_load8(scratch + i * 8, v, lane);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] *= a.rot_scale;
        detail::store8_vec(row + i * 8, v);
      }
      __syncthreads();  // scratch reused by the next row
    }
  }
}

// Rows fr0 .. fr0+nrows-1, channels c0 .. c0+width-1 of x (rotated when a.rotate; then c0 = 0, width = D) into the
// shared tile [nrows, DC] of T.  Ends with __syncthreads.
template <typename T>
__device__ void load_tile(const QuantArgs& a, const TileArgs& g, int64_t fr0, int nrows, int c0, int width, T* tile,
                          float* scratch) {
  const int tid = threadIdx.x, nth = blockDim.x, lane = tid & 31, warp = tid >> 5, nwarps = nth >> 5;
  const int DC = g.DC;
  if (g.copy_vec) {
    // width % 8 == 0, rows and c0 16-byte aligned: every copy in flight at once
    constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));
    const int per_row = width / kPer16, items = nrows * per_row;
    for (int i = tid; i < items; i += nth) {
      const int r = i / per_row, k = i - r * per_row;
      cp_async16(tile + r * DC + k * kPer16, x_row<T>(a, fr0 + r) + c0 + k * kPer16);
    }
    cp_async_wait_all();
    __syncthreads();
    if (a.rotate) {
      rotate_tile_inplace<T>(a, nrows, tile, scratch);
      __syncthreads();
    }
    return;
  }
  if (!a.rotate) {
    const int items = nrows * width;
    for (int i = tid; i < items; i += nth) {
      const int r = i / width, c = i - r * width;
      tile[r * DC + c] = x_row<T>(a, fr0 + r)[c0 + c];
    }
  } else {  // rows not 16-byte aligned, or D < 8: rotate straight from global memory
    const int n = static_cast<int>(a.D), log2n = a.log2D;
    if (n >= 8 && n <= 256) {
      // warp FWHT, 256/n rows per warp task; a row never straddles two tasks
      const int n8_log2 = log2n - 3, slots = nrows << n8_log2;
      for (int base = warp * 32; base < slots; base += nwarps * 32) {  // warp-uniform
        const int slot = base + lane;
        const bool active = slot < slots;
        const int r = active ? slot >> n8_log2 : 0, off = (slot & ((1 << n8_log2) - 1)) << 3;
        float v[8];
        detail::warp_fwht(x_row<T>(a, fr0 + r), off, a.perm, n, log2n, a.load_mode, active, lane, v);
        if (active) {
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] *= a.rot_scale;
          detail::store8_vec(tile + r * n + off, v);  // rounds to T
        }
      }
    } else if (n > 256) {
      for (int r = 0; r < nrows; ++r) {  // block-uniform
        detail::block_fwht_to_smem(x_row<T>(a, fr0 + r), a.perm, n, log2n, a.load_mode, scratch);
        for (int i = tid; i < (n >> 3); i += nth) {
          float v[8];
          detail::smem_load8(scratch + i * 8, v, lane);
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] *= a.rot_scale;
          detail::store8_vec(tile + static_cast<int64_t>(r) * n + i * 8, v);
        }
        __syncthreads();  // scratch reused by the next row
      }
    } else if (n == 4) {
      for (int r = tid; r < nrows; r += nth) {
        float v[4];
        detail::small_fwht<4>(x_row<T>(a, fr0 + r), a.perm, v);
#pragma unroll
        for (int j = 0; j < 4; ++j) tile[r * 4 + j] = Storage<T>::from_float(v[j] * a.rot_scale);
      }
    } else {  // n == 2
      for (int r = tid; r < nrows; r += nth) {
        float v[2];
        detail::small_fwht<2>(x_row<T>(a, fr0 + r), a.perm, v);
#pragma unroll
        for (int j = 0; j < 2; ++j) tile[r * 2 + j] = Storage<T>::from_float(v[j] * a.rot_scale);
      }
    }
  }
  __syncthreads();
}

// Per-channel groups of the view [nrows, width] (row stride vrs; rows fr0.. are whole groups).  Unit = (group j,
// cpt channels k); its rows r ≡ p (mod P) go to lane part p; the P parts of a unit sit in one warp, xor-distance
// 32/P apart, and combine their min/max by shuffles.
template <typename T>
__device__ void quant_channel_view(const QuantArgs& a, const TileArgs& g, const T* view, int64_t vrs, int64_t fr0,
                                   int nrows, int c0, int width) {
  const int G = a.G, cpt = g.cpt, P = g.P, UPW = 32 / P;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int part = lane / UPW, ul = lane - part * UPW;
  const int K = width / cpt, U = (nrows / G) * K;
  const int nbytes = cpt * a.bits / 8;
  for (int ub = warp * UPW; ub < U; ub += nwarps * UPW) {  // warp-uniform
    const int u = ub + ul;
    const bool active = u < U;
    const int j = active ? u / K : 0, k = active ? u - j * K : 0;
    const T* base = view + static_cast<int64_t>(j) * G * vrs + k * cpt;
    float lo[8], hi[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      lo[i] = __int_as_float(0x7f800000);
      hi[i] = __int_as_float(0xff800000);
    }
    if (active) {
      for (int r = part; r < G; r += P) {
        float v[8];
        load_vals(base + r * vrs, v, cpt, g.view_vec);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          lo[i] = nan_min(lo[i], v[i]);
          hi[i] = nan_max(hi[i], v[i]);
        }
      }
    }
    for (int m = UPW; m < 32; m <<= 1) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        lo[i] = nan_min(lo[i], __shfl_xor_sync(0xffffffffu, lo[i], m));
        hi[i] = nan_max(hi[i], __shfl_xor_sync(0xffffffffu, hi[i], m));
      }
    }
    float sc[8], zr[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) group_params(lo[i], hi[i], a.qmax, a.meta, sc[i], zr[i]);
    if (a.clip > 1) {  // warp-uniform; every lane takes part in the shuffles (inactive ones add 0)
      auto unit_sse = [&](const float (&s_)[8], const float (&z_)[8], float (&e)[8]) {
#pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = 0.0f;
        if (active) {
          for (int r = part; r < G; r += P) {
            float v[8];
            load_vals(base + r * vrs, v, cpt, g.view_vec);
#pragma unroll
            for (int i = 0; i < 8; ++i)
              if (i < cpt) e[i] = __fadd_rn(e[i], sq_err(v[i], s_[i], z_[i], a.qmax));
          }
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          for (int m = UPW; m < 32; m <<= 1) e[i] = __fadd_rn(e[i], __shfl_xor_sync(0xffffffffu, e[i], m));
          e[i] = __shfl_sync(0xffffffffu, e[i], ul);  // the unit's parts must agree: part 0's sum
        }
      };
      float best[8];
      unit_sse(sc, zr, best);
      bool keep[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) keep[i] = !isfinite(best[i]);
      for (int c = 1; c < a.clip; ++c) {
        float s2[8], z2[8], e[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) clip_params(lo[i], hi[i], c, a.qmax, a.meta, s2[i], z2[i]);
        unit_sse(s2, z2, e);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (!keep[i] && e[i] < best[i]) {
            best[i] = e[i];
            sc[i] = s2[i];
            zr[i] = z2[i];
          }
        }
      }
    }
    if (!active) continue;
    const int64_t fr_g = fr0 + static_cast<int64_t>(j) * G;  // first flat row of the group
    const int64_t c = c0 + static_cast<int64_t>(k) * cpt;
    if (part == 0) {
      const int64_t mi = udiv(fr_g, G) * a.D + c;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (i < cpt) {
          store_meta(a.scale, mi + i, a.meta, sc[i]);
          store_meta(a.zero, mi + i, a.meta, zr[i]);
        }
      }
    }
    uint8_t* out = a.codes + fr_g * a.code_row_bytes + c * a.bits / 8;
    for (int r = part; r < G; r += P) {
      float v[8];
      load_vals(base + r * vrs, v, cpt, g.view_vec);
      uint64_t w = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < cpt) w |= static_cast<uint64_t>(quant_code(v[i], sc[i], zr[i], a.qmax)) << (i * a.bits);
      store_packed(out + r * a.code_row_bytes, w, nbytes, a.codes_aligned);
    }
  }
}

// Per-token groups (G = 8·2^k <= 256, D % 8 == 0) of the view [nrows, D], lane groups as in the warp kernel.
template <typename T>
__device__ void quant_token_view_fast(const QuantArgs& a, const TileArgs& g, const T* view, int64_t vrs, int64_t fr0,
                                      int nrows) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int D8 = static_cast<int>(a.D >> 3), slots = nrows * D8, L = a.G >> 3;
  for (int base = warp * 32; base < slots; base += nwarps * 32) {  // warp-uniform
    const int slot = base + lane;
    const bool active = slot < slots;
    const int r = active ? slot / D8 : 0, off = active ? (slot - r * D8) << 3 : 0;
    float v[8];
    load_vals(view + r * vrs + off, v, active ? 8 : 0, g.view_vec && active);
    token_lane_quant(a, v, active, fr0 + r, off, L, lane);
  }
}

// Per-token groups of any size: a thread per group computes and stores the metadata, then (after a barrier, which
// makes the block's global writes visible to the block) a thread per code byte reads it back, exactly.
template <typename T>
__device__ void quant_token_view_general(const QuantArgs& a, const T* view, int64_t vrs, int64_t fr0, int nrows) {
  const int G = a.G;
  const int64_t gpr = a.D / G;
  const int64_t items = nrows * gpr;
  for (int64_t i = threadIdx.x; i < items; i += blockDim.x) {
    const int64_t r = i / gpr, gi = i - r * gpr;
    const T* p = view + r * vrs + gi * G;
    float lo = Storage<T>::to_float(p[0]), hi = lo;
    for (int e = 1; e < G; ++e) {
      const float v = Storage<T>::to_float(p[e]);
      lo = nan_min(lo, v);
      hi = nan_max(hi, v);
    }
    float sc, zr;
    group_params(lo, hi, a.qmax, a.meta, sc, zr);
    if (a.clip > 1) {
      auto group_sse = [&](float s_, float z_) {
        float e = 0.0f;
        for (int q = 0; q < G; ++q) e = __fadd_rn(e, sq_err(Storage<T>::to_float(p[q]), s_, z_, a.qmax));
        return e;
      };
      float best = group_sse(sc, zr);
      if (isfinite(best)) {
        for (int c = 1; c < a.clip; ++c) {
          float s2, z2;
          clip_params(lo, hi, c, a.qmax, a.meta, s2, z2);
          const float e = group_sse(s2, z2);
          if (e < best) {
            best = e;
            sc = s2;
            zr = z2;
          }
        }
      }
    }
    store_meta(a.scale, (fr0 + r) * gpr + gi, a.meta, sc);
    store_meta(a.zero, (fr0 + r) * gpr + gi, a.meta, zr);
  }
  __syncthreads();
  const int epb = 8 / a.bits;
  const int64_t bpr = a.code_row_bytes, items2 = nrows * bpr;
  for (int64_t i = threadIdx.x; i < items2; i += blockDim.x) {
    const int64_t r = i / bpr, kb = i - r * bpr;
    const T* p = view + r * vrs + kb * epb;
    uint32_t byte = 0;
    for (int e = 0; e < epb; ++e) {
      const int64_t mi = (fr0 + r) * gpr + (kb * epb + e) / G;
      const float sc = load_meta(a.scale, mi, a.meta), zr = load_meta(a.zero, mi, a.meta);
      byte |= quant_code(Storage<T>::to_float(p[e]), sc, zr, a.qmax) << (e * a.bits);
    }
    a.codes[(fr0 + r) * bpr + kb] = static_cast<uint8_t>(byte);
  }
}

// ---- kernel: tile in shared memory (or global view), then quantize ------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) quant_tile_kernel(QuantArgs a, TileArgs g) {
  extern __shared__ float4 quant_smem[];
  T* tile = reinterpret_cast<T*>(quant_smem);
  float* scratch = reinterpret_cast<float*>(reinterpret_cast<char*>(quant_smem) + g.tile_bytes);
  const bool per_channel = g.P > 0;
  for (int64_t q = blockIdx.x; q < g.ntiles; q += gridDim.x) {  // block-uniform
    const int64_t rt = q / g.nslices;
    const int c0 = static_cast<int>(q - rt * g.nslices) * g.DC;
    const int width = static_cast<int>(a.D - c0 < g.DC ? a.D - c0 : g.DC);
    const int64_t fr0 = rt * g.RR;
    const int nrows = static_cast<int>(a.rows - fr0 < g.RR ? a.rows - fr0 : g.RR);
    const T* view;
    int64_t vrs;
    if (g.in_smem) {
      load_tile<T>(a, g, fr0, nrows, c0, width, tile, scratch);
      view = tile;
      vrs = g.DC;
    } else {  // the super tile is one group (per-channel) or one row (per-token): its rows share a batch
      view = x_row<T>(a, fr0) + c0;
      vrs = a.x_row_stride;
    }
    if (per_channel) quant_channel_view<T>(a, g, view, vrs, fr0, nrows, c0, width);
    else if (g.tok_fast) quant_token_view_fast<T>(a, g, view, vrs, fr0, nrows);
    else quant_token_view_general<T>(a, view, vrs, fr0, nrows);
    __syncthreads();  // the tile is overwritten by the next iteration
  }
}

// ---- kernel: dequantize --------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) dequant_kernel(DequantArgs d) {
  const int cpt = d.cpt, nbytes = cpt * d.bits / 8;
  const uint32_t mask = (1u << d.bits) - 1u;
  const int64_t K = d.D / cpt, items = d.rows * K;
  const int64_t stride = detail::global_thread_count();
  for (int64_t it = detail::global_thread_id(); it < items; it += stride) {
    const int64_t fr = udiv(it, K), c = (it - fr * K) * cpt;
    const uint64_t w = load_packed(d.codes + fr * d.code_row_bytes + c * d.bits / 8, nbytes, d.codes_aligned);
    float sc[8], zr[8];
    if (d.per_channel) {
      const int64_t mi = udiv(fr, d.G) * d.D + c;
      if (d.meta_vec) {  // cpt == 8, metadata 16-byte aligned
        if (d.meta == static_cast<int>(DType::F32)) {
          detail::load8_vec(static_cast<const float*>(d.scale) + mi, sc);
          detail::load8_vec(static_cast<const float*>(d.zero) + mi, zr);
        } else if (d.meta == static_cast<int>(DType::F16)) {
          detail::load8_vec(static_cast<const __half*>(d.scale) + mi, sc);
          detail::load8_vec(static_cast<const __half*>(d.zero) + mi, zr);
        } else {
          detail::load8_vec(static_cast<const __nv_bfloat16*>(d.scale) + mi, sc);
          detail::load8_vec(static_cast<const __nv_bfloat16*>(d.zero) + mi, zr);
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          sc[i] = i < cpt ? load_meta(d.scale, mi + i, d.meta) : 0.0f;
          zr[i] = i < cpt ? load_meta(d.zero, mi + i, d.meta) : 0.0f;
        }
      }
    } else {
      const int64_t gpr = d.D / d.G, mrow = fr * gpr;
      if (d.G % cpt == 0) {  // the thread's channels share one group
        const int64_t mi = mrow + c / d.G;
        const float s = load_meta(d.scale, mi, d.meta), z = load_meta(d.zero, mi, d.meta);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          sc[i] = s;
          zr[i] = z;
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int64_t mi = mrow + (i < cpt ? (c + i) / d.G : 0);
          sc[i] = i < cpt ? load_meta(d.scale, mi, d.meta) : 0.0f;
          zr[i] = i < cpt ? load_meta(d.zero, mi, d.meta) : 0.0f;
        }
      }
    }
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float code = static_cast<float>(static_cast<uint32_t>(w >> (i * d.bits)) & mask);
      v[i] = __fadd_rn(__fmul_rn(code, sc[i]), zr[i]);
    }
    T* out = static_cast<T*>(d.y) + fr * d.D + c;
    if (d.y_vec) {
      detail::store8_vec(out, v);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < cpt) out[i] = Storage<T>::from_float(v[i]);
    }
  }
}

// ---- host helpers --------------------------------------------------------------------------------------------------

void check_call(cudaError_t err, const char* name) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("kvengine::cuda::") + name + ": " + cudaGetErrorString(err));
}
void check_launch(const char* name) { check_call(cudaGetLastError(), name); }

int sm_count(const char* name) {
  int dev = 0, sms = 0;
  check_call(cudaGetDevice(&dev), name);
  check_call(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), name);
  return sms > 0 ? sms : 1;
}

bool aligned_to(const void* p, unsigned a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

int64_t clamp_grid(int64_t want, int64_t cap) { return want < 1 ? 1 : (want < cap ? want : cap); }

// Shared-memory bytes of a rotated tile of `rows` rows: the tile in the data dtype plus, for D > 256, the fp32
// scratch row of the block FWHT (16-byte aligned).
size_t rotated_tile_bytes(int64_t rows, int64_t D, int esize) {
  const size_t tile = (static_cast<size_t>(rows * D * esize) + 15) & ~size_t(15);
  return tile + (D > 256 ? static_cast<size_t>(D) * sizeof(float) : 0);
}

bool token_fast_ok(int64_t D, int G) { return D % 8 == 0 && G % 8 == 0 && G <= 256 && is_pow2(G); }

template <typename T>
void launch_quant(const void* x, int64_t batch, int64_t T_, int64_t D, int64_t xbs, int64_t xrs,
                  const QuantParams& qp, const RotateParams& rp, uint8_t* codes, void* scale, void* zero,
                  cudaStream_t stream) {
  constexpr const char* kName = "quantize_pack";
  const int esize = static_cast<int>(sizeof(T));
  const int sms = sm_count(kName);
  const bool per_channel = qp.mode == QuantMode::PerChannel;
  const int G = qp.group_size;

  QuantArgs a{};
  a.x = x;
  a.x_batch_stride = xbs;
  a.x_row_stride = xrs;
  a.T = T_;
  a.D = D;
  a.rows = batch * T_;
  a.x_dense = batch == 1 || xbs == T_ * xrs;
  a.codes = codes;
  a.scale = scale;
  a.zero = zero;
  a.code_row_bytes = D * qp.bits / 8;
  a.codes_aligned = aligned_to(codes, 8);
  a.bits = qp.bits;
  a.G = G;
  a.log2G = log2i(G);
  a.clip = qp.clip;
  a.meta = static_cast<int>(qp.meta_dtype);
  a.qmax = static_cast<float>((1 << qp.bits) - 1);
  a.rotate = rp.enabled;
  a.rot_scale = rp.scale;
  a.perm = rp.enabled ? rp.perm : nullptr;
  a.log2D = log2i(D);
  // rows of x start 16-byte aligned (every batch and row stride keeps the alignment of the base)
  const bool x_rows_aligned = aligned_to(x, 16) && (xrs * esize) % 16 == 0 && (batch == 1 || (xbs * esize) % 16 == 0);
  a.load_mode = a.perm ? detail::kLoadGather
                       : (x_rows_aligned && D % 8 == 0 ? detail::kLoadVector : detail::kLoadScalar);

  // per-token, lane groups, no shared memory
  if (!per_channel && token_fast_ok(D, G) && (!rp.enabled || (D >= 8 && D <= 256))) {
    const int64_t tasks = (a.rows * (D / 8) + 31) / 32;
    const int64_t grid = clamp_grid((tasks + kThreads / 32 - 1) / (kThreads / 32), int64_t(sms) * 8);
    quant_token_warp_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a);
    check_launch(kName);
    return;
  }

  TileArgs g{};
  g.DC = static_cast<int>(D);
  g.nslices = 1;
  g.in_smem = true;
  g.cpt = D % 8 == 0 ? 8 : 8 / qp.bits;
  g.tok_fast = !per_channel && token_fast_ok(D, G);
  size_t smem = 0;
  const int64_t unit_rows = per_channel ? G : 1;      // rows of the smallest tile
  const int64_t units = a.rows / unit_rows;           // per-token: rows; per-channel: groups
  int64_t per_tile = 1;                               // units per super tile
  // spread the work: keep at least ~4 super tiles per SM when there is enough
  const int64_t spread_cap = units / (int64_t(sms) * 4) > 1 ? units / (int64_t(sms) * 4) : 1;

  if (rp.enabled) {
    const size_t unit_bytes = static_cast<size_t>(unit_rows * D * esize);
    per_tile = static_cast<int64_t>(kTileTarget / (unit_bytes > 0 ? unit_bytes : 1));
    if (D > 256) per_tile = 1;  // rows are rotated one after another; several small tiles overlap better
    per_tile = per_tile < 1 ? 1 : (per_tile > spread_cap ? spread_cap : per_tile);
    smem = rotated_tile_bytes(per_tile * unit_rows, D, esize);
    if (smem > kFusedSmemMax)  // the caller checks quantize_pack_fused_supported first
      throw std::runtime_error("kvengine::cuda::quantize_pack: rotated tile does not fit in shared memory");
  } else {
    const size_t unit_bytes = static_cast<size_t>(unit_rows * D * esize);
    if (unit_bytes <= kSliceBudget) {
      per_tile = static_cast<int64_t>(kTileTarget / unit_bytes);
      per_tile = per_tile < 1 ? 1 : (per_tile > spread_cap ? spread_cap : per_tile);
      smem = static_cast<size_t>(per_tile * unit_rows * D * esize);
    } else if (per_channel) {
      // slice the channels: DC a multiple of q (8 keeps the 16-byte copies) with G * DC * esize <= kSliceBudget
      const int64_t q = D % 8 == 0 ? 8 : g.cpt;
      const int64_t dc = static_cast<int64_t>(kSliceBudget / (static_cast<size_t>(G) * esize)) / q * q;
      if (dc >= q) {
        g.DC = static_cast<int>(dc);
        g.nslices = static_cast<int>((D + dc - 1) / dc);
        smem = static_cast<size_t>(G) * dc * esize;
      } else {
        g.in_smem = false;
      }
    } else {
      g.in_smem = false;
    }
  }
  g.RR = static_cast<int>(per_tile * unit_rows);
  g.ntiles = ((a.rows + g.RR - 1) / g.RR) * g.nslices;
  g.tile_bytes = static_cast<int>(g.in_smem ? ((static_cast<size_t>(g.RR) * g.DC * esize + 15) & ~size_t(15)) : 0);
  g.copy_vec = g.in_smem && x_rows_aligned && D % 8 == 0 && g.DC % 8 == 0;  // cp.async staging
  g.view_vec = g.cpt == 8 && (g.in_smem ? g.DC % 8 == 0 : a.load_mode == detail::kLoadVector);
  if (per_channel) {
    // lanes per unit: enough to occupy the block, never more than the group has rows
    const int64_t U = per_tile * (g.DC / g.cpt);
    int P = 1;
    while (P < 32 && 2 * P <= G && U * 2 * P <= kThreads) P *= 2;
    g.P = P;
  } else {
    g.P = 0;
  }
  if (!g.in_smem) smem = 0;

  if (smem > 48 * 1024)
    check_call(cudaFuncSetAttribute(quant_tile_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               kName);
  int per_sm = 0;
  check_call(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, quant_tile_kernel<T>, kThreads, smem), kName);
  const int64_t grid = clamp_grid(g.ntiles, int64_t(sms) * (per_sm > 0 ? per_sm : 1));
  quant_tile_kernel<T><<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(a, g);
  check_launch(kName);
}

template <typename T>
void launch_dequant(const uint8_t* codes, const void* scale, const void* zero, int64_t batch, int64_t T_, int64_t D,
                    const QuantParams& qp, void* y, cudaStream_t stream) {
  constexpr const char* kName = "dequantize";
  DequantArgs d{};
  d.codes = codes;
  d.scale = scale;
  d.zero = zero;
  d.y = y;
  d.T = T_;
  d.D = D;
  d.rows = batch * T_;
  d.code_row_bytes = D * qp.bits / 8;
  d.bits = qp.bits;
  d.G = qp.group_size;
  d.meta = static_cast<int>(qp.meta_dtype);
  d.cpt = D % 8 == 0 ? 8 : 8 / qp.bits;
  d.per_channel = qp.mode == QuantMode::PerChannel;
  d.codes_aligned = aligned_to(codes, 8);
  d.meta_vec = d.cpt == 8 && aligned_to(scale, 16) && aligned_to(zero, 16);
  d.y_vec = d.cpt == 8 && aligned_to(y, 16);
  const int64_t items = d.rows * (D / d.cpt);
  const int sms = sm_count(kName);
  const int64_t grid = clamp_grid((items + kThreads - 1) / kThreads, int64_t(sms) * 8);
  dequant_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(d);
  check_launch(kName);
}

}  // namespace

bool quantize_pack_fused_supported(DType dtype, int64_t D, const QuantParams& qp) {
  const int esize = dtype_size(dtype);
  if (qp.mode == QuantMode::PerToken && D % 8 == 0 && D >= 8 && D <= 256 && token_fast_ok(D, qp.group_size))
    return true;  // rotated in registers, no tile
  const int64_t rows = qp.mode == QuantMode::PerChannel ? qp.group_size : 1;
  return rotated_tile_bytes(rows, D, esize) <= kFusedSmemMax;
}

void quantize_pack(const void* x, DType dtype, int64_t batch, int64_t T, int64_t D, int64_t x_batch_stride,
                   int64_t x_row_stride, const QuantParams& qp, const RotateParams& rp, uint8_t* codes, void* scale,
                   void* zero, cudaStream_t stream) {
  if (batch <= 0 || T <= 0 || D <= 0) return;
  // a row's channel index and a group's size are 32-bit ints in the kernels (the binding raises a ValueError first)
  if (D > 0x7fffffff) throw std::runtime_error("kvengine::cuda::quantize_pack: D must be < 2^31");
  switch (dtype) {
    case DType::F32:
      launch_quant<float>(x, batch, T, D, x_batch_stride, x_row_stride, qp, rp, codes, scale, zero, stream);
      break;
    case DType::F16:
      launch_quant<__half>(x, batch, T, D, x_batch_stride, x_row_stride, qp, rp, codes, scale, zero, stream);
      break;
    default:
      launch_quant<__nv_bfloat16>(x, batch, T, D, x_batch_stride, x_row_stride, qp, rp, codes, scale, zero, stream);
      break;
  }
}

void dequantize(const uint8_t* codes, const void* scale, const void* zero, DType out_dtype, int64_t batch, int64_t T,
                int64_t D, const QuantParams& qp, void* y, cudaStream_t stream) {
  if (batch <= 0 || T <= 0 || D <= 0) return;
  if (D > 0x7fffffff) throw std::runtime_error("kvengine::cuda::dequantize: D must be < 2^31");
  switch (out_dtype) {
    case DType::F32: launch_dequant<float>(codes, scale, zero, batch, T, D, qp, y, stream); break;
    case DType::F16: launch_dequant<__half>(codes, scale, zero, batch, T, D, qp, y, stream); break;
    default: launch_dequant<__nv_bfloat16>(codes, scale, zero, batch, T, D, qp, y, stream); break;
  }
}

}  // namespace kvengine::cuda
