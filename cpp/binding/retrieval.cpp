// kvengine — binding of the hash-based retrieval ops: hash_encode, hamming_topk, sparse_decode_attention.
// Every input is checked here once (ValueError naming the argument); then CPU or CUDA.
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "kvengine/retrieval.h"
#ifdef KVENGINE_WITH_CUDA
#include "kvengine/cuda_ops.h"
#endif

namespace kvengine::binding {
namespace {

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// weights as fp32 contiguous on x's device
at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

at::Tensor check_seq_lens(const char* op, const std::optional<at::Tensor>& seq_lens, int64_t B, int64_t N,
                          const at::Device& dev) {
  if (!given(seq_lens)) return at::Tensor();
  const at::Tensor& s = *seq_lens;
  check_device(op, "seq_lens", s, dev);
  KVE_CHECK(s.scalar_type() == at::kInt || s.scalar_type() == at::kLong, op,
            ": seq_lens must be int32 or int64, got ", s.scalar_type());
  KVE_CHECK(s.dim() == 1 && s.size(0) == B, op, ": seq_lens must have shape [B] = [", B, "], got ", s.sizes());
  at::Tensor t = s.to(at::kInt).contiguous();
  if (!on_cuda(t)) {  // value checks need the data; on CUDA they would cost a host sync (kernels clamp instead)
    const int32_t* l = t.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      KVE_CHECK(l[b] >= 0 && l[b] <= N, op, ": seq_lens[", b, "] = ", l[b], " must be in [0, ", N,
                "] (N = dim 2 of the keys)");
  }
  return t;
}

}  // namespace

// ---- hash_encode ---------------------------------------------------------------------------------------------------
at::Tensor hash_encode(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                       const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
                       std::optional<int64_t> nbits_arg) {
  const char* op = "hash_encode";
  check_supported_device(op, x);
  check_float(op, "x", x);
  const at::Device dev = x.device();
  check_device(op, "w1", w1, dev);
  check_float(op, "w1", w1);
  KVE_CHECK(w1.dim() == 2 || w1.dim() == 3, op, ": w1 must be [D, nbits] (shared) or [H, D, nbits] (per head), got "
            "shape ", w1.sizes());
  const bool per_head = w1.dim() == 3;
  const int64_t nbits = w1.size(-1), D = w1.size(-2), H = per_head ? w1.size(0) : 1;
  KVE_CHECK(nbits == 32 || nbits == 64 || nbits == 128 || nbits == 256, op,
            ": nbits (last dim of w1) must be 32, 64, 128 or 256, got ", nbits);
  KVE_CHECK(!nbits_arg.has_value() || *nbits_arg == nbits, op, ": nbits (", nbits_arg.value_or(0),
            ") does not match the last dim of w1 (", nbits, ")");
  KVE_CHECK(x.dim() >= (per_head ? 3 : 2), op, ": x must be ", per_head ? "[..., H, T, D]" : "[..., D]",
            ", got shape ", x.sizes());
  KVE_CHECK(x.size(-1) == D, op, ": the last dim of x (", x.size(-1), ") must equal dim -2 of w1 (", D, ")");
  KVE_CHECK(!per_head || x.size(-3) == H, op, ": x's head dim (dim -3, ", x.size(-3),
            ") must equal dim 0 of w1 (", H, ")");
  KVE_CHECK(D >= 1 && D <= 1024, op, ": head_dim D must be in [1, 1024], got ", D);
  std::vector<int64_t> bshape = per_head ? std::vector<int64_t>{H, nbits} : std::vector<int64_t>{nbits};
  std::vector<int64_t> w2shape = per_head ? std::vector<int64_t>{H, nbits, nbits} : std::vector<int64_t>{nbits, nbits};
  auto check_w = [&](const char* name, const std::optional<at::Tensor>& t, const std::vector<int64_t>& shape) {
    if (!given(t)) return;
    check_device(op, name, *t, dev);
    check_float(op, name, *t);
    KVE_CHECK(t->sizes().vec() == shape, op, ": ", name, " must have shape ", at::IntArrayRef(shape), ", got ",
              t->sizes());
  };
  check_w("b1", b1, bshape);
  check_w("w2", w2, w2shape);
  check_w("b2", b2, bshape);
  KVE_CHECK(!given(b2) || given(w2), op, ": b2 given without w2");

  std::vector<int64_t> oshape = x.sizes().vec();
  oshape.back() = nbits / 32;
  at::Tensor codes = at::empty(oshape, x.options().dtype(at::kInt));
  if (x.numel() == 0) return codes;
  at::Tensor w1f = as_f32(w1);
  at::Tensor b1f = given(b1) ? as_f32(*b1) : at::Tensor();
  at::Tensor w2f = given(w2) ? as_f32(*w2) : at::Tensor();
  at::Tensor b2f = given(b2) ? as_f32(*b2) : at::Tensor();
#ifdef KVENGINE_WITH_CUDA
  if (on_cuda(x)) {
    c10::cuda::CUDAGuard guard(dev);
    const int64_t T = per_head ? x.size(-2) : 1;
    // shared weights: all rows as one [1, 1, rows, D] sequence (CTAs take kEncRows rows each, not one)
    at::Tensor x4 = per_head ? flatten_lead(x, {H, T, D}) : flatten_lead(x, {D}).unsqueeze(0).unsqueeze(0);
    HashEncodeArgs a;
    a.x = x4.data_ptr();
    a.dtype = to_dtype(x.scalar_type());
    a.O = x4.size(0);
    a.H = x4.size(1);
    a.T = x4.size(2);
    a.D = D;
    a.x_stride_o = x4.stride(0);
    a.x_stride_h = x4.stride(1);
    a.x_stride_t = x4.stride(2);
    a.w1 = w1f.data_ptr<float>();
    a.b1 = b1f.defined() ? b1f.data_ptr<float>() : nullptr;
    a.w2 = w2f.defined() ? w2f.data_ptr<float>() : nullptr;
    a.b2 = b2f.defined() ? b2f.data_ptr<float>() : nullptr;
    a.per_head = per_head;
    a.nbits = int(nbits);
    a.codes = reinterpret_cast<uint32_t*>(codes.data_ptr<int32_t>());
    cuda::hash_encode(a, stream_of(x));
    return codes;
  }
#endif
  // CPU: blocked fp32 matmuls through ATen, then the sign-pack kernel
  at::Tensor u = at::matmul(x.to(at::kFloat), w1f);
  if (b1f.defined()) u.add_(per_head ? b1f.unsqueeze(-2) : b1f);
  at::Tensor f = u;
  if (w2f.defined()) {
    f = at::matmul(at::silu(u), w2f).add_(u);
    if (b2f.defined()) f.add_(per_head ? b2f.unsqueeze(-2) : b2f);
  }
  f = f.contiguous();
  hash_sign_pack_cpu(f.data_ptr<float>(), f.numel() / nbits, nbits, nbits,
                     reinterpret_cast<uint32_t*>(codes.data_ptr<int32_t>()));
  return codes;
}

// ---- hamming_topk ----------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> hamming_topk(const at::Tensor& q_codes, const at::Tensor& k_codes, int64_t k,
                                                const std::optional<at::Tensor>& seq_lens,
                                                at::OptionalIntArrayRef keep) {
  const char* op = "hamming_topk";
  check_supported_device(op, q_codes);
  const at::Device dev = q_codes.device();
  check_device(op, "k_codes", k_codes, dev);
  KVE_CHECK(q_codes.scalar_type() == at::kInt, op, ": q_codes must be int32 (packed uint32 words), got ",
            q_codes.scalar_type());
  KVE_CHECK(k_codes.scalar_type() == at::kInt, op, ": k_codes must be int32 (packed uint32 words), got ",
            k_codes.scalar_type());
  KVE_CHECK(q_codes.dim() == 3 || (q_codes.dim() == 4 && q_codes.size(2) == 1), op,
            ": q_codes must be [B, Hq, W] or [B, Hq, 1, W] (one query token), got shape ", q_codes.sizes());
  KVE_CHECK(k_codes.dim() == 4, op, ": k_codes must be [B, Hkv, N, W], got shape ", k_codes.sizes());
  at::Tensor q = q_codes.dim() == 4 ? q_codes.squeeze(2) : q_codes;
  const int64_t B = q.size(0), Hq = q.size(1), W = q.size(2), Hkv = k_codes.size(1), N = k_codes.size(2);
  KVE_CHECK(W == 1 || W == 2 || W == 4 || W == 8, op, ": q_codes must hold 1, 2, 4 or 8 words (32..256 bits), got ",
            W);
  KVE_CHECK(k_codes.size(3) == W, op, ": code width mismatch: k_codes has ", k_codes.size(3),
            " words per code, q_codes has ", W);
  KVE_CHECK(k_codes.size(0) == B, op, ": k_codes batch (", k_codes.size(0), ") must equal q_codes batch (", B, ")");
  KVE_CHECK(Hkv >= 1 && Hq >= 1 && Hq % Hkv == 0, op, ": the query head count Hq (", Hq,
            ") must be a multiple of the KV head count Hkv (", Hkv, ")");
  const int64_t g = Hq / Hkv;
  KVE_CHECK(g * 32 * W <= 8192, op, ": (Hq / Hkv) · nbits must be <= 8192 (the score range), got ", g * 32 * W);
  KVE_CHECK(N >= 1 && B >= 1, op, ": k_codes is empty (shape ", k_codes.sizes(), ")");
  KVE_CHECK(k >= 1 && k <= N, op, ": k (", k, ") must be in [1, N] where N = ", N,
            " is the context capacity (dim 2 of k_codes)");
  KVE_CHECK(N < (int64_t(1) << 31), op, ": N (dim 2 of k_codes) must be < 2^31");
  KVE_CHECK(!on_cuda(q) || (B <= kGridYZMax && Hkv <= kGridYZMax && B * Hkv <= kInt32Max), op, ": on CUDA B (", B,
            ") and Hkv (", Hkv, ") must be <= 65535 with B·Hkv < 2^31 (grid dimensions)");
  int64_t sinks = 0, recent = 0;
  if (keep.has_value()) {
    KVE_CHECK(keep->size() == 2, op, ": keep must be (sinks, recent), got ", keep->size(), " values");
    sinks = (*keep)[0];
    recent = (*keep)[1];
    KVE_CHECK(sinks >= 0 && recent >= 0 && sinks + recent <= k, op, ": keep = (", sinks, ", ", recent,
              ") must be non-negative with sinks + recent <= k (", k, ")");
  }
  at::Tensor lens = check_seq_lens(op, seq_lens, B, N, dev);
  if (q.stride(-1) != 1) q = q.contiguous();
  at::Tensor kc = k_codes;
  if (kc.stride(3) != 1 || kc.stride(2) != W) kc = kc.contiguous();
  at::Tensor idx = at::empty({B, Hkv, k}, q.options().dtype(at::kInt));
  at::Tensor scr = at::empty({B, Hkv, k}, q.options().dtype(at::kInt));
  HammingTopkArgs a;
  a.q_codes = reinterpret_cast<const uint32_t*>(q.data_ptr<int32_t>());
  a.q_stride_b = q.stride(0);
  a.q_stride_h = q.stride(1);
  a.k_codes = reinterpret_cast<const uint32_t*>(kc.data_ptr<int32_t>());
  a.k_stride_b = kc.stride(0);
  a.k_stride_h = kc.stride(1);
  a.seq_lens = lens.defined() ? lens.data_ptr<int32_t>() : nullptr;
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.N = N;
  a.W = W;
  a.k = k;
  a.sinks = sinks;
  a.recent = recent;
  a.indices = idx.data_ptr<int32_t>();
  a.scores = scr.data_ptr<int32_t>();
#ifdef KVENGINE_WITH_CUDA
  if (on_cuda(q)) {
    c10::cuda::CUDAGuard guard(dev);
    at::Tensor ws = at::empty({int64_t(cuda::hamming_topk_workspace_bytes(a))}, q.options().dtype(at::kByte));
    cuda::hamming_topk(a, ws.data_ptr(), stream_of(q));
    return {idx, scr};
  }
#endif
  hamming_topk_cpu(a);
  return {idx, scr};
}

// ---- sparse_decode_attention -----------------------------------------------------------------------------------------
at::Tensor sparse_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& indices, const std::optional<at::Tensor>& seq_lens,
                                   std::optional<double> softmax_scale) {
  const char* op = "sparse_decode_attention";
  check_supported_device(op, q);
  check_float(op, "q", q);
  const at::Device dev = q.device();
  KVE_CHECK(q.dim() == 4 && q.size(2) == 1, op, ": q must be [B, Hq, 1, D] (one decode token), got shape ",
            q.sizes());
  check_nonempty(op, "q", q);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    check_device(op, name, t, dev);
    KVE_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype (", q.scalar_type(),
              "), got ", t.scalar_type());
    KVE_CHECK(t.dim() == 4 && t.size(0) == B && t.size(3) == D, op, ": ", name, " must be [B, Hkv, N, D] with B = ",
              B, " and D = ", D, ", got shape ", t.sizes());
  }
  KVE_CHECK(v.size(1) == k.size(1) && v.size(2) == k.size(2), op, ": v must have k's shape ", k.sizes(), ", got ",
            v.sizes());
  const int64_t Hkv = k.size(1), N = k.size(2);
  KVE_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, ": the query head count Hq (", Hq,
            ") must be a multiple of the KV head count Hkv (", Hkv, ")");
  KVE_CHECK(D <= 1024, op, ": head_dim D must be <= 1024, got ", D);
  KVE_CHECK(!on_cuda(q) || D == 32 || D == 64 || D == 128 || D == 256, op,
            ": on CUDA head_dim D must be 32, 64, 128 or 256, got ", D);
  KVE_CHECK(!on_cuda(q) || B * Hq <= kInt32Max, op, ": on CUDA B·Hq (", B, "·", Hq, ") must be < 2^31 (grid size)");
  check_device(op, "indices", indices, dev);
  KVE_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
            ": indices must be int32 or int64, got ", indices.scalar_type());
  KVE_CHECK(indices.dim() == 3 && indices.size(0) == B && indices.size(1) == Hkv, op,
            ": indices must be [B, Hkv, n] = [", B, ", ", Hkv, ", n], got shape ", indices.sizes());
  KVE_CHECK(indices.size(2) >= 1, op, ": indices is empty (shape ", indices.sizes(), ")");
  at::Tensor lens = check_seq_lens(op, seq_lens, B, N, dev);
  at::Tensor qq = q.stride(-1) == 1 ? q : q.contiguous();
  at::Tensor kk = k.stride(-1) == 1 ? k : k.contiguous();
  at::Tensor vv = v.stride(-1) == 1 ? v : v.contiguous();
  at::Tensor ii = indices.stride(-1) == 1 ? indices : indices.contiguous();
  at::Tensor out = at::empty({B, Hq, 1, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  // an empty cache: every index is skipped, so every row is 0 (the kernels would still touch row 0 of k/v, which
  // an empty CUDA tensor does not have)
  if (N == 0) return out.zero_();
  SparseDecodeArgs a;
  a.q = qq.data_ptr();
  a.q_stride_b = qq.stride(0);
  a.q_stride_h = qq.stride(1);
  a.out = out.data_ptr();
  a.k = kk.data_ptr();
  a.v = vv.data_ptr();
  a.k_stride_b = kk.stride(0);
  a.k_stride_h = kk.stride(1);
  a.k_stride_t = kk.stride(2);
  a.v_stride_b = vv.stride(0);
  a.v_stride_h = vv.stride(1);
  a.v_stride_t = vv.stride(2);
  a.indices = ii.data_ptr();
  a.indices_int64 = ii.scalar_type() == at::kLong;
  a.i_stride_b = ii.stride(0);
  a.i_stride_h = ii.stride(1);
  a.n_sel = ii.size(2);
  a.seq_lens = lens.defined() ? lens.data_ptr<int32_t>() : nullptr;
  a.dtype = to_dtype(q.scalar_type());
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.N = N;
  a.D = D;
  a.softmax_scale = softmax_scale.has_value() ? float(*softmax_scale) : 1.0f / std::sqrt(float(D));
#ifdef KVENGINE_WITH_CUDA
  if (on_cuda(q)) {
    c10::cuda::CUDAGuard guard(dev);
    cuda::sparse_decode_attention(a, stream_of(q));
    return out;
  }
#endif
  sparse_decode_attention_cpu(a);
  return out;
}

#ifndef KVENGINE_CUDA_EMU
TORCH_LIBRARY_IMPL(kvengine, CPU, m) {
  m.impl("hash_encode", &hash_encode);
  m.impl("hamming_topk", &hamming_topk);
  m.impl("sparse_decode_attention", &sparse_decode_attention);
}
#endif
#ifdef KVENGINE_WITH_CUDA
KVE_TORCH_LIBRARY_IMPL(kvengine, KVE_CUDA_KEY, m) {
  m.impl("hash_encode", &hash_encode);
  m.impl("hamming_topk", &hamming_topk);
  m.impl("sparse_decode_attention", &sparse_decode_attention);
}
#endif

}  // namespace kvengine::binding
