// kvengine — binding of quantize_pack / rotate_quantize_pack / dequantize.
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "kvengine/fwht.h"
#include "kvengine/quant.h"
#ifdef KVENGINE_WITH_CUDA
#include "kvengine/cuda_ops.h"
#endif

namespace kvengine::binding {

at::Tensor check_perm(const char* op, const std::optional<at::Tensor>& perm, int64_t n, const at::Device& dev);
void check_fwht_n(const char* op, int64_t n, const char* what);

namespace {

QuantParams check_quant_params(const char* op, int64_t bits, int64_t group_size, const std::string& mode, int64_t T,
                               int64_t D) {
  check_bits(op, bits);
  QuantParams qp;
  qp.bits = static_cast<int>(bits);
  qp.mode = parse_mode(op, mode);
  KVE_CHECK(group_size > 0, op, ": group_size must be positive, got ", group_size);
  // the kernels hold a group's size and a row's channel index in 32-bit ints
  KVE_CHECK(group_size <= kInt32Max, op, ": group_size must be < 2^31, got ", group_size);
  KVE_CHECK(D <= kInt32Max, op, ": the channel axis (dim -1, size ", D, ") must be < 2^31");
  qp.group_size = static_cast<int>(group_size);
  if (qp.mode == QuantMode::PerChannel) {
    KVE_CHECK(T % group_size == 0, op, ": group_size (", group_size,
              ") must divide the token axis (dim -2, size ", T, ") for mode='per_channel'");
  } else {
    KVE_CHECK(D % group_size == 0, op, ": group_size (", group_size,
              ") must divide the channel axis (dim -1, size ", D, ") for mode='per_token'");
  }
  KVE_CHECK(D * bits % 8 == 0, op, ": the channel axis (dim -1, size ", D, ") times bits (", bits,
            ") must be a multiple of 8 to pack whole bytes");
  return qp;
}

std::vector<int64_t> meta_shape(at::IntArrayRef lead, int64_t T, int64_t D, const QuantParams& qp) {
  std::vector<int64_t> s(lead.begin(), lead.end());
  if (qp.mode == QuantMode::PerChannel) { s.push_back(T / qp.group_size); s.push_back(D); }
  else { s.push_back(T); s.push_back(D / qp.group_size); }
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quant_impl(const char* op, const at::Tensor& x, int64_t bits,
                                                          int64_t group_size, const std::string& mode,
                                                          bool rotate, std::optional<double> rot_scale,
                                                          const std::optional<at::Tensor>& perm,
                                                          std::optional<at::ScalarType> meta_dtype, int64_t clip) {
  check_supported_device(op, x);
  check_float(op, "x", x);
  KVE_CHECK(x.dim() >= 2, op, ": x must be [..., T, D] (at least 2 dims), got shape ", x.sizes());
  check_nonempty(op, "x", x);
  const int64_t T = x.size(-2), D = x.size(-1);
  QuantParams qp = check_quant_params(op, bits, group_size, mode, T, D);
  const at::ScalarType mt = meta_dtype.value_or(x.scalar_type());
  KVE_CHECK(mt == at::kFloat || mt == at::kHalf || mt == at::kBFloat16, op,
            ": meta_dtype must be float32, float16 or bfloat16, got ", mt);
  qp.meta_dtype = to_dtype(mt);
  KVE_CHECK(clip >= 0 && clip <= kMaxClip, op, ": clip (range-search candidates) must be in [0, ", kMaxClip,
            "], got ", clip);
  qp.clip = static_cast<int>(clip);
  RotateParams rp;
  at::Tensor p;
  if (rotate) {
    check_fwht_n(op, D, "the channel axis (dim -1) to rotate");
    p = check_perm(op, perm, D, x.device());
    rp.enabled = true;
    rp.scale = rot_scale.has_value() ? static_cast<float>(*rot_scale) : 1.0f / std::sqrt(static_cast<float>(D));
    rp.perm = p.defined() ? p.data_ptr<int32_t>() : nullptr;
  }

  at::Tensor x3 = flatten_lead(x, {T, D});
  const int64_t batch = x3.size(0);
  auto lead = x.sizes().slice(0, x.dim() - 2);
  std::vector<int64_t> cshape(lead.begin(), lead.end());
  cshape.push_back(T);
  cshape.push_back(D * bits / 8);
  at::Tensor codes = at::empty(cshape, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty(meta_shape(lead, T, D, qp), x.options().dtype(mt));
  at::Tensor zero = at::empty_like(scale);
  const DType dt = to_dtype(x.scalar_type());
#ifdef KVENGINE_WITH_CUDA
  if (on_cuda(x)) {
    c10::cuda::CUDAGuard guard(x.device());
    cudaStream_t st = stream_of(x);
    if (rp.enabled && !cuda::quantize_pack_fused_supported(dt, D, qp)) {
      // the tile does not fit in shared memory: rotate into a temporary, then quantize (identical results)
      at::Tensor r = at::empty({batch, T, D}, x.options());
      if (x3.stride(0) == T * x3.stride(1)) {  // rows evenly spaced across batches: one launch
        cuda::fwht(x3.data_ptr(), r.data_ptr(), dt, batch * T, D, x3.stride(1), D, rp.scale, rp.perm, st);
      } else {
        for (int64_t b = 0; b < batch; ++b)
          cuda::fwht(static_cast<char*>(x3.data_ptr()) + b * x3.stride(0) * x.element_size(),
                     static_cast<char*>(r.data_ptr()) + b * T * D * x.element_size(), dt, T, D, x3.stride(1), D,
                     rp.scale, rp.perm, st);
      }
      cuda::quantize_pack(r.data_ptr(), dt, batch, T, D, T * D, D, qp, RotateParams{}, codes.data_ptr<uint8_t>(),
                          scale.data_ptr(), zero.data_ptr(), st);
    } else {
      cuda::quantize_pack(x3.data_ptr(), dt, batch, T, D, x3.stride(0), x3.stride(1), qp, rp,
                          codes.data_ptr<uint8_t>(), scale.data_ptr(), zero.data_ptr(), st);
    }
    return {codes, scale, zero};
  }
#endif
  quantize_pack_cpu(x3.data_ptr(), dt, batch, T, D, x3.stride(0), x3.stride(1), qp, rp, codes.data_ptr<uint8_t>(),
                    scale.data_ptr(), zero.data_ptr());
  return {codes, scale, zero};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_pack(const at::Tensor& x, int64_t bits, int64_t group_size,
                                                             c10::string_view mode,
                                                             std::optional<at::ScalarType> meta_dtype,
                                                             int64_t clip) {
  return quant_impl("quantize_pack", x, bits, group_size, std::string(mode), false, std::nullopt, std::nullopt,
                    meta_dtype, clip);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rotate_quantize_pack(const at::Tensor& x, int64_t bits,
                                                                    int64_t group_size, c10::string_view mode,
                                                                    std::optional<double> scale,
                                                                    const std::optional<at::Tensor>& perm,
                                                                    std::optional<at::ScalarType> meta_dtype,
                                                                    int64_t clip) {
  return quant_impl("rotate_quantize_pack", x, bits, group_size, std::string(mode), true, scale, perm, meta_dtype,
                    clip);
}

at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                      int64_t group_size, c10::string_view mode_sv, at::ScalarType dtype) {
  const char* op = "dequantize";
  check_supported_device(op, codes);
  KVE_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  KVE_CHECK(codes.dim() >= 2, op, ": codes must be [..., T, D*bits/8], got shape ", codes.sizes());
  check_nonempty(op, "codes", codes);
  check_bits(op, bits);
  check_device(op, "scale", scale, codes.device());
  check_device(op, "zero", zero, codes.device());
  check_float(op, "scale", scale);
  KVE_CHECK(zero.scalar_type() == scale.scalar_type(), op, ": zero (", zero.scalar_type(),
            ") and scale (", scale.scalar_type(), ") must have the same dtype");
  KVE_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
            ": dtype must be float32, float16 or bfloat16, got ", dtype);
  const int64_t T = codes.size(-2), D = codes.size(-1) * 8 / bits;
  QuantParams qp = check_quant_params(op, bits, group_size, std::string(mode_sv), T, D);
  qp.meta_dtype = to_dtype(scale.scalar_type());
  auto lead = codes.sizes().slice(0, codes.dim() - 2);
  const auto ms = meta_shape(lead, T, D, qp);
  KVE_CHECK(scale.sizes().vec() == ms, op, ": scale must have shape ", at::IntArrayRef(ms), ", got ", scale.sizes());
  KVE_CHECK(zero.sizes().vec() == ms, op, ": zero must have shape ", at::IntArrayRef(ms), ", got ", zero.sizes());
  at::Tensor c = codes.contiguous(), s = scale.contiguous(), z = zero.contiguous();
  std::vector<int64_t> yshape(lead.begin(), lead.end());
  yshape.push_back(T);
  yshape.push_back(D);
  at::Tensor y = at::empty(yshape, codes.options().dtype(dtype));
  const int64_t batch = c.numel() / (T * codes.size(-1));
#ifdef KVENGINE_WITH_CUDA
  if (on_cuda(codes)) {
    c10::cuda::CUDAGuard guard(codes.device());
    cuda::dequantize(c.data_ptr<uint8_t>(), s.data_ptr(), z.data_ptr(), to_dtype(dtype), batch, T, D, qp,
                     y.data_ptr(), stream_of(codes));
    return y;
  }
#endif
  dequantize_cpu(c.data_ptr<uint8_t>(), s.data_ptr(), z.data_ptr(), to_dtype(dtype), batch, T, D, qp, y.data_ptr());
  return y;
}

#ifndef KVENGINE_CUDA_EMU
TORCH_LIBRARY_IMPL(kvengine, CPU, m) {
  m.impl("quantize_pack", &quantize_pack);
  m.impl("rotate_quantize_pack", &rotate_quantize_pack);
  m.impl("dequantize", &dequantize);
}
#endif
#ifdef KVENGINE_WITH_CUDA
KVE_TORCH_LIBRARY_IMPL(kvengine, KVE_CUDA_KEY, m) {
  m.impl("quantize_pack", &quantize_pack);
  m.impl("rotate_quantize_pack", &rotate_quantize_pack);
  m.impl("dequantize", &dequantize);
}
#endif

}  // namespace kvengine::binding
