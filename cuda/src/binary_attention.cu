// kvengine — 1-bit QK attention (BinaryAttention) on CUDA; semantics in kvengine/binary_attention.h, same results as
// the CPU kernels up to fp32 summation order (the sign bits are identical).
//
// Kernels
//   channel_mean_kernel  (centering only) per-channel fp64 sums over the token axis -> fp32 means [batch, D].
//   sign_pack_kernel     one warp per row: lane j loads element 32w + j, __ballot_sync(x < 0) is word w directly;
//                        mean |x| by a shuffle reduction.
//   binary_attn_kernel<D, RW>  flash-attention style on CUDA cores, never materializing Lq × Lk.
//       One CTA (128 threads, 4 warps) per (b, query head, tile of 4·RW query rows); warp w owns RW rows.  Each warp
//       packs its query rows with ballots (sign words in registers, uniform across the warp) and α·scale·log2 e.
//       Keys in tiles of BK = 64: the tile's sign words (transposed [D/32][BK], conflict-free), β and V (as fp32,
//       [BK][D]) are staged in shared memory by the whole CTA.  Score phase: lane t holds keys t and t + 32 and
//       computes, for each of its warp's rows, s = a_i · β_j · (D − 2 Σ_w __popc(q_w ^ k_w)) + log2 e · bias,
//       masks, then the online softmax (warp max / sum by shuffles, exp2f); p goes to a per-warp [RW][BK] slice of
//       shared memory.  P·V phase: lane owns channels lane + 32 c (c < D/32) of every row, acc[RW][D/32] in
//       registers, p read as float4 broadcasts, V rows read conflict-free; fp32 throughout.
//   A row with no visible key outputs 0.  Registers: __launch_bounds__(128, 4) (<= 128 regs, no spills: check with
//   -Xptxas -v).  Shared memory: D = 128: 41 KiB; D = 256 (RW = 4): 69 KiB (opt-in).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kvengine/binary_attention.h"
#include "kvengine/cuda_ops.h"
#include "ptx.cuh"

namespace kvengine::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int BK = 64;  // keys per tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;
constexpr const char* kErr = "kvengine::cuda::binary_attention: ";

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(kErr) + what + ": " + cudaGetErrorString(e));
}

__device__ __forceinline__ float load_f(const void* p, int64_t i, int dt) {
  if (dt == 0) return static_cast<const float*>(p)[i];
  if (dt == 1) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ void store_f(void* p, int64_t i, int dt, float v) {
  if (dt == 0) static_cast<float*>(p)[i] = v;
  else if (dt == 1) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// ---- sign packing -------------------------------------------------------------------------------------------------
struct PackParams {
  const void* x;
  int64_t sb, st, batch, L, D;
  int dtype;
  bool center;
  uint32_t* bits;
  float* scale;
  float* mean;
};

// grid-stride over batches (x) and channels (y): any batch count and D fit the grid limits
__global__ void channel_mean_kernel(PackParams p) {
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    for (int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; c < p.D;
         c += static_cast<int64_t>(gridDim.y) * blockDim.x) {
      double s = 0.0;
      for (int64_t t = 0; t < p.L; ++t) s += static_cast<double>(load_f(p.x, b * p.sb + t * p.st + c, p.dtype));
      p.mean[b * p.D + c] = static_cast<float>(s / static_cast<double>(p.L));
    }
  }
}

// one warp per row, grid-stride over the batch · L rows
__global__ void sign_pack_kernel(PackParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t rows = p.batch * p.L, wstride = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t nw = p.D / 32;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5); row < rows;
       row += wstride) {  // warp-uniform
    const int64_t b = row / p.L, t = row % p.L;
    const int64_t base = b * p.sb + t * p.st;
    float s = 0.f;
    for (int64_t w = 0; w < nw; ++w) {
      float v = load_f(p.x, base + w * 32 + lane, p.dtype);
      if (p.center) v = __fsub_rn(v, p.mean[b * p.D + w * 32 + lane]);
      const unsigned word = __ballot_sync(kFull, v < 0.f);
      s += fabsf(v);
      if (lane == 0) p.bits[row * nw + w] = word;
    }
    s = warp_sum(s);
    if (lane == 0) p.scale[row] = s / static_cast<float>(p.D);
  }
}

// ---- attention ----------------------------------------------------------------------------------------------------
struct AttnParams {
  const void* q;
  int64_t q_sb, q_sh, q_st;
  const uint32_t* kb;
  const float* ks;
  const void* v;
  int64_t v_sb, v_sh, v_st;
  void* out;
  const float* bias;
  int64_t bias_sb, bias_sh, bias_si;
  const float* rel;
  int64_t rel_len;
  int Hq, Hkv, Lq, Lk;
  int qdt, vdt;
  bool causal;
  bool v_vec;  // V's rows are 16-byte aligned (pointer and strides): the tensor-core kernel stages them by cp.async
  float qmul;  // softmax_scale · log2 e / D
  // grouped (split) mode of binary_attn_kernel: rows = the g·Lq query rows of a KV head's GQA group, keys split in
  // nchunks chunks of `chunk` keys; with part, each chunk leaves (m, l, acc) there for merge_kernel
  int rows;     // g·Lq
  int ntiles;   // row tiles per group
  int chunk, nchunks;
  float* part;  // [B·Hkv][nchunks][rows][D + 2] or null (nchunks == 1: the kernel writes out itself)
};

// one warp packs query row at element offset `off` (zeros when !valid): lane 0 stores its NW sign words at qw;
// returns Σ|q| over the row (every lane), pc = popcount of the words
template <int NW>
__device__ __forceinline__ float pack_query_row(const AttnParams& p, int64_t off, bool valid, int lane, uint32_t* qw,
                                                int& pc) {
  float s = 0.f;
  pc = 0;
#pragma unroll
  for (int w = 0; w < NW; ++w) {
    const float x = valid ? load_f(p.q, off + w * 32 + lane, p.qdt) : 0.f;
    const unsigned word = __ballot_sync(kFull, x < 0.f);
    if (lane == 0) qw[w] = word;
    pc += __popc(word);
    s += fabsf(x);
  }
  return warp_sum(s);
}

// GROUPED: one CTA per (b, KV head, tile of BQ rows of the group, chunk of keys) — decode-shaped calls (g·Lq small),
// where one CTA per query head would hold a single valid row and every query head would read its KV head's V again.
// Row ρ of the group is query head hk·g + ρ / Lq, query i = ρ % Lq.
template <int D, int RW, bool GROUPED>
__global__ void __launch_bounds__(kThreads, 4) binary_attn_kernel(AttnParams p) {
  constexpr int NW = D / 32;   // sign words per row
  constexpr int CPL = D / 32;  // channels per lane in P·V
  constexpr int BQ = kWarps * RW;
  extern __shared__ float4 smem4[];
  uint32_t* kbt = reinterpret_cast<uint32_t*>(smem4);     // [NW][BK]
  float* beta = reinterpret_cast<float*>(kbt + NW * BK);  // [BK]
  float* vs = beta + BK;                                  // [BK][D]
  float* ps = vs + BK * D;                                // [kWarps][RW][BK]
  float* rowst = ps + kWarps * RW * BK;                   // [kWarps][4][RW]: a, m, l, alpha
  uint32_t* qws = reinterpret_cast<uint32_t*>(rowst + kWarps * 4 * RW);  // [kWarps][RW][NW]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.z, g = p.Hq / p.Hkv;
  const int hk = GROUPED ? static_cast<int>(blockIdx.y) : static_cast<int>(blockIdx.y) / g;
  const int64_t bhk = static_cast<int64_t>(b) * p.Hkv + hk;
  const int ck = GROUPED ? static_cast<int>(blockIdx.x) % p.nchunks : 0;
  const int q0 = (GROUPED ? static_cast<int>(blockIdx.x) / p.nchunks : static_cast<int>(blockIdx.x)) * BQ;
  const int rbase = q0 + warp * RW;
  const int nrows = GROUPED ? p.rows : p.Lq;
  // row ρ of this CTA's row space -> query head and query index
  auto head_of = [&](int rho) { return GROUPED ? hk * g + rho / p.Lq : static_cast<int>(blockIdx.y); };
  auto query_of = [&](int rho) { return GROUPED ? rho % p.Lq : rho; };
  const int shift = p.Lk - p.Lq;
  float* sa = rowst + warp * 4 * RW;  // per-row state of this warp (uniform across its lanes)
  float* sm = sa + RW;
  float* sl = sm + RW;
  float* sal = sl + RW;
  uint32_t* qw = qws + warp * RW * NW;

  // pack this warp's query rows: sign words by ballot, a = mean|q| · scale · log2 e
#pragma unroll 1
  for (int r = 0; r < RW; ++r) {
    const int rho = rbase + r;
    const bool valid = rho < nrows;
    const int h = valid ? head_of(rho) : 0, i = valid ? query_of(rho) : 0;
    const int64_t off = static_cast<int64_t>(b) * p.q_sb + static_cast<int64_t>(h) * p.q_sh +
                        static_cast<int64_t>(i) * p.q_st;
    int pc;
    const float s = pack_query_row<NW>(p, off, valid, lane, qw + r * NW, pc);
    if (lane == 0) {
      sa[r] = s * p.qmul;
      sm[r] = -INFINITY;
      sl[r] = 0.f;
    }
  }
  float acc[RW][CPL];
#pragma unroll
  for (int r = 0; r < RW; ++r)
#pragma unroll
    for (int c = 0; c < CPL; ++c) acc[r][c] = 0.f;

  int kbeg = 0, kend = p.Lk;
  if constexpr (GROUPED) {
    kbeg = ck * p.chunk;
    kend = min(p.Lk, kbeg + p.chunk);
  } else if (p.causal) {
    kend = min(p.Lk, q0 + BQ + shift);
  }
  float* pw = ps + warp * RW * BK;
  const int64_t kbase = bhk * p.Lk;
  const int64_t vbase = static_cast<int64_t>(b) * p.v_sb + static_cast<int64_t>(hk) * p.v_sh;
  const int64_t relc = (p.rel_len - 1) / 2;

  for (int j0 = kbeg; j0 < kend; j0 += BK) {
    __syncthreads();  // the previous tile is consumed (and, first time, the row state is written)
    for (int idx = tid; idx < NW * BK; idx += kThreads) {
      const int w = idx / BK, t = idx % BK, j = j0 + t;
      kbt[idx] = j < p.Lk ? p.kb[(kbase + j) * NW + w] : 0u;
    }
    for (int t = tid; t < BK; t += kThreads) beta[t] = j0 + t < p.Lk ? p.ks[kbase + j0 + t] : 0.f;
    for (int idx = tid; idx < BK * D; idx += kThreads) {
      const int t = idx / D, c = idx % D, j = j0 + t;
      vs[idx] = j < p.Lk ? load_f(p.v, vbase + static_cast<int64_t>(j) * p.v_st + c, p.vdt) : 0.f;
    }
    __syncthreads();

    // scores + online softmax: lane holds keys lane and lane + 32
    {
      const int t0 = lane, t1 = lane + 32;
      const int j0a = j0 + t0, j1a = j0 + t1;
      const float b0 = beta[t0], b1 = beta[t1];
      uint32_t k0[NW], k1[NW];
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        k0[w] = kbt[w * BK + t0];
        k1[w] = kbt[w * BK + t1];
      }
#pragma unroll 1
      for (int r = 0; r < RW; ++r) {
        const int rho = rbase + r;
        const bool valid = rho < nrows;
        const int h = head_of(rho), i = query_of(rho);
        int pc0 = 0, pc1 = 0;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
          const uint32_t qv = qw[r * NW + w];
          pc0 += __popc(qv ^ k0[w]);
          pc1 += __popc(qv ^ k1[w]);
        }
        const float ar = sa[r];
        float s0 = ar * b0 * static_cast<float>(D - 2 * pc0);
        float s1 = ar * b1 * static_cast<float>(D - 2 * pc1);
        const int pos = i + shift;
        const int lim = valid ? min(kend - 1, p.causal ? pos : p.Lk - 1) : -1;
        if (j0a <= lim) {
          if (p.bias) s0 += kLog2e * p.bias[b * p.bias_sb + h * p.bias_sh + static_cast<int64_t>(i) * p.bias_si + j0a];
          if (p.rel) s0 += kLog2e * p.rel[h * p.rel_len + relc + pos - j0a];
        } else {
          s0 = -INFINITY;
        }
        if (j1a <= lim) {
          if (p.bias) s1 += kLog2e * p.bias[b * p.bias_sb + h * p.bias_sh + static_cast<int64_t>(i) * p.bias_si + j1a];
          if (p.rel) s1 += kLog2e * p.rel[h * p.rel_len + relc + pos - j1a];
        } else {
          s1 = -INFINITY;
        }
        const float bm = warp_max(fmaxf(s0, s1));
        const float mo = sm[r];
        const float mn = fmaxf(mo, bm);
        float p0 = 0.f, p1 = 0.f, alpha = 1.f;
        if (mn != -INFINITY) {  // warp-uniform
          alpha = mo == -INFINITY ? 0.f : exp2f(mo - mn);
          p0 = exp2f(s0 - mn);  // exp2f(-inf) = 0
          p1 = exp2f(s1 - mn);
          const float ps_ = warp_sum(p0 + p1);
          __syncwarp();  // every lane has read sm[r] (mo) before lane 0 overwrites it
          if (lane == 0) {
            sl[r] = sl[r] * alpha + ps_;
            sm[r] = mn;
          }
        }
        if (lane == 0) sal[r] = alpha;
        pw[r * BK + t0] = p0;
        pw[r * BK + t1] = p1;
      }
    }
    __syncwarp();

    // P·V (fp32): rescale by alpha, then acc[r][c] += p[r][t] · v[t][lane + 32 c]
#pragma unroll
    for (int r = 0; r < RW; ++r) {
      const float al = sal[r];
#pragma unroll
      for (int c = 0; c < CPL; ++c) acc[r][c] *= al;
    }
    const int nt = min(BK, kend - j0);
#pragma unroll 1
    for (int t = 0; t < nt; t += 4) {
      float vv[4][CPL];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int c = 0; c < CPL; ++c) vv[u][c] = vs[(t + u) * D + c * 32 + lane];
#pragma unroll
      for (int r = 0; r < RW; ++r) {
        const float4 pr = *reinterpret_cast<const float4*>(pw + r * BK + t);
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
          float x = acc[r][c];
          x = fmaf(pr.x, vv[0][c], x);
          x = fmaf(pr.y, vv[1][c], x);
          x = fmaf(pr.z, vv[2][c], x);
          acc[r][c] = fmaf(pr.w, vv[3][c], x);
        }
      }
    }
    __syncwarp();
  }
  __syncwarp();

#pragma unroll
  for (int r = 0; r < RW; ++r) {
    const int rho = rbase + r;
    if (rho >= nrows) continue;
    if (GROUPED && p.part != nullptr) {  // this chunk's state, merged by merge_kernel
      float* o = p.part + ((bhk * p.nchunks + ck) * p.rows + rho) * (D + 2);
      if (lane == 0) {
        o[0] = sm[r];
        o[1] = sl[r];
      }
#pragma unroll
      for (int c = 0; c < CPL; ++c) o[2 + c * 32 + lane] = acc[r][c];
      continue;
    }
    const float lr = sl[r];
    const float inv = lr > 0.f ? 1.f / lr : 0.f;
    const int64_t o = ((static_cast<int64_t>(b) * p.Hq + head_of(rho)) * p.Lq + query_of(rho)) * D;
#pragma unroll
    for (int c = 0; c < CPL; ++c) store_f(p.out, o + c * 32 + lane, p.vdt, acc[r][c] * inv);
  }
}

// the split chunks of every (b, KV head, group row) -> out: one warp per row; weights 2^(m_c − M) (base-2 maxima);
// a row with nothing visible in any chunk is 0
template <int D>
__global__ void __launch_bounds__(kThreads) merge_kernel(AttnParams p, int64_t nrows_total) {
  constexpr int CPL = D / 32;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= nrows_total) return;
  const int64_t bhk = row / p.rows;
  const int rho = static_cast<int>(row % p.rows), g = p.Hq / p.Hkv;
  const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv;
  const float* base = p.part + bhk * p.nchunks * p.rows * (D + 2);
  float M = -INFINITY;
  for (int c = lane; c < p.nchunks; c += 32) M = fmaxf(M, base[(static_cast<int64_t>(c) * p.rows + rho) * (D + 2)]);
  M = warp_max(M);
  float acc[CPL];
#pragma unroll
  for (int c = 0; c < CPL; ++c) acc[c] = 0.f;
  float L = 0.f;
  if (M != -INFINITY) {
    for (int ck = 0; ck < p.nchunks; ++ck) {
      const float* o = base + (static_cast<int64_t>(ck) * p.rows + rho) * (D + 2);
      const float l = o[1];
      if (l == 0.f) continue;  // nothing visible in this chunk
      const float w = exp2f(o[0] - M);
      L += l * w;
#pragma unroll
      for (int c = 0; c < CPL; ++c) acc[c] += o[2 + c * 32 + lane] * w;
    }
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  const int64_t out = ((b * p.Hq + hk * g + rho / p.Lq) * p.Lq + rho % p.Lq) * D;
#pragma unroll
  for (int c = 0; c < CPL; ++c) store_f(p.out, out + c * 32 + lane, p.vdt, acc[c] * inv);
}

template <int D, int RW, bool GROUPED>
void launch(const AttnParams& p, int B, int Hq, int Lq, cudaStream_t stream) {
  constexpr int BQ = kWarps * RW;
  const size_t smem = static_cast<size_t>(D / 32) * BK * 4 + BK * 4 + static_cast<size_t>(BK) * D * 4 +
                      static_cast<size_t>(kWarps) * RW * BK * 4 + static_cast<size_t>(kWarps) * 4 * RW * 4 +
                      static_cast<size_t>(kWarps) * RW * (D / 32) * 4;
  auto fn = binary_attn_kernel<D, RW, GROUPED>;
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
          "shared memory opt-in");
  if constexpr (GROUPED) {
    const dim3 grid(static_cast<unsigned>(p.ntiles * p.nchunks), static_cast<unsigned>(p.Hkv), static_cast<unsigned>(B));
    fn<<<grid, kThreads, smem, stream>>>(p);
    check(cudaGetLastError(), "kernel launch (grouped)");
    if (p.part != nullptr) {
      const int64_t rows = static_cast<int64_t>(B) * p.Hkv * p.rows;
      merge_kernel<D><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p, rows);
      check(cudaGetLastError(), "merge launch");
    }
  } else {
    const dim3 grid(static_cast<unsigned>((Lq + BQ - 1) / BQ), static_cast<unsigned>(Hq), static_cast<unsigned>(B));
    fn<<<grid, kThreads, smem, stream>>>(p);
    check(cudaGetLastError(), "kernel launch");
  }
}

template <int D, int RW>
void launch_core(const AttnParams& p, bool grouped, int B, int Hq, int Lq, cudaStream_t stream) {
  if (grouped) launch<D, RW, true>(p, B, Hq, Lq, stream);
  else launch<D, RW, false>(p, B, Hq, Lq, stream);
}

// The grouped split: taken when the g·Lq rows of a group fit one CTA's rows (4 warps × RW); KVENGINE_BINARY_CUDA_SPLIT
// = 0 forces the per-query-head kernel (tests, benchmarks). The key chunks aim at >= kSplitCtas CTAs, >= 4 tiles each.
constexpr int kSplitCtas = 256;
int rows_per_cta(int64_t D) { return kWarps * (D == 256 ? 4 : 8); }

struct Split {
  bool grouped = false;
  int chunk = 0, nchunks = 1;
};

Split split_plan(const BinaryAttentionArgs& a) {
  Split s;
  const int64_t g = a.Hkv > 0 ? a.Hq / a.Hkv : 0, rows = g * a.Lq;
  if (a.B <= 0 || a.Hkv <= 0 || a.Lk <= 0 || rows <= 0 || rows > rows_per_cta(a.D)) return s;
  s.grouped = true;
  const int64_t ctas = a.B * a.Hkv, want = (kSplitCtas + ctas - 1) / ctas;
  const int64_t most = (a.Lk + 4 * BK - 1) / (4 * BK);
  int64_t n = want < most ? want : most;
  if (n < 1) n = 1;
  int64_t chunk = ((a.Lk + n - 1) / n + BK - 1) / BK * BK;
  s.chunk = static_cast<int>(chunk);
  s.nchunks = static_cast<int>((a.Lk + chunk - 1) / chunk);
  return s;
}

bool split_forced_off() {
  const char* e = std::getenv("KVENGINE_BINARY_CUDA_SPLIT");
  return e != nullptr && e[0] == '0';
}

// ---- tensor-core path (sm_80+): QK as mma b1 AND + popc, P·V as fp16/bf16 mma ------------------------------------
// binary_attn_mma_kernel<D, VT, BIAS, NWARP>, D in {32, 64, 128}, V (and out) fp16 or bf16, BIAS: a bias or rel
// table given.  One CTA = NWARP warps (8, or 4 with KVENGINE_BINARY_MMA_WARPS=4), 16 query rows per warp
// (BQ = 16·NWARP), keys in tiles of BK = 64, two shared-memory stages: while a tile is consumed the next one's V rows
// arrive by cp.async (plain loads when V's rows are not 16-byte aligned) and its sign words and β are loaded into
// registers (stored to the other stage after the tile), one __syncthreads per tile.  Every CTA reads all of its KV
// head's V from L2, so the L2 → SM traffic is (Lq / BQ)·Lk·D·2 bytes per head: BQ = 128 halves what BQ = 64 moved
// (2.1 GB at L = 4K, D = 128, B·H = 32, comparable to the whole kernel's time at L2 rates).  Causal: a warp whose rows
// see no key of a tile only stages and syncs.
//   QK: one mma.m16n8k256.b1.and.popc per 8 keys gives popc(q ^ k) directly: the 256-bit k range holds
//     q (registers 0/1 of A, words 0..3) against ~k (register 0 of B), and ~q (A registers 2/3) against k (B register
//     1), and popc(q & ~k) + popc(~q & k) = popc(q ^ k); words past D/32 are zero in all four.  Which bits a (thread,
//     register) pair covers never matters: A and B registers of the same index hold the same sign word.  The
//     accumulator starts at 2^23 (bit pattern 0x4B000000), so its bits read as a float are 2^23 + popc exactly and
//     n = D − 2·popc = fma(−2, that, D + 2^24) needs no int → float conversion (a quarter-rate instruction).
//   Scores: x = β·n; a row's scale a = α·softmax_scale·log2 e multiplies at the exponent, exp2(fma(a, x, −m)), and
//     the row max is a·max x (a >= 0: a negative softmax_scale flips the query's sign words instead, which negates
//     n).  With a bias (dense or relative) x = a·β·n + log2 e·bias and the multiplier is 1.  a is clamped to
//     >= FLT_MIN, so masked (−inf) scores give exp2 = 0 even for an all-zero query row.  Masks are applied only in
//     tiles that cross a row's last visible key (warp-uniform test); every other tile skips them.
//   Online softmax with a lazy max: the running max m moves only when a tile's max exceeds it by more than kSlack
//     = 15 (log2 units), so P <= 2^15 < 65504 and the O rescale (ND·4 multiplies) runs only in the rare tiles where
//     some row of the warp moved (__any_sync).  Without a bias the tile's max is not even computed where the bound
//     mul·D·(max β of the tile) is <= m + kSlack for every row of the warp (the staging warps reduce β's max).  The row sums come from the tensor cores too: P times a column of ones, so
//     they sum exactly the rounded probabilities P·V used.
//   P·V: P rounded to V's type is the A fragment (FlashAttention-2 register layout: the score fragments of two
//     adjacent 8-key tiles are one 16-key step), V's B fragments come from the row-major stage by
//     ldmatrix.x4.trans (row pitch 2·D + 16 bytes: conflict-free), fp32 accumulators.
//   The exponentials are ex2.approx.ftz.f32 (one MUFU op; exp2f adds a subnormal-range fix-up of 2 FMUL + 1 FSETP
//     each, and P below 2^-126 is 0 in V's type anyway).
//   BIAS (a dense bias or a relative table given) is a template parameter: the plain kernel carries no bias code or
//     registers (sm_90a, 8 warps: 168 / 128 / 117-121 registers at D = 128 / 64 / 32, one CTA per SM at D = 128 and
//     two below; with BIAS 168-250), and the bias kernel has one branch-free loop per combination.
// Opt-in (KVENGINE_BINARY_MMA=1) until it has run on a GPU.
constexpr int kVPad = 8;  // fp16/bf16 elements of padding per staged V row

template <int D, int NWARP>
struct MmaSmem {  // byte offsets of the tensor-core kernel's shared memory (NWARP warps of 16 query rows)
  static constexpr int NW = D / 32;
  static constexpr int VR = D + kVPad;                                    // staged V row pitch (elements)
  static constexpr size_t v_stage = static_cast<size_t>(BK) * VR * 2;    // [BK][VR] fp16/bf16
  static constexpr int KSW = BK * NW + BK + 4;  // words per K stage: [BK][NW] sign words, [BK] β, max β of 2 halves
  static constexpr size_t k_stage = static_cast<size_t>(KSW) * 4;
  static constexpr size_t k_off = 2 * v_stage;
  static constexpr size_t q_off = k_off + 2 * k_stage;                    // [NWARP][16][NW] words, [NWARP][16] a
  static constexpr size_t bytes = q_off + static_cast<size_t>(NWARP) * 16 * NW * 4 + NWARP * 16 * 4;
  static_assert(v_stage % 16 == 0 && k_off % 16 == 0, "16-byte aligned stages");
};

// fp16 / bf16 pair packing (lo in the low half) and the m16n8k16 MMA (fp32 accumulators) for V's type
template <typename VT>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t u;
  if constexpr (std::is_same_v<VT, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&u, &h, 4);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &h, 4);
  }
  return u;
}

// 2^x, subnormal results flushed to zero (MUFU.EX2 without exp2f's range fix-up)
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm volatile("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename VT>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(KVENGINE_CUDA_EMU)
  if constexpr (std::is_same_v<VT, __half>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// d[0..3] = c + popc(a & b) of the m16n8k256 tile (a: rows g / g+8, b: key g; A registers 2/3 and B register 1 carry
// words 4..7 of the 256-bit k range)
__device__ __forceinline__ void mma_and_popc(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1, int c) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(KVENGINE_CUDA_EMU)
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%10,%10,%10};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(c));
#else
  __trap();
#endif
}

template <int D, typename VT, bool BIAS, int NWARP>
__global__ void __launch_bounds__(NWARP * 32, (NWARP == 8 && (D == 128 || BIAS)) ? 1 : 2) binary_attn_mma_kernel(AttnParams p) {
  using S = MmaSmem<D, NWARP>;
  constexpr int kMmaThreads = NWARP * 32, kMmaBQ = NWARP * 16;
  constexpr int NW = S::NW;   // sign words per row (<= 4)
  constexpr int VR = S::VR;
  constexpr int NT = BK / 8;  // 8-key score tiles per key tile
  constexpr int ND = D / 8;   // 8-channel output tiles
  constexpr float kSlack = 15.f;  // P <= 2^15 < 65504 (fp16 max)
  constexpr float kNOff = static_cast<float>(D) + 16777216.f;  // D + 2^24 (exact)
  static_assert(NW <= 4 && ND % 2 == 0, "the tensor-core path takes D in {32, 64, 128}");
  extern __shared__ float4 smem4[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(smem4);
  uint16_t* vst = reinterpret_cast<uint16_t*>(smem);                         // [2][BK][VR]
  uint32_t* kst = reinterpret_cast<uint32_t*>(smem + S::k_off);              // [2][BK·NW words + BK β]
  uint32_t* qws = reinterpret_cast<uint32_t*>(smem + S::q_off);              // [NWARP][16][NW]
  float* qa = reinterpret_cast<float*>(qws + NWARP * 16 * NW);               // [NWARP][16]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.Hq / p.Hkv);
  const int64_t bhk = static_cast<int64_t>(b) * p.Hkv + hk;
  const int q0 = blockIdx.x * kMmaBQ;
  const int rbase = q0 + warp * 16;
  const int shift = p.Lk - p.Lq;
  const bool flip = p.qmul < 0.f;
  const float qmul = fabsf(p.qmul);

  // pack this warp's 16 query rows (ballots; complemented for a negative scale) and a = α·|scale|·log2 e
  uint32_t* qw = qws + warp * 16 * NW;
#pragma unroll 1
  for (int r = 0; r < 16; ++r) {
    const int i = rbase + r;
    const bool valid = i < p.Lq;
    const int64_t off = static_cast<int64_t>(b) * p.q_sb + static_cast<int64_t>(h) * p.q_sh +
                        static_cast<int64_t>(valid ? i : 0) * p.q_st;
    int pc;
    const float sabs = pack_query_row<NW>(p, off, valid, lane, qw + r * NW, pc);
    if (lane == 0) {
      if (flip)
        for (int w = 0; w < NW; ++w) qw[r * NW + w] = ~qw[r * NW + w];
      qa[warp * 16 + r] = fmaxf(sabs * qmul, FLT_MIN);
    }
  }
  __syncwarp();
  const bool has_w = tig < NW;
  const uint32_t a0 = has_w ? qw[g * NW + tig] : 0u, a1 = has_w ? qw[(g + 8) * NW + tig] : 0u;
  const uint32_t a2 = has_w ? ~a0 : 0u, a3 = has_w ? ~a1 : 0u;
  constexpr bool has_bias = BIAS;  // the launcher picks BIAS = (bias or rel given)
  float mul[2], ar[2];
  int lim[2], ib[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int i = rbase + g + 8 * hh;
    ar[hh] = qa[warp * 16 + g + 8 * hh];
    mul[hh] = has_bias ? 1.f : ar[hh];
    lim[hh] = i < p.Lq ? (p.causal ? min(p.Lk - 1, i + shift) : p.Lk - 1) : -1;
    ib[hh] = min(i, p.Lq - 1);  // bias row (rows past Lq are computed, never stored)
  }
  // bias rows of rows g / g + 8: brow[hh][j] = bias[b, h, i, j], rrow[hh][-j] = rel[h, relc + (i + shift) - j]
  const float* brow[2] = {nullptr, nullptr};
  const float* rrow[2] = {nullptr, nullptr};
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    if (p.bias) brow[hh] = p.bias + b * p.bias_sb + h * p.bias_sh + static_cast<int64_t>(ib[hh]) * p.bias_si;
    if (p.rel) rrow[hh] = p.rel + static_cast<int64_t>(h) * p.rel_len + (p.rel_len - 1) / 2 + ib[hh] + shift;
  }
  // the last key every valid row of this warp sees (tiles up to it need no mask)
  const int lim_w = rbase < p.Lq ? (p.causal ? min(p.Lk - 1, rbase + shift) : p.Lk - 1) : INT_MAX;
  // the last key any valid row of this warp sees (-1: none)
  const int lim_last = rbase < p.Lq ? (p.causal ? min(p.Lk - 1, min(rbase + 15, p.Lq - 1) + shift) : p.Lk - 1) : -1;

  float o[ND][4], ls[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int d = 0; d < ND; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY};
  float nm[2] = {0.f, 0.f};  // -m (0 while m = -inf)
  const uint32_t ones = pack2<VT>(1.f, 1.f);

  int kend = p.Lk;
  if (p.causal) kend = min(p.Lk, q0 + kMmaBQ + shift);
  const int ntiles = kend > 0 ? (kend + BK - 1) / BK : 0;
  const int64_t kbase = bhk * p.Lk;
  const int64_t vbase = static_cast<int64_t>(b) * p.v_sb + static_cast<int64_t>(hk) * p.v_sh;
  const uint16_t* vg = static_cast<const uint16_t*>(p.v);

  // tile `tile`'s V rows into stage s (zeros past Lk: P = 0 must not meet NaN garbage).  Thread tid copies the
  // 16-byte chunk lc of rows lt + RPS·u.
  constexpr int CPR = D / 8, RPS = kMmaThreads / CPR, NSTEP = BK / RPS;
  static_assert(kMmaThreads % CPR == 0 && BK % RPS == 0 && BK <= kMmaThreads, "V staging covers a tile");
  const int lt = tid / CPR, lc = (tid - lt * CPR) * 8;
  const int64_t vstep = static_cast<int64_t>(RPS) * p.v_st;
  auto load_v = [&](int tile, int s) {
    uint16_t* dst = vst + s * BK * VR + lt * VR + lc;
    const int jt = tile * BK + lt;
    const uint16_t* src = vg + vbase + static_cast<int64_t>(jt) * p.v_st + lc;
    if (p.v_vec && tile * BK + BK <= p.Lk) {  // block-uniform: a whole, aligned tile
#pragma unroll
      for (int u = 0; u < NSTEP; ++u) ptx::cp_async16(dst + u * RPS * VR, src + u * vstep);
      return;
    }
#pragma unroll 1
    for (int u = 0; u < NSTEP; ++u) {
      const int j = jt + u * RPS;
      if (j < p.Lk && p.v_vec) {
        ptx::cp_async16(dst + u * RPS * VR, src + u * vstep);
      } else {
        uint16_t e[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) e[c] = j < p.Lk ? src[u * vstep + c] : uint16_t(0);
        uint4 w;
        memcpy(&w, e, 16);
        *reinterpret_cast<uint4*>(dst + u * RPS * VR) = w;
      }
    }
  };
  // tile `tile`'s sign words and β into registers (threads < BK, one key each), then into stage s
  uint32_t kr[NW];
  float br = 0.f;
  auto load_k = [&](int tile) {
    const int j = tile * BK + tid;
    if (tid < BK) {
#pragma unroll
      for (int w = 0; w < NW; ++w) kr[w] = j < p.Lk ? p.kb[(kbase + j) * NW + w] : 0u;
      br = j < p.Lk ? p.ks[kbase + j] : 0.f;
    }
  };
  auto store_k = [&](int s) {
    if (tid < BK) {  // whole warps (BK = 64)
      uint32_t* ks = kst + s * S::KSW;
#pragma unroll
      for (int w = 0; w < NW; ++w) ks[tid * NW + w] = kr[w];
      reinterpret_cast<float*>(ks + BK * NW)[tid] = br;
      if constexpr (!BIAS) {  // max β of this warp's 32 keys: the tile's bound on β·n is D·max β
        float bm = br;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) bm = fmaxf(bm, __shfl_xor_sync(kFull, bm, o));
        if (lane == 0) reinterpret_cast<float*>(ks + BK * NW + BK)[warp] = bm;
      }
    }
  };

  if (ntiles > 0) {
    load_k(0);
    store_k(0);
    load_v(0, 0);
  }
  ptx::cp_async_commit();

#pragma unroll 1
  for (int it = 0; it < ntiles; ++it) {
    const int s = it & 1, j0 = it * BK;
    const bool more = it + 1 < ntiles;
    ptx::cp_async_wait<0>();
    __syncthreads();  // tile it is staged; every warp is done with tile it - 1 (stage s ^ 1)
    if (more) {
      load_k(it + 1);
      load_v(it + 1, s ^ 1);
    }
    ptx::cp_async_commit();
    const uint16_t* vs = vst + s * BK * VR;
    const uint32_t* kws = kst + s * S::KSW;
    const float* beta = reinterpret_cast<const float*>(kws + BK * NW);

    // a warp whose rows see no key of this tile (causal: rows below the CTA's last) only stages and syncs
    if (j0 <= lim_last) {
      // x for rows g / g + 8 (hh = 0 / 1) and keys 8n + 2·tig + {0, 1}
      float x[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        int cnt[4];
        const uint32_t kx = has_w ? kws[(8 * n + g) * NW + tig] : 0u;
        mma_and_popc(cnt, a0, a1, a2, a3, has_w ? ~kx : 0u, kx, 0x4B000000);
        const float2 bt = *reinterpret_cast<const float2*>(beta + 8 * n + 2 * tig);  // β of keys 2·tig + {0, 1}
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float nf = fmaf(-2.f, __int_as_float(cnt[e]), kNOff);  // D − 2·popc(q ^ k), exact
          x[n][e] = ((e & 1) ? bt.y : bt.x) * nf;
        }
      }
      // x = a·x + log2 e·(bias + rel), one loop per block-uniform combination (no per-element branches)
      auto add_bias = [&](auto use_bias, auto use_rel) {
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int hh = e >> 1, j = min(j0 + 8 * n + 2 * tig + (e & 1), p.Lk - 1);
            float bv = 0.f;
            if constexpr (decltype(use_bias)::value) bv = brow[hh][j];
            if constexpr (decltype(use_rel)::value) bv += rrow[hh][-j];
            x[n][e] = fmaf(ar[hh], x[n][e], kLog2e * bv);
          }
      };
      if constexpr (BIAS) {
        if (p.bias != nullptr && p.rel != nullptr) add_bias(std::true_type{}, std::true_type{});
        else if (p.bias != nullptr) add_bias(std::true_type{}, std::false_type{});
        else add_bias(std::false_type{}, std::true_type{});
      }
      if (j0 + BK - 1 > lim_w) {  // warp-uniform: some row's visible keys end inside this tile
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (j0 + 8 * n + 2 * tig + (e & 1) > lim[e >> 1]) x[n][e] = -INFINITY;
      }
      // lazy running max per row (the 4 threads of a group hold one row's 64 keys).  Without a bias a tile's scores
      // are bounded by mul·D·(max β of the tile): where that bound is <= m + kSlack for both rows of every thread,
      // no score can move m, and the per-element max (and its shuffles) is skipped -- the same result.
      bool need_max = true;
      if constexpr (!BIAS) {
        const float2 bm = *reinterpret_cast<const float2*>(beta + BK);
        const float bound = static_cast<float>(D) * fmaxf(bm.x, bm.y);
        need_max = __any_sync(kFull, mul[0] * bound > m_r[0] + kSlack || mul[1] * bound > m_r[1] + kSlack);
      }
      if (need_max) {
        bool moved = false;
        float alpha[2] = {1.f, 1.f};
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          float mx = -INFINITY;
#pragma unroll
          for (int n = 0; n < NT; ++n) mx = fmaxf(mx, fmaxf(x[n][2 * hh], x[n][2 * hh + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 2));
          const float mt = mx == -INFINITY ? -INFINITY : mul[hh] * mx;
          if (mt > m_r[hh] + kSlack) {
            alpha[hh] = m_r[hh] == -INFINITY ? 0.f : exp2f(m_r[hh] - mt);
            m_r[hh] = mt;
            moved = true;
          }
          nm[hh] = m_r[hh] == -INFINITY ? 0.f : -m_r[hh];
        }
        if (__any_sync(kFull, moved)) {
#pragma unroll
          for (int d = 0; d < ND; ++d) {
            o[d][0] *= alpha[0];
            o[d][1] *= alpha[0];
            o[d][2] *= alpha[1];
            o[d][3] *= alpha[1];
          }
          ls[0] *= alpha[0];
          ls[1] *= alpha[0];
          ls[2] *= alpha[1];
          ls[3] *= alpha[1];
        }
      }
      // P (rounded to V's type) · V and P · 1, 16 keys per step
#pragma unroll
      for (int kk = 0; kk < NT / 2; ++kk) {
        uint32_t pa[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {  // r: (row half, 8-key tile) = (r & 1, r >> 1)
          const int n = 2 * kk + (r >> 1), hh = r & 1;
          pa[r] = pack2<VT>(ex2_ftz(fmaf(mul[hh], x[n][2 * hh], nm[hh])), ex2_ftz(fmaf(mul[hh], x[n][2 * hh + 1], nm[hh])));
        }
        const uint16_t* vrow = vs + (16 * kk + (lane & 15)) * VR + 8 * (lane >> 4);
#pragma unroll
        for (int dp = 0; dp < ND / 2; ++dp) {
          uint32_t bf[4];
          ptx::ldmatrix_x4_trans(bf, vrow + 16 * dp);
          mma16816<VT>(o[2 * dp], pa, bf[0], bf[1]);
          mma16816<VT>(o[2 * dp + 1], pa, bf[2], bf[3]);
        }
        mma16816<VT>(ls, pa, ones, ones);
      }
    }
    if (more) store_k(s ^ 1);
  }

#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int i = rbase + g + 8 * hh;
    if (i >= p.Lq) continue;
    const float l = ls[2 * hh];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    VT* out = static_cast<VT*>(p.out) + ((static_cast<int64_t>(b) * p.Hq + h) * p.Lq + i) * D;
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      const uint32_t w = pack2<VT>(o[d][2 * hh] * inv, o[d][2 * hh + 1] * inv);
      *reinterpret_cast<uint32_t*>(out + 8 * d + 2 * tig) = w;
    }
  }
}

// KVENGINE_BINARY_MMA_WARPS=4 selects 4-warp CTAs (64 query rows) instead of 8 (128 rows; read per call)
int mma_warps() {
  const char* e = std::getenv("KVENGINE_BINARY_MMA_WARPS");
  return e != nullptr && e[0] == '4' && e[1] == '\0' ? 4 : 8;
}

template <int D, typename VT, int NWARP>
void launch_mma_w(const AttnParams& p, int B, int Hq, int Lq, cudaStream_t stream) {
  const size_t smem = MmaSmem<D, NWARP>::bytes;
  auto fn = p.bias != nullptr || p.rel != nullptr ? binary_attn_mma_kernel<D, VT, true, NWARP>
                                                  : binary_attn_mma_kernel<D, VT, false, NWARP>;
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
          "shared memory opt-in");
  constexpr int BQ = NWARP * 16;
  const dim3 grid(static_cast<unsigned>((Lq + BQ - 1) / BQ), static_cast<unsigned>(Hq), static_cast<unsigned>(B));
  fn<<<grid, NWARP * 32, smem, stream>>>(p);
  check(cudaGetLastError(), "tensor-core kernel launch");
}

template <int D, typename VT>
void launch_mma(const AttnParams& p, int B, int Hq, int Lq, cudaStream_t stream) {
  if (mma_warps() == 4) launch_mma_w<D, VT, 4>(p, B, Hq, Lq, stream);
  else launch_mma_w<D, VT, 8>(p, B, Hq, Lq, stream);
}

template <typename VT>
bool try_mma(const AttnParams& p, int D, int B, int Hq, int Lq, cudaStream_t stream) {
  switch (D) {
    case 32: launch_mma<32, VT>(p, B, Hq, Lq, stream); return true;
    case 64: launch_mma<64, VT>(p, B, Hq, Lq, stream); return true;
    case 128: launch_mma<128, VT>(p, B, Hq, Lq, stream); return true;
    default: return false;
  }
}

// KVENGINE_BINARY_MMA=1 selects the tensor-core kernel where it applies (read per call)
bool mma_requested() {
  const char* e = std::getenv("KVENGINE_BINARY_MMA");
  return e != nullptr && e[0] == '1';
}

}  // namespace

size_t binary_attention_workspace_bytes(const BinaryAttentionArgs& a) {
  const Split s = split_plan(a);
  if (!s.grouped || s.nchunks <= 1) return 0;
  return static_cast<size_t>(a.B * a.Hkv) * s.nchunks * (a.Hq / a.Hkv) * a.Lq * (a.D + 2) * sizeof(float);
}

bool binary_attention_mma_applies(const BinaryAttentionArgs& a) {
  if (!(a.D == 32 || a.D == 64 || a.D == 128)) return false;
  if (!(a.v_dtype == DType::F16 || a.v_dtype == DType::BF16)) return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) !=
                                                cudaSuccess)
    return false;
  return major >= 8;
}

void sign_pack(const void* x, DType dtype, int64_t batch, int64_t L, int64_t D, int64_t x_stride_b,
               int64_t x_stride_t, bool center, uint32_t* bits, float* scale, float* mean_ws, cudaStream_t stream) {
  if (batch <= 0 || L <= 0 || D <= 0) return;
  if (D % 32 != 0) throw std::runtime_error("kvengine::cuda::sign_pack: D must be a multiple of 32");
  if (center && mean_ws == nullptr) throw std::runtime_error("kvengine::cuda::sign_pack: mean workspace is null");
  PackParams p{};
  p.x = x;
  p.sb = x_stride_b;
  p.st = x_stride_t;
  p.batch = batch;
  p.L = L;
  p.D = D;
  p.dtype = static_cast<int>(dtype);
  p.center = center;
  p.bits = bits;
  p.scale = scale;
  p.mean = mean_ws;
  // both kernels loop grid-stride, so the grids are capped (gridDim.x <= 2^31 - 1, gridDim.y <= 65535)
  if (center) {
    const int64_t gx = batch < 0x7fffffff ? batch : 0x7fffffff, cy = (D + 127) / 128;
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(cy < 65535 ? cy : 65535));
    channel_mean_kernel<<<grid, 128, 0, stream>>>(p);
    check(cudaGetLastError(), "channel mean launch");
  }
  const int64_t blocks = (batch * L + 7) / 8;
  sign_pack_kernel<<<static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20)), 256, 0, stream>>>(p);
  check(cudaGetLastError(), "sign_pack launch");
}

void binary_attention(const BinaryAttentionArgs& a, cudaStream_t stream) { binary_attention(a, nullptr, stream); }

void binary_attention(const BinaryAttentionArgs& a, void* workspace, cudaStream_t stream) {
  if (a.B <= 0 || a.Hq <= 0 || a.Lq <= 0 || a.Lk <= 0) return;
  if (!(a.D == 32 || a.D == 64 || a.D == 128 || a.D == 256))
    throw std::runtime_error(std::string(kErr) + "head dim must be 32, 64, 128 or 256");
  if (a.Hkv <= 0 || a.Hq % a.Hkv != 0) throw std::runtime_error(std::string(kErr) + "Hq must be a multiple of Hkv");
  // the binding rejects these with a ValueError; Lq, Lk <= 2^30 keeps q0 + BQ + (Lk - Lq) and j0 + BK in int
  if (a.B > 65535 || a.Hq > 65535 || a.Lq > (int64_t(1) << 30) || a.Lk > (int64_t(1) << 30))
    throw std::runtime_error(std::string(kErr) + "too large (B and Hq <= 65535, Lq and Lk <= 2^30)");
  AttnParams p{};
  p.q = a.q;
  p.q_sb = a.q_stride_b;
  p.q_sh = a.q_stride_h;
  p.q_st = a.q_stride_t;
  p.kb = a.k_bits;
  p.ks = a.k_scale;
  p.v = a.v;
  p.v_sb = a.v_stride_b;
  p.v_sh = a.v_stride_h;
  p.v_st = a.v_stride_t;
  p.out = a.out;
  p.bias = a.bias;
  p.bias_sb = a.bias_stride_b;
  p.bias_sh = a.bias_stride_h;
  p.bias_si = a.bias_stride_i;
  p.rel = a.rel_bias;
  p.rel_len = a.rel_len;
  p.Hq = static_cast<int>(a.Hq);
  p.Hkv = static_cast<int>(a.Hkv);
  p.Lq = static_cast<int>(a.Lq);
  p.Lk = static_cast<int>(a.Lk);
  p.qdt = static_cast<int>(a.q_dtype);
  p.vdt = static_cast<int>(a.v_dtype);
  p.causal = a.causal;
  p.v_vec = reinterpret_cast<uintptr_t>(a.v) % 16 == 0 && a.v_stride_b % 8 == 0 && a.v_stride_h % 8 == 0 &&
            a.v_stride_t % 8 == 0;
  p.qmul = a.softmax_scale * kLog2e / static_cast<float>(a.D);
  const int B = static_cast<int>(a.B), Hq = static_cast<int>(a.Hq), Lq = static_cast<int>(a.Lq);
  if (mma_requested() && binary_attention_mma_applies(a)) {
    const bool done = a.v_dtype == DType::F16 ? try_mma<__half>(p, static_cast<int>(a.D), B, Hq, Lq, stream)
                                              : try_mma<__nv_bfloat16>(p, static_cast<int>(a.D), B, Hq, Lq, stream);
    if (done) return;
  }
  Split sp = split_plan(a);
  if (split_forced_off()) sp.grouped = false;
  if (sp.grouped) {
    p.rows = static_cast<int>((a.Hq / a.Hkv) * a.Lq);
    p.ntiles = (p.rows + rows_per_cta(a.D) - 1) / rows_per_cta(a.D);
    p.chunk = sp.chunk;
    p.nchunks = sp.nchunks;
    if (sp.nchunks > 1 && workspace == nullptr) {  // no workspace: one chunk per CTA, written out directly
      p.chunk = static_cast<int>(a.Lk);
      p.nchunks = 1;
    }
    p.part = p.nchunks > 1 ? static_cast<float*>(workspace) : nullptr;
  }
  switch (a.D) {
    case 32: launch_core<32, 8>(p, sp.grouped, B, Hq, Lq, stream); break;
    case 64: launch_core<64, 8>(p, sp.grouped, B, Hq, Lq, stream); break;
    case 128: launch_core<128, 8>(p, sp.grouped, B, Hq, Lq, stream); break;
    default: launch_core<256, 4>(p, sp.grouped, B, Hq, Lq, stream); break;
  }
}

}  // namespace kvengine::cuda
