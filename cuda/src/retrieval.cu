// kvengine — hash-based top-k KV retrieval on CUDA (semantics: kvengine/retrieval.h; same results as the CPU
// kernels: codes bit-identical away from |f| ≈ 0, hamming_topk exactly identical).
//
// hash_encode_kernel  CTA = nbits threads (thread j = output bit j) × TT = 16 rows of one (o, h).  x rows are staged
//     in shared memory as fp32; u[t][j] = Σ_d x[t][d]·w1[d][j] with w1 read coalesced (L1/L2 resident per head);
//     with the MLP, silu(u) goes to shared memory and f = u + silu(u)·w2 + b2 the same way.  Epilogue: the sign
//     bits of a warp's 32 outputs are one __ballot_sync = one code word, written by lane 0.
// hash_encode_mma_kernel<NB>  (T >= 16, D % 8 == 0, D <= 256) the same math on the tensor cores, with CuTe: CTA = 8
//     warps × 64 rows of one (o, h); both GEMMs (x·w1, silu(u)·w2) by a CuTe TiledMMA of m16n8k8 TF32 atoms (4 × 2
//     warps) with the 3xTF32 split (a·b ≈ a_lo·b_hi + a_hi·b_lo + a_hi·b_hi, ~fp32 accuracy, so codes agree with the
//     fp32 path away from |f| ≈ 0); A from shared memory (x rows; silu(u) computed as it is loaded), B (weights)
//     straight from global (L1/L2 resident per head); u stays in shared memory for the residual; the epilogue takes
//     each accumulator's (row, output) from CuTe's partition of an identity tensor and ORs its sign bit into the
//     row's code word (shared atomics), then the words are written out.
// hamming_topk: a memset and three kernels, no host sync, workspace sized from shapes only (graph capturable)
//     topk_score_mma_kernel  (sm_80+, the default; KVENGINE_TOPK_MMA=0 for the other) grid (chunk, Hkv, B), 8 warps:
//                         one b1 AND+popc MMA per 16 positions × 8 query heads, score -> uint16 workspace,
//                         shared-memory histogram of the middle positions' scores -> per-chunk histogram, and its
//                         non-empty bins added (global atomics) into the (b, h) total.
//     topk_score_kernel   the same on the CUDA cores: one thread per position, POPC per word and query head.
//     topk_select_kernel  one CTA of 512 per (b, h): T from a block scan of the total histogram, per-chunk counts
//                         above / at T (a warp per chunk, bins >= T only), chunk output slots and tie budgets by
//                         block scans; writes sinks, recent window and -1 padding.
//     topk_gather_kernel  grid (chunk, Hkv, B): ordered stream compaction of the chunk's uint16 scores: per-warp
//                         counts, one barrier, then warp scans give each selected position its slot.
// sparse_decode_attention_kernel  CTA = 8 warps per (b, KV head, block of <= 8 query rows); warp w walks the index
//     list entries j ≡ w (mod 8), 4 tokens per step (loads issued before use); each lane holds D/32 channels of
//     every row's query and accumulator; dot products reduced with shuffles; online softmax per warp; the 8 warp
//     states are merged through shared memory (log-sum-exp weights, shared atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kvengine/cuda_ops.h"
#include "kvengine/retrieval.h"

namespace kvengine::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("kvengine::cuda retrieval: ") + what + ": " + cudaGetErrorString(e));
}

__host__ __device__ __forceinline__ int64_t mn64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t mx64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float load_f(const void* p, int64_t i, int dtype) {
  if (dtype == 0) return static_cast<const float*>(p)[i];
  if (dtype == 1) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// ---- hash_encode -------------------------------------------------------------------------------------------------
constexpr int kEncRows = 16;

struct EncParams {
  const void* x;
  int dtype;
  int64_t O, H, T, D, so, sh, st;
  const float* w1;
  const float* b1;
  const float* w2;
  const float* b2;
  int per_head, nbits;
  uint32_t* codes;
  int64_t tiles;  // tiles of kEncRows rows per (o, h)
};

// task = (o, h, tile of kEncRows rows); enc_smem: [kEncRows][D] x rows, then [kEncRows][nbits] silu(u)
__device__ __forceinline__ void hash_encode_task(const EncParams& p, int64_t task, float* enc_smem) {
  const int nb = p.nbits, j = threadIdx.x;
  const int64_t tile = task % p.tiles, oh = task / p.tiles, o = oh / p.H, h = oh % p.H;
  const int64_t t0 = tile * kEncRows;
  const int rows = static_cast<int>(mn64(kEncRows, p.T - t0));
  float* xs = enc_smem;                     // [kEncRows][D]
  float* hs = enc_smem + kEncRows * p.D;    // [kEncRows][nbits]
  for (int64_t i = j; i < int64_t(kEncRows) * p.D; i += nb) {
    const int r = static_cast<int>(i / p.D);
    const int64_t d = i % p.D;
    xs[i] = r < rows ? load_f(p.x, o * p.so + h * p.sh + (t0 + r) * p.st + d, p.dtype) : 0.f;
  }
  __syncthreads();
  const int64_t hw = p.per_head ? h : 0;
  const float* w1 = p.w1 + hw * p.D * nb;
  float u[kEncRows];
  const float bias1 = p.b1 ? p.b1[hw * nb + j] : 0.f;
#pragma unroll
  for (int r = 0; r < kEncRows; ++r) u[r] = bias1;
  for (int64_t d = 0; d < p.D; ++d) {
    const float w = __ldg(w1 + d * nb + j);
#pragma unroll
    for (int r = 0; r < kEncRows; ++r) u[r] = fmaf(xs[r * p.D + d], w, u[r]);
  }
  if (p.w2) {
#pragma unroll
    for (int r = 0; r < kEncRows; ++r) hs[r * nb + j] = u[r] / (1.f + __expf(-u[r]));
    __syncthreads();
    const float* w2 = p.w2 + hw * nb * nb;
    const float bias2 = p.b2 ? p.b2[hw * nb + j] : 0.f;
    float f[kEncRows];
#pragma unroll
    for (int r = 0; r < kEncRows; ++r) f[r] = 0.f;
    for (int i = 0; i < nb; ++i) {
      const float w = __ldg(w2 + i * nb + j);
#pragma unroll
      for (int r = 0; r < kEncRows; ++r) f[r] = fmaf(hs[r * nb + i], w, f[r]);
    }
#pragma unroll
    for (int r = 0; r < kEncRows; ++r) u[r] = u[r] + (f[r] + bias2);
  }
  const int lane = j & 31, word = j >> 5, W = nb >> 5;
#pragma unroll
  for (int r = 0; r < kEncRows; ++r) {
    const unsigned bits = __ballot_sync(kFull, u[r] > 0.f);
    if (lane == 0 && r < rows) p.codes[((oh * p.T) + t0 + r) * W + word] = bits;
  }
}

// one CTA per (o, h, tile of kEncRows rows), grid-stride over them (the grid is capped at 2^31 - 1 CTAs)
__global__ void hash_encode_kernel(const EncParams p) {
  extern __shared__ float enc_smem[];
  const int64_t ntasks = p.O * p.H * p.tiles;
  for (int64_t task = blockIdx.x; task < ntasks; task += gridDim.x) {  // block-uniform
    if (task != blockIdx.x) __syncthreads();  // the previous task's shared rows are consumed
    hash_encode_task(p, task, enc_smem);
  }
}

// ---- hash_encode on the tensor cores (CuTe) ------------------------------------------------------------------------
// The m16n8k8 TF32 MMA as a CuTe MMA operation: CuTe's SM80_16x8x8_F32TF32TF32F32_TN, with the instruction written
// here (so the CPU emulator, tests/cuda_emu, runs this file's own PTX).
struct KveTf32Mma {
  using DRegisters = float[4];
  using ARegisters = uint32_t[4];
  using BRegisters = uint32_t[2];
  using CRegisters = float[4];
  CUTE_HOST_DEVICE static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0, uint32_t const& a1,
                                   uint32_t const& a2, uint32_t const& a3, uint32_t const& b0, uint32_t const& b1,
                                   float const& c0, float const& c1, float const& c2, float const& c3) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(KVENGINE_CUDA_EMU)
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c0), "f"(c1), "f"(c2), "f"(c3));
#endif
  }
};

}  // namespace
}  // namespace kvengine::cuda

namespace cute {
template <>
struct MMA_Traits<kvengine::cuda::KveTf32Mma> : MMA_Traits<SM80_16x8x8_F32TF32TF32F32_TN> {};
}  // namespace cute

namespace kvengine::cuda {
namespace {

constexpr int kMmaRows = 64, kMmaThreads = 256, kMmaMaxD = 256;
// 8 warps: 4 along the rows (16 each), 2 along the outputs (8 each per MMA, repeated to cover nbits)
using HashMma = decltype(cute::make_tiled_mma(cute::MMA_Atom<KveTf32Mma>{},
                                              cute::Layout<cute::Shape<cute::_4, cute::_2, cute::_1>>{}));

// acc += A[kMmaRows x K] (shared, row stride lda; SiLU applied to each element with `silu`) · B[K x NB] (global,
// row-major), K a multiple of 8, as 3xTF32: a·b ≈ a_lo·b_hi + a_hi·b_lo + a_hi·b_hi (~fp32 accuracy)
template <int NB, class Acc>
__device__ __forceinline__ void hash_gemm_3xtf32(const float* A, int lda, bool silu, const float* B, int K, Acc& acc) {
  using namespace cute;
  HashMma mma;
  auto thr = mma.get_slice(threadIdx.x);
  for (int k0 = 0; k0 < K; k0 += 8) {
    Tensor sA = make_tensor(make_smem_ptr(A + k0),
                            make_layout(make_shape(Int<kMmaRows>{}, _8{}), make_stride(lda, _1{})));
    Tensor gB = make_tensor(make_gmem_ptr(B + static_cast<int64_t>(k0) * NB),
                            make_layout(make_shape(Int<NB>{}, _8{}), make_stride(_1{}, Int<NB>{})));
    Tensor tA = thr.partition_A(sA);
    Tensor tB = thr.partition_B(gB);
    Tensor a_hi = thr.partition_fragment_A(sA), a_lo = thr.partition_fragment_A(sA);
    Tensor b_hi = thr.partition_fragment_B(gB), b_lo = thr.partition_fragment_B(gB);
    CUTE_UNROLL
    for (int i = 0; i < size(tA); ++i) {
      float v = tA(i);
      if (silu) v = v / (1.f + __expf(-v));
      a_hi(i) = cutlass::tfloat32_t(v);
      a_lo(i) = cutlass::tfloat32_t(v - static_cast<float>(a_hi(i)));
    }
    CUTE_UNROLL
    for (int i = 0; i < size(tB); ++i) {
      const float v = __ldg(&tB(i));
      b_hi(i) = cutlass::tfloat32_t(v);
      b_lo(i) = cutlass::tfloat32_t(v - static_cast<float>(b_hi(i)));
    }
    gemm(mma, a_lo, b_hi, acc);
    gemm(mma, a_hi, b_lo, acc);
    gemm(mma, a_hi, b_hi, acc);
  }
}

// smem: xs [kMmaRows][D + 4] x rows (fp32), us [kMmaRows][NB + 4] u = x·w1 + b1, cs [kMmaRows][NB / 32] code words
template <int NB>
size_t hash_mma_smem(int64_t D) {
  return sizeof(float) * kMmaRows * (D + 4 + NB + 4) + sizeof(uint32_t) * kMmaRows * (NB / 32);
}

template <int NB>
__global__ void __launch_bounds__(kMmaThreads) hash_encode_mma_kernel(const EncParams p) {
  using namespace cute;
  extern __shared__ __align__(16) float mma_smem[];
  const int D = static_cast<int>(p.D), lda = D + 4, ldu = NB + 4, W = NB / 32, tid = threadIdx.x;
  float* xs = mma_smem;
  float* us = xs + kMmaRows * lda;
  uint32_t* cs = reinterpret_cast<uint32_t*>(us + kMmaRows * ldu);
  HashMma mma;
  auto thr = mma.get_slice(tid);
  Tensor tC = thr.partition_C(make_identity_tensor(make_shape(Int<kMmaRows>{}, Int<NB>{})));  // (row, output)
  const int64_t ntasks = p.O * p.H * p.tiles;
  for (int64_t task = blockIdx.x; task < ntasks; task += gridDim.x) {  // block-uniform
    const int64_t tile = task % p.tiles, oh = task / p.tiles, o = oh / p.H, h = oh % p.H;
    const int64_t t0 = tile * kMmaRows;
    const int rows = static_cast<int>(mn64(kMmaRows, p.T - t0));
    __syncthreads();  // the previous task's shared rows and code words are consumed
    for (int i = tid; i < kMmaRows * D; i += kMmaThreads) {
      const int r = i / D, d = i - r * D;
      xs[r * lda + d] = r < rows ? load_f(p.x, o * p.so + h * p.sh + (t0 + r) * p.st + d, p.dtype) : 0.f;
    }
    for (int i = tid; i < kMmaRows * W; i += kMmaThreads) cs[i] = 0u;
    __syncthreads();
    const int64_t hw = p.per_head ? h : 0;
    Tensor acc = partition_fragment_C(mma, Shape<Int<kMmaRows>, Int<NB>>{});
    clear(acc);
    hash_gemm_3xtf32<NB>(xs, lda, false, p.w1 + hw * p.D * NB, D, acc);
    const float* b1 = p.b1 ? p.b1 + hw * NB : nullptr;
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) {
      const int m = get<0>(tC(i)), n = get<1>(tC(i));
      us[m * ldu + n] = acc(i) + (b1 ? b1[n] : 0.f);
    }
    __syncthreads();
    if (p.w2) {
      clear(acc);
      hash_gemm_3xtf32<NB>(us, ldu, true, p.w2 + hw * static_cast<int64_t>(NB) * NB, NB, acc);
    }
    const float* b2 = p.b2 ? p.b2 + hw * NB : nullptr;
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) {  // f = u (+ (silu(u)·w2 + b2)); its sign bits -> the row's code words
      const int m = get<0>(tC(i)), n = get<1>(tC(i));
      const float u = us[m * ldu + n];
      const float f = p.w2 ? u + (acc(i) + (b2 ? b2[n] : 0.f)) : u;
      if (f > 0.f) atomicOr(&cs[m * W + (n >> 5)], 1u << (n & 31));
    }
    __syncthreads();
    for (int i = tid; i < rows * W; i += kMmaThreads) {
      const int r = i / W, w = i - r * W;
      p.codes[(oh * p.T + t0 + r) * W + w] = cs[r * W + w];
    }
  }
}

template <int NB>
void launch_hash_mma(const EncParams& p, cudaStream_t stream) {
  const size_t smem = hash_mma_smem<NB>(p.D);
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(hash_encode_mma_kernel<NB>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "hash_encode (tensor cores) smem attribute");
  const int64_t grid = p.O * p.H * p.tiles;
  hash_encode_mma_kernel<NB><<<static_cast<unsigned>(grid < 0x7fffffff ? grid : 0x7fffffff), kMmaThreads, smem,
                               stream>>>(p);
  check(cudaGetLastError(), "hash_encode (tensor cores) launch");
}

// ---- hamming_topk ---------------------------------------------------------------------------------------------------
constexpr int kTopkThreads = 256;  // score and gather kernels
constexpr int kSelThreads = 512;   // select kernel (one CTA per (b, h); nch <= 256 < kSelThreads)

struct TopkLayout {
  int64_t chunk, nch, nbins, npad;
  size_t sc_off, hist_off, tot_off, meta_off, thr_off, total;
};

int64_t cuda_chunk(int64_t N) {
  const int64_t c = N > 4096 * 256 ? (N + 255) / 256 : 4096;
  return (c + 255) / 256 * 256;
}

TopkLayout layout(const HammingTopkArgs& a) {
  TopkLayout l;
  l.chunk = cuda_chunk(a.N);
  l.nch = (a.N + l.chunk - 1) / l.chunk;
  l.nbins = (a.Hq / a.Hkv) * 32 * a.W + 1;
  l.npad = (a.N + 7) / 8 * 8;  // score rows padded to 8 positions: 16-byte groups in the gather kernel
  const int64_t BH = a.B * a.Hkv;
  auto up = [](size_t x) { return (x + 255) / 256 * 256; };
  l.sc_off = 0;
  l.hist_off = up(size_t(BH) * l.npad * sizeof(uint16_t));
  l.tot_off = l.hist_off + up(size_t(BH) * l.nch * l.nbins * sizeof(int32_t));
  l.meta_off = l.tot_off + up(size_t(BH) * l.nbins * sizeof(int32_t));
  l.thr_off = l.meta_off + up(size_t(BH) * l.nch * 2 * sizeof(int32_t));
  l.total = l.thr_off + up(size_t(BH) * sizeof(int32_t));
  return l;
}

struct TopkParams {
  const uint32_t* q;
  int64_t qsb, qsh;
  const uint32_t* k;
  int64_t ksb, ksh;
  const int32_t* lens;
  int Hkv, g, W;
  int64_t N, npad, k_sel, sinks, recent, chunk, nch, nbins;
  uint16_t* sc;   // [BH][npad] scores
  int32_t* hist;  // [BH][nch][nbins] per-chunk histograms of the middle positions' scores
  int32_t* tot;   // [BH][nbins] their sums (zeroed before the score kernel, filled by its atomics)
  int32_t* meta;  // [BH][nch][2]: output slot, tie budget
  int32_t* thr;   // [BH] threshold score T (nbins: nothing selected from the middle)
  int32_t* idx;
  int32_t* scr;
};

struct Span {
  int64_t L, ns, nr, m;
};

__device__ __forceinline__ Span span_of(const TopkParams& p, int64_t b) {
  Span s;
  s.L = p.lens ? mn64(mx64(p.lens[b], 0), p.N) : p.N;
  s.ns = mn64(p.sinks, s.L);
  s.nr = mn64(p.recent, s.L - s.ns);
  s.m = mx64(0, mn64(p.k_sel - s.ns - s.nr, s.L - s.ns - s.nr));
  return s;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// inclusive prefix sum over the warp's lanes
__device__ __forceinline__ int warp_incl_scan(int v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += y;
  }
  return v;
}

// exclusive prefix sum over the CTA in thread order (all NT threads call it); `total` gets the CTA sum
template <int NT>
__device__ __forceinline__ int block_excl_scan(int v, int* wsum, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int x = warp_incl_scan(v);
  if (lane == 31) wsum[warp] = x;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) {
    const int c = wsum[w];
    before += w < warp ? c : 0;
    total += c;
  }
  __syncthreads();
  return before + x - v;
}

// The CTA's chunk histogram (shared, complete after a barrier) -> its workspace row, and its non-empty bins into the
// (b, h) total (global atomics; most bins are empty: scores concentrate around the mean)
__device__ __forceinline__ void flush_histogram(const TopkParams& p, const int32_t* hist, int64_t bh, int64_t ck) {
  int32_t* out = p.hist + (bh * p.nch + ck) * p.nbins;
  int32_t* tot = p.tot + bh * p.nbins;
  for (int i = threadIdx.x; i < p.nbins; i += kTopkThreads) {
    const int32_t c = hist[i];
    out[i] = c;
    if (c) atomicAdd(&tot[i], c);
  }
}

// d += popc(a & b) over one m16n8k256 b1 tile.  A (16 x 256, row): register r holds row gi + 8·(r & 1), k bits
// 32t + 128·(r >> 1) + [0, 32); B (256 x 8, col): register r holds column gi, k bits 32t + 128r + [0, 32)
// (gi = lane / 4, t = lane % 4); D: d0/d1 row gi, columns 2t / 2t + 1, d2/d3 row gi + 8.
__device__ __forceinline__ void bmma_and_popc(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0, uint32_t b1) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(KVENGINE_CUDA_EMU)
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

template <int W>
__global__ void __launch_bounds__(kTopkThreads) topk_score_kernel(const TopkParams p, const bool vec) {
  extern __shared__ int32_t topk_smem[];
  int32_t* hist = topk_smem;                                       // [nbins]
  uint32_t* qs = reinterpret_cast<uint32_t*>(topk_smem + p.nbins);  // [g][W]
  const int64_t ck = blockIdx.x, h = blockIdx.y, b = blockIdx.z, bh = b * p.Hkv + h;
  const Span s = span_of(p, b);
  for (int i = threadIdx.x; i < p.nbins; i += kTopkThreads) hist[i] = 0;
  for (int i = threadIdx.x; i < p.g * W; i += kTopkThreads)
    qs[i] = p.q[b * p.qsb + (h * p.g + i / W) * p.qsh + i % W];
  __syncthreads();
  const int64_t p0 = ck * p.chunk, p1 = mn64(s.L, p0 + p.chunk);
  const uint32_t* kb = p.k + b * p.ksb + h * p.ksh;
  uint16_t* sc = p.sc + bh * p.npad;
  const int total = p.g * 32 * W;
  for (int64_t pos = p0 + threadIdx.x; pos < p1; pos += kTopkThreads) {
    const uint32_t* kr = kb + pos * W;
    uint32_t kw[W];
    if (W >= 4 && vec) {
#pragma unroll
      for (int w = 0; w < W; w += 4) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(kr + w));
        kw[w] = v.x;
        kw[w + 1] = v.y;
        kw[w + 2] = v.z;
        kw[w + 3] = v.w;
      }
    } else {
#pragma unroll
      for (int w = 0; w < W; ++w) kw[w] = __ldg(kr + w);
    }
    int pc = 0;
    for (int i = 0; i < p.g; ++i)
#pragma unroll
      for (int w = 0; w < W; ++w) pc += __popc(kw[w] ^ qs[i * W + w]);
    const int score = total - pc;
    sc[pos] = static_cast<uint16_t>(score);
    if (pos >= s.ns && pos < s.L - s.nr) atomicAdd(&hist[score], 1);
  }
  __syncthreads();
  flush_histogram(p, hist, bh, ck);
}

// The same scores on the tensor cores (sm_80+): one m16n8k256 b1 AND+popc MMA per 16 positions and 8 query heads
// of the group (two for 256-bit codes): rows = positions, columns = query heads, and the 256-bit k range holds the
// key's 128 code bits (A registers 0/1) against ~q (B register 0) and ~k (A registers 2/3) against q (B register 1),
// so the accumulator is popc(k & ~q) + popc(~k & q) = popc(k ^ q) summed over the words; head groups past the
// first 8 accumulate into the same registers, and the 8 columns (query heads; absent heads and words have zero B
// words) are summed by two quad shuffles with both rows packed in one register.  A warp takes kTopkTiles tiles of
// 16 positions at a time, loads first.  POPC runs at 16 per clock per SM; this needs ~25 issued instructions per
// 16 positions and no POPC, so the kernel is bound by the code bytes, not the popcounts (docs/performance.md).
constexpr int kTopkTiles = 4;

template <int W, bool ONE>  // ONE: g <= 8, the B fragments live in registers
__global__ void __launch_bounds__(kTopkThreads) topk_score_mma_kernel(const TopkParams p) {
  constexpr int NH = W == 8 ? 2 : 1;  // 128-bit halves of a code
  extern __shared__ int32_t topk_smem[];
  int32_t* hist = topk_smem;                                                  // [nbins]
  uint2* bs = reinterpret_cast<uint2*>(topk_smem + ((p.nbins + 1) & ~int64_t(1)));  // [ng][NH][32 lanes]
  const int ng = (p.g + 7) / 8;
  const int64_t ck = blockIdx.x, h = blockIdx.y, b = blockIdx.z, bh = b * p.Hkv + h;
  const Span s = span_of(p, b);
  for (int i = threadIdx.x; i < p.nbins; i += kTopkThreads) hist[i] = 0;
  for (int i = threadIdx.x; i < ng * NH * 32; i += kTopkThreads) {
    const int l = i % 32, hf = (i / 32) % NH, r = i / (32 * NH);
    const int head = r * 8 + l / 4, word = hf * 4 + l % 4;
    uint32_t qw = 0, nq = 0;
    if (head < p.g && word < W) {
      qw = p.q[b * p.qsb + (h * p.g + head) * p.qsh + word];
      nq = ~qw;
    }
    bs[i] = make_uint2(nq, qw);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gi = lane >> 2, t = lane & 3;
  uint2 breg[NH];
  if constexpr (ONE) {
#pragma unroll
    for (int hf = 0; hf < NH; ++hf) breg[hf] = bs[hf * 32 + lane];
  }
  // positions relative to the chunk start in 32-bit arithmetic (a chunk holds < 2^24 positions)
  const int64_t p0 = ck * p.chunk;
  const int n = static_cast<int>(mx64(0, mn64(s.L, p0 + p.chunk) - p0));
  const int m0 = static_cast<int>(mn64(mx64(s.ns - p0, 0), n));
  const int m1 = static_cast<int>(mx64(mn64(mx64(s.L - s.nr - p0, 0), n), m0));  // middle: [m0, m1)
  const uint32_t* kc = p.k + b * p.ksb + h * p.ksh + p0 * W + t;
  uint16_t* scc = p.sc + bh * p.npad + p0;
  const int total = p.g * 32 * W;
  const bool word_ok = t < W;  // W < 4: lanes t >= W hold no code word (their B words are zero)
  const int my_row = gi + ((t & 1) ? 8 : 0), shift = (t & 1) ? 16 : 0;  // lanes t = 0 / 1 write rows gi / gi + 8
  constexpr int kWarps = kTopkThreads / 32;
  for (int t0 = warp * 16; t0 < n; t0 += kWarps * kTopkTiles * 16) {
    uint32_t a[kTopkTiles][NH][2];
#pragma unroll
    for (int u = 0; u < kTopkTiles; ++u) {
      const int r_lo = t0 + kWarps * 16 * u + gi, r_hi = r_lo + 8;
#pragma unroll
      for (int hf = 0; hf < NH; ++hf) {
        a[u][hf][0] = word_ok && r_lo < n ? __ldg(kc + r_lo * W + hf * 4) : 0u;
        a[u][hf][1] = word_ok && r_hi < n ? __ldg(kc + r_hi * W + hf * 4) : 0u;
      }
    }
#pragma unroll
    for (int u = 0; u < kTopkTiles; ++u) {
      const int base = t0 + kWarps * 16 * u;
      if (base >= n) break;  // warp-uniform
      int d[4] = {0, 0, 0, 0};
      for (int r = 0; r < (ONE ? 1 : ng); ++r)
#pragma unroll
        for (int hf = 0; hf < NH; ++hf) {
          const uint2 bf = ONE ? breg[hf] : bs[(r * NH + hf) * 32 + lane];
          bmma_and_popc(d, a[u][hf][0], a[u][hf][1], ~a[u][hf][0], ~a[u][hf][1], bf.x, bf.y);
        }
      int both = (d[0] + d[1]) | ((d[2] + d[3]) << 16);  // row sums <= 8192 (g · nbits <= 8192)
      both += __shfl_xor_sync(kFull, both, 1);
      both += __shfl_xor_sync(kFull, both, 2);
      const int pos = base + my_row;
      if (t < 2 && pos < n) {
        const int score = total - ((both >> shift) & 0xffff);
        scc[pos] = static_cast<uint16_t>(score);
        if (static_cast<unsigned>(pos - m0) < static_cast<unsigned>(m1 - m0)) atomicAdd(&hist[score], 1);
      }
    }
  }
  __syncthreads();
  flush_histogram(p, hist, bh, ck);
}

// One CTA per (b, h), no serial loop longer than a thread's share: T from a block scan of the summed histogram
// (thread t owns `per` bins counted from the top), the per-chunk counts above / at T by a warp per chunk (only the
// bins >= T are read), the chunks' output slots and tie budgets by two block scans over the chunks.
__global__ void __launch_bounds__(kSelThreads) topk_select_kernel(const TopkParams p) {
  extern __shared__ int32_t sel_smem[];
  int32_t* gt = sel_smem;          // [nch] count above T
  int32_t* eq = sel_smem + p.nch;  // [nch] count at T
  __shared__ int32_t wsum[kSelThreads / 32];
  __shared__ int32_t sh_T, sh_need;
  const int64_t bh = blockIdx.x, b = bh / p.Hkv;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const Span s = span_of(p, b);
  const int32_t* tot = p.tot + bh * p.nbins;
  const int64_t per = (p.nbins + kSelThreads - 1) / kSelThreads;
  const int64_t hi = p.nbins - 1 - int64_t(threadIdx.x) * per;  // this thread's top bin (may be < 0)
  int c = 0;
  for (int64_t i = 0; i < per && hi - i >= 0; ++i) c += tot[hi - i];
  if (threadIdx.x == 0) {
    sh_T = static_cast<int32_t>(p.nbins);
    sh_need = 0;
  }
  int all;
  const int before = block_excl_scan<kSelThreads>(c, wsum, all);  // its barriers order sh_T's initialization
  if (s.m > 0 && before < s.m && before + c >= s.m) {  // exactly one thread: the suffix count crosses m here
    int64_t cum = before;
    for (int64_t i = 0; i < per && hi - i >= 0; ++i) {
      const int v = tot[hi - i];
      if (cum + v >= s.m) {
        sh_T = static_cast<int32_t>(hi - i);
        sh_need = static_cast<int32_t>(s.m - cum);
        break;
      }
      cum += v;
    }
  }
  __syncthreads();
  const int32_t T = sh_T, need = sh_need;
  if (threadIdx.x == 0) p.thr[bh] = T;
  // a warp per chunk, kSelChunks chunks at a time (their loads in flight together: nch <= 256 is <= 2 rounds)
  constexpr int kSelWarps = kSelThreads / 32, kSelChunks = 8;
  for (int64_t c0 = warp; c0 < p.nch; c0 += kSelWarps * kSelChunks) {
    int cg[kSelChunks], ce[kSelChunks];
#pragma unroll
    for (int u = 0; u < kSelChunks; ++u) cg[u] = ce[u] = 0;
    for (int64_t i = T + lane; i < p.nbins; i += 32) {
#pragma unroll
      for (int u = 0; u < kSelChunks; ++u) {
        const int64_t ck = c0 + u * kSelWarps;
        const int v = ck < p.nch ? p.hist[(bh * p.nch + ck) * p.nbins + i] : 0;
        if (i == T) ce[u] = v;
        else cg[u] += v;
      }
    }
#pragma unroll
    for (int u = 0; u < kSelChunks; ++u) {
      const int64_t ck = c0 + u * kSelWarps;
      const int g = warp_sum(cg[u]), e = warp_sum(ce[u]);
      if (lane == 0 && ck < p.nch) {
        gt[ck] = g;
        eq[ck] = e;
      }
    }
  }
  __syncthreads();
  {
    const int64_t ck = threadIdx.x;
    const bool own = ck < p.nch;
    const int e = own ? eq[ck] : 0;
    const int eq_before = block_excl_scan<kSelThreads>(e, wsum, all);
    const int tk = own ? min(max(need - eq_before, 0), e) : 0;  // ties taken from this chunk, lowest index first
    const int slot = block_excl_scan<kSelThreads>(own ? gt[ck] + tk : 0, wsum, all);
    if (own) {
      p.meta[(bh * p.nch + ck) * 2] = static_cast<int32_t>(s.ns + slot);
      p.meta[(bh * p.nch + ck) * 2 + 1] = tk;
    }
  }
  int32_t* idx = p.idx + bh * p.k_sel;
  int32_t* scr = p.scr + bh * p.k_sel;
  const uint16_t* sc = p.sc + bh * p.npad;
  const int64_t r0 = s.ns + s.m;
  for (int64_t j = threadIdx.x; j < p.k_sel; j += kSelThreads) {
    if (j < s.ns) {
      idx[j] = static_cast<int32_t>(j);
      scr[j] = sc[j];
    } else if (j >= r0 && j < r0 + s.nr) {
      const int64_t pos = s.L - s.nr + (j - r0);
      idx[j] = static_cast<int32_t>(pos);
      scr[j] = sc[pos];
    } else if (j >= r0 + s.nr) {
      idx[j] = -1;
      scr[j] = -1;
    }
  }
}

// The 8 scores of the 8-aligned group at q, 16 bytes in one load (rows are padded to 8 positions)
__device__ __forceinline__ void load_scores8(const uint16_t* sc, int64_t q, int (&v)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(sc + q));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    v[2 * e] = static_cast<int>(w[e] & 0xffffu);
    v[2 * e + 1] = static_cast<int>(w[e] >> 16);
  }
}

// Ordered compaction of one chunk's middle positions with score > T, and of its first `budget` positions at T.
// Warp w owns the contiguous eighth [c0 + w·chunk/8, +chunk/8) of the chunk; each lane reads 8 consecutive scores
// per step (a warp step covers 256 positions). Pass 1 counts per warp (one CTA barrier for the warp prefix), pass 2
// (only steps with a candidate) turns the counts into output slots by warp scans: a position's slot is the chunk's
// slot + (count above T before it) + min(count at T before it, budget).
__global__ void __launch_bounds__(kTopkThreads) topk_gather_kernel(const TopkParams p) {
  __shared__ int32_t wcnt[2][kTopkThreads / 32];
  const int64_t ck = blockIdx.x, h = blockIdx.y, b = blockIdx.z, bh = b * p.Hkv + h;
  const Span s = span_of(p, b);
  const int64_t c0 = ck * p.chunk;
  const int64_t p0 = mx64(c0, s.ns), p1 = mn64(mn64(s.L, c0 + p.chunk), s.L - s.nr);
  const int32_t T = p.thr[bh];
  if (p0 >= p1 || T >= p.nbins) return;  // uniform over the CTA
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t per_w = p.chunk / (kTopkThreads / 32);  // a multiple of 32 (chunk is a multiple of 256)
  const int64_t w0 = c0 + warp * per_w, w1 = mn64(w0 + per_w, p1);
  const uint16_t* sc = p.sc + bh * p.npad;
  int ng = 0, ne = 0;
  for (int64_t base = w0; base < w1; base += 256) {
    const int64_t q = base + lane * 8;
    if (q < w1 && q + 8 > p0) {
      int v[8];
      load_scores8(sc, q, v);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const bool in = q + e >= p0 && q + e < w1;
        ng += in && v[e] > T;
        ne += in && v[e] == T;
      }
    }
  }
  ng = warp_sum(ng);
  ne = warp_sum(ne);
  if (lane == 0) {
    wcnt[0][warp] = ng;
    wcnt[1][warp] = ne;
  }
  __syncthreads();
  if (ng + ne == 0) return;  // uniform over the warp; no barrier follows
  int g_run = 0, e_run = 0;
  for (int w = 0; w < warp; ++w) {
    g_run += wcnt[0][w];
    e_run += wcnt[1][w];
  }
  const int64_t slot = p.meta[(bh * p.nch + ck) * 2];
  const int budget = p.meta[(bh * p.nch + ck) * 2 + 1];
  int32_t* idx = p.idx + bh * p.k_sel;
  int32_t* scr = p.scr + bh * p.k_sel;
  for (int64_t base = w0; base < w1; base += 256) {
    const int64_t q = base + lane * 8;
    int v[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
    int lg = 0, le = 0;
    if (q < w1 && q + 8 > p0) {
      load_scores8(sc, q, v);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (q + e < p0 || q + e >= w1) v[e] = -1;
        lg += v[e] > T;
        le += v[e] == T;
      }
    }
    if (__ballot_sync(kFull, lg + le > 0) == 0) continue;  // uniform
    const int packed = (lg << 16) | le;  // per warp step at most 256 of each: no carry between the halves
    const int incl = warp_incl_scan(packed);
    const int step = __shfl_sync(kFull, incl, 31);
    int gb = g_run + ((incl - packed) >> 16), eb = e_run + ((incl - packed) & 0xffff);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (v[e] > T) {
        const int64_t o = slot + gb + min(eb, budget);
        idx[o] = static_cast<int32_t>(q + e);
        scr[o] = v[e];
        ++gb;
      } else if (v[e] == T) {
        if (eb < budget) {
          const int64_t o = slot + gb + eb;
          idx[o] = static_cast<int32_t>(q + e);
          scr[o] = v[e];
        }
        ++eb;
      }
    }
    g_run += step >> 16;
    e_run += step & 0xffff;
  }
}

// ---- sparse decode attention -------------------------------------------------------------------------------------------
constexpr int kAttnWarps = 8;
constexpr int kRows = 8;    // query rows per CTA
constexpr int kUnroll = 4;  // tokens per warp step

struct SparseParams {
  const void* q;
  int64_t qsb, qsh;
  void* out;
  const void* k;
  const void* v;
  int64_t ksb, ksh, kst, vsb, vsh, vst;
  const void* idx;
  int idx64;
  int64_t isb, ish, n_sel;
  const int32_t* lens;
  int dtype;
  int Hq, Hkv, g, nrb;
  int64_t N;
  float scale;
};

template <int VPL>
__device__ __forceinline__ void load_row(const void* base, int64_t off, int dtype, float (&x)[VPL]) {
  // VPL consecutive elements starting at off (lane's slice)
  if (dtype == 0) {
    const float* p = static_cast<const float*>(base) + off;
#pragma unroll
    for (int e = 0; e < VPL; ++e) x[e] = p[e];
  } else if (dtype == 1) {
    const __half* p = static_cast<const __half*>(base) + off;
#pragma unroll
    for (int e = 0; e < VPL; ++e) x[e] = __half2float(p[e]);
  } else {
    const __nv_bfloat16* p = static_cast<const __nv_bfloat16*>(base) + off;
#pragma unroll
    for (int e = 0; e < VPL; ++e) x[e] = __bfloat162float(p[e]);
  }
}

template <int VPL>
__global__ void __launch_bounds__(kAttnWarps * 32) sparse_attn_kernel(const SparseParams p) {
  constexpr int D = VPL * 32;
  __shared__ float sm_m[kAttnWarps][kRows], sm_l[kAttnWarps][kRows];
  __shared__ float sm_acc[kRows][D];
  __shared__ float sm_lt[kRows];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t rb = blockIdx.x % p.nrb, bh = blockIdx.x / p.nrb, b = bh / p.Hkv, h = bh % p.Hkv;
  const int r0 = static_cast<int>(rb) * kRows;
  const int nrows = min(kRows, p.g - r0);
  const int64_t L = p.lens ? mn64(mx64(p.lens[b], 0), p.N) : p.N;
  const int d0 = lane * VPL;
  float q[kRows][VPL], acc[kRows][VPL], m[kRows], l[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < VPL; ++e) acc[r][e] = 0.f;
    if (r < nrows) {
      load_row<VPL>(p.q, b * p.qsb + (h * p.g + r0 + r) * p.qsh + d0, p.dtype, q[r]);
#pragma unroll
      for (int e = 0; e < VPL; ++e) q[r][e] *= p.scale;
    } else {
#pragma unroll
      for (int e = 0; e < VPL; ++e) q[r][e] = 0.f;
    }
  }
  const int64_t ib = b * p.isb + h * p.ish;
  const int64_t kb = b * p.ksb + h * p.ksh, vb = b * p.vsb + h * p.vsh;
  for (int64_t j0 = int64_t(warp) * kUnroll; j0 < p.n_sel; j0 += int64_t(kAttnWarps) * kUnroll) {
    int64_t pos[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u;
      int64_t t = -1;
      if (j < p.n_sel)
        t = p.idx64 ? static_cast<const int64_t*>(p.idx)[ib + j] : static_cast<const int32_t*>(p.idx)[ib + j];
      ok[u] = t >= 0 && t < L;
      pos[u] = ok[u] ? t : 0;
    }
    float kx[kUnroll][VPL], vx[kUnroll][VPL];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      load_row<VPL>(p.k, kb + pos[u] * p.kst + d0, p.dtype, kx[u]);
      load_row<VPL>(p.v, vb + pos[u] * p.vst + d0, p.dtype, vx[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!ok[u]) continue;  // uniform over the warp
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r >= nrows) break;
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < VPL; ++e) s = fmaf(q[r][e], kx[u][e], s);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
        const float mn = fmaxf(m[r], s);
        const float alpha = __expf(m[r] - mn), pr = __expf(s - mn);
        l[r] = l[r] * alpha + pr;
        m[r] = mn;
#pragma unroll
        for (int e = 0; e < VPL; ++e) acc[r][e] = fmaf(pr, vx[u][e], acc[r][e] * alpha);
      }
    }
  }
  // merge the warps: M = max over warps, weights exp(m_w - M)
  for (int i = threadIdx.x; i < kRows * D; i += kAttnWarps * 32) (&sm_acc[0][0])[i] = 0.f;
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      sm_m[warp][r] = m[r];
      sm_l[warp][r] = l[r];
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= nrows) break;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, sm_m[w][r]);
    if (M == -INFINITY || l[r] == 0.f) continue;
    const float wgt = __expf(m[r] - M);
#pragma unroll
    for (int e = 0; e < VPL; ++e) atomicAdd(&sm_acc[r][d0 + e], acc[r][e] * wgt);
  }
  if (threadIdx.x < kRows) {
    const int r = threadIdx.x;
    float M = -INFINITY, lt = 0.f;
    for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, sm_m[w][r]);
    if (M != -INFINITY)
      for (int w = 0; w < kAttnWarps; ++w)
        if (sm_l[w][r] > 0.f) lt += sm_l[w][r] * __expf(sm_m[w][r] - M);
    sm_lt[r] = lt;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nrows * D; i += kAttnWarps * 32) {
    const int r = i / D, d = i % D;
    const float lt = sm_lt[r];
    const float o = lt > 0.f ? sm_acc[r][d] / lt : 0.f;
    const int64_t oi = (b * p.Hq + h * p.g + r0 + r) * int64_t(D) + d;
    if (p.dtype == 0) static_cast<float*>(p.out)[oi] = o;
    else if (p.dtype == 1) static_cast<__half*>(p.out)[oi] = __float2half_rn(o);
    else static_cast<__nv_bfloat16*>(p.out)[oi] = __float2bfloat16_rn(o);
  }
}

}  // namespace

// KVENGINE_HASH_MMA=0 forces the CUDA-core kernel (for A/B tests and benchmarks; read at every call)
static bool hash_encode_mma_enabled() {
  const char* e = std::getenv("KVENGINE_HASH_MMA");
  return !(e && e[0] == '0');
}

void hash_encode(const HashEncodeArgs& a, cudaStream_t stream) {
  EncParams p;
  p.x = a.x;
  p.dtype = static_cast<int>(a.dtype);
  p.O = a.O;
  p.H = a.H;
  p.T = a.T;
  p.D = a.D;
  p.so = a.x_stride_o;
  p.sh = a.x_stride_h;
  p.st = a.x_stride_t;
  p.w1 = a.w1;
  p.b1 = a.b1;
  p.w2 = a.w2;
  p.b2 = a.b2;
  p.per_head = a.per_head ? 1 : 0;
  p.nbits = a.nbits;
  p.codes = a.codes;
  if (a.T >= 16 && a.D % 8 == 0 && a.D <= kMmaMaxD && a.O * a.H > 0 && hash_encode_mma_enabled()) {
    p.tiles = (a.T + kMmaRows - 1) / kMmaRows;
    switch (a.nbits) {
      case 32: launch_hash_mma<32>(p, stream); break;
      case 64: launch_hash_mma<64>(p, stream); break;
      case 128: launch_hash_mma<128>(p, stream); break;
      default: launch_hash_mma<256>(p, stream); break;
    }
    return;
  }
  p.tiles = (a.T + kEncRows - 1) / kEncRows;
  const int64_t grid = a.O * a.H * p.tiles;
  if (grid == 0) return;
  const size_t smem = sizeof(float) * kEncRows * (a.D + a.nbits);
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(hash_encode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "hash_encode smem attribute");
  hash_encode_kernel<<<static_cast<unsigned>(grid < 0x7fffffff ? grid : 0x7fffffff), a.nbits, smem, stream>>>(p);
  check(cudaGetLastError(), "hash_encode launch");
}

// KVENGINE_TOPK_MMA=0 forces the CUDA-core (POPC) score kernel; the tensor-core one needs sm_80+ (read at every call)
static bool topk_mma_enabled() {
  const char* e = std::getenv("KVENGINE_TOPK_MMA");
  if (e && e[0] == '0') return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return false;
  return major >= 8;
}

template <int W>
static void launch_topk_mma(bool one, dim3 grid, size_t smem, cudaStream_t stream, const TopkParams& p) {
  if (one) topk_score_mma_kernel<W, true><<<grid, kTopkThreads, smem, stream>>>(p);
  else topk_score_mma_kernel<W, false><<<grid, kTopkThreads, smem, stream>>>(p);
}

size_t hamming_topk_workspace_bytes(const HammingTopkArgs& a) { return layout(a).total; }

void hamming_topk(const HammingTopkArgs& a, void* workspace, cudaStream_t stream) {
  const TopkLayout l = layout(a);
  char* ws = static_cast<char*>(workspace);
  TopkParams p;
  p.q = a.q_codes;
  p.qsb = a.q_stride_b;
  p.qsh = a.q_stride_h;
  p.k = a.k_codes;
  p.ksb = a.k_stride_b;
  p.ksh = a.k_stride_h;
  p.lens = a.seq_lens;
  p.Hkv = static_cast<int>(a.Hkv);
  p.g = static_cast<int>(a.Hq / a.Hkv);
  p.W = static_cast<int>(a.W);
  p.N = a.N;
  p.npad = l.npad;
  p.k_sel = a.k;
  p.sinks = a.sinks;
  p.recent = a.recent;
  p.chunk = l.chunk;
  p.nch = l.nch;
  p.nbins = l.nbins;
  p.sc = reinterpret_cast<uint16_t*>(ws + l.sc_off);
  p.hist = reinterpret_cast<int32_t*>(ws + l.hist_off);
  p.tot = reinterpret_cast<int32_t*>(ws + l.tot_off);
  p.meta = reinterpret_cast<int32_t*>(ws + l.meta_off);
  p.thr = reinterpret_cast<int32_t*>(ws + l.thr_off);
  p.idx = a.indices;
  p.scr = a.scores;
  // the binding rejects larger B / Hkv with a ValueError (grid y and z <= 65535; select grid x = B·Hkv < 2^31)
  if (a.B > 65535 || a.Hkv > 65535 || a.B * a.Hkv > 0x7fffffff)
    throw std::runtime_error("kvengine::cuda::hamming_topk: B and Hkv must be <= 65535 with B·Hkv < 2^31");
  check(cudaMemsetAsync(p.tot, 0, size_t(a.B * a.Hkv) * l.nbins * sizeof(int32_t), stream), "hamming_topk memset");
  const dim3 grid(static_cast<unsigned>(l.nch), static_cast<unsigned>(a.Hkv), static_cast<unsigned>(a.B));
  const size_t smem1 = sizeof(int32_t) * (l.nbins + p.g * p.W);
  // 16-byte code loads when every row start is 16-byte aligned
  const bool vec = reinterpret_cast<uintptr_t>(a.k_codes) % 16 == 0 && a.k_stride_b % 4 == 0 &&
                   a.k_stride_h % 4 == 0;
  if (topk_mma_enabled()) {
    const int ng = (p.g + 7) / 8, nh = p.W == 8 ? 2 : 1;
    const size_t smem = sizeof(int32_t) * ((l.nbins + 1) / 2 * 2) + sizeof(uint2) * ng * nh * 32;  // <= 41 KB
    const bool one = ng == 1;
    switch (p.W) {
      case 1: launch_topk_mma<1>(one, grid, smem, stream, p); break;
      case 2: launch_topk_mma<2>(one, grid, smem, stream, p); break;
      case 4: launch_topk_mma<4>(one, grid, smem, stream, p); break;
      default: launch_topk_mma<8>(one, grid, smem, stream, p); break;
    }
  } else {
    switch (p.W) {
      case 1: topk_score_kernel<1><<<grid, kTopkThreads, smem1, stream>>>(p, vec); break;
      case 2: topk_score_kernel<2><<<grid, kTopkThreads, smem1, stream>>>(p, vec); break;
      case 4: topk_score_kernel<4><<<grid, kTopkThreads, smem1, stream>>>(p, vec); break;
      default: topk_score_kernel<8><<<grid, kTopkThreads, smem1, stream>>>(p, vec); break;
    }
  }
  check(cudaGetLastError(), "hamming_topk score launch");
  const size_t smem2 = sizeof(int32_t) * 2 * l.nch;  // nch <= 256 (cuda_chunk)
  topk_select_kernel<<<static_cast<unsigned>(a.B * a.Hkv), kSelThreads, smem2, stream>>>(p);
  check(cudaGetLastError(), "hamming_topk select launch");
  topk_gather_kernel<<<grid, kTopkThreads, 0, stream>>>(p);
  check(cudaGetLastError(), "hamming_topk gather launch");
}

void sparse_decode_attention(const SparseDecodeArgs& a, cudaStream_t stream) {
  SparseParams p;
  p.q = a.q;
  p.qsb = a.q_stride_b;
  p.qsh = a.q_stride_h;
  p.out = a.out;
  p.k = a.k;
  p.v = a.v;
  p.ksb = a.k_stride_b;
  p.ksh = a.k_stride_h;
  p.kst = a.k_stride_t;
  p.vsb = a.v_stride_b;
  p.vsh = a.v_stride_h;
  p.vst = a.v_stride_t;
  p.idx = a.indices;
  p.idx64 = a.indices_int64 ? 1 : 0;
  p.isb = a.i_stride_b;
  p.ish = a.i_stride_h;
  p.n_sel = a.n_sel;
  p.lens = a.seq_lens;
  p.dtype = static_cast<int>(a.dtype);
  p.Hq = static_cast<int>(a.Hq);
  p.Hkv = static_cast<int>(a.Hkv);
  p.g = static_cast<int>(a.Hq / a.Hkv);
  p.nrb = (p.g + kRows - 1) / kRows;
  p.N = a.N;
  p.scale = a.softmax_scale;
  const int64_t grid64 = a.B * a.Hkv * p.nrb;  // <= B·Hq < 2^31 (checked by the binding)
  if (grid64 == 0) return;
  if (grid64 > 0x7fffffff)
    throw std::runtime_error("kvengine::cuda::sparse_decode_attention: B·Hq must be < 2^31 (grid size)");
  const unsigned grid = static_cast<unsigned>(grid64);
  switch (a.D) {
    case 32: sparse_attn_kernel<1><<<grid, kAttnWarps * 32, 0, stream>>>(p); break;
    case 64: sparse_attn_kernel<2><<<grid, kAttnWarps * 32, 0, stream>>>(p); break;
    case 128: sparse_attn_kernel<4><<<grid, kAttnWarps * 32, 0, stream>>>(p); break;
    default: sparse_attn_kernel<8><<<grid, kAttnWarps * 32, 0, stream>>>(p); break;
  }
  check(cudaGetLastError(), "sparse_decode_attention launch");
}

}  // namespace kvengine::cuda
