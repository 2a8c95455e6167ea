// kvengine — binding of fwht: checks, then CPU or CUDA.
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "kvengine/fwht.h"
#ifdef KVENGINE_WITH_CUDA
#include "kvengine/cuda_ops.h"
#endif

namespace kvengine::binding {

// int32 contiguous permutation of length n on x's device, or an undefined tensor.
at::Tensor check_perm(const char* op, const std::optional<at::Tensor>& perm, int64_t n, const at::Device& dev) {
  if (!perm.has_value() || !perm->defined()) return {};
  const at::Tensor& p = *perm;
  KVE_CHECK(p.scalar_type() == at::kInt || p.scalar_type() == at::kLong, op,
            ": perm must be an int32 or int64 tensor, got ", p.scalar_type());
  KVE_CHECK(p.dim() == 1 && p.size(0) == n, op, ": perm must have shape [", n, "] (the last dim of x), got ",
            p.sizes());
  check_device(op, "perm", p, dev);
  at::Tensor p32 = p.to(at::kInt).contiguous();
  if (!on_cuda(p32)) {  // on CUDA this would need a host sync; kernels wrap indices modulo n (never out of bounds)
    auto seen = at::zeros({n}, at::kBool);
    const int32_t* a = p32.data_ptr<int32_t>();
    bool* s = seen.data_ptr<bool>();
    for (int64_t i = 0; i < n; ++i) {
      KVE_CHECK(a[i] >= 0 && a[i] < n && !s[a[i]], op, ": perm must be a permutation of 0..", n - 1,
                " (entry ", i, " is ", a[i], ")");
      s[a[i]] = true;
    }
  }
  return p32;
}

void check_fwht_n(const char* op, int64_t n, const char* what) {
  KVE_CHECK(is_pow2(n) && n >= 2 && n <= kFwhtMaxN, op, ": ", what, " must be a power of two in [2, ", kFwhtMaxN,
            "], got ", n);
}

namespace {

// y may alias x (in place) when x is viewable as rows with unit inner stride.
void fwht_into(const char* op, const at::Tensor& x, std::optional<double> scale, const std::optional<at::Tensor>& perm,
               at::Tensor* out_or_null, at::Tensor& result) {
  check_supported_device(op, x);
  check_float(op, "x", x);
  KVE_CHECK(x.dim() >= 1, op, ": x must have at least one dim");
  check_nonempty(op, "x", x);
  const int64_t n = x.size(-1);
  check_fwht_n(op, n, "the last dim of x (n)");
  at::Tensor p = check_perm(op, perm, n, x.device());
  const float s = scale.has_value() ? static_cast<float>(*scale) : 1.0f / std::sqrt(static_cast<float>(n));
  const int32_t* pp = p.defined() ? p.data_ptr<int32_t>() : nullptr;
  const DType dt = to_dtype(x.scalar_type());

  at::Tensor xr = flatten_lead(x, {n});
  at::Tensor yr;
  if (out_or_null == nullptr) {
    result = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    yr = result.view({-1, n});
  } else {
    result = *out_or_null;
    // in place: transform the rows view directly when it aliases x, else compute into a temporary and copy back
    yr = xr.is_alias_of(x) && xr.data_ptr() == x.data_ptr() ? xr : at::empty_like(xr);
  }
  const int64_t rows = xr.size(0);
#ifdef KVENGINE_WITH_CUDA
  if (on_cuda(x)) {
    c10::cuda::CUDAGuard guard(x.device());
    cuda::fwht(xr.data_ptr(), yr.data_ptr(), dt, rows, n, xr.stride(0), yr.stride(0), s, pp, stream_of(x));
  } else
#endif
  {
    fwht_cpu(xr.data_ptr(), yr.data_ptr(), dt, rows, n, xr.stride(0), yr.stride(0), s, pp);
  }
  if (out_or_null != nullptr && yr.data_ptr() != x.data_ptr()) result.copy_(yr.view(x.sizes()));
}

}  // namespace

at::Tensor fwht(const at::Tensor& x, std::optional<double> scale, const std::optional<at::Tensor>& perm) {
  at::Tensor y;
  fwht_into("fwht", x, scale, perm, nullptr, y);
  return y;
}

void fwht_(at::Tensor x, std::optional<double> scale, const std::optional<at::Tensor>& perm) {
  at::Tensor y;
  fwht_into("fwht_", x, scale, perm, &x, y);
}

#ifndef KVENGINE_CUDA_EMU
TORCH_LIBRARY_IMPL(kvengine, CPU, m) {
  m.impl("fwht", &fwht);
  m.impl("fwht_", &fwht_);
}
#endif
#ifdef KVENGINE_WITH_CUDA
KVE_TORCH_LIBRARY_IMPL(kvengine, KVE_CUDA_KEY, m) {
  m.impl("fwht", &fwht);
  m.impl("fwht_", &fwht_);
}
#endif

}  // namespace kvengine::binding
