// kvengine — binding of quant_decode_attention: checks, optional rotation of q / out, then CPU or CUDA.
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "kvengine/attention.h"
#include "kvengine/fwht.h"
#ifdef KVENGINE_WITH_CUDA
#include "kvengine/cuda_ops.h"
#endif

namespace kvengine::binding {

at::Tensor check_perm(const char* op, const std::optional<at::Tensor>& perm, int64_t n, const at::Device& dev);
void check_fwht_n(const char* op, int64_t n, const char* what);
at::Tensor fwht(const at::Tensor& x, std::optional<double> scale, const std::optional<at::Tensor>& perm);
void fwht_(at::Tensor x, std::optional<double> scale, const std::optional<at::Tensor>& perm);

namespace {

void check_shape(const char* op, const char* name, const at::Tensor& t, std::vector<int64_t> expect) {
  KVE_CHECK(t.sizes().vec() == expect, op, ": ", name, " must have shape ", at::IntArrayRef(expect), ", got ",
            t.sizes());
}

}  // namespace

at::Tensor quant_decode_attention(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_scale,
                                  const at::Tensor& k_zero, const at::Tensor& v_codes, const at::Tensor& v_scale,
                                  const at::Tensor& v_zero, const at::Tensor& k_fp, const at::Tensor& v_fp,
                                  const at::Tensor& lens, int64_t bits_k, int64_t bits_v, int64_t k_group,
                                  int64_t v_group, std::optional<double> softmax_scale, bool rotate_k, bool rotate_v,
                                  const std::optional<at::Tensor>& k_perm, const std::optional<at::Tensor>& v_perm,
                                  c10::string_view k_mode, const std::optional<at::Tensor>& indices,
                                  bool qk_int8) {
  const char* op = "quant_decode_attention";
  check_supported_device(op, q);
  check_float(op, "q", q);
  KVE_CHECK(q.dim() == 4, op, ": q must be [B, Hq, Tq, D], got shape ", q.sizes());
  check_nonempty(op, "q", q);
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  KVE_CHECK(D % 16 == 0 && D <= 256, op, ": head_dim D (last dim of q) must be a multiple of 16 up to 256, got ", D);
  KVE_CHECK(!on_cuda(q) || D == 32 || D == 64 || D == 128 || D == 256, op,
            ": on CUDA head_dim D must be 32, 64, 128 or 256, got ", D);
  KVE_CHECK(Tq >= 1 && Tq <= 8, op, ": Tq (dim 2 of q, new tokens per step) must be in [1, 8], got ", Tq);
  // query rows (b, head, t) are numbered in 32-bit ints (CUDA grid, split-K partials)
  KVE_CHECK(B * Hq * Tq <= kInt32Max, op, ": B·Hq·Tq (", B, "·", Hq, "·", Tq, " query rows) must be < 2^31");
  KVE_CHECK(k_codes.dim() == 4, op, ": k_codes must be [B, Hkv, capacity, D*bits_k/8], got shape ", k_codes.sizes());
  const int64_t Hkv = k_codes.size(1), qcap = k_codes.size(2);
  KVE_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, ": the query head count Hq (", Hq,
            ") must be a multiple of the KV head count Hkv (", Hkv, ")");
  check_bits(op, bits_k);
  check_bits(op, bits_v);
  KVE_CHECK(k_mode == "per_channel" || k_mode == "per_token", op,
            ": k_mode must be 'per_channel' or 'per_token', got '", std::string(k_mode), "'");
  const bool ktok = k_mode == "per_token";
  if (ktok) {
    KVE_CHECK(k_group >= 16 && k_group % 16 == 0 && D % k_group == 0, op, ": with per-token keys k_group (", k_group,
              ") must be a multiple of 16 that divides head_dim ", D);
    KVE_CHECK(!on_cuda(q) || k_group % 32 == 0, op, ": on CUDA per-token keys need k_group a multiple of 32, got ",
              k_group);
  } else {
    KVE_CHECK(k_group >= 1 && qcap % k_group == 0, op, ": k_group (", k_group,
              ") must be >= 1 and divide the quantized capacity (dim 2 of k_codes, ", qcap, ")");
  }
  KVE_CHECK(v_group >= 16 && v_group % 16 == 0 && D % v_group == 0, op, ": v_group (", v_group,
            ") must be a multiple of 16 that divides head_dim ", D);
  // lens are int32 and the kernels hold token positions (< n_sink + n_quant + n_res) in 32-bit ints
  if (k_fp.dim() == 4)
    KVE_CHECK(qcap + k_fp.size(2) <= kInt32Max, op, ": the quantized capacity (dim 2 of k_codes, ", qcap,
              ") plus the full-precision capacity (dim 2 of k_fp, ", k_fp.size(2), ") must be < 2^31");
  const at::Device dev = q.device();
  const at::ScalarType mt = k_scale.scalar_type();
  struct T {
    const char* name;
    const at::Tensor& t;
    std::vector<int64_t> shape;
    at::ScalarType dtype;
  } tensors[] = {
      {"k_codes", k_codes, {B, Hkv, qcap, D * bits_k / 8}, at::kByte},
      {"k_scale", k_scale, ktok ? std::vector<int64_t>{B, Hkv, qcap, D / k_group} : std::vector<int64_t>{B, Hkv, qcap / k_group, D}, mt},
      {"k_zero", k_zero, ktok ? std::vector<int64_t>{B, Hkv, qcap, D / k_group} : std::vector<int64_t>{B, Hkv, qcap / k_group, D}, mt},
      {"v_codes", v_codes, {B, Hkv, qcap, D * bits_v / 8}, at::kByte},
      {"v_scale", v_scale, {B, Hkv, qcap, D / v_group}, mt},
      {"v_zero", v_zero, {B, Hkv, qcap, D / v_group}, mt},
      {"k_fp", k_fp, {B, Hkv, k_fp.dim() == 4 ? k_fp.size(2) : -1, D}, q.scalar_type()},
      {"v_fp", v_fp, {B, Hkv, k_fp.dim() == 4 ? k_fp.size(2) : -1, D}, q.scalar_type()},
      {"lens", lens, {B, 3}, at::kInt},
  };
  KVE_CHECK(mt == at::kFloat || mt == at::kHalf || mt == at::kBFloat16, op,
            ": k_scale must be float32, float16 or bfloat16, got ", mt);
  for (const auto& t : tensors) {
    check_device(op, t.name, t.t, dev);
    check_shape(op, t.name, t.t, t.shape);
    KVE_CHECK(t.t.scalar_type() == t.dtype, op, ": ", t.name, " must be ", t.dtype, ", got ", t.t.scalar_type());
    KVE_CHECK(t.t.is_contiguous(), op, ": ", t.name, " must be contiguous");
  }
  if (on_cuda(q)) {  // the CUDA kernel stages codes and loads full-precision rows with 16-byte vector accesses
    for (int i : {0, 3, 6, 7})  // k_codes, v_codes, k_fp, v_fp
      KVE_CHECK(reinterpret_cast<uintptr_t>(tensors[i].t.data_ptr()) % 16 == 0, op, ": on CUDA ", tensors[i].name,
                " must start at a 16-byte aligned address (a view at an element offset is not; pass a copy)");
  }
  const int64_t fcap = k_fp.size(2);
  // value checks need the data; on CUDA they would cost a host sync (the kernel clamps lens to the capacities)
  if (!on_cuda(lens)) {
    const int32_t* l = lens.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t ns = l[3 * b], nq = l[3 * b + 1], nr = l[3 * b + 2];
      KVE_CHECK(ns >= 0 && nq >= 0 && nr >= 0 && nq <= qcap && ns + nr <= fcap, op, ": lens[", b, "] = (", ns, ", ",
                nq, ", ", nr, ") exceeds the capacities (quantized ", qcap, ", full precision ", fcap, ")");
      KVE_CHECK(ns + nq + nr >= Tq, op, ": sequence ", b, " holds ", ns + nq + nr, " tokens, fewer than the ", Tq,
                " new query tokens (append the new keys/values before attending)");
    }
  }
  // retrieval: attend only the selected logical positions (int32 on the device; values past int32 cannot be valid
  // positions and are clamped to a skipped value without a host sync)
  at::Tensor idx;
  if (indices.has_value() && indices->defined()) {
    const at::Tensor& ix = *indices;
    check_device(op, "indices", ix, dev);
    KVE_CHECK(Tq == 1, op, ": indices (sparse attention) need Tq = 1 query token, got Tq = ", Tq);
    KVE_CHECK(ix.dim() == 3 && ix.size(0) == B && ix.size(1) == Hkv, op, ": indices must be [B=", B, ", Hkv=", Hkv,
              ", n], got shape ", ix.sizes());
    KVE_CHECK(ix.scalar_type() == at::kInt || ix.scalar_type() == at::kLong, op,
              ": indices must be int32 or int64, got ", ix.scalar_type());
    idx = ix.scalar_type() == at::kLong ? ix.clamp(-1, kInt32Max).to(at::kInt).contiguous() : ix.contiguous();
  }
  at::Tensor qq = q;
  if (rotate_k) {
    check_fwht_n(op, D, "head_dim D (rotate_k)");
    qq = fwht(q, std::nullopt, k_perm);
  } else {
    KVE_CHECK(!k_perm.has_value() || !k_perm->defined(), op, ": k_perm given but rotate_k is false");
  }
  if (rotate_v) check_fwht_n(op, D, "head_dim D (rotate_v)");
  at::Tensor vp;
  if (rotate_v) vp = check_perm(op, v_perm, D, dev);
  else KVE_CHECK(!v_perm.has_value() || !v_perm->defined(), op, ": v_perm given but rotate_v is false");
  if (qq.stride(-1) != 1) qq = qq.contiguous();

  at::Tensor out = at::empty({B, Hq, Tq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  DecodeAttentionArgs a;
  a.q = qq.data_ptr();
  a.q_stride_b = qq.stride(0);
  a.q_stride_h = qq.stride(1);
  a.q_stride_t = qq.stride(2);
  a.out = out.data_ptr();
  a.dtype = to_dtype(q.scalar_type());
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Tq = Tq;
  a.D = D;
  a.softmax_scale = softmax_scale.has_value() ? float(*softmax_scale) : 1.0f / std::sqrt(float(D));
  a.k_codes = k_codes.data_ptr<uint8_t>();
  a.k_scale = k_scale.data_ptr();
  a.k_zero = k_zero.data_ptr();
  a.v_codes = v_codes.data_ptr<uint8_t>();
  a.v_scale = v_scale.data_ptr();
  a.v_zero = v_zero.data_ptr();
  a.meta_dtype = to_dtype(mt);
  a.bits_k = int(bits_k);
  a.bits_v = int(bits_v);
  a.k_group = int(k_group);
  a.k_per_token = ktok;
  a.v_group = int(v_group);
  a.q_cap = qcap;
  a.k_fp = k_fp.data_ptr();
  a.v_fp = v_fp.data_ptr();
  a.f_cap = fcap;
  a.lens = lens.data_ptr<int32_t>();
  a.qk_int8 = qk_int8;
  if (idx.defined()) {
    a.sparse = true;
    a.indices = idx.data_ptr<int32_t>();
    a.n_idx = idx.size(2);
  }
#ifdef KVENGINE_WITH_CUDA
  if (on_cuda(q)) {
    c10::cuda::CUDAGuard guard(dev);
    at::Tensor ws = at::empty({int64_t(cuda::quant_decode_attention_workspace_bytes(a))},
                              q.options().dtype(at::kByte));
    cuda::quant_decode_attention(a, ws.data_ptr(), stream_of(q));
  } else
#endif
  {
    quant_decode_attention_cpu(a);
  }
  if (rotate_v) {
    fwht_(out, std::nullopt, std::nullopt);
    if (vp.defined()) out = out.index_select(-1, at::argsort(vp));
  }
  return out;
}

#ifndef KVENGINE_CUDA_EMU
TORCH_LIBRARY_IMPL(kvengine, CPU, m) { m.impl("quant_decode_attention", &quant_decode_attention); }
#endif
#ifdef KVENGINE_WITH_CUDA
KVE_TORCH_LIBRARY_IMPL(kvengine, KVE_CUDA_KEY, m) { m.impl("quant_decode_attention", &quant_decode_attention); }
#endif

}  // namespace kvengine::binding
