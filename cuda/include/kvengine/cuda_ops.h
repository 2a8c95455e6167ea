// kvengine — torch-free CUDA launchers.  Same semantics, argument order and layouts as the CPU entry points in
// cpp/include/kvengine/*.h; every launcher enqueues on `stream`, never synchronizes, never allocates, and throws
// std::runtime_error (with the CUDA error string) if a launch fails.  Pointers are device pointers.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kvengine/attention.h"
#include "kvengine/binary_attention.h"
#include "kvengine/common.h"
#include "kvengine/quant.h"
#include "kvengine/retrieval.h"

typedef struct CUstream_st* cudaStream_t;

namespace kvengine::cuda {

// fwht: rows need x/y row starts 16-byte aligned when row_stride * sizeof(dtype) % 16 == 0 and base aligned;
// the launcher falls back to a scalar-load path otherwise.
void fwht(const void* x, void* y, DType dtype, int64_t rows, int64_t n, int64_t x_row_stride, int64_t y_row_stride,
          float scale, const int32_t* perm, cudaStream_t stream);

// Whether the fused rotate+quantize kernel can run this shape in one pass (its shared-memory tile fits).
// When it cannot, the caller composes fwht into a temporary and quantize_pack (identical results).
bool quantize_pack_fused_supported(DType dtype, int64_t D, const QuantParams& qp);

// D < 2^31 and group_size (an int) for quantize_pack and dequantize.
void quantize_pack(const void* x, DType dtype, int64_t batch, int64_t T, int64_t D, int64_t x_batch_stride,
                   int64_t x_row_stride, const QuantParams& qp, const RotateParams& rp, uint8_t* codes, void* scale,
                   void* zero, cudaStream_t stream);

void dequantize(const uint8_t* codes, const void* scale, const void* zero, DType out_dtype, int64_t batch, int64_t T,
                int64_t D, const QuantParams& qp, void* y, cudaStream_t stream);

// Fused decode attention over the quantized cache (semantics: kvengine/attention.h; all pointers in `a`, lens
// included, are device pointers).  Split-K over the context: a split kernel writes per-split partial softmax states
// into `workspace` and a merge kernel writes `out`.  The workspace size depends only on shapes and capacities
// (B, Hq, Hkv, Tq, D, q_cap, f_cap, bits), never on lens, so the launcher is CUDA-graph capturable.  lens are read
// on the device and clamped to the capacities (n_sink, n_res >= 0 with n_sink + n_res <= f_cap, 0 <= n_quant <=
// q_cap), so invalid lens never read outside the cache.  Requires q_cap + f_cap < 2^31 and B·Hq·Tq < 2^31.
// Supports D in {32, 64, 128, 256}, bits in {1, 2, 4, 8}, v_group % 16 == 0 dividing D, any k_group dividing q_cap;
// k_codes, v_codes, k_fp, v_fp 16-byte aligned.
size_t quant_decode_attention_workspace_bytes(const DecodeAttentionArgs& a);
void quant_decode_attention(const DecodeAttentionArgs& a, void* workspace, cudaStream_t stream);

// ---- 1-bit QK attention (semantics: kvengine/binary_attention.h) ------------------------------------------------
// sign_pack: x [batch, L, D] (element strides, D contiguous, D a multiple of 32) -> bits [batch, L, D/32], scale
// [batch, L]; with `center`, `mean_ws` (fp32 [batch, D], device) receives the per-channel means (else may be null).
void sign_pack(const void* x, DType dtype, int64_t batch, int64_t L, int64_t D, int64_t x_stride_b,
               int64_t x_stride_t, bool center, uint32_t* bits, float* scale, float* mean_ws, cudaStream_t stream);
// Fused binary attention over packed keys (all pointers in `a` device pointers); D in {32, 64, 128, 256};
// q and v rows 4-byte aligned; B, Hq <= 65535 (grid y / z); Lq, Lk <= 2^30.
// Decode-shaped calls (the g·Lq query rows of a GQA group fit one CTA: <= 32, D = 256: <= 16) run one CTA per (b,
// KV head, chunk of keys) with the rows of the whole group, the chunks merged by a second kernel in `workspace`
// (binary_attention_workspace_bytes(a) bytes, device memory; 0 when none is needed; it depends on the shapes only).
// Without a workspace such calls run one CTA per (b, KV head), no split. KVENGINE_BINARY_CUDA_SPLIT=0 (read per
// call) forces one CTA per query head instead. Other calls: one kernel.
// With KVENGINE_BINARY_MMA=1 (read per call) and binary_attention_mma_applies(a) (D <= 128, fp16/bf16 V, sm_80+) the
// tensor-core kernel runs (b1 AND+popc MMA for QK, fp16/bf16 MMA for P·V with P rounded to V's type).
size_t binary_attention_workspace_bytes(const BinaryAttentionArgs& a);
void binary_attention(const BinaryAttentionArgs& a, void* workspace, cudaStream_t stream);
void binary_attention(const BinaryAttentionArgs& a, cudaStream_t stream);  // no workspace
bool binary_attention_mma_applies(const BinaryAttentionArgs& a);

// ---- hash-based top-k KV retrieval (semantics: kvengine/retrieval.h) ----------------------------------------------
// hash_encode: projection (+ SiLU residual layer) and sign packing in one kernel; nbits in {32, 64, 128, 256},
// D <= 1024.  No workspace.
void hash_encode(const HashEncodeArgs& a, cudaStream_t stream);
// hamming_topk: three kernels (scores + per-chunk histograms, per-(b, h) threshold and chunk offsets, ordered
// compaction); the workspace size depends on B, Hkv, N, W, g only (graph capturable; seq_lens read on the device
// and clamped to [0, N]).  Requires (Hq/Hkv)·nbits <= 8192, N < 2^31, B and Hkv <= 65535 (grid y / z) with
// B·Hkv < 2^31.
size_t hamming_topk_workspace_bytes(const HammingTopkArgs& a);
void hamming_topk(const HammingTopkArgs& a, void* workspace, cudaStream_t stream);
// sparse_decode_attention: one CTA per (b, KV head, block of <= 8 query rows); D in {32, 64, 128, 256};
// B·Hq < 2^31.
void sparse_decode_attention(const SparseDecodeArgs& a, cudaStream_t stream);

}  // namespace kvengine::cuda
