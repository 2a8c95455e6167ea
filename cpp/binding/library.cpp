// kvengine — every op's schema, in one place.  Implementations register per capability in the files beside this
// one (TORCH_LIBRARY_IMPL for CPU and CUDA); fakes and autograd live in python/kvengine/ops.py.
#include <torch/library.h>

#include "checks.h"  // KVE_TORCH_LIBRARY

KVE_TORCH_LIBRARY(kvengine, m) {
  // ---- rotation -------------------------------------------------------------------------------------------------
  m.def("fwht(Tensor x, float? scale=None, Tensor? perm=None) -> Tensor");
  m.def("fwht_(Tensor(a!) x, float? scale=None, Tensor? perm=None) -> ()");  // in place
  // ---- quantization + packing --------------------------------------------------------------------------------------
  m.def("quantize_pack(Tensor x, int bits, int group_size, str mode, ScalarType? meta_dtype=None, int clip=0) "
        "-> (Tensor codes, Tensor scale, Tensor zero)");
  m.def("rotate_quantize_pack(Tensor x, int bits, int group_size, str mode, float? scale=None, Tensor? perm=None, "
        "ScalarType? meta_dtype=None, int clip=0) -> (Tensor codes, Tensor scale, Tensor zero)");
  m.def("dequantize(Tensor codes, Tensor scale, Tensor zero, int bits, int group_size, str mode, ScalarType dtype) "
        "-> Tensor");
  // ---- attention over the quantized cache -------------------------------------------------------------------------
  m.def("quant_decode_attention(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor v_codes, "
        "Tensor v_scale, Tensor v_zero, Tensor k_fp, Tensor v_fp, Tensor lens, int bits_k, int bits_v, int k_group, "
        "int v_group, float? softmax_scale=None, bool rotate_k=False, bool rotate_v=False, Tensor? k_perm=None, "
        "Tensor? v_perm=None, str k_mode=\"per_channel\", Tensor? indices=None, bool qk_int8=False) -> Tensor");
  // ---- 1-bit QK attention (BinaryAttention) ---------------------------------------------------------------------
  m.def("sign_pack(Tensor x, bool center=False) -> (Tensor bits, Tensor scale)");
  m.def("binary_attention(Tensor q, Tensor k, Tensor v, Tensor? bias=None, Tensor? rel_bias=None, bool causal=False, "
        "bool center_k=True, float? softmax_scale=None) -> Tensor");
  m.def("binary_attention_packed(Tensor q, Tensor k_bits, Tensor k_scale, Tensor v, Tensor? bias=None, "
        "Tensor? rel_bias=None, bool causal=False, float? softmax_scale=None) -> Tensor");
  // ---- hash-based top-k KV retrieval (Spotlight Attention) ---------------------------------------------------------
  m.def("hash_encode(Tensor x, Tensor w1, Tensor? b1=None, Tensor? w2=None, Tensor? b2=None, int? nbits=None) "
        "-> Tensor");
  m.def("hamming_topk(Tensor q_codes, Tensor k_codes, int k, Tensor? seq_lens=None, int[]? keep=None) "
        "-> (Tensor indices, Tensor scores)");
  m.def("sparse_decode_attention(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor? seq_lens=None, "
        "float? softmax_scale=None) -> Tensor");
}
