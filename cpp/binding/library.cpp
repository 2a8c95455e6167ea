// kvengine — every op's schema, in one place.  Implementations register per capability in the files beside this
// one (TORCH_LIBRARY_IMPL for CPU and CUDA); fakes and autograd live in python/kvengine/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(kvengine, m) {
  // ---- rotation -------------------------------------------------------------------------------------------------
  m.def("fwht(Tensor x, float? scale=None, Tensor? perm=None) -> Tensor");
  m.def("fwht_(Tensor(a!) x, float? scale=None, Tensor? perm=None) -> ()");  // in place
  // ---- quantization + packing --------------------------------------------------------------------------------------
  m.def("quantize_pack(Tensor x, int bits, int group_size, str mode, ScalarType? meta_dtype=None) "
        "-> (Tensor codes, Tensor scale, Tensor zero)");
  m.def("rotate_quantize_pack(Tensor x, int bits, int group_size, str mode, float? scale=None, Tensor? perm=None, "
        "ScalarType? meta_dtype=None) -> (Tensor codes, Tensor scale, Tensor zero)");
  m.def("dequantize(Tensor codes, Tensor scale, Tensor zero, int bits, int group_size, str mode, ScalarType dtype) "
        "-> Tensor");
  // ---- attention over the quantized cache -------------------------------------------------------------------------
  m.def("quant_decode_attention(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor v_codes, "
        "Tensor v_scale, Tensor v_zero, Tensor k_fp, Tensor v_fp, Tensor lens, int bits_k, int bits_v, int k_group, "
        "int v_group, float? softmax_scale=None, bool rotate_k=False, bool rotate_v=False, Tensor? k_perm=None, "
        "Tensor? v_perm=None) -> Tensor");
}
