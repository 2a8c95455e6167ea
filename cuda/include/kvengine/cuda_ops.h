// kvengine — torch-free CUDA launchers.  Same semantics, argument order and layouts as the CPU entry points in
// cpp/include/kvengine/*.h; every launcher enqueues on `stream`, never synchronizes, never allocates, and throws
// std::runtime_error (with the CUDA error string) if a launch fails.  Pointers are device pointers.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kvengine/attention.h"
#include "kvengine/common.h"
#include "kvengine/quant.h"

typedef struct CUstream_st* cudaStream_t;

namespace kvengine::cuda {

// fwht: rows need x/y row starts 16-byte aligned when row_stride * sizeof(dtype) % 16 == 0 and base aligned;
// the launcher falls back to a scalar-load path otherwise.
void fwht(const void* x, void* y, DType dtype, int64_t rows, int64_t n, int64_t x_row_stride, int64_t y_row_stride,
          float scale, const int32_t* perm, cudaStream_t stream);

// Whether the fused rotate+quantize kernel can run this shape in one pass (its shared-memory tile fits).
// When it cannot, the caller composes fwht into a temporary and quantize_pack (identical results).
bool quantize_pack_fused_supported(DType dtype, int64_t D, const QuantParams& qp);

void quantize_pack(const void* x, DType dtype, int64_t batch, int64_t T, int64_t D, int64_t x_batch_stride,
                   int64_t x_row_stride, const QuantParams& qp, const RotateParams& rp, uint8_t* codes, void* scale,
                   void* zero, cudaStream_t stream);

void dequantize(const uint8_t* codes, const void* scale, const void* zero, DType out_dtype, int64_t batch, int64_t T,
                int64_t D, const QuantParams& qp, void* y, cudaStream_t stream);

// Fused decode attention over the quantized cache (semantics: kvengine/attention.h; all pointers in `a`, lens
// included, are device pointers).  Split-K over the context: a split kernel writes per-split partial softmax states
// into `workspace` and a merge kernel writes `out`.  The workspace size depends only on shapes and capacities
// (B, Hq, Hkv, Tq, D, q_cap, f_cap, bits), never on lens, so the launcher is CUDA-graph capturable.
// Supports D in {32, 64, 128, 256}, bits in {1, 2, 4, 8}, v_group % 16 == 0 dividing D, any k_group dividing q_cap;
// k_codes, v_codes, k_fp, v_fp 16-byte aligned.
size_t quant_decode_attention_workspace_bytes(const DecodeAttentionArgs& a);
void quant_decode_attention(const DecodeAttentionArgs& a, void* workspace, cudaStream_t stream);

}  // namespace kvengine::cuda
