// kvengine — binding of the 1-bit QK attention ops: sign_pack, binary_attention, binary_attention_packed.
// Every input is checked here once (ValueError naming the argument); then CPU or CUDA.
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "kvengine/binary_attention.h"
#ifdef KVENGINE_WITH_CUDA
#include "kvengine/cuda_ops.h"
#endif

namespace kvengine::binding {
namespace {

void check_head_dim(const char* op, int64_t D, bool cuda) {
  KVE_CHECK(D >= 32 && D % 32 == 0, op, ": head_dim D (last dim of q) must be a positive multiple of 32, got ", D);
  KVE_CHECK(!cuda || D == 32 || D == 64 || D == 128 || D == 256, op,
            ": on CUDA head_dim D must be 32, 64, 128 or 256, got ", D);
}

// q / v: 4-d, float, on dev, nonempty (Lk may be 0 only for ... never: we require >= 1)
void check_qkv(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  check_supported_device(op, t);
  check_device(op, name, t, dev);
  check_float(op, name, t);
  KVE_CHECK(t.dim() == 4, op, ": ", name, " must be 4-d [B, H, L, D], got shape ", t.sizes());
  check_nonempty(op, name, t);
}

constexpr int64_t kMaxLen = int64_t(1) << 30;

at::Tensor last_contig(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

struct Common {
  int64_t B, Hq, Hkv, Lq, Lk, D;
  at::Tensor q, v, bias, rel;
};

// checks of q, v (shape of the keys given by Hkv, Lk), bias, rel_bias, softmax_scale; fills the args
Common check_common(const char* op, const at::Tensor& q, const at::Tensor& v, int64_t Hkv, int64_t Lk,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& rel_bias,
                    std::optional<double> softmax_scale, BinaryAttentionArgs& a) {
  const at::Device dev = q.device();
  Common c;
  c.B = q.size(0);
  c.Hq = q.size(1);
  c.Lq = q.size(2);
  c.D = q.size(3);
  c.Hkv = Hkv;
  c.Lk = Lk;
  check_head_dim(op, c.D, on_cuda(q));
  // the kernels index queries / keys (plus a tile of padding) in 32-bit ints
  KVE_CHECK(c.Lq <= kMaxLen, op, ": Lq (dim 2 of q, ", c.Lq, ") must be <= 2^30");
  KVE_CHECK(Lk <= kMaxLen, op, ": Lk (dim 2 of the keys, ", Lk, ") must be <= 2^30");
  KVE_CHECK(!on_cuda(q) || (c.B <= kGridYZMax && c.Hq <= kGridYZMax), op, ": on CUDA B (", c.B, ") and Hq (", c.Hq,
            ") must be <= 65535 (grid dimensions)");
  KVE_CHECK(Hkv >= 1 && c.Hq % Hkv == 0, op, ": the query head count Hq (", c.Hq,
            ") must be a multiple of the key/value head count Hkv (", Hkv, ")");
  check_qkv(op, "v", v, dev);
  KVE_CHECK(v.size(0) == c.B && v.size(1) == Hkv && v.size(2) == Lk && v.size(3) == c.D, op,
            ": v must have shape [B, Hkv, Lk, D] = [", c.B, ", ", Hkv, ", ", Lk, ", ", c.D, "], got ", v.sizes());
  KVE_CHECK(v.scalar_type() == q.scalar_type(), op, ": v must have q's dtype (", q.scalar_type(), "), got ",
            v.scalar_type());
  c.q = last_contig(q);
  c.v = last_contig(v);
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& bt = *bias;
    check_device(op, "bias", bt, dev);
    check_float(op, "bias", bt);
    KVE_CHECK(bt.dim() == 3 || bt.dim() == 4, op, ": bias must be [Hq, Lq, Lk] or [B, Hq, Lq, Lk] (B and Hq may be 1 "
              "to broadcast), got shape ", bt.sizes());
    const int64_t bB = bt.dim() == 4 ? bt.size(0) : 1, bH = bt.size(-3);
    KVE_CHECK(bt.size(-2) == c.Lq && bt.size(-1) == Lk && (bH == c.Hq || bH == 1) && (bB == c.B || bB == 1), op,
              ": bias must be [Hq, Lq, Lk] = [", c.Hq, ", ", c.Lq, ", ", Lk, "] or [B, Hq, Lq, Lk] with B = ", c.B,
              " (B and Hq may be 1 to broadcast), got shape ", bt.sizes());
    at::Tensor b4 = bt.to(at::kFloat);
    if (b4.dim() == 3) b4 = b4.unsqueeze(0);
    b4 = last_contig(b4);
    c.bias = b4;
    a.bias = b4.data_ptr<float>();
    a.bias_stride_b = bB == 1 ? 0 : b4.stride(0);
    a.bias_stride_h = bH == 1 ? 0 : b4.stride(1);
    a.bias_stride_i = b4.stride(2);
  }
  if (rel_bias.has_value() && rel_bias->defined()) {
    const at::Tensor& rt = *rel_bias;
    check_device(op, "rel_bias", rt, dev);
    check_float(op, "rel_bias", rt);
    KVE_CHECK(rt.dim() == 2 && rt.size(0) == c.Hq, op, ": rel_bias must be [Hq, 2R - 1] = [", c.Hq,
              ", 2R - 1], got shape ", rt.sizes());
    const int64_t T = rt.size(1), need = std::max(c.Lq, Lk);
    KVE_CHECK(T % 2 == 1 && (T - 1) / 2 >= need - 1, op, ": rel_bias must have an odd length 2R - 1 with R >= max(Lq, Lk) = ",
              need, " (index i - j + shift + R - 1), got length ", T);
    c.rel = rt.to(at::kFloat).contiguous();
    a.rel_bias = c.rel.data_ptr<float>();
    a.rel_len = T;
  }
  if (softmax_scale.has_value())
    KVE_CHECK(std::isfinite(*softmax_scale), op, ": softmax_scale must be finite, got ", *softmax_scale);
  a.q = c.q.data_ptr();
  a.q_stride_b = c.q.stride(0);
  a.q_stride_h = c.q.stride(1);
  a.q_stride_t = c.q.stride(2);
  a.q_dtype = to_dtype(q.scalar_type());
  a.v = c.v.data_ptr();
  a.v_stride_b = c.v.stride(0);
  a.v_stride_h = c.v.stride(1);
  a.v_stride_t = c.v.stride(2);
  a.v_dtype = to_dtype(v.scalar_type());
  a.B = c.B;
  a.Hq = c.Hq;
  a.Hkv = Hkv;
  a.Lq = c.Lq;
  a.Lk = Lk;
  a.D = c.D;
  a.softmax_scale = softmax_scale.has_value() ? float(*softmax_scale) : 1.0f / std::sqrt(float(c.D));
  return c;
}

// bits [batch, L, D/32] int32 + scale [batch, L] fp32 of x viewed as [batch, L, D]
void run_sign_pack(const at::Tensor& x3, bool center, at::Tensor& bits, at::Tensor& scale) {
  const int64_t batch = x3.size(0), L = x3.size(1), D = x3.size(2);
#ifdef KVENGINE_WITH_CUDA
  if (on_cuda(x3)) {
    c10::cuda::CUDAGuard guard(x3.device());
    at::Tensor ws;
    if (center) ws = at::empty({batch, D}, x3.options().dtype(at::kFloat));
    cuda::sign_pack(x3.data_ptr(), to_dtype(x3.scalar_type()), batch, L, D, x3.stride(0), x3.stride(1), center,
                    reinterpret_cast<uint32_t*>(bits.data_ptr<int32_t>()), scale.data_ptr<float>(),
                    center ? ws.data_ptr<float>() : nullptr, stream_of(x3));
    return;
  }
#endif
  sign_pack_cpu(x3.data_ptr(), to_dtype(x3.scalar_type()), batch, L, D, x3.stride(0), x3.stride(1), center,
                reinterpret_cast<uint32_t*>(bits.data_ptr<int32_t>()), scale.data_ptr<float>());
}

void run_attention(const at::Tensor& q, BinaryAttentionArgs& a) {
#ifdef KVENGINE_WITH_CUDA
  if (on_cuda(q)) {
    c10::cuda::CUDAGuard guard(q.device());
    const size_t wsb = cuda::binary_attention_workspace_bytes(a);  // the split of decode-shaped calls
    at::Tensor ws = wsb ? at::empty({int64_t(wsb)}, q.options().dtype(at::kByte)) : at::Tensor();
    cuda::binary_attention(a, wsb ? ws.data_ptr() : nullptr, stream_of(q));
    return;
  }
#endif
  binary_attention_cpu(a);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sign_pack(const at::Tensor& x, bool center) {
  const char* op = "sign_pack";
  check_supported_device(op, x);
  check_float(op, "x", x);
  KVE_CHECK(x.dim() >= 2, op, ": x must be [..., L, D] (at least 2-d), got shape ", x.sizes());
  check_nonempty(op, "x", x);
  const int64_t L = x.size(-2), D = x.size(-1);
  KVE_CHECK(D % 32 == 0, op, ": the channel axis (dim -1, size ", D, ") must be a multiple of 32");
  std::vector<int64_t> bshape = x.sizes().vec();
  bshape.back() = D / 32;
  std::vector<int64_t> sshape(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor bits = at::empty(bshape, x.options().dtype(at::kInt));
  at::Tensor scale = at::empty(sshape, x.options().dtype(at::kFloat));
  at::Tensor x3 = flatten_lead(x, {L, D});
  run_sign_pack(x3, center, bits, scale);
  return {bits, scale};
}

at::Tensor binary_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& rel_bias,
                            bool causal, bool center_k, std::optional<double> softmax_scale) {
  const char* op = "binary_attention";
  check_qkv(op, "q", q, q.device());
  check_qkv(op, "k", k, q.device());
  KVE_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": k must be [B, Hkv, Lk, D] with q's B (",
            q.size(0), ") and D (", q.size(3), "), got shape ", k.sizes());
  KVE_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype (", q.scalar_type(), "), got ",
            k.scalar_type());
  BinaryAttentionArgs a;
  a.causal = causal;
  Common c = check_common(op, q, v, k.size(1), k.size(2), bias, rel_bias, softmax_scale, a);
  at::Tensor kbits = at::empty({c.B, c.Hkv, c.Lk, c.D / 32}, q.options().dtype(at::kInt));
  at::Tensor kscale = at::empty({c.B, c.Hkv, c.Lk}, q.options().dtype(at::kFloat));
  at::Tensor k3 = flatten_lead(k, {c.Lk, c.D});
  run_sign_pack(k3, center_k, kbits, kscale);
  at::Tensor out = at::empty({c.B, c.Hq, c.Lq, c.D}, v.options().memory_format(at::MemoryFormat::Contiguous));
  a.k_bits = reinterpret_cast<const uint32_t*>(kbits.data_ptr<int32_t>());
  a.k_scale = kscale.data_ptr<float>();
  a.out = out.data_ptr();
  run_attention(q, a);
  return out;
}

at::Tensor binary_attention_packed(const at::Tensor& q, const at::Tensor& k_bits, const at::Tensor& k_scale,
                                   const at::Tensor& v, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& rel_bias, bool causal,
                                   std::optional<double> softmax_scale) {
  const char* op = "binary_attention_packed";
  check_qkv(op, "q", q, q.device());
  const at::Device dev = q.device();
  check_device(op, "k_bits", k_bits, dev);
  check_device(op, "k_scale", k_scale, dev);
  KVE_CHECK(k_bits.scalar_type() == at::kInt, op, ": k_bits must be int32 (packed sign words from sign_pack), got ",
            k_bits.scalar_type());
  KVE_CHECK(k_scale.scalar_type() == at::kFloat, op, ": k_scale must be float32, got ", k_scale.scalar_type());
  KVE_CHECK(k_bits.dim() == 4 && k_bits.size(0) == q.size(0) && k_bits.size(3) * 32 == q.size(3), op,
            ": k_bits must be [B, Hkv, Lk, D/32] with B = ", q.size(0), ", D = ", q.size(3), ", got shape ",
            k_bits.sizes());
  check_nonempty(op, "k_bits", k_bits);
  const int64_t Hkv = k_bits.size(1), Lk = k_bits.size(2);
  KVE_CHECK(k_scale.dim() == 3 && k_scale.size(0) == q.size(0) && k_scale.size(1) == Hkv && k_scale.size(2) == Lk, op,
            ": k_scale must be [B, Hkv, Lk] = [", q.size(0), ", ", Hkv, ", ", Lk, "], got shape ", k_scale.sizes());
  BinaryAttentionArgs a;
  a.causal = causal;
  Common c = check_common(op, q, v, Hkv, Lk, bias, rel_bias, softmax_scale, a);
  at::Tensor kb = k_bits.contiguous(), ks = k_scale.contiguous();
  at::Tensor out = at::empty({c.B, c.Hq, c.Lq, c.D}, v.options().memory_format(at::MemoryFormat::Contiguous));
  a.k_bits = reinterpret_cast<const uint32_t*>(kb.data_ptr<int32_t>());
  a.k_scale = ks.data_ptr<float>();
  a.out = out.data_ptr();
  run_attention(q, a);
  return out;
}

#ifndef KVENGINE_CUDA_EMU
TORCH_LIBRARY_IMPL(kvengine, CPU, m) {
  m.impl("sign_pack", &sign_pack);
  m.impl("binary_attention", &binary_attention);
  m.impl("binary_attention_packed", &binary_attention_packed);
}
#endif
#ifdef KVENGINE_WITH_CUDA
KVE_TORCH_LIBRARY_IMPL(kvengine, KVE_CUDA_KEY, m) {
  m.impl("sign_pack", &sign_pack);
  m.impl("binary_attention", &binary_attention);
  m.impl("binary_attention_packed", &binary_attention_packed);
}
#endif

}  // namespace kvengine::binding
